//! Fault injection against a real Envoy (`--concurrency 2`): every scenario ends with every
//! in-flight gauge at exactly 0 and every request answered (2xx, or an error status whose cause
//! the scenario created). Figures a scenario measures are printed (`cargo test -- --nocapture`)
//! and quoted in README.md's "Failure behaviour".
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const CLUSTER: &str = "model_servers";
/// Fast health signals so scenarios take seconds: Envoy checks every 250 ms, the filter polls
/// the admin API every 200 ms, and passive ejections start at 1 s.
const FAST_HEALTH: &str = r#""admin_cluster": "model_lb_admin", "admin_poll_interval_ms": 200, "ejection_base_ms": 1000, "ejection_max_ms": 4000"#;

fn fast_health_checks(config: EnvoyConfig) -> EnvoyConfig {
    config.replace("interval: 5s", "interval: 0.25s")
}

fn stat(pool: &Pool, name: &str) -> u64 {
    pool.envoy.stat(&format!("model_lb.{CLUSTER}.{name}"))
}

fn envoy_stat(pool: &Pool, name: &str) -> u64 {
    pool.envoy.stats(name).get(name).copied().unwrap_or(0)
}

fn eligible(pool: &Pool, backend: &str) -> u64 {
    stat(pool, &format!("endpoint.{backend}.eligible"))
}

/// Counts the filter must never need.
fn assert_no_corrections(pool: &Pool) {
    assert_eq!(
        stat(pool, "counter_corrections"),
        0,
        "a decrement found a zero count"
    );
    assert_eq!(stat(pool, "fail_open.contention"), 0);
    assert_eq!(stat(pool, "fail_open.host_error"), 0);
    assert_eq!(stat(pool, "fail_open.bad_shared_state"), 0);
}

fn served_by(responses: &[Response]) -> HashMap<String, usize> {
    let mut served = HashMap::new();
    for r in responses {
        *served
            .entry(r.served_by().unwrap_or("none").to_owned())
            .or_default() += 1;
    }
    served
}

#[test]
fn hundreds_of_client_aborts_mid_request_and_mid_stream_leave_nothing_counted() {
    const WAVES: usize = 6;
    const PER_WAVE: usize = 50;
    let pool = Pool::start("LEAST_OUTSTANDING_REQUESTS");
    let listener = pool.envoy.listener;
    let started = Instant::now();
    for wave in 0..WAVES {
        // The backends notice the previous wave's hang-ups within milliseconds.
        wait_until(Duration::from_secs(10), "the previous wave to end", || {
            pool.total_active() == 0
        });
        if wave % 2 == 0 {
            // Mid-request: the backend holds them; the clients hang up.
            let before = pool.total_active();
            let conns: Vec<_> = (0..PER_WAVE)
                .map(|_| send(listener, "/v1/completions", &[HOLD]).unwrap())
                .collect();
            wait_until(
                Duration::from_secs(20),
                "held requests to reach backends",
                || pool.total_active() == before + PER_WAVE,
            );
            drop(conns);
        } else {
            // Mid-stream: read the response head and the first SSE chunk, then hang up.
            let readers: Vec<_> = (0..PER_WAVE)
                .map(|_| {
                    thread::spawn(move || {
                        let conn = send(
                            listener,
                            "/v1/chat/completions",
                            &[("x-test-stream-chunks", "500")],
                        )
                        .unwrap();
                        let mut reader = BufReader::new(conn);
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        assert!(line.contains(" 200 "), "{line}");
                        while line != "\r\n" {
                            line.clear();
                            reader.read_line(&mut line).unwrap();
                        }
                        let mut first = [0u8; 8];
                        reader.read_exact(&mut first).unwrap();
                    })
                })
                .collect();
            for r in readers {
                r.join().unwrap();
            }
        }
    }
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    let settled = started.elapsed();
    wait_until(
        Duration::from_secs(10),
        "backends to see every hang-up",
        || pool.total_active() == 0,
    );
    assert_no_corrections(&pool);
    wait_until(Duration::from_secs(10), "decisions to flush", || {
        stat(&pool, "decisions.least_outstanding_requests") == (WAVES * PER_WAVE) as u64
    });
    // Balance is exact again afterwards.
    let held = pool.hold(6);
    assert_eq!(pool.active_per_backend(), vec![2, 2, 2]);
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    eprintln!(
        "FIGURE aborts: {} aborted requests ({} mid-request, {} mid-stream); every gauge back at 0 within {:.1} s of the first abort",
        WAVES * PER_WAVE,
        WAVES / 2 * PER_WAVE,
        WAVES / 2 * PER_WAVE,
        settled.as_secs_f64()
    );
}

