//! The ceilings a sparse kernel's inner loop can reach on this CPU: GFLOP/s per core of a
//! loop shaped like the batch-innermost convolution's (per entry: one broadcast weight, then
//! 8 vector loads at a data-dependent offset and 8 FMAs into 8 accumulators), with the
//! offsets drawn at random inside windows from L1 to L3 size, rows 64 bytes or 1 KiB apart;
//! and the same FMAs without loads. Single-threaded, AVX-512 only.
//! `cargo run --release -p rest-kernels --example load_ceiling`.

#[cfg(target_arch = "x86_64")]
mod run {
    use std::arch::x86_64::*;

    /// `reps` passes over the entries; `stride` floats between a tile's 8 vectors.
    #[target_feature(enable = "avx512f")]
    unsafe fn entries(reps: usize, off: &[u32], vals: &[f32], x: &[f32], stride: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 8];
        let p = x.as_ptr();
        for _ in 0..reps {
            for (&o, &w) in off.iter().zip(vals) {
                let vb = _mm512_set1_ps(w);
                let q = p.add(o as usize);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(vb, _mm512_loadu_ps(q.add(stride * i)), *a);
                }
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// The same FMAs on registers only (12 independent chains).
    #[target_feature(enable = "avx512f")]
    unsafe fn fmas(iters: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        let (b, c) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999));
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, b, c);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    pub fn main() {
        if !rest_kernels::Isa::Avx512.is_available() {
            println!("AVX-512 is not available here");
            return;
        }
        let iters = 50_000_000;
        let t = std::time::Instant::now();
        // SAFETY: AVX-512F is available (checked above).
        let r = unsafe { fmas(iters) };
        let s = t.elapsed().as_secs_f64();
        println!(
            "FMAs only: {:.1} GFLOP/s ({r:.0})",
            (iters * 12 * 32) as f64 / s / 1e9
        );
        for stride in [16usize, 256] {
            for kib in [32usize, 256, 1024, 8192] {
                let floats = kib * 256;
                let x = vec![1.0f32; floats + 8 * stride + 16];
                // Start on a cache line.
                let a = (64 - x.as_ptr() as usize % 64) % 64 / 4;
                let n = 4096;
                let mut seed = 12_345u64;
                let off: Vec<u32> = (0..n)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        (a + (seed >> 33) as usize % (floats / 16) * 16) as u32
                    })
                    .collect();
                let vals = vec![0.5f32; n];
                let reps = 1000;
                let t = std::time::Instant::now();
                // SAFETY: AVX-512F is available; every offset + 8 rows lies inside `x`.
                let r = unsafe { entries(reps, &off, &vals, &x, stride) };
                let s = t.elapsed().as_secs_f64();
                println!(
                    "rows {:>4} B apart, window {kib:>5} KiB: {:.1} GFLOP/s ({r:.0})",
                    stride * 4,
                    (reps * n * 8 * 32) as f64 / s / 1e9
                );
            }
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    run::main();
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
