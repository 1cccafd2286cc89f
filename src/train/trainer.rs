//! The training loop: one pass over `cfg` (a whole run, or one JTT stage). Its set-up builds
//! the model, the optimizer, the masked layers (`super::masked`) and the objective
//! (`super::objective`), or restores them from the checkpoint (`super::resume`); each epoch
//! runs its steps (batch, forward, loss, backward, SGD, masks: see `Stage::step`), then
//! validation, ReduceLROnPlateau, model selection, the outputs and a checkpoint; at the end
//! the selected weights are restored and evaluated once on the test split.

use super::checkpoint::{self, LoopState, PartialEpoch};
use super::eval::{evaluate, predict};
use super::lr::ReduceLrOnPlateau;
use super::masked::{flops_table, layer_shapes, MaskedLayers};
use super::methods::JttReport;
use super::metrics::{fmt_opt, group_metrics_in};
use super::objective::Objective;
use super::optim::Sgd;
use super::output::{self, MetricsRow};
use super::select::{SelectRule, Selector};
use super::snapshot::{self, Snapshot};
use super::summary::{LayerDensity, Summary, TrainOutcome};
use crate::data::loader::{BatchSource, EpochBatches};
use crate::data::transform::Transform;
use crate::data::{DataPlan, GroupDataset};
use crate::models::{self, Model};
use crate::sparse::flops::FlopsTable;
use crate::sparse::SparseEngine;
use crate::train::TrainConfig;
use crate::util;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tracing::info;

/// What one pass of the training loop gets besides the config.
pub(super) struct StageCtx<'a> {
    pub ds: &'a GroupDataset,
    /// The run's data options, resolved once (transforms, image size, prefetch).
    pub plan: &'a DataPlan,
    pub start: Instant,
    /// The directory `--resume` must name to continue (the JTT run, not its stage 1).
    pub resume_dir: PathBuf,
    /// JTT: the error set up-weighted by LAMBDA, and its report for the summary.
    pub error_set: Option<Vec<usize>>,
    pub jtt: Option<JttReport>,
    /// Return the final model's predictions on the training split (JTT stage 1).
    pub want_train_preds: bool,
    /// The dataset was handed over in memory (`run::train_on_dataset`), not named by `cfg`.
    pub in_memory: bool,
    /// The library caller's per-epoch callback and progress choice.
    pub hooks: &'a Hooks<'a>,
}

/// What a training loop tells a [`Hooks::on_epoch`] callback after each epoch.
#[derive(Debug)]
pub struct EpochReport<'a> {
    /// The epoch just finished (1-based) and the loop's number of epochs.
    pub epoch: usize,
    pub epochs: usize,
    /// JTT's stage 1 (the ERM identification model, in `<run>/stage1`), which runs its own
    /// loop of `jtt_epochs` before the run's.
    pub jtt_stage1: bool,
    /// The epoch's `metrics.csv` rows (`train`, then `valid`), as written to the file
    /// ([`super::output::metrics_csv`] formats them).
    pub rows: &'a [MetricsRow],
}

/// A per-epoch callback: an error stops the run (after the epoch's files and checkpoint are
/// written) with that error.
pub type EpochCallback<'a> = &'a (dyn Fn(&EpochReport) -> Result<()> + Sync);

/// What a library caller (the Python module) adds to a training run; the CLI uses the
/// default: no callback, the per-step progress bar on stderr.
#[derive(Default, Clone, Copy)]
pub struct Hooks<'a> {
    /// Called after every epoch of every loop (JTT: stage 1's too).
    pub on_epoch: Option<EpochCallback<'a>>,
    /// Hide the per-step progress bar (a caller that shows its own progress).
    pub quiet: bool,
}

/// One training loop over `cfg`; with `want_train_preds`, also the final model's predictions
/// on the training split.
pub(super) fn run_stage(
    cfg: &TrainConfig,
    resume: bool,
    ctx: StageCtx,
) -> Result<(TrainOutcome, Option<Vec<u32>>)> {
    let mut s = Stage::new(cfg, resume, &ctx)?;
    for epoch in s.st.epochs_done + 1..=cfg.optim.epochs {
        let (pe, epoch_time) = s.train_epoch(epoch)?;
        s.end_epoch(epoch, &pe, epoch_time)?;
        if let Some(on_epoch) = ctx.hooks.on_epoch {
            let first =
                s.st.rows
                    .iter()
                    .position(|r| r.epoch == epoch)
                    .unwrap_or(s.st.rows.len());
            on_epoch(&EpochReport {
                epoch,
                epochs: cfg.optim.epochs,
                jtt_stage1: ctx.want_train_preds,
                rows: &s.st.rows[first..],
            })?;
        }
    }
    s.finish(ctx)
}

