//! Host selection: pure functions over a pool's loads. They return an ordered list (chosen
//! endpoint first, then fallbacks) because Envoy's override_host policy walks that list on
//! retries, so a retry lands on the next-best endpoint instead of a random one.

use crate::config::MAX_FALLBACK_ENDPOINTS;
use crate::rng::RandomSource;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// SageMaker's `LEAST_OUTSTANDING_REQUESTS`: fewest in-flight requests, ties at random.
    LeastOutstandingRequests,
    /// SageMaker's `RANDOM`: uniform over the eligible endpoints.
    Random,
    /// SageMaker's `PREFIX_AWARE`: requests sharing a prompt prefix go to the same endpoint
    /// while it has room (see [`prefix_aware`]).
    PrefixAware,
}

impl Strategy {
    pub const NAMES: [&'static str; 3] = ["LEAST_OUTSTANDING_REQUESTS", "RANDOM", "PREFIX_AWARE"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "LEAST_OUTSTANDING_REQUESTS" => Some(Self::LeastOutstandingRequests),
            "RANDOM" => Some(Self::Random),
            "PREFIX_AWARE" => Some(Self::PrefixAware),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::LeastOutstandingRequests => Self::NAMES[0],
            Self::Random => Self::NAMES[1],
            Self::PrefixAware => Self::NAMES[2],
        }
    }

    /// Short form used in stat names.
    pub fn stat_name(self) -> &'static str {
        match self {
            Self::LeastOutstandingRequests => "least_outstanding_requests",
            Self::Random => "random",
            Self::PrefixAware => "prefix_aware",
        }
    }
}

/// How a request's endpoints are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    LeastOutstandingRequests,
    Random,
    /// By the rendezvous order of the prompt-prefix key `key`, while an endpoint has fewer
    /// than `threshold` requests in flight.
    Prefix {
        key: u64,
        threshold: u32,
    },
}

/// Where a prefix-routed request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixChoice {
    /// The key's own endpoint (first in its rendezvous order).
    Preferred,
    /// A later endpoint of the key's order: the ones before it were at the threshold.
    Spilled,
    /// Every endpoint of the walk was at the threshold: least outstanding requests decided.
    AllBusy,
}

/// How many endpoints of a key's rendezvous order are tried before least outstanding requests
/// decides: enough to absorb a burst on one prefix, few enough that a hot prefix cannot pile
/// onto a chain of busy servers.
pub const PREFIX_WALK: usize = 3;

/// In-flight request counts, indexed like the pool's endpoints. Implemented by the shared table
/// directly so selection reads the bytes it was handed without decoding them first.
pub trait Loads {
    fn endpoint_count(&self) -> usize;
    fn load(&self, endpoint: usize) -> u32;

    /// Least-outstanding-requests picks the lowest rank; by default the load itself. A rank
    /// can fold in more than the count (capacity, a full batch), see `server_load::Estimates`.
    fn rank(&self, endpoint: usize) -> u64 {
        u64::from(self.load(endpoint))
    }
}

impl Loads for [u32] {
    fn endpoint_count(&self) -> usize {
        self.len()
    }
    fn load(&self, endpoint: usize) -> u32 {
        self[endpoint]
    }
}

/// Most endpoints a selection returns: the chosen one plus the largest allowed fallback list.
pub const MAX_SELECTION: usize = MAX_FALLBACK_ENDPOINTS + 1;

/// An ordered choice, chosen endpoint first. Fixed capacity so the request path never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    endpoints: [u16; MAX_SELECTION],
    len: u8,
}

impl Default for Selection {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl Selection {
    const EMPTY: Self = Self {
        endpoints: [0; MAX_SELECTION],
        len: 0,
    };

    /// A selection of the given endpoints, in order (at most [`MAX_SELECTION`]).
    pub fn from_slice(endpoints: &[u16]) -> Self {
        let mut selection = Self::EMPTY;
        for &e in endpoints.iter().take(MAX_SELECTION) {
            selection.push(usize::from(e));
        }
        selection
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.endpoints[..usize::from(self.len)]
    }

    pub fn chosen(&self) -> Option<usize> {
        self.as_slice().first().map(|&e| usize::from(e))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, endpoint: usize) {
        self.endpoints[usize::from(self.len)] = endpoint as u16;
        self.len += 1;
    }

