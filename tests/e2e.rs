//! The filter inside a real Envoy (`--concurrency 2`, so two worker VMs share the counts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::thread;
use std::time::Duration;

use support::*;

const CLUSTER: &str = "model_servers";

#[test]
fn shipped_envoy_configs_validate() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("envoy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            wasm_path();
            let (ok, output) = validate_file(&path);
            assert!(ok, "{} does not validate:\n{output}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 1, "no Envoy configs found under envoy/");
}

/// The fenced blocks of `markdown` with the given info string, in order.
fn fenced_blocks<'a>(markdown: &'a str, info: &str) -> Vec<&'a str> {
    let opening = format!("```{info}\n");
    let mut blocks = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find(&opening) {
        let body = &rest[start + opening.len()..];
        let end = body
            .find("```")
            .expect("an unterminated code block in README.md");
        blocks.push(&body[..end]);
        rest = &body[end + 3..];
    }
    blocks
}

#[test]
fn every_envoy_config_in_the_readme_validates() {
    const README_WASM: &str = "/etc/envoy/model_lb.wasm";
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    // The install step and the config agree on where the wasm lives.
    assert!(
        fenced_blocks(&readme, "sh")
            .iter()
            .any(|b| b.contains("make build") && b.contains(README_WASM)),
        "README.md no longer says how to build the wasm and where to put it"
    );
    let mut validated = 0;
    for block in fenced_blocks(&readme, "yaml") {
        if block.trim_start().starts_with("apiVersion:") {
            // A Kubernetes manifest: checked against its CRD schema elsewhere.
            continue;
        }
        // A fragment would escape this check, so the README shows complete configs only.
        assert!(
            block.contains("static_resources:"),
            "README.md has a YAML block that is not a complete Envoy config:\n{block}"
        );
        let yaml = block.replace(README_WASM, wasm_path().to_str().unwrap());
        let (ok, output) = validate(&yaml);
        assert!(ok, "README.md config does not validate:\n{block}\n{output}");
        validated += 1;
    }
    assert!(validated >= 1, "no Envoy config found in README.md");
}

#[test]
fn lor_never_sends_short_requests_to_the_endpoint_holding_a_long_one() {
    let pool = Pool::start("LEAST_OUTSTANDING_REQUESTS");
    let held = pool.hold(1);
    let busy = pool.backends.iter().find(|b| b.active() == 1).unwrap().id();
    let mut served: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let r = pool.request(&[]);
        assert_eq!(r.status, 200);
        let by = r.served_by().unwrap().to_owned();
        // The header lists every endpoint, best first: the busy one is last.
        let listed: Vec<&str> = r.header("x-seen-routing").unwrap().split(',').collect();
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert_eq!(
            listed[0], by,
            "Envoy must use the first endpoint of the list"
        );
        assert_eq!(listed[2], busy);
        *served.entry(by).or_default() += 1;
    }
    assert_eq!(
        served.get(&busy),
        None,
        "LOR sent a request to the busy endpoint: {served:?}"
    );
    assert_eq!(served.len(), 2, "idle endpoints share the ties: {served:?}");
    pool.release(held);

    // The stats explain every decision.
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    wait_until(
        Duration::from_secs(10),
        "decision counters to flush",
        || {
            pool.envoy.stat(&format!(
                "model_lb.{CLUSTER}.decisions.least_outstanding_requests"
            )) == 31
        },
    );
    let routed: u64 = pool
        .backends
        .iter()
        .map(|b| {
            pool.envoy
                .stat(&format!("model_lb.{CLUSTER}.endpoint.{}.routed", b.id()))
        })
        .sum();
    assert_eq!(routed, 31);
}

