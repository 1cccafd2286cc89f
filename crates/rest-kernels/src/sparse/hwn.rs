//! Sparse convolution on batch-innermost activations (`CHWN`: `x[c][y][x][n]`): for batches
//! of 16 images or more the faster layout for 3x3 kernels, most of all on small feature maps
//! where the polyphase CNHW layout ([`super::SparseConv`]) computes mostly junk.
//!
//! # Idea
//! With the batch innermost, the `N` values of one pixel of one channel are one contiguous,
//! aligned row. An output pixel `q` of output channel `o` is then, for each active weight
//! `w = W[o, c, ky, kx]` whose tap reads a real input pixel `p(q, ky, kx)` (not padding),
//! `y[o][q][..] += w · x[c][p][..]`: one multiply-add of a whole batch row. The weights of a
//! row are kept *tap-major* (sorted by tap, then channel), so the live taps of a pixel (all 9
//! of a 3x3 kernel inside the map, 4 at a corner, 1 on a 1x1 map) are contiguous entry ranges
//! and the padding costs nothing: no junk positions (the polyphase layout computes a 4x4 map
//! as 6x6 under a 3x3 kernel) and no zero taps (a 3x3 kernel on a 1x1 map reads 1 tap of 9).
//!
//! * Forward: per output pixel and output channel, `NV` vectors of the batch in registers,
//!   summed over the live taps' entries, BatchNorm's affine and ReLU applied before the store;
//!   where a batch row is at most 4 vectors, 2-8 neighbouring pixels with the same live taps
//!   share each weight broadcast (8 accumulators in all).
//! * Input gradient: the same product with the transposed pattern (rows = input channels,
//!   entries tap-major), each input pixel gathering the output pixels whose window holds it
//!   (for stride 2 only the taps of its parity).
//! * Weight gradient at the active weights: `g = Σ_q dy[o][q]·x[c][p(q, tap)]`, per tap the
//!   contiguous runs of output pixels whose tap is live, entries sharing each `dy` load; the
//!   output rows are walked in blocks whose input rows (all channels) stay in L2, every output
//!   channel of a task visiting a block before the next one.
//!
//! Nothing but the two activations is stored: no phase buffer, no im2col, no padding.

use rayon::prelude::*;

use super::conv::len_check;
use super::kernels::{split_rows, OutPtr};
use super::matrix::SparseMatrix;
use super::SparseError;
use crate::im2col::Conv2dGeom;
use crate::isa::{self, Isa};
use crate::layout::{chwn_to_cnhw, cnhw_to_chwn};

/// Floats of the batch row one register tile covers (8 AVX-512 vectors).
const TILE: usize = 128;
/// The weight gradient walks output rows in blocks whose input rows, over all channels, take
/// at most about this many bytes (half of a 2 MiB L2).
const GW_BLOCK_BYTES: usize = 1 << 20;
/// Below this many multiply-adds a call runs on the calling thread.
const SERIAL_FLOPS: usize = 1 << 18;

/// One side of the pattern, tap-major: per row, per tap, a range of entries.
#[derive(Debug, Clone)]
struct TapMajor {
    /// `rows x taps + 1` entry bounds: row `r`, tap `t` owns `ptr[r·taps + t] .. ptr[r·taps + t + 1]`.
    ptr: Vec<usize>,
    /// Per entry, the offset of its source channel's plane (`c · plane`).
    chan: Vec<u32>,
    /// Per entry, its index in the CSR of `W` (values are gathered from there each call).
    src: Vec<u32>,
}

impl TapMajor {
    /// Sorts `entries` = `(row, tap, channel, csr index)` into the tap-major layout.
    fn build(
        rows: usize,
        taps: usize,
        plane: usize,
        mut entries: Vec<(u32, u32, u32, u32)>,
    ) -> Self {
        entries.sort_unstable();
        let mut ptr = vec![0usize; rows * taps + 1];
        for &(r, t, _, _) in &entries {
            ptr[r as usize * taps + t as usize + 1] += 1;
        }
        for i in 0..rows * taps {
            ptr[i + 1] += ptr[i];
        }
        let chan = entries
            .iter()
            .map(|&(_, _, c, _)| (c as usize * plane) as u32)
            .collect();
        let src = entries.iter().map(|&(_, _, _, e)| e).collect();
        TapMajor { ptr, chan, src }
    }

    fn gather(&self, values: &[f32]) -> Vec<f32> {
        self.src.iter().map(|&e| values[e as usize]).collect()
    }
}

