//! Tests of the dynamic-sparse-training modes: initial densities of every init mode against
//! closed forms computed here, exact counts / no regrowth of just-dropped positions / zeroing
//! for every death x growth x redistribution combination, ITOP's random-unfired growth, SET and
//! threshold death on hand cases, the linear schedule, update_end, fix, and reporting.

mod common;

use clap::Parser as _;
use common::{shapes, sparse_cfg as cfg};
use rand::Rng as _;
use rest::cli::{Cli, Command};
use rest::sparse::{
    grasp_scores, init_densities, magnitude_scores, snip_scores, DeathMode, DecaySchedule,
    DstOptions, GrowthMode, LayerShape, LinearDecay, Redistribution, SparseEngine, SparseInit,
    UpdateInputs,
};
use rest::util::rng;

fn cnn() -> Vec<LayerShape> {
    shapes(&[
        &[64, 3, 4, 4],
        &[128, 64, 4, 4],
        &[256, 128, 4, 4],
        &[10, 256],
    ])
}

fn mlp() -> Vec<LayerShape> {
    shapes(&[&[100, 2352], &[100, 100], &[100, 100], &[10, 100]])
}

fn resnet18() -> Vec<LayerShape> {
    let mut v: Vec<&[usize]> = vec![&[64, 3, 7, 7]];
    for _ in 0..4 {
        v.push(&[64, 64, 3, 3]);
    }
    v.extend_from_slice(&[&[128, 64, 3, 3], &[128, 128, 3, 3], &[128, 64, 1, 1]]);
    v.extend_from_slice(&[&[128, 128, 3, 3], &[128, 128, 3, 3]]);
    v.extend_from_slice(&[&[256, 128, 3, 3], &[256, 256, 3, 3], &[256, 128, 1, 1]]);
    v.extend_from_slice(&[&[256, 256, 3, 3], &[256, 256, 3, 3]]);
    v.extend_from_slice(&[&[512, 256, 3, 3], &[512, 512, 3, 3], &[512, 256, 1, 1]]);
    v.extend_from_slice(&[&[512, 512, 3, 3], &[512, 512, 3, 3], &[10, 512]]);
    shapes(&v)
}

fn numel(s: &[usize]) -> f64 {
    s.iter().product::<usize>() as f64
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (l, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-9 * w.abs().max(1.0),
            "{what} layer {l}: got {g}, want {w}"
        );
    }
}

/// Proportional-with-cap densities found by trying dense sets in order of decreasing score
/// (a layer tied with a dense one is dense too): the first consistent set wins.
fn capped_proportional(layers: &[LayerShape], d: f64, raw: &[f64], forced: &[usize]) -> Vec<f64> {
    let n: Vec<f64> = layers.iter().map(|l| numel(&l.shape)).collect();
    let total: f64 = n.iter().sum();
    let mut levels: Vec<f64> = raw.to_vec();
    levels.sort_by(|a, b| b.total_cmp(a));
    levels.dedup();
    let mut thresholds = vec![f64::INFINITY];
    thresholds.extend(levels);
    for t in thresholds {
        let dense: Vec<bool> = (0..n.len())
            .map(|l| raw[l] >= t || forced.contains(&l))
            .collect();
        let kept: f64 = (0..n.len()).filter(|&l| dense[l]).map(|l| n[l]).sum();
        let div: f64 = (0..n.len())
            .filter(|&l| !dense[l])
            .map(|l| raw[l] * n[l])
            .sum();
        let eps = (d * total - kept) / div;
        if (0..n.len()).all(|l| dense[l] || raw[l] * eps <= 1.0) {
            return (0..n.len())
                .map(|l| if dense[l] { 1.0 } else { raw[l] * eps })
                .collect();
        }
    }
    panic!("no consistent dense set");
}

fn erk_raw(l: &LayerShape) -> f64 {
    l.shape.iter().sum::<usize>() as f64 / numel(&l.shape)
}

fn er_raw(l: &LayerShape) -> f64 {
    let (o, i) = (l.shape[0] as f64, l.shape[1] as f64);
    (o + i) / (o * i)
}

fn check_counts(layers: &[LayerShape], d: f64, dens: &[f64], engine: &SparseEngine) {
    let total: f64 = layers.iter().map(|l| numel(&l.shape)).sum();
    let mut sum = 0usize;
    for (l, layer) in layers.iter().enumerate() {
        let want = (dens[l] * numel(&layer.shape)).round() as usize;
        let mask_count = engine.mask(l).iter().filter(|&&v| v != 0.0).count();
        assert_eq!(engine.active_count(l), want, "layer {l}");
        assert_eq!(mask_count, want, "layer {l} mask");
        sum += want;
    }
    assert!((sum as f64 - d * total).abs() <= layers.len() as f64);
}

fn opts_init(init: SparseInit, dense_first: bool) -> DstOptions {
    DstOptions {
        sparse_init: init,
        dense_first_layer: dense_first,
        ..Default::default()
    }
}

