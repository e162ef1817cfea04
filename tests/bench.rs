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
        variants,
        [
            "round_robin",
            "least_request",
            "wasm_noop",
            "mlb_random",
            "mlb_lor",
            "mlb_lor_no_passive"
        ]
    );
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
