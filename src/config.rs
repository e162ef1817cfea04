//! Plugin configuration: parsed once in `on_configure`, validated strictly, and compiled into the
//! values the request path uses. Every error names the offending field and what it accepts,
//! because the only place an operator sees it is one line of Envoy's log.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;

use serde_json::{Map, Value};

use crate::health::PassivePolicy;
use crate::outcome::DEFAULT_MAX_BLAMED_BODY_BYTES;
use crate::prefix::{
    DEFAULT_CONCURRENCY_THRESHOLD, DEFAULT_PREFIX_LENGTH, MAX_CONCURRENCY_THRESHOLD,
    MAX_PREFIX_LENGTH, MIN_PREFIX_LENGTH,
};
use crate::select::Strategy;
use crate::server_load::{
    LoadSource, ServerLoad, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_POLLS_PER_SECOND,
    DEFAULT_RUNNING_METRIC, DEFAULT_SERVER_LOAD_INTERVAL_MS, DEFAULT_SERVER_LOAD_STALE_AFTER_MS,
    DEFAULT_WAITING_METRIC,
};

pub const DEFAULT_ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";
pub const DEFAULT_FALLBACK_ENDPOINTS: usize = 2;
pub const DEFAULT_HOUSEKEEPING_INTERVAL_MS: u64 = 1_000;
pub const DEFAULT_VM_LEASE_TTL_MS: u64 = 10_000;
pub const DEFAULT_FAILURE_THRESHOLD: u64 = 3;
pub const DEFAULT_EJECTION_BASE_MS: u64 = 5_000;
pub const DEFAULT_EJECTION_MAX_MS: u64 = 300_000;
pub const DEFAULT_ADMIN_POLL_INTERVAL_MS: u64 = 2_000;
/// Off by default: counts stay exact, which is what least outstanding requests is for. Folding
/// releases saves two host calls per request but lets other workers see a finished request for
/// up to this long (tests/e2e.rs shows the difference on back-to-back short requests).
pub const DEFAULT_RELEASE_BATCHING_MS: u64 = 0;
const MAX_DURATION_MS: u64 = 3_600_000;

/// More endpoints than this is almost certainly a generated config gone wrong, and the shared
/// table (one read and one write per request) grows with the pool.
pub const MAX_ENDPOINTS: usize = 1_024;
/// The header lists the chosen endpoint plus this many fallbacks at most; Envoy retries rarely
/// go deeper than a handful of attempts.
pub const MAX_FALLBACK_ENDPOINTS: usize = 16;
const MIN_HOUSEKEEPING_INTERVAL_MS: u64 = 50;
const MAX_HOUSEKEEPING_INTERVAL_MS: u64 = 60_000;
/// A lease shorter than three housekeeping intervals would expire between two heartbeats of a
/// healthy but briefly busy worker.
const MIN_LEASE_INTERVALS: u64 = 3;
const MAX_VM_LEASE_TTL_MS: u64 = 3_600_000;
const MAX_CLUSTER_NAME_LEN: usize = 128;
const MAX_BLAMED_BODY_BYTES: u64 = 1 << 30;
/// Settings of passive health; rejected when it is off, so nobody tunes a switched-off feature.
const PASSIVE_HEALTH_FIELDS: [&str; 5] = [
    "failure_threshold",
    "ejection_base_ms",
    "ejection_max_ms",
    "max_blamed_body_bytes",
    "max_ejection_percent",
];
/// Envoy's outlier detection default.
pub const DEFAULT_MAX_EJECTION_PERCENT: u64 = 10;

const FIELDS: &[&str] = &[
    "routing_strategy",
    "endpoints",
    "endpoint_header",
    "pool",
    "envoy_cluster",
    "cluster",
    "fallback_endpoints",
    "housekeeping_interval_ms",
    "vm_lease_ttl_ms",
    "passive_health",
    "failure_threshold",
    "ejection_base_ms",
    "ejection_max_ms",
    "max_blamed_body_bytes",
    "max_ejection_percent",
    "admin_cluster",
    "admin_poll_interval_ms",
    "watch_cluster",
    "follow_membership",
    "server_load",
    "prefix_aware",
    "release_batching_ms",
];

const PREFIX_AWARE_FIELDS: &[&str] = &["prefix_length", "concurrency_threshold"];

const SERVER_LOAD_FIELDS: &[&str] = &[
    "source",
    "path",
    "interval_ms",
    "stale_after_ms",
    "cluster",
    "running_metric",
    "waiting_metric",
    "response_reports",
    "max_polls_per_second",
    "max_body_bytes",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub strategy: Strategy,
    /// Canonical `ip:port` strings, exactly as Envoy prints a host's address.
    pub endpoints: Vec<String>,
    pub endpoint_header: String,
    /// Names the shared counters and the stats; filters that name the same pool share counts.
    pub pool: String,
    /// Configuration fields that were given under a deprecated name, for one log line each.
    pub deprecated: Vec<&'static str>,
    pub fallback_endpoints: usize,
    pub housekeeping_interval_ms: u64,
    pub vm_lease_ttl_ms: u64,
    /// Passive ejection of endpoints that keep failing; `None` when `passive_health` is false.
    pub passive: Option<PassivePolicy>,
    /// Polling of Envoy's admin API for health (and membership); `None` without `admin_cluster`.
    pub admin: Option<AdminPoll>,
    /// The servers' own load reports; `None` without `server_load`.
    pub server_load: Option<ServerLoad>,
    /// `PREFIX_AWARE`'s parameters; `Some` exactly when that is the strategy.
    pub prefix_aware: Option<PrefixAware>,
    /// Releases ride on the VM's next routing write, or are written within this many ms;
    /// 0 writes each at once.
    pub release_batching_ms: u64,
}

