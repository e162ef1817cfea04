//! The glue: callbacks gather inputs, call the pure core, and apply its answer. Nothing here
//! may panic: a panic traps the worker's VM and fails all of its traffic.
//!
//! Everything Envoy provides comes through [`host::Host`], so this module also builds natively
//! and its unit tests (`tests.rs`) drive it as Envoy would. Only `wasm.rs` is wasm-only: the
//! host calls and the SDK's context traits, which hand each callback straight to the types here.

// Natively only the unit tests drive the glue; the wasm build's lint still catches dead code.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod hold;
mod host;
mod load;
mod stats;
#[cfg(target_arch = "wasm32")]
mod wasm;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::Duration;

use crate::admin;
use crate::config::{self, Config};
use crate::health::Outcome;
use crate::outcome;
use crate::prefix::{self, KeyScanner, Scan};
use crate::rng::SplitMix64;
use crate::select::{Choice, Selection, Strategy};
use crate::server_load;
use crate::tracker::{ClusterUpdate, Install, MembershipSource, PoolTracker, Ticket, TrackerError};
use hold::Hold;
use host::HostRef;
use stats::{FailOpen, Stats};

/// A plugin's root context: configuration, the tick, and the callouts' answers.
struct Root {
    host: HostRef,
    filter: Option<Rc<Filter>>,
    /// This root is the hold filter (`{"role": "hold"}`), not the routing filter.
    hold: bool,
    poll: AdminPollState,
    load: load::LoadPolling,
    /// Whether this VM held the leader lease at its last housekeeping.
    leader: bool,
    next_housekeeping_ms: u64,
}

/// One admin poll at a time, from whichever VM holds the leader lease.
#[derive(Default)]
struct AdminPollState {
    in_flight: Option<u32>,
    next_due_ms: u64,
    failing: bool,
    /// Configured endpoints the watched cluster lacks, as last warned about.
    missing_warned: Vec<String>,
    missing_warned_at_ms: u64,
}

/// A misconfiguration that persists is repeated this often, not on every poll.
const MISSING_WARNING_REPEAT_MS: u64 = 60_000;

/// The stream context a root creates: the routing filter's, or the hold filter's.
// Short-lived: the wasm side moves it straight into the one Box the SDK wants, so boxing the
// large variant here would cost a second allocation per request.
#[allow(clippy::large_enum_variant)]
enum Stream {
    Router(Request),
    Hold(Hold),
}

impl Root {
    fn new(host: HostRef) -> Self {
        Self {
            host,
            filter: None,
            hold: false,
            poll: AdminPollState::default(),
            load: load::LoadPolling::default(),
            leader: false,
            next_housekeeping_ms: 0,
        }
    }

    fn on_http_call_response(&mut self, token_id: u32, body_size: usize) {
        if self.load.owns(token_id) {
            self.server_load_answer(token_id, body_size);
            return;
        }
        if self.poll.in_flight != Some(token_id) {
            return;
        }
        self.poll.in_flight = None;
        let Some(filter) = self.filter.clone() else {
            return;
        };
        let result = match self.host.http_call_response_status() {
            Some(200) => self
                .host
                .http_call_response_body(body_size)
                .ok_or_else(|| "empty answer".to_owned())
                .and_then(|body| filter.apply_admin_answer(&body, &mut self.load)),
            Some(status) => Err(format!("HTTP status {status}")),
            None => Err("no answer (timeout or connection failure)".to_owned()),
        };
        filter.admin_poll_result(&mut self.poll, result);
    }

