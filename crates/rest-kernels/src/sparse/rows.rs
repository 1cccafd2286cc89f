//! Sparse linear-layer products on batch-major activations (`x[N][I]`, `y[N][O]`), with no
//! transposes: each sample row is small enough to stay in L1, so every active weight costs one
//! indexed load and one multiply-add per sample.
//!
//! The feature-major kernels ([`super::spmm`] on `xT[I][N]`) stream contiguous batch rows, but
//! need the activations transposed on the way in and out; at the low densities of dynamic
//! sparse training those transposes (`N·(I + O)` scattered accesses per product) cost far more
//! than the `N·nnz` multiply-adds themselves. These kernels skip them, and also skip zero
//! output gradients (most of them, behind a ReLU).

use rayon::prelude::*;

use super::kernels::SERIAL_FLOPS;
use super::{check_len, SparseError, SparseMatrix};

/// Samples per parallel task.
fn sample_block(n: usize, work_per_sample: usize) -> usize {
    if n * work_per_sample < SERIAL_FLOPS {
        return n.max(1);
    }
    let tasks = 4 * rayon::current_num_threads();
    n.div_ceil(tasks).max(1)
}

/// `y[n][o] = Σ_k W[o, k] · x[n][k]` (`x` is `[N][I]`, `y` is `[N][O]`, overwritten).
pub fn spmm_rows(w: &SparseMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), SparseError> {
    let (o, i) = (w.rows(), w.cols());
    check_len("spmm_rows", "x", "[N][I] with I = W.cols()", x.len(), n, i)?;
    check_len("spmm_rows", "y", "[N][O] with O = W.rows()", y.len(), n, o)?;
    if o == 0 || n == 0 {
        return Ok(());
    }
    let (rp, ci, v) = (w.row_ptr(), w.col_idx(), w.values());
    let block = sample_block(n, 2 * w.nnz() + o);
    let run = |(b, yb): (usize, &mut [f32])| {
        let x = &x[b * block * i..];
        let done = (yb.len() / o) & !3;
        // Four samples at a time: each stored weight and index is loaded once for the four
        // gathers, and the four sums are independent chains.
        let mut quads = yb.chunks_exact_mut(4 * o);
        // The activations are read in index order, not streamed: ask for the next four
        // samples' rows (from L3, they rarely fit L2) a few lines per output row ahead.
        let lines_per_row = (4 * i * 4).div_ceil(64).div_ceil(o.max(1));
        for (q, yq) in quads.by_ref().enumerate() {
            let xq = &x[4 * q * i..][..4 * i];
            let next = x.get(4 * (q + 1) * i..).unwrap_or(&[]);
            let next = &next[..next.len().min(4 * i)];
            let (y01, y23) = yq.split_at_mut(2 * o);
            let (y0, y1) = y01.split_at_mut(o);
            let (y2, y3) = y23.split_at_mut(o);
            for r in 0..o {
                prefetch_lines(next, r * lines_per_row, lines_per_row);
                let (lo, hi) = (rp[r], rp[r + 1]);
                let d = dot_gather4(&v[lo..hi], &ci[lo..hi], xq, i);
                (y0[r], y1[r], y2[r], y3[r]) = (d[0], d[1], d[2], d[3]);
            }
        }
        for (s, yr) in quads.into_remainder().chunks_exact_mut(o).enumerate() {
            let xr = &x[(done + s) * i..][..i];
            for (r, yv) in yr.iter_mut().enumerate() {
                let (lo, hi) = (rp[r], rp[r + 1]);
                *yv = dot_gather(&v[lo..hi], &ci[lo..hi], xr);
            }
        }
    };
    if block >= n {
        run((0, y));
    } else {
        y.par_chunks_mut(block * o).enumerate().for_each(run);
    }
    Ok(())
}

/// `dx[n][k] = Σ_o W[o, k] · dy[n][o]` (`dy` is `[N][O]`, `dx` is `[N][I]`, overwritten).
pub fn spmm_t_rows(
    w: &SparseMatrix,
    dy: &[f32],
    n: usize,
    dx: &mut [f32],
) -> Result<(), SparseError> {
    let (o, i) = (w.rows(), w.cols());
    check_len(
        "spmm_t_rows",
        "dy",
        "[N][O] with O = W.rows()",
        dy.len(),
        n,
        o,
    )?;
    check_len(
        "spmm_t_rows",
        "dx",
        "[N][I] with I = W.cols()",
        dx.len(),
        n,
        i,
    )?;
    if i == 0 || n == 0 {
        return Ok(());
    }
    let (rp, ci, v) = (w.row_ptr(), w.col_idx(), w.values());
    let block = sample_block(n, 2 * w.nnz() + i);
    let run = |(b, xb): (usize, &mut [f32])| {
        for (s, dxr) in xb.chunks_exact_mut(i).enumerate() {
            dxr.fill(0.0);
            let dyr = &dy[(b * block + s) * o..][..o];
            for (r, &d) in dyr.iter().enumerate() {
                if d == 0.0 {
                    continue;
                }
                for (&k, &wv) in ci[rp[r]..rp[r + 1]].iter().zip(&v[rp[r]..rp[r + 1]]) {
                    dxr[k as usize] += wv * d;
                }
            }
        }
    };
    if block >= n {
        run((0, dx));
    } else {
        dx.par_chunks_mut(block * i).enumerate().for_each(run);
    }
    Ok(())
}

