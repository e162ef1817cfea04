//! The replicas benchmark (`model-bench replicas`, `make bench-replicas`): R Envoy replicas in
//! front of the same simulated servers, loaded the way production is (Poisson arrivals split at
//! random over the replicas, as a cloud load balancer does). Each replica counts only its own
//! requests in flight, so the more replicas, the less each one knows; the servers' own load
//! reports (the filter's `server_load`) give every replica the fleet's view back.
//!
//! Everything here is pure: the policies and their Envoy variants, the run plan, the arrival
//! rate from the fleet's capacity, the share of requests that waited for a batch slot (from the
//! servers' counters), pooling, the targets and the reports. `model-bench` only starts and
//! measures processes.

use std::fmt::Write as _;

use serde::Serialize;

use super::envoy::{scaled_polling, Variant};
use super::pool::{ratio, Run, Stats};
use super::procstat::Usage;
use super::render::{esc, nice_ticks, Machine};
use super::{Policy, ServerParams};
use crate::dist::Dist;
use crate::rng::Rng;

/// The policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReplicaPolicy {
    /// model-lb LEAST_OUTSTANDING_REQUESTS on this Envoy's own counts only.
    LorLocal,
    /// model-lb LEAST_OUTSTANDING_REQUESTS plus the servers' load reports (`server_load`).
    LorServerLoad,
    LeastRequestFullScan,
    /// Envoy's default LEAST_REQUEST: power of two choices.
    LeastRequest,
    Random,
    /// [`Self::LorServerLoad`] with Envoy endpoint weights = batch slots (`admin_cluster`).
    LorServerLoadWeighted,
}

impl ReplicaPolicy {
    /// Every policy, in report order.
    pub const ALL: [ReplicaPolicy; 6] = [
        Self::LorLocal,
        Self::LorServerLoad,
        Self::LeastRequestFullScan,
        Self::LeastRequest,
        Self::Random,
        Self::LorServerLoadWeighted,
    ];
    /// The uniform fleet's policies (weights are all equal there).
    pub const OPEN: [ReplicaPolicy; 5] = [
        Self::LorLocal,
        Self::LorServerLoad,
        Self::LeastRequestFullScan,
        Self::LeastRequest,
        Self::Random,
    ];
    /// The mixed fleet's.
    pub const MIXED: [ReplicaPolicy; 4] = [
        Self::LorLocal,
        Self::LeastRequestFullScan,
        Self::LorServerLoad,
        Self::LorServerLoadWeighted,
    ];
    /// The closed loop with users spread unevenly over the replicas.
    pub const CLOSED: [ReplicaPolicy; 3] = [
        Self::LorLocal,
        Self::LeastRequestFullScan,
        Self::LorServerLoad,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::LorLocal => "model-lb LOR, local counts",
            Self::LorServerLoad => "model-lb LOR + server load",
            Self::LeastRequestFullScan => "Envoy LEAST_REQUEST FULL_SCAN",
            Self::LeastRequest => "Envoy LEAST_REQUEST (P2C)",
            Self::Random => "model-lb RANDOM",
            Self::LorServerLoadWeighted => "model-lb LOR + server load + weights",
        }
    }

    /// `--policies` value, Envoy listener and cluster name.
    pub fn id(self) -> &'static str {
        match self {
            Self::LorLocal => "mlb_lor",
            Self::LorServerLoad => "mlb_lor_server_load",
            Self::LeastRequestFullScan => "least_request_full_scan",
            Self::LeastRequest => "least_request",
            Self::Random => "mlb_random",
            Self::LorServerLoadWeighted => "mlb_lor_server_load_weighted",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Self::LorLocal => "LOR local",
            Self::LorServerLoad => "LOR + server load",
            Self::LeastRequestFullScan => "FULL_SCAN",
            Self::LeastRequest => "P2C",
            Self::Random => "RANDOM",
            Self::LorServerLoadWeighted => "LOR + load + weights",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.id() == id)
    }

    /// The balancer underneath (its Envoy cluster policy and plugin strategy).
    pub fn base(self) -> Policy {
        match self {
            Self::LorLocal | Self::LorServerLoad | Self::LorServerLoadWeighted => {
                Policy::ModelLbLor
            }
            Self::LeastRequestFullScan => Policy::LeastRequestFullScan,
            Self::LeastRequest => Policy::LeastRequest,
            Self::Random => Policy::ModelLbRandom,
        }
    }

    /// Whether the plugin configuration has `server_load` (which the filter may not support yet).
    pub fn needs_server_load(self) -> bool {
        matches!(self, Self::LorServerLoad | Self::LorServerLoadWeighted)
    }

    pub fn weighted(self) -> bool {
        self == Self::LorServerLoadWeighted
    }

    pub fn color(self) -> &'static str {
        match self {
            Self::LorLocal => "#d62728",
            Self::LorServerLoad => "#ff7f0e",
            Self::LeastRequestFullScan => "#9467bd",
            Self::LeastRequest => "#2ca02c",
            Self::Random => "#1f77b4",
            Self::LorServerLoadWeighted => "#8c564b",
        }
    }

    /// The Envoy listener and cluster of this policy over a fleet whose servers have `batches`
    /// batch slots (the weights, when weighted), polling at `polling` = (interval ms, budget).
    pub fn variant(self, polling: (u64, u64), batches: &[u32]) -> Variant {
        let mut v = Variant::of(self.base());
        v.name = self.id().to_owned();
        if self.needs_server_load() {
            v = v.with_server_load(polling.0, polling.1);
        }
        if self.weighted() {
            v = v.with_weights(batches.to_vec());
        }
        v
    }
}

/// Parses `--policies a,b`.
pub fn parse_policies(text: &str) -> Result<Vec<ReplicaPolicy>, String> {
    text.split(',')
        .map(|id| {
            ReplicaPolicy::from_id(id.trim()).ok_or_else(|| {
                let all: Vec<&str> = ReplicaPolicy::ALL.iter().map(|p| p.id()).collect();
                format!("unknown policy {id:?}; known: {}", all.join(", "))
            })
        })
        .collect()
}

/// The three experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// Uniform fleet, open loop, R = 1, 2, 4, 8 replicas.
    Open,
    /// Half the servers with fewer batch slots, open loop, one Envoy.
    Mixed,
    /// Uniform fleet, closed loop: one Envoy (the exact view), then users spread unevenly over
    /// several replicas.
    Closed,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Self::Open, Self::Mixed, Self::Closed];

    pub fn id(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Mixed => "mixed",
            Self::Closed => "closed",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.id() == id)
    }

    /// Whether it runs on the mixed fleet (the servers are restarted for it).
    pub fn mixed_fleet(self) -> bool {
        self == Self::Mixed
    }
}

/// One run of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub scenario: Scenario,
    pub replicas: u32,
    pub policy: ReplicaPolicy,
    pub round: u32,
}

/// Everything that defines a replicas run.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicasParams {
    pub scenarios: Vec<Scenario>,
    /// Envoy replicas of the open-loop scenario.
    pub replicas: Vec<u32>,
    pub policies: Vec<ReplicaPolicy>,
    pub mixed_policies: Vec<ReplicaPolicy>,
    pub closed_policies: Vec<ReplicaPolicy>,
    pub servers: u32,
    /// The servers' flags; `max_batch` is the uniform fleet's batch slots.
    pub server: ServerParams,
    /// Batch slots of the mixed fleet's two halves.
    pub mixed_batches: (u32, u32),
    /// Arrival rate as a fraction of the fleet's capacity.
    pub load: f64,
    /// Closed loop: users per server (= batch slots: perfect balance never queues).
    pub closed_users_per_server: u32,
    /// Closed loop: how the users are dealt over the replicas (shares; its length is R).
    pub closed_shares: Vec<u32>,
    pub rounds: u32,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub seed: u64,
    pub max_tokens: String,
    pub prompt_tokens: String,
    /// `model-load --threads`.
    pub load_threads: u32,
}

/// Tokens the server counts beyond a chat request's content (`user: ` and the newline).
const CHAT_TEMPLATE_TOKENS: u64 = 2;

impl ReplicasParams {
    /// `make bench-replicas`: 28 runs of about 55 s, 25 minutes on 2 cores.
    pub fn full() -> Self {
        Self {
            scenarios: Scenario::ALL.to_vec(),
            replicas: vec![1, 2, 4, 8],
            policies: ReplicaPolicy::OPEN.to_vec(),
            mixed_policies: ReplicaPolicy::MIXED.to_vec(),
            closed_policies: ReplicaPolicy::CLOSED.to_vec(),
            servers: 20,
            server: ServerParams {
                max_batch: 4,
                tpot_ms: 20.0,
                batch_alpha: 0.15,
                prefill_base_ms: 40.0,
                prefill_per_token_ms: 0.2,
                time_scale: 0.5,
                tokens_per_chunk: 4,
            },
            mixed_batches: (2, 4),
            load: 0.85,
            closed_users_per_server: 4,
            closed_shares: vec![3, 1, 1, 1],
            rounds: 1,
            warmup_s: 10.0,
            duration_s: 30.0,
            seed: 11,
            max_tokens: "lognormal:150:0.9:1500".into(),
            prompt_tokens: "lognormal:300:0.8:3000".into(),
            load_threads: 1,
        }
    }

