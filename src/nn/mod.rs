//! Neural-network layers: one small file per layer, each owning its parameters as candle
//! `Var`s and running on our own CPU kernels (`crate::kernels`): dense, or sparse when the
//! training loop puts a compact weight in the layer's `SparseSlot`. Conv, BatchNorm and
//! pooling layers take and return CNHW activations. Every layer implements [`Layer`]
//! (`layer`): its parameters, its buffers by name and its FLOPs for an input shape; the
//! forward passes are inherent methods. Also the parameter registry (`Param`, `Buffer`).

pub mod batchnorm;
pub mod conv2d;
pub mod conv_bn;
pub mod init;
pub mod layer;
pub mod linear;
pub mod pool;

pub use batchnorm::BatchNorm2d;
pub use conv2d::Conv2d;
pub use conv_bn::{conv_bn, conv_bn_relu, conv_stack_pool_eval, ConvBn};
pub use layer::{Dims, Layer, LayerFlops};
pub use linear::Linear;
pub use pool::{GlobalAvgPool, MaxPool2d};

use crate::kernels::SparseWeight;
use candle_core::{Tensor, Var};
use std::sync::{Arc, Mutex};

/// Where a layer looks for the compact (sparse-kernel) form of its weight: `None` runs the
/// dense kernel. The training loop fills it after every mask change.
pub type SparseSlot = Arc<Mutex<Option<Arc<SparseWeight>>>>;

/// The sparse weight currently in `slot`, if any.
pub fn slot_weight(slot: &SparseSlot) -> Option<Arc<SparseWeight>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

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
    /// For conv/linear weights: the layer's sparse-kernel slot.
    pub slot: Option<SparseSlot>,
}

/// A named non-trainable state tensor (BatchNorm running statistics).
#[derive(Debug, Clone)]
pub struct Buffer {
    pub name: String,
    pub tensor: Tensor,
}

/// The parameters of a conv/linear layer: its maskable weight (with the layer's sparse slot)
/// and its optional bias.
pub(crate) fn weight_and_bias_params(
    layer: &str,
    weight: &Var,
    bias: Option<&Var>,
    slot: &SparseSlot,
) -> Vec<Param> {
    let mut p = vec![Param {
        name: format!("{layer}.weight"),
        var: weight.clone(),
        kind: ParamKind::Weight,
        slot: Some(slot.clone()),
    }];
    if let Some(b) = bias {
        p.push(Param {
            name: format!("{layer}.bias"),
            var: b.clone(),
            kind: ParamKind::Other,
            slot: None,
        });
    }
    p
}
