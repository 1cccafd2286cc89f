//! Loader for dataset folders in the layout of the DFA release (Lee et al., 2021), which is
//! how Colored MNIST, Corrupted CIFAR-10 and BFFHQ are distributed:
//!
//! ```text
//! PATH/<pct>pct/align/<class>/*      bias-aligned training images
//! PATH/<pct>pct/conflict/<class>/*   bias-conflicting training images (may be empty)
//! PATH/<pct>pct/valid/*              validation (cmnist; cifar10c: valid/*/*)
//! PATH/valid/*                       validation (bffhq)
//! PATH/test/<class>/*                test (cmnist, cifar10c; bffhq: test/*)
//! ```
//!
//! Label and bias attribute come from the file name `..._<label>_<bias>.<ext>`. Images are
//! decoded in parallel to RGB, optionally resized to `S x S` (bilinear; `--image-size`, BFFHQ's
//! 128-pixel pipeline), a chunk at a time, into the decoded-image cache file (`data::cache`)
//! keyed by the file list, sizes, modification times and the resize; training reads the
//! splits through a memory map of that file, and later runs reuse it. Where no cache file can
//! be written, the images are decoded from their files batch by batch instead.
//!
//! The decoding, resizing and caching are shared with datasets described by a table
//! (`data::table`), which hand over their files with labels and attributes
//! ([`load_listed`]).

use super::cache;
use super::images::{ImageSource, Images};
use super::DatasetKind;
use super::{GroupDataset, Split};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{info, warn};

/// Labels at or above this are taken for a misnamed file rather than a real class.
const MAX_LABEL: u32 = 100_000;
/// File extensions decoded as images (case-insensitive).
const IMAGE_EXTS: [&str; 3] = ["png", "jpg", "jpeg"];

/// What to load.
#[derive(Debug, Clone, PartialEq)]
pub struct DfaOptions {
    pub root: PathBuf,
    pub kind: DatasetKind,
    /// Selects the `<pct>pct` folder of the training and (cmnist, cifar10c) validation data.
    pub conflict_pct: f64,
    /// Skip bad files (and count them) instead of failing.
    pub skip_bad: bool,
    /// Folder of the cache file (default: `root`).
    pub cache_dir: Option<PathBuf>,
}

/// A loaded folder dataset and how it was loaded.
#[derive(Debug, Clone)]
pub struct DfaLoad {
    pub dataset: GroupDataset,
    /// The layout used (never `Auto`).
    pub kind: DatasetKind,
    /// Files skipped under `skip_bad` (zero otherwise).
    pub skipped: usize,
    /// True when the images came from the cache file.
    pub from_cache: bool,
    pub cache_file: PathBuf,
    /// Bytes of the cache file the images are mapped from; `None` when no cache file could
    /// be written and images are decoded on the fly.
    pub cache_bytes: Option<u64>,
}

/// The folder token of a conflicting percentage: 0.5 -> `0.5pct`, 5 -> `5pct`.
pub fn pct_token(pct: f64) -> String {
    format!("{pct}pct")
}

/// Label and bias attribute from a file name `..._<label>_<bias>.<ext>`.
pub fn parse_name(path: &Path) -> Result<(u32, u32)> {
    let expected = "expected a name like `<id>_<label>_<bias>.png` with integer label and bias";
    let stem = path.file_stem().and_then(|s| s.to_str()).with_context(|| {
        format!(
            "{}: file name is not valid UTF-8; {expected}",
            path.display()
        )
    })?;
    let fields: Vec<&str> = stem.split('_').collect();
    if fields.len() < 2 {
        bail!(
            "{}: cannot read label and bias from the file name; {expected}",
            path.display()
        );
    }
    let num = |s: &str, what: &str| -> Result<u32> {
        match s.parse::<u32>() {
            Ok(v) if v < MAX_LABEL => Ok(v),
            _ => bail!(
                "{}: the {what} field {s:?} of the file name is not an integer below {MAX_LABEL}; \
                 {expected}",
                path.display()
            ),
        }
    };
    let label = num(fields[fields.len() - 2], "label")?;
    let bias = num(fields[fields.len() - 1], "bias")?;
    Ok((label, bias))
}