#[test]
fn lor_spreads_concurrent_long_requests_exactly_evenly() {
    const PER_ENDPOINT: usize = 4;
    let pool = Pool::start("LEAST_OUTSTANDING_REQUESTS");
    let held = pool.hold(3 * PER_ENDPOINT);
    assert_eq!(pool.active_per_backend(), vec![PER_ENDPOINT; 3]);
    wait_until(
        Duration::from_secs(10),
        "in-flight gauges to show the spread",
        || {
            let (per_endpoint, total) = pool.envoy.in_flight(CLUSTER);
            total == (3 * PER_ENDPOINT) as u64
                && pool
                    .backends
                    .iter()
                    .all(|b| per_endpoint.get(&b.id()) == Some(&(PER_ENDPOINT as u64)))
        },
    );
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
}

#[test]
fn random_spreads_sequential_requests_over_all_endpoints_and_ignores_load() {
    let pool = Pool::start("RANDOM");
    let held = pool.hold(2);
    let mut served: HashMap<String, usize> = HashMap::new();
    for _ in 0..90 {
        let r = pool.request(&[]);
        assert_eq!(r.status, 200);
        *served.entry(r.served_by().unwrap().to_owned()).or_default() += 1;
    }
    // Binomial(90, 1/3) stays above 12 with probability > 0.9999 for each endpoint.
    for b in &pool.backends {
        let n = served.get(&b.id()).copied().unwrap_or(0);
        assert!(n >= 12, "{} served {n} of 90: {served:?}", b.id());
    }
    pool.release(held);
    wait_until(Duration::from_secs(10), "random decisions to flush", || {
        pool.envoy
            .stat(&format!("model_lb.{CLUSTER}.decisions.random"))
            == 92
    });
}

#[test]
fn counts_return_to_zero_after_aborts_resets_timeouts_and_refused_connections() {
    // A route timeout long enough for the balance check below, short enough to wait for.
    // Passive health is off: this test is about counting, and the resets and timeouts below
    // would otherwise (rightly) eject an endpoint; tests/faults.rs covers that.
    let mut pool = Pool::start_configured(
        "LEAST_OUTSTANDING_REQUESTS",
        r#""passive_health": false"#,
        |config| config.replace("timeout: 0s", "timeout: 2s"),
    );
    let listener = pool.envoy.listener;

    // Client aborts while the backend holds the request.
    let before = pool.total_active();
    let aborted: Vec<_> = (0..12)
        .map(|_| send(listener, "/v1/completions", &[HOLD]).unwrap())
        .collect();
    wait_until(
        Duration::from_secs(10),
        "aborted requests to reach backends",
        || pool.total_active() == before + 12,
    );
    drop(aborted);

    // Upstream resets, route timeouts (a local 504 reply) and plain successes, concurrently.
    let workers: Vec<_> = (0..12)
        .map(|i| {
            thread::spawn(move || {
                let headers = reset_hold_or_short(i);
                request(listener, "/v1/completions", headers)
                    .unwrap()
                    .status
            })
        })
        .collect();
    let mut statuses: Vec<u16> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [vec![200; 4], vec![503; 4], vec![504; 4]].concat()
    );
    pool.envoy.wait_for_zero_in_flight(CLUSTER);

    // LOR balances exactly again: nothing leaked onto any endpoint.
    let held = pool.hold(6);
    assert_eq!(pool.active_per_backend(), vec![2, 2, 2]);
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);

    // One backend dies: requests picked for it are refused and retried on the next endpoint
    // of the list, so every request still succeeds and nothing stays counted.
    let dead = pool.backends.pop().unwrap().id();
    let mut served: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let r = pool.request(&[]);
        assert_eq!(r.status, 200, "{}", r.text());
        *served.entry(r.served_by().unwrap().to_owned()).or_default() += 1;
    }
    assert!(!served.contains_key(&dead));
    let refused = pool
        .envoy
        .stats("cluster.model_servers.upstream_cx_connect_fail")
        ["cluster.model_servers.upstream_cx_connect_fail"];
    let retried = pool
        .envoy
        .stats("cluster.model_servers.upstream_rq_retry_success")
        ["cluster.model_servers.upstream_rq_retry_success"];
    assert!(
        refused > 0 && retried > 0,
        "the dead endpoint was never tried: {refused} {retried}"
    );
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    let corrections = pool
        .envoy
        .stat(&format!("model_lb.{CLUSTER}.counter_corrections"));
    assert_eq!(corrections, 0, "no decrement ever found a zero count");
}

