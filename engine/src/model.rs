//! GPT-J, as HuggingFace transformers' `GPTJForCausalLM` computes it, over a ragged batch.
//!
//! All new tokens of a step are flattened into one `(tokens, n_embd)` matrix, so every
//! linear layer is a single matmul for the whole batch; only attention looks at rows
//! separately, through the paged KV cache.
//!
//! Per block: `h = ln_1(x)`; `x = x + out_proj(attn(h)) + fc_out(gelu_new(fc_in(h)))` (one
//! LayerNorm feeding both branches in parallel). q/k get rotary embedding on their first
//! `rotary_dim` dims in the interleaved (rotate-every-two) layout; no bias on q/k/v/out.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::config::GptjConfig;
use crate::error::{EngineError, Result};
use crate::gemv;
use crate::packed::{self, PackedKind, PackedLinear};
use crate::paged::{paged_attention, write_kv, KvPool, StepLayout};
use crate::precision::{KvCacheDtype, Precision};
use crate::weights::WeightSource;

/// A linear layer `y = x W^T + b`.
///
/// Every kernel here gives a row the same result whatever else is in the batch (measured
/// with `examples/invariance.rs`: candle's CPU gemm is bitwise batch-invariant for two rows
/// or more, only its one-row path differs, so one row is run as two), so a seeded request
/// samples the same tokens whoever shares its steps.
#[derive(Debug)]
enum Linear {
    /// candle's gemm. `weight` is `(out, in)` as stored in the checkpoint, multiplied as
    /// `x @ weight.t()`, or on CPU kept transposed `(in, out)` and contiguous (`transposed`)
    /// where that is faster or needed for batch invariance (see `Linear::new`).
    Gemm {
        weight: Tensor,
        bias: Option<Tensor>,
        transposed: bool,
    },
    /// bf16 on CPU, where candle has no bf16 gemm: see `gemv::streaming_matmul`.
    Streaming {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Weights repacked for the AVX-512 kernels (`packed.rs`): every precision on CPUs that
    /// have them.
    Packed(PackedLinear),
    /// 8-bit block-quantized weights (ggml Q8_0), f32 activations.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
        bytes: usize,
    },
}

