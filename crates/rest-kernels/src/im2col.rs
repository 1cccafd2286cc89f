//! Convolution geometry and the im2col / col2im lowering for CNHW activations.
//!
//! `col[k][p]` with `k = (c*KH + i)*KW + j` and `p = (n*OH + oy)*OW + ox` holds
//! `x[c][n][oy*stride + i - pad][ox*stride + j - pad]` (zero outside the image), so a
//! convolution is `W[OC][K] x col[K][P]`. `col2im` is the exact adjoint (it scatters-adds).

use rayon::prelude::*;
use std::cell::RefCell;

/// Shape of a 2-D convolution over a CNHW input `[c, n, h, w]` with weights `[oc, c, kh, kw]`,
/// the same `stride` and zero padding `pad` on both spatial axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dGeom {
    /// Input channels.
    pub c: usize,
    /// Batch size.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub oc: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes), at least 1.
    pub stride: usize,
    /// Zero padding (both axes).
    pub pad: usize,
}

impl Conv2dGeom {
    /// Output height `(h + 2 pad - kh) / stride + 1` (0 if the kernel does not fit).
    pub fn oh(&self) -> usize {
        out_len(self.h, self.kh, self.stride, self.pad)
    }
    /// Output width `(w + 2 pad - kw) / stride + 1` (0 if the kernel does not fit).
    pub fn ow(&self) -> usize {
        out_len(self.w, self.kw, self.stride, self.pad)
    }
    /// GEMM inner dimension `c * kh * kw` (= weight row length).
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// GEMM column count `n * oh * ow` (= output row length per output channel).
    pub fn p(&self) -> usize {
        self.n * self.oh() * self.ow()
    }
    /// Elements of the CNHW input.
    pub fn x_len(&self) -> usize {
        self.c * self.n * self.h * self.w
    }
    /// Elements of the weight `[oc, c, kh, kw]`.
    pub fn w_len(&self) -> usize {
        self.oc * self.k()
    }
    /// Elements of the CNHW output `[oc, n, oh, ow]`.
    pub fn out_len(&self) -> usize {
        self.oc * self.p()
    }
    /// Elements of the im2col buffer `[k][p]`.
    pub fn col_len(&self) -> usize {
        self.k() * self.p()
    }
    /// Checks that the geometry is usable (stride >= 1, kernel fits the padded input, no zero
    /// dimension); returns a message naming the problem otherwise.
    pub fn validate(&self) -> Result<(), String> {
        if self.stride == 0 {
            return Err("convolution stride must be at least 1".into());
        }
        if self.kh == 0 || self.kw == 0 {
            return Err(format!(
                "kernel size {}x{} has a zero side",
                self.kh, self.kw
            ));
        }
        if self.h + 2 * self.pad < self.kh || self.w + 2 * self.pad < self.kw {
            return Err(format!(
                "kernel {}x{} does not fit input {}x{} with padding {}",
                self.kh, self.kw, self.h, self.w, self.pad
            ));
        }
        Ok(())
    }
}

pub(crate) fn out_len(len: usize, k: usize, stride: usize, pad: usize) -> usize {
    if len + 2 * pad < k || stride == 0 {
        0
    } else {
        (len + 2 * pad - k) / stride + 1
    }
}

/// Range of output positions `o` in `0..out` whose input coordinate `o*stride + off - pad` lies
/// in `0..len` (for kernel offset `off`).
#[inline]
pub(crate) fn valid_range(
    out: usize,
    len: usize,
    stride: usize,
    off: usize,
    pad: usize,
) -> (usize, usize) {
    // o*stride + off >= pad  <=>  o >= ceil((pad - off) / stride)
    let lo = if off >= pad {
        0
    } else {
        (pad - off).div_ceil(stride)
    };
    // o*stride + off - pad <= len - 1  <=>  o <= (len - 1 + pad - off) / stride
    let hi = if len + pad <= off {
        0
    } else {
        ((len - 1 + pad - off) / stride + 1).min(out)
    };
    (lo.min(hi), hi)
}

/// Lowers the CNHW input `x` (`g.x_len()` elements) into `col` (`g.col_len()` elements,
/// overwritten), parallel over the `k` rows.
pub fn im2col(x: &[f32], g: &Conv2dGeom, col: &mut [f32]) {
    assert_eq!(
        x.len(),
        g.x_len(),
        "im2col: x length does not match geometry"
    );
    assert_eq!(
        col.len(),
        g.col_len(),
        "im2col: col length does not match geometry"
    );
    let p = g.p();
    if p == 0 {
        return;
    }
    col.par_chunks_mut(p)
        .enumerate()
        .for_each(|(k, row)| im2col_row(x, g, k, 0, g.n, row));
}

