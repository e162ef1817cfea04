//! The servers' own view of their load, for a fleet-wide estimate across Envoy replicas.
//!
//! One Envoy counts exactly the requests *it* has in flight on each endpoint, but each replica of
//! a gateway sees only its own share. The servers know the total. The leader VM of each Envoy
//! polls every endpoint (Prometheus `/metrics` or vLLM's `GET /load`) and publishes, per endpoint,
//! the *other* replicas' share: the reported total minus what this Envoy had in flight there when
//! the report arrived. Routing then uses `local count (exact, live) + other replicas' share (as
//! of the last report)`. This Envoy's own requests are never counted twice: the ones in the
//! report are subtracted, the ones routed after it are only in the live local count.
//!
//! Everything here is pure: parsing, the poll schedule with its budget, the leader's collection,
//! the shared record every VM reads, and the estimate selection ranks by.

use std::collections::HashMap;
use std::fmt;

use crate::membership::Membership;
use crate::select::Loads;

pub const DEFAULT_SERVER_LOAD_INTERVAL_MS: u64 = 100;
pub const DEFAULT_SERVER_LOAD_STALE_AFTER_MS: u64 = 1_000;
pub const DEFAULT_RUNNING_METRIC: &str = "vllm:num_requests_running";
pub const DEFAULT_WAITING_METRIC: &str = "vllm:num_requests_waiting";
/// A poll costs Envoy about 0.2 ms of CPU: 200 a second is about 4 % of a core, enough for 20
/// endpoints every 100 ms. Larger pools are polled less often rather than costing more.
pub const DEFAULT_MAX_POLLS_PER_SECOND: u64 = 200;
/// vLLM's `/metrics` with histograms is 50-300 KB; a megabyte leaves room without letting a
/// misbehaving server make the filter copy more.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;
/// Polls in flight at once, whatever the budget: bounds what a pool of hanging servers ties up.
pub const MAX_POLLS_IN_FLIGHT: usize = 64;
/// A failing endpoint is polled with exponential backoff up to this period.
const MAX_BACKOFF_MS: u64 = 30_000;
/// Selection ranks by load per unit of weight, in fixed point.
const RANK_SCALE: u64 = 1_024;
/// Endpoints whose batch is full sort after every endpoint with a free slot.
const FULL_BIT: u64 = 1 << 62;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    /// Prometheus text with a running and a waiting gauge (vLLM, SGLang, llama.cpp server).
    Metrics,
    /// vLLM's `GET /load` (`--enable-server-load-tracking`): `{"server_load": N}`.
    LoadEndpoint,
}

impl LoadSource {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "metrics" => Some(Self::Metrics),
            "load_endpoint" => Some(Self::LoadEndpoint),
            _ => None,
        }
    }

    pub fn default_path(self) -> &'static str {
        match self {
            Self::Metrics => "/metrics",
            Self::LoadEndpoint => "/load",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLoad {
    pub source: LoadSource,
    pub path: String,
    pub interval_ms: u64,
    pub stale_after_ms: u64,
    /// The Envoy cluster the polls are dispatched to (the pool's own override_host cluster, or a
    /// dedicated ORIGINAL_DST cluster).
    pub cluster: String,
    pub running_metric: String,
    pub waiting_metric: String,
    /// Ask servers for ORCA load reports on responses (`endpoint-load-metrics`).
    pub response_reports: bool,
    pub max_polls_per_second: u32,
    pub max_body_bytes: usize,
}

impl ServerLoad {
    /// A poll slower than the staleness limit could only deliver a report that is already stale.
    pub fn timeout_ms(&self) -> u64 {
        self.stale_after_ms.min(10_000)
    }

    /// How often each of `endpoints` can be polled within the budget.
    pub fn period_ms(&self, endpoints: usize) -> u64 {
        let budget_period =
            (endpoints as u64 * 1_000).div_ceil(u64::from(self.max_polls_per_second.max(1)));
        self.interval_ms.max(budget_period)
    }

    /// When the budget stretches the poll period, reports must live longer than the configured
    /// limit, or a large pool would never have a fresh report.
    pub fn effective_stale_after_ms(&self, endpoints: usize) -> u64 {
        self.stale_after_ms.max(2 * self.period_ms(endpoints))
    }
}

/// What one server said about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Requests inside the server: running plus waiting.
    pub total: u32,
    /// Requests waiting for a batch slot; `None` when the source does not say (`GET /load`).
    pub waiting: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportError {
    Status(u16),
    /// Timeout, refused connection, or a reset: Envoy delivered no answer.
    NoAnswer,
    TooLarge {
        limit: usize,
    },
    MissingMetric(String),
    BadValue(String),
    NotJson,
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(code) => write!(f, "HTTP status {code}"),
            Self::NoAnswer => f.write_str("no answer (timeout, refused or reset)"),
            Self::TooLarge { limit } => write!(f, "answer larger than max_body_bytes ({limit})"),
            Self::MissingMetric(name) => write!(f, "metric {name} not found"),
            Self::BadValue(name) => write!(f, "metric {name} has no usable value"),
            Self::NotJson => f.write_str("answer is not {\"server_load\": N}"),
        }
    }
}

