//! Models: the networks REST is evaluated with, built from `crate::nn` layers, and their
//! registry. A model is its forward pass plus its list of layers ([`Model::layers`]), from
//! which its parameters (with which of them are maskable conv/linear weights), its buffers
//! (restored by name) and its FLOPs follow, so the optimizer, the sparse engine and
//! checkpoints never need to know its shape. Adding a model is one file (with its
//! `ModelEntry`) plus one entry in the `models!` list below (its `ModelKind` spelling).

pub mod cnn;
pub mod mlp;
pub mod resnet;

use crate::config::{Stem, TrainConfig};
use crate::data::transform::BatchLayout;
pub use crate::nn::LayerFlops;
use crate::nn::{layer, Buffer, Layer, Param, ParamKind};
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Declares the registered models: `ModelKind` with one variant per model (its doc is the
/// `--model` help; its name the clap/serde spelling and `as_str`) and each kind's
/// [`ModelEntry`].
macro_rules! models {
    ($($(#[$doc:meta])* $variant:ident = $name:literal => $entry:expr,)*) => {
        /// Network architecture (`--model`), one per registered model.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
        pub enum ModelKind {
            $($(#[$doc])* #[serde(rename = $name)] #[value(name = $name)] $variant,)*
        }

        impl ModelKind {
            /// Every registered model, in registration order.
            pub const ALL: &'static [ModelKind] = &[$(ModelKind::$variant),*];

            /// The spelling in flags, config files and run names.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ModelKind::$variant => $name,)*
                }
            }

            /// How to build this model, and its `rest bench` defaults.
            pub fn entry(self) -> &'static ModelEntry {
                match self {
                    $(ModelKind::$variant => &$entry,)*
                }
            }
        }
    };
}

models! {
    /// REST's Colored-MNIST CNN: three stride-2 4x4 convolutions with BatchNorm, global
    /// average pooling, linear classifier.
    Cnn = "cnn" => cnn::ENTRY,
    /// LfF's MLP: 3x28x28 -> 100 -> 100 -> 100 -> classes, ReLU.
    Mlp = "mlp" => mlp::ENTRY,
    /// ResNet-10 (BasicBlock, [1, 1, 1, 1]) of variable width (`width`).
    Resnet10 = "resnet10" => resnet::ENTRY,
    /// ResNet-18 (BasicBlock, [2, 2, 2, 2]) of variable width (`width`).
    Resnet18 = "resnet18" => resnet::ENTRY,
    /// ResNet-50 (Bottleneck, [3, 4, 6, 3]) of variable width (`width`).
    Resnet50 = "resnet50" => resnet::ENTRY,
}

/// Builds a freshly initialised model of a spec for images of `input = (c, h, w)` with
/// `num_classes` outputs, drawing its initial weights from the RNG.
pub type BuildFn = fn(
    spec: &ModelSpec,
    input: (usize, usize, usize),
    num_classes: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Box<dyn Model>>;

/// A registered model: its constructor and its `rest bench` defaults.
#[derive(Debug, Clone, Copy)]
pub struct ModelEntry {
    pub build: BuildFn,
    /// `rest bench`'s default batch size.
    pub bench_batch: usize,
    /// `rest bench`'s input `(channels, height, width)`.
    pub bench_input: (usize, usize, usize),
    /// Whether the model takes images of any size (`rest bench --hw`).
    pub any_size: bool,
}

/// A classifier taking `[N, C, H, W]` `f32` images and returning logits [N, classes].
pub trait Model: Send + Sync {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// The layers, in initialisation order, each once; applied one after the other they
    /// give the model's FLOPs (a layer with a branch, like a residual block, is one composite
    /// layer). For bookkeeping only: the forward pass calls its layers directly.
    fn layers(&self) -> Vec<&dyn Layer>;

    /// Every trainable parameter, in a fixed order (the layers').
    fn params(&self) -> Vec<Param> {
        layer::params_of(&self.layers())
    }

    /// Non-trainable state (BatchNorm running statistics), in a fixed order (the layers').
    fn buffers(&self) -> Result<Vec<Buffer>> {
        layer::buffers_of(&self.layers())
    }

    /// Restores buffers saved from `buffers()`, by name, in any order: each of the model's
    /// buffers must be given once, with its shape, and no other (else an error naming it).
    fn set_buffers(&self, buffers: &[Buffer]) -> Result<()> {
        layer::restore_buffers(&self.layers(), buffers)
    }

    /// Per-layer FLOPs of one forward pass for one sample of `input = (c, h, w)`.
    fn layer_flops(&self, input: (usize, usize, usize)) -> Vec<LayerFlops> {
        layer::flops_of(&self.layers(), input)
    }

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
    (spec.kind.entry().build)(&spec, input, num_classes, rng, device)
}
