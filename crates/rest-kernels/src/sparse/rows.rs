//! Sparse linear-layer products on batch-major activations (`x[N][I]`, `y[N][O]`), with no
//! transposes of the whole batch: samples are taken [`LANES`] at a time, and each block runs
//! as a feature-major product on a small `[feature][LANES]` tile that stays in L1.
//!
//! For a block, every *input feature* `k` with active weights is gathered once (one value per
//! sample of the block, one AVX-512 gather) and then scattered, one `LANES`-wide multiply-add
//! per active weight of that input, into the `[O][LANES]` output tile; the tile is written out
//! (with the bias and an optional ReLU) in the batch-major layout. A gathered input value is
//! reused by every active weight of its feature, and the multiply-adds are full SIMD vectors
//! whatever the density. The same kernel computes the input gradient (`dy W`: the pattern's
//! rows play the inputs).
//!
//! The gathered inputs can be kept ([`spmm_rows_fused`]'s `pack`, laid out as
//! `[block][active input][LANES]`): the weight gradient at the active weights
//! ([`sddmm_packed`]) then reads them sequentially instead of gathering the (L2-sized) input
//! again, with `LANES` partial sums per weight held in a register.
//!
//! Every output element is a sum in a fixed order (over inputs; for the weight gradient over
//! the samples `s ≡ l (mod LANES)` per lane `l`, then a fixed tree over the lanes), independent
//! of the number of threads, the task split and the instruction set: results are
//! bit-reproducible.

use rayon::prelude::*;

use super::kernels::SERIAL_FLOPS;
use super::{check_len, SparseError, SparseMatrix};
use crate::isa::{self, Isa};

/// Samples per block: one AVX-512 vector (two AVX2 vectors) of `f32`.
pub const LANES: usize = 16;

/// One tile row: a value per sample of a block.
type Lane = [f32; LANES];

/// Gather flavours, a const parameter of the kernels (resolved at compile time).
const G_PORTABLE: u8 = 0;
const G_AVX2: u8 = 1;
const G_AVX512: u8 = 2;

/// A pattern seen from the side of the products' input: `ptr` has `inputs + 1` offsets, and
/// input feature `k` feeds the outputs `out[ptr[k]..ptr[k + 1]]` with weights `val[..]`.
#[derive(Clone, Copy)]
struct Fanout<'a> {
    ptr: &'a [usize],
    out: &'a [u32],
    val: &'a [f32],
}

impl Fanout<'_> {
    /// Inputs with at least one active weight.
    fn active(&self) -> usize {
        self.ptr.windows(2).filter(|w| w[0] != w[1]).count()
    }
}

/// What happens to an output value on its way out of the tile.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    relu: bool,
}

/// `x[s·xi + k]` for the `nb` samples `s` of a block (`x` holds exactly those rows), zero in
/// the lanes past `nb`.
///
/// # Safety
/// `k < xi`, `x.len() == nb * xi`, `nb <= LANES`, `15 · xi` fits an `i32`; `G` is an
/// instruction set available on this CPU and enabled in the caller.
#[inline(always)]
unsafe fn gather<const G: u8>(x: &[f32], xi: usize, nb: usize, k: usize) -> Lane {
    let mut out = [0.0f32; LANES];
    #[cfg(target_arch = "x86_64")]
    if G == G_AVX512 {
        use std::arch::x86_64::*;
        let idx: [i32; LANES] = std::array::from_fn(|s| (s * xi) as i32);
        let vi = _mm512_loadu_si512(idx.as_ptr().cast());
        let p = x.as_ptr().add(k);
        let v = if nb == LANES {
            _mm512_i32gather_ps::<4>(vi, p.cast())
        } else {
            let m = ((1u32 << nb) - 1) as __mmask16;
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, vi, p.cast())
        };
        _mm512_storeu_ps(out.as_mut_ptr(), v);
        return out;
    }
    let _ = G;
    for (s, v) in out.iter_mut().enumerate().take(nb) {
        *v = *x.get_unchecked(s * xi + k);
    }
    out
}

