//! Envoy configurations, generated as JSON (Envoy reads JSON as YAML). Everything listens on
//! 127.0.0.1 port 0; the caller learns the ports from the admin API (`--admin-address-path`,
//! `/listeners?format=json`).

use serde_json::{json, Value};

use super::Policy;

/// The header model-lb writes and the override_host policy reads.
pub const ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";

/// The header the load tool sends the conversation's group in (`model-load
/// --prefix-key-header`), which Envoy's RING_HASH and MAGLEV variants hash.
pub const PREFIX_KEY_HEADER: &str = "x-prefix-key";

/// The fast backend's listeners per Envoy process: with 16 proxy workers, each process then
/// holds at most 16 x 256 upstream connections per proxy, well under a 20,000 fd limit.
pub const BACKEND_LISTENERS_PER_PROCESS: u32 = 256;

/// The fast backend buffers request bodies up to this size before answering, so that a body
/// is read in full and the connection stays reusable (the overhead benchmark sends up to 1 MB).
pub const BACKEND_MAX_BODY_BYTES: u32 = 4 << 20;

/// The Envoy cluster that points at Envoy's own admin listener (as in `envoy/envoy.yaml`), for
/// plugin configurations with `admin_cluster`.
pub const ADMIN_CLUSTER: &str = "model_lb_admin";

/// The filter's poll interval for server load in production, and its default budget of polls
/// per second (`src/server_load.rs`): 20 endpoints every 100 ms.
pub const PRODUCTION_POLL_INTERVAL_MS: f64 = 100.0;
pub const PRODUCTION_MAX_POLLS_PER_SECOND: f64 = 200.0;

/// What the overhead benchmark's fast backend answers on `/metrics`: the two gauges the
/// filter's server-load poll reads, as vLLM names them.
pub const FAST_BACKEND_METRICS: &str = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n";

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const LEAST_REQUEST: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest";
const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// One listener of a generated config: its name (also its cluster's and, with the filter, the
/// plugin's `pool`), its policy, and extra fields for the plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    pub policy: Policy,
    pub plugin_extra: serde_json::Map<String, Value>,
    /// A wasm filter that does nothing, loaded in front of the router (the overhead
    /// benchmark's floor for any wasm filter).
    pub noop_wasm: Option<String>,
    /// `load_balancing_weight` of each endpoint, in the order of the ports; empty: none set.
    pub weights: Vec<u32>,
    /// The request header Envoy hashes to pick the host (the route's `hash_policy`), for
    /// RING_HASH and MAGLEV.
    pub hash_header: Option<String>,
    /// Spread the listener's connections exactly evenly over Envoy's workers
    /// (`connection_balance_config: exact_balance`, with `enable_reuse_port: false`) instead of
    /// leaving it to the kernel's hash, so that a few client connections keep every worker busy.
    pub exact_balance: bool,
}

impl Variant {
    pub fn of(policy: Policy) -> Self {
        Self {
            name: policy.id().to_owned(),
            policy,
            plugin_extra: serde_json::Map::new(),
            noop_wasm: None,
            weights: Vec::new(),
            hash_header: policy.hashes().then(|| PREFIX_KEY_HEADER.to_owned()),
            exact_balance: false,
        }
    }

    /// model-lb `PREFIX_AWARE` with its two parameters (the listener gets the hold filter).
    pub fn prefix_aware(prefix_length: u32, concurrency_threshold: u32) -> Self {
        let mut v = Self::of(Policy::ModelLbPrefixAware);
        v.plugin_extra.insert(
            "prefix_aware".into(),
            json!({"prefix_length": prefix_length, "concurrency_threshold": concurrency_threshold}),
        );
        v
    }

