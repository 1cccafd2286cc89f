//! ResNet-10/18/50 (variable width): parameter counts against torchvision, output shapes for
//! both stems, gradients for every parameter, loss falling under SGD, FLOPs accounting, and
//! short sparse REST runs on the built-in 28x28 data.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use rand::Rng as _;
use rest::models::{self, Model, ModelSpec};
use rest::models::{ModelKind, Stem};
use rest::nn::ParamKind;
use rest::train::optim::Sgd;
use rest::train::TrainConfig;

fn spec(kind: ModelKind, width: usize, stem: Stem) -> ModelSpec {
    ModelSpec { kind, width, stem }
}

fn build(
    kind: ModelKind,
    width: usize,
    stem: Stem,
    input: (usize, usize, usize),
) -> Result<Box<dyn Model>> {
    let mut rng = rest::util::rng(0, 1);
    models::build(spec(kind, width, stem), input, 10, &mut rng, &Device::Cpu)
}

fn count(model: &dyn Model) -> usize {
    model.params().iter().map(|p| p.var.elem_count()).sum()
}

/// Parameter count of a torchvision-style ResNet, from the architecture description alone:
/// convs (no bias) each followed by a BatchNorm (2 parameters per channel), a 1x1 projection
/// + BN in the first block of every stage whose input shape differs, a linear head.
fn expected_params(
    blocks: [usize; 4],
    bottleneck: bool,
    w: usize,
    stem_k: usize,
    classes: usize,
) -> usize {
    let conv_bn = |cin: usize, cout: usize, k: usize| cin * cout * k * k + 2 * cout;
    let exp = if bottleneck { 4 } else { 1 };
    let mut total = conv_bn(3, w, stem_k);
    let mut cin = w;
    for (s, &n) in blocks.iter().enumerate() {
        let p = w * (1 << s);
        for b in 0..n {
            total += if bottleneck {
                conv_bn(cin, p, 1) + conv_bn(p, p, 3) + conv_bn(p, 4 * p, 1)
            } else {
                conv_bn(cin, p, 3) + conv_bn(p, p, 3)
            };
            if (s > 0 && b == 0) || cin != p * exp {
                total += conv_bn(cin, p * exp, 1);
            }
            cin = p * exp;
        }
    }
    total + cin * classes + classes
}

#[test]
fn parameter_counts_match_torchvision() -> Result<()> {
    // torchvision publishes 11,689,512 (resnet18) and 25,557,032 (resnet50) parameters with
    // the 1000-class head (512 resp. 2048 features + bias); swap in a 10-class head.
    let tv18 = 11_689_512 - 513 * 1000 + 513 * 10;
    let tv50 = 25_557_032 - 2049 * 1000 + 2049 * 10;
    assert_eq!(tv18, 11_181_642);
    assert_eq!(tv50, 23_528_522);
    // The architecture formula reproduces torchvision's numbers, so it can be trusted for
    // the widths and depths torchvision does not publish.
    assert_eq!(expected_params([2, 2, 2, 2], false, 64, 7, 10), tv18);
    assert_eq!(expected_params([3, 4, 6, 3], true, 64, 7, 10), tv50);
    assert_eq!(
        expected_params([2, 2, 2, 2], false, 64, 7, 1000),
        11_689_512
    );

    let r18 = build(ModelKind::Resnet18, 64, Stem::Imagenet, (3, 32, 32))?;
    assert_eq!(count(r18.as_ref()), tv18);
    let r50 = build(ModelKind::Resnet50, 64, Stem::Imagenet, (3, 32, 32))?;
    assert_eq!(count(r50.as_ref()), tv50);
    let r10 = build(ModelKind::Resnet10, 16, Stem::Imagenet, (3, 32, 32))?;
    let e10 = expected_params([1, 1, 1, 1], false, 16, 7, 10);
    assert_eq!(count(r10.as_ref()), e10);
    // The CIFAR stem swaps the 7x7 stem conv for a 3x3 one: 3 * 16 * (49 - 9) fewer.
    let r10c = build(ModelKind::Resnet10, 16, Stem::Cifar, (3, 32, 32))?;
    assert_eq!(count(r10c.as_ref()), e10 - 3 * 16 * 40);

    // Maskable weights: every conv (stem, 8 block convs, 3 projections) + the classifier,
    // and nothing else; BatchNorm parameters and the bias are never masked.
    let weights = r18.weights();
    assert_eq!(weights.len(), 1 + 16 + 3 + 1);
    assert!(weights.iter().all(|p| p.slot.is_some()));
    for p in r18.params() {
        let is_weight = p.kind == ParamKind::Weight;
        let conv_or_fc = p.name.ends_with(".weight") && p.var.rank() >= 2;
        assert_eq!(is_weight, conv_or_fc, "{}", p.name);
    }
    // torchvision state_dict names and order (stride 2 of stage 2 on the projection).
    let names: Vec<String> = r18.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(names[0], "conv1.weight");
    assert_eq!(names[1], "bn1.weight");
    assert_eq!(names[3], "layer1.0.conv1.weight");
    assert!(names.contains(&"layer2.0.downsample.0.weight".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("layer1.0.downsample")));
    assert_eq!(names[names.len() - 1], "fc.bias");
    let names50: Vec<String> = r50.params().iter().map(|p| p.name.clone()).collect();
    // ResNet-50's first block projects 64 -> 256 channels at stride 1.
    assert!(names50.contains(&"layer1.0.downsample.0.weight".to_string()));
    assert!(names50.contains(&"layer4.2.conv3.weight".to_string()));
    Ok(())
}

