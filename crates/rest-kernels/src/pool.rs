//! Pooling on CNHW activations: global average pooling (CNHW `[C,N,H,W]` -> `[N,C]`, the
//! hand-off from convolutional layers to the classifier) and 2-D max pooling with argmax
//! indices for the backward pass.

use rayon::prelude::*;

use crate::im2col::out_len;
use crate::util::sum_lanes;

/// Global average pooling: `out[n][c] = mean_{h,w} x[c][n][h][w]` for CNHW `x` with `c`
/// channels and batch `n` (`out` has `n*c` elements, overwritten).
pub fn global_avg_pool_fwd(x: &[f32], c: usize, n: usize, out: &mut [f32]) {
    assert_eq!(out.len(), n * c, "global_avg_pool_fwd: out length");
    if n * c == 0 {
        return;
    }
    assert_eq!(x.len() % (n * c), 0, "global_avg_pool_fwd: x length");
    let hw = x.len() / (n * c);
    if hw == 0 {
        out.fill(0.0);
        return;
    }
    // One task per channel (N planes), not per plane: the planes of deep layers are a few
    // elements long.
    let mut means = vec![0f32; n * c];
    let channel = |(m, xc): (&mut [f32], &[f32])| {
        for (v, plane) in m.iter_mut().zip(xc.chunks_exact(hw)) {
            *v = sum_lanes(plane) / hw as f32;
        }
    };
    if x.len() < 1 << 15 {
        means.chunks_mut(n).zip(x.chunks(n * hw)).for_each(channel);
    } else {
        means
            .par_chunks_mut(n)
            .zip(x.par_chunks(n * hw))
            .for_each(channel);
    }
    // [C][N] -> [N][C], cache-blocked.
    crate::layout::transpose(&means, c, n, out);
}

/// Backward of [`global_avg_pool_fwd`]: `dx[c][n][h][w] = dout[n][c] / (H*W)` (`dx`, of
/// `c*n*hw` elements, overwritten).
pub fn global_avg_pool_bwd(dout: &[f32], c: usize, n: usize, hw: usize, dx: &mut [f32]) {
    assert_eq!(dout.len(), n * c, "global_avg_pool_bwd: dout length");
    assert_eq!(dx.len(), c * n * hw, "global_avg_pool_bwd: dx length");
    if hw == 0 {
        return;
    }
    let inv = 1.0 / hw as f32;
    dx.par_chunks_mut(hw).enumerate().for_each(|(plane, d)| {
        let (ch, b) = (plane / n, plane % n);
        d.fill(dout[b * c + ch] * inv);
    });
}

/// Shape of a 2-D max pooling over CNHW `[c, n, h, w]`: square window `k`, `stride`, implicit
/// `-inf` padding `pad` (PyTorch requires `pad <= k / 2`, which guarantees every window sees
/// at least one real pixel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaxPool2dGeom {
    pub c: usize,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl MaxPool2dGeom {
    /// Output height.
    pub fn oh(&self) -> usize {
        out_len(self.h, self.k, self.stride, self.pad)
    }
    /// Output width.
    pub fn ow(&self) -> usize {
        out_len(self.w, self.k, self.stride, self.pad)
    }
    /// Elements of the input.
    pub fn x_len(&self) -> usize {
        self.c * self.n * self.h * self.w
    }
    /// Elements of the output `[c, n, oh, ow]`.
    pub fn out_len(&self) -> usize {
        self.c * self.n * self.oh() * self.ow()
    }
    /// Checks the geometry (window >= 1, stride >= 1, `pad <= k/2`, window fits).
    pub fn validate(&self) -> Result<(), String> {
        if self.k == 0 || self.stride == 0 {
            return Err("max pooling needs kernel size and stride of at least 1".into());
        }
        if 2 * self.pad > self.k {
            return Err(format!(
                "max pooling padding {} exceeds half the kernel size {}",
                self.pad, self.k
            ));
        }
        if self.h + 2 * self.pad < self.k || self.w + 2 * self.pad < self.k {
            return Err(format!(
                "max pooling window {} does not fit input {}x{} with padding {}",
                self.k, self.h, self.w, self.pad
            ));
        }
        if self.h * self.w > u32::MAX as usize {
            return Err("max pooling plane too large for 32-bit indices".into());
        }
        Ok(())
    }
}