    /// Sets the plugin's `release_batching_ms`.
    pub fn with_release_batching(mut self, ms: u32) -> Self {
        self.plugin_extra
            .insert("release_batching_ms".into(), json!(ms));
        self
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    pub fn balanced(mut self) -> Self {
        self.exact_balance = true;
        self
    }

    /// Whether the plugin configuration names [`ADMIN_CLUSTER`] (the Envoy then needs it).
    pub fn uses_admin_cluster(&self) -> bool {
        self.plugin_extra.get("admin_cluster") == Some(&json!(ADMIN_CLUSTER))
    }

    /// Adds the filter's `server_load` block (polling `/metrics` of every endpoint through the
    /// variant's own cluster, named when the plugin configuration is generated) with its
    /// `interval_ms`, staleness 10 intervals and a budget of `max_polls_per_second`.
    pub fn with_server_load(mut self, interval_ms: u64, max_polls_per_second: u64) -> Self {
        let config = server_load_config(interval_ms, max_polls_per_second);
        self.plugin_extra.insert("server_load".into(), config);
        self
    }

    /// Sets the endpoints' Envoy weights and lets the filter read them from the admin API.
    pub fn with_weights(mut self, weights: Vec<u32>) -> Self {
        self.weights = weights;
        self.plugin_extra
            .insert("admin_cluster".into(), json!(ADMIN_CLUSTER));
        self
    }
}

/// The plugin's `server_load` block: vLLM's running and waiting gauges from `/metrics`, polled
/// every `interval_ms`, stale after 10 intervals. [`plugin_config`] adds `cluster`: the
/// listener's own override_host cluster, which the polls go through.
pub fn server_load_config(interval_ms: u64, max_polls_per_second: u64) -> Value {
    json!({
        "source": "metrics",
        "path": "/metrics",
        "interval_ms": interval_ms,
        "stale_after_ms": 10 * interval_ms,
        "running_metric": "vllm:num_requests_running",
        "waiting_metric": "vllm:num_requests_waiting",
        "max_polls_per_second": max_polls_per_second
    })
}

/// The poll interval and budget at `time_scale`: production's 100 ms and 200 polls/s with
/// time scaled, so that the interval stands in the same ratio to a request's duration, and the
/// budget to the polls it must pay for, as in production. The filter accepts 10 ms at least.
pub fn scaled_polling(time_scale: f64) -> (u64, u64) {
    let interval = (PRODUCTION_POLL_INTERVAL_MS * time_scale).round().max(10.0);
    let budget = (PRODUCTION_MAX_POLLS_PER_SECOND * PRODUCTION_POLL_INTERVAL_MS / interval).ceil();
    (interval as u64, budget as u64)
}

fn endpoint_list(ports: &[u16]) -> Vec<String> {
    ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
}

/// The model-lb plugin configuration of a listener.
pub fn plugin_config(variant: &Variant, ports: &[u16]) -> Value {
    let strategy = match variant.policy {
        Policy::ModelLbRandom => "RANDOM",
        Policy::ModelLbPrefixAware => "PREFIX_AWARE",
        _ => "LEAST_OUTSTANDING_REQUESTS",
    };
    let mut config = serde_json::Map::new();
    config.insert("routing_strategy".into(), json!(strategy));
    config.insert("pool".into(), json!(variant.name));
    config.insert("endpoints".into(), json!(endpoint_list(ports)));
    config.insert("endpoint_header".into(), json!(ENDPOINT_HEADER));
    for (k, v) in &variant.plugin_extra {
        config.insert(k.clone(), v.clone());
    }
    if let Some(Value::Object(server_load)) = config.get_mut("server_load") {
        server_load
            .entry("cluster")
            .or_insert_with(|| json!(variant.name));
    }
    Value::Object(config)
}

/// An HTTP filter that runs `file` in the wasm VM `vm_id`; `plugin` is the rest of the plugin's
/// `config` (name, root id, configuration).
fn wasm_filter(filter_name: &str, vm_id: &str, file: &str, plugin: Value) -> Value {
    let mut config = match plugin {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    config.insert(
        "vm_config".into(),
        json!({"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": file}}}),
    );
    json!({
        "name": filter_name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": config
        }
    })
}