/// SageMaker's `PrefixAwareRoutingConfig`, same names, ranges and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixAware {
    /// Characters of the conversation (or prompt, or bytes of a raw body) that form the key.
    pub prefix_length: usize,
    /// Requests in flight at which an endpoint no longer takes its keys.
    pub concurrency_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminPoll {
    /// The Envoy cluster that points at Envoy's own admin listener.
    pub admin_cluster: String,
    pub interval_ms: u64,
    /// The Envoy cluster whose hosts are the pool, as named in admin `/clusters`.
    pub envoy_cluster: String,
    /// Take the pool's endpoints from the watched cluster instead of `endpoints`.
    pub follow_membership: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The JSON field at fault, or `None` when the document itself is wrong.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn document(message: impl Into<String>) -> Self {
        Self {
            field: None,
            message: message.into(),
        }
    }

    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field \"{field}\": {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// What a plugin configuration sets up: the filter itself, or the small companion that holds a
/// `PREFIX_AWARE` request's headers until the filter has read the prompt from the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plugin {
    Router(Box<Config>),
    /// `{"role": "hold"}`.
    Hold,
}

/// The configuration of the hold filter, exactly.
pub const HOLD_CONFIGURATION: &str = r#"{"role": "hold"}"#;

pub fn parse_plugin(bytes: Option<&[u8]>) -> Result<Plugin, ConfigError> {
    let role = bytes
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| v.get("role").cloned());
    match role {
        None => parse(bytes).map(|c| Plugin::Router(Box::new(c))),
        Some(Value::String(role)) if role == "hold" => {
            let fields = bytes
                .and_then(|b| serde_json::from_slice::<Map<String, Value>>(b).ok())
                .map_or(0, |m| m.len());
            if fields == 1 {
                Ok(Plugin::Hold)
            } else {
                Err(ConfigError::field(
                    "role",
                    format!("the hold filter takes no other field; use {HOLD_CONFIGURATION}"),
                ))
            }
        }
        Some(other) => Err(ConfigError::field(
            "role",
            format!(
                "unknown role {}; the only role is \"hold\" ({HOLD_CONFIGURATION}), for the \
                 filter that holds PREFIX_AWARE requests; the main filter has no role field",
                truncate(&other.to_string(), 40)
            ),
        )),
    }
}

/// Parses the plugin configuration bytes Envoy hands to `on_configure`.
pub fn parse(bytes: Option<&[u8]>) -> Result<Config, ConfigError> {
    let bytes = match bytes {
        Some(b) if !b.iter().all(u8::is_ascii_whitespace) => b,
        _ => {
            return Err(ConfigError::document(
                "configuration is empty; expected a JSON object such as \
                 {\"endpoints\": [\"10.0.0.1:8000\", \"10.0.0.2:8000\"]}",
            ))
        }
    };
    let document: Value = serde_json::from_slice(bytes)
        .map_err(|e| ConfigError::document(format!("configuration is not valid JSON: {e}")))?;
    let Value::Object(object) = document else {
        return Err(ConfigError::document(format!(
            "configuration must be a JSON object, got {}",
            type_name(&document)
        )));
    };
    from_object(&object)
}

