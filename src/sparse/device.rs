//! Mask updates on the training device (issue #9): the prune/regrow update of
//! [`SparseEngine::update_with`] computed with candle tensor ops where the weights, gradients
//! and momentum already live, so a GPU run never copies them to the host. Only the outcome
//! comes back: one byte per weight of the layers that change (dropped / regrown / kept), from
//! which the engine's host bookkeeping (masks for checkpoints, counts, fired masks, history)
//! is updated.
//!
//! The result is exactly the host engine's: the same dropped and regrown positions (ties
//! broken by the lower index, regrowth only among positions inactive before the update), the
//! same weights and momentum (zero at every dropped and regrown position, untouched
//! elsewhere).
//!
//! How top-k is found without a sort: candle's CUDA `arg_sort_last_dim` is a bitonic sort of
//! one row in shared memory (rows of at most a few thousand entries, and not stable), so it
//! cannot rank a whole layer. Instead, the k-th smallest (or largest) score is found by
//! bisection over the bit patterns of non-negative `f32` scores (ordered like their values):
//! each probe is a compare and a sum on the device, and the probes of all layers go to the
//! host in one small transfer per round (about 32 rounds). With the threshold `v` found, the
//! selection is every candidate strictly beyond `v` plus the `r` lowest-index candidates equal
//! to `v`, the index bound again found by bisection when there are more ties than `r` (common:
//! zero gradients at dead units). That is the host's order by (score, index).
//!
//! Device versions exist for death `magnitude`, `taylor`, `threshold` and growth `gradient`,
//! `momentum`, with redistribution `none` (RigL, REST's default, and SNFS without
//! redistribution). `--death set`, random growth (`random`, `random-unfired`, which draw from
//! the engine's host stream) and every redistribution other than `none` run on the host, as
//! does an update whose inputs hold a non-finite value the modes read (the host path then
//! reports it).
//!
//! Where updates run: [`update_place`], from `REST_MASK_UPDATE=auto|device|host` (default
//! `auto`: on the device when the run's device is not the CPU).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::ValueEnum;

use super::engine::{SparseEngine, UpdateStats};
use super::modes::{DeathMode, DstOptions, GrowthMode, Redistribution};

/// The environment variable that picks where mask updates run: `auto` (default), `device`
/// or `host`.
pub const MASK_UPDATE_ENV: &str = "REST_MASK_UPDATE";

/// Bit pattern of `f32::INFINITY`: the largest non-negative non-NaN `f32` in bit order.
const INF_BITS: u32 = 0x7F80_0000;

/// Where a run's mask updates are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdatePlace {
    /// [`SparseEngine::update_with`] on host copies of the tensors.
    Host,
    /// [`update_on_device`] on the run's device (falls back to the host for modes without a
    /// device version, see [`host_only_reason`]).
    Device,
}

/// Where mask updates run for a run on `dev`: `REST_MASK_UPDATE=device` or `host` when set,
/// else (`auto`) on the device when `dev` is not the CPU. Errors on any other value.
pub fn update_place(dev: &Device) -> Result<UpdatePlace> {
    let auto = if dev.is_cpu() {
        UpdatePlace::Host
    } else {
        UpdatePlace::Device
    };
    match std::env::var(MASK_UPDATE_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(auto),
        Err(std::env::VarError::NotUnicode(v)) => {
            bail!("{MASK_UPDATE_ENV}={v:?} is not valid: set it to auto, device or host")
        }
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(auto),
            "device" => Ok(UpdatePlace::Device),
            "host" => Ok(UpdatePlace::Host),
            _ => bail!(
                "{MASK_UPDATE_ENV}={v} is not valid: set it to auto (the default: on the device \
                 when training off the CPU), device or host"
            ),
        },
    }
}

fn flag_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

/// The option that keeps mask updates on the host for `opts` (e.g. `--growth random`), or
/// `None` when every mode of `opts` has a device version.
pub fn host_only_reason(opts: &DstOptions) -> Option<String> {
    if opts.redistribution != Redistribution::None {
        return Some(format!(
            "--redistribution {}",
            flag_name(&opts.redistribution)
        ));
    }
    if opts.death == DeathMode::Set {
        return Some("--death set".into());
    }
    if matches!(opts.growth, GrowthMode::Random | GrowthMode::RandomUnfired) {
        return Some(format!("--growth {}", flag_name(&opts.growth)));
    }
    None
}

