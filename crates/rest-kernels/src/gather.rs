//! Short strided row gathers: `dst[i] = src[stride·i + off - pad]`, zero where that index
//! falls outside the source row. The lowering of a convolution's input (im2col) copies
//! millions of such rows of a few floats each (a 4x4 stride-2 kernel on a 14-pixel row reads
//! 7 of them): a scalar loop with its two zero fills costs more per element than the copy.
//! With AVX-512 a row of up to 16 outputs from up to 32 source floats is two masked loads,
//! one two-source permute and one masked store.

/// A precomputed gather for rows of one geometry (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct RowGather {
    /// Source index per output lane (valid lanes only).
    idx: [i32; 16],
    /// Lanes whose source index lies in the row.
    keep: u16,
    len: usize,
    src_len: usize,
}

impl RowGather {
    /// A gather of `len` outputs `dst[i] = src[stride·i + off - pad]` from source rows of
    /// `src_len` floats; `None` when the rows are too long for one vector (`len > 16` or
    /// `src_len > 32`) or the active instruction set is not AVX-512 (callers keep their scalar loop then).
    pub fn new(len: usize, src_len: usize, stride: usize, off: usize, pad: usize) -> Option<Self> {
        if len > 16 || src_len > 32 || !has_avx512() {
            return None;
        }
        let mut idx = [0i32; 16];
        let mut keep = 0u16;
        for (i, slot) in idx.iter_mut().enumerate().take(len) {
            let col = (stride * i + off) as isize - pad as isize;
            if col >= 0 && (col as usize) < src_len {
                *slot = col as i32;
                keep |= 1 << i;
            }
        }
        Some(RowGather {
            idx,
            keep,
            len,
            src_len,
        })
    }

