//! 2-D convolution on CNHW activations as one GEMM over the whole batch: forward, gradient
//! with respect to the input, and gradient with respect to the weights.
//!
//! A 1x1 convolution with stride 1 and no padding needs no im2col at all: the CNHW input *is*
//! the `[K = C][P = N*H*W]` column matrix, so it is used in place (forward, and the input
//! gradient is written straight into `dx`).

use crate::im2col::{col2im, im2col, Conv2dGeom};
use crate::util::{gemm, MatRef};

/// Whether this geometry needs an explicit im2col buffer (`false` for 1x1, stride 1, pad 0,
/// where the input itself is the column matrix).
pub fn needs_im2col(g: &Conv2dGeom) -> bool {
    !(g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0)
}

fn check(g: &Conv2dGeom) {
    assert!(g.validate().is_ok(), "conv2d: invalid geometry {g:?}");
}

/// `out[OC][P] = w[OC][K] x col[K][P]` (CNHW output), given a column matrix built by
/// [`im2col`] (or the input itself when `!needs_im2col(g)`).
pub fn conv2d_fwd_col(col: &[f32], w: &[f32], g: &Conv2dGeom, out: &mut [f32]) {
    check(g);
    assert_eq!(col.len(), g.col_len(), "conv2d_fwd_col: col length");
    assert_eq!(w.len(), g.w_len(), "conv2d_fwd_col: weight length");
    assert_eq!(out.len(), g.out_len(), "conv2d_fwd_col: out length");
    let (k, p) = (g.k(), g.p());
    gemm(
        g.oc,
        p,
        k,
        out,
        false,
        MatRef::row_major(w, k),
        MatRef::row_major(col, p),
    );
}

/// Convolution forward: CNHW `x` `[C,N,H,W]`, weight `[OC,C,KH,KW]` -> CNHW `out`
/// `[OC,N,OH,OW]` (overwritten). Allocates the im2col buffer when one is needed; use
/// [`im2col`] + [`conv2d_fwd_col`] to keep it for the weight gradient.
pub fn conv2d_fwd(x: &[f32], w: &[f32], g: &Conv2dGeom, out: &mut [f32]) {
    check(g);
    assert_eq!(x.len(), g.x_len(), "conv2d_fwd: x length");
    if needs_im2col(g) {
        let mut col = vec![0.0f32; g.col_len()];
        im2col(x, g, &mut col);
        conv2d_fwd_col(&col, w, g, out);
    } else {
        conv2d_fwd_col(x, w, g, out);
    }
}

/// Weight gradient from a column matrix: `dw[OC][K] = dout[OC][P] x col[K][P]^T`
/// (overwritten).
pub fn conv2d_bwd_weight_col(col: &[f32], dout: &[f32], g: &Conv2dGeom, dw: &mut [f32]) {
    check(g);
    assert_eq!(col.len(), g.col_len(), "conv2d_bwd_weight_col: col length");
    assert_eq!(
        dout.len(),
        g.out_len(),
        "conv2d_bwd_weight_col: dout length"
    );
    assert_eq!(dw.len(), g.w_len(), "conv2d_bwd_weight_col: dw length");
    let (k, p) = (g.k(), g.p());
    gemm(
        g.oc,
        k,
        p,
        dw,
        false,
        MatRef::row_major(dout, p),
        MatRef::transposed(col, p),
    );
}

/// Weight gradient `dw` `[OC,C,KH,KW]` (overwritten) from the CNHW input `x` and the CNHW
/// output gradient `dout`; rebuilds the im2col buffer when one is needed.
pub fn conv2d_bwd_weight(x: &[f32], dout: &[f32], g: &Conv2dGeom, dw: &mut [f32]) {
    check(g);
    assert_eq!(x.len(), g.x_len(), "conv2d_bwd_weight: x length");
    if needs_im2col(g) {
        let mut col = vec![0.0f32; g.col_len()];
        im2col(x, g, &mut col);
        conv2d_bwd_weight_col(&col, dout, g, dw);
    } else {
        conv2d_bwd_weight_col(x, dout, g, dw);
    }
}

/// Input gradient `dx` `[C,N,H,W]` (overwritten) from the weight and the CNHW output gradient:
/// `dcol[K][P] = w^T x dout`, then `dx = col2im(dcol)`.
pub fn conv2d_bwd_input(w: &[f32], dout: &[f32], g: &Conv2dGeom, dx: &mut [f32]) {
    check(g);
    assert_eq!(w.len(), g.w_len(), "conv2d_bwd_input: weight length");
    assert_eq!(dout.len(), g.out_len(), "conv2d_bwd_input: dout length");
    assert_eq!(dx.len(), g.x_len(), "conv2d_bwd_input: dx length");
    let (k, p) = (g.k(), g.p());
    let wt = MatRef::transposed(w, k);
    let d = MatRef::row_major(dout, p);
    if needs_im2col(g) {
        let mut dcol = vec![0.0f32; g.col_len()];
        gemm(k, p, g.oc, &mut dcol, false, wt, d);
        dx.fill(0.0);
        col2im(&dcol, g, dx);
    } else {
        gemm(k, p, g.oc, dx, false, wt, d);
    }
}
