//! Linear layers, `y = act(x W^T + b)`, and the policy that picks a kernel for each: the
//! model asks for a layer in a precision on a device, and gets the fastest kernel that keeps
//! a row's result independent of the batch around it.
//!
//! | where | precision | kernel |
//! | --- | --- | --- |
//! | CPU with AVX-512 VNNI | all | `packed`: weights repacked into 16-column panels, own AVX-512 kernels, activation fused; bf16 on the AMX tile unit where the CPU has AMX-BF16 |
//! | CPU with AVX2, FMA and F16C | all | `packed`, its AVX2 kernels (the same panels) |
//! | other CPUs | q8_0 | candle's `QMatMul` |
//! | other CPUs | bf16 | `streaming`: gptj's AVX2 streaming product (candle 0.11 has no bf16 gemm on CPU) |
//! | other CPUs | f32, f16 | candle's gemm, the weight laid out as measured fastest and batch-invariant |
//! | CUDA | q8_0 | candle's `QMatMul` |
//! | CUDA | f32, f16, bf16 | candle's matmul (cuBLAS) |
//!
//! Batch invariance (a row's bits do not depend on the other rows) holds for every CPU kernel
//! here (measured with `examples/invariance.rs`): the packed and streaming kernels by
//! construction; candle's gemm for any batch of two rows or more, so one row is run as two;
//! its strided f32 layout only with 256 output columns or more, so narrower f32 matrices use
//! the contiguous one.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;
use crate::precision::Precision;

mod activation;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod packed;
mod streaming;
#[cfg(target_arch = "x86_64")]
mod tile;

pub(crate) use activation::Activation;
pub(crate) use streaming::streaming_matmul;

/// A linear layer `y = act(x W^T + b)` on the kernel `Linear::new` chose for it.
#[derive(Debug)]
pub(crate) struct Linear {
    kernel: Kernel,
}

#[derive(Debug)]
enum Kernel {
    /// candle's gemm. `weight` is `(out, in)` as stored in the checkpoint, multiplied as
    /// `x @ weight.t()`, or on CPU kept transposed `(in, out)` and contiguous (`transposed`)
    /// where that is faster or needed for batch invariance (see `Linear::new`).
    Gemm {
        weight: Tensor,
        bias: Option<Tensor>,
        transposed: bool,
    },
    /// bf16 on CPU without AVX-512, where candle has no bf16 gemm: see `streaming`.
    Streaming {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Weights repacked for the AVX-512 kernels (`packed`): every precision on CPUs that have
    /// them. The bias and the activation are applied in the kernel.
    #[cfg(target_arch = "x86_64")]
    Packed(packed::PackedLinear),
    /// 8-bit block-quantized weights (ggml Q8_0), f32 activations.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
        bytes: usize,
    },
}

impl Linear {
    /// A layer for `weight` (`(out, in)`, as in the checkpoint) and `bias` (`(out,)`), its
    /// weights stored in `precision`, taking and returning activations of dtype `act` on
    /// `device`.
    pub(crate) fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        precision: Precision,
        act: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            kernel: Kernel::choose(weight, bias, precision, act, device)?,
        })
    }

    /// Bytes of weights one forward reads.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.kernel {
            Kernel::Gemm { weight, .. } | Kernel::Streaming { weight, .. } => {
                weight.elem_count() * weight.dtype().size_in_bytes()
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Packed(p) => p.weight_bytes(),
            Kernel::Quantized { bytes, .. } => *bytes,
        }
    }

    /// `act(x W^T + b)` for `x` `(rows, in)`.
    pub(crate) fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (y, bias) = match &self.kernel {
            Kernel::Gemm {
                weight,
                bias,
                transposed,
            } => {
                // One row would take candle's gemv path, whose rounding differs from the
                // gemm's: run it as two rows so a row's result never depends on the batch.
                let one_row = x.device().is_cpu() && x.dim(0)? == 1;
                let xs = if one_row {
                    Tensor::cat(&[x, x], 0)?
                } else {
                    x.clone()
                };
                let y = if *transposed {
                    xs.matmul(weight)?
                } else {
                    xs.matmul(&weight.t()?)?
                };
                (if one_row { y.narrow(0, 0, 1)? } else { y }, bias)
            }
            Kernel::Streaming { weight, bias } => (streaming_matmul(x, weight)?, bias),
            #[cfg(target_arch = "x86_64")]
            Kernel::Packed(p) => return p.forward(x, act),
            Kernel::Quantized { weight, bias, .. } => (weight.forward(x)?, bias),
        };
        let y = match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        act.apply(y)
    }
}

impl Kernel {
    fn choose(
        weight: Tensor,
        bias: Option<Tensor>,
        precision: Precision,
        act: DType,
        device: &Device,
    ) -> Result<Self> {
        let bias = bias
            .map(|b| b.to_dtype(act).and_then(|b| b.to_device(device)))
            .transpose()?;
        let in_dim = weight.dim(1)?;
        #[cfg(target_arch = "x86_64")]
        if device.is_cpu() {
            if let Some(cpu) = crate::cpu::Isa::detect() {
                if let Some(kind) = packed::PackedKind::choose(precision, act, in_dim) {
                    let lin = packed::PackedLinear::new(cpu, &weight, bias.as_ref(), kind)?;
                    return Ok(Self::Packed(lin));
                }
            }
        }
        if precision == Precision::Q8_0 && in_dim % GgmlDType::Q8_0.block_size() == 0 {
            let q = QTensor::quantize_onto(&weight.to_dtype(DType::F32)?, GgmlDType::Q8_0, device)?;
            let bytes = q.storage_size_in_bytes();
            return Ok(Self::Quantized {
                weight: QMatMul::from_qtensor(q)?,
                bias,
                bytes,
            });
        }
        let weight = weight.to_dtype(act)?.to_device(device)?;
        if act == DType::BF16 && device.is_cpu() {
            return Ok(Self::Streaming { weight, bias });
        }
        // Layouts measured (examples/layout_ab.rs, examples/invariance.rs): f16 is 2-3x faster
        // with a contiguous (in, out) weight; f32 is 2-3x faster strided, and strided is
        // batch-invariant only when the output has at least 256 columns, so smaller f32
        // matrices (where speed does not matter) stay contiguous.
        let out_dim = weight.dim(0)?;
        let transposed =
            device.is_cpu() && (act == DType::F16 || (act == DType::F32 && out_dim < 256));
        let weight = if transposed {
            weight.t()?.contiguous()?
        } else {
            weight
        };
        Ok(Self::Gemm {
            weight,
            bias,
            transposed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the policy can pick on this machine (the packed one where the CPU has
    /// AVX-512) gives the same `gelu_new(x W^T + b)` as the composed ops, and never applies
    /// the activation unasked.
    #[test]
    fn activation_is_what_the_caller_asks_for() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 64), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2, (40, 64), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, 40, &dev).unwrap();
        let want = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let want_gelu = want.gelu().unwrap();
        let lin = Linear::new(w, Some(b), Precision::F32, DType::F32, &dev).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let plain = lin.forward(&x, Activation::Identity).unwrap();
        let gelu = lin.forward(&x, Activation::GeluNew).unwrap();
        assert!(diff(&plain, &want) < 1e-5);
        assert!(diff(&gelu, &want_gelu) < 1e-5);
    }
}
