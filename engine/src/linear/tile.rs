//! What a register tile of a packed product is handed, whatever the instruction set of the
//! kernel that computes it (`avx512.rs`, `avx2.rs`): pointers into the inputs, the weight
//! panels and the output, and where its accumulators start.

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
