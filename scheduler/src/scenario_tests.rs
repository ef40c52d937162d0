//! Scenario tests of the engine loop, step by step and without threads: batching, chunked
//! prefill, preemption, prefix caching, cancellation, deadlines, errors, fairness, static
//! batching, stop conditions. The fake model makes every output exactly predictable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gptj_engine::{SamplingParams, TokenLogprob};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::batcher::{Batcher, Counters, NewJob};
use crate::job::{FinishReason, JobEvent, JobRequest, LogprobsRequest, Usage};
use crate::policy::PolicyKind;
use crate::testing::{hash_rule, hash_rule_logprob, tokenizer, FakeModel};
use crate::{SchedulerConfig, SchedulerKind};
use gptj_engine::LogitRows;

pub(crate) struct Harness {
    pub b: Batcher<FakeModel>,
    next_id: u64,
}

impl Harness {
    pub fn new(model: FakeModel, config: SchedulerConfig) -> Self {
        config.validate().unwrap();
        Self {
            b: Batcher::new(model, &config, Arc::new(Counters::default())),
            next_id: 1,
        }
    }

    pub fn submit(&mut self, req: JobRequest) -> UnboundedReceiver<JobEvent> {
        let (tx, rx) = unbounded_channel();
        let queued_tokens = req.prompt_ids.len() + req.max_new_tokens;
        self.b.add(NewJob {
            id: self.next_id,
            request: req,
            events: tx,
            submitted: Instant::now(),
            queued_tokens,
        });
        self.next_id += 1;
        rx
    }

    /// Steps until idle; panics past `max_steps`. Checks the allocator after every step.
    pub fn run(&mut self, max_steps: usize) -> usize {
        let mut steps = 0;
        while self.b.has_work() {
            assert!(steps < max_steps, "not idle after {max_steps} steps");
            self.b.step();
            self.b.check_blocks().unwrap();
            steps += 1;
        }
        assert!(
            self.b.model().log().violations().is_empty(),
            "{:?}",
            self.b.model().log().violations()
        );
        steps
    }
}

/// Everything a finished stream said.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub tokens: Vec<u32>,
    pub text: String,
    pub reason: Option<FinishReason>,
    pub usage: Option<Usage>,
    /// Each token's log-probability, where asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
}

pub(crate) fn drain(rx: &mut UnboundedReceiver<JobEvent>) -> Outcome {
    let mut o = Outcome {
        tokens: vec![],
        text: String::new(),
        reason: None,
        usage: None,
        logprobs: vec![],
        prompt_logprobs: None,
    };
    while let Ok(ev) = rx.try_recv() {
        match ev {
            JobEvent::PromptLogprobs(lp) => {
                assert!(o.tokens.is_empty() && o.prompt_logprobs.is_none());
                o.prompt_logprobs = Some(lp);
            }
            JobEvent::Token { id, text, logprob } => {
                assert!(o.reason.is_none(), "token after Finished");
                o.tokens.push(id);
                o.text.push_str(&text);
                o.logprobs.extend(logprob);
            }
            JobEvent::Finished { reason, usage } => {
                assert!(o.reason.is_none(), "two Finished events");
                o.reason = Some(reason);
                o.usage = Some(usage);
            }
        }
    }
    o
}

/// What the hash rule generates after `prompt`, alone and greedily.
pub(crate) fn expected(prompt: &[u32], n: usize) -> Vec<u32> {
    let rule = hash_rule();
    let mut ctx = prompt.to_vec();
    for _ in 0..n {
        let next = rule(&ctx);
        ctx.push(next);
    }
    ctx[prompt.len()..].to_vec()
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 1000 + seed * 97 + i * 13).collect()
}

fn config(max_num_seqs: usize, max_batched_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_batched_tokens,
        ..SchedulerConfig::default()
    }
}

