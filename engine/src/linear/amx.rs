//! The AMX bf16 kernel of the packed linear layers (`packed.rs`): the product over bf16 pair
//! panels on the tile unit, for layers whose input width is a multiple of 32.
//!
//! One `tdpbf16ps` multiplies up to 16 rows of 32 bf16 inputs (a 16 x 64-byte tile read
//! straight from the input rows) by 32 inputs of one column group's pair panel (16 x 64
//! bytes: the panels' `[k / 2][16 columns][2]` is the tile unit's own layout) and adds the
//! 16 x 16 products into f32 sums held in a tile register: 8,192 multiply-adds in one
//! instruction, where `vdpbf16ps` does 32. A tile of up to 16 rows and four column groups
//! keeps its four sum tiles in registers over the whole pass and stores them once at the end,
//! so the tile unit, not the vector units, sets the pace.
//!
//! The tile unit adds the 32 products of a step in an order of its own (not `vdpbf16ps`'s
//! pair after pair), so its sums differ from the AVX-512 kernel's in the last bits. A layer
//! runs every product on one of the two (`Panels::Bf16Pairs`), and the tile unit computes each
//! row of a tile from that row alone, so a row's result is still bitwise the same in any
//! batch.

use std::arch::asm;

use half::bf16;

use super::tile::{FloatTile, Start};
use crate::cpu::amx::{self, TileConfig};
use crate::cpu::{Amx, LANES};

/// Inputs per tile step: a tile row of 64 bytes of bf16.
pub(crate) const K_STEP: usize = 32;
/// Bytes per row of every tile here: 16 f32 sums, 32 bf16 inputs, or 16 columns' pairs.
const ROW_BYTES: usize = 64;

/// Tiles 0-3 hold the sums of up to four column groups, 4 the input rows, 5-7 the panels
/// (the fourth group's reuses tile 5).
const fn config(rows: usize) -> TileConfig {
    TileConfig::new()
        .with(0, rows, ROW_BYTES)
        .with(1, rows, ROW_BYTES)
        .with(2, rows, ROW_BYTES)
        .with(3, rows, ROW_BYTES)
        .with(4, rows, ROW_BYTES)
        .with(5, K_STEP / 2, ROW_BYTES)
        .with(6, K_STEP / 2, ROW_BYTES)
        .with(7, K_STEP / 2, ROW_BYTES)
}

