//! Direct sparse convolution on CNHW activations, without im2col: the polyphase ("space to
//! depth") layout turns every active weight into one contiguous shifted multiply-add over the
//! whole batch.
//!
//! # Idea
//! Pad the input by `pad` and split each channel into its `s x s` stride phases: phase plane
//! `(c, ry, rx)` holds the padded pixels `(s·py + ry, s·px + rx)`. A kernel tap `(ky, kx)`
//! reads phase `(ky % s, kx % s)` shifted by `(ky / s, kx / s)`, so a stride-`s` `KH x KW`
//! convolution becomes, per active weight `w = W[o, c, ky, kx]`,
//!
//! `V[o][j] += w · X[plane(c, ky % s, kx % s)][j + (ky / s)·PW + kx / s]`
//!
//! over one flat index `j = (n·PH + oy)·PW + ox` spanning the whole batch: a long contiguous
//! FMA row, exactly the spmm inner loop with the im2col row replaced by a shifted phase row.
//! Planes are `PH x PW` with `PH = OH + (KH-1)/s` and `PW = OW + (KW-1)/s`, so the
//! positions with `oy >= OH` or `ox >= OW` are scratch ("junk") outputs that are computed and
//! dropped; a shift never carries a valid output into a different image or row. (Input pixels
//! that no output reads, e.g. a last row a stride skips, have no slot and get zero gradient.)
//!
//! * Forward: pack `x` into the phase buffer (`O(input)`), spmm with offsets, drop the junk
//!   while copying each tile into the CNHW output.
//! * Input gradient: expand `dy` into the same flat layout with zeros at junk positions, then
//!   the mirrored gather `dX[plane][j] = Σ w · dyV[o][j - shift]` over the transposed pattern,
//!   and copy each phase tile back to its strided input pixels (every pixel belongs to
//!   exactly one phase, so no accumulation and no col2im).
//! * Weight gradient at the active weights: `g = Σ_j dyV[o][j] · X[plane][j + shift]` (SDDMM
//!   with offsets; junk positions of `dyV` are zero).
//!
//! Nothing of size `K x P` is ever materialised: the phase buffer is about the size of the
//! padded input, and all work scales with the number of active weights.
//!
//! The layout passes (packing, dropping the junk, expanding the gradient, copying phase rows
//! back to pixels) move rows of a few floats each; with AVX-512 they run as whole-vector
//! compress / expand / permute moves (module `phase`), otherwise as row loops. Where the
//! image rows are short (`w <= 32`, at most two column phases), the input gradient's phase
//! planes go to a per-thread scratch buffer (the size of the phase buffer) and whole image
//! rows are built from them. Layouts without junk skip the copies: a kernel no larger than
//! the stride (e.g. 1x1) writes the output rows directly, and a stride-1 unpadded one the
//! input gradient.
//!
//! # Tiny output maps
//! Where the output map is tiny (ResNet's last stages at 32 px: 2x2 and 1x1 maps under 3x3
//! kernels), most of a phase row is junk and most taps read only padding: a 3x3 kernel on a
//! 1x1 map computes 9 positions per image for 1 output and uses 1 tap of 9. There the layout
//! is the im2col matrix restricted to the *live* taps (those that read an input pixel for
//! some output): row `c·T + t` holds tap `t` of channel `c` at every output position (`T`
//! live taps), plus one zero row that every entry of a dead tap points to. Rows have no junk
//! (`PH = OH`, `PW = OW`), so the forward pass and the weight gradient are the same offset
//! products, and the input gradient is the transposed product into those rows followed by a
//! col2im sum over the taps.

use rayon::prelude::*;

use super::kernels::{split_cols, split_rows, OutPtr, SERIAL_FLOPS};
use super::matrix::Csr;
use super::phase::{self, PackPlan, RowsPlan, Strided, Unpack, ValidMask};
use super::simd;
use super::{SparseError, SparseMatrix};
use crate::im2col::Conv2dGeom;
use crate::isa::{self, Isa};

/// Output maps of at most this many positions (`OH·OW`) take the tiny-map layout when
/// their kernel is larger than the stride (see the module docs).
pub const TINY_MAX_OUT: usize = 4;

/// Column granule of the tasks (the AVX-512 register-tile width of the spmm).
const GRANULE: usize = 128;
/// Bytes of the operand rows one cache tile may span (`rows touched x tile width x 4`).
const SLAB_BYTES: usize = 1 << 20;

/// The flat polyphase layout of one convolution geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PhaseLayout {
    /// Whether every input pixel lies in a stored phase position (else the pixels no output
    /// reads, e.g. the last rows of a stride that does not divide, have no slot).
    covers_input: bool,
    /// Phases used per axis: `min(stride, kernel)` (a 1x1 stride-2 kernel reads one phase).
    sy: usize,
    sx: usize,
    ph: usize,
    pw: usize,
    /// `N·PH·PW`: the flat length of one plane over the batch.
    l: usize,
    /// Row stride of the phase buffer: `l` plus room for the largest shift.
    xs: usize,
    /// Largest shift `((KH-1)/s)·PW + (KW-1)/s`.
    front: usize,
    /// Row stride of the expanded output gradient: `front` leading zeros, then `l`.
    ys: usize,
    /// Rows of the phase buffer: `C·sy·sx` phase planes, or the tiny layout's `C·T + 1`.
    planes: usize,
}

