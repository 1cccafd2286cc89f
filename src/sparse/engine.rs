//! The sparse-training engine: owns one exact-count mask per layer, the ever-active ("fired")
//! masks and the history of updates, and applies the prune/regrow update of RigL (Evci et al.
//! 2020, REST's default), SET, SNFS and ITOP: drop `round(rate * active)` weights per layer by
//! the death criterion, regrow as many positions that were inactive before the update by the
//! growth criterion (per layer, or split between layers by a redistribution rule), at a prune
//! rate that decays over the update window. Counts are exact after init and every update.

use anyhow::{bail, Result};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::erk::{init_densities, layer_counts, validate_layers, LayerShape};
use super::modes::{DeathMode, DecaySchedule, DstOptions, GrowthMode, Redistribution};
use super::redistribute::split_largest_remainder;
use super::schedule::{CosineDecay, LinearDecay, PruneSchedule};
use super::select::{largest_k, smallest_k};
use crate::util::Rng;

/// Mask updates per run below which the update frequency is scaled down.
const MIN_UPDATES_PER_RUN: usize = 10;

/// Settings of dynamic sparse training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseConfig {
    /// Total target density in (0, 1]: the fraction of masked weights kept.
    pub density: f64,
    /// Initial fraction of active weights dropped (and regrown) per update (paper: 0.5).
    pub prune_rate: f64,
    /// Prune rate reached at the end of the run (paper: 0.005).
    pub final_prune_rate: f64,
    /// Optimizer steps between mask updates (paper: 1000).
    pub update_frequency: usize,
    /// Optimizer steps in the whole run.
    pub total_steps: usize,
    /// Exponent applied to the ERK layer scores (1.0 is standard ERK, 0.0 is uniform).
    pub erk_power_scale: f64,
}

impl SparseConfig {
    fn validate(&self) -> Result<()> {
        for (flag, value) in [
            ("--prune-rate", self.prune_rate),
            ("--final-prune-rate", self.final_prune_rate),
        ] {
            if !(value.is_finite() && (0.0..=1.0).contains(&value)) {
                bail!(
                    "{flag} must be a fraction in [0, 1] of the active weights replaced per mask \
                     update, got {value}"
                );
            }
        }
        if self.update_frequency == 0 {
            bail!("--update-frequency must be at least 1 (optimizer steps between mask updates)");
        }
        Ok(())
    }
}

/// What one [`SparseEngine::update`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateStats {
    /// The step passed to `update`.
    pub step: usize,
    /// The prune rate used at that step.
    pub prune_rate: f64,
    /// Weights dropped per layer.
    pub pruned: Vec<usize>,
    /// Positions regrown per layer (equal to `pruned` without redistribution).
    pub grown: Vec<usize>,
    /// Active weights per layer after the update.
    pub counts: Vec<usize>,
    /// Per layer, the positions dropped by this update (ascending).
    pub dropped_positions: Vec<Vec<usize>>,
    /// Per layer, the positions regrown by this update (ascending): their weights were set to
    /// 0.0, and their momentum must start at zero (done when a buffer is passed to
    /// [`SparseEngine::update_with`]).
    pub regrown_positions: Vec<Vec<usize>>,
}

/// Host copies of one layer's tensors for [`SparseEngine::update_with`], one `Vec` per masked
/// layer in the order of [`SparseEngine::layers`].
pub struct UpdateInputs<'a> {
    /// Weights; dropped and regrown positions are set to 0.0.
    pub weights: &'a mut [Vec<f32>],
    /// Dense gradients of the current step.
    pub grads: &'a [Vec<f32>],
    /// The optimizer's momentum buffers (needed by `--growth momentum` and
    /// `--redistribution momentum`); dropped and regrown positions are set to 0.0.
    pub momentum: Option<&'a mut [Vec<f32>]>,
}

/// The masks after init (step 0) or after one update, for reporting.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskRecord {
    pub step: usize,
    pub prune_rate: f64,
    /// Active weights per layer after the update.
    pub nonzero: Vec<usize>,
    pub pruned: Vec<usize>,
    pub grown: Vec<usize>,
    /// Positions ever active so far per layer (ITOP).
    pub fired: Vec<usize>,
}

