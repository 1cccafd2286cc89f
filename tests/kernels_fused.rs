//! The fused convolution + batch norm + ReLU training op against the separate ops it
//! replaces: output, batch statistics and every gradient must be identical (same kernels in
//! the same order), on dense and sparse weights, with and without the dense weight gradient
//! of mask-update steps, and with an input that tracks no gradient (the network's images).
//! The inference op (`conv_bn_eval`, running statistics) likewise against the separate
//! convolution and evaluation-mode batch norm, and the batch-innermost inference stack
//! (`conv_stack_pool_eval`) against the layers one by one and the global average pool.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{loss_grads, rand_mask, rand_t, rand_vec, var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rest::kernels::{
    batch_norm_cnhw_eval, batch_norm_cnhw_train, conv2d_cnhw, conv_bn_eval, conv_bn_maxpool_eval,
    conv_bn_train, conv_stack_applies, conv_stack_pool_eval, global_avg_pool_cnhw, max_pool2d_cnhw,
    sparse_conv2d_cnhw, EvalConvBn, SparseWeight,
};
use std::sync::Arc;

fn same(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (
        a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a"),
        b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b"),
    );
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x == y, "{what}[{i}]: fused {x} vs separate {y}");
    }
}

#[test]
fn fused_conv_bn_relu_equals_the_separate_ops() {
    let mut r = ChaCha8Rng::seed_from_u64(5);
    // (c, n, h, w, oc, k, stride, pad, density or 1 for dense kernels)
    let cases = [
        (3, 4, 28, 28, 8, 4, 2, 1, 1.0),
        (3, 4, 28, 28, 8, 4, 2, 1, 0.3),
        (6, 2, 9, 9, 5, 3, 1, 1, 0.05),
        (4, 3, 7, 7, 9, 4, 2, 1, 1.0),
    ];
    for (case, &(c, n, h, w, oc, k, stride, pad, density)) in cases.iter().enumerate() {
        for (input_tracked, relu) in [(true, true), (false, true), (true, false)] {
            for dense_grad in [false, true] {
                let x = var(&mut r, &[c, n, h, w]);
                let wt = var(&mut r, &[oc, c, k, k]);
                let gamma = Var::from_vec(
                    rand_vec(&mut r, oc).iter().map(|v| 1.0 + v / 2.0).collect(),
                    oc,
                    &Device::Cpu,
                )
                .expect("gamma");
                let beta = var(&mut r, &[oc]);
                let sparse = (density < 1.0).then(|| {
                    let wv = wt
                        .as_tensor()
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>());
                    let m = rand_mask(&mut r, oc * c * k * k, density);
                    let sw: Arc<SparseWeight> =
                        SparseWeight::new(&wv.expect("w"), &m, oc, c * k * k).expect("sparse");
                    sw.set_dense_grad(dense_grad);
                    sw
                });
                let xin = if input_tracked {
                    x.as_tensor().clone()
                } else {
                    x.as_tensor().detach()
                };
                let what = format!(
                    "case {case} (density {density}, input tracked {input_tracked}, dense grad \
                     {dense_grad}, relu {relu})"
                );

                let (yf, mf, vf) = conv_bn_train(
                    &xin,
                    wt.as_tensor(),
                    stride,
                    pad,
                    sparse.as_ref(),
                    gamma.as_tensor(),
                    beta.as_tensor(),
                    1e-5,
                    relu,
                )
                .expect("fused");
                let conv = match &sparse {
                    Some(sw) => sparse_conv2d_cnhw(&xin, wt.as_tensor(), stride, pad, sw),
                    None => conv2d_cnhw(&xin, wt.as_tensor(), stride, pad),
                }
                .expect("conv");
                let (ys, ms, vs) =
                    batch_norm_cnhw_train(&conv, gamma.as_tensor(), beta.as_tensor(), 1e-5, relu)
                        .expect("bn");
                same(&yf, &ys, &format!("{what}: output"));
                same(&mf, &ms, &format!("{what}: mean"));
                same(&vf, &vs, &format!("{what}: var"));

                let rt =
                    Tensor::from_vec(rand_vec(&mut r, yf.elem_count()), yf.dims(), &Device::Cpu)
                        .expect("r");
                let gf = loss_grads(&yf, &rt);
                let gs = loss_grads(&ys, &rt);
                for (v, name) in [(&wt, "dw"), (&gamma, "dgamma"), (&beta, "dbeta")] {
                    let (a, b) = (gf.get(v.as_tensor()), gs.get(v.as_tensor()));
                    same(
                        a.expect("fused grad"),
                        b.expect("separate grad"),
                        &format!("{what}: {name}"),
                    );
                }
                match (gf.get(x.as_tensor()), gs.get(x.as_tensor())) {
                    (Some(a), Some(b)) => same(a, b, &format!("{what}: dx")),
                    (None, None) => assert!(!input_tracked, "{what}: dx missing"),
                    _ => panic!("{what}: dx computed by only one of the two"),
                }
            }
        }
    }
}

