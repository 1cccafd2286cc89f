//! The training objective of a run: how an epoch orders its samples and how a batch's
//! per-sample losses become the loss that is minimised. The method's per-sample weights
//! (`super::methods`) are drawn by a weighted sampler (`--reweight-mode sample`) or weight
//! the loss (`loss`); GroupDRO shuffles and weights each batch's loss by its online group
//! weights q.

use super::methods::ReweightMode;
use super::methods::{self, GroupDro, Method};
use crate::data::sampler::{shuffled, WeightedSampler};
use crate::data::Split;
use crate::train::TrainConfig;
use crate::util::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor};
use tracing::info;

/// The objective of a run (see the module doc).
pub struct Objective {
    /// Weighted draws of an epoch's samples (`--reweight-mode sample` with weights).
    sampler: Option<WeightedSampler>,
    /// Per-sample loss weights (`--reweight-mode loss`; all 1 otherwise).
    sample_weights: Vec<f64>,
    mode: ReweightMode,
    /// GroupDRO: each training sample's group and the online group weights.
    dro: Option<(Vec<usize>, GroupDro)>,
    /// The up-weight LAMBDA in effect.
    pub lambda: f64,
}

impl Objective {
    /// The objective of `cfg` on the training split; `error_set` is JTT's up-weighted set.
    pub fn new(cfg: &TrainConfig, train: &Split, error_set: Option<&[usize]>) -> Result<Self> {
        let lambda = cfg.effective_upweight();
        let method_weights =
            methods::sample_weights(cfg.method.kind, train, lambda, cfg.method.groups, error_set)?;
        let sampler = match (&method_weights, cfg.method.reweight_mode) {
            (Some(w), ReweightMode::Sample) => Some(WeightedSampler::new(w)?),
            _ => None,
        };
        let sample_weights = method_weights.unwrap_or_else(|| vec![1.0; train.len()]);
        let dro = if cfg.method.kind == Method::GroupDro {
            let (ids, g) = methods::split_group_ids(train, cfg.method.groups);
            let counts = methods::group_counts(&ids, g);
            info!(
                "GroupDRO over {g} groups ({:?}, training sizes {counts:?}), step size {}, \
                 adjustment {}",
                cfg.method.groups, cfg.method.dro_step_size, cfg.method.dro_adjustment
            );
            Some((
                ids,
                GroupDro::new(counts, cfg.method.dro_step_size, cfg.method.dro_adjustment),
            ))
        } else {
            None
        };
        let how = match cfg.method.reweight_mode {
            ReweightMode::Sample => "weighted sampling",
            ReweightMode::Loss => "loss weights",
        };
        match cfg.method.kind {
            Method::Upweight => info!("re-weighting: lambda = {lambda} by {how}"),
            Method::Jtt => info!("re-weighting: JTT error set x {lambda} by {how}"),
            Method::Erm => info!("method erm: no re-weighting"),
            Method::Balanced | Method::ClassBalanced => {
                info!(
                    "method {}: group-balanced weights by {how}",
                    cfg.method.kind.as_str()
                )
            }
            Method::GroupDro => info!("method group-dro: shuffled epochs, group-weighted loss"),
        }
        Ok(Self {
            sampler,
            sample_weights,
            mode: cfg.method.reweight_mode,
            dro,
            lambda,
        })
    }

    /// The order of an epoch's `n` training samples: weighted draws with replacement, or a
    /// shuffle.
    pub fn epoch_order(&self, n: usize, rng: &mut Rng) -> Vec<usize> {
        match &self.sampler {
            Some(s) => s.draw(n, rng),
            None => shuffled(n, rng),
        }
    }

    /// The batch loss from the per-sample losses `nll` of the samples `idx`: their mean
    /// (weighted sampling), their weighted mean (loss weights), or GroupDRO's q-weighted sum
    /// (which also updates q).
    pub fn loss(&mut self, nll: &Tensor, idx: &[usize], dev: &Device) -> Result<Tensor> {
        Ok(match (self.dro.as_mut(), self.mode) {
            (Some((dro_ids, d)), _) => {
                let l_host = nll.to_vec1::<f32>()?;
                let ids: Vec<usize> = idx.iter().map(|&i| dro_ids[i]).collect();
                let w = d.batch_weights(&ids, &l_host);
                nll.mul(&Tensor::from_vec(w, idx.len(), dev)?)?.sum_all()?
            }
            (None, ReweightMode::Sample) => nll.mean_all()?,
            (None, ReweightMode::Loss) => {
                let w: Vec<f32> = idx.iter().map(|&i| self.sample_weights[i] as f32).collect();
                let total: f32 = w.iter().sum();
                let wt = Tensor::from_vec(w, idx.len(), dev)?;
                nll.mul(&wt)?.sum_all()?.affine(1.0 / total as f64, 0.0)?
            }
        })
    }

    /// GroupDRO's q as exact bits (for checkpoints), if the method is GroupDRO.
    pub fn dro_q_bits(&self) -> Option<Vec<u64>> {
        self.dro.as_ref().map(|(_, d)| d.q_bits())
    }

    /// GroupDRO's q (for the summary), if the method is GroupDRO.
    pub fn dro_q(&self) -> Option<Vec<f64>> {
        self.dro.as_ref().map(|(_, d)| d.q().to_vec())
    }

    /// Restores GroupDRO's q from a checkpoint's bits; `None` for a GroupDRO run is an error
    /// naming `what` (the checkpoint).
    pub fn set_dro_q_bits(&mut self, bits: Option<&[u64]>, what: &str) -> Result<()> {
        if let Some((_, d)) = self.dro.as_mut() {
            let bits = bits.ok_or_else(|| {
                anyhow::anyhow!("{what} has no GroupDRO weights: it is not a group-dro run")
            })?;
            d.set_q_bits(bits)?;
        }
        Ok(())
    }
}
