//! Intel AMX (Advanced Matrix Extensions): the proof that this CPU and this process may use
//! the tile registers ([`Amx`]), and the tile configuration a kernel loads before it does.
//!
//! AMX adds eight tile registers of up to 16 rows of 64 bytes and instructions that multiply
//! two of them into a third: `tdpbf16ps` takes a 16 x 32 tile of bf16 inputs and a tile of
//! bf16 weights laid out in pairs (the layout of gptj's bf16 pair panels,
//! `[k / 2][16 columns][2]`) and adds 16 x 16 dot products of 32 into f32 sums, 256 times
//! what one `vdpbf16ps` does. Rust has no stable AMX intrinsics, so the kernel
//! (`linear/amx.rs`) issues the instructions as inline assembly; the tile registers are never
//! allocated by the compiler, so nothing else touches them between a kernel's `asm!` blocks.
//!
//! Linux keeps the tiles' 8 KiB of state off by default: a process asks for it once with
//! `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` (the permission covers all its
//! threads), and a tile instruction before that is `SIGILL`. [`Avx512::amx`] asks, and hands
//! out the token only if the kernel said yes.

use super::Avx512;

/// Proof that the CPU has AMX-TILE and AMX-BF16 and that the kernel lets this process use
/// the tile registers, on top of [`Avx512`]'s features. Only [`Avx512::amx`] makes one;
/// `GPTJ_CPU_AMX=0` withholds it (for A/B runs against the AVX-512 `vdpbf16ps` kernel).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Amx {
    _detected: (),
}

impl Avx512 {
    /// The AMX token where the CPU has AMX-TILE and AMX-BF16 and the kernel grants the tile
    /// state (asked once per process), else `None`.
    pub(crate) fn amx(self) -> Option<Amx> {
        static GRANTED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
            if cfg!(miri) || std::env::var("GPTJ_CPU_AMX").is_ok_and(|v| v == "0") {
                return false;
            }
            // CPUID leaf 7, sub-leaf 0: EDX bit 24 is AMX-TILE, bit 22 AMX-BF16.
            // SAFETY: `cpuid` exists on every x86_64 CPU, and leaf 7 is answered (with zeros
            // where unsupported) by every CPU that has AVX-512, which `Avx512` proves. (Safe
            // to call on newer toolchains, hence the `allow`.)
            #[allow(unused_unsafe)]
            let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
            let (tile, bf16) = (leaf.edx >> 24 & 1 == 1, leaf.edx >> 22 & 1 == 1);
            tile && bf16 && tile_state_granted()
        });
        GRANTED.then_some(Amx { _detected: () })
    }
}

/// Asks Linux for the tile state: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`.
#[cfg(target_os = "linux")]
fn tile_state_granted() -> bool {
    /// `arch_prctl` code to request permission for an extended state component.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    /// The extended state component of the tile data (XSAVE feature 18).
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it changes only whether this
    // process may use the tile state, and fails (non-zero) where the kernel has no AMX.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// Elsewhere gptj does not ask, and does not use the tile unit.
#[cfg(not(target_os = "linux"))]
fn tile_state_granted() -> bool {
    false
}

/// The 64-byte operand of `ldtilecfg`: palette 1, then the bytes per row and the rows of each
/// tile register (unused registers stay zero, that is, off).
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    _reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// A configuration with every tile off.
    pub(crate) const fn new() -> Self {
        Self {
            palette: 1,
            start_row: 0,
            _reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        }
    }

    /// Tile register `tmm` as `rows` rows of `bytes` bytes. Panics past the palette's limits
    /// (8 registers, 16 rows, 64 bytes), which `ldtilecfg` would fault on.
    pub(crate) const fn with(mut self, tmm: usize, rows: usize, bytes: usize) -> Self {
        assert!(tmm < 8 && rows >= 1 && rows <= 16 && bytes >= 1 && bytes <= 64);
        self.rows[tmm] = rows as u8;
        self.colsb[tmm] = bytes as u16;
        self
    }

    /// Loads this configuration into the calling thread's tile unit, zeroing every tile.
    pub(crate) fn load(&self, _amx: Amx) {
        // SAFETY: `_amx` proves the CPU has AMX-TILE and the process may use it; the operand
        // is 64 readable bytes, and `with` kept every field inside palette 1's limits, so
        // `ldtilecfg` does not fault. It writes only tile state, which no compiled code uses.
        unsafe {
            std::arch::asm!("ldtilecfg [{cfg}]", cfg = in(reg) self, options(nostack, readonly));
        }
    }
}

/// Returns the calling thread's tiles to their initial state (so a context switch saves
/// nothing for them). Kernels call it when they are done.
pub(crate) fn release(_amx: Amx) {
    // SAFETY: `_amx` proves AMX-TILE; `tilerelease` only resets tile state.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}
