//! Resuming a run from its checkpoint: every tensor (parameters, momentum, BatchNorm
//! buffers), the masks and ITOP masks, GroupDRO's q, the loop state and the selected
//! snapshot, so the resumed run repeats exactly what the uninterrupted one would have done.

use super::checkpoint::{self, LoopState};
use super::masked::MaskedLayers;
use super::objective::Objective;
use super::optim::Sgd;
use super::snapshot::{load_snapshot, Snapshot};
use crate::models::Model;
use crate::nn::Buffer;
use crate::train::TrainConfig;
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::Path;

/// What a checkpoint restores besides the tensors it puts back in place.
pub(crate) struct Restored {
    pub state: LoopState,
    /// The snapshot of the epoch selected so far (`best.safetensors`), if any.
    pub best: Option<Snapshot>,
}

/// Restores the checkpoint in `run_dir` into the model, the optimizer, the masked layers and
/// the objective.
pub(crate) fn restore(
    run_dir: &Path,
    cfg: &TrainConfig,
    dev: &Device,
    model: &dyn Model,
    opt: &mut Sgd,
    layers: Option<&mut MaskedLayers>,
    objective: &mut Objective,
) -> Result<Restored> {
    let ck = checkpoint::load(run_dir, cfg, dev)?;
    for (i, p) in opt.params().to_vec().iter().enumerate() {
        p.var
            .set(&ck.tensor(&format!("param.{}", p.name), p.var.dims())?)?;
        if let Some(m) = ck.tensors.get(&format!("momentum.{}", p.name)) {
            opt.set_momentum_buffer(i, ck.tensor(&format!("momentum.{}", p.name), m.dims())?)?;
        }
    }
    let bufs = model
        .buffers()?
        .into_iter()
        .map(|b| {
            let t = ck.tensor(&format!("buffer.{}", b.name), b.tensor.dims())?;
            Ok(Buffer {
                name: b.name,
                tensor: t,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    model.set_buffers(&bufs)?;
    let sparse = layers.is_some();
    if let Some(ml) = layers {
        let mut masks = Vec::new();
        let mut fired = Vec::new();
        for p in &ml.weights {
            masks.push(ck.mask(&p.name, p.var.elem_count())?.with_context(|| {
                format!(
                    "the checkpoint has no mask for {}: it is not a sparse run",
                    p.name
                )
            })?);
        }
        for p in &ml.weights {
            fired.push(
                ck.mask(&format!("fired.{}", p.name), p.var.elem_count())?
                    .with_context(|| format!("the checkpoint has no ITOP mask for {}", p.name))?,
            );
        }
        ml.set_masks(masks, Some(fired))?;
    }
    let state = ck.state;
    opt.lr = state.lr;
    objective.set_dro_q_bits(
        state.dro_q_bits.as_deref(),
        &format!("the checkpoint in {}", run_dir.display()),
    )?;
    let best = if state.selector.best_epoch.is_some() {
        Some(load_snapshot(
            &run_dir.join("best.safetensors"),
            model,
            sparse,
            dev,
        )?)
    } else {
        None
    };
    tracing::info!(
        "resumed from {} at epoch {}, step {}",
        run_dir.join(checkpoint::STATE_FILE).display(),
        state.epochs_done + state.partial.as_ref().map(|_| 1).unwrap_or(0),
        state.step
    );
    Ok(Restored { state, best })
}
