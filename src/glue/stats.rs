//! Envoy stats for operators. The request path only bumps local counters; they are flushed to
//! Envoy on the housekeeping tick, so a request costs no metric host calls. Gauges of in-flight
//! requests are published by the one VM holding the leader lease, from the shared table.

use std::collections::HashMap;
use std::rc::Rc;

use super::host::{HostRef, MetricKind};
use crate::config::Config;
use crate::membership::Membership;
use crate::prefix::{Key, KeySource, NoKey};
use crate::select::PrefixChoice;
use crate::table::TableError;
use crate::tracker::{EndpointEstimate, Events, Routed, TrackerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOpen {
    HostError,
    Contention,
    BadSharedState,
    NoEligibleEndpoint,
    HeaderWrite,
    Reentered,
    /// `PREFIX_AWARE` without the hold filter after this one: the headers were gone to the
    /// router before the body gave its key.
    NoHoldFilter,
    /// Every worker slot of the shared table is owned by a live VM.
    SlotsExhausted,
}

impl FailOpen {
    const ALL: [FailOpen; 8] = [
        Self::HostError,
        Self::Contention,
        Self::BadSharedState,
        Self::NoEligibleEndpoint,
        Self::HeaderWrite,
        Self::Reentered,
        Self::NoHoldFilter,
        Self::SlotsExhausted,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::HostError => "host_error",
            Self::Contention => "contention",
            Self::BadSharedState => "bad_shared_state",
            Self::NoEligibleEndpoint => "no_eligible_endpoint",
            Self::HeaderWrite => "header_write",
            Self::Reentered => "reentered",
            Self::NoHoldFilter => "no_hold_filter",
            Self::SlotsExhausted => "slots_exhausted",
        }
    }
}

impl From<&TrackerError> for FailOpen {
    fn from(e: &TrackerError) -> Self {
        match e {
            TrackerError::Store(_) => Self::HostError,
            TrackerError::Contention => Self::Contention,
            TrackerError::Table(TableError::SlotsExhausted) => Self::SlotsExhausted,
            TrackerError::Table(_) | TrackerError::Membership(_) => Self::BadSharedState,
            TrackerError::NoEligibleEndpoint => Self::NoEligibleEndpoint,
        }
    }
}

/// A defined metric; `None` when the host refused to define it (the stat is then skipped
/// rather than failing the filter).
type Metric = Option<u32>;

/// Envoy's metrics, as the host exposes them.
struct Sink(HostRef);

impl Sink {
    fn define(&self, kind: MetricKind, name: &str) -> Metric {
        self.0.define_metric(kind, name).ok()
    }

    fn counter(&self, name: &str) -> Metric {
        self.define(MetricKind::Counter, name)
    }

    fn gauge(&self, name: &str) -> Metric {
        self.define(MetricKind::Gauge, name)
    }

    fn add(&self, metric: Metric, delta: u64) {
        if let (Some(id), true) = (metric, delta > 0) {
            let _ = self
                .0
                .increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
        }
    }

    fn set(&self, metric: Metric, value: u64) {
        if let Some(id) = metric {
            let _ = self.0.record_metric(id, value);
        }
    }
}

struct EndpointMetrics {
    routed: Metric,
    in_flight: Metric,
    eligible: Metric,
    /// With server load only: the estimate selection uses, and report health.
    estimated: Metric,
    /// With `admin_cluster`: the Envoy endpoint weight the filter applies.
    weight: Metric,
    /// With server load: the batch size learned from the server's reports.
    batch_size: Metric,
    load_reports: Metric,
    load_report_errors: Metric,
    load_stale: Metric,
}

/// Per-endpoint metrics are defined for at most this many addresses per VM: Envoy never frees
/// a metric, and weeks of membership churn could otherwise grow them without bound.
const MAX_DEFINED_ENDPOINTS: usize = 4 * crate::config::MAX_ENDPOINTS;

