//! The engine loop's state and one iteration of it, as a plain synchronous struct.
//!
//! [`Batcher::step`] is one iteration: drop the jobs whose client left or whose deadline
//! passed, plan the step ([`crate::step`]), run the model, sample a token for every row that
//! finished its gap, stream the tokens, finish the sequences that are done and give their
//! blocks back. The [`driver`](crate::driver) runs it on the engine thread; tests run it
//! directly, step by step, with no thread at all.
//!
//! An error in the forward pass fails only the sequences it concerns: the batch is re-run
//! row by row, the rows that fail alone finish with [`FinishReason::Error`], and the others
//! carry on as if nothing happened (a row's KV writes are the same whether it runs alone or
//! in a batch, so re-running is safe).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use gptj_engine::{EngineError, LogitRows, Logits, Sampler, SeqChunk};
use tokio::sync::mpsc::UnboundedSender;

use crate::blocks::BlockManager;
#[cfg(test)]
use crate::blocks::BlockUsage;
use crate::job::{FinishReason, JobEvent, JobRequest};
use crate::metrics as m;
use crate::model::Model;
use crate::policy::Policy;
use crate::sequence::{Running, Sequence};
use crate::step::{self, PlannedRow, Queues, StepLimits};
use crate::stop::{Pushed, TextOutput};
use crate::SchedulerConfig;

/// Figures shared between the engine loop (which writes them) and the handles (which read
/// them without a lock).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Jobs submitted and not yet admitted (the bounded queue).
    pub queued_requests: AtomicUsize,
    /// Their tokens (prompt + max new).
    pub queued_tokens: AtomicUsize,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub blocks_used: AtomicUsize,
    pub blocks_cached: AtomicUsize,
    pub steps: AtomicU64,
    pub preemptions: AtomicU64,
    pub prefix_queried: AtomicU64,
    pub prefix_hit: AtomicU64,
    pub generated: AtomicU64,
    /// Recent throughput in tokens per second (f64 bits), for `retry_after`.
    pub tokens_per_sec: AtomicU64,
}

/// A job on its way to the engine loop.
#[derive(Debug)]
pub(crate) struct NewJob {
    pub id: u64,
    pub request: JobRequest,
    pub events: UnboundedSender<JobEvent>,
    pub submitted: Instant,
    /// Tokens it counts for in the queue limits.
    pub queued_tokens: usize,
}

/// What one step did (for the driver and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct StepReport {
    /// Rows in the forward pass.
    pub rows: usize,
    /// Tokens computed.
    pub tokens: usize,
    /// Sequences preempted.
    pub preempted: usize,
    /// Sequences that finished (any reason, reaped ones included).
    pub finished: usize,
}

/// The loop's state: the model, the KV block allocator, the waiting and running sequences.
pub(crate) struct Batcher<M: Model> {
    model: M,
    blocks: BlockManager,
    policy: Box<dyn Policy>,
    limits: StepLimits,
    running: Vec<Running>,
    /// Sorted by arrival.
    waiting: Vec<Sequence>,
    admissions: u64,
    next_arrival: u64,
    counters: Arc<Counters>,
    eos_token_id: u32,
    allowed_vocab: usize,
}

/// The logits of one step: one call for the whole batch, or one call per row after the
/// batch failed.
enum StepLogits {
    Batch(Logits),
    PerRow(Vec<Result<Logits, String>>),
}

impl<M: Model> Batcher<M> {
    /// A loop over `model` with `config` (already validated).
    pub fn new(model: M, config: &SchedulerConfig, counters: Arc<Counters>) -> Self {
        let blocks = BlockManager::new(
            model.num_kv_blocks(),
            model.block_size(),
            config.prefix_caching,
        );
        let tokenizer = model.tokenizer();
        let (eos_token_id, allowed_vocab) = (tokenizer.eos_token_id(), tokenizer.base_vocab_size());
        metrics::gauge!(m::KV_CACHE_BLOCKS).set(blocks.num_blocks() as f64);
        Self {
            model,
            blocks,
            policy: config.policy.build(),
            limits: StepLimits {
                max_num_seqs: config.max_num_seqs,
                max_batched_tokens: config.max_batched_tokens,
                kind: config.kind,
            },
            running: Vec::new(),
            waiting: Vec::new(),
            admissions: 0,
            next_arrival: 0,
            counters,
            eos_token_id,
            allowed_vocab,
        }
    }

