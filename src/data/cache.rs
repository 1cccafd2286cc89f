//! The decoded-image cache file of a dataset folder: its format, the [`CacheWriter`] that
//! writes it record by record while images are decoded (so no more than a chunk of images is
//! ever in RAM) into a temporary file renamed into place when complete, and [`open`], which
//! checks a file and serves its splits from a read-only memory map, shared by every process
//! that maps it (sweep jobs, `rest eval`, `rest data export`).
//!
//! Layout (little-endian; offsets from the start of the file):
//!
//! ```text
//! 0    header (HEADER_LEN bytes): magic, version, key, classes, skipped files, file length,
//!      per split (train, valid, test) count, height, width, channels, offset of its image
//!      records, offset of its labels; checksum of the labels and bias attributes; checksum
//!      of the header
//!      per split, at a 4096-byte boundary: count x (height x width x channels) u8 records (NHWC)
//!      per split: count x u32 labels, then count x u32 bias attributes
//! ```
//!
//! A file whose header, length, key, checksums or labels do not check out is reported as
//! [`Invalid`] (with the reason) and rebuilt by the caller; no offset is used before it is
//! checked against the file's length.

use super::images::Images;
use super::Split;
use crate::util;
use anyhow::{Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Version of the file format; bump on any change of the layout.
pub const VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"RESTIMG\0";
/// Bytes of the header (the rest of it is zero).
const HEADER_LEN: u64 = 4096;
/// Image records start at multiples of this (a page).
const ALIGN: u64 = 4096;
/// Labels at or above this are taken for corruption.
const MAX_CLASSES: u64 = 100_000;

/// FNV-1a, 64 bit.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The shape and place of one split in the file.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct SplitHeader {
    n: u64,
    h: u64,
    w: u64,
    c: u64,
    images_at: u64,
    labels_at: u64,
}

/// Why a cache file is not used.
#[derive(Debug, Clone, PartialEq)]
pub enum Invalid {
    /// No file (the first run).
    Missing,
    /// A file that is not a valid cache for this key; the reason.
    Bad(String),
}

/// A cache file's splits, served from its memory map.
#[derive(Debug, Clone)]
pub struct Cached {
    pub num_classes: usize,
    /// Files skipped (`--skip-bad`) when the cache was built.
    pub skipped: usize,
    pub splits: [Split; 3],
    /// Bytes of the file.
    pub file_len: u64,
}

/// Writes a cache file: [`CacheWriter::begin_split`] before each split's records,
/// [`CacheWriter::push`] per image, [`CacheWriter::finish`] renames the complete file into
/// place. Dropping it unfinished deletes the temporary file.
pub struct CacheWriter {
    path: PathBuf,
    key: u64,
    out: BufWriter<File>,
    tmp: tempfile::TempPath,
    pos: u64,
    splits: Vec<SplitHeader>,
    labels: Vec<Vec<u32>>,
    bias: Vec<Vec<u32>>,
}

