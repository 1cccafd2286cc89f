//! The candle glue in `rest::kernels` against candle's own operations: forward values and
//! gradients (from `loss = sum(y * r)` with a random `r`) of convolution, batch norm (train and
//! eval, with and without fused ReLU), pooling and linear layers, plus argument validation.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{assert_close, cnhw, loss_grads, rand_t, rand_t_in, var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rest::kernels::*;

#[test]
fn conv2d_cnhw_matches_candle_conv2d_and_its_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // (c, n, h, w, oc, k, stride, pad)
    let cases = [
        (3, 4, 28, 28, 8, 4, 2, 1),
        (8, 2, 7, 7, 6, 4, 2, 1),
        (5, 1, 9, 8, 4, 3, 1, 1),
        (6, 3, 5, 7, 5, 1, 1, 0),
        (3, 2, 15, 13, 4, 7, 2, 3),
        (4, 2, 9, 9, 3, 1, 2, 0),
    ];
    for (case, &(c, n, h, w, oc, k, stride, pad)) in cases.iter().enumerate() {
        let x = var(&mut rng, &[n, c, h, w]);
        let wt = var(&mut rng, &[oc, c, k, k]);
        let want = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
        // The permuted (non-contiguous) input exercises the contiguity handling.
        let got = cnhw(&conv2d_cnhw(&cnhw(&x), &wt, stride, pad).unwrap());
        assert_close(&got, &want, &format!("conv fwd case {case}"));
        let r = rand_t(&mut rng, want.dims());
        let gw = loss_grads(&want, &r);
        let gg = loss_grads(&got, &r);
        for (t, name) in [(x.as_tensor(), "dx"), (wt.as_tensor(), "dw")] {
            assert_close(
                gg.get(t).expect("grad"),
                gw.get(t).expect("grad"),
                &format!("conv {name} case {case}"),
            );
        }
    }
    // A constant input gets no gradient; the weight gradient is still right.
    let x = rand_t(&mut rng, &[3, 2, 8, 8]);
    let wt = var(&mut rng, &[4, 3, 3, 3]);
    let y = conv2d_cnhw(&x, &wt, 1, 1).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    let want = cnhw(&x).conv2d(&wt, 1, 1, 1, 1).unwrap();
    let gw = want.sum_all().unwrap().backward().unwrap();
    assert_close(
        g.get(&wt).unwrap(),
        gw.get(&wt).unwrap(),
        "conv dw (const x)",
    );
}

fn channel_view(v: &Tensor) -> Tensor {
    v.reshape((v.dim(0).unwrap(), 1, 1, 1)).unwrap()
}

#[test]
fn batch_norm_train_matches_formula_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (case, &(c, n, h, w, relu)) in [
        (4, 8, 5, 5, false),
        (4, 8, 5, 5, true),
        (3, 1, 7, 3, true),
        (16, 32, 3, 3, false),
    ]
    .iter()
    .enumerate()
    {
        let x = Var::from_tensor(&rand_t_in(&mut rng, &[c, n, h, w], 1.0, 4.0)).unwrap();
        let gamma = var(&mut rng, &[c]);
        let beta = var(&mut rng, &[c]);
        let eps = 1e-5;
        let (y, mean, bvar) = batch_norm_cnhw_train(&x, &gamma, &beta, eps, relu).unwrap();
        // Reference from candle ops (CNHW: statistics over dims 1..4).
        let xf = x.flatten_from(1).unwrap();
        let mu = xf.mean_keepdim(D::Minus1).unwrap();
        let xc = xf.broadcast_sub(&mu).unwrap();
        let v = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xhat = xc
            .broadcast_div(&(&v + eps).unwrap().sqrt().unwrap())
            .unwrap();
        let mut want = xhat
            .broadcast_mul(&gamma.reshape((c, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((c, 1)).unwrap())
            .unwrap()
            .reshape((c, n, h, w))
            .unwrap();
        if relu {
            want = want.relu().unwrap();
        }
        assert_close(&y, &want, &format!("bn y case {case}"));
        assert_close(&mean, &mu.flatten_all().unwrap(), "bn mean");
        assert_close(&bvar, &v.flatten_all().unwrap(), "bn var");
        let r = rand_t(&mut rng, &[c, n, h, w]);
        let gw = loss_grads(&want, &r);
        let gg = loss_grads(&y, &r);
        for (t, name) in [
            (x.as_tensor(), "dx"),
            (gamma.as_tensor(), "dgamma"),
            (beta.as_tensor(), "dbeta"),
        ] {
            assert_close(
                gg.get(t).unwrap(),
                gw.get(t).unwrap(),
                &format!("bn {name} case {case}"),
            );
        }
    }
}

#[test]
fn batch_norm_eval_matches_formula_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for relu in [false, true] {
        let (c, n, h, w) = (5, 3, 4, 6);
        let x = var(&mut rng, &[c, n, h, w]);
        let gamma = var(&mut rng, &[c]);
        let beta = var(&mut rng, &[c]);
        let rm = rand_t_in(&mut rng, &[c], -0.5, 0.5);
        let rv = rand_t_in(&mut rng, &[c], 0.5, 2.0);
        let y = batch_norm_cnhw_eval(&x, &gamma, &beta, &rm, &rv, 1e-5, relu).unwrap();
        let sd = (&rv + 1e-5).unwrap().sqrt().unwrap();
        let mut want = x
            .broadcast_sub(&channel_view(&rm))
            .unwrap()
            .broadcast_div(&channel_view(&sd))
            .unwrap()
            .broadcast_mul(&channel_view(&gamma))
            .unwrap()
            .broadcast_add(&channel_view(&beta))
            .unwrap();
        if relu {
            want = want.relu().unwrap();
        }
        assert_close(&y, &want, "bn eval y");
        let r = rand_t(&mut rng, &[c, n, h, w]);
        let gw = loss_grads(&want, &r);
        let gg = loss_grads(&y, &r);
        for t in [x.as_tensor(), gamma.as_tensor(), beta.as_tensor()] {
            assert_close(gg.get(t).unwrap(), gw.get(t).unwrap(), "bn eval grad");
        }
    }
}

