//! The sparse candle ops in `rest::kernels` (`sparse_conv2d_cnhw`, `sparse_linear` over a
//! `SparseWeight`) against candle's own dense operations on the masked weight: forward values,
//! the input gradient, and the weight gradient, which must be the masked dense gradient (exactly
//! zero outside the pattern) by default and the full dense gradient after
//! `SparseWeight::set_dense_grad(true)`. Densities 0.001-0.5, with empty and fully dense rows,
//! odd shapes, stride 1 and 2, padding 0-2, and both convolution layouts (polyphase, and
//! batch-innermost for 3x3 kernels with batches of 16 or more on small maps or dense enough
//! patterns).

mod common;

use candle_core::{Device, Tensor, Var};
use common::{assert_close, cnhw, flat, loss_grads, rand_mask, rand_t, rand_vec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rest::kernels::{sparse_conv2d_cnhw, sparse_linear, SparseWeight};
use std::sync::Arc;

/// A random 0/1 mask of `rows x cols` with each entry active with probability `density`;
/// with 3 rows or more, row 0 is forced empty and row 1 fully dense.
fn mask(rng: &mut ChaCha8Rng, rows: usize, cols: usize, density: f64) -> Vec<f32> {
    let mut m = rand_mask(rng, rows * cols, density);
    if rows >= 3 {
        m[..cols].fill(0.0);
        m[cols..2 * cols].fill(1.0);
    }
    m
}

/// Checks the weight gradient `got` of the sparse op: exactly zero outside `mask` and equal to
/// `dense_grad` inside it when `dense` is false; equal to `dense_grad` everywhere when true.
fn check_dw(got: &Tensor, dense_grad: &Tensor, mask: &[f32], dense: bool, what: &str) {
    if dense {
        assert_close(got, dense_grad, what);
        return;
    }
    let gv = flat(got);
    for (i, (&g, &m)) in gv.iter().zip(mask).enumerate() {
        if m == 0.0 {
            assert_eq!(g, 0.0, "{what}: element {i} is outside the pattern");
        }
    }
    let mt = Tensor::from_slice(mask, got.dims(), &Device::Cpu).expect("mask");
    let want = dense_grad.mul(&mt).expect("mul");
    assert_close(got, &want, what);
}

#[test]
fn sparse_conv2d_matches_candle_conv2d_on_the_masked_weight() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // (c, n, h, w, oc, k, stride, pad, density)
    let cases = [
        (3, 4, 28, 28, 16, 4, 2, 1, 0.05),
        (8, 2, 7, 7, 6, 4, 2, 1, 0.5),
        (5, 3, 9, 8, 7, 3, 1, 1, 0.2),
        (6, 3, 5, 7, 5, 1, 1, 0, 0.5),
        (3, 2, 15, 13, 4, 5, 2, 2, 0.01),
        (16, 2, 11, 9, 9, 3, 1, 2, 0.001),
        (4, 1, 6, 6, 3, 2, 2, 0, 0.1),
        (32, 2, 8, 8, 33, 3, 1, 1, 0.05),
        // Tiny output maps (ResNet's last stages at 32 px): the live-tap layout.
        (32, 3, 1, 1, 16, 3, 1, 1, 0.1),
        (16, 2, 2, 2, 8, 3, 2, 1, 0.2),
        (8, 3, 2, 2, 9, 3, 1, 1, 0.3),
        // Batches of 16 and more with 3x3 kernels on maps of at most 4x4, or larger ones with
        // enough weights per channel x batch: the batch-innermost layout (operands converted
        // CNHW <-> CHWN inside the op).
        (16, 20, 4, 4, 12, 3, 1, 1, 0.2),
        (8, 32, 8, 8, 6, 3, 2, 1, 0.3),
        (12, 17, 1, 1, 5, 3, 1, 1, 0.5),
        (32, 32, 9, 10, 8, 3, 1, 1, 0.5),
    ];
    for (case, &(c, n, h, w, oc, k, stride, pad, density)) in cases.iter().enumerate() {
        let cols = c * k * k;
        let mk = mask(&mut rng, oc, cols, density);
        let x = Var::from_tensor(&rand_t(&mut rng, &[n, c, h, w])).expect("var");
        // The dense weight also holds values outside the pattern: the op must ignore them.
        let wv = rand_vec(&mut rng, oc * cols);
        let wt = Var::from_vec(wv.clone(), (oc, c, k, k), &Device::Cpu).expect("var");
        let masked: Vec<f32> = wv.iter().zip(&mk).map(|(w, m)| w * m).collect();
        let wm = Var::from_vec(masked, (oc, c, k, k), &Device::Cpu).expect("var");

        let want = x.conv2d(&wm, pad, stride, 1, 1).expect("conv2d");
        let r = rand_t(&mut rng, want.dims());
        let gref = loss_grads(&want, &r);
        let (dx_ref, dw_ref) = (
            gref.get(&x).expect("dx").clone(),
            gref.get(&wm).expect("dw").clone(),
        );

        let sw = SparseWeight::new(&wv, &mk, oc, cols).expect("sparse weight");
        assert_eq!(sw.nnz(), mk.iter().filter(|&&m| m != 0.0).count());
        for dense in [false, true] {
            sw.set_dense_grad(dense);
            let what = format!("conv case {case} (density {density}, dense grad {dense})");
            // The permuted (non-contiguous) input exercises the contiguity handling.
            let got = cnhw(&sparse_conv2d_cnhw(&cnhw(&x), &wt, stride, pad, &sw).expect("op"));
            assert_close(&got, &want, &format!("{what}: forward"));
            let g = loss_grads(&got, &r);
            assert_close(g.get(&x).expect("dx"), &dx_ref, &format!("{what}: dx"));
            check_dw(
                g.get(&wt).expect("dw"),
                &dw_ref,
                &mk,
                dense,
                &format!("{what}: dw"),
            );
        }

        // An untracked input (the first layer's images): no dx, the same dw; and the forward
        // without any tracking.
        sw.set_dense_grad(false);
        let xc = cnhw(x.as_tensor()).contiguous().expect("contiguous");
        let got = sparse_conv2d_cnhw(&xc, &wt, stride, pad, &sw).expect("op");
        let g = loss_grads(&cnhw(&got), &r);
        assert!(
            g.get(&xc).is_none(),
            "case {case}: constant input got a gradient"
        );
        check_dw(
            g.get(&wt).expect("dw"),
            &dw_ref,
            &mk,
            false,
            "untracked x: dw",
        );
        let plain = sparse_conv2d_cnhw(&xc, wt.as_tensor(), stride, pad, &sw).expect("op");
        let plain = cnhw(&plain.detach());
        assert_close(
            &plain,
            &want,
            &format!("conv case {case}: untracked forward"),
        );
    }
}