    /// Queues a job (already validated by the handle).
    pub fn add(&mut self, job: NewJob) {
        let NewJob {
            id,
            request,
            events,
            submitted,
            queued_tokens,
        } = job;
        let tokenizer = self.model.tokenizer();
        let output = TextOutput::new(tokenizer.decoder(), request.stop);
        let sampler = Sampler::new(&request.params, self.eos_token_id, self.allowed_vocab)
            .with_stop_token_ids(&request.stop_token_ids)
            .with_penalties(&request.penalties);
        let prompt_len = request.prompt_ids.len();
        let seq = Sequence {
            id,
            arrival: self.next_arrival,
            tenant: Arc::from(request.tenant.as_deref().unwrap_or("")),
            subtenant: Arc::from(request.subtenant.as_deref().unwrap_or("")),
            cache_root: crate::blocks::scope_root(request.cache_salt.as_deref()),
            priority: request.priority,
            deadline: request.deadline,
            tokens: request.prompt_ids,
            prompt_len,
            max_new_tokens: request.max_new_tokens,
            stop_token_ids: request.stop_token_ids,
            sampler,
            output,
            events,
            submitted,
            first_admitted: None,
            first_token: None,
            last_token: None,
            cached_prompt_tokens: 0,
            preemptions: 0,
            queued_tokens: Some(queued_tokens),
            logprobs: request.logprobs,
            prompt_logprobs: request
                .logprobs
                .filter(|l| l.prompt)
                .map(|_| Vec::with_capacity(prompt_len - 1)),
        };
        self.next_arrival += 1;
        self.waiting.push(seq);
        self.publish();
    }

    /// True while any job is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Block usage now.
    #[cfg(test)]
    pub fn usage(&self) -> BlockUsage {
        self.blocks.usage()
    }

    /// The model (tests read the fake model's log through it).
    #[cfg(test)]
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Ids of the running sequences, in admission order.
    #[cfg(test)]
    pub fn running_ids(&self) -> Vec<u64> {
        self.running.iter().map(|r| r.seq.id).collect()
    }

    /// Checks the block allocator against the tables of the running sequences.
    #[cfg(test)]
    pub fn check_blocks(&self) -> Result<(), String> {
        let mut holders = vec![0u32; self.blocks.num_blocks()];
        for r in &self.running {
            let mut seen = std::collections::HashSet::new();
            for b in r.table.blocks() {
                if !seen.insert(b.0) {
                    return Err(format!("sequence {} holds block {} twice", r.seq.id, b.0));
                }
                holders[b.0 as usize] += 1;
            }
            if r.table.len() < self.blocks.blocks_for(r.computed) {
                return Err(format!(
                    "sequence {} computed {} tokens in {} blocks",
                    r.seq.id,
                    r.computed,
                    r.table.len()
                ));
            }
        }
        self.blocks.check(Some(&holders))
    }

