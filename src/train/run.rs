//! Running a training run: the entry points (`train`, `train_with`, `resume`, a sweep's task)
//! claim the run directory for this process (`super::lock`) and resolve the dataset; JTT
//! runs the training loop twice (stage 1 in `<run>/stage1`, its error set up-weighted in
//! stage 2); every other method runs it once (`super::trainer`). `train_on_dataset` trains on
//! a dataset handed over in memory (the Python module's arrays) instead of the one `cfg`
//! names.

use super::checkpoint;
use super::lock;
use super::methods::{self, Method};
use super::metrics::fmt_opt;
use super::output;
use super::select::SelectRule;
use super::summary::TrainOutcome;
use super::trainer::{run_stage, Hooks, StageCtx};
use crate::data::{DataPlan, GroupDataset};
use crate::train::TrainConfig;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;
use tracing::info;

/// Runs a complete REST training run as configured; writes the run directory, which must not
/// hold a run already (see `train_with`).
pub fn train(cfg: &TrainConfig) -> Result<TrainOutcome> {
    train_with(cfg, false)
}

/// `train`, claiming the run directory for this process for the whole run: a directory that
/// another process holds is refused, and one that holds a run (finished or not) too unless
/// `overwrite`, which replaces that run.
pub fn train_with(cfg: &TrainConfig, overwrite: bool) -> Result<TrainOutcome> {
    train_with_hooks(cfg, overwrite, &Hooks::default())
}

/// `train_with`, calling `hooks.on_epoch` after every epoch (see [`Hooks`]).
pub fn train_with_hooks(cfg: &TrainConfig, overwrite: bool, hooks: &Hooks) -> Result<TrainOutcome> {
    cfg.validate()?;
    let (_lock, dir) = output::claim_new_run(cfg, overwrite)?;
    let mut cfg = cfg.clone();
    cfg.run.out = Some(dir);
    run(&cfg, false, hooks)
}

/// `train_with` on the dataset `ds` handed over in memory (the Python module's NumPy arrays)
/// instead of the images `cfg.data` names; `cfg.data` still gives the transforms, and its
/// `conflict_pct` the LAMBDA paired with it. The run directory is a complete run (`rest
/// predict`, `rest export` and the Python module's `load` read it), and its `data.json` says
/// that the images were in memory, so `rest train --resume` and `rest eval` refuse it.
pub fn train_on_dataset(
    cfg: &TrainConfig,
    ds: &GroupDataset,
    overwrite: bool,
) -> Result<TrainOutcome> {
    train_on_dataset_with_hooks(cfg, ds, overwrite, &Hooks::default())
}

/// `train_on_dataset`, calling `hooks.on_epoch` after every epoch (see [`Hooks`]).
pub fn train_on_dataset_with_hooks(
    cfg: &TrainConfig,
    ds: &GroupDataset,
    overwrite: bool,
    hooks: &Hooks,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    let (_lock, dir) = output::claim_new_run(cfg, overwrite)?;
    let mut cfg = cfg.clone();
    cfg.run.out = Some(dir);
    let plan = cfg.data.plan();
    run_on(&cfg, false, ds, &plan, Instant::now(), true, hooks)
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
    run(cfg, resume, &Hooks::default())
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
    cfg.run.out = Some(run_dir.to_path_buf());
    output::refuse_in_memory(run_dir, "--resume")?;
    Ok(cfg)
}

/// Continues the run of `cfg` (from `resume_config`) from its last checkpoint; the result
/// equals that of an uninterrupted run (bit-identical on the same machine and thread count).
/// Refused while another process holds the run directory.
pub fn resume(cfg: &TrainConfig) -> Result<TrainOutcome> {
    let dir = cfg
        .run
        .out
        .clone()
        .context("internal: resume needs the run directory (resume_config)")?;
    let lock = lock::claim(&dir, "--resume")?;
    lock.announce()?;
    run(cfg, true, &Hooks::default())
}

