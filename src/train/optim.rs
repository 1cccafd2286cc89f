//! SGD with momentum and weight decay, PyTorch semantics:
//! `g = grad + wd * w; buf = momentum * buf + g; w -= lr * buf` (first step: `buf = g`).
//! Momentum buffers are exposed so the sparse engine's masks can be applied to them too:
//! a pruned weight keeps zero momentum, so a regrown weight starts from zero momentum.

use crate::kernels::sgd::{self, sgd_pass, Part};
use crate::kernels::{output_buffer, with_f32};
use crate::nn::Param;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// The optimisation section of a run's options: epochs, batches, SGD, the plateau schedule
/// and the training seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[command(next_help_heading = "Optimisation")]
pub struct OptimOptions {
    /// Training epochs.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub epochs: usize,
    /// Samples per training step.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub batch_size: usize,
    /// Learning rate of SGD.
    #[arg(long, value_name = "LR", default_value_t = 0.01)]
    pub lr: f64,
    /// SGD momentum, in [0, 1).
    #[arg(long, value_name = "M", default_value_t = 0.9)]
    pub momentum: f64,
    /// L2 weight decay added to the gradient.
    #[arg(long, value_name = "WD", default_value_t = 0.0)]
    pub weight_decay: f64,
    /// ReduceLROnPlateau on validation loss: the factor the learning rate is multiplied by.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub lr_factor: f64,
    /// ReduceLROnPlateau: epochs without improvement before the learning rate drops.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub lr_patience: usize,
    /// Training seed (initialisation, masks, sampling).
    #[arg(long, value_name = "N", default_value_t = 42)]
    pub seed: u64,
}

impl Default for OptimOptions {
    fn default() -> Self {
        crate::util::args_defaults()
    }
}

impl OptimOptions {
    /// Checks every value; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        if self.epochs < 1 {
            anyhow::bail!("--epochs must be at least 1");
        }
        if self.batch_size < 1 {
            anyhow::bail!("--batch-size must be at least 1");
        }
        let checks = [
            (
                self.lr.is_finite() && self.lr > 0.0,
                "--lr must be a positive number",
                self.lr,
            ),
            (
                self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum),
                "--momentum must be in [0, 1)",
                self.momentum,
            ),
            (
                self.weight_decay.is_finite() && self.weight_decay >= 0.0,
                "--weight-decay must be >= 0",
                self.weight_decay,
            ),
            (
                self.lr_factor.is_finite() && self.lr_factor > 0.0 && self.lr_factor < 1.0,
                "--lr-factor must be in (0, 1)",
                self.lr_factor,
            ),
        ];
        for (ok, msg, v) in checks {
            if !ok {
                anyhow::bail!("{msg}, got {v}");
            }
        }
        Ok(())
    }
}

