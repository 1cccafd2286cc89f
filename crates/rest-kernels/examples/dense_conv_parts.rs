//! Wall-clock timings of the three passes of one dense convolution (forward, weight gradient,
//! input gradient) on a given geometry, best of 5, with GFLOP/s:
//! `cargo run --release -p rest-kernels --example dense_conv_parts -- THREADS C N HW OC K STRIDE PAD`
//! (default: ResNet18's stem at 32 px, batch 256, on 2 threads:
//! `2 3 256 32 64 7 2 3`).

use rest_kernels::{conv2d_bwd_input, conv2d_bwd_weight, conv2d_fwd, Conv2dGeom};

fn main() {
    let given: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("arguments are whole numbers"))
        .collect();
    let a = if given.len() == 8 {
        given
    } else {
        vec![2, 3, 256, 32, 64, 7, 2, 3]
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(a[0])
        .build_global()
        .expect("thread pool");
    let g = Conv2dGeom {
        c: a[1],
        n: a[2],
        h: a[3],
        w: a[3],
        oc: a[4],
        kh: a[5],
        kw: a[5],
        stride: a[6],
        pad: a[7],
    };
    let fill = |len: usize, m: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * m) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let (x, dy, w) = (
        fill(g.x_len(), 7919),
        fill(g.out_len(), 104_729),
        fill(g.w_len(), 31),
    );
    let (mut dw, mut dx, mut out) = (
        vec![0f32; g.w_len()],
        vec![0f32; g.x_len()],
        vec![0f32; g.out_len()],
    );
    let time = |f: &mut dyn FnMut()| {
        f();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        best
    };
    let tf = time(&mut || conv2d_fwd(&x, &w, &g, &mut out));
    let tw = time(&mut || conv2d_bwd_weight(&x, &dy, &g, &mut dw));
    let ti = time(&mut || conv2d_bwd_input(&w, &dy, &g, &mut dx));
    let gf = 2.0 * (g.oc * g.k() * g.p()) as f64 / 1e9;
    println!(
        "{g:?}\nforward {tf:.2} ms ({:.0} GFLOP/s)  weight gradient {tw:.2} ({:.0})  input gradient {ti:.2} ({:.0})",
        gf / tf * 1e3,
        gf / tw * 1e3,
        gf / ti * 1e3
    );
}
