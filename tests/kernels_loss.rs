//! The fused per-sample cross-entropy op against candle's log-softmax + gather: values and
//! logit gradients, with large and equal logits, and its errors.

use candle_core::{Device, Tensor, Var, D};
use rest::kernels::softmax_nll;

fn reference(logits: &Tensor, y: &Tensor) -> Tensor {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1).expect("log_softmax");
    logp.gather(&y.unsqueeze(1).expect("unsqueeze"), 1)
        .and_then(|t| t.squeeze(1))
        .and_then(|t| t.neg())
        .expect("nll")
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    let a = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
    let b = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x.is_finite(), "{what}[{i}] = {x}");
        assert!(
            (x - y).abs() <= 1e-5 + 1e-5 * y.abs(),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn values_and_gradients_match_candle_log_softmax_and_gather() {
    let dev = &Device::Cpu;
    // Rows: ordinary, huge (overflow without the max shift), all equal, one-hot-like.
    let rows: Vec<Vec<f32>> = vec![
        vec![0.3, -1.2, 2.5, 0.0],
        vec![1000.0, 999.0, -1000.0, 998.5],
        vec![2.0, 2.0, 2.0, 2.0],
        vec![-50.0, 40.0, -50.0, -50.0],
        vec![0.01, 0.02, -0.03, 0.04],
    ];
    let n = rows.len();
    let flat: Vec<f32> = rows.concat();
    let y = Tensor::new(&[2u32, 0, 3, 1, 3], dev).expect("y");
    let logits = Var::from_vec(flat, (n, 4), dev).expect("logits");
    let got = softmax_nll(logits.as_tensor(), &y).expect("fused");
    let want = reference(logits.as_tensor(), &y);
    close(&got, &want, "nll");
    // Row 2: all logits equal -> ln 4 exactly representable to f32 precision.
    let v = got.to_vec1::<f32>().expect("v");
    assert!((v[2] - 4f32.ln()).abs() < 1e-6, "{}", v[2]);

    // Gradients through a weighted sum, as the trainer's loss-weighting does.
    let w = Tensor::new(&[0.5f32, 2.0, 1.0, 0.0, 3.0], dev).expect("w");
    let gf = got
        .mul(&w)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("bwd");
    let gr = want
        .mul(&w)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("bwd");
    let (a, b) = (
        gf.get(logits.as_tensor()).expect("fused grad"),
        gr.get(logits.as_tensor()).expect("reference grad"),
    );
    close(a, b, "dlogits");
    // Each gradient row sums to zero (softmax minus one-hot, scaled), up to the rounding of
    // the log-sum-exp (its ulp at logits near 1000 is 6e-5).
    let rows_sum = a.sum(1).and_then(|t| t.to_vec1::<f32>()).expect("sum");
    assert!(rows_sum.iter().all(|s| s.abs() < 1e-4), "{rows_sum:?}");
}

#[test]
fn bad_shapes_and_class_indices_are_errors() {
    let dev = &Device::Cpu;
    let logits = Tensor::zeros((3, 4), candle_core::DType::F32, dev).expect("logits");
    let e = softmax_nll(&logits, &Tensor::new(&[0u32, 1], dev).expect("y")).unwrap_err();
    assert!(e.to_string().contains("targets must be [3]"), "{e}");
    let e = softmax_nll(&logits, &Tensor::new(&[0u32, 4, 1], dev).expect("y")).unwrap_err();
    assert!(e.to_string().contains("class index 4"), "{e}");
    let flat = Tensor::zeros(12, candle_core::DType::F32, dev).expect("flat");
    let e = softmax_nll(&flat, &Tensor::new(&[0u32], dev).expect("y")).unwrap_err();
    assert!(e.to_string().contains("[N, classes]"), "{e}");
}
