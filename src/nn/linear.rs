//! Fully connected layer: y = x W^T + b, weight [out, in] as in PyTorch; dense or sparse
//! kernel depending on the layer's sparse slot.

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
        })
    }

    /// `x` is `[N, in]`; returns `[N, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        match slot_weight(&self.slot) {
            Some(sw) => {
                kernels::sparse_linear_bias(x, w, self.bias.as_ref().map(|b| b.as_tensor()), &sw)
            }
            None => kernels::linear(x, w, self.bias.as_ref().map(|b| b.as_tensor())),
        }
    }

    pub fn params(&self) -> Vec<Param> {
        super::weight_and_bias_params(&self.name, &self.weight, self.bias.as_ref(), &self.slot)
    }
}