#[test]
fn fused_op_rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((3, 2, 8, 8), candle_core::DType::F32, &dev).expect("x");
    let w = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &dev).expect("w");
    let g = Tensor::ones(4, candle_core::DType::F32, &dev).expect("g");
    let b5 = Tensor::zeros(5, candle_core::DType::F32, &dev).expect("b");
    let e = conv_bn_train(&x, &w, 1, 1, None, &g, &b5, 1e-5, true).unwrap_err();
    assert!(e.to_string().contains("beta"), "{e}");
    let w2 = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &dev).expect("w2");
    let e = conv_bn_train(&x, &w2, 1, 1, None, &g, &g, 1e-5, true).unwrap_err();
    assert!(e.to_string().contains("input channels"), "{e}");
    let sw = SparseWeight::new(&[0.0; 8], &[1.0; 8], 4, 2).expect("sparse");
    let e = conv_bn_train(&x, &w, 1, 1, Some(&sw), &g, &g, 1e-5, true).unwrap_err();
    assert!(e.to_string().contains("sparse pattern"), "{e}");
}

#[test]
fn fused_eval_equals_conv_then_eval_batch_norm() {
    let mut r = ChaCha8Rng::seed_from_u64(8);
    // (c, n, h, w, oc, k, stride, pad, density or 1 for dense kernels); the first has many
    // image tiles, the 1x1 convolution needs no im2col.
    let cases = [
        (3, 96, 28, 28, 16, 4, 2, 1, 1.0),
        (3, 4, 28, 28, 8, 4, 2, 1, 0.3),
        (6, 2, 9, 9, 5, 3, 1, 1, 0.05),
        (5, 3, 6, 6, 7, 1, 1, 0, 1.0),
        // A ResNet stem (3 channels, 7x7 stride 2): the direct few-channel forward.
        (3, 5, 32, 30, 17, 7, 2, 3, 1.0),
    ];
    for (case, &(c, n, h, w, oc, k, stride, pad, density)) in cases.iter().enumerate() {
        let x = var(&mut r, &[c, n, h, w]);
        let wt = var(&mut r, &[oc, c, k, k]);
        let gamma = var(&mut r, &[oc]);
        let beta = var(&mut r, &[oc]);
        let dev = &Device::Cpu;
        let rm = Tensor::from_vec(rand_vec(&mut r, oc), oc, dev).expect("rm");
        let rv = Tensor::from_vec(
            rand_vec(&mut r, oc).iter().map(|v| v + 1.0).collect(),
            oc,
            dev,
        )
        .expect("rv");
        let sparse = (density < 1.0).then(|| {
            let wv = wt
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>());
            let m = rand_mask(&mut r, oc * c * k * k, density);
            SparseWeight::new(&wv.expect("w"), &m, oc, c * k * k).expect("sparse")
        });
        let relu = case % 2 == 0;
        let what = format!("eval case {case} (density {density}, relu {relu})");
        let (g, b) = (gamma.as_tensor(), beta.as_tensor());
        let fused = conv_bn_eval(
            x.as_tensor(),
            wt.as_tensor(),
            stride,
            pad,
            sparse.as_ref(),
            g,
            b,
            &rm,
            &rv,
            1e-5,
            relu,
        )
        .expect("fused");
        let conv = match &sparse {
            Some(sw) => sparse_conv2d_cnhw(x.as_tensor(), wt.as_tensor(), stride, pad, sw),
            None => conv2d_cnhw(x.as_tensor(), wt.as_tensor(), stride, pad),
        }
        .expect("conv");
        let sep = batch_norm_cnhw_eval(&conv, g, b, &rm, &rv, 1e-5, relu).expect("bn");
        same(&fused, &sep, &format!("{what}: output"));
        let positive = sep
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v")
            .iter()
            .filter(|&&v| v > 0.0)
            .count();
        assert!(
            positive > 0 && positive < sep.elem_count(),
            "{what}: ReLU not exercised"
        );
        let negative = fused
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v")
            .iter()
            .filter(|&&v| v < 0.0)
            .count();
        assert_eq!(negative == 0, relu, "{what}: {negative} negative outputs");
        // Not differentiable: a backward pass through it fails instead of dropping gradients.
        assert!(
            fused.sum_all().and_then(|t| t.backward()).is_err(),
            "{what}: backward must fail"
        );
    }
    let dev = &Device::Cpu;
    let x = Tensor::zeros((3, 2, 8, 8), candle_core::DType::F32, dev).expect("x");
    let w = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, dev).expect("w");
    let one = Tensor::ones(4, candle_core::DType::F32, dev).expect("one");
    let neg = Tensor::new(&[1.0f32, -1.0, 1.0, 1.0], dev).expect("neg");
    let e = conv_bn_eval(&x, &w, 1, 1, None, &one, &one, &one, &neg, 1e-5, true).unwrap_err();
    assert!(e.to_string().contains("running_var"), "{e}");
    let five = Tensor::ones(5, candle_core::DType::F32, dev).expect("five");
    let e = conv_bn_eval(&x, &w, 1, 1, None, &one, &five, &one, &one, 1e-5, true).unwrap_err();
    assert!(e.to_string().contains("beta"), "{e}");
}

