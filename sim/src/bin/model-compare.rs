//! `model-compare A.json B.json ...`: prints `model-load --json` reports side by side, with the
//! change of the last against the first.

use std::process::ExitCode;

use model_sim::compare::{render, Row};

fn main() -> ExitCode {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() || paths.iter().any(|p| p == "-h" || p == "--help") {
        eprintln!("usage: model-compare BASELINE.json [OTHER.json ...]");
        return ExitCode::from(2);
    }
    let mut rows = Vec::new();
    for path in &paths {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .and_then(|json| Row::from_json(&json));
        match parsed {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("model-compare: {path}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    print!("{}", render(&rows));
    ExitCode::SUCCESS
}
