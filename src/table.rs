//! The outstanding-request table of one pool: a single shared-data value holding every count, so
//! a request costs one read and one compare-and-swap write whatever the pool size.
//!
//! Counts are kept per worker VM ("slot") as well as in total. Totals are what selection reads;
//! the per-slot rows exist so that the counts of a VM that died holding requests can be taken
//! back: each slot carries an owner token and a heartbeat, and a slot whose heartbeat is older
//! than the lease is reaped (its row subtracted from the totals). A request remembers the owner
//! token it incremented under and only decrements while that token still owns the slot, so a
//! reaped or re-created table can never be decremented twice.
//!
//! Layout (little endian):
//! ```text
//! 0   magic "MLB1"
//! 4   endpoint count   u16
//! 6   slot count       u16
//! 8   membership token u64   names the key holding the endpoint addresses
//! 16  leader owner     u64   0 = none; the leader reaps slots and publishes gauges
//! 24  leader expiry    u64   ms since the epoch
//! 32  slots            slot count × (owner u64, heartbeat ms u64); owner 0 = free
//! ..  totals           endpoint count × u32
//! ..  health           endpoint count × 16 bytes (see `health::Health`)
//! ..  rows             slot count × endpoint count × u32
//! ```

use std::fmt;

use crate::health::{Health, HEALTH_LEN};
use crate::select::Loads;

const MAGIC: &[u8; 4] = b"MLB1";
const HEADER_LEN: usize = 32;
const SLOT_LEN: usize = 16;
const COUNT_LEN: usize = 4;
/// Envoy runs one VM per worker thread plus one on the main thread; 256 leaves room for the
/// largest machines and for VMs of an old config that are still draining.
pub const MAX_SLOTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    /// The bytes are not a table this version wrote; the value is left alone.
    Malformed(&'static str),
    /// Every slot is owned by a live VM.
    SlotsExhausted,
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "shared table is malformed: {why}"),
            Self::SlotsExhausted => write!(f, "all {MAX_SLOTS} worker slots are in use"),
        }
    }
}

/// What a decrement did. `ClampedAtZero` means the count was already zero: a bug or a table
/// that was re-created under a live request; either way the count stays at zero and is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decrement {
    Applied,
    ClampedAtZero,
}

/// Result of reaping expired slots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    pub slots: u32,
    /// In-flight requests taken back from the reaped slots.
    pub requests: u64,
    /// Totals that would have gone negative and were clamped at zero.
    pub corrections: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    bytes: Vec<u8>,
    endpoints: usize,
    slots: usize,
}

impl Table {
    pub fn new(membership_token: u64, endpoints: usize) -> Self {
        let mut bytes = vec![0u8; Self::size(endpoints, 0)];
        bytes[..4].copy_from_slice(MAGIC);
        bytes[4..6].copy_from_slice(&(endpoints as u16).to_le_bytes());
        bytes[8..16].copy_from_slice(&membership_token.to_le_bytes());
        Self {
            bytes,
            endpoints,
            slots: 0,
        }
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Self, TableError> {
        if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
            return Err(TableError::Malformed("bad magic or short header"));
        }
        let endpoints = usize::from(u16::from_le_bytes([bytes[4], bytes[5]]));
        let slots = usize::from(u16::from_le_bytes([bytes[6], bytes[7]]));
        if slots > MAX_SLOTS {
            return Err(TableError::Malformed("too many slots"));
        }
        if bytes.len() != Self::size(endpoints, slots) {
            return Err(TableError::Malformed("length does not match counts"));
        }
        Ok(Self {
            bytes,
            endpoints,
            slots,
        })
    }

    fn size(endpoints: usize, slots: usize) -> usize {
        HEADER_LEN + slots * SLOT_LEN + endpoints * (COUNT_LEN * (1 + slots) + HEALTH_LEN)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints
    }

    pub fn slot_count(&self) -> usize {
        self.slots
    }

    pub fn membership_token(&self) -> u64 {
        self.read_u64(8)
    }

    pub fn leader(&self) -> (u64, u64) {
        (self.read_u64(16), self.read_u64(24))
    }

    pub fn set_leader(&mut self, owner: u64, expiry_ms: u64) {
        self.write_u64(16, owner);
        self.write_u64(24, expiry_ms);
    }

    pub fn total(&self, endpoint: usize) -> u32 {
        self.read_u32(self.totals_offset() + endpoint * COUNT_LEN)
    }

