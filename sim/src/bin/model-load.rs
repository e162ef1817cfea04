//! `model-load`: a load generator for OpenAI-compatible endpoints.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use model_sim::cli::{load_help, parse_load_args, Parsed};
use model_sim::load::run;
use model_sim::report::{render_table, samples_jsonl};

fn main() -> ExitCode {
    let mut cfg = match parse_load_args(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Help) => {
            print!("{}", load_help());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("model-load {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("model-load: error: {e}");
            return ExitCode::from(2);
        }
    };
    cfg.progress = !cfg.quiet && std::io::stderr().is_terminal();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("model-load: error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json_path = cfg.json.clone();
    let samples_path = cfg.samples.clone();
    let fail_on_errors = cfg.fail_on_errors;
    let out = match runtime.block_on(run(cfg)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("model-load: error: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", render_table(&out.report));
    if let Some(path) = json_path {
        let text = match serde_json::to_string_pretty(&out.report) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("model-load: error: cannot encode report: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("model-load: error: --json {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = samples_path {
        if let Err(e) = std::fs::write(&path, samples_jsonl(&out.records)) {
            eprintln!("model-load: error: --samples {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if fail_on_errors && out.total_errors > 0 {
        eprintln!(
            "model-load: {} request(s) failed (--fail-on-errors)",
            out.total_errors
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