#[test]
fn sparse_linear_matches_matmul_on_the_masked_weight() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    // (n, in, out, density)
    let cases = [
        (64, 2352, 100, 0.01),
        (37, 100, 100, 0.05),
        (5, 7, 3, 0.5),
        (1, 1, 1, 0.5),
        (3, 33, 17, 0.2),
        (16, 257, 10, 0.001),
        (9, 1000, 13, 0.001),
        (256, 256, 10, 0.1),
        // Dense enough (nnz > 4 (I + O)) for the feature-major path with its transposes;
        // the cases above run the batch-major kernels.
        (48, 40, 30, 0.9),
        (20, 300, 50, 0.5),
    ];
    for (case, &(n, i, o, density)) in cases.iter().enumerate() {
        let mut mk = mask(&mut rng, o, i, density);
        if o == 1 {
            mk[0] = 1.0;
        }
        let x = Var::from_tensor(&rand_t(&mut rng, &[n, i])).expect("var");
        let wv = rand_vec(&mut rng, o * i);
        let wt = Var::from_vec(wv.clone(), (o, i), &Device::Cpu).expect("var");
        let masked: Vec<f32> = wv.iter().zip(&mk).map(|(w, m)| w * m).collect();
        let wm = Var::from_vec(masked, (o, i), &Device::Cpu).expect("var");

        let want = x.matmul(&wm.t().expect("t")).expect("matmul");
        let r = rand_t(&mut rng, want.dims());
        let gref = loss_grads(&want, &r);
        let (dx_ref, dw_ref) = (
            gref.get(&x).expect("dx").clone(),
            gref.get(&wm).expect("dw").clone(),
        );

        let sw = SparseWeight::new(&wv, &mk, o, i).expect("sparse weight");
        for dense in [false, true] {
            sw.set_dense_grad(dense);
            let what = format!("linear case {case} (density {density}, dense grad {dense})");
            let got = sparse_linear(&x, &wt, &sw).expect("op");
            assert_close(&got, &want, &format!("{what}: forward"));
            let g = loss_grads(&got, &r);
            assert_close(g.get(&x).expect("dx"), &dx_ref, &format!("{what}: dx"));
            check_dw(
                g.get(&wt).expect("dw"),
                &dw_ref,
                &mk,
                dense,
                &format!("{what}: dw"),
            );
        }
        // Without tracking: the same forward.
        let plain = sparse_linear(&x.as_tensor().detach(), &wt.as_tensor().detach(), &sw);
        assert_close(
            &plain.expect("op"),
            &want,
            &format!("linear case {case}: untracked forward"),
        );
    }
}

