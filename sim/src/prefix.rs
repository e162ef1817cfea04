//! The simulated tokenizer and automatic prefix cache (after vLLM's).
//!
//! * Tokens: the prompt text cut into 4-character chunks (the last may be
//!   shorter), each identified by a hash of its bytes, so equal text prefixes
//!   give equal token prefixes and the count is `ceil(chars / 4)` as before.
//! * Blocks: 16 tokens; a full block is identified by a chained hash of the
//!   previous block's hash and its own tokens, so a block hash stands for the
//!   whole prefix up to it. A trailing partial block is never cached.
//! * Cache: an LRU of block hashes holding at most `capacity / 16` blocks.
//!   A lookup walks the prompt's blocks from the start while they are cached.
//!   Chains are refreshed tail first so that their head is the most recently
//!   used: eviction then trims chains from the tail, which keeps what is left
//!   reachable from the start (a lone tail block could never be hit).
//! * Held blocks: the full blocks running requests reference, counted once
//!   however many requests share them (vLLM's block reference counts). Only
//!   these, not the cache, make up the KV usage: a cached block no running
//!   request references is free in vLLM (evicted on demand).

use std::collections::{BTreeMap, HashMap};

/// Tokens per KV block (vLLM's default block size).
pub const BLOCK_TOKENS: usize = 16;

/// Characters per simulated token.
pub const CHARS_PER_TOKEN: usize = 4;

/// Hash of the (absent) block before the first one.
const ROOT: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Splits `text` into tokens of [`CHARS_PER_TOKEN`] characters (the last may
/// be shorter) and returns their ids. Empty text has no tokens.
pub fn tokenize(text: &str) -> Vec<u64> {
    let mut out = Vec::with_capacity(text.len() / CHARS_PER_TOKEN + 1);
    let mut start = 0;
    let mut chars = 0;
    for (i, _) in text.char_indices() {
        if chars == CHARS_PER_TOKEN {
            out.push(fnv(ROOT, &text.as_bytes()[start..i]));
            start = i;
            chars = 0;
        }
        chars += 1;
    }
    if chars > 0 {
        out.push(fnv(ROOT, &text.as_bytes()[start..]));
    }
    out
}

/// Chained hashes of the full blocks of `tokens`: block `i`'s hash covers
/// tokens `0..16·(i+1)`.
pub fn block_hashes(tokens: &[u64]) -> Vec<u64> {
    let mut parent = ROOT;
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|block| {
            let mut h = fnv(ROOT, &parent.to_le_bytes());
            for t in block {
                h = fnv(h, &t.to_le_bytes());
            }
            parent = h;
            h
        })
        .collect()
}

/// An LRU set of block hashes with a capacity in tokens.
#[derive(Debug, Default)]
pub struct PrefixCache {
    capacity_blocks: usize,
    /// Logical clock of the last use of each block.
    clock: u64,
    last_use: HashMap<u64, u64>,
    /// Blocks by last use, oldest first.
    by_age: BTreeMap<u64, u64>,
}

impl PrefixCache {
    /// A cache of `capacity_tokens / 16` blocks; 0 (or fewer than 16 tokens)
    /// disables it.
    pub fn new(capacity_tokens: u64) -> PrefixCache {
        let blocks = capacity_tokens / BLOCK_TOKENS as u64;
        PrefixCache {
            capacity_blocks: usize::try_from(blocks).unwrap_or(usize::MAX),
            ..PrefixCache::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity_blocks > 0
    }

    /// Tokens held (full blocks only).
    pub fn tokens(&self) -> u64 {
        (self.last_use.len() * BLOCK_TOKENS) as u64
    }

    pub fn contains(&self, block: u64) -> bool {
        self.last_use.contains_key(&block)
    }

    fn touch(&mut self, block: u64) {
        self.clock += 1;
        if let Some(old) = self.last_use.insert(block, self.clock) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.clock, block);
        while self.last_use.len() > self.capacity_blocks {
            let Some((_, victim)) = self.by_age.pop_first() else {
                break;
            };
            self.last_use.remove(&victim);
        }
    }

    /// Number of leading `blocks` that are cached; those are refreshed.
    pub fn lookup(&mut self, blocks: &[u64]) -> usize {
        let hits = blocks.iter().take_while(|b| self.contains(**b)).count();
        for b in blocks[..hits].iter().rev() {
            self.touch(*b);
        }
        hits
    }

    /// Caches (or refreshes) the leading blocks of a prompt, as many as fit,
    /// and returns how many leading blocks are cached afterwards. Only a head
    /// is worth keeping when the prompt is larger than the cache.
    pub fn insert(&mut self, blocks: &[u64]) -> usize {
        if !self.enabled() {
            return 0;
        }
        let n = blocks.len().min(self.capacity_blocks);
        for b in blocks[..n].iter().rev() {
            self.touch(*b);
        }
        blocks.iter().take_while(|b| self.contains(**b)).count()
    }
}

/// Reference counts of the blocks that running requests hold. A block shared
/// by several requests (a common system prompt) is held once.
#[derive(Debug, Default)]
pub struct HeldBlocks {
    refs: HashMap<u64, u32>,
}

impl HeldBlocks {
    /// One more reference to each of `blocks`.
    pub fn hold(&mut self, blocks: &[u64]) {
        for b in blocks {
            *self.refs.entry(*b).or_insert(0) += 1;
        }
    }