#[test]
fn one_job_generates_what_the_model_says() {
    let mut h = Harness::new(FakeModel::new(32, 4), config(8, 64));
    let p = prompt(1, 7);
    let mut rx = h.submit(JobRequest::new(p.clone(), 6));
    h.run(20);
    let o = drain(&mut rx);
    assert_eq!(o.tokens, expected(&p, 6));
    assert_eq!(o.reason, Some(FinishReason::Length));
    assert_eq!(o.text, tokenizer().decode(&o.tokens));
    let u = o.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.generated_tokens, u.cached_prompt_tokens),
        (7, 6, 0)
    );
    assert!(u.time_to_first_token.is_some());
    assert_eq!(h.b.usage().used, 0);
}

#[test]
fn concurrent_jobs_of_mixed_lengths_match_their_solo_outputs_and_free_the_pool() {
    let mut h = Harness::new(FakeModel::new(256, 4), config(16, 64));
    let jobs: Vec<(Vec<u32>, usize)> = (0..40)
        .map(|i| {
            (
                prompt(i, 1 + (i as usize * 7) % 30),
                1 + (i as usize * 5) % 17,
            )
        })
        .collect();
    let mut rxs: Vec<_> = jobs
        .iter()
        .map(|(p, n)| h.submit(JobRequest::new(p.clone(), *n)))
        .collect();
    h.run(500);
    for ((p, n), rx) in jobs.iter().zip(&mut rxs) {
        let o = drain(rx);
        assert_eq!(o.tokens, expected(p, *n));
        assert_eq!(o.reason, Some(FinishReason::Length));
    }
    assert_eq!(h.b.usage().used, 0);
    // The limits held at every step.
    for step in h.b.model().log().steps() {
        assert!(step.len() <= 16);
        assert!(step.iter().map(|r| r.tokens.len()).sum::<usize>() <= 64);
    }
}

#[test]
fn long_prompts_are_prefilled_in_chunks_at_the_right_positions() {
    let mut h = Harness::new(FakeModel::new(64, 4), config(4, 8));
    let p = prompt(3, 20);
    let mut rx = h.submit(JobRequest::new(p.clone(), 3));
    h.run(20);
    let rows: Vec<(usize, usize, bool)> =
        h.b.model()
            .log()
            .steps()
            .iter()
            .map(|s| {
                assert_eq!(s.len(), 1);
                (
                    s[0].start_pos,
                    s[0].tokens.len(),
                    s[0].logits == gptj_engine::LogitRows::Last,
                )
            })
            .collect();
    assert_eq!(
        rows,
        vec![
            (0, 8, false),
            (8, 8, false),
            (16, 4, true),
            (20, 1, true),
            (21, 1, true)
        ]
    );
    let steps = h.b.model().log().steps();
    assert_eq!(steps[1][0].tokens, p[8..16].to_vec());
    assert_eq!(drain(&mut rx).tokens, expected(&p, 3));
}

#[test]
fn decodes_go_first_and_a_prefill_takes_the_rest_of_the_budget() {
    let mut h = Harness::new(FakeModel::new(64, 4), config(4, 8));
    let a = prompt(1, 2);
    let mut rxa = h.submit(JobRequest::new(a.clone(), 10));
    h.b.step(); // a prefilled
    let b = prompt(2, 30);
    let mut rxb = h.submit(JobRequest::new(b.clone(), 2));
    h.b.step();
    let steps = h.b.model().log().steps();
    let last = steps.last().unwrap();
    assert_eq!(
        (last[0].start_pos, last[0].tokens.len()),
        (2, 1),
        "the decode row comes first"
    );
    assert_eq!(
        (last[1].start_pos, last[1].tokens.len()),
        (0, 7),
        "the prefill gets the 7 tokens left"
    );
    h.run(50);
    assert_eq!(drain(&mut rxa).tokens, expected(&a, 10));
    assert_eq!(drain(&mut rxb).tokens, expected(&b, 2));
}

