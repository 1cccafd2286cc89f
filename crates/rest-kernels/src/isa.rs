//! The one instruction-set choice every CPU kernel follows (in this crate and in `rest`'s
//! `src/kernels` and `src/data`): detected once per process, lowered by the environment
//! variable `REST_ISA` (`avx512`, `avx2`, `portable`; `REST_SPARSE_ISA` is an alias kept for
//! old scripts), or set with [`set_active`] (tests, benchmarks).
//!
//! Kernels read [`active`] once per call (or once per plan, e.g. a `RowGather`) and pass the
//! choice down to their inner loops; no inner loop detects features itself. With
//! `portable` no AVX-512 or AVX2 code of this crate runs (the third-party `gemm` crate that
//! the dense GEMMs call picks its own instruction set).

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level of the hand-written kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F intrinsics (16-lane FMA, masked tails, permutes, gathers); implies AVX2, FMA
    /// and POPCNT, which every AVX-512 CPU has.
    Avx512,
    /// Auto-vectorised loops compiled for AVX2 + FMA.
    Avx2Fma,
    /// Portable Rust (whatever the compilation target allows).
    Portable,
}

impl Isa {
    /// Every level, best first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2Fma, Isa::Portable];

    /// Whether this CPU can run the instruction set.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("popcnt")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best instruction set this CPU supports.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Portable)
    }

    /// The levels this CPU supports, best first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// Short lower-case name (`avx512`, `avx2`, `portable`), as accepted by `REST_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// The level named `name` (as [`Self::name`] writes it, any case).
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name.trim()))
    }

    fn code(self) -> u8 {
        match self {
            Isa::Portable => 0,
            Isa::Avx2Fma => 1,
            Isa::Avx512 => 2,
        }
    }
}

/// [`Isa::code`] of the active level, or [`UNSET`] before the first [`active`].
static ACTIVE: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = u8::MAX;

/// The instruction set the kernels use: [`Isa::best`], or a lower one named by `REST_ISA`
/// (or its alias `REST_SPARSE_ISA`; unknown or unsupported values are ignored), or the one
/// last given to [`set_active`]. The environment is read once per process.
#[inline]
pub fn active() -> Isa {
    match ACTIVE.load(Ordering::Relaxed) {
        0 => Isa::Portable,
        1 => Isa::Avx2Fma,
        2 => Isa::Avx512,
        _ => init(),
    }
}

#[cold]
fn init() -> Isa {
    let best = Isa::best();
    let forced = ["REST_ISA", "REST_SPARSE_ISA"]
        .iter()
        .find_map(|var| std::env::var(var).ok())
        .and_then(|v| Isa::from_name(&v));
    let isa = match forced {
        Some(f) if f.code() <= best.code() && f.is_available() => f,
        _ => best,
    };
    // A concurrent `set_active` wins over the environment.
    match ACTIVE.compare_exchange(UNSET, isa.code(), Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => isa,
        Err(_) => active(),
    }
}

/// Makes every kernel of the process run with `isa` from now on (for tests and benchmarks
/// comparing levels; a kernel call already running keeps its choice). Returns the previous
/// level. Panics if this CPU cannot run `isa`.
pub fn set_active(isa: Isa) -> Isa {
    assert!(isa.is_available(), "this CPU cannot run {}", isa.name());
    let prev = active();
    ACTIVE.store(isa.code(), Ordering::Relaxed);
    prev
}