pub struct Sgd {
    params: Vec<Param>,
    /// Per parameter, the kernels its update runs on (its device's).
    backends: Vec<crate::kernels::Backend>,
    momentum_buf: Vec<Option<Tensor>>,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Sgd {
    pub fn new(params: Vec<Param>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        let n = params.len();
        let backends = params
            .iter()
            .map(|p| crate::kernels::Backend::of(p.var.device()))
            .collect();
        Self {
            params,
            backends,
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
    ///
    /// Runs as one fused pass per parameter over host memory (weight, gradient and momentum
    /// read once; new momentum and weight written once), in `f32` with the same operations
    /// and rounding as the tensor formula above.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let (lr, mom, wd) = (
            self.lr as f32,
            self.momentum as f32,
            self.weight_decay as f32,
        );
        let params = self.params.iter().zip(&self.backends);
        for ((p, backend), buf) in params.zip(self.momentum_buf.iter_mut()) {
            let compact = p
                .slot
                .as_ref()
                .and_then(crate::nn::slot_weight)
                .and_then(|sw| sw.take_grad());
            let Some(g) = grads.get(p.var.as_tensor()) else {
                if let Some((index, g)) = compact {
                    compact_step(p, buf, &index, &g, self.momentum != 0.0, [lr, mom, wd])
                        .with_context(|| format!("updating {}", p.name))?;
                }
                continue;
            };
            let w = p.var.as_tensor();
            if g.dims() != w.dims() {
                anyhow::bail!(
                    "gradient of {} has shape {:?}, the parameter {:?}",
                    p.name,
                    g.dims(),
                    w.dims()
                );
            }
            let n = w.elem_count();
            let use_mom = self.momentum != 0.0;
            if backend.is_generic() {
                // Off the CPU (CUDA), or with REST_KERNELS=candle: the same formula in
                // candle's tensor ops, on the device.
                let old = if use_mom { buf.take() } else { None };
                let (new_w, new_buf) = tensor_step(w, g, old.as_ref(), use_mom, [lr, mom, wd])
                    .with_context(|| format!("updating {}", p.name))?;
                *buf = new_buf;
                p.var
                    .set(&new_w)
                    .with_context(|| format!("updating {}", p.name))?;
                continue;
            }
            if use_mom && w.device().is_cpu() && w.is_contiguous() {
                if let Some(b) = buf
                    .as_ref()
                    .filter(|b| b.dims() == w.dims() && b.is_contiguous())
                {
                    // Momentum, then weight, updated in place: no new buffers each step.
                    with_f32(g, "sgd", |gs| {
                        let hyper = [lr, mom, wd];
                        sgd::dense_in_place(b, w, gs, hyper, Part::Momentum)?;
                        sgd::dense_in_place(w, b, gs, hyper, Part::Weight)
                    })
                    .with_context(|| format!("updating {}", p.name))?;
                    continue;
                }
            }
            let old = if use_mom { buf.take() } else { None };
            let (new_w, new_buf) = with_f32(w, "sgd", |ws| {
                with_f32(g, "sgd", |gs| {
                    let mut nw = output_buffer(n);
                    let mut nb = output_buffer(if use_mom { n } else { 0 });
                    match &old {
                        Some(b) => with_f32(b, "sgd", |bs| {
                            sgd_pass(&mut nw, &mut nb, ws, gs, Some(bs), [lr, mom, wd]);
                            Ok(())
                        })?,
                        None => sgd_pass(&mut nw, &mut nb, ws, gs, None, [lr, mom, wd]),
                    }
                    Ok((nw, nb))
                })
            })
            .with_context(|| format!("updating {}", p.name))?;
            if use_mom {
                *buf = Some(Tensor::from_vec(new_buf, w.shape(), w.device())?);
            }
            p.var
                .set(&Tensor::from_vec(new_w, w.shape(), w.device())?)
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

    /// The momentum buffer of parameter `index` (None before the first step). Steps update
    /// it (and the weights) in place: copy it to keep this step's values.
    pub fn momentum_buffer(&self, index: usize) -> Option<&Tensor> {
        self.momentum_buf[index].as_ref()
    }
}

/// One SGD update in candle's tensor ops (any device): returns the new weight and, with
/// momentum, the new momentum buffer (`buf` is None on the first step). The arithmetic of
/// [`sgd_pass`]; the results match it to rounding.
fn tensor_step(
    w: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    use_mom: bool,
    [lr, mom, wd]: [f32; 3],
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    // Detached: candle's gradients carry the backward graph that made them (it reads the
    // weights), and a momentum buffer built on them would keep every earlier step's graph,
    // activations included, alive through the chain of buffers.
    let (w, g) = (&w.detach(), g.detach());
    let g = if wd != 0.0 {
        (g + (w * f64::from(wd))?)?
    } else {
        g.clone()
    };
    let step = if use_mom {
        match buf {
            Some(b) => ((b * f64::from(mom))? + g)?,
            None => g,
        }
    } else {
        g
    };
    let new_w = (w - (&step * f64::from(lr))?)?;
    Ok((new_w.detach(), use_mom.then(|| step.detach())))
}

/// The SGD update of a sparse layer's weight from its compact gradient (`g[e]` at dense
/// index `index[e]`, see `SparseWeight::take_grad`): the same arithmetic as [`sgd_pass`],
/// applied in place at the active positions only. Elsewhere the weight and momentum are zero
/// and their gradient is zero, so the dense update would leave them unchanged anyway.
fn compact_step(
    p: &Param,
    buf: &mut Option<Tensor>,
    index: &[usize],
    g: &[f32],
    use_mom: bool,
    [lr, mom, wd]: [f32; 3],
) -> Result<()> {
    let w = p.var.as_tensor();
    let n = w.elem_count();
    if index.len() != g.len() || index.iter().any(|&k| k >= n) {
        anyhow::bail!(
            "compact gradient of {} ({} values) does not fit the weight {:?}",
            p.name,
            g.len(),
            w.dims()
        );
    }
    let hyper = [lr, mom, wd];
    if !use_mom {
        sgd::compact_in_place(w, None, index, g, hyper)?;
        return Ok(());
    }
    let b = match buf.take() {
        Some(b) if b.dims() == w.dims() && b.is_contiguous() => {
            sgd::compact_in_place(w, Some(&b), index, g, hyper)?;
            *buf = Some(b);
            return Ok(());
        }
        other => {
            // First step (or a buffer of another layout): `b = g'`, zero elsewhere.
            if let Some(b) = other {
                anyhow::bail!("momentum buffer of {} has shape {:?}", p.name, b.dims());
            }
            let mut nb = vec![0.0f32; n];
            with_f32(w, "sgd", |ws| {
                for (&k, &gv) in index.iter().zip(g) {
                    nb[k] = if wd != 0.0 { gv + ws[k] * wd } else { gv };
                }
                Ok(())
            })?;
            Tensor::from_vec(nb, w.shape(), w.device())?
        }
    };
    // The first step's weight update from `b = g'`: `w -= lr·g'`, the plain pass.
    sgd::compact_in_place(w, None, index, g, hyper)?;
    *buf = Some(b);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ParamKind;
    use candle_core::{Device, Var};

    #[test]
    fn in_place_dense_steps_match_the_f32_formula_bit_for_bit() -> Result<()> {
        // More elements than one parallel chunk; steps 2 and 3 update in place.
        let n = 40_000;
        let dev = Device::Cpu;
        let w0: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let c: Vec<f32> = (0..n)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.07)
            .collect();
        let w = Var::from_vec(w0.clone(), n, &dev)?;
        let ct = Tensor::from_vec(c.clone(), n, &dev)?;
        let p = Param {
            name: "w".into(),
            var: w.clone(),
            kind: ParamKind::Weight,
            slot: None,
        };
        let (lr, mom, wd) = (0.1f32, 0.9f32, 0.01f32);
        let mut opt = Sgd::new(vec![p], lr as f64, mom as f64, wd as f64);
        let (mut ew, mut eb) = (w0, vec![0.0f32; n]);
        for step in 0..3 {
            let loss = (w.as_tensor() * &ct)?.sum_all()?;
            opt.step(&loss.backward()?)?;
            for i in 0..n {
                let g = c[i] + ew[i] * wd;
                eb[i] = if step == 0 { g } else { eb[i] * mom + g };
                ew[i] -= eb[i] * lr;
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&w.as_tensor().to_vec1::<f32>()?), bits(&ew));
        let b = opt.momentum_buffer(0).expect("momentum").to_vec1::<f32>()?;
        assert_eq!(bits(&b), bits(&eb));
        Ok(())
    }

    #[test]
    fn device_tensor_path_matches_the_fused_pass() -> Result<()> {
        // The path CUDA parameters take (candle tensor ops) against the fused host pass, over
        // three steps with and without momentum and weight decay.
        let dev = Device::Cpu;
        let n = 70_000; // above the fused pass's parallel chunk
        let vals = |seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        for (mom, wd) in [(0.9f32, 5e-4f32), (0.0, 0.0), (0.9, 0.0)] {
            let (mut ws, mut bs) = (vals(1), None::<Vec<f32>>);
            let mut wt = Tensor::from_vec(ws.clone(), n, &dev)?;
            let mut bt = None::<Tensor>;
            for step in 0..3u32 {
                let gs = vals(7 + step);
                let use_mom = mom != 0.0;
                let mut nw = vec![0f32; n];
                let mut nb = vec![0f32; if use_mom { n } else { 0 }];
                sgd_pass(&mut nw, &mut nb, &ws, &gs, bs.as_deref(), [0.05, mom, wd]);
                let g = Tensor::from_vec(gs, n, &dev)?;
                let (tw, tb) = tensor_step(&wt, &g, bt.as_ref(), use_mom, [0.05, mom, wd])?;
                for (a, b) in tw.to_vec1::<f32>()?.iter().zip(&nw) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                }
                assert_eq!(tb.is_some(), use_mom);
                if let Some(tb) = &tb {
                    for (a, b) in tb.to_vec1::<f32>()?.iter().zip(&nb) {
                        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                }
                (ws, bs, wt, bt) = (nw, use_mom.then_some(nb), tw, tb);
            }
        }
        // The results hold no autograd history, even from a tracked weight and gradient (a
        // momentum buffer with history keeps every earlier step's graph alive).
        let w = Var::from_vec(vec![1.0f32, -2.0], 2, &dev)?;
        let g = (w.as_tensor() * 3.0)?;
        let b = (w.as_tensor() * 0.5)?;
        let (nw, nb) = tensor_step(w.as_tensor(), &g, Some(&b), true, [0.1, 0.9, 0.01])?;
        assert!(!nw.track_op());
        assert!(!nb.expect("momentum").track_op());
        Ok(())
    }

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