    /// Drops one reference to each of `blocks`; a block nobody references
    /// any more is no longer held.
    pub fn release(&mut self, blocks: &[u64]) {
        for b in blocks {
            if let Some(n) = self.refs.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(b);
                }
            }
        }
    }

    /// Tokens in the distinct blocks held.
    pub fn tokens(&self) -> u64 {
        (self.refs.len() * BLOCK_TOKENS) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks_of(text: &str) -> Vec<u64> {
        block_hashes(&tokenize(text))
    }

    /// `n` tokens of text distinct from every other `tag`.
    fn text(tag: char, n: usize) -> String {
        (0..n).map(|i| format!("{tag}{:03}", i % 1000)).collect()
    }

    #[test]
    fn tokens_are_four_char_chunks() {
        assert!(tokenize("").is_empty());
        assert_eq!(tokenize("abc").len(), 1);
        assert_eq!(tokenize("abcd").len(), 1);
        assert_eq!(tokenize("abcde").len(), 2);
        // Characters, not bytes: four 3-byte characters make one token.
        assert_eq!(tokenize("€€€€€").len(), 2);
        let a = tokenize("abcdefgh");
        assert_eq!(a[0], tokenize("abcd")[0]);
        assert_eq!(a[1], tokenize("efgh")[0]);
        assert_ne!(a[0], a[1]);
        assert_eq!(tokenize("abcdxy")[1], tokenize("xy")[0]);
    }

    #[test]
    fn block_hashes_chain() {
        assert!(
            blocks_of(&text('a', 15)).is_empty(),
            "partial blocks are not hashed"
        );
        let a = blocks_of(&text('a', 48));
        assert_eq!(a.len(), 3);
        // Equal prefixes, equal block hashes; one differing token changes its
        // block and every later one.
        let mut t = text('a', 48);
        t.replace_range(16 * 4 + 4..16 * 4 + 8, "zzzz");
        let b = blocks_of(&t);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_ne!(a[2], b[2]);
        // The same block content after different prefixes hashes differently.
        let x = blocks_of(&(text('x', 16) + &text('c', 16)));
        let y = blocks_of(&(text('y', 16) + &text('c', 16)));
        assert_ne!(x[1], y[1]);
    }

    #[test]
    fn shared_prefix_hits_and_divergence_stops_the_chain() {
        let mut c = PrefixCache::new(1024);
        let system = text('s', 64);
        let a = blocks_of(&(system.clone() + &text('a', 40)));
        let b = blocks_of(&(system.clone() + &text('b', 40)));
        assert_eq!(c.lookup(&a), 0, "cold cache");
        assert_eq!(c.insert(&a), a.len());
        assert_eq!(c.tokens(), a.len() as u64 * 16);
        assert_eq!(c.lookup(&a), a.len());
        // b shares the 4 system blocks, then diverges.
        assert_eq!(c.lookup(&b), 4);
        // A cached block after a miss does not count: only chains from the start.
        let mut gap = a.clone();
        gap[1] = 42;
        assert_eq!(c.lookup(&gap), 1);
        assert_eq!(c.lookup(&[]), 0);
    }

    #[test]
    fn lru_evicts_least_recently_used_chain_tails_first() {
        // Room for 4 blocks.
        let mut c = PrefixCache::new(64);
        let a = blocks_of(&text('a', 48));
        let b = blocks_of(&text('b', 32));
        assert_eq!(c.insert(&a), 3);
        assert_eq!(c.insert(&b), 2);
        assert_eq!(c.tokens(), 64);
        // a's tail went first; its head is still reachable.
        assert_eq!(c.lookup(&a), 2);
        // Using a made b the least recently used: a new chain evicts b's tail.
        let d = blocks_of(&text('d', 16));
        assert_eq!(c.insert(&d), 1);
        assert_eq!(c.lookup(&b), 1);
        assert_eq!(c.lookup(&a), 2);
        assert_eq!(c.lookup(&d), 1);
        assert_eq!(c.tokens(), 64);
    }

    #[test]
    fn prompt_larger_than_cache_keeps_its_head() {
        let mut c = PrefixCache::new(32);
        let a = blocks_of(&text('a', 80));
        assert_eq!(a.len(), 5);
        assert_eq!(c.insert(&a), 2);
        assert_eq!(c.lookup(&a), 2);
        assert_eq!(c.tokens(), 32);
    }

    #[test]
    fn held_blocks_count_shared_blocks_once() {
        let mut h = HeldBlocks::default();
        let a = blocks_of(&(text('s', 32) + &text('a', 16)));
        let b = blocks_of(&(text('s', 32) + &text('b', 16)));
        h.hold(&a);
        assert_eq!(h.tokens(), 48);
        // b shares the two system blocks.
        h.hold(&b);
        assert_eq!(h.tokens(), 64);
        h.release(&a);
        assert_eq!(h.tokens(), 48, "b still holds the system blocks");
        h.release(&b);
        assert_eq!(h.tokens(), 0);
        // Releasing what is not held changes nothing.
        h.release(&a);
        assert_eq!(h.tokens(), 0);
    }

    #[test]
    fn zero_capacity_disables() {
        for cap in [0, 15] {
            let mut c = PrefixCache::new(cap);
            assert!(!c.enabled());
            let a = blocks_of(&text('a', 64));
            assert_eq!(c.insert(&a), 0);
            assert_eq!(c.lookup(&a), 0);
            assert_eq!(c.tokens(), 0);
        }
        assert!(PrefixCache::new(16).enabled());
    }
}
