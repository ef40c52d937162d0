//! f32/f16 gemm speed with the weight strided (`w.t()` of `(out, in)`) or contiguous `(in, out)`,
//! at several batch sizes, on GPT-J-small-sized matrices (768 x 3072), best of 5.
use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F16] {
        let ws: Vec<Tensor> = (0..24)
            .map(|_| Tensor::randn(0f32, 0.02, (3072, 768), &dev).and_then(|t| t.to_dtype(dtype)))
            .collect::<candle_core::Result<_>>()?;
        let wts: Vec<Tensor> = ws
            .iter()
            .map(|w| w.t().and_then(|t| t.contiguous()))
            .collect::<candle_core::Result<_>>()?;
        for m in [2usize, 8, 32, 64, 256] {
            let x = Tensor::randn(0f32, 1.0, (m, 768), &dev)?.to_dtype(dtype)?;
            let (mut a, mut b) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let t = Instant::now();
                for w in &ws {
                    std::hint::black_box(x.matmul(&w.t()?)?);
                }
                a = a.min(t.elapsed().as_secs_f64() / 24.0);
                let t = Instant::now();
                for w in &wts {
                    std::hint::black_box(x.matmul(w)?);
                }
                b = b.min(t.elapsed().as_secs_f64() / 24.0);
            }
            let gf = |s: f64| 2.0 * (m * 768 * 3072) as f64 / s / 1e9;
            println!("{dtype:?} m={m}: strided {:.3} ms ({:.0} GFLOP/s), contiguous {:.3} ms ({:.0} GFLOP/s)", a * 1e3, gf(a), b * 1e3, gf(b));
        }
    }
    Ok(())
}
