//! Export of a [`GroupDataset`] as NumPy `.npy` files (images `uint8` `[N, H, W, C]`, labels
//! and bias attributes `int64`) plus a `meta.json`, so other toolkits can load exactly the data
//! a run used. Images are written a chunk at a time, so an export of a memory-mapped or
//! decoded-on-the-fly dataset never holds a split in RAM.

use super::{GroupDataset, Split};
use crate::util;
use anyhow::{Context, Result};
use npyz::WriterBuilder;
use std::path::{Path, PathBuf};

/// Writes `.npy` data of the given `shape` (C order): `fill` hands the values to `put`.
fn npy_to<T: npyz::AutoSerialize + Copy, W: std::io::Write>(
    w: W,
    shape: &[u64],
    name: &str,
    fill: impl FnOnce(&mut dyn FnMut(&[T]) -> Result<()>) -> Result<()>,
) -> Result<()> {
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(w)
        .begin_nd()
        .with_context(|| format!("cannot encode {name}"))?;
    fill(&mut |vals: &[T]| {
        writer
            .extend(vals.iter().copied())
            .with_context(|| format!("cannot encode {name}"))
    })?;
    writer
        .finish()
        .with_context(|| format!("cannot encode {name}"))?;
    Ok(())
}

fn write_npy<T: npyz::AutoSerialize + Copy>(
    dir: &Path,
    name: &str,
    data: &[T],
    shape: &[u64],
) -> Result<PathBuf> {
    let path = dir.join(name);
    util::write_atomic_with(&path, |w| npy_to(w, shape, name, |put| put(data)))?;
    Ok(path)
}

/// Images exported per chunk: about this many bytes.
const CHUNK_BYTES: usize = 16 << 20;

/// Writes the images of `split` as `uint8` `[N, H, W, C]`, a chunk of images at a time.
fn write_images(dir: &Path, name: &str, split: &Split) -> Result<PathBuf> {
    let path = dir.join(name);
    let shape = [
        split.len() as u64,
        split.height as u64,
        split.width as u64,
        split.channels as u64,
    ];
    let sz = split.image_size();
    let per_chunk = (CHUNK_BYTES / sz.max(1)).max(1);
    util::write_atomic_with(&path, |w| {
        npy_to::<u8, _>(w, &shape, name, |put| {
            let all: Vec<usize> = (0..split.len()).collect();
            for idx in all.chunks(per_chunk) {
                let batch = split.images.batch(idx, sz)?;
                for &i in batch.idx.iter() {
                    put(&batch.bytes[i * sz..(i + 1) * sz])?;
                }
            }
            Ok(())
        })
    })?;
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
        written.push(write_images(dir, &format!("{s}_images.npy"), split)?);
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