impl EndpointMetrics {
    const NONE: Self = Self {
        routed: None,
        in_flight: None,
        eligible: None,
        estimated: None,
        weight: None,
        batch_size: None,
        load_reports: None,
        load_report_errors: None,
        load_stale: None,
    };
}

/// `PREFIX_AWARE`'s decisions.
struct PrefixMetrics {
    routed: Metric,
    spilled: Metric,
    fallback: [Metric; 4],
    raw_body_keys: Metric,
    body_bytes_read: Metric,
}

/// Why a `PREFIX_AWARE` request was routed by least outstanding requests.
const PREFIX_FALLBACKS: [&str; 4] = ["no_body", "truncated", "scan_limit", "all_busy"];

#[derive(Default)]
struct PrefixDeltas {
    routed: u64,
    spilled: u64,
    fallback: [u64; 4],
    raw_body_keys: u64,
    body_bytes_read: u64,
}

/// Fleet-wide totals of the server-load poller (leader only) and of in-band reports.
struct ServerLoadMetrics {
    reports: Metric,
    report_errors: Metric,
    stale_endpoints: Metric,
    polls_per_second: Metric,
    response_reports: Metric,
}

struct EventMetrics {
    cas_conflicts: Metric,
    corrections: Metric,
    reclaimed_requests: Metric,
    reaped_vms: Metric,
    lost_slots: Metric,
    deferred_releases: Metric,
    dropped_releases: Metric,
    stale_releases: Metric,
    membership_changes: Metric,
    pruned_endpoints: Metric,
    ejections: Metric,
    ejections_capped: Metric,
}

pub struct Stats {
    sink: Sink,
    prefix: String,
    decisions: Metric,
    fail_open: [Metric; FailOpen::ALL.len()],
    events: EventMetrics,
    in_flight: Metric,
    endpoint_count: Metric,
    eligible_count: Metric,
    pending_releases: Metric,
    admin_polls: Metric,
    admin_poll_errors: Metric,
    unhonoured: Metric,
    excused: Metric,
    not_in_cluster: Metric,
    shared_data_bytes: Metric,
    vm_memory_bytes: Metric,
    server_load: Option<ServerLoadMetrics>,
    /// Envoy's endpoint weights are read (`admin_cluster` is set).
    weights: bool,
    prefix_routing: Option<PrefixMetrics>,
    prefix_delta: PrefixDeltas,
    /// Per-endpoint metrics by address, defined once per address for the VM's lifetime (Envoy
    /// never frees a metric), off the request path, and at most `MAX_DEFINED_ENDPOINTS`.
    defined: HashMap<String, Rc<EndpointMetrics>>,
    /// `defined` entries of the current membership, by position.
    endpoints: Vec<Rc<EndpointMetrics>>,
    endpoints_token: u64,
    /// Decisions counted for endpoints of a membership newer than `endpoints` (the request
    /// path never defines metrics; the next tick does).
    routed_carry: HashMap<String, u64>,
    defined_capped: bool,
    decisions_delta: u64,
    unhonoured_delta: u64,
    excused_delta: u64,
    fail_open_delta: [u64; FailOpen::ALL.len()],
    routed_delta: Vec<u64>,
    /// Per endpoint address: (reports, errors) since the last flush.
    report_delta: HashMap<String, (u64, u64)>,
    response_reports_delta: u64,
    /// This VM's contribution to the shared pending-releases gauge, which sums all VMs.
    pending_published: u64,
}

