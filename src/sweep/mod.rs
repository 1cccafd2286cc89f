//! Sweeps: many training runs from one sweep file. A sweep file (TOML) holds a `[base]`
//! config, a `[grid]` of keys whose lists are crossed (cartesian product) and an optional
//! `[zip]` of keys whose lists vary together. This module owns the file format, its expansion
//! into validated run configs, the run directories (named by a short hash of the resolved
//! config, which is what makes a sweep resumable), the sweep manifest and the `rest sweep`
//! entry point; `local` runs the runs as child processes, `slurm` as a Slurm job array,
//! `status` tells what each run is doing.

pub mod local;
pub mod slurm;
pub mod status;

use crate::train::checkpoint::config_hash;
use crate::train::TrainConfig;
use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file a finished run writes last; its presence means "done".
pub const SUMMARY_FILE: &str = "summary.json";
/// The sweep manifest in the output directory: every run the sweeps there asked for, and the
/// Slurm jobs submitted.
pub const MANIFEST_FILE: &str = "sweep.json";
/// Exit status of a run's last attempt, written by the runner (local or the Slurm script).
pub const EXIT_FILE: &str = "exit_code";
/// The sweep directory's own lock: held while the manifest is updated and while the report
/// is written, so that several sweeps over one directory do neither at the same time.
pub const SWEEP_LOCK_FILE: &str = "sweep.lock";
/// Output of a run's attempts (appended).
pub const LOG_FILE: &str = "train.log";

/// Where sweeps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Child processes on this machine (`--jobs` at a time).
    Local,
    /// One Slurm job array (one task per run), submitted with `sbatch`.
    Slurm,
}

/// `rest sweep`.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// Sweep file: `[base]` (run config keys), `[grid]` (key = [values], crossed) and
    /// optionally `[zip]` (key = [values], lists of equal length varied together).
    #[arg(value_name = "SWEEP.toml")]
    pub file: Option<PathBuf>,
    /// Output directory; each run goes to a subdirectory named by its config
    /// (default: sweeps/<sweep file name>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Runs at a time (local backend; with slurm, at most this many array tasks at once).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Worker threads per run (local backend; default: cores / jobs).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// List the runs (directory, varying keys, done or not) without running anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Show which runs in --out are done, running, queued or failed (from the run
    /// directories and, for Slurm sweeps, squeue).
    #[arg(long, conflicts_with = "dry_run")]
    pub status: bool,
    /// Write the sweep's report of the finished runs in --out (what a Slurm sweep runs after
    /// its array).
    #[arg(long, conflicts_with_all = ["dry_run", "status"])]
    pub report_only: bool,
    /// Where the runs run.
    #[arg(long, value_enum, default_value = "local")]
    pub backend: Backend,
    /// Slurm partition (sbatch --partition).
    #[arg(long, value_name = "P")]
    pub partition: Option<String>,
    /// Slurm time limit per run (sbatch --time, e.g. 2:00:00).
    #[arg(long, value_name = "T")]
    pub time: Option<String>,
    /// Slurm CPUs per run (sbatch --cpus-per-task); each run uses that many threads.
    #[arg(long, value_name = "C")]
    pub cpus_per_task: Option<usize>,
    /// Slurm generic resources per run (sbatch --gres).
    #[arg(long, value_name = "G")]
    pub gres: Option<String>,
    /// Slurm: write the sbatch script but do not submit it.
    #[arg(long)]
    pub no_submit: bool,
}

/// One axis of the product: one grid key, or all `[zip]` keys together.
#[derive(Debug, Clone)]
struct Axis {
    keys: Vec<String>,
    /// `values[i][k]`: the i-th value of `keys[k]`.
    values: Vec<Vec<toml::Value>>,
}

/// A parsed, checked sweep file.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    /// The file it came from (for messages).
    pub path: PathBuf,
    base: toml::Table,
    axes: Vec<Axis>,
}

