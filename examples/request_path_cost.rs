//! The filter's own work per request at scale: route and release through the pure core, against
//! a store that copies values in and out as Envoy's shared data does, with W workers sharing a
//! pool of N endpoints and every worker keeping K requests in flight. Wall time here is as noisy
//! as the machine; run it under callgrind for a count of instructions that is not:
//!
//! ```text
//! cargo build --release --example request_path_cost
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/request_path_cost 1024 16 4 20000
//! ```
//!
//! and divide the total by the requests it prints. This leaves out what Envoy spends on each
//! host call (the copies themselves are in, through `MemoryStore`).

// A measuring tool run by hand: a panic with the reason is the right answer to bad input.
#![allow(clippy::expect_used)]

use model_lb::health::Outcome;
use model_lb::rng::SplitMix64;
use model_lb::select::Strategy;
use model_lb::store::MemoryStore;
use model_lb::tracker::PoolTracker;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("numbers: endpoints workers in-flight requests")
        })
        .collect();
    let [endpoints, workers, in_flight, requests] = args[..] else {
        eprintln!("usage: request_path_cost ENDPOINTS WORKERS IN_FLIGHT_PER_WORKER REQUESTS");
        std::process::exit(2);
    };
    let store = MemoryStore::new();
    let addresses: Vec<String> = (0..endpoints)
        .map(|i| format!("10.{}.{}.{}:8000", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let mut trackers: Vec<PoolTracker> = (0..workers)
        .map(|w| {
            let mut tracker = PoolTracker::new("pool", addresses.clone(), w as u64 + 1, 1_000);
            tracker.install(&store).expect("install");
            tracker
        })
        .collect();
    let mut rng = SplitMix64::new(7);
    let mut held: Vec<std::collections::VecDeque<_>> = vec![Default::default(); workers];
    let start = std::time::Instant::now();
    for i in 0..requests {
        let w = i % workers;
        let routed = trackers[w]
            .route(&store, Strategy::LeastOutstandingRequests, 2, &mut rng)
            .expect("route");
        held[w].push_back(routed.ticket);
        if held[w].len() > in_flight {
            if let Some(ticket) = held[w].pop_front() {
                trackers[w].release(&store, ticket, Outcome::Success);
            }
        }
    }
    let elapsed = start.elapsed();
    println!(
        "{requests} requests routed and released, {endpoints} endpoints, {workers} workers x {in_flight} in flight: \
         {:.2} µs per request (wall time, noisy; count instructions with callgrind)",
        elapsed.as_secs_f64() * 1e6 / requests as f64
    );
}