impl Stats {
    pub fn new(host: HostRef, config: &Config, membership: &Rc<Membership>) -> Self {
        let sink = Sink(host);
        let counter = |name: &str| sink.counter(name);
        let gauge = |name: &str| sink.gauge(name);
        // Which build runs: one gauge per version, always 1. Outside `model_lb.` so the pool
        // tag rule does not take "build_info" for a pool.
        sink.set(
            gauge(&format!(
                "model_lb_build_info.{}",
                crate::version_stat_segment()
            )),
            1,
        );
        let prefix = format!("model_lb.{}.", config.pool);
        let name = |suffix: &str| format!("{prefix}{suffix}");
        let mut stats = Self {
            decisions: counter(&name(&format!("decisions.{}", config.strategy.stat_name()))),
            fail_open: FailOpen::ALL.map(|r| counter(&name(&format!("fail_open.{}", r.name())))),
            events: EventMetrics {
                cas_conflicts: counter(&name("cas_conflicts")),
                corrections: counter(&name("counter_corrections")),
                reclaimed_requests: counter(&name("reclaimed_requests")),
                reaped_vms: counter(&name("reaped_vms")),
                lost_slots: counter(&name("lost_slots")),
                deferred_releases: counter(&name("deferred_releases")),
                dropped_releases: counter(&name("dropped_releases")),
                stale_releases: counter(&name("stale_releases")),
                membership_changes: counter(&name("membership_changes")),
                pruned_endpoints: counter(&name("pruned_endpoints")),
                ejections: counter(&name("ejections")),
                ejections_capped: counter(&name("ejections_capped")),
            },
            in_flight: gauge(&name("in_flight")),
            endpoint_count: gauge(&name("endpoints")),
            eligible_count: gauge(&name("eligible_endpoints")),
            admin_polls: counter(&name("admin_polls")),
            admin_poll_errors: counter(&name("admin_poll_errors")),
            pending_releases: gauge(&name("pending_releases")),
            unhonoured: counter(&name("unhonoured_decisions")),
            excused: counter(&name("excused_failures")),
            not_in_cluster: gauge(&name("endpoints_not_in_cluster")),
            shared_data_bytes: gauge(&name("shared_data_bytes")),
            vm_memory_bytes: gauge(&name("vm_memory_bytes")),
            server_load: config.server_load.as_ref().map(|_| ServerLoadMetrics {
                reports: counter(&name("server_load.reports")),
                report_errors: counter(&name("server_load.report_errors")),
                stale_endpoints: gauge(&name("server_load.stale_endpoints")),
                polls_per_second: gauge(&name("server_load.polls_per_second")),
                response_reports: counter(&name("server_load.response_reports")),
            }),
            weights: config.admin.is_some(),
            prefix_routing: config.prefix_aware.map(|_| PrefixMetrics {
                routed: counter(&name("prefix.routed")),
                spilled: counter(&name("prefix.spilled")),
                fallback: PREFIX_FALLBACKS.map(|r| counter(&name(&format!("prefix.fallback.{r}")))),
                raw_body_keys: counter(&name("prefix.raw_body_keys")),
                body_bytes_read: counter(&name("prefix.body_bytes_read")),
            }),
            prefix_delta: PrefixDeltas::default(),
            defined: HashMap::new(),
            endpoints: Vec::new(),
            endpoints_token: 0,
            routed_carry: HashMap::new(),
            defined_capped: false,
            decisions_delta: 0,
            unhonoured_delta: 0,
            excused_delta: 0,
            fail_open_delta: [0; FailOpen::ALL.len()],
            routed_delta: Vec::new(),
            report_delta: HashMap::new(),
            response_reports_delta: 0,
            pending_published: 0,
            prefix,
            sink,
        };
        stats.follow(membership);
        stats
    }

    /// Re-targets the per-endpoint stats at a new membership (at a tick, never on the request
    /// path), zeroing the gauges of endpoints that left.
    fn follow(&mut self, membership: &Rc<Membership>) {
        if membership.token() == self.endpoints_token && !self.endpoints.is_empty() {
            return;
        }
        self.flush_routed();
        for old in &self.endpoints {
            self.sink.set(old.in_flight, 0);
            self.sink.set(old.eligible, 0);
            self.sink.set(old.estimated, 0);
            self.sink.set(old.load_stale, 0);
        }
        self.endpoints = membership
            .endpoints()
            .iter()
            .map(|address| self.metrics_for(address))
            .collect();
        self.routed_delta = vec![0; membership.len()];
        self.endpoints_token = membership.token();
        self.sink.set(self.endpoint_count, membership.len() as u64);
    }