    /// `--smoke`: the plumbing only, in well under a minute: every policy once at 2 replicas,
    /// one Envoy in the closed loop's exact view and the mixed fleet (weights, admin cluster).
    pub fn smoke() -> Self {
        let full = Self::full();
        Self {
            replicas: vec![2],
            mixed_policies: vec![ReplicaPolicy::LorServerLoadWeighted],
            closed_policies: vec![ReplicaPolicy::LorServerLoad],
            servers: 4,
            server: ServerParams {
                time_scale: 0.1,
                ..full.server.clone()
            },
            closed_shares: vec![3, 1],
            warmup_s: 0.3,
            duration_s: 1.0,
            max_tokens: "lognormal:20:0.5:60".into(),
            prompt_tokens: "fixed:50".into(),
            ..full
        }
    }

    /// The poll interval (ms) and poll budget (polls/s) at this time scale.
    pub fn polling(&self) -> (u64, u64) {
        scaled_polling(self.server.time_scale)
    }

    /// Batch slots per server of a scenario's fleet; the mixed fleet alternates its two kinds,
    /// so each half has every other port.
    pub fn fleet(&self, scenario: Scenario) -> Vec<u32> {
        (0..self.servers)
            .map(|i| match (scenario, i % 2) {
                (Scenario::Mixed, 0) => self.mixed_batches.0,
                (Scenario::Mixed, _) => self.mixed_batches.1,
                _ => self.server.max_batch,
            })
            .collect()
    }

    /// Mean service time (seconds, scaled) of a request of this workload on a server that
    /// always has `batch` requests decoding, by the timing model, over `n` draws of the load
    /// tool's prompt and output distributions.
    pub fn mean_service_s(&self, batch: u32, n: u32) -> Result<f64, String> {
        let output: Dist = self.max_tokens.parse()?;
        let prompt: Dist = self.prompt_tokens.parse()?;
        let timing = self.server.timing();
        let mut rng = Rng::new(0x5eed);
        let mut total = 0.0;
        for _ in 0..n {
            let p = prompt.sample(&mut rng).unwrap_or(1) + CHAT_TEMPLATE_TOKENS;
            // Without max_tokens the server draws the length; this benchmark always sends it.
            let o = output.sample(&mut rng).unwrap_or(1);
            total += timing.service_time(p, o, batch as usize).as_secs_f64();
        }
        Ok(total / f64::from(n.max(1)))
    }

    /// Requests per second a fleet can complete with every batch slot busy: the sum over the
    /// servers of batch slots / mean service time at a full batch.
    pub fn capacity_per_s(&self, batches: &[u32]) -> Result<f64, String> {
        let mut kinds: Vec<u32> = batches.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        let mut total = 0.0;
        for b in kinds {
            let per_server = f64::from(b) / self.mean_service_s(b, 100_000)?;
            total += per_server * batches.iter().filter(|&&x| x == b).count() as f64;
        }
        Ok(total)
    }

    /// `model-load` flags of one run (URLs and output files excluded): open loop at `rate`
    /// arrivals per second, or a closed loop of `users`.
    pub fn load_args(&self, rate: Option<f64>, users: u32, round: u32) -> Vec<String> {
        let mut args: Vec<(&str, String)> = Vec::new();
        match rate {
            Some(r) => args.push(("--rate", format!("{r:.3}"))),
            None => args.push(("--users", users.to_string())),
        }
        args.extend([
            ("--instances", self.servers.to_string()),
            ("--warmup", self.warmup_s.to_string()),
            ("--duration", self.duration_s.to_string()),
            ("--seed", (self.seed + u64::from(round)).to_string()),
            ("--max-tokens", self.max_tokens.clone()),
            ("--prompt-tokens", self.prompt_tokens.clone()),
            ("--threads", self.load_threads.to_string()),
            ("--api", "chat".into()),
            ("--timeout", "300".into()),
            ("--drain-timeout", "300".into()),
        ]);
        args.into_iter()
            .flat_map(|(k, v)| [k.to_owned(), v])
            .chain(["--stream".to_owned(), "--quiet".to_owned()])
            .collect()
    }

    pub fn closed_users(&self) -> u32 {
        self.closed_users_per_server * self.servers
    }

    /// Replicas of the closed loop's uneven run.
    pub fn closed_replicas(&self) -> u32 {
        self.closed_shares.len() as u32
    }

    /// The URL list that deals the closed loop's users unevenly: replica r's URL appears
    /// `closed_shares[r]` times, and `model-load` sends user u to entry u mod the list's length.
    pub fn closed_urls(&self, replica_urls: &[String]) -> Vec<String> {
        replica_urls
            .iter()
            .zip(&self.closed_shares)
            .flat_map(|(url, &n)| std::iter::repeat(url.clone()).take(n as usize))
            .collect()
    }

    /// Users each replica gets from [`Self::closed_urls`].
    pub fn closed_users_per_replica(&self) -> Vec<u32> {
        let len: u32 = self.closed_shares.iter().sum();
        let mut out = vec![0; self.closed_shares.len()];
        if len == 0 {
            return out;
        }
        let owner: Vec<usize> = self
            .closed_shares
            .iter()
            .enumerate()
            .flat_map(|(r, &n)| std::iter::repeat(r).take(n as usize))
            .collect();
        for u in 0..self.closed_users() {
            out[owner[(u % len) as usize]] += 1;
        }
        out
    }

    /// `items` in the order of run `index` of `round`: the start rotates with the index and every
    /// second round runs the reverse order, so drift hits every policy alike.
    fn order(items: &[ReplicaPolicy], index: usize, round: u32) -> Vec<ReplicaPolicy> {
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

    /// Every run, in the order they run: all rounds of the uniform fleet's scenarios first (open
    /// loop, then closed loop), then the mixed fleet's (its servers are started once).
    pub fn plan(&self) -> Vec<Planned> {
        let mut out = Vec::new();
        let has = |s: Scenario| self.scenarios.contains(&s);
        let mut push = |scenario, replicas, policy, round| {
            out.push(Planned {
                scenario,
                replicas,
                policy,
                round,
            })
        };
        if has(Scenario::Open) {
            for round in 0..self.rounds {
                for (i, &r) in self.replicas.iter().enumerate() {
                    for p in Self::order(&self.policies, i, round) {
                        push(Scenario::Open, r, p, round);
                    }
                }
            }
        }
        if has(Scenario::Closed) {
            for round in 0..self.rounds {
                // The exact view first: one Envoy sees every request.
                push(Scenario::Closed, 1, ReplicaPolicy::LorLocal, round);
                for p in Self::order(&self.closed_policies, 0, round) {
                    push(Scenario::Closed, self.closed_replicas(), p, round);
                }
            }
        }
        if has(Scenario::Mixed) {
            for round in 0..self.rounds {
                for p in Self::order(&self.mixed_policies, 0, round) {
                    push(Scenario::Mixed, 1, p, round);
                }
            }
        }
        out
    }
}

/// Two counters of a model server: requests it accepted, and of those the ones that found every
/// batch slot busy and waited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitCounts {
    pub admitted: u64,
    pub queued: u64,
}

impl WaitCounts {
    /// From a server's `/metrics` text (`model_sim_requests_admitted_total`,
    /// `model_sim_requests_queued_total`, labelled or not).
    pub fn parse(metrics: &str) -> Option<WaitCounts> {
        let value = |name: &str| -> Option<u64> {
            metrics.lines().find_map(|line| {
                let rest = line.strip_prefix(name)?;
                let rest = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once('}')?.1,
                    None => rest,
                };
                let v: f64 = rest.split_whitespace().next()?.parse().ok()?;
                (rest.starts_with(' ') && v >= 0.0).then_some(v as u64)
            })
        };
        Some(WaitCounts {
            admitted: value("model_sim_requests_admitted_total")?,
            queued: value("model_sim_requests_queued_total")?,
        })
    }

    /// Sum over servers of `after - before` (a server restarted in between counts from 0).
    pub fn delta(before: &[WaitCounts], after: &[WaitCounts]) -> WaitCounts {
        let mut d = WaitCounts::default();
        for (b, a) in before.iter().zip(after) {
            d.admitted += a.admitted.checked_sub(b.admitted).unwrap_or(a.admitted);
            d.queued += a.queued.checked_sub(b.queued).unwrap_or(a.queued);
        }
        d
    }

    pub fn plus(self, other: WaitCounts) -> WaitCounts {
        WaitCounts {
            admitted: self.admitted + other.admitted,
            queued: self.queued + other.queued,
        }
    }

    /// Share of the admitted requests that waited, in percent.
    pub fn share_pct(self) -> Option<f64> {
        (self.admitted > 0).then(|| 100.0 * self.queued as f64 / self.admitted as f64)
    }
}

