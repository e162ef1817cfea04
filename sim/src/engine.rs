//! The continuous-batching engine, independent of HTTP.
//!
//! At most `max_batch` requests run (prefill + decode) at once; the rest wait
//! in a FIFO queue (a fair tokio semaphore) of at most `max_queue` entries.
//! A running request sleeps its prefill time, then for each chunk of
//! `tokens_per_chunk` tokens sleeps `n · t(b)` where `b` is the number of
//! requests decoding at that moment. Sleeps are against absolute deadlines so
//! timer granularity does not accumulate as drift. Dropping the future that
//! runs a request (client gone) frees its batch slot at once.
//!
//! On admission (when it gets a slot) a request looks its prompt up in the
//! prefix cache; its prefill covers only the uncached tokens, and afterwards
//! its full blocks are cached. KV usage is accounted in tokens held by
//! running requests only, as vLLM counts it: each request's prompt (the
//! cached prefix it uses included) and the tokens generated so far, a full
//! block shared by several running requests counted once. Cached blocks no
//! running request references are free (vLLM evicts them on demand), so an
//! idle server reports 0 however warm its prefix cache is.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, TryAcquireError};
use tokio::time::Instant;

use crate::model::{OutputLength, TimingModel};
use crate::openai::Usage;
use crate::prefix::{HeldBlocks, PrefixCache, BLOCK_TOKENS};
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub timing: TimingModel,
    pub max_batch: usize,
    /// Requests allowed to wait for a batch slot; more are rejected.
    pub max_queue: usize,
    pub output: OutputLength,
    pub tokens_per_chunk: u64,
    pub seed: u64,
    /// KV-cache capacity in tokens: the denominator of the KV usage. The sim
    /// does not limit admission by it (`max_batch` does).
    pub kv_cache_tokens: u64,
    /// Prefix-cache capacity in tokens; 0 disables prefix caching.
    pub prefix_cache_tokens: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            timing: TimingModel::default(),
            max_batch: 8,
            max_queue: 1024,
            output: OutputLength::default(),
            tokens_per_chunk: 1,
            seed: 0,
            kv_cache_tokens: 65_536,
            prefix_cache_tokens: 32_768,
        }
    }
}

/// Cumulative counters, exported as Prometheus metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub success_stop: AtomicU64,
    pub success_length: AtomicU64,
    /// Admitted or queued requests abandoned before finishing (client gone).
    pub aborted: AtomicU64,
    /// Requests turned away because the queue was full.
    pub rejected: AtomicU64,
    /// Requests accepted (not turned away), whether they ran at once or waited.
    pub admitted: AtomicU64,
    /// Accepted requests that found every batch slot busy and had to wait.
    pub queued: AtomicU64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: AtomicU64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: AtomicU64,
}

#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    slots: Semaphore,
    waiting: AtomicUsize,
    running: AtomicUsize,
    decoding: AtomicUsize,
    rng: Mutex<Rng>,
    cache: Mutex<PrefixCache>,
    /// Full prompt blocks running requests hold (shared ones once).
    held: Mutex<HeldBlocks>,
    /// KV tokens running requests hold outside `held`: the prompt's trailing
    /// partial block (during prefill: every token not found in the cache) and
    /// the tokens generated so far.
    kv_private: AtomicU64,
    pub counters: Counters,
}

/// What one request asks of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub prompt_tokens: u64,
    /// Exactly this many tokens when set; otherwise drawn from the output distribution.
    pub max_tokens: Option<u64>,
    /// Chained hashes of the prompt's full blocks ([`crate::prefix::block_hashes`]).
    pub blocks: Vec<u64>,
}

/// A finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub usage: Usage,
    pub finish_reason: &'static str,
}

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// Instantaneous engine state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub waiting: usize,
    pub running: usize,
    pub decoding: usize,
}

struct CountGuard<'a>(&'a AtomicUsize);

impl<'a> CountGuard<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        CountGuard(c)
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running request's KV tokens (the blocks it holds and its private
/// tokens), given back however it ends.
struct KvGuard<'a> {
    engine: &'a Engine,
    blocks: Vec<u64>,
    private: u64,
}

