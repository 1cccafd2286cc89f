//! The SGD update's kernels (`train::optim::Sgd` owns the optimizer; these touch raw
//! storage): PyTorch's `g' = g + wd·w; b = mom·b + g'; w -= lr·b` as one fused pass into new
//! buffers ([`sgd_pass`]), or in place on a parameter's and its momentum's CPU storage, over
//! the whole tensor ([`dense_in_place`]) or a sparse layer's active positions only
//! ([`compact_in_place`]). Every form has the same `f32` operations and rounding.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

/// The in-place update of a sparse layer without momentum at its active positions: `index`
/// (strictly ascending dense indices) with the compact gradient `g` (`g[e]` belongs to `index[e]`):
/// `w -= lr·g'`, one pass over the weight at the active positions, split over threads by
/// ranges of `index` for large layers. `hyper` is `[lr, momentum, weight_decay]`; the `f32`
/// operations are those of [`sgd_pass`].
pub(crate) fn compact_in_place(
    w: &Tensor,
    index: &[usize],
    g: &[f32],
    hyper: [f32; 3],
) -> candle_core::Result<()> {
    w.inplace_op1(&CompactUpdate {
        index,
        values: g,
        hyper,
        plain: true,
    })
}

/// The update of a sparse layer whose momentum is kept compactly (`b[e]` belongs to
/// `index[e]`): `b = mom·b + g'` in one contiguous pass (reading the weight at `index` only
/// for weight decay), then `w -= lr·b` in one pass over the weight at the active positions.
/// The `f32` operations of [`sgd_pass`].
pub(crate) fn compact_momentum(
    w: &Tensor,
    b: &mut [f32],
    index: &[usize],
    g: &[f32],
    hyper: [f32; 3],
) -> candle_core::Result<()> {
    let [_, mom, wd] = hyper;
    if b.len() != index.len() || g.len() != index.len() {
        candle_core::bail!("sgd: compact momentum does not fit the layer's pattern");
    }
    if wd != 0.0 {
        crate::kernels::with_f32(w, "sgd", |ws| {
            for ((bv, &gv), &k) in b.iter_mut().zip(g).zip(index) {
                *bv = *bv * mom + (gv + ws[k] * wd);
            }
            Ok(())
        })?;
    } else {
        for (bv, &gv) in b.iter_mut().zip(g) {
            *bv = *bv * mom + gv;
        }
    }
    w.inplace_op1(&CompactUpdate {
        index,
        values: b,
        hyper,
        plain: false,
    })
}

/// One in-place pass of the dense update on `dst` reading `src` (see [`Part`]) and the
/// gradient `g`: `Part::Momentum` on the momentum buffer from the weight, then
/// `Part::Weight` on the weight from the new buffer.
pub(crate) fn dense_in_place(
    dst: &Tensor,
    src: &Tensor,
    g: &[f32],
    hyper: [f32; 3],
    part: Part,
) -> candle_core::Result<()> {
    dst.inplace_op2(src, &DenseUpdate { g, hyper, part })
}

/// Which pass of the dense in-place update runs.
#[derive(Clone, Copy)]
pub(crate) enum Part {
    /// On the momentum buffer (source: the weight): `b = mom·b + (g + wd·w)`.
    Momentum,
    /// On the weight (source: the new momentum): `w = w - lr·b`.
    Weight,
}

/// One pass over a weight at its active positions `index`: subtracts `lr·values[e]` (the new
/// compact momentum), or with `plain` `lr·(values[e] + wd·w)` (the gradient, no momentum).
struct CompactUpdate<'a> {
    index: &'a [usize],
    values: &'a [f32],
    hyper: [f32; 3],
    plain: bool,
}

/// Entries per task of the compact pass (below twice this, one serial pass).
const COMPACT_CHUNK: usize = 1 << 14;

impl CompactUpdate<'_> {
    fn run(&self, dst: &mut [f32]) -> candle_core::Result<()> {
        let [lr, _, wd] = self.hyper;
        // Weight decay enters here only without momentum (else it is in the momentum).
        let wd = if self.plain { wd } else { 0.0 };
        let (index, values) = (self.index, self.values);
        // Strictly ascending indices (a layer's active positions in row-major order) below
        // the parameter's size: every entry lies in `dst`, and consecutive chunks of entries
        // own disjoint windows of it.
        if index.len() != values.len()
            || !index.is_sorted_by(|a, b| a < b)
            || index.last().is_some_and(|&k| k >= dst.len())
        {
            candle_core::bail!("sgd: compact gradient does not fit the parameter");
        }
        // Entries e0..e0 + n of one task, over the dense window of `dst` at `base`.
        let task = |e0: usize, base: usize, d: &mut [f32], n: usize| {
            let (ix, vs) = (&index[e0..e0 + n], &values[e0..e0 + n]);
            for (&k, &v) in ix.iter().zip(vs) {
                let w = &mut d[k - base];
                *w -= if wd != 0.0 { v + *w * wd } else { v } * lr;
            }
        };
        let n = index.len();
        if n < 2 * COMPACT_CHUNK {
            task(0, 0, dst, n);
            return Ok(());
        }
        let mut jobs = Vec::with_capacity(n.div_ceil(COMPACT_CHUNK));
        let (mut rest, mut base, mut e0) = (dst, 0usize, 0usize);
        while e0 < n {
            let len = COMPACT_CHUNK.min(n - e0);
            let end = if e0 + len < n {
                index[e0 + len]
            } else {
                base + rest.len()
            };
            let (d, tail) = rest.split_at_mut(end - base);
            jobs.push((e0, base, d, len));
            (rest, base, e0) = (tail, end, e0 + len);
        }
        jobs.into_par_iter()
            .for_each(|(e0, base, d, len)| task(e0, base, d, len));
        Ok(())
    }
}

