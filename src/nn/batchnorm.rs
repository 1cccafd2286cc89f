//! 2-D batch normalisation on CNHW activations (optionally fused with ReLU), PyTorch
//! semantics: in training, normalise with the batch mean and biased variance and update
//! running statistics (momentum 0.1, unbiased variance); in evaluation, use the running
//! statistics, the layer's buffers `<name>.running_mean` and `<name>.running_var`.

use super::layer::{elems, Dims, Layer, LayerFlops};
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

    /// `x` is CNHW; `relu` fuses a ReLU after the affine transform.
    pub fn forward(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (g, b) = (self.gamma.as_tensor(), self.beta.as_tensor());
        if train {
            let (y, mean, var) = crate::kernels::batch_norm_cnhw_train(x, g, b, self.eps, relu)?;
            self.update_running(&mean, &var, x.elem_count() / x.dim(0)?)?;
            Ok(y)
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
            crate::kernels::batch_norm_cnhw_eval(x, g, b, &rm, &rv, self.eps, relu)
        }
    }

    /// PyTorch's running-statistics update (outside the autograd graph) from one batch's
    /// mean and biased variance over `n` values per channel; the unbiased variance enters.
    pub(crate) fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        let n = n as f64;
        let m = self.momentum;
        let unbiased = (var.detach() * (n / (n - 1.0).max(1.0)))?;
        let mut rm = self
            .running_mean
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned lock"))?;
        *rm = ((&*rm * (1.0 - m))? + (mean.detach() * m)?)?;
        let mut rv = self
            .running_var
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned lock"))?;
        *rv = ((&*rv * (1.0 - m))? + (unbiased * m)?)?;
        Ok(())
    }

    /// The running statistic that buffer `name` (`<layer>.running_mean|running_var`) is.
    fn buffer(&self, name: &str) -> Option<&Mutex<Tensor>> {
        match name.strip_prefix(self.name.as_str())?.strip_prefix('.')? {
            "running_mean" => Some(&self.running_mean),
            "running_var" => Some(&self.running_var),
            _ => None,
        }
    }
}

impl Layer for BatchNorm2d {
    /// The scale (`<name>.weight`) and the shift (`<name>.bias`), as PyTorch names them.
    fn params(&self) -> Vec<Param> {
        vec![
            Param {
                name: format!("{}.weight", self.name),
                var: self.gamma.clone(),
                kind: ParamKind::Other,
                slot: None,
            },
            Param {
                name: format!("{}.bias", self.name),
                var: self.beta.clone(),
                kind: ParamKind::Other,
                slot: None,
            },
        ]
    }

    fn buffers(&self) -> Result<Vec<Buffer>> {
        let get = |m: &Mutex<Tensor>| -> Result<Tensor> {
            Ok(m.lock()
                .map_err(|_| anyhow::anyhow!("poisoned lock"))?
                .clone())
        };
        Ok(vec![
            Buffer {
                name: format!("{}.running_mean", self.name),
                tensor: get(&self.running_mean)?,
            },
            Buffer {
                name: format!("{}.running_var", self.name),
                tensor: get(&self.running_var)?,
            },
        ])
    }

    /// Restores a running statistic (from a checkpoint or the best-epoch snapshot).
    fn set_buffer(&self, name: &str, tensor: &Tensor) -> Result<bool> {
        let Some(slot) = self.buffer(name) else {
            return Ok(false);
        };
        *slot.lock().map_err(|_| anyhow::anyhow!("poisoned lock"))? = tensor.clone();
        Ok(true)
    }

    /// One entry: the folded scale and shift, 2 per element.
    fn flops(&self, input: Dims, out: &mut Vec<LayerFlops>) -> Dims {
        out.push(LayerFlops {
            name: self.name.clone(),
            weight: None,
            other: 2.0 * elems(input),
        });
        input
    }
}
