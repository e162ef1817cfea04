//! The demo's pieces: the simulated model servers and the load tool through Envoy and the filter,
//! and the docker compose file, which must be valid Compose (checked against the specification's
//! JSON schema, no Docker needed) and describe the same set-up as the local demo.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use support::*;

fn sim_binary(name: &str) -> std::path::PathBuf {
    let path = repo_root().join("target/sim").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make sim` (or `make test`)",
        path.display()
    );
    path
}

/// A model-server on a free loopback port; killed on drop.
struct ModelServer {
    child: Child,
    port: u16,
}

impl ModelServer {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(sim_binary("model-server"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected readiness line {line:?}"));
        Self { child, port }
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn simulated_servers_and_load_tool_stream_through_envoy_without_errors() {
    let servers: Vec<ModelServer> = (0..3)
        .map(|i| {
            let seed = i.to_string();
            ModelServer::start(&["--time-scale", "0.05", "--max-batch", "4", "--seed", &seed])
        })
        .collect();
    let ports = [servers[0].port, servers[1].port, servers[2].port];
    let config = EnvoyConfig::shipped()
        .backends(ports)
        .plugin_config(&plugin_json("LEAST_OUTSTANDING_REQUESTS", ports));
    let envoy = Envoy::start(&config);

    let dir = temp_dir("load");
    let report_path = dir.join("report.json");
    let output = Command::new(sim_binary("model-load"))
        .args(["--url", &format!("http://{}", envoy.listener)])
        .args([
            "--api",
            "chat",
            "--stream",
            "--users",
            "12",
            "--duration",
            "3",
        ])
        .args([
            "--max-tokens",
            "lognormal:40:0.8:400",
            "--seed",
            "3",
            "--quiet",
        ])
        .args(["--fail-on-errors", "--json"])
        .arg(&report_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "model-load failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        report["ok"].as_u64().unwrap() >= 30,
        "too few requests: {report}"
    );
    assert_eq!(report["ok"], report["requests"]);
    assert_eq!(report["errors"], serde_json::json!({}));
    assert!(
        report["ttft_ms"]["p99"].as_f64().is_some(),
        "streams report a TTFT"
    );
    let backends: HashMap<String, u64> =
        serde_json::from_value(report["backends"].clone()).unwrap();
    for port in ports {
        let served = backends
            .get(&format!("127.0.0.1:{port}"))
            .copied()
            .unwrap_or(0);
        assert!(served > 0, "backend {port} served nothing: {backends:?}");
    }
    envoy.wait_for_zero_in_flight("model_servers");
}

/// `KEY="value"` assignments of demo/workload.env.
fn workload_env() -> HashMap<String, String> {
    std::fs::read_to_string(repo_root().join("demo/workload.env"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

/// Runs demo/compose-check.py (the Compose Specification's JSON schema plus references between
/// services; no Docker) on `input`, a file or `-` for `stdin`. Returns (valid, stdout, stderr).
fn compose_check(args: &[&str], input: &str, stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write as _;
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test` (or `make compose-check-tool`)",
        python.display()
    );
    let mut child = Command::new(python)
        .arg(repo_root().join("demo/compose-check.py"))
        .args(args)
        .arg(input)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stderr.contains("Traceback") && !stderr.contains("ModuleNotFoundError"),
        "compose-check.py itself failed (`make compose-check-tool` installs its modules):\n{stderr}"
    );
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
    )
}

fn compose_file() -> String {
    repo_root()
        .join("demo/docker-compose.yaml")
        .display()
        .to_string()
}

#[test]
fn compose_file_is_valid() {
    let (ok, _, errors) = compose_check(&[], &compose_file(), None);
    assert!(
        ok,
        "demo/docker-compose.yaml breaks the Compose Specification:\n{errors}"
    );
}

/// The check is a real one: broken documents, including the demo's own file with one typo, are
/// rejected with a message that names the problem.
#[test]
fn compose_check_rejects_broken_documents() {
    let real = std::fs::read_to_string(compose_file()).unwrap();
    let cases = [
        (
            real.replacen("network_mode:", "network-mode:", 1),
            "'network-mode' does not match",
        ),
        (
            real.replacen("depends_on: [envoy]", "depends_on: [envoi]", 1),
            "depends_on names service 'envoi'",
        ),
        (
            real.replacen("working_dir: /work", "working_dir: [/work]", 1),
            "services/envoy/working_dir",
        ),
        (
            "services:\n  a:\n    image: x\n    image: y\n".to_owned(),
            "duplicate key 'image'",
        ),
        (
            "services:\n  a:\n    image: x\n    ports: 8000\n".to_owned(),
            "services/a/ports",
        ),
        (
            "services:\n  a:\n    network_mode: service:b\n".to_owned(),
            "network_mode names service 'b'",
        ),
        ("services: [\n".to_owned(), "not valid YAML"),
        ("just a string\n".to_owned(), "not a compose file"),
    ];
    for (doc, expected) in cases {
        assert_ne!(doc, real, "the mutation did not apply");
        let (ok, _, errors) = compose_check(&[], "-", Some(&doc));
        assert!(!ok, "accepted a broken document:\n{doc}");
        assert!(
            errors.contains(expected),
            "expected {expected:?} in:\n{errors}"
        );
    }
}