/// One masked layer's tensors on the device, in the order of [`SparseEngine::layers`].
pub struct LayerTensors<'a> {
    /// The weight after this step's optimizer update.
    pub weight: &'a Tensor,
    /// Its dense gradient of this step (`None`: zeros).
    pub grad: Option<&'a Tensor>,
    /// Its momentum buffer before masking (`None`: no buffer; zeros where a mode reads it).
    pub momentum: Option<&'a Tensor>,
    /// The mask before the update, 1.0 / 0.0, equal to the engine's [`SparseEngine::mask`].
    pub mask: &'a Tensor,
}

/// The outcome of [`update_on_device`]: new tensors on the device, in the shapes of the
/// inputs, and the engine's statistics (the engine itself is already updated).
pub struct DeviceUpdate {
    pub stats: UpdateStats,
    /// Per layer, the weight with every dropped and regrown position set to 0.0, or `None`
    /// when the layer did not change (no position dropped).
    pub weights: Vec<Option<Tensor>>,
    /// Momentum buffers likewise (`None` also where none was passed).
    pub momentum: Vec<Option<Tensor>>,
    /// The new masks, 1.0 / 0.0 `f32`.
    pub masks: Vec<Tensor>,
}

/// The smallest `f32` `c` with `x < c <=> (x as f64) < t` for every finite `x >= 0`: the
/// threshold-death test `|w| < --death-threshold` of the host, in `f32`.
fn f32_threshold(t: f64) -> f32 {
    let c = t as f32;
    if (c as f64) < t {
        c.next_up()
    } else {
        c
    }
}

/// The number of nonzero entries of a `u8` 0/1 tensor, as a rank-0 `u32` tensor.
fn count(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::U32)?.sum_all()?)
}

/// `a & b` for `u8` 0/1 tensors.
fn and(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.mul(b)?)
}

/// Finite entries of an `f32` tensor as `u8` 0/1 (NaN and infinities give 0).
fn finite(t: &Tensor) -> Result<Tensor> {
    Ok(t.abs()?.le(f32::MAX)?)
}

/// Up to `n` integer points strictly below `hi` in `[lo, hi)`, evenly spread: the probes of
/// one round of a search for the first true point of a monotone predicate in `[lo, hi]`.
fn probe_points(lo: u64, hi: u64, n: u64) -> Vec<u64> {
    let span = hi - lo;
    if span <= n {
        return (lo..hi).collect();
    }
    let mut pts: Vec<u64> = (1..=n).map(|i| lo + span * i / (n + 1)).collect();
    pts.dedup();
    pts
}

/// Probes per search and round: 1 is plain bisection (fewest kernel launches; about 32 rounds
/// for the value and as many as the layer's index bits for ties).
const PROBES: u64 = 1;

/// Narrows `[lo, hi]` (first true point, true at `hi`) from the predicate at `pts`.
fn narrow(lo: &mut u64, hi: &mut u64, pts: &[u64], truth: &[bool]) {
    for (&p, &t) in pts.iter().zip(truth) {
        if t {
            *hi = (*hi).min(p);
        } else {
            *lo = (*lo).max(p + 1);
        }
    }
}

enum State {
    /// Bisection for the k-th score in bit order: first `x` in `[lo, hi]` with
    /// `count(candidates beyond-or-at threshold(x)) >= k`.
    Value { lo: u64, hi: u64, pts: Vec<u64> },
    /// Threshold `v` found: count the candidates strictly beyond it and equal to it.
    Ties { strict: Tensor, eq: Tensor },
    /// More candidates equal `v` than are needed (`r`): first index bound `j` in `[lo, hi]`
    /// with `count(eq & index < j) >= r`.
    Index {
        strict: Tensor,
        eq: Tensor,
        idx: Tensor,
        r: usize,
        lo: u64,
        hi: u64,
        pts: Vec<u64>,
    },
    /// The selection, `u8` 0/1.
    Done(Tensor),
}

/// The score at search point `x`: bit pattern `x` when looking for the smallest scores,
/// `INF_BITS - x` for the largest (so the predicate grows with `x` either way).
fn threshold(largest: bool, x: u64) -> f32 {
    let bits = if largest {
        INF_BITS - x as u32
    } else {
        x as u32
    };
    f32::from_bits(bits)
}

