//! The fused MLP layer ops: `sparse_linear_act` and `linear_act` (`relu(x W^T + b)` in one
//! candle op) against candle's own matmul, broadcast add and ReLU on the masked weight:
//! forward values and the gradients of the input, weight and bias; the compact sparse weight
//! gradient with and without the packed input (`train`), which must agree bit for bit. The
//! feature-major `linear_fm` (dense and sparse, every gradient mode, both output layouts)
//! against the same references, and the MLP on feature-major batches against NCHW ones.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{assert_close, flat, loss_grads, rand_mask, rand_vec, var, RTOL};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rest::kernels::{feature_major, linear_act, linear_fm, sparse_linear_act, SparseWeight};

#[test]
fn sparse_linear_act_matches_candle_ops_on_the_masked_weight() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    // (n, in, out, density): batch-major kernels with partial 16-sample blocks, and one case
    // dense enough for the feature-major path.
    for &(n, i, o, d) in &[
        (40, 2352, 100, 0.01),
        (33, 100, 100, 0.02),
        (5, 7, 3, 0.5),
        (20, 30, 12, 0.9),
    ] {
        let mk = rand_mask(&mut rng, o * i, d);
        let x = var(&mut rng, &[n, i]);
        let w = var(&mut rng, &[o, i]);
        let b = var(&mut rng, &[o]);
        let wv = flat(w.as_tensor());
        let masked: Vec<f32> = wv.iter().zip(&mk).map(|(a, m)| a * m).collect();
        let wm = Var::from_vec(masked, (o, i), &Device::Cpu).expect("var");
        for relu in [false, true] {
            let what = format!("n={n} {o}x{i} d={d} relu={relu}");
            let lin = x
                .matmul(&wm.t().expect("t"))
                .and_then(|t| t.broadcast_add(&b))
                .expect("ref");
            let want = if relu { lin.relu().expect("relu") } else { lin };
            let r = Tensor::from_vec(rand_vec(&mut rng, n * o), (n, o), &Device::Cpu).expect("r");
            let gref = loss_grads(&want, &r);
            let dw_ref = flat(gref.get(&wm).expect("dw"));

            let sw = SparseWeight::new(&wv, &mk, o, i).expect("sparse weight");
            // Dense-layout gradient (zero outside the pattern).
            let got = sparse_linear_act(&x, &w, Some(&b), relu, true, &sw).expect("op");
            assert_close(&got, &want, &format!("{what}: forward"));
            let g = loss_grads(&got, &r);
            assert_close(g.get(&x).expect("dx"), gref.get(&x).expect("dx"), &what);
            assert_close(g.get(&b).expect("db"), gref.get(&b).expect("db"), &what);
            let dw = flat(g.get(&w).expect("dw"));
            for (e, (&a, &m)) in dw.iter().zip(&mk).enumerate() {
                if m == 0.0 {
                    assert_eq!(a, 0.0, "{what}: dw[{e}] outside the pattern");
                } else {
                    assert!((a - dw_ref[e]).abs() <= RTOL * 10.0, "{what}: dw[{e}]");
                }
            }
            // Compact gradient, with the packed input (train) and without: bit-identical,
            // and equal to the reference at the active positions.
            sw.set_compact_grad(true);
            let mut compact = Vec::new();
            for train in [true, false] {
                let got = sparse_linear_act(&x, &w, Some(&b), relu, train, &sw).expect("op");
                let g = loss_grads(&got, &r);
                assert!(
                    g.get(&w).is_none(),
                    "{what}: candle got a dense weight gradient"
                );
                let (index, vals) = sw.take_grad().expect("compact gradient");
                for (&k, &v) in index.iter().zip(&vals) {
                    assert_eq!(mk[k], 1.0, "{what}: gradient at inactive {k}");
                    assert!(
                        (v - dw_ref[k]).abs() <= RTOL * 10.0,
                        "{what}: compact dw[{k}]"
                    );
                }
                compact.push(vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
            assert_eq!(
                compact[0], compact[1],
                "{what}: packed vs unpacked gradient"
            );
        }
    }
}

#[test]
fn linear_act_matches_candle_ops() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for &(n, i, o) in &[(17, 50, 20), (1, 3, 1), (64, 300, 100)] {
        let x = var(&mut rng, &[n, i]);
        let w = var(&mut rng, &[o, i]);
        let b = var(&mut rng, &[o]);
        for (relu, bias) in [(true, true), (true, false), (false, true)] {
            let what = format!("n={n} {o}x{i} relu={relu} bias={bias}");
            let mut lin = x.matmul(&w.t().expect("t")).expect("matmul");
            if bias {
                lin = lin.broadcast_add(&b).expect("add");
            }
            let want = if relu { lin.relu().expect("relu") } else { lin };
            let r = Tensor::from_vec(rand_vec(&mut rng, n * o), (n, o), &Device::Cpu).expect("r");
            let gref = loss_grads(&want, &r);
            let bt = bias.then(|| b.as_tensor());
            let got = linear_act(&x, &w, bt, relu).expect("op");
            assert_close(&got, &want, &format!("{what}: forward"));
            if relu && n * o > 100 {
                assert!(flat(&got).contains(&0.0), "{what}: no ReLU zeros");
            }
            let g = loss_grads(&got, &r);
            assert_close(g.get(&x).expect("dx"), gref.get(&x).expect("dx"), &what);
            assert_close(g.get(&w).expect("dw"), gref.get(&w).expect("dw"), &what);
            if bias {
                assert_close(g.get(&b).expect("db"), gref.get(&b).expect("db"), &what);
            }
        }
    }
}

