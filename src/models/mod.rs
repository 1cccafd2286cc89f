//! Models: the networks REST is evaluated with, built from `crate::nn` layers. A model
//! exposes its parameters (with which of them are maskable conv/linear weights) and its
//! buffers, so the optimizer, the sparse engine and checkpoints never need to know its shape.

pub mod cnn;
pub mod mlp;

use crate::config::ModelKind;
use crate::nn::{Buffer, Param, ParamKind};
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// A classifier taking NCHW `f32` images in [0, 1] and returning logits [N, classes].
pub trait Model: Send + Sync {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Every trainable parameter, in a fixed order.
    fn params(&self) -> Vec<Param>;
    /// Non-trainable state (BatchNorm running statistics), in a fixed order.
    fn buffers(&self) -> Result<Vec<Buffer>>;
    /// Restores buffers saved from `buffers()` (same names and order).
    fn set_buffers(&self, buffers: &[Buffer]) -> Result<()>;

    /// The maskable conv/linear weights, in order.
    fn weights(&self) -> Vec<Param> {
        self.params()
            .into_iter()
            .filter(|p| p.kind == ParamKind::Weight)
            .collect()
    }
}

/// Builds a freshly initialised model for images of `input = (channels, height, width)`.
pub fn build(
    kind: ModelKind,
    input: (usize, usize, usize),
    num_classes: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Box<dyn Model>> {
    if num_classes < 2 {
        bail!("a classifier needs at least 2 classes, the dataset has {num_classes}");
    }
    Ok(match kind {
        ModelKind::Cnn => Box::new(cnn::Cnn::new(input.0, num_classes, rng, device)?),
        ModelKind::Mlp => Box::new(mlp::Mlp::new(
            input.0 * input.1 * input.2,
            num_classes,
            rng,
            device,
        )?),
    })
}
