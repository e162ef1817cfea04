use super::*;
use crate::rng::SplitMix64;
use crate::select::{select, Strategy};

fn config() -> ServerLoad {
    ServerLoad {
        source: LoadSource::Metrics,
        path: "/metrics".into(),
        interval_ms: 100,
        stale_after_ms: 1_000,
        cluster: "pool".into(),
        running_metric: DEFAULT_RUNNING_METRIC.into(),
        waiting_metric: DEFAULT_WAITING_METRIC.into(),
        response_reports: false,
        max_polls_per_second: 200,
        max_body_bytes: 1 << 20,
    }
}

/// Trimmed from a real vLLM 0.11 `/metrics`.
const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:num_requests_running_total_ever{model_name="x"} 99
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.41
"#;

#[test]
fn vllm_metrics_are_summed_over_engines() {
    let report = parse_report(&config(), VLLM.as_bytes()).unwrap();
    assert_eq!(
        report,
        Report {
            total: 9,
            waiting: Some(2)
        }
    );
}

#[test]
fn other_servers_metric_names_and_text_format_details() {
    let sglang =
        "sglang:num_running_reqs{model_name=\"m\"} 5\nsglang:num_queue_reqs{model_name=\"m\"} 1\n";
    assert_eq!(
        parse_metrics(
            sglang.as_bytes(),
            "sglang:num_running_reqs",
            "sglang:num_queue_reqs"
        ),
        Ok(Report {
            total: 6,
            waiting: Some(1)
        })
    );
    // llama.cpp server: no labels; a timestamp after the value.
    let llamacpp = "llamacpp:requests_processing 2 1733000000000\nllamacpp:requests_deferred 0\n";
    assert_eq!(
        parse_metrics(
            llamacpp.as_bytes(),
            "llamacpp:requests_processing",
            "llamacpp:requests_deferred"
        ),
        Ok(Report {
            total: 2,
            waiting: Some(0)
        })
    );
    // A quoted label value may contain braces and escaped quotes.
    let tricky = "run{a=\"}\\\"{\"} 7\nwait 1\n";
    assert_eq!(
        parse_metrics(tricky.as_bytes(), "run", "wait").map(|r| r.total),
        Ok(8)
    );
}

#[test]
fn broken_metrics_are_errors_not_guesses() {
    let run = DEFAULT_RUNNING_METRIC;
    let wait = DEFAULT_WAITING_METRIC;
    assert_eq!(
        parse_metrics(b"vllm:num_requests_running 1\n", run, wait),
        Err(ReportError::MissingMetric(wait.into()))
    );
    assert_eq!(
        parse_metrics(b"<html>oops</html>", run, wait),
        Err(ReportError::MissingMetric(run.into()))
    );
    for value in ["NaN", "-1", "+Inf", "", "abc"] {
        let body = format!("{run} {value}\n{wait} 0\n");
        assert_eq!(
            parse_metrics(body.as_bytes(), run, wait),
            Err(ReportError::BadValue(run.into())),
            "{value:?}"
        );
    }
    // Invalid UTF-8 and binary garbage do not panic.
    assert!(parse_metrics(&[0xff, 0xfe, b'\n', 0, 1, 2], run, wait).is_err());
}