    /// One iteration. Does nothing (and costs nothing) when there is no work.
    pub fn step(&mut self) -> StepReport {
        let started = Instant::now();
        let mut report = StepReport {
            finished: self.reap(started),
            ..StepReport::default()
        };
        if !self.has_work() {
            self.publish();
            return report;
        }

        let plan = step::plan(
            Queues {
                running: &mut self.running,
                waiting: &mut self.waiting,
                blocks: &mut self.blocks,
                admissions: &mut self.admissions,
            },
            self.policy.as_ref(),
            &self.limits,
            started,
        );
        report.preempted = plan.preempted;
        report.rows = plan.rows.len();
        report.tokens = plan.rows.iter().map(|r| r.len).sum();
        self.account_admissions(plan.admitted, started);
        if plan.preempted > 0 {
            metrics::counter!(m::NUM_PREEMPTIONS).increment(plan.preempted as u64);
            self.counters
                .preemptions
                .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        }
        if plan.prefix_queried > 0 {
            metrics::counter!(m::PREFIX_CACHE_QUERIES).increment(plan.prefix_queried as u64);
            metrics::counter!(m::PREFIX_CACHE_HITS).increment(plan.prefix_hit as u64);
            self.counters
                .prefix_queried
                .fetch_add(plan.prefix_queried as u64, Ordering::Relaxed);
            self.counters
                .prefix_hit
                .fetch_add(plan.prefix_hit as u64, Ordering::Relaxed);
        }

        if !plan.rows.is_empty() {
            let logits = self.forward(&plan.rows);
            report.finished += self.apply(&plan.rows, logits);
        }

        let elapsed = started.elapsed().as_secs_f64();
        metrics::histogram!(m::STEP_DURATION).record(elapsed);
        metrics::histogram!(m::ITERATION_TOKENS).record(report.tokens as f64);
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        if elapsed > 0.0 && report.tokens > 0 {
            let now = report.tokens as f64 / elapsed;
            let old = f64::from_bits(self.counters.tokens_per_sec.load(Ordering::Relaxed));
            let ema = if old > 0.0 {
                0.9 * old + 0.1 * now
            } else {
                now
            };
            self.counters
                .tokens_per_sec
                .store(ema.to_bits(), Ordering::Relaxed);
        }
        self.publish();
        report
    }

    /// Ends every job with `reason` (shutdown past its deadline) and frees all blocks.
    pub fn abort_all(&mut self, reason: FinishReason) {
        let now = Instant::now();
        for r in std::mem::take(&mut self.running) {
            self.finish_running(r, reason.clone(), now);
        }
        for seq in std::mem::take(&mut self.waiting) {
            self.finish(seq, reason.clone(), now);
        }
        self.publish();
    }

    /// Removes the jobs whose client left (cancelled) or whose deadline passed (timeout),
    /// waiting or running. Returns how many.
    fn reap(&mut self, now: Instant) -> usize {
        let verdict = |seq: &Sequence| {
            if seq.is_abandoned() {
                Some(FinishReason::Cancelled)
            } else if seq.deadline.is_some_and(|d| now >= d) {
                Some(FinishReason::Timeout)
            } else {
                None
            }
        };
        let mut n = 0;
        let mut i = 0;
        while i < self.waiting.len() {
            match verdict(&self.waiting[i]) {
                Some(reason) => {
                    let seq = self.waiting.remove(i);
                    self.finish(seq, reason, now);
                    n += 1;
                }
                None => i += 1,
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            match verdict(&self.running[i].seq) {
                Some(reason) => {
                    let r = self.running.remove(i);
                    self.finish_running(r, reason, now);
                    n += 1;
                }
                None => i += 1,
            }
        }
        n
    }

    /// The newly admitted sequences are the last `admitted` of the running list: they leave
    /// the bounded queue's accounting on their first admission.
    fn account_admissions(&mut self, admitted: usize, now: Instant) {
        let start = self.running.len().saturating_sub(admitted);
        for r in &mut self.running[start..] {
            if let Some(tokens) = r.seq.queued_tokens.take() {
                self.counters
                    .queued_requests
                    .fetch_sub(1, Ordering::Relaxed);
                self.counters
                    .queued_tokens
                    .fetch_sub(tokens, Ordering::Relaxed);
                metrics::counter!(m::PROMPT_TOKENS).increment(r.seq.prompt_len as u64);
                metrics::histogram!(m::REQUEST_QUEUE_TIME)
                    .record(now.saturating_duration_since(r.seq.submitted).as_secs_f64());
            }
        }
    }

    /// Runs the model on the planned rows. A failed (or panicking) batch is re-run row by
    /// row so only the failing rows fail.
    fn forward(&mut self, plan: &[PlannedRow]) -> StepLogits {
        let rows: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|p| {
                let r = &self.running[p.index];
                SeqChunk {
                    tokens: &r.seq.tokens[r.computed..r.computed + p.len],
                    start_pos: r.computed,
                    block_table: r.table.blocks(),
                    logits: r.logit_rows(p.len),
                }
            })
            .collect();
        let count = |row: &SeqChunk<'_>| row.logits.count(row.tokens.len());
        let wanted = rows.iter().map(count).sum();
        let model = &mut self.model;
        let mut run = |rows: &[SeqChunk<'_>], wanted: usize| -> Result<Logits, String> {
            match catch_unwind(AssertUnwindSafe(|| model.forward(rows))) {
                Ok(Ok(logits)) if logits.len() == wanted => Ok(logits),
                Ok(Ok(logits)) => Err(format!(
                    "engine returned {} logit rows for {wanted} sequences",
                    logits.len()
                )),
                Ok(Err(e)) => Err(engine_error(&e)),
                Err(_) => Err("the engine panicked during this step".to_string()),
            }
        };
        match run(&rows, wanted) {
            Ok(logits) => StepLogits::Batch(logits),
            Err(e) if rows.len() == 1 => StepLogits::PerRow(vec![Err(e)]),
            Err(e) => {
                tracing::warn!(error = %e, rows = rows.len(), "step failed; re-running its rows one by one");
                StepLogits::PerRow(
                    rows.iter()
                        .map(|row| run(std::slice::from_ref(row), count(row)))
                        .collect(),
                )
            }
        }
    }