/// A sparse convolution of one geometry on CHWN activations.
#[derive(Debug, Clone)]
pub struct HwnConv {
    geom: Conv2dGeom,
    isa: Isa,
    nnz: usize,
    /// Rows = output channels, sources = input channel planes (`H·W·N`).
    fwd: TapMajor,
    /// Rows = input channels, sources = output channel planes (`OH·OW·N`).
    bwd: TapMajor,
    /// Floats from one channel of `x` to the next (`H·W·N`, plus a cache line where that is a
    /// multiple of 4 KiB: planes a power of two apart fall into the same cache sets).
    xs: usize,
    /// The same for `out`, `dy` (`OH·OW·N`, padded alike).
    ys: usize,
}

/// The channel stride of a CHWN plane of `len` floats: `len`, plus 16 where `len` is a multiple
/// of 1024 (4 KiB).
pub fn hwn_plane_stride(len: usize) -> usize {
    if len.is_multiple_of(1024) {
        len + 16
    } else {
        len
    }
}

/// A live tap of one pixel: the offset of the pixel it reads (`pixel · N`) and its entries.
#[derive(Clone, Copy)]
struct Live {
    pix: usize,
    start: usize,
    end: usize,
}

impl HwnConv {
    /// Lays out the pattern of `w` (`[OC][C·KH·KW]`) for convolutions of geometry `g`.
    pub fn new(w: &SparseMatrix, g: &Conv2dGeom) -> Result<Self, SparseError> {
        g.validate()
            .map_err(|e| SparseError::new(format!("sparse conv: {e}")))?;
        if w.rows() != g.oc || w.cols() != g.k() {
            return Err(SparseError::new(format!(
                "sparse conv: the pattern is {}x{}, the geometry needs OC x C·KH·KW = {}x{}",
                w.rows(),
                w.cols(),
                g.oc,
                g.k()
            )));
        }
        let (xs, ys) = (
            hwn_plane_stride(g.h * g.w * g.n),
            hwn_plane_stride(g.oh() * g.ow() * g.n),
        );
        let fits = |n: usize| n <= u32::MAX as usize;
        if !fits(g.c * xs) || !fits(g.oc * ys) {
            return Err(SparseError::new(format!(
                "sparse conv: the batch ({} images of {}x{}) is too large for 32-bit offsets; \
                 use a smaller batch",
                g.n, g.h, g.w
            )));
        }
        let taps = g.kh * g.kw;
        let csr = w.csr();
        let mut f = Vec::with_capacity(w.nnz());
        let mut b = Vec::with_capacity(w.nnz());
        for o in 0..g.oc {
            for e in csr.row_ptr[o]..csr.row_ptr[o + 1] {
                let k = csr.col_idx[e] as usize;
                let (c, t) = (k / taps, k % taps);
                f.push((o as u32, t as u32, c as u32, e as u32));
                b.push((c as u32, t as u32, o as u32, e as u32));
            }
        }
        Ok(HwnConv {
            geom: *g,
            isa: isa::active(),
            nnz: w.nnz(),
            fwd: TapMajor::build(g.oc, taps, xs, f),
            bwd: TapMajor::build(g.c, taps, ys, b),
            xs,
            ys,
        })
    }

    /// The same layout running another instruction set (tests of every ISA).
    #[cfg(test)]
    pub(crate) fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// The geometry this layout was built for.
    pub fn geom(&self) -> &Conv2dGeom {
        &self.geom
    }

    /// Floats of the CHWN input (and input gradient): `C` planes [`hwn_plane_stride`] apart.
    pub fn x_len(&self) -> usize {
        self.geom.c * self.xs
    }

    /// Floats of the CHWN output (and output gradient).
    pub fn out_len(&self) -> usize {
        self.geom.oc * self.ys
    }

    /// The CNHW input (or input gradient) `x` as this layout's CHWN `xh` ([`Self::x_len`]).
    pub fn input_to_chwn(&self, x: &[f32], xh: &mut [f32]) {
        let g = &self.geom;
        cnhw_to_chwn(x, g.c, g.n, g.h * g.w, self.xs, xh);
    }

    /// The CNHW output (or output gradient) `y` as this layout's CHWN `yh`
    /// ([`Self::out_len`]).
    pub fn output_to_chwn(&self, y: &[f32], yh: &mut [f32]) {
        let g = &self.geom;
        cnhw_to_chwn(y, g.oc, g.n, g.oh() * g.ow(), self.ys, yh);
    }

    /// The inverse of [`Self::input_to_chwn`].
    pub fn input_to_cnhw(&self, xh: &[f32], x: &mut [f32]) {
        let g = &self.geom;
        chwn_to_cnhw(xh, g.c, g.n, g.h * g.w, self.xs, x);
    }