/// Requests an Envoy sent upstream that no client sent it (the filter's server-load polls go
/// through the pool's own cluster), from its admin `/stats` text: upstream requests of
/// `cluster` minus the listener's downstream requests minus retries.
pub fn polls_from_stats(stats: &str, name: &str) -> Option<u64> {
    let value = |stat: String| -> Option<u64> {
        stats.lines().find_map(|line| {
            let (k, v) = line.split_once(": ")?;
            (k == stat).then(|| v.trim().parse().ok()).flatten()
        })
    };
    let upstream = value(format!("cluster.{name}.upstream_rq_total"))?;
    let downstream = value(format!("http.{name}.downstream_rq_total")).unwrap_or(0);
    let retries = value(format!("cluster.{name}.upstream_rq_retry")).unwrap_or(0);
    Some(upstream.saturating_sub(downstream + retries))
}

/// The weight model-lb applies to each of `ports` (its `endpoint.<address>.weight` gauges for
/// the pool `name`), from an Envoy admin `/stats` text; `None` where it has no gauge.
pub fn weights_from_stats(stats: &str, name: &str, ports: &[u16]) -> Vec<Option<u64>> {
    ports
        .iter()
        .map(|port| {
            let stat = format!("wasmcustom.model_lb.{name}.endpoint.127.0.0.1:{port}.weight");
            stats.lines().find_map(|line| {
                let (k, v) = line.split_once(": ")?;
                (k == stat).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .collect()
}

/// What the weighted runs' gauges say, against the weights configured (`batches`).
fn weights_note(cell: &Cell, batches: &[u32]) -> String {
    let seen: Vec<String> = cell
        .weights_seen
        .iter()
        .map(|w| w.map_or("?".into(), |w| w.to_string()))
        .collect();
    let expected: Vec<Option<u64>> = batches.iter().map(|&b| Some(u64::from(b))).collect();
    if cell.weights_seen == expected {
        format!(
            "{}: the filter applied the configured weights (its `endpoint.<address>.weight` gauges, first replica, end of the run).",
            cell.policy.name()
        )
    } else {
        format!(
            "{}: **the filter's `endpoint.<address>.weight` gauges ({}) are not the configured weights ({})** at the end of the run.",
            cell.policy.name(),
            seen.join(" "),
            batches
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        )
    }
}

/// CPU use of one run's processes, in cores.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cpu {
    pub load: Usage,
    pub envoy_busiest: Usage,
    pub envoy_total: Usage,
    pub server_busiest: Usage,
    pub servers_total: Usage,
    pub machine: Usage,
    /// The machine's use minus ours: other work on this shared machine.
    pub others: Usage,
}

fn max_usage(a: &Usage, b: &Usage) -> Usage {
    Usage {
        average: a.average.max(b.average),
        peak: a.peak.max(b.peak),
    }
}

impl Cpu {
    /// The higher of each figure (pooling rounds: the worst case is what a bottleneck shows in).
    pub fn max(&self, o: &Cpu) -> Cpu {
        Cpu {
            load: max_usage(&self.load, &o.load),
            envoy_busiest: max_usage(&self.envoy_busiest, &o.envoy_busiest),
            envoy_total: max_usage(&self.envoy_total, &o.envoy_total),
            server_busiest: max_usage(&self.server_busiest, &o.server_busiest),
            servers_total: max_usage(&self.servers_total, &o.servers_total),
            machine: max_usage(&self.machine, &o.machine),
            others: max_usage(&self.others, &o.others),
        }
    }
}

/// The raw result of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRun {
    pub scenario: Scenario,
    pub replicas: u32,
    pub policy: ReplicaPolicy,
    /// The load tool's samples and window (`run.policy` is the base balancer; unused here).
    pub run: Run,
    /// Open loop: the arrival rate asked for.
    pub rate_per_s: Option<f64>,
    /// Closed loop: users, and how many each replica got.
    pub users: Option<u32>,
    pub users_per_replica: Vec<u32>,
    /// Over the measured window, all servers.
    pub waits: WaitCounts,
    pub cpu: Cpu,
    /// Upstream requests per second per replica that no client sent (the server-load polls).
    pub polls_per_s_per_replica: Option<f64>,
    /// Weighted policies: the weight the filter applied to each server at the end of the run
    /// (its `endpoint.<address>.weight` gauges on the first replica), in port order.
    pub weights_seen: Vec<Option<u64>>,
}

/// One (scenario, replicas, policy), rounds pooled.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub scenario: Scenario,
    pub replicas: u32,
    pub policy: ReplicaPolicy,
    pub stats: Stats,
    pub waits: WaitCounts,
    /// Each round's own share that waited (how noisy one round is).
    pub round_shares: Vec<Option<f64>>,
    pub rate_per_s: Option<f64>,
    /// Arrivals per second the load tool actually sent in the measured windows.
    pub achieved_rate_per_s: f64,
    pub users: Option<u32>,
    pub users_per_replica: Vec<u32>,
    pub cpu: Cpu,
    pub polls_per_s_per_replica: Option<f64>,
    /// Requests the load tool dropped (open loop at its in-flight cap).
    pub dropped: u64,
    /// The last round's [`ReplicaRun::weights_seen`].
    pub weights_seen: Vec<Option<u64>>,
}

impl Cell {
    pub fn share_waited_pct(&self) -> Option<f64> {
        self.waits.share_pct()
    }

    pub fn row(&self) -> Row {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        Row {
            scenario: self.scenario.id().to_owned(),
            replicas: self.replicas,
            policy: self.policy.name().to_owned(),
            users: self.users,
            arrival_rate_per_s: self.rate_per_s.map(|r| (r * 100.0).round() / 100.0),
            p50_ms: self.stats.p50_ms.map(r1),
            p99_ms: self.stats.p99_ms.map(r1),
            ttft_p99_ms: self.stats.ttft_p99_ms.map(r1),
            throughput_per_instance_per_min: r1(self.stats.throughput_per_instance_per_min),
            share_waited_pct: self.share_waited_pct().map(|v| (v * 100.0).round() / 100.0),
            requests: self.stats.requests,
            errors: self.stats.errors,
        }
    }
}

/// One line of `replicas.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub scenario: String,
    pub replicas: u32,
    pub policy: String,
    pub users: Option<u32>,
    pub arrival_rate_per_s: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub throughput_per_instance_per_min: f64,
    /// Share of the requests the servers admitted in the measured windows that waited for a
    /// batch slot, percent.
    pub share_waited_pct: Option<f64>,
    pub requests: u64,
    pub errors: u64,
}

