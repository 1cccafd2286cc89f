//! `rest.Dataset`: the images a run trains and is evaluated on. Built-in Colored MNIST and
//! dataset folders are data options (the `TrainConfig` data keys, checked by
//! `DataOptions::validate`), so a run on them records them in its `config.toml` as `rest
//! train` does; NumPy arrays become an in-memory `GroupDataset` (checked here: dtype, rank,
//! lengths, label range), trained with `rest::train::train_on_dataset`.

use crate::errors::{self, value};
use numpy::ndarray::{Array1, Array4};
use numpy::{IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use rest::data::groups::{parse_group_list, GroupInfo, MinorityRule};
use rest::data::options::DEFAULT_MINORITY_SHARE;
use rest::data::{GroupDataset, Split};
use rest::train::TrainConfig;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The data keys that say which images a run uses: given to a `Dataset` constructor, not to
/// `rest.train` (the rest of the data section, `augment`, `normalize`, `prefetch`, are
/// training options).
pub const DATASET_KEYS: &[&str] = &[
    "conflict_pct",
    "color_std",
    "data_seed",
    "train_size",
    "valid_size",
    "test_size",
    "data",
    "dataset",
    "skip_bad",
    "cache_dir",
    "image_size",
];

/// Where a dataset's images come from.
pub enum Source {
    /// Built-in Colored MNIST or a folder: the data keys of a run's config.
    Options(toml::Table),
    /// Arrays handed over from Python; `conflict_pct` pairs LAMBDA with them.
    Arrays {
        ds: Arc<GroupDataset>,
        conflict_pct: f64,
    },
}

/// A dataset with train, valid and test splits, each image carrying a class label and a bias
/// attribute (bias-conflicting when they differ). Build it with `Dataset.colored_mnist`,
/// `Dataset.folder` or `Dataset.from_arrays`.
#[pyclass(module = "rest", frozen)]
pub struct Dataset {
    pub source: Source,
    /// The images of an options dataset, generated or read on first use.
    loaded: OnceLock<Arc<GroupDataset>>,
}

/// The data options of `table` as a config (every other key at its default), validated.
fn data_config(table: &toml::Table) -> anyhow::Result<TrainConfig> {
    let cfg = TrainConfig::from_table(table.clone())?;
    cfg.data.validate()?;
    Ok(cfg)
}

/// Puts `value` under `key` when given.
fn put(t: &mut toml::Table, key: &str, value: Option<impl Into<toml::Value>>) {
    if let Some(v) = value {
        t.insert(key.to_string(), v.into());
    }
}

impl Dataset {
    /// The images (loading or generating those of an options dataset once).
    pub fn group_dataset(&self) -> anyhow::Result<Arc<GroupDataset>> {
        match &self.source {
            Source::Arrays { ds, .. } => Ok(ds.clone()),
            Source::Options(t) => {
                if let Some(ds) = self.loaded.get() {
                    return Ok(ds.clone());
                }
                let cfg = data_config(t)?.with_resolved_dataset();
                let ds = Arc::new(rest::data::load(&cfg.data.plan().source)?);
                Ok(self.loaded.get_or_init(|| ds).clone())
            }
        }
    }

    /// `group_dataset` with the GIL released; errors as exceptions.
    pub fn load(&self, py: Python<'_>) -> PyResult<Arc<GroupDataset>> {
        py.detach(|| self.group_dataset())
            .map_err(errors::value_error)
    }

    fn from_options(table: toml::Table) -> PyResult<Self> {
        data_config(&table).map_err(|e| {
            let missing = table
                .get("data")
                .and_then(|d| d.as_str())
                .is_some_and(|d| !std::path::Path::new(d).exists());
            if missing {
                pyo3::exceptions::PyFileNotFoundError::new_err(format!("{e:#}"))
            } else {
                errors::value_error(e)
            }
        })?;
        Ok(Self {
            source: Source::Options(table),
            loaded: OnceLock::new(),
        })
    }
}

/// What the third array of a split holds: DFA's bias attribute (conflicting = label differs
/// from it) or a table's attribute (groups are (label, attribute) cells, minority groups by a
/// rule).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Third {
    Bias,
    Attributes,
}

