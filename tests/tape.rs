//! The tape backward (`kernels::tape`) against candle's `Tensor::backward`: every parameter
//! gradient of the CNN, the MLP and ResNet-10/50, on dense and on sparse kernels, with and
//! without parameters used again in the loss; the fallback to candle's backward when a candle
//! op sits between recorded ops; inputs computed from parameters only.

mod common;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use common::flat;
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rest::kernels::{self, tape, SparseWeight};
use rest::models::{self, Model, ModelSpec};
use rest::models::{ModelKind, Stem};
use rest::nn::ParamKind;

fn build(kind: ModelKind, width: usize, input: (usize, usize, usize)) -> Result<Box<dyn Model>> {
    let mut rng = rest::util::rng(5, 1);
    let spec = ModelSpec {
        kind,
        width,
        stem: Stem::Cifar,
    };
    models::build(spec, input, 10, &mut rng, &Device::Cpu)
}

/// Masks every weight of `model` at `density` and puts its compact form in the layer's slot
/// (the sparse kernels), as the training loop does.
fn sparsify(model: &dyn Model, density: f64, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for p in model.params() {
        if p.kind != ParamKind::Weight {
            continue;
        }
        let dims = p.var.dims().to_vec();
        let rows = dims[0];
        let cols = p.var.elem_count() / rows;
        let mask: Vec<f32> = (0..rows * cols)
            .map(|_| f32::from(u8::from(rng.random_bool(density))))
            .collect();
        let w: Vec<f32> = p.var.as_tensor().flatten_all()?.to_vec1()?;
        let wm: Vec<f32> = w.iter().zip(&mask).map(|(a, b)| a * b).collect();
        p.var
            .set(&Tensor::from_slice(&wm, dims.as_slice(), &Device::Cpu)?)?;
        let sw = SparseWeight::new(&wm, &mask, rows, cols)?;
        if let Some(slot) = &p.slot {
            *slot.lock().expect("slot") = Some(sw);
        }
    }
    Ok(())
}

fn inputs(n: usize, input: (usize, usize, usize), seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len = n * input.0 * input.1 * input.2;
    let x: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
    let y: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
    Ok((
        Tensor::from_vec(x, (n, input.0, input.1, input.2), &Device::Cpu)?,
        Tensor::new(y.as_slice(), &Device::Cpu)?,
    ))
}

/// The loss of a step: mean cross-entropy, plus `l2 · Σ w²` of the first weight when `l2 > 0`
/// (a parameter reached both by the model and by the loss).
fn loss_of(model: &dyn Model, logits: &Tensor, y: &Tensor, l2: f64) -> Result<Tensor> {
    let mut loss = kernels::softmax_nll(logits, y)?.mean_all()?;
    if l2 > 0.0 {
        let w = model.params()[0].var.as_tensor().clone();
        loss = (loss + w.sqr()?.sum_all()?.affine(l2, 0.0)?)?;
    }
    Ok(loss)
}

fn candle_grads(model: &dyn Model, x: &Tensor, y: &Tensor, l2: f64) -> Result<GradStore> {
    let logits = model.forward(x, true)?;
    Ok(loss_of(model, &logits, y, l2)?.backward()?)
}

fn tape_grads(model: &dyn Model, x: &Tensor, y: &Tensor, l2: f64, lean: bool) -> Result<GradStore> {
    let guard = if lean {
        tape::start_lean()
    } else {
        tape::start()
    };
    let logits = model.forward(x, true)?;
    let rec = guard.finish(logits)?;
    assert_eq!(
        rec.fallback_reason(),
        None,
        "the tape should run this model"
    );
    let loss = loss_of(model, rec.head(), y, l2)?;
    Ok(rec.backward(&loss)?)
}

