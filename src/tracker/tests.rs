use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::*;
use crate::admin::HostStatus;
use crate::health::PassivePolicy;
use crate::store::MemoryStore;

const TTL: u64 = 10_000;

fn endpoints(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.0.0.{i}:8000")).collect()
}

fn worker(store: &MemoryStore, n: usize, seed: u64) -> PoolTracker {
    let mut tracker = PoolTracker::new("pool", endpoints(n), seed, 1_000);
    tracker.install(store).unwrap();
    tracker
}

fn totals(store: &MemoryStore) -> Vec<u32> {
    Table::parse(store.raw("model_lb.v3.pool.table").unwrap())
        .unwrap()
        .totals()
}

fn route(tracker: &mut PoolTracker, store: &MemoryStore, rng: &mut SplitMix64) -> Routed {
    tracker
        .route(store, Strategy::LeastOutstandingRequests, 2, rng)
        .unwrap()
}

#[test]
fn first_worker_creates_the_table_and_the_others_adopt_it() {
    let store = MemoryStore::new();
    let mut a = PoolTracker::new("pool", endpoints(3), 1, 0);
    let mut b = PoolTracker::new("pool", endpoints(3).into_iter().rev().collect(), 2, 0);
    assert_eq!(a.install(&store).unwrap(), Install::Created);
    assert_eq!(b.install(&store).unwrap(), Install::Adopted);
    assert_eq!(
        a.membership(),
        b.membership(),
        "same endpoints in any order share one membership"
    );
    assert_eq!(totals(&store), vec![0, 0, 0]);
}

#[test]
fn a_request_counts_from_route_to_release_on_the_endpoint_it_was_sent_to() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 3, 1);
    let mut rng = SplitMix64::new(5);
    let routed = route(&mut t, &store, &mut rng);
    let chosen = routed.selection.chosen().unwrap();
    assert_eq!(routed.chosen_load, 1);
    assert_eq!(routed.ticket.endpoint_address(), endpoints(3)[chosen]);
    let mut expected = vec![0, 0, 0];
    expected[chosen] = 1;
    assert_eq!(totals(&store), expected);
    assert_eq!(
        t.release(&store, routed.ticket, Outcome::Neutral),
        Release::Applied
    );
    assert_eq!(totals(&store), vec![0, 0, 0]);
}

#[test]
fn workers_sharing_a_table_spread_requests_exactly_evenly() {
    let store = MemoryStore::new();
    let mut workers: Vec<PoolTracker> = (0..4).map(|i| worker(&store, 5, i)).collect();
    let mut rng = SplitMix64::new(9);
    let mut held = Vec::new();
    for i in 0..15 {
        let w = i % workers.len();
        held.push((w, route(&mut workers[w], &store, &mut rng).ticket));
    }
    assert_eq!(totals(&store), vec![3, 3, 3, 3, 3]);
    for (w, ticket) in held {
        assert_eq!(
            workers[w].release(&store, ticket, Outcome::Neutral),
            Release::Applied
        );
    }
    assert_eq!(totals(&store), vec![0; 5]);
}

#[test]
fn injected_cas_conflicts_are_retried_without_losing_or_doubling_a_count() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 2, 1);
    let mut rng = SplitMix64::new(1);
    store.inject_conflicts(ROUTE_ATTEMPTS - 1);
    let routed = route(&mut t, &store, &mut rng);
    assert_eq!(totals(&store).iter().sum::<u32>(), 1);
    assert_eq!(t.take_events().cas_conflicts, u64::from(ROUTE_ATTEMPTS - 1));
    store.inject_conflicts(RELEASE_ATTEMPTS - 1);
    assert_eq!(
        t.release(&store, routed.ticket, Outcome::Neutral),
        Release::Applied
    );
    assert_eq!(totals(&store), vec![0, 0]);
}

#[test]
fn endless_contention_fails_open_without_counting() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 2, 1);
    let mut rng = SplitMix64::new(1);
    store.inject_conflicts(ROUTE_ATTEMPTS);
    let err = t.route(&store, Strategy::Random, 1, &mut rng).unwrap_err();
    assert_eq!(err, TrackerError::Contention);
    assert_eq!(err.reason(), "contention");
    assert_eq!(totals(&store), vec![0, 0]);
}

