//! 2-D convolution layer on CNHW activations (`[C, N, H, W]`), PyTorch weight layout
//! `[out, in, kh, kw]`; dense or sparse kernel depending on the layer's sparse slot.

use super::layer::{elems, Dims, Layer, LayerFlops};
use super::{init, slot_weight, Param, SparseSlot};
use crate::kernels;
use crate::util::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

#[derive(Debug, Clone)]
pub struct Conv2d {
    pub name: String,
    pub weight: Var,
    pub bias: Option<Var>,
    pub stride: usize,
    pub padding: usize,
    pub slot: SparseSlot,
    /// The kernels this layer runs on (its device's, chosen at construction).
    pub backend: kernels::Backend,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let fan_in = in_channels * kernel * kernel;
        let bound = init::default_bound(fan_in);
        let weight = init::uniform_var(
            &[out_channels, in_channels, kernel, kernel],
            bound,
            rng,
            device,
        )?;
        let bias = if bias {
            Some(init::uniform_var(&[out_channels], bound, rng, device)?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            weight,
            bias,
            stride,
            padding,
            slot: Default::default(),
            backend: kernels::Backend::of(device),
        })
    }

    /// `x` is CNHW; returns CNHW.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let y = match slot_weight(&self.slot) {
            Some(sw) => kernels::sparse_conv2d_cnhw(x, w, self.stride, self.padding, &sw)?,
            None => kernels::conv2d_cnhw(x, w, self.stride, self.padding)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.as_tensor().reshape(((), 1, 1, 1))?)?,
            None => y,
        })
    }

    /// The weight and the optional bias (as [`Layer::params`], without the trait in scope).
    pub fn params(&self) -> Vec<Param> {
        super::weight_and_bias_params(&self.name, &self.weight, self.bias.as_ref(), &self.slot)
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Output shape for an input of per-sample shape `(c, h, w)`.
    pub fn out_dims(&self, (_, h, w): Dims) -> Dims {
        let dims = self.weight.dims();
        let (p, s) = (self.padding, self.stride);
        (
            dims[0],
            (h + 2 * p - dims[2]) / s + 1,
            (w + 2 * p - dims[3]) / s + 1,
        )
    }

    /// The FLOPs entry of this conv alone (weight, bias) with its output shape.
    pub fn flops_entry(&self, input: Dims) -> (LayerFlops, Dims) {
        let dims = self.out_dims(input);
        let entry = LayerFlops {
            name: self.name.clone(),
            weight: Some((format!("{}.weight", self.name), dims.1 * dims.2)),
            other: if self.bias.is_some() {
                elems(dims)
            } else {
                0.0
            },
        };
        (entry, dims)
    }
}

impl Layer for Conv2d {
    fn params(&self) -> Vec<Param> {
        Conv2d::params(self)
    }

    fn flops(&self, input: Dims, out: &mut Vec<LayerFlops>) -> Dims {
        let (entry, dims) = self.flops_entry(input);
        out.push(entry);
        dims
    }
}
