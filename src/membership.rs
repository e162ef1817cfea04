//! The endpoint addresses a table's columns stand for. They live in their own shared-data key,
//! named by a random token that the table header points at, so the per-request table stays
//! small and a membership, once written, never changes: a request can always map the endpoint it
//! counted back to an address, even after the pool changed under it.

use std::collections::HashMap;
use std::fmt;

use crate::prefix::endpoint_hash;
use crate::select::Selection;

const MAGIC: &str = "MLBM1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    token: u64,
    endpoints: Vec<String>,
    positions: HashMap<String, usize>,
    /// Each address's stable hash, for PREFIX_AWARE's rendezvous order; computed once here so
    /// the request path only mixes it with the key.
    hashes: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedMembership;

impl fmt::Display for MalformedMembership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("shared membership record is malformed")
    }
}

impl Membership {
    pub fn new(token: u64, endpoints: Vec<String>) -> Self {
        let positions = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.clone(), i))
            .collect();
        let hashes = endpoints.iter().map(|e| endpoint_hash(e)).collect();
        Self {
            token,
            endpoints,
            positions,
            hashes,
        }
    }

    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// The shared-data key holding the membership `token` names.
    pub fn key(key_prefix: &str, token: u64) -> String {
        format!("{key_prefix}members.{token:016x}")
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn position(&self, address: &str) -> Option<usize> {
        self.positions.get(address).copied()
    }

    /// Same endpoints, in any order: a config that lists the pool differently must not reset
    /// the counts of the same backends.
    pub fn has_same_endpoints(&self, endpoints: &[String]) -> bool {
        endpoints.len() == self.endpoints.len()
            && endpoints.iter().all(|e| self.positions.contains_key(e))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut text = String::from(MAGIC);
        for endpoint in &self.endpoints {
            text.push('\n');
            text.push_str(endpoint);
        }
        text.into_bytes()
    }

    pub fn decode(token: u64, bytes: &[u8]) -> Result<Self, MalformedMembership> {
        let text = std::str::from_utf8(bytes).map_err(|_| MalformedMembership)?;
        let mut lines = text.split('\n');
        if lines.next() != Some(MAGIC) {
            return Err(MalformedMembership);
        }
        let endpoints: Vec<String> = lines.map(str::to_owned).collect();
        if endpoints.iter().any(String::is_empty) {
            return Err(MalformedMembership);
        }
        let membership = Self::new(token, endpoints);
        if membership.positions.len() != membership.endpoints.len() {
            return Err(MalformedMembership);
        }
        Ok(membership)
    }

    /// `old → new` column mapping used to carry counts over to this membership.
    pub fn mapping_from(&self, old: &Membership) -> Vec<Option<usize>> {
        old.endpoints.iter().map(|e| self.position(e)).collect()
    }

    /// The routing header: the chosen endpoint, then the fallbacks, comma separated.
    pub fn header_value(&self, selection: &Selection) -> String {
        let picked = selection.as_slice();
        let len = picked
            .iter()
            .map(|&e| self.endpoints[usize::from(e)].len() + 1)
            .sum();
        let mut value = String::with_capacity(len);
        for (i, &endpoint) in picked.iter().enumerate() {
            if i > 0 {
                value.push(',');
            }
            value.push_str(&self.endpoints[usize::from(endpoint)]);
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::select::{select, Strategy};

    fn pool(endpoints: &[&str]) -> Membership {
        Membership::new(9, endpoints.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn round_trips_through_bytes() {
        let m = pool(&["10.0.0.1:80", "[fd00::1]:81"]);
        assert_eq!(Membership::decode(9, &m.encode()).unwrap(), m);
        assert_eq!(
            Membership::key("model_lb.v1.c.", 0xab),
            "model_lb.v1.c.members.00000000000000ab"
        );
    }

    #[test]
    fn rejects_foreign_or_damaged_records() {
        assert!(Membership::decode(1, b"").is_err());
        assert!(Membership::decode(1, b"MLBM0\n1.1.1.1:1").is_err());
        assert!(Membership::decode(1, b"MLBM1\n1.1.1.1:1\n1.1.1.1:1").is_err());
        assert!(Membership::decode(1, b"MLBM1\n\n").is_err());
        assert!(Membership::decode(1, &[0xff, 0xfe]).is_err());
        assert_eq!(Membership::decode(1, b"MLBM1").unwrap().len(), 0);
    }

    #[test]
    fn same_endpoints_ignores_order() {
        let m = pool(&["a:1", "b:2"]);
        assert!(m.has_same_endpoints(&["b:2".into(), "a:1".into()]));
        assert!(!m.has_same_endpoints(&["a:1".into()]));
        assert!(!m.has_same_endpoints(&["a:1".into(), "c:3".into()]));
    }

    #[test]
    fn maps_old_columns_to_new_ones() {
        let old = pool(&["a:1", "b:2", "c:3"]);
        let new = pool(&["c:3", "d:4", "a:1"]);
        assert_eq!(new.mapping_from(&old), vec![Some(2), None, Some(0)]);
    }

    #[test]
    fn header_lists_the_selection_in_order() {
        let m = pool(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let loads = [3u32, 1, 2];
        let mut rng = SplitMix64::new(1);
        let s = select(
            Strategy::LeastOutstandingRequests,
            &loads[..],
            |_| true,
            2,
            &mut rng,
        );
        assert_eq!(m.header_value(&s), "10.0.0.2:80,10.0.0.3:80,10.0.0.1:80");
        let s = select(
            Strategy::LeastOutstandingRequests,
            &loads[..],
            |_| true,
            0,
            &mut rng,
        );
        assert_eq!(m.header_value(&s), "10.0.0.2:80");
    }
}