/// `y[s][r] = Σ_k fan(k → r) · x[s][k]` for the samples of one block (`nb <= LANES` rows of
/// `x`, `xi` features each; `y` has `nb` rows of `yo = acc.len()` features), and, when
/// `pack` is not empty, the gathered inputs stored there (`[active input][LANES]`).
///
/// # Safety
/// As [`gather`]; the entries of `fan` index inside `acc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scatter_block<const G: u8>(
    fan: Fanout<'_>,
    x: &[f32],
    xi: usize,
    nb: usize,
    acc: &mut [Lane],
    ep: Epilogue<'_>,
    y: &mut [f32],
    pack: &mut [Lane],
) {
    let yo = acc.len();
    debug_assert!(nb <= LANES && x.len() == nb * xi && y.len() == nb * yo);
    acc.fill([0.0; LANES]);
    let keep = !pack.is_empty();
    let mut j = 0;
    for k in 0..xi {
        let (lo, hi) = (fan.ptr[k], fan.ptr[k + 1]);
        if lo == hi {
            continue;
        }
        let xk = gather::<G>(x, xi, nb, k);
        if keep {
            pack[j] = xk;
        }
        j += 1;
        for (&r, &w) in fan.out[lo..hi].iter().zip(&fan.val[lo..hi]) {
            let a = acc.get_unchecked_mut(r as usize);
            for l in 0..LANES {
                a[l] += w * xk[l];
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if G == G_AVX512 {
        write_out_avx512(acc, nb, ep, y);
        return;
    }
    for (s, yr) in y.chunks_exact_mut(yo).enumerate() {
        for (r, (v, a)) in yr.iter_mut().zip(acc.iter()).enumerate() {
            let mut t = a[s];
            if let Some(b) = ep.bias {
                t += b[r];
            }
            if ep.relu {
                t = t.max(0.0);
            }
            *v = t;
        }
    }
}

/// `out[c][i] = p[i · stride + c]` for `i < rows`, `c < cols` (both at most 16), zero
/// elsewhere: a 16 x 16 transpose in registers (pairs of rows interleaved within 128-bit
/// lanes, then pairs of pairs as 64-bit elements, then 128-bit lanes regrouped).
///
/// # Safety
/// AVX-512F is available and enabled in the caller; `p[i · stride + c]` is readable for
/// those `i`, `c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose16(
    p: *const f32,
    stride: usize,
    rows: usize,
    cols: usize,
) -> [std::arch::x86_64::__m512; LANES] {
    use std::arch::x86_64::*;
    let m = lane_mask(cols);
    // Plain loops (no `array::from_fn`): closures do not inherit target features, and
    // intrinsics inside them become calls.
    let mut r = [_mm512_setzero_ps(); LANES];
    for (i, v) in r.iter_mut().enumerate().take(rows) {
        *v = _mm512_maskz_loadu_ps(m, p.add(i * stride));
    }
    let mut t = [_mm512_setzero_ps(); LANES];
    for i in 0..LANES / 2 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + j] holds, in 128-bit lane q, element 4q + j of rows 4g..4g + 4.
    let mut u = [_mm512_setzero_ps(); LANES];
    for g in 0..LANES / 4 {
        for h in 0..2 {
            let a = _mm512_castps_pd(t[4 * g + h]);
            let b = _mm512_castps_pd(t[4 * g + 2 + h]);
            u[4 * g + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            u[4 * g + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    let mut out = [_mm512_setzero_ps(); LANES];
    for j in 0..4 {
        let x0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[j], u[4 + j]);
        let x1 = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[j], u[4 + j]);
        let y0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[8 + j], u[12 + j]);
        let y1 = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_f32x4::<0b10_00_10_00>(x0, y0);
        out[4 + j] = _mm512_shuffle_f32x4::<0b11_01_11_01>(x0, y0);
        out[8 + j] = _mm512_shuffle_f32x4::<0b10_00_10_00>(x1, y1);
        out[12 + j] = _mm512_shuffle_f32x4::<0b11_01_11_01>(x1, y1);
    }
    out
}

/// The first `n` (at most 16) lanes of a vector.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lane_mask(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= LANES {
        !0
    } else {
        ((1u32 << n) - 1) as std::arch::x86_64::__mmask16
    }
}

