//! Envoy's own view of a cluster, from the admin API's `GET /clusters?format=json`: which hosts
//! are members and which Envoy considers unhealthy. The override_host policy ignores health, so
//! the filter has to honour it itself.

use std::fmt;

use serde_json::Value;

use crate::config::parse_endpoint;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    /// Canonical `ip:port`, the form the header and the table use.
    pub address: String,
    pub healthy: bool,
    /// Removed from the cluster's configuration (EDS, DNS) but kept by Envoy until its health
    /// check fails; no longer a member for the filter.
    pub removed: bool,
    /// The endpoint's `load_balancing_weight` (1 when Envoy shows none).
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    NotJson(String),
    ClusterMissing(String),
    Shape(&'static str),
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJson(e) => write!(f, "admin /clusters answer is not JSON: {e}"),
            Self::ClusterMissing(name) => write!(f, "cluster \"{name}\" is not in admin /clusters"),
            Self::Shape(what) => {
                write!(f, "admin /clusters answer has an unexpected shape: {what}")
            }
        }
    }
}

/// Health flags under which Envoy's own load balancers would avoid a host.
const UNHEALTHY_FLAGS: [&str; 5] = [
    "failed_active_health_check",
    "failed_outlier_check",
    "failed_eds_health",
    "excluded_via_immediate_hc_fail",
    "active_hc_timeout",
];
const UNHEALTHY_EDS_STATUSES: [&str; 3] = ["UNHEALTHY", "DRAINING", "TIMEOUT"];

/// The hosts of `cluster`, in Envoy's order. Hosts that are not IP sockets (pipes, internal
/// addresses) cannot be named in an override header and are skipped.
pub fn cluster_hosts(body: &[u8], cluster: &str) -> Result<Vec<HostStatus>, AdminError> {
    let document: Value =
        serde_json::from_slice(body).map_err(|e| AdminError::NotJson(e.to_string()))?;
    let clusters = document
        .get("cluster_statuses")
        .and_then(Value::as_array)
        .ok_or(AdminError::Shape("no cluster_statuses array"))?;
    let status = clusters
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(cluster))
        .ok_or_else(|| AdminError::ClusterMissing(cluster.to_owned()))?;
    // A cluster with no hosts has no host_statuses field at all.
    let Some(hosts) = status.get("host_statuses") else {
        return Ok(Vec::new());
    };
    let hosts = hosts
        .as_array()
        .ok_or(AdminError::Shape("host_statuses is not an array"))?;
    Ok(hosts.iter().filter_map(host_status).collect())
}

fn host_status(host: &Value) -> Option<HostStatus> {
    let socket = host.get("address")?.get("socket_address")?;
    let ip = socket.get("address")?.as_str()?;
    let port = socket.get("port_value")?.as_u64()?;
    let text = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    let address = parse_endpoint(&text).ok()?;
    let health = host.get("health_status");
    let flagged = UNHEALTHY_FLAGS
        .iter()
        .any(|flag| health.and_then(|h| h.get(*flag)).and_then(Value::as_bool) == Some(true));
    let eds_unhealthy = health
        .and_then(|h| h.get("eds_health_status"))
        .and_then(Value::as_str)
        .is_some_and(|s| UNHEALTHY_EDS_STATUSES.contains(&s));
    let removed = health
        .and_then(|h| h.get("pending_dynamic_removal"))
        .and_then(Value::as_bool)
        == Some(true);
    let weight = host
        .get("weight")
        .and_then(Value::as_u64)
        .map_or(1, |w| u32::try_from(w).unwrap_or(u32::MAX).max(1));
    Some(HostStatus {
        address,
        healthy: !flagged && !eds_unhealthy,
        removed,
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from Envoy 1.40's real answer.
    const BODY: &str = r#"{"cluster_statuses":[
      {"name":"other","host_statuses":[{"address":{"socket_address":{"address":"10.9.9.9","port_value":1}}}]},
      {"name":"model_servers","host_statuses":[
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8001}},
         "stats":[{"name":"cx_total"}],"health_status":{"eds_health_status":"HEALTHY"},"weight":3},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8003}},
         "health_status":{"failed_active_health_check":true,"eds_health_status":"HEALTHY"}},
        {"address":{"socket_address":{"address":"fd00::1","port_value":9000}},
         "health_status":{"eds_health_status":"DRAINING"}},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8004}},
         "health_status":{"eds_health_status":"HEALTHY","pending_active_hc":true}},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8005}},
         "health_status":{"eds_health_status":"HEALTHY","pending_dynamic_removal":true}},
        {"address":{"pipe":{"path":"/tmp/sock"}}}
      ]}]}"#;

    #[test]
    fn reads_members_and_envoys_health_verdict() {
        let hosts = cluster_hosts(BODY.as_bytes(), "model_servers").unwrap();
        let view: Vec<(&str, bool)> = hosts
            .iter()
            .filter(|h| !h.removed)
            .map(|h| (h.address.as_str(), h.healthy))
            .collect();
        let removed: Vec<&str> = hosts
            .iter()
            .filter(|h| h.removed)
            .map(|h| h.address.as_str())
            .collect();
        assert_eq!(removed, vec!["127.0.0.1:8005"]);
        assert_eq!(hosts[0].weight, 3);
        assert_eq!(hosts[1].weight, 1, "no weight shown: 1");
        assert_eq!(
            view,
            vec![
                ("127.0.0.1:8001", true),
                ("127.0.0.1:8003", false),
                ("[fd00::1]:9000", false),
                // Not yet health checked: Envoy itself still routes to it.
                ("127.0.0.1:8004", true),
            ]
        );
    }

    #[test]
    fn a_cluster_without_hosts_is_empty_and_a_missing_one_is_an_error() {
        let body = br#"{"cluster_statuses":[{"name":"empty"}]}"#;
        assert_eq!(cluster_hosts(body, "empty").unwrap(), vec![]);
        assert_eq!(
            cluster_hosts(body, "nope"),
            Err(AdminError::ClusterMissing("nope".into()))
        );
        assert!(matches!(
            cluster_hosts(b"<html>", "x"),
            Err(AdminError::NotJson(_))
        ));
        assert!(matches!(
            cluster_hosts(b"{}", "x"),
            Err(AdminError::Shape(_))
        ));
    }
}