    /// Applies a step's results: advances computed counts, samples, streams, finishes.
    /// Returns the number of sequences finished.
    fn apply(&mut self, plan: &[PlannedRow], logits: StepLogits) -> usize {
        let now = Instant::now();
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        let mut next_batch_row = 0;
        for (k, p) in plan.iter().enumerate() {
            let kind = self.running[p.index].logit_rows(p.len);
            let count = kind.count(p.len);
            // This row's logits: `count` rows of `rows` from `first`.
            let (rows, first) = match &logits {
                StepLogits::Batch(l) => {
                    next_batch_row += count;
                    (l, next_batch_row - count)
                }
                StepLogits::PerRow(results) => match &results[k] {
                    Ok(l) => (l, 0),
                    Err(e) => {
                        done.push((p.index, FinishReason::Error(e.clone())));
                        continue;
                    }
                },
            };
            let r = &mut self.running[p.index];
            if kind == LogitRows::All {
                for i in 0..count {
                    r.seq
                        .record_prompt_logits(r.computed + i, rows.row(first + i));
                }
            }
            r.computed += p.len;
            self.blocks
                .register_computed(&mut r.table, &r.seq.tokens, r.computed);
            if r.computed == r.seq.tokens.len() && count > 0 {
                let row = rows.row(first + count - 1);
                if let Some(reason) = emit_token(&mut r.seq, row, self.eos_token_id, now) {
                    done.push((p.index, reason));
                }
                self.counters.generated.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::GENERATION_TOKENS).increment(1);
            }
        }
        // Remove from the back so the indices stay valid.
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        let finished = done.len();
        for (index, reason) in done {
            let r = self.running.remove(index);
            self.finish_running(r, reason, now);
        }
        finished
    }

    fn finish_running(&mut self, r: Running, reason: FinishReason, now: Instant) {
        let Running { seq, table, .. } = r;
        self.blocks.free(table);
        self.finish(seq, reason, now);
    }

    /// The one place a job ends: queue accounting, metrics, the `Finished` event.
    fn finish(&mut self, seq: Sequence, reason: FinishReason, now: Instant) {
        if let Some(tokens) = seq.queued_tokens {
            self.counters
                .queued_requests
                .fetch_sub(1, Ordering::Relaxed);
            self.counters
                .queued_tokens
                .fetch_sub(tokens, Ordering::Relaxed);
        }
        let usage = seq.usage(now);
        metrics::counter!(m::REQUEST_SUCCESS, "finished_reason" => reason.as_str()).increment(1);
        metrics::histogram!(m::E2E_REQUEST_LATENCY).record(usage.total_time.as_secs_f64());
        tracing::debug!(
            seq = seq.id,
            state = ?seq.state(),
            reason = reason.as_str(),
            prompt = usage.prompt_tokens,
            generated = usage.generated_tokens,
            "job finished"
        );
        // A closed stream just means the client left first.
        let _ = seq.events.send(JobEvent::Finished { reason, usage });
    }

    /// Publishes the gauges and the handle-visible figures.
    fn publish(&self) {
        let u = self.blocks.usage();
        let c = &self.counters;
        c.waiting.store(self.waiting.len(), Ordering::Relaxed);
        c.running.store(self.running.len(), Ordering::Relaxed);
        c.blocks_used.store(u.used, Ordering::Relaxed);
        c.blocks_cached.store(u.cached, Ordering::Relaxed);
        metrics::gauge!(m::NUM_REQUESTS_WAITING).set(self.waiting.len() as f64);
        metrics::gauge!(m::NUM_REQUESTS_RUNNING).set(self.running.len() as f64);
        metrics::gauge!(m::KV_CACHE_BLOCKS_USED).set(u.used as f64);
        if u.total > 0 {
            metrics::gauge!(m::KV_CACHE_USAGE_PERC).set(u.used as f64 / u.total as f64);
        }
    }
}

