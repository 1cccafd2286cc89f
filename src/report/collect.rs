//! Finding and reading finished runs: every `summary.json` under a directory (JTT `stage1/`
//! summaries excluded) with the `config.toml` beside it, flattened into one record per run,
//! and `results.csv` (one row per run, every config key and metric).

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Config keys that never distinguish runs: where a run was written and how it was run.
pub const IGNORED_KEYS: &[&str] = &["out", "threads", "cache_dir", "error_set"];

/// Config keys shown first, in this order, in `results.csv` and the tables.
pub const LEADING_KEYS: &[&str] = &[
    "method",
    "model",
    "dataset",
    "data",
    "conflict_pct",
    "density",
    "upweight",
    "seed",
];

/// The metrics taken from `summary.json`: (column name, JSON pointer).
pub const METRICS: &[(&str, &str)] = &[
    ("test_accuracy", "/test/accuracy"),
    ("test_aligned", "/test/aligned"),
    ("test_conflicting", "/test/conflicting"),
    ("test_worst_group", "/test/worst_group"),
    ("test_worst_cell", "/test/worst_cell"),
    ("test_unbiased", "/test/unbiased"),
    ("test_loss", "/test/loss"),
    ("valid_accuracy", "/valid/accuracy"),
    ("valid_aligned", "/valid/aligned"),
    ("valid_conflicting", "/valid/conflicting"),
    ("valid_worst_group", "/valid/worst_group"),
    ("valid_worst_cell", "/valid/worst_cell"),
    ("valid_unbiased", "/valid/unbiased"),
    ("valid_loss", "/valid/loss"),
    ("upweight_effective", "/upweight"),
    ("final_density", "/final_density"),
    ("train_flops_vs_dense", "/train_flops_vs_dense"),
    ("infer_flops_vs_dense", "/infer_flops_vs_dense"),
    ("train_flops", "/train_flops"),
    ("infer_flops", "/infer_flops"),
    ("wall_time_s", "/wall_time_s"),
    ("train_samples_per_s", "/train_samples_per_s"),
    ("selected_epoch", "/selected_epoch"),
    ("mask_updates", "/mask_updates"),
    ("itop_rate", "/itop_rate"),
];

/// Metrics only some runs have (table datasets' weighted accuracy): read like [`METRICS`],
/// but a column of `results.csv` and a table of `report.md` only when a run has them.
pub const OPTIONAL_METRICS: &[(&str, &str)] = &[
    ("test_weighted_accuracy", "/test/weighted_accuracy"),
    ("valid_weighted_accuracy", "/valid/weighted_accuracy"),
];

/// One finished run: its directory, its config keys (as text) and its metrics.
#[derive(Debug, Clone)]
pub struct Run {
    /// The run directory, relative to the collection root.
    pub dir: PathBuf,
    /// Every config key, as text; `upweight` is `paired` where the config left it to the
    /// ratio (the effective value is the metric `upweight_effective`).
    pub config: BTreeMap<String, String>,
    /// Metrics by the names of [`METRICS`]; `None` where the summary has none (e.g. no
    /// conflicting samples).
    pub metrics: BTreeMap<&'static str, Option<f64>>,
    /// Table datasets: each (label, attribute) group's test accuracy (`summary.json`
    /// `test.groups`), keyed `test_group_<label>_<attribute>`; empty for DFA runs.
    pub group_accuracies: BTreeMap<String, f64>,
}

impl Run {
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).copied().flatten()
    }
}

/// A file that could not be read, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Everything found under a directory.
#[derive(Debug, Clone)]
pub struct Collection {
    pub root: PathBuf,
    pub runs: Vec<Run>,
    pub skipped: Vec<Skipped>,
    /// Run directories without `summary.json` (relative to `root`).
    pub unfinished: Vec<PathBuf>,
}

/// What a walk of a directory finds.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Every `summary.json` (sorted).
    pub summaries: Vec<PathBuf>,
    /// Run directories without one (a `config.toml` but no `summary.json`): unfinished or
    /// failed runs.
    pub unfinished: Vec<PathBuf>,
}

