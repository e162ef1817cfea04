//! `PREFIX_AWARE` in a real Envoy (`--concurrency 2`): the body's prompt prefix picks the
//! endpoint, the same one on every worker and every replica, until it is at the threshold.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use support::*;

const CLUSTER: &str = "model_servers";
const THRESHOLD: u32 = 2;

fn prefix_config(ports: [u16; 3]) -> EnvoyConfig {
    EnvoyConfig::shipped()
        .backends(ports)
        .plugin_config(&plugin_json_with(
            "PREFIX_AWARE",
            ports,
            &format!(
                r#""prefix_aware": {{"prefix_length": 1024, "concurrency_threshold": {THRESHOLD}}}"#
            ),
        ))
        .with_hold_filter()
}

fn backends() -> (Vec<Backend>, [u16; 3]) {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let ports = [backends[0].port(), backends[1].port(), backends[2].port()];
    (backends, ports)
}

fn conversation(system: &str, user: &str) -> Vec<u8> {
    format!(
        r#"{{"model": "m", "stream": false, "messages": [{{"role": "system", "content": "{system}"}}, {{"role": "user", "content": "{user}"}}]}}"#
    )
    .into_bytes()
}

fn served_by(listener: SocketAddr, body: &[u8], headers: &[(&str, &str)]) -> String {
    let r = post(listener, "/v1/chat/completions", body, headers).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.served_by().unwrap().to_owned()
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(&format!("model_lb.{CLUSTER}.{name}"))
}

fn wait_for_stat(envoy: &Envoy, name: &str, at_least: u64) {
    wait_until(Duration::from_secs(10), name, || {
        stat(envoy, name) >= at_least
    });
}

#[test]
fn the_same_prefix_goes_to_the_same_endpoint_on_every_worker_and_replica() {
    let (_backends, ports) = backends();
    let a = Envoy::start(&prefix_config(ports));
    let b = Envoy::start(&prefix_config(ports));
    let mut owners: HashMap<usize, String> = HashMap::new();
    for group in 0..30 {
        let system = format!(
            "You are assistant number {group}. {}",
            "Be brief. ".repeat(120)
        );
        // Different questions after the same 1,024-character prefix; fresh connections, so
        // both workers of each Envoy take part.
        let first = served_by(a.listener, &conversation(&system, "question one"), &[]);
        for turn in 0..4 {
            let question = format!("question {turn}");
            assert_eq!(
                served_by(a.listener, &conversation(&system, &question), &[]),
                first
            );
            assert_eq!(
                served_by(b.listener, &conversation(&system, &question), &[]),
                first,
                "replica B disagrees on group {group}"
            );
        }
        owners.insert(group, first);
    }
    // Different prefixes spread over the pool.
    let used: HashSet<&String> = owners.values().collect();
    assert_eq!(used.len(), 3, "{owners:?}");
    wait_for_stat(&a, "prefix.routed", 150);
    assert_eq!(stat(&a, "prefix.spilled"), 0);
    assert!(stat(&a, "prefix.body_bytes_read") > 0);
    a.wait_for_zero_in_flight(CLUSTER);
}

#[test]
fn a_busy_endpoint_spills_at_exactly_the_threshold() {
    let (backends, ports) = backends();
    let envoy = Envoy::start(&prefix_config(ports));
    let body = conversation(&"shared system prompt ".repeat(60), "hi");
    let owner = served_by(envoy.listener, &body, &[]);
    let listener = envoy.listener;
    let hold = |body: Vec<u8>| {
        thread::spawn(move || post(listener, "/v1/chat/completions", &body, &[HOLD]).unwrap())
    };
    let active =
        || -> HashMap<String, usize> { backends.iter().map(|b| (b.id(), b.active())).collect() };
    // THRESHOLD requests stay on the key's endpoint...
    let mut held: Vec<_> = (0..THRESHOLD).map(|_| hold(body.clone())).collect();
    wait_until(Duration::from_secs(10), "the owner to hold them", || {
        active()[&owner] == THRESHOLD as usize
    });
    // ...and the next one goes elsewhere.
    held.push(hold(body.clone()));
    wait_until(Duration::from_secs(10), "the spill", || {
        active().values().sum::<usize>() == THRESHOLD as usize + 1
    });
    assert_eq!(active()[&owner], THRESHOLD as usize, "{:?}", active());
    wait_for_stat(&envoy, "prefix.spilled", 1);
    for b in &backends {
        b.release_held();
    }
    for h in held {
        assert_eq!(h.join().unwrap().status, 200);
    }
    // With room again, the key goes home.
    assert_eq!(served_by(envoy.listener, &body, &[]), owner);
    envoy.wait_for_zero_in_flight(CLUSTER);
}

