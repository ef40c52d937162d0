//! Linear layers for the CPU with weights repacked at load time for gptj's AVX-512 and AVX2
//! kernels.
//!
//! candle's CPU matmuls leave most of a modern x86 core idle on GPT-J's shapes: its gemm runs
//! AVX2 only, its one-row path rounds differently from its many-row path (batch invariance
//! then costs a duplicated row), and its q8_0 product is a dot product per output that
//! re-reads every weight block once per row of the batch. Here each weight is repacked once,
//! when the model loads, into panels of 16 output columns, so that one 512-bit register holds
//! the same input position of 16 outputs:
//!
//! - float weights (f32, f16 or bf16) as `[column group][k][16]`: the kernel broadcasts one
//!   input value and does one fused multiply-add into 16 outputs, the classic register-tiled
//!   gemm, with no horizontal sums;
//! - bf16 weights, where the CPU has AVX-512 BF16 and `in` is even, as pairs
//!   `[column group][k / 2][16][2]`: the kernel broadcasts a pair of bf16 inputs and one
//!   `vdpbf16ps` adds both products into 16 outputs (the same tile, the inputs not widened);
//!   where the CPU also has AMX-BF16 and `in` is a multiple of 32, the same panels go to the
//!   tile unit (`amx.rs`), which multiplies 16 rows by 32 inputs of a group per instruction;
//! - q8_0 weights as `[column group][block of 32][8 quads][16 columns][4 bytes]`, offset by
//!   128 to unsigned bytes, with one f16 scale per block and column: the kernel quantizes the
//!   input rows to q8_0, and one `vpdpbusd` multiplies 4 input bytes into 16 outputs' exact
//!   32-bit block sums (the offset is cancelled by starting each sum at `-128 * sum(x)`).
//!
//! Batch invariance comes from the layout rather than from luck: every output is one
//! accumulator that sees its terms in input order (f32) or block order (q8_0), whatever tile
//! its row falls into, so a row's result is bitwise the same alone or in any batch. Threads
//! split the column groups, so at batch 1 each streams its own half of the weight.
//!
//! Every kind runs where the CPU has AVX-512 (F, BW, VL, VNNI), F16C and FMA (`avx512.rs`),
//! and where it has AVX2, F16C and FMA only (`avx2.rs`, the same panels read as two 256-bit
//! halves; q8_0 through `vpmaddubsw` with the same exact block sums). A [`PackedLinear`]
//! cannot be built without the [`Isa`] token that proves its instruction set, and it keeps
//! the token for every product it runs. Elsewhere `Linear` keeps candle's kernels;
//! `GPTJ_CPU_KERNELS=candle` forces those too, and `GPTJ_CPU_KERNELS=avx2` the AVX2 kernels
//! on an AVX-512 CPU, for A/B comparisons.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::activation::Activation;
use super::amx;
use super::avx2;
use super::avx512;
use super::tile::{FloatTile, Q8Tile, Start, QBLOCK};
use crate::cpu::{Amx, Avx512, Bf16Dot, Elem, Isa, SharedOut, LANES};
use crate::error::Result;
use crate::precision::Precision;
/// Input positions handled per pass over a tile of outputs, so that the weight panel slice
/// and the input rows it meets stay in L2 for large inputs. A multiple of `QBLOCK`. (64 to
/// 1024 measured within noise of each other on `examples/packed_ab.rs`.)
const KC: usize = 1024;
// q8_0 passes start on block boundaries, and bf16 pair passes on even inputs.
const _: () = assert!(KC.is_multiple_of(QBLOCK) && QBLOCK.is_multiple_of(2));
// AMX passes start on whole tile steps.
const _: () = assert!(KC.is_multiple_of(amx::K_STEP));
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// The repacked weight.
enum Panels {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    /// bf16 in pair panels `[group][k / 2][16][2]` for `vdpbf16ps`, on CPUs with AVX-512
    /// BF16 and an even `in_dim`: the token proves the instruction for every product. Where
    /// the CPU has AMX-BF16 and `in_dim` is a multiple of 32, every product of the layer runs
    /// on the tile unit instead (the same panels; its sums round differently, so a layer
    /// never mixes the two).
    Bf16Pairs {
        panels: Vec<bf16>,
        dot: Bf16Dot,
        amx: Option<Amx>,
    },
    /// Quants offset to `u8` and one scale per (column, block).
    Q8 {
        quants: Vec<u8>,
        scales: Vec<f16>,
    },
}

/// `y = x W^T + b` with `W` repacked for gptj's kernels. Inputs and outputs are
/// `(rows, in)` and `(rows, out)` tensors in the activation dtype; the arithmetic is f32.
pub(crate) struct PackedLinear {
    out_dim: usize,
    in_dim: usize,
    groups: usize,
    panels: Panels,
    /// Padded to `groups * LANES`.
    bias: Option<Vec<f32>>,
    /// The proof that the kernels can run here, for every product.
    cpu: Isa,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("out_dim", &self.out_dim)
            .field("in_dim", &self.in_dim)
            .field("dtype", &self.dtype_name())
            .finish()
    }
}

