//! 2-D convolution on CNHW activations as one GEMM over the whole batch: forward, gradient
//! with respect to the input, and gradient with respect to the weights.
//!
//! A 1x1 convolution with stride 1 and no padding needs no im2col at all: the CNHW input *is*
//! the `[K = C][P = N*H*W]` column matrix, so it is used in place (forward, and the input
//! gradient is written straight into `dx`).
//!
//! Otherwise the batch is cut into tiles of whole images whose column matrix fits in the L2
//! cache (about 1.5 MB): each tile is lowered, multiplied and (for the input gradient)
//! scattered back while it is still in cache, tiles running in parallel. This avoids
//! materialising the full `K x P` column matrix (4x the input for 4x4 stride-2 kernels), whose
//! memory traffic otherwise costs about as much as the GEMM itself. With fewer tiles than
//! twice the thread count (small batches of large images) tiles run one after another and the
//! GEMM itself is parallel.

use rayon::prelude::*;

use crate::im2col::{col2im_channel, im2col_images, Conv2dGeom};
use crate::util::{gemm, gemm_ptr, MatRef, SendPtr};

/// Target size of one tile's column matrix, in `f32`s.
const TILE_FLOATS: usize = 384 << 10;

/// Whole-image tiles of the batch.
struct Tiles {
    per: usize,
    count: usize,
    n: usize,
    parallel: bool,
}

impl Tiles {
    fn new(g: &Conv2dGeom) -> Self {
        let cols_per_img = (g.oh() * g.ow()).max(1);
        let per = (TILE_FLOATS / g.k().max(1) / cols_per_img).clamp(1, g.n.max(1));
        let count = g.n.div_ceil(per);
        let threads = rayon::current_num_threads();
        Tiles {
            per,
            count,
            n: g.n,
            parallel: threads > 1 && count >= 2 * threads,
        }
    }
    fn range(&self, t: usize) -> (usize, usize) {
        (t * self.per, ((t + 1) * self.per).min(self.n))
    }
    /// Runs `f(n0, n1, gemm_may_parallelise, scratch)` for every tile.
    fn run(&self, f: impl Fn(usize, usize, bool, &mut Vec<f32>) + Sync) {
        if self.parallel {
            (0..self.count)
                .into_par_iter()
                .for_each_init(Vec::new, |buf, t| {
                    let (a, b) = self.range(t);
                    f(a, b, false, buf)
                });
        } else {
            let mut buf = Vec::new();
            for t in 0..self.count {
                let (a, b) = self.range(t);
                f(a, b, true, &mut buf);
            }
        }
    }
}

fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

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
/// `[OC,N,OH,OW]` (overwritten), lowering cache-sized tiles of images at a time.
pub fn conv2d_fwd(x: &[f32], w: &[f32], g: &Conv2dGeom, out: &mut [f32]) {
    conv2d_fwd_epilogue(x, w, g, None, out);
}

/// [`conv2d_fwd`] followed by a per-channel affine map and optional ReLU,
/// `out[oc] = max(0, conv[oc] * scale[oc] + shift[oc])` (batch normalisation with running
/// statistics folded into `scale`/`shift`, then ReLU), applied to each image tile while it is
/// still in cache: the convolution output is written once instead of written, read and
/// written again. Same values as [`conv2d_fwd`] then `channel_affine`.
pub fn conv2d_fwd_affine(
    x: &[f32],
    w: &[f32],
    g: &Conv2dGeom,
    scale: &[f32],
    shift: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    assert!(
        scale.len() == g.oc && shift.len() == g.oc,
        "conv2d_fwd_affine: scale/shift length"
    );
    conv2d_fwd_epilogue(x, w, g, Some((scale, shift, relu)), out);
}

