//! The choices of dynamic sparse training, named as in sparse_learning / ITOP / RigL / SET /
//! SNFS: initial layer densities, death (prune) and growth criteria, redistribution of the
//! regrowth budget between layers, the prune-rate schedule, and when masks freeze.

use serde::{Deserialize, Serialize};

/// How the initial per-layer densities (and, for score-based modes, the initial masks) are
/// chosen (`--sparse-init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SparseInit {
    /// Erdős–Rényi-Kernel: density proportional to `((sum of dims) / (product of dims))^p`
    /// (`p` = `--erk-power-scale`).
    Erk,
    /// Erdős–Rényi: density proportional to `(n_in + n_out) / (n_in * n_out)`, kernel dims
    /// ignored.
    Er,
    /// The same density in every layer.
    Uniform,
    /// First layer dense, classifier (last layer) at >= 20 % when the total density is below
    /// 20 %, the other layers uniform so the total is exact (Gale et al. 2019).
    UniformPlus,
    /// Global top scores `|w * g|` (gradients summed over a few batches; Lee et al. 2019).
    Snip,
    /// Global top scores `w * Hg` (GraSP removes the largest `-w * Hg`; Wang et al. 2020).
    Grasp,
    /// Global top `|w|`.
    GlobalMagnitude,
}

impl SparseInit {
    /// Whether the initial masks come from caller-computed per-weight scores
    /// ([`crate::sparse::SparseEngine::new_from_scores`]).
    pub fn is_score_based(self) -> bool {
        matches!(
            self,
            SparseInit::Snip | SparseInit::Grasp | SparseInit::GlobalMagnitude
        )
    }
}

/// Which active weights an update drops (`--death`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DeathMode {
    /// The smallest `|w|` (RigL, SNFS).
    Magnitude,
    /// SET: half of the count from the smallest non-negative weights, half from the negative
    /// weights closest to zero; a side with too few gives its rest to the other.
    Set,
    /// Every active `|w| < --death-threshold`, at most the prune-rate count (smallest first).
    Threshold,
    /// The smallest `|w * grad|` (first-order Taylor estimate of the loss change).
    Taylor,
}

/// Which inactive positions an update regrows (`--growth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GrowthMode {
    /// The largest `|grad|` (RigL).
    Gradient,
    /// The largest `|momentum|` (SNFS).
    Momentum,
    /// Uniformly at random (SET).
    Random,
    /// Uniformly at random among positions never active so far, then among the rest (ITOP).
    RandomUnfired,
}

/// How the total regrowth budget (= weights dropped) is split between layers
/// (`--redistribution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Redistribution {
    /// Each layer regrows what it dropped; per-layer counts never change.
    None,
    /// In proportion to the layer's mean `|momentum|` over its active weights (SNFS).
    Momentum,
    /// In proportion to the layer's mean `|w|` over its active weights.
    Magnitude,
    /// In proportion to the layer's number of active weights.
    Nonzeros,
}

/// The shape of the prune-rate decay (`--decay-schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DecaySchedule {
    /// `final + (init - final) * (1 + cos(pi * t / T)) / 2`.
    Cosine,
    /// `init + (final - init) * t / T`.
    Linear,
}

/// Every mode choice of the engine beyond [`crate::sparse::SparseConfig`]. The default is
/// RigL as REST uses it: ERK, magnitude death, gradient growth, no redistribution, cosine
/// decay over the whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DstOptions {
    pub sparse_init: SparseInit,
    /// Keep the first layer dense in every init mode (the others rescaled so the total stays).
    pub dense_first_layer: bool,
    pub death: DeathMode,
    /// `|w|` below which `--death threshold` drops an active weight.
    pub death_threshold: f64,
    pub growth: GrowthMode,
    pub redistribution: Redistribution,
    pub decay_schedule: DecaySchedule,
    /// Fraction of the run in (0, 1] after which masks freeze; the prune rate decays over
    /// `update_end * total_steps`.
    pub update_end: f64,
    /// Static sparse training: the initial masks never change.
    pub fix: bool,
}

impl Default for DstOptions {
    /// The defaults of the `--sparse-init`, `--death`, ... flags (`SparseOptions`).
    fn default() -> Self {
        super::SparseOptions::default().dst_options()
    }
}

impl DstOptions {
    /// Checks the values; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.death_threshold.is_finite() && self.death_threshold >= 0.0) {
            anyhow::bail!(
                "--death-threshold must be a finite |w| >= 0, got {}",
                self.death_threshold
            );
        }
        if !(self.update_end.is_finite() && self.update_end > 0.0 && self.update_end <= 1.0) {
            anyhow::bail!(
                "--update-end must be a fraction of the run in (0, 1] (1 = update masks until \
                 the end), got {}",
                self.update_end
            );
        }
        Ok(())
    }

    /// Whether an update needs the optimizer's momentum buffers.
    pub fn needs_momentum(&self) -> bool {
        self.growth == GrowthMode::Momentum || self.redistribution == Redistribution::Momentum
    }
}
