//! CUDA implementations of the paged-KV ops (kernels in `kernels/paged.cu`, compiled to PTX by
//! build.rs). The step's index arrays are uploaded once per step, on first use, and shared by
//! every layer (`StepLayout::device_index`).
//!
//! The kernels index the cache with the step's slots and block tables and no bounds checks:
//! both functions here take a [`CacheShape`] that `check_operands` returned for the very
//! layouts they launch on, which is what keeps those reads and writes inside the buffers.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, Layout, Shape};

use crate::paged::{CacheShape, StepLayout};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged.ptx"));
const MODULE: &str = "gptj_paged";
const THREADS: u32 = 128;

fn suffix(slice: &CudaStorageSlice) -> candle_core::Result<&'static str> {
    Ok(match slice {
        CudaStorageSlice::F32(_) => "f32",
        CudaStorageSlice::F16(_) => "f16",
        CudaStorageSlice::BF16(_) => "bf16",
        _ => candle_core::bail!("paged KV ops support f32, f16 and bf16 only"),
    })
}

/// The step's new keys and values into their slots of `cache`, whose geometry `shape` was
/// checked against `step` and the operands' sizes (`check_operands`).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_kv(
    step: &StepLayout,
    shape: CacheShape,
    cache: &mut CudaStorage,
    cache_l: &Layout,
    k: &CudaStorage,
    k_l: &Layout,
    v: &CudaStorage,
    v_l: &Layout,
) -> candle_core::Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        step: &StepLayout,
        shape: CacheShape,
        dev: &CudaDevice,
        name: &str,
        cache: &mut CudaSlice<T>,
        cache_l: &Layout,
        k: &CudaSlice<T>,
        k_l: &Layout,
        v: &CudaSlice<T>,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let width = shape.width() as u32;
        if cache_l.start_offset() != 0 || !cache_l.is_contiguous() {
            candle_core::bail!("KV cache must be contiguous from offset 0");
        }
        let (k, v) = match (k_l.contiguous_offsets(), v_l.contiguous_offsets()) {
            (Some((a, b)), Some((c, d))) => (k.slice(a..b), v.slice(c..d)),
            _ => candle_core::bail!("new K/V must be contiguous"),
        };
        let index = step.device_index(dev)?;
        let n = step.num_tokens() as u32;
        if n == 0 {
            return Ok(());
        }
        let half_len = shape.half_len() as u64;
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(cache);
        b.arg(&k);
        b.arg(&v);
        b.arg(&index.slots);
        b.arg(&width);
        b.arg(&half_len);
        let cfg = LaunchConfig {
            grid_dim: (n, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and count match `gptj_write_kv_*` in paged.cu. Its writes,
        // `cache[slot * width + i]` and `cache[half_len + ...]` with `i < width`, stay inside
        // the cache because every slot is below `shape.slots()` (block ids checked by
        // `StepLayout::new`, the cache's geometry by `check_cache` via `check_operands`), and
        // its reads, `k[t * width + i]` for `t < n`, inside `k` and `v`, whose sizes
        // `check_operands` matched to `n * width`.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
    let dev = cache.device().clone();
    let name = format!("gptj_write_kv_{}", suffix(&cache.slice)?);
    match (&mut cache.slice, &k.slice, &v.slice) {
        (CudaStorageSlice::F32(c), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
            launch(step, shape, &dev, &name, c, cache_l, k, k_l, v, v_l)
        }
        (CudaStorageSlice::F16(c), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
            launch(step, shape, &dev, &name, c, cache_l, k, k_l, v, v_l)
        }
        (CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            launch(step, shape, &dev, &name, c, cache_l, k, k_l, v, v_l)
        }
        _ => candle_core::bail!("KV write: cache and new K/V must have the same float dtype"),
    }
}

/// Attention of the step's tokens over `cache`, whose geometry `shape` was checked against
/// `step` and the queries' size (`check_operands`).
pub(super) fn attend(
    step: &StepLayout,
    shape: CacheShape,
    scale: f32,
    q: &CudaStorage,
    q_l: &Layout,
    cache: &CudaStorage,
    cache_l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        step: &StepLayout,
        shape: CacheShape,
        scale: f32,
        dev: &CudaDevice,
        name: &str,
        q: &CudaSlice<T>,
        q_l: &Layout,
        cache: &CudaSlice<T>,
        cache_l: &Layout,
    ) -> candle_core::Result<CudaSlice<T>> {
        let (heads, dim) = (shape.heads, shape.head_dim);
        let q = match q_l.contiguous_offsets() {
            Some((a, b)) => q.slice(a..b),
            None => candle_core::bail!("queries must be contiguous"),
        };
        let cache = match cache_l.contiguous_offsets() {
            Some((a, b)) => cache.slice(a..b),
            None => candle_core::bail!("KV cache must be contiguous"),
        };
        let index = step.device_index(dev)?;
        let n = step.num_tokens();
        // SAFETY: the kernel writes every element before anything reads it: its grid is
        // (tokens, heads), and each block writes all `dim` outputs of its token's head.
        let out = unsafe { dev.alloc::<T>(n * heads * dim)? };
        if n == 0 {
            return Ok(out);
        }
        let shared = (dim as u32 + index.max_context + 32) * 4;
        let (heads_u, dim_u, bs) = (heads as u32, dim as u32, shape.block_size as u32);
        let half_len = shape.half_len() as u64;
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&out);
        b.arg(&q);
        b.arg(&cache);
        b.arg(&index.positions);
        b.arg(&index.token_row);
        b.arg(&index.tables);
        b.arg(&index.table_start);
        b.arg(&heads_u);
        b.arg(&dim_u);
        b.arg(&bs);
        b.arg(&index.max_context);
        b.arg(&half_len);
        b.arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, heads_u, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: argument types and count match `gptj_paged_attention_*` in paged.cu. It
        // reads `cache[slot * width + h * dim + d]` (and `half_len +` that) for the slots of
        // positions `0..=pos` through the step's block tables (long enough for them, checked by
        // `StepLayout::new`), all below `shape.slots()` (block ids checked by
        // `StepLayout::new`, the cache's geometry by `check_cache` via `check_operands`); `q`
        // and `out` at `t * width + h * dim + d` for `t < n`, inside the `n * width` that
        // `check_operands` matched; and `max_context` floats of scores in shared memory, sized
        // above from the step's longest context.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
    let dev = q.device().clone();
    let name = format!("gptj_paged_attention_{}", suffix(&q.slice)?);
    let slice = match (&q.slice, &cache.slice) {
        (CudaStorageSlice::F32(q), CudaStorageSlice::F32(c)) => {
            CudaStorageSlice::F32(launch(step, shape, scale, &dev, &name, q, q_l, c, cache_l)?)
        }
        (CudaStorageSlice::F16(q), CudaStorageSlice::F16(c)) => {
            CudaStorageSlice::F16(launch(step, shape, scale, &dev, &name, q, q_l, c, cache_l)?)
        }
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(c)) => {
            CudaStorageSlice::BF16(launch(step, shape, scale, &dev, &name, q, q_l, c, cache_l)?)
        }
        _ => {
            candle_core::bail!("paged attention: queries and cache must have the same float dtype")
        }
    };
    Ok((CudaStorage { slice, device: dev }, q_l.shape().clone()))
}
