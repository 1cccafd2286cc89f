//! `rest.train`: keyword options (the `TrainConfig` keys, the CLI's long flags with `_` for
//! `-`) become a config through `TrainConfig::from_table` and `validate`, the CLI's own
//! checks; the run trains in this process with the GIL released (`rest::train::train_with`
//! for datasets the config names, `train_on_dataset` for arrays) and comes back as a `Run`:
//! its directory, `summary.json` as a dict and `metrics.csv` as a list of dicts.

use crate::dataset::{Dataset, Source, DATASET_KEYS};
use crate::errors::{self, value};
use crate::model::Model;
use pyo3::exceptions::PyFileExistsError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString};
use rest::train::{EpochReport, Hooks, TrainConfig};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A Python option value as a config value (`None`: the option's default).
fn toml_value(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Option<toml::Value>> {
    if v.is_none() {
        return Ok(None);
    }
    if v.is_instance_of::<PyBool>() {
        return Ok(Some(toml::Value::Boolean(v.extract()?)));
    }
    if v.is_instance_of::<PyInt>() {
        let i: i64 = v
            .extract()
            .map_err(|_| value(format!("option `{key}`: {v} is out of range")))?;
        return Ok(Some(toml::Value::Integer(i)));
    }
    if v.is_instance_of::<PyFloat>() {
        return Ok(Some(toml::Value::Float(v.extract()?)));
    }
    if v.is_instance_of::<PyString>() {
        return Ok(Some(toml::Value::String(v.extract()?)));
    }
    // pathlib.Path and other path-likes.
    if let Ok(p) = v.extract::<PathBuf>() {
        return Ok(Some(toml::Value::String(p.display().to_string())));
    }
    Err(value(format!(
        "option `{key}` must be a bool, int, float, str or path, got {}",
        v.get_type().name()?
    )))
}

/// The run's config: the dataset's data keys, then `options`, through the CLI's validation.
fn config_of(dataset: &Dataset, options: Option<&Bound<'_, PyDict>>) -> PyResult<TrainConfig> {
    let mut table = match &dataset.source {
        Source::Options(t) => t.clone(),
        Source::Arrays { conflict_pct, .. } => {
            let mut t = toml::Table::new();
            t.insert("conflict_pct".into(), toml::Value::Float(*conflict_pct));
            t
        }
    };
    if let Some(options) = options {
        for (k, v) in options.iter() {
            let key: String = k.extract()?;
            if DATASET_KEYS.contains(&key.as_str()) {
                return Err(value(format!(
                    "option `{key}` says which images to use: give it to the Dataset \
                     (rest.Dataset.colored_mnist(...), .folder(...) or .from_arrays(...)), not \
                     to rest.train"
                )));
            }
            let arrays = matches!(dataset.source, Source::Arrays { .. });
            if arrays && (key == "minority_share" || key == "minority_groups") {
                return Err(value(format!(
                    "option `{key}` chooses the minority groups of arrays when they are made: \
                     give it to rest.Dataset.from_arrays(..., {key}=...) with `attributes` in \
                     the splits, not to rest.train"
                )));
            }
            if let Some(v) = toml_value(&key, &v)? {
                table.insert(key, v);
            }
        }
    }
    let cfg = TrainConfig::from_table(table).map_err(errors::value_error)?;
    cfg.validate().map_err(errors::value_error)?;
    Ok(cfg)
}

/// Parses `metrics.csv` into one dict per row: integers and floats as numbers, empty cells
/// as `None`, the split name as a string.
fn metrics_rows<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyList>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let rows = PyList::empty(py);
    for line in lines.filter(|l| !l.is_empty()) {
        let d = PyDict::new(py);
        for (k, cell) in header.iter().zip(line.split(',')) {
            if cell.is_empty() {
                d.set_item(k, py.None())?;
            } else if let Ok(i) = cell.parse::<i64>() {
                d.set_item(k, i)?;
            } else if let Ok(f) = cell.parse::<f64>() {
                d.set_item(k, f)?;
            } else {
                d.set_item(k, cell)?;
            }
        }
        rows.append(d)?;
    }
    Ok(rows)
}

/// A finished training run: its directory and what it wrote.
#[pyclass(module = "rest", frozen)]
pub struct Run {
    /// The run directory (`pathlib.Path`).
    #[pyo3(get)]
    run_dir: Py<PyAny>,
    /// `summary.json` as a dict: the selected epoch, its validation and test metrics
    /// (fractions), densities, FLOPs, wall time.
    #[pyo3(get)]
    summary: Py<PyAny>,
    /// `metrics.csv` as a list of dicts, one per epoch and split (`train`, `valid`, and the
    /// final `test` row).
    #[pyo3(get)]
    metrics: Py<PyAny>,
    dir: PathBuf,
}

impl Run {
    /// Reads the run in `dir` (its `summary.json` and `metrics.csv`).
    pub fn read(py: Python<'_>, dir: &Path) -> PyResult<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| {
                errors::value_error(
                    anyhow::Error::new(e).context(format!("cannot read {}", p.display())),
                )
            })
        };
        let summary = py
            .import("json")?
            .call_method1("loads", (read("summary.json")?,))?;
        let metrics = metrics_rows(py, &read("metrics.csv")?)?;
        let run_dir = py
            .import("pathlib")?
            .getattr("Path")?
            .call1((dir.to_path_buf(),))?;
        Ok(Self {
            run_dir: run_dir.unbind(),
            summary: summary.unbind(),
            metrics: metrics.into_any().unbind(),
            dir: dir.to_path_buf(),
        })
    }
}

