//! The HTTP side of `model-server`: routing, OpenAI endpoints, SSE streaming,
//! health and Prometheus metrics, on hyper 1 (HTTP/1.1, keep-alive).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::engine::{Engine, EngineConfig, Job};
use crate::openai::{
    error_body, error_type_for, full_response, parse_request, Api, BadRequest, ChunkFormatter,
};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Header naming the instance that served a response.
pub const SERVED_BY: &str = "x-served-by";

/// Request header asking for an ORCA load report (`text` or `json`).
pub const LOAD_METRICS_FORMAT: &str = "endpoint-load-metrics-format";

/// Response header carrying the ORCA load report.
pub const LOAD_METRICS: &str = "endpoint-load-metrics";

/// ORCA load report formats (vLLM's `endpoint-load-metrics-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrcaFormat {
    Text,
    Json,
}

impl OrcaFormat {
    /// The format a request asks for; unknown values get no report (as in vLLM).
    pub fn parse(value: &[u8]) -> Option<OrcaFormat> {
        let v = std::str::from_utf8(value).ok()?.trim();
        if v.eq_ignore_ascii_case("text") {
            Some(OrcaFormat::Text)
        } else if v.eq_ignore_ascii_case("json") {
            Some(OrcaFormat::Json)
        } else {
            None
        }
    }
}

/// A float as Python's `repr` prints it for these values (vLLM's header is
/// built in Python): never an exponent, always a decimal point.
fn py_float(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = v.to_string();
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// The value of `endpoint-load-metrics`, in vLLM's shape:
/// `TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=3.0`
/// or `JSON {"named_metrics": {"kv_cache_usage_perc": 0.25, "num_requests_waiting": 3.0}}`.
pub fn orca_report(format: OrcaFormat, kv_cache_usage: f64, waiting: usize) -> String {
    let kv = py_float(kv_cache_usage);
    let waiting = py_float(waiting as f64);
    match format {
        OrcaFormat::Text => format!(
            "TEXT named_metrics.kv_cache_usage_perc={kv}, named_metrics.num_requests_waiting={waiting}"
        ),
        OrcaFormat::Json => format!(
            "JSON {{\"named_metrics\": {{\"kv_cache_usage_perc\": {kv}, \"num_requests_waiting\": {waiting}}}}}"
        ),
    }
}

/// Everything `model-server` needs besides its listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: String,
    /// Value of `x-served-by`; defaults to the bound `ip:port`.
    pub id: Option<String>,
    pub engine: EngineConfig,
    pub model: String,
    pub fail_status: u16,
    pub fail_rate: f64,
    pub threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8000".into(),
            id: None,
            engine: EngineConfig::default(),
            model: "sim-model".into(),
            fail_status: 503,
            fail_rate: 0.0,
            threads: 1,
        }
    }
}

type RespBody = BoxBody<Bytes, Infallible>;

struct State {
    engine: Arc<Engine>,
    served_by: HeaderValue,
    model: String,
    fail_status: StatusCode,
    fail_rate: f64,
    next_id: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

/// Streaming response body fed by the generation task.
struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into()).boxed()
}

