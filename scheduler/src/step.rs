//! Planning one step: which sequences run, with how many tokens each, within the limits.
//!
//! One rule, as in vLLM's V1 scheduler: each step gives each sequence the tokens that close
//! the gap between what it has computed and what it needs ([`Running::need`]). A decoding
//! sequence needs 1 token; a new one needs its prompt (less what the prefix cache supplies);
//! a preempted one needs everything it had, prompt and generated. A gap larger than the
//! step's remaining token budget is closed in chunks over several steps (chunked prefill),
//! without a separate "prefill phase".
//!
//! Order within a step:
//!
//! 1. Running sequences, oldest admission first, each get `min(need, budget)` tokens and the
//!    blocks to hold them. When blocks run out, the policy's victim among the sequences not
//!    yet scheduled this step (possibly the one being scheduled) is preempted: its blocks
//!    are freed and it goes back to the waiting queue, to be recomputed later (its full
//!    blocks stay in the prefix cache, so the recompute is often cheap).
//! 2. If nothing was preempted, waiting sequences are admitted in the policy's order while
//!    there is room in `max_num_seqs`, the token budget and the blocks. Admission stops at
//!    the first sequence that does not fit (no overtaking: a large request is not starved by
//!    a stream of small ones).
//!
//! In [`SchedulerKind::Static`] mode, step 2 happens only when nothing is running: a batch
//! of up to `max_num_seqs` is taken and runs to its end before the next batch starts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::blocks::BlockManager;
use crate::policy::{Candidate, Policy};
use crate::sequence::{Running, Sequence};
use crate::SchedulerKind;

/// The limits a plan must respect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepLimits {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub kind: SchedulerKind,
}

/// One row of the step: `len` tokens of `running[index]`, from its `computed` position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlannedRow {
    pub index: usize,
    pub len: usize,
}

/// What the planner decided (rows index the running list as it is after planning).
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub rows: Vec<PlannedRow>,
    pub preempted: usize,
    pub admitted: usize,
    /// Tokens looked up in the prefix cache at admission.
    pub prefix_queried: usize,
    /// Tokens found there.
    pub prefix_hit: usize,
}

/// The mutable state a plan works on.
pub(crate) struct Queues<'a> {
    pub running: &'a mut Vec<Running>,
    /// Sorted by arrival.
    pub waiting: &'a mut Vec<Sequence>,
    pub blocks: &'a mut BlockManager,
    /// Admission counter (for [`Running::admitted`]).
    pub admissions: &'a mut u64,
}

/// Plans one step; moves sequences between `waiting` and `running` as it admits and preempts.
pub(crate) fn plan(q: Queues<'_>, policy: &dyn Policy, limits: &StepLimits, now: Instant) -> Plan {
    let Queues {
        running,
        waiting,
        blocks,
        admissions,
    } = q;
    let mut plan = Plan::default();
    let mut budget = limits.max_batched_tokens;
    let was_idle = running.is_empty();

    // 1. Running sequences, oldest first.
    let mut i = 0;
    while i < running.len() && budget > 0 {
        let n = running[i].need().min(budget);
        let target = running[i].computed + n;
        let missing = blocks.blocks_missing(&running[i].table, target);
        let mut preempted_self = false;
        while missing > blocks.available() {
            let v = i + pick_victim(&running[i..], running, policy);
            preempt(running.remove(v), waiting, blocks);
            plan.preempted += 1;
            if v == i {
                preempted_self = true;
                break;
            }
        }
        if preempted_self {
            continue;
        }
        let r = &mut running[i];
        if blocks.ensure_capacity(&mut r.table, target).is_err() {
            // Cannot happen (room was made above); if it did, waiting is the safe answer.
            preempt(running.remove(i), waiting, blocks);
            plan.preempted += 1;
            continue;
        }
        plan.rows.push(PlannedRow { index: i, len: n });
        budget -= n;
        i += 1;
    }

    // 2. Admissions.
    let may_admit = match limits.kind {
        SchedulerKind::Continuous => plan.preempted == 0,
        SchedulerKind::Static => was_idle,
    };
    if !may_admit || waiting.is_empty() {
        return plan;
    }
    let mut counts = RunningCounts::default();
    for r in running.iter() {
        counts.add(&r.seq);
    }
    while running.len() < limits.max_num_seqs && !waiting.is_empty() {
        if budget == 0 && limits.kind == SchedulerKind::Continuous {
            break;
        }
        let Some(idx) = pick_next(waiting, &counts, policy) else {
            break;
        };
        let seq = &waiting[idx];
        let len = seq.tokens.len();
        let (mut table, hit) =
            blocks.lookup_prefix(&seq.tokens, seq.max_cached_prefix(), seq.cache_root);
        let n = (len - hit).min(budget);
        let missing = blocks.blocks_missing(&table, hit + n);
        if blocks.allocate(&mut table, missing).is_err() {
            blocks.free(table);
            break;
        }
        let mut seq = waiting.remove(idx);
        plan.prefix_queried += len;
        plan.prefix_hit += hit;
        if seq.first_admitted.is_none() {
            seq.first_admitted = Some(now);
            seq.cached_prompt_tokens = hit.min(seq.prompt_len);
        }
        counts.add(&seq);
        *admissions += 1;
        running.push(Running {
            seq,
            table,
            computed: hit,
            admitted: *admissions,
        });
        plan.admitted += 1;
        if n > 0 {
            plan.rows.push(PlannedRow {
                index: running.len() - 1,
                len: n,
            });
            budget -= n;
        }
    }
    plan
}

