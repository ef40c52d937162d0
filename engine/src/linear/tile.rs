//! What a register tile of a packed product is handed, whatever the instruction set of the
//! kernel that computes it (`avx512.rs`, `avx2.rs`): pointers into the inputs, the weight
//! panels and the output, and where its accumulators start.

use half::f16;

/// q8_0 block length (ggml's): the unit of quantization of weights and inputs.
pub(crate) const QBLOCK: usize = 32;

/// Where a tile's accumulators start.
#[derive(Clone, Copy)]
pub(crate) enum Start {
    Zero,
    /// 16 * C biases for the tile's columns.
    Bias(*const f32),
    /// The partial sums already in the output.
    Out,
}

/// Pointers for one tile of a float product: `X` inputs (f32 for `float_tile`, bf16 for
/// `bf16_pair_tile`) against `W` weight panels.
#[derive(Clone, Copy)]
pub(crate) struct FloatTile<X, W> {
    pub x: *const X,
    pub x_stride: usize,
    pub w: *const W,
    /// Elements between the panels of consecutive column groups.
    pub w_stride: usize,
    pub len: usize,
    pub out: *mut f32,
    pub out_stride: usize,
    pub bias: Start,
}

impl<X, W> FloatTile<X, W> {
    /// The same tile moved down `r` rows (inputs and outputs; weights and bias stay). Pointer
    /// arithmetic only: the result is as valid as the caller's knowledge that the view covers
    /// rows `r..`.
    pub(crate) fn down_rows(self, r: usize) -> Self {
        Self {
            x: self.x.wrapping_add(r * self.x_stride),
            out: self.out.wrapping_add(r * self.out_stride),
            ..self
        }
    }
}

/// Pointers for one tile of a q8_0 product: quantized input rows (`QuantizedRows` in
/// `packed.rs`) against q8_0 panels.
#[derive(Clone, Copy)]
pub(crate) struct Q8Tile {
    pub xq: *const i8,
    pub x_scales: *const f32,
    /// Per (row, block): `-128 * sum(quants)`, where the AVX-512 kernel's integer sum over
    /// the unsigned (+128) weights starts. The AVX2 kernel, which reads the weights as signed
    /// bytes, does not need it.
    pub x_offsets: *const i32,
    /// Between rows, in quants and in blocks.
    pub x_stride: usize,
    pub x_block_stride: usize,
    pub wq: *const u8,
    pub w_scales: *const f16,
    /// Blocks in one column group's panel.
    pub w_group_blocks: usize,
    pub blocks: usize,
    pub out: *mut f32,
    pub out_stride: usize,
    pub bias: Start,
}

impl Q8Tile {
    /// The same tile moved down `r` rows (quants, scales, offsets and outputs), as
    /// [`FloatTile::down_rows`].
    pub(crate) fn down_rows(self, r: usize) -> Self {
        Self {
            xq: self.xq.wrapping_add(r * self.x_stride),
            x_scales: self.x_scales.wrapping_add(r * self.x_block_stride),
            x_offsets: self.x_offsets.wrapping_add(r * self.x_block_stride),
            out: self.out.wrapping_add(r * self.out_stride),
            ..self
        }
    }
}

/// Panics unless the buffers for quantizing `x` to q8_0 match it: `x` whole blocks, a quant
/// per value, and a scale and an offset per block. The kernels' safe wrappers check this
/// before they index by block.
pub(crate) fn check_q8_buffers(x: &[f32], quants: &[i8], scales: &[f32], offsets: &[i32]) {
    let blocks = x.len() / QBLOCK;
    assert!(
        x.len().is_multiple_of(QBLOCK)
            && quants.len() == x.len()
            && scales.len() == blocks
            && offsets.len() == blocks,
        "q8_0 quantization buffers do not match the input"
    );
}