/// Max pooling forward: `out[c][n][oy][ox]` = maximum of the window, `idx` = its position
/// `iy*w + ix` within the `(c, n)` input plane (first maximum in row-major window order; NaN
/// propagates). Both overwritten, `g.out_len()` elements each.
pub fn max_pool2d_fwd(x: &[f32], g: &MaxPool2dGeom, out: &mut [f32], idx: &mut [u32]) {
    assert!(
        g.validate().is_ok(),
        "max_pool2d_fwd: invalid geometry {g:?}"
    );
    assert_eq!(x.len(), g.x_len(), "max_pool2d_fwd: x length");
    assert_eq!(out.len(), g.out_len(), "max_pool2d_fwd: out length");
    assert_eq!(idx.len(), g.out_len(), "max_pool2d_fwd: idx length");
    let (oh, ow) = (g.oh(), g.ow());
    let (plane, oplane) = (g.h * g.w, oh * ow);
    if oplane == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if narrow_k3s2_applies(g) {
        out.par_chunks_mut(oplane)
            .zip(idx.par_chunks_mut(oplane))
            .enumerate()
            .for_each(|(pl, (o, id))| {
                // SAFETY: AVX-512F is the active level and the geometry is the one
                // `narrow_k3s2_applies` accepted; `o`, `id` hold one output plane.
                unsafe { narrow_k3s2_avx512(&x[pl * plane..(pl + 1) * plane], g, o, id) }
            });
        return;
    }
    out.par_chunks_mut(oplane)
        .zip(idx.par_chunks_mut(oplane))
        .enumerate()
        .for_each(|(pl, (o, id))| {
            let src = &x[pl * plane..(pl + 1) * plane];
            // Outputs whose window lies inside the row: `ox·s >= pad`, `ox·s + k - pad <= w`.
            let ox_lo = g.pad.div_ceil(g.stride).min(ow);
            let ox_hi = if g.w + g.pad >= g.k {
                ((g.w + g.pad - g.k) / g.stride + 1).clamp(ox_lo, ow)
            } else {
                ox_lo
            };
            // Rows whose windows lie inside the plane vertically: `oy·s >= pad`,
            // `oy·s + k - pad <= h`.
            let oy_lo = g.pad.div_ceil(g.stride).min(oh);
            let oy_hi = if g.h + g.pad >= g.k {
                ((g.h + g.pad - g.k) / g.stride + 1).clamp(oy_lo, oh)
            } else {
                oy_lo
            };
            // Short rows (fewer than 16 inner outputs, e.g. a ResNet stem's pool at 32 px):
            // the inner outputs of the inner rows run 16 at a time across rows instead.
            let across = across_rows_applies(ox_hi - ox_lo, oy_hi - oy_lo);
            for oy in 0..oh {
                let y0 = (oy * g.stride).saturating_sub(g.pad);
                let y1 = (oy * g.stride + g.k - g.pad).min(g.h);
                let (orow, irow) = (&mut o[oy * ow..][..ow], &mut id[oy * ow..][..ow]);
                for ox in (0..ox_lo).chain(ox_hi..ow) {
                    let x0 = (ox * g.stride).saturating_sub(g.pad);
                    let x1 = (ox * g.stride + g.k - g.pad).min(g.w);
                    (orow[ox], irow[ox]) = window_max(src, g.w, y0..y1, x0, x1 - x0);
                }
                if across && (oy_lo..oy_hi).contains(&oy) {
                    continue;
                }
                let inner = ox_lo..ox_hi;
                let (o_in, i_in) = (&mut orow[inner.clone()], &mut irow[inner]);
                let x_first = (ox_lo * g.stride).saturating_sub(g.pad);
                full_rows(src, g, y0..y1, x_first, o_in, i_in);
            }
            if across {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `across_rows_applies` checked that AVX-512F is the active level; the
                // windows of rows oy_lo..oy_hi and columns ox_lo..ox_hi lie inside the plane.
                unsafe {
                    inner_across_rows_avx512(src, g, (oy_lo..oy_hi, ox_lo..ox_hi), o, id)
                };
            }
        });
}

