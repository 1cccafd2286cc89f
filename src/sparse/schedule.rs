//! The prune-rate schedule: a cosine decay from the initial to the final prune rate over the
//! run, as in RigL (Evci et al. 2020) and REST, or a linear decay (sparse_learning).

use std::f64::consts::PI;

/// Cosine decay of the prune rate from `init` to `final_rate` over `total_steps`:
/// `rate(t) = final + (init - final) * (1 + cos(pi * t / total)) / 2`, and `final` for
/// `t >= total` (also when `total_steps` is 0).
#[derive(Clone, Debug, PartialEq)]
pub struct CosineDecay {
    init: f64,
    final_rate: f64,
    total_steps: usize,
}

impl CosineDecay {
    /// A schedule starting at `init` (step 0) and reaching `final_rate` at `total_steps`.
    pub fn new(init: f64, final_rate: f64, total_steps: usize) -> Self {
        Self {
            init,
            final_rate,
            total_steps,
        }
    }

    /// The rate after `step` optimizer steps.
    pub fn rate(&self, step: usize) -> f64 {
        if step >= self.total_steps {
            return self.final_rate;
        }
        let progress = step as f64 / self.total_steps as f64;
        self.final_rate + (self.init - self.final_rate) * (1.0 + (PI * progress).cos()) / 2.0
    }
}

/// Linear decay of the prune rate from `init` to `final_rate` over `total_steps`:
/// `rate(t) = init + (final - init) * t / total`, and `final` for `t >= total`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearDecay {
    init: f64,
    final_rate: f64,
    total_steps: usize,
}

impl LinearDecay {
    /// A schedule starting at `init` (step 0) and reaching `final_rate` at `total_steps`.
    pub fn new(init: f64, final_rate: f64, total_steps: usize) -> Self {
        Self {
            init,
            final_rate,
            total_steps,
        }
    }

    /// The rate after `step` optimizer steps.
    pub fn rate(&self, step: usize) -> f64 {
        if step >= self.total_steps {
            return self.final_rate;
        }
        let progress = step as f64 / self.total_steps as f64;
        self.init + (self.final_rate - self.init) * progress
    }
}

/// The prune-rate schedule an engine uses (`--decay-schedule`).
#[derive(Clone, Debug, PartialEq)]
pub enum PruneSchedule {
    Cosine(CosineDecay),
    Linear(LinearDecay),
}

impl PruneSchedule {
    /// The rate after `step` optimizer steps.
    pub fn rate(&self, step: usize) -> f64 {
        match self {
            PruneSchedule::Cosine(c) => c.rate(step),
            PruneSchedule::Linear(l) => l.rate(step),
        }
    }
}
