//! GPT-J (Wang and Komatsuzaki, 2021, <https://github.com/kingoflolz/mesh-transformer-jax>),
//! as HuggingFace transformers' `GPTJForCausalLM` computes it
//! (`src/transformers/models/gptj/modeling_gptj.py`, transformers 5.24.0, the version the
//! golden fixtures were made with), over a ragged batch and a paged KV cache.
//!
//! Key characteristics:
//! - parallel residual: one LayerNorm feeds attention and the MLP, and both add to the
//!   residual stream, `x + attn(ln_1(x)) + mlp(ln_1(x))`;
//! - rotary position embedding on the first `rotary_dim` dims of each query and key head, in
//!   the interleaved (rotate-every-two) layout: candle's `rope_i`;
//! - no bias on q/k/v/out, biased `fc_in`/`fc_out`/`lm_head`, `gelu_new` between `fc_in` and
//!   `fc_out`; softmax in f32.
//!
//! All new tokens of a step are flattened into one `(tokens, n_embd)` matrix, so every linear
//! layer is a single matmul for the whole batch; only attention looks at rows separately,
//! through the paged KV cache (`paged`, `attention`). Which kernel runs each matmul is
//! `linear`'s business, not the model's.

use candle_core::{DType, Device, Tensor, D};

use crate::attention::{paged_attention, write_kv};
use crate::config::GptjConfig;
use crate::error::{EngineError, Result};
use crate::linear::{Activation, Linear};
use crate::paged::{KvPool, StepLayout};
use crate::precision::{KvCacheDtype, KvFormat, Precision};
use crate::residual::parallel_residual;
use crate::rope::rope_interleaved;
use crate::weights::WeightSource;

/// How the model's weights are read: from where, in which precision, onto which device.
struct Loader<'a> {
    source: &'a WeightSource,
    precision: Precision,
    /// The activation dtype.
    act: DType,
    device: &'a Device,
}

impl Loader<'_> {
    /// A tensor kept as it is used (LayerNorm parameters): in the activation dtype.
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self
            .source
            .get(name, shape)?
            .to_dtype(self.act)?
            .to_device(self.device)?)
    }

    /// `{prefix}.weight` (`(out, in)`) and, with `bias`, `{prefix}.bias`.
    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.source.get(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.source.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        self.linear_from(w, b)
    }

    fn linear_from(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        Linear::new(weight, bias, self.precision, self.act, self.device)
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn new(cfg: &GptjConfig, vb: &Loader<'_>, prefix: &str) -> Result<Self> {
        let e = cfg.n_embd;
        Ok(Self {
            weight: vb.dense(&format!("{prefix}.weight"), &[e])?,
            bias: vb.dense(&format!("{prefix}.bias"), &[e])?,
            eps: cfg.layer_norm_epsilon as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// `cos`/`sin` of every position, `(n_positions, rotary_dim / 2)`, built once at load.
#[derive(Debug)]
struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    rotary_dim: usize,
}

/// The rotary tables gathered for one step's tokens: `(tokens, rotary_dim / 2)`, a row per
/// token at its own position.
struct StepRotary {
    cos: Tensor,
    sin: Tensor,
    rotary_dim: usize,
}

impl RotaryEmbedding {
    /// HF's `create_sinusoidal_positions`: angle = pos / 10000^(2i / rotary_dim).
    fn new(cfg: &GptjConfig, dtype: DType, device: &Device) -> Result<Self> {
        let (n_positions, rotary_dim) = (cfg.n_positions, cfg.rotary_dim);
        let half = rotary_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / rotary_dim as f32))
            .collect();
        let mut angles = Vec::with_capacity(n_positions * half);
        for pos in 0..n_positions {
            angles.extend(inv_freq.iter().map(|f| pos as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (n_positions, half), device)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            rotary_dim,
        })
    }

    /// The tables at each token's own position.
    fn at(&self, positions: &Tensor) -> Result<StepRotary> {
        Ok(StepRotary {
            cos: self.cos.index_select(positions, 0)?,
            sin: self.sin.index_select(positions, 0)?,
            rotary_dim: self.rotary_dim,
        })
    }
}

impl StepRotary {
    /// Rotates the first `rotary_dim` dims of every head of `x`, `(tokens, heads, head_dim)`;
    /// the rest pass through.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)?;
        let (rot, cos, sin) = (self.rotary_dim, &self.cos, &self.sin);
        if rot == head_dim {
            return rope_interleaved(x, cos, sin);
        }
        let rotated = rope_interleaved(&x.narrow(D::Minus1, 0, rot)?, cos, sin)?;
        let pass = x.narrow(D::Minus1, rot, head_dim - rot)?;
        Ok(Tensor::cat(&[rotated, pass], D::Minus1)?)
    }
}

