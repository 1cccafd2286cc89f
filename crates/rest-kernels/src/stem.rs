//! Dense convolution of few input channels (a ResNet stem: 3 channels, 7x7, stride 2)
//! straight from the input's stride phases, without im2col: the forward pass and the weight
//! gradient.
//!
//! The padded input of a group of images is split into its `s x s` phases
//! (`phase[c][py][px][n]` holds `xpad[c][n][s·i + py][s·j + px]`), so every tap reads a
//! contiguous run of a phase row for a whole output row: tap `(ky, kx)` of output row `oy` is
//! row `oy + ky / s` of phase `(ky % s, kx % s)` from column `kx / s`. A group's phases fit
//! in L1 and serve every output channel.
//!
//! * Forward: `y[o][n][oy][..] = Σ_t w[o][t] · tap_t[n][oy][..]`, 16 output channels of one
//!   16-pixel run in registers, each tap row loaded once for all of them, each weight a
//!   broadcast operand (folded inference BatchNorm + ReLU applied at the store).
//! * Weight gradient: `dw[o][t] = Σ_{n, oy} dy[o][n][oy][..] · tap_t[n][oy][..]`, register
//!   blocks of 3 output channels x 7 taps of 16-lane partial sums (the lanes summed once at
//!   the end).
//!
//! The im2col route writes and reads a `C·KH·KW`-row column matrix per tile and hands a GEMM
//! a short-and-wide (weight gradient) or short-and-deep (forward) product. ResNet18's stem, 2
//! threads (`cargo run --release -p rest-kernels --example dense_conv_parts -- 2 3 B HW 64 7
//! 2 3`): forward 32 px batch 256 6.2 -> 4.7 ms, 128 px batch 64 24 -> 20 ms; weight
//! gradient 8.7 -> 6.9 and 35.3 -> 28 ms.
//! REST's CNN's first layer (4x4, stride 2) keeps its tap-class route, faster there.

use rayon::prelude::*;

use crate::im2col::Conv2dGeom;
use crate::pool::{max_pool2d_fwd, MaxPool2dGeom};
use crate::util::SendPtr;

/// Output channels of a weight-gradient register block (x [`NR`] taps: 21 accumulators and
/// 7 tap rows in registers; 4 x 7 spilled).
const MR: usize = 3;
/// Taps (`c, ky, kx` triples) of a weight-gradient register block.
const NR: usize = 7;
/// Output channels of a forward register block, one 16-pixel run each (blocks of 8 channels
/// x 2 or 3 runs, 4 x 4 and 12 x 2 measured no faster).
const FWD_OC: usize = 16;
/// Largest `C·KH·KW` taken (the 16-lane partial sums of a thread are `OC x C·KH·KW x 16`
/// floats, kept in L2).
const MAX_TAPS: usize = 256;
/// Floats of the phase buffer of one group of images (64 KiB: in L1 while every block of
/// output channels and taps passes over it; 2 MiB groups were ~15 % slower).
const GROUP_FLOATS: usize = 1 << 14;

/// Whether [`forward`] and [`bwd_weight`] take geometry `g` (valid): AVX-512, few input
/// channels (`C·KH·KW <= 256`), kernels larger than 1x1, output rows of at least 8 pixels.
pub(crate) fn applies(g: &Conv2dGeom) -> bool {
    cfg!(target_arch = "x86_64")
        && crate::isa::active() == crate::isa::Isa::Avx512
        && g.k() <= MAX_TAPS
        && g.kh * g.kw > 1
        && g.ow() >= 8
}

/// The phase buffer geometry: `s x s` phases of `hq x wq` floats per channel and image.
struct Phases {
    s: usize,
    hq: usize,
    wq: usize,
}

impl Phases {
    fn new(g: &Conv2dGeom) -> Self {
        let s = g.stride;
        Phases {
            s,
            hq: (g.h + 2 * g.pad).div_ceil(s),
            wq: (g.w + 2 * g.pad).div_ceil(s),
        }
    }

    /// Floats per image (all channels and phases).
    fn per_image(&self, c: usize) -> usize {
        c * self.s * self.s * self.hq * self.wq
    }