/// Reads a poll's answer body.
pub fn parse_report(config: &ServerLoad, body: &[u8]) -> Result<Report, ReportError> {
    match config.source {
        LoadSource::Metrics => parse_metrics(body, &config.running_metric, &config.waiting_metric),
        LoadSource::LoadEndpoint => parse_load_endpoint(body),
    }
}

/// Sums each metric over its label sets (a server with several engines reports one per engine).
pub fn parse_metrics(body: &[u8], running: &str, waiting: &str) -> Result<Report, ReportError> {
    let mut sums = [None::<f64>; 2];
    for line in body.split(|&b| b == b'\n') {
        if matches!(line.first(), None | Some(b'#')) {
            continue;
        }
        let name_end = line
            .iter()
            .position(|&b| b == b'{' || b == b' ' || b == b'\t')
            .unwrap_or(line.len());
        let name = &line[..name_end];
        let slot = if name == running.as_bytes() {
            0
        } else if name == waiting.as_bytes() {
            1
        } else {
            continue;
        };
        let metric = if slot == 0 { running } else { waiting };
        let value = sample_value(&line[name_end..])
            .ok_or_else(|| ReportError::BadValue(metric.to_owned()))?;
        *sums[slot].get_or_insert(0.0) += value;
    }
    let running_sum = sums[0].ok_or_else(|| ReportError::MissingMetric(running.to_owned()))?;
    let waiting_sum = sums[1].ok_or_else(|| ReportError::MissingMetric(waiting.to_owned()))?;
    let waiting = to_count(waiting_sum);
    Ok(Report {
        total: to_count(running_sum).saturating_add(waiting),
        waiting: Some(waiting),
    })
}

/// The value of a sample line after its name: skips the label set (quotes may hide braces),
/// then takes the first field; a trailing timestamp is ignored.
fn sample_value(rest: &[u8]) -> Option<f64> {
    let mut after_labels = rest;
    if rest.first() == Some(&b'{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let close = rest.iter().position(|&b| {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quotes = !in_quotes;
            } else if b == b'}' && !in_quotes {
                return true;
            }
            false
        })?;
        after_labels = &rest[close + 1..];
    }
    let text = std::str::from_utf8(after_labels).ok()?;
    let value: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value)
}

fn to_count(value: f64) -> u32 {
    value.round().min(f64::from(u32::MAX)) as u32
}

pub fn parse_load_endpoint(body: &[u8]) -> Result<Report, ReportError> {
    let document: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| ReportError::NotJson)?;
    let load = document
        .get("server_load")
        .and_then(serde_json::Value::as_f64)
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or(ReportError::NotJson)?;
    Ok(Report {
        total: to_count(load),
        waiting: None,
    })
}

/// The request header that asks vLLM (and Triton) for a load report on the response.
pub const RESPONSE_REPORT_REQUEST_HEADER: &str = "endpoint-load-metrics-format";
pub const RESPONSE_REPORT_HEADER: &str = "endpoint-load-metrics";