impl Third {
    fn key(self) -> &'static str {
        match self {
            Third::Bias => "bias",
            Third::Attributes => "attributes",
        }
    }
}

/// Attributes at or above this are taken for a mistake rather than a value (the table
/// loader's bound on labels and attributes).
const MAX_ATTRIBUTE: u32 = 100_000;

/// A split's arrays, checked: `images` uint8 `[N, H, W, C]`, `labels` and `bias` (or
/// `attributes`) integer `[N]` with values >= 0. The third array is stored in `Split::bias`,
/// as the table loader stores a table's attribute column.
fn split_from(py: Python<'_>, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<(Split, Third)> {
    const SHAPE: &str = "a split is a dict with `images`, `labels` and `bias` or `attributes`";
    let dict = obj.cast::<PyDict>().ok();
    let tuple = obj.cast::<PyTuple>().ok().filter(|t| t.len() == 3);
    let third = match &dict {
        Some(d) => match (d.contains("bias")?, d.contains("attributes")?) {
            (true, true) => {
                return Err(value(format!(
                    "{name} has both `bias` and `attributes`: give one (`bias`: DFA's rule, \
                     conflicting = label differs from bias; `attributes`: (label, attribute) \
                     groups with minority groups chosen by minority_share or minority_groups)"
                )))
            }
            (false, true) => Third::Attributes,
            _ => Third::Bias,
        },
        None => Third::Bias,
    };
    let get = |key: &str, index: usize| -> PyResult<Bound<'_, PyAny>> {
        if let Some(d) = &dict {
            return d
                .get_item(key)?
                .ok_or_else(|| value(format!("{name}: missing `{key}` ({SHAPE})")));
        }
        if let Some(t) = &tuple {
            return t.get_item(index);
        }
        Err(value(format!(
            "{name} must be a dict with `images`, `labels` and `bias` or `attributes` (or a \
             tuple `(images, labels, bias)`), got {}",
            obj.get_type().name()?
        )))
    };
    let images = as_array(py, &get("images", 0)?, &format!("{name}[\"images\"]"))?;
    let shape = images.shape().to_vec();
    if shape.len() != 4 || !images.dtype().is_equiv_to(&numpy::dtype::<u8>(py)) {
        return Err(value(format!(
            "{name}[\"images\"] must be a uint8 array of shape [N, H, W, C], got {} with shape \
             {shape:?}",
            images.dtype()
        )));
    }
    let (n, h, w, c) = (shape[0], shape[1], shape[2], shape[3]);
    if n == 0 || h == 0 || w == 0 || c == 0 {
        return Err(value(format!(
            "{name}[\"images\"] is empty (shape {shape:?}): every split needs images"
        )));
    }
    let images = images.into_any().cast_into::<PyArrayDyn<u8>>()?;
    let pixels: Vec<u8> = {
        let ro = images.readonly();
        match ro.as_slice() {
            Ok(s) => s.to_vec(),
            Err(_) => ro.as_array().iter().copied().collect(),
        }
    };
    let labels = int_vector(py, &get("labels", 1)?, &format!("{name}[\"labels\"]"), n)?;
    let key = third.key();
    let what = format!("{name}[\"{key}\"]");
    let bias = int_vector(py, &get(key, 2)?, &what, n)?;
    if third == Third::Attributes {
        if let Some((i, a)) = bias.iter().enumerate().find(|(_, &a)| a >= MAX_ATTRIBUTE) {
            return Err(value(format!(
                "{what}[{i}] is {a}: attributes are small integer codes (0..{MAX_ATTRIBUTE}), \
                 as in a table's attribute column"
            )));
        }
    }
    let split =
        Split::new(pixels, labels, bias, h, w, c).map_err(|e| value(format!("{name}: {e:#}")))?;
    Ok((split, third))
}

