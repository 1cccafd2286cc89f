//! The sparse-training engine: owns one exact-count mask per layer and applies the RigL update
//! (Evci et al. 2020) used by REST: drop the active weights with the smallest magnitude, regrow
//! as many previously inactive positions with the largest gradient magnitude, at a prune rate
//! that decays with a cosine schedule. Every layer's number of active weights never changes.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::erk::{erk_densities, layer_counts, validate_layers, LayerShape};
use super::schedule::CosineDecay;
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
    /// Positions regrown per layer (always equal to `pruned`).
    pub grown: Vec<usize>,
}

/// The masks of all sparsified layers and the rules that change them.
#[derive(Clone, Debug)]
pub struct SparseEngine {
    layers: Vec<LayerShape>,
    cfg: SparseConfig,
    update_frequency: usize,
    schedule: CosineDecay,
    /// Per layer: 1.0 active / 0.0 inactive.
    masks: Vec<Vec<f32>>,
    /// Per layer: the number of 1.0 entries in `masks`, fixed for the whole run.
    counts: Vec<usize>,
}

impl SparseEngine {
    /// Draws the initial masks: layer l gets exactly `layer_counts[l]` active positions (ERK
    /// densities for `cfg.density`), chosen uniformly at random. If
    /// `total_steps / update_frequency < 10`, the frequency is scaled down to
    /// `max(1, total_steps / 10)` and a `tracing::info!` line says so.
    pub fn new(layers: Vec<LayerShape>, cfg: SparseConfig, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        if layers.is_empty() {
            bail!("sparse training needs at least one weight layer to mask; the model has none");
        }
        validate_layers(&layers)?;
        let densities = erk_densities(&layers, cfg.density, cfg.erk_power_scale)?;
        let counts = layer_counts(&layers, &densities);

        let mut update_frequency = cfg.update_frequency;
        if cfg.total_steps / update_frequency < MIN_UPDATES_PER_RUN {
            let scaled = (cfg.total_steps / MIN_UPDATES_PER_RUN).max(1);
            if scaled != update_frequency {
                tracing::info!(
                    "sparse: a run of {} steps would update the masks only {} times every {} \
                     steps; updating every {} steps instead",
                    cfg.total_steps,
                    cfg.total_steps / update_frequency,
                    update_frequency,
                    scaled
                );
                update_frequency = scaled;
            }
        }

        let masks = layers
            .iter()
            .zip(&counts)
            .map(|(layer, &count)| {
                let n = layer.numel();
                if count == n {
                    return vec![1.0; n];
                }
                let mut mask = vec![0.0f32; n];
                for i in rand::seq::index::sample(rng, n, count) {
                    mask[i] = 1.0;
                }
                mask
            })
            .collect();
        for (layer, (&count, d)) in layers.iter().zip(counts.iter().zip(&densities)) {
            tracing::debug!(
                "sparse: layer {} {:?}: ERK density {d:.4}, {count} of {} weights active",
                layer.name,
                layer.shape,
                layer.numel()
            );
        }

        let schedule = CosineDecay::new(cfg.prune_rate, cfg.final_prune_rate, cfg.total_steps);
        Ok(Self {
            layers,
            cfg,
            update_frequency,
            schedule,
            masks,
            counts,
        })
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

    fn all_dense(&self) -> bool {
        self.layers
            .iter()
            .zip(&self.counts)
            .all(|(l, &c)| c == l.numel())
    }

    /// `step` counts optimizer steps done so far (1-based after the first step). True when
    /// `step > 0`, `step % freq == 0` and `step < total_steps`, and the layer set is not all
    /// dense.
    pub fn is_update_step(&self, step: usize) -> bool {
        step > 0
            && step.is_multiple_of(self.update_frequency)
            && step < self.cfg.total_steps
            && !self.all_dense()
    }

    /// The fraction of active weights replaced by an update at `step` (cosine decay from
    /// `prune_rate` to `final_prune_rate` over `total_steps`).
    pub fn prune_rate(&self, step: usize) -> f64 {
        self.schedule.rate(step)
    }

    /// RigL update of every layer that is not fully dense: `k = round(rate * active)` (capped
    /// so there are enough inactive positions); drop the `k` active weights with the smallest
    /// `|w|`; regrow `k` positions among those that were inactive *before* this update (never
    /// the ones just dropped) with the largest `|grad|`; set dropped and regrown weights to 0.0
    /// in `weights` (regrown weights start at zero). Ties are broken by the lower index first.
    ///
    /// `weights` and `grads` hold one host copy per layer, in the order of [`Self::layers`].
    /// Errors, changing nothing, if their shapes do not match the layers or if an active weight
    /// or an inactive position's gradient is not finite. Active counts are exactly preserved.
    pub fn update(
        &mut self,
        step: usize,
        weights: &mut [Vec<f32>],
        grads: &[Vec<f32>],
    ) -> Result<UpdateStats> {
        self.check_inputs(weights, grads)?;
        let prune_rate = self.prune_rate(step);
        let mut pruned = vec![0; self.layers.len()];
        let mut grown = vec![0; self.layers.len()];

        for l in 0..self.layers.len() {
            let n = self.layers[l].numel();
            let active = self.counts[l];
            let inactive = n - active;
            let k = ((prune_rate * active as f64).round() as usize).min(inactive);
            if k == 0 {
                continue;
            }
            let (w, g, mask) = (&mut weights[l], &grads[l], &mut self.masks[l]);
            let (mut on, mut off): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| mask[i] != 0.0);
            // Both selections are made on the masks as they were before this update, so a
            // weight dropped now can never be regrown in the same update.
            let drop = smallest_k(&mut on, k, |i| w[i].abs());
            let grow = largest_k(&mut off, k, |i| g[i].abs());
            for &i in drop {
                mask[i] = 0.0;
                w[i] = 0.0;
            }
            for &i in grow {
                mask[i] = 1.0;
                w[i] = 0.0;
            }
            pruned[l] = drop.len();
            grown[l] = grow.len();
        }
        tracing::debug!(
            "sparse: mask update at step {step}, prune rate {prune_rate:.4}, {} weights replaced",
            pruned.iter().sum::<usize>()
        );
        Ok(UpdateStats {
            step,
            prune_rate,
            pruned,
            grown,
        })
    }

