//! Reusable scratch buffers for the sparse convolution's im2col matrices (tens of MB per
//! layer at batch 256). Allocating them fresh every step costs page faults and zero-filling
//! that outweighed the sparse arithmetic; the kernels that fill them overwrite every element,
//! so a reused buffer needs no clearing.

use std::sync::Mutex;

/// A new `len`-element buffer for a kernel output that the kernel overwrites completely
/// (every kernel in `rest-kernels` does unless its doc says it accumulates). Skips the zero
/// fill of `vec![0.0; len]`, a full extra write pass over tens of MB per layer and step once
/// the allocator reuses memory; candle's own CPU backend allocates its outputs the same way.
pub fn output(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns, and every caller passes the buffer to a kernel
    // that writes each element before anything reads it.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// At most this many idle buffers are kept.
const MAX_IDLE: usize = 8;

static IDLE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` elements with unspecified contents (a reused buffer keeps stale values,
/// a grown one holds whatever the allocator gave). The caller must overwrite what it reads.
pub fn take(len: usize) -> Vec<f32> {
    let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
    // Best fit: the smallest idle buffer that is large enough, else the largest one.
    let pick = idle
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len)
        .min_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i)
        .or_else(|| {
            idle.iter()
                .enumerate()
                .max_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
        });
    let mut buf = match pick {
        Some(i) => idle.swap_remove(i),
        None => Vec::new(),
    };
    drop(idle);
    if buf.capacity() < len {
        // Too small: a fresh buffer, neither copied from the old one nor zero-filled.
        return output(len);
    }
    // SAFETY: within capacity; f32 has no invalid bit patterns, and the caller overwrites
    // what it reads (this function's contract, as for `output`).
    #[allow(clippy::uninit_vec)]
    unsafe {
        buf.set_len(len)
    };
    buf
}

/// Returns a buffer for reuse.
pub fn give(buf: Vec<f32>) {
    if buf.capacity() == 0 {
        return;
    }
    let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < MAX_IDLE {
        idle.push(buf);
    } else if let Some(smallest) = idle.iter_mut().min_by_key(|b| b.capacity()) {
        if smallest.capacity() < buf.capacity() {
            *smallest = buf;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_with_the_requested_length() {
        let mut a = take(1000);
        assert_eq!(a.len(), 1000);
        a[999] = 7.0;
        let ptr = a.as_ptr();
        give(a);
        let b = take(500);
        assert_eq!(b.len(), 500);
        // Other tests may use the pool concurrently, so reuse is likely but not certain;
        // the length contract always holds.
        let reused = b.as_ptr() == ptr;
        give(b);
        let c = take(2000);
        assert_eq!(c.len(), 2000);
        if reused {
            assert!(c.capacity() >= 2000);
        }
        give(c);
    }
}
