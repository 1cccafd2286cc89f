//! Inference from a trained run: loading a model from a run's `best.safetensors` (with the
//! `config.toml` beside it) or from a sparse export (`export`), evaluating it with group
//! metrics (`rest eval`) and classifying image files (`predict`, `rest predict`). Masked
//! layers run on the same kernels (sparse or dense, by the run's `kernels` setting and the
//! layer density) as at the end of training, so evaluation reproduces `summary.json` exactly.

pub mod export;
pub mod predict;
pub mod st;

use crate::data::GroupDataset;
use crate::kernels::SparseWeight;
use crate::models::{self, Model};
use crate::nn::Buffer;
use crate::train::metrics::GroupMetrics;
use crate::train::TrainConfig;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;
use st::StFile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where evaluation data comes from (`--data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataSource {
    /// The run's own data: the built-in Colored MNIST generated from the run's data
    /// settings, or the run's `--data` folder (resized and normalised as in training).
    Builtin,
}

impl FromStr for DataSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "builtin" => Ok(DataSource::Builtin),
            _ => Err(format!(
                "unknown data source {s:?}: only `builtin` (the built-in Colored MNIST) is \
                 supported so far"
            )),
        }
    }
}

/// The input shape `(channels, height, width)` and number of classes of a run's data: the
/// built-in Colored MNIST's (RGB 28x28, 10 classes), or, for a run trained on a `--data`
/// folder or on in-memory arrays, what the run recorded in `run_dir/data.json`; a run without that file (trained
/// before it existed) reads them from its data folder.
pub fn data_shape(cfg: &TrainConfig, run_dir: &Path) -> Result<((usize, usize, usize), usize)> {
    use crate::train::output::{DataInfo, DATA_INFO_FILE};
    let info_path = run_dir.join(DATA_INFO_FILE);
    // A run on in-memory arrays records built-in data settings but its own shape.
    let in_memory = crate::train::output::read_data_info(run_dir).is_some_and(|i| i.in_memory);
    if cfg.data.data.is_none() && !in_memory {
        return Ok(((3, 28, 28), crate::data::colored_mnist::NUM_CLASSES));
    }
    if info_path.is_file() {
        let text = std::fs::read_to_string(&info_path)
            .with_context(|| format!("cannot read {}", info_path.display()))?;
        let info: DataInfo = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid data description (input shape and classes of the run); \
                 delete it to read them from the run's data folder",
                info_path.display()
            )
        })?;
        let [c, h, w] = info.input;
        if c == 0 || h == 0 || w == 0 || info.classes == 0 {
            bail!(
                "{} gives an empty input shape {:?} or no classes",
                info_path.display(),
                info.input
            );
        }
        return Ok(((c, h, w), info.classes));
    }
    let ds = crate::data::load(&cfg.data.plan().source).with_context(|| {
        format!(
            "{} is missing, so the input shape and classes must come from the run's data \
             folder, which cannot be loaded",
            info_path.display()
        )
    })?;
    let t = &ds.train;
    Ok(((t.channels, t.height, t.width), ds.num_classes))
}

/// One maskable weight of a loaded model.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub layer: String,
    pub shape: Vec<usize>,
    pub nonzero: usize,
    pub density: f64,
    /// Whether the layer runs on the sparse kernel.
    pub sparse_kernel: bool,
}

/// A model rebuilt from a checkpoint, ready for inference.
pub struct LoadedModel {
    pub model: Box<dyn Model>,
    /// The run's configuration (model, data settings, kernel mode).
    pub config: TrainConfig,
    pub input: (usize, usize, usize),
    pub classes: usize,
    pub layers: Vec<LayerInfo>,
    /// The 0/1 mask of each masked weight, by weight name.
    pub masks: BTreeMap<String, Vec<f32>>,
    /// Whether the file was a sparse export (`rest export`) rather than `best.safetensors`.
    pub exported: bool,
    pub path: PathBuf,
}

impl LoadedModel {
    /// Active weights over all maskable weights.
    pub fn density(&self) -> f64 {
        let nz: usize = self.layers.iter().map(|l| l.nonzero).sum();
        let n: usize = self
            .layers
            .iter()
            .map(|l| l.shape.iter().product::<usize>())
            .sum();
        nz as f64 / n.max(1) as f64
    }
}

/// Dense `f32` values of every parameter and buffer, and the masks of masked weights, by
/// name: what both checkpoint formats decode to.
pub(crate) struct Weights {
    pub values: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub masks: BTreeMap<String, Vec<f32>>,
}

/// Loads a run's `best.safetensors` (its `config.toml` must be beside it) or a file written
/// by `rest export`. Every problem (unreadable or truncated file, missing tensor, wrong shape,
/// e.g. a checkpoint of another model) is an error naming the file.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let file = StFile::read(path).context("--checkpoint")?;
    let shown = path.display();
    let exported = file.metadata.get("format").map(String::as_str) == Some(export::FORMAT);
    if exported {
        let (cfg, input, classes) = export::read_meta(&file.metadata)
            .with_context(|| format!("{shown}: bad metadata in the sparse export"))?;
        let model = new_model(&cfg, input, classes)
            .with_context(|| format!("cannot load {shown} (--checkpoint)"))?;
        // The model's shapes bound the dense weights the CSR tensors decode to.
        let shapes: BTreeMap<String, Vec<usize>> = model
            .params()
            .into_iter()
            .map(|p| (p.name, p.var.dims().to_vec()))
            .collect();
        let w = export::decode(&file, &shapes)
            .with_context(|| format!("{shown}: bad sparse export"))?;
        return fill_model(model, cfg, input, classes, &w, exported, path)
            .with_context(|| format!("cannot load {shown} (--checkpoint)"));
    }
    let (config, input, classes, weights) = {
        let cfg_path = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("config.toml");
        if !cfg_path.is_file() {
            bail!(
                "{shown} (--checkpoint) has no config.toml beside it: pass a run's \
                 best.safetensors inside its run directory, or a file written by `rest export`"
            );
        }
        let cfg = TrainConfig::from_toml_file(&cfg_path)?;
        let run_dir = cfg_path.parent().unwrap_or(Path::new("."));
        let (input, classes) = data_shape(&cfg, run_dir)?;
        (cfg, input, classes, dense_weights(&file)?)
    };
    let model = new_model(&config, input, classes)
        .with_context(|| format!("cannot load {shown} (--checkpoint)"))?;
    fill_model(model, config, input, classes, &weights, exported, path)
        .with_context(|| format!("cannot load {shown} (--checkpoint)"))
}

/// A fresh model of `config` for `input` images and `classes` classes (on the CPU).
fn new_model(
    config: &TrainConfig,
    input: (usize, usize, usize),
    classes: usize,
) -> Result<Box<dyn Model>> {
    let mut rng = crate::util::rng(config.optim.seed, 1);
    models::build(config.model, input, classes, &mut rng, &Device::Cpu)
}

/// Decodes a `best.safetensors`: `f32` parameters and buffers, `mask.<weight>` u8 masks.
fn dense_weights(file: &StFile) -> Result<Weights> {
    let mut w = Weights {
        values: BTreeMap::new(),
        masks: BTreeMap::new(),
    };
    for (name, t) in &file.tensors {
        if let Some(base) = name.strip_prefix("mask.") {
            w.masks.insert(
                base.to_string(),
                t.to_u32().iter().map(|&v| (v != 0) as u32 as f32).collect(),
            );
        } else {
            w.values.insert(name.clone(), (t.shape.clone(), t.to_f32()));
        }
    }
    Ok(w)
}

/// Puts the decoded weights, buffers and masks into `model`, the fresh model of `config`.
fn fill_model(
    model: Box<dyn Model>,
    config: TrainConfig,
    input: (usize, usize, usize),
    classes: usize,
    w: &Weights,
    exported: bool,
    path: &Path,
) -> Result<LoadedModel> {
    let dev = Device::Cpu;
    let kind = config.model.kind.as_str();
    let get = |name: &str, dims: &[usize]| -> Result<Tensor> {
        let (shape, v) = w.values.get(name).with_context(|| {
            format!("no tensor {name}, which a {kind} needs: was it written for another model than config.toml says?")
        })?;
        if shape.as_slice() != dims {
            bail!(
                "tensor {name} has shape {shape:?} but a {kind} needs {dims:?}: was it written \
                 for another model than config.toml says?"
            );
        }
        Ok(Tensor::from_slice(v, dims, &dev)?)
    };
    for p in model.params() {
        p.var.set(&get(&p.name, p.var.dims())?)?;
    }
    let buffers = model
        .buffers()?
        .into_iter()
        .map(|b| {
            Ok(Buffer {
                tensor: get(&b.name, b.tensor.dims())?,
                name: b.name,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    model.set_buffers(&buffers)?;

    let weights = model.weights();
    let masked = weights.iter().any(|p| w.masks.contains_key(&p.name));
    let mut layers = Vec::new();
    for p in &weights {
        let n = p.var.elem_count();
        let mask = match w.masks.get(&p.name) {
            Some(m) if m.len() == n => Some(m),
            Some(m) => bail!(
                "the mask of {} has {} entries, the weight {n}",
                p.name,
                m.len()
            ),
            // A sparse export stores layers at density 1 dense, without a mask.
            None if masked && !exported => {
                bail!("no mask for {} although other weights have one", p.name)
            }
            None => None,
        };
        let nonzero = mask.map_or(n, |m| m.iter().filter(|&&v| v != 0.0).count());
        let density = nonzero as f64 / n as f64;
        let mut sparse_kernel = false;
        if let (Some(m), Some(slot)) = (mask, &p.slot) {
            let mt = Tensor::from_slice(m, p.var.dims(), &dev)?;
            p.var.set(&p.var.as_tensor().mul(&mt)?)?;
            if config.sparse.kernels.sparse_for(density, p.var.rank() == 4) {
                let rows = p.var.dims()[0];
                let host = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let sw = SparseWeight::new(&host, m, rows, n / rows.max(1))?;
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(sw);
                sparse_kernel = true;
            }
        }
        layers.push(LayerInfo {
            layer: p.name.clone(),
            shape: p.var.dims().to_vec(),
            nonzero,
            density,
            sparse_kernel,
        });
    }
    Ok(LoadedModel {
        model,
        config,
        input,
        classes,
        layers,
        masks: w.masks.clone(),
        exported,
        path: path.to_path_buf(),
    })
}

/// The content of `eval.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub checkpoint: String,
    pub exported: bool,
    pub dataset: String,
    pub model: String,
    pub density: f64,
    pub layers: Vec<LayerInfo>,
    pub valid: GroupMetrics,
    pub test: GroupMetrics,
}