    /// The inverse of [`Self::output_to_chwn`].
    pub fn output_to_cnhw(&self, yh: &[f32], y: &mut [f32]) {
        let g = &self.geom;
        chwn_to_cnhw(yh, g.oc, g.n, g.oh() * g.ow(), self.ys, y);
    }

    fn check_w(&self, op: &str, w: &SparseMatrix) -> Result<(), SparseError> {
        if w.nnz() != self.nnz || w.rows() != self.geom.oc || w.cols() != self.geom.k() {
            return Err(SparseError::new(format!(
                "sparse conv {op}: the weights ({}x{}, {} nonzeros) are not the pattern this \
                 layout was built for ({}x{}, {} nonzeros)",
                w.rows(),
                w.cols(),
                w.nnz(),
                self.geom.oc,
                self.geom.k(),
                self.nnz
            )));
        }
        Ok(())
    }

    /// The live taps of output pixel `(oy, ox)` of row `r`, reading input pixels.
    fn fwd_live(&self, r: usize, oy: usize, ox: usize, live: &mut Vec<Live>) {
        let g = &self.geom;
        live.clear();
        let taps = g.kh * g.kw;
        for ky in 0..g.kh {
            let iy = (oy * g.stride + ky).wrapping_sub(g.pad);
            if iy >= g.h {
                continue;
            }
            for kx in 0..g.kw {
                let ix = (ox * g.stride + kx).wrapping_sub(g.pad);
                if ix >= g.w {
                    continue;
                }
                let t = ky * g.kw + kx;
                let (start, end) = (self.fwd.ptr[r * taps + t], self.fwd.ptr[r * taps + t + 1]);
                if start < end {
                    live.push(Live {
                        pix: (iy * g.w + ix) * g.n,
                        start,
                        end,
                    });
                }
            }
        }
    }

    /// The live taps of input pixel `(iy, ix)` of input channel `r`, reading output pixels.
    fn bwd_live(&self, r: usize, iy: usize, ix: usize, live: &mut Vec<Live>) {
        let g = &self.geom;
        let (oh, ow, s) = (g.oh(), g.ow(), g.stride);
        live.clear();
        let taps = g.kh * g.kw;
        for ky in 0..g.kh {
            let a = iy + g.pad;
            if a < ky || !(a - ky).is_multiple_of(s) || (a - ky) / s >= oh {
                continue;
            }
            let oy = (a - ky) / s;
            for kx in 0..g.kw {
                let b = ix + g.pad;
                if b < kx || !(b - kx).is_multiple_of(s) || (b - kx) / s >= ow {
                    continue;
                }
                let ox = (b - kx) / s;
                let t = ky * g.kw + kx;
                let (start, end) = (self.bwd.ptr[r * taps + t], self.bwd.ptr[r * taps + t + 1]);
                if start < end {
                    live.push(Live {
                        pix: (oy * ow + ox) * g.n,
                        start,
                        end,
                    });
                }
            }
        }
    }

    /// Whether output columns `x0 ..= x1` all read real input columns under the same taps.
    fn fwd_same(&self, x0: usize, x1: usize) -> bool {
        let g = &self.geom;
        same_taps(x0, x1, g.kw, |ox, kx| {
            (ox * g.stride + kx).wrapping_sub(g.pad) < g.w
        })
    }

    /// Whether input columns `x0 ..= x1` are all read by real output columns under the same
    /// taps, for stride 1.
    fn bwd_same(&self, x0: usize, x1: usize) -> bool {
        let (g, ow) = (&self.geom, self.geom.ow());
        same_taps(x0, x1, g.kw, |ix, kx| (ix + g.pad).wrapping_sub(kx) < ow)
    }

