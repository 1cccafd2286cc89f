//! Models: the networks REST is evaluated with, built from `crate::nn` layers, and their
//! registry. A model is its forward pass plus its list of layers ([`Model::layers`]), from
//! which its parameters (with which of them are maskable conv/linear weights), its buffers
//! (restored by name) and its FLOPs follow, so the optimizer, the sparse engine and
//! checkpoints never need to know its shape. Adding a model is one file (with its
//! `ModelEntry`) plus one entry in the `models!` list below (its `ModelKind` spelling).

pub mod cnn;
pub mod init;
pub mod mlp;
pub mod pth;
pub mod resnet;

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

/// The input stem of a ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Stem {
    /// torchvision's stem: 7x7 stride-2 conv + BatchNorm + ReLU + 3x3 stride-2 max pool
    /// (REST's code).
    Imagenet,
    /// The CIFAR stem: 3x3 stride-1 conv + BatchNorm + ReLU, no max pool.
    Cifar,
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

/// The widest ResNet `--width` (16 times torchvision's 64): beyond it a model is a claim of a
/// corrupt file rather than one anybody trains.
pub const MAX_WIDTH: usize = 1024;

/// The model section of a run's options, and what `build` constructs: the architecture
/// and, for ResNets, its width and stem (ignored by the other models). A bare `ModelKind`
/// converts with the ResNet defaults (width 64, ImageNet stem).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[command(next_help_heading = "Model")]
pub struct ModelSpec {
    /// Network: cnn (REST's Colored-MNIST CNN), mlp (LfF's 3x100 MLP), or resnet10,
    /// resnet18, resnet50 (torchvision ResNets of variable width).
    #[arg(long = "model", id = "model", value_name = "MODEL", value_enum, default_value_t = ModelKind::Cnn)]
    #[serde(rename = "model")]
    pub kind: ModelKind,
    /// ResNet width: channels of the first stage (stages w, 2w, 4w, 8w); 64 is torchvision's.
    #[arg(long, value_name = "W", default_value_t = 64)]
    pub width: usize,
    /// ResNet stem: imagenet (7x7 stride-2 conv + 3x3 max pool) or cifar (3x3 stride-1 conv,
    /// no max pool).
    #[arg(long, value_enum, default_value_t = Stem::Imagenet)]
    pub stem: Stem,
}

impl Default for ModelSpec {
    fn default() -> Self {
        crate::util::args_defaults()
    }
}

impl ModelSpec {
    /// Checks the values; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_WIDTH).contains(&self.width) {
            bail!(
                "--width must be between 1 and {MAX_WIDTH} (64 = torchvision's ResNet), got {}",
                self.width
            );
        }
        Ok(())
    }
}

impl From<ModelKind> for ModelSpec {
    fn from(kind: ModelKind) -> Self {
        Self {
            kind,
            ..Self::default()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn build_cpu(kind: ModelKind, input: (usize, usize, usize)) -> Result<Box<dyn Model>> {
        let spec = ModelSpec {
            kind,
            width: 4,
            stem: Stem::Cifar,
        };
        build(spec, input, 10, &mut crate::util::rng(0, 1), &Device::Cpu)
    }

    /// The FLOPs tables of the layers' chained entries equal those of the hand-written
    /// `layer_flops` before the layers knew their FLOPs (`rest flops --density 1 --json` of
    /// that binary, in `testdata/flops-base.json`).
    #[test]
    fn flops_equal_the_hand_written_ones() -> Result<()> {
        let cases: serde_json::Value =
            serde_json::from_str(include_str!("testdata/flops-base.json"))?;
        let cases = cases.as_array().expect("a list of cases");
        assert_eq!(cases.len(), 7);
        for case in cases {
            let model: ModelKind = serde_json::from_value(case["model"].clone())?;
            let input: (usize, usize, usize) = serde_json::from_value(case["input"].clone())?;
            let table = crate::report::flops_for(model, 1.0, 1.0, input, 10)?;
            assert_eq!(
                serde_json::to_value(&table)?,
                case["table"],
                "{} at {input:?}",
                model.as_str()
            );
        }
        Ok(())
    }

    /// The spellings of `ModelKind` in flags, config files and `as_str` are the registered
    /// ones (and those of config files written before the registry).
    #[test]
    fn model_kinds_keep_their_spellings() -> Result<()> {
        let names: Vec<&str> = ModelKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, ["cnn", "mlp", "resnet10", "resnet18", "resnet50"]);
        for &k in ModelKind::ALL {
            let json = serde_json::to_string(&k)?;
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<ModelKind>(&json)?, k);
            let parsed = <ModelKind as clap::ValueEnum>::from_str(k.as_str(), false)
                .map_err(anyhow::Error::msg)?;
            assert_eq!(parsed, k);
        }
        assert!(serde_json::from_str::<ModelKind>("\"resnet34\"").is_err());
        Ok(())
    }