#[pymethods]
impl Run {
    /// The per-epoch metrics as a pandas DataFrame (needs pandas).
    fn metrics_frame<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let pd = py.import("pandas").map_err(|_| {
            pyo3::exceptions::PyImportError::new_err(
                "Run.metrics_frame needs pandas (pip install pandas); Run.metrics is the same \
                 table as a list of dicts",
            )
        })?;
        pd.call_method1("DataFrame", (self.metrics.bind(py),))
    }

    /// The selected model (`best.safetensors`), as `rest.load(run.run_dir)`.
    fn load(&self, py: Python<'_>) -> PyResult<Model> {
        Model::open(py, &self.dir)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Run({})", self.run_dir.bind(py).repr()?))
    }
}

/// Runs `f` with SIGINT and SIGTERM handled as `rest train` handles them (the trainer's
/// handler: checkpoint, then stop with an error), and Python's handlers back afterwards.
#[cfg(unix)]
fn with_run_signals<T>(f: impl FnOnce() -> T) -> T {
    use std::sync::Mutex;
    // The trainer installs its handler once per process; remembered to reinstate it.
    static TRAINER: Mutex<Option<[libc::sigaction; 2]>> = Mutex::new(None);
    const SIGS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];
    // SAFETY: sigaction reads and writes plain structs; a zeroed sigaction is valid.
    unsafe {
        let mut saved: [libc::sigaction; 2] = std::mem::zeroed();
        let trainer = *TRAINER.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &s) in SIGS.iter().enumerate() {
            libc::sigaction(s, std::ptr::null(), &mut saved[i]);
            if let Some(t) = &trainer {
                libc::sigaction(s, &t[i], std::ptr::null_mut());
            }
        }
        let out = f();
        let mut now: [libc::sigaction; 2] = std::mem::zeroed();
        for (i, &s) in SIGS.iter().enumerate() {
            libc::sigaction(s, &saved[i], &mut now[i]);
        }
        let mut t = TRAINER.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_none() && now[0].sa_sigaction != saved[0].sa_sigaction {
            *t = Some(now);
        }
        out
    }
}

#[cfg(not(unix))]
fn with_run_signals<T>(f: impl FnOnce() -> T) -> T {
    f()
}

