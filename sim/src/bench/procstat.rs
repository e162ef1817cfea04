//! CPU time from `/proc`: how the benchmarks check that the load tool, the servers or a
//! backend are not what limits a run, and how the overhead benchmark charges Envoy per request.

use std::collections::BTreeMap;

/// utime + stime of a process, in clock ticks, from the text of `/proc/<pid>/stat` (all its
/// threads). The command name may contain spaces and parentheses: fields are counted after the
/// last `)`.
pub fn process_ticks(stat: &str) -> Option<u64> {
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    // utime(14) stime(15), i.e. indices 11 and 12 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, total) ticks of the whole machine from the text of `/proc/stat` (`cpu` line; idle and
/// iowait are not busy).
pub fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is already in user).
    let total: u64 = values.iter().take(8).sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU use of a group of processes over one run: the average over the run and the highest
/// average over any window of at least `window_s`, in cores (1.0 = one core busy).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub average: f64,
    pub peak: f64,
}

/// Accumulates `(time_s, ticks)` samples of one process (or the machine) and turns them into
/// [`Usage`].
#[derive(Debug, Clone, Default)]
pub struct Series {
    points: Vec<(f64, f64)>,
}

impl Series {
    /// `cpu_s`: CPU seconds used so far (ticks / ticks per second).
    pub fn push(&mut self, time_s: f64, cpu_s: f64) {
        self.points.push((time_s, cpu_s));
    }

    pub fn usage(&self, window_s: f64) -> Usage {
        let (Some(first), Some(last)) = (self.points.first(), self.points.last()) else {
            return Usage::default();
        };
        let span = last.0 - first.0;
        let average = if span > 0.0 {
            (last.1 - first.1) / span
        } else {
            0.0
        };
        let mut peak: f64 = 0.0;
        let mut start = 0;
        for (end, &(t, c)) in self.points.iter().enumerate() {
            // Shrink from the left while the window stays at least window_s long.
            while start + 1 < end && t - self.points[start + 1].0 >= window_s {
                start += 1;
            }
            let (t0, c0) = self.points[start];
            if t - t0 >= window_s {
                peak = peak.max((c - c0) / (t - t0));
            }
        }
        Usage {
            average,
            peak: if span < window_s { average } else { peak },
        }
    }
}

/// The highest usage seen per role ("load tool", "Envoy", ...) over all runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Busiest(pub BTreeMap<String, Usage>);

impl Busiest {
    pub fn record(&mut self, role: &str, usage: &Usage) {
        let entry = self.0.entry(role.to_owned()).or_default();
        entry.average = entry.average.max(usage.average);
        entry.peak = entry.peak.max(usage.peak);
    }

    pub fn get(&self, role: &str) -> Usage {
        self.0.get(role).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ticks_skip_odd_names() {
        let stat = "1234 (model (server) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(process_ticks(stat), Some(300));
        assert_eq!(process_ticks("garbage"), None);
    }

    #[test]
    fn machine_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(machine_ticks(stat), Some((161, 981)));
        assert_eq!(machine_ticks("intr 1 2"), None);
    }

    #[test]
    fn usage_average_and_peak_window() {
        let mut s = Series::default();
        // 0.5 core for 2 s, then 1.0 core for 1 s, then idle for 1 s.
        for (t, c) in [(0.0, 0.0), (1.0, 0.5), (2.0, 1.0), (3.0, 2.0), (4.0, 2.0)] {
            s.push(t, c);
        }
        let u = s.usage(1.0);
        assert!((u.average - 0.5).abs() < 1e-9);
        assert!((u.peak - 1.0).abs() < 1e-9);
        let u = s.usage(2.0);
        assert!((u.peak - 0.75).abs() < 1e-9);
        assert_eq!(Series::default().usage(1.0), Usage::default());
        let mut short = Series::default();
        short.push(0.0, 0.0);
        short.push(0.5, 0.25);
        assert!(
            (short.usage(1.0).peak - 0.5).abs() < 1e-9,
            "short runs: the average"
        );
    }

    #[test]
    fn busiest_keeps_the_maximum_per_role() {
        let mut b = Busiest::default();
        b.record(
            "envoy",
            &Usage {
                average: 0.2,
                peak: 0.9,
            },
        );
        b.record(
            "envoy",
            &Usage {
                average: 0.4,
                peak: 0.5,
            },
        );
        assert_eq!(
            b.get("envoy"),
            Usage {
                average: 0.4,
                peak: 0.9
            }
        );
        assert_eq!(b.get("none"), Usage::default());
    }
}
