//! Command-line parsing for both binaries (hand-rolled on `lexopt`). Every
//! error names the flag it is about.

use std::ffi::OsString;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lexopt::prelude::*;

use crate::dist::Dist;
use crate::load::{LoadConfig, Target};
use crate::openai::Api;
use crate::server::ServerConfig;
use crate::workload::WorkloadKind;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed<T> {
    Run(T),
    Help,
    Version,
}

/// A command-line error; the message names the offending flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<lexopt::Error> for CliError {
    fn from(e: lexopt::Error) -> Self {
        CliError(e.to_string())
    }
}

fn raw(p: &mut lexopt::Parser, flag: &str) -> Result<String, CliError> {
    let v = p
        .value()
        .map_err(|_| CliError(format!("--{flag}: missing value")))?;
    v.into_string()
        .map_err(|v| CliError(format!("--{flag}: value {v:?} is not valid UTF-8")))
}

fn num<T: FromStr>(p: &mut lexopt::Parser, flag: &str, what: &str) -> Result<T, CliError> {
    let s = raw(p, flag)?;
    s.trim()
        .parse()
        .map_err(|_| CliError(format!("--{flag}: invalid value '{s}' (expected {what})")))
}

fn float(
    p: &mut lexopt::Parser,
    flag: &str,
    min: f64,
    min_inclusive: bool,
) -> Result<f64, CliError> {
    let v: f64 = num(p, flag, "a number")?;
    let ok = v.is_finite() && if min_inclusive { v >= min } else { v > min };
    if !ok {
        let rel = if min_inclusive { ">=" } else { ">" };
        return Err(CliError(format!(
            "--{flag}: {v} is out of range (must be {rel} {min})"
        )));
    }
    Ok(v)
}

fn int_min<T: FromStr + PartialOrd + fmt::Display + Copy>(
    p: &mut lexopt::Parser,
    flag: &str,
    min: T,
) -> Result<T, CliError> {
    let v: T = num(p, flag, &format!("an integer >= {min}"))?;
    if v < min {
        return Err(CliError(format!(
            "--{flag}: {v} is out of range (must be >= {min})"
        )));
    }
    Ok(v)
}

fn secs(p: &mut lexopt::Parser, flag: &str, allow_zero: bool) -> Result<Duration, CliError> {
    let v = float(p, flag, 0.0, allow_zero)?;
    Duration::try_from_secs_f64(v)
        .map_err(|_| CliError(format!("--{flag}: {v} seconds is out of range")))
}

fn unknown(arg: lexopt::Arg<'_>) -> CliError {
    match arg {
        Long(f) => CliError(format!("unknown option '--{f}' (see --help)")),
        Short(c) => CliError(format!("unknown option '-{c}' (see --help)")),
        Value(v) => CliError(format!("unexpected argument {v:?} (see --help)")),
    }
}

