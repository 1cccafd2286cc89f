//! Convolution geometry and the im2col / col2im lowering for CNHW activations.
//!
//! `col[k][p]` with `k = (c*KH + i)*KW + j` and `p = (n*OH + oy)*OW + ox` holds
//! `x[c][n][oy*stride + i - pad][ox*stride + j - pad]` (zero outside the image), so a
//! convolution is `W[OC][K] x col[K][P]`. `col2im` is the exact adjoint (it scatters-adds).

use rayon::prelude::*;

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
    for (k, row) in col.chunks_exact_mut(pt).enumerate() {
        im2col_row(x, g, k, n0, n1, row);
    }
}

/// Row `k` of the column matrix for images `n0..n1` (`row` has `(n1 - n0) * OH * OW` entries).
#[inline]
fn im2col_row(x: &[f32], g: &Conv2dGeom, k: usize, n0: usize, n1: usize, row: &mut [f32]) {
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

/// Scatter-adds the rows of channel `c` of a column matrix `[K][nimg * OH * OW]` (covering
/// `nimg` consecutive images) onto `dst`, the `nimg * H * W` input values of that channel.
pub(crate) fn col2im_channel(col: &[f32], g: &Conv2dGeom, c: usize, nimg: usize, dst: &mut [f32]) {
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
            let k = (c * g.kh + i) * g.kw + j;
            let row = &col[k * pt..(k + 1) * pt];
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
