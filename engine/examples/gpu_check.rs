//! One binary for a machine with an NVIDIA GPU and no network (`scripts/gpu-check.sh`):
//! golden checks of the CUDA path against HuggingFace's outputs, a ragged-batch check, then a
//! decode benchmark with GPT-J-6B-shaped random weights. Prints a short report.
//!
//! ```text
//! cargo build --release --features cuda -p gptj-engine --example gpu_check
//! gpu_check [--fixtures engine/tests/fixtures/golden] [--device cuda:0] [--skip-bench]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use gptj_engine::bench::{markdown_table, DecodeBench};
use gptj_engine::{
    BlockId, Builtin, DeviceKind, Engine, EngineOptions, LogitRows, Precision, SeqChunk,
};

#[derive(serde::Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    last_logits: Vec<f32>,
    last_logits_f16: Vec<f32>,
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding of one sequence; returns the first step's logits and the generated ids.
fn greedy(
    engine: &mut Engine,
    prompt: &[u32],
    steps: usize,
    first_block: u32,
) -> gptj_engine::Result<(Vec<f32>, Vec<u32>)> {
    let blocks: Vec<BlockId> = (0..(prompt.len() + steps).div_ceil(16) as u32 + 1)
        .map(|b| BlockId(first_block + 2 * b))
        .collect();
    let mut tokens = prompt.to_vec();
    let mut computed = 0;
    let mut first = Vec::new();
    for _ in 0..steps {
        let logits = engine.forward(&[SeqChunk {
            tokens: &tokens[computed..],
            start_pos: computed,
            block_table: &blocks,
            logits: LogitRows::Last,
        }])?;
        computed = tokens.len();
        if first.is_empty() {
            first = logits.row(0).to_vec();
        }
        tokens.push(argmax(logits.row(0)));
    }
    Ok((first, tokens[prompt.len()..].to_vec()))
}

fn golden(fixtures: &Path, device: DeviceKind) -> Result<bool, String> {
    let mut ok = true;
    println!("| model | precision | worst logit error | bound | greedy ids | result |");
    println!("| --- | --- | ---: | ---: | --- | --- |");
    for model in ["rot_partial", "odd_heads"] {
        let dir = fixtures.join(model);
        let text = std::fs::read_to_string(dir.join("expected.json"))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let expected: Expected = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        for (precision, bound) in [
            (Precision::F32, 1e-4f32),
            (Precision::F16, 1e-2),
            (Precision::Bf16, 5e-2),
        ] {
            let opts = EngineOptions {
                precision,
                device,
                block_size: 16,
                kv_cache_memory: Some(64 << 20),
                ..Default::default()
            };
            let mut engine = Engine::load_dir(&dir, &opts).map_err(|e| e.to_string())?;
            let mut worst = 0f32;
            let mut same_greedy = true;
            for (i, case) in expected.cases.iter().enumerate() {
                let (logits, ids) = greedy(
                    &mut engine,
                    &case.prompt_ids,
                    case.greedy_ids.len(),
                    1 + i as u32,
                )
                .map_err(|e| e.to_string())?;
                let err = match precision {
                    Precision::F32 => max_abs_diff(&logits, &case.last_logits),
                    Precision::F16 => {
                        max_abs_diff(&logits, &case.last_logits_f16)
                            / case.last_logits.iter().map(|x| x.abs()).fold(0.0, f32::max)
                    }
                    _ => {
                        max_abs_diff(&logits, &case.last_logits)
                            / case.last_logits.iter().map(|x| x.abs()).fold(0.0, f32::max)
                    }
                };
                worst = worst.max(err);
                same_greedy &= ids == case.greedy_ids;
            }
            let pass = worst <= bound && (precision != Precision::F32 || same_greedy);
            ok &= pass;
            println!(
                "| {model} | {precision} | {worst:.2e} | {bound:.0e} | {} | {} |",
                if same_greedy { "identical" } else { "differ" },
                if pass { "PASS" } else { "FAIL" }
            );
        }
    }
    Ok(ok)
}

