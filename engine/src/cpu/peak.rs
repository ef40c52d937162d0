//! The machine's dot-product peaks, measured: how many multiply-accumulates per second all
//! cores together retire with the instruction each kernel is built on. The decode benchmark
//! divides a step's multiply-accumulates by these to say how close the kernels come.
//!
//! Each thread runs 16 instructions per loop iteration, in independent accumulator chains
//! (16 on AVX-512's 32 registers; 8 or 4 on AVX2's 16, enough to cover the latency of every
//! x86 core's vector units), all threads at once, on register operands only: no memory
//! traffic, so the result is the instruction's throughput and nothing else.
//!
//! | instruction | multiply-accumulates per instruction |
//! | --- | ---: |
//! | `vpdpbusd` (AVX-512 VNNI, u8 x i8 -> i32) | 64 |
//! | `vdpbf16ps` (AVX-512 BF16, bf16 pairs -> f32) | 32 |
//! | `vfmadd231ps` (f32) | 16 |
//! | `vfmadd231ps` on 256-bit registers (f32, AVX2 CPUs) | 8 |
//! | `vpsignb`, `vpmaddubsw`, `vpmaddwd`, `vpaddd` on 256-bit registers (the AVX2 q8_0 kernel's sequence) | 32 |
//! | `tdpbf16ps` (AMX-BF16, 16 x 32 bf16 by 32 x 16 -> 16 x 16 f32 tiles) | 8,192 |
//!
//! The tile unit's loop is the same 16 instructions on four sum tiles (its latency is covered
//! by four), with 1/16 of the iterations: each instruction takes about 16 cycles.

use std::arch::x86_64::*;
use std::time::Instant;

use super::avx512::as_bf16x32;

/// One of the instructions measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotKind {
    /// `vpdpbusd`: the q8_0 kernel's.
    Int8,
    /// `vdpbf16ps`: the bf16 kernel's.
    Bf16,
    /// `vfmadd231ps`: the f32 and f16 kernels'.
    F32,
    /// `vfmadd231ps` on 256-bit registers: the AVX2 float kernel's (f32, f16 and bf16
    /// weights), on CPUs without AVX-512.
    F32Avx2,
    /// The AVX2 q8_0 kernel's four-instruction sequence for 32 byte products (sign moved onto
    /// the inputs, `vpmaddubsw`, `vpmaddwd` by ones, `vpaddd`), on CPUs without VNNI; counted
    /// as one "instruction" here.
    Int8Avx2,
    /// `tdpbf16ps` on the AMX tile unit: the bf16 kernel's where the CPU has AMX-BF16.
    Bf16Amx,
}

impl DotKind {
    /// Multiply-accumulates one instruction does.
    pub fn macs_per_instruction(self) -> u64 {
        match self {
            Self::Int8 => 64,
            Self::Bf16 => 32,
            Self::F32 => 16,
            Self::F32Avx2 => 8,
            Self::Int8Avx2 => 32,
            Self::Bf16Amx => 16 * 16 * 32,
        }
    }

    /// Whether this CPU has the instruction.
    pub fn available(self) -> bool {
        let avx512 = || is_x86_feature_detected!("avx512f");
        match self {
            Self::Int8 => avx512() && is_x86_feature_detected!("avx512vnni"),
            Self::Bf16 => avx512() && is_x86_feature_detected!("avx512bf16"),
            Self::F32 => avx512() && is_x86_feature_detected!("fma"),
            Self::F32Avx2 => is_x86_feature_detected!("avx") && is_x86_feature_detected!("fma"),
            Self::Int8Avx2 => is_x86_feature_detected!("avx2"),
            Self::Bf16Amx => amx().is_some(),
        }
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8 (vpdpbusd)",
            Self::Bf16 => "bf16 (vdpbf16ps)",
            Self::F32 => "f32 (vfmadd231ps)",
            Self::F32Avx2 => "f32 (vfmadd231ps, 256-bit)",
            Self::Int8Avx2 => "int8 (vpmaddubsw + vpmaddwd, 256-bit)",
            Self::Bf16Amx => "bf16 (AMX tdpbf16ps)",
        }
    }

    /// Loop iterations per thread per measurement: `ITERS`, or 1/16 of it for the tile unit
    /// (whose instruction takes ~16 cycles), so that each takes about as long.
    fn iterations(self) -> u64 {
        match self {
            Self::Bf16Amx => ITERS / 16,
            _ => ITERS,
        }
    }
}

