//! The layout passes of the polyphase convolution ([`super::conv`]) as whole-vector AVX-512
//! moves: compacting a virtual output row to its valid positions (`compress`), the inverse
//! expansion of an output gradient (`expand`), and the short strided row gathers and scatters
//! between image rows and phase rows (permutes with masked loads and stores).
//!
//! # Idea
//! In the flat layout `j = (n·PH + oy)·PW + ox` the valid outputs (`oy < OH`, `ox < OW`) are a
//! pattern of period `P = PH·PW`, and in the CNHW output they are contiguous in `j` order. So a
//! run of 16 virtual positions compacts with one `vcompressps` under the 16-bit validity mask
//! of `j mod P` (read from a bitset of the period), followed by a masked store of `popcount`
//! lanes; no per-row loop, however short the rows. The expansion is the same with
//! `vexpandps`. A strided row `dst[i] = src[s·i]` (or `dst[s·i] = src[i]`) moves up to 16
//! elements spanning at most 32 (16) source floats with one or two masked loads, one permute
//! and one masked store. Packing builds all column phases of an image row from one load of
//! it (a permute each, zeros included); the input gradient, where rows fit, builds each image
//! row from its (at most two) phase rows, so every store is a whole row.
//!
//! The helpers only move values, so results are bit for bit those of the scalar loops.
//! Without AVX-512 the passes keep their row loops, with [`copy_run`] and [`zero_run`] for
//! the runs of a few floats (where a `memcpy` / `memset` call costs more than the move).

use crate::isa::Isa;

/// Validity pattern of the flat layout (`oy < OH && ox < OW` at `j mod PH·PW`), as a bitset
/// over one period extended by 16 wrapped positions, so any 16 consecutive positions read as
/// one unaligned word.
// Only the AVX-512 passes read the plans.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone)]
pub(super) struct ValidMask {
    /// `PH·PW`.
    period: usize,
    /// `16 mod period`: how far the residue moves per vector.
    step: usize,
    pw: usize,
    oh: usize,
    ow: usize,
    /// Bit `i` (little-endian) is the validity of position `i mod period`, for
    /// `i < period + 16`; 4 spare bytes keep every 32-bit read in bounds.
    bits: Vec<u8>,
}

