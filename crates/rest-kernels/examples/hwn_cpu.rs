//! Process-CPU-time timings of the two sparse convolutions on ResNet18's shapes (32 px images
//! and batch 256 unless given, ERK densities of overall 0.05), single threaded: the polyphase CNHW conv
//! (`SparseConv`: pack + forward, expand + input gradient, weight gradient) against the
//! batch-innermost one (`HwnConv`, plus the CNHW <-> CHWN transposes it needs inside a CNHW
//! network). Buffers are 64-byte aligned and advised as huge pages, as the `rest` binary's
//! large blocks are (unaligned rows cost the batch-innermost kernel up to 1.6x).
//! `cargo run --release -p rest-kernels --example hwn_cpu [BATCH] [IMAGE_PX]` (defaults 256, 32).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rest_kernels::sparse::{HwnConv, SparseConv, SparseMatrix};
use rest_kernels::Conv2dGeom;

#[path = "common/cpu_time.rs"]
mod cpu_time;
use cpu_time::best_of;

extern "C" {
    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
}

/// A zeroed, 64-byte-aligned buffer whose 2 MiB-aligned interior is advised as transparent
/// huge pages (as the `rest` binary's allocator does for large blocks).
struct Buf {
    v: Vec<f32>,
    o: usize,
    len: usize,
}

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[self.o..self.o + self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.o..self.o + self.len]
    }
}

fn buf(len: usize) -> Buf {
    let v = vec![0.0f32; len + 16];
    const HUGE: usize = 2 << 20;
    let p = v.as_ptr() as usize;
    let o = ((64 - p % 64) % 64) / 4;
    let (a, b) = ((p + HUGE - 1) & !(HUGE - 1), (p + 4 * len) & !(HUGE - 1));
    if b > a {
        // SAFETY: advice on pages inside this allocation; 14 = MADV_HUGEPAGE.
        unsafe { madvise(a as *mut _, b - a, 14) };
    }
    Buf { v, o, len }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    // Image size: the stem's input; layer1 runs at a quarter of it.
    let px: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let q = (px / 4).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("pool");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!(
        "layer            density  phase fwd/bin/bw ms      hwn fwd/bin/bw ms   (+transposes)"
    );
    #[rustfmt::skip]
    let shapes = [
        ("stem 7x7/2", 3, px, 64, 7, 2, 3, 0.548),
        ("layer1 3x3", 64, q, 64, 3, 1, 1, 0.231),
        ("layer2.0 3x3/2", 64, q, 128, 3, 2, 1, 0.171),
        ("layer2 3x3", 128, (q / 2).max(1), 128, 3, 1, 1, 0.113),
        ("layer3 3x3", 256, (q / 4).max(1), 256, 3, 1, 1, 0.056),
        ("layer4 3x3", 512, (q / 8).max(1), 512, 3, 1, 1, 0.028),
    ];
    for (name, ch, hw, oc, k, s, pad, d) in shapes {
        let g = Conv2dGeom {
            c: ch,
            n,
            h: hw,
            w: hw,
            oc,
            kh: k,
            kw: k,
            stride: s,
            pad,
        };
        let rnd = |r: &mut ChaCha8Rng, len: usize| -> Vec<f32> {
            (0..len).map(|_| r.random_range(-1.0f32..1.0)).collect()
        };
        let w = rnd(&mut rng, g.w_len());
        let x = {
            let v = rnd(&mut rng, g.x_len());
            let mut b = buf(v.len());
            b.copy_from_slice(&v);
            b
        };
        let dy = {
            let v = rnd(&mut rng, g.out_len());
            let mut b = buf(v.len());
            b.copy_from_slice(&v);
            b
        };
        let mask: Vec<bool> = (0..g.w_len()).map(|_| rng.random_bool(d)).collect();
        let sm = SparseMatrix::from_dense_masked(&w, &mask, oc, g.k()).expect("shape");
        let conv = SparseConv::new(&sm, &g).expect("geometry");
        let mut xph = buf(conv.phase_len());
        let mut dyv = buf(conv.grad_len());
        let mut grad = vec![0.0f32; sm.nnz()];
        let mut out = buf(g.out_len());
        let mut dx = buf(g.x_len());
        let fwd = best_of(5, || {
            conv.pack_input(&x, &mut xph).expect("pack");
            conv.forward(&sm, &xph, &mut out).expect("fwd")
        });
        let bin = best_of(5, || {
            conv.backward_input(&sm, &dy, &mut dyv, &mut dx)
                .expect("bwd")
        });
        let bw = best_of(5, || {
            conv.grad_weight(&sm, &dyv, &xph, &mut grad).expect("gw")
        });

        let hc = HwnConv::new(&sm, &g).expect("geometry");
        let mut xh = buf(hc.x_len());
        let mut dyh = buf(hc.out_len());
        let mut oh = buf(hc.out_len());
        let mut dxh = buf(hc.x_len());
        let tr = best_of(5, || {
            hc.input_to_chwn(&x, &mut xh);
            hc.output_to_chwn(&dy, &mut dyh);
            hc.output_to_cnhw(&oh, &mut out);
            hc.input_to_cnhw(&dxh, &mut dx);
        });
        let hf = best_of(5, || hc.forward(&sm, &xh, &mut oh, None).expect("fwd"));
        let hb = best_of(5, || hc.backward_input(&sm, &dyh, &mut dxh).expect("bwd"));
        let hw_ = best_of(5, || hc.grad_weight(&sm, &dyh, &xh, &mut grad).expect("gw"));
        println!(
            "{name:<16} {d:>7.3}  {fwd:>6.2} {bin:>6.2} {bw:>6.2}  {:>6.2}   {hf:>6.2} {hb:>6.2} {hw_:>6.2}  {:>6.2}  (+{tr:.2})",
            fwd + bin + bw,
            hf + hb + hw_,
        );
    }
}
