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
//! GEMM itself is parallel. With several threads the tile count is at least two per thread and
//! a multiple of the thread count (deep layers would otherwise get one or two tiles).
//!
//! Lowering itself (see `im2col`) copies whole rows where it can: stride-1 same-size
//! convolutions and stride-s convolutions on sides divisible by s (through the input's s x s
//! phases) fill each column-matrix row with one shifted copy. Where every output position
//! sees the same subset of kernel taps (3x3 convolutions on 1x1 maps, stride 2 from 2x2 to
//! 1x1: ResNet18's last stage on 32x32 images), only those taps are lowered and multiplied
//! (`TapClass`), a 9x or 2.25x smaller GEMM.
//!
//! Every result depends only on the inputs and the thread count (weight-gradient partial
//! sums are added in a fixed order), so training is bit-reproducible at a fixed thread count.

use rayon::prelude::*;

use crate::im2col::{
    col2im_channel_scratch, col2im_class_channel, im2col_class, im2col_images, padding_share,
    tap_classes, Conv2dGeom, TapClass,
};
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
    /// Tiles whose column matrix (`k` floats per output position) fits [`TILE_FLOATS`].
    fn new(g: &Conv2dGeom) -> Self {
        Self::sized(g, g.k())
    }

    /// Tiles holding `per_col` floats per output position in [`TILE_FLOATS`] (the column
    /// matrix, plus the output tile where the tile keeps its own output).
    fn sized(g: &Conv2dGeom, per_col: usize) -> Self {
        let cols_per_img = (g.oh() * g.ow()).max(1);
        let mut per = (TILE_FLOATS / per_col.max(1) / cols_per_img).clamp(1, g.n.max(1));
        let mut count = g.n.div_ceil(per);
        let threads = rayon::current_num_threads();
        if threads > 1 && g.n >= 2 * threads {
            // At least two tiles per thread (deep layers have few cache-sized tiles; one GEMM
            // split internally keeps the threads busy for less of the time), and a multiple
            // of the thread count so every thread gets as many equal tiles (7 tiles on 2
            // threads would leave one idle for a seventh of the layer).
            let want = count.max(2 * threads).next_multiple_of(threads);
            per = g.n.div_ceil(want);
            count = g.n.div_ceil(per);
        }
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

/// `dst` zero-filled, in parallel for large buffers.
fn par_zero(dst: &mut [f32]) {
    if dst.len() >= 1 << 16 {
        dst.par_chunks_mut(1 << 14).for_each(|c| c.fill(0.0));
    } else {
        dst.fill(0.0);
    }
}

/// `dst += partials[0] + partials[1] + ...`, each element summed in that order (parallel
/// over blocks of elements, so the result does not depend on the split).
fn add_in_order(dst: &mut [f32], partials: &[Vec<f32>]) {
    const BLOCK: usize = 1 << 14;
    let add = |(b, d): (usize, &mut [f32])| {
        for p in partials {
            for (x, y) in d.iter_mut().zip(&p[b * BLOCK..]) {
                *x += *y;
            }
        }
    };
    if partials.is_empty() {
        return;
    }
    if dst.len() >= 1 << 16 {
        dst.par_chunks_mut(BLOCK).enumerate().for_each(add);
    } else {
        dst.chunks_mut(BLOCK).enumerate().for_each(add);
    }
}

/// The forward product of one image tile: lowers images `n0..n1` into `col` (`k x pt`
/// floats) and writes `w x col` to the `oc` rows of `pt` floats at `dst`, row stride `dst_rs`.
///
/// # Safety
/// `dst + r·dst_rs .. + pt` must be writable for every row `r < oc` and not accessed by
/// anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_tile(
    x: &[f32],
    w: &[f32],
    g: &Conv2dGeom,
    (n0, n1): (usize, usize),
    col: &mut [f32],
    dst: *mut f32,
    dst_rs: usize,
    par: bool,
) {
    let (k, pt) = (g.k(), (n1 - n0) * g.oh() * g.ow());
    im2col_images(x, g, n0, n1, col);
    // SAFETY: the caller's contract for `dst`; `w`/`col` are reads of `oc x k` and `k x pt`
    // elements.
    unsafe {
        gemm_ptr(
            g.oc,
            pt,
            k,
            dst,
            dst_rs as isize,
            false,
            (w.as_ptr(), k as isize, 1),
            (col.as_ptr(), pt as isize, 1),
            par,
        );
    }
}

