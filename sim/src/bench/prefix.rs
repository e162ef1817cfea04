//! The prefix benchmark (`model-bench prefix`, `make bench-prefix`): model-lb `PREFIX_AWARE`
//! against LOR, RANDOM, Envoy's `LEAST_REQUEST` and Envoy's consistent hashing (`RING_HASH`,
//! `MAGLEV` on a header that carries the conversation's group) on simulated servers with a
//! prefix cache, under three workloads:
//!
//! * **shared prefix**: multi-turn chat conversations, each under one of G system prompts long
//!   enough that the routing key (the first `prefix_length` characters) is the system prompt;
//! * **unique prompts** of the same size: nothing to reuse, so prefix routing can only lose
//!   (its load guard is what keeps it even with LOR);
//! * **one hot prefix**: the shared-prefix workload with one group carrying half of all
//!   conversations, to check that no server ever holds more than `concurrency_threshold` + 1
//!   requests while another has room.
//!
//! Everything here is pure: the plan, the load tool's flags, the servers' counters and the
//! load guard's check, the two replicas' agreement, pooling, the targets and the reports.
//! `model-bench` only starts and measures processes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;

use super::envoy::{Variant, PREFIX_KEY_HEADER};
use super::pool::{ratio, Run, Stats};
use super::procstat::Usage;
use super::render::{esc, nice_ticks, short, Machine};
use super::replicas::{Cpu, WaitCounts, BUSY_MACHINE, BUSY_PROCESS};
use super::{Policy, ServerParams};
use crate::report::Sample;
use crate::stats::{percentile_sorted, sorted};
use crate::workload::{system_key, text_key, words};

/// The three workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    SharedPrefix,
    Unique,
    HotPrefix,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Self::SharedPrefix, Self::Unique, Self::HotPrefix];

    pub fn id(self) -> &'static str {
        match self {
            Self::SharedPrefix => "shared",
            Self::Unique => "unique",
            Self::HotPrefix => "hot",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::SharedPrefix => "shared prefix",
            Self::Unique => "unique prompts",
            Self::HotPrefix => "one hot prefix",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.id() == id)
    }

    /// Whether the load tool sends conversations under shared system prompts.
    pub fn shared(self) -> bool {
        self != Self::Unique
    }
}

/// Every policy this benchmark knows, in report order.
pub const POLICIES: [Policy; 6] = [
    Policy::ModelLbPrefixAware,
    Policy::ModelLbLor,
    Policy::ModelLbRandom,
    Policy::LeastRequest,
    Policy::RingHash,
    Policy::Maglev,
];

/// Parses `--shared-policies mlb_prefix,mlb_lor`.
pub fn parse_policies(text: &str) -> Result<Vec<Policy>, String> {
    text.split(',')
        .map(|id| {
            POLICIES
                .into_iter()
                .find(|p| p.id() == id.trim())
                .ok_or_else(|| {
                    let all: Vec<&str> = POLICIES.iter().map(|p| p.id()).collect();
                    format!("unknown policy {id:?}; known: {}", all.join(", "))
                })
        })
        .collect()
}

/// One run of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub workload: Workload,
    pub policy: Policy,
    pub round: u32,
}

/// Everything that defines a prefix run.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixParams {
    pub workloads: Vec<Workload>,
    pub shared_policies: Vec<Policy>,
    pub unique_policies: Vec<Policy>,
    pub hot_policies: Vec<Policy>,
    pub servers: u32,
    pub server: ServerParams,
    /// The servers' prefix cache (`--prefix-cache-tokens`) and KV cache (`--kv-cache-tokens`).
    pub prefix_cache_tokens: u64,
    pub kv_cache_tokens: u64,
    /// PREFIX_AWARE's `prefix_length` (characters) and `concurrency_threshold`.
    pub prefix_length: u32,
    pub threshold: u32,
    /// Closed loop: users per server.
    pub users_per_server: u32,
    /// Mean think time between a user's requests before scaling (exponential), ms.
    pub think_ms: f64,
    pub groups: u64,
    pub system_prompt_tokens: u64,
    pub turns: u32,
    /// Each new user message (`--prompt-tokens` of the shared-prefix workload).
    pub user_tokens: String,
    /// The unique workload's prompts.
    pub unique_prompt_tokens: String,
    pub max_tokens: String,
    /// The hot workload: share of conversations in group 0.
    pub hot_share: f64,
    pub rounds: u32,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub seed: u64,
    /// Envoy `--concurrency`.
    pub envoy_concurrency: u32,
    /// How often every server's requests in flight (`GET /load`) are sampled, ms.
    pub sample_every_ms: u64,
    /// Requests per key and replica in the agreement check.
    pub agreement_repeats: u32,
    /// `model-load --threads`.
    pub load_threads: u32,
}

/// Characters per token of the load tool's text (3 letters and a space).
const CHARS_PER_TOKEN: u64 = 4;

impl PrefixParams {
    /// `make bench-prefix`: 13 runs of about a minute, about 14 minutes on 2 cores.
    pub fn full() -> Self {
        Self {
            workloads: Workload::ALL.to_vec(),
            shared_policies: POLICIES.to_vec(),
            unique_policies: vec![
                Policy::ModelLbPrefixAware,
                Policy::ModelLbLor,
                Policy::ModelLbRandom,
                Policy::LeastRequest,
            ],
            hot_policies: vec![
                Policy::ModelLbPrefixAware,
                Policy::ModelLbLor,
                Policy::RingHash,
            ],
            servers: 16,
            server: ServerParams {
                max_batch: 8,
                tpot_ms: 20.0,
                batch_alpha: 0.15,
                prefill_base_ms: 40.0,
                prefill_per_token_ms: 0.2,
                time_scale: 0.25,
                tokens_per_chunk: 4,
            },
            prefix_cache_tokens: 24_576,
            kv_cache_tokens: 65_536,
            prefix_length: 4096,
            threshold: 8,
            users_per_server: 10,
            think_ms: 4000.0,
            groups: 48,
            system_prompt_tokens: 3000,
            turns: 4,
            user_tokens: "lognormal:100:0.5:400".into(),
            unique_prompt_tokens: "lognormal:3400:0.1:6000".into(),
            max_tokens: "lognormal:120:0.8:1000".into(),
            hot_share: 0.5,
            rounds: 1,
            warmup_s: 10.0,
            duration_s: 45.0,
            seed: 21,
            envoy_concurrency: 2,
            sample_every_ms: 50,
            agreement_repeats: 2,
            load_threads: 2,
        }
    }

    /// `--smoke`: the plumbing only (every workload, the hashing configs, the agreement check),
    /// in about half a minute.
    pub fn smoke() -> Self {
        let full = Self::full();
        Self {
            shared_policies: vec![
                Policy::ModelLbPrefixAware,
                Policy::ModelLbLor,
                Policy::RingHash,
                Policy::Maglev,
            ],
            unique_policies: vec![Policy::ModelLbPrefixAware],
            hot_policies: vec![Policy::ModelLbPrefixAware],
            servers: 4,
            server: ServerParams {
                time_scale: 0.1,
                ..full.server.clone()
            },
            prefix_cache_tokens: 4096,
            users_per_server: 3,
            think_ms: 500.0,
            groups: 6,
            system_prompt_tokens: 1100,
            turns: 2,
            user_tokens: "fixed:20".into(),
            unique_prompt_tokens: "fixed:1200".into(),
            max_tokens: "lognormal:20:0.5:60".into(),
            warmup_s: 0.3,
            duration_s: 1.2,
            agreement_repeats: 1,
            load_threads: 1,
            ..full
        }
    }

    pub fn policies(&self, workload: Workload) -> &[Policy] {
        match workload {
            Workload::SharedPrefix => &self.shared_policies,
            Workload::Unique => &self.unique_policies,
            Workload::HotPrefix => &self.hot_policies,
        }
    }

    pub fn users(&self) -> u32 {
        self.users_per_server * self.servers
    }

    /// The think time the load tool gets (ms, scaled like every other time).
    pub fn think_ms_scaled(&self) -> f64 {
        self.think_ms * self.server.time_scale
    }

    /// Whether the routing key is the group's system prompt alone: the first `prefix_length`
    /// characters of the conversation (`system: ` and the prompt) all fall inside it.
    pub fn key_is_the_system_prompt(&self) -> bool {
        "system: ".len() as u64 + self.system_prompt_tokens * CHARS_PER_TOKEN
            >= u64::from(self.prefix_length)
    }

    /// The servers' flags.
    pub fn server_args(&self) -> Vec<String> {
        let mut args = self.server.args();
        args.extend([
            "--prefix-cache-tokens".to_owned(),
            self.prefix_cache_tokens.to_string(),
            "--kv-cache-tokens".to_owned(),
            self.kv_cache_tokens.to_string(),
        ]);
        args
    }

