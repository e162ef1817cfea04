//! The proxy-overhead benchmark: Envoy CPU time per request of model-lb against Envoy's own
//! balancers, in regimes of Envoy workers x pool size, from interleaved rounds; and what
//! PREFIX_AWARE's body reading costs against LOR at three request-body sizes.
//!
//! A regime is (Envoy `--concurrency`, endpoints, request body, client connections). In every
//! regime each variant runs once per round; the filter's *own cost* is its CPU per request minus
//! Envoy's native `LEAST_REQUEST`'s in the same regime and round (the baseline absorbs whatever
//! the regime costs Envoy itself: more workers than cores, a larger cluster), then the median
//! over the rounds.

use std::fmt::Write as _;

use serde::Serialize;

use super::prefix::FilterStats;
use super::procstat::Usage;

/// Where a run happens: Envoy workers, endpoints, request body and client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Regime {
    pub workers: u32,
    pub endpoints: u32,
    /// POST body size in bytes; `None`: GET without a body.
    pub body_bytes: Option<u32>,
    pub connections: u32,
}

impl Regime {
    /// The variant every other is compared with: Envoy's LEAST_REQUEST, or model-lb LOR for the
    /// body regimes (what PREFIX_AWARE adds to LOR).
    pub fn baseline(&self) -> &'static str {
        if self.body_bytes.is_some() {
            BODY_BASELINE
        } else {
            BASELINE
        }
    }

    pub fn label(&self) -> String {
        let body = self
            .body_bytes
            .map_or(String::new(), |b| format!(", {} body", body_label(b)));
        format!(
            "{} worker{} x {} endpoints{body}, {} connection{}",
            self.workers,
            if self.workers == 1 { "" } else { "s" },
            self.endpoints,
            self.connections,
            if self.connections == 1 { "" } else { "s" }
        )
    }
}

/// `1 KB`, `64 KB`, `1 MB`.
pub fn body_label(bytes: u32) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MB", bytes >> 20)
    } else if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{} KB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// Client connections for `workers` Envoy workers: four per worker, at least 16 (one worker
/// with 16 connections is the earlier runs' set-up), spread exactly over the workers.
pub fn connections_for(workers: u32) -> u32 {
    (4 * workers).max(16)
}

/// wrk threads: one for one worker (as before), two otherwise (the machine's two cores).
pub fn wrk_threads(regime: &Regime) -> u32 {
    if regime.workers == 1 || regime.connections < 2 {
        1
    } else {
        2
    }
}

/// Seconds of the uncounted warm-up round: long enough that each worker has opened its upstream
/// connections to most endpoints (about n ln n requests per worker at some 10,000 requests a
/// second over all workers), so that connecting is not measured.
pub fn warmup_seconds(regime: &Regime) -> u32 {
    let n = f64::from(regime.endpoints.max(2));
    let requests = f64::from(regime.workers) * n * n.ln();
    ((requests / 10_000.0).ceil() as u32).clamp(1, 12)
}

/// One `wrk` run against one variant.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub variant: String,
    pub regime: Regime,
    pub round: u32,
    pub requests: u64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Proxy Envoy's user + system CPU seconds during the run.
    pub proxy_cpu_s: f64,
    pub proxy: Usage,
    pub backend: Usage,
    pub load: Usage,
    /// Non-2xx responses and socket errors wrk reported.
    pub errors: u64,
}

impl Measurement {
    pub fn cpu_us_per_request(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.proxy_cpu_s * 1e6 / self.requests as f64
        }
    }
}

/// The filter's counters of one variant over a regime's measured rounds (its admin `/stats`
/// before and after).
#[derive(Debug, Clone, PartialEq)]
pub struct FilterCounts {
    pub variant: String,
    pub regime: Regime,
    pub stats: FilterStats,
}

