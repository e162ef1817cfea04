//! The `model-load` engine: closed-loop users or open-loop Poisson arrivals
//! against an OpenAI-compatible endpoint, one HTTP/1.1 keep-alive connection
//! per user (a shared pool per URL in open loop), with per-request
//! measurements. With several URLs (replicas of a proxy) closed-loop users
//! are dealt to them in turn and each open-loop arrival picks one uniformly.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::dist::Dist;
use crate::openai::Api;
use crate::report::{build_report, Report};
use crate::rng::Rng;
use crate::server::SERVED_BY;
use crate::workload::{system_key, text_key, Conversations, Prompt, Turn, WorkloadKind};

/// Where requests go: `http://host[:port][/base]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    /// Host to connect to (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `Host` header value.
    pub authority: String,
    /// Path prefix without a trailing slash ("" for none).
    pub base_path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("invalid URL '{url}': {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "unsupported scheme '{other}' in '{url}': only http:// is supported"
                ))
            }
            None => return Err(format!("URL '{url}' needs a scheme: http://host:port")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("URL '{url}' has no host"))?
            .clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(format!("URL '{url}' has no host"));
        }
        if uri.query().is_some() {
            return Err(format!("URL '{url}' must not have a query string"));
        }
        let port = authority.port_u16().unwrap_or(80);
        Ok(Target {
            url: url.to_string(),
            host,
            port,
            authority: authority.as_str().to_string(),
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }

    pub fn path(&self, api: Api) -> String {
        format!("{}{}", self.base_path, api.path())
    }

    /// Parses `--url`: one URL or a comma-separated list.
    pub fn parse_list(urls: &str) -> Result<Vec<Target>, String> {
        urls.split(',')
            .map(|u| {
                let u = u.trim();
                if u.is_empty() {
                    Err(format!("empty URL in '{urls}'"))
                } else {
                    Target::parse(u)
                }
            })
            .collect()
    }
}

impl Default for Target {
    fn default() -> Self {
        Target {
            url: "http://127.0.0.1:10000".into(),
            host: "127.0.0.1".into(),
            port: 10000,
            authority: "127.0.0.1:10000".into(),
            base_path: String::new(),
        }
    }
}

/// Everything a load run needs (see `model-load --help`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadConfig {
    /// At least one; closed-loop user `u` uses `targets[u % n]`, open-loop
    /// arrivals pick one uniformly.
    pub targets: Vec<Target>,
    pub api: Api,
    pub stream: bool,
    pub model: Option<String>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub users: usize,
    /// Open loop: Poisson arrivals at this many requests per second.
    pub rate: Option<f64>,
    /// Open loop: arrivals beyond this many outstanding requests are dropped.
    pub max_inflight: usize,
    pub think: Duration,
    /// Closed loop: think times are exponential with mean `think` (drawn from a stream of their
    /// own, so the requests do not change), and each user also thinks before its first request.
    pub think_exponential: bool,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub warmup: Duration,
    pub drain_timeout: Duration,
    pub seed: u64,
    pub max_tokens: Dist,
    /// Tokens of each (new) user message.
    pub prompt_tokens: Dist,
    pub workload: WorkloadKind,
    /// Shared-prefix workload: number of system prompts.
    pub prefix_groups: u64,
    /// Shared-prefix workload: tokens of each system prompt.
    pub system_prompt_tokens: u64,
    /// Shared-prefix workload: turns per conversation.
    pub turns: u32,
    /// Shared-prefix workload, open loop: conversations kept open.
    pub conversations: usize,
    /// Shared-prefix workload: share of new conversations in group 0 (0: uniform groups).
    pub hot_group_share: f64,
    /// Shared-prefix workload: a request header carrying the conversation's group (`g<N>`), the
    /// key a hashing balancer (Envoy's RING_HASH, MAGLEV) can route on.
    pub prefix_key_header: Option<String>,
    pub instances: Option<usize>,
    pub label: String,
    pub json: Option<PathBuf>,
    /// Write every request's measurements (warm-up included) as JSON lines.
    pub samples: Option<PathBuf>,
    pub quiet: bool,
    pub fail_on_errors: bool,
    pub threads: usize,
    /// Draw the progress line on stderr (the binary sets this from
    /// `--quiet` and whether stderr is a terminal).
    pub progress: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            targets: vec![Target::default()],
            api: Api::Chat,
            stream: false,
            model: Some("sim-model".into()),
            headers: Vec::new(),
            timeout: Duration::from_secs(300),
            users: 8,
            rate: None,
            max_inflight: 1024,
            think: Duration::ZERO,
            think_exponential: false,
            duration: Some(Duration::from_secs(10)),
            requests: None,
            warmup: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
            seed: 0,
            max_tokens: Dist::None,
            prompt_tokens: Dist::Fixed(128),
            workload: WorkloadKind::Unique,
            prefix_groups: 8,
            system_prompt_tokens: 2000,
            turns: 4,
            conversations: 32,
            hot_group_share: 0.0,
            prefix_key_header: None,
            instances: None,
            label: "run".into(),
            json: None,
            samples: None,
            quiet: false,
            fail_on_errors: false,
            threads: 1,
            progress: false,
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// TCP connect or HTTP handshake failed.
    Connect,
    /// No complete response within `--timeout` (or the drain deadline).
    Timeout,
    /// Non-2xx response.
    Status(u16),
    /// A 2xx stream that ended (EOF or reset) without `data: [DONE]`.
    StreamIncomplete,
    /// Sending the request or reading a non-stream body failed.
    Io,
    /// A 2xx non-stream body that is not JSON.
    InvalidResponse,
    /// Open loop only: the arrival found `--max-inflight` requests outstanding.
    Dropped,
}