/// Every parameter has a gradient from both, and they agree (relative 1e-5; most are
/// bit-identical, as the same kernels run in the same order).
fn assert_same(model: &dyn Model, a: &GradStore, b: &GradStore, what: &str) {
    let mut n = 0;
    for p in model.params() {
        let (ga, gb) = (a.get(p.var.as_tensor()), b.get(p.var.as_tensor()));
        let (ga, gb) = match (ga, gb) {
            (Some(ga), Some(gb)) => (flat(ga), flat(gb)),
            (None, None) => continue,
            _ => panic!("{what}: {} has a gradient on one path only", p.name),
        };
        assert_eq!(ga.len(), gb.len(), "{what}: {}", p.name);
        let scale = gb.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (u, v)) in ga.iter().zip(&gb).enumerate() {
            assert!(
                (u - v).abs() <= 1e-5 * scale,
                "{what}: {}[{i}]: tape {u} vs candle {v}",
                p.name
            );
        }
        n += 1;
    }
    assert!(n >= 3, "{what}: only {n} parameters have gradients");
}

fn check(kind: ModelKind, width: usize, input: (usize, usize, usize), density: Option<f64>) {
    let model = build(kind, width, input).expect("model");
    if let Some(d) = density {
        sparsify(model.as_ref(), d, 9).expect("sparsify");
    }
    let (x, y) = inputs(6, input, 3).expect("inputs");
    for l2 in [0.0, 0.01] {
        let a = candle_grads(model.as_ref(), &x, &y, l2).expect("candle");
        // Lean: graph-less outputs, stand-ins for what no backward reads (training's mode).
        for lean in [false, true] {
            let b = tape_grads(model.as_ref(), &x, &y, l2, lean).expect("tape");
            assert_same(
                model.as_ref(),
                &b,
                &a,
                &format!("{kind:?} density {density:?} l2 {l2} lean {lean}"),
            );
        }
    }
}

#[test]
fn cnn_gradients_match_candle_dense_and_sparse() {
    check(ModelKind::Cnn, 64, (3, 12, 12), None);
    check(ModelKind::Cnn, 64, (3, 12, 12), Some(0.2));
}

#[test]
fn mlp_gradients_match_candle_dense_and_sparse() {
    check(ModelKind::Mlp, 64, (3, 6, 5), None);
    check(ModelKind::Mlp, 64, (3, 6, 5), Some(0.1));
}

#[test]
fn resnet_gradients_match_candle_dense_and_sparse() {
    // Residual joins: the block input reaches the loss along two paths.
    check(ModelKind::Resnet10, 4, (3, 10, 10), None);
    check(ModelKind::Resnet10, 4, (3, 10, 10), Some(0.3));
    check(ModelKind::Resnet50, 2, (3, 9, 9), None);
}

fn var(rng: &mut ChaCha8Rng, dims: &[usize]) -> Var {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
    Var::from_vec(v, dims, &Device::Cpu).expect("var")
}

#[test]
fn a_candle_op_between_recorded_ops_falls_back_to_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (x, w1, w2) = (
        var(&mut rng, &[5, 7]),
        var(&mut rng, &[6, 7]),
        var(&mut rng, &[3, 6]),
    );
    let forward = || -> Result<Tensor> {
        let h = kernels::linear_act(x.as_tensor(), w1.as_tensor(), None, true)?;
        // A candle op on a recorded output: its gradient would bypass the tape.
        let h = h.affine(2.0, 0.5)?;
        kernels::linear(&h, w2.as_tensor(), None)
    };
    let want = forward()?.sqr()?.sum_all()?.backward()?;
    let guard = tape::start();
    let rec = guard.finish(forward()?)?;
    let reason = rec.fallback_reason().map(str::to_string);
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("computed by candle ops")),
        "{reason:?}"
    );
    let loss = rec_head_loss(&rec)?;
    let got = rec.backward(&loss)?;
    for v in [&x, &w1, &w2] {
        assert_eq!(
            flat(got.get(v.as_tensor()).expect("grad")),
            flat(want.get(v.as_tensor()).expect("grad"))
        );
    }
    Ok(())
}

