//! Where a model's tensors come from: safetensors (one file or sharded, memory-mapped),
//! PyTorch `pytorch_model.bin` (read lazily, one tensor at a time), or deterministic
//! synthetic values for `builtin:` models. Every error names the file and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// A set of named tensors, read on demand onto the CPU in their stored dtype.
pub(crate) enum WeightSource {
    /// Memory-mapped safetensors files, and which file holds each tensor.
    Safetensors {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        routing: HashMap<String, usize>,
    },
    /// A PyTorch zip checkpoint.
    Pth { path: PathBuf, tensors: PthTensors },
    /// Seeded pseudo-random values (LayerNorm weights 1, biases 0, matrices uniform with std 0.02).
    Synthetic { seed: u64 },
}

impl WeightSource {
    /// Finds the weights of a model directory: `model.safetensors`, sharded safetensors
    /// (`model.safetensors.index.json`), or `pytorch_model.bin`, in that order.
    pub(crate) fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_safetensors(&[single]);
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::open_safetensors(&shards_of_index(&index)?);
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            let tensors = PthTensors::new(&bin, None).map_err(|e| EngineError::BadFile {
                path: bin.clone(),
                reason: format!("not a readable PyTorch zip checkpoint: {e}"),
            })?;
            return Ok(Self::Pth { path: bin, tensors });
        }
        Err(EngineError::MissingFile {
            what: "weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
            path: dir.to_path_buf(),
        })
    }

    fn open_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            // Safety: the file is mapped read-only; like every mmap-based loader we rely on
            // nobody truncating the checkpoint while the server runs.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| EngineError::BadFile {
                path: path.clone(),
                reason: format!(
                    "not a valid safetensors file (truncated or corrupt?): {}",
                    root_cause(&e)
                ),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push((path.clone(), st));
        }
        Ok(Self::Safetensors { files, routing })
    }

    /// The dtype the checkpoint stores its weights in (that of the token embedding).
    pub(crate) fn native_dtype(&self) -> Result<DType> {
        const PROBE: &str = "transformer.wte.weight";
        match self {
            Self::Synthetic { .. } => Ok(DType::F32),
            Self::Safetensors { files, routing } => {
                let (path, st) = routing
                    .get(PROBE)
                    .map(|&i| &files[i])
                    .ok_or_else(|| self.missing(PROBE))?;
                let view = st
                    .get(PROBE)
                    .map_err(|e| bad_weight(path, PROBE, e.to_string()))?;
                DType::try_from(view.dtype()).map_err(|e| bad_weight(path, PROBE, e.to_string()))
            }
            Self::Pth { path, tensors } => tensors
                .tensor_infos()
                .get(PROBE)
                .map(|info| info.dtype)
                .ok_or_else(|| bad_weight(path, PROBE, "tensor not found".into())),
        }
    }

    fn missing(&self, name: &str) -> EngineError {
        let path = match self {
            Self::Safetensors { files, .. } if files.len() == 1 => files[0].0.clone(),
            Self::Safetensors { files, .. } => files[0]
                .0
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            Self::Pth { path, .. } => path.clone(),
            Self::Synthetic { .. } => PathBuf::from("builtin"),
        };
        bad_weight(&path, name, "tensor not found in the checkpoint".into())
    }

    /// Reads one tensor onto the CPU in its stored dtype and checks its shape.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (path, tensor) = match self {
            Self::Synthetic { seed } => return synthetic(name, shape, *seed),
            Self::Safetensors { files, routing } => {
                let (path, st) = routing
                    .get(name)
                    .map(|&i| &files[i])
                    .ok_or_else(|| self.missing(name))?;
                let t = st
                    .load(name, &Device::Cpu)
                    .map_err(|e| bad_weight(path, name, root_cause(&e)))?;
                (path, t)
            }
            Self::Pth { path, tensors } => {
                let t = tensors
                    .get(name)
                    .map_err(|e| bad_weight(path, name, root_cause(&e)))?
                    .ok_or_else(|| self.missing(name))?;
                (path, t)
            }
        };
        if tensor.dims() != shape {
            return Err(bad_weight(
                path,
                name,
                format!(
                    "shape {:?} does not match config.json, which implies {shape:?}",
                    tensor.dims()
                ),
            ));
        }
        if !matches!(
            tensor.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(bad_weight(
                path,
                name,
                format!("dtype {:?} is not a float type", tensor.dtype()),
            ));
        }
        Ok(tensor)
    }
}

fn bad_weight(path: &Path, tensor: &str, reason: String) -> EngineError {
    EngineError::BadWeight {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    }
}

/// The innermost message of a candle error (without its backtrace and path wrappers).
fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. }
        | candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}

/// The shard files listed by a `model.safetensors.index.json`, in first-use order.
fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>> {
    let bad = |reason: String| EngineError::BadFile {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| bad("a `weight_map` entry is not a file name".into()))?;
        let path = dir.join(file);
        if !shards.contains(&path) {
            if !path.is_file() {
                return Err(EngineError::MissingFile {
                    what: "safetensors shard listed in the index",
                    path,
                });
            }
            shards.push(path);
        }
    }
    if shards.is_empty() {
        return Err(bad("`weight_map` lists no files".into()));
    }
    Ok(shards)
}

/// Deterministic values for a named tensor: the same name and seed give the same values on
/// every machine. Generated in parallel chunks, each with its own stream.
fn synthetic(name: &str, shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let is_ln_weight = name.contains(".ln_") && name.ends_with(".weight");
    let data: Vec<f32> = if is_ln_weight {
        vec![1.0; n]
    } else if name.ends_with(".bias") {
        vec![0.0; n]
    } else {
        // Uniform in [-a, a] has std a / sqrt(3); GPT-J's init std is 0.02.
        let amplitude = 0.02 * 3f32.sqrt();
        let stream = fnv1a(name) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        const CHUNK: usize = 1 << 16;
        let mut data = vec![0f32; n];
        data.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut state = stream ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                for x in chunk {
                    let r = splitmix64(&mut state);
                    let unit = (r >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                    *x = (2.0 * unit - 1.0) * amplitude;
                }
            });
        data
    };
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
