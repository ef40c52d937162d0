//! Decode steps over two or more KV cache formats in one process, step by step in turn, so
//! that a noisy machine's slow spells fall on every format alike (the decode bench runs one
//! format per process, minutes apart). `small`'s random weights in one precision, `batch`
//! sequences of `context` tokens each, then `steps` rounds of one decode step per format.
//! Run on a quiet machine:
//! `cargo run --release -p gptj-engine --example kv_ab -- [precision] [batch] [context] [steps] [formats]`
//! e.g. `... -- q8_0 64 1000 20 f16,int8`.
use std::time::Instant;

use gptj_engine::{
    BlockId, Builtin, Engine, EngineOptions, KvCacheDtype, KvPool, LogitRows, ModelSpec, Precision,
    SeqChunk,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let precision: Precision = arg(0, "q8_0").parse()?;
    let batch: usize = arg(1, "64").parse()?;
    let context: usize = arg(2, "1000").parse()?;
    let steps: usize = arg(3, "20").parse()?;
    let formats: Vec<KvCacheDtype> = arg(4, "f16,int8")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let config = Builtin::Small.config();
    let block_size = 16;
    let per_seq = (context + steps + 1).div_ceil(block_size);
    let tables: Vec<Vec<BlockId>> = (0..batch)
        .map(|s| {
            (0..per_seq)
                .map(|b| BlockId((s * per_seq + b) as u32))
                .collect()
        })
        .collect();
    let mut engines = Vec::new();
    for &kv in &formats {
        let format = kv.resolve(
            precision,
            precision.activation_dtype(candle_core::DType::F32),
        );
        let per_block = KvPool::bytes_per_block(
            config.n_layer,
            config.n_head,
            config.head_dim(),
            block_size,
            format,
        );
        let opts = EngineOptions {
            precision,
            kv_cache_dtype: kv,
            block_size,
            kv_cache_memory: Some((per_block * (batch * per_seq + 1)) as u64),
            ..Default::default()
        };
        let mut engine = Engine::load(&ModelSpec::Builtin(Builtin::Small), &opts)?;
        let started = Instant::now();
        for (s, table) in tables.iter().enumerate() {
            let prompt: Vec<u32> = (0..context)
                .map(|i| ((i * 31 + s * 7) % 50000) as u32)
                .collect();
            engine.forward(&[SeqChunk {
                tokens: &prompt,
                start_pos: 0,
                block_table: table,
                logits: LogitRows::Last,
            }])?;
        }
        eprintln!(
            "{format} cache: {batch} prompts of {context} prefilled in {:.1}s",
            started.elapsed().as_secs_f32()
        );
        engines.push((format, engine, Vec::with_capacity(steps)));
    }
    for step in 0..steps {
        let tokens: Vec<[u32; 1]> = (0..batch)
            .map(|s| [((step * 13 + s) % 50000) as u32])
            .collect();
        let chunks: Vec<SeqChunk<'_>> = tokens
            .iter()
            .zip(&tables)
            .map(|(tok, table)| SeqChunk {
                tokens: tok,
                start_pos: context + step,
                block_table: table,
                logits: LogitRows::Last,
            })
            .collect();
        for (_, engine, times) in &mut engines {
            let started = Instant::now();
            std::hint::black_box(engine.forward(&chunks)?);
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!("| {precision}, batch {batch}, context {context} | min ms/step | median ms/step |");
    println!("| --- | ---: | ---: |");
    for (format, _, times) in &mut engines {
        times.sort_by(f64::total_cmp);
        println!(
            "| {format} cache | {:.1} | {:.1} |",
            times[0],
            times[times.len() / 2]
        );
    }
    Ok(())
}