    /// The metrics of `address`, defined on first use.
    fn metrics_for(&mut self, address: &str) -> Rc<EndpointMetrics> {
        if let Some(metrics) = self.defined.get(address) {
            return Rc::clone(metrics);
        }
        if self.defined.len() >= MAX_DEFINED_ENDPOINTS {
            if !self.defined_capped {
                self.defined_capped = true;
                log::warn!(
                    "model-lb: {MAX_DEFINED_ENDPOINTS} endpoint addresses have had stats in this \
                     VM; endpoints new since then get no per-endpoint stats (the totals still count)"
                );
            }
            return Rc::new(EndpointMetrics::NONE);
        }
        let with_load = self.server_load.is_some();
        let prefix = &self.prefix;
        let sink = &self.sink;
        let optional = |on: bool, suffix: &str, kind: MetricKind| {
            if on {
                sink.define(kind, &format!("{prefix}endpoint.{address}.{suffix}"))
            } else {
                None
            }
        };
        use MetricKind::{Counter, Gauge};
        let metrics = Rc::new(EndpointMetrics {
            routed: optional(true, "routed", Counter),
            in_flight: optional(true, "in_flight", Gauge),
            eligible: optional(true, "eligible", Gauge),
            estimated: optional(with_load, "estimated_in_flight", Gauge),
            weight: optional(self.weights, "weight", Gauge),
            batch_size: optional(with_load, "batch_size", Gauge),
            load_reports: optional(with_load, "load_reports", Counter),
            load_report_errors: optional(with_load, "load_report_errors", Counter),
            load_stale: optional(with_load, "load_stale", Gauge),
        });
        self.defined.insert(address.to_owned(), Rc::clone(&metrics));
        metrics
    }

    pub fn routed(&mut self, routed: &Routed) {
        self.decisions_delta += 1;
        match routed.prefix {
            Some(PrefixChoice::Preferred) => self.prefix_delta.routed += 1,
            Some(PrefixChoice::Spilled) => self.prefix_delta.spilled += 1,
            Some(PrefixChoice::AllBusy) => self.prefix_delta.fallback[3] += 1,
            None => {}
        }
        let Some(chosen) = routed.selection.chosen() else {
            return;
        };
        if routed.membership.token() == self.endpoints_token {
            if let Some(slot) = self.routed_delta.get_mut(chosen) {
                *slot += 1;
            }
        } else if let Some(address) = routed.membership.endpoints().get(chosen) {
            // The pool changed since the last tick: counted by address until then.
            *self.routed_carry.entry(address.clone()).or_default() += 1;
        }
    }

    pub fn fail_open(&mut self, reason: FailOpen) {
        if let Some(i) = FailOpen::ALL.iter().position(|&r| r == reason) {
            self.fail_open_delta[i] += 1;
        }
    }

    pub fn publish_loads(
        &mut self,
        membership: &Rc<Membership>,
        loads: &[u32],
        eligible: &[bool],
        estimates: &[EndpointEstimate],
    ) {
        self.follow(membership);
        for (e, metrics) in self.endpoints.iter().enumerate() {
            self.sink
                .set(metrics.in_flight, loads.get(e).map_or(0, |&l| u64::from(l)));
            self.sink.set(
                metrics.eligible,
                eligible.get(e).map_or(0, |&ok| u64::from(ok)),
            );
            let estimate = estimates.get(e);
            self.sink.set(
                metrics.estimated,
                estimate.map_or(0, |x| u64::from(x.estimate)),
            );
            self.sink
                .set(metrics.weight, estimate.map_or(1, |x| u64::from(x.weight)));
            self.sink.set(
                metrics.batch_size,
                estimate.map_or(0, |x| u64::from(x.batch_size)),
            );
        }
        self.sink
            .set(self.in_flight, loads.iter().map(|&l| u64::from(l)).sum());
        self.sink.set(
            self.eligible_count,
            eligible.iter().filter(|&&ok| ok).count() as u64,
        );
    }

