//! Is row 0 of x @ W^T bitwise the same whatever the number of rows? (candle gemm, QMatMul)
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let dims: Vec<(usize, usize)> = std::env::args()
        .skip(1)
        .map(|a| {
            let (k, n) = a.split_once('x').unwrap();
            (k.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    let dims = if dims.is_empty() {
        vec![(768usize, 3072usize)]
    } else {
        dims
    };
    for (k, n) in dims {
        println!("k={k} n={n}");
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (128, k), &dev)?;
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (wd, xd) = (w.to_dtype(dtype)?, x.to_dtype(dtype)?);
            let wt = wd.t()?.contiguous()?;
            // Reference: row 0 computed inside a 2-row product.
            let base = xd
                .narrow(0, 0, 2)?
                .matmul(&wd.t()?)?
                .narrow(0, 0, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let base_t = xd
                .narrow(0, 0, 2)?
                .matmul(&wt)?
                .narrow(0, 0, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut line = format!("{dtype:?} strided:");
            let mut line_t = format!("{dtype:?} contig :");
            for m in [1usize, 3, 4, 5, 8, 16, 17, 32, 64, 128] {
                let r = xd
                    .narrow(0, 0, m)?
                    .matmul(&wd.t()?)?
                    .narrow(0, 0, 1)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let rt = xd
                    .narrow(0, 0, m)?
                    .matmul(&wt)?
                    .narrow(0, 0, 1)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let d = r
                    .iter()
                    .zip(&base)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                let dt = rt
                    .iter()
                    .zip(&base_t)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                line.push_str(&format!(" m{m}:{d}"));
                line_t.push_str(&format!(" m{m}:{dt}"));
            }
            println!("{line}\n{line_t}");
        }
        let base = q
            .forward(&x.narrow(0, 0, 1)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut line = String::from("q8_0:");
        for m in [2usize, 3, 4, 5, 8, 16, 17, 32, 64, 128] {
            let r = q
                .forward(&x.narrow(0, 0, m)?)?
                .narrow(0, 0, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let d = r
                .iter()
                .zip(&base)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            line.push_str(&format!(" m{m}:{d}"));
        }
        println!("{line}   (count of differing outputs out of {n})");
    }
    Ok(())
}
