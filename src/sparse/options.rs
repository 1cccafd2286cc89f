//! The dynamic-sparse-training section of a run's options (`SparseOptions`: `--density`, the
//! update schedule, the modes and the kernel choice), and the engine settings it implies.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::{
    DeathMode, DecaySchedule, DstOptions, GrowthMode, Redistribution, SparseConfig, SparseInit,
};
use crate::kernels::KernelMode;

/// How sparse a run is and how its masks change (RigL as REST runs it by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[command(next_help_heading = "Sparse training")]
pub struct SparseOptions {
    /// Overall density of conv/linear weights in (0, 1]; 1 = dense training.
    #[arg(long, value_name = "D", default_value_t = 0.05)]
    pub density: f64,
    /// Steps between mask updates (paper: 1000; scaled down when a run has fewer than 10
    /// updates).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub update_frequency: usize,
    /// Initial fraction of active weights pruned and regrown at each update.
    #[arg(long, value_name = "RATE", default_value_t = 0.5)]
    pub prune_rate: f64,
    /// The prune rate the decay schedule reaches at the end of the updates.
    #[arg(long, value_name = "RATE", default_value_t = 0.005)]
    pub final_prune_rate: f64,
    /// ERK power scale (1 = ERK, 0 = uniform).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub erk_power_scale: f64,
    /// Kernels for sparse layers: auto (sparse at layer density <= 0.3), dense (masked dense
    /// weights, like public DST code) or sparse.
    #[arg(long, value_enum, default_value_t = KernelMode::Auto)]
    pub kernels: KernelMode,
    /// Initial layer densities: erk, er, uniform, uniform-plus, or masks from scores: snip,
    /// grasp, global-magnitude.
    #[arg(long, value_enum, default_value_t = SparseInit::Erk)]
    pub sparse_init: SparseInit,
    /// Keep the first masked layer dense (the others rescaled so the density stays).
    #[arg(long)]
    pub dense_first_layer: bool,
    /// Which weights a mask update drops: magnitude, set, threshold, taylor.
    #[arg(long, value_enum, default_value_t = DeathMode::Magnitude)]
    pub death: DeathMode,
    /// |w| below which `--death threshold` drops a weight.
    #[arg(long, value_name = "T", default_value_t = 0.001)]
    pub death_threshold: f64,
    /// Which positions a mask update regrows: gradient, momentum, random, random-unfired.
    #[arg(long, value_enum, default_value_t = GrowthMode::Gradient)]
    pub growth: GrowthMode,
    /// Split of the regrowth between layers: none, momentum, magnitude, nonzeros.
    #[arg(long, value_enum, default_value_t = Redistribution::None)]
    pub redistribution: Redistribution,
    /// Prune-rate decay: cosine or linear.
    #[arg(long, value_enum, default_value_t = DecaySchedule::Cosine)]
    pub decay_schedule: DecaySchedule,
    /// Fraction of training after which masks freeze, in (0, 1].
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub update_end: f64,
    /// Static sparse training: never update the masks.
    #[arg(long)]
    pub fix: bool,
    /// Place each layer's initial active weights at its largest-magnitude weights (e.g. the
    /// pretrained ones of --init-from) instead of at random, under the layer densities of
    /// --sparse-init (erk, er, uniform, uniform-plus).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub magnitude_masks: bool,
}

impl Default for SparseOptions {
    fn default() -> Self {
        crate::util::args_defaults()
    }
}

impl SparseOptions {
    /// True when dynamic sparse training is on (density below 1).
    pub fn is_sparse(&self) -> bool {
        self.density < 1.0
    }

    /// The engine's mode choices.
    pub fn dst_options(&self) -> DstOptions {
        DstOptions {
            sparse_init: self.sparse_init,
            dense_first_layer: self.dense_first_layer,
            death: self.death,
            death_threshold: self.death_threshold,
            growth: self.growth,
            redistribution: self.redistribution,
            decay_schedule: self.decay_schedule,
            update_end: self.update_end,
            fix: self.fix,
        }
    }

    /// The engine's settings over a run of `total_steps` optimizer steps.
    pub fn engine_config(&self, total_steps: usize) -> SparseConfig {
        SparseConfig {
            density: self.density,
            prune_rate: self.prune_rate,
            final_prune_rate: self.final_prune_rate,
            update_frequency: self.update_frequency,
            total_steps,
            erk_power_scale: self.erk_power_scale,
        }
    }

    /// Checks every value; the error names the flag. Whether the optimizer keeps the momentum
    /// that some modes read is the run's check (`DstOptions::needs_momentum`).
    pub fn validate(&self) -> Result<()> {
        if self.magnitude_masks && self.sparse_init.is_score_based() {
            bail!(
                "--magnitude-masks places masks under the layer densities of --sparse-init erk, \
                 er, uniform or uniform-plus; --sparse-init {:?} chooses positions itself \
                 (global-magnitude: the largest weights of the whole network)",
                self.sparse_init
            );
        }
        let d = self.density;
        if !(d.is_finite() && d > 0.0 && d <= 1.0) {
            bail!("--density must be in (0, 1] (1 = dense, 0.05 = 5 % of weights), got {d}");
        }
        if self.update_frequency < 1 {
            bail!("--update-frequency must be at least 1");
        }
        let p = self.prune_rate;
        if !(p.is_finite() && (0.0..1.0).contains(&p)) {
            bail!("--prune-rate must be in [0, 1), got {p}");
        }
        let f = self.final_prune_rate;
        if !(f.is_finite() && (0.0..1.0).contains(&f)) {
            bail!("--final-prune-rate must be in [0, 1), got {f}");
        }
        let e = self.erk_power_scale;
        if !(e.is_finite() && e >= 0.0) {
            bail!("--erk-power-scale must be >= 0, got {e}");
        }
        self.dst_options().validate()
    }
}
