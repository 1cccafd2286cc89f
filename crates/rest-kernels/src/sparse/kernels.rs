//! The three sparse products of a training step (`W x`, `Wᵀ dy`, `dy xᵀ` sampled at the
//! pattern) and how they are split into parallel blocks.

use rayon::prelude::*;

use super::matrix::Csr;
use super::simd;
use super::{check_len, SparseError, SparseMatrix};
use crate::isa::{self, Isa};

/// Below this many useful flops a product runs on the calling thread (rayon would cost more).
pub(crate) const SERIAL_FLOPS: usize = 1 << 18;
/// [`SERIAL_FLOPS`] for the feature-major products (`spmm`, `spmmᵀ`, SDDMM): these stream
/// whole rows of `x` at L2 speed, so a product of a few MFLOP takes about as long on one core
/// as waking a sleeping rayon worker costs (chosen with `rest bench --models mlp` at 2
/// threads: the MLP's first layer runs serial at density 0.01, parallel at 0.05).
const PRODUCT_SERIAL_FLOPS: usize = 1 << 21;
/// Column granule of the spmm blocks (the AVX-512 register-tile width).
const SPMM_COL_GRANULE: usize = 128;
/// Bytes of `x` one spmm cache tile may span (`K * ctile * 4`), so the slab stays in L2.
const SPMM_SLAB_BYTES: usize = 1 << 20;
/// Bytes of `x` one sddmm column tile may span (`K * tile * 4`), so the slab stays in L2.
const SDDMM_SLAB_BYTES: usize = 1 << 20;

/// `out = W x`: `x` is row-major `[K][P]` (`K = w.cols()`), `out` is `[R][P]` (`R = w.rows()`)
/// and is overwritten. Rows of `W` without active weights give zero rows.
///
/// For a convolution `x` is the im2col matrix and `out` the CNHW output; for a linear layer
/// `x` is the feature-major activation `xT[I][N]` and `out` is `yT[O][N]`.
pub fn spmm(w: &SparseMatrix, x: &[f32], p: usize, out: &mut [f32]) -> Result<(), SparseError> {
    check_len(
        "spmm",
        "x",
        "[K][P] with K = W.cols()",
        x.len(),
        w.cols(),
        p,
    )?;
    check_len(
        "spmm",
        "out",
        "[R][P] with R = W.rows()",
        out.len(),
        w.rows(),
        p,
    )?;
    run_spmm(isa::active(), &w.csr(), x, p, out);
    Ok(())
}

/// `dx = Wᵀ dy`: `dy` is `[R][P]`, `dx` is `[K][P]` and is overwritten. Uses the stored CSR
/// of `Wᵀ`, so it is row-parallel over `dx` without atomics.
pub fn spmm_t(w: &SparseMatrix, dy: &[f32], p: usize, dx: &mut [f32]) -> Result<(), SparseError> {
    check_len(
        "spmm_t",
        "dy",
        "[R][P] with R = W.rows()",
        dy.len(),
        w.rows(),
        p,
    )?;
    check_len(
        "spmm_t",
        "dx",
        "[K][P] with K = W.cols()",
        dx.len(),
        w.cols(),
        p,
    )?;
    run_spmm(isa::active(), &w.csr_t(), dy, p, dx);
    Ok(())
}

/// The weight gradient at the active positions only: for every stored entry `j = (r, k)` of
/// `w`, `grad[j] = Σ_c dy[r][c] · x[k][c]` (`dy` is `[R][P]`, `x` is `[K][P]`). The result is
/// aligned with [`SparseMatrix::values`]; [`SparseMatrix::scatter_to_dense`] expands it.
pub fn sddmm(w: &SparseMatrix, dy: &[f32], x: &[f32], p: usize) -> Result<Vec<f32>, SparseError> {
    let mut grad = vec![0.0; w.nnz()];
    sddmm_into(w, dy, x, p, &mut grad)?;
    Ok(grad)
}

/// [`sddmm`] into a caller-owned buffer of length `w.nnz()` (overwritten).
pub fn sddmm_into(
    w: &SparseMatrix,
    dy: &[f32],
    x: &[f32],
    p: usize,
    grad: &mut [f32],
) -> Result<(), SparseError> {
    check_len(
        "sddmm",
        "dy",
        "[R][P] with R = W.rows()",
        dy.len(),
        w.rows(),
        p,
    )?;
    check_len(
        "sddmm",
        "x",
        "[K][P] with K = W.cols()",
        x.len(),
        w.cols(),
        p,
    )?;
    if grad.len() != w.nnz() {
        return Err(SparseError::new(format!(
            "sparse sddmm: grad has {} elements, expected nnz = {} (one per active weight)",
            grad.len(),
            w.nnz()
        )));
    }
    run_sddmm(isa::active(), &w.csr(), dy, x, p, grad);
    Ok(())
}

