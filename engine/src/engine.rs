//! [`Engine`]: a loaded model, its KV pool and its tokenizer; the one object the scheduler
//! drives, one step at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use crate::batch::{LogitRows, Logits, SeqChunk};
use crate::config::GptjConfig;
use crate::error::{EngineError, Result};
use crate::model::GptjModel;
use crate::paged::{KvPool, StepLayout};
use crate::precision::{KvCacheDtype, KvFormat, Precision};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A model made in memory with deterministic random weights (its text is noise).
    Builtin(Builtin),
    /// A directory in HuggingFace layout (`config.json` + weights [+ tokenizer]).
    Dir(PathBuf),
    /// A HuggingFace hub id such as `EleutherAI/gpt-j-6b`, with an optional revision (`@float16`).
    Hub {
        id: String,
        revision: Option<String>,
    },
}

/// The `builtin:` models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// 2 layers, n_embd 128, 4 heads: starts in well under a second; for tests and demos.
    Tiny,
    /// GPT-J's small benchmark shape: 12 layers, n_embd 768, 12 heads, rotary_dim 64.
    Small,
    /// GPT-J-6B's exact shape with random weights, for benchmarks without the download.
    Gptj6b,
}

impl Builtin {
    /// The architecture of this builtin model.
    pub fn config(self) -> GptjConfig {
        let base = GptjConfig::gptj_6b();
        match self {
            Self::Tiny => GptjConfig {
                n_embd: 128,
                n_layer: 2,
                n_head: 4,
                rotary_dim: 16,
                torch_dtype: None,
                ..base
            },
            Self::Small => GptjConfig {
                n_embd: 768,
                n_layer: 12,
                n_head: 12,
                rotary_dim: 64,
                torch_dtype: None,
                ..base
            },
            Self::Gptj6b => GptjConfig {
                torch_dtype: None,
                ..base
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Small => "small",
            Self::Gptj6b => "6b",
        }
    }
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(name) = s.strip_prefix("builtin:") {
            return match name {
                "tiny" => Ok(Self::Builtin(Builtin::Tiny)),
                "small" => Ok(Self::Builtin(Builtin::Small)),
                "6b" | "gpt-j-6b" => Ok(Self::Builtin(Builtin::Gptj6b)),
                other => Err(format!("unknown builtin model `{other}`: use builtin:tiny, builtin:small or builtin:6b")),
            };
        }
        let path = Path::new(s);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let (id, revision) = match s.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, Some(rev.to_string())),
            _ => (s, None),
        };
        let parts: Vec<&str> = id.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() == 2 && parts.iter().all(|p| valid(p)) && !s.starts_with('.') {
            return Ok(Self::Hub {
                id: id.to_string(),
                revision,
            });
        }
        Err(format!(
            "`{s}` is neither a model directory nor a hub id like EleutherAI/gpt-j-6b[@revision] nor builtin:NAME"
        ))
    }
}

/// The device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// The CPU (all cores, through rayon).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: use cpu, cuda or cuda:N")),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Weight precision.
    pub precision: Precision,
    /// Where to run.
    pub device: DeviceKind,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Bytes for the KV pool; `None` takes a default: [`EngineOptions::DEFAULT_GPU_KV_FRACTION`] of
    /// free device memory on CUDA, [`EngineOptions::DEFAULT_CPU_KV_BYTES`] on CPU.
    pub kv_cache_memory: Option<u64>,
    /// The KV cache's element type.
    pub kv_cache_dtype: KvCacheDtype,
    /// Where hub models are downloaded to and looked up in.
    pub cache_dir: PathBuf,
}

impl EngineOptions {
    /// The default KV budget on CPU: 2 GiB, and never more than 64 full contexts.
    pub const DEFAULT_CPU_KV_BYTES: u64 = 2 << 30;
    /// Cap on the default pool on CPU, in full-length contexts.
    pub const DEFAULT_MAX_CONTEXTS: usize = 64;
    /// On a GPU, the default pool takes this fraction of the memory left free after the
    /// weights are loaded (the rest is headroom for activations and cuBLAS workspaces).
    pub const DEFAULT_GPU_KV_FRACTION: f64 = 0.8;
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            precision: Precision::Native,
            device: DeviceKind::Cpu,
            block_size: 16,
            kv_cache_memory: None,
            kv_cache_dtype: KvCacheDtype::Auto,
            cache_dir: PathBuf::from("model-cache"),
        }
    }
}