#[test]
fn erk_and_er_densities_match_closed_form() {
    for (name, layers) in [("cnn", cnn()), ("mlp", mlp()), ("resnet", resnet18())] {
        for d in [0.01, 0.05, 0.2, 0.5] {
            for (init, tag) in [(SparseInit::Erk, "erk"), (SparseInit::Er, "er")] {
                let raw_of = if init == SparseInit::Erk {
                    erk_raw
                } else {
                    er_raw
                };
                let raw: Vec<f64> = layers.iter().map(raw_of).collect();
                let want = capped_proportional(&layers, d, &raw, &[]);
                let got = init_densities(&layers, d, 1.0, init, &[]).unwrap();
                assert_close(&got, &want, &format!("{name} {tag} {d}"));
                let e = SparseEngine::with_options(
                    layers.clone(),
                    cfg(d, 0.5, 0.0, 10, 1000),
                    opts_init(init, false),
                    &mut rng(1, 2),
                )
                .unwrap();
                check_counts(&layers, d, &want, &e);
            }
        }
    }
    // CNN ERK at 0.05 by hand. Scores 75/3072, 200/131072, 392/524288, 266/2560; keep
    // 0.05 * 660992 = 33049.6. eps = 33049.6 / 933: the classifier's 266/2560 * 35.42 > 1, dense.
    // Then eps = (33049.6 - 2560) / 667 = 45.71: layer 0's 75/3072 * 45.71 = 1.12 > 1, dense.
    // Then eps = (33049.6 - 2560 - 3072) / 592, and layers 1, 2 stay below 1.
    let eps = 27417.6 / 592.0;
    let got = init_densities(&cnn(), 0.05, 1.0, SparseInit::Erk, &[]).unwrap();
    assert_close(
        &got,
        &[1.0, 200.0 / 131072.0 * eps, 392.0 / 524288.0 * eps, 1.0],
        "cnn erk by hand",
    );
}