/// `dy` (`[N][O]`) as `[block][O][LANES]` lanes (`dyt`, zero-filled by the caller, stays
/// zero past the last sample); 16 x 16 at a time with AVX-512.
fn lanes_of_rows(dy: &[f32], n: usize, o: usize, dyt: &mut [Lane]) {
    debug_assert!(dy.len() == n * o && dyt.len() == n.div_ceil(LANES) * o);
    #[cfg(target_arch = "x86_64")]
    if isa::active() == Isa::Avx512 {
        // SAFETY: AVX-512F is available; the lengths are as asserted.
        unsafe { lanes_of_rows_avx512(dy, n, o, dyt) };
        return;
    }
    for (b, db) in dyt.chunks_mut(o).enumerate() {
        let nb = (n - b * LANES).min(LANES);
        for (s, row) in dy[b * LANES * o..][..nb * o].chunks_exact(o).enumerate() {
            for (d, &v) in db.iter_mut().zip(row) {
                d[s] = v;
            }
        }
    }
}

/// [`lanes_of_rows`] with AVX-512.
///
/// # Safety
/// AVX-512F is available; `dy.len() == n * o`, `dyt.len() == n.div_ceil(LANES) * o`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lanes_of_rows_avx512(dy: &[f32], n: usize, o: usize, dyt: &mut [Lane]) {
    use std::arch::x86_64::*;
    for (b, db) in dyt.chunks_exact_mut(o).enumerate() {
        let nb = (n - b * LANES).min(LANES);
        let base = dy.as_ptr().add(b * LANES * o);
        for r0 in (0..o).step_by(LANES) {
            let w = LANES.min(o - r0);
            let t = transpose16(base.add(r0), o, nb, w);
            for (d, v) in db[r0..r0 + w].iter_mut().zip(t) {
                _mm512_storeu_ps(d.as_mut_ptr(), v);
            }
        }
    }
}

/// The epilogue of [`scatter_block`] with AVX-512: the `[O][LANES]` tile transposed 16
/// outputs at a time into the `nb` sample rows of `y`, bias added and ReLU applied on whole
/// vectors (the same operations in the same order as the scalar loop).
///
/// # Safety
/// AVX-512F is available; `y.len() == nb * acc.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn write_out_avx512(acc: &[Lane], nb: usize, ep: Epilogue<'_>, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let yo = acc.len();
    debug_assert_eq!(y.len(), nb * yo);
    for r0 in (0..yo).step_by(LANES) {
        let w = LANES.min(yo - r0);
        let m = lane_mask(w);
        let t = transpose16(acc[r0..].as_ptr().cast(), LANES, w, LANES);
        let bias = ep
            .bias
            .map(|b| _mm512_maskz_loadu_ps(m, b.as_ptr().add(r0)));
        for (s, &v) in t.iter().enumerate().take(nb) {
            let mut v = v;
            if let Some(b) = bias {
                v = _mm512_add_ps(v, b);
            }
            if ep.relu {
                // `max(v, 0)` returns 0 for a NaN `v`, as `f32::max` does.
                v = _mm512_max_ps(v, _mm512_setzero_ps());
            }
            _mm512_mask_storeu_ps(y.as_mut_ptr().add(s * yo + r0), m, v);
        }
    }
}

/// [`scatter_block`] over consecutive blocks: `x` holds `y.len() / yo` samples.
///
/// # Safety
/// As [`scatter_block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scatter_blocks<const G: u8>(
    fan: Fanout<'_>,
    x: &[f32],
    xi: usize,
    yo: usize,
    active: usize,
    ep: Epilogue<'_>,
    y: &mut [f32],
    pack: &mut [Lane],
) {
    let mut acc = vec![[0.0f32; LANES]; yo];
    for (b, yb) in y.chunks_mut(LANES * yo).enumerate() {
        let nb = yb.len() / yo;
        let xb = &x[b * LANES * xi..][..nb * xi];
        let pb = if pack.is_empty() {
            &mut []
        } else {
            &mut pack[b * active..(b + 1) * active]
        };
        scatter_block::<G>(fan, xb, xi, nb, &mut acc, ep, yb, pb);
    }
}

