//! `--init-from`: a tiny torchvision-named ResNet-18 and ResNet-50 saved by PyTorch
//! (`tests/fixtures/init/`, made by `tools/reference/make_init_fixture.py`) load into
//! `rest`'s ResNet-18 and ResNet-50 and reproduce PyTorch's eval-mode logits within 1e-4, from
//! the `.pth` and from safetensors; another class count replaces the head only; wrong shapes and
//! tensors are errors naming them; a run trains from the file.

mod common;

use anyhow::Result;
use candle_core::{Device, Tensor};
use rest::models::init::{init_from, read_tensors};
use rest::models::{self, ModelKind, ModelSpec, Stem};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    fixture_named("resnet18w4")
}

/// `tests/fixtures/init/<name>.pth`.
fn fixture_named(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/init/{name}.pth"))
}

fn build(kind: ModelKind, width: usize, classes: usize) -> Result<Box<dyn models::Model>> {
    let spec = ModelSpec {
        kind,
        width,
        stem: Stem::Imagenet,
    };
    let mut rng = rest::util::rng(7, 1);
    models::build(spec, (3, 32, 32), classes, &mut rng, &Device::Cpu)
}

/// The fixture's inputs: ((7n + 13c + 17y + 19x) mod 23) / 11 - 1, exact in f32.
fn inputs() -> Result<Tensor> {
    let mut v = Vec::with_capacity(2 * 3 * 32 * 32);
    for n in 0..2 {
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    v.push(((7 * n + 13 * c + 17 * y + 19 * x) % 23) as f32 / 11.0 - 1.0);
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (2, 3, 32, 32), &Device::Cpu)?)
}

fn torch_logits() -> Vec<Vec<f32>> {
    torch_logits_of("resnet18w4")
}

/// The logits PyTorch computed for fixture `name` (`<name>-logits.json`).
fn torch_logits_of(name: &str) -> Vec<Vec<f32>> {
    let p = fixture_named(name).with_file_name(format!("{name}-logits.json"));
    let j = common::read_json(&p);
    j["logits"]
        .as_array()
        .expect("logits")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().expect("f") as f32)
                .collect()
        })
        .collect()
}

fn assert_logits(m: &dyn models::Model) -> Result<()> {
    assert_logits_of(m, "resnet18w4")
}

fn assert_logits_of(m: &dyn models::Model, name: &str) -> Result<()> {
    let got = m.forward(&inputs()?, false)?.to_vec2::<f32>()?;
    let want = torch_logits_of(name);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() < 1e-4, "logits {g:?} vs PyTorch's {w:?}");
        }
    }
    Ok(())
}

#[test]
fn pytorch_checkpoint_reproduces_its_logits() -> Result<()> {
    let m = build(ModelKind::Resnet18, 4, 5)?;
    // A fresh model is far from the file's logits (the test can fail).
    let fresh = m.forward(&inputs()?, false)?.to_vec2::<f32>()?;
    assert!((fresh[0][0] - torch_logits()[0][0]).abs() > 1e-3);
    let r = init_from(m.as_ref(), &fixture())?;
    // Every parameter and buffer of the model came from the file.
    assert_eq!(r.loaded, m.params().len() + m.buffers()?.len());
    assert_eq!(r.head_replaced, None);
    assert_logits(m.as_ref())?;

    // The same tensors as safetensors give the same logits.
    let dir = tempfile::tempdir()?;
    let st = dir.path().join("w.safetensors");
    let all: HashMap<String, Tensor> = read_tensors(&fixture())?.into_iter().collect();
    candle_core::safetensors::save(&all, &st)?;
    let m2 = build(ModelKind::Resnet18, 4, 5)?;
    init_from(m2.as_ref(), &st)?;
    assert_logits(m2.as_ref())?;
    Ok(())
}