fn listener(variant: &Variant, wasm: &str, ports: &[u16]) -> Value {
    let mut filters = Vec::new();
    if variant.policy.uses_filter() {
        filters.push(wasm_filter(
            "model_lb",
            "model_lb",
            wasm,
            json!({
                "name": format!("model_lb_{}", variant.name),
                "root_id": "model_lb",
                "failure_policy": "FAIL_RELOAD",
                "configuration": {
                    "@type": STRING_VALUE,
                    "value": plugin_config(variant, ports).to_string()
                }
            }),
        ));
    }
    if variant.policy == Policy::ModelLbPrefixAware {
        // PREFIX_AWARE's hold filter: right after model_lb, in its VM, with its own root id.
        filters.push(wasm_filter(
            "model_lb_hold",
            "model_lb",
            wasm,
            json!({
                "name": format!("model_lb_hold_{}", variant.name),
                "root_id": "model_lb_hold",
                "failure_policy": "FAIL_RELOAD",
                "configuration": {"@type": STRING_VALUE, "value": "{\"role\": \"hold\"}"}
            }),
        ));
    }
    if let Some(noop) = &variant.noop_wasm {
        filters.push(wasm_filter(
            "noop",
            "noop",
            noop,
            json!({"name": format!("noop_{}", variant.name)}),
        ));
    }
    filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}));
    let mut route = json!({
        "cluster": variant.name,
        "timeout": "0s",
        "retry_policy": {
            "retry_on": "connect-failure,reset-before-request",
            "num_retries": 2
        }
    });
    if let Some(header) = &variant.hash_header {
        route["hash_policy"] = json!([{"header": {"header_name": header}}]);
    }
    let mut listener = json!({
        "name": variant.name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM,
                "stat_prefix": variant.name,
                "stream_idle_timeout": "300s",
                "route_config": {"virtual_hosts": [{
                    "name": "models",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": route}]
                }]},
                "http_filters": filters
            }
        }]}]
    });
    if variant.exact_balance {
        listener["enable_reuse_port"] = json!(false);
        listener["connection_balance_config"] = json!({"exact_balance": {}});
    }
    listener
}

/// The cluster's `load_balancing_policy` for a policy.
pub fn lb_policy(policy: Policy) -> Value {
    let (name, config) = match policy {
        Policy::ModelLbLor | Policy::ModelLbRandom | Policy::ModelLbPrefixAware => (
            "envoy.load_balancing_policies.override_host",
            json!({
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [{"header": ENDPOINT_HEADER}],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.least_request",
                    "typed_config": {"@type": LEAST_REQUEST}
                }}]}
            }),
        ),
        Policy::RoundRobin => (
            "envoy.load_balancing_policies.round_robin",
            json!({"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"}),
        ),
        Policy::LeastRequest => (
            "envoy.load_balancing_policies.least_request",
            json!({"@type": LEAST_REQUEST}),
        ),
        Policy::LeastRequestFullScan => (
            "envoy.load_balancing_policies.least_request",
            json!({"@type": LEAST_REQUEST, "selection_method": "FULL_SCAN"}),
        ),
        Policy::RingHash => (
            "envoy.load_balancing_policies.ring_hash",
            json!({"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash"}),
        ),
        Policy::Maglev => (
            "envoy.load_balancing_policies.maglev",
            json!({"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev"}),
        ),
    };
    json!({"policies": [{"typed_extension_config": {"name": name, "typed_config": config}}]})
}

fn cluster(variant: &Variant, ports: &[u16]) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut endpoint = json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}});
            if let Some(w) = variant.weights.get(i) {
                endpoint["load_balancing_weight"] = json!(w);
            }
            endpoint
        })
        .collect();
    json!({
        "name": variant.name,
        "type": "STATIC",
        "connect_timeout": "1s",
        // Envoy's default limits (1024) must never be what limits a run.
        "circuit_breakers": {"thresholds": [{
            "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000
        }]},
        "load_assignment": {"cluster_name": variant.name, "endpoints": [{"lb_endpoints": endpoints}]},
        "load_balancing_policy": lb_policy(variant.policy)
    })
}

fn admin() -> Value {
    admin_at(0)
}

fn admin_at(port: u16) -> Value {
    json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}})
}

/// One Envoy with a listener and a cluster per variant, all over the same endpoints.
pub fn proxy_config(wasm: &str, ports: &[u16], variants: &[Variant]) -> Value {
    proxy_config_with_admin(wasm, ports, variants, None)
}

