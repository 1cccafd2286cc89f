//! Process-CPU-time timings of the dense (im2col + GEMM) and direct sparse convolutions on
//! REST's CNN shapes, single threaded: a load-robust signal for kernel work on a shared machine (criterion measures wall
//! time). `cargo run --release -p rest-kernels --example conv_cpu [DENSITY]`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rest_kernels::sparse::{SparseConv, SparseMatrix};
use rest_kernels::Conv2dGeom;

#[path = "common/cpu_time.rs"]
mod cpu_time;
use cpu_time::best_of;

fn main() {
    let d: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.05);
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("pool");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for &(name, ch, hw, oc) in &[("conv2", 64, 14, 128), ("conv3", 128, 7, 256)] {
        let g = Conv2dGeom {
            c: ch,
            n: 256,
            h: hw,
            w: hw,
            oc,
            kh: 4,
            kw: 4,
            stride: 2,
            pad: 1,
        };
        let rnd = |r: &mut ChaCha8Rng, n: usize| -> Vec<f32> {
            (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
        };
        let w = rnd(&mut rng, g.w_len());
        let x = rnd(&mut rng, g.x_len());
        let dy = rnd(&mut rng, g.out_len());
        let mask: Vec<bool> = (0..g.w_len()).map(|_| rng.random_bool(d)).collect();
        let sm = SparseMatrix::from_dense_masked(&w, &mask, oc, g.k()).expect("shape");
        let conv = SparseConv::new(&sm, &g).expect("geometry");
        let mut xph = vec![0.0f32; conv.phase_len()];
        let mut dyv = vec![0.0f32; conv.grad_len()];
        let mut grad = vec![0.0f32; sm.nnz()];
        let mut out = vec![0.0f32; g.out_len()];
        let mut dx = vec![0.0f32; g.x_len()];
        let pack = best_of(5, || conv.pack_input(&x, &mut xph).expect("pack"));
        let fwd = best_of(5, || conv.forward(&sm, &xph, &mut out).expect("fwd"));
        let bin = best_of(5, || {
            conv.backward_input(&sm, &dy, &mut dyv, &mut dx)
                .expect("bwd")
        });
        let bw = best_of(5, || {
            conv.grad_weight(&sm, &dyv, &xph, &mut grad).expect("gw")
        });
        let mut col = vec![0.0f32; g.col_len()];
        let mut dw = vec![0.0f32; g.w_len()];
        let i2c = best_of(5, || rest_kernels::im2col(&x, &g, &mut col));
        let dfwd = best_of(3, || rest_kernels::conv2d_fwd(&x, &w, &g, &mut out));
        let dbin = best_of(3, || rest_kernels::conv2d_bwd_input(&w, &dy, &g, &mut dx));
        let dbw = best_of(3, || rest_kernels::conv2d_bwd_weight(&x, &dy, &g, &mut dw));
        println!(
            "{name} dense: im2col {i2c:.2} ms, forward {dfwd:.2} ms, input_grad {dbin:.2} ms, \
             weight_grad {dbw:.2} ms (CPU ms, 1 thread)"
        );
        let macs = sm.nnz() as f64 * (g.n * g.oh() * g.ow()) as f64;
        println!(
            "{name} d={d}: pack {pack:.2} ms, forward {fwd:.2} ms ({:.1} GFLOP/s useful), \
             input_grad {bin:.2} ms, weight_grad {bw:.2} ms (CPU ms, 1 thread)",
            2.0 * macs / fwd / 1e6
        );
    }
}
