//! A streaming matrix product for bf16 weights on the CPU.
//!
//! candle 0.11 has no bf16 gemm on CPU: it widens the whole weight to f32 on every call, which
//! makes a GPT-J decode step 10x slower than in f16. Here each weight element is read once,
//! widened to f32 in chunks that stay in L1, and used for every row of the batch (AVX2/FMA
//! kernels picked at run time); threads split the weight into long contiguous ranges so the
//! memory system can stream it. Each output is accumulated in the same order whatever the
//! number of rows, so a row's result does not depend on what else is in the batch.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{vector, Elem};
use crate::error::Result;

/// `x @ w^T` for `x` `(m, k)` and `w` stored `(n, k)` (the checkpoint's `(out, in)` layout).
pub(crate) fn streaming_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op2_no_bwd(w, &StreamingMatmul)?)
}

struct StreamingMatmul;

/// Widening chunk: 256 f32 (1 KiB) stays in L1 next to the accumulators.
const CHUNK: usize = 256;

/// Splits `0..n` into `per_thread` ranges per pool thread, each at least `min` long.
fn ranges(n: usize, per_thread: usize, min: usize) -> Vec<(usize, usize)> {
    let per = n
        .div_ceil(rayon::current_num_threads() * per_thread)
        .max(min);
    (0..n.div_ceil(per))
        .map(|t| (t * per, ((t + 1) * per).min(n)))
        .collect()
}

/// `w` is `(n, k)` row-major: output `j` of row `r` is `dot(w[j], x[r])`. Threads take ranges
/// of output rows, so each streams a contiguous slab of the weight.
fn rowdot<T: Elem>(x: &[f32], m: usize, k: usize, w: &[T], n: usize) -> Vec<f32> {
    let parts: Vec<((usize, usize), Vec<f32>)> = ranges(n, 4, 16)
        .into_par_iter()
        .map(|(j0, j1)| {
            let mut res = vec![0f32; m * (j1 - j0)];
            let mut buf = [0f32; CHUNK];
            let mut sums = vec![0f32; m];
            for j in j0..j1 {
                let row = &w[j * k..(j + 1) * k];
                sums.fill(0.0);
                for (c, seg) in row.chunks(CHUNK).enumerate() {
                    let wf = T::as_f32(seg, &mut buf);
                    for (r, s) in sums.iter_mut().enumerate() {
                        let xs = &x[r * k + c * CHUNK..r * k + c * CHUNK + seg.len()];
                        *s += vector::dot(xs, wf);
                    }
                }
                for (r, s) in sums.iter().enumerate() {
                    res[r * (j1 - j0) + (j - j0)] = *s;
                }
            }
            ((j0, j1), res)
        })
        .collect();
    let mut out = vec![0f32; m * n];
    for ((j0, j1), res) in parts {
        let width = j1 - j0;
        for r in 0..m {
            out[r * n + j0..r * n + j1].copy_from_slice(&res[r * width..(r + 1) * width]);
        }
    }
    out
}

impl StreamingMatmul {
    fn run<T: Elem>(
        &self,
        x: &[T],
        x_l: &Layout,
        w: &[T],
        w_l: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (Some((xs, xe)), Some((ws, we))) = (x_l.contiguous_offsets(), w_l.contiguous_offsets())
        else {
            candle_core::bail!("streaming matmul needs contiguous operands");
        };
        let (x, w) = (&x[xs..xe], &w[ws..we]);
        let (m, k) = x_l.shape().dims2()?;
        let (a, b) = w_l.shape().dims2()?;
        let (n, wk) = (a, b);
        if wk != k {
            candle_core::bail!("streaming matmul: x is {m}x{k} but the weight is {a}x{b}");
        }
        let mut xf = vec![0f32; x.len()];
        for (chunk, dst) in x.chunks(CHUNK).zip(xf.chunks_mut(CHUNK)) {
            let mut buf = [0f32; CHUNK];
            dst.copy_from_slice(T::as_f32(chunk, &mut buf));
        }
        let out = rowdot(&xf, m, k, w, n);
        Ok((
            out.into_iter().map(T::narrow).collect(),
            Shape::from((m, n)),
        ))
    }
}

impl CustomOp2 for StreamingMatmul {
    fn name(&self) -> &'static str {
        "gptj-streaming-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok(match (x, w) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (o, s) = self.run(x, x_l, w, w_l)?;
                (CpuStorage::F32(o), s)
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                let (o, s) = self.run(x, x_l, w, w_l)?;
                (CpuStorage::F16(o), s)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                let (o, s) = self.run(x, x_l, w, w_l)?;
                (CpuStorage::BF16(o), s)
            }
            (x, w) => candle_core::bail!(
                "streaming matmul: unsupported dtypes {:?} x {:?}",
                x.dtype(),
                w.dtype()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use half::bf16;

    /// The slice-level product against plain dot products, across a widening chunk boundary
    /// and in bf16. Plain Rust over slices (Miri).
    #[test]
    fn rowdot_matches_plain_dot_products() {
        let (m, k, n) = (2, CHUNK + 44, 3);
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) / 8.0).collect();
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(((i % 7) as f32 - 3.0) / 4.0))
            .collect();
        let out = rowdot(&x, m, k, &w, n);
        for r in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[j * k + i].to_f32()).sum();
                let got = out[r * n + j];
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{r},{j}: {got} vs {want}"
                );
            }
        }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_candle_matmul_in_every_dtype() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 64, 48), (3, 300, 70), (4, 768, 2304), (9, 1000, 1030)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let (xd, wd) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
                let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let reference = f32(&xd).matmul(&f32(&wd).t().unwrap()).unwrap();
                let got = f32(&streaming_matmul(&xd, &wd).unwrap());
                let err = max_abs(&(got - &reference).unwrap()) / max_abs(&reference);
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(err < tol, "{m}x{k}x{n} {dtype:?}: relative error {err}");
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (37, 768), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let w = Tensor::randn(0f32, 0.1, (1000, 768), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let alone = streaming_matmul(&x.narrow(0, 5, 1).unwrap(), &w).unwrap();
        let batched = streaming_matmul(&x, &w).unwrap().narrow(0, 5, 1).unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(bits(&alone), bits(&batched));
    }
}