    fn contains(&self, endpoint: usize) -> bool {
        self.as_slice().iter().any(|&e| usize::from(e) == endpoint)
    }
}

/// `PREFIX_AWARE`: the eligible endpoints in the key's rendezvous order (highest score of
/// `score(key, endpoint hash)` first, so every worker and every replica computes the same order
/// without sharing anything, and an endpoint joining or leaving moves only its own keys). The
/// first of the first [`PREFIX_WALK`] with fewer than `threshold` requests in flight is chosen;
/// the rest of the order follows as fallbacks. When all of them are at the threshold, least
/// outstanding requests decides.
pub fn prefix_aware<L, E, R>(
    loads: &L,
    eligible: E,
    key: u64,
    hashes: &[u64],
    threshold: u32,
    fallbacks: usize,
    rng: &mut R,
) -> (Selection, Option<PrefixChoice>)
where
    L: Loads + ?Sized,
    E: Fn(usize) -> bool,
    R: RandomSource,
{
    let want = (fallbacks + 1).min(MAX_SELECTION);
    let walk = PREFIX_WALK.max(want).min(MAX_SELECTION);
    // The `walk` highest scores, best first, in one pass.
    let mut order = [(0u64, 0u16); MAX_SELECTION];
    let mut kept = 0usize;
    for (endpoint, &hash) in hashes.iter().enumerate().take(loads.endpoint_count()) {
        if !eligible(endpoint) {
            continue;
        }
        let score = crate::prefix::score(key, hash);
        if kept == walk && score <= order[walk - 1].0 {
            continue;
        }
        let mut slot = kept.min(walk - 1);
        while slot > 0 && order[slot - 1].0 < score {
            order[slot] = order[slot - 1];
            slot -= 1;
        }
        order[slot] = (score, endpoint as u16);
        kept = (kept + 1).min(walk);
    }
    let order = &order[..kept];
    let Some(position) = order
        .iter()
        .take(PREFIX_WALK)
        .position(|&(_, e)| loads.load(usize::from(e)) < threshold)
    else {
        if order.is_empty() {
            return (Selection::EMPTY, None);
        }
        let selection = least_loaded(loads, eligible, want, rng);
        return (selection, Some(PrefixChoice::AllBusy));
    };
    let mut selection = Selection::EMPTY;
    selection.push(usize::from(order[position].1));
    for (i, &(_, e)) in order.iter().enumerate() {
        if i != position && usize::from(selection.len) < want {
            selection.push(usize::from(e));
        }
    }
    let choice = if position == 0 {
        PrefixChoice::Preferred
    } else {
        PrefixChoice::Spilled
    };
    (selection, Some(choice))
}

/// Picks `1 + fallbacks` distinct eligible endpoints (fewer if the pool is smaller). An empty
/// selection means no endpoint is eligible. `PREFIX_AWARE` without a key picks like
/// least outstanding requests.
pub fn select<L, E, R>(
    strategy: Strategy,
    loads: &L,
    eligible: E,
    fallbacks: usize,
    rng: &mut R,
) -> Selection
where
    L: Loads + ?Sized,
    E: Fn(usize) -> bool,
    R: RandomSource,
{
    let want = (fallbacks + 1).min(MAX_SELECTION);
    match strategy {
        Strategy::LeastOutstandingRequests | Strategy::PrefixAware => {
            least_loaded(loads, eligible, want, rng)
        }
        Strategy::Random => uniform(loads.endpoint_count(), eligible, want, rng),
    }
}

/// Keeps the `want` smallest (rank, random tie-break) keys in one pass. A fresh random key per
/// endpoint makes ties uniform: a fixed scan order would pile idle-pool traffic onto endpoint 0.
fn least_loaded<L, E, R>(loads: &L, eligible: E, want: usize, rng: &mut R) -> Selection
where
    L: Loads + ?Sized,
    E: Fn(usize) -> bool,
    R: RandomSource,
{
    let mut keys = [(u128::MAX, 0u16); MAX_SELECTION];
    let mut kept = 0usize;
    for endpoint in 0..loads.endpoint_count() {
        if !eligible(endpoint) {
            continue;
        }
        let rank = u128::from(loads.rank(endpoint)) << 64;
        // Busier than everything kept: no tie to break, so no random key to draw. In a pool
        // of 1,024 this skips most of the draws, and the keys of the rest are what they were.
        if kept == want && rank > keys[want - 1].0 {
            continue;
        }
        let key = rank | u128::from(rng.next_u64());
        if kept == want && key >= keys[want - 1].0 {
            continue;
        }
        let mut slot = kept.min(want - 1);
        while slot > 0 && keys[slot - 1].0 > key {
            keys[slot] = keys[slot - 1];
            slot -= 1;
        }
        keys[slot] = (key, endpoint as u16);
        kept = (kept + 1).min(want);
    }
    let mut selection = Selection::EMPTY;
    for &(_, endpoint) in &keys[..kept] {
        selection.push(usize::from(endpoint));
    }
    selection
}

/// Uniform without replacement. Rejection sampling is O(want) when most endpoints are eligible;
/// a bounded number of misses falls back to a scan from a random offset so a mostly ineligible
/// pool still terminates quickly.
fn uniform<E, R>(count: usize, eligible: E, want: usize, rng: &mut R) -> Selection
where
    E: Fn(usize) -> bool,
    R: RandomSource,
{
    let mut selection = Selection::EMPTY;
    if count == 0 {
        return selection;
    }
    let mut misses_left = 4 * want + 8;
    while usize::from(selection.len) < want && misses_left > 0 {
        let candidate = rng.below(count);
        if eligible(candidate) && !selection.contains(candidate) {
            selection.push(candidate);
        } else {
            misses_left -= 1;
        }
    }
    if usize::from(selection.len) < want {
        // Reservoir-sample the remaining picks over a full scan: still uniform, always bounded.
        while usize::from(selection.len) < want {
            let mut pick = None;
            let mut seen = 0usize;
            for candidate in 0..count {
                if eligible(candidate) && !selection.contains(candidate) {
                    seen += 1;
                    if rng.below(seen) == 0 {
                        pick = Some(candidate);
                    }
                }
            }
            match pick {
                Some(candidate) => selection.push(candidate),
                None => break,
            }
        }
    }
    selection
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn all(_: usize) -> bool {
        true
    }

    fn lor(loads: &[u32], fallbacks: usize, seed: u64) -> Vec<u16> {
        let mut rng = SplitMix64::new(seed);
        select(
            Strategy::LeastOutstandingRequests,
            loads,
            all,
            fallbacks,
            &mut rng,
        )
        .as_slice()
        .to_vec()
    }

    #[test]
    fn strategy_names_round_trip() {
        for name in Strategy::NAMES {
            assert_eq!(Strategy::from_name(name).unwrap().name(), name);
            assert!(!Strategy::from_name(name).unwrap().stat_name().is_empty());
        }
        assert_eq!(Strategy::from_name("least_outstanding_requests"), None);
    }

    #[test]
    fn lor_picks_the_least_loaded_then_the_next_best_in_order() {
        assert_eq!(lor(&[5, 1, 3, 0, 4], 2, 1), vec![3, 1, 2]);
        assert_eq!(lor(&[5, 1, 3, 0, 4], 0, 1), vec![3]);
        assert_eq!(lor(&[5, 1, 3, 0, 4], 16, 1), vec![3, 1, 2, 4, 0]);
    }

    #[test]
    fn lor_breaks_ties_uniformly() {
        let loads = [2, 0, 0, 7, 0];
        let mut hits = [0u32; 5];
        let mut rng = SplitMix64::new(42);
        for _ in 0..30_000 {
            let s = select(
                Strategy::LeastOutstandingRequests,
                &loads[..],
                all,
                0,
                &mut rng,
            );
            hits[s.chosen().unwrap()] += 1;
        }
        assert_eq!(hits[0] + hits[3], 0);
        for i in [1, 2, 4] {
            assert!((9_000..11_000).contains(&hits[i]), "{hits:?}");
        }
    }

    #[test]
    fn lor_fallbacks_are_distinct_and_sorted_by_load() {
        let mut rng = SplitMix64::new(3);
        let loads: Vec<u32> = (0..200).map(|_| (rng.next_u64() % 5) as u32).collect();
        for seed in 0..50 {
            let picked = lor(&loads, 5, seed);
            assert_eq!(picked.len(), 6);
            let mut distinct = picked.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 6);
            let picked_loads: Vec<u32> = picked.iter().map(|&e| loads[usize::from(e)]).collect();
            assert!(
                picked_loads.windows(2).all(|w| w[0] <= w[1]),
                "{picked_loads:?}"
            );
            let min = *loads.iter().min().unwrap();
            assert_eq!(picked_loads[0], min);
        }
    }