impl ErrorKind {
    pub fn key(&self) -> String {
        match self {
            ErrorKind::Connect => "connect".into(),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Status(c) => format!("status_{c}"),
            ErrorKind::StreamIncomplete => "stream_incomplete".into(),
            ErrorKind::Io => "io".into(),
            ErrorKind::InvalidResponse => "invalid_response".into(),
            ErrorKind::Dropped => "dropped".into(),
        }
    }
}

/// Classifies a response that was read to its end: non-2xx → `status_<code>`;
/// a 2xx stream without `[DONE]` → `stream_incomplete`; otherwise success.
pub fn classify(status: u16, stream: bool, saw_done: bool) -> Option<ErrorKind> {
    if !(200..300).contains(&status) {
        Some(ErrorKind::Status(status))
    } else if stream && !saw_done {
        Some(ErrorKind::StreamIncomplete)
    } else {
        None
    }
}

/// Milliseconds, rounded to the microsecond.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One request's measurements. Times are offsets from the start of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub start: Duration,
    pub end: Duration,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub tokens: u64,
    pub status: Option<u16>,
    pub backend: Option<String>,
    pub error: Option<ErrorKind>,
    /// Started before the warm-up ended: excluded from statistics.
    pub warmup: bool,
    /// What was asked: prompt length in tokens and `max_tokens` (None: server decides).
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    /// Shared-prefix workload: the conversation's group.
    pub group: Option<u64>,
}

/// Incremental parser for an OpenAI SSE stream.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Saw `data: [DONE]`.
    pub done: bool,
    /// Data events whose choices carry non-empty text / delta content.
    pub content_chunks: u64,
    /// `usage.completion_tokens` from a usage chunk, when the server sent one.
    pub usage_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ChunkMsg {
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delta: Option<ChunkDelta>,
}

#[derive(Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl SseParser {
    /// Feeds received bytes; returns the number of new content chunks.
    pub fn feed(&mut self, data: &[u8]) -> u64 {
        self.buf.extend_from_slice(data);
        let buf = std::mem::take(&mut self.buf);
        let mut consumed = 0;
        let mut new = 0;
        while let Some(pos) = buf[consumed..].iter().position(|b| *b == b'\n') {
            let mut line = &buf[consumed..consumed + pos];
            consumed += pos + 1;
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            if let Some(rest) = line.strip_prefix(b"data:") {
                let payload = rest.strip_prefix(b" ").unwrap_or(rest);
                new += self.event(payload);
            }
        }
        self.buf = buf;
        self.buf.drain(..consumed);
        new
    }

    fn event(&mut self, payload: &[u8]) -> u64 {
        if payload.trim_ascii() == b"[DONE]" {
            self.done = true;
            return 0;
        }
        let Ok(msg) = serde_json::from_slice::<ChunkMsg>(payload) else {
            return 0;
        };
        if let Some(t) = msg.usage.and_then(|u| u.completion_tokens) {
            self.usage_tokens = Some(t);
        }
        let has_content = msg.choices.unwrap_or_default().iter().any(|c| {
            c.text.as_deref().is_some_and(|t| !t.is_empty())
                || c.delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .is_some_and(|t| !t.is_empty())
        });
        if has_content {
            self.content_chunks += 1;
            1
        } else {
            0
        }
    }

    /// Tokens received: the server's usage count when given, else content chunks.
    pub fn tokens(&self) -> u64 {
        self.usage_tokens.unwrap_or(self.content_chunks)
    }
}