#[test]
fn preemption_under_a_tiny_pool_changes_no_output() {
    // 10 blocks of 4 tokens; each job needs up to 8 blocks: they cannot all run at once.
    let cfg = SchedulerConfig {
        prefix_caching: false,
        ..config(6, 32)
    };
    let mut h = Harness::new(FakeModel::new(10, 4), cfg);
    let jobs: Vec<(Vec<u32>, usize)> = (0..6).map(|i| (prompt(i, 10), 20)).collect();
    let mut rxs: Vec<_> = jobs
        .iter()
        .map(|(p, n)| h.submit(JobRequest::new(p.clone(), *n)))
        .collect();
    h.run(1000);
    let mut preempted = 0;
    for ((p, n), rx) in jobs.iter().zip(&mut rxs) {
        let o = drain(rx);
        assert_eq!(o.tokens, expected(p, *n));
        preempted += o.usage.unwrap().preemptions;
    }
    assert!(preempted > 0, "the pool was meant to force preemption");
    assert_eq!(h.b.usage().used, 0);
    assert_eq!(h.b.usage().free, 10);
}

#[test]
fn preemption_with_prefix_caching_resumes_from_cached_blocks() {
    let mut h = Harness::new(FakeModel::new(12, 4), config(6, 32));
    let jobs: Vec<(Vec<u32>, usize)> = (0..6).map(|i| (prompt(i, 9), 24)).collect();
    let mut rxs: Vec<_> = jobs
        .iter()
        .map(|(p, n)| h.submit(JobRequest::new(p.clone(), *n)))
        .collect();
    h.run(1000);
    for ((p, n), rx) in jobs.iter().zip(&mut rxs) {
        assert_eq!(drain(rx).tokens, expected(p, *n));
    }
    assert_eq!(h.b.usage().used, 0);
}