/// Causal self-attention over the paged cache: `out_proj(softmax(q k^T / sqrt(head_dim)) v)`,
/// with rotary q and k, each token attending to positions `0..=its own` of its sequence.
#[derive(Debug)]
struct Attention {
    /// q, k and v projections stacked into one `(3 n_embd, n_embd)` weight: one matmul.
    qkv: Linear,
    out_proj: Linear,
    n_head: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Attention {
    fn new(cfg: &GptjConfig, vb: &Loader<'_>, prefix: &str) -> Result<Self> {
        let e = cfg.n_embd;
        let qkv = ["q_proj", "k_proj", "v_proj"]
            .iter()
            .map(|n| {
                let t = vb.source.get(&format!("{prefix}.{n}.weight"), &[e, e])?;
                Ok(t.to_dtype(DType::F32)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            qkv: vb.linear_from(Tensor::cat(&qkv, 0)?, None)?,
            out_proj: vb.linear(&format!("{prefix}.out_proj"), e, e, false)?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            span: tracing::trace_span!("attn"),
        })
    }

    fn forward(
        &self,
        h: &Tensor,
        rotary: &StepRotary,
        cache: &Tensor,
        step: &StepLayout,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (n, e) = h.dims2()?;
        let heads = |t: Tensor| t.contiguous()?.reshape((n, self.n_head, self.head_dim));
        let qkv = self.qkv.forward(h, Activation::Identity)?;
        let q = rotary.apply(&heads(qkv.narrow(1, 0, e)?)?)?;
        let k = rotary.apply(&heads(qkv.narrow(1, e, e)?)?)?;
        let v = heads(qkv.narrow(1, 2 * e, e)?)?;
        write_kv(cache, &k, &v, step)?;
        let scale = (self.head_dim as f32).powf(-0.5);
        let attn = paged_attention(&q, cache, step, scale)?.reshape((n, e))?;
        self.out_proj.forward(&attn, Activation::Identity)
    }
}

/// The feed-forward branch: `fc_out(gelu_new(fc_in(h)))`.
#[derive(Debug)]
struct Mlp {
    fc_in: Linear,
    fc_out: Linear,
    span: tracing::Span,
}

impl Mlp {
    fn new(cfg: &GptjConfig, vb: &Loader<'_>, prefix: &str) -> Result<Self> {
        let (e, i) = (cfg.n_embd, cfg.inner_dim());
        Ok(Self {
            fc_in: vb.linear(&format!("{prefix}.fc_in"), i, e, true)?,
            fc_out: vb.linear(&format!("{prefix}.fc_out"), e, i, true)?,
            span: tracing::trace_span!("mlp"),
        })
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let inner = self.fc_in.forward(h, Activation::GeluNew)?;
        self.fc_out.forward(&inner, Activation::Identity)
    }
}

/// One transformer block with GPT-J's parallel residual.
#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    mlp: Mlp,
    span: tracing::Span,
}

impl Block {
    fn new(cfg: &GptjConfig, vb: &Loader<'_>, layer: usize) -> Result<Self> {
        let p = format!("transformer.h.{layer}");
        Ok(Self {
            ln_1: LayerNorm::new(cfg, vb, &format!("{p}.ln_1"))?,
            attn: Attention::new(cfg, vb, &format!("{p}.attn"))?,
            mlp: Mlp::new(cfg, vb, &format!("{p}.mlp"))?,
            span: tracing::trace_span!("block", layer),
        })
    }

