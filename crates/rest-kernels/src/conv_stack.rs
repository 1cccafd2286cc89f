//! The inference stack: inference of a stack of convolutions, dense or sparse (+ folded
//! BatchNorm and ReLU), and a global average pool, run depth-first on groups of 16 images
//! with the batch innermost: every activation is `[C][H][W][16]`, one 16-lane vector per
//! pixel of the group's 16 images.
//!
//! # Why
//! The polyphase sparse convolution of [`crate::sparse::SparseConv`] spans the whole batch with one
//! flat index `(n·PH + oy)·PW + ox`, so the positions a stride or the kernel overhang make
//! invalid (`oy >= OH` or `ox >= OW`) are computed and dropped: a 3x3 output runs as 4x4
//! (1.78x the work), a 7x7 as 8x8. With the batch innermost a vector never mixes positions,
//! so only valid outputs are computed; and each output vector lands directly where the next
//! layer reads it (its phase plane slot), so no compaction, packing or transposes run
//! between layers. Running the whole stack on one group of images before the next keeps
//! every intermediate (about 1 MB for REST's CNN at its widest) in the core's L2, where the
//! whole-batch layout streams tens of MB per layer through L3.
//!
//! # Layout
//! A layer's input is split into its `sy x sx` stride phases (as in [`crate::sparse::SparseConv`]):
//! plane `(c, ry, rx)` holds the padded pixels `(s·py + ry, s·px + rx)` at
//! `((c·sy + ry)·sx + rx)·PL + (py·PW + px)·16 + lane` (`PL = PH·PW·16`). A weight
//! `W[o, c, ky, kx]` then adds `w · plane(c, ky % s, kx % s)[pos + (ky/s)·PW + kx/s]` to output
//! position `pos = oy·PW + ox`: per active weight, one vector FMA per output position.
//! Outputs are computed a tile of up to [`TILE`] positions at a time (one accumulator each),
//! with the affine and ReLU applied in registers before the store.
//!
//! The results equal [`crate::sparse::SparseConv::forward_affine`] followed by
//! [`crate::global_avg_pool_fwd`] bit for bit where the pooled map has fewer than 16
//! positions (same products in the same order; the pool sums positions in order).

use rayon::prelude::*;

use crate::im2col::Conv2dGeom;
use crate::isa::{self, Isa};
use crate::sparse::{SparseError, SparseMatrix};

/// Images per group: the vector width.
pub const LANES: usize = 16;
/// Output positions computed together (one 16-lane accumulator each).
const TILE: usize = 8;
/// Marks an output position that no later layer reads (not computed).
const UNUSED: u32 = u32::MAX;

/// A convolution's pattern laid out for one group of [`LANES`] images (built once per pattern
/// and image size; the values come from the [`SparseMatrix`] at every call). A dense layer
/// runs through the same code with a fully dense pattern.
#[derive(Debug, Clone)]
pub struct ConvStackPlan {
    /// The geometry, with `n = LANES`.
    geom: Conv2dGeom,
    sy: usize,
    sx: usize,
    ph: usize,
    pw: usize,
    /// Floats per phase plane: `PH·PW·LANES`.
    plane: usize,
    nnz: usize,
    /// Laid out for a dense weight ([`Self::dense`]): `fwd_off` lists every column once.
    dense: bool,
    /// Per CSR entry of `W` (same order): `plane_index·PL + shift·LANES`.
    fwd_off: Vec<u32>,
}

impl ConvStackPlan {
    /// Lays out the pattern of `w` (`[OC][C·KH·KW]`, PyTorch order) for convolutions of
    /// geometry `g` (its batch size is ignored: the layout is per group of [`LANES`]).
    pub fn new(w: &SparseMatrix, g: &Conv2dGeom) -> Result<Self, SparseError> {
        if w.rows() != g.oc || w.cols() != g.k() {
            return Err(SparseError::new(format!(
                "batch-innermost conv: the pattern is {}x{}, the geometry needs OC x C·KH·KW \
                 = {}x{}",
                w.rows(),
                w.cols(),
                g.oc,
                g.k()
            )));
        }
        Self::build(g, w.col_idx(), w.nnz(), false)
    }

    /// Lays out a dense weight (`[OC][C·KH·KW]`, every weight active) for geometry `g`: run
    /// with [`ConvStackWeights::Dense`], without building a CSR.
    pub fn dense(g: &Conv2dGeom) -> Result<Self, SparseError> {
        let cols: Vec<u32> = (0..g.k() as u32).collect();
        Self::build(g, &cols, g.oc * g.k(), true)
    }

