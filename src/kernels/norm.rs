//! Batch normalisation over CNHW activations (statistics per channel over `N*H*W`) as candle
//! custom ops: training mode (batch statistics, returned so the caller can update running
//! statistics) and evaluation mode (running statistics), both optionally fused with a ReLU.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use rest_kernels::{batch_norm_bwd, batch_norm_train_fwd, channel_affine, BnBatchStats};

use super::tape::Keep;
use super::{cpu_slice, prepare, scratch, with_f32};

struct BnTrainOp {
    eps: f32,
    relu: bool,
    /// Batch statistics of the forward pass, read by the backward pass and by the caller.
    stats: Arc<Mutex<Option<BnBatchStats>>>,
}

fn lock_err<T>(e: std::sync::PoisonError<T>) -> candle_core::Error {
    candle_core::Error::msg(format!("batch norm statistics lock poisoned: {e}"))
}

impl CustomOp3 for BnTrainOp {
    fn name(&self) -> &'static str {
        "rest-batch-norm-cnhw-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s1, l1, self.name())?;
        let gamma = cpu_slice(s2, l2, self.name())?;
        let beta = cpu_slice(s3, l3, self.name())?;
        let mut y = scratch::output(x.len());
        let stats = batch_norm_train_fwd(x, gamma, beta, self.eps, self.relu, &mut y);
        *self.stats.lock().map_err(lock_err)? = Some(stats);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.stats.lock().map_err(lock_err)?;
        let Some(stats) = guard.as_ref() else {
            candle_core::bail!("{}: backward before forward", self.name());
        };
        let name = self.name();
        let mut dx = scratch::output(x.elem_count());
        let (dg, db) = with_f32(x, name, |xs| {
            with_f32(grad, name, |dy| {
                with_f32(gamma, name, |g| {
                    if self.relu {
                        with_f32(beta, name, |b| {
                            Ok(batch_norm_bwd(xs, dy, g, Some(b), stats, self.eps, &mut dx))
                        })
                    } else {
                        Ok(batch_norm_bwd(xs, dy, g, None, stats, self.eps, &mut dx))
                    }
                })
            })
        })?;
        let dev = x.device();
        Ok((
            x.track_op()
                .then(|| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            gamma
                .track_op()
                .then(|| Tensor::from_vec(dg, gamma.shape(), dev))
                .transpose()?,
            beta.track_op()
                .then(|| Tensor::from_vec(db, beta.shape(), dev))
                .transpose()?,
        ))
    }
}

fn check_params(x: &Tensor, params: &[(&Tensor, &str)], f: &str) -> Result<Vec<Tensor>> {
    let c = x.dim(0)?;
    params
        .iter()
        .map(|(t, name)| {
            let t = prepare(t, 1, &format!("{f} {name}"))?;
            if t.dim(0)? != c {
                bail!(
                    "{f}: {name} has {} entries but x {:?} (CNHW) has {c} channels",
                    t.dim(0)?,
                    x.dims()
                );
            }
            Ok(t)
        })
        .collect()
}

/// Training-mode batch norm of CNHW `x` `[C, N, H, W]` with per-channel `gamma`, `beta` `[C]`:
/// normalises with the batch mean and biased variance, then applies `max(0, .)` when `relu`.
/// Returns `(y, batch_mean, batch_var)` with the biased variance; `y` is differentiable in
/// `x`, `gamma` and `beta` (the statistics are plain tensors). Update running statistics with
/// [`rest_kernels::update_running_stats`] semantics (momentum 0.1, unbiased variance).
pub fn batch_norm_cnhw_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if super::generic_path(x) {
        return super::generic::batch_norm_cnhw_train(x, gamma, beta, eps, relu);
    }
    const F: &str = "batch_norm_cnhw_train";
    let x = prepare(x, 4, "batch_norm_cnhw_train input x [C, N, H, W]")?;
    let p = check_params(&x, &[(gamma, "gamma"), (beta, "beta")], F)?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("{F}: eps must be positive, got {eps}");
    }
    let stats = Arc::new(Mutex::new(None));
    let op = BnTrainOp {
        eps: eps as f32,
        relu,
        stats: stats.clone(),
    };
    // The backward pass reads the arguments, not the output (the ReLU's mask is recomputed).
    let y = super::tape::op3_keep(&x, &p[0], &p[1], op, Keep::only(0b111, false))?;
    let stats = stats
        .lock()
        .map_err(|e| anyhow::anyhow!("{F}: {e}"))?
        .clone()
        .ok_or_else(|| anyhow::anyhow!("{F}: forward produced no statistics"))?;
    let c = stats.mean.len();
    let mean = Tensor::from_vec(stats.mean, c, x.device())?;
    let var = Tensor::from_vec(stats.var, c, x.device())?;
    Ok((y, mean, var))
}