#[test]
fn an_incomplete_lean_recording_is_an_error_not_a_silent_fallback() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (x, w1, w2) = (
        var(&mut rng, &[5, 7]),
        var(&mut rng, &[6, 7]),
        var(&mut rng, &[3, 6]),
    );
    // Lean outputs carry no graph, so candle's backward cannot stand in for the tape.
    let guard = tape::start_lean();
    let h = kernels::linear_act(x.as_tensor(), w1.as_tensor(), None, true)?;
    let h = h.affine(2.0, 0.5)?;
    let out = kernels::linear(&h, w2.as_tensor(), None)?;
    let err = guard
        .finish(out)
        .err()
        .expect("an incomplete lean recording must fail");
    assert!(err.to_string().contains("REST_BACKWARD=candle"), "{err}");
    // The same when the output itself comes from a candle op on a recorded output.
    let guard = tape::start_lean();
    let h = kernels::linear_act(x.as_tensor(), w1.as_tensor(), None, true)?;
    assert!(guard.finish(h.affine(2.0, 0.0)?).is_err());
    // Nothing recorded (candle ops only): candle's backward runs it.
    let guard = tape::start_lean();
    let rec = guard.finish(x.as_tensor().matmul(&w1.as_tensor().t()?)?)?;
    assert!(rec.fallback_reason().is_some());
    Ok(())
}

fn rec_head_loss(rec: &tape::Recorded) -> Result<Tensor> {
    Ok(rec.head().sqr()?.sum_all()?)
}

#[test]
fn an_output_not_from_a_recorded_op_falls_back_to_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (x, w) = (var(&mut rng, &[4, 5]), var(&mut rng, &[3, 5]));
    let forward = || -> Result<Tensor> {
        Ok(kernels::linear(x.as_tensor(), w.as_tensor(), None)?.affine(3.0, 0.0)?)
    };
    let want = forward()?.sqr()?.sum_all()?.backward()?;
    let guard = tape::start();
    let rec = guard.finish(forward()?)?;
    assert!(rec.fallback_reason().is_some());
    let loss = rec_head_loss(&rec)?;
    let got = rec.backward(&loss)?;
    assert_eq!(
        flat(got.get(w.as_tensor()).expect("grad")),
        flat(want.get(w.as_tensor()).expect("grad"))
    );
    Ok(())
}

#[test]
fn inputs_computed_from_parameters_get_their_gradients_through_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (x, w, b, s) = (
        var(&mut rng, &[5, 7]),
        var(&mut rng, &[4, 7]),
        var(&mut rng, &[4]),
        var(&mut rng, &[4, 7]),
    );
    // The weight is `w * s` and the bias `2 b`: candle ops on parameters only.
    let forward = || -> Result<Tensor> {
        let wm = w.as_tensor().mul(s.as_tensor())?;
        let bb = b.as_tensor().affine(2.0, 0.0)?;
        let h = kernels::linear_act(x.as_tensor(), &wm, Some(&bb), true)?;
        let w2 = w
            .as_tensor()
            .narrow(0, 0, 3)?
            .narrow(1, 0, 4)?
            .contiguous()?;
        kernels::linear(&h, &w2, None)
    };
    let want = forward()?.sqr()?.sum_all()?.backward()?;
    let guard = tape::start();
    let rec = guard.finish(forward()?)?;
    assert_eq!(rec.fallback_reason(), None);
    let loss = rec_head_loss(&rec)?;
    let got = rec.backward(&loss)?;
    for v in [&x, &w, &b, &s] {
        let (g, e) = (
            flat(got.get(v.as_tensor()).expect("grad")),
            flat(want.get(v.as_tensor()).expect("grad")),
        );
        for (u, v) in g.iter().zip(&e) {
            assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{u} vs {v}");
        }
    }
    Ok(())
}

#[test]
fn a_dropped_guard_stops_recording() {
    {
        let _guard = tape::start();
        assert!(tape::is_recording());
    }
    assert!(!tape::is_recording());
}
