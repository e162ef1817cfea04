//! The `model-load` report: statistics over the measured requests, the JSON
//! document written by `--json`, and the human-readable table.
//!
//! * Measured requests are those *started* after the warm-up.
//! * Latency and TTFT percentiles are over the measured requests that
//!   succeeded (nearest-rank, see [`crate::stats`]).
//! * Throughput counts the successful completions whose *end* falls inside
//!   the measurement window (warm-up end → `--duration` deadline; with
//!   `--requests`, → the last measured completion), divided by the window
//!   length: a steady-state rate that the drain phase does not dilute.
//! * Backend shares count every measured request that got an HTTP response,
//!   keyed by its `x-served-by` header (`(none)` when absent).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::load::{LoadConfig, Record};
use crate::openai::Api;
use crate::stats::{Summary, TtftSummary};
use crate::workload::WorkloadKind;

/// Backend key for responses without `x-served-by`.
pub const NO_BACKEND: &str = "(none)";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigJson {
    pub url: String,
    pub api: &'static str,
    pub stream: bool,
    pub model: Option<String>,
    pub mode: &'static str,
    pub users: Option<usize>,
    pub rate: Option<f64>,
    pub max_inflight: Option<usize>,
    pub think_ms: f64,
    /// Closed loop: think times drawn exponential with mean `think_ms`.
    pub think_exponential: bool,
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    pub warmup_s: f64,
    pub drain_timeout_s: f64,
    pub timeout_s: f64,
    pub seed: u64,
    pub max_tokens: String,
    pub prompt_tokens: String,
    pub workload: String,
    /// Shared-prefix parameters (`null` for the unique workload).
    pub prefix_groups: Option<u64>,
    pub system_prompt_tokens: Option<u64>,
    pub turns: Option<u32>,
    /// Open loop only.
    pub conversations: Option<usize>,
    /// Shared-prefix only: share of conversations in group 0 (0: uniform).
    pub hot_group_share: Option<f64>,
    /// Shared-prefix only: the header that carries the group (`--prefix-key-header`).
    pub prefix_key_header: Option<String>,
    pub headers: Vec<String>,
    pub instances: Option<usize>,
}

impl ConfigJson {
    pub fn of(cfg: &LoadConfig) -> ConfigJson {
        let open = cfg.rate.is_some();
        let shared = cfg.workload == WorkloadKind::SharedPrefix;
        ConfigJson {
            // Comma-separated when there are several: what --url accepts.
            url: cfg
                .targets
                .iter()
                .map(|t| t.url.as_str())
                .collect::<Vec<_>>()
                .join(","),
            api: match cfg.api {
                Api::Chat => "chat",
                Api::Completions => "completions",
            },
            stream: cfg.stream,
            model: cfg.model.clone(),
            mode: if open { "open" } else { "closed" },
            users: (!open).then_some(cfg.users),
            rate: cfg.rate,
            max_inflight: open.then_some(cfg.max_inflight),
            think_ms: cfg.think.as_secs_f64() * 1000.0,
            think_exponential: cfg.think_exponential,
            duration_s: cfg.duration.map(|d| d.as_secs_f64()),
            requests: cfg.requests,
            warmup_s: cfg.warmup.as_secs_f64(),
            drain_timeout_s: cfg.drain_timeout.as_secs_f64(),
            timeout_s: cfg.timeout.as_secs_f64(),
            seed: cfg.seed,
            max_tokens: cfg.max_tokens.to_string(),
            prompt_tokens: cfg.prompt_tokens.to_string(),
            workload: cfg.workload.to_string(),
            prefix_groups: shared.then_some(cfg.prefix_groups),
            system_prompt_tokens: shared.then_some(cfg.system_prompt_tokens),
            turns: shared.then_some(cfg.turns),
            conversations: (shared && open).then_some(cfg.conversations),
            hot_group_share: shared.then_some(cfg.hot_group_share),
            prefix_key_header: cfg.prefix_key_header.clone().filter(|_| shared),
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect(),
            instances: cfg.instances,
        }
    }
}

/// The machine-readable report (`--json FILE`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub label: String,
    pub config: ConfigJson,
    /// Measured requests (started after the warm-up).
    pub requests: u64,
    pub ok: u64,
    /// Failed measured requests by kind.
    pub errors: BTreeMap<String, u64>,
    pub latency_ms: Summary,
    /// `null` unless streaming.
    pub ttft_ms: Option<TtftSummary>,
    pub throughput_per_min: f64,
    pub throughput_per_instance_per_min: f64,
    pub instances: usize,
    pub output_tokens_per_s: f64,
    /// Measured requests per `x-served-by` value.
    pub backends: BTreeMap<String, u64>,
    /// Length of the measurement window.
    pub duration_s: f64,
    /// Requests started during the warm-up (excluded above).
    pub warmup_requests: u64,
    /// Tokens received by the measured successful requests.
    pub output_tokens: u64,
}