/// Running sequences per tenant, and per subtenant within each tenant, for the policy.
/// Lookups borrow the sequence's names; only a first insertion clones them.
#[derive(Default)]
struct RunningCounts {
    tenant: HashMap<Arc<str>, TenantCount>,
}

/// One tenant's running sequences, in all and per subtenant.
#[derive(Default)]
struct TenantCount {
    running: usize,
    subtenants: HashMap<Arc<str>, usize>,
}

impl RunningCounts {
    fn add(&mut self, s: &Sequence) {
        let t = self.tenant.entry(Arc::clone(&s.tenant)).or_default();
        t.running += 1;
        *t.subtenants.entry(Arc::clone(&s.subtenant)).or_default() += 1;
    }

    /// Running sequences of `s`'s tenant, and of its subtenant.
    fn of(&self, s: &Sequence) -> (usize, usize) {
        self.tenant.get(&*s.tenant).map_or((0, 0), |t| {
            (
                t.running,
                t.subtenants.get(&*s.subtenant).copied().unwrap_or(0),
            )
        })
    }
}

/// Index (in `waiting`) of the sequence the policy admits next.
fn pick_next(waiting: &[Sequence], counts: &RunningCounts, policy: &dyn Policy) -> Option<usize> {
    waiting
        .iter()
        .enumerate()
        .min_by_key(|(_, s)| {
            let (tenant_running, subtenant_running) = counts.of(s);
            policy.admit_key(&Candidate {
                tenant: &s.tenant,
                priority: s.priority,
                arrival: s.arrival,
                admitted: 0,
                tenant_running,
                subtenant_running,
            })
        })
        .map(|(i, _)| i)
}

/// Index (in `candidates`) of the sequence to preempt; `all` is the whole running set, for
/// the per-tenant counts.
fn pick_victim(candidates: &[Running], all: &[Running], policy: &dyn Policy) -> usize {
    let mut counts = RunningCounts::default();
    for r in all {
        counts.add(&r.seq);
    }
    candidates
        .iter()
        .enumerate()
        .max_by_key(|(_, r)| {
            let (tenant_running, subtenant_running) = counts.of(&r.seq);
            policy.victim_key(&Candidate {
                tenant: &r.seq.tenant,
                priority: r.seq.priority,
                arrival: r.seq.arrival,
                admitted: r.admitted,
                tenant_running,
                subtenant_running,
            })
        })
        .map_or(0, |(i, _)| i)
}

/// Frees a running sequence's blocks and puts it back in the waiting queue, in arrival order.
fn preempt(r: Running, waiting: &mut Vec<Sequence>, blocks: &mut BlockManager) {
    let Running { mut seq, table, .. } = r;
    blocks.free(table);
    seq.preemptions += 1;
    tracing::debug!(
        seq = seq.id,
        tokens = seq.tokens.len(),
        "preempted: blocks freed, will recompute"
    );
    let at = waiting.partition_point(|w| w.arrival < seq.arrival);
    waiting.insert(at, seq);
}
