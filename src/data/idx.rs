//! Reader for the IDX format of the MNIST files: `u8` images `[n, rows, cols]` (magic
//! `0x00000803`) and `u8` labels `[n]` (magic `0x00000801`), plain or gzipped (detected by the
//! gzip magic bytes `1f 8b`). Malformed input is reported as an error naming its source.

use anyhow::{bail, Context, Result};
use flate2::read::MultiGzDecoder;
use std::borrow::Cow;
use std::io::Read;
use std::path::Path;

/// Magic number of an IDX file holding unsigned bytes in 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file holding unsigned bytes in 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Greyscale images read from an IDX file: `n` images of `rows x cols` bytes, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
    /// `n * rows * cols` bytes, image after image.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// Bytes per image (`rows * cols`).
    pub fn image_size(&self) -> usize {
        self.rows * self.cols
    }

    /// The pixels of image `i`. Panics if `i >= n` (an index, not user input).
    pub fn image(&self, i: usize) -> &[u8] {
        let sz = self.image_size();
        &self.pixels[i * sz..(i + 1) * sz]
    }
}

/// Returns the decompressed bytes when `bytes` is gzipped, otherwise `bytes` itself.
fn maybe_gunzip<'a>(bytes: &'a [u8], what: &str) -> Result<Cow<'a, [u8]>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .with_context(|| {
                format!("{what}: the gzip data is corrupt or truncated; download the file again")
            })?;
        Ok(Cow::Owned(out))
    } else {
        Ok(Cow::Borrowed(bytes))
    }
}

fn describe_magic(magic: u32) -> &'static str {
    match magic {
        IMAGES_MAGIC => " (an IDX image file)",
        LABELS_MAGIC => " (an IDX label file)",
        _ => "",
    }
}

/// Checks the magic number and returns the `ndim` big-endian dimensions and the payload.
fn parse_header<'a>(
    bytes: &'a [u8],
    what: &str,
    magic: u32,
    kind: &str,
) -> Result<(Vec<usize>, &'a [u8])> {
    let ndim = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndim;
    if bytes.len() < 4 {
        bail!(
            "{what}: only {} bytes, too short for an IDX {kind} file (expected a {header_len}-byte header)",
            bytes.len()
        );
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        bail!(
            "{what}: not an IDX {kind} file: magic number is 0x{found:08x}{}, expected 0x{magic:08x}",
            describe_magic(found)
        );
    }
    if bytes.len() < header_len {
        bail!(
            "{what}: truncated IDX header: {} bytes, expected {header_len}",
            bytes.len()
        );
    }
    let dims = (0..ndim)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    Ok((dims, &bytes[header_len..]))
}

/// Checks that the payload holds exactly `expected` bytes (when it can be computed).
fn check_len(payload: &[u8], expected: Option<usize>, dims: &[usize], what: &str) -> Result<()> {
    let shape = dims
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" x ");
    let Some(expected) = expected else {
        bail!("{what}: header dimensions {shape} are too large to be real");
    };
    if payload.len() < expected {
        bail!(
            "{what}: truncated: the header announces {shape} = {expected} bytes of data but only {} follow",
            payload.len()
        );
    }
    if payload.len() > expected {
        bail!(
            "{what}: header/length mismatch: the header announces {shape} = {expected} bytes of data but {} follow",
            payload.len()
        );
    }
    Ok(())
}

/// Parses an IDX image file (`u8`, `[n, rows, cols]`), plain or gzipped. `what` names the
/// source in error messages.
pub fn parse_images(bytes: &[u8], what: &str) -> Result<IdxImages> {
    let bytes = maybe_gunzip(bytes, what)?;
    let (dims, payload) = parse_header(&bytes, what, IMAGES_MAGIC, "image")?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    let expected = n.checked_mul(rows).and_then(|v| v.checked_mul(cols));
    check_len(payload, expected, &dims, what)?;
    Ok(IdxImages {
        n,
        rows,
        cols,
        pixels: payload.to_vec(),
    })
}

/// Parses an IDX label file (`u8`, `[n]`), plain or gzipped. `what` names the source in error
/// messages.
pub fn parse_labels(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    let bytes = maybe_gunzip(bytes, what)?;
    let (dims, payload) = parse_header(&bytes, what, LABELS_MAGIC, "label")?;
    check_len(payload, Some(dims[0]), &dims, what)?;
    Ok(payload.to_vec())
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .with_context(|| format!("cannot read {}: check that the file exists", path.display()))
}

/// Reads an IDX image file (plain or `.gz`) from `path`.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    parse_images(&read_file(path)?, &path.display().to_string())
}

/// Reads an IDX label file (plain or `.gz`) from `path`.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    parse_labels(&read_file(path)?, &path.display().to_string())
}