/// The BatchNorm tensors of one inference layer with `oc` channels.
fn bn_params(r: &mut ChaCha8Rng, oc: usize) -> [Tensor; 4] {
    let dev = &Device::Cpu;
    let t = |v: Vec<f32>| Tensor::from_vec(v, oc, dev).expect("bn");
    [
        t(rand_vec(r, oc)),
        t(rand_vec(r, oc)),
        t(rand_vec(r, oc)),
        t(rand_vec(r, oc).iter().map(|v| v + 1.0).collect()),
    ]
}

/// One inference layer of [`eval_stack_equals_the_layers_then_the_pool`].
fn eval_layer<'a>(
    w: &'a Tensor,
    (stride, pad): (usize, usize),
    sparse: Option<&'a Arc<SparseWeight>>,
    bn: &'a [Tensor; 4],
    relu: bool,
) -> EvalConvBn<'a> {
    EvalConvBn {
        w,
        stride,
        pad,
        sparse,
        gamma: &bn[0],
        beta: &bn[1],
        running_mean: &bn[2],
        running_var: &bn[3],
        eps: 1e-5,
        relu,
    }
}

#[test]
fn eval_stack_equals_the_layers_then_the_pool() {
    if rest_kernels::isa::active() != rest_kernels::Isa::Avx512 {
        eprintln!("skipped: the inference stack runs on AVX-512 CPUs only");
        return;
    }
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let dev = &Device::Cpu;
    // (input (c, n, h, w), layers (oc, k, stride, pad, sparse)): REST's CNN (3x3 pooled map:
    // bit for bit) with a dense and a sparse first layer and a batch that is not a multiple
    // of 16, and stride-1 / 1x1 layers with a larger pooled map (summed in another order).
    type Case = (
        (usize, usize, usize, usize),
        Vec<(usize, usize, usize, usize, bool)>,
    );
    let cases: Vec<Case> = vec![
        (
            (3, 37, 28, 28),
            vec![
                (16, 4, 2, 1, false),
                (24, 4, 2, 1, true),
                (32, 4, 2, 1, true),
            ],
        ),
        (
            (3, 16, 28, 28),
            vec![
                (16, 4, 2, 1, true),
                (24, 4, 2, 1, true),
                (32, 4, 2, 1, true),
            ],
        ),
        (
            (2, 5, 13, 11),
            vec![(6, 3, 1, 1, false), (5, 1, 2, 0, true), (7, 3, 1, 1, true)],
        ),
    ];
    for (case, ((c, n, h, w), specs)) in cases.into_iter().enumerate() {
        let xv = rand_vec(&mut r, n * c * h * w);
        let x = Tensor::from_vec(xv, (n, c, h, w), dev).expect("x");
        let mut layers = Vec::new();
        let mut ic = c;
        for &(oc, k, s, p, sparse) in &specs {
            let wv = rand_vec(&mut r, oc * ic * k * k);
            let m = rand_mask(&mut r, wv.len(), 0.15);
            let sw = sparse.then(|| SparseWeight::new(&wv, &m, oc, ic * k * k).expect("sw"));
            let wm: Vec<f32> = match sparse {
                true => wv.iter().zip(&m).map(|(a, b)| a * b).collect(),
                false => wv,
            };
            let wt = Tensor::from_vec(wm, (oc, ic, k, k), dev).expect("w");
            layers.push((wt, (s, p), sw, bn_params(&mut r, oc)));
            ic = oc;
        }
        let args: Vec<EvalConvBn> = layers
            .iter()
            .map(|(w, sp, sw, bn)| eval_layer(w, *sp, sw.as_ref(), bn, true))
            .collect();
        let mut h_ = x
            .permute((1, 0, 2, 3))
            .and_then(|t| t.contiguous())
            .expect("cnhw");
        for a in &args {
            h_ = a.apply(&h_).expect("layer");
        }
        let want = global_avg_pool_cnhw(&h_).expect("pool");
        let pooled_hw = h_.dim(2).expect("h") * h_.dim(3).expect("w");
        // NCHW, and the feature-major view ([C][H][W][N] memory) of the same images.
        let fm = x
            .permute((1, 2, 3, 0))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.permute((3, 0, 1, 2)))
            .expect("feature-major");
        for input in [&x, &fm] {
            assert!(conv_stack_applies(input, &args), "case {case}");
            let got = conv_stack_pool_eval(input, &args).expect("stack");
            assert_eq!(got.dims(), want.dims(), "case {case}");
            if pooled_hw < 16 {
                same(&got, &want, &format!("stack case {case}"));
            } else {
                let diff = (&got - &want)
                    .and_then(|d| d.abs())
                    .and_then(|d| d.max_all())
                    .and_then(|d| d.to_scalar::<f32>())
                    .expect("diff");
                assert!(diff < 1e-4, "stack case {case}: max difference {diff}");
            }
        }
        // A dense layer after the first: its rows are long (the reference's blocked GEMM sums
        // them in another order), so equal within rounding.
        let dense_later: Vec<EvalConvBn> = layers
            .iter()
            .enumerate()
            .map(|(i, (w, sp, sw, bn))| {
                eval_layer(w, *sp, sw.as_ref().filter(|_| i != 1), bn, true)
            })
            .collect();
        assert!(conv_stack_applies(&x, &dense_later), "case {case}");
        let mut h_ = x
            .permute((1, 0, 2, 3))
            .and_then(|t| t.contiguous())
            .expect("cnhw");
        for a in &dense_later {
            h_ = a.apply(&h_).expect("layer");
        }
        let want = global_avg_pool_cnhw(&h_).expect("pool");
        let got = conv_stack_pool_eval(&x, &dense_later).expect("stack");
        let diff = (&got - &want)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        let scale = want
            .abs()
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("scale");
        assert!(
            diff <= 1e-4 * (1.0 + scale),
            "dense-later case {case}: difference {diff}"
        );
    }
}

