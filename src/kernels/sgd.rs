//! The SGD update's kernels (`train::optim::Sgd` owns the optimizer; these touch raw
//! storage): PyTorch's `g' = g + wd·w; b = mom·b + g'; w -= lr·b` as one fused pass into new
//! buffers ([`sgd_pass`]), or in place on a parameter's and its momentum's CPU storage, over
//! the whole tensor ([`dense_in_place`]) or a sparse layer's active positions only
//! ([`compact_in_place`]). Every form has the same `f32` operations and rounding.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

/// The in-place update of a sparse layer at its active positions: `index` (ascending dense
/// indices) with the compact gradient `g` (`g[e]` belongs to `index[e]`). With a momentum
/// buffer `b`: one pass over the buffer (`b = mom·b + g'`, reading the weight only for weight
/// decay) that also keeps the new buffer values compactly, then one pass over the weight
/// (`w -= lr·b` from those); without: `w -= lr·g'`. Each pass touches its array once, at the
/// active positions, split over threads by ranges of `index` for large layers. `hyper` is
/// `[lr, momentum, weight_decay]`; the `f32` operations are those of [`sgd_pass`].
pub(crate) fn compact_in_place(
    w: &Tensor,
    b: Option<&Tensor>,
    index: &[usize],
    g: &[f32],
    hyper: [f32; 3],
) -> candle_core::Result<()> {
    let Some(b) = b else {
        return w.inplace_op1(&CompactUpdate {
            index,
            g,
            hyper,
            part: Part::Plain,
            steps: std::sync::Mutex::new(Vec::new()),
        });
    };
    let momentum = CompactUpdate {
        index,
        g,
        hyper,
        part: Part::Momentum,
        steps: std::sync::Mutex::new(vec![0.0f32; index.len()]),
    };
    if hyper[2] != 0.0 {
        b.inplace_op2(w, &momentum)?;
    } else {
        // No weight decay: the buffer's pass does not read the weight.
        b.inplace_op1(&momentum)?;
    }
    w.inplace_op1(&CompactUpdate {
        part: Part::Weight,
        ..momentum
    })
}

/// The update of a sparse layer whose momentum is kept compactly (`b[e]` belongs to
/// `index[e]`): `b = mom·b + g'` in one contiguous pass (reading the weight at `index` only
/// for weight decay), then `w -= lr·b` at the active positions. The `f32` operations of
/// [`sgd_pass`].
pub(crate) fn compact_momentum(
    w: &Tensor,
    b: &mut Vec<f32>,
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
    let op = CompactUpdate {
        index,
        g,
        hyper,
        part: Part::Weight,
        steps: std::sync::Mutex::new(std::mem::take(b)),
    };
    let r = w.inplace_op1(&op);
    *b = match op.steps.into_inner() {
        Ok(v) => v,
        Err(p) => p.into_inner(),
    };
    r
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

/// Which in-place pass an update runs.
#[derive(Clone, Copy)]
pub(crate) enum Part {
    /// On the momentum buffer (source: the weight): `b = mom·b + (g + wd·w)`.
    Momentum,
    /// On the weight (source: the new momentum): `w = w - lr·b`.
    Weight,
    /// On the weight, no momentum: `w = w - lr·(g + wd·w)`.
    Plain,
}

struct CompactUpdate<'a> {
    index: &'a [usize],
    g: &'a [f32],
    hyper: [f32; 3],
    part: Part,
    /// The new momentum at `index` (compact): written by the buffer's pass, read by the
    /// weight's.
    steps: std::sync::Mutex<Vec<f32>>,
}

/// Entries per task of the compact passes (below twice this, one serial pass).
const COMPACT_CHUNK: usize = 1 << 14;

impl CompactUpdate<'_> {
    /// The pass over `dst` (the buffer, or the weight); `src` is the weight where the
    /// buffer's pass reads it for weight decay.
    fn run(&self, dst: &mut [f32], src: &[f32]) -> candle_core::Result<()> {
        let [lr, mom, wd] = self.hyper;
        let (index, g) = (self.index, self.g);
        let decays = wd != 0.0 && matches!(self.part, Part::Momentum);
        if index.len() != g.len()
            || index.last().is_some_and(|&k| k >= dst.len())
            || (decays && src.len() != dst.len())
        {
            candle_core::bail!("sgd: compact gradient does not fit the parameter");
        }
        let mut guard = match self.steps.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let steps: &mut [f32] = &mut guard;
        let part = self.part;
        if !matches!(part, Part::Plain) && steps.len() != index.len() {
            candle_core::bail!("sgd: compact momentum steps missing");
        }
        // Entries e0..e0 + st.len() (or + n) of one task, over the dense window at `base`.
        let task = |e0: usize, base: usize, d: &mut [f32], st: &mut [f32], n: usize| {
            let (ix, gs) = (&index[e0..e0 + n], &g[e0..e0 + n]);
            match part {
                Part::Momentum if decays => {
                    for ((&k, &gv), sv) in ix.iter().zip(gs).zip(st.iter_mut()) {
                        let b = &mut d[k - base];
                        *b = *b * mom + (gv + src[k] * wd);
                        *sv = *b;
                    }
                }
                Part::Momentum => {
                    for ((&k, &gv), sv) in ix.iter().zip(gs).zip(st.iter_mut()) {
                        let b = &mut d[k - base];
                        *b = *b * mom + gv;
                        *sv = *b;
                    }
                }
                Part::Weight => {
                    for (&k, &sv) in ix.iter().zip(st.iter()) {
                        d[k - base] -= sv * lr;
                    }
                }
                Part::Plain => {
                    for (&k, &gv) in ix.iter().zip(gs) {
                        let w = &mut d[k - base];
                        let gd = if wd != 0.0 { gv + *w * wd } else { gv };
                        *w -= gd * lr;
                    }
                }
            }
        };
        let n = index.len();
        if n < 2 * COMPACT_CHUNK || !index.is_sorted_by(|a, b| a < b) {
            task(0, 0, dst, steps, n);
            return Ok(());
        }
        // Ascending indices: consecutive chunks of entries own disjoint dense windows.
        let mut jobs = Vec::with_capacity(n.div_ceil(COMPACT_CHUNK));
        let (mut rest, mut st_rest, mut base, mut e0) = (dst, steps, 0usize, 0usize);
        while e0 < n {
            let len = COMPACT_CHUNK.min(n - e0);
            let end = if e0 + len < n {
                index[e0 + len]
            } else {
                base + rest.len()
            };
            let (d, tail) = rest.split_at_mut(end - base);
            let (st, st_tail) = st_rest.split_at_mut(if st_rest.is_empty() { 0 } else { len });
            jobs.push((e0, base, d, st, len));
            (rest, st_rest, base, e0) = (tail, st_tail, end, e0 + len);
        }
        jobs.into_par_iter()
            .for_each(|(e0, base, d, st, len)| task(e0, base, d, st, len));
        Ok(())
    }
}

impl InplaceOp1 for CompactUpdate<'_> {
    fn name(&self) -> &'static str {
        "rest-sgd-compact"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let dst = contiguous_mut(s, l)?;
        self.run(dst, &[])
    }
}

impl InplaceOp2 for CompactUpdate<'_> {
    fn name(&self) -> &'static str {
        "rest-sgd-compact"
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
        if dst.len() != src.len() {
            candle_core::bail!("sgd: weight and momentum differ in size");
        }
        self.run(dst, src)
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
/// `Part::Weight` on the weight (source: the new buffer). `Part::Plain` is not used here.
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
                _ => {
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