impl Linear {
    fn new(
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
        if device.is_cpu() && packed::available() {
            if let Some(kind) = PackedKind::choose(precision, act, in_dim) {
                return Ok(Self::Packed(PackedLinear::new(
                    &weight,
                    bias.as_ref(),
                    kind,
                )?));
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

    /// Bytes of weights one forward reads.
    fn weight_bytes(&self) -> usize {
        match self {
            Self::Gemm { weight, .. } | Self::Streaming { weight, .. } => {
                weight.elem_count() * weight.dtype().size_in_bytes()
            }
            Self::Packed(p) => p.weight_bytes(),
            Self::Quantized { bytes, .. } => *bytes,
        }
    }

    /// This layer followed by GPT-J's `gelu_new` (fused into the packed kernels).
    fn with_gelu(self) -> Self {
        match self {
            Self::Packed(p) => Self::Packed(p.with_gelu()),
            other => other,
        }
    }

    /// `gelu_new(forward(x))`, fused where `with_gelu` could fuse it.
    fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed(p) if p.has_gelu() => p.forward(x),
            _ => Ok(self.forward(x)?.gelu()?),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = match self {
            Self::Gemm {
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
            Self::Streaming { weight, bias } => (gemv::streaming_matmul(x, weight)?, bias),
            // The bias is added inside the kernel (and GELU, for a layer built `with_gelu`).
            Self::Packed(p) => return p.forward(x),
            Self::Quantized { weight, bias, .. } => (weight.forward(x)?, bias),
        };
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    /// q, k and v projections stacked into one `(3 n_embd, n_embd)` weight: one matmul.
    qkv: Linear,
    out_proj: Linear,
    fc_in: Linear,
    fc_out: Linear,
}

/// GPT-J weights on a device, ready to run.
#[derive(Debug)]
pub struct GptjModel {
    config: GptjConfig,
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    /// `cos`/`sin` of every position, `(n_positions, rotary_dim / 2)`, in the activation dtype.
    cos: Tensor,
    sin: Tensor,
    act_dtype: DType,
    /// The KV cache's dtype: keys and values are converted on the way in, queries and the
    /// attention output on the way through, when it differs from `act_dtype`.
    kv_dtype: DType,
    device: Device,
}

impl GptjModel {
    /// Reads every tensor from `source` and places it on `device` in `precision`.
    pub(crate) fn load(
        config: &GptjConfig,
        source: &WeightSource,
        precision: Precision,
        kv_cache: KvCacheDtype,
        device: &Device,
    ) -> Result<Self> {
        let act = precision.activation_dtype(source.native_dtype()?);
        let kv_dtype = kv_cache.resolve(precision, act);
        let (e, i, v) = (config.n_embd, config.inner_dim(), config.vocab_size);
        let dense = |name: &str, shape: &[usize]| -> Result<Tensor> {
            Ok(source.get(name, shape)?.to_dtype(act)?.to_device(device)?)
        };
        let ln = |prefix: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: dense(&format!("{prefix}.weight"), &[e])?,
                bias: dense(&format!("{prefix}.bias"), &[e])?,
                eps: config.layer_norm_epsilon as f32,
            })
        };
        let linear = |prefix: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = source.get(&format!("{prefix}.weight"), &[out, inp])?;
            let b = if bias {
                Some(source.get(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            };
            Linear::new(w, b, precision, act, device)
        };
        let mut blocks = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let p = format!("transformer.h.{l}");
            let qkv = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|n| {
                    source
                        .get(&format!("{p}.attn.{n}.weight"), &[e, e])
                        .and_then(|t| Ok(t.to_dtype(DType::F32)?))
                })
                .collect::<Result<Vec<_>>>()?;
            blocks.push(Block {
                ln_1: ln(&format!("{p}.ln_1"))?,
                qkv: Linear::new(Tensor::cat(&qkv, 0)?, None, precision, act, device)?,
                out_proj: linear(&format!("{p}.attn.out_proj"), e, e, false)?,
                fc_in: linear(&format!("{p}.mlp.fc_in"), i, e, true)?.with_gelu(),
                fc_out: linear(&format!("{p}.mlp.fc_out"), e, i, true)?,
            });
        }
        // The embedding is a lookup, not a matmul: in q8_0 keep it in f16 to halve its memory.
        let wte_dtype = if precision == Precision::Q8_0 {
            DType::F16
        } else {
            act
        };
        let wte = source
            .get("transformer.wte.weight", &[v, e])?
            .to_dtype(wte_dtype)?
            .to_device(device)?;
        let (cos, sin) = rotary_tables(config.n_positions, config.rotary_dim, act, device)?;
        Ok(Self {
            config: config.clone(),
            wte,
            blocks,
            ln_f: ln("transformer.ln_f")?,
            lm_head: linear("lm_head", v, e, true)?,
            cos,
            sin,
            act_dtype: act,
            kv_dtype,
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &GptjConfig {
        &self.config
    }

    /// Bytes of weights a decode step must stream from memory: every matrix but the token
    /// embedding (a lookup). The basis of the memory-bound floor in benchmarks.
    pub fn streamed_weight_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.qkv.weight_bytes()
                    + b.out_proj.weight_bytes()
                    + b.fc_in.weight_bytes()
                    + b.fc_out.weight_bytes()
            })
            .sum();
        blocks + self.lm_head.weight_bytes()
    }

    /// dtype of activations.
    pub fn activation_dtype(&self) -> DType {
        self.act_dtype
    }