/// One line of `overhead.json`: medians over the rounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverheadRow {
    pub workers: u32,
    pub endpoints: u32,
    pub body_bytes: Option<u32>,
    pub connections: u32,
    pub variant: String,
    pub rounds: u32,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Proxy Envoy CPU (user + system) per request, microseconds.
    pub cpu_us_per_request: f64,
    pub cpu_us_per_request_min: f64,
    pub cpu_us_per_request_max: f64,
    /// `least_request`, or `mlb_lor` in the body regimes.
    pub baseline: String,
    /// Median over rounds of this variant's CPU per request / the baseline's in the same round.
    pub cpu_ratio_to_baseline: Option<f64>,
    /// Median over rounds of this variant's CPU per request minus the baseline's in the same
    /// round: against LEAST_REQUEST, the filter's own cost.
    pub cpu_us_over_baseline: Option<f64>,
    /// Median over rounds of the difference in P50 and P99 to the baseline, ms.
    pub p50_ms_over_baseline: Option<f64>,
    pub p99_ms_over_baseline: Option<f64>,
    /// model-lb variants: CAS races lost and requests failed open over the measured rounds.
    pub cas_conflicts: Option<u64>,
    pub fail_opens: Option<u64>,
    /// Proxy Envoy CPU use while loaded, cores (median of run averages).
    pub proxy_cores: f64,
    pub errors: u64,
}

pub const BASELINE: &str = "least_request";
pub const BODY_BASELINE: &str = "mlb_lor";

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Rows in the order of `regimes`, then `variants`.
pub fn rows(
    measurements: &[Measurement],
    variants: &[String],
    regimes: &[Regime],
    filters: &[FilterCounts],
) -> Vec<OverheadRow> {
    let mut out = Vec::new();
    for regime in regimes {
        let base_name = regime.baseline();
        for variant in variants {
            let mine: Vec<&Measurement> = measurements
                .iter()
                .filter(|m| &m.variant == variant && m.regime == *regime)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let col = |f: fn(&Measurement) -> f64| {
                median(&mine.iter().map(|m| f(m)).collect::<Vec<_>>()).unwrap_or(0.0)
            };
            let cpu: Vec<f64> = mine.iter().map(|m| m.cpu_us_per_request()).collect();
            let paired = |f: &dyn Fn(&Measurement, &Measurement) -> Option<f64>| -> Option<f64> {
                let values: Vec<f64> = mine
                    .iter()
                    .filter_map(|m| {
                        let base = measurements.iter().find(|b| {
                            b.variant == base_name && b.regime == *regime && b.round == m.round
                        })?;
                        f(m, base)
                    })
                    .collect();
                median(&values)
            };
            let filter = filters
                .iter()
                .find(|f| &f.variant == variant && f.regime == *regime);
            out.push(OverheadRow {
                workers: regime.workers,
                endpoints: regime.endpoints,
                body_bytes: regime.body_bytes,
                connections: regime.connections,
                variant: variant.clone(),
                rounds: mine.len() as u32,
                requests_per_s: col(|m| m.requests_per_s).round(),
                p50_ms: round3(col(|m| m.p50_ms)),
                p99_ms: round3(col(|m| m.p99_ms)),
                cpu_us_per_request: round2(median(&cpu).unwrap_or(0.0)),
                cpu_us_per_request_min: round2(cpu.iter().copied().fold(f64::INFINITY, f64::min)),
                cpu_us_per_request_max: round2(cpu.iter().copied().fold(0.0, f64::max)),
                baseline: base_name.to_owned(),
                cpu_ratio_to_baseline: paired(&|m, b| {
                    let base = b.cpu_us_per_request();
                    (base > 0.0).then(|| m.cpu_us_per_request() / base)
                })
                .map(round3),
                cpu_us_over_baseline: paired(&|m, b| {
                    Some(m.cpu_us_per_request() - b.cpu_us_per_request())
                })
                .map(round2),
                p50_ms_over_baseline: paired(&|m, b| Some(m.p50_ms - b.p50_ms)).map(round3),
                p99_ms_over_baseline: paired(&|m, b| Some(m.p99_ms - b.p99_ms)).map(round3),
                cas_conflicts: filter.map(|f| f.stats.cas_conflicts),
                fail_opens: filter.map(|f| f.stats.fail_open),
                proxy_cores: round2(col(|m| m.proxy.average)),
                errors: mine.iter().map(|m| m.errors).sum(),
            });
        }
    }
    out
}

