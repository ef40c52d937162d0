//! Paged attention alone on the CPU: one decode step's attention per layer for a few batch
//! sizes and context lengths (`small`'s heads, an f16 cache), and the K/V bytes it reads per
//! second. A/B the kernels with `GPTJ_CPU_KERNELS` (`avx2`, `candle` for the portable path).
//! Run on a quiet machine:
//! `cargo run --release -p gptj-engine --example attention_ab`
use gptj_engine::bench::attention_timing;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cases = [(1, 1024), (1, 2048), (8, 1024), (64, 256), (64, 1024)];
    println!("| batch | context | per layer, min (ms) | median (ms) | K+V read at the median |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for r in attention_timing(&cases, 8, 21)? {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.1} GB/s |",
            r.batch,
            r.context,
            r.min_ms,
            r.median_ms,
            r.bytes as f64 / r.median_ms / 1e6
        );
    }
    Ok(())
}