impl<'a> KvGuard<'a> {
    fn new(engine: &'a Engine, blocks: &[u64], private: u64) -> Self {
        engine.with_held(|h| h.hold(blocks));
        engine.kv_private.fetch_add(private, Ordering::SeqCst);
        KvGuard {
            engine,
            blocks: blocks.to_vec(),
            private,
        }
    }

    /// Holds `blocks` as well.
    fn hold(&mut self, blocks: &[u64]) {
        self.engine.with_held(|h| h.hold(blocks));
        self.blocks.extend_from_slice(blocks);
    }

    fn set_private(&mut self, private: u64) {
        let total = &self.engine.kv_private;
        if private >= self.private {
            total.fetch_add(private - self.private, Ordering::SeqCst);
        } else {
            total.fetch_sub(self.private - private, Ordering::SeqCst);
        }
        self.private = private;
    }
}

impl Drop for KvGuard<'_> {
    fn drop(&mut self) {
        self.engine.with_held(|h| h.release(&self.blocks));
        self.engine
            .kv_private
            .fetch_sub(self.private, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    Running,
    Finished,
}

/// A place in the queue. Dropping it before it finishes (client gone) gives
/// the place or the batch slot back at once and counts the request as aborted.
pub struct Ticket {
    engine: Arc<Engine>,
    stage: Stage,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.stage == Stage::Waiting {
            self.engine.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        if self.stage != Stage::Finished {
            self.engine.counters.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Arc<Engine> {
        let slots = Semaphore::new(cfg.max_batch.clamp(1, Semaphore::MAX_PERMITS));
        let rng = Mutex::new(Rng::new(cfg.seed));
        let cache = Mutex::new(PrefixCache::new(cfg.prefix_cache_tokens));
        Arc::new(Engine {
            cfg,
            slots,
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            decoding: AtomicUsize::new(0),
            rng,
            cache,
            held: Mutex::new(HeldBlocks::default()),
            kv_private: AtomicU64::new(0),
            counters: Counters::default(),
        })
    }

    fn with_cache<T>(&self, f: impl FnOnce(&mut PrefixCache) -> T) -> T {
        match self.cache.lock() {
            Ok(mut c) => f(&mut c),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn with_held<T>(&self, f: impl FnOnce(&mut HeldBlocks) -> T) -> T {
        match self.held.lock() {
            Ok(mut h) => f(&mut h),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Tokens held in the prefix cache (whether running requests use them or not).
    pub fn cached_tokens(&self) -> u64 {
        self.with_cache(|c| c.tokens())
    }

    /// KV tokens in use: what running requests hold (prompts, cached prefixes
    /// they use included, and generated tokens; a block shared by several of
    /// them once). Cached blocks no running request holds count as free.
    pub fn kv_tokens(&self) -> u64 {
        self.with_held(|h| h.tokens()) + self.kv_private.load(Ordering::SeqCst)
    }

    /// KV-cache usage in [0, 1]: `kv_tokens / kv_cache_tokens`, capped at 1.
    pub fn kv_usage(&self) -> f64 {
        let cap = self.cfg.kv_cache_tokens.max(1) as f64;
        (self.kv_tokens() as f64 / cap).min(1.0)
    }

    /// Prompt tokens of `job` found in the prefix cache (refreshing them).
    /// Like vLLM, at least the last prompt token is always computed, so a
    /// fully cached prompt hits one block less.
    fn prefix_lookup(&self, job: &Job) -> u64 {
        let usable = (job.prompt_tokens.saturating_sub(1) / BLOCK_TOKENS as u64) as usize;
        let blocks = &job.blocks[..usable.min(job.blocks.len())];
        let hit_blocks = self.with_cache(|c| {
            if !c.enabled() {
                return None;
            }
            Some(c.lookup(blocks))
        });
        let Some(hit_blocks) = hit_blocks else {
            return 0;
        };
        let hits = (hit_blocks * BLOCK_TOKENS) as u64;
        self.counters
            .prefix_queries
            .fetch_add(job.prompt_tokens, Ordering::Relaxed);
        self.counters.prefix_hits.fetch_add(hits, Ordering::Relaxed);
        hits
    }

    /// Caches (or refreshes) the prompt's full blocks, as many as fit.
    fn prefix_insert(&self, job: &Job) {
        self.with_cache(|c| c.insert(&job.blocks));
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            waiting: self.waiting.load(Ordering::SeqCst),
            running: self.running.load(Ordering::SeqCst),
            decoding: self.decoding.load(Ordering::SeqCst),
        }
    }

    /// Draws a uniform number in [0, 1) from the engine's seeded generator.
    pub fn random(&self) -> f64 {
        match self.rng.lock() {
            Ok(mut r) => r.next_f64(),
            Err(poisoned) => poisoned.into_inner().next_f64(),
        }
    }

    fn sample_output(&self) -> u64 {
        match self.rng.lock() {
            Ok(mut r) => self.cfg.output.sample(&mut r),
            Err(poisoned) => self.cfg.output.sample(&mut poisoned.into_inner()),
        }
    }

    /// Takes a place in the queue, or fails at once when `max_queue` requests
    /// already wait. A request waits (counts in `waiting`) from here until it
    /// gets a batch slot.
    pub fn enqueue(self: &Arc<Self>) -> Result<Ticket, QueueFull> {
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        // Requests that would get a slot at once never really wait: compare
        // against queue length plus free slots.
        let free = self.slots.available_permits();
        if prev >= self.cfg.max_queue.saturating_add(free) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(QueueFull);
        }
        self.counters.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(Ticket {
            engine: Arc::clone(self),
            stage: Stage::Waiting,
        })
    }
}

impl Ticket {
    /// Waits for a batch slot, then simulates prefill and decode. `emit(start,
    /// count)` is called as each chunk of tokens is produced and returns
    /// `false` when nobody listens any more, which ends the request (counted
    /// as aborted). Cancel by dropping the future.
    pub async fn run<F>(mut self, job: Job, mut emit: F) -> Option<Finished>
    where
        F: FnMut(u64, u64) -> bool,
    {
        let engine = Arc::clone(&self.engine);
        let cfg = &engine.cfg;
        // The semaphore is fair: a free permit means nobody is queued ahead.
        let permit = match engine.slots.try_acquire() {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                engine.counters.queued.fetch_add(1, Ordering::Relaxed);
                engine.slots.acquire().await.ok()?
            }
            Err(TryAcquireError::Closed) => return None,
        };
        // No longer waiting: running from here on.
        engine.waiting.fetch_sub(1, Ordering::SeqCst);
        self.stage = Stage::Running;
        let running = CountGuard::new(&engine.running);

        let hits = engine.prefix_lookup(&job);
        let uncached = job.prompt_tokens.saturating_sub(hits);
        // The cached prefix is used (held) at once; the rest is computed by the prefill.
        let hit_blocks = (hits as usize / BLOCK_TOKENS).min(job.blocks.len());
        let mut kv = KvGuard::new(&engine, &job.blocks[..hit_blocks], uncached);
        tokio::time::sleep(cfg.timing.prefill_time(uncached)).await;
        engine
            .counters
            .prompt_tokens
            .fetch_add(job.prompt_tokens, Ordering::Relaxed);
        engine.prefix_insert(&job);
        // Every full block of the prompt is now a block the request holds
        // (shared with any other running request that holds the same one),
        // whether or not the cache had room to keep it.
        let full = (job.blocks.len() * BLOCK_TOKENS) as u64;
        kv.hold(&job.blocks[hit_blocks..]);
        let mut private = job.prompt_tokens.saturating_sub(full);
        kv.set_private(private);

        let (total, capped) = match job.max_tokens {
            Some(n) => (n.max(1), true),
            None => {
                let n = engine.sample_output();
                (n, n >= cfg.output.max)
            }
        };
        let decoding = CountGuard::new(&engine.decoding);
        let per_chunk = cfg.tokens_per_chunk.max(1);
        let mut next = Instant::now();
        let mut produced = 0u64;
        while produced < total {
            let n = per_chunk.min(total - produced);
            let b = engine.decoding.load(Ordering::SeqCst);
            next += cfg.timing.token_time(b) * n.min(u32::MAX as u64) as u32;
            if next > Instant::now() {
                tokio::time::sleep_until(next).await;
            } else {
                tokio::task::yield_now().await;
            }
            engine
                .counters
                .generation_tokens
                .fetch_add(n, Ordering::Relaxed);
            private += n;
            kv.set_private(private);
            if !emit(produced, n) {
                return None;
            }
            produced += n;
        }
        drop(kv);
        drop(decoding);
        drop(running);
        drop(permit);
        let finish_reason = if capped { "length" } else { "stop" };
        match finish_reason {
            "length" => engine
                .counters
                .success_length
                .fetch_add(1, Ordering::Relaxed),
            _ => engine.counters.success_stop.fetch_add(1, Ordering::Relaxed),
        };
        self.stage = Stage::Finished;
        Some(Finished {
            usage: Usage {
                prompt_tokens: job.prompt_tokens,
                completion_tokens: total,
            },
            finish_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn engine(max_batch: usize, max_queue: usize) -> Arc<Engine> {
        Engine::new(EngineConfig {
            timing: TimingModel {
                tpot_ms: 10.0,
                batch_alpha: 0.0,
                prefill_base_ms: 0.0,
                prefill_per_token_ms: 0.0,
                time_scale: 1.0,
            },
            max_batch,
            max_queue,
            ..EngineConfig::default()
        })
    }

    const JOB: Job = Job {
        prompt_tokens: 1,
        max_tokens: Some(10),
        blocks: Vec::new(),
    };

    #[tokio::test(start_paused = true)]
    async fn single_request_timing() {
        let e = engine(4, 16);
        let t0 = Instant::now();
        let mut chunks = 0;
        let fin = e
            .enqueue()
            .unwrap()
            .run(JOB, |_, n| {
                chunks += n;
                true
            })
            .await
            .unwrap();
        assert_eq!(chunks, 10);
        assert_eq!(fin.usage.completion_tokens, 10);
        assert_eq!(fin.finish_reason, "length");
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
        assert_eq!(
            e.snapshot(),
            Snapshot {
                waiting: 0,
                running: 0,
                decoding: 0
            }
        );
        assert_eq!(e.counters.generation_tokens.load(Ordering::Relaxed), 10);
        assert_eq!(e.counters.success_length.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn third_request_waits_past_max_batch() {
        let e = engine(2, 16);
        let t0 = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..3 {
            let ticket = e.enqueue().unwrap();
            handles.push(tokio::spawn(async move {
                ticket.run(JOB, |_, _| true).await;
                t0.elapsed()
            }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            e.snapshot(),
            Snapshot {
                waiting: 1,
                running: 2,
                decoding: 2
            }
        );
        let mut done = Vec::new();
        for h in handles {
            done.push(h.await.unwrap());
        }
        done.sort();
        assert_eq!(done[0], Duration::from_millis(100));
        assert_eq!(done[1], Duration::from_millis(100));
        assert_eq!(
            done[2],
            Duration::from_millis(200),
            "third waited for a slot"
        );
        assert_eq!(e.counters.admitted.load(Ordering::Relaxed), 3);
        assert_eq!(e.counters.queued.load(Ordering::Relaxed), 1);
    }

    /// A job for `text`, generating `max` tokens.
    fn text_job(text: &str, max: u64) -> Job {
        let tokens = crate::prefix::tokenize(text);
        Job {
            prompt_tokens: tokens.len() as u64,
            max_tokens: Some(max),
            blocks: crate::prefix::block_hashes(&tokens),
        }
    }

    fn prefill_engine(prefix_cache_tokens: u64) -> Arc<Engine> {
        Engine::new(EngineConfig {
            timing: TimingModel {
                tpot_ms: 10.0,
                batch_alpha: 0.0,
                prefill_base_ms: 10.0,
                prefill_per_token_ms: 1.0,
                time_scale: 1.0,
            },
            prefix_cache_tokens,
            kv_cache_tokens: 1000,
            ..EngineConfig::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn cached_prefix_shortens_prefill() {
        let e = prefill_engine(1024);
        let system = "s".repeat(4 * 48);
        let a = text_job(&(system.clone() + &"a".repeat(4 * 16)), 1);
        let b = text_job(&(system + &"b".repeat(4 * 20)), 1);
        let timed = |job: Job| {
            let e = Arc::clone(&e);
            async move {
                let t0 = Instant::now();
                e.enqueue().unwrap().run(job, |_, _| true).await.unwrap();
                t0.elapsed()
            }
        };
        // Cold: 10 + 64 tokens, then one 10 ms token.
        assert_eq!(timed(a.clone()).await, Duration::from_millis(84));
        // All 4 blocks are cached, but the last prompt token is always computed.
        assert_eq!(timed(a.clone()).await, Duration::from_millis(10 + 16 + 10));
        // b shares the 3 system blocks: 68 - 48 tokens to compute.
        assert_eq!(timed(b).await, Duration::from_millis(10 + 20 + 10));
        let c = &e.counters;
        assert_eq!(c.prefix_queries.load(Ordering::Relaxed), 64 + 64 + 68);
        assert_eq!(c.prefix_hits.load(Ordering::Relaxed), 48 + 48);
        assert_eq!(c.prompt_tokens.load(Ordering::Relaxed), 64 + 64 + 68);

        // Disabled: no lookups, full prefills.
        let e = prefill_engine(0);
        let t0 = Instant::now();
        e.enqueue().unwrap().run(a.clone(), |_, _| true).await;
        e.enqueue().unwrap().run(a, |_, _| true).await;
        assert_eq!(t0.elapsed(), Duration::from_millis(2 * 84));
        assert_eq!(e.counters.prefix_queries.load(Ordering::Relaxed), 0);
        assert_eq!(e.cached_tokens(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn kv_usage_counts_only_running_requests() {
        for cache in [1024, 0] {
            let e = prefill_engine(cache);
            let job = text_job(&"a".repeat(4 * 40), 10);
            let h = tokio::spawn({
                let e = Arc::clone(&e);
                async move { e.enqueue().unwrap().run(job, |_, _| true).await }
            });
            // Prefill (10 + 40 ms): the prompt is held, nothing cached yet.
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!((e.kv_tokens(), e.cached_tokens()), (40, 0));
            // Three tokens out: the prompt (2 full blocks + 8 tokens) and the
            // output held by the request; with a cache its 2 blocks are cached too.
            tokio::time::sleep(Duration::from_millis(55)).await;
            let cached = if cache > 0 { 32 } else { 0 };
            assert_eq!((e.kv_tokens(), e.cached_tokens()), (43, cached));
            assert!((e.kv_usage() - 0.043).abs() < 1e-9);
            h.await.unwrap().unwrap();
            // Idle: cached blocks nobody references are free, as in vLLM.
            assert_eq!((e.kv_tokens(), e.cached_tokens()), (0, cached));
            assert_eq!(e.kv_usage(), 0.0, "cache {cache}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn kv_usage_counts_a_shared_cached_prefix_once() {
        let e = prefill_engine(1024);
        let system = "s".repeat(4 * 48);
        // Warm the cache with the 3 system blocks, then go idle.
        let a = text_job(&(system.clone() + &"a".repeat(4 * 16)), 1);
        e.enqueue().unwrap().run(a, |_, _| true).await.unwrap();
        assert_eq!((e.kv_tokens(), e.cached_tokens()), (0, 64));
        // Two requests hit the system blocks at once: 68 tokens each, 48 shared.
        let mut handles = Vec::new();
        for tail in ["b", "c"] {
            let job = text_job(&(system.clone() + &tail.repeat(4 * 20)), 5);
            let e = Arc::clone(&e);
            handles.push(tokio::spawn(async move {
                e.enqueue().unwrap().run(job, |_, _| true).await
            }));
        }
        // Prefill (10 + 20 ms): the shared cached prefix once + 20 uncached each.
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(e.kv_tokens(), 48 + 2 * 20);
        // Decoding, one token out each: 3 shared + 2 own blocks, 4 + 1 tokens each.
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(e.kv_tokens(), 5 * 16 + 2 * 5);
        for h in handles {
            h.await.unwrap().unwrap();
        }
        assert_eq!(e.kv_tokens(), 0);
        assert_eq!(e.cached_tokens(), 6 * 16);
    }

    #[tokio::test(start_paused = true)]
    async fn batching_slows_decode() {
        let e = Engine::new(EngineConfig {
            timing: TimingModel {
                tpot_ms: 10.0,
                batch_alpha: 0.5,
                prefill_base_ms: 0.0,
                prefill_per_token_ms: 0.0,
                time_scale: 1.0,
            },
            max_batch: 8,
            ..EngineConfig::default()
        });
        let t0 = Instant::now();
        e.enqueue().unwrap().run(JOB, |_, _| true).await;
        let alone = t0.elapsed();
        let t1 = Instant::now();
        let a = e.enqueue().unwrap();
        let b = e.enqueue().unwrap();
        tokio::join!(a.run(JOB, |_, _| true), b.run(JOB, |_, _| true));
        let together = t1.elapsed();
        assert_eq!(alone, Duration::from_millis(100));
        // Both decode concurrently: t(2) = 15 ms per token.
        assert_eq!(together, Duration::from_millis(150));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_limit_rejects() {
        let e = engine(1, 1);
        let a = e.enqueue().unwrap();
        let b = e.enqueue().unwrap();
        let running = tokio::spawn(a.run(JOB, |_, _| true));
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let queued = tokio::spawn(b.run(JOB, |_, _| true));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(e.snapshot().waiting, 1);
        assert!(e.enqueue().is_err());
        assert_eq!(e.counters.rejected.load(Ordering::Relaxed), 1);
        running.await.unwrap();
        queued.await.unwrap();
        assert!(e.enqueue().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_frees_slot_immediately() {
        let e = engine(1, 4);
        let long = Job {
            prompt_tokens: 1,
            max_tokens: Some(1000),
            blocks: Vec::new(),
        };
        let t = e.enqueue().unwrap();
        let h = tokio::spawn(t.run(long, |_, _| true));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(e.snapshot().running, 1);
        h.abort();
        let _ = h.await;
        assert_eq!(
            e.snapshot(),
            Snapshot {
                waiting: 0,
                running: 0,
                decoding: 0
            }
        );
        assert_eq!(e.counters.aborted.load(Ordering::Relaxed), 1);
        // The slot is free: a new request starts at once.
        let t0 = Instant::now();
        e.enqueue().unwrap().run(JOB, |_, _| true).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn emit_false_aborts() {
        let e = engine(1, 4);
        let mut seen = 0;
        let r = e
            .enqueue()
            .unwrap()
            .run(JOB, |_, _| {
                seen += 1;
                seen < 3
            })
            .await;
        assert!(r.is_none());
        assert_eq!(seen, 3);
        assert_eq!(e.snapshot().running, 0);
        assert_eq!(e.counters.aborted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_group_tokens_and_sampled_lengths() {
        let e = Engine::new(EngineConfig {
            tokens_per_chunk: 4,
            output: OutputLength {
                median: 50.0,
                sigma: 0.0,
                max: 2048,
            },
            ..EngineConfig::default()
        });
        let mut calls = Vec::new();
        let fin = e
            .enqueue()
            .unwrap()
            .run(
                Job {
                    prompt_tokens: 1,
                    max_tokens: None,
                    blocks: Vec::new(),
                },
                |s, n| {
                    calls.push((s, n));
                    true
                },
            )
            .await
            .unwrap();
        assert_eq!(fin.usage.completion_tokens, 50);
        assert_eq!(fin.finish_reason, "stop");
        assert_eq!(calls.len(), 13);
        assert_eq!(calls[12], (48, 2));
        assert_eq!(calls.iter().map(|c| c.1).sum::<u64>(), 50);
    }
}
