//! End-to-end test equipment: a real Envoy started from the shipped `envoy/envoy.yaml` (ports,
//! paths and plugin configuration swapped in), small scriptable backends, and a plain HTTP/1.1
//! client. Everything binds 127.0.0.1 port 0, so tests can run in parallel without port races.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub const ROUTING_HEADER: &str = "x-gateway-destination-endpoint";
/// Shipped-config values the harness replaces; a mismatch means envoy.yaml drifted.
const SHIPPED_BACKENDS: [u16; 3] = [8001, 8002, 8003];
const SHIPPED_WASM: &str = "target/wasm32-wasip1/release/model_lb.wasm";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn envoy_binary() -> PathBuf {
    if let Ok(path) = std::env::var("ENVOY_BIN") {
        return PathBuf::from(path);
    }
    let local = repo_root().join(".venv/bin/envoy");
    assert!(
        local.exists(),
        "no Envoy at {} and ENVOY_BIN is unset: run `make test`, which installs it",
        local.display()
    );
    local
}

pub fn wasm_path() -> PathBuf {
    let path = repo_root().join(SHIPPED_WASM);
    assert!(
        path.exists(),
        "{} is missing: run `make build` (or `make test`) first",
        path.display()
    );
    path
}

/// The filter built with `--features test-vm-crash` (`make crash-wasm`): the header
/// `x-model-lb-test-crash` makes its VM trap right after routing.
pub fn crash_wasm_path() -> PathBuf {
    let path = repo_root().join("target/test-vm-crash/wasm32-wasip1/release/model_lb.wasm");
    assert!(
        path.exists(),
        "{} is missing: run `make crash-wasm` (or `make test`) first",
        path.display()
    );
    path
}

/// Polls `condition` until it holds or `timeout` passes; for state that only the system under
/// test can change (stats, backend counters), with no fixed sleeps.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn temp_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "model-lb-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port nobody listens on (bound, then released). Used for "connection refused" endpoints.
pub fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Envoy config

/// The shipped config with test ports, the built wasm and a given plugin configuration.
#[derive(Clone)]
pub struct EnvoyConfig {
    yaml: String,
}

impl EnvoyConfig {
    pub fn shipped() -> Self {
        let yaml = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml")).unwrap();
        // The admin port must be known up front: the model_lb_admin cluster points at it.
        let admin_port = closed_port();
        Self { yaml }
            .replace("port_value: 10000", "port_value: 0")
            .replace("port_value: 9901", &format!("port_value: {admin_port}"))
            .replace(SHIPPED_WASM, wasm_path().to_str().unwrap())
    }

    /// Points the three shipped endpoints (cluster and plugin config) at `ports`.
    pub fn backends(mut self, ports: [u16; 3]) -> Self {
        for (shipped, port) in SHIPPED_BACKENDS.iter().zip(ports) {
            self = self
                .replace(
                    &format!("port_value: {shipped} "),
                    &format!("port_value: {port} "),
                )
                .replace(
                    &format!("127.0.0.1:{shipped}"),
                    &format!("127.0.0.1:{port}"),
                );
        }
        self
    }

    /// Replaces the plugin's JSON configuration with `json` (one line).
    pub fn plugin_config(mut self, json: &str) -> Self {
        let start = self
            .yaml
            .find("value: |")
            .expect("plugin configuration block")
            + "value: |".len();
        let indent = "                    ";
        let end = self.yaml[start..]
            .find("\n          - name: envoy.filters.http.router")
            .expect("router filter after the plugin")
            + start;
        self.yaml
            .replace_range(start..end, &format!("\n{indent}{json}"));
        self
    }

    pub fn replace(mut self, from: &str, to: &str) -> Self {
        assert!(
            self.yaml.contains(from),
            "envoy.yaml no longer contains {from:?}"
        );
        self.yaml = self.yaml.replace(from, to);
        self
    }