/// Tokens in a non-stream response (`usage.completion_tokens`), if it is JSON.
pub fn non_stream_tokens(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    Some(v["usage"]["completion_tokens"].as_u64().unwrap_or(0))
}

/// One request of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSpec {
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
}

impl RequestSpec {
    pub fn draw(cfg: &LoadConfig, rng: &mut Rng) -> RequestSpec {
        let prompt_tokens = cfg.prompt_tokens.sample(rng).unwrap_or(1);
        let max_tokens = cfg.max_tokens.sample(rng);
        RequestSpec {
            prompt_tokens,
            max_tokens,
        }
    }
}

/// A request ready to send: what it asks and, in the shared-prefix
/// workload, the conversation it continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub prompt: Prompt,
    pub max_tokens: Option<u64>,
    pub conversation: Option<u64>,
    /// Shared-prefix workload: the conversation's group (its system prompt).
    pub group: Option<u64>,
}

impl Planned {
    /// Plans request `index` of key stream `stream`: `spec` sizes its new
    /// user message; shared-prefix requests take their conversation from
    /// `convs` (drawing from `rng` only when a new one starts).
    pub fn new(
        cfg: &LoadConfig,
        nonce: u64,
        spec: RequestSpec,
        stream: u64,
        index: u64,
        convs: &mut Conversations,
        rng: &mut Rng,
    ) -> Planned {
        let key = text_key(nonce, stream, index);
        let (prompt, conversation, group) = match cfg.workload {
            WorkloadKind::Unique => (
                Prompt::Unique {
                    key,
                    tokens: spec.prompt_tokens,
                },
                None,
                None,
            ),
            WorkloadKind::SharedPrefix => {
                let picked = convs.pick(rng);
                let prompt = Prompt::Conversation {
                    system_key: system_key(cfg.seed, picked.group),
                    system_tokens: cfg.system_prompt_tokens,
                    history: picked.history,
                    user_key: key,
                    user_tokens: spec.prompt_tokens,
                };
                (prompt, Some(picked.id), Some(picked.group))
            }
        };
        Planned {
            prompt,
            max_tokens: spec.max_tokens,
            conversation,
            group,
        }
    }

    /// Feeds the outcome back into the conversation (a no-op for unique prompts).
    pub fn settle(&self, convs: &mut Conversations, rec: &Record) {
        let (
            Some(id),
            Prompt::Conversation {
                user_key,
                user_tokens,
                ..
            },
        ) = (self.conversation, &self.prompt)
        else {
            return;
        };
        let turn = rec.error.is_none().then_some(Turn {
            user_key: *user_key,
            user_tokens: *user_tokens,
            answer_tokens: rec.tokens,
        });
        convs.finish(id, turn);
    }
}

/// The JSON request body for `plan`.
pub fn request_body(cfg: &LoadConfig, plan: &Planned) -> Bytes {
    let mut obj = Map::new();
    if let Some(m) = &cfg.model {
        obj.insert("model".into(), json!(m));
    }
    match cfg.api {
        Api::Chat => {
            let messages: Vec<Value> = plan
                .prompt
                .messages()
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect();
            obj.insert("messages".into(), Value::Array(messages))
        }
        Api::Completions => obj.insert("prompt".into(), json!(plan.prompt.text())),
    };
    if let Some(n) = plan.max_tokens {
        obj.insert("max_tokens".into(), json!(n));
    }
    obj.insert("stream".into(), json!(cfg.stream));
    if cfg.stream {
        obj.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Bytes::from(serde_json::to_vec(&Value::Object(obj)).unwrap_or_default())
}

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn connect(target: &Target) -> Result<Conn, ErrorKind> {
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|_| ErrorKind::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ErrorKind::Connect)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { sender, driver })
}

/// Live counters for the progress line.
#[derive(Debug, Default)]
pub struct Live {
    pub done: AtomicU64,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub inflight: AtomicU64,
}

struct Shared {
    cfg: LoadConfig,
    /// Request path per target.
    paths: Vec<String>,
    /// Keys the user messages of this run (see [`crate::workload`]).
    nonce: u64,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `--prefix-key-header`: the name of the header that carries the group.
    key_header: Option<HeaderName>,
    t0: Instant,
    measure_start: Instant,
    deadline: Option<Instant>,
    hard_stop: Option<Instant>,
    tickets: AtomicU64,
    live: Live,
}