#[test]
fn a_release_that_cannot_be_written_is_kept_and_applied_later() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 2, 1);
    let mut rng = SplitMix64::new(1);
    let a = route(&mut t, &store, &mut rng);
    let b = route(&mut t, &store, &mut rng);
    store.inject_conflicts(RELEASE_ATTEMPTS);
    assert_eq!(
        t.release(&store, a.ticket, Outcome::Neutral),
        Release::Deferred
    );
    store.fail_with(Some(2));
    assert_eq!(
        t.release(&store, b.ticket, Outcome::Neutral),
        Release::Deferred
    );
    assert_eq!(t.pending_releases(), 2);
    assert_eq!(totals(&store), vec![1, 1]);
    assert!(
        t.housekeeping(&store, 2_000, TTL).is_err(),
        "host still failing"
    );
    assert_eq!(t.pending_releases(), 2);
    store.fail_with(None);
    t.housekeeping(&store, 3_000, TTL).unwrap();
    assert_eq!(t.pending_releases(), 0);
    assert_eq!(totals(&store), vec![0, 0]);
    assert_eq!(
        t.take_events().deferred_releases,
        2,
        "a retried release is not counted twice"
    );
}

#[test]
fn host_failures_on_the_request_path_are_errors_not_panics() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 2, 1);
    let mut rng = SplitMix64::new(1);
    store.fail_with(Some(10));
    let err = t
        .route(&store, Strategy::LeastOutstandingRequests, 1, &mut rng)
        .unwrap_err();
    assert_eq!(err, TrackerError::Store(StoreError::Host(10)));
    assert_eq!(err.reason(), "host_error");
}

#[test]
fn no_eligible_endpoint_fails_open_without_counting() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 3, 1);
    let mut rng = SplitMix64::new(1);
    let down: Vec<HostStatus> = endpoints(3)
        .into_iter()
        .map(|address| HostStatus {
            address,
            healthy: false,
            removed: false,
            weight: 1,
            awaiting_first_check: false,
        })
        .collect();
    t.apply_cluster(&store, &down).unwrap();
    let err = t
        .route(&store, Strategy::LeastOutstandingRequests, 1, &mut rng)
        .unwrap_err();
    assert_eq!(err, TrackerError::NoEligibleEndpoint);
    assert_eq!(totals(&store), vec![0, 0, 0]);
}

#[test]
fn a_dead_vms_requests_are_reclaimed_after_its_lease_and_never_decremented_twice() {
    let store = MemoryStore::new();
    let mut dying = worker(&store, 2, 1);
    let mut survivor = worker(&store, 2, 2);
    let mut rng = SplitMix64::new(3);
    let orphans: Vec<Ticket> = (0..3)
        .map(|_| route(&mut dying, &store, &mut rng).ticket)
        .collect();
    let kept = route(&mut survivor, &store, &mut rng).ticket;
    assert_eq!(totals(&store).iter().sum::<u32>(), 4);

    // The dying VM stops ticking at t=1s. The survivor keeps heartbeating and leads.
    let first = survivor.housekeeping(&store, 2_000, TTL).unwrap();
    assert!(first.leader);
    assert_eq!(first.reaped.slots, 0);
    let before_expiry = survivor.housekeeping(&store, 1_000 + TTL - 1, TTL).unwrap();
    assert_eq!(before_expiry.reaped.requests, 0);
    let after = survivor.housekeeping(&store, 1_000 + TTL, TTL).unwrap();
    assert_eq!(after.reaped.slots, 1);
    assert_eq!(after.reaped.requests, 3);
    assert_eq!(after.loads.as_ref().map(|l| l.iter().sum::<u32>()), Some(1));

    // If the "dead" VM was only stalled, its late releases must not subtract again.
    for ticket in orphans {
        assert_eq!(
            dying.release(&store, ticket, Outcome::Neutral),
            Release::SlotReclaimed
        );
    }
    assert_eq!(totals(&store).iter().sum::<u32>(), 1);
    assert_eq!(
        survivor.release(&store, kept, Outcome::Neutral),
        Release::Applied
    );
    assert_eq!(totals(&store), vec![0, 0]);

    // The stalled VM notices it lost its slot and takes a new one on its next request.
    dying.housekeeping(&store, 1_000 + TTL + 1, TTL).unwrap();
    assert_eq!(dying.take_events().lost_slots, 1);
    let again = route(&mut dying, &store, &mut rng).ticket;
    assert_eq!(
        dying.release(&store, again, Outcome::Neutral),
        Release::Applied
    );
    assert_eq!(totals(&store), vec![0, 0]);
}