/// What the packed weight is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PackedKind {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl PackedKind {
    /// The packing for a layer of `in_dim` inputs under `precision` with activations `act`;
    /// `None` where the packed kernels have none (q8_0 needs `in_dim` divisible by 32).
    pub(crate) fn choose(precision: Precision, act: DType, in_dim: usize) -> Option<Self> {
        match (precision, act) {
            (Precision::Q8_0, _) if in_dim.is_multiple_of(QBLOCK) => Some(Self::Q8_0),
            (Precision::Q8_0, _) => None,
            (_, DType::F32) => Some(Self::F32),
            (_, DType::F16) => Some(Self::F16),
            (_, DType::BF16) => Some(Self::Bf16),
            _ => None,
        }
    }
}

impl PackedLinear {
    /// Packs `weight` (`(out, in)`, any float dtype, on the CPU) as `kind`. q8_0 needs `in` to
    /// be a multiple of 32.
    pub(crate) fn new(
        cpu: Isa,
        weight: &Tensor,
        bias: Option<&Tensor>,
        kind: PackedKind,
    ) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        if out_dim == 0 || in_dim == 0 {
            // `run` relies on at least one pass over the inputs writing every output.
            return Err(crate::EngineError::InvalidInput(format!(
                "a packed linear layer needs a non-empty weight, got {out_dim}x{in_dim}"
            )));
        }
        let groups = out_dim.div_ceil(LANES);
        let w: Vec<f32> = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let panels = match kind {
            PackedKind::F32 => Panels::F32(pack_float(&w, out_dim, in_dim, |v| v)),
            PackedKind::F16 => Panels::F16(pack_float(&w, out_dim, in_dim, f16::from_f32)),
            PackedKind::Bf16 => match cpu.avx512().and_then(Avx512::bf16_dot) {
                Some(dot) if in_dim.is_multiple_of(2) => Panels::Bf16Pairs {
                    panels: pack_pairs(&w, out_dim, in_dim),
                    dot,
                    amx: cpu
                        .avx512()
                        .and_then(Avx512::amx)
                        .filter(|_| in_dim.is_multiple_of(amx::K_STEP)),
                },
                _ => Panels::Bf16(pack_float(&w, out_dim, in_dim, bf16::from_f32)),
            },
            PackedKind::Q8_0 => {
                if in_dim % QBLOCK != 0 {
                    return Err(crate::EngineError::InvalidInput(format!(
                        "q8_0 needs an input dimension divisible by {QBLOCK}, got {in_dim}"
                    )));
                }
                let (quants, scales) = pack_q8(&w, out_dim, in_dim);
                Panels::Q8 { quants, scales }
            }
        };
        let bias = bias
            .map(|b| -> Result<Vec<f32>> {
                let mut v = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                v.resize(groups * LANES, 0.0);
                Ok(v)
            })
            .transpose()?;
        Ok(Self {
            out_dim,
            in_dim,
            groups,
            panels,
            bias,
            cpu,
        })
    }

    fn dtype_name(&self) -> &'static str {
        match self.panels {
            Panels::F32(_) => "f32",
            Panels::F16(_) => "f16",
            Panels::Bf16(_) | Panels::Bf16Pairs { .. } => "bf16",
            Panels::Q8 { .. } => "q8_0",
        }
    }

    /// Bytes of weights one forward reads.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.panels {
            Panels::F32(p) => p.len() * 4,
            Panels::F16(p) => p.len() * 2,
            Panels::Bf16(p) | Panels::Bf16Pairs { panels: p, .. } => p.len() * 2,
            Panels::Q8 { quants, scales, .. } => quants.len() + scales.len() * 2,
        }
    }

    /// `act(x W^T + b)` for `x` `(rows, in)`, the activation applied in the kernel while the
    /// outputs are still in cache.
    pub(crate) fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        Ok(x.apply_op1_no_bwd(&PackedProduct { lin: self, act })?)
    }

    /// The product on f32 rows: `x` is `rows * in_dim`, the result `rows * out_dim`.
    fn run(&self, x: &[f32], rows: usize, act: Activation) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim, "packed linear: input size");
        match &self.panels {
            Panels::Q8 { .. } => self.run_input(
                &Input::Q8(QuantizedRows::new(self.cpu, x, rows, self.in_dim)),
                rows,
                act,
            ),
            Panels::Bf16Pairs { .. } => {
                let mut narrow = vec![bf16::ZERO; x.len()];
                bf16::narrow_into(x, &mut narrow);
                self.run_input(&Input::Bf16(&narrow), rows, act)
            }
            _ => self.run_input(&Input::F32(x), rows, act),
        }
    }

    /// Column groups per tile on this layer's kernel: the unit `Job::columns` walks in, and
    /// so the unit the threads' chunks are rounded to.
    fn tile_groups(&self) -> usize {
        match (&self.panels, self.cpu) {
            (Panels::Q8 { .. }, Isa::Avx512(_)) => QC,
            (_, Isa::Avx512(_)) => FC,
            (_, Isa::Avx2(_)) => 1,
        }
    }

    /// The product on `input`, whose rows are `in_dim` long; the result `rows * out_dim`.
    fn run_input(&self, input: &Input<'_>, rows: usize, act: Activation) -> Vec<f32> {
        let stride = self.groups * LANES;
        // Every element is written by the first pass over the inputs before anything reads it,
        // so the buffer is not zeroed first; its length is set once the kernels are done.
        let mut out: Vec<f32> = Vec::with_capacity(rows * stride);
        let job = Job {
            lin: self,
            input,
            rows,
            act,
            out: SharedOut::uninit(&mut out.spare_capacity_mut()[..rows * stride]),
            stride,
        };
        // candle's own pool (the calling thread plus spinning workers) rather than rayon's: the
        // element-wise ops between two products already run there, and two pools on the same
        // cores take turns spinning instead of working. Column groups are handed out in
        // chunks from a shared cursor, so a thread that starts late or is preempted (by the
        // HTTP server, say) does not hold the others up.
        let pool = candle_core::utils::barrier_pool();
        let parts = pool.n_workers() + 1;
        if parts <= 1 || rows * self.in_dim * self.out_dim < PARALLEL_MIN_MACS {
            // SAFETY: one call, on this thread alone.
            unsafe { job.columns(0, self.groups) };
        } else {
            let chunk = self
                .groups
                .div_ceil(parts * 8)
                .next_multiple_of(self.tile_groups());
            pool.execute_chunked(self.groups.div_ceil(chunk), |range| {
                let g0 = range.start * chunk;
                // SAFETY: the pool hands each index of `0..n_items` to exactly one call (a
                // shared cursor), so the group ranges of concurrent calls are disjoint.
                unsafe { job.columns(g0, (range.end * chunk).min(self.groups)) };
            });
        }
        // SAFETY: `columns` ran over every group `0..groups` (in one call or in the pool's
        // chunks, which cover `0..groups`), and its first pass over the inputs wrote every
        // element of rows `0..rows`, groups `g..g + c` of `out`: all `rows * stride` elements.
        unsafe { out.set_len(rows * stride) };
        if stride != self.out_dim {
            for r in 0..rows {
                out.copy_within(r * stride..r * stride + self.out_dim, r * self.out_dim);
            }
            out.truncate(rows * self.out_dim);
        }
        out
    }
}

