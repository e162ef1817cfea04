//! Server-load polling from the leader VM: dispatches the polls the schedule allows, folds the
//! answers into the record every VM reads, and publishes it once per tick. One poller per Envoy
//! process, because only the VM holding the leader lease polls.

use std::collections::BTreeSet;
use std::time::Duration;

use super::host::Host;
use super::stats::{counted, Stats};
use super::{Filter, Root};
use crate::admin::HostStatus;
use crate::server_load::{decode_record, parse_report, Collector, Poller, ReportError, ServerLoad};
use crate::tracker::PoolTracker;

/// Callouts through an `ORIGINAL_DST` cluster are routed by this header; through the pool's own
/// override_host cluster by the routing header. Both are set, so either cluster works.
const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";

#[derive(Default)]
pub struct LoadPolling {
    poller: Poller,
    collector: Collector,
    /// The leader publishes; a VM that just became leader first adopts what was published.
    publishing: bool,
    /// Polls dispatched since the last housekeeping, for the polls-per-second gauge.
    dispatched: u64,
    counted_since_ms: u64,
    /// Endpoints without a fresh report at the last housekeeping, for one log line per change.
    stale: BTreeSet<String>,
    /// The latest error per endpoint, quoted when it goes stale.
    last_error: std::collections::HashMap<String, String>,
    membership_token: u64,
}

impl LoadPolling {
    pub fn owns(&self, token: u32) -> bool {
        self.poller.owns(token)
    }

    /// Envoy's endpoint weights, from the leader's admin poll.
    pub fn apply_cluster(&mut self, tracker: &PoolTracker, hosts: &[HostStatus]) {
        for host in hosts.iter().filter(|h| !h.removed) {
            if tracker.membership().position(&host.address).is_some() {
                self.collector.set_weight(&host.address, host.weight);
            }
        }
    }

    /// Gauges and log lines about report freshness; leader only, once per housekeeping.
    pub fn publish_freshness(
        &mut self,
        filter: &Filter,
        tracker: &PoolTracker,
        stats: &mut Stats,
        now_ms: u64,
    ) {
        let Some(config) = &filter.config.server_load else {
            return;
        };
        let membership = tracker.membership();
        let stale_after = config.effective_stale_after_ms(membership.len());
        // Stale: a report aged out, or polls fail. An endpoint not polled yet (start-up, a new
        // member) is not stale, or every start would raise a false alarm.
        let fresh: Vec<bool> = membership
            .endpoints()
            .iter()
            .map(|a| {
                let reported = self.collector.get(a).filter(|l| l.reported_at_ms != 0);
                match reported {
                    Some(load) => load.fresh(now_ms, stale_after),
                    None => !self.last_error.contains_key(a),
                }
            })
            .collect();
        let stale: BTreeSet<String> = membership
            .endpoints()
            .iter()
            .zip(&fresh)
            .filter(|(_, &ok)| !ok)
            .map(|(a, _)| a.clone())
            .collect();
        let elapsed = now_ms.saturating_sub(self.counted_since_ms).max(1);
        let per_second = if self.counted_since_ms == 0 {
            0
        } else {
            self.dispatched * 1_000 / elapsed
        };
        self.dispatched = 0;
        self.counted_since_ms = now_ms;
        stats.server_load_freshness(membership, &fresh, per_second);
        let cluster = &filter.config.pool;
        let newly_stale: Vec<String> = stale
            .difference(&self.stale)
            .map(|a| match self.last_error.get(a) {
                Some(why) => format!("{a} ({why})"),
                None => a.clone(),
            })
            .collect();
        if !newly_stale.is_empty() {
            log::warn!(
                "model-lb: pool \"{cluster}\": no fresh server-load report for {} within \
                 {stale_after} ms; routing on this Envoy's own counts for them: [{}]",
                counted(newly_stale.len() as u64, "endpoint"),
                newly_stale.join(", ")
            );
        }
        let recovered = self.stale.difference(&stale).count();
        if recovered > 0 {
            log::info!(
                "model-lb: pool \"{cluster}\": server-load reports fresh again for {}",
                counted(recovered as u64, "endpoint")
            );
        }
        self.stale = stale;
    }
}

