//! Envoy's own view of a cluster, from the admin API's `GET /clusters?format=json`: which hosts
//! are members and which Envoy considers unhealthy. The override_host policy ignores health, so
//! the filter has to honour it itself.

use std::fmt;

use std::borrow::Cow;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

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
    /// Unhealthy only because Envoy has not health checked it yet: a host Envoy just started
    /// with or EDS just added. Worth another look soon, and not worth a warning.
    pub awaiting_first_check: bool,
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

const UNHEALTHY_EDS_STATUSES: [&str; 3] = ["UNHEALTHY", "DRAINING", "TIMEOUT"];

/// The hosts of `cluster`, in Envoy's order. Hosts that are not IP sockets (pipes, internal
/// addresses) cannot be named in an override header and are skipped.
///
/// An Istio-sized Envoy answers `/clusters` with several megabytes (every cluster, every host's
/// stats). The answer is read in one pass that only materialises the watched cluster's hosts:
/// everything else is skipped by the parser without building a tree.
pub fn cluster_hosts(body: &[u8], cluster: &str) -> Result<Vec<HostStatus>, AdminError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = Document { cluster }
        .deserialize(&mut de)
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => AdminError::Shape("not Envoy's /clusters JSON"),
            _ => AdminError::NotJson(e.to_string()),
        })?;
    let hosts = found.ok_or_else(|| AdminError::ClusterMissing(cluster.to_owned()))?;
    Ok(hosts.into_iter().filter_map(HostJson::status).collect())
}

/// The top-level object: only `cluster_statuses` is read.
struct Document<'a> {
    cluster: &'a str,
}

impl<'de> DeserializeSeed<'de> for Document<'_> {
    type Value = Option<Vec<HostJson>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Document<'_> {
    type Value = Option<Vec<HostJson>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with cluster_statuses")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        let mut seen = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "cluster_statuses" {
                seen = true;
                found = map.next_value_seed(Clusters {
                    cluster: self.cluster,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            return Err(de::Error::custom("no cluster_statuses array"));
        }
        Ok(found)
    }
}

/// `cluster_statuses`: the watched cluster's hosts, the other clusters skipped.
struct Clusters<'a> {
    cluster: &'a str,
}

impl<'de> DeserializeSeed<'de> for Clusters<'_> {
    type Value = Option<Vec<HostJson>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Clusters<'_> {
    type Value = Option<Vec<HostJson>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of cluster statuses")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(hosts) = seq.next_element_seed(OneCluster {
            cluster: self.cluster,
        })? {
            if found.is_none() {
                found = hosts;
            }
        }
        Ok(found)
    }
}

/// One cluster status: `Some(hosts)` when it is the watched cluster.
struct OneCluster<'a> {
    cluster: &'a str,
}

impl<'de> DeserializeSeed<'de> for OneCluster<'_> {
    type Value = Option<Vec<HostJson>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for OneCluster<'_> {
    type Value = Option<Vec<HostJson>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a cluster status object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // Envoy prints `name` before `host_statuses` (protobuf field order); should it not,
        // the hosts are kept until the name is known.
        let mut name_matches: Option<bool> = None;
        let mut hosts: Option<Vec<HostJson>> = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "name" => {
                    let name = map.next_value::<Cow<'de, str>>()?;
                    name_matches = Some(name == self.cluster);
                }
                "host_statuses" if name_matches != Some(false) => {
                    hosts = Some(map.next_value()?);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // A cluster with no hosts has no host_statuses field at all.
        Ok((name_matches == Some(true)).then(|| hosts.unwrap_or_default()))
    }
}

#[derive(Deserialize)]
struct HostJson {
    #[serde(default)]
    address: Option<AddressJson>,
    #[serde(default)]
    health_status: Option<HealthJson>,
    #[serde(default)]
    weight: Option<u64>,
}

#[derive(Deserialize)]
struct AddressJson {
    #[serde(default)]
    socket_address: Option<SocketJson>,
}

#[derive(Deserialize)]
struct SocketJson {
    address: String,
    #[serde(default)]
    port_value: u64,
}

#[derive(Deserialize, Default)]
struct HealthJson {
    #[serde(default)]
    failed_active_health_check: bool,
    #[serde(default)]
    failed_outlier_check: bool,
    #[serde(default)]
    failed_eds_health: bool,
    #[serde(default)]
    excluded_via_immediate_hc_fail: bool,
    #[serde(default)]
    active_hc_timeout: bool,
    #[serde(default)]
    pending_dynamic_removal: bool,
    #[serde(default)]
    pending_active_hc: bool,
    #[serde(default)]
    eds_health_status: Option<String>,
}

impl HostJson {
    fn status(self) -> Option<HostStatus> {
        let socket = self.address?.socket_address?;
        let text = if socket.address.contains(':') {
            format!("[{}]:{}", socket.address, socket.port_value)
        } else {
            format!("{}:{}", socket.address, socket.port_value)
        };
        let address = parse_endpoint(&text).ok()?;
        let health = self.health_status.unwrap_or_default();
        // Flags under which Envoy's own load balancers would avoid a host.
        let flagged = health.failed_active_health_check
            || health.failed_outlier_check
            || health.failed_eds_health
            || health.excluded_via_immediate_hc_fail
            || health.active_hc_timeout;
        let eds_unhealthy = health
            .eds_health_status
            .as_deref()
            .is_some_and(|s| UNHEALTHY_EDS_STATUSES.contains(&s));
        let weight = self
            .weight
            .map_or(1, |w| u32::try_from(w).unwrap_or(u32::MAX).max(1));
        let awaiting_first_check = health.pending_active_hc
            && health.failed_active_health_check
            && !health.failed_outlier_check
            && !health.failed_eds_health
            && !eds_unhealthy;
        Some(HostStatus {
            address,
            healthy: !flagged && !eds_unhealthy,
            removed: health.pending_dynamic_removal,
            weight,
            awaiting_first_check,
        })
    }
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
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8006}},
         "health_status":{"failed_active_health_check":true,"pending_active_hc":true,"eds_health_status":"HEALTHY"}},
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
                // Marked failed until its first check, as Envoy marks every host it starts with
                // or EDS adds: unhealthy for now, but only awaiting that check.
                ("127.0.0.1:8006", false),
            ]
        );
        let awaiting: Vec<&str> = hosts
            .iter()
            .filter(|h| h.awaiting_first_check)
            .map(|h| h.address.as_str())
            .collect();
        assert_eq!(awaiting, vec!["127.0.0.1:8006"], "8003 failed a real check");
    }

    #[test]
    fn other_clusters_are_skipped_whatever_they_hold() {
        let body = br#"{"cluster_statuses":[
          {"name":"odd","host_statuses":"not even an array","extra":[1,{"x":null}]},
          {"observability_name":"first","name":"pool","host_statuses":[
            {"address":{"socket_address":{"address":"10.0.0.1","port_value":80}},"weight":2}]},
          {"name":"pool","host_statuses":[]}
        ],"other":{"deep":[[[]]]}}"#;
        let hosts = cluster_hosts(body, "pool").unwrap();
        assert_eq!(hosts.len(), 1, "the first cluster of that name");
        assert_eq!(hosts[0].weight, 2);
        assert!(matches!(
            cluster_hosts(br#"{"cluster_statuses": 7}"#, "pool"),
            Err(AdminError::Shape(_))
        ));
        assert!(matches!(
            cluster_hosts(br#"{"cluster_statuses":[{"name":"pool"}"#, "pool"),
            Err(AdminError::NotJson(_))
        ));
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
