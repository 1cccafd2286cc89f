//! Memory-layout conversions shared by dense and sparse code: the blocked matrix transpose
//! (batch-major `[N][I]` <-> feature-major `[I][N]`), and the feature-major gather of `u8`
//! images into the `f32` `[C][H][W][N]` batch layout the MLP runs on.

use rayon::prelude::*;

/// Elements below which [`transpose`] runs on the calling thread (e.g. a classifier's
/// `[classes][N]` output: waking rayon would cost more than the copy).
const SERIAL_TRANSPOSE: usize = 1 << 16;

/// Transposes the row-major `[rows][cols]` matrix `src` into `dst` (`[cols][rows]`), e.g. a
/// batch-major linear input `[N][I]` into the feature-major `[I][N]`.
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), rows * cols, "transpose: src is not [rows][cols]");
    assert_eq!(dst.len(), rows * cols, "transpose: dst is not [cols][rows]");
    if rows == 0 || cols == 0 {
        return;
    }
    const B: usize = 32;
    // Each task owns B consecutive rows of `dst` (= B columns of `src`).
    let block = |(bi, dblock): (usize, &mut [f32])| {
        let c0 = bi * B;
        let nc = dblock.len() / rows;
        for r0 in (0..rows).step_by(B) {
            let r1 = (r0 + B).min(rows);
            for dc in 0..nc {
                let drow = &mut dblock[dc * rows..(dc + 1) * rows];
                for r in r0..r1 {
                    drow[r] = src[r * cols + c0 + dc];
                }
            }
        }
    };
    if rows * cols < SERIAL_TRANSPOSE {
        dst.chunks_mut(B * rows).enumerate().for_each(block);
    } else {
        dst.par_chunks_mut(B * rows).enumerate().for_each(block);
    }
}

/// CNHW `[C][N][P]` (`P` = pixels) into batch-innermost CHWN `[C][P][N]` whose channel planes
/// are `stride >= N·P` floats apart (the layout of [`crate::sparse::HwnConv`]; the floats
/// between planes are left as they are).
pub fn cnhw_to_chwn(src: &[f32], c: usize, n: usize, p: usize, stride: usize, dst: &mut [f32]) {
    let plane = n * p;
    assert_eq!(src.len(), c * plane, "cnhw_to_chwn: src is not [C][N][P]");
    assert!(
        stride >= plane && dst.len() >= c * stride,
        "cnhw_to_chwn: dst too short"
    );
    planes(c * plane, &mut dst[..c * stride], stride, |ci, d| {
        transpose_serial(&src[ci * plane..][..plane], n, p, &mut d[..plane])
    });
}

/// The inverse of [`cnhw_to_chwn`]: CHWN planes `stride` apart into CNHW `[C][N][P]`.
pub fn chwn_to_cnhw(src: &[f32], c: usize, n: usize, p: usize, stride: usize, dst: &mut [f32]) {
    let plane = n * p;
    assert!(
        stride >= plane && src.len() >= c * stride,
        "chwn_to_cnhw: src too short"
    );
    assert_eq!(dst.len(), c * plane, "chwn_to_cnhw: dst is not [C][N][P]");
    planes(c * plane, dst, plane, |ci, d| {
        transpose_serial(&src[ci * stride..][..plane], p, n, d)
    });
}

/// Runs `f(channel, dst plane)` over the `stride`-apart planes of `dst`, in parallel when
/// `total` elements are worth it.
fn planes(total: usize, dst: &mut [f32], stride: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if total < SERIAL_TRANSPOSE {
        dst.chunks_mut(stride)
            .enumerate()
            .for_each(|(i, d)| f(i, d));
    } else {
        dst.par_chunks_mut(stride)
            .enumerate()
            .for_each(|(i, d)| f(i, d));
    }
}

/// [`transpose`] on the calling thread, in 16 x 16 blocks: with AVX-512, blocks transposed in
/// registers where one side is a multiple of 16 (the other one too, or under 16: masked
/// loads or stores), else one 16-lane gather (short rows) or scatter (few rows) per 16
/// elements; scalar otherwise.
fn transpose_serial(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(
        src.len() >= rows * cols && dst.len() >= rows * cols,
        "transpose: short buffers"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active() == crate::isa::Isa::Avx512
        && rows * cols < i32::MAX as usize
        && (rows.is_multiple_of(16) || cols.is_multiple_of(16))
    {
        // SAFETY: AVX-512F is the active level; both buffers hold rows x cols floats
        // (asserted above), every index below is under rows x cols.
        unsafe { transpose_avx512(src, rows, cols, dst) };
        return;
    }
    transpose_scalar(src, rows, cols, dst);
}

fn transpose_scalar(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        let r1 = (r0 + B).min(rows);
        for c0 in (0..cols).step_by(B) {
            let c1 = (c0 + B).min(cols);
            for c in c0..c1 {
                let d = &mut dst[c * rows..];
                for r in r0..r1 {
                    d[r] = src[r * cols + c];
                }
            }
        }
    }
}