/// Requests waiting on the server, from an ORCA report in vLLM's text or JSON form:
/// `TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3.0`.
pub fn parse_response_report(value: &str) -> Option<u32> {
    let value = value.trim();
    let waiting = if let Some(text) = value.strip_prefix("TEXT ") {
        text.split(',').find_map(|pair| {
            let (key, number) = pair.split_once('=')?;
            (key.trim() == "named_metrics.num_requests_waiting")
                .then(|| number.trim().parse::<f64>().ok())?
        })?
    } else if let Some(json) = value.strip_prefix("JSON ") {
        let document: serde_json::Value = serde_json::from_str(json).ok()?;
        document
            .get("named_metrics")?
            .get("num_requests_waiting")?
            .as_f64()?
    } else {
        return None;
    };
    (waiting.is_finite() && waiting >= 0.0).then(|| to_count(waiting))
}

// ---------------------------------------------------------------------------------------------
// The poll schedule (leader VM only)

#[derive(Debug, Clone, Copy, Default)]
struct PollState {
    next_due_ms: u64,
    /// When the poll in flight was due: the next one is due an interval after that, not after
    /// it actually started, or polls that can only start on ticks would drift late.
    scheduled_ms: u64,
    in_flight: bool,
    failures: u32,
}

/// Which endpoints to poll on this tick: each at most once per interval, never two polls of one
/// endpoint at once, a failing endpoint backed off exponentially, and the whole pool within a
/// budget of polls per second, spread round-robin so a large pool is polled evenly.
#[derive(Debug, Default)]
pub struct Poller {
    states: HashMap<String, PollState>,
    membership_token: u64,
    in_flight: HashMap<u32, (String, u64)>,
    cursor: usize,
    allowance: f64,
    last_tick_ms: u64,
}

impl Poller {
    /// The endpoints of `membership` to poll now; `pollable` excludes endpoints the polls
    /// cannot reach as themselves (e.g. not hosts of the Envoy cluster).
    pub fn due(
        &mut self,
        config: &ServerLoad,
        membership: &Membership,
        pollable: impl Fn(usize) -> bool,
        now_ms: u64,
    ) -> Vec<String> {
        if membership.token() != self.membership_token {
            self.membership_token = membership.token();
            self.states
                .retain(|address, _| membership.position(address).is_some());
        }
        let endpoints = membership.endpoints();
        let rate = f64::from(config.max_polls_per_second.max(1));
        let elapsed = now_ms.saturating_sub(self.last_tick_ms) as f64;
        let burst = (rate * config.interval_ms as f64 / 1_000.0).max(1.0);
        self.allowance = if self.last_tick_ms == 0 {
            burst
        } else {
            (self.allowance + elapsed * rate / 1_000.0).min(burst)
        };
        self.last_tick_ms = now_ms.max(1);
        let mut picked = Vec::new();
        let count = endpoints.len();
        let start = self.cursor;
        for step in 0..count {
            if self.allowance < 1.0 || self.in_flight.len() + picked.len() >= MAX_POLLS_IN_FLIGHT {
                break;
            }
            let index = (start + step) % count;
            if !pollable(index) {
                continue;
            }
            let address = &endpoints[index];
            let state = self.states.entry(address.clone()).or_default();
            if state.in_flight || now_ms < state.next_due_ms {
                continue;
            }
            state.in_flight = true;
            // A first poll, or one far behind (a backoff, a stall): on a fresh grid from now.
            state.scheduled_ms = if state.next_due_ms == 0
                || now_ms >= state.next_due_ms.saturating_add(config.interval_ms)
            {
                now_ms
            } else {
                state.next_due_ms
            };
            self.allowance -= 1.0;
            picked.push(address.clone());
            self.cursor = (index + 1) % count;
        }
        picked
    }

    /// A poll was dispatched under `token`.
    pub fn started(&mut self, token: u32, address: &str, now_ms: u64) {
        self.in_flight.insert(token, (address.to_owned(), now_ms));
    }

    /// A poll could not even be dispatched (e.g. the cluster does not exist).
    pub fn not_started(&mut self, config: &ServerLoad, address: &str, now_ms: u64) {
        self.settle(config, address, now_ms, now_ms, false);
    }