#[test]
fn only_one_vm_leads_while_the_leader_is_alive() {
    let store = MemoryStore::new();
    let mut a = worker(&store, 1, 1);
    let mut b = worker(&store, 1, 2);
    assert!(a.housekeeping(&store, 1_000, TTL).unwrap().leader);
    assert!(!b.housekeeping(&store, 1_500, TTL).unwrap().leader);
    assert!(b.housekeeping(&store, 1_500, TTL).unwrap().loads.is_none());
    assert!(a.housekeeping(&store, 2_000, TTL).unwrap().leader);
    // a stops ticking; b takes over once a's lease (renewed at 2s) runs out.
    assert!(!b.housekeeping(&store, 2_000 + TTL - 1, TTL).unwrap().leader);
    assert!(b.housekeeping(&store, 2_000 + TTL, TTL).unwrap().leader);
}

#[test]
fn a_new_endpoint_list_shares_the_counts_and_old_endpoints_leave_once_unwanted_and_idle() {
    let store = MemoryStore::new();
    let mut old = worker(&store, 3, 1);
    let mut rng = SplitMix64::new(1);
    let tickets: Vec<Ticket> = (0..6)
        .map(|_| route(&mut old, &store, &mut rng).ticket)
        .collect();
    assert_eq!(totals(&store), vec![2, 2, 2]);

    // The new config drops 10.0.0.1 and adds 10.0.0.4, in a different order. The pool becomes
    // the union, so the new config sees the old one's requests in flight.
    let next = vec![
        "10.0.0.4:8000".to_owned(),
        "10.0.0.3:8000".to_owned(),
        "10.0.0.2:8000".to_owned(),
    ];
    let mut new = PoolTracker::new("pool", next, 2, 1_000);
    assert_eq!(new.install(&store).unwrap(), Install::Replaced);
    assert_eq!(new.membership().len(), 4);
    assert_eq!(totals(&store), vec![2, 2, 2, 0]);

    // The new config routes only among its own endpoints: the idle new one first, never 10.0.0.1.
    let fresh = route(&mut new, &store, &mut rng);
    assert_eq!(fresh.ticket.endpoint_address(), "10.0.0.4:8000");
    for _ in 0..20 {
        let r = route(&mut new, &store, &mut rng);
        assert_ne!(r.ticket.endpoint_address(), "10.0.0.1:8000");
        assert!(!r
            .membership
            .header_value(&r.selection)
            .contains("10.0.0.1:8000"));
        new.release(&store, r.ticket, Outcome::Neutral);
    }
    // The old config's requests release normally.
    for ticket in tickets {
        assert_eq!(
            old.release(&store, ticket, Outcome::Neutral),
            Release::Applied
        );
    }
    assert_eq!(
        new.release(&store, fresh.ticket, Outcome::Neutral),
        Release::Applied
    );
    assert_eq!(totals(&store), vec![0, 0, 0, 0]);

    // While the old config lives (ticks), 10.0.0.1 stays; once it is gone for a lease, the
    // leader prunes it.
    new.housekeeping(&store, 2_000, TTL).unwrap();
    old.housekeeping(&store, 2_500, TTL).unwrap();
    new.housekeeping(&store, 2_500 + TTL, TTL).unwrap();
    assert_eq!(new.membership().len(), 4, "still wanted within the lease");
    new.housekeeping(&store, 4_000 + TTL, TTL).unwrap();
    assert_eq!(new.membership().len(), 3);
    assert!(new.membership().position("10.0.0.1:8000").is_none());
    assert_eq!(new.take_events().pruned_endpoints, 1);

    // A rollback to the old list, even by a cached configuration that is not re-installed,
    // brings the endpoint back on its next tick.
    old.housekeeping(&store, 5_000 + TTL, TTL).unwrap();
    assert_eq!(old.membership().len(), 4);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        let r = route(&mut old, &store, &mut rng);
        seen.insert(r.ticket.endpoint_address().to_owned());
        old.release(&store, r.ticket, Outcome::Neutral);
    }
    assert!(seen.contains("10.0.0.1:8000"));
    assert!(!seen.contains("10.0.0.4:8000"));
}