    /// Whether Envoy may use this configuration: a bad one is rejected with a log line naming
    /// the field and the fix.
    fn on_configure(&mut self) -> bool {
        let bytes = match self.host.plugin_configuration() {
            Ok(bytes) => bytes,
            Err(status) => {
                log::error!(
                    "model-lb: rejecting plugin configuration: cannot read it (status {status})"
                );
                return false;
            }
        };
        let config = match config::parse_plugin(bytes.as_deref()) {
            Ok(config::Plugin::Hold) => {
                self.hold = true;
                return true;
            }
            Ok(config::Plugin::Router(config)) => *config,
            Err(e) => {
                log::error!("model-lb: rejecting plugin configuration: {e}");
                return false;
            }
        };
        match Filter::configure(Rc::clone(&self.host), config) {
            Ok(filter) => {
                self.filter = Some(Rc::new(filter));
                true
            }
            Err(message) => {
                log::error!("model-lb: rejecting plugin configuration: {message}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(filter) = self.filter.clone() else {
            return;
        };
        let Some(now_ms) = self.host.now_ms() else {
            return;
        };
        filter.set_now(now_ms);
        filter.flush_folded();
        // Ticks come a little early or late: half a tick of slack keeps housekeeping at its
        // interval instead of skipping every other tick when the two periods are equal.
        let housekeeping = now_ms.saturating_add(filter.tick_ms / 2) >= self.next_housekeeping_ms;
        if housekeeping {
            self.next_housekeeping_ms =
                now_ms.saturating_add(filter.config.housekeeping_interval_ms);
            self.leader = filter.housekeeping(now_ms, &mut self.load);
        }
        let leader = self.leader;
        // Server load changes every poll; Envoy's weights only with an admin poll, so without
        // server load the record is looked at once per housekeeping, not on every short tick.
        if filter.config.server_load.is_some() || (filter.config.admin.is_some() && housekeeping) {
            self.publish_load_record(&filter, leader);
            self.poll_servers(&filter, leader, now_ms);
            filter.refresh_view();
        }
        if let (true, Some(admin)) = (leader, &filter.config.admin) {
            if self.poll.in_flight.is_none() && now_ms >= self.poll.next_due_ms {
                self.poll.next_due_ms = now_ms.saturating_add(admin.interval_ms);
                let timeout = Duration::from_millis(admin.interval_ms.min(5_000));
                let headers = [
                    (":method", "GET"),
                    (":path", "/clusters?format=json"),
                    (":authority", "model-lb-admin-poll"),
                ];
                match self
                    .host
                    .dispatch_http_call(&admin.admin_cluster, &headers, timeout)
                {
                    Ok(token) => self.poll.in_flight = Some(token),
                    Err(status) => filter.admin_poll_result(
                        &mut self.poll,
                        Err(format!(
                            "cannot call cluster \"{}\" ({status}); is it defined?",
                            admin.admin_cluster
                        )),
                    ),
                }
            }
        }
    }

    fn create_stream(&self, context_id: u32) -> Stream {
        if self.hold {
            return Stream::Hold(Hold::new(Rc::clone(&self.host), context_id));
        }
        Stream::Router(Request {
            host: Rc::clone(&self.host),
            context_id,
            filter: self.filter.clone(),
            ticket: None,
            selection: Selection::default(),
            request_complete: false,
            request_body_bytes: 0,
            scanner: None,
        })
    }
}

struct Filter {
    host: HostRef,
    config: Config,
    /// The tick period: the housekeeping interval, or finer with server-load polling.
    tick_ms: u64,
    tracker: RefCell<PoolTracker>,
    rng: RefCell<SplitMix64>,
    stats: RefCell<Stats>,
}

impl Filter {
    fn configure(host: HostRef, config: Config) -> Result<Self, String> {
        for old in &config.deprecated {
            log::warn!(
                "model-lb: pool \"{}\": configuration field \"{old}\" is deprecated; it is now \
                 called \"{}\" (same meaning)",
                config.pool,
                config::renamed(old)
            );
        }
        let now_ms = host.now_ms().unwrap_or(0);
        let seed = vm_seed(now_ms);
        let source = match &config.admin {
            Some(admin) if admin.follow_membership => MembershipSource::Followed,
            _ => MembershipSource::Configured,
        };
        let mut tracker = PoolTracker::with_health(
            &config.pool,
            config.endpoints.clone(),
            source,
            config.passive,
            seed,
            now_ms,
        );
        let install = match tracker.install(&*host) {
            Ok(install) => install,
            // Heavy traffic from other workers on the same pool: the first housekeeping tick
            // finishes the job, and requests route within the pool as it is until then.
            Err(TrackerError::Contention) => {
                log::warn!(
                    "model-lb: pool \"{}\": shared table busy at configure time; endpoints are \
                     added on the next housekeeping tick",
                    config.pool
                );
                Install::Adopted
            }
            Err(e) => {
                return Err(format!(
                    "cannot set up the shared outstanding-request table \"{}\": {e}",
                    tracker.table_key()
                ))
            }
        };
        // Server-load polls and view refreshes need a finer tick than housekeeping; housekeeping
        // itself still runs once per its own interval.
        let mut tick_ms = match &config.server_load {
            Some(load) => (load.interval_ms / 4).clamp(10, config.housekeeping_interval_ms),
            None => config.housekeeping_interval_ms,
        };
        if config.release_batching_ms > 0 {
            tick_ms = tick_ms.min(config.release_batching_ms);
            tracker.set_fold_releases(true);
        }
        tracker.set_stale_after_ms(config.server_load.as_ref().map_or(0, |load| {
            load.effective_stale_after_ms(config.endpoints.len())
        }));
        let interval = u32::try_from(tick_ms).unwrap_or(u32::MAX);
        host.set_tick_period_ms(interval)
            .map_err(|status| format!("cannot set the housekeeping tick (status {status})"))?;
        let stats = Stats::new(Rc::clone(&host), &config, tracker.membership());
        if install != Install::Adopted {
            log::info!(
                "model-lb {}: pool \"{}\": {}, strategy {}, header \"{}\", {} fallbacks ({})",
                crate::VERSION,
                config.pool,
                stats::counted(config.endpoints.len() as u64, "endpoint"),
                config.strategy.name(),
                config.endpoint_header,
                config.fallback_endpoints,
                match install {
                    Install::Created => "new shared table",
                    Install::Replaced => "endpoints added to the shared pool",
                    Install::Adopted => "shared table adopted",
                }
            );
        }
        Ok(Self {
            host,
            config,
            tick_ms,
            tracker: RefCell::new(tracker),
            rng: RefCell::new(SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B)),
            stats: RefCell::new(stats),
        })
    }

    /// Chooses the endpoints and writes them into the routing header. Whatever happens, the
    /// header a client sent does not survive: it is overwritten or removed.
    /// How requests are chosen before any body is seen.
    fn default_choice(&self) -> Choice {
        match self.config.strategy {
            Strategy::Random => Choice::Random,
            Strategy::LeastOutstandingRequests | Strategy::PrefixAware => {
                Choice::LeastOutstandingRequests
            }
        }
    }

    /// `PREFIX_AWARE` once the body has given its key (or not, and why).
    fn route_by_prefix(
        &self,
        key: Result<prefix::Key, prefix::NoKey>,
        body_bytes_read: usize,
    ) -> Option<(Ticket, Selection)> {
        let threshold = self
            .config
            .prefix_aware
            .map_or(prefix::DEFAULT_CONCURRENCY_THRESHOLD, |p| {
                p.concurrency_threshold
            });
        if let Ok(mut stats) = self.stats.try_borrow_mut() {
            stats.prefix_key(&key, body_bytes_read);
        }
        let choice = match key {
            Ok(key) => Choice::Prefix {
                key: key.hash,
                threshold,
            },
            Err(_) => Choice::LeastOutstandingRequests,
        };
        self.route(choice)
    }

    fn route(&self, choice: Choice) -> Option<(Ticket, Selection)> {
        let (Ok(mut tracker), Ok(mut rng), Ok(mut stats)) = (
            self.tracker.try_borrow_mut(),
            self.rng.try_borrow_mut(),
            self.stats.try_borrow_mut(),
        ) else {
            self.fail_open(None, FailOpen::Reentered);
            return None;
        };
        let routed = tracker.route_with(
            &*self.host,
            choice,
            self.config.fallback_endpoints,
            &mut *rng,
        );
        match routed {
            Ok(routed) => {
                let value = routed.membership.header_value(&routed.selection);
                if self
                    .host
                    .set_request_header(&self.config.endpoint_header, &value)
                    .is_err()
                {
                    // A request we could not steer must not count against the endpoint.
                    tracker.release(&*self.host, routed.ticket, Outcome::Neutral);
                    self.fail_open(Some(&mut stats), FailOpen::HeaderWrite);
                    return None;
                }
                stats.routed(&routed);
                Some((routed.ticket, routed.selection))
            }
            Err(e) => {
                self.fail_open(Some(&mut stats), FailOpen::from(&e));
                None
            }
        }
    }

    /// An in-band load report (vLLM's `endpoint-load-metrics`) on a response this VM proxied:
    /// a queue on the server marks it full here until the next poll can say more.
    fn response_report(&self, ticket: &Ticket) {
        let Some(load) = self
            .config
            .server_load
            .as_ref()
            .filter(|l| l.response_reports)
        else {
            return;
        };
        let Some(value) = self
            .host
            .response_header(server_load::RESPONSE_REPORT_HEADER)
        else {
            return;
        };
        let Some(waiting) = std::str::from_utf8(&value)
            .ok()
            .and_then(server_load::parse_response_report)
        else {
            return;
        };
        let (Ok(mut tracker), Ok(mut stats)) =
            (self.tracker.try_borrow_mut(), self.stats.try_borrow_mut())
        else {
            return;
        };
        let address = ticket.endpoint_address();
        let until = tracker.now_ms().saturating_add(load.interval_ms);
        if let Some(index) = tracker.membership().position(address) {
            tracker
                .view_mut()
                .response_report(index, address, waiting, until);
            stats.response_report();
        }
    }

    fn fail_open(&self, stats: Option<&mut Stats>, reason: FailOpen) {
        let _ = self
            .host
            .remove_request_header(&self.config.endpoint_header);
        if let Some(stats) = stats {
            stats.fail_open(reason);
        }
    }

    fn release(&self, ticket: Ticket, outcome: Outcome) {
        match self.tracker.try_borrow_mut() {
            Ok(mut tracker) => {
                tracker.release(&*self.host, ticket, outcome);
            }
            // Unreachable in a single-threaded VM; were it not, leaking the count would be
            // worse than anything else, so say so loudly.
            Err(_) => log::error!(
                "model-lb: could not release a request on {}: tracker busy",
                ticket.endpoint_address()
            ),
        }
    }

    fn set_now(&self, now_ms: u64) {
        if let Ok(mut tracker) = self.tracker.try_borrow_mut() {
            tracker.set_now(now_ms);
        }
    }

    /// Writes the releases still waiting for a routing write (an idle VM's).
    fn flush_folded(&self) {
        if let Ok(mut tracker) = self.tracker.try_borrow_mut() {
            tracker.flush_folded(&*self.host);
        }
    }

    /// Takes the load record the leader published into this VM's view.
    fn refresh_view(&self) {
        if let Ok(mut tracker) = self.tracker.try_borrow_mut() {
            // A failed read keeps the previous view; the next tick tries again.
            let _ = tracker.refresh_view(&*self.host);
        }
    }

    /// Runs the tick's upkeep; returns whether this VM holds the leader lease.
    fn housekeeping(&self, now_ms: u64, load: &mut load::LoadPolling) -> bool {
        let (Ok(mut tracker), Ok(mut stats)) =
            (self.tracker.try_borrow_mut(), self.stats.try_borrow_mut())
        else {
            return false;
        };
        let result = tracker.housekeeping(&*self.host, now_ms, self.config.vm_lease_ttl_ms);
        let events = tracker.take_events();
        let mut leader = false;
        match result {
            Ok(report) => {
                leader = report.leader;
                stats.footprint(report.shared_bytes);
                if report.reaped.slots > 0 {
                    log::warn!(
                        "model-lb: pool \"{}\": reclaimed {} from {} that stopped \
                         heartbeating for {} ms",
                        self.config.pool,
                        stats::counted(report.reaped.requests, "in-flight request"),
                        stats::counted(report.reaped.slots, "worker VM"),
                        self.config.vm_lease_ttl_ms
                    );
                }
                if let Some(server_load) = &self.config.server_load {
                    let endpoints = tracker.membership().len();
                    tracker.set_stale_after_ms(server_load.effective_stale_after_ms(endpoints));
                }
                if let (Some(loads), Some(eligible)) = (report.loads, report.eligible) {
                    let estimates = tracker.estimates(&loads);
                    stats.publish_loads(tracker.membership(), &loads, &eligible, &estimates);
                    if self.config.server_load.is_some() {
                        load.publish_freshness(self, &tracker, &mut stats, now_ms);
                    }
                }
            }
            Err(e) => log::warn!(
                "model-lb: pool \"{}\": housekeeping failed, will retry next tick: {e}",
                self.config.pool
            ),
        }
        if events.pruned_endpoints > 0 {
            log::info!(
                "model-lb: pool \"{}\": removed {} that no live configuration lists",
                self.config.pool,
                stats::counted(events.pruned_endpoints, "idle endpoint")
            );
        }
        for ejection in &events.ejections {
            log::warn!(
                "model-lb: pool \"{}\": ejecting {} for {} ms after {} consecutive failures",
                self.config.pool,
                ejection.address,
                ejection.for_ms,
                ejection.failures
            );
        }
        stats.flush(
            tracker.membership(),
            &events,
            &self.config.pool,
            tracker.pending_releases(),
        );
        leader
    }

    fn apply_admin_answer(
        &self,
        body: &[u8],
        load: &mut load::LoadPolling,
    ) -> Result<ClusterUpdate, String> {
        let Some(admin) = &self.config.admin else {
            return Ok(ClusterUpdate::default());
        };
        let hosts = admin::cluster_hosts(body, &admin.envoy_cluster).map_err(|e| e.to_string())?;
        let mut tracker = self
            .tracker
            .try_borrow_mut()
            .map_err(|_| "tracker busy".to_owned())?;
        let update = tracker
            .apply_cluster(&*self.host, &hosts)
            .map_err(|e| e.to_string())?;
        load.apply_cluster(&tracker, &hosts);
        Ok(update)
    }

    fn admin_poll_result(&self, poll: &mut AdminPollState, result: Result<ClusterUpdate, String>) {
        let cluster = &self.config.pool;
        if let Ok(mut stats) = self.stats.try_borrow_mut() {
            stats.admin_poll(result.is_ok());
        }
        match result {
            Ok(update) => {
                if poll.failing {
                    log::info!("model-lb: pool \"{cluster}\": admin polling works again");
                    poll.failing = false;
                }
                if !update.added.is_empty() || !update.removed.is_empty() {
                    log::info!(
                        "model-lb: pool \"{cluster}\": membership follows Envoy: added [{}], removed [{}]",
                        update.added.join(", "),
                        update.removed.join(", ")
                    );
                }
                let mut first_checks = Vec::new();
                for (address, healthy) in &update.health {
                    if *healthy {
                        log::info!("model-lb: pool \"{cluster}\": {address} is healthy again; routing to it");
                    } else if update.awaiting_first_check.contains(address) {
                        first_checks.push(address.as_str());
                    } else if !update.missing.contains(address) {
                        log::warn!(
                            "model-lb: pool \"{cluster}\": Envoy reports {address} unhealthy; not routing to it"
                        );
                    }
                }
                if !first_checks.is_empty() {
                    log::info!(
                        "model-lb: pool \"{cluster}\": waiting for Envoy's first health check of \
                         [{}] before routing to them",
                        first_checks.join(", ")
                    );
                }
                // While Envoy's view moves (hosts it has not checked yet, members coming or going,
                // verdicts flipping: right after start, all of them), look again on the next tick
                // rather than a poll interval later, or the pool stays smaller (or empty, failing
                // open) for longer than Envoy's own view. A quiet answer restores the interval.
                if !update.is_empty() || !update.awaiting_first_check.is_empty() {
                    poll.next_due_ms = 0;
                }
                if let Ok(mut stats) = self.stats.try_borrow_mut() {
                    stats.endpoints_not_in_cluster(update.missing.len());
                }
                self.warn_missing(poll, &update.missing);
            }
            Err(why) => {
                // Once per outage, not once per poll.
                if !poll.failing {
                    log::warn!(
                        "model-lb: pool \"{cluster}\": admin poll failed, keeping the last known \
                         health: {why}"
                    );
                    poll.failing = true;
                }
            }
        }
    }
}

impl Filter {
    /// Endpoints the filter lists but the Envoy cluster lacks are never routed to, and requests
    /// Envoy cannot match fall back to its own policy: say so when it starts, when it changes,
    /// and once a minute while it lasts.
    fn warn_missing(&self, poll: &mut AdminPollState, missing: &[String]) {
        let now_ms = self.host.now_ms().unwrap_or(0);
        let changed = poll.missing_warned != missing;
        let due = now_ms
            >= poll
                .missing_warned_at_ms
                .saturating_add(MISSING_WARNING_REPEAT_MS);
        if missing.is_empty() {
            if changed {
                log::info!(
                    "model-lb: pool \"{}\": every endpoint is a host of the watched Envoy cluster again",
                    self.config.pool
                );
            }
        } else if changed || due {
            let watched = self
                .config
                .admin
                .as_ref()
                .map_or("", |a| a.envoy_cluster.as_str());
            log::warn!(
                "model-lb: pool \"{}\": {} not a host of the Envoy cluster \"{watched}\" \
                 and never routed to: [{}]. List the cluster's hosts as ip:port in endpoints, \
                 or use follow_membership",
                self.config.pool,
                if missing.len() == 1 {
                    "1 endpoint is"
                } else {
                    "endpoints are"
                },
                missing.join(", ")
            );
            poll.missing_warned_at_ms = now_ms;
        }
        if changed {
            poll.missing_warned = missing.to_vec();
        }
    }
}

/// Only in the test build (`--features test-vm-crash`): a request carrying this header makes
/// the VM trap right after routing it, so the end-to-end tests can kill a VM holding a count.
#[cfg(all(feature = "test-vm-crash", target_arch = "wasm32"))]
const TEST_CRASH_HEADER: &str = "x-model-lb-test-crash";

struct Request {
    host: HostRef,
    context_id: u32,
    filter: Option<Rc<Filter>>,
    ticket: Option<Ticket>,
    /// The header list the filter wrote, to tell a retry onto a fallback from a host Envoy
    /// picked on its own.
    selection: Selection,
    request_complete: bool,
    request_body_bytes: u64,
    /// `PREFIX_AWARE`: reading the body for the key while the request waits.
    scanner: Option<KeyScanner>,
}

impl Request {
    /// Routes (once) and lets the request go on; the header write happens before Envoy's
    /// router sees the request, since the headers were held.
    fn route_now(&mut self, choice_key: Option<Result<prefix::Key, prefix::NoKey>>) {
        let Some(filter) = &self.filter else { return };
        if self.ticket.is_some() {
            return;
        }
        let scanned = self.scanner.take().map_or(0, |s| s.scanned());
        let routed = match choice_key {
            Some(key) => filter.route_by_prefix(key, scanned),
            None => filter.route(filter.default_choice()),
        };
        if let Some((ticket, selection)) = routed {
            self.ticket = Some(ticket);
            self.selection = selection;
            if filter
                .config
                .server_load
                .as_ref()
                .is_some_and(|load| load.response_reports)
            {
                let _ = self
                    .host
                    .set_request_header(server_load::RESPONSE_REPORT_REQUEST_HEADER, "text");
            }
        }
    }

