//! In-process and binary-level tests of model-server and model-load on
//! 127.0.0.1 (port 0). Simulated time runs at a tiny --time-scale so every
//! test is fast; readiness is awaited, never slept for.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use model_sim::engine::EngineConfig;
use model_sim::load::{run, LoadConfig, SseParser, Target};
use model_sim::model::TimingModel;
use model_sim::openai::Api;
use model_sim::server::{RunningServer, ServerConfig};
use model_sim::workload::WorkloadKind;

fn fast_engine(max_batch: usize, time_scale: f64) -> EngineConfig {
    EngineConfig {
        timing: TimingModel {
            time_scale,
            ..TimingModel::default()
        },
        max_batch,
        ..EngineConfig::default()
    }
}

async fn start(cfg: ServerConfig) -> RunningServer {
    RunningServer::start(ServerConfig {
        listen: "127.0.0.1:0".into(),
        ..cfg
    })
    .await
    .unwrap()
}

async fn client(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

struct Resp {
    status: u16,
    served_by: Option<String>,
    content_type: Option<String>,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> Resp {
    call_with(addr, method, path, body, &[]).await
}

async fn call_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let mut c = client(addr).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let served_by = header("x-served-by");
    let content_type = header("content-type");
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        served_by,
        content_type,
        headers,
        body,
    }
}

async fn metric(addr: SocketAddr, name: &str) -> u64 {
    metric_as(addr, name).await
}

