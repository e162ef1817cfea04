//! What `deploy/` ships, checked without a Kubernetes cluster:
//! - every manifest passes its kind's upstream schema (`deploy/schemas/check.mjs`: the vendored
//!   Envoy Gateway, Gateway API and Istio CRD schemas, strict about unknown fields), and broken
//!   ones are rejected;
//! - the Envoy configuration each set of manifests implies (`deploy/equivalent-envoy/*.yaml`) agrees
//!   with the manifests field by field, starts in a real Envoy with the built filter, and routes
//!   requests through it (also the PREFIX_AWARE variants with their hold filter);
//! - every metric the Grafana dashboard queries is one the filter emits in `/stats/prometheus`;
//! - `make dist`'s artifacts agree with each other, and the filter reports the version it was
//!   built as.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const POOL: &str = "vllm";

// ---------------------------------------------------------------------------------------------
// The manifest checker

/// Runs `deploy/schemas/check.mjs` with `args`; returns (success, stdout, stderr).
fn check_mjs(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let root = repo_root();
    assert!(
        root.join("target/k8s-schemas/node_modules/yaml").exists(),
        "target/k8s-schemas is missing: run `make test` (or `make k8s-schema-tool`)"
    );
    let mut child = Command::new("node")
        .arg(root.join("deploy/schemas/check.mjs"))
        .args(args)
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (`make k8s-schema-tool` installs it)");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "check.mjs itself failed:\n{stderr}"
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

/// Every Kubernetes manifest under deploy/ (the Envoy configs beside them are not manifests).
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("schemas") && !path.ends_with("equivalent-envoy") {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_root().join("deploy"), &mut files);
    files.sort();
    files
}

/// The documents of a manifest file, validated, as JSON.
fn manifests(relative: &str) -> Vec<Value> {
    let (ok, json, errors) = check_mjs(&["--json", relative], None);
    assert!(ok, "{relative} does not pass its schema:\n{errors}");
    serde_json::from_str(&json).unwrap()
}

/// Any YAML file's documents as JSON, unchecked (for the Envoy configs).
fn yaml_as_json(relative: &str) -> Value {
    let (ok, json, errors) = check_mjs(&["--dump", relative], None);
    assert!(ok, "{relative} is not YAML:\n{errors}");
    let mut docs: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(docs.len(), 1, "{relative}: one document expected");
    docs.remove(0)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} among {docs:?}"))
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("nothing named {name} in {list}"))
}

#[test]
fn every_manifest_passes_its_crd_schema() {
    let files = manifest_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(repo_root())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for expected in [
        "deploy/envoy-gateway/envoyextensionpolicy.yaml",
        "deploy/envoy-gateway/backendtrafficpolicy.yaml",
        "deploy/envoy-gateway/httproute.yaml",
        "deploy/envoy-gateway/gateway.yaml",
        "deploy/envoy-gateway/prefix-aware/envoypatchpolicy.yaml",
        "deploy/istio/wasmplugin.yaml",
        "deploy/istio/envoyfilter.yaml",
        "deploy/istio/prefix-aware/envoyfilter-wasm.yaml",
        "deploy/vllm/vllm.yaml",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} is gone");
    }
    let args: Vec<&str> = names.iter().map(String::as_str).collect();
    let (ok, summary, errors) = check_mjs(&args, None);
    assert!(ok, "manifests that break their schema:\n{errors}");
    assert_eq!(
        summary.lines().count(),
        files.len(),
        "every file is reported:\n{summary}"
    );
}