/// Pools the rounds of each (scenario, replicas, policy), in plan order.
pub fn cells(runs: &[ReplicaRun]) -> Vec<Cell> {
    let mut keys: Vec<(Scenario, u32, ReplicaPolicy)> = Vec::new();
    for r in runs {
        let key = (r.scenario, r.replicas, r.policy);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    // Report order: scenario, then replicas, then policy (plan order interleaves policies).
    keys.sort();
    keys.into_iter()
        .map(|(scenario, replicas, policy)| {
            let mine: Vec<&ReplicaRun> = runs
                .iter()
                .filter(|r| r.scenario == scenario && r.replicas == replicas && r.policy == policy)
                .collect();
            let loads: Vec<&Run> = mine.iter().map(|r| &r.run).collect();
            let measured_s: f64 = mine.iter().map(|r| r.run.duration_s).sum();
            let arrivals = mine
                .iter()
                .flat_map(|r| r.run.samples.iter())
                .filter(|s| !s.warmup)
                .count();
            let dropped = mine
                .iter()
                .flat_map(|r| r.run.samples.iter())
                .filter(|s| s.error.as_deref() == Some("dropped"))
                .count() as u64;
            let polls: Vec<f64> = mine
                .iter()
                .filter_map(|r| r.polls_per_s_per_replica)
                .collect();
            Cell {
                scenario,
                replicas,
                policy,
                stats: Stats::of(&loads),
                waits: mine
                    .iter()
                    .fold(WaitCounts::default(), |a, r| a.plus(r.waits)),
                round_shares: mine.iter().map(|r| r.waits.share_pct()).collect(),
                rate_per_s: mine.first().and_then(|r| r.rate_per_s),
                achieved_rate_per_s: if measured_s > 0.0 {
                    arrivals as f64 / measured_s
                } else {
                    0.0
                },
                users: mine.first().and_then(|r| r.users),
                users_per_replica: mine
                    .first()
                    .map(|r| r.users_per_replica.clone())
                    .unwrap_or_default(),
                cpu: mine.iter().fold(Cpu::default(), |a, r| a.max(&r.cpu)),
                polls_per_s_per_replica: (!polls.is_empty())
                    .then(|| polls.iter().sum::<f64>() / polls.len() as f64),
                dropped,
                weights_seen: mine
                    .last()
                    .map(|r| r.weights_seen.clone())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

pub fn find(
    cells: &[Cell],
    scenario: Scenario,
    replicas: u32,
    policy: ReplicaPolicy,
) -> Option<&Cell> {
    cells
        .iter()
        .find(|c| c.scenario == scenario && c.replicas == replicas && c.policy == policy)
}

pub fn json(cells: &[Cell]) -> String {
    let rows: Vec<Row> = cells.iter().map(Cell::row).collect();
    serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into()) + "\n"
}

/// One of the targets, checked against the measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub what: String,
    pub goal: String,
    pub measured: String,
    /// `None`: not measured (the policy did not run).
    pub met: Option<bool>,
}

/// Share that waited at R replicas: at most this, in percent.
pub const SHARE_TARGETS: [(u32, f64); 2] = [(4, 3.0), (8, 5.0)];
/// P50 and TTFT P99 at R replicas within this of the same policy's one-replica run.
pub const LATENCY_TOLERANCE: f64 = 0.10;
/// Mixed fleet: share that waited with server load (and weights) at most this, percent.
pub const MIXED_TARGET: f64 = 5.0;
/// Closed loop, users spread unevenly: throughput within this of one exact view.
pub const CLOSED_TOLERANCE: f64 = 0.03;

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} %"))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// The targets for the server-load policies.
pub fn targets(cells: &[Cell], params: &ReplicasParams) -> Vec<Target> {
    let mut out = Vec::new();
    let sl = ReplicaPolicy::LorServerLoad;
    for (r, limit) in SHARE_TARGETS {
        let c = find(cells, Scenario::Open, r, sl);
        let share = c.and_then(Cell::share_waited_pct);
        out.push(Target {
            what: format!("{}, {r} replicas: share that waited", sl.name()),
            goal: format!("≤ {limit:.0} %"),
            measured: pct(share),
            met: share.map(|s| s <= limit),
        });
    }
    let one = find(cells, Scenario::Open, 1, sl);
    for (r, _) in SHARE_TARGETS {
        let c = find(cells, Scenario::Open, r, sl);
        for (label, f) in [
            ("P50", (|s: &Stats| s.p50_ms) as fn(&Stats) -> Option<f64>),
            ("TTFT P99", |s: &Stats| s.ttft_p99_ms),
        ] {
            let ratio = match (one, c) {
                (Some(o), Some(c)) => ratio(f(&o.stats), f(&c.stats)),
                _ => None,
            };
            out.push(Target {
                what: format!("{}, {r} replicas: {label} against 1 replica", sl.name()),
                goal: format!("within {:.0} %", LATENCY_TOLERANCE * 100.0),
                measured: match (ratio, one, c) {
                    (Some(x), Some(o), Some(c)) => format!(
                        "{} vs {} ms ({:+.1} %)",
                        ms(f(&c.stats)),
                        ms(f(&o.stats)),
                        (x - 1.0) * 100.0
                    ),
                    _ => "-".into(),
                },
                met: ratio.map(|x| (x - 1.0).abs() <= LATENCY_TOLERANCE),
            });
        }
    }
    for p in [sl, ReplicaPolicy::LorServerLoadWeighted] {
        let share = find(cells, Scenario::Mixed, 1, p).and_then(Cell::share_waited_pct);
        out.push(Target {
            what: format!("mixed fleet, {}: share that waited", p.name()),
            goal: format!("≤ {MIXED_TARGET:.0} %"),
            measured: pct(share),
            met: share.map(|s| s <= MIXED_TARGET),
        });
    }
    let exact = find(cells, Scenario::Closed, 1, ReplicaPolicy::LorLocal);
    let uneven = find(cells, Scenario::Closed, params.closed_replicas(), sl);
    let tput = |c: Option<&Cell>| c.map(|c| c.stats.throughput_per_instance_per_min);
    let r = ratio(tput(exact), tput(uneven));
    out.push(Target {
        what: format!(
            "closed loop, users spread unevenly over {} replicas, {}: throughput against one exact view",
            params.closed_replicas(),
            sl.name()
        ),
        goal: format!("within {:.0} %", CLOSED_TOLERANCE * 100.0),
        measured: match (r, exact, uneven) {
            (Some(x), Some(e), Some(u)) => format!(
                "{:.1} vs {:.1} /instance/min ({:+.1} %)",
                u.stats.throughput_per_instance_per_min,
                e.stats.throughput_per_instance_per_min,
                (x - 1.0) * 100.0
            ),
            _ => "-".into(),
        },
        met: r.map(|x| x >= 1.0 - CLOSED_TOLERANCE),
    });
    out
}

/// A process whose 1-second peak reaches this share of its core is called a possible bottleneck.
pub const BUSY_PROCESS: f64 = 0.8;
/// A machine whose run average reaches this share of its cores was saturated.
pub const BUSY_MACHINE: f64 = 0.9;

/// What the CPU figures say about the rig, one sentence each: the busiest load tool, Envoy
/// replica and server against their one core, and the runs during which the whole machine was
/// saturated (then latencies include CPU contention, whoever caused it).
pub fn bottleneck_verdicts(cells: &[Cell], nproc: usize) -> Vec<String> {
    let mut out = Vec::new();
    let worst = |f: fn(&Cpu) -> &Usage| -> Option<(&Cell, f64)> {
        cells
            .iter()
            .map(|c| (c, f(&c.cpu).peak))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    for (what, f) in [
        ("the load tool", (|c: &Cpu| &c.load) as fn(&Cpu) -> &Usage),
        ("an Envoy replica", |c: &Cpu| &c.envoy_busiest),
        ("a model server", |c: &Cpu| &c.server_busiest),
    ] {
        if let Some((c, peak)) = worst(f) {
            let verdict = if peak >= BUSY_PROCESS {
                "**near its limit: a possible bottleneck**"
            } else {
                "far from its limit"
            };
            out.push(format!(
                "Busiest {what}: {peak:.2} of its 1 core at the 1-second peak ({} R={} {}): {verdict}.",
                c.scenario.id(),
                c.replicas,
                c.policy.short()
            ));
        }
    }
    let cores = nproc.max(1) as f64;
    let saturated: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.cpu.machine.average >= BUSY_MACHINE * cores)
        .collect();
    if saturated.is_empty() {
        out.push(format!(
            "The machine stayed below {:.0} % of its {nproc} cores on average in every run.",
            BUSY_MACHINE * 100.0
        ));
    } else {
        let ours_max = saturated
            .iter()
            .map(|c| c.cpu.machine.average - c.cpu.others.average)
            .fold(0.0_f64, f64::max);
        let others_max = saturated
            .iter()
            .map(|c| c.cpu.others.average)
            .fold(0.0_f64, f64::max);
        out.push(format!(
            "**The machine was saturated** (run average at least {:.0} % of its {nproc} cores) in {} of {} runs, ours using up to {ours_max:.2} cores and other processes up to {others_max:.2}: those runs' latencies include CPU contention. Compare policies at the same replica count (they ran back to back), or rerun on a quiet machine.",
            BUSY_MACHINE * 100.0,
            saturated.len(),
            cells.len()
        ));
    }
    out
}

/// Everything `replicas.md` reports.
#[derive(Debug, Clone)]
pub struct ReplicasReport {
    pub params: ReplicasParams,
    pub cells: Vec<Cell>,
    pub machine: Machine,
    /// Arrival rates: uniform fleet, mixed fleet (requests/s), and the capacities behind them.
    pub open_rate: f64,
    pub open_capacity: f64,
    pub mixed_rate: f64,
    pub mixed_capacity: f64,
    /// Policies that were asked for but not run, and why.
    pub skipped: Vec<String>,
    pub validation: String,
    pub elapsed_s: f64,
    pub smoke: bool,
}

fn usage(u: &Usage) -> String {
    format!("{:.2} / {:.2}", u.average, u.peak)
}

fn policies_of(cells: &[Cell], scenario: Scenario, order: &[ReplicaPolicy]) -> Vec<ReplicaPolicy> {
    order
        .iter()
        .copied()
        .filter(|p| {
            cells
                .iter()
                .any(|c| c.scenario == scenario && c.policy == *p)
        })
        .collect()
}

fn replicas_of(cells: &[Cell], scenario: Scenario) -> Vec<u32> {
    let mut r: Vec<u32> = cells
        .iter()
        .filter(|c| c.scenario == scenario)
        .map(|c| c.replicas)
        .collect();
    r.sort_unstable();
    r.dedup();
    r
}

fn result_table(md: &mut String, cells: &[&Cell], first: &str, label: impl Fn(&Cell) -> String) {
    let _ = writeln!(
        md,
        "| {first} | P50 ms | P99 ms | TTFT P99 ms | throughput /instance/min | waited for a batch slot | requests | errors |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        let s = &c.stats;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} |",
            label(c),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.ttft_p99_ms),
            s.throughput_per_instance_per_min,
            pct(c.share_waited_pct()),
            s.ok,
            s.errors
        );
    }
}