/// Whether this geometry needs an explicit im2col buffer (`false` for 1x1, stride 1, pad 0,
/// where the input itself is the column matrix).
pub fn needs_im2col(g: &Conv2dGeom) -> bool {
    !(g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0)
}

/// A 1x1 convolution with stride > 1 and no padding (a ResNet shortcut) is the stride-1 one
/// of its subsampled input (its im2col): that geometry. In the forward pass one subsampling
/// copy and one parallel GEMM over the whole batch replace im2col tiles (ResNet18's
/// shortcuts, 2 threads, `examples/dense_conv_parts`: 0.66 -> 0.48 ms at 32 px batch 256 on
/// layer2, 2.15 -> 1.76 at 128 px batch 64); the gradients keep the tiles (one GEMM with the
/// whole batch as its sum, or a scatter of the subsampled input gradient, measured slower).
fn pointwise_strided(g: &Conv2dGeom) -> Option<Conv2dGeom> {
    (g.kh == 1 && g.kw == 1 && g.pad == 0 && g.stride > 1).then(|| Conv2dGeom {
        h: g.oh(),
        w: g.ow(),
        stride: 1,
        ..*g
    })
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

/// [`conv2d_fwd_affine`] followed by the max pool `pool` (over the convolution's `OC x N`
/// output planes): `out` is the pooled CNHW output `[OC][N][PH][PW]` (overwritten), the same
/// values as `conv2d_fwd_affine` then [`crate::max_pool2d_fwd`]. A ResNet stem at inference:
/// with few input channels (the direct stem kernel) each group of images is convolved into a
/// cache-sized tile and pooled from there, so the convolution's output, the largest
/// activation of the network, is never written whole; other geometries convolve, then pool.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_fwd_affine_maxpool(
    x: &[f32],
    w: &[f32],
    g: &Conv2dGeom,
    scale: &[f32],
    shift: &[f32],
    relu: bool,
    pool: &crate::pool::MaxPool2dGeom,
    out: &mut [f32],
) {
    check(g);
    let pg = pool;
    assert!(
        pg.validate().is_ok() && (pg.c, pg.n, pg.h, pg.w) == (g.oc, g.n, g.oh(), g.ow()),
        "conv2d_fwd_affine_maxpool: pool {pg:?} is not a valid pool of the {g:?} output"
    );
    assert!(
        scale.len() == g.oc && shift.len() == g.oc,
        "conv2d_fwd_affine_maxpool: scale/shift length"
    );
    assert_eq!(x.len(), g.x_len(), "conv2d_fwd_affine_maxpool: x length");
    assert_eq!(
        w.len(),
        g.w_len(),
        "conv2d_fwd_affine_maxpool: weight length"
    );
    assert_eq!(
        out.len(),
        pg.out_len(),
        "conv2d_fwd_affine_maxpool: out length"
    );
    if class_plan(g).is_none() && crate::stem::applies(g) {
        crate::stem::forward_maxpool(x, w, g, Some((scale, shift, relu)), pg, out);
        return;
    }
    let mut conv = vec![0f32; g.out_len()];
    conv2d_fwd_epilogue(x, w, g, Some((scale, shift, relu)), &mut conv);
    let mut idx = vec![0u32; pg.out_len()];
    crate::pool::max_pool2d_fwd(&conv, pg, out, &mut idx);
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
    if let Some(gs) = pointwise_strided(g) {
        // For a 1x1 kernel the column matrix `[C][N·OH·OW]` is the subsampled input.
        let mut xs = Vec::with_capacity(gs.x_len());
        // SAFETY: f32 has no invalid bit patterns, and `im2col` overwrites every element of
        // its `g.col_len() == gs.x_len()` output before anything reads one.
        #[allow(clippy::uninit_vec)]
        unsafe {
            xs.set_len(gs.x_len())
        };
        crate::im2col::im2col(x, g, &mut xs);
        conv2d_fwd_epilogue(&xs, w, &gs, affine, out);
        return;
    }
    if let Some(classes) = class_plan(g) {
        fwd_classes(x, w, g, &classes, affine, out);
        return;
    }
    if crate::stem::applies(g) {
        crate::stem::forward(x, w, g, affine, out);
        return;
    }
    let (k, p, ohow) = (g.k(), g.p(), g.oh() * g.ow());
    let outp = SendPtr(out.as_mut_ptr());
    Tiles::new(g).run(|n0, n1, par, buf| {
        let pt = (n1 - n0) * ohow;
        let col = scratch(buf, k * pt);
        // SAFETY: the tile writes columns n0*ohow..n1*ohow of each of the `oc` rows of `out`
        // (row stride p), in bounds and disjoint from every other tile.
        unsafe { forward_tile(x, w, g, (n0, n1), col, outp.get().add(n0 * ohow), p, par) };
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
    if let Some(classes) = class_plan(g) {
        bwd_weight_classes(x, dout, g, &classes, dw);
        return;
    }
    if crate::stem::applies(g) {
        crate::stem::bwd_weight(x, dout, g, dw);
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
    par_zero(dw);
    if tiles.parallel {
        // Fixed groups of consecutive tiles, each summed serially, then the groups in order:
        // the result depends only on the thread count, never on work stealing (rayon's
        // fold/reduce would split adaptively and change the summation order run to run).
        // Group 0 sums straight into `dw`, the others into partial buffers.
        let groups = rayon::current_num_threads().clamp(1, tiles.count);
        let group = |gi: usize, acc: &mut [f32]| {
            let (t0, t1) = (tiles.count * gi / groups, tiles.count * (gi + 1) / groups);
            let mut buf = Vec::new();
            for t in t0..t1 {
                let (n0, n1) = tiles.range(t);
                tile_into(n0, n1, false, &mut buf, acc);
            }
        };
        let ((), partials) = rayon::join(
            || group(0, dw),
            || {
                (1..groups)
                    .into_par_iter()
                    .map(|gi| {
                        let mut acc = vec![0.0f32; g.w_len()];
                        group(gi, &mut acc);
                        acc
                    })
                    .collect::<Vec<_>>()
            },
        );
        add_in_order(dw, &partials);
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
    if let Some(classes) = class_plan(g) {
        bwd_input_classes(w, dout, g, &classes, dx);
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
        let channel = |(c, rows): (usize, &mut [f32])| {
            // SAFETY: images n0..n1 of channel c occupy this range of `dx`; tiles cover
            // disjoint image ranges and each channel is handled once per tile.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    dxp.get().add((c * g.n + n0) * plane),
                    (n1 - n0) * plane,
                )
            };
            dst.fill(0.0);
            col2im_channel_scratch(rows, g, n1 - n0, dst);
        };
        let per_channel = (g.kh * g.kw * pt).max(1);
        if par {
            dcol.par_chunks_mut(per_channel)
                .enumerate()
                .for_each(channel);
        } else {
            dcol.chunks_mut(per_channel).enumerate().for_each(channel);
        }
    });
}

/// Column matrices with at least this share of padding zeros are lowered per [`TapClass`].
const CLASS_MIN_PADDING: f64 = 0.25;

/// The tap classes of `g` if lowering per class pays (see [`TapClass`]), else `None`.
///
/// At ResNet18's shapes: with a single class (every output position sees the same taps: 3x3
/// convolutions on 1x1 maps, or stride 2 from 2x2 to 1x1) the GEMMs shrink 9x or 2.25x and
/// the layer runs correspondingly faster. With several classes
/// (2x2 or 4x4 maps, 56 % or 31 % padding) the per-class GEMMs are too narrow and the
/// weight gathers too many: no faster than the plain lowering, so those keep it.
fn class_plan(g: &Conv2dGeom) -> Option<Vec<TapClass>> {
    if !needs_im2col(g) || g.p() == 0 {
        return None;
    }
    let classes = tap_classes(g);
    (classes.len() == 1 && padding_share(g, &classes) >= CLASS_MIN_PADDING).then_some(classes)
}

/// The columns of `w` `[OC][C*KH*KW]` at one class's taps: `[OC][C*TI*TJ]`, ordered as the
/// rows of [`im2col_class`].
fn class_weight(w: &[f32], g: &Conv2dGeom, cls: &TapClass) -> Vec<f32> {
    let (k, kc) = (g.k(), g.c * cls.taps());
    let mut v = vec![0.0f32; g.oc * kc];
    let gather = |(oc, dst): (usize, &mut [f32])| {
        let mut d = dst.iter_mut();
        for c in 0..g.c {
            for i in cls.ti.0..cls.ti.1 {
                let row = oc * k + (c * g.kh + i) * g.kw;
                // The source first: `zip` then stops without taking a destination element.
                for (s, d) in w[row + cls.tj.0..row + cls.tj.1].iter().zip(&mut d) {
                    *d = *s;
                }
            }
        }
    };
    if kc == 0 {
        return v;
    }
    if v.len() >= 1 << 16 {
        v.par_chunks_mut(kc).enumerate().for_each(gather);
    } else {
        v.chunks_mut(kc).enumerate().for_each(gather);
    }
    v
}

/// Contiguous image ranges, one per thread, each cut into chunks whose largest class column
/// matrix stays near the cache-sized tile target.
struct Parts {
    count: usize,
    chunk: usize,
    n: usize,
}

impl Parts {
    fn new(g: &Conv2dGeom, classes: &[TapClass]) -> Self {
        let per_img = classes
            .iter()
            .map(|c| g.c * c.taps() * c.positions())
            .max()
            .unwrap_or(0)
            .max(1);
        Parts {
            count: rayon::current_num_threads().clamp(1, g.n.max(1)),
            chunk: (TILE_FLOATS / per_img).max(1),
            n: g.n,
        }
    }
    /// Images of part `i`.
    fn range(&self, i: usize) -> (usize, usize) {
        (self.n * i / self.count, self.n * (i + 1) / self.count)
    }
    /// `f(part) -> R` for every part, in parallel when there are several; results in order.
    fn map<R: Send>(&self, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
        if self.count > 1 {
            (0..self.count).into_par_iter().map(&f).collect()
        } else {
            vec![f(0)]
        }
    }
    /// The chunks `(n0, n1)` of part `i`.
    fn chunks(&self, i: usize) -> impl Iterator<Item = (usize, usize)> {
        let (a, b) = self.range(i);
        let chunk = self.chunk;
        (a..b).step_by(chunk).map(move |s| (s, (s + chunk).min(b)))
    }
}

/// For images `n0..n1` and one class: calls `f(row, q, off)` for every output channel row
/// `row` with the class-matrix column `q` of the first of `len` consecutive positions, whose
/// offset in the CNHW output row is `off`.
fn for_class_runs(
    g: &Conv2dGeom,
    cls: &TapClass,
    n0: usize,
    n1: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    let ohow = g.oh() * g.ow();
    let nx = cls.ox.1 - cls.ox.0;
    let mut q = 0;
    for n in n0..n1 {
        for oy in cls.oy.0..cls.oy.1 {
            f(q, n * ohow + oy * g.ow() + cls.ox.0, nx);
            q += nx;
        }
    }
}

/// Forward per tap class: each class's GEMM into a scratch matrix, optional affine + ReLU
/// on its rows, then scattered to the class's output positions.
fn fwd_classes(
    x: &[f32],
    w: &[f32],
    g: &Conv2dGeom,
    classes: &[TapClass],
    affine: Option<(&[f32], &[f32], bool)>,
    out: &mut [f32],
) {
    let p = g.p();
    let wc: Vec<Vec<f32>> = classes.iter().map(|c| class_weight(w, g, c)).collect();
    let parts = Parts::new(g, classes);
    let outp = SendPtr(out.as_mut_ptr());
    parts.map(|part| {
        let (mut cbuf, mut tbuf) = (Vec::new(), Vec::new());
        for (n0, n1) in parts.chunks(part) {
            for (cls, wcl) in classes.iter().zip(&wc) {
                let (kc, cols) = (g.c * cls.taps(), (n1 - n0) * cls.positions());
                let tmp = scratch(&mut tbuf, g.oc * cols);
                if kc == 0 {
                    // Every tap of these positions falls into the padding.
                    tmp.fill(0.0);
                } else {
                    let col = scratch(&mut cbuf, kc * cols);
                    im2col_class(x, g, cls, n0, n1, col);
                    // SAFETY: `tmp` is an exclusively borrowed `oc x cols` buffer; `wcl` is
                    // `oc x kc` and `col` is `kc x cols`, both read in bounds.
                    unsafe {
                        gemm_ptr(
                            g.oc,
                            cols,
                            kc,
                            tmp.as_mut_ptr(),
                            cols as isize,
                            false,
                            (wcl.as_ptr(), kc as isize, 1),
                            (col.as_ptr(), cols as isize, 1),
                            false,
                        );
                    }
                }
                for (oc, row) in tmp.chunks_exact_mut(cols.max(1)).enumerate() {
                    if let Some((scale, shift, relu)) = affine {
                        crate::batchnorm::row_affine_inplace(row, scale[oc], shift[oc], relu);
                    }
                    for_class_runs(g, cls, n0, n1, |q, off, len| {
                        // SAFETY: positions of images n0..n1 in this class: in bounds of
                        // `out`, written by this part only (parts own disjoint images).
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(outp.get().add(oc * p + off), len)
                        };
                        dst.copy_from_slice(&row[q..q + len]);
                    });
                }
            }
        }
    });
}