fn json_response(status: StatusCode, v: &Value) -> Response<RespBody> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(status: StatusCode, message: &str) -> Response<RespBody> {
    json_response(
        status,
        &error_body(message, error_type_for(status.as_u16())),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    lines: &[(String, V)],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in lines {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

impl State {
    fn metrics(&self) -> String {
        let snap = self.engine.snapshot();
        let c = &self.engine.counters;
        let m = escape_label(&self.model);
        let mut out = String::with_capacity(4096);
        let o = &mut out;
        let ml = format!("model_name=\"{m}\"");
        let count = |a: &AtomicU64| vec![(ml.clone(), a.load(Ordering::Relaxed))];
        metric(
            o,
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in the batch (prefill or decode).",
            &[(ml.clone(), snap.running as u64)],
        );
        metric(
            o,
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting for a batch slot.",
            &[(ml.clone(), snap.waiting as u64)],
        );
        metric(
            o,
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            &[(ml.clone(), self.engine.kv_usage())],
        );
        metric(
            o,
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            &count(&c.prompt_tokens),
        );
        metric(
            o,
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            &count(&c.generation_tokens),
        );
        metric(
            o,
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            &count(&c.prefix_queries),
        );
        metric(
            o,
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            &count(&c.prefix_hits),
        );
        metric(
            o,
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            &[
                (
                    format!("{ml},finished_reason=\"stop\""),
                    c.success_stop.load(Ordering::Relaxed),
                ),
                (
                    format!("{ml},finished_reason=\"length\""),
                    c.success_length.load(Ordering::Relaxed),
                ),
            ],
        );
        let statuses: Vec<(String, u64)> = match self.statuses.lock() {
            Ok(m) => m
                .iter()
                .map(|(k, v)| (format!("status=\"{k}\""), *v))
                .collect(),
            Err(p) => p
                .into_inner()
                .iter()
                .map(|(k, v)| (format!("status=\"{k}\""), *v))
                .collect(),
        };
        metric(
            o,
            "model_sim_requests_total",
            "counter",
            "HTTP responses by status code.",
            &statuses,
        );
        metric(
            o,
            "model_sim_num_requests_decoding",
            "gauge",
            "Number of requests in the decode phase (the b in t(b)).",
            &[(ml.clone(), snap.decoding as u64)],
        );
        metric(
            o,
            "model_sim_kv_cache_tokens",
            "gauge",
            "KV tokens held by running requests (idle cached prefix blocks are free).",
            &[(ml.clone(), self.engine.kv_tokens())],
        );
        metric(
            o,
            "model_sim_prefix_cache_tokens",
            "gauge",
            "Tokens held in the prefix cache (full 16-token blocks).",
            &[(ml.clone(), self.engine.cached_tokens())],
        );
        metric(
            o,
            "model_sim_requests_admitted_total",
            "counter",
            "Requests accepted by the engine (not rejected), queued or not.",
            &count(&c.admitted),
        );
        metric(
            o,
            "model_sim_requests_queued_total",
            "counter",
            "Accepted requests that waited in the queue because every batch slot was busy.",
            &count(&c.queued),
        );
        metric(
            o,
            "model_sim_requests_aborted_total",
            "counter",
            "Requests abandoned by their client before finishing.",
            &count(&c.aborted),
        );
        metric(
            o,
            "model_sim_requests_rejected_total",
            "counter",
            "Requests refused with 429 because the queue was full.",
            &count(&c.rejected),
        );
        out
    }

    fn count_status(&self, status: StatusCode) {
        let mut map = match self.statuses.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        *map.entry(status.as_u16()).or_insert(0) += 1;
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let mut resp = route(&state, req).await;
    state.count_status(resp.status());
    resp.headers_mut()
        .insert(SERVED_BY, state.served_by.clone());
    Ok(resp)
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path().to_string();
    let allowed = match path.as_str() {
        "/health" | "/metrics" | "/v1/models" | "/load" => Method::GET,
        "/v1/completions" | "/v1/chat/completions" => Method::POST,
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                &error_body(&format!("Not Found: {path}"), "invalid_request_error"),
            )
        }
    };
    if req.method() != allowed {
        let mut r = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!(
                "Method {} not allowed for {path}; use {allowed}",
                req.method()
            ),
        );
        let allow = if allowed == Method::GET {
            "GET"
        } else {
            "POST"
        };
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
        return r;
    }
    match path.as_str() {
        "/health" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/load" => {
            // vLLM's --enable-server-load-tracking: requests inside the server.
            let snap = state.engine.snapshot();
            json_response(
                StatusCode::OK,
                &json!({"server_load": snap.running + snap.waiting}),
            )
        }
        "/metrics" => {
            let mut r = Response::new(full(state.metrics()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/v1/models" => json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": "model-sim"}]}),
        ),
        "/v1/completions" => completion(state, Api::Completions, req).await,
        _ => completion(state, Api::Chat, req).await,
    }
}

