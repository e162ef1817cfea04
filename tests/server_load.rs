//! The fleet-wide view: each Envoy polls the servers' own load reports and adds the other
//! replicas' share to its exact local counts. Real Envoys (`--concurrency 2`), scriptable
//! backends whose `/metrics` reports the requests they hold.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const CLUSTER: &str = "model_servers";
const INTERVAL_MS: u64 = 100;

fn server_load_fields() -> String {
    format!(r#""server_load": {{"interval_ms": {INTERVAL_MS}, "cluster": "{CLUSTER}"}}"#)
}

fn replica(ports: [u16; 3]) -> Envoy {
    Envoy::start(
        &EnvoyConfig::shipped()
            .backends(ports)
            .plugin_config(&plugin_json_with(
                "LEAST_OUTSTANDING_REQUESTS",
                ports,
                &server_load_fields(),
            )),
    )
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(&format!("model_lb.{CLUSTER}.{name}"))
}

fn estimated(envoy: &Envoy, backend: &Backend) -> u64 {
    stat(
        envoy,
        &format!("endpoint.{}.estimated_in_flight", backend.id()),
    )
}

fn hold_through(listener: SocketAddr) -> thread::JoinHandle<Response> {
    thread::spawn(move || request(listener, "/v1/completions", &[HOLD]).unwrap())
}

fn active(backends: &[Backend]) -> Vec<usize> {
    backends.iter().map(Backend::active).collect()
}

fn wait_for_active(backends: &[Backend], total: usize) {
    wait_until(
        Duration::from_secs(10),
        "backends to hold the requests",
        || active(backends).iter().sum::<usize>() == total,
    );
}

fn release(backends: &[Backend], held: Vec<thread::JoinHandle<Response>>) {
    for b in backends {
        b.release_held();
    }
    for h in held {
        assert_eq!(h.join().unwrap().status, 200);
    }
    wait_for_active(backends, 0);
}

#[test]
fn requests_held_through_one_replica_steer_the_other() {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    let a = replica(ports);
    let b = replica(ports);
    // Four trials: a replica blind to the other would hit the free endpoint by luck with
    // probability (1/3)^4.
    for trial in 0..4 {
        let mut held: Vec<_> = (0..2).map(|_| hold_through(a.listener)).collect();
        wait_for_active(&backends, 2);
        let held_at = Instant::now();
        let busy: Vec<bool> = active(&backends).iter().map(|&n| n == 1).collect();
        // Replica B learns it from the servers' reports, within a poll or two.
        wait_until(
            Duration::from_secs(5),
            "replica B to see A's requests",
            || {
                backends
                    .iter()
                    .zip(&busy)
                    .all(|(backend, &busy)| estimated(&b, backend) == u64::from(busy))
            },
        );
        eprintln!(
            "FIGURE replicas: trial {trial}: B's gauges showed A's requests {} ms after the servers held them (poll every {INTERVAL_MS} ms, gauges published every 200 ms)",
            held_at.elapsed().as_millis()
        );
        held.push(hold_through(b.listener));
        wait_for_active(&backends, 3);
        assert_eq!(
            active(&backends),
            vec![1, 1, 1],
            "replica B ignored the requests replica A holds (busy before: {busy:?})"
        );
        release(&backends, held);
        wait_until(Duration::from_secs(5), "B's estimates to drain", || {
            backends.iter().all(|backend| estimated(&b, backend) == 0)
        });
    }
    // One poller per Envoy process, not one per worker VM (there are three VMs here).
    let before: Vec<usize> = backends.iter().map(Backend::metrics_polls).collect();
    let started = Instant::now();
    wait_until(Duration::from_secs(5), "two seconds of polling", || {
        started.elapsed() >= Duration::from_secs(2)
    });
    let seconds = started.elapsed().as_secs_f64();
    for (backend, before) in backends.iter().zip(before) {
        let per_second = (backend.metrics_polls() - before) as f64 / seconds / 2.0;
        eprintln!(
            "FIGURE replicas: {} polled {per_second:.1} times per second per Envoy",
            backend.id()
        );
        assert!(
            per_second <= 1.6 * 1_000.0 / INTERVAL_MS as f64,
            "{per_second} polls per second per Envoy: more than one poller?"
        );
    }
    assert_eq!(stat(&b, "server_load.report_errors"), 0);
    assert_eq!(stat(&b, "fail_open.no_eligible_endpoint"), 0);
}

#[test]
fn broken_hanging_or_huge_metrics_only_fall_back_to_local_counts() {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    backends[0].set_metrics(MetricsMode::Status500);
    backends[1].set_metrics(MetricsMode::Garbage);
    backends[2].set_metrics(MetricsMode::Hang);
    let envoy = replica(ports);
    wait_until(
        Duration::from_secs(10),
        "every report to count as stale",
        || {
            stat(&envoy, "server_load.stale_endpoints") == 3
                && stat(&envoy, "server_load.report_errors") >= 2
        },
    );
    // Routing carries on exactly, on this Envoy's own counts.
    let held: Vec<_> = (0..6).map(|_| hold_through(envoy.listener)).collect();
    wait_for_active(&backends, 6);
    assert_eq!(active(&backends), vec![2, 2, 2]);
    release(&backends, held);
    // A 100 MB answer: refused past max_body_bytes (Envoy itself stops buffering at its
    // async-client limit); Envoy keeps serving.
    backends[0].set_metrics(MetricsMode::Huge);
    let errors = stat(&envoy, "server_load.report_errors");
    wait_until(
        Duration::from_secs(20),
        "the huge answer to be refused",
        || stat(&envoy, "server_load.report_errors") > errors,
    );
    for _ in 0..10 {
        assert_eq!(
            request(envoy.listener, "/v1/completions", &[])
                .unwrap()
                .status,
            200
        );
    }
    let log = envoy.log();
    // Each broken server named once, with its reason (the hang is Envoy's 504 timeout).
    assert!(log.contains("no fresh server-load report for"), "{log}");
    for reason in [
        "HTTP status 500",
        "vllm:num_requests_running not found",
        "HTTP status 504",
    ] {
        assert!(log.contains(reason), "log lacks {reason:?}:\n{log}");
    }
    // Repaired servers are fresh again (the backoff of failed polls is capped).
    for b in &backends {
        b.set_metrics(MetricsMode::Normal);
    }
    wait_until(Duration::from_secs(40), "reports to be fresh again", || {
        stat(&envoy, "server_load.stale_endpoints") == 0
    });
    envoy.wait_for_zero_in_flight(CLUSTER);
    assert_eq!(stat(&envoy, "counter_corrections"), 0);
}

#[test]
fn a_replica_that_goes_away_leaves_no_load_behind() {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    let a = replica(ports);
    let b = replica(ports);
    let held: Vec<_> = (0..3).map(|_| hold_through(a.listener)).collect();
    wait_for_active(&backends, 3);
    wait_until(Duration::from_secs(5), "B to see A's requests", || {
        backends.iter().all(|backend| estimated(&b, backend) == 1)
    });
    // A dies: its connections close, the servers drop the requests, and the next reports
    // say so.
    drop(a);
    for h in held {
        let _ = h.join();
    }
    wait_for_active(&backends, 0);
    let gone = Instant::now();
    wait_until(Duration::from_secs(5), "B's estimates to drain", || {
        backends.iter().all(|backend| estimated(&b, backend) == 0)
    });
    eprintln!(
        "FIGURE replicas: a dead replica's load left B's estimates {} ms after its requests ended",
        gone.elapsed().as_millis()
    );
    // A restarted replica starts from the servers' reports, not from anything remembered.
    let a = replica(ports);
    let held: Vec<_> = (0..3).map(|_| hold_through(a.listener)).collect();
    wait_for_active(&backends, 3);
    assert_eq!(active(&backends), vec![1, 1, 1]);
    release(&backends, held);
}

#[test]
fn envoy_endpoint_weights_scale_how_much_an_endpoint_takes() {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    let heavy = format!("port_value: {} }} }} }}", ports[2]);
    let config = EnvoyConfig::shipped()
        .backends(ports)
        .plugin_config(&plugin_json_with(
            "LEAST_OUTSTANDING_REQUESTS",
            ports,
            r#""admin_cluster": "model_lb_admin", "admin_poll_interval_ms": 200"#,
        ))
        .replace(
            &heavy,
            &format!("{heavy}\n          load_balancing_weight: 4"),
        );
    let envoy = Envoy::start(&config.replace("interval: 5s", "interval: 0.25s"));
    let weight = format!("endpoint.{}.weight", backends[2].id());
    wait_until(
        Duration::from_secs(10),
        "the weights and health to be applied",
        || stat(&envoy, &weight) == 4 && stat(&envoy, "eligible_endpoints") == 3,
    );
    // The leader publishes what it applies; every worker takes it on its next tick.
    let polls = stat(&envoy, "admin_polls");
    wait_until(Duration::from_secs(10), "two more ticks", || {
        stat(&envoy, "admin_polls") >= polls + 2
    });
    let held: Vec<_> = (0..6).map(|_| hold_through(envoy.listener)).collect();
    wait_for_active(&backends, 6);
    assert_eq!(active(&backends), vec![1, 1, 4]);
    release(&backends, held);
}

#[test]
fn a_server_with_a_full_batch_is_avoided_even_with_fewer_requests() {
    // A mixed fleet: the first server has 1 batch slot, the others 4.
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    backends[0].set_batch_slots(1);
    backends[1].set_batch_slots(4);
    backends[2].set_batch_slots(4);
    let envoy = replica(ports);
    // Two requests each: the small server now queues one, and its report says so.
    let mut held: Vec<_> = (0..6).map(|_| hold_through(envoy.listener)).collect();
    wait_for_active(&backends, 6);
    assert_eq!(active(&backends), vec![2, 2, 2]);
    let small = format!("endpoint.{}.batch_size", backends[0].id());
    wait_until(
        Duration::from_secs(5),
        "the small server's batch size",
        || stat(&envoy, &small) == 1,
    );
    // Equal counts, unequal servers: the next four go where batch slots are free.
    held.extend((0..4).map(|_| hold_through(envoy.listener)));
    wait_for_active(&backends, 10);
    assert_eq!(active(&backends)[0], 2, "{:?}", active(&backends));
    release(&backends, held);
}