    /// Per tap `c·KH·KW + ky·KW + kx`: its phase plane (`(c·s + ky % s)·s + kx % s`), and the
    /// row and column its output row 0 starts at (`ky / s`, `kx / s`; `oy + ky / s < hq`
    /// and `kx / s + OW <= wq` for every output row `oy`).
    fn taps(&self, g: &Conv2dGeom) -> Vec<(usize, usize, usize)> {
        let s = self.s;
        (0..g.k())
            .map(|t| {
                let (c, r) = (t / (g.kh * g.kw), t % (g.kh * g.kw));
                let (ky, kx) = (r / g.kw, r % g.kw);
                ((c * s + ky % s) * s + kx % s, ky / s, kx / s)
            })
            .collect()
    }

    /// Fills `buf` (`[c][py][px][n - n0][hq][wq]`, zero where the padding is) with images
    /// `n0..n1` of the CNHW input `x`.
    fn fill(&self, g: &Conv2dGeom, x: &[f32], (n0, n1): (usize, usize), buf: &mut [f32]) {
        let (s, hq, wq) = (self.s, self.hq, self.wq);
        let nl = n1 - n0;
        let plane = hq * wq;
        // Phase columns j whose source column s·j + px - pad is real: j0..j1.
        let cols = |px: usize| {
            let j0 = g.pad.saturating_sub(px).div_ceil(s);
            let j1 = (g.w + g.pad).saturating_sub(px).div_ceil(s).min(wq);
            (j0, j1.max(j0))
        };
        for c in 0..g.c {
            for n in n0..n1 {
                let src = &x[(c * g.n + n) * g.h * g.w..][..g.h * g.w];
                for py in 0..s {
                    for px in 0..s {
                        let at = (((c * s + py) * s + px) * nl + (n - n0)) * plane;
                        let dst = &mut buf[at..at + plane];
                        let (j0, j1) = cols(px);
                        for i in 0..hq {
                            let row = &mut dst[i * wq..(i + 1) * wq];
                            let yp = s * i + py;
                            if yp < g.pad || yp - g.pad >= g.h || j0 == j1 {
                                row.fill(0.0);
                                continue;
                            }
                            let sr = &src[(yp - g.pad) * g.w..][..g.w];
                            row[..j0].fill(0.0);
                            for (j, d) in row[j0..j1].iter_mut().enumerate() {
                                *d = sr[s * (j0 + j) + px - g.pad];
                            }
                            row[j1..].fill(0.0);
                        }
                    }
                }
            }
        }
    }
}

/// Equal groups of consecutive images whose phases take at most [`GROUP_FLOATS`], as many
/// as a multiple of `threads` where there are enough images.
fn image_groups(g: &Conv2dGeom, per_img: usize, threads: usize) -> Vec<(usize, usize)> {
    let mut count = g.n.div_ceil((GROUP_FLOATS / per_img.max(1)).max(1)).max(1);
    if g.n >= threads {
        count = count.next_multiple_of(threads).min(g.n);
    }
    let group = g.n.div_ceil(count).max(1);
    (0..g.n.div_ceil(group))
        .map(|i| (i * group, ((i + 1) * group).min(g.n)))
        .collect()
}

/// `out = conv(x)` (CNHW in and out, overwritten); with `affine = (scale, shift, relu)`
/// each output channel `o` becomes `max?(scale[o]·y + shift[o], 0)` as it is stored.
/// Callers check [`applies`]. Every output sums its taps in the weight's order.
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    g: &Conv2dGeom,
    affine: Option<(&[f32], &[f32], bool)>,
    out: &mut [f32],
) {
    forward_into(x, w, g, affine, None, out)
}

/// [`forward`], then the max pool `pool` (over the `OC x N` output planes) of every output
/// plane: `out` is the pooled CNHW output `[OC][N][PH][PW]`. Each group
/// of images is convolved into a cache-sized tile and pooled from there (the convolution's
/// output is never written whole); the same values as [`forward`] then
/// [`crate::pool::max_pool2d_fwd`].
pub(crate) fn forward_maxpool(
    x: &[f32],
    w: &[f32],
    g: &Conv2dGeom,
    affine: Option<(&[f32], &[f32], bool)>,
    pool: &MaxPool2dGeom,
    out: &mut [f32],
) {
    forward_into(x, w, g, affine, Some(pool), out)
}

