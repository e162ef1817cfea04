//! Per-endpoint health, kept in the shared table next to the counts so every worker sees it with
//! the read it already makes (sparsely: only endpoints whose health is not the default). Two sources: Envoy's own view (active health checks, outlier
//! detection, EDS status) polled from the admin API, and passive observation of request outcomes
//! with an ejection that backs off. The latter matters for least-outstanding-requests: a backend
//! that fails fast finishes its requests quickly, looks idle, and would otherwise attract traffic.

/// Consecutive ejections are remembered up to this many doublings of the ejection time.
const MAX_EJECTIONS: u8 = 16;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// Envoy itself reports the host unhealthy (failed active health check, outlier ejection,
    /// EDS status unhealthy/draining/timeout).
    pub active_unhealthy: bool,
    /// Ejections in a row; sets the next ejection's length and lowers the failure threshold to 1
    /// while a host is on probation.
    pub ejections: u8,
    pub failures: u16,
    /// Ms since the epoch until which the host is passively ejected; 0 when it is not.
    pub ejected_until_ms: u64,
    /// Seconds since the epoch when a live plugin configuration last listed this endpoint;
    /// endpoints nobody has wanted for a lease are pruned from the pool.
    pub wanted_at_s: u32,
}

/// How a finished request went, as far as its first-choice endpoint is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500 came from the endpoint.
    Success,
    /// 5xx (including Envoy's own 503 for a refused or reset connection and 504 for a timeout),
    /// or the request had to be retried on another endpoint.
    Failure,
    /// Nothing learned: e.g. the client went away before any response.
    Neutral,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassivePolicy {
    pub failure_threshold: u16,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    /// Resets of requests with a larger body are not held against the endpoint (see `outcome`).
    pub max_blamed_body_bytes: u64,
    /// At most this share of the pool is ejected at once (at least one endpoint), like Envoy's
    /// outlier detection: when servers fail from overload, ejecting them all would push their
    /// load onto the rest until those fail too.
    pub max_ejection_percent: u8,
}

impl PassivePolicy {
    /// How many endpoints of a pool of `endpoints` may be ejected at once.
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        (endpoints * usize::from(self.max_ejection_percent) / 100).max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// The endpoint reached the failure threshold, but the pool already has as many endpoints
    /// ejected as `max_ejection_percent` allows: it stays in, and is ejected at its next
    /// failure once there is room.
    Capped,
    /// The endpoint was just ejected for this long.
    Ejected {
        for_ms: u64,
        failures: u16,
    },
}

impl Health {
    pub fn eligible(&self, now_ms: u64) -> bool {
        !self.active_unhealthy && self.ejected_until_ms <= now_ms
    }

