//! What a run leaves on disk: the run directory, the resolved `config.toml`, `metrics.csv`
//! (one row per epoch and split), `summary.json` and `best.safetensors`. Every file is written
//! atomically (temporary file, fsync, rename), so a killed run never leaves a torn file.

use super::metrics::GroupMetrics;
use crate::config::TrainConfig;
use crate::util::write_atomic;
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Creates the run directory (`cfg.out` or `runs/<timestamp>-<short-config>`) and writes the
/// resolved config into it. Fails early, naming the path, if it is not writable.
pub fn create_run_dir(cfg: &TrainConfig) -> Result<PathBuf> {
    let dir = match &cfg.out {
        Some(d) => d.clone(),
        None => {
            let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
            PathBuf::from("runs").join(format!("{stamp}-{}", cfg.short_name()))
        }
    };
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
    candle_core::safetensors::save(tensors, tmp.path())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move the finished file to {}", path.display()))?;
    Ok(())
}
