//! SGD with momentum and weight decay, PyTorch semantics:
//! `g = grad + wd * w; buf = momentum * buf + g; w -= lr * buf` (first step: `buf = g`).
//! Momentum buffers are exposed so the sparse engine's masks can be applied to them too:
//! a pruned weight keeps zero momentum, so a regrown weight starts from zero momentum.

use crate::nn::Param;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;

pub struct Sgd {
    params: Vec<Param>,
    momentum_buf: Vec<Option<Tensor>>,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Sgd {
    pub fn new(params: Vec<Param>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        let n = params.len();
        Self {
            params,
            momentum_buf: vec![None; n],
            lr,
            momentum,
            weight_decay,
        }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// One update from the gradients in `grads`; parameters without a gradient are skipped.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (p, buf) in self.params.iter().zip(self.momentum_buf.iter_mut()) {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Detached: the gradient's autograd history must not be chained through the
            // momentum buffer across steps (that would keep every step's graph alive).
            let w = p.var.as_tensor().detach();
            let mut g = g.detach();
            if self.weight_decay != 0.0 {
                g = (g + (&w * self.weight_decay)?)?;
            }
            let d = if self.momentum != 0.0 {
                let nb = match buf.take() {
                    Some(b) => ((b * self.momentum)? + g)?,
                    None => g,
                };
                *buf = Some(nb.clone());
                nb
            } else {
                g
            };
            p.var
                .set(&(&w - (d * self.lr)?)?)
                .with_context(|| format!("updating {}", p.name))?;
        }
        Ok(())
    }

    /// Multiplies the momentum buffer of parameter `index` by `mask` (same shape).
    pub fn mask_momentum(&mut self, index: usize, mask: &Tensor) -> Result<()> {
        if let Some(b) = &self.momentum_buf[index] {
            self.momentum_buf[index] = Some(b.mul(mask)?);
        }
        Ok(())
    }

    /// Restores the momentum buffer of parameter `index` (checkpoint reload).
    pub fn set_momentum_buffer(&mut self, index: usize, buf: Tensor) -> Result<()> {
        let want = self.params[index].var.dims();
        if buf.dims() != want {
            anyhow::bail!(
                "momentum of {} has shape {:?}, expected {:?}",
                self.params[index].name,
                buf.dims(),
                want
            );
        }
        self.momentum_buf[index] = Some(buf);
        Ok(())
    }

    /// The momentum buffer of parameter `index` (None before the first step).
    pub fn momentum_buffer(&self, index: usize) -> Option<&Tensor> {
        self.momentum_buf[index].as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ParamKind;
    use candle_core::{Device, Var};

    #[test]
    fn matches_hand_computed_pytorch_sgd() -> Result<()> {
        // loss = sum(w * c) so grad = c. w0 = [1, -2], c = [0.5, 1], lr 0.1, mom 0.9, wd 0.01.
        let dev = Device::Cpu;
        let w = Var::from_vec(vec![1.0f32, -2.0], 2, &dev)?;
        let c = Tensor::new(&[0.5f32, 1.0], &dev)?;
        let p = Param {
            name: "w".into(),
            var: w.clone(),
            kind: ParamKind::Weight,
            slot: None,
        };
        let mut opt = Sgd::new(vec![p], 0.1, 0.9, 0.01);
        let mut expect = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        for step in 0..3 {
            let loss = (w.as_tensor() * &c)?.sum_all()?;
            opt.step(&loss.backward()?)?;
            for i in 0..2 {
                let g = [0.5, 1.0][i] + 0.01 * expect[i];
                buf[i] = if step == 0 { g } else { 0.9 * buf[i] + g };
                expect[i] -= 0.1 * buf[i];
            }
        }
        let got = w.as_tensor().to_vec1::<f32>()?;
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 1e-6,
                "{got:?} vs {expect:?}"
            );
        }
        Ok(())
    }
}