/// [`scatter_blocks`] compiled for `isa`.
///
/// # Safety
/// As [`scatter_block`], with `isa` available.
#[allow(clippy::too_many_arguments)]
unsafe fn dispatch_blocks(
    isa: Isa,
    fan: Fanout<'_>,
    x: &[f32],
    xi: usize,
    yo: usize,
    active: usize,
    ep: Epilogue<'_>,
    y: &mut [f32],
    pack: &mut [Lane],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx512(
            f: Fanout<'_>,
            x: &[f32],
            xi: usize,
            yo: usize,
            act: usize,
            e: Epilogue<'_>,
            y: &mut [f32],
            p: &mut [Lane],
        ) {
            scatter_blocks::<G_AVX512>(f, x, xi, yo, act, e, y, p)
        }
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            f: Fanout<'_>,
            x: &[f32],
            xi: usize,
            yo: usize,
            act: usize,
            e: Epilogue<'_>,
            y: &mut [f32],
            p: &mut [Lane],
        ) {
            scatter_blocks::<G_AVX2>(f, x, xi, yo, act, e, y, p)
        }
        match isa {
            Isa::Avx512 => return avx512(fan, x, xi, yo, active, ep, y, pack),
            Isa::Avx2Fma => return avx2(fan, x, xi, yo, active, ep, y, pack),
            Isa::Portable => {}
        }
    }
    let _ = isa;
    scatter_blocks::<G_PORTABLE>(fan, x, xi, yo, active, ep, y, pack)
}

/// Work (in the units of [`parallel`]'s callers) below which these kernels stay on one
/// thread. They stream their input once and are bound by memory bandwidth, which a second
/// core on the same machine barely adds to, while the hand-over costs a wake-up and a wait:
/// the MLP's first layer at batch 256 (1.5 M at density 0.01, 6 M at 0.05) trained faster
/// serial at 2 threads.
const PARALLEL_WORK: usize = 64 * SERIAL_FLOPS;

/// Whether work of about `work` operations is worth handing to rayon: with one thread, or
/// little work, the hand-over to the pool costs more than it saves.
fn parallel(work: usize) -> bool {
    work >= PARALLEL_WORK && rayon::current_num_threads() > 1
}

/// The instruction set for inputs of `xi` features (the AVX-512 gather takes 32-bit offsets).
fn isa_for(xi: usize) -> Isa {
    match isa::active() {
        Isa::Avx512 if (LANES * xi) > i32::MAX as usize => Isa::Avx2Fma,
        isa => isa,
    }
}

/// Runs [`scatter_block`] over the blocks of `x` (`[n][xi]`) into `y` (`[n][yo]`), in
/// parallel over groups of blocks when the work is large enough; fills `pack` when it is not
/// empty (`blocks · active` lanes).
#[allow(clippy::too_many_arguments)]
fn scatter_rows(
    fan: Fanout<'_>,
    x: &[f32],
    xi: usize,
    n: usize,
    yo: usize,
    ep: Epilogue<'_>,
    y: &mut [f32],
    pack: &mut [Lane],
) {
    let blocks = n.div_ceil(LANES);
    let active = fan.active();
    let per_task = if parallel(n * (active + 2 * fan.val.len() + yo)) {
        blocks.div_ceil(2 * rayon::current_num_threads()).max(1)
    } else {
        blocks
    };
    let isa = isa_for(xi);
    let run = |t: usize, yt: &mut [f32], pt: &mut [Lane]| {
        let xt = &x[t * per_task * LANES * xi..][..yt.len() / yo * xi];
        // SAFETY: `isa` is available (`isa::active`), its offsets fit (`isa_for`); the pattern
        // indexes inside `[xi]` x `[yo]` (checked by the callers' shapes); `xt` holds the
        // samples of `yt`.
        unsafe { dispatch_blocks(isa, fan, xt, xi, yo, active, ep, yt, pt) };
    };
    if per_task >= blocks {
        run(0, y, pack);
    } else if pack.is_empty() {
        y.par_chunks_mut(per_task * LANES * yo)
            .enumerate()
            .for_each(|(t, yt)| run(t, yt, &mut []));
    } else {
        y.par_chunks_mut(per_task * LANES * yo)
            .zip(pack.par_chunks_mut(per_task * active))
            .enumerate()
            .for_each(|(t, (yt, pt))| run(t, yt, pt));
    }
}

/// `y[n][o] = Σ_k W[o, k] · x[n][k]` (`x` is `[N][I]`, `y` is `[N][O]`, overwritten).
pub fn spmm_rows(w: &SparseMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), SparseError> {
    spmm_rows_fused(w, x, n, None, false, y, &mut [])
}

