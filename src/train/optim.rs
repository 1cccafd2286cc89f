//! SGD with momentum and weight decay, PyTorch semantics:
//! `g = grad + wd * w; buf = momentum * buf + g; w -= lr * buf` (first step: `buf = g`).
//! Momentum buffers are exposed so the sparse engine's masks can be applied to them too:
//! a pruned weight keeps zero momentum, so a regrown weight starts from zero momentum. A
//! layer on the sparse kernels keeps its buffer compact (its active positions only) between
//! mask updates; it is densified where it is read in full (mask updates, checkpoints).

use crate::kernels::sgd::{self, sgd_pass, Part};
use crate::kernels::{output_buffer, with_f32};
use crate::nn::Param;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

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
    /// Start from these weights instead of a random initialisation: a PyTorch state dict
    /// (.pth/.pt) or .safetensors with torchvision's names (ResNets: conv1.weight,
    /// layer1.0.conv1.weight, ..., fc.weight); the classifier head stays fresh when the class
    /// count differs.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
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
        if let Some(f) = &self.init_from {
            if !f.is_file() {
                anyhow::bail!("--init-from {}: no such file", f.display());
            }
        }
        Ok(())
    }
}

/// A parameter's momentum buffer.
enum Momentum {
    Dense(Tensor),
    /// A sparse layer's between mask updates: the values at its active positions `index`
    /// (ascending dense indices, the layer's own list: compared by pointer), zero elsewhere.
    /// Its update is one contiguous pass; nothing of the weight's size is touched.
    Compact {
        index: Arc<[usize]>,
        values: Vec<f32>,
    },
}

impl Momentum {
    /// The buffer in full, shaped like `p`.
    fn dense(&self, p: &Param) -> Result<Tensor> {
        match self {
            Momentum::Dense(t) => Ok(t.clone()),
            Momentum::Compact { index, values } => {
                let w = p.var.as_tensor();
                let mut d = vec![0.0f32; w.elem_count()];
                for (&k, &v) in index.iter().zip(values) {
                    d[k] = v;
                }
                Ok(Tensor::from_vec(d, w.shape(), w.device())?)
            }
        }
    }

    /// The values at `index` (ascending): gathered from a dense buffer, or carried over from
    /// a compact one of another pattern (zero at positions new to it).
    fn compact_at(self, index: &Arc<[usize]>) -> Result<Vec<f32>> {
        match self {
            Momentum::Compact { index: old, values } if Arc::ptr_eq(&old, index) => Ok(values),
            Momentum::Compact { index: old, values } => {
                let mut out = vec![0.0f32; index.len()];
                let mut j = 0;
                for (e, &k) in index.iter().enumerate() {
                    while j < old.len() && old[j] < k {
                        j += 1;
                    }
                    if j < old.len() && old[j] == k {
                        out[e] = values[j];
                    }
                }
                Ok(out)
            }
            Momentum::Dense(t) => Ok(with_f32(&t, "momentum", |b| {
                index
                    .iter()
                    .map(|&k| match b.get(k) {
                        Some(&v) => Ok(v),
                        None => candle_core::bail!("momentum buffer smaller than the pattern"),
                    })
                    .collect::<candle_core::Result<Vec<f32>>>()
            })?),
        }
    }
}

pub struct Sgd {
    params: Vec<Param>,
    /// Per parameter, the kernels its update runs on (its device's).
    backends: Vec<crate::kernels::Backend>,
    momentum_buf: Vec<Option<Momentum>>,
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
            momentum_buf: (0..n).map(|_| None).collect(),
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
        for ((p, backend), slot) in params.zip(self.momentum_buf.iter_mut()) {
            let compact = p
                .slot
                .as_ref()
                .and_then(crate::nn::slot_weight)
                .and_then(|sw| sw.take_grad());
            let Some(g) = grads.get(p.var.as_tensor()) else {
                if let Some((index, g)) = compact {
                    compact_step(p, slot, index, &g, self.momentum != 0.0, [lr, mom, wd])
                        .with_context(|| format!("updating {}", p.name))?;
                }
                continue;
            };
            // A dense gradient (every step of a dense layer, a sparse layer's mask-update
            // steps): the buffer in full.
            let mut buf = slot.take().map(|m| m.dense(p)).transpose()?;
            let result = dense_step(p, backend, g, &mut buf, self.momentum != 0.0, [lr, mom, wd]);
            *slot = buf.map(Momentum::Dense);
            result?;
        }
        Ok(())
    }
}

/// The update of a parameter from its dense gradient `g` (see [`Sgd::step`]).
fn dense_step(
    p: &Param,
    backend: &crate::kernels::Backend,
    g: &Tensor,
    buf: &mut Option<Tensor>,
    use_mom: bool,
    [lr, mom, wd]: [f32; 3],
) -> Result<()> {
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
        return Ok(());
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
            return Ok(());
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
    Ok(())
}

