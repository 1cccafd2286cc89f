//! Timings of the dense convolution kernels at the shapes of torchvision's ResNet18 on 32x32
//! (or `--hw H`) images, batch 64, CNHW: forward, input gradient and weight gradient of every
//! distinct convolution, at 1 and at 2 threads. Plain wall-clock minima over repetitions (the
//! minimum is the steadiest statistic on a shared machine), no criterion:
//! `cargo bench -p rest-kernels --bench dense_resnet18 [-- --hw 128 --reps 5 --threads 1
//! --cpu]` (`--cpu`: process CPU time instead of wall time, steadier on a busy machine).

use rest_kernels::*;
use std::time::Instant;

fn filled(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The distinct convolutions of ResNet18 (7x7 stem, max pool) with how often each occurs.
fn layers(hw: usize, n: usize) -> Vec<(String, Conv2dGeom, usize)> {
    let g = |c, h, oc, k, stride, pad| Conv2dGeom {
        c,
        n,
        h,
        w: h,
        oc,
        kh: k,
        kw: k,
        stride,
        pad,
    };
    let mut v = vec![("stem".to_string(), g(3, hw, 64, 7, 2, 3), 1)];
    let mut h = hw.div_ceil(2); // after the stem
    h = (h - 1) / 2 + 1; // after the max pool
    v.push(("layer1".into(), g(64, h, 64, 3, 1, 1), 4));
    let mut c = 64;
    for (i, oc) in [128usize, 256, 512].into_iter().enumerate() {
        let l = i + 2;
        v.push((format!("layer{l}.0.conv1"), g(c, h, oc, 3, 2, 1), 1));
        v.push((format!("layer{l}.0.down"), g(c, h, oc, 1, 2, 0), 1));
        h = (h - 1) / 2 + 1;
        v.push((format!("layer{l}.conv"), g(oc, h, oc, 3, 1, 1), 3));
        c = oc;
    }
    v
}

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of this process (all threads), ms.
fn cpu_ms() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: CLOCK_PROCESS_CPUTIME_ID (2) with a valid out-pointer.
    unsafe { clock_gettime(2, &mut ts) };
    ts.sec as f64 * 1e3 + ts.nsec as f64 * 1e-6
}

/// Minimum over `reps` calls of the wall time, or with `cpu` of the process CPU time, ms.
fn time_min(reps: usize, mut f: impl FnMut()) -> f64 {
    let cpu = CPU.load(std::sync::atomic::Ordering::Relaxed);
    f();
    (0..reps)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_ms());
            f();
            if cpu {
                cpu_ms() - c
            } else {
                t.elapsed().as_secs_f64() * 1e3
            }
        })
        .fold(f64::INFINITY, f64::min)
}

static CPU: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (hw, reps, batch) = (flag("--hw", 32), flag("--reps", 7), flag("--batch", 64));
    let only = flag("--threads", 0);
    let cpu = args.iter().any(|a| a == "--cpu");
    CPU.store(cpu, std::sync::atomic::Ordering::Relaxed);
    let what = if cpu { "CPU time" } else { "wall time" };
    println!("layer               x  thr   fwd_ms  bwd_in_ms  bwd_w_ms  (min {what} of {reps})");
    let mut totals = [0.0f64; 3];
    for threads in [1usize, 2] {
        if only != 0 && threads != only {
            continue;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let mut total = 0.0;
        for (name, g, count) in layers(hw, batch) {
            let x = filled(g.x_len(), 1);
            let w = filled(g.w_len(), 2);
            let dout = filled(g.out_len(), 3);
            let (mut out, mut dx, mut dw) = (
                vec![0.0; g.out_len()],
                vec![0.0; g.x_len()],
                vec![0.0; g.w_len()],
            );
            let t = pool.install(|| {
                [
                    time_min(reps, || conv2d_fwd(&x, &w, &g, &mut out)),
                    if name == "stem" {
                        0.0
                    } else {
                        time_min(reps, || conv2d_bwd_input(&w, &dout, &g, &mut dx))
                    },
                    time_min(reps, || conv2d_bwd_weight(&x, &dout, &g, &mut dw)),
                ]
            });
            println!(
                "{name:<18} {count:>2}  {threads:>3}  {:>7.2}  {:>9.2}  {:>8.2}",
                t[0], t[1], t[2]
            );
            for (a, b) in totals.iter_mut().zip(t) {
                *a += b * count as f64;
            }
            total += (t[0] + t[1] + t[2]) * count as f64;
        }
        println!(
            "total {threads} thread(s): {total:.1} ms (fwd {:.1}, bwd_in {:.1}, bwd_w {:.1})",
            totals[0], totals[1], totals[2]
        );
        totals = [0.0; 3];
    }
}