pub fn markdown(r: &ReplicasReport) -> String {
    let p = &r.params;
    let (interval, budget) = p.polling();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# model-lb with several Envoy replicas{}\n",
        if r.smoke {
            " (smoke run: plumbing only, numbers meaningless)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "{} (at the start; the filter is the build copied then). Took {:.0} s. Generated by `model-bench replicas` (`make bench-replicas`).\n",
        r.machine.line(),
        r.elapsed_s
    );
    for note in &r.skipped {
        let _ = writeln!(md, "**Not run:** {note}\n");
    }
    let _ = writeln!(
        md,
        "\"Waited\" is the share of the requests the servers admitted during the measured windows that found every batch slot busy and queued (`model_sim_requests_queued_total` / `model_sim_requests_admitted_total`, scraped from every server before and after each window). Every time is scaled by {} (`--time-scale`), the servers' and the filter's poll interval alike: the filter polls every {interval} ms, production's 100 ms x {}.\n",
        p.server.time_scale, p.server.time_scale
    );

    // Open loop, one table per R.
    let open_policies = policies_of(&r.cells, Scenario::Open, &ReplicaPolicy::ALL);
    let open_replicas = replicas_of(&r.cells, Scenario::Open);
    if !open_replicas.is_empty() {
        let _ = writeln!(
            md,
            "## Open loop: {} servers x {} batch slots, Poisson arrivals at {:.0} % of capacity\n\n{:.2} requests/s ({:.0} % of {:.2}/s, the fleet's throughput with every slot busy by the timing model), each arrival sent to one replica chosen at random.\n",
            p.servers,
            p.server.max_batch,
            p.load * 100.0,
            r.open_rate,
            p.load * 100.0,
            r.open_capacity
        );
        for &n in &open_replicas {
            let mine: Vec<&Cell> = open_policies
                .iter()
                .filter_map(|&pol| find(&r.cells, Scenario::Open, n, pol))
                .collect();
            let _ = writeln!(
                md,
                "### {n} Envoy replica{}\n",
                if n == 1 { "" } else { "s" }
            );
            result_table(&mut md, &mine, "policy", |c| c.policy.name().to_owned());
            let _ = writeln!(md);
        }
        // Summaries against R.
        for (title, f) in [
            (
                "Share of requests that waited for a batch slot",
                (|c: &Cell| pct(c.share_waited_pct())) as fn(&Cell) -> String,
            ),
            ("TTFT P99 (ms)", |c: &Cell| ms(c.stats.ttft_p99_ms)),
            ("P50 (ms)", |c: &Cell| ms(c.stats.p50_ms)),
        ] {
            let _ = writeln!(md, "{title}, by replicas:\n");
            let _ = write!(md, "| policy |");
            for n in &open_replicas {
                let _ = write!(md, " R = {n} |");
            }
            let _ = writeln!(md, "\n|---|{}", "---:|".repeat(open_replicas.len()));
            for &pol in &open_policies {
                let _ = write!(md, "| {} |", pol.name());
                for &n in &open_replicas {
                    let _ = write!(
                        md,
                        " {} |",
                        find(&r.cells, Scenario::Open, n, pol).map_or("-".into(), f)
                    );
                }
                let _ = writeln!(md);
            }
            let _ = writeln!(md);
        }
        let _ = writeln!(
            md,
            "![Share that waited and TTFT P99 against Envoy replicas](replicas.svg)\n"
        );
    }

    // Mixed fleet.
    let mixed: Vec<&Cell> = r
        .cells
        .iter()
        .filter(|c| c.scenario == Scenario::Mixed)
        .collect();
    if !mixed.is_empty() {
        let (a, b) = p.mixed_batches;
        let _ = writeln!(
            md,
            "## Mixed fleet: one Envoy, {} servers x {a} batch slots + {} x {b}\n\nOpen loop at {:.0} % of this fleet's capacity: {:.2} requests/s of {:.2}/s. Weights (where set) are the batch slots, on the cluster's endpoints (`load_balancing_weight`), read by the filter through `admin_cluster`.\n",
            p.servers.div_ceil(2),
            p.servers / 2,
            p.load * 100.0,
            r.mixed_rate,
            r.mixed_capacity
        );
        result_table(&mut md, &mixed, "policy", |c| c.policy.name().to_owned());
        let _ = writeln!(md);
        let batches = p.fleet(Scenario::Mixed);
        for c in mixed.iter().filter(|c| c.policy.weighted()) {
            let _ = writeln!(md, "{}\n", weights_note(c, &batches));
        }
    }

    // Closed loop.
    let closed: Vec<&Cell> = r
        .cells
        .iter()
        .filter(|c| c.scenario == Scenario::Closed)
        .collect();
    if !closed.is_empty() {
        let _ = writeln!(
            md,
            "## Closed loop, users spread unevenly over the replicas\n\n{} users ({} per server = batch slots: perfect balance never queues), no think time. One Envoy sees every request (the exact view); then {} replicas get the users {} (users are pinned to a replica, as a client's keep-alive connection is).\n",
            p.closed_users(),
            p.closed_users_per_server,
            p.closed_replicas(),
            p.closed_users_per_replica()
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
        );
        let exact = find(&r.cells, Scenario::Closed, 1, ReplicaPolicy::LorLocal);
        result_table(&mut md, &closed, "run", |c| {
            let vs = exact
                .filter(|e| !std::ptr::eq(*e, c))
                .and_then(|e| {
                    ratio(
                        Some(e.stats.throughput_per_instance_per_min),
                        Some(c.stats.throughput_per_instance_per_min),
                    )
                })
                .map_or(String::new(), |x| {
                    format!(", throughput {:+.1} % vs exact view", (x - 1.0) * 100.0)
                });
            if c.replicas == 1 {
                format!("1 Envoy (exact view), {}", c.policy.name())
            } else {
                format!("{} replicas, {}{vs}", c.replicas, c.policy.name())
            }
        });
        let _ = writeln!(md);
    }

    // Targets.
    let _ = writeln!(
        md,
        "## Targets\n\nFrom the issue, for model-lb with server load. A target whose policy did not run shows \"-\".\n"
    );
    let _ = writeln!(md, "| target | goal | measured | met |");
    let _ = writeln!(md, "|---|---|---|---|");
    for t in targets(&r.cells, p) {
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
        "CPU time of every process from `/proc/<pid>/stat` (utime + stime), sampled every 250 ms during each run: run average / highest 1-second window, in cores (1.00 = one core); the highest over the rounds. \"Envoy busiest\" is the busiest replica (each has `--concurrency 1`, so 1.00 is its limit), \"all Envoys\" their sum; likewise for the {} servers (one tokio thread each). \"Others\" is the machine's use minus ours (other work on this shared {}-core machine). \"Polls/s\" is per replica: requests Envoy sent upstream that no client sent (`cluster.<name>.upstream_rq_total` - `http.<name>.downstream_rq_total` - retries) during the measured window; with server load it should be {} servers / {interval} ms = {:.0}/s, without it 0. \"Arrivals/s\" is what the load tool sent in the measured windows against what it was asked for.\n",
        p.servers,
        r.machine.nproc,
        p.servers,
        f64::from(p.servers) * 1000.0 / interval as f64
    );
    for verdict in bottleneck_verdicts(&r.cells, r.machine.nproc) {
        let _ = writeln!(md, "- {verdict}");
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "| run | model-load | Envoy busiest | all Envoys | busiest server | all servers | machine | others | polls/s | arrivals/s | dropped |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for c in &r.cells {
        let arrivals = match c.rate_per_s {
            Some(rate) => format!("{:.2} of {rate:.2}", c.achieved_rate_per_s),
            None => format!("{:.2} (closed)", c.achieved_rate_per_s),
        };
        let _ = writeln!(
            md,
            "| {} R={} {} | {} | {} | {:.2} | {} | {:.2} | {} | {:.2} | {} | {arrivals} | {} |",
            c.scenario.id(),
            c.replicas,
            c.policy.short(),
            usage(&c.cpu.load),
            usage(&c.cpu.envoy_busiest),
            c.cpu.envoy_total.average,
            usage(&c.cpu.server_busiest),
            c.cpu.servers_total.average,
            usage(&c.cpu.machine),
            c.cpu.others.average,
            c.polls_per_s_per_replica
                .map_or("-".into(), |v| format!("{v:.0}")),
            c.dropped
        );
    }
    let _ = writeln!(
        md,
        "\nShare that waited per round (how much one round moves):\n"
    );
    let _ = writeln!(md, "| run | per round |");
    let _ = writeln!(md, "|---|---|");
    for c in &r.cells {
        let _ = writeln!(
            md,
            "| {} R={} {} | {} |",
            c.scenario.id(),
            c.replicas,
            c.policy.short(),
            c.round_shares
                .iter()
                .map(|v| pct(*v))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Method.
    let _ = writeln!(md, "\n## How it was measured\n");
    let _ = writeln!(
        md,
        "- **Servers**: {} `model-server` processes, `{}`: a token takes {} ms x (1 + {} x (b - 1)) with b requests decoding, prefill {} ms + {} ms per prompt token, every time x {}; a request that finds all batch slots busy waits in the server's FIFO queue. The mixed fleet restarts them with `--max-batch` {} and {} alternately.",
        p.servers,
        p.server.args().join(" "),
        p.server.tpot_ms,
        p.server.batch_alpha,
        p.server.prefill_base_ms,
        p.server.prefill_per_token_ms,
        p.server.time_scale,
        p.mixed_batches.0,
        p.mixed_batches.1
    );
    let _ = writeln!(
        md,
        "- **Time scale and poll interval**: production polls every 100 ms against requests of several seconds; here every simulated time is x {ts}, so a request of median length at a full batch takes {med:.1} s instead of {med_real:.1} s and the filter polls every {interval} ms (100 ms x {ts}) with `stale_after_ms` {stale} (10 intervals) and `max_polls_per_second` {budget} (the filter's default of 200 for 20 endpoints at 100 ms, scaled alike, so the budget never stretches the interval). Each replica polls every server: {polls:.0} polls/s per replica.",
        ts = p.server.time_scale,
        med = median_service_s(p),
        med_real = median_service_s(p) / p.server.time_scale,
        stale = 10 * interval,
        polls = f64::from(p.servers) * 1000.0 / interval as f64,
    );
    let _ = writeln!(
        md,
        "- **Load**: one `model-load` per run, streaming chat requests, output lengths `{}` (lognormal, sent as `max_tokens`), prompts `{}`. Open loop: `{}` plus one `--url` per replica: Poisson arrivals, each sent to a replica chosen uniformly at random (a cloud load balancer). Closed loop: `--users {}`, user u to URL u mod n. Round k uses seed {} + k for every policy, so every policy gets the same arrivals, the same requests and the same replica for each.",
        p.max_tokens,
        p.prompt_tokens,
        p.load_args(Some(r.open_rate), 0, 0).join(" "),
        p.closed_users(),
        p.seed
    );
    let _ = writeln!(
        md,
        "- **Envoy replicas**: R separate Envoy processes (`--concurrency 1 --disable-hot-restart`), each with the same listener and cluster for the policy under test, started afresh for every run (so no replica polls while another policy is measured, and model-lb starts with empty counts). model-lb policies route through an override_host cluster; Envoy's own are the cluster's `load_balancing_policy`. The weighted variant also has a `{}` cluster pointing at its own Envoy's admin port, picked free before the config is written. {}",
        super::envoy::ADMIN_CLUSTER,
        r.validation
    );
    let _ = writeln!(
        md,
        "- **Runs**: {} round(s); in each, every policy runs once per replica count, the order rotated per replica count and reversed every second round, so drift on this shared machine hits all policies alike. Each run: {} s warm-up + {} s measured; requests started in the window are awaited to the end.",
        p.rounds, p.warmup_s, p.duration_s
    );
    let _ = writeln!(
        md,
        "- **Statistics**: the raw samples of all rounds (`model-load --samples`) are pooled before percentiles are taken (nearest rank). Latency is send to last byte, TTFT send to first content chunk; throughput counts completions that end inside the measured windows, per server and minute. Errors count every failed request, warm-up included."
    );
    md
}

/// Median service time (scaled seconds) at a full batch, by the timing model, for the
/// workload's median prompt and output.
pub fn median_service_s(p: &ReplicasParams) -> f64 {
    let median = |d: &str| match d.parse::<Dist>() {
        Ok(Dist::LogNormal { median, .. }) => median,
        Ok(Dist::Fixed(n)) => n as f64,
        Ok(Dist::Uniform { min, max }) => (min + max) as f64 / 2.0,
        _ => 1.0,
    };
    let timing = p.server.timing();
    timing
        .service_time(
            median(&p.prompt_tokens).round() as u64 + CHAT_TEMPLATE_TOKENS,
            median(&p.max_tokens).round() as u64,
            p.server.max_batch as usize,
        )
        .as_secs_f64()
}

/// Two panels against the number of Envoy replicas (log 2 axis): the share of requests that
/// waited for a batch slot and TTFT P99, one polyline per policy (open loop).
pub fn svg(cells: &[Cell], title: &str) -> String {
    let policies = policies_of(cells, Scenario::Open, &ReplicaPolicy::ALL);
    let xs = replicas_of(cells, Scenario::Open);
    let (panel_w, panel_h) = (460.0_f64, 330.0_f64);
    let (left, right, top, bottom) = (70.0, 28.0, 50.0, 55.0);
    let legend_rows = policies.len().div_ceil(3);
    let height = panel_h + 30.0 + 20.0 * legend_rows as f64 + 10.0;
    type Metric = fn(&Cell) -> Option<f64>;
    let panels: [(&str, Metric); 2] = [
        (
            "Requests that waited for a batch slot (%)",
            Cell::share_waited_pct,
        ),
        ("Time to first token P99 (ms)", |c| c.stats.ttft_p99_ms),
    ];
    let width = panels.len() as f64 * panel_w;
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
    // log2 positions: 1, 2, 4, 8 evenly spaced.
    let lx = |r: u32| f64::from(r.max(1)).log2();
    let x_lo = xs.first().map_or(0.0, |&r| lx(r));
    let x_hi = xs.last().map_or(1.0, |&r| lx(r)).max(x_lo + 1.0);
    for (panel, (label, metric)) in panels.iter().enumerate() {
        let ox = panel as f64 * panel_w;
        let y_data = cells
            .iter()
            .filter(|c| c.scenario == Scenario::Open)
            .filter_map(metric)
            .fold(0.0_f64, f64::max);
        let (step, y_max) = nice_ticks(y_data * 1.05);
        let (x0, x1) = (ox + left, ox + panel_w - right);
        let (y0, y1) = (top + panel_h - bottom, top);
        let px = |r: u32| x0 + 20.0 + (lx(r) - x_lo) / (x_hi - x_lo) * (x1 - x0 - 40.0);
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
        for &x in &xs {
            let _ = writeln!(
                out,
                "<line x1=\"{xx:.1}\" y1=\"{y0:.1}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"black\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x}</text>",
                y0 + 5.0,
                y0 + 18.0,
                xx = px(x)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">Envoy replicas (arrivals split at random)</text>",
            (x0 + x1) / 2.0,
            y0 + 36.0
        );
        // The first policy (model-lb LOR) is drawn last, on top.
        for &policy in policies.iter().rev() {
            let points: Vec<(f64, f64)> = xs
                .iter()
                .filter_map(|&r| {
                    let c = find(cells, Scenario::Open, r, policy)?;
                    Some((px(r), py(metric(c)?)))
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let list: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
                policy.color(),
                list.join(" "),
                esc(policy.name())
            );
            for (x, y) in points {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{}\"/>",
                    policy.color()
                );
            }
        }
        let _ = writeln!(out, "</g>");
    }
    let legend_y = top + panel_h + 5.0;
    for (i, policy) in policies.iter().enumerate() {
        let x = 40.0 + (i % 3) as f64 * 300.0;
        let y = legend_y + (i / 3) as f64 * 20.0;
        let _ = writeln!(
            out,
            "<line x1=\"{x}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{}</text>",
            x + 28.0,
            policy.color(),
            x + 34.0,
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
    use crate::report::Sample;
    use serde_json::Value;

    #[test]
    fn policies_round_trip_and_map_to_their_envoy_variants() {
        for p in ReplicaPolicy::ALL {
            assert_eq!(ReplicaPolicy::from_id(p.id()), Some(p));
        }
        assert_eq!(
            parse_policies("mlb_lor, least_request").unwrap(),
            vec![ReplicaPolicy::LorLocal, ReplicaPolicy::LeastRequest]
        );
        assert!(parse_policies("lor")
            .unwrap_err()
            .contains("mlb_lor_server_load"));
        let batches = [2, 4, 2, 4];
        let plugin = |p: ReplicaPolicy| {
            super::super::envoy::plugin_config(&p.variant((50, 400), &batches), &[1, 2, 3, 4])
        };
        let local = plugin(ReplicaPolicy::LorLocal);
        assert_eq!(local["routing_strategy"], "LEAST_OUTSTANDING_REQUESTS");
        assert!(local.get("server_load").is_none());
        let sl = plugin(ReplicaPolicy::LorServerLoad);
        assert_eq!(sl["pool"], "mlb_lor_server_load");
        assert_eq!(
            sl["server_load"]["cluster"], "mlb_lor_server_load",
            "the polls go through the listener's own cluster"
        );
        assert_eq!(sl["server_load"]["interval_ms"], 50);
        assert_eq!(sl["server_load"]["stale_after_ms"], 500);
        assert!(sl.get("admin_cluster").is_none());
        let w = ReplicaPolicy::LorServerLoadWeighted.variant((50, 400), &batches);
        assert_eq!(w.weights, vec![2, 4, 2, 4]);
        assert!(w.uses_admin_cluster());
        assert_eq!(plugin(ReplicaPolicy::Random)["routing_strategy"], "RANDOM");
        let fs = ReplicaPolicy::LeastRequestFullScan.variant((50, 400), &batches);
        assert!(!fs.policy.uses_filter() && fs.weights.is_empty());
        assert_eq!(fs.name, "least_request_full_scan");
    }

    #[test]
    fn the_plan_interleaves_policies_and_runs_the_mixed_fleet_last() {
        let p = ReplicasParams::full();
        let plan = p.plan();
        // 4 replica counts x 5 policies, the exact view + 3 uneven, 4 mixed.
        assert_eq!(plan.len(), 20 + 4 + 4);
        let open: Vec<&Planned> = plan
            .iter()
            .filter(|r| r.scenario == Scenario::Open)
            .collect();
        assert_eq!(open[0].policy, ReplicaPolicy::LorLocal);
        assert_eq!(
            (open[5].replicas, open[5].policy),
            (2, ReplicaPolicy::LorServerLoad)
        );
        for r in [1, 2, 4, 8] {
            let mut ps: Vec<ReplicaPolicy> = open
                .iter()
                .filter(|x| x.replicas == r)
                .map(|x| x.policy)
                .collect();
            ps.sort();
            assert_eq!(ps, ReplicaPolicy::OPEN.to_vec());
        }
        let closed: Vec<&Planned> = plan
            .iter()
            .filter(|r| r.scenario == Scenario::Closed)
            .collect();
        assert_eq!(
            (closed[0].replicas, closed[0].policy),
            (1, ReplicaPolicy::LorLocal)
        );
        assert!(closed[1..].iter().all(|r| r.replicas == 4));
        assert!(plan[24..]
            .iter()
            .all(|r| r.scenario == Scenario::Mixed && r.replicas == 1));
        // A second round mirrors the first.
        let two = ReplicasParams {
            rounds: 2,
            scenarios: vec![Scenario::Open],
            replicas: vec![4],
            ..ReplicasParams::full()
        }
        .plan();
        let ids: Vec<&str> = two.iter().map(|r| r.policy.id()).collect();
        assert_eq!(
            &ids[..5],
            [
                "mlb_lor",
                "mlb_lor_server_load",
                "least_request_full_scan",
                "least_request",
                "mlb_random"
            ]
        );
        assert_eq!(
            &ids[5..],
            [
                "mlb_random",
                "least_request",
                "least_request_full_scan",
                "mlb_lor_server_load",
                "mlb_lor"
            ]
        );
        assert_eq!(two[5].round, 1);
    }

    #[test]
    fn the_arrival_rate_follows_the_fleet_capacity() {
        let p = ReplicasParams {
            max_tokens: "fixed:100".into(),
            prompt_tokens: "fixed:98".into(),
            server: ServerParams {
                time_scale: 1.0,
                ..ReplicasParams::full().server
            },
            ..ReplicasParams::full()
        };
        // Prefill 40 + 0.2 x 100 tokens (98 + the chat template), 100 tokens at batch 4:
        // 60 + 100 x 20 x 1.45 = 2960 ms; at batch 2: 60 + 100 x 23 = 2360 ms.
        assert!((p.mean_service_s(4, 10).unwrap() - 2.96).abs() < 1e-6);
        let uniform = p.capacity_per_s(&p.fleet(Scenario::Open)).unwrap();
        assert!((uniform - 20.0 * 4.0 / 2.96).abs() < 1e-6, "{uniform}");
        let mixed_fleet = p.fleet(Scenario::Mixed);
        assert_eq!(&mixed_fleet[..4], [2, 4, 2, 4]);
        let mixed = p.capacity_per_s(&mixed_fleet).unwrap();
        assert!((mixed - (10.0 * 2.0 / 2.36 + 10.0 * 4.0 / 2.96)).abs() < 1e-6);
        // The full workload: heavy-tailed, a few seconds per request at half speed.
        let full = ReplicasParams::full();
        let s = full.mean_service_s(4, 100_000).unwrap();
        assert!((3.0..3.7).contains(&s), "{s}");
        assert!((2.0..2.3).contains(&median_service_s(&full)));
        assert_eq!(full.polling(), (50, 400));
        let bad = ReplicasParams {
            max_tokens: "nope".into(),
            ..ReplicasParams::full()
        };
        assert!(bad.capacity_per_s(&[4]).is_err());
    }

    #[test]
    fn load_flags_and_the_uneven_closed_loop() {
        let p = ReplicasParams::full();
        let open = p.load_args(Some(20.456), 0, 1);
        let after = |args: &[String], flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(after(&open, "--rate"), "20.456");
        assert_eq!(after(&open, "--seed"), "12");
        assert_eq!(after(&open, "--instances"), "20");
        assert!(!open.contains(&"--users".to_owned()));
        assert!(open.contains(&"--stream".to_owned()));
        let closed = p.load_args(None, 80, 0);
        assert_eq!(after(&closed, "--users"), "80");
        assert!(!closed.contains(&"--rate".to_owned()));
        // 80 users over [a a a b c d]: user u goes to entry u mod 6.
        assert_eq!(p.closed_users_per_replica(), vec![41, 13, 13, 13]);
        let urls: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(p.closed_urls(&urls), ["a", "a", "a", "b", "c", "d"]);
        assert_eq!(
            ReplicasParams::smoke().closed_users_per_replica(),
            vec![12, 4]
        );
    }

    #[test]
    fn waits_come_from_the_servers_counters() {
        let text = "# HELP model_sim_requests_admitted_total x\n# TYPE model_sim_requests_admitted_total counter\nmodel_sim_requests_admitted_total{model_name=\"sim-model\"} 120\nmodel_sim_requests_queued_total{model_name=\"sim-model\"} 7\nmodel_sim_requests_queued_totalx 99\n";
        let a = WaitCounts::parse(text).unwrap();
        assert_eq!(
            a,
            WaitCounts {
                admitted: 120,
                queued: 7
            }
        );
        assert_eq!(
            WaitCounts::parse(
                "model_sim_requests_admitted_total 3\nmodel_sim_requests_queued_total 1\n"
            ),
            Some(WaitCounts {
                admitted: 3,
                queued: 1
            })
        );
        assert_eq!(WaitCounts::parse("vllm:num_requests_running 0\n"), None);
        let before = [
            a,
            WaitCounts {
                admitted: 10,
                queued: 0,
            },
        ];
        let after = [
            WaitCounts {
                admitted: 220,
                queued: 12,
            },
            // Restarted: counts from zero.
            WaitCounts {
                admitted: 5,
                queued: 1,
            },
        ];
        let d = WaitCounts::delta(&before, &after);
        assert_eq!(
            d,
            WaitCounts {
                admitted: 105,
                queued: 6
            }
        );
        assert!((d.share_pct().unwrap() - 600.0 / 105.0).abs() < 1e-9);
        assert_eq!(WaitCounts::default().share_pct(), None);
    }

    #[test]
    fn weights_come_from_the_filters_gauges() {
        let stats = "wasmcustom.model_lb.w.endpoint.127.0.0.1:8001.weight: 2\nwasmcustom.model_lb.w.endpoint.127.0.0.1:8002.weight: 4\nwasmcustom.model_lb.w.endpoint.127.0.0.1:8002.in_flight: 3\n";
        assert_eq!(
            weights_from_stats(stats, "w", &[8001, 8002, 8003]),
            vec![Some(2), Some(4), None]
        );
        let mut cell = cells(&runs())
            .into_iter()
            .find(|c| c.policy.weighted())
            .unwrap();
        let batches = ReplicasParams::full().fleet(Scenario::Mixed);
        assert!(weights_note(&cell, &batches).contains("applied the configured weights"));
        cell.weights_seen[1] = None;
        assert!(
            weights_note(&cell, &batches).contains("gauges (2 ? 2 4"),
            "{}",
            weights_note(&cell, &batches)
        );
    }

    #[test]
    fn polls_are_upstream_requests_no_client_sent() {
        let stats = "cluster.mlb_lor_server_load.upstream_rq_total: 1500\ncluster.mlb_lor_server_load.upstream_rq_retry: 2\nhttp.mlb_lor_server_load.downstream_rq_total: 300\ncluster.mlb_lor.upstream_rq_total: 9\n";
        assert_eq!(polls_from_stats(stats, "mlb_lor_server_load"), Some(1198));
        assert_eq!(polls_from_stats(stats, "mlb_lor"), Some(9));
        assert_eq!(polls_from_stats(stats, "other"), None);
    }

    fn sample(start: f64, latency: f64, ttft: f64, warmup: bool) -> Sample {
        Sample {
            start_ms: start,
            end_ms: start + latency,
            latency_ms: latency,
            ttft_ms: Some(ttft),
            tokens: 100,
            prompt_tokens: 300,
            max_tokens: Some(100),
            status: Some(200),
            error: None,
            warmup,
            backend: Some("b".into()),
            group: None,
        }
    }

    fn replica_run(
        scenario: Scenario,
        replicas: u32,
        policy: ReplicaPolicy,
        round: u32,
        latency: f64,
        ttft: f64,
        waits: (u64, u64),
    ) -> ReplicaRun {
        let mut samples: Vec<Sample> = (0..100)
            .map(|i| sample(1000.0 + f64::from(i) * 50.0, latency, ttft, false))
            .collect();
        samples.push(sample(10.0, latency, ttft, true));
        ReplicaRun {
            scenario,
            replicas,
            policy,
            run: Run {
                policy: policy.base(),
                users: 0,
                instances: 20,
                round,
                samples,
                warmup_s: 1.0,
                duration_s: 10.0,
            },
            rate_per_s: (scenario != Scenario::Closed).then_some(10.0),
            users: (scenario == Scenario::Closed).then_some(80),
            users_per_replica: vec![],
            waits: WaitCounts {
                admitted: waits.0,
                queued: waits.1,
            },
            cpu: Cpu {
                envoy_busiest: Usage {
                    average: 0.1 * f64::from(round + 1),
                    peak: 0.2,
                },
                ..Cpu::default()
            },
            weights_seen: if policy.weighted() {
                ReplicasParams::full()
                    .fleet(Scenario::Mixed)
                    .iter()
                    .map(|&b| Some(u64::from(b)))
                    .collect()
            } else {
                Vec::new()
            },
            polls_per_s_per_replica: Some(if policy.needs_server_load() {
                400.0
            } else {
                0.0
            }),
        }
    }

    fn runs() -> Vec<ReplicaRun> {
        use ReplicaPolicy::*;
        vec![
            replica_run(Scenario::Open, 1, LorServerLoad, 0, 1000.0, 50.0, (100, 1)),
            replica_run(Scenario::Open, 1, LorServerLoad, 1, 1000.0, 50.0, (100, 3)),
            replica_run(Scenario::Open, 4, LorServerLoad, 0, 1050.0, 54.0, (200, 4)),
            replica_run(Scenario::Open, 8, LorServerLoad, 0, 1200.0, 60.0, (200, 12)),
            replica_run(Scenario::Open, 1, LorLocal, 0, 1000.0, 50.0, (100, 2)),
            replica_run(Scenario::Open, 8, LorLocal, 0, 1500.0, 400.0, (100, 30)),
            replica_run(
                Scenario::Mixed,
                1,
                LorServerLoadWeighted,
                0,
                1000.0,
                50.0,
                (100, 4),
            ),
            replica_run(Scenario::Mixed, 1, LorLocal, 0, 1000.0, 500.0, (100, 22)),
            replica_run(Scenario::Closed, 1, LorLocal, 0, 1000.0, 50.0, (100, 0)),
            replica_run(
                Scenario::Closed,
                4,
                LorServerLoad,
                0,
                1000.0,
                50.0,
                (100, 1),
            ),
        ]
    }

    #[test]
    fn rounds_pool_into_cells_with_the_servers_share() {
        let cells = cells(&runs());
        assert_eq!(cells.len(), 9);
        // Report order: scenario, replicas, policy.
        assert_eq!(
            (cells[0].scenario, cells[0].replicas, cells[0].policy),
            (Scenario::Open, 1, ReplicaPolicy::LorLocal)
        );
        let one = find(&cells, Scenario::Open, 1, ReplicaPolicy::LorServerLoad).unwrap();
        assert_eq!(
            one.waits,
            WaitCounts {
                admitted: 200,
                queued: 4
            }
        );
        assert_eq!(one.share_waited_pct(), Some(2.0));
        assert_eq!(one.round_shares, vec![Some(1.0), Some(3.0)]);
        assert_eq!(one.stats.requests, 200, "warm-up left out");
        assert!((one.achieved_rate_per_s - 10.0).abs() < 1e-9);
        assert_eq!(one.cpu.envoy_busiest.average, 0.2, "the worse round");
        assert_eq!(one.polls_per_s_per_replica, Some(400.0));
        let row = serde_json::to_value(one.row()).unwrap();
        let mut keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "arrival_rate_per_s",
                "errors",
                "p50_ms",
                "p99_ms",
                "policy",
                "replicas",
                "requests",
                "scenario",
                "share_waited_pct",
                "throughput_per_instance_per_min",
                "ttft_p99_ms",
                "users"
            ]
        );
        assert_eq!(row["scenario"], "open");
        assert_eq!(row["share_waited_pct"], 2.0);
        let parsed: Vec<Value> = serde_json::from_str(&json(&cells)).unwrap();
        assert_eq!(parsed.len(), 9);
    }

    #[test]
    fn targets_compare_server_load_with_its_own_one_replica_run() {
        let cells = cells(&runs());
        let t = targets(&cells, &ReplicasParams::full());
        let met: Vec<Option<bool>> = t.iter().map(|t| t.met).collect();
        // Share at 4 (2 % <= 3 %) met, at 8 (6 % > 5 %) missed; P50 at 4 +5 % met, TTFT P99 at 4
        // +8 % met; at 8 P50 +20 % and TTFT +20 % missed; mixed: server load not run, weighted
        // 4 % met; closed: the same throughput.
        assert_eq!(
            met,
            [
                Some(true),
                Some(false),
                Some(true),
                Some(true),
                Some(false),
                Some(false),
                None,
                Some(true),
                Some(true)
            ],
            "{t:#?}"
        );
        assert_eq!(t[2].measured, "1050 vs 1000 ms (+5.0 %)");
        assert_eq!(t[6].measured, "-");
    }

    fn report() -> ReplicasReport {
        ReplicasReport {
            params: ReplicasParams::full(),
            cells: cells(&runs()),
            machine: Machine {
                date: "2026-12-01".into(),
                nproc: 2,
                cpu_model: "cpu".into(),
                envoy_version: "1.40.0".into(),
                commit: "abc".into(),
            },
            open_rate: 20.5,
            open_capacity: 24.1,
            mixed_rate: 16.7,
            mixed_capacity: 19.6,
            skipped: vec!["nothing <really>".into()],
            validation: "validated".into(),
            elapsed_s: 10.0,
            smoke: false,
        }
    }

    #[test]
    fn the_markdown_has_a_table_per_replica_count_and_every_section() {
        let md = markdown(&report());
        for needle in [
            "## Open loop: 20 servers x 4 batch slots",
            "### 1 Envoy replica\n",
            "### 4 Envoy replicas\n",
            "### 8 Envoy replicas\n",
            "| model-lb LOR + server load | 1000 | 1000 | 50 | ",
            "| 2.0 % | 200 | 0 |",
            "## Mixed fleet: one Envoy, 10 servers x 2 batch slots + 10 x 4",
            "## Closed loop, users spread unevenly",
            "41 / 13 / 13 / 13",
            "| 4 replicas, model-lb LOR + server load, throughput +0.0 % vs exact view |",
            "## Targets",
            "## Bottleneck checks",
            "| open R=1 LOR + server load | 0.00 / 0.00 | 0.20 / 0.20 |",
            "## How it was measured",
            "polls every 50 ms (100 ms x 0.5)",
            "**Not run:** nothing <really>",
            "![Share that waited and TTFT P99 against Envoy replicas](replicas.svg)",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
        // The summary against R: one column per replica count.
        assert!(md.contains("| policy | R = 1 | R = 4 | R = 8 |"), "{md}");
        assert!(
            md.contains("| model-lb LOR, local counts | 2.0 % | - | 30.0 % |"),
            "{md}"
        );
    }

    #[test]
    fn bottleneck_verdicts_name_the_busiest_process_and_a_saturated_machine() {
        let mut cells = cells(&runs());
        let v = bottleneck_verdicts(&cells, 2);
        assert_eq!(v.len(), 4);
        assert!(
            v[1].starts_with("Busiest an Envoy replica: 0.20 of its 1 core"),
            "{v:?}"
        );
        assert!(v[1].ends_with("far from its limit."), "{v:?}");
        assert!(v[3].starts_with("The machine stayed below 90 %"), "{v:?}");
        cells[0].cpu.server_busiest.peak = 0.95;
        cells[1].cpu.machine.average = 1.9;
        cells[1].cpu.others.average = 1.2;
        let v = bottleneck_verdicts(&cells, 2);
        assert!(v[2].contains("possible bottleneck"), "{v:?}");
        assert!(
            v[3].contains(
                "in 1 of 9 runs, ours using up to 0.70 cores and other processes up to 1.20"
            ),
            "{v:?}"
        );
    }

    #[test]
    fn the_svg_draws_two_panels_against_replicas() {
        let svg = svg(&cells(&runs()), "t <&>");
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let count = |tag: &str| {
            doc.descendants()
                .filter(|n| n.tag_name().name() == tag)
                .count()
        };
        // Open loop only: two policies, two panels.
        assert_eq!(count("polyline"), 4);
        assert_eq!(
            doc.descendants()
                .filter(|n| n.attribute("class") == Some("panel"))
                .count(),
            2
        );
        // LOR local at 1 and 8, server load at 1, 4 and 8; twice.
        assert_eq!(count("circle"), 10);
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        assert!(texts.contains(&"t <&>"));
        assert!(texts.contains(&"Requests that waited for a batch slot (%)"));
        assert!(texts.contains(&"model-lb LOR + server load"));
        // x ticks 1, 4, 8 on a log axis: 4 sits at 2/3 of the way.
        let xs: Vec<f64> = doc
            .descendants()
            .filter(|n| {
                n.tag_name().name() == "text" && ["1", "4", "8"].contains(&n.text().unwrap_or(""))
            })
            .take(3)
            .map(|n| n.attribute("x").unwrap().parse().unwrap())
            .collect();
        assert!(
            ((xs[1] - xs[0]) / (xs[2] - xs[0]) - 2.0 / 3.0).abs() < 0.01,
            "{xs:?}"
        );
    }
}
