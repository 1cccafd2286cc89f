//! Criterion benchmarks of the dense kernels at the shapes of REST's Colored-MNIST CNN
//! (batch 256, CNHW): the three 4x4 stride-2 convolutions (forward, input gradient, weight
//! gradient), their batch norms, and the classifier / MLP linear layers; pooling at the shape
//! of ResNet18's stem at 128 px (max pooling 3x3 stride 2 of 64 x 64 x 64 x 64) and of its
//! last stage (global average pooling).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rest_kernels::*;

fn filled(n: usize, seed: u32) -> Vec<f32> {
    // Cheap deterministic pseudo-random values in [-1, 1).
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

fn cnn_layers() -> [(&'static str, Conv2dGeom); 3] {
    let g = |c, h, oc| Conv2dGeom {
        c,
        n: 256,
        h,
        w: h,
        oc,
        kh: 4,
        kw: 4,
        stride: 2,
        pad: 1,
    };
    [
        ("conv1_3x28x28_64", g(3, 28, 64)),
        ("conv2_64x14x14_128", g(64, 14, 128)),
        ("conv3_128x7x7_256", g(128, 7, 256)),
    ]
}

fn conv(c: &mut Criterion) {
    let mut grp = c.benchmark_group("conv");
    grp.sample_size(20);
    for (name, g) in cnn_layers() {
        let x = filled(g.x_len(), 1);
        let w = filled(g.w_len(), 2);
        let dout = filled(g.out_len(), 3);
        let mut col = vec![0.0; g.col_len()];
        let mut out = vec![0.0; g.out_len()];
        let mut dx = vec![0.0; g.x_len()];
        let mut dw = vec![0.0; g.w_len()];
        grp.bench_function(BenchmarkId::new("im2col", name), |b| {
            b.iter(|| im2col(&x, &g, &mut col))
        });
        grp.bench_function(BenchmarkId::new("fwd", name), |b| {
            b.iter(|| conv2d_fwd(&x, &w, &g, &mut out))
        });
        grp.bench_function(BenchmarkId::new("bwd_input", name), |b| {
            b.iter(|| conv2d_bwd_input(&w, &dout, &g, &mut dx))
        });
        grp.bench_function(BenchmarkId::new("bwd_weight", name), |b| {
            b.iter(|| conv2d_bwd_weight(&x, &dout, &g, &mut dw))
        });
        im2col(&x, &g, &mut col);
        grp.bench_function(BenchmarkId::new("bwd_weight_col", name), |b| {
            b.iter(|| conv2d_bwd_weight_col(&col, &dout, &g, &mut dw))
        });
        let (gamma, beta) = (filled(g.oc, 4), filled(g.oc, 5));
        let mut y = vec![0.0; g.out_len()];
        grp.bench_function(BenchmarkId::new("bn_relu_fwd", name), |b| {
            b.iter(|| batch_norm_train_fwd(&dout, &gamma, &beta, BN_EPS, true, &mut y))
        });
        let stats = batch_norm_train_fwd(&dout, &gamma, &beta, BN_EPS, true, &mut y);
        let mut dbn = vec![0.0; g.out_len()];
        grp.bench_function(BenchmarkId::new("bn_relu_bwd", name), |b| {
            b.iter(|| batch_norm_bwd(&dout, &out, &gamma, Some(&beta), &stats, BN_EPS, &mut dbn))
        });
    }
    grp.finish();
}

fn linear(c: &mut Criterion) {
    let mut grp = c.benchmark_group("linear");
    grp.sample_size(30);
    for (name, n, i, o) in [
        ("cnn_head_256x256_10", 256, 256, 10),
        ("mlp_in_256x2352_100", 256, 2352, 100),
    ] {
        let x = filled(n * i, 1);
        let w = filled(o * i, 2);
        let bias = filled(o, 3);
        let dy = filled(n * o, 4);
        let mut y = vec![0.0; n * o];
        let mut dx = vec![0.0; n * i];
        let mut dw = vec![0.0; o * i];
        grp.bench_function(BenchmarkId::new("fwd", name), |b| {
            b.iter(|| linear_fwd(&x, &w, Some(&bias), n, i, o, &mut y))
        });
        grp.bench_function(BenchmarkId::new("bwd_input", name), |b| {
            b.iter(|| linear_bwd_input(&dy, &w, n, i, o, &mut dx))
        });
        grp.bench_function(BenchmarkId::new("bwd_weight", name), |b| {
            b.iter(|| linear_bwd_weight(&dy, &x, n, i, o, &mut dw))
        });
    }
    grp.finish();
}

fn pool(c: &mut Criterion) {
    let mut grp = c.benchmark_group("pool");
    grp.sample_size(20);
    let g = MaxPool2dGeom {
        c: 64,
        n: 64,
        h: 64,
        w: 64,
        k: 3,
        stride: 2,
        pad: 1,
    };
    let x = filled(g.x_len(), 11);
    let (mut out, mut idx) = (vec![0.0; g.out_len()], vec![0u32; g.out_len()]);
    grp.bench_function("max_pool_fwd_resnet18_stem_128px", |b| {
        b.iter(|| max_pool2d_fwd(&x, &g, &mut out, &mut idx))
    });
    let dout = filled(g.out_len(), 12);
    let mut dx = vec![0.0; g.x_len()];
    grp.bench_function("max_pool_bwd_resnet18_stem_128px", |b| {
        b.iter(|| max_pool2d_bwd(&dout, &idx, &g, &mut dx))
    });
    // At 32 px the stem pool's output rows are 8 wide (the across-rows path).
    let g32 = MaxPool2dGeom { h: 16, w: 16, ..g };
    let x32 = filled(g32.x_len(), 14);
    let (mut out32, mut idx32) = (vec![0.0; g32.out_len()], vec![0u32; g32.out_len()]);
    grp.bench_function("max_pool_fwd_resnet18_stem_32px", |b| {
        b.iter(|| max_pool2d_fwd(&x32, &g32, &mut out32, &mut idx32))
    });
    let (ch, n, hw) = (512, 64, 16);
    let x = filled(ch * n * hw, 13);
    let mut y = vec![0.0; ch * n];
    grp.bench_function("global_avg_pool_fwd_512x64x4x4", |b| {
        b.iter(|| global_avg_pool_fwd(&x, ch, n, &mut y))
    });
    grp.finish();
}

criterion_group!(benches, conv, linear, pool);
criterion_main!(benches);