/// Images too large for one group's activations to stay in cache run layer by layer: REST's
/// CNN at 128x128 (about 35 MiB per group), not at 28x28 or 32x32.
#[test]
fn large_images_run_layer_by_layer() {
    if rest_kernels::isa::active() != rest_kernels::Isa::Avx512 {
        return;
    }
    let mut r = ChaCha8Rng::seed_from_u64(10);
    let dev = &Device::Cpu;
    let specs = [(3, 64), (64, 128), (128, 256)];
    let ws: Vec<Tensor> = specs
        .iter()
        .map(|&(ic, oc)| Tensor::zeros((oc, ic, 4, 4), candle_core::DType::F32, dev).expect("w"))
        .collect();
    let bns: Vec<[Tensor; 4]> = specs.iter().map(|&(_, oc)| bn_params(&mut r, oc)).collect();
    let args: Vec<EvalConvBn> = ws
        .iter()
        .zip(&bns)
        .map(|(w, bn)| eval_layer(w, (2, 1), None, bn, true))
        .collect();
    for (hw, applies) in [(28, true), (32, true), (128, false)] {
        let x = Tensor::zeros((2, 3, hw, hw), candle_core::DType::F32, dev).expect("x");
        assert_eq!(conv_stack_applies(&x, &args), applies, "{hw}x{hw}");
    }
}

