//! Fully connected layer: y = x W^T + b, weight [out, in] as in PyTorch.

use super::{init, Param, ParamKind};
use crate::util::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Var,
    pub bias: Option<Var>,
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
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.as_tensor().t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor())?,
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
