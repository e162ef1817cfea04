//! From raw samples to results: several rounds of one (policy, size) are pooled into one
//! sample before any percentile is taken (a percentile of percentiles would be wrong), the
//! timing model says what the latency and throughput of the very same requests would be under
//! perfect balance (the ideal).

use serde::Serialize;

use super::Policy;
use crate::model::TimingModel;
use crate::report::Sample;
use crate::stats::{percentile_sorted, sorted};

/// The raw result of one `model-load` run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub policy: Policy,
    pub users: u32,
    pub instances: u32,
    pub round: u32,
    pub samples: Vec<Sample>,
    pub warmup_s: f64,
    pub duration_s: f64,
}

impl Run {
    fn measured(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| !s.warmup)
    }

    fn ok(&self) -> impl Iterator<Item = &Sample> {
        self.measured().filter(|s| s.error.is_none())
    }

    /// Successful completions that end inside the measurement window.
    fn completions_in_window(&self) -> u64 {
        let (from, to) = (self.warmup_s * 1e3, (self.warmup_s + self.duration_s) * 1e3);
        self.samples
            .iter()
            .filter(|s| s.error.is_none() && s.end_ms >= from && s.end_ms <= to)
            .count() as u64
    }
}

/// Pooled statistics of a set of runs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    pub requests: u64,
    pub ok: u64,
    /// Failed requests, warm-up included: nothing is hidden.
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub throughput_per_instance_per_min: f64,
}

impl Stats {
    pub fn of(runs: &[&Run]) -> Stats {
        let latencies = sorted(
            &runs
                .iter()
                .flat_map(|r| r.ok().map(|s| s.latency_ms))
                .collect::<Vec<_>>(),
        );
        let ttfts = sorted(
            &runs
                .iter()
                .flat_map(|r| r.ok().filter_map(|s| s.ttft_ms))
                .collect::<Vec<_>>(),
        );
        // Instance-seconds measured: every run's window times its instances.
        let instance_seconds: f64 = runs
            .iter()
            .map(|r| r.duration_s * f64::from(r.instances))
            .sum();
        let completions: u64 = runs.iter().map(|r| r.completions_in_window()).sum();
        Stats {
            requests: runs.iter().map(|r| r.measured().count() as u64).sum(),
            ok: latencies.len() as u64,
            errors: runs
                .iter()
                .map(|r| r.samples.iter().filter(|s| s.error.is_some()).count() as u64)
                .sum(),
            p50_ms: percentile_sorted(&latencies, 50.0),
            p99_ms: percentile_sorted(&latencies, 99.0),
            ttft_p99_ms: percentile_sorted(&ttfts, 99.0),
            throughput_per_instance_per_min: if instance_seconds > 0.0 {
                completions as f64 * 60.0 / instance_seconds
            } else {
                0.0
            },
        }
    }
}

/// What the timing model predicts for the very requests that were measured, if every server
/// always had exactly `batch` requests decoding (perfect balance: users / instances).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelCheck {
    pub batch: usize,
    pub predicted_p50_ms: Option<f64>,
    pub predicted_p99_ms: Option<f64>,
    pub predicted_mean_ms: Option<f64>,
    /// Median over requests of measured / predicted latency.
    pub median_ratio: Option<f64>,
}

impl ModelCheck {
    pub fn of(runs: &[&Run], timing: &TimingModel, batch: usize) -> ModelCheck {
        let mut predicted = Vec::new();
        let mut ratios = Vec::new();
        for s in runs.iter().flat_map(|r| r.ok()) {
            let p = timing
                .service_time(s.prompt_tokens, s.tokens, batch)
                .as_secs_f64()
                * 1e3;
            if p > 0.0 {
                predicted.push(p);
                ratios.push(s.latency_ms / p);
            }
        }
        let predicted = sorted(&predicted);
        let mean =
            (!predicted.is_empty()).then(|| predicted.iter().sum::<f64>() / predicted.len() as f64);
        ModelCheck {
            batch,
            predicted_mean_ms: mean,
            predicted_p50_ms: percentile_sorted(&predicted, 50.0),
            predicted_p99_ms: percentile_sorted(&predicted, 99.0),
            median_ratio: percentile_sorted(&sorted(&ratios), 50.0),
        }
    }

