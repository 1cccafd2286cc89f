//! What a run leaves on disk: the run directory (claimed for one process, never silently
//! replaced), the resolved `config.toml`, `metrics.csv` (one row per epoch and split),
//! `summary.json` and `best.safetensors`. Every file is written
//! atomically (temporary file, fsync, rename), so a killed run never leaves a torn file.

use super::config::TrainConfig;
use super::lock::{self, Claim, RunLock};
use super::metrics::GroupMetrics;
use crate::util::write_atomic;
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The run section of a run's options: where it writes and what it runs on. None of it
/// changes the results (`config_hash` leaves it out).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[command(next_help_heading = "Run")]
pub struct RunOptions {
    /// Run directory (default runs/<timestamp>-<config>/). A directory that already holds a
    /// run is refused (see --overwrite), as is one another process is training.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Device: cpu (rest's dense and sparse CPU kernels), cuda, cuda:N, or auto (a GPU when
    /// this build has CUDA support and one is present). CUDA needs a `--features cuda` build.
    #[arg(long, value_name = "cpu|cuda[:N]|auto")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::device::DeviceSpec>,
}

impl RunOptions {
    /// Checks the values; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        if self.threads == Some(0) {
            anyhow::bail!("--threads must be at least 1");
        }
        Ok(())
    }
}

/// The files a run writes into its directory (`rest eval`'s `eval.json`, `rest report`'s
/// curves and a sweep's log and exit code included): what `--overwrite` removes. Anything else
/// in the directory is the user's and stays.
pub const RUN_FILES: &[&str] = &[
    "config.toml",
    "data.json",
    "metrics.csv",
    "summary.json",
    "best.safetensors",
    "masks.csv",
    "checkpoint.safetensors",
    super::checkpoint::STATE_FILE,
    "error_set.json",
    "eval.json",
    "curves.svg",
    "curves.png",
    "train.log",
    "exit_code",
];

/// The sub-directory of a run (JTT's stage 1), also removed by `--overwrite`.
pub const RUN_SUBDIRS: &[&str] = &["stage1"];

/// What a directory holds of an earlier run: the files of `RUN_FILES`/`RUN_SUBDIRS` present,
/// and whether that run finished or can be resumed. `None`: no run (new, empty, or only other
/// files), so training may start there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingRun {
    pub files: Vec<String>,
    pub finished: bool,
    pub resumable: bool,
}

/// The run `dir` holds, if any.
pub fn existing_run(dir: &Path) -> Option<ExistingRun> {
    let files: Vec<String> = RUN_FILES
        .iter()
        .chain(RUN_SUBDIRS)
        .filter(|f| dir.join(f).exists())
        .map(|f| f.to_string())
        .collect();
    // A sweep's log or exit code alone, or a report's curves, is not a run.
    let run_marks = [
        "config.toml",
        "metrics.csv",
        "summary.json",
        "checkpoint.json",
    ];
    if !files
        .iter()
        .any(|f| run_marks.contains(&f.as_str()) || RUN_SUBDIRS.contains(&f.as_str()))
    {
        return None;
    }
    Some(ExistingRun {
        finished: dir.join("summary.json").exists(),
        resumable: super::checkpoint::exists(dir),
        files,
    })
}

/// The refusal to start a new run in `dir`, which holds `e`: what is there and the ways on.
pub fn existing_run_error(dir: &Path, e: &ExistingRun) -> anyhow::Error {
    let d = dir.display();
    let state = if e.finished {
        "a finished run"
    } else if e.resumable {
        "an unfinished run with a checkpoint"
    } else {
        "an unfinished run without a checkpoint"
    };
    let resume = if !e.finished && e.resumable {
        format!("continue it with `rest train --resume {d}`, ")
    } else {
        String::new()
    };
    anyhow::anyhow!(
        "--out {d} already holds {state} ({}); {resume}choose another --out, or pass \
         --overwrite to replace it",
        e.files.join(", ")
    )
}

/// Removes the files of the run in `dir` (`RUN_FILES`, `RUN_SUBDIRS`), for `--overwrite`;
/// the caller holds the directory's lock, which stays.
pub fn remove_run(dir: &Path) -> Result<()> {
    for f in RUN_FILES {
        let p = dir.join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("--overwrite: cannot remove {}", p.display()))
            }
        }
    }
    for d in RUN_SUBDIRS {
        let p = dir.join(d);
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("--overwrite: cannot remove {}", p.display()))?;
        }
    }
    Ok(())
}

/// The generated run directory `runs/<timestamp>-<short-config>[-k]` for a run without
/// `--out`.
fn generated_dir(cfg: &TrainConfig, k: usize) -> PathBuf {
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    let name = format!("{stamp}-{}", cfg.short_name());
    let name = if k > 1 { format!("{name}-{k}") } else { name };
    PathBuf::from("runs").join(name)
}