/// `obj` as a NumPy array (`ValueError` for anything else).
fn as_array<'py>(
    _py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Bound<'py, numpy::PyUntypedArray>> {
    obj.cast::<numpy::PyUntypedArray>().cloned().map_err(|_| {
        value(format!(
            "{what} must be a NumPy array, got {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

/// A 1-D integer array of length `n` with values in [0, 2^32) as `u32`.
fn int_vector(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str, n: usize) -> PyResult<Vec<u32>> {
    let arr = as_array(py, obj, what)?;
    let kind = arr.dtype().kind();
    if !(kind == b'i' || kind == b'u') || arr.ndim() != 1 {
        return Err(value(format!(
            "{what} must be a 1-D integer array, got {} with shape {:?}",
            arr.dtype(),
            arr.shape()
        )));
    }
    if arr.shape()[0] != n {
        return Err(value(format!(
            "{what} has {} entries but there are {n} images",
            arr.shape()[0]
        )));
    }
    let arr = arr.call_method1("astype", ("int64",))?;
    let arr = arr.cast_into::<PyArrayDyn<i64>>()?;
    let ro = arr.readonly();
    let mut out = Vec::with_capacity(n);
    for (i, &v) in ro.as_array().iter().enumerate() {
        if !(0..=u32::MAX as i64).contains(&v) {
            return Err(value(format!(
                "{what}[{i}] is {v}: labels, bias and attributes are class indices >= 0"
            )));
        }
        out.push(v as u32);
    }
    Ok(out)
}

/// `from_arrays`' minority rule: `minority_share` in (0, 1] or `minority_groups` (the CLI's
/// `LABEL:ATTRIBUTE,...` string or a sequence of `(label, attribute)` pairs), not both;
/// `None` when neither is given.
fn minority_rule(
    share: Option<f64>,
    groups: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<MinorityRule>> {
    let groups = groups.filter(|g| !g.is_none());
    match (share, groups) {
        (Some(_), Some(_)) => Err(value(
            "minority_share and minority_groups exclude each other; give one",
        )),
        (Some(t), None) => {
            if !(t.is_finite() && t > 0.0 && t <= 1.0) {
                return Err(value(format!(
                    "minority_share must be a share in (0, 1], got {t}"
                )));
            }
            Ok(Some(MinorityRule::ShareBelow(t)))
        }
        (None, Some(g)) => {
            let list = if let Ok(s) = g.extract::<String>() {
                parse_group_list(&s).map_err(errors::value_error)?
            } else {
                let pairs: Vec<(i64, i64)> = g.extract().map_err(|_| {
                    value(format!(
                        "minority_groups must be a string such as \"0:1,1:0\" or a list of \
                         (label, attribute) pairs, got {}",
                        g.get_type()
                            .name()
                            .map(|n| n.to_string())
                            .unwrap_or_default()
                    ))
                })?;
                let mut out = Vec::with_capacity(pairs.len());
                for (l, a) in pairs {
                    let code = |v: i64| u32::try_from(v).ok();
                    match (code(l), code(a)) {
                        (Some(l), Some(a)) => out.push((l, a)),
                        _ => {
                            return Err(value(format!(
                                "minority_groups: ({l}, {a}) is not a (label, attribute) pair \
                                 of non-negative integers"
                            )))
                        }
                    }
                }
                if out.is_empty() {
                    return Err(value(
                        "minority_groups is empty; give (label, attribute) pairs such as \
                         [(0, 1), (1, 0)]",
                    ));
                }
                out
            };
            Ok(Some(MinorityRule::Listed(list)))
        }
        (None, None) => Ok(None),
    }
}

#[pymethods]
impl Dataset {
    /// Colored MNIST generated from the built-in 10,000 MNIST digits, as `rest train` makes it
    /// without `--data`. Every argument is the CLI option of the same name (defaults:
    /// conflict_pct=5, color_std=0.005, data_seed=0, train_size=7000, valid_size=1000,
    /// test_size=2000).
    #[staticmethod]
    #[pyo3(signature = (*, conflict_pct=None, color_std=None, data_seed=None, train_size=None, valid_size=None, test_size=None))]
    fn colored_mnist(
        conflict_pct: Option<f64>,
        color_std: Option<f64>,
        data_seed: Option<u64>,
        train_size: Option<u64>,
        valid_size: Option<u64>,
        test_size: Option<u64>,
    ) -> PyResult<Self> {
        let mut t = toml::Table::new();
        put(&mut t, "conflict_pct", conflict_pct);
        put(&mut t, "color_std", color_std);
        let int = |v: Option<u64>| v.map(|v| toml::Value::Integer(v.min(i64::MAX as u64) as i64));
        put(&mut t, "data_seed", int(data_seed));
        put(&mut t, "train_size", int(train_size));
        put(&mut t, "valid_size", int(valid_size));
        put(&mut t, "test_size", int(test_size));
        Self::from_options(t)
    }

    /// A dataset folder (`rest train --data PATH`): the DFA layout, labels and bias attributes
    /// from the file names, or a metadata table (SubpopBench `metadata_<name>.csv`, Waterbirds,
    /// CelebA; groups are its (label, attribute) cells, minority groups by `rest.train`'s
    /// `minority_share=` / `minority_groups=`). `conflict_pct` picks the `<pct>pct` training
    /// folder, `dataset` the layout (auto, cmnist, cifar10c, bffhq, dfa, subpop, waterbirds,
    /// celeba, table), `image_size` resizes on load; `skip_bad` and `cache_dir` as the CLI's
    /// `--skip-bad` and `--cache-dir`. Read on first use.
    #[staticmethod]
    #[pyo3(signature = (path, *, conflict_pct=None, dataset=None, image_size=None, skip_bad=None, cache_dir=None))]
    fn folder(
        path: PathBuf,
        conflict_pct: Option<f64>,
        dataset: Option<String>,
        image_size: Option<u64>,
        skip_bad: Option<bool>,
        cache_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut t = toml::Table::new();
        t.insert("data".into(), path.display().to_string().into());
        put(&mut t, "conflict_pct", conflict_pct);
        put(&mut t, "dataset", dataset);
        put(
            &mut t,
            "image_size",
            image_size.map(|v| toml::Value::Integer(v.min(i64::MAX as u64) as i64)),
        );
        put(&mut t, "skip_bad", skip_bad);
        put(
            &mut t,
            "cache_dir",
            cache_dir.map(|p| p.display().to_string()),
        );
        Self::from_options(t)
    }

    /// A dataset from NumPy arrays, copied (no files are written). `train`, `valid` and `test`
    /// are each a dict `{"images": uint8 [N, H, W, C], "labels": int [N], "bias": int [N]}`
    /// (or a tuple `(images, labels, bias)`); all splits share H, W and C. `num_classes`
    /// defaults to the largest label + 1; every label must be below it. `name` is recorded in
    /// `summary.json`.
    ///
    /// `bias` follows DFA's rule: a sample is bias-conflicting when its label differs from its
    /// bias. Give `attributes` instead of `bias` in every split (named after a table's
    /// attribute column, `--attribute-column`, and the LABEL:ATTRIBUTE pairs of
    /// `--minority-groups`; `groups` would clash with `rest.train`'s `groups=` option) for
    /// data like a metadata table's: the groups are the (label, attribute) cells, any number
    /// of attribute values per class, and the minority groups are those holding less than
    /// `minority_share` (default 0.2) of their class's training samples, or exactly
    /// `minority_groups` (`"0:1,1:0"` or `[(0, 1), (1, 0)]`), as the table loader chooses
    /// them. Every method then uses these groups, and the summary reports worst-group,
    /// per-group (`summary["test"]["groups"]`) and weighted accuracy as for a table.
    ///
    /// `conflict_pct` (the share of bias-conflicting, or minority-group, training samples,
    /// which `upweight`'s default LAMBDA pairs with) defaults to the training split's share.
    #[staticmethod]
    #[pyo3(signature = (train, valid, test, *, num_classes=None, conflict_pct=None, name="arrays".to_string(), minority_share=None, minority_groups=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_arrays(
        py: Python<'_>,
        train: &Bound<'_, PyAny>,
        valid: &Bound<'_, PyAny>,
        test: &Bound<'_, PyAny>,
        num_classes: Option<usize>,
        conflict_pct: Option<f64>,
        name: String,
        minority_share: Option<f64>,
        minority_groups: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let (mut train, third) = split_from(py, "train", train)?;
        let (mut valid, v3) = split_from(py, "valid", valid)?;
        let (mut test, t3) = split_from(py, "test", test)?;
        for (n, t) in [("valid", v3), ("test", t3)] {
            if t != third {
                return Err(value(format!(
                    "train has `{}` but {n} has `{}`: every split needs the same kind \
                     (`bias` or `attributes`)",
                    third.key(),
                    t.key()
                )));
            }
        }
        let shape = |s: &Split| (s.height, s.width, s.channels);
        for (n, s) in [("valid", &valid), ("test", &test)] {
            if shape(s) != shape(&train) {
                return Err(value(format!(
                    "{n} images are {:?} (H, W, C) but train images are {:?}: every split needs \
                     the same image shape",
                    shape(s),
                    shape(&train)
                )));
            }
        }
        let max_label = [&train, &valid, &test]
            .iter()
            .flat_map(|s| s.labels.iter().copied())
            .max()
            .unwrap_or(0) as usize;
        let num_classes = match num_classes {
            Some(k) if k < 2 => {
                return Err(value(format!("num_classes must be at least 2, got {k}")))
            }
            Some(k) => k,
            None => (max_label + 1).max(2),
        };
        for (n, s) in [("train", &train), ("valid", &valid), ("test", &test)] {
            if let Some((i, l)) = s
                .labels
                .iter()
                .enumerate()
                .find(|(_, &l)| l as usize >= num_classes)
            {
                return Err(value(format!(
                    "{n}[\"labels\"][{i}] is {l}, out of range for num_classes={num_classes} \
                     (labels are 0..{})",
                    num_classes - 1
                )));
            }
        }
        let rule = minority_rule(minority_share, minority_groups)?;
        match (third, rule) {
            (Third::Bias, Some(_)) => {
                return Err(value(
                    "minority_share and minority_groups choose the minority groups of \
                     (label, attribute) cells: give the splits `attributes` instead of `bias`",
                ))
            }
            (Third::Bias, None) => {}
            (Third::Attributes, rule) => {
                let rule = rule.unwrap_or(MinorityRule::ShareBelow(DEFAULT_MINORITY_SHARE));
                let info = GroupInfo::choose(&train.labels, &train.bias, &rule)
                    .map_err(errors::value_error)?;
                let info = Arc::new(info);
                for s in [&mut train, &mut valid, &mut test] {
                    s.groups = Some(info.clone());
                }
            }
        }
        let conflict_pct = match conflict_pct {
            Some(p) => p,
            None => {
                let pct = 100.0 * train.conflicting_count() as f64 / train.len() as f64;
                if !(pct > 0.0 && pct < 100.0) {
                    let what = match third {
                        Third::Bias => "bias-conflicting samples (label != bias)",
                        Third::Attributes => "samples in minority groups",
                    };
                    return Err(value(format!(
                        "the training split has {pct}% {what}; pass conflict_pct= in (0, 100), \
                         which the default LAMBDA pairs with"
                    )));
                }
                pct
            }
        };
        if !(conflict_pct.is_finite() && conflict_pct > 0.0 && conflict_pct < 100.0) {
            return Err(value(format!(
                "conflict_pct must be a percentage in (0, 100), got {conflict_pct}"
            )));
        }
        Ok(Self {
            source: Source::Arrays {
                ds: Arc::new(GroupDataset {
                    name,
                    num_classes,
                    train,
                    valid,
                    test,
                }),
                conflict_pct,
            },
            loaded: OnceLock::new(),
        })
    }

    /// The dataset's name (e.g. `cmnist-5pct`; loads an options dataset).
    #[getter]
    fn name(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.load(py)?.name.clone())
    }

    /// Number of classes.
    #[getter]
    fn num_classes(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.load(py)?.num_classes)
    }

    /// The image shape `(H, W, C)`.
    #[getter]
    fn image_shape(&self, py: Python<'_>) -> PyResult<(usize, usize, usize)> {
        let ds = self.load(py)?;
        Ok((ds.train.height, ds.train.width, ds.train.channels))
    }

    /// One split (`"train"`, `"valid"` or `"test"`) as NumPy arrays: `{"images": uint8 [N, H,
    /// W, C], "labels": int64 [N], "bias": int64 [N]}` (copies); `"attributes"` instead of
    /// `"bias"` for a dataset with (label, attribute) groups (a metadata table, or arrays given
    /// with `attributes`), so that `from_arrays` takes the dicts back as they are.
    fn arrays<'py>(&self, py: Python<'py>, split: &str) -> PyResult<Bound<'py, PyDict>> {
        let ds = self.load(py)?;
        let s = match split {
            "train" => &ds.train,
            "valid" => &ds.valid,
            "test" => &ds.test,
            _ => {
                return Err(value(format!(
                    "split must be \"train\", \"valid\" or \"test\", got {split:?}"
                )))
            }
        };
        // Every record in order: the buffer itself, or decoded (`Images::batch`).
        let all: Vec<usize> = (0..s.len()).collect();
        let bytes = s
            .images
            .batch(&all, s.image_size())
            .map_err(errors::run_error)?
            .bytes
            .into_owned();
        let images = Array4::from_shape_vec((s.len(), s.height, s.width, s.channels), bytes)
            .map_err(|e| value(format!("internal: {e}")))?;
        let ints = |v: &[u32]| Array1::from_iter(v.iter().map(|&x| x as i64));
        let d = PyDict::new(py);
        d.set_item("images", images.into_pyarray(py))?;
        d.set_item("labels", ints(&s.labels).into_pyarray(py))?;
        let third = if s.groups.is_some() {
            Third::Attributes
        } else {
            Third::Bias
        };
        d.set_item(third.key(), ints(&s.bias).into_pyarray(py))?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        match &self.source {
            Source::Arrays { ds, conflict_pct } => format!(
                "Dataset.from_arrays(name={:?}, train={}, valid={}, test={}, image {}x{}x{}, \
                 {} classes, {}conflict_pct={conflict_pct:.3})",
                ds.name,
                ds.train.len(),
                ds.valid.len(),
                ds.test.len(),
                ds.train.height,
                ds.train.width,
                ds.train.channels,
                ds.num_classes,
                match &ds.train.groups {
                    Some(g) => format!(
                        "{} (label, attribute) groups, minority {:?}, ",
                        g.train_groups.len(),
                        g.minority
                    ),
                    None => String::new(),
                }
            ),
            Source::Options(t) => {
                let kv: Vec<String> = t.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if t.contains_key("data") {
                    format!("Dataset.folder({})", kv.join(", "))
                } else {
                    format!("Dataset.colored_mnist({})", kv.join(", "))
                }
            }
        }
    }
}