/// The AMX token, where this CPU and process have the tile unit.
fn amx() -> Option<super::Amx> {
    super::Avx512::detect().and_then(super::Avx512::amx)
}

/// Chains per thread, and instructions per chain per loop iteration.
const CHAINS: usize = 16;
/// Loop iterations per thread per measurement: ~0.1 s on a 3 GHz core at one instruction
/// per cycle.
const ITERS: u64 = 1 << 21;

/// Multiply-accumulates per second with `threads` threads running `kind` at once: the median
/// of 5 measurements. `None` where the CPU lacks the instruction.
pub fn dot_peak(kind: DotKind, threads: usize) -> Option<f64> {
    if !kind.available() {
        return None;
    }
    let threads = threads.max(1);
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    let iters = kind.iterations();
                    // SAFETY: `kind.available()` checked the instruction's features above.
                    s.spawn(move || std::hint::black_box(unsafe { run(kind, iters) }));
                }
            });
            let macs =
                threads as u64 * kind.iterations() * CHAINS as u64 * kind.macs_per_instruction();
            macs as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    Some(rates[2])
}

/// # Safety
/// The CPU has the features of `kind` (see [`DotKind::available`]).
unsafe fn run(kind: DotKind, iters: u64) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe {
        match kind {
            DotKind::Int8 => int8_chains(iters),
            DotKind::Bf16 => bf16_chains(iters),
            DotKind::F32 => f32_chains(iters),
            DotKind::F32Avx2 => f32x8_chains(iters),
            DotKind::Int8Avx2 => int8x32_sequences(iters),
            DotKind::Bf16Amx => match amx() {
                Some(amx) => bf16_tile_chains(amx, iters),
                None => unreachable!("the caller checked `available`"),
            },
        }
    }
}

/// Operands the compiler cannot see through, so the loop is not folded away.
fn operand(seed: i32) -> i32 {
    std::hint::black_box(seed)
}

/// `CHAINS` accumulators starting at `$zero`, each stepped `iters` times by `$step` (with
/// the accumulator as `$acc`), then added together with `$add` and reduced with `$reduce`.
macro_rules! chains {
    ($iters:expr, $zero:expr, |$acc:ident| $step:expr, $add:path, $reduce:expr) => {{
        let mut acc = [$zero; CHAINS];
        for _ in 0..$iters {
            for a in acc.iter_mut() {
                let $acc = *a;
                *a = $step;
            }
        }
        $reduce(acc.iter().fold($zero, |s, c| $add(s, *c)))
    }};
}

#[target_feature(enable = "avx512f,avx512vnni")]
fn int8_chains(iters: u64) -> f32 {
    let a = _mm512_set1_epi32(operand(0x0101_0101));
    let b = _mm512_set1_epi32(operand(0x0102_0304));
    chains!(
        iters,
        _mm512_setzero_si512(),
        |c| _mm512_dpbusd_epi32(c, a, b),
        _mm512_add_epi32,
        |s| _mm512_reduce_add_epi32(s) as f32
    )
}

#[target_feature(enable = "avx512f,avx512bf16")]
fn bf16_chains(iters: u64) -> f32 {
    // 1.0 and 2^-20 in bf16 pairs: the sums stay finite over any number of iterations.
    let a = as_bf16x32(_mm512_set1_epi32(operand(0x3F80_3F80)));
    let b = as_bf16x32(_mm512_set1_epi32(operand(0x3580_3580)));
    chains!(
        iters,
        _mm512_setzero_ps(),
        |c| _mm512_dpbf16_ps(c, a, b),
        _mm512_add_ps,
        |s| _mm512_reduce_add_ps(s)
    )
}