fn run(cfg: &TrainConfig, resume: bool, hooks: &Hooks) -> Result<TrainOutcome> {
    cfg.validate()?;
    // A folder's layout decides the default image size, augmentation and normalisation:
    // record it in the run's config.toml, so that eval, predict and resume do not depend on
    // the folder's name.
    let resolved = cfg.with_resolved_dataset();
    let cfg = &resolved;
    let start = Instant::now();
    let plan = cfg.data.plan();
    let ds = crate::data::load(&plan.source)?;
    run_on(cfg, resume, &ds, &plan, start, false, hooks)
}

/// Trains `cfg` (validated, its dataset resolved) on `ds`; `in_memory`: `ds` was handed over
/// rather than loaded from `plan.source`.
fn run_on(
    cfg: &TrainConfig,
    resume: bool,
    ds: &GroupDataset,
    plan: &DataPlan,
    start: Instant,
    in_memory: bool,
    hooks: &Hooks,
) -> Result<TrainOutcome> {
    if cfg.method.kind != Method::Jtt {
        let run_dir = cfg.run.out.clone().unwrap_or_default();
        let ctx = StageCtx {
            ds,
            plan,
            start,
            resume_dir: run_dir,
            error_set: None,
            jtt: None,
            want_train_preds: false,
            in_memory,
            hooks,
        };
        return Ok(run_stage(cfg, resume, ctx)?.0);
    }
    run_jtt(cfg, resume, ds, plan, start, in_memory, hooks)
}

/// The configuration of JTT's stage 1: ERM for `jtt_epochs` epochs in `<run>/stage1`,
/// keeping the last epoch's model.
fn jtt_stage1_config(cfg: &TrainConfig, run_dir: &Path) -> TrainConfig {
    let mut s1 = cfg.clone();
    s1.method.kind = Method::Erm;
    s1.optim.epochs = cfg.method.jtt_epochs;
    s1.method.select = Some(SelectRule::Last);
    s1.method.error_set = None;
    s1.run.out = Some(run_dir.join("stage1"));
    s1
}

/// Just Train Twice: stage 1 (unless `--error-set` or a finished stage 1 gives the error set),
/// the error set and its report, then stage 2 with the error set up-weighted.
fn run_jtt(
    cfg: &TrainConfig,
    resume: bool,
    ds: &GroupDataset,
    plan: &DataPlan,
    start: Instant,
    in_memory: bool,
    hooks: &Hooks,
) -> Result<TrainOutcome> {
    let run_dir = output::create_run_dir(cfg)?;
    // Both stages write to this directory, even when its name was generated.
    let mut with_dir = cfg.clone();
    with_dir.run.out = Some(run_dir.clone());
    let cfg = &with_dir;
    let n = ds.train.len();
    let es_path = run_dir.join("error_set.json");
    let (error, stage1_epochs) = if let Some(f) = &cfg.method.error_set {
        let e = methods::load_error_set(f, n)?;
        info!(
            "JTT: error set of {} samples read from {}",
            e.len(),
            f.display()
        );
        methods::save_error_set(&es_path, &e, n)?;
        (e, None)
    } else if resume && es_path.exists() {
        (
            methods::load_error_set(&es_path, n)?,
            Some(cfg.method.jtt_epochs),
        )
    } else {
        let s1 = jtt_stage1_config(cfg, &run_dir);
        let s1_dir = run_dir.join("stage1");
        let s1_resume = resume && s1_dir.join(checkpoint::STATE_FILE).exists();
        info!(
            "JTT stage 1: ERM identification model for {} epoch(s) in {}",
            cfg.method.jtt_epochs,
            s1_dir.display()
        );
        let ctx = StageCtx {
            ds,
            plan,
            start,
            resume_dir: run_dir.clone(),
            error_set: None,
            jtt: None,
            want_train_preds: true,
            in_memory,
            hooks,
        };
        let (_, preds) = run_stage(&s1, s1_resume, ctx)?;
        let preds = preds.context("JTT stage 1 returned no training predictions")?;
        let e = methods::error_set(&preds, &ds.train.labels);
        methods::save_error_set(&es_path, &e, n)?;
        (e, Some(cfg.method.jtt_epochs))
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
        plan,
        start,
        resume_dir: run_dir,
        error_set: Some(error),
        jtt: Some(report),
        want_train_preds: false,
        in_memory,
        hooks,
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