impl Root {
    /// On the leader: publishes what changed in the record (reports, Envoy's weights) for
    /// every VM to read on its next tick.
    pub(super) fn publish_load_record(&mut self, filter: &Filter, leader: bool) {
        if !leader {
            self.load.publishing = false;
            return;
        }
        let Ok(tracker) = filter.tracker.try_borrow() else {
            return;
        };
        if !self.load.publishing {
            self.load.publishing = true;
            if let Ok(Some((bytes, _))) = self.host.get(&tracker.load_record_key()) {
                if let Some(published) = decode_record(&bytes) {
                    self.load.collector.adopt(published);
                }
            }
        }
        let membership = tracker.membership();
        if membership.token() != self.load.membership_token {
            self.load.membership_token = membership.token();
            self.load.collector.retain(membership);
            self.load
                .last_error
                .retain(|a, _| membership.position(a).is_some());
        }
        if let Some(record) = self.load.collector.take_record() {
            // One writer (the leader); a lost race with a leader that just stepped down is
            // corrected by the next publication.
            let _ = self.host.set(&tracker.load_record_key(), &record, 0);
        }
    }

    /// One tick of the poller: on the leader, dispatch the polls that are due.
    pub(super) fn poll_servers(&mut self, filter: &Filter, leader: bool, now_ms: u64) {
        let Some(config) = &filter.config.server_load else {
            return;
        };
        if !leader {
            return;
        }
        let Ok(tracker) = filter.tracker.try_borrow() else {
            return;
        };
        let membership = std::rc::Rc::clone(tracker.membership());
        let pollable = tracker.pollable();
        drop(tracker);
        let due = self.load.poller.due(
            config,
            &membership,
            |e| pollable.get(e).copied().unwrap_or(true),
            now_ms,
        );
        let timeout = Duration::from_millis(config.timeout_ms());
        for address in due {
            let headers = [
                (":method", "GET"),
                (":path", config.path.as_str()),
                (":authority", address.as_str()),
                (filter.config.endpoint_header.as_str(), address.as_str()),
                (ORIGINAL_DST_HEADER, address.as_str()),
            ];
            match self
                .host
                .dispatch_http_call(&config.cluster, &headers, timeout)
            {
                Ok(token) => {
                    self.load.poller.started(token, &address, now_ms);
                    self.load.dispatched += 1;
                }
                Err(status) => {
                    self.load.poller.not_started(config, &address, now_ms);
                    self.load.last_error.insert(
                        address,
                        format!(
                            "cannot call cluster \"{}\" ({status}); is it defined?",
                            config.cluster
                        ),
                    );
                }
            }
        }
    }

    /// A poll's answer: parse it (never past `max_body_bytes`), subtract this Envoy's own
    /// in-flight count, and keep the result for the next publication.
    pub(super) fn server_load_answer(&mut self, token: u32, body_size: usize) {
        let Some(filter) = self.filter.clone() else {
            return;
        };
        let Some(config) = &filter.config.server_load else {
            return;
        };
        let now_ms = self.host.now_ms().unwrap_or(0);
        let result = read_answer(&*self.host, config, body_size);
        let Some(address) = self
            .load
            .poller
            .finished(config, token, now_ms, result.is_ok())
        else {
            return;
        };
        let Ok(mut tracker) = filter.tracker.try_borrow_mut() else {
            return;
        };
        let result = result.and_then(|report| {
            // The count at this instant is what the server's report includes of ours.
            match tracker.local_count(&*self.host, &address) {
                Ok(Some(local)) => Ok((report, local)),
                _ => Err(ReportError::NoAnswer),
            }
        });
        let ok = result.is_ok();
        match result {
            Ok((report, local)) => {
                self.load.collector.report(&address, report, local, now_ms);
                self.load.last_error.remove(&address);
                // Published at once rather than on the next tick: the other VMs' view lags
                // the server by one poll, not by a poll and a tick.
                if self.load.publishing {
                    if let Some(record) = self.load.collector.take_record() {
                        let _ = self.host.set(&tracker.load_record_key(), &record, 0);
                    }
                }
            }
            Err(why) => {
                self.load
                    .last_error
                    .insert(address.clone(), why.to_string());
            }
        }
        drop(tracker);
        let stats = filter.stats.try_borrow_mut();
        if let Ok(mut stats) = stats {
            stats.load_report(&address, ok);
        }
    }
}

fn read_answer(
    host: &dyn Host,
    config: &ServerLoad,
    body_size: usize,
) -> Result<crate::server_load::Report, ReportError> {
    match host.http_call_response_status() {
        Some(200) if body_size > config.max_body_bytes => Err(ReportError::TooLarge {
            limit: config.max_body_bytes,
        }),
        Some(200) => {
            let body = host.http_call_response_body(body_size).unwrap_or_default();
            parse_report(config, &body)
        }
        Some(status) => Err(ReportError::Status(status)),
        None => Err(ReportError::NoAnswer),
    }
}