    /// The Envoy listener and cluster of `policy` (PREFIX_AWARE with its two parameters).
    pub fn variant(&self, policy: Policy) -> Variant {
        match policy {
            Policy::ModelLbPrefixAware => Variant::prefix_aware(self.prefix_length, self.threshold),
            other => Variant::of(other),
        }
    }

    /// Every policy that runs, once each, in report order (for one config to validate).
    pub fn all_policies(&self) -> Vec<Policy> {
        POLICIES
            .into_iter()
            .filter(|p| self.workloads.iter().any(|&w| self.policies(w).contains(p)))
            .collect()
    }

    /// `items` in the order of run `index` of `round`: the start rotates with the index and every
    /// second round runs the reverse order, so drift hits every policy alike.
    fn order(items: &[Policy], index: usize, round: u32) -> Vec<Policy> {
        let mut order = items.to_vec();
        if !order.is_empty() {
            let n = order.len();
            order.rotate_left(index % n);
        }
        if round % 2 == 1 {
            order.reverse();
        }
        order
    }

    /// Every run, in the order they run: per round, each workload's policies.
    pub fn plan(&self) -> Vec<Planned> {
        let mut out = Vec::new();
        for round in 0..self.rounds {
            for (i, &workload) in self.workloads.iter().enumerate() {
                for policy in Self::order(self.policies(workload), i, round) {
                    out.push(Planned {
                        workload,
                        policy,
                        round,
                    });
                }
            }
        }
        out
    }

    /// `model-load` flags of one run (URL and output files excluded). Every policy of a
    /// workload gets the same users, requests and think times (seed + round).
    pub fn load_args(&self, workload: Workload, round: u32) -> Vec<String> {
        let mut args: Vec<(&str, String)> = vec![
            ("--users", self.users().to_string()),
            ("--think-ms", format!("{:.1}", self.think_ms_scaled())),
            ("--instances", self.servers.to_string()),
            ("--warmup", self.warmup_s.to_string()),
            ("--duration", self.duration_s.to_string()),
            ("--seed", (self.seed + u64::from(round)).to_string()),
            ("--max-tokens", self.max_tokens.clone()),
            ("--threads", self.load_threads.to_string()),
            ("--api", "chat".into()),
            ("--timeout", "300".into()),
            ("--drain-timeout", "120".into()),
        ];
        if workload.shared() {
            args.extend([
                ("--workload", "shared-prefix".to_owned()),
                ("--prefix-groups", self.groups.to_string()),
                (
                    "--system-prompt-tokens",
                    self.system_prompt_tokens.to_string(),
                ),
                ("--turns", self.turns.to_string()),
                ("--prompt-tokens", self.user_tokens.clone()),
                ("--prefix-key-header", PREFIX_KEY_HEADER.to_owned()),
            ]);
            if workload == Workload::HotPrefix {
                args.push(("--hot-group-share", self.hot_share.to_string()));
            }
        } else {
            args.extend([
                ("--workload", "unique".to_owned()),
                ("--prompt-tokens", self.unique_prompt_tokens.clone()),
            ]);
        }
        args.into_iter()
            .flat_map(|(k, v)| [k.to_owned(), v])
            .chain([
                "--think-exponential".to_owned(),
                "--stream".to_owned(),
                "--quiet".to_owned(),
            ])
            .collect()
    }

    /// The body of the agreement check's request `repeat` for `group`: the group's system prompt
    /// exactly as the load tool sends it (same seed), a user message of its own, one token.
    pub fn agreement_body(&self, group: u64, repeat: u32) -> String {
        let user = words(
            text_key(self.seed, 0xa9ee, group * 1000 + u64::from(repeat)),
            20,
        );
        json!({
            "model": "sim-model",
            "messages": [
                {"role": "system", "content": words(system_key(self.seed, group), self.system_prompt_tokens)},
                {"role": "user", "content": user}
            ],
            "max_tokens": 1,
            "stream": false
        })
        .to_string()
    }
}

/// A server's counters this benchmark reads from `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub queries: u64,
    pub hits: u64,
    pub waits: WaitCounts,
}

/// The value of `name` in Prometheus text, summed over its label sets.
pub fn metric_sum(metrics: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = match rest.strip_prefix('{') {
            Some(labelled) => match labelled.split_once('}') {
                Some((_, after)) => after,
                None => continue,
            },
            None => rest,
        };
        if !rest.starts_with(' ') {
            continue;
        }
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

impl ServerCounters {
    pub fn parse(metrics: &str) -> Option<ServerCounters> {
        Some(ServerCounters {
            queries: metric_sum(metrics, "vllm:prefix_cache_queries_total")? as u64,
            hits: metric_sum(metrics, "vllm:prefix_cache_hits_total")? as u64,
            waits: WaitCounts::parse(metrics)?,
        })
    }

    /// Sum over servers of `after - before` (a server restarted in between counts from 0).
    pub fn delta(before: &[ServerCounters], after: &[ServerCounters]) -> ServerCounters {
        let mut d = ServerCounters::default();
        for (b, a) in before.iter().zip(after) {
            d.queries += a.queries.checked_sub(b.queries).unwrap_or(a.queries);
            d.hits += a.hits.checked_sub(b.hits).unwrap_or(a.hits);
        }
        let waits = |v: &[ServerCounters]| v.iter().map(|c| c.waits).collect::<Vec<_>>();
        d.waits = WaitCounts::delta(&waits(before), &waits(after));
        d
    }

    pub fn plus(self, o: ServerCounters) -> ServerCounters {
        ServerCounters {
            queries: self.queries + o.queries,
            hits: self.hits + o.hits,
            waits: self.waits.plus(o.waits),
        }
    }

    /// Prefix-cache hit rate (hit tokens / looked-up tokens), percent.
    pub fn hit_rate_pct(self) -> Option<f64> {
        (self.queries > 0).then(|| 100.0 * self.hits as f64 / self.queries as f64)
    }
}

/// What the servers' requests in flight (running + waiting, `GET /load`), sampled every few
/// milliseconds through a run, say about the load guard: the most any server held, and the most
/// any server held at a moment when another server had room (fewer than the threshold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    pub sweeps: u64,
    pub max_per_server: Vec<u32>,
    pub max: u32,
    pub max_while_room: u32,
    /// Sweeps in which a server held more than threshold + 1 while another had room.
    pub violations: u64,
}

/// Checks every sweep (one value per server, in port order) against `threshold`.
pub fn guard(sweeps: &[Vec<u32>], threshold: u32) -> Guard {
    let mut g = Guard::default();
    for sweep in sweeps {
        if sweep.is_empty() {
            continue;
        }
        g.sweeps += 1;
        if g.max_per_server.len() < sweep.len() {
            g.max_per_server.resize(sweep.len(), 0);
        }
        let mut violated = false;
        for (i, &v) in sweep.iter().enumerate() {
            g.max_per_server[i] = g.max_per_server[i].max(v);
            g.max = g.max.max(v);
            let other_has_room = sweep
                .iter()
                .enumerate()
                .any(|(j, &w)| j != i && w < threshold);
            if other_has_room {
                g.max_while_room = g.max_while_room.max(v);
                violated |= v > threshold + 1;
            }
        }
        if violated {
            g.violations += 1;
        }
    }
    g
}

impl Guard {
    /// Pools two runs: the highest figures, the violations and sweeps added.
    pub fn merge(&self, o: &Guard) -> Guard {
        let n = self.max_per_server.len().max(o.max_per_server.len());
        Guard {
            sweeps: self.sweeps + o.sweeps,
            max_per_server: (0..n)
                .map(|i| {
                    self.max_per_server
                        .get(i)
                        .copied()
                        .unwrap_or(0)
                        .max(o.max_per_server.get(i).copied().unwrap_or(0))
                })
                .collect(),
            max: self.max.max(o.max),
            max_while_room: self.max_while_room.max(o.max_while_room),
            violations: self.violations + o.violations,
        }
    }
}

/// model-lb's own account of a run: its counters for the pool, from Envoy's admin `/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterStats {
    /// PREFIX_AWARE requests sent to their key's endpoint, to a later one of its order, or
    /// routed by least outstanding requests (no key, or every endpoint of the walk busy).
    pub routed: u64,
    pub spilled: u64,
    pub fallback: u64,
    pub fail_open: u64,
    pub cas_conflicts: u64,
}

/// The counters of pool `pool` in an Envoy admin `/stats` text.
pub fn filter_stats(stats: &str, pool: &str) -> FilterStats {
    let prefix = format!("wasmcustom.model_lb.{pool}.");
    let mut f = FilterStats::default();
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let Some(stat) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            continue;
        };
        match stat {
            "prefix.routed" => f.routed += v,
            "prefix.spilled" => f.spilled += v,
            "cas_conflicts" => f.cas_conflicts += v,
            s if s.starts_with("prefix.fallback.") => f.fallback += v,
            s if s.starts_with("fail_open.") => f.fail_open += v,
            _ => {}
        }
    }
    f
}