/// `model-server --help`.
pub fn server_help() -> String {
    let d = ServerConfig::default();
    let e = &d.engine;
    format!(
        "model-server {ver}: a simulated OpenAI-compatible continuous-batching LLM server.

Endpoints: POST /v1/completions, POST /v1/chat/completions (\"stream\": true for SSE),
GET /v1/models, GET /health, GET /load ({{\"server_load\": running + waiting}}),
GET /metrics (Prometheus, vLLM metric names). Every response carries
`x-served-by: <id>`. A request with `endpoint-load-metrics-format: text` (or json)
gets an ORCA `endpoint-load-metrics` header on non-streaming responses. After
binding, prints one line `listening on <ip:port>` to stdout. Exits on SIGTERM/SIGINT.

Timing model (every duration is multiplied by --time-scale):
  time per output token with b requests decoding: t(b) = tpot * (1 + alpha * (b - 1))
  prefill time: prefill_base + uncached_tokens * prefill_per_token
    prompt tokens = 4-character chunks of the prompt (chat: \"role: content\\n\" per message);
    uncached = prompt tokens minus the longest cached prefix (16-token blocks, LRU)
  output length: max_tokens when given, else lognormal(median, sigma) capped at --max-output-tokens

Usage: model-server [OPTIONS]

Options:
  --listen ADDR               Address to bind (ip:port; port 0 picks a free one) [default: {listen}]
  --id NAME                   Value of the x-served-by header [default: the bound ip:port]
  --model NAME                Model name reported when a request names none [default: {model}]
  --max-batch N               Requests running (prefill + decode) at once; the rest queue FIFO [default: {mb}]
  --max-queue N               Requests allowed to wait for a slot; beyond that reply 429 [default: {mq}]
  --tpot-ms F                 Time per output token with one request decoding, ms [default: {tpot}]
  --batch-alpha F             Per-token slowdown per extra decoding request (alpha) [default: {alpha}]
  --prefill-base-ms F         Fixed prefill cost, ms [default: {pb}]
  --prefill-per-token-ms F    Prefill cost per prompt token, ms [default: {ppt}]
  --output-median-tokens N    Median output length when max_tokens is absent [default: {med}]
  --output-sigma F            Sigma of the lognormal output length [default: {sigma}]
  --max-output-tokens N       Cap on output length; larger max_tokens get 400 [default: {mot}]
  --tokens-per-chunk N        Tokens per SSE chunk (raise when tokens are very fast) [default: {tpc}]
  --kv-cache-tokens N         KV-cache capacity in tokens, for vllm:kv_cache_usage_perc [default: {kv}]
  --prefix-cache-tokens N     Prefix-cache capacity in tokens (LRU of 16-token blocks; 0 disables;
                              at most --kv-cache-tokens) [default: {pc}, or --kv-cache-tokens if less]
  --time-scale F              Multiplies every simulated duration (0.1 = 10x faster) [default: {ts:?}]
  --seed N                    Seed for output lengths and fault injection [default: {seed}]
  --fail-rate F               Probability of replying at once with --fail-status (0..1) [default: {fr}]
  --fail-status CODE          Status of injected faults (400..599) [default: {fs}]
  --threads N                 Tokio worker threads [default: {threads}]
  -h, --help                  Print this help
  -V, --version               Print the version
",
        ver = env!("CARGO_PKG_VERSION"),
        listen = d.listen,
        model = d.model,
        mb = e.max_batch,
        mq = e.max_queue,
        tpot = e.timing.tpot_ms,
        alpha = e.timing.batch_alpha,
        pb = e.timing.prefill_base_ms,
        ppt = e.timing.prefill_per_token_ms,
        med = e.output.median,
        sigma = e.output.sigma,
        mot = e.output.max,
        tpc = e.tokens_per_chunk,
        kv = e.kv_cache_tokens,
        pc = e.prefix_cache_tokens,
        ts = e.timing.time_scale,
        seed = e.seed,
        fr = d.fail_rate,
        fs = d.fail_status,
        threads = d.threads,
    )
}

/// Parses `model-server` arguments (without the program name).
pub fn parse_server_args<I>(args: I) -> Result<Parsed<ServerConfig>, CliError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut c = ServerConfig::default();
    let mut prefix_set = false;
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            Long("listen") => c.listen = raw(&mut p, "listen")?,
            Long("id") => {
                let id = raw(&mut p, "id")?;
                if id.is_empty() || hyper::header::HeaderValue::from_str(&id).is_err() {
                    return Err(CliError(format!(
                        "--id: '{id}' is not a valid header value"
                    )));
                }
                c.id = Some(id);
            }
            Long("model") => c.model = raw(&mut p, "model")?,
            Long("max-batch") => c.engine.max_batch = int_min(&mut p, "max-batch", 1usize)?,
            Long("max-queue") => c.engine.max_queue = int_min(&mut p, "max-queue", 0usize)?,
            Long("tpot-ms") => c.engine.timing.tpot_ms = float(&mut p, "tpot-ms", 0.0, true)?,
            Long("batch-alpha") => {
                c.engine.timing.batch_alpha = float(&mut p, "batch-alpha", 0.0, true)?
            }
            Long("prefill-base-ms") => {
                c.engine.timing.prefill_base_ms = float(&mut p, "prefill-base-ms", 0.0, true)?
            }
            Long("prefill-per-token-ms") => {
                c.engine.timing.prefill_per_token_ms =
                    float(&mut p, "prefill-per-token-ms", 0.0, true)?
            }
            Long("output-median-tokens") => {
                c.engine.output.median = int_min(&mut p, "output-median-tokens", 1u64)? as f64
            }
            Long("output-sigma") => {
                c.engine.output.sigma = float(&mut p, "output-sigma", 0.0, true)?
            }
            Long("max-output-tokens") => {
                c.engine.output.max = int_min(&mut p, "max-output-tokens", 1u64)?
            }
            Long("tokens-per-chunk") => {
                c.engine.tokens_per_chunk = int_min(&mut p, "tokens-per-chunk", 1u64)?
            }
            Long("kv-cache-tokens") => {
                c.engine.kv_cache_tokens = int_min(&mut p, "kv-cache-tokens", 1u64)?
            }
            Long("prefix-cache-tokens") => {
                c.engine.prefix_cache_tokens = int_min(&mut p, "prefix-cache-tokens", 0u64)?;
                prefix_set = true;
            }
            Long("time-scale") => {
                c.engine.timing.time_scale = float(&mut p, "time-scale", 0.0, false)?
            }
            Long("seed") => c.engine.seed = num(&mut p, "seed", "an unsigned integer")?,
            Long("fail-rate") => {
                let v = float(&mut p, "fail-rate", 0.0, true)?;
                if v > 1.0 {
                    return Err(CliError(format!(
                        "--fail-rate: {v} is out of range (must be in 0..1)"
                    )));
                }
                c.fail_rate = v;
            }
            Long("fail-status") => {
                let v: u16 = num(&mut p, "fail-status", "an HTTP status code")?;
                if !(400..=599).contains(&v) {
                    return Err(CliError(format!(
                        "--fail-status: {v} is out of range (must be 400..599)"
                    )));
                }
                c.fail_status = v;
            }
            Long("threads") => c.threads = int_min(&mut p, "threads", 1usize)?,
            other => return Err(unknown(other)),
        }
    }
    // The prefix cache lives in the KV cache: a small --kv-cache-tokens shrinks
    // the default cache, an explicit larger one is a mistake.
    if !prefix_set {
        c.engine.prefix_cache_tokens = c.engine.prefix_cache_tokens.min(c.engine.kv_cache_tokens);
    }
    if c.engine.prefix_cache_tokens > c.engine.kv_cache_tokens {
        return Err(CliError(format!(
            "--prefix-cache-tokens: {} exceeds --kv-cache-tokens {} (cached blocks live in the KV cache)",
            c.engine.prefix_cache_tokens, c.engine.kv_cache_tokens
        )));
    }
    Ok(Parsed::Run(c))
}

/// `model-load --help`.
pub fn load_help() -> String {
    let d = LoadConfig::default();
    format!(
        "model-load {ver}: a load generator for OpenAI-compatible endpoints.

Closed loop (default): --users N users each send a request, read the whole
response (the SSE stream to [DONE]), think --think-ms, repeat; each user has
its own HTTP/1.1 keep-alive connection. Open loop: --rate R Poisson arrivals.
With several URLs, users are dealt to them in turn (user u gets URL u mod n)
and each open-loop arrival picks one uniformly at random.
Runs for --duration SECS (after --warmup) or until --requests N measured
requests have been sent, whichever comes first; in-flight requests are then
awaited up to --drain-timeout. Prints a table on stdout; --json FILE writes
the report as JSON. Percentiles use the nearest-rank method.

Usage: model-load [OPTIONS]

Target:
  --url URL[,URL...]      Base URL, http only; repeatable or comma-separated [default: {url}]
  --api API               chat or completions [default: chat]
  --stream                Request SSE streaming (\"stream\": true) [default: off]
  --model NAME            \"model\" field of requests; '' omits it [default: {model}]
  --header 'NAME: VALUE'  Extra request header (repeatable)
  --timeout SECS          Per-request timeout (send to last byte) [default: {timeout}]

Load:
  --users N               Closed-loop concurrent users [default: {users}]
  --rate R                Open loop: Poisson arrivals, requests/s (excludes --users) [default: off]
  --max-inflight N        Open loop: arrivals beyond N outstanding are dropped [default: {mif}]
  --think-ms F            Closed loop: pause between a user's requests, ms [default: 0]
  --think-exponential     Closed loop: think times exponential with mean --think-ms (and a first
                          think before each user's first request) [default: off, fixed]
  --duration SECS         Measured run time after the warm-up [default: {dur} unless --requests is given]
  --requests N            Stop after N measured requests [default: unlimited]
  --warmup SECS           Leading period whose requests are excluded from statistics [default: 0]
  --drain-timeout SECS    How long to await in-flight requests after --duration [default: {drain}]

Workload (reproducible: each user draws from its own stream of --seed):
  --seed N                Seed [default: 0]
  --max-tokens DIST       none (server decides), fixed:N, lognormal:MEDIAN:SIGMA[:MAX],
                          uniform:MIN:MAX [default: {mt}]
  --prompt-tokens DIST    Prompt length in tokens (4 chars each), same syntax but not none; in
                          shared-prefix, the length of each new user message [default: {pt}]
  --workload KIND         unique or shared-prefix (below) [default: unique]
  --prefix-groups G       shared-prefix: number of system prompts (groups) [default: {pg}]
  --system-prompt-tokens S
                          shared-prefix: tokens of each system prompt [default: {spt}]
  --turns N               shared-prefix: turns per conversation [default: {turns}]
  --conversations M       shared-prefix, open loop: conversations kept open [default: {convs}]
  --hot-group-share F     shared-prefix: share of conversations in group 0, the rest uniform
                          over the others (0.5: one group carries half) [default: 0, uniform]
  --prefix-key-header NAME
                          shared-prefix: send the group as header NAME: g<N> [default: none]

  unique: each request is one user message of text unique to it (and to the run),
  so no two prompts share a prefix beyond the chat template. shared-prefix: chat
  conversations; each is in one of G groups (drawn uniformly) whose system prompt
  of S tokens (the same for a given --seed) it shares; a turn sends the system prompt, the history (user messages
  and the answers received) and a new user message; after N turns (or a failed
  one) a new conversation starts. In closed loop each user holds one conversation;
  in open loop an arrival starts a conversation while fewer than M are open, else
  continues a random idle one (one more starts when none is idle).

Report:
  --instances K           Instances for per-instance throughput [default: distinct x-served-by seen]
  --label NAME            Name of the run [default: {label}]
  --json FILE             Write the report as JSON to FILE
  --samples FILE          Write every request (warm-up included) as JSON lines to FILE,
                          for pooling percentiles over several runs
  --quiet                 No progress line on stderr (it is also off when stderr is not a TTY)
  --fail-on-errors        Exit 1 if any request failed (warm-up included)
  --threads N             Tokio worker threads [default: {threads}]
  -h, --help              Print this help
  -V, --version           Print the version

Exit status: 0 when the run completed (even with request errors), 1 with
--fail-on-errors and errors or when the report cannot be written, 2 on bad
arguments.
",
        ver = env!("CARGO_PKG_VERSION"),
        url = d.targets.iter().map(|t| t.url.as_str()).collect::<Vec<_>>().join(","),
        model = d.model.unwrap_or_default(),
        timeout = d.timeout.as_secs(),
        users = d.users,
        mif = d.max_inflight,
        dur = d.duration.map(|x| x.as_secs()).unwrap_or(0),
        drain = d.drain_timeout.as_secs(),
        mt = d.max_tokens,
        pt = d.prompt_tokens,
        pg = d.prefix_groups,
        spt = d.system_prompt_tokens,
        turns = d.turns,
        convs = d.conversations,
        label = d.label,
        threads = d.threads,
    )
}

fn dist(p: &mut lexopt::Parser, flag: &str) -> Result<Dist, CliError> {
    let s = raw(p, flag)?;
    s.parse().map_err(|e| CliError(format!("--{flag}: {e}")))
}

/// Parses `model-load` arguments (without the program name). `progress` is
/// left false: the binary decides it from `--quiet` and the terminal.
pub fn parse_load_args<I>(args: I) -> Result<Parsed<LoadConfig>, CliError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut c = LoadConfig {
        duration: None,
        ..LoadConfig::default()
    };
    let mut users_set = false;
    let mut urls_set = false;
    // Shared-prefix-only flags seen, to reject them with another workload.
    let mut prefix_flags: Vec<&str> = Vec::new();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            Long("url") => {
                let u = raw(&mut p, "url")?;
                let targets =
                    Target::parse_list(&u).map_err(|e| CliError(format!("--url: {e}")))?;
                if !urls_set {
                    c.targets.clear();
                    urls_set = true;
                }
                c.targets.extend(targets);
            }
            Long("api") => {
                c.api = match raw(&mut p, "api")?.as_str() {
                    "chat" => Api::Chat,
                    "completions" => Api::Completions,
                    other => {
                        return Err(CliError(format!(
                            "--api: invalid value '{other}' (expected chat or completions)"
                        )))
                    }
                }
            }
            Long("stream") => c.stream = true,
            Long("model") => {
                let m = raw(&mut p, "model")?;
                c.model = (!m.is_empty()).then_some(m);
            }
            Long("header") => {
                let h = raw(&mut p, "header")?;
                let Some((k, v)) = h.split_once(':') else {
                    return Err(CliError(format!("--header: '{h}' is not 'name: value'")));
                };
                let (k, v) = (k.trim(), v.trim());
                if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                    return Err(CliError(format!("--header: invalid header name '{k}'")));
                }
                if hyper::header::HeaderValue::from_str(v).is_err() {
                    return Err(CliError(format!("--header: invalid value for '{k}'")));
                }
                c.headers.push((k.to_string(), v.to_string()));
            }
            Long("timeout") => c.timeout = secs(&mut p, "timeout", false)?,
            Long("users") => {
                c.users = int_min(&mut p, "users", 1usize)?;
                users_set = true;
            }
            Long("rate") => c.rate = Some(float(&mut p, "rate", 0.0, false)?),
            Long("max-inflight") => c.max_inflight = int_min(&mut p, "max-inflight", 1usize)?,
            Long("think-exponential") => c.think_exponential = true,
            Long("think-ms") => {
                let ms = float(&mut p, "think-ms", 0.0, true)?;
                c.think = Duration::try_from_secs_f64(ms / 1000.0)
                    .map_err(|_| CliError(format!("--think-ms: {ms} is out of range")))?;
            }
            Long("duration") => c.duration = Some(secs(&mut p, "duration", false)?),
            Long("requests") => c.requests = Some(int_min(&mut p, "requests", 1u64)?),
            Long("warmup") => c.warmup = secs(&mut p, "warmup", true)?,
            Long("drain-timeout") => c.drain_timeout = secs(&mut p, "drain-timeout", true)?,
            Long("seed") => c.seed = num(&mut p, "seed", "an unsigned integer")?,
            Long("max-tokens") => c.max_tokens = dist(&mut p, "max-tokens")?,
            Long("prompt-tokens") => {
                let d = dist(&mut p, "prompt-tokens")?;
                if d.is_none() {
                    return Err(CliError("--prompt-tokens: 'none' is not allowed (a prompt needs at least one token)".into()));
                }
                c.prompt_tokens = d;
            }
            Long("workload") => {
                let w = raw(&mut p, "workload")?;
                c.workload = w
                    .parse()
                    .map_err(|e| CliError(format!("--workload: {e}")))?;
            }
            Long("prefix-groups") => {
                c.prefix_groups = int_min(&mut p, "prefix-groups", 1u64)?;
                prefix_flags.push("--prefix-groups");
            }
            Long("system-prompt-tokens") => {
                c.system_prompt_tokens = int_min(&mut p, "system-prompt-tokens", 1u64)?;
                prefix_flags.push("--system-prompt-tokens");
            }
            Long("turns") => {
                c.turns = int_min(&mut p, "turns", 1u32)?;
                prefix_flags.push("--turns");
            }
            Long("conversations") => {
                c.conversations = int_min(&mut p, "conversations", 1usize)?;
                prefix_flags.push("--conversations");
            }
            Long("hot-group-share") => {
                let v = float(&mut p, "hot-group-share", 0.0, true)?;
                if v > 1.0 {
                    return Err(CliError(format!(
                        "--hot-group-share: {v} is out of range (must be in 0..1)"
                    )));
                }
                c.hot_group_share = v;
                prefix_flags.push("--hot-group-share");
            }
            Long("prefix-key-header") => {
                let h = raw(&mut p, "prefix-key-header")?;
                if hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(CliError(format!(
                        "--prefix-key-header: invalid header name '{h}'"
                    )));
                }
                c.prefix_key_header = Some(h);
                prefix_flags.push("--prefix-key-header");
            }
            Long("instances") => c.instances = Some(int_min(&mut p, "instances", 1usize)?),
            Long("label") => c.label = raw(&mut p, "label")?,
            Long("json") => c.json = Some(raw(&mut p, "json")?.into()),
            Long("samples") => c.samples = Some(raw(&mut p, "samples")?.into()),
            Long("quiet") => c.quiet = true,
            Long("fail-on-errors") => c.fail_on_errors = true,
            Long("threads") => c.threads = int_min(&mut p, "threads", 1usize)?,
            other => return Err(unknown(other)),
        }
    }
    if users_set && c.rate.is_some() {
        return Err(CliError(
            "--rate: cannot be combined with --users (--rate runs an open loop; cap it with --max-inflight)".into(),
        ));
    }
    if let Some(flag) = prefix_flags.first() {
        if c.workload != WorkloadKind::SharedPrefix {
            return Err(CliError(format!(
                "{flag}: only with --workload shared-prefix"
            )));
        }
    }
    if c.think_exponential && c.rate.is_some() {
        return Err(CliError(
            "--think-exponential: only in closed loop (--users), not with --rate".into(),
        ));
    }
    if prefix_flags.contains(&"--conversations") && c.rate.is_none() {
        return Err(CliError(
            "--conversations: only with --rate (in closed loop each user holds one conversation)"
                .into(),
        ));
    }
    if c.duration.is_none() && c.requests.is_none() {
        c.duration = LoadConfig::default().duration;
    }
    Ok(Parsed::Run(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(args: &[&str]) -> Result<ServerConfig, CliError> {
        match parse_server_args(args.iter().copied())? {
            Parsed::Run(c) => Ok(c),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn load(args: &[&str]) -> Result<LoadConfig, CliError> {
        match parse_load_args(args.iter().copied())? {
            Parsed::Run(c) => Ok(c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn server_defaults() {
        let c = server(&[]).unwrap();
        assert_eq!(c, ServerConfig::default());
        assert_eq!(c.listen, "127.0.0.1:8000");
        assert_eq!(c.engine.max_batch, 8);
        assert_eq!(c.engine.timing.tpot_ms, 20.0);
        assert_eq!(c.engine.timing.batch_alpha, 0.15);
        assert_eq!(c.engine.timing.prefill_base_ms, 10.0);
        assert_eq!(c.engine.timing.prefill_per_token_ms, 0.1);
        assert_eq!(c.engine.output.median, 120.0);
        assert_eq!(c.engine.output.sigma, 0.8);
        assert_eq!(c.engine.output.max, 2048);
        assert_eq!(c.engine.tokens_per_chunk, 1);
        assert_eq!(c.engine.timing.time_scale, 1.0);
        assert_eq!(c.engine.seed, 0);
        assert_eq!(c.model, "sim-model");
        assert_eq!(c.engine.max_queue, 1024);
        assert_eq!(c.fail_rate, 0.0);
        assert_eq!(c.threads, 1);
        assert_eq!(c.engine.kv_cache_tokens, 65536);
        assert_eq!(c.engine.prefix_cache_tokens, 32768);
    }

    #[test]
    fn server_flags() {
        let c = server(&[
            "--listen=127.0.0.1:0",
            "--id",
            "b1",
            "--max-batch",
            "2",
            "--tpot-ms",
            "5.5",
            "--time-scale",
            "0.01",
            "--fail-rate",
            "0.5",
            "--fail-status",
            "500",
            "--max-queue",
            "0",
            "--tokens-per-chunk",
            "4",
            "--prefix-cache-tokens",
            "0",
            "--kv-cache-tokens",
            "1000",
        ])
        .unwrap();
        assert_eq!(c.engine.prefix_cache_tokens, 0);
        assert_eq!(c.engine.kv_cache_tokens, 1000);
        let small = server(&["--kv-cache-tokens", "1000"]).unwrap();
        assert_eq!(
            small.engine.prefix_cache_tokens, 1000,
            "default cache shrinks to fit"
        );
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.id.as_deref(), Some("b1"));
        assert_eq!(c.engine.max_batch, 2);
        assert_eq!(c.engine.timing.tpot_ms, 5.5);
        assert_eq!(c.engine.timing.time_scale, 0.01);
        assert_eq!((c.fail_rate, c.fail_status), (0.5, 500));
        assert_eq!(c.engine.max_queue, 0);
        assert_eq!(c.engine.tokens_per_chunk, 4);
        assert_eq!(parse_server_args(["--help"]).unwrap(), Parsed::Help);
        assert_eq!(parse_server_args(["-V"]).unwrap(), Parsed::Version);
    }

    #[test]
    fn server_errors_name_the_flag() {
        for (args, flag) in [
            (&["--max-batch", "0"][..], "--max-batch"),
            (&["--max-batch", "x"][..], "--max-batch"),
            (&["--time-scale", "0"][..], "--time-scale"),
            (&["--tpot-ms", "-1"][..], "--tpot-ms"),
            (&["--tpot-ms", "nan"][..], "--tpot-ms"),
            (&["--fail-rate", "1.5"][..], "--fail-rate"),
            (&["--fail-status", "200"][..], "--fail-status"),
            (&["--threads", "0"][..], "--threads"),
            (&["--seed"][..], "--seed"),
            (&["--bogus"][..], "--bogus"),
            (&["--id", "bad\nid"][..], "--id"),
            (&["--kv-cache-tokens", "0"][..], "--kv-cache-tokens"),
            (
                &["--prefix-cache-tokens", "-1"][..],
                "--prefix-cache-tokens",
            ),
            (
                &["--kv-cache-tokens", "1000", "--prefix-cache-tokens", "2000"][..],
                "--prefix-cache-tokens",
            ),
        ] {
            let e = server(args).unwrap_err();
            assert!(e.0.contains(flag), "{args:?}: {e}");
        }
        assert!(server(&["stray"]).is_err());
    }

    #[test]
    fn help_shows_every_default() {
        let h = server_help();
        for flag in [
            "--listen",
            "--id",
            "--max-batch",
            "--tpot-ms",
            "--batch-alpha",
            "--prefill-base-ms",
            "--prefill-per-token-ms",
            "--output-median-tokens",
            "--output-sigma",
            "--max-output-tokens",
            "--tokens-per-chunk",
            "--time-scale",
            "--seed",
            "--model",
            "--max-queue",
            "--fail-status",
            "--fail-rate",
            "--threads",
            "--kv-cache-tokens",
        ] {
            let line = h
                .lines()
                .find(|l| l.trim_start().starts_with(flag))
                .unwrap_or_default();
            assert!(line.contains("[default: "), "{flag}: {line}");
        }
        assert!(h.contains("[default: 127.0.0.1:8000]") && h.contains("[default: 1.0]"));
        let h = load_help();
        for flag in [
            "--url",
            "--api",
            "--stream",
            "--model",
            "--timeout",
            "--users",
            "--rate",
            "--think-ms",
            "--duration",
            "--requests",
            "--warmup",
            "--drain-timeout",
            "--seed",
            "--max-tokens",
            "--instances",
            "--label",
            "--threads",
            "--max-inflight",
            "--workload",
            "--prefix-groups",
            "--system-prompt-tokens",
            "--turns",
            "--conversations",
            "--hot-group-share",
            "--think-exponential",
            "--prefix-key-header",
        ] {
            let line = h
                .lines()
                .find(|l| l.trim_start().starts_with(flag))
                .unwrap_or_default();
            let next = h
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(flag))
                .nth(1)
                .unwrap_or_default();
            assert!(
                line.contains("[default: ") || next.contains("[default: "),
                "{flag}: {line}"
            );
        }
    }

    #[test]
    fn load_defaults_and_flags() {
        let c = load(&[]).unwrap();
        assert_eq!(c.duration, Some(Duration::from_secs(10)));
        assert_eq!(c.api, Api::Chat);
        assert!(!c.stream);
        assert_eq!(c.max_tokens, Dist::None);
        let c = load(&[
            "--url",
            "http://127.0.0.1:9/x",
            "--api",
            "completions",
            "--stream",
            "--header",
            "x-a: 1",
            "--header",
            "X-B:two words",
            "--users",
            "3",
            "--requests",
            "50",
            "--max-tokens",
            "fixed:7",
            "--prompt-tokens",
            "uniform:1:9",
            "--seed",
            "5",
            "--json",
            "/tmp/r.json",
            "--samples",
            "/tmp/r.jsonl",
            "--label",
            "lor",
            "--quiet",
            "--fail-on-errors",
            "--model",
            "",
            "--think-ms",
            "2.5",
            "--warmup",
            "0.5",
        ])
        .unwrap();
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.targets[0].port, 9);
        assert_eq!(c.api, Api::Completions);
        assert!(c.stream && c.quiet && c.fail_on_errors);
        assert_eq!(c.samples, Some(std::path::PathBuf::from("/tmp/r.jsonl")));
        assert_eq!(
            c.headers,
            vec![
                ("x-a".into(), "1".into()),
                ("X-B".into(), "two words".into())
            ]
        );
        assert_eq!((c.users, c.requests, c.duration), (3, Some(50), None));
        assert_eq!(c.max_tokens, Dist::Fixed(7));
        assert_eq!(c.model, None);
        assert_eq!(c.think, Duration::from_micros(2500));
        assert_eq!(c.warmup, Duration::from_millis(500));
        let c = load(&["--rate", "2.5", "--duration", "3"]).unwrap();
        assert_eq!(c.rate, Some(2.5));
        assert_eq!(c.duration, Some(Duration::from_secs(3)));
        assert_eq!(c.workload, WorkloadKind::Unique);
    }

    #[test]
    fn several_urls() {
        let c = load(&[]).unwrap();
        assert_eq!(c.targets, vec![Target::default()]);
        let c = load(&[
            "--url",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--url=http://127.0.0.1:3/p",
        ])
        .unwrap();
        let ports: Vec<u16> = c.targets.iter().map(|t| t.port).collect();
        assert_eq!(ports, [1, 2, 3]);
        assert_eq!(c.targets[2].base_path, "/p");
        for bad in ["http://a:1,,http://b:2", "http://a:1,https://b:2", ","] {
            let e = load(&["--url", bad]).unwrap_err();
            assert!(e.0.contains("--url"), "{bad}: {e}");
        }
    }

    #[test]
    fn shared_prefix_flags() {
        let c = load(&["--workload", "shared-prefix"]).unwrap();
        assert_eq!(c.workload, WorkloadKind::SharedPrefix);
        assert_eq!(
            (
                c.prefix_groups,
                c.system_prompt_tokens,
                c.turns,
                c.conversations
            ),
            (8, 2000, 4, 32)
        );
        let c = load(&[
            "--prefix-groups",
            "3",
            "--workload",
            "shared-prefix",
            "--system-prompt-tokens",
            "500",
            "--turns",
            "2",
            "--rate",
            "5",
            "--conversations",
            "10",
        ])
        .unwrap();
        assert_eq!(
            (
                c.prefix_groups,
                c.system_prompt_tokens,
                c.turns,
                c.conversations
            ),
            (3, 500, 2, 10)
        );
        let c = load(&[
            "--workload",
            "shared-prefix",
            "--hot-group-share",
            "0.5",
            "--prefix-key-header",
            "x-prefix-key",
            "--think-ms",
            "250",
            "--think-exponential",
        ])
        .unwrap();
        assert_eq!(c.hot_group_share, 0.5);
        assert_eq!(c.prefix_key_header.as_deref(), Some("x-prefix-key"));
        assert!(c.think_exponential);
        assert_eq!(c.think, Duration::from_millis(250));
        for (args, flag) in [
            (&["--workload", "shared"][..], "--workload"),
            (&["--turns", "3"][..], "--turns"),
            (
                &["--workload", "unique", "--prefix-groups", "2"][..],
                "--prefix-groups",
            ),
            (
                &["--workload", "shared-prefix", "--turns", "0"][..],
                "--turns",
            ),
            (
                &["--workload", "shared-prefix", "--system-prompt-tokens", "0"][..],
                "--system-prompt-tokens",
            ),
            (
                &["--workload", "shared-prefix", "--conversations", "4"][..],
                "--conversations",
            ),
            (&["--hot-group-share", "0.5"][..], "--hot-group-share"),
            (
                &["--workload", "shared-prefix", "--hot-group-share", "1.5"][..],
                "--hot-group-share",
            ),
            (
                &["--workload", "shared-prefix", "--prefix-key-header", "a b"][..],
                "--prefix-key-header",
            ),
            (
                &["--rate", "2", "--think-exponential", "--think-ms", "5"][..],
                "--think-exponential",
            ),
        ] {
            let e = load(args).unwrap_err();
            assert!(e.0.contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn load_errors_name_the_flag() {
        for (args, flag) in [
            (&["--url", "https://x"][..], "--url"),
            (&["--api", "embeddings"][..], "--api"),
            (&["--users", "0"][..], "--users"),
            (&["--rate", "0"][..], "--rate"),
            (&["--rate", "1", "--users", "2"][..], "--rate"),
            (&["--duration", "0"][..], "--duration"),
            (&["--duration", "abc"][..], "--duration"),
            (&["--max-tokens", "fixed:0"][..], "--max-tokens"),
            (&["--prompt-tokens", "none"][..], "--prompt-tokens"),
            (&["--header", "novalue"][..], "--header"),
            (&["--header", "bad name: v"][..], "--header"),
            (&["--requests", "0"][..], "--requests"),
            (&["--timeout", "0"][..], "--timeout"),
            (&["--instances", "0"][..], "--instances"),
            (&["--nope"][..], "--nope"),
        ] {
            let e = load(args).unwrap_err();
            assert!(e.0.contains(flag), "{args:?}: {e}");
        }
    }
}