/// The weight gradient at the active weights: `grad[e] = Σ_n dy[n][o_e] · x[n][k_e]` for
/// every stored entry `e = (o_e, k_e)`, aligned with `w.values()` (overwritten).
pub fn sddmm_rows(
    w: &SparseMatrix,
    dy: &[f32],
    x: &[f32],
    n: usize,
    grad: &mut [f32],
) -> Result<(), SparseError> {
    let (o, i) = (w.rows(), w.cols());
    check_len(
        "sddmm_rows",
        "dy",
        "[N][O] with O = W.rows()",
        dy.len(),
        n,
        o,
    )?;
    check_len("sddmm_rows", "x", "[N][I] with I = W.cols()", x.len(), n, i)?;
    if grad.len() != w.nnz() {
        return Err(SparseError::new(format!(
            "sparse sddmm_rows: grad has {} elements, expected nnz = {}",
            grad.len(),
            w.nnz()
        )));
    }
    let (rp, ci) = (w.row_ptr(), w.col_idx());
    // Accumulates samples `range` into `g`.
    let acc = |range: std::ops::Range<usize>, g: &mut [f32]| {
        for s in range {
            let (xr, dyr) = (&x[s * i..][..i], &dy[s * o..][..o]);
            for (r, &d) in dyr.iter().enumerate() {
                if d == 0.0 {
                    continue;
                }
                let (lo, hi) = (rp[r], rp[r + 1]);
                for (gv, &k) in g[lo..hi].iter_mut().zip(&ci[lo..hi]) {
                    *gv += d * xr[k as usize];
                }
            }
        }
    };
    grad.fill(0.0);
    let block = sample_block(n, 2 * w.nnz() + o);
    if block >= n {
        acc(0..n, grad);
        return Ok(());
    }
    // Per-task partial gradients (nnz each), summed in a fixed order (deterministic).
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let mut g = vec![0.0f32; grad.len()];
            acc(b * block..((b + 1) * block).min(n), &mut g);
            g
        })
        .collect();
    for p in &parts {
        for (a, &b) in grad.iter_mut().zip(p) {
            *a += b;
        }
    }
    Ok(())
}

/// Prefetches (into L1) cache lines `first..first + count` of `x`, those that exist.
#[inline]
fn prefetch_lines(x: &[f32], first: usize, count: usize) {
    #[cfg(target_arch = "x86_64")]
    for l in first..first + count {
        if let Some(p) = x.get(16 * l) {
            // SAFETY: a prefetch of a valid address; it neither reads nor writes memory.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    (p as *const f32).cast(),
                )
            };
        } else {
            break;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, first, count);
}

/// `Σ_j v[j] · x_s[k[j]]` for the four consecutive rows `x_s = x[s·i..(s+1)·i]` of `x`
/// (`4·i` long), each with two partial sums (even and odd `j`).
#[inline]
fn dot_gather4(v: &[f32], k: &[u32], x: &[f32], i: usize) -> [f32; 4] {
    assert!(x.len() >= 4 * i && k.iter().all(|&c| (c as usize) < i));
    let mut s = [[0.0f32; 4]; 2];
    for (j, (&vv, &kk)) in v.iter().zip(k).enumerate() {
        let c = kk as usize;
        let acc = &mut s[j & 1];
        // SAFETY: `c < i` and `x.len() >= 4 i` (asserted above), so `c + 3 i < x.len()`.
        unsafe {
            acc[0] += vv * *x.get_unchecked(c);
            acc[1] += vv * *x.get_unchecked(c + i);
            acc[2] += vv * *x.get_unchecked(c + 2 * i);
            acc[3] += vv * *x.get_unchecked(c + 3 * i);
        }
    }
    [
        s[0][0] + s[1][0],
        s[0][1] + s[1][1],
        s[0][2] + s[1][2],
        s[0][3] + s[1][3],
    ]
}

/// `Σ_j v[j] · x[k[j]]`, four independent partial sums.
#[inline]
fn dot_gather(v: &[f32], k: &[u32], x: &[f32]) -> f32 {
    let mut s = [0.0f32; 4];
    let (vc, kc) = (v.chunks_exact(4), k.chunks_exact(4));
    let (vr, kr) = (vc.remainder(), kc.remainder());
    for (v4, k4) in vc.zip(kc) {
        for l in 0..4 {
            s[l] += v4[l] * x[k4[l] as usize];
        }
    }
    let mut t = (s[0] + s[1]) + (s[2] + s[3]);
    for (&vv, &kk) in vr.iter().zip(kr) {
        t += vv * x[kk as usize];
    }
    t
}