impl FilterStats {
    pub fn plus(self, o: FilterStats) -> FilterStats {
        FilterStats {
            routed: self.routed + o.routed,
            spilled: self.spilled + o.spilled,
            fallback: self.fallback + o.fallback,
            fail_open: self.fail_open + o.fail_open,
            cas_conflicts: self.cas_conflicts + o.cas_conflicts,
        }
    }

    /// Share of PREFIX_AWARE decisions that did not go to the key's own endpoint, percent.
    pub fn spilled_pct(self) -> Option<f64> {
        let total = self.routed + self.spilled + self.fallback;
        (total > 0).then(|| 100.0 * (self.spilled + self.fallback) as f64 / total as f64)
    }
}

/// The raw result of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixRun {
    pub workload: Workload,
    pub policy: Policy,
    pub round: u32,
    /// The load tool's samples and window.
    pub run: Run,
    /// The servers' counters over the measured window, all servers.
    pub counters: ServerCounters,
    /// Over the whole run.
    pub guard: Guard,
    /// model-lb policies: the filter's counters over the whole run.
    pub filter: Option<FilterStats>,
    pub cpu: Cpu,
}

/// One (workload, policy), rounds pooled.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub workload: Workload,
    pub policy: Policy,
    pub stats: Stats,
    pub ttft_p50_ms: Option<f64>,
    /// The hot workload: TTFT P50 of the hot group's requests and of the others'.
    pub hot_ttft_p50_ms: Option<f64>,
    pub cold_ttft_p50_ms: Option<f64>,
    pub counters: ServerCounters,
    /// The server that served most measured requests, and its share in percent.
    pub busiest: Option<(String, f64)>,
    pub guard: Guard,
    pub filter: Option<FilterStats>,
    pub cpu: Cpu,
    /// Each round's TTFT P50 and throughput per instance (how much one round moves).
    pub round_ttft_p50_ms: Vec<Option<f64>>,
    pub round_throughput: Vec<f64>,
}

fn ttft_p50<'a>(samples: impl Iterator<Item = &'a Sample>) -> Option<f64> {
    let v: Vec<f64> = samples
        .filter(|s| !s.warmup && s.error.is_none())
        .filter_map(|s| s.ttft_ms)
        .collect();
    percentile_sorted(&sorted(&v), 50.0)
}

/// The busiest server by measured requests served: (its `x-served-by`, share in percent).
pub fn busiest<'a>(samples: impl Iterator<Item = &'a Sample>) -> Option<(String, f64)> {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0;
    for s in samples.filter(|s| !s.warmup) {
        if let Some(b) = s.backend.as_deref() {
            *counts.entry(b).or_insert(0) += 1;
            total += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(b, n)| (n, std::cmp::Reverse(b)))
        .map(|(b, n)| (b.to_owned(), 100.0 * n as f64 / total as f64))
}

/// Pools the rounds of each (workload, policy), in workload then policy report order.
pub fn cells(runs: &[PrefixRun]) -> Vec<Cell> {
    let mut out = Vec::new();
    for workload in Workload::ALL {
        for policy in POLICIES {
            let mine: Vec<&PrefixRun> = runs
                .iter()
                .filter(|r| r.workload == workload && r.policy == policy)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let loads: Vec<&Run> = mine.iter().map(|r| &r.run).collect();
            let samples = || mine.iter().flat_map(|r| r.run.samples.iter());
            let hot = workload == Workload::HotPrefix;
            let filters: Vec<FilterStats> = mine.iter().filter_map(|r| r.filter).collect();
            out.push(Cell {
                workload,
                policy,
                stats: Stats::of(&loads),
                ttft_p50_ms: ttft_p50(samples()),
                hot_ttft_p50_ms: hot
                    .then(|| ttft_p50(samples().filter(|s| s.group == Some(0))))
                    .flatten(),
                cold_ttft_p50_ms: hot
                    .then(|| ttft_p50(samples().filter(|s| s.group.is_some_and(|g| g != 0))))
                    .flatten(),
                counters: mine
                    .iter()
                    .fold(ServerCounters::default(), |a, r| a.plus(r.counters)),
                busiest: busiest(samples()),
                guard: mine.iter().fold(Guard::default(), |a, r| a.merge(&r.guard)),
                filter: (!filters.is_empty()).then(|| {
                    filters
                        .iter()
                        .fold(FilterStats::default(), |a, f| a.plus(*f))
                }),
                cpu: mine.iter().fold(Cpu::default(), |a, r| a.max(&r.cpu)),
                round_ttft_p50_ms: mine
                    .iter()
                    .map(|r| ttft_p50(r.run.samples.iter()))
                    .collect(),
                round_throughput: mine
                    .iter()
                    .map(|r| Stats::of(&[&r.run]).throughput_per_instance_per_min)
                    .collect(),
            });
        }
    }
    out
}

pub fn find(cells: &[Cell], workload: Workload, policy: Policy) -> Option<&Cell> {
    cells
        .iter()
        .find(|c| c.workload == workload && c.policy == policy)
}

/// One line of `prefix.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub workload: String,
    pub policy: String,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub throughput_per_instance_per_min: f64,
    /// The servers' prefix-cache hit rate over the measured windows (hit tokens / looked-up
    /// tokens), percent.
    pub prefix_cache_hit_rate_pct: Option<f64>,
    /// Share of the measured requests the busiest server served, percent.
    pub busiest_server_share_pct: Option<f64>,
    /// Requests in flight on a server (running + waiting), sampled: the most any server held,
    /// and the most while another server had fewer than the threshold.
    pub max_server_concurrency: u32,
    pub max_concurrency_while_another_had_room: u32,
    pub guard_violations: u64,
    /// Share of admitted requests that waited for a batch slot, percent.
    pub share_waited_pct: Option<f64>,
    /// PREFIX_AWARE: share of its decisions not on the key's own endpoint, percent.
    pub spilled_pct: Option<f64>,
    pub requests: u64,
    pub errors: u64,
}

fn r1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

impl Cell {
    pub fn row(&self) -> Row {
        Row {
            workload: self.workload.id().to_owned(),
            policy: self.policy.name().to_owned(),
            ttft_p50_ms: self.ttft_p50_ms.map(r1),
            ttft_p99_ms: self.stats.ttft_p99_ms.map(r1),
            p50_ms: self.stats.p50_ms.map(r1),
            p99_ms: self.stats.p99_ms.map(r1),
            throughput_per_instance_per_min: r1(self.stats.throughput_per_instance_per_min),
            prefix_cache_hit_rate_pct: self.counters.hit_rate_pct().map(r1),
            busiest_server_share_pct: self.busiest.as_ref().map(|(_, s)| r1(*s)),
            max_server_concurrency: self.guard.max,
            max_concurrency_while_another_had_room: self.guard.max_while_room,
            guard_violations: self.guard.violations,
            share_waited_pct: self.counters.waits.share_pct().map(r1),
            spilled_pct: self.filter.and_then(FilterStats::spilled_pct).map(r1),
            requests: self.stats.requests,
            errors: self.stats.errors,
        }
    }
}

pub fn json(cells: &[Cell]) -> String {
    let rows: Vec<Row> = cells.iter().map(Cell::row).collect();
    serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into()) + "\n"
}

/// Two Envoy replicas asked for the same keys: each key's request is sent `repeats` times to
/// each replica on a fresh connection (so both workers see it), with nothing else in flight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agreement {
    pub keys: u32,
    /// Keys every request of which, on both replicas, went to one server.
    pub agreed: u32,
    pub repeats: u32,
    pub servers: u32,
    /// Servers that own at least one key, and the fewest and most keys a server owns (by the
    /// first replica's first answer): how evenly rendezvous hashing spread the keys.
    pub servers_used: u32,
    pub keys_per_server: (u32, u32),
    /// The first few keys that did not agree, with what each replica answered.
    pub disagreements: Vec<String>,
}

/// One key of the agreement check: the key, and the servers replica A and replica B answered
/// from, one per request (`None`: no answer).
pub type KeyAnswers = (u64, Vec<Option<String>>, Vec<Option<String>>);