impl CacheWriter {
    /// Starts the cache file `path` for `key` (a temporary file in its folder, created if
    /// needed).
    pub fn create(path: &Path, key: u64) -> Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
        let tmp = util::temp_file_in(dir, ".bin")?;
        let (file, tmp) = tmp.into_parts();
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN as usize])
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            key,
            out,
            tmp,
            pos: HEADER_LEN,
            splits: Vec::new(),
            labels: Vec::new(),
            bias: Vec::new(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .with_context(|| format!("cannot write the cache file {}", self.tmp.display()))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, align: u64) -> Result<()> {
        let pad = self.pos.next_multiple_of(align) - self.pos;
        self.write(&vec![0u8; pad as usize])
    }

    /// Starts the next split (at most three), of images `height x width x channels`.
    pub fn begin_split(&mut self, height: usize, width: usize, channels: usize) -> Result<()> {
        if self.splits.len() == 3 {
            anyhow::bail!("internal error: a cache file holds three splits");
        }
        self.pad_to(ALIGN)?;
        self.splits.push(SplitHeader {
            n: 0,
            h: height as u64,
            w: width as u64,
            c: channels as u64,
            images_at: self.pos,
            labels_at: 0,
        });
        self.labels.push(Vec::new());
        self.bias.push(Vec::new());
        Ok(())
    }

    /// Appends one image of the current split (its record size exactly).
    pub fn push(&mut self, label: u32, bias: u32, pixels: &[u8]) -> Result<()> {
        let Some(s) = self.splits.last_mut() else {
            anyhow::bail!("internal error: an image before the first split");
        };
        if pixels.len() as u64 != s.h * s.w * s.c {
            anyhow::bail!(
                "internal error: an image of {} bytes in a split of {}x{}x{} records",
                pixels.len(),
                s.h,
                s.w,
                s.c
            );
        }
        s.n += 1;
        let i = self.splits.len() - 1;
        self.labels[i].push(label);
        self.bias[i].push(bias);
        self.write(pixels)
    }

    /// Writes the labels and the header, syncs the file and renames it to its path.
    pub fn finish(mut self, num_classes: usize, skipped: usize) -> Result<PathBuf> {
        if self.splits.len() != 3 {
            anyhow::bail!("internal error: a cache file holds three splits");
        }
        let mut meta_sum = FNV_START;
        for i in 0..3 {
            self.splits[i].labels_at = self.pos;
            let mut bytes = Vec::with_capacity(self.labels[i].len() * 8);
            for &v in self.labels[i].iter().chain(&self.bias[i]) {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            meta_sum = fnv(meta_sum, &bytes);
            self.write(&bytes)?;
        }
        let header = encode_header(&Header {
            key: self.key,
            num_classes: num_classes as u64,
            skipped: skipped as u64,
            file_len: self.pos,
            splits: [self.splits[0], self.splits[1], self.splits[2]],
            meta_sum,
        });
        let ctx = || format!("cannot write the cache file {}", self.tmp.display());
        self.out.flush().with_context(ctx)?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(0)).with_context(ctx)?;
        file.write_all(&header).with_context(ctx)?;
        file.sync_all().with_context(ctx)?;
        self.tmp
            .persist(&self.path)
            .map_err(|e| e.error)
            .with_context(|| {
                format!(
                    "cannot move the finished cache file to {}",
                    self.path.display()
                )
            })?;
        Ok(self.path)
    }
}

struct Header {
    key: u64,
    num_classes: u64,
    skipped: u64,
    file_len: u64,
    splits: [SplitHeader; 3],
    meta_sum: u64,
}

/// Bytes of the header's fields, before the header checksum.
const FIELDS_LEN: usize = 8 + 4 + 4 + 4 * 8 + 3 * 6 * 8 + 8;

