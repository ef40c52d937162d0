//! The engine's decode-step benchmark, shared by `benches/decode.rs` (CPU) and
//! `examples/gpu_check.rs` (CUDA): the time of one decode step per precision and batch size,
//! next to the memory-bound floor (bytes of weights a step reads / memory bandwidth).

use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::batch::{BlockId, LogitRows, SeqChunk};
use crate::engine::{Builtin, DeviceKind, Engine, EngineOptions, ModelSpec};
use crate::paged::KvPool;
use crate::precision::Precision;

#[cfg(target_arch = "x86_64")]
pub use crate::cpu::peak::{dot_peak, DotKind};

/// What to measure.
#[derive(Debug, Clone)]
pub struct DecodeBench {
    /// The model shape (random weights).
    pub shape: Builtin,
    /// Precisions to load, one after another.
    pub precisions: Vec<Precision>,
    /// Batch sizes (sequences decoding together).
    pub batches: Vec<usize>,
    /// Tokens already in each sequence's cache when decoding starts.
    pub context: usize,
    /// Timed decode steps per batch size (the median is reported).
    pub steps: usize,
    /// The KV cache's format (`--kv-cache-dtype`).
    pub kv_cache: crate::KvCacheDtype,
    /// Where to run.
    pub device: DeviceKind,
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct DecodeRow {
    /// Weight precision.
    pub precision: Precision,
    /// Sequences per step.
    pub batch: usize,
    /// Median duration of one decode step.
    pub step: Duration,
    /// Bytes of weights a step reads.
    pub weight_bytes: usize,
    /// Multiply-accumulates of the step's linear layers (`batch` x the weights' elements;
    /// attention's, which grow with the context, are not counted).
    pub linear_macs: u64,
    /// Median time to prefill one prompt of `context` tokens (one sequence a step, as the
    /// prompts are written into the cache before decoding).
    pub prefill: Duration,
    /// Tokens in each prompt.
    pub context: usize,
}

impl DecodeRow {
    /// Milliseconds per step.
    pub fn step_ms(&self) -> f64 {
        self.step.as_secs_f64() * 1e3
    }

    /// Output tokens per second across the batch.
    pub fn tokens_per_s(&self) -> f64 {
        self.batch as f64 / self.step.as_secs_f64()
    }

    /// Prompt tokens per second while prefilling.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.context as f64 / self.prefill.as_secs_f64()
    }

    /// The linear layers' multiply-accumulates per second.
    pub fn macs_per_s(&self) -> f64 {
        self.linear_macs as f64 / self.step.as_secs_f64()
    }

    /// The instruction whose peak bounds this precision's products, on the instruction set
    /// the layers run on (`Isa::detect`, as `Linear::new` picks it): with the AVX2 kernels
    /// every float precision is bound by the 256-bit FMA and q8_0 by the AVX2 int8 sequence;
    /// with AVX-512, bf16 is bound by the AMX tile unit where the layers run on it, else by
    /// `vdpbf16ps`, or by the f32 FMA where they widen (no AVX-512 BF16, or
    /// `GPTJ_CPU_BF16_DOT=0`).
    #[cfg(target_arch = "x86_64")]
    pub fn dot_kind(&self) -> DotKind {
        let avx2 = matches!(crate::cpu::Isa::detect(), Some(crate::cpu::Isa::Avx2(_)));
        match self.precision {
            Precision::Q8_0 if avx2 => DotKind::Int8Avx2,
            Precision::Q8_0 => DotKind::Int8,
            _ if avx2 => DotKind::F32Avx2,
            Precision::Bf16 => {
                // As `PackedLinear::new` picks: the tile unit over pair panels, `vdpbf16ps`
                // over pair panels, or the widening f32 kernel without them.
                let cpu = crate::cpu::Avx512::detect();
                match (
                    cpu.and_then(crate::cpu::Avx512::bf16_dot),
                    cpu.and_then(crate::cpu::Avx512::amx),
                ) {
                    (Some(_), Some(_)) => DotKind::Bf16Amx,
                    (Some(_), None) => DotKind::Bf16,
                    (None, _) => DotKind::F32,
                }
            }
            Precision::Native | Precision::F32 | Precision::F16 => DotKind::F32,
        }
    }

