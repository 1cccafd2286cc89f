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
//! 128-pixel pipeline), and the decoded splits are cached in one versioned binary file keyed
//! by the file list, sizes, modification times and the resize, so later runs skip decoding.
//!
//! The decoding, resizing and caching are shared with datasets described by a table
//! (`data::table`), which hand over their files with labels and attributes
//! ([`load_listed`]).

use super::DatasetKind;
use super::{GroupDataset, Split};
use crate::util;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// Version of the cache file format; bump on any change of the layout below.
const CACHE_VERSION: u32 = 1;
const CACHE_MAGIC: &[u8; 8] = b"RESTDFA\0";
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
    h.u64(u64::from(CACHE_VERSION));
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

/// Splits and class count as stored in the cache.
#[derive(Debug, Clone, PartialEq)]
struct Decoded {
    num_classes: usize,
    skipped: usize,
    splits: [Split; 3],
}

fn encode_cache(key: u64, d: &Decoded) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&CACHE_VERSION.to_le_bytes());
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(d.num_classes as u64).to_le_bytes());
    out.extend_from_slice(&(d.skipped as u64).to_le_bytes());
    for s in &d.splits {
        for v in [s.len(), s.height, s.width, s.channels] {
            out.extend_from_slice(&(v as u64).to_le_bytes());
        }
        for &l in s.labels.iter().chain(&s.bias) {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&s.images);
    }
    out
}

/// Parses a cache file; `None` when it is not a valid cache for `key`.
fn decode_cache(bytes: &[u8], key: u64) -> Option<Decoded> {
    struct Rd<'a>(&'a [u8]);
    impl<'a> Rd<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
        fn usize(&mut self) -> Option<usize> {
            usize::try_from(self.u64()?).ok()
        }
    }
    let mut r = Rd(bytes);
    if r.take(8)? != CACHE_MAGIC || r.u32()? != CACHE_VERSION || r.u64()? != key {
        return None;
    }
    let num_classes = r.usize()?;
    let skipped = r.usize()?;
    let mut read_split = || -> Option<Split> {
        let (n, h, w, c) = (r.usize()?, r.usize()?, r.usize()?, r.usize()?);
        let mut labels = Vec::with_capacity(n.min(bytes.len()));
        for _ in 0..n {
            labels.push(r.u32()?);
        }
        let mut bias = Vec::with_capacity(n.min(bytes.len()));
        for _ in 0..n {
            bias.push(r.u32()?);
        }
        let sz = n.checked_mul(h)?.checked_mul(w)?.checked_mul(c)?;
        let images = r.take(sz)?.to_vec();
        Split::new(images, labels, bias, h, w, c).ok()
    };
    let splits = [read_split()?, read_split()?, read_split()?];
    if !r.0.is_empty() {
        return None;
    }
    Some(Decoded {
        num_classes,
        skipped,
        splits,
    })
}

/// One decoded file, or why it is bad.
type Sample = std::result::Result<(u32, u32, u32, u32, Vec<u8>), String>;

fn decode_one(e: &Entry, geometry: &LoadGeometry) -> Sample {
    decode_entry(e, geometry).map_err(|msg| match &e.listed {
        Some((_, _, origin)) => format!("{origin}: {msg}"),
        None => msg,
    })
}

fn decode_entry(e: &Entry, geometry: &LoadGeometry) -> Sample {
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
    let img = image::open(&e.path).map_err(|err| {
        format!(
            "{}: cannot decode the image ({err}); the file is corrupt or not a PNG/JPEG: \
             replace it, or pass --skip-bad to skip bad files",
            e.path.display()
        )
    })?;
    let rgb = geometry.apply(img.to_rgb8());
    Ok((label, bias, rgb.width(), rgb.height(), rgb.into_raw()))
}