    /// Whether `token` is one of ours.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.contains_key(&token)
    }

    /// Settles the poll `token`; returns the endpoint it was for.
    pub fn finished(
        &mut self,
        config: &ServerLoad,
        token: u32,
        now_ms: u64,
        ok: bool,
    ) -> Option<String> {
        let (address, started_ms) = self.in_flight.remove(&token)?;
        self.settle(config, &address, started_ms, now_ms, ok);
        Some(address)
    }

    fn settle(
        &mut self,
        config: &ServerLoad,
        address: &str,
        started_ms: u64,
        now_ms: u64,
        ok: bool,
    ) {
        let Some(state) = self.states.get_mut(address) else {
            return; // left the pool meanwhile
        };
        state.in_flight = false;
        if ok {
            state.failures = 0;
            // A steady period on the grid the polls were due on (see `scheduled_ms`).
            state.next_due_ms = state
                .scheduled_ms
                .max(started_ms.saturating_sub(config.interval_ms))
                .saturating_add(config.interval_ms);
        } else {
            state.failures = state.failures.saturating_add(1);
            let backoff = config
                .interval_ms
                .saturating_mul(1 << state.failures.min(16))
                .min(MAX_BACKOFF_MS.max(config.interval_ms));
            state.next_due_ms = now_ms.saturating_add(backoff);
        }
    }

    pub fn polls_in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

// ---------------------------------------------------------------------------------------------
// The shared record: written by the leader, read by every VM on its tick

/// Per endpoint, what every VM needs to estimate its load and capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointLoad {
    /// Envoy's `load_balancing_weight` for the host (1 when unset or unknown).
    pub weight: u32,
    /// The other replicas' share: reported total minus this Envoy's count at that moment.
    pub remote: u32,
    /// When the last good report arrived (ms since the epoch); 0 = never.
    pub reported_at_ms: u64,
    /// The server's batch size, learned from the last report that showed a queue (running
    /// requests while others wait); 0 = not known yet.
    pub capacity: u32,
    /// Waiting requests in the last report.
    pub waiting: u32,
    /// Until when an in-band response report of a queue marks the endpoint full (VM-local).
    pub queued_until_ms: u64,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        Self {
            weight: 1,
            remote: 0,
            reported_at_ms: 0,
            capacity: 0,
            waiting: 0,
            queued_until_ms: 0,
        }
    }
}

impl EndpointLoad {
    pub fn fresh(&self, now_ms: u64, stale_after_ms: u64) -> bool {
        self.reported_at_ms != 0 && now_ms.saturating_sub(self.reported_at_ms) <= stale_after_ms
    }
}

const RECORD_MAGIC: &[u8; 5] = b"MLBV1";
const RECORD_ENTRY_FIXED: usize = 1 + 4 + 4 + 8 + 4 + 4;

pub fn encode_record(entries: &HashMap<String, EndpointLoad>) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + entries.len() * (RECORD_ENTRY_FIXED + 24));
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (address, load) in entries {
        let address = &address.as_bytes()[..address.len().min(255)];
        out.push(address.len() as u8);
        out.extend_from_slice(address);
        out.extend_from_slice(&load.weight.to_le_bytes());
        out.extend_from_slice(&load.remote.to_le_bytes());
        out.extend_from_slice(&load.reported_at_ms.to_le_bytes());
        out.extend_from_slice(&load.capacity.to_le_bytes());
        out.extend_from_slice(&load.waiting.to_le_bytes());
    }
    out
}