#[test]
fn erk_with_layers_forced_dense() {
    for (name, layers, d) in [
        ("cnn", cnn(), 0.05),
        ("mlp", mlp(), 0.95),
        ("resnet", resnet18(), 0.05),
    ] {
        let raw: Vec<f64> = layers.iter().map(erk_raw).collect();
        let last = layers.len() - 1;
        let want = capped_proportional(&layers, d, &raw, &[0, last]);
        let got = init_densities(&layers, d, 1.0, SparseInit::Erk, &[0, last]).unwrap();
        assert_close(&got, &want, &format!("{name} erk forced"));
        assert_eq!((got[0], got[last]), (1.0, 1.0));
        // --dense-first-layer through the engine.
        let want = capped_proportional(&layers, d, &raw, &[0]);
        let e = SparseEngine::with_options(
            layers.clone(),
            cfg(d, 0.5, 0.0, 10, 1000),
            opts_init(SparseInit::Erk, true),
            &mut rng(3, 2),
        )
        .unwrap();
        check_counts(&layers, d, &want, &e);
        assert_eq!(e.active_count(0), layers[0].numel());
    }
    // The MLP's first layer alone is 92 % of the weights: 5 % cannot keep it dense.
    let err = SparseEngine::with_options(
        mlp(),
        cfg(0.05, 0.5, 0.0, 10, 1000),
        opts_init(SparseInit::Erk, true),
        &mut rng(3, 2),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--dense-first-layer"), "{err}");
}

#[test]
fn uniform_and_uniform_plus_match_closed_form() {
    for (name, layers) in [("cnn", cnn()), ("mlp", mlp()), ("resnet", resnet18())] {
        let n: Vec<f64> = layers.iter().map(|l| numel(&l.shape)).collect();
        let total: f64 = n.iter().sum();
        let last = n.len() - 1;
        for d in [0.05, 0.95] {
            let want = vec![d; n.len()];
            let got = init_densities(&layers, d, 1.0, SparseInit::Uniform, &[]).unwrap();
            assert_close(&got, &want, &format!("{name} uniform {d}"));

            // Dense first layer: the others share d * total - n0 evenly.
            let rest = (d * total - n[0]) / (total - n[0]);
            let first = opts_init(SparseInit::Uniform, true);
            let plus = opts_init(SparseInit::UniformPlus, false);
            if rest <= 0.0 {
                for o in [first, plus] {
                    assert!(SparseEngine::with_options(
                        layers.clone(),
                        cfg(d, 0.5, 0.0, 10, 1000),
                        o,
                        &mut rng(1, 2)
                    )
                    .is_err());
                }
                continue;
            }
            let mut want = vec![rest; n.len()];
            want[0] = 1.0;
            let got = init_densities(&layers, d, 1.0, SparseInit::Uniform, &[0]).unwrap();
            assert_close(&got, &want, &format!("{name} uniform dense-first {d}"));

            // uniform-plus: classifier at 0.2 when both d and its share are below 0.2.
            if d < 0.2 && rest < 0.2 {
                let mid = (d * total - n[0] - 0.2 * n[last]) / (total - n[0] - n[last]);
                want = vec![mid; n.len()];
                want[0] = 1.0;
                want[last] = 0.2;
            }
            let got = init_densities(&layers, d, 1.0, SparseInit::UniformPlus, &[]).unwrap();
            assert_close(&got, &want, &format!("{name} uniform-plus {d}"));
            let e = SparseEngine::with_options(
                layers.clone(),
                cfg(d, 0.5, 0.0, 10, 1000),
                plus,
                &mut rng(1, 2),
            )
            .unwrap();
            check_counts(&layers, d, &want, &e);
        }
    }
    // By hand, CNN at 0.05: mid = (33049.6 - 3072 - 512) / (131072 + 524288).
    let got = init_densities(&cnn(), 0.05, 1.0, SparseInit::UniformPlus, &[]).unwrap();
    let mid = 29465.6 / 655360.0;
    assert_close(&got, &[1.0, mid, mid, 0.2], "cnn uniform-plus by hand");
}

/// The reference: full sort of all scores (descending, then layer, then index).
fn top_scores_reference(scores: &[Vec<f32>], keep: usize, first_dense: bool) -> Vec<Vec<bool>> {
    let mut all: Vec<(f32, usize, usize)> = Vec::new();
    let mut out: Vec<Vec<bool>> = scores.iter().map(|s| vec![false; s.len()]).collect();
    let mut keep = keep;
    for (l, s) in scores.iter().enumerate() {
        if first_dense && l == 0 {
            out[0] = vec![true; s.len()];
            keep -= s.len();
            continue;
        }
        for (i, &v) in s.iter().enumerate() {
            all.push((v, l, i));
        }
    }
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    for &(_, l, i) in all.iter().take(keep) {
        out[l][i] = true;
    }
    out
}

#[test]
fn score_based_inits_keep_the_global_top_scores() {
    for (name, layers) in [("cnn", cnn()), ("mlp", mlp())] {
        let mut r = rng(11, 0);
        let w: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| (0..l.numel()).map(|_| r.random_range(-1.0..1.0)).collect())
            .collect();
        let g: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| (0..l.numel()).map(|_| r.random_range(-1.0..1.0)).collect())
            .collect();
        let total: usize = layers.iter().map(LayerShape::numel).sum();
        for (init, scores, indep) in [
            (SparseInit::Snip, snip_scores(&w, &g), {
                let s: Vec<Vec<f32>> = w
                    .iter()
                    .zip(&g)
                    .map(|(w, g)| w.iter().zip(g).map(|(a, b)| (a * b).abs()).collect())
                    .collect();
                s
            }),
            (SparseInit::Grasp, grasp_scores(&w, &g), {
                // GraSP removes the largest -w*Hg: keep the smallest -w*Hg.
                let s: Vec<Vec<f32>> = w
                    .iter()
                    .zip(&g)
                    .map(|(w, g)| w.iter().zip(g).map(|(a, b)| -(-a * b)).collect())
                    .collect();
                s
            }),
            (SparseInit::GlobalMagnitude, magnitude_scores(&w), {
                let s: Vec<Vec<f32>> = w
                    .iter()
                    .map(|w| w.iter().map(|a| a.abs()).collect())
                    .collect();
                s
            }),
        ] {
            assert_eq!(scores, indep, "{name} {init:?} scores");
            for (d, first) in [(0.05, false), (0.3, false), (0.95, true)] {
                let keep = (d * total as f64).round() as usize;
                let want = top_scores_reference(&indep, keep, first);
                let e = SparseEngine::new_from_scores(
                    layers.clone(),
                    cfg(d, 0.5, 0.0, 10, 1000),
                    opts_init(init, first),
                    &scores,
                    &mut rng(1, 2),
                )
                .unwrap();
                assert_eq!(e.masks_bool(), want, "{name} {init:?} {d}");
                let counts: Vec<usize> = want
                    .iter()
                    .map(|m| m.iter().filter(|&&b| b).count())
                    .collect();
                for (l, &c) in counts.iter().enumerate() {
                    assert_eq!(e.active_count(l), c);
                    assert_eq!(e.densities()[l], c as f64 / layers[l].numel() as f64);
                }
                assert_eq!(counts.iter().sum::<usize>(), keep);
            }
        }
    }
    // Score-based inits need scores; scores must be finite and fit the layers.
    let layers = shapes(&[&[4, 2]]);
    let bad = SparseEngine::with_options(
        layers.clone(),
        cfg(0.5, 0.5, 0.0, 1, 100),
        opts_init(SparseInit::Snip, false),
        &mut rng(1, 2),
    );
    assert!(bad.is_err());
    for scores in [vec![vec![0.0f32; 7]], vec![vec![f32::NAN; 8]]] {
        assert!(SparseEngine::new_from_scores(
            layers.clone(),
            cfg(0.5, 0.5, 0.0, 1, 100),
            opts_init(SparseInit::Snip, false),
            &scores,
            &mut rng(1, 2),
        )
        .is_err());
    }
}