fn random_images(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Result<Tensor> {
    let mut rng = rest::util::rng(seed, 9);
    let data: Vec<f32> = (0..n * c * h * w).map(|_| rng.random::<f32>()).collect();
    Ok(Tensor::from_vec(data, (n, c, h, w), &Device::Cpu)?)
}

#[test]
fn output_shapes_for_both_stems_and_sizes() -> Result<()> {
    for (kind, width) in [
        (ModelKind::Resnet10, 8),
        (ModelKind::Resnet18, 8),
        (ModelKind::Resnet50, 4),
    ] {
        for stem in [Stem::Imagenet, Stem::Cifar] {
            for (c, hw) in [(3, 32), (3, 128), (3, 28), (1, 7)] {
                let m = build(kind, width, stem, (c, hw, hw))?;
                let x = random_images(3, c, hw, hw, 1)?;
                for train in [true, false] {
                    let y = m.forward(&x, train)?;
                    assert_eq!(y.dims(), &[3, 10], "{kind:?} {stem:?} {hw}x{hw}");
                    let v = y.flatten_all()?.to_vec1::<f32>()?;
                    assert!(v.iter().all(|x| x.is_finite()));
                }
            }
        }
    }
    Ok(())
}

fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

fn random_labels(n: usize, seed: u64) -> Result<Tensor> {
    let mut rng = rest::util::rng(seed, 10);
    let l: Vec<u32> = (0..n).map(|_| rng.random_range(0..10u32)).collect();
    Ok(Tensor::from_vec(l, n, &Device::Cpu)?)
}

#[test]
fn backward_reaches_every_parameter() -> Result<()> {
    for (kind, width, stem) in [
        (ModelKind::Resnet18, 8, Stem::Imagenet),
        (ModelKind::Resnet50, 4, Stem::Cifar),
    ] {
        let m = build(kind, width, stem, (3, 32, 32))?;
        let x = random_images(4, 3, 32, 32, 2)?;
        let loss = cross_entropy(&m.forward(&x, true)?, &random_labels(4, 2)?)?;
        let grads = loss.backward()?;
        for p in m.params() {
            let g = grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{kind:?}: no gradient for {}", p.name));
            assert_eq!(g.dims(), p.var.dims(), "{}", p.name);
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                norm.is_finite() && norm > 0.0,
                "{kind:?}: gradient of {} is {norm}",
                p.name
            );
        }
    }
    Ok(())
}

#[test]
fn fused_add_relu_matches_candle() -> Result<()> {
    let dev = Device::Cpu;
    // Spans several parallel chunks; values on a grid of 1/4 so that some sums are exactly 0.
    let n = 3 * 40_000 + 7;
    let mut rng = rest::util::rng(7, 11);
    let mut grid = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-8i32..=8) as f32 / 4.0)
            .collect()
    };
    let (av, bv, wv) = (grid(n), grid(n), grid(n));
    let a = candle_core::Var::from_vec(av.clone(), (n,), &dev)?;
    let b = candle_core::Var::from_vec(bv.clone(), (n,), &dev)?;
    let w = Tensor::from_vec(wv.clone(), (n,), &dev)?;
    let out = rest::models::resnet::add_relu(a.as_tensor(), b.as_tensor())?;
    let grads = (&out * &w)?.sum_all()?.backward()?;
    let out = out.to_vec1::<f32>()?;
    let ga = grads.get(a.as_tensor()).expect("grad a").to_vec1::<f32>()?;
    let gb = grads.get(b.as_tensor()).expect("grad b").to_vec1::<f32>()?;
    let mut zeros = 0;
    for i in 0..n {
        let s = av[i] + bv[i];
        assert_eq!(out[i], s.max(0.0), "forward at {i}");
        // PyTorch's ReLU gradient: passed where the output is positive, 0 at exactly 0.
        let g = if s > 0.0 { wv[i] } else { 0.0 };
        assert_eq!((ga[i], gb[i]), (g, g), "gradient at {i}");
        zeros += usize::from(s == 0.0);
    }
    assert!(zeros > 100, "the grid should produce exact zeros");
    // Candle's ops give the same result away from 0; mismatched shapes are an error.
    let reference = (a.as_tensor() + b.as_tensor())?.relu()?.to_vec1::<f32>()?;
    assert_eq!(out, reference);
    let short = Tensor::zeros((n - 1,), DType::F32, &dev)?;
    assert!(rest::models::resnet::add_relu(a.as_tensor(), &short).is_err());
    Ok(())
}