/// Length of the `pack` buffer of [`spmm_rows_fused`] (and [`sddmm_packed`]) for `n` samples:
/// `⌈n / LANES⌉ · (inputs with active weights) · LANES`.
pub fn packed_len(w: &SparseMatrix, n: usize) -> usize {
    n.div_ceil(LANES) * fanout_t(w).active() * LANES
}

fn fanout_t(w: &SparseMatrix) -> Fanout<'_> {
    let t = w.csr_t();
    Fanout {
        ptr: t.row_ptr,
        out: t.col_idx,
        val: t.values,
    }
}

/// [`spmm_rows`] with the bias `b` (`O` entries) added to every output row and, with
/// `relu`, `max(·, 0)` applied, in the same pass: `y = relu(x Wᵀ + b)`. The bias is added
/// to the finished sum (one rounding, as a separate broadcast add would).
///
/// `pack` is empty, or [`packed_len`] long: it then receives the inputs at the active input
/// features, for [`sddmm_packed`].
pub fn spmm_rows_fused(
    w: &SparseMatrix,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
    pack: &mut [f32],
) -> Result<(), SparseError> {
    let (o, i) = (w.rows(), w.cols());
    check_len("spmm_rows", "x", "[N][I] with I = W.cols()", x.len(), n, i)?;
    check_len("spmm_rows", "y", "[N][O] with O = W.rows()", y.len(), n, o)?;
    if let Some(b) = bias {
        if b.len() != o {
            return Err(SparseError::new(format!(
                "sparse spmm_rows: bias has {} elements, expected O = W.rows() = {o}",
                b.len()
            )));
        }
    }
    let pack = lanes_mut(pack, w, n, "spmm_rows")?;
    if o == 0 || n == 0 {
        return Ok(());
    }
    scatter_rows(fanout_t(w), x, i, n, o, Epilogue { bias, relu }, y, pack);
    Ok(())
}

/// `pack` as lanes, checking that it is empty or [`packed_len`] long.
fn lanes_mut<'a>(
    pack: &'a mut [f32],
    w: &SparseMatrix,
    n: usize,
    op: &str,
) -> Result<&'a mut [Lane], SparseError> {
    if pack.is_empty() {
        return Ok(&mut []);
    }
    let want = packed_len(w, n);
    if pack.len() != want {
        return Err(SparseError::new(format!(
            "sparse {op}: pack has {} elements, expected packed_len = {want}",
            pack.len()
        )));
    }
    let (lanes, rest) = pack.as_chunks_mut::<LANES>();
    debug_assert!(rest.is_empty());
    Ok(lanes)
}

/// `dx[n][k] = Σ_o W[o, k] · dy[n][o]` (`dy` is `[N][O]`, `dx` is `[N][I]`, overwritten).
pub fn spmm_t_rows(
    w: &SparseMatrix,
    dy: &[f32],
    n: usize,
    dx: &mut [f32],
) -> Result<(), SparseError> {
    let (o, i) = (w.rows(), w.cols());
    check_len(
        "spmm_t_rows",
        "dy",
        "[N][O] with O = W.rows()",
        dy.len(),
        n,
        o,
    )?;
    check_len(
        "spmm_t_rows",
        "dx",
        "[N][I] with I = W.cols()",
        dx.len(),
        n,
        i,
    )?;
    if i == 0 || n == 0 {
        return Ok(());
    }
    let fan = Fanout {
        ptr: w.row_ptr(),
        out: w.col_idx(),
        val: w.values(),
    };
    let ep = Epilogue {
        bias: None,
        relu: false,
    };
    scatter_rows(fan, dy, o, n, i, ep, dx, &mut []);
    Ok(())
}

/// The weight gradient at the active weights: `grad[e] = Σ_n dy[n][o_e] · x[n][k_e]` for
/// every stored entry `e = (o_e, k_e)`, aligned with `w.values()` (overwritten).
pub fn sddmm_rows(
    w: &SparseMatrix,
    dy: &[f32],
    x: &[f32],
    n: usize,
    grad: &mut [f32],
) -> Result<(), SparseError> {
    check_len(
        "sddmm_rows",
        "x",
        "[N][I] with I = W.cols()",
        x.len(),
        n,
        w.cols(),
    )?;
    let mut pack = vec![0.0f32; packed_len(w, n)];
    pack_rows(w, x, n, &mut pack)?;
    sddmm_packed(w, dy, &pack, n, grad)
}