/// ResNet-50: Bottlenecks `conv1/bn1` (1x1), `conv2/bn2` (3x3, with the stride), `conv3/bn3`
/// (1x1, expansion 4) and `downsample.0/.1` under torchvision's names, at width 2.
#[test]
fn pytorch_resnet50_checkpoint_reproduces_its_logits() -> Result<()> {
    let file = read_tensors(&fixture_named("resnet50w2"))?;
    // torchvision's Bottleneck names and shapes (v1.5: the stride on the 3x3 conv).
    for (name, shape) in [
        ("layer1.0.conv1.weight", vec![2, 2, 1, 1]),
        ("layer1.0.conv3.weight", vec![8, 2, 1, 1]),
        ("layer1.0.bn3.running_var", vec![8]),
        ("layer1.0.downsample.0.weight", vec![8, 2, 1, 1]),
        ("layer2.0.conv2.weight", vec![4, 4, 3, 3]),
        ("layer3.5.bn3.weight", vec![32]),
        ("layer4.2.conv3.weight", vec![64, 16, 1, 1]),
        ("fc.weight", vec![5, 64]),
    ] {
        assert_eq!(
            file.get(name).map(|t| t.dims().to_vec()),
            Some(shape),
            "{name}"
        );
    }
    let m = build(ModelKind::Resnet50, 2, 5)?;
    let fresh = m.forward(&inputs()?, false)?.to_vec2::<f32>()?;
    let want = torch_logits_of("resnet50w2");
    assert!(
        fresh[0]
            .iter()
            .zip(&want[0])
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "a fresh model must not give the file's logits"
    );
    let r = init_from(m.as_ref(), &fixture_named("resnet50w2"))?;
    assert_eq!(r.loaded, m.params().len() + m.buffers()?.len());
    assert_eq!(r.head_replaced, None);
    assert_logits_of(m.as_ref(), "resnet50w2")?;
    // The ResNet-18 file is no ResNet-50: the first Bottleneck conv (1x1, not 3x3) is named.
    let m = build(ModelKind::Resnet50, 4, 5)?;
    let e = init_from(m.as_ref(), &fixture()).unwrap_err().to_string();
    assert!(e.contains("`layer1.0.conv1.weight`"), "{e}");
    Ok(())
}

#[test]
fn other_class_count_replaces_the_head_and_bad_files_name_the_tensor() -> Result<()> {
    let file = read_tensors(&fixture())?;
    let m = build(ModelKind::Resnet18, 4, 3)?;
    let fc_before = m
        .params()
        .iter()
        .find(|p| p.name == "fc.weight")
        .expect("fc")
        .var
        .as_tensor()
        .to_vec2::<f32>()?;
    let r = init_from(m.as_ref(), &fixture())?;
    let (names, shape) = r.head_replaced.expect("head replaced");
    assert_eq!(names, vec!["fc.weight".to_string(), "fc.bias".to_string()]);
    assert_eq!(shape, vec![5, 32]);
    let p = m.params();
    let get = |n: &str| {
        p.iter()
            .find(|q| q.name == n)
            .expect(n)
            .var
            .as_tensor()
            .clone()
    };
    assert_eq!(get("fc.weight").to_vec2::<f32>()?, fc_before);
    let conv = get("layer2.0.conv1.weight")
        .flatten_all()?
        .to_vec1::<f32>()?;
    let want = file["layer2.0.conv1.weight"]
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(conv, want);

    // Width 8: the first conv's shape differs; the error names it and both shapes.
    let m = build(ModelKind::Resnet18, 8, 5)?;
    let e = init_from(m.as_ref(), &fixture()).unwrap_err().to_string();
    assert!(
        e.contains("`conv1.weight`") && e.contains("[4, 3, 7, 7]") && e.contains("[8, 3, 7, 7]"),
        "{e}"
    );
    // ResNet-10 has no layer1.1: the file's extra tensor is named.
    let m = build(ModelKind::Resnet10, 4, 5)?;
    let e = init_from(m.as_ref(), &fixture()).unwrap_err().to_string();
    assert!(e.contains("`layer1.1."), "{e}");
    // A model tensor missing from the file.
    let dir = tempfile::tempdir()?;
    let mut less = file.clone();
    less.remove("bn1.running_var");
    let st = dir.path().join("less.safetensors");
    let less: HashMap<String, Tensor> = less.into_iter().collect();
    candle_core::safetensors::save(&less, &st)?;
    let m = build(ModelKind::Resnet18, 4, 5)?;
    let e = init_from(m.as_ref(), &st).unwrap_err().to_string();
    assert!(
        e.contains("`bn1.running_var`") && e.contains("less.safetensors"),
        "{e}"
    );
    // Not a checkpoint at all.
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"not a zip")?;
    let e = init_from(m.as_ref(), &junk).unwrap_err().to_string();
    assert!(e.contains("junk.pth") && e.contains("--init-from"), "{e}");
    Ok(())
}

#[test]
fn a_run_trains_from_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = common::tiny_config(dir.path());
    cfg.model = ModelSpec {
        kind: ModelKind::Resnet18,
        width: 4,
        stem: Stem::Imagenet,
    };
    cfg.optim.init_from = Some(fixture());
    cfg.optim.epochs = 1;
    cfg.data.train_size = 256;
    cfg.data.valid_size = 64;
    cfg.data.test_size = 64;
    cfg.sparse.density = 1.0;
    cfg.validate()?;
    let out = rest::train::train(&cfg)?;
    assert_eq!(out.summary.epochs, 1);
    let text = std::fs::read_to_string(dir.path().join("config.toml"))?;
    assert!(text.contains("init_from = "), "{text}");
    let mut bad = cfg.clone();
    bad.optim.init_from = Some(dir.path().join("absent.pth"));
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("--init-from") && e.contains("absent.pth"), "{e}");
    Ok(())
}