    /// Feeds the chunk passing by (read only as far as the scanner's budget); `Some` once the
    /// key is decided.
    fn scan(
        &mut self,
        chunk: usize,
        end_of_stream: bool,
    ) -> Option<Result<prefix::Key, prefix::NoKey>> {
        let scanner = self.scanner.as_mut()?;
        let wanted = chunk.min(scanner.budget());
        if wanted > 0 {
            let Some(bytes) = self.host.request_body(0, wanted) else {
                return Some(Err(prefix::NoKey::Truncated));
            };
            if let Scan::Done(result) = scanner.feed(&bytes) {
                return Some(result);
            }
        }
        end_of_stream.then(|| scanner.finish())
    }

    /// Routes a held `PREFIX_AWARE` request by its key and lets the hold filter release it.
    fn release_held(&mut self, key: Result<prefix::Key, prefix::NoKey>) {
        let router = self.context_id;
        let host = Rc::clone(&self.host);
        let released = hold::release(&*host, router, || self.route_now(Some(key)));
        if !released {
            self.scanner = None;
            if let Some(filter) = &self.filter {
                filter.fail_open(
                    filter.stats.try_borrow_mut().ok().as_deref_mut(),
                    FailOpen::NoHoldFilter,
                );
            }
        }
    }
    /// Ends the request's count exactly once, from whichever of `on_log` or drop comes first.
    fn finish(&mut self, outcome: Outcome) {
        if let (Some(filter), Some(ticket)) = (&self.filter, self.ticket.take()) {
            filter.release(ticket, outcome);
        }
    }