/// Builds the [`Agreement`] from every key's answers.
pub fn agreement(answers: &[KeyAnswers], servers: u32) -> Agreement {
    let mut a = Agreement {
        keys: answers.len() as u32,
        servers,
        repeats: answers.first().map_or(0, |(_, x, _)| x.len() as u32),
        ..Agreement::default()
    };
    let mut owners: BTreeMap<String, u32> = BTreeMap::new();
    for (key, ra, rb) in answers {
        let first = ra.first().cloned().flatten();
        let all_same = first.is_some() && ra.iter().chain(rb).all(|x| *x == first);
        if all_same {
            a.agreed += 1;
        } else if a.disagreements.len() < 5 {
            let show = |v: &[Option<String>]| {
                v.iter()
                    .map(|x| x.clone().unwrap_or_else(|| "no answer".into()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            a.disagreements.push(format!(
                "key {key}: replica A {}; replica B {}",
                show(ra),
                show(rb)
            ));
        }
        if let Some(owner) = first {
            *owners.entry(owner).or_insert(0) += 1;
        }
    }
    a.servers_used = owners.len() as u32;
    let most = owners.values().copied().max().unwrap_or(0);
    let fewest = if a.servers_used < servers {
        0
    } else {
        owners.values().copied().min().unwrap_or(0)
    };
    a.keys_per_server = (fewest, most);
    a
}

impl Agreement {
    pub fn all_agree(&self) -> bool {
        self.keys > 0 && self.agreed == self.keys
    }
}

/// One of the targets, checked against the measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub what: String,
    pub goal: String,
    pub measured: String,
    /// `None`: not measured (a policy or workload did not run).
    pub met: Option<bool>,
}

/// Shared prefix: PREFIX_AWARE's TTFT P50 at most this share of LOR's.
pub const TTFT_TARGET: f64 = 0.5;
/// Unique prompts: PREFIX_AWARE's throughput within this of LOR's.
pub const UNIQUE_TOLERANCE: f64 = 0.03;

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} %"))
}

pub fn targets(cells: &[Cell], params: &PrefixParams, agreement: &Agreement) -> Vec<Target> {
    let pa = Policy::ModelLbPrefixAware;
    let lor = Policy::ModelLbLor;
    let mut out = Vec::new();
    let (spa, slor) = (
        find(cells, Workload::SharedPrefix, pa),
        find(cells, Workload::SharedPrefix, lor),
    );
    let r = ratio(
        slor.and_then(|c| c.ttft_p50_ms),
        spa.and_then(|c| c.ttft_p50_ms),
    );
    out.push(Target {
        what: "shared prefix: PREFIX_AWARE's TTFT P50 against LOR's".into(),
        goal: format!("at most {TTFT_TARGET}x"),
        measured: match (r, spa, slor) {
            (Some(x), Some(a), Some(b)) => format!(
                "{} vs {} ms ({x:.2}x)",
                ms(a.ttft_p50_ms),
                ms(b.ttft_p50_ms)
            ),
            _ => "-".into(),
        },
        met: r.map(|x| x <= TTFT_TARGET),
    });
    let tput = |c: Option<&Cell>| c.map(|c| c.stats.throughput_per_instance_per_min);
    let r = ratio(tput(slor), tput(spa));
    out.push(Target {
        what: "shared prefix: PREFIX_AWARE's throughput against LOR's".into(),
        goal: "at least 1.00x".into(),
        measured: match (r, spa, slor) {
            (Some(x), Some(a), Some(b)) => format!(
                "{:.1} vs {:.1} /instance/min ({:+.1} %)",
                a.stats.throughput_per_instance_per_min,
                b.stats.throughput_per_instance_per_min,
                (x - 1.0) * 100.0
            ),
            _ => "-".into(),
        },
        met: r.map(|x| x >= 1.0),
    });
    let (upa, ulor) = (
        find(cells, Workload::Unique, pa),
        find(cells, Workload::Unique, lor),
    );
    let r = ratio(tput(ulor), tput(upa));
    out.push(Target {
        what: "unique prompts: PREFIX_AWARE's throughput against LOR's".into(),
        goal: format!("within {:.0} %", UNIQUE_TOLERANCE * 100.0),
        measured: match (r, upa, ulor) {
            (Some(x), Some(a), Some(b)) => format!(
                "{:.1} vs {:.1} /instance/min ({:+.1} %)",
                a.stats.throughput_per_instance_per_min,
                b.stats.throughput_per_instance_per_min,
                (x - 1.0) * 100.0
            ),
            _ => "-".into(),
        },
        met: r.map(|x| x >= 1.0 - UNIQUE_TOLERANCE),
    });
    let hot = find(cells, Workload::HotPrefix, pa);
    out.push(Target {
        what: format!(
            "one hot prefix ({:.0} % of traffic): PREFIX_AWARE's most requests on a server while another had room (< {})",
            params.hot_share * 100.0,
            params.threshold
        ),
        goal: format!("at most {} (threshold + 1)", params.threshold + 1),
        measured: hot.map_or("-".into(), |c| {
            format!(
                "{} ({} of {} samples over it; most on any server at any time {})",
                c.guard.max_while_room, c.guard.violations, c.guard.sweeps, c.guard.max
            )
        }),
        met: hot.map(|c| c.guard.sweeps > 0 && c.guard.violations == 0),
    });
    out.push(Target {
        what: "two Envoy replicas agree on every key's endpoint".into(),
        goal: "every key".into(),
        measured: format!("{} of {} keys", agreement.agreed, agreement.keys),
        met: (agreement.keys > 0).then(|| agreement.all_agree()),
    });
    out
}

/// Everything `prefix.md` reports.
#[derive(Debug, Clone)]
pub struct PrefixReport {
    pub params: PrefixParams,
    pub cells: Vec<Cell>,
    pub agreement: Agreement,
    pub machine: Machine,
    pub validation: String,
    pub elapsed_s: f64,
    pub smoke: bool,
}

fn usage(u: &Usage) -> String {
    format!("{:.2} / {:.2}", u.average, u.peak)
}

/// Prefill time (scaled ms) of `uncached_tokens` by the timing model: what recomputing a
/// prefix costs.
pub fn prefill_ms(params: &PrefixParams, uncached_tokens: u64) -> f64 {
    params
        .server
        .timing()
        .prefill_time(uncached_tokens)
        .as_secs_f64()
        * 1e3
}

