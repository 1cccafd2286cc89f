//! Checkpoints for exact resume: everything a run needs to continue as if never stopped.
//! `checkpoint.safetensors` holds parameters, BatchNorm buffers, momentum buffers and masks;
//! `checkpoint.json` holds the loop state (step, learning rate and its scheduler, model
//! selection, metrics so far, FLOPs integral, the partial epoch) and the config hash. Both are
//! written atomically, tensors first; the JSON is the commit point and names the step the
//! tensors must carry, so a torn pair is detected.

use super::lr::ReduceLrOnPlateau;
use super::output::{self, MetricsRow};
use super::select::Selector;
use crate::nn::Param;
use crate::sparse::flops::TrainFlops;
use crate::train::TrainConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const TENSORS_FILE: &str = "checkpoint.safetensors";
pub const STATE_FILE: &str = "checkpoint.json";
const FORMAT_VERSION: u32 = 1;

/// The training loop's state between steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoopState {
    pub format_version: u32,
    pub config_hash: String,
    /// Epochs fully completed (validation done, metrics written).
    pub epochs_done: usize,
    /// Optimizer steps done.
    pub step: usize,
    pub lr: f64,
    pub plateau: ReduceLrOnPlateau,
    pub selector: Selector,
    pub mask_updates: usize,
    pub last_prune_rate: f64,
    pub train_time: f64,
    pub samples_seen: usize,
    pub flops: TrainFlops,
    pub rows: Vec<MetricsRow>,
    /// An epoch interrupted midway (SIGINT/SIGTERM).
    pub partial: Option<PartialEpoch>,
    /// GroupDRO's group weights q as f64 bits (exact across the JSON round trip).
    #[serde(default)]
    pub dro_q_bits: Option<Vec<u64>>,
}

/// The running training metrics of an epoch that was interrupted after `batches_done` batches.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartialEpoch {
    pub epoch: usize,
    pub batches_done: usize,
    pub loss_sum: f64,
    pub seen: usize,
    pub preds: Vec<u32>,
    pub labels: Vec<u32>,
    pub bias: Vec<u32>,
    pub elapsed: f64,
}

/// A stable 64-bit FNV-1a hash of the config fields that define the run's computation (the
/// output directory, thread count and device excluded), as 16 hex digits.
pub fn config_hash(cfg: &TrainConfig) -> Result<String> {
    let mut c = cfg.clone();
    c.run.out = None;
    c.run.threads = None;
    c.run.device = None;
    let text = c.to_toml()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

/// The tensors of a checkpoint.
pub struct CheckpointTensors<'a> {
    pub params: &'a [Param],
    pub buffers: Vec<crate::nn::Buffer>,
    /// Momentum buffer of each parameter (same order as `params`), if any yet.
    pub momentum: Vec<Option<Tensor>>,
    /// Per maskable weight name: its 0/1 mask.
    pub masks: Vec<(String, Vec<bool>)>,
    /// Per maskable weight name: which positions were ever active (ITOP).
    pub fired: Vec<(String, Vec<bool>)>,
}

/// Writes a checkpoint into `dir` atomically.
pub fn save(dir: &Path, state: &LoopState, t: &CheckpointTensors, dev: &Device) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (p, m) in t.params.iter().zip(&t.momentum) {
        map.insert(format!("param.{}", p.name), p.var.as_tensor().copy()?);
        if let Some(m) = m {
            map.insert(format!("momentum.{}", p.name), m.copy()?);
        }
    }
    for b in &t.buffers {
        map.insert(format!("buffer.{}", b.name), b.tensor.copy()?);
    }
    for (prefix, list) in [("mask", &t.masks), ("mask.fired", &t.fired)] {
        for (name, m) in list {
            let bytes: Vec<u8> = m.iter().map(|&b| b as u8).collect();
            let n = bytes.len();
            map.insert(format!("{prefix}.{name}"), Tensor::from_vec(bytes, n, dev)?);
        }
    }
    map.insert("meta.step".into(), Tensor::new(&[state.step as u32], dev)?);
    output::save_safetensors(&dir.join(TENSORS_FILE), &map)?;
    output::write_json(&dir.join(STATE_FILE), state)
}

/// A loaded checkpoint.
pub struct Loaded {
    pub state: LoopState,
    pub tensors: HashMap<String, Tensor>,
}

impl Loaded {
    /// The tensor `name`, with the shape `like` has, or a clear error.
    pub fn tensor(&self, name: &str, like: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).with_context(|| {
            format!("the checkpoint has no tensor {name}: it was written by another model")
        })?;
        if t.dims() != like {
            bail!(
                "checkpoint tensor {name} has shape {:?}, the model expects {:?}: the checkpoint \
                 belongs to another model or width",
                t.dims(),
                like
            );
        }
        Ok(t.to_dtype(DType::F32)?)
    }

    /// The mask of weight `name` (`numel` entries), if the checkpoint has one.
    pub fn mask(&self, name: &str, numel: usize) -> Result<Option<Vec<bool>>> {
        let Some(t) = self.tensors.get(&format!("mask.{name}")) else {
            return Ok(None);
        };
        let v = t.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        if v.len() != numel {
            bail!(
                "checkpoint mask of {name} has {} entries, the weight has {numel}",
                v.len()
            );
        }
        Ok(Some(v.into_iter().map(|b| b != 0).collect()))
    }
}

/// Whether the run directory holds a checkpoint `rest train --resume` continues from (JTT
/// keeps its stage-1 checkpoint in `stage1/`).
pub fn exists(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists() || dir.join("stage1").join(STATE_FILE).exists()
}

/// Loads the checkpoint in `dir`, checking the format, the config hash and that the tensors
/// belong to the state.
pub fn load(dir: &Path, cfg: &TrainConfig, dev: &Device) -> Result<Loaded> {
    let sp = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&sp).with_context(|| {
        format!(
            "cannot read {} (--resume): the run has no checkpoint yet",
            sp.display()
        )
    })?;
    let state: LoopState = serde_json::from_str(&text)
        .with_context(|| format!("{} is corrupt or truncated", sp.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "{} has format version {}, this rest reads {FORMAT_VERSION}",
            sp.display(),
            state.format_version
        );
    }
    let hash = config_hash(cfg)?;
    if state.config_hash != hash {
        bail!(
            "{} was written for another configuration (hash {} vs {hash}); resume with the run's \
             own config.toml",
            sp.display(),
            state.config_hash
        );
    }
    let tp = dir.join(TENSORS_FILE);
    let tensors = candle_core::safetensors::load(&tp, dev).with_context(|| {
        format!(
            "{} is corrupt or truncated: cannot resume from it",
            tp.display()
        )
    })?;
    let step = tensors
        .get("meta.step")
        .context("checkpoint tensors lack meta.step")?
        .to_vec1::<u32>()?;
    if step.first().copied() != Some(state.step as u32) {
        bail!(
            "{} and {} are from different steps: the checkpoint is torn",
            tp.display(),
            sp.display()
        );
    }
    Ok(Loaded { state, tensors })
}
