//! The scheduler over the real engine (`builtin:tiny`, random weights, CPU): batching,
//! preemption and prefix caching change no greedy output, and the pool ends up free.

use std::time::{Duration, Instant};

use gptj_engine::{Engine, EngineOptions};
use gptj_scheduler::{
    spawn, FinishReason, JobEvent, JobRequest, JobStream, SchedulerConfig, SchedulerHandle, Stats,
};

const WAIT: Duration = Duration::from_secs(120);

fn tiny(kv_bytes: u64) -> Engine {
    let opts = EngineOptions {
        kv_cache_memory: Some(kv_bytes),
        ..Default::default()
    };
    Engine::load(&"builtin:tiny".parse().unwrap(), &opts).unwrap()
}

fn collect(mut s: JobStream) -> (Vec<u32>, FinishReason, gptj_scheduler::Usage) {
    let started = Instant::now();
    let mut ids = Vec::new();
    loop {
        assert!(started.elapsed() < WAIT, "stream did not finish in time");
        match s.try_recv() {
            Some(JobEvent::Token { id, .. }) => ids.push(id),
            Some(JobEvent::Finished { reason, usage }) => return (ids, reason, usage),
            Some(JobEvent::PromptLogprobs(_)) => panic!("not asked for"),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn settle(h: &SchedulerHandle) -> Stats {
    let started = Instant::now();
    loop {
        let s = h.stats();
        if s.running == 0 && s.waiting == 0 {
            return s;
        }
        assert!(started.elapsed() < WAIT);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Mixed prompts: (prompt ids, max new tokens).
fn jobs(n: usize) -> Vec<(Vec<u32>, usize)> {
    let tok = gptj_scheduler::testing::tokenizer();
    let words = [
        "The",
        " quick",
        " brown",
        " fox",
        " jumps",
        " over",
        " the",
        " lazy",
        " dog",
        ".",
        " In",
        " a",
        " shocking",
        " finding",
    ];
    (0..n)
        .map(|i| {
            let text: String = (0..3 + (i * 7) % 37)
                .map(|k| words[(i + k * 3) % words.len()])
                .collect();
            (tok.encode(&text).unwrap(), 4 + (i * 5) % 13)
        })
        .collect()
}

/// Each job run alone, one at a time, without prefix caching.
fn solo_outputs(jobs: &[(Vec<u32>, usize)]) -> Vec<Vec<u32>> {
    let cfg = SchedulerConfig {
        max_num_seqs: 1,
        max_batched_tokens: 512,
        prefix_caching: false,
        ..Default::default()
    };
    let h = spawn(tiny(16 << 20), cfg).unwrap();
    jobs.iter()
        .map(|(p, n)| collect(h.submit(JobRequest::new(p.clone(), *n)).unwrap()).0)
        .collect()
}

#[test]
fn concurrent_requests_match_their_solo_outputs_and_free_the_pool() {
    let jobs = jobs(64);
    let solo = solo_outputs(&jobs);
    let cfg = SchedulerConfig {
        max_num_seqs: 64,
        max_batched_tokens: 256,
        ..Default::default()
    };
    let h = spawn(tiny(16 << 20), cfg).unwrap();
    let streams: Vec<_> = jobs
        .iter()
        .map(|(p, n)| h.submit(JobRequest::new(p.clone(), *n)).unwrap())
        .collect();
    for ((stream, want), (_, n)) in streams.into_iter().zip(&solo).zip(&jobs) {
        let (got, reason, _) = collect(stream);
        assert_eq!(&got, want);
        assert!(reason == FinishReason::Length && got.len() == *n || reason == FinishReason::Stop);
    }
    let s = settle(&h);
    assert_eq!(s.kv_blocks_used, 0, "{s:?}");
}

#[test]
fn a_pool_too_small_forces_preemption_without_changing_outputs() {
    let jobs = jobs(12);
    let solo = solo_outputs(&jobs);
    let probe = tiny(1 << 20);
    let per_block = (1u64 << 20) / probe.num_kv_blocks() as u64;
    drop(probe);
    // Room for about 8 blocks of 16 tokens: a few sequences at a time.
    let cfg = SchedulerConfig {
        max_num_seqs: 12,
        max_batched_tokens: 256,
        ..Default::default()
    };
    let h = spawn(tiny(8 * per_block), cfg).unwrap();
    let streams: Vec<_> = jobs
        .iter()
        .map(|(p, n)| h.submit(JobRequest::new(p.clone(), *n)).unwrap())
        .collect();
    for (stream, want) in streams.into_iter().zip(&solo) {
        assert_eq!(&collect(stream).0, want);
    }
    let s = settle(&h);
    assert!(
        s.preemptions > 0,
        "the pool was meant to force preemption: {s:?}"
    );
    assert_eq!(s.kv_blocks_used, 0);
}

#[test]
fn a_repeated_few_shot_prompt_hits_the_prefix_cache_with_the_same_output() {
    let tok = gptj_scheduler::testing::tokenizer();
    let shots = "Q: What is the capital of France?\nA: Paris\n\nQ: What is the capital of Italy?\nA: Rome\n\n";
    let a = tok
        .encode(&format!("{shots}Q: What is the capital of Spain?\nA:"))
        .unwrap();
    let b = tok
        .encode(&format!("{shots}Q: What is the capital of Peru?\nA:"))
        .unwrap();
    let h = spawn(tiny(16 << 20), SchedulerConfig::default()).unwrap();
    let (first, ..) = collect(h.submit(JobRequest::new(a.clone(), 8)).unwrap());
    let (again, _, usage) = collect(h.submit(JobRequest::new(a.clone(), 8)).unwrap());
    assert_eq!(first, again);
    assert_eq!(usage.cached_prompt_tokens, (a.len() - 1) / 16 * 16);
    let (_, _, usage_b) = collect(h.submit(JobRequest::new(b, 8)).unwrap());
    assert!(
        usage_b.cached_prompt_tokens >= 16,
        "the shared few-shot prefix is reused: {usage_b:?}"
    );
    assert!(h.stats().prefix_cache_hit_tokens > 0);
}
