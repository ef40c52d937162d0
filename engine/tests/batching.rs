//! Batch invariance: a sequence gets the same logits and greedy tokens whatever shares its
//! step (ragged batches of 8+ rows at different positions, chunked prefills, scattered blocks).

mod common;

use common::*;
use gptj_engine::{BlockId, Precision, SeqChunk};

/// Prompts of assorted lengths: the fixture prompts plus derived ones.
fn prompts() -> Vec<Vec<u32>> {
    let expected = expected("rot_partial");
    let mut prompts: Vec<Vec<u32>> = expected
        .cases
        .iter()
        .map(|c| c.prompt_ids.clone())
        .collect();
    for i in 0..6u32 {
        let len = 3 + 7 * i as usize;
        prompts.push(
            (0..len as u32)
                .map(|j| (j * 37 + i * 101 + 5) % 512)
                .collect(),
        );
    }
    prompts
}

#[test]
fn ragged_batches_give_the_same_logits_and_tokens_as_running_alone() {
    const STEPS: usize = 12;
    const CHUNK: usize = 7;
    let prompts = prompts();
    assert!(prompts.len() >= 8);
    let mut engine = load("rot_partial", Precision::F32);

    // Alone: each sequence by itself, whole prompt at once, in low blocks.
    let alone: Vec<(Vec<Vec<f32>>, Vec<u32>)> = prompts
        .iter()
        .map(|p| {
            greedy_alone(
                &mut engine,
                p,
                STEPS,
                (0..(p.len() + STEPS).div_ceil(4) as u32)
                    .map(BlockId)
                    .collect(),
            )
        })
        .collect();

    // Together: sequences join one by one (sequence i starts at step i), prefill in chunks of
    // CHUNK tokens next to other rows' decode steps, with block tables interleaved through the
    // pool (sequence i owns blocks i, i + n, i + 2n, ...).
    let n = prompts.len() as u32;
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Seq::new(
                p,
                (0..(p.len() + STEPS).div_ceil(4) as u32)
                    .map(|b| BlockId(i as u32 + b * n))
                    .collect(),
            )
        })
        .collect();
    let mut logits_seen: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs.len()];
    let mut max_rows = 0;
    for step in 0.. {
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| i <= step && seqs[i].tokens.len() < prompts[i].len() + STEPS)
            .collect();
        if active.is_empty() {
            break;
        }
        max_rows = max_rows.max(active.len());
        let rows: Vec<SeqChunk<'_>> = active.iter().map(|&i| seqs[i].chunk(CHUNK)).collect();
        let lens: Vec<usize> = rows.iter().map(|r| r.tokens.len()).collect();
        let wants: Vec<bool> = rows.iter().map(|r| r.want_logits).collect();
        let logits = engine.forward(&rows).unwrap();
        let mut next = 0;
        for ((&i, len), want) in active.iter().zip(lens).zip(wants) {
            seqs[i].computed += len;
            if want {
                let row = logits.row(next).to_vec();
                next += 1;
                seqs[i].tokens.push(argmax(&row));
                logits_seen[i].push(row);
            }
        }
        assert_eq!(next, logits.len());
    }
    assert!(
        max_rows >= 8,
        "the test must batch at least 8 rows together, got {max_rows}"
    );
    // The matmuls see a different number of rows alone and batched (and chunked prefill feeds
    // them 7 rows where the lone run feeds the whole prompt), so the gemm's blocking and hence
    // the f32 summation order differ, and the cached K/V carry those differences into later
    // steps. Measured worst: 1.1e-6 of the largest logit (about 2e-5 absolute on logits of
    // magnitude ~18, i.e. ~10 f32 ulps). We allow 2e-6 relative instead of an absolute 1e-5,
    // which would test the gemm's summation order rather than our batching.
    let mut worst = 0f32;
    for (i, (alone_logits, alone_tokens)) in alone.iter().enumerate() {
        assert_eq!(
            &seqs[i].tokens[prompts[i].len()..],
            &alone_tokens[..],
            "sequence {i}: greedy tokens"
        );
        assert_eq!(logits_seen[i].len(), STEPS);
        for (step, (a, b)) in alone_logits.iter().zip(&logits_seen[i]).enumerate() {
            let err = rel_err(b, a);
            worst = worst.max(err);
            assert!(
                err <= 2e-6,
                "sequence {i} step {step}: logits differ by {err} of the largest"
            );
        }
    }
    eprintln!("worst relative logit difference, batched vs alone: {worst:e}");
}

/// Shared prefix blocks (as the prefix cache hands them out) are read by several rows at once.
#[test]
fn rows_can_share_prefix_blocks() {
    let mut engine = load("rot_partial", Precision::F32);
    let prefix: Vec<u32> = (0..8).map(|i| (i * 13 + 1) % 512).collect();
    let (alone, _) = greedy_alone(
        &mut engine,
        &[prefix.clone(), vec![7, 9]].concat(),
        1,
        (0..3).map(BlockId).collect(),
    );
    // Fill blocks 10 and 11 with the 8-token prefix once, then run two suffixes on top of them.
    let table_a = [BlockId(10), BlockId(11), BlockId(20)];
    let table_b = [BlockId(10), BlockId(11), BlockId(21)];
    engine
        .forward(&[SeqChunk {
            tokens: &prefix,
            start_pos: 0,
            block_table: &table_a,
            want_logits: false,
        }])
        .unwrap();
    let rows = [
        SeqChunk {
            tokens: &[7, 9],
            start_pos: 8,
            block_table: &table_a,
            want_logits: true,
        },
        SeqChunk {
            tokens: &[7, 9],
            start_pos: 8,
            block_table: &table_b,
            want_logits: true,
        },
    ];
    let logits = engine.forward(&rows).unwrap();
    for r in 0..2 {
        let diff = max_abs_diff(logits.row(r), &alone[0]);
        assert!(diff <= 1e-5, "row {r}: {diff}");
    }
}