fn encode_header(h: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in [h.key, h.num_classes, h.skipped, h.file_len] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for s in &h.splits {
        for v in [s.n, s.h, s.w, s.c, s.images_at, s.labels_at] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out.extend_from_slice(&h.meta_sum.to_le_bytes());
    debug_assert_eq!(out.len(), FIELDS_LEN);
    let sum = fnv(FNV_START, &out);
    out.extend_from_slice(&sum.to_le_bytes());
    out.resize(HEADER_LEN as usize, 0);
    out
}

fn decode_header(b: &[u8]) -> std::result::Result<Header, String> {
    if b.len() < HEADER_LEN as usize {
        return Err(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            b.len()
        ));
    }
    if &b[..8] != MAGIC {
        return Err("not a rest image cache (wrong magic bytes)".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let version = u32_at(8);
    if version != VERSION {
        return Err(format!(
            "format version {version}, this rest reads {VERSION}"
        ));
    }
    if u64_at(FIELDS_LEN) != fnv(FNV_START, &b[..FIELDS_LEN]) {
        return Err("header checksum mismatch (corrupt header)".into());
    }
    let mut splits = [SplitHeader::default(); 3];
    for (i, s) in splits.iter_mut().enumerate() {
        let o = 48 + i * 48;
        *s = SplitHeader {
            n: u64_at(o),
            h: u64_at(o + 8),
            w: u64_at(o + 16),
            c: u64_at(o + 24),
            images_at: u64_at(o + 32),
            labels_at: u64_at(o + 40),
        };
    }
    Ok(Header {
        key: u64_at(16),
        num_classes: u64_at(24),
        skipped: u64_at(32),
        file_len: u64_at(40),
        splits,
        meta_sum: u64_at(48 + 3 * 48),
    })
}

/// Checks the header's regions against each other and the file's length: each split's
/// records, then the labels in order, ending exactly at the end of the file. Returns each
/// split's record size.
fn check_layout(h: &Header, len: u64) -> std::result::Result<[u64; 3], String> {
    if h.file_len != len {
        return Err(format!(
            "{len} bytes where the header says {} (truncated or extended)",
            h.file_len
        ));
    }
    if h.num_classes == 0 || h.num_classes > MAX_CLASSES {
        return Err(format!("{} classes in the header", h.num_classes));
    }
    let bad = |what: &str| Err(format!("corrupt header: {what}"));
    let mut at = HEADER_LEN;
    let mut records = [0u64; 3];
    for (s, rec) in h.splits.iter().zip(&mut records) {
        if s.h == 0 || s.w == 0 || s.c == 0 || s.c > 4 {
            return bad("image shape");
        }
        let Some(r) = s.h.checked_mul(s.w).and_then(|v| v.checked_mul(s.c)) else {
            return bad("image shape");
        };
        *rec = r;
        let end = r.checked_mul(s.n).and_then(|v| v.checked_add(s.images_at));
        if s.images_at < at || s.images_at % ALIGN != 0 {
            return bad("image offsets");
        }
        match end {
            Some(e) if e <= len => at = e,
            _ => return bad("image records past the end of the file"),
        }
    }
    for s in &h.splits {
        let end = s.n.checked_mul(8).and_then(|v| v.checked_add(s.labels_at));
        if s.labels_at != at {
            return bad("label offsets");
        }
        match end {
            Some(e) if e <= len => at = e,
            _ => return bad("labels past the end of the file"),
        }
    }
    if at != len {
        return bad("trailing bytes");
    }
    Ok(records)
}

/// Opens the cache file `path` for `key` and serves its splits from a read-only memory map;
/// [`Invalid`] when there is no file or it is not a valid, complete cache for `key`.
pub fn open(path: &Path, key: u64) -> std::result::Result<Cached, Invalid> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Invalid::Missing),
        Err(e) => return Err(Invalid::Bad(format!("cannot open it ({e})"))),
    };
    let len = file
        .metadata()
        .map_err(|e| Invalid::Bad(format!("cannot read its metadata ({e})")))?
        .len();
    if len < HEADER_LEN {
        return Err(Invalid::Bad(format!(
            "{len} bytes, shorter than the {HEADER_LEN}-byte header (truncated)"
        )));
    }
    // SAFETY: the map is read-only and rest never changes a cache file in place: files are
    // written under a temporary name and renamed over the old one, which leaves existing maps
    // on the old file intact. Only a file truncated by hand while a run maps it can fault.
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| Invalid::Bad(format!("cannot map it into memory ({e})")))?;
    let map = Arc::new(map);
    if map.len() as u64 != len {
        return Err(Invalid::Bad(
            "its length changed while it was opened".into(),
        ));
    }
    let h = decode_header(&map).map_err(Invalid::Bad)?;
    if h.key != key {
        return Err(Invalid::Bad(format!(
            "it was built for other files (key {:016x}, expected {key:016x})",
            h.key
        )));
    }
    let records = check_layout(&h, len).map_err(Invalid::Bad)?;
    let meta_start = h.splits[0].labels_at as usize;
    if fnv(FNV_START, &map[meta_start..]) != h.meta_sum {
        return Err(Invalid::Bad(
            "checksum mismatch of the labels and bias attributes (corrupt file)".into(),
        ));
    }
    let read_u32s = |at: u64, n: u64| -> Vec<u32> {
        map[at as usize..(at + 4 * n) as usize]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut splits = Vec::with_capacity(3);
    for (s, &rec) in h.splits.iter().zip(&records) {
        let labels = read_u32s(s.labels_at, s.n);
        let bias = read_u32s(s.labels_at + 4 * s.n, s.n);
        if let Some(l) = labels.iter().find(|&&l| u64::from(l) >= h.num_classes) {
            return Err(Invalid::Bad(format!(
                "label {l} of a {}-class dataset (corrupt file)",
                h.num_classes
            )));
        }
        let images = Images::mapped(map.clone(), s.images_at as usize, (rec * s.n) as usize)
            .map_err(|e| Invalid::Bad(e.to_string()))?;
        let split = Split::from_images(
            images,
            labels,
            bias,
            s.h as usize,
            s.w as usize,
            s.c as usize,
        )
        .map_err(|e| Invalid::Bad(e.to_string()))?;
        splits.push(split);
    }
    advise(&map);
    let [train, valid, test]: [Split; 3] = splits
        .try_into()
        .map_err(|_| Invalid::Bad("internal error: expected three splits".into()))?;
    Ok(Cached {
        num_classes: h.num_classes as usize,
        skipped: h.skipped as usize,
        splits: [train, valid, test],
        file_len: len,
    })
}

