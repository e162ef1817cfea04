//! Sample statistics for the load generator.
//!
//! Percentiles use the **nearest-rank** method: for a sorted sample of size
//! `n` and percentile `p` in (0, 100], the value is the element at 1-based
//! rank `ceil(p/100 · n)`. It always returns an observed value; for
//! 1..=100 it gives p50 = 50, p90 = 90, p99 = 99, p100 = 100. An empty sample
//! has no percentiles.

use serde::Serialize;

/// Nearest-rank percentile of an ascending-sorted sample.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || p.is_nan() {
        return None;
    }
    let n = sorted.len();
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * n as f64).ceil() as usize;
    let idx = rank.clamp(1, n) - 1;
    sorted.get(idx).copied()
}

/// Sorts a copy of `xs` (NaN-safe total order).
pub fn sorted(xs: &[f64]) -> Vec<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// Latency summary; every field is `None` (JSON `null`) for an empty sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    #[serde(skip)]
    pub count: usize,
}

impl Summary {
    pub fn of(xs: &[f64]) -> Summary {
        let s = sorted(xs);
        let mean = if s.is_empty() {
            None
        } else {
            Some(s.iter().sum::<f64>() / s.len() as f64)
        };
        Summary {
            p50: percentile_sorted(&s, 50.0),
            p90: percentile_sorted(&s, 90.0),
            p99: percentile_sorted(&s, 99.0),
            max: s.last().copied(),
            mean,
            count: s.len(),
        }
    }
}

/// Time-to-first-token summary (percentiles only).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TtftSummary {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl TtftSummary {
    pub fn of(xs: &[f64]) -> Option<TtftSummary> {
        if xs.is_empty() {
            return None;
        }
        let s = sorted(xs);
        Some(TtftSummary {
            p50: percentile_sorted(&s, 50.0),
            p90: percentile_sorted(&s, 90.0),
            p99: percentile_sorted(&s, 99.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_to_hundred() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&xs);
        assert_eq!(s.p50, Some(50.0));
        assert_eq!(s.p90, Some(90.0));
        assert_eq!(s.p99, Some(99.0));
        assert_eq!(s.max, Some(100.0));
        assert_eq!(s.mean, Some(50.5));
        assert_eq!(s.count, 100);
    }

    #[test]
    fn order_does_not_matter() {
        let mut xs: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        xs.swap(3, 77);
        assert_eq!(Summary::of(&xs).p90, Some(90.0));
    }

    #[test]
    fn small_samples() {
        assert_eq!(percentile_sorted(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile_sorted(&[7.0], 99.0), Some(7.0));
        // n = 2: p50 -> rank ceil(1.0) = 1; p90 -> rank ceil(1.8) = 2
        assert_eq!(percentile_sorted(&[1.0, 2.0], 50.0), Some(1.0));
        assert_eq!(percentile_sorted(&[1.0, 2.0], 90.0), Some(2.0));
        // n = 10: p50 -> rank 5; p90 -> rank 9; p99 -> rank ceil(9.9) = 10
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile_sorted(&ten, 50.0), Some(5.0));
        assert_eq!(percentile_sorted(&ten, 90.0), Some(9.0));
        assert_eq!(percentile_sorted(&ten, 99.0), Some(10.0));
        assert_eq!(percentile_sorted(&ten, 0.0), Some(1.0));
        assert_eq!(percentile_sorted(&ten, 100.0), Some(10.0));
    }

    #[test]
    fn empty_sample() {
        assert_eq!(percentile_sorted(&[], 50.0), None);
        let s = Summary::of(&[]);
        assert_eq!(s, Summary::default());
        assert!(TtftSummary::of(&[]).is_none());
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["p50"].is_null() && json["mean"].is_null());
    }
}
