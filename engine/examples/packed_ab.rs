//! Throughput of the packed AVX-512 products (`linear/packed.rs`) against candle's CPU matmul (f32
//! and bf16 gemm, and QMatMul for q8_0) on the `small` shape's largest matrix (fc_in, 768 -> 3072) at
//! batch 1 and 64, with the machine's peak for scale. Run on a quiet machine:
//! `cargo run --release -p gptj-engine --example packed_ab`
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use gptj_engine::bench::packed_linear_for_bench;
use gptj_engine::Precision;
use std::time::Instant;

/// Median seconds per call over 7 rounds of `calls` calls.
fn time(
    calls: usize,
    mut f: impl FnMut() -> Result<Tensor, Box<dyn std::error::Error>>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut rounds = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..calls {
            std::hint::black_box(f()?);
        }
        rounds.push(t.elapsed().as_secs_f64() / calls as f64);
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[3])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (k, n) = (768usize, 3072usize);
    let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
    let qmm = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
    println!("| product | rows | candle (ms) | packed (ms) | speed-up | packed GMAC/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for precision in [Precision::F32, Precision::Bf16, Precision::Q8_0] {
        let Some(packed) = packed_linear_for_bench(&w, precision)? else {
            println!("no AVX-512 VNNI here: nothing to compare");
            return Ok(());
        };
        // bf16 layers take bf16 activations (on the AMX tile unit where the CPU has one);
        // candle's side is then its bf16 matmul.
        let dtype = precision.activation_dtype(DType::F32);
        let wd = w.to_dtype(dtype)?;
        for m in [1usize, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dtype)?;
            let calls = if m == 1 { 200 } else { 20 };
            let theirs = match precision {
                Precision::Q8_0 => time(calls, || Ok(qmm.forward(&x)?))?,
                _ => {
                    let x2 = Tensor::cat(&[&x, &x], 0)?;
                    let x = if m == 1 { &x2 } else { &x };
                    time(calls, || Ok(x.matmul(&wd.t()?)?))?
                }
            };
            let ours = time(calls, || Ok(packed(&x)?))?;
            println!(
                "| {precision} 768x3072 | {m} | {:.3} | {:.3} | {:.2}x | {:.1} |",
                theirs * 1e3,
                ours * 1e3,
                theirs / ours,
                (m * k * n) as f64 / ours / 1e9
            );
        }
    }
    Ok(())
}
