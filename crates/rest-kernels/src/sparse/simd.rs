//! The inner loops of the sparse kernels, one per instruction set ([`crate::isa`] picks it).
//!
//! Each kernel works on a *block* (a row range x a column range) and is compiled three times:
//! with AVX-512 intrinsics, as plain Rust under `#[target_feature(enable = "avx2,fma")]`, and
//! as plain portable Rust. Target features do not propagate into closures, so the whole block
//! loop lives inside the feature-enabled function and the rayon closures only call it.

use std::ops::Range;

use super::matrix::Csr;
use crate::isa::Isa;

/// `out[r·os + c] = Σ_j W[r, k_j] · x[k_j·xs + c]` for `r ∈ rows`, `c < width`.
///
/// `x` and `out` point at the first column of the block; `xs` / `os` are their row strides.
///
/// # Safety
/// `isa` must be available; for every `k < csr.cols`, `x[k·xs .. k·xs + width]` must be
/// readable, and for every `r ∈ rows`, `out[r·os .. r·os + width]` writable and not accessed by
/// any other thread; `col_idx < csr.cols`, `rows.end <= csr.rows`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn spmm_block(
    isa: Isa,
    csr: &Csr<'_>,
    x: *const f32,
    xs: usize,
    rows: Range<usize>,
    width: usize,
    out: *mut f32,
    os: usize,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::spmm_block(csr, x, xs, rows, width, out, os),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => spmm_block_avx2(csr, x, xs, rows, width, out, os),
        _ => spmm_block_portable::<false>(csr, x, xs, rows, width, out, os),
    }
}

/// `out[j - row_ptr[rows.start]] += Σ_{c < width} dy[r·ds + c] · x[k_j·xs + c]` for every
/// entry `j` of the rows in `rows`, in column tiles of `tile`.
///
/// # Safety
/// `isa` must be available; `dy[r·ds .. r·ds + width]` readable for `r ∈ rows`,
/// `x[k·xs .. k·xs + width]` readable for `k < csr.cols`; `col_idx < csr.cols`;
/// `rows.end <= csr.rows`; `out.len() == row_ptr[rows.end] - row_ptr[rows.start]`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sddmm_block(
    isa: Isa,
    csr: &Csr<'_>,
    dy: *const f32,
    ds: usize,
    x: *const f32,
    xs: usize,
    rows: Range<usize>,
    width: usize,
    tile: usize,
    out: &mut [f32],
) {
    let tile = tile.max(1);
    let mut c0 = 0;
    while c0 < width {
        let w = (width - c0).min(tile);
        let (dyc, xc) = (dy.add(c0), x.add(c0));
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::sddmm_block(csr, dyc, ds, xc, xs, rows.clone(), w, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => sddmm_block_avx2(csr, dyc, ds, xc, xs, rows.clone(), w, out),
            _ => sddmm_block_portable::<false>(csr, dyc, ds, xc, xs, rows.clone(), w, out),
        }
        c0 += w;
    }
}

// ---------------------------------------------------------------------------------------------
// Portable loops (also compiled for AVX2 + FMA).

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Column-tile width of the portable spmm (8 AVX2 registers of accumulators).
const PORTABLE_TILE: usize = 64;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn spmm_block_avx2(
    csr: &Csr<'_>,
    x: *const f32,
    xs: usize,
    rows: Range<usize>,
    width: usize,
    out: *mut f32,
    os: usize,
) {
    spmm_block_portable::<true>(csr, x, xs, rows, width, out, os)
}