impl ValidMask {
    /// The pattern of planes `ph x pw` whose first `oh` rows and `ow` columns are valid.
    pub(super) fn new(ph: usize, pw: usize, oh: usize, ow: usize) -> Self {
        let period = (ph * pw).max(1);
        let n_bits = period + 16;
        let mut bits = vec![0u8; n_bits.div_ceil(8) + 4];
        for i in 0..n_bits {
            let r = i % period;
            if r / pw.max(1) < oh && r % pw.max(1) < ow {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        ValidMask {
            period,
            step: 16 % period,
            pw,
            oh,
            ow,
            bits,
        }
    }

    /// Validity of the 16 positions `r .. r + 16` for a residue `r < period` (bit `i` for
    /// position `r + i`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn mask16(&self, r: usize) -> u16 {
        debug_assert!(r < self.period);
        // SAFETY: `r < period`, so bytes `r / 8 .. r / 8 + 4` lie in `bits`, which has
        // `(period + 16).div_ceil(8) + 4` bytes.
        let word = unsafe { (self.bits.as_ptr().add(r >> 3) as *const u32).read_unaligned() };
        (u32::from_le(word) >> (r & 7)) as u16
    }

    /// The number of valid positions before flat position `j` (the CNHW offset of the first
    /// valid position at or after `j`, within one output channel).
    pub(super) fn valid_before(&self, j: usize) -> usize {
        let (n, rem) = (j / self.period, j % self.period);
        let (py, px) = (rem / self.pw, rem % self.pw);
        let row = if py < self.oh { px.min(self.ow) } else { 0 };
        (n * self.oh + py.min(self.oh)) * self.ow + row
    }
}

/// Strided row moves with stride `s`: precomputed permutes (see the module doc).
// Only the AVX-512 passes read the plans.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
pub(super) struct Strided {
    s: usize,
    /// Elements per gather vector: `s·(k-1) + 1 <= 32` source floats.
    gather_k: usize,
    /// Gather permute: lane `i` reads source lane `s·i`.
    gather_idx: [i32; 16],
    /// Elements per scatter vector: `s·(k-1) + 1 <= 16` destination floats.
    scatter_k: usize,
    /// Scatter permute: lane `s·i` takes element `i`,
    scatter_idx: [i32; 16],
    /// and the lanes `s·i` (for `i < scatter_k`).
    scatter_keep: u16,
}

impl Strided {
    /// Moves with stride `s >= 1`.
    pub(super) fn new(s: usize) -> Self {
        let s = s.max(1);
        let gather_k = (31 / s + 1).min(16);
        let scatter_k = (15 / s + 1).min(16);
        let mut gather_idx = [0i32; 16];
        for (i, v) in gather_idx.iter_mut().enumerate().take(gather_k) {
            *v = (s * i) as i32;
        }
        let (mut scatter_idx, mut scatter_keep) = ([0i32; 16], 0u16);
        for i in 0..scatter_k {
            scatter_idx[s * i] = i as i32;
            scatter_keep |= 1 << (s * i);
        }
        Strided {
            s,
            gather_k,
            gather_idx,
            scatter_k,
            scatter_idx,
            scatter_keep,
        }
    }
}

/// How the images of one channel become its phase planes: the `sx` column phases of one row
/// phase `ry` are built together, from one load of each input row.
// Only the AVX-512 passes read the plans.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone)]
pub(super) struct PackPlan {
    s: usize,
    pad: usize,
    h: usize,
    w: usize,
    ph: usize,
    pw: usize,
    /// Per column phase `rx`: the phase columns `lo..hi` whose input column lies in `0..w`.
    cols: Vec<(usize, usize)>,
    /// When `w <= 32` and `pw <= 16`, per `rx`: the input column of each phase column and the
    /// columns inside the row (one permute builds the whole phase row, zeros included).
    row_perm: Option<Vec<([i32; 16], u16)>>,
    strided: Strided,
}

impl PackPlan {
    /// Planes `ph x pw` of `sx` column phases, from `h x w` images, stride `s`, padding `pad`.
    pub(super) fn new(
        (h, w): (usize, usize),
        (ph, pw): (usize, usize),
        sx: usize,
        s: usize,
        pad: usize,
    ) -> Self {
        let cols: Vec<(usize, usize)> = (0..sx)
            .map(|rx| crate::im2col::valid_range(pw, w, s, rx, pad))
            .collect();
        let row_perm = (w <= 32 && pw <= 16).then(|| {
            cols.iter()
                .enumerate()
                .map(|(rx, &(lo, hi))| {
                    let (mut idx, mut keep) = ([0i32; 16], 0u16);
                    for (px, v) in idx.iter_mut().enumerate().take(hi).skip(lo) {
                        *v = (s * px + rx - pad) as i32;
                        keep |= 1 << px;
                    }
                    (idx, keep)
                })
                .collect()
        });
        PackPlan {
            s,
            pad,
            h,
            w,
            ph,
            pw,
            cols,
            row_perm,
            strided: Strided::new(s),
        }
    }
}

/// Fills the `sx` phase planes `(c, ry, 0..sx)` of one channel over the batch: plane `rx` at
/// `dst + rx·xs`, positions `(n·PH + py)·PW + px` for `n < batch`, zeros at the positions
/// whose input pixel lies in the padding, and zeros from `batch·PH·PW` to `xs`.
///
/// # Safety
/// [`vector_ok`] must hold; `x_c[..batch·h·w]` (the channel's images) readable; `dst[..sx·xs]`
/// writable and not accessed by other threads; `xs >= batch·PH·PW`.
pub(super) unsafe fn pack_group(
    p: &PackPlan,
    x_c: *const f32,
    batch: usize,
    ry: usize,
    dst: *mut f32,
    xs: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract; rows are read only at `s·py + ry - pad < h` (rows
        // `valid_range`), masked to `w` floats, and planes written only below `xs`.
        avx512::pack_group(p, x_c, batch, ry, dst, xs)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, x_c, batch, ry, dst, xs);
        unreachable!("vector layout passes need AVX-512 (vector_ok)")
    }
}

/// How the phase planes of one channel's input gradient become its image rows (the inverse of
/// [`PackPlan`]) when each image row is one or two vectors built from at most two phase rows
/// (`sx <= 2`, `pw <= 16`, `w <= 32`): full-row stores instead of one strided store per
/// phase row.
// Only the AVX-512 passes read the plans.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone)]
pub(super) struct RowsPlan {
    s: usize,
    pad: usize,
    h: usize,
    w: usize,
    ph: usize,
    pw: usize,
    sy: usize,
    sx: usize,
    /// Per half row (columns `0..16`, `16..32`): the source lane of each column in the two
    /// phase rows (`16·rx + px`), and the columns that lie in a stored phase position.
    idx: [[i32; 16]; 2],
    keep: [u16; 2],
}

