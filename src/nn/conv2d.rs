//! 2-D convolution layer (NCHW activations, PyTorch weight layout [out, in, kh, kw]).

use super::{init, Param, ParamKind};
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
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(self.weight.as_tensor(), self.padding, self.stride, 1, 1)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.as_tensor().reshape((1, (), 1, 1))?)?,
            None => y,
        })
    }

    pub fn params(&self) -> Vec<Param> {
        let mut p = vec![Param {
            name: format!("{}.weight", self.name),
            var: self.weight.clone(),
            kind: ParamKind::Weight,
        }];
        if let Some(b) = &self.bias {
            p.push(Param {
                name: format!("{}.bias", self.name),
                var: b.clone(),
                kind: ParamKind::Other,
            });
        }
        p
    }
}
