//! The fused MLP layer ops: `sparse_linear_act` and `linear_act` (`relu(x W^T + b)` in one
//! candle op) against candle's own matmul, broadcast add and ReLU on the masked weight:
//! forward values and the gradients of the input, weight and bias; the compact sparse weight
//! gradient with and without the packed input (`train`), which must agree bit for bit.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rest::kernels::{linear_act, sparse_linear_act, SparseWeight};

const RTOL: f32 = 1e-4;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn var(rng: &mut ChaCha8Rng, dims: &[usize]) -> Var {
    let n: usize = dims.iter().product();
    Var::from_vec(rand_vec(rng, n), dims, &Device::Cpu).expect("var")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().expect("flatten").to_vec1().expect("vec")
}

/// `|a - b| <= RTOL * max(1, max|b|)` element-wise.
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (av, bv) = (flat(a), flat(b));
    let scale = bv.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in av.iter().zip(&bv).enumerate() {
        assert!(
            (x - y).abs() <= RTOL * scale,
            "{what}: element {i}: {x} vs {y} (scale {scale})"
        );
    }
}

/// `sum(f(x) * r)` and its gradients.
fn loss_grads(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
    (y * r)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("backward")
}

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
        let mk: Vec<f32> = (0..o * i).map(|_| f32::from(rng.random_bool(d))).collect();
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
