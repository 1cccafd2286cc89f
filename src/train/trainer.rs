//! The REST training loop. One step: draw a batch (weighted sampling, or uniform with loss
//! weights), forward, cross-entropy, backward, SGD step, then the sparse engine's mask is
//! applied to weights and momentum; every `update_frequency` steps the engine prunes and
//! regrows each layer from host copies of the weights and dense gradients. After each epoch:
//! validation, ReduceLROnPlateau, model selection, outputs. The test split is evaluated once,
//! on the selected weights. The method (`super::methods`) decides the sample weights or,
//! for GroupDRO, each batch's loss weights; JTT runs the loop twice (stage 1 in `stage1/`).

use super::checkpoint::{self, LoopState, PartialEpoch};
use super::lock;
use super::lr::ReduceLrOnPlateau;
use super::methods::{self, GroupDro, JttReport, Method};
use super::metrics::{group_metrics, GroupMetrics};
use super::optim::Sgd;
use super::output::{self, MetricsRow};
use super::select::{SelectRule, Selector};
use crate::config::{ReweightMode, TrainConfig};
use crate::data::loader::{BatchSource, EpochBatches};
use crate::data::sampler::{shuffled, WeightedSampler};
use crate::data::transform::{BatchLayout, Transform};
use crate::data::{GroupDataset, Split};
use crate::kernels::SparseWeight;
use crate::models::{self, Model};
use crate::nn::{Buffer, Param};
use crate::sparse::device::{self as sparse_device, LayerTensors, UpdatePlace};
use crate::sparse::flops::{FlopsTable, TrainFlops};
use crate::sparse::{LayerShape, SparseConfig, SparseEngine, SparseInit, UpdateInputs};
use crate::util;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tracing::info;

/// Per-layer density in the summary.
#[derive(Debug, Clone, Serialize)]
pub struct LayerDensity {
    pub layer: String,
    pub shape: Vec<usize>,
    pub nonzero: usize,
    pub density: f64,
}

/// The content of `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub rest_version: String,
    /// Where the run trained (`cpu`, `cuda:0`).
    pub device: String,
    pub dataset: String,
    pub model: String,
    pub density: f64,
    pub upweight: f64,
    pub reweight_mode: ReweightMode,
    pub seed: u64,
    pub epochs: usize,
    pub method: Method,
    pub select_rule: SelectRule,
    pub selected_epoch: usize,
    pub valid: GroupMetrics,
    pub test: GroupMetrics,
    pub final_density: f64,
    pub layer_densities: Vec<LayerDensity>,
    pub steps: usize,
    pub update_frequency: Option<usize>,
    pub mask_updates: usize,
    /// ITOP exploration rate: the share of maskable weights that were ever active.
    pub itop_rate: Option<f64>,
    pub wall_time_s: f64,
    pub train_samples_per_s: f64,
    /// Inference FLOPs per sample of the final net, of the dense net, and their ratio.
    pub infer_flops: f64,
    pub infer_flops_dense: f64,
    pub infer_flops_vs_dense: f64,
    /// Training FLOPs of the whole run (RigL accounting), of dense training, and their ratio.
    pub train_flops: f64,
    pub train_flops_dense: f64,
    pub train_flops_vs_dense: f64,
    /// JTT: the error set's size and, against the true conflicting set, precision/recall.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jtt: Option<JttReport>,
    /// GroupDRO: the final group weights q (groups as `--groups` numbers them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dro_q: Option<Vec<f64>>,
}

pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub summary: Summary,
}

/// A snapshot of the model state (weights, buffers, masks) for `best.safetensors`.
struct Snapshot {
    params: Vec<(String, Tensor)>,
    buffers: Vec<Buffer>,
    /// The masks the weights were trained with (sparse runs): evaluating the weights needs
    /// their own sparsity pattern.
    masks: Option<Vec<Vec<bool>>>,
}

fn snapshot(model: &dyn Model, engine: Option<&SparseEngine>) -> Result<Snapshot> {
    Ok(Snapshot {
        params: model
            .params()
            .iter()
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().copy()?)))
            .collect::<Result<_>>()?,
        buffers: model.buffers()?,
        masks: engine.map(|e| e.masks_bool()),
    })
}

/// Puts a snapshot back into the model (and its masks into the engine and the layers'
/// sparse kernels).
fn restore(
    model: &dyn Model,
    snap: &Snapshot,
    engine: Option<&mut SparseEngine>,
    kernels: crate::config::KernelMode,
) -> Result<()> {
    for (p, (name, t)) in model.params().iter().zip(&snap.params) {
        debug_assert_eq!(&p.name, name);
        p.var.set(t)?;
    }
    model.set_buffers(&snap.buffers)?;
    if let (Some(e), Some(m)) = (engine, &snap.masks) {
        e.set_masks_from(m.clone())?;
        install_sparse_kernels(e, &model.weights(), kernels)?;
    }
    Ok(())
}

/// Gathers a batch into an `[N, C, H, W]` tensor laid out as `layout`, through the
/// non-random part of `tf` (evaluation). The tensor takes the gathered buffer over (a copy
/// would cost as much as the gather).
fn batch_tensor(
    split: &Split,
    idx: &[usize],
    tf: &Transform,
    layout: BatchLayout,
    dev: &Device,
) -> Result<Tensor> {
    let mut buf = Vec::new();
    tf.gather_as(split, idx, None, layout, &mut buf)?;
    layout.tensor_from_vec(
        buf,
        idx.len(),
        (split.channels, split.height, split.width),
        dev,
    )
}

/// Evaluates `model` on a whole split in inference mode, with the run's evaluation
/// transform (`Transform::eval_for`: its normalisation, no augmentation).
pub fn evaluate(
    model: &dyn Model,
    split: &Split,
    tf: &Transform,
    dev: &Device,
) -> Result<GroupMetrics> {
    let (preds, loss) = predict(model, split, tf, dev)?;
    Ok(group_metrics(&preds, &split.labels, &split.bias, loss))
}

/// Predicted classes of every sample of a split (inference mode, the non-random part of
/// `tf`) and the mean loss.
pub fn predict(
    model: &dyn Model,
    split: &Split,
    tf: &Transform,
    dev: &Device,
) -> Result<(Vec<u32>, f64)> {
    let mut preds = Vec::with_capacity(split.len());
    let mut loss_sum = 0.0f64;
    let all: Vec<usize> = (0..split.len()).collect();
    for chunk in all.chunks(1000) {
        let x = batch_tensor(split, chunk, tf, model.input_layout(), dev)?;
        let logits = model.forward(&x, false)?;
        let y: Vec<u32> = chunk.iter().map(|&i| split.labels[i]).collect();
        let yt = Tensor::new(y.as_slice(), dev)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&yt.unsqueeze(1)?, 1)?.neg()?;
        loss_sum += nll.sum_all()?.to_scalar::<f32>()? as f64;
        preds.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    Ok((preds, loss_sum / split.len().max(1) as f64))
}