/// Files up to this size are read ahead as a whole when mapped (`MADV_WILLNEED`); larger ones
/// are marked for random access (`MADV_RANDOM`), so the sampler's random order does not read
/// ahead pages no batch asked for.
const READ_AHEAD_MAX: usize = 1 << 30;

fn advise(map: &Mmap) {
    #[cfg(unix)]
    {
        let advice = if map.len() <= READ_AHEAD_MAX {
            memmap2::Advice::WillNeed
        } else {
            memmap2::Advice::Random
        };
        // Advice only changes speed; a kernel that refuses it changes nothing else.
        let _ = map.advise(advice);
    }
    #[cfg(not(unix))]
    let _ = map;
}

/// Size in bytes, for logs: `165.2 MB`.
pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, key: u64, splits: &[(usize, u8)]) -> Result<()> {
        let mut w = CacheWriter::create(path, key)?;
        for &(n, v) in splits {
            w.begin_split(2, 3, 3)?;
            for i in 0..n {
                w.push((i % 4) as u32, 1, &[v.wrapping_add(i as u8); 18])?;
            }
        }
        w.finish(4, 2)?;
        Ok(())
    }

    #[test]
    fn round_trip_and_every_damage_is_invalid() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("c.bin");
        write(&p, 42, &[(3, 7), (1, 9), (2, 200)])?;
        let c = open(&p, 42).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!((c.num_classes, c.skipped), (4, 2));
        let t = &c.splits[0];
        assert_eq!((t.len(), t.height, t.width, t.channels), (3, 2, 3, 3));
        assert_eq!(t.labels, vec![0, 1, 2]);
        assert_eq!(t.bias, vec![1, 1, 1]);
        assert_eq!(t.images.kind(), "mapped");
        assert_eq!(&t.images.bytes()?[18..36], &[8u8; 18][..]);
        assert_eq!(c.splits[2].images.bytes()?[18], 201);
        assert!(matches!(open(&p, 43), Err(Invalid::Bad(m)) if m.contains("other files")));
        assert_eq!(
            open(&dir.path().join("none"), 42).err(),
            Some(Invalid::Missing)
        );
        let good = std::fs::read(&p)?;
        let bad = |bytes: &[u8], want: &str| -> Result<()> {
            std::fs::write(&p, bytes)?;
            match open(&p, 42) {
                Err(Invalid::Bad(m)) => assert!(m.contains(want), "{want}: {m}"),
                other => panic!("{want}: {other:?}"),
            }
            Ok(())
        };
        bad(&good[..good.len() - 1], "truncated")?;
        bad(&good[..100], "truncated")?;
        bad(&[good.as_slice(), &[0]].concat(), "extended")?;
        let mut b = good.clone();
        b[50] ^= 1; // a split count
        bad(&b, "header checksum")?;
        let mut b = good.clone();
        b[0] = b'X';
        bad(&b, "magic")?;
        let mut b = good.clone();
        b[8] = 1;
        bad(&b, "version")?;
        let mut b = good.clone();
        let at = good.len() - 3 * 8 - 2; // a label byte
        b[at] ^= 0x40;
        bad(&b, "checksum mismatch of the labels")?;
        Ok(())
    }
}