async fn completion(state: &Arc<State>, api: Api, req: Request<Incoming>) -> Response<RespBody> {
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    };
    let orca = req
        .headers()
        .get(LOAD_METRICS_FORMAT)
        .and_then(|v| OrcaFormat::parse(v.as_bytes()));
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return too_large(),
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("Failed to read request body: {e}"),
            )
        }
    };
    if state.fail_rate > 0.0 && state.engine.random() < state.fail_rate {
        return error_response(
            state.fail_status,
            &format!("Injected fault (--fail-rate): {}", state.fail_status),
        );
    }
    let max_output = state.engine.config().output.max;
    let gen = match parse_request(api, &body, max_output) {
        Ok(g) => g,
        Err(BadRequest(msg)) => return error_response(StatusCode::BAD_REQUEST, &msg),
    };
    let ticket = match state.engine.enqueue() {
        Ok(t) => t,
        Err(_) => {
            return error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "The server is overloaded: request queue is full (--max-queue)",
            )
        }
    };
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match api {
        Api::Completions => format!("cmpl-sim{n:x}"),
        Api::Chat => format!("chatcmpl-sim{n:x}"),
    };
    let created = unix_now();
    let model = gen.model.clone().unwrap_or_else(|| state.model.clone());
    let job = Job {
        prompt_tokens: gen.prompt_tokens,
        max_tokens: gen.max_tokens,
        blocks: gen.blocks,
    };

    if !gen.stream {
        let Some(fin) = ticket.run(job, |_, _| true).await else {
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, "Generation aborted");
        };
        let mut r = json_response(
            StatusCode::OK,
            &full_response(api, &id, created, &model, fin.usage, fin.finish_reason),
        );
        // Like vLLM: a report on complete responses only, sampled as they finish.
        if let Some(format) = orca {
            let report = orca_report(
                format,
                state.engine.kv_usage(),
                state.engine.snapshot().waiting,
            );
            if let Ok(v) = HeaderValue::from_str(&report) {
                r.headers_mut().insert(LOAD_METRICS, v);
            }
        }
        return r;
    }

    let fmt = ChunkFormatter::new(api, &id, created, &model);
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    if let Some(role) = fmt.role_chunk() {
        let _ = tx.send(role);
    }
    let include_usage = gen.include_usage;
    tokio::spawn(async move {
        let run = ticket.run(job, |start, count| {
            tx.send(fmt.content_chunk(start, count)).is_ok()
        });
        tokio::select! {
            fin = run => {
                if let Some(fin) = fin {
                    let _ = tx.send(fmt.final_chunk(fin.finish_reason));
                    if include_usage {
                        let _ = tx.send(fmt.usage_chunk(fin.usage));
                    }
                    let _ = tx.send(ChunkFormatter::done());
                }
            }
            // The client went away (hyper dropped the body): free the slot now.
            _ = tx.closed() => {}
        }
    });
    let mut r = Response::new(ChannelBody { rx }.boxed());
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Serves connections from `listener` until `shutdown` resolves.
pub async fn serve<S>(listener: TcpListener, cfg: ServerConfig, shutdown: S) -> std::io::Result<()>
where
    S: Future<Output = ()>,
{
    let addr = listener.local_addr()?;
    let id = cfg.id.clone().unwrap_or_else(|| addr.to_string());
    let served_by = HeaderValue::from_str(&id).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("--id {id:?} is not a valid header value"),
        )
    })?;
    let fail_status = StatusCode::from_u16(cfg.fail_status).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("--fail-status {} is not an HTTP status", cfg.fail_status),
        )
    })?;
    let state = Arc::new(State {
        engine: Engine::new(cfg.engine.clone()),
        served_by,
        model: cfg.model.clone(),
        fail_status,
        fail_rate: cfg.fail_rate,
        next_id: AtomicU64::new(0),
        statuses: Mutex::new(BTreeMap::new()),
    });
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(_) => {
                // Typically out of file descriptors: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(Arc::clone(&state), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A server running on the current tokio runtime (for tests and embedding).
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Binds `cfg.listen` and serves in a background task. The server is
    /// ready when this returns.
    pub async fn start(cfg: ServerConfig) -> std::io::Result<RunningServer> {
        let listener = TcpListener::bind(&cfg.listen).await?;
        let addr = listener.local_addr()?;
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, cfg, async move {
            let _ = rx.await;
        }));
        Ok(RunningServer {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.unwrap_or(Ok(()))
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orca_formats() {
        assert_eq!(OrcaFormat::parse(b"text"), Some(OrcaFormat::Text));
        assert_eq!(OrcaFormat::parse(b" TEXT "), Some(OrcaFormat::Text));
        assert_eq!(OrcaFormat::parse(b"Json"), Some(OrcaFormat::Json));
        assert_eq!(OrcaFormat::parse(b"bin"), None);
        assert_eq!(OrcaFormat::parse(b""), None);
        assert_eq!(OrcaFormat::parse(b"\xff"), None);
    }

    #[test]
    fn orca_reports_look_like_vllm() {
        assert_eq!(
            orca_report(OrcaFormat::Text, 0.25, 3),
            "TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=3.0"
        );
        assert_eq!(
            orca_report(OrcaFormat::Text, 0.0, 0),
            "TEXT named_metrics.kv_cache_usage_perc=0.0, named_metrics.num_requests_waiting=0.0"
        );
        let json = orca_report(OrcaFormat::Json, 0.000001, 12);
        assert_eq!(
            json,
            r#"JSON {"named_metrics": {"kv_cache_usage_perc": 0.000001, "num_requests_waiting": 12.0}}"#
        );
        let v: Value = serde_json::from_str(json.strip_prefix("JSON ").unwrap()).unwrap();
        assert_eq!(v["named_metrics"]["num_requests_waiting"], 12.0);
        assert!(HeaderValue::from_str(&json).is_ok());
        assert_eq!(py_float(f64::NAN), "0.0");
        assert_eq!(py_float(1.0), "1.0");
    }
}
