//! Neural-network layers: one small file per layer, each owning its parameters as candle
//! `Var`s and running on our own CPU kernels (`crate::kernels`): dense, or sparse when the
//! training loop puts a compact weight in the layer's `SparseSlot`. Conv, BatchNorm and
//! pooling layers take and return CNHW activations.

pub mod batchnorm;
pub mod conv2d;
pub mod init;
pub mod linear;

pub use batchnorm::BatchNorm2d;
pub use conv2d::Conv2d;
pub use linear::Linear;

use crate::kernels::SparseWeight;
use anyhow::Result;
use candle_core::{Tensor, Var};
use std::sync::{Arc, Mutex};

/// Where a layer looks for the compact (sparse-kernel) form of its weight: `None` runs the
/// dense kernel. The training loop fills it after every mask change.
pub type SparseSlot = Arc<Mutex<Option<Arc<SparseWeight>>>>;

/// The sparse weight currently in `slot`, if any.
pub fn slot_weight(slot: &SparseSlot) -> Option<Arc<SparseWeight>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `relu(bn(conv(x)))` on CNHW activations: [`conv_bn`] with the ReLU.
pub fn conv_bn_relu(conv: &Conv2d, bn: &BatchNorm2d, x: &Tensor, train: bool) -> Result<Tensor> {
    conv_bn(conv, bn, x, train, true)
}

/// `bn(conv(x))`, then ReLU when `relu`, on CNHW activations. For a convolution without bias
/// on the CPU, one fused op runs them: in training the convolution's output never passes
/// through candle's gradient accumulation (see `kernels::conv_bn_train`; the result, the
/// gradients and the running statistics equal those of the separate layers); in evaluation
/// the normalisation (and ReLU) are applied as the convolution writes its output
/// (`kernels::conv_bn_eval`, same values, not differentiable).
pub fn conv_bn(
    conv: &Conv2d,
    bn: &BatchNorm2d,
    x: &Tensor,
    train: bool,
    relu: bool,
) -> Result<Tensor> {
    if conv.bias.is_some() || crate::kernels::generic_path(x) {
        return bn.forward(&conv.forward(x)?, train, relu);
    }
    if !train {
        let state = EvalState::of(conv, bn);
        return state.layer(conv, bn, relu).apply(x);
    }
    let sparse = slot_weight(&conv.slot);
    let (y, mean, var) = crate::kernels::conv_bn_train(
        x,
        conv.weight.as_tensor(),
        conv.stride,
        conv.padding,
        sparse.as_ref(),
        bn.gamma.as_tensor(),
        bn.beta.as_tensor(),
        bn.eps,
        relu,
    )?;
    bn.update_running(&mean, &var, y.elem_count() / y.dim(0)?)?;
    Ok(y)
}

/// What an inference conv+BN layer reads besides its parameters, taken once per call: the
/// running statistics (behind their locks) and the conv's sparse pattern, if any.
struct EvalState {
    running_mean: Tensor,
    running_var: Tensor,
    sparse: Option<Arc<SparseWeight>>,
}

impl EvalState {
    fn of(conv: &Conv2d, bn: &BatchNorm2d) -> Self {
        let lock = |m: &Mutex<Tensor>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
        EvalState {
            running_mean: lock(&bn.running_mean),
            running_var: lock(&bn.running_var),
            sparse: slot_weight(&conv.slot),
        }
    }

    /// The layer's arguments for `kernels::conv_bn_eval` / `conv_stack_pool_eval`.
    fn layer<'a>(
        &'a self,
        conv: &'a Conv2d,
        bn: &'a BatchNorm2d,
        relu: bool,
    ) -> crate::kernels::EvalConvBn<'a> {
        crate::kernels::EvalConvBn {
            w: conv.weight.as_tensor(),
            stride: conv.stride,
            pad: conv.padding,
            sparse: self.sparse.as_ref(),
            gamma: bn.gamma.as_tensor(),
            beta: bn.beta.as_tensor(),
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            eps: bn.eps,
            relu,
        }
    }
}

/// Inference `global_avg_pool(relu(bn_k(conv_k(... relu(bn_1(conv_1(x)))))))` `[N, C_k]` on
/// NCHW images `x` (any strides), in one batch-innermost pass over groups of 16 images
/// (the inference stack, `kernels::conv_stack_pool_eval`: valid outputs only, each layer writing into the next
/// one's input layout, activations kept in cache) when it applies: on the CPU with AVX-512,
/// convolutions without bias. `None` otherwise (the caller runs the layers one by one).
pub fn conv_stack_pool_eval(
    layers: &[(&Conv2d, &BatchNorm2d)],
    x: &Tensor,
) -> Result<Option<Tensor>> {
    if layers.iter().any(|(conv, _)| conv.bias.is_some()) {
        return Ok(None);
    }
    let states: Vec<EvalState> = layers
        .iter()
        .map(|(conv, bn)| EvalState::of(conv, bn))
        .collect();
    let args: Vec<_> = layers
        .iter()
        .zip(&states)
        .map(|((conv, bn), s)| s.layer(conv, bn, true))
        .collect();
    if !crate::kernels::conv_stack_applies(x, &args) {
        return Ok(None);
    }
    crate::kernels::conv_stack_pool_eval(x, &args).map(Some)
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
