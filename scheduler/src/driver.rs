//! The engine thread and the handle the server submits through.
//!
//! [`spawn`] moves the model into a plain `std::thread` that owns it, the KV block allocator
//! and every sequence, and runs [`Batcher::step`] in a loop. Nothing is shared with the
//! handles but a channel of commands and a few atomics (queue counts, stats, heartbeat), so
//! no lock is ever held across a forward pass. The thread sleeps in a blocking `recv` while
//! there is no work, and a submission wakes it.
//!
//! The [`SchedulerHandle`] is cheap to clone. It validates and admits jobs at the door:
//! malformed jobs, jobs that could never fit in the context window or the KV cache, and jobs
//! beyond the waiting queue's limits are refused before they are queued. Each accepted job
//! gets a [`JobStream`]; dropping the stream cancels the job at the next step boundary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::batcher::{Batcher, Counters, NewJob};
use crate::config::{ConfigError, SchedulerConfig};
use crate::job::{FinishReason, JobRequest, JobStream, LogprobsRequest, SubmitError};
use crate::model::Model;

/// A command from a handle to the engine thread.
enum Command {
    Submit(Box<NewJob>),
    Shutdown { deadline: Option<Instant> },
}

/// What a submission is checked against; fixed when the thread starts.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_context: usize,
    num_blocks: usize,
    block_size: usize,
    vocab_size: usize,
    max_waiting_requests: usize,
    max_waiting_tokens: usize,
}

/// State shared by the handles and the engine thread.
#[derive(Debug)]
struct Shared {
    limits: Limits,
    counters: Arc<Counters>,
    accepting: AtomicBool,
    next_id: AtomicU64,
    /// Time base for `last_beat_ns`.
    epoch: Instant,
    last_beat_ns: AtomicU64,
    idle: AtomicBool,
    alive: AtomicBool,
    /// Set (and notified) when the thread has exited.
    stopped: Mutex<bool>,
    stopped_cv: Condvar,
    stopped_tx: watch::Sender<bool>,
}

impl Shared {
    fn beat(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_beat_ns.store(ns, Ordering::Relaxed);
    }
}

/// Marks the loop dead when the engine thread ends, however it ends (a panic included).
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.accepting.store(false, Ordering::SeqCst);
        self.0.alive.store(false, Ordering::SeqCst);
        if let Ok(mut stopped) = self.0.stopped.lock() {
            *stopped = true;
        }
        self.0.stopped_cv.notify_all();
        self.0.stopped_tx.send_replace(true);
    }
}

/// A snapshot of the scheduler's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Sequences waiting (new or preempted).
    pub waiting: usize,
    /// Sequences in the running batch.
    pub running: usize,
    /// Jobs counted against the waiting-queue limit (submitted, never admitted).
    pub queued_requests: usize,
    /// Their tokens (prompt + max new).
    pub queued_tokens: usize,
    /// KV blocks held by sequences.
    pub kv_blocks_used: usize,
    /// Unheld blocks kept by the prefix cache (reclaimable).
    pub kv_blocks_cached: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Steps run.
    pub steps: u64,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Tokens looked up in the prefix cache so far.
    pub prefix_cache_queried_tokens: u64,
    /// Tokens found there.
    pub prefix_cache_hit_tokens: u64,
    /// Tokens generated so far.
    pub generated_tokens: u64,
}

/// Whether the engine loop is alive and making progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The engine thread is running.
    pub alive: bool,
    /// It is asleep waiting for work (so an old `since_last_beat` is fine).
    pub idle: bool,
    /// Time since the loop last went round (a step ended or it woke up).
    pub since_last_beat: Duration,
    /// Steps run.
    pub steps: u64,
}

impl Heartbeat {
    /// Alive, and either idle or last went round within `max_step`. Choose `max_step` above
    /// the longest step the model can take (a full `max_batched_tokens` prefill).
    pub fn is_healthy(&self, max_step: Duration) -> bool {
        self.alive && (self.idle || self.since_last_beat <= max_step)
    }
}