/// The `k` candidates with the smallest (or largest) score, ties by the lower index.
struct Search {
    score: Tensor,
    cand: Tensor,
    k: usize,
    largest: bool,
    state: State,
}

impl Search {
    /// `cand_count` is the number of candidates (1s of `cand`), `k <= cand_count`.
    fn new(
        score: Tensor,
        cand: Tensor,
        cand_count: usize,
        k: usize,
        largest: bool,
    ) -> Result<Self> {
        let state = if k == 0 {
            State::Done(cand.zeros_like()?)
        } else if k == cand_count {
            State::Done(cand.clone())
        } else {
            State::Value {
                lo: 0,
                hi: INF_BITS as u64,
                pts: Vec::new(),
            }
        };
        Ok(Self {
            score,
            cand,
            k,
            largest,
            state,
        })
    }

    /// Appends this round's probes (rank-0 `u32` counts) to `out`.
    fn probes(&mut self, out: &mut Vec<Tensor>) -> Result<()> {
        match &mut self.state {
            State::Value { lo, hi, pts } => {
                *pts = probe_points(*lo, *hi, PROBES);
                for &x in pts.iter() {
                    let t = threshold(self.largest, x);
                    let hit = if self.largest {
                        self.score.ge(t)?
                    } else {
                        self.score.le(t)?
                    };
                    out.push(count(&and(&self.cand, &hit)?)?);
                }
            }
            State::Ties { strict, eq } => {
                out.push(count(strict)?);
                out.push(count(eq)?);
            }
            State::Index {
                eq,
                idx,
                lo,
                hi,
                pts,
                ..
            } => {
                *pts = probe_points(*lo, *hi, PROBES);
                for &j in pts.iter() {
                    out.push(count(&and(eq, &idx.lt(j as u32)?)?)?);
                }
            }
            State::Done(_) => {}
        }
        Ok(())
    }

    /// Consumes this round's counts (as many as [`Self::probes`] appended).
    fn advance(&mut self, counts: &mut impl Iterator<Item = u32>) -> Result<()> {
        let k = self.k;
        let mut next = None;
        match &mut self.state {
            State::Value { lo, hi, pts } => {
                let truth: Vec<bool> = pts
                    .iter()
                    .map(|_| next_count(counts).map(|c| c >= k))
                    .collect::<Result<_>>()?;
                narrow(lo, hi, pts, &truth);
                if lo == hi {
                    let v = threshold(self.largest, *lo);
                    let strict = if self.largest {
                        self.score.gt(v)?
                    } else {
                        self.score.lt(v)?
                    };
                    next = Some(State::Ties {
                        strict: and(&self.cand, &strict)?,
                        eq: and(&self.cand, &self.score.eq(v)?)?,
                    });
                }
            }
            State::Ties { strict, eq } => {
                let (c_strict, c_eq) = (next_count(counts)?, next_count(counts)?);
                if c_strict >= k || c_strict + c_eq < k {
                    bail!(
                        "internal error in the device mask update: {c_strict} scores beyond \
                         and {c_eq} at the threshold for k = {k}; rerun with \
                         {MASK_UPDATE_ENV}=host and report this"
                    );
                }
                let r = k - c_strict;
                next = Some(if r == c_eq {
                    State::Done(strict.add(eq)?)
                } else {
                    let n = self.score.elem_count();
                    State::Index {
                        strict: strict.clone(),
                        eq: eq.clone(),
                        idx: Tensor::arange(0u32, n as u32, self.score.device())?,
                        r,
                        lo: 1,
                        hi: n as u64,
                        pts: Vec::new(),
                    }
                });
            }
            State::Index {
                strict,
                eq,
                idx,
                r,
                lo,
                hi,
                pts,
            } => {
                let truth: Vec<bool> = pts
                    .iter()
                    .map(|_| next_count(counts).map(|c| c >= *r))
                    .collect::<Result<_>>()?;
                narrow(lo, hi, pts, &truth);
                if lo == hi {
                    let first = and(eq, &idx.lt(*lo as u32)?)?;
                    next = Some(State::Done(strict.add(&first)?));
                }
            }
            State::Done(_) => {}
        }
        if let Some(s) = next {
            self.state = s;
        }
        Ok(())
    }

