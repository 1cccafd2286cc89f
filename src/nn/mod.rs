//! Neural-network layers: one small file per layer, each owning its parameters as candle
//! `Var`s. Models are built only from these types, so the compute behind a layer (candle's
//! ops today, our own dense/sparse kernels from `crate::kernels`) can change without touching
//! the models.

pub mod batchnorm;
pub mod conv2d;
pub mod init;
pub mod linear;

pub use batchnorm::BatchNorm2d;
pub use conv2d::Conv2d;
pub use linear::Linear;

use candle_core::{Tensor, Var};

/// What a parameter is, which decides whether the sparse engine masks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A conv or linear weight: masked under dynamic sparse training.
    Weight,
    /// A bias, or a BatchNorm scale/shift: never masked.
    Other,
}

/// A named trainable parameter.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
}

/// A named non-trainable state tensor (BatchNorm running statistics).
#[derive(Debug, Clone)]
pub struct Buffer {
    pub name: String,
    pub tensor: Tensor,
}