/// The state of one training loop.
struct Stage<'a> {
    cfg: &'a TrainConfig,
    ds: &'a GroupDataset,
    dev: Device,
    run_dir: PathBuf,
    resume_dir: PathBuf,
    /// The dataset was handed over in memory: the run cannot be resumed.
    in_memory: bool,
    start: Instant,
    input: (usize, usize, usize),
    model: Box<dyn Model>,
    opt: Sgd,
    /// Sparse runs: the engine, masks and kernel choice.
    layers: Option<MaskedLayers>,
    objective: Objective,
    rule: SelectRule,
    st: LoopState,
    /// The snapshot of the epoch selected so far.
    best: Option<Snapshot>,
    train_tf: Transform,
    eval_tf: Transform,
    prefetch: bool,
    /// Inference FLOPs per sample of the current net (the training FLOPs' accounting unit).
    flops: FlopsTable,
    interrupted: Arc<AtomicBool>,
    /// No per-step progress bar (`Hooks::quiet`).
    quiet: bool,
}

impl<'a> Stage<'a> {
    fn new(cfg: &'a TrainConfig, resume: bool, ctx: &StageCtx<'a>) -> Result<Self> {
        let ds = ctx.ds;
        let dev = crate::device::open(cfg.run.device.unwrap_or_default())?;
        if !dev.is_cpu() {
            info!(
                "device {}: candle's CUDA ops (rest's sparse CPU kernels are not used; masks \
                 are applied to dense weights on the device)",
                crate::device::name(&dev)
            );
        }
        let run_dir = output::create_run_dir(cfg)?;
        let resume_dir = if cfg.method.kind == super::methods::Method::Jtt || ctx.want_train_preds {
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

        let mut init_rng = util::rng(cfg.optim.seed, 1);
        let input = (ds.train.channels, ds.train.height, ds.train.width);
        let model = models::build(cfg.model, input, ds.num_classes, &mut init_rng, &dev)?;
        if let (Some(file), false) = (&cfg.optim.init_from, resume) {
            let r = models::init::init_from(model.as_ref(), file)?;
            info!(
                "initial weights from {}: {} tensors{}",
                file.display(),
                r.loaded,
                match &r.head_replaced {
                    Some((names, shape)) => format!(
                        "; the head ({}) is new: the file's is {shape:?} for another class \
                         count, this dataset has {} classes",
                        names.join(", "),
                        ds.num_classes
                    ),
                    None => String::new(),
                }
            );
        }
        let mut opt = Sgd::new(
            model.params(),
            cfg.optim.lr,
            cfg.optim.momentum,
            cfg.optim.weight_decay,
        );
        let total_steps = ds.train.len().div_ceil(cfg.optim.batch_size) * cfg.optim.epochs;
        let mut layers = if cfg.sparse.is_sparse() {
            let engine = initial_engine(cfg, model.as_ref(), ctx, total_steps, &dev)?;
            let ml = MaskedLayers::new(engine, model.weights(), &opt, cfg.sparse.kernels, &dev)?;
            log_sparse_setup(cfg, &ml);
            Some(ml)
        } else {
            None
        };
        let mut objective = Objective::new(cfg, &ds.train, ctx.error_set.as_deref())?;
        let (rule, why) = cfg.select_rule();
        info!("model selection: {} ({why})", rule.as_str());
        let mut st = LoopState {
            format_version: 1,
            config_hash: checkpoint::config_hash(cfg)?,
            epochs_done: 0,
            step: 0,
            lr: cfg.optim.lr,
            plateau: ReduceLrOnPlateau::new(cfg.optim.lr_factor, cfg.optim.lr_patience),
            selector: Selector::new(rule),
            mask_updates: 0,
            last_prune_rate: layers.as_ref().map_or(0.0, |l| l.engine.prune_rate(0)),
            train_time: 0.0,
            samples_seen: 0,
            flops: Default::default(),
            rows: Vec::new(),
            partial: None,
            dro_q_bits: objective.dro_q_bits(),
        };
        let mut best = None;
        if resume {
            let r = super::resume::restore(
                &run_dir,
                cfg,
                &dev,
                model.as_ref(),
                &mut opt,
                layers.as_mut(),
                &mut objective,
            )?;
            st = r.state;
            best = r.best;
        }

        let train_tf = ctx.plan.train_transform;
        let prefetch = ctx.plan.prefetch;
        info!(
            "data pipeline: {}; batches prepared {}",
            describe_transform(&train_tf, ctx.plan.image_size),
            if prefetch {
                "on a worker thread (prefetch)"
            } else {
                "on the training thread"
            }
        );
        output::write_data_info(&run_dir, ds, ctx.in_memory)?;
        let flops = flops_table(model.as_ref(), input, layers.as_ref().map(|l| &l.engine));
        Ok(Self {
            cfg,
            ds,
            dev,
            run_dir,
            resume_dir,
            in_memory: ctx.in_memory,
            start: ctx.start,
            input,
            model,
            opt,
            layers,
            objective,
            rule,
            st,
            best,
            eval_tf: train_tf.eval(),
            train_tf,
            prefetch,
            flops,
            interrupted: {
                // Each loop starts uninterrupted: a process may train again after a Ctrl-C
                // stopped a run (the Python module).
                let f = interrupt_flag();
                f.store(false, Ordering::SeqCst);
                f
            },
            quiet: ctx.hooks.quiet,
        })
    }

    /// The training steps of `epoch` (from where an interrupted epoch stopped); returns the
    /// epoch's running metrics and its training time. On SIGINT/SIGTERM, checkpoints and
    /// stops with an error saying how to resume.
    fn train_epoch(&mut self, epoch: usize) -> Result<(PartialEpoch, f64)> {
        let (cfg, ds) = (self.cfg, self.ds);
        let t_epoch = Instant::now();
        // One RNG stream per epoch: an epoch's draws do not depend on how the run got there,
        // which makes resume exact.
        let mut sample_rng = util::rng(cfg.optim.seed, 1000 + epoch as u64);
        let order = self.objective.epoch_order(ds.train.len(), &mut sample_rng);
        let mut pe = match self.st.partial.take() {
            Some(p) if p.epoch == epoch => p,
            _ => PartialEpoch {
                epoch,
                ..Default::default()
            },
        };
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            epoch_bar(
                ds.train.len().div_ceil(cfg.optim.batch_size),
                epoch,
                cfg.optim.epochs,
            )
        };
        bar.set_position(pe.batches_done as u64);
        // Running training accuracy of the epoch (a resumed epoch starts from its counts).
        let mut correct = pe
            .preds
            .iter()
            .zip(&pe.labels)
            .filter(|(p, l)| p == l)
            .count();
        let layout = self.model.input_layout();
        let plan = EpochBatches {
            split: &ds.train,
            order: &order,
            batch_size: cfg.optim.batch_size,
            transform: self.train_tf,
            seed: cfg.optim.seed,
            epoch,
            layout,
        };
        let shape = (ds.train.channels, ds.train.height, ds.train.width);
        // Time the step spent waiting for its batch (~0 when the prefetch worker keeps up).
        let mut data_wait = 0.0f64;
        let t_loop = Instant::now();
        let first_batch = pe.batches_done;
        std::thread::scope(|scope| -> Result<()> {
            let mut source = BatchSource::new(scope, plan, pe.batches_done, self.prefetch)?;
            let batches = order.chunks(cfg.optim.batch_size).enumerate();
            for (bi, idx) in batches.skip(pe.batches_done) {
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
                // The tensor takes the batch's buffer over (no copy).
                let x = layout.tensor_from_vec(batch.data, idx.len(), shape, &self.dev)?;
                let y: Vec<u32> = idx.iter().map(|&i| ds.train.labels[i]).collect();
                let (loss, preds) = self.step(&x, &y, idx, epoch)?;

                pe.loss_sum += loss as f64 * idx.len() as f64;
                pe.seen += idx.len();
                correct += preds.iter().zip(&y).filter(|(p, l)| p == l).count();
                pe.preds.extend(preds);
                pe.labels.extend_from_slice(&y);
                pe.bias.extend(idx.iter().map(|&i| ds.train.bias[i]));
                pe.batches_done = bi + 1;
                let (mean_loss, acc) = (
                    pe.loss_sum / pe.seen as f64,
                    correct as f64 / pe.seen as f64,
                );
                bar.set_message(format!("loss {mean_loss:.4} acc {acc:.3}"));
                bar.inc(1);
                if self.interrupted.load(Ordering::SeqCst) {
                    bar.finish_and_clear();
                    pe.elapsed += t_epoch.elapsed().as_secs_f64();
                    self.st.partial = Some(std::mem::take(&mut pe));
                    self.st.lr = self.opt.lr;
                    self.save_checkpoint()?;
                    if self.in_memory {
                        bail!(
                            "interrupted at epoch {epoch}, step {}; the images were handed over \
                             in memory, so this run cannot be resumed: train it again",
                            self.st.step
                        );
                    }
                    bail!(
                        "interrupted at epoch {epoch}, step {}; checkpoint written: continue \
                         with `rest train --resume {}`",
                        self.st.step,
                        self.resume_dir.display()
                    );
                }
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        let steps = pe.batches_done.saturating_sub(first_batch);
        let loop_s = t_loop.elapsed().as_secs_f64();
        report_data_wait(epoch, steps, data_wait, loop_s, self.prefetch);
        let epoch_time = pe.elapsed + t_epoch.elapsed().as_secs_f64();
        Ok((pe, epoch_time))
    }

    /// One training step on the batch `x` (labels `y`, sample indices `idx`): returns its
    /// loss and predictions.
    fn step(
        &mut self,
        x: &Tensor,
        y: &[u32],
        idx: &[usize],
        epoch: usize,
    ) -> Result<(f32, Vec<u32>)> {
        let yt = Tensor::new(y, &self.dev)?;
        // Decided before the forward pass: the sparse layers then produce the dense gradient
        // a mask update ranks.
        let update = self
            .layers
            .as_ref()
            .is_some_and(|l| l.begin_step(self.st.step + 1));
        // The forward pass is recorded (leanly: only what each backward pass reads is kept);
        // the backward pass replays it (see `kernels::tape`), or candle's runs it where
        // nothing was recorded (the generic GPU path).
        let tape = crate::kernels::tape::start_lean();
        let logits = self.model.forward(x, true)?;
        let rec = tape.finish(logits)?;
        if self.st.step == 0 {
            if let Some(why) = rec.fallback_reason() {
                tracing::debug!("backward pass on candle's autograd: {why}");
            }
        }
        let nll = crate::kernels::softmax_nll(rec.head(), &yt)?;
        let preds = rec.head().argmax(D::Minus1)?.to_vec1::<u32>()?;
        let loss = self.objective.loss(&nll, idx, &self.dev)?;
        let loss_v = loss.to_scalar::<f32>()?;
        if !loss_v.is_finite() {
            bail!(
                "the training loss became {loss_v} at epoch {epoch}, step {}: lower --lr (now {}) \
                 or check the data; the last good checkpoint is kept in {}",
                self.st.step + 1,
                self.opt.lr,
                self.run_dir.display()
            );
        }
        let grads = rec.backward(&loss)?;
        self.opt.step(&grads)?;
        self.st.step += 1;
        self.st
            .flops
            .step(idx.len(), self.flops.sparse, self.flops.dense, update);
        if let Some(ml) = self.layers.as_mut() {
            if let Some(stats) = ml.end_step(self.st.step, update, &grads, &mut self.opt)? {
                self.flops = flops_table(self.model.as_ref(), self.input, Some(&ml.engine));
                self.st.mask_updates += 1;
                self.st.last_prune_rate = stats.prune_rate;
                tracing::debug!(
                    "mask update at step {}: prune rate {:.4}, moved {:?}",
                    self.st.step,
                    stats.prune_rate,
                    stats.grown
                );
            }
        }
        Ok((loss_v, preds))
    }

    /// After an epoch's steps: validation, the metrics rows and files, model selection (and
    /// `best.safetensors`), the learning-rate schedule and a checkpoint.
    fn end_epoch(&mut self, epoch: usize, pe: &PartialEpoch, epoch_time: f64) -> Result<()> {
        let (cfg, ds) = (self.cfg, self.ds);
        self.st.train_time += epoch_time;
        self.st.samples_seen += pe.seen;
        let train_loss = pe.loss_sum / pe.seen.max(1) as f64;
        let train_m = group_metrics_in(
            &pe.preds,
            &pe.labels,
            &pe.bias,
            train_loss,
            ds.train.groups.as_deref(),
        );
        let valid_m = evaluate(self.model.as_ref(), &ds.valid, &self.eval_tf, &self.dev)?;
        if !valid_m.loss.is_finite() {
            bail!(
                "the validation loss became {} at epoch {epoch}: lower --lr (now {})",
                valid_m.loss,
                self.opt.lr
            );
        }
        let lr_used = self.opt.lr;
        let density = self.engine().map_or(1.0, |e| e.total_density());
        for (split, m) in [("train", train_m.clone()), ("valid", valid_m.clone())] {
            self.st.rows.push(MetricsRow {
                epoch,
                split: split.into(),
                m,
                lr: lr_used,
                density,
                prune_rate: self.st.last_prune_rate,
            });
        }
        output::write_metrics(&self.run_dir, &self.st.rows)?;
        if let Some(e) = self.engine() {
            util::write_atomic(&self.run_dir.join("masks.csv"), e.masks_csv().as_bytes())?;
        }
        let improved = self.st.selector.observe(epoch, &valid_m);
        if improved {
            let snap = snapshot::snapshot(self.model.as_ref(), self.engine())?;
            let path = self.run_dir.join("best.safetensors");
            snapshot::save_weights(&path, &snap, self.layers.as_ref(), &self.dev)?;
            self.best = Some(snap);
        }
        self.opt.lr = self.st.plateau.step(valid_m.loss, self.opt.lr);
        self.st.lr = self.opt.lr;
        self.st.epochs_done = epoch;
        self.save_checkpoint()?;
        info!(
            "epoch {epoch}/{}: train loss {:.4} acc {:.3} | valid loss {:.4} acc {:.3} aligned {} conflicting {} worst-group {:.3}{} | lr {:.0e} density {:.4} | {:.1}s",
            cfg.optim.epochs,
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
        Ok(())
    }

    fn engine(&self) -> Option<&SparseEngine> {
        self.layers.as_ref().map(|l| &l.engine)
    }

    /// Writes a checkpoint of the whole loop state.
    fn save_checkpoint(&mut self) -> Result<()> {
        self.st.dro_q_bits = self.objective.dro_q_bits();
        let params = self.opt.params().to_vec();
        let tensors = checkpoint::CheckpointTensors {
            momentum: (0..params.len())
                .map(|i| self.opt.momentum_buffer(i))
                .collect::<Result<_>>()?,
            params: &params,
            buffers: self.model.buffers()?,
            masks: self
                .layers
                .as_ref()
                .map_or_else(Vec::new, |l| l.named_masks()),
            fired: self
                .layers
                .as_ref()
                .map_or_else(Vec::new, |l| l.named_fired()),
        };
        checkpoint::save(&self.run_dir, &self.st, &tensors, &self.dev)
    }

    /// Restores the selected snapshot, evaluates it on the test split once, and writes the
    /// final `metrics.csv` and `summary.json`.
    fn finish(mut self, ctx: StageCtx) -> Result<(TrainOutcome, Option<Vec<u32>>)> {
        let (cfg, ds) = (self.cfg, self.ds);
        let selected_epoch = self
            .st
            .selector
            .best_epoch
            .context("no epoch was evaluated")?;
        if let Some(snap) = &self.best {
            snapshot::restore(self.model.as_ref(), snap, self.layers.as_mut())?;
            self.flops = flops_table(self.model.as_ref(), self.input, self.engine());
        }
        let model = self.model.as_ref();
        let test_m = evaluate(model, &ds.test, &self.eval_tf, &self.dev)?;
        let train_preds = if ctx.want_train_preds {
            Some(predict(model, &ds.train, &self.eval_tf, &self.dev)?.0)
        } else {
            None
        };
        let st = &self.st;
        let mut rows = st.rows.clone();
        let valid_m = rows
            .iter()
            .find(|r| r.epoch == selected_epoch && r.split == "valid")
            .map(|r| r.m.clone())
            .context("selected epoch has no validation row")?;
        let density = self.engine().map_or(1.0, |e| e.total_density());
        rows.push(MetricsRow {
            epoch: selected_epoch,
            split: "test".into(),
            m: test_m.clone(),
            lr: self.opt.lr,
            density,
            prune_rate: st.last_prune_rate,
        });
        output::write_metrics(&self.run_dir, &rows)?;

        let engine = self.engine();
        let layer_densities = model
            .weights()
            .iter()
            .enumerate()
            .map(|(l, p)| {
                let n = p.var.elem_count();
                let nz = engine.map_or(n, |e| e.active_count(l));
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
            device: crate::device::name(&self.dev),
            dataset: ds.name.clone(),
            model: cfg.model.kind.as_str().into(),
            density: cfg.sparse.density,
            upweight: self.objective.lambda,
            reweight_mode: cfg.method.reweight_mode,
            seed: cfg.optim.seed,
            epochs: cfg.optim.epochs,
            method: cfg.method.kind,
            select_rule: self.rule,
            selected_epoch,
            valid: valid_m,
            test: test_m,
            final_density: density,
            layer_densities,
            steps: st.step,
            update_frequency: engine.map(|e| e.update_frequency()),
            mask_updates: st.mask_updates,
            itop_rate: engine.map(|e| e.itop_rate()),
            wall_time_s: self.start.elapsed().as_secs_f64(),
            train_samples_per_s: st.samples_seen as f64 / st.train_time.max(1e-9),
            infer_flops: self.flops.sparse,
            infer_flops_dense: self.flops.dense,
            infer_flops_vs_dense: self.flops.ratio(),
            train_flops: st.flops.sparse,
            train_flops_dense: st.flops.dense,
            train_flops_vs_dense: st.flops.ratio(),
            jtt: ctx.jtt,
            dro_q: self.objective.dro_q(),
            groups: ds.train.groups.as_deref().cloned(),
        };
        output::write_json(&self.run_dir.join("summary.json"), &summary)?;
        let run_dir = self.run_dir;
        Ok((TrainOutcome { run_dir, summary }, train_preds))
    }
}

/// The sparse engine of a new run: ERK-style initial masks, or masks from scores (SNIP,
/// GraSP, global magnitude) computed on a few training batches.
fn initial_engine(
    cfg: &TrainConfig,
    model: &dyn Model,
    ctx: &StageCtx,
    total_steps: usize,
    dev: &Device,
) -> Result<SparseEngine> {
    let weights = model.weights();
    let scfg = cfg.sparse.engine_config(total_steps);
    let opts = cfg.sparse.dst_options();
    let mut mask_rng = util::rng(cfg.optim.seed, 2);
    if opts.sparse_init.is_score_based() {
        let scores = super::scores::init_scores(
            model,
            &weights,
            &ctx.ds.train,
            &ctx.plan.eval_transform,
            cfg,
            dev,
        )?;
        SparseEngine::new_from_scores(layer_shapes(&weights), scfg, opts, &scores, &mut mask_rng)
    } else if cfg.sparse.magnitude_masks {
        let w: Vec<Vec<f32>> = weights
            .iter()
            .map(|p| Ok(p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<_>>()?;
        let scores = crate::sparse::magnitude_scores(&w);
        SparseEngine::with_options_placed(
            layer_shapes(&weights),
            scfg,
            opts,
            Some(&scores),
            &mut mask_rng,
        )
    } else {
        SparseEngine::with_options(layer_shapes(&weights), scfg, opts, &mut mask_rng)
    }
}

fn log_sparse_setup(cfg: &TrainConfig, ml: &MaskedLayers) {
    let kernels: Vec<String> = ml
        .kernel_choice()
        .map(|(name, s)| format!("{name} {}", if s { "sparse" } else { "dense" }))
        .collect();
    info!("kernels ({:?}): {}", cfg.sparse.kernels, kernels.join(", "));
    let e = &ml.engine;
    let densities: Vec<String> = e.densities().iter().map(|d| format!("{d:.3}")).collect();
    info!(
        "sparse training at density {:.4}: per-layer {}; mask update every {} steps",
        e.total_density(),
        densities.join(" "),
        e.update_frequency()
    );
}

fn epoch_bar(steps: usize, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
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