    #[test]
    fn lor_skips_ineligible_endpoints() {
        let loads = [0u32, 9, 0, 4];
        let mut rng = SplitMix64::new(9);
        for _ in 0..100 {
            let s = select(
                Strategy::LeastOutstandingRequests,
                &loads[..],
                |e| e != 0 && e != 2,
                3,
                &mut rng,
            );
            assert_eq!(s.as_slice(), &[3, 1]);
        }
        let s = select(
            Strategy::LeastOutstandingRequests,
            &loads[..],
            |_| false,
            3,
            &mut rng,
        );
        assert!(s.is_empty());
        assert_eq!(s.chosen(), None);
    }

    #[test]
    fn random_is_uniform_and_distinct() {
        let loads = [100u32, 0, 0, 0];
        let mut rng = SplitMix64::new(11);
        let mut first = [0u32; 4];
        for _ in 0..40_000 {
            let s = select(Strategy::Random, &loads[..], all, 2, &mut rng);
            let picked = s.as_slice();
            assert_eq!(picked.len(), 3);
            assert!(picked[0] != picked[1] && picked[1] != picked[2] && picked[0] != picked[2]);
            first[usize::from(picked[0])] += 1;
        }
        // Load is ignored: the heavily loaded endpoint 0 is chosen as often as the others.
        for h in first {
            assert!((9_000..11_000).contains(&h), "{first:?}");
        }
    }