/// Walks `root` (any depth, sorted), except `stage1` directories (JTT's identification
/// stage). Symbolic links to directories are not followed.
pub fn scan(root: &Path) -> Result<Scan> {
    fn walk(dir: &Path, out: &mut Scan) -> Result<()> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list directory {}", dir.display()))?;
        let mut subdirs = Vec::new();
        let (mut summary, mut config) = (false, false);
        for e in entries {
            let e = e.with_context(|| format!("cannot list directory {}", dir.display()))?;
            let ty = e.file_type()?;
            let path = e.path();
            if ty.is_dir() {
                if e.file_name() != "stage1" {
                    subdirs.push(path);
                }
            } else if ty.is_file() && e.file_name() == "summary.json" {
                out.summaries.push(path);
                summary = true;
            } else if ty.is_file() && e.file_name() == "config.toml" {
                config = true;
            }
        }
        if config && !summary {
            out.unfinished.push(dir.to_path_buf());
        }
        subdirs.sort();
        for d in subdirs {
            walk(&d, out)?;
        }
        Ok(())
    }
    if !root.is_dir() {
        bail!(
            "{} is not a directory: give a run directory or a directory of runs (e.g. a sweep's --out)",
            root.display()
        );
    }
    let mut out = Scan::default();
    walk(root, &mut out)?;
    out.summaries.sort();
    out.unfinished.sort();
    Ok(out)
}

/// Every `summary.json` under `root` (see [`scan`]).
pub fn find_summaries(root: &Path) -> Result<Vec<PathBuf>> {
    Ok(scan(root)?.summaries)
}

fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => crate::util::fmt_num(*f),
        other => other.to_string(),
    }
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            v => {
                out.insert(key, toml_text(v));
            }
        }
    }
}

/// Reads one run from its `summary.json` and the `config.toml` beside it.
pub fn read_run(root: &Path, summary_path: &Path) -> Result<Run> {
    let dir = summary_path.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(summary_path)
        .with_context(|| format!("cannot read {}", summary_path.display()))?;
    let summary: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", summary_path.display()))?;
    if summary
        .pointer("/test/unbiased")
        .and_then(|v| v.as_f64())
        .is_none()
    {
        bail!(
            "{} has no test metrics (test.unbiased): not a summary written by `rest train`",
            summary_path.display()
        );
    }
    let cfg_path = dir.join("config.toml");
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {} (beside summary.json)", cfg_path.display()))?;
    let table: toml::Table = toml::from_str(&cfg_text)
        .with_context(|| format!("{} is not valid TOML", cfg_path.display()))?;
    let mut config = BTreeMap::new();
    flatten("", &table, &mut config);
    for k in IGNORED_KEYS {
        config.remove(*k);
    }
    config
        .entry("upweight".into())
        .or_insert_with(|| "paired".into());
    let metrics = METRICS
        .iter()
        .chain(OPTIONAL_METRICS)
        .map(|(name, ptr)| (*name, summary.pointer(ptr).and_then(|v| v.as_f64())))
        .collect();
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    let rel = if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel.to_path_buf()
    };
    let group_accuracies = summary
        .pointer("/test/groups")
        .and_then(|g| g.as_array())
        .into_iter()
        .flatten()
        .filter_map(|g| {
            let (l, a) = (g.get("label")?.as_u64()?, g.get("attribute")?.as_u64()?);
            Some((format!("test_group_{l}_{a}"), g.get("accuracy")?.as_f64()?))
        })
        .collect();
    Ok(Run {
        dir: rel,
        config,
        metrics,
        group_accuracies,
    })
}

/// Reads every run under `root`. Unreadable runs are logged and listed in `skipped`; it is an
/// error when there is no `summary.json` at all, or none could be read.
pub fn collect(root: &Path) -> Result<Collection> {
    let found = scan(root)?;
    let paths = found.summaries;
    if paths.is_empty() {
        bail!(
            "no summary.json under {}{}: give the directory of finished `rest train` runs (or of a sweep)",
            root.display(),
            if found.unfinished.is_empty() {
                String::new()
            } else {
                format!(" ({} unfinished runs without one)", found.unfinished.len())
            }
        );
    }
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for p in &paths {
        match read_run(root, p) {
            Ok(r) => runs.push(r),
            Err(e) => {
                tracing::warn!("skipping {}: {e:#}", p.display());
                skipped.push(Skipped {
                    path: p.strip_prefix(root).unwrap_or(p).to_path_buf(),
                    reason: format!("{e:#}"),
                });
            }
        }
    }
    if runs.is_empty() {
        bail!(
            "none of the {} summary.json files under {} could be read (first: {})",
            paths.len(),
            root.display(),
            skipped.first().map(|s| s.reason.as_str()).unwrap_or("")
        );
    }
    Ok(Collection {
        root: root.to_path_buf(),
        runs,
        skipped,
        unfinished: found
            .unfinished
            .iter()
            .map(|p| p.strip_prefix(root).unwrap_or(p).to_path_buf())
            .collect(),
    })
}

