//! The endpoint addresses a table's columns stand for. They live in their own shared-data key,
//! named by a random token that the table header points at, so the per-request table stays
//! small and a membership, once written, never changes: a request can always map the endpoint it
//! counted back to an address, even after the pool changed under it.

use std::collections::HashMap;
use std::fmt;

use crate::prefix::endpoint_hash;
use crate::select::Selection;

const MAGIC: &str = "MLBM1";
const LOG_MAGIC: &str = "MLBL1";
/// Memberships kept in the log. A reader looks a token up right after reading the table that
/// names it, so only the current one is ever needed; the older ones cover a reader that lost a
/// race with a few changes in a row.
pub const LOG_KEPT: usize = 8;

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

    /// The shared-data key of the pool's membership log: the most recent memberships, newest
    /// first, in one value. One key per pool, whatever the number of membership changes
    /// (proxy-wasm cannot delete a key, so one key per membership would grow for ever).
    pub fn log_key(key_prefix: &str) -> String {
        format!("{key_prefix}members")
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

    /// The membership `token` from a log value.
    pub fn from_log(log: &[u8], token: u64) -> Result<Self, MalformedMembership> {
        let text = std::str::from_utf8(log).map_err(|_| MalformedMembership)?;
        let mut lines = text.split('\n');
        if lines.next() != Some(LOG_MAGIC) {
            return Err(MalformedMembership);
        }
        let wanted = format!("@{token:016x}");
        let mut lines = lines.skip_while(|line| *line != wanted);
        if lines.next().is_none() {
            return Err(MalformedMembership);
        }
        let endpoints: Vec<String> = lines
            .take_while(|line| !line.starts_with('@'))
            .map(str::to_owned)
            .collect();
        if endpoints.iter().any(String::is_empty) {
            return Err(MalformedMembership);
        }
        let membership = Self::new(token, endpoints);
        if membership.positions.len() != membership.endpoints.len() {
            return Err(MalformedMembership);
        }
        Ok(membership)
    }

    /// A log value with this membership first, then up to `LOG_KEPT - 1` of `log`'s newest.
    pub fn prepend_to_log(&self, log: Option<&[u8]>) -> Vec<u8> {
        let mut text = String::from(LOG_MAGIC);
        text.push_str(&format!("\n@{:016x}", self.token));
        for endpoint in &self.endpoints {
            text.push('\n');
            text.push_str(endpoint);
        }
        let previous = log
            .and_then(|l| std::str::from_utf8(l).ok())
            .and_then(|l| l.strip_prefix(LOG_MAGIC));
        if let Some(previous) = previous {
            let mut kept = 1;
            let own = format!("@{:016x}", self.token);
            let mut skipping = false;
            for line in previous.split('\n').skip(1) {
                if line.starts_with('@') {
                    skipping = line == own;
                    if !skipping {
                        kept += 1;
                    }
                }
                if kept > LOG_KEPT {
                    break;
                }
                if !skipping {
                    text.push('\n');
                    text.push_str(line);
                }
            }
        }
        text.into_bytes()
    }

    /// How many memberships a log value holds.
    pub fn log_len(log: &[u8]) -> usize {
        log.split(|&b| b == b'\n')
            .filter(|l| l.first() == Some(&b'@'))
            .count()
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
            Membership::log_key("model_lb.v3.c."),
            "model_lb.v3.c.members"
        );
    }

    #[test]
    fn the_log_keeps_the_newest_memberships_in_one_bounded_value() {
        let mut log: Option<Vec<u8>> = None;
        let mut sizes = Vec::new();
        for token in 1..=100u64 {
            let m = Membership::new(
                token,
                (0..3).map(|i| format!("10.0.{token}.{i}:80")).collect(),
            );
            let next = m.prepend_to_log(log.as_deref());
            sizes.push(next.len());
            log = Some(next);
            let log = log.as_deref().unwrap();
            assert_eq!(Membership::from_log(log, token).unwrap(), m);
            assert_eq!(Membership::log_len(log), (token as usize).min(LOG_KEPT));
        }
        let log = log.unwrap();
        // The newest LOG_KEPT are there, the older ones are gone.
        assert!(Membership::from_log(&log, 100 - LOG_KEPT as u64 + 1).is_ok());
        assert!(Membership::from_log(&log, 100 - LOG_KEPT as u64).is_err());
        assert!(sizes[99] <= sizes[20] + 16, "{sizes:?}");
        // Writing the same membership again does not duplicate it.
        let again = Membership::new(100, (0..3).map(|i| format!("10.0.100.{i}:80")).collect());
        assert_eq!(
            Membership::log_len(&again.prepend_to_log(Some(&log))),
            LOG_KEPT
        );
        // An empty pool is a valid entry.
        let empty = Membership::new(7, vec![]).prepend_to_log(None);
        assert_eq!(Membership::from_log(&empty, 7).unwrap().len(), 0);
        assert!(Membership::from_log(b"garbage", 7).is_err());
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