impl PackedLinear {
    /// `run` for bf16 activations: straight to the pair kernel where the panels are pairs,
    /// else widened like f16.
    fn run_bf16(&self, x: &[bf16], rows: usize, act: Activation) -> Vec<bf16> {
        match self.panels {
            Panels::Bf16Pairs { .. } => {
                assert_eq!(x.len(), rows * self.in_dim, "packed linear: input size");
                let out = self.run_input(&Input::Bf16(x), rows, act);
                let mut narrow = vec![bf16::ZERO; out.len()];
                bf16::narrow_into(&out, &mut narrow);
                narrow
            }
            _ => self.run_narrow(x, rows, act),
        }
    }

    /// `run` for f16/bf16 activations: widened to f32 on the way in, narrowed on the way out.
    fn run_narrow<T: Elem>(&self, x: &[T], rows: usize, act: Activation) -> Vec<T> {
        let mut xf = vec![0f32; x.len()];
        let xf = T::as_f32(x, &mut xf);
        let out = self.run(xf, rows, act);
        let mut narrow = vec![T::narrow(0.0); out.len()];
        T::narrow_into(&out, &mut narrow);
        narrow
    }
}

/// `[group][k][lane]`, zero-padded past `out_dim`.
fn pack_float<T: Copy + Default>(
    w: &[f32],
    out_dim: usize,
    in_dim: usize,
    conv: impl Fn(f32) -> T,
) -> Vec<T> {
    let groups = out_dim.div_ceil(LANES);
    let mut p = crate::hugepages::filled_vec(T::default(), groups * in_dim * LANES);
    for n in 0..out_dim {
        let (g, lane) = (n / LANES, n % LANES);
        for (k, &v) in w[n * in_dim..(n + 1) * in_dim].iter().enumerate() {
            p[(g * in_dim + k) * LANES + lane] = conv(v);
        }
    }
    p
}

/// `[group][k / 2][lane][2]` in bf16, zero-padded past `out_dim`; `in_dim` is even. Pair
/// `k / 2` of a group starts where input `k` does in `pack_float`'s layout, so the two share
/// their tile slicing.
fn pack_pairs(w: &[f32], out_dim: usize, in_dim: usize) -> Vec<bf16> {
    debug_assert!(in_dim.is_multiple_of(2));
    let groups = out_dim.div_ceil(LANES);
    let mut p = crate::hugepages::filled_vec(bf16::ZERO, groups * in_dim * LANES);
    for n in 0..out_dim {
        let (g, lane) = (n / LANES, n % LANES);
        for (k, &v) in w[n * in_dim..(n + 1) * in_dim].iter().enumerate() {
            p[((g * in_dim + k - k % 2) * LANES) + lane * 2 + k % 2] = bf16::from_f32(v);
        }
    }
    p
}

/// q8_0 per (column, block of 32): scale `d = amax / 127` (stored f16), `q = round(w / d)`;
/// quants stored `[group][block][quad][lane][4]` as `q + 128`.
fn pack_q8(w: &[f32], out_dim: usize, in_dim: usize) -> (Vec<u8>, Vec<f16>) {
    let groups = out_dim.div_ceil(LANES);
    let blocks = in_dim / QBLOCK;
    // Padding columns are zero weights: quant 0 (stored 128) with scale 0.
    let mut quants = crate::hugepages::filled_vec(128u8, groups * blocks * QBLOCK * LANES);
    let mut scales = vec![f16::ZERO; groups * blocks * LANES];
    for n in 0..out_dim {
        let (g, lane) = (n / LANES, n % LANES);
        for b in 0..blocks {
            let src = &w[n * in_dim + b * QBLOCK..n * in_dim + (b + 1) * QBLOCK];
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = f16::from_f32(amax / 127.0);
            let inv = if d.to_f32() > 0.0 {
                1.0 / d.to_f32()
            } else {
                0.0
            };
            scales[(g * blocks + b) * LANES + lane] = d;
            let base = (g * blocks + b) * QBLOCK * LANES;
            for (i, &v) in src.iter().enumerate() {
                let q = (v * inv).round().clamp(-127.0, 127.0) as i32;
                let (quad, byte) = (i / 4, i % 4);
                quants[base + quad * LANES * 4 + lane * 4 + byte] = (q + 128) as u8;
            }
        }
    }
    (quants, scales)
}