    /// A routed request ended: did Envoy use a host the filter listed, and was a failure
    /// excused as the client's or Envoy's doing.
    pub fn finished(&mut self, honoured: bool, excused: bool) {
        self.unhonoured_delta += u64::from(!honoured);
        self.excused_delta += u64::from(excused);
    }

    /// What the body of a `PREFIX_AWARE` request gave.
    pub fn prefix_key(&mut self, key: &Result<Key, NoKey>, body_bytes_read: usize) {
        let delta = &mut self.prefix_delta;
        delta.body_bytes_read += body_bytes_read as u64;
        match key {
            Ok(key) if key.source == KeySource::RawBody => delta.raw_body_keys += 1,
            Ok(_) => {}
            Err(reason) => {
                if let Some(i) = NoKey::ALL.iter().position(|r| r == reason) {
                    delta.fallback[i] += 1;
                }
            }
        }
    }

    fn flush_prefix(&mut self) {
        let delta = std::mem::take(&mut self.prefix_delta);
        if let Some(m) = &self.prefix_routing {
            self.sink.add(m.routed, delta.routed);
            self.sink.add(m.spilled, delta.spilled);
            for (metric, n) in m.fallback.iter().zip(delta.fallback) {
                self.sink.add(*metric, n);
            }
            self.sink.add(m.raw_body_keys, delta.raw_body_keys);
            self.sink.add(m.body_bytes_read, delta.body_bytes_read);
        }
    }

    /// A server-load poll of `address` was answered.
    pub fn load_report(&mut self, address: &str, ok: bool) {
        let delta = match self.report_delta.get_mut(address) {
            Some(delta) => delta,
            None => self.report_delta.entry(address.to_owned()).or_default(),
        };
        if ok {
            delta.0 += 1;
        } else {
            delta.1 += 1;
        }
    }

    pub fn response_report(&mut self) {
        self.response_reports_delta += 1;
    }

    pub fn server_load_freshness(
        &mut self,
        membership: &Rc<Membership>,
        fresh: &[bool],
        polls_per_second: u64,
    ) {
        self.follow(membership);
        for (metrics, &ok) in self.endpoints.iter().zip(fresh) {
            self.sink.set(metrics.load_stale, u64::from(!ok));
        }
        if let Some(totals) = &self.server_load {
            self.sink.set(
                totals.stale_endpoints,
                fresh.iter().filter(|&&ok| !ok).count() as u64,
            );
            self.sink.set(totals.polls_per_second, polls_per_second);
        }
    }

    fn flush_reports(&mut self) {
        let mut sums = (0, 0);
        for (address, (ok, failed)) in std::mem::take(&mut self.report_delta) {
            let metrics = self.metrics_for(&address);
            self.sink.add(metrics.load_reports, ok);
            self.sink.add(metrics.load_report_errors, failed);
            sums.0 += ok;
            sums.1 += failed;
        }
        if let Some(totals) = &self.server_load {
            self.sink.add(totals.reports, sums.0);
            self.sink.add(totals.report_errors, sums.1);
            self.sink.add(
                totals.response_reports,
                std::mem::take(&mut self.response_reports_delta),
            );
        }
    }

    /// What the pool holds in shared data, and the linear memory of a VM (the last one to
    /// report): both must stay flat over weeks of membership and configuration changes.
    pub fn footprint(&mut self, shared_bytes: Option<usize>) {
        if let Some(bytes) = shared_bytes {
            self.sink.set(self.shared_data_bytes, bytes as u64);
        }
        if let Some(bytes) = self.sink.0.memory_bytes() {
            self.sink.set(self.vm_memory_bytes, bytes);
        }
    }

    pub fn endpoints_not_in_cluster(&mut self, count: usize) {
        self.sink.set(self.not_in_cluster, count as u64);
    }