/// `None` when the bytes are not a record this version wrote.
pub fn decode_record(bytes: &[u8]) -> Option<HashMap<String, EndpointLoad>> {
    let rest = bytes.strip_prefix(RECORD_MAGIC)?;
    let (count, mut rest) = rest.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    let mut entries = HashMap::with_capacity(count.min(4_096));
    for _ in 0..count {
        let (&len, after) = rest.split_first()?;
        let len = usize::from(len);
        if after.len() < len + RECORD_ENTRY_FIXED - 1 {
            return None;
        }
        let address = std::str::from_utf8(&after[..len]).ok()?.to_owned();
        let fields = &after[len..];
        let u32_at = |at: usize| {
            u32::from_le_bytes([fields[at], fields[at + 1], fields[at + 2], fields[at + 3]])
        };
        let mut reported = [0u8; 8];
        reported.copy_from_slice(&fields[8..16]);
        entries.insert(
            address,
            EndpointLoad {
                weight: u32_at(0).max(1),
                remote: u32_at(4),
                reported_at_ms: u64::from_le_bytes(reported),
                capacity: u32_at(16),
                waiting: u32_at(20),
                queued_until_ms: 0,
            },
        );
        rest = &fields[RECORD_ENTRY_FIXED - 1..];
    }
    Some(entries)
}

/// The leader's side: folds reports and Envoy's weights into the record it publishes.
#[derive(Debug, Default)]
pub struct Collector {
    entries: HashMap<String, EndpointLoad>,
    dirty: bool,
}

impl Collector {
    /// Starts from what a previous leader published, so a change of leader loses nothing.
    pub fn adopt(&mut self, published: HashMap<String, EndpointLoad>) {
        for (address, load) in published {
            self.entries.entry(address).or_insert(load);
        }
    }

    /// `local` is this Envoy's in-flight count on the endpoint as the report arrived.
    pub fn report(&mut self, address: &str, report: Report, local: u32, now_ms: u64) {
        let entry = self.entries.entry(address.to_owned()).or_default();
        entry.remote = report.total.saturating_sub(local);
        entry.reported_at_ms = now_ms.max(1);
        entry.waiting = report.waiting.unwrap_or(0);
        if let Some(waiting) = report.waiting.filter(|&w| w > 0) {
            entry.capacity = report.total - waiting;
        }
        self.dirty = true;
    }

    pub fn set_weight(&mut self, address: &str, weight: u32) {
        let entry = self.entries.entry(address.to_owned()).or_default();
        if entry.weight != weight.max(1) {
            entry.weight = weight.max(1);
            self.dirty = true;
        }
    }

    /// Forgets endpoints that left the pool, so nothing stale survives if one comes back.
    pub fn retain(&mut self, membership: &Membership) {
        let before = self.entries.len();
        self.entries
            .retain(|address, _| membership.position(address).is_some());
        self.dirty |= self.entries.len() != before;
    }

    /// The record to publish, if anything changed since the last call.
    pub fn take_record(&mut self) -> Option<Vec<u8>> {
        std::mem::take(&mut self.dirty).then(|| encode_record(&self.entries))
    }

    pub fn get(&self, address: &str) -> Option<&EndpointLoad> {
        self.entries.get(address)
    }
}

/// A VM's copy of the record, indexed like the pool's current membership.
#[derive(Debug, Default)]
pub struct LoadView {
    by_address: HashMap<String, EndpointLoad>,
    aligned: Vec<EndpointLoad>,
    /// Some aligned entry differs from the default; without any, selection reads plain counts
    /// and skips the view (every endpoint, every request).
    news: bool,
    membership_token: u64,
    record_cas: Option<u32>,
}

impl LoadView {
    /// Takes a newly read record (skipped when its CAS token shows it unchanged).
    pub fn refresh(&mut self, record: Option<(Vec<u8>, u32)>, membership: &Membership) {
        let Some((bytes, cas)) = record else {
            return;
        };
        if self.record_cas == Some(cas) {
            return;
        }
        let Some(entries) = decode_record(&bytes) else {
            return;
        };
        self.record_cas = Some(cas);
        // In-band queue marks are this VM's own news; keep them across refreshes.
        let mut entries = entries;
        for (address, load) in &self.by_address {
            if load.queued_until_ms == 0 {
                continue;
            }
            entries.entry(address.clone()).or_default().queued_until_ms = load.queued_until_ms;
        }
        self.by_address = entries;
        self.realign(membership);
    }

    /// Re-indexes by `membership` if the pool changed.
    pub fn align(&mut self, membership: &Membership) {
        if membership.token() != self.membership_token || self.aligned.len() != membership.len() {
            self.realign(membership);
        }
    }