#[test]
fn a_killed_backend_is_avoided_and_used_again_once_it_recovers() {
    let mut pool = Pool::start_configured(
        "LEAST_OUTSTANDING_REQUESTS",
        FAST_HEALTH,
        fast_health_checks,
    );
    let victim = pool.backends[2].id();
    let victim_port = pool.backends[2].port();
    wait_until(
        Duration::from_secs(10),
        "admin polling to mark every endpoint eligible",
        // Envoy reports hosts unhealthy until their first health check passes (250 ms here).
        || stat(&pool, "admin_polls") >= 3 && stat(&pool, "eligible_endpoints") == 3,
    );

    // Three requests in flight on every backend, then the victim dies holding its three.
    let listener = pool.envoy.listener;
    let held = pool.hold(9);
    assert_eq!(pool.active_per_backend(), vec![3, 3, 3]);
    let killed_at = Instant::now();
    drop(pool.backends.pop());
    wait_until(
        Duration::from_secs(10),
        "the dead endpoint to be excluded",
        || eligible(&pool, &victim) == 0,
    );
    let detected = killed_at.elapsed();

    // After detection nothing at all is sent to it: not as first choice, not as a fallback.
    let attempts_before = envoy_stat(&pool, "cluster.model_servers.upstream_cx_connect_fail");
    let responses: Vec<Response> = (0..30).map(|_| pool.request(&[])).collect();
    assert!(responses.iter().all(|r| r.status == 200));
    assert!(!served_by(&responses).contains_key(&victim));
    assert_eq!(
        envoy_stat(&pool, "cluster.model_servers.upstream_cx_connect_fail"),
        attempts_before
    );

    // It comes back on the same port and gets traffic again.
    let restarted_at = Instant::now();
    let revived = Backend::start_on(victim_port);
    wait_until(
        Duration::from_secs(15),
        "the endpoint to be eligible again",
        || eligible(&pool, &victim) == 1,
    );
    let recovered = restarted_at.elapsed();
    let mut reached = false;
    for _ in 0..30 {
        reached |= pool.request(&[]).served_by() == Some(victim.as_str());
        if reached {
            break;
        }
    }
    assert!(reached, "the recovered endpoint got no traffic");

    // Every held request got an answer: 200, or 503 for the three the dead backend held.
    for b in &pool.backends {
        b.release_held();
    }
    let mut statuses: Vec<u16> = held.into_iter().map(|h| h.join().unwrap().status).collect();
    statuses.sort();
    assert_eq!(statuses, [vec![200; 6], vec![503; 3]].concat());
    let _ = listener;
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
    drop(revived);
    eprintln!(
        "FIGURE kill: dead endpoint excluded {:.2} s after the kill (passive ejection from the reset requests, or Envoy's health check via the admin poll); back in rotation {:.2} s after restart",
        detected.as_secs_f64(),
        recovered.as_secs_f64()
    );
}