    /// `x + attn(ln_1(x)) + mlp(ln_1(x))`, writing this layer's new keys and values to `cache`.
    fn forward(
        &self,
        x: &Tensor,
        rotary: &StepRotary,
        cache: &Tensor,
        step: &StepLayout,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let h = self.ln_1.forward(x)?;
        let a = self.attn.forward(&h, rotary, cache, step)?;
        let m = self.mlp.forward(&h)?;
        parallel_residual(x, &a, &m)
    }
}

/// GPT-J weights on a device, ready to run.
#[derive(Debug)]
pub struct GptjModel {
    config: GptjConfig,
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    act_dtype: DType,
    kv_format: KvFormat,
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
        let kv_format = kv_cache.resolve(precision, act);
        if kv_format == KvFormat::Int8 && !device.is_cpu() {
            return Err(EngineError::InvalidInput(
                "--kv-cache-dtype int8 has CPU kernels only: use f16 (or auto) on a GPU".into(),
            ));
        }
        let vb = Loader {
            source,
            precision,
            act,
            device,
        };
        let blocks = (0..config.n_layer)
            .map(|l| Block::new(config, &vb, l))
            .collect::<Result<Vec<_>>>()?;
        // The embedding is a lookup, not a matmul: in q8_0 keep it in f16 to halve its memory.
        let wte_dtype = if precision == Precision::Q8_0 {
            DType::F16
        } else {
            act
        };
        let wte = source
            .get(
                "transformer.wte.weight",
                &[config.vocab_size, config.n_embd],
            )?
            .to_dtype(wte_dtype)?
            .to_device(device)?;
        let (e, v) = (config.n_embd, config.vocab_size);
        Ok(Self {
            config: config.clone(),
            wte,
            blocks,
            ln_f: LayerNorm::new(config, &vb, "transformer.ln_f")?,
            lm_head: vb.linear("lm_head", v, e, true)?,
            rotary: RotaryEmbedding::new(config, act, device)?,
            act_dtype: act,
            kv_format,
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
                b.attn.qkv.weight_bytes()
                    + b.attn.out_proj.weight_bytes()
                    + b.mlp.fc_in.weight_bytes()
                    + b.mlp.fc_out.weight_bytes()
            })
            .sum();
        blocks + self.lm_head.weight_bytes()
    }

    /// dtype of activations.
    pub fn activation_dtype(&self) -> DType {
        self.act_dtype
    }

    /// What the KV cache stores.
    pub fn kv_format(&self) -> KvFormat {
        self.kv_format
    }

    /// Runs the new tokens of a step. `step` says where each token lives in the cache,
    /// `token_ids` are the tokens in row order, and `logit_rows` indexes the tokens (in the
    /// flattened batch) whose logits are wanted. Returns `(logit_rows.len(), vocab)` f32 logits.
    pub(crate) fn forward(
        &self,
        token_ids: &[u32],
        step: &StepLayout,
        logit_rows: &[u32],
        kv: &KvPool,
    ) -> Result<Tensor> {
        let vocab = self.config.vocab_size;
        if let Some(&bad) = token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        let n = token_ids.len();
        let ids = Tensor::from_slice(token_ids, n, &self.device)?;
        let positions = Tensor::from_slice(step.positions(), n, &self.device)?;
        let rotary = self.rotary.at(&positions)?;
        let mut x = self.wte.index_select(&ids, 0)?.to_dtype(self.act_dtype)?;
        for (l, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &rotary, kv.layer(l), step)?;
        }
        let rows = Tensor::from_slice(logit_rows, logit_rows.len(), &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let logits = self
            .lm_head
            .forward(&self.ln_f.forward(&last)?, Activation::Identity)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}