#[test]
fn a_client_supplied_routing_header_cannot_steer_traffic() {
    let pool = Pool::start("LEAST_OUTSTANDING_REQUESTS");
    // Make one backend busy so LOR avoids it, then ask for exactly that backend.
    let held = pool.hold(1);
    let busy = pool.backends.iter().find(|b| b.active() == 1).unwrap().id();
    let outsider = "127.0.0.1:1";
    let spoof = format!("{busy},{busy}");
    for _ in 0..20 {
        let r = pool.request(&[(ROUTING_HEADER, &spoof), (ROUTING_HEADER, outsider)]);
        assert_eq!(r.status, 200);
        assert_ne!(
            r.served_by(),
            Some(busy.as_str()),
            "a spoofed header steered traffic"
        );
        let seen = r.header("x-seen-routing").unwrap();
        assert!(
            !seen.contains(outsider),
            "client value reached the LB: {seen}"
        );
        assert_eq!(
            seen.split(',').count(),
            3,
            "exactly the filter's list: {seen}"
        );
    }
    pool.release(held);
}

#[test]
fn bad_plugin_configs_are_refused_at_load_with_the_reason_in_the_log() {
    let ports = [8001, 8002, 8003];
    let cases = [
        (
            r#"{"endpoints": ["127.0.0.1:8001"], "routing_strategy": "ROUND_ROBIN"}"#,
            r#"field "routing_strategy": unknown strategy "ROUND_ROBIN""#,
        ),
        (r#"{"endpoints": []}"#, r#"field "endpoints": is empty"#),
        (
            r#"{"endpoints": ["127.0.0.1:8001", "127.0.0.1:8001"]}"#,
            r#"field "endpoints[1]""#,
        ),
        (
            r#"{"endpoints": ["backend-1:8001"]}"#,
            r#"field "endpoints[0]": "backend-1:8001" is not an "ip:port" address"#,
        ),
        (
            r#"{"endpoints": ["127.0.0.1:8001"], "endpont_header": "x"}"#,
            r#"field "endpont_header": unknown field"#,
        ),
        (
            r#"{"endpoints": ["127.0.0.1:8001"], "fallback_endpoints": "2"}"#,
            r#"field "fallback_endpoints": expected an integer"#,
        ),
        (r#"not json"#, "configuration is not valid JSON"),
        (
            r#"{"routing_strategy": "RANDOM"}"#,
            r#"field "endpoints": required"#,
        ),
    ];
    for (json, reason) in cases {
        let config = EnvoyConfig::shipped().backends(ports).plugin_config(json);
        let (ok, log) = validate(config.yaml());
        assert!(!ok, "Envoy accepted {json}");
        assert!(
            log.contains("model-lb: rejecting plugin configuration") && log.contains(reason),
            "log for {json} does not say {reason:?}:\n{log}"
        );
    }
    // Not only validation: a real Envoy refuses to start with a bad config.
    let config = EnvoyConfig::shipped()
        .backends(ports)
        .plugin_config(r#"{"endpoints": ["127.0.0.1:8001"], "routing_strategy": "lor"}"#);
    let log = Envoy::try_start(&config)
        .err()
        .expect("Envoy started with a bad config");
    assert!(log.contains(r#"unknown strategy "lor""#), "{log}");
}

#[test]
fn endpoints_that_are_not_the_clusters_hosts_are_detected_and_reported() {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    // The cluster has the real backends; the filter lists three other addresses.
    let wrong = [closed_port(), closed_port(), closed_port()];
    let stat = |envoy: &Envoy, name: &str| envoy.stat(&format!("model_lb.{CLUSTER}.{name}"));

    // Without the admin API: only the requests themselves show the mismatch.
    let envoy = Envoy::start(
        &EnvoyConfig::shipped()
            .backends(ports)
            .plugin_config(&plugin_json("LEAST_OUTSTANDING_REQUESTS", wrong)),
    );
    const REQUESTS: u64 = 40;
    for _ in 0..REQUESTS {
        let r = request(envoy.listener, "/v1/completions", &[]).unwrap();
        assert_eq!(r.status, 200, "Envoy's fallback policy still serves it");
    }
    wait_until(
        Duration::from_secs(10),
        "unhonoured decisions to be counted",
        || stat(&envoy, "unhonoured_decisions") == REQUESTS,
    );
    let warnings = envoy
        .log()
        .matches("served by a host the filter did not list")
        .count() as u64;
    assert!(
        (1..REQUESTS / 2).contains(&warnings),
        "expected one warning per tick, not per request: {warnings}"
    );
    drop(envoy);

    // With the admin API: the poll sees the cluster's hosts and names the strangers.
    let envoy = Envoy::start(&EnvoyConfig::shipped().backends(ports).plugin_config(
        &plugin_json_with(
            "LEAST_OUTSTANDING_REQUESTS",
            wrong,
            r#""admin_cluster": "model_lb_admin", "admin_poll_interval_ms": 200"#,
        ),
    ));
    wait_until(
        Duration::from_secs(10),
        "the admin poll to spot the mismatch",
        || stat(&envoy, "endpoints_not_in_cluster") == 3,
    );
    let log = envoy.log();
    assert!(
        log.contains(
            r#"endpoints are not a host of the Envoy cluster "model_servers" and never routed to"#
        ) && log.contains(&format!("127.0.0.1:{}", wrong[0])),
        "{log}"
    );
    // Nothing is routable, so the filter steps aside instead of naming hosts Envoy lacks.
    let r = request(envoy.listener, "/v1/completions", &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-seen-routing"), Some(""));
}

#[test]
fn a_server_that_was_honoured_counts_no_unhonoured_decision() {
    let pool = Pool::start("LEAST_OUTSTANDING_REQUESTS");
    for _ in 0..10 {
        assert_eq!(pool.request(&[]).status, 200);
    }
    wait_until(Duration::from_secs(10), "decisions to flush", || {
        pool.envoy.stat(&format!(
            "model_lb.{CLUSTER}.decisions.least_outstanding_requests"
        )) == 10
    });
    assert_eq!(
        pool.envoy
            .stat(&format!("model_lb.{CLUSTER}.unhonoured_decisions")),
        0
    );
}

#[test]
fn with_release_batching_every_count_still_returns_to_zero() {
    let pool = Pool::start_configured(
        "LEAST_OUTSTANDING_REQUESTS",
        r#""release_batching_ms": 10, "passive_health": false"#,
        |config| config.replace("timeout: 0s", "timeout: 2s"),
    );
    let listener = pool.envoy.listener;
    // Aborts, resets, timeouts and successes, from many connections (so both workers).
    let aborted: Vec<_> = (0..12)
        .map(|_| send(listener, "/v1/completions", &[HOLD]).unwrap())
        .collect();
    wait_until(Duration::from_secs(10), "held requests to arrive", || {
        pool.total_active() == 12
    });
    drop(aborted);
    let workers: Vec<_> = (0..30)
        .map(|i| {
            thread::spawn(move || {
                request(listener, "/v1/completions", reset_hold_or_short(i))
                    .unwrap()
                    .status
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    // Exact again once every folded release is written: long requests spread evenly.
    let held = pool.hold(6);
    assert_eq!(pool.active_per_backend(), vec![2, 2, 2]);
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_eq!(
        pool.envoy
            .stat(&format!("model_lb.{CLUSTER}.counter_corrections")),
        0
    );
}