impl InplaceOp1 for CompactUpdate<'_> {
    fn name(&self) -> &'static str {
        "rest-sgd-compact"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let dst = contiguous_mut(s, l)?;
        self.run(dst)
    }
}

/// The contiguous `f32` elements of `s` under `l`, mutably.
fn contiguous_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("sgd: parameter is not a contiguous f32 tensor"),
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("sgd: parameter is not a contiguous f32 tensor"),
    }
}

/// The in-place SGD update of a dense parameter with a momentum buffer, in two passes with
/// the arithmetic of [`sgd_pass`]: `Part::Momentum` on the buffer (source: the weight), then
/// `Part::Weight` on the weight (source: the new buffer).
struct DenseUpdate<'a> {
    g: &'a [f32],
    hyper: [f32; 3],
    part: Part,
}

impl InplaceOp2 for DenseUpdate<'_> {
    fn name(&self) -> &'static str {
        "rest-sgd-dense"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let src = contiguous(src, src_l)?;
        let dst = contiguous_mut(dst, dst_l)?;
        if dst.len() != src.len() || dst.len() != self.g.len() {
            candle_core::bail!("sgd: weight, momentum and gradient differ in size");
        }
        let [lr, mom, wd] = self.hyper;
        const CHUNK: usize = 1 << 15;
        let chunk = |(i, d): (usize, &mut [f32])| {
            let r = i * CHUNK..i * CHUNK + d.len();
            let (s, g) = (&src[r.clone()], &self.g[r]);
            match self.part {
                Part::Momentum => {
                    for ((b, &wv), &gv) in d.iter_mut().zip(s).zip(g) {
                        *b = *b * mom + if wd != 0.0 { gv + wv * wd } else { gv };
                    }
                }
                Part::Weight => {
                    for (w, &bv) in d.iter_mut().zip(s) {
                        *w -= bv * lr;
                    }
                }
            }
        };
        if dst.len() <= CHUNK {
            chunk((0, dst));
        } else {
            dst.par_chunks_mut(CHUNK).enumerate().for_each(chunk);
        }
        Ok(())
    }
}

/// One fused SGD pass (new buffers, no tensor storage touched): `g' = g + wd·w`, `b = mom·b + g'` (`b = g'` without an old buffer),
/// `w' = w - lr·b`; `nb` is empty when momentum is off (then `b = g'`). Chunks of large
/// parameters run in parallel; the result does not depend on the split.
pub(crate) fn sgd_pass(
    nw: &mut [f32],
    nb: &mut [f32],
    ws: &[f32],
    gs: &[f32],
    bs: Option<&[f32]>,
    [lr, mom, wd]: [f32; 3],
) {
    const CHUNK: usize = 1 << 15;
    let chunk = |(i, nwc): (usize, &mut [f32]), nbc: &mut [f32]| {
        let r = i * CHUNK..i * CHUNK + nwc.len();
        let (w, g) = (&ws[r.clone()], &gs[r.clone()]);
        let decayed = |gv: f32, wv: f32| if wd != 0.0 { gv + wv * wd } else { gv };
        match (bs, nbc.is_empty()) {
            (Some(b), false) => {
                for ((((o, ob), &wv), &gv), &bv) in
                    nwc.iter_mut().zip(nbc.iter_mut()).zip(w).zip(g).zip(&b[r])
                {
                    let d = bv * mom + decayed(gv, wv);
                    *ob = d;
                    *o = wv - d * lr;
                }
            }
            (_, false) => {
                for (((o, ob), &wv), &gv) in nwc.iter_mut().zip(nbc.iter_mut()).zip(w).zip(g) {
                    let d = decayed(gv, wv);
                    *ob = d;
                    *o = wv - d * lr;
                }
            }
            (_, true) => {
                for ((o, &wv), &gv) in nwc.iter_mut().zip(w).zip(g) {
                    *o = wv - decayed(gv, wv) * lr;
                }
            }
        }
    };
    if nw.len() <= CHUNK {
        chunk((0, nw), nb);
    } else if nb.is_empty() {
        nw.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|c| chunk(c, &mut []));
    } else {
        nw.par_chunks_mut(CHUNK)
            .enumerate()
            .zip(nb.par_chunks_mut(CHUNK))
            .for_each(|(c, b)| chunk(c, b));
    }
}