#[test]
fn the_schema_check_rejects_broken_manifests() {
    // (file, text replaced, replacement, what the complaint must say)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "deploy/envoy-gateway/backendtrafficpolicy.yaml",
            "endpointOverride:",
            "endpointOveride:",
            "unknown field \"endpointOveride\"",
        ),
        (
            "deploy/envoy-gateway/backendtrafficpolicy.yaml",
            "- header: x-gateway-destination-endpoint",
            "- headr: x-gateway-destination-endpoint",
            "unknown field \"headr\"",
        ),
        (
            "deploy/envoy-gateway/backendtrafficpolicy.yaml",
            "type: LeastRequest",
            "type: LeastRequests",
            "/spec/loadBalancer/type: enum",
        ),
        (
            "deploy/envoy-gateway/backendtrafficpolicy.yaml",
            "numRetries: 2",
            "numRetries: two",
            "/spec/retry/numRetries: type",
        ),
        (
            "deploy/envoy-gateway/envoyextensionpolicy.yaml",
            "rootID: model_lb",
            "rootId: model_lb",
            "unknown field \"rootId\"",
        ),
        (
            "deploy/envoy-gateway/envoyextensionpolicy.yaml",
            "type: HTTP",
            "type: Http",
            "/spec/wasm/0/code/type: enum",
        ),
        (
            // An unquoted digest of digits is a number in YAML.
            "deploy/envoy-gateway/envoyextensionpolicy.yaml",
            "\"0000000000000000000000000000000000000000000000000000000000000000\"",
            "0000000000000000000000000000000000000000000000000000000000000000",
            "/spec/wasm/0/code/http/sha256: type",
        ),
        (
            "deploy/envoy-gateway/envoyextensionpolicy.yaml",
            "    kind: HTTPRoute\n",
            "",
            "missingProperty\":\"kind\"",
        ),
        (
            "deploy/envoy-gateway/gateway.yaml",
            "type: JSONPatch",
            "type: JSONPatches",
            "/spec/bootstrap/type: enum",
        ),
        (
            "deploy/envoy-gateway/httproute.yaml",
            "port: 8000",
            "port: http",
            "/spec/rules/0/backendRefs/0/port: type",
        ),
        (
            "deploy/envoy-gateway/prefix-aware/envoypatchpolicy.yaml",
            "op: replace",
            "op: swap",
            "/operation/op: enum",
        ),
        (
            "deploy/istio/envoyfilter.yaml",
            "operation: MERGE",
            "operation: MERGED",
            "/spec/configPatches/0/patch/operation: enum",
        ),
        (
            "deploy/istio/envoyfilter.yaml",
            "workloadSelector:",
            "workloadSelectors:",
            "unknown field \"workloadSelectors\"",
        ),
        (
            "deploy/istio/wasmplugin.yaml",
            "failStrategy: FAIL_CLOSE",
            "failStrategy: FAIL_CLOSED",
            "/spec/failStrategy: enum",
        ),
        (
            "deploy/istio/wasmplugin.yaml",
            "pluginName: model_lb",
            "pluginNme: model_lb",
            "unknown field \"pluginNme\"",
        ),
        (
            "deploy/vllm/vllm.yaml",
            "replicas: 3",
            "replicas: three",
            "/spec/replicas: type",
        ),
        (
            "deploy/istio/wasmplugin.yaml",
            "extensions.istio.io/v1alpha1",
            "extensions.istio.io/v1",
            "no schema for apiVersion extensions.istio.io/v1 kind WasmPlugin",
        ),
        (
            "deploy/istio/wasmplugin.yaml",
            "  name: model-lb\n",
            "  name: model-lb\n  name: model-lb-2\n",
            "YAML:",
        ),
        (
            "deploy/istio/wasmplugin.yaml",
            "  name: model-lb\n",
            "",
            "/metadata/name: required",
        ),
    ];
    for (file, from, to, complaint) in cases {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        assert!(text.contains(from), "{file} no longer contains {from:?}");
        let broken = text.replacen(from, to, 1);
        let (ok, _, errors) = check_mjs(&["-"], Some(&broken));
        assert!(!ok, "{file} with {from:?} -> {to:?} was accepted");
        assert!(
            errors.contains(complaint),
            "{file} with {from:?} -> {to:?}: expected {complaint:?} in:\n{errors}"
        );
    }
}

#[test]
fn vendored_schemas_are_unchanged_and_listed() {
    let crds = repo_root().join("deploy/schemas/crds");
    let status = Command::new("sha256sum")
        .args(["--quiet", "-c", "SHA256SUMS"])
        .current_dir(&crds)
        .status()
        .unwrap();
    assert!(status.success(), "a vendored schema file was changed");
    let listed = std::fs::read_to_string(crds.join("SHA256SUMS"))
        .unwrap()
        .lines()
        .count();
    let output = Command::new("find")
        .args([".", "-name", "*.js"])
        .current_dir(&crds)
        .output()
        .unwrap();
    let files = String::from_utf8_lossy(&output.stdout).lines().count();
    assert_eq!(listed, files, "SHA256SUMS does not list every schema file");
}

// ---------------------------------------------------------------------------------------------
// Starting an equivalent config

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// Serves one file over HTTP/1.1 at any path, as Envoy Gateway's controller serves wasm modules.
struct FileServer {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
}

impl FileServer {
    fn start(path: &Path) -> Self {
        let body = std::fs::read(path).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&served);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/wasm\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self { addr, served }
    }
}

struct Running {
    envoy: Envoy,
    backends: Vec<Backend>,
    _wasm_server: Option<FileServer>,
}

/// Starts `deploy/equivalent-envoy/<dir>.yaml` on test ports with the built filter; `adjust`
/// may change the YAML first (PREFIX_AWARE variants).
fn start_equivalent(dir: &str, adjust: impl FnOnce(String) -> String) -> Running {
    let mut yaml =
        std::fs::read_to_string(repo_root().join(format!("deploy/equivalent-envoy/{dir}.yaml")))
            .unwrap();
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let admin = closed_port();
    let mut replace = |from: &str, to: &str| {
        assert!(
            yaml.contains(from),
            "deploy/equivalent-envoy/{dir}.yaml lacks {from:?}"
        );
        yaml = yaml.replace(from, to);
    };
    for (shipped, backend) in [8001, 8002, 8003].iter().zip(&backends) {
        replace(
            &format!("port_value: {shipped} "),
            &format!("port_value: {} ", backend.port()),
        );
    }
    let mut wasm_server = None;
    match dir {
        "envoy-gateway" => {
            replace("port_value: 19000 ", &format!("port_value: {admin} "));
            replace("port_value: 10080 ", "port_value: 0 ");
            // The test harness finds the listener by the name `models`.
            replace("- name: models/models/http\n", "- name: models\n");
            let server = FileServer::start(&wasm_path());
            replace("127.0.0.1:18002", &server.addr.to_string());
            replace(
                "port_value: 18002 ",
                &format!("port_value: {} ", server.addr.port()),
            );
            replace("SHA256_OF_MODEL_LB_WASM", &sha256_of(&wasm_path()));
            wasm_server = Some(server);
        }
        "istio" => {
            replace("port_value: 15000 ", &format!("port_value: {admin} "));
            replace("port_value: 8080 ", "port_value: 0 ");
            replace("- name: 0.0.0.0_80\n", "- name: models\n");
            replace(
                "target/wasm32-wasip1/release/model_lb.wasm",
                wasm_path().to_str().unwrap(),
            );
        }
        _ => unreachable!(),
    }
    let envoy = Envoy::start(&EnvoyConfig::from_yaml(adjust(yaml)));
    if let Some(server) = &wasm_server {
        assert!(
            server.served.load(Ordering::SeqCst) >= 1,
            "Envoy never fetched the module"
        );
    }
    // The pool follows the cluster (follow_membership): wait for the first admin poll.
    wait_until(
        Duration::from_secs(20),
        "the pool to follow the cluster",
        || {
            envoy
                .stats(&format!("model_lb\\.{POOL}\\.endpoints$"))
                .get(&format!("wasmcustom.model_lb.{POOL}.endpoints"))
                == Some(&3)
        },
    );
    Running {
        envoy,
        backends,
        _wasm_server: wasm_server,
    }
}

