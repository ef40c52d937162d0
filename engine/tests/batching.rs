//! Batch invariance: a sequence gets bitwise the same logits, hence the same greedy or seeded
//! sampled tokens, whatever shares its step (ragged batches of 8+ rows at different positions,
//! chunked prefills, scattered blocks), in every precision on the CPU.

mod common;

use common::*;
use gptj_engine::{BlockId, KvCacheDtype, LogitRows, Precision, Sampler, SamplingParams, SeqChunk};

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

/// How the next token is chosen in these tests.
#[derive(Clone, Copy)]
enum Choice {
    Greedy,
    /// Temperature 1, top-p 0.9, a per-sequence seed: exercises the seeded RNG.
    Sampled,
}

fn sampler(i: usize, choice: Choice) -> Option<Sampler> {
    match choice {
        Choice::Greedy => None,
        Choice::Sampled => {
            let params = SamplingParams {
                do_sample: true,
                temperature: 1.0,
                top_p: 0.9,
                seed: 1000 + i as u64,
                ..SamplingParams::default()
            };
            Some(Sampler::new(&params, 0, 512))
        }
    }
}

fn choose(logits: &[f32], tokens: &[u32], prompt_len: usize, sampler: &mut Option<Sampler>) -> u32 {
    match sampler {
        None => argmax(logits),
        Some(s) => s.sample(logits, tokens, tokens.len() - prompt_len),
    }
}

/// Runs every prompt alone, then all of them together (sequence i joins at step i, prefills
/// in chunks of 7 next to the others' decode steps, block tables interleaved through the
/// pool), and checks that each sequence's logits are bitwise identical and its tokens equal.
fn check_batch_invariance(precision: Precision, choice: Choice) {
    check_batch_invariance_with(precision, KvCacheDtype::Auto, choice)
}

/// As [`check_batch_invariance`], with the KV cache in `kv`.
fn check_batch_invariance_with(precision: Precision, kv: KvCacheDtype, choice: Choice) {
    const STEPS: usize = 12;
    const CHUNK: usize = 7;
    let prompts = prompts();
    assert!(prompts.len() >= 8);
    let mut engine = load_with_kv("rot_partial", precision, kv);

    let mut alone: Vec<(Vec<Vec<f32>>, Vec<u32>)> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut seq = Seq::new(
            p,
            (0..(p.len() + STEPS).div_ceil(4) as u32)
                .map(BlockId)
                .collect(),
        );
        let mut s = sampler(i, choice);
        let mut seen = Vec::new();
        for _ in 0..STEPS {
            let chunk = seq.chunk(usize::MAX);
            let n = chunk.tokens.len();
            let row = engine.forward(&[chunk]).unwrap().row(0).to_vec();
            seq.computed += n;
            let next = choose(&row, &seq.tokens, p.len(), &mut s);
            seq.tokens.push(next);
            seen.push(row);
        }
        alone.push((seen, seq.tokens[p.len()..].to_vec()));
    }

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
    let mut samplers: Vec<Option<Sampler>> = (0..seqs.len()).map(|i| sampler(i, choice)).collect();
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
        let wants: Vec<bool> = rows.iter().map(|r| r.logits == LogitRows::Last).collect();
        let logits = engine.forward(&rows).unwrap();
        let mut next = 0;
        for ((&i, len), want) in active.iter().zip(lens).zip(wants) {
            seqs[i].computed += len;
            if want {
                let row = logits.row(next).to_vec();
                next += 1;
                let token = choose(&row, &seqs[i].tokens, prompts[i].len(), &mut samplers[i]);
                seqs[i].tokens.push(token);
                logits_seen[i].push(row);
            }
        }
        assert_eq!(next, logits.len());
    }
    assert!(
        max_rows >= 8,
        "the test must batch at least 8 rows together, got {max_rows}"
    );
    for (i, (alone_logits, alone_tokens)) in alone.iter().enumerate() {
        assert_eq!(
            &seqs[i].tokens[prompts[i].len()..],
            &alone_tokens[..],
            "{precision} sequence {i}: tokens"
        );
        assert_eq!(logits_seen[i].len(), STEPS);
        for (step, (a, b)) in alone_logits.iter().zip(&logits_seen[i]).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{precision} sequence {i} step {step}: logits differ by {}",
                max_abs_diff(a, b)
            );
        }
    }
}

#[test]
fn ragged_batches_are_bitwise_identical_to_running_alone_f32() {
    check_batch_invariance(Precision::F32, Choice::Greedy);
}

