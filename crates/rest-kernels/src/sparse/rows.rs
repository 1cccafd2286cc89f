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
        for (s, yr) in yb.chunks_exact_mut(o).enumerate() {
            let xr = &x[(b * block + s) * i..][..i];
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