fn from_object(object: &Map<String, Value>) -> Result<Config, ConfigError> {
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ConfigError::field(
            truncate(unknown, 40),
            unknown_field_message(unknown, FIELDS),
        ));
    }

    let strategy = match object.get("routing_strategy") {
        None => Strategy::LeastOutstandingRequests,
        Some(value) => {
            let name = string_field("routing_strategy", value)?;
            Strategy::from_name(name).ok_or_else(|| {
                ConfigError::field(
                    "routing_strategy",
                    format!(
                        "unknown strategy \"{}\"; expected one of {}",
                        truncate(name, 80),
                        Strategy::NAMES.map(|n| format!("\"{n}\"")).join(", ")
                    ),
                )
            })?
        }
    };

    let follow_membership = match object.get("follow_membership") {
        None => false,
        Some(value) => bool_field("follow_membership", value)?,
    };
    let endpoints = match (object.get("endpoints"), follow_membership) {
        (None, true) => Vec::new(),
        (value, _) => endpoints_field(value)?,
    };

    let endpoint_header = match object.get("endpoint_header") {
        None => DEFAULT_ENDPOINT_HEADER.to_owned(),
        Some(value) => header_name_field("endpoint_header", value)?,
    };

    let mut deprecated = Vec::new();
    let envoy_cluster = match aliased(object, "envoy_cluster", "watch_cluster", &mut deprecated)? {
        None => None,
        Some((field, value)) => Some(envoy_cluster_field(field, value)?),
    };
    // Checked last, so a config with a wrong field and no pool hears about the wrong field.
    let pool_name: Option<String> = match aliased(object, "pool", "cluster", &mut deprecated)? {
        Some((field, value)) => Some(cluster_field(field, value)?),
        // The Envoy cluster's name, made fit for a stat name.
        None => envoy_cluster.as_ref().map(|name| {
            name.chars()
                .take(MAX_CLUSTER_NAME_LEN)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        }),
    };
    let pool = pool_name.clone().unwrap_or_default();

    let fallback_endpoints = match object.get("fallback_endpoints") {
        None => DEFAULT_FALLBACK_ENDPOINTS,
        Some(value) => integer_field(
            "fallback_endpoints",
            value,
            0,
            MAX_FALLBACK_ENDPOINTS as u64,
        )? as usize,
    };

    let housekeeping_interval_ms = match object.get("housekeeping_interval_ms") {
        None => DEFAULT_HOUSEKEEPING_INTERVAL_MS,
        Some(value) => integer_field(
            "housekeeping_interval_ms",
            value,
            MIN_HOUSEKEEPING_INTERVAL_MS,
            MAX_HOUSEKEEPING_INTERVAL_MS,
        )?,
    };

    let min_lease = housekeeping_interval_ms * MIN_LEASE_INTERVALS;
    let vm_lease_ttl_ms = match object.get("vm_lease_ttl_ms") {
        None => DEFAULT_VM_LEASE_TTL_MS.max(min_lease),
        Some(value) => {
            let ttl = integer_field("vm_lease_ttl_ms", value, 1, MAX_VM_LEASE_TTL_MS)?;
            if ttl < min_lease {
                return Err(ConfigError::field(
                    "vm_lease_ttl_ms",
                    format!(
                        "{ttl} is shorter than {MIN_LEASE_INTERVALS} housekeeping intervals \
                         ({min_lease} ms); a busy but healthy worker would lose its lease"
                    ),
                ));
            }
            ttl
        }
    };

    let passive_health = match object.get("passive_health") {
        None => true,
        Some(value) => bool_field("passive_health", value)?,
    };
    if !passive_health {
        if let Some(dependent) = PASSIVE_HEALTH_FIELDS
            .iter()
            .find(|f| object.contains_key(**f))
        {
            return Err(ConfigError::field(
                *dependent,
                "has no effect with \"passive_health\": false; remove it or enable passive_health",
            ));
        }
    }
    let failure_threshold = match object.get("failure_threshold") {
        None => DEFAULT_FAILURE_THRESHOLD,
        Some(value) => integer_field("failure_threshold", value, 1, 1_000)?,
    };
    let base_ejection_ms = match object.get("ejection_base_ms") {
        None => DEFAULT_EJECTION_BASE_MS,
        Some(value) => integer_field("ejection_base_ms", value, 100, MAX_DURATION_MS)?,
    };
    let max_ejection_ms = match object.get("ejection_max_ms") {
        None => DEFAULT_EJECTION_MAX_MS.max(base_ejection_ms),
        // At least the base: the range in the error message says so.
        Some(value) => integer_field("ejection_max_ms", value, base_ejection_ms, MAX_DURATION_MS)?,
    };
    let max_blamed_body_bytes = match object.get("max_blamed_body_bytes") {
        None => DEFAULT_MAX_BLAMED_BODY_BYTES,
        Some(value) => integer_field("max_blamed_body_bytes", value, 0, MAX_BLAMED_BODY_BYTES)?,
    };
    let max_ejection_percent = match object.get("max_ejection_percent") {
        None => DEFAULT_MAX_EJECTION_PERCENT,
        Some(value) => integer_field("max_ejection_percent", value, 1, 100)?,
    };
    let passive = passive_health.then_some(PassivePolicy {
        failure_threshold: failure_threshold as u16,
        base_ejection_ms,
        max_ejection_ms,
        max_blamed_body_bytes,
        max_ejection_percent: max_ejection_percent as u8,
    });

    let admin = match object.get("admin_cluster") {
        None => {
            for dependent in ["admin_poll_interval_ms"] {
                if object.contains_key(dependent) {
                    return Err(ConfigError::field(
                        dependent,
                        "has no effect without \"admin_cluster\"; set admin_cluster to the Envoy \
                         cluster that points at Envoy's admin listener",
                    ));
                }
            }
            if follow_membership {
                return Err(ConfigError::field(
                    "follow_membership",
                    "needs \"admin_cluster\" (the pool's members are read from Envoy's admin API)",
                ));
            }
            None
        }
        Some(value) => {
            let admin_cluster = envoy_cluster_field("admin_cluster", value)?;
            let interval_ms = match object.get("admin_poll_interval_ms") {
                None => DEFAULT_ADMIN_POLL_INTERVAL_MS.max(housekeeping_interval_ms),
                Some(value) => {
                    let interval =
                        integer_field("admin_poll_interval_ms", value, 100, MAX_DURATION_MS)?;
                    if interval < housekeeping_interval_ms {
                        return Err(ConfigError::field(
                            "admin_poll_interval_ms",
                            format!(
                                "{interval} is shorter than housekeeping_interval_ms \
                                 ({housekeeping_interval_ms}); polls run on the housekeeping tick"
                            ),
                        ));
                    }
                    interval
                }
            };
            Some(AdminPoll {
                admin_cluster,
                interval_ms,
                envoy_cluster: envoy_cluster.clone().unwrap_or_else(|| pool.clone()),
                follow_membership,
            })
        }
    };

    let server_load = match object.get("server_load") {
        None => None,
        Some(value) => {
            let pool_cluster = envoy_cluster.as_ref().unwrap_or(&pool);
            Some(server_load_field(value, pool_cluster)?)
        }
    };

    let prefix_aware = match (strategy, object.get("prefix_aware")) {
        (Strategy::PrefixAware, value) => Some(prefix_aware_field(value)?),
        (_, None) => None,
        (_, Some(_)) => {
            return Err(ConfigError::field(
                "prefix_aware",
                "has no effect unless \"routing_strategy\" is \"PREFIX_AWARE\"",
            ))
        }
    };

    let release_batching_ms = match object.get("release_batching_ms") {
        None => DEFAULT_RELEASE_BATCHING_MS,
        Some(value) => integer_field("release_batching_ms", value, 0, 1_000)?,
    };

    if pool_name.is_none() {
        return Err(ConfigError::field(
            "pool",
            "required; name the pool (normally after its Envoy cluster, e.g. \
             \"model_servers\"): filters naming the same pool share their counts, so two \
             pools must not share a name. Or give \"envoy_cluster\"",
        ));
    }

    Ok(Config {
        strategy,
        endpoints,
        endpoint_header,
        pool,
        deprecated,
        fallback_endpoints,
        housekeeping_interval_ms,
        vm_lease_ttl_ms,
        passive,
        admin,
        server_load,
        prefix_aware,
        release_batching_ms,
    })
}