/// Parses `wrk --latency` output: (requests, requests/s, p50 ms, p99 ms, errors).
pub fn parse_wrk(text: &str) -> Option<(u64, f64, f64, f64, u64)> {
    let duration_ms = |v: &str| -> Option<f64> {
        if let Some(us) = v.strip_suffix("us") {
            us.parse::<f64>().ok().map(|x| x / 1000.0)
        } else if let Some(ms) = v.strip_suffix("ms") {
            ms.parse().ok()
        } else if let Some(m) = v.strip_suffix('m') {
            m.parse::<f64>().ok().map(|x| x * 60_000.0)
        } else {
            v.strip_suffix('s')?.parse::<f64>().ok().map(|x| x * 1000.0)
        }
    };
    let (mut requests, mut rps, mut p50, mut p99) = (None, None, None, None);
    let mut errors = 0u64;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [n, "requests", "in", ..] => requests = n.parse().ok(),
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = duration_ms(v),
            ["99%", v] => p99 = duration_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    Some((requests?, rps?, p50?, p99?, errors))
}

/// A wrk script that POSTs `bodies` in turn (each request built once, in `init`, so wrk's Lua
/// costs nothing per request). The body files are read from disk.
pub fn wrk_post_script(body_files: &[String]) -> String {
    let files: Vec<String> = body_files.iter().map(|f| format!("{f:?}")).collect();
    format!(
        "local files = {{{}}}\nlocal requests = {{}}\nlocal n = 0\nfunction init(args)\n  for i, path in ipairs(files) do\n    local f = assert(io.open(path, \"rb\"))\n    local body = f:read(\"*a\")\n    f:close()\n    requests[i] = wrk.format(\"POST\", \"/v1/chat/completions\", {{[\"Content-Type\"] = \"application/json\"}}, body)\n  end\nend\nfunction request()\n  n = n % #requests + 1\n  return requests[n]\nend\n",
        files.join(", ")
    )
}

/// A chat request body of exactly `bytes` bytes (at least about 200): a system message whose
/// text begins with `key` (so bodies with different keys route apart under PREFIX_AWARE), as
/// long as PREFIX_AWARE's default key needs (4,096 characters) if the size allows, then a user
/// message that fills the rest.
pub fn chat_body(bytes: u32, key: u32) -> String {
    let head = format!("{{\"model\":\"sim-model\",\"max_tokens\":16,\"messages\":[{{\"role\":\"system\",\"content\":\"key {key:04} ");
    let middle = "\"},{\"role\":\"user\",\"content\":\"";
    let tail = "\"}]}";
    let fixed = head.len() + middle.len() + tail.len();
    let room = (bytes as usize).saturating_sub(fixed);
    let system = room.min(6000).min(room * 2 / 3);
    let user = room - system;
    let filler = |n: usize, salt: u32| -> String {
        "lorem ipsum dolor sit amet "
            .chars()
            .cycle()
            .skip(salt as usize % 7)
            .take(n)
            .collect()
    };
    format!(
        "{head}{}{middle}{}{tail}",
        filler(system, key),
        filler(user, key + 3)
    )
}

/// Everything `overhead.md` reports.
#[derive(Debug, Clone)]
pub struct OverheadReport {
    pub rows: Vec<OverheadRow>,
    pub measurements: Vec<Measurement>,
    pub machine_line: String,
    pub method: String,
    /// Extra lines after the method: what polling alone costs, variants not run.
    pub notes: Vec<String>,
    pub elapsed_s: f64,
    pub smoke: bool,
}

/// The one-worker target: model-lb LOR within this factor of Envoy LEAST_REQUEST in CPU per
/// request.
pub const TARGET_RATIO: f64 = 1.25;
/// The scaling target: the filter's own cost at the largest regime at most this factor of its
/// own cost at the smallest (4 endpoints x 1 worker).
pub const SCALING_TARGET: f64 = 1.5;

fn find<'a>(rows: &'a [OverheadRow], variant: &str, regime: &Regime) -> Option<&'a OverheadRow> {
    rows.iter().find(|r| {
        r.variant == variant
            && r.workers == regime.workers
            && r.endpoints == regime.endpoints
            && r.body_bytes == regime.body_bytes
            && r.connections == regime.connections
    })
}

fn regimes_of(rows: &[OverheadRow]) -> Vec<Regime> {
    let mut out: Vec<Regime> = Vec::new();
    for r in rows {
        let regime = Regime {
            workers: r.workers,
            endpoints: r.endpoints,
            body_bytes: r.body_bytes,
            connections: r.connections,
        };
        if !out.contains(&regime) {
            out.push(regime);
        }
    }
    out
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn signed(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:+.digits$}"))
}