#[test]
fn sgd_steps_reduce_the_loss() -> Result<()> {
    let m = build(ModelKind::Resnet18, 8, Stem::Cifar, (3, 16, 16))?;
    let x = random_images(16, 3, 16, 16, 3)?;
    let y = random_labels(16, 3)?;
    let mut opt = Sgd::new(m.params(), 0.05, 0.9, 0.0);
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = cross_entropy(&m.forward(&x, true)?, &y)?;
        losses.push(loss.to_scalar::<f32>()?);
        opt.step(&loss.backward()?)?;
    }
    let last = *losses.last().unwrap_or(&f32::NAN);
    assert!(last < 0.5 * losses[0], "loss did not fall: {losses:?}");
    Ok(())
}

#[test]
fn buffers_round_trip_and_drive_evaluation() -> Result<()> {
    let m = build(ModelKind::Resnet10, 8, Stem::Imagenet, (3, 32, 32))?;
    let x = random_images(8, 3, 32, 32, 4)?;
    let eval0 = m.forward(&x, false)?;
    let saved = m.buffers()?;
    // Stem, 4 x 2 block BNs, 3 projections: 12 BatchNorms, mean and variance each.
    assert_eq!(saved.len(), 24);
    assert_eq!(saved[0].name, "bn1.running_mean");
    assert_eq!(saved[1].name, "bn1.running_var");
    m.forward(&x, true)?; // updates the running statistics
    let eval1 = m.forward(&x, false)?;
    let diff = (&eval1 - &eval0)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 1e-4, "running statistics did not change evaluation");
    m.set_buffers(&saved)?;
    let eval2 = m.forward(&x, false)?;
    let diff = (&eval2 - &eval0)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    assert!(m.set_buffers(&saved[..22]).is_err());
    // Buffers are restored by name: any order restores the same state, an unknown name is
    // an error.
    let mut swapped = saved.clone();
    swapped.swap(0, 2);
    m.forward(&x, true)?;
    m.set_buffers(&swapped)?;
    let eval3 = m.forward(&x, false)?;
    assert_eq!(
        (&eval3 - &eval0)?.abs()?.max_all()?.to_scalar::<f32>()?,
        0.0
    );
    swapped[0].name = "bn9.running_mean".into();
    assert!(m.set_buffers(&swapped).is_err());
    Ok(())
}

#[test]
fn layer_flops_of_resnet18_at_224() -> Result<()> {
    let m = build(ModelKind::Resnet18, 64, Stem::Imagenet, (3, 224, 224))?;
    let flops = m.layer_flops((3, 224, 224));
    let sizes: std::collections::HashMap<String, usize> = m
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.var.elem_count()))
        .collect();
    let mut macs = 0usize;
    for l in &flops {
        if let Some((w, pos)) = &l.weight {
            macs += sizes[w] * pos;
        }
    }
    // By hand: (output positions, in, out, kernel) of each conv; stage 1 at 56x56, stages
    // 2-4 at 28, 14, 7 with one 3x3 stride-2 conv + one 1x1 projection + 3 full 3x3 convs.
    let mut expected = 112 * 112 * 3 * 64 * 49 + 4 * 56 * 56 * 64 * 64 * 9;
    for (hw, c) in [(28, 128), (14, 256), (7, 512)] {
        let p = hw * hw;
        expected += p * (c / 2) * c * 9 + p * (c / 2) * c + 3 * p * c * c * 9;
    }
    expected += 512 * 10;
    assert_eq!(macs, expected);
    let gflops = 2.0 * macs as f64 / 1e9;
    assert!((3.60..3.65).contains(&gflops), "{gflops} GFLOPs");

    // Sparsity-independent parts: the max pool costs 9 per output (64 x 56 x 56), the
    // average pool reads 512 x 7 x 7, each of the 8 residual adds (+ ReLU) 2 per element.
    let by_name = |n: &str| flops.iter().find(|l| l.name == n).map(|l| l.other);
    assert_eq!(by_name("maxpool"), Some(9.0 * (64 * 56 * 56) as f64));
    assert_eq!(by_name("avgpool"), Some((512 * 7 * 7) as f64));
    assert_eq!(by_name("layer3.1.add"), Some(2.0 * (256 * 14 * 14) as f64));
    // Stem conv: BN + ReLU, 3 per output element; projection: BN only.
    assert_eq!(by_name("conv1"), Some(3.0 * (64 * 112 * 112) as f64));
    assert_eq!(
        by_name("layer2.0.downsample.0"),
        Some(2.0 * (128 * 28 * 28) as f64)
    );
    assert_eq!(by_name("fc"), Some(10.0));
    // Every maskable weight appears exactly once.
    let named: Vec<&String> = flops
        .iter()
        .filter_map(|l| l.weight.as_ref().map(|w| &w.0))
        .collect();
    assert_eq!(named.len(), m.weights().len());
    for w in m.weights() {
        assert!(named.contains(&&w.name), "{} missing", w.name);
    }
    Ok(())
}

