//! The Corrupted CIFAR-10 generator (LfF, Nam et al. 2020): from the CIFAR-10 binary batches,
//! writes PNGs in the DFA layout where the bias attribute of a sample is the corruption it
//! received (Type0: snow, frost, ...; Type1: noise, blur, ...; class `i` is aligned with
//! corruption `i`). The attributes come from LfF's `make_attr_labels` (exact per-class
//! counts) for 0.5, 1, 2 and 5 % conflicting samples in one call.
//!
//! Splits follow the Colored MNIST generator (`data::make`): the 50,000 training images are
//! the training set of every ratio; the 10,000 test images are shuffled (by `--seed`) and
//! split 1/3 validation (biased like the training set of its ratio) and 2/3 test
//! (corruption-balanced: `make_attr_labels` at aligned ratio 1/10).
//!
//! Layout: `<pct>pct/{align,conflict}/<class>/`, `<pct>pct/valid/<class>/` (the one-level
//! nesting the loader expects for `cifar10c`), `test/<class>/`; file names
//! `<index>_<label>_<corruption>.png` (`index`: training image `i` is `i`, test image `j` is
//! `50000 + j`). Every image draws its randomness from its own stream keyed by (index,
//! corruption), so the output does not depend on thread scheduling, and an image that takes
//! the same corruption in two ratios is the same file.

use super::cifar::{self, CifarImages, SIDE};
use super::corrupt::{check_severity, corruption_type, Corruption};
use super::dfa::pct_token;
use super::make::{
    check_out_empty, make_attr_labels, mkdir, png_bytes, MakeReport, RatioCounts, RATIOS,
};
use crate::util;
use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// What `rest data make corrupted-cifar10` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct CifarSpec {
    /// Folder with `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin` (or its
    /// `cifar-10-batches-bin/`).
    pub source: PathBuf,
    pub out: PathBuf,
    /// 0 or 1 (LfF's Type0 / Type1 corruption lists).
    pub kind: u8,
    /// CIFAR-10-C severity 1-5 (LfF/DFA's released data: 4).
    pub severity: u8,
    pub seed: u64,
}

const STREAM_SPLIT: u64 = 0;
const STREAM_IMAGE: u64 = 1 << 32;

/// The random stream of image `index` under corruption `c`.
pub fn image_stream(index: usize, c: Corruption) -> u64 {
    STREAM_IMAGE + ((index as u64) << 5) + c.index() as u64
}

/// Corrupts one 32x32 image deterministically for (`seed`, `index`, corruption).
pub fn corrupt_image(
    rgb: &[u8],
    index: usize,
    c: Corruption,
    severity: u8,
    seed: u64,
) -> Result<Vec<u8>> {
    let mut rng = util::rng(seed, image_stream(index, c));
    c.apply(rgb, SIDE, SIDE, severity, &mut rng)
}

struct Job<'a> {
    rgb: &'a [u8],
    index: usize,
    corruption: Corruption,
    path: PathBuf,
}

fn write_jobs(jobs: &[Job], spec: &CifarSpec) -> Result<()> {
    jobs.par_iter().try_for_each(|j| -> Result<()> {
        let img = corrupt_image(j.rgb, j.index, j.corruption, spec.severity, spec.seed)?;
        let png = png_bytes(img, SIDE as u32, SIDE as u32)?;
        std::fs::write(&j.path, png).with_context(|| format!("cannot write {}", j.path.display()))
    })
}

/// Plans one split: images `idx` of `src` (global index `offset + i`), attributes `attr`,
/// folder of each file from (label, attribute).
fn plan<'a>(
    src: &'a CifarImages,
    idx: &[usize],
    offset: usize,
    attr: &[u32],
    table: &[Corruption; 10],
    dir_of: impl Fn(u32, u32) -> PathBuf,
) -> Vec<Job<'a>> {
    idx.iter()
        .zip(attr)
        .map(|(&i, &a)| {
            let l = u32::from(src.labels[i]);
            let index = offset + i;
            Job {
                rgb: src.image(i),
                index,
                corruption: table[a as usize],
                path: dir_of(l, a).join(format!("{index}_{l}_{a}.png")),
            }
        })
        .collect()
}

