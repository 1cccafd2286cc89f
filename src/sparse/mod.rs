//! Dynamic sparse training: owns the weight masks (initial ERK densities, prune/grow updates,
//! the prune-rate schedule) and nothing else. Models and the training loop ask it for masks.
//!
//! The module is pure host code on `f32` slices: on a mask-update step the training loop copies
//! the masked layers' weights and gradients to host memory, calls [`SparseEngine::update`],
//! copies the weights back and multiplies the new masks in.
//!
//! - [`erk`]: layer shapes, Erdős–Rényi-Kernel (ERK) per-layer densities, exact counts.
//! - [`schedule`]: the cosine-decayed prune rate.
//! - [`engine`]: the masks and the RigL prune (smallest |w|) / regrow (largest |grad|) update.

pub mod engine;
pub mod erk;
pub mod flops;
pub mod schedule;
mod select;

pub use engine::{SparseConfig, SparseEngine, UpdateStats};
pub use erk::{erk_densities, layer_counts, LayerShape};
pub use schedule::CosineDecay;