/// The server's way in: submit jobs, read stats and the heartbeat, shut down. Clone freely.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    tx: Sender<Command>,
}

/// Starts the engine thread over `model`. Fails if the configuration is invalid or the model
/// has no KV cache.
pub fn spawn<M: Model>(model: M, config: SchedulerConfig) -> Result<SchedulerHandle, ConfigError> {
    config.validate()?;
    let (num_blocks, block_size, max_context) = (
        model.num_kv_blocks(),
        model.block_size(),
        model.max_context(),
    );
    if num_blocks == 0 || block_size == 0 || max_context == 0 {
        return Err(ConfigError::NoKvCache {
            num_blocks,
            block_size,
            max_context,
        });
    }
    let limits = Limits {
        max_context,
        num_blocks,
        block_size,
        // A small checkpoint served with GPT-J's tokenizer has fewer rows than it has ids.
        vocab_size: model.vocab_size().min(model.tokenizer().vocab_size()),
        max_waiting_requests: config.max_waiting_requests,
        max_waiting_tokens: config.max_waiting_tokens,
    };
    let counters = Arc::new(Counters::default());
    let (stopped_tx, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        limits,
        counters: Arc::clone(&counters),
        accepting: AtomicBool::new(true),
        next_id: AtomicU64::new(1),
        epoch: Instant::now(),
        last_beat_ns: AtomicU64::new(0),
        idle: AtomicBool::new(true),
        alive: AtomicBool::new(true),
        stopped: Mutex::new(false),
        stopped_cv: Condvar::new(),
        stopped_tx,
    });
    let (tx, rx) = mpsc::channel();
    let batcher = Batcher::new(model, &config, counters);
    let thread_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("gptj-engine".into())
        .spawn(move || engine_loop(batcher, rx, thread_shared))
        .map_err(|e| ConfigError::Thread(e.to_string()))?;
    tracing::info!(
        policy = ?config.policy,
        kind = ?config.kind,
        max_num_seqs = config.max_num_seqs,
        max_batched_tokens = config.max_batched_tokens,
        kv_blocks = num_blocks,
        block_size,
        "scheduler started"
    );
    Ok(SchedulerHandle { shared, tx })
}

/// The engine thread: take commands, step while there is work, sleep when there is none.
fn engine_loop<M: Model>(mut batcher: Batcher<M>, rx: Receiver<Command>, shared: Arc<Shared>) {
    let _guard = AliveGuard(Arc::clone(&shared));
    // Some(deadline) once a shutdown was asked for (or every handle is gone).
    let mut draining: Option<Option<Instant>> = None;
    let handle = |cmd: Command,
                  batcher: &mut Batcher<M>,
                  draining: &mut Option<Option<Instant>>| match cmd {
        Command::Submit(job) => batcher.add(*job),
        Command::Shutdown { deadline } => {
            let earlier = match (*draining, deadline) {
                (Some(Some(old)), Some(new)) => Some(old.min(new)),
                (Some(Some(old)), None) => Some(old),
                (_, new) => new,
            };
            *draining = Some(earlier);
        }
    };
    loop {
        shared.beat();
        if !batcher.has_work() {
            if draining.is_some() {
                break;
            }
            shared.idle.store(true, Ordering::Relaxed);
            let cmd = rx.recv();
            shared.idle.store(false, Ordering::Relaxed);
            shared.beat();
            match cmd {
                Ok(cmd) => handle(cmd, &mut batcher, &mut draining),
                // Every handle is gone and nothing is in flight.
                Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => handle(cmd, &mut batcher, &mut draining),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    draining.get_or_insert(None);
                    break;
                }
            }
        }
        if let Some(Some(deadline)) = draining {
            if Instant::now() >= deadline {
                tracing::warn!("shutdown deadline reached: cancelling the jobs still in flight");
                batcher.abort_all(FinishReason::Cancelled);
                continue;
            }
        }
        batcher.step();
    }
    tracing::info!("engine loop stopped");
}