/// Input rows quantized to q8_0 for the integer kernel.
struct QuantizedRows {
    /// `rows * in_dim` signed quants.
    quants: Vec<i8>,
    /// Per (row, block): the scale.
    scales: Vec<f32>,
    /// Per (row, block): `-128 * sum(quants)`, the start of the AVX-512 kernel's integer sum.
    offsets: Vec<i32>,
}

impl QuantizedRows {
    fn new(cpu: Isa, x: &[f32], rows: usize, in_dim: usize) -> Self {
        let blocks = in_dim / QBLOCK;
        let mut q = Self {
            quants: vec![0i8; rows * in_dim],
            scales: vec![0f32; rows * blocks],
            offsets: vec![0i32; rows * blocks],
        };
        let (quants, scales, offsets) = (&mut q.quants, &mut q.scales, &mut q.offsets);
        match cpu {
            Isa::Avx512(cpu) => avx512::quantize_blocks(cpu, x, quants, scales, offsets),
            Isa::Avx2(cpu) => avx2::quantize_blocks(cpu, x, quants, scales, offsets),
        }
        q
    }
}

enum Input<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    Q8(QuantizedRows),
}

/// One product, split by column groups between threads.
struct Job<'a> {
    lin: &'a PackedLinear,
    input: &'a Input<'a>,
    rows: usize,
    act: Activation,
    /// `rows * stride` outputs, not yet initialised; threads write disjoint column groups of
    /// it (see `columns`).
    out: SharedOut<'a, f32>,
    /// Row stride of `out`: `groups * LANES`.
    stride: usize,
}

/// Rows per tile in the float kernel, and column groups per tile (`tile` instantiates every
/// shape up to these).
const FR: usize = 6;
const FC: usize = 4;
/// The same for the q8_0 kernel, which holds an integer and a float accumulator per output.
const QR: usize = 4;
const QC: usize = 3;
/// Rows per tile in the AVX2 float kernel, whose tiles are one column group wide (two
/// registers per row: 12 accumulators, two weights and a broadcast in 16 registers).
const AR: usize = 6;
/// The same for the AVX2 q8_0 kernel: 8 integer sums, the signed weights and their
/// magnitudes, a broadcast and the constant of ones (its float sums stay in `out`).
const AQR: usize = 4;
/// Rows per tile on the AMX bf16 kernel: a tile register's 16 rows.
const AMX_R: usize = 16;

