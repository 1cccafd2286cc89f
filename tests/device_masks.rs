//! Mask updates on the device (`rest::sparse::device`) against the host engine: the same
//! dropped and regrown positions, masks, fired masks, history, weights and momentum, bit for
//! bit, on random layers with many ties (quantised values, zero gradients), fully dense and
//! empty layers, k = 0, k capped by the inactive positions, several updates in a row, every
//! death x growth pair with a device version; a hand-computed tie case; the host fallback for
//! non-finite values and host-only modes; and whole training runs (the GPU code path on the
//! CPU, and rest's CPU kernels) that match the host-update runs exactly.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use common::{shapes, sparse_cfg, train_cmd, BIN};
use rand::Rng as _;
use rest::sparse::device::{host_only_reason, update_on_device, LayerTensors};
use rest::sparse::{
    DeathMode, DstOptions, GrowthMode, LayerShape, Redistribution, SparseConfig, SparseEngine,
    UpdateInputs,
};
use rest::util::{rng, Rng};

fn cfg(density: f64, rate: f64, steps: usize) -> SparseConfig {
    sparse_cfg(density, rate, rate * 0.1, 1, steps)
}

/// Values from a small set (multiples of 0.25 in [-1, 1], half of them zero): many ties.
fn quantised(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if r.random_bool(0.5) {
                0.0
            } else {
                r.random_range(-4i32..=4) as f32 * 0.25
            }
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn host_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// One update on both engines from the same inputs; asserts identical outcomes and returns
/// the weights and momentum after it (for the next step).
#[allow(clippy::too_many_arguments)]
fn step_both(
    host: &mut SparseEngine,
    dev: &mut SparseEngine,
    step: usize,
    w: Vec<Vec<f32>>,
    g: Vec<Vec<f32>>,
    m: Option<Vec<Vec<f32>>>,
    what: &str,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let cpu = Device::Cpu;
    let layers = host.layers().to_vec();
    let t = |v: &[f32], s: &LayerShape| Tensor::from_slice(v, s.shape.as_slice(), &cpu).unwrap();
    let wt: Vec<Tensor> = w.iter().zip(&layers).map(|(v, s)| t(v, s)).collect();
    let gt: Vec<Tensor> = g.iter().zip(&layers).map(|(v, s)| t(v, s)).collect();
    let mt: Option<Vec<Tensor>> = m
        .as_ref()
        .map(|m| m.iter().zip(&layers).map(|(v, s)| t(v, s)).collect());
    let masks: Vec<Tensor> = (0..layers.len())
        .map(|l| t(dev.mask(l), &layers[l]))
        .collect();
    let views: Vec<LayerTensors> = (0..layers.len())
        .map(|l| LayerTensors {
            weight: &wt[l],
            grad: Some(&gt[l]),
            momentum: mt.as_ref().map(|m| &m[l]),
            mask: &masks[l],
        })
        .collect();
    let out = update_on_device(dev, step, &views)
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the device update fell back to the host"));

    // The host engine gets zeros for a missing momentum buffer, as the trainer passes them.
    let mut hw = w.clone();
    let mut hm = m
        .clone()
        .unwrap_or_else(|| layers.iter().map(|s| vec![0.0; s.numel()]).collect());
    let stats = host
        .update_with(
            step,
            UpdateInputs {
                weights: &mut hw,
                grads: &g,
                momentum: Some(&mut hm),
            },
        )
        .unwrap();

    assert_eq!(out.stats, stats, "{what}: statistics and positions");
    assert_eq!(dev.masks_bool(), host.masks_bool(), "{what}: engine masks");
    assert_eq!(dev.fired_masks(), host.fired_masks(), "{what}: fired masks");
    assert_eq!(dev.history(), host.history(), "{what}: history");
    assert_eq!(dev.masks_csv(), host.masks_csv(), "{what}: masks.csv");
    let mut new_w = Vec::new();
    let mut new_m = Vec::new();
    for l in 0..layers.len() {
        let dw = match &out.weights[l] {
            Some(t) => host_vec(t),
            None => {
                assert_eq!(
                    stats.pruned[l], 0,
                    "{what} l{l}: changed layer without weights"
                );
                w[l].clone()
            }
        };
        assert_eq!(bits(&dw), bits(&hw[l]), "{what} l{l}: weights");
        assert_eq!(
            host_vec(&out.masks[l]),
            host.mask(l),
            "{what} l{l}: mask tensor"
        );
        assert_eq!(out.masks[l].dims(), layers[l].shape.as_slice(), "{what}");
        if let Some(m) = &m {
            let dm = match &out.momentum[l] {
                Some(t) => host_vec(t),
                None => m[l].clone(),
            };
            assert_eq!(bits(&dm), bits(&hm[l]), "{what} l{l}: momentum");
        } else {
            assert!(out.momentum[l].is_none(), "{what}: momentum out of nothing");
        }
        new_w.push(hw[l].clone());
        new_m.push(hm[l].clone());
    }
    (new_w, new_m)
}

/// Several updates in a row from random quantised inputs; the weights carry over (after the
/// update, inactive positions get fresh values, as an SGD step on a dense gradient gives).
fn run_steps(
    mut host: SparseEngine,
    steps: usize,
    with_momentum: bool,
    seed: u64,
    what: &str,
) -> usize {
    let mut dev = host.clone();
    let layers = host.layers().to_vec();
    let mut r = rng(seed, 0);
    let mut w: Vec<Vec<f32>> = layers
        .iter()
        .map(|s| quantised(&mut r, s.numel()))
        .collect();
    let mut moved = 0;
    for step in 1..=steps {
        let g: Vec<Vec<f32>> = layers
            .iter()
            .map(|s| quantised(&mut r, s.numel()))
            .collect();
        let m = with_momentum.then(|| {
            layers
                .iter()
                .map(|s| quantised(&mut r, s.numel()))
                .collect()
        });
        let (nw, _) = step_both(
            &mut host,
            &mut dev,
            step,
            w,
            g,
            m,
            &format!("{what} step {step}"),
        );
        moved += host.history().last().unwrap().pruned.iter().sum::<usize>();
        // Next step: active weights keep theirs (with some fresh values), inactive get noise.
        w = nw
            .into_iter()
            .enumerate()
            .map(|(l, v)| {
                let fresh = quantised(&mut r, v.len());
                v.iter()
                    .zip(fresh)
                    .enumerate()
                    .map(|(i, (&a, b))| {
                        if host.mask(l)[i] != 0.0 && r.random_bool(0.7) {
                            a
                        } else {
                            b
                        }
                    })
                    .collect()
            })
            .collect();
    }
    moved
}

fn opts(death: DeathMode, growth: GrowthMode) -> DstOptions {
    DstOptions {
        death,
        growth,
        death_threshold: 0.6,
        ..DstOptions::default()
    }
}

#[test]
fn device_update_matches_host_for_every_device_mode_with_ties() {
    let layers = shapes(&[&[8, 3, 3, 3], &[16, 8, 3, 3], &[10, 64], &[5, 7]]);
    for death in [
        DeathMode::Magnitude,
        DeathMode::Taylor,
        DeathMode::Threshold,
    ] {
        for growth in [GrowthMode::Gradient, GrowthMode::Momentum] {
            for with_momentum in [true, false] {
                let o = opts(death, growth);
                assert!(host_only_reason(&o).is_none());
                let mut r = rng(7, 2);
                let e = SparseEngine::with_options(layers.clone(), cfg(0.3, 0.5, 40), o, &mut r)
                    .unwrap();
                let what = format!("{death:?}/{growth:?}/momentum {with_momentum}");
                let moved = run_steps(e, 4, with_momentum, 11, &what);
                assert!(moved > 0, "{what}: nothing moved, the test tests nothing");
            }
        }
    }
}

#[test]
fn dense_empty_and_capped_layers_and_k_zero() {
    // Layer 0 fully dense (dense_first_layer), the rest at density 0.8 with prune rate 1.0:
    // k = round(active) capped by the few inactive positions, so growth takes all of them.
    let layers = shapes(&[&[4, 3, 3, 3], &[6, 4, 3, 3], &[3, 12]]);
    let o = DstOptions {
        dense_first_layer: true,
        ..DstOptions::default()
    };
    let e =
        SparseEngine::with_options(layers.clone(), cfg(0.85, 1.0, 40), o, &mut rng(3, 2)).unwrap();
    assert_eq!(e.active_count(0), 108);
    assert!(
        e.active_count(1) * 2 > layers[1].numel(),
        "capped case needs density > 0.5"
    );
    run_steps(e, 3, true, 5, "dense + capped");

    // An empty layer (score-based init keeps nothing of layer 1).
    let scores: Vec<Vec<f32>> = layers
        .iter()
        .enumerate()
        .map(|(l, s)| {
            (0..s.numel())
                .map(|i| if l == 1 { 0.0 } else { 1.0 + i as f32 })
                .collect()
        })
        .collect();
    let e = SparseEngine::new_from_scores(
        layers.clone(),
        cfg(0.3, 0.5, 40),
        DstOptions::default(),
        &scores,
        &mut rng(3, 2),
    )
    .unwrap();
    assert_eq!(e.active_count(1), 0);
    run_steps(e, 3, true, 6, "empty layer");

    // Prune rate 0: k = 0 everywhere; nothing changes, history still grows.
    let e = SparseEngine::with_options(
        layers.clone(),
        cfg(0.3, 0.0, 40),
        DstOptions::default(),
        &mut rng(3, 2),
    )
    .unwrap();
    assert_eq!(run_steps(e, 2, true, 7, "k = 0"), 0);

    // All-equal scores: every weight and gradient zero, so every choice is a tie.
    let mut host = SparseEngine::with_options(
        layers.clone(),
        cfg(0.3, 0.5, 40),
        DstOptions::default(),
        &mut rng(3, 2),
    )
    .unwrap();
    let mut dev = host.clone();
    let zeros: Vec<Vec<f32>> = layers.iter().map(|s| vec![0.0; s.numel()]).collect();
    step_both(
        &mut host,
        &mut dev,
        1,
        zeros.clone(),
        zeros.clone(),
        Some(zeros),
        "all ties",
    );
}

#[test]
fn hand_computed_ties_break_by_the_lower_index() {
    // One layer of 8: scores keep positions 0, 2, 4, 6 (density 0.5); prune rate 0.5 -> k = 2.
    let layers = shapes(&[&[2, 4]]);
    let scores = vec![vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]];
    let mut c = cfg(0.5, 0.5, 40);
    c.final_prune_rate = 0.5;
    let host =
        SparseEngine::new_from_scores(layers, c, DstOptions::default(), &scores, &mut rng(1, 2))
            .unwrap();
    let mut dev = host.clone();
    let mut host = host;
    // |w| at the active positions: 0.5, 0.5, 0.5, 0.1 -> drop 6 (0.1), then 0 (first of the
    // tied 0.5s). |grad| at the inactive 1, 3, 5, 7: 2, 2, 2, 1 -> regrow 1 and 3.
    let w = vec![vec![-0.5, 9.0, 0.5, 9.0, 0.5, 9.0, 0.1, 9.0]];
    let g = vec![vec![5.0, -2.0, 5.0, 2.0, 5.0, -2.0, 5.0, 1.0]];
    let (nw, _) = step_both(&mut host, &mut dev, 1, w, g, None, "hand case");
    let last = dev.history().last().unwrap().clone();
    assert_eq!(last.pruned, vec![2]);
    let mask: Vec<bool> = dev.masks_bool()[0].clone();
    assert_eq!(
        mask,
        vec![false, true, true, true, true, false, false, false]
    );
    assert_eq!(nw[0], vec![0.0, 0.0, 0.5, 0.0, 0.5, 9.0, 0.0, 9.0]);
}