#[derive(Default)]
struct Partial {
    status: Option<u16>,
    backend: Option<String>,
    ttft: Option<Duration>,
    tokens: u64,
}

impl Shared {
    async fn attempt(
        &self,
        conn: &mut Option<Conn>,
        target: usize,
        body: Bytes,
        key_header: Option<(HeaderName, HeaderValue)>,
        start: Instant,
        p: &mut Partial,
    ) -> Result<(), ErrorKind> {
        let (Some(t), Some(path)) = (self.cfg.targets.get(target), self.paths.get(target)) else {
            return Err(ErrorKind::Connect);
        };
        if conn.as_ref().is_some_and(|c| c.sender.is_closed()) {
            *conn = None;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => connect(t).await?,
        };
        if c.sender.ready().await.is_err() {
            // The idle keep-alive connection was closed by the peer: reconnect once.
            c = connect(t).await?;
            c.sender.ready().await.map_err(|_| ErrorKind::Connect)?;
        }
        let mut req = Request::post(path.as_str())
            .header(HOST, t.authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|_| ErrorKind::Io)?;
        // --header replaces a default of the same name (e.g. Host for Envoy
        // virtual hosts); repeating a name adds values.
        let mut replaced: Vec<&HeaderName> = Vec::new();
        for (k, v) in &self.headers {
            if replaced.contains(&k) {
                req.headers_mut().append(k.clone(), v.clone());
            } else {
                req.headers_mut().insert(k.clone(), v.clone());
                replaced.push(k);
            }
        }
        if let Some((k, v)) = key_header {
            req.headers_mut().insert(k, v);
        }
        let resp = c
            .sender
            .send_request(req)
            .await
            .map_err(|_| ErrorKind::Io)?;
        let status = resp.status().as_u16();
        p.status = Some(status);
        p.backend = resp
            .headers()
            .get(SERVED_BY)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let success = (200..300).contains(&status);
        let mut body = resp.into_body();
        if self.cfg.stream && success {
            let mut sse = SseParser::default();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    p.tokens = sse.tokens();
                    return Err(ErrorKind::StreamIncomplete);
                };
                if let Ok(data) = frame.into_data() {
                    if sse.feed(&data) > 0 && p.ttft.is_none() {
                        p.ttft = Some(start.elapsed());
                    }
                }
            }
            p.tokens = sse.tokens();
            let result = classify(status, true, sse.done);
            if result.is_none() {
                *conn = Some(c);
            }
            return result.map_or(Ok(()), Err);
        }
        let bytes = body.collect().await.map_err(|_| ErrorKind::Io)?.to_bytes();
        *conn = Some(c);
        if success {
            p.tokens = non_stream_tokens(&bytes).ok_or(ErrorKind::InvalidResponse)?;
        }
        classify(status, false, true).map_or(Ok(()), Err)
    }

    /// Sends one request and measures it. Never panics; always returns a record.
    async fn execute(&self, conn: &mut Option<Conn>, target: usize, plan: &Planned) -> Record {
        let body = request_body(&self.cfg, plan);
        let key_header = match (&self.key_header, plan.group) {
            (Some(name), Some(group)) => HeaderValue::from_str(&format!("g{group}"))
                .ok()
                .map(|v| (name.clone(), v)),
            _ => None,
        };
        let start = Instant::now();
        let warmup = start < self.measure_start;
        self.live.inflight.fetch_add(1, Ordering::Relaxed);
        let mut limit = start + self.cfg.timeout;
        if let Some(h) = self.hard_stop {
            limit = limit.min(h);
        }
        let mut p = Partial::default();
        let result = tokio::time::timeout_at(
            limit,
            self.attempt(conn, target, body, key_header, start, &mut p),
        )
        .await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(kind)) => Some(kind),
            Err(_) => Some(ErrorKind::Timeout),
        };
        if error.is_some_and(|e| !matches!(e, ErrorKind::Status(_))) {
            *conn = None;
        }
        let end = Instant::now();
        self.live.inflight.fetch_sub(1, Ordering::Relaxed);
        self.live.done.fetch_add(1, Ordering::Relaxed);
        if error.is_some() {
            self.live.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            self.live.ok.fetch_add(1, Ordering::Relaxed);
        }
        Record {
            start: start - self.t0,
            end: end - self.t0,
            latency_ms: millis(end - start),
            ttft_ms: p.ttft.map(millis),
            tokens: p.tokens,
            status: p.status,
            backend: p.backend,
            error,
            warmup,
            prompt_tokens: plan.prompt.tokens(),
            max_tokens: plan.max_tokens,
            group: plan.group,
        }
    }

    fn past_deadline(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Claims the right to start a measured request under `--requests N`.
    fn claim(&self, warmup: bool) -> bool {
        match self.cfg.requests {
            Some(n) if !warmup => self.tickets.fetch_add(1, Ordering::SeqCst) < n,
            _ => true,
        }
    }

    async fn sleep_bounded(&self, d: Duration) {
        let mut until = Instant::now() + d;
        if let Some(dl) = self.deadline {
            until = until.min(dl);
        }
        tokio::time::sleep_until(until).await;
    }
}