/// Serial im2col of images `n0..n1` only: `col` is `[K][(n1 - n0) * OH * OW]`.
pub(crate) fn im2col_images(x: &[f32], g: &Conv2dGeom, n0: usize, n1: usize, col: &mut [f32]) {
    let pt = (n1 - n0) * g.oh() * g.ow();
    assert_eq!(col.len(), g.k() * pt, "im2col_images: col length");
    if pt == 0 {
        return;
    }
    if is_phased(g) {
        im2col_phased(x, g, n0, n1, col);
        return;
    }
    for (k, row) in col.chunks_exact_mut(pt).enumerate() {
        im2col_row(x, g, k, n0, n1, row);
    }
}

/// Whether `g` has stride `s >= 2`, input sides divisible by `s` and output `H/s x W/s` (the
/// 7x7 stride-2 stem, 3x3 and 1x1 stride-2 convolutions on even sizes). Splitting the input
/// into its `s x s` phases (`x[s*y + py][s*x + px]`), each of exactly the output's size, turns
/// every column-matrix row into a shifted copy of one phase, as for [`is_shifted`], instead
/// of a strided gather of a few floats per output row.
pub(crate) fn is_phased(g: &Conv2dGeom) -> bool {
    let s = g.stride;
    s >= 2
        && g.h.is_multiple_of(s)
        && g.w.is_multiple_of(s)
        && g.oh() == g.h / s
        && g.ow() == g.w / s
        && g.h * g.w > 0
}

/// For a phased geometry and the kernel offset `t` along an axis: the phase `t - pad` falls
/// in and the shift within that phase (`floor((t - pad) / s)`).
fn phase_of(t: usize, pad: usize, s: usize) -> (usize, isize) {
    let a = t as isize - pad as isize;
    (a.rem_euclid(s as isize) as usize, a.div_euclid(s as isize))
}

/// [`im2col_images`] for a phased geometry: the tile's input split into phases
/// `[C][s][s][images][OH][OW]`, then one shifted copy per row.
fn im2col_phased(x: &[f32], g: &Conv2dGeom, n0: usize, n1: usize, col: &mut [f32]) {
    let (s, nimg) = (g.stride, n1 - n0);
    let (oh, ow, plane) = (g.oh(), g.ow(), g.h * g.w);
    let block = nimg * oh * ow;
    // Only the phases some tap reads (a 1x1 stride-2 kernel reads one of four).
    let used = |k: usize, p: usize| (0..k).any(|t| phase_of(t, g.pad, s).0 == p);
    let rows: Vec<usize> = (0..s).filter(|&p| used(g.kh, p)).collect();
    let cols: Vec<usize> = (0..s).filter(|&p| used(g.kw, p)).collect();
    let mut ph = vec![0.0f32; g.c * s * s * block];
    for c in 0..g.c {
        for n in n0..n1 {
            let img = &x[(c * g.n + n) * plane..(c * g.n + n + 1) * plane];
            for &py in &rows {
                for &px in &cols {
                    let at = ((c * s + py) * s + px) * block + (n - n0) * oh * ow;
                    let dst = &mut ph[at..at + oh * ow];
                    for (y, d) in dst.chunks_exact_mut(ow).enumerate() {
                        let src = &img[(y * s + py) * g.w + px..];
                        for (d, v) in d.iter_mut().zip(src.iter().step_by(s)) {
                            *d = *v;
                        }
                    }
                }
            }
        }
    }
    for (k, row) in col.chunks_exact_mut(block).enumerate() {
        let (i, j, c) = ((k / g.kw) % g.kh, k % g.kw, k / (g.kw * g.kh));
        let ((py, ay), (px, ax)) = (phase_of(i, g.pad, s), phase_of(j, g.pad, s));
        let at = ((c * s + py) * s + px) * block;
        shifted_copy(&ph[at..at + block], ay, ax, oh, ow, row);
    }
}