/// [`proxy_config`] with the admin listener on `admin_port` (0 or `None`: any free port). When a
/// variant's plugin names [`ADMIN_CLUSTER`], the config gets that cluster, pointing at this very
/// Envoy's admin port, which must then be known (not 0) when the config is written.
pub fn proxy_config_with_admin(
    wasm: &str,
    ports: &[u16],
    variants: &[Variant],
    admin_port: Option<u16>,
) -> Value {
    let mut clusters: Vec<Value> = variants.iter().map(|v| cluster(v, ports)).collect();
    let port = admin_port.unwrap_or(0);
    if variants.iter().any(Variant::uses_admin_cluster) {
        clusters.push(json!({
            "name": ADMIN_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": ADMIN_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
            ]}]}
        }));
    }
    json!({
        "static_resources": {
            "listeners": variants.iter().map(|v| listener(v, wasm, ports)).collect::<Vec<_>>(),
            "clusters": clusters,
        },
        "admin": admin_at(port)
    })
}

/// The matrix's Envoy: one listener per policy, default plugin settings.
pub fn matrix_config(wasm: &str, ports: &[u16], policies: &[Policy]) -> Value {
    let variants: Vec<Variant> = policies.iter().map(|&p| Variant::of(p)).collect();
    proxy_config(wasm, ports, &variants)
}

/// The overhead benchmark's variants in a regime of `workers` Envoy workers, every listener
/// spreading its connections exactly over the workers. Every regime: Envoy's LEAST_REQUEST
/// (the baseline), model-lb LOR with default settings, and LOR with `release_batching_ms` 10
/// (a finished request's decrement rides on the next routing write: two host calls fewer).
/// With one worker also: Envoy's ROUND_ROBIN, LEAST_REQUEST behind a wasm filter that does
/// nothing (`noop_wasm`: what hosting any wasm filter costs), model-lb RANDOM, and LOR without
/// passive health (which reads two properties per request in `on_log`): where the cost goes.
pub fn overhead_variants(noop_wasm: &str, workers: u32) -> Vec<Variant> {
    let lor = Variant::of(Policy::ModelLbLor);
    let batched = Variant::of(Policy::ModelLbLor)
        .named("mlb_lor_batched")
        .with_release_batching(10);
    let core = [Variant::of(Policy::LeastRequest), lor, batched];
    let variants: Vec<Variant> = if workers == 1 {
        let mut noop = Variant::of(Policy::LeastRequest).named("wasm_noop");
        noop.noop_wasm = Some(noop_wasm.to_owned());
        let mut no_passive = Variant::of(Policy::ModelLbLor).named("mlb_lor_no_passive");
        no_passive
            .plugin_extra
            .insert("passive_health".into(), json!(false));
        let [least_request, lor, batched] = core;
        vec![
            Variant::of(Policy::RoundRobin),
            least_request,
            noop,
            Variant::of(Policy::ModelLbRandom),
            lor,
            batched,
            no_passive,
        ]
    } else {
        core.to_vec()
    };
    variants.into_iter().map(Variant::balanced).collect()
}

/// The overhead benchmark's request-body variants: model-lb LOR (never reads the body) and
/// PREFIX_AWARE (holds the headers and reads the body as far as the key), at the filter's
/// default `prefix_length` and `concurrency_threshold`.
pub fn overhead_body_variants() -> Vec<Variant> {
    vec![
        Variant::of(Policy::ModelLbLor).balanced(),
        Variant::prefix_aware(4096, 8).balanced(),
    ]
}

/// The overhead benchmark's LOR with server load: the filter's production polling (every
/// endpoint every 100 ms through the pool's cluster, at most 200 polls a second, so 256
/// endpoints are each polled every 1.28 s). It runs in an Envoy of its own, so that its polls
/// cost only its own measurement.
pub fn overhead_server_load_variant() -> Variant {
    let mut v = Variant::of(Policy::ModelLbLor);
    v.name = "mlb_lor_server_load".into();
    v.with_server_load(
        PRODUCTION_POLL_INTERVAL_MS as u64,
        PRODUCTION_MAX_POLLS_PER_SECOND as u64,
    )
    .balanced()
}