    /// dtype of the KV cache.
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// Runs the new tokens of a step. `step` says where each token lives in the cache,
    /// `token_ids` are the tokens in row order, and `logit_rows` indexes the tokens (in the
    /// flattened batch) whose logits are wanted. Returns `(logit_rows.len(), vocab)` f32 logits.
    pub(crate) fn forward(
        &self,
        token_ids: &[u32],
        step: &Arc<StepLayout>,
        logit_rows: &[u32],
        kv: &KvPool,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (n, heads, head_dim, rot) =
            (token_ids.len(), cfg.n_head, cfg.head_dim(), cfg.rotary_dim);
        if let Some(&bad) = token_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let ids = Tensor::from_slice(token_ids, n, &self.device)?;
        let positions = Tensor::from_slice(step.positions(), n, &self.device)?;
        // Per-token rotary tables, shaped for rope_i's per-batch form: (tokens, 1, rot / 2).
        let cos = self
            .cos
            .index_select(&positions, 0)?
            .reshape((n, 1, rot / 2))?;
        let sin = self
            .sin
            .index_select(&positions, 0)?
            .reshape((n, 1, rot / 2))?;
        let rotate = |x: Tensor| -> Result<Tensor> {
            // x: (tokens, heads, head_dim). rope_i wants (b, h, t, d): use b = tokens, t = 1.
            let x4 = x.reshape((n, heads, 1, head_dim))?;
            if rot == head_dim {
                return Ok(candle_nn::rotary_emb::rope_i(&x4, &cos, &sin)?
                    .reshape((n, heads, head_dim))?);
            }
            let rotated = candle_nn::rotary_emb::rope_i(
                &x4.narrow(D::Minus1, 0, rot)?.contiguous()?,
                &cos,
                &sin,
            )?;
            let pass = x4.narrow(D::Minus1, rot, head_dim - rot)?;
            Ok(Tensor::cat(&[rotated, pass], D::Minus1)?.reshape((n, heads, head_dim))?)
        };
        let scale = (head_dim as f32).powf(-0.5);
        let e = cfg.n_embd;
        let mut x = self.wte.index_select(&ids, 0)?.to_dtype(self.act_dtype)?;
        for (l, block) in self.blocks.iter().enumerate() {
            let h = block.ln_1.forward(&x)?;
            let qkv = block.qkv.forward(&h)?;
            let q = rotate(
                qkv.narrow(1, 0, e)?
                    .contiguous()?
                    .reshape((n, heads, head_dim))?,
            )?;
            let k = rotate(
                qkv.narrow(1, e, e)?
                    .contiguous()?
                    .reshape((n, heads, head_dim))?,
            )?;
            let v = qkv
                .narrow(1, 2 * e, e)?
                .contiguous()?
                .reshape((n, heads, head_dim))?;
            let cache = kv.layer(l);
            let kv_dtype = self.kv_dtype;
            write_kv(cache, &k.to_dtype(kv_dtype)?, &v.to_dtype(kv_dtype)?, step)?;
            let attn = paged_attention(&q.to_dtype(kv_dtype)?, cache, step, scale)?
                .to_dtype(self.act_dtype)?
                .reshape((n, e))?;
            let a = block.out_proj.forward(&attn)?;
            let m = block.fc_out.forward(&block.fc_in.forward_gelu(&h)?)?;
            x = ((x + a)? + m)?;
        }
        let rows = Tensor::from_slice(logit_rows, logit_rows.len(), &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let logits = self.lm_head.forward(&self.ln_f.forward(&last)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// HF's `create_sinusoidal_positions`: angle = pos / 10000^(2i / rotary_dim).
fn rotary_tables(
    n_positions: usize,
    rotary_dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = rotary_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / rotary_dim as f32))
        .collect();
    let mut angles = Vec::with_capacity(n_positions * half);
    for pos in 0..n_positions {
        angles.extend(inv_freq.iter().map(|f| pos as f32 * f));
    }
    let angles = Tensor::from_vec(angles, (n_positions, half), device)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}
