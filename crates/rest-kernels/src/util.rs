//! Shared plumbing for the dense kernels: GEMM wrapper with a size-based choice of
//! parallelism, and the dispatch macro that compiles hot element-wise loops for AVX-512 /
//! AVX2+FMA and runs the variant of the active level ([`crate::isa`]); `#[target_feature]`
//! does not propagate into closures, so bodies are `#[inline(always)]` generics instantiated
//! inside feature-enabled wrappers.

/// Products with fewer multiply-adds than this run single-threaded: spawning rayon work costs
/// more than it saves.
const PAR_THRESHOLD_FLOPS: usize = 1 << 18;

/// A dense row-major-or-strided matrix operand for [`gemm`]: base pointer plus row and column
/// strides, in elements.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: isize,
    pub cs: isize,
}

impl<'a> MatRef<'a> {
    /// Row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        MatRef {
            data,
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose of a row-major `cols x rows` matrix (`data` holds `[cols][rows]`), viewed
    /// as `rows x cols`.
    pub fn transposed(data: &'a [f32], rows: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: rows as isize,
        }
    }
    fn max_index(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        (rows - 1) * self.rs as usize + (cols - 1) * self.cs as usize
    }
}

/// `dst[m x n] (row-major) = (accumulate ? dst : 0) + a[m x k] * b[k x n]`.
///
/// Uses the `gemm` crate (run-time AVX-512/FMA selection) and rayon for large products.
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
) {
    assert!(dst.len() >= m * n, "gemm: dst too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(a.max_index(m, k) < a.data.len(), "gemm: lhs too short");
    assert!(b.max_index(k, n) < b.data.len(), "gemm: rhs too short");
    // SAFETY: the asserts above bound every index the product touches for the given strides;
    // `dst` is exclusively borrowed and does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm_ptr(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            n as isize,
            accumulate,
            (a.data.as_ptr(), a.rs, a.cs),
            (b.data.as_ptr(), b.rs, b.cs),
            true,
        )
    }
}

/// Raw strided GEMM: `dst[i*dst_rs + j] = (accumulate ? dst : 0) + sum_l a[i,l] b[l,j]` with
/// `a = (ptr, row stride, col stride)` and likewise `b`. Uses rayon inside the product only if
/// `allow_par` and the product is large.
///
/// # Safety
/// Every index reached through the given shapes and strides must be in bounds of its
/// allocation, and the `dst` region written must not be read or written concurrently by
/// anyone else (it may not alias `a` or `b`).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_ptr(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    allow_par: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        if !accumulate && k == 0 {
            for i in 0..m {
                for j in 0..n {
                    *dst.offset(i as isize * dst_rs + j as isize) = 0.0;
                }
            }
        }
        return;
    }
    let par = if allow_par && m * n * k >= PAR_THRESHOLD_FLOPS && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m, n, k, dst, 1, dst_rs, accumulate, a.0, a.2, a.1, b.0, b.2, b.1, 1.0, 1.0, false, false,
        false, par,
    );
}

/// A raw pointer that may cross threads; users guarantee disjoint access.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used to hand disjoint output regions to parallel tasks (see call sites).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Defines `pub(crate) fn $name(args) -> ret` that runs `$body` compiled for AVX-512F, or
/// AVX2+FMA, or the baseline target, as [`crate::isa::active`] says (read once per call).
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::isa::active() {
                    // SAFETY: the active level is available: the CPU supports the features
                    // `avx512` was compiled for.
                    $crate::isa::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above, for `avx2`.
                    $crate::isa::Isa::Avx2Fma => return unsafe { avx2($($arg),*) },
                    $crate::isa::Isa::Portable => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Number of independent accumulators in reductions: enough lanes for the compiler to keep one
/// AVX-512 register (or two AVX2 registers) busy without reassociating floating-point sums.
pub(crate) const LANES: usize = 16;

/// Sum of a slice with `LANES` independent partial sums (vectorises without fast-math).
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mut s: f32 = chunks.remainder().iter().sum();
    for a in acc {
        s += a;
    }
    s
}