#[test]
fn linear_fm_matches_candle_ops_dense_and_sparse() {
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    // (n, in, out, density; 1 = the dense op): partial AVX-512 column tiles (n not a
    // multiple of 16), batch 1, empty and full rows of the pattern.
    for &(n, i, o, d) in &[
        (40, 2352, 100, 0.01),
        (33, 100, 100, 0.02),
        (1, 7, 3, 0.5),
        (20, 30, 12, 0.9),
        (17, 50, 20, 1.0),
        (130, 64, 10, 0.3),
    ] {
        let mut mk = rand_mask(&mut rng, o * i, d);
        if d < 1.0 && o >= 3 {
            mk[..i].fill(0.0); // an empty row
            mk[i..2 * i].fill(1.0); // a full one
        }
        let x = var(&mut rng, &[n, i]);
        let w = var(&mut rng, &[o, i]);
        let b = var(&mut rng, &[o]);
        let wv = flat(w.as_tensor());
        let masked: Vec<f32> = wv.iter().zip(&mk).map(|(a, m)| a * m).collect();
        let wm = Var::from_vec(masked, (o, i), &Device::Cpu).expect("var");
        let xf = feature_major(&x).expect("feature-major view");
        assert_eq!(xf.dims(), &[i, n]);
        for (relu, bias, out_bm) in [
            (true, true, false),
            (false, true, true),
            (true, false, true),
            (false, false, false),
        ] {
            let what = format!("n={n} {o}x{i} d={d} relu={relu} bias={bias} out_bm={out_bm}");
            let mut lin = x.matmul(&wm.t().expect("t")).expect("matmul");
            if bias {
                lin = lin.broadcast_add(&b).expect("add");
            }
            let want = if relu { lin.relu().expect("relu") } else { lin };
            let want = if out_bm {
                want
            } else {
                want.t().expect("t").contiguous().expect("c")
            };
            let r =
                Tensor::from_vec(rand_vec(&mut rng, n * o), want.dims(), &Device::Cpu).expect("r");
            let gref = loss_grads(&want, &r);
            let dx_ref = gref.get(&x).expect("dx");
            let dw_ref = flat(gref.get(&wm).expect("dw"));
            let bt = bias.then(|| b.as_tensor());
            let check_common = |got: &Tensor, g: &candle_core::backprop::GradStore, m: &str| {
                assert_close(got, &want, &format!("{what} {m}: forward"));
                assert_close(g.get(&x).expect("dx"), dx_ref, &format!("{what} {m}: dx"));
                if bias {
                    assert_close(
                        g.get(&b).expect("db"),
                        gref.get(&b).expect("db"),
                        &format!("{what} {m}: db"),
                    );
                }
            };
            if d == 1.0 {
                let got = linear_fm(&xf, &w, bt, relu, out_bm, None).expect("op");
                let g = loss_grads(&got, &r);
                check_common(&got, &g, "dense");
                assert_close(
                    g.get(&w).expect("dw"),
                    gref.get(&wm).expect("dw"),
                    &format!("{what}: dense dw"),
                );
                continue;
            }
            let sw = SparseWeight::new(&wv, &mk, o, i).expect("sparse weight");
            // Scattered gradient (zero outside the pattern), then the dense one
            // (mask-update steps: every position, the masked weight's gradient).
            for dense_grad in [false, true] {
                sw.set_dense_grad(dense_grad);
                let got = linear_fm(&xf, &w, bt, relu, out_bm, Some(&sw)).expect("op");
                let g = loss_grads(&got, &r);
                check_common(&got, &g, "sparse");
                let dw = flat(g.get(&w).expect("dw"));
                // An empty row's pre-activation is exactly 0 without a bias: candle's ReLU
                // passes the gradient there, PyTorch's (and ours) does not.
                let empty = |r: usize| mk[r * i..(r + 1) * i].iter().all(|&m| m == 0.0);
                for (e, (&a, &m)) in dw.iter().zip(&mk).enumerate() {
                    if relu && !bias && empty(e / i) {
                        continue;
                    }
                    if m == 0.0 && !dense_grad {
                        assert_eq!(a, 0.0, "{what}: dw[{e}] outside the pattern");
                    } else {
                        assert!(
                            (a - dw_ref[e]).abs() <= RTOL * 10.0,
                            "{what} dense_grad={dense_grad}: dw[{e}] {a} vs {}",
                            dw_ref[e]
                        );
                    }
                }
            }
            sw.set_dense_grad(false);
            // Compact gradient: candle gets none; the active positions match.
            sw.set_compact_grad(true);
            let got = linear_fm(&xf, &w, bt, relu, out_bm, Some(&sw)).expect("op");
            let g = loss_grads(&got, &r);
            check_common(&got, &g, "compact");
            assert!(
                g.get(&w).is_none(),
                "{what}: candle got a dense weight gradient"
            );
            let (index, vals) = sw.take_grad().expect("compact gradient");
            assert_eq!(vals.len(), mk.iter().filter(|&&m| m != 0.0).count());
            for (&k, &v) in index.iter().zip(&vals) {
                assert_eq!(mk[k], 1.0, "{what}: gradient at inactive {k}");
                assert!(
                    (v - dw_ref[k]).abs() <= RTOL * 10.0,
                    "{what}: compact dw[{k}]"
                );
            }
        }
    }
}