/// A model ready to serve: weights on a device, a paged KV pool and a tokenizer.
#[derive(Debug)]
pub struct Engine {
    model: GptjModel,
    kv: KvPool,
    tokenizer: Tokenizer,
    description: String,
    /// The directory the weights came from (a hub model's snapshot), if any.
    dir: Option<PathBuf>,
}

impl Engine {
    /// Loads `spec` with `opts`.
    pub fn load(spec: &ModelSpec, opts: &EngineOptions) -> Result<Self> {
        match spec {
            ModelSpec::Builtin(b) => {
                tracing::warn!(
                    "builtin:{} has random weights: its text is noise (use it to test the server, not the model)",
                    b.name()
                );
                let description = format!("builtin:{} (random weights)", b.name());
                Self::from_source(
                    &b.config(),
                    &WeightSource::Synthetic { seed: 0x6a70_746a },
                    Tokenizer::gptj()?,
                    opts,
                    description,
                )
            }
            ModelSpec::Dir(dir) => Self::load_dir(dir, opts),
            ModelSpec::Hub { id, revision } => {
                let dir = crate::hub::fetch(id, revision.as_deref(), &opts.cache_dir)?;
                Self::load_dir(&dir, opts)
            }
        }
    }

    /// Loads a model directory in HuggingFace layout.
    pub fn load_dir(dir: &Path, opts: &EngineOptions) -> Result<Self> {
        let config = GptjConfig::from_file(&dir.join("config.json"))?;
        let source = WeightSource::open_dir(dir)?;
        let tokenizer = match Tokenizer::from_dir(dir) {
            Ok(t) => t,
            Err(EngineError::MissingFile { .. }) => {
                tracing::info!(dir = %dir.display(), "no tokenizer files in the model directory; using GPT-J's built-in tokenizer");
                Tokenizer::gptj()?
            }
            Err(e) => return Err(e),
        };
        let mut engine =
            Self::from_source(&config, &source, tokenizer, opts, dir.display().to_string())?;
        engine.dir = Some(dir.to_path_buf());
        Ok(engine)
    }

