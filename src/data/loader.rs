//! The training batch pipeline: an epoch's batches ([`EpochBatches`]: which samples, which
//! transform) are gathered and transformed either inline or by a [`Prefetcher`] that
//! prepares batch k+1 on a worker thread while step k runs. The prefetcher sends finished
//! batches over a bounded channel (depth 2) and takes used buffers back, so no batch
//! allocates after the first few; an error in a batch is returned in its place, a worker
//! that dies is reported, and dropping the prefetcher stops and joins its thread. Both
//! paths produce bit-identical batches (the transform's randomness depends only on the
//! sample's position in the epoch).

use super::transform::{AugKey, BatchLayout, Transform};
use super::Split;
use anyhow::{anyhow, bail, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};

/// Batches the prefetcher may hold ready ahead of the consumer.
pub const PREFETCH_DEPTH: usize = 2;

/// The batches of one epoch: consecutive chunks of `order` of `batch_size` samples, each
/// gathered from `split` through `transform` with the augmentation stream of
/// `(seed, epoch)`.
#[derive(Debug, Clone, Copy)]
pub struct EpochBatches<'a> {
    pub split: &'a Split,
    pub order: &'a [usize],
    pub batch_size: usize,
    pub transform: Transform,
    pub seed: u64,
    pub epoch: usize,
    /// The memory layout the model takes its batches in (`Model::input_layout`).
    pub layout: BatchLayout,
}

impl EpochBatches<'_> {
    /// Number of batches (the last may be short).
    pub fn len(&self) -> usize {
        self.order.len().div_ceil(self.batch_size.max(1))
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The sample indices of batch `k`.
    pub fn indices(&self, k: usize) -> &[usize] {
        let bs = self.batch_size.max(1);
        let a = (k * bs).min(self.order.len());
        let b = ((k + 1) * bs).min(self.order.len());
        &self.order[a..b]
    }

    /// Gathers batch `k` into `buf` (`f32`, laid out as `self.layout`, reusing its
    /// allocation).
    pub fn fill(&self, k: usize, buf: &mut Vec<f32>) -> Result<()> {
        let key = AugKey {
            seed: self.seed,
            epoch: self.epoch,
            first_pos: k * self.batch_size.max(1),
        };
        self.transform
            .gather_as(self.split, self.indices(k), Some(key), self.layout, buf)
    }
}

/// A prepared batch: its number in the epoch and its `f32` values (in the plan's layout).
#[derive(Debug)]
pub struct Batch {
    pub index: usize,
    pub data: Vec<f32>,
}

/// Prepares the batches `start..plan.len()` of an epoch on a worker thread of `scope`.
pub struct Prefetcher<'scope> {
    rx: Option<Receiver<Result<Batch>>>,
    recycle: Option<Sender<Vec<f32>>>,
    stop: Arc<AtomicBool>,
    allocations: Arc<AtomicUsize>,
    handle: Option<ScopedJoinHandle<'scope, ()>>,
    next: usize,
    end: usize,
}