/// Builds the dataset a config asks for: its `--data` folder (resized to the run's image
/// size), or the built-in Colored MNIST.
pub fn load_dataset(cfg: &TrainConfig) -> Result<GroupDataset> {
    // A dataset folder (`--data`): the split sizes of the generator do not apply.
    if let Some(opts) = crate::data::dfa::DfaOptions::from_config(cfg) {
        return Ok(crate::data::dfa::load_sized(&opts, cfg.image_size_resolved())?.dataset);
    }
    let (digits, labels) = crate::data::builtin::builtin_digits()?;
    let spec = crate::data::colored_mnist::ColoredMnistSpec {
        conflict_pct: cfg.conflict_pct,
        sigma: cfg.color_std,
        seed: cfg.data_seed,
        n_train: cfg.train_size,
        n_valid: cfg.valid_size,
        n_test: cfg.test_size,
    };
    crate::data::colored_mnist::generate(&digits, &labels, &spec)
}

/// A tensor's values as a flat host vector.
fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// `t` (a gradient or momentum buffer of `p`) on the host, or zeros when there is none yet.
fn host_or_zeros(t: Option<&Tensor>, p: &Param) -> Result<Vec<f32>> {
    match t {
        Some(t) => to_host(t),
        None => Ok(vec![0.0; p.var.elem_count()]),
    }
}

/// Masks as host `f32` 0/1 tensors, one per maskable weight.
pub(crate) fn mask_tensors(
    engine: &SparseEngine,
    weights: &[Param],
    dev: &Device,
) -> Result<Vec<Tensor>> {
    weights
        .iter()
        .enumerate()
        .map(|(l, p)| Ok(Tensor::from_slice(engine.mask(l), p.var.shape(), dev)?))
        .collect()
}

/// Puts the compact form of each masked weight into its layer's sparse slot when the kernel
/// mode picks the sparse kernel for that layer's density (else clears the slot). Returns, per
/// weight, whether it runs sparse.
pub(crate) fn install_sparse_kernels(
    engine: &SparseEngine,
    weights: &[Param],
    mode: crate::config::KernelMode,
) -> Result<Vec<bool>> {
    let densities = engine.densities();
    // rest's sparse kernels are CPU code: on a GPU every layer runs dense with its mask.
    let mode = if weights
        .iter()
        .any(|p| crate::kernels::generic_path(p.var.as_tensor()))
    {
        crate::config::KernelMode::Dense
    } else {
        mode
    };
    let mut on = Vec::with_capacity(weights.len());
    for (l, p) in weights.iter().enumerate() {
        let Some(slot) = &p.slot else {
            on.push(false);
            continue;
        };
        let sparse = mode.sparse_for(densities[l], p.var.rank() == 4);
        let new = if sparse {
            let rows = p.var.dims()[0];
            let cols = p.var.elem_count() / rows.max(1);
            let w = to_host(p.var.as_tensor())?;
            let sw = SparseWeight::new(&w, engine.mask(l), rows, cols)?;
            // The layer hands our SGD its gradient compactly (`Sgd::step`).
            sw.set_compact_grad(true);
            Some(sw)
        } else {
            None
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = new;
        on.push(sparse);
    }
    Ok(on)
}

/// Asks every installed sparse weight for (or stops asking for) the dense gradient.
pub(crate) fn set_dense_grad(weights: &[Param], on: bool) {
    for p in weights {
        if let Some(sw) = p.slot.as_ref().and_then(crate::nn::slot_weight) {
            sw.set_dense_grad(on);
        }
    }
}

/// Inference FLOPs per sample of `model` with the engine's current masks (dense if none).
pub fn flops_table(
    model: &dyn Model,
    input: (usize, usize, usize),
    engine: Option<&SparseEngine>,
) -> FlopsTable {
    let weights = model.weights();
    FlopsTable::new(&model.layer_flops(input), |name| {
        let l = weights.iter().position(|p| p.name == name)?;
        let n = weights[l].var.elem_count();
        Some((n, engine.map(|e| e.active_count(l)).unwrap_or(n)))
    })
}

/// A flag set by SIGINT/SIGTERM (handler installed once per process; if another handler is
/// already installed, the flag simply never fires).
fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let f = Arc::new(AtomicBool::new(false));
        let g = f.clone();
        if let Err(e) = ctrlc::set_handler(move || g.store(true, Ordering::SeqCst)) {
            tracing::debug!("no SIGINT handler installed: {e}");
        }
        f
    })
    .clone()
}

/// Loads the parameters and buffers of a `best.safetensors` as a snapshot of `model`.
fn load_snapshot(path: &Path, model: &dyn Model, sparse: bool, dev: &Device) -> Result<Snapshot> {
    let t = candle_core::safetensors::load(path, dev)
        .with_context(|| format!("cannot read {} to resume the run", path.display()))?;
    let get = |name: &str| -> Result<Tensor> {
        t.get(name)
            .cloned()
            .with_context(|| format!("{} has no tensor {name}", path.display()))
    };
    Ok(Snapshot {
        params: model
            .params()
            .iter()
            .map(|p| Ok((p.name.clone(), get(&p.name)?)))
            .collect::<Result<_>>()?,
        buffers: model
            .buffers()?
            .into_iter()
            .map(|b| {
                Ok(Buffer {
                    tensor: get(&b.name)?,
                    name: b.name,
                })
            })
            .collect::<Result<_>>()?,
        masks: if sparse {
            Some(
                model
                    .weights()
                    .iter()
                    .map(|p| {
                        let m = get(&format!("mask.{}", p.name))?;
                        Ok(m.flatten_all()?
                            .to_vec1::<u8>()?
                            .into_iter()
                            .map(|b| b != 0)
                            .collect())
                    })
                    .collect::<Result<_>>()?,
            )
        } else {
            None
        },
    })
}

/// Number of training batches that score-based initialisations (SNIP, GraSP) average over.
const SCORE_BATCHES: usize = 3;