fn small_layers() -> Vec<LayerShape> {
    shapes(&[&[8, 3, 3, 3], &[16, 8, 3, 3], &[10, 16]])
}

/// Sort-based reference: the `k` positions among `cands` with the largest `key` (ties: lower
/// index first).
fn top_k_ref(cands: &[usize], k: usize, key: impl Fn(usize) -> f32) -> Vec<usize> {
    let mut c = cands.to_vec();
    c.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    let mut v = c[..k].to_vec();
    v.sort_unstable();
    v
}

fn bottom_k_ref(cands: &[usize], k: usize, key: impl Fn(usize) -> f32) -> Vec<usize> {
    let mut c = cands.to_vec();
    c.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    let mut v = c[..k].to_vec();
    v.sort_unstable();
    v
}

#[test]
fn every_mode_combination_keeps_exact_counts() {
    let deaths = [
        DeathMode::Magnitude,
        DeathMode::Set,
        DeathMode::Threshold,
        DeathMode::Taylor,
    ];
    let growths = [
        GrowthMode::Gradient,
        GrowthMode::Momentum,
        GrowthMode::Random,
        GrowthMode::RandomUnfired,
    ];
    let redists = [
        Redistribution::None,
        Redistribution::Momentum,
        Redistribution::Magnitude,
        Redistribution::Nonzeros,
    ];
    let layers = small_layers();
    let nl = layers.len();
    let mut combos = Vec::new();
    for &d in &deaths {
        for &g in &growths {
            for &r in &redists {
                combos.push((d, g, r));
            }
        }
    }
    for (c, &(death, growth, redist)) in combos.iter().enumerate() {
        let opts = DstOptions {
            death,
            death_threshold: 0.4,
            growth,
            redistribution: redist,
            ..Default::default()
        };
        let what = format!("{death:?} {growth:?} {redist:?}");
        let mut e = SparseEngine::with_options(
            layers.clone(),
            cfg(0.3, 0.5, 0.05, 5, 200),
            opts,
            &mut rng(c as u64, 2),
        )
        .unwrap();
        let total0: usize = (0..nl).map(|l| e.active_count(l)).sum();
        let mut r = rng(100 + c as u64, 0);
        let mut itop = e.itop_rate();
        let mut updates = 0;
        for step in 1..200 {
            if !e.is_update_step(step) {
                continue;
            }
            updates += 1;
            let before = e.masks_bool();
            let counts_before: Vec<usize> = (0..nl).map(|l| e.active_count(l)).collect();
            let rate = e.prune_rate(step);
            // Active weights random (some exactly zero), inactive ones zero; dense gradients
            // and momentum.
            let mut w: Vec<Vec<f32>> = (0..nl)
                .map(|l| {
                    (0..layers[l].numel())
                        .map(|i| {
                            if !before[l][i] || r.random_bool(0.05) {
                                0.0
                            } else {
                                r.random_range(-1.0..1.0)
                            }
                        })
                        .collect()
                })
                .collect();
            let g: Vec<Vec<f32>> = (0..nl)
                .map(|l| {
                    (0..layers[l].numel())
                        .map(|_| r.random_range(-1.0..1.0))
                        .collect()
                })
                .collect();
            let mut m: Vec<Vec<f32>> = (0..nl)
                .map(|l| {
                    (0..layers[l].numel())
                        .map(|_| r.random_range(-1.0..1.0))
                        .collect()
                })
                .collect();
            let (w0, m0) = (w.clone(), m.clone());
            let stats = e
                .update_with(
                    step,
                    UpdateInputs {
                        weights: &mut w,
                        grads: &g,
                        momentum: Some(&mut m),
                    },
                )
                .unwrap();
            let after = e.masks_bool();
            for l in 0..nl {
                let n = layers[l].numel();
                let active = counts_before[l];
                let k = ((rate * active as f64).round() as usize).min(n - active);
                let on: Vec<usize> = (0..n).filter(|&i| before[l][i]).collect();
                let off: Vec<usize> = (0..n).filter(|&i| !before[l][i]).collect();
                let dropped: Vec<usize> =
                    (0..n).filter(|&i| before[l][i] && !after[l][i]).collect();
                let grown: Vec<usize> = (0..n).filter(|&i| !before[l][i] && after[l][i]).collect();
                // The reported positions are exactly the mask changes: regrown ones were all
                // inactive before, so nothing just dropped is regrown.
                assert_eq!(stats.dropped_positions[l], dropped, "{what} l{l}");
                assert_eq!(stats.regrown_positions[l], grown, "{what} l{l}");
                assert_eq!(stats.pruned[l], dropped.len(), "{what}");
                assert_eq!(stats.grown[l], grown.len(), "{what}");
                // Exact counts.
                let now = after[l].iter().filter(|&&b| b).count();
                assert_eq!(now, e.active_count(l), "{what}");
                assert_eq!(now, stats.counts[l], "{what}");
                assert_eq!(now, active - dropped.len() + grown.len(), "{what}");
                if redist == Redistribution::None {
                    assert_eq!(now, active, "{what} l{l}");
                }
                // Death.
                match death {
                    DeathMode::Magnitude => {
                        assert_eq!(dropped, bottom_k_ref(&on, k, |i| w0[l][i].abs()), "{what}")
                    }
                    DeathMode::Taylor => assert_eq!(
                        dropped,
                        bottom_k_ref(&on, k, |i| (w0[l][i] * g[l][i]).abs()),
                        "{what}"
                    ),
                    DeathMode::Threshold => {
                        let below: Vec<usize> = on
                            .iter()
                            .copied()
                            .filter(|&i| w0[l][i].abs() < 0.4)
                            .collect();
                        assert_eq!(dropped.len(), below.len().min(k), "{what}");
                        assert!(dropped.iter().all(|i| below.contains(i)), "{what}");
                    }
                    DeathMode::Set => assert_eq!(dropped.len(), k, "{what}"),
                }
                // Growth by score: the top-|score| inactive positions, as many as grown.
                match growth {
                    GrowthMode::Gradient => {
                        assert_eq!(grown, top_k_ref(&off, grown.len(), |i| g[l][i].abs()))
                    }
                    GrowthMode::Momentum => {
                        assert_eq!(grown, top_k_ref(&off, grown.len(), |i| m0[l][i].abs()))
                    }
                    _ => {}
                }
                // Zeroed weights and momentum; everything else untouched.
                for i in 0..n {
                    if dropped.contains(&i) || grown.contains(&i) {
                        assert_eq!((w[l][i], m[l][i]), (0.0, 0.0), "{what}");
                    } else {
                        assert_eq!((w[l][i], m[l][i]), (w0[l][i], m0[l][i]), "{what}");
                    }
                }
                // Fired masks hold every active position.
                assert!((0..n).all(|i| !after[l][i] || e.fired_masks()[l][i]));
            }
            let (p, gr): (usize, usize) = (stats.pruned.iter().sum(), stats.grown.iter().sum());
            assert_eq!(p, gr, "{what}: total regrowth = total pruned");
            let total: usize = (0..nl).map(|l| e.active_count(l)).sum();
            assert_eq!(total, total0, "{what}: total exact");
            assert!(e.itop_rate() >= itop, "{what}: ITOP rate fell");
            itop = e.itop_rate();
        }
        assert!(updates >= 10, "{what}: {updates} updates");
        assert_eq!(e.history().len(), updates + 1);
    }
}