#[test]
fn sparse_ops_follow_weight_and_reject_mismatched_patterns() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (n, i, o) = (4, 6, 5);
    let mk = mask(&mut rng, o, i, 0.5);
    let wv = rand_vec(&mut rng, o * i);
    let sw: Arc<SparseWeight> = SparseWeight::new(&wv, &mk, o, i).expect("sparse weight");
    let x = rand_t(&mut rng, &[n, i]);
    // New dense values (e.g. after an optimizer step) are picked up at the next forward.
    let w2 = rand_vec(&mut rng, o * i);
    let w2t = Tensor::from_vec(w2.clone(), (o, i), &Device::Cpu).expect("tensor");
    let masked: Vec<f32> = w2.iter().zip(&mk).map(|(w, m)| w * m).collect();
    let wm = Tensor::from_vec(masked, (o, i), &Device::Cpu).expect("tensor");
    let want = x.matmul(&wm.t().expect("t")).expect("matmul");
    assert_close(
        &sparse_linear(&x, &w2t, &sw).expect("op"),
        &want,
        "refreshed values",
    );
    // A weight of another shape than the pattern is an error naming both shapes.
    let wrong = rand_t(&mut rng, &[o + 1, i]);
    let err = sparse_linear(&x, &wrong, &sw)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("sparse pattern is 5x6"), "{err}");
    let xc = rand_t(&mut rng, &[2, 1, 5, 5]);
    let wc = rand_t(&mut rng, &[o, 2, 2, 2]);
    let err = sparse_conv2d_cnhw(&xc, &wc, 1, 0, &sw)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("sparse pattern is 5x6"), "{err}");
}

/// Inside a `freeze_weights` scope an inference convolution reads the layer's values from
/// the dense weight once (new values passed within the scope are not read: the scope promises
/// there are none); a training pass reads them again, and so does the next inference call;
/// ending the scope or opening a new one reads them again. Both layouts.
#[test]
fn frozen_weights_read_sparse_values_once_per_scope() {
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    // (c, n, h, w, oc, density): polyphase, then batch-innermost (batch 20, 4x4 map).
    for &(c, n, h, w, oc, density) in &[(4, 3, 6, 6, 5, 0.4), (16, 20, 4, 4, 12, 0.3)] {
        let cols = c * 9;
        let mk = mask(&mut rng, oc, cols, density);
        let masked = |v: &[f32]| -> Tensor {
            let m: Vec<f32> = v.iter().zip(&mk).map(|(w, m)| w * m).collect();
            Tensor::from_vec(m, (oc, c, 3, 3), &Device::Cpu).expect("tensor")
        };
        let (v1, v2) = (rand_vec(&mut rng, oc * cols), rand_vec(&mut rng, oc * cols));
        let sw = SparseWeight::new(&v1, &mk, oc, cols).expect("sparse weight");
        let x = rand_t(&mut rng, &[n, c, h, w]);
        let xc = cnhw(&x);
        let want = |v: &[f32]| x.conv2d(&masked(v), 1, 1, 1, 1).expect("conv");
        let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), (oc, c, 3, 3), &Device::Cpu).expect("w");
        let (w1, w2) = (t(&v1), t(&v2));
        let infer = |wt: &Tensor| cnhw(&sparse_conv2d_cnhw(&xc, wt, 1, 1, &sw).expect("op"));
        {
            let _frozen = rest::kernels::freeze_weights();
            assert_close(&infer(&w1), &want(&v1), "first call in the scope");
            assert_close(&infer(&w2), &want(&v1), "values read once per scope");
            // A training pass (the weight tracks gradients) reads the current values...
            let wv = Var::from_tensor(&w2).expect("var");
            let y = sparse_conv2d_cnhw(&xc, wv.as_tensor(), 1, 1, &sw).expect("op");
            assert_close(&cnhw(&y), &want(&v2), "training pass");
            // ... and the next inference call reads them again (and lays them out anew).
            assert_close(&infer(&w1), &want(&v1), "after a training pass");
            let y = sparse_conv2d_cnhw(&xc, wv.as_tensor(), 1, 1, &sw).expect("op");
            assert_close(&cnhw(&y), &want(&v2), "second training pass");
            assert_close(&infer(&w2), &want(&v2), "after the second training pass");
        }
        assert_close(&infer(&w2), &want(&v2), "outside a scope");
        let _frozen = rest::kernels::freeze_weights();
        assert_close(&infer(&w1), &want(&v1), "a new scope");
    }
}