/// The stem's inference op (conv + folded BatchNorm + ReLU + max pool) equals `conv_bn_eval`
/// then `max_pool2d_cnhw` bit for bit (a ResNet stem at 32 px, the direct kernel's pooled
/// tiles; a 3x3 layer it does not take); a sparse layer is left to the separate ops.
#[test]
fn stem_maxpool_eval_equals_the_two_ops() {
    let mut r = ChaCha8Rng::seed_from_u64(31);
    for &(c, n, hw, oc, k, stride, pad) in &[(3, 6, 32, 16, 7, 2, 3), (8, 2, 12, 5, 3, 1, 1)] {
        let x = rand_t(&mut r, &[c, n, hw, hw]);
        let w = rand_t(&mut r, &[oc, c, k, k]);
        let [g, b, rm, rv] = bn_params(&mut r, oc);
        let layer = EvalConvBn {
            w: &w,
            stride,
            pad,
            sparse: None,
            gamma: &g,
            beta: &b,
            running_mean: &rm,
            running_var: &rv,
            eps: 1e-5,
            relu: true,
        };
        let fused = conv_bn_maxpool_eval(&x, &layer, (3, 2, 1))
            .expect("op")
            .expect("a dense layer is fused");
        let sep = max_pool2d_cnhw(&layer.apply(&x).expect("conv"), 3, 2, 1).expect("pool");
        assert_eq!(fused.dims(), sep.dims());
        same(&fused, &sep, &format!("stem {c}x{hw}x{hw} -> {oc}"));
        // A pooling window larger than the padded output is an error naming the op.
        let e = conv_bn_maxpool_eval(&x, &layer, (40, 2, 1)).unwrap_err();
        assert!(e.to_string().contains("conv_bn_maxpool_eval"), "{e}");
    }
    let sw = SparseWeight::new(&[0.5; 27], &[1.0; 27], 1, 27).expect("sparse");
    let (x, w) = (rand_t(&mut r, &[3, 2, 8, 8]), rand_t(&mut r, &[1, 3, 3, 3]));
    let [g, b, rm, rv] = bn_params(&mut r, 1);
    let layer = EvalConvBn {
        w: &w,
        stride: 1,
        pad: 1,
        sparse: Some(&sw),
        gamma: &g,
        beta: &b,
        running_mean: &rm,
        running_var: &rv,
        eps: 1e-5,
        relu: true,
    };
    assert!(conv_bn_maxpool_eval(&x, &layer, (3, 2, 1))
        .expect("op")
        .is_none());
}