impl<'scope> Prefetcher<'scope> {
    /// Starts the worker thread.
    pub fn spawn<'env>(
        scope: &'scope Scope<'scope, 'env>,
        plan: EpochBatches<'env>,
        start: usize,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(PREFETCH_DEPTH);
        let (recycle, spare) = mpsc::channel::<Vec<f32>>();
        let stop = Arc::new(AtomicBool::new(false));
        let allocations = Arc::new(AtomicUsize::new(0));
        let end = plan.len();
        let (stop2, alloc2) = (stop.clone(), allocations.clone());
        let handle = std::thread::Builder::new()
            .name("rest-data".into())
            .spawn_scoped(scope, move || {
                worker(plan, start, tx, spare, &stop2, &alloc2)
            })
            .map_err(|e| {
                anyhow!(
                    "cannot start the data-loading thread ({e}); pass --no-prefetch to load \
                     batches on the training thread"
                )
            })?;
        Ok(Self {
            rx: Some(rx),
            recycle: Some(recycle),
            stop,
            allocations,
            handle: Some(handle),
            next: start,
            end,
        })
    }

    /// The next batch in order; `None` after the last. A failed batch is returned as its
    /// error (the worker stops after it).
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.end {
            return None;
        }
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(Ok(b)) if b.index == self.next => {
                self.next += 1;
                Some(Ok(b))
            }
            Ok(Ok(b)) => {
                self.next = self.end;
                Some(Err(anyhow!(
                    "internal error: the data pipeline delivered batch {} where {} was due",
                    b.index,
                    self.next
                )))
            }
            Ok(Err(e)) => {
                self.next = self.end;
                Some(Err(e))
            }
            Err(_) => {
                self.next = self.end;
                Some(Err(anyhow!(
                    "the data-loading thread stopped before the end of the epoch (it \
                     panicked; see the message above); rerun with --no-prefetch to load \
                     batches on the training thread"
                )))
            }
        }
    }

    /// Gives a used batch buffer back to the worker for reuse.
    pub fn recycle(&self, buf: Vec<f32>) {
        if let Some(r) = &self.recycle {
            // The worker may have finished; the buffer is then simply dropped.
            let _ = r.send(buf);
        }
    }

    /// Batch buffers the worker has allocated so far (at most `PREFETCH_DEPTH + 2` when
    /// every buffer is recycled).
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::SeqCst)
    }
}

impl Drop for Prefetcher<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Dropping the receiver unblocks a worker waiting to send.
        self.rx.take();
        self.recycle.take();
        if let Some(h) = self.handle.take() {
            // A worker panic was already reported by `next_batch`; joining here keeps the
            // scope from re-raising it.
            let _ = h.join();
        }
    }
}

fn worker(
    plan: EpochBatches<'_>,
    start: usize,
    tx: SyncSender<Result<Batch>>,
    spare: Receiver<Vec<f32>>,
    stop: &AtomicBool,
    allocations: &AtomicUsize,
) {
    for k in start..plan.len() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut buf = spare.try_recv().unwrap_or_else(|_| {
            allocations.fetch_add(1, Ordering::SeqCst);
            Vec::new()
        });
        let res = plan.fill(k, &mut buf).map(|()| Batch {
            index: k,
            data: buf,
        });
        let failed = res.is_err();
        if tx.send(res).is_err() || failed {
            return;
        }
    }
}

/// Where the training loop takes its batches from: inline (gathered on the calling thread
/// when asked) or a [`Prefetcher`].
pub enum BatchSource<'scope, 'env> {
    Inline {
        plan: EpochBatches<'env>,
        next: usize,
        buf: Vec<f32>,
    },
    Prefetch(Prefetcher<'scope>),
}

impl<'scope, 'env> BatchSource<'scope, 'env> {
    /// Batches `start..` of `plan`, prefetched on a thread of `scope` when `prefetch`.
    pub fn new(
        scope: &'scope Scope<'scope, 'env>,
        plan: EpochBatches<'env>,
        start: usize,
        prefetch: bool,
    ) -> Result<Self> {
        if start > plan.len() {
            bail!(
                "internal error: batch {start} requested of an epoch of {} batches",
                plan.len()
            );
        }
        Ok(if prefetch {
            BatchSource::Prefetch(Prefetcher::spawn(scope, plan, start)?)
        } else {
            BatchSource::Inline {
                plan,
                next: start,
                buf: Vec::new(),
            }
        })
    }

    /// The next batch in order; `None` after the last.
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        match self {
            BatchSource::Prefetch(p) => p.next_batch(),
            BatchSource::Inline { plan, next, buf } => {
                if *next >= plan.len() {
                    return None;
                }
                let k = *next;
                *next += 1;
                let mut data = std::mem::take(buf);
                Some(plan.fill(k, &mut data).map(|()| Batch { index: k, data }))
            }
        }
    }

    /// Gives a used batch buffer back for reuse.
    pub fn recycle(&mut self, data: Vec<f32>) {
        match self {
            BatchSource::Prefetch(p) => p.recycle(data),
            BatchSource::Inline { buf, .. } => *buf = data,
        }
    }
}
