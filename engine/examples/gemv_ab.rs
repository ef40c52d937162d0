//! A/B of the streaming matmul (`linear/streaming.rs`, used for bf16) against candle's gemm on GPT-J-6B-sized
//! matrices (4096 x 4096), cycling through enough distinct weights (>= 1.5 GB) that none stays
//! in the L3 cache. Reports the best of 3 passes. Run on a quiet machine:
//! `cargo run --release -p gptj-engine --example gemv_ab`
use candle_core::{DType, Device, Tensor};
use gptj_engine::bench::streaming_matmul_for_bench as ours;
use std::time::Instant;

fn best_of_3(
    count: usize,
    mut f: impl FnMut(usize) -> Result<Tensor, Box<dyn std::error::Error>>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for i in 0..count {
            std::hint::black_box(f(i)?);
        }
        best = best.min(t.elapsed().as_secs_f64() / count as f64);
    }
    Ok(best)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (k, n) = (4096usize, 4096usize);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let count = if dtype == DType::F32 { 24 } else { 48 };
        let ws: Vec<Tensor> = (0..count)
            .map(|_| Tensor::randn(0f32, 0.02, (n, k), &dev).and_then(|t| t.to_dtype(dtype)))
            .collect::<candle_core::Result<_>>()?;
        let wts: Vec<Tensor> = ws
            .iter()
            .map(|w| w.t().and_then(|t| t.contiguous()))
            .collect::<candle_core::Result<_>>()?;
        let gbps = |secs: f64| (k * n * dtype.size_in_bytes()) as f64 / secs / 1e9;
        for m in [1usize, 2, 4] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dtype)?;
            let rows = best_of_3(count, |i| Ok(ours(&x, &ws[i])?))?;
            let strided = best_of_3(count, |i| Ok(x.matmul(&ws[i].t()?)?))?;
            let contig = best_of_3(count, |i| Ok(x.matmul(&wts[i])?))?;
            println!(
                "{dtype:?} m={m}: ours {:.1} GB/s | candle w.t() {:.1} | candle contiguous (in,out) {:.1}",
                gbps(rows), gbps(strided), gbps(contig)
            );
        }
    }
    Ok(())
}
