//! Dynamic sparse training: owns the weight masks (initial per-layer densities, prune/grow
//! updates, the prune-rate schedule, ever-active masks and the update history) and nothing
//! else. Models and the training loop ask it for masks.
//!
//! The engine is pure host code on `f32` slices: on a mask-update step the training loop copies
//! the masked layers' weights, gradients (and momentum buffers, for the modes that read them)
//! to host memory, calls [`SparseEngine::update_with`], copies them back and multiplies the new
//! masks in. On a GPU (or with `REST_MASK_UPDATE=device`), [`device`] computes the same update
//! with candle ops where the tensors live and brings back one byte per weight.
//!
//! - [`modes`]: the mode choices (init, death, growth, redistribution, schedule) and defaults.
//! - [`erk`]: layer shapes, ERK / ER / uniform / uniform-plus densities, exact counts.
//! - [`schedule`]: the cosine- or linearly-decayed prune rate.
//! - [`options`]: the run's sparse-training section (`--density`, schedule, modes, kernels).
//! - [`engine`]: the masks and the update (RigL, SET, SNFS, ITOP), history and CSV report.

pub mod device;
pub mod engine;
pub mod erk;
pub mod flops;
pub mod modes;
pub mod options;
mod redistribute;
pub mod schedule;
mod select;

pub use engine::{
    grasp_scores, magnitude_scores, snip_scores, MaskRecord, SparseConfig, SparseEngine,
    UpdateInputs, UpdateStats,
};
pub use erk::{
    erk_densities, init_densities, layer_counts, LayerShape, UNIFORM_PLUS_MIN_CLASSIFIER,
};
pub use modes::{DeathMode, DecaySchedule, DstOptions, GrowthMode, Redistribution, SparseInit};
pub use options::SparseOptions;
pub use schedule::{CosineDecay, LinearDecay, PruneSchedule};