/// Closed loop of `clients` threads for `duration`; returns every response.
fn closed_loop(
    pool: &Pool,
    clients: usize,
    duration: Duration,
    headers: &'static [(&'static str, &'static str)],
) -> Vec<Response> {
    let listener = pool.envoy.listener;
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            thread::spawn(move || {
                let mut out = Vec::new();
                while Instant::now() < deadline {
                    out.push(request(listener, "/v1/completions", headers).unwrap());
                }
                out
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect()
}

fn fast_failing_share(passive_health: bool) -> (f64, usize) {
    let extra = if passive_health {
        r#""ejection_base_ms": 1000, "ejection_max_ms": 4000"#
    } else {
        r#""passive_health": false"#
    };
    let pool = Pool::start_configured("LEAST_OUTSTANDING_REQUESTS", extra, |c| c);
    let bad = pool.backends[0].id();
    pool.backends[0].fail_fast();
    // Healthy backends take 100 ms per request; the bad one answers 503 at once.
    let responses = closed_loop(
        &pool,
        6,
        Duration::from_secs(3),
        &[("x-test-delay-ms", "100")],
    );
    let served = served_by(&responses);
    let to_bad = served.get(&bad).copied().unwrap_or(0);
    for r in &responses {
        let from_bad = r.served_by() == Some(bad.as_str());
        assert_eq!(
            r.status,
            if from_bad { 503 } else { 200 },
            "unexpected answer {r:?}"
        );
    }
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
    (to_bad as f64 / responses.len() as f64, responses.len())
}

#[test]
fn a_backend_that_fails_instantly_does_not_attract_traffic() {
    let (trapped, n_trapped) = fast_failing_share(false);
    let (protected, n_protected) = fast_failing_share(true);
    eprintln!(
        "FIGURE fast-503: share of requests sent to the instant-503 backend: {:.1} % of {n_trapped} without passive health, {:.1} % of {n_protected} with it",
        100.0 * trapped,
        100.0 * protected
    );
    // The trap is real without passive health...
    assert!(
        trapped > 0.5,
        "expected the fast-failing backend to attract traffic, got {trapped}"
    );
    // ...and passive ejection defuses it.
    assert!(
        protected < 0.1,
        "fast-failing backend still got {:.1} %",
        100.0 * protected
    );
}

/// One of the hostile requests a client may send; `i` cycles through the kinds.
fn hostile_request(listener: std::net::SocketAddr, i: usize) -> Option<u16> {
    let post = |body_len: usize, extra_header: &str| {
        let mut bytes = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: models\r\ncontent-type: application/json\r\n{extra_header}content-length: {body_len}\r\nconnection: close\r\n\r\n"
        )
        .into_bytes();
        bytes.resize(bytes.len() + body_len, b'x');
        bytes
    };
    match i % 5 {
        // A 5 MB body: the backend answers 413 and closes, which Envoy sees as a reset.
        0 => raw_exchange(listener, &post(5 << 20, ""))
            .ok()
            .map(|r| r.status),
        // Just over the backend's limit.
        1 => raw_exchange(listener, &post(BACKEND_MAX_BODY + 4096, ""))
            .ok()
            .map(|r| r.status),
        // An upload abandoned half-way.
        2 => {
            let _ = abandoned_upload(listener, 5 << 20, 256 << 10);
            None
        }
        // Not HTTP: Envoy answers 400 itself.
        3 => raw_exchange(
            listener,
            b"POST /v1/completions HTTP/1.1\r\nhost: models\r\nthis is not a header\r\n\r\n",
        )
        .ok()
        .map(|r| r.status),
        // A 100 KB header: Envoy answers 431 itself.
        _ => raw_exchange(
            listener,
            &post(2, &format!("x-junk: {}\r\n", "j".repeat(100 << 10))),
        )
        .ok()
        .map(|r| r.status),
    }
}

#[test]
fn oversized_and_malformed_requests_never_eject_a_healthy_backend() {
    const HOSTILE: usize = 100;
    let pool = Pool::start_configured(
        "LEAST_OUTSTANDING_REQUESTS",
        FAST_HEALTH,
        fast_health_checks,
    );
    let listener = pool.envoy.listener;
    // Until then the filter fails open, and a request it did not route teaches it nothing.
    wait_until(
        Duration::from_secs(10),
        "admin polling to mark every endpoint eligible",
        || stat(&pool, "admin_polls") >= 3 && stat(&pool, "eligible_endpoints") == 3,
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Ordinary traffic throughout, from two clients.
    let normal: Vec<_> = (0..2)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            thread::spawn(move || {
                let mut responses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    responses.push(
                        request(listener, "/v1/completions", &[("x-test-delay-ms", "20")]).unwrap(),
                    );
                }
                responses
            })
        })
        .collect();
    let attackers: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                (t..HOSTILE)
                    .step_by(4)
                    .filter_map(|i| hostile_request(listener, i))
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let mut statuses: Vec<u16> = attackers
        .into_iter()
        .flat_map(|a| a.join().unwrap())
        .collect();
    // Two more stat flushes with traffic flowing, so any ejection the attack caused shows.
    for _ in 0..2 {
        let decided = stat(&pool, "decisions.least_outstanding_requests");
        wait_until(Duration::from_secs(10), "a stat flush", || {
            stat(&pool, "decisions.least_outstanding_requests") > decided
        });
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let responses: Vec<Response> = normal.into_iter().flat_map(|n| n.join().unwrap()).collect();
    // Each 503 an attacker saw is an upstream reset that passive health would have counted;
    // how many of the 5 MB uploads end as a 503 rather than a clean 413 is a race between
    // Envoy still sending and the backend closing, so the count varies from run to run.
    let resets_seen = statuses.iter().filter(|&&s| s == 503).count() as u64;
    statuses.sort();
    statuses.dedup();
    // Each worker's VM flushes its own counts on its own tick.
    wait_until(Duration::from_secs(10), "every reset to be judged", || {
        stat(&pool, "excused_failures") >= resets_seen
    });
    let excused = stat(&pool, "excused_failures");
    eprintln!(
        "FIGURE hostile: {HOSTILE} hostile requests (statuses {statuses:?}, {resets_seen} of them 503) during {} ordinary ones: {} ejections, {excused} failures excused",
        responses.len(),
        stat(&pool, "ejections"),
    );
    // The attack reached the backends, and every failure it caused was recognised as the
    // client's doing (abandoned uploads add excused failures that no client sees)...
    assert!(
        resets_seen >= 5,
        "the attack caused too few upstream resets to prove anything: {statuses:?}"
    );
    assert!(
        excused >= resets_seen,
        "{excused} excused, but clients saw {resets_seen} resets"
    );
    // ...and changed nothing: no ejection, every backend eligible, ordinary traffic unharmed
    // and still spread over all three.
    assert_eq!(stat(&pool, "ejections"), 0);
    assert_eq!(stat(&pool, "eligible_endpoints"), 3);
    assert!(responses.iter().all(|r| r.status == 200));
    let served = served_by(&responses);
    for b in &pool.backends {
        let n = served.get(&b.id()).copied().unwrap_or(0);
        assert!(
            n * 5 >= responses.len(),
            "{} served only {n} of {}: {served:?}",
            b.id(),
            responses.len()
        );
    }
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
}

