//! Fully-connected layer `y[N,O] = x[N,I] W[O,I]^T (+ b)` and its gradients, as GEMMs, in
//! two activation layouts: batch-major (`x[N][I]`, `y[N][O]`) and feature-major (`_fm`:
//! `x[I][N]`, `y[O][N]`, each feature's values over the batch contiguous, the layout the
//! sparse products of `crate::sparse` take without transposes).

use crate::util::{gemm, sum_lanes, MatRef};

/// `y[N,O] = x[N,I] w[O,I]^T + b` (overwritten); `b` has `O` entries when given.
pub fn linear_fwd(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    i: usize,
    o: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), n * i, "linear_fwd: x length");
    assert_eq!(w.len(), o * i, "linear_fwd: w length");
    assert_eq!(y.len(), n * o, "linear_fwd: y length");
    if let Some(b) = b {
        assert_eq!(b.len(), o, "linear_fwd: bias length");
        for row in y.chunks_exact_mut(o.max(1)) {
            row.copy_from_slice(b);
        }
    }
    gemm(
        n,
        o,
        i,
        y,
        b.is_some(),
        MatRef::row_major(x, i),
        MatRef::transposed(w, i),
    );
}

/// `dx[N,I] = dy[N,O] w[O,I]` (overwritten).
pub fn linear_bwd_input(dy: &[f32], w: &[f32], n: usize, i: usize, o: usize, dx: &mut [f32]) {
    assert_eq!(dy.len(), n * o, "linear_bwd_input: dy length");
    assert_eq!(w.len(), o * i, "linear_bwd_input: w length");
    assert_eq!(dx.len(), n * i, "linear_bwd_input: dx length");
    gemm(
        n,
        i,
        o,
        dx,
        false,
        MatRef::row_major(dy, o),
        MatRef::row_major(w, i),
    );
}

/// `dw[O,I] = dy[N,O]^T x[N,I]` (overwritten).
pub fn linear_bwd_weight(dy: &[f32], x: &[f32], n: usize, i: usize, o: usize, dw: &mut [f32]) {
    assert_eq!(dy.len(), n * o, "linear_bwd_weight: dy length");
    assert_eq!(x.len(), n * i, "linear_bwd_weight: x length");
    assert_eq!(dw.len(), o * i, "linear_bwd_weight: dw length");
    gemm(
        o,
        i,
        n,
        dw,
        false,
        MatRef::transposed(dy, o),
        MatRef::row_major(x, i),
    );
}

/// `db[O] = sum_n dy[n, O]` (overwritten).
pub fn linear_bwd_bias(dy: &[f32], n: usize, o: usize, db: &mut [f32]) {
    assert_eq!(dy.len(), n * o, "linear_bwd_bias: dy length");
    assert_eq!(db.len(), o, "linear_bwd_bias: db length");
    db.fill(0.0);
    for row in dy.chunks_exact(o.max(1)) {
        for (d, g) in db.iter_mut().zip(row) {
            *d += *g;
        }
    }
}

/// Feature-major `y[O,N] = w[O,I] x[I,N]` (overwritten; no bias: see [`bias_act_fm`]).
pub fn linear_fwd_fm(x: &[f32], w: &[f32], n: usize, i: usize, o: usize, y: &mut [f32]) {
    assert_eq!(x.len(), i * n, "linear_fwd_fm: x length");
    assert_eq!(w.len(), o * i, "linear_fwd_fm: w length");
    assert_eq!(y.len(), o * n, "linear_fwd_fm: y length");
    gemm(
        o,
        n,
        i,
        y,
        false,
        MatRef::row_major(w, i),
        MatRef::row_major(x, n),
    );
}