    /// Every registered model builds, and its layers account for all its parameters and
    /// buffers under unique names, in the order the parameters were initialised.
    #[test]
    fn registered_models_build_with_unique_names() -> Result<()> {
        for &k in ModelKind::ALL {
            let e = k.entry();
            let m = build_cpu(k, e.bench_input)?;
            let params = m.params();
            let mut names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
            let buffers = m.buffers()?;
            names.extend(buffers.iter().map(|b| b.name.as_str()));
            let n = names.len();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), n, "{}: duplicate names", k.as_str());
            assert!(!m.weights().is_empty());
            let flops = m.layer_flops(e.bench_input);
            for w in m.weights() {
                assert!(
                    flops
                        .iter()
                        .any(|l| l.weight.as_ref().is_some_and(|(n, _)| *n == w.name)),
                    "{}: no FLOPs entry for {}",
                    k.as_str(),
                    w.name
                );
            }
        }
        Ok(())
    }

    /// `set_buffers` restores by name: the saved buffers in reverse order restore the same
    /// state; a missing or an unknown one is an error naming it and changes nothing.
    #[test]
    fn buffers_are_restored_by_name() -> Result<()> {
        let m = build_cpu(ModelKind::Cnn, (3, 12, 12))?;
        let x = Tensor::rand(0f32, 1f32, (4, 3, 12, 12), &Device::Cpu)?;
        let saved = m.buffers()?;
        assert_eq!(saved.len(), 6);
        assert_eq!(saved[0].name, "bn1.running_mean");
        assert_eq!(saved[5].name, "bn3.running_var");
        m.forward(&x, true)?; // moves the running statistics
        let moved = m.buffers()?;
        let mut reversed = saved.clone();
        reversed.reverse();
        m.set_buffers(&reversed)?;
        for (a, b) in m.buffers()?.iter().zip(&saved) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.tensor.to_vec1::<f32>()?, b.tensor.to_vec1::<f32>()?);
        }

        m.set_buffers(&moved)?;
        let err = m.set_buffers(&saved[1..]).expect_err("a missing buffer");
        assert!(err.to_string().contains("bn1.running_mean"), "{err}");
        let mut unknown = saved.clone();
        unknown[2].name = "bn9.running_mean".into();
        let err = m.set_buffers(&unknown).expect_err("an unknown buffer");
        assert!(err.to_string().contains("bn9.running_mean"), "{err}");
        let mut extra = saved.clone();
        extra.push(Buffer {
            name: "bn4.running_var".into(),
            tensor: saved[0].tensor.clone(),
        });
        let err = m.set_buffers(&extra).expect_err("an extra buffer");
        assert!(err.to_string().contains("bn4.running_var"), "{err}");
        // None of the failed calls changed anything.
        for (a, b) in m.buffers()?.iter().zip(&moved) {
            assert_eq!(a.tensor.to_vec1::<f32>()?, b.tensor.to_vec1::<f32>()?);
        }
        // Layers without buffers take none.
        let fc =
            crate::nn::Linear::new("fc", 3, 2, true, &mut crate::util::rng(0, 1), &Device::Cpu)?;
        assert!(!fc.set_buffer("fc.running_mean", &saved[0].tensor)?);
        Ok(())
    }
}