#[test]
fn an_endpoint_with_requests_in_flight_is_never_pruned() {
    let store = MemoryStore::new();
    let mut old = worker(&store, 2, 1);
    let mut rng = SplitMix64::new(1);
    let held: Vec<Ticket> = (0..2)
        .map(|_| route(&mut old, &store, &mut rng).ticket)
        .collect();
    let mut new = PoolTracker::new("pool", vec!["10.0.0.9:8000".to_owned()], 2, 1_000);
    new.install(&store).unwrap();
    // Nobody has wanted the old endpoints for ages, but their requests' slot is alive.
    let now = 100_000;
    let key = "model_lb.v3.pool.table";
    let mut table = Table::parse(store.raw(key).unwrap()).unwrap();
    for e in 0..2 {
        let mut health = table.health(e);
        health.wanted_at_s = 0;
        table.set_health(e, &health);
    }
    for slot in 0..table.slot_count() {
        table.heartbeat(slot, now);
    }
    store.overwrite(key, table.as_bytes());
    new.housekeeping(&store, now, TTL).unwrap();
    assert_eq!(new.membership().len(), 3, "busy endpoints stay");
    for ticket in held {
        assert_eq!(
            old.release(&store, ticket, Outcome::Neutral),
            Release::Applied
        );
    }
    new.housekeeping(&store, now + 500, TTL).unwrap();
    assert_eq!(new.membership().endpoints(), &["10.0.0.9:8000".to_owned()]);
}

#[test]
fn a_table_wiped_under_live_requests_never_goes_negative() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 2, 1);
    let mut rng = SplitMix64::new(1);
    let tickets: Vec<Ticket> = (0..4)
        .map(|_| route(&mut t, &store, &mut rng).ticket)
        .collect();
    // Another worker re-created the table during a config race.
    let mut other = PoolTracker::new("pool", endpoints(2), 7, 0);
    other.create(&store).unwrap();
    assert_eq!(totals(&store), vec![0, 0]);
    for ticket in tickets {
        assert_eq!(
            t.release(&store, ticket, Outcome::Neutral),
            Release::SlotReclaimed
        );
    }
    assert_eq!(totals(&store), vec![0, 0]);
    // And routing continues on the new table.
    let ticket = route(&mut t, &store, &mut rng).ticket;
    assert_eq!(totals(&store).iter().sum::<u32>(), 1);
    assert_eq!(
        t.release(&store, ticket, Outcome::Neutral),
        Release::Applied
    );
}

#[test]
fn a_damaged_or_missing_table_is_rebuilt_on_the_request_path() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 2, 1);
    let mut rng = SplitMix64::new(1);
    store.overwrite("model_lb.v3.pool.table", b"garbage");
    let routed = route(&mut t, &store, &mut rng);
    assert_eq!(totals(&store).iter().sum::<u32>(), 1);
    assert_eq!(
        t.release(&store, routed.ticket, Outcome::Neutral),
        Release::Applied
    );
}

#[test]
fn a_double_release_is_clamped_and_reported() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 1, 1);
    let mut rng = SplitMix64::new(1);
    let routed = route(&mut t, &store, &mut rng);
    assert_eq!(
        t.release(&store, routed.ticket.clone(), Outcome::Neutral),
        Release::Applied
    );
    assert_eq!(
        t.release(&store, routed.ticket, Outcome::Neutral),
        Release::ClampedAtZero
    );
    assert_eq!(totals(&store), vec![0]);
    assert_eq!(t.take_events().corrections, 1);
}