    /// Folds one request's outcome into the endpoint's passive health. `may_eject` is false
    /// while the pool is at its ejection cap.
    pub fn record(
        &mut self,
        outcome: Outcome,
        policy: &PassivePolicy,
        now_ms: u64,
        may_eject: bool,
    ) -> Change {
        match outcome {
            Outcome::Neutral => Change::None,
            Outcome::Success => {
                self.failures = 0;
                if self.ejected_until_ms <= now_ms {
                    self.ejections = self.ejections.saturating_sub(1);
                    self.ejected_until_ms = 0;
                }
                Change::None
            }
            Outcome::Failure => {
                if self.ejected_until_ms > now_ms {
                    // Requests that were already in flight when it was ejected: no news.
                    return Change::None;
                }
                self.failures = self.failures.saturating_add(1);
                let threshold = if self.ejections > 0 {
                    1
                } else {
                    policy.failure_threshold
                };
                if self.failures < threshold {
                    return Change::None;
                }
                if !may_eject {
                    self.failures = threshold;
                    return Change::Capped;
                }
                let failures = self.failures;
                self.ejections = (self.ejections + 1).min(MAX_EJECTIONS);
                let for_ms = policy
                    .base_ejection_ms
                    .saturating_mul(1 << (self.ejections - 1))
                    .min(policy.max_ejection_ms);
                self.ejected_until_ms = now_ms.saturating_add(for_ms);
                self.failures = 0;
                Change::Ejected { for_ms, failures }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: PassivePolicy = PassivePolicy {
        failure_threshold: 3,
        base_ejection_ms: 1_000,
        max_ejection_ms: 5_000,
        max_blamed_body_bytes: 65_536,
        max_ejection_percent: 10,
    };

    #[test]
    fn ejects_after_consecutive_failures_and_a_success_resets_the_streak() {
        let mut h = Health::default();
        assert_eq!(h.record(Outcome::Failure, &POLICY, 0, true), Change::None);
        assert_eq!(h.record(Outcome::Failure, &POLICY, 0, true), Change::None);
        assert_eq!(h.record(Outcome::Success, &POLICY, 0, true), Change::None);
        assert_eq!(h.failures, 0);
        h.record(Outcome::Failure, &POLICY, 0, true);
        h.record(Outcome::Failure, &POLICY, 0, true);
        assert_eq!(
            h.record(Outcome::Failure, &POLICY, 10, true),
            Change::Ejected {
                for_ms: 1_000,
                failures: 3
            }
        );
        assert!(!h.eligible(10));
        assert!(!h.eligible(1_009));
        assert!(h.eligible(1_010));
        assert_eq!(h.record(Outcome::Neutral, &POLICY, 20, true), Change::None);
    }

    #[test]
    fn failures_of_requests_already_in_flight_do_not_extend_an_ejection() {
        let mut h = Health::default();
        for _ in 0..3 {
            h.record(Outcome::Failure, &POLICY, 0, true);
        }
        let until = h.ejected_until_ms;
        for _ in 0..10 {
            assert_eq!(h.record(Outcome::Failure, &POLICY, 500, true), Change::None);
        }
        assert_eq!(h.ejected_until_ms, until);
    }

    #[test]
    fn a_host_on_probation_is_ejected_again_at_once_for_twice_as_long_up_to_the_cap() {
        let mut h = Health::default();
        for _ in 0..3 {
            h.record(Outcome::Failure, &POLICY, 0, true);
        }
        let mut now = h.ejected_until_ms;
        let mut lengths = Vec::new();
        for _ in 0..5 {
            match h.record(Outcome::Failure, &POLICY, now, true) {
                Change::Ejected {
                    for_ms,
                    failures: 1,
                } => lengths.push(for_ms),
                other => panic!("expected a re-ejection, got {other:?}"),
            }
            now = h.ejected_until_ms;
        }
        assert_eq!(lengths, vec![2_000, 4_000, 5_000, 5_000, 5_000]);
    }

    #[test]
    fn successes_after_recovery_shorten_the_memory_of_ejections() {
        let mut h = Health::default();
        for _ in 0..3 {
            h.record(Outcome::Failure, &POLICY, 0, true);
        }
        let now = h.ejected_until_ms;
        h.record(Outcome::Success, &POLICY, now, true);
        assert_eq!((h.ejections, h.ejected_until_ms), (0, 0));
        // Back to the full threshold.
        assert_eq!(h.record(Outcome::Failure, &POLICY, now, true), Change::None);
    }

    #[test]
    fn at_the_ejection_cap_a_failing_endpoint_stays_in_until_there_is_room() {
        let mut h = Health::default();
        h.record(Outcome::Failure, &POLICY, 0, false);
        h.record(Outcome::Failure, &POLICY, 0, false);
        assert_eq!(
            h.record(Outcome::Failure, &POLICY, 0, false),
            Change::Capped
        );
        assert!(h.eligible(0));
        assert_eq!(
            h.record(Outcome::Failure, &POLICY, 1, false),
            Change::Capped
        );
        // Room again: the next failure ejects at once.
        assert!(matches!(
            h.record(Outcome::Failure, &POLICY, 2, true),
            Change::Ejected { .. }
        ));
        assert_eq!(POLICY.max_ejected(3), 1, "at least one");
        assert_eq!(POLICY.max_ejected(20), 2);
        let half = PassivePolicy {
            max_ejection_percent: 50,
            ..POLICY
        };
        assert_eq!(half.max_ejected(5), 2);
    }

    #[test]
    fn active_health_overrides_eligibility() {
        let h = Health {
            active_unhealthy: true,
            ..Health::default()
        };
        assert!(!h.eligible(u64::MAX));
    }
}