/// Per-weight scores for a score-based sparse initialisation: SNIP |w * g| and GraSP w * Hg
/// (Hessian-gradient product by a finite difference of gradients) summed over a few training
/// batches, or |w| for global magnitude. Weights and BatchNorm statistics are left unchanged.
fn init_scores(
    model: &dyn Model,
    weights: &[Param],
    train: &Split,
    cfg: &TrainConfig,
    dev: &Device,
) -> Result<Vec<Vec<f32>>> {
    let w0: Vec<Vec<f32>> = weights
        .iter()
        .map(|p| to_host(p.var.as_tensor()))
        .collect::<Result<_>>()?;
    if cfg.sparse_init == SparseInit::GlobalMagnitude {
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
    let mut rng = util::rng(cfg.seed, 4);
    let order = shuffled(train.len(), &mut rng);
    let tf = Transform::eval_for(cfg);
    let mut total: Vec<Vec<f32>> = w0.iter().map(|w| vec![0.0; w.len()]).collect();
    for idx in order.chunks(cfg.batch_size).take(SCORE_BATCHES) {
        let x = batch_tensor(train, idx, &tf, model.input_layout(), dev)?;
        let y: Vec<u32> = idx.iter().map(|&i| train.labels[i]).collect();
        let y = Tensor::new(y.as_slice(), dev)?;
        let g0 = grads_at(&x, &y)?;
        let s = if cfg.sparse_init == SparseInit::Grasp {
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

/// For each maskable weight, its index among the optimizer's parameters (`usize::MAX` if the
/// optimizer does not hold it).
pub(crate) fn weight_indices(opt: &Sgd, weights: &[Param]) -> Vec<usize> {
    weights
        .iter()
        .map(|w| {
            opt.params()
                .iter()
                .position(|p| p.name == w.name)
                .unwrap_or(usize::MAX)
        })
        .collect()
}

/// After an optimizer step, multiplies each mask into its weight and momentum buffer. Layers on
/// sparse kernels get zero gradient outside their pattern, so their masked weights and momentum
/// stay zero by construction and are skipped, except on mask-update steps (dense gradient).
pub(crate) fn apply_masks(
    weights: &[Param],
    masks: &[Tensor],
    on_sparse: &[bool],
    update_step: bool,
    opt: &mut Sgd,
    weight_index: &[usize],
) -> Result<()> {
    for (l, (p, mk)) in weights.iter().zip(masks).enumerate() {
        if on_sparse[l] && !update_step {
            continue;
        }
        p.var.set(&p.var.as_tensor().mul(mk)?)?;
        if weight_index[l] != usize::MAX {
            opt.mask_momentum(weight_index[l], mk)?;
        }
    }
    Ok(())
}

/// Runs a complete REST training run as configured; writes the run directory, which must not
/// hold a run already (see `train_with`).
pub fn train(cfg: &TrainConfig) -> Result<TrainOutcome> {
    train_with(cfg, false)
}

/// `train`, claiming the run directory for this process for the whole run: a directory that
/// another process holds is refused, and one that holds a run (finished or not) too unless
/// `overwrite`, which replaces that run.
pub fn train_with(cfg: &TrainConfig, overwrite: bool) -> Result<TrainOutcome> {
    cfg.validate()?;
    let (_lock, dir) = output::claim_new_run(cfg, overwrite)?;
    let cfg = TrainConfig {
        out: Some(dir),
        ..cfg.clone()
    };
    run(&cfg, false)
}

/// A sweep's run, as its task (`rest train --sweep-task DIR`, local or a Slurm array task)
/// finds it once it tried to claim the directory.
#[derive(Debug)]
pub enum SweepTask {
    /// Another process holds the run: it is trained elsewhere.
    Held(lock::Holder),
    /// `summary.json` exists: nothing to do.
    Done,
    /// Ours to train: from scratch or from its checkpoint (`resume`), holding the lock.
    Ready {
        lock: lock::RunLock,
        cfg: Box<TrainConfig>,
        resume: bool,
    },
}

/// Claims the sweep run in `dir` (prepared with its `config.toml`) and says what is to be
/// done with it. The decision to resume is taken here, under the lock, from what is on disk
/// now (another sweep may have trained part of it since this sweep looked).
pub fn claim_sweep_task(dir: &Path) -> Result<SweepTask> {
    if !dir.join("config.toml").is_file() {
        bail!(
            "--sweep-task {}: not a sweep run directory (no config.toml)",
            dir.display()
        );
    }
    let lock = match lock::try_claim(dir)? {
        lock::Claim::Held(h) => return Ok(SweepTask::Held(h)),
        lock::Claim::Acquired(l) => l,
    };
    if dir.join("summary.json").exists() {
        return Ok(SweepTask::Done);
    }
    let cfg = resume_config(dir)?;
    lock.announce()?;
    Ok(SweepTask::Ready {
        lock,
        cfg: Box::new(cfg),
        resume: checkpoint::exists(dir),
    })
}

/// Trains a claimed sweep run (`claim_sweep_task`'s `Ready`); the lock is held until it ends.
pub fn run_sweep_task(
    _lock: lock::RunLock,
    cfg: &TrainConfig,
    resume: bool,
) -> Result<TrainOutcome> {
    run(cfg, resume)
}

/// The configuration of the run in `run_dir` (its `config.toml`), for `resume`.
pub fn resume_config(run_dir: &Path) -> Result<TrainConfig> {
    let cfg_path = run_dir.join("config.toml");
    let mut cfg = TrainConfig::from_toml_file(&cfg_path).with_context(|| {
        format!(
            "cannot resume {} (--resume): it is not a run directory",
            run_dir.display()
        )
    })?;
    cfg.out = Some(run_dir.to_path_buf());
    Ok(cfg)
}

/// Continues the run of `cfg` (from `resume_config`) from its last checkpoint; the result
/// equals that of an uninterrupted run (bit-identical on the same machine and thread count).
/// Refused while another process holds the run directory.
pub fn resume(cfg: &TrainConfig) -> Result<TrainOutcome> {
    let dir = cfg
        .out
        .clone()
        .context("internal: resume needs the run directory (resume_config)")?;
    let lock = lock::claim(&dir, "--resume")?;
    lock.announce()?;
    run(cfg, true)
}

/// What one pass of the training loop gets besides the config.
struct StageCtx<'a> {
    ds: &'a GroupDataset,
    start: Instant,
    /// The directory `--resume` must name to continue (the JTT run, not its stage 1).
    resume_dir: PathBuf,
    /// JTT: the error set up-weighted by LAMBDA, and its report for the summary.
    error_set: Option<Vec<usize>>,
    jtt: Option<JttReport>,
    /// Return the final model's predictions on the training split (JTT stage 1).
    want_train_preds: bool,
}

fn run(cfg: &TrainConfig, resume: bool) -> Result<TrainOutcome> {
    cfg.validate()?;
    // A folder's layout decides the default image size, augmentation and normalisation:
    // record it in the run's config.toml, so that eval, predict and resume do not depend on
    // the folder's name.
    let resolved;
    let cfg = match cfg.data_kind() {
        Some(kind) if cfg.dataset != kind => {
            resolved = TrainConfig {
                dataset: kind,
                ..cfg.clone()
            };
            &resolved
        }
        _ => cfg,
    };
    let start = Instant::now();
    let ds = load_dataset(cfg)?;
    if cfg.method != Method::Jtt {
        let run_dir = cfg.out.clone().unwrap_or_default();
        let ctx = StageCtx {
            ds: &ds,
            start,
            resume_dir: run_dir,
            error_set: None,
            jtt: None,
            want_train_preds: false,
        };
        return Ok(run_stage(cfg, resume, ctx)?.0);
    }
    run_jtt(cfg, resume, &ds, start)
}

/// The configuration of JTT's stage 1: ERM for `jtt_epochs` epochs in `<run>/stage1`,
/// keeping the last epoch's model.
fn jtt_stage1_config(cfg: &TrainConfig, run_dir: &Path) -> TrainConfig {
    TrainConfig {
        method: Method::Erm,
        epochs: cfg.jtt_epochs,
        select: Some(SelectRule::Last),
        error_set: None,
        out: Some(run_dir.join("stage1")),
        ..cfg.clone()
    }
}

/// Just Train Twice: stage 1 (unless `--error-set` or a finished stage 1 gives the error set),
/// the error set and its report, then stage 2 with the error set up-weighted.
fn run_jtt(
    cfg: &TrainConfig,
    resume: bool,
    ds: &GroupDataset,
    start: Instant,
) -> Result<TrainOutcome> {
    let run_dir = output::create_run_dir(cfg)?;
    // Both stages write to this directory, even when its name was generated.
    let cfg = &TrainConfig {
        out: Some(run_dir.clone()),
        ..cfg.clone()
    };
    let n = ds.train.len();
    let es_path = run_dir.join("error_set.json");
    let (error, stage1_epochs) = if let Some(f) = &cfg.error_set {
        let e = methods::load_error_set(f, n)?;
        info!(
            "JTT: error set of {} samples read from {}",
            e.len(),
            f.display()
        );
        methods::save_error_set(&es_path, &e, n)?;
        (e, None)
    } else if resume && es_path.exists() {
        (methods::load_error_set(&es_path, n)?, Some(cfg.jtt_epochs))
    } else {
        let s1 = jtt_stage1_config(cfg, &run_dir);
        let s1_dir = run_dir.join("stage1");
        let s1_resume = resume && s1_dir.join(checkpoint::STATE_FILE).exists();
        info!(
            "JTT stage 1: ERM identification model for {} epoch(s) in {}",
            cfg.jtt_epochs,
            s1_dir.display()
        );
        let ctx = StageCtx {
            ds,
            start,
            resume_dir: run_dir.clone(),
            error_set: None,
            jtt: None,
            want_train_preds: true,
        };
        let (_, preds) = run_stage(&s1, s1_resume, ctx)?;
        let preds = preds.context("JTT stage 1 returned no training predictions")?;
        let e = methods::error_set(&preds, &ds.train.labels);
        methods::save_error_set(&es_path, &e, n)?;
        (e, Some(cfg.jtt_epochs))
    };
    if error.is_empty() {
        tracing::warn!(
            "JTT: the error set is empty (stage 1 fits every training sample); stage 2 is \
             plain ERM: lower --jtt-epochs"
        );
    }
    let conflicting: Vec<bool> = (0..n).map(|i| ds.train.is_conflicting(i)).collect();
    let mut report = methods::jtt_report(&error, &conflicting);
    report.stage1_epochs = stage1_epochs;
    info!(
        "JTT error set ({}): {} of {} training samples; against the {} true bias-conflicting \
         samples: precision {}, recall {}",
        es_path.display(),
        report.size,
        n,
        report.conflicting,
        fmt_opt(report.precision),
        fmt_opt(report.recall)
    );
    info!(
        "JTT stage 2: error set up-weighted by lambda {}",
        cfg.effective_upweight()
    );
    let resume2 = resume && run_dir.join(checkpoint::STATE_FILE).exists();
    let ctx = StageCtx {
        ds,
        start,
        resume_dir: run_dir,
        error_set: Some(error),
        jtt: Some(report),
        want_train_preds: false,
    };
    let mut out = run_stage(cfg, resume2, ctx)?.0;
    if stage1_epochs.is_some() {
        add_stage1_flops(&mut out)?;
    }
    Ok(out)
}

/// JTT trained its stage 1 in this run: the run's training FLOPs are both stages' (stage 1's
/// from `stage1/summary.json`), and `summary.json` is rewritten with them.
fn add_stage1_flops(out: &mut TrainOutcome) -> Result<()> {
    let path = out.run_dir.join("stage1").join("summary.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read JTT stage 1's {}", path.display()))?;
    let s1: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid summary", path.display()))?;
    let (Some(f), Some(fd)) = (s1["train_flops"].as_f64(), s1["train_flops_dense"].as_f64()) else {
        bail!("{} has no train_flops / train_flops_dense", path.display());
    };
    let s = &mut out.summary;
    s.train_flops += f;
    s.train_flops_dense += fd;
    s.train_flops_vs_dense = s.train_flops / s.train_flops_dense.max(f64::MIN_POSITIVE);
    output::write_json(&out.run_dir.join("summary.json"), &out.summary)
}

/// One training loop over `cfg` (a whole run, or a JTT stage).
fn run_stage(
    cfg: &TrainConfig,
    resume: bool,
    ctx: StageCtx,
) -> Result<(TrainOutcome, Option<Vec<u32>>)> {
    let start = ctx.start;
    let ds = ctx.ds;
    let dev = crate::device::open(cfg.device.unwrap_or_default())?;
    if !dev.is_cpu() {
        info!(
            "device {}: candle's CUDA ops (rest's sparse CPU kernels are not used; masks are \
             applied to dense weights on the device)",
            crate::device::name(&dev)
        );
    }
    let run_dir = output::create_run_dir(cfg)?;
    let resume_dir = if cfg.method == Method::Jtt || ctx.want_train_preds {
        ctx.resume_dir.clone()
    } else {
        run_dir.clone()
    };
    info!(
        "dataset {}: {} train ({} conflicting), {} valid, {} test; run directory {}",
        ds.name,
        ds.train.len(),
        ds.train.conflicting_count(),
        ds.valid.len(),
        ds.test.len(),
        run_dir.display()
    );

    let mut init_rng = util::rng(cfg.seed, 1);
    let input = (ds.train.channels, ds.train.height, ds.train.width);
    let model = models::build(cfg, input, ds.num_classes, &mut init_rng, &dev)?;
    let weights = model.weights();
    let mut opt = Sgd::new(model.params(), cfg.lr, cfg.momentum, cfg.weight_decay);
    let weight_index = weight_indices(&opt, &weights);

    let steps_per_epoch = ds.train.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;

    // Sparse engine and initial masks.
    let mut engine = if cfg.sparse() {
        let shapes: Vec<LayerShape> = weights
            .iter()
            .map(|p| LayerShape::new(p.name.clone(), p.var.dims()))
            .collect();
        let scfg = SparseConfig {
            density: cfg.density,
            prune_rate: cfg.prune_rate,
            final_prune_rate: cfg.final_prune_rate,
            update_frequency: cfg.update_frequency,
            total_steps,
            erk_power_scale: cfg.erk_power_scale,
        };
        let opts = cfg.dst_options();
        let mut mask_rng = util::rng(cfg.seed, 2);
        Some(if opts.sparse_init.is_score_based() {
            let scores = init_scores(model.as_ref(), &weights, &ds.train, cfg, &dev)?;
            SparseEngine::new_from_scores(shapes, scfg, opts, &scores, &mut mask_rng)?
        } else {
            SparseEngine::with_options(shapes, scfg, opts, &mut mask_rng)?
        })
    } else {
        None
    };
    let mut on_sparse = vec![false; weights.len()];
    let mut masks = match &engine {
        Some(e) => {
            let m = mask_tensors(e, &weights, &dev)?;
            for (p, mk) in weights.iter().zip(&m) {
                p.var.set(&p.var.as_tensor().mul(mk)?)?;
            }
            on_sparse = install_sparse_kernels(e, &weights, cfg.kernels)?;
            info!(
                "kernels ({:?}): {}",
                cfg.kernels,
                weights
                    .iter()
                    .zip(&on_sparse)
                    .map(|(p, s)| format!("{} {}", p.name, if *s { "sparse" } else { "dense" }))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            info!(
                "sparse training at density {:.4}: per-layer {}; mask update every {} steps",
                e.total_density(),
                e.densities()
                    .iter()
                    .map(|d| format!("{d:.3}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                e.update_frequency()
            );
            m
        }
        None => Vec::new(),
    };
    // Where mask updates run: on the device off the CPU (`REST_MASK_UPDATE` overrides).
    let device_masks = match &engine {
        Some(e) if sparse_device::update_place(&dev)? == UpdatePlace::Device => {
            match sparse_device::host_only_reason(e.options()) {
                Some(why) => {
                    info!("mask updates run on the host: {why} has no device version");
                    false
                }
                None => {
                    info!("mask updates run on the device");
                    true
                }
            }
        }
        _ => false,
    };

    // Re-weighting: the method's per-sample weights, drawn by the sampler or used as loss
    // weights; GroupDRO shuffles and weights each batch's loss by its group weights q.
    let lambda = cfg.effective_upweight();
    let method_weights = methods::sample_weights(
        cfg.method,
        &ds.train,
        lambda,
        cfg.groups,
        ctx.error_set.as_deref(),
    )?;
    let sampler = match (&method_weights, cfg.reweight_mode) {
        (Some(w), ReweightMode::Sample) => Some(WeightedSampler::new(w)?),
        _ => None,
    };
    let sample_weights = method_weights.unwrap_or_else(|| vec![1.0; ds.train.len()]);
    let (dro_ids, mut dro) = if cfg.method == Method::GroupDro {
        let (ids, g) = methods::group_ids(&ds.train.labels, &ds.train.bias, cfg.groups);
        let counts = methods::group_counts(&ids, g);
        info!(
            "GroupDRO over {g} groups ({:?}, training sizes {counts:?}), step size {}, \
             adjustment {}",
            cfg.groups, cfg.dro_step_size, cfg.dro_adjustment
        );
        (
            ids,
            Some(GroupDro::new(counts, cfg.dro_step_size, cfg.dro_adjustment)),
        )
    } else {
        (Vec::new(), None)
    };
    let how = match cfg.reweight_mode {
        ReweightMode::Sample => "weighted sampling",
        ReweightMode::Loss => "loss weights",
    };
    match cfg.method {
        Method::Upweight => info!("re-weighting: lambda = {lambda} by {how}"),
        Method::Jtt => info!("re-weighting: JTT error set x {lambda} by {how}"),
        Method::Erm => info!("method erm: no re-weighting"),
        Method::Balanced | Method::ClassBalanced => {
            info!(
                "method {}: group-balanced weights by {how}",
                cfg.method.as_str()
            )
        }
        Method::GroupDro => info!("method group-dro: shuffled epochs, group-weighted loss"),
    }

    let (rule, why) = cfg.select_rule();
    info!("model selection: {} ({why})", rule.as_str());
    let mut st = LoopState {
        format_version: 1,
        config_hash: checkpoint::config_hash(cfg)?,
        epochs_done: 0,
        step: 0,
        lr: cfg.lr,
        plateau: ReduceLrOnPlateau::new(cfg.lr_factor, cfg.lr_patience),
        selector: Selector::new(rule),
        mask_updates: 0,
        last_prune_rate: engine.as_ref().map(|e| e.prune_rate(0)).unwrap_or(0.0),
        train_time: 0.0,
        samples_seen: 0,
        flops: TrainFlops::default(),
        rows: Vec::new(),
        partial: None,
        dro_q_bits: dro.as_ref().map(|d| d.q_bits()),
    };
    let mut best: Option<Snapshot> = None;

    // Resume: restore every tensor and the loop state from the run's checkpoint.
    if resume {
        let ck = checkpoint::load(&run_dir, cfg, &dev)?;
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
        if let Some(e) = engine.as_mut() {
            let mut ms = Vec::new();
            for p in &weights {
                ms.push(ck.mask(&p.name, p.var.elem_count())?.with_context(|| {
                    format!(
                        "the checkpoint has no mask for {}: it is not a sparse run",
                        p.name
                    )
                })?);
            }
            e.set_masks_from(ms)?;
            let mut fired = Vec::new();
            for p in &weights {
                fired.push(
                    ck.mask(&format!("fired.{}", p.name), p.var.elem_count())?
                        .with_context(|| {
                            format!("the checkpoint has no ITOP mask for {}", p.name)
                        })?,
                );
            }
            e.set_fired_masks(fired)?;
            masks = mask_tensors(e, &weights, &dev)?;
            on_sparse = install_sparse_kernels(e, &weights, cfg.kernels)?;
        }
        st = ck.state;
        opt.lr = st.lr;
        if let Some(d) = dro.as_mut() {
            d.set_q_bits(st.dro_q_bits.as_deref().with_context(|| {
                format!(
                    "the checkpoint in {} has no GroupDRO weights: it is not a group-dro run",
                    run_dir.display()
                )
            })?)?;
        }
        if st.selector.best_epoch.is_some() {
            best = Some(load_snapshot(
                &run_dir.join("best.safetensors"),
                model.as_ref(),
                engine.is_some(),
                &dev,
            )?);
        }
        info!(
            "resumed from {} at epoch {}, step {}",
            run_dir.join(checkpoint::STATE_FILE).display(),
            st.epochs_done + st.partial.as_ref().map(|_| 1).unwrap_or(0),
            st.step
        );
    }

    let train_tf = Transform::train_for(cfg);
    let eval_tf = train_tf.eval();
    let prefetch = cfg.prefetch_resolved();
    info!(
        "data pipeline: {}; batches prepared {}",
        describe_transform(&train_tf, cfg.image_size_resolved()),
        if prefetch {
            "on a worker thread (prefetch)"
        } else {
            "on the training thread"
        }
    );
    write_data_info(&run_dir, ds)?;
    let mut flops_now = flops_table(model.as_ref(), input, engine.as_ref());
    let interrupted = interrupt_flag();

    // Saves a checkpoint of the current state.
    let save_ck = |st: &LoopState, opt: &Sgd, engine: &Option<SparseEngine>| -> Result<()> {
        let params = opt.params().to_vec();
        let tensors = checkpoint::CheckpointTensors {
            momentum: (0..params.len())
                .map(|i| opt.momentum_buffer(i).cloned())
                .collect(),
            params: &params,
            buffers: model.buffers()?,
            masks: match engine {
                Some(e) => weights
                    .iter()
                    .map(|p| p.name.clone())
                    .zip(e.masks_bool())
                    .collect(),
                None => Vec::new(),
            },
            fired: match engine {
                Some(e) => weights
                    .iter()
                    .map(|p| p.name.clone())
                    .zip(e.fired_masks().to_vec())
                    .collect(),
                None => Vec::new(),
            },
        };
        checkpoint::save(&run_dir, st, &tensors, &dev)
    };

    for epoch in st.epochs_done + 1..=cfg.epochs {
        let t_epoch = Instant::now();
        // One RNG stream per epoch: an epoch's draws do not depend on how the run got there,
        // which makes resume exact.
        let mut sample_rng = util::rng(cfg.seed, 1000 + epoch as u64);
        let order = match &sampler {
            Some(s) => s.draw(ds.train.len(), &mut sample_rng),
            None => shuffled(ds.train.len(), &mut sample_rng),
        };
        let mut pe = match st.partial.take() {
            Some(p) if p.epoch == epoch => p,
            _ => PartialEpoch {
                epoch,
                ..Default::default()
            },
        };
        let bar = ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", cfg.epochs));
        bar.set_position(pe.batches_done as u64);
        // Running training accuracy of the epoch (a resumed epoch starts from its counts).
        let mut correct = pe
            .preds
            .iter()
            .zip(&pe.labels)
            .filter(|(p, l)| p == l)
            .count();
        let layout = model.input_layout();
        let plan = EpochBatches {
            split: &ds.train,
            order: &order,
            batch_size: cfg.batch_size,
            transform: train_tf,
            seed: cfg.seed,
            epoch,
            layout,
        };
        let shape = (ds.train.channels, ds.train.height, ds.train.width);
        // Time the step spent waiting for its batch (with prefetching, ~0 when the worker
        // keeps up).
        let mut data_wait = 0.0f64;
        let t_loop = Instant::now();
        let first_batch = pe.batches_done;
        std::thread::scope(|scope| -> Result<()> {
            let mut source = BatchSource::new(scope, plan, pe.batches_done, prefetch)?;
            for (bi, idx) in order
                .chunks(cfg.batch_size)
                .enumerate()
                .skip(pe.batches_done)
            {
                let t_wait = Instant::now();
                let batch = source
                    .next_batch()
                    .context("internal error: the data pipeline ended before the epoch")??;
                data_wait += t_wait.elapsed().as_secs_f64();
                if batch.index != bi {
                    bail!(
                        "internal error: batch {} arrived where {bi} was due",
                        batch.index
                    );
                }
                // The tensor takes the batch's buffer over (no copy; the worker allocates the
                // next one, which costs less than copying this one on the training thread).
                let x = layout.tensor_from_vec(batch.data, idx.len(), shape, &dev)?;
                let y: Vec<u32> = idx.iter().map(|&i| ds.train.labels[i]).collect();
                let yt = Tensor::new(y.as_slice(), &dev)?;
                let update_now = engine
                    .as_ref()
                    .is_some_and(|e| e.is_update_step(st.step + 1));
                if update_now {
                    set_dense_grad(&weights, true);
                }
                // The forward pass is recorded (leanly: only what each backward pass reads
                // is kept); the backward pass replays it (see `kernels::tape`), or candle's
                // runs it where nothing was recorded (the generic GPU path).
                let tape = crate::kernels::tape::start_lean();
                let logits = model.forward(&x, true)?;
                let rec = tape.finish(logits)?;
                if st.step == 0 {
                    if let Some(why) = rec.fallback_reason() {
                        tracing::debug!("backward pass on candle's autograd: {why}");
                    }
                }
                let nll = crate::kernels::softmax_nll(rec.head(), &yt)?;
                let batch_preds = rec.head().argmax(D::Minus1)?.to_vec1::<u32>()?;
                let loss = match (dro.as_mut(), cfg.reweight_mode) {
                    (Some(d), _) => {
                        let l_host = nll.to_vec1::<f32>()?;
                        let ids: Vec<usize> = idx.iter().map(|&i| dro_ids[i]).collect();
                        let w = d.batch_weights(&ids, &l_host);
                        st.dro_q_bits = Some(d.q_bits());
                        nll.mul(&Tensor::from_vec(w, idx.len(), &dev)?)?.sum_all()?
                    }
                    (None, ReweightMode::Sample) => nll.mean_all()?,
                    (None, ReweightMode::Loss) => {
                        let w: Vec<f32> = idx.iter().map(|&i| sample_weights[i] as f32).collect();
                        let total: f32 = w.iter().sum();
                        let wt = Tensor::from_vec(w, idx.len(), &dev)?;
                        nll.mul(&wt)?.sum_all()?.affine(1.0 / total as f64, 0.0)?
                    }
                };
                let loss_v = loss.to_scalar::<f32>()?;
                if !loss_v.is_finite() {
                    bail!(
                        "the training loss became {loss_v} at epoch {epoch}, step {}: lower --lr \
                     (now {}) or check the data; the last good checkpoint is kept in {}",
                        st.step + 1,
                        opt.lr,
                        run_dir.display()
                    );
                }
                let grads = rec.backward(&loss)?;
                opt.step(&grads)?;
                st.step += 1;
                st.flops
                    .step(idx.len(), flops_now.sparse, flops_now.dense, update_now);

                if let Some(e) = engine.as_mut() {
                    // `update_now` was decided before the forward pass (the sparse layers then
                    // produced the dense gradient this update needs).
                    if update_now {
                        let on_device = if device_masks {
                            let views: Vec<LayerTensors> = weights
                                .iter()
                                .zip(&masks)
                                .enumerate()
                                .map(|(l, (p, mask))| LayerTensors {
                                    weight: p.var.as_tensor(),
                                    grad: grads.get(p.var.as_tensor()),
                                    momentum: (weight_index[l] != usize::MAX)
                                        .then(|| opt.momentum_buffer(weight_index[l]))
                                        .flatten(),
                                    mask,
                                })
                                .collect();
                            sparse_device::update_on_device(e, st.step, &views)?
                        } else {
                            None
                        };
                        // Without a device version (or on a non-finite value, which the host
                        // path reports), the update runs on host copies.
                        let stats = if let Some(u) = on_device {
                            for (l, (p, (w, m))) in weights
                                .iter()
                                .zip(u.weights.into_iter().zip(u.momentum))
                                .enumerate()
                            {
                                if let Some(w) = w {
                                    p.var.set(&w)?;
                                }
                                if let Some(m) = m {
                                    opt.set_momentum_buffer(weight_index[l], m)?;
                                }
                            }
                            masks = u.masks;
                            u.stats
                        } else {
                            let mut w_host: Vec<Vec<f32>> = weights
                                .iter()
                                .map(|p| to_host(p.var.as_tensor()))
                                .collect::<Result<_>>()?;
                            let g_host: Vec<Vec<f32>> = weights
                                .iter()
                                .map(|p| host_or_zeros(grads.get(p.var.as_tensor()), p))
                                .collect::<Result<_>>()?;
                            // Momentum before masking: at inactive positions it holds this step's
                            // dense gradient (what `--growth momentum` ranks); the engine zeroes
                            // the dropped and regrown positions, so a regrown weight starts from
                            // zero momentum.
                            let mut m_host: Vec<Vec<f32>> = weights
                                .iter()
                                .enumerate()
                                .map(|(l, p)| {
                                    host_or_zeros(opt.momentum_buffer(weight_index[l]), p)
                                })
                                .collect::<Result<_>>()?;
                            let stats = e.update_with(
                                st.step,
                                UpdateInputs {
                                    weights: &mut w_host,
                                    grads: &g_host,
                                    momentum: Some(&mut m_host),
                                },
                            )?;
                            for (l, (p, (w, m))) in weights
                                .iter()
                                .zip(w_host.into_iter().zip(m_host))
                                .enumerate()
                            {
                                p.var.set(&Tensor::from_vec(w, p.var.shape(), &dev)?)?;
                                if opt.momentum_buffer(weight_index[l]).is_some() {
                                    opt.set_momentum_buffer(
                                        weight_index[l],
                                        Tensor::from_vec(m, p.var.shape(), &dev)?,
                                    )?;
                                }
                            }
                            masks = mask_tensors(e, &weights, &dev)?;
                            stats
                        };
                        on_sparse = install_sparse_kernels(e, &weights, cfg.kernels)?;
                        flops_now = flops_table(model.as_ref(), input, Some(&*e));
                        st.mask_updates += 1;
                        st.last_prune_rate = stats.prune_rate;
                        tracing::debug!(
                            "mask update at step {}: prune rate {:.4}, moved {:?}",
                            st.step,
                            stats.prune_rate,
                            stats.grown
                        );
                    }
                    apply_masks(
                        &weights,
                        &masks,
                        &on_sparse,
                        update_now,
                        &mut opt,
                        &weight_index,
                    )?;
                }

                pe.loss_sum += loss_v as f64 * idx.len() as f64;
                pe.seen += idx.len();
                correct += batch_preds.iter().zip(&y).filter(|(p, l)| p == l).count();
                pe.preds.extend(batch_preds);
                pe.labels.extend_from_slice(&y);
                pe.bias.extend(idx.iter().map(|&i| ds.train.bias[i]));
                pe.batches_done = bi + 1;
                let acc = correct as f64 / pe.seen as f64;
                bar.set_message(format!(
                    "loss {:.4} acc {:.3}",
                    pe.loss_sum / pe.seen as f64,
                    acc
                ));
                bar.inc(1);

                if interrupted.load(Ordering::SeqCst) {
                    bar.finish_and_clear();
                    pe.elapsed += t_epoch.elapsed().as_secs_f64();
                    st.partial = Some(std::mem::take(&mut pe));
                    st.lr = opt.lr;
                    save_ck(&st, &opt, &engine)?;
                    bail!(
                        "interrupted at epoch {epoch}, step {}; checkpoint written: continue with \
                     `rest train --resume {}`",
                        st.step,
                        resume_dir.display()
                    );
                }
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        report_data_wait(
            epoch,
            pe.batches_done.saturating_sub(first_batch),
            data_wait,
            t_loop.elapsed().as_secs_f64(),
            prefetch,
        );
        let epoch_time = pe.elapsed + t_epoch.elapsed().as_secs_f64();
        st.train_time += epoch_time;
        st.samples_seen += pe.seen;

        let train_m = group_metrics(
            &pe.preds,
            &pe.labels,
            &pe.bias,
            pe.loss_sum / pe.seen.max(1) as f64,
        );
        let valid_m = evaluate(model.as_ref(), &ds.valid, &eval_tf, &dev)?;
        if !valid_m.loss.is_finite() {
            bail!(
                "the validation loss became {} at epoch {epoch}: lower --lr (now {})",
                valid_m.loss,
                opt.lr
            );
        }
        let lr_used = opt.lr;
        let density = engine.as_ref().map(|e| e.total_density()).unwrap_or(1.0);
        for (split, m) in [("train", train_m.clone()), ("valid", valid_m.clone())] {
            st.rows.push(MetricsRow {
                epoch,
                split: split.into(),
                m,
                lr: lr_used,
                density,
                prune_rate: st.last_prune_rate,
            });
        }
        output::write_metrics(&run_dir, &st.rows)?;
        if let Some(e) = &engine {
            util::write_atomic(&run_dir.join("masks.csv"), e.masks_csv().as_bytes())?;
        }
        let improved = st.selector.observe(epoch, &valid_m);
        if improved {
            let snap = snapshot(model.as_ref(), engine.as_ref())?;
            save_weights(
                &run_dir.join("best.safetensors"),
                &snap,
                engine.as_ref(),
                &weights,
                &dev,
            )?;
            best = Some(snap);
        }
        opt.lr = st.plateau.step(valid_m.loss, opt.lr);
        st.lr = opt.lr;
        st.epochs_done = epoch;
        save_ck(&st, &opt, &engine)?;
        info!(
            "epoch {epoch}/{}: train loss {:.4} acc {:.3} | valid loss {:.4} acc {:.3} aligned {} conflicting {} worst-group {:.3}{} | lr {:.0e} density {:.4} | {:.1}s",
            cfg.epochs,
            train_m.loss,
            train_m.accuracy,
            valid_m.loss,
            valid_m.accuracy,
            fmt_opt(valid_m.aligned),
            fmt_opt(valid_m.conflicting),
            valid_m.worst_group,
            if improved { " *" } else { "" },
            lr_used,
            density,
            epoch_time
        );
    }

    // Report the selected model on the test split.
    let selected_epoch = st.selector.best_epoch.context("no epoch was evaluated")?;
    if let Some(snap) = &best {
        restore(model.as_ref(), snap, engine.as_mut(), cfg.kernels)?;
        flops_now = flops_table(model.as_ref(), input, engine.as_ref());
    }
    let test_m = evaluate(model.as_ref(), &ds.test, &eval_tf, &dev)?;
    let train_preds = if ctx.want_train_preds {
        Some(predict(model.as_ref(), &ds.train, &eval_tf, &dev)?.0)
    } else {
        None
    };
    let mut rows = st.rows.clone();
    let valid_m = rows
        .iter()
        .find(|r| r.epoch == selected_epoch && r.split == "valid")
        .map(|r| r.m.clone())
        .context("selected epoch has no validation row")?;
    rows.push(MetricsRow {
        epoch: selected_epoch,
        split: "test".into(),
        m: test_m.clone(),
        lr: opt.lr,
        density: engine.as_ref().map(|e| e.total_density()).unwrap_or(1.0),
        prune_rate: st.last_prune_rate,
    });
    output::write_metrics(&run_dir, &rows)?;

    let layer_densities = weights
        .iter()
        .enumerate()
        .map(|(l, p)| {
            let n = p.var.elem_count();
            let nz = engine.as_ref().map(|e| e.active_count(l)).unwrap_or(n);
            LayerDensity {
                layer: p.name.clone(),
                shape: p.var.dims().to_vec(),
                nonzero: nz,
                density: nz as f64 / n as f64,
            }
        })
        .collect();
    let summary = Summary {
        rest_version: env!("CARGO_PKG_VERSION").into(),
        device: crate::device::name(&dev),
        dataset: ds.name.clone(),
        model: cfg.model.as_str().into(),
        density: cfg.density,
        upweight: lambda,
        reweight_mode: cfg.reweight_mode,
        seed: cfg.seed,
        epochs: cfg.epochs,
        method: cfg.method,
        select_rule: rule,
        selected_epoch,
        valid: valid_m,
        test: test_m,
        final_density: engine.as_ref().map(|e| e.total_density()).unwrap_or(1.0),
        layer_densities,
        steps: st.step,
        update_frequency: engine.as_ref().map(|e| e.update_frequency()),
        mask_updates: st.mask_updates,
        itop_rate: engine.as_ref().map(|e| e.itop_rate()),
        wall_time_s: start.elapsed().as_secs_f64(),
        train_samples_per_s: st.samples_seen as f64 / st.train_time.max(1e-9),
        infer_flops: flops_now.sparse,
        infer_flops_dense: flops_now.dense,
        infer_flops_vs_dense: flops_now.ratio(),
        train_flops: st.flops.sparse,
        train_flops_dense: st.flops.dense,
        train_flops_vs_dense: st.flops.ratio(),
        jtt: ctx.jtt,
        dro_q: dro.as_ref().map(|d| d.q().to_vec()),
    };
    output::write_json(&run_dir.join("summary.json"), &summary)?;
    Ok((TrainOutcome { run_dir, summary }, train_preds))
}

/// Seconds of an epoch spent waiting for data below which [`report_data_wait`] only logs.
const DATA_WAIT_WARN_S: f64 = 0.5;

/// Logs (debug) how long the epoch's steps waited for their batches, and warns when data
/// loading held training up by more than 10 % despite prefetching, and by at least
/// [`DATA_WAIT_WARN_S`] (tiny models on small images wait a few percent of a very short
/// epoch: nothing worth acting on).
fn report_data_wait(epoch: usize, steps: usize, wait_s: f64, loop_s: f64, prefetch: bool) {
    if steps == 0 {
        return;
    }
    let share = wait_s / loop_s.max(1e-9);
    tracing::debug!(
        "epoch {epoch}: waited {:.2} ms per step for data ({:.1} % of {:.1} ms per step)",
        wait_s * 1e3 / steps as f64,
        share * 100.0,
        loop_s * 1e3 / steps as f64
    );
    if prefetch && share > 0.1 && wait_s >= DATA_WAIT_WARN_S && steps >= 10 {
        tracing::warn!(
            "epoch {epoch}: training waited for data {:.0} % of the time: the data pipeline \
             is the bottleneck (large images, few cores); a smaller --image-size or \
             --no-augment is faster",
            share * 100.0
        );
    }
}

/// What a run's data pipeline does, for the log.
fn describe_transform(tf: &Transform, image_size: Option<usize>) -> String {
    let mut parts = Vec::new();
    if let Some(s) = image_size {
        parts.push(format!("resize to {s}x{s} on load"));
    }
    if tf.crop_padding > 0 {
        parts.push(format!("random crop with padding {}", tf.crop_padding));
    }
    if tf.flip {
        parts.push("horizontal flip".to_string());
    }
    match &tf.normalize {
        Some(n) => parts.push(format!("normalise mean {:?} std {:?}", n.mean, n.std)),
        None => parts.push("scale to [0, 1]".to_string()),
    }
    parts.join(", ")
}

/// The input shape and class count of a run's data (`data.json` in the run directory), so
/// that `rest eval`, `rest predict` and `rest export` rebuild the model without the data.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DataInfo {
    pub dataset: String,
    /// `[channels, height, width]` of the model input.
    pub input: [usize; 3],
    pub classes: usize,
}

/// File name of [`DataInfo`] in a run directory.
pub const DATA_INFO_FILE: &str = "data.json";

fn write_data_info(run_dir: &Path, ds: &GroupDataset) -> Result<()> {
    let t = &ds.train;
    output::write_json(
        &run_dir.join(DATA_INFO_FILE),
        &DataInfo {
            dataset: ds.name.clone(),
            input: [t.channels, t.height, t.width],
            classes: ds.num_classes,
        },
    )
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

/// Writes weights, BatchNorm buffers and masks (`mask.<weight>`, u8) to a safetensors file.
fn save_weights(
    path: &std::path::Path,
    snap: &Snapshot,
    engine: Option<&SparseEngine>,
    weights: &[Param],
    dev: &Device,
) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &snap.params {
        map.insert(name.clone(), t.clone());
    }
    for b in &snap.buffers {
        map.insert(b.name.clone(), b.tensor.clone());
    }
    if let Some(e) = engine {
        for (l, p) in weights.iter().enumerate() {
            let m: Vec<u8> = e.mask(l).iter().map(|&v| (v != 0.0) as u8).collect();
            map.insert(
                format!("mask.{}", p.name),
                Tensor::from_vec(m, p.var.shape(), dev)?.to_dtype(DType::U8)?,
            );
        }
    }
    output::save_safetensors(path, &map)
}
