//! Sparse kernels vs dense GEMM (`gemm` crate) at the shapes of REST's CNN and MLP.
//!
//! Throughput is reported in elements/s where one element is one *useful* flop
//! (`2 · nnz · P` for the sparse kernels, `2 · R · K · P` for dense GEMM), so criterion's
//! `Gelem/s` reads as GFLOP/s and `time(dense) / time(sparse)` is the wall-clock speedup.
//! Density `1.0` is dense GEMM; lower densities run the CSR kernels.
//!
//! The `conv/...` groups time whole sparse convolutions of the CNN's layers (batch 256): the
//! direct polyphase kernels of [`SparseConv`] (`direct`) against lowering with im2col and
//! running the CSR products on the column matrix (`im2col`); `direct/pack` and
//! `direct/expand_grad` time the layout passes alone.
//!
//! The `stack/...` groups time the CNN's whole inference (three conv + BN + ReLU layers and
//! the global average pool, batch 256, dense conv1): the inference stack, one batch-innermost
//! pass per 16 images (`rest_kernels::conv_stack_pool`, `stack`) against the layer-by-layer CNHW kernels (`layers`: dense
//! conv1, then pack + polyphase forward per sparse layer, then the pool).
//!
//! Run: `cargo bench -p rest-kernels --bench sparse [-- <filter>]`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rest_kernels::sparse::{sddmm_into, spmm, spmm_t, SparseConv, SparseMatrix};
use rest_kernels::{
    col2im, conv_stack_pool, im2col, Conv2dGeom, ConvStackLayer, ConvStackPlan, ConvStackWeights,
};

/// `(name, R, K, P)`: the product is `out[R][P] = W[R][K] x[K][P]`.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("conv1_64x48x50176", 64, 48, 50176),
    ("conv2_128x1024x12544", 128, 1024, 12544),
    ("conv3_256x2048x2304", 256, 2048, 2304),
    ("mlp_1024x784x256", 1024, 784, 256),
    ("mlp_100x2352x256", 100, 2352, 256),
];

const DENSITIES: &[f64] = &[1.0, 0.2, 0.05, 0.01, 0.001];

fn random(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// Row-major `dst[m][n] = lhs · rhs` with explicit (row, column) strides of the operands.
#[allow(clippy::too_many_arguments)]
fn dense_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (isize, isize),
) {
    assert_eq!(dst.len(), m * n);
    // SAFETY: the strides describe `lhs` as m x k and `rhs` as k x n inside their slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for &(name, r, k, p) in SHAPES {
        let w = random(&mut rng, r * k);
        let x = random(&mut rng, k * p);
        let dy = random(&mut rng, r * p);
        let mut out = vec![0.0f32; r * p];
        let mut dx = vec![0.0f32; k * p];
        let mut dw = vec![0.0f32; r * k];
        for kernel in ["spmm", "spmm_t", "sddmm"] {
            let mut g = c.benchmark_group(format!("{kernel}/{name}"));
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_millis(1500));
            for &d in DENSITIES {
                let id = BenchmarkId::from_parameter(format!("d{d}"));
                if d >= 1.0 {
                    g.throughput(Throughput::Elements((2 * r * k * p) as u64));
                    let (ki, pi) = (k as isize, p as isize);
                    match kernel {
                        // out[R][P] = W[R][K] x[K][P]
                        "spmm" => g.bench_function(id, |b| {
                            b.iter(|| dense_gemm(r, p, k, &mut out, &w, (ki, 1), &x, (pi, 1)))
                        }),
                        // dx[K][P] = Wᵀ[K][R] dy[R][P]
                        "spmm_t" => g.bench_function(id, |b| {
                            b.iter(|| dense_gemm(k, p, r, &mut dx, &w, (1, ki), &dy, (pi, 1)))
                        }),
                        // dW[R][K] = dy[R][P] xᵀ[P][K]
                        _ => g.bench_function(id, |b| {
                            b.iter(|| dense_gemm(r, k, p, &mut dw, &dy, (pi, 1), &x, (1, pi)))
                        }),
                    };
                    continue;
                }
                let mask: Vec<bool> = (0..r * k).map(|_| rng.random_bool(d)).collect();
                let sm = SparseMatrix::from_dense_masked(&w, &mask, r, k).expect("shape");
                let mut grad = vec![0.0f32; sm.nnz()];
                g.throughput(Throughput::Elements((2 * sm.nnz() * p).max(1) as u64));
                match kernel {
                    "spmm" => g.bench_function(id, |b| {
                        b.iter(|| spmm(&sm, &x, p, &mut out).expect("shape"))
                    }),
                    "spmm_t" => g.bench_function(id, |b| {
                        b.iter(|| spmm_t(&sm, &dy, p, &mut dx).expect("shape"))
                    }),
                    _ => g.bench_function(id, |b| {
                        b.iter(|| sddmm_into(&sm, &dy, &x, p, &mut grad).expect("shape"))
                    }),
                };
            }
            g.finish();
        }
    }
}