/// Whether `g` is a stride-1 convolution whose output has the input's size (3x3 with
/// padding 1, ...). Then a column-matrix row over whole images is the channel's images
/// shifted by one offset: `row[q] = x[q + (i - pad) * W + (j - pad)]` except at padding
/// positions, so lowering is one long copy plus zeroing of the border, instead of one short
/// copy per output row (8 floats at 8x8).
pub(crate) fn is_shifted(g: &Conv2dGeom) -> bool {
    g.stride == 1 && g.oh() == g.h && g.ow() == g.w && g.h * g.w > 0
}

/// For rows over whole `oh x ow` planes read with offset `(ay, ax)`: the flat offset from a
/// row entry to its source, and the range of row entries `q0..q1` (of `len`) whose source
/// index stays inside the planes; entries outside it are padding positions.
fn shift_span(ay: isize, ax: isize, ow: usize, len: usize) -> (isize, usize, usize) {
    let shift = ay * ow as isize + ax;
    let q0 = (-shift).clamp(0, len as isize) as usize;
    let q1 = (len as isize - shift).clamp(q0 as isize, len as isize) as usize;
    (shift, q0, q1)
}

/// The positions `lo..hi` of `0..len` whose shifted coordinate `o + a` lies in `0..len`.
fn shifted_valid(a: isize, len: usize) -> (usize, usize) {
    let lo = (-a).clamp(0, len as isize) as usize;
    let hi = (len as isize - a).clamp(lo as isize, len as isize) as usize;
    (lo, hi)
}

/// The padding positions of one plane for one offset: `((ay, ax, oh, ow), positions)`.
type PaddingList = ((isize, isize, usize, usize), Vec<u32>);

/// Zeroes the entries of a row over whole `oh x ow` planes read with offset `(ay, ax)` whose
/// source pixel `(oy + ay, ox + ax)` lies outside the plane (in the padding).
fn zero_padding_positions(ay: isize, ax: isize, oh: usize, ow: usize, row: &mut [f32]) {
    let (y_lo, y_hi) = shifted_valid(ay, oh);
    let (x_lo, x_hi) = shifted_valid(ax, ow);
    let plane = oh * ow;
    if plane == 0 || (y_lo == 0 && y_hi == oh && x_lo == 0 && x_hi == ow) {
        return;
    }
    // The padding positions of one plane, listed once per (offset, plane) and thread, and
    // stored to image by image: a few dozen scattered floats per plane, where a `fill` per
    // border row or column would be a `memset` call for one to eight floats. (Listing them
    // for every row took a large share of ResNet18's step at 128 px, one image per tile.)
    thread_local! {
        static LISTS: RefCell<Vec<PaddingList>> = const { RefCell::new(Vec::new()) };
    }
    LISTS.with(|lists| {
        let mut lists = lists.borrow_mut();
        let key = (ay, ax, oh, ow);
        let i = match lists.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                if lists.len() >= 64 {
                    lists.clear();
                }
                let mut at = Vec::with_capacity(plane - (y_hi - y_lo) * (x_hi - x_lo));
                for y in 0..oh {
                    if y < y_lo || y >= y_hi {
                        at.extend((y * ow..(y + 1) * ow).map(|i| i as u32));
                    } else {
                        at.extend((0..x_lo).chain(x_hi..ow).map(|x| (y * ow + x) as u32));
                    }
                }
                lists.push((key, at));
                lists.len() - 1
            }
        };
        let at = &lists[i].1;
        for img in row.chunks_exact_mut(plane) {
            for &i in at {
                img[i as usize] = 0.0;
            }
        }
    });
}

/// `row[q] = src[q + ay * ow + ax]` over whole `oh x ow` planes (`src` and `row` the same
/// length), zero where `(oy + ay, ox + ax)` leaves the plane.
fn shifted_copy(src: &[f32], ay: isize, ax: isize, oh: usize, ow: usize, row: &mut [f32]) {
    let (shift, q0, q1) = shift_span(ay, ax, ow, row.len());
    row[..q0].fill(0.0);
    row[q1..].fill(0.0);
    if q1 > q0 {
        let s0 = (q0 as isize + shift) as usize;
        row[q0..q1].copy_from_slice(&src[s0..s0 + (q1 - q0)]);
    }
    zero_padding_positions(ay, ax, oh, ow, row);
}