    /// `dst[r][q] = ep(r)(Σ_live Σ_e vals[e] · src[chan[e] + pix ..])` for every row `r` of
    /// `side` and pixel `q` of the `h x w` destination map (planes `plane` apart), the live
    /// taps of each from `live(r, y, x, ..)`: the forward pass and the input gradient.
    /// Where the batch row is short (at most 4 vectors), neighbouring pixels of one map row
    /// with the same live taps (`same(x0, x1)`: columns `x0 ..= x1`; their sources `step`
    /// floats apart) share
    /// each weight broadcast and fill the 8 accumulators together.
    #[allow(clippy::too_many_arguments)]
    fn rows_product(
        &self,
        (side, vals, src): (&TapMajor, &[f32], &[f32]),
        (h, w, rows, plane): (usize, usize, usize, usize),
        flops: usize,
        live: impl Fn(usize, usize, usize, &mut Vec<Live>) + Sync,
        (same, step): (impl Fn(usize, usize) -> bool + Sync, usize),
        ep: impl Fn(usize) -> Option<(f32, f32, bool)> + Sync,
        dst: &mut [f32],
    ) {
        let n = self.geom.n;
        let group = pixel_group(n);
        let optr = OutPtr::new(dst.as_mut_ptr());
        run_pixels(h * w, rows, flops, |pixels, rows| {
            let mut taps = Vec::with_capacity(self.geom.kh * self.geom.kw);
            let mut q = pixels.start;
            while q < pixels.end {
                let (y, x) = (q / w, q % w);
                // The pixels q .. q + p share their live taps (all in one map row).
                let p = if group > 1
                    && q + group <= pixels.end
                    && x + group <= w
                    && same(x, x + group - 1)
                {
                    group
                } else {
                    1
                };
                for r in rows.clone() {
                    live(r, y, x, &mut taps);
                    // SAFETY: every live tap reads `src[chan + pix + j·step .. + N]` inside
                    // `src` (a real pixel of a real channel for each of the p pixels, whose
                    // live taps are the same); the task owns row `r`, pixels `q .. q + p` of
                    // `dst` (`rows x plane` floats, checked by the callers).
                    unsafe {
                        let d = optr.get().add(r * plane + q * n);
                        let tile = (p, step);
                        row_tile(
                            self.isa,
                            &taps,
                            &side.chan,
                            vals,
                            src.as_ptr(),
                            n,
                            tile,
                            d,
                            ep(r),
                        );
                    }
                }
                q += p;
            }
        });
    }

    /// `out = conv(x)` (CHWN in, CHWN out); with `epilogue = (scale, shift, relu)` each output
    /// channel `o` becomes `max?(scale[o]·y + shift[o], 0)` before it is stored.
    pub fn forward(
        &self,
        w: &SparseMatrix,
        x: &[f32],
        out: &mut [f32],
        epilogue: Option<(&[f32], &[f32], bool)>,
    ) -> Result<(), SparseError> {
        self.check_w("forward", w)?;
        self.forward_with(&self.forward_values(w), x, out, epilogue)
    }

    /// The values of `w` in the order [`Self::forward_with`] reads them (for a caller that
    /// runs several forward passes with the same weights).
    pub fn forward_values(&self, w: &SparseMatrix) -> Vec<f32> {
        self.fwd.gather(w.values())
    }

    /// [`Self::forward`] with the values laid out by [`Self::forward_values`].
    pub fn forward_with(
        &self,
        vals: &[f32],
        x: &[f32],
        out: &mut [f32],
        epilogue: Option<(&[f32], &[f32], bool)>,
    ) -> Result<(), SparseError> {
        len_check("forward", "values", vals.len(), self.nnz)?;
        let g = &self.geom;
        len_check("forward", "x", x.len(), self.x_len())?;
        len_check("forward", "out", out.len(), self.out_len())?;
        if let Some((scale, shift, _)) = epilogue {
            len_check("forward", "scale", scale.len(), g.oc)?;
            len_check("forward", "shift", shift.len(), g.oc)?;
        }
        let (oh, ow) = (g.oh(), g.ow());
        let flops = 2 * self.nnz * g.n * oh * ow;
        self.rows_product(
            (&self.fwd, vals, x),
            (oh, ow, g.oc, self.ys),
            flops,
            |r, oy, ox, live| self.fwd_live(r, oy, ox, live),
            (|x0, x1| self.fwd_same(x0, x1), g.stride * g.n),
            |r| epilogue.map(|(sc, sh, relu)| (sc[r], sh[r], relu)),
            out,
        );
        Ok(())
    }

    /// `dx = convᵀ(dy)`: the input gradient (CHWN), overwritten.
    pub fn backward_input(
        &self,
        w: &SparseMatrix,
        dy: &[f32],
        dx: &mut [f32],
    ) -> Result<(), SparseError> {
        self.check_w("backward_input", w)?;
        let g = &self.geom;
        len_check("backward_input", "dy", dy.len(), self.out_len())?;
        len_check("backward_input", "dx", dx.len(), self.x_len())?;
        let vals = self.bwd.gather(w.values());
        let flops = 2 * self.nnz * g.n * g.oh() * g.ow();
        self.rows_product(
            (&self.bwd, &vals, dy),
            (g.h, g.w, g.c, self.xs),
            flops,
            |r, iy, ix, live| self.bwd_live(r, iy, ix, live),
            // Stride 2: neighbouring input pixels have taps of different parities.
            (|x0, x1| g.stride == 1 && self.bwd_same(x0, x1), g.n),
            |_| None,
            dx,
        );
        Ok(())
    }