/// Whether a plane takes [`narrow_k3s2_avx512`]: the 3x3 stride-2 padding-1 pool (ResNet's
/// stem) on rows of at most 16 pixels, on AVX-512.
#[cfg(target_arch = "x86_64")]
fn narrow_k3s2_applies(g: &MaxPool2dGeom) -> bool {
    g.k == 3
        && g.stride == 2
        && g.pad == 1
        && g.w <= 16
        && crate::isa::active() == crate::isa::Isa::Avx512
}

/// One plane of the 3x3 stride-2 padding-1 max pool on rows of at most 16 pixels (ResNet's
/// stem pool at 32 px: 16x16 -> 8x8), separably: each input row is one vector, its window
/// maxima of the three columns of every output (first maximum in column order, or the first
/// NaN) come from three permutes, and each output row combines the results of its (up to)
/// three input rows in row order. This equals the row-major scan of the whole window: the
/// first row holding the window's maximum (or first NaN) wins, at its first position there.
///
/// # Safety
/// AVX-512F is available; `g` passes [`narrow_k3s2_applies`]; `src` is one `h x w` plane and
/// `out`, `idx` one output plane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn narrow_k3s2_avx512(src: &[f32], g: &MaxPool2dGeom, out: &mut [f32], idx: &mut [u32]) {
    use std::arch::x86_64::*;
    let (h, w, oh, ow) = (g.h, g.w, g.oh(), g.ow());
    assert!(
        src.len() == h * w && out.len() == oh * ow && idx.len() == oh * ow && w <= 16,
        "narrow max pool: plane sizes"
    );
    // Lane ox reads columns 2ox-1 (from ox = 1), 2ox, and 2ox+1 (while inside the row).
    let cols: [[i32; 16]; 3] = std::array::from_fn(|d| {
        std::array::from_fn(|l| (2 * l as i32 + d as i32 - 1).clamp(0, 15))
    });
    let cols = cols.map(|c| _mm512_loadu_si512(c.as_ptr().cast()));
    let lanes: __mmask16 = ((1u32 << ow) - 1) as u16;
    let inside = |first: usize| -> __mmask16 {
        let mut m = 0u16;
        for l in 0..ow {
            if 2 * l + first >= 1 && 2 * l + first - 1 < w {
                m |= 1 << l;
            }
        }
        m
    };
    let valid = [inside(0), inside(1), inside(2)];
    let row_mask: __mmask16 = ((1u32 << w) - 1) as u16;
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    // The per-output maxima of input row iy (and their plane positions).
    let row = |iy: usize| {
        let v = _mm512_mask_loadu_ps(ninf, row_mask, src.as_ptr().add(iy * w));
        let base = _mm512_set1_epi32((iy * w) as i32);
        // As the scalar scan: the window's first column until a value is taken.
        let mut best = ninf;
        let mut arg = _mm512_add_epi32(base, cols[0]);
        for (c, &m) in cols.iter().zip(&valid) {
            let val = _mm512_permutexvar_ps(*c, v);
            let at = _mm512_add_epi32(base, *c);
            let (b, a) = take_max(best, arg, val, at);
            best = _mm512_mask_blend_ps(m, best, b);
            arg = _mm512_mask_blend_epi32(m, arg, a);
        }
        (best, arg)
    };
    let mut prev = row(0);
    for oy in 0..oh {
        // Rows 2oy-1 (= the last row of the previous output), 2oy, 2oy+1 inside the plane.
        let mid = if oy == 0 { prev } else { row(2 * oy) };
        let (mut best, mut arg) = if oy == 0 { mid } else { prev };
        if oy > 0 {
            (best, arg) = take_max(best, arg, mid.0, mid.1);
        }
        if 2 * oy + 1 < h {
            let last = row(2 * oy + 1);
            (best, arg) = take_max(best, arg, last.0, last.1);
            prev = last;
        }
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(oy * ow), lanes, best);
        _mm512_mask_storeu_epi32(idx.as_mut_ptr().add(oy * ow).cast(), lanes, arg);
    }
}

