//! GPT-J's parallel residual, `x + attn + mlp`, as one op.
//!
//! For bf16 activations on the CPU, candle's element-wise add widens and narrows each value
//! through calls that are not inlined: in a profile of a bf16 decode step at batch 64 the two
//! adds of each block took ~9% of the step, and ~16% of a prefill. There the sum is one pass
//! of `cpu::vector::add3_bf16`, which rounds after each add exactly as the two candle adds
//! do (on CPUs without AVX-512 BF16; with it, candle rounds with `vcvtneps2bf16`, which flushes
//! subnormals: results that small differ in their last bits). Every other dtype and device
//! keeps candle's adds.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::cpu::vector;
use crate::error::Result;

/// `(x + a) + m`, each add rounded to the activation dtype. The three are the same shape.
pub(crate) fn parallel_residual(x: &Tensor, a: &Tensor, m: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::BF16 && x.device().is_cpu() {
        let (x, a, m) = (x.contiguous()?, a.contiguous()?, m.contiguous()?);
        return Ok(x.apply_op3_no_bwd(&a, &m, &Add3)?);
    }
    Ok(((x + a)? + m)?)
}

/// The bf16 sum on the CPU (see the module docs).
struct Add3;

impl CustomOp3 for Add3 {
    fn name(&self) -> &'static str {
        "gptj-parallel-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        m: &CpuStorage,
        lm: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if lx.shape() != la.shape() || lx.shape() != lm.shape() {
            candle_core::bail!(
                "parallel residual: shapes {:?}, {:?} and {:?} differ",
                lx.shape(),
                la.shape(),
                lm.shape()
            );
        }
        fn part<'s>(s: &'s CpuStorage, l: &Layout) -> candle_core::Result<&'s [bf16]> {
            let (CpuStorage::BF16(v), Some((start, end))) = (s, l.contiguous_offsets()) else {
                candle_core::bail!("parallel residual: needs contiguous bf16 tensors");
            };
            Ok(&v[start..end])
        }
        let (xv, av, mv) = (part(x, lx)?, part(a, la)?, part(m, lm)?);
        let mut out = vec![bf16::ZERO; xv.len()];
        vector::add3_bf16(xv, av, mv, &mut out);
        Ok((CpuStorage::BF16(out), lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;
    use candle_core::Device;

    /// The fused sum is candle's two adds, bit for bit (on values whose sums are normal), and
    /// other dtypes go through candle unchanged.
    #[test]
    fn equals_two_candle_adds() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F32] {
            let t = |seed: f64| {
                Tensor::arange(0f32, 3.0 * 45.0, &dev)
                    .unwrap()
                    .affine(0.173 * seed, -3.0)
                    .unwrap()
                    .sin()
                    .unwrap()
                    .reshape((3, 45))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (x, a, m) = (t(1.0), t(2.3), t(-0.7));
            let got = parallel_residual(&x, &a, &m).unwrap();
            let want = ((&x + &a).unwrap() + &m).unwrap();
            assert_eq!(values(&got), values(&want), "{dtype:?}");
        }
    }
}