    pub fn totals(&self) -> Vec<u32> {
        (0..self.endpoints).map(|e| self.total(e)).collect()
    }

    pub fn in_flight(&self) -> u64 {
        (0..self.endpoints).map(|e| u64::from(self.total(e))).sum()
    }

    pub fn health(&self, endpoint: usize) -> Health {
        let at = self.health_offset(endpoint);
        Health::decode(&self.bytes[at..at + HEALTH_LEN])
    }

    /// `Health::eligible` without decoding the whole record: this runs per endpoint per request.
    pub fn eligible(&self, endpoint: usize, now_ms: u64) -> bool {
        let at = self.health_offset(endpoint);
        self.bytes[at] == 0 && self.read_u64(at + 8) <= now_ms
    }

    pub fn set_health(&mut self, endpoint: usize, health: &Health) {
        let at = self.health_offset(endpoint);
        health.encode(&mut self.bytes[at..at + HEALTH_LEN]);
    }

    pub fn slot_owner(&self, slot: usize) -> u64 {
        if slot >= self.slots {
            return 0;
        }
        self.read_u64(HEADER_LEN + slot * SLOT_LEN)
    }

    pub fn slot_heartbeat(&self, slot: usize) -> u64 {
        self.read_u64(HEADER_LEN + slot * SLOT_LEN + 8)
    }

    pub fn row_count(&self, slot: usize, endpoint: usize) -> u32 {
        self.read_u32(self.row_offset(slot, endpoint))
    }

    /// Gives `owner` a slot: a free one if any, else a new one at the end.
    pub fn claim_slot(&mut self, owner: u64, now_ms: u64) -> Result<usize, TableError> {
        let slot = match (0..self.slots).find(|&s| self.slot_owner(s) == 0) {
            Some(free) => free,
            None if self.slots < MAX_SLOTS => self.append_slot(),
            None => return Err(TableError::SlotsExhausted),
        };
        self.write_u64(HEADER_LEN + slot * SLOT_LEN, owner);
        self.heartbeat(slot, now_ms);
        Ok(slot)
    }

    fn append_slot(&mut self) -> usize {
        let slot = self.slots;
        let header_end = HEADER_LEN + slot * SLOT_LEN;
        self.bytes.splice(header_end..header_end, [0u8; SLOT_LEN]);
        self.bytes
            .resize(self.bytes.len() + self.endpoints * COUNT_LEN, 0);
        self.slots += 1;
        self.bytes[6..8].copy_from_slice(&(self.slots as u16).to_le_bytes());
        slot
    }

    pub fn heartbeat(&mut self, slot: usize, now_ms: u64) {
        self.write_u64(HEADER_LEN + slot * SLOT_LEN + 8, now_ms);
    }

    /// Counts one more request on `endpoint` for `slot`. Saturates rather than wraps: four
    /// billion in-flight requests means a bug, and wrapping would make the endpoint look idle.
    pub fn increment(&mut self, slot: usize, endpoint: usize) {
        let row = self.row_offset(slot, endpoint);
        let total = self.totals_offset() + endpoint * COUNT_LEN;
        let row_value = self.read_u32(row).saturating_add(1);
        let total_value = self.read_u32(total).saturating_add(1);
        self.write_u32(row, row_value);
        self.write_u32(total, total_value);
    }

    pub fn decrement(&mut self, slot: usize, endpoint: usize) -> Decrement {
        let row = self.row_offset(slot, endpoint);
        let total = self.totals_offset() + endpoint * COUNT_LEN;
        let (row_value, total_value) = (self.read_u32(row), self.read_u32(total));
        if row_value == 0 {
            // This slot holds nothing here: the total belongs to other slots, leave it alone.
            return Decrement::ClampedAtZero;
        }
        self.write_u32(row, row_value - 1);
        if total_value == 0 {
            return Decrement::ClampedAtZero;
        }
        self.write_u32(total, total_value - 1);
        Decrement::Applied
    }