    /// What the finished stream says about its first-choice endpoint, and whether Envoy used a
    /// host the filter listed at all. One property read always (`upstream.address`), one more
    /// with passive health (`response.code`), and a third only for a 5xx.
    fn judge(&self) -> Outcome {
        let (Some(filter), Some(ticket)) = (&self.filter, &self.ticket) else {
            return Outcome::Neutral;
        };
        // No upstream host at all: the request never got that far (e.g. a local reply).
        let Some(upstream) = self.host.property(&["upstream", "address"]) else {
            return Outcome::Neutral;
        };
        let listed_at = outcome::listed_at(&self.selection, ticket.endpoints(), &upstream);
        let passive = filter.config.passive.as_ref();
        let code = match passive {
            Some(_) => self
                .host
                .property(&["response", "code"])
                .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
                .map_or(0, i64::from_le_bytes),
            None => 0,
        };
        let finished = outcome::Finished {
            listed_at,
            code,
            request_complete: self.request_complete,
            request_body_bytes: self.request_body_bytes,
        };
        let verdict = passive.map(|policy| {
            outcome::judge(&finished, policy.max_blamed_body_bytes, || {
                self.host
                    .property(&["response", "code_details"])
                    .and_then(|bytes| String::from_utf8(bytes).ok())
            })
        });
        if let Ok(mut stats) = filter.stats.try_borrow_mut() {
            stats.finished(listed_at.is_some(), verdict.is_some_and(|v| v.excused));
        }
        verdict.map_or(Outcome::Neutral, |v| v.outcome)
    }
}

/// The routing filter's stream callbacks; it never pauses a stream itself.
impl Request {
    fn on_request_headers(&mut self, end_of_stream: bool) {
        self.request_complete = end_of_stream;
        let Some(filter) = self.filter.clone() else {
            return;
        };
        if self.ticket.is_some() {
            return;
        }
        if let (Some(prefix_aware), false) = (filter.config.prefix_aware, end_of_stream) {
            // The hold filter after this one keeps the request until the body gives its key
            // (see `hold`). A client's copy of the routing header must not survive even if the
            // filter makes no decision; nor may a client's copy of the hold tag.
            let _ = self
                .host
                .remove_request_header(&filter.config.endpoint_header);
            let _ = self
                .host
                .set_request_header(hold::HOLD_HEADER, &self.context_id.to_string());
            hold::expect(self.context_id);
            self.scanner = Some(KeyScanner::new(prefix_aware.prefix_length));
            return;
        }
        let key = filter
            .config
            .prefix_aware
            .map(|_| Err(prefix::NoKey::NoBody));
        self.route_now(key);
        #[cfg(all(feature = "test-vm-crash", target_arch = "wasm32"))]
        if self.ticket.is_some() && self.host.request_header(TEST_CRASH_HEADER).is_some() {
            // Dies holding the count it just took: a VM crash, as the other VMs see it.
            core::arch::wasm32::unreachable();
        }
    }

