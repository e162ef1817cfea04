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
fn the_overhead_smoke_run_writes_a_row_per_variant() {
    wasm_path();
    let out = temp_dir("bench-overhead");
    model_bench(&["overhead", "--smoke"], &out);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("overhead.json")).unwrap()).unwrap();
    let variants: Vec<&str> = rows
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants[..6],
        [
            "round_robin",
            "least_request",
            "wasm_noop",
            "mlb_random",
            "mlb_lor",
            "mlb_lor_no_passive"
        ]
    );
    // LOR with server load runs in an Envoy of its own, once the filter accepts `server_load`
    // (until then the report says it was not run).
    let md = std::fs::read_to_string(out.join("overhead.md")).unwrap();
    if variants.len() == 7 {
        assert_eq!(variants[6], "mlb_lor_server_load");
        assert!(md.contains("mlb_lor_server_load without traffic"), "{md}");
    } else {
        assert_eq!(variants.len(), 6);
        assert!(md.contains("**Not run:** mlb_lor_server_load"), "{md}");
    }
    for row in &rows {
        assert!(row["requests_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["cpu_us_per_request"].as_f64().unwrap() > 0.0, "{row}");
    }
    let lr = rows
        .iter()
        .find(|r| r["variant"] == "least_request")
        .unwrap();
    assert_eq!(lr["cpu_ratio_to_least_request"].as_f64(), Some(1.0));
    assert!(std::fs::read_to_string(out.join("overhead.md"))
        .unwrap()
        .contains("| mlb_lor | 4 |"));
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