impl RowsPlan {
    /// The plan for `h x w` images, `ph x pw` planes, `sy x sx` phases, stride `s`, padding
    /// `pad`; `None` when the rows do not fit (see the type).
    pub(super) fn new(
        (h, w): (usize, usize),
        (ph, pw): (usize, usize),
        (sy, sx): (usize, usize),
        s: usize,
        pad: usize,
    ) -> Option<Self> {
        if sx > 2 || pw > 16 || w > 32 {
            return None;
        }
        let (mut idx, mut keep) = ([[0i32; 16]; 2], [0u16; 2]);
        for ix in 0..w {
            let (rx, px) = ((ix + pad) % s, (ix + pad) / s);
            if rx < sx && px < pw {
                idx[ix / 16][ix % 16] = (16 * rx + px) as i32;
                keep[ix / 16] |= 1 << (ix % 16);
            }
        }
        Some(RowsPlan {
            s,
            pad,
            h,
            w,
            ph,
            pw,
            sy,
            sx,
            idx,
            keep,
        })
    }
}

/// Writes all `batch` images (`h x w`) of one channel, `dx_c`, from the channel's `sy·sx`
/// phase planes (plane `(ry, rx)` at `planes + (ry·sx + rx)·l`, position
/// `(n·PH + py)·PW + px`); pixels in no stored phase position get zero.
///
/// # Safety
/// [`vector_ok`] must hold; `planes[..sy·sx·l]` readable with `l >= batch·PH·PW`;
/// `dx_c[..batch·h·w]` writable and not accessed by other threads.
pub(super) unsafe fn unpack_rows(
    p: &RowsPlan,
    planes: *const f32,
    l: usize,
    batch: usize,
    dx_c: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract; phase rows are read at `py < PH`, `ry < sy`, masked
        // to `PW` floats, image rows written masked to `w` floats.
        avx512::unpack_rows(p, planes, l, batch, dx_c)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, planes, l, batch, dx_c);
        unreachable!("vector layout passes need AVX-512 (vector_ok)")
    }
}

/// Where the plane `(c, ry, rx)` of the input gradient goes: rows `ylo..yhi` and columns
/// `lo..hi` of its `ph x pw` planes are input pixels `(s·py + ry - pad, s·px + rx - pad)`.
// Only the AVX-512 passes read the plans.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
pub(super) struct Unpack {
    pub(super) ph: usize,
    pub(super) pw: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) pad: usize,
    pub(super) ry: usize,
    pub(super) rx: usize,
    pub(super) rows: (usize, usize),
    pub(super) cols: (usize, usize),
}

/// Writes the flat positions `c0 .. c0 + tile.len()` of one phase plane that are input pixels
/// (see [`Unpack`]) into the channel's images `dx_c` (`[n][h][w]`); other pixels untouched.
///
/// # Safety
/// [`vector_ok`] must hold; `st` is the plane's stride; `dx_c[..batch·h·w]` writable, where
/// `batch·PH·PW >= c0 + tile.len()`, and no other thread accesses the pixels written.
pub(super) unsafe fn unpack_tile(
    st: &Strided,
    u: &Unpack,
    c0: usize,
    tile: &[f32],
    dx_c: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract; only pixels `(s·py + ry - pad, s·px + rx - pad)` of
        // the rows and columns of `u` are written, which lie in the images.
        avx512::unpack_tile(st, u, c0, tile, dx_c)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (st, u, c0, tile, dx_c);
        unreachable!("vector layout passes need AVX-512 (vector_ok)")
    }
}