/// Eight sequences in one ragged step (prefills and decodes mixed) give the same logits as alone.
fn ragged(fixtures: &Path, device: DeviceKind) -> Result<bool, String> {
    let dir = fixtures.join("rot_partial");
    let opts = EngineOptions {
        precision: Precision::F32,
        device,
        block_size: 4,
        kv_cache_memory: Some(64 << 20),
        ..Default::default()
    };
    let mut engine = Engine::load_dir(&dir, &opts).map_err(|e| e.to_string())?;
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|s| (0..(3 + 5 * s)).map(|i| (i * 37 + s * 11) % 512).collect())
        .collect();
    let tables: Vec<Vec<BlockId>> = (0..8u32)
        .map(|s| (0..12).map(|b| BlockId(s + 8 * b)).collect())
        .collect();
    let mut alone = Vec::new();
    for (p, t) in prompts.iter().zip(&tables) {
        let l = engine
            .forward(&[SeqChunk {
                tokens: p,
                start_pos: 0,
                block_table: t,
                logits: LogitRows::Last,
            }])
            .map_err(|e| e.to_string())?;
        alone.push(l.row(0).to_vec());
    }
    // Again, all at once: first halves as a batch, then second halves as a batch.
    let halves: Vec<usize> = prompts.iter().map(|p| p.len() / 2).collect();
    let rows: Vec<SeqChunk<'_>> = prompts
        .iter()
        .zip(&tables)
        .zip(&halves)
        .filter(|(_, &h)| h > 0)
        .map(|((p, t), &h)| SeqChunk {
            tokens: &p[..h],
            start_pos: 0,
            block_table: t,
            logits: LogitRows::None,
        })
        .collect();
    engine.forward(&rows).map_err(|e| e.to_string())?;
    let rows: Vec<SeqChunk<'_>> = prompts
        .iter()
        .zip(&tables)
        .zip(&halves)
        .map(|((p, t), &h)| SeqChunk {
            tokens: &p[h..],
            start_pos: h,
            block_table: t,
            logits: LogitRows::Last,
        })
        .collect();
    let together = engine.forward(&rows).map_err(|e| e.to_string())?;
    let worst = (0..8)
        .map(|i| max_abs_diff(together.row(i), &alone[i]))
        .fold(0.0, f32::max);
    let pass = worst <= 1e-4;
    println!(
        "\nragged batch of 8 (chunked prefill) vs alone: worst logit diff {worst:.2e}: {}",
        if pass { "PASS" } else { "FAIL" }
    );
    Ok(pass)
}

fn main() {
    let mut fixtures = PathBuf::from("engine/tests/fixtures/golden");
    let mut device = DeviceKind::Cuda(0);
    let mut bench = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--fixtures" => fixtures = args.next().map(PathBuf::from).unwrap_or(fixtures),
            "--device" => device = args.next().and_then(|d| d.parse().ok()).unwrap_or(device),
            "--skip-bench" => bench = false,
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let started = Instant::now();
    let golden_ok = golden(&fixtures, device).unwrap_or_else(|e| {
        println!("golden checks could not run: {e}");
        false
    });
    let ragged_ok = ragged(&fixtures, device).unwrap_or_else(|e| {
        println!("ragged check could not run: {e}");
        false
    });
    println!("\nchecks took {:.1}s", started.elapsed().as_secs_f32());
    if bench {
        for (shape, precisions, batches) in [
            (
                Builtin::Small,
                vec![Precision::F32, Precision::F16, Precision::Bf16],
                vec![1, 8, 32],
            ),
            (
                Builtin::Gptj6b,
                vec![Precision::F16, Precision::Q8_0],
                vec![1, 8, 32],
            ),
        ] {
            let b = DecodeBench {
                shape,
                precisions,
                batches,
                context: 512,
                steps: 8,
                kv_cache: gptj_engine::KvCacheDtype::Auto,
                device,
            };
            let rows = b.run();
            // H100 SXM HBM3 is ~3.35 TB/s, PCIe ~2.0 TB/s: the floor uses 3000 GB/s as a round figure.
            println!("\n{shape:?} shape, context 512, median of 8 steps, floor at 3000 GB/s\n");
            print!("{}", markdown_table(&rows, 3000.0));
        }
    }
    println!(
        "\ntotal {:.1}s; golden {}, ragged {}",
        started.elapsed().as_secs_f32(),
        ok(golden_ok),
        ok(ragged_ok)
    );
    if !(golden_ok && ragged_ok) {
        std::process::exit(1);
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "PASS"
    } else {
        "FAIL"
    }
}