/// Whether the inner outputs of a plane (`inner_w` per row, `inner_h` rows) run across rows
/// ([`inner_across_rows_avx512`]): on AVX-512, when a row has fewer than 16 of them (so
/// [`full_rows`] would scan them one by one) and there are at least 16 in all.
fn across_rows_applies(inner_w: usize, inner_h: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        inner_w < 16 && inner_w * inner_h >= 16 && crate::isa::active() == crate::isa::Isa::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (inner_w, inner_h);
        false
    }
}

/// The outputs of rows `ys` and columns `xs` (windows inside the plane) of one plane, 16 at a
/// time in row-major output order across rows: lane l gathers its window's k x k values at
/// its own offset, in the scalar scan's order (first maximum in row-major window order, or
/// the first NaN). A partial last block runs as the last 16 outputs (recomputing a few).
///
/// # Safety
/// AVX-512F is available; every window of those outputs lies inside `src` (one plane), and
/// there are at least 16 outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn inner_across_rows_avx512(
    src: &[f32],
    g: &MaxPool2dGeom,
    (ys, xs): (std::ops::Range<usize>, std::ops::Range<usize>),
    out: &mut [f32],
    idx: &mut [u32],
) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let ow = g.ow();
    let (iw, n) = (xs.len(), xs.len() * ys.len());
    // Output `c` (row-major over the block of rows and columns): its position in the plane's
    // outputs and the start of its window.
    let cell = |c: usize| {
        let (oy, ox) = (ys.start + c / iw, xs.start + c % iw);
        let start = (oy * g.stride - g.pad) * g.w + (ox * g.stride - g.pad);
        (oy * ow + ox, start)
    };
    assert!(
        n >= L && src.len() < i32::MAX as usize,
        "max pooling: the across-rows path needs 16 outputs in a plane under 2^31 values"
    );
    let last_start = cell(n - 1).1;
    assert!(
        last_start + (g.k - 1) * g.w + g.k - 1 < src.len(),
        "max pooling window outside the plane"
    );
    let starts = (0..n / L)
        .map(|b| b * L)
        .chain((!n.is_multiple_of(L)).then_some(n - L));
    let p = src.as_ptr();
    let (mut base, mut pos) = ([0i32; L], [0usize; L]);
    for j0 in starts {
        for l in 0..L {
            let (o, start) = cell(j0 + l);
            (pos[l], base[l]) = (o, start as i32);
        }
        let base_v = _mm512_loadu_si512(base.as_ptr().cast());
        let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
        // As the scalar scan: the window's first position until a value is taken.
        let mut arg = base_v;
        for dy in 0..g.k {
            for dx in 0..g.k {
                let at = _mm512_add_epi32(base_v, _mm512_set1_epi32((dy * g.w + dx) as i32));
                let v = _mm512_i32gather_ps::<4>(at, p.cast());
                (best, arg) = take_max(best, arg, v, at);
            }
        }
        let (mut b, mut a) = ([0f32; L], [0u32; L]);
        _mm512_storeu_ps(b.as_mut_ptr(), best);
        _mm512_storeu_si512(a.as_mut_ptr().cast(), arg);
        for l in 0..L {
            out[pos[l]] = b[l];
            idx[pos[l]] = a[l];
        }
    }
}

/// The maximum of `src` over rows `ys` and columns `x0..x0 + kw` (row length `w`) and its
/// position `iy·w + ix`: the first maximum in row-major order, or the first NaN.
#[inline(always)]
fn window_max(
    src: &[f32],
    w: usize,
    ys: std::ops::Range<usize>,
    x0: usize,
    kw: usize,
) -> (f32, u32) {
    let mut best = f32::NEG_INFINITY;
    let mut arg = ys.start * w + x0;
    for iy in ys {
        let row = &src[iy * w + x0..][..kw];
        for (dx, &v) in row.iter().enumerate() {
            // Branch-free selects (a data-dependent branch per element mispredicts about half
            // the time on activations): a larger value, or the first NaN, which then stays
            // (`v > NaN` is false).
            let take = v > best || (v.is_nan() && !best.is_nan());
            best = if take { v } else { best };
            arg = if take { iy * w + x0 + dx } else { arg };
        }
    }
    (best, arg as u32)
}