fn labels(src: &CifarImages, idx: &[usize]) -> Vec<u32> {
    idx.iter().map(|&i| u32::from(src.labels[i])).collect()
}

fn conflicts(labels: &[u32], attr: &[u32]) -> usize {
    labels.iter().zip(attr).filter(|(l, a)| l != a).count()
}

fn class_dirs(dir: &Path) -> Result<()> {
    for c in 0..cifar::CLASSES {
        mkdir(&dir.join(c.to_string()))?;
    }
    Ok(())
}

/// Writes Corrupted CIFAR-10 (Type `spec.kind`) in the DFA layout for every ratio of
/// [`RATIOS`], then `dataset.json` (atomically, last: its presence marks a complete folder).
pub fn make_corrupted_cifar10(spec: &CifarSpec) -> Result<MakeReport> {
    let table = corruption_type(spec.kind)?;
    check_severity(spec.severity)?;
    check_out_empty(&spec.out)?;
    let (train, test) = cifar::read_cifar10(&spec.source)?;
    let n_tr = train.len();
    let mut held: Vec<usize> = (0..test.len()).collect();
    held.shuffle(&mut util::rng(spec.seed, STREAM_SPLIT));
    let nv = test.len() / 3;
    let (valid_idx, test_idx) = held.split_at(nv);
    let train_idx: Vec<usize> = (0..n_tr).collect();
    let n_classes = cifar::CLASSES;
    let out = &spec.out;
    let mut report = MakeReport {
        ratios: Vec::new(),
        test: test_idx.len(),
    };
    let tr_labels = labels(&train, &train_idx);
    let va_labels = labels(&test, valid_idx);
    for &pct in &RATIOS {
        let pdir = out.join(pct_token(pct));
        class_dirs(&pdir.join("align"))?;
        class_dirs(&pdir.join("conflict"))?;
        class_dirs(&pdir.join("valid"))?;
        let aligned = 1.0 - pct / 100.0;
        let tr_attr = make_attr_labels(&tr_labels, n_classes, aligned);
        let jobs = plan(&train, &train_idx, 0, &tr_attr, &table, |l, a| {
            let part = if l == a { "align" } else { "conflict" };
            pdir.join(part).join(l.to_string())
        });
        write_jobs(&jobs, spec)?;
        let va_attr = make_attr_labels(&va_labels, n_classes, aligned);
        let jobs = plan(&test, valid_idx, n_tr, &va_attr, &table, |l, _| {
            pdir.join("valid").join(l.to_string())
        });
        write_jobs(&jobs, spec)?;
        let conflict = conflicts(&tr_labels, &tr_attr);
        report.ratios.push(RatioCounts {
            token: pct_token(pct),
            align: tr_labels.len() - conflict,
            conflict,
            valid: va_labels.len(),
            valid_conflict: conflicts(&va_labels, &va_attr),
        });
    }
    class_dirs(&out.join("test"))?;
    let te_attr = make_attr_labels(&labels(&test, test_idx), n_classes, 0.1);
    let jobs = plan(&test, test_idx, n_tr, &te_attr, &table, |l, _| {
        out.join("test").join(l.to_string())
    });
    write_jobs(&jobs, spec)?;
    let meta = serde_json::json!({
        "generator": "rest data make corrupted-cifar10",
        "source": spec.source.display().to_string(),
        "type": spec.kind,
        "corruptions": table.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "severity": spec.severity,
        "seed": spec.seed,
        "note": "CIFAR-10-C severity parameters; frost uses a synthetic ice texture (CIFAR-10-C's frost photographs are not shipped)",
        "counts": report,
    });
    let mut text = serde_json::to_string_pretty(&meta).context("cannot encode dataset.json")?;
    text.push('\n');
    util::write_atomic(&out.join("dataset.json"), text.as_bytes())?;
    Ok(report)
}