#[test]
fn awkward_bodies_fall_back_clearly_and_are_still_served() {
    let (_backends, ports) = backends();
    let envoy = Envoy::start(&prefix_config(ports));
    let listener = envoy.listener;
    let system = "Answer in French. ".repeat(80);
    let home = served_by(listener, &conversation(&system, "hello"), &[]);

    // `messages` last, after 100 KB of other fields: found, same endpoint.
    let late = format!(
        r#"{{"metadata": {{"blob": "{}"}}, "temperature": 0.2, "messages": [{{"role": "system", "content": "{system}"}}, {{"role": "user", "content": "hello"}}]}}"#,
        "b".repeat(100 * 1024)
    );
    assert_eq!(served_by(listener, late.as_bytes(), &[]), home);

    // Multimodal content: parts are read, the request is routed by them.
    let image = r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "what is this?"}]}]}"#;
    let first = served_by(listener, image.as_bytes(), &[]);
    assert_eq!(served_by(listener, image.as_bytes(), &[]), first);

    // Not JSON: the raw body is the key.
    let raw = served_by(listener, b"just some text, no JSON at all", &[]);
    assert_eq!(
        served_by(listener, b"just some text, no JSON at all", &[]),
        raw
    );
    wait_for_stat(&envoy, "prefix.raw_body_keys", 2);

    // Truncated JSON: least outstanding requests, still served (the backend decides).
    served_by(
        listener,
        br#"{"messages": [{"role": "user", "content": "cut he"#,
        &[],
    );
    wait_for_stat(&envoy, "prefix.fallback.truncated", 1);

    // A GET: no body, no key.
    assert_eq!(request(listener, "/v1/models", &[]).unwrap().status, 200);
    wait_for_stat(&envoy, "prefix.fallback.no_body", 1);

    // 10 MB bodies: the key is read from the first kilobytes and the body streams on (the
    // backend refuses it as too large, which is its answer to give); with `messages` at the
    // end, the scan gives up at its limit instead of buffering 10 MB.
    let huge_first = format!(
        r#"{{"messages": [{{"role": "system", "content": "{system}"}}, {{"role": "user", "content": "hello"}}], "pad": "{}"}}"#,
        "p".repeat(10 << 20)
    );
    let r = post(listener, "/v1/chat/completions", huge_first.as_bytes(), &[]).unwrap();
    eprintln!(
        "FIGURE prefix: a 10 MB body: status {} from {:?}",
        r.status,
        r.served_by()
    );
    assert!(r.served_by().is_some() || r.status == 503, "{r:?}");
    let huge_last = format!(
        r#"{{"pad": "{}", "messages": [{{"role": "user", "content": "x"}}]}}"#,
        "p".repeat(10 << 20)
    );
    let _ = post(listener, "/v1/chat/completions", huge_last.as_bytes(), &[]);
    wait_for_stat(&envoy, "prefix.fallback.scan_limit", 1);
    assert!(
        stat(&envoy, "prefix.body_bytes_read") < 2 * 256 * 1024 + 200 * 1024,
        "read {} body bytes",
        stat(&envoy, "prefix.body_bytes_read")
    );
    assert!(!envoy.log().contains("request_payload_too_large"));

    // A chunked upload that stalls half-way, then completes: routed by its key once the
    // key is complete, and served.
    let body = conversation(&system, "hello");
    let (head, tail) = body.split_at(body.len() / 3);
    let mut stream = TcpStream::connect(listener).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: models\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
        head.len()
    )
    .unwrap();
    stream.write_all(head).unwrap();
    stream.write_all(b"\r\n").unwrap();
    stream.flush().unwrap();
    // The request waits in Envoy for the rest of its key; nothing is counted yet.
    wait_until(Duration::from_secs(5), "the first chunk to be read", || {
        stat(&envoy, "prefix.body_bytes_read") > 0
    });
    write!(stream, "{:x}\r\n", tail.len()).unwrap();
    stream.write_all(tail).unwrap();
    stream.write_all(b"\r\n0\r\n\r\n").unwrap();
    let r = read_response(&mut std::io::BufReader::new(stream)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.served_by(), Some(home.as_str()));

    // An upload abandoned while the filter waits for the key: nothing was counted.
    let mut stream = TcpStream::connect(listener).unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: models\r\ncontent-length: 5000\r\n\r\n{\"messages\": [")
        .unwrap();
    drop(stream);

    envoy.wait_for_zero_in_flight(CLUSTER);
    assert_eq!(stat(&envoy, "counter_corrections"), 0);
    assert_eq!(stat(&envoy, "fail_open.host_error"), 0);
}

#[test]
fn without_the_hold_filter_in_the_same_vm_requests_fail_open_and_say_why() {
    let (_backends, ports) = backends();
    let plain = EnvoyConfig::shipped()
        .backends(ports)
        .plugin_config(&plugin_json("PREFIX_AWARE", ports));
    // No hold filter at all, and a hold filter in another VM (it cannot see the tag's owner):
    // neither may stall a request.
    for (setup, config) in [
        ("no hold filter", plain.clone()),
        (
            "hold filter in another VM",
            plain.with_hold_filter_in_vm("elsewhere"),
        ),
    ] {
        let envoy = Envoy::start(&config);
        for i in 0..5 {
            served_by(envoy.listener, &conversation("s", &format!("q{i}")), &[]);
        }
        wait_for_stat(&envoy, "fail_open.no_hold_filter", 5);
        assert_eq!(stat(&envoy, "decisions.prefix_aware"), 0, "{setup}");
        assert!(
            envoy.log().contains("failed open"),
            "{setup}: {}",
            envoy.log()
        );
        envoy.wait_for_zero_in_flight(CLUSTER);
    }
}

#[test]
fn a_client_cannot_make_the_hold_filter_stall_a_request() {
    let (_backends, ports) = backends();
    // LOR with a hold filter configured anyway: a forged tag is ignored, not held.
    let config = EnvoyConfig::shipped()
        .backends(ports)
        .plugin_config(&plugin_json("LEAST_OUTSTANDING_REQUESTS", ports))
        .with_hold_filter();
    let envoy = Envoy::start(&config);
    for tag in ["1", "2", "999999", "junk"] {
        let r = post(
            envoy.listener,
            "/v1/chat/completions",
            &conversation("s", "q"),
            &[("x-model-lb-hold", tag)],
        )
        .unwrap();
        assert_eq!(r.status, 200);
    }
}