/// Builds the report from all records of a run. `warmup` and `window_end` are
/// offsets from the start of the run.
pub fn build_report(
    cfg: &LoadConfig,
    records: &[Record],
    warmup: Duration,
    window_end: Duration,
) -> Report {
    let measured: Vec<&Record> = records.iter().filter(|r| !r.warmup).collect();
    let ok: Vec<&&Record> = measured.iter().filter(|r| r.error.is_none()).collect();
    let mut errors = BTreeMap::new();
    for r in &measured {
        if let Some(e) = r.error {
            *errors.entry(e.key()).or_insert(0) += 1;
        }
    }
    let mut backends = BTreeMap::new();
    for r in &measured {
        if r.status.is_some() {
            let key = r.backend.clone().unwrap_or_else(|| NO_BACKEND.to_string());
            *backends.entry(key).or_insert(0u64) += 1;
        }
    }
    let latencies: Vec<f64> = ok.iter().map(|r| r.latency_ms).collect();
    let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let window = window_end.saturating_sub(warmup);
    let duration_s = window.as_secs_f64();
    let in_window: Vec<&Record> = records
        .iter()
        .filter(|r| r.error.is_none() && r.end >= warmup && r.end <= window_end)
        .collect();
    let (throughput_per_min, output_tokens_per_s) = if duration_s > 0.0 {
        (
            in_window.len() as f64 / duration_s * 60.0,
            in_window.iter().map(|r| r.tokens).sum::<u64>() as f64 / duration_s,
        )
    } else {
        (0.0, 0.0)
    };
    let seen = backends.keys().filter(|k| k.as_str() != NO_BACKEND).count();
    let instances = cfg.instances.unwrap_or(seen);
    let throughput_per_instance_per_min = if instances > 0 {
        throughput_per_min / instances as f64
    } else {
        0.0
    };
    Report {
        label: cfg.label.clone(),
        config: ConfigJson::of(cfg),
        requests: measured.len() as u64,
        ok: ok.len() as u64,
        errors,
        latency_ms: Summary::of(&latencies),
        ttft_ms: if cfg.stream {
            TtftSummary::of(&ttfts)
        } else {
            None
        },
        throughput_per_min,
        throughput_per_instance_per_min,
        instances,
        output_tokens_per_s,
        backends,
        duration_s,
        warmup_requests: (records.len() - measured.len()) as u64,
        output_tokens: ok.iter().map(|r| r.tokens).sum(),
    }
}

/// One line of `model-load --samples FILE` (JSON lines, one per request, warm-up included), so
/// that several runs can be pooled into one percentile. Times are ms from the start of the run;
/// the measurement window is `[warmup_s, warmup_s + duration_s]` of the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub start_ms: f64,
    pub end_ms: f64,
    pub latency_ms: f64,
    /// Time to the first content chunk (streaming only).
    pub ttft_ms: Option<f64>,
    /// Output tokens received.
    pub tokens: u64,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    pub status: Option<u16>,
    /// Error kind as in the report's `errors` (`None`: success).
    pub error: Option<String>,
    /// Started during the warm-up (not measured).
    pub warmup: bool,
    pub backend: Option<String>,
    /// Shared-prefix workload: the conversation's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
}

impl Sample {
    pub fn of(r: &Record) -> Sample {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        Sample {
            start_ms: ms(r.start),
            end_ms: ms(r.end),
            latency_ms: r.latency_ms,
            ttft_ms: r.ttft_ms,
            tokens: r.tokens,
            prompt_tokens: r.prompt_tokens,
            max_tokens: r.max_tokens,
            status: r.status,
            error: r.error.map(|e| e.key()),
            warmup: r.warmup,
            backend: r.backend.clone(),
            group: r.group,
        }
    }
}

/// Every record as JSON lines (`--samples`), in start order.
pub fn samples_jsonl(records: &[Record]) -> String {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| r.start);
    let mut out = String::new();
    for r in sorted {
        if let Ok(line) = serde_json::to_string(&Sample::of(r)) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.1}"))
}