/// The layout of `root` under `kind`: `Auto` looks for a known table (`data::table::detect`:
/// CelebA's, Waterbirds', SubpopBench's), then at the folder name (`cmnist`, `colored_mnist`,
/// `cifar10c`, `bffhq`), else falls back to the generic `Dfa`.
pub fn resolve_kind(root: &Path, kind: DatasetKind) -> DatasetKind {
    if kind != DatasetKind::Auto {
        return kind;
    }
    if let Some(k) = super::table::detect(root) {
        return k;
    }
    let name = root
        .canonicalize()
        .unwrap_or_else(|_| root.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.contains("cmnist") || name.contains("colored_mnist") || name.contains("coloredmnist") {
        DatasetKind::Cmnist
    } else if name.contains("cifar10c") || name.contains("cifar10_c") {
        DatasetKind::Cifar10c
    } else if name.contains("bffhq") {
        DatasetKind::Bffhq
    } else {
        DatasetKind::Dfa
    }
}

/// One file of a split, with what the cache key needs.
#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
    /// Label, attribute and where they were read (a table's line), when they do not come
    /// from the file name.
    listed: Option<(u32, u32, String)>,
}

/// An image file with its label and attribute from a table (`data::table`).
#[derive(Debug, Clone, PartialEq)]
pub struct ListedFile {
    pub path: PathBuf,
    pub label: u32,
    pub attribute: u32,
    /// Where the file was listed (e.g. `metadata.csv line 7`), for error messages.
    pub origin: String,
}

/// What happens to an image's geometry when it is loaded (before caching): an optional
/// centre crop to a square of `crop_before` pixels (CelebA's 178), a bilinear resize to
/// `resize x resize`, then an optional centre crop to `crop_after x crop_after` (Waterbirds'
/// resize to 256 + centre crop to 224).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadGeometry {
    pub crop_before: Option<usize>,
    pub resize: Option<usize>,
    pub crop_after: Option<usize>,
}

impl LoadGeometry {
    /// Only a resize (or nothing), as DFA folders load.
    pub fn resize(size: Option<usize>) -> Self {
        LoadGeometry {
            resize: size,
            ..Self::default()
        }
    }

    /// True when the geometry crops (table layouts' pipelines).
    pub fn crops(&self) -> bool {
        self.crop_before.is_some() || self.crop_after.is_some()
    }

    /// `(width, height)` of a `(w, h)` image after [`Self::apply`].
    pub fn output_size(&self, (w, h): (u32, u32)) -> (u32, u32) {
        let crop = |c: Option<usize>, (w, h): (u32, u32)| match c {
            Some(c) => ((c as u32).min(w), (c as u32).min(h)),
            None => (w, h),
        };
        let mut size = crop(self.crop_before, (w, h));
        if let Some(s) = self.resize {
            size = (s as u32, s as u32);
        }
        crop(self.crop_after, size)
    }

    /// The output size when it does not depend on the image's (a resize fixes it), so that
    /// probing a file needs no header read.
    pub fn fixed_size(&self) -> Option<(u32, u32)> {
        self.resize.map(|s| self.output_size((s as u32, s as u32)))
    }

    /// The image after the crop, the bilinear resize and the second crop.
    pub fn apply(&self, mut rgb: image::RgbImage) -> image::RgbImage {
        if let Some(c) = self.crop_before {
            rgb = centre_crop(rgb, c);
        }
        if let Some(s) = self.resize {
            let s = s as u32;
            if (rgb.width(), rgb.height()) != (s, s) {
                rgb = image::imageops::resize(&rgb, s, s, image::imageops::FilterType::Triangle);
            }
        }
        if let Some(c) = self.crop_after {
            rgb = centre_crop(rgb, c);
        }
        rgb
    }
}