/// Deferred releases are applied by housekeeping; under this test's artificial contention that
/// can take a few ticks.
fn flush_pending(t: &mut PoolTracker, store: &MemoryStore) {
    for tick in 0..1_000 {
        if t.pending_releases() == 0 && t.folded_releases() == 0 {
            return;
        }
        let _ = t.housekeeping(store, 2_000 + tick, 3_600_000);
    }
    panic!("{} releases still pending", t.pending_releases());
}

/// Many workers on real threads hammer one table through CAS, with extra conflicts injected:
/// every increment and decrement must land exactly once.
#[test]
fn concurrent_workers_lose_no_update() {
    concurrent_workers(false);
}

/// The same with releases folded into the next routing write: still exact.
#[test]
fn concurrent_workers_with_folded_releases_lose_no_update() {
    concurrent_workers(true);
}

fn concurrent_workers(fold: bool) {
    const WORKERS: usize = 8;
    const ROUNDS: usize = 300;
    const HELD: usize = 5;
    let store = Arc::new(MemoryStore::new());
    worker(&store, 7, 99);
    let (held_tx, held_rx) = mpsc::channel::<usize>();
    let mut go_txs = Vec::new();
    let handles: Vec<_> = (0..WORKERS)
        .map(|w| {
            let store = Arc::clone(&store);
            let held_tx = held_tx.clone();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            go_txs.push(go_tx);
            std::thread::spawn(move || {
                let mut t = worker(&store, 7, w as u64 + 1);
                t.set_fold_releases(fold);
                let mut rng = SplitMix64::new(w as u64);
                let (mut routed, mut released, mut failed_open) = (0usize, 0usize, 0usize);
                let mut route_some = |t: &mut PoolTracker, n: usize| -> Vec<Ticket> {
                    let mut tickets = Vec::new();
                    for _ in 0..n {
                        match t.route(&*store, Strategy::LeastOutstandingRequests, 1, &mut rng) {
                            Ok(r) => tickets.push(r.ticket),
                            Err(TrackerError::Contention) => failed_open += 1,
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                    tickets
                };
                for round in 0..ROUNDS {
                    if round % 50 == 0 {
                        store.inject_conflicts(3);
                    }
                    let tickets = route_some(&mut t, HELD);
                    routed += tickets.len();
                    for ticket in tickets {
                        // Deferred releases are part of the contract: applied by housekeeping.
                        let outcome = t.release(&*store, ticket, Outcome::Neutral);
                        assert!(
                            matches!(
                                outcome,
                                Release::Applied | Release::Deferred | Release::Folded
                            ),
                            "{outcome:?}"
                        );
                        released += 1;
                    }
                }
                flush_pending(&mut t, &store);
                // Hold some requests while the main thread checks the totals.
                let held = route_some(&mut t, HELD);
                routed += held.len();
                held_tx.send(held.len()).unwrap();
                go_rx.recv().unwrap();
                for ticket in held {
                    let outcome = t.release(&*store, ticket, Outcome::Neutral);
                    assert!(
                        matches!(
                            outcome,
                            Release::Applied | Release::Deferred | Release::Folded
                        ),
                        "{outcome:?}"
                    );
                    released += 1;
                }
                flush_pending(&mut t, &store);
                let events = t.take_events();
                eprintln!("worker {w}: {routed} routed, {failed_open} failed open, {events:?}");
                (routed, released, failed_open)
            })
        })
        .collect();
    drop(held_tx);
    // A worker that panics drops its sender, so this fails instead of hanging.
    let held: usize = (0..WORKERS)
        .map(|_| {
            held_rx
                .recv_timeout(Duration::from_secs(120))
                .expect("a worker died")
        })
        .sum();
    assert_eq!(totals(&store).iter().sum::<u32>() as usize, held);
    for go in go_txs {
        go.send(()).unwrap();
    }
    let (mut routed, mut released, mut failed_open) = (0, 0, 0);
    for handle in handles {
        let (r, l, f) = handle.join().unwrap();
        routed += r;
        released += l;
        failed_open += f;
    }
    assert_eq!(routed, released);
    assert_eq!(routed + failed_open, WORKERS * (ROUNDS + 1) * HELD);
    assert!(
        failed_open * 100 < routed,
        "{failed_open} of {routed} failed open"
    );
    assert_eq!(totals(&store), vec![0; 7]);
    assert!(
        store.conflicts_seen() > 0,
        "the test must actually exercise CAS conflicts"
    );
}

#[test]
fn folded_releases_ride_on_the_next_route_and_a_tick_flushes_the_rest() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 2, 1);
    t.set_fold_releases(true);
    let mut rng = SplitMix64::new(1);
    let a = route(&mut t, &store, &mut rng);
    let b = route(&mut t, &store, &mut rng);
    assert_eq!(totals(&store), vec![1, 1]);
    assert_eq!(
        t.release(&store, a.ticket, Outcome::Neutral),
        Release::Folded
    );
    // Not written yet...
    assert_eq!(totals(&store).iter().sum::<u32>(), 2);
    // ...until the next route carries it in the same write (and sees the freed endpoint).
    let c = route(&mut t, &store, &mut rng);
    assert_eq!(totals(&store).iter().sum::<u32>(), 2);
    assert_eq!(t.folded_releases(), 0);
    t.release(&store, b.ticket, Outcome::Neutral);
    t.release(&store, c.ticket, Outcome::Failure);
    t.housekeeping(&store, 2_000, TTL).unwrap();
    assert_eq!(totals(&store), vec![0, 0]);
    assert_eq!(t.take_events().corrections, 0);
}