    fn build(g: &Conv2dGeom, cols: &[u32], nnz: usize, dense: bool) -> Result<Self, SparseError> {
        let g = Conv2dGeom { n: LANES, ..*g };
        g.validate()
            .map_err(|e| SparseError::new(format!("batch-innermost conv: {e}")))?;
        let s = g.stride;
        let (sy, sx, ph, pw) = phase_dims(&g);
        let plane = ph * pw * LANES;
        if (g.c * sy * sx)
            .checked_mul(plane)
            .is_none_or(|len| len > u32::MAX as usize)
        {
            return Err(SparseError::new(format!(
                "batch-innermost conv: {} channels of {}x{} are too large for 32-bit offsets",
                g.c, g.h, g.w
            )));
        }
        let khw = g.kh * g.kw;
        let fwd_off = cols
            .iter()
            .map(|&k| {
                let k = k as usize;
                let (c, ky, kx) = (k / khw, (k % khw) / g.kw, k % g.kw);
                let p = (c * sy + ky % s) * sx + kx % s;
                (p * plane + ((ky / s) * pw + kx / s) * LANES) as u32
            })
            .collect();
        Ok(ConvStackPlan {
            geom: g,
            sy,
            sx,
            ph,
            pw,
            plane,
            nnz,
            dense,
            fwd_off,
        })
    }

    /// The geometry this layout was built for (`n = LANES`).
    pub fn geom(&self) -> &Conv2dGeom {
        &self.geom
    }

    /// Floats of one group's phase buffer (the layer's input).
    pub fn phase_len(&self) -> usize {
        self.geom.c * self.sy * self.sx * self.plane
    }

    /// The output map writing `[OC][OH][OW][LANES]` (the last layer of a stack).
    fn out_chwn(&self) -> OutMap {
        let (oh, ow) = (self.geom.oh(), self.geom.ow());
        let pos = (0..oh * ow).map(|p| (p * LANES) as u32).collect();
        self.out_map(pos, oh * ow * LANES, Vec::new())
    }

    /// The output map writing straight into `next`'s phase buffer: each output position to
    /// the slot of the phase plane that reads it, padding slots zeroed, positions that no
    /// slot holds (pixels a stride skips) not computed.
    fn out_phases(&self, next: &ConvStackPlan) -> Result<OutMap, SparseError> {
        let (g, n) = (&self.geom, &next.geom);
        if (n.c, n.h, n.w) != (g.oc, g.oh(), g.ow()) {
            return Err(SparseError::new(format!(
                "batch-innermost conv stack: a layer gives {} channels of {}x{}, the next \
                 takes {} channels of {}x{}",
                g.oc,
                g.oh(),
                g.ow(),
                n.c,
                n.h,
                n.w
            )));
        }
        let s = n.stride;
        let row = next.sy * next.sx * next.plane;
        let mut hit = vec![false; row / LANES];
        let mut pos = Vec::with_capacity(g.oh() * g.ow());
        for oy in 0..g.oh() {
            for ox in 0..g.ow() {
                let (yy, xx) = (oy + n.pad, ox + n.pad);
                let (ry, py, rx, px) = (yy % s, yy / s, xx % s, xx / s);
                if ry < next.sy && rx < next.sx && py < next.ph && px < next.pw {
                    let slot = (ry * next.sx + rx) * next.plane + (py * next.pw + px) * LANES;
                    hit[slot / LANES] = true;
                    pos.push(slot as u32);
                } else {
                    pos.push(UNUSED);
                }
            }
        }
        let zeros = (0..hit.len())
            .filter(|&i| !hit[i])
            .map(|i| (i * LANES) as u32)
            .collect();
        Ok(self.out_map(pos, row, zeros))
    }

    /// Tiles the computed positions: `pos[oy·OW + ox]` is each position's offset in an
    /// output channel's block of `row_stride` floats (or [`UNUSED`]).
    fn out_map(&self, pos: Vec<u32>, row_stride: usize, zeros: Vec<u32>) -> OutMap {
        let ow = self.geom.ow();
        let (mut xo, mut oo) = (Vec::new(), Vec::new());
        for (p, &o) in pos.iter().enumerate() {
            if o != UNUSED {
                xo.push((((p / ow) * self.pw + p % ow) * LANES) as u32);
                oo.push(o);
            }
        }
        // Balanced tiles of at most TILE positions (49 positions: 7 tiles of 7, not 6 of 8
        // and one of 1).
        let count = xo.len().div_ceil(TILE).max(1);
        let tiles = (0..=count).map(|i| xo.len() * i / count).collect();
        OutMap {
            xo,
            oo,
            tiles,
            row_stride,
            zeros,
        }
    }

    /// Fills one group's phase buffer from images `n0 .. n0 + count` of the batch `x`, whose
    /// element `(n, c, y, x)` lies at `n·st[0] + c·st[1] + y·st[2] + x·st[3]`; lanes past
    /// `count` are zero.
    fn pack(&self, isa: Isa, x: &[f32], st: [usize; 4], n0: usize, count: usize, xph: &mut [f32]) {
        let g = &self.geom;
        let s = g.stride;
        for ((c, ry), planes) in (0..g.c)
            .flat_map(|c| (0..self.sy).map(move |ry| (c, ry)))
            .zip(xph.chunks_exact_mut(self.sx * self.plane))
        {
            for (rx, plane) in planes.chunks_exact_mut(self.plane).enumerate() {
                for (p, slot) in plane.chunks_exact_mut(LANES).enumerate() {
                    let (py, px) = (p / self.pw, p % self.pw);
                    let (yy, xx) = (s * py + ry, s * px + rx);
                    if yy < g.pad || xx < g.pad || yy - g.pad >= g.h || xx - g.pad >= g.w {
                        slot.fill(0.0);
                        continue;
                    }
                    let at = n0 * st[0] + c * st[1] + (yy - g.pad) * st[2] + (xx - g.pad) * st[3];
                    gather_lanes(isa, x, at, st[0], count, slot);
                }
            }
        }
    }

