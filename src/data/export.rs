//! Export of a [`GroupDataset`] as NumPy `.npy` files (images `uint8` `[N, H, W, C]`, labels
//! and bias attributes `int64`) plus a `meta.json`, so other toolkits can load exactly the data
//! a run used.

use super::{GroupDataset, Split};
use crate::util;
use anyhow::{Context, Result};
use npyz::WriterBuilder;
use std::path::{Path, PathBuf};

/// Serialises `data` as an `.npy` file of the given `shape` (C order) in memory.
fn npy_bytes<T: npyz::AutoSerialize + Copy>(
    data: &[T],
    shape: &[u64],
    name: &str,
) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut buf)
        .begin_nd()
        .with_context(|| format!("cannot encode {name}"))?;
    writer
        .extend(data.iter().copied())
        .with_context(|| format!("cannot encode {name}"))?;
    writer
        .finish()
        .with_context(|| format!("cannot encode {name}"))?;
    Ok(buf)
}

fn write_npy<T: npyz::AutoSerialize + Copy>(
    dir: &Path,
    name: &str,
    data: &[T],
    shape: &[u64],
) -> Result<PathBuf> {
    let path = dir.join(name);
    util::write_atomic(&path, &npy_bytes(data, shape, name)?)?;
    Ok(path)
}

fn split_meta(s: &Split) -> serde_json::Value {
    serde_json::json!({ "count": s.len(), "conflicting": s.conflicting_count() })
}

/// Writes `{train,valid,test}_{images,labels,bias}.npy` and `meta.json` into `dir` (created
/// if needed), each file atomically; returns the paths written, `meta.json` last.
pub fn export_npy(ds: &GroupDataset, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the export directory {}: choose a writable path that is not a file",
            dir.display()
        )
    })?;
    let mut written = Vec::new();
    for (s, split) in [
        ("train", &ds.train),
        ("valid", &ds.valid),
        ("test", &ds.test),
    ] {
        let n = split.len() as u64;
        let shape = [
            n,
            split.height as u64,
            split.width as u64,
            split.channels as u64,
        ];
        written.push(write_npy(
            dir,
            &format!("{s}_images.npy"),
            &split.images,
            &shape,
        )?);
        let labels: Vec<i64> = split.labels.iter().map(|&l| i64::from(l)).collect();
        written.push(write_npy(dir, &format!("{s}_labels.npy"), &labels, &[n])?);
        let bias: Vec<i64> = split.bias.iter().map(|&b| i64::from(b)).collect();
        written.push(write_npy(dir, &format!("{s}_bias.npy"), &bias, &[n])?);
    }
    let meta = serde_json::json!({
        "name": ds.name,
        "num_classes": ds.num_classes,
        "image_shape": [ds.train.height, ds.train.width, ds.train.channels],
        "splits": {
            "train": split_meta(&ds.train),
            "valid": split_meta(&ds.valid),
            "test": split_meta(&ds.test),
        },
    });
    let path = dir.join("meta.json");
    let mut text = serde_json::to_string_pretty(&meta).context("cannot encode meta.json")?;
    text.push('\n');
    util::write_atomic(&path, text.as_bytes())?;
    written.push(path);
    Ok(written)
}