impl PhaseLayout {
    fn new(g: &Conv2dGeom) -> Self {
        let s = g.stride;
        let (ay, ax) = ((g.kh - 1) / s, (g.kw - 1) / s);
        // Exactly the phase rows/columns that valid outputs read: `ay` rows (`ax` columns)
        // of junk per image row, which is also what the input gradient's wrap-around needs.
        let (ph, pw) = (g.oh() + ay, g.ow() + ax);
        let l = g.n * ph * pw;
        let front = ay * pw + ax;
        let (sy, sx) = (s.min(g.kh), s.min(g.kw));
        PhaseLayout {
            covers_input: sy == s
                && sx == s
                && (g.h - 1 + g.pad) / s < ph
                && (g.w - 1 + g.pad) / s < pw,
            sy,
            sx,
            ph,
            pw,
            l,
            xs: (l + front).next_multiple_of(16),
            front,
            ys: (front + l).next_multiple_of(16),
            planes: g.c * sy * sx,
        }
    }

    /// The tiny-map layout with `live` taps: rows of `N·OH·OW` valid positions, no junk.
    fn tiny(g: &Conv2dGeom, live: usize) -> Self {
        let l = g.n * g.oh() * g.ow();
        PhaseLayout {
            covers_input: false,
            sy: 1,
            sx: 1,
            ph: g.oh(),
            pw: g.ow(),
            l,
            xs: l.next_multiple_of(16),
            front: 0,
            ys: l.next_multiple_of(16),
            planes: g.c * live + 1,
        }
    }

    fn planes(&self, _g: &Conv2dGeom) -> usize {
        self.planes
    }
}

/// The live taps of a tiny-map layout.
#[derive(Debug, Clone)]
struct Tiny {
    /// Per kernel tap `ky·KW + kx`: its index among the live taps, or `None` when it reads
    /// only padding for every output position.
    index: Vec<Option<usize>>,
    /// The live taps `(ky, kx)`, in index order.
    taps: Vec<(usize, usize)>,
    /// Per live tap, per output position `oy·OW + ox`: the pixel `iy·W + ix` it reads, or
    /// `None` for padding.
    reads: Vec<Vec<Option<usize>>>,
}

impl Tiny {
    /// The live taps of `g`, when its output map is tiny and its kernel larger than the
    /// stride (else the phase layout has no junk to save).
    fn of(g: &Conv2dGeom) -> Option<Self> {
        let (oh, ow) = (g.oh(), g.ow());
        if oh * ow > TINY_MAX_OUT || (g.kh <= g.stride && g.kw <= g.stride) {
            return None;
        }
        // Tap (ky, kx) is live when some output reads a pixel inside the image with it.
        let reads = |k: usize, o: usize, size: usize| {
            (0..o).any(|i| {
                (i * g.stride + k)
                    .checked_sub(g.pad)
                    .is_some_and(|p| p < size)
            })
        };
        let mut index = vec![None; g.kh * g.kw];
        let mut taps = Vec::new();
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                if reads(ky, oh, g.h) && reads(kx, ow, g.w) {
                    index[ky * g.kw + kx] = Some(taps.len());
                    taps.push((ky, kx));
                }
            }
        }
        let reads = taps
            .iter()
            .map(|&(ky, kx)| {
                let mut r = Vec::with_capacity(oh * ow);
                for oy in 0..oh {
                    let iy = (oy * g.stride + ky).checked_sub(g.pad).filter(|&v| v < g.h);
                    for ox in 0..ow {
                        let ix = (ox * g.stride + kx).checked_sub(g.pad).filter(|&v| v < g.w);
                        r.push(iy.zip(ix).map(|(iy, ix)| iy * g.w + ix));
                    }
                }
                r
            })
            .collect();
        Some(Tiny { index, taps, reads })
    }
}

/// A sparse convolution's pattern laid out for one geometry (built once per pattern and
/// input shape; values come from the [`SparseMatrix`] at every call).
///
/// The weight matrix is `[OC][C·KH·KW]` in PyTorch order (row `o`, column
/// `(c·KH + ky)·KW + kx`), as for im2col-based kernels.
#[derive(Debug, Clone)]
pub struct SparseConv {
    geom: Conv2dGeom,
    lay: PhaseLayout,
    isa: Isa,
    nnz: usize,
    /// Per CSR entry of `W` (same order): `plane·xs + shift` into the phase buffer.
    fwd_off: Vec<u32>,
    /// The transposed pattern grouped by phase plane: row pointers over planes,
    bwd_row_ptr: Vec<usize>,
    /// `o·ys + front - shift` into the expanded output gradient,
    bwd_off: Vec<u32>,
    /// and the CSR index of `W` each entry takes its value from.
    bwd_src: Vec<u32>,
    /// Which flat positions are valid outputs (the vector compaction and expansion).
    valid: ValidMask,
    /// Stride-`s` row moves from phase rows to image rows (input gradient),
    strided: Strided,
    /// and from image rows to phase rows (packing the input);
    pack: PackPlan,
    /// whole image rows of the input gradient from its phase planes, where they fit.
    rows: Option<RowsPlan>,
    /// The tiny-map layout's live taps, when it is used.
    tiny: Option<Tiny>,
}