#[test]
fn non_finite_inputs_and_host_only_modes_fall_back_to_the_host() {
    let layers = shapes(&[&[4, 9], &[3, 4]]);
    let cpu = Device::Cpu;
    let e = SparseEngine::new(layers.clone(), cfg(0.4, 0.5, 40), &mut rng(2, 2)).unwrap();
    let before = e.history().len();
    let mut dev = e.clone();
    let inactive = (0..36).find(|&i| e.mask(0)[i] == 0.0).unwrap();
    let mut g0 = vec![0.5f32; 36];
    g0[inactive] = f32::NAN;
    let w: Vec<Tensor> = layers
        .iter()
        .map(|s| Tensor::ones(s.shape.as_slice(), candle_core::DType::F32, &cpu).unwrap())
        .collect();
    let g = [Tensor::from_slice(&g0, (4, 9), &cpu).unwrap(), w[1].clone()];
    let masks: Vec<Tensor> = (0..2)
        .map(|l| Tensor::from_slice(e.mask(l), layers[l].shape.as_slice(), &cpu).unwrap())
        .collect();
    let views: Vec<LayerTensors> = (0..2)
        .map(|l| LayerTensors {
            weight: &w[l],
            grad: Some(&g[l]),
            momentum: None,
            mask: &masks[l],
        })
        .collect();
    assert!(update_on_device(&mut dev, 1, &views).unwrap().is_none());
    assert_eq!(
        dev.history().len(),
        before,
        "the fallback changed the engine"
    );
    assert_eq!(dev.masks_bool(), e.masks_bool());
    // The host path then reports the value.
    let mut hw: Vec<Vec<f32>> = layers.iter().map(|s| vec![1.0; s.numel()]).collect();
    let hg = vec![g0, vec![1.0; 12]];
    let err = dev.update(1, &mut hw, &hg).unwrap_err().to_string();
    assert!(err.contains("non-finite gradient"), "{err}");

    // Modes without a device version.
    for (o, want) in [
        (opts(DeathMode::Set, GrowthMode::Gradient), "--death set"),
        (
            opts(DeathMode::Magnitude, GrowthMode::Random),
            "--growth random",
        ),
        (
            opts(DeathMode::Magnitude, GrowthMode::RandomUnfired),
            "--growth random-unfired",
        ),
        (
            DstOptions {
                redistribution: Redistribution::Momentum,
                ..DstOptions::default()
            },
            "--redistribution momentum",
        ),
    ] {
        assert_eq!(host_only_reason(&o).as_deref(), Some(want));
        let mut e =
            SparseEngine::with_options(layers.clone(), cfg(0.4, 0.5, 40), o, &mut rng(2, 2))
                .unwrap();
        let masks: Vec<Tensor> = (0..2)
            .map(|l| Tensor::from_slice(e.mask(l), layers[l].shape.as_slice(), &cpu).unwrap())
            .collect();
        let views: Vec<LayerTensors> = (0..2)
            .map(|l| LayerTensors {
                weight: &w[l],
                grad: Some(&w[l]),
                momentum: Some(&w[l]),
                mask: &masks[l],
            })
            .collect();
        assert!(
            update_on_device(&mut e, 1, &views).unwrap().is_none(),
            "{want}"
        );
    }

    // Tensors that do not fit the engine's layers are an error naming the layer.
    let small = Tensor::ones((2, 2), candle_core::DType::F32, &cpu).unwrap();
    let views: Vec<LayerTensors> = (0..2)
        .map(|l| LayerTensors {
            weight: if l == 0 { &small } else { &w[1] },
            grad: None,
            momentum: None,
            mask: &masks[l],
        })
        .collect();
    let err = update_on_device(&mut dev, 1, &views)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("layer `l0`"), "{err}");
}