#[test]
fn ragged_batches_are_bitwise_identical_to_running_alone_f16_bf16_q8_0() {
    for precision in [Precision::F16, Precision::Bf16, Precision::Q8_0] {
        check_batch_invariance(precision, Choice::Greedy);
    }
}

/// The int8 cache quantizes each token's rows alone, so it keeps the invariance.
#[test]
fn ragged_batches_are_bitwise_identical_to_running_alone_with_an_int8_cache() {
    for precision in [Precision::F32, Precision::Q8_0] {
        check_batch_invariance_with(precision, KvCacheDtype::Int8, Choice::Greedy);
    }
}

#[test]
fn a_seed_samples_the_same_tokens_whatever_shares_the_batch() {
    for precision in [Precision::F32, Precision::Q8_0] {
        check_batch_invariance(precision, Choice::Sampled);
    }
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
            logits: LogitRows::None,
        }])
        .unwrap();
    let rows = [
        SeqChunk {
            tokens: &[7, 9],
            start_pos: 8,
            block_table: &table_a,
            logits: LogitRows::Last,
        },
        SeqChunk {
            tokens: &[7, 9],
            start_pos: 8,
            block_table: &table_b,
            logits: LogitRows::Last,
        },
    ];
    let logits = engine.forward(&rows).unwrap();
    for r in 0..2 {
        let diff = max_abs_diff(logits.row(r), &alone[0]);
        assert!(diff <= 1e-5, "row {r}: {diff}");
    }
}

/// builtin:tiny has matrices wide enough (n_embd 128, vocab 50400) to take the strided f32
/// gemm that the fixtures' 64-wide model does not reach.
#[test]
fn builtin_tiny_samples_the_same_tokens_alone_and_batched() {
    use gptj_engine::{Engine, EngineOptions, ModelSpec};
    const STEPS: usize = 6;
    let opts = EngineOptions {
        precision: Precision::F32,
        kv_cache_memory: Some(16 << 20),
        ..Default::default()
    };
    let mut engine = Engine::load(&"builtin:tiny".parse::<ModelSpec>().unwrap(), &opts).unwrap();
    let prompts: Vec<Vec<u32>> = (0..9u32)
        .map(|s| {
            (0..(2 + 3 * s))
                .map(|i| (i * 7919 + s * 104729) % 50257)
                .collect()
        })
        .collect();
    let params = |i: usize| SamplingParams {
        do_sample: true,
        temperature: 1.0,
        seed: 42 + i as u64,
        ..SamplingParams::default()
    };
    let table =
        |i: usize| -> Vec<BlockId> { (0..4u32).map(|b| BlockId(1 + i as u32 * 4 + b)).collect() };
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut sampler = Sampler::new(&params(i), 50256, 50257);
        let mut tokens = p.clone();
        let mut computed = 0;
        for _ in 0..STEPS {
            let t = table(i);
            let logits = engine
                .forward(&[SeqChunk {
                    tokens: &tokens[computed..],
                    start_pos: computed,
                    block_table: &t,
                    logits: LogitRows::Last,
                }])
                .unwrap();
            computed = tokens.len();
            let next = sampler.sample(logits.row(0), &tokens, tokens.len() - p.len());
            tokens.push(next);
        }
        alone.push(tokens);
    }
    // Together: all nine in every step.
    let mut samplers: Vec<Sampler> = (0..prompts.len())
        .map(|i| Sampler::new(&params(i), 50256, 50257))
        .collect();
    let mut tokens: Vec<Vec<u32>> = prompts.clone();
    let mut computed = vec![0usize; prompts.len()];
    let tables: Vec<Vec<BlockId>> = (0..prompts.len()).map(table).collect();
    for _ in 0..STEPS {
        let rows: Vec<SeqChunk<'_>> = (0..prompts.len())
            .map(|i| SeqChunk {
                tokens: &tokens[i][computed[i]..],
                start_pos: computed[i],
                block_table: &tables[i],
                logits: LogitRows::Last,
            })
            .collect();
        let logits = engine.forward(&rows).unwrap();
        for i in 0..prompts.len() {
            computed[i] = tokens[i].len();
            let next = samplers[i].sample(
                logits.row(i),
                &tokens[i],
                tokens[i].len() - prompts[i].len(),
            );
            tokens[i].push(next);
        }
    }
    assert_eq!(tokens, alone);
}