/// Renders the human-readable table printed on stdout.
pub fn render_table(r: &Report) -> String {
    let c = &r.config;
    let mut s = String::new();
    let _ = writeln!(s, "== model-load: {} ==", r.label);
    let _ = writeln!(
        s,
        "target        {} ({}, {})",
        c.url,
        c.api,
        if c.stream { "stream" } else { "non-stream" }
    );
    let load = match (c.mode, c.users, c.rate) {
        ("open", _, Some(rate)) => format!("open loop, {rate} req/s Poisson"),
        (_, Some(u), _) => format!(
            "closed loop, {u} users, think {} ms{}",
            c.think_ms,
            if c.think_exponential {
                " (exponential mean)"
            } else {
                ""
            }
        ),
        _ => c.mode.to_string(),
    };
    let _ = writeln!(
        s,
        "load          {load}; max_tokens {}, prompt_tokens {}, seed {}",
        c.max_tokens, c.prompt_tokens, c.seed
    );
    if let (Some(g), Some(sp), Some(t)) = (c.prefix_groups, c.system_prompt_tokens, c.turns) {
        let convs = c
            .conversations
            .map(|m| format!(", {m} open conversations"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "workload      {}: {g} system prompts of {sp} tokens, {t} turns per conversation{convs}",
            c.workload
        );
    }
    let _ = writeln!(
        s,
        "window        {:.1} s (warm-up {:.1} s, {} warm-up requests excluded)",
        r.duration_s, c.warmup_s, r.warmup_requests
    );
    let _ = writeln!(s, "requests      {} ok / {} total", r.ok, r.requests);
    let errs = if r.errors.is_empty() {
        "none".to_string()
    } else {
        r.errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(s, "errors        {errs}");
    let l = &r.latency_ms;
    let _ = writeln!(
        s,
        "latency ms    p50 {}  p90 {}  p99 {}  max {}  mean {}",
        opt(l.p50),
        opt(l.p90),
        opt(l.p99),
        opt(l.max),
        opt(l.mean)
    );
    match &r.ttft_ms {
        Some(t) => {
            let _ = writeln!(
                s,
                "ttft ms       p50 {}  p90 {}  p99 {}",
                opt(t.p50),
                opt(t.p90),
                opt(t.p99)
            );
        }
        None => {
            let _ = writeln!(s, "ttft ms       - (streams only)");
        }
    }
    let _ = writeln!(
        s,
        "throughput    {:.1} req/min; {:.1} req/min per instance ({} instances)",
        r.throughput_per_min, r.throughput_per_instance_per_min, r.instances
    );
    let _ = writeln!(s, "output        {:.1} tokens/s", r.output_tokens_per_s);
    let total: u64 = r.backends.values().sum();
    let _ = writeln!(s, "backends      {} seen", r.backends.len());
    let width = r.backends.keys().map(|k| k.len()).max().unwrap_or(0);
    for (k, v) in &r.backends {
        let pct = if total > 0 {
            *v as f64 * 100.0 / total as f64
        } else {
            0.0
        };
        let _ = writeln!(s, "  {k:<width$}  {v:>8}  {pct:5.1}%");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::ErrorKind;
    use serde_json::Value;

    fn rec(
        start_ms: u64,
        end_ms: u64,
        error: Option<ErrorKind>,
        backend: Option<&str>,
        warmup: bool,
    ) -> Record {
        Record {
            start: Duration::from_millis(start_ms),
            end: Duration::from_millis(end_ms),
            latency_ms: (end_ms - start_ms) as f64,
            ttft_ms: Some(1.0),
            tokens: 10,
            status: match error {
                Some(ErrorKind::Status(c)) => Some(c),
                Some(ErrorKind::Connect) => None,
                _ => Some(200),
            },
            backend: backend.map(str::to_string),
            error,
            warmup,
            prompt_tokens: 32,
            max_tokens: Some(10),
            group: None,
        }
    }

    fn sample() -> Vec<Record> {
        vec![
            rec(0, 500, None, Some("a"), true),
            rec(1000, 1100, None, Some("a"), false),
            rec(1000, 1200, None, Some("b"), false),
            rec(1100, 1300, None, Some("b"), false),
            rec(1200, 1300, Some(ErrorKind::Status(503)), None, false),
            rec(1200, 1200, Some(ErrorKind::Connect), None, false),
            rec(1500, 1700, None, Some("a"), false),
            // Finishes after the window: counted in latency, not in throughput.
            rec(1900, 2500, None, Some("a"), false),
        ]
    }

    #[test]
    fn report_numbers() {
        let cfg = LoadConfig {
            stream: true,
            label: "t".into(),
            ..LoadConfig::default()
        };
        let r = build_report(
            &cfg,
            &sample(),
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        assert_eq!(r.requests, 7);
        assert_eq!(r.ok, 5);
        assert_eq!(r.warmup_requests, 1);
        assert_eq!(r.errors.get("status_503"), Some(&1));
        assert_eq!(r.errors.get("connect"), Some(&1));
        assert_eq!(r.backends.get("a"), Some(&3));
        assert_eq!(r.backends.get("b"), Some(&2));
        assert_eq!(r.backends.get(NO_BACKEND), Some(&1));
        assert_eq!(r.instances, 2);
        assert!((r.duration_s - 1.0).abs() < 1e-9);
        // 4 OK completions end inside [1 s, 2 s]
        assert!((r.throughput_per_min - 240.0).abs() < 1e-9);
        assert!((r.throughput_per_instance_per_min - 120.0).abs() < 1e-9);
        assert!((r.output_tokens_per_s - 40.0).abs() < 1e-9);
        assert_eq!(r.latency_ms.max, Some(600.0));
        assert_eq!(r.latency_ms.p50, Some(200.0));
        assert_eq!(r.output_tokens, 50);
        assert!(r.ttft_ms.is_some());

        let cfg = LoadConfig {
            instances: Some(4),
            ..cfg
        };
        let r = build_report(
            &cfg,
            &sample(),
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        assert_eq!(r.instances, 4);
        assert!((r.throughput_per_instance_per_min - 60.0).abs() < 1e-9);
    }

    #[test]
    fn json_shape() {
        let cfg = LoadConfig::default();
        let r = build_report(
            &cfg,
            &sample(),
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "label",
            "config",
            "requests",
            "ok",
            "errors",
            "latency_ms",
            "ttft_ms",
            "throughput_per_min",
            "throughput_per_instance_per_min",
            "instances",
            "output_tokens_per_s",
            "backends",
            "duration_s",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        for key in ["p50", "p90", "p99", "max", "mean"] {
            assert!(v["latency_ms"][key].is_number(), "latency_ms.{key}");
        }
        assert!(v["ttft_ms"].is_null(), "non-stream run has no TTFT");
        assert_eq!(v["errors"]["status_503"], 1);
        assert_eq!(v["backends"]["b"], 2);
        assert_eq!(v["config"]["api"], "chat");
        assert_eq!(v["config"]["mode"], "closed");
        assert_eq!(v["config"]["max_tokens"], "none");
        assert!(v["latency_ms"].get("count").is_none());
    }

    #[test]
    fn empty_run() {
        let cfg = LoadConfig::default();
        let r = build_report(&cfg, &[], Duration::ZERO, Duration::ZERO);
        assert_eq!(r.requests, 0);
        assert_eq!(r.throughput_per_min, 0.0);
        assert_eq!(r.instances, 0);
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["latency_ms"]["p50"].is_null());
        let table = render_table(&r);
        assert!(table.contains("0 ok / 0 total"));
    }

    #[test]
    fn table_mentions_everything() {
        let cfg = LoadConfig {
            stream: true,
            ..LoadConfig::default()
        };
        let r = build_report(
            &cfg,
            &sample(),
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        let t = render_table(&r);
        for needle in [
            "5 ok / 7 total",
            "status_503: 1",
            "connect: 1",
            "p99",
            "ttft ms",
            "req/min per instance (2 instances)",
            "tokens/s",
            "  50.0%",
        ] {
            assert!(t.contains(needle), "{needle} not in\n{t}");
        }
    }

    #[test]
    fn samples_are_json_lines_in_start_order() {
        let mut records = sample();
        records.reverse();
        let text = samples_jsonl(&records);
        let lines: Vec<Sample> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), records.len());
        assert!(lines.windows(2).all(|w| w[0].start_ms <= w[1].start_ms));
        assert!(lines[0].warmup && !lines[1].warmup);
        let failed = lines
            .iter()
            .find(|s| s.error.as_deref() == Some("status_503"))
            .unwrap();
        assert_eq!(
            (failed.status, failed.backend.as_deref()),
            (Some(503), None)
        );
        assert_eq!(
            (lines[1].prompt_tokens, lines[1].max_tokens),
            (32, Some(10))
        );
        assert_eq!(lines[1].start_ms, 1000.0);
        assert!(lines
            .iter()
            .any(|s| (s.start_ms, s.end_ms) == (1000.0, 1100.0)));
        let keys = serde_json::from_str::<Value>(text.lines().next().unwrap()).unwrap();
        assert_eq!(keys.as_object().unwrap().len(), 11);
    }
}