/// `R` rows (at most 16) times `C * 16` columns (at most 64) of bf16 pair panels over `len`
/// inputs, a multiple of 32: the sums start from the bias, zero or `out`, take one
/// `tdpbf16ps` per column group and step of 32 inputs, and are stored to `out` at the end.
///
/// # Safety
/// `amx` proves the tile unit; `x` covers `R` rows of `len` inputs (`x_stride` apart), `w`
/// `C` pair panels (`w_stride` apart) of `len * 16`, `out` (and the bias, if any) `R` rows of
/// `C * 16` outputs. `len` is a multiple of 32 (the layer takes this kernel only where its
/// input width is, and the passes start on multiples of `KC`).
pub(crate) unsafe fn bf16_tile<const R: usize, const C: usize>(amx: Amx, t: FloatTile<bf16, bf16>) {
    const { assert!(R >= 1 && R <= 16 && C >= 1 && C <= 4) };
    debug_assert!(t.len.is_multiple_of(K_STEP));
    let cfg = const { config(R) };
    cfg.load(amx);
    let out_stride = t.out_stride * 4;
    for c in 0..C {
        // SAFETY: `R` rows of 16 outputs (or 16 biases, read once per row) of group `c < C`,
        // inside what the caller's promise covers; tile `c` has `R` rows of 64 bytes.
        unsafe {
            match (t.bias, c) {
                (Start::Zero, 0) => asm!("tilezero tmm0", options(nostack, nomem)),
                (Start::Zero, 1) => asm!("tilezero tmm1", options(nostack, nomem)),
                (Start::Zero, 2) => asm!("tilezero tmm2", options(nostack, nomem)),
                (Start::Zero, _) => asm!("tilezero tmm3", options(nostack, nomem)),
                (start, c) => {
                    let (p, stride) = match start {
                        // Stride 0: every row of the tile is the same 16 biases.
                        Start::Bias(b) => (b.add(c * LANES), 0),
                        _ => (t.out.add(c * LANES) as *const f32, out_stride),
                    };
                    match c {
                        0 => asm!("tileloadd tmm0, [{p} + {s} * 1]", p = in(reg) p,
                            s = in(reg) stride, options(nostack, readonly)),
                        1 => asm!("tileloadd tmm1, [{p} + {s} * 1]", p = in(reg) p,
                            s = in(reg) stride, options(nostack, readonly)),
                        2 => asm!("tileloadd tmm2, [{p} + {s} * 1]", p = in(reg) p,
                            s = in(reg) stride, options(nostack, readonly)),
                        _ => asm!("tileloadd tmm3, [{p} + {s} * 1]", p = in(reg) p,
                            s = in(reg) stride, options(nostack, readonly)),
                    }
                }
            }
        }
    }
    let x_stride = t.x_stride * 2;
    // Panel `c` at step `s`: `c * w_stride + s * 32 * 16` elements from `w`.
    let group = |c: usize, s: usize| {
        t.w.wrapping_add(c.min(C - 1) * t.w_stride + s * K_STEP * LANES)
    };
    for s in 0..t.len / K_STEP {
        let x = t.x.wrapping_add(s * K_STEP);
        let (w0, w1, w2, w3) = (group(0, s), group(1, s), group(2, s), group(3, s));
        // SAFETY: step `s < len / 32` reads 32 inputs of each of the `R` rows and 16 rows of
        // 64 bytes of each panel `c < C` (the caller's promise); `cfg`, loaded above on this
        // thread and not changed since, gives the tiles those shapes. Groups past `C` are
        // neither read nor written (their pointers are clamped and unused).
        unsafe {
            match C {
                1 => asm!(
                    "tileloadd tmm4, [{x} + {xs} * 1]",
                    "tileloadd tmm5, [{w0} + {rb} * 1]",
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    x = in(reg) x, xs = in(reg) x_stride, w0 = in(reg) w0, rb = in(reg) ROW_BYTES,
                    options(nostack, readonly),
                ),
                2 => asm!(
                    "tileloadd tmm4, [{x} + {xs} * 1]",
                    "tileloadd tmm5, [{w0} + {rb} * 1]",
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    "tileloadd tmm6, [{w1} + {rb} * 1]",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    x = in(reg) x, xs = in(reg) x_stride, w0 = in(reg) w0, w1 = in(reg) w1,
                    rb = in(reg) ROW_BYTES,
                    options(nostack, readonly),
                ),
                3 => asm!(
                    "tileloadd tmm4, [{x} + {xs} * 1]",
                    "tileloadd tmm5, [{w0} + {rb} * 1]",
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    "tileloadd tmm6, [{w1} + {rb} * 1]",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    "tileloadd tmm7, [{w2} + {rb} * 1]",
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    x = in(reg) x, xs = in(reg) x_stride, w0 = in(reg) w0, w1 = in(reg) w1,
                    w2 = in(reg) w2, rb = in(reg) ROW_BYTES,
                    options(nostack, readonly),
                ),
                _ => asm!(
                    "tileloadd tmm4, [{x} + {xs} * 1]",
                    "tileloadd tmm5, [{w0} + {rb} * 1]",
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    "tileloadd tmm6, [{w1} + {rb} * 1]",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    "tileloadd tmm7, [{w2} + {rb} * 1]",
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    "tileloadd tmm5, [{w3} + {rb} * 1]",
                    "tdpbf16ps tmm3, tmm4, tmm5",
                    x = in(reg) x, xs = in(reg) x_stride, w0 = in(reg) w0, w1 = in(reg) w1,
                    w2 = in(reg) w2, w3 = in(reg) w3, rb = in(reg) ROW_BYTES,
                    options(nostack, readonly),
                ),
            }
        }
    }
    for c in 0..C {
        // SAFETY: `R` rows of 16 outputs of group `c < C`, the caller's to write.
        unsafe {
            let p = t.out.add(c * LANES);
            match c {
                0 => asm!("tilestored [{p} + {s} * 1], tmm0", p = in(reg) p,
                    s = in(reg) out_stride, options(nostack)),
                1 => asm!("tilestored [{p} + {s} * 1], tmm1", p = in(reg) p,
                    s = in(reg) out_stride, options(nostack)),
                2 => asm!("tilestored [{p} + {s} * 1], tmm2", p = in(reg) p,
                    s = in(reg) out_stride, options(nostack)),
                _ => asm!("tilestored [{p} + {s} * 1], tmm3", p = in(reg) p,
                    s = in(reg) out_stride, options(nostack)),
            }
        }
    }
    amx::release(amx);
}