/// Input gradient per tap class: gather the class's output-gradient columns, `W_c^T x
/// dout_c`, scatter-add onto the part's images of `dx` (zeroed first).
fn bwd_input_classes(
    w: &[f32],
    dout: &[f32],
    g: &Conv2dGeom,
    classes: &[TapClass],
    dx: &mut [f32],
) {
    let (p, plane) = (g.p(), g.h * g.w);
    let wc: Vec<Vec<f32>> = classes.iter().map(|c| class_weight(w, g, c)).collect();
    let parts = Parts::new(g, classes);
    let dxp = SendPtr(dx.as_mut_ptr());
    parts.map(|part| {
        let (a, b) = parts.range(part);
        let channel = |c: usize, n0: usize, n1: usize| {
            // SAFETY: images n0..n1 (within this part's a..b) of channel c: in bounds of
            // `dx`; parts own disjoint image ranges, and this part handles its own serially.
            unsafe {
                std::slice::from_raw_parts_mut(
                    dxp.get().add((c * g.n + n0) * plane),
                    (n1 - n0) * plane,
                )
            }
        };
        for c in 0..g.c {
            channel(c, a, b).fill(0.0);
        }
        let (mut dbuf, mut tbuf) = (Vec::new(), Vec::new());
        for (n0, n1) in parts.chunks(part) {
            for (cls, wcl) in classes.iter().zip(&wc) {
                let (kc, cols) = (g.c * cls.taps(), (n1 - n0) * cls.positions());
                if kc == 0 || cols == 0 {
                    continue;
                }
                let tmp = scratch(&mut tbuf, g.oc * cols);
                for (oc, row) in tmp.chunks_exact_mut(cols).enumerate() {
                    for_class_runs(g, cls, n0, n1, |q, off, len| {
                        row[q..q + len].copy_from_slice(&dout[oc * p + off..oc * p + off + len]);
                    });
                }
                let dcol = scratch(&mut dbuf, kc * cols);
                // SAFETY: `dcol` is an exclusively borrowed `kc x cols` buffer; `wcl` read
                // as its transpose (`kc x oc`) and `tmp` (`oc x cols`) are in bounds.
                unsafe {
                    gemm_ptr(
                        kc,
                        cols,
                        g.oc,
                        dcol.as_mut_ptr(),
                        cols as isize,
                        false,
                        (wcl.as_ptr(), 1, kc as isize),
                        (tmp.as_ptr(), cols as isize, 1),
                        false,
                    );
                }
                for c in 0..g.c {
                    col2im_class_channel(dcol, g, cls, c, n1 - n0, channel(c, n0, n1));
                }
            }
        }
    });
}