impl SchedulerHandle {
    /// Submits a job. On success the job is queued and its events arrive on the stream;
    /// on error nothing was queued and the error says what to do.
    pub fn submit(&self, job: JobRequest) -> Result<JobStream, SubmitError> {
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let tokens = self.check(&job)?;
        self.reserve(tokens)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let new = NewJob {
            id,
            request: job,
            events,
            submitted: Instant::now(),
            queued_tokens: tokens,
        };
        if self.tx.send(Command::Submit(Box::new(new))).is_err() {
            self.release(tokens);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(JobStream { id, rx })
    }

    /// Validates a job against the model's limits; returns the tokens it counts for in the
    /// queue (prompt + max new).
    fn check(&self, job: &JobRequest) -> Result<usize, SubmitError> {
        let l = &self.shared.limits;
        let prompt = job.prompt_ids.len();
        if prompt == 0 {
            return Err(SubmitError::Invalid(
                "the prompt must contain at least one token".into(),
            ));
        }
        if job.max_new_tokens == 0 {
            return Err(SubmitError::Invalid(
                "`max_new_tokens` must be >= 1, got 0".into(),
            ));
        }
        if let Some(bad) = job
            .prompt_ids
            .iter()
            .find(|&&id| id as usize >= l.vocab_size)
        {
            return Err(SubmitError::Invalid(format!(
                "prompt token id {bad} is outside the vocabulary (size {})",
                l.vocab_size
            )));
        }
        if let Some(bad) = job
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= l.vocab_size)
        {
            return Err(SubmitError::Invalid(format!(
                "stop token id {bad} is outside the vocabulary (size {})",
                l.vocab_size
            )));
        }
        if let Some((bad, _)) = job
            .penalties
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= l.vocab_size)
        {
            return Err(SubmitError::Invalid(format!(
                "logit_bias token id {bad} is outside the vocabulary (size {})",
                l.vocab_size
            )));
        }
        if job.stop.iter().any(String::is_empty) {
            return Err(SubmitError::Invalid(
                "stop strings must not be empty".into(),
            ));
        }
        job.params.validate().map_err(SubmitError::Invalid)?;
        if let Some(l) = job.logprobs.filter(|l| l.top > LogprobsRequest::MAX_TOP) {
            return Err(SubmitError::Invalid(format!(
                "at most {} top log-probabilities per token, got {}",
                LogprobsRequest::MAX_TOP,
                l.top
            )));
        }
        let total = prompt.saturating_add(job.max_new_tokens);
        if total > l.max_context {
            return Err(SubmitError::ExceedsContext {
                prompt_tokens: prompt,
                max_new_tokens: job.max_new_tokens,
                max_context: l.max_context,
            });
        }
        // The last generated token is never fed back, so its KV is never stored.
        let kv_tokens = total - 1;
        let needed_blocks = kv_tokens.div_ceil(l.block_size);
        if needed_blocks > l.num_blocks {
            return Err(SubmitError::ExceedsKvCache {
                tokens: kv_tokens,
                needed_blocks,
                total_blocks: l.num_blocks,
            });
        }
        Ok(total)
    }

    /// Takes a place in the bounded queue, or refuses with `QueueFull`.
    fn reserve(&self, tokens: usize) -> Result<(), SubmitError> {
        let c = &self.shared.counters;
        let l = &self.shared.limits;
        let requests = c.queued_requests.fetch_add(1, Ordering::SeqCst);
        let queued = c.queued_tokens.fetch_add(tokens, Ordering::SeqCst);
        // A job alone in the queue is always let in, whatever its size.
        let over = requests >= l.max_waiting_requests
            || (requests > 0 && queued + tokens > l.max_waiting_tokens);
        if over {
            self.release(tokens);
            let per_sec = f64::from_bits(c.tokens_per_sec.load(Ordering::Relaxed));
            let secs = if per_sec > 0.0 {
                queued as f64 / per_sec
            } else {
                1.0
            };
            return Err(SubmitError::QueueFull {
                retry_after: Duration::from_secs_f64(secs.clamp(1.0, 60.0)),
                waiting_requests: requests,
                waiting_tokens: queued,
            });
        }
        Ok(())
    }

    fn release(&self, tokens: usize) {
        let c = &self.shared.counters;
        c.queued_requests.fetch_sub(1, Ordering::SeqCst);
        c.queued_tokens.fetch_sub(tokens, Ordering::SeqCst);
    }

    /// A snapshot of queue, batch and KV figures (lock-free).
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let l = &self.shared.limits;
        Stats {
            waiting: c.waiting.load(Ordering::Relaxed),
            running: c.running.load(Ordering::Relaxed),
            queued_requests: c.queued_requests.load(Ordering::Relaxed),
            queued_tokens: c.queued_tokens.load(Ordering::Relaxed),
            kv_blocks_used: c.blocks_used.load(Ordering::Relaxed),
            kv_blocks_cached: c.blocks_cached.load(Ordering::Relaxed),
            kv_blocks_total: l.num_blocks,
            block_size: l.block_size,
            steps: c.steps.load(Ordering::Relaxed),
            preemptions: c.preemptions.load(Ordering::Relaxed),
            prefix_cache_queried_tokens: c.prefix_queried.load(Ordering::Relaxed),
            prefix_cache_hit_tokens: c.prefix_hit.load(Ordering::Relaxed),
            generated_tokens: c.generated.load(Ordering::Relaxed),
        }
    }

    /// The loop's heartbeat, for readiness checks.
    pub fn heartbeat(&self) -> Heartbeat {
        let s = &self.shared;
        let now = u64::try_from(s.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Heartbeat {
            alive: s.alive.load(Ordering::SeqCst),
            idle: s.idle.load(Ordering::Relaxed),
            since_last_beat: Duration::from_nanos(
                now.saturating_sub(s.last_beat_ns.load(Ordering::Relaxed)),
            ),
            steps: s.counters.steps.load(Ordering::Relaxed),
        }
    }

    /// True while the engine thread runs.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// True while submissions are accepted (not shutting down, thread alive).
    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::SeqCst)
    }

    /// The model's context window (prompt plus generation).
    pub fn max_context(&self) -> usize {
        self.shared.limits.max_context
    }

    /// Token ids a job may contain are below this: the model's rows, or the tokenizer's ids
    /// if fewer.
    pub fn vocab_size(&self) -> usize {
        self.shared.limits.vocab_size
    }

    /// Graceful shutdown: refuse new jobs from now on, let the jobs in flight finish, then
    /// stop the thread. Jobs still unfinished at `deadline` (if any) end with
    /// [`FinishReason::Cancelled`]. Returns at once; see [`stopped`](Self::stopped) and
    /// [`wait_stopped`](Self::wait_stopped).
    pub fn shutdown(&self, deadline: Option<Instant>) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        // A send error means the thread is already gone: nothing left to stop.
        let _ = self.tx.send(Command::Shutdown { deadline });
    }

    /// Resolves when the engine thread has stopped.
    pub async fn stopped(&self) {
        let mut rx = self.shared.stopped_tx.subscribe();
        // An error means the sender is gone, which only happens with the handle: stopped.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// Blocks until the engine thread has stopped or `timeout` passes; true if it stopped.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let Ok(guard) = self.shared.stopped.lock() else {
            return !self.is_alive();
        };
        match self
            .shared
            .stopped_cv
            .wait_timeout_while(guard, timeout, |stopped| !*stopped)
        {
            Ok((stopped, _)) => *stopped,
            Err(_) => !self.is_alive(),
        }
    }
}