    #[test]
    fn random_terminates_and_stays_uniform_when_few_are_eligible() {
        let loads = vec![0u32; 1000];
        let mut rng = SplitMix64::new(5);
        let mut hits = [0u32; 2];
        for _ in 0..4_000 {
            let s = select(
                Strategy::Random,
                &loads[..],
                |e| e == 17 || e == 900,
                4,
                &mut rng,
            );
            assert_eq!(s.as_slice().len(), 2);
            hits[usize::from(s.as_slice()[0] == 900)] += 1;
        }
        assert!((1_700..2_300).contains(&hits[0]), "{hits:?}");
        let s = select(Strategy::Random, &loads[..], |_| false, 4, &mut rng);
        assert!(s.is_empty());
    }

    fn hashes(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| crate::prefix::endpoint_hash(&format!("10.0.0.{i}:8000")))
            .collect()
    }

    fn by_prefix(loads: &[u32], key: u64, threshold: u32) -> (Vec<u16>, Option<PrefixChoice>) {
        let mut rng = SplitMix64::new(key);
        let (selection, choice) = prefix_aware(
            loads,
            all,
            key,
            &hashes(loads.len()),
            threshold,
            2,
            &mut rng,
        );
        (selection.as_slice().to_vec(), choice)
    }

    #[test]
    fn a_key_always_goes_to_its_endpoint_while_it_has_room() {
        let idle = [0u32; 8];
        for key in 0..50u64 {
            let (first, choice) = by_prefix(&idle, key, 4);
            assert_eq!(choice, Some(PrefixChoice::Preferred));
            assert_eq!(first.len(), 3);
            for _ in 0..5 {
                assert_eq!(by_prefix(&idle, key, 4).0, first, "same key, same order");
            }
            // Load below the threshold does not move it: affinity beats balance.
            let mut loads = idle;
            loads[usize::from(first[0])] = 3;
            assert_eq!(by_prefix(&loads, key, 4).0[0], first[0]);
        }
    }

    #[test]
    fn a_busy_endpoint_spills_at_exactly_the_threshold_to_the_next_in_the_keys_order() {
        let key = 42;
        let (order, _) = by_prefix(&[0; 8], key, 4);
        let mut loads = [0u32; 8];
        loads[usize::from(order[0])] = 4;
        let (spilled, choice) = by_prefix(&loads, key, 4);
        assert_eq!(choice, Some(PrefixChoice::Spilled));
        assert_eq!(spilled[0], order[1]);
        assert_eq!(spilled[1], order[0], "the fallbacks keep the key's order");
        // Every endpoint of the walk busy: least outstanding requests decides.
        for &e in &order {
            loads[usize::from(e)] = 9;
        }
        let (busy, choice) = by_prefix(&loads, key, 4);
        assert_eq!(choice, Some(PrefixChoice::AllBusy));
        assert!(
            !order.contains(&busy[0]),
            "an idle endpoint outside the walk"
        );
        assert_eq!(loads[usize::from(busy[0])], 0);
    }

    #[test]
    fn prefix_routing_skips_ineligible_endpoints_and_handles_an_empty_pool() {
        let key = 7;
        let (order, _) = by_prefix(&[0; 5], key, 4);
        let mut rng = SplitMix64::new(1);
        let skip = usize::from(order[0]);
        let (selection, _) = prefix_aware(
            &[0u32; 5][..],
            |e| e != skip,
            key,
            &hashes(5),
            4,
            2,
            &mut rng,
        );
        assert_eq!(selection.chosen(), Some(usize::from(order[1])));
        let (selection, choice) =
            prefix_aware(&[0u32; 5][..], |_| false, key, &hashes(5), 4, 2, &mut rng);
        assert!(selection.is_empty());
        assert_eq!(choice, None);
    }

    #[test]
    fn selection_never_exceeds_the_pool_or_the_cap() {
        let mut rng = SplitMix64::new(0);
        for strategy in [Strategy::LeastOutstandingRequests, Strategy::Random] {
            assert_eq!(
                select(strategy, &[0u32][..], all, 5, &mut rng).as_slice(),
                &[0]
            );
            assert!(select(strategy, &[0u32; 0][..], all, 5, &mut rng).is_empty());
            let big = vec![1u32; 64];
            let s = select(strategy, &big[..], all, 1_000, &mut rng);
            assert_eq!(s.as_slice().len(), MAX_SELECTION);
        }
    }
}
