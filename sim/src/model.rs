//! The pure timing model of a continuous-batching LLM server.
//!
//! * Time per output token while `b` requests are decoding:
//!   `t(b) = tpot · (1 + alpha · (b − 1))`
//! * Prefill time: `prefill_base + prompt_tokens · prefill_per_token`
//! * Prompt tokens are estimated as `ceil(chars / 4)`, at least 1.
//! * Every duration is multiplied by `time_scale`.

use std::time::Duration;

use crate::rng::Rng;

/// Timing parameters, in (unscaled) milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct TimingModel {
    pub tpot_ms: f64,
    pub batch_alpha: f64,
    pub prefill_base_ms: f64,
    pub prefill_per_token_ms: f64,
    pub time_scale: f64,
}

impl Default for TimingModel {
    fn default() -> Self {
        TimingModel {
            tpot_ms: 20.0,
            batch_alpha: 0.15,
            prefill_base_ms: 10.0,
            prefill_per_token_ms: 0.1,
            time_scale: 1.0,
        }
    }
}

fn ms(v: f64) -> Duration {
    if v.is_finite() && v > 0.0 {
        Duration::from_secs_f64(v / 1000.0)
    } else {
        Duration::ZERO
    }
}

impl TimingModel {
    /// Unscaled time per output token, in ms, with `batch` requests decoding
    /// (`batch` is treated as at least 1).
    pub fn tpot_ms_at(&self, batch: usize) -> f64 {
        let b = batch.max(1) as f64;
        self.tpot_ms * (1.0 + self.batch_alpha * (b - 1.0))
    }

    /// Scaled time per output token with `batch` requests decoding.
    pub fn token_time(&self, batch: usize) -> Duration {
        ms(self.tpot_ms_at(batch) * self.time_scale)
    }

    /// Scaled prefill time for a prompt of `prompt_tokens` tokens.
    pub fn prefill_time(&self, prompt_tokens: u64) -> Duration {
        ms(
            (self.prefill_base_ms + prompt_tokens as f64 * self.prefill_per_token_ms)
                * self.time_scale,
        )
    }

    /// Scaled duration of an arbitrary number of simulated milliseconds.
    pub fn scaled(&self, millis: f64) -> Duration {
        ms(millis * self.time_scale)
    }

    /// Expected end-to-end service time (prefill plus decode) for a request
    /// running alone with a constant batch size: useful for tests and docs.
    pub fn service_time(&self, prompt_tokens: u64, output_tokens: u64, batch: usize) -> Duration {
        self.prefill_time(prompt_tokens)
            + self.token_time(batch) * output_tokens.min(u32::MAX as u64) as u32
    }
}

/// Prompt tokens estimated from a character count: `ceil(chars / 4)`, at least 1.
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4).max(1)
}

/// Output-length distribution used when a request does not set `max_tokens`:
/// lognormal with the given median and sigma, rounded, clamped to `[1, max]`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputLength {
    pub median: f64,
    pub sigma: f64,
    pub max: u64,
}

impl Default for OutputLength {
    fn default() -> Self {
        OutputLength {
            median: 120.0,
            sigma: 0.8,
            max: 2048,
        }
    }
}

impl OutputLength {
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let x = rng.lognormal(self.median, self.sigma).round();
        let max = self.max.max(1);
        if x.is_nan() || x < 1.0 {
            1
        } else if x >= max as f64 {
            max
        } else {
            x as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batching_slows_tokens() {
        let m = TimingModel::default();
        assert!((m.tpot_ms_at(1) - 20.0).abs() < 1e-9);
        assert!(
            (m.tpot_ms_at(0) - 20.0).abs() < 1e-9,
            "batch 0 treated as 1"
        );
        // t(b) = 20 * (1 + 0.15 (b - 1))
        assert!((m.tpot_ms_at(2) - 23.0).abs() < 1e-9);
        assert!((m.tpot_ms_at(8) - 41.0).abs() < 1e-9);
        let mut prev = Duration::ZERO;
        for b in 1..=32 {
            let t = m.token_time(b);
            assert!(t > prev, "t({b}) must grow");
            prev = t;
        }
    }

    #[test]
    fn prefill_formula() {
        let m = TimingModel::default();
        // 10 ms + 1000 * 0.1 ms = 110 ms
        assert_eq!(m.prefill_time(1000), Duration::from_millis(110));
        assert_eq!(m.prefill_time(0), Duration::from_millis(10));
    }

    #[test]
    fn time_scale_shrinks_durations() {
        let full = TimingModel::default();
        let fast = TimingModel {
            time_scale: 0.1,
            ..TimingModel::default()
        };
        assert_eq!(fast.token_time(1), Duration::from_millis(2));
        assert_eq!(fast.prefill_time(1000), Duration::from_millis(11));
        let ratio = fast.service_time(400, 100, 4).as_secs_f64()
            / full.service_time(400, 100, 4).as_secs_f64();
        assert!((ratio - 0.1).abs() < 1e-6, "ratio {ratio}");
        assert_eq!(fast.scaled(50.0), Duration::from_millis(5));
    }

    #[test]
    fn degenerate_values_do_not_panic() {
        let m = TimingModel {
            tpot_ms: -1.0,
            batch_alpha: f64::NAN,
            prefill_base_ms: f64::INFINITY,
            prefill_per_token_ms: 0.0,
            time_scale: 1.0,
        };
        assert_eq!(m.token_time(3), Duration::ZERO);
        assert_eq!(m.prefill_time(3), Duration::ZERO);
    }

    #[test]
    fn token_estimate() {
        assert_eq!(estimate_tokens(0), 1);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(4), 1);
        assert_eq!(estimate_tokens(5), 2);
        assert_eq!(estimate_tokens(400), 100);
    }

    #[test]
    fn output_length_is_heavy_tailed_and_capped() {
        let d = OutputLength::default();
        let mut rng = Rng::new(0);
        let xs: Vec<u64> = (0..20_000).map(|_| d.sample(&mut rng)).collect();
        assert!(xs.iter().all(|x| (1..=2048).contains(x)));
        let mid = xs.iter().filter(|x| (50..=300).contains(*x)).count() as f64 / xs.len() as f64;
        let long = xs.iter().filter(|x| **x > 1000).count();
        assert!(mid > 0.6, "most in 50..300: {mid}");
        assert!(long > 0 && long < 400, "a few over 1000: {long}");

        let capped = OutputLength {
            median: 10_000.0,
            sigma: 0.1,
            max: 16,
        };
        assert_eq!(capped.sample(&mut rng), 16);
    }
}