    /// Frees every slot whose heartbeat is older than `ttl_ms` and takes its requests back out of
    /// the totals.
    pub fn reap_expired(&mut self, now_ms: u64, ttl_ms: u64) -> Reaped {
        let mut reaped = Reaped::default();
        for slot in 0..self.slots {
            if self.slot_owner(slot) == 0
                || self.slot_heartbeat(slot).saturating_add(ttl_ms) > now_ms
            {
                continue;
            }
            reaped.slots += 1;
            for endpoint in 0..self.endpoints {
                let row = self.row_offset(slot, endpoint);
                let held = self.read_u32(row);
                if held == 0 {
                    continue;
                }
                let total = self.totals_offset() + endpoint * COUNT_LEN;
                let total_value = self.read_u32(total);
                if total_value < held {
                    reaped.corrections += u64::from(held - total_value);
                }
                self.write_u32(total, total_value.saturating_sub(held));
                self.write_u32(row, 0);
                reaped.requests += u64::from(held);
            }
            self.write_u64(HEADER_LEN + slot * SLOT_LEN, 0);
            self.write_u64(HEADER_LEN + slot * SLOT_LEN + 8, 0);
        }
        reaped
    }

    /// A table for a new membership: `old_to_new[old]` is where an old endpoint's counts move,
    /// `None` for an endpoint that left (its counts are dropped; its requests' decrements will
    /// find nothing to decrement). Slots and the leader lease carry over.
    pub fn remapped(
        &self,
        membership_token: u64,
        endpoints: usize,
        old_to_new: &[Option<usize>],
    ) -> Self {
        let mut next = Table::new(membership_token, endpoints);
        for _ in 0..self.slots {
            next.append_slot();
        }
        next.bytes[16..HEADER_LEN + self.slots * SLOT_LEN]
            .copy_from_slice(&self.bytes[16..HEADER_LEN + self.slots * SLOT_LEN]);
        for (old, new) in old_to_new.iter().enumerate().take(self.endpoints) {
            let Some(new) = *new else { continue };
            if new >= endpoints {
                continue;
            }
            let total = next.totals_offset() + new * COUNT_LEN;
            next.write_u32(total, self.total(old));
            next.set_health(new, &self.health(old));
            for slot in 0..self.slots {
                let row = next.row_offset(slot, new);
                next.write_u32(row, self.row_count(slot, old));
            }
        }
        next
    }

    fn totals_offset(&self) -> usize {
        HEADER_LEN + self.slots * SLOT_LEN
    }

    fn health_offset(&self, endpoint: usize) -> usize {
        self.totals_offset() + self.endpoints * COUNT_LEN + endpoint * HEALTH_LEN
    }

    fn row_offset(&self, slot: usize, endpoint: usize) -> usize {
        self.totals_offset()
            + self.endpoints * (COUNT_LEN + HEALTH_LEN)
            + slot * self.endpoints * COUNT_LEN
            + endpoint * COUNT_LEN
    }