    /// Whether measured P50 and P99 are within `tolerance` (0.1 = 10 %) of the prediction.
    pub fn within(&self, stats: &Stats, tolerance: f64) -> bool {
        let close = |m: Option<f64>, p: Option<f64>| match (m, p) {
            (Some(m), Some(p)) if p > 0.0 => (m / p - 1.0).abs() <= tolerance,
            _ => false,
        };
        close(stats.p50_ms, self.predicted_p50_ms) && close(stats.p99_ms, self.predicted_p99_ms)
    }
}

/// One (policy, size) of the matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub policy: Policy,
    pub users: u32,
    pub instances: u32,
    pub stats: Stats,
    /// Each round's own P99 (how noisy one round is).
    pub round_p99_ms: Vec<Option<f64>>,
    pub model: ModelCheck,
    /// Smallest and largest share of measured requests any instance served, in percent.
    pub share_min_max: Option<(f64, f64)>,
}

/// One line of `seed-matrix.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub policy: String,
    pub users: u32,
    pub instances: u32,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub throughput_per_instance_per_min: f64,
    pub errors: u64,
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

impl Cell {
    pub fn row(&self) -> Row {
        Row {
            policy: self.policy.name().to_owned(),
            users: self.users,
            instances: self.instances,
            p50_ms: self.stats.p50_ms.map(round1),
            p99_ms: self.stats.p99_ms.map(round1),
            ttft_p99_ms: self.stats.ttft_p99_ms.map(round1),
            throughput_per_instance_per_min: round1(self.stats.throughput_per_instance_per_min),
            errors: self.stats.errors,
        }
    }
}

/// Groups runs into cells, in the order of `sizes` then `policies`.
pub fn cells(
    runs: &[Run],
    sizes: &[(u32, u32)],
    policies: &[Policy],
    timing: &TimingModel,
    max_batch: usize,
) -> Vec<Cell> {
    let mut out = Vec::new();
    for &(users, instances) in sizes {
        for &policy in policies {
            let mut mine: Vec<&Run> = runs
                .iter()
                .filter(|r| r.policy == policy && r.users == users && r.instances == instances)
                .collect();
            if mine.is_empty() {
                continue;
            }
            mine.sort_by_key(|r| r.round);
            let batch = balanced_batch(users, instances, max_batch);
            out.push(Cell {
                policy,
                users,
                instances,
                stats: Stats::of(&mine),
                round_p99_ms: mine.iter().map(|r| Stats::of(&[r]).p99_ms).collect(),
                model: ModelCheck::of(&mine, timing, batch),
                share_min_max: share_min_max(&mine, instances),
            });
        }
    }
    out
}

fn share_min_max(runs: &[&Run], instances: u32) -> Option<(f64, f64)> {
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    for s in runs.iter().flat_map(|r| r.measured()) {
        if let Some(b) = s.backend.as_deref() {
            *counts.entry(b).or_default() += 1;
        }
    }
    let total: u64 = counts.values().sum();
    if total == 0 {
        return None;
    }
    let max = counts.values().copied().max().unwrap_or(0);
    // An instance that served nothing does not appear at all.
    let min = if counts.len() < instances as usize {
        0
    } else {
        counts.values().copied().min().unwrap_or(0)
    };
    let pct = |v: u64| 100.0 * v as f64 / total as f64;
    Some((pct(min), pct(max)))
}

/// Perfect balance at one size: what the timing model predicts for the requests measured at
/// that size if every instance always held exactly users / instances of them. All policies'
/// runs are pooled (each user sends the same request sequence under every policy), so every
/// policy is compared with the same requests, never with another size's workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Ideal {
    pub users: u32,
    pub instances: u32,
    pub model: ModelCheck,
    /// Closed loop, no think time: each instance completes `batch` requests per mean
    /// service time.
    pub throughput_per_instance_per_min: Option<f64>,
}

pub fn ideals(
    runs: &[Run],
    sizes: &[(u32, u32)],
    timing: &TimingModel,
    max_batch: usize,
) -> Vec<Ideal> {
    sizes
        .iter()
        .filter_map(|&(users, instances)| {
            let mine: Vec<&Run> = runs
                .iter()
                .filter(|r| r.users == users && r.instances == instances)
                .collect();
            if mine.is_empty() {
                return None;
            }
            let batch = balanced_batch(users, instances, max_batch);
            let model = ModelCheck::of(&mine, timing, batch);
            let throughput = model
                .predicted_mean_ms
                .filter(|&m| m > 0.0)
                .map(|mean| batch as f64 * 60_000.0 / mean);
            Some(Ideal {
                users,
                instances,
                model,
                throughput_per_instance_per_min: throughput,
            })
        })
        .collect()
}