    /// One group through this layer: `out` (the next layer's phase buffer or the CHWN
    /// output, as `map` says) from the phase buffer `xph`.
    fn forward(
        &self,
        isa: Isa,
        layer: &ConvStackLayer<'_>,
        map: &OutMap,
        xph: &[f32],
        out: &mut [f32],
    ) {
        for block in out.chunks_exact_mut(map.row_stride) {
            for &z in &map.zeros {
                block[z as usize..][..LANES].fill(0.0);
            }
        }
        let k = self.geom.k();
        // Row-major `[OC][K]` values where every weight is active.
        let dense = match layer.w {
            ConvStackWeights::Dense(d) => Some(d),
            ConvStackWeights::Sparse(m) if self.nnz == self.geom.oc * k => Some(m.values()),
            ConvStackWeights::Sparse(_) => None,
        };
        #[cfg(target_arch = "x86_64")]
        if let (Isa::Avx512, Some(vals)) = (isa, dense) {
            // SAFETY: AVX-512 is available; `vals` holds OC x K weights, `out` OC blocks of
            // `row_stride` floats (as for the rows below).
            unsafe { self.forward_dense(vals, layer, map, xph, out) };
            return;
        }
        for t in map.tiles.windows(2) {
            let (xo, oo) = (&map.xo[t[0]..t[1]], &map.oo[t[0]..t[1]]);
            for (o, block) in out.chunks_exact_mut(map.row_stride).enumerate() {
                let (off, vals) = match (dense, layer.w) {
                    (Some(d), _) => (&self.fwd_off[..k], &d[o * k..(o + 1) * k]),
                    (None, ConvStackWeights::Sparse(m)) => {
                        let (s, e) = (m.row_ptr()[o], m.row_ptr()[o + 1]);
                        (&self.fwd_off[s..e], &m.values()[s..e])
                    }
                    (None, ConvStackWeights::Dense(_)) => unreachable!("dense weights set `dense`"),
                };
                let row = RowTile {
                    off,
                    vals,
                    xo,
                    oo,
                    scale: layer.scale[o],
                    shift: layer.shift[o],
                    relu: layer.relu,
                };
                row_tile(isa, &row, xph, block);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl ConvStackPlan {
    /// [`Self::forward`] of a fully dense layer (e.g. a first convolution with few input
    /// channels): [`DENSE_ROWS`] output channels x up to [`DENSE_TILE`] positions per
    /// register tile, so each loaded input vector feeds several channels. Every output is
    /// the same chain of FMAs over the columns in order as the one-row kernel's (same bits).
    ///
    /// # Safety
    /// AVX-512F available; the pattern is fully dense; `xph` and `out` sized as for
    /// [`Self::forward`].
    #[target_feature(enable = "avx512f")]
    unsafe fn forward_dense(
        &self,
        vals: &[f32],
        layer: &ConvStackLayer<'_>,
        map: &OutMap,
        xph: &[f32],
        out: &mut [f32],
    ) {
        let (oc, k) = (self.geom.oc, self.geom.k());
        // A full row lists every column in order, so row 0's offsets are every row's.
        let off = &self.fwd_off[..k];
        let n = map.xo.len();
        let tiles = n.div_ceil(DENSE_TILE).max(1);
        for ti in 0..tiles {
            let (a, b) = (n * ti / tiles, n * (ti + 1) / tiles);
            let mut o = 0;
            while o < oc {
                let r = (oc - o).min(DENSE_ROWS);
                let d = avx512::DenseTile {
                    vals: &vals[o * k..(o + r) * k],
                    k,
                    off,
                    xo: &map.xo[a..b],
                    oo: &map.oo[a..b],
                    scale: &layer.scale[o..o + r],
                    shift: &layer.shift[o..o + r],
                    relu: layer.relu,
                    row_stride: map.row_stride,
                };
                let (x, y) = (xph.as_ptr(), out.as_mut_ptr().add(o * map.row_stride));
                macro_rules! tile {
                    ($r:literal) => {
                        match b - a {
                            6 => avx512::dense_tile::<$r, 6>(&d, x, y),
                            5 => avx512::dense_tile::<$r, 5>(&d, x, y),
                            4 => avx512::dense_tile::<$r, 4>(&d, x, y),
                            3 => avx512::dense_tile::<$r, 3>(&d, x, y),
                            2 => avx512::dense_tile::<$r, 2>(&d, x, y),
                            1 => avx512::dense_tile::<$r, 1>(&d, x, y),
                            _ => {}
                        }
                    };
                }
                match r {
                    4 => tile!(4),
                    3 => tile!(3),
                    2 => tile!(2),
                    _ => tile!(1),
                }
                o += r;
            }
        }
    }
}

/// Output channels per register tile of a dense layer.
#[cfg(target_arch = "x86_64")]
const DENSE_ROWS: usize = 4;
/// Positions per register tile of a dense layer (`DENSE_ROWS x DENSE_TILE` accumulators).
#[cfg(target_arch = "x86_64")]
const DENSE_TILE: usize = 6;

/// Stride phases per axis and phase-plane size `(sy, sx, PH, PW)` of a layer's input.
fn phase_dims(g: &Conv2dGeom) -> (usize, usize, usize, usize) {
    let s = g.stride;
    (
        s.min(g.kh),
        s.min(g.kw),
        g.oh() + (g.kh - 1) / s,
        g.ow() + (g.kw - 1) / s,
    )
}

/// Floats of one group's activations in [`conv_stack_pool`] for a stack of these (valid,
/// chained) geometries: every layer's phase buffer and the last layer's output. Each thread
/// that runs groups keeps a buffer of this size.
pub fn conv_stack_group_len(geoms: &[Conv2dGeom]) -> usize {
    let phases: usize = geoms
        .iter()
        .map(|g| {
            let (sy, sx, ph, pw) = phase_dims(g);
            g.c * sy * sx * ph * pw * LANES
        })
        .sum();
    phases + geoms.last().map_or(0, |g| g.oc * g.oh() * g.ow() * LANES)
}

/// Where one layer's output positions go (see [`ConvStackPlan::out_phases`]).
#[derive(Debug, Clone)]
struct OutMap {
    /// Per computed position: its offset in the layer's phase planes,
    xo: Vec<u32>,
    /// and its offset in an output channel's block.
    oo: Vec<u32>,
    /// Tile boundaries into `xo` / `oo`.
    tiles: Vec<usize>,
    /// Floats per output channel.
    row_stride: usize,
    /// Slots (within a channel's block) that are zero: the next layer's padding.
    zeros: Vec<u32>,
}

/// A stack layer's current weight values.
#[derive(Debug, Clone, Copy)]
pub enum ConvStackWeights<'a> {
    /// The values of the pattern the layer's [`ConvStackPlan::new`] was built for.
    Sparse(&'a SparseMatrix),
    /// A dense row-major `[OC][C·KH·KW]` weight (layout from [`ConvStackPlan::dense`]).
    Dense(&'a [f32]),
}

/// One layer of [`conv_stack_pool`]: its laid-out pattern, current weight values and folded
/// BatchNorm (`y = conv·scale + shift`, then ReLU when `relu`).
#[derive(Debug, Clone, Copy)]
pub struct ConvStackLayer<'a> {
    pub conv: &'a ConvStackPlan,
    pub w: ConvStackWeights<'a>,
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub relu: bool,
}

/// Inference of a stack of convolutions (each with its folded BatchNorm and ReLU) and a global
/// average pool: `pooled` `[N][OC_last]` (overwritten) from the batch `x` of `n` images,
/// whose element `(n, c, y, x)` lies at `n·strides[0] + c·strides[1] + y·strides[2] +
/// x·strides[3]` (NCHW, CNHW or the feature-major `[C][H][W][N]` alike). Groups of
/// [`LANES`] images run in parallel, each through the whole stack.
pub fn conv_stack_pool(
    layers: &[ConvStackLayer<'_>],
    x: &[f32],
    n: usize,
    strides: [usize; 4],
    pooled: &mut [f32],
) -> Result<(), SparseError> {
    conv_stack_pool_isa(isa::active(), layers, x, n, strides, pooled)
}

fn conv_stack_pool_isa(
    isa: Isa,
    layers: &[ConvStackLayer<'_>],
    x: &[f32],
    n: usize,
    st: [usize; 4],
    pooled: &mut [f32],
) -> Result<(), SparseError> {
    let err = |m: String| Err(SparseError::new(format!("conv_stack_pool: {m}")));
    let (Some(first), Some(last)) = (layers.first(), layers.last()) else {
        return err("no layers".into());
    };
    for (i, l) in layers.iter().enumerate() {
        let g = l.conv.geom();
        let fits = match l.w {
            ConvStackWeights::Sparse(m) => {
                !l.conv.dense && m.nnz() == l.conv.nnz && m.rows() == g.oc && m.cols() == g.k()
            }
            ConvStackWeights::Dense(d) => l.conv.dense && d.len() == g.oc * g.k(),
        };
        if !fits {
            let (what, nnz) = match l.w {
                ConvStackWeights::Sparse(m) => {
                    (format!("a {}x{} pattern", m.rows(), m.cols()), m.nnz())
                }
                ConvStackWeights::Dense(d) => ("a dense weight".to_string(), d.len()),
            };
            return err(format!(
                "layer {i}: the weight ({what}, {nnz} values) is not what its layout was built \
                 for ({} {}x{}, {} values)",
                if l.conv.dense { "dense" } else { "pattern" },
                g.oc,
                g.k(),
                l.conv.nnz
            ));
        }
        if l.scale.len() != g.oc || l.shift.len() != g.oc {
            return err(format!(
                "layer {i}: scale/shift have {}/{} elements, expected {}",
                l.scale.len(),
                l.shift.len(),
                g.oc
            ));
        }
    }
    let g0 = first.conv.geom();
    if n > 0 {
        let last_elem =
            (n - 1) * st[0] + (g0.c - 1) * st[1] + (g0.h - 1) * st[2] + (g0.w - 1) * st[3];
        if last_elem >= x.len() || (n - 1) * st[0] > i32::MAX as usize {
            return err(format!(
                "the input ({} elements) does not hold {n} images of {}x{}x{} with strides \
                 {st:?}",
                x.len(),
                g0.c,
                g0.h,
                g0.w
            ));
        }
    }
    let classes = last.conv.geom().oc;
    if pooled.len() != n * classes {
        return err(format!(
            "pooled has {} elements, expected N x C = {n} x {classes}",
            pooled.len()
        ));
    }
    let mut maps = Vec::with_capacity(layers.len());
    for w in layers.windows(2) {
        maps.push(w[0].conv.out_phases(w[1].conv)?);
    }
    maps.push(last.conv.out_chwn());
    // Per group: each layer's phase buffer, then the last layer's CHWN output.
    let mut lens: Vec<usize> = layers.iter().map(|l| l.conv.phase_len()).collect();
    lens.push(classes * maps[maps.len() - 1].row_stride);
    let total: usize = lens.iter().sum();
    let (lg, hw) = (
        last.conv.geom(),
        last.conv.geom().oh() * last.conv.geom().ow(),
    );
    let group = |(gi, rows): (usize, &mut [f32])| {
        let mut run = |buf: &mut Vec<f32>| {
            if buf.len() < total {
                buf.resize(total, 0.0);
            }
            let mut parts = Vec::with_capacity(lens.len());
            let mut rest = &mut buf[..total];
            for &len in &lens {
                let (head, tail) = rest.split_at_mut(len);
                parts.push(head);
                rest = tail;
            }
            let n0 = gi * LANES;
            let count = rows.len() / classes;
            first.conv.pack(isa, x, st, n0, count, parts[0]);
            for (i, l) in layers.iter().enumerate() {
                let (ins, outs) = parts.split_at_mut(i + 1);
                l.conv.forward(isa, l, &maps[i], ins[i], outs[0]);
            }
            let out = &parts[layers.len()];
            let hwf = hw as f32;
            for c in 0..lg.oc {
                let mut sum = [0f32; LANES];
                for p in out[c * hw * LANES..][..hw * LANES].chunks_exact(LANES) {
                    for (s, v) in sum.iter_mut().zip(p) {
                        *s += v;
                    }
                }
                for (l, s) in sum.iter().take(count).enumerate() {
                    rows[l * classes + c] = s / hwf;
                }
            }
        };
        STACK_BUF.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => run(&mut buf),
            Err(_) => run(&mut Vec::new()),
        })
    };
    let chunk = LANES * classes;
    if n.div_ceil(LANES) <= 1 {
        pooled.chunks_mut(chunk.max(1)).enumerate().for_each(group);
    } else {
        pooled.par_chunks_mut(chunk).enumerate().for_each(group);
    }
    Ok(())
}

thread_local! {
    /// Per-thread buffers of one group's activations (reused across calls).
    static STACK_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `slot[l] = x[at + l·stride]` for `l < count`, zero after.
fn gather_lanes(isa: Isa, x: &[f32], at: usize, stride: usize, count: usize, slot: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: AVX-512 is available (`isa`); lanes l < count read x[at + l·stride], in
        // bounds (the caller checked the last image's last element); l·stride < 2^31.
        unsafe { avx512::gather_lanes(x.as_ptr().add(at), stride, count, slot) };
        return;
    }
    let _ = isa;
    for (l, v) in slot.iter_mut().enumerate() {
        *v = if l < count { x[at + l * stride] } else { 0.0 };
    }
}

/// One output row (channel) for one tile of positions.
struct RowTile<'a> {
    /// The row's active weights: offsets into the phase buffer, and values.
    off: &'a [u32],
    vals: &'a [f32],
    /// The tile's positions: offsets into the phase buffer and into the output block.
    xo: &'a [u32],
    oo: &'a [u32],
    scale: f32,
    shift: f32,
    relu: bool,
}

fn row_tile(isa: Isa, r: &RowTile<'_>, xph: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: AVX-512 is available; every offset + position + LANES lies in `xph` and
        // every output offset + LANES in `out` (the layouts are built so; `forward` callers
        // size the buffers from them).
        unsafe {
            match r.xo.len() {
                8 => avx512::row_tile::<8>(r, xph.as_ptr(), out.as_mut_ptr()),
                7 => avx512::row_tile::<7>(r, xph.as_ptr(), out.as_mut_ptr()),
                6 => avx512::row_tile::<6>(r, xph.as_ptr(), out.as_mut_ptr()),
                5 => avx512::row_tile::<5>(r, xph.as_ptr(), out.as_mut_ptr()),
                4 => avx512::row_tile::<4>(r, xph.as_ptr(), out.as_mut_ptr()),
                3 => avx512::row_tile::<3>(r, xph.as_ptr(), out.as_mut_ptr()),
                2 => avx512::row_tile::<2>(r, xph.as_ptr(), out.as_mut_ptr()),
                1 => avx512::row_tile::<1>(r, xph.as_ptr(), out.as_mut_ptr()),
                _ => {}
            }
        }
        return;
    }
    let _ = isa;
    for (&xo, &oo) in r.xo.iter().zip(r.oo) {
        let mut acc = [0f32; LANES];
        for (&k, &v) in r.off.iter().zip(r.vals) {
            let xr = &xph[k as usize + xo as usize..][..LANES];
            for (a, &xv) in acc.iter_mut().zip(xr) {
                *a = v.mul_add(xv, *a);
            }
        }
        for (d, a) in out[oo as usize..][..LANES].iter_mut().zip(acc) {
            let y = a * r.scale + r.shift;
            *d = if r.relu { y.max(0.0) } else { y };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{RowTile, LANES};
    use std::arch::x86_64::*;

    /// `T` output positions of one row: per active weight one broadcast and `T` FMAs.
    ///
    /// # Safety
    /// AVX-512F available; `x + off + xo + 16` readable and `out + oo + 16` writable for
    /// every offset and position of `r`; `r.xo.len() == T`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_tile<const T: usize>(r: &RowTile<'_>, x: *const f32, out: *mut f32) {
        let mut xo = [0usize; T];
        for (d, &s) in xo.iter_mut().zip(r.xo) {
            *d = s as usize;
        }
        let mut acc = [_mm512_setzero_ps(); T];
        for (&k, &v) in r.off.iter().zip(r.vals) {
            let vv = _mm512_set1_ps(v);
            let xr = x.add(k as usize);
            for q in 0..T {
                acc[q] = _mm512_fmadd_ps(vv, _mm512_loadu_ps(xr.add(xo[q])), acc[q]);
            }
        }
        // `a·scale + shift` rounded twice, as the CNHW kernels' separate affine pass.
        let (s, b, z) = (
            _mm512_set1_ps(r.scale),
            _mm512_set1_ps(r.shift),
            _mm512_setzero_ps(),
        );
        for (a, &o) in acc.iter().zip(r.oo) {
            let mut y = _mm512_add_ps(_mm512_mul_ps(*a, s), b);
            if r.relu {
                y = _mm512_max_ps(y, z);
            }
            _mm512_storeu_ps(out.add(o as usize), y);
        }
    }

    /// `R` output channels x `T` positions of a fully dense layer.
    pub(super) struct DenseTile<'a> {
        /// The `R` rows' weights, row-major `[R][k]`.
        pub vals: &'a [f32],
        pub k: usize,
        /// Column offsets into the phase buffer (the same for every row).
        pub off: &'a [u32],
        pub xo: &'a [u32],
        pub oo: &'a [u32],
        pub scale: &'a [f32],
        pub shift: &'a [f32],
        pub relu: bool,
        /// Floats between consecutive output channels' blocks.
        pub row_stride: usize,
    }

    /// One register tile of a dense layer: per column, `T` vector loads and `R` broadcasts
    /// feed `R·T` FMAs; then the affine and ReLU, stored at row `r`'s block + `oo[t]`.
    ///
    /// # Safety
    /// AVX-512F available; `d.vals` holds `R·k` values; `x + off + xo + 16` readable and
    /// `out + r·row_stride + oo + 16` writable for every column, position and row.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dense_tile<const R: usize, const T: usize>(
        d: &DenseTile<'_>,
        x: *const f32,
        out: *mut f32,
    ) {
        let mut xo = [0usize; T];
        for (dst, &s) in xo.iter_mut().zip(d.xo) {
            *dst = s as usize;
        }
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let w = d.vals.as_ptr();
        for (j, &k) in d.off.iter().enumerate() {
            let xr = x.add(k as usize);
            let mut wv = [_mm512_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = _mm512_set1_ps(*w.add(r * d.k + j));
            }
            for t in 0..T {
                let xv = _mm512_loadu_ps(xr.add(xo[t]));
                for r in 0..R {
                    acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
        let z = _mm512_setzero_ps();
        for (r, row) in acc.iter().enumerate() {
            let (s, b) = (_mm512_set1_ps(d.scale[r]), _mm512_set1_ps(d.shift[r]));
            for (a, &o) in row.iter().zip(d.oo) {
                let mut y = _mm512_add_ps(_mm512_mul_ps(*a, s), b);
                if d.relu {
                    y = _mm512_max_ps(y, z);
                }
                _mm512_storeu_ps(out.add(r * d.row_stride + o as usize), y);
            }
        }
    }

    /// `slot[l] = x[l·stride]` for `l < count`, zero after (one masked gather, or a masked
    /// load when the images are adjacent).
    ///
    /// # Safety
    /// AVX-512F available; `x[l·stride]` readable for `l < count`; `stride·15 < 2^31`;
    /// `slot` has `LANES` elements.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather_lanes(
        x: *const f32,
        stride: usize,
        count: usize,
        slot: &mut [f32],
    ) {
        debug_assert_eq!(slot.len(), LANES);
        let mask: __mmask16 = if count >= LANES {
            0xFFFF
        } else {
            ((1u32 << count) - 1) as __mmask16
        };
        let v = if stride == 1 {
            _mm512_maskz_loadu_ps(mask, x)
        } else {
            let s = stride as i32;
            let idx = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(s),
            );
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, x)
        };
        _mm512_storeu_ps(slot.as_mut_ptr(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::SparseConv;

    fn vals(seed: u32, n: usize) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn geom(
        c: usize,
        n: usize,
        hw: (usize, usize),
        oc: usize,
        k: usize,
        s: usize,
        pad: usize,
    ) -> Conv2dGeom {
        Conv2dGeom {
            c,
            n,
            h: hw.0,
            w: hw.1,
            oc,
            kh: k,
            kw: k,
            stride: s,
            pad,
        }
    }

    /// The stack against the CNHW kernels layer by layer (pack, `forward_affine`, global
    /// average pool): bit for bit, for batches that are and are not multiples of 16, with
    /// NCHW and feature-major inputs, every instruction set.
    #[test]
    fn stack_matches_the_cnhw_kernels() {
        // (layers as (oc, k, stride, pad, density)), input (c, h, w), batch
        type Case = (
            Vec<(usize, usize, usize, usize, f32)>,
            (usize, usize, usize),
            usize,
        );
        let cases: Vec<Case> = vec![
            (
                vec![(8, 4, 2, 1, 1.0), (12, 4, 2, 1, 0.2), (16, 4, 2, 1, 0.1)],
                (3, 28, 28),
                37,
            ),
            (
                vec![(6, 3, 1, 1, 0.5), (5, 1, 2, 0, 1.0), (7, 3, 2, 0, 0.3)],
                (2, 11, 9),
                16,
            ),
            (vec![(4, 7, 3, 3, 0.4)], (3, 10, 13), 5),
        ];
        for (ci, (layers, (c, h, w), n)) in cases.into_iter().enumerate() {
            let first_case = ci == 0;
            let mut geoms = Vec::new();
            let (mut ch, mut hh, mut ww) = (c, h, w);
            for &(oc, k, s, pad, _) in &layers {
                let g = geom(ch, n, (hh, ww), oc, k, s, pad);
                (ch, hh, ww) = (oc, g.oh(), g.ow());
                geoms.push(g);
            }
            let mats: Vec<SparseMatrix> = geoms
                .iter()
                .zip(&layers)
                .enumerate()
                .map(|(i, (g, l))| {
                    let w = vals(10 + i as u32, g.w_len());
                    let m: Vec<bool> = vals(20 + i as u32, g.w_len())
                        .iter()
                        .map(|&u| (u + 1.0) / 2.0 < l.4)
                        .collect();
                    SparseMatrix::from_dense_masked(&w, &m, g.oc, g.k()).unwrap()
                })
                .collect();
            let affines: Vec<(Vec<f32>, Vec<f32>)> = geoms
                .iter()
                .enumerate()
                .map(|(i, g)| (vals(30 + i as u32, g.oc), vals(40 + i as u32, g.oc)))
                .collect();
            let x = vals(7, n * c * h * w);
            // Reference: CNHW input, SparseConv layer by layer, then the pool.
            let mut cur: Vec<f32> = vec![0.0; x.len()];
            for ni in 0..n {
                for ci in 0..c {
                    let src = &x[(ni * c + ci) * h * w..][..h * w];
                    cur[(ci * n + ni) * h * w..][..h * w].copy_from_slice(src);
                }
            }
            for ((g, m), (sc, sh)) in geoms.iter().zip(&mats).zip(&affines) {
                let conv = SparseConv::new(m, g).unwrap();
                let mut xph = vec![0.0; conv.phase_len()];
                conv.pack_input(&cur, &mut xph).unwrap();
                let mut out = vec![0.0; g.out_len()];
                conv.forward_affine(m, &xph, &mut out, Some((sc, sh, true)))
                    .unwrap();
                cur = out;
            }
            let oc = geoms.last().unwrap().oc;
            let mut want = vec![0.0; n * oc];
            crate::global_avg_pool_fwd(&cur, oc, n, &mut want);
            // Fully dense layers run from their dense weight (`ConvStackPlan::dense`), except the
            // first layer of the first case, which runs its full pattern.
            let dense_w: Vec<Vec<f32>> = mats.iter().map(|m| m.to_dense()).collect();
            let as_dense = |i: usize| layers[i].4 == 1.0 && !(first_case && i == 0);
            let convs: Vec<ConvStackPlan> = geoms
                .iter()
                .zip(&mats)
                .enumerate()
                .map(|(i, (g, m))| match as_dense(i) {
                    true => ConvStackPlan::dense(g).unwrap(),
                    false => ConvStackPlan::new(m, g).unwrap(),
                })
                .collect();
            let stack: Vec<ConvStackLayer> = convs
                .iter()
                .zip(&mats)
                .zip(&affines)
                .enumerate()
                .map(|(i, ((conv, w), (scale, shift)))| ConvStackLayer {
                    conv,
                    w: match as_dense(i) {
                        true => ConvStackWeights::Dense(&dense_w[i]),
                        false => ConvStackWeights::Sparse(w),
                    },
                    scale,
                    shift,
                    relu: true,
                })
                .collect();
            // Feature-major copy of the input: [C][H][W][N].
            let mut fm = vec![0.0; x.len()];
            for ni in 0..n {
                for e in 0..c * h * w {
                    fm[e * n + ni] = x[ni * c * h * w + e];
                }
            }
            let nchw = [c * h * w, h * w, w, 1];
            let chwn = [1, h * w * n, w * n, n];
            for isa in Isa::available() {
                for (input, st) in [(&x, nchw), (&fm, chwn)] {
                    let mut got = vec![f32::NAN; n * oc];
                    conv_stack_pool_isa(isa, &stack, input, n, st, &mut got).unwrap();
                    let hw = geoms.last().map(|g| g.oh() * g.ow()).unwrap_or(0);
                    if hw < 16 && isa == Isa::Avx512 {
                        assert_eq!(got, want, "{isa:?} {st:?}");
                    } else {
                        for (a, b) in got.iter().zip(&want) {
                            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{isa:?} {a} {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn group_len_counts_every_buffer() {
        // REST's CNN at 28 px: conv1's 12 planes of 15x15, conv2's 256 of 8x8, conv3's 512 of
        // 4x4, the 256 x 3x3 output; 16 lanes each.
        let gs = [
            geom(3, 1, (28, 28), 64, 4, 2, 1),
            geom(64, 1, (14, 14), 128, 4, 2, 1),
            geom(128, 1, (7, 7), 256, 4, 2, 1),
        ];
        let want = (12 * 225 + 256 * 64 + 512 * 16 + 256 * 9) * LANES;
        assert_eq!(conv_stack_group_len(&gs), want);
        let m = |g: &Conv2dGeom| {
            SparseMatrix::from_dense_masked(
                &vec![1.0; g.w_len()],
                &vec![true; g.w_len()],
                g.oc,
                g.k(),
            )
            .unwrap()
        };
        let phases: usize = gs
            .iter()
            .map(|g| ConvStackPlan::new(&m(g), g).unwrap().phase_len())
            .sum();
        assert_eq!(phases + 256 * 9 * LANES, want);
    }

    #[test]
    fn mismatched_stacks_are_errors() {
        let g1 = geom(3, 4, (8, 8), 4, 3, 1, 1);
        let g2 = geom(5, 4, (8, 8), 2, 3, 1, 1);
        let w1 = SparseMatrix::from_dense_masked(
            &vals(1, g1.w_len()),
            &vec![true; g1.w_len()],
            4,
            g1.k(),
        )
        .unwrap();
        let w2 = SparseMatrix::from_dense_masked(
            &vals(2, g2.w_len()),
            &vec![true; g2.w_len()],
            2,
            g2.k(),
        )
        .unwrap();
        let (c1, c2) = (
            ConvStackPlan::new(&w1, &g1).unwrap(),
            ConvStackPlan::new(&w2, &g2).unwrap(),
        );
        let ones = [1.0f32; 8];
        let l1 = ConvStackLayer {
            conv: &c1,
            w: ConvStackWeights::Sparse(&w1),
            scale: &ones[..4],
            shift: &ones[..4],
            relu: true,
        };
        let l2 = ConvStackLayer {
            conv: &c2,
            w: ConvStackWeights::Sparse(&w2),
            scale: &ones[..2],
            shift: &ones[..2],
            relu: true,
        };
        let x = vals(3, g1.x_len());
        let mut pooled = vec![0.0; 4 * 2];
        let e = conv_stack_pool(&[l1, l2], &x, 4, [192, 64, 8, 1], &mut pooled).unwrap_err();
        assert!(e.message().contains("takes 5 channels"), "{}", e.message());
        let mut pooled = vec![0.0; 4 * 4];
        let e = conv_stack_pool(&[l1], &x[1..], 4, [192, 64, 8, 1], &mut pooled).unwrap_err();
        assert!(e.message().contains("does not hold"), "{}", e.message());
        let e = conv_stack_pool(&[l1], &x, 4, [192, 64, 8, 1], &mut pooled[1..]).unwrap_err();
        assert!(e.message().contains("pooled"), "{}", e.message());
        let e = conv_stack_pool(&[l1], &x, 4, [192, 64, 8, 1], &mut pooled);
        assert!(e.is_ok());
        let wrong = ConvStackLayer {
            w: ConvStackWeights::Sparse(&w2),
            ..l1
        };
        let e = conv_stack_pool(&[wrong], &x, 4, [192, 64, 8, 1], &mut pooled).unwrap_err();
        assert!(
            e.message().contains("not what its layout"),
            "{}",
            e.message()
        );
        let short = [0.0f32; 5];
        let wrong = ConvStackLayer {
            w: ConvStackWeights::Dense(&short),
            ..l1
        };
        let e = conv_stack_pool(&[wrong], &x, 4, [192, 64, 8, 1], &mut pooled).unwrap_err();
        assert!(
            e.message().contains("not what its layout"),
            "{}",
            e.message()
        );
    }
}
