//! The sparse export (`rest export`): a trained sparse model in one compact safetensors file.
//!
//! Format (`format = "rest-sparse-export"`, `format_version = "1"` in `__metadata__`):
//! - every masked weight of density < 1, as CSR over its output rows (the weight viewed as
//!   `rows = shape[0]` x `cols = numel / rows`): `<name>.row_ptr` (U32, rows + 1),
//!   `<name>.col_idx` (U16 when cols <= 65536, else U32; sorted within a row),
//!   `<name>.values` (F32, or F16 with `--f16`) and `<name>.shape` (U32, the dense shape).
//!   The pattern is the training mask, so an active weight that happens to be 0 is kept;
//! - every other parameter and BatchNorm buffer as a dense F32 tensor under its own name;
//! - metadata: `config` (the run's config.toml), `input` (`C,H,W`), `classes`, `values`
//!   (`f32` or `f16`), `rest_version`.
//!
//! `rest eval` and `rest predict` read it back into the same model with the same masks.

use super::st::{Dtype, RawTensor, StFile};
use super::{LoadedModel, Weights};
use crate::train::TrainConfig;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The most input channels and classes an export may claim (its model is built from them
/// before its tensors are read).
const MAX_CHANNELS: usize = 64;
const MAX_CLASSES: usize = 100_000;

/// The `format` metadata value of a sparse export.
pub const FORMAT: &str = "rest-sparse-export";

/// File sizes of an export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportStats {
    /// Bytes of the exported file.
    pub export_bytes: usize,
    /// Bytes of a dense safetensors file of the same parameters and buffers (f32, no masks).
    pub dense_bytes: usize,
    /// `dense_bytes / export_bytes`.
    pub ratio: f64,
}

/// CSR of `w` (`rows` x `cols`, row-major) restricted to `mask`.
fn csr(w: &[f32], mask: &[f32], rows: usize, cols: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let mut row_ptr = Vec::with_capacity(rows + 1);
    let (mut col_idx, mut values) = (Vec::new(), Vec::new());
    row_ptr.push(0u32);
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            if mask[i] != 0.0 {
                col_idx.push(c as u32);
                values.push(w[i]);
            }
        }
        row_ptr.push(col_idx.len() as u32);
    }
    (row_ptr, col_idx, values)
}

/// Builds the export of a loaded model (`f16`: values in half precision).
pub fn encode(m: &LoadedModel, f16: bool) -> Result<StFile> {
    let mut f = StFile::default();
    let host =
        |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    for p in m.model.params() {
        let dims = p.var.dims().to_vec();
        let w = host(p.var.as_tensor())?;
        match m.masks.get(&p.name) {
            Some(mask) if mask.contains(&0.0) => {
                let rows = dims[0];
                let cols = w.len() / rows.max(1);
                if w.len() > u32::MAX as usize {
                    bail!("{} has too many weights for 32-bit CSR indices", p.name);
                }
                let (row_ptr, col_idx, values) = csr(&w, mask, rows, cols);
                let name = &p.name;
                let nnz = values.len();
                f.tensors.insert(
                    format!("{name}.row_ptr"),
                    RawTensor::u32(vec![rows + 1], &row_ptr),
                );
                let idx = if cols <= 1 << 16 {
                    let v: Vec<u16> = col_idx.iter().map(|&c| c as u16).collect();
                    RawTensor::u16(vec![nnz], &v)
                } else {
                    RawTensor::u32(vec![nnz], &col_idx)
                };
                f.tensors.insert(format!("{name}.col_idx"), idx);
                let vals = if f16 {
                    RawTensor::f16(vec![nnz], &values)
                } else {
                    RawTensor::f32(vec![nnz], &values)
                };
                f.tensors.insert(format!("{name}.values"), vals);
                let shape: Vec<u32> = dims.iter().map(|&d| d as u32).collect();
                f.tensors.insert(
                    format!("{name}.shape"),
                    RawTensor::u32(vec![shape.len()], &shape),
                );
            }
            _ => {
                f.tensors
                    .insert(p.name.clone(), RawTensor::f32(dims.clone(), &w));
            }
        }
    }
    for b in m.model.buffers()? {
        f.tensors.insert(
            b.name.clone(),
            RawTensor::f32(b.tensor.dims().to_vec(), &host(&b.tensor)?),
        );
    }
    let meta = &mut f.metadata;
    meta.insert("format".into(), FORMAT.into());
    meta.insert("format_version".into(), "1".into());
    meta.insert("config".into(), m.config.to_toml()?);
    let (c, h, w) = m.input;
    meta.insert("input".into(), format!("{c},{h},{w}"));
    meta.insert("classes".into(), m.classes.to_string());
    meta.insert("values".into(), if f16 { "f16" } else { "f32" }.into());
    meta.insert("rest_version".into(), env!("CARGO_PKG_VERSION").into());
    Ok(f)
}