#[test]
fn when_every_server_fails_the_ejection_cap_keeps_traffic_flowing_to_them() {
    // 34 % of 3 endpoints: one may be ejected at a time.
    let pool = Pool::start_configured(
        "LEAST_OUTSTANDING_REQUESTS",
        r#""max_ejection_percent": 34, "ejection_base_ms": 1000, "ejection_max_ms": 1000"#,
        |c| c,
    );
    for b in &pool.backends {
        b.fail_fast();
    }
    let responses = closed_loop(&pool, 6, Duration::from_secs(3), &[]);
    assert!(responses.iter().all(|r| r.status == 503));
    // The second half of the run: the cap was reached long before, and still every server
    // took its share (the ejected one comes back when its ejection ends).
    let served = served_by(&responses[responses.len() / 2..]);
    eprintln!(
        "FIGURE cap: every server instant-503, max_ejection_percent 34: {} ejections, {} capped, second-half shares {served:?}",
        stat(&pool, "ejections"),
        stat(&pool, "ejections_capped")
    );
    for b in &pool.backends {
        assert!(
            served.get(&b.id()).copied().unwrap_or(0) > 0,
            "{} got nothing: {served:?}",
            b.id()
        );
    }
    assert!(stat(&pool, "ejections_capped") > 0);
    assert!(stat(&pool, "eligible_endpoints") >= 2);
    assert_eq!(stat(&pool, "fail_open.no_eligible_endpoint"), 0);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
}

#[test]
fn route_timeouts_and_upstream_resets_under_load_leave_nothing_counted() {
    let pool = Pool::start_configured(
        "LEAST_OUTSTANDING_REQUESTS",
        r#""ejection_base_ms": 1000"#,
        |c| c.replace("timeout: 0s", "timeout: 1s"),
    );
    let listener = pool.envoy.listener;
    let workers: Vec<_> = (0..60)
        .map(|i| {
            thread::spawn(move || {
                let headers = reset_hold_or_short(i);
                (
                    i % 3,
                    request(listener, "/v1/completions", headers)
                        .unwrap()
                        .status,
                )
            })
        })
        .collect();
    let mut by_kind: HashMap<usize, Vec<u16>> = HashMap::new();
    for w in workers {
        let (kind, status) = w.join().unwrap();
        by_kind.entry(kind).or_default().push(status);
    }
    assert!(
        by_kind[&0].iter().all(|&s| s == 503),
        "resets: {:?}",
        by_kind[&0]
    );
    assert!(
        by_kind[&1].iter().all(|&s| s == 504),
        "timeouts: {:?}",
        by_kind[&1]
    );
    assert!(
        by_kind[&2].iter().all(|&s| s == 200),
        "plain: {:?}",
        by_kind[&2]
    );
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
    wait_until(Duration::from_secs(5), "ejections to be counted", || {
        stat(&pool, "ejections") > 0
    });
}

