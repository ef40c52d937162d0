//! Decode-step benchmark of the engine alone (no scheduler, no HTTP) on the CPU: the time of
//! one decode step per precision and batch size, next to the memory-bound floor (weight bytes
//! a step reads / measured memory bandwidth).
//!
//! ```text
//! cargo bench --bench decode -- [--shape tiny|small|6b] [--precisions f32,f16,bf16,q8_0]
//!     [--batches 1,8,32] [--context 128] [--steps 8] [--kv-cache-dtype auto|f16|int8|...]
//!     [--json out.json]
//! ```
//! Benchmark on a quiet machine: any other busy process slows a 2-thread run 10-40x.

use gptj_engine::bench::{cpu_memory_bandwidth, markdown_table, DecodeBench};
use gptj_engine::{Builtin, DeviceKind, KvCacheDtype, Precision};

fn parse_args() -> Result<(DecodeBench, Option<String>), String> {
    let mut bench = DecodeBench {
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
        kv_cache: KvCacheDtype::Auto,
        device: DeviceKind::Cpu,
    };
    let mut json = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--shape" => {
                bench.shape = match value()?.as_str() {
                    "tiny" => Builtin::Tiny,
                    "small" => Builtin::Small,
                    "6b" => Builtin::Gptj6b,
                    other => return Err(format!("unknown shape {other}")),
                }
            }
            "--precisions" => {
                bench.precisions = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--batches" => {
                bench.batches = value()?
                    .split(',')
                    .map(|b| b.parse().map_err(|e| format!("{b}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--context" => {
                bench.context = value()?.parse().map_err(|e| format!("--context: {e}"))?
            }
            "--steps" => bench.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--kv-cache-dtype" => bench.kv_cache = value()?.parse()?,
            "--json" => json = Some(value()?),
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((bench, json))
}

fn main() {
    let (bench, json) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let gbps = cpu_memory_bandwidth();
    eprintln!(
        "memory read bandwidth: {gbps:.1} GB/s ({} rayon threads)",
        rayon::current_num_threads()
    );
    let rows = bench.run();
    println!(
        "\nshape `{:?}`, context {} tokens, KV cache {}, median of {} decode steps, memory {gbps:.1} GB/s\n",
        bench.shape, bench.context, bench.kv_cache, bench.steps
    );
    print!("{}", markdown_table(&rows, gbps));
    #[cfg(target_arch = "x86_64")]
    {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "\nlinear layers against the dot-product peaks (`gptj_engine::bench::dot_peak`)\n"
        );
        print!("{}", gptj_engine::bench::peak_table(&rows, threads));
    }
    if let Some(path) = json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "shape": format!("{:?}", bench.shape), "precision": r.precision.to_string(), "batch": r.batch,
                    "ms_per_step": r.step_ms(), "tokens_per_s": r.tokens_per_s(),
                    "prefill_tokens_per_s": r.prefill_tokens_per_s(), "weight_bytes": r.weight_bytes, "linear_macs": r.linear_macs, "floor_ms": r.floor_ms(gbps), "memory_gbps": gbps,
                })
            })
            .collect();
        if let Err(e) = std::fs::write(
            &path,
            serde_json::to_string_pretty(&rows).unwrap_or_default(),
        ) {
            eprintln!("cannot write {path}: {e}");
        }
    }
}