/// One run of a sweep: its resolved config and name.
#[derive(Debug, Clone)]
pub struct Run {
    /// Directory name: `<short config>-<8 hex digits of the config hash>`.
    pub name: String,
    /// `config_hash` of `cfg` (16 hex digits).
    pub hash: String,
    /// The varying keys and their values, in axis order.
    pub varying: Vec<(String, String)>,
    /// The resolved config (`out` unset).
    pub cfg: TrainConfig,
}

impl Run {
    /// `density=0.1 seed=41` (or `(base)` for a sweep without grid).
    pub fn varying_text(&self) -> String {
        if self.varying.is_empty() {
            return "(base)".into();
        }
        self.varying
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Keys a sweep file may not set: the runner decides them.
const RESERVED: [(&str, &str); 2] = [
    (
        "out",
        "each run's directory is chosen by the sweep; set the sweep's directory with --out",
    ),
    (
        "threads",
        "threads per run follow from --jobs (or set --threads of `rest sweep`)",
    ),
];

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Checks that `key = value` is a valid run config entry (right key, right type).
fn check_entry(file: &Path, section: &str, key: &str, value: &toml::Value) -> Result<()> {
    if let Some((_, why)) = RESERVED.iter().find(|(k, _)| *k == key) {
        bail!(
            "sweep file {}: [{section}] sets `{key}`: {why}",
            file.display()
        );
    }
    let mut t = toml::Table::new();
    t.insert(key.to_string(), value.clone());
    toml::Value::Table(t)
        .try_into::<TrainConfig>()
        .map(|_| ())
        .map_err(|e| {
            anyhow::anyhow!(
                "sweep file {}: [{section}] `{key}` = {value}: {}",
                file.display(),
                e.to_string().trim()
            )
        })
}

impl SweepSpec {
    /// Reads and checks a sweep file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the sweep file {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses sweep-file text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let table: toml::Table = toml::from_str(text)
            .with_context(|| format!("sweep file {} is not valid TOML", path.display()))?;
        let mut base = toml::Table::new();
        let mut grid = toml::Table::new();
        let mut zip = toml::Table::new();
        for (k, v) in table {
            let slot = match k.as_str() {
                "base" => &mut base,
                "grid" => &mut grid,
                "zip" => &mut zip,
                _ => bail!(
                    "sweep file {}: unknown entry `{k}`; a sweep file has the tables [base] \
                     (run config keys), [grid] (key = [values]) and optionally [zip]",
                    path.display()
                ),
            };
            match v {
                toml::Value::Table(t) => *slot = t,
                _ => bail!(
                    "sweep file {}: `{k}` must be a table ([{k}] followed by key = value lines)",
                    path.display()
                ),
            }
        }
        for (k, v) in &base {
            check_entry(path, "base", k, v)?;
        }
        let list = |section: &str, k: &str, v: &toml::Value| -> Result<Vec<toml::Value>> {
            match v {
                toml::Value::Array(a) if !a.is_empty() => {
                    for x in a {
                        check_entry(path, section, k, x)?;
                    }
                    Ok(a.clone())
                }
                _ => bail!(
                    "sweep file {}: [{section}] `{k}` must be a non-empty list of values, e.g. \
                     {k} = [{v}]",
                    path.display()
                ),
            }
        };
        let mut axes = Vec::new();
        if !zip.is_empty() {
            let mut keys = Vec::new();
            let mut cols = Vec::new();
            for (k, v) in &zip {
                if grid.contains_key(k) {
                    bail!(
                        "sweep file {}: `{k}` is in both [grid] and [zip]; put it in one",
                        path.display()
                    );
                }
                keys.push(k.clone());
                cols.push(list("zip", k, v)?);
            }
            let n = cols[0].len();
            if let Some(i) = cols.iter().position(|c| c.len() != n) {
                bail!(
                    "sweep file {}: the [zip] lists vary together and must have the same length: \
                     `{}` has {n} values, `{}` has {}",
                    path.display(),
                    keys[0],
                    keys[i],
                    cols[i].len()
                );
            }
            let values = (0..n)
                .map(|r| cols.iter().map(|c| c[r].clone()).collect())
                .collect();
            axes.push(Axis { keys, values });
        }
        for (k, v) in &grid {
            axes.push(Axis {
                keys: vec![k.clone()],
                values: list("grid", k, v)?.into_iter().map(|x| vec![x]).collect(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            base,
            axes,
        })
    }

    /// Number of runs (product of the axis lengths).
    pub fn len(&self) -> usize {
        self.axes.iter().map(|a| a.values.len()).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every run, the last grid key varying fastest; each config validated. Two runs with the
    /// same resolved config are an error.
    pub fn runs(&self) -> Result<Vec<Run>> {
        let n = self.len();
        let mut runs: Vec<Run> = Vec::with_capacity(n);
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..n {
            // Mixed-radix digits of i, the last axis fastest.
            let mut rem = i;
            let mut pick = vec![0; self.axes.len()];
            for (a, axis) in self.axes.iter().enumerate().rev() {
                pick[a] = rem % axis.values.len();
                rem /= axis.values.len();
            }
            let mut table = self.base.clone();
            let mut varying = Vec::new();
            for (axis, &j) in self.axes.iter().zip(&pick) {
                for (k, v) in axis.keys.iter().zip(&axis.values[j]) {
                    table.insert(k.clone(), v.clone());
                    varying.push((k.clone(), value_text(v)));
                }
            }
            let run_text = varying
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            let cfg: TrainConfig = toml::Value::Table(table).try_into().map_err(|e| {
                anyhow::anyhow!(
                    "sweep file {}: run {} ({run_text}): {}",
                    self.path.display(),
                    i + 1,
                    e.to_string().trim()
                )
            })?;
            cfg.validate().with_context(|| {
                format!(
                    "sweep file {}: run {} ({run_text}) is not a valid run",
                    self.path.display(),
                    i + 1
                )
            })?;
            let hash = config_hash(&cfg)?;
            if let Some(&j) = seen.get(&hash) {
                bail!(
                    "sweep file {}: runs {} ({}) and {} ({run_text}) have the same configuration; \
                     remove the repeated value",
                    self.path.display(),
                    j + 1,
                    runs[j].varying_text(),
                    i + 1
                );
            }
            seen.insert(hash.clone(), i);
            runs.push(Run {
                name: format!("{}-{}", cfg.short_name(), &hash[..8]),
                hash,
                varying,
                cfg,
            });
        }
        Ok(runs)
    }
}

/// A run's state on disk, before the runner starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// `summary.json` exists for this config: skipped.
    Done,
    /// Held by another live process (an earlier sweep's run, another sweep over the same
    /// directory, a Slurm task): waited for, not started again.
    Claimed(crate::train::lock::Holder),
    /// To run: from scratch, or from its checkpoint (`true`).
    ToRun { resume: bool },
}

pub use crate::train::checkpoint::exists as has_checkpoint;

/// Creates (or checks) the run directory of `run` under `out` and writes its `config.toml`
/// (with `out` set to the directory) unless present; says whether it still has to run.
pub fn prepare_run(out: &Path, run: &Run) -> Result<Prepared> {
    let dir = out.join(&run.name);
    let cfg_path = dir.join("config.toml");
    if cfg_path.exists() {
        let on_disk = TrainConfig::from_toml_file(&cfg_path)?;
        let h = config_hash(&on_disk)?;
        // A run that started records its data layout resolved (`dataset = auto` becomes the
        // folder's layout): the same configuration.
        if h != run.hash && h != config_hash(&run.cfg.with_resolved_dataset())? {
            bail!(
                "{} holds a run of another configuration (hash {h}, expected {}); move that \
                 directory away or use another --out",
                dir.display(),
                run.hash
            );
        }
        if dir.join(SUMMARY_FILE).exists() {
            return Ok(Prepared::Done);
        }
        if let Some(h) = crate::train::lock::holder(&dir) {
            return Ok(Prepared::Claimed(h));
        }
    } else {
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create the run directory {} (--out): check the path and its permissions",
                dir.display()
            )
        })?;
        let mut cfg = run.cfg.clone();
        cfg.run.out = Some(dir.clone());
        write_atomic(&cfg_path, cfg.to_toml()?.as_bytes())?;
    }
    Ok(Prepared::ToRun {
        resume: has_checkpoint(&dir),
    })
}

