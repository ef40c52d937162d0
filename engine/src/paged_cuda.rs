//! CUDA implementations of the paged-KV ops (kernels in `kernels/paged.cu`, compiled to PTX by
//! build.rs). The step's index arrays are uploaded once per step, on first use, and shared by
//! every layer.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, Layout, Shape};

use super::{cache_dims, PagedAttention, StepLayout, WriteKv};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged.ptx"));
const MODULE: &str = "gptj_paged";
const THREADS: u32 = 128;

/// The step's index arrays on the GPU.
pub(super) struct DeviceIndex {
    slots: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    token_row: CudaSlice<u32>,
    tables: CudaSlice<u32>,
    table_start: CudaSlice<u32>,
    max_context: u32,
}

/// Holds the uploaded copy inside a [`StepLayout`].
#[derive(Default)]
pub(super) struct DeviceIndexCell(OnceLock<DeviceIndex>);

impl std::fmt::Debug for DeviceIndexCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceIndexCell")
    }
}

impl StepLayout {
    fn device_index(&self, dev: &CudaDevice) -> candle_core::Result<&DeviceIndex> {
        if let Some(index) = self.device.0.get() {
            return Ok(index);
        }
        let index = DeviceIndex {
            slots: dev.clone_htod(&self.slots)?,
            positions: dev.clone_htod(&self.positions)?,
            token_row: dev.clone_htod(&self.token_row)?,
            tables: dev.clone_htod(&self.tables)?,
            table_start: dev.clone_htod(&self.table_start)?,
            max_context: self.positions.iter().copied().max().unwrap_or(0) + 1,
        };
        Ok(self.device.0.get_or_init(|| index))
    }
}

fn suffix(slice: &CudaStorageSlice) -> candle_core::Result<&'static str> {
    Ok(match slice {
        CudaStorageSlice::F32(_) => "f32",
        CudaStorageSlice::F16(_) => "f16",
        CudaStorageSlice::BF16(_) => "bf16",
        _ => candle_core::bail!("paged KV ops support f32, f16 and bf16 only"),
    })
}

impl WriteKv {
    pub(super) fn cuda(
        &self,
        cache: &mut CudaStorage,
        cache_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        fn launch<T: DeviceRepr>(
            op: &WriteKv,
            dev: &CudaDevice,
            name: &str,
            cache: &mut CudaSlice<T>,
            cache_l: &Layout,
            k: &CudaSlice<T>,
            k_l: &Layout,
            v: &CudaSlice<T>,
            v_l: &Layout,
        ) -> candle_core::Result<()> {
            let (slots, heads, dim) = cache_dims(cache_l)?;
            let width = (heads * dim) as u32;
            if cache_l.start_offset() != 0 || !cache_l.is_contiguous() {
                candle_core::bail!("KV cache must be contiguous from offset 0");
            }
            let (k, v) = match (k_l.contiguous_offsets(), v_l.contiguous_offsets()) {
                (Some((a, b)), Some((c, d))) => (k.slice(a..b), v.slice(c..d)),
                _ => candle_core::bail!("new K/V must be contiguous"),
            };
            let index = op.step.device_index(dev)?;
            let n = op.step.num_tokens() as u32;
            if n == 0 {
                return Ok(());
            }
            let half_len = (slots * heads * dim) as u64;
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
            // Safety: argument types and count match the kernel's signature in paged.cu.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }
        let dev = cache.device().clone();
        let name = format!("gptj_write_kv_{}", suffix(&cache.slice)?);
        match (&mut cache.slice, &k.slice, &v.slice) {
            (CudaStorageSlice::F32(c), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
                launch(self, &dev, &name, c, cache_l, k, k_l, v, v_l)
            }
            (CudaStorageSlice::F16(c), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
                launch(self, &dev, &name, c, cache_l, k, k_l, v, v_l)
            }
            (CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                launch(self, &dev, &name, c, cache_l, k, k_l, v, v_l)
            }
            _ => candle_core::bail!("KV write: cache and new K/V must have the same float dtype"),
        }
    }
}

impl PagedAttention {
    pub(super) fn cuda(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        cache: &CudaStorage,
        cache_l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        fn launch<T: DeviceRepr>(
            op: &PagedAttention,
            dev: &CudaDevice,
            name: &str,
            q: &CudaSlice<T>,
            q_l: &Layout,
            cache: &CudaSlice<T>,
            cache_l: &Layout,
        ) -> candle_core::Result<CudaSlice<T>> {
            let (slots, heads, dim) = cache_dims(cache_l)?;
            let q = match q_l.contiguous_offsets() {
                Some((a, b)) => q.slice(a..b),
                None => candle_core::bail!("queries must be contiguous"),
            };
            let cache = match cache_l.contiguous_offsets() {
                Some((a, b)) => cache.slice(a..b),
                None => candle_core::bail!("KV cache must be contiguous"),
            };
            let index = op.step.device_index(dev)?;
            let n = op.step.num_tokens();
            // Safety: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<T>(n * heads * dim)? };
            if n == 0 {
                return Ok(out);
            }
            let shared = (dim as u32 + index.max_context + 32) * 4;
            let (heads_u, dim_u, bs) = (heads as u32, dim as u32, op.step.block_size as u32);
            let half_len = (slots * heads * dim) as u64;
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
            b.arg(&op.scale);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, heads_u, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: shared,
            };
            // Safety: argument types and count match the kernel's signature in paged.cu.
            unsafe { b.launch(cfg) }.w()?;
            Ok(out)
        }
        let dev = q.device().clone();
        let name = format!("gptj_paged_attention_{}", suffix(&q.slice)?);
        let slice = match (&q.slice, &cache.slice) {
            (CudaStorageSlice::F32(q), CudaStorageSlice::F32(c)) => {
                CudaStorageSlice::F32(launch(self, &dev, &name, q, q_l, c, cache_l)?)
            }
            (CudaStorageSlice::F16(q), CudaStorageSlice::F16(c)) => {
                CudaStorageSlice::F16(launch(self, &dev, &name, q, q_l, c, cache_l)?)
            }
            (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(c)) => {
                CudaStorageSlice::BF16(launch(self, &dev, &name, q, q_l, c, cache_l)?)
            }
            _ => candle_core::bail!(
                "paged attention: queries and cache must have the same float dtype"
            ),
        };
        Ok((CudaStorage { slice, device: dev }, q_l.shape().clone()))
    }
}