#[test]
fn a_table_whose_columns_disagree_with_its_membership_is_rebuilt_not_trusted() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 3, 1);
    let mut rng = SplitMix64::new(1);
    let held = route(&mut t, &store, &mut rng).ticket;
    // A foreign writer leaves a 5-column table pointing at the 3-endpoint membership.
    let token = t.membership().token();
    store.overwrite("model_lb.v3.pool.table", Table::new(token, 5).as_bytes());
    let routed = route(&mut t, &store, &mut rng);
    assert_eq!(totals(&store).len(), 3);
    assert_eq!(totals(&store).iter().sum::<u32>(), 1);
    // The held request's slot went with the bad table: nothing to decrement, no panic.
    assert_eq!(
        t.release(&store, held, Outcome::Neutral),
        Release::SlotReclaimed
    );
    assert_eq!(
        t.release(&store, routed.ticket, Outcome::Neutral),
        Release::Applied
    );
    assert_eq!(totals(&store), vec![0, 0, 0]);
}

const PASSIVE: PassivePolicy = PassivePolicy {
    failure_threshold: 3,
    base_ejection_ms: 5_000,
    max_ejection_ms: 60_000,
    max_blamed_body_bytes: 65_536,
    max_ejection_percent: 100,
};

fn healthy_worker(store: &MemoryStore, n: usize, seed: u64) -> PoolTracker {
    let mut tracker = PoolTracker::with_health(
        "pool",
        endpoints(n),
        MembershipSource::Configured,
        Some(PASSIVE),
        seed,
        1_000,
    );
    tracker.install(store).unwrap();
    tracker
}

fn host(address: &str, healthy: bool) -> HostStatus {
    HostStatus {
        address: address.to_owned(),
        healthy,
        removed: false,
        weight: 1,
        awaiting_first_check: false,
    }
}

#[test]
fn consecutive_failures_eject_an_endpoint_until_its_ejection_expires() {
    let store = MemoryStore::new();
    let mut t = healthy_worker(&store, 2, 1);
    let mut rng = SplitMix64::new(1);
    let bad = "10.0.0.2:8000";
    let mut failures = 0;
    while failures < 3 {
        let routed = route(&mut t, &store, &mut rng);
        let outcome = if routed.ticket.endpoint_address() == bad {
            failures += 1;
            Outcome::Failure
        } else {
            Outcome::Success
        };
        t.release(&store, routed.ticket, outcome);
    }
    let events = t.take_events();
    assert_eq!(
        events.ejections,
        vec![Ejection {
            address: bad.into(),
            for_ms: 5_000,
            failures: 3
        }]
    );
    // While ejected it is neither chosen nor listed as a fallback.
    for _ in 0..20 {
        let routed = route(&mut t, &store, &mut rng);
        assert_eq!(
            routed.membership.header_value(&routed.selection),
            "10.0.0.1:8000"
        );
        t.release(&store, routed.ticket, Outcome::Success);
    }
    // The tick clock passes the ejection: it is chosen again (a probe).
    t.housekeeping(&store, 1_000 + 5_000, TTL).unwrap();
    let mut chosen_again = false;
    for _ in 0..20 {
        let routed = route(&mut t, &store, &mut rng);
        chosen_again |= routed.ticket.endpoint_address() == bad;
        t.release(&store, routed.ticket, Outcome::Neutral);
    }
    assert!(chosen_again);
    assert_eq!(totals(&store), vec![0, 0]);
}

