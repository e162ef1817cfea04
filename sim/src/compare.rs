//! Side-by-side comparison of `model-load --json` reports: the demo's final table. The last
//! report is compared with the first (the baseline), as "how much better is the last policy".

use std::fmt::Write as _;

use serde_json::Value;

/// One report, reduced to what the table shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub label: String,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub throughput_per_instance_per_min: f64,
    pub output_tokens_per_s: f64,
    /// Smallest and largest share of requests any backend served, in percent.
    pub share_min_max: Option<(f64, f64)>,
}

impl Row {
    pub fn from_json(report: &Value) -> Result<Self, String> {
        let number = |path: &[&str]| -> Option<f64> {
            let mut v = report;
            for key in path {
                v = v.get(key)?;
            }
            v.as_f64()
        };
        let required = |path: &[&str]| {
            number(path).ok_or_else(|| format!("report lacks numeric field {}", path.join(".")))
        };
        let errors = report
            .get("errors")
            .and_then(Value::as_object)
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        let shares: Vec<f64> = report
            .get("backends")
            .and_then(Value::as_object)
            .map(|m| m.values().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let total: f64 = shares.iter().sum();
        let share_min_max = (total > 0.0).then(|| {
            let min = shares.iter().copied().fold(f64::INFINITY, f64::min);
            let max = shares.iter().copied().fold(0.0, f64::max);
            (100.0 * min / total, 100.0 * max / total)
        });
        Ok(Self {
            label: report
                .get("label")
                .and_then(Value::as_str)
                .unwrap_or("run")
                .to_owned(),
            requests: required(&["requests"])? as u64,
            ok: required(&["ok"])? as u64,
            errors,
            p50_ms: number(&["latency_ms", "p50"]),
            p90_ms: number(&["latency_ms", "p90"]),
            p99_ms: number(&["latency_ms", "p99"]),
            max_ms: number(&["latency_ms", "max"]),
            ttft_p50_ms: number(&["ttft_ms", "p50"]),
            ttft_p99_ms: number(&["ttft_ms", "p99"]),
            throughput_per_instance_per_min: required(&["throughput_per_instance_per_min"])?,
            output_tokens_per_s: required(&["output_tokens_per_s"])?,
            share_min_max,
        })
    }
}

/// Relative change of `value` against `baseline`, as the table prints it ("-23.1 %").
pub fn change(baseline: Option<f64>, value: Option<f64>) -> Option<f64> {
    match (baseline, value) {
        (Some(b), Some(v)) if b > 0.0 => Some(100.0 * (v - b) / b),
        _ => None,
    }
}

pub fn render(rows: &[Row]) -> String {
    let mut out = String::new();
    let Some((first, last)) = rows.first().zip(rows.last()) else {
        return out;
    };
    let width = rows
        .iter()
        .map(|r| r.label.len())
        .max()
        .unwrap_or(0)
        .max(12)
        + 2;
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.0}"));
    let compare = rows.len() > 1;
    let _ = write!(out, "{:<28}", "");
    for r in rows {
        let _ = write!(out, "{:>width$}", r.label);
    }
    if compare {
        let _ = write!(out, "{:>16}", "change");
    }
    out.push('\n');
    type Getter = fn(&Row) -> Option<f64>;
    let lines: [(&str, Getter); 9] = [
        ("latency p50 (ms)", |r| r.p50_ms),
        ("latency p90 (ms)", |r| r.p90_ms),
        ("latency p99 (ms)", |r| r.p99_ms),
        ("latency max (ms)", |r| r.max_ms),
        ("TTFT p50 (ms)", |r| r.ttft_p50_ms),
        ("TTFT p99 (ms)", |r| r.ttft_p99_ms),
        ("throughput /instance/min", |r| {
            Some(r.throughput_per_instance_per_min)
        }),
        ("output tokens/s", |r| Some(r.output_tokens_per_s)),
        ("errors", |r| Some(r.errors as f64)),
    ];
    for (name, get) in lines {
        let _ = write!(out, "{name:<28}");
        for r in rows {
            let _ = write!(out, "{:>width$}", fmt(get(r)));
        }
        if compare {
            let text = change(get(first), get(last))
                .map_or_else(|| "-".to_owned(), |c| format!("{c:+.1} %"));
            let _ = write!(out, "{text:>16}");
        }
        out.push('\n');
    }
    let _ = write!(out, "{:<28}", "requests ok / measured");
    for r in rows {
        let _ = write!(out, "{:>width$}", format!("{}/{}", r.ok, r.requests));
    }
    out.push('\n');
    let _ = write!(out, "{:<28}", "backend share min-max");
    for r in rows {
        let text = r
            .share_min_max
            .map_or_else(|| "-".to_owned(), |(lo, hi)| format!("{lo:.0}-{hi:.0} %"));
        let _ = write!(out, "{text:>width$}");
    }
    out.push('\n');
    if compare {
        let _ = writeln!(
            out,
            "\nchange = {} relative to {} (negative latency and positive throughput are better)",
            last.label, first.label
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(label: &str, p99: f64, tput: f64) -> Value {
        serde_json::json!({
            "label": label, "requests": 100, "ok": 99, "errors": {"status_503": 1},
            "latency_ms": {"p50": 10.0, "p90": 20.0, "p99": p99, "max": 50.0, "mean": 12.0},
            "ttft_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
            "throughput_per_min": 10.0, "throughput_per_instance_per_min": tput,
            "instances": 2, "output_tokens_per_s": 7.5,
            "backends": {"a": 25, "b": 75}
        })
    }

    #[test]
    fn reads_the_fields_the_table_needs() {
        let row = Row::from_json(&report("RANDOM", 40.0, 5.0)).unwrap();
        assert_eq!(row.errors, 1);
        assert_eq!(row.p99_ms, Some(40.0));
        assert_eq!(row.ttft_p99_ms, Some(3.0));
        assert_eq!(row.share_min_max, Some((25.0, 75.0)));
        assert!(Row::from_json(&serde_json::json!({"label": "x"})).is_err());
    }

    #[test]
    fn change_is_relative_to_the_baseline() {
        assert_eq!(change(Some(40.0), Some(30.0)), Some(-25.0));
        assert_eq!(change(Some(0.0), Some(30.0)), None);
        assert_eq!(change(None, Some(30.0)), None);
    }

    #[test]
    fn renders_both_runs_and_the_change() {
        let rows = [
            Row::from_json(&report("RANDOM", 40.0, 5.0)).unwrap(),
            Row::from_json(&report("LEAST_OUTSTANDING_REQUESTS", 30.0, 6.0)).unwrap(),
        ];
        let table = render(&rows);
        let p99 = table
            .lines()
            .find(|l| l.starts_with("latency p99"))
            .unwrap();
        assert!(
            p99.contains("40") && p99.contains("30") && p99.ends_with("-25.0 %"),
            "{p99}"
        );
        let tput = table.lines().find(|l| l.starts_with("throughput")).unwrap();
        assert!(tput.ends_with("+20.0 %"), "{tput}");
        assert!(table.contains("25-75 %"));
        assert!(render(&[]).is_empty());
    }
}