    fn read_u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[at..at + 4]);
        u32::from_le_bytes(b)
    }

    fn write_u32(&mut self, at: usize, value: u32) {
        self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn read_u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn write_u64(&mut self, at: usize, value: u64) {
        self.bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
}

impl Loads for Table {
    fn endpoint_count(&self) -> usize {
        self.endpoints
    }
    fn load(&self, endpoint: usize) -> u32 {
        self.total(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reparse(table: &Table) -> Table {
        Table::parse(table.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn a_new_table_round_trips_and_is_all_zero() {
        let table = Table::new(0xABCD, 3);
        let parsed = reparse(&table);
        assert_eq!(parsed, table);
        assert_eq!(parsed.membership_token(), 0xABCD);
        assert_eq!(parsed.totals(), vec![0, 0, 0]);
        assert_eq!(parsed.slot_count(), 0);
        assert_eq!(parsed.leader(), (0, 0));
    }

    #[test]
    fn malformed_bytes_are_rejected_not_misread() {
        assert!(Table::parse(vec![]).is_err());
        assert!(Table::parse(b"MLB0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec()).is_err());
        let mut bytes = Table::new(1, 4).as_bytes().to_vec();
        bytes.pop();
        assert_eq!(
            Table::parse(bytes),
            Err(TableError::Malformed("length does not match counts"))
        );
    }

    #[test]
    fn counts_are_per_slot_and_in_total() {
        let mut table = Table::new(1, 3);
        let a = table.claim_slot(11, 1000).unwrap();
        let b = table.claim_slot(22, 1000).unwrap();
        assert_ne!(a, b);
        table.increment(a, 0);
        table.increment(a, 2);
        table.increment(b, 2);
        let mut table = reparse(&table);
        assert_eq!(table.totals(), vec![1, 0, 2]);
        assert_eq!(table.row_count(a, 2), 1);
        assert_eq!(table.row_count(b, 2), 1);
        assert_eq!(table.decrement(b, 2), Decrement::Applied);
        assert_eq!(table.totals(), vec![1, 0, 1]);
        assert_eq!(table.decrement(b, 2), Decrement::ClampedAtZero);
        assert_eq!(
            table.totals(),
            vec![1, 0, 1],
            "a clamped decrement changes nothing"
        );
        assert_eq!(table.in_flight(), 2);
    }

    #[test]
    fn freed_slots_are_reused_before_the_table_grows() {
        let mut table = Table::new(1, 2);
        let a = table.claim_slot(1, 0).unwrap();
        let _b = table.claim_slot(2, 0).unwrap();
        table.heartbeat(1, 50_000);
        let reaped = table.reap_expired(50_000, 10_000);
        assert_eq!(reaped.slots, 1);
        assert_eq!(table.slot_owner(a), 0);
        assert_eq!(table.claim_slot(3, 50_000).unwrap(), a);
        assert_eq!(table.slot_count(), 2);
    }

    #[test]
    fn reaping_takes_back_exactly_what_the_dead_slot_held() {
        let mut table = Table::new(1, 2);
        let dead = table.claim_slot(1, 1_000).unwrap();
        let live = table.claim_slot(2, 1_000).unwrap();
        for _ in 0..3 {
            table.increment(dead, 0);
        }
        table.increment(dead, 1);
        table.increment(live, 0);
        table.heartbeat(live, 20_000);
        let reaped = table.reap_expired(20_000, 10_000);
        assert_eq!(
            reaped,
            Reaped {
                slots: 1,
                requests: 4,
                corrections: 0
            }
        );
        assert_eq!(table.totals(), vec![1, 0]);
        assert_eq!(table.slot_owner(live), 2);
        // Not yet expired at exactly the deadline minus one.
        assert_eq!(table.reap_expired(29_999, 10_000).slots, 0);
        assert_eq!(table.reap_expired(30_000, 10_000).slots, 1);
        assert_eq!(table.totals(), vec![0, 0]);
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let mut table = Table::new(1, 1);
        let s = table.claim_slot(1, 0).unwrap();
        let row = table.row_offset(s, 0);
        table.write_u32(row, u32::MAX);
        let total = table.totals_offset();
        table.write_u32(total, u32::MAX);
        table.increment(s, 0);
        assert_eq!(table.total(0), u32::MAX);
    }

    #[test]
    fn slots_are_bounded() {
        let mut table = Table::new(1, 1);
        for owner in 1..=MAX_SLOTS as u64 {
            table.claim_slot(owner, 0).unwrap();
        }
        assert_eq!(table.claim_slot(9999, 0), Err(TableError::SlotsExhausted));
        assert_eq!(reparse(&table).slot_count(), MAX_SLOTS);
    }

    #[test]
    fn remapping_moves_counts_with_their_endpoints() {
        let mut table = Table::new(1, 3);
        let s = table.claim_slot(5, 100).unwrap();
        table.set_leader(77, 999);
        table.increment(s, 0);
        table.increment(s, 2);
        table.increment(s, 2);
        // Endpoint 1 leaves, 2 moves to position 0, 0 moves to 1, a new endpoint takes 2.
        let next = table.remapped(2, 3, &[Some(1), None, Some(0)]);
        let next = reparse(&next);
        assert_eq!(next.membership_token(), 2);
        assert_eq!(next.totals(), vec![2, 1, 0]);
        assert_eq!(next.row_count(s, 0), 2);
        assert_eq!(next.slot_owner(s), 5);
        assert_eq!(next.slot_heartbeat(s), 100);
        assert_eq!(next.leader(), (77, 999));
    }

    #[test]
    fn health_lives_beside_the_counts_and_moves_with_its_endpoint() {
        let mut table = Table::new(1, 2);
        let s = table.claim_slot(5, 0).unwrap();
        let sick = Health {
            active_unhealthy: true,
            failures: 2,
            ..Health::default()
        };
        table.set_health(1, &sick);
        table.increment(s, 1);
        let table = reparse(&table);
        assert_eq!(table.health(1), sick);
        assert_eq!(table.health(0), Health::default());
        assert_eq!(table.total(1), 1);
        let next = table.remapped(2, 1, &[None, Some(0)]);
        assert_eq!(reparse(&next).health(0), sick);
    }
}