#[test]
fn when_every_endpoint_fails_the_ejection_cap_keeps_the_pool_serving() {
    let store = MemoryStore::new();
    let mut t = PoolTracker::with_health(
        "pool",
        endpoints(5),
        MembershipSource::Configured,
        Some(PassivePolicy {
            max_ejection_percent: 40,
            ..PASSIVE
        }),
        1,
        1_000,
    );
    t.install(&store).unwrap();
    let mut rng = SplitMix64::new(3);
    // Every server answers 503 (overload): 40 % of 5 may be ejected, so 2.
    for _ in 0..200 {
        let routed = route(&mut t, &store, &mut rng);
        t.release(&store, routed.ticket, Outcome::Failure);
    }
    let events = t.take_events();
    assert_eq!(events.ejections.len(), 2);
    assert!(events.capped_ejections > 0);
    let mut served = std::collections::HashSet::new();
    for _ in 0..60 {
        let routed = route(&mut t, &store, &mut rng);
        served.insert(routed.ticket.endpoint_address().to_owned());
        t.release(&store, routed.ticket, Outcome::Failure);
    }
    assert_eq!(
        served.len(),
        3,
        "the three endpoints kept in all serve: {served:?}"
    );
}

/// The classic least-outstanding-requests trap: an endpoint that fails instantly always looks
/// idle. Passive ejection keeps its share small.
#[test]
fn a_fast_failing_endpoint_does_not_attract_traffic() {
    let store = MemoryStore::new();
    let mut t = healthy_worker(&store, 3, 1);
    let mut rng = SplitMix64::new(2);
    let bad = "10.0.0.3:8000";
    let mut held = Vec::new();
    let mut to_bad = 0;
    let mut now = 1_000;
    for i in 0..3_000 {
        let routed = route(&mut t, &store, &mut rng);
        if routed.ticket.endpoint_address() == bad {
            to_bad += 1;
            t.release(&store, routed.ticket, Outcome::Failure);
        } else {
            // Healthy endpoints take a while: keep up to 4 requests in flight.
            held.push(routed.ticket);
            if held.len() > 4 {
                let done = held.remove(0);
                t.release(&store, done, Outcome::Success);
            }
        }
        if i % 10 == 0 {
            now += 100;
            t.housekeeping(&store, now, TTL).unwrap();
        }
    }
    // 3,000 requests over 30 simulated seconds; without ejection the bad endpoint takes most.
    assert!(to_bad < 30, "fast-failing endpoint got {to_bad} requests");
    assert!(
        t.take_events().ejections.len() >= 3,
        "it was re-ejected with backoff"
    );
}

#[test]
fn without_passive_health_failures_change_nothing() {
    let store = MemoryStore::new();
    let mut t = worker(&store, 1, 1);
    let mut rng = SplitMix64::new(1);
    for _ in 0..10 {
        let routed = route(&mut t, &store, &mut rng);
        t.release(&store, routed.ticket, Outcome::Failure);
    }
    assert!(t.take_events().ejections.is_empty());
    assert!(t.route(&store, Strategy::Random, 0, &mut rng).is_ok());
}