/// The masks of all sparsified layers and the rules that change them.
#[derive(Clone, Debug)]
pub struct SparseEngine {
    layers: Vec<LayerShape>,
    cfg: SparseConfig,
    opts: DstOptions,
    update_frequency: usize,
    /// Steps at or after which masks are frozen (`round(update_end * total_steps)`).
    end_step: usize,
    schedule: PruneSchedule,
    /// Per layer: 1.0 active / 0.0 inactive.
    masks: Vec<Vec<f32>>,
    /// Per layer: the number of 1.0 entries in `masks`.
    counts: Vec<usize>,
    /// Per layer: positions active at some point so far.
    fired: Vec<Vec<bool>>,
    /// The engine's own stream for random growth.
    rng: Rng,
    history: Vec<MaskRecord>,
}

impl SparseEngine {
    /// Draws the initial masks: layer l gets exactly `layer_counts[l]` active positions (ERK
    /// densities for `cfg.density`), chosen uniformly at random. If
    /// fewer than 10 updates fit before the last step, the frequency is scaled down to
    /// `max(1, (total_steps - 1) / 10)` and a `tracing::info!` line says so. Same as
    /// [`Self::with_options`] with [`DstOptions::default`].
    pub fn new(layers: Vec<LayerShape>, cfg: SparseConfig, rng: &mut Rng) -> Result<Self> {
        Self::with_options(layers, cfg, DstOptions::default(), rng)
    }

    /// Like [`Self::new`] with the modes of `opts`: per-layer densities from
    /// `opts.sparse_init` (ERK, ER, uniform, uniform-plus; `dense_first_layer` keeps layer 0
    /// dense), positions drawn uniformly at random. The engine's random-growth stream is seeded
    /// from `rng` after the masks are drawn. Score-based inits need [`Self::new_from_scores`].
    pub fn with_options(
        layers: Vec<LayerShape>,
        cfg: SparseConfig,
        opts: DstOptions,
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::with_options_placed(layers, cfg, opts, None, rng)
    }

