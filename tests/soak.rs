//! Weeks of uptime, compressed: hundreds of EDS membership changes and a series of listener
//! (LDS) updates under steady traffic, in a real Envoy. Whatever churns, what the filter holds
//! must stay bounded: its shared-data values, its metrics, the VMs' memory; and every count
//! must come back to zero.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const CLUSTER: &str = "model_servers";
const EDS_UPDATES: usize = 300;
const LDS_UPDATES: usize = 12;

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(&format!("model_lb.{CLUSTER}.{name}"))
}

fn filter_stat_count(envoy: &Envoy) -> usize {
    envoy.stats("wasmcustom.model_lb").len()
}

#[test]
fn membership_and_listener_churn_under_traffic_keeps_everything_bounded() {
    let backends: Vec<Backend> = (0..6).map(|_| Backend::start()).collect();
    let ports: Vec<u16> = backends.iter().map(Backend::port).collect();
    let dir = temp_dir("soak");
    let eds_path = dir.join("eds.yaml");
    let lds_path = dir.join("lds.yaml");
    write_eds(&eds_path, &ports[..3]);
    let listener_port = closed_port();
    let plugin = |fallbacks: usize| {
        format!(
            r#"{{"pool": "model_servers", "follow_membership": true, "admin_cluster": "model_lb_admin", "admin_poll_interval_ms": 100, "housekeeping_interval_ms": 100, "vm_lease_ttl_ms": 1000, "fallback_endpoints": {fallbacks}}}"#
        )
    };
    let base = eds_config(&eds_path)
        .plugin_config(&plugin(2))
        .replace("port_value: 0", &format!("port_value: {listener_port}"));
    let (bootstrap, listeners) = base.with_file_lds(&lds_path);
    std::fs::write(&lds_path, &listeners).unwrap();
    let envoy = Envoy::start(&bootstrap);
    let listener = envoy.listener;

    // Steady traffic from two clients for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failed) = (Arc::clone(&stop), Arc::clone(&failed));
            thread::spawn(move || {
                let mut served = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    match request(listener, "/v1/completions", &[("x-test-delay-ms", "5")]) {
                        Ok(r) if r.status == 200 => served += 1,
                        _ => {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                served
            })
        })
        .collect();

    // Warm-up: one round of churn, then the footprint to compare against.
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let churn = |updates: usize, next: &mut dyn FnMut() -> u64, lds_round: &mut usize| {
        for i in 0..updates {
            // A random non-empty subset of the six backends.
            let mask = (next() % 63 + 1) as usize;
            let subset: Vec<u16> = (0..6)
                .filter(|b| mask & (1 << b) != 0)
                .map(|b| ports[b])
                .collect();
            write_eds(&eds_path, &subset);
            if i % (updates / LDS_UPDATES * 2).max(1) == 0 {
                *lds_round += 1;
                let (_, listeners) = eds_config(&eds_path)
                    .plugin_config(&plugin(*lds_round % 3))
                    .replace("port_value: 0", &format!("port_value: {listener_port}"))
                    .with_file_lds(&lds_path);
                let tmp = lds_path.with_extension("tmp");
                std::fs::write(&tmp, listeners).unwrap();
                std::fs::rename(&tmp, &lds_path).unwrap();
            }
            // Faster than the admin poll: the filter sees a change on most polls.
            thread::sleep(Duration::from_millis(25));
        }
    };
    let mut lds_round = 0;
    let started = Instant::now();
    churn(EDS_UPDATES / 3, &mut next, &mut lds_round);
    let warm_memory = stat(&envoy, "vm_memory_bytes");
    let warm_shared = stat(&envoy, "shared_data_bytes");
    churn(EDS_UPDATES * 2 / 3, &mut next, &mut lds_round);
    let churned = started.elapsed();

    // Settle on all six and stop the traffic.
    write_eds(&eds_path, &ports);
    wait_until(Duration::from_secs(10), "the final membership", || {
        stat(&envoy, "endpoints") == 6
    });
    stop.store(true, Ordering::SeqCst);
    let served: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    envoy.wait_for_zero_in_flight(CLUSTER);

    let memory = stat(&envoy, "vm_memory_bytes");
    let shared = stat(&envoy, "shared_data_bytes");
    let metrics = filter_stat_count(&envoy);
    let changes = stat(&envoy, "membership_changes");
    eprintln!(
        "FIGURE soak: {EDS_UPDATES} EDS and {lds_round} LDS updates in {:.1} s under traffic ({served} requests served, {} failed): {changes} membership changes seen; shared data {warm_shared} -> {shared} bytes, VM memory {warm_memory} -> {memory} bytes, {metrics} filter stats",
        churned.as_secs_f64(),
        failed.load(Ordering::SeqCst)
    );
    assert!(
        changes >= 50,
        "the churn barely reached the filter: {changes}"
    );
    assert!(served > 100);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during the churn"
    );
    // Bounded: one table, one membership log of at most 8 entries, one load record.
    assert!(shared < 8 * 1024, "shared data grew to {shared} bytes");
    // Linear memory only grows in 64 KiB pages; a leak over hundreds of changes would show.
    assert!(
        memory <= warm_memory + 4 * 65_536,
        "VM memory grew from {warm_memory} to {memory}"
    );
    // Per-endpoint metrics exist once per address (six), whatever the churn.
    assert!(metrics < 150, "{metrics} filter stats");
    assert_eq!(stat(&envoy, "counter_corrections"), 0);
    assert_eq!(stat(&envoy, "fail_open.bad_shared_state"), 0);
    assert_eq!(stat(&envoy, "fail_open.slots_exhausted"), 0);
}
