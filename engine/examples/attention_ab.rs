//! Paged attention alone on the CPU: one decode step's attention per layer for a few batch
//! sizes and context lengths (`small`'s heads), and the K/V bytes it reads per second, for
//! each KV cache format named on the command line (default `f16 int8`). A/B the kernels with
//! `GPTJ_CPU_KERNELS` (`avx2`, `candle` for the portable path). Run on a quiet machine:
//! `cargo run --release -p gptj-engine --example attention_ab -- f16 int8`
use gptj_engine::bench::attention_timing;
use gptj_engine::{KvCacheDtype, Precision};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut formats: Vec<String> = std::env::args().skip(1).collect();
    if formats.is_empty() {
        formats = vec!["f16".into(), "int8".into()];
    }
    let cases = [(1, 1024), (1, 2048), (8, 1024), (64, 256), (64, 1024)];
    println!(
        "| cache | batch | context | per layer, min (ms) | median (ms) | K+V read at the median |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for name in formats {
        let format = name
            .parse::<KvCacheDtype>()?
            .resolve(Precision::Q8_0, candle_core::DType::F32);
        for r in attention_timing(&cases, format, 8, 21)? {
            println!(
                "| {format} | {} | {} | {:.3} | {:.3} | {:.1} GB/s |",
                r.batch,
                r.context,
                r.min_ms,
                r.median_ms,
                r.bytes as f64 / r.median_ms / 1e6
            );
        }
    }
    Ok(())
}