#[test]
fn a_repeated_prompt_hits_the_prefix_cache_and_gives_the_same_output() {
    let mut h = Harness::new(FakeModel::new(64, 4), config(4, 64));
    let p = prompt(5, 18);
    let mut first = h.submit(JobRequest::new(p.clone(), 4));
    h.run(20);
    let before = h.b.model().log().num_steps();
    let mut second = h.submit(JobRequest::new(p.clone(), 4));
    h.run(20);
    let o1 = drain(&mut first);
    let o2 = drain(&mut second);
    assert_eq!(o1.tokens, o2.tokens);
    assert_eq!(o1.usage.unwrap().cached_prompt_tokens, 0);
    // 18 tokens = 4 full blocks (16 tokens) + 2; all 4 full blocks are reused.
    assert_eq!(o2.usage.unwrap().cached_prompt_tokens, 16);
    let steps = h.b.model().log().steps();
    let row = &steps[before][0];
    assert_eq!(
        (row.start_pos, row.tokens.len()),
        (16, 2),
        "only the uncached tail is prefilled"
    );
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_token() {
    let mut h = Harness::new(FakeModel::new(64, 4), config(4, 64));
    let p = prompt(6, 16);
    let mut a = h.submit(JobRequest::new(p.clone(), 2));
    h.run(20);
    let before = h.b.model().log().num_steps();
    let mut b = h.submit(JobRequest::new(p.clone(), 2));
    h.run(20);
    let steps = h.b.model().log().steps();
    assert_eq!(
        (steps[before][0].start_pos, steps[before][0].tokens.len()),
        (12, 4)
    );
    assert_eq!(drain(&mut a).tokens, drain(&mut b).tokens);
}

#[test]
fn concurrent_prompts_share_prefix_blocks() {
    let mut h = Harness::new(FakeModel::new(64, 4), config(4, 64));
    let shared = prompt(7, 12);
    let mut first = h.submit(JobRequest::new(shared.clone(), 30));
    h.b.step();
    let mut p2 = shared.clone();
    p2.extend([5, 6, 7]);
    let mut second = h.submit(JobRequest::new(p2.clone(), 3));
    h.b.step();
    let steps = h.b.model().log().steps();
    let rows = steps.last().unwrap();
    assert_eq!(
        rows[1].block_table[..3],
        rows[0].block_table[..3],
        "the 3 full prompt blocks are shared"
    );
    h.run(100);
    assert_eq!(drain(&mut first).tokens, expected(&shared, 30));
    let o = drain(&mut second);
    assert_eq!(o.tokens, expected(&p2, 3));
    assert_eq!(o.usage.unwrap().cached_prompt_tokens, 12);
}

#[test]
fn cancelling_a_queued_job_removes_it_before_it_runs() {
    let mut h = Harness::new(FakeModel::new(32, 4), config(4, 64));
    let rx = h.submit(JobRequest::new(prompt(1, 5), 5));
    drop(rx);
    let report = h.b.step();
    assert_eq!(report.finished, 1);
    assert!(!h.b.has_work());
    assert_eq!(h.b.model().log().num_steps(), 0, "the model never saw it");
}

#[test]
fn cancelling_a_running_job_frees_its_blocks_at_the_next_step() {
    let mut h = Harness::new(FakeModel::new(32, 4), config(4, 64));
    let rx = h.submit(JobRequest::new(prompt(1, 9), 50));
    let mut other = h.submit(JobRequest::new(prompt(2, 3), 5));
    h.b.step();
    h.b.step();
    assert!(h.b.usage().used >= 3);
    drop(rx);
    h.b.step();
    h.run(20);
    assert_eq!(h.b.usage().used, 0);
    assert_eq!(drain(&mut other).tokens, expected(&prompt(2, 3), 5));
}

#[test]
fn deadlines_time_out_queued_and_running_jobs() {
    let mut h = Harness::new(FakeModel::new(32, 4), config(4, 64));
    let mut queued = JobRequest::new(prompt(1, 4), 5);
    queued.deadline = Some(Instant::now());
    let mut rx_q = h.submit(queued);
    let mut running = JobRequest::new(prompt(2, 4), 500);
    running.deadline = Some(Instant::now() + Duration::from_millis(30));
    let mut rx_r = h.submit(running);
    h.b.step();
    let q = drain(&mut rx_q);
    assert_eq!((q.tokens.len(), q.reason), (0, Some(FinishReason::Timeout)));
    std::thread::sleep(Duration::from_millis(35));
    h.run(5);
    let r = drain(&mut rx_r);
    assert_eq!(r.reason, Some(FinishReason::Timeout));
    assert!(!r.tokens.is_empty() && r.tokens.len() < 500);
    assert_eq!(h.b.usage().used, 0);
}

#[test]
fn an_engine_error_fails_only_the_affected_sequence() {
    const POISON: u32 = 31337;
    let mut h = Harness::new(FakeModel::new(64, 4).with_poison(POISON), config(8, 64));
    let good: Vec<Vec<u32>> = (0..4).map(|i| prompt(i, 6)).collect();
    let mut rxs: Vec<_> = good
        .iter()
        .map(|p| h.submit(JobRequest::new(p.clone(), 5)))
        .collect();
    let mut bad = prompt(9, 6);
    bad[3] = POISON;
    let mut rx_bad = h.submit(JobRequest::new(bad, 5));
    h.run(50);
    let o = drain(&mut rx_bad);
    assert!(
        matches!(&o.reason, Some(FinishReason::Error(m)) if m.contains("poisoned")),
        "{o:?}"
    );
    for (p, rx) in good.iter().zip(&mut rxs) {
        assert_eq!(drain(rx).tokens, expected(p, 5));
    }
    assert_eq!(h.b.usage().used, 0);
}

#[test]
fn fair_share_serves_a_lone_tenant_within_a_bounded_number_of_steps() {
    let steps_until_b = |policy: PolicyKind| {
        let cfg = SchedulerConfig {
            policy,
            max_waiting_requests: 2000,
            ..config(8, 64)
        };
        let mut h = Harness::new(FakeModel::new(512, 4), cfg);
        let mut burst = Vec::new();
        for i in 0..1000 {
            let mut j = JobRequest::new(prompt(i, 4), 4);
            j.tenant = Some("a".into());
            burst.push(h.submit(j));
        }
        for _ in 0..3 {
            h.b.step();
        }
        let mut j = JobRequest::new(prompt(5000, 4), 4);
        j.tenant = Some("b".into());
        let mut rx = h.submit(j);
        for step in 1..=1000 {
            h.b.step();
            if let Ok(JobEvent::Token { .. }) = rx.try_recv() {
                return step;
            }
        }
        panic!("tenant b never got a token");
    };
    let fair = steps_until_b(PolicyKind::FairShare);
    // A slot frees within 4 steps (every burst job generates 4 tokens); then b goes first.
    assert!(fair <= 6, "fair share: b waited {fair} steps");
    let fcfs = steps_until_b(PolicyKind::Fcfs);
    assert!(
        fcfs > 100,
        "fcfs should make b wait behind the burst, waited {fcfs}"
    );
}

#[test]
fn priority_policy_admits_urgent_jobs_first() {
    let cfg = SchedulerConfig {
        policy: PolicyKind::Priority,
        ..config(1, 64)
    };
    let mut h = Harness::new(FakeModel::new(64, 4), cfg);
    let mut low = JobRequest::new(prompt(1, 4), 2);
    low.priority = -1;
    let mut high = JobRequest::new(prompt(2, 4), 2);
    high.priority = 5;
    let mut rx_low = h.submit(low);
    let mut rx_high = h.submit(high);
    h.b.step();
    assert!(rx_high.try_recv().is_ok());
    assert!(rx_low.try_recv().is_err());
    h.run(20);
    assert_eq!(drain(&mut rx_low).tokens.len(), 2);
}

#[test]
fn static_batching_admits_only_when_the_batch_is_done() {
    let cfg = SchedulerConfig {
        kind: SchedulerKind::Static,
        ..config(2, 64)
    };
    let mut h = Harness::new(FakeModel::new(64, 4), cfg);
    let lens = [2usize, 6, 3, 3, 5];
    let mut rxs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| h.submit(JobRequest::new(prompt(i as u32, 3), n)))
        .collect();
    let mut before: Vec<u64> = Vec::new();
    while h.b.has_work() {
        h.b.step();
        let now = h.b.running_ids();
        let joined = now.iter().any(|id| !before.contains(id));
        assert!(
            !joined || before.is_empty(),
            "joined mid-batch: {now:?} after {before:?}"
        );
        before = now;
    }
    // Jobs 1-2 together (6 steps, the 2-token job idles its slot), then 3-4, then 5.
    let steps = h.b.model().log().num_steps();
    assert_eq!(steps, 6 + 3 + 5);
    for ((i, &n), rx) in lens.iter().enumerate().zip(&mut rxs) {
        assert_eq!(drain(rx).tokens, expected(&prompt(i as u32, 3), n));
    }
}