#[test]
fn envoys_health_verdict_and_missing_hosts_exclude_endpoints_until_they_recover() {
    let store = MemoryStore::new();
    let mut t = healthy_worker(&store, 3, 1);
    let mut other = healthy_worker(&store, 3, 2);
    let mut rng = SplitMix64::new(1);
    let update = t
        .apply_cluster(
            &store,
            &[host("10.0.0.1:8000", true), host("10.0.0.2:8000", false)],
        )
        .unwrap();
    assert_eq!(update.missing, vec!["10.0.0.3:8000".to_owned()]);
    assert_eq!(
        update.health,
        vec![
            ("10.0.0.2:8000".into(), false),
            ("10.0.0.3:8000".into(), false)
        ]
    );
    // Every worker sees it through the shared table.
    for _ in 0..10 {
        let routed = route(&mut other, &store, &mut rng);
        assert_eq!(
            routed.membership.header_value(&routed.selection),
            "10.0.0.1:8000"
        );
        other.release(&store, routed.ticket, Outcome::Success);
    }
    // Nothing changed: nothing written.
    let writes = store.writes();
    let again = t
        .apply_cluster(
            &store,
            &[host("10.0.0.1:8000", true), host("10.0.0.2:8000", false)],
        )
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(store.writes(), writes);
    let recovered = t
        .apply_cluster(
            &store,
            &[
                host("10.0.0.1:8000", true),
                host("10.0.0.2:8000", true),
                host("10.0.0.3:8000", true),
            ],
        )
        .unwrap();
    assert_eq!(recovered.health.len(), 2);
    let routed = route(&mut other, &store, &mut rng);
    assert_eq!(routed.selection.as_slice().len(), 3);
}

#[test]
fn a_followed_membership_tracks_the_cluster_and_keeps_counts_of_endpoints_that_stay() {
    // (Hosts Envoy keeps only until their health check fails count as gone: see the last step.)
    let store = MemoryStore::new();
    let follow = |seed| {
        let mut t = PoolTracker::with_health(
            "pool",
            Vec::new(),
            MembershipSource::Followed,
            None,
            seed,
            1_000,
        );
        t.install(&store).unwrap();
        t
    };
    let mut leader = follow(1);
    let mut worker = follow(2);
    let mut rng = SplitMix64::new(1);
    assert!(leader.membership().is_empty());
    assert_eq!(
        worker
            .route(&store, Strategy::LeastOutstandingRequests, 1, &mut rng)
            .unwrap_err(),
        TrackerError::NoEligibleEndpoint
    );
    let update = leader
        .apply_cluster(
            &store,
            &[host("10.0.0.1:8000", true), host("10.0.0.2:8000", true)],
        )
        .unwrap();
    assert_eq!(update.added.len(), 2);
    let held: Vec<Ticket> = (0..4)
        .map(|_| route(&mut worker, &store, &mut rng).ticket)
        .collect();
    assert_eq!(totals(&store), vec![2, 2]);

    // 10.0.0.1 leaves, 10.0.0.3 joins.
    let update = leader
        .apply_cluster(
            &store,
            &[host("10.0.0.2:8000", true), host("10.0.0.3:8000", true)],
        )
        .unwrap();
    assert_eq!(update.added, vec!["10.0.0.3:8000".to_owned()]);
    assert_eq!(update.removed, vec!["10.0.0.1:8000".to_owned()]);
    assert_eq!(totals(&store), vec![2, 0]);
    let fresh = route(&mut worker, &store, &mut rng);
    assert_eq!(fresh.ticket.endpoint_address(), "10.0.0.3:8000");
    let mut outcomes: Vec<Release> = held
        .into_iter()
        .map(|t| worker.release(&store, t, Outcome::Success))
        .collect();
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        vec![
            Release::Applied,
            Release::Applied,
            Release::EndpointRemoved,
            Release::EndpointRemoved
        ]
    );
    worker.release(&store, fresh.ticket, Outcome::Success);
    assert_eq!(totals(&store), vec![0, 0]);

    // Envoy keeps a host removed from EDS while it still passes health checks; for the pool
    // it is gone.
    let mut draining = host("10.0.0.3:8000", true);
    draining.removed = true;
    let update = leader
        .apply_cluster(&store, &[host("10.0.0.2:8000", true), draining])
        .unwrap();
    assert_eq!(update.removed, vec!["10.0.0.3:8000".to_owned()]);

    // A VM configured later adopts the followed membership instead of imposing its own list.
    let mut late = PoolTracker::with_health(
        "pool",
        endpoints(5),
        MembershipSource::Followed,
        None,
        9,
        1_000,
    );
    assert_eq!(late.install(&store).unwrap(), Install::Adopted);
    assert_eq!(late.membership().len(), 1);
}
