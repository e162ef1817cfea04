//! The pure parts of `model-bench` (the binary only starts processes and feeds these):
//!
//! * [`envoy`]: Envoy configurations for every policy, generated as JSON.
//! * [`pool`]: pooling the raw samples of several rounds into one row per (policy, size), the
//!   ideal, the ratios, and the timing-model check.
//! * [`render`]: `seed-matrix.json`, `.md` and `.svg`.
//! * [`overhead`]: the proxy-overhead benchmark's aggregation and report.
//! * [`replicas`]: several Envoy replicas in front of the same servers: the plan, the arrival
//!   rate, the share of requests that waited, the targets and the reports.
//! * [`prefix`]: PREFIX_AWARE against LOR, RANDOM and Envoy's balancers (consistent hashing
//!   included) on shared-prefix, unique and hot-prefix workloads: the plan, the servers'
//!   prefix-cache hit rate, the load guard's check, the targets and the reports.
//! * [`procstat`]: CPU time from `/proc`.

pub mod envoy;
pub mod overhead;
pub mod pool;
pub mod prefix;
pub mod procstat;
pub mod render;
pub mod replicas;

use crate::model::TimingModel;

/// The policies compared, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    ModelLbLor,
    ModelLbRandom,
    RoundRobin,
    LeastRequest,
    LeastRequestFullScan,
    /// model-lb `PREFIX_AWARE` (with the hold filter); not in the matrix.
    ModelLbPrefixAware,
    /// Envoy's consistent hashing on a request header; not in the matrix.
    RingHash,
    Maglev,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::ModelLbLor,
        Policy::ModelLbRandom,
        Policy::RoundRobin,
        Policy::LeastRequest,
        Policy::LeastRequestFullScan,
    ];

    /// Name in reports (`policy` in `seed-matrix.json`).
    pub fn name(self) -> &'static str {
        match self {
            Self::ModelLbLor => "model-lb LEAST_OUTSTANDING_REQUESTS",
            Self::ModelLbRandom => "model-lb RANDOM",
            Self::RoundRobin => "Envoy ROUND_ROBIN",
            Self::LeastRequest => "Envoy LEAST_REQUEST",
            Self::LeastRequestFullScan => "Envoy LEAST_REQUEST FULL_SCAN",
            Self::ModelLbPrefixAware => "model-lb PREFIX_AWARE",
            Self::RingHash => "Envoy RING_HASH",
            Self::Maglev => "Envoy MAGLEV",
        }
    }

    /// Short id: Envoy listener, cluster and plugin `pool` name; `--policies` value.
    pub fn id(self) -> &'static str {
        match self {
            Self::ModelLbLor => "mlb_lor",
            Self::ModelLbRandom => "mlb_random",
            Self::RoundRobin => "round_robin",
            Self::LeastRequest => "least_request",
            Self::LeastRequestFullScan => "least_request_full_scan",
            Self::ModelLbPrefixAware => "mlb_prefix",
            Self::RingHash => "ring_hash",
            Self::Maglev => "maglev",
        }
    }

    pub fn from_id(id: &str) -> Option<Policy> {
        Self::ALL.into_iter().find(|p| p.id() == id)
    }

    pub fn from_name(name: &str) -> Option<Policy> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether the model-lb filter routes (override_host cluster) or Envoy's balancer does.
    pub fn uses_filter(self) -> bool {
        matches!(
            self,
            Self::ModelLbLor | Self::ModelLbRandom | Self::ModelLbPrefixAware
        )
    }

    /// Whether Envoy picks the host by hashing a request header (the route's `hash_policy`).
    pub fn hashes(self) -> bool {
        matches!(self, Self::RingHash | Self::Maglev)
    }

    pub fn color(self) -> &'static str {
        match self {
            Self::ModelLbLor => "#d62728",
            Self::ModelLbRandom => "#1f77b4",
            Self::RoundRobin => "#7f7f7f",
            Self::LeastRequest => "#2ca02c",
            Self::LeastRequestFullScan => "#9467bd",
            Self::ModelLbPrefixAware => "#ff7f0e",
            Self::RingHash => "#8c564b",
            Self::Maglev => "#e377c2",
        }
    }
}