/// `dst.copy_from_slice(src)` for short runs without a library call: runs of up to 16
/// floats are two overlapping fixed-size copies (which the compiler keeps inline), longer
/// ones call `memcpy`.
#[inline(always)]
pub(super) fn copy_run(src: &[f32], dst: &mut [f32]) {
    let n = src.len();
    assert_eq!(dst.len(), n, "copy_run: lengths differ");
    match n {
        0 => {}
        1..=3 => {
            dst[0] = src[0];
            dst[n / 2] = src[n / 2];
            dst[n - 1] = src[n - 1];
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        8..=16 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

/// `dst.fill(0.0)` for short runs without a library call (as [`copy_run`]).
#[inline(always)]
pub(super) fn zero_run(dst: &mut [f32]) {
    let n = dst.len();
    match n {
        0 => {}
        1..=3 => {
            dst[0] = 0.0;
            dst[n / 2] = 0.0;
            dst[n - 1] = 0.0;
        }
        4..=7 => {
            dst[..4].copy_from_slice(&[0.0; 4]);
            dst[n - 4..].copy_from_slice(&[0.0; 4]);
        }
        8..=16 => {
            dst[..8].copy_from_slice(&[0.0; 8]);
            dst[n - 8..].copy_from_slice(&[0.0; 8]);
        }
        _ => dst.fill(0.0),
    }
}

/// Whether the vector layout passes run with `isa` (an available [`Isa::Avx512`], which
/// includes POPCNT for the counts).
pub(super) fn vector_ok(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && isa == Isa::Avx512
}

/// Writes the valid positions of the virtual columns `c0 .. c0 + tile.len()` (values `tile`),
/// in order, to `dst[..]`; returns how many were written. `dst` is the output row's start
/// plus [`ValidMask::valid_before`]`(c0)`.
///
/// # Safety
/// [`vector_ok`] must hold; `dst[..n]` must be writable, `n` the number of valid positions
/// in the range, and not accessed by any other thread.
#[inline]
pub(super) unsafe fn compress(m: &ValidMask, c0: usize, tile: &[f32], dst: *mut f32) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract (AVX-512F and POPCNT present, `dst` room for the
        // valid positions); the loads stay inside `tile`.
        avx512::compress(m, c0 % m.period, tile.as_ptr(), tile.len(), dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, c0, tile, dst);
        unreachable!("vector layout passes need AVX-512 (vector_ok)")
    }
}

/// Fills `dst` (flat positions `0 .. dst.len()`) with the next values of `src` at the valid
/// positions, in order, and zeros elsewhere; returns how many values were read.
///
/// # Safety
/// [`vector_ok`] must hold; `src[..n]` must be readable, `n` the number of valid positions
/// in `0 .. dst.len()`.
#[inline]
pub(super) unsafe fn expand(m: &ValidMask, src: *const f32, dst: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract (AVX-512F and POPCNT present, `src` holds the valid
        // positions' values); the stores stay inside `dst`.
        avx512::expand(m, src, dst.as_mut_ptr(), dst.len())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, src, dst);
        unreachable!("vector layout passes need AVX-512 (vector_ok)")
    }
}

/// `dst[i] = src[s·i]` for `i < len`.
///
/// # Safety
/// [`vector_ok`] must hold; `src[..s·(len-1) + 1]` readable and `dst[..len]` writable (when
/// `len > 0`), not overlapping.
#[cfg(test)]
#[inline]
unsafe fn gather(st: &Strided, src: *const f32, dst: *mut f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract.
        avx512::gather(st, src, dst, len)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (st, src, dst, len);
        unreachable!("vector layout passes need AVX-512 (vector_ok)")
    }
}