#[inline(always)]
unsafe fn spmm_block_portable<const FMA: bool>(
    csr: &Csr<'_>,
    x: *const f32,
    xs: usize,
    rows: Range<usize>,
    width: usize,
    out: *mut f32,
    os: usize,
) {
    for r in rows {
        let (s, e) = (csr.row_ptr[r], csr.row_ptr[r + 1]);
        let idx = &csr.col_idx[s..e];
        let vals = &csr.values[s..e];
        let mut c0 = 0;
        while c0 < width {
            let w = (width - c0).min(PORTABLE_TILE);
            // SAFETY (slices below): in bounds and unshared per the caller's contract.
            let o = std::slice::from_raw_parts_mut(out.add(r * os + c0), w);
            if w == PORTABLE_TILE {
                let mut acc = [0f32; PORTABLE_TILE];
                for (&k, &v) in idx.iter().zip(vals) {
                    let xr = std::slice::from_raw_parts(x.add(k as usize * xs + c0), PORTABLE_TILE);
                    for (a, &xv) in acc.iter_mut().zip(xr) {
                        *a = madd::<FMA>(v, xv, *a);
                    }
                }
                o.copy_from_slice(&acc);
            } else {
                o.fill(0.0);
                for (&k, &v) in idx.iter().zip(vals) {
                    let xr = std::slice::from_raw_parts(x.add(k as usize * xs + c0), w);
                    for (a, &xv) in o.iter_mut().zip(xr) {
                        *a = madd::<FMA>(v, xv, *a);
                    }
                }
            }
            c0 += w;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn sddmm_block_avx2(
    csr: &Csr<'_>,
    dy: *const f32,
    ds: usize,
    x: *const f32,
    xs: usize,
    rows: Range<usize>,
    w: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let base = csr.row_ptr[rows.start];
    let full = w / 8;
    for r in rows {
        let dyr = dy.add(r * ds);
        let e = csr.row_ptr[r + 1];
        let mut j = csr.row_ptr[r];
        while j + 4 <= e {
            let xr: [*const f32; 4] =
                std::array::from_fn(|g| x.add(csr.col_idx[j + g] as usize * xs));
            let mut acc = [_mm256_setzero_ps(); 4];
            for v in 0..full {
                let d = _mm256_loadu_ps(dyr.add(8 * v));
                for (a, &xg) in acc.iter_mut().zip(&xr) {
                    *a = _mm256_fmadd_ps(d, _mm256_loadu_ps(xg.add(8 * v)), *a);
                }
            }
            for (g, (a, &xg)) in acc.iter().zip(&xr).enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let mut s: f32 = lanes.iter().sum();
                for c in 8 * full..w {
                    s = (*dyr.add(c)).mul_add(*xg.add(c), s);
                }
                out[j + g - base] += s;
            }
            j += 4;
        }
        while j < e {
            let xg = x.add(csr.col_idx[j] as usize * xs);
            let mut a = _mm256_setzero_ps();
            for v in 0..full {
                a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(dyr.add(8 * v)),
                    _mm256_loadu_ps(xg.add(8 * v)),
                    a,
                );
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), a);
            let mut s: f32 = lanes.iter().sum();
            for c in 8 * full..w {
                s = (*dyr.add(c)).mul_add(*xg.add(c), s);
            }
            out[j - base] += s;
            j += 1;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sddmm_block_portable<const FMA: bool>(
    csr: &Csr<'_>,
    dy: *const f32,
    ds: usize,
    x: *const f32,
    xs: usize,
    rows: Range<usize>,
    w: usize,
    out: &mut [f32],
) {
    let base = csr.row_ptr[rows.start];
    for r in rows {
        // SAFETY (slices below): readable per the caller's contract.
        let dyr = std::slice::from_raw_parts(dy.add(r * ds), w);
        let e = csr.row_ptr[r + 1];
        let mut j = csr.row_ptr[r];
        while j + 4 <= e {
            let xr: [&[f32]; 4] = std::array::from_fn(|g| {
                std::slice::from_raw_parts(x.add(csr.col_idx[j + g] as usize * xs), w)
            });
            dot_group::<4, FMA>(dyr, xr, &mut out[j - base..j - base + 4]);
            j += 4;
        }
        while j < e {
            let xr = [std::slice::from_raw_parts(
                x.add(csr.col_idx[j] as usize * xs),
                w,
            )];
            dot_group::<1, FMA>(dyr, xr, &mut out[j - base..j - base + 1]);
            j += 1;
        }
    }
}

/// `out[g] += dot(dyr, xr[g])` for `g < G`, sharing the `dy` loads; 16 lanes per dot.
#[inline(always)]
fn dot_group<const G: usize, const FMA: bool>(dyr: &[f32], xr: [&[f32]; G], out: &mut [f32]) {
    const L: usize = 16;
    let mut acc = [[0f32; L]; G];
    let dch = dyr.chunks_exact(L);
    let full = dyr.len() - dch.remainder().len();
    for (ci, d) in dch.enumerate() {
        for (ag, xg) in acc.iter_mut().zip(&xr) {
            let xc = &xg[ci * L..ci * L + L];
            for l in 0..L {
                ag[l] = madd::<FMA>(d[l], xc[l], ag[l]);
            }
        }
    }
    for ((o, ag), xg) in out.iter_mut().zip(&acc).zip(&xr) {
        let mut s: f32 = ag.iter().sum();
        for (&dv, &xv) in dyr[full..].iter().zip(&xg[full..]) {
            s = madd::<FMA>(dv, xv, s);
        }
        *o += s;
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 intrinsics.

/// The lanes of the last 16-lane vector of a `w`-long row (all 16 when `w` is a multiple).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn tail_mask(w: usize) -> std::arch::x86_64::__mmask16 {
    // Not `is_multiple_of`: keep the crate building on older stable compilers.
    let rem = w % 16;
    if rem == 0 {
        0xFFFF
    } else {
        (1u16 << rem) - 1
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{tail_mask, Csr};

    /// Column-tile width of the spmm: 8 zmm accumulators per row.
    const TILE: usize = 128;
    /// How many nonzeros ahead the spmm prefetches its `x` segment.
    const PREFETCH: usize = 4;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn spmm_block(
        csr: &Csr<'_>,
        x: *const f32,
        xs: usize,
        rows: Range<usize>,
        width: usize,
        out: *mut f32,
        os: usize,
    ) {
        for r in rows {
            let (s, e) = (csr.row_ptr[r], csr.row_ptr[r + 1]);
            let idx = &csr.col_idx[s..e];
            let vals = &csr.values[s..e];
            let mut c0 = 0;
            while c0 < width {
                let w = (width - c0).min(TILE);
                let mask = tail_mask(w);
                let xc = x.add(c0);
                let o = out.add(r * os + c0);
                match w.div_ceil(16) {
                    8 => tile::<8>(idx, vals, xc, xs, mask, o),
                    7 => tile::<7>(idx, vals, xc, xs, mask, o),
                    6 => tile::<6>(idx, vals, xc, xs, mask, o),
                    5 => tile::<5>(idx, vals, xc, xs, mask, o),
                    4 => tile::<4>(idx, vals, xc, xs, mask, o),
                    3 => tile::<3>(idx, vals, xc, xs, mask, o),
                    2 => tile::<2>(idx, vals, xc, xs, mask, o),
                    _ => tile::<1>(idx, vals, xc, xs, mask, o),
                }
                c0 += w;
            }
        }
    }

    /// One row x `NV` vectors (the last one masked by `mask`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const NV: usize>(
        idx: &[u32],
        vals: &[f32],
        xc: *const f32,
        xs: usize,
        mask: __mmask16,
        o: *mut f32,
    ) {
        let mut acc = [_mm512_setzero_ps(); NV];
        for (j, (&k, &v)) in idx.iter().zip(vals).enumerate() {
            // Rows of `x` are far apart, each segment too short for the hardware prefetcher:
            // fetch the segment needed PREFETCH entries ahead.
            if let Some(&kn) = idx.get(j + PREFETCH) {
                let xn = xc.add(kn as usize * xs) as *const i8;
                for i in 0..NV {
                    _mm_prefetch::<_MM_HINT_T0>(xn.add(64 * i));
                }
            }
            let vv = _mm512_set1_ps(v);
            let xr = xc.add(k as usize * xs);
            for (i, a) in acc.iter_mut().enumerate().take(NV - 1) {
                *a = _mm512_fmadd_ps(vv, _mm512_loadu_ps(xr.add(16 * i)), *a);
            }
            acc[NV - 1] = _mm512_fmadd_ps(
                vv,
                _mm512_maskz_loadu_ps(mask, xr.add(16 * (NV - 1))),
                acc[NV - 1],
            );
        }
        for (i, a) in acc.iter().enumerate().take(NV - 1) {
            _mm512_storeu_ps(o.add(16 * i), *a);
        }
        _mm512_mask_storeu_ps(o.add(16 * (NV - 1)), mask, acc[NV - 1]);
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sddmm_block(
        csr: &Csr<'_>,
        dy: *const f32,
        ds: usize,
        x: *const f32,
        xs: usize,
        rows: Range<usize>,
        w: usize,
        out: &mut [f32],
    ) {
        let base = csr.row_ptr[rows.start];
        let out = out.as_mut_ptr();
        let ks = csr.col_idx.as_ptr();
        for r in rows {
            let dyr = dy.add(r * ds);
            let e = csr.row_ptr[r + 1];
            let mut j = csr.row_ptr[r];
            while j + 8 <= e {
                group::<8>(ks.add(j), dyr, x, xs, w, out.add(j - base));
                j += 8;
            }
            if j + 4 <= e {
                group::<4>(ks.add(j), dyr, x, xs, w, out.add(j - base));
                j += 4;
            }
            if j + 2 <= e {
                group::<2>(ks.add(j), dyr, x, xs, w, out.add(j - base));
                j += 2;
            }
            if j < e {
                group::<1>(ks.add(j), dyr, x, xs, w, out.add(j - base));
            }
        }
    }

    /// `out[g] += dot(dyr[..w], x[ks[g]·xs ..][..w])` for `g < G`, sharing the `dy` loads.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn group<const G: usize>(
        ks: *const u32,
        dyr: *const f32,
        x: *const f32,
        xs: usize,
        w: usize,
        out: *mut f32,
    ) {
        let xr: [*const f32; G] = std::array::from_fn(|g| x.add(*ks.add(g) as usize * xs));
        let mut acc = [_mm512_setzero_ps(); G];
        let full = w / 16;
        for v in 0..full {
            let d = _mm512_loadu_ps(dyr.add(16 * v));
            for (a, &xg) in acc.iter_mut().zip(&xr) {
                *a = _mm512_fmadd_ps(d, _mm512_loadu_ps(xg.add(16 * v)), *a);
            }
        }
        if full * 16 < w {
            let m = tail_mask(w);
            let d = _mm512_maskz_loadu_ps(m, dyr.add(16 * full));
            for (a, &xg) in acc.iter_mut().zip(&xr) {
                *a = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, xg.add(16 * full)), *a);
            }
        }
        for (g, a) in acc.iter().enumerate() {
            *out.add(g) += _mm512_reduce_add_ps(*a);
        }
    }
}