fn prefix_aware_field(value: Option<&Value>) -> Result<PrefixAware, ConfigError> {
    const PREFIX: &str = "prefix_aware";
    let empty = Map::new();
    let object = match value {
        None => &empty,
        Some(Value::Object(object)) => object,
        Some(other) => {
            return Err(ConfigError::field(
                PREFIX,
                format!(
                    "expected an object such as {{\"prefix_length\": 4096, \
                     \"concurrency_threshold\": 8}}, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !PREFIX_AWARE_FIELDS.contains(&k.as_str()))
    {
        return Err(ConfigError::field(
            format!("{PREFIX}.{}", truncate(unknown, 40)),
            unknown_field_message(unknown, PREFIX_AWARE_FIELDS),
        ));
    }
    let prefix_length = match object.get("prefix_length") {
        None => DEFAULT_PREFIX_LENGTH,
        Some(value) => integer_field(
            "prefix_aware.prefix_length",
            value,
            MIN_PREFIX_LENGTH as u64,
            MAX_PREFIX_LENGTH as u64,
        )? as usize,
    };
    let concurrency_threshold = match object.get("concurrency_threshold") {
        None => DEFAULT_CONCURRENCY_THRESHOLD,
        Some(value) => integer_field(
            "prefix_aware.concurrency_threshold",
            value,
            1,
            u64::from(MAX_CONCURRENCY_THRESHOLD),
        )? as u32,
    };
    Ok(PrefixAware {
        prefix_length,
        concurrency_threshold,
    })
}

fn server_load_field(value: &Value, pool_cluster: &str) -> Result<ServerLoad, ConfigError> {
    const PREFIX: &str = "server_load";
    let Value::Object(object) = value else {
        return Err(ConfigError::field(
            PREFIX,
            format!(
                "expected an object such as {{\"source\": \"metrics\"}}, got {}",
                type_name(value)
            ),
        ));
    };
    let name = |field: &str| format!("{PREFIX}.{field}");
    if let Some(unknown) = object
        .keys()
        .find(|k| !SERVER_LOAD_FIELDS.contains(&k.as_str()))
    {
        return Err(ConfigError::field(
            name(&truncate(unknown, 40)),
            unknown_field_message(unknown, SERVER_LOAD_FIELDS),
        ));
    }
    let source = match object.get("source") {
        None => LoadSource::Metrics,
        Some(value) => {
            let text = string_field(&name("source"), value)?;
            LoadSource::from_name(text).ok_or_else(|| {
                ConfigError::field(
                    name("source"),
                    format!(
                        "unknown source \"{}\"; expected \"metrics\" (Prometheus text, e.g. vLLM's \
                         /metrics) or \"load_endpoint\" (vLLM's GET /load)",
                        truncate(text, 80)
                    ),
                )
            })?
        }
    };
    if source == LoadSource::LoadEndpoint {
        for metric in ["running_metric", "waiting_metric"] {
            if object.contains_key(metric) {
                return Err(ConfigError::field(
                    name(metric),
                    "has no effect with \"source\": \"load_endpoint\" (GET /load reports one \
                     number); remove it or use \"source\": \"metrics\"",
                ));
            }
        }
    }
    let path = match object.get("path") {
        None => source.default_path().to_owned(),
        Some(value) => {
            let path = string_field(&name("path"), value)?;
            let valid = path.starts_with('/')
                && path.len() <= 1024
                && path.bytes().all(|b| b.is_ascii_graphic());
            if !valid {
                return Err(ConfigError::field(
                    name("path"),
                    format!(
                        "\"{}\" is not a request path; give one starting with '/', such as \"{}\"",
                        truncate(path, 80),
                        source.default_path()
                    ),
                ));
            }
            path.to_owned()
        }
    };
    let interval_ms = match object.get("interval_ms") {
        None => DEFAULT_SERVER_LOAD_INTERVAL_MS,
        Some(value) => integer_field(&name("interval_ms"), value, 10, 60_000)?,
    };
    let min_stale = interval_ms * 2;
    let stale_after_ms = match object.get("stale_after_ms") {
        None => DEFAULT_SERVER_LOAD_STALE_AFTER_MS.max(min_stale),
        Some(value) => {
            let stale = integer_field(&name("stale_after_ms"), value, 1, MAX_DURATION_MS)?;
            if stale < min_stale {
                return Err(ConfigError::field(
                    name("stale_after_ms"),
                    format!(
                        "{stale} is shorter than two poll intervals ({min_stale} ms); every report \
                         would go stale before the next one arrives"
                    ),
                ));
            }
            stale
        }
    };
    let cluster = match object.get("cluster") {
        None => pool_cluster.to_owned(),
        Some(value) => envoy_cluster_field(&name("cluster"), value)?,
    };
    let metric = |field: &str, default: &str| -> Result<String, ConfigError> {
        match object.get(field) {
            None => Ok(default.to_owned()),
            Some(value) => {
                let text = string_field(&name(field), value)?;
                if is_metric_name(text) {
                    Ok(text.to_owned())
                } else {
                    Err(ConfigError::field(
                        name(field),
                        format!(
                            "\"{}\" is not a Prometheus metric name (letters, digits, '_' and ':', \
                             e.g. \"{default}\")",
                            truncate(text, 80)
                        ),
                    ))
                }
            }
        }
    };
    let running_metric = metric("running_metric", DEFAULT_RUNNING_METRIC)?;
    let waiting_metric = metric("waiting_metric", DEFAULT_WAITING_METRIC)?;
    let response_reports = match object.get("response_reports") {
        None => false,
        Some(value) => bool_field(&name("response_reports"), value)?,
    };
    let max_polls_per_second = match object.get("max_polls_per_second") {
        None => DEFAULT_MAX_POLLS_PER_SECOND,
        Some(value) => integer_field(&name("max_polls_per_second"), value, 1, 100_000)?,
    };
    let max_body_bytes = match object.get("max_body_bytes") {
        None => DEFAULT_MAX_BODY_BYTES,
        Some(value) => integer_field(&name("max_body_bytes"), value, 256, 16 << 20)?,
    };
    Ok(ServerLoad {
        source,
        path,
        interval_ms,
        stale_after_ms,
        cluster,
        running_metric,
        waiting_metric,
        response_reports,
        max_polls_per_second: max_polls_per_second as u32,
        max_body_bytes: max_body_bytes as usize,
    })
}

fn is_metric_name(text: &str) -> bool {
    let mut chars = text.chars();
    let valid_rest = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    text.len() <= 200
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(valid_rest)
}

/// A field that was renamed: the new name, or the old one (noted in `deprecated`), not both.
fn aliased<'a>(
    object: &'a Map<String, Value>,
    name: &'static str,
    old_name: &'static str,
    deprecated: &mut Vec<&'static str>,
) -> Result<Option<(&'static str, &'a Value)>, ConfigError> {
    match (object.get(name), object.get(old_name)) {
        (Some(_), Some(_)) => Err(ConfigError::field(
            old_name,
            format!("is the old name of \"{name}\"; give only \"{name}\""),
        )),
        (Some(value), None) => Ok(Some((name, value))),
        (None, Some(value)) => {
            deprecated.push(old_name);
            Ok(Some((old_name, value)))
        }
        (None, None) => Ok(None),
    }
}

/// The new name of a deprecated field, for the log line.
pub fn renamed(old_name: &str) -> &'static str {
    match old_name {
        "cluster" => "pool",
        "watch_cluster" => "envoy_cluster",
        _ => "",
    }
}

fn endpoints_field(value: Option<&Value>) -> Result<Vec<String>, ConfigError> {
    const FIELD: &str = "endpoints";
    let Some(value) = value else {
        return Err(ConfigError::field(
            FIELD,
            "required; list the pool's endpoints as \"ip:port\" strings, \
             exactly as in the Envoy cluster",
        ));
    };
    let Value::Array(items) = value else {
        return Err(ConfigError::field(
            FIELD,
            format!(
                "expected an array of \"ip:port\" strings, got {}",
                type_name(value)
            ),
        ));
    };
    if items.is_empty() {
        return Err(ConfigError::field(
            FIELD,
            "is empty; list at least one \"ip:port\"",
        ));
    }
    if items.len() > MAX_ENDPOINTS {
        return Err(ConfigError::field(
            FIELD,
            format!(
                "has {} entries; at most {MAX_ENDPOINTS} are supported",
                items.len()
            ),
        ));
    }
    let mut seen = HashSet::with_capacity(items.len());
    let mut endpoints = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("{FIELD}[{i}]");
        let text = string_field(&field, item)?;
        let address = parse_endpoint(text).map_err(|why| ConfigError::field(&field, why))?;
        if !seen.insert(address.clone()) {
            return Err(ConfigError::field(
                &field,
                format!("\"{text}\" is listed twice; each endpoint may appear once"),
            ));
        }
        endpoints.push(address);
    }
    Ok(endpoints)
}

/// Returns the address in the form Envoy prints a host (`1.2.3.4:80`, `[::1]:80`), because the
/// override_host policy matches the header against that string.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let address: SocketAddr = text.parse().map_err(|_| {
        format!(
            "\"{}\" is not an \"ip:port\" address (IPv4 like 10.0.0.1:8000 or IPv6 like \
             [fd00::1]:8000; host names are not allowed because Envoy matches hosts by address)",
            truncate(text, 80)
        )
    })?;
    if address.port() == 0 {
        return Err(format!(
            "\"{text}\" has port 0; give the port the backend listens on"
        ));
    }
    if address.ip().is_unspecified() {
        return Err(format!(
            "\"{text}\" is an unspecified address; give the backend's own address"
        ));
    }
    Ok(address.to_string())
}

