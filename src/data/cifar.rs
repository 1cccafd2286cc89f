//! Reader of the CIFAR-10 binary release (`cifar-10-batches-bin`): `data_batch_1.bin` ..
//! `data_batch_5.bin` and `test_batch.bin`, each a sequence of 3,073-byte records (one label
//! byte, then the 1,024 red, 1,024 green and 1,024 blue bytes of a 32x32 image, rows top to
//! bottom). Images are returned as RGB NHWC bytes, the layout of the rest of `data`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Side of a CIFAR image.
pub const SIDE: usize = 32;
/// Pixels of one image.
pub const PIXELS: usize = SIDE * SIDE;
/// Bytes of one record: label + 3 colour planes.
pub const RECORD: usize = 1 + 3 * PIXELS;
/// Classes of CIFAR-10.
pub const CLASSES: usize = 10;
/// The training batch files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_FILE: &str = "test_batch.bin";

/// Decoded CIFAR images: `labels.len()` images of 32x32x3 RGB bytes (NHWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CifarImages {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl CifarImages {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i` as 32x32x3 RGB bytes.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * 3 * PIXELS..(i + 1) * 3 * PIXELS]
    }

    fn append(&mut self, other: CifarImages) {
        self.images.extend_from_slice(&other.images);
        self.labels.extend_from_slice(&other.labels);
    }
}

/// Decodes the records of one batch file; `name` names the file in errors.
pub fn parse_batch(bytes: &[u8], name: &Path) -> Result<CifarImages> {
    if bytes.is_empty() {
        bail!(
            "{} is empty: a CIFAR-10 batch holds records of {RECORD} bytes (re-download or \
             re-extract cifar-10-binary.tar.gz)",
            name.display()
        );
    }
    if !bytes.len().is_multiple_of(RECORD) {
        bail!(
            "{} has {} bytes, not a multiple of the {RECORD}-byte CIFAR-10 record ({} whole \
             records and {} bytes left over): the file is truncated or not a CIFAR-10 binary \
             batch (the Python-pickle release is not supported; use cifar-10-binary.tar.gz)",
            name.display(),
            bytes.len(),
            bytes.len() / RECORD,
            bytes.len() % RECORD
        );
    }
    let n = bytes.len() / RECORD;
    let mut out = CifarImages {
        images: vec![0u8; n * 3 * PIXELS],
        labels: Vec::with_capacity(n),
    };
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        let label = rec[0];
        if usize::from(label) >= CLASSES {
            bail!(
                "{}: record {i} has label {label}, but CIFAR-10 labels are 0-9 (is this a \
                 CIFAR-100 file? it has a different record layout)",
                name.display()
            );
        }
        out.labels.push(label);
        let dst = &mut out.images[i * 3 * PIXELS..(i + 1) * 3 * PIXELS];
        for p in 0..PIXELS {
            for c in 0..3 {
                dst[p * 3 + c] = rec[1 + c * PIXELS + p];
            }
        }
    }
    Ok(out)
}

/// Reads one batch file.
pub fn read_batch(path: &Path) -> Result<CifarImages> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_batch(&bytes, path)
}

/// Encodes images (32x32x3 RGB NHWC) and labels as a CIFAR-10 binary batch (for fixtures and
/// for exporting).
pub fn encode_batch(images: &[u8], labels: &[u8]) -> Result<Vec<u8>> {
    if images.len() != labels.len() * 3 * PIXELS {
        bail!(
            "{} image bytes for {} labels: expected {} (32x32x3 per image)",
            images.len(),
            labels.len(),
            labels.len() * 3 * PIXELS
        );
    }
    let mut out = Vec::with_capacity(labels.len() * RECORD);
    for (i, &l) in labels.iter().enumerate() {
        out.push(l);
        let img = &images[i * 3 * PIXELS..(i + 1) * 3 * PIXELS];
        for c in 0..3 {
            out.extend((0..PIXELS).map(|p| img[p * 3 + c]));
        }
    }
    Ok(out)
}

/// The folder holding the batch files: `dir` itself or its `cifar-10-batches-bin/` (what the
/// release archive extracts to).
fn batch_dir(dir: &Path) -> Result<PathBuf> {
    for cand in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        if cand.join(TEST_FILE).is_file() || cand.join(TRAIN_FILES[0]).is_file() {
            return Ok(cand);
        }
    }
    if !dir.is_dir() {
        bail!(
            "--source {} is not a folder: give the folder with the CIFAR-10 binary batches \
             (data_batch_1.bin .. data_batch_5.bin, test_batch.bin)",
            dir.display()
        );
    }
    Ok(dir.to_path_buf())
}

/// Reads the training batches (all five, concatenated) and the test batch from `dir` (or
/// `dir/cifar-10-batches-bin`). A missing file is an error naming it.
pub fn read_cifar10(dir: &Path) -> Result<(CifarImages, CifarImages)> {
    let bdir = batch_dir(dir)?;
    let missing: Vec<&str> = TRAIN_FILES
        .iter()
        .copied()
        .chain([TEST_FILE])
        .filter(|f| !bdir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "--source {}: missing {} (a CIFAR-10 binary folder holds data_batch_1.bin .. \
             data_batch_5.bin and test_batch.bin, from cifar-10-binary.tar.gz)",
            bdir.display(),
            missing.join(", ")
        );
    }
    let mut train = CifarImages {
        images: Vec::new(),
        labels: Vec::new(),
    };
    for f in TRAIN_FILES {
        train.append(read_batch(&bdir.join(f))?);
    }
    let test = read_batch(&bdir.join(TEST_FILE))?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_become_interleaved_rgb() {
        let mut rec = vec![0u8; RECORD];
        rec[0] = 7;
        // Pixel 5: R = 10, G = 20, B = 30.
        rec[1 + 5] = 10;
        rec[1 + PIXELS + 5] = 20;
        rec[1 + 2 * PIXELS + 5] = 30;
        let b = parse_batch(&rec, Path::new("x.bin")).unwrap();
        assert_eq!(b.labels, vec![7]);
        assert_eq!(&b.image(0)[15..18], &[10, 20, 30]);
        assert_eq!(b.images.iter().map(|&v| v as u32).sum::<u32>(), 60);
        assert_eq!(encode_batch(&b.images, &b.labels).unwrap(), rec);
    }
}
