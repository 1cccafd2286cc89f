//! Fully connected layer: y = x W^T + b, weight [out, in] as in PyTorch, optionally followed
//! by a ReLU in the same op; dense or sparse kernel depending on the layer's sparse slot.

use super::layer::{Dims, Layer, LayerFlops};
use super::{init, slot_weight, Param, SparseSlot};
use crate::kernels;
use crate::util::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Var,
    pub bias: Option<Var>,
    pub slot: SparseSlot,
    /// Whether a ReLU follows, fused into the layer's op ([`Linear::with_relu`]).
    pub relu: bool,
    /// The kernels this layer runs on (its device's, chosen at construction).
    pub backend: kernels::Backend,
}

impl Linear {
    pub fn new(
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = init::default_bound(in_features);
        let weight = init::uniform_var(&[out_features, in_features], bound, rng, device)?;
        let bias = if bias {
            Some(init::uniform_var(&[out_features], bound, rng, device)?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            weight,
            bias,
            slot: Default::default(),
            relu: false,
            backend: kernels::Backend::of(device),
        })
    }

    /// The layer followed by a ReLU (`relu(x W^T + b)`), in the same op.
    pub fn with_relu(mut self, relu: bool) -> Self {
        self.relu = relu;
        self
    }

    /// `x` is `[N, in]`; returns `[N, out]` (after the ReLU when `relu`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, true)
    }

    /// [`Linear::forward`]; without `train` (no backward pass expected) the sparse kernel
    /// skips keeping its packed input for the weight gradient (same values).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (w, b) = (
            self.weight.as_tensor(),
            self.bias.as_ref().map(|b| b.as_tensor()),
        );
        match slot_weight(&self.slot) {
            Some(sw) => kernels::sparse_linear_act(x, w, b, self.relu, train, &sw),
            None => kernels::linear_act(x, w, b, self.relu),
        }
    }

    /// The weight and the optional bias (as [`Layer::params`], without the trait in scope).
    pub fn params(&self) -> Vec<Param> {
        super::weight_and_bias_params(&self.name, &self.weight, self.bias.as_ref(), &self.slot)
    }
}

impl Layer for Linear {
    fn params(&self) -> Vec<Param> {
        Linear::params(self)
    }

    /// One entry: the weight at 1 position, the bias (1 per output) and the ReLU (1 per
    /// output). The input is taken flattened.
    fn flops(&self, _input: Dims, out: &mut Vec<LayerFlops>) -> Dims {
        let n = self.weight.dims()[0];
        let per_out = f64::from(u8::from(self.bias.is_some()) + u8::from(self.relu));
        out.push(LayerFlops {
            name: self.name.clone(),
            weight: Some((format!("{}.weight", self.name), 1)),
            other: per_out * n as f64,
        });
        (n, 1, 1)
    }
}