#[target_feature(enable = "avx512f,fma")]
fn f32_chains(iters: u64) -> f32 {
    let a = _mm512_set1_ps(f32::from_bits(operand(0x3F80_0000) as u32));
    let b = _mm512_set1_ps(f32::from_bits(operand(0x3580_0000) as u32));
    chains!(
        iters,
        _mm512_setzero_ps(),
        |c| _mm512_fmadd_ps(a, b, c),
        _mm512_add_ps,
        |s| _mm512_reduce_add_ps(s)
    )
}

/// `CHAINS` FMAs per iteration as 8 accumulators stepped twice: AVX2 has 16 registers, so
/// 16 accumulators and the two operands would not fit, and the spilled chains would measure
/// store-to-load forwarding instead (less than half the peak, as this probe measured before).
/// 8 chains cover the FMA latency (4 cycles) on two units.
#[target_feature(enable = "avx,fma")]
fn f32x8_chains(iters: u64) -> f32 {
    let a = _mm256_set1_ps(f32::from_bits(operand(0x3F80_0000) as u32));
    let b = _mm256_set1_ps(f32::from_bits(operand(0x3580_0000) as u32));
    let mut acc = [_mm256_setzero_ps(); CHAINS / 2];
    for _ in 0..iters {
        for _ in 0..2 {
            for c in acc.iter_mut() {
                *c = _mm256_fmadd_ps(a, b, *c);
            }
        }
    }
    let s = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, c| _mm256_add_ps(s, *c));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 f32; the function has AVX.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
    lanes.iter().sum::<f32>()
}