impl Job<'_> {
    /// Computes column groups `g0..g1` for every row, then applies the activation to them.
    ///
    /// # Safety
    /// No other thread runs `columns` on a range overlapping `g0..g1` of this job at the same
    /// time (the parts of `out` are disjoint only between disjoint group ranges).
    unsafe fn columns(&self, g0: usize, g1: usize) {
        assert!(
            g0 <= g1 && g1 <= self.lin.groups,
            "column groups {g0}..{g1}"
        );
        let k = self.lin.in_dim;
        let tile_c = self.lin.tile_groups();
        let mut g = g0;
        while g < g1 {
            let c = tile_c.min(g1 - g);
            let mut k0 = 0;
            while k0 < k {
                let k1 = (k0 + KC).min(k);
                // SAFETY: groups `g..g + c` lie in this call's `g0..g1`, which no other
                // thread works on (the caller's promise).
                unsafe { self.tiles(g, c, k0, k1) };
                k0 = k1;
            }
            if self.act == Activation::GeluNew {
                for r in 0..self.rows {
                    let start = r * self.stride + g * LANES;
                    // SAFETY: row `r`, groups `g..g + c` are this call's own part of `out`
                    // (see above), and the first pass over the inputs just wrote all of it.
                    let part = unsafe { self.out.slice(start..start + c * LANES) };
                    match self.lin.cpu {
                        Isa::Avx512(cpu) => avx512::gelu_new(cpu, part),
                        Isa::Avx2(cpu) => avx2::gelu_new(cpu, part),
                    }
                }
            }
            g += c;
        }
    }

    /// Runs the kernels over every row, `nc` column groups from `g`, inputs `k0..k1` (a
    /// multiple of `QBLOCK` apart for q8_0): tiles of up to `FR` (`QR`, `AR`, `AQR`) rows, each on
    /// the kernel instantiated for its shape (on AVX2, one column group: `nc` is 1).
    ///
    /// The pointers come from one view of all the rows (`view`, `q8_view`), taken from slices
    /// indexed over the whole of it, so an out-of-range view panics there rather than reaching
    /// a kernel; each tile's are that view moved down to the tile's first row, inside it. The
    /// CPU's features are proven by the layer's [`Isa`] token.
    ///
    /// # Safety
    /// No other thread reads or writes groups `g..g + nc` of `out` meanwhile.
    unsafe fn tiles(&self, g: usize, nc: usize, k0: usize, k1: usize) {
        let rows = self.rows;
        if rows == 0 {
            return;
        }
        /// `$call!(R, C)` for the tile's `nr` x `nc`, from the listed shapes.
        macro_rules! by_shape {
            ($call:ident; $nr:expr; [$($rr:literal),+]; $cs:tt) => {
                match $nr {
                    $($rr => by_shape!(@cols $call; $rr; $cs),)+
                    _ => unreachable!("tile rows"),
                }
            };
            (@cols $call:ident; $rr:literal; [$($cc:literal),+]) => {
                match nc {
                    $($cc => $call!($rr, $cc),)+
                    _ => unreachable!("tile columns"),
                }
            };
        }
        /// Every row tile of `$view` (all rows) on `$m::$kernel` (a token argument before the
        /// view: `[$token]`; generics after the shape: `$t`).
        macro_rules! row_tiles {
            ($m:ident::$kernel:ident $([$token:expr])?, $view:expr, $max_r:expr;
                $rs:tt; $cs:tt $(, $t:ty)?) => {{
                let all = $view;
                let mut r = 0;
                while r < rows {
                    let nr = $max_r.min(rows - r);
                    let view = all.down_rows(r);
                    macro_rules! call {
                        ($rr:literal, $cc:literal) => {
                            // SAFETY: the view covers rows `r..r + nr` (all rows from 0 were
                            // checked where it was made, and `r + nr <= rows`) of `nc` groups,
                            // the features are proven (float and q8_0 panels: `self.lin.cpu`,
                            // matched to the kernel's instruction set below; pair panels: their
                            // `Bf16Dot`, and AMX q8_0 panels: their `Amx`, which only an
                            // `Avx512` makes), and the output part is this thread's alone (the
                            // caller's promise).
                            unsafe { $m::$kernel::<$rr, $cc $(, $t)?>($($token,)? view) }
                        };
                    }
                    by_shape!(call; nr; $rs; $cs);
                    r += nr;
                }
            }};
        }
        /// The float tiles of `$x` against panels `$p` on `$kernel` (generics after the
        /// shape: `$t`).
        macro_rules! float {
            ($kernel:ident, $x:expr, $p:expr $(, $t:ty)?) => {
                match self.lin.cpu {
                    Isa::Avx512(_) => row_tiles!(avx512::$kernel, self.view($x, $p, g, nc, k0, k1),
                        FR; [1, 2, 3, 4, 5, 6]; [1, 2, 3, 4] $(, $t)?),
                    Isa::Avx2(_) => row_tiles!(avx2::float_tile, self.view($x, $p, g, nc, k0, k1),
                        AR; [1, 2, 3, 4, 5, 6]; [1] $(, $t)?),
                }
            };
        }
        match (&self.lin.panels, self.input) {
            (Panels::F32(p), Input::F32(x)) => float!(float_tile, x, p, _),
            (Panels::F16(p), Input::F32(x)) => float!(float_tile, x, p, _),
            (Panels::Bf16(p), Input::F32(x)) => float!(float_tile, x, p, _),
            (
                Panels::Bf16Pairs {
                    panels: p,
                    amx: Some(tiles),
                    ..
                },
                Input::Bf16(x),
            ) => {
                row_tiles!(amx::bf16_tile[*tiles], self.view(x, p, g, nc, k0, k1), AMX_R;
                    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]; [1, 2, 3, 4])
            }
            (Panels::Bf16Pairs { panels: p, dot, .. }, Input::Bf16(x)) => {
                row_tiles!(avx512::bf16_pair_tile[*dot], self.view(x, p, g, nc, k0, k1), FR;
                    [1, 2, 3, 4, 5, 6]; [1, 2, 3, 4])
            }
            (Panels::Q8 { .. }, Input::Q8(_)) => match self.lin.cpu {
                Isa::Avx512(_) => row_tiles!(avx512::q8_tile, self.q8_view(g, nc, k0, k1), QR;
                    [1, 2, 3, 4]; [1, 2, 3]),
                Isa::Avx2(_) => row_tiles!(avx2::q8_tile, self.q8_view(g, nc, k0, k1), AQR;
                    [1, 2, 3, 4]; [1]),
            },
            _ => unreachable!("`run` builds the input its panels take"),
        }
    }

    /// The part of `out` the tiles of groups `g..g + nc` write, over every row (and what lies
    /// between the rows); panics outside `out`.
    fn out_ptr(&self, g: usize, nc: usize) -> *mut f32 {
        let start = g * LANES;
        let end = (self.rows - 1) * self.stride + (g + nc) * LANES;
        self.out.ptr(start..end)
    }

    /// Pointers for the float tiles of every row of inputs `x` against `panels`, each taken
    /// from a slice that covers them all. Pair panels share the float layout's offsets (pair
    /// `k / 2` starts where input `k` would), and their `k0`, `k1` are even (`KC` is, and so
    /// is their `in_dim`).
    fn view<X, W>(
        &self,
        x: &[X],
        panels: &[W],
        g: usize,
        nc: usize,
        k0: usize,
        k1: usize,
    ) -> FloatTile<X, W> {
        let k = self.lin.in_dim;
        let last_r = self.rows - 1;
        FloatTile {
            x: x[k0..last_r * k + k1].as_ptr(),
            x_stride: k,
            w: panels[(g * k + k0) * LANES..((g + nc - 1) * k + k1) * LANES].as_ptr(),
            w_stride: k * LANES,
            len: k1 - k0,
            out: self.out_ptr(g, nc),
            out_stride: self.stride,
            bias: self.start(g, nc, k0),
        }
    }

    /// Pointers for the q8_0 tiles of every row, each taken from a slice that covers them all.
    fn q8_view(&self, g: usize, nc: usize, k0: usize, k1: usize) -> Q8Tile {
        let (Input::Q8(x), Panels::Q8 { quants, scales, .. }) = (self.input, &self.lin.panels)
        else {
            unreachable!("q8 panels take quantized input")
        };
        let k = self.lin.in_dim;
        let blocks = k / QBLOCK;
        let (b0, b1) = (k0 / QBLOCK, k1 / QBLOCK);
        let (last_r, last_g) = (self.rows - 1, g + nc - 1);
        Q8Tile {
            xq: x.quants[k0..last_r * k + k1].as_ptr(),
            x_scales: x.scales[b0..last_r * blocks + b1].as_ptr(),
            x_offsets: x.offsets[b0..last_r * blocks + b1].as_ptr(),
            x_stride: k,
            x_block_stride: blocks,
            wq: quants[(g * blocks + b0) * QBLOCK * LANES..(last_g * blocks + b1) * QBLOCK * LANES]
                .as_ptr(),
            w_scales: scales[(g * blocks + b0) * LANES..(last_g * blocks + b1) * LANES].as_ptr(),
            w_group_blocks: blocks,
            blocks: b1 - b0,
            out: self.out_ptr(g, nc),
            out_stride: self.stride,
            bias: self.start(g, nc, k0),
        }
    }

    /// Where the accumulators start: the bias (or zero) on the first pass over the inputs,
    /// the partial sums already in `out` after that.
    fn start(&self, g: usize, nc: usize, k0: usize) -> Start {
        match (k0, &self.lin.bias) {
            (0, Some(b)) => Start::Bias(b[g * LANES..(g + nc) * LANES].as_ptr()),
            (0, None) => Start::Zero,
            _ => Start::Out,
        }
    }
}

