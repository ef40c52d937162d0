//! Decode-step benchmark of the engine alone (no scheduler, no HTTP): the time of one decode
//! step per precision and batch size, next to the memory-bound floor (weight bytes a step
//! reads / measured memory bandwidth).
//!
//! ```text
//! cargo bench --bench decode -- [--shape tiny|small|6b] [--precisions f32,f16,bf16,q8_0]
//!     [--batches 1,8,32] [--context 128] [--steps 8] [--json out.json]
//! ```
//! Benchmark on a quiet machine: any other busy process slows a 2-thread run 10-40x.

use std::time::{Duration, Instant};

use gptj_engine::{
    BlockId, Builtin, Engine, EngineOptions, KvPool, ModelSpec, Precision, SeqChunk,
};
use rayon::prelude::*;

struct Args {
    shape: Builtin,
    precisions: Vec<Precision>,
    batches: Vec<usize>,
    context: usize,
    steps: usize,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        shape: Builtin::Small,
        precisions: vec![
            Precision::F32,
            Precision::F16,
            Precision::Bf16,
            Precision::Q8_0,
        ],
        batches: vec![1, 8, 32],
        context: 128,
        steps: 8,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--shape" => {
                args.shape = match value()?.as_str() {
                    "tiny" => Builtin::Tiny,
                    "small" => Builtin::Small,
                    "6b" => Builtin::Gptj6b,
                    other => return Err(format!("unknown shape {other}")),
                }
            }
            "--precisions" => {
                args.precisions = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--batches" => {
                args.batches = value()?
                    .split(',')
                    .map(|b| b.parse().map_err(|e| format!("{b}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--context" => {
                args.context = value()?.parse().map_err(|e| format!("--context: {e}"))?
            }
            "--steps" => args.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--json" => args.json = Some(value()?),
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// Read bandwidth of main memory with all rayon threads: GB/s, median of 5 passes over 1 GiB.
fn memory_bandwidth() -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64)
        .into_par_iter()
        .map(|i| i ^ 0x5555)
        .collect();
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let sum: u64 = buf
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .sum();
            std::hint::black_box(sum);
            (words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[2]
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

struct Row {
    precision: Precision,
    batch: usize,
    step: Duration,
    weight_bytes: usize,
}

fn bench_precision(args: &Args, precision: Precision) -> Result<Vec<Row>, String> {
    let config = args.shape.config();
    let block_size = 16;
    let longest = args.context + args.steps + 1;
    let blocks_per_seq = longest.div_ceil(block_size);
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let act = precision.activation_dtype(candle_core::DType::F32);
    let per_block = KvPool::bytes_per_block(config.n_layer, config.n_embd, block_size, act) as u64;
    let opts = EngineOptions {
        precision,
        block_size,
        kv_cache_memory: Some(per_block * (max_batch * blocks_per_seq + 1) as u64),
        ..Default::default()
    };
    let started = Instant::now();
    let mut engine =
        Engine::load(&ModelSpec::Builtin(args.shape), &opts).map_err(|e| e.to_string())?;
    engine.warm_up().map_err(|e| e.to_string())?;
    eprintln!(
        "loaded {} in {precision} in {:.1}s",
        engine.description(),
        started.elapsed().as_secs_f32()
    );
    let mut rows = Vec::new();
    for &batch in &args.batches {
        let tables: Vec<Vec<BlockId>> = (0..batch)
            .map(|s| {
                (0..blocks_per_seq)
                    .map(|b| BlockId((1 + s * blocks_per_seq + b) as u32))
                    .collect()
            })
            .collect();
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|s| {
                (0..args.context)
                    .map(|i| ((i * 31 + s * 7) % 50000) as u32)
                    .collect()
            })
            .collect();
        // Prefill every sequence (not timed).
        for (p, t) in prompts.iter().zip(&tables) {
            engine
                .forward(&[SeqChunk {
                    tokens: p,
                    start_pos: 0,
                    block_table: t,
                    want_logits: false,
                }])
                .map_err(|e| e.to_string())?;
        }
        let mut times = Vec::with_capacity(args.steps);
        for step in 0..args.steps {
            let tokens: Vec<[u32; 1]> = (0..batch)
                .map(|s| [((step * 13 + s) % 50000) as u32])
                .collect();
            let chunks: Vec<SeqChunk<'_>> = tokens
                .iter()
                .zip(&tables)
                .map(|(tok, t)| SeqChunk {
                    tokens: tok,
                    start_pos: args.context + step,
                    block_table: t,
                    want_logits: true,
                })
                .collect();
            let start = Instant::now();
            let logits = engine.forward(&chunks).map_err(|e| e.to_string())?;
            times.push(start.elapsed());
            std::hint::black_box(logits);
        }
        let step = median(times);
        eprintln!("  batch {batch}: {:.1} ms/step", step.as_secs_f64() * 1e3);
        rows.push(Row {
            precision,
            batch,
            step,
            weight_bytes: engine.streamed_weight_bytes(),
        });
    }
    Ok(rows)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let gbps = memory_bandwidth();
    eprintln!(
        "memory read bandwidth: {gbps:.1} GB/s ({} rayon threads)",
        rayon::current_num_threads()
    );
    let mut rows = Vec::new();
    for &p in &args.precisions {
        match bench_precision(&args, p) {
            Ok(r) => rows.extend(r),
            Err(e) => eprintln!("{p}: {e}"),
        }
    }
    let shape = match args.shape {
        Builtin::Tiny => "tiny",
        Builtin::Small => "small",
        Builtin::Gptj6b => "6b",
    };
    println!(
        "\nshape `{shape}`, context {} tokens, median of {} decode steps, memory {gbps:.1} GB/s\n",
        args.context, args.steps
    );
    println!("| precision | batch | ms/step | ms/token | tokens/s | weights read/step | floor ms/step | step / floor |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut json = Vec::new();
    for r in &rows {
        let ms = r.step.as_secs_f64() * 1e3;
        let floor = r.weight_bytes as f64 / (gbps * 1e9) * 1e3;
        println!(
            "| {} | {} | {ms:.2} | {:.2} | {:.1} | {:.0} MB | {floor:.2} | {:.2}x |",
            r.precision,
            r.batch,
            ms / r.batch as f64,
            r.batch as f64 / (ms / 1e3),
            r.weight_bytes as f64 / 1e6,
            ms / floor
        );
        json.push(serde_json::json!({
            "shape": shape, "precision": r.precision.to_string(), "batch": r.batch,
            "ms_per_step": ms, "tokens_per_s": r.batch as f64 / (ms / 1e3),
            "weight_bytes": r.weight_bytes, "floor_ms": floor, "memory_gbps": gbps,
        }));
    }
    if let Some(path) = &args.json {
        if let Err(e) = std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        ) {
            eprintln!("cannot write {path}: {e}");
        }
    }
}
