//! Output and scratch buffers that a kernel overwrites completely: allocated without the zero
//! fill (tens of MB per layer at batch 256). They are not pooled here: the allocator keeps
//! freed memory mapped (`main.rs` sets mimalloc's purge delay) and reuses it for the next
//! allocation, so a fresh buffer costs no page faults after the first step, and a pool of
//! idle buffers only added to the peak memory (at the same step time).

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_have_the_requested_length() {
        for len in [0, 1, 1000, 1 << 20] {
            let v = output(len);
            assert_eq!(v.len(), len);
            assert!(v.capacity() >= len);
        }
    }
}
