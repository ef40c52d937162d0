//! GPT-J's rotary embedding (`rope_i`: interleaved pairs) of a step's queries or keys, as one
//! vector pass on the CPU.
//!
//! candle's `rope_i` runs a scalar loop on one thread when each "batch" has one position,
//! which is how a step's tokens come (each at its own position): ~9% of a bf16 decode step at
//! batch 64 in a profile, with the second core waiting. Here each token's heads go through
//! `cpu::vector::rope_pairs`, which computes candle's arithmetic with the same rounding, bit
//! for bit (`rope_pairs_match_the_scalar_arithmetic`, and the test below against candle). f32
//! and bf16 on the CPU take this path; other dtypes and devices keep candle's.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::cpu::vector::{self, RopeElem};
use crate::error::Result;

/// Rotates `x`, `(tokens, heads, 2 * half)`, by `cos` and `sin`, `(tokens, half)`: token `t`'s
/// pair `j` of every head by the angle whose cosine and sine are `cos[t][j]`, `sin[t][j]`.
pub(crate) fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, heads, d) = x.dims3()?;
    let ours = matches!(x.dtype(), DType::F32 | DType::BF16) && x.device().is_cpu();
    if !ours {
        let half = d / 2;
        let (c, s) = (cos.reshape((n, 1, half))?, sin.reshape((n, 1, half))?);
        let y = candle_nn::rotary_emb::rope_i(&x.reshape((n, heads, 1, d))?.contiguous()?, &c, &s)?;
        return Ok(y.reshape((n, heads, d))?);
    }
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    Ok(x.apply_op3_no_bwd(&cos, &sin, &RopeInterleaved)?)
}

struct RopeInterleaved;

/// Every token's heads of `x` rotated by that token's row of `cos` and `sin`.
fn rotate<T: RopeElem + Default + Clone>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    tokens: usize,
    heads: usize,
    d: usize,
) -> Vec<T> {
    let half = d / 2;
    let mut out = vec![T::default(); x.len()];
    for t in 0..tokens {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for h in 0..heads {
            let at = (t * heads + h) * d;
            vector::rope_pairs(&x[at..at + d], c, s, &mut out[at..at + d]);
        }
    }
    out
}

impl CustomOp3 for RopeInterleaved {
    fn name(&self) -> &'static str {
        "gptj-rope-interleaved"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (tokens, heads, d) = lx.shape().dims3()?;
        let half = d / 2;
        if d % 2 != 0
            || lc.shape().dims2()? != (tokens, half)
            || ls.shape().dims2()? != (tokens, half)
        {
            candle_core::bail!(
                "rotary: x {:?} does not match cos {:?} and sin {:?}",
                lx.shape(),
                lc.shape(),
                ls.shape()
            );
        }
        let span = |l: &Layout| match l.contiguous_offsets() {
            Some((start, end)) => Ok(start..end),
            None => candle_core::bail!("rotary: needs contiguous tensors"),
        };
        let (rx, rc, rs) = (span(lx)?, span(lc)?, span(ls)?);
        let out = match (x, cos, sin) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(rotate(&x[rx], &c[rc], &s[rs], tokens, heads, d))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                CpuStorage::BF16(rotate::<bf16>(&x[rx], &c[rc], &s[rs], tokens, heads, d))
            }
            _ => candle_core::bail!("rotary: f32 or bf16, all three the same"),
        };
        Ok((out, lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;
    use candle_core::Device;

    /// The same bits as candle's `rope_i` with one position per batch entry, in f32 and bf16.
    #[test]
    fn equals_candles_rope_i() {
        let dev = Device::Cpu;
        let (n, heads, d) = (5, 3, 20);
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::randn(0f32, 1.0, (n, heads, d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let angles = Tensor::randn(0f32, 3.0, (n, d / 2), &dev).unwrap();
            let cos = angles.cos().unwrap().to_dtype(dtype).unwrap();
            let sin = angles.sin().unwrap().to_dtype(dtype).unwrap();
            let got = rope_interleaved(&x, &cos, &sin).unwrap();
            let want = candle_nn::rotary_emb::rope_i(
                &x.reshape((n, heads, 1, d)).unwrap(),
                &cos.reshape((n, 1, d / 2)).unwrap(),
                &sin.reshape((n, 1, d / 2)).unwrap(),
            )
            .unwrap()
            .reshape((n, heads, d))
            .unwrap();
            assert_eq!(values(&got), values(&want), "{dtype:?}");
        }
    }
}