/// Per-epoch progress and the user's callback, run with the GIL taken back briefly after each
/// epoch (the training itself runs without it).
struct Reporter {
    /// Show progress: a `tqdm.auto` bar per training loop when tqdm is installed, else a line
    /// per epoch on `sys.stderr`.
    progress: bool,
    callback: Option<Py<PyAny>>,
    /// The open bar and whether it is JTT stage 1's.
    bar: Mutex<Option<(Py<PyAny>, bool)>>,
    /// What the callback (or the progress display) raised: the run stops and raises it.
    raised: Mutex<Option<PyErr>>,
}

impl Reporter {
    /// The bar of the loop (`stage1`: JTT's stage 1) with `total` epochs, opened if needed
    /// (closing another loop's); `None` without tqdm.
    fn bar<'py>(
        &self,
        py: Python<'py>,
        stage1: bool,
        total: usize,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((bar, s1)) = slot.as_ref() {
            if *s1 == stage1 {
                return Ok(Some(bar.bind(py).clone()));
            }
            bar.bind(py).call_method0("close")?;
            *slot = None;
        }
        let Ok(tqdm) = py.import("tqdm.auto") else {
            return Ok(None);
        };
        let kw = PyDict::new(py);
        kw.set_item("total", total)?;
        kw.set_item("unit", "epoch")?;
        kw.set_item(
            "desc",
            if stage1 {
                "rest JTT stage 1"
            } else {
                "rest train"
            },
        )?;
        let bar = tqdm.getattr("tqdm")?.call((), Some(&kw))?;
        *slot = Some((bar.clone().unbind(), stage1));
        Ok(Some(bar))
    }

    /// Closes the open bar, if any.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let bar = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((bar, _)) = bar {
            bar.bind(py).call_method0("close")?;
        }
        Ok(())
    }

    /// After an epoch: the progress display, then the callback with the epoch's dict.
    fn epoch(&self, py: Python<'_>, r: &EpochReport) -> PyResult<()> {
        let rows = metrics_rows(py, &rest::train::output::metrics_csv(r.rows))?;
        let d = PyDict::new(py);
        d.set_item("epoch", r.epoch)?;
        d.set_item("epochs", r.epochs)?;
        d.set_item("stage", if r.jtt_stage1 { "jtt_stage1" } else { "train" })?;
        for row in rows.iter() {
            let split = row.get_item("split")?;
            d.set_item(split, row)?;
        }
        if self.progress {
            let (t, v) = (row_of(r, "train"), row_of(r, "valid"));
            let summary = format!(
                "train loss {:.4} acc {:.3} | valid loss {:.4} acc {:.3} worst-group {:.3}",
                t.map_or(f64::NAN, |m| m.loss),
                t.map_or(f64::NAN, |m| m.accuracy),
                v.map_or(f64::NAN, |m| m.loss),
                v.map_or(f64::NAN, |m| m.accuracy),
                v.map_or(f64::NAN, |m| m.worst_group),
            );
            match self.bar(py, r.jtt_stage1, r.epochs)? {
                Some(bar) => {
                    bar.call_method1("set_postfix_str", (summary, false))?;
                    bar.call_method1("update", (1,))?;
                    if r.epoch >= r.epochs {
                        self.close(py)?;
                    }
                }
                None => {
                    let stage = if r.jtt_stage1 { "JTT stage 1, " } else { "" };
                    let err = py.import("sys")?.getattr("stderr")?;
                    err.call_method1(
                        "write",
                        (format!(
                            "{stage}epoch {}/{}: {summary}\n",
                            r.epoch, r.epochs
                        ),),
                    )?;
                    err.call_method0("flush")?;
                }
            }
        }
        if let Some(cb) = &self.callback {
            cb.bind(py).call1((d,))?;
        }
        Ok(())
    }
}

/// The metrics of the epoch's row of `split`.
fn row_of<'a>(r: &'a EpochReport, split: &str) -> Option<&'a rest::train::metrics::GroupMetrics> {
    r.rows
        .iter()
        .find(|row| row.split == split)
        .map(|row| &row.m)
}

