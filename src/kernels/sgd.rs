//! The SGD update's kernels (`train::optim::Sgd` owns the optimizer; these touch raw
//! storage): PyTorch's `g' = g + wd·w; b = mom·b + g'; w -= lr·b` as one fused pass into new
//! buffers ([`sgd_pass`]), or in place on a parameter's and its momentum's CPU storage, over
//! the whole tensor ([`dense_in_place`]) or a sparse layer's active positions only
//! ([`compact_in_place`]). Every form has the same `f32` operations and rounding.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

/// One in-place pass of the update on `dst` (a contiguous `f32` CPU tensor) at the dense
/// indices `index` with the compact gradient `g` (`g[e]` belongs to `index[e]`), reading `src`
/// (`Part::Momentum`: the weight; `Part::Weight`: the new momentum; `Part::Plain`: none).
/// `hyper` is `[lr, momentum, weight_decay]`.
pub(crate) fn compact_in_place(
    dst: &Tensor,
    src: Option<&Tensor>,
    index: &[usize],
    g: &[f32],
    hyper: [f32; 3],
    part: Part,
) -> candle_core::Result<()> {
    let op = CompactUpdate {
        index,
        g,
        hyper,
        part,
    };
    match src {
        None => dst.inplace_op1(&op),
        Some(src) => dst.inplace_op2(src, &op),
    }
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
}

impl CompactUpdate<'_> {
    fn run(&self, dst: &mut [f32], src: &[f32]) {
        let [lr, mom, wd] = self.hyper;
        let decayed = |gv: f32, wv: f32| if wd != 0.0 { gv + wv * wd } else { gv };
        let it = self.index.iter().zip(self.g);
        match self.part {
            Part::Momentum => it.for_each(|(&k, &gv)| dst[k] = dst[k] * mom + decayed(gv, src[k])),
            Part::Weight => it.for_each(|(&k, _)| dst[k] -= src[k] * lr),
            Part::Plain => it.for_each(|(&k, &gv)| dst[k] -= decayed(gv, dst[k]) * lr),
        }
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

impl InplaceOp1 for CompactUpdate<'_> {
    fn name(&self) -> &'static str {
        "rest-sgd-compact"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let dst = contiguous_mut(s, l)?;
        self.run(dst, &[]);
        Ok(())
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
        self.run(dst, src);
        Ok(())
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