    fn check_inputs(&self, weights: &[Vec<f32>], grads: &[Vec<f32>]) -> Result<()> {
        for (what, len) in [("weight", weights.len()), ("gradient", grads.len())] {
            if len != self.layers.len() {
                bail!(
                    "sparse mask update got {len} {what} tensors for {} masked layers",
                    self.layers.len()
                );
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let n = layer.numel();
            for (what, len) in [("weights", weights[l].len()), ("gradients", grads[l].len())] {
                if len != n {
                    bail!(
                        "sparse mask update: layer `{}` of shape {:?} has {n} weights but {len} \
                         {what} were given",
                        layer.name,
                        layer.shape
                    );
                }
            }
            let mask = &self.masks[l];
            if self.counts[l] == n {
                continue;
            }
            let bad_weight = (0..n).find(|&i| mask[i] != 0.0 && !weights[l][i].is_finite());
            let bad_grad = (0..n).find(|&i| mask[i] == 0.0 && !grads[l][i].is_finite());
            if let Some(i) = bad_weight {
                bail!(
                    "sparse mask update: layer `{}` has a non-finite weight ({}) at position {i}; \
                     training has diverged (try a lower learning rate)",
                    layer.name,
                    weights[l][i]
                );
            }
            if let Some(i) = bad_grad {
                bail!(
                    "sparse mask update: layer `{}` has a non-finite gradient ({}) at position \
                     {i}; training has diverged (try a lower learning rate)",
                    layer.name,
                    grads[l][i]
                );
            }
        }
        Ok(())
    }

    /// Replaces the masks, e.g. from a checkpoint. There must be one mask per layer with one
    /// entry per weight, and each layer must have exactly the number of active positions this
    /// engine's density gives it.
    pub fn set_masks_from(&mut self, masks: Vec<Vec<bool>>) -> Result<()> {
        if masks.len() != self.layers.len() {
            bail!(
                "the checkpoint has {} sparse masks but the model has {} masked layers; was it \
                 written for another model?",
                masks.len(),
                self.layers.len()
            );
        }
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
            if active != self.counts[l] {
                bail!(
                    "the checkpoint's mask for layer `{}` has {active} active weights but \
                     --density {} gives it {}; resume with the density the checkpoint was \
                     trained with",
                    layer.name,
                    self.cfg.density,
                    self.counts[l]
                );
            }
        }
        self.masks = masks
            .into_iter()
            .map(|m| m.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect())
            .collect();
        Ok(())
    }
}