async fn user_loop(shared: Arc<Shared>, user: usize) -> Vec<Record> {
    let cfg = &shared.cfg;
    let mut rng = Rng::stream(cfg.seed, user as u64);
    let target = user % cfg.targets.len().max(1);
    // A user holds one conversation at a time.
    let mut convs =
        Conversations::new(1, cfg.turns, cfg.prefix_groups).with_hot_share(cfg.hot_group_share);
    let mut conn: Option<Conn> = None;
    let mut out = Vec::new();
    // Exponential think times come from a stream of their own: the requests stay the same.
    let mut thinking = Rng::stream(cfg.seed ^ THINK_SALT, user as u64);
    let think = |rng: &mut Rng| -> Duration {
        let mean = cfg.think.as_secs_f64();
        if cfg.think_exponential && mean > 0.0 {
            Duration::from_secs_f64(rng.exponential(1.0 / mean).min(3600.0))
        } else {
            cfg.think
        }
    };
    if cfg.think_exponential && !cfg.think.is_zero() {
        // Users start spread out, as if each had just finished thinking.
        shared.sleep_bounded(think(&mut thinking)).await;
    }
    for index in 0.. {
        let now = Instant::now();
        if shared.past_deadline(now) || !shared.claim(now < shared.measure_start) {
            break;
        }
        let spec = RequestSpec::draw(cfg, &mut rng);
        let plan = Planned::new(
            cfg,
            shared.nonce,
            spec,
            user as u64,
            index,
            &mut convs,
            &mut rng,
        );
        let rec = shared.execute(&mut conn, target, &plan).await;
        plan.settle(&mut convs, &rec);
        let connect_failed = rec.error == Some(ErrorKind::Connect);
        out.push(rec);
        if connect_failed {
            // Nothing listens: do not spin.
            shared.sleep_bounded(Duration::from_millis(50)).await;
        }
        if !cfg.think.is_zero() {
            shared.sleep_bounded(think(&mut thinking)).await;
        }
    }
    out
}

