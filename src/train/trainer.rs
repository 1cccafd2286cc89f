//! The REST training loop. One step: draw a batch (weighted sampling, or uniform with loss
//! weights), forward, cross-entropy, backward, SGD step, then the sparse engine's mask is
//! applied to weights and momentum; every `update_frequency` steps the engine prunes and
//! regrows each layer from host copies of the weights and dense gradients. After each epoch:
//! validation, ReduceLROnPlateau, model selection, outputs. The test split is evaluated once,
//! on the selected weights.

use super::lr::ReduceLrOnPlateau;
use super::metrics::{group_metrics, GroupMetrics};
use super::optim::Sgd;
use super::output::{self, MetricsRow};
use super::select::{SelectRule, Selector};
use crate::config::{ReweightMode, TrainConfig};
use crate::data::sampler::{group_weights, shuffled, WeightedSampler};
use crate::data::{GroupDataset, Split};
use crate::kernels::SparseWeight;
use crate::models::{self, Model};
use crate::nn::{Buffer, Param};
use crate::sparse::{LayerShape, SparseConfig, SparseEngine};
use crate::util;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
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
    pub dataset: String,
    pub model: String,
    pub density: f64,
    pub upweight: f64,
    pub reweight_mode: ReweightMode,
    pub seed: u64,
    pub epochs: usize,
    pub select_rule: SelectRule,
    pub selected_epoch: usize,
    pub valid: GroupMetrics,
    pub test: GroupMetrics,
    pub final_density: f64,
    pub layer_densities: Vec<LayerDensity>,
    pub steps: usize,
    pub update_frequency: Option<usize>,
    pub mask_updates: usize,
    pub wall_time_s: f64,
    pub train_samples_per_s: f64,
}

pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub summary: Summary,
}

/// A snapshot of the model state (weights, buffers, masks) for `best.safetensors`.
struct Snapshot {
    params: Vec<(String, Tensor)>,
    buffers: Vec<Buffer>,
}

fn snapshot(model: &dyn Model) -> Result<Snapshot> {
    Ok(Snapshot {
        params: model
            .params()
            .iter()
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().copy()?)))
            .collect::<Result<_>>()?,
        buffers: model.buffers()?,
    })
}

fn restore(model: &dyn Model, snap: &Snapshot) -> Result<()> {
    for (p, (name, t)) in model.params().iter().zip(&snap.params) {
        debug_assert_eq!(&p.name, name);
        p.var.set(t)?;
    }
    model.set_buffers(&snap.buffers)
}

/// Gathers a batch into an NCHW tensor.
fn batch_tensor(split: &Split, idx: &[usize], buf: &mut Vec<f32>, dev: &Device) -> Result<Tensor> {
    split.gather_nchw(idx, buf);
    Ok(Tensor::from_slice(
        buf,
        (idx.len(), split.channels, split.height, split.width),
        dev,
    )?)
}

/// Evaluates `model` on a whole split in inference mode.
pub fn evaluate(model: &dyn Model, split: &Split, dev: &Device) -> Result<GroupMetrics> {
    let mut preds = Vec::with_capacity(split.len());
    let mut loss_sum = 0.0f64;
    let mut buf = Vec::new();
    let all: Vec<usize> = (0..split.len()).collect();
    for chunk in all.chunks(1000) {
        let x = batch_tensor(split, chunk, &mut buf, dev)?;
        let logits = model.forward(&x, false)?;
        let y: Vec<u32> = chunk.iter().map(|&i| split.labels[i]).collect();
        let yt = Tensor::new(y.as_slice(), dev)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&yt.unsqueeze(1)?, 1)?.neg()?;
        loss_sum += nll.sum_all()?.to_scalar::<f32>()? as f64;
        preds.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    Ok(group_metrics(
        &preds,
        &split.labels,
        &split.bias,
        loss_sum / split.len().max(1) as f64,
    ))
}