/// Fills `pack` ([`packed_len`] long) with the inputs `x` (`[N][I]`) at the active input
/// features, as [`spmm_rows_fused`] does on the way.
pub fn pack_rows(
    w: &SparseMatrix,
    x: &[f32],
    n: usize,
    pack: &mut [f32],
) -> Result<(), SparseError> {
    let i = w.cols();
    check_len("pack_rows", "x", "[N][I] with I = W.cols()", x.len(), n, i)?;
    if packed_len(w, n) != pack.len() {
        return Err(SparseError::new(format!(
            "sparse pack_rows: pack has {} elements, expected packed_len = {}",
            pack.len(),
            packed_len(w, n)
        )));
    }
    let fan = fanout_t(w);
    let active = fan.active();
    if active == 0 || n == 0 {
        return Ok(());
    }
    let isa = isa_for(i);
    let (lanes, _) = pack.as_chunks_mut::<LANES>();
    let run = |(b, pb): (usize, &mut [Lane])| {
        let nb = (n - b * LANES).min(LANES);
        let xb = &x[b * LANES * i..][..nb * i];
        // SAFETY: as in `scatter_rows`.
        unsafe { dispatch_pack(isa, fan.ptr, xb, i, nb, pb) };
    };
    if parallel(n * active) {
        lanes.par_chunks_mut(active).enumerate().for_each(run);
    } else {
        lanes.chunks_mut(active).enumerate().for_each(run);
    }
    Ok(())
}

/// Gathers the active inputs (`ptr[k] != ptr[k + 1]`) of one block into `pack`.
///
/// # Safety
/// As [`gather`].
#[inline(always)]
unsafe fn pack_block<const G: u8>(ptr: &[usize], x: &[f32], xi: usize, nb: usize, p: &mut [Lane]) {
    let mut j = 0;
    for k in 0..xi {
        if ptr[k] != ptr[k + 1] {
            p[j] = gather::<G>(x, xi, nb, k);
            j += 1;
        }
    }
}

/// [`pack_block`] compiled for `isa`.
///
/// # Safety
/// As [`gather`], with `isa` available.
unsafe fn dispatch_pack(isa: Isa, ptr: &[usize], x: &[f32], xi: usize, nb: usize, p: &mut [Lane]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(ptr: &[usize], x: &[f32], xi: usize, nb: usize, p: &mut [Lane]) {
            pack_block::<G_AVX512>(ptr, x, xi, nb, p)
        }
        if isa == Isa::Avx512 {
            return avx512(ptr, x, xi, nb, p);
        }
    }
    let _ = isa;
    pack_block::<G_PORTABLE>(ptr, x, xi, nb, p)
}