/// [`window_max`] over whole windows (`g.k` wide), for consecutive outputs whose windows
/// start at columns `x_first + j·stride` and lie inside the row. With AVX-512, 16 outputs at
/// a time (one gather per window position; the scalar select chain of one window is a
/// serial dependency, 16 windows side by side are not).
#[inline(always)]
fn full_rows(
    src: &[f32],
    g: &MaxPool2dGeom,
    ys: std::ops::Range<usize>,
    x_first: usize,
    out: &mut [f32],
    idx: &mut [u32],
) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active() == crate::isa::Isa::Avx512
        && src.len() < i32::MAX as usize
        && !ys.is_empty()
    {
        // SAFETY: AVX-512F is available (the active level); every window lies inside `src` (callers pass
        // windows inside the rows `ys` of the plane), checked below per block.
        done = unsafe { full_rows_avx512(src, g, ys.clone(), x_first, out, idx) };
    }
    for (j, (ov, iv)) in out.iter_mut().zip(idx.iter_mut()).enumerate().skip(done) {
        (*ov, *iv) = window_max(src, g.w, ys.clone(), x_first + j * g.stride, g.k);
    }
}

/// The blocks of 16 outputs of [`full_rows`]; returns how many leading outputs it wrote.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn full_rows_avx512(
    src: &[f32],
    g: &MaxPool2dGeom,
    ys: std::ops::Range<usize>,
    x_first: usize,
    out: &mut [f32],
    idx: &mut [u32],
) -> usize {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let len = out.len().min(idx.len());
    let blocks = len / L;
    // A partial last block is run as the last 16 outputs (recomputing a few already
    // written: each output depends only on its window), not left to the scalar scan.
    let starts = (0..blocks)
        .map(|b| b * L)
        .chain((len > blocks * L && blocks > 0).then_some(len - L));
    let s = g.stride;
    // Lane l reads column x_first + (j0 + l)·s + dx.
    let mut lane = [0i32; L];
    for (l, v) in lane.iter_mut().enumerate() {
        *v = (l * s) as i32;
    }
    let lane = _mm512_loadu_si512(lane.as_ptr().cast());
    // Stride 2: lanes read every other column of a 31-column span, i.e. the even elements of
    // two vectors (one two-source permute instead of a gather; the second vector's last
    // element, one past the span, is masked off).
    let mut even = [0i32; L];
    for (l, v) in even.iter_mut().enumerate() {
        *v = (2 * l) as i32;
    }
    let even = _mm512_loadu_si512(even.as_ptr().cast());
    let p = src.as_ptr();
    for j0 in starts {
        let x0 = x_first + j0 * s;
        // The last column the block reads, in the last row: inside `src`.
        let last = (ys.end - 1) * g.w + x0 + (L - 1) * s + g.k - 1;
        assert!(last < src.len(), "max pooling window outside the plane");
        let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
        // As the scalar scan: the window's first position until a value is taken.
        let mut arg = _mm512_add_epi32(lane, _mm512_set1_epi32((ys.start * g.w + x0) as i32));
        for iy in ys.clone() {
            for dx in 0..g.k {
                let base = (iy * g.w + x0 + dx) as i32;
                let at = _mm512_add_epi32(lane, _mm512_set1_epi32(base));
                // Lane l: src[base + l·s] (inside the window span checked above).
                let v = match s {
                    1 => _mm512_loadu_ps(p.add(base as usize)),
                    2 => _mm512_permutex2var_ps(
                        _mm512_loadu_ps(p.add(base as usize)),
                        even,
                        _mm512_maskz_loadu_ps(0x7FFF, p.add(base as usize + L)),
                    ),
                    _ => _mm512_i32gather_ps::<4>(at, p.cast()),
                };
                (best, arg) = take_max(best, arg, v, at);
            }
        }
        _mm512_storeu_ps(out.as_mut_ptr().add(j0), best);
        _mm512_storeu_si512(idx.as_mut_ptr().add(j0).cast(), arg);
    }
    // Every output when there was a whole block (the partial one then ran overlapped).
    if blocks > 0 {
        len
    } else {
        0
    }
}