/// How `count` fast-backend listeners are split over processes of at most
/// [`BACKEND_LISTENERS_PER_PROCESS`] each.
pub fn backend_split(count: u32) -> Vec<u32> {
    let per = BACKEND_LISTENERS_PER_PROCESS;
    (0..count.div_ceil(per))
        .map(|i| (count - i * per).min(per))
        .collect()
}

/// A backend that answers every request with a 2-byte 200 (`direct_response`) once it has its
/// body (Envoy's buffer filter, up to [`BACKEND_MAX_BODY_BYTES`]), on `count` listeners of one
/// process. `/metrics` answers with [`FAST_BACKEND_METRICS`], for the server-load variant's
/// polls.
pub fn fast_backend_config(count: u32) -> Value {
    let listeners: Vec<Value> = (0..count)
        .map(|i| {
            json!({
                "name": format!("b{i}"),
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": HCM,
                        "stat_prefix": "b",
                        "route_config": {"virtual_hosts": [{
                            "name": "b",
                            "domains": ["*"],
                            "routes": [
                                {
                                    "match": {"path": "/metrics"},
                                    "direct_response": {"status": 200, "body": {"inline_string": FAST_BACKEND_METRICS}}
                                },
                                {
                                    "match": {"prefix": "/"},
                                    "direct_response": {"status": 200, "body": {"inline_string": "ok"}}
                                }
                            ]
                        }]},
                        "http_filters": [
                            {"name": "envoy.filters.http.buffer", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                                "max_request_bytes": BACKEND_MAX_BODY_BYTES
                            }},
                            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                        ]
                    }
                }]}]
            })
        })
        .collect();
    json!({"static_resources": {"listeners": listeners}, "admin": admin()})
}

