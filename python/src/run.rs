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
use rest::train::TrainConfig;
use std::path::{Path, PathBuf};

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

/// Trains on `dataset` with the CLI's options as keywords (see the module docs); returns the
/// finished `Run`.
#[pyfunction]
#[pyo3(signature = (dataset, *, overwrite=false, **options))]
pub fn train(
    py: Python<'_>,
    dataset: &Dataset,
    overwrite: bool,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<Run> {
    let cfg = config_of(dataset, options)?;
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
    let threads = cfg.run.threads;
    let outcome = py.detach(move || {
        let go = || {
            with_run_signals(|| match &arrays {
                Some(ds) => rest::train::train_on_dataset(&cfg, ds, overwrite),
                None => rest::train::train_with(&cfg, overwrite),
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
    let outcome = outcome.map_err(errors::run_error)?;
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
