//! Models: the networks REST is evaluated with, built from `crate::nn` layers. A model
//! exposes its parameters (with which of them are maskable conv/linear weights) and its
//! buffers, so the optimizer, the sparse engine and checkpoints never need to know its shape.

pub mod cnn;
pub mod mlp;
pub mod resnet;

use crate::config::{ModelKind, Stem, TrainConfig};
use crate::data::transform::BatchLayout;
use crate::nn::{Buffer, Param, ParamKind};
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// The compute of one layer for one input sample, for FLOPs accounting (`crate::sparse::flops`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFlops {
    /// Layer name (for a conv/linear layer, its weight parameter is `<name>.weight`).
    pub name: String,
    /// For conv/linear layers: the weight parameter name and the number of output positions
    /// per sample (OH*OW for a conv, 1 for a linear layer): the layer costs
    /// 2 x nonzero weights x positions (a multiply-add is 2 FLOPs), plus its bias.
    pub weight: Option<(String, usize)>,
    /// FLOPs that do not depend on sparsity: bias (1 per output), BatchNorm (2 per element,
    /// folded scale and shift), ReLU (1 per element), average pooling (1 per input
    /// element), max pooling (k*k per output), residual additions (1 per element).
    pub other: f64,
}

/// A classifier taking `[N, C, H, W]` `f32` images and returning logits [N, classes].
pub trait Model: Send + Sync {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Every trainable parameter, in a fixed order.
    fn params(&self) -> Vec<Param>;
    /// Non-trainable state (BatchNorm running statistics), in a fixed order.
    fn buffers(&self) -> Result<Vec<Buffer>>;
    /// Restores buffers saved from `buffers()` (same names and order).
    fn set_buffers(&self, buffers: &[Buffer]) -> Result<()>;

    /// Per-layer FLOPs of one forward pass for one sample of `input = (c, h, w)`.
    fn layer_flops(&self, input: (usize, usize, usize)) -> Vec<LayerFlops>;

    /// The memory layout in which the model runs fastest on its batches (the data loader
    /// prepares them so; [`Model::forward`] takes any layout).
    fn input_layout(&self) -> BatchLayout {
        BatchLayout::Nchw
    }

    /// The maskable conv/linear weights, in order.
    fn weights(&self) -> Vec<Param> {
        self.params()
            .into_iter()
            .filter(|p| p.kind == ParamKind::Weight)
            .collect()
    }
}

/// What `build` constructs: the architecture and, for ResNets, its width and stem (ignored
/// by the other models). A bare `ModelKind` converts with ResNet defaults (width 64,
/// ImageNet stem); a `&TrainConfig` converts with its `model`, `width` and `stem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub width: usize,
    pub stem: Stem,
}

impl From<ModelKind> for ModelSpec {
    fn from(kind: ModelKind) -> Self {
        Self {
            kind,
            width: 64,
            stem: Stem::Imagenet,
        }
    }
}

impl From<&TrainConfig> for ModelSpec {
    fn from(cfg: &TrainConfig) -> Self {
        Self {
            kind: cfg.model,
            width: cfg.width,
            stem: cfg.stem,
        }
    }
}

/// Builds a freshly initialised model for images of `input = (channels, height, width)`.
pub fn build(
    spec: impl Into<ModelSpec>,
    input: (usize, usize, usize),
    num_classes: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Box<dyn Model>> {
    if num_classes < 2 {
        bail!("a classifier needs at least 2 classes, the dataset has {num_classes}");
    }
    let spec = spec.into();
    Ok(match spec.kind {
        ModelKind::Cnn => Box::new(cnn::Cnn::new(input.0, num_classes, rng, device)?),
        ModelKind::Mlp => Box::new(mlp::Mlp::new(
            input.0 * input.1 * input.2,
            num_classes,
            rng,
            device,
        )?),
        ModelKind::Resnet10 | ModelKind::Resnet18 | ModelKind::Resnet50 => Box::new(
            resnet::ResNet::from_spec(&spec, input, num_classes, rng, device)?,
        ),
    })
}