/// Feature-major `dx[I,N] = w[O,I]^T dy[O,N]` (overwritten).
pub fn linear_bwd_input_fm(dy: &[f32], w: &[f32], n: usize, i: usize, o: usize, dx: &mut [f32]) {
    assert_eq!(dy.len(), o * n, "linear_bwd_input_fm: dy length");
    assert_eq!(w.len(), o * i, "linear_bwd_input_fm: w length");
    assert_eq!(dx.len(), i * n, "linear_bwd_input_fm: dx length");
    gemm(
        i,
        n,
        o,
        dx,
        false,
        MatRef::transposed(w, i),
        MatRef::row_major(dy, n),
    );
}

/// Feature-major `dw[O,I] = dy[O,N] x[I,N]^T` (overwritten).
pub fn linear_bwd_weight_fm(dy: &[f32], x: &[f32], n: usize, i: usize, o: usize, dw: &mut [f32]) {
    assert_eq!(dy.len(), o * n, "linear_bwd_weight_fm: dy length");
    assert_eq!(x.len(), i * n, "linear_bwd_weight_fm: x length");
    assert_eq!(dw.len(), o * i, "linear_bwd_weight_fm: dw length");
    gemm(
        o,
        i,
        n,
        dw,
        false,
        MatRef::row_major(dy, n),
        MatRef::transposed(x, n),
    );
}

/// Feature-major `db[O] = sum_n dy[O, n]` (overwritten).
pub fn linear_bwd_bias_fm(dy: &[f32], n: usize, o: usize, db: &mut [f32]) {
    assert_eq!(dy.len(), o * n, "linear_bwd_bias_fm: dy length");
    assert_eq!(db.len(), o, "linear_bwd_bias_fm: db length");
    if n == 0 {
        db.fill(0.0);
        return;
    }
    for (d, row) in db.iter_mut().zip(dy.chunks_exact(n)) {
        *d = sum_lanes(row);
    }
}

/// The epilogue of a feature-major layer, in place on `y[O][N]`: `y[o][..] += b[o]`, then
/// `max(y, 0)` when `relu`.
pub fn bias_act_fm(y: &mut [f32], n: usize, b: Option<&[f32]>, relu: bool) {
    if n == 0 {
        return;
    }
    match (b, relu) {
        (Some(b), true) => {
            for (row, &bv) in y.chunks_exact_mut(n).zip(b) {
                row.iter_mut().for_each(|v| *v = (*v + bv).max(0.0));
            }
        }
        (Some(b), false) => {
            for (row, &bv) in y.chunks_exact_mut(n).zip(b) {
                row.iter_mut().for_each(|v| *v += bv);
            }
        }
        (None, true) => y.iter_mut().for_each(|v| *v = v.max(0.0)),
        (None, false) => {}
    }
}

/// The gradient of a feature-major layer's linear part, `dy[O][N]` (overwritten), from the
/// gradient `g` of its output `y` (`relu`: zero where `y` is not positive). With
/// `batch_major`, `g` and `y` are `[N][O]` (a layer that hands its output to a batch-major
/// consumer, e.g. the loss) and are transposed on the way.
pub fn output_grad_fm(
    g: &[f32],
    y: &[f32],
    n: usize,
    o: usize,
    relu: bool,
    batch_major: bool,
    dy: &mut [f32],
) {
    assert_eq!(g.len(), o * n, "output_grad_fm: g length");
    assert_eq!(dy.len(), o * n, "output_grad_fm: dy length");
    if relu {
        assert_eq!(y.len(), o * n, "output_grad_fm: y length");
    }
    let pick = |gv: f32, yv: f32| if !relu || yv > 0.0 { gv } else { 0.0 };
    if !batch_major {
        if relu {
            for ((d, &gv), &yv) in dy.iter_mut().zip(g).zip(y) {
                *d = pick(gv, yv);
            }
        } else {
            dy.copy_from_slice(g);
        }
        return;
    }
    for s in 0..n {
        for r in 0..o {
            let k = s * o + r;
            dy[r * n + s] = pick(g[k], if relu { y[k] } else { 0.0 });
        }
    }
}