    fn realign(&mut self, membership: &Membership) {
        self.membership_token = membership.token();
        self.aligned = membership
            .endpoints()
            .iter()
            .map(|address| self.by_address.get(address).copied().unwrap_or_default())
            .collect();
        self.news = self.aligned.iter().any(|e| *e != EndpointLoad::default());
    }

    /// The entries by endpoint position; empty when none holds news.
    pub fn entries(&self) -> &[EndpointLoad] {
        if self.news {
            &self.aligned
        } else {
            &[]
        }
    }

    /// An in-band report (`endpoint-load-metrics`) from a response this VM proxied: a queue
    /// marks the endpoint full for `hold_ms`, an empty queue clears the mark.
    pub fn response_report(&mut self, endpoint: usize, address: &str, waiting: u32, until_ms: u64) {
        let until = if waiting > 0 { until_ms } else { 0 };
        if let Some(entry) = self.aligned.get_mut(endpoint) {
            entry.queued_until_ms = until;
            self.news |= until != 0;
        }
        if let Some(entry) = self.by_address.get_mut(address) {
            entry.queued_until_ms = until;
        } else {
            self.by_address.insert(
                address.to_owned(),
                EndpointLoad {
                    queued_until_ms: until,
                    ..EndpointLoad::default()
                },
            );
        }
    }
}

/// The load selection sees: this Envoy's exact count plus, while the last report is fresh, the
/// other replicas' share; ranked by load per unit of weight, endpoints with a full batch last.
pub struct Estimates<'a, L: Loads + ?Sized> {
    pub local: &'a L,
    /// Indexed like `local`; shorter (or empty) means "no news": weight 1, no remote share.
    pub view: &'a [EndpointLoad],
    pub now_ms: u64,
    pub stale_after_ms: u64,
}

impl<L: Loads + ?Sized> Estimates<'_, L> {
    /// The view's entry, `None` when the view has no news for the endpoint (the common case
    /// without server load or endpoint weights, which then costs no more than plain counts).
    fn entry(&self, endpoint: usize) -> Option<&EndpointLoad> {
        self.view
            .get(endpoint)
            .filter(|entry| **entry != EndpointLoad::default())
    }

    pub fn estimate(&self, endpoint: usize) -> u32 {
        let local = self.local.load(endpoint);
        match self.entry(endpoint) {
            Some(entry) => self.judge(entry, local).0,
            None => local,
        }
    }

    /// No free batch slot: the estimate reached the learned batch size, or a fresh report (or
    /// in-band report) shows a queue on a server whose batch size is not known yet.
    pub fn full(&self, endpoint: usize) -> bool {
        self.entry(endpoint)
            .is_some_and(|entry| self.judge(entry, self.local.load(endpoint)).1)
    }

    /// (estimate, full) from one look at the entry: selection asks for both of every endpoint
    /// on every request.
    fn judge(&self, entry: &EndpointLoad, local: u32) -> (u32, bool) {
        let fresh = entry.fresh(self.now_ms, self.stale_after_ms);
        let estimate = if fresh {
            local.saturating_add(entry.remote)
        } else {
            local
        };
        let full = if entry.capacity > 0 {
            estimate >= entry.capacity
        } else {
            entry.queued_until_ms > self.now_ms || (entry.waiting > 0 && fresh)
        };
        (estimate, full)
    }
}

impl<L: Loads + ?Sized> Loads for Estimates<'_, L> {
    fn endpoint_count(&self) -> usize {
        self.local.endpoint_count()
    }

    fn load(&self, endpoint: usize) -> u32 {
        self.estimate(endpoint)
    }

    fn rank(&self, endpoint: usize) -> u64 {
        let local = self.local.load(endpoint);
        let Some(entry) = self.entry(endpoint) else {
            return (u64::from(local) * RANK_SCALE).min(FULL_BIT - 1);
        };
        let (estimate, full) = self.judge(entry, local);
        let weight = u64::from(entry.weight.max(1));
        let per_weight = (u64::from(estimate) * RANK_SCALE / weight).min(FULL_BIT - 1);
        if full {
            FULL_BIT | per_weight
        } else {
            per_weight
        }
    }
}

#[cfg(test)]
mod tests;
