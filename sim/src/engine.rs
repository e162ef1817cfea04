//! The continuous-batching engine, independent of HTTP.
//!
//! At most `max_batch` requests run (prefill + decode) at once; the rest wait
//! in a FIFO queue (a fair tokio semaphore) of at most `max_queue` entries.
//! A running request sleeps its prefill time, then for each chunk of
//! `tokens_per_chunk` tokens sleeps `n · t(b)` where `b` is the number of
//! requests decoding at that moment. Sleeps are against absolute deadlines so
//! timer granularity does not accumulate as drift. Dropping the future that
//! runs a request (client gone) frees its batch slot at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::model::{OutputLength, TimingModel};
use crate::openai::Usage;
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
}

#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    slots: Semaphore,
    waiting: AtomicUsize,
    running: AtomicUsize,
    decoding: AtomicUsize,
    rng: Mutex<Rng>,
    pub counters: Counters,
}

/// What one request asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub prompt_tokens: u64,
    /// Exactly this many tokens when set; otherwise drawn from the output distribution.
    pub max_tokens: Option<u64>,
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
        Arc::new(Engine {
            cfg,
            slots,
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            decoding: AtomicUsize::new(0),
            rng,
            counters: Counters::default(),
        })
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
        let permit = engine.slots.acquire().await.ok()?;
        // No longer waiting: running from here on.
        engine.waiting.fetch_sub(1, Ordering::SeqCst);
        self.stage = Stage::Running;
        let running = CountGuard::new(&engine.running);

        tokio::time::sleep(cfg.timing.prefill_time(job.prompt_tokens)).await;
        engine
            .counters
            .prompt_tokens
            .fetch_add(job.prompt_tokens, Ordering::Relaxed);

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
            if !emit(produced, n) {
                return None;
            }
            produced += n;
        }
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