/// Raw output pointer shared by tasks that write disjoint blocks (the sparse products and
/// convolutions).
#[derive(Clone, Copy)]
pub(super) struct OutPtr(*mut f32);
// SAFETY: only used to write disjoint regions from different tasks (see `run_spmm`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    pub(super) fn new(p: *mut f32) -> Self {
        OutPtr(p)
    }

    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Splits `rows` into at most `n` contiguous ranges of roughly equal cost `nnz + 1` per row.
pub(crate) fn split_rows(row_ptr: &[usize], n: usize) -> Vec<usize> {
    let rows = row_ptr.len() - 1;
    let n = n.clamp(1, rows.max(1));
    let total = row_ptr[rows] + rows;
    let mut bounds = vec![0];
    let mut r = 0;
    for i in 1..n {
        let target = total * i / n;
        while r < rows && row_ptr[r] + r < target {
            r += 1;
        }
        if r > *bounds.last().unwrap_or(&0) && r < rows {
            bounds.push(r);
        }
    }
    bounds.push(rows);
    bounds
}

/// Splits `0..p` into `n` ranges whose interior boundaries are multiples of `granule`.
pub(crate) fn split_cols(p: usize, n: usize, granule: usize) -> Vec<usize> {
    let units = p.div_ceil(granule);
    let n = n.clamp(1, units.max(1));
    let mut bounds: Vec<usize> = (0..n).map(|i| (units * i / n) * granule).collect();
    bounds.push(p);
    bounds.dedup();
    bounds
}

/// Packing pays when each `x` row of a cache tile is used at least this often on average...
const PACK_MIN_REUSE: usize = 2;
/// ...and `x` has enough rows that an unpacked slab spans many pages (one page per row).
const PACK_MIN_ROWS: usize = 256;

