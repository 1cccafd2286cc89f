//! Fully-connected layer `y[N,O] = x[N,I] W[O,I]^T (+ b)` and its gradients, as GEMMs.

use crate::util::{gemm, MatRef};

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