impl SparseConv {
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
        let tiny = Tiny::of(g);
        let lay = match &tiny {
            Some(t) => PhaseLayout::tiny(g, t.taps.len()),
            None => PhaseLayout::new(g),
        };
        let planes = lay.planes(g);
        let fits = |n: usize| n <= u32::MAX as usize;
        if !fits(planes.saturating_mul(lay.xs)) || !fits(g.oc.saturating_mul(lay.ys)) {
            return Err(SparseError::new(format!(
                "sparse conv: the batch ({} images of {}x{}) is too large for 32-bit offsets; \
                 use a smaller batch",
                g.n, g.h, g.w
            )));
        }
        let s = g.stride;
        let khw = g.kh * g.kw;
        // (plane, shift) of weight column k.
        let tap = |k: usize| {
            let (c, ky, kx) = (k / khw, (k % khw) / g.kw, k % g.kw);
            if let Some(t) = &tiny {
                // The live tap's row, or the zero row.
                return match t.index[k % khw] {
                    Some(i) => (c * t.taps.len() + i, 0),
                    None => (planes - 1, 0),
                };
            }
            let plane = (c * lay.sy + ky % s) * lay.sx + kx % s;
            (plane, (ky / s) * lay.pw + kx / s)
        };
        let csr = w.csr();
        let mut fwd_off = Vec::with_capacity(w.nnz());
        let mut counts = vec![0usize; planes + 1];
        for &k in csr.col_idx {
            let (plane, shift) = tap(k as usize);
            fwd_off.push((plane * lay.xs + shift) as u32);
            counts[plane + 1] += 1;
        }
        for p in 0..planes {
            counts[p + 1] += counts[p];
        }
        let bwd_row_ptr = counts.clone();
        let mut next = counts;
        let mut bwd_off = vec![0u32; w.nnz()];
        let mut bwd_src = vec![0u32; w.nnz()];
        for o in 0..g.oc {
            for e in csr.row_ptr[o]..csr.row_ptr[o + 1] {
                let (plane, shift) = tap(csr.col_idx[e] as usize);
                let dst = next[plane];
                next[plane] += 1;
                bwd_off[dst] = (o * lay.ys + lay.front - shift) as u32;
                bwd_src[dst] = e as u32;
            }
        }
        Ok(SparseConv {
            geom: *g,
            lay,
            isa: isa::active(),
            nnz: w.nnz(),
            fwd_off,
            bwd_row_ptr,
            bwd_off,
            bwd_src,
            valid: ValidMask::new(lay.ph, lay.pw, g.oh(), g.ow()),
            strided: Strided::new(s),
            pack: PackPlan::new((g.h, g.w), (lay.ph, lay.pw), lay.sx, s, g.pad),
            rows: RowsPlan::new((g.h, g.w), (lay.ph, lay.pw), (lay.sy, lay.sx), s, g.pad),
            tiny,
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

    /// Length of the phase buffer [`Self::pack_input`] fills (about the padded input size).
    pub fn phase_len(&self) -> usize {
        self.lay.planes(&self.geom) * self.lay.xs
    }

    /// Length of the expanded output-gradient buffer [`Self::backward_input`] and
    /// [`Self::grad_weight`] use.
    pub fn grad_len(&self) -> usize {
        self.geom.oc * self.lay.ys
    }

    fn check_w(&self, op: &str, w: &SparseMatrix) -> Result<(), SparseError> {
        if w.nnz() != self.nnz || w.rows() != self.geom.oc || w.cols() != self.geom.k() {
            return Err(SparseError::new(format!(
                "sparse conv {op}: the weight ({}x{}, nnz {}) is not the pattern this layout \
                 was built for ({}x{}, nnz {}); rebuild the SparseConv after a mask change",
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

    /// Fills the phase buffer `xph` (`phase_len()`, overwritten) from the CNHW input `x`.
    pub fn pack_input(&self, x: &[f32], xph: &mut [f32]) -> Result<(), SparseError> {
        let g = &self.geom;
        len_check("pack_input", "x", x.len(), g.x_len())?;
        len_check("pack_input", "xph", xph.len(), self.phase_len())?;
        let lay = self.lay;
        let s = g.stride;
        let hw = g.h * g.w;
        if let Some(t) = &self.tiny {
            self.pack_tiny(t, x, xph);
            return Ok(());
        }
        if phase::vector_ok(self.isa) {
            // The `sx` planes of one (channel, row phase) together: each input row is loaded
            // once for all its column phases.
            let group = |(gi, planes): (usize, &mut [f32])| {
                let (c, ry) = (gi / lay.sy, gi % lay.sy);
                let x_c = &x[c * g.n * hw..][..g.n * hw];
                // SAFETY: AVX-512 is available (`vector_ok`); `x_c` holds the channel's N
                // images of h x w; `planes` is exactly the `sx` planes (c, ry, 0..sx), each
                // `xs >= l = N·PH·PW` long, owned by this task.
                unsafe {
                    phase::pack_group(
                        &self.pack,
                        x_c.as_ptr(),
                        g.n,
                        ry,
                        planes.as_mut_ptr(),
                        lay.xs,
                    )
                }
            };
            let chunk = lay.xs * lay.sx;
            if g.x_len() < SERIAL_FLOPS {
                xph.chunks_exact_mut(chunk).enumerate().for_each(group);
            } else {
                xph.par_chunks_exact_mut(chunk).enumerate().for_each(group);
            }
            return Ok(());
        }
        let plane = |(q, row): (usize, &mut [f32])| {
            let (c, ry, rx) = (q / (lay.sy * lay.sx), (q / lay.sx) % lay.sy, q % lay.sx);
            let pw = lay.pw;
            // Columns px whose input column s·px + rx - pad lies in 0..w, and rows py whose
            // input row s·py + ry - pad lies in 0..h.
            let (lo, hi) = crate::im2col::valid_range(pw, g.w, s, rx, g.pad);
            let (ylo, yhi) = crate::im2col::valid_range(lay.ph, g.h, s, ry, g.pad);
            let (ylo, yhi) = if hi > lo { (ylo, yhi) } else { (0, 0) };
            let block = lay.ph * pw;
            for n in 0..g.n {
                let img = &x[(c * g.n + n) * hw..][..hw];
                let out = &mut row[n * block..][..block];
                phase::zero_run(&mut out[..ylo * pw]);
                phase::zero_run(&mut out[yhi.max(ylo) * pw..]);
                for (py, dst) in (ylo..yhi).zip(out[ylo * pw..].chunks_exact_mut(pw)) {
                    let src = &img[(s * py + ry - g.pad) * g.w + s * lo + rx - g.pad..];
                    phase::zero_run(&mut dst[..lo]);
                    phase::zero_run(&mut dst[hi..]);
                    if s == 1 {
                        phase::copy_run(&src[..hi - lo], &mut dst[lo..hi]);
                    } else {
                        // The last input column read, s·(hi-lo-1), lies in the row.
                        let src = &src[..s * (hi - lo - 1) + 1];
                        for (i, d) in dst[lo..hi].iter_mut().enumerate() {
                            *d = src[s * i];
                        }
                    }
                }
            }
            row[lay.l..].fill(0.0);
        };
        if g.x_len() < SERIAL_FLOPS {
            xph.chunks_exact_mut(lay.xs).enumerate().for_each(plane);
        } else {
            xph.par_chunks_exact_mut(lay.xs).enumerate().for_each(plane);
        }
        Ok(())
    }

    /// Forward pass: CNHW `out` `[OC][N][OH][OW]` (overwritten) from the phase buffer of the
    /// input ([`Self::pack_input`]) and the values of `w`.
    pub fn forward(
        &self,
        w: &SparseMatrix,
        xph: &[f32],
        out: &mut [f32],
    ) -> Result<(), SparseError> {
        self.forward_affine(w, xph, out, None)
    }

    /// [`Self::forward`], then `out = out · scale[o] + shift[o]` per output channel `o` and
    /// ReLU when `relu` (a folded inference BatchNorm), applied to each tile's outputs as they
    /// are written, while they are still in L1: `epilogue = Some((scale, shift, relu))`. The
    /// same values (and rounding) as a separate pass after [`Self::forward`].
    pub fn forward_affine(
        &self,
        w: &SparseMatrix,
        xph: &[f32],
        out: &mut [f32],
        epilogue: Option<(&[f32], &[f32], bool)>,
    ) -> Result<(), SparseError> {
        self.check_w("forward", w)?;
        let g = &self.geom;
        len_check("forward", "xph", xph.len(), self.phase_len())?;
        len_check("forward", "out", out.len(), g.out_len())?;
        if let Some((scale, shift, _)) = epilogue {
            len_check("forward_affine", "scale", scale.len(), g.oc)?;
            len_check("forward_affine", "shift", shift.len(), g.oc)?;
        }
        let affine = |o: usize, y: &mut [f32]| {
            if let Some((scale, shift, relu)) = epilogue {
                crate::batchnorm::row_affine_inplace(y, scale[o], shift[o], relu);
            }
        };
        let csr = Csr {
            rows: g.oc,
            cols: self.phase_len(),
            row_ptr: w.row_ptr(),
            col_idx: &self.fwd_off,
            values: w.values(),
        };
        let lay = self.lay;
        let (oh, ow) = (g.oh(), g.ow());
        let optr = OutPtr::new(out.as_mut_ptr());
        if lay.front == 0 {
            // No junk (kernel no larger than the stride, e.g. 1x1): the virtual rows are the
            // CNHW output rows (PH = OH, PW = OW, row length l = N·OH·OW).
            let sink = Sink::Rows(optr, lay.l);
            run_offset_spmm(self.isa, &csr, xph, lay.l, lay.planes(g), sink);
            if let Some((scale, shift, relu)) = epilogue {
                crate::batchnorm::channel_affine_inplace(out, scale, shift, relu);
            }
            return Ok(());
        }
        let vector = phase::vector_ok(self.isa);
        // Output row `o`, virtual columns c0..c0 + tile.len(): keep the valid positions.
        let emit = |o: usize, c0: usize, tile: &[f32]| {
            if vector {
                let at = o * g.n * oh * ow + self.valid.valid_before(c0);
                // SAFETY: AVX-512 is available (`vector_ok`); the valid positions of the
                // tile are output elements at..at + count of row `o` (CNHW order is flat
                // order), inside `out`; tasks own disjoint (row, column) blocks.
                let cnt = unsafe { phase::compress(&self.valid, c0, tile, optr.get().add(at)) };
                if epilogue.is_some() {
                    // SAFETY: the `cnt` elements just written, owned by this task (above).
                    affine(o, unsafe {
                        std::slice::from_raw_parts_mut(optr.get().add(at), cnt)
                    });
                }
                return;
            }
            for_row_runs(&lay, c0, tile.len(), oh, 0..ow, |n, oy, ox, t0, len| {
                let dst = ((o * g.n + n) * oh + oy) * ow + ox;
                // SAFETY: (o, n, oy, ox..ox + len) is inside `out` (oy < OH, ox + len <= OW);
                // tasks own disjoint (row, column) blocks, and every virtual position maps to
                // at most one output position.
                let dst = unsafe { std::slice::from_raw_parts_mut(optr.get().add(dst), len) };
                phase::copy_run(&tile[t0..t0 + len], dst);
                affine(o, dst);
            });
        };
        run_offset_spmm(self.isa, &csr, xph, lay.l, lay.planes(g), Sink::Emit(&emit));
        Ok(())
    }

    /// Input gradient: CNHW `dx` `[C][N][H][W]` (overwritten) from the CNHW output gradient
    /// `dy`; `dyv` (`grad_len()`) receives the expanded gradient, which
    /// [`Self::grad_weight`] then reuses.
    pub fn backward_input(
        &self,
        w: &SparseMatrix,
        dy: &[f32],
        dyv: &mut [f32],
        dx: &mut [f32],
    ) -> Result<(), SparseError> {
        self.check_w("backward_input", w)?;
        let g = &self.geom;
        len_check("backward_input", "dx", dx.len(), g.x_len())?;
        self.expand_grad(dy, dyv)?;
        let lay = self.lay;
        if !lay.covers_input {
            // Pixels that no output reads get zero gradient (the others are written below).
            dx.fill(0.0);
        }
        let vals: Vec<f32> = self
            .bwd_src
            .iter()
            .map(|&e| w.values()[e as usize])
            .collect();
        let csr = Csr {
            rows: lay.planes(g),
            cols: self.grad_len(),
            row_ptr: &self.bwd_row_ptr,
            col_idx: &self.bwd_off,
            values: &vals,
        };
        let s = g.stride;
        let hw = g.h * g.w;
        if let Some(t) = &self.tiny {
            // The tap rows, then each pixel's sum over the taps that read it (col2im; `dx`
            // is zeroed above: the tiny layout does not cover the input).
            let (nt, ohw) = (t.taps.len(), g.oh() * g.ow());
            self.with_gradient_planes(&csr, dyv, dx, nt * lay.l, |row0, dx_c| {
                for (reads, row) in t.reads.iter().zip(row0.chunks_exact(lay.l)) {
                    for (p, read) in reads.iter().enumerate() {
                        if let Some(at) = *read {
                            let src = row.iter().skip(p).step_by(ohw);
                            for (d, &v) in dx_c[at..].iter_mut().step_by(hw).zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            });
            return Ok(());
        }
        if s == 1 && g.pad == 0 {
            // One phase, unpadded: the plane of channel c is its N images (PH = H, PW = W).
            let sink = Sink::Rows(OutPtr::new(dx.as_mut_ptr()), lay.l);
            run_offset_spmm(self.isa, &csr, dyv, lay.l, g.oc, sink);
            return Ok(());
        }
        let vector = phase::vector_ok(self.isa);
        if let (true, Some(rows)) = (vector, &self.rows) {
            // The phase planes of the gradient into a scratch buffer, then whole image rows
            // from them: full-row stores instead of one strided store per phase row.
            self.with_gradient_planes(&csr, dyv, dx, lay.sy * lay.sx * lay.l, |planes, dx_c| {
                // SAFETY: AVX-512 is available (`vector_ok`); `planes` are the channel's
                // sy·sx planes of `l`; `dx_c` is exactly the channel's N images, owned by this
                // task.
                unsafe { phase::unpack_rows(rows, planes.as_ptr(), lay.l, g.n, dx_c.as_mut_ptr()) }
            });
            return Ok(());
        }
        let dptr = OutPtr::new(dx.as_mut_ptr());
        let emit = |q: usize, c0: usize, tile: &[f32]| {
            let (c, ry, rx) = (q / (lay.sy * lay.sx), (q / lay.sx) % lay.sy, q % lay.sx);
            let (lo, hi) = crate::im2col::valid_range(lay.pw, g.w, s, rx, g.pad);
            // Plane rows py whose input row s·py + ry - pad lies in 0..h.
            let (ylo, yhi) = crate::im2col::valid_range(lay.ph, g.h, s, ry, g.pad);
            if vector {
                let u = Unpack {
                    ph: lay.ph,
                    pw: lay.pw,
                    h: g.h,
                    w: g.w,
                    pad: g.pad,
                    ry,
                    rx,
                    rows: (ylo, yhi),
                    cols: (lo, hi),
                };
                // SAFETY: AVX-512 is available (`vector_ok`); the channel's images
                // `dx[(c·N)·hw ..][..N·hw]` lie in `dx`, the tile lies in the plane
                // (c0 + len <= l = N·PH·PW); only this plane's pixels of this tile's columns
                // are written (each input pixel lies in exactly one plane and position), and
                // tasks own disjoint (plane, column) blocks.
                unsafe {
                    phase::unpack_tile(&self.strided, &u, c0, tile, dptr.get().add(c * g.n * hw))
                };
                return;
            }
            for_row_runs(&lay, c0, tile.len(), yhi, lo..hi, |n, py, a, t0, len| {
                if py < ylo {
                    return;
                }
                let iy = s * py + ry - g.pad;
                let base = (c * g.n + n) * hw + iy * g.w + s * a + rx - g.pad;
                // SAFETY: iy < h and the columns s·(a + i) + rx - pad < w (valid_range), c < C,
                // n < N: inside `dx`. Each input pixel lies in exactly one phase plane and one
                // flat position, and tasks own disjoint (plane, column) blocks.
                unsafe {
                    let d = dptr.get().add(base);
                    for (i, &v) in tile[t0..t0 + len].iter().enumerate() {
                        *d.add(s * i) = v;
                    }
                }
            });
        };
        run_offset_spmm(self.isa, &csr, dyv, lay.l, g.oc, Sink::Emit(&emit));
        Ok(())
    }

    /// The tiny layout's rows: tap `t` of channel `c` at every output position (zero where it
    /// reads padding), then the zero row.
    fn pack_tiny(&self, t: &Tiny, x: &[f32], xph: &mut [f32]) {
        let g = &self.geom;
        let (lay, nt) = (self.lay, t.taps.len());
        let (ohw, hw) = (g.oh() * g.ow(), g.h * g.w);
        let row = |(r, dst): (usize, &mut [f32])| {
            dst[lay.l..].fill(0.0);
            if r + 1 == lay.planes {
                dst[..lay.l].fill(0.0);
                return;
            }
            let (c, reads) = (r / nt, &t.reads[r % nt]);
            let x_c = &x[c * g.n * hw..][..g.n * hw];
            for (p, read) in reads.iter().enumerate() {
                // Output position p of every image: one strided column of the row.
                let col = dst[..lay.l].iter_mut().skip(p).step_by(ohw);
                match *read {
                    Some(at) => {
                        for (d, &v) in col.zip(x_c[at..].iter().step_by(hw)) {
                            *d = v;
                        }
                    }
                    None => col.for_each(|d| *d = 0.0),
                }
            }
        };
        if lay.planes * lay.xs < SERIAL_FLOPS {
            xph.chunks_exact_mut(lay.xs).enumerate().for_each(row);
        } else {
            xph.par_chunks_exact_mut(lay.xs).enumerate().for_each(row);
        }
    }

    /// The input gradient's planes (the transposed product `csr` of `dyv`) into a per-thread
    /// scratch buffer, then `channel(planes of c, dx of c)` for every input channel `c`, whose
    /// planes are the `per_c` values from `c·per_c` on.
    fn with_gradient_planes(
        &self,
        csr: &Csr<'_>,
        dyv: &[f32],
        dx: &mut [f32],
        per_c: usize,
        channel: impl Fn(&[f32], &mut [f32]) + Sync,
    ) {
        let g = &self.geom;
        let (len, per_x) = (csr.rows * self.lay.l, g.n * g.h * g.w);
        let mut run = |buf: &mut Vec<f32>| {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            let sink = Sink::Rows(OutPtr::new(buf.as_mut_ptr()), self.lay.l);
            run_offset_spmm(self.isa, csr, dyv, self.lay.l, g.oc, sink);
            let buf = &buf[..len];
            let one = |(c, dx_c): (usize, &mut [f32])| channel(&buf[c * per_c..][..per_c], dx_c);
            if g.x_len() < SERIAL_FLOPS {
                dx.chunks_exact_mut(per_x).enumerate().for_each(one);
            } else {
                dx.par_chunks_exact_mut(per_x).enumerate().for_each(one);
            }
        };
        PLANE_BUF.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => run(&mut buf),
            Err(_) => run(&mut Vec::new()),
        });
    }

    /// Writes `dy` (CNHW `[OC][N][OH][OW]`) into the flat layout `dyv` (`grad_len()`): `front`
    /// leading zeros per row, zeros at junk positions.
    pub fn expand_grad(&self, dy: &[f32], dyv: &mut [f32]) -> Result<(), SparseError> {
        let g = &self.geom;
        len_check("expand_grad", "dy", dy.len(), g.out_len())?;
        len_check("expand_grad", "dyv", dyv.len(), self.grad_len())?;
        let lay = self.lay;
        let (oh, ow) = (g.oh(), g.ow());
        let vector = phase::vector_ok(self.isa);
        let row = |(o, r): (usize, &mut [f32])| {
            r[..lay.front].fill(0.0);
            r[lay.front + lay.l..].fill(0.0);
            let v = &mut r[lay.front..lay.front + lay.l];
            if vector {
                let per = g.n * oh * ow;
                let src = &dy[o * per..][..per];
                // SAFETY: AVX-512 is available (`vector_ok`); the flat row `v` (N·PH·PW
                // positions) has exactly N·OH·OW valid positions, the length of `src`.
                unsafe { phase::expand(&self.valid, src.as_ptr(), v) };
                return;
            }
            for n in 0..g.n {
                for py in 0..lay.ph {
                    let d = &mut v[(n * lay.ph + py) * lay.pw..(n * lay.ph + py + 1) * lay.pw];
                    if py < oh {
                        let src = &dy[((o * g.n + n) * oh + py) * ow..][..ow];
                        phase::copy_run(src, &mut d[..ow]);
                        phase::zero_run(&mut d[ow..]);
                    } else {
                        phase::zero_run(d);
                    }
                }
            }
        };
        if g.out_len() < SERIAL_FLOPS {
            dyv.chunks_exact_mut(lay.ys).enumerate().for_each(row);
        } else {
            dyv.par_chunks_exact_mut(lay.ys).enumerate().for_each(row);
        }
        Ok(())
    }

    /// Weight gradient at the active weights, aligned with `w.values()` (overwritten): `dyv`
    /// from [`Self::expand_grad`] (or [`Self::backward_input`]), `xph` from
    /// [`Self::pack_input`].
    pub fn grad_weight(
        &self,
        w: &SparseMatrix,
        dyv: &[f32],
        xph: &[f32],
        grad: &mut [f32],
    ) -> Result<(), SparseError> {
        self.check_w("grad_weight", w)?;
        let g = &self.geom;
        len_check("grad_weight", "dyv", dyv.len(), self.grad_len())?;
        len_check("grad_weight", "xph", xph.len(), self.phase_len())?;
        len_check("grad_weight", "grad", grad.len(), self.nnz)?;
        let csr = Csr {
            rows: g.oc,
            cols: self.phase_len(),
            row_ptr: w.row_ptr(),
            col_idx: &self.fwd_off,
            values: w.values(),
        };
        let lay = self.lay;
        let isa = self.isa;
        let l = lay.l;
        if grad.is_empty() {
            return Ok(());
        }
        let threads = rayon::current_num_threads();
        let serial = 2 * self.nnz * l < SERIAL_FLOPS;
        let tile = cache_tile(g.oc + lay.planes(g));
        let dy0 = &dyv[lay.front..];
        let block =
            |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, out: &mut [f32]| {
                out.fill(0.0);
                let mut c0 = cols.start;
                while c0 < cols.end {
                    let cw = (cols.end - c0).min(tile);
                    // SAFETY: `isa` is available; for every row, `dy0[r·ys + c0 ..][..cw]` lies in
                    // `dyv` (c0 + cw <= l, front + l <= ys) and for every entry
                    // `xph[off + c0 ..][..cw]` lies in `xph` (off = plane·xs + shift,
                    // shift + l <= xs); `out` holds exactly the entries of `rows`.
                    unsafe {
                        simd::sddmm_block(
                            isa,
                            &csr,
                            dy0[c0..].as_ptr(),
                            lay.ys,
                            xph[c0..].as_ptr(),
                            1,
                            rows.clone(),
                            cw,
                            cw,
                            out,
                        )
                    }
                    c0 += cw;
                }
            };
        let n_col = if serial {
            1
        } else {
            threads.min(l.div_ceil(tile))
        };
        if n_col >= 2 {
            // Split the columns (each phase row is read once) and sum the partial gradients.
            let bounds = split_cols(l, n_col, 16);
            let n_col = bounds.len() - 1;
            let mut partials = vec![vec![0.0f32; grad.len()]; n_col - 1];
            let mut outs: Vec<&mut [f32]> = Vec::with_capacity(n_col);
            outs.push(&mut *grad);
            outs.extend(partials.iter_mut().map(|v| v.as_mut_slice()));
            outs.into_par_iter()
                .enumerate()
                .for_each(|(ci, out)| block(0..g.oc, bounds[ci]..bounds[ci + 1], out));
            for part in &partials {
                for (a, &b) in grad.iter_mut().zip(part) {
                    *a += b;
                }
            }
        } else {
            let n_row = if serial { 1 } else { 4 * threads };
            let row_bounds = split_rows(w.row_ptr(), n_row);
            let mut outs: Vec<(std::ops::Range<usize>, &mut [f32])> = Vec::new();
            let mut rest = grad;
            for wb in row_bounds.windows(2) {
                let len = w.row_ptr()[wb[1]] - w.row_ptr()[wb[0]];
                let (head, tail) = rest.split_at_mut(len);
                outs.push((wb[0]..wb[1], head));
                rest = tail;
            }
            if outs.len() == 1 {
                outs.into_iter()
                    .for_each(|(rows, out)| block(rows, 0..l, out));
            } else {
                outs.into_par_iter()
                    .for_each(|(rows, out)| block(rows, 0..l, out));
            }
        }
        Ok(())
    }
}

pub(super) fn len_check(op: &str, what: &str, got: usize, want: usize) -> Result<(), SparseError> {
    if got == want {
        Ok(())
    } else {
        Err(SparseError::new(format!(
            "sparse conv {op}: {what} has {got} elements, expected {want}"
        )))
    }
}

/// Cache-tile width for operands spanning `rows` rows.
fn cache_tile(rows: usize) -> usize {
    (SLAB_BYTES / 4 / rows.max(1)).clamp(GRANULE, 4096) / GRANULE * GRANULE
}

/// Calls `f(n, py, px, t0, len)` for every run of flat positions `c0 + t0 .. c0 + t0 + len`
/// that lies in one plane row `(n, py)` and has `px .. px + len` inside `0..width_ok`, for
/// plane rows with `py < rows_ok` (the valid outputs, or the valid phase columns).
#[inline]
fn for_row_runs(
    lay: &PhaseLayout,
    c0: usize,
    width: usize,
    rows_ok: usize,
    cols_ok: std::ops::Range<usize>,
    mut f: impl FnMut(usize, usize, usize, usize, usize),
) {
    let end = c0 + width;
    // One division for the first position, then walk row by row.
    let (mut n, rem) = (c0 / (lay.ph * lay.pw), c0 % (lay.ph * lay.pw));
    let (mut py, mut px) = (rem / lay.pw, rem % lay.pw);
    let mut j = c0;
    while j < end {
        let row_end = (j - px + lay.pw).min(end);
        if py < rows_ok {
            let (a, b) = (px.max(cols_ok.start), (px + row_end - j).min(cols_ok.end));
            if a < b {
                f(n, py, a, j - c0 + (a - px), b - a);
            }
        }
        j = row_end;
        px = 0;
        py += 1;
        if py == lay.ph {
            py = 0;
            n += 1;
        }
    }
}

thread_local! {
    /// The input gradient's phase planes (`backward_input`), reused across calls: the size of
    /// the largest layer's phase buffer, per calling thread.
    static PLANE_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static TILE_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where [`run_offset_spmm`] puts its rows.
#[derive(Clone, Copy)]
enum Sink<'a> {
    /// `emit(r, c0, tile)` one cache tile of one row at a time (`tile = V[r][c0 ..][..len]`).
    Emit(&'a (dyn Fn(usize, usize, &[f32]) + Sync)),
    /// Straight into rows of this stride: `V[r][c]` at `ptr + r·stride + c` (the caller owns
    /// `rows x stride` floats there, `width <= stride`).
    Rows(OutPtr, usize),
}

/// `V[r][c] = Σ_e values[e] · x[col_idx[e] + c]` for `c < width`, into `sink`. `slab_rows` is
/// how many distinct `x` rows the pattern touches (for the cache-tile width).
fn run_offset_spmm(
    isa: Isa,
    csr: &Csr<'_>,
    x: &[f32],
    width: usize,
    slab_rows: usize,
    sink: Sink<'_>,
) {
    if csr.rows == 0 || width == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let flops = 2 * csr.nnz() * width + csr.rows * width;
    let target = if flops < SERIAL_FLOPS { 1 } else { 4 * threads };
    let col_bounds = split_cols(width, target, GRANULE);
    let n_col = col_bounds.len() - 1;
    let row_bounds = split_rows(csr.row_ptr, target.div_ceil(n_col));
    let n_row = row_bounds.len() - 1;
    let ctile = cache_tile(slab_rows);
    let task = |t: usize| {
        let (ri, ci) = (t / n_col, t % n_col);
        let run = |buf: &mut Vec<f32>| {
            if buf.len() < ctile {
                buf.resize(ctile, 0.0);
            }
            let mut c0 = col_bounds[ci];
            while c0 < col_bounds[ci + 1] {
                let cw = (col_bounds[ci + 1] - c0).min(ctile);
                for r in row_bounds[ri]..row_bounds[ri + 1] {
                    let out = match sink {
                        Sink::Emit(_) => buf.as_mut_ptr(),
                        // SAFETY: row r, columns c0..c0 + cw of the caller's rows (r < rows,
                        // c0 + cw <= width <= stride); tasks own disjoint blocks.
                        Sink::Rows(ptr, stride) => unsafe { ptr.get().add(r * stride + c0) },
                    };
                    // SAFETY: `isa` is available; every entry reads `x[off + c0 ..][..cw]`,
                    // which the callers guarantee lies in `x` (offsets are built so that
                    // off + width <= x.len()); `out` has `cw` writable elements (the tile
                    // buffer, or this task's block of the sink's rows).
                    unsafe { simd::spmm_block(isa, csr, x[c0..].as_ptr(), 1, r..r + 1, cw, out, 0) }
                    if let Sink::Emit(emit) = sink {
                        emit(r, c0, &buf[..cw]);
                    }
                }
                c0 += cw;
            }
        };
        TILE_BUF.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => run(&mut buf),
            Err(_) => run(&mut Vec::new()),
        })
    };
    if n_row * n_col == 1 {
        task(0);
    } else {
        (0..n_row * n_col).into_par_iter().for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction set gives the same results as the scalar portable loops (which the
    /// integration tests check against a naive convolution), on geometries large enough for
    /// parallel column blocks, row tails and masked vector tails; the layout passes (pack,
    /// compaction, expansion, scatter to the input gradient) bit for bit.
    #[test]
    fn every_isa_agrees_with_the_portable_loops() {
        let geom = |(c, n, h, w, oc, k, stride, pad)| Conv2dGeom {
            c,
            n,
            h,
            w,
            oc,
            kh: k,
            kw: k,
            stride,
            pad,
        };
        for g in [
            (7, 5, 13, 11, 9, 4, 2, 1),
            (3, 3, 9, 44, 5, 4, 2, 1),
            (4, 3, 10, 19, 5, 7, 3, 3),
            (3, 2, 9, 9, 4, 1, 2, 0),
            (5, 3, 7, 9, 6, 1, 1, 0),
            (3, 2, 8, 10, 4, 3, 1, 0),
            // Tiny output maps (the live-tap layout), one with rows long enough for vectors.
            (9, 40, 2, 2, 7, 3, 1, 1),
            (5, 3, 2, 2, 4, 3, 2, 1),
        ] {
            agrees_with_the_portable_loops(geom(g));
        }
    }

    fn agrees_with_the_portable_loops(g: Conv2dGeom) {
        let vals = |seed: u32, n: usize| -> Vec<f32> {
            (0..n as u32)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let w = vals(1, g.w_len());
        let m: Vec<bool> = vals(2, g.w_len()).iter().map(|&u| u < -0.6).collect();
        let x = vals(3, g.x_len());
        let dy = vals(4, g.out_len());
        let sm = SparseMatrix::from_dense_masked(&w, &m, g.oc, g.k()).unwrap();
        let run = |isa: Isa| {
            let conv = SparseConv::new(&sm, &g).unwrap().with_isa(isa);
            // Stale (NaN) buffers: every element must be written.
            let mut xph = vec![f32::NAN; conv.phase_len()];
            conv.pack_input(&x, &mut xph).unwrap();
            let mut out = vec![f32::NAN; g.out_len()];
            conv.forward(&sm, &xph, &mut out).unwrap();
            let (mut dyv, mut dx) = (vec![f32::NAN; conv.grad_len()], vec![f32::NAN; g.x_len()]);
            conv.backward_input(&sm, &dy, &mut dyv, &mut dx).unwrap();
            let mut grad = vec![0.0; sm.nnz()];
            conv.grad_weight(&sm, &dyv, &xph, &mut grad).unwrap();
            // The layout alone: the products differ in the last bits between instruction
            // sets, pure moves must not.
            let mut dyv2 = vec![f32::NAN; conv.grad_len()];
            conv.expand_grad(&dy, &mut dyv2).unwrap();
            assert_eq!(dyv, dyv2, "{isa:?}");
            [out, dx, grad, xph, dyv]
        };
        let want = run(Isa::Portable);
        for isa in Isa::available() {
            let got = run(isa);
            for (what, (got, want)) in got.iter().zip(&want).enumerate() {
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(want) {
                    if what >= 3 {
                        assert_eq!(a.to_bits(), b.to_bits(), "{g:?} {isa:?} layout {what}");
                    } else {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{g:?} {isa:?}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
