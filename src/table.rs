//! The outstanding-request table of one pool: a single shared-data value holding every count, so
//! a request costs one read and one compare-and-swap write whatever the pool size.
//!
//! Counts are kept per worker VM ("slot") as well as in total. Totals are what selection reads;
//! the per-slot holdings exist so that the counts of a VM that died holding requests can be
//! taken back: each slot carries an owner token and a heartbeat, and a slot whose heartbeat is
//! older than the lease is reaped (its holdings subtracted from the totals). A request remembers
//! the owner token it incremented under and only decrements while that token still owns the
//! slot, so a reaped or re-created table can never be decremented twice.
//!
//! Holdings are sparse: one entry per (slot, endpoint) with requests in flight, not a row per
//! slot. The value every request copies therefore grows with the endpoints and the requests in
//! flight, not with endpoints x workers: 1,024 endpoints and 32 workers took 150 KB as rows.
//! Health is sparse too: only endpoints whose health is not the default (failures counted,
//! ejected, or unhealthy in Envoy's view) have a condition entry, so a healthy pool of 1,024
//! endpoints takes about 8 KB (21 KB with a health record per endpoint), plus 8 bytes per busy
//! (slot, endpoint). Every request copies this value in and out of shared data, and a lost
//! compare-and-swap copies it again: its size is most of what a request costs at 1,024 endpoints.
//!
//! Layout (little endian):
//! ```text
//! 0   magic "MLB3"
//! 4   endpoint count   u16
//! 6   slot count       u16
//! 8   membership token u64   names the key holding the endpoint addresses
//! 16  leader owner     u64   0 = none; the leader reaps slots and publishes gauges
//! 24  leader expiry    u64   ms since the epoch
//! 32  holding count    u32
//! 36  condition count  u32
//! 40  slots            slot count × (owner u64, heartbeat ms u64); owner 0 = free
//! ..  totals           endpoint count × u32
//! ..  wanted at        endpoint count × u32   seconds since the epoch (`Health::wanted_at_s`)
//! ..  conditions       condition count × (endpoint u16, flags u8, ejections u8, failures u16,
//!                      reserved u16, ejected until ms u64), sorted by endpoint, never default
//! ..  holdings         holding count × (slot u16, endpoint u16, count u32), sorted, count > 0
//! ```

use std::fmt;

use crate::health::Health;
use crate::select::Loads;

const MAGIC: &[u8; 4] = b"MLB3";
const HEADER_LEN: usize = 40;
const SLOT_LEN: usize = 16;
const COUNT_LEN: usize = 4;
const WANTED_LEN: usize = 4;
const CONDITION_LEN: usize = 16;
const HOLDING_LEN: usize = 8;
const ACTIVE_UNHEALTHY: u8 = 1;
/// Envoy runs one VM per worker thread plus one on the main thread, and a listener update adds
/// a VM per worker until the old one drains; free slots are reused and trailing ones dropped.
pub const MAX_SLOTS: usize = 1_024;

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
    conditions: usize,
    holdings: usize,
}

impl Table {
    pub fn new(membership_token: u64, endpoints: usize) -> Self {
        let mut bytes = vec![0u8; Self::size(endpoints, 0, 0, 0)];
        bytes[..4].copy_from_slice(MAGIC);
        bytes[4..6].copy_from_slice(&(endpoints as u16).to_le_bytes());
        bytes[8..16].copy_from_slice(&membership_token.to_le_bytes());
        Self {
            bytes,
            endpoints,
            slots: 0,
            conditions: 0,
            holdings: 0,
        }
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Self, TableError> {
        if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
            return Err(TableError::Malformed("bad magic or short header"));
        }
        let endpoints = usize::from(u16::from_le_bytes([bytes[4], bytes[5]]));
        let slots = usize::from(u16::from_le_bytes([bytes[6], bytes[7]]));
        let holdings = u32::from_le_bytes([bytes[32], bytes[33], bytes[34], bytes[35]]) as usize;
        let conditions = u32::from_le_bytes([bytes[36], bytes[37], bytes[38], bytes[39]]) as usize;
        if slots > MAX_SLOTS {
            return Err(TableError::Malformed("too many slots"));
        }
        if conditions > endpoints {
            return Err(TableError::Malformed("more conditions than endpoints"));
        }
        if Some(bytes.len()) != Self::checked_size(endpoints, slots, conditions, holdings) {
            return Err(TableError::Malformed("length does not match counts"));
        }
        Ok(Self {
            bytes,
            endpoints,
            slots,
            conditions,
            holdings,
        })
    }

