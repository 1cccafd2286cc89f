//! Process-CPU-time timings of the batch-major sparse linear kernels (`sparse::rows`) on the
//! MLP's shapes at batch 256: a load-robust signal for kernel work on a shared machine.
//! `cargo run --release -p rest-kernels --example rows_cpu [DENSITY] [THREADS]`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rest_kernels::sparse::{self as rows, SparseMatrix};

#[path = "common/cpu_time.rs"]
mod cpu_time;
use cpu_time::best_of;

fn main() {
    let mut args = std::env::args().skip(1);
    let d: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0.009);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("pool");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 256;
    for &(name, i, o) in &[("fc1", 2352, 100), ("fc2", 100, 100)] {
        let rnd = |r: &mut ChaCha8Rng, k: usize| -> Vec<f32> {
            (0..k).map(|_| r.random_range(-1.0f32..1.0)).collect()
        };
        let w = rnd(&mut rng, o * i);
        let x = rnd(&mut rng, n * i);
        let dy = rnd(&mut rng, n * o);
        let b = rnd(&mut rng, o);
        let mask: Vec<bool> = (0..o * i).map(|_| rng.random_bool(d)).collect();
        let sm = SparseMatrix::from_dense_masked(&w, &mask, o, i).expect("shape");
        let mut y = vec![0.0f32; n * o];
        let mut pack = vec![0.0f32; rows::packed_len(&sm, n)];
        let mut dx = vec![0.0f32; n * i];
        let mut grad = vec![0.0f32; sm.nnz()];
        let reps = 200;
        let fwd = best_of(reps, || {
            rows::spmm_rows_fused(&sm, &x, n, Some(&b), true, &mut y, &mut []).expect("fwd")
        });
        let fwdp = best_of(reps, || {
            rows::spmm_rows_fused(&sm, &x, n, Some(&b), true, &mut y, &mut pack).expect("fwd")
        });
        let gw = best_of(reps, || {
            rows::sddmm_packed(&sm, &dy, &pack, n, &mut grad).expect("gw")
        });
        let gx = best_of(reps, || {
            rows::spmm_t_rows(&sm, &dy, n, &mut dx).expect("gx")
        });
        println!(
            "{name} {o}x{i} d={d} nnz {}: forward {:.1} us, forward+pack {:.1} us, \
             weight_grad(packed) {:.1} us, input_grad {:.1} us (CPU, {threads} thread(s), best of {reps})",
            sm.nnz(),
            fwd * 1e3,
            fwdp * 1e3,
            gw * 1e3,
            gx * 1e3
        );
    }
}
