//! Compact weight gradients of sparse layers (`SparseWeight::set_compact_grad`) and the
//! SGD steps that consume them in place: the gradient handed over equals candle's dense
//! gradient at the active weights, and training with it gives bit for bit the weights and
//! momentum of the dense-gradient path (with and without momentum and weight decay, on the
//! batch-major and the feature-major kernels), with weights outside the pattern left zero.
//! Also the bias folded into the sparse op (`sparse_linear_bias`) against candle's matmul and
//! broadcast add.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{flat, loss_grads, rand_mask, rand_vec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rest::kernels::{sparse_linear, sparse_linear_bias, SparseWeight};
use rest::nn::Linear;
use rest::train::optim::Sgd;

/// (n, in, out, density): the first two run the batch-major kernels, the last the
/// feature-major ones (nnz > 4 (I + O)).
/// The last case has enough active weights (about 78,000) for the compact update's parallel
/// passes over ranges of the active positions.
const CASES: [(usize, usize, usize, f64); 4] = [
    (32, 300, 20, 0.02),
    (7, 50, 9, 0.1),
    (24, 40, 30, 0.9),
    (4, 600, 260, 0.5),
];

/// A random mask of `n` weights with the given density, and random weights zero outside it.
fn masked_weight(rng: &mut ChaCha8Rng, n: usize, density: f64) -> (Vec<f32>, Vec<f32>) {
    let mk = rand_mask(rng, n, density);
    let wv = rand_vec(rng, n)
        .iter()
        .zip(&mk)
        .map(|(w, m)| w * m)
        .collect();
    (mk, wv)
}

#[test]
fn compact_gradient_is_the_dense_gradient_at_the_active_weights() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for &(n, i, o, density) in &CASES {
        let (mk, wv) = masked_weight(&mut rng, o * i, density);
        let x = Tensor::from_vec(rand_vec(&mut rng, n * i), (n, i), &Device::Cpu).expect("x");
        let r = Tensor::from_vec(rand_vec(&mut rng, n * o), (n, o), &Device::Cpu).expect("r");
        let w = Var::from_vec(wv.clone(), (o, i), &Device::Cpu).expect("w");
        // Reference: candle's dense matmul gradient.
        let dense = x.matmul(&w.as_tensor().t().expect("t")).expect("matmul");
        let g_ref = loss_grads(&dense, &r);
        let dw_ref = flat(g_ref.get(&w).expect("dw"));

        let sw = SparseWeight::new(&wv, &mk, o, i).expect("sparse weight");
        sw.set_compact_grad(true);
        // A stale gradient from a graph that was never stepped must not leak into the next.
        for _ in 0..2 {
            let y = sparse_linear(&x, w.as_tensor(), &sw).expect("op");
            let g = loss_grads(&y, &r);
            assert!(g.get(&w).is_none(), "no dense gradient in compact mode");
        }
        let (index, vals) = sw.take_grad().expect("compact gradient");
        let active: Vec<usize> = (0..o * i).filter(|&k| mk[k] != 0.0).collect();
        assert_eq!(&index[..], &active[..], "indices are the active weights");
        let scale = dw_ref.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (&k, &g) in index.iter().zip(&vals) {
            assert!(
                (g - dw_ref[k]).abs() <= 1e-4 * scale,
                "case {n}x{i}x{o}: dw[{k}] {g} vs {}",
                dw_ref[k]
            );
        }
        assert!(sw.take_grad().is_none(), "taken once");
    }
}

