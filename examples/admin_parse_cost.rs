#![allow(clippy::unwrap_used)]
//! What the admin poll's parse costs on an Istio-sized `/clusters`: 50 clusters x 100 hosts,
//! each host with the stats Envoy 1.40 prints. Compares reading the whole answer into a JSON
//! tree (what the filter did before) with the one-pass reader that only keeps the watched
//! cluster. Native timing, for the ratio: `cargo run --release --example admin_parse_cost`.

use std::time::Instant;

fn host(cluster: usize, host: usize) -> String {
    let stats: Vec<String> = [
        "cx_connect_fail",
        "cx_total",
        "rq_error",
        "rq_success",
        "rq_timeout",
        "rq_total",
        "cx_active",
        "rq_active",
    ]
    .iter()
    .map(|name| {
        format!(
            r#"{{"name":"{name}","value":"{}","type":"COUNTER"}}"#,
            cluster * host
        )
    })
    .collect();
    format!(
        r#"{{"address":{{"socket_address":{{"address":"10.{}.{}.{}","port_value":8000}}}},"stats":[{}],"health_status":{{"eds_health_status":"HEALTHY"}},"weight":1,"hostname":"pod-{cluster}-{host}.ns.svc.cluster.local","locality":{{"region":"r","zone":"z"}}}}"#,
        cluster,
        host / 256,
        host % 256,
        stats.join(",")
    )
}

fn main() {
    let clusters: Vec<String> = (0..50)
        .map(|c| {
            let hosts: Vec<String> = (0..100).map(|h| host(c, h)).collect();
            format!(
                r#"{{"name":"outbound|8000||svc-{c}.ns.svc.cluster.local","added_via_api":true,"host_statuses":[{}],"circuit_breakers":{{"thresholds":[{{"max_connections":1024}}]}},"observability_name":"svc-{c}"}}"#,
                hosts.join(",")
            )
        })
        .collect();
    let body = format!(r#"{{"cluster_statuses":[{}]}}"#, clusters.join(","));
    let watched = "outbound|8000||svc-37.ns.svc.cluster.local";
    let rounds = 20;

    let start = Instant::now();
    for _ in 0..rounds {
        let document: serde_json::Value = serde_json::from_slice(body.as_bytes()).unwrap();
        let found = document["cluster_statuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == watched)
            .unwrap();
        std::hint::black_box(found);
    }
    let tree = start.elapsed() / rounds;

    let start = Instant::now();
    let mut hosts = Vec::new();
    for _ in 0..rounds {
        hosts = model_lb::admin::cluster_hosts(body.as_bytes(), watched).unwrap();
    }
    let one_pass = start.elapsed() / rounds;
    assert_eq!(hosts.len(), 100);
    println!(
        "/clusters of 50 clusters x 100 hosts: {:.1} MB; JSON tree {:.1} ms, one-pass reader {:.1} ms ({:.1}x less)",
        body.len() as f64 / 1e6,
        tree.as_secs_f64() * 1e3,
        one_pass.as_secs_f64() * 1e3,
        tree.as_secs_f64() / one_pass.as_secs_f64()
    );
}