/// `(name, "ip:port")` of every listener in an admin `/listeners?format=json` answer.
pub fn listener_addresses(listeners_json: &Value) -> Vec<(String, String)> {
    listeners_json["listener_statuses"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|l| {
                    let a = &l["local_address"]["socket_address"];
                    Some((
                        l["name"].as_str()?.to_owned(),
                        format!("{}:{}", a["address"].as_str()?, a["port_value"].as_u64()?),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener_of<'a>(config: &'a Value, name: &str) -> &'a Value {
        config["static_resources"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()
    }

    fn cluster_of<'a>(config: &'a Value, name: &str) -> &'a Value {
        config["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
    }

    fn http_filters(listener: &Value) -> &Vec<Value> {
        listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            .as_array()
            .unwrap()
    }

    #[test]
    fn the_matrix_config_has_a_listener_and_a_cluster_per_policy() {
        let config = matrix_config("/x/model_lb.wasm", &[8001, 8002], &Policy::ALL);
        let listeners = config["static_resources"]["listeners"].as_array().unwrap();
        let clusters = config["static_resources"]["clusters"].as_array().unwrap();
        assert_eq!((listeners.len(), clusters.len()), (5, 5));
        for p in Policy::ALL {
            let l = listener_of(&config, p.id());
            assert_eq!(l["address"]["socket_address"]["port_value"], 0);
            assert_eq!(l["address"]["socket_address"]["address"], "127.0.0.1");
            let route = &l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
                ["virtual_hosts"][0]["routes"][0]["route"];
            assert_eq!(route["cluster"], p.id(), "each policy has its own cluster");
            let filters = http_filters(l);
            assert_eq!(filters.len(), if p.uses_filter() { 2 } else { 1 });
            assert_eq!(filters.last().unwrap()["name"], "envoy.filters.http.router");
            let c = cluster_of(&config, p.id());
            let hosts = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
                .as_array()
                .unwrap();
            assert_eq!(hosts.len(), 2);
            assert_eq!(
                hosts[1]["endpoint"]["address"]["socket_address"]["port_value"],
                8002
            );
        }
        assert_eq!(
            config["admin"]["address"]["socket_address"]["port_value"],
            0
        );
    }

    #[test]
    fn each_policy_gets_its_balancer() {
        let config = matrix_config("/x.wasm", &[1], &Policy::ALL);
        let lb = |p: Policy| {
            cluster_of(&config, p.id())["load_balancing_policy"]["policies"][0]
                ["typed_extension_config"]
                .clone()
        };
        assert_eq!(
            lb(Policy::ModelLbLor)["name"],
            "envoy.load_balancing_policies.override_host"
        );
        assert_eq!(
            lb(Policy::ModelLbRandom)["typed_config"]["override_host_sources"][0]["header"],
            ENDPOINT_HEADER
        );
        assert_eq!(
            lb(Policy::RoundRobin)["name"],
            "envoy.load_balancing_policies.round_robin"
        );
        assert!(lb(Policy::LeastRequest)["typed_config"]
            .get("selection_method")
            .is_none());
        assert_eq!(
            lb(Policy::LeastRequestFullScan)["typed_config"]["selection_method"],
            "FULL_SCAN"
        );
    }

    #[test]
    fn the_plugin_configuration_names_its_own_cluster_and_strategy() {
        let config = matrix_config("/x/model_lb.wasm", &[8001, 8002], &Policy::ALL);
        let plugin = |p: Policy| {
            let f = &http_filters(listener_of(&config, p.id()))[0];
            assert_eq!(
                f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"],
                "/x/model_lb.wasm"
            );
            assert_eq!(
                f["typed_config"]["config"]["vm_config"]["vm_id"],
                "model_lb"
            );
            let text = f["typed_config"]["config"]["configuration"]["value"]
                .as_str()
                .unwrap();
            serde_json::from_str::<Value>(text).unwrap()
        };
        let lor = plugin(Policy::ModelLbLor);
        assert_eq!(lor["routing_strategy"], "LEAST_OUTSTANDING_REQUESTS");
        assert_eq!(lor["pool"], "mlb_lor");
        assert_eq!(
            lor["endpoints"],
            json!(["127.0.0.1:8001", "127.0.0.1:8002"])
        );
        let random = plugin(Policy::ModelLbRandom);
        assert_eq!(random["routing_strategy"], "RANDOM");
        assert_eq!(random["pool"], "mlb_random", "counts never mix");
    }

    #[test]
    fn overhead_variants_include_a_noop_wasm_floor_and_lor_without_passive_health() {
        let variants = overhead_variants("/w/noop.wasm", 1);
        let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
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
        let plugin = plugin_config(&variants[6], &[9]);
        assert_eq!(plugin["passive_health"], false);
        assert_eq!(plugin["pool"], "mlb_lor_no_passive");
        let batched = plugin_config(&variants[5], &[9]);
        assert_eq!(batched["release_batching_ms"], 10);
        assert_eq!(batched["routing_strategy"], "LEAST_OUTSTANDING_REQUESTS");
        assert!(plugin_config(&variants[4], &[9])
            .get("release_batching_ms")
            .is_none());
        let config = proxy_config("/w/model_lb.wasm", &[9], &variants);
        assert_eq!(
            config["static_resources"]["listeners"]
                .as_array()
                .unwrap()
                .len(),
            7
        );
        // The floor: the noop module, no model-lb, Envoy's LEAST_REQUEST behind it.
        let noop = http_filters(listener_of(&config, "wasm_noop"));
        assert_eq!(noop.len(), 2);
        let vm = &noop[0]["typed_config"]["config"]["vm_config"];
        assert_eq!(vm["code"]["local"]["filename"], "/w/noop.wasm");
        assert_eq!(vm["vm_id"], "noop");
        assert_eq!(
            cluster_of(&config, "wasm_noop")["load_balancing_policy"],
            lb_policy(Policy::LeastRequest)
        );
        // Every listener spreads its connections exactly over the workers.
        for name in names {
            let l = listener_of(&config, name);
            assert_eq!(l["enable_reuse_port"], false, "{name}");
            assert_eq!(
                l["connection_balance_config"],
                json!({"exact_balance": {}}),
                "{name}"
            );
        }
        // Several workers: the baseline, LOR and LOR with batched releases only.
        let many: Vec<String> = overhead_variants("/w/noop.wasm", 16)
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(many, ["least_request", "mlb_lor", "mlb_lor_batched"]);
        // Plain configs leave the kernel's balancing alone.
        let plain = matrix_config("/x.wasm", &[1], &[Policy::ModelLbLor]);
        assert!(listener_of(&plain, "mlb_lor")
            .get("connection_balance_config")
            .is_none());
    }

    #[test]
    fn prefix_aware_gets_the_hold_filter_in_its_vm_and_hashing_gets_a_hash_policy() {
        let variants = [
            Variant::prefix_aware(4096, 8),
            Variant::of(Policy::RingHash),
            Variant::of(Policy::Maglev),
            Variant::of(Policy::ModelLbLor),
        ];
        let config = proxy_config("/x/model_lb.wasm", &[8001, 8002], &variants);
        let pa = http_filters(listener_of(&config, "mlb_prefix"));
        let names: Vec<&str> = pa.iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["model_lb", "model_lb_hold", "envoy.filters.http.router"],
            "the hold filter right after model_lb"
        );
        let (main, hold) = (
            &pa[0]["typed_config"]["config"],
            &pa[1]["typed_config"]["config"],
        );
        assert_eq!(hold["vm_config"], main["vm_config"], "same VM, same code");
        assert_eq!(hold["vm_config"]["vm_id"], "model_lb");
        assert_eq!(hold["root_id"], "model_lb_hold");
        assert_ne!(hold["name"], main["name"]);
        assert_eq!(hold["configuration"]["value"], "{\"role\": \"hold\"}");
        let plugin: Value =
            serde_json::from_str(main["configuration"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(plugin["routing_strategy"], "PREFIX_AWARE");
        assert_eq!(
            plugin["prefix_aware"],
            json!({"prefix_length": 4096, "concurrency_threshold": 8})
        );
        assert_eq!(
            cluster_of(&config, "mlb_prefix")["load_balancing_policy"]["policies"][0]
                ["typed_extension_config"]["name"],
            "envoy.load_balancing_policies.override_host"
        );
        // LOR: no hold filter, no hash policy.
        assert_eq!(http_filters(listener_of(&config, "mlb_lor")).len(), 2);
        let route = |name: &str| {
            listener_of(&config, name)["filter_chains"][0]["filters"][0]["typed_config"]
                ["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
                .clone()
        };
        assert!(route("mlb_lor").get("hash_policy").is_none());
        for (name, lb) in [
            ("ring_hash", "envoy.load_balancing_policies.ring_hash"),
            ("maglev", "envoy.load_balancing_policies.maglev"),
        ] {
            assert_eq!(
                route(name)["hash_policy"],
                json!([{"header": {"header_name": "x-prefix-key"}}])
            );
            assert_eq!(http_filters(listener_of(&config, name)).len(), 1, "no wasm");
            assert_eq!(
                cluster_of(&config, name)["load_balancing_policy"]["policies"][0]
                    ["typed_extension_config"]["name"],
                lb
            );
        }
        let body = overhead_body_variants();
        assert_eq!(
            body.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["mlb_lor", "mlb_prefix"]
        );
    }

    #[test]
    fn large_backends_are_split_over_processes() {
        assert_eq!(backend_split(4), vec![4]);
        assert_eq!(backend_split(256), vec![256]);
        assert_eq!(backend_split(1024), vec![256, 256, 256, 256]);
        assert_eq!(backend_split(300), vec![256, 44]);
        assert!(backend_split(0).is_empty());
    }

    #[test]
    fn the_fast_backend_answers_on_every_listener() {
        let config = fast_backend_config(256);
        let listeners = config["static_resources"]["listeners"].as_array().unwrap();
        assert_eq!(listeners.len(), 256);
        let routes = &listeners[255]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"][0]["routes"];
        assert_eq!(routes[1]["match"]["prefix"], "/");
        assert_eq!(routes[1]["direct_response"]["status"], 200);
        // It reads a request's whole body before answering (the connection stays reusable).
        let filters = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"]
            .as_array()
            .unwrap();
        assert_eq!(filters[0]["name"], "envoy.filters.http.buffer");
        assert_eq!(
            filters[0]["typed_config"]["max_request_bytes"],
            BACKEND_MAX_BODY_BYTES
        );
        // The poll path answers with vLLM's two gauges, before the catch-all.
        assert_eq!(routes[0]["match"]["path"], "/metrics");
        let text = routes[0]["direct_response"]["body"]["inline_string"]
            .as_str()
            .unwrap();
        assert_eq!(
            text,
            "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        );
    }

    #[test]
    fn server_load_polls_the_pool_cluster_at_the_scaled_interval() {
        assert_eq!(scaled_polling(1.0), (100, 200));
        assert_eq!(scaled_polling(0.5), (50, 400));
        assert_eq!(scaled_polling(0.25), (25, 800));
        assert_eq!(scaled_polling(0.01).0, 10, "the filter's minimum");
        let v = Variant::of(Policy::ModelLbLor).with_server_load(50, 400);
        let plugin = plugin_config(&v, &[8001]);
        assert_eq!(
            plugin["server_load"],
            json!({
                "source": "metrics",
                "path": "/metrics",
                "interval_ms": 50,
                "stale_after_ms": 500,
                "cluster": "mlb_lor",
                "running_metric": "vllm:num_requests_running",
                "waiting_metric": "vllm:num_requests_waiting",
                "max_polls_per_second": 400
            })
        );
        assert!(plugin.get("admin_cluster").is_none());
        // The overhead variant polls as in production.
        let o = plugin_config(&overhead_server_load_variant(), &[1]);
        assert_eq!(o["pool"], "mlb_lor_server_load");
        assert_eq!(o["server_load"]["cluster"], "mlb_lor_server_load");
        assert_eq!(o["server_load"]["interval_ms"], 100);
        assert_eq!(o["server_load"]["max_polls_per_second"], 200);
    }

    #[test]
    fn weights_go_on_the_endpoints_and_the_admin_cluster_points_at_this_envoy() {
        let mut v = Variant::of(Policy::ModelLbLor)
            .with_server_load(50, 400)
            .with_weights(vec![2, 4]);
        v.name = "mlb_lor_w".into();
        let config = proxy_config_with_admin("/x.wasm", &[8001, 8002], &[v], Some(9911));
        assert_eq!(
            config["admin"]["address"]["socket_address"]["port_value"],
            9911
        );
        let c = cluster_of(&config, "mlb_lor_w");
        let hosts = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap();
        assert_eq!(hosts[0]["load_balancing_weight"], 2);
        assert_eq!(hosts[1]["load_balancing_weight"], 4);
        let admin = cluster_of(&config, ADMIN_CLUSTER);
        assert_eq!(
            admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"],
            9911
        );
        let f = &http_filters(listener_of(&config, "mlb_lor_w"))[0];
        let plugin: Value = serde_json::from_str(
            f["typed_config"]["config"]["configuration"]["value"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(plugin["admin_cluster"], ADMIN_CLUSTER);
        assert_eq!(
            plugin["server_load"]["cluster"], "mlb_lor_w",
            "the listener's own cluster, whenever the variant was renamed"
        );
        // Without weights: no admin cluster, no weights.
        let plain = proxy_config("/x.wasm", &[8001], &[Variant::of(Policy::ModelLbLor)]);
        assert_eq!(
            plain["static_resources"]["clusters"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(
            cluster_of(&plain, "mlb_lor")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                .get("load_balancing_weight")
                .is_none()
        );
    }

    #[test]
    fn listener_addresses_come_from_the_admin_api() {
        let answer = json!({"listener_statuses": [
            {"name": "mlb_lor", "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": 41000}}},
            {"name": "broken"}
        ]});
        assert_eq!(
            listener_addresses(&answer),
            vec![("mlb_lor".to_owned(), "127.0.0.1:41000".to_owned())]
        );
        assert!(listener_addresses(&json!({})).is_empty());
    }
}