/// Trains one sparse linear layer for a few SGD steps with compact (`true`) or dense
/// gradients; returns the final weight, the momentum, the mask and the initial weight.
fn train(
    compact: bool,
    (n, i, o, density): (usize, usize, usize, f64),
    momentum: f64,
    wd: f64,
) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut init = rest::util::rng(3, 1);
    let lin = Linear::new("fc", i, o, true, &mut init, &Device::Cpu).expect("linear");
    let mk = rand_mask(&mut rng, o * i, density);
    let wm = lin
        .weight
        .as_tensor()
        .mul(&Tensor::from_slice(&mk, (o, i), &Device::Cpu).expect("mask"))
        .expect("mul");
    lin.weight.set(&wm).expect("set");
    let w_init = flat(&wm);
    let sw = SparseWeight::new(&w_init, &mk, o, i).expect("sparse weight");
    sw.set_compact_grad(compact);
    *lin.slot.lock().expect("slot") = Some(sw);
    let mut opt = Sgd::new(lin.params(), 0.05, momentum, wd);
    for _ in 0..4 {
        let x = Tensor::from_vec(rand_vec(&mut rng, n * i), (n, i), &Device::Cpu).expect("x");
        let r = Tensor::from_vec(rand_vec(&mut rng, n * o), (n, o), &Device::Cpu).expect("r");
        let y = lin.forward(&x).expect("forward").relu().expect("relu");
        let g = loss_grads(&y, &r);
        opt.step(&g).expect("step");
    }
    (
        flat(lin.weight.as_tensor()),
        opt.momentum_buffer(0)
            .expect("momentum buffer")
            .map(|t| flat(&t)),
        mk,
        w_init,
    )
}

#[test]
fn sgd_on_compact_gradients_matches_the_dense_path_bit_for_bit() {
    for case in CASES {
        for (momentum, wd) in [(0.9, 5e-4), (0.9, 0.0), (0.0, 1e-3)] {
            let what = format!("case {case:?}, momentum {momentum}, wd {wd}");
            let (w_c, m_c, mk, w_init) = train(true, case, momentum, wd);
            let (w_d, m_d, _, _) = train(false, case, momentum, wd);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // `0.0` vs `-0.0` outside the pattern is not a difference in value.
            let norm = |v: &[f32]| bits(&v.iter().map(|x| x + 0.0).collect::<Vec<_>>());
            assert_eq!(norm(&w_c), norm(&w_d), "{what}: weights");
            assert_eq!(
                m_c.as_deref().map(norm),
                m_d.as_deref().map(norm),
                "{what}: momentum"
            );
            assert_eq!(m_c.is_some(), momentum != 0.0, "{what}: momentum kept");
            for (k, (&w, &m)) in w_c.iter().zip(&mk).enumerate() {
                if m == 0.0 {
                    assert_eq!(w, 0.0, "{what}: weight {k} outside the pattern");
                }
            }
            // The weights moved (else the test would compare two untouched layers).
            let moved = w_c.iter().zip(&w_init).filter(|(a, b)| a != b).count();
            let active = mk.iter().filter(|&&m| m != 0.0).count();
            assert!(
                moved * 2 > active,
                "{what}: {moved} of {active} weights moved"
            );
        }
    }
}

#[test]
fn sparse_linear_bias_matches_matmul_plus_bias() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}: length");
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * scale, "{what}: {k}: {x} vs {y}");
        }
    };
    for &(n, i, o, density) in &CASES {
        let (mk, wv) = masked_weight(&mut rng, o * i, density);
        let dev = &Device::Cpu;
        let x = Var::from_vec(rand_vec(&mut rng, n * i), (n, i), dev).expect("x");
        let w = Var::from_vec(wv.clone(), (o, i), dev).expect("w");
        let b = Var::from_vec(rand_vec(&mut rng, o), o, dev).expect("b");
        let r = Tensor::from_vec(rand_vec(&mut rng, n * o), (n, o), dev).expect("r");
        let want = x
            .matmul(&w.as_tensor().t().expect("t"))
            .and_then(|t| t.broadcast_add(&b))
            .expect("reference");
        let g_ref = loss_grads(&want, &r);
        let sw = SparseWeight::new(&wv, &mk, o, i).expect("sparse weight");
        let got = sparse_linear_bias(&x, &w, Some(&b), &sw).expect("op");
        let what = format!("case {n}x{i}x{o}");
        close(&flat(&got), &flat(&want), &format!("{what}: forward"));
        let g = loss_grads(&got, &r);
        for (t, name) in [(&x, "dx"), (&b, "db")] {
            close(
                &flat(g.get(t).expect("grad")),
                &flat(g_ref.get(t).expect("grad")),
                &format!("{what}: {name}"),
            );
        }
        let masked_ref: Vec<f32> = flat(g_ref.get(&w).expect("dw"))
            .iter()
            .zip(&mk)
            .map(|(g, m)| g * m)
            .collect();
        close(
            &flat(g.get(&w).expect("dw")),
            &masked_ref,
            &format!("{what}: dw"),
        );
        let plain = sparse_linear_bias(
            &x.as_tensor().detach(),
            &w.as_tensor().detach(),
            Some(&b.as_tensor().detach()),
            &sw,
        )
        .expect("untracked");
        close(&flat(&plain), &flat(&want), &format!("{what}: untracked"));
        let bad = Tensor::zeros(o + 1, candle_core::DType::F32, dev).expect("zeros");
        let err = sparse_linear_bias(&x, &w, Some(&bad), &sw).expect_err("bias of the wrong size");
        assert!(err.to_string().contains("bias"), "{err}");
    }
}