/// One call of a [`PackedLinear`] with its activation, as a candle op.
struct PackedProduct<'a> {
    lin: &'a PackedLinear,
    act: Activation,
}

impl CustomOp1 for PackedProduct<'_> {
    fn name(&self) -> &'static str {
        "gptj-packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("packed linear needs a contiguous input");
        };
        let (rows, k) = l.shape().dims2()?;
        let (lin, act) = (self.lin, self.act);
        if k != lin.in_dim {
            candle_core::bail!(
                "packed linear: input has {k} columns, the weight {}",
                lin.in_dim
            );
        }
        let shape = Shape::from((rows, lin.out_dim));
        Ok(match s {
            CpuStorage::F32(x) => (CpuStorage::F32(lin.run(&x[start..end], rows, act)), shape),
            CpuStorage::F16(x) => (
                CpuStorage::F16(lin.run_narrow(&x[start..end], rows, act)),
                shape,
            ),
            CpuStorage::BF16(x) => (
                CpuStorage::BF16(lin.run_bf16(&x[start..end], rows, act)),
                shape,
            ),
            other => {
                use candle_core::backend::BackendStorage;
                candle_core::bail!("packed linear: unsupported input dtype {:?}", other.dtype())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;
    use candle_core::Device;

    /// The panels put weight `(n, k)` where the float kernel reads output `n`'s input `k`:
    /// group `n / 16`, row `k`, lane `n % 16`; padding columns are zero. Plain Rust (Miri).
    #[test]
    fn float_panels_hold_each_weight_in_its_lane() {
        let (out_dim, in_dim) = (20, 3);
        let w: Vec<f32> = (0..out_dim * in_dim).map(|i| i as f32 + 1.0).collect();
        let p = pack_float(&w, out_dim, in_dim, |v| v);
        assert_eq!(p.len(), 2 * in_dim * LANES);
        for g in 0..2 {
            for k in 0..in_dim {
                for lane in 0..LANES {
                    let n = g * LANES + lane;
                    let want = if n < out_dim { w[n * in_dim + k] } else { 0.0 };
                    assert_eq!(p[(g * in_dim + k) * LANES + lane], want, "n {n} k {k}");
                }
            }
        }
    }

    /// q8_0 panels: quants at `[group][block][quad][lane][4]` offset by 128, one f16 scale per
    /// (column, block), dequantizing to the weight within half a quantization step; padding
    /// columns are quant 0 with scale 0. Plain Rust (Miri).
    #[test]
    fn q8_panels_dequantize_to_the_weights() {
        let (out_dim, in_dim) = (18, 2 * QBLOCK);
        let w: Vec<f32> = (0..out_dim * in_dim)
            .map(|i| ((i * 7919 % 255) as f32 - 127.0) / 64.0)
            .collect();
        let (quants, scales) = pack_q8(&w, out_dim, in_dim);
        let blocks = in_dim / QBLOCK;
        for n in 0..2 * LANES {
            let (g, lane) = (n / LANES, n % LANES);
            for b in 0..blocks {
                let d = scales[(g * blocks + b) * LANES + lane].to_f32();
                for i in 0..QBLOCK {
                    let at = (g * blocks + b) * QBLOCK * LANES + (i / 4) * LANES * 4 + lane * 4;
                    let q = quants[at + i % 4] as i32 - 128;
                    if n >= out_dim {
                        assert_eq!((q, d), (0, 0.0), "padding column {n}");
                        continue;
                    }
                    let want = w[n * in_dim + b * QBLOCK + i];
                    assert!((q as f32 * d - want).abs() <= d / 2.0 + 1e-6, "n {n} {i}");
                }
            }
        }
    }

    /// Pair panels put weight `(n, k)` at group `n / 16`, pair `k / 2`, lane `n % 16`, slot
    /// `k % 2`; padding columns are zero. Plain Rust (Miri).
    #[test]
    fn pair_panels_hold_each_weight_beside_its_partner() {
        let (out_dim, in_dim) = (20, 6);
        let w: Vec<f32> = (0..out_dim * in_dim).map(|i| i as f32 + 1.0).collect();
        let p = pack_pairs(&w, out_dim, in_dim);
        assert_eq!(p.len(), 2 * in_dim * LANES);
        for n in 0..2 * LANES {
            let (g, lane) = (n / LANES, n % LANES);
            for k in 0..in_dim {
                let want = if n < out_dim { w[n * in_dim + k] } else { 0.0 };
                let at = (g * in_dim + 2 * (k / 2)) * LANES + 2 * lane + k % 2;
                assert_eq!(p[at].to_f32(), want, "n {n} k {k}");
            }
        }
    }

    /// The pair kernels (on the tile unit where the CPU has AMX, and on `vdpbf16ps`) and the
    /// widening f32 kernel compute the same products of the same bf16 values; they differ
    /// only in the order of the sums.
    #[test]
    fn bf16_pairs_agree_with_the_widening_kernel() {
        let Some(cpu) = Avx512::detect() else {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        };
        if cpu.bf16_dot().is_none() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let (m, k, n) = (9, 1024 + 96, 70);
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
        let amx = cpu.amx();
        let cpu = Isa::Avx512(cpu);
        let on_tiles = PackedLinear::new(cpu, &w, Some(&b), PackedKind::Bf16).unwrap();
        let Panels::Bf16Pairs { amx: chosen, .. } = &on_tiles.panels else {
            panic!("bf16 layers take pair panels where the CPU has AVX-512 BF16")
        };
        assert_eq!(chosen.is_some(), amx.is_some(), "AMX where the CPU has it");
        // The same panels on `vdpbf16ps`, whatever the CPU.
        let mut on_vectors = PackedLinear::new(cpu, &w, Some(&b), PackedKind::Bf16).unwrap();
        if let Panels::Bf16Pairs { amx, .. } = &mut on_vectors.panels {
            *amx = None;
        }
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let widening = PackedLinear {
            panels: Panels::Bf16(pack_float(&wv, n, k, bf16::from_f32)),
            ..PackedLinear::new(cpu, &w, Some(&b), PackedKind::Bf16).unwrap()
        };
        let x = x.to_dtype(DType::BF16).unwrap();
        let xs: Vec<bf16> = x.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        let xf: Vec<f32> = xs.iter().map(|v| v.to_f32()).collect();
        let want = widening.run_input(&Input::F32(&xf), m, Activation::Identity);
        let scale = max_abs(&want);
        for (name, pairs) in [("tiles", &on_tiles), ("vectors", &on_vectors)] {
            let got = pairs.run_input(&Input::Bf16(&xs), m, Activation::Identity);
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - r).abs() <= 1e-5 * scale,
                    "{name}: output {i}: {g} vs {r}"
                );
            }
        }
    }

    fn max_abs(v: &[f32]) -> f32 {
        v.iter().fold(0f32, |m, x| m.max(x.abs()))
    }

    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Vec<f32> {
        let y = x.matmul(&w.t().unwrap()).unwrap();
        let y = match b {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        };
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Every instruction set's quantizer gives q8_0's definition, computed here in plain
    /// Rust: scale `amax / 127`, quants `x / scale` rounded to nearest even, offsets
    /// `-128 * sum(quants)`; an all-zero block has scale 0 and quants 0.
    #[test]
    fn input_rows_quantize_to_q8_0_on_every_instruction_set() {
        let isas = Isa::available();
        if isas.is_empty() {
            eprintln!("skipped: neither AVX-512 VNNI nor AVX2 on this CPU");
            return;
        }
        let (rows, in_dim) = (3, 4 * QBLOCK);
        let mut x: Vec<f32> = (0..rows * in_dim)
            .map(|i| ((i * 7919 % 1001) as f32 - 500.0) / 37.0)
            .collect();
        x[QBLOCK..2 * QBLOCK].fill(0.0);
        // Exact ties (2.5 and -0.5 quantization steps) round to even.
        x[2 * QBLOCK] = 127.0;
        x[2 * QBLOCK + 1] = 2.5;
        x[2 * QBLOCK + 2] = -0.5;
        x[2 * QBLOCK + 3..3 * QBLOCK].fill(1.0);
        for cpu in isas {
            let q = QuantizedRows::new(cpu, &x, rows, in_dim);
            for (b, block) in x.chunks_exact(QBLOCK).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let want: Vec<i8> = block
                    .iter()
                    .map(|v| (v * inv).round_ties_even() as i8)
                    .collect();
                let got = &q.quants[b * QBLOCK..(b + 1) * QBLOCK];
                assert_eq!(got, want, "{cpu:?} block {b}");
                assert_eq!(q.scales[b], d, "{cpu:?} block {b} scale");
                let sum: i32 = want.iter().map(|&v| v as i32).sum();
                assert_eq!(q.offsets[b], -128 * sum, "{cpu:?} block {b} offset");
            }
            assert_eq!(&q.quants[2 * QBLOCK..2 * QBLOCK + 3], &[127, 2, 0]);
        }
    }

    /// The AVX-512 and AVX2 kernels compute the same bits for every kind they share (the
    /// float products in the same fused order, q8_0 with the same exact block sums); skipped
    /// where the CPU has one of them only.
    #[test]
    fn every_instruction_set_computes_the_same_bits() {
        let isas = Isa::available();
        if isas.len() < 2 {
            eprintln!(
                "skipped: this CPU has {} of AVX-512 VNNI and AVX2",
                isas.len()
            );
            return;
        }
        let dev = Device::Cpu;
        let (m, k, n) = (11, 1024 + 96, 70);
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
        for kind in [PackedKind::F32, PackedKind::F16, PackedKind::Q8_0] {
            let act = if kind == PackedKind::F16 {
                DType::F16
            } else {
                DType::F32
            };
            let x = x.to_dtype(act).unwrap();
            let runs: Vec<Vec<f32>> = isas
                .iter()
                .map(|&cpu| {
                    let lin = PackedLinear::new(cpu, &w, Some(&b), kind).unwrap();
                    values(&lin.forward(&x, Activation::Identity).unwrap())
                })
                .collect();
            assert_eq!(runs[0], runs[1], "{kind:?}");
        }
    }

    #[test]
    fn matches_candle_in_every_kind() {
        let isas = Isa::available();
        if isas.is_empty() {
            eprintln!("skipped: neither AVX-512 VNNI nor AVX2 on this CPU");
            return;
        }
        let dev = Device::Cpu;
        // Odd row counts, a ragged last column group, and inputs longer than one KC pass.
        for (m, k, n, bias) in [
            (1, 64, 48, true),
            (3, 96, 70, false),
            (7, 768, 2304, true),
            (13, 2048 + 64, 100, true),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
            let b = bias.then_some(&b);
            let want = reference(&x, &w, b);
            let scale = max_abs(&want);
            for (kind, act, tol) in [
                (PackedKind::F32, DType::F32, 1e-5),
                (PackedKind::F16, DType::F16, 1e-2),
                (PackedKind::Bf16, DType::BF16, 2e-2),
                (PackedKind::Q8_0, DType::F32, 3e-2),
            ] {
                for &cpu in &isas {
                    let lin = PackedLinear::new(cpu, &w, b, kind).unwrap();
                    let x = x.to_dtype(act).unwrap();
                    let got = values(&lin.forward(&x, Activation::Identity).unwrap());
                    assert_eq!(got.len(), m * n);
                    let err = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |e, (g, r)| e.max((g - r).abs()));
                    assert!(
                        err / scale < tol,
                        "{m}x{k}x{n} {kind:?} on {cpu:?}: relative error {}",
                        err / scale
                    );
                }
            }
        }
    }

    #[test]
    fn fused_gelu_matches_candle() {
        let isas = Isa::available();
        if isas.is_empty() {
            eprintln!("skipped: neither AVX-512 VNNI nor AVX2 on this CPU");
            return;
        }
        let dev = Device::Cpu;
        // Wide inputs reach the tails of gelu, where exp under- and overflows.
        let x = (Tensor::randn(0f32, 1.0, (5, 96), &dev).unwrap() * 4.0).unwrap();
        let w = Tensor::randn(0f32, 0.5, (40, 96), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 40, &dev).unwrap();
        for cpu in isas {
            let lin = PackedLinear::new(cpu, &w, Some(&b), PackedKind::F32).unwrap();
            let plain = lin.forward(&x, Activation::Identity).unwrap();
            let want = values(&plain.gelu().unwrap());
            let got = values(&lin.forward(&x, Activation::GeluNew).unwrap());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "gelu on {cpu:?}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn a_row_is_bitwise_the_same_in_any_batch() {
        let isas = Isa::available();
        if isas.is_empty() {
            eprintln!("skipped: neither AVX-512 VNNI nor AVX2 on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let (k, n) = (1024 + 128, 1000);
        let x = Tensor::randn(0f32, 1.0, (37, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
        for kind in [
            PackedKind::F32,
            PackedKind::F16,
            PackedKind::Bf16,
            PackedKind::Q8_0,
        ] {
            for &cpu in &isas {
                let lin = PackedLinear::new(cpu, &w, Some(&b), kind).unwrap();
                let run = |x: &Tensor| values(&lin.forward(x, Activation::Identity).unwrap());
                let all = run(&x);
                for row in [0, 5, 36] {
                    let alone = run(&x.narrow(0, row, 1).unwrap());
                    assert_eq!(
                        alone,
                        all[row * n..(row + 1) * n],
                        "{kind:?} {cpu:?} row {row}"
                    );
                }
                let pair = run(&x.narrow(0, 30, 7).unwrap());
                assert_eq!(pair, all[30 * n..37 * n], "{kind:?} {cpu:?} rows 30..37");
            }
        }
    }
}
