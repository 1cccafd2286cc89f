//! Inference passes under `tape::no_grad` build no autograd graph (so a batch's activations
//! are freed as the pass goes instead of living as long as the logits) and compute the same
//! logits as a pass with the graph; the guard restores gradient tracking when dropped.

use anyhow::Result;
use candle_core::Device;
use rest::kernels::tape;
use rest::models::{self, ModelKind, ModelSpec, Stem};

fn check(kind: ModelKind, shape: (usize, usize, usize)) -> Result<()> {
    let spec = ModelSpec {
        kind,
        width: 4,
        stem: Stem::Imagenet,
    };
    let mut rng = rest::util::rng(3, 1);
    let m = models::build(spec, shape, 10, &mut rng, &Device::Cpu)?;
    let (c, h, w) = shape;
    let n = 3;
    let v: Vec<f32> = (0..n * c * h * w)
        .map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0)
        .collect();
    let x = m
        .input_layout()
        .tensor_from_vec(v, n, (c, h, w), &Device::Cpu)?;
    let with_graph = m.forward(&x, false)?;
    assert!(
        with_graph.track_op(),
        "{kind:?}: without the guard the logits are part of the graph"
    );
    let plain = {
        let _ng = tape::no_grad();
        let y = m.forward(&x, false)?;
        assert!(!y.track_op(), "{kind:?}: under no_grad there is no graph");
        y
    };
    assert!(
        m.forward(&x, false)?.track_op(),
        "{kind:?}: the guard restores tracking when dropped"
    );
    let (a, b) = (with_graph.to_vec2::<f32>()?, plain.to_vec2::<f32>()?);
    assert_eq!(a, b, "{kind:?}: the same logits either way");
    Ok(())
}

#[test]
fn inference_under_no_grad_builds_no_graph_and_gives_the_same_logits() -> Result<()> {
    check(ModelKind::Cnn, (3, 28, 28))?;
    check(ModelKind::Resnet18, (3, 32, 32))?;
    check(ModelKind::Mlp, (3, 28, 28))?;
    Ok(())
}
