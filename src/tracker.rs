//! Outstanding-request accounting for one pool, as seen from one worker VM. Every change is a
//! read of the pool's table followed by a compare-and-swap write, retried on conflict, so
//! concurrent workers never lose an update. Pure: the store and the randomness are injected.

use std::collections::HashSet;
use std::fmt;
use std::rc::Rc;

use crate::admin::HostStatus;
use crate::config::MAX_ENDPOINTS;
use crate::health::{Change, Outcome, PassivePolicy};
use crate::membership::{MalformedMembership, Membership};
use crate::rng::{RandomSource, SplitMix64};
use crate::select::{prefix_aware, select, Choice, PrefixChoice, Selection, Strategy};
use crate::server_load::{Estimates, LoadView};
use crate::store::{SharedStore, StoreError};
use crate::table::{Decrement, Reaped, Table, TableError};

/// Conflicts are only possible with other workers updating the same pool at the same instant, so
/// a handful of retries covers heavy contention; past that, routing fails open rather than
/// spinning on the request path.
pub const ROUTE_ATTEMPTS: u32 = 16;
/// A release that cannot be written is kept and retried on the next housekeeping tick, so it is
/// never lost; this only bounds the work done inside one callback.
pub const RELEASE_ATTEMPTS: u32 = 32;
const HOUSEKEEPING_ATTEMPTS: u32 = 8;
/// Installing runs at configure time, possibly while other workers serve heavy traffic on the
/// same pool; it may retry longer than a request would.
const INSTALL_ATTEMPTS: u32 = 64;
/// Folded releases are written on their own once this many wait, whatever the tick.
const MAX_FOLDED_RELEASES: usize = 256;
/// Releases still waiting for a successful write. Past this something is deeply wrong with the
/// host; dropping the oldest keeps memory bounded and is counted.
const MAX_PENDING_RELEASES: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerError {
    Store(StoreError),
    /// Conditional writes kept losing to other workers.
    Contention,
    Table(TableError),
    Membership(MalformedMembership),
    /// No endpoint may take the request (all filtered out by health, for instance).
    NoEligibleEndpoint,
}

impl fmt::Display for TrackerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(e) => e.fmt(f),
            Self::Contention => write!(
                f,
                "shared table still contended after {ROUTE_ATTEMPTS} attempts"
            ),
            Self::Table(e) => e.fmt(f),
            Self::Membership(e) => e.fmt(f),
            Self::NoEligibleEndpoint => f.write_str("no eligible endpoint"),
        }
    }
}

impl TrackerError {
    /// Stable label for the fail-open stat.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Store(_) => "host_error",
            Self::Contention => "contention",
            Self::Table(TableError::SlotsExhausted) => "slots_exhausted",
            Self::Table(_) | Self::Membership(_) => "bad_shared_state",
            Self::NoEligibleEndpoint => "no_eligible_endpoint",
        }
    }
}

impl From<StoreError> for TrackerError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<TableError> for TrackerError {
    fn from(e: TableError) -> Self {
        Self::Table(e)
    }
}

impl From<MalformedMembership> for TrackerError {
    fn from(e: MalformedMembership) -> Self {
        Self::Membership(e)
    }
}

/// What a routed request holds until its stream ends: enough to decrement exactly the count it
/// incremented, under the same slot owner, even if the pool's membership changed meanwhile.
#[derive(Debug, Clone)]
pub struct Ticket {
    slot: u16,
    owner: u64,
    endpoint: u16,
    membership: Rc<Membership>,
}

impl Ticket {
    pub fn endpoint_address(&self) -> &str {
        &self.membership.endpoints()[usize::from(self.endpoint)]
    }

    /// The addresses the request's selection indexes into.
    pub fn endpoints(&self) -> &[String] {
        self.membership.endpoints()
    }
}