/// Bytes of a dense f32 safetensors file of the model's parameters and buffers.
pub fn dense_size(m: &LoadedModel) -> Result<usize> {
    let mut f = StFile::default();
    for p in m.model.params() {
        let v = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        f.tensors
            .insert(p.name.clone(), RawTensor::f32(p.var.dims().to_vec(), &v));
    }
    for b in m.model.buffers()? {
        let v = b.tensor.flatten_all()?.to_vec1::<f32>()?;
        f.tensors
            .insert(b.name, RawTensor::f32(b.tensor.dims().to_vec(), &v));
    }
    Ok(f.to_bytes()?.len())
}

/// Loads `checkpoint` (a run's best.safetensors or an export) and writes its sparse export to
/// `out` atomically.
pub fn export(checkpoint: &Path, out: &Path, f16: bool) -> Result<ExportStats> {
    let m = super::load(checkpoint)?;
    if m.masks.is_empty() {
        tracing::warn!(
            "{} has no masks (a dense run): the export stores every weight densely",
            checkpoint.display()
        );
    }
    let bytes = encode(&m, f16)?.to_bytes()?;
    crate::util::write_atomic(out, &bytes).context("--out")?;
    let dense_bytes = dense_size(&m)?;
    Ok(ExportStats {
        export_bytes: bytes.len(),
        dense_bytes,
        ratio: dense_bytes as f64 / bytes.len() as f64,
    })
}

/// Reads the config, input shape and number of classes from an export's metadata.
pub(crate) fn read_meta(
    meta: &BTreeMap<String, String>,
) -> Result<(TrainConfig, (usize, usize, usize), usize)> {
    let get = |k: &str| meta.get(k).with_context(|| format!("no `{k}` entry"));
    let version = get("format_version")?;
    if version != "1" {
        bail!("format version {version} is not supported by this rest (1); upgrade rest");
    }
    let cfg: TrainConfig = toml::from_str(get("config")?).context("the `config` entry")?;
    let dims: Vec<usize> = get("input")?
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .context("the `input` entry")?;
    let [c, h, w] = dims[..] else {
        bail!("the `input` entry must be C,H,W");
    };
    let side = 1..=crate::data::MAX_IMAGE_SIZE;
    if !(1..=MAX_CHANNELS).contains(&c) || !side.contains(&h) || !side.contains(&w) {
        bail!(
            "the `input` entry {c},{h},{w} is not an image shape rest trains on (1 to \
             {MAX_CHANNELS} channels, sides of 1 to {} pixels)",
            crate::data::MAX_IMAGE_SIZE
        );
    }
    let classes = get("classes")?
        .parse::<usize>()
        .context("the `classes` entry")?;
    if !(2..=MAX_CLASSES).contains(&classes) {
        bail!("the `classes` entry {classes} is not a class count rest trains on (2 to {MAX_CLASSES})");
    }
    cfg.model.validate().context("the `config` entry's model")?;
    Ok((cfg, (c, h, w), classes))
}