async fn metric_as<T: std::str::FromStr>(addr: SocketAddr, name: &str) -> T {
    let r = call(addr, "GET", "/metrics", "").await;
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

/// Polls `cond` until it holds (at most 5 s).
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let s = start(ServerConfig {
        id: Some("sim-a".into()),
        ..ServerConfig::default()
    })
    .await;
    let cases = [
        ("POST", "/v1/completions", "{not json", 400),
        ("POST", "/v1/completions", r#"{"max_tokens":3}"#, 400),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":0}"#,
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":99999}"#,
            400,
        ),
        ("POST", "/v1/chat/completions", r#"{"messages":"hi"}"#, 400),
        ("POST", "/v1/chat/completions", r#"{"prompt":"x"}"#, 400),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"stream":1}"#,
            400,
        ),
        ("GET", "/v1/nothing", "", 404),
        ("GET", "/v1/completions", "", 405),
        ("POST", "/health", "", 405),
        ("DELETE", "/metrics", "", 405),
    ];
    for (method, path, body, status) in cases {
        let r = call(s.addr, method, path, body).await;
        assert_eq!(r.status, status, "{method} {path} {body}");
        assert_eq!(r.served_by.as_deref(), Some("sim-a"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let v = r.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
    }
    let big = format!("{{\"prompt\":\"{}\"}}", "a".repeat(1 << 20));
    let r = call(s.addr, "POST", "/v1/completions", &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.served_by.as_deref(), Some("sim-a"));

    let h = call(s.addr, "GET", "/health", "").await;
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));
    assert_eq!(h.served_by.as_deref(), Some("sim-a"));
    assert_eq!(
        metric(s.addr, "model_sim_requests_total{status=\"400\"}").await,
        7
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_is_honoured_stream_and_not() {
    let s = start(ServerConfig {
        engine: fast_engine(8, 0.001),
        ..ServerConfig::default()
    })
    .await;
    let id = s.addr.to_string();
    for (path, body) in [
        (
            "/v1/completions",
            r#"{"prompt":"hello there","max_tokens":37}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":37}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hello"}],"max_completion_tokens":37}"#,
        ),
    ] {
        let r = call(s.addr, "POST", path, body).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.served_by.as_deref(),
            Some(id.as_str()),
            "default id is ip:port"
        );
        let v = r.json();
        assert_eq!(v["usage"]["completion_tokens"], 37, "{v}");
        assert_eq!(v["model"], "sim-model");
        assert!(v["id"].is_string() && v["created"].is_u64());
    }
    for (path, body, object) in [
        (
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":25,"stream":true,"model":"m2"}"#,
            "text_completion",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":25,"stream":true}"#,
            "chat.completion.chunk",
        ),
    ] {
        let r = call(s.addr, "POST", path, body).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type.as_deref(), Some("text/event-stream"));
        assert!(r.served_by.is_some());
        let mut p = SseParser::default();
        p.feed(&r.body);
        assert!(p.done);
        assert_eq!(p.content_chunks, 25, "{path}");
        assert_eq!(p.usage_tokens, None, "usage only on request");
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        let first: Value =
            serde_json::from_str(text.lines().next().unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        assert_eq!(first["object"], object);
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    // Omitted max_tokens: the server draws a length; usage agrees with the text.
    let r = call(s.addr, "POST", "/v1/completions", r#"{"prompt":"x"}"#).await;
    let v = r.json();
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=2048).contains(&n));
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap().len() as u64,
        4 * n
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_request_queues_and_disconnect_frees_slots() {
    // Each request would take ~2000 tokens x 20 ms x 0.05 = 2 s; we never wait for that.
    let s = start(ServerConfig {
        engine: fast_engine(2, 0.05),
        ..ServerConfig::default()
    })
    .await;
    let body = r#"{"prompt":"x","max_tokens":2000,"stream":true}"#;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut c = client(s.addr).await;
        let req = Request::post("/v1/completions")
            .header("host", "x")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        streams.push((c, resp));
    }
    let addr = s.addr;
    eventually("2 running (decoding), 1 waiting", || async move {
        metric(addr, "vllm:num_requests_running").await == 2
            && metric(addr, "vllm:num_requests_waiting").await == 1
            && metric(addr, "model_sim_num_requests_decoding").await == 2
    })
    .await;
    let load = call(addr, "GET", "/load", "").await;
    assert_eq!(load.status, 200);
    assert_eq!(load.json()["server_load"], 3);
    assert_eq!(metric(addr, "model_sim_requests_admitted_total").await, 3);
    assert_eq!(metric(addr, "model_sim_requests_queued_total").await, 1);
    // Two prompts of 1 token and 2000 generated so far at most: some KV in use.
    let kv: f64 = metric_as(addr, "vllm:kv_cache_usage_perc").await;
    assert!(kv > 0.0 && kv < 0.1, "{kv}");
    drop(streams);
    eventually("slots freed", || async move {
        metric(addr, "vllm:num_requests_running").await == 0
            && metric(addr, "vllm:num_requests_waiting").await == 0
            && metric(addr, "model_sim_requests_aborted_total").await == 3
    })
    .await;
    assert_eq!(
        call(addr, "GET", "/load", "").await.json()["server_load"],
        0
    );
    assert_eq!(call(addr, "POST", "/load", "").await.status, 405);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gets_429_and_faults_are_injected() {
    let s = start(ServerConfig {
        engine: EngineConfig {
            max_queue: 0,
            ..fast_engine(1, 0.05)
        },
        ..ServerConfig::default()
    })
    .await;
    let mut c = client(s.addr).await;
    let req = Request::post("/v1/completions")
        .header("host", "x")
        .body(Full::new(Bytes::from(
            r#"{"prompt":"x","max_tokens":2000,"stream":true}"#,
        )))
        .unwrap();
    let busy = c.send_request(req).await.unwrap();
    let addr = s.addr;
    eventually("one running", || async move {
        metric(addr, "vllm:num_requests_running").await == 1
    })
    .await;
    let r = call(
        s.addr,
        "POST",
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":1}"#,
    )
    .await;
    assert_eq!(r.status, 429);
    assert!(r.served_by.is_some());
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    drop(busy);
    s.stop().await.unwrap();

    let s = start(ServerConfig {
        id: Some("faulty".into()),
        fail_rate: 1.0,
        fail_status: 503,
        ..ServerConfig::default()
    })
    .await;
    let r = call(s.addr, "POST", "/v1/chat/completions", r#"{"messages":[]}"#).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.served_by.as_deref(), Some("faulty"));
    assert_eq!(r.json()["error"]["type"], "server_error");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orca_load_reports_on_non_streaming_responses() {
    let s = start(ServerConfig {
        engine: fast_engine(8, 0.001),
        ..ServerConfig::default()
    })
    .await;
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let path = "/v1/chat/completions";
    let r = call_with(
        s.addr,
        "POST",
        path,
        body,
        &[("endpoint-load-metrics-format", "text")],
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.headers["endpoint-load-metrics"].to_str().unwrap();
    let rest = v.strip_prefix("TEXT ").unwrap_or_else(|| panic!("{v}"));
    let pairs: Vec<(&str, f64)> = rest
        .split(", ")
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    assert_eq!(pairs[0].0, "named_metrics.kv_cache_usage_perc");
    assert!((0.0..=1.0).contains(&pairs[0].1));
    assert_eq!(pairs[1], ("named_metrics.num_requests_waiting", 0.0));
    assert!(v.ends_with("num_requests_waiting=0.0"), "{v}");

    let r = call_with(
        s.addr,
        "POST",
        "/v1/completions",
        r#"{"prompt":"hi","max_tokens":3}"#,
        &[("endpoint-load-metrics-format", "JSON")],
    )
    .await;
    let v = r.headers["endpoint-load-metrics"].to_str().unwrap();
    let j: Value = serde_json::from_str(v.strip_prefix("JSON ").unwrap()).unwrap();
    assert!(j["named_metrics"]["kv_cache_usage_perc"].is_f64());
    assert_eq!(j["named_metrics"]["num_requests_waiting"], 0.0);

    // Streams, requests without the header and unknown formats get none.
    let stream = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true}"#;
    for (body, headers) in [
        (stream, &[("endpoint-load-metrics-format", "text")][..]),
        (body, &[][..]),
        (body, &[("endpoint-load-metrics-format", "bin")][..]),
    ] {
        let r = call_with(s.addr, "POST", path, body, headers).await;
        assert_eq!(r.status, 200);
        assert!(r.headers.get("endpoint-load-metrics").is_none(), "{body}");
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_system_prompts_hit_the_prefix_cache() {
    let s = start(ServerConfig {
        engine: fast_engine(8, 0.001),
        ..ServerConfig::default()
    })
    .await;
    let system = "You are a helpful simulated assistant. ".repeat(20);
    for q in ["first question", "second question"] {
        let body = serde_json::json!({
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "max_tokens": 2,
        });
        let r = call(s.addr, "POST", "/v1/chat/completions", &body.to_string()).await;
        assert_eq!(r.status, 200);
    }
    // The prompts share "system: " + 780 + "\nuser: " = 795 characters: 12 full blocks.
    let queries = metric(s.addr, "vllm:prefix_cache_queries_total").await;
    let hits = metric(s.addr, "vllm:prefix_cache_hits_total").await;
    assert_eq!(hits, 12 * 16, "queries {queries}");
    assert!(queries > 2 * 197);
    assert!(metric(s.addr, "model_sim_prefix_cache_tokens").await >= 12 * 16);
    // Idle: cached blocks no running request references are free, as in vLLM.
    let kv: f64 = metric_as(s.addr, "vllm:kv_cache_usage_perc").await;
    assert_eq!(kv, 0.0, "idle cached blocks are not in use");
    assert_eq!(metric(s.addr, "model_sim_kv_cache_tokens").await, 0);
    s.stop().await.unwrap();
}

fn load_cfg(url: &str) -> LoadConfig {
    LoadConfig {
        targets: vec![Target::parse(url).unwrap()],
        users: 8,
        stream: true,
        duration: Some(Duration::from_millis(1000)),
        drain_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(10),
        max_tokens: "lognormal:60:0.5:300".parse().unwrap(),
        prompt_tokens: "uniform:8:64".parse().unwrap(),
        label: "e2e".into(),
        ..LoadConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_against_server_has_no_errors() {
    let s = start(ServerConfig {
        id: Some("backend-1".into()),
        engine: EngineConfig {
            max_batch: 4,
            ..fast_engine(4, 0.02)
        },
        ..ServerConfig::default()
    })
    .await;
    let out = run(load_cfg(&s.url())).await.unwrap();
    let r = &out.report;
    assert_eq!(out.total_errors, 0, "{:?}", r.errors);
    assert!(r.errors.is_empty());
    assert!(r.requests > 10, "only {} requests", r.requests);
    assert_eq!(r.ok, r.requests);
    assert_eq!(
        r.backends.values().sum::<u64>(),
        r.requests,
        "backend shares add up"
    );
    assert_eq!(r.backends.get("backend-1"), Some(&r.requests));
    assert_eq!(r.instances, 1);
    assert!(r.ttft_ms.as_ref().and_then(|t| t.p50).is_some());
    assert!(r.latency_ms.p50 <= r.latency_ms.p99 && r.latency_ms.p99 <= r.latency_ms.max);
    assert!(r.throughput_per_min > 0.0 && r.output_tokens_per_s > 0.0);
    // Every token the server generated for finished requests reached the client.
    let ok_tokens: u64 = out
        .records
        .iter()
        .filter(|x| x.error.is_none())
        .map(|x| x.tokens)
        .sum();
    assert_eq!(ok_tokens, r.output_tokens);

    // Non-stream, completions API, fixed request count, fixed output length.
    let cfg = LoadConfig {
        stream: false,
        api: Api::Completions,
        duration: None,
        requests: Some(20),
        max_tokens: "fixed:5".parse().unwrap(),
        ..load_cfg(&s.url())
    };
    let out = run(cfg).await.unwrap();
    assert_eq!(out.report.requests, 20);
    assert_eq!(out.report.ok, 20);
    assert_eq!(out.report.output_tokens, 100);
    assert!(out.report.ttft_ms.is_none());
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_errors_are_classified() {
    // Fast 503s from a faulty backend.
    let s = start(ServerConfig {
        fail_rate: 1.0,
        fail_status: 503,
        ..ServerConfig::default()
    })
    .await;
    let cfg = LoadConfig {
        users: 2,
        duration: None,
        requests: Some(10),
        ..load_cfg(&s.url())
    };
    let out = run(cfg).await.unwrap();
    assert_eq!(out.report.errors.get("status_503"), Some(&10));
    assert_eq!(out.report.ok, 0);
    assert_eq!(out.report.backends.values().sum::<u64>(), 10);
    s.stop().await.unwrap();

    // Nothing listening: connect errors, not a hang.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = LoadConfig {
        users: 2,
        duration: Some(Duration::from_millis(200)),
        ..load_cfg(&format!("http://127.0.0.1:{port}"))
    };
    let out = run(cfg).await.unwrap();
    assert!(out.report.errors.get("connect").is_some_and(|n| *n > 0));
    assert_eq!(out.report.requests, out.report.errors["connect"]);
    assert!(out.report.backends.is_empty());

    // A timeout: requests take ~200 ms of decode, the timeout is 50 ms.
    let s = start(ServerConfig {
        engine: fast_engine(4, 0.01),
        ..ServerConfig::default()
    })
    .await;
    let cfg = LoadConfig {
        users: 2,
        duration: None,
        requests: Some(2),
        timeout: Duration::from_millis(50),
        max_tokens: "fixed:1000".parse().unwrap(),
        ..load_cfg(&s.url())
    };
    let out = run(cfg).await.unwrap();
    assert_eq!(out.report.errors.get("timeout"), Some(&2));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_and_warmup() {
    let s = start(ServerConfig {
        engine: fast_engine(16, 0.01),
        ..ServerConfig::default()
    })
    .await;
    let cfg = LoadConfig {
        rate: Some(200.0),
        warmup: Duration::from_millis(200),
        duration: Some(Duration::from_millis(500)),
        ..load_cfg(&s.url())
    };
    let out = run(cfg).await.unwrap();
    let r = &out.report;
    assert_eq!(out.total_errors, 0, "{:?}", r.errors);
    assert!(r.warmup_requests > 10, "{}", r.warmup_requests);
    assert!(r.requests > 40, "{}", r.requests);
    assert_eq!(r.backends.values().sum::<u64>(), r.requests);
    assert_eq!(r.config.mode, "open");
    assert!((r.duration_s - 0.5).abs() < 1e-9);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_urls_and_workloads() {
    let server = |id: &str| {
        start(ServerConfig {
            id: Some(id.into()),
            engine: fast_engine(8, 0.01),
            ..ServerConfig::default()
        })
    };
    let (a, b) = (server("a").await, server("b").await);
    let shared = LoadConfig {
        targets: vec![
            Target::parse(&a.url()).unwrap(),
            Target::parse(&b.url()).unwrap(),
        ],
        users: 4,
        duration: None,
        requests: Some(40),
        workload: WorkloadKind::SharedPrefix,
        prefix_groups: 2,
        system_prompt_tokens: 200,
        turns: 3,
        prompt_tokens: "fixed:20".parse().unwrap(),
        max_tokens: "fixed:5".parse().unwrap(),
        ..load_cfg(&a.url())
    };
    // Closed loop: users 0 and 2 on a, 1 and 3 on b.
    let out = run(shared.clone()).await.unwrap();
    let r = &out.report;
    assert_eq!(out.total_errors, 0, "{:?}", r.errors);
    assert_eq!(r.backends.values().sum::<u64>(), 40);
    assert!(
        r.backends["a"] >= 10 && r.backends["b"] >= 10,
        "{:?}",
        r.backends
    );
    assert_eq!(r.config.url, format!("{},{}", a.url(), b.url()));
    assert_eq!(r.config.workload, "shared-prefix");
    assert!(
        out.records.iter().any(|x| x.prompt_tokens > 225),
        "histories grow"
    );
    for s in [&a, &b] {
        assert!(metric(s.addr, "vllm:prefix_cache_hits_total").await > 0);
    }
    // Open loop: each arrival picks a URL.
    let cfg = LoadConfig {
        rate: Some(200.0),
        requests: None,
        duration: Some(Duration::from_millis(400)),
        conversations: 8,
        ..shared
    };
    let out = run(cfg).await.unwrap();
    let r = &out.report;
    assert_eq!(out.total_errors, 0, "{:?}", r.errors);
    assert_eq!(r.backends.len(), 2, "{:?}", r.backends);
    assert_eq!(r.config.conversations, Some(8));
    a.stop().await.unwrap();
    b.stop().await.unwrap();

    // Unique prompts never hit, even when a run repeats.
    let c = server("c").await;
    for api in [Api::Chat, Api::Completions] {
        for _ in 0..2 {
            let cfg = LoadConfig {
                api,
                users: 4,
                duration: None,
                requests: Some(20),
                prompt_tokens: "fixed:100".parse().unwrap(),
                max_tokens: "fixed:2".parse().unwrap(),
                ..load_cfg(&c.url())
            };
            let out = run(cfg).await.unwrap();
            assert_eq!(out.total_errors, 0);
        }
    }
    assert!(metric(c.addr, "vllm:prefix_cache_queries_total").await >= 80 * 100);
    assert_eq!(metric(c.addr, "vllm:prefix_cache_hits_total").await, 0);
    c.stop().await.unwrap();
}

/// A one-shot-per-connection HTTP server that records request heads and
/// replies with `response` verbatim, then closes.
async fn fake_server(
    response: &'static str,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_stream_and_custom_headers() {
    let (addr, mut heads) = fake_server(concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-served-by: fake\r\nconnection: close\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"text\":\" x\"}]}\n\n"
    ))
    .await;
    let cfg = LoadConfig {
        users: 1,
        duration: None,
        requests: Some(3),
        headers: vec![
            ("Host".into(), "models.example".into()),
            ("x-tenant".into(), "a".into()),
            ("x-tenant".into(), "b".into()),
        ],
        ..load_cfg(&format!("http://{addr}"))
    };
    let out = run(cfg).await.unwrap();
    let r = &out.report;
    assert_eq!(
        r.errors.get("stream_incomplete"),
        Some(&3),
        "{:?}",
        r.errors
    );
    assert_eq!(r.backends.get("fake"), Some(&3));
    let head = heads.recv().await.unwrap().to_ascii_lowercase();
    assert_eq!(head.matches("\r\nhost:").count(), 1, "{head}");
    assert!(head.contains("\r\nhost: models.example\r\n"), "{head}");
    assert!(
        head.contains("x-tenant: a") && head.contains("x-tenant: b"),
        "{head}"
    );
    assert!(
        head.starts_with("post /v1/chat/completions http/1.1"),
        "{head}"
    );
}

/// Shared-prefix requests carry their group in `--prefix-key-header`, the records know it, and
/// exponential think times still send every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_key_header_hot_group_and_exponential_think() {
    let (addr, mut heads) = fake_server(concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-served-by: fake\r\nconnection: close\r\n\r\n",
        "{\"usage\":{\"completion_tokens\":1}}"
    ))
    .await;
    let cfg = LoadConfig {
        users: 3,
        duration: None,
        requests: Some(30),
        workload: WorkloadKind::SharedPrefix,
        prefix_groups: 4,
        system_prompt_tokens: 20,
        turns: 2,
        hot_group_share: 0.5,
        prefix_key_header: Some("x-prefix-key".into()),
        think: Duration::from_millis(2),
        think_exponential: true,
        stream: false,
        ..load_cfg(&format!("http://{addr}"))
    };
    let out = run(cfg).await.unwrap();
    assert_eq!(out.total_errors, 0, "{:?}", out.report.errors);
    assert_eq!(out.records.len(), 30);
    assert!(out.records.iter().all(|r| r.group.is_some_and(|g| g < 4)));
    assert!(out.report.config.think_exponential);
    assert_eq!(out.report.config.hot_group_share, Some(0.5));
    let mut seen = 0;
    while let Ok(head) = heads.try_recv() {
        let head = head.to_ascii_lowercase();
        let value = head
            .lines()
            .find_map(|l| l.strip_prefix("x-prefix-key: "))
            .unwrap_or_else(|| panic!("no key header in {head}"));
        let group: u64 = value.trim().trim_start_matches('g').parse().unwrap();
        assert!(group < 4, "{head}");
        seen += 1;
    }
    assert_eq!(seen, 30);
}

/// The real binaries: readiness line, SIGTERM exit, CLI errors, JSON report.
#[test]
fn binaries_end_to_end() {
    let mut server = Command::new(env!("CARGO_BIN_EXE_model-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--time-scale",
            "0.01",
            "--id",
            "bin-1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("bad readiness line {line:?}"))
        .to_string();
    assert!(!addr.ends_with(":0"), "actual port reported: {addr}");

    let dir = std::env::temp_dir().join(format!("model-sim-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_model-load"))
        .args([
            "--url",
            &format!("http://{addr}"),
            "--stream",
            "--users",
            "4",
            "--requests",
            "12",
        ])
        .args([
            "--max-tokens",
            "fixed:8",
            "--label",
            "bin",
            "--fail-on-errors",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("12 ok / 12 total"), "{table}");
    assert!(
        out.stderr.is_empty(),
        "no progress line when stderr is not a TTY"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["label"], "bin");
    assert_eq!(v["requests"], 12);
    assert_eq!(v["backends"]["bin-1"], 12);
    assert!(v["ttft_ms"]["p50"].is_number());
    std::fs::remove_dir_all(&dir).unwrap();

    let status = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = server.wait().unwrap();
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");

    // Bad arguments: exit 2 and a message naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_model-load"))
        .args(["--users", "zero"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--users"));
    let out = Command::new(env!("CARGO_BIN_EXE_model-server"))
        .args(["--max-batch", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-batch"));

    // --fail-on-errors turns request errors into exit 1 (nothing listens on `addr` now).
    let out = Command::new(env!("CARGO_BIN_EXE_model-load"))
        .args([
            "--url",
            &format!("http://{addr}"),
            "--requests",
            "2",
            "--users",
            "1",
            "--fail-on-errors",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("connect: 2"));
}