/// Weight gradient per tap class: per part and class `dout_c x col_c^T` accumulated over the
/// part's chunks, then the parts added in order into `dw` (zero at taps no position uses).
/// The summation order depends only on the thread count.
fn bwd_weight_classes(
    x: &[f32],
    dout: &[f32],
    g: &Conv2dGeom,
    classes: &[TapClass],
    dw: &mut [f32],
) {
    let p = g.p();
    let parts = Parts::new(g, classes);
    let partials: Vec<Vec<Vec<f32>>> = parts.map(|part| {
        let mut acc: Vec<Vec<f32>> = classes
            .iter()
            .map(|c| vec![0.0f32; g.oc * g.c * c.taps()])
            .collect();
        let (mut cbuf, mut tbuf) = (Vec::new(), Vec::new());
        for (n0, n1) in parts.chunks(part) {
            for (cls, a) in classes.iter().zip(acc.iter_mut()) {
                let (kc, cols) = (g.c * cls.taps(), (n1 - n0) * cls.positions());
                if kc == 0 || cols == 0 {
                    continue;
                }
                let tmp = scratch(&mut tbuf, g.oc * cols);
                for (oc, row) in tmp.chunks_exact_mut(cols).enumerate() {
                    for_class_runs(g, cls, n0, n1, |q, off, len| {
                        row[q..q + len].copy_from_slice(&dout[oc * p + off..oc * p + off + len]);
                    });
                }
                let col = scratch(&mut cbuf, kc * cols);
                im2col_class(x, g, cls, n0, n1, col);
                // SAFETY: `a` is an exclusively borrowed `oc x kc` buffer; `tmp` (`oc x
                // cols`) and `col` read as its transpose (`cols x kc`) are in bounds.
                unsafe {
                    gemm_ptr(
                        g.oc,
                        kc,
                        cols,
                        a.as_mut_ptr(),
                        kc as isize,
                        true,
                        (tmp.as_ptr(), cols as isize, 1),
                        (col.as_ptr(), 1, cols as isize),
                        false,
                    );
                }
            }
        }
        acc
    });
    // Per output channel (in parallel): zero, then the parts' class sums in order.
    let row = |(oc, dst): (usize, &mut [f32])| {
        dst.fill(0.0);
        for acc in &partials {
            for (cls, a) in classes.iter().zip(acc) {
                let (kc, nj) = (g.c * cls.taps(), cls.tj.1 - cls.tj.0);
                if kc == 0 {
                    continue;
                }
                let mut src = a[oc * kc..(oc + 1) * kc].chunks_exact(nj);
                for c in 0..g.c {
                    for i in cls.ti.0..cls.ti.1 {
                        let (Some(s), at) = (src.next(), (c * g.kh + i) * g.kw) else {
                            continue;
                        };
                        for (d, s) in dst[at + cls.tj.0..at + cls.tj.1].iter_mut().zip(s) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    };
    let k = g.k().max(1);
    if dw.len() >= 1 << 16 {
        dw.par_chunks_mut(k).enumerate().for_each(row);
    } else {
        dw.chunks_mut(k).enumerate().for_each(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::im2col::im2col;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Direct convolution and both gradients by definition, in f64.
    fn reference(
        x: &[f32],
        w: &[f32],
        dout: &[f32],
        g: &Conv2dGeom,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (oh, ow) = (g.oh(), g.ow());
        let mut out = vec![0.0; g.out_len()];
        let mut dx = vec![0.0; g.x_len()];
        let mut dw = vec![0.0; g.w_len()];
        for oc in 0..g.oc {
            for n in 0..g.n {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let o = ((oc * g.n + n) * oh + oy) * ow + ox;
                        for c in 0..g.c {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let iy = (oy * g.stride + i) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + j) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((c * g.n + n) * g.h + iy as usize) * g.w + ix as usize;
                                    let wi = ((oc * g.c + c) * g.kh + i) * g.kw + j;
                                    out[o] += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += dout[o] as f64 * w[wi] as f64;
                                    dw[wi] += dout[o] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (out, dx, dw)
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what}[{i}]: got {a}, want {b}"
            );
        }
    }

    fn geom(
        c: usize,
        n: usize,
        h: usize,
        oc: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Conv2dGeom {
        Conv2dGeom {
            c,
            n,
            h,
            w: h,
            oc,
            kh: k,
            kw: k,
            stride,
            pad,
        }
    }

    #[test]
    fn tap_classes_of_small_maps_are_counted_by_hand() {
        // 3x3, padding 1 on a 1x1 map: one position, only the centre tap.
        let g = geom(4, 2, 1, 3, 3, 1, 1);
        let cl = tap_classes(&g);
        assert_eq!(cl.len(), 1);
        assert_eq!((cl[0].ti, cl[0].tj), ((1, 2), (1, 2)));
        assert!((padding_share(&g, &cl) - 8.0 / 9.0).abs() < 1e-12);
        assert!(class_plan(&g).is_some());
        // Stride 2 from 2x2 to 1x1: taps 1..3 on both axes, 5 of 9 are padding.
        let g = geom(4, 2, 2, 3, 3, 2, 1);
        let cl = tap_classes(&g);
        assert_eq!(cl.len(), 1);
        assert_eq!((cl[0].ti, cl[0].tj), ((1, 3), (1, 3)));
        assert!((padding_share(&g, &cl) - 5.0 / 9.0).abs() < 1e-12);
        // 2x2 map, stride 1: rows 0 and 1 see taps 1..3 and 0..2, so 4 classes of one
        // position with 4 taps each (5/9 padding): left to the plain lowering.
        let g = geom(4, 2, 2, 3, 3, 1, 1);
        let cl = tap_classes(&g);
        assert_eq!(cl.len(), 4);
        assert!(cl.iter().all(|c| c.positions() == 1 && c.taps() == 4));
        assert!(class_plan(&g).is_none());
        assert!(crate::im2col::is_phased(&geom(3, 1, 12, 4, 7, 2, 3)));
        assert!(crate::im2col::is_phased(&geom(3, 1, 9, 4, 3, 3, 1)));
        assert!(!crate::im2col::is_phased(&geom(3, 1, 11, 4, 7, 2, 3)));
        assert!(crate::im2col::is_shifted(&geom(3, 1, 5, 4, 5, 1, 2)));
        assert!(!crate::im2col::is_shifted(&geom(3, 1, 5, 4, 3, 1, 0)));
        // 8x8, 3x3, padding 1: 3 row runs x 3 column runs; 1 - (22/24)^2 padding.
        let g = geom(4, 2, 8, 3, 3, 1, 1);
        let cl = tap_classes(&g);
        assert_eq!(cl.len(), 9);
        let want = 1.0 - (22.0f64 / 24.0).powi(2);
        assert!((padding_share(&g, &cl) - want).abs() < 1e-12);
        // Padding wider than the kernel reach: the outer positions see no tap at all.
        let g = geom(1, 1, 1, 1, 2, 1, 2);
        let cl = tap_classes(&g);
        assert!(cl.iter().any(|c| c.taps() == 0));
    }

    /// The per-class and shifted-row lowerings (and the plain one) against the definition, at
    /// 1 and 3 threads (parts and tiles split differently), and bitwise repeatable.
    #[test]
    fn lowerings_match_definition_at_any_thread_count() {
        let geoms = [
            geom(6, 7, 1, 5, 3, 1, 1),  // 1x1 map: centre tap only (class path)
            geom(6, 7, 2, 5, 3, 2, 1),  // 2x2 -> 1x1, stride 2 (class path, 4 taps)
            geom(5, 9, 2, 4, 3, 1, 1),  // 2x2 map: several classes, plain path
            geom(5, 9, 6, 4, 3, 1, 1),  // shifted rows (stride 1, same size)
            geom(3, 5, 9, 4, 5, 1, 2),  // shifted rows, 5x5 kernel
            geom(3, 9, 11, 4, 7, 2, 3), // stem-like, stride 2, odd side: strided gathers
            geom(3, 5, 12, 4, 7, 2, 3), // stem-like, even side: phases
            geom(4, 5, 8, 3, 3, 2, 1),  // 3x3 stride 2 on 8x8: phases
            geom(4, 5, 8, 3, 1, 2, 0),  // 1x1 stride-2 shortcut: one phase
            geom(2, 3, 9, 3, 3, 3, 1),  // stride 3 on 9x9: 3x3 phases
            geom(1, 2, 1, 2, 2, 1, 2),  // positions with no valid tap
        ];
        for g in geoms {
            let x = values(g.x_len(), 1);
            let w = values(g.w_len(), 2);
            let dout = values(g.out_len(), 3);
            let (out_ref, dx_ref, dw_ref) = reference(&x, &w, &dout, &g);
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                let run = || {
                    pool.install(|| {
                        let mut out = vec![f32::NAN; g.out_len()];
                        let mut dx = vec![f32::NAN; g.x_len()];
                        let mut dw = vec![f32::NAN; g.w_len()];
                        conv2d_fwd(&x, &w, &g, &mut out);
                        conv2d_bwd_input(&w, &dout, &g, &mut dx);
                        conv2d_bwd_weight(&x, &dout, &g, &mut dw);
                        (out, dx, dw)
                    })
                };
                let (out, dx, dw) = run();
                let what = format!("{g:?} at {threads} threads");
                assert_close(&out, &out_ref, &format!("out {what}"));
                assert_close(&dx, &dx_ref, &format!("dx {what}"));
                assert_close(&dw, &dw_ref, &format!("dw {what}"));
                let again = run();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&again.2), bits(&dw), "dw repeatable, {what}");
                assert_eq!(bits(&again.0), bits(&out), "out repeatable, {what}");
            }
            // The public im2col (shifted or not) agrees with the forward pass through a GEMM.
            let mut col = vec![f32::NAN; g.col_len()];
            im2col(&x, &g, &mut col);
            let mut out = vec![0.0; g.out_len()];
            conv2d_fwd_col(&col, &w, &g, &mut out);
            assert_close(&out, &out_ref, &format!("im2col + gemm {g:?}"));
        }
    }
}