/// Decodes an export into dense values and masks. `shapes` holds the shape of every weight
/// of the model the export is for: a CSR weight must have one of them, so that no dense
/// buffer is allocated for a shape only the file claims.
pub(crate) fn decode(f: &StFile, shapes: &BTreeMap<String, Vec<usize>>) -> Result<Weights> {
    let mut w = Weights {
        values: BTreeMap::new(),
        masks: BTreeMap::new(),
    };
    for (name, t) in &f.tensors {
        let Some(base) = name.strip_suffix(".row_ptr") else {
            if [".col_idx", ".values", ".shape"]
                .iter()
                .any(|s| name.ends_with(s))
            {
                continue;
            }
            if t.dtype != Dtype::F32 {
                bail!("tensor {name} must be F32, it is {}", t.dtype.name());
            }
            w.values.insert(name.clone(), (t.shape.clone(), t.to_f32()));
            continue;
        };
        let part = |s: &str| -> Result<&RawTensor> {
            f.tensors
                .get(&format!("{base}.{s}"))
                .with_context(|| format!("{base} has a row_ptr but no {s}"))
        };
        let (col_t, val_t, shape_t) = (part("col_idx")?, part("values")?, part("shape")?);
        if !matches!(col_t.dtype, Dtype::U16 | Dtype::U32)
            || !matches!(val_t.dtype, Dtype::F32 | Dtype::F16)
            || t.dtype != Dtype::U32
            || shape_t.dtype != Dtype::U32
        {
            bail!("the CSR tensors of {base} have unexpected dtypes");
        }
        let shape: Vec<usize> = shape_t.to_u32().iter().map(|&d| d as usize).collect();
        match shapes.get(base) {
            Some(want) if *want == shape => {}
            Some(want) => bail!(
                "the CSR weight {base} has shape {shape:?}, the model's is {want:?}: was it \
                 written for another model than its `config` entry says?"
            ),
            None => {
                bail!("the CSR weight {base} is not a weight of the model of the `config` entry")
            }
        }
        let n: usize = shape.iter().product();
        let rows = shape.first().copied().unwrap_or(0);
        let cols = n / rows.max(1);
        let row_ptr = t.to_u32();
        let col_idx = col_t.to_u32();
        let values = val_t.to_f32();
        let nnz = values.len();
        let valid = rows > 0
            && row_ptr.len() == rows + 1
            && row_ptr[0] == 0
            && row_ptr.windows(2).all(|p| p[0] <= p[1])
            && row_ptr[rows] as usize == nnz
            && col_idx.len() == nnz
            && col_idx.iter().all(|&c| (c as usize) < cols);
        if !valid {
            bail!("the CSR arrays of {base} are inconsistent with its shape {shape:?}");
        }
        let mut dense = vec![0.0f32; n];
        let mut mask = vec![0.0f32; n];
        for r in 0..rows {
            for k in row_ptr[r] as usize..row_ptr[r + 1] as usize {
                let i = r * cols + col_idx[k] as usize;
                dense[i] = values[k];
                mask[i] = 1.0;
            }
        }
        w.values.insert(base.to_string(), (shape, dense));
        w.masks.insert(base.to_string(), mask);
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An export's metadata claims the model that is built before its tensors are read:
    /// image shapes, class counts and widths beyond what rest trains are errors.
    #[test]
    fn metadata_claims_are_bounded() -> Result<()> {
        let meta = |input: &str, classes: &str, width: usize| -> BTreeMap<String, String> {
            let mut cfg = TrainConfig::default();
            cfg.model.width = width;
            BTreeMap::from([
                ("format_version".to_string(), "1".to_string()),
                ("config".to_string(), toml::to_string(&cfg).expect("toml")),
                ("input".to_string(), input.to_string()),
                ("classes".to_string(), classes.to_string()),
            ])
        };
        let (_, input, classes) = read_meta(&meta("3,28,28", "10", 64))?;
        assert_eq!((input, classes), ((3, 28, 28), 10));
        for (input, classes, width, needle) in [
            ("3,28,100000", "10", 64, "`input` entry"),
            ("0,28,28", "10", 64, "`input` entry"),
            ("3,28,28", "4000000000", 64, "`classes` entry"),
            ("3,28,28", "10", 100_000, "--width"),
        ] {
            let e = format!("{:#}", read_meta(&meta(input, classes, width)).unwrap_err());
            assert!(e.contains(needle), "{e}");
        }
        Ok(())
    }

    #[test]
    fn csr_keeps_the_mask_pattern_including_zero_values() {
        // 2 x 3 weight; mask keeps (0,1), (1,0), (1,2); the value at (1,2) is 0.
        let w = [9.0, 1.5, 9.0, -2.0, 9.0, 0.0];
        let m = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        let (rp, ci, v) = csr(&w, &m, 2, 3);
        assert_eq!(rp, vec![0, 1, 3]);
        assert_eq!(ci, vec![1, 0, 2]);
        assert_eq!(v, vec![1.5, -2.0, 0.0]);
    }
}
