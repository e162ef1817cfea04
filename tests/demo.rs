//! The demo's pieces: the simulated model servers and the load tool through Envoy and the filter,
//! and the docker compose file, which must describe the same set-up as the local demo.
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

fn docker_compose(args: &[&str]) -> (bool, String) {
    let output = Command::new("docker-compose")
        .arg("-f")
        .arg(repo_root().join("demo/docker-compose.yaml"))
        .args(args)
        .output()
        .expect("docker-compose (Debian package) is missing: run `make test`, which installs it");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn compose_file_is_valid() {
    let (ok, output) = docker_compose(&["config", "-q"]);
    assert!(
        ok,
        "docker-compose rejects demo/docker-compose.yaml:\n{output}"
    );
}

#[test]
fn compose_demo_uses_the_local_demos_config_wasm_and_ports() {
    let env = workload_env();
    let (ok, resolved) = docker_compose(&["config"]);
    assert!(ok, "{resolved}");
    let envoy_config = &env["DEMO_ENVOY_CONFIG"];
    assert_eq!(envoy_config, "envoy/demo.yaml");

    // Envoy in compose runs the very file the local demo runs, from the same relative path.
    let mount = format!(
        "{}:/work/{envoy_config}:ro",
        repo_root().join(envoy_config).display()
    );
    assert!(
        resolved.contains(&mount),
        "compose does not mount {envoy_config}:\n{resolved}"
    );
    assert!(
        resolved.contains(&format!("- {envoy_config}\n")),
        "envoy is not started with {envoy_config}"
    );
    assert!(resolved.contains("working_dir: /work"));

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
    for port in env["DEMO_SERVER_PORTS"].split_whitespace() {
        assert!(
            resolved.contains(&format!("--listen 127.0.0.1:{port} ")),
            "no server on {port}"
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
    // Every service shares Envoy's network namespace, which is what makes 127.0.0.1 work.
    let services = resolved.matches("network_mode: service:envoy").count();
    assert_eq!(
        services,
        env["DEMO_SERVER_PORTS"].split_whitespace().count() + 1
    );
    assert!(resolved.contains("demo/compose-load.sh"));
}