    /// The weight gradient at the active weights, in the CSR order of `w` (overwritten).
    pub fn grad_weight(
        &self,
        w: &SparseMatrix,
        dy: &[f32],
        x: &[f32],
        grad: &mut [f32],
    ) -> Result<(), SparseError> {
        self.check_w("grad_weight", w)?;
        let g = &self.geom;
        len_check("grad_weight", "dy", dy.len(), self.out_len())?;
        len_check("grad_weight", "x", x.len(), self.x_len())?;
        len_check("grad_weight", "grad", grad.len(), self.nnz)?;
        let taps = g.kh * g.kw;
        let (oh, ow, s) = (g.oh(), g.ow(), g.stride);
        let plane_out = self.ys;
        // Tap-major gradient, then scattered to the CSR order.
        let mut gt = vec![0f32; self.nnz];
        // Balanced row blocks: each row's entries span its taps' ranges.
        let row_ptr: Vec<usize> = (0..=g.oc).map(|r| self.fwd.ptr[r * taps]).collect();
        let bounds = split_rows(&row_ptr, 4 * rayon::current_num_threads());
        let chunks: Vec<(usize, &mut [f32])> = {
            let mut rest: &mut [f32] = &mut gt;
            let mut v = Vec::new();
            for i in 0..bounds.len() - 1 {
                let (a, b) = (
                    self.fwd.ptr[bounds[i] * taps],
                    self.fwd.ptr[bounds[i + 1] * taps],
                );
                let (head, tail) = rest.split_at_mut(b - a);
                v.push((i, head));
                rest = tail;
            }
            v
        };
        // Output rows in blocks whose input rows (all channels) stay in L2: every row `r`
        // of a task reads the block's rows of many channels, so the block is walked by all
        // rows before the next one (the whole map at once when it is small).
        let in_row = g.w * g.n * g.c * std::mem::size_of::<f32>();
        let block = (GW_BLOCK_BYTES / in_row.max(1))
            .saturating_sub(g.kh)
            .div_euclid(s)
            .max(1)
            .min(oh);
        let work = |(i, out): (usize, &mut [f32])| {
            let base = self.fwd.ptr[bounds[i] * taps];
            for b0 in (0..oh).step_by(block) {
                let b1 = (b0 + block).min(oh);
                for r in bounds[i]..bounds[i + 1] {
                    let dyr = &dy[r * plane_out..][..oh * ow * g.n];
                    for ky in 0..g.kh {
                        // Output rows whose tap row ky reads a real input row.
                        let oy0 = g.pad.saturating_sub(ky).div_ceil(s).max(b0);
                        let oy1 = ((g.h + g.pad).saturating_sub(ky).div_ceil(s)).min(b1);
                        for kx in 0..g.kw {
                            let ox0 = g.pad.saturating_sub(kx).div_ceil(s);
                            let ox1 = ((g.w + g.pad).saturating_sub(kx).div_ceil(s)).min(ow);
                            let t = ky * g.kw + kx;
                            let (e0, e1) =
                                (self.fwd.ptr[r * taps + t], self.fwd.ptr[r * taps + t + 1]);
                            if e0 == e1 || oy0 >= oy1 || ox0 >= ox1 {
                                continue;
                            }
                            let acc = &mut out[e0 - base..e1 - base];
                            let chan = &self.fwd.chan[e0..e1];
                            for oy in oy0..oy1 {
                                let iy = oy * s + ky - g.pad;
                                if s == 1 {
                                    // The run of output pixels is contiguous in dy and in x.
                                    let ix0 = ox0 + kx - g.pad;
                                    let d = &dyr[(oy * ow + ox0) * g.n..(oy * ow + ox1) * g.n];
                                    let xo = (iy * g.w + ix0) * g.n;
                                    dot_entries(self.isa, d, x, xo, chan, acc);
                                    continue;
                                }
                                // In x every s-th pixel: one dot per output pixel.
                                for ox in ox0..ox1 {
                                    let ix = ox * s + kx - g.pad;
                                    let d = &dyr[(oy * ow + ox) * g.n..][..g.n];
                                    let xo = (iy * g.w + ix) * g.n;
                                    dot_entries(self.isa, d, x, xo, chan, acc);
                                }
                            }
                        }
                    }
                }
            }
        };
        if 2 * self.nnz * g.n * oh * ow < SERIAL_FLOPS {
            chunks.into_iter().for_each(work);
        } else {
            chunks.into_par_iter().for_each(work);
        }
        for (&e, &v) in self.fwd.src.iter().zip(&gt) {
            grad[e as usize] = v;
        }
        Ok(())
    }
}