fn header_name_field(field: &str, value: &Value) -> Result<String, ConfigError> {
    let name = string_field(field, value)?;
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if name.is_empty() || name.len() > 128 || !name.chars().all(valid_char) {
        return Err(ConfigError::field(
            field,
            format!(
                "\"{}\" is not a valid header name; use 1-128 lowercase letters, digits, '-', '_' \
                 or '.' (default \"{DEFAULT_ENDPOINT_HEADER}\")",
                truncate(name, 80)
            ),
        ));
    }
    const RESERVED: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "keep-alive",
        "proxy-connection",
    ];
    if RESERVED.contains(&name) {
        return Err(ConfigError::field(
            field,
            format!("\"{name}\" is an HTTP header Envoy manages itself; pick a dedicated name"),
        ));
    }
    Ok(name.to_owned())
}

fn cluster_field(field: &str, value: &Value) -> Result<String, ConfigError> {
    let name = string_field(field, value)?;
    let valid_char = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if name.is_empty() || name.len() > MAX_CLUSTER_NAME_LEN || !name.chars().all(valid_char) {
        return Err(ConfigError::field(
            field,
            format!(
                "\"{}\" is not a usable name; use 1-{MAX_CLUSTER_NAME_LEN} letters, digits, \
                 '-', '_' or '.' (normally the Envoy cluster's name)",
                truncate(name, 80)
            ),
        ));
    }
    Ok(name.to_owned())
}

/// Envoy cluster names are free-form (Istio's contain `|`); only control characters and sheer
/// length are refused.
fn envoy_cluster_field(field: &str, value: &Value) -> Result<String, ConfigError> {
    let name = string_field(field, value)?;
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(ConfigError::field(
            field,
            format!(
                "\"{}\" is not a usable Envoy cluster name (1-256 printable characters)",
                truncate(name, 80)
            ),
        ));
    }
    Ok(name.to_owned())
}

fn bool_field(field: &str, value: &Value) -> Result<bool, ConfigError> {
    value.as_bool().ok_or_else(|| {
        ConfigError::field(
            field,
            format!("expected true or false, got {}", type_name(value)),
        )
    })
}

fn string_field<'a>(field: &str, value: &'a Value) -> Result<&'a str, ConfigError> {
    value.as_str().ok_or_else(|| {
        ConfigError::field(
            field,
            format!("expected a string, got {}", type_name(value)),
        )
    })
}

fn integer_field(field: &str, value: &Value, min: u64, max: u64) -> Result<u64, ConfigError> {
    match value.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::field(
            field,
            format!(
                "expected an integer from {min} to {max}, got {}",
                truncate(&value.to_string(), 40)
            ),
        )),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A typo gets a suggestion; anything else gets the list, so the fix is in the log line itself.
fn unknown_field_message(unknown: &str, known: &[&str]) -> String {
    let closest = known
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .min()
        .filter(|(distance, _)| *distance <= 3);
    match closest {
        Some((_, suggestion)) => format!("unknown field; did you mean \"{suggestion}\"?"),
        // Bounded, so a hostile config's log line stays short however many fields there are.
        None => format!(
            "unknown field; known: {} (README, \"Configuration\")",
            truncate(&known.join(", "), 240)
        ),
    }
}