#[test]
fn continuous_batching_refills_the_slot_at_once() {
    let mut h = Harness::new(FakeModel::new(64, 4), config(2, 64));
    let lens = [2usize, 6, 3, 3, 5];
    let mut rxs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| h.submit(JobRequest::new(prompt(i as u32, 3), n)))
        .collect();
    h.run(50);
    // A freed slot is refilled at the next step: 11 steps (static batching takes 14).
    assert_eq!(h.b.model().log().num_steps(), 11);
    for ((i, &n), rx) in lens.iter().enumerate().zip(&mut rxs) {
        assert_eq!(drain(rx).tokens, expected(&prompt(i as u32, 3), n));
    }
}

#[test]
fn eos_stops_unless_min_new_tokens_says_otherwise() {
    let eos = tokenizer().eos_token_id();
    // Emits EOS whenever the context has an even length.
    let rule = move |ctx: &[u32]| {
        if ctx.len().is_multiple_of(2) {
            eos
        } else {
            262
        }
    };
    let mut h = Harness::new(FakeModel::new(64, 4).with_rule(rule), config(4, 64));
    let mut a = h.submit(JobRequest::new(vec![40, 41], 10));
    let mut with_min = JobRequest::new(vec![40, 41], 10);
    with_min.params = SamplingParams {
        min_new_tokens: 3,
        ..SamplingParams::default()
    };
    let mut b = h.submit(with_min);
    h.run(20);
    let oa = drain(&mut a);
    assert_eq!(
        (oa.tokens, oa.reason),
        (vec![eos], Some(FinishReason::Stop))
    );
    let ob = drain(&mut b);
    // EOS is banned for 3 tokens: where the rule says EOS the runner-up (all at -10, so the
    // lowest id, 0) is taken instead; the first EOS after that ends it.
    assert_eq!(ob.tokens, vec![0, 262, 0, 262, eos]);
    assert_eq!(ob.reason, Some(FinishReason::Stop));
}