/// One of the targets, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub what: String,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// The targets: LOR within 1.25x of LEAST_REQUEST with one worker (each pool size);
/// the filter's own cost at the largest (workers, endpoints) at most 1.5x its cost at the
/// smallest, for LOR and LOR with batched releases; no model-lb request failed open.
pub fn targets(rows: &[OverheadRow]) -> Vec<Target> {
    let mut out = Vec::new();
    let get_regimes: Vec<Regime> = regimes_of(rows)
        .into_iter()
        .filter(|r| r.body_bytes.is_none())
        .collect();
    for regime in get_regimes.iter().filter(|r| r.workers == 1) {
        let row = find(rows, "mlb_lor", regime);
        out.push(Target {
            what: format!(
                "one worker, {} endpoints: model-lb LOR's CPU per request against LEAST_REQUEST's",
                regime.endpoints
            ),
            goal: format!("at most {TARGET_RATIO}x"),
            measured: row.map_or("-".into(), |r| {
                format!(
                    "{}x ({:.1} µs against {:.1})",
                    opt(r.cpu_ratio_to_baseline, 2),
                    r.cpu_us_per_request,
                    r.cpu_us_per_request - r.cpu_us_over_baseline.unwrap_or(0.0)
                )
            }),
            met: row
                .and_then(|r| r.cpu_ratio_to_baseline)
                .map(|x| x <= TARGET_RATIO),
        });
    }
    let smallest = get_regimes
        .iter()
        .copied()
        .min_by_key(|r| (r.workers, r.endpoints));
    let largest = get_regimes
        .iter()
        .copied()
        .max_by_key(|r| (r.workers, r.endpoints));
    if let (Some(small), Some(large)) = (smallest, largest) {
        if small != large {
            for variant in ["mlb_lor", "mlb_lor_batched"] {
                let own = |r: &Regime| find(rows, variant, r).and_then(|x| x.cpu_us_over_baseline);
                let (a, b) = (own(&small), own(&large));
                let ratio = match (a, b) {
                    (Some(a), Some(b)) if a > 0.0 => Some(b / a),
                    _ => None,
                };
                out.push(Target {
                    what: format!(
                        "{variant}: own cost (CPU per request minus LEAST_REQUEST's) at {} endpoints x {} workers against {} x {}",
                        large.endpoints, large.workers, small.endpoints, small.workers
                    ),
                    goal: format!("at most {SCALING_TARGET}x"),
                    measured: match (a, b) {
                        (Some(a), Some(b)) => format!(
                            "{b:.1} µs against {a:.1} µs ({})",
                            ratio.map_or("-".into(), |x| format!("{x:.2}x"))
                        ),
                        _ => "-".into(),
                    },
                    met: ratio.map(|x| x <= SCALING_TARGET),
                });
            }
        }
    }
    let filtered: Vec<&OverheadRow> = rows.iter().filter(|r| r.fail_opens.is_some()).collect();
    let fail_opens: u64 = filtered.iter().filter_map(|r| r.fail_opens).sum();
    out.push(Target {
        what: "model-lb requests that failed open, every regime and variant".into(),
        goal: "0".into(),
        measured: if filtered.is_empty() {
            "-".into()
        } else {
            format!("{fail_opens} (over {} rows)", filtered.len())
        },
        met: (!filtered.is_empty()).then_some(fail_opens == 0),
    });
    out
}

fn per_thousand(conflicts: Option<u64>, requests: u64) -> String {
    match conflicts {
        Some(c) if requests > 0 => {
            format!("{c} ({:.2}/1k)", c as f64 * 1000.0 / requests as f64)
        }
        Some(c) => c.to_string(),
        None => "-".into(),
    }
}