    /// The memory-bound floor of one step at `gbps` GB/s, in milliseconds.
    pub fn floor_ms(&self, gbps: f64) -> f64 {
        self.weight_bytes as f64 / (gbps * 1e9) * 1e3
    }
}

/// Read bandwidth of main memory with all rayon threads, in GB/s: median of 5 passes over 1 GiB.
pub fn cpu_memory_bandwidth() -> f64 {
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

impl DecodeBench {
    /// Runs every precision and batch size; a precision that fails to load is reported and skipped.
    pub fn run(&self) -> Vec<DecodeRow> {
        let mut rows = Vec::new();
        for &p in &self.precisions {
            match self.run_precision(p) {
                Ok(r) => rows.extend(r),
                Err(e) => eprintln!("{p}: {e}"),
            }
        }
        rows
    }

    fn run_precision(&self, precision: Precision) -> crate::Result<Vec<DecodeRow>> {
        let config = self.shape.config();
        let block_size = 16;
        let blocks_per_seq = (self.context + self.steps + 1).div_ceil(block_size);
        let max_batch = self.batches.iter().copied().max().unwrap_or(1);
        let act = precision.activation_dtype(candle_core::DType::F32);
        let kv_format = self.kv_cache.resolve(precision, act);
        let per_block = KvPool::bytes_per_block(
            config.n_layer,
            config.n_head,
            config.head_dim(),
            block_size,
            kv_format,
        ) as u64;
        let opts = EngineOptions {
            precision,
            kv_cache_dtype: self.kv_cache,
            device: self.device,
            block_size,
            kv_cache_memory: Some(per_block * (max_batch * blocks_per_seq + 1) as u64),
            ..Default::default()
        };
        let started = Instant::now();
        let mut engine = Engine::load(&ModelSpec::Builtin(self.shape), &opts)?;
        engine.warm_up()?;
        eprintln!(
            "loaded {} in {precision} ({} KV cache) in {:.1}s",
            engine.description(),
            engine.kv_cache_format(),
            started.elapsed().as_secs_f32()
        );
        let mut rows = Vec::new();
        for &batch in &self.batches {
            let tables: Vec<Vec<BlockId>> = (0..batch)
                .map(|s| {
                    (0..blocks_per_seq)
                        .map(|b| BlockId((1 + s * blocks_per_seq + b) as u32))
                        .collect()
                })
                .collect();
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|s| {
                    (0..self.context)
                        .map(|i| ((i * 31 + s * 7) % 50000) as u32)
                        .collect()
                })
                .collect();
            let mut prefills = Vec::with_capacity(batch);
            for (p, t) in prompts.iter().zip(&tables) {
                let start = Instant::now();
                engine.forward(&[SeqChunk {
                    tokens: p,
                    start_pos: 0,
                    block_table: t,
                    logits: LogitRows::Last,
                }])?;
                prefills.push(start.elapsed());
            }
            prefills.sort();
            let mut times = Vec::with_capacity(self.steps);
            for step in 0..self.steps {
                let tokens: Vec<[u32; 1]> = (0..batch)
                    .map(|s| [((step * 13 + s) % 50000) as u32])
                    .collect();
                let chunks: Vec<SeqChunk<'_>> = tokens
                    .iter()
                    .zip(&tables)
                    .map(|(tok, t)| SeqChunk {
                        tokens: tok,
                        start_pos: self.context + step,
                        block_table: t,
                        logits: LogitRows::Last,
                    })
                    .collect();
                let start = Instant::now();
                // Logits come back to the host, so the step is complete when forward returns.
                let logits = engine.forward(&chunks)?;
                times.push(start.elapsed());
                std::hint::black_box(logits);
            }
            times.sort();
            let step = times[times.len() / 2];
            eprintln!("  batch {batch}: {:.1} ms/step", step.as_secs_f64() * 1e3);
            rows.push(DecodeRow {
                precision,
                batch,
                step,
                weight_bytes: engine.streamed_weight_bytes(),
                linear_macs: (batch * linear_params(&config)) as u64,
                prefill: prefills[prefills.len() / 2],
                context: self.context,
            });
        }
        Ok(rows)
    }
}

/// Elements of the weights one token multiplies through: per layer the attention's four
/// projections and the MLP's two, then the LM head.
fn linear_params(c: &crate::GptjConfig) -> usize {
    let d = c.n_embd;
    c.n_layer * (4 * d * d + 2 * d * c.inner_dim()) + d * c.vocab_size
}

