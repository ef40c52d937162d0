//! The engine thread and its handle, through the public API, against the fake model: what
//! the server will rely on. Every wait is bounded.

use std::time::{Duration, Instant};

use gptj_scheduler::testing::FakeModel;
use gptj_scheduler::{
    spawn, ConfigError, FinishReason, JobEvent, JobRequest, JobStream, SamplingParams,
    SchedulerConfig, SchedulerHandle, Stats, SubmitError, Usage,
};

const WAIT: Duration = Duration::from_secs(10);

/// Reads a stream to its end (bounded by `WAIT`): the tokens, the text, the finish.
fn collect(mut s: JobStream) -> (Vec<u32>, String, FinishReason, Usage) {
    let started = Instant::now();
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        assert!(started.elapsed() < WAIT, "stream did not finish in time");
        match s.try_recv() {
            Some(JobEvent::Token { id, text: t, .. }) => {
                ids.push(id);
                text.push_str(&t);
            }
            Some(JobEvent::Finished { reason, usage }) => return (ids, text, reason, usage),
            Some(JobEvent::PromptLogprobs(_)) => panic!("not asked for"),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Waits (bounded) until the stats satisfy `pred`.
fn wait_stats(h: &SchedulerHandle, pred: impl Fn(&Stats) -> bool) -> Stats {
    let started = Instant::now();
    loop {
        let s = h.stats();
        if pred(&s) {
            return s;
        }
        assert!(
            started.elapsed() < WAIT,
            "stats never reached the expected state: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 500 + seed * 31 + i * 7).collect()
}

fn small() -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 8,
        max_batched_tokens: 64,
        ..SchedulerConfig::default()
    }
}

#[test]
fn a_job_streams_tokens_then_finishes_and_the_pool_is_free() {
    let h = spawn(FakeModel::new(64, 4), small()).unwrap();
    let (ids, text, reason, usage) = collect(h.submit(JobRequest::new(prompt(1, 5), 8)).unwrap());
    assert_eq!(ids.len(), 8);
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(text, gptj_scheduler::testing::tokenizer().decode(&ids));
    assert_eq!((usage.prompt_tokens, usage.generated_tokens), (5, 8));
    let s = wait_stats(&h, |s| s.running == 0);
    assert_eq!(
        (
            s.kv_blocks_used,
            s.kv_blocks_total,
            s.waiting,
            s.queued_requests
        ),
        (0, 64, 0, 0)
    );
    assert_eq!(s.generated_tokens, 8);
}

#[test]
fn streams_work_from_async_code() {
    let h = spawn(FakeModel::new(64, 4), small()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let n = rt.block_on(async {
        let mut s = h.submit(JobRequest::new(prompt(2, 3), 4)).unwrap();
        let mut tokens = 0;
        loop {
            match tokio::time::timeout(WAIT, s.recv())
                .await
                .expect("timed out")
            {
                Some(JobEvent::Token { .. }) => tokens += 1,
                Some(JobEvent::PromptLogprobs(_)) => panic!("not asked for"),
                Some(JobEvent::Finished { .. }) | None => break tokens,
            }
        }
    });
    assert_eq!(n, 4);
}

#[test]
fn concurrent_submitters_all_complete_with_their_solo_outputs() {
    let h = spawn(FakeModel::new(256, 4), small()).unwrap();
    let solo: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            collect(
                h.submit(JobRequest::new(prompt(i, 4 + i as usize), 6))
                    .unwrap(),
            )
            .0
        })
        .collect();
    let threads: Vec<_> = (0..12u32)
        .map(|i| {
            let h = h.clone();
            std::thread::spawn(move || {
                collect(
                    h.submit(JobRequest::new(prompt(i, 4 + i as usize), 6))
                        .unwrap(),
                )
                .0
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), solo[i]);
    }
    wait_stats(&h, |s| s.running == 0 && s.kv_blocks_used == 0);
}

#[test]
fn requests_that_can_never_fit_are_refused_with_a_clear_error() {
    let h = spawn(FakeModel::new(4, 4).with_max_context(64), small()).unwrap();
    let e = h.submit(JobRequest::new(prompt(1, 60), 10)).unwrap_err();
    assert_eq!(
        e,
        SubmitError::ExceedsContext {
            prompt_tokens: 60,
            max_new_tokens: 10,
            max_context: 64
        }
    );
    assert!(e.to_string().contains("must be <= 64"), "{e}");
    // 10 + 10 tokens need 19 slots = 5 blocks; the pool has 4.
    let e = h.submit(JobRequest::new(prompt(1, 10), 10)).unwrap_err();
    assert_eq!(
        e,
        SubmitError::ExceedsKvCache {
            tokens: 19,
            needed_blocks: 5,
            total_blocks: 4
        }
    );
    // 10 + 7 tokens need 16 slots: fits exactly.
    let (ids, ..) = collect(h.submit(JobRequest::new(prompt(1, 10), 7)).unwrap());
    assert_eq!(ids.len(), 7);
}

#[test]
fn malformed_jobs_are_refused_with_the_field_named() {
    let h = spawn(FakeModel::new(16, 4), small()).unwrap();
    let invalid = |job: JobRequest| match h.submit(job) {
        Err(SubmitError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    };
    assert!(invalid(JobRequest::new(vec![], 4)).contains("prompt"));
    assert!(invalid(JobRequest::new(vec![1], 0)).contains("`max_new_tokens`"));
    assert!(invalid(JobRequest::new(vec![1, 999_999], 4)).contains("999999"));
    let mut j = JobRequest::new(vec![1], 4);
    j.params = SamplingParams {
        temperature: -1.0,
        ..SamplingParams::default()
    };
    assert!(invalid(j).contains("`temperature`"));
    let mut j = JobRequest::new(vec![1], 4);
    j.stop = vec![String::new()];
    assert!(invalid(j).contains("stop"));
}

#[test]
fn a_full_queue_refuses_with_retry_after() {
    let cfg = SchedulerConfig {
        max_num_seqs: 1,
        max_waiting_requests: 2,
        ..small()
    };
    let h = spawn(
        FakeModel::new(256, 4).with_step_delay(Duration::from_millis(10)),
        cfg,
    )
    .unwrap();
    // One job runs for a long time; the queue holds at most 2 more.
    let mut streams = Vec::new();
    let mut refused = None;
    for i in 0..5 {
        match h.submit(JobRequest::new(prompt(i, 4), 300)) {
            Ok(s) => streams.push(s),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    match refused {
        Some(SubmitError::QueueFull {
            retry_after,
            waiting_requests,
            ..
        }) => {
            assert!(retry_after >= Duration::from_secs(1));
            assert_eq!(waiting_requests, 2);
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert!(streams.len() <= 3);
    drop(streams);
    wait_stats(&h, |s| {
        s.running == 0 && s.waiting == 0 && s.queued_requests == 0 && s.kv_blocks_used == 0
    });
    // Room again.
    let (ids, ..) = collect(h.submit(JobRequest::new(prompt(9, 4), 2)).unwrap());
    assert_eq!(ids.len(), 2);
}

#[test]
fn the_queue_also_limits_waiting_tokens() {
    let cfg = SchedulerConfig {
        max_num_seqs: 1,
        max_waiting_tokens: 100,
        ..small()
    };
    let h = spawn(
        FakeModel::new(256, 4).with_step_delay(Duration::from_millis(10)),
        cfg,
    )
    .unwrap();
    let _running = h.submit(JobRequest::new(prompt(1, 4), 300)).unwrap();
    wait_stats(&h, |s| s.running == 1);
    let _queued = h.submit(JobRequest::new(prompt(2, 40), 40)).unwrap();
    let e = h.submit(JobRequest::new(prompt(3, 20), 20)).unwrap_err();
    assert!(
        matches!(
            e,
            SubmitError::QueueFull {
                waiting_tokens: 80,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn dropping_a_running_stream_cancels_it_and_frees_its_blocks() {
    let h = spawn(
        FakeModel::new(300, 4).with_step_delay(Duration::from_millis(2)),
        small(),
    )
    .unwrap();
    let mut s = h.submit(JobRequest::new(prompt(1, 9), 1000)).unwrap();
    let started = Instant::now();
    while !matches!(s.try_recv(), Some(JobEvent::Token { .. })) {
        assert!(started.elapsed() < WAIT);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(h.stats().kv_blocks_used > 0);
    drop(s);
    wait_stats(&h, |s| s.running == 0 && s.kv_blocks_used == 0);
}

#[test]
fn dropping_a_queued_stream_cancels_it_before_it_runs() {
    let cfg = SchedulerConfig {
        max_num_seqs: 1,
        ..small()
    };
    let h = spawn(
        FakeModel::new(300, 4).with_step_delay(Duration::from_millis(2)),
        cfg,
    )
    .unwrap();
    let running = h.submit(JobRequest::new(prompt(1, 4), 1000)).unwrap();
    let queued = h.submit(JobRequest::new(prompt(2, 4), 5)).unwrap();
    wait_stats(&h, |s| s.running == 1 && s.waiting == 1);
    drop(queued);
    wait_stats(&h, |s| {
        s.waiting == 0 && s.queued_requests == 0 && s.running == 1
    });
    drop(running);
    wait_stats(&h, |s| s.running == 0 && s.kv_blocks_used == 0);
}

#[test]
fn a_deadline_ends_a_running_job_with_timeout() {
    let h = spawn(
        FakeModel::new(300, 4).with_step_delay(Duration::from_millis(2)),
        small(),
    )
    .unwrap();
    let mut job = JobRequest::new(prompt(1, 4), 1000);
    job.deadline = Some(Instant::now() + Duration::from_millis(40));
    let (ids, _, reason, _) = collect(h.submit(job).unwrap());
    assert_eq!(reason, FinishReason::Timeout);
    assert!(ids.len() < 1000);
    wait_stats(&h, |s| s.kv_blocks_used == 0);
}

#[test]
fn shutdown_refuses_new_jobs_and_finishes_those_in_flight() {
    let h = spawn(
        FakeModel::new(128, 4).with_step_delay(Duration::from_millis(1)),
        small(),
    )
    .unwrap();
    let streams: Vec<_> = (0..3)
        .map(|i| h.submit(JobRequest::new(prompt(i, 4), 20)).unwrap())
        .collect();
    h.shutdown(None);
    assert_eq!(
        h.submit(JobRequest::new(prompt(9, 4), 2)).unwrap_err(),
        SubmitError::ShuttingDown
    );
    for s in streams {
        let (ids, _, reason, _) = collect(s);
        assert_eq!((ids.len(), reason), (20, FinishReason::Length));
    }
    assert!(h.wait_stopped(WAIT));
    assert!(!h.is_alive());
    assert!(!h.heartbeat().is_healthy(Duration::from_secs(100)));
}

#[test]
fn shutdown_past_its_deadline_cancels_what_is_left() {
    let h = spawn(
        FakeModel::new(300, 4).with_step_delay(Duration::from_millis(2)),
        small(),
    )
    .unwrap();
    let s = h.submit(JobRequest::new(prompt(1, 4), 1000)).unwrap();
    h.shutdown(Some(Instant::now() + Duration::from_millis(30)));
    let (ids, _, reason, _) = collect(s);
    assert_eq!(reason, FinishReason::Cancelled);
    assert!(ids.len() < 1000);
    assert!(h.wait_stopped(WAIT));
}

#[test]
fn shutdown_can_be_awaited() {
    let h = spawn(FakeModel::new(16, 4), small()).unwrap();
    h.shutdown(None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(WAIT, h.stopped())
            .await
            .expect("not stopped")
    });
}

#[test]
fn the_idle_loop_sleeps_and_the_heartbeat_tells_a_long_step() {
    let h = spawn(
        FakeModel::new(64, 4).with_step_delay(Duration::from_millis(300)),
        small(),
    )
    .unwrap();
    let hb = h.heartbeat();
    assert!(hb.alive && hb.idle && hb.is_healthy(Duration::from_millis(1)));
    // Idle: no steps happen (no spinning).
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(h.heartbeat().steps, 0);
    // A submission wakes it; mid-step the beat ages.
    let s = h.submit(JobRequest::new(prompt(1, 4), 1)).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let hb = h.heartbeat();
    assert!(!hb.idle);
    assert!(!hb.is_healthy(Duration::from_millis(50)), "{hb:?}");
    assert!(hb.is_healthy(Duration::from_secs(30)));
    collect(s);
    let started = Instant::now();
    while !h.heartbeat().idle {
        assert!(started.elapsed() < WAIT);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.heartbeat().steps, 1);
}

#[test]
fn a_repeated_prompt_is_served_from_the_prefix_cache() {
    let h = spawn(FakeModel::new(64, 4), small()).unwrap();
    let p = prompt(3, 21);
    let (a, ..) = collect(h.submit(JobRequest::new(p.clone(), 5)).unwrap());
    let (b, _, _, usage) = collect(h.submit(JobRequest::new(p, 5)).unwrap());
    assert_eq!(a, b);
    assert_eq!(usage.cached_prompt_tokens, 20);
    let s = h.stats();
    assert_eq!(
        (s.prefix_cache_queried_tokens, s.prefix_cache_hit_tokens),
        (42, 20)
    );
}

#[test]
fn bad_configurations_are_refused() {
    let e = spawn(FakeModel::new(0, 4), small()).unwrap_err();
    assert!(
        matches!(e, ConfigError::NoKvCache { num_blocks: 0, .. }),
        "{e:?}"
    );
    let e = spawn(
        FakeModel::new(8, 4),
        SchedulerConfig {
            max_batched_tokens: 4,
            ..small()
        },
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::BudgetBelowBatch { .. }), "{e:?}");
}