/// `dst[s·i] = src[i]` for `i < len` (the other elements of `dst` are untouched).
///
/// # Safety
/// [`vector_ok`] must hold; `src[..len]` readable and `dst[s·i]` writable for `i < len`, not
/// overlapping, and no other thread accesses those `dst` elements.
#[cfg(test)]
#[inline]
unsafe fn scatter(st: &Strided, src: *const f32, dst: *mut f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's contract.
        avx512::scatter(st, src, dst, len)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (st, src, dst, len);
        unreachable!("vector layout passes need AVX-512 (vector_ok)")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{PackPlan, RowsPlan, Strided, Unpack, ValidMask};

    /// Lanes `0..n` (`n <= 16`, or all).
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) unsafe fn compress(
        m: &ValidMask,
        mut r: usize,
        src: *const f32,
        len: usize,
        mut dst: *mut f32,
    ) -> usize {
        let start = dst;
        let mut i = 0;
        while i < len {
            let take = lanes(len - i);
            let keep = m.mask16(r) & take;
            let v = _mm512_maskz_compress_ps(keep, _mm512_maskz_loadu_ps(take, src.add(i)));
            let cnt = keep.count_ones() as usize;
            // Masked store of the packed lanes only (no `vcompressps` to memory, which is
            // slow on some CPUs).
            _mm512_mask_storeu_ps(dst, lanes(cnt), v);
            dst = dst.add(cnt);
            r += m.step;
            if r >= m.period {
                r -= m.period;
            }
            i += 16;
        }
        dst.offset_from(start) as usize
    }

    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) unsafe fn expand(
        m: &ValidMask,
        mut src: *const f32,
        dst: *mut f32,
        len: usize,
    ) -> usize {
        let start = src;
        let mut r = 0;
        let mut i = 0;
        while i < len {
            let take = lanes(len - i);
            let keep = m.mask16(r) & take;
            let cnt = keep.count_ones() as usize;
            let v = _mm512_maskz_expand_ps(keep, _mm512_maskz_loadu_ps(lanes(cnt), src));
            _mm512_mask_storeu_ps(dst.add(i), take, v);
            src = src.add(cnt);
            r += m.step;
            if r >= m.period {
                r -= m.period;
            }
            i += 16;
        }
        src.offset_from(start) as usize
    }

    /// Masked copy of `len` floats.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn copy(src: *const f32, dst: *mut f32, len: usize) {
        let mut i = 0;
        while i < len {
            let m = lanes(len - i);
            _mm512_mask_storeu_ps(dst.add(i), m, _mm512_maskz_loadu_ps(m, src.add(i)));
            i += 16;
        }
    }

    /// Zeros `dst[..len]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn zero(dst: *mut f32, len: usize) {
        let mut i = 0;
        while i < len {
            _mm512_mask_storeu_ps(dst.add(i), lanes(len - i), _mm512_setzero_ps());
            i += 16;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_group(
        p: &PackPlan,
        x_c: *const f32,
        batch: usize,
        ry: usize,
        dst: *mut f32,
        xs: usize,
    ) {
        let (s, w, pw) = (p.s, p.w, p.pw);
        let (ylo, yhi) = crate::im2col::valid_range(p.ph, p.h, s, ry, p.pad);
        let block = p.ph * pw;
        for n in 0..batch {
            let img = x_c.add(n * p.h * w);
            for py in 0..p.ph {
                let at = n * block + py * pw;
                if py < ylo || py >= yhi {
                    for rx in 0..p.cols.len() {
                        zero(dst.add(rx * xs + at), pw);
                    }
                    continue;
                }
                let row = img.add((s * py + ry - p.pad) * w);
                if let Some(perm) = &p.row_perm {
                    let a = _mm512_maskz_loadu_ps(lanes(w), row);
                    let b = if w > 16 {
                        _mm512_maskz_loadu_ps(lanes(w - 16), row.add(16))
                    } else {
                        _mm512_setzero_ps()
                    };
                    for (rx, (idx, keep)) in perm.iter().enumerate() {
                        let idx = _mm512_loadu_si512(idx.as_ptr() as *const _);
                        let v = _mm512_maskz_permutex2var_ps(*keep, a, idx, b);
                        _mm512_mask_storeu_ps(dst.add(rx * xs + at), lanes(pw), v);
                    }
                } else {
                    for (rx, &(lo, hi)) in p.cols.iter().enumerate() {
                        let d = dst.add(rx * xs + at);
                        if lo < hi {
                            zero(d, lo);
                            gather(&p.strided, row.add(s * lo + rx - p.pad), d.add(lo), hi - lo);
                            zero(d.add(hi), pw - hi);
                        } else {
                            zero(d, pw);
                        }
                    }
                }
            }
        }
        for rx in 0..p.cols.len() {
            zero(dst.add(rx * xs + batch * block), xs - batch * block);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unpack_rows(
        p: &RowsPlan,
        planes: *const f32,
        l: usize,
        batch: usize,
        dx_c: *mut f32,
    ) {
        let (w, pw) = (p.w, p.pw);
        let idx0 = _mm512_loadu_si512(p.idx[0].as_ptr() as *const _);
        let idx1 = _mm512_loadu_si512(p.idx[1].as_ptr() as *const _);
        let (row_mask, head, tail) = (lanes(pw), lanes(w), lanes(w.saturating_sub(16)));
        for n in 0..batch {
            for iy in 0..p.h {
                let d = dx_c.add((n * p.h + iy) * w);
                let (ry, py) = ((iy + p.pad) % p.s, (iy + p.pad) / p.s);
                if ry >= p.sy || py >= p.ph {
                    zero(d, w);
                    continue;
                }
                let src = planes.add(ry * p.sx * l + (n * p.ph + py) * pw);
                let a = _mm512_maskz_loadu_ps(row_mask, src);
                let b = if p.sx > 1 {
                    _mm512_maskz_loadu_ps(row_mask, src.add(l))
                } else {
                    _mm512_setzero_ps()
                };
                let v = _mm512_maskz_permutex2var_ps(p.keep[0], a, idx0, b);
                _mm512_mask_storeu_ps(d, head, v);
                if w > 16 {
                    let v = _mm512_maskz_permutex2var_ps(p.keep[1], a, idx1, b);
                    _mm512_mask_storeu_ps(d.add(16), tail, v);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unpack_tile(
        st: &Strided,
        u: &Unpack,
        c0: usize,
        tile: &[f32],
        dx_c: *mut f32,
    ) {
        let (ph, pw) = (u.ph, u.pw);
        let ((ylo, yhi), (lo, hi)) = (u.rows, u.cols);
        let end = c0 + tile.len();
        let (mut n, rem) = (c0 / (ph * pw), c0 % (ph * pw));
        let (mut py, mut px) = (rem / pw, rem % pw);
        let mut j = c0;
        while j < end {
            let row_end = (j - px + pw).min(end);
            if py >= ylo && py < yhi {
                let (a, b) = (px.max(lo), (px + row_end - j).min(hi));
                if a < b {
                    let src = tile.as_ptr().add(j - c0 + a - px);
                    let iy = st.s * py + u.ry - u.pad;
                    let d = dx_c.add((n * u.h + iy) * u.w + st.s * a + u.rx - u.pad);
                    scatter(st, src, d, b - a);
                }
            }
            j = row_end;
            px = 0;
            py += 1;
            if py == ph {
                py = 0;
                n += 1;
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn gather(st: &Strided, src: *const f32, dst: *mut f32, len: usize) {
        if st.s == 1 {
            return copy(src, dst, len);
        }
        let idx = _mm512_loadu_si512(st.gather_idx.as_ptr() as *const _);
        let mut i = 0;
        while i < len {
            let n = (len - i).min(st.gather_k);
            let span = st.s * (n - 1) + 1;
            let p = src.add(st.s * i);
            let a = _mm512_maskz_loadu_ps(lanes(span), p);
            let v = if span > 16 {
                let b = _mm512_maskz_loadu_ps(lanes(span - 16), p.add(16));
                _mm512_permutex2var_ps(a, idx, b)
            } else {
                _mm512_permutexvar_ps(idx, a)
            };
            _mm512_mask_storeu_ps(dst.add(i), lanes(n), v);
            i += n;
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn scatter(st: &Strided, src: *const f32, dst: *mut f32, len: usize) {
        if st.s == 1 {
            return copy(src, dst, len);
        }
        let idx = _mm512_loadu_si512(st.scatter_idx.as_ptr() as *const _);
        let mut i = 0;
        while i < len {
            let n = (len - i).min(st.scatter_k);
            let v = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(lanes(n), src.add(i)));
            let keep = st.scatter_keep & lanes(st.s * (n - 1) + 1);
            _mm512_mask_storeu_ps(dst.add(st.s * i), keep, v);
            i += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> bool {
        Isa::Avx512.is_available()
    }

    fn vals(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.5 + 1.0).collect()
    }

    /// Plane geometries `(ph, pw, oh, ow)` with odd sizes, periods below, at and above 16.
    const PLANES: &[(usize, usize, usize, usize)] = &[
        (1, 1, 1, 1),
        (2, 2, 1, 1),
        (4, 4, 3, 3),
        (5, 3, 4, 2),
        (3, 7, 3, 5),
        (8, 8, 7, 7),
        (9, 17, 6, 14),
        (15, 15, 14, 14),
        (2, 40, 1, 37),
    ];

    #[test]
    fn valid_before_counts_the_valid_positions() {
        for &(ph, pw, oh, ow) in PLANES {
            let m = ValidMask::new(ph, pw, oh, ow);
            let mut count = 0;
            for j in 0..3 * ph * pw + 1 {
                assert_eq!(m.valid_before(j), count, "{ph}x{pw} {oh}x{ow} j={j}");
                let r = j % (ph * pw);
                count += usize::from(r / pw < oh && r % pw < ow);
            }
        }
    }

    /// `compress` of every tile `c0 .. c0 + len` (starts anywhere, lengths across vector
    /// boundaries) writes exactly the valid values, in order, at `valid_before(c0)`.
    #[test]
    fn compress_keeps_exactly_the_valid_positions() {
        if !on() {
            return;
        }
        let mut checked = 0;
        for &(ph, pw, oh, ow) in PLANES {
            let m = ValidMask::new(ph, pw, oh, ow);
            let l = 3 * ph * pw;
            let v = vals(l);
            let valid = |j: usize| {
                let r = j % (ph * pw);
                r / pw < oh && r % pw < ow
            };
            let want: Vec<f32> = (0..l).filter(|&j| valid(j)).map(|j| v[j]).collect();
            for c0 in 0..l {
                for len in [0, 1, 5, 15, 16, 17, 31, 33, 48, 70].map(|n| n.min(l - c0)) {
                    let mut out = vec![-9.0f32; want.len() + 16];
                    let at = m.valid_before(c0);
                    // SAFETY: AVX-512 checked; `out` has room for every valid position.
                    let n = unsafe { compress(&m, c0, &v[c0..c0 + len], out.as_mut_ptr().add(at)) };
                    let end = m.valid_before(c0 + len);
                    assert_eq!(n, end - at, "{ph}x{pw} c0={c0} len={len}");
                    assert_eq!(&out[at..end], &want[at..end], "{ph}x{pw} c0={c0} len={len}");
                    assert!(out[..at].iter().chain(&out[end..]).all(|&x| x == -9.0));
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    /// `expand` is the scalar layout: the next value at each valid position, zero elsewhere.
    #[test]
    fn expand_is_the_inverse_of_compress() {
        if !on() {
            return;
        }
        for &(ph, pw, oh, ow) in PLANES {
            let m = ValidMask::new(ph, pw, oh, ow);
            for l in [0, 1, 7, ph * pw, 2 * ph * pw + 3, 5 * ph * pw] {
                let src = vals(l + 16);
                let mut want = vec![0.0f32; l];
                let mut k = 0;
                for (j, w) in want.iter_mut().enumerate() {
                    let r = j % (ph * pw);
                    if r / pw < oh && r % pw < ow {
                        *w = src[k];
                        k += 1;
                    }
                }
                let mut dst = vec![f32::NAN; l + 4];
                // SAFETY: AVX-512 checked; `src` holds more than `l` values.
                let n = unsafe { expand(&m, src.as_ptr(), &mut dst[..l]) };
                assert_eq!(n, k, "{ph}x{pw} l={l}");
                assert_eq!(&dst[..l], &want[..], "{ph}x{pw} l={l}");
                assert!(dst[l..].iter().all(|x| x.is_nan()));
            }
        }
    }

    /// `unpack_rows` writes every pixel: the value at its phase position, or zero where it has
    /// none; on the layouts of kernels 1/2/3/4/7, strides 1-3, paddings 0-3, odd sizes.
    #[test]
    fn unpack_rows_matches_the_phase_definition() {
        if !on() {
            return;
        }
        let mut checked = 0;
        for (h, w) in [(5, 5), (7, 9), (13, 11), (14, 14), (6, 32), (9, 17)] {
            for k in [1, 2, 3, 4, 7] {
                for s in 1..=3 {
                    for pad in 0..=3 {
                        if h + 2 * pad < k || w + 2 * pad < k {
                            continue;
                        }
                        let (oh, ow) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
                        let (ph, pw) = (oh + (k - 1) / s, ow + (k - 1) / s);
                        let (sy, sx) = (s.min(k), s.min(k));
                        let Some(plan) = RowsPlan::new((h, w), (ph, pw), (sy, sx), s, pad) else {
                            continue;
                        };
                        for batch in [1, 3] {
                            let l = batch * ph * pw + 5;
                            let planes = vals(sy * sx * l);
                            let mut dx = vec![f32::NAN; batch * h * w + 3];
                            // SAFETY: AVX-512 checked; `planes` holds sy·sx planes of `l`,
                            // `dx` the batch of images.
                            unsafe {
                                unpack_rows(&plan, planes.as_ptr(), l, batch, dx.as_mut_ptr())
                            };
                            for n in 0..batch {
                                for iy in 0..h {
                                    for ix in 0..w {
                                        let (ry, py) = ((iy + pad) % s, (iy + pad) / s);
                                        let (rx, px) = ((ix + pad) % s, (ix + pad) / s);
                                        let want = if ry < sy && rx < sx && py < ph && px < pw {
                                            planes[(ry * sx + rx) * l + (n * ph + py) * pw + px]
                                        } else {
                                            0.0
                                        };
                                        let got = dx[(n * h + iy) * w + ix];
                                        assert_eq!(
                                            got, want,
                                            "{h}x{w} k{k} s{s} p{pad} n{n} ({iy}, {ix})"
                                        );
                                    }
                                }
                            }
                            assert!(dx[batch * h * w..].iter().all(|x| x.is_nan()));
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 100, "{checked}");
    }

    /// `pack_group` fills every position of the `sx` planes of a row phase: the input pixel
    /// `(s·py + ry - pad, s·px + rx - pad)` or zero, then zeros up to the row stride; rows of
    /// one vector and wide rows (chunked gathers).
    #[test]
    fn pack_group_matches_the_phase_definition() {
        if !on() {
            return;
        }
        let mut checked = 0;
        for (h, w) in [(5, 5), (7, 9), (14, 14), (6, 32), (4, 33), (5, 47)] {
            for k in [1, 2, 3, 4, 7] {
                for s in 1..=3 {
                    for pad in 0..=3 {
                        if h + 2 * pad < k || w + 2 * pad < k {
                            continue;
                        }
                        let (oh, ow) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
                        let (ph, pw) = (oh + (k - 1) / s, ow + (k - 1) / s);
                        let (sy, sx) = (s.min(k), s.min(k));
                        let plan = PackPlan::new((h, w), (ph, pw), sx, s, pad);
                        let batch = 3;
                        let xs = batch * ph * pw + 7;
                        let x = vals(batch * h * w);
                        for ry in 0..sy {
                            let mut dst = vec![f32::NAN; sx * xs];
                            // SAFETY: AVX-512 checked; `x` holds the batch, `dst` sx planes.
                            unsafe {
                                pack_group(&plan, x.as_ptr(), batch, ry, dst.as_mut_ptr(), xs)
                            };
                            for rx in 0..sx {
                                for (j, &got) in dst[rx * xs..][..xs].iter().enumerate() {
                                    let (n, py, px) = (j / (ph * pw), j / pw % ph, j % pw);
                                    let (iy, ix) = (s * py + ry, s * px + rx);
                                    let inside = n < batch
                                        && (pad..h + pad).contains(&iy)
                                        && (pad..w + pad).contains(&ix);
                                    let want = if inside {
                                        x[(n * h + iy - pad) * w + ix - pad]
                                    } else {
                                        0.0
                                    };
                                    assert_eq!(
                                        got, want,
                                        "{h}x{w} k{k} s{s} p{pad} ry{ry} rx{rx} j{j}"
                                    );
                                }
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 200, "{checked}");
    }

    #[test]
    fn short_runs_copy_and_zero_exactly_their_range() {
        for n in 0..40 {
            let src = vals(n);
            let mut dst = vec![-1.0f32; n + 4];
            copy_run(&src, &mut dst[2..2 + n]);
            assert_eq!(&dst[2..2 + n], &src[..], "copy {n}");
            assert!(dst[..2].iter().chain(&dst[2 + n..]).all(|&x| x == -1.0));
            zero_run(&mut dst[2..2 + n]);
            assert!(dst[2..2 + n].iter().all(|&x| x == 0.0), "zero {n}");
            assert!(dst[..2].iter().chain(&dst[2 + n..]).all(|&x| x == -1.0));
        }
    }

    #[test]
    fn strided_gather_and_scatter_match_the_definition() {
        if !on() {
            return;
        }
        for s in 1..=7 {
            let st = Strided::new(s);
            for len in 0..=40 {
                let span = if len == 0 { 0 } else { s * (len - 1) + 1 };
                let src = vals(span);
                let mut dst = vec![-1.0f32; len + 5];
                // SAFETY: AVX-512 checked; `src` holds `span` floats, `dst` at least `len`.
                unsafe { gather(&st, src.as_ptr(), dst.as_mut_ptr(), len) };
                for i in 0..len {
                    assert_eq!(dst[i], src[s * i], "gather s={s} len={len} i={i}");
                }
                assert!(
                    dst[len..].iter().all(|&x| x == -1.0),
                    "gather s={s} len={len}"
                );

                let src = vals(len);
                let mut dst = vec![-1.0f32; span + 5];
                // SAFETY: as above, `dst` holds `span` floats.
                unsafe { scatter(&st, src.as_ptr(), dst.as_mut_ptr(), len) };
                for (d, &x) in dst.iter().enumerate() {
                    let want = if d % s == 0 && d / s < len {
                        src[d / s]
                    } else {
                        -1.0
                    };
                    assert_eq!(x, want, "scatter s={s} len={len} d={d}");
                }
            }
        }
    }
}