/// Per-thread buffers of [`forward_into`].
#[derive(Default)]
struct FwdScratch {
    /// The group's phases.
    buf: Vec<f32>,
    /// The 16-pixel runs: (source offset, destination offset, lanes).
    runs: Vec<(usize, usize, u16)>,
    /// With pooling: the group's convolution output, its pooled planes and their indices.
    conv: Vec<f32>,
    pooled: Vec<f32>,
    idx: Vec<u32>,
}

fn forward_into(
    x: &[f32],
    w: &[f32],
    g: &Conv2dGeom,
    affine: Option<(&[f32], &[f32], bool)>,
    pool: Option<&MaxPool2dGeom>,
    out: &mut [f32],
) {
    let ph = Phases::new(g);
    let taps = g.k();
    let per_img = ph.per_image(g.c).max(1);
    let groups = image_groups(g, per_img, rayon::current_num_threads().max(1));
    let tap_at = ph.taps(g);
    // The weights tap-major (`wt[t][o]`): one block's weights of a tap are contiguous.
    let wt: Vec<f32> = (0..taps)
        .flat_map(|t| (0..g.oc).map(move |o| w[o * taps + t]))
        .collect();
    let (oh, ow) = (g.oh(), g.ow());
    let outp = SendPtr(out.as_mut_ptr());
    let work = |sc: &mut FwdScratch, &(n0, n1): &(usize, usize)| {
        let nl = n1 - n0;
        sc.buf.resize(nl * per_img, 0.0);
        ph.fill(g, x, (n0, n1), &mut sc.buf);
        let plane = ph.hq * ph.wq;
        let b_off: Vec<usize> = tap_at
            .iter()
            .map(|&(p, dy, dx)| p * nl * plane + dy * ph.wq + dx)
            .collect();
        // Where the group's outputs go: `out` itself (channel planes N·OH·OW apart), or the
        // group's own tile (nl·OH·OW apart) when it is pooled afterwards.
        // The pool over this group's planes only.
        let pg = pool.map(|p| MaxPool2dGeom { n: nl, ..*p });
        let (dst, ostride, first) = match pg {
            None => (outp.get(), g.n * oh * ow, n0),
            Some(_) => {
                sc.conv.resize(g.oc * nl * oh * ow, 0.0);
                (sc.conv.as_mut_ptr(), nl * oh * ow, 0)
            }
        };
        // The 16-pixel runs of every output row of the group's images.
        sc.runs.clear();
        for n in 0..nl {
            for oy in 0..oh {
                for v0 in (0..ow).step_by(16) {
                    let lanes = (ow - v0).min(16);
                    let mask = ((1u32 << lanes) - 1) as u16;
                    let from = n * plane + oy * ph.wq + v0;
                    sc.runs
                        .push((from, (first + n) * oh * ow + oy * ow + v0, mask));
                }
            }
        }
        let mut o0 = 0;
        while o0 < g.oc {
            let m = if o0 + FWD_OC <= g.oc { FWD_OC } else { 1 };
            for &run in &sc.runs {
                // SAFETY: AVX-512 is active (`applies`); the tap rows lie in `sc.buf` (see
                // `Phases::taps`); the destination is this group's own tile, or images
                // n0..n1 of `out`, which this group alone writes (rows
                // `(o·N + n)·OH·OW + oy·OW ..+ OW` of real channels).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let from = (sc.buf.as_ptr(), &b_off[..]);
                    let (to, o) = ((dst, ostride), (o0, g.oc));
                    if m == FWD_OC {
                        avx512::fwd_run::<FWD_OC>(from, run, &wt, o, to, affine)
                    } else {
                        avx512::fwd_run::<1>(from, run, &wt, o, to, affine)
                    }
                }
            }
            o0 += m;
        }
        if let Some(pg) = pg {
            let pp = pg.oh() * pg.ow();
            sc.pooled.resize(pg.out_len(), 0.0);
            sc.idx.resize(pg.out_len(), 0);
            max_pool2d_fwd(&sc.conv, &pg, &mut sc.pooled, &mut sc.idx);
            for o in 0..g.oc {
                // SAFETY: images n0..n1 of channel o of the pooled output, in bounds
                // (`out` is `OC x N x PH x PW`) and written by this group alone.
                let d = unsafe {
                    std::slice::from_raw_parts_mut(outp.get().add((o * g.n + n0) * pp), nl * pp)
                };
                d.copy_from_slice(&sc.pooled[o * nl * pp..(o + 1) * nl * pp]);
            }
        }
    };
    if groups.len() > 1 && rayon::current_num_threads() > 1 {
        groups.par_iter().for_each_init(FwdScratch::default, work);
    } else {
        let mut scratch = FwdScratch::default();
        groups.iter().for_each(|gr| work(&mut scratch, gr));
    }
}