    fn done(&self) -> Option<&Tensor> {
        match &self.state {
            State::Done(t) => Some(t),
            _ => None,
        }
    }
}

fn next_count(counts: &mut impl Iterator<Item = u32>) -> Result<usize> {
    match counts.next() {
        Some(c) => Ok(c as usize),
        None => bail!("internal error in the device mask update: a probe count is missing"),
    }
}

/// Runs rounds of probes until every search is done: one device-to-host transfer of the
/// round's counts (a few bytes per search) per round.
/// Returns the number of rounds and of counts transferred.
fn run_searches(searches: &mut [Search]) -> Result<(usize, usize)> {
    let (mut rounds, mut values) = (0, 0);
    loop {
        let mut probes = Vec::new();
        for s in searches.iter_mut() {
            s.probes(&mut probes)?;
        }
        if probes.is_empty() {
            return Ok((rounds, values));
        }
        rounds += 1;
        values += probes.len();
        let counts = Tensor::stack(&probes, 0)?.to_vec1::<u32>()?;
        let mut it = counts.into_iter();
        for s in searches.iter_mut() {
            s.advance(&mut it)?;
        }
    }
}

/// Host-side numbers of one layer.
struct LayerPlan {
    n: usize,
    active: usize,
    /// Weights dropped (and regrown) by this update.
    k: usize,
}