/// Whole sparse convolutions (forward; input gradient; weight gradient), direct vs im2col.
fn bench_conv(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // REST's CNN at batch 256: (name, C, H, OC), all 4x4 stride 2 padding 1.
    for &(name, ch, hw, oc) in &[
        ("conv1", 3, 28, 64),
        ("conv2", 64, 14, 128),
        ("conv3", 128, 7, 256),
    ] {
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
        let w = random(&mut rng, g.w_len());
        let x = random(&mut rng, g.x_len());
        let dy = random(&mut rng, g.out_len());
        let (mut out, mut dx) = (vec![0.0f32; g.out_len()], vec![0.0f32; g.x_len()]);
        let mut col = vec![0.0f32; g.col_len()];
        for &d in &[0.05, 0.01] {
            let mask: Vec<bool> = (0..g.w_len()).map(|_| rng.random_bool(d)).collect();
            let sm = SparseMatrix::from_dense_masked(&w, &mask, oc, g.k()).expect("shape");
            let conv = SparseConv::new(&sm, &g).expect("geometry");
            let mut xph = vec![0.0f32; conv.phase_len()];
            let mut dyv = vec![0.0f32; conv.grad_len()];
            let mut grad = vec![0.0f32; sm.nnz()];
            let mut grp = c.benchmark_group(format!("conv/{name}/d{d}"));
            grp.sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_millis(1500));
            // The layout passes alone: the input into the phase buffer, the output gradient
            // into the flat layout.
            grp.bench_function("direct/pack", |b| {
                b.iter(|| conv.pack_input(&x, &mut xph).expect("shape"))
            });
            grp.bench_function("direct/expand_grad", |b| {
                b.iter(|| conv.expand_grad(&dy, &mut dyv).expect("shape"))
            });
            grp.bench_function("direct/forward", |b| {
                b.iter(|| {
                    conv.pack_input(&x, &mut xph).expect("shape");
                    conv.forward(&sm, &xph, &mut out).expect("shape")
                })
            });
            grp.bench_function("im2col/forward", |b| {
                b.iter(|| {
                    im2col(&x, &g, &mut col);
                    spmm(&sm, &col, g.p(), &mut out).expect("shape")
                })
            });
            grp.bench_function("direct/input_grad", |b| {
                b.iter(|| {
                    conv.backward_input(&sm, &dy, &mut dyv, &mut dx)
                        .expect("shape")
                })
            });
            grp.bench_function("im2col/input_grad", |b| {
                b.iter(|| {
                    spmm_t(&sm, &dy, g.p(), &mut col).expect("shape");
                    dx.fill(0.0);
                    col2im(&col, &g, &mut dx)
                })
            });
            conv.pack_input(&x, &mut xph).expect("shape");
            grp.bench_function("direct/weight_grad", |b| {
                b.iter(|| {
                    conv.expand_grad(&dy, &mut dyv).expect("shape");
                    conv.grad_weight(&sm, &dyv, &xph, &mut grad).expect("shape")
                })
            });
            grp.bench_function("im2col/weight_grad", |b| {
                b.iter(|| {
                    im2col(&x, &g, &mut col);
                    sddmm_into(&sm, &dy, &col, g.p(), &mut grad).expect("shape")
                })
            });
            grp.finish();
        }
    }
}