/// The centre `side x side` square of `img` (the whole image where it is smaller).
fn centre_crop(img: image::RgbImage, side: usize) -> image::RgbImage {
    let s = side as u32;
    let (w, h) = (img.width(), img.height());
    let (cw, ch) = (s.min(w), s.min(h));
    if (cw, ch) == (w, h) {
        return img;
    }
    // As torchvision's CenterCrop: the offset rounds half to even of (size - crop) / 2.
    let off = |full: u32, c: u32| ((f64::from(full - c)) / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(&img, off(w, cw), off(h, ch), cw, ch).to_image()
}

/// How deep the images of a split folder lie.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Depth {
    /// `dir/*`
    Flat,
    /// `dir/*/*`
    Nested,
    /// Either, or both.
    Any,
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn sorted_children(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list the folder {}", dir.display()))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("cannot list the folder {}", dir.display()))?;
        let p = e.path();
        if !is_hidden(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn entry(path: PathBuf) -> Result<Entry> {
    let md = std::fs::metadata(&path)
        .with_context(|| format!("cannot read the metadata of {}", path.display()))?;
    let mtime_ns = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(Entry {
        path,
        size: md.len(),
        mtime_ns,
        listed: None,
    })
}

/// The files of the split folder `dir` (sorted), which must exist.
fn list_split(dir: &Path, depth: Depth, what: &str) -> Result<Vec<Entry>> {
    if !dir.is_dir() {
        bail!(
            "the {what} folder {} is missing: a DFA-layout dataset needs it (see `rest train \
             --help` for the layout; check --data, --dataset and --conflict-pct)",
            dir.display()
        );
    }
    let mut files = Vec::new();
    for p in sorted_children(dir)? {
        if p.is_dir() {
            if depth == Depth::Flat {
                bail!(
                    "{} is a folder, but the {what} images must lie directly in {} (is \
                     --dataset right?)",
                    p.display(),
                    dir.display()
                );
            }
            for q in sorted_children(&p)? {
                if q.is_dir() {
                    bail!(
                        "{} is a folder, but the {what} images must lie in {}/<class>/",
                        q.display(),
                        dir.display()
                    );
                }
                files.push(entry(q)?);
            }
        } else {
            if depth == Depth::Nested {
                bail!(
                    "{} lies directly in {}, but the {what} images must lie in class folders \
                     {}/<class>/ (is --dataset right?)",
                    p.display(),
                    dir.display(),
                    dir.display()
                );
            }
            files.push(entry(p)?);
        }
    }
    Ok(files)
}

/// The files of the three splits under `kind` (not `Auto`).
fn list_files(root: &Path, kind: DatasetKind, pct: f64) -> Result<[Vec<Entry>; 3]> {
    if !root.is_dir() {
        bail!(
            "--data {}: no such folder; give a dataset folder in the DFA layout",
            root.display()
        );
    }
    let pdir = root.join(pct_token(pct));
    if !pdir.is_dir() {
        let mut have: Vec<String> = sorted_children(root)?
            .iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .filter(|n| n.ends_with("pct"))
            .collect();
        have.sort();
        bail!(
            "{} is missing: --conflict-pct {pct} reads the training data from it; this dataset \
             has {}",
            pdir.display(),
            if have.is_empty() {
                "no <pct>pct folders (is --data the dataset root?)".to_string()
            } else {
                have.join(", ")
            }
        );
    }
    let mut train = list_split(&pdir.join("align"), Depth::Nested, "training (align)")?;
    train.extend(list_split(
        &pdir.join("conflict"),
        Depth::Nested,
        "training (conflict)",
    )?);
    let (valid_dir, valid_depth, test_depth) = match kind {
        DatasetKind::Cmnist => (pdir.join("valid"), Depth::Flat, Depth::Nested),
        DatasetKind::Cifar10c => (pdir.join("valid"), Depth::Nested, Depth::Nested),
        DatasetKind::Bffhq => (root.join("valid"), Depth::Flat, Depth::Flat),
        DatasetKind::Subpop
        | DatasetKind::Waterbirds
        | DatasetKind::Celeba
        | DatasetKind::Table => bail!(
            "--dataset {}: {} is described by a table, not the DFA folder layout",
            kind.as_str(),
            root.display()
        ),
        DatasetKind::Dfa | DatasetKind::Auto => {
            let v = if pdir.join("valid").is_dir() {
                pdir.join("valid")
            } else {
                root.join("valid")
            };
            (v, Depth::Any, Depth::Any)
        }
    };
    let valid = list_split(&valid_dir, valid_depth, "validation")?;
    let test = list_split(&root.join("test"), test_depth, "test")?;
    Ok([train, valid, test])
}

/// FNV-1a, 64 bit: a stable hash for the cache key (std's hasher may change between Rust
/// versions).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// The cache key of a load: every file's relative path, size and modification time, the
/// layout, `skip_bad` and the resize (`None` keys exactly as before resizing existed, so
/// older caches stay valid).
fn cache_key(
    root: &Path,
    kind: DatasetKind,
    skip_bad: bool,
    geometry: &LoadGeometry,
    splits: &[Vec<Entry>; 3],
) -> u64 {
    let mut h = Fnv::new();
    h.u64(u64::from(cache::VERSION));
    h.bytes(kind.as_str().as_bytes());
    h.u64(u64::from(skip_bad));
    if let Some(s) = geometry.resize {
        h.bytes(b"resize-bilinear");
        h.u64(s as u64);
    }
    // Crops (table layouts only) key after the resize, so that keys without them are as before.
    for (tag, c) in [
        (&b"crop-before"[..], geometry.crop_before),
        (b"crop-after", geometry.crop_after),
    ] {
        if let Some(c) = c {
            h.bytes(tag);
            h.u64(c as u64);
        }
    }
    for split in splits {
        h.u64(split.len() as u64);
        for e in split {
            let rel = e.path.strip_prefix(root).unwrap_or(&e.path);
            h.bytes(rel.to_string_lossy().as_bytes());
            h.u64(0xff);
            h.u64(e.size);
            h.bytes(&e.mtime_ns.to_le_bytes());
            if let Some((l, a, _)) = &e.listed {
                h.u64(u64::from(*l));
                h.u64(u64::from(*a));
            }
        }
    }
    h.0
}

/// What a build pass found: the class count, the files skipped and, per split, the image
/// size and the kept files with their labels and bias attributes (in file order, the order
/// of the cache's records).
struct Built {
    num_classes: usize,
    skipped: usize,
    /// `(width, height)` of every image.
    size: (u32, u32),
    splits: [Kept; 3],
}

#[derive(Default)]
struct Kept {
    paths: Vec<PathBuf>,
    labels: Vec<u32>,
    bias: Vec<u32>,
}

/// The RGB pixels of `path`, cropped and resized by `geometry`: `(width, height, bytes)`,
/// or the message naming the file.
fn decode_path(
    path: &Path,
    geometry: &LoadGeometry,
) -> std::result::Result<(u32, u32, Vec<u8>), String> {
    let img = image::open(path).map_err(|err| {
        format!(
            "{}: cannot decode the image ({err}); the file is corrupt or not a PNG/JPEG: \
             replace it, or pass --skip-bad to skip bad files",
            path.display()
        )
    })?;
    let rgb = geometry.apply(img.to_rgb8());
    Ok((rgb.width(), rgb.height(), rgb.into_raw()))
}

/// A bad file's message, prefixed with where a table listed it.
fn with_origin(e: &Entry, msg: String) -> String {
    match &e.listed {
        Some((_, _, origin)) => format!("{origin}: {msg}"),
        None => msg,
    }
}

/// Label, bias attribute and `(width, height)` after `geometry` of a file, from its name (or
/// its table's line) and its image header, or why it is bad. Reads no pixels.
fn probe_one(
    e: &Entry,
    geometry: &LoadGeometry,
) -> std::result::Result<(u32, u32, (u32, u32)), String> {
    probe_entry(e, geometry).map_err(|msg| with_origin(e, msg))
}

fn probe_entry(
    e: &Entry,
    geometry: &LoadGeometry,
) -> std::result::Result<(u32, u32, (u32, u32)), String> {
    let ext = e
        .path
        .extension()
        .and_then(|x| x.to_str())
        .map(str::to_lowercase)
        .unwrap_or_default();
    if !IMAGE_EXTS.contains(&ext.as_str()) {
        return Err(format!(
            "{}: not an image file (expected .png, .jpg or .jpeg)",
            e.path.display()
        ));
    }
    let (label, bias) = match &e.listed {
        Some((l, a, _)) => (*l, *a),
        None => parse_name(&e.path).map_err(|err| err.to_string())?,
    };
    let size = match geometry.fixed_size() {
        Some(s) => s,
        None => geometry.output_size(image::image_dimensions(&e.path).map_err(|err| {
            format!(
                "{}: cannot decode the image ({err}); the file is corrupt or not a PNG/JPEG: \
                 replace it, or pass --skip-bad to skip bad files",
                e.path.display()
            )
        })?),
    };
    Ok((label, bias, size))
}

/// Decoded images held per chunk while a cache file is built: about this many bytes.
const CHUNK_BYTES: usize = 32 << 20;

/// Decodes every file, a chunk at a time in parallel, handing each good image to `sink` (the
/// cache file being written) in file order; a failing sink is dropped with a warning and the
/// pass goes on (its result then serves the fallback, decoding on the fly). Bad files (name,
/// format, size) are errors, or skipped and counted under `skip_bad`. Returns what was kept
/// and whether every image reached the sink.
fn build(
    files: &[Vec<Entry>; 3],
    skip_bad: bool,
    geometry: &LoadGeometry,
    sink: &mut Option<cache::CacheWriter>,
) -> Result<Built> {
    // Pass 1, headers only: names, formats and sizes.
    let probed: Vec<Vec<_>> = files
        .iter()
        .map(|split| split.par_iter().map(|e| probe_one(e, geometry)).collect())
        .collect();
    let mut bad: Vec<String> = Vec::new();
    for p in probed.iter().flatten() {
        if let Err(msg) = p {
            if !skip_bad {
                bail!("{msg}");
            }
            bad.push(msg.clone());
        }
    }
    // The image size: that of the most frequent size (the first file's on a tie).
    let mut sizes: Vec<((u32, u32), usize)> = Vec::new();
    for s in probed
        .iter()
        .flatten()
        .filter_map(|p| p.as_ref().ok())
        .map(|p| p.2)
    {
        match sizes.iter_mut().find(|(k, _)| *k == s) {
            Some((_, c)) => *c += 1,
            None => sizes.push((s, 1)),
        }
    }
    let Some(&((w, h), _)) = sizes.iter().rev().max_by_key(|(_, c)| *c) else {
        bail!(
            "no readable images in the dataset folder{}",
            if bad.is_empty() {
                String::new()
            } else {
                format!(" ({} bad files skipped; first: {})", bad.len(), bad[0])
            }
        );
    };
    let first_of_size = files
        .iter()
        .zip(&probed)
        .flat_map(|(f, d)| f.iter().zip(d))
        .find(|(_, p)| matches!(p, Ok(p) if p.2 == (w, h)))
        .map(|(e, _)| e.path.display().to_string())
        .unwrap_or_default();
    let odd_size = |path: &Path, (iw, ih): (u32, u32)| {
        format!(
            "{} is {iw}x{ih} pixels but {first_of_size} (and most images) are {w}x{h}: \
             all images of a dataset must have one size: pass --image-size S to resize every \
             image to SxS on load, resize the file, or pass --skip-bad to skip it",
            path.display()
        )
    };
    // The files to decode, per split.
    let mut todo: Vec<Vec<(&Entry, u32, u32)>> = Vec::with_capacity(3);
    for (f, p) in files.iter().zip(&probed) {
        let mut keep = Vec::with_capacity(f.len());
        for (e, p) in f.iter().zip(p) {
            let Ok((l, b, size)) = p else { continue };
            if *size != (w, h) {
                let msg = odd_size(&e.path, *size);
                if !skip_bad {
                    bail!(msg);
                }
                bad.push(msg);
                continue;
            }
            keep.push((e, *l, *b));
        }
        todo.push(keep);
    }
    drop(probed);
    // Pass 2: the pixels, a chunk at a time.
    let record = w as usize * h as usize * 3;
    let chunk = (CHUNK_BYTES / record.max(1)).max(1);
    let mut splits: [Kept; 3] = Default::default();
    let mut num_classes = 0usize;
    for (keep, out) in todo.iter().zip(&mut splits) {
        if let Some(wr) = sink.as_mut() {
            if let Err(e) = wr.begin_split(h as usize, w as usize, 3) {
                sink_failed(sink, &e);
            }
        }
        for part in keep.chunks(chunk) {
            let pixels: Vec<_> = part
                .par_iter()
                .map(|(e, _, _)| decode_path(&e.path, geometry).map_err(|m| with_origin(e, m)))
                .collect();
            for (&(e, l, b), px) in part.iter().zip(pixels) {
                let px = match px {
                    Ok((iw, ih, _)) if (iw, ih) != (w, h) => Err(odd_size(&e.path, (iw, ih))),
                    Ok((_, _, px)) => Ok(px),
                    Err(msg) => Err(msg),
                };
                let px = match px {
                    Ok(px) => px,
                    Err(msg) if skip_bad => {
                        bad.push(msg);
                        continue;
                    }
                    Err(msg) => bail!(msg),
                };
                if let Some(wr) = sink.as_mut() {
                    if let Err(err) = wr.push(l, b, &px) {
                        sink_failed(sink, &err);
                    }
                }
                num_classes = num_classes.max(l as usize + 1);
                out.paths.push(e.path.clone());
                out.labels.push(l);
                out.bias.push(b);
            }
        }
    }
    if !bad.is_empty() {
        warn!(
            "--skip-bad: skipped {} bad file(s); first: {}",
            bad.len(),
            bad[0]
        );
    }
    Ok(Built {
        num_classes,
        skipped: bad.len(),
        size: (w, h),
        splits,
    })
}

/// Drops a cache file that cannot be written (its temporary file is deleted), with a warning.
fn sink_failed(sink: &mut Option<cache::CacheWriter>, err: &anyhow::Error) {
    warn!(
        "could not write the decoded-image cache ({err:#}): images will be decoded on the fly \
         for every batch, which is slower (set --cache-dir to a writable folder with room for \
         the cache)"
    );
    *sink = None;
}

/// The images of one split decoded from their files when a batch needs them (the fallback
/// when no cache file could be written).
struct FileImages {
    paths: Vec<PathBuf>,
    geometry: LoadGeometry,
    size: (u32, u32),
    root: PathBuf,
}

impl ImageSource for FileImages {
    fn len(&self) -> usize {
        self.paths.len()
    }

    fn decode_into(&self, i: usize, dst: &mut [u8]) -> Result<()> {
        let Some(path) = self.paths.get(i) else {
            bail!(
                "sample index {i} is outside the split of {} images",
                self.paths.len()
            );
        };
        let (w, h, px) = decode_path(path, &self.geometry).map_err(|m| anyhow::anyhow!(m))?;
        if (w, h) != self.size || px.len() != dst.len() {
            bail!(
                "{} is now {w}x{h} pixels, {}x{} when the dataset was loaded: the file changed \
                 during the run",
                path.display(),
                self.size.0,
                self.size.1
            );
        }
        dst.copy_from_slice(&px);
        Ok(())
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// The splits of `built`, decoded on the fly.
fn on_the_fly(built: Built, root: &Path, geometry: &LoadGeometry) -> Result<[Split; 3]> {
    let (w, h) = built.size;
    let record = w as usize * h as usize * 3;
    let mut out = Vec::with_capacity(3);
    for k in built.splits {
        let n = k.paths.len();
        let source = FileImages {
            paths: k.paths,
            geometry: *geometry,
            size: built.size,
            root: root.to_path_buf(),
        };
        debug_assert_eq!(source.len(), n);
        let images = Images::on_the_fly(Arc::new(source), record);
        out.push(Split::from_images(
            images, k.labels, k.bias, h as usize, w as usize, 3,
        )?);
    }
    out.try_into()
        .map_err(|_| anyhow::anyhow!("internal error: expected three splits"))
}

/// Loads a DFA-layout dataset folder at the images' own size, from the cache file when it
/// is current.
pub fn load(opts: &DfaOptions) -> Result<DfaLoad> {
    load_sized(opts, None)
}

/// The cache file name's prefix: layout, ratio and, when resized, the size (so the caches of
/// two sizes live side by side).
fn cache_prefix(kind: DatasetKind, pct: f64, image_size: Option<usize>) -> String {
    prefix_with(kind, &pct_token(pct), image_size)
}

fn prefix_with(kind: DatasetKind, tag: &str, image_size: Option<usize>) -> String {
    let size = image_size.map_or(String::new(), |s| format!("{s}px-"));
    format!("rest-cache-{}-{tag}-{size}", kind.as_str())
}

/// Splits loaded from listed files ([`load_listed`]).
#[derive(Debug, Clone)]
pub struct ListedLoad {
    /// Train, validation, test.
    pub splits: [Split; 3],
    /// One more than the largest label read.
    pub num_classes: usize,
    pub skipped: usize,
    pub from_cache: bool,
    pub cache_file: PathBuf,
    /// Bytes of the cache file mapped; `None` when the images are decoded on the fly.
    pub cache_bytes: Option<u64>,
}

/// Decodes the listed files of three splits (train, validation, test; `name`: the table's, for
/// the cache file's name) with `geometry`, through
/// the same parallel decoding, `skip_bad` handling and on-disk cache as DFA folders (the cache
/// file lies in `cache_dir`, default `root`, keyed by the files, their labels and attributes
/// and the geometry).
pub fn load_listed(
    root: &Path,
    kind: DatasetKind,
    name: &str,
    files: &[Vec<ListedFile>; 3],
    skip_bad: bool,
    cache_dir: Option<&Path>,
    geometry: &LoadGeometry,
) -> Result<ListedLoad> {
    let mut entries: [Vec<Entry>; 3] = Default::default();
    for (out, split) in entries.iter_mut().zip(files) {
        for f in split {
            let mut e = entry(f.path.clone()).with_context(|| f.origin.clone())?;
            e.listed = Some((f.label, f.attribute, f.origin.clone()));
            out.push(e);
        }
    }
    let cache_dir = cache_dir.unwrap_or(root);
    // The table's name keeps the caches of two tables of one folder apart.
    let mut tag: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    for (c, t) in [(geometry.crop_before, "c"), (geometry.crop_after, "k")] {
        if let Some(c) = c {
            tag.push_str(&format!("-{t}{c}"));
        }
    }
    let prefix = prefix_with(kind, &tag, geometry.resize);
    let (got, from_cache, cache_file) =
        load_entries(root, kind, &entries, skip_bad, cache_dir, &prefix, geometry)?;
    for (s, what) in got.splits.iter().zip(["training", "validation", "test"]) {
        if s.is_empty() {
            bail!(
                "no usable {what} images in {}: every file of that split was bad ({} skipped)",
                root.display(),
                got.skipped
            );
        }
    }
    let [train, ..] = &got.splits;
    info!(
        "{} {}: {} train, {} valid, {} test images of {}x{}{}",
        if from_cache { "cached" } else { "decoded" },
        root.display(),
        got.splits[0].len(),
        got.splits[1].len(),
        got.splits[2].len(),
        train.width,
        train.height,
        if got.skipped > 0 {
            format!(", {} bad files skipped", got.skipped)
        } else {
            String::new()
        }
    );
    Ok(ListedLoad {
        splits: got.splits,
        num_classes: got.num_classes,
        skipped: got.skipped,
        from_cache,
        cache_file,
        cache_bytes: got.cache_bytes,
    })
}

/// Loads a DFA-layout dataset folder with every image resized to `image_size x image_size`
/// (bilinear) when given, from the cache file when it is current.
pub fn load_sized(opts: &DfaOptions, image_size: Option<usize>) -> Result<DfaLoad> {
    if image_size == Some(0) {
        bail!("--image-size must be a positive number of pixels");
    }
    let pct = opts.conflict_pct;
    if !(pct.is_finite() && pct > 0.0 && pct < 100.0) {
        bail!("--conflict-pct must be a percentage in (0, 100) such as 0.5, 1, 2 or 5, got {pct}");
    }
    let kind = resolve_kind(&opts.root, opts.kind);
    let files = list_files(&opts.root, kind, pct)?;
    for (f, what) in files.iter().zip(["training", "validation", "test"]) {
        if f.is_empty() {
            bail!(
                "the {what} split of {} holds no files (at --conflict-pct {pct}): a dataset \
                 needs images in every split",
                opts.root.display()
            );
        }
    }
    let cache_dir = opts.cache_dir.as_deref().unwrap_or(&opts.root);
    let prefix = cache_prefix(kind, pct, image_size);
    let geometry = LoadGeometry::resize(image_size);
    let (got, from_cache, cache_file) = load_entries(
        &opts.root,
        kind,
        &files,
        opts.skip_bad,
        cache_dir,
        &prefix,
        &geometry,
    )?;
    let Loaded {
        num_classes,
        skipped,
        splits,
        cache_bytes,
    } = got;
    for (s, what) in splits.iter().zip(["training", "validation", "test"]) {
        if s.is_empty() {
            bail!(
                "no usable {what} images in {} at --conflict-pct {pct}: every file of that split \
                 was bad ({} skipped)",
                opts.root.display(),
                skipped
            );
        }
    }
    let base = opts
        .root
        .canonicalize()
        .unwrap_or_else(|_| opts.root.clone())
        .file_name()
        .map_or_else(
            || kind.as_str().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
    let [train, valid, test] = splits;
    info!(
        "{} {}: {} train, {} valid, {} test images of {}x{}{}",
        if from_cache { "cached" } else { "decoded" },
        opts.root.display(),
        train.len(),
        valid.len(),
        test.len(),
        train.width,
        train.height,
        if skipped > 0 {
            format!(", {skipped} bad files skipped")
        } else {
            String::new()
        }
    );
    Ok(DfaLoad {
        dataset: GroupDataset {
            name: format!("{base}-{}", pct_token(pct)),
            num_classes,
            train,
            valid,
            test,
        },
        kind,
        skipped,
        from_cache,
        cache_file,
        cache_bytes,
    })
}

/// The splits of `files` from their cache file in `cache_dir` (named by `prefix` and the
/// files' key) when it is current, else decoded into a new one (or on the fly where it cannot
/// be written). Returns them, whether the cache was reused, and the cache file.
fn load_entries(
    root: &Path,
    kind: DatasetKind,
    files: &[Vec<Entry>; 3],
    skip_bad: bool,
    cache_dir: &Path,
    prefix: &str,
    geometry: &LoadGeometry,
) -> Result<(Loaded, bool, PathBuf)> {
    let key = cache_key(root, kind, skip_bad, geometry, files);
    let cache_file = cache_dir.join(format!(".{prefix}{key:016x}.bin"));
    let (got, from_cache) = match cache::open(&cache_file, key) {
        Ok(c) => {
            info!(
                "image cache {} ({}): reused",
                cache_file.display(),
                cache::human_bytes(c.file_len)
            );
            let got = Loaded {
                num_classes: c.num_classes,
                skipped: c.skipped,
                splits: c.splits,
                cache_bytes: Some(c.file_len),
            };
            (got, true)
        }
        Err(why) => {
            if let cache::Invalid::Bad(reason) = &why {
                warn!(
                    "the image cache {} is not usable ({reason}): rebuilding it",
                    cache_file.display()
                );
            }
            let got = build_cache(root, skip_bad, files, geometry, &cache_file, prefix, key)?;
            (got, false)
        }
    };
    if from_cache && got.skipped > 0 {
        warn!(
            "--skip-bad: {} bad file(s) were skipped (when the cache {} was made)",
            got.skipped,
            cache_file.display()
        );
    }
    Ok((got, from_cache, cache_file))
}

/// The splits of a load and where they come from.
struct Loaded {
    num_classes: usize,
    skipped: usize,
    splits: [Split; 3],
    /// Bytes of the cache file mapped; `None` when decoding on the fly.
    cache_bytes: Option<u64>,
}

/// Decodes the folder into a new cache file and serves the splits from it; where the file
/// cannot be written, from the image files, decoded on the fly.
fn build_cache(
    root: &Path,
    skip_bad: bool,
    files: &[Vec<Entry>; 3],
    geometry: &LoadGeometry,
    cache_file: &Path,
    prefix: &str,
    key: u64,
) -> Result<Loaded> {
    let mut sink = match cache::CacheWriter::create(cache_file, key) {
        Ok(w) => Some(w),
        Err(e) => {
            sink_failed(&mut None, &e);
            None
        }
    };
    let built = build(files, skip_bad, geometry, &mut sink)?;
    let (num_classes, skipped) = (built.num_classes, built.skipped);
    if let Some(w) = sink {
        match w.finish(built.num_classes, built.skipped) {
            Ok(_) => match cache::open(cache_file, key) {
                Ok(c) => {
                    remove_other_caches(cache_file, prefix);
                    info!(
                        "image cache {} ({}): built",
                        cache_file.display(),
                        cache::human_bytes(c.file_len)
                    );
                    return Ok(Loaded {
                        num_classes,
                        skipped,
                        splits: c.splits,
                        cache_bytes: Some(c.file_len),
                    });
                }
                Err(why) => warn!(
                    "the image cache {} just written does not read back ({why:?}): images \
                     will be decoded on the fly for every batch, which is slower",
                    cache_file.display()
                ),
            },
            Err(e) => sink_failed(&mut None, &e),
        }
    }
    Ok(Loaded {
        num_classes,
        skipped,
        splits: on_the_fly(built, root, geometry)?,
        cache_bytes: None,
    })
}

/// Removes the older caches of the same dataset, ratio and size as `file` (its own
/// `.<prefix><16 hex digits>.bin` siblings; caches of other sizes have longer prefixes and
/// are kept). A run that still maps one keeps reading it: the file goes when it is unmapped.
fn remove_other_caches(file: &Path, prefix: &str) {
    let Some(dir) = file.parent() else { return };
    let keep = file.file_name().map(|n| n.to_os_string());
    if let Ok(old) = std::fs::read_dir(dir) {
        for e in old.flatten() {
            let name = e.file_name();
            let s = name.to_string_lossy();
            let own = s
                .strip_prefix(&format!(".{prefix}"))
                .and_then(|r| r.strip_suffix(".bin"))
                .is_some_and(|k| k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()));
            if own && Some(&name) != keep.as_ref() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_give_label_and_bias() -> Result<()> {
        assert_eq!(parse_name(Path::new("a/12_3_7.png"))?, (3, 7));
        assert_eq!(parse_name(Path::new("x_y_0_1.jpg"))?, (0, 1));
        assert_eq!(parse_name(Path::new("4_9.png"))?, (4, 9));
        for bad in ["a/7.png", "a/1_x_2.png", "a/1_2_b.png", "a/1_-2_3.png"] {
            let e = parse_name(Path::new(bad)).expect_err(bad).to_string();
            assert!(e.contains(bad) && e.contains("<label>_<bias>"), "{e}");
        }
        Ok(())
    }

    #[test]
    fn pct_tokens() {
        assert_eq!(pct_token(0.5), "0.5pct");
        assert_eq!(pct_token(1.0), "1pct");
        assert_eq!(pct_token(5.0), "5pct");
    }

    #[test]
    fn resize_is_part_of_the_cache_key_and_name() {
        let files: [Vec<Entry>; 3] = [
            vec![Entry {
                path: PathBuf::from("/d/1pct/align/0/1_0_0.png"),
                size: 10,
                mtime_ns: 5,
                listed: None,
            }],
            Vec::new(),
            Vec::new(),
        ];
        let root = Path::new("/d");
        let k = |s| {
            cache_key(
                root,
                DatasetKind::Bffhq,
                false,
                &LoadGeometry::resize(s),
                &files,
            )
        };
        assert_ne!(k(None), k(Some(128)));
        assert_ne!(k(Some(128)), k(Some(224)));
        assert_eq!(k(Some(128)), k(Some(128)));
        // Without a resize the key is computed exactly as before resizing existed.
        let mut h = Fnv::new();
        h.u64(u64::from(cache::VERSION));
        h.bytes(b"bffhq");
        h.u64(0);
        h.u64(1);
        h.bytes(b"1pct/align/0/1_0_0.png");
        h.u64(0xff);
        h.u64(10);
        h.bytes(&5u128.to_le_bytes());
        h.u64(0);
        h.u64(0);
        assert_eq!(k(None), h.0);
        assert_eq!(
            cache_prefix(DatasetKind::Bffhq, 1.0, None),
            "rest-cache-bffhq-1pct-"
        );
        assert_eq!(
            cache_prefix(DatasetKind::Bffhq, 0.5, Some(128)),
            "rest-cache-bffhq-0.5pct-128px-"
        );
    }

    #[test]
    fn fnv_matches_reference_values() {
        // FNV-1a 64 reference vectors.
        let mut h = Fnv::new();
        h.bytes(b"");
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv::new();
        h.bytes(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }
}