#[test]
fn stop_strings_end_the_job_without_their_text() {
    let script = tokenizer()
        .encode(" The answer is 42.\n\nQuestion: what")
        .unwrap();
    let prompt_ids = tokenizer().encode("Q: why?\nA:").unwrap();
    let plen = prompt_ids.len();
    let s = script.clone();
    let rule = move |ctx: &[u32]| s.get(ctx.len() - plen).copied().unwrap_or(13);
    let mut h = Harness::new(FakeModel::new(64, 4).with_rule(rule), config(4, 64));
    let mut job = JobRequest::new(prompt_ids.clone(), 30);
    job.stop = vec!["\n\nQuestion:".into()];
    let mut rx = h.submit(job);
    let mut plain = h.submit(JobRequest::new(prompt_ids, script.len()));
    h.run(50);
    let o = drain(&mut rx);
    assert_eq!(o.text, " The answer is 42.");
    assert_eq!(
        o.reason,
        Some(FinishReason::StopSequence("\n\nQuestion:".into()))
    );
    assert!(o.tokens.len() < script.len());
    let p = drain(&mut plain);
    assert_eq!(p.text, " The answer is 42.\n\nQuestion: what");
    assert_eq!(p.reason, Some(FinishReason::Length));
}

#[test]
fn sampling_is_reproducible_whatever_shares_the_batch() {
    // A rule that leaves a real choice: the fake gives the runner-up ties, so sample among
    // many tokens by making every logit equal except none (flat distribution).
    let flat = FakeModel::new(64, 4).with_vocab(50400).with_rule(|_| 0);
    let params = SamplingParams {
        do_sample: true,
        temperature: 50.0,
        seed: 7,
        ..SamplingParams::default()
    };
    let run_with = |others: usize, model: FakeModel| {
        let mut h = Harness::new(model, config(8, 64));
        let mut others_rx: Vec<_> = (0..others)
            .map(|i| {
                let mut j = JobRequest::new(prompt(i as u32, 5), 12);
                j.params = SamplingParams {
                    seed: 100 + i as u64,
                    ..params.clone()
                };
                h.submit(j)
            })
            .collect();
        let mut j = JobRequest::new(prompt(42, 5), 12);
        j.params = params.clone();
        let mut rx = h.submit(j);
        h.run(100);
        for rx in &mut others_rx {
            drain(rx);
        }
        drain(&mut rx).tokens
    };
    let alone = run_with(0, flat);
    let crowded = run_with(5, FakeModel::new(64, 4).with_vocab(50400).with_rule(|_| 0));
    assert_eq!(alone, crowded);
    assert!(
        alone.iter().any(|&t| t != 0),
        "temperature 50 should wander off the argmax"
    );
}

fn with_logprobs(prompt: Vec<u32>, n: usize, top: usize) -> JobRequest {
    JobRequest {
        logprobs: Some(LogprobsRequest { top, prompt: true }),
        ..JobRequest::new(prompt, n)
    }
}

