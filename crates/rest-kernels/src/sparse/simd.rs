//! Run-time instruction-set dispatch and the inner loops of the sparse kernels.
//!
//! Each kernel works on a *block* (a row range x a column range) and is compiled three times:
//! with AVX-512 intrinsics, as plain Rust under `#[target_feature(enable = "avx2,fma")]`, and
//! as plain portable Rust. Target features do not propagate into closures, so the whole block
//! loop lives inside the feature-enabled function and the rayon closures only call it.

use std::ops::Range;
use std::sync::OnceLock;

use super::matrix::Csr;

/// The instruction set the sparse inner loops run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F intrinsics (16-lane FMA, masked tails).
    Avx512,
    /// Auto-vectorised loops compiled for AVX2 + FMA.
    Avx2Fma,
    /// Portable Rust (whatever the compilation target allows).
    Portable,
}

impl Isa {
    /// Whether this CPU can run the instruction set.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
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
        [Isa::Avx512, Isa::Avx2Fma]
            .into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Portable)
    }

    /// Short lower-case name (`avx512`, `avx2`, `portable`), as accepted by `REST_SPARSE_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Preference order: a forced level is honoured only if it is not above the best one.
    fn rank(self) -> u8 {
        match self {
            Isa::Avx512 => 2,
            Isa::Avx2Fma => 1,
            Isa::Portable => 0,
        }
    }
}

/// The instruction set the kernels use: [`Isa::best`], or a lower one named by the
/// environment variable `REST_SPARSE_ISA` (`avx512`, `avx2`, `portable`; unknown or
/// unsupported values are ignored). Read once per process.
pub fn active_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = Isa::best();
        let forced = std::env::var("REST_SPARSE_ISA").ok().and_then(|v| {
            [Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
                .into_iter()
                .find(|i| i.name().eq_ignore_ascii_case(v.trim()))
        });
        match forced {
            Some(f) if f.rank() <= best.rank() && f.is_available() => f,
            _ => best,
        }
    })
}

/// `out[r][c] = Σ_j W[r, k_j] x[k_j][c]` for `r ∈ rows`, `c ∈ cols`.
///
/// # Safety
/// `isa` must be available; `x.len() == csr.cols * p`; `out` must point to a `csr.rows * p`
/// buffer in which no other thread accesses the block; all `col_idx < csr.cols`;
/// `rows.end <= csr.rows`, `cols.end <= p`.
pub(crate) unsafe fn spmm_block(
    isa: Isa,
    csr: &Csr<'_>,
    x: &[f32],
    p: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    out: *mut f32,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::spmm_block(csr, x.as_ptr(), p, rows, cols, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => spmm_block_avx2(csr, x, p, rows, cols, out),
        _ => spmm_block_portable::<false>(csr, x, p, rows, cols, out),
    }
}

/// `out[j - row_ptr[rows.start]] = Σ_{c ∈ cols} dy[r][c] x[k_j][c]` for every entry `j` of
/// the rows in `rows` (overwrites `out`).
///
/// # Safety
/// `isa` must be available; `dy.len() == csr.rows * p`, `x.len() == csr.cols * p`; all
/// `col_idx < csr.cols`; `rows.end <= csr.rows`; `cols.end <= p`;
/// `out.len() == row_ptr[rows.end] - row_ptr[rows.start]`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sddmm_block(
    isa: Isa,
    csr: &Csr<'_>,
    dy: &[f32],
    x: &[f32],
    p: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    tile: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::sddmm_block(
            csr,
            dy.as_ptr(),
            x.as_ptr(),
            p,
            rows,
            cols,
            tile,
            out.as_mut_ptr(),
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => sddmm_block_avx2(csr, dy, x, p, rows, cols, tile, out),
        _ => sddmm_block_portable::<false>(csr, dy, x, p, rows, cols, tile, out),
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
    x: &[f32],
    p: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    out: *mut f32,
) {
    spmm_block_portable::<true>(csr, x, p, rows, cols, out)
}

