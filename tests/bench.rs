//! The benchmarks run and write well-formed results (tiny sizes; no timing thresholds here:
//! numbers on shared machines are noisy, `make bench` prints them side by side instead).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;

use support::*;

fn model_bench(args: &[&str], out: &std::path::Path) -> String {
    let bin = repo_root().join("target/sim/model-bench");
    assert!(bin.exists(), "{} is missing: run `make sim`", bin.display());
    let output = Command::new(bin)
        .args(args)
        .arg("--out")
        .arg(out)
        .env("ENVOY_BIN", envoy_binary())
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "model-bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_seed_matrix_smoke_run_writes_json_markdown_and_svg() {
    wasm_path();
    let out = temp_dir("bench-matrix");
    model_bench(&["matrix", "--smoke"], &out);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("seed-matrix.json")).unwrap())
            .unwrap();
    assert_eq!(rows.len(), 2 * 5, "two sizes x five policies");
    for row in &rows {
        let keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for key in [
            "policy",
            "users",
            "instances",
            "p50_ms",
            "p99_ms",
            "ttft_p99_ms",
            "throughput_per_instance_per_min",
            "errors",
        ] {
            assert!(keys.contains(&key), "row lacks {key}: {row}");
        }
        assert_eq!(keys.len(), 8);
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["p99_ms"].as_f64().unwrap() > 0.0);
    }
    let md = std::fs::read_to_string(out.join("seed-matrix.md")).unwrap();
    assert!(
        md.contains("| model-lb LEAST_OUTSTANDING_REQUESTS | 8 | 2 |"),
        "{md}"
    );
    assert!(md.contains("Bottleneck check"));
    let svg = std::fs::read_to_string(out.join("seed-matrix.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<polyline").count(),
        15,
        "three panels x five policies"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_overhead_smoke_run_writes_a_row_per_variant_and_regime() {
    wasm_path();
    let out = temp_dir("bench-overhead");
    model_bench(&["overhead", "--smoke"], &out);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("overhead.json")).unwrap()).unwrap();
    let variants_of = |workers: u64, body: Option<u64>, connections: u64| -> Vec<String> {
        rows.iter()
            .filter(|r| {
                r["workers"] == workers
                    && r["endpoints"] == 4
                    && r["body_bytes"].as_u64() == body
                    && r["connections"] == connections
            })
            .map(|r| r["variant"].as_str().unwrap().to_owned())
            .collect()
    };
    // One worker: every variant (LOR with server load once the filter accepts it).
    let one = variants_of(1, None, 16);
    assert_eq!(
        one[..7],
        [
            "round_robin",
            "least_request",
            "wasm_noop",
            "mlb_random",
            "mlb_lor",
            "mlb_lor_batched",
            "mlb_lor_no_passive"
        ]
    );
    let md = std::fs::read_to_string(out.join("overhead.md")).unwrap();
    if one.len() == 8 {
        assert_eq!(one[7], "mlb_lor_server_load");
        assert!(md.contains("mlb_lor_server_load without traffic"), "{md}");
    } else {
        assert_eq!(one.len(), 7);
        assert!(md.contains("**Not run:** mlb_lor_server_load"), "{md}");
    }
    // Several workers: the baseline, LOR and LOR with batched releases.
    assert_eq!(
        variants_of(4, None, 16),
        ["least_request", "mlb_lor", "mlb_lor_batched"]
    );
    // Request bodies: LOR and PREFIX_AWARE, loaded and with one connection.
    for body in [1024, 65536] {
        for connections in [16, 1] {
            assert_eq!(
                variants_of(1, Some(body), connections),
                ["mlb_lor", "mlb_prefix"],
                "{body} bytes, {connections} connections"
            );
        }
    }
    for row in &rows {
        assert!(row["requests_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["cpu_us_per_request"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        let filter = row["variant"].as_str().unwrap().starts_with("mlb_");
        assert_eq!(row["cas_conflicts"].is_u64(), filter, "{row}");
        assert_eq!(row["fail_opens"].is_u64(), filter, "{row}");
        let baseline = if row["body_bytes"].is_null() {
            "least_request"
        } else {
            "mlb_lor"
        };
        assert_eq!(row["baseline"], baseline, "{row}");
        if row["variant"] == baseline {
            assert_eq!(row["cpu_ratio_to_baseline"].as_f64(), Some(1.0), "{row}");
            assert_eq!(row["cpu_us_over_baseline"].as_f64(), Some(0.0), "{row}");
        }
    }
    for section in [
        "## Workers x endpoints",
        "## One worker, every variant",
        "## Request bodies: PREFIX_AWARE against LOR",
        "## Targets",
        "## Every run",
        "| mlb_lor | 4 |",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_prefix_smoke_run_writes_json_markdown_and_svg() {
    wasm_path();
    let out = temp_dir("bench-prefix");
    model_bench(&["prefix", "--smoke"], &out);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("prefix.json")).unwrap()).unwrap();
    let runs: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["workload"].as_str().unwrap().to_owned(),
                r["policy"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The smoke plan: four policies on the shared prefix (the hashing configs included), and
    // PREFIX_AWARE on unique prompts and with a hot prefix.
    let expected = [
        ("shared", "model-lb PREFIX_AWARE"),
        ("shared", "model-lb LEAST_OUTSTANDING_REQUESTS"),
        ("shared", "Envoy RING_HASH"),
        ("shared", "Envoy MAGLEV"),
        ("unique", "model-lb PREFIX_AWARE"),
        ("hot", "model-lb PREFIX_AWARE"),
    ];
    assert_eq!(
        runs,
        expected
            .iter()
            .map(|(w, p)| (w.to_string(), p.to_string()))
            .collect::<Vec<_>>()
    );
    for row in &rows {
        let mut keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "busiest_server_share_pct",
                "errors",
                "guard_violations",
                "max_concurrency_while_another_had_room",
                "max_server_concurrency",
                "p50_ms",
                "p99_ms",
                "policy",
                "prefix_cache_hit_rate_pct",
                "requests",
                "share_waited_pct",
                "spilled_pct",
                "throughput_per_instance_per_min",
                "ttft_p50_ms",
                "ttft_p99_ms",
                "workload"
            ],
            "{row}"
        );
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
        assert!(row["ttft_p50_ms"].as_f64().unwrap() > 0.0, "{row}");
        let hit = row["prefix_cache_hit_rate_pct"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&hit), "{row}");
        if row["workload"] == "unique" {
            assert_eq!(hit, 0.0, "unique prompts never hit: {row}");
        }
        assert!(row["max_server_concurrency"].as_u64().unwrap() > 0, "{row}");
        let pa = row["policy"] == "model-lb PREFIX_AWARE";
        assert_eq!(row["spilled_pct"].is_number(), pa, "{row}");
    }
    let md = std::fs::read_to_string(out.join("prefix.md")).unwrap();
    for section in [
        "## Shared prefix",
        "## Unique prompts",
        "## One hot prefix",
        "## Two Envoy replicas, one endpoint per key",
        "## Targets",
        "## Bottleneck checks",
        "## How it was measured",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    // Two Envoy replicas route every key to the same server (nothing else in flight, so no
    // timing is involved: a disagreement is a bug).
    assert!(
        md.contains(
            "| two Envoy replicas agree on every key's endpoint | every key | 6 of 6 keys | yes |"
        ),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.join("prefix.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<rect class=\"bar\"").count(),
        3 * 6,
        "three panels x six runs"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_replicas_smoke_run_writes_json_markdown_and_svg() {
    wasm_path();
    let out = temp_dir("bench-replicas");
    model_bench(&["replicas", "--smoke"], &out);
    let md = std::fs::read_to_string(out.join("replicas.md")).unwrap();
    // The server-load policies run once the filter accepts `server_load`; until then the report
    // says so and leaves them out.
    let server_load = !md.contains("**Not run:**");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("replicas.json")).unwrap()).unwrap();
    for row in &rows {
        let mut keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "arrival_rate_per_s",
                "errors",
                "p50_ms",
                "p99_ms",
                "policy",
                "replicas",
                "requests",
                "scenario",
                "share_waited_pct",
                "throughput_per_instance_per_min",
                "ttft_p99_ms",
                "users"
            ],
            "{row}"
        );
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
        assert!(row["p50_ms"].as_f64().unwrap() > 0.0, "{row}");
        let share = row["share_waited_pct"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&share), "{row}");
        let open = row["scenario"] != "closed";
        assert_eq!(row["arrival_rate_per_s"].is_number(), open, "{row}");
        assert_eq!(row["users"].is_number(), !open, "{row}");
    }
    let has = |scenario: &str, replicas: u64, policy: &str| {
        rows.iter().any(|r| {
            r["scenario"] == scenario && r["replicas"] == replicas && r["policy"] == policy
        })
    };
    // The smoke plan: every policy at 2 replicas, the closed loop's exact view and its uneven
    // run, the mixed fleet with weights.
    for policy in [
        "model-lb LOR, local counts",
        "Envoy LEAST_REQUEST FULL_SCAN",
        "Envoy LEAST_REQUEST (P2C)",
        "model-lb RANDOM",
    ] {
        assert!(has("open", 2, policy), "{policy}");
    }
    assert!(has("closed", 1, "model-lb LOR, local counts"));
    assert_eq!(has("open", 2, "model-lb LOR + server load"), server_load);
    assert_eq!(has("closed", 2, "model-lb LOR + server load"), server_load);
    assert_eq!(
        has("mixed", 1, "model-lb LOR + server load + weights"),
        server_load
    );
    assert_eq!(rows.len(), if server_load { 8 } else { 5 });
    for section in [
        "### 2 Envoy replicas",
        "## Closed loop, users spread unevenly",
        "## Targets",
        "## Bottleneck checks",
        "## How it was measured",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    let svg = std::fs::read_to_string(out.join("replicas.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<polyline").count(),
        2 * if server_load { 5 } else { 4 },
        "two panels x the open loop's policies"
    );
    let _ = std::fs::remove_dir_all(&out);
}