    pub fn admin_poll(&mut self, ok: bool) {
        self.sink.add(self.admin_polls, 1);
        if !ok {
            self.sink.add(self.admin_poll_errors, 1);
        }
    }

    fn flush_routed(&mut self) {
        for (metrics, delta) in self.endpoints.iter().zip(&mut self.routed_delta) {
            self.sink.add(metrics.routed, std::mem::take(delta));
        }
        for (address, count) in std::mem::take(&mut self.routed_carry) {
            let metrics = self.metrics_for(&address);
            self.sink.add(metrics.routed, count);
        }
    }

    pub fn flush(
        &mut self,
        membership: &Rc<Membership>,
        events: &Events,
        cluster: &str,
        pending_releases: usize,
    ) {
        self.follow(membership);
        self.sink
            .add(self.decisions, std::mem::take(&mut self.decisions_delta));
        let mut failed_open = 0;
        for (metric, delta) in self.fail_open.iter().zip(&mut self.fail_open_delta) {
            failed_open += *delta;
            self.sink.add(*metric, std::mem::take(delta));
        }
        self.flush_routed();
        self.flush_reports();
        self.flush_prefix();
        let unhonoured = std::mem::take(&mut self.unhonoured_delta);
        self.sink.add(self.unhonoured, unhonoured);
        self.sink
            .add(self.excused, std::mem::take(&mut self.excused_delta));
        let e = &self.events;
        self.sink.add(e.cas_conflicts, events.cas_conflicts);
        self.sink.add(e.corrections, events.corrections);
        self.sink
            .add(e.reclaimed_requests, events.reclaimed_requests);
        self.sink.add(e.reaped_vms, events.reaped_slots);
        self.sink.add(e.lost_slots, events.lost_slots);
        self.sink.add(e.deferred_releases, events.deferred_releases);
        self.sink.add(e.dropped_releases, events.dropped_releases);
        self.sink.add(e.stale_releases, events.stale_releases);
        self.sink
            .add(e.membership_changes, events.membership_changes);
        self.sink.add(e.pruned_endpoints, events.pruned_endpoints);
        self.sink.add(e.ejections, events.ejections.len() as u64);
        self.sink.add(e.ejections_capped, events.capped_ejections);
        let pending = pending_releases as u64;
        if let Some(id) = self.pending_releases {
            let delta = pending as i64 - self.pending_published as i64;
            if delta != 0 && self.sink.0.increment_metric(id, delta).is_ok() {
                self.pending_published = pending;
            }
        }
        // One line per interval, not per request, however many requests failed open.
        if failed_open > 0 {
            log::warn!(
                "model-lb: pool \"{cluster}\": {} failed open to the cluster's fallback \
                 policy since the last tick (see model_lb.{cluster}.fail_open.*)",
                counted(failed_open, "request")
            );
        }
        if events.capped_ejections > 0 {
            log::warn!(
                "model-lb: pool \"{cluster}\": {} not ejected since the last tick: \
                 max_ejection_percent of the pool is already ejected, so failing endpoints stay \
                 in rather than push all the load onto the rest",
                counted(events.capped_ejections, "failing endpoint")
            );
        }
        if unhonoured > 0 {
            log::warn!(
                "model-lb: pool \"{cluster}\": {} served by a host the filter did \
                 not list since the last tick: Envoy's fallback policy picked instead. Check that \
                 the filter's endpoints are the Envoy cluster's hosts (ip:port exactly) and that \
                 the cluster's override_host policy reads the filter's endpoint_header",
                counted(unhonoured, "request")
            );
        }
        if events.corrections > 0 {
            log::warn!(
                "model-lb: pool \"{cluster}\": {} already zero when decremented and \
                 clamped",
                counted(events.corrections, "in-flight count")
            );
        }
    }
}

/// "1 request", "3 requests": log lines read better without "1 requests".
pub fn counted(count: impl Into<u64>, noun: &str) -> String {
    let count = count.into();
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}
