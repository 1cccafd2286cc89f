//! Where a split's decoded images live ([`Images`]): `u8` NHWC records of one size, held in
//! RAM (generated data, tests), read through a read-only memory map of the decoded-image
//! cache file (`data::cache`; the operating system pages them in and out, so resident memory
//! does not grow with the dataset), or decoded from their files on the fly, batch by batch
//! (the fallback when no cache file can be written). Batches are gathered through
//! [`Images::batch`], which lends the records of a batch without copying them when they lie
//! in one contiguous buffer.

use anyhow::{bail, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// Decodes images one at a time, for [`Images::on_the_fly`]: record `i` into `dst`
/// (`record_len` bytes). An error names the file.
pub trait ImageSource: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// True when there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decodes image `i` into `dst`, which has exactly the record size.
    fn decode_into(&self, i: usize, dst: &mut [u8]) -> Result<()>;
    /// What the images are decoded from, for messages (e.g. a folder).
    fn describe(&self) -> String;
}

#[derive(Clone)]
enum Store {
    Owned(Vec<u8>),
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    OnTheFly {
        source: Arc<dyn ImageSource>,
        record: usize,
    },
}

/// The image records of a split (see the module doc). Cloning a mapped or on-the-fly store
/// shares it; cloning an in-RAM store copies the bytes.
#[derive(Clone)]
pub struct Images(Store);

/// The records of one batch: `bytes` holds the images `idx` (records of the split's size,
/// NHWC), either the whole split's buffer with the batch's own indices, or the batch's
/// records decoded into a buffer of their own, indexed `0..n`.
pub struct BatchBytes<'a> {
    pub bytes: Cow<'a, [u8]>,
    pub idx: Cow<'a, [usize]>,
}

impl Images {
    /// Records held in RAM.
    pub fn in_memory(bytes: Vec<u8>) -> Self {
        Images(Store::Owned(bytes))
    }

    /// Records at `start..start + len` of a read-only memory map (checked to lie inside it).
    pub fn mapped(map: Arc<Mmap>, start: usize, len: usize) -> Result<Self> {
        match start.checked_add(len) {
            Some(end) if end <= map.len() => Ok(Images(Store::Mapped { map, start, len })),
            _ => bail!(
                "internal error: image records {start}..+{len} outside a map of {} bytes",
                map.len()
            ),
        }
    }

    /// Records decoded from `source` when a batch asks for them (`record` bytes each).
    pub fn on_the_fly(source: Arc<dyn ImageSource>, record: usize) -> Self {
        Images(Store::OnTheFly { source, record })
    }

    /// Total bytes of the records.
    pub fn byte_len(&self) -> usize {
        match &self.0 {
            Store::Owned(v) => v.len(),
            Store::Mapped { len, .. } => *len,
            Store::OnTheFly { source, record } => source.len() * record,
        }
    }

    /// Where the records live: `"memory"`, `"mapped"` or `"on the fly"`.
    pub fn kind(&self) -> &'static str {
        match &self.0 {
            Store::Owned(_) => "memory",
            Store::Mapped { .. } => "mapped",
            Store::OnTheFly { .. } => "on the fly",
        }
    }

    /// All records as one slice, when they lie in one buffer (in RAM or mapped).
    pub fn contiguous(&self) -> Option<&[u8]> {
        match &self.0 {
            Store::Owned(v) => Some(v),
            Store::Mapped { map, start, len } => Some(&map[*start..*start + *len]),
            Store::OnTheFly { .. } => None,
        }
    }

    /// All records as one slice; an error for images decoded on the fly.
    pub fn bytes(&self) -> Result<&[u8]> {
        match (self.contiguous(), &self.0) {
            (Some(b), _) => Ok(b),
            (None, Store::OnTheFly { source, .. }) => bail!(
                "the images of {} are decoded on the fly (no cache file), not held in one \
                 buffer",
                source.describe()
            ),
            (None, _) => bail!("internal error: no contiguous image buffer"),
        }
    }

    /// Record `i` (`record` bytes): borrowed from the buffer, or decoded.
    pub fn record(&self, i: usize, record: usize) -> Result<Cow<'_, [u8]>> {
        match &self.0 {
            Store::OnTheFly { source, .. } => {
                let mut v = vec![0u8; record];
                source.decode_into(i, &mut v)?;
                Ok(Cow::Owned(v))
            }
            _ => {
                let b = self.bytes()?;
                match i
                    .checked_mul(record)
                    .and_then(|a| Some((a, a.checked_add(record)?)))
                {
                    Some((a, e)) if e <= b.len() => Ok(Cow::Borrowed(&b[a..e])),
                    _ => bail!("image index {i} is outside the split"),
                }
            }
        }
    }

    /// The records of the batch `idx` (`record` bytes each; indices checked by the caller):
    /// the buffer itself when the records lie in one, else decoded in parallel.
    pub fn batch<'a>(&'a self, idx: &'a [usize], record: usize) -> Result<BatchBytes<'a>> {
        match &self.0 {
            Store::OnTheFly { source, .. } => {
                let mut buf = vec![0u8; idx.len() * record];
                buf.par_chunks_mut(record.max(1))
                    .zip(idx.par_iter())
                    .try_for_each(|(dst, &i)| source.decode_into(i, dst))?;
                Ok(BatchBytes {
                    bytes: Cow::Owned(buf),
                    idx: Cow::Owned((0..idx.len()).collect()),
                })
            }
            _ => Ok(BatchBytes {
                bytes: Cow::Borrowed(self.bytes()?),
                idx: Cow::Borrowed(idx),
            }),
        }
    }
}

impl fmt::Debug for Images {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Images({}, {} bytes)", self.kind(), self.byte_len())
    }
}

/// Equal when both hold the same bytes (in RAM or mapped), or share one on-the-fly source.
impl PartialEq for Images {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (
                Store::OnTheFly {
                    source: a,
                    record: ra,
                },
                Store::OnTheFly {
                    source: b,
                    record: rb,
                },
            ) => Arc::ptr_eq(a, b) && ra == rb,
            _ => match (self.contiguous(), other.contiguous()) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
        }
    }
}

impl From<Vec<u8>> for Images {
    fn from(v: Vec<u8>) -> Self {
        Images::in_memory(v)
    }
}