pub fn markdown(r: &OverheadReport) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# model-lb proxy overhead{}\n\n{}. Took {:.0} s. Generated by `model-bench overhead` (`make bench-overhead`).\n\n{}\n",
        if r.smoke { " (smoke run: plumbing only, numbers meaningless)" } else { "" },
        r.machine_line,
        r.elapsed_s,
        r.method
    );
    for note in &r.notes {
        let _ = writeln!(md, "- {note}");
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md);
    }
    let regimes = regimes_of(&r.rows);
    let get: Vec<Regime> = regimes
        .iter()
        .copied()
        .filter(|x| x.body_bytes.is_none())
        .collect();
    // Requests measured per (regime, variant), for conflicts per 1,000 requests.
    let measured = |regime: &Regime, variant: &str| -> u64 {
        r.measurements
            .iter()
            .filter(|m| m.regime == *regime && m.variant == variant)
            .map(|m| m.requests)
            .sum()
    };

    if !get.is_empty() {
        let _ = writeln!(
            md,
            "## Workers x endpoints\n\nEnvoy CPU per request (median over rounds), the filter's own cost (its CPU per request minus LEAST_REQUEST's, paired per round), P99, and the filter's CAS conflicts and fail-opens over the measured rounds (per 1,000 requests in brackets).\n"
        );
        let _ = writeln!(
            md,
            "| workers | endpoints | connections | LEAST_REQUEST µs | LOR µs | LOR own cost µs | LOR vs LEAST_REQUEST | LOR batched µs | batched own cost µs | P99 ms LEAST_REQUEST / LOR / batched | CAS conflicts LOR | CAS conflicts batched | fail-opens LOR / batched |"
        );
        let _ = writeln!(
            md,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for regime in &get {
            let row = |v: &str| find(&r.rows, v, regime);
            let (lr, lor, batched) = (row(BASELINE), row("mlb_lor"), row("mlb_lor_batched"));
            let cpu = |x: Option<&OverheadRow>| opt(x.map(|x| x.cpu_us_per_request), 1);
            let own = |x: Option<&OverheadRow>| opt(x.and_then(|x| x.cpu_us_over_baseline), 1);
            let p99 = |x: Option<&OverheadRow>| opt(x.map(|x| x.p99_ms), 2);
            let cas = |x: Option<&OverheadRow>, v: &str| {
                x.map_or("-".into(), |x| {
                    per_thousand(x.cas_conflicts, measured(regime, v))
                })
            };
            let fo = |x: Option<&OverheadRow>| {
                x.and_then(|x| x.fail_opens)
                    .map_or("-".into(), |v| v.to_string())
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} / {} |",
                regime.workers,
                regime.endpoints,
                regime.connections,
                cpu(lr),
                cpu(lor),
                own(lor),
                opt(lor.and_then(|x| x.cpu_ratio_to_baseline), 2) + "x",
                cpu(batched),
                own(batched),
                p99(lr),
                p99(lor),
                p99(batched),
                cas(lor, "mlb_lor"),
                cas(batched, "mlb_lor_batched"),
                fo(lor),
                fo(batched)
            );
        }
        let _ = writeln!(md);
        if let Some(small) = get.iter().copied().min_by_key(|x| (x.workers, x.endpoints)) {
            let _ = writeln!(
                md,
                "The filter's own cost in each regime against {} endpoints x {} worker{} (1.00x: it does not grow):\n",
                small.endpoints,
                small.workers,
                if small.workers == 1 { "" } else { "s" }
            );
            let mut workers: Vec<u32> = get.iter().map(|x| x.workers).collect();
            workers.sort_unstable();
            workers.dedup();
            let mut endpoints: Vec<u32> = get.iter().map(|x| x.endpoints).collect();
            endpoints.sort_unstable();
            endpoints.dedup();
            for variant in ["mlb_lor", "mlb_lor_batched"] {
                let base = find(&r.rows, variant, &small).and_then(|x| x.cpu_us_over_baseline);
                let _ = write!(md, "| {variant} |");
                for e in &endpoints {
                    let _ = write!(md, " {e} endpoints |");
                }
                let _ = writeln!(md, "\n|---|{}", "---:|".repeat(endpoints.len()));
                for w in &workers {
                    let _ = write!(md, "| {w} worker{} |", if *w == 1 { "" } else { "s" });
                    for e in &endpoints {
                        let cell = get
                            .iter()
                            .find(|x| x.workers == *w && x.endpoints == *e)
                            .and_then(|x| find(&r.rows, variant, x))
                            .and_then(|x| x.cpu_us_over_baseline);
                        let _ = write!(
                            md,
                            " {} |",
                            match (cell, base) {
                                (Some(c), Some(b)) if b > 0.0 =>
                                    format!("{c:.1} µs ({:.2}x)", c / b),
                                (Some(c), _) => format!("{c:.1} µs"),
                                _ => "-".into(),
                            }
                        );
                    }
                    let _ = writeln!(md);
                }
                let _ = writeln!(md);
            }
        }
    }

    // One worker, every variant (the earlier table).
    let one: Vec<Regime> = get.iter().copied().filter(|x| x.workers == 1).collect();
    if !one.is_empty() {
        let _ = writeln!(md, "## One worker, every variant\n");
        let _ = writeln!(
            md,
            "| variant | endpoints | requests/s | P50 ms | P99 ms | Envoy CPU µs/request (median, min-max) | vs LEAST_REQUEST (paired median) | proxy cores | errors |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for regime in &one {
            for row in r.rows.iter().filter(|x| {
                x.workers == 1 && x.endpoints == regime.endpoints && x.body_bytes.is_none()
            }) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} ({:.1}-{:.1}) | {} | {:.2} | {} |",
                    row.variant,
                    row.endpoints,
                    row.requests_per_s,
                    row.p50_ms,
                    row.p99_ms,
                    row.cpu_us_per_request,
                    row.cpu_us_per_request_min,
                    row.cpu_us_per_request_max,
                    opt(row.cpu_ratio_to_baseline, 2) + "x",
                    row.proxy_cores,
                    row.errors
                );
            }
        }
        let _ = writeln!(md);
    }

    // Request bodies.
    let bodies: Vec<Regime> = regimes
        .iter()
        .copied()
        .filter(|x| x.body_bytes.is_some())
        .collect();
    if !bodies.is_empty() {
        let _ = writeln!(
            md,
            "## Request bodies: PREFIX_AWARE against LOR\n\nPOST `/v1/chat/completions` with chat bodies of each size (16 distinct keys in turn), {} Envoy worker(s), {} endpoints. Loaded: CPU per request and latency with {} connections; unloaded: latency with one connection. \"Added\" is PREFIX_AWARE minus LOR, paired per round, then the median.\n",
            bodies[0].workers,
            bodies[0].endpoints,
            bodies
                .iter()
                .map(|x| x.connections)
                .max()
                .unwrap_or(0)
        );
        let _ = writeln!(
            md,
            "| body | connections | LOR µs/request | PREFIX_AWARE µs/request | added µs | ratio | LOR P50 / P99 ms | PREFIX_AWARE P50 / P99 ms | added P50 / P99 ms | requests/s LOR / PREFIX_AWARE | fail-opens | errors |"
        );
        let _ = writeln!(
            md,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for regime in &bodies {
            let (lor, pa) = (
                find(&r.rows, BODY_BASELINE, regime),
                find(&r.rows, "mlb_prefix", regime),
            );
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {} / {} | {} | {} |",
                regime.body_bytes.map_or("-".into(), body_label),
                regime.connections,
                opt(lor.map(|x| x.cpu_us_per_request), 1),
                opt(pa.map(|x| x.cpu_us_per_request), 1),
                signed(pa.and_then(|x| x.cpu_us_over_baseline), 1),
                opt(pa.and_then(|x| x.cpu_ratio_to_baseline), 2) + "x",
                opt(lor.map(|x| x.p50_ms), 3),
                opt(lor.map(|x| x.p99_ms), 3),
                opt(pa.map(|x| x.p50_ms), 3),
                opt(pa.map(|x| x.p99_ms), 3),
                signed(pa.and_then(|x| x.p50_ms_over_baseline), 3),
                signed(pa.and_then(|x| x.p99_ms_over_baseline), 3),
                opt(lor.map(|x| x.requests_per_s), 0),
                opt(pa.map(|x| x.requests_per_s), 0),
                pa.and_then(|x| x.fail_opens)
                    .map_or("-".into(), |v| v.to_string()),
                lor.map_or(0, |x| x.errors) + pa.map_or(0, |x| x.errors)
            );
        }
        let _ = writeln!(md);
    }

    // Targets.
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | goal | measured | met |");
    let _ = writeln!(md, "|---|---|---|---|");
    for t in targets(&r.rows) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.what,
            t.goal,
            t.measured,
            match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            }
        );
    }

    let _ = writeln!(
        md,
        "\n## Every run\n\nProxy, backend (busiest process) and wrk CPU use in cores, run average.\n"
    );
    let _ = writeln!(md, "| regime | round | variant | requests | requests/s | µs/request | P99 ms | proxy | backend | wrk | errors |");
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &r.measurements {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            m.regime.label(),
            m.round,
            m.variant,
            m.requests,
            m.requests_per_s,
            m.cpu_us_per_request(),
            m.p99_ms,
            m.proxy.average,
            m.backend.average,
            m.load.average,
            m.errors
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    const R4: Regime = Regime {
        workers: 1,
        endpoints: 4,
        body_bytes: None,
        connections: 16,
    };
    const R1024: Regime = Regime {
        workers: 16,
        endpoints: 1024,
        body_bytes: None,
        connections: 64,
    };

    fn m(variant: &str, regime: Regime, round: u32, requests: u64, cpu_s: f64) -> Measurement {
        Measurement {
            variant: variant.into(),
            regime,
            round,
            requests,
            requests_per_s: requests as f64 / 5.0,
            p50_ms: 0.5,
            p99_ms: 1.5,
            proxy_cpu_s: cpu_s,
            proxy: Usage {
                average: 0.9,
                peak: 1.0,
            },
            backend: Usage::default(),
            load: Usage::default(),
            errors: 0,
        }
    }

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 16 connections\n  Latency Distribution\n     50%  714.00us\n     75%    1.00ms\n     90%    1.10ms\n     99%    1.17s\n  108886 requests in 5.00s, 10.0MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  21777.31\n";
        assert_eq!(
            parse_wrk(text),
            Some((108_886, 21_777.31, 0.714, 1170.0, 7))
        );
        assert_eq!(parse_wrk("nonsense"), None);
    }

    #[test]
    fn regimes_pick_connections_threads_warmups_and_baselines() {
        assert_eq!(connections_for(1), 16);
        assert_eq!(connections_for(4), 16);
        assert_eq!(connections_for(16), 64);
        assert_eq!(wrk_threads(&R4), 1);
        assert_eq!(wrk_threads(&R1024), 2);
        assert_eq!(warmup_seconds(&R4), 1);
        // 16 x 1024 x ln 1024 = 113,000 requests: about 12 s at 10,000/s.
        assert_eq!(warmup_seconds(&R1024), 12);
        assert_eq!(R4.baseline(), "least_request");
        let body = Regime {
            body_bytes: Some(1 << 20),
            ..R4
        };
        assert_eq!(body.baseline(), "mlb_lor");
        assert_eq!(
            body.label(),
            "1 worker x 4 endpoints, 1 MB body, 16 connections"
        );
        assert_eq!(body_label(1024), "1 KB");
        assert_eq!(body_label(65536), "64 KB");
        assert_eq!(body_label(1000), "1000 B");
    }

    #[test]
    fn rows_take_medians_paired_ratios_and_own_costs() {
        let ms = vec![
            m("least_request", R4, 1, 1000, 0.050),
            m("mlb_lor", R4, 1, 1000, 0.060),
            m("least_request", R4, 2, 1000, 0.100),
            m("mlb_lor", R4, 2, 1000, 0.110),
            m("least_request", R4, 3, 1000, 0.040),
            m("mlb_lor", R4, 3, 1000, 0.050),
            m("mlb_lor", R1024, 1, 2000, 0.1),
        ];
        let variants = vec!["least_request".to_owned(), "mlb_lor".to_owned()];
        let filters = vec![FilterCounts {
            variant: "mlb_lor".into(),
            regime: R4,
            stats: FilterStats {
                cas_conflicts: 7,
                ..FilterStats::default()
            },
        }];
        let rows = rows(&ms, &variants, &[R4, R1024], &filters);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].cpu_us_per_request, 50.0);
        assert_eq!(rows[0].cpu_ratio_to_baseline, Some(1.0));
        assert_eq!(rows[0].cpu_us_over_baseline, Some(0.0));
        assert_eq!(
            rows[0].cas_conflicts, None,
            "Envoy alone has no filter stats"
        );
        assert_eq!(rows[1].cpu_us_per_request, 60.0);
        assert_eq!(
            (
                rows[1].cpu_us_per_request_min,
                rows[1].cpu_us_per_request_max
            ),
            (50.0, 110.0)
        );
        // Paired per round: 1.2, 1.1, 1.25 -> median 1.2; own cost 10 µs every round.
        assert_eq!(rows[1].cpu_ratio_to_baseline, Some(1.2));
        assert_eq!(rows[1].cpu_us_over_baseline, Some(10.0));
        assert_eq!(rows[1].cas_conflicts, Some(7));
        assert_eq!(rows[1].fail_opens, Some(0));
        assert_eq!(rows[2].cpu_ratio_to_baseline, None, "no baseline at 1024");
        let json = serde_json::to_value(&rows[1]).unwrap();
        assert_eq!(json["variant"], "mlb_lor");
        assert_eq!(json["workers"], 1);
        assert_eq!(json["body_bytes"], serde_json::Value::Null);
        assert_eq!(json["baseline"], "least_request");
        assert!(json["cpu_us_per_request"].is_number());
    }

    #[test]
    fn targets_and_markdown() {
        let body = Regime {
            body_bytes: Some(65536),
            ..R4
        };
        let ms = vec![
            m("least_request", R4, 1, 1000, 0.050),
            m("mlb_lor", R4, 1, 1000, 0.060),
            m("mlb_lor_batched", R4, 1, 1000, 0.058),
            m("least_request", R1024, 1, 1000, 0.070),
            m("mlb_lor", R1024, 1, 1000, 0.090),
            m("mlb_lor_batched", R1024, 1, 1000, 0.084),
            m("mlb_lor", body, 1, 1000, 0.100),
            m("mlb_prefix", body, 1, 1000, 0.110),
        ];
        let variants: Vec<String> = ["least_request", "mlb_lor", "mlb_lor_batched", "mlb_prefix"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let filters: Vec<FilterCounts> = [
            (R4, "mlb_lor"),
            (R1024, "mlb_lor"),
            (R1024, "mlb_lor_batched"),
        ]
        .iter()
        .map(|(regime, v)| FilterCounts {
            variant: (*v).into(),
            regime: *regime,
            stats: FilterStats {
                cas_conflicts: 3,
                fail_open: u64::from(*v == "mlb_lor_batched"),
                ..FilterStats::default()
            },
        })
        .collect();
        let rows = rows(&ms, &variants, &[R4, R1024, body], &filters);
        let t = targets(&rows);
        assert_eq!(t.len(), 4, "{t:?}");
        assert_eq!(t[0].met, Some(true), "1.20x at one worker: {t:?}");
        // LOR: 20 µs against 10 µs = 2.0x: missed. Batched: 14 against 8 = 1.75x: missed.
        assert_eq!(t[1].met, Some(false));
        assert!(t[1].measured.contains("2.00x"), "{}", t[1].measured);
        assert!(t[2].measured.contains("1.75x"), "{}", t[2].measured);
        assert_eq!(t[3].met, Some(false), "one fail-open");
        let report = OverheadReport {
            rows: rows.clone(),
            measurements: ms,
            machine_line: "today".into(),
            method: "how".into(),
            notes: vec!["4 endpoints, polls: 40/s".into()],
            elapsed_s: 1.0,
            smoke: false,
        };
        let md = markdown(&report);
        assert!(
            md.contains("how\n\n- 4 endpoints, polls: 40/s\n\n## Workers x endpoints"),
            "{md}"
        );
        assert!(
            md.contains("| 16 | 1024 | 64 | 70.0 | 90.0 | 20.0 | 1.29x | 84.0 | 14.0 |"),
            "{md}"
        );
        assert!(md.contains("| 16 workers | - | 20.0 µs (2.00x) |"), "{md}");
        assert!(md.contains("## One worker, every variant"));
        assert!(md.contains("| mlb_lor | 4 | 200 |"), "{md}");
        assert!(
            md.contains("| 64 KB | 16 | 100.0 | 110.0 | +10.0 | 1.10x |"),
            "{md}"
        );
        assert!(md.contains("| **no** |"));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), Some(2.5));
    }

    #[test]
    fn chat_bodies_have_the_size_asked_and_a_key_first() {
        for (bytes, key) in [(1024, 0), (65536, 5), (1 << 20, 15)] {
            let body = chat_body(bytes, key);
            assert_eq!(body.len(), bytes as usize);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let system = v["messages"][0]["content"].as_str().unwrap();
            assert!(system.starts_with(&format!("key {key:04} ")));
            if bytes >= 65536 {
                assert!(
                    system.len() >= 4096,
                    "the whole key is in the first message"
                );
            }
            assert_eq!(v["messages"][1]["role"], "user");
        }
        assert_ne!(chat_body(1024, 1)[..120], chat_body(1024, 2)[..120]);
        let script = wrk_post_script(&["/tmp/a.json".into(), "/tmp/b.json".into()]);
        assert!(script.contains("local files = {\"/tmp/a.json\", \"/tmp/b.json\"}"));
        assert!(script.contains("wrk.format(\"POST\""));
        assert!(script.contains("function request()"));
    }
}