#[test]
fn global_avg_pool_matches_mean_and_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let x = var(&mut rng, &[6, 4, 3, 5]);
    let got = global_avg_pool_cnhw(&x).unwrap();
    let want = x.mean((2, 3)).unwrap().t().unwrap();
    assert_eq!(got.dims(), &[4, 6]);
    assert_close(&got, &want, "gap fwd");
    let r = rand_t(&mut rng, &[4, 6]);
    let gw = loss_grads(&want, &r);
    let gg = loss_grads(&got, &r);
    assert_close(gg.get(&x).unwrap(), gw.get(&x).unwrap(), "gap grad");
}

#[test]
fn max_pool_matches_candle_and_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for &(k, stride, pad) in &[(3, 2, 1), (2, 2, 0), (3, 1, 1)] {
        // Positive inputs: candle's zero padding then never wins, matching -inf padding.
        let x = Var::from_tensor(&rand_t_in(&mut rng, &[3, 2, 9, 10], 0.1, 1.0)).unwrap();
        let got = max_pool2d_cnhw(&cnhw(&x), k, stride, pad).unwrap();
        let want = cnhw(
            &x.pad_with_zeros(2, pad, pad)
                .unwrap()
                .pad_with_zeros(3, pad, pad)
                .unwrap()
                .max_pool2d_with_stride(k, stride)
                .unwrap(),
        );
        assert_close(&got, &want, "maxpool fwd");
        let r = rand_t(&mut rng, want.dims());
        let gg = loss_grads(&got, &r);
        // candle's max-pool backward needs k == stride (and maps gradients wrongly when the
        // input size is not a multiple of k), so the reference gradient is a direct scan: each
        // output's r goes to the (unique: random inputs) maximum of its window.
        let want_grad = {
            let (n, c, h, w) = x.dims4().unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let rv: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap(); // CNHW
            let (oh, ow) = (want.dim(2).unwrap(), want.dim(3).unwrap());
            let mut dx = vec![0.0f32; xv.len()];
            for b in 0..n {
                for ch in 0..c {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let mut best = (f32::NEG_INFINITY, 0);
                            for i in 0..k {
                                for j in 0..k {
                                    let iy = (oy * stride + i) as isize - pad as isize;
                                    let ix = (ox * stride + j) as isize - pad as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let t = ((b * c + ch) * h + iy as usize) * w + ix as usize;
                                    if xv[t] > best.0 {
                                        best = (xv[t], t);
                                    }
                                }
                            }
                            dx[best.1] += rv[((ch * n + b) * oh + oy) * ow + ox];
                        }
                    }
                }
            }
            Tensor::from_vec(dx, (n, c, h, w), &Device::Cpu).unwrap()
        };
        assert_close(gg.get(&x).unwrap(), &want_grad, "maxpool grad");
    }
}

#[test]
fn linear_matches_matmul_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    for &(n, i, o, bias) in &[
        (7, 13, 5, true),
        (256, 256, 10, true),
        (3, 2352, 100, false),
    ] {
        let x = var(&mut rng, &[n, i]);
        let w = var(&mut rng, &[o, i]);
        let b = var(&mut rng, &[o]);
        let got = linear(&x, &w, bias.then_some(b.as_tensor())).unwrap();
        let mut want = x.matmul(&w.t().unwrap()).unwrap();
        if bias {
            want = want.broadcast_add(&b).unwrap();
        }
        assert_close(&got, &want, "linear fwd");
        let r = rand_t(&mut rng, &[n, o]);
        let gw = loss_grads(&want, &r);
        let gg = loss_grads(&got, &r);
        let mut ts = vec![x.as_tensor(), w.as_tensor()];
        if bias {
            ts.push(b.as_tensor());
        } else {
            assert!(gg.get(&b).is_none());
        }
        for t in ts {
            assert_close(gg.get(t).unwrap(), gw.get(t).unwrap(), "linear grad");
        }
    }
}

#[test]
fn invalid_arguments_give_clear_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((3, 2, 8, 8), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((4, 5, 3, 3), DType::F32, &dev).unwrap();
    let e = conv2d_cnhw(&x, &w, 1, 1).unwrap_err().to_string();
    assert!(e.contains("input channels"), "{e}");
    let w3 = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
    let e = conv2d_cnhw(&x, &w3, 0, 1).unwrap_err();
    assert!(format!("{e:#}").contains("stride"), "{e:#}");
    let e = conv2d_cnhw(&x.to_dtype(DType::F64).unwrap(), &w3, 1, 1).unwrap_err();
    assert!(e.to_string().contains("f32"), "{e}");
    let g = Tensor::ones(5, DType::F32, &dev).unwrap();
    let e = batch_norm_cnhw_train(&x, &g, &g, 1e-5, false).unwrap_err();
    assert!(e.to_string().contains("channels"), "{e}");
    let e = max_pool2d_cnhw(&x, 2, 2, 2).unwrap_err();
    assert!(format!("{e:#}").contains("padding"), "{e:#}");
    let e = linear(
        &x.flatten_from(1).unwrap(),
        &w3.flatten_from(1).unwrap(),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("input features"), "{e}");
}