/// One run in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestRun {
    pub dir: String,
    pub hash: String,
    pub varying: Vec<(String, String)>,
}

/// A submitted Slurm job array: task i runs `runs[i]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlurmJob {
    pub job_id: String,
    pub runs: Vec<String>,
    #[serde(default)]
    pub report_job_id: Option<String>,
}

/// `sweep.json`: every run asked for in this output directory, and the Slurm jobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub runs: Vec<ManifestRun>,
    #[serde(default)]
    pub slurm_jobs: Vec<SlurmJob>,
}

impl Manifest {
    /// Reads `DIR/sweep.json` (empty if absent).
    pub fn load(out: &Path) -> Result<Self> {
        let p = out.join(MANIFEST_FILE);
        if !p.exists() {
            return Ok(Self::default());
        }
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a sweep manifest; is --out the directory of a sweep?",
                p.display()
            )
        })
    }

    pub fn save(&self, out: &Path) -> Result<()> {
        write_atomic(
            &out.join(MANIFEST_FILE),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    /// Adds the runs not yet listed.
    pub fn add_runs(&mut self, runs: &[Run]) {
        for r in runs {
            if !self.runs.iter().any(|m| m.dir == r.name) {
                self.runs.push(ManifestRun {
                    dir: r.name.clone(),
                    hash: r.hash.clone(),
                    varying: r.varying.clone(),
                });
            }
        }
    }
}

/// Holds the sweep directory's lock (`SWEEP_LOCK_FILE`) while `f` runs, waiting for it.
pub fn with_sweep_lock<R>(dir: &Path, f: impl FnOnce() -> Result<R>) -> Result<R> {
    let _lock = crate::train::lock::lock_file_blocking(&dir.join(SWEEP_LOCK_FILE))?;
    f()
}

/// Whether `report.md` is newer than every run's `summary.json` (another sweep over the
/// same directory wrote it after the last run finished).
fn report_is_current(dir: &Path) -> bool {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(report) = mtime(&dir.join("report.md")) else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .filter_map(|e| mtime(&e.path().join(SUMMARY_FILE)))
        .all(|t| t <= report)
}

/// Called once a sweep's runs are finished: writes the sweep report (`report.md`,
/// `results.csv` and the plots) into the sweep directory, unless another sweep over the same
/// directory already wrote it with every result now there (the report is written once).
pub fn after_sweep(dir: &Path) -> Result<()> {
    with_sweep_lock(dir, || {
        if report_is_current(dir) {
            println!(
                "report: {} is up to date (written by another sweep over this directory)",
                dir.join("report.md").display()
            );
            return Ok(());
        }
        let r = crate::report::write_report(dir)?;
        println!(
            "report: {} runs -> {}",
            r.runs,
            dir.join("report.md").display()
        );
        Ok(())
    })
}

/// Formats seconds as `1h02m`, `3m05s` or `42s`.
pub fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The output directory: `--out`, else `sweeps/<file stem>`.
fn out_dir(args: &SweepArgs) -> Result<PathBuf> {
    if let Some(o) = &args.out {
        return Ok(o.clone());
    }
    match &args.file {
        Some(f) => {
            let stem = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sweep".into());
            Ok(PathBuf::from("sweeps").join(stem))
        }
        None => bail!("give the sweep's directory with --out DIR (or the sweep file)"),
    }
}

/// Refuses flags of the other backend (they would be silently ignored).
fn check_backend_flags(args: &SweepArgs) -> Result<()> {
    let slurm_only = [
        ("--partition", args.partition.is_some()),
        ("--time", args.time.is_some()),
        ("--cpus-per-task", args.cpus_per_task.is_some()),
        ("--gres", args.gres.is_some()),
        ("--no-submit", args.no_submit),
    ];
    match args.backend {
        Backend::Local => {
            if let Some((flag, _)) = slurm_only.iter().find(|(_, set)| *set) {
                bail!("{flag} is an option of --backend slurm");
            }
        }
        Backend::Slurm => {
            if args.threads.is_some() {
                bail!(
                    "--threads is for --backend local; on Slurm each run uses --cpus-per-task \
                     threads"
                );
            }
        }
    }
    Ok(())
}

/// `rest sweep`.
pub fn main(args: &SweepArgs) -> Result<()> {
    let out = out_dir(args)?;
    if args.status {
        if !out.is_dir() {
            bail!(
                "--out {}: no such directory; give the directory a sweep ran into",
                out.display()
            );
        }
        print!("{}", status::status_report(&out)?);
        return Ok(());
    }
    if args.report_only {
        if !out.is_dir() {
            bail!(
                "--out {}: no such directory; give the directory a sweep ran into",
                out.display()
            );
        }
        after_sweep(&out)?;
        println!("report written for {}", out.display());
        return Ok(());
    }
    if args.jobs == Some(0) {
        bail!("--jobs must be at least 1");
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    check_backend_flags(args)?;
    let Some(file) = &args.file else {
        bail!("give a sweep file: rest sweep SWEEP.toml (see examples/sweep-small.toml)");
    };
    let spec = SweepSpec::from_file(file)?;
    let runs = spec.runs()?;

    if args.dry_run {
        let width = runs.iter().map(|r| r.name.len()).max().unwrap_or(0);
        let mut done = 0;
        for r in &runs {
            let d = out.join(&r.name).join(SUMMARY_FILE).exists();
            done += d as usize;
            println!(
                "{:<width$}  {}{}",
                r.name,
                r.varying_text(),
                if d { "  [done]" } else { "" }
            );
        }
        println!(
            "{} runs ({done} done, {} to run) into {}",
            runs.len(),
            runs.len() - done,
            out.display()
        );
        return Ok(());
    }

    std::fs::create_dir_all(&out).with_context(|| {
        format!(
            "cannot create the sweep directory {} (--out): check the path and its permissions",
            out.display()
        )
    })?;
    let out = out
        .canonicalize()
        .with_context(|| format!("cannot resolve --out {}", out.display()))?;
    // Several sweeps may start over one directory at once: the manifest's read-modify-write
    // and the run directories' creation happen under the sweep directory's lock; the runs
    // themselves are claimed one by one by the processes that train them.
    let prepared = with_sweep_lock(&out, || {
        let mut manifest = Manifest::load(&out)?;
        manifest.add_runs(&runs);
        manifest.save(&out)?;
        let prepared = runs
            .iter()
            .map(|r| prepare_run(&out, r))
            .collect::<Result<Vec<_>>>()?;
        Ok(prepared)
    })?;
    let exe = std::env::current_exe().context("cannot find the rest binary to start runs")?;
    match args.backend {
        Backend::Local => local::run_local(
            &out,
            &runs,
            &prepared,
            &local::LocalOptions {
                jobs: args.jobs.unwrap_or(1),
                threads: args.threads,
                exe,
            },
        ),
        Backend::Slurm => {
            let opts = slurm::SlurmOptions {
                partition: args.partition.clone(),
                time: args.time.clone(),
                cpus_per_task: args.cpus_per_task,
                gres: args.gres.clone(),
                max_parallel: args.jobs,
                job_name: format!(
                    "rest-{}",
                    file.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "sweep".into())
                ),
            };
            slurm::run_slurm(&out, &runs, &prepared, &opts, &exe, !args.no_submit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<SweepSpec> {
        SweepSpec::parse(text, Path::new("s.toml"))
    }

    #[test]
    fn grid_is_a_cartesian_product_crossed_with_zip() -> Result<()> {
        let s = spec(
            "[base]\nepochs = 2\n[grid]\ndensity = [1.0, 0.1, 0.05]\nseed = [41, 42]\n\
             [zip]\nconflict_pct = [0.5, 1]\nlr = [0.1, 0.01]\n",
        )?;
        assert_eq!(s.len(), 12);
        let runs = s.runs()?;
        assert_eq!(runs.len(), 12);
        // Every (conflict_pct, lr, density, seed) combination once; zip keys stay paired.
        let mut combos = std::collections::BTreeSet::new();
        for r in &runs {
            assert_eq!(r.cfg.optim.epochs, 2);
            let lr_for = if r.cfg.data.conflict_pct == 0.5 {
                0.1
            } else {
                0.01
            };
            assert_eq!(r.cfg.optim.lr, lr_for);
            combos.insert((
                r.cfg.data.conflict_pct.to_bits(),
                r.cfg.sparse.density.to_bits(),
                r.cfg.optim.seed,
            ));
            assert_eq!(r.hash, config_hash(&r.cfg)?);
            assert!(r.name.ends_with(&r.hash[..8]), "{}", r.name);
        }
        assert_eq!(combos.len(), 12);
        // Axis order: zip first, grid keys sorted, the last varying fastest.
        assert_eq!(
            runs[0].varying_text(),
            "conflict_pct=0.5 lr=0.1 density=1.0 seed=41"
        );
        assert_eq!(
            runs[1].varying_text().split(' ').next_back(),
            Some("seed=42")
        );
        assert_eq!(runs[2].cfg.sparse.density, 0.1);
        assert_eq!(runs[6].cfg.data.conflict_pct, 1.0);
        Ok(())
    }

    #[test]
    fn lambda_is_paired_with_the_ratio_unless_set() -> Result<()> {
        let runs = spec("[grid]\nconflict_pct = [0.5, 1, 2, 5]\n")?.runs()?;
        let lambdas: Vec<f64> = runs.iter().map(|r| r.cfg.effective_upweight()).collect();
        assert_eq!(lambdas, vec![10.0, 30.0, 50.0, 80.0]);
        let runs = spec("[base]\nupweight = 3\n[grid]\nconflict_pct = [1, 2]\n")?.runs()?;
        assert!(runs.iter().all(|r| r.cfg.effective_upweight() == 3.0));
        Ok(())
    }

    #[test]
    fn no_grid_is_one_run_of_the_base() -> Result<()> {
        let runs = spec("[base]\ndensity = 0.2\n")?.runs()?;
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].cfg.sparse.density, 0.2);
        assert_eq!(runs[0].varying_text(), "(base)");
        Ok(())
    }

    #[test]
    fn bad_sweep_files_are_errors_naming_file_and_key() {
        for (text, needles) in [
            (
                "[grid]\ndensty = [0.1]\n",
                vec![
                    "s.toml",
                    "densty",
                    "unknown option",
                    "did you mean `density`",
                ],
            ),
            ("[base]\nepoch = 3\n", vec!["s.toml", "[base]", "epoch"]),
            ("[grid]\ndensity = 0.1\n", vec!["density", "list"]),
            ("[grid]\ndensity = []\n", vec!["density", "non-empty"]),
            ("[grid]\nseed = [\"a\"]\n", vec!["seed"]),
            (
                "[grid]\nmethod = [\"upweight\", \"dro\"]\n",
                vec!["method", "dro"],
            ),
            (
                "[zip]\nconflict_pct = [1, 2]\nupweight = [30]\n",
                vec!["same length", "upweight"],
            ),
            (
                "[grid]\nseed = [1]\n[zip]\nseed = [2]\n",
                vec!["both", "seed"],
            ),
            ("[grid]\nout = [\"a\"]\n", vec!["out", "--out"]),
            ("[base]\nthreads = 2\n", vec!["threads", "--jobs"]),
            ("[runs]\nx = 1\n", vec!["runs", "[base]"]),
            ("[grid]\ndensity = [0.1, 2.0]\n", vec!["run 2", "--density"]),
            ("[grid]\nseed = [1, 1]\n", vec!["same configuration"]),
        ] {
            let err = spec(text).and_then(|s| s.runs()).map(|_| ());
            let msg = format!("{:#}", err.expect_err(text));
            for n in needles {
                assert!(msg.contains(n), "{text:?}: {msg}");
            }
        }
    }

    #[test]
    fn prepare_writes_config_and_detects_done_and_foreign_dirs() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let out = tmp.path();
        let runs = spec("[base]\nepochs = 1\n[grid]\nseed = [1, 2]\n")?.runs()?;
        assert_eq!(
            prepare_run(out, &runs[0])?,
            Prepared::ToRun { resume: false }
        );
        let cfg = TrainConfig::from_toml_file(&out.join(&runs[0].name).join("config.toml"))?;
        assert_eq!(
            cfg.run.out.as_deref(),
            Some(out.join(&runs[0].name).as_path())
        );
        assert_eq!(config_hash(&cfg)?, runs[0].hash);
        std::fs::write(out.join(&runs[0].name).join(SUMMARY_FILE), "{}")?;
        assert_eq!(prepare_run(out, &runs[0])?, Prepared::Done);
        std::fs::write(
            out.join(&runs[0].name)
                .join(crate::train::checkpoint::STATE_FILE),
            "{}",
        )?;
        std::fs::remove_file(out.join(&runs[0].name).join(SUMMARY_FILE))?;
        assert_eq!(
            prepare_run(out, &runs[0])?,
            Prepared::ToRun { resume: true }
        );
        // A directory of that name holding another config is refused.
        std::fs::create_dir_all(out.join(&runs[1].name))?;
        std::fs::write(
            out.join(&runs[1].name).join("config.toml"),
            runs[0].cfg.to_toml()?,
        )?;
        let err = prepare_run(out, &runs[1]).expect_err("foreign config");
        assert!(err.to_string().contains("another configuration"), "{err}");
        Ok(())
    }

    #[test]
    fn manifest_keeps_earlier_runs() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let a = spec("[grid]\nseed = [1, 2]\n")?.runs()?;
        let b = spec("[grid]\nseed = [2, 3]\n")?.runs()?;
        let mut m = Manifest::load(tmp.path())?;
        m.add_runs(&a);
        m.save(tmp.path())?;
        let mut m = Manifest::load(tmp.path())?;
        m.add_runs(&b);
        let dirs: Vec<&str> = m.runs.iter().map(|r| r.dir.as_str()).collect();
        assert_eq!(dirs, vec![&a[0].name, &a[1].name, &b[1].name]);
        Ok(())
    }

    #[test]
    fn flags_of_the_other_backend_are_refused() {
        use clap::Parser;
        for (args, flag) in [
            (vec!["--partition", "p"], "--partition"),
            (vec!["--no-submit"], "--no-submit"),
            (vec!["--backend", "slurm", "--threads", "2"], "--threads"),
        ] {
            let mut argv = vec!["rest", "sweep", "missing.toml"];
            argv.extend(args);
            let cli = crate::cli::Cli::try_parse_from(&argv).expect("parses");
            let crate::cli::Command::Sweep(a) = cli.command else {
                panic!("not sweep");
            };
            let err = main(&a).expect_err("refused").to_string();
            assert!(err.contains(flag), "{argv:?}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(42.4), "42s");
        assert_eq!(fmt_duration(185.0), "3m05s");
        assert_eq!(fmt_duration(3720.0), "1h02m");
    }
}