/// Requests each instance holds under perfect balance (the rest queue past `max_batch`).
fn balanced_batch(users: u32, instances: u32, max_batch: usize) -> usize {
    (users as usize)
        .div_ceil(instances.max(1) as usize)
        .clamp(1, max_batch)
}

/// `value / base`.
pub fn ratio(base: Option<f64>, value: Option<f64>) -> Option<f64> {
    match (base, value) {
        (Some(b), Some(v)) if b > 0.0 => Some(v / b),
        _ => None,
    }
}

/// LOR against another policy at one size.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub instances: u32,
    pub other: Policy,
    /// LOR P99 / other P99 (below 1: LOR is better).
    pub p99_ratio: Option<f64>,
    /// LOR throughput / other throughput (above 1: LOR is better).
    pub throughput_ratio: Option<f64>,
}

pub fn find(cells: &[Cell], policy: Policy, instances: u32) -> Option<&Cell> {
    cells
        .iter()
        .find(|c| c.policy == policy && c.instances == instances)
}

/// `base` (model-lb LOR) against each of `others`, at every size with more than one instance.
pub fn comparisons(cells: &[Cell], base: Policy, others: &[Policy]) -> Vec<Comparison> {
    let mut sizes: Vec<u32> = cells
        .iter()
        .map(|c| c.instances)
        .filter(|&i| i > 1)
        .collect();
    sizes.dedup();
    let mut out = Vec::new();
    for instances in sizes {
        let Some(b) = find(cells, base, instances) else {
            continue;
        };
        for &other in others {
            let Some(o) = find(cells, other, instances) else {
                continue;
            };
            out.push(Comparison {
                instances,
                other,
                p99_ratio: ratio(o.stats.p99_ms, b.stats.p99_ms),
                throughput_ratio: ratio(
                    Some(o.stats.throughput_per_instance_per_min),
                    Some(b.stats.throughput_per_instance_per_min),
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(start: f64, latency: f64, error: Option<&str>, warmup: bool) -> Sample {
        Sample {
            start_ms: start,
            end_ms: start + latency,
            latency_ms: latency,
            ttft_ms: Some(latency / 10.0),
            tokens: 100,
            prompt_tokens: 300,
            max_tokens: Some(100),
            status: Some(if error.is_some() { 503 } else { 200 }),
            error: error.map(str::to_owned),
            warmup,
            backend: Some(format!("b{}", (start as u64) % 2)),
            group: None,
        }
    }

    fn run(policy: Policy, instances: u32, round: u32, latencies: &[f64]) -> Run {
        Run {
            policy,
            users: 4 * instances,
            instances,
            round,
            samples: latencies
                .iter()
                .enumerate()
                .map(|(i, &l)| sample(1000.0 + i as f64, l, None, false))
                .collect(),
            warmup_s: 1.0,
            duration_s: 10.0,
        }
    }

    #[test]
    fn rounds_are_pooled_before_percentiles() {
        // Round 0: 1..=50, round 1: 51..=100. P99 of the pool is 99; the mean of the rounds'
        // P99s would be 74.5.
        let a = run(
            Policy::ModelLbLor,
            2,
            0,
            &(1..=50).map(f64::from).collect::<Vec<_>>(),
        );
        let b = run(
            Policy::ModelLbLor,
            2,
            1,
            &(51..=100).map(f64::from).collect::<Vec<_>>(),
        );
        let stats = Stats::of(&[&a, &b]);
        assert_eq!(stats.p99_ms, Some(99.0));
        assert_eq!(stats.p50_ms, Some(50.0));
        assert_eq!(stats.ttft_p99_ms, Some(9.9));
        assert_eq!((stats.requests, stats.ok, stats.errors), (100, 100, 0));
        // 100 completions in 2 runs x 10 s x 2 instances = 40 instance-seconds.
        assert!((stats.throughput_per_instance_per_min - 150.0).abs() < 1e-9);
    }

    #[test]
    fn warmup_and_errors() {
        let mut r = run(Policy::ModelLbRandom, 1, 0, &[10.0, 20.0]);
        r.samples.push(sample(0.0, 5.0, None, true));
        r.samples
            .push(sample(1500.0, 1.0, Some("status_503"), false));
        r.samples.push(sample(10.0, 1.0, Some("connect"), true));
        // Ends after the window (11 s): latency counts, throughput does not.
        r.samples.push(sample(10_990.0, 100.0, None, false));
        let s = Stats::of(&[&r]);
        assert_eq!(s.requests, 4, "warm-up requests are not measured");
        assert_eq!(s.ok, 3);
        assert_eq!(s.errors, 2, "errors count warm-up too");
        assert_eq!(s.p99_ms, Some(100.0));
        assert!((s.throughput_per_instance_per_min - 2.0 * 6.0).abs() < 1e-9);
        assert_eq!(Stats::of(&[]), Stats::default());
    }

    #[test]
    fn the_timing_model_check_predicts_the_measured_requests() {
        let timing = TimingModel {
            tpot_ms: 10.0,
            batch_alpha: 0.1,
            prefill_base_ms: 0.0,
            prefill_per_token_ms: 0.0,
            time_scale: 1.0,
        };
        // 100 tokens at batch 4: 100 x 10 x 1.3 = 1300 ms.
        let r = run(Policy::ModelLbLor, 1, 0, &[1300.0, 1400.0, 1170.0]);
        let m = ModelCheck::of(&[&r], &timing, 4);
        assert_eq!(m.predicted_p50_ms, Some(1300.0));
        assert_eq!(m.predicted_p99_ms, Some(1300.0));
        assert_eq!(m.median_ratio, Some(1.0));
        let s = Stats::of(&[&r]);
        assert!(m.within(&s, 0.1));
        assert!(!m.within(&s, 0.05), "P99 is 1400, 7.7 % over");
    }

    #[test]
    fn cells_ideal_and_comparisons() {
        let timing = TimingModel::default();
        let runs = vec![
            run(Policy::ModelLbLor, 1, 0, &[100.0; 10]),
            run(Policy::ModelLbRandom, 1, 0, &[200.0; 10]),
            run(Policy::ModelLbLor, 5, 0, &[150.0; 10]),
            run(Policy::ModelLbLor, 5, 1, &[150.0; 10]),
            run(Policy::ModelLbRandom, 5, 0, &[300.0; 20]),
        ];
        let cells = cells(
            &runs,
            &[(4, 1), (20, 5)],
            &[Policy::ModelLbLor, Policy::ModelLbRandom],
            &timing,
            6,
        );
        assert_eq!(cells.len(), 4);
        assert_eq!(
            (
                cells[2].policy,
                cells[2].instances,
                cells[2].round_p99_ms.len()
            ),
            (Policy::ModelLbLor, 5, 2)
        );
        assert_eq!(cells[2].model.batch, 4);
        let ideals = ideals(&runs, &[(4, 1), (20, 5)], &timing, 6);
        assert_eq!(ideals.len(), 2);
        let one = &ideals[0];
        assert_eq!((one.users, one.instances, one.model.batch), (4, 1, 4));
        let mean = one.model.predicted_mean_ms.unwrap();
        let expected = timing.service_time(300, 100, 4).as_secs_f64() * 1e3;
        assert!((mean - expected).abs() < 1e-6, "{mean} vs {expected}");
        assert_eq!(
            one.throughput_per_instance_per_min,
            Some(4.0 * 60_000.0 / expected)
        );
        let c = comparisons(&cells, Policy::ModelLbLor, &[Policy::ModelLbRandom]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].instances, 5);
        assert_eq!(c[0].p99_ratio, Some(0.5));
        // LOR: 20 completions / (2 x 10 s x 5) ; RANDOM: 20 / (10 s x 5): half.
        assert_eq!(c[0].throughput_ratio, Some(0.5));
        assert_eq!(ratio(Some(0.0), Some(1.0)), None);
    }

    #[test]
    fn rows_have_exactly_the_published_fields() {
        let timing = TimingModel::default();
        let runs = vec![run(Policy::LeastRequest, 5, 0, &[123.456; 10])];
        let cells = cells(&runs, &[(20, 5)], &[Policy::LeastRequest], &timing, 6);
        let json = serde_json::to_value(cells[0].row()).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "errors",
                "instances",
                "p50_ms",
                "p99_ms",
                "policy",
                "throughput_per_instance_per_min",
                "ttft_p99_ms",
                "users"
            ]
        );
        assert_eq!(json["policy"], "Envoy LEAST_REQUEST");
        assert_eq!(json["p99_ms"], 123.5);
    }

    #[test]
    fn shares_count_an_idle_instance_as_zero() {
        let r = run(Policy::RoundRobin, 3, 0, &[1.0; 10]);
        let (min, max) = share_min_max(&[&r], 3).unwrap();
        assert_eq!((min, max), (0.0, 50.0));
        let (min, _) = share_min_max(&[&r], 2).unwrap();
        assert_eq!(min, 50.0);
    }
}