/// The weight gradient `dw` `[OC][C][KH][KW]` (overwritten) from the CNHW input `x` and
/// output gradient `dout`. Callers check [`applies`]. The result depends on the thread count
/// only (fixed image groups per thread, their sums added in order).
pub(crate) fn bwd_weight(x: &[f32], dout: &[f32], g: &Conv2dGeom, dw: &mut [f32]) {
    let ph = Phases::new(g);
    let taps = g.k();
    let per_img = ph.per_image(g.c).max(1);
    let threads = rayon::current_num_threads().max(1);
    let groups = image_groups(g, per_img, threads);
    // Fixed runs of consecutive groups per task (deterministic for a thread count).
    let tasks = threads.clamp(1, groups.len().max(1));
    let tap_at = ph.taps(g);
    let run = |ti: usize| -> Vec<f32> {
        let (a, b) = (groups.len() * ti / tasks, groups.len() * (ti + 1) / tasks);
        let mut part = vec![0f32; g.oc * taps * 16];
        let mut buf = Vec::new();
        for &(n0, n1) in &groups[a..b] {
            buf.resize((n1 - n0) * per_img, 0.0);
            ph.fill(g, x, (n0, n1), &mut buf);
            group_sums(g, &ph, dout, (n0, n1), &buf, &tap_at, &mut part);
        }
        part
    };
    let parts: Vec<Vec<f32>> = if tasks > 1 {
        (0..tasks).into_par_iter().map(run).collect()
    } else {
        vec![run(0)]
    };
    for (i, d) in dw.iter_mut().enumerate() {
        let mut s = 0.0f32;
        for p in &parts {
            s += p[i * 16..][..16].iter().sum::<f32>();
        }
        *d = s;
    }
}

/// Adds images `n0..n1` (phases in `buf`) to the 16-lane partial sums `part`
/// (`[OC][taps][16]`).
fn group_sums(
    g: &Conv2dGeom,
    ph: &Phases,
    dout: &[f32],
    (n0, n1): (usize, usize),
    buf: &[f32],
    tap_at: &[(usize, usize, usize)],
    part: &mut [f32],
) {
    let (oh, ow) = (g.oh(), g.ow());
    let taps = tap_at.len();
    let nl = n1 - n0;
    let plane = ph.hq * ph.wq;
    let rows = Rows {
        dout,
        buf,
        a_img: oh * ow,
        a_chan: g.n * oh * ow,
        a0: n0 * oh * ow,
        b_img: plane,
        nl,
        oh,
        ow,
        wq: ph.wq,
    };
    let b_off: Vec<usize> = tap_at
        .iter()
        .map(|&(p, dy, dx)| p * nl * plane + dy * ph.wq + dx)
        .collect();
    // Output channels outer: a block's gradient rows stay in cache while every tap passes.
    let mut o0 = 0;
    while o0 < g.oc {
        let mr = if o0 + MR <= g.oc { MR } else { 1 };
        let mut t0 = 0;
        while t0 < taps {
            let nr = if t0 + NR <= taps { NR } else { 1 };
            let bo = &b_off[t0..t0 + nr];
            // SAFETY: AVX-512 is active (`applies`); every row read lies in `dout` / `buf`
            // (output rows of real images; tap rows inside the phase planes, since
            // `oy + ky / s < hq` and `kx / s + ow <= wq`); `part` holds `oc x taps x 16`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match (mr, nr) {
                    (MR, NR) => avx512::block::<MR, NR>(&rows, o0, bo, part, t0, taps),
                    (MR, _) => avx512::block::<MR, 1>(&rows, o0, bo, part, t0, taps),
                    (_, NR) => avx512::block::<1, NR>(&rows, o0, bo, part, t0, taps),
                    _ => avx512::block::<1, 1>(&rows, o0, bo, part, t0, taps),
                }
            }
            t0 += nr;
        }
        o0 += mr;
    }
}