/// Levenshtein distance, cut short for long inputs: only near misses matter here.
fn edit_distance(a: &str, b: &str) -> usize {
    if a.len() > 64 || b.len() > 64 {
        return usize::MAX;
    }
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Hostile configs can carry megabyte-long strings; a log line should not.
fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text`, naming a pool when it names none (most tests are about other fields).
    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        let names_pool = ["\"pool\"", "\"cluster\"", "envoy_cluster", "watch_cluster"]
            .iter()
            .any(|f| text.contains(f));
        match text.strip_prefix('{') {
            Some(rest) if !names_pool && text.trim_end().ends_with('}') => {
                let separator = if rest.trim_start().starts_with('}') {
                    ""
                } else {
                    ", "
                };
                parse(Some(
                    format!(r#"{{"pool": "p"{separator}{rest}"#).as_bytes(),
                ))
            }
            _ => parse(Some(text.as_bytes())),
        }
    }

    fn error_of(text: &str) -> ConfigError {
        match parse_str(text) {
            Ok(config) => panic!("expected an error for {text}, got {config:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse_str(r#"{"endpoints": ["10.0.0.1:8000", "10.0.0.2:8000"]}"#).unwrap();
        assert_eq!(config.strategy, Strategy::LeastOutstandingRequests);
        assert_eq!(config.endpoints, vec!["10.0.0.1:8000", "10.0.0.2:8000"]);
        assert_eq!(config.endpoint_header, "x-gateway-destination-endpoint");
        assert_eq!(config.pool, "p");
        assert!(config.deprecated.is_empty());
        assert_eq!(config.fallback_endpoints, 2);
        assert_eq!(config.housekeeping_interval_ms, 1_000);
        assert_eq!(config.vm_lease_ttl_ms, 10_000);
        assert_eq!(
            config.passive,
            Some(PassivePolicy {
                failure_threshold: 3,
                base_ejection_ms: 5_000,
                max_ejection_ms: 300_000,
                max_blamed_body_bytes: 65_536,
                max_ejection_percent: 10,
            })
        );
        assert_eq!(config.admin, None);
        assert_eq!(config.server_load, None);
        assert_eq!(config.prefix_aware, None);
    }

    #[test]
    fn the_hold_filter_has_one_configuration() {
        assert_eq!(parse_plugin(Some(br#"{"role": "hold"}"#)), Ok(Plugin::Hold));
        assert!(matches!(
            parse_plugin(Some(br#"{"pool": "p", "endpoints": ["1.1.1.1:1"]}"#)),
            Ok(Plugin::Router(_))
        ));
        for bad in [
            r#"{"role": "gate"}"#,
            r#"{"role": "hold", "endpoints": []}"#,
            r#"{"role": 1}"#,
        ] {
            let err = parse_plugin(Some(bad.as_bytes())).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("role"), "{bad}: {err}");
        }
    }

    #[test]
    fn prefix_aware_takes_sagemakers_parameters_and_ranges() {
        let config =
            parse_str(r#"{"endpoints": ["10.0.0.1:80"], "routing_strategy": "PREFIX_AWARE"}"#)
                .unwrap();
        assert_eq!(config.strategy, Strategy::PrefixAware);
        assert_eq!(
            config.prefix_aware,
            Some(PrefixAware {
                prefix_length: 4_096,
                concurrency_threshold: 8
            })
        );
        let config = parse_str(
            r#"{"endpoints": ["10.0.0.1:80"], "routing_strategy": "PREFIX_AWARE",
                "prefix_aware": {"prefix_length": 65536, "concurrency_threshold": 1024}}"#,
        )
        .unwrap();
        assert_eq!(config.prefix_aware.unwrap().prefix_length, 65_536);
        let cases: &[(&str, &str, &str)] = &[
            (
                r#""routing_strategy": "PREFIX_AWARE", "prefix_aware": {"prefix_length": 1023}"#,
                "prefix_aware.prefix_length",
                "integer from 1024 to 65536",
            ),
            (
                r#""routing_strategy": "PREFIX_AWARE", "prefix_aware": {"concurrency_threshold": 0}"#,
                "prefix_aware.concurrency_threshold",
                "integer from 1 to 1024",
            ),
            (
                r#""routing_strategy": "PREFIX_AWARE", "prefix_aware": {"PrefixLength": 2048}"#,
                "prefix_aware.PrefixLength",
                "did you mean \"prefix_length\"",
            ),
            (
                r#""routing_strategy": "PREFIX_AWARE", "prefix_aware": 4096"#,
                "prefix_aware",
                "expected an object",
            ),
            (
                r#""prefix_aware": {"prefix_length": 2048}"#,
                "prefix_aware",
                "has no effect unless",
            ),
        ];
        for (fields, field, hint) in cases {
            let text = format!(r#"{{"endpoints": ["1.1.1.1:1"], {fields}}}"#);
            let err = error_of(&text);
            assert_eq!(err.field.as_deref(), Some(*field), "{text}: {err}");
            assert!(err.to_string().contains(hint), "{text}: {err} lacks {hint}");
        }
    }

    #[test]
    fn health_and_admin_polling_can_be_configured() {
        let config = parse_str(
            r#"{"cluster": "pool", "follow_membership": true, "admin_cluster": "admin",
                "watch_cluster": "outbound|8000||vllm.ns.svc.cluster.local",
                "admin_poll_interval_ms": 1500, "passive_health": true,
                "failure_threshold": 5, "ejection_base_ms": 1000, "ejection_max_ms": 1000}"#,
        )
        .unwrap();
        assert!(
            config.endpoints.is_empty(),
            "members come from the admin API"
        );
        assert_eq!(
            config.admin,
            Some(AdminPoll {
                admin_cluster: "admin".into(),
                interval_ms: 1_500,
                envoy_cluster: "outbound|8000||vllm.ns.svc.cluster.local".into(),
                follow_membership: true,
            })
        );
        assert_eq!(config.passive.unwrap().failure_threshold, 5);
        let config =
            parse_str(r#"{"endpoints": ["1.1.1.1:1"], "cluster": "c", "admin_cluster": "a", "passive_health": false}"#)
                .unwrap();
        assert_eq!(config.passive, None);
        let admin = config.admin.unwrap();
        assert_eq!(
            (admin.envoy_cluster.as_str(), admin.interval_ms),
            ("c", 2_000)
        );
        assert!(!admin.follow_membership);
    }

    #[test]
    fn every_field_can_be_set() {
        let config = parse_str(
            r#"{"routing_strategy": "RANDOM", "endpoints": ["[fd00::1]:9000"],
                "endpoint_header": "x-pick", "cluster": "llama.pool-1",
                "fallback_endpoints": 0, "housekeeping_interval_ms": 200,
                "vm_lease_ttl_ms": 600}"#,
        )
        .unwrap();
        assert_eq!(config.strategy, Strategy::Random);
        assert_eq!(config.endpoints, vec!["[fd00::1]:9000"]);
        assert_eq!(config.endpoint_header, "x-pick");
        assert_eq!(config.pool, "llama.pool-1");
        assert_eq!(config.deprecated, vec!["cluster"]);
        assert_eq!(config.fallback_endpoints, 0);
        assert_eq!(config.housekeeping_interval_ms, 200);
        assert_eq!(config.vm_lease_ttl_ms, 600);
    }

    #[test]
    fn server_load_has_vllm_defaults_and_takes_every_documented_field() {
        let config =
            parse_str(r#"{"endpoints": ["10.0.0.1:80"], "cluster": "pool", "server_load": {}}"#)
                .unwrap();
        assert_eq!(
            config.server_load,
            Some(ServerLoad {
                source: LoadSource::Metrics,
                path: "/metrics".into(),
                interval_ms: 100,
                stale_after_ms: 1_000,
                cluster: "pool".into(),
                running_metric: "vllm:num_requests_running".into(),
                waiting_metric: "vllm:num_requests_waiting".into(),
                response_reports: false,
                max_polls_per_second: 200,
                max_body_bytes: 1 << 20,
            })
        );
        let config = parse_str(
            r#"{"endpoints": ["10.0.0.1:80"], "admin_cluster": "admin",
                "watch_cluster": "outbound|8000||vllm", "server_load": {"source": "load_endpoint",
                "interval_ms": 1000, "response_reports": true, "max_polls_per_second": 50,
                "max_body_bytes": 4096}}"#,
        )
        .unwrap();
        let load = config.server_load.unwrap();
        assert_eq!(load.source, LoadSource::LoadEndpoint);
        assert_eq!(load.path, "/load");
        assert_eq!(load.stale_after_ms, 2_000, "at least two intervals");
        assert_eq!(
            load.cluster, "outbound|8000||vllm",
            "the watched pool cluster"
        );
        assert!(load.response_reports);
        let config = parse_str(
            r#"{"endpoints": ["10.0.0.1:80"], "pool": "p", "server_load": {"cluster": "polls",
                "path": "/v1/loads", "running_metric": "sglang:num_running_reqs",
                "waiting_metric": "sglang:num_queue_reqs", "stale_after_ms": 500,
                "interval_ms": 50}}"#,
        )
        .unwrap();
        let load = config.server_load.unwrap();
        assert_eq!(
            (
                load.cluster.as_str(),
                load.path.as_str(),
                load.running_metric.as_str()
            ),
            ("polls", "/v1/loads", "sglang:num_running_reqs")
        );
    }

    #[test]
    fn server_load_errors_name_the_nested_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#""server_load": true"#,
                "server_load",
                "expected an object",
            ),
            (
                r#""server_load": {"intervall_ms": 100}"#,
                "server_load.intervall_ms",
                "did you mean \"interval_ms\"",
            ),
            (
                r#""server_load": {"source": "prometheus"}"#,
                "server_load.source",
                "\"metrics\"",
            ),
            (
                r#""server_load": {"interval_ms": 5}"#,
                "server_load.interval_ms",
                "integer from 10 to 60000",
            ),
            (
                r#""server_load": {"interval_ms": 500, "stale_after_ms": 600}"#,
                "server_load.stale_after_ms",
                "shorter than two poll intervals",
            ),
            (
                r#""server_load": {"path": "metrics"}"#,
                "server_load.path",
                "starting with '/'",
            ),
            (
                r#""server_load": {"running_metric": "vllm num running"}"#,
                "server_load.running_metric",
                "not a Prometheus metric name",
            ),
            (
                r#""server_load": {"source": "load_endpoint", "waiting_metric": "x"}"#,
                "server_load.waiting_metric",
                "has no effect",
            ),
            (
                r#""server_load": {"max_body_bytes": 10}"#,
                "server_load.max_body_bytes",
                "integer from 256",
            ),
            (
                r#""server_load": {"response_reports": "yes"}"#,
                "server_load.response_reports",
                "expected true or false",
            ),
        ];
        for (fields, field, hint) in cases {
            let text = format!(r#"{{"endpoints": ["1.1.1.1:1"], {fields}}}"#);
            let err = error_of(&text);
            assert_eq!(err.field.as_deref(), Some(*field), "{text}: {err}");
            assert!(err.to_string().contains(hint), "{text}: {err} lacks {hint}");
        }
    }

    #[test]
    fn pools_are_named_explicitly_or_after_their_envoy_cluster() {
        let err = parse(Some(br#"{"endpoints": ["10.0.0.1:1"]}"#)).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("pool"));
        assert!(err.message.contains("required"), "{err}");
        let config = parse(Some(
            br#"{"endpoints": ["10.0.0.1:1"], "envoy_cluster": "outbound|8000||vllm.ns.svc.cluster.local"}"#,
        ))
        .unwrap();
        assert_eq!(config.pool, "outbound_8000__vllm_ns_svc_cluster_local");
        // The old names still work, once each, and say so.
        let config = parse(Some(
            br#"{"endpoints": ["10.0.0.1:1"], "cluster": "a", "admin_cluster": "x", "watch_cluster": "b"}"#,
        ))
        .unwrap();
        assert_eq!(config.pool, "a");
        assert_eq!(config.admin.unwrap().envoy_cluster, "b");
        assert_eq!(config.deprecated, vec!["watch_cluster", "cluster"]);
        assert_eq!(renamed("cluster"), "pool");
        let err = parse(Some(
            br#"{"endpoints": ["10.0.0.1:1"], "cluster": "a", "pool": "a"}"#,
        ))
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("cluster"));
        assert!(err.message.contains("give only \"pool\""), "{err}");
    }

    #[test]
    fn default_lease_grows_with_a_long_housekeeping_interval() {
        let config =
            parse_str(r#"{"endpoints": ["10.0.0.1:1"], "housekeeping_interval_ms": 5000}"#)
                .unwrap();
        assert_eq!(config.vm_lease_ttl_ms, 15_000);
    }

    #[test]
    fn addresses_are_canonicalised_like_envoy_prints_them() {
        let config = parse_str(r#"{"endpoints": ["[FD00:0:0::1]:80", "010.0.0.1:80"]}"#);
        // Leading zeros are not valid IPv4 in Rust's parser: better rejected than misread.
        assert!(config.is_err());
        let config = parse_str(r#"{"endpoints": ["[FD00:0:0::1]:80"]}"#).unwrap();
        assert_eq!(config.endpoints, vec!["[fd00::1]:80"]);
    }

    #[test]
    fn empty_or_missing_configuration_is_rejected() {
        for bytes in [None, Some(&b""[..]), Some(&b"  \n"[..])] {
            let err = parse(bytes).unwrap_err();
            assert!(err.message.contains("configuration is empty"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_field_and_what_is_allowed() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#"{"endpoints": ["1.1.1.1:1"], "strategy": "RANDOM"}"#,
                "strategy",
                "known: routing_strategy",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "endpont_header": "x"}"#,
                "endpont_header",
                "did you mean \"endpoint_header\"?",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "routing_strategy": "LOR"}"#,
                "routing_strategy",
                "\"LEAST_OUTSTANDING_REQUESTS\", \"RANDOM\"",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "routing_strategy": 3}"#,
                "routing_strategy",
                "expected a string, got a number",
            ),
            (r#"{}"#, "endpoints", "required"),
            (r#"{"endpoints": []}"#, "endpoints", "is empty"),
            (
                r#"{"endpoints": "1.1.1.1:1"}"#,
                "endpoints",
                "expected an array",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1", "1.1.1.1:1"]}"#,
                "endpoints[1]",
                "listed twice",
            ),
            (
                r#"{"endpoints": ["model-0:8000"]}"#,
                "endpoints[0]",
                "not an \"ip:port\" address",
            ),
            (
                r#"{"endpoints": ["1.1.1.1"]}"#,
                "endpoints[0]",
                "not an \"ip:port\" address",
            ),
            (r#"{"endpoints": ["1.1.1.1:0"]}"#, "endpoints[0]", "port 0"),
            (
                r#"{"endpoints": ["0.0.0.0:80"]}"#,
                "endpoints[0]",
                "unspecified",
            ),
            (
                r#"{"endpoints": [8000]}"#,
                "endpoints[0]",
                "expected a string",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "endpoint_header": "X-Upper"}"#,
                "endpoint_header",
                "lowercase",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "endpoint_header": ""}"#,
                "endpoint_header",
                "not a valid header name",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "endpoint_header": ":authority"}"#,
                "endpoint_header",
                "not a valid header name",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "endpoint_header": "host"}"#,
                "endpoint_header",
                "Envoy manages itself",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "cluster": "a b"}"#,
                "cluster",
                "not a usable name",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "fallback_endpoints": -1}"#,
                "fallback_endpoints",
                "integer from 0 to 16",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "fallback_endpoints": 1.5}"#,
                "fallback_endpoints",
                "integer from 0 to 16",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "fallback_endpoints": 17}"#,
                "fallback_endpoints",
                "integer from 0 to 16",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "housekeeping_interval_ms": 10}"#,
                "housekeeping_interval_ms",
                "integer from 50",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "passive_health": false, "failure_threshold": 2}"#,
                "failure_threshold",
                "no effect with \"passive_health\": false",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "max_ejection_percent": 0}"#,
                "max_ejection_percent",
                "integer from 1 to 100",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "max_blamed_body_bytes": -5}"#,
                "max_blamed_body_bytes",
                "integer from 0 to 1073741824",
            ),
            (
                r#"{"endpoints": ["1.1.1.1:1"], "vm_lease_ttl_ms": 2000}"#,
                "vm_lease_ttl_ms",
                "shorter than 3 housekeeping intervals",
            ),
        ];
        for (text, field, hint) in cases {
            let err = error_of(text);
            assert_eq!(err.field.as_deref(), Some(*field), "{text}: {err}");
            assert!(err.to_string().contains(hint), "{text}: {err} lacks {hint}");
            assert!(
                err.to_string().starts_with(&format!("field \"{field}\"")),
                "{err}"
            );
        }
    }

    #[test]
    fn document_level_errors_say_what_is_wrong() {
        assert!(error_of("[1, 2]")
            .message
            .contains("must be a JSON object, got an array"));
        assert!(error_of("{\"endpoints\": [")
            .message
            .contains("not valid JSON"));
        assert!(error_of("null").message.contains("got null"));
    }

    #[test]
    fn hostile_sizes_are_rejected_with_short_messages() {
        let many: Vec<String> = (0..=MAX_ENDPOINTS)
            .map(|i| format!("\"10.{}.{}.1:80\"", i / 256, i % 256))
            .collect();
        let err = error_of(&format!("{{\"endpoints\": [{}]}}", many.join(",")));
        assert!(err.message.contains("at most 1024"), "{err}");

        let long = "a".repeat(1 << 20);
        let err = error_of(&format!("{{\"endpoints\": [\"{long}\"]}}"));
        assert!(
            err.to_string().len() < 600,
            "message is {} bytes",
            err.to_string().len()
        );
        let err = error_of(&format!(
            "{{\"endpoints\": [\"1.1.1.1:1\"], \"cluster\": \"{long}\"}}"
        ));
        assert!(err.to_string().len() < 600);
        // Both found by the fuzzer: a huge strategy name and a huge unknown field name.
        for document in [
            format!("{{\"endpoints\": [\"1.1.1.1:1\"], \"routing_strategy\": \"{long}\"}}"),
            format!("{{\"endpoints\": [\"1.1.1.1:1\"], \"{long}\": 1}}"),
        ] {
            let err = error_of(&document);
            assert!(
                err.to_string().len() < 600,
                "{} bytes",
                err.to_string().len()
            );
        }
    }

    #[test]
    fn the_largest_allowed_pool_is_accepted() {
        let many: Vec<String> = (0..MAX_ENDPOINTS)
            .map(|i| format!("\"10.{}.{}.1:80\"", i / 256, i % 256))
            .collect();
        let config = parse_str(&format!("{{\"endpoints\": [{}]}}", many.join(","))).unwrap();
        assert_eq!(config.endpoints.len(), MAX_ENDPOINTS);
    }
}