/// See [`transpose_serial`].
///
/// # Safety
/// AVX-512F is available; `src` and `dst` hold `rows x cols < 2^31` floats; `rows` or `cols`
/// is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    if rows == 1 || cols == 1 {
        // A single row or column: the same order.
        std::ptr::copy_nonoverlapping(s, d, rows * cols);
        return;
    }
    if rows.is_multiple_of(16) && cols < 16 {
        // Short rows: each block of 16 rows is one masked load per row, transposed in
        // registers, `cols` stores.
        let m: __mmask16 = ((1u32 << cols) - 1) as u16;
        for r0 in (0..rows).step_by(16) {
            let r: [__m512; 16] =
                std::array::from_fn(|i| _mm512_maskz_loadu_ps(m, s.add((r0 + i) * cols)));
            let t = transpose16(r);
            for (c, v) in t.iter().enumerate().take(cols) {
                _mm512_storeu_ps(d.add(c * rows + r0), *v);
            }
        }
        return;
    }
    if cols.is_multiple_of(16) && rows < 16 {
        // Few rows: each 16-column block is `rows` loads, transposed in registers, one masked
        // store per destination row.
        let m: __mmask16 = ((1u32 << rows) - 1) as u16;
        for c0 in (0..cols).step_by(16) {
            let r: [__m512; 16] = std::array::from_fn(|i| {
                if i < rows {
                    _mm512_loadu_ps(s.add(i * cols + c0))
                } else {
                    _mm512_setzero_ps()
                }
            });
            let t = transpose16(r);
            for (i, v) in t.iter().enumerate() {
                _mm512_mask_storeu_ps(d.add((c0 + i) * rows), m, *v);
            }
        }
        return;
    }
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    if rows.is_multiple_of(16) && cols.is_multiple_of(16) {
        for r0 in (0..rows).step_by(16) {
            for c0 in (0..cols).step_by(16) {
                let r: [__m512; 16] =
                    std::array::from_fn(|i| _mm512_loadu_ps(s.add((r0 + i) * cols + c0)));
                let t = transpose16(r);
                for (i, v) in t.iter().enumerate() {
                    _mm512_storeu_ps(d.add((c0 + i) * rows + r0), *v);
                }
            }
        }
    } else if rows.is_multiple_of(16) {
        // Short rows: dst row c gathers column c, 16 source rows at a time.
        let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(cols as i32));
        for c in 0..cols {
            for r0 in (0..rows).step_by(16) {
                let v = _mm512_i32gather_ps::<4>(idx, s.add(r0 * cols + c));
                _mm512_storeu_ps(d.add(c * rows + r0), v);
            }
        }
    } else {
        // Few rows: each source row's 16-column pieces scatter down dst's column r.
        let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(rows as i32));
        for r in 0..rows {
            for c0 in (0..cols).step_by(16) {
                let v = _mm512_loadu_ps(s.add(r * cols + c0));
                _mm512_i32scatter_ps::<4>(d.add(c0 * rows + r), idx, v);
            }
        }
    }
}

/// The 16 x 16 transpose of 16 row vectors: pairs interleaved, then quads, then 128-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // t[2k], t[2k+1]: rows 2k, 2k+1 interleaved (columns 0,1 / 2,3 of each 128-bit lane).
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4k + j]: column j (+4, +8, +12 in lanes 1-3) of rows 4k..4k+3.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (k, j) = (i / 4, i % 4);
        let (a, b) = (
            _mm512_castps_pd(t[4 * k + (j / 2)]),
            _mm512_castps_pd(t[4 * k + 2 + (j / 2)]),
        );
        _mm512_castpd_ps(if j % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    let mut out = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        let v1 = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
        let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
        let w1 = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
        let w2 = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_f32x4::<0x88>(v1, v2);
        out[j + 8] = _mm512_shuffle_f32x4::<0xDD>(v1, v2);
        out[j + 4] = _mm512_shuffle_f32x4::<0x88>(w1, w2);
        out[j + 12] = _mm512_shuffle_f32x4::<0xDD>(w1, w2);
    }
    out
}

/// Samples per block of [`bytes_to_feature_major`].
pub const FEATURE_MAJOR_BLOCK: usize = 16;

