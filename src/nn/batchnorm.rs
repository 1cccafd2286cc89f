//! 2-D batch normalisation with PyTorch semantics: in training, normalise with the batch mean
//! and biased variance and update running statistics (momentum 0.1, unbiased variance); in
//! evaluation, use the running statistics.

use super::{Buffer, Param, ParamKind};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Mutex;

#[derive(Debug)]
pub struct BatchNorm2d {
    pub name: String,
    pub gamma: Var,
    pub beta: Var,
    pub running_mean: Mutex<Tensor>,
    pub running_var: Mutex<Tensor>,
    pub momentum: f64,
    pub eps: f64,
}

impl BatchNorm2d {
    pub fn new(name: &str, channels: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            gamma: Var::ones(channels, DType::F32, device)?,
            beta: Var::zeros(channels, DType::F32, device)?,
            running_mean: Mutex::new(Tensor::zeros(channels, DType::F32, device)?),
            running_var: Mutex::new(Tensor::ones(channels, DType::F32, device)?),
            momentum: 0.1,
            eps: 1e-5,
        })
    }

    /// `x` is NCHW.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        let (mean, var) = if train {
            let n = (x.elem_count() / c) as f64;
            let mean = x.mean_keepdim((0, 2, 3))?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
            // Running statistics (outside the autograd graph).
            let m = self.momentum;
            let unbiased = (var.detach().flatten_all()? * (n / (n - 1.0).max(1.0)))?;
            let mut rm = self
                .running_mean
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned lock"))?;
            *rm = ((&*rm * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?;
            let mut rv = self
                .running_var
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned lock"))?;
            *rv = ((&*rv * (1.0 - m))? + (unbiased * m)?)?;
            (mean, var)
        } else {
            let rm = self
                .running_mean
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned lock"))?
                .clone();
            let rv = self
                .running_var
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned lock"))?
                .clone();
            (rm.reshape((1, c, 1, 1))?, rv.reshape((1, c, 1, 1))?)
        };
        let xn = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let g = self.gamma.as_tensor().reshape((1, c, 1, 1))?;
        let b = self.beta.as_tensor().reshape((1, c, 1, 1))?;
        Ok(xn.broadcast_mul(&g)?.broadcast_add(&b)?)
    }

    pub fn params(&self) -> Vec<Param> {
        vec![
            Param {
                name: format!("{}.weight", self.name),
                var: self.gamma.clone(),
                kind: ParamKind::Other,
            },
            Param {
                name: format!("{}.bias", self.name),
                var: self.beta.clone(),
                kind: ParamKind::Other,
            },
        ]
    }

    pub fn buffers(&self) -> Result<Vec<Buffer>> {
        let rm = self
            .running_mean
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned lock"))?
            .clone();
        let rv = self
            .running_var
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned lock"))?
            .clone();
        Ok(vec![
            Buffer {
                name: format!("{}.running_mean", self.name),
                tensor: rm,
            },
            Buffer {
                name: format!("{}.running_var", self.name),
                tensor: rv,
            },
        ])
    }

    /// Restores running statistics (from a checkpoint or the best-epoch snapshot).
    pub fn set_buffers(&self, mean: Tensor, var: Tensor) -> Result<()> {
        *self
            .running_mean
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned lock"))? = mean;
        *self
            .running_var
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned lock"))? = var;
        Ok(())
    }
}
