//! The instruction-set override (`rest_kernels::isa`): with the level forced to `portable`
//! the main kernels take no AVX-512/AVX2 path and still compute what they compute with the
//! detected level (bit for bit where both sum in the same order, else within float
//! rounding). One test in its own binary: setting the level is process-wide.

use rest_kernels::gather::RowGather;
use rest_kernels::isa::{self, Isa};
use rest_kernels::sparse::{sddmm, spmm, spmm_rows, spmm_t, SparseConv, SparseMatrix};
use rest_kernels::{
    batch_norm_train_fwd, conv2d_bwd_input, conv2d_bwd_weight, conv2d_fwd, conv_stack_pool,
    global_avg_pool_fwd, layout, max_pool2d_fwd, Conv2dGeom, ConvStackLayer, ConvStackPlan,
    ConvStackWeights, MaxPool2dGeom,
};

fn vals(seed: u32, n: usize) -> Vec<f32> {
    (0..n as u32)
        .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn mask(seed: u32, n: usize, keep_per_mille: u32) -> Vec<bool> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) ^ seed) % 1000 < keep_per_mille)
        .collect()
}

/// Every kernel output of one run, by name.
fn run_all() -> Vec<(&'static str, Vec<f32>)> {
    let mut out = Vec::new();
    // Dense convolution (im2col with row gathers, GEMM) forward and backward, stride 2.
    let g = Conv2dGeom {
        c: 3,
        n: 5,
        h: 14,
        w: 14,
        oc: 8,
        kh: 4,
        kw: 4,
        stride: 2,
        pad: 1,
    };
    let x = vals(1, g.c * g.n * g.h * g.w);
    let w = vals(2, g.w_len());
    let mut y = vec![0.0; g.out_len()];
    conv2d_fwd(&x, &w, &g, &mut y);
    let mut dw = vec![0.0; g.w_len()];
    conv2d_bwd_weight(&x, &y, &g, &mut dw);
    let mut dx = vec![0.0; x.len()];
    conv2d_bwd_input(&w, &y, &g, &mut dx);
    out.push(("conv2d_fwd", y.clone()));
    out.push(("conv2d_bwd_weight", dw));
    out.push(("conv2d_bwd_input", dx));
    // Batch norm (+ ReLU), pooling.
    let (gamma, beta) = (vals(3, g.oc), vals(4, g.oc));
    let mut bn = vec![0.0; y.len()];
    batch_norm_train_fwd(&y, &gamma, &beta, 1e-5, true, &mut bn);
    out.push(("batch_norm_train_fwd", bn.clone()));
    let pg = MaxPool2dGeom {
        c: g.oc,
        n: g.n,
        h: g.oh(),
        w: g.ow(),
        k: 2,
        stride: 2,
        pad: 0,
    };
    let (mut mp, mut idx) = (vec![0.0; pg.out_len()], vec![0u32; pg.out_len()]);
    max_pool2d_fwd(&bn, &pg, &mut mp, &mut idx);
    out.push(("max_pool2d_fwd", mp));
    out.push((
        "max_pool2d_fwd idx",
        idx.iter().map(|&v| v as f32).collect(),
    ));
    let mut gap = vec![0.0; g.oc * g.n];
    global_avg_pool_fwd(&bn, g.oc, g.n, &mut gap);
    out.push(("global_avg_pool_fwd", gap));
    // Sparse products, feature-major and batch-major.
    let (r, k, p) = (24, 40, 37);
    let wd = vals(5, r * k);
    let sm = SparseMatrix::from_dense_masked(&wd, &mask(6, r * k, 300), r, k).unwrap();
    let xs = vals(7, k * p);
    let mut ys = vec![0.0; r * p];
    spmm(&sm, &xs, p, &mut ys).unwrap();
    let mut dxs = vec![0.0; k * p];
    spmm_t(&sm, &ys, p, &mut dxs).unwrap();
    let gs = sddmm(&sm, &ys, &xs, p).unwrap();
    let xb = vals(8, p * k);
    let mut yb = vec![0.0; p * r];
    spmm_rows(&sm, &xb, p, &mut yb).unwrap();
    out.push(("spmm", ys));
    out.push(("spmm_t", dxs));
    out.push(("sddmm", gs));
    out.push(("spmm_rows", yb));
    // The polyphase sparse convolution (plan built under the active level).
    let g2 = Conv2dGeom {
        c: 8,
        n: 5,
        h: 6,
        w: 6,
        oc: 6,
        kh: 3,
        kw: 3,
        stride: 2,
        pad: 1,
    };
    let w2 = SparseMatrix::from_dense_masked(
        &vals(9, g2.w_len()),
        &mask(10, g2.w_len(), 400),
        g2.oc,
        g2.k(),
    )
    .unwrap();
    let conv = SparseConv::new(&w2, &g2).unwrap();
    let mut xph = vec![0.0; conv.phase_len()];
    conv.pack_input(&bn[..g2.c * g2.n * g2.h * g2.w], &mut xph)
        .unwrap();
    let mut y2 = vec![0.0; g2.out_len()];
    conv.forward(&w2, &xph, &mut y2).unwrap();
    out.push(("sparse conv forward", y2));
    // The inference stack: a dense layer, then a sparse one, then the pool.
    let (n, c0, hw) = (20, 3, 12);
    let ga = Conv2dGeom {
        c: c0,
        n,
        h: hw,
        w: hw,
        oc: 8,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    let gb = Conv2dGeom {
        c: 8,
        n,
        h: ga.oh(),
        w: ga.ow(),
        oc: 6,
        kh: 3,
        kw: 3,
        stride: 2,
        pad: 1,
    };
    let wa = vals(11, ga.w_len());
    let wb = SparseMatrix::from_dense_masked(
        &vals(12, gb.w_len()),
        &mask(13, gb.w_len(), 300),
        gb.oc,
        gb.k(),
    )
    .unwrap();
    let (pa, pb) = (
        ConvStackPlan::dense(&ga).unwrap(),
        ConvStackPlan::new(&wb, &gb).unwrap(),
    );
    let (sa, ha, sb, hb) = (vals(14, 8), vals(15, 8), vals(16, 6), vals(17, 6));
    let layers = [
        ConvStackLayer {
            conv: &pa,
            w: ConvStackWeights::Dense(&wa),
            scale: &sa,
            shift: &ha,
            relu: true,
        },
        ConvStackLayer {
            conv: &pb,
            w: ConvStackWeights::Sparse(&wb),
            scale: &sb,
            shift: &hb,
            relu: true,
        },
    ];
    let xi = vals(18, n * c0 * hw * hw);
    let mut pooled = vec![0.0; n * 6];
    let st = [c0 * hw * hw, hw * hw, hw, 1];
    conv_stack_pool(&layers, &xi, n, st, &mut pooled).unwrap();
    out.push(("conv_stack_pool", pooled));
    out
}

#[test]
fn portable_matches_the_detected_level() {
    let detected = isa::active();
    let want = run_all();
    let avx512 = detected == Isa::Avx512;
    assert_eq!(RowGather::new(7, 14, 2, 0, 1).is_some(), avx512);

    assert_eq!(isa::set_active(Isa::Portable), detected);
    assert_eq!(isa::active(), Isa::Portable);
    // No AVX-512 plan or pass is taken.
    assert!(RowGather::new(7, 14, 2, 0, 1).is_none());
    let images: Vec<u8> = (0..32 * 12).map(|v| v as u8).collect();
    let lut = vec![[0.5f32; 256]; 3];
    let mut fm = vec![0.0; 32 * 12];
    let samples: Vec<usize> = (0..32).collect();
    let written =
        layout::bytes_to_feature_major(&images, &samples, (4, 3), None, &lut, &mut fm, 32);
    assert_eq!(written, 0);
    let got = run_all();
    isa::set_active(detected);

    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert_eq!(a.len(), b.len(), "{name}");
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                "{name}[{i}]: {x} with {detected:?}, {y} portable"
            );
        }
    }
}