#[test]
fn compose_demo_uses_the_local_demos_config_wasm_and_ports() {
    let env = workload_env();
    let (ok, json, errors) = compose_check(&["--json"], &compose_file(), None);
    assert!(ok, "{errors}");
    let compose: serde_json::Value = serde_json::from_str(&json).unwrap();
    let services = compose["services"].as_object().unwrap();
    let words = |service: &str| -> Vec<String> {
        match &services[service]["command"] {
            serde_json::Value::Array(words) => words
                .iter()
                .map(|w| w.as_str().unwrap().to_owned())
                .collect(),
            other => panic!("{service}: command is not a list: {other}"),
        }
    };
    let envoy_config = &env["DEMO_ENVOY_CONFIG"];
    assert_eq!(envoy_config, "envoy/demo.yaml");

    // Envoy in compose runs the very file the local demo runs, from the same relative path.
    let envoy = &services["envoy"];
    let volumes: Vec<&str> = envoy["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Relative paths in a compose file are relative to the file's directory, demo/.
    let mount = format!("../{envoy_config}:/work/{envoy_config}:ro");
    assert!(
        volumes.contains(&mount.as_str()),
        "compose does not mount {envoy_config}: {volumes:?}"
    );
    assert!(repo_root()
        .join("demo")
        .join(format!("../{envoy_config}"))
        .exists());
    let envoy_words = words("envoy");
    assert!(
        envoy_words
            .windows(2)
            .any(|w| w == ["-c", envoy_config.as_str()]),
        "envoy is not started with {envoy_config}: {envoy_words:?}"
    );
    assert_eq!(envoy["working_dir"], "/work");

    // The image puts the wasm where that config looks for it.
    let yaml = std::fs::read_to_string(repo_root().join(envoy_config)).unwrap();
    let wasm = "target/wasm32-wasip1/release/model_lb.wasm";
    assert!(yaml.contains(&format!("filename: {wasm}")));
    let dockerfile = std::fs::read_to_string(repo_root().join("demo/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("/src/{wasm} /work/{wasm}")),
        "Dockerfile copies the wasm elsewhere"
    );
    assert!(
        dockerfile.contains("envoyproxy/envoy:v1.40"),
        "compose must run the Envoy version the tests use"
    );

    // Same servers on the same ports, same listeners, same admin port.
    let commands: Vec<String> = services.keys().map(|s| words(s).join(" ")).collect();
    for port in env["DEMO_SERVER_PORTS"].split_whitespace() {
        assert!(
            commands
                .iter()
                .any(|c| c.contains(&format!("--listen 127.0.0.1:{port} "))),
            "no server on {port}: {commands:?}"
        );
        assert!(
            yaml.contains(&format!("port_value: {port} ")),
            "{envoy_config} lacks endpoint {port}"
        );
        assert!(
            yaml.contains(&format!("\"127.0.0.1:{port}\"")),
            "plugin config lacks {port}"
        );
    }
    for key in ["DEMO_LOR_PORT", "DEMO_RANDOM_PORT", "DEMO_ADMIN_PORT"] {
        assert!(
            yaml.contains(&format!("port_value: {} ", env[key])),
            "{key} differs from {envoy_config}"
        );
    }
    // Every other service shares Envoy's network namespace, which is what makes 127.0.0.1 work.
    let shared = services
        .values()
        .filter(|s| s["network_mode"] == "service:envoy")
        .count();
    assert_eq!(shared, services.len() - 1);
    assert_eq!(
        shared,
        env["DEMO_SERVER_PORTS"].split_whitespace().count() + 1
    );
    assert_eq!(words("load"), ["demo/compose-load.sh"]);
}

// ---------------------------------------------------------------------------------------------
// demo/run.sh: only a complete run prints and saves results.

/// `base` such that base+1..=base+7 (the demo's 4 servers, 2 listeners and admin) are free, below
/// the ephemeral range that the other tests' port-0 binds draw from.
fn free_port_base() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    loop {
        let slot = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = 20_000 + ((std::process::id() as u16 % 100) * 100 + slot * 10) % 12_000;
        if (1..=7).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

/// demo/run.sh in its own process group on free ports, with output to a file; the group is
/// killed on drop whatever happened.
struct DemoRun {
    child: Child,
    output: std::path::PathBuf,
    port_base: u16,
}

impl DemoRun {
    /// `ignore_sigint`: started the way a background job of a script is, with SIGINT ignored
    /// (which the model servers and Envoy override, and the script cannot).
    fn start(out: &std::path::Path, measure_s: u32, ignore_sigint: bool) -> Self {
        use std::os::unix::process::CommandExt as _;
        let port_base = free_port_base();
        let output = out.with_extension("output");
        let script = repo_root().join("demo/run.sh");
        let ignore = if ignore_sigint { "trap '' INT; " } else { "" };
        let child = Command::new("bash")
            .arg("-c")
            .arg(format!("{ignore}exec \"$0\""))
            .arg(&script)
            .env("DEMO_OUT", out)
            .env("DEMO_PORT_BASE", port_base.to_string())
            .env("DEMO_WARMUP_S", "1")
            .env("DEMO_MEASURE_S", measure_s.to_string())
            .env("ENVOY_BIN", envoy_binary())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&output).unwrap())
            .stderr(std::fs::File::options().append(true).open(&output).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        Self {
            child,
            output,
            port_base,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    fn wait_for_output(&self, text: &str) {
        wait_until(
            std::time::Duration::from_secs(90),
            &format!("{text:?} from demo/run.sh"),
            || self.output().contains(text),
        );
    }

    /// `kill -SIGNAL` to the script alone, or to its whole process group as Ctrl-C does.
    fn signal(&self, signal: &str, whole_group: bool) -> bool {
        let target = if whole_group {
            format!("-- -{}", self.child.id())
        } else {
            self.child.id().to_string()
        };
        let status = Command::new("bash")
            .arg("-c")
            .arg(format!("kill -{signal} {target} 2>/dev/null"))
            .status()
            .unwrap();
        status.success()
    }

    /// Waits for the script to exit; returns its status code (None if killed by a signal).
    fn wait(&mut self, timeout_s: u64) -> Option<i32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "demo/run.sh did not exit within {timeout_s} s:\n{}",
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Nothing the script started is left: no process in its group, no port of the demo open.
    fn assert_everything_stopped(&self) {
        let alive = Command::new("bash")
            .arg("-c")
            .arg(format!("kill -0 -- -{} 2>/dev/null", self.child.id()))
            .status()
            .unwrap();
        assert!(
            !alive.success(),
            "processes of the demo are still running:\n{}",
            self.output()
        );
        for i in 1..=7 {
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", self.port_base + i)).is_err(),
                "port {} is still open",
                self.port_base + i
            );
        }
    }
}

impl Drop for DemoRun {
    fn drop(&mut self) {
        // Whatever the script left behind (nothing, if it works).
        let _ = self.signal("KILL", true);
        let _ = self.child.wait();
    }
}

const TABLE_LINE: &str = "requests ok / measured";

/// A previous run's results, which an incomplete run must leave exactly as they are.
fn previous_results(name: &str) -> std::path::PathBuf {
    let out = temp_dir(name).join("demo");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("compare.txt"), "previous results\n").unwrap();
    out
}

fn assert_previous_results_untouched(out: &std::path::Path) {
    let names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["compare.txt"]);
    assert_eq!(
        std::fs::read_to_string(out.join("compare.txt")).unwrap(),
        "previous results\n"
    );
    let parent: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "demo" && n != "demo.output")
        .collect();
    assert!(parent.is_empty(), "scratch left behind: {parent:?}");
}