/// Builds the dataset a config asks for (today: the built-in Colored MNIST).
pub fn load_dataset(cfg: &TrainConfig) -> Result<GroupDataset> {
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
    let mut on = Vec::with_capacity(weights.len());
    for (l, p) in weights.iter().enumerate() {
        let Some(slot) = &p.slot else {
            on.push(false);
            continue;
        };
        let sparse = mode.sparse_for(densities[l]);
        let new = if sparse {
            let rows = p.var.dims()[0];
            let cols = p.var.elem_count() / rows.max(1);
            let w = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            Some(SparseWeight::new(&w, engine.mask(l), rows, cols)?)
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

/// Runs a complete REST training run as configured; writes the run directory.
pub fn train(cfg: &TrainConfig) -> Result<TrainOutcome> {
    cfg.validate()?;
    let start = Instant::now();
    let dev = Device::Cpu;
    let run_dir = output::create_run_dir(cfg)?;
    let ds = load_dataset(cfg)?;
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
    let model = models::build(cfg.model, input, ds.num_classes, &mut init_rng, &dev)?;
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
        let mut mask_rng = util::rng(cfg.seed, 2);
        Some(SparseEngine::new(shapes, scfg, &mut mask_rng)?)
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

    // Re-weighting.
    let lambda = cfg.effective_upweight();
    let sample_weights = group_weights(&ds.train, lambda);
    let sampler = match cfg.reweight_mode {
        ReweightMode::Sample => Some(WeightedSampler::new(&sample_weights)?),
        ReweightMode::Loss => None,
    };
    info!(
        "re-weighting: lambda = {lambda} by {}",
        match cfg.reweight_mode {
            ReweightMode::Sample => "weighted sampling",
            ReweightMode::Loss => "loss weights",
        }
    );

    let rule = if cfg.reweighting() {
        SelectRule::ValWorstGroup
    } else {
        SelectRule::ValAccuracy
    };
    let mut selector = Selector::new(rule);
    let mut plateau = ReduceLrOnPlateau::new(cfg.lr_factor, cfg.lr_patience);
    let mut sample_rng = util::rng(cfg.seed, 3);
    let mut rows: Vec<MetricsRow> = Vec::new();
    let mut best: Option<Snapshot> = None;
    let mut step = 0usize;
    let mut mask_updates = 0usize;
    let mut last_prune_rate = engine.as_ref().map(|e| e.prune_rate(0)).unwrap_or(0.0);
    let mut buf = Vec::new();
    let mut train_time = 0.0f64;
    let mut samples_seen = 0usize;

    for epoch in 1..=cfg.epochs {
        let t_epoch = Instant::now();
        let order = match &sampler {
            Some(s) => s.draw(ds.train.len(), &mut sample_rng),
            None => shuffled(ds.train.len(), &mut sample_rng),
        };
        let bar = ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", cfg.epochs));
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        let (mut preds, mut lbl, mut bia) = (Vec::new(), Vec::new(), Vec::new());
        for idx in order.chunks(cfg.batch_size) {
            let x = batch_tensor(&ds.train, idx, &mut buf, &dev)?;
            let y: Vec<u32> = idx.iter().map(|&i| ds.train.labels[i]).collect();
            let yt = Tensor::new(y.as_slice(), &dev)?;
            let update_now = engine.as_ref().is_some_and(|e| e.is_update_step(step + 1));
            if update_now {
                set_dense_grad(&weights, true);
            }
            let logits = model.forward(&x, true)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let nll = logp.gather(&yt.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
            let loss = match cfg.reweight_mode {
                ReweightMode::Sample => nll.mean_all()?,
                ReweightMode::Loss => {
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
                     (now {}) or check the data",
                    step + 1,
                    opt.lr
                );
            }
            let grads = loss.backward()?;
            opt.step(&grads)?;
            step += 1;

            if let Some(e) = engine.as_mut() {
                if e.is_update_step(step) {
                    // Zero the momentum of every position inactive before this update, so a
                    // regrown weight starts from zero momentum (the dense gradient of this
                    // step reached it).
                    for (l, mk) in masks.iter().enumerate() {
                        if weight_index[l] != usize::MAX {
                            opt.mask_momentum(weight_index[l], mk)?;
                        }
                    }
                    let mut w_host: Vec<Vec<f32>> = weights
                        .iter()
                        .map(|p| Ok(p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?))
                        .collect::<Result<_>>()?;
                    let g_host: Vec<Vec<f32>> = weights
                        .iter()
                        .map(|p| match grads.get(p.var.as_tensor()) {
                            Some(g) => Ok(g.flatten_all()?.to_vec1::<f32>()?),
                            None => Ok(vec![0.0; p.var.elem_count()]),
                        })
                        .collect::<Result<_>>()?;
                    let stats = e.update(step, &mut w_host, &g_host)?;
                    for (p, w) in weights.iter().zip(w_host) {
                        p.var.set(&Tensor::from_vec(w, p.var.shape(), &dev)?)?;
                    }
                    masks = mask_tensors(e, &weights, &dev)?;
                    on_sparse = install_sparse_kernels(e, &weights, cfg.kernels)?;
                    mask_updates += 1;
                    last_prune_rate = stats.prune_rate;
                    tracing::debug!(
                        "mask update at step {step}: prune rate {:.4}, moved {:?}",
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

            loss_sum += loss_v as f64 * idx.len() as f64;
            seen += idx.len();
            preds.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
            lbl.extend_from_slice(&y);
            bia.extend(idx.iter().map(|&i| ds.train.bias[i]));
            let acc = preds.iter().zip(&lbl).filter(|(p, l)| p == l).count() as f64 / seen as f64;
            bar.set_message(format!("loss {:.4} acc {:.3}", loss_sum / seen as f64, acc));
            bar.inc(1);
        }
        bar.finish_and_clear();
        train_time += t_epoch.elapsed().as_secs_f64();
        samples_seen += seen;

        let train_m = group_metrics(&preds, &lbl, &bia, loss_sum / seen.max(1) as f64);
        let valid_m = evaluate(model.as_ref(), &ds.valid, &dev)?;
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
            rows.push(MetricsRow {
                epoch,
                split: split.into(),
                m,
                lr: lr_used,
                density,
                prune_rate: last_prune_rate,
            });
        }
        output::write_metrics(&run_dir, &rows)?;
        let improved = selector.observe(epoch, &valid_m);
        if improved {
            let snap = snapshot(model.as_ref())?;
            save_weights(
                &run_dir.join("best.safetensors"),
                &snap,
                engine.as_ref(),
                &weights,
                &dev,
            )?;
            best = Some(snap);
        }
        opt.lr = plateau.step(valid_m.loss, opt.lr);
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
            t_epoch.elapsed().as_secs_f64()
        );
    }

    // Report the selected model on the test split.
    let selected_epoch = selector.best_epoch.context("no epoch was evaluated")?;
    if let Some(snap) = &best {
        restore(model.as_ref(), snap)?;
    }
    let test_m = evaluate(model.as_ref(), &ds.test, &dev)?;
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
        prune_rate: last_prune_rate,
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
        dataset: ds.name.clone(),
        model: cfg.model.as_str().into(),
        density: cfg.density,
        upweight: lambda,
        reweight_mode: cfg.reweight_mode,
        seed: cfg.seed,
        epochs: cfg.epochs,
        select_rule: rule,
        selected_epoch,
        valid: valid_m,
        test: test_m,
        final_density: engine.as_ref().map(|e| e.total_density()).unwrap_or(1.0),
        layer_densities,
        steps: step,
        update_frequency: engine.as_ref().map(|e| e.update_frequency()),
        mask_updates,
        wall_time_s: start.elapsed().as_secs_f64(),
        train_samples_per_s: samples_seen as f64 / train_time.max(1e-9),
    };
    output::write_json(&run_dir.join("summary.json"), &summary)?;
    Ok(TrainOutcome { run_dir, summary })
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
