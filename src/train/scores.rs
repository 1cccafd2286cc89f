//! Per-weight scores for the score-based sparse initialisations (SNIP, GraSP, global
//! magnitude), computed from a few training batches before the first step.

use super::eval::batch_tensor;
use super::masked::{host_or_zeros, to_host};
use crate::data::sampler::shuffled;
use crate::data::Split;
use crate::models::Model;
use crate::nn::Param;
use crate::sparse::SparseInit;
use crate::train::TrainConfig;
use crate::util;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Number of training batches that score-based initialisations (SNIP, GraSP) average over.
const SCORE_BATCHES: usize = 3;

/// Per-weight scores for a score-based sparse initialisation: SNIP |w * g| and GraSP w * Hg
/// (Hessian-gradient product by a finite difference of gradients) summed over a few training
/// batches, or |w| for global magnitude. Weights and BatchNorm statistics are left unchanged.
pub(crate) fn init_scores(
    model: &dyn Model,
    weights: &[Param],
    train: &Split,
    tf: &crate::data::transform::Transform,
    cfg: &TrainConfig,
    dev: &Device,
) -> Result<Vec<Vec<f32>>> {
    let w0: Vec<Vec<f32>> = weights
        .iter()
        .map(|p| to_host(p.var.as_tensor()))
        .collect::<Result<_>>()?;
    if cfg.sparse.sparse_init == SparseInit::GlobalMagnitude {
        return Ok(crate::sparse::magnitude_scores(&w0));
    }
    let saved = model.buffers()?;
    let grads_at = |x: &Tensor, y: &Tensor| -> Result<Vec<Vec<f32>>> {
        let logits = model.forward(x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        let g = loss.backward()?;
        weights
            .iter()
            .map(|p| host_or_zeros(g.get(p.var.as_tensor()), p))
            .collect()
    };
    let mut rng = util::rng(cfg.optim.seed, 4);
    let order = shuffled(train.len(), &mut rng);
    let mut total: Vec<Vec<f32>> = w0.iter().map(|w| vec![0.0; w.len()]).collect();
    for idx in order.chunks(cfg.optim.batch_size).take(SCORE_BATCHES) {
        let x = batch_tensor(train, idx, tf, model.input_layout(), dev)?;
        let y: Vec<u32> = idx.iter().map(|&i| train.labels[i]).collect();
        let y = Tensor::new(y.as_slice(), dev)?;
        let g0 = grads_at(&x, &y)?;
        let s = if cfg.sparse.sparse_init == SparseInit::Grasp {
            // Hg ~ (grad(w + h g) - grad(w)) / h, with the step h g of L2 norm 1e-2.
            let norm = g0
                .iter()
                .flatten()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let h = 1e-2 / norm.max(1e-12);
            for ((p, w), g) in weights.iter().zip(&w0).zip(&g0) {
                let moved: Vec<f32> = w
                    .iter()
                    .zip(g)
                    .map(|(w, g)| w + (h * *g as f64) as f32)
                    .collect();
                p.var.set(&Tensor::from_vec(moved, p.var.shape(), dev)?)?;
            }
            let g1 = grads_at(&x, &y)?;
            for (p, w) in weights.iter().zip(&w0) {
                p.var.set(&Tensor::from_slice(w, p.var.shape(), dev)?)?;
            }
            let hg: Vec<Vec<f32>> = g1
                .iter()
                .zip(&g0)
                .map(|(a, b)| {
                    a.iter()
                        .zip(b)
                        .map(|(a, b)| ((*a - *b) as f64 / h) as f32)
                        .collect()
                })
                .collect();
            crate::sparse::grasp_scores(&w0, &hg)
        } else {
            crate::sparse::snip_scores(&w0, &g0)
        };
        for (t, s) in total.iter_mut().zip(s) {
            for (t, s) in t.iter_mut().zip(s) {
                *t += s;
            }
        }
    }
    model.set_buffers(&saved)?;
    Ok(total)
}