/// The reported case: `make demo` as a background job of a script, where SIGINT is ignored, and
/// Ctrl-C. The servers and Envoy stop anyway; the load tool must not go on against dead ports,
/// and nothing may be printed or saved as a result.
#[test]
fn demo_interrupted_where_sigint_is_ignored_prints_and_saves_nothing() {
    let out = previous_results("demo-sigint");
    let mut demo = DemoRun::start(&out, 60, true);
    demo.wait_for_output("demo:   RANDOM ");
    assert!(demo.signal("INT", true));
    let code = demo.wait(20);
    let output = demo.output();
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}:\n{output}");
    assert!(!output.contains(TABLE_LINE), "printed a table:\n{output}");
    assert!(
        output.contains("stopped (exit status") && output.contains("no results"),
        "{output}"
    );
    demo.assert_everything_stopped();
    assert_previous_results_untouched(&out);
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

#[test]
fn demo_terminated_mid_run_stops_everything_and_saves_nothing() {
    let out = previous_results("demo-sigterm");
    let mut demo = DemoRun::start(&out, 60, false);
    demo.wait_for_output("demo:   RANDOM ");
    assert!(demo.signal("TERM", false));
    let code = demo.wait(20);
    let output = demo.output();
    assert_eq!(code, Some(143), "{output}");
    assert!(!output.contains(TABLE_LINE), "printed a table:\n{output}");
    assert!(output.contains("no results"), "{output}");
    demo.assert_everything_stopped();
    assert_previous_results_untouched(&out);
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

/// A complete (short) run prints the table and replaces the previous results.
#[test]
fn demo_complete_run_prints_the_table_and_replaces_the_results() {
    let out = previous_results("demo-complete");
    let mut demo = DemoRun::start(&out, 2, false);
    let code = demo.wait(120);
    let output = demo.output();
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains(TABLE_LINE), "{output}");
    assert!(
        output.contains("demo: LEAST_OUTSTANDING_REQUESTS "),
        "{output}"
    );
    demo.assert_everything_stopped();
    let compare = std::fs::read_to_string(out.join("compare.txt")).unwrap();
    assert!(compare.contains(TABLE_LINE), "{compare}");
    for file in ["random.json", "lor.json", "envoy.log"] {
        assert!(out.join(file).exists(), "{file} is missing");
    }
    let mut names: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["demo", "demo.output"], "scratch left behind");
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}