/// Three held requests land one on each backend (least outstanding requests, counted by the
/// filter across workers), plain ones carry the filter's routing header to a backend, and every
/// decision was honoured by the cluster's override_host policy.
fn routes_through_the_filter(running: &Running) {
    let Running {
        envoy, backends, ..
    } = running;
    let listener = envoy.listener;
    let held: Vec<_> = (0..3)
        .map(|_| thread::spawn(move || request(listener, "/v1/completions", &[HOLD]).unwrap()))
        .collect();
    wait_until(Duration::from_secs(10), "three held requests", || {
        backends.iter().map(Backend::active).sum::<usize>() == 3
    });
    let spread: Vec<usize> = backends.iter().map(Backend::active).collect();
    assert_eq!(
        spread,
        [1, 1, 1],
        "held requests were not spread by the filter"
    );
    for b in backends {
        b.release_held();
    }
    for h in held {
        assert_eq!(h.join().unwrap().status, 200);
    }
    let ids: Vec<String> = backends.iter().map(Backend::id).collect();
    for _ in 0..6 {
        let r = request(listener, "/v1/completions", &[]).unwrap();
        assert_eq!(r.status, 200);
        let seen = r.header("x-seen-routing").unwrap_or("");
        let first = seen.split(',').next().unwrap();
        assert!(ids.iter().any(|id| id == first), "routing header {seen:?}");
        assert_eq!(Some(first), r.served_by(), "the decision was not honoured");
    }
    envoy.wait_for_zero_in_flight(POOL);
    wait_until(Duration::from_secs(10), "decisions to be flushed", || {
        envoy.stat(&format!(
            "model_lb.{POOL}.decisions.least_outstanding_requests"
        )) >= 9
    });
    assert_eq!(
        envoy.stat(&format!("model_lb.{POOL}.unhonoured_decisions")),
        0
    );
}