    fn on_response_headers(&mut self) {
        if let (Some(filter), Some(ticket)) = (&self.filter, &self.ticket) {
            filter.response_report(ticket);
        }
    }

    fn on_request_body(&mut self, body_size: usize, end_of_stream: bool) {
        self.request_complete |= end_of_stream;
        // With Continue, Envoy hands over each chunk once: the sizes add up to the body.
        self.request_body_bytes = self.request_body_bytes.saturating_add(body_size as u64);
        if let Some(key) = self.scan(body_size, end_of_stream) {
            self.release_held(key);
        }
    }

    fn on_request_trailers(&mut self) {
        self.request_complete = true;
        if let Some(scanner) = self.scanner.as_mut() {
            let key = scanner.finish();
            self.release_held(key);
        }
    }

    fn on_log(&mut self) {
        if self.scanner.take().is_some() {
            hold::forget(self.context_id);
        }
        let outcome = self.judge();
        self.finish(outcome);
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.finish(Outcome::Neutral);
    }
}

/// Each VM needs its own random stream (tie-breaks, slot owner tokens). `RandomState` draws its
/// keys from WASI `random_get`, which Envoy provides; the clock is mixed in for good measure.
fn vm_seed(now_ms: u64) -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(now_ms);
    hasher.finish()
}