impl<M: Model> Drop for Batcher<M> {
    /// Blocks go back on every path, even when the loop is dropped with work left.
    fn drop(&mut self) {
        for r in std::mem::take(&mut self.running) {
            self.blocks.free(r.table);
        }
    }
}

/// Samples the next token of `seq` from `logits`, streams it, and says why the sequence is
/// done, if it is. When it is, the token's text carries everything held back.
fn emit_token(seq: &mut Sequence, logits: &[f32], eos: u32, now: Instant) -> Option<FinishReason> {
    let id = seq.sampler.sample(logits, &seq.tokens, seq.generated());
    if let Some(prompt) = seq.prompt_logprobs.take() {
        let _ = seq.events.send(JobEvent::PromptLogprobs(prompt));
    }
    let logprob = seq
        .logprobs
        .map(|l| gptj_engine::token_logprob(logits, id, l.top));
    seq.tokens.push(id);
    match seq.last_token.replace(now) {
        Some(prev) => {
            metrics::histogram!(m::INTER_TOKEN_LATENCY).record((now - prev).as_secs_f64())
        }
        None => {
            seq.first_token = Some(now);
            metrics::histogram!(m::TIME_TO_FIRST_TOKEN)
                .record(now.saturating_duration_since(seq.submitted).as_secs_f64());
        }
    }
    if seq.stop_token_ids.contains(&id) {
        // Like end-of-text: the sequence ends here and the token's own text is not emitted.
        let text = seq.output.finish();
        let _ = seq.events.send(JobEvent::Token { id, text, logprob });
        return Some(FinishReason::Stop);
    }
    let (mut text, mut reason) = match seq.output.push(id) {
        Pushed::Text(text) => (text, None),
        Pushed::Stopped { text, stop } => (text, Some(FinishReason::StopSequence(stop))),
    };
    if reason.is_none() {
        if id == eos {
            reason = Some(FinishReason::Stop);
        } else if seq.generated() >= seq.max_new_tokens {
            reason = Some(FinishReason::Length);
        }
        if reason.is_some() {
            text.push_str(&seq.output.finish());
        }
    }
    let _ = seq.events.send(JobEvent::Token { id, text, logprob });
    reason
}

fn engine_error(e: &EngineError) -> String {
    format!("engine error: {e}")
}