/// The weight gradient at the active weights from the packed inputs (see
/// [`spmm_rows_fused`]'s `pack`): `grad[e] = Σ_n dy[n][o_e] · x[n][k_e]`, aligned with
/// `w.values()` (overwritten). Same result as [`sddmm_rows`] on the unpacked inputs.
pub fn sddmm_packed(
    w: &SparseMatrix,
    dy: &[f32],
    pack: &[f32],
    n: usize,
    grad: &mut [f32],
) -> Result<(), SparseError> {
    let o = w.rows();
    check_len(
        "sddmm_rows",
        "dy",
        "[N][O] with O = W.rows()",
        dy.len(),
        n,
        o,
    )?;
    if grad.len() != w.nnz() {
        return Err(SparseError::new(format!(
            "sparse sddmm_rows: grad has {} elements, expected nnz = {}",
            grad.len(),
            w.nnz()
        )));
    }
    if pack.len() != packed_len(w, n) {
        return Err(SparseError::new(format!(
            "sparse sddmm_packed: pack has {} elements, expected packed_len = {}",
            pack.len(),
            packed_len(w, n)
        )));
    }
    if grad.is_empty() {
        return Ok(());
    }
    if n == 0 {
        grad.fill(0.0);
        return Ok(());
    }
    let fan = fanout_t(w);
    let active = fan.active();
    let blocks = n.div_ceil(LANES);
    let (xp, _) = pack.as_chunks::<LANES>();
    // The output gradient as `[block][O][LANES]`, zero past the last sample. A few 10 kB:
    // not worth a hand-over to the pool.
    let mut dyt = vec![[0.0f32; LANES]; blocks * o];
    lanes_of_rows(&dy[..n * o], n, o, &mut dyt);
    let parallel = parallel(n * (active + 2 * w.nnz()));
    // Tasks over ranges of active inputs, balanced by entries; each sums over all samples,
    // so no partial gradients are merged. Results come in the transposed entry order.
    let mut gt = vec![0.0f32; w.nnz()];
    let cols: Vec<usize> = (0..fan.ptr.len() - 1)
        .filter(|&k| fan.ptr[k] != fan.ptr[k + 1])
        .collect();
    let tasks = if parallel {
        2 * rayon::current_num_threads()
    } else {
        1
    };
    let chunk = cols.len().div_ceil(tasks).max(1);
    let isa = isa::active();
    let run = |(t, cs): (usize, &[usize])| -> Vec<f32> {
        let j0 = t * chunk;
        let mut out = Vec::with_capacity(fan.ptr[cs[cs.len() - 1] + 1] - fan.ptr[cs[0]]);
        // SAFETY: `isa` is available; the pattern indexes inside `[I]` x `[O]`.
        unsafe { dispatch_grad(isa, fan, cs, j0, active, xp, &dyt, o, blocks, &mut out) };
        out
    };
    let parts: Vec<Vec<f32>> = if tasks == 1 || cols.len() <= chunk {
        cols.chunks(chunk).enumerate().map(run).collect()
    } else {
        cols.par_chunks(chunk).enumerate().map(run).collect()
    };
    let mut at = 0;
    for p in &parts {
        gt[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    for (&v, &s) in gt.iter().zip(w.t_src()) {
        grad[s as usize] = v;
    }
    Ok(())
}

/// The lanes of `a` summed as a fixed balanced tree.
#[inline(always)]
fn lane_sum(a: &Lane) -> f32 {
    let mut h = *a;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            h[l] += h[l + w];
        }
    }
    h[0]
}

/// The weight gradients of the active inputs `cols` (packed indices from `j0`), in
/// transposed entry order, appended to `out`.
///
/// # Safety
/// The entries of `fan` index inside `dyt`'s `o` lanes per block; `xp` has `blocks · active`
/// lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn grad_cols(
    fan: Fanout<'_>,
    cols: &[usize],
    j0: usize,
    active: usize,
    xp: &[Lane],
    dyt: &[Lane],
    o: usize,
    blocks: usize,
    out: &mut Vec<f32>,
) {
    for (jj, &k) in cols.iter().enumerate() {
        let j = j0 + jj;
        for &r in &fan.out[fan.ptr[k]..fan.ptr[k + 1]] {
            let mut acc = [0.0f32; LANES];
            for b in 0..blocks {
                let xv = xp.get_unchecked(b * active + j);
                let dv = dyt.get_unchecked(b * o + r as usize);
                for l in 0..LANES {
                    acc[l] += dv[l] * xv[l];
                }
            }
            out.push(lane_sum(&acc));
        }
    }
}

/// [`grad_cols`] compiled for `isa`.
///
/// # Safety
/// As [`grad_cols`], with `isa` available.
#[allow(clippy::too_many_arguments)]
unsafe fn dispatch_grad(
    isa: Isa,
    fan: Fanout<'_>,
    cols: &[usize],
    j0: usize,
    active: usize,
    xp: &[Lane],
    dyt: &[Lane],
    o: usize,
    blocks: usize,
    out: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx512(
            f: Fanout<'_>,
            c: &[usize],
            j0: usize,
            a: usize,
            xp: &[Lane],
            d: &[Lane],
            o: usize,
            b: usize,
            out: &mut Vec<f32>,
        ) {
            grad_cols(f, c, j0, a, xp, d, o, b, out)
        }
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            f: Fanout<'_>,
            c: &[usize],
            j0: usize,
            a: usize,
            xp: &[Lane],
            d: &[Lane],
            o: usize,
            b: usize,
            out: &mut Vec<f32>,
        ) {
            grad_cols(f, c, j0, a, xp, d, o, b, out)
        }
        match isa {
            Isa::Avx512 => return avx512(fan, cols, j0, active, xp, dyt, o, blocks, out),
            Isa::Avx2Fma => return avx2(fan, cols, j0, active, xp, dyt, o, blocks, out),
            Isa::Portable => {}
        }
    }
    let _ = isa;
    grad_cols(fan, cols, j0, active, xp, dyt, o, blocks, out)
}