/// Separate RNG streams for open-loop arrivals, request contents and URL
/// choice, far from the per-user streams (0, 1, 2, ...).
const ARRIVAL_STREAM: u64 = u64::MAX;
const OPEN_REQUEST_STREAM: u64 = u64::MAX - 1;
const URL_STREAM: u64 = u64::MAX - 2;
/// Mixed into the seed for the closed-loop users' exponential think times.
const THINK_SALT: u64 = 0x7417_4b00_0000_0001;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn open_loop(shared: Arc<Shared>, rate: f64) -> Vec<Record> {
    let cfg = &shared.cfg;
    let mut arrivals = Rng::stream(cfg.seed, ARRIVAL_STREAM);
    let mut contents = Rng::stream(cfg.seed, OPEN_REQUEST_STREAM);
    let mut urls = Rng::stream(cfg.seed, URL_STREAM);
    let n_targets = cfg.targets.len().max(1);
    let pools: Arc<Vec<Mutex<Vec<Conn>>>> =
        Arc::new((0..n_targets).map(|_| Mutex::new(Vec::new())).collect());
    let convs = Arc::new(Mutex::new(
        Conversations::new(cfg.conversations, cfg.turns, cfg.prefix_groups)
            .with_hot_share(cfg.hot_group_share),
    ));
    let mut tasks: JoinSet<Record> = JoinSet::new();
    let mut out = Vec::new();
    let mut next = shared.t0;
    for index in 0.. {
        next += Duration::from_secs_f64(arrivals.exponential(rate).min(1e6));
        if shared.past_deadline(next) {
            break;
        }
        tokio::time::sleep_until(next).await;
        while let Some(done) = tasks.try_join_next() {
            if let Ok(r) = done {
                out.push(r);
            }
        }
        if !shared.claim(next < shared.measure_start) {
            break;
        }
        let spec = RequestSpec::draw(cfg, &mut contents);
        let plan = Planned::new(
            cfg,
            shared.nonce,
            spec,
            OPEN_REQUEST_STREAM,
            index,
            &mut lock(&convs),
            &mut contents,
        );
        let target = if n_targets > 1 {
            urls.range_inclusive(0, n_targets as u64 - 1) as usize
        } else {
            0
        };
        if shared.live.inflight.load(Ordering::Relaxed) >= cfg.max_inflight as u64 {
            if let Some(id) = plan.conversation {
                lock(&convs).release(id);
            }
            let at = Instant::now() - shared.t0;
            shared.live.done.fetch_add(1, Ordering::Relaxed);
            shared.live.errors.fetch_add(1, Ordering::Relaxed);
            out.push(Record {
                start: at,
                end: at,
                latency_ms: 0.0,
                ttft_ms: None,
                tokens: 0,
                status: None,
                backend: None,
                error: Some(ErrorKind::Dropped),
                warmup: next < shared.measure_start,
                prompt_tokens: plan.prompt.tokens(),
                max_tokens: plan.max_tokens,
                group: plan.group,
            });
            continue;
        }
        let shared = Arc::clone(&shared);
        let pools = Arc::clone(&pools);
        let convs = Arc::clone(&convs);
        tasks.spawn(async move {
            let pool = &pools[target];
            let mut conn = lock(pool).pop();
            let rec = shared.execute(&mut conn, target, &plan).await;
            if let Some(c) = conn {
                lock(pool).push(c);
            }
            plan.settle(&mut lock(&convs), &rec);
            rec
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(r) = done {
            out.push(r);
        }
    }
    out
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub report: Report,
    /// Every record, warm-up included, in no particular order.
    pub records: Vec<Record>,
    /// Failed requests, warm-up included (for `--fail-on-errors`).
    pub total_errors: u64,
}

fn progress_line(shared: &Shared) -> String {
    let el = shared.t0.elapsed().as_secs_f64();
    let total = shared
        .cfg
        .duration
        .map(|d| format!("/{:.1}s", (d + shared.cfg.warmup).as_secs_f64()))
        .unwrap_or_default();
    let l = &shared.live;
    let done = l.done.load(Ordering::Relaxed);
    let phase = if Instant::now() < shared.measure_start {
        " warmup"
    } else if shared.past_deadline(Instant::now()) {
        " draining"
    } else {
        ""
    };
    format!(
        "\r\x1b[2K[{}] {el:.1}s{total}{phase}  done {done}  ok {}  err {}  in-flight {}  {:.1} req/s",
        shared.cfg.label,
        l.ok.load(Ordering::Relaxed),
        l.errors.load(Ordering::Relaxed),
        l.inflight.load(Ordering::Relaxed),
        if el > 0.0 { done as f64 / el } else { 0.0 },
    )
}

/// A number that differs between runs, so that prompt texts do too.
fn run_nonce() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    crate::rng::SplitMix64::new(nanos ^ (u64::from(std::process::id()) << 32)).next_u64()
}

/// Runs the configured load and builds the report.
pub async fn run(cfg: LoadConfig) -> Result<RunOutput, String> {
    if cfg.users == 0 && cfg.rate.is_none() {
        return Err("--users must be at least 1".into());
    }
    if cfg.targets.is_empty() {
        return Err("--url: at least one URL is needed".into());
    }
    let mut headers = Vec::new();
    for (k, v) in &cfg.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("--header: invalid name '{k}'"))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("--header: invalid value for '{k}'"))?;
        headers.push((name, value));
    }
    let key_header = match &cfg.prefix_key_header {
        Some(k) => Some(
            HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("--prefix-key-header: invalid name '{k}'"))?,
        ),
        None => None,
    };
    let t0 = Instant::now();
    let measure_start = t0 + cfg.warmup;
    let deadline = cfg.duration.map(|d| measure_start + d);
    let hard_stop = deadline.map(|d| d + cfg.drain_timeout);
    let shared = Arc::new(Shared {
        paths: cfg.targets.iter().map(|t| t.path(cfg.api)).collect(),
        nonce: run_nonce(),
        cfg,
        headers,
        key_header,
        t0,
        measure_start,
        deadline,
        hard_stop,
        tickets: AtomicU64::new(0),
        live: Live::default(),
    });

    let progress = if shared.cfg.progress {
        let s = Arc::clone(&shared);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let line = progress_line(&s);
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(line.as_bytes());
                let _ = err.flush();
            }
        }))
    } else {
        None
    };

    let mut records = Vec::new();
    if let Some(rate) = shared.cfg.rate {
        records = open_loop(Arc::clone(&shared), rate).await;
    } else {
        let mut set = JoinSet::new();
        for u in 0..shared.cfg.users {
            set.spawn(user_loop(Arc::clone(&shared), u));
        }
        while let Some(done) = set.join_next().await {
            if let Ok(mut r) = done {
                records.append(&mut r);
            }
        }
    }

    if let Some(p) = progress {
        p.abort();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"\r\x1b[2K");
        let _ = err.flush();
    }

    let warmup = shared.cfg.warmup;
    let measured_end = records
        .iter()
        .filter(|r| !r.warmup)
        .map(|r| r.end)
        .max()
        .unwrap_or(warmup);
    let window_end = match (shared.cfg.duration, shared.cfg.requests) {
        (Some(d), None) => warmup + d,
        (Some(d), Some(_)) => measured_end.min(warmup + d),
        (None, _) => measured_end,
    };
    let total_errors = records.iter().filter(|r| r.error.is_some()).count() as u64;
    let report = build_report(&shared.cfg, &records, warmup, window_end);
    Ok(RunOutput {
        report,
        records,
        total_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parsing() {
        let t = Target::parse("http://127.0.0.1:10000").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.base_path.as_str()),
            ("127.0.0.1", 10000, "")
        );
        assert_eq!(t.path(Api::Chat), "/v1/chat/completions");
        let t = Target::parse("http://localhost/prefix/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("localhost", 80));
        assert_eq!(t.path(Api::Completions), "/prefix/v1/completions");
        let t = Target::parse("http://[::1]:8000").unwrap();
        assert_eq!(
            (t.host.as_str(), t.authority.as_str()),
            ("::1", "[::1]:8000")
        );
        assert!(Target::parse("https://x:1").is_err());
        assert!(Target::parse("127.0.0.1:80").is_err());
        assert!(Target::parse("http://x:1/?q=1").is_err());
        assert!(Target::parse("not a url").is_err());
    }

    #[test]
    fn error_classification() {
        assert_eq!(classify(200, false, false), None);
        assert_eq!(classify(200, true, true), None);
        assert_eq!(
            classify(200, true, false),
            Some(ErrorKind::StreamIncomplete)
        );
        assert_eq!(classify(503, true, false), Some(ErrorKind::Status(503)));
        assert_eq!(classify(429, false, true), Some(ErrorKind::Status(429)));
        assert_eq!(classify(302, false, true), Some(ErrorKind::Status(302)));
        assert_eq!(ErrorKind::Status(503).key(), "status_503");
        assert_eq!(ErrorKind::Connect.key(), "connect");
        assert_eq!(ErrorKind::Timeout.key(), "timeout");
        assert_eq!(ErrorKind::StreamIncomplete.key(), "stream_incomplete");
        assert_eq!(ErrorKind::Io.key(), "io");
    }

    #[test]
    fn sse_parsing_split_anywhere() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" a\"}}]}\n\n",
            ": comment\r\n\r\n",
            "data:{\"choices\":[{\"index\":0,\"text\":\" b\"}]}\r\n\r\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":7}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for split in [1, 2, 7, 30, stream.len()] {
            let mut p = SseParser::default();
            let mut firsts = Vec::new();
            for piece in stream.chunks(split) {
                firsts.push(p.feed(piece));
            }
            assert!(p.done, "split {split}");
            assert_eq!(p.content_chunks, 2);
            assert_eq!(p.usage_tokens, Some(7));
            assert_eq!(p.tokens(), 7);
            assert_eq!(firsts.iter().sum::<u64>(), 2);
        }
        let mut p = SseParser::default();
        p.feed(b"data: {\"choices\":[{\"text\":\"x\"}]}\n\ndata: garbage\n\n");
        assert!(!p.done);
        assert_eq!(p.tokens(), 1);
    }

    #[test]
    fn non_stream_token_count() {
        assert_eq!(
            non_stream_tokens(br#"{"usage":{"completion_tokens":12}}"#),
            Some(12)
        );
        assert_eq!(non_stream_tokens(br#"{"choices":[]}"#), Some(0));
        assert_eq!(non_stream_tokens(b"<html>"), None);
    }

    #[test]
    fn workload_is_reproducible_per_user() {
        let cfg = LoadConfig {
            max_tokens: "lognormal:100:1".parse().unwrap(),
            prompt_tokens: "uniform:10:500".parse().unwrap(),
            ..LoadConfig::default()
        };
        let draw = |user: u64| {
            let mut rng = Rng::stream(cfg.seed, user);
            (0..20)
                .map(|_| RequestSpec::draw(&cfg, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
        assert!(draw(3)
            .iter()
            .all(|s| (10..=500).contains(&s.prompt_tokens) && s.max_tokens.is_some()));
    }

    fn plan(cfg: &LoadConfig, spec: RequestSpec, index: u64, convs: &mut Conversations) -> Planned {
        Planned::new(cfg, 7, spec, 0, index, convs, &mut Rng::new(index))
    }

    #[test]
    fn request_bodies() {
        let mut cfg = LoadConfig {
            stream: true,
            ..LoadConfig::default()
        };
        let mut convs = Conversations::new(1, 4, 8);
        let spec = RequestSpec {
            prompt_tokens: 5,
            max_tokens: Some(9),
        };
        let p = plan(&cfg, spec, 0, &mut convs);
        assert_eq!((p.prompt.tokens(), p.conversation), (5, None));
        let v: Value = serde_json::from_slice(&request_body(&cfg, &p)).unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 1);
        assert_eq!(v["messages"][0]["role"], "user");
        let text = v["messages"][0]["content"].as_str().unwrap().to_string();
        assert_eq!(text.len(), 20);
        assert_eq!(v["max_tokens"], 9);
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "sim-model");
        // The next request's text differs.
        let v: Value =
            serde_json::from_slice(&request_body(&cfg, &plan(&cfg, spec, 1, &mut convs))).unwrap();
        assert_ne!(v["messages"][0]["content"].as_str().unwrap(), text);
        cfg.api = Api::Completions;
        cfg.stream = false;
        cfg.model = None;
        let spec = RequestSpec {
            prompt_tokens: 3,
            max_tokens: None,
        };
        let v: Value =
            serde_json::from_slice(&request_body(&cfg, &plan(&cfg, spec, 2, &mut convs))).unwrap();
        assert_eq!(v["prompt"].as_str().unwrap().len(), 12);
        assert!(v.get("max_tokens").is_none() && v.get("model").is_none());
        assert!(v.get("stream_options").is_none());
    }

    #[test]
    fn shared_prefix_requests_carry_the_conversation() {
        let cfg = LoadConfig {
            workload: WorkloadKind::SharedPrefix,
            system_prompt_tokens: 50,
            turns: 2,
            ..LoadConfig::default()
        };
        let mut convs = Conversations::new(1, cfg.turns, cfg.prefix_groups);
        let spec = RequestSpec {
            prompt_tokens: 10,
            max_tokens: Some(4),
        };
        let first = plan(&cfg, spec, 0, &mut convs);
        assert_eq!(first.prompt.tokens(), 60);
        let v: Value = serde_json::from_slice(&request_body(&cfg, &first)).unwrap();
        let roles: Vec<&str> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user"]);
        assert_eq!(v["messages"][0]["content"].as_str().unwrap().len(), 200);
        let ok = |tokens| Record {
            start: Duration::ZERO,
            end: Duration::ZERO,
            latency_ms: 0.0,
            ttft_ms: None,
            tokens,
            status: Some(200),
            backend: None,
            error: None,
            warmup: false,
            prompt_tokens: 0,
            max_tokens: None,
            group: None,
        };
        first.settle(&mut convs, &ok(4));
        let second = plan(&cfg, spec, 1, &mut convs);
        assert_eq!(second.conversation, first.conversation);
        assert_eq!(second.prompt.tokens(), 60 + 4 + 10);
        let v: Value = serde_json::from_slice(&request_body(&cfg, &second)).unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 4);
        assert_eq!(v["messages"][2]["role"], "assistant");
        second.settle(&mut convs, &ok(4));
        // Two turns: the next request starts over.
        let third = plan(&cfg, spec, 2, &mut convs);
        assert_ne!(third.conversation, first.conversation);
        assert_eq!(third.prompt.tokens(), 60);
        // A failure abandons the conversation.
        third.settle(
            &mut convs,
            &Record {
                error: Some(ErrorKind::Status(503)),
                ..ok(0)
            },
        );
        assert_eq!(convs.open(), 0);
    }
}