    fn from_source(
        config: &GptjConfig,
        source: &WeightSource,
        tokenizer: Tokenizer,
        opts: &EngineOptions,
        description: String,
    ) -> Result<Self> {
        let device = match opts.device {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda(i) => Device::new_cuda(i).map_err(|e| {
                EngineError::InvalidInput(format!(
                    "cannot open CUDA device {i} (built with --features cuda?): {e}"
                ))
            })?,
        };
        let started = std::time::Instant::now();
        let model = GptjModel::load(config, source, opts.precision, opts.kv_cache_dtype, &device)?;
        let kv_format = model.kv_format();
        let per_block = KvPool::bytes_per_block(
            config.n_layer,
            config.n_head,
            config.head_dim(),
            opts.block_size.max(1),
            kv_format,
        ) as u64;
        let num_blocks = match opts.kv_cache_memory {
            Some(bytes) => (bytes / per_block) as usize,
            None => match free_device_memory(&device) {
                Some(free) => {
                    ((free as f64 * EngineOptions::DEFAULT_GPU_KV_FRACTION) as u64 / per_block)
                        as usize
                }
                None => {
                    let cap = EngineOptions::DEFAULT_MAX_CONTEXTS
                        * config.n_positions.div_ceil(opts.block_size.max(1));
                    ((EngineOptions::DEFAULT_CPU_KV_BYTES / per_block) as usize).min(cap)
                }
            },
        };
        if num_blocks == 0 {
            return Err(EngineError::InvalidInput(format!(
                "--kv-cache-memory is too small: one block of {} tokens needs {per_block} bytes",
                opts.block_size
            )));
        }
        let kv = KvPool::new(
            config.n_layer,
            config.n_head,
            config.head_dim(),
            num_blocks,
            opts.block_size,
            kv_format,
            &device,
        )?;
        // Loading's buffers are gone; from here on the heap serves the steps'.
        crate::heap::keep_step_buffers();
        tracing::info!(
            model = %description,
            precision = %opts.precision,
            activations = ?model.activation_dtype(),
            kv_cache = %kv_format,
            kv_blocks = num_blocks,
            block_size = opts.block_size,
            kv_bytes = num_blocks as u64 * per_block,
            load_secs = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        Ok(Self {
            model,
            kv,
            tokenizer,
            description,
            dir: None,
        })
    }

    /// Runs one step over a ragged batch: writes each row's new K/V into its blocks and returns
    /// the logits each row asks for ([`SeqChunk::logits`]), in row order.
    pub fn forward(&mut self, rows: &[SeqChunk<'_>]) -> Result<Logits> {
        let vocab = self.model.config().vocab_size;
        if rows.is_empty() {
            return Ok(Logits::new(Vec::new(), vocab));
        }
        let step = Arc::new(StepLayout::new(
            rows,
            self.kv.block_size(),
            self.kv.num_blocks(),
            self.model.config().n_positions,
        )?);
        let mut token_ids = Vec::with_capacity(step.num_tokens());
        let mut logit_rows = Vec::new();
        for row in rows {
            let first = token_ids.len() as u32;
            token_ids.extend_from_slice(row.tokens);
            let end = token_ids.len() as u32;
            let count = row.logits.count(row.tokens.len()) as u32;
            logit_rows.extend(end - count..end);
            debug_assert!(end - count >= first);
        }
        if logit_rows.is_empty() {
            // Still run the step: it fills the cache for prefill chunks.
            self.model.forward(&token_ids, &step, &[0], &self.kv)?;
            return Ok(Logits::new(Vec::new(), vocab));
        }
        let logits = self
            .model
            .forward(&token_ids, &step, &logit_rows, &self.kv)?;
        Ok(Logits::new(logits.flatten_all()?.to_vec1::<f32>()?, vocab))
    }

    /// Runs one token through every layer so lazy work (quantized-weight repacking, kernel
    /// loading) happens before the first request. Writes only into block 0, which holds no
    /// sequence's data until the scheduler hands it out (and it is overwritten before it is read).
    pub fn warm_up(&mut self) -> Result<()> {
        let table = [crate::batch::BlockId(0)];
        let eos = [self
            .tokenizer
            .eos_token_id()
            .min(self.model.config().vocab_size as u32 - 1)];
        self.forward(&[SeqChunk {
            tokens: &eos,
            start_pos: 0,
            block_table: &table,
            logits: LogitRows::Last,
        }])?;
        Ok(())
    }

    /// The architecture.
    pub fn config(&self) -> &GptjConfig {
        self.model.config()
    }

    /// Bytes of weights one decode step reads (see `GptjModel::streamed_weight_bytes`).
    pub fn streamed_weight_bytes(&self) -> usize {
        self.model.streamed_weight_bytes()
    }

    /// dtype of the activations.
    pub fn activation_dtype(&self) -> candle_core::DType {
        self.model.activation_dtype()
    }

    /// What the KV cache stores (`--kv-cache-dtype` resolved, see [`KvCacheDtype`]).
    pub fn kv_cache_format(&self) -> KvFormat {
        self.model.kv_format()
    }

    /// The tokenizer that goes with the weights.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Blocks in the KV pool.
    pub fn num_kv_blocks(&self) -> usize {
        self.kv.num_blocks()
    }

    /// Token slots per KV block.
    pub fn block_size(&self) -> usize {
        self.kv.block_size()
    }

    /// Longest sequence (prompt plus generation) the model can attend over.
    pub fn max_context(&self) -> usize {
        self.model.config().n_positions
    }

    /// The directory the model was loaded from (for a hub model, its downloaded snapshot),
    /// where its other files (`tokenizer_config.json`) are; `None` for a builtin model.
    pub fn model_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// A one-line description for logs (`builtin:tiny (random weights)`, a directory, ...).
    pub fn description(&self) -> &str {
        &self.description
    }
}

/// Free memory of a CUDA device (after the weights were loaded); `None` on CPU.
#[cfg(feature = "cuda")]
fn free_device_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cuda(dev) => dev
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        _ => None,
    }
}

/// Free memory of a CUDA device; always `None` in a CPU-only build.
#[cfg(not(feature = "cuda"))]
fn free_device_memory(_device: &Device) -> Option<u64> {
    None
}
