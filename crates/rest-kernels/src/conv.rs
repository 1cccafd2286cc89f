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
    fn new(g: &Conv2dGeom) -> Self {
        let cols_per_img = (g.oh() * g.ow()).max(1);
        let mut per = (TILE_FLOATS / g.k().max(1) / cols_per_img).clamp(1, g.n.max(1));
        let mut count = g.n.div_ceil(per);
        let threads = rayon::current_num_threads();
        if threads > 1 && count < 2 * threads && g.n >= 2 * threads {
            // Too few cache-sized tiles to keep every thread busy (small feature maps, deep
            // layers): smaller tiles, two per thread, rather than one GEMM split internally.
            per = g.n.div_ceil(2 * threads);
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
    if let Some(classes) = class_plan(g) {
        fwd_classes(x, w, g, &classes, affine, out);
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
    if let Some(classes) = class_plan(g) {
        bwd_weight_classes(x, dout, g, &classes, dw);
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
/// Measured at ResNet18's shapes (batch 64, one thread, CPU time): with a single class (every
/// output position sees the same taps: 3x3 convolutions on 1x1 maps, or stride 2 from 2x2 to
/// 1x1) the GEMMs shrink 9x or 2.25x and the layer runs 2-3x faster. With several classes
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
    let k = g.k();
    let mut v = Vec::with_capacity(g.oc * g.c * cls.taps());
    for oc in 0..g.oc {
        for c in 0..g.c {
            for i in cls.ti.0..cls.ti.1 {
                let row = oc * k + (c * g.kh + i) * g.kw;
                v.extend_from_slice(&w[row + cls.tj.0..row + cls.tj.1]);
            }
        }
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
    dw.fill(0.0);
    let k = g.k();
    for acc in &partials {
        for (cls, a) in classes.iter().zip(acc) {
            let nj = cls.tj.1 - cls.tj.0;
            let mut it = a.chunks_exact(nj.max(1));
            for oc in 0..g.oc {
                for c in 0..g.c {
                    for i in cls.ti.0..cls.ti.1 {
                        let Some(src) = it.next() else { continue };
                        let row = oc * k + (c * g.kh + i) * g.kw;
                        for (d, s) in dw[row + cls.tj.0..row + cls.tj.1].iter_mut().zip(src) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
}