/// One mask update at `step` on the tensors' device, exactly like
/// [`SparseEngine::update_with`] with the same inputs (see the module documentation), and the
/// engine's masks, counts, fired masks and history updated from the result.
///
/// Returns `Ok(None)`, changing nothing, when the update must run on the host instead: the
/// modes have no device version ([`host_only_reason`]), masks are fixed, or a value the modes
/// read is not finite (the host path reports where). Errors, changing nothing, when the
/// tensors do not match the engine's layers.
pub fn update_on_device(
    engine: &mut SparseEngine,
    step: usize,
    layers: &[LayerTensors<'_>],
) -> Result<Option<DeviceUpdate>> {
    let opts = engine.options().clone();
    if opts.fix || host_only_reason(&opts).is_some() {
        return Ok(None);
    }
    let nl = engine.layers().len();
    if layers.len() != nl {
        bail!(
            "device mask update got {} layers for {nl} masked layers",
            layers.len()
        );
    }
    for (shape, t) in engine.layers().iter().zip(layers) {
        let n = shape.numel();
        let tensors = [
            ("weight", Some(t.weight)),
            ("gradient", t.grad),
            ("momentum", t.momentum),
            ("mask", Some(t.mask)),
        ];
        for (what, x) in tensors {
            if let Some(x) = x {
                if x.elem_count() != n || x.dtype() != DType::F32 {
                    bail!(
                        "device mask update: layer `{}` of shape {:?} has {n} weights but its \
                         {what} is {:?} {:?} (f32 with as many entries expected)",
                        shape.name,
                        shape.shape,
                        x.dtype(),
                        x.dims()
                    );
                }
            }
        }
    }
    let rate = engine.prune_rate(step);
    let plans: Vec<LayerPlan> = (0..nl)
        .map(|l| {
            let n = engine.layers()[l].numel();
            let active = engine.active_count(l);
            // As in `update_with`: round(rate * active), capped by the inactive positions.
            let k = if active == n {
                0
            } else {
                ((rate * active as f64).round() as usize).min(n - active)
            };
            LayerPlan { n, active, k }
        })
        .collect();

    // Per-layer device views. Only layers that are not fully dense take part (as on the host).
    struct Views {
        l: usize,
        w: Tensor,
        on: Tensor,
        off: Tensor,
        death_score: Tensor,
        death_cand: Tensor,
        grow_score: Tensor,
    }
    let mut views = Vec::new();
    for (l, (t, p)) in layers.iter().zip(&plans).enumerate() {
        if p.active == p.n {
            continue;
        }
        let w = t.weight.flatten_all()?;
        let mask = t.mask.flatten_all()?;
        let on = mask.ne(0f32)?;
        let off = mask.eq(0f32)?;
        let zeros = || w.zeros_like();
        let g = match t.grad {
            Some(g) => g.flatten_all()?,
            None => zeros()?,
        };
        let m = match t.momentum {
            Some(m) => m.flatten_all()?,
            None => zeros()?,
        };
        let w_abs = w.abs()?;
        let (death_score, death_cand) = match opts.death {
            DeathMode::Magnitude => (w_abs, on.clone()),
            DeathMode::Taylor => (w.mul(&g)?.abs()?, on.clone()),
            DeathMode::Threshold => {
                let below = w_abs.lt(f32_threshold(opts.death_threshold))?;
                let cand = and(&on, &below)?;
                (w_abs, cand)
            }
            DeathMode::Set => return Ok(None),
        };
        let grow_score = match opts.growth {
            GrowthMode::Gradient => g.abs()?,
            _ => m.abs()?,
        };
        views.push((
            Views {
                l,
                w,
                on,
                off,
                death_score,
                death_cand,
                grow_score,
            },
            g,
            m,
        ));
    }

    // Round 0: the mask agrees with the engine's; every value the modes read is finite (as
    // `check_inputs` demands); the threshold-death candidates.
    let mut probes = Vec::new();
    for (v, g, m) in &views {
        probes.push(count(&v.on)?);
        probes.push(count(&and(&v.on, &finite(&v.w)?)?)?);
        if opts.death == DeathMode::Taylor {
            probes.push(count(&and(&v.on, &finite(g)?)?)?);
        }
        let grown_from = match opts.growth {
            GrowthMode::Gradient => g,
            _ => m,
        };
        probes.push(count(&and(&v.off, &finite(grown_from)?)?)?);
        if opts.death == DeathMode::Threshold {
            probes.push(count(&v.death_cand)?);
        }
    }
    let probe_count = probes.len();
    let counts = if probes.is_empty() {
        Vec::new()
    } else {
        Tensor::stack(&probes, 0)?.to_vec1::<u32>()?
    };
    let mut it = counts.into_iter();
    let mut death_counts = Vec::with_capacity(views.len());
    let mut all_finite = true;
    for (v, _, _) in &views {
        let p = &plans[v.l];
        let on_count = next_count(&mut it)?;
        if on_count != p.active {
            bail!(
                "internal error: the device mask of layer `{}` has {on_count} active weights \
                 but the sparse engine's has {}; rerun with {MASK_UPDATE_ENV}=host and report \
                 this",
                engine.layers()[v.l].name,
                p.active
            );
        }
        all_finite &= next_count(&mut it)? == p.active;
        if opts.death == DeathMode::Taylor {
            all_finite &= next_count(&mut it)? == p.active;
        }
        all_finite &= next_count(&mut it)? == p.n - p.active;
        death_counts.push(if opts.death == DeathMode::Threshold {
            next_count(&mut it)?
        } else {
            p.active
        });
    }
    if !all_finite {
        return Ok(None);
    }

    // Death among the active positions, growth of as many among the inactive ones (both on
    // the masks before the update).
    let mut searches = Vec::with_capacity(2 * views.len());
    let mut ks = Vec::with_capacity(views.len());
    for ((v, _, _), &cand_count) in views.iter().zip(&death_counts) {
        let p = &plans[v.l];
        let k = p.k.min(cand_count);
        ks.push(k);
        searches.push(Search::new(
            v.death_score.clone(),
            v.death_cand.clone(),
            cand_count,
            k,
            false,
        )?);
        searches.push(Search::new(
            v.grow_score.clone(),
            v.off.clone(),
            p.n - p.active,
            k,
            true,
        )?);
    }
    let (rounds, values) = run_searches(&mut searches)?;

    // The outcome to the host in one transfer: per position 0 kept, 1 dropped, 2 regrown.
    let mut sel = Vec::with_capacity(views.len());
    for pair in searches.chunks(2) {
        let (Some(d), Some(g)) = (pair[0].done(), pair[1].done()) else {
            bail!("internal error in the device mask update: a search did not finish");
        };
        sel.push((d.clone(), g.clone()));
    }
    let codes: Vec<Tensor> = sel
        .iter()
        .map(|(d, g)| Ok(d.add(&g.add(g)?)?))
        .collect::<Result<_>>()?;
    let codes = if codes.is_empty() {
        Vec::new()
    } else {
        Tensor::cat(&codes, 0)?.to_vec1::<u8>()?
    };
    let mut dropped = vec![Vec::new(); nl];
    let mut regrown = vec![Vec::new(); nl];
    let mut at = 0;
    for ((v, _, _), &k) in views.iter().zip(&ks) {
        let p = &plans[v.l];
        let mask = engine.mask(v.l);
        let (d, g) = (&mut dropped[v.l], &mut regrown[v.l]);
        for (i, &c) in codes[at..at + p.n].iter().enumerate() {
            let on = mask[i] != 0.0;
            match (c, on) {
                (0, _) => {}
                (1, true) => d.push(i),
                (2, false) => g.push(i),
                _ => bail!(
                    "internal error in the device mask update: layer `{}` position {i} got \
                     code {c} while {}; rerun with {MASK_UPDATE_ENV}=host and report this",
                    engine.layers()[v.l].name,
                    if on { "active" } else { "inactive" }
                ),
            }
        }
        at += p.n;
        if d.len() != k || g.len() != k {
            bail!(
                "internal error in the device mask update: layer `{}` dropped {} and regrew {} \
                 weights instead of {k}; rerun with {MASK_UPDATE_ENV}=host and report this",
                engine.layers()[v.l].name,
                d.len(),
                g.len()
            );
        }
    }

    // New tensors: zero at every dropped and regrown position; the layers that did not change
    // keep theirs.
    let mut weights: Vec<Option<Tensor>> = vec![None; nl];
    let mut momentum: Vec<Option<Tensor>> = vec![None; nl];
    let mut masks: Vec<Tensor> = layers.iter().map(|t| t.mask.clone()).collect();
    for (((v, _, _), (d, g)), &k) in views.iter().zip(&sel).zip(&ks) {
        if k == 0 {
            continue;
        }
        let t = &layers[v.l];
        let shape = t.weight.shape();
        let changed = d.add(g)?;
        let zeros = v.w.zeros_like()?;
        weights[v.l] = Some(changed.where_cond(&zeros, &v.w)?.reshape(shape)?);
        if let Some(m) = t.momentum {
            let m = m.flatten_all()?;
            momentum[v.l] = Some(changed.where_cond(&zeros, &m)?.reshape(shape)?);
        }
        masks[v.l] = v.on.sub(d)?.add(g)?.to_dtype(DType::F32)?.reshape(shape)?;
    }
    tracing::debug!(
        "sparse: device mask update at step {step}: {} probe rounds, {} bytes of counts and {} \
         bytes of outcome to the host",
        rounds + 1,
        4 * (values + probe_count),
        codes.len()
    );
    let stats = engine.commit_update(step, rate, dropped, regrown);
    Ok(Some(DeviceUpdate {
        stats,
        weights,
        momentum,
        masks,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_threshold_matches_the_f64_test() {
        for t in [
            0.0,
            -1.0,
            1e-3,
            0.1,
            0.5,
            1.0,
            3.0e38,
            3.5e38,
            1e300,
            1.0 / 3.0,
        ] {
            let c = f32_threshold(t);
            let xs = [
                0.0f32,
                1e-45,
                1e-3,
                0.1,
                0.5,
                1.0,
                (t as f32).next_down().max(0.0),
                (t as f32).max(0.0),
                (t as f32).next_up().max(0.0),
                f32::MAX,
            ];
            for x in xs {
                assert_eq!(x < c, (x as f64) < t, "t = {t}, x = {x}, c = {c}");
            }
        }
    }

    #[test]
    fn probe_points_cover_small_ranges_and_narrowing_finds_the_first_true() {
        assert_eq!(probe_points(3, 4, 1), vec![3]);
        assert_eq!(probe_points(3, 5, 2), vec![3, 4]);
        assert_eq!(probe_points(0, 10, 1), vec![5]);
        assert_eq!(probe_points(0, 10, 3), vec![2, 5, 7]);
        for first in 0..40u64 {
            for n in [1, 3] {
                let (mut lo, mut hi) = (0, 40);
                while lo < hi {
                    let pts = probe_points(lo, hi, n);
                    let truth: Vec<bool> = pts.iter().map(|&p| p >= first).collect();
                    narrow(&mut lo, &mut hi, &pts, &truth);
                }
                assert_eq!(lo, first);
            }
        }
    }
}