/// A markdown table of `rows`, with the floor at `gbps` GB/s.
pub fn markdown_table(rows: &[DecodeRow], gbps: f64) -> String {
    let mut out = String::from(
        "| precision | batch | ms/step | ms/token | tokens/s | weights read/step | floor ms/step | step / floor | prefill tokens/s |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let (ms, floor) = (r.step_ms(), r.floor_ms(gbps));
        out.push_str(&format!(
            "| {} | {} | {ms:.2} | {:.2} | {:.1} | {:.0} MB | {floor:.2} | {:.2}x | {:.0} |\n",
            r.precision,
            r.batch,
            ms / r.batch as f64,
            r.tokens_per_s(),
            r.weight_bytes as f64 / 1e6,
            ms / floor,
            r.prefill_tokens_per_s()
        ));
    }
    out
}

/// A markdown table of the machine's dot-product peaks (all `threads` at once) and of each
/// row's linear multiply-accumulates as a fraction of its precision's peak.
#[cfg(target_arch = "x86_64")]
pub fn peak_table(rows: &[DecodeRow], threads: usize) -> String {
    let kinds = [
        DotKind::Int8,
        DotKind::Bf16,
        DotKind::Bf16Amx,
        DotKind::F32,
        DotKind::Int8Avx2,
        DotKind::F32Avx2,
    ];
    let peaks: Vec<(DotKind, Option<f64>)> =
        kinds.iter().map(|&k| (k, dot_peak(k, threads))).collect();
    let peak_of = |k: DotKind| peaks.iter().find(|(p, _)| *p == k).and_then(|(_, v)| *v);
    let mut out = format!("| instruction | peak, {threads} threads |\n| --- | ---: |\n");
    for (k, v) in &peaks {
        let v = v.map_or("not on this CPU, or turned off".to_string(), |v| {
            format!("{:.0} GMAC/s", v / 1e9)
        });
        out.push_str(&format!("| {} | {v} |\n", k.name()));
    }
    out.push_str(
        "\n| precision | batch | linear GMAC/step | GMAC/s | against | fraction of peak |\n\
         | --- | ---: | ---: | ---: | --- | ---: |\n",
    );
    for r in rows {
        let k = r.dot_kind();
        let fraction = peak_of(k).map_or("-".to_string(), |p| {
            format!("{:.0}%", 100.0 * r.macs_per_s() / p)
        });
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} | {} | {fraction} |\n",
            r.precision,
            r.batch,
            r.linear_macs as f64 / 1e9,
            r.macs_per_s() / 1e9,
            k.name()
        ));
    }
    out
}

/// The streaming bf16 CPU matmul, exposed for `examples/gemv_ab.rs` (not a stable API).
#[doc(hidden)]
pub fn streaming_matmul_for_bench(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
) -> crate::Result<candle_core::Tensor> {
    crate::linear::streaming_matmul(x, w)
}

/// A linear layer on the packed CPU kernels (`linear/packed.rs`), exposed for
/// `examples/packed_ab.rs` (not a stable API). `None` where the CPU has neither AVX-512 VNNI
/// nor AVX2 and FMA, or the packed kernels have no form for this precision and shape there.
#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
pub fn packed_linear_for_bench(
    weight: &candle_core::Tensor,
    precision: Precision,
) -> crate::Result<Option<impl Fn(&candle_core::Tensor) -> crate::Result<candle_core::Tensor>>> {
    use crate::linear::packed::{PackedKind, PackedLinear};
    use crate::linear::Activation;
    let Some(cpu) = crate::cpu::Isa::detect() else {
        return Ok(None);
    };
    let act = precision.activation_dtype(candle_core::DType::F32);
    let Some(kind) = PackedKind::choose(precision, act, weight.dim(1)?) else {
        return Ok(None);
    };
    let lin = PackedLinear::new(cpu, weight, None, kind)?;
    Ok(Some(move |x: &candle_core::Tensor| {
        lin.forward(x, Activation::Identity)
    }))
}

/// The packed kernels exist only on x86-64: always `None` elsewhere.
#[doc(hidden)]
#[cfg(not(target_arch = "x86_64"))]
pub fn packed_linear_for_bench(
    weight: &candle_core::Tensor,
    precision: Precision,
) -> crate::Result<Option<impl Fn(&candle_core::Tensor) -> crate::Result<candle_core::Tensor>>> {
    let _ = (weight, precision);
    Ok(None::<fn(&candle_core::Tensor) -> crate::Result<candle_core::Tensor>>)
}