/// `CHAINS` of the AVX2 q8_0 sequence per iteration, into 4 accumulators (the only
/// loop-carried dependency is the 1-cycle `vpaddd`). Written as inline assembly: with
/// intrinsics the compiler would compute the loop-invariant products once and keep only the
/// adds.
#[target_feature(enable = "avx2")]
fn int8x32_sequences(iters: u64) -> f32 {
    // Inputs 1, weights -1, -2, -3, -4 per 4 bytes: the weights' magnitudes 1..4 times the
    // inputs with the weights' signs, -10 per 32-bit lane per sequence.
    let x = _mm256_set1_epi32(operand(0x0101_0101));
    let w = _mm256_set1_epi32(operand(0xFCFD_FEFFu32 as i32));
    let magnitude = _mm256_abs_epi8(w);
    let ones = _mm256_set1_epi16(1);
    let mut c = [_mm256_setzero_si256(); 4];
    for _ in 0..iters {
        for _ in 0..CHAINS / 4 {
            // SAFETY: register-only instructions of AVX2, which this function has; no memory,
            // stack or flags touched.
            unsafe {
                std::arch::asm!(
                    "vpsignb {t0}, {x}, {w}", "vpmaddubsw {t0}, {m}, {t0}",
                    "vpmaddwd {t0}, {t0}, {o}", "vpaddd {c0}, {c0}, {t0}",
                    "vpsignb {t1}, {x}, {w}", "vpmaddubsw {t1}, {m}, {t1}",
                    "vpmaddwd {t1}, {t1}, {o}", "vpaddd {c1}, {c1}, {t1}",
                    "vpsignb {t2}, {x}, {w}", "vpmaddubsw {t2}, {m}, {t2}",
                    "vpmaddwd {t2}, {t2}, {o}", "vpaddd {c2}, {c2}, {t2}",
                    "vpsignb {t3}, {x}, {w}", "vpmaddubsw {t3}, {m}, {t3}",
                    "vpmaddwd {t3}, {t3}, {o}", "vpaddd {c3}, {c3}, {t3}",
                    x = in(ymm_reg) x, w = in(ymm_reg) w, m = in(ymm_reg) magnitude,
                    o = in(ymm_reg) ones,
                    c0 = inout(ymm_reg) c[0], c1 = inout(ymm_reg) c[1],
                    c2 = inout(ymm_reg) c[2], c3 = inout(ymm_reg) c[3],
                    t0 = out(ymm_reg) _, t1 = out(ymm_reg) _,
                    t2 = out(ymm_reg) _, t3 = out(ymm_reg) _,
                    options(pure, nomem, nostack, preserves_flags),
                );
            }
        }
    }
    let s = c
        .iter()
        .fold(_mm256_setzero_si256(), |s, v| _mm256_add_epi32(s, *v));
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` holds 8 i32; the function has AVX2.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s) };
    lanes.iter().sum::<i32>() as f32
}

/// `CHAINS` `tdpbf16ps` per iteration into four sum tiles, on tiles of bf16 1.0 (inputs)
/// and 2^-20 (weights): each instruction adds 32 products of 2^-20 to each of 256 sums.
fn bf16_tile_chains(amx: super::Amx, iters: u64) -> f32 {
    let cfg = (0..6).fold(super::amx::TileConfig::new(), |c, t| c.with(t, 16, 64));
    cfg.load(amx);
    let ones = [half::bf16::ONE; 16 * 32];
    let small = [half::bf16::from_f32(2f32.powi(-20)); 16 * 32];
    let mut sums = [0f32; 4 * 256];
    // SAFETY: `amx` proves the tile unit; `cfg`, loaded above on this thread, makes tiles 0-5
    // 16 rows of 64 bytes, and every load and store below reads or writes 16 rows of 64
    // bytes (stride 64) inside `ones`, `small` and `sums`.
    unsafe {
        std::arch::asm!(
            "tileloadd tmm4, [{a} + {s} * 1]",
            "tileloadd tmm5, [{b} + {s} * 1]",
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            a = in(reg) ones.as_ptr(), b = in(reg) small.as_ptr(), s = in(reg) 64usize,
            options(nostack, readonly),
        );
        for _ in 0..iters {
            for _ in 0..CHAINS / 4 {
                std::arch::asm!(
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    "tdpbf16ps tmm1, tmm4, tmm5",
                    "tdpbf16ps tmm2, tmm4, tmm5",
                    "tdpbf16ps tmm3, tmm4, tmm5",
                    options(nostack, nomem),
                );
            }
        }
        std::arch::asm!(
            "tilestored [{c} + {s} * 1], tmm0",
            "tilestored [{c} + {s} * 1 + 1024], tmm1",
            "tilestored [{c} + {s} * 1 + 2048], tmm2",
            "tilestored [{c} + {s} * 1 + 3072], tmm3",
            c = in(reg) sums.as_mut_ptr(), s = in(reg) 64usize,
            options(nostack),
        );
    }
    super::amx::release(amx);
    sums.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each loop does the work its count claims: 16 chains of 16 lanes (8 for 256-bit
    /// registers), each instruction adding `macs_per_instruction / lanes` products per lane
    /// (int8: 1 x (4 + 3 + 2 + 1); AVX2 int8: 1 x -(1 + 2 + 3 + 4); bf16: two products of
    /// 1 x 2^-20; f32: one; AMX: 16 instructions into 256 sums of 32 products of 2^-20).
    #[test]
    fn the_loops_do_the_multiply_accumulates_they_count() {
        let lanes_and_chains = (CHAINS * 16) as f32;
        let cases = [
            (DotKind::Int8, lanes_and_chains * 10.0),
            (DotKind::Bf16, lanes_and_chains * 2.0 * 2f32.powi(-20)),
            (DotKind::F32, lanes_and_chains * 2f32.powi(-20)),
            (DotKind::F32Avx2, lanes_and_chains / 2.0 * 2f32.powi(-20)),
            (DotKind::Int8Avx2, lanes_and_chains / 2.0 * -10.0),
            (
                DotKind::Bf16Amx,
                (CHAINS * 256 * 32) as f32 * 2f32.powi(-20),
            ),
        ];
        for (kind, per_iteration) in cases {
            if !kind.available() {
                eprintln!("skipped {}: not on this CPU", kind.name());
                continue;
            }
            // SAFETY: `available()` checked the features.
            let got = unsafe { run(kind, 100) };
            assert_eq!(got, per_iteration * 100.0, "{}", kind.name());
        }
    }
}