/// The feature-major gather of `u8` images: for sample `k < m` (`m` = `samples.len()` rounded
/// down to a multiple of [`FEATURE_MAJOR_BLOCK`]), image `samples[k]` (the `hw·c` bytes
/// `images[samples[k]·hw·c..]`, pixel-major HWC) is written to `out[(ch·hw + px)·n + k]` as
/// `byte · (1/255)`, then `(x - mean[ch]) / std[ch]` with `normalize = Some((mean, std))`:
/// the same IEEE operations as the per-channel table `lut` (`lut[ch][byte]`), which the last
/// `hw·c mod 4` features use. Returns `m`; returns 0 (and writes nothing) unless the active
/// instruction set is AVX-512 ([`crate::isa`]) and `images` fits 32-bit offsets: the caller
/// converts the samples from the returned one on.
///
/// With AVX-512, 16 samples at a time: one 32-bit gather reads 4 consecutive bytes of 16
/// images, i.e. 4 features of 16 samples, and each feature's 16 values are stored as one
/// 64-byte run. Features are the outer loop, so each feature's run over the batch is written
/// out whole, in order.
#[allow(clippy::too_many_arguments)]
pub fn bytes_to_feature_major(
    images: &[u8],
    samples: &[usize],
    (hw, c): (usize, usize),
    normalize: Option<(&[f32], &[f32])>,
    lut: &[[f32; 256]],
    out: &mut [f32],
    n: usize,
) -> usize {
    let sz = hw * c;
    let m = samples.len() / FEATURE_MAJOR_BLOCK * FEATURE_MAJOR_BLOCK;
    if crate::isa::active() != crate::isa::Isa::Avx512
        || !cfg!(target_arch = "x86_64")
        || images.len() > i32::MAX as usize
        || m == 0
    {
        return 0;
    }
    assert!(
        n >= m && out.len() >= sz * n,
        "bytes_to_feature_major: out too short"
    );
    assert!(
        lut.len() >= c,
        "bytes_to_feature_major: a table per channel"
    );
    if let Some((mean, std)) = normalize {
        assert!(
            mean.len() >= c && std.len() >= c,
            "bytes_to_feature_major: mean/std per channel"
        );
    }
    let starts: Vec<i32> = samples[..m]
        .iter()
        .map(|&i| {
            assert!(
                (i + 1) * sz <= images.len(),
                "bytes_to_feature_major: sample {i} outside the images"
            );
            (i * sz) as i32
        })
        .collect();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is available (the active level); image `k` spans
    // `starts[k]..starts[k] + sz` of `images` (checked above), whose length fits an i32
    // offset; `out` holds `sz` runs of `n >= m` values; `mean`, `std` and `lut` cover `c`
    // channels.
    unsafe {
        avx512::bytes_to_feature_major(images, &starts, (hw, c), normalize, lut, out, n)
    };
    m
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::FEATURE_MAJOR_BLOCK;
    use std::arch::x86_64::*;

    /// The value of byte `v` (the low 8 bits of each lane): scaled, then normalised with
    /// `(mean, std)` when given.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn value(v: __m512i, scale: __m512, norm: Option<(__m512, __m512)>) -> __m512 {
        let x = _mm512_mul_ps(_mm512_cvtepi32_ps(v), scale);
        match norm {
            Some((m, s)) => _mm512_div_ps(_mm512_sub_ps(x, m), s),
            None => x,
        }
    }

    /// Writes samples `0..starts.len()` (a multiple of 16) of every feature run of `out`.
    ///
    /// # Safety
    /// AVX-512F must be available; image `k` must span `starts[k]..starts[k] + hw * c` of
    /// `images`; `out` must hold `hw * c` runs of `n >= starts.len()` values; `normalize` and
    /// `lut` must cover `c` channels.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn bytes_to_feature_major(
        images: &[u8],
        starts: &[i32],
        (hw, c): (usize, usize),
        normalize: Option<(&[f32], &[f32])>,
        lut: &[[f32; 256]],
        out: &mut [f32],
        n: usize,
    ) {
        let sz = hw * c;
        debug_assert!(starts.len().is_multiple_of(FEATURE_MAJOR_BLOCK) && starts.len() <= n);
        debug_assert!(out.len() >= sz * n);
        let bases: Vec<__m512i> = starts
            .chunks_exact(FEATURE_MAJOR_BLOCK)
            .map(|s| _mm512_loadu_si512(s.as_ptr().cast()))
            .collect();
        let scale = _mm512_set1_ps(1.0f32 / 255.0);
        let byte = _mm512_set1_epi32(0xFF);
        // Per channel `(mean, std)` when normalising.
        let norm: Option<Vec<(__m512, __m512)>> = normalize.map(|(mean, std)| {
            (0..c)
                .map(|ch| (_mm512_set1_ps(mean[ch]), _mm512_set1_ps(std[ch])))
                .collect()
        });
        let dst = out.as_mut_ptr();
        let src = images.as_ptr();
        let mut o = 0;
        while o + 4 <= sz {
            // The 4 features of bytes o..o+4 (pixel, channel): their output runs.
            let runs: [usize; 4] = std::array::from_fn(|j| {
                let (px, ch) = ((o + j) / c, (o + j) % c);
                (ch * hw + px) * n
            });
            let chans: [usize; 4] = std::array::from_fn(|j| (o + j) % c);
            let off = _mm512_set1_epi32(o as i32);
            for (b, &base) in bases.iter().enumerate() {
                let words = _mm512_i32gather_epi32::<1>(_mm512_add_epi32(base, off), src.cast());
                for j in 0..4 {
                    let v = match j {
                        0 => _mm512_and_si512(words, byte),
                        1 => _mm512_and_si512(_mm512_srli_epi32::<8>(words), byte),
                        2 => _mm512_and_si512(_mm512_srli_epi32::<16>(words), byte),
                        _ => _mm512_srli_epi32::<24>(words),
                    };
                    let nm = norm.as_ref().map(|t| t[chans[j]]);
                    _mm512_storeu_ps(
                        dst.add(runs[j] + b * FEATURE_MAJOR_BLOCK),
                        value(v, scale, nm),
                    );
                }
            }
            o += 4;
        }
        for ob in o..sz {
            let (px, ch) = (ob / c, ob % c);
            for (k, &st) in starts.iter().enumerate() {
                *dst.add((ch * hw + px) * n + k) = lut[ch][images[st as usize + ob] as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_indices() {
        for (rows, cols) in [(1, 1), (3, 5), (33, 70), (300, 400)] {
            let a: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let mut t = vec![0.0; rows * cols];
            transpose(&a, rows, cols, &mut t);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], a[r * cols + c]);
                }
            }
        }
    }

    /// The CNHW <-> CHWN conversions (whole 16 x 16 register blocks, gathers for short
    /// rows, scatters for few rows, scalar) against the definition, with plane strides.
    #[test]
    fn chwn_conversions_match_the_definition() {
        for (c, n, p) in [
            (2, 16, 16),
            (3, 32, 48),
            (2, 256, 4),
            (3, 48, 1),
            (2, 16, 9),
            (2, 5, 7),
            (1, 7, 32),
        ] {
            let plane = n * p;
            let stride = plane + 16;
            let x: Vec<f32> = (0..c * plane).map(|v| v as f32).collect();
            let mut h = vec![f32::NAN; c * stride];
            cnhw_to_chwn(&x, c, n, p, stride, &mut h);
            for ci in 0..c {
                for ni in 0..n {
                    for pi in 0..p {
                        assert_eq!(
                            h[ci * stride + pi * n + ni],
                            x[(ci * n + ni) * p + pi],
                            "cnhw_to_chwn c{c} n{n} p{p}"
                        );
                    }
                }
            }
            let mut back = vec![f32::NAN; c * plane];
            chwn_to_cnhw(&h, c, n, p, stride, &mut back);
            assert_eq!(back, x, "chwn_to_cnhw c{c} n{n} p{p}");
        }
    }

    #[test]
    fn bytes_to_feature_major_matches_the_tables() {
        let (hw, c, count) = (7 * 5, 3, 40);
        let images: Vec<u8> = (0..count * hw * c).map(|v| (v * 37 % 251) as u8).collect();
        let (mean, std) = ([0.4f32, 0.5, 0.6], [0.2f32, 0.25, 0.3]);
        for norm in [None, Some((&mean[..], &std[..]))] {
            let lut: Vec<[f32; 256]> = (0..c)
                .map(|ch| {
                    std::array::from_fn(|b| {
                        let x = b as f32 * (1.0f32 / 255.0);
                        norm.map_or(x, |(m, s)| (x - m[ch]) / s[ch])
                    })
                })
                .collect();
            let samples: Vec<usize> = (0..35).map(|k| (k * 7) % count).collect();
            let n = samples.len();
            let mut out = vec![f32::NAN; hw * c * n];
            let m = bytes_to_feature_major(&images, &samples, (hw, c), norm, &lut, &mut out, n);
            assert!(m == 0 || m == 32, "{m}");
            for (k, &i) in samples[..m].iter().enumerate() {
                for px in 0..hw {
                    for ch in 0..c {
                        let want = lut[ch][images[(i * hw + px) * c + ch] as usize];
                        assert_eq!(out[(ch * hw + px) * n + k].to_bits(), want.to_bits());
                    }
                }
            }
        }
    }
}
