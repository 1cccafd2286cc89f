//! Per-op timings of training steps, for `rest bench --profile`: while enabled, the tape
//! (`super::tape`) adds the wall time of every recorded op's forward and backward pass to the
//! op's row, keyed by the op's name and its output shape (which tells the layers of a network
//! apart). Collection is per thread (the thread that runs the steps, as the tape is), so
//! other threads' training is never mixed in. Off, it costs one thread-local read per op.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static ROWS: RefCell<BTreeMap<String, OpTime>> = const { RefCell::new(BTreeMap::new()) };
}

/// The accumulated time of one op at one output shape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTime {
    pub calls: usize,
    pub forward: Duration,
    pub backward: Duration,
}

/// Starts (or stops) collecting on this thread; starting clears what was collected.
pub fn enable(on: bool) {
    if on {
        ROWS.with(|r| r.borrow_mut().clear());
    }
    ENABLED.with(|e| e.set(on));
}

pub(crate) fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

fn key(name: &str, dims: &[usize]) -> String {
    format!("{name} {dims:?}")
}

pub(crate) fn add_forward(name: &str, dims: &[usize], t: Duration) {
    ROWS.with(|rows| {
        let mut rows = rows.borrow_mut();
        let r = rows.entry(key(name, dims)).or_default();
        r.calls += 1;
        r.forward += t;
    });
}

pub(crate) fn add_backward(name: &str, dims: &[usize], t: Duration) {
    ROWS.with(|rows| {
        rows.borrow_mut()
            .entry(key(name, dims))
            .or_default()
            .backward += t
    });
}

/// What this thread collected since `enable(true)`: `op [output dims]` -> time, by key.
pub fn take() -> Vec<(String, OpTime)> {
    ROWS.with(|r| std::mem::take(&mut *r.borrow_mut()))
        .into_iter()
        .collect()
}