#[inline(always)]
unsafe fn spmm_block_portable<const FMA: bool>(
    csr: &Csr<'_>,
    x: &[f32],
    p: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    out: *mut f32,
) {
    let mut c0 = cols.start;
    while c0 < cols.end {
        let w = (cols.end - c0).min(PORTABLE_TILE);
        for r in rows.clone() {
            let (s, e) = (csr.row_ptr[r], csr.row_ptr[r + 1]);
            let idx = &csr.col_idx[s..e];
            let vals = &csr.values[s..e];
            // SAFETY: the caller guarantees this block of `out` is ours and in bounds.
            let o = std::slice::from_raw_parts_mut(out.add(r * p + c0), w);
            if w == PORTABLE_TILE {
                let mut acc = [0f32; PORTABLE_TILE];
                for (&k, &v) in idx.iter().zip(vals) {
                    let off = k as usize * p + c0;
                    let xs = &x[off..off + PORTABLE_TILE];
                    for (a, &xv) in acc.iter_mut().zip(xs) {
                        *a = madd::<FMA>(v, xv, *a);
                    }
                }
                o.copy_from_slice(&acc);
            } else {
                o.fill(0.0);
                for (&k, &v) in idx.iter().zip(vals) {
                    let off = k as usize * p + c0;
                    for (a, &xv) in o.iter_mut().zip(&x[off..off + w]) {
                        *a = madd::<FMA>(v, xv, *a);
                    }
                }
            }
        }
        c0 += w;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn sddmm_block_avx2(
    csr: &Csr<'_>,
    dy: &[f32],
    x: &[f32],
    p: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    tile: usize,
    out: &mut [f32],
) {
    sddmm_block_portable::<true>(csr, dy, x, p, rows, cols, tile, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sddmm_block_portable<const FMA: bool>(
    csr: &Csr<'_>,
    dy: &[f32],
    x: &[f32],
    p: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    tile: usize,
    out: &mut [f32],
) {
    let base = csr.row_ptr[rows.start];
    let mut c0 = cols.start;
    while c0 < cols.end {
        let w = (cols.end - c0).min(tile);
        for r in rows.clone() {
            let dyr = &dy[r * p + c0..r * p + c0 + w];
            let e = csr.row_ptr[r + 1];
            let mut j = csr.row_ptr[r];
            while j + 4 <= e {
                dot_group::<4, FMA>(csr, x, p, c0, dyr, j, &mut out[j - base..j - base + 4]);
                j += 4;
            }
            while j < e {
                dot_group::<1, FMA>(csr, x, p, c0, dyr, j, &mut out[j - base..j - base + 1]);
                j += 1;
            }
        }
        c0 += w;
    }
}

/// `out[g] += dot(dyr, x[k_{j+g}][c0..c0+len])` for `g < G`.
#[inline(always)]
fn dot_group<const G: usize, const FMA: bool>(
    csr: &Csr<'_>,
    x: &[f32],
    p: usize,
    c0: usize,
    dyr: &[f32],
    j: usize,
    out: &mut [f32],
) {
    const L: usize = 16;
    let w = dyr.len();
    let xs: [&[f32]; G] = std::array::from_fn(|g| {
        let off = csr.col_idx[j + g] as usize * p + c0;
        &x[off..off + w]
    });
    let mut acc = [[0f32; L]; G];
    let full = w / L * L;
    for c in (0..full).step_by(L) {
        let d = &dyr[c..c + L];
        for (ag, xg) in acc.iter_mut().zip(&xs) {
            for (a, (&dv, &xv)) in ag.iter_mut().zip(d.iter().zip(&xg[c..c + L])) {
                *a = madd::<FMA>(dv, xv, *a);
            }
        }
    }
    for ((o, ag), xg) in out.iter_mut().zip(&acc).zip(&xs) {
        let mut s: f32 = ag.iter().sum();
        for (&dv, &xv) in dyr[full..].iter().zip(&xg[full..]) {
            s = madd::<FMA>(dv, xv, s);
        }
        *o += s;
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 intrinsics.

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::Csr;

    /// Column-tile width of the spmm: 8 zmm accumulators per row.
    const TILE: usize = 128;

    #[inline]
    fn tail_mask(w: usize) -> __mmask16 {
        // Not `is_multiple_of`: keep the crate building on older stable compilers.
        let rem = w % 16;
        if rem == 0 {
            0xFFFF
        } else {
            (1u16 << rem) - 1
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn spmm_block(
        csr: &Csr<'_>,
        x: *const f32,
        p: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        out: *mut f32,
    ) {
        let mut c0 = cols.start;
        while c0 < cols.end {
            let w = (cols.end - c0).min(TILE);
            let mask = tail_mask(w);
            let nv = w.div_ceil(16);
            for r in rows.clone() {
                let (s, e) = (csr.row_ptr[r], csr.row_ptr[r + 1]);
                let idx = &csr.col_idx[s..e];
                let vals = &csr.values[s..e];
                let xc = x.add(c0);
                let o = out.add(r * p + c0);
                match nv {
                    8 => tile::<8>(idx, vals, xc, p, mask, o),
                    7 => tile::<7>(idx, vals, xc, p, mask, o),
                    6 => tile::<6>(idx, vals, xc, p, mask, o),
                    5 => tile::<5>(idx, vals, xc, p, mask, o),
                    4 => tile::<4>(idx, vals, xc, p, mask, o),
                    3 => tile::<3>(idx, vals, xc, p, mask, o),
                    2 => tile::<2>(idx, vals, xc, p, mask, o),
                    _ => tile::<1>(idx, vals, xc, p, mask, o),
                }
            }
            c0 += w;
        }
    }

    /// One row x `NV` vectors (the last one masked by `mask`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const NV: usize>(
        idx: &[u32],
        vals: &[f32],
        xc: *const f32,
        p: usize,
        mask: __mmask16,
        o: *mut f32,
    ) {
        let mut acc = [_mm512_setzero_ps(); NV];
        for (&k, &v) in idx.iter().zip(vals) {
            let vv = _mm512_set1_ps(v);
            let xr = xc.add(k as usize * p);
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
        x: *const f32,
        p: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        tile: usize,
        out: *mut f32,
    ) {
        let base = csr.row_ptr[rows.start];
        let mut c0 = cols.start;
        while c0 < cols.end {
            let w = (cols.end - c0).min(tile);
            let xc = x.add(c0);
            for r in rows.clone() {
                let dyr = dy.add(r * p + c0);
                let e = csr.row_ptr[r + 1];
                let mut j = csr.row_ptr[r];
                let ks = csr.col_idx.as_ptr();
                while j + 8 <= e {
                    group::<8>(ks.add(j), dyr, xc, p, w, out.add(j - base));
                    j += 8;
                }
                if j + 4 <= e {
                    group::<4>(ks.add(j), dyr, xc, p, w, out.add(j - base));
                    j += 4;
                }
                if j + 2 <= e {
                    group::<2>(ks.add(j), dyr, xc, p, w, out.add(j - base));
                    j += 2;
                }
                if j < e {
                    group::<1>(ks.add(j), dyr, xc, p, w, out.add(j - base));
                }
            }
            c0 += w;
        }
    }

    /// `out[g] += dot(dyr[..w], x[ks[g]][c0..c0+w])` for `g < G`, sharing the `dy` loads.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn group<const G: usize>(
        ks: *const u32,
        dyr: *const f32,
        xc: *const f32,
        p: usize,
        w: usize,
        out: *mut f32,
    ) {
        let xr: [*const f32; G] = std::array::from_fn(|g| xc.add(*ks.add(g) as usize * p));
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

#[cfg(test)]
pub(crate) fn available_isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
}