/// Trains a tiny run; returns stderr.
fn train(out: &Path, place: &str, generic: bool, extra: &[&str]) -> String {
    let toml = "epochs = 2\ntrain_size = 400\nvalid_size = 100\ntest_size = 100\n\
                batch_size = 100\ndensity = 0.1\n";
    let o = train_cmd(out, toml, generic)
        .args(extra)
        .arg("--out")
        .arg(out)
        .env("REST_MASK_UPDATE", place)
        .output()
        .expect("run rest");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "rest train failed: {err}");
    err
}

fn assert_same_run(a: &Path, b: &Path) {
    for f in [
        "metrics.csv",
        "masks.csv",
        "checkpoint.safetensors",
        "best.safetensors",
    ] {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
    let csv = std::fs::read_to_string(a.join("masks.csv")).unwrap();
    let moved: usize = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(5).unwrap().parse::<usize>().unwrap())
        .sum();
    assert!(moved > 0, "no mask update moved a weight:\n{csv}");
}

#[test]
fn generic_path_run_with_device_updates_matches_host_updates_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (h, d) = (dir.path().join("host"), dir.path().join("device"));
    let log_h = train(&h, "host", true, &[]);
    let log_d = train(&d, "device", true, &[]);
    assert!(!log_h.contains("mask updates run on the device"), "{log_h}");
    assert!(log_d.contains("mask updates run on the device"), "{log_d}");
    assert_same_run(&h, &d);
}

#[test]
fn cpu_kernel_run_with_device_updates_and_snfs_modes_matches_host_updates() {
    let dir = tempfile::tempdir().unwrap();
    let (h, d) = (dir.path().join("host"), dir.path().join("device"));
    let modes = ["--death", "taylor", "--growth", "momentum"];
    train(&h, "host", false, &modes);
    let log = train(&d, "device", false, &modes);
    assert!(log.contains("mask updates run on the device"), "{log}");
    assert_same_run(&h, &d);
    // A mode without a device version says so and runs on the host.
    let log = train(
        &dir.path().join("set"),
        "device",
        false,
        &["--growth", "random", "--epochs", "1"],
    );
    assert!(
        log.contains("mask updates run on the host: --growth random has no device version"),
        "{log}"
    );
}

#[test]
fn bad_mask_update_setting_is_an_error_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(
        &cfg,
        "epochs = 1\ntrain_size = 200\nvalid_size = 100\ntest_size = 100\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(dir.path().join("x"))
        .env("REST_MASK_UPDATE", "gpu")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("REST_MASK_UPDATE=gpu"), "{err}");
}
