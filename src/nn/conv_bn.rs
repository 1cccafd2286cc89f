//! A bias-free convolution followed by BatchNorm (and optionally ReLU), the unit of the CNN
//! and the ResNets (`ConvBn`), and the fused ops that run such layers: conv+BN(+ReLU) in one op
//! for training or inference (`conv_bn`), and a whole conv+BN+ReLU stack with its global
//! average pool at inference (`conv_stack_pool_eval`).

use super::layer::{elems, Dims, Layer, LayerFlops};
use super::{slot_weight, BatchNorm2d, Buffer, Conv2d, MaxPool2d, Param};
use crate::kernels::SparseWeight;
use crate::util::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::sync::{Arc, Mutex};

/// A bias-free conv (padding `k / 2`) followed by BatchNorm, and by ReLU when `relu` (all
/// three in one fused op, [`conv_bn`]).
#[derive(Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
    pub relu: bool,
}

impl ConvBn {
    /// A `k`x`k` conv from `cin` to `cout` channels with `stride` and padding `k / 2` named
    /// `conv_name`, and its BatchNorm named `bn_name`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conv_name: &str,
        bn_name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        relu: bool,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        Self::with_padding(
            conv_name,
            bn_name,
            cin,
            cout,
            k,
            stride,
            k / 2,
            relu,
            rng,
            device,
        )
    }

    /// [`ConvBn::new`] with an explicit `padding`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_padding(
        conv_name: &str,
        bn_name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        relu: bool,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(conv_name, cin, cout, k, stride, padding, false, rng, device)?,
            bn: BatchNorm2d::new(bn_name, cout, device)?,
            relu,
        })
    }

    /// `bn(conv(x))`, then ReLU if `self.relu`, on CNHW activations, as one fused op
    /// ([`conv_bn`]: same values, but the convolution output never enters candle's gradient
    /// accumulation, which would zero-fill and add a copy of it).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        conv_bn(&self.conv, &self.bn, x, train, self.relu)
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.conv.out_channels()
    }

    /// Inference `pool(self.forward(x, false))` as one op (`kernels::conv_bn_maxpool_eval`:
    /// the convolution's output pooled while in cache, never written whole), for a dense
    /// convolution without bias on the CPU kernels; `None` otherwise (the caller runs the
    /// layer and then the pool).
    pub fn forward_eval_maxpool(&self, x: &Tensor, pool: &MaxPool2d) -> Result<Option<Tensor>> {
        if self.conv.bias.is_some() || self.conv.backend.is_generic() {
            return Ok(None);
        }
        let state = EvalState::of(&self.conv, &self.bn);
        let layer = state.layer(&self.conv, &self.bn, self.relu);
        crate::kernels::conv_bn_maxpool_eval(x, &layer, (pool.kernel, pool.stride, pool.padding))
    }
}

impl Layer for ConvBn {
    fn params(&self) -> Vec<Param> {
        let mut p = self.conv.params();
        p.extend(self.bn.params());
        p
    }

    fn buffers(&self) -> Result<Vec<Buffer>> {
        self.bn.buffers()
    }

    fn set_buffer(&self, name: &str, tensor: &Tensor) -> Result<bool> {
        self.bn.set_buffer(name, tensor)
    }

    /// One entry, named after the conv: its weight, plus BatchNorm (2 per element) and ReLU
    /// (1 per element).
    fn flops(&self, input: Dims, out: &mut Vec<LayerFlops>) -> Dims {
        let (mut entry, dims) = self.conv.flops_entry(input);
        let per_elem = if self.relu { 3.0 } else { 2.0 };
        entry.other += per_elem * elems(dims);
        out.push(entry);
        dims
    }
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
    if conv.bias.is_some() || conv.backend.is_generic() {
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
/// (`kernels::conv_stack_pool_eval`: valid outputs only, each layer writing into the next
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