pub fn markdown(r: &PrefixReport) -> String {
    let p = &r.params;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# model-lb PREFIX_AWARE: the same prompt prefix on the same server{}\n",
        if r.smoke {
            " (smoke run: plumbing only, numbers meaningless)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "{} (at the start; the filter is the build copied then). Took {:.0} s. Generated by `model-bench prefix` (`make bench-prefix`).\n",
        r.machine.line(),
        r.elapsed_s
    );
    let sys_prefill = prefill_ms(p, p.system_prompt_tokens);
    let _ = writeln!(
        md,
        "{} simulated servers with {} batch slots and a prefix cache of {} tokens each (about {:.0} of the {} system prompts of {} tokens; the fleet's caches together hold {:.1}x all of them), a closed loop of {} users ({} per server) in multi-turn chats with exponential think times (mean {:.0} ms), every time x {}. Recomputing a system prompt costs {:.0} ms of prefill (scaled), a cached one nothing. PREFIX_AWARE runs with `prefix_length` {} and `concurrency_threshold` {}; its key is {}. Hit rate: the servers' `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` (tokens) over the measured windows. \"Most in flight\" is a server's running + waiting requests (`GET /load`), sampled every {} ms on every server through the whole run: the most on any server, and in brackets the most on a server at a moment when another server had fewer than {} (room).\n",
        p.servers,
        p.server.max_batch,
        p.prefix_cache_tokens,
        p.prefix_cache_tokens as f64 / p.system_prompt_tokens as f64,
        p.groups,
        p.system_prompt_tokens,
        (p.prefix_cache_tokens * u64::from(p.servers)) as f64
            / (p.system_prompt_tokens * p.groups) as f64,
        p.users(),
        p.users_per_server,
        p.think_ms_scaled(),
        p.server.time_scale,
        sys_prefill,
        p.prefix_length,
        p.threshold,
        if p.key_is_the_system_prompt() {
            "the group's system prompt (its first characters), so it names the group"
        } else {
            "the system prompt and the start of the conversation, so it names the conversation"
        },
        p.sample_every_ms,
        p.threshold
    );

    for workload in Workload::ALL {
        let mine: Vec<&Cell> = r.cells.iter().filter(|c| c.workload == workload).collect();
        if mine.is_empty() {
            continue;
        }
        let about = match workload {
            Workload::SharedPrefix => format!(
                "{} groups, each conversation in one drawn at random, {} turns (the prompt grows by the answer and a new user message each turn); the load tool sends the group in `{PREFIX_KEY_HEADER}`, which RING_HASH and MAGLEV hash.",
                p.groups, p.turns
            ),
            Workload::Unique => format!(
                "One user message of `{}` tokens per request, unique to it: no prefix to reuse, so every policy recomputes every prompt.",
                p.unique_prompt_tokens
            ),
            Workload::HotPrefix => format!(
                "The shared-prefix workload with {:.0} % of the conversations in group 0 (the others uniform over the other {}).",
                p.hot_share * 100.0,
                p.groups - 1
            ),
        };
        let _ = writeln!(md, "## {}\n\n{about}\n", capitalise(workload.name()));
        let _ = writeln!(
            md,
            "| policy | TTFT P50 ms | TTFT P99 ms | P50 ms | P99 ms | throughput /instance/min | prefix-cache hit rate | busiest server's share | most in flight (while another had room) | waited for a batch slot | requests | errors |"
        );
        let _ = writeln!(
            md,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in &mine {
            let s = &c.stats;
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} ({}) | {} | {} | {} |",
                c.policy.name(),
                ms(c.ttft_p50_ms),
                ms(s.ttft_p99_ms),
                ms(s.p50_ms),
                ms(s.p99_ms),
                s.throughput_per_instance_per_min,
                pct(c.counters.hit_rate_pct()),
                pct(c.busiest.as_ref().map(|(_, v)| *v)),
                c.guard.max,
                c.guard.max_while_room,
                pct(c.counters.waits.share_pct()),
                s.ok,
                s.errors
            );
        }
        let _ = writeln!(md);
        for c in mine.iter().filter(|c| c.filter.is_some()) {
            if let Some(f) = c.filter {
                if c.policy == Policy::ModelLbPrefixAware {
                    let _ = writeln!(
                        md,
                        "- {}: {} requests to their key's endpoint, {} to a later endpoint of the key's order (it was at the threshold), {} by least outstanding requests ({} spilled); {} failed open, {} CAS conflicts (whole run, warm-up included).",
                        c.policy.name(),
                        f.routed,
                        f.spilled,
                        f.fallback,
                        pct(f.spilled_pct()),
                        f.fail_open,
                        f.cas_conflicts
                    );
                } else {
                    let _ = writeln!(
                        md,
                        "- {}: {} failed open, {} CAS conflicts (whole run).",
                        c.policy.name(),
                        f.fail_open,
                        f.cas_conflicts
                    );
                }
            }
        }
        if workload == Workload::HotPrefix {
            for c in &mine {
                let _ = writeln!(
                    md,
                    "- {}: TTFT P50 {} ms for the hot group, {} ms for the others; most in flight per server: {}.",
                    c.policy.name(),
                    ms(c.hot_ttft_p50_ms),
                    ms(c.cold_ttft_p50_ms),
                    c.guard
                        .max_per_server
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        let _ = writeln!(md);
    }
    if !r.cells.is_empty() {
        let _ = writeln!(
            md,
            "![TTFT P50, throughput per instance and prefix-cache hit rate per workload and policy](prefix.svg)\n"
        );
    }

    // Agreement.
    let a = &r.agreement;
    let _ = writeln!(md, "## Two Envoy replicas, one endpoint per key\n");
    let _ = writeln!(
        md,
        "Two Envoy processes (`--concurrency {}` each) with the same PREFIX_AWARE configuration in front of the same {} servers; each of the {} keys (the groups' system prompts, as the load tool sends them) sent {} time(s) to each replica, one request at a time on a fresh connection (so both of a replica's workers see it). **{} of {} keys went to the same server every time on both replicas.** The first replica's answers spread the keys over {} of {} servers, {} to {} keys per server (rendezvous hashing's spread: the load guard is what evens out the rest).\n",
        p.envoy_concurrency,
        a.servers,
        a.keys,
        a.repeats,
        a.agreed,
        a.keys,
        a.servers_used,
        a.servers,
        a.keys_per_server.0,
        a.keys_per_server.1
    );
    for d in &a.disagreements {
        let _ = writeln!(md, "- **disagreement**: {d}");
    }
    if !a.disagreements.is_empty() {
        let _ = writeln!(md);
    }

    // Targets.
    let _ = writeln!(
        md,
        "## Targets\n\nFrom the issue. A target whose workload or policy did not run shows \"-\".\n"
    );
    let _ = writeln!(md, "| target | goal | measured | met |");
    let _ = writeln!(md, "|---|---|---|---|");
    for t in targets(&r.cells, p, a) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.what,
            t.goal,
            t.measured,
            match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            }
        );
    }

    // Bottlenecks.
    let _ = writeln!(md, "\n## Bottleneck checks\n");
    let _ = writeln!(
        md,
        "CPU time of every process from `/proc/<pid>/stat`, sampled every 250 ms during each run: run average / highest 1-second window, in cores (1.00 = one core); the highest over the rounds. Envoy runs `--concurrency {}` (so 2.00 is its limit), the load tool {} tokio thread(s), each server one. \"Others\" is the machine's use minus ours (other work on this shared {}-core machine).\n",
        p.envoy_concurrency,
        p.load_threads,
        r.machine.nproc
    );
    for verdict in bottleneck_verdicts(&r.cells, p, r.machine.nproc) {
        let _ = writeln!(md, "- {verdict}");
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "| run | model-load | Envoy | busiest server | all servers | machine | others |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for c in &r.cells {
        let _ = writeln!(
            md,
            "| {} {} | {} | {} | {} | {:.2} | {} | {:.2} |",
            c.workload.id(),
            short(c.policy),
            usage(&c.cpu.load),
            usage(&c.cpu.envoy_busiest),
            usage(&c.cpu.server_busiest),
            c.cpu.servers_total.average,
            usage(&c.cpu.machine),
            c.cpu.others.average
        );
    }
    if p.rounds > 1 {
        let _ = writeln!(md, "\nPer round (TTFT P50 ms / throughput per instance):\n");
        let _ = writeln!(md, "| run | per round |");
        let _ = writeln!(md, "|---|---|");
        for c in &r.cells {
            let _ = writeln!(
                md,
                "| {} {} | {} |",
                c.workload.id(),
                short(c.policy),
                c.round_ttft_p50_ms
                    .iter()
                    .zip(&c.round_throughput)
                    .map(|(t, x)| format!("{} / {x:.1}", ms(*t)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    // Method.
    let _ = writeln!(md, "\n## How it was measured\n");
    let _ = writeln!(
        md,
        "- **Servers**: {} `model-server` processes, `{}`, started afresh for every run (cold caches, counters from zero). A token takes {} ms x (1 + {} x (b - 1)) with b requests decoding; prefill {} ms + {} ms per prompt token the prefix cache does not hold; every time x {}. The prefix cache is vLLM's automatic prefix caching: an LRU of 16-token blocks, each request caching its prompt's full blocks after its prefill.",
        p.servers,
        p.server_args().join(" "),
        p.server.tpot_ms,
        p.server.batch_alpha,
        p.server.prefill_base_ms,
        p.server.prefill_per_token_ms,
        p.server.time_scale
    );
    let _ = writeln!(
        md,
        "- **Cache size**: one server holds about {:.0} system prompts, the fleet {:.1}x all {} of them. So routing each group to its own servers lets every prompt stay cached somewhere, while spreading every group over every server (LOR, RANDOM, LEAST_REQUEST) makes each server's cache churn through all {} groups. With a cache large enough for every prompt on every server there would be nothing to measure.",
        p.prefix_cache_tokens as f64 / p.system_prompt_tokens as f64,
        (p.prefix_cache_tokens * u64::from(p.servers)) as f64
            / (p.system_prompt_tokens * p.groups) as f64,
        p.groups,
        p.groups
    );
    let _ = writeln!(
        md,
        "- **Load**: a closed loop, `model-load {}` (shared prefix; the unique workload swaps the workload flags for `--workload unique --prompt-tokens {}`, the hot one adds `--hot-group-share {}`). Closed, not open: throughput is what a policy achieves, not what the arrivals dictate, which is what the throughput targets ask about; and users in multi-turn chats wait for an answer before the next turn. Think times are exponential (mean {:.0} ms unscaled, {:.0} ms here): without them, a closed loop sends a user's next turn the moment its answer ends, when the server it just left has one request fewer than the others, so LOR would send it right back there, a conversation affinity it would not have with real users. Round k uses seed {} + k for every policy: the same conversations, groups, messages and think times.",
        p.load_args(Workload::SharedPrefix, 0).join(" "),
        p.unique_prompt_tokens,
        p.hot_share,
        p.think_ms,
        p.think_ms_scaled(),
        p.seed
    );
    let _ = writeln!(
        md,
        "- **Envoy**: one Envoy (`--concurrency {}`) per run with one listener and cluster for the policy under test. model-lb policies route through an override_host cluster; PREFIX_AWARE's listener also has the hold filter (`{{\"role\": \"hold\"}}`, same VM, its own root id). Envoy's own balancers are the cluster's `load_balancing_policy`; RING_HASH and MAGLEV hash the request header `{PREFIX_KEY_HEADER}` (the route's `hash_policy`), in which the load tool sends the conversation's group. **That hands Envoy an oracle key**: the filter has to find the same key in the body (the first {} characters of the conversation), Envoy is told it. It is the fairest comparison there is for consistent hashing, which has no load guard: a hot key stays on its server whatever that server's queue. {}",
        p.envoy_concurrency,
        p.prefix_length,
        r.validation
    );
    let _ = writeln!(
        md,
        "- **Runs**: {} round(s); in each, every workload's policies run once, the order rotated per workload and reversed every second round. Each run: {} s warm-up (the caches fill) + {} s measured; requests started in the window are awaited to the end. The servers' counters are read at the start and the end of the measured window; `GET /load` of every server every {} ms through the whole run.",
        p.rounds, p.warmup_s, p.duration_s, p.sample_every_ms
    );
    let _ = writeln!(
        md,
        "- **Statistics**: the raw samples of all rounds (`model-load --samples`) are pooled before percentiles are taken (nearest rank). TTFT is send to first content chunk, latency send to last byte; throughput counts completions that end inside the measured windows, per server and minute. Errors count every failed request, warm-up included."
    );
    md
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// What the CPU figures say about the rig: the busiest load tool, Envoy and server against
/// their limits, and the runs during which the whole machine was saturated.
pub fn bottleneck_verdicts(cells: &[Cell], params: &PrefixParams, nproc: usize) -> Vec<String> {
    let mut out = Vec::new();
    let worst = |f: fn(&Cpu) -> &Usage| -> Option<(&Cell, f64)> {
        cells
            .iter()
            .map(|c| (c, f(&c.cpu).peak))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    for (what, limit, f) in [
        (
            "the load tool",
            f64::from(params.load_threads.max(1)),
            (|c: &Cpu| &c.load) as fn(&Cpu) -> &Usage,
        ),
        (
            "Envoy",
            f64::from(params.envoy_concurrency.max(1)),
            |c: &Cpu| &c.envoy_busiest,
        ),
        ("a model server", 1.0, |c: &Cpu| &c.server_busiest),
    ] {
        if let Some((c, peak)) = worst(f) {
            let limit = limit.min(nproc.max(1) as f64);
            let verdict = if peak >= BUSY_PROCESS * limit {
                "**near its limit: a possible bottleneck**"
            } else {
                "far from its limit"
            };
            out.push(format!(
                "{} at its busiest: {peak:.2} of its {limit:.0} core(s) at the 1-second peak ({} {}): {verdict}.",
                capitalise(what),
                c.workload.id(),
                short(c.policy)
            ));
        }
    }
    let cores = nproc.max(1) as f64;
    let saturated = cells
        .iter()
        .filter(|c| c.cpu.machine.average >= BUSY_MACHINE * cores)
        .count();
    if saturated == 0 {
        out.push(format!(
            "The machine stayed below {:.0} % of its {nproc} cores on average in every run.",
            BUSY_MACHINE * 100.0
        ));
    } else {
        out.push(format!(
            "**The machine was saturated** (run average at least {:.0} % of its {nproc} cores) in {saturated} of {} runs: those runs' latencies include CPU contention. Rerun on a quiet machine.",
            BUSY_MACHINE * 100.0,
            cells.len()
        ));
    }
    out
}

/// Three panels of grouped bars, one group per workload and one bar per policy: TTFT P50,
/// throughput per instance and the servers' prefix-cache hit rate.
pub fn svg(cells: &[Cell], title: &str) -> String {
    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| cells.iter().any(|c| c.workload == *w))
        .collect();
    let policies: Vec<Policy> = POLICIES
        .into_iter()
        .filter(|p| cells.iter().any(|c| c.policy == *p))
        .collect();
    type Metric = fn(&Cell) -> Option<f64>;
    let panels: [(&str, Metric); 3] = [
        ("Time to first token, P50 (ms)", |c| c.ttft_p50_ms),
        ("Throughput per instance (requests/min)", |c| {
            Some(c.stats.throughput_per_instance_per_min)
        }),
        ("Prefix-cache hit rate (%)", |c| c.counters.hit_rate_pct()),
    ];
    let (panel_w, panel_h) = (400.0_f64, 320.0_f64);
    let (left, right, top, bottom) = (60.0, 16.0, 50.0, 45.0);
    let legend_rows = policies.len().div_ceil(3);
    let width = panels.len() as f64 * panel_w;
    let height = panel_h + 20.0 * legend_rows as f64 + 20.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(out, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        width / 2.0,
        esc(title)
    );
    for (panel, (label, metric)) in panels.iter().enumerate() {
        let ox = panel as f64 * panel_w;
        let y_data = cells.iter().filter_map(metric).fold(0.0_f64, f64::max);
        let (step, y_max) = nice_ticks(y_data * 1.05);
        let (x0, x1) = (ox + left, ox + panel_w - right);
        let (y0, y1) = (top + panel_h - bottom, top);
        let py = |y: f64| y0 - y / y_max * (y0 - y1);
        let _ = writeln!(
            out,
            "<g class=\"panel\"><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\">{}</text>",
            (x0 + x1) / 2.0,
            top - 10.0,
            esc(label)
        );
        let mut y = 0.0;
        while y <= y_max + step / 2.0 {
            let _ = writeln!(
                out,
                "<line x1=\"{x0:.1}\" y1=\"{yy:.1}\" x2=\"{x1:.1}\" y2=\"{yy:.1}\" stroke=\"#e0e0e0\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                x0 - 6.0,
                py(y) + 4.0,
                y,
                yy = py(y)
            );
            y += step;
        }
        let _ = writeln!(
            out,
            "<line x1=\"{x0:.1}\" y1=\"{y0:.1}\" x2=\"{x1:.1}\" y2=\"{y0:.1}\" stroke=\"black\"/><line x1=\"{x0:.1}\" y1=\"{y0:.1}\" x2=\"{x0:.1}\" y2=\"{y1:.1}\" stroke=\"black\"/>"
        );
        let group_w = (x1 - x0) / workloads.len().max(1) as f64;
        let bar_w = (group_w * 0.8) / policies.len().max(1) as f64;
        for (gi, &w) in workloads.iter().enumerate() {
            let gx = x0 + gi as f64 * group_w + group_w * 0.1;
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x0 + (gi as f64 + 0.5) * group_w,
                y0 + 16.0,
                esc(w.name())
            );
            for (pi, &p) in policies.iter().enumerate() {
                let Some(v) = find(cells, w, p).and_then(metric) else {
                    continue;
                };
                let h = (y0 - py(v)).max(0.0);
                let _ = writeln!(
                    out,
                    "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{}, {}: {v:.1}</title></rect>",
                    gx + pi as f64 * bar_w,
                    y0 - h,
                    (bar_w - 1.0).max(1.0),
                    p.color(),
                    esc(w.name()),
                    esc(p.name())
                );
            }
        }
        let _ = writeln!(out, "</g>");
    }
    let legend_y = top + panel_h - 5.0;
    for (i, policy) in policies.iter().enumerate() {
        let x = 40.0 + (i % 3) as f64 * 380.0;
        let y = legend_y + (i / 3) as f64 * 20.0;
        let _ = writeln!(
            out,
            "<rect x=\"{x}\" y=\"{}\" width=\"18\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            y - 5.0,
            policy.color(),
            x + 24.0,
            y + 4.0,
            esc(policy.name())
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(args: &[String], flag: &str) -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1).cloned()
    }

    #[test]
    fn the_plan_runs_every_workloads_policies_in_rotated_order() {
        let p = PrefixParams::full();
        let plan = p.plan();
        assert_eq!(plan.len(), 6 + 4 + 3);
        let of = |w: Workload| -> Vec<&str> {
            plan.iter()
                .filter(|r| r.workload == w)
                .map(|r| r.policy.id())
                .collect()
        };
        assert_eq!(
            of(Workload::SharedPrefix),
            [
                "mlb_prefix",
                "mlb_lor",
                "mlb_random",
                "least_request",
                "ring_hash",
                "maglev"
            ]
        );
        assert_eq!(
            of(Workload::Unique),
            ["mlb_lor", "mlb_random", "least_request", "mlb_prefix"],
            "rotated by one"
        );
        assert_eq!(
            of(Workload::HotPrefix),
            ["ring_hash", "mlb_prefix", "mlb_lor"]
        );
        let two = PrefixParams {
            rounds: 2,
            ..PrefixParams::full()
        };
        let plan = two.plan();
        assert_eq!(plan.len(), 26);
        // Over a mirrored pair of rounds every shared-prefix policy's mean position is the same.
        let mut pos = std::collections::HashMap::new();
        for round in 0..2 {
            for (i, r) in plan
                .iter()
                .filter(|r| r.round == round && r.workload == Workload::SharedPrefix)
                .enumerate()
            {
                *pos.entry(r.policy).or_insert(0) += i;
            }
        }
        assert!(pos.values().all(|&v| v == 5), "{pos:?}");
        assert_eq!(
            p.all_policies(),
            POLICIES.to_vec(),
            "one config holds every policy"
        );
    }

    #[test]
    fn load_flags_per_workload() {
        let p = PrefixParams::full();
        let shared = p.load_args(Workload::SharedPrefix, 1);
        assert_eq!(after(&shared, "--users").as_deref(), Some("160"));
        assert_eq!(after(&shared, "--think-ms").as_deref(), Some("1000.0"));
        assert_eq!(after(&shared, "--seed").as_deref(), Some("22"));
        assert_eq!(
            after(&shared, "--workload").as_deref(),
            Some("shared-prefix")
        );
        assert_eq!(after(&shared, "--prefix-groups").as_deref(), Some("48"));
        assert_eq!(
            after(&shared, "--prefix-key-header").as_deref(),
            Some("x-prefix-key")
        );
        assert!(after(&shared, "--hot-group-share").is_none());
        for flag in ["--think-exponential", "--stream", "--quiet"] {
            assert!(shared.contains(&flag.to_owned()), "{flag}");
        }
        let hot = p.load_args(Workload::HotPrefix, 0);
        assert_eq!(after(&hot, "--hot-group-share").as_deref(), Some("0.5"));
        let unique = p.load_args(Workload::Unique, 0);
        assert_eq!(after(&unique, "--workload").as_deref(), Some("unique"));
        assert_eq!(
            after(&unique, "--prompt-tokens").as_deref(),
            Some("lognormal:3400:0.1:6000")
        );
        assert!(after(&unique, "--prefix-groups").is_none());
        assert!(after(&unique, "--prefix-key-header").is_none());
        // Every flag is one model-load takes.
        let cli: Vec<String> = shared
            .iter()
            .chain(&hot)
            .chain(&unique)
            .cloned()
            .chain(["--url".to_owned(), "http://127.0.0.1:1".to_owned()])
            .collect();
        for args in [&shared, &hot, &unique] {
            assert!(
                matches!(
                    crate::cli::parse_load_args(args.iter().cloned()),
                    Ok(crate::cli::Parsed::Run(_))
                ),
                "{args:?}"
            );
        }
        assert!(!cli.is_empty());
        let server = p.server_args().join(" ");
        assert!(server.contains("--prefix-cache-tokens 24576"), "{server}");
        assert!(server.contains("--kv-cache-tokens 65536"), "{server}");
        assert!(server.contains("--max-batch 8"), "{server}");
        assert!(matches!(
            crate::cli::parse_server_args(p.server_args()),
            Ok(crate::cli::Parsed::Run(_))
        ));
    }

    #[test]
    fn the_key_is_the_system_prompt_and_the_agreement_body_carries_it() {
        let p = PrefixParams::full();
        assert!(p.key_is_the_system_prompt());
        assert!(PrefixParams::smoke().key_is_the_system_prompt());
        let short = PrefixParams {
            system_prompt_tokens: 1000,
            ..PrefixParams::full()
        };
        assert!(!short.key_is_the_system_prompt(), "8 + 4000 < 4096");
        let body: serde_json::Value = serde_json::from_str(&p.agreement_body(3, 1)).unwrap();
        let system = body["messages"][0]["content"].as_str().unwrap();
        assert_eq!(system, words(system_key(p.seed, 3), 3000));
        assert_eq!(body["max_tokens"], 1);
        assert_eq!(body["stream"], false);
        // Same key, another user message; another group, another key.
        let again: serde_json::Value = serde_json::from_str(&p.agreement_body(3, 2)).unwrap();
        assert_eq!(again["messages"][0], body["messages"][0]);
        assert_ne!(again["messages"][1], body["messages"][1]);
        let other: serde_json::Value = serde_json::from_str(&p.agreement_body(4, 1)).unwrap();
        assert_ne!(other["messages"][0], body["messages"][0]);
        let pa = p.variant(Policy::ModelLbPrefixAware);
        assert_eq!(
            pa.plugin_extra["prefix_aware"],
            json!({"prefix_length": 4096, "concurrency_threshold": 8})
        );
        assert_eq!(
            p.variant(Policy::RingHash).hash_header.as_deref(),
            Some(PREFIX_KEY_HEADER)
        );
    }

    #[test]
    fn server_counters_come_from_metrics_and_add_up_over_servers() {
        let metrics = |q: u64, h: u64, a: u64, w: u64| {
            format!(
                "# TYPE vllm:prefix_cache_queries_total counter\nvllm:prefix_cache_queries_total{{model_name=\"m\"}} {q}\nvllm:prefix_cache_hits_total{{model_name=\"m\"}} {h}\nvllm:prefix_cache_hits_total_other 99\nmodel_sim_requests_admitted_total{{model_name=\"m\"}} {a}\nmodel_sim_requests_queued_total{{model_name=\"m\"}} {w}\n"
            )
        };
        let c = ServerCounters::parse(&metrics(1000, 250, 10, 1)).unwrap();
        assert_eq!((c.queries, c.hits), (1000, 250));
        assert_eq!(c.waits.admitted, 10);
        assert_eq!(c.hit_rate_pct(), Some(25.0));
        assert!(ServerCounters::parse("vllm:num_requests_running 1\n").is_none());
        let before = vec![
            ServerCounters::parse(&metrics(1000, 250, 10, 1)).unwrap(),
            ServerCounters::parse(&metrics(500, 0, 5, 0)).unwrap(),
        ];
        let after = vec![
            ServerCounters::parse(&metrics(3000, 1250, 30, 3)).unwrap(),
            // Restarted in between: counts from zero.
            ServerCounters::parse(&metrics(400, 100, 4, 0)).unwrap(),
        ];
        let d = ServerCounters::delta(&before, &after);
        assert_eq!((d.queries, d.hits), (2400, 1100));
        assert_eq!((d.waits.admitted, d.waits.queued), (24, 2));
        assert_eq!(ServerCounters::default().hit_rate_pct(), None);
        assert_eq!(
            metric_sum("a{x=\"1\"} 2\na{x=\"2\"} 3\nab 7\n", "a"),
            Some(5.0)
        );
        assert_eq!(metric_sum("b 1\n", "a"), None);
    }

    #[test]
    fn the_guard_flags_a_full_server_only_while_another_has_room() {
        // Threshold 8: 10 while another server holds 3 is a violation; 10 while every other
        // server is at 8 or more is not (no room anywhere).
        let sweeps = vec![
            vec![8, 3, 5],
            vec![9, 4, 8],
            vec![10, 8, 9],
            vec![10, 3, 8],
            vec![],
        ];
        let g = guard(&sweeps, 8);
        assert_eq!(g.sweeps, 4);
        assert_eq!(g.max_per_server, vec![10, 8, 9]);
        assert_eq!(g.max, 10);
        assert_eq!(g.max_while_room, 10);
        assert_eq!(g.violations, 1);
        let ok = guard(&[vec![9, 7], vec![8, 8], vec![12, 9]], 8);
        assert_eq!(ok.violations, 0);
        assert_eq!(ok.max, 12);
        assert_eq!(ok.max_while_room, 9, "9 = threshold + 1 is allowed");
        let merged = g.merge(&ok);
        assert_eq!(merged.sweeps, 7);
        assert_eq!(merged.max_per_server, vec![12, 9, 9]);
        assert_eq!(merged.violations, 1);
        assert_eq!(guard(&[], 8), Guard::default());
    }

    #[test]
    fn filter_stats_are_read_per_pool() {
        let stats = "wasmcustom.model_lb.mlb_prefix.prefix.routed: 90\n\
            wasmcustom.model_lb.mlb_prefix.prefix.spilled: 8\n\
            wasmcustom.model_lb.mlb_prefix.prefix.fallback.all_busy: 1\n\
            wasmcustom.model_lb.mlb_prefix.prefix.fallback.no_body: 1\n\
            wasmcustom.model_lb.mlb_prefix.fail_open.no_hold_filter: 2\n\
            wasmcustom.model_lb.mlb_prefix.cas_conflicts: 5\n\
            wasmcustom.model_lb.mlb_prefix.endpoint.127.0.0.1:1.routed: 50\n\
            wasmcustom.model_lb.mlb_lor.cas_conflicts: 70\n\
            cluster.mlb_prefix.upstream_rq_total: 100\n";
        let f = filter_stats(stats, "mlb_prefix");
        assert_eq!(
            f,
            FilterStats {
                routed: 90,
                spilled: 8,
                fallback: 2,
                fail_open: 2,
                cas_conflicts: 5
            }
        );
        assert_eq!(f.spilled_pct(), Some(10.0));
        assert_eq!(filter_stats(stats, "mlb_lor").cas_conflicts, 70);
        assert_eq!(FilterStats::default().spilled_pct(), None);
        assert_eq!(f.plus(f).routed, 180);
    }

    #[test]
    fn agreement_counts_keys_served_from_one_server_everywhere() {
        let s = |v: &str| Some(v.to_owned());
        let answers = vec![
            (0, vec![s("a"), s("a")], vec![s("a"), s("a")]),
            (1, vec![s("b"), s("b")], vec![s("b"), s("b")]),
            (2, vec![s("a"), s("a")], vec![s("a"), s("c")]),
            (3, vec![None, None], vec![None, None]),
            (4, vec![s("a"), s("a")], vec![s("a"), s("a")]),
        ];
        let a = agreement(&answers, 4);
        assert_eq!((a.keys, a.agreed, a.repeats), (5, 3, 2));
        assert!(!a.all_agree());
        assert_eq!(a.servers_used, 2);
        assert_eq!(a.keys_per_server, (0, 3), "two servers own no key");
        assert_eq!(a.disagreements.len(), 2);
        assert!(a.disagreements[0].contains("key 2: replica A a, a; replica B a, c"));
        assert!(a.disagreements[1].contains("no answer"));
        let all = agreement(&answers[..2], 2);
        assert!(all.all_agree());
        assert_eq!(all.keys_per_server, (1, 1));
        assert!(!agreement(&[], 2).all_agree());
    }

    fn sample(start: f64, ttft: f64, backend: &str, group: u64) -> Sample {
        Sample {
            start_ms: start,
            end_ms: start + 100.0,
            latency_ms: 100.0,
            ttft_ms: Some(ttft),
            tokens: 10,
            prompt_tokens: 3000,
            max_tokens: Some(10),
            status: Some(200),
            error: None,
            warmup: start < 1000.0,
            backend: Some(backend.to_owned()),
            group: Some(group),
        }
    }

    fn run(
        workload: Workload,
        policy: Policy,
        ttft: f64,
        hits: u64,
        completions: u32,
    ) -> PrefixRun {
        let samples = (0..completions)
            .map(|i| {
                sample(
                    1000.0 + f64::from(i),
                    ttft + f64::from(i % 3),
                    if i % 4 == 0 { "s1" } else { "s2" },
                    u64::from(i % 2),
                )
            })
            .chain([sample(0.0, 1.0, "s3", 0)])
            .collect();
        PrefixRun {
            workload,
            policy,
            round: 0,
            run: Run {
                policy,
                users: 8,
                instances: 2,
                round: 0,
                samples,
                warmup_s: 1.0,
                duration_s: 10.0,
            },
            counters: ServerCounters {
                queries: 1000,
                hits,
                waits: WaitCounts {
                    admitted: 100,
                    queued: 5,
                },
            },
            guard: guard(&[vec![3, 9], vec![8, 2]], 8),
            filter: policy.uses_filter().then(|| FilterStats {
                routed: 90,
                spilled: 10,
                ..FilterStats::default()
            }),
            cpu: Cpu::default(),
        }
    }

    fn report(runs: &[PrefixRun]) -> PrefixReport {
        PrefixReport {
            params: PrefixParams::full(),
            cells: cells(runs),
            agreement: agreement(&[(0, vec![Some("a".into())], vec![Some("a".into())])], 16),
            machine: Machine::default(),
            validation: "validated".into(),
            elapsed_s: 1.0,
            smoke: false,
        }
    }

    #[test]
    fn cells_pool_runs_and_targets_compare_with_lor() {
        let pa = Policy::ModelLbPrefixAware;
        let lor = Policy::ModelLbLor;
        let runs = vec![
            run(Workload::SharedPrefix, lor, 200.0, 100, 100),
            run(Workload::SharedPrefix, pa, 20.0, 900, 110),
            run(Workload::Unique, lor, 200.0, 0, 100),
            run(Workload::Unique, pa, 200.0, 0, 98),
            run(Workload::HotPrefix, pa, 20.0, 800, 100),
        ];
        let cells = cells(&runs);
        assert_eq!(cells.len(), 5);
        // Report order: workload, then PREFIX_AWARE before LOR.
        assert_eq!(
            (cells[0].workload, cells[0].policy),
            (Workload::SharedPrefix, pa)
        );
        let c = &cells[0];
        assert_eq!(c.ttft_p50_ms, Some(21.0));
        assert_eq!(c.counters.hit_rate_pct(), Some(90.0));
        // s2 served 3 of every 4 measured requests; the warm-up one on s3 does not count.
        let (name, share) = c.busiest.clone().unwrap();
        assert_eq!(name, "s2");
        assert!((share - 74.55).abs() < 0.1, "{share}");
        assert_eq!(c.guard.max_while_room, 9);
        assert_eq!(c.row().spilled_pct, Some(10.0));
        assert_eq!(c.row().guard_violations, 0);
        let hot = find(&cells, Workload::HotPrefix, pa).unwrap();
        assert!(hot.hot_ttft_p50_ms.is_some() && hot.cold_ttft_p50_ms.is_some());
        assert!(c.hot_ttft_p50_ms.is_none(), "only the hot workload splits");
        let lor_cell = find(&cells, Workload::SharedPrefix, lor).unwrap();
        assert_eq!(lor_cell.row().policy, "model-lb LEAST_OUTSTANDING_REQUESTS");
        let r = report(&runs);
        let t = targets(&r.cells, &r.params, &r.agreement);
        assert_eq!(t.len(), 5);
        assert_eq!(t[0].met, Some(true), "21 vs 201 ms: {t:?}");
        assert_eq!(t[1].met, Some(true), "110 vs 100 completions: {t:?}");
        assert_eq!(t[2].met, Some(true), "98 vs 100: -2 %: {t:?}");
        assert_eq!(t[3].met, Some(true), "9 = threshold + 1: {t:?}");
        assert_eq!(t[4].met, Some(true));
        // A run missing: its targets show "-".
        let few = cells_of(&runs[..2]);
        let t = targets(&few, &r.params, &Agreement::default());
        assert_eq!(t[2].met, None);
        assert_eq!(t[3].met, None);
        assert_eq!(t[4].met, None);
    }

    fn cells_of(runs: &[PrefixRun]) -> Vec<Cell> {
        cells(runs)
    }

    #[test]
    fn reports_are_well_formed() {
        let runs = vec![
            run(Workload::SharedPrefix, Policy::ModelLbLor, 200.0, 100, 100),
            run(
                Workload::SharedPrefix,
                Policy::ModelLbPrefixAware,
                20.0,
                900,
                110,
            ),
            run(Workload::SharedPrefix, Policy::RingHash, 20.0, 950, 80),
            run(
                Workload::HotPrefix,
                Policy::ModelLbPrefixAware,
                20.0,
                800,
                100,
            ),
        ];
        let r = report(&runs);
        let md = markdown(&r);
        for section in [
            "## Shared prefix",
            "## One hot prefix",
            "## Two Envoy replicas, one endpoint per key",
            "## Targets",
            "## Bottleneck checks",
            "## How it was measured",
            "**That hands Envoy an oracle key**",
        ] {
            assert!(md.contains(section), "{section} missing:\n{md}");
        }
        assert!(!md.contains("## Unique prompts"), "no unique runs");
        assert!(md.contains("| model-lb PREFIX_AWARE | 21 |"), "{md}");
        assert!(md.contains("90 requests to their key's endpoint, 10 to a later endpoint"));
        assert!(md.contains("TTFT P50 21 ms for the hot group"), "{md}");
        let json: Vec<serde_json::Value> = serde_json::from_str(&json(&r.cells)).unwrap();
        assert_eq!(json.len(), 4);
        assert_eq!(json[0]["workload"], "shared");
        assert_eq!(json[0]["policy"], "model-lb PREFIX_AWARE");
        assert_eq!(json[0]["prefix_cache_hit_rate_pct"], 90.0);
        assert!(json[2]["spilled_pct"].is_null(), "RING_HASH has no filter");
        let svg = svg(&r.cells, "t & t");
        assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &amp; t"));
        // Three panels x (three shared bars + one hot bar).
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 3 * 4);
        assert_eq!(svg.matches("<g class=\"panel\">").count(), 3);
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
    }

    #[test]
    fn policies_parse_by_id() {
        assert_eq!(
            parse_policies("mlb_prefix, ring_hash").unwrap(),
            vec![Policy::ModelLbPrefixAware, Policy::RingHash]
        );
        assert!(parse_policies("round_robin")
            .unwrap_err()
            .contains("maglev"));
        for w in Workload::ALL {
            assert_eq!(Workload::from_id(w.id()), Some(w));
        }
        assert!(!Workload::Unique.shared() && Workload::HotPrefix.shared());
        for p in POLICIES {
            assert_ne!(short(p), "");
        }
    }
}