fn conv2d_fwd_epilogue(
    x: &[f32],
    w: &[f32],
    g: &Conv2dGeom,
    affine: Option<(&[f32], &[f32], bool)>,
    out: &mut [f32],
) {
    check(g);
    assert_eq!(x.len(), g.x_len(), "conv2d_fwd: x length");
    assert_eq!(w.len(), g.w_len(), "conv2d_fwd: weight length");
    assert_eq!(out.len(), g.out_len(), "conv2d_fwd: out length");
    if !needs_im2col(g) {
        conv2d_fwd_col(x, w, g, out);
        if let Some((scale, shift, relu)) = affine {
            crate::batchnorm::channel_affine_inplace(out, scale, shift, relu);
        }
        return;
    }
    let (k, p, ohow) = (g.k(), g.p(), g.oh() * g.ow());
    let outp = SendPtr(out.as_mut_ptr());
    Tiles::new(g).run(|n0, n1, par, buf| {
        let pt = (n1 - n0) * ohow;
        let col = scratch(buf, k * pt);
        im2col_images(x, g, n0, n1, col);
        // SAFETY: the tile writes columns n0*ohow..n1*ohow of each of the `oc` rows of `out`
        // (row stride p), in bounds and disjoint from every other tile; `w`/`col` are reads.
        unsafe {
            gemm_ptr(
                g.oc,
                pt,
                k,
                outp.get().add(n0 * ohow),
                p as isize,
                false,
                (w.as_ptr(), k as isize, 1),
                (col.as_ptr(), pt as isize, 1),
                par,
            );
        }
        if let Some((scale, shift, relu)) = affine {
            for oc in 0..g.oc {
                // SAFETY: the same tile columns as the GEMM above wrote (this tile's own).
                let row = unsafe {
                    std::slice::from_raw_parts_mut(outp.get().add(oc * p + n0 * ohow), pt)
                };
                crate::batchnorm::row_affine_inplace(row, scale[oc], shift[oc], relu);
            }
        }
    });
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
/// output gradient `dout`, re-lowering cache-sized image tiles (partial sums per thread).
pub fn conv2d_bwd_weight(x: &[f32], dout: &[f32], g: &Conv2dGeom, dw: &mut [f32]) {
    check(g);
    assert_eq!(x.len(), g.x_len(), "conv2d_bwd_weight: x length");
    assert_eq!(dout.len(), g.out_len(), "conv2d_bwd_weight: dout length");
    assert_eq!(dw.len(), g.w_len(), "conv2d_bwd_weight: dw length");
    if !needs_im2col(g) {
        conv2d_bwd_weight_col(x, dout, g, dw);
        return;
    }
    let (k, p, ohow) = (g.k(), g.p(), g.oh() * g.ow());
    let tiles = Tiles::new(g);
    // dw_acc += dout[:, tile] x col_tile^T
    let tile_into = |n0: usize, n1: usize, par: bool, buf: &mut Vec<f32>, acc: &mut [f32]| {
        let pt = (n1 - n0) * ohow;
        let col = scratch(buf, k * pt);
        im2col_images(x, g, n0, n1, col);
        // SAFETY: `acc` is an exclusively borrowed `oc x k` buffer; the reads of `dout`
        // (columns n0*ohow..n1*ohow of each row) and `col` are in bounds.
        unsafe {
            gemm_ptr(
                g.oc,
                k,
                pt,
                acc.as_mut_ptr(),
                k as isize,
                true,
                (dout.as_ptr().add(n0 * ohow), p as isize, 1),
                (col.as_ptr(), 1, pt as isize),
                par,
            );
        }
    };
    dw.fill(0.0);
    if tiles.parallel {
        // Fixed groups of consecutive tiles, each summed serially, then the groups in order:
        // the result depends only on the thread count, never on work stealing (rayon's
        // fold/reduce would split adaptively and change the summation order run to run).
        let groups = rayon::current_num_threads().clamp(1, tiles.count);
        let partials: Vec<Vec<f32>> = (0..groups)
            .into_par_iter()
            .map(|gi| {
                let (t0, t1) = (tiles.count * gi / groups, tiles.count * (gi + 1) / groups);
                let (mut acc, mut buf) = (vec![0.0f32; g.w_len()], Vec::new());
                for t in t0..t1 {
                    let (n0, n1) = tiles.range(t);
                    tile_into(n0, n1, false, &mut buf, &mut acc);
                }
                acc
            })
            .collect();
        for p in &partials {
            for (x, y) in dw.iter_mut().zip(p) {
                *x += *y;
            }
        }
    } else {
        let mut buf = Vec::new();
        for t in 0..tiles.count {
            let (n0, n1) = tiles.range(t);
            tile_into(n0, n1, true, &mut buf, dw);
        }
    }
}

/// Input gradient `dx` `[C,N,H,W]` (overwritten) from the weight and the CNHW output gradient:
/// per image tile, `dcol = w^T x dout[:, tile]`, then scatter-add (col2im) into `dx`.
pub fn conv2d_bwd_input(w: &[f32], dout: &[f32], g: &Conv2dGeom, dx: &mut [f32]) {
    check(g);
    assert_eq!(w.len(), g.w_len(), "conv2d_bwd_input: weight length");
    assert_eq!(dout.len(), g.out_len(), "conv2d_bwd_input: dout length");
    assert_eq!(dx.len(), g.x_len(), "conv2d_bwd_input: dx length");
    let (k, p, ohow) = (g.k(), g.p(), g.oh() * g.ow());
    if !needs_im2col(g) {
        gemm(
            k,
            p,
            g.oc,
            dx,
            false,
            MatRef::transposed(w, k),
            MatRef::row_major(dout, p),
        );
        return;
    }
    let plane = g.h * g.w;
    let dxp = SendPtr(dx.as_mut_ptr());
    Tiles::new(g).run(|n0, n1, par, buf| {
        let pt = (n1 - n0) * ohow;
        let dcol = scratch(buf, k * pt);
        // SAFETY: `dcol` is exclusively borrowed `k x pt`; reads of `w` (as W^T) and of the
        // tile's columns of `dout` are in bounds.
        unsafe {
            gemm_ptr(
                k,
                pt,
                g.oc,
                dcol.as_mut_ptr(),
                pt as isize,
                false,
                (w.as_ptr(), 1, k as isize),
                (dout.as_ptr().add(n0 * ohow), p as isize, 1),
                par,
            );
        }
        let dcol = &*dcol;
        let channel = |c: usize| {
            // SAFETY: images n0..n1 of channel c occupy this range of `dx`; tiles cover
            // disjoint image ranges and each channel is handled once per tile.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    dxp.get().add((c * g.n + n0) * plane),
                    (n1 - n0) * plane,
                )
            };
            dst.fill(0.0);
            col2im_channel(dcol, g, c, n1 - n0, dst);
        };
        if par {
            (0..g.c).into_par_iter().for_each(channel);
        } else {
            (0..g.c).for_each(channel);
        }
    });
}