/// Runs `f(pixels, rows)` over blocks of a `pixels x rows` output: pixel ranges first (the
/// neighbouring pixels of one task share their input rows in cache), rows when the map is
/// too small to give every thread work.
fn run_pixels(
    pixels: usize,
    rows: usize,
    flops: usize,
    f: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    let threads = rayon::current_num_threads();
    if flops < SERIAL_FLOPS || threads == 1 {
        f(0..pixels, 0..rows);
        return;
    }
    let target = 4 * threads;
    let np = pixels.min(target);
    let nr = target.div_ceil(np).min(rows);
    (0..np * nr).into_par_iter().for_each(|t| {
        let (pi, ri) = (t / nr, t % nr);
        f(
            pixels * pi / np..pixels * (pi + 1) / np,
            rows * ri / nr..rows * (ri + 1) / nr,
        )
    });
}

/// Whether every column of `x0 ..= x1` has the same live taps `kx < kw` as `x0`
/// (`live(x, kx)`).
fn same_taps(x0: usize, x1: usize, kw: usize, live: impl Fn(usize, usize) -> bool) -> bool {
    (x0 + 1..=x1).all(|x| (0..kw).all(|kx| live(x0, kx) == live(x, kx)))
}

/// Pixels one register tile covers for a batch row of `n` floats: 8 vectors in all where the
/// row has at most 4 (two pixels of 64 images, four of 32, ...), else 1.
fn pixel_group(n: usize) -> usize {
    match n.div_ceil(16) {
        1 => 8,
        2 => 4,
        3 | 4 => 2,
        _ => 1,
    }
}

/// `dst[j·n ..][..n] = ep(Σ_live Σ_e vals[e] · src[chan[e] + pix + j·step ..][..n])` for the
/// `p` pixels `j` of `(p, step)`, in register tiles of [`TILE`] floats of the batch row (all
/// `p` pixels in one tile; `p > 1` only where `p · ceil(n / 16) <= 8`).
///
/// # Safety
/// `src[chan[e] + live.pix + j·step .. + n]` readable for every entry of every live tap and
/// every pixel `j`; `dst[.. p·n]` writable and unshared.
#[allow(clippy::too_many_arguments)]
unsafe fn row_tile(
    isa: Isa,
    live: &[Live],
    chan: &[u32],
    vals: &[f32],
    src: *const f32,
    n: usize,
    (p, step): (usize, usize),
    dst: *mut f32,
    ep: Option<(f32, f32, bool)>,
) {
    if p > 1 {
        debug_assert!(p * n.div_ceil(16) <= 8);
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::tile_pixels(live, chan, vals, src, n, (p, step), dst, ep),
            _ => {
                for j in 0..p {
                    tile_portable(live, chan, vals, src.add(j * step), n, dst.add(j * n), ep);
                }
            }
        }
        return;
    }
    let mut n0 = 0;
    while n0 < n {
        let w = (n - n0).min(TILE);
        let (s, d) = (src.add(n0), dst.add(n0));
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::tile(live, chan, vals, s, w, d, ep),
            _ => tile_portable(live, chan, vals, s, w, d, ep),
        }
        n0 += w;
    }
}

#[inline]
fn apply(v: f32, ep: Option<(f32, f32, bool)>) -> f32 {
    match ep {
        Some((a, b, relu)) => {
            let y = a * v + b;
            if relu {
                y.max(0.0)
            } else {
                y
            }
        }
        None => v,
    }
}

/// One tile of [`row_tile`] (`w <= TILE` floats), portable.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_portable(
    live: &[Live],
    chan: &[u32],
    vals: &[f32],
    src: *const f32,
    w: usize,
    dst: *mut f32,
    ep: Option<(f32, f32, bool)>,
) {
    let mut acc = [0f32; TILE];
    for l in live {
        for e in l.start..l.end {
            let v = vals[e];
            let s = src.add(chan[e] as usize + l.pix);
            for (i, a) in acc[..w].iter_mut().enumerate() {
                *a = v.mul_add(*s.add(i), *a);
            }
        }
    }
    for (i, &a) in acc[..w].iter().enumerate() {
        *dst.add(i) = apply(a, ep);
    }
}