/// One paged-attention timing (`attention_timing`): a decode step of `batch` sequences, each
/// attending over `context` positions of an f16 cache with `small`'s geometry (12 heads of
/// 64, blocks of 16).
#[derive(Debug, Clone, Copy)]
pub struct AttentionRow {
    pub batch: usize,
    pub context: usize,
    /// Per layer, the fastest and the median of the rounds.
    pub min_ms: f64,
    pub median_ms: f64,
    /// The K and V bytes one layer reads.
    pub bytes: usize,
}

/// Times paged attention alone (the op the model calls, on the kernel `GPTJ_CPU_KERNELS`
/// picks) for each `(batch, context)`: one decode token per sequence over `layers` separate
/// caches of `format`, so that one round reads more than a last-level cache holds, `rounds`
/// rounds. The caches are filled first through the model's own write (never-written memory
/// would all map to one zero page and stay in cache).
#[doc(hidden)]
pub fn attention_timing(
    cases: &[(usize, usize)],
    format: crate::KvFormat,
    layers: usize,
    rounds: usize,
) -> crate::Result<Vec<AttentionRow>> {
    use candle_core::{Device, Tensor};
    let (heads, dim, block_size) = (12usize, 64usize, 16usize);
    let width = heads * dim;
    let mut rows = Vec::new();
    for &(batch, context) in cases {
        if batch == 0 || context == 0 {
            return Err(crate::EngineError::InvalidInput(format!(
                "attention timing: batch {batch} x context {context}: both must be at least 1"
            )));
        }
        let per_seq = context.div_ceil(block_size);
        let num_blocks = batch * per_seq;
        let pool = KvPool::new(
            layers,
            heads,
            dim,
            num_blocks,
            block_size,
            format,
            &Device::Cpu,
        )?;
        let tables: Vec<Vec<BlockId>> = (0..batch)
            .map(|s| {
                (0..per_seq)
                    .map(|b| BlockId((s * per_seq + b) as u32))
                    .collect()
            })
            .collect();
        // Every sequence's `context` positions, written as one prefill step per layer.
        let prompt = vec![0u32; context];
        let prefill: Vec<SeqChunk<'_>> = tables
            .iter()
            .map(|table| SeqChunk {
                tokens: &prompt,
                start_pos: 0,
                block_table: table,
                logits: LogitRows::Last,
            })
            .collect();
        let fill = crate::paged::StepLayout::new(&prefill, block_size, num_blocks, context)?;
        for l in 0..layers {
            let values: Vec<f32> = (0..batch * context * width)
                .map(|i| ((i * 7919 + l) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let kv = Tensor::from_vec(values, (batch * context, heads, dim), &Device::Cpu)?;
            crate::attention::write_kv(pool.layer(l), &kv, &kv, &fill)?;
        }
        let q_values: Vec<f32> = (0..batch * width)
            .map(|i| ((i * 31) % 97) as f32 / 97.0)
            .collect();
        let q = Tensor::from_vec(q_values, (batch, heads, dim), &Device::Cpu)?;
        let tokens = vec![0u32; batch];
        let chunks: Vec<SeqChunk<'_>> = tables
            .iter()
            .enumerate()
            .map(|(s, table)| SeqChunk {
                tokens: &tokens[s..s + 1],
                start_pos: context - 1,
                block_table: table,
                logits: LogitRows::Last,
            })
            .collect();
        let step = crate::paged::StepLayout::new(&chunks, block_size, num_blocks, context)?;
        let scale = 1.0 / (dim as f32).sqrt();
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds.max(1) {
            let started = Instant::now();
            for l in 0..layers {
                std::hint::black_box(crate::attention::paged_attention(
                    &q,
                    pool.layer(l),
                    &step,
                    scale,
                )?);
            }
            times.push(started.elapsed().as_secs_f64() * 1e3 / layers as f64);
        }
        times.sort_by(f64::total_cmp);
        rows.push(AttentionRow {
            batch,
            context,
            min_ms: times[0],
            median_ms: times[times.len() / 2],
            bytes: batch * context * 2 * format.bytes_per_token(heads, dim),
        });
    }
    Ok(rows)
}