    fn size(endpoints: usize, slots: usize, conditions: usize, holdings: usize) -> usize {
        HEADER_LEN
            + slots * SLOT_LEN
            + endpoints * (COUNT_LEN + WANTED_LEN)
            + conditions * CONDITION_LEN
            + holdings * HOLDING_LEN
    }

    /// [`Self::size`] for counts read from untrusted bytes (a 32-bit target could overflow).
    fn checked_size(
        endpoints: usize,
        slots: usize,
        conditions: usize,
        holdings: usize,
    ) -> Option<usize> {
        HEADER_LEN
            .checked_add(slots.checked_mul(SLOT_LEN)?)?
            .checked_add(endpoints.checked_mul(COUNT_LEN + WANTED_LEN)?)?
            .checked_add(conditions.checked_mul(CONDITION_LEN)?)?
            .checked_add(holdings.checked_mul(HOLDING_LEN)?)
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

    /// (slot, endpoint) pairs with requests in flight.
    pub fn holding_count(&self) -> usize {
        self.holdings
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
        let mut health = Health {
            wanted_at_s: self.read_u32(self.wanted_offset() + endpoint * WANTED_LEN),
            ..Health::default()
        };
        if let Ok(i) = self.find_condition(endpoint) {
            let at = self.conditions_offset() + i * CONDITION_LEN;
            health.active_unhealthy = self.bytes[at + 2] & ACTIVE_UNHEALTHY != 0;
            health.ejections = self.bytes[at + 3];
            health.failures = u16::from_le_bytes([self.bytes[at + 4], self.bytes[at + 5]]);
            health.ejected_until_ms = self.read_u64(at + 8);
        }
        health
    }

    /// `Health::eligible` without building the whole record: this runs per endpoint per request,
    /// and in a healthy pool finds no condition at all.
    pub fn eligible(&self, endpoint: usize, now_ms: u64) -> bool {
        if self.conditions == 0 {
            return true;
        }
        match self.find_condition(endpoint) {
            Ok(i) => {
                let at = self.conditions_offset() + i * CONDITION_LEN;
                self.bytes[at + 2] & ACTIVE_UNHEALTHY == 0 && self.read_u64(at + 8) <= now_ms
            }
            Err(_) => true,
        }
    }

    pub fn set_health(&mut self, endpoint: usize, health: &Health) {
        self.write_u32(
            self.wanted_offset() + endpoint * WANTED_LEN,
            health.wanted_at_s,
        );
        let condition = Health {
            wanted_at_s: 0,
            ..*health
        };
        let found = self.find_condition(endpoint);
        if condition == Health::default() {
            if let Ok(i) = found {
                let at = self.conditions_offset() + i * CONDITION_LEN;
                self.bytes.drain(at..at + CONDITION_LEN);
                self.conditions -= 1;
                self.write_condition_count();
            }
            return;
        }
        let mut entry = [0u8; CONDITION_LEN];
        entry[..2].copy_from_slice(&(endpoint as u16).to_le_bytes());
        entry[2] = u8::from(health.active_unhealthy) * ACTIVE_UNHEALTHY;
        entry[3] = health.ejections;
        entry[4..6].copy_from_slice(&health.failures.to_le_bytes());
        entry[8..].copy_from_slice(&health.ejected_until_ms.to_le_bytes());
        match found {
            Ok(i) => {
                let at = self.conditions_offset() + i * CONDITION_LEN;
                self.bytes[at..at + CONDITION_LEN].copy_from_slice(&entry);
            }
            Err(i) => {
                let at = self.conditions_offset() + i * CONDITION_LEN;
                self.bytes.splice(at..at, entry);
                self.conditions += 1;
                self.write_condition_count();
            }
        }
    }

    /// Endpoints with a condition (not the default health): failing, ejected or unhealthy.
    pub fn condition_count(&self) -> usize {
        self.conditions
    }

    /// The index of `endpoint`'s condition among the sorted conditions, or where it would go.
    fn find_condition(&self, endpoint: usize) -> Result<usize, usize> {
        let base = self.conditions_offset();
        let (mut low, mut high) = (0, self.conditions);
        while low < high {
            let mid = (low + high) / 2;
            let at = base + mid * CONDITION_LEN;
            let e = usize::from(u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]]));
            match e.cmp(&endpoint) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(low)
    }

    fn write_condition_count(&mut self) {
        let count = self.conditions as u32;
        self.write_u32(36, count);
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

    /// Requests `slot` has in flight on `endpoint`.
    pub fn row_count(&self, slot: usize, endpoint: usize) -> u32 {
        match self.find(slot, endpoint) {
            Ok(i) => self.holding(i).2,
            Err(_) => 0,
        }
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
        let at = HEADER_LEN + slot * SLOT_LEN;
        self.bytes.splice(at..at, [0u8; SLOT_LEN]);
        self.slots += 1;
        self.bytes[6..8].copy_from_slice(&(self.slots as u16).to_le_bytes());
        slot
    }

    /// Drops free slots at the end of the slot list (left by VMs that stopped, e.g. after a
    /// listener update), so the slot list shrinks back instead of only ever growing.
    fn compact_slots(&mut self) {
        let mut keep = self.slots;
        while keep > 0 && self.slot_owner(keep - 1) == 0 && !self.slot_has_holdings(keep - 1) {
            keep -= 1;
        }
        if keep < self.slots {
            self.bytes
                .drain(HEADER_LEN + keep * SLOT_LEN..HEADER_LEN + self.slots * SLOT_LEN);
            self.slots = keep;
            self.bytes[6..8].copy_from_slice(&(self.slots as u16).to_le_bytes());
        }
    }

    fn slot_has_holdings(&self, slot: usize) -> bool {
        let (start, end) = self.slot_range(slot);
        start < end
    }

    pub fn heartbeat(&mut self, slot: usize, now_ms: u64) {
        self.write_u64(HEADER_LEN + slot * SLOT_LEN + 8, now_ms);
    }

    /// Counts one more request on `endpoint` for `slot`. Saturates rather than wraps: four
    /// billion in-flight requests means a bug, and wrapping would make the endpoint look idle.
    pub fn increment(&mut self, slot: usize, endpoint: usize) {
        match self.find(slot, endpoint) {
            Ok(i) => {
                let count = self.holding(i).2.saturating_add(1);
                self.set_holding_count(i, count);
            }
            Err(i) => self.insert_holding(i, slot, endpoint, 1),
        }
        let total = self.totals_offset() + endpoint * COUNT_LEN;
        let total_value = self.read_u32(total).saturating_add(1);
        self.write_u32(total, total_value);
    }

    pub fn decrement(&mut self, slot: usize, endpoint: usize) -> Decrement {
        let Ok(i) = self.find(slot, endpoint) else {
            // This slot holds nothing here: the total belongs to other slots, leave it alone.
            return Decrement::ClampedAtZero;
        };
        let held = self.holding(i).2;
        if held <= 1 {
            self.remove_holdings(i, i + 1);
        } else {
            self.set_holding_count(i, held - 1);
        }
        let total = self.totals_offset() + endpoint * COUNT_LEN;
        let total_value = self.read_u32(total);
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
            let (start, end) = self.slot_range(slot);
            for i in start..end {
                let (_, endpoint, held) = self.holding(i);
                let total = self.totals_offset() + endpoint * COUNT_LEN;
                let total_value = self.read_u32(total);
                if total_value < held {
                    reaped.corrections += u64::from(held - total_value);
                }
                self.write_u32(total, total_value.saturating_sub(held));
                reaped.requests += u64::from(held);
            }
            self.remove_holdings(start, end);
            self.write_u64(HEADER_LEN + slot * SLOT_LEN, 0);
            self.write_u64(HEADER_LEN + slot * SLOT_LEN + 8, 0);
        }
        if reaped.slots > 0 {
            self.compact_slots();
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
        next.bytes[16..32].copy_from_slice(&self.bytes[16..32]);
        next.bytes[HEADER_LEN..HEADER_LEN + self.slots * SLOT_LEN]
            .copy_from_slice(&self.bytes[HEADER_LEN..HEADER_LEN + self.slots * SLOT_LEN]);
        let new_of = |old: usize| {
            old_to_new
                .get(old)
                .copied()
                .flatten()
                .filter(|&new| new < endpoints)
        };
        for old in 0..self.endpoints {
            let Some(new) = new_of(old) else { continue };
            let total = next.totals_offset() + new * COUNT_LEN;
            next.write_u32(total, self.total(old));
            next.set_health(new, &self.health(old));
        }
        let mut holdings: Vec<(usize, usize, u32)> = (0..self.holdings)
            .filter_map(|i| {
                let (slot, old, count) = self.holding(i);
                new_of(old).map(|new| (slot, new, count))
            })
            .collect();
        holdings.sort_unstable();
        for (slot, endpoint, count) in holdings {
            let at = next.holdings;
            next.insert_holding(at, slot, endpoint, count);
        }
        next
    }

    fn totals_offset(&self) -> usize {
        HEADER_LEN + self.slots * SLOT_LEN
    }

    fn wanted_offset(&self) -> usize {
        self.totals_offset() + self.endpoints * COUNT_LEN
    }

    fn conditions_offset(&self) -> usize {
        self.wanted_offset() + self.endpoints * WANTED_LEN
    }

    fn holdings_offset(&self) -> usize {
        self.conditions_offset() + self.conditions * CONDITION_LEN
    }

    fn holding(&self, i: usize) -> (usize, usize, u32) {
        let at = self.holdings_offset() + i * HOLDING_LEN;
        let slot = usize::from(u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]]));
        let endpoint = usize::from(u16::from_le_bytes([self.bytes[at + 2], self.bytes[at + 3]]));
        (slot, endpoint, self.read_u32(at + 4))
    }

    fn set_holding_count(&mut self, i: usize, count: u32) {
        let at = self.holdings_offset() + i * HOLDING_LEN + 4;
        self.write_u32(at, count);
    }

    /// The index of (slot, endpoint) among the sorted holdings, or where it would go.
    fn find(&self, slot: usize, endpoint: usize) -> Result<usize, usize> {
        let (mut low, mut high) = (0, self.holdings);
        while low < high {
            let mid = (low + high) / 2;
            let (s, e, _) = self.holding(mid);
            match (s, e).cmp(&(slot, endpoint)) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(low)
    }

    /// The holdings of `slot`: contiguous, since they sort by slot first.
    fn slot_range(&self, slot: usize) -> (usize, usize) {
        let start = self.find(slot, 0).unwrap_or_else(|i| i);
        let end = self.find(slot + 1, 0).unwrap_or_else(|i| i);
        (start, end)
    }

    fn insert_holding(&mut self, i: usize, slot: usize, endpoint: usize, count: u32) {
        let at = self.holdings_offset() + i * HOLDING_LEN;
        let mut entry = [0u8; HOLDING_LEN];
        entry[..2].copy_from_slice(&(slot as u16).to_le_bytes());
        entry[2..4].copy_from_slice(&(endpoint as u16).to_le_bytes());
        entry[4..].copy_from_slice(&count.to_le_bytes());
        self.bytes.splice(at..at, entry);
        self.holdings += 1;
        self.write_holding_count();
    }

    fn remove_holdings(&mut self, start: usize, end: usize) {
        if start >= end {
            return;
        }
        let base = self.holdings_offset();
        self.bytes
            .drain(base + start * HOLDING_LEN..base + end * HOLDING_LEN);
        self.holdings -= end - start;
        self.write_holding_count();
    }

    fn write_holding_count(&mut self) {
        let count = self.holdings as u32;
        self.write_u32(32, count);
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
        let mut too_many_conditions = Table::new(1, 2).as_bytes().to_vec();
        too_many_conditions[36] = 3;
        too_many_conditions.extend_from_slice(&[0; 3 * CONDITION_LEN]);
        assert!(Table::parse(too_many_conditions).is_err());
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
        table.increment(s, 0);
        table.set_holding_count(0, u32::MAX);
        let total = table.totals_offset();
        table.write_u32(total, u32::MAX);
        table.increment(s, 0);
        assert_eq!(table.total(0), u32::MAX);
        assert_eq!(table.row_count(s, 0), u32::MAX);
    }

    #[test]
    fn the_value_grows_with_requests_in_flight_not_with_endpoints_times_workers() {
        let mut table = Table::new(1, 1_024);
        let slots: Vec<usize> = (1..=32).map(|o| table.claim_slot(o, 0).unwrap()).collect();
        let idle = table.as_bytes().len();
        // 8 bytes per endpoint (total, wanted-at) and 16 per slot: 8.7 KB, against 21.5 KB with
        // a health record per endpoint.
        assert_eq!(idle, HEADER_LEN + 32 * SLOT_LEN + 1_024 * 8);
        for (i, &slot) in slots.iter().enumerate() {
            for k in 0..10 {
                table.increment(slot, (i * 31 + k * 97) % 1_024);
            }
        }
        assert_eq!(table.in_flight(), 320);
        assert!(table.as_bytes().len() <= idle + 320 * HOLDING_LEN);
        // Every decrement undoes exactly its increment; the holdings vanish with the requests.
        for (i, &slot) in slots.iter().enumerate() {
            for k in 0..10 {
                assert_eq!(
                    table.decrement(slot, (i * 31 + k * 97) % 1_024),
                    Decrement::Applied
                );
            }
        }
        assert_eq!(table.holding_count(), 0);
        assert_eq!(table.as_bytes().len(), idle);
        assert_eq!(reparse(&table), table);
    }

    #[test]
    fn reaped_trailing_slots_are_compacted_away() {
        let mut table = Table::new(1, 2);
        let keep = table.claim_slot(1, 0).unwrap();
        let gone = table.claim_slot(2, 0).unwrap();
        table.increment(gone, 1);
        table.heartbeat(keep, 20_000);
        let reaped = table.reap_expired(20_000, 10_000);
        assert_eq!((reaped.slots, reaped.requests), (1, 1));
        assert_eq!(table.slot_count(), 1);
        assert_eq!(table.slot_owner(keep), 1);
        assert_eq!(table.totals(), vec![0, 0]);
        assert_eq!(reparse(&table), table);
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

    #[test]
    fn only_endpoints_with_a_condition_take_health_bytes() {
        let mut table = Table::new(1, 1_024);
        let s = table.claim_slot(7, 0).unwrap();
        let healthy_size = table.as_bytes().len();
        // Marking endpoints wanted (every housekeeping does) adds no condition.
        for e in 0..1_024 {
            let wanted = Health {
                wanted_at_s: 1_700_000_000,
                ..Health::default()
            };
            table.set_health(e, &wanted);
        }
        assert_eq!(table.condition_count(), 0);
        assert_eq!(table.as_bytes().len(), healthy_size);
        table.increment(s, 600);
        table.increment(s, 3);
        // Conditions set out of order stay sorted and findable, beside the holdings.
        let failing = |failures| Health {
            failures,
            wanted_at_s: 1_700_000_000,
            ..Health::default()
        };
        let ejected = Health {
            ejections: 2,
            ejected_until_ms: 5_000,
            ..failing(0)
        };
        for (e, health) in [
            (900, failing(1)),
            (5, ejected),
            (600, failing(2)),
            (0, failing(3)),
        ] {
            table.set_health(e, &health);
        }
        let table_copy = reparse(&table);
        assert_eq!(table_copy.condition_count(), 4);
        assert_eq!(table_copy.health(5), ejected);
        assert_eq!(table_copy.health(600), failing(2));
        assert_eq!(table_copy.health(601), failing(0));
        assert!(!table_copy.eligible(5, 4_999));
        assert!(table_copy.eligible(5, 5_000));
        assert!(table_copy.eligible(600, 0));
        assert_eq!(table_copy.total(600), 1);
        assert_eq!(table_copy.row_count(s, 3), 1);
        // Back to the default: the condition goes, and the value shrinks back.
        for e in [900, 5, 600, 0] {
            table.set_health(e, &failing(0));
        }
        assert_eq!(table.condition_count(), 0);
        assert_eq!(table.decrement(s, 600), Decrement::Applied);
        assert_eq!(table.decrement(s, 3), Decrement::Applied);
        assert_eq!(table.as_bytes().len(), healthy_size);
        assert_eq!(reparse(&table), table);
    }
}