#[test]
fn linear_fm_rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((5, 8), candle_core::DType::F32, &dev).expect("x");
    let w = Tensor::zeros((3, 6), candle_core::DType::F32, &dev).expect("w");
    let e = linear_fm(&x, &w, None, false, false, None).expect_err("5 vs 6 features");
    assert!(e.to_string().contains("expects 6 input features"), "{e}");
    let w = Tensor::zeros((3, 5), candle_core::DType::F32, &dev).expect("w");
    let b = Tensor::zeros(4, candle_core::DType::F32, &dev).expect("b");
    let e = linear_fm(&x, &w, Some(&b), false, false, None).expect_err("bias");
    assert!(e.to_string().contains("bias has 4 entries"), "{e}");
    let sw = SparseWeight::new(&[0.0; 12], &[1.0; 12], 3, 4).expect("sw");
    let e = linear_fm(&x, &w, None, false, false, Some(&sw)).expect_err("pattern");
    assert!(e.to_string().contains("sparse pattern is 3x4"), "{e}");
    let e = feature_major(&Tensor::zeros(4, candle_core::DType::F32, &dev).expect("v"))
        .expect_err("rank 1");
    assert!(e.to_string().contains("rank >= 2"), "{e}");
}

#[test]
fn mlp_on_feature_major_batches_matches_nchw_batches() {
    use rest::data::transform::BatchLayout;
    use rest::models;
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(44);
    let model = models::build(
        rest::models::ModelKind::Mlp,
        (3, 28, 28),
        10,
        &mut rest::util::rng(1, 1),
        &dev,
    )
    .expect("mlp");
    assert_eq!(model.input_layout(), BatchLayout::FeatureMajor);
    let n = 19;
    let nchw = rand_vec(&mut rng, n * 3 * 28 * 28);
    let sz = 3 * 28 * 28;
    let mut fm = vec![0.0f32; nchw.len()];
    for s in 0..n {
        for f in 0..sz {
            fm[f * n + s] = nchw[s * sz + f];
        }
    }
    let a = BatchLayout::Nchw
        .tensor(&nchw, n, (3, 28, 28), &dev)
        .expect("a");
    let b = BatchLayout::FeatureMajor
        .tensor(&fm, n, (3, 28, 28), &dev)
        .expect("b");
    for train in [false, true] {
        let ya = flat(&model.forward(&a, train).expect("nchw"));
        let yb = flat(&model.forward(&b, train).expect("fm"));
        assert_eq!(ya.len(), n * 10);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ya), bits(&yb), "train={train}");
    }
}