/// Row `k` of the column matrix for images `n0..n1` (`row` has `(n1 - n0) * OH * OW` entries).
#[inline]
fn im2col_row(x: &[f32], g: &Conv2dGeom, k: usize, n0: usize, n1: usize, row: &mut [f32]) {
    if is_shifted(g) {
        let (i, j, c) = ((k / g.kw) % g.kh, k % g.kw, k / (g.kw * g.kh));
        let plane = g.h * g.w;
        let src = &x[(c * g.n + n0) * plane..(c * g.n + n1) * plane];
        let (ay, ax) = (i as isize - g.pad as isize, j as isize - g.pad as isize);
        shifted_copy(src, ay, ax, g.h, g.w, row);
        return;
    }
    let (oh, ow) = (g.oh(), g.ow());
    let plane = g.h * g.w;
    let j = k % g.kw;
    let i = (k / g.kw) % g.kh;
    let c = k / (g.kw * g.kh);
    let (x_lo, x_hi) = valid_range(ow, g.w, g.stride, j, g.pad);
    let (y_lo, y_hi) = valid_range(oh, g.h, g.stride, i, g.pad);
    // Short rows: one vector gather per output row (zeros included).
    let fast = if g.stride > 1 || ow < 16 {
        crate::gather::RowGather::new(ow, g.w, g.stride, j, g.pad)
    } else {
        None
    };
    for n in n0..n1 {
        let src = &x[(c * g.n + n) * plane..(c * g.n + n + 1) * plane];
        let dst_img = &mut row[(n - n0) * oh * ow..(n - n0 + 1) * oh * ow];
        for oy in 0..oh {
            let dst = &mut dst_img[oy * ow..(oy + 1) * ow];
            if oy < y_lo || oy >= y_hi {
                dst.fill(0.0);
                continue;
            }
            let iy = oy * g.stride + i - g.pad;
            let src_row = &src[iy * g.w..(iy + 1) * g.w];
            if let Some(plan) = &fast {
                plan.apply(src_row, dst);
                continue;
            }
            dst[..x_lo].fill(0.0);
            dst[x_hi..].fill(0.0);
            if x_hi > x_lo {
                let ix0 = x_lo * g.stride + j - g.pad;
                if g.stride == 1 {
                    dst[x_lo..x_hi].copy_from_slice(&src_row[ix0..ix0 + (x_hi - x_lo)]);
                } else {
                    for (d, s) in dst[x_lo..x_hi]
                        .iter_mut()
                        .zip(src_row[ix0..].iter().step_by(g.stride))
                    {
                        *d = *s;
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col`]: `dx += col2im(col)`, i.e. every column entry is added back onto the
/// input pixel it was copied from. Parallel over input channels (no write conflicts).
pub fn col2im(col: &[f32], g: &Conv2dGeom, dx: &mut [f32]) {
    assert_eq!(
        dx.len(),
        g.x_len(),
        "col2im: dx length does not match geometry"
    );
    assert_eq!(
        col.len(),
        g.col_len(),
        "col2im: col length does not match geometry"
    );
    let chan = g.n * g.h * g.w;
    if g.p() == 0 || chan == 0 {
        return;
    }
    dx.par_chunks_mut(chan)
        .enumerate()
        .for_each(|(c, dxc)| col2im_channel(col, g, c, g.n, dxc));
}

/// [`col2im_channel`] given only one channel's rows (`KH*KW` rows of `nimg * OH * OW`),
/// which it may overwrite: for a shifted geometry ([`is_shifted`]) the entries at padding
/// positions are zeroed and each row is added onto `dst` as one shifted block.
pub(crate) fn col2im_channel_scratch(
    rows: &mut [f32],
    g: &Conv2dGeom,
    nimg: usize,
    dst: &mut [f32],
) {
    let pt = nimg * g.oh() * g.ow();
    if !is_shifted(g) || pt == 0 {
        col2im_rows_of_channel(rows, g, nimg, dst);
        return;
    }
    for (t, row) in rows.chunks_exact_mut(pt).enumerate() {
        let (ay, ax) = (
            (t / g.kw) as isize - g.pad as isize,
            (t % g.kw) as isize - g.pad as isize,
        );
        zero_padding_positions(ay, ax, g.h, g.w, row);
        let (shift, q0, q1) = shift_span(ay, ax, g.w, pt);
        if q1 <= q0 {
            continue;
        }
        let s0 = (q0 as isize + shift) as usize;
        for (d, s) in dst[s0..s0 + (q1 - q0)].iter_mut().zip(&row[q0..q1]) {
            *d += *s;
        }
    }
}

/// Scatter-adds the rows of channel `c` of a column matrix `[K][nimg * OH * OW]` (covering
/// `nimg` consecutive images) onto `dst`, the `nimg * H * W` input values of that channel.
pub(crate) fn col2im_channel(col: &[f32], g: &Conv2dGeom, c: usize, nimg: usize, dst: &mut [f32]) {
    let rows = g.kh * g.kw * nimg * g.oh() * g.ow();
    col2im_rows_of_channel(&col[c * rows..(c + 1) * rows], g, nimg, dst);
}

/// [`col2im_channel`] given only that channel's `KH*KW` rows.
fn col2im_rows_of_channel(rows: &[f32], g: &Conv2dGeom, nimg: usize, dst: &mut [f32]) {
    let (oh, ow) = (g.oh(), g.ow());
    let plane = g.h * g.w;
    let pt = nimg * oh * ow;
    for i in 0..g.kh {
        let (y_lo, y_hi) = valid_range(oh, g.h, g.stride, i, g.pad);
        for j in 0..g.kw {
            let (x_lo, x_hi) = valid_range(ow, g.w, g.stride, j, g.pad);
            if x_hi <= x_lo {
                continue;
            }
            let k = i * g.kw + j;
            let row = &rows[k * pt..(k + 1) * pt];
            let ix0 = x_lo * g.stride + j - g.pad;
            // Short rows: one vector permute-and-add per row.
            let fast = if g.stride > 1 || ow < 16 {
                crate::gather::RowScatterAdd::new(ow, g.w, g.stride, j, g.pad)
            } else {
                None
            };
            for n in 0..nimg {
                let dimg = &mut dst[n * plane..(n + 1) * plane];
                let src_img = &row[n * oh * ow..(n + 1) * oh * ow];
                for oy in y_lo..y_hi {
                    let iy = oy * g.stride + i - g.pad;
                    if let Some(plan) = &fast {
                        plan.apply(
                            &src_img[oy * ow..(oy + 1) * ow],
                            &mut dimg[iy * g.w..(iy + 1) * g.w],
                        );
                        continue;
                    }
                    let src = &src_img[oy * ow + x_lo..oy * ow + x_hi];
                    let drow = &mut dimg[iy * g.w..(iy + 1) * g.w];
                    if g.stride == 1 {
                        for (d, s) in drow[ix0..ix0 + src.len()].iter_mut().zip(src) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in drow[ix0..].iter_mut().step_by(g.stride).zip(src) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
}

/// A rectangle of output positions `oy.0..oy.1` x `ox.0..ox.1` whose valid kernel taps (those
/// that land inside the image rather than in the zero padding) are exactly the rectangle
/// `ti.0..ti.1` x `tj.0..tj.1`, the same for every position of the class.
///
/// On small feature maps much of a column matrix is padding: at 1x1 with a 3x3 kernel and
/// padding 1, 8 of 9 rows are zero; at 2x2, 5 of 9 entries. Lowering each class with only its
/// valid taps gives column matrices without a single padding zero, and the GEMMs shrink by
/// the same factor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TapClass {
    pub oy: (usize, usize),
    pub ox: (usize, usize),
    pub ti: (usize, usize),
    pub tj: (usize, usize),
}

impl TapClass {
    /// Output positions per image.
    pub fn positions(&self) -> usize {
        (self.oy.1 - self.oy.0) * (self.ox.1 - self.ox.0)
    }
    /// Valid taps per input channel.
    pub fn taps(&self) -> usize {
        (self.ti.1 - self.ti.0) * (self.tj.1 - self.tj.0)
    }
}

/// Maximal runs `(o0..o1, t0..t1)` of output coordinates along one axis that share the range
/// `t0..t1` of kernel offsets landing inside `0..len` (an empty range where all are padding).
fn axis_runs(
    out: usize,
    len: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Vec<((usize, usize), (usize, usize))> {
    let mut runs: Vec<((usize, usize), (usize, usize))> = Vec::new();
    for o in 0..out {
        // o*stride + t - pad in 0..len  <=>  t in pad - o*stride .. len + pad - o*stride
        let t0 = pad.saturating_sub(o * stride).min(k);
        let t1 = (len + pad).saturating_sub(o * stride).min(k).max(t0);
        match runs.last_mut() {
            Some((os, ts)) if *ts == (t0, t1) => os.1 = o + 1,
            _ => runs.push(((o, o + 1), (t0, t1))),
        }
    }
    runs
}

/// The output positions of `g` grouped into [`TapClass`]es (row runs times column runs).
pub(crate) fn tap_classes(g: &Conv2dGeom) -> Vec<TapClass> {
    let rows = axis_runs(g.oh(), g.h, g.kh, g.stride, g.pad);
    let cols = axis_runs(g.ow(), g.w, g.kw, g.stride, g.pad);
    let mut v = Vec::with_capacity(rows.len() * cols.len());
    for &(oy, ti) in &rows {
        for &(ox, tj) in &cols {
            v.push(TapClass { oy, ox, ti, tj });
        }
    }
    v
}

/// Share of the entries of `g`'s column matrix that are padding zeros, given its classes.
pub(crate) fn padding_share(g: &Conv2dGeom, classes: &[TapClass]) -> f64 {
    let total = g.oh() * g.ow() * g.kh * g.kw;
    if total == 0 {
        return 0.0;
    }
    let valid: usize = classes.iter().map(|c| c.positions() * c.taps()).sum();
    1.0 - valid as f64 / total as f64
}

/// Lowers images `n0..n1` of CNHW `x` for one class: `col[(c*TI + ti)*TJ + tj][q]` with
/// `q = ((n - n0)*OY + oy)*OX + ox` over the class's rectangle, `TI x TJ` its taps. Every
/// entry is an input pixel (the class has no padding taps); `col` is overwritten.
pub(crate) fn im2col_class(
    x: &[f32],
    g: &Conv2dGeom,
    cls: &TapClass,
    n0: usize,
    n1: usize,
    col: &mut [f32],
) {
    let cols = (n1 - n0) * cls.positions();
    assert_eq!(
        col.len(),
        g.c * cls.taps() * cols,
        "im2col_class: col length"
    );
    if cols == 0 {
        return;
    }
    let plane = g.h * g.w;
    let nx = cls.ox.1 - cls.ox.0;
    let mut rows = col.chunks_exact_mut(cols);
    for c in 0..g.c {
        for i in cls.ti.0..cls.ti.1 {
            for j in cls.tj.0..cls.tj.1 {
                let Some(row) = rows.next() else { return };
                let mut q = 0;
                for n in n0..n1 {
                    let img = &x[(c * g.n + n) * plane..(c * g.n + n + 1) * plane];
                    for oy in cls.oy.0..cls.oy.1 {
                        let iy = oy * g.stride + i - g.pad;
                        let ix0 = cls.ox.0 * g.stride + j - g.pad;
                        let src = &img[iy * g.w + ix0..];
                        let dst = &mut row[q..q + nx];
                        if g.stride == 1 {
                            dst.copy_from_slice(&src[..nx]);
                        } else {
                            for (d, s) in dst.iter_mut().zip(src.iter().step_by(g.stride)) {
                                *d = *s;
                            }
                        }
                        q += nx;
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col_class`] for one input channel `c`: adds the class's rows of `dcol`
/// (laid out as there, for `nimg` images) onto `dst`, the `nimg * H * W` values of channel
/// `c` of those images.
pub(crate) fn col2im_class_channel(
    dcol: &[f32],
    g: &Conv2dGeom,
    cls: &TapClass,
    c: usize,
    nimg: usize,
    dst: &mut [f32],
) {
    let cols = nimg * cls.positions();
    let plane = g.h * g.w;
    let nx = cls.ox.1 - cls.ox.0;
    let (ni, nj) = (cls.ti.1 - cls.ti.0, cls.tj.1 - cls.tj.0);
    for i in cls.ti.0..cls.ti.1 {
        for j in cls.tj.0..cls.tj.1 {
            let r = (c * ni + i - cls.ti.0) * nj + j - cls.tj.0;
            let row = &dcol[r * cols..(r + 1) * cols];
            let mut q = 0;
            for n in 0..nimg {
                let img = &mut dst[n * plane..(n + 1) * plane];
                for oy in cls.oy.0..cls.oy.1 {
                    let iy = oy * g.stride + i - g.pad;
                    let ix0 = cls.ox.0 * g.stride + j - g.pad;
                    let src = &row[q..q + nx];
                    let drow = &mut img[iy * g.w + ix0..];
                    if g.stride == 1 {
                        for (d, s) in drow[..nx].iter_mut().zip(src) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in drow.iter_mut().step_by(g.stride).zip(src) {
                            *d += *s;
                        }
                    }
                    q += nx;
                }
            }
        }
    }
}