/// Checks prompt and generated log-probabilities of `o` against the fake model's rule.
fn check_logprobs(p: &[u32], o: &Outcome, top: usize) {
    let all: Vec<u32> = p.iter().chain(&o.tokens).copied().collect();
    let prompt = o.prompt_logprobs.as_ref().expect("prompt logprobs");
    assert_eq!(prompt.len(), p.len() - 1);
    assert_eq!(o.logprobs.len(), o.tokens.len());
    for (t, lp) in prompt.iter().chain(&o.logprobs).enumerate() {
        let (ctx, token) = (&all[..=t], all[t + 1]);
        assert_eq!(lp.id, token, "position {t}");
        let want = hash_rule_logprob(ctx, token) as f32;
        assert!(
            (lp.logprob - want).abs() < 1e-6,
            "position {t}: {} vs {want}",
            lp.logprob
        );
        assert_eq!(lp.top.len(), top);
        assert_eq!(lp.top[0].0, hash_rule()(ctx), "position {t}: most likely");
    }
}

#[test]
fn prompt_logprobs_cover_every_chunk_and_bypass_the_prefix_cache() {
    // 20-token prompt, 8-token budget: three prefill chunks, all with every position's logits.
    let mut h = Harness::new(FakeModel::new(64, 4), config(4, 8));
    let mut p = prompt(3, 12);
    // Some prompt tokens follow the rule (log-probability near 0), the others do not.
    p.extend(expected(&p, 8));
    let mut rx = h.submit(with_logprobs(p.clone(), 3, 2));
    h.run(20);
    let o = drain(&mut rx);
    assert_eq!(o.tokens, expected(&p, 3));
    check_logprobs(&p, &o, 2);
    let lp = o.prompt_logprobs.as_ref().unwrap();
    assert!(lp[11..].iter().all(|l| l.logprob > -1e-3), "{lp:?}");
    assert!(lp[..11].iter().all(|l| l.logprob < -19.0), "{lp:?}");
    let rows: Vec<(usize, usize, LogitRows)> = h.b.model().log().steps()[..3]
        .iter()
        .map(|s| (s[0].start_pos, s[0].tokens.len(), s[0].logits))
        .collect();
    assert_eq!(
        rows,
        [
            (0, 8, LogitRows::All),
            (8, 8, LogitRows::All),
            (16, 4, LogitRows::All)
        ]
    );
    // The same prompt again: its blocks are cached, but the prompt's logits are needed, so it
    // is computed again and reports the same values; without logprobs it takes the cache.
    let mut again = h.submit(with_logprobs(p.clone(), 3, 2));
    h.run(20);
    let o2 = drain(&mut again);
    assert_eq!(o2.prompt_logprobs, o.prompt_logprobs);
    assert_eq!(o2.logprobs, o.logprobs);
    assert_eq!(o2.usage.unwrap().cached_prompt_tokens, 0);
    let mut plain = h.submit(JobRequest::new(p.clone(), 3));
    h.run(20);
    let o3 = drain(&mut plain);
    assert_eq!(o3.usage.unwrap().cached_prompt_tokens, 16);
    assert!(o3.prompt_logprobs.is_none() && o3.logprobs.is_empty());
}

#[test]
fn logprobs_survive_preemption_and_batching() {
    // The tiny pool of the preemption test, every job asking for log-probabilities.
    let mut h = Harness::new(FakeModel::new(10, 4), config(6, 32));
    let jobs: Vec<Vec<u32>> = (0..6).map(|i| prompt(i, 10)).collect();
    let mut rxs: Vec<_> = jobs
        .iter()
        .map(|p| h.submit(with_logprobs(p.clone(), 20, 1)))
        .collect();
    h.run(1000);
    let mut preempted = 0;
    for (p, rx) in jobs.iter().zip(&mut rxs) {
        let o = drain(rx);
        assert_eq!(o.tokens, expected(p, 20));
        check_logprobs(p, &o, 1);
        preempted += o.usage.unwrap().preemptions;
    }
    assert!(preempted > 0, "the pool was meant to force preemption");
    assert_eq!(h.b.usage().used, 0);
}