    /// Adds a copy of the `models` listener named `name` whose filter runs `wasm` instead: a
    /// second VM (other code) in the same `vm_id`, so it shares the routing table.
    pub fn with_listener_running(mut self, name: &str, wasm: &Path) -> Self {
        let start = self
            .yaml
            .find("  - name: models\n")
            .expect("models listener");
        let end = self.yaml.find("  clusters:\n").expect("static clusters");
        let copy = self.yaml[start..end]
            .replacen("  - name: models\n", &format!("  - name: {name}\n"), 1)
            .replace(wasm_path().to_str().unwrap(), wasm.to_str().unwrap());
        self.yaml.insert_str(end, &copy);
        self
    }

    /// Adds the hold filter (`{"role": "hold"}`) right after the plugin, as PREFIX_AWARE needs.
    pub fn with_hold_filter(self) -> Self {
        self.with_hold_filter_in_vm("model_lb")
    }

    /// The hold filter in VM `vm_id` (anything but the plugin's `model_lb` is a misconfiguration).
    pub fn with_hold_filter_in_vm(mut self, vm_id: &str) -> Self {
        let router = "          - name: envoy.filters.http.router";
        let wasm = wasm_path();
        let hold = format!(
            r#"          - name: model_lb_hold
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: model_lb_hold
                root_id: model_lb_hold
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: {vm_id}
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local: {{ filename: {} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{{"role": "hold"}}'
"#,
            wasm.display()
        );
        let at = self.yaml.find(router).expect("router filter");
        self.yaml.insert_str(at, &hold);
        self
    }

    pub fn yaml(&self) -> &str {
        &self.yaml
    }

    pub fn from_yaml(yaml: String) -> Self {
        Self { yaml }
    }

    /// Splits the config into a bootstrap that loads its listeners from `lds_path` (watched by
    /// Envoy, so rewriting it is a live listener update) and that file's contents.
    pub fn with_file_lds(&self, lds_path: &Path) -> (EnvoyConfig, String) {
        let start = self.yaml.find("  listeners:\n").expect("static listeners");
        let end = self.yaml.find("  clusters:\n").expect("static clusters");
        let listeners: String = self.yaml[start + "  listeners:\n".len()..end]
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
            .collect();
        let resources = listeners.replacen(
            "- name: ",
            "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: ",
            1,
        );
        let bootstrap = format!(
            "{}{}node: {{ id: model-lb-test, cluster: model-lb-test }}\ndynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    path_config_source: {{ path: {} }}\n",
            &self.yaml[..start],
            &self.yaml[end..],
            lds_path.display()
        );
        (
            EnvoyConfig { yaml: bootstrap },
            format!("resources:\n{resources}"),
        )
    }
}

pub fn plugin_json(strategy: &str, ports: [u16; 3]) -> String {
    plugin_json_with(strategy, ports, "")
}

/// The plugin configuration for three loopback endpoints; `extra` adds fields (`"a": 1, ...`).
pub fn plugin_json_with(strategy: &str, ports: [u16; 3], extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        r#"{{"routing_strategy": "{strategy}", "pool": "model_servers", "endpoints": ["127.0.0.1:{}", "127.0.0.1:{}", "127.0.0.1:{}"], "housekeeping_interval_ms": 200{extra}}}"#,
        ports[0], ports[1], ports[2]
    )
}

// ---------------------------------------------------------------------------------------------
// Envoy process

pub struct Envoy {
    child: Child,
    pub dir: PathBuf,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
}

impl Envoy {
    pub fn start(config: &EnvoyConfig) -> Self {
        Self::try_start(config).unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"))
    }