#[test]
fn requests_to_a_refusing_endpoint_succeed_through_the_fallback_list() {
    for passive in [false, true] {
        let extra = format!(r#""passive_health": {passive}"#);
        let mut pool = Pool::start_configured("LEAST_OUTSTANDING_REQUESTS", &extra, |c| c);
        let dead = pool.backends.pop().unwrap().id();
        let responses: Vec<Response> = (0..60).map(|_| pool.request(&[])).collect();
        assert!(
            responses.iter().all(|r| r.status == 200),
            "a request failed despite the fallback list"
        );
        assert!(!served_by(&responses).contains_key(&dead));
        let refused = envoy_stat(&pool, "cluster.model_servers.upstream_cx_connect_fail");
        let retried = envoy_stat(&pool, "cluster.model_servers.upstream_rq_retry_success");
        assert!(
            refused > 0 && retried > 0,
            "the dead endpoint was never tried"
        );
        if passive {
            // Ejected after three refusals: the next 60 requests do not even try it.
            wait_until(Duration::from_secs(5), "the ejection to be counted", || {
                stat(&pool, "ejections") >= 1
            });
            let more: Vec<Response> = (0..60).map(|_| pool.request(&[])).collect();
            assert!(more.iter().all(|r| r.status == 200));
            assert_eq!(
                envoy_stat(&pool, "cluster.model_servers.upstream_cx_connect_fail"),
                refused
            );
            eprintln!("FIGURE refused: with passive health the refusing endpoint was tried {refused} times, then ejected; 120/120 requests succeeded");
        } else {
            eprintln!("FIGURE refused: without passive health {refused} of 60 requests were refused first and retried; 60/60 succeeded");
        }
        pool.envoy.wait_for_zero_in_flight(CLUSTER);
        assert_no_corrections(&pool);
    }
}

#[test]
fn config_changes_while_requests_are_in_flight_leave_counts_at_zero() {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    let dir = temp_dir("lds");
    let lds_path = dir.join("lds.yaml");
    let with_plugin = |json: &str| EnvoyConfig::shipped().backends(ports).plugin_config(json);
    let full = plugin_json("LEAST_OUTSTANDING_REQUESTS", ports);
    let (bootstrap, lds) = with_plugin(&full).with_file_lds(&lds_path);
    std::fs::write(&lds_path, lds).unwrap();
    let envoy = Envoy::start(&bootstrap);
    let pool = Pool { backends, envoy };
    let update = |json: &str, generation: u64| {
        let (_, lds) = with_plugin(json).with_file_lds(&lds_path);
        let tmp = dir.join("lds.yaml.tmp");
        std::fs::write(&tmp, lds).unwrap();
        std::fs::rename(&tmp, &lds_path).unwrap();
        wait_until(
            Duration::from_secs(10),
            "Envoy to apply the listener update",
            || envoy_stat(&pool, "listener_manager.lds.update_success") >= generation,
        );
    };

    let held = pool.hold(6);
    assert_eq!(pool.active_per_backend(), vec![2, 2, 2]);
    // New config mid-flight: the third endpoint is no longer listed.
    let two = format!(
        r#"{{"pool": "model_servers", "endpoints": ["127.0.0.1:{}", "127.0.0.1:{}"], "housekeeping_interval_ms": 200}}"#,
        ports[1], ports[0]
    );
    update(&two, 2);
    let removed = pool.backends[2].id();
    let responses: Vec<Response> = (0..20).map(|_| pool.request(&[])).collect();
    assert!(responses.iter().all(|r| r.status == 200));
    assert!(
        !served_by(&responses).contains_key(&removed),
        "{:?}",
        served_by(&responses)
    );
    // The requests admitted under the old config finish now, each on the count it took.
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
    assert_eq!(stat(&pool, "dropped_releases"), 0);

    // And back: the pool grows again and balances exactly.
    update(&full, 3);
    let held = pool.hold(6);
    assert_eq!(pool.active_per_backend(), vec![2, 2, 2]);
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_configs_are_rejected_with_a_short_clear_log_line() {
    let ports = [8001, 8002, 8003];
    let many: Vec<String> = (0..2000)
        .map(|i| format!("\"10.{}.{}.1:80\"", i / 250, i % 250))
        .collect();
    let long = "x".repeat(200_000);
    let cases = [
        (
            format!(r#"{{"endpoints": [{}]}}"#, many.join(",")),
            r#"field "endpoints": has 2000 entries; at most 1024"#,
        ),
        (
            r#"{"endpoints": ["256.1.1.1:80"]}"#.to_owned(),
            r#"field "endpoints[0]""#,
        ),
        (
            r#"{"endpoints": ["1.1.1.1:99999"]}"#.to_owned(),
            r#"field "endpoints[0]""#,
        ),
        (
            r#"{"endpoints": ["[::1]"]}"#.to_owned(),
            r#"field "endpoints[0]""#,
        ),
        (
            r#"{"endpoints": [{"ip": "1.1.1.1", "port": 80}]}"#.to_owned(),
            r#"field "endpoints[0]": expected a string, got an object"#,
        ),
        (
            r#"{"endpoints": ["1.1.1.1:80"], "fallback_endpoints": true}"#.to_owned(),
            r#"field "fallback_endpoints": expected an integer"#,
        ),
        (
            r#"[]"#.to_owned(),
            "configuration must be a JSON object, got an array",
        ),
        (
            r#""endpoints""#.to_owned(),
            "configuration must be a JSON object, got a string",
        ),
        (
            format!(r#"{{"endpoints": ["{long}"]}}"#),
            r#"field "endpoints[0]""#,
        ),
        (
            format!(r#"{{"endpoints": ["1.1.1.1:80"], "{long}": 1}}"#),
            "unknown field",
        ),
    ];
    for (json, reason) in &cases {
        let config = EnvoyConfig::shipped().backends(ports).plugin_config(json);
        let (ok, log) = validate(config.yaml());
        assert!(
            !ok,
            "Envoy accepted a hostile config ({} bytes)",
            json.len()
        );
        let line = log
            .lines()
            .find(|l| l.contains("model-lb: rejecting plugin configuration"))
            .unwrap_or_else(|| {
                panic!(
                    "no rejection line for {reason}:\n{}",
                    &log[..log.len().min(2000)]
                )
            });
        assert!(line.contains(reason), "{line}");
        assert!(line.len() < 600, "log line of {} bytes", line.len());
    }
}

#[test]
fn absurd_and_repeated_routing_headers_are_neutralised() {
    let pool = Pool::start("LEAST_OUTSTANDING_REQUESTS");
    let held = pool.hold(1);
    let busy = pool.backends.iter().find(|b| b.active() == 1).unwrap().id();
    // 19 KB of spoofed endpoints, and 50 repeated copies (Envoy allows 100 headers in all).
    let huge = vec![busy.as_str(); 1200].join(",");
    let copies: Vec<(&str, &str)> = (0..50).map(|_| (ROUTING_HEADER, busy.as_str())).collect();
    for headers in [vec![(ROUTING_HEADER, huge.as_str())], copies] {
        let r = pool.request(&headers);
        assert_eq!(r.status, 200);
        assert_ne!(r.served_by(), Some(busy.as_str()));
        assert_eq!(r.header("x-seen-routing").unwrap().split(',').count(), 3);
    }
    // Past Envoy's own limit the request never reaches the filter; Envoy refuses it and lives.
    let too_big = "a".repeat(100_000);
    let r = pool.request(&[(ROUTING_HEADER, too_big.as_str())]);
    assert_eq!(r.status, 431);
    assert_eq!(pool.request(&[]).status, 200);
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
}

/// `model_servers` as an EDS cluster fed from a file, with the filter following its membership
/// through the admin API.
#[test]
fn a_followed_cluster_membership_adds_and_removes_endpoints_live() {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports: Vec<u16> = backends.iter().map(Backend::port).collect();
    let dir = temp_dir("eds");
    let eds_path = dir.join("eds.yaml");
    write_eds(&eds_path, &ports[..2]);
    let envoy = Envoy::start(&eds_config(&eds_path));
    let pool = Pool { backends, envoy };
    let endpoints_known = |n: u64| {
        wait_until(
            Duration::from_secs(10),
            "the filter to follow the cluster",
            || stat(&pool, "endpoints") == n && stat(&pool, "eligible_endpoints") == n,
        )
    };
    endpoints_known(2);
    let responses: Vec<Response> = (0..20).map(|_| pool.request(&[])).collect();
    assert!(responses.iter().all(|r| r.status == 200));
    assert_eq!(served_by(&responses).len(), 2);
    let mut held = pool.hold(4);
    assert_eq!(pool.active_per_backend(), vec![2, 2, 0]);

    // A third endpoint appears: LOR fills it first.
    let joined_at = Instant::now();
    write_eds(&eds_path, &ports);
    endpoints_known(3);
    let joined = joined_at.elapsed();
    held.extend(pool.hold(2));
    assert_eq!(pool.active_per_backend(), vec![2, 2, 2]);

    // The first one leaves while holding two requests: nothing new goes to it, its counts go
    // with it, and the others are untouched.
    let left_at = Instant::now();
    write_eds(&eds_path, &ports[1..]);
    endpoints_known(2);
    let left = left_at.elapsed();
    let gone = pool.backends[0].id();
    let responses: Vec<Response> = (0..20).map(|_| pool.request(&[])).collect();
    assert!(!served_by(&responses).contains_key(&gone));
    wait_until(
        Duration::from_secs(5),
        "the gauges to show the four remaining requests",
        || pool.envoy.in_flight(CLUSTER).1 == 4,
    );
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
    wait_until(
        Duration::from_secs(5),
        "the removed endpoint's two releases to be counted",
        || stat(&pool, "dropped_releases") == 2,
    );
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "FIGURE membership: a new EDS endpoint was routable {:.2} s after the EDS update, a removed one dropped after {:.2} s (admin poll every 200 ms)",
        joined.as_secs_f64(),
        left.as_secs_f64()
    );
}

#[test]
fn the_counts_of_a_vm_that_dies_holding_a_request_are_reclaimed_when_its_lease_runs_out() {
    let lease_ms = 1500;
    let pool = Pool::start_configured(
        "LEAST_OUTSTANDING_REQUESTS",
        &format!(r#""vm_lease_ttl_ms": {lease_ms}"#),
        |config| config.with_listener_running("crashing", &crash_wasm_path()),
    );
    let crashing = pool.envoy.listener_address("crashing");

    // The crash build routes the request (taking a count in the shared table), then traps.
    let answer = request(
        crashing,
        "/v1/completions",
        &[("x-model-lb-test-crash", "1")],
    );
    let died = Instant::now();
    assert!(
        answer.as_ref().map_or(true, |r| r.status >= 500),
        "a crashed VM cannot have served the request: {:?}",
        answer.map(|r| r.status)
    );
    assert_eq!(pool.total_active(), 0, "nothing reached a backend");
    // Until its lease runs out, the dead VM's count stands: no other VM may take it back early,
    // a stalled VM looks just the same.
    wait_until(
        Duration::from_secs(5),
        "the leader to publish the dead VM's count",
        || pool.envoy.in_flight(CLUSTER).1 == 1,
    );

    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    let reclaimed_after = died.elapsed();
    assert!(
        reclaimed_after >= Duration::from_millis(lease_ms),
        "reclaimed after {reclaimed_after:?}, before the {lease_ms} ms lease ran out"
    );
    assert_eq!(stat(&pool, "reclaimed_requests"), 1);
    assert_eq!(stat(&pool, "reaped_vms"), 1);
    assert!(
        pool.envoy
            .log()
            .contains("reclaimed 1 in-flight request from 1 worker VM"),
        "{}",
        pool.envoy.log()
    );
    eprintln!(
        "the dead VM's count was reclaimed {reclaimed_after:?} after it died (lease {lease_ms} ms)"
    );

    // The live VMs balance exactly again.
    let held = pool.hold(6);
    assert_eq!(pool.active_per_backend(), vec![2, 2, 2]);
    pool.release(held);
    pool.envoy.wait_for_zero_in_flight(CLUSTER);
    assert_no_corrections(&pool);
}