/// Trains a sparse 4x4 stride-2 convolution (CNHW, as in REST's CNN) for a few SGD steps with
/// compact (`true`) or dense gradients; returns the final weight, the momentum and the mask.
fn train_conv(compact: bool, momentum: f64, wd: f64) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>) {
    let (c, oc, n, hw) = (5, 7, 3, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut init = rest::util::rng(4, 1);
    let conv = rest::nn::Conv2d::new("conv", c, oc, 4, 2, 1, false, &mut init, &Device::Cpu)
        .expect("conv");
    let k = c * 16;
    let mk = rand_mask(&mut rng, oc * k, 0.2);
    let wm = conv
        .weight
        .as_tensor()
        .mul(&Tensor::from_slice(&mk, (oc, c, 4, 4), &Device::Cpu).expect("mask"))
        .expect("mul");
    conv.weight.set(&wm).expect("set");
    let sw = SparseWeight::new(&flat(&wm), &mk, oc, k).expect("sparse weight");
    sw.set_compact_grad(compact);
    *conv.slot.lock().expect("slot") = Some(sw.clone());
    let mut opt = Sgd::new(conv.params(), 0.05, momentum, wd);
    let ohw = (hw + 2 - 4) / 2 + 1;
    for step in 0..4 {
        let x = Tensor::from_vec(
            rand_vec(&mut rng, c * n * hw * hw),
            (c, n, hw, hw),
            &Device::Cpu,
        )
        .expect("x");
        let r = Tensor::from_vec(
            rand_vec(&mut rng, oc * n * ohw * ohw),
            (oc, n, ohw, ohw),
            &Device::Cpu,
        )
        .expect("r");
        let y = conv.forward(&x).expect("forward");
        let g = loss_grads(&y, &r);
        assert_eq!(
            g.get(conv.weight.as_tensor()).is_none(),
            compact,
            "step {step}: a dense weight gradient exactly when not compact"
        );
        opt.step(&g).expect("step");
    }
    assert!(
        sw.take_grad().is_none(),
        "the optimizer took every compact gradient"
    );
    (
        flat(conv.weight.as_tensor()),
        opt.momentum_buffer(0)
            .expect("momentum buffer")
            .map(|t| flat(&t)),
        mk,
    )
}

#[test]
fn sparse_conv_sgd_on_compact_gradients_matches_the_dense_path_bit_for_bit() {
    for (momentum, wd) in [(0.9, 5e-4), (0.0, 1e-3)] {
        let (w_c, m_c, mk) = train_conv(true, momentum, wd);
        let (w_d, m_d, _) = train_conv(false, momentum, wd);
        let norm = |v: &[f32]| v.iter().map(|x| (x + 0.0).to_bits()).collect::<Vec<_>>();
        assert_eq!(norm(&w_c), norm(&w_d), "momentum {momentum}: weights");
        assert_eq!(
            m_c.as_deref().map(norm),
            m_d.as_deref().map(norm),
            "momentum"
        );
        for (&w, &m) in w_c.iter().zip(&mk) {
            if m == 0.0 {
                assert_eq!(w, 0.0, "weights outside the pattern stay zero");
            }
        }
    }
}