#[test]
fn redistribution_moves_budget_by_the_layer_statistic() {
    // Two layers of 100 weights at 50 % (uniform): 50 active each, rate 0.2 -> 10 pruned each.
    // Magnitude redistribution: active |w| = 3.0 in layer 0 and 1.0 in layer 1 -> 20 regrown
    // split 15 / 5, so counts become 55 / 45.
    let layers = shapes(&[&[10, 10], &[10, 10]]);
    let opts = DstOptions {
        sparse_init: SparseInit::Uniform,
        redistribution: Redistribution::Magnitude,
        ..Default::default()
    };
    let mut e =
        SparseEngine::with_options(layers, cfg(0.5, 0.2, 0.2, 1, 100), opts, &mut rng(5, 2))
            .unwrap();
    let masks = e.masks_bool();
    let mut w: Vec<Vec<f32>> = (0..2)
        .map(|l| {
            (0..100)
                .map(|i| {
                    if masks[l][i] {
                        [3.0, 1.0][l] * if i % 2 == 0 { 1.0 } else { -1.0 }
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let g = vec![vec![1.0f32; 100]; 2];
    let s = e.update(1, &mut w, &g).unwrap();
    assert_eq!(s.pruned, vec![10, 10]);
    assert_eq!(s.grown, vec![15, 5]);
    assert_eq!((e.active_count(0), e.active_count(1)), (55, 45));
    // Checkpoint reload accepts moved per-layer counts with the same total, not another total.
    let saved = e.masks_bool();
    let mut e2 = e.clone();
    e2.set_masks_from(saved.clone()).unwrap();
    assert_eq!((e2.active_count(0), e2.active_count(1)), (55, 45));
    let mut fewer = saved;
    let i = fewer[0].iter().position(|&b| b).unwrap();
    fewer[0][i] = false;
    assert!(e2.set_masks_from(fewer).is_err());
}

#[test]
fn momentum_modes_need_momentum() {
    for opts in [
        DstOptions {
            growth: GrowthMode::Momentum,
            ..Default::default()
        },
        DstOptions {
            redistribution: Redistribution::Momentum,
            ..Default::default()
        },
    ] {
        let layers = small_layers();
        let mut e = SparseEngine::with_options(
            layers.clone(),
            cfg(0.3, 0.5, 0.0, 1, 100),
            opts,
            &mut rng(1, 2),
        )
        .unwrap();
        let mut w: Vec<Vec<f32>> = layers.iter().map(|l| vec![0.5; l.numel()]).collect();
        let g = w.clone();
        let err = e.update(1, &mut w, &g).unwrap_err().to_string();
        assert!(err.contains("momentum"), "{err}");
        assert_eq!(e.history().len(), 1);
    }
}

#[test]
fn random_unfired_prefers_never_active_positions() {
    // One layer of 100 weights, 10 active, 5 dropped and regrown per update.
    let layers = shapes(&[&[10, 10]]);
    let opts = DstOptions {
        sparse_init: SparseInit::Uniform,
        growth: GrowthMode::RandomUnfired,
        ..Default::default()
    };
    let mut e =
        SparseEngine::with_options(layers, cfg(0.1, 0.5, 0.5, 1, 1000), opts, &mut rng(9, 2))
            .unwrap();
    let mut r = rng(9, 0);
    let mut rates = vec![e.itop_rate()];
    let mut exhausted = false;
    for step in 1..40 {
        let fired_before = e.fired_masks()[0].clone();
        let mask_before = e.masks_bool()[0].clone();
        let unfired_off = (0..100)
            .filter(|&i| !fired_before[i] && !mask_before[i])
            .count();
        let mut w = vec![(0..100)
            .map(|i| {
                if mask_before[i] {
                    r.random_range(-1.0f32..1.0)
                } else {
                    0.0
                }
            })
            .collect::<Vec<f32>>()];
        let g = vec![vec![0.0f32; 100]];
        let s = e.update(step, &mut w, &g).unwrap();
        let grown = &s.regrown_positions[0];
        assert_eq!(grown.len(), 5);
        let new_ones = grown.iter().filter(|&&i| !fired_before[i]).count();
        // All regrown are new while enough are left; else every unfired one is taken.
        assert_eq!(new_ones, unfired_off.min(5), "step {step}");
        if unfired_off < 5 {
            exhausted = true;
        }
        assert!(grown.iter().all(|&i| !mask_before[i]));
        let rate = e.itop_rate();
        // Each update fires exactly the new positions.
        assert_eq!(
            rate,
            (fired_before.iter().filter(|&&b| b).count() + new_ones) as f64 / 100.0
        );
        rates.push(rate);
    }
    assert!(exhausted);
    assert!(rates.windows(2).all(|p| p[1] >= p[0]));
    assert_eq!(*rates.last().unwrap(), 1.0);
    assert_eq!(e.itop_rates(), vec![1.0]);
    // Plain random growth explores more slowly but also never regrows what was just dropped.
    let opts = DstOptions {
        sparse_init: SparseInit::Uniform,
        growth: GrowthMode::Random,
        ..Default::default()
    };
    let build = || {
        SparseEngine::with_options(
            shapes(&[&[10, 10]]),
            cfg(0.1, 0.5, 0.5, 1, 1000),
            opts.clone(),
            &mut rng(9, 2),
        )
        .unwrap()
    };
    let (mut a, mut b) = (build(), build());
    let mut w = vec![vec![0.0f32; 100]];
    let g = vec![vec![0.0f32; 100]];
    let sa = a.update(1, &mut w.clone(), &g).unwrap();
    let sb = b.update(1, &mut w, &g).unwrap();
    assert_eq!(
        sa, sb,
        "the engine's stream is seeded from the caller's RNG"
    );
}

/// An engine with one layer of 20 weights, the first 8 active, a constant prune rate 0.5
/// (k = 4).
fn hand_engine(opts: DstOptions) -> SparseEngine {
    let layers = shapes(&[&[2, 10]]);
    let opts = DstOptions {
        sparse_init: SparseInit::Uniform,
        ..opts
    };
    let mut e =
        SparseEngine::with_options(layers, cfg(0.4, 0.5, 0.5, 10, 1000), opts, &mut rng(1, 2))
            .unwrap();
    e.set_masks_from(vec![(0..20).map(|i| i < 8).collect()])
        .unwrap();
    e
}

fn hand_weights(active: [f32; 8]) -> Vec<Vec<f32>> {
    let mut w = active.to_vec();
    w.extend([0.0; 12]);
    vec![w]
}

/// Gradients of the 12 inactive positions 8..19: |g| largest at 19, 17, 15 ...
fn hand_grads() -> Vec<Vec<f32>> {
    let mut g = vec![9.0f32; 8];
    g.extend((8..20).map(|i| {
        if i % 2 == 1 {
            i as f32
        } else {
            -(i as f32) / 10.0
        }
    }));
    vec![g]
}

#[test]
fn set_death_hand_cases() {
    let opts = DstOptions {
        death: DeathMode::Set,
        ..Default::default()
    };
    // k = 4: two smallest non-negative (0.0 at 7, 0.05 at 4) and the two negatives closest to
    // zero (-0.02 at 5, -0.1 at 1).
    let mut e = hand_engine(opts.clone());
    let mut w = hand_weights([0.5, -0.1, 0.2, -0.3, 0.05, -0.02, 0.9, 0.0]);
    let s = e.update(10, &mut w, &hand_grads()).unwrap();
    assert_eq!(s.dropped_positions[0], vec![1, 4, 5, 7]);
    // Gradient growth: |g| largest at 19, 17, 15, 13.
    assert_eq!(s.regrown_positions[0], vec![13, 15, 17, 19]);
    assert_eq!(e.active_count(0), 8);
    // One negative weight only: it goes, and three non-negatives (0.02, 0.05, 0.2).
    let mut e = hand_engine(opts);
    let mut w = hand_weights([0.5, -0.1, 0.2, 0.3, 0.05, 0.02, 0.9, 0.4]);
    let s = e.update(10, &mut w, &hand_grads()).unwrap();
    assert_eq!(s.dropped_positions[0], vec![1, 2, 4, 5]);
}

#[test]
fn threshold_death_hand_cases() {
    let opts = |t| DstOptions {
        death: DeathMode::Threshold,
        death_threshold: t,
        ..Default::default()
    };
    let active = [0.5, -0.05, 0.2, 0.08, 0.9, -0.3, 0.01, 0.7];
    // T = 0.1: only 3 weights are below (positions 1, 3, 6), fewer than k = 4; 3 regrown.
    let mut e = hand_engine(opts(0.1));
    let mut w = hand_weights(active);
    let s = e.update(10, &mut w, &hand_grads()).unwrap();
    assert_eq!(s.dropped_positions[0], vec![1, 3, 6]);
    assert_eq!(s.regrown_positions[0], vec![15, 17, 19]);
    assert_eq!(e.active_count(0), 8);
    // T = 1: all 8 below, capped at k = 4 smallest: 0.01, 0.05, 0.08, 0.2.
    let mut e = hand_engine(opts(1.0));
    let mut w = hand_weights(active);
    let s = e.update(10, &mut w, &hand_grads()).unwrap();
    assert_eq!(s.dropped_positions[0], vec![1, 2, 3, 6]);
    assert_eq!(s.regrown_positions[0], vec![13, 15, 17, 19]);
    // T = 0: nothing dropped, nothing grown.
    let mut e = hand_engine(opts(0.0));
    let mut w = hand_weights(active);
    let s = e.update(10, &mut w, &hand_grads()).unwrap();
    assert_eq!((s.pruned[0], s.grown[0]), (0, 0));
}

#[test]
fn linear_schedule_and_update_end() {
    let lin = LinearDecay::new(0.5, 0.1, 100);
    for (step, want) in [
        (0, 0.5),
        (25, 0.4),
        (50, 0.3),
        (99, 0.5 - 0.4 * 0.99),
        (100, 0.1),
        (150, 0.1),
    ] {
        assert!((lin.rate(step) - want).abs() < 1e-12, "step {step}");
    }
    // update_end 0.5 of 1000 steps: the schedule spans 500 steps and masks freeze at 500.
    let mk = |sched| {
        let opts = DstOptions {
            decay_schedule: sched,
            update_end: 0.5,
            ..Default::default()
        };
        SparseEngine::with_options(cnn(), cfg(0.05, 0.5, 0.1, 10, 1000), opts, &mut rng(1, 2))
            .unwrap()
    };
    let e = mk(DecaySchedule::Linear);
    assert_eq!(e.update_end_step(), 500);
    assert!((e.prune_rate(125) - 0.4).abs() < 1e-12);
    assert!((e.prune_rate(500) - 0.1).abs() < 1e-12);
    let c = mk(DecaySchedule::Cosine);
    let want = 0.1 + 0.4 * (1.0 + (std::f64::consts::PI / 4.0).cos()) / 2.0;
    assert!((c.prune_rate(125) - want).abs() < 1e-12);
    for (step, yes) in [
        (10, true),
        (490, true),
        (495, false),
        (500, false),
        (510, false),
    ] {
        assert_eq!(e.is_update_step(step), yes, "step {step}");
    }
    // The frequency is scaled for the update window: only 4 updates (100..400) fit before
    // step 500, so the frequency becomes 499 / 10 = 49.
    let opts = DstOptions {
        update_end: 0.5,
        ..Default::default()
    };
    let e = SparseEngine::with_options(cnn(), cfg(0.05, 0.5, 0.1, 100, 1000), opts, &mut rng(1, 2))
        .unwrap();
    assert_eq!(e.update_frequency(), 49);
    // Defaults reproduce the old engine: cosine over the whole run.
    let e = SparseEngine::new(cnn(), cfg(0.05, 0.5, 0.1, 10, 1000), &mut rng(1, 2)).unwrap();
    assert_eq!(e.update_end_step(), 1000);
    assert!(e.is_update_step(990));
}

#[test]
fn fix_never_changes_masks() {
    let opts = DstOptions {
        fix: true,
        ..Default::default()
    };
    let layers = small_layers();
    let mut e = SparseEngine::with_options(
        layers.clone(),
        cfg(0.3, 0.5, 0.0, 1, 100),
        opts,
        &mut rng(1, 2),
    )
    .unwrap();
    assert!((0..200).all(|s| !e.is_update_step(s)));
    let before = e.masks_bool();
    let mut w: Vec<Vec<f32>> = layers.iter().map(|l| vec![0.5; l.numel()]).collect();
    let w0 = w.clone();
    let g = w.clone();
    let s = e.update(1, &mut w, &g).unwrap();
    assert_eq!(s.pruned, vec![0; 3]);
    assert_eq!(e.masks_bool(), before);
    assert_eq!(w, w0);
    assert_eq!(e.history().len(), 1);
}

#[test]
fn masks_csv_and_fired_masks() {
    let layers = small_layers();
    let mut e =
        SparseEngine::new(layers.clone(), cfg(0.3, 0.5, 0.0, 1, 100), &mut rng(1, 2)).unwrap();
    let init: Vec<usize> = (0..3).map(|l| e.active_count(l)).collect();
    let mut r = rng(2, 0);
    let mut w: Vec<Vec<f32>> = layers
        .iter()
        .map(|l| (0..l.numel()).map(|_| r.random_range(-1.0..1.0)).collect())
        .collect();
    let g = w.clone();
    let s = e.update(3, &mut w, &g).unwrap();
    let csv = e.masks_csv();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "step,layer,nonzero,numel,density,pruned,grown,prune_rate,itop_rate"
    );
    assert_eq!(lines.len(), 1 + 2 * 3);
    for l in 0..3 {
        let n = layers[l].numel();
        let row0: Vec<&str> = lines[1 + l].split(',').collect();
        assert_eq!(row0[0], "0");
        assert_eq!(row0[1], format!("l{l}"));
        assert_eq!(row0[2].parse::<usize>().unwrap(), init[l]);
        assert_eq!(row0[3].parse::<usize>().unwrap(), n);
        assert_eq!(row0[8].parse::<f64>().unwrap(), init[l] as f64 / n as f64);
        let row: Vec<&str> = lines[4 + l].split(',').collect();
        assert_eq!(row[0], "3");
        assert_eq!(row[5].parse::<usize>().unwrap(), s.pruned[l]);
        assert_eq!(row[6].parse::<usize>().unwrap(), s.grown[l]);
        assert_eq!(row[7].parse::<f64>().unwrap(), e.prune_rate(3));
        let itop = (init[l] + s.grown[l]) as f64 / n as f64;
        assert_eq!(row[8].parse::<f64>().unwrap(), itop);
        assert_eq!(e.itop_rates()[l], itop);
    }
    // Fired masks round-trip, and must cover the active positions.
    let fired = e.fired_masks().to_vec();
    let mut e2 = SparseEngine::new(layers, cfg(0.3, 0.5, 0.0, 1, 100), &mut rng(1, 2)).unwrap();
    e2.set_masks_from(e.masks_bool()).unwrap();
    e2.set_fired_masks(fired.clone()).unwrap();
    assert_eq!(e2.fired_masks(), &fired[..]);
    let mut missing = fired;
    let i = e.mask(0).iter().position(|&v| v != 0.0).unwrap();
    missing[0][i] = false;
    assert!(e2.set_fired_masks(missing).is_err());
    assert!(e2.set_fired_masks(vec![vec![true; 3]]).is_err());
}

#[test]
fn cli_flags_and_validation() {
    let parse = |args: &[&str]| -> anyhow::Result<rest::train::TrainConfig> {
        let cli = Cli::try_parse_from(args)?;
        match cli.command {
            Command::Train(t) => t.resolve(),
            _ => anyhow::bail!("not train"),
        }
    };
    let c = parse(&[
        "rest",
        "train",
        "--sparse-init",
        "uniform-plus",
        "--dense-first-layer",
        "--death",
        "set",
        "--growth",
        "random-unfired",
        "--redistribution",
        "nonzeros",
        "--decay-schedule",
        "linear",
        "--update-end",
        "0.75",
        "--fix",
        "--death-threshold",
        "0.01",
    ])
    .unwrap();
    let o = c.sparse.dst_options();
    assert_eq!(
        o,
        DstOptions {
            sparse_init: SparseInit::UniformPlus,
            dense_first_layer: true,
            death: DeathMode::Set,
            death_threshold: 0.01,
            growth: GrowthMode::RandomUnfired,
            redistribution: Redistribution::Nonzeros,
            decay_schedule: DecaySchedule::Linear,
            update_end: 0.75,
            fix: true,
        }
    );
    assert_eq!(
        parse(&["rest", "train"]).unwrap().sparse.dst_options(),
        DstOptions::default()
    );
    for (args, flag) in [
        (vec!["rest", "train", "--update-end", "0"], "--update-end"),
        (vec!["rest", "train", "--update-end", "1.5"], "--update-end"),
        (
            vec!["rest", "train", "--death-threshold", "-1"],
            "--death-threshold",
        ),
        (
            vec!["rest", "train", "--growth", "momentum", "--momentum", "0"],
            "--momentum",
        ),
    ] {
        let err = parse(&args).unwrap_err().to_string();
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}