/// Evaluates a loaded model on the validation and test splits of `ds`.
pub fn evaluate(m: &LoadedModel, ds: &GroupDataset) -> Result<EvalReport> {
    let shape = (ds.test.channels, ds.test.height, ds.test.width);
    if shape != m.input || ds.num_classes != m.classes {
        bail!(
            "the data has {}x{}x{} images and {} classes, the model expects {}x{}x{} and {}",
            shape.0,
            shape.1,
            shape.2,
            ds.num_classes,
            m.input.0,
            m.input.1,
            m.input.2,
            m.classes
        );
    }
    let dev = Device::Cpu;
    let tf = m.config.data.plan().eval_transform;
    Ok(EvalReport {
        checkpoint: m.path.display().to_string(),
        exported: m.exported,
        dataset: ds.name.clone(),
        model: m.config.model.kind.as_str().into(),
        density: m.density(),
        layers: m.layers.clone(),
        valid: crate::train::eval::evaluate(m.model.as_ref(), &ds.valid, &tf, &dev)?,
        test: crate::train::eval::evaluate(m.model.as_ref(), &ds.test, &tf, &dev)?,
    })
}

/// The group-metrics table of an evaluation (accuracies in %).
pub fn eval_table(r: &EvalReport) -> String {
    format!(
        "{} | {} | density {:.4}\n{}",
        r.dataset,
        r.model,
        r.density,
        crate::report::metrics_table(&[("valid", &r.valid), ("test", &r.test)])
    )
}