/// Compares two config values: numerically where both are numbers, else as text.
pub fn cmp_values(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.total_cmp(&y),
        _ => a.cmp(b),
    }
}

impl Collection {
    /// Every config key of any run: [`LEADING_KEYS`] first, then the others alphabetically.
    pub fn keys(&self) -> Vec<String> {
        let all: BTreeSet<&String> = self.runs.iter().flat_map(|r| r.config.keys()).collect();
        let mut keys: Vec<String> = LEADING_KEYS
            .iter()
            .filter(|k| all.iter().any(|a| a.as_str() == **k))
            .map(|k| k.to_string())
            .collect();
        keys.extend(
            all.into_iter()
                .filter(|k| !LEADING_KEYS.contains(&k.as_str()))
                .cloned(),
        );
        keys
    }

    /// The config keys whose value differs between runs (a key missing from a run counts as
    /// a value of its own), in the order of [`Collection::keys`].
    pub fn varying_keys(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| {
                let vals: BTreeSet<Option<&String>> =
                    self.runs.iter().map(|r| r.config.get(k)).collect();
                vals.len() > 1
            })
            .collect()
    }

    /// `results.csv`: `run` (directory), every config key, every metric.
    /// Whether any run has metric `name`.
    pub fn has_metric(&self, name: &str) -> bool {
        self.runs.iter().any(|r| r.metric(name).is_some())
    }

    /// The metric columns of `results.csv`: [`METRICS`], then the [`OPTIONAL_METRICS`] some
    /// run has.
    pub fn metric_names(&self) -> Vec<&'static str> {
        METRICS
            .iter()
            .map(|(m, _)| *m)
            .chain(
                OPTIONAL_METRICS
                    .iter()
                    .map(|(m, _)| *m)
                    .filter(|m| self.has_metric(m)),
            )
            .collect()
    }

    /// The per-group accuracy columns of `results.csv`: every group any run has, in (label,
    /// attribute) order.
    pub fn group_columns(&self) -> Vec<String> {
        let mut cols: Vec<(u64, u64, &String)> = self
            .runs
            .iter()
            .flat_map(|r| r.group_accuracies.keys())
            .filter_map(|k| {
                let (l, a) = k.strip_prefix("test_group_")?.split_once('_')?;
                Some((l.parse().ok()?, a.parse().ok()?, k))
            })
            .collect();
        cols.sort();
        cols.dedup();
        cols.into_iter().map(|(_, _, k)| k.clone()).collect()
    }

    pub fn results_csv(&self) -> String {
        let keys = self.keys();
        let metrics = self.metric_names();
        let groups = self.group_columns();
        let mut s = String::from("run");
        for k in &keys {
            s.push(',');
            s.push_str(&csv_field(k));
        }
        for m in &metrics {
            s.push(',');
            s.push_str(m);
        }
        for g in &groups {
            s.push(',');
            s.push_str(g);
        }
        s.push('\n');
        for r in &self.runs {
            s.push_str(&csv_field(&r.dir.to_string_lossy()));
            for k in &keys {
                s.push(',');
                s.push_str(&csv_field(
                    r.config.get(k).map(String::as_str).unwrap_or(""),
                ));
            }
            for m in &metrics {
                s.push(',');
                if let Some(v) = r.metric(m) {
                    let _ = write!(s, "{v}");
                }
            }
            for g in &groups {
                s.push(',');
                if let Some(v) = r.group_accuracies.get(g) {
                    let _ = write!(s, "{v}");
                }
            }
            s.push('\n');
        }
        s
    }
}

/// Quotes a CSV field when it holds a comma, quote or line break (RFC 4180).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