/// Where the rows of one image group are.
struct Rows<'a> {
    dout: &'a [f32],
    buf: &'a [f32],
    /// Floats per image and per channel in `dout`, and the group's first image.
    a_img: usize,
    a_chan: usize,
    a0: usize,
    /// Floats per image in a phase plane of `buf`.
    b_img: usize,
    nl: usize,
    oh: usize,
    ow: usize,
    wq: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Rows;
    use std::arch::x86_64::*;

    /// The lanes `0..w % 16` (all 16 where `w` is a multiple of 16).
    fn tail_mask(w: usize) -> __mmask16 {
        match w % 16 {
            0 => 0xFFFF,
            r => ((1u32 << r) - 1) as __mmask16,
        }
    }

    /// A run of 16 output pixels (`run = (source offset, destination offset, lanes)`) of
    /// output channels `o0..o0 + M` (of `oc`): `M` accumulators summed over every tap (tap `t`
    /// reads `src + b_off[t] + run.0`, weights `wt[t][o]`), then the epilogue, stored
    /// `ostride` floats apart per channel.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fwd_run<const M: usize>(
        (src, b_off): (*const f32, &[usize]),
        (from, to, lanes): (usize, usize, __mmask16),
        wt: &[f32],
        (o0, oc): (usize, usize),
        (dst, ostride): (*mut f32, usize),
        affine: Option<(&[f32], &[f32], bool)>,
    ) {
        let wp = wt.as_ptr().add(o0);
        let mut acc = [_mm512_setzero_ps(); M];
        for (t, &bo) in b_off.iter().enumerate() {
            let b = _mm512_maskz_loadu_ps(lanes, src.add(bo + from));
            let wr = wp.add(t * oc);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*wr.add(i)), b, *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let o = o0 + i;
            let mut y = *a;
            if let Some((scale, shift, relu)) = affine {
                // Multiply, then add (not fused): the rounding of `channel_affine`.
                let ys = _mm512_mul_ps(y, _mm512_set1_ps(scale[o]));
                y = _mm512_add_ps(ys, _mm512_set1_ps(shift[o]));
                if relu {
                    y = _mm512_max_ps(y, _mm512_setzero_ps());
                }
            }
            _mm512_mask_storeu_ps(dst.add(o * ostride + to), lanes, y);
        }
    }

    /// Output channels `o0..o0 + M` x taps `t0..t0 + N` (offsets `b_off`) over the group.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block<const M: usize, const N: usize>(
        r: &Rows,
        o0: usize,
        b_off: &[usize],
        part: &mut [f32],
        t0: usize,
        taps: usize,
    ) {
        let b_off: [usize; N] = std::array::from_fn(|j| b_off[j]);
        let a_off: [usize; M] = std::array::from_fn(|i| (o0 + i) * r.a_chan);
        let pp = part.as_mut_ptr();
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        for (i, a) in acc.iter_mut().enumerate() {
            for (j, v) in a.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(pp.add(((o0 + i) * taps + t0 + j) * 16));
            }
        }
        let (ap, bp) = (r.dout.as_ptr(), r.buf.as_ptr());
        let full = r.ow / 16;
        let mask = tail_mask(r.ow);
        for n in 0..r.nl {
            for oy in 0..r.oh {
                let arow = ap.add(r.a0 + n * r.a_img + oy * r.ow);
                let brow = bp.add(n * r.b_img + oy * r.wq);
                for v in 0..full {
                    let mut b = [_mm512_setzero_ps(); N];
                    for (j, bv) in b.iter_mut().enumerate() {
                        *bv = _mm512_loadu_ps(brow.add(b_off[j] + 16 * v));
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let av = _mm512_loadu_ps(arow.add(a_off[i] + 16 * v));
                        for (j, s) in a.iter_mut().enumerate() {
                            *s = _mm512_fmadd_ps(av, b[j], *s);
                        }
                    }
                }
                if full * 16 < r.ow {
                    let v = full;
                    let mut b = [_mm512_setzero_ps(); N];
                    for (j, bv) in b.iter_mut().enumerate() {
                        *bv = _mm512_maskz_loadu_ps(mask, brow.add(b_off[j] + 16 * v));
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let av = _mm512_maskz_loadu_ps(mask, arow.add(a_off[i] + 16 * v));
                        for (j, s) in a.iter_mut().enumerate() {
                            *s = _mm512_fmadd_ps(av, b[j], *s);
                        }
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                _mm512_storeu_ps(pp.add(((o0 + i) * taps + t0 + j) * 16), *v);
            }
        }
    }
}