/// Decodes every file (in parallel) and assembles the splits.
fn decode_all(files: &[Vec<Entry>; 3], skip_bad: bool, geometry: &LoadGeometry) -> Result<Decoded> {
    let decoded: Vec<Vec<Sample>> = files
        .iter()
        .map(|split| split.par_iter().map(|e| decode_one(e, geometry)).collect())
        .collect();
    let mut bad: Vec<String> = Vec::new();
    for s in decoded.iter().flatten() {
        if let Err(msg) = s {
            if !skip_bad {
                bail!("{msg}");
            }
            bad.push(msg.clone());
        }
    }
    // The image size: that of the most frequent size (the first file's on a tie).
    let mut sizes: Vec<((u32, u32), usize)> = Vec::new();
    for (w, h) in decoded
        .iter()
        .flatten()
        .filter_map(|s| s.as_ref().ok())
        .map(|s| (s.2, s.3))
    {
        match sizes.iter_mut().find(|(k, _)| *k == (w, h)) {
            Some((_, c)) => *c += 1,
            None => sizes.push(((w, h), 1)),
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
        .zip(&decoded)
        .flat_map(|(f, d)| f.iter().zip(d))
        .find(|(_, s)| matches!(s, Ok(s) if (s.2, s.3) == (w, h)))
        .map(|(e, _)| e.path.display().to_string())
        .unwrap_or_default();
    let mut splits = Vec::with_capacity(3);
    let mut num_classes = 0usize;
    for (f, d) in files.iter().zip(decoded) {
        let (mut images, mut labels, mut bias) = (Vec::new(), Vec::new(), Vec::new());
        for (e, s) in f.iter().zip(d) {
            let Ok((l, b, iw, ih, px)) = s else { continue };
            if (iw, ih) != (w, h) {
                let msg = format!(
                    "{} is {iw}x{ih} pixels but {first_of_size} (and most images) are {w}x{h}: \
                     all images of a dataset must have one size: pass --image-size S to resize every \
                     image to SxS on load, resize the file, or pass --skip-bad to skip it",
                    e.path.display()
                );
                if !skip_bad {
                    bail!(msg);
                }
                bad.push(msg);
                continue;
            }
            num_classes = num_classes.max(l as usize + 1);
            images.extend_from_slice(&px);
            labels.push(l);
            bias.push(b);
        }
        splits.push(Split::new(images, labels, bias, h as usize, w as usize, 3)?);
    }
    if !bad.is_empty() {
        warn!(
            "--skip-bad: skipped {} bad file(s); first: {}",
            bad.len(),
            bad[0]
        );
    }
    let [train, valid, test]: [Split; 3] = splits
        .try_into()
        .map_err(|_| anyhow::anyhow!("internal error: expected three splits"))?;
    Ok(Decoded {
        num_classes,
        skipped: bad.len(),
        splits: [train, valid, test],
    })
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

/// Decoded splits from the cache file when it is current, else decoded (and cached).
struct Cached {
    decoded: Decoded,
    from_cache: bool,
    cache_file: PathBuf,
}

/// Decodes `files` with `geometry`, or reads them from the cache file in `cache_dir` named by
/// `prefix` and the files' key.
fn decode_cached(
    root: &Path,
    kind: DatasetKind,
    files: &[Vec<Entry>; 3],
    skip_bad: bool,
    cache_dir: &Path,
    prefix: &str,
    geometry: &LoadGeometry,
) -> Result<Cached> {
    let key = cache_key(root, kind, skip_bad, geometry, files);
    let cache_file = cache_dir.join(format!(".{prefix}{key:016x}.bin"));
    let cached = std::fs::read(&cache_file)
        .ok()
        .and_then(|b| decode_cache(&b, key));
    let from_cache = cached.is_some();
    let decoded = match cached {
        Some(d) => d,
        None => {
            let d = decode_all(files, skip_bad, geometry)?;
            store_cache(cache_dir, prefix, &cache_file, key, &d);
            d
        }
    };
    if from_cache && decoded.skipped > 0 {
        warn!(
            "--skip-bad: {} bad file(s) were skipped (when the cache {} was made)",
            decoded.skipped,
            cache_file.display()
        );
    }
    Ok(Cached {
        decoded,
        from_cache,
        cache_file,
    })
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
    let c = decode_cached(root, kind, &entries, skip_bad, cache_dir, &prefix, geometry)?;
    for (s, what) in c
        .decoded
        .splits
        .iter()
        .zip(["training", "validation", "test"])
    {
        if s.is_empty() {
            bail!(
                "no usable {what} images in {}: every file of that split was bad ({} skipped)",
                root.display(),
                c.decoded.skipped
            );
        }
    }
    let d = c.decoded;
    info!(
        "{} {}: {} train, {} valid, {} test images of {}x{}{}",
        if c.from_cache { "cached" } else { "decoded" },
        root.display(),
        d.splits[0].len(),
        d.splits[1].len(),
        d.splits[2].len(),
        d.splits[0].width,
        d.splits[0].height,
        if d.skipped > 0 {
            format!(", {} bad files skipped", d.skipped)
        } else {
            String::new()
        }
    );
    Ok(ListedLoad {
        splits: d.splits,
        num_classes: d.num_classes,
        skipped: d.skipped,
        from_cache: c.from_cache,
        cache_file: c.cache_file,
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
    let Cached {
        decoded,
        from_cache,
        cache_file,
    } = decode_cached(
        &opts.root,
        kind,
        &files,
        opts.skip_bad,
        cache_dir,
        &prefix,
        &LoadGeometry::resize(image_size),
    )?;
    for (s, what) in decoded
        .splits
        .iter()
        .zip(["training", "validation", "test"])
    {
        if s.is_empty() {
            bail!(
                "no usable {what} images in {} at --conflict-pct {pct}: every file of that split \
                 was bad ({} skipped)",
                opts.root.display(),
                decoded.skipped
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
    let [train, valid, test] = decoded.splits;
    info!(
        "{} {}: {} train, {} valid, {} test images of {}x{}{}",
        if from_cache { "cached" } else { "decoded" },
        opts.root.display(),
        train.len(),
        valid.len(),
        test.len(),
        train.width,
        train.height,
        if decoded.skipped > 0 {
            format!(", {} bad files skipped", decoded.skipped)
        } else {
            String::new()
        }
    );
    Ok(DfaLoad {
        dataset: GroupDataset {
            name: format!("{base}-{}", pct_token(pct)),
            num_classes: decoded.num_classes,
            train,
            valid,
            test,
        },
        kind,
        skipped: decoded.skipped,
        from_cache,
        cache_file,
    })
}

/// Writes the cache (atomically) and removes older caches of the same dataset and ratio. A
/// failure only costs decoding time next run, so it is a warning.
fn store_cache(dir: &Path, prefix: &str, file: &Path, key: u64, d: &Decoded) {
    let res = std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the cache folder {}", dir.display()))
        .and_then(|()| util::write_atomic(file, &encode_cache(key, d)));
    match res {
        Ok(()) => {
            let keep = file.file_name().map(|n| n.to_os_string());
            if let Ok(old) = std::fs::read_dir(dir) {
                for e in old.flatten() {
                    let name = e.file_name();
                    let s = name.to_string_lossy();
                    // Only this prefix's own key files: `.<prefix><16 hex digits>.bin` (the
                    // caches of other sizes have longer prefixes and are kept).
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
        Err(e) => warn!(
            "could not write the decoded-image cache ({e:#}); the next run decodes again \
             (set --cache-dir to a writable folder)"
        ),
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
    fn cache_round_trips_and_rejects_other_keys_and_truncation() -> Result<()> {
        let s =
            |n: usize, v: u8| Split::new(vec![v; n * 2 * 3 * 3], vec![1; n], vec![0; n], 2, 3, 3);
        let d = Decoded {
            num_classes: 4,
            skipped: 2,
            splits: [s(3, 7)?, s(1, 9)?, s(2, 200)?],
        };
        let bytes = encode_cache(42, &d);
        assert_eq!(decode_cache(&bytes, 42), Some(d));
        assert_eq!(decode_cache(&bytes, 43), None);
        assert_eq!(decode_cache(&bytes[..bytes.len() - 1], 42), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_cache(&longer, 42), None);
        Ok(())
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
        h.u64(u64::from(CACHE_VERSION));
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