    /// Starts Envoy with `--concurrency 2` and waits until it is ready; `Err(log)` if it exits.
    pub fn try_start(config: &EnvoyConfig) -> Result<Self, String> {
        let dir = temp_dir("envoy");
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config.yaml()).unwrap();
        let admin_path = dir.join("admin-address");
        let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "2", "--disable-hot-restart", "-l", "info"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Envoy {
            child,
            dir,
            admin: "127.0.0.1:1".parse().unwrap(),
            listener: "127.0.0.1:1".parse().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(_status) = envoy.child.try_wait().unwrap() {
                return Err(envoy.log());
            }
            if let Ok(text) = std::fs::read_to_string(&admin_path) {
                if let Ok(addr) = text.trim().parse() {
                    envoy.admin = addr;
                    if let Ok(r) = get(addr, "/ready") {
                        if r.status == 200 {
                            break;
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 60 s\n{}", envoy.log()));
            }
            thread::sleep(Duration::from_millis(25));
        }
        envoy.listener = envoy.listener_address("models");
        Ok(envoy)
    }

    pub fn listener_address(&self, name: &str) -> SocketAddr {
        let body = get(self.admin, "/listeners?format=json").unwrap().text();
        let listeners: serde_json::Value = serde_json::from_str(&body).unwrap();
        for l in listeners["listener_statuses"].as_array().unwrap() {
            if l["name"] == name {
                let a = &l["local_address"]["socket_address"];
                return format!("{}:{}", a["address"].as_str().unwrap(), a["port_value"])
                    .parse()
                    .unwrap();
            }
        }
        panic!("listener {name} not found in {body}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// All stats whose name contains `filter`, as name → value (counters and gauges).
    pub fn stats(&self, filter: &str) -> HashMap<String, u64> {
        let body = get(self.admin, &format!("/stats?filter={filter}"))
            .unwrap()
            .text();
        body.lines()
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(": ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    pub fn stat(&self, name: &str) -> u64 {
        let full = format!("wasmcustom.{name}");
        *self
            .stats(&regex_escape(&full))
            .get(&full)
            .unwrap_or_else(|| panic!("no stat {full}"))
    }

    /// The filter's in-flight gauges: per endpoint and total.
    pub fn in_flight(&self, cluster: &str) -> (HashMap<String, u64>, u64) {
        let prefix = format!("wasmcustom.model_lb.{cluster}.endpoint.");
        let per_endpoint = self
            .stats("in_flight")
            .into_iter()
            .filter_map(|(name, value)| {
                let address = name.strip_prefix(&prefix)?.strip_suffix(".in_flight")?;
                Some((address.to_owned(), value))
            })
            .collect();
        (
            per_endpoint,
            self.stat(&format!("model_lb.{cluster}.in_flight")),
        )
    }

    /// Waits until every in-flight gauge of `cluster` reads exactly zero.
    pub fn wait_for_zero_in_flight(&self, cluster: &str) {
        wait_until(
            Duration::from_secs(15),
            "in-flight gauges to return to 0",
            || {
                let (per_endpoint, total) = self.in_flight(cluster);
                total == 0 && !per_endpoint.is_empty() && per_endpoint.values().all(|&v| v == 0)
            },
        );
    }

    pub fn stop(mut self) -> ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("Envoy log kept in {}", self.dir.display());
        }
    }
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if ".+*?()[]{}|^$\\".contains(c) {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Runs `envoy --mode validate` on a config; returns (success, output).
pub fn validate(yaml: &str) -> (bool, String) {
    let dir = temp_dir("validate");
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, yaml).unwrap();
    let output = Command::new(envoy_binary())
        .args(["--mode", "validate", "-l", "info", "-c"])
        .arg(&path)
        .current_dir(repo_root())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

pub fn validate_file(path: &Path) -> (bool, String) {
    let yaml = std::fs::read_to_string(path).unwrap();
    validate(&yaml)
}

pub const HOLD: (&str, &str) = ("x-test-hold", "1");

/// Request headers that make the i-th of a mixed batch end three ways in turn: an upstream
/// reset, a request held until the route times out or the test releases it, a short success.
pub fn reset_hold_or_short(i: usize) -> &'static [(&'static str, &'static str)] {
    match i % 3 {
        0 => &[("x-test-reset", "1")],
        1 => &[HOLD],
        _ => &[("x-test-delay-ms", "50")],
    }
}

// ---------------------------------------------------------------------------------------------
// Pool

/// Three scriptable backends behind a real Envoy running the shipped config.
pub struct Pool {
    pub backends: Vec<Backend>,
    pub envoy: Envoy,
}

impl Pool {
    pub fn start(strategy: &str) -> Self {
        Self::start_with(strategy, |config| config)
    }

    pub fn start_with(strategy: &str, adjust: impl FnOnce(EnvoyConfig) -> EnvoyConfig) -> Self {
        Self::start_configured(strategy, "", adjust)
    }

    pub fn start_configured(
        strategy: &str,
        extra_plugin_fields: &str,
        adjust: impl FnOnce(EnvoyConfig) -> EnvoyConfig,
    ) -> Self {
        let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
        let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
        let config = EnvoyConfig::shipped()
            .backends(ports)
            .plugin_config(&plugin_json_with(strategy, ports, extra_plugin_fields));
        let envoy = Envoy::start(&adjust(config));
        Self { backends, envoy }
    }

    pub fn request(&self, headers: &[(&str, &str)]) -> Response {
        request(self.envoy.listener, "/v1/completions", headers).unwrap()
    }

    pub fn total_active(&self) -> usize {
        self.backends.iter().map(Backend::active).sum()
    }

    /// Starts `n` held requests from their own threads and waits until the backends hold them.
    pub fn hold(&self, n: usize) -> Vec<thread::JoinHandle<Response>> {
        let before = self.total_active();
        let handles = (0..n)
            .map(|_| {
                let listener = self.envoy.listener;
                thread::spawn(move || request(listener, "/v1/completions", &[HOLD]).unwrap())
            })
            .collect();
        wait_until(
            Duration::from_secs(10),
            "backends to hold the requests",
            || self.total_active() == before + n,
        );
        handles
    }

    pub fn release(&self, held: Vec<thread::JoinHandle<Response>>) {
        for b in &self.backends {
            b.release_held();
        }
        for h in held {
            assert_eq!(h.join().unwrap().status, 200);
        }
    }

    pub fn active_per_backend(&self) -> Vec<usize> {
        self.backends.iter().map(Backend::active).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Backends

/// A scriptable HTTP/1.1 backend. Requests steer it with headers the client sends through Envoy:
/// `x-test-hold: 1` (answer only when [`Backend::release_held`] is called or the client goes
/// away), `x-test-delay-ms: N`, `x-test-reset: 1` (close the socket without answering),
/// `x-test-status: N`, `x-test-stream-chunks: N` (chunked reply, one chunk per 20 ms).
/// Every response carries `x-served-by` and echoes the routing header as `x-seen-routing`.
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<BackendState>,
}

#[derive(Default)]
struct BackendState {
    active: AtomicUsize,
    served: AtomicUsize,
    held_generation: AtomicU64,
    stopped: AtomicBool,
    /// Open connections plus the accept loop, so a stop can wait until the port is dead.
    alive: AtomicUsize,
    /// Answer all traffic (not health checks) with an instant 503.
    failing: AtomicBool,
    /// How `/metrics` answers (see [`MetricsMode`]).
    metrics_mode: AtomicUsize,
    metrics_polls: AtomicUsize,
    /// Batch slots `/metrics` reports (0: unlimited): requests beyond it show as waiting.
    batch_slots: AtomicUsize,
}

/// How a backend answers `GET /metrics`, vLLM-style, for the server-load poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsMode {
    /// `vllm:num_requests_running` = requests inside the backend, `vllm:num_requests_waiting` 0.
    Normal = 0,
    Status500 = 1,
    Garbage = 2,
    /// Never answers (until the poller gives up or the backend stops).
    Hang = 3,
    /// A 100 MB body.
    Huge = 4,
}

impl Backend {
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// A backend on a given port, e.g. to bring a "killed" backend back.
    pub fn start_on(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState::default());
        let accept_state = Arc::clone(&state);
        state.alive.fetch_add(1, Ordering::SeqCst);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_state.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let state = Arc::clone(&accept_state);
                state.alive.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    serve_connection(stream, addr, &state);
                    state.alive.fetch_sub(1, Ordering::SeqCst);
                });
            }
            drop(listener);
            accept_state.alive.fetch_sub(1, Ordering::SeqCst);
        });
        Self { addr, state }
    }

    pub fn set_metrics(&self, mode: MetricsMode) {
        self.state
            .metrics_mode
            .store(mode as usize, Ordering::SeqCst);
    }

    /// Makes `/metrics` report a server with `slots` batch slots: the requests beyond them as
    /// waiting, as vLLM does when its batch is full.
    pub fn set_batch_slots(&self, slots: usize) {
        self.state.batch_slots.store(slots, Ordering::SeqCst);
    }

    /// `/metrics` requests received so far.
    pub fn metrics_polls(&self) -> usize {
        self.state.metrics_polls.load(Ordering::SeqCst)
    }

    /// From now on, answer every request at once with 503 (health checks still pass).
    pub fn fail_fast(&self) {
        self.state.failing.store(true, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn id(&self) -> String {
        self.addr.to_string()
    }

    /// Requests currently inside this backend (received, not yet answered).
    pub fn active(&self) -> usize {
        self.state.active.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }

    /// Lets every currently held request answer.
    pub fn release_held(&self) {
        self.state.held_generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        // Like a killed process: once dropped, nothing on this port answers any more.
        wait_until(
            Duration::from_secs(5),
            "backend connections to close",
            || self.state.alive.load(Ordering::SeqCst) == 0,
        );
    }
}

fn serve_connection(stream: TcpStream, me: SocketAddr, state: &BackendState) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        // Idle keep-alive connections must notice a stopped backend, or Envoy would keep using
        // its pooled connections to a backend the test "killed".
        if !wait_readable(&writer, state) {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        let _ = writer.set_read_timeout(Some(Duration::from_secs(10)));
        let Some(request) = read_request(&mut reader) else {
            return;
        };
        // Envoy's health checks are not traffic: they do not show in `active` or `served`.
        let outcome = if request.path == "/health" {
            health_answer(&mut writer)
        } else if request.path == "/metrics" {
            state.metrics_polls.fetch_add(1, Ordering::SeqCst);
            metrics_answer(&mut writer, state)
        } else {
            state.active.fetch_add(1, Ordering::SeqCst);
            let outcome = answer(&request, &mut writer, me, state);
            state.active.fetch_sub(1, Ordering::SeqCst);
            outcome
        };
        if outcome.is_err() {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn wait_readable(stream: &TcpStream, state: &BackendState) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut byte = [0u8; 1];
    loop {
        if state.stopped.load(Ordering::SeqCst) {
            return false;
        }
        match stream.peek(&mut byte) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return false,
        }
    }
}

struct Request {
    path: String,
    headers: HashMap<String, String>,
    /// The declared body was over [`BACKEND_MAX_BODY`] and was left unread.
    too_large: bool,
}

/// Backends refuse larger bodies the way real HTTP servers do: answer 413 and close without
/// reading the rest, which turns into a connection reset on Envoy's side.
pub const BACKEND_MAX_BODY: usize = 1 << 20;

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers
                .entry(k.trim().to_ascii_lowercase())
                .and_modify(|old: &mut String| {
                    old.push(',');
                    old.push_str(v.trim());
                })
                .or_insert_with(|| v.trim().to_owned());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if length > BACKEND_MAX_BODY {
        return Some(Request {
            path,
            headers,
            too_large: true,
        });
    }
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        // Read (and drop) the chunks, so the connection stays usable for the next request.
        let mut total = 0usize;
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            total += size;
            if size == 0 {
                break;
            }
            if total > BACKEND_MAX_BODY {
                return Some(Request {
                    path,
                    headers,
                    too_large: true,
                });
            }
        }
    } else {
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
    }
    Some(Request {
        path,
        headers,
        too_large: false,
    })
}