/// The CNN's inference (conv1 dense, conv2/conv3 sparse): one batch-innermost pass vs the
/// layers one by one.
fn bench_stack(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n = 256;
    let geoms: Vec<Conv2dGeom> = [(3, 28, 64), (64, 14, 128), (128, 7, 256)]
        .iter()
        .map(|&(ch, hw, oc)| Conv2dGeom {
            c: ch,
            n,
            h: hw,
            w: hw,
            oc,
            kh: 4,
            kw: 4,
            stride: 2,
            pad: 1,
        })
        .collect();
    let x = random(&mut rng, n * 3 * 28 * 28);
    let mut x_cnhw = vec![0.0f32; x.len()];
    for i in 0..n {
        for ch in 0..3 {
            x_cnhw[(ch * n + i) * 784..][..784].copy_from_slice(&x[(i * 3 + ch) * 784..][..784]);
        }
    }
    let affine: Vec<(Vec<f32>, Vec<f32>)> = geoms
        .iter()
        .map(|g| (random(&mut rng, g.oc), random(&mut rng, g.oc)))
        .collect();
    let w1 = random(&mut rng, geoms[0].w_len());
    for &d in &[0.05, 0.01] {
        let mats: Vec<SparseMatrix> = geoms
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let w = random(&mut rng, g.w_len());
                let p = if i == 0 { 1.0 } else { d };
                let mask: Vec<bool> = (0..g.w_len()).map(|_| rng.random_bool(p)).collect();
                SparseMatrix::from_dense_masked(&w, &mask, g.oc, g.k()).expect("shape")
            })
            .collect();
        let plans: Vec<ConvStackPlan> = mats
            .iter()
            .zip(&geoms)
            .map(|(m, g)| ConvStackPlan::new(m, g).expect("geometry"))
            .collect();
        let stack: Vec<ConvStackLayer> = plans
            .iter()
            .zip(&mats)
            .zip(&affine)
            .map(|((conv, w), (scale, shift))| ConvStackLayer {
                conv,
                w: ConvStackWeights::Sparse(w),
                scale,
                shift,
                relu: true,
            })
            .collect();
        let convs: Vec<SparseConv> = mats[1..]
            .iter()
            .zip(&geoms[1..])
            .map(|(m, g)| SparseConv::new(m, g).expect("geometry"))
            .collect();
        let mut pooled = vec![0.0f32; n * 256];
        let mut grp = c.benchmark_group(format!("stack/cnn/d{d}"));
        grp.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1500));
        grp.bench_function("stack", |b| {
            b.iter(|| {
                conv_stack_pool(&stack, &x, n, [3 * 784, 784, 28, 1], &mut pooled).expect("shape")
            })
        });
        grp.bench_function("layers", |b| {
            b.iter(|| {
                let g = &geoms[0];
                let mut h = vec![0.0f32; g.out_len()];
                rest_kernels::conv2d_fwd_affine(
                    &x_cnhw,
                    &w1,
                    g,
                    &affine[0].0,
                    &affine[0].1,
                    true,
                    &mut h,
                );
                for (i, conv) in convs.iter().enumerate() {
                    let mut xph = vec![0.0f32; conv.phase_len()];
                    conv.pack_input(&h, &mut xph).expect("shape");
                    let (scale, shift) = &affine[i + 1];
                    let mut out = vec![0.0f32; geoms[i + 1].out_len()];
                    conv.forward_affine(&mats[i + 1], &xph, &mut out, Some((scale, shift, true)))
                        .expect("shape");
                    h = out;
                }
                rest_kernels::global_avg_pool_fwd(&h, 256, n, &mut pooled);
            })
        });
        grp.finish();
    }
}

criterion_group!(benches, bench, bench_conv, bench_stack);
criterion_main!(benches);