struct BnEvalOp {
    relu: bool,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

impl BnEvalOp {
    fn scale_shift(&self, gamma: &[f32], beta: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let scale: Vec<f32> = gamma.iter().zip(&self.invstd).map(|(g, s)| g * s).collect();
        let shift = beta
            .iter()
            .zip(&scale)
            .zip(&self.mean)
            .map(|((b, s), m)| b - m * s)
            .collect();
        (scale, shift)
    }
}

impl CustomOp3 for BnEvalOp {
    fn name(&self) -> &'static str {
        "rest-batch-norm-cnhw-eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s1, l1, self.name())?;
        let gamma = cpu_slice(s2, l2, self.name())?;
        let beta = cpu_slice(s3, l3, self.name())?;
        let (scale, shift) = self.scale_shift(gamma, beta);
        let mut y = scratch::output(x.len());
        channel_affine(x, &scale, &shift, self.relu, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let c = self.mean.len();
        let m = x.elem_count() / c.max(1);
        let mut dx = scratch::output(x.elem_count());
        let sums: Vec<(f32, f32)> = with_f32(x, name, |xs| {
            with_f32(grad, name, |dy| {
                with_f32(gamma, name, |g| {
                    with_f32(res, name, |y| {
                        Ok(dx
                            .par_chunks_mut(m.max(1))
                            .enumerate()
                            .map(|(ch, dxr)| {
                                let r = ch * m..(ch + 1) * m;
                                let scale = g[ch] * self.invstd[ch];
                                let (mut sg, mut sgx) = (0.0f32, 0.0f32);
                                for (((d, xv), gv), yv) in dxr
                                    .iter_mut()
                                    .zip(&xs[r.clone()])
                                    .zip(&dy[r.clone()])
                                    .zip(&y[r])
                                {
                                    let gm = if self.relu && *yv <= 0.0 { 0.0 } else { *gv };
                                    *d = gm * scale;
                                    sg += gm;
                                    sgx += gm * (xv - self.mean[ch]);
                                }
                                (sgx * self.invstd[ch], sg)
                            })
                            .collect())
                    })
                })
            })
        })?;
        let dev = x.device();
        let dg: Vec<f32> = sums.iter().map(|s| s.0).collect();
        let db: Vec<f32> = sums.iter().map(|s| s.1).collect();
        Ok((
            x.track_op()
                .then(|| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            gamma
                .track_op()
                .then(|| Tensor::from_vec(dg, gamma.shape(), dev))
                .transpose()?,
            beta.track_op()
                .then(|| Tensor::from_vec(db, beta.shape(), dev))
                .transpose()?,
        ))
    }
}

/// Evaluation-mode batch norm of CNHW `x` `[C, N, H, W]` with running statistics:
/// `y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta`, then `max(0, .)` when
/// `relu`. Differentiable in `x`, `gamma`, `beta` (running statistics are constants).
pub fn batch_norm_cnhw_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    if super::generic_path(x) {
        return super::generic::batch_norm_cnhw_eval(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            eps,
            relu,
        );
    }
    const F: &str = "batch_norm_cnhw_eval";
    let x = prepare(x, 4, "batch_norm_cnhw_eval input x [C, N, H, W]")?;
    let p = check_params(
        &x,
        &[
            (gamma, "gamma"),
            (beta, "beta"),
            (running_mean, "running_mean"),
            (running_var, "running_var"),
        ],
        F,
    )?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("{F}: eps must be positive, got {eps}");
    }
    let mean = p[2].to_vec1::<f32>()?;
    let var = p[3].to_vec1::<f32>()?;
    if let Some(v) = var.iter().find(|v| v.is_nan() || **v < 0.0) {
        bail!("{F}: running_var contains {v}; running variances must be non-negative");
    }
    let invstd = var.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect();
    let op = BnEvalOp { relu, mean, invstd };
    Ok(super::tape::op3(&x, &p[0], &p[1], op)?)
}
