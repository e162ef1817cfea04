//! The proxy-overhead benchmark: Envoy CPU time per request of model-lb against Envoy's own
//! balancers, at a small and a large pool, from interleaved rounds.

use std::fmt::Write as _;

use serde::Serialize;

use super::procstat::Usage;

/// One `wrk` run against one variant.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub variant: String,
    pub endpoints: u32,
    pub round: u32,
    pub requests: u64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Proxy Envoy's user + system CPU seconds during the run.
    pub proxy_cpu_s: f64,
    pub proxy: Usage,
    pub backend: Usage,
    pub load: Usage,
    /// Non-2xx responses and socket errors wrk reported.
    pub errors: u64,
}

impl Measurement {
    pub fn cpu_us_per_request(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.proxy_cpu_s * 1e6 / self.requests as f64
        }
    }
}

/// One line of `overhead.json`: medians over the rounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverheadRow {
    pub variant: String,
    pub endpoints: u32,
    pub rounds: u32,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Proxy Envoy CPU (user + system) per request, microseconds.
    pub cpu_us_per_request: f64,
    pub cpu_us_per_request_min: f64,
    pub cpu_us_per_request_max: f64,
    /// Median over rounds of this variant's CPU per request / LEAST_REQUEST's in the same round.
    pub cpu_ratio_to_least_request: Option<f64>,
    /// Proxy Envoy CPU use while loaded, cores (median of run averages).
    pub proxy_cores: f64,
    pub errors: u64,
}

pub const BASELINE: &str = "least_request";

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Rows in the order of `endpoints` then `variants`.
pub fn rows(
    measurements: &[Measurement],
    variants: &[String],
    endpoints: &[u32],
) -> Vec<OverheadRow> {
    let mut out = Vec::new();
    for &n in endpoints {
        for variant in variants {
            let mine: Vec<&Measurement> = measurements
                .iter()
                .filter(|m| &m.variant == variant && m.endpoints == n)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let col = |f: fn(&Measurement) -> f64| {
                median(&mine.iter().map(|m| f(m)).collect::<Vec<_>>()).unwrap_or(0.0)
            };
            let cpu: Vec<f64> = mine.iter().map(|m| m.cpu_us_per_request()).collect();
            let paired: Vec<f64> = mine
                .iter()
                .filter_map(|m| {
                    let base = measurements.iter().find(|b| {
                        b.variant == BASELINE && b.endpoints == n && b.round == m.round
                    })?;
                    let b = base.cpu_us_per_request();
                    (b > 0.0).then(|| m.cpu_us_per_request() / b)
                })
                .collect();
            out.push(OverheadRow {
                variant: variant.clone(),
                endpoints: n,
                rounds: mine.len() as u32,
                requests_per_s: col(|m| m.requests_per_s).round(),
                p50_ms: round2(col(|m| m.p50_ms)),
                p99_ms: round2(col(|m| m.p99_ms)),
                cpu_us_per_request: round2(median(&cpu).unwrap_or(0.0)),
                cpu_us_per_request_min: round2(cpu.iter().copied().fold(f64::INFINITY, f64::min)),
                cpu_us_per_request_max: round2(cpu.iter().copied().fold(0.0, f64::max)),
                cpu_ratio_to_least_request: median(&paired).map(|r| (r * 1000.0).round() / 1000.0),
                proxy_cores: round2(col(|m| m.proxy.average)),
                errors: mine.iter().map(|m| m.errors).sum(),
            });
        }
    }
    out
}

/// Parses `wrk --latency` output: (requests, requests/s, p50 ms, p99 ms, errors).
pub fn parse_wrk(text: &str) -> Option<(u64, f64, f64, f64, u64)> {
    let duration_ms = |v: &str| -> Option<f64> {
        if let Some(us) = v.strip_suffix("us") {
            us.parse::<f64>().ok().map(|x| x / 1000.0)
        } else if let Some(ms) = v.strip_suffix("ms") {
            ms.parse().ok()
        } else if let Some(m) = v.strip_suffix('m') {
            m.parse::<f64>().ok().map(|x| x * 60_000.0)
        } else {
            v.strip_suffix('s')?.parse::<f64>().ok().map(|x| x * 1000.0)
        }
    };
    let (mut requests, mut rps, mut p50, mut p99) = (None, None, None, None);
    let mut errors = 0u64;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [n, "requests", "in", ..] => requests = n.parse().ok(),
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = duration_ms(v),
            ["99%", v] => p99 = duration_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    Some((requests?, rps?, p50?, p99?, errors))
}