#[derive(Debug)]
pub struct Routed {
    pub ticket: Ticket,
    pub selection: Selection,
    /// The membership the selection's indices refer to.
    pub membership: Rc<Membership>,
    /// Total in flight on the chosen endpoint, this request included.
    pub chosen_load: u32,
    /// For a prefix-routed request: whether it went to its key's endpoint.
    pub prefix: Option<PrefixChoice>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Applied,
    /// The count was already zero and stayed there; reported as a correction.
    ClampedAtZero,
    /// The slot was reaped (its counts already taken back) or the table was re-created.
    SlotReclaimed,
    /// The endpoint left the pool; its counts went with it.
    EndpointRemoved,
    /// Could not write now; queued and retried on the next housekeeping tick.
    Deferred,
    /// Waiting to ride on this VM's next routing write, or its next tick.
    Folded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    Created,
    Adopted,
    Replaced,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Housekeeping {
    pub leader: bool,
    pub reaped: Reaped,
    /// Per-endpoint totals, published by the leader only so gauges have one writer.
    pub loads: Option<Vec<u32>>,
    /// Per-endpoint routability (healthy and not ejected), also for the leader's gauges.
    pub eligible: Option<Vec<bool>>,
    /// Bytes the pool holds in shared data (table, membership log, load record); leader only.
    pub shared_bytes: Option<usize>,
}

/// Things that happened since the last [`PoolTracker::take_events`], for stats.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Events {
    pub cas_conflicts: u64,
    pub corrections: u64,
    pub reclaimed_requests: u64,
    pub reaped_slots: u64,
    pub lost_slots: u64,
    pub deferred_releases: u64,
    pub dropped_releases: u64,
    pub stale_releases: u64,
    pub membership_changes: u64,
    /// Endpoints dropped because no live configuration lists them any more.
    pub pruned_endpoints: u64,
    /// Endpoints this VM ejected (passive health), for the log and the stats.
    pub ejections: Vec<Ejection>,
    /// Ejections not made because `max_ejection_percent` of the pool was already ejected.
    pub capped_ejections: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    pub address: String,
    pub for_ms: u64,
    pub failures: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointEstimate {
    pub estimate: u32,
    pub full: bool,
    pub weight: u32,
    /// The batch size learned from the server's reports; 0 = not known yet.
    pub batch_size: u32,
}

/// What applying Envoy's view of the cluster changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterUpdate {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Endpoints whose Envoy-reported health flipped: (address, now healthy).
    pub health: Vec<(String, bool)>,
    /// Configured endpoints that the watched cluster does not have (never routed to).
    pub missing: Vec<String>,
    /// Endpoints Envoy has not health checked yet (unhealthy until it has).
    pub awaiting_first_check: Vec<String>,
}

impl ClusterUpdate {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.health.is_empty()
    }
}

/// Where the pool's endpoint list comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipSource {
    /// The plugin configuration's `endpoints`: installing a config sets the membership.
    Configured,
    /// Envoy's cluster, via the admin API: a config only seeds an empty pool.
    Followed,
}

#[derive(Debug, Clone, Copy)]
struct Claim {
    slot: usize,
    owner: u64,
}

pub struct PoolTracker {
    key_prefix: String,
    table_key: String,
    configured: Vec<String>,
    configured_set: HashSet<String>,
    /// Which of the current membership's endpoints this configuration may route to: a pool
    /// shared by several live configurations holds the union of their endpoint lists.
    wanted: Vec<bool>,
    source: MembershipSource,
    passive: Option<PassivePolicy>,
    membership: Rc<Membership>,
    claim: Option<Claim>,
    leader_id: u64,
    now_ms: u64,
    pending: Vec<(Ticket, Outcome)>,
    ids: SplitMix64,
    events: Events,
    /// The servers' load reports and Envoy's weights, as last published by the leader.
    view: LoadView,
    /// How long a server's report counts (0 without server load: no report is ever fresh).
    stale_after_ms: u64,
    /// Releases waiting for this VM's next routing write (see `set_fold_releases`).
    folded: Vec<(Ticket, Outcome)>,
    fold_releases: bool,
    /// Per endpoint, whether Envoy last reported it as a healthy host of the watched cluster:
    /// server-load polls through the pool cluster would reach some other host otherwise.
    reachable: Vec<bool>,
}

impl PoolTracker {
    /// `cluster` names the shared keys: every filter naming the same cluster shares its counts.
    /// `seed` must differ between VMs (owner tokens are drawn from it).
    pub fn new(cluster: &str, endpoints: Vec<String>, seed: u64, now_ms: u64) -> Self {
        Self::with_health(
            cluster,
            endpoints,
            MembershipSource::Configured,
            None,
            seed,
            now_ms,
        )
    }

    pub fn with_health(
        cluster: &str,
        endpoints: Vec<String>,
        source: MembershipSource,
        passive: Option<PassivePolicy>,
        seed: u64,
        now_ms: u64,
    ) -> Self {
        // v3: the table layout changed (sparse health); a filter of an older version
        // running in the same VM during an upgrade keeps its own keys.
        let key_prefix = format!("model_lb.v3.{cluster}.");
        let mut ids = SplitMix64::new(seed);
        let leader_id = nonzero(&mut ids);
        Self {
            table_key: format!("{key_prefix}table"),
            key_prefix,
            membership: Rc::new(Membership::new(0, Vec::new())),
            configured_set: endpoints.iter().cloned().collect(),
            configured: endpoints,
            wanted: Vec::new(),
            source,
            passive,
            claim: None,
            leader_id,
            now_ms,
            pending: Vec::new(),
            ids,
            events: Events::default(),
            view: LoadView::default(),
            stale_after_ms: 0,
            reachable: Vec::new(),
            folded: Vec::new(),
            fold_releases: false,
        }
    }