    /// Like [`Self::with_options`], the active positions of each layer, when `scores` are
    /// given (one per weight, one `Vec` per layer), its `count` highest-scoring ones (ties: the
    /// lower index) instead of random ones (`--magnitude-masks`: [`magnitude_scores`]).
    pub fn with_options_placed(
        layers: Vec<LayerShape>,
        cfg: SparseConfig,
        opts: DstOptions,
        scores: Option<&[Vec<f32>]>,
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::check_setup(&layers, &cfg, &opts)?;
        if let Some(s) = scores {
            if s.len() != layers.len() || s.iter().zip(&layers).any(|(v, l)| v.len() != l.numel()) {
                bail!("internal error: mask placement scores do not match the masked layers");
            }
            for (v, l) in s.iter().zip(&layers) {
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    bail!(
                        "--magnitude-masks: weight {i} of layer `{}` is {}; the initial weights \
                         are not finite",
                        l.name,
                        v[i]
                    );
                }
            }
        }
        let dense: &[usize] = if opts.dense_first_layer { &[0] } else { &[] };
        let densities = init_densities(
            &layers,
            cfg.density,
            cfg.erk_power_scale,
            opts.sparse_init,
            dense,
        )?;
        let counts = layer_counts(&layers, &densities);
        let masks = layers
            .iter()
            .zip(&counts)
            .enumerate()
            .map(|(l, (layer, &count))| {
                let n = layer.numel();
                if count == n {
                    return vec![1.0; n];
                }
                let mut mask = vec![0.0f32; n];
                match scores {
                    Some(s) => {
                        let mut idx: Vec<usize> = (0..n).collect();
                        for &i in largest_k(&mut idx, count, |i| s[l][i]) {
                            mask[i] = 1.0;
                        }
                    }
                    None => {
                        for i in rand::seq::index::sample(rng, n, count) {
                            mask[i] = 1.0;
                        }
                    }
                }
                mask
            })
            .collect();
        for (layer, (&count, d)) in layers.iter().zip(counts.iter().zip(&densities)) {
            tracing::debug!(
                "sparse: layer {} {:?}: {:?} density {d:.4}, {count} of {} weights active",
                layer.name,
                layer.shape,
                opts.sparse_init,
                layer.numel()
            );
        }
        let engine_rng = Rng::from_rng(rng);
        Ok(Self::assemble(layers, cfg, opts, masks, counts, engine_rng))
    }

    /// Score-based initial masks (`--sparse-init snip|grasp|global-magnitude`): keeps the
    /// global top `round(density * total)` of `scores` (one per weight, one `Vec` per layer;
    /// ties: earlier layer, then lower index), with layer 0 entirely kept first when
    /// `opts.dense_first_layer`. The caller computes the scores (see [`snip_scores`],
    /// [`grasp_scores`], [`magnitude_scores`]). A layer may end up with no active weight.
    /// The random-growth stream is seeded from `rng`.
    pub fn new_from_scores(
        layers: Vec<LayerShape>,
        cfg: SparseConfig,
        opts: DstOptions,
        scores: &[Vec<f32>],
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::check_setup(&layers, &cfg, &opts)?;
        if scores.len() != layers.len() {
            bail!(
                "sparse init got scores for {} layers but the model has {} masked layers",
                scores.len(),
                layers.len()
            );
        }
        let mut flat = Vec::new();
        let mut offsets = Vec::with_capacity(layers.len());
        for (layer, s) in layers.iter().zip(scores) {
            if s.len() != layer.numel() {
                bail!(
                    "sparse init: layer `{}` of shape {:?} has {} weights but {} scores were \
                     given",
                    layer.name,
                    layer.shape,
                    layer.numel(),
                    s.len()
                );
            }
            if let Some(i) = s.iter().position(|v| !v.is_finite()) {
                bail!(
                    "--sparse-init {:?}: the score of layer `{}` at position {i} is {}; the \
                     network diverged while scoring (try a lower learning rate or another init)",
                    opts.sparse_init,
                    layer.name,
                    s[i]
                );
            }
            offsets.push(flat.len());
            flat.extend_from_slice(s);
        }
        let total = flat.len();
        let mut budget = (cfg.density * total as f64).round() as usize;
        let first = if opts.dense_first_layer {
            let n0 = layers[0].numel();
            if budget < n0 {
                bail!(
                    "--density {} keeps {budget} weights, fewer than the {n0} of the first layer \
                     that --dense-first-layer keeps; raise --density",
                    cfg.density
                );
            }
            budget -= n0;
            1
        } else {
            0
        };
        let mut candidates: Vec<usize> = (offsets[first.min(layers.len() - 1)]..total).collect();
        if first == 1 && layers.len() == 1 {
            candidates.clear();
        }
        let keep = largest_k(&mut candidates, budget, |g| flat[g]).to_vec();
        let mut masks: Vec<Vec<f32>> = layers.iter().map(|l| vec![0.0; l.numel()]).collect();
        if first == 1 {
            masks[0].fill(1.0);
        }
        for g in keep {
            let l = offsets.partition_point(|&o| o <= g) - 1;
            masks[l][g - offsets[l]] = 1.0;
        }
        let counts: Vec<usize> = masks
            .iter()
            .map(|m| m.iter().filter(|&&v| v != 0.0).count())
            .collect();
        for (layer, &c) in layers.iter().zip(&counts) {
            if c == 0 {
                tracing::warn!(
                    "sparse: --sparse-init {:?} keeps no weight of layer `{}` (layer collapse)",
                    opts.sparse_init,
                    layer.name
                );
            }
        }
        let engine_rng = Rng::from_rng(rng);
        Ok(Self::assemble(layers, cfg, opts, masks, counts, engine_rng))
    }

    fn check_setup(layers: &[LayerShape], cfg: &SparseConfig, opts: &DstOptions) -> Result<()> {
        cfg.validate()?;
        opts.validate()?;
        if layers.is_empty() {
            bail!("sparse training needs at least one weight layer to mask; the model has none");
        }
        validate_layers(layers)?;
        if !(cfg.density.is_finite() && cfg.density > 0.0 && cfg.density <= 1.0) {
            bail!(
                "--density must be a number in (0, 1] (the fraction of weights kept), got {}",
                cfg.density
            );
        }
        Ok(())
    }

    fn assemble(
        layers: Vec<LayerShape>,
        cfg: SparseConfig,
        opts: DstOptions,
        masks: Vec<Vec<f32>>,
        counts: Vec<usize>,
        rng: Rng,
    ) -> Self {
        let end_step =
            ((opts.update_end * cfg.total_steps as f64).round() as usize).min(cfg.total_steps);
        let mut update_frequency = cfg.update_frequency;
        // Updates happen at multiples of the frequency strictly before the end of the window.
        let window = end_step.saturating_sub(1);
        if !opts.fix && window / update_frequency < MIN_UPDATES_PER_RUN {
            let scaled = (window / MIN_UPDATES_PER_RUN).max(1);
            if scaled != update_frequency {
                tracing::info!(
                    "sparse: an update window of {} steps would update the masks only {} times \
                     every {} steps; updating every {} steps instead",
                    end_step,
                    window / update_frequency,
                    update_frequency,
                    scaled
                );
                update_frequency = scaled;
            }
        }
        let schedule = match opts.decay_schedule {
            DecaySchedule::Cosine => PruneSchedule::Cosine(CosineDecay::new(
                cfg.prune_rate,
                cfg.final_prune_rate,
                end_step,
            )),
            DecaySchedule::Linear => PruneSchedule::Linear(LinearDecay::new(
                cfg.prune_rate,
                cfg.final_prune_rate,
                end_step,
            )),
        };
        let fired: Vec<Vec<bool>> = masks
            .iter()
            .map(|m| m.iter().map(|&v| v != 0.0).collect())
            .collect();
        let mut engine = Self {
            layers,
            cfg,
            opts,
            update_frequency,
            end_step,
            schedule,
            masks,
            counts,
            fired,
            rng,
            history: Vec::new(),
        };
        let n = engine.layers.len();
        engine.record(0, engine.prune_rate(0), vec![0; n], vec![0; n]);
        engine
    }

    fn record(&mut self, step: usize, prune_rate: f64, pruned: Vec<usize>, grown: Vec<usize>) {
        let fired = self
            .fired
            .iter()
            .map(|f| f.iter().filter(|&&b| b).count())
            .collect();
        self.history.push(MaskRecord {
            step,
            prune_rate,
            nonzero: self.counts.clone(),
            pruned,
            grown,
            fired,
        });
    }

    /// The masked layers, in the order of the masks.
    pub fn layers(&self) -> &[LayerShape] {
        &self.layers
    }

    /// The configuration the engine was built with (with the requested update frequency; see
    /// [`Self::update_frequency`] for the effective one).
    pub fn config(&self) -> &SparseConfig {
        &self.cfg
    }

    /// The mode choices the engine was built with.
    pub fn options(&self) -> &DstOptions {
        &self.opts
    }

    /// The mask of `layer`: 1.0 active / 0.0 inactive, one entry per weight. Panics if `layer`
    /// is not below `layers().len()`.
    pub fn mask(&self, layer: usize) -> &[f32] {
        &self.masks[layer]
    }

    /// The masks as booleans (for checkpoints; see [`Self::set_masks_from`]).
    pub fn masks_bool(&self) -> Vec<Vec<bool>> {
        self.masks
            .iter()
            .map(|m| m.iter().map(|&v| v != 0.0).collect())
            .collect()
    }

    /// The number of active weights of `layer`. Panics if `layer` is out of range.
    pub fn active_count(&self, layer: usize) -> usize {
        self.counts[layer]
    }

    /// The current density (active / numel) of every layer.
    pub fn densities(&self) -> Vec<f64> {
        self.layers
            .iter()
            .zip(&self.counts)
            .map(|(l, &c)| c as f64 / l.numel() as f64)
            .collect()
    }

    /// Active weights over all weights of all masked layers.
    pub fn total_density(&self) -> f64 {
        let active: usize = self.counts.iter().sum();
        let total: usize = self.layers.iter().map(LayerShape::numel).sum();
        active as f64 / total as f64
    }

    /// The effective number of optimizer steps between mask updates.
    pub fn update_frequency(&self) -> usize {
        self.update_frequency
    }

    /// The step from which masks are frozen: `round(update_end * total_steps)`.
    pub fn update_end_step(&self) -> usize {
        self.end_step
    }

    fn all_dense(&self) -> bool {
        self.layers
            .iter()
            .zip(&self.counts)
            .all(|(l, &c)| c == l.numel())
    }

    /// `step` counts optimizer steps done so far (1-based after the first step). True when
    /// masks are not fixed (`--fix`), `step > 0`, `step % freq == 0`, `step` is before the end
    /// of the update window ([`Self::update_end_step`]), and the layer set is not all dense.
    pub fn is_update_step(&self, step: usize) -> bool {
        !self.opts.fix
            && step > 0
            && step.is_multiple_of(self.update_frequency)
            && step < self.end_step
            && !self.all_dense()
    }

    /// The fraction of active weights replaced by an update at `step` (cosine or linear decay
    /// from `prune_rate` to `final_prune_rate` over the update window).
    pub fn prune_rate(&self, step: usize) -> f64 {
        self.schedule.rate(step)
    }

    /// Per layer, the share of positions that have ever been active (ITOP exploration rate).
    pub fn itop_rates(&self) -> Vec<f64> {
        self.fired
            .iter()
            .map(|f| f.iter().filter(|&&b| b).count() as f64 / f.len() as f64)
            .collect()
    }

    /// The share of all masked positions that have ever been active.
    pub fn itop_rate(&self) -> f64 {
        let fired: usize = self
            .fired
            .iter()
            .map(|f| f.iter().filter(|&&b| b).count())
            .sum();
        let total: usize = self.fired.iter().map(Vec::len).sum();
        fired as f64 / total as f64
    }

    /// The ever-active masks, one per layer (for checkpoints; see [`Self::set_fired_masks`]).
    pub fn fired_masks(&self) -> &[Vec<bool>] {
        &self.fired
    }

    /// Replaces the ever-active masks, e.g. from a checkpoint. Each must have one entry per
    /// weight and include every currently active position (call after
    /// [`Self::set_masks_from`]).
    pub fn set_fired_masks(&mut self, fired: Vec<Vec<bool>>) -> Result<()> {
        if fired.len() != self.layers.len() {
            bail!(
                "the checkpoint has {} fired (ever-active) masks but the model has {} masked \
                 layers; was it written for another model?",
                fired.len(),
                self.layers.len()
            );
        }
        for (l, (layer, f)) in self.layers.iter().zip(&fired).enumerate() {
            if f.len() != layer.numel() {
                bail!(
                    "the checkpoint's fired mask {l} has {} entries but layer `{}` of shape {:?} \
                     has {} weights; was it written for another model?",
                    f.len(),
                    layer.name,
                    layer.shape,
                    layer.numel()
                );
            }
            if let Some(i) = (0..f.len()).find(|&i| self.masks[l][i] != 0.0 && !f[i]) {
                bail!(
                    "the checkpoint's fired mask for layer `{}` misses position {i}, which is \
                     active; load the masks and fired masks of the same checkpoint",
                    layer.name
                );
            }
        }
        self.fired = fired;
        Ok(())
    }

    /// Every mask state so far: init (step 0), then one record per update.
    pub fn history(&self) -> &[MaskRecord] {
        &self.history
    }

    /// The history as CSV: header
    /// `step,layer,nonzero,numel,density,pruned,grown,prune_rate,itop_rate`, one row per layer
    /// at init (step 0) and after every update.
    pub fn masks_csv(&self) -> String {
        let mut out =
            String::from("step,layer,nonzero,numel,density,pruned,grown,prune_rate,itop_rate\n");
        for r in &self.history {
            for (l, layer) in self.layers.iter().enumerate() {
                let n = layer.numel();
                out.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{}\n",
                    r.step,
                    csv_field(&layer.name),
                    r.nonzero[l],
                    n,
                    r.nonzero[l] as f64 / n as f64,
                    r.pruned[l],
                    r.grown[l],
                    r.prune_rate,
                    r.fired[l] as f64 / n as f64
                ));
            }
        }
        out
    }

    /// The RigL update with the default modes; see [`Self::update_with`].
    pub fn update(
        &mut self,
        step: usize,
        weights: &mut [Vec<f32>],
        grads: &[Vec<f32>],
    ) -> Result<UpdateStats> {
        self.update_with(
            step,
            UpdateInputs {
                weights,
                grads,
                momentum: None,
            },
        )
    }

    /// One mask update at `step`. For every layer that is not fully dense:
    /// `k = round(rate * active)` (capped by the inactive positions); drop `k` active weights by
    /// the death mode (`threshold`: only those with `|w| < T`, at most `k`); regrow positions
    /// that were inactive *before* this update (never the ones just dropped) by the growth
    /// mode: as many as the layer dropped, or, with redistribution, the layer's share of the
    /// total dropped (capped by its inactive positions, largest remainder). Dropped and regrown
    /// weights (and momentum, when passed) are set to 0.0. Deterministic selections break ties
    /// by the lower index; random growth uses the engine's stream. A no-op with `--fix`.
    ///
    /// Errors, changing nothing, if shapes do not match the layers, if a value the modes read
    /// is not finite, or if a momentum-based mode gets no momentum buffers.
    pub fn update_with(&mut self, step: usize, inputs: UpdateInputs<'_>) -> Result<UpdateStats> {
        let UpdateInputs {
            weights,
            grads,
            mut momentum,
        } = inputs;
        // Random growth draws from a stream derived from the engine's seed and the step, so
        // an update does not depend on the updates before it (exact checkpoint resume).
        let mut rng = self.rng.clone();
        rng.set_stream(step as u64);
        self.check_inputs(weights, grads, momentum.as_deref())?;
        let nl = self.layers.len();
        let prune_rate = self.prune_rate(step);
        if self.opts.fix {
            return Ok(UpdateStats {
                step,
                prune_rate,
                pruned: vec![0; nl],
                grown: vec![0; nl],
                counts: self.counts.clone(),
                dropped_positions: vec![Vec::new(); nl],
                regrown_positions: vec![Vec::new(); nl],
            });
        }
        let opts = self.opts.clone();

        // 1. Death, on the masks as they were before this update.
        let mut dropped: Vec<Vec<usize>> = Vec::with_capacity(nl);
        let mut offs: Vec<Vec<usize>> = Vec::with_capacity(nl);
        let mut stat = vec![0.0f64; nl];
        for l in 0..nl {
            let n = self.layers[l].numel();
            let active = self.counts[l];
            let mask = &self.masks[l];
            let (mut on, off): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| mask[i] != 0.0);
            let (w, g) = (&weights[l], &grads[l]);
            stat[l] = match opts.redistribution {
                Redistribution::None | Redistribution::Nonzeros => active as f64,
                Redistribution::Magnitude => mean_abs(&on, w),
                Redistribution::Momentum => {
                    momentum.as_deref().map_or(0.0, |m| mean_abs(&on, &m[l]))
                }
            };
            let k = if active == n {
                0
            } else {
                ((prune_rate * active as f64).round() as usize).min(n - active)
            };
            let mut drop = match opts.death {
                DeathMode::Magnitude => smallest_k(&mut on, k, |i| w[i].abs()).to_vec(),
                DeathMode::Taylor => smallest_k(&mut on, k, |i| (w[i] * g[i]).abs()).to_vec(),
                DeathMode::Threshold => {
                    let t = opts.death_threshold;
                    let mut below: Vec<usize> = on
                        .into_iter()
                        .filter(|&i| (w[i].abs() as f64) < t)
                        .collect();
                    smallest_k(&mut below, k, |i| w[i].abs()).to_vec()
                }
                DeathMode::Set => set_death(on, k, w),
            };
            drop.sort_unstable();
            dropped.push(drop);
            offs.push(off);
        }
        let pruned: Vec<usize> = dropped.iter().map(Vec::len).collect();

        // 2. Growth budgets.
        let budgets = if opts.redistribution == Redistribution::None {
            pruned.clone()
        } else {
            let total: usize = pruned.iter().sum();
            let caps: Vec<usize> = offs.iter().map(Vec::len).collect();
            let weights_for_split = if stat.iter().any(|&s| s > 0.0) {
                stat.clone()
            } else {
                pruned.iter().map(|&p| p as f64).collect()
            };
            split_largest_remainder(total, &weights_for_split, &caps)
        };

        // 3. Growth among the positions inactive before the update.
        let mut regrown: Vec<Vec<usize>> = Vec::with_capacity(nl);
        for l in 0..nl {
            let off = &mut offs[l];
            let gl = budgets[l].min(off.len());
            let mut grow = match opts.growth {
                GrowthMode::Gradient => {
                    let g = &grads[l];
                    largest_k(off, gl, |i| g[i].abs()).to_vec()
                }
                GrowthMode::Momentum => match momentum.as_deref() {
                    Some(m) => {
                        let m = &m[l];
                        largest_k(off, gl, |i| m[i].abs()).to_vec()
                    }
                    None => Vec::new(),
                },
                GrowthMode::Random => sample_from(&mut rng, off, gl),
                GrowthMode::RandomUnfired => {
                    let fired = &self.fired[l];
                    let (unfired, seen): (Vec<usize>, Vec<usize>) =
                        off.iter().partition(|&&i| !fired[i]);
                    if unfired.len() >= gl {
                        sample_from(&mut rng, &unfired, gl)
                    } else {
                        let mut all = unfired;
                        let rest = gl - all.len();
                        all.extend(sample_from(&mut rng, &seen, rest));
                        all
                    }
                }
            };
            grow.sort_unstable();
            regrown.push(grow);
        }

        // 4. Apply.
        for l in 0..nl {
            let w = &mut weights[l];
            for &i in dropped[l].iter().chain(&regrown[l]) {
                w[i] = 0.0;
            }
            if let Some(m) = momentum.as_deref_mut() {
                for &i in dropped[l].iter().chain(&regrown[l]) {
                    m[l][i] = 0.0;
                }
            }
        }
        Ok(self.commit_update(step, prune_rate, dropped, regrown))
    }

    /// Records an update whose positions are already chosen (by [`Self::update_with`] or by
    /// the device update, `super::device`): clears the dropped and sets the regrown positions
    /// of the masks, marks the regrown as fired, updates the counts and the history. The
    /// caller guarantees that `dropped[l]` are active and `regrown[l]` inactive positions of
    /// layer l (both ascending, no duplicates), and zeroes their weights and momentum.
    pub(crate) fn commit_update(
        &mut self,
        step: usize,
        prune_rate: f64,
        dropped: Vec<Vec<usize>>,
        regrown: Vec<Vec<usize>>,
    ) -> UpdateStats {
        let pruned: Vec<usize> = dropped.iter().map(Vec::len).collect();
        let grown: Vec<usize> = regrown.iter().map(Vec::len).collect();
        for l in 0..self.layers.len() {
            let mask = &mut self.masks[l];
            for &i in &dropped[l] {
                mask[i] = 0.0;
            }
            for &i in &regrown[l] {
                mask[i] = 1.0;
                self.fired[l][i] = true;
            }
            self.counts[l] = self.counts[l] - pruned[l] + grown[l];
        }
        tracing::debug!(
            "sparse: mask update at step {step}, prune rate {prune_rate:.4}, {} weights dropped, \
             {} regrown",
            pruned.iter().sum::<usize>(),
            grown.iter().sum::<usize>()
        );
        self.record(step, prune_rate, pruned.clone(), grown.clone());
        UpdateStats {
            step,
            prune_rate,
            pruned,
            grown,
            counts: self.counts.clone(),
            dropped_positions: dropped,
            regrown_positions: regrown,
        }
    }

    fn check_inputs(
        &self,
        weights: &[Vec<f32>],
        grads: &[Vec<f32>],
        momentum: Option<&[Vec<f32>]>,
    ) -> Result<()> {
        let mom_len = momentum.map(<[Vec<f32>]>::len);
        for (what, len) in [
            ("weight", Some(weights.len())),
            ("gradient", Some(grads.len())),
            ("momentum", mom_len),
        ] {
            if let Some(len) = len {
                if len != self.layers.len() {
                    bail!(
                        "sparse mask update got {len} {what} tensors for {} masked layers",
                        self.layers.len()
                    );
                }
            }
        }
        if self.opts.needs_momentum() && momentum.is_none() && !self.opts.fix {
            bail!(
                "--growth momentum and --redistribution momentum need the optimizer's momentum \
                 buffers, but none were passed (use --momentum > 0)"
            );
        }
        let grow_grad = self.opts.growth == GrowthMode::Gradient;
        let taylor = self.opts.death == DeathMode::Taylor;
        let grow_mom = self.opts.growth == GrowthMode::Momentum;
        let redis_mom = self.opts.redistribution == Redistribution::Momentum;
        for (l, layer) in self.layers.iter().enumerate() {
            let n = layer.numel();
            let mlen = momentum.map(|m| m[l].len());
            for (what, len) in [
                ("weights", Some(weights[l].len())),
                ("gradients", Some(grads[l].len())),
                ("momentum values", mlen),
            ] {
                if let Some(len) = len {
                    if len != n {
                        bail!(
                            "sparse mask update: layer `{}` of shape {:?} has {n} weights but \
                             {len} {what} were given",
                            layer.name,
                            layer.shape
                        );
                    }
                }
            }
            if self.counts[l] == n {
                continue;
            }
            let mask = &self.masks[l];
            let w = &weights[l];
            let g = &grads[l];
            let bad = |what: &str, i: usize, v: f32| -> Result<()> {
                bail!(
                    "sparse mask update: layer `{}` has a non-finite {what} ({v}) at position \
                     {i}; training has diverged (try a lower learning rate)",
                    layer.name
                )
            };
            for i in 0..n {
                let on = mask[i] != 0.0;
                if on && !w[i].is_finite() {
                    return bad("weight", i, w[i]);
                }
                if ((on && taylor) || (!on && grow_grad)) && !g[i].is_finite() {
                    return bad("gradient", i, g[i]);
                }
                if let Some(m) = momentum {
                    let v = m[l][i];
                    if ((on && redis_mom) || (!on && grow_mom)) && !v.is_finite() {
                        return bad("momentum", i, v);
                    }
                }
            }
        }
        Ok(())
    }

    /// Replaces the masks, e.g. from a checkpoint. There must be one mask per layer with one
    /// entry per weight. Without redistribution each layer must have exactly the number of
    /// active positions this engine gives it; with redistribution (per-layer counts move by
    /// design) the total must match. Positions of the new masks count as fired.
    pub fn set_masks_from(&mut self, masks: Vec<Vec<bool>>) -> Result<()> {
        if masks.len() != self.layers.len() {
            bail!(
                "the checkpoint has {} sparse masks but the model has {} masked layers; was it \
                 written for another model?",
                masks.len(),
                self.layers.len()
            );
        }
        let mut counts = Vec::with_capacity(masks.len());
        for (l, (layer, mask)) in self.layers.iter().zip(&masks).enumerate() {
            let n = layer.numel();
            if mask.len() != n {
                bail!(
                    "the checkpoint's mask {l} has {} entries but layer `{}` of shape {:?} has \
                     {n} weights; was it written for another model?",
                    mask.len(),
                    layer.name,
                    layer.shape
                );
            }
            let active = mask.iter().filter(|&&b| b).count();
            if self.opts.redistribution == Redistribution::None && active != self.counts[l] {
                bail!(
                    "the checkpoint's mask for layer `{}` has {active} active weights but \
                     --density {} gives it {}; resume with the density the checkpoint was \
                     trained with",
                    layer.name,
                    self.cfg.density,
                    self.counts[l]
                );
            }
            counts.push(active);
        }
        let (have, want) = (
            counts.iter().sum::<usize>(),
            self.counts.iter().sum::<usize>(),
        );
        if have != want {
            bail!(
                "the checkpoint's masks have {have} active weights in total but --density {} \
                 gives {want}; resume with the density the checkpoint was trained with",
                self.cfg.density
            );
        }
        for (f, m) in self.fired.iter_mut().zip(&masks) {
            for (f, &b) in f.iter_mut().zip(m) {
                *f |= b;
            }
        }
        self.masks = masks
            .into_iter()
            .map(|m| m.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect())
            .collect();
        self.counts = counts;
        Ok(())
    }
}