/// `acc[j] += dot(d, x[chan[j] + xo ..][..d.len()])` for every entry `j`.
fn dot_entries(isa: Isa, d: &[f32], x: &[f32], xo: usize, chan: &[u32], acc: &mut [f32]) {
    match isa {
        // SAFETY: AVX-512 is available; every `x[chan + xo ..][..n]` lies in `x` (callers pass
        // real pixels of real channels), checked below in debug builds.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::dots(d, x, xo, chan, acc) },
        _ => {
            for (a, &c) in acc.iter_mut().zip(chan) {
                let xr = &x[c as usize + xo..][..d.len()];
                *a += d.iter().zip(xr).map(|(p, q)| p * q).sum::<f32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::simd::tail_mask;
    use super::Live;
    use std::arch::x86_64::*;

    /// One tile of [`super::row_tile`] (`w <= TILE` floats): `ceil(w / 16)` accumulators.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        live: &[Live],
        chan: &[u32],
        vals: &[f32],
        s: *const f32,
        w: usize,
        d: *mut f32,
        ep: Option<(f32, f32, bool)>,
    ) {
        let mask = tail_mask(w);
        match w.div_ceil(16) {
            8 => tile_nv::<8>(live, chan, vals, s, mask, d, ep),
            7 => tile_nv::<7>(live, chan, vals, s, mask, d, ep),
            6 => tile_nv::<6>(live, chan, vals, s, mask, d, ep),
            5 => tile_nv::<5>(live, chan, vals, s, mask, d, ep),
            4 => tile_nv::<4>(live, chan, vals, s, mask, d, ep),
            3 => tile_nv::<3>(live, chan, vals, s, mask, d, ep),
            2 => tile_nv::<2>(live, chan, vals, s, mask, d, ep),
            _ => tile_nv::<1>(live, chan, vals, s, mask, d, ep),
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_nv<const NV: usize>(
        live: &[Live],
        chan: &[u32],
        vals: &[f32],
        src: *const f32,
        mask: __mmask16,
        dst: *mut f32,
        ep: Option<(f32, f32, bool)>,
    ) {
        let mut acc = [_mm512_setzero_ps(); NV];
        for l in live {
            let base = src.add(l.pix);
            for e in l.start..l.end {
                let vv = _mm512_set1_ps(*vals.get_unchecked(e));
                let xr = base.add(*chan.get_unchecked(e) as usize);
                for (i, a) in acc.iter_mut().enumerate().take(NV - 1) {
                    *a = _mm512_fmadd_ps(vv, _mm512_loadu_ps(xr.add(16 * i)), *a);
                }
                acc[NV - 1] = _mm512_fmadd_ps(
                    vv,
                    _mm512_maskz_loadu_ps(mask, xr.add(16 * (NV - 1))),
                    acc[NV - 1],
                );
            }
        }
        if let Some((a, b, relu)) = ep {
            let (va, vb) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, va, vb);
                if relu {
                    *x = _mm512_max_ps(*x, _mm512_setzero_ps());
                }
            }
        }
        for (i, a) in acc.iter().enumerate().take(NV - 1) {
            _mm512_storeu_ps(dst.add(16 * i), *a);
        }
        _mm512_mask_storeu_ps(dst.add(16 * (NV - 1)), mask, acc[NV - 1]);
    }

    /// [`super::row_tile`] for `p > 1` pixels of `n <= 64` floats each: `p x ceil(n / 16)`
    /// accumulators, one broadcast of each weight for all of them.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_pixels(
        live: &[Live],
        chan: &[u32],
        vals: &[f32],
        s: *const f32,
        n: usize,
        (p, step): (usize, usize),
        d: *mut f32,
        ep: Option<(f32, f32, bool)>,
    ) {
        let mask = tail_mask(n);
        let t = (s, step, n, d);
        match (n.div_ceil(16), p) {
            (1, 8) => tile_np::<1, 8>(live, chan, vals, t, mask, ep),
            (2, 4) => tile_np::<2, 4>(live, chan, vals, t, mask, ep),
            (3, 2) => tile_np::<3, 2>(live, chan, vals, t, mask, ep),
            (4, 2) => tile_np::<4, 2>(live, chan, vals, t, mask, ep),
            _ => {
                for j in 0..p {
                    tile(live, chan, vals, s.add(j * step), n, d.add(j * n), ep);
                }
            }
        }
    }

    /// `P` pixels of `NV` vectors each (the last one masked).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_np<const NV: usize, const P: usize>(
        live: &[Live],
        chan: &[u32],
        vals: &[f32],
        (src, step, n, dst): (*const f32, usize, usize, *mut f32),
        mask: __mmask16,
        ep: Option<(f32, f32, bool)>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; P];
        for l in live {
            let base = src.add(l.pix);
            for e in l.start..l.end {
                let vv = _mm512_set1_ps(*vals.get_unchecked(e));
                let xr = base.add(*chan.get_unchecked(e) as usize);
                for (j, a) in acc.iter_mut().enumerate() {
                    let xj = xr.add(j * step);
                    for (i, v) in a.iter_mut().enumerate().take(NV - 1) {
                        *v = _mm512_fmadd_ps(vv, _mm512_loadu_ps(xj.add(16 * i)), *v);
                    }
                    a[NV - 1] = _mm512_fmadd_ps(
                        vv,
                        _mm512_maskz_loadu_ps(mask, xj.add(16 * (NV - 1))),
                        a[NV - 1],
                    );
                }
            }
        }
        for (j, a) in acc.iter_mut().enumerate() {
            if let Some((sa, sb, relu)) = ep {
                let (va, vb) = (_mm512_set1_ps(sa), _mm512_set1_ps(sb));
                for x in a.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, va, vb);
                    if relu {
                        *x = _mm512_max_ps(*x, _mm512_setzero_ps());
                    }
                }
            }
            let dj = dst.add(j * n);
            for (i, v) in a.iter().enumerate().take(NV - 1) {
                _mm512_storeu_ps(dj.add(16 * i), *v);
            }
            _mm512_mask_storeu_ps(dj.add(16 * (NV - 1)), mask, a[NV - 1]);
        }
    }

    /// `acc[j] += dot(d, x[chan[j] + xo ..][..d.len()])`: groups of eight entries (then four,
    /// two, one) sharing each `d` load.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dots(d: &[f32], x: &[f32], xo: usize, chan: &[u32], acc: &mut [f32]) {
        let xp = x.as_ptr().add(xo);
        let mut j = 0;
        while j + 8 <= chan.len() {
            group::<8>(d, xp, &chan[j..], &mut acc[j..]);
            j += 8;
        }
        if j + 4 <= chan.len() {
            group::<4>(d, xp, &chan[j..], &mut acc[j..]);
            j += 4;
        }
        if j + 2 <= chan.len() {
            group::<2>(d, xp, &chan[j..], &mut acc[j..]);
            j += 2;
        }
        if j < chan.len() {
            group::<1>(d, xp, &chan[j..], &mut acc[j..]);
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn group<const G: usize>(d: &[f32], xp: *const f32, chan: &[u32], acc: &mut [f32]) {
        let n = d.len();
        let full = n / 16;
        let dp = d.as_ptr();
        let xr: [*const f32; G] = std::array::from_fn(|i| xp.add(chan[i] as usize));
        let mut s = [_mm512_setzero_ps(); G];
        for v in 0..full {
            let dv = _mm512_loadu_ps(dp.add(16 * v));
            for i in 0..G {
                s[i] = _mm512_fmadd_ps(dv, _mm512_loadu_ps(xr[i].add(16 * v)), s[i]);
            }
        }
        if full * 16 < n {
            let m = tail_mask(n);
            let dv = _mm512_maskz_loadu_ps(m, dp.add(16 * full));
            for i in 0..G {
                s[i] = _mm512_fmadd_ps(dv, _mm512_maskz_loadu_ps(m, xr[i].add(16 * full)), s[i]);
            }
        }
        for i in 0..G {
            acc[i] += _mm512_reduce_add_ps(s[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction set gives the portable loops' results (the integration tests check
    /// those against a naive convolution).
    #[test]
    fn every_isa_agrees_with_the_portable_loops() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for g in [
            Conv2dGeom {
                c: 6,
                n: 37,
                h: 4,
                w: 5,
                oc: 7,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            },
            Conv2dGeom {
                c: 5,
                n: 144,
                h: 4,
                w: 4,
                oc: 6,
                kh: 3,
                kw: 3,
                stride: 2,
                pad: 1,
            },
        ] {
            let w: Vec<f32> = (0..g.w_len()).map(|_| rnd()).collect();
            let m: Vec<bool> = (0..g.w_len()).map(|_| rnd() > 0.1).collect();
            let sm = SparseMatrix::from_dense_masked(&w, &m, g.oc, g.k()).expect("pattern");
            let base = HwnConv::new(&sm, &g)
                .expect("layout")
                .with_isa(Isa::Portable);
            let x: Vec<f32> = (0..base.x_len()).map(|_| rnd()).collect();
            let dy: Vec<f32> = (0..base.out_len()).map(|_| rnd()).collect();
            let run = |c: &HwnConv| {
                let mut out = vec![0.0; c.out_len()];
                c.forward(
                    &sm,
                    &x,
                    &mut out,
                    Some((&[1.5; 7][..g.oc], &[0.25; 7][..g.oc], true)),
                )
                .expect("forward");
                let mut dx = vec![0.0; c.x_len()];
                c.backward_input(&sm, &dy, &mut dx).expect("backward");
                let mut gw = vec![0.0; sm.nnz()];
                c.grad_weight(&sm, &dy, &x, &mut gw).expect("grad");
                (out, dx, gw)
            };
            let want = run(&base);
            for isa in Isa::available() {
                let got = run(&base.clone().with_isa(isa));
                for (a, b) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)] {
                    for (i, (p, q)) in a.iter().zip(b.iter()).enumerate() {
                        assert!(
                            (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                            "{isa:?} [{i}]: {p} vs {q}"
                        );
                    }
                }
            }
        }
    }
}