#[test]
fn short_sparse_runs_on_28x28_digits_with_both_stems() -> Result<()> {
    for stem in [Stem::Imagenet, Stem::Cifar] {
        let dir = tempfile::tempdir()?;
        let mut cfg = TrainConfig::default();
        cfg.model.kind = ModelKind::Resnet18;
        cfg.model.width = 8;
        cfg.model.stem = stem;
        cfg.sparse.density = 0.1;
        cfg.optim.epochs = 1;
        cfg.optim.batch_size = 64;
        cfg.data.train_size = 256;
        cfg.data.valid_size = 64;
        cfg.data.test_size = 64;
        cfg.sparse.update_frequency = 2;
        cfg.run.out = Some(dir.path().to_path_buf());
        let out = rest::train::train(&cfg)?;
        let s = &out.summary;
        assert_eq!(s.model, "resnet18");
        assert_eq!(s.steps, 4);
        assert!(s.mask_updates >= 1, "{stem:?}: no mask update");
        // 21 maskable layers, overall density 0.1.
        assert_eq!(s.layer_densities.len(), 21);
        let nz: usize = s.layer_densities.iter().map(|l| l.nonzero).sum();
        let total: usize = s
            .layer_densities
            .iter()
            .map(|l| l.shape.iter().product::<usize>())
            .sum();
        let d = nz as f64 / total as f64;
        assert!((d - 0.1).abs() < 0.01, "{stem:?}: density {d}");
        assert!(s.test.accuracy.is_finite());
        // The resolved config records the ResNet settings.
        let back = TrainConfig::from_toml_file(&dir.path().join("config.toml"))?;
        assert_eq!((back.model.width, back.model.stem), (8, stem));
    }
    Ok(())
}

/// Training-step time of dense ResNet-18 (width 64) at batch 64 on 32x32 images, split into
/// forward, backward and SGD update:
/// `cargo test --test resnet -- --ignored --nocapture step_time`.
#[test]
#[ignore = "timing, run by hand"]
fn step_time_resnet18_batch64_32x32() -> Result<()> {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for stem in [Stem::Imagenet, Stem::Cifar] {
        let m = build(ModelKind::Resnet18, 64, stem, (3, 32, 32))?;
        let x = random_images(64, 3, 32, 32, 5)?;
        let y = random_labels(64, 5)?;
        let mut opt = Sgd::new(m.params(), 0.01, 0.9, 0.0);
        let (mut fwd, mut bwd, mut upd, mut step) = (vec![], vec![], vec![], vec![]);
        let steps = if stem == Stem::Imagenet { 9 } else { 3 };
        for i in 0..steps {
            let t0 = std::time::Instant::now();
            let loss = cross_entropy(&m.forward(&x, true)?, &y)?;
            let _ = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let t1 = std::time::Instant::now();
            let grads = loss.backward()?;
            let t2 = std::time::Instant::now();
            opt.step(&grads)?;
            let t3 = std::time::Instant::now();
            if i >= 1 {
                let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
                fwd.push(ms(t0, t1));
                bwd.push(ms(t1, t2));
                upd.push(ms(t2, t3));
                step.push(ms(t0, t3));
            }
        }
        println!(
            "resnet18 w64 {stem:?} stem, batch 64, 32x32, dense: median step {:.1} ms \
             (forward {:.1}, backward {:.1}, SGD {:.1}; steps {step:.0?})",
            median(step.clone()),
            median(fwd),
            median(bwd),
            median(upd)
        );
    }
    Ok(())
}