/// SET death: `ceil(k/2)` of the smallest non-negative weights and `floor(k/2)` of the negative
/// weights closest to zero; a side with too few gives its rest to the other. Ties: lower index.
fn set_death(on: Vec<usize>, k: usize, w: &[f32]) -> Vec<usize> {
    let (mut pos, mut neg): (Vec<usize>, Vec<usize>) = on.into_iter().partition(|&i| w[i] >= 0.0);
    let k = k.min(pos.len() + neg.len());
    let mut kp = k - k / 2;
    let mut kn = k / 2;
    if pos.len() < kp {
        kp = pos.len();
        kn = k - kp;
    }
    if neg.len() < kn {
        kn = neg.len();
        kp = k - kn;
    }
    let mut drop = smallest_k(&mut pos, kp, |i| w[i]).to_vec();
    drop.extend_from_slice(largest_k(&mut neg, kn, |i| w[i]));
    drop
}

/// Mean `|v[i]|` over `idx` (0 for an empty set).
fn mean_abs(idx: &[usize], v: &[f32]) -> f64 {
    if idx.is_empty() {
        return 0.0;
    }
    idx.iter().map(|&i| v[i].abs() as f64).sum::<f64>() / idx.len() as f64
}

/// `k` entries of `from` drawn uniformly without replacement.
fn sample_from(rng: &mut Rng, from: &[usize], k: usize) -> Vec<usize> {
    let k = k.min(from.len());
    rand::seq::index::sample(rng, from.len(), k)
        .into_iter()
        .map(|j| from[j])
        .collect()
}

/// Quotes a CSV field when it contains a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// SNIP scores `|w * g|`, with `g` the gradients summed over a few batches; one `Vec` per layer.
pub fn snip_scores(weights: &[Vec<f32>], grads: &[Vec<f32>]) -> Vec<Vec<f32>> {
    weights
        .iter()
        .zip(grads)
        .map(|(w, g)| w.iter().zip(g).map(|(w, g)| (w * g).abs()).collect())
        .collect()
}

/// GraSP keep-scores `w * Hg` (the Hessian-gradient product from the caller): GraSP's score is
/// `S = -w * Hg` and it removes the largest `S`, i.e. keeps the largest `-S`.
pub fn grasp_scores(weights: &[Vec<f32>], hg: &[Vec<f32>]) -> Vec<Vec<f32>> {
    weights
        .iter()
        .zip(hg)
        .map(|(w, h)| w.iter().zip(h).map(|(w, h)| w * h).collect())
        .collect()
}

/// Global-magnitude scores `|w|`.
pub fn magnitude_scores(weights: &[Vec<f32>]) -> Vec<Vec<f32>> {
    weights
        .iter()
        .map(|w| w.iter().map(|w| w.abs()).collect())
        .collect()
}