    /// Applies the gather to one row: `dst` (`len` floats) from `src` (`src_len` floats).
    #[inline]
    pub fn apply(&self, src: &[f32], dst: &mut [f32]) {
        assert!(
            src.len() >= self.src_len && dst.len() >= self.len,
            "RowGather: row too short"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: plans exist only on CPUs with AVX-512F (`new` checks the active level, which
        // is available); the lengths were checked above, and the masked loads and store touch only `src[..src_len]` and
        // `dst[..len]`.
        unsafe {
            avx512::apply(self, src.as_ptr(), dst.as_mut_ptr())
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("RowGather plans are only built with AVX-512");
    }
}

/// The adjoint of a [`RowGather`]: `dst[stride·i + off - pad] += src[i]` for `i < len` where
/// that index lies in `0..dst_len` (col2im's scatter-add of one row). Every destination
/// receives at most one source value, so the vector form (a permute and a masked add over the
/// destination's two vectors) is exact.
#[derive(Debug, Clone, Copy)]
pub struct RowScatterAdd {
    /// Source index per destination lane, for the two destination vectors.
    idx: [[i32; 16]; 2],
    /// Destination lanes that receive a value.
    keep: [u16; 2],
    len: usize,
    dst_len: usize,
}

impl RowScatterAdd {
    /// `None` when `len > 16`, `dst_len > 32` or the active instruction set is not AVX-512.
    pub fn new(len: usize, dst_len: usize, stride: usize, off: usize, pad: usize) -> Option<Self> {
        if len > 16 || dst_len > 32 || stride == 0 || !has_avx512() {
            return None;
        }
        let mut idx = [[0i32; 16]; 2];
        let mut keep = [0u16; 2];
        for i in 0..len {
            let d = (stride * i + off) as isize - pad as isize;
            if d >= 0 && (d as usize) < dst_len {
                let d = d as usize;
                idx[d / 16][d % 16] = i as i32;
                keep[d / 16] |= 1 << (d % 16);
            }
        }
        Some(RowScatterAdd {
            idx,
            keep,
            len,
            dst_len,
        })
    }

    /// Adds `src` (`len` floats) onto `dst` (`dst_len` floats).
    #[inline]
    pub fn apply(&self, src: &[f32], dst: &mut [f32]) {
        assert!(
            src.len() >= self.len && dst.len() >= self.dst_len,
            "RowScatterAdd: row too short"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: plans exist only on CPUs with AVX-512F (checked in `new`); the lengths were
        // checked above and the masked accesses stay inside `src[..len]` and `dst[..dst_len]`.
        unsafe {
            avx512::scatter_add(self, src.as_ptr(), dst.as_mut_ptr())
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("RowScatterAdd plans are only built with AVX-512");
    }
}

/// Whether plans are built: the active instruction set is AVX-512 ([`crate::isa`]).
fn has_avx512() -> bool {
    cfg!(target_arch = "x86_64") && crate::isa::active() == crate::isa::Isa::Avx512
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Lanes `0..n` (`n <= 16`).
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            (1u16 << n) - 1
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scatter_add(g: &super::RowScatterAdd, src: *const f32, dst: *mut f32) {
        let (idx, keep, len, dst_len) = (&g.idx, g.keep, g.len, g.dst_len);
        let v = _mm512_maskz_loadu_ps(lanes(len), src);
        for (h, (ix, &k)) in idx.iter().zip(keep.iter()).enumerate() {
            if k == 0 || 16 * h >= dst_len {
                continue;
            }
            let m = lanes(dst_len - 16 * h);
            let d = dst.add(16 * h);
            let cur = _mm512_maskz_loadu_ps(m, d);
            let add =
                _mm512_maskz_permutexvar_ps(k, _mm512_loadu_si512(ix.as_ptr() as *const _), v);
            _mm512_mask_storeu_ps(d, m, _mm512_add_ps(cur, add));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn apply(g: &super::RowGather, src: *const f32, dst: *mut f32) {
        let a = _mm512_maskz_loadu_ps(lanes(g.src_len), src);
        let b = if g.src_len > 16 {
            _mm512_maskz_loadu_ps(lanes(g.src_len - 16), src.add(16))
        } else {
            _mm512_setzero_ps()
        };
        let idx = _mm512_loadu_si512(g.idx.as_ptr() as *const _);
        let v = _mm512_maskz_permutex2var_ps(g.keep, a, idx, b);
        _mm512_mask_storeu_ps(dst, lanes(g.len), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar definition, independently of the plan.
    fn reference(src: &[f32], len: usize, stride: usize, off: usize, pad: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let col = (stride * i + off) as isize - pad as isize;
                if col >= 0 && (col as usize) < src.len() {
                    src[col as usize]
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_on_every_small_geometry() {
        let mut checked = 0;
        for src_len in 1..=32 {
            let src: Vec<f32> = (0..src_len).map(|v| v as f32 + 0.5).collect();
            for stride in 1..=3 {
                for off in 0..4 {
                    for pad in 0..4 {
                        for len in 0..=16 {
                            let Some(plan) = RowGather::new(len, src_len, stride, off, pad) else {
                                continue;
                            };
                            // Sentinels past `len` must survive.
                            let mut dst = vec![-7.0f32; len + 3];
                            plan.apply(&src, &mut dst);
                            let want = reference(&src, len, stride, off, pad);
                            assert_eq!(
                                &dst[..len],
                                &want[..],
                                "{src_len} {stride} {off} {pad} {len}"
                            );
                            assert!(dst[len..].iter().all(|&v| v == -7.0));
                            checked += 1;
                        }
                    }
                }
            }
        }
        // Without AVX-512 there is no plan (callers use their scalar loop): nothing to check.
        if has_avx512() {
            assert!(checked > 10_000, "{checked}");
        }
    }

    #[test]
    fn scatter_add_is_the_adjoint_of_the_gather() {
        let mut checked = 0;
        for dst_len in 1..=32 {
            for stride in 1..=3 {
                for off in 0..4 {
                    for pad in 0..4 {
                        for len in 0..=16 {
                            let Some(plan) = RowScatterAdd::new(len, dst_len, stride, off, pad)
                            else {
                                continue;
                            };
                            let src: Vec<f32> = (0..len).map(|v| v as f32 + 0.25).collect();
                            let mut dst: Vec<f32> =
                                (0..dst_len + 2).map(|v| 100.0 * v as f32).collect();
                            let mut want = dst.clone();
                            for (i, &v) in src.iter().enumerate() {
                                let d = (stride * i + off) as isize - pad as isize;
                                if d >= 0 && (d as usize) < dst_len {
                                    want[d as usize] += v;
                                }
                            }
                            plan.apply(&src, &mut dst);
                            assert_eq!(dst, want, "{dst_len} {stride} {off} {pad} {len}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        if has_avx512() {
            assert!(checked > 10_000, "{checked}");
        }
    }

    #[test]
    fn refuses_rows_longer_than_a_vector() {
        assert!(RowGather::new(17, 32, 1, 0, 0).is_none());
        assert!(RowGather::new(16, 33, 1, 0, 0).is_none());
        assert!(RowScatterAdd::new(17, 32, 1, 0, 0).is_none());
        assert!(RowScatterAdd::new(16, 33, 1, 0, 0).is_none());
    }
}