/// The simulated servers' flags (see `sim/README.md`, timing model).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerParams {
    pub max_batch: u32,
    pub tpot_ms: f64,
    pub batch_alpha: f64,
    pub prefill_base_ms: f64,
    pub prefill_per_token_ms: f64,
    pub time_scale: f64,
    pub tokens_per_chunk: u32,
}

impl ServerParams {
    pub fn args(&self) -> Vec<String> {
        [
            ("--max-batch", self.max_batch.to_string()),
            ("--tpot-ms", self.tpot_ms.to_string()),
            ("--batch-alpha", self.batch_alpha.to_string()),
            ("--prefill-base-ms", self.prefill_base_ms.to_string()),
            (
                "--prefill-per-token-ms",
                self.prefill_per_token_ms.to_string(),
            ),
            ("--time-scale", self.time_scale.to_string()),
            ("--tokens-per-chunk", self.tokens_per_chunk.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }

    pub fn timing(&self) -> TimingModel {
        TimingModel {
            tpot_ms: self.tpot_ms,
            batch_alpha: self.batch_alpha,
            prefill_base_ms: self.prefill_base_ms,
            prefill_per_token_ms: self.prefill_per_token_ms,
            time_scale: self.time_scale,
        }
    }
}

/// Everything that defines a matrix run.
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixParams {
    /// (users, instances).
    pub sizes: Vec<(u32, u32)>,
    pub policies: Vec<Policy>,
    /// Each policy runs once per round; rounds use seeds `seed`, `seed + 1`, ...
    pub rounds: u32,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub seed: u64,
    pub server: ServerParams,
    /// `model-load --max-tokens` and `--prompt-tokens`.
    pub max_tokens: String,
    pub prompt_tokens: String,
    pub envoy_concurrency: u32,
    /// `model-load --threads`.
    pub load_threads: u32,
}

/// SageMaker's matrix: 4 users per instance.
pub const SAGEMAKER_SIZES: [(u32, u32); 5] = [(4, 1), (20, 5), (40, 10), (60, 15), (80, 20)];

impl MatrixParams {
    /// `make bench`: the demo's servers and workload (`demo/workload.env`), 2.5x faster.
    pub fn full() -> Self {
        Self {
            sizes: SAGEMAKER_SIZES.to_vec(),
            policies: Policy::ALL.to_vec(),
            rounds: 2,
            warmup_s: 2.0,
            duration_s: 10.0,
            seed: 7,
            server: ServerParams {
                max_batch: 6,
                tpot_ms: 20.0,
                batch_alpha: 0.15,
                prefill_base_ms: 40.0,
                prefill_per_token_ms: 0.2,
                time_scale: 0.1,
                tokens_per_chunk: 4,
            },
            max_tokens: "lognormal:150:0.9:1500".into(),
            prompt_tokens: "lognormal:300:0.8:3000".into(),
            envoy_concurrency: 2,
            load_threads: 1,
        }
    }

    /// `--smoke`: the plumbing only, in seconds.
    pub fn smoke() -> Self {
        Self {
            sizes: vec![(4, 1), (8, 2)],
            rounds: 1,
            warmup_s: 0.3,
            duration_s: 1.2,
            max_tokens: "lognormal:20:0.5:60".into(),
            prompt_tokens: "fixed:50".into(),
            ..Self::full()
        }
    }

    /// `model-load` flags of one run (target and output files excluded).
    pub fn load_args(&self, users: u32, instances: u32, round: u32) -> Vec<String> {
        [
            ("--users", users.to_string()),
            ("--instances", instances.to_string()),
            ("--warmup", self.warmup_s.to_string()),
            ("--duration", self.duration_s.to_string()),
            ("--seed", (self.seed + u64::from(round)).to_string()),
            ("--max-tokens", self.max_tokens.clone()),
            ("--prompt-tokens", self.prompt_tokens.clone()),
            ("--threads", self.load_threads.to_string()),
            ("--api", "chat".into()),
            ("--timeout", "120".into()),
            ("--drain-timeout", "120".into()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .chain(["--stream".to_owned(), "--quiet".to_owned()])
        .collect()
    }

    /// The order of the policies in `round` for the size at `size_index`: the start rotates with
    /// the size, and every second round runs the reverse order, so a drift in machine speed
    /// over a size's rounds hits every policy alike (A B C D E, then E D C B A).
    pub fn order(&self, size_index: usize, round: u32) -> Vec<Policy> {
        let mut order = self.policies.clone();
        if !order.is_empty() {
            let n = order.len();
            order.rotate_left(size_index % n);
        }
        if round % 2 == 1 {
            order.reverse();
        }
        order
    }
}

/// Parses `4x1,20x5` into sizes.
pub fn parse_sizes(text: &str) -> Result<Vec<(u32, u32)>, String> {
    text.split(',')
        .map(|s| {
            let (u, i) = s
                .trim()
                .split_once('x')
                .ok_or_else(|| format!("size {s:?} is not USERSxINSTANCES"))?;
            let users: u32 = u.parse().map_err(|_| format!("bad users in {s:?}"))?;
            let instances: u32 = i.parse().map_err(|_| format!("bad instances in {s:?}"))?;
            if users == 0 || instances == 0 {
                return Err(format!("size {s:?} needs at least 1 user and 1 instance"));
            }
            Ok((users, instances))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_by_id_and_name() {
        for p in Policy::ALL {
            assert_eq!(Policy::from_id(p.id()), Some(p));
            assert_eq!(Policy::from_name(p.name()), Some(p));
        }
        assert_eq!(Policy::from_id("lor"), None);
        assert_eq!(
            Policy::ALL.iter().filter(|p| p.uses_filter()).count(),
            2,
            "two model-lb policies"
        );
    }

    #[test]
    fn the_order_rotates_per_size_and_mirrors_every_second_round() {
        let p = MatrixParams::full();
        let ids = |v: Vec<Policy>| v.iter().map(|p| p.id()).collect::<Vec<_>>().join(" ");
        assert_eq!(
            ids(p.order(0, 0)),
            "mlb_lor mlb_random round_robin least_request least_request_full_scan"
        );
        assert_eq!(
            ids(p.order(0, 1)),
            "least_request_full_scan least_request round_robin mlb_random mlb_lor"
        );
        assert_eq!(
            ids(p.order(1, 0)),
            "mlb_random round_robin least_request least_request_full_scan mlb_lor"
        );
        // Over a mirrored pair of rounds every policy's mean position is the same.
        for size in 0..5 {
            let mut pos = std::collections::HashMap::new();
            for round in 0..2 {
                for (i, policy) in p.order(size, round).into_iter().enumerate() {
                    *pos.entry(policy).or_insert(0) += i;
                }
            }
            assert!(pos.values().all(|&v| v == 4), "{pos:?}");
        }
    }

    #[test]
    fn load_and_server_flags() {
        let p = MatrixParams::full();
        let args = p.load_args(20, 5, 1);
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(after("--users"), "20");
        assert_eq!(after("--instances"), "5");
        assert_eq!(after("--seed"), "8", "round 1 uses seed + 1");
        assert_eq!(after("--max-tokens"), "lognormal:150:0.9:1500");
        assert!(args.contains(&"--stream".to_owned()));
        let server = p.server.args().join(" ");
        assert!(server.contains("--max-batch 6") && server.contains("--time-scale 0.1"));
        assert_eq!(p.server.timing().tpot_ms_at(4), 20.0 * 1.45);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_sizes("4x1, 20x5").unwrap(), vec![(4, 1), (20, 5)]);
        assert!(parse_sizes("4").is_err());
        assert!(parse_sizes("0x1").is_err());
    }
}