#[test]
fn the_load_endpoint_and_response_reports() {
    assert_eq!(
        parse_load_endpoint(br#"{"server_load": 12}"#),
        Ok(Report {
            total: 12,
            waiting: None
        })
    );
    assert_eq!(parse_load_endpoint(b"12"), Err(ReportError::NotJson));
    assert_eq!(
        parse_load_endpoint(br#"{"server_load": -3}"#),
        Err(ReportError::NotJson)
    );
    assert_eq!(
        parse_response_report(
            "TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3.0"
        ),
        Some(3)
    );
    assert_eq!(
        parse_response_report(
            r#"JSON {"named_metrics": {"kv_cache_usage_perc": 0.1, "num_requests_waiting": 0}}"#
        ),
        Some(0)
    );
    for garbage in [
        "",
        "TEXT",
        "TEXT named_metrics.kv_cache_usage_perc=0.4",
        "BIN xyz",
        "JSON {",
    ] {
        assert_eq!(parse_response_report(garbage), None, "{garbage:?}");
    }
}

fn addresses(n: usize) -> Membership {
    Membership::new(
        n as u64 + 1,
        (0..n)
            .map(|i| format!("10.0.{}.{}:8000", i / 256, i % 256))
            .collect(),
    )
}

fn all(_: usize) -> bool {
    true
}

#[test]
fn each_endpoint_is_polled_once_per_interval_and_never_twice_at_once() {
    let config = config();
    let endpoints = addresses(3);
    let mut poller = Poller::default();
    let first = poller.due(&config, &endpoints, all, 1_000);
    assert_eq!(first, endpoints.endpoints());
    // Still in flight: not again.
    assert!(poller.due(&config, &endpoints, all, 1_050).is_empty());
    for (token, address) in first.iter().enumerate() {
        poller.started(token as u32, address, 1_000);
    }
    for token in 0..3 {
        assert!(poller.finished(&config, token, 1_010, true).is_some());
    }
    assert!(poller.due(&config, &endpoints, all, 1_090).is_empty());
    assert_eq!(poller.due(&config, &endpoints, all, 1_100).len(), 3);
}

#[test]
fn polls_that_start_on_ticks_keep_the_configured_period() {
    // 100 ms interval, 27 ms ticks: measured from each poll's start, every period would round
    // up to the next tick (108 ms).
    let config = config();
    let endpoints = addresses(1);
    let mut poller = Poller::default();
    let mut polls = 0;
    let mut token = 0;
    for tick in 0..400u64 {
        let now = 1_000 + tick * 27;
        for address in poller.due(&config, &endpoints, all, now) {
            poller.started(token, &address, now);
            poller.finished(&config, token, now + 1, true);
            token += 1;
            polls += 1;
        }
    }
    // 10.8 s at one poll per 100 ms.
    assert!((106..=109).contains(&polls), "{polls} polls");
}

#[test]
fn a_large_pool_stays_within_the_poll_budget_and_is_covered_evenly() {
    let config = config(); // 200 polls per second
    let endpoints = addresses(1_000);
    let mut poller = Poller::default();
    let mut polled: HashMap<String, u32> = HashMap::new();
    let mut token = 0u32;
    let mut total = 0usize;
    // Ten seconds of 25 ms ticks; every poll answers within the tick.
    for tick in 0..400u64 {
        let now = 10_000 + tick * 25;
        for address in poller.due(&config, &endpoints, all, now) {
            poller.started(token, &address, now);
            poller.finished(&config, token, now + 5, true);
            *polled.entry(address).or_default() += 1;
            token += 1;
            total += 1;
        }
    }
    assert!(total <= 200 * 10 + 20, "{total} polls in 10 s");
    assert!(total >= 200 * 10 - 40, "{total} polls in 10 s");
    // Round-robin: every endpoint polled twice, none more than once extra.
    assert_eq!(polled.len(), 1_000);
    assert!(polled.values().all(|&n| (1..=3).contains(&n)), "{polled:?}");
    assert_eq!(config.period_ms(1_000), 5_000);
    assert_eq!(config.effective_stale_after_ms(1_000), 10_000);
    assert_eq!(config.effective_stale_after_ms(20), 1_000);
}

#[test]
fn failing_endpoints_back_off_and_hanging_ones_cannot_exhaust_the_pollers() {
    let config = config();
    let endpoints = addresses(2);
    let mut poller = Poller::default();
    let picked = poller.due(&config, &endpoints, all, 1);
    poller.started(1, &picked[0], 1);
    poller.started(2, &picked[1], 1);
    poller.finished(&config, 1, 10, false);
    poller.finished(&config, 2, 10, true);
    // The failed one waits 2 intervals, then 4, ...
    let e = endpoints.endpoints();
    assert_eq!(
        poller.due(&config, &endpoints, all, 101),
        vec![e[1].clone()]
    );
    assert_eq!(
        poller.due(&config, &endpoints, all, 210),
        vec![e[0].clone()]
    );
    // An endpoint that is not pollable (not a host of the cluster) is skipped.
    let mut choosy = Poller::default();
    assert_eq!(
        choosy.due(&config, &endpoints, |i| i == 1, 5),
        vec![e[1].clone()]
    );

    let many = addresses(500);
    let mut hanging = Poller::default();
    let mut token = 100;
    for tick in 0..100u64 {
        for address in hanging.due(&config, &many, all, tick * 25) {
            hanging.started(token, &address, tick * 25);
            token += 1;
        }
    }
    assert_eq!(hanging.polls_in_flight(), MAX_POLLS_IN_FLIGHT);
}

#[test]
fn the_other_replicas_share_never_includes_this_envoys_own_requests() {
    let address = "10.0.0.1:8000";
    let mut collector = Collector::default();
    // This Envoy has 3 in flight there, another replica 2: the server reports 5.
    collector.report(
        address,
        Report {
            total: 5,
            waiting: Some(0),
        },
        3,
        1_000,
    );
    let remote = collector.get(address).unwrap().remote;
    assert_eq!(remote, 2);
    let view = [*collector.get(address).unwrap()];
    // Live local counts after the report: the estimate follows them exactly.
    for local in [3u32, 4, 0] {
        let loads = [local];
        let estimates = Estimates {
            local: &loads[..],
            view: &view,
            now_ms: 1_200,
            stale_after_ms: 1_000,
        };
        assert_eq!(estimates.estimate(0), local + 2);
    }
    // A report taken while this Envoy's requests were still in flight to the server but not
    // yet counted there can only make the remote share smaller, never negative.
    collector.report(
        address,
        Report {
            total: 1,
            waiting: Some(0),
        },
        3,
        1_100,
    );
    assert_eq!(collector.get(address).unwrap().remote, 0);
}

#[test]
fn a_stale_report_falls_back_to_local_counts() {
    let view = [EndpointLoad {
        remote: 7,
        reported_at_ms: 1_000,
        ..EndpointLoad::default()
    }];
    let loads = [2u32];
    let at = |now_ms| Estimates {
        local: &loads[..],
        view: &view,
        now_ms,
        stale_after_ms: 1_000,
    };
    assert_eq!(at(2_000).estimate(0), 9);
    assert_eq!(at(2_001).estimate(0), 2);
    let never = [EndpointLoad::default()];
    let estimates = Estimates {
        local: &loads[..],
        view: &never,
        now_ms: 5,
        stale_after_ms: 1_000,
    };
    assert_eq!(estimates.estimate(0), 2);
}

fn lor(estimates: &Estimates<'_, [u32]>, seed: u64) -> usize {
    let mut rng = SplitMix64::new(seed);
    select(
        Strategy::LeastOutstandingRequests,
        estimates,
        |_| true,
        0,
        &mut rng,
    )
    .chosen()
    .unwrap()
}

#[test]
fn an_endpoint_with_a_free_batch_slot_wins_over_a_full_one_even_with_more_requests() {
    let mut collector = Collector::default();
    // Endpoint 0: a 2-slot server with one request waiting. Endpoint 1: a 4-slot server with 3
    // running, none waiting.
    collector.report(
        "a:1",
        Report {
            total: 3,
            waiting: Some(1),
        },
        0,
        1_000,
    );
    collector.report(
        "b:1",
        Report {
            total: 3,
            waiting: Some(0),
        },
        0,
        1_000,
    );
    let a = *collector.get("a:1").unwrap();
    assert_eq!(a.capacity, 2, "batch size learned from the queue");
    let view = [a, *collector.get("b:1").unwrap()];
    let loads = [0u32, 0];
    let estimates = Estimates {
        local: &loads[..],
        view: &view,
        now_ms: 1_050,
        stale_after_ms: 1_000,
    };
    assert!(estimates.full(0) && !estimates.full(1));
    for seed in 0..20 {
        assert_eq!(lor(&estimates, seed), 1);
    }
    // Once everyone is full, the least loaded per slot of weight wins again.
    let both_full = [
        EndpointLoad {
            capacity: 2,
            ..EndpointLoad::default()
        },
        EndpointLoad {
            capacity: 4,
            ..EndpointLoad::default()
        },
    ];
    let loads = [2u32, 5];
    let estimates = Estimates {
        local: &loads[..],
        view: &both_full,
        now_ms: 1_050,
        stale_after_ms: 1_000,
    };
    assert!(estimates.full(0) && estimates.full(1));
    assert_eq!(lor(&estimates, 1), 0);
    // The learned batch size outlives the report that taught it: with the queue gone and the
    // report stale, a 2-slot server holding 2 local requests is still full.
    let loads = [2u32, 1];
    let estimates = Estimates {
        local: &loads[..],
        view: &view,
        now_ms: 9_000,
        stale_after_ms: 1_000,
    };
    assert!(estimates.full(0));
}

#[test]
fn weights_scale_the_load_an_endpoint_is_given() {
    let view = [
        EndpointLoad {
            weight: 1,
            ..EndpointLoad::default()
        },
        EndpointLoad {
            weight: 3,
            ..EndpointLoad::default()
        },
    ];
    // 2 requests on the weight-1 endpoint weigh more than 5 on the weight-3 one.
    let loads = [2u32, 5];
    let estimates = Estimates {
        local: &loads[..],
        view: &view,
        now_ms: 0,
        stale_after_ms: 1_000,
    };
    assert_eq!(lor(&estimates, 3), 1);
    let loads = [1u32, 5];
    let estimates = Estimates {
        local: &loads[..],
        view: &view,
        now_ms: 0,
        stale_after_ms: 1_000,
    };
    assert_eq!(lor(&estimates, 3), 0);
}

#[test]
fn without_any_report_ranking_is_plain_least_outstanding_requests() {
    let loads = [3u32, 1, 2];
    let estimates = Estimates {
        local: &loads[..],
        view: &[],
        now_ms: 0,
        stale_after_ms: 1_000,
    };
    for seed in 0..10 {
        assert_eq!(lor(&estimates, seed), 1);
    }
}

#[test]
fn the_record_round_trips_and_views_follow_the_membership() {
    let mut collector = Collector::default();
    collector.report(
        "10.0.0.1:80",
        Report {
            total: 4,
            waiting: Some(1),
        },
        1,
        500,
    );
    collector.set_weight("10.0.0.2:80", 5);
    let record = collector.take_record().unwrap();
    assert!(collector.take_record().is_none(), "nothing new to publish");
    let decoded = decode_record(&record).unwrap();
    assert_eq!(decoded.len(), 2);
    assert_eq!(decoded["10.0.0.1:80"].remote, 3);
    assert_eq!(decoded["10.0.0.1:80"].capacity, 3);
    assert_eq!(decoded["10.0.0.2:80"].weight, 5);
    for cut in 0..record.len() {
        // Truncated records are refused, never misread.
        assert!(decode_record(&record[..cut]).is_none() || cut == record.len());
    }

    let membership = Membership::new(
        7,
        vec![
            "10.0.0.2:80".into(),
            "10.0.0.9:80".into(),
            "10.0.0.1:80".into(),
        ],
    );
    let mut view = LoadView::default();
    view.refresh(Some((record.clone(), 1)), &membership);
    let entries = view.entries();
    assert_eq!(entries[0].weight, 5);
    assert_eq!(entries[1], EndpointLoad::default());
    assert_eq!(entries[2].remote, 3);
    // An in-band queue mark survives a refresh of the same endpoint's record.
    view.response_report(1, "10.0.0.9:80", 2, 9_999);
    view.refresh(Some((record, 2)), &membership);
    assert_eq!(view.entries()[1].queued_until_ms, 9_999);
    // Removing an endpoint drops it from the collector: nothing stale comes back with it.
    collector.retain(&Membership::new(8, vec!["10.0.0.2:80".to_owned()]));
    let record = collector.take_record().unwrap();
    assert!(!decode_record(&record).unwrap().contains_key("10.0.0.1:80"));
}

#[test]
fn a_new_leader_starts_from_the_published_record() {
    let mut old = Collector::default();
    old.report(
        "10.0.0.1:80",
        Report {
            total: 6,
            waiting: Some(0),
        },
        2,
        100,
    );
    let record = old.take_record().unwrap();
    let mut new = Collector::default();
    new.adopt(decode_record(&record).unwrap());
    assert_eq!(new.get("10.0.0.1:80").unwrap().remote, 4);
}