impl Sgd {
    /// Multiplies the momentum buffer of parameter `index` by `mask` (same shape).
    pub fn mask_momentum(&mut self, index: usize, mask: &Tensor) -> Result<()> {
        match &mut self.momentum_buf[index] {
            None => {}
            Some(Momentum::Dense(b)) => *b = b.mul(mask)?,
            Some(Momentum::Compact { index: at, values }) => {
                with_f32(mask, "mask", |m| {
                    for (&k, v) in at.iter().zip(values.iter_mut()) {
                        *v *= m.get(k).copied().unwrap_or(0.0);
                    }
                    Ok(())
                })?;
            }
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
        self.momentum_buf[index] = Some(Momentum::Dense(buf));
        Ok(())
    }

    /// The momentum buffer of parameter `index` in full (None before the first step). Dense
    /// buffers are updated in place by later steps: copy it to keep this step's values.
    pub fn momentum_buffer(&self, index: usize) -> Result<Option<Tensor>> {
        self.momentum_buf[index]
            .as_ref()
            .map(|m| m.dense(&self.params[index]))
            .transpose()
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
    slot: &mut Option<Momentum>,
    index: Arc<[usize]>,
    g: &[f32],
    use_mom: bool,
    [lr, mom, wd]: [f32; 3],
) -> Result<()> {
    let w = p.var.as_tensor();
    let n = w.elem_count();
    // (That the indices ascend, so that every one lies in the weight, the update's pass
    // checks.)
    if index.len() != g.len() || index.last().is_some_and(|&k| k >= n) {
        anyhow::bail!(
            "compact gradient of {} ({} values) does not fit the weight {:?}",
            p.name,
            g.len(),
            w.dims()
        );
    }
    let hyper = [lr, mom, wd];
    if !use_mom {
        sgd::compact_in_place(w, &index, g, hyper)?;
        return Ok(());
    }
    let values = match slot.take() {
        Some(m) => {
            let mut b = m.compact_at(&index)?;
            sgd::compact_momentum(w, &mut b, &index, g, hyper)?;
            b
        }
        None => {
            // First step: `b = g'`, then `w -= lr·g'` (the plain pass).
            let b = if wd != 0.0 {
                with_f32(w, "sgd", |ws| {
                    index
                        .iter()
                        .zip(g)
                        .map(|(&k, &gv)| match ws.get(k) {
                            Some(&wk) => Ok(gv + wk * wd),
                            None => candle_core::bail!("compact gradient outside the weight"),
                        })
                        .collect::<candle_core::Result<Vec<f32>>>()
                })?
            } else {
                g.to_vec()
            };
            sgd::compact_in_place(w, &index, g, hyper)?;
            b
        }
    };
    *slot = Some(Momentum::Compact { index, values });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compact buffer follows its layer's pattern: kept where the pattern is the same list,
    /// carried over by position to a new pattern (zero where a position is new), gathered
    /// from a dense buffer, and densified with zeros elsewhere.
    #[test]
    fn compact_momentum_follows_the_pattern() -> Result<()> {
        let old: Arc<[usize]> = Arc::from(vec![1usize, 4, 6, 9]);
        let m = Momentum::Compact {
            index: old.clone(),
            values: vec![1.0, 4.0, 6.0, 9.0],
        };
        let new: Arc<[usize]> = Arc::from(vec![0usize, 4, 5, 9]);
        assert_eq!(m.compact_at(&new)?, vec![0.0, 4.0, 0.0, 9.0]);
        let same = Momentum::Compact {
            index: old.clone(),
            values: vec![1.0, 2.0, 3.0, 4.0],
        };
        assert_eq!(same.compact_at(&old)?, vec![1.0, 2.0, 3.0, 4.0]);
        let dense = Tensor::from_vec(
            (0..10).map(|v| v as f32).collect::<Vec<_>>(),
            10,
            &Device::Cpu,
        )?;
        assert_eq!(
            Momentum::Dense(dense).compact_at(&new)?,
            vec![0.0, 4.0, 5.0, 9.0]
        );
        let p = Param {
            name: "w".into(),
            var: candle_core::Var::from_tensor(&Tensor::zeros(
                10,
                candle_core::DType::F32,
                &Device::Cpu,
            )?)?,
            kind: ParamKind::Weight,
            slot: None,
        };
        let m = Momentum::Compact {
            index: new,
            values: vec![7.0, 8.0, 9.0, 10.0],
        };
        let d = m.dense(&p)?.to_vec1::<f32>()?;
        assert_eq!(d, [7.0, 0.0, 0.0, 0.0, 8.0, 9.0, 0.0, 0.0, 0.0, 10.0]);
        Ok(())
    }
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
        let b = opt
            .momentum_buffer(0)?
            .expect("momentum")
            .to_vec1::<f32>()?;
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