/// A chat request whose prompt is the routing key.
fn chat(i: usize) -> String {
    json!({"model": "m", "messages": [{"role": "system", "content": format!("prompt {i} {}", "x".repeat(200))},
        {"role": "user", "content": "hi"}]})
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// Envoy Gateway

const EG_FILTER: &str = "envoy.filters.http.wasm/envoyextensionpolicy/models/model-lb/wasm/";

#[test]
fn envoy_gateway_manifests_and_their_envoy_config_agree() {
    let eep = manifests("deploy/envoy-gateway/envoyextensionpolicy.yaml");
    let btp = manifests("deploy/envoy-gateway/backendtrafficpolicy.yaml");
    let route = manifests("deploy/envoy-gateway/httproute.yaml");
    let gateway = manifests("deploy/envoy-gateway/gateway.yaml");
    let envoy = yaml_as_json("deploy/equivalent-envoy/envoy-gateway.yaml");

    let eep = kind(&eep, "EnvoyExtensionPolicy");
    let btp = kind(&btp, "BackendTrafficPolicy");
    let route = kind(&route, "HTTPRoute");
    let proxy = kind(&gateway, "EnvoyProxy");
    let gw = kind(&gateway, "Gateway");

    // Names Envoy Gateway derives: cluster per route rule, filter and VM per policy wasm entry.
    let ns = route["metadata"]["namespace"].as_str().unwrap();
    let cluster_name = format!(
        "httproute/{ns}/{}/rule/0",
        route["metadata"]["name"].as_str().unwrap()
    );
    let filter_name = format!(
        "envoy.filters.http.wasm/envoyextensionpolicy/{}/{}/wasm/0",
        eep["metadata"]["namespace"].as_str().unwrap(),
        eep["metadata"]["name"].as_str().unwrap()
    );
    let vm_id = filter_name
        .strip_prefix("envoy.filters.http.wasm/")
        .unwrap();
    for policy in [eep, btp] {
        assert_eq!(policy["spec"]["targetRefs"][0]["kind"], "HTTPRoute");
        assert_eq!(
            policy["spec"]["targetRefs"][0]["name"],
            route["metadata"]["name"]
        );
    }
    assert_eq!(
        route["spec"]["parentRefs"][0]["name"],
        gw["metadata"]["name"]
    );
    assert_eq!(
        gw["spec"]["infrastructure"]["parametersRef"]["name"],
        proxy["metadata"]["name"]
    );

    let listener = &envoy["static_resources"]["listeners"][0];
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    let route_cfg = &hcm["route_config"]["virtual_hosts"][0]["routes"][0];
    assert_eq!(route_cfg["route"]["cluster"], cluster_name.as_str());
    assert!(route_cfg["typed_per_filter_config"][filter_name.as_str()].is_object());
    let filter = named(&hcm["http_filters"], &filter_name);
    assert_eq!(filter["disabled"], true);
    let wasm = &filter["typed_config"]["config"];
    assert_eq!(wasm["vm_config"]["vm_id"], vm_id);
    let entry = &eep["spec"]["wasm"][0];
    assert_eq!(wasm["name"], entry["name"]);
    assert_eq!(wasm["root_id"], entry["rootID"]);
    assert_eq!(wasm["fail_open"], entry["failOpen"]);
    // The plugin configuration is the policy's `config`, and it watches the route's cluster.
    let config: Value =
        serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(config, entry["config"]);
    assert_eq!(config["envoy_cluster"], cluster_name.as_str());
    assert_eq!(config["pool"], POOL);

    // The cluster: override_host on the policy's header, the policy's type as the fallback.
    let cluster = named(&envoy["static_resources"]["clusters"], &cluster_name);
    let lb = &cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"];
    assert_eq!(lb["name"], "envoy.load_balancing_policies.override_host");
    let extract = &btp["spec"]["loadBalancer"]["endpointOverride"]["extractFrom"];
    assert_eq!(
        lb["typed_config"]["override_host_sources"],
        json!([{"header": extract[0]["header"]}])
    );
    assert_eq!(extract[0]["header"], ROUTING_HEADER);
    assert_eq!(btp["spec"]["loadBalancer"]["type"], "LeastRequest");
    assert_eq!(
        lb["typed_config"]["fallback_policy"]["policies"][0]["typed_extension_config"]["name"],
        "envoy.load_balancing_policies.least_request"
    );
    let retry = &route_cfg["route"]["retry_policy"];
    assert_eq!(retry["num_retries"], btp["spec"]["retry"]["numRetries"]);
    let triggers: Vec<&str> = btp["spec"]["retry"]["retryOn"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(retry["retry_on"], triggers.join(",").as_str());
    let hc = &btp["spec"]["healthCheck"]["active"];
    assert_eq!(
        cluster["health_checks"][0]["http_health_check"]["path"],
        hc["http"]["path"]
    );
    assert_eq!(cluster["health_checks"][0]["interval"], hc["interval"]);
    assert_eq!(
        route_cfg["route"]["timeout"],
        route["spec"]["rules"][0]["timeouts"]["request"]
    );

    // The EnvoyProxy bootstrap patches: the admin cluster the filter names, and the stats tags.
    let patches = proxy["spec"]["bootstrap"]["jsonPatches"]
        .as_array()
        .unwrap();
    let admin_cluster = named(&envoy["static_resources"]["clusters"], "model_lb_admin");
    assert_eq!(config["admin_cluster"], "model_lb_admin");
    assert_eq!(patches[0]["path"], "/static_resources/clusters/-");
    assert_eq!(&patches[0]["value"], admin_cluster);
    assert_eq!(
        admin_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
        envoy["admin"]["address"]
    );
    let tags = envoy["stats_config"]["stats_tags"].as_array().unwrap();
    let added: Vec<&Value> = patches[1..].iter().map(|p| &p["value"]).collect();
    assert_eq!(added.len(), 3, "the endpoint, pool and version tags");
    assert_eq!(added, tags[tags.len() - 3..].iter().collect::<Vec<_>>());
    // ... which are the shipped envoy.yaml's.
    let shipped = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml")).unwrap();
    for tag in added {
        assert!(shipped.contains(&format!("regex: '{}'", tag["regex"].as_str().unwrap())));
    }
}

#[test]
fn envoy_gateway_equivalent_routes_through_the_filter() {
    let running = start_equivalent("envoy-gateway", |yaml| yaml);
    routes_through_the_filter(&running);
    // The EnvoyProxy's stats tags make the endpoint a label.
    let prometheus = get(running.envoy.admin, "/stats/prometheus")
        .unwrap()
        .text();
    let id = running.backends[0].id();
    assert!(
        prometheus.contains(&format!(
            "model_lb_endpoint_in_flight{{model_lb_endpoint=\"{id}\",model_lb_pool=\"{POOL}\"}}"
        )),
        "{prometheus}"
    );
}

/// The PREFIX_AWARE variant (prefix-aware/): a second wasm entry, the hold filter, whose VM id
/// the EnvoyPatchPolicy replaces with model_lb's. (Without the patch the hold filter runs in a VM
/// of its own, where model_lb cannot release what it holds.)
fn envoy_gateway_prefix_variant(yaml: String) -> String {
    let policy = manifests("deploy/envoy-gateway/prefix-aware/envoypatchpolicy.yaml");
    let patch = &kind(&policy, "EnvoyPatchPolicy")["spec"]["jsonPatches"][0]["operation"];
    let json_path = patch["jsonPath"].as_str().unwrap();
    assert!(
        json_path.contains(&format!("{EG_FILTER}1')]")),
        "{json_path}"
    );
    assert!(json_path.ends_with(".typed_config.config.vm_config.vm_id"));
    let hold_vm = patch["value"].as_str().unwrap().to_owned();
    assert_eq!(
        hold_vm,
        format!(
            "{}0",
            EG_FILTER.strip_prefix("envoy.filters.http.wasm/").unwrap()
        ),
        "the hold filter must get model_lb's VM"
    );
    let eep = manifests("deploy/envoy-gateway/prefix-aware/envoyextensionpolicy.yaml");
    let wasm = &kind(&eep, "EnvoyExtensionPolicy")["spec"]["wasm"];
    let (main, hold) = (&wasm[0], &wasm[1]);
    assert_eq!(
        hold["code"], main["code"],
        "the hold filter must be the same module"
    );
    let router = "          - name: envoy.filters.http.router\n";
    let main_filter = &yaml[yaml
        .find(&format!("          - name: {EG_FILTER}0\n"))
        .unwrap()..yaml.find(router).unwrap()];
    let main_config = serde_json::to_string(&main["config"]).unwrap();
    let hold_filter = main_filter
        .replace(&format!("{EG_FILTER}0"), &format!("{EG_FILTER}1"))
        .replace(
            "name: model_lb\n",
            &format!("name: {}\n", hold["name"].as_str().unwrap()),
        )
        .replace(
            "root_id: model_lb\n",
            &format!("root_id: {}\n", hold["rootID"].as_str().unwrap()),
        )
        // Envoy Gateway serves each entry's module at its own path.
        .replace(
            "/model-lb/wasm/0/model_lb.wasm",
            "/model-lb/wasm/1/model_lb.wasm",
        )
        .replace(
            &format!(
                "vm_id: {}0",
                EG_FILTER.strip_prefix("envoy.filters.http.wasm/").unwrap()
            ),
            &format!("vm_id: {hold_vm}"),
        );
    let hold_filter = replace_config(
        &hold_filter,
        &serde_json::to_string(&hold["config"]).unwrap(),
    );
    let yaml = replace_config(&yaml, &main_config);
    let enable = format!(
        "                  {EG_FILTER}0:\n                    \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig\n                    config: {{}}\n"
    );
    let yaml = yaml.replacen(
        &enable,
        &format!(
            "{enable}{}",
            enable.replace(&format!("{EG_FILTER}0"), &format!("{EG_FILTER}1"))
        ),
        1,
    );
    yaml.replacen(router, &format!("{hold_filter}{router}"), 1)
}

/// Replaces the single-quoted plugin configuration JSON in an Envoy YAML snippet.
fn replace_config(yaml: &str, json: &str) -> String {
    let start = yaml.find("value: '{").expect("plugin configuration") + "value: '".len();
    let end = start + yaml[start..].find("}'\n").unwrap() + 1;
    format!("{}{json}{}", &yaml[..start], &yaml[end..])
}

fn prefix_requests(running: &Running) {
    for i in 0..4 {
        let r = post(
            running.envoy.listener,
            "/v1/chat/completions",
            chat(i).as_bytes(),
            &[],
        )
        .unwrap();
        assert_eq!(r.status, 200);
    }
}

#[test]
fn envoy_gateway_prefix_aware_works_with_the_vm_id_patch() {
    let patched = start_equivalent("envoy-gateway", envoy_gateway_prefix_variant);
    prefix_requests(&patched);
    wait_until(Duration::from_secs(10), "prefix decisions", || {
        patched
            .envoy
            .stat(&format!("model_lb.{POOL}.prefix.routed"))
            >= 4
    });
    assert_eq!(
        patched
            .envoy
            .stat(&format!("model_lb.{POOL}.fail_open.no_hold_filter")),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// Istio

#[test]
fn istio_manifests_and_their_envoy_config_agree() {
    let plugin = manifests("deploy/istio/wasmplugin.yaml");
    let filter = manifests("deploy/istio/envoyfilter.yaml");
    let gateway = manifests("deploy/istio/gateway.yaml");
    let bootstrap = manifests("deploy/istio/stats-bootstrap.yaml");
    let envoy = yaml_as_json("deploy/equivalent-envoy/istio.yaml");
    let plugin = kind(&plugin, "WasmPlugin");
    let filter = kind(&filter, "EnvoyFilter");

    // Istio's cluster for the Service the EnvoyFilter matches, which the filter watches.
    let matched = &filter["spec"]["configPatches"][0]["match"]["cluster"];
    let cluster_name = format!(
        "outbound|{}||{}",
        matched["portNumber"],
        matched["service"].as_str().unwrap()
    );
    let route = kind(&gateway, "HTTPRoute");
    let backend = &route["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!(
        cluster_name,
        format!(
            "outbound|{}||{}.{}.svc.cluster.local",
            backend["port"],
            backend["name"].as_str().unwrap(),
            route["metadata"]["namespace"].as_str().unwrap()
        )
    );
    let config = &plugin["spec"]["pluginConfig"];
    assert_eq!(config["envoy_cluster"], cluster_name.as_str());
    assert_eq!(config["pool"], POOL);

    assert_eq!(
        &filter["spec"]["workloadSelector"]["labels"], &plugin["spec"]["selector"]["matchLabels"],
        "the WasmPlugin and the EnvoyFilter must select the same gateway pods"
    );

    let listener = &envoy["static_resources"]["listeners"][0];
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    let plugin_name = format!(
        "{}.{}",
        plugin["metadata"]["namespace"].as_str().unwrap(),
        plugin["metadata"]["name"].as_str().unwrap()
    );
    let wasm = &named(&hcm["http_filters"], &plugin_name)["typed_config"]["config"];
    assert_eq!(wasm["root_id"], plugin["spec"]["pluginName"]);
    assert_eq!(
        wasm["fail_open"],
        plugin["spec"]["failStrategy"] != "FAIL_CLOSE"
    );
    assert!(
        wasm["vm_config"].get("vm_id").is_none(),
        "Istio sets no vm_id"
    );
    let configured: Value =
        serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(&configured, config);
    let route_cfg = &hcm["route_config"]["virtual_hosts"][0]["routes"][0];
    assert_eq!(route_cfg["route"]["cluster"], cluster_name.as_str());

    // The cluster patch, merged; the admin cluster, added.
    let clusters = &envoy["static_resources"]["clusters"];
    let merged = &filter["spec"]["configPatches"][0]["patch"];
    assert_eq!(merged["operation"], "MERGE");
    assert_eq!(
        named(clusters, &cluster_name)["load_balancing_policy"],
        merged["value"]["load_balancing_policy"]
    );
    let lb = &merged["value"]["load_balancing_policy"]["policies"][0]["typed_extension_config"];
    assert_eq!(
        lb["typed_config"]["override_host_sources"][0]["header"],
        ROUTING_HEADER
    );
    let added = &filter["spec"]["configPatches"][1]["patch"];
    assert_eq!(added["operation"], "ADD");
    assert_eq!(config["admin_cluster"], added["value"]["name"]);
    assert_eq!(named(clusters, "model_lb_admin"), &added["value"]);
    assert_eq!(
        added["value"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
        envoy["admin"]["address"]
    );

    // Stats: the gateway's annotations keep the filter's stats and merge in the tags.
    let gw = kind(&gateway, "Gateway");
    let annotations = &gw["spec"]["infrastructure"]["annotations"];
    let proxy_config: Value =
        serde_json::from_str(annotations["proxy.istio.io/config"].as_str().unwrap()).unwrap();
    let prefixes = &proxy_config["proxyStatsMatcher"]["inclusionPrefixes"];
    let patterns = &envoy["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"];
    for prefix in prefixes.as_array().unwrap() {
        assert!(patterns
            .as_array()
            .unwrap()
            .contains(&json!({"prefix": prefix})));
    }
    let configmap = kind(&bootstrap, "ConfigMap");
    assert_eq!(
        annotations["sidecar.istio.io/bootstrapOverride"],
        configmap["metadata"]["name"]
    );
    let custom: Value =
        serde_json::from_str(configmap["data"]["custom_bootstrap.json"].as_str().unwrap()).unwrap();
    let tags = envoy["stats_config"]["stats_tags"].as_array().unwrap();
    assert_eq!(
        custom["stats_config"]["stats_tags"]
            .as_array()
            .unwrap()
            .as_slice(),
        &tags[tags.len() - 3..]
    );
}

#[test]
fn istio_prefix_aware_envoyfilter_matches_the_wasmplugin() {
    let plugin = manifests("deploy/istio/wasmplugin.yaml");
    let plugin = kind(&plugin, "WasmPlugin");
    let prefix = manifests("deploy/istio/prefix-aware/envoyfilter-wasm.yaml");
    let prefix = kind(&prefix, "EnvoyFilter");
    assert_eq!(
        &prefix["spec"]["workloadSelector"]["labels"],
        &plugin["spec"]["selector"]["matchLabels"]
    );
    let patches = prefix["spec"]["configPatches"].as_array().unwrap();
    let source = &patches[0]["patch"]["value"];
    let (main, hold) = (&patches[1], &patches[2]);
    for p in [main, hold] {
        assert_eq!(p["applyTo"], "HTTP_FILTER");
        assert_eq!(p["patch"]["operation"], "INSERT_BEFORE");
        assert_eq!(
            p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
            "envoy.filters.http.router"
        );
    }
    let (main, hold) = (
        &main["patch"]["value"]["typed_config"]["config"],
        &hold["patch"]["value"]["typed_config"]["config"],
    );
    // One VM for both (same vm_id, same module), fail closed like the WasmPlugin.
    assert_eq!(main["vm_config"], hold["vm_config"]);
    assert_eq!(main["root_id"], plugin["spec"]["pluginName"]);
    assert_eq!(hold["root_id"], "model_lb_hold");
    assert_eq!(main["fail_open"], false);
    assert_eq!(hold["fail_open"], false);
    let remote = &main["vm_config"]["code"]["remote"];
    assert_eq!(remote["http_uri"]["uri"], plugin["spec"]["url"]);
    assert_eq!(remote["sha256"], plugin["spec"]["sha256"]);
    assert_eq!(remote["http_uri"]["cluster"], source["name"]);
    let host = plugin["spec"]["url"].as_str().unwrap()["https://".len()..]
        .split('/')
        .next()
        .unwrap();
    let address = &source["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ["address"]["socket_address"];
    assert_eq!(address["address"], host);
    assert_eq!(source["transport_socket"]["typed_config"]["sni"], host);
    // The WasmPlugin's configuration plus PREFIX_AWARE; the hold filter's role.
    let mut config: Value =
        serde_json::from_str(main["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(config["routing_strategy"], "PREFIX_AWARE");
    let object = config.as_object_mut().unwrap();
    object.remove("routing_strategy");
    object.remove("prefix_aware");
    assert_eq!(&config, &plugin["spec"]["pluginConfig"]);
    let role: Value =
        serde_json::from_str(hold["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(role, json!({"role": "hold"}));
}

#[test]
fn istio_equivalent_routes_through_the_filter_and_keeps_its_stats() {
    let running = start_equivalent("istio", |yaml| yaml);
    routes_through_the_filter(&running);
    let prometheus = get(running.envoy.admin, "/stats/prometheus")
        .unwrap()
        .text();
    let id = running.backends[0].id();
    assert!(
        prometheus.contains(&format!(
            "model_lb_endpoint_in_flight{{model_lb_endpoint=\"{id}\",model_lb_pool=\"{POOL}\"}}"
        )),
        "{prometheus}"
    );
}

#[test]
fn istio_prefix_aware_envoyfilter_routes_by_prefix() {
    // prefix-aware/envoyfilter-wasm.yaml's filters and module source in place of the WasmPlugin's
    // filter, the module served over plain HTTP by the test.
    let server = FileServer::start(&wasm_path());
    let prefix = manifests("deploy/istio/prefix-aware/envoyfilter-wasm.yaml");
    let patches = kind(&prefix, "EnvoyFilter")["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .clone();
    let sha = sha256_of(&wasm_path());
    let base = format!("http://{}", server.addr);
    let running = start_equivalent("istio", |yaml| {
        let mut source = patches[0]["patch"]["value"].clone();
        source["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"] = json!({"address": "127.0.0.1", "port_value": server.addr.port()});
        source.as_object_mut().unwrap().remove("transport_socket");
        let filters: String = patches[1..]
            .iter()
            .map(|p| {
                let mut filter = p["patch"]["value"].clone();
                let remote = &mut filter["typed_config"]["config"]["vm_config"]["code"]["remote"];
                remote["sha256"] = json!(sha);
                let uri = remote["http_uri"]["uri"].as_str().unwrap().to_owned();
                remote["http_uri"]["uri"] = json!(uri.replace("https://models.example.com", &base));
                format!("          - {filter}\n")
            })
            .collect();
        let router = "          - name: envoy.filters.http.router\n";
        let start = yaml.find("          - name: models.model-lb\n").unwrap();
        let end = yaml.find(router).unwrap();
        let yaml = format!("{}{filters}{}", &yaml[..start], &yaml[end..]);
        yaml.replacen("  clusters:\n", &format!("  clusters:\n  - {source}\n"), 1)
    });
    assert!(
        server.served.load(Ordering::SeqCst) >= 1,
        "Envoy never fetched the module"
    );
    prefix_requests(&running);
    wait_until(Duration::from_secs(10), "prefix decisions", || {
        running
            .envoy
            .stat(&format!("model_lb.{POOL}.prefix.routed"))
            >= 4
    });
    assert_eq!(
        running
            .envoy
            .stat(&format!("model_lb.{POOL}.fail_open.no_hold_filter")),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// Grafana

/// The metric and label names a PromQL expression uses that start with `model_lb_`, and the
/// literal prefixes of `__name__=~"prefix.+"` matchers.
fn promql_names(expr: &str) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let (mut metrics, mut labels, mut prefixes) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut expr = expr.to_owned();
    if let Some(inner) = expr.strip_prefix("label_values(") {
        let inner = inner.strip_suffix(')').unwrap();
        let (series, label) = inner.rsplit_once(',').unwrap();
        labels.insert(label.trim().to_owned());
        expr = series.to_owned();
    }
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut in_by) = (0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            let end = i + 1 + chars[i + 1..].iter().position(|&c| c == '"').unwrap();
            let literal: String = chars[i + 1..end].iter().collect();
            let before: String = chars[..i].iter().collect();
            if before.trim_end().ends_with("__name__=~") {
                prefixes.insert(
                    literal
                        .trim_end_matches(".+")
                        .trim_end_matches(".*")
                        .to_owned(),
                );
            }
            i = end + 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let end = i + chars[i..]
                .iter()
                .position(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == ':'))
                .unwrap_or(chars.len() - i);
            let word: String = chars[i..end].iter().collect();
            let next = chars[end..].iter().find(|c| !c.is_whitespace()).copied();
            if word == "by" || word == "without" {
                in_by = true;
            } else if word.starts_with("model_lb_") {
                if in_by || matches!(next, Some('=' | '!')) {
                    labels.insert(word);
                } else {
                    metrics.insert(word);
                }
            }
            i = end;
        } else {
            if c == ')' {
                in_by = false;
            }
            i += 1;
        }
    }
    (metrics, labels, prefixes)
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains("model_lb") => out.push(s.clone()),
                    ("legendFormat", Value::String(s)) => {
                        // {{label}} placeholders name labels.
                        for part in s.split("{{").skip(1) {
                            let label = part.split("}}").next().unwrap().trim();
                            if label != "__name__" {
                                out.push(format!("label_values(x, {label})"));
                            }
                        }
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Metric names and label names in a `/stats/prometheus` scrape.
fn scraped(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut metrics, mut labels) = (BTreeSet::new(), BTreeSet::new());
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap();
        metrics.insert(line[..name_end].to_owned());
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.find('}').unwrap()];
            for pair in body.split("\",") {
                if let Some((label, _)) = pair.split_once('=') {
                    labels.insert(label.to_owned());
                }
            }
        }
    }
    (metrics, labels)
}

#[test]
fn the_dashboard_queries_only_stats_the_filter_emits() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/grafana/model-lb.json")).unwrap(),
    )
    .unwrap();
    // A Prometheus data source variable, used by every panel and query.
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .unwrap();
    assert_eq!(datasource["query"], "prometheus");
    let name = datasource["name"].as_str().unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            p["datasource"]["uid"],
            format!("${{{name}}}"),
            "{}",
            p["title"]
        );
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
    for topic in [
        "in flight per endpoint",
        "by strategy",
        "Fail-opens",
        "Ejections",
        "Eligible",
        "Unhonoured",
        "Estimated",
        "Load reports",
        "Stale",
        "Polls",
        "Prefix routing",
        "Prefix fallbacks",
    ] {
        assert!(
            titles
                .iter()
                .any(|t| t.to_lowercase().contains(&topic.to_lowercase())),
            "no panel about {topic:?} in {titles:?}"
        );
    }
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let (mut metrics, mut labels, mut prefixes) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for expr in &exprs {
        let (m, l, p) = promql_names(expr);
        metrics.extend(m);
        labels.extend(l);
        prefixes.extend(p);
    }
    assert!(metrics.len() >= 30, "{metrics:?}");

    // Every family: LOR with server_load and the admin poll, RANDOM, PREFIX_AWARE with its hold
    // filter, each in its own Envoy (the stats_tags of envoy/envoy.yaml).
    let lor = Pool::start_configured(
        "LEAST_OUTSTANDING_REQUESTS",
        r#""admin_cluster": "model_lb_admin", "server_load": {"interval_ms": 100}"#,
        |c| c,
    );
    let random = Pool::start("RANDOM");
    let prefix = Pool::start_configured("PREFIX_AWARE", "", EnvoyConfig::with_hold_filter);
    for _ in 0..3 {
        assert_eq!(lor.request(&[]).status, 200);
        assert_eq!(random.request(&[]).status, 200);
    }
    for i in 0..3 {
        let r = post(
            prefix.envoy.listener,
            "/v1/chat/completions",
            chat(i).as_bytes(),
            &[],
        )
        .unwrap();
        assert_eq!(r.status, 200);
    }
    assert_eq!(prefix.request(&[]).status, 200);
    let cluster = "model_servers";
    wait_until(Duration::from_secs(15), "stats to be flushed", || {
        lor.envoy
            .stat(&format!("model_lb.{cluster}.server_load.reports"))
            >= 1
            && random
                .envoy
                .stat(&format!("model_lb.{cluster}.decisions.random"))
                >= 3
            && prefix
                .envoy
                .stat(&format!("model_lb.{cluster}.prefix.routed"))
                >= 3
    });
    let (mut emitted, mut emitted_labels) = (BTreeSet::new(), BTreeSet::new());
    for pool in [&lor, &random, &prefix] {
        let (m, l) = scraped(&get(pool.envoy.admin, "/stats/prometheus").unwrap().text());
        emitted.extend(m);
        emitted_labels.extend(l);
    }
    let missing: Vec<&String> = metrics.difference(&emitted).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the filter does not emit: {missing:?}\nemitted: {:?}",
        emitted
            .iter()
            .filter(|m| m.starts_with("model_lb"))
            .collect::<Vec<_>>()
    );
    let missing: Vec<&String> = labels.difference(&emitted_labels).collect();
    assert!(missing.is_empty(), "labels never emitted: {missing:?}");
    for p in prefixes {
        assert!(
            emitted.iter().any(|m| m.starts_with(&p)),
            "no metric starts with {p}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// make dist

#[test]
fn dist_artifacts_agree_and_the_filter_reports_its_version() {
    let dist = repo_root().join("dist");
    let wasm = dist.join("model_lb.wasm");
    assert!(
        wasm.exists(),
        "{} is missing: run `make dist` (or `make test`)",
        wasm.display()
    );
    let sums = std::fs::read_to_string(dist.join("model_lb.wasm.sha256")).unwrap();
    assert_eq!(
        sums,
        format!("{}  model_lb.wasm\n", sha256_of(&wasm)),
        "sha256sum format, matching"
    );
    let status = Command::new("sha256sum")
        .args(["--quiet", "-c", "model_lb.wasm.sha256"])
        .current_dir(&dist)
        .status()
        .unwrap();
    assert!(status.success());
    let version = std::fs::read_to_string(dist.join("VERSION")).unwrap();
    let version = version.strip_suffix('\n').expect("one line");
    assert!(
        !version.is_empty() && !version.contains(char::is_whitespace),
        "{version:?}"
    );

    // The release module logs its version at start-up and exposes it as a gauge.
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    let config = EnvoyConfig::shipped()
        .backends(ports)
        .plugin_config(&plugin_json("LEAST_OUTSTANDING_REQUESTS", ports))
        .replace(wasm_path().to_str().unwrap(), wasm.to_str().unwrap());
    let envoy = Envoy::start(&config);
    wait_until(Duration::from_secs(10), "the version in the log", || {
        envoy.log().contains(&format!("model-lb {version}:"))
    });
    let segment: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stats: HashMap<String, u64> = envoy.stats("model_lb_build_info");
    assert_eq!(
        stats.get(&format!("wasmcustom.model_lb_build_info.{segment}")),
        Some(&1),
        "build_info gauges: {stats:?}"
    );
}