/// Health checks pass whatever the traffic gets: an overloaded model server that sheds
/// requests with 503 typically still answers its health endpoint.
fn health_answer(out: &mut TcpStream) -> std::io::Result<()> {
    write!(out, "HTTP/1.1 200 X\r\ncontent-length: 0\r\n\r\n")?;
    out.flush()
}

fn metrics_answer(out: &mut TcpStream, state: &BackendState) -> std::io::Result<()> {
    let mode = state.metrics_mode.load(Ordering::SeqCst);
    let body = match mode {
        1 => return write!(out, "HTTP/1.1 500 X\r\ncontent-length: 0\r\n\r\n"),
        2 => "<html>definitely not prometheus</html>\n".to_owned(),
        3 => {
            let _ = hold(out, state);
            return Err(std::io::Error::other("hung /metrics given up"));
        }
        4 => {
            let size = 100 << 20;
            write!(out, "HTTP/1.1 200 X\r\ncontent-length: {size}\r\n\r\n")?;
            let chunk = vec![b'#'; 1 << 20];
            for _ in 0..100 {
                out.write_all(&chunk)?;
            }
            return out.flush();
        }
        _ => {
            let active = state.active.load(Ordering::SeqCst);
            let slots = match state.batch_slots.load(Ordering::SeqCst) {
                0 => usize::MAX,
                n => n,
            };
            format!(
                "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"m\"}} {}\nvllm:num_requests_waiting{{model_name=\"m\"}} {}\n",
                active.min(slots),
                active.saturating_sub(slots)
            )
        }
    };
    write!(
        out,
        "HTTP/1.1 200 X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn answer(
    request: &Request,
    out: &mut TcpStream,
    me: SocketAddr,
    state: &BackendState,
) -> std::io::Result<()> {
    let header = |name: &str| request.headers.get(name).map(String::as_str);
    if request.too_large {
        write!(
            out,
            "HTTP/1.1 413 X\r\nx-served-by: {me}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        )?;
        out.flush()?;
        return Err(std::io::Error::other("body too large; closing"));
    }
    if state.failing.load(Ordering::SeqCst) {
        write!(
            out,
            "HTTP/1.1 503 X\r\nx-served-by: {me}\r\ncontent-length: 0\r\n\r\n"
        )?;
        out.flush()?;
        state.served.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    if header("x-test-hold").is_some() {
        match hold(out, state) {
            HoldEnd::Released => {}
            HoldEnd::PeerGone => return Err(std::io::Error::other("peer gave up")),
            // A dead process answers nothing: the connection just closes.
            HoldEnd::Stopped => return Err(std::io::Error::other("backend stopped")),
        }
    }
    if let Some(ms) = header("x-test-delay-ms").and_then(|v| v.parse().ok()) {
        thread::sleep(Duration::from_millis(ms));
    }
    if header("x-test-reset").is_some() {
        return Err(std::io::Error::other("reset requested"));
    }
    let status: u16 = header("x-test-status")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seen = header(ROUTING_HEADER).unwrap_or("");
    let common = format!("x-served-by: {me}\r\nx-seen-routing: {seen}\r\n");
    if let Some(chunks) = header("x-test-stream-chunks").and_then(|v| v.parse::<u32>().ok()) {
        write!(
            out,
            "HTTP/1.1 {status} X\r\n{common}content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )?;
        for i in 0..chunks {
            let data = format!("data: {i}\n\n");
            write!(out, "{:x}\r\n{data}\r\n", data.len())?;
            out.flush()?;
            thread::sleep(Duration::from_millis(20));
        }
        write!(out, "0\r\n\r\n")?;
    } else {
        let body = format!("served by {me}\n");
        write!(
            out,
            "HTTP/1.1 {status} X\r\n{common}content-length: {}\r\n\r\n{body}",
            body.len()
        )?;
    }
    out.flush()?;
    state.served.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

enum HoldEnd {
    Released,
    /// Envoy gave up on the request (client abort, timeout): nobody to answer.
    PeerGone,
    /// The backend was stopped, as if its process died.
    Stopped,
}

/// Blocks until the test releases held requests, the peer (Envoy) closes the connection, or the
/// backend stops.
fn hold(out: &TcpStream, state: &BackendState) -> HoldEnd {
    let generation = state.held_generation.load(Ordering::SeqCst);
    let _ = out.set_read_timeout(Some(Duration::from_millis(20)));
    let mut byte = [0u8; 1];
    loop {
        if state.stopped.load(Ordering::SeqCst) {
            return HoldEnd::Stopped;
        }
        if state.held_generation.load(Ordering::SeqCst) != generation {
            return HoldEnd::Released;
        }
        // A zero-byte peek means Envoy gave up on this request.
        if let Ok(0) = out.peek(&mut byte) {
            return HoldEnd::PeerGone;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn served_by(&self) -> Option<&str> {
        self.header("x-served-by")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    request(addr, path, &[])
}

/// One request on a fresh connection (`connection: close`), fully read.
pub fn request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let stream = send(addr, path, headers)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    read_response(&mut BufReader::new(stream))
}

/// Sends a request and returns the open connection without reading the answer; dropping it is
/// a client abort.
pub fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: models\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    Ok(stream)
}

/// Writes `bytes` as they are (any request, well-formed or not) and reads whatever answer comes;
/// a write the peer cut short is not an error, since refusing a request early is what is tested.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = stream.write_all(bytes);
    read_response(&mut BufReader::new(stream))
}

/// A POST with a body (`content-length`), on a fresh connection, fully read.
pub fn post(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: models\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw_exchange(addr, &bytes)
}

/// Declares a `declared`-byte body, sends `sent` bytes of it, then hangs up: an upload the
/// client abandons.
pub fn abandoned_upload(addr: SocketAddr, declared: usize, sent: usize) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: models\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    );
    stream.write_all(head.as_bytes())?;
    let _ = stream.write_all(&vec![b'a'; sent]);
    Ok(())
}

pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<Response> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = headers.get("content-length").and_then(|v| v.parse().ok()) {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// EDS

/// The shipped config with `model_servers` as an EDS cluster read from `eds_path` (rewrite it
/// with [`write_eds`] for a live membership change) and the filter following it.
pub fn eds_config(eds_path: &std::path::Path) -> EnvoyConfig {
    let shipped = EnvoyConfig::shipped().plugin_config(
        r#"{"pool": "model_servers", "follow_membership": true, "admin_cluster": "model_lb_admin", "admin_poll_interval_ms": 200, "housekeeping_interval_ms": 200}"#,
    );
    let yaml = shipped.yaml();
    let start = yaml.find("  - name: model_servers\n").unwrap();
    let end = yaml[start..].find("    # The override_host").unwrap() + start;
    let eds = format!(
        "  - name: model_servers\n    type: EDS\n    connect_timeout: 1s\n    eds_cluster_config:\n      eds_config:\n        resource_api_version: V3\n        path_config_source: {{ path: {} }}\n",
        eds_path.display()
    );
    let yaml = format!(
        "node: {{ id: model-lb-test, cluster: model-lb-test }}\n{}{eds}{}",
        &yaml[..start],
        &yaml[end..]
    );
    EnvoyConfig::from_yaml(yaml)
}

/// Writes the EDS file atomically (Envoy watches it by rename).
pub fn write_eds(path: &std::path::Path, ports: &[u16]) {
    let endpoints: String = ports
        .iter()
        .map(|p| format!("    - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}\n"))
        .collect();
    let body = format!(
        "resources:\n- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: model_servers\n  endpoints:\n  - lb_endpoints:\n{endpoints}"
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