thread_local! {
    /// Per-thread buffer for packed `x` slabs (reused across calls: no page faults per call).
    static PACK_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f(ptr, stride)` on the `[K][cw]` slab of `x` starting at column `c0`: either in place
/// (stride `p`) or, when `pack`, copied into a contiguous per-thread buffer whose row stride is
/// padded by one cache line (rows of a power-of-two-ish stride alias in L1 sets).
fn with_slab<R>(
    x: &[f32],
    p: usize,
    k: usize,
    c0: usize,
    cw: usize,
    pack: bool,
    f: impl FnOnce(*const f32, usize) -> R,
) -> R {
    if !pack {
        return f(x[c0..].as_ptr(), p);
    }
    let ps = cw + 16;
    let run = |buf: &mut Vec<f32>| {
        if buf.len() < k * ps {
            buf.resize(k * ps, 0.0);
        }
        for (dst, src) in buf.chunks_exact_mut(ps).zip(x.chunks_exact(p)) {
            dst[..cw].copy_from_slice(&src[c0..c0 + cw]);
        }
        f(buf.as_ptr(), ps)
    };
    PACK_BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => run(&mut buf),
        Err(_) => run(&mut Vec::new()),
    })
}

/// Width of a cache tile: `x` slab of `K * width` floats within `slab_bytes`.
fn cache_tile(k: usize, slab_bytes: usize, granule: usize) -> usize {
    (slab_bytes / 4 / k.max(1)).clamp(granule, 4096) / granule * granule
}

pub(crate) fn run_spmm(isa: Isa, csr: &Csr<'_>, x: &[f32], p: usize, out: &mut [f32]) {
    if out.is_empty() {
        return;
    }
    let threads = rayon::current_num_threads();
    let flops = 2 * csr.nnz() * p;
    let target = if flops < PRODUCT_SERIAL_FLOPS {
        1
    } else {
        4 * threads
    };
    let col_bounds = split_cols(p, target, SPMM_COL_GRANULE);
    let n_col = col_bounds.len() - 1;
    let row_bounds = split_rows(csr.row_ptr, target.div_ceil(n_col));
    let n_row = row_bounds.len() - 1;
    let ctile = cache_tile(csr.cols, SPMM_SLAB_BYTES, SPMM_COL_GRANULE);
    let optr = OutPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (ri, ci) = (t / n_col, t % n_col);
        let rows = row_bounds[ri]..row_bounds[ri + 1];
        let nnz = csr.row_ptr[rows.end] - csr.row_ptr[rows.start];
        let pack = p > ctile && csr.cols >= PACK_MIN_ROWS && nnz >= PACK_MIN_REUSE * csr.cols;
        let mut c0 = col_bounds[ci];
        while c0 < col_bounds[ci + 1] {
            let cw = (col_bounds[ci + 1] - c0).min(ctile);
            with_slab(x, p, csr.cols, c0, cw, pack, |xp, xs| {
                // SAFETY: `isa` is available (checked by its constructor); the slab has `cw`
                // readable columns per row of `x`; `out` has `csr.rows * p` elements (checked
                // by the caller) and the (row range, column range) blocks of the tasks are
                // disjoint, so no two tasks touch the same element of `out`.
                unsafe {
                    simd::spmm_block(isa, csr, xp, xs, rows.clone(), cw, optr.get().add(c0), p)
                }
            });
            c0 += cw;
        }
    };
    if n_row * n_col == 1 {
        task(0);
    } else {
        (0..n_row * n_col).into_par_iter().for_each(task);
    }
}

pub(crate) fn run_sddmm(
    isa: Isa,
    csr: &Csr<'_>,
    dy: &[f32],
    x: &[f32],
    p: usize,
    grad: &mut [f32],
) {
    if grad.is_empty() {
        return;
    }
    if p == 0 {
        grad.fill(0.0);
        return;
    }
    let threads = rayon::current_num_threads();
    let flops = 2 * csr.nnz() * p;
    let serial = flops < PRODUCT_SERIAL_FLOPS;
    let tile = cache_tile(csr.cols, SDDMM_SLAB_BYTES, 16).max(256);
    // One block: rows `rows`, columns `cols`, written to `out` (that row range's entries).
    let block = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, out: &mut [f32]| {
        out.fill(0.0);
        let pack = p > tile && csr.cols >= PACK_MIN_ROWS && out.len() >= PACK_MIN_REUSE * csr.cols;
        let mut c0 = cols.start;
        while c0 < cols.end {
            let cw = (cols.end - c0).min(tile);
            with_slab(x, p, csr.cols, c0, cw, pack, |xp, xs| {
                // SAFETY: `isa` is available; `dy` (`csr.rows * p`, checked by the caller) and
                // the slab have `cw` readable columns per row from `c0`; `out` holds exactly
                // the entries of `rows`.
                unsafe {
                    simd::sddmm_block(
                        isa,
                        csr,
                        dy[c0..].as_ptr(),
                        p,
                        xp,
                        xs,
                        rows.clone(),
                        cw,
                        cw,
                        out,
                    )
                }
            });
            c0 += cw;
        }
    };
    let n_col = if serial {
        1
    } else {
        threads.min(p.div_ceil(tile))
    };
    if n_col >= 2 {
        // Long rows: split the columns, so `x` is read once; sum the partial gradients.
        let col_bounds = split_cols(p, n_col, 16);
        let n_col = col_bounds.len() - 1;
        let mut partials = vec![vec![0.0f32; grad.len()]; n_col - 1];
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(n_col);
        outs.push(&mut *grad);
        outs.extend(partials.iter_mut().map(|v| v.as_mut_slice()));
        outs.into_par_iter()
            .enumerate()
            .for_each(|(ci, out)| block(0..csr.rows, col_bounds[ci]..col_bounds[ci + 1], out));
        const CHUNK: usize = 4096;
        grad.par_chunks_mut(CHUNK).enumerate().for_each(|(i, g)| {
            for part in &partials {
                for (a, &b) in g.iter_mut().zip(&part[i * CHUNK..]) {
                    *a += b;
                }
            }
        });
    } else {
        let n_row = if serial { 1 } else { 4 * threads };
        let row_bounds = split_rows(csr.row_ptr, n_row);
        let mut outs: Vec<(std::ops::Range<usize>, &mut [f32])> = Vec::new();
        let mut rest = grad;
        for w in row_bounds.windows(2) {
            let len = csr.row_ptr[w[1]] - csr.row_ptr[w[0]];
            let (head, tail) = rest.split_at_mut(len);
            outs.push((w[0]..w[1], head));
            rest = tail;
        }
        if outs.len() == 1 {
            outs.into_iter()
                .for_each(|(rows, out)| block(rows, 0..p, out));
        } else {
            outs.into_par_iter()
                .for_each(|(rows, out)| block(rows, 0..p, out));
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops mirror the maths
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1) (xorshift), independent of the kernels.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn matrix(seed: u64, rows: usize, cols: usize, density: f32) -> SparseMatrix {
        let w = values(seed, rows * cols);
        let m: Vec<bool> = values(seed + 1, rows * cols)
            .iter()
            .map(|&u| (u + 1.0) / 2.0 < density)
            .collect();
        SparseMatrix::from_dense_masked(&w, &m, rows, cols).unwrap()
    }

    #[test]
    fn split_rows_covers_all_rows_and_balances_nnz() {
        // Row nnz: 10, 0, 0, 10, 10, 0, 10 -> cost (nnz + 1): 11,1,1,11,11,1,11 (total 47).
        let row_ptr = [0, 10, 10, 10, 20, 30, 30, 40];
        let b = split_rows(&row_ptr, 2);
        assert_eq!(b, vec![0, 4, 7]);
        assert_eq!(split_rows(&row_ptr, 1), vec![0, 7]);
        let b = split_rows(&row_ptr, 100);
        assert_eq!(b.first(), Some(&0));
        assert_eq!(b.last(), Some(&7));
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        assert_eq!(split_rows(&[0], 4), vec![0, 0]);
    }

    #[test]
    fn split_cols_uses_granule_boundaries() {
        assert_eq!(split_cols(1000, 4, 128), vec![0, 256, 512, 768, 1000]);
        assert_eq!(split_cols(100, 4, 128), vec![0, 100]);
        assert_eq!(split_cols(0, 4, 128), vec![0]);
        assert_eq!(split_cols(33, 8, 16), vec![0, 16, 32, 33]);
    }

    /// Every instruction set agrees with a scalar f64 reference, for shapes that exercise
    /// serial and parallel splits, tails of every width and both sddmm strategies.
    #[test]
    fn every_isa_matches_reference() {
        let shapes = [
            (3, 5, 1),
            (9, 40, 17),
            (40, 70, 129),
            (70, 33, 515),
            (17, 600, 2100),
        ];
        for isa in Isa::available() {
            for (si, &(rows, k, p)) in shapes.iter().enumerate() {
                for &d in &[0.02f32, 0.3, 1.0] {
                    let sm = matrix(si as u64 * 10, rows, k, d);
                    let wd = sm.to_dense();
                    let x = values(7 + si as u64, k * p);
                    let dy = values(9 + si as u64, rows * p);
                    let tag = format!("{isa:?} {rows}x{k}x{p} d={d}");

                    let mut out = vec![f32::NAN; rows * p];
                    run_spmm(isa, &sm.csr(), &x, p, &mut out);
                    let mut dx = vec![f32::NAN; k * p];
                    run_spmm(isa, &sm.csr_t(), &dy, p, &mut dx);
                    let mut g = vec![f32::NAN; sm.nnz()];
                    run_sddmm(isa, &sm.csr(), &dy, &x, p, &mut g);

                    for r in 0..rows {
                        for c in 0..p {
                            let want: f64 = (0..k)
                                .map(|j| wd[r * k + j] as f64 * x[j * p + c] as f64)
                                .sum();
                            let got = out[r * p + c] as f64;
                            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{tag} out");
                        }
                    }
                    for j in 0..k {
                        for c in 0..p {
                            let want: f64 = (0..rows)
                                .map(|r| wd[r * k + j] as f64 * dy[r * p + c] as f64)
                                .sum();
                            let got = dx[j * p + c] as f64;
                            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{tag} dx");
                        }
                    }
                    for r in 0..rows {
                        for e in sm.row_ptr()[r]..sm.row_ptr()[r + 1] {
                            let j = sm.col_idx()[e] as usize;
                            let want: f64 = (0..p)
                                .map(|c| dy[r * p + c] as f64 * x[j * p + c] as f64)
                                .sum();
                            let tol = 1e-5 * p as f64 + 1e-5;
                            assert!((g[e] as f64 - want).abs() < tol, "{tag} grad {r},{j}");
                        }
                    }
                }
            }
        }
    }
}