    /// Endpoints worth polling for their load, as of the last housekeeping.
    pub fn pollable(&self) -> Vec<bool> {
        self.reachable.clone()
    }

    /// The shared-data key of the published load record (see `server_load`).
    pub fn load_record_key(&self) -> String {
        format!("{}load", self.key_prefix)
    }

    pub fn set_stale_after_ms(&mut self, stale_after_ms: u64) {
        self.stale_after_ms = stale_after_ms;
    }

    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Reads the published load record into this VM's view (cheap when it did not change).
    pub fn refresh_view<S: SharedStore + ?Sized>(&mut self, store: &S) -> Result<(), TrackerError> {
        let record = store.get(&self.load_record_key())?;
        self.view.refresh(record, &self.membership);
        Ok(())
    }

    pub fn view_mut(&mut self) -> &mut LoadView {
        self.view.align(&self.membership);
        &mut self.view
    }

    /// This Envoy's in-flight count on `address`, read fresh from the shared table.
    pub fn local_count<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        address: &str,
    ) -> Result<Option<u32>, TrackerError> {
        let (table, _) = self.read(store)?;
        Ok(self.membership.position(address).map(|e| table.total(e)))
    }

    /// Per endpoint: the estimate selection uses and whether it counts as full, for gauges.
    /// Per endpoint: the estimate selection uses, whether its batch counts as full, and the
    /// weight it is divided by; for gauges.
    pub fn estimates(&mut self, totals: &[u32]) -> Vec<EndpointEstimate> {
        self.view.align(&self.membership);
        let estimates = Estimates {
            local: totals,
            view: self.view.entries(),
            now_ms: self.now_ms,
            stale_after_ms: self.stale_after_ms,
        };
        (0..totals.len())
            .map(|e| EndpointEstimate {
                estimate: estimates.estimate(e),
                full: estimates.full(e),
                weight: self.view.entries().get(e).map_or(1, |l| l.weight),
                batch_size: self.view.entries().get(e).map_or(0, |l| l.capacity),
            })
            .collect()
    }

    pub fn table_key(&self) -> &str {
        &self.table_key
    }

    pub fn membership(&self) -> &Rc<Membership> {
        &self.membership
    }

    pub fn pending_releases(&self) -> usize {
        self.pending.len()
    }

    pub fn take_events(&mut self) -> Events {
        std::mem::take(&mut self.events)
    }

    /// Makes the shared table hold this configuration's endpoints: creates it, adopts it, or
    /// adds the endpoints it lacks (counts of the others are untouched, so a new configuration
    /// sees the requests the old one still has in flight). Endpoints of other configurations
    /// stay until nobody has wanted them for a lease. Run from `on_configure`, before traffic,
    /// and again from housekeeping if this configuration's endpoints were pruned meanwhile.
    pub fn install<S: SharedStore + ?Sized>(&mut self, store: &S) -> Result<Install, TrackerError> {
        for attempt in 0..INSTALL_ATTEMPTS {
            let Some((bytes, cas)) = store.get(&self.table_key)? else {
                self.create(store)?;
                return Ok(Install::Created);
            };
            let Ok(table) = Table::parse(bytes) else {
                // Only a bug could leave a malformed value under our versioned key; start over
                // rather than refuse to route forever. Requests counted in it cannot be
                // decremented twice: their slot owners are gone with it.
                self.create(store)?;
                return Ok(Install::Created);
            };
            let current = match self.load_membership(store, table.membership_token()) {
                Ok(current) => current,
                Err(TrackerError::Membership(_)) => {
                    self.create(store)?;
                    return Ok(Install::Created);
                }
                Err(e) => return Err(e),
            };
            if table.endpoint_count() != current.len() {
                self.create(store)?;
                return Ok(Install::Created);
            }
            let missing: Vec<String> = match self.source {
                MembershipSource::Followed => Vec::new(),
                MembershipSource::Configured => self
                    .configured
                    .iter()
                    .filter(|e| current.position(e).is_none())
                    .cloned()
                    .collect(),
            };
            let (mut table, next, outcome) = if missing.is_empty() {
                if !self.stamps_stale(&table, &current) {
                    self.adopt(current);
                    return Ok(Install::Adopted);
                }
                (table, Rc::clone(&current), Install::Adopted)
            } else {
                let union: Vec<String> =
                    current.endpoints().iter().cloned().chain(missing).collect();
                let next = self.write_membership(store, union)?;
                let remapped =
                    table.remapped(next.token(), next.len(), &next.mapping_from(&current));
                (remapped, Rc::new(next), Install::Replaced)
            };
            self.mark_wanted(&mut table, &next);
            match store.set(&self.table_key, table.as_bytes(), cas) {
                Ok(()) => {
                    self.adopt(next);
                    return Ok(outcome);
                }
                Err(StoreError::CasMismatch) => self.lost_race(attempt),
                Err(e) => return Err(e.into()),
            }
        }
        Err(TrackerError::Contention)
    }

    /// Which of `membership`'s endpoints this configuration routes to.
    fn mask(&self, membership: &Membership) -> Vec<bool> {
        membership
            .endpoints()
            .iter()
            .map(|e| self.source == MembershipSource::Followed || self.configured_set.contains(e))
            .collect()
    }

    /// Whether any of this configuration's endpoints was last stamped wanted over a second ago.
    fn stamps_stale(&self, table: &Table, membership: &Membership) -> bool {
        let now_s = u32::try_from(self.now_ms / 1_000).unwrap_or(u32::MAX);
        self.mask(membership)
            .into_iter()
            .enumerate()
            .any(|(e, wanted)| wanted && table.health(e).wanted_at_s.saturating_add(1) < now_s)
    }

    /// Stamps this configuration's endpoints as wanted now, so the leader does not prune them.
    fn mark_wanted(&self, table: &mut Table, membership: &Membership) {
        let now_s = u32::try_from(self.now_ms / 1_000).unwrap_or(u32::MAX);
        for (e, wanted) in self.mask(membership).into_iter().enumerate() {
            if wanted {
                let mut health = table.health(e);
                health.wanted_at_s = now_s;
                table.set_health(e, &health);
            }
        }
    }

    fn create<S: SharedStore + ?Sized>(&mut self, store: &S) -> Result<(), TrackerError> {
        let membership = self.write_membership(store, self.configured.clone())?;
        let mut table = Table::new(membership.token(), membership.len());
        self.mark_wanted(&mut table, &membership);
        // Creation cannot be conditional in Envoy; two workers creating at once both write an
        // empty table before any traffic, and the loser's cached membership is simply replaced
        // on its first read.
        store.set(&self.table_key, table.as_bytes(), 0)?;
        self.adopt(Rc::new(membership));
        Ok(())
    }

    fn write_membership<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        endpoints: Vec<String>,
    ) -> Result<Membership, TrackerError> {
        let membership = Membership::new(nonzero(&mut self.ids), endpoints);
        let key = Membership::log_key(&self.key_prefix);
        for attempt in 0..INSTALL_ATTEMPTS {
            let current = store.get(&key)?;
            let log =
                membership.prepend_to_log(current.as_ref().map(|(bytes, _)| bytes.as_slice()));
            // A missing key is created whatever the CAS value; an existing one only if nobody
            // wrote it since we read it, so no writer drops another's membership.
            let cas = current.map_or(0, |(_, cas)| cas);
            match store.set(&key, &log, cas) {
                Ok(()) => return Ok(membership),
                Err(StoreError::CasMismatch) => self.lost_race(attempt),
                Err(e) => return Err(e.into()),
            }
        }
        Err(TrackerError::Contention)
    }

    fn load_membership<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        token: u64,
    ) -> Result<Rc<Membership>, TrackerError> {
        if token == self.membership.token() {
            return Ok(Rc::clone(&self.membership));
        }
        let key = Membership::log_key(&self.key_prefix);
        let Some((bytes, _)) = store.get(&key)? else {
            return Err(MalformedMembership.into());
        };
        Ok(Rc::new(Membership::from_log(&bytes, token)?))
    }

    fn adopt(&mut self, membership: Rc<Membership>) {
        // Token 0 is the placeholder before the first install: learning the pool is no change.
        if self.membership.token() != 0 && membership.token() != self.membership.token() {
            self.events.membership_changes += 1;
        }
        self.wanted = self.mask(&membership);
        self.membership = membership;
    }

    /// Reads the table and follows its membership. A table that vanished or is damaged (only a
    /// bug or a foreign writer can do that) is re-created rather than failing every request.
    fn read<S: SharedStore + ?Sized>(&mut self, store: &S) -> Result<(Table, u32), TrackerError> {
        match self.read_consistent(store) {
            Err(TrackerError::Table(_) | TrackerError::Membership(_)) => {
                self.create(store)?;
                self.read_consistent(store)
            }
            other => other,
        }
    }

    fn read_consistent<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
    ) -> Result<(Table, u32), TrackerError> {
        let (bytes, cas) = store
            .get(&self.table_key)?
            .ok_or(TableError::Malformed("table missing"))?;
        let table = Table::parse(bytes)?;
        if table.membership_token() != self.membership.token() {
            let membership = self.load_membership(store, table.membership_token())?;
            self.adopt(membership);
        }
        // Selection indexes the membership with table columns: they must agree, whoever wrote.
        if table.endpoint_count() != self.membership.len() {
            return Err(TableError::Malformed("column count differs from its membership").into());
        }
        Ok((table, cas))
    }

    /// Picks endpoints for a request and counts it on the chosen one, atomically.
    /// Endpoints that are unhealthy or ejected are skipped; with none left, the request is not
    /// counted and the caller fails open.
    pub fn route<S, R>(
        &mut self,
        store: &S,
        strategy: Strategy,
        fallbacks: usize,
        rng: &mut R,
    ) -> Result<Routed, TrackerError>
    where
        S: SharedStore + ?Sized,
        R: RandomSource,
    {
        let choice = match strategy {
            Strategy::Random => Choice::Random,
            Strategy::LeastOutstandingRequests | Strategy::PrefixAware => {
                Choice::LeastOutstandingRequests
            }
        };
        self.route_with(store, choice, fallbacks, rng)
    }

    /// [`Self::route`] with the choice spelled out (a prefix key, when the body gave one).
    pub fn route_with<S, R>(
        &mut self,
        store: &S,
        choice: Choice,
        fallbacks: usize,
        rng: &mut R,
    ) -> Result<Routed, TrackerError>
    where
        S: SharedStore + ?Sized,
        R: RandomSource,
    {
        for attempt in 0..ROUTE_ATTEMPTS {
            let (mut table, cas) = self.read(store)?;
            let folded = self.apply_folded(store, &mut table)?;
            let claim = match self.claim {
                Some(claim) if table.slot_owner(claim.slot) == claim.owner => claim,
                _ => {
                    let owner = nonzero(&mut self.ids);
                    let slot = table.claim_slot(owner, self.now_ms)?;
                    Claim { slot, owner }
                }
            };
            let now_ms = self.now_ms;
            let wanted = &self.wanted;
            self.view.align(&self.membership);
            let estimates = Estimates {
                local: &table,
                view: self.view.entries(),
                now_ms,
                stale_after_ms: self.stale_after_ms,
            };
            let eligible = |e: usize| wanted[e] && table.eligible(e, now_ms);
            let (selection, prefix) = match choice {
                Choice::LeastOutstandingRequests => (
                    select(
                        Strategy::LeastOutstandingRequests,
                        &estimates,
                        eligible,
                        fallbacks,
                        rng,
                    ),
                    None,
                ),
                Choice::Random => (
                    select(Strategy::Random, &estimates, eligible, fallbacks, rng),
                    None,
                ),
                Choice::Prefix { key, threshold } => prefix_aware(
                    &estimates,
                    eligible,
                    key,
                    self.membership.hashes(),
                    threshold,
                    fallbacks,
                    rng,
                ),
            };
            let Some(chosen) = selection.chosen() else {
                return Err(TrackerError::NoEligibleEndpoint);
            };
            table.increment(claim.slot, chosen);
            match store.set(&self.table_key, table.as_bytes(), cas) {
                Ok(()) => {
                    self.commit_folded(folded);
                    self.claim = Some(claim);
                    let membership = Rc::clone(&self.membership);
                    return Ok(Routed {
                        ticket: Ticket {
                            slot: claim.slot as u16,
                            owner: claim.owner,
                            endpoint: chosen as u16,
                            membership: Rc::clone(&membership),
                        },
                        selection,
                        membership,
                        chosen_load: table.total(chosen),
                        prefix,
                    });
                }
                Err(StoreError::CasMismatch) => self.lost_race(attempt),
                Err(e) => return Err(e.into()),
            }
        }
        Err(TrackerError::Contention)
    }

    /// Workers that retry in lockstep can starve one another forever (each one's read lands
    /// just before the other's write). A short random spin, growing with each loss, breaks the
    /// symmetry; it costs nothing when there is no conflict.
    fn lost_race(&mut self, attempt: u32) {
        self.events.cas_conflicts += 1;
        let spins = self.ids.below(16usize << attempt.min(10));
        for i in 0..spins {
            std::hint::black_box(i);
            std::hint::spin_loop();
        }
    }

    /// Ends a request's count and folds its outcome into the endpoint's passive health. Never
    /// loses the decrement: what cannot be written now is retried on the next tick.
    pub fn release<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        ticket: Ticket,
        outcome: Outcome,
    ) -> Release {
        if self.fold_releases {
            self.folded.push((ticket, outcome));
            if self.folded.len() >= MAX_FOLDED_RELEASES {
                self.flush_folded(store);
            }
            return Release::Folded;
        }
        match self.try_release(store, &ticket, outcome) {
            Ok(result) => {
                self.count_release(result);
                result
            }
            Err(_) => {
                self.events.deferred_releases += 1;
                self.defer(ticket, outcome);
                Release::Deferred
            }
        }
    }

    fn count_release(&mut self, outcome: Release) {
        match outcome {
            Release::ClampedAtZero => self.events.corrections += 1,
            Release::SlotReclaimed => self.events.stale_releases += 1,
            Release::EndpointRemoved => self.events.dropped_releases += 1,
            Release::Applied | Release::Deferred | Release::Folded => {}
        }
    }

    fn defer(&mut self, ticket: Ticket, outcome: Outcome) {
        if self.pending.len() >= MAX_PENDING_RELEASES {
            self.pending.remove(0);
            self.events.dropped_releases += 1;
        }
        self.pending.push((ticket, outcome));
    }

    fn try_release<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        ticket: &Ticket,
        outcome: Outcome,
    ) -> Result<Release, TrackerError> {
        for attempt in 0..RELEASE_ATTEMPTS {
            let Some((bytes, cas)) = store.get(&self.table_key)? else {
                return Ok(Release::SlotReclaimed);
            };
            let Ok(mut table) = Table::parse(bytes) else {
                return Ok(Release::SlotReclaimed);
            };
            let (result, change, changed) =
                self.apply_release(store, &mut table, ticket, outcome)?;
            if !changed {
                return Ok(result);
            }
            match store.set(&self.table_key, table.as_bytes(), cas) {
                Ok(()) => {
                    self.count_change(ticket, change);
                    return Ok(result);
                }
                Err(StoreError::CasMismatch) => self.lost_race(attempt),
                Err(e) => return Err(e.into()),
            }
        }
        Err(TrackerError::Contention)
    }

    /// Applies one release to a table copy: the decrement (under the slot owner it was counted
    /// under) and the outcome's passive-health news. Returns whether the table changed.
    fn apply_release<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        table: &mut Table,
        ticket: &Ticket,
        outcome: Outcome,
    ) -> Result<(Release, Change, bool), TrackerError> {
        let Some(endpoint) = self.locate(store, table, ticket)? else {
            return Ok((Release::EndpointRemoved, Change::None, false));
        };
        // The decrement needs the slot the request was counted under; the health verdict is
        // news about the endpoint whoever counted it.
        let result = if table.slot_owner(usize::from(ticket.slot)) == ticket.owner {
            match table.decrement(usize::from(ticket.slot), endpoint) {
                Decrement::Applied => Release::Applied,
                Decrement::ClampedAtZero => Release::ClampedAtZero,
            }
        } else {
            Release::SlotReclaimed
        };
        let mut change = Change::None;
        let before = table.health(endpoint);
        let mut health = before;
        if let Some(policy) = &self.passive {
            let now_ms = self.now_ms;
            let ejected = (0..table.endpoint_count())
                .filter(|&e| table.health(e).ejected_until_ms > now_ms)
                .count();
            let may_eject = ejected < policy.max_ejected(table.endpoint_count());
            change = health.record(outcome, policy, now_ms, may_eject);
            table.set_health(endpoint, &health);
        }
        let changed = result != Release::SlotReclaimed || health != before;
        Ok((result, change, changed))
    }

    fn count_change(&mut self, ticket: &Ticket, change: Change) {
        match change {
            Change::Ejected { for_ms, failures } => self.events.ejections.push(Ejection {
                address: ticket.endpoint_address().to_owned(),
                for_ms,
                failures,
            }),
            Change::Capped => self.events.capped_ejections += 1,
            Change::None => {}
        }
    }

    /// With folding on, releases wait (at most a tick) to ride on this VM's next routing
    /// compare-and-swap, so under load a release costs no host call of its own.
    pub fn set_fold_releases(&mut self, fold: bool) {
        self.fold_releases = fold;
    }

    pub fn folded_releases(&self) -> usize {
        self.folded.len()
    }

    /// Applies every folded release to `table`; the caller writes it. Returns what each did,
    /// to be counted once the write succeeds.
    fn apply_folded<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        table: &mut Table,
    ) -> Result<Vec<(Release, Change)>, TrackerError> {
        let folded = std::mem::take(&mut self.folded);
        let mut results = Vec::with_capacity(folded.len());
        let mut failed = None;
        for (ticket, outcome) in &folded {
            match self.apply_release(store, table, ticket, *outcome) {
                Ok((release, change, _)) => results.push((release, change)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.folded = folded;
        match failed {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }

    /// Counts what the folded releases did, once the write that carried them succeeded.
    fn commit_folded(&mut self, results: Vec<(Release, Change)>) {
        let folded = std::mem::take(&mut self.folded);
        for ((ticket, _), (release, change)) in folded.iter().zip(results) {
            self.count_release(release);
            self.count_change(ticket, change);
        }
    }

    /// Writes the folded releases on their own (an idle VM's tick): never later than this.
    pub fn flush_folded<S: SharedStore + ?Sized>(&mut self, store: &S) {
        if self.folded.is_empty() {
            return;
        }
        for attempt in 0..RELEASE_ATTEMPTS {
            let Ok((mut table, cas)) = self.read(store) else {
                break;
            };
            let Ok(results) = self.apply_folded(store, &mut table) else {
                break;
            };
            match store.set(&self.table_key, table.as_bytes(), cas) {
                Ok(()) => {
                    self.commit_folded(results);
                    return;
                }
                Err(StoreError::CasMismatch) => self.lost_race(attempt),
                Err(_) => break,
            }
        }
        // Could not write now: the ordinary retry path keeps them, never drops them.
        for (ticket, outcome) in std::mem::take(&mut self.folded) {
            self.events.deferred_releases += 1;
            self.defer(ticket, outcome);
        }
    }

    /// The table column of the ticket's endpoint, following membership changes by address.
    fn locate<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        table: &Table,
        ticket: &Ticket,
    ) -> Result<Option<usize>, TrackerError> {
        let current = if table.membership_token() == ticket.membership.token() {
            Rc::clone(&ticket.membership)
        } else {
            let current = self.load_membership(store, table.membership_token())?;
            self.adopt(Rc::clone(&current));
            current
        };
        if table.endpoint_count() != current.len() {
            return Err(TableError::Malformed("column count differs from its membership").into());
        }
        Ok(current.position(ticket.endpoint_address()))
    }

    /// Applies Envoy's view of the watched cluster (from the admin API): marks endpoints Envoy
    /// considers unhealthy, or that the cluster does not have, as not routable, and with
    /// [`MembershipSource::Followed`] makes the pool's membership the cluster's.
    pub fn apply_cluster<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        hosts: &[HostStatus],
    ) -> Result<ClusterUpdate, TrackerError> {
        let mut wanted: Vec<String> = Vec::with_capacity(hosts.len());
        for host in hosts.iter().filter(|h| !h.removed) {
            if !wanted.contains(&host.address) && wanted.len() < MAX_ENDPOINTS {
                wanted.push(host.address.clone());
            }
        }
        let mut next: Option<Membership> = None;
        for attempt in 0..ROUTE_ATTEMPTS {
            let (mut table, cas) = self.read(store)?;
            let current = Rc::clone(&self.membership);
            let mut update = ClusterUpdate::default();
            // A membership written for an earlier attempt is reused, not written again.
            let mut fresh: Option<Membership> = None;
            if self.source == MembershipSource::Followed && !current.has_same_endpoints(&wanted) {
                let membership = match next.take() {
                    Some(m) => m,
                    None => self.write_membership(store, wanted.clone())?,
                };
                update.added = wanted
                    .iter()
                    .filter(|e| current.position(e).is_none())
                    .cloned()
                    .collect();
                update.removed = current
                    .endpoints()
                    .iter()
                    .filter(|e| membership.position(e).is_none())
                    .cloned()
                    .collect();
                table = table.remapped(
                    membership.token(),
                    membership.len(),
                    &membership.mapping_from(&current),
                );
                fresh = Some(membership);
            }
            let endpoints: Vec<String> = match &fresh {
                Some(m) => m.endpoints().to_vec(),
                None => current.endpoints().to_vec(),
            };
            for (e, address) in endpoints.iter().enumerate() {
                let reported = hosts.iter().find(|h| &h.address == address && !h.removed);
                if reported.is_none() {
                    update.missing.push(address.clone());
                }
                let healthy = reported.is_some_and(|h| h.healthy);
                if reported.is_some_and(|h| h.awaiting_first_check) {
                    update.awaiting_first_check.push(address.clone());
                }
                let mut health = table.health(e);
                if health.active_unhealthy == healthy {
                    health.active_unhealthy = !healthy;
                    table.set_health(e, &health);
                    update.health.push((address.clone(), healthy));
                }
            }
            if update.is_empty() {
                return Ok(update);
            }
            if let Some(membership) = &fresh {
                self.mark_wanted(&mut table, membership);
            }
            match store.set(&self.table_key, table.as_bytes(), cas) {
                Ok(()) => {
                    if let Some(membership) = fresh {
                        self.configured = membership.endpoints().to_vec();
                        self.adopt(Rc::new(membership));
                    }
                    return Ok(update);
                }
                Err(StoreError::CasMismatch) => {
                    next = fresh;
                    self.lost_race(attempt);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(TrackerError::Contention)
    }

    /// Periodic upkeep from `on_tick`: retries deferred releases, renews this VM's slot lease,
    /// and, on the one VM holding the leader lease, reaps slots of VMs that stopped heartbeating
    /// and reports the totals for the gauges.
    pub fn housekeeping<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        now_ms: u64,
        lease_ttl_ms: u64,
    ) -> Result<Housekeeping, TrackerError> {
        self.now_ms = now_ms;
        self.flush_folded(store);
        for (ticket, outcome) in std::mem::take(&mut self.pending) {
            match self.try_release(store, &ticket, outcome) {
                Ok(result) => self.count_release(result),
                Err(_) => self.defer(ticket, outcome),
            }
        }
        if self.source == MembershipSource::Configured {
            self.read(store)?;
            if self
                .configured
                .iter()
                .any(|e| self.membership.position(e).is_none())
            {
                // Pruned while this configuration was idle, or needed again after a rollback to
                // a configuration Envoy kept cached: make its endpoints routable again.
                self.install(store)?;
            }
        }
        for attempt in 0..HOUSEKEEPING_ATTEMPTS {
            let (mut table, cas) = self.read(store)?;
            let membership = Rc::clone(&self.membership);
            self.reachable = (0..table.endpoint_count())
                .map(|e| !table.health(e).active_unhealthy)
                .collect();
            self.mark_wanted(&mut table, &membership);
            if let Some(claim) = self.claim {
                if table.slot_owner(claim.slot) == claim.owner {
                    table.heartbeat(claim.slot, now_ms);
                } else {
                    self.claim = None;
                    self.events.lost_slots += 1;
                }
            }
            let (leader, expiry) = table.leader();
            let lead = leader == self.leader_id || leader == 0 || expiry <= now_ms;
            let mut reaped = Reaped::default();
            let mut pruned: Option<Membership> = None;
            if lead {
                table.set_leader(self.leader_id, now_ms.saturating_add(lease_ttl_ms));
                reaped = table.reap_expired(now_ms, lease_ttl_ms);
                let stale = self.unwanted(&table, now_ms, lease_ttl_ms);
                if !stale.is_empty() {
                    let kept: Vec<String> = membership
                        .endpoints()
                        .iter()
                        .enumerate()
                        .filter(|(e, _)| !stale.contains(e))
                        .map(|(_, a)| a.clone())
                        .collect();
                    let next = self.write_membership(store, kept)?;
                    table =
                        table.remapped(next.token(), next.len(), &next.mapping_from(&membership));
                    pruned = Some(next);
                }
            }
            // Always written: the slot heartbeat and the wanted stamps are this tick's news.
            match store.set(&self.table_key, table.as_bytes(), cas) {
                Ok(()) => {
                    if let Some(next) = pruned {
                        self.events.pruned_endpoints += (membership.len() - next.len()) as u64;
                        self.adopt(Rc::new(next));
                    }
                }
                Err(StoreError::CasMismatch) => {
                    self.lost_race(attempt);
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            self.events.reaped_slots += u64::from(reaped.slots);
            self.events.reclaimed_requests += reaped.requests;
            self.events.corrections += reaped.corrections;
            let shared_bytes = lead.then(|| {
                let size = |key: &str| {
                    store
                        .get(key)
                        .ok()
                        .flatten()
                        .map_or(0, |(bytes, _)| bytes.len())
                };
                table.as_bytes().len()
                    + size(&Membership::log_key(&self.key_prefix))
                    + size(&self.load_record_key())
            });
            return Ok(Housekeeping {
                leader: lead,
                reaped,
                shared_bytes,
                loads: lead.then(|| table.totals()),
                eligible: lead.then(|| {
                    (0..table.endpoint_count())
                        .map(|e| table.eligible(e, now_ms))
                        .collect()
                }),
            });
        }
        Err(TrackerError::Contention)
    }

    /// Endpoints no live configuration has listed for a lease and with nothing in flight: left
    /// over from configurations that are gone. A followed pool changes only through the admin
    /// poll.
    fn unwanted(&self, table: &Table, now_ms: u64, lease_ttl_ms: u64) -> Vec<usize> {
        if self.source == MembershipSource::Followed {
            return Vec::new();
        }
        let now_s = now_ms / 1_000;
        let lease_s = lease_ttl_ms.div_ceil(1_000);
        (0..table.endpoint_count())
            .filter(|&e| {
                u64::from(table.health(e).wanted_at_s) + lease_s < now_s && table.total(e) == 0
            })
            .collect()
    }
}

fn nonzero(rng: &mut SplitMix64) -> u64 {
    loop {
        let id = rng.next_u64();
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests;
