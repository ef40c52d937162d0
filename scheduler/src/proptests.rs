//! Property tests: after any mix of admissions, growth, prefix sharing, preemption,
//! cancellation and completion, every block is free, cached, or held exactly by its live
//! owners; the counts add up; nothing leaks, is freed twice, or changes anyone's output.

use proptest::prelude::*;

use crate::blocks::{BlockManager, BlockTable};
use crate::job::{FinishReason, JobRequest};
use crate::scenario_tests::{drain, expected, Harness};
use crate::testing::FakeModel;
use crate::SchedulerConfig;

/// Shared prefixes, so that prompts hit each other's cached blocks.
const PREFIXES: [&[u32]; 3] = [
    &[11, 12, 13, 14, 15, 16, 17, 18, 19],
    &[11, 12, 13, 14, 99],
    &[7, 7, 7, 7, 7, 7, 7, 7],
];

fn tokens_for(prefix: usize, extra: &[u32]) -> Vec<u32> {
    let mut t = PREFIXES[prefix % PREFIXES.len()].to_vec();
    t.extend_from_slice(extra);
    t
}

#[derive(Debug, Clone)]
enum BlockOp {
    New { prefix: usize, extra: Vec<u32> },
    Grow { table: usize, extra: Vec<u32> },
    Free { table: usize },
}

fn block_op() -> impl Strategy<Value = BlockOp> {
    prop_oneof![
        (0..3usize, prop::collection::vec(0..4u32, 0..6))
            .prop_map(|(prefix, extra)| BlockOp::New { prefix, extra }),
        (0..8usize, prop::collection::vec(0..4u32, 1..6))
            .prop_map(|(table, extra)| BlockOp::Grow { table, extra }),
        (0..8usize).prop_map(|table| BlockOp::Free { table }),
    ]
}

fn check(m: &BlockManager, live: &[(BlockTable, Vec<u32>)]) -> Result<(), TestCaseError> {
    let mut holders = vec![0u32; m.num_blocks()];
    for (t, _) in live {
        for b in t.blocks() {
            holders[b.0 as usize] += 1;
        }
    }
    m.check(Some(&holders)).map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn block_manager_never_loses_or_double_frees(ops in prop::collection::vec(block_op(), 1..60)) {
        let mut m = BlockManager::new(10, 2, true);
        let mut live: Vec<(BlockTable, Vec<u32>)> = Vec::new();
        for op in ops {
            match op {
                BlockOp::New { prefix, extra } => {
                    let tokens = tokens_for(prefix, &extra);
                    let (mut t, hit) = m.lookup_prefix(&tokens, tokens.len() - 1, crate::blocks::ROOT_HASH);
                    prop_assert!(hit < tokens.len() && hit % 2 == 0);
                    if m.ensure_capacity(&mut t, tokens.len()).is_ok() {
                        m.register_computed(&mut t, &tokens, tokens.len());
                        live.push((t, tokens));
                    } else {
                        m.free(t);
                    }
                }
                BlockOp::Grow { table, extra } => {
                    if live.is_empty() { continue; }
                    let i = table % live.len();
                    let (t, tokens) = &mut live[i];
                    let before = t.len();
                    if m.ensure_capacity(t, tokens.len() + extra.len()).is_ok() {
                        tokens.extend_from_slice(&extra);
                        m.register_computed(t, tokens, tokens.len());
                    } else {
                        prop_assert_eq!(t.len(), before);
                    }
                }
                BlockOp::Free { table } => {
                    if live.is_empty() { continue; }
                    let (t, _) = live.remove(table % live.len());
                    m.free(t);
                }
            }
            check(&m, &live)?;
            // Shared blocks are only full, registered prefix blocks: any two tables that share
            // a block agree on every token up to that block's end.
            for (a, ta) in &live {
                for (b, tb) in &live {
                    for (k, blk) in a.blocks().iter().enumerate() {
                        if b.blocks().get(k) == Some(blk) && !std::ptr::eq(a, b) {
                            let end = (k + 1) * 2;
                            prop_assert_eq!(&ta[..end], &tb[..end]);
                        }
                    }
                }
            }
        }
        for (t, _) in live.drain(..) {
            m.free(t);
        }
        check(&m, &live)?;
        prop_assert_eq!(m.usage().used, 0);
    }
}

#[derive(Debug, Clone)]
enum LoopOp {
    Submit {
        prefix: usize,
        extra: Vec<u32>,
        max_new: usize,
    },
    Step,
    Cancel {
        job: usize,
    },
}

fn loop_op() -> impl Strategy<Value = LoopOp> {
    prop_oneof![
        3 => (0..3usize, prop::collection::vec(0..5u32, 0..7), 1..14usize)
            .prop_map(|(prefix, extra, max_new)| LoopOp::Submit { prefix, extra, max_new }),
        5 => Just(LoopOp::Step),
        1 => (0..32usize).prop_map(|job| LoopOp::Cancel { job }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_loop_keeps_blocks_consistent_and_outputs_unchanged(
        ops in prop::collection::vec(loop_op(), 1..50),
        prefix_caching in any::<bool>(),
        num_blocks in 8..16usize,
    ) {
        // A tiny pool (8-15 blocks of 4 tokens) so that preemption is frequent.
        let cfg = SchedulerConfig { max_num_seqs: 4, max_batched_tokens: 12, prefix_caching, ..SchedulerConfig::default() };
        let mut h = Harness::new(FakeModel::new(num_blocks, 4), cfg);
        let mut jobs = Vec::new();
        for op in ops {
            match op {
                LoopOp::Submit { prefix, extra, max_new } => {
                    let prompt = tokens_for(prefix, &extra);
                    // The handle refuses what can never fit; keep to what it would accept.
                    if (prompt.len() + max_new - 1).div_ceil(4) > num_blocks { continue; }
                    let rx = h.submit(JobRequest::new(prompt.clone(), max_new));
                    jobs.push((prompt, max_new, Some(rx)));
                }
                LoopOp::Step => {
                    h.b.step();
                }
                LoopOp::Cancel { job } => {
                    if !jobs.is_empty() {
                        let n = jobs.len();
                        jobs[job % n].2 = None;
                    }
                }
            }
            h.b.check_blocks().map_err(TestCaseError::fail)?;
        }
        h.run(2000);
        prop_assert_eq!(h.b.usage().used, 0, "blocks leaked");
        prop_assert_eq!(h.b.usage().available(), num_blocks);
        for (prompt, max_new, rx) in &mut jobs {
            if let Some(rx) = rx {
                let o = drain(rx);
                prop_assert_eq!(o.reason, Some(FinishReason::Length));
                prop_assert_eq!(o.tokens, expected(prompt, *max_new));
            }
        }
    }
}