/// One step of the 16-lane window scan: lanes where `v` is larger than `best`, or is the
/// first NaN (which then stays: `v > NaN` is false), take `v` and its position `at`.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn take_max(
    best: std::arch::x86_64::__m512,
    arg: std::arch::x86_64::__m512i,
    v: std::arch::x86_64::__m512,
    at: std::arch::x86_64::__m512i,
) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512i) {
    use std::arch::x86_64::*;
    let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best);
    let v_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let b_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(best, best);
    let take = gt | (v_nan & !b_nan);
    (
        _mm512_mask_blend_ps(take, best, v),
        _mm512_mask_blend_epi32(take, arg, at),
    )
}

/// Max pooling backward: `dx` (overwritten) receives each `dout` entry at the argmax recorded
/// by [`max_pool2d_fwd`] (summed where windows overlap on the same maximum).
pub fn max_pool2d_bwd(dout: &[f32], idx: &[u32], g: &MaxPool2dGeom, dx: &mut [f32]) {
    assert_eq!(dout.len(), g.out_len(), "max_pool2d_bwd: dout length");
    assert_eq!(idx.len(), g.out_len(), "max_pool2d_bwd: idx length");
    assert_eq!(dx.len(), g.x_len(), "max_pool2d_bwd: dx length");
    let (plane, oplane) = (g.h * g.w, g.oh() * g.ow());
    if plane == 0 {
        return;
    }
    dx.par_chunks_mut(plane).enumerate().for_each(|(pl, d)| {
        d.fill(0.0); // `dx` may come uninitialised
        if oplane == 0 {
            return;
        }
        let o = &dout[pl * oplane..(pl + 1) * oplane];
        let id = &idx[pl * oplane..(pl + 1) * oplane];
        for (v, &i) in o.iter().zip(id) {
            d[i as usize] += *v;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ties keep the first maximum in row-major window order; a NaN wins over any number and
    /// the first NaN of a window is the one recorded; padding never wins.
    #[test]
    fn max_pool_ties_and_nan_follow_the_first_in_window_order() {
        // One 3x3 plane, 2x2 windows at stride 1 (no padding): windows at (0,0), (0,1),
        // (1,0), (1,1).
        let g = MaxPool2dGeom {
            c: 1,
            n: 1,
            h: 3,
            w: 3,
            k: 2,
            stride: 1,
            pad: 0,
        };
        let nan = f32::NAN;
        #[rustfmt::skip]
        let x = [
            1.0, 5.0, 5.0,
            5.0, nan, 2.0,
            3.0, 4.0, nan,
        ];
        let (mut out, mut idx) = (vec![0.0; 4], vec![0u32; 4]);
        max_pool2d_fwd(&x, &g, &mut out, &mut idx);
        // Every window holds the NaN at index 4; window (1,1) also the one at index 8.
        assert!(out.iter().all(|v| v.is_nan()));
        assert_eq!(idx, [4, 4, 4, 4]);
        #[rustfmt::skip]
        let x = [
            1.0, 5.0, 5.0,
            5.0, 0.0, 2.0,
            -3.0, -4.0, -1.0,
        ];
        max_pool2d_fwd(&x, &g, &mut out, &mut idx);
        assert_eq!(out, [5.0, 5.0, 5.0, 2.0]);
        // Window (0,0): 5 at index 1 before the 5 at index 3; window (0,1): index 1 before 2.
        assert_eq!(idx, [1, 1, 3, 5]);
        // 3x3 windows, stride 2, padding 1 over an all-negative plane: the padding is not a
        // candidate (the maximum is -1, not 0).
        let g = MaxPool2dGeom {
            k: 3,
            stride: 2,
            pad: 1,
            ..g
        };
        let x: Vec<f32> = (1..=9).map(|v| -(v as f32)).collect();
        let (mut out, mut idx) = (vec![0.0; 4], vec![0u32; 4]);
        max_pool2d_fwd(&x, &g, &mut out, &mut idx);
        assert_eq!(out, [-1.0, -2.0, -4.0, -5.0]);
        assert_eq!(idx, [0, 1, 3, 4]);
    }
}