/// `--magnitude-masks`: under the ERK layer budget, each layer keeps exactly its largest
/// pretrained weights (the same counts as random masks); a run trains from them.
#[test]
fn magnitude_masks_keep_each_layers_largest_pretrained_weights() -> Result<()> {
    use rest::sparse::{magnitude_scores, DstOptions, LayerShape, SparseConfig, SparseEngine};
    let m = build(ModelKind::Resnet18, 4, 5)?;
    init_from(m.as_ref(), &fixture())?;
    let weights = m.weights();
    let shapes: Vec<LayerShape> = weights
        .iter()
        .map(|p| LayerShape::new(p.name.clone(), p.var.dims()))
        .collect();
    let w: Vec<Vec<f32>> = weights
        .iter()
        .map(|p| Ok(p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?))
        .collect::<Result<_>>()?;
    let cfg = SparseConfig {
        density: 0.2,
        prune_rate: 0.5,
        final_prune_rate: 0.005,
        update_frequency: 10,
        total_steps: 100,
        erk_power_scale: 1.0,
    };
    let scores = magnitude_scores(&w);
    let placed = SparseEngine::with_options_placed(
        shapes.clone(),
        cfg.clone(),
        DstOptions::default(),
        Some(&scores),
        &mut rest::util::rng(1, 2),
    )?;
    let random = SparseEngine::with_options(
        shapes,
        cfg,
        DstOptions::default(),
        &mut rest::util::rng(1, 2),
    )?;
    let mut some_sparse = false;
    for (l, wl) in w.iter().enumerate() {
        let mask = placed.mask(l);
        let k = placed.active_count(l);
        assert_eq!(k, random.active_count(l), "layer {l}");
        some_sparse |= k < wl.len();
        // Every kept weight is at least as large as every dropped one.
        let kept_min = (0..wl.len())
            .filter(|&i| mask[i] == 1.0)
            .map(|i| wl[i].abs())
            .fold(f32::INFINITY, f32::min);
        let dropped_max = (0..wl.len())
            .filter(|&i| mask[i] == 0.0)
            .map(|i| wl[i].abs())
            .fold(0.0f32, f32::max);
        assert!(
            kept_min >= dropped_max,
            "layer {l}: {kept_min} < {dropped_max}"
        );
        assert_eq!(mask.iter().filter(|&&v| v == 1.0).count(), k);
    }
    assert!(some_sparse);

    // The flag in a run, and its conflict with score-based inits.
    let dir = tempfile::tempdir()?;
    let mut cfg = common::tiny_config(dir.path());
    cfg.model = ModelSpec {
        kind: ModelKind::Resnet18,
        width: 4,
        stem: Stem::Imagenet,
    };
    cfg.optim.init_from = Some(fixture());
    cfg.optim.epochs = 1;
    cfg.data.train_size = 256;
    cfg.data.valid_size = 64;
    cfg.data.test_size = 64;
    cfg.sparse.density = 0.3;
    cfg.sparse.magnitude_masks = true;
    cfg.validate()?;
    rest::train::train(&cfg)?;
    let text = std::fs::read_to_string(dir.path().join("config.toml"))?;
    assert!(text.contains("magnitude_masks = true"), "{text}");
    cfg.sparse.sparse_init = rest::sparse::SparseInit::Snip;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("--magnitude-masks"), "{e}");
    Ok(())
}

/// Mutated checkpoints (bytes flipped or cut; 300 seeded variants each of the `.pth` and of
/// its safetensors copy) give an error or a checked load, never a panic.
#[test]
fn mutated_checkpoints_never_panic() -> Result<()> {
    use rand::{Rng, RngCore};
    let dir = tempfile::tempdir()?;
    let st = dir.path().join("w.safetensors");
    let all: HashMap<String, Tensor> = read_tensors(&fixture())?.into_iter().collect();
    candle_core::safetensors::save(&all, &st)?;
    let mut rng = rest::util::rng(3, 0);
    let m = build(ModelKind::Resnet18, 4, 5)?;
    for (src, name) in [(fixture(), "x.pth"), (st, "x.safetensors")] {
        let original = std::fs::read(&src)?;
        let path = dir.path().join(name);
        let mut errors = 0;
        for t in 0..300 {
            let mut b = original.clone();
            if t % 3 == 0 {
                b.truncate(rng.random_range(0..b.len()));
            } else {
                for _ in 0..rng.random_range(1..8) {
                    // Headers and the pickle first: most flips in the first and last 4 KiB.
                    let i = if rng.random_bool(0.5) {
                        rng.random_range(0..4096.min(b.len()))
                    } else {
                        b.len() - 1 - rng.random_range(0..4096.min(b.len()))
                    };
                    b[i] = rng.next_u32() as u8;
                }
            }
            std::fs::write(&path, &b)?;
            if init_from(m.as_ref(), &path).is_err() {
                errors += 1;
            }
        }
        assert!(
            errors > 50,
            "{name}: only {errors} of 300 mutations were errors"
        );
    }
    Ok(())
}