/// Trains on `dataset` with the CLI's options as keywords (see the module docs); returns the
/// finished `Run`. `progress` (default on) shows a `tqdm.auto` bar of the epochs when tqdm is
/// installed (in a notebook too), else a line per epoch on `sys.stderr`; `callback`, if given,
/// is called after every epoch with a dict (`epoch`, `epochs`, `stage`, and the epoch's
/// `metrics.csv` rows under `"train"` and `"valid"`); what it raises stops the run and is
/// raised here.
#[pyfunction]
#[pyo3(signature = (dataset, *, overwrite=false, progress=true, callback=None, **options))]
pub fn train(
    py: Python<'_>,
    dataset: &Dataset,
    overwrite: bool,
    progress: bool,
    callback: Option<Bound<'_, PyAny>>,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<Run> {
    let cfg = config_of(dataset, options)?;
    if let Some(cb) = callback.as_ref().filter(|cb| !cb.is_callable()) {
        return Err(value(format!(
            "callback must be a callable taking the epoch's dict, got {}",
            cb.get_type().name()?
        )));
    }
    if let Some(dir) = cfg.run.out.as_deref() {
        if let Some(e) = rest::train::output::existing_run(dir).filter(|_| !overwrite) {
            let err = rest::train::output::existing_run_error(dir, &e);
            return Err(PyFileExistsError::new_err(format!("{err:#}")));
        }
    }
    let arrays = match &dataset.source {
        Source::Arrays { ds, .. } => Some(ds.clone()),
        Source::Options(_) => None,
    };
    let reporter = Reporter {
        progress,
        callback: callback.map(Bound::unbind),
        bar: Mutex::new(None),
        raised: Mutex::new(None),
    };
    if progress {
        // The first loop's bar before its first epoch (JTT's stage 1 comes first, unless
        // --error-set gives its error set).
        let jtt = cfg.method.kind == rest::train::Method::Jtt && cfg.method.error_set.is_none();
        let first = if jtt {
            cfg.method.jtt_epochs
        } else {
            cfg.optim.epochs
        };
        reporter.bar(py, jtt, first)?;
    }
    let threads = cfg.run.threads;
    let reporter_ref = &reporter;
    let on_epoch = move |r: &EpochReport| -> anyhow::Result<()> {
        Python::attach(|py| reporter_ref.epoch(py, r)).map_err(|e| {
            *reporter_ref
                .raised
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(e);
            anyhow::anyhow!("stopped at epoch {} by the Python callback", r.epoch)
        })
    };
    // The step bar of `rest train` goes to the process's stderr (invisible in a notebook):
    // progress is shown through Python instead, or not at all.
    let hooks = Hooks {
        on_epoch: Some(&on_epoch),
        quiet: true,
    };
    let outcome = py.detach(|| {
        let go = || {
            with_run_signals(|| match &arrays {
                Some(ds) => rest::train::train_on_dataset_with_hooks(&cfg, ds, overwrite, &hooks),
                None => rest::train::train_with_hooks(&cfg, overwrite, &hooks),
            })
        };
        match threads {
            // A pool of its own: rayon's global pool is configured once per process.
            Some(n) => rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| anyhow::anyhow!("cannot configure the thread pool (--threads): {e}"))
                .and_then(|pool| pool.install(go)),
            None => go(),
        }
    });
    let closed = reporter.close(py);
    if let Some(e) = reporter
        .raised
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(e);
    }
    let outcome = outcome.map_err(errors::run_error)?;
    closed?;
    Run::read(py, &outcome.run_dir)
}

/// Every option `rest.train` takes (the config keys, in config-file order), with the keys
/// that belong to the `Dataset` left out.
#[pyfunction]
pub fn option_names() -> Vec<&'static str> {
    rest::train::config::config_keys()
        .into_iter()
        .filter(|k| !DATASET_KEYS.contains(k))
        .collect()
}