/// Everything `overhead.md` reports.
#[derive(Debug, Clone)]
pub struct OverheadReport {
    pub rows: Vec<OverheadRow>,
    pub measurements: Vec<Measurement>,
    pub machine_line: String,
    pub method: String,
    /// Extra lines after the method: what polling alone costs, variants not run.
    pub notes: Vec<String>,
    pub elapsed_s: f64,
    pub smoke: bool,
}

/// The target: model-lb LOR within this factor of Envoy LEAST_REQUEST in CPU per request.
pub const TARGET_RATIO: f64 = 1.25;

pub fn markdown(r: &OverheadReport) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# model-lb proxy overhead{}\n\n{}. Took {:.0} s. Generated by `model-bench overhead` (`make bench-overhead`).\n\n{}\n",
        if r.smoke { " (smoke run: plumbing only, numbers meaningless)" } else { "" },
        r.machine_line,
        r.elapsed_s,
        r.method
    );
    for note in &r.notes {
        let _ = writeln!(md, "- {note}");
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "| variant | endpoints | requests/s | P50 ms | P99 ms | Envoy CPU µs/request (median, min-max) | vs LEAST_REQUEST (paired median) | proxy cores | errors |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} ({:.1}-{:.1}) | {} | {:.2} | {} |",
            row.variant,
            row.endpoints,
            row.requests_per_s,
            row.p50_ms,
            row.p99_ms,
            row.cpu_us_per_request,
            row.cpu_us_per_request_min,
            row.cpu_us_per_request_max,
            row.cpu_ratio_to_least_request
                .map_or("-".into(), |v| format!("{v:.2}x")),
            row.proxy_cores,
            row.errors
        );
    }
    // Growth with the pool size and the target.
    let mut sizes: Vec<u32> = r.rows.iter().map(|x| x.endpoints).collect();
    sizes.sort_unstable();
    sizes.dedup();
    if let (Some(&small), Some(&large)) = (sizes.first(), sizes.last()) {
        if small != large {
            let _ = writeln!(
                md,
                "\nCPU per request at {large} endpoints against {small} (a cost that grew with the pool would show here):\n"
            );
            let _ = writeln!(
                md,
                "| variant | µs/request at {small} | at {large} | growth |"
            );
            let _ = writeln!(md, "|---|---:|---:|---:|");
            let mut variants: Vec<&str> = Vec::new();
            for row in &r.rows {
                if !variants.contains(&row.variant.as_str()) {
                    variants.push(&row.variant);
                }
            }
            for v in variants {
                let at = |n: u32| r.rows.iter().find(|x| x.variant == v && x.endpoints == n);
                if let (Some(a), Some(b)) = (at(small), at(large)) {
                    let _ = writeln!(
                        md,
                        "| {v} | {:.1} | {:.1} | {:+.0} % |",
                        a.cpu_us_per_request,
                        b.cpu_us_per_request,
                        if a.cpu_us_per_request > 0.0 {
                            (b.cpu_us_per_request / a.cpu_us_per_request - 1.0) * 100.0
                        } else {
                            0.0
                        }
                    );
                }
            }
        }
    }
    let _ = writeln!(md, "\nTarget: model-lb LOR within {TARGET_RATIO}x of Envoy LEAST_REQUEST in proxy CPU per request.\n");
    for row in r.rows.iter().filter(|x| x.variant == "mlb_lor") {
        let verdict = match row.cpu_ratio_to_least_request {
            Some(v) if v <= TARGET_RATIO => format!("{v:.2}x: met"),
            Some(v) => format!("{v:.2}x: **missed**"),
            None => "no baseline".into(),
        };
        let _ = writeln!(md, "- {} endpoints: {verdict}", row.endpoints);
    }
    let _ = writeln!(
        md,
        "\nEvery run (proxy, backend and wrk CPU use in cores, run average):\n"
    );
    let _ = writeln!(md, "| endpoints | round | variant | requests | requests/s | µs/request | proxy | backend | wrk |");
    let _ = writeln!(md, "|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for m in &r.measurements {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} |",
            m.endpoints,
            m.round,
            m.variant,
            m.requests,
            m.requests_per_s,
            m.cpu_us_per_request(),
            m.proxy.average,
            m.backend.average,
            m.load.average
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(variant: &str, endpoints: u32, round: u32, requests: u64, cpu_s: f64) -> Measurement {
        Measurement {
            variant: variant.into(),
            endpoints,
            round,
            requests,
            requests_per_s: requests as f64 / 5.0,
            p50_ms: 0.5,
            p99_ms: 1.5,
            proxy_cpu_s: cpu_s,
            proxy: Usage {
                average: 0.9,
                peak: 1.0,
            },
            backend: Usage::default(),
            load: Usage::default(),
            errors: 0,
        }
    }

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 16 connections\n  Latency Distribution\n     50%  714.00us\n     75%    1.00ms\n     90%    1.10ms\n     99%    1.17s\n  108886 requests in 5.00s, 10.0MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  21777.31\n";
        assert_eq!(
            parse_wrk(text),
            Some((108_886, 21_777.31, 0.714, 1170.0, 7))
        );
        assert_eq!(parse_wrk("nonsense"), None);
    }

    #[test]
    fn rows_take_medians_and_paired_ratios() {
        let ms = vec![
            m("least_request", 4, 1, 1000, 0.050),
            m("mlb_lor", 4, 1, 1000, 0.060),
            m("least_request", 4, 2, 1000, 0.100),
            m("mlb_lor", 4, 2, 1000, 0.110),
            m("least_request", 4, 3, 1000, 0.040),
            m("mlb_lor", 4, 3, 1000, 0.050),
            m("mlb_lor", 256, 1, 2000, 0.1),
        ];
        let variants = vec!["least_request".to_owned(), "mlb_lor".to_owned()];
        let rows = rows(&ms, &variants, &[4, 256]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].cpu_us_per_request, 50.0);
        assert_eq!(rows[0].cpu_ratio_to_least_request, Some(1.0));
        assert_eq!(rows[1].cpu_us_per_request, 60.0);
        assert_eq!(
            (
                rows[1].cpu_us_per_request_min,
                rows[1].cpu_us_per_request_max
            ),
            (50.0, 110.0)
        );
        // Paired per round: 1.2, 1.1, 1.25 -> median 1.2 (the ratio of medians would be 1.2 too,
        // but the pairing is what cancels drift between rounds).
        assert_eq!(rows[1].cpu_ratio_to_least_request, Some(1.2));
        assert_eq!(
            rows[2].cpu_ratio_to_least_request, None,
            "no baseline at 256"
        );
        let json = serde_json::to_value(&rows[1]).unwrap();
        assert_eq!(json["variant"], "mlb_lor");
        assert!(json["cpu_us_per_request"].is_number());
    }

    #[test]
    fn markdown_reports_growth_and_the_target() {
        let ms = vec![
            m("least_request", 4, 1, 1000, 0.050),
            m("mlb_lor", 4, 1, 1000, 0.060),
            m("least_request", 256, 1, 1000, 0.050),
            m("mlb_lor", 256, 1, 1000, 0.070),
        ];
        let variants = vec!["least_request".to_owned(), "mlb_lor".to_owned()];
        let report = OverheadReport {
            rows: rows(&ms, &variants, &[4, 256]),
            measurements: ms,
            machine_line: "today".into(),
            method: "how".into(),
            notes: vec!["4 endpoints, polls: 40/s".into()],
            elapsed_s: 1.0,
            smoke: false,
        };
        let md = markdown(&report);
        assert!(md.contains("| mlb_lor | 4 | 200 |"), "{md}");
        assert!(md.contains("| mlb_lor | 60.0 | 70.0 | +17 % |"), "{md}");
        assert!(md.contains("- 4 endpoints: 1.20x: met"));
        assert!(md.contains("- 256 endpoints: 1.40x: **missed**"));
        assert!(
            md.contains("how\n\n- 4 endpoints, polls: 40/s\n\n| variant |"),
            "{md}"
        );
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), Some(2.5));
    }
}