/// Claims the directory a new run writes to (`cfg.run.out`, or a generated one that no run
/// holds) for this process: refuses a directory another process holds, and one that holds a
/// run unless `overwrite` (which removes that run's files). Returns the lock (held for the
/// whole run) and the directory.
pub fn claim_new_run(cfg: &TrainConfig, overwrite: bool) -> Result<(RunLock, PathBuf)> {
    let Some(dir) = &cfg.run.out else {
        for k in 1..1000 {
            let dir = generated_dir(cfg, k);
            if dir.exists() {
                continue;
            }
            if let Claim::Acquired(l) = lock::try_claim(&dir)? {
                if existing_run(&dir).is_none() {
                    l.announce()?;
                    return Ok((l, dir));
                }
            }
        }
        anyhow::bail!("cannot find a free run directory under runs/: give one with --out");
    };
    // Refuse a directory holding a run before touching anything in it (not even run.lock).
    if let Some(e) = existing_run(dir).filter(|_| !overwrite) {
        if let Some(h) = lock::holder(dir) {
            return Err(lock::held_error(dir, "--out", &h));
        }
        return Err(existing_run_error(dir, &e));
    }
    let l = lock::claim(dir, "--out")?;
    // Checked again under the lock: another process may have started a run meanwhile.
    if let Some(e) = existing_run(dir) {
        if !overwrite {
            return Err(existing_run_error(dir, &e));
        }
        tracing::warn!(
            "--overwrite: replacing {} in {}",
            if e.finished {
                "a finished run"
            } else {
                "an unfinished run"
            },
            dir.display()
        );
        remove_run(dir)?;
    }
    l.announce()?;
    Ok((l, dir.clone()))
}

/// Creates the run directory `cfg.run.out` (set by `claim_new_run` for a whole run) and writes
/// the resolved config into it. Fails early, naming the path, if it is not writable.
pub fn create_run_dir(cfg: &TrainConfig) -> Result<PathBuf> {
    let dir = cfg
        .run
        .out
        .clone()
        .context("internal: the run directory was not chosen before training")?;
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create the output directory {} (--out): check the path and its permissions",
            dir.display()
        )
    })?;
    write_atomic(&dir.join("config.toml"), cfg.to_toml()?.as_bytes()).with_context(|| {
        format!(
            "the output directory {} (--out) is not writable",
            dir.display()
        )
    })?;
    Ok(dir)
}

/// One row of `metrics.csv`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsRow {
    pub epoch: usize,
    pub split: String,
    pub m: GroupMetrics,
    pub lr: f64,
    pub density: f64,
    pub prune_rate: f64,
}

pub const CSV_HEADER: &str = "epoch,split,n,loss,accuracy,aligned,conflicting,worst_group,worst_cell,unbiased,lr,density,prune_rate";

/// Renders the rows as CSV (empty field for a group without samples).
pub fn metrics_csv(rows: &[MetricsRow]) -> String {
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{:.6},{:.6},{},{},{:.6},{:.6},{:.6},{:e},{:.6},{:.6}",
            r.epoch,
            r.split,
            r.m.n,
            r.m.loss,
            r.m.accuracy,
            opt(r.m.aligned),
            opt(r.m.conflicting),
            r.m.worst_group,
            r.m.worst_cell,
            r.m.unbiased,
            r.lr,
            r.density,
            r.prune_rate
        );
    }
    s
}

pub fn write_metrics(dir: &Path, rows: &[MetricsRow]) -> Result<()> {
    write_atomic(&dir.join("metrics.csv"), metrics_csv(rows).as_bytes())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Saves tensors as safetensors atomically.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = crate::util::temp_file_in(dir, ".safetensors")?;
    // candle's I/O error prints its cause and also returns it as its source, so `{:#}` would
    // say "No space left on device" twice: keep its text only.
    candle_core::safetensors::save(tensors, tmp.path())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move the finished file to {}", path.display()))?;
    Ok(())
}

/// The input shape and class count of a run's data (`data.json` in the run directory), so
/// that `rest eval`, `rest predict` and `rest export` rebuild the model without the data.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DataInfo {
    pub dataset: String,
    /// `[channels, height, width]` of the model input.
    pub input: [usize; 3],
    pub classes: usize,
    /// The run trained on a dataset handed over in memory (the Python module's arrays,
    /// `run::train_on_dataset`): its config names no images, so it cannot be resumed or
    /// evaluated from the command line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_memory: bool,
}

/// File name of [`DataInfo`] in a run directory.
pub const DATA_INFO_FILE: &str = "data.json";

pub fn write_data_info(
    run_dir: &Path,
    ds: &crate::data::GroupDataset,
    in_memory: bool,
) -> Result<()> {
    let t = &ds.train;
    write_json(
        &run_dir.join(DATA_INFO_FILE),
        &DataInfo {
            dataset: ds.name.clone(),
            input: [t.channels, t.height, t.width],
            classes: ds.num_classes,
            in_memory,
        },
    )
}

/// The `data.json` of the run in `run_dir`, if it has a readable one.
pub fn read_data_info(run_dir: &Path) -> Option<DataInfo> {
    let text = std::fs::read_to_string(run_dir.join(DATA_INFO_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// An error when the run in `run_dir` trained on in-memory data (see [`DataInfo::in_memory`]),
/// which `what` (the command line's `--resume`, `rest eval`) cannot reload.
pub fn refuse_in_memory(run_dir: &Path, what: &str) -> Result<()> {
    match read_data_info(run_dir) {
        Some(info) if info.in_memory => anyhow::bail!(
            "{what} {}: this run was trained on in-memory arrays (Python `rest.train`), which \
             the command line cannot reload; use the Python module (`rest.load(...).eval(dataset)`) \
             or train again",
            run_dir.display()
        ),
        _ => Ok(()),
    }
}
