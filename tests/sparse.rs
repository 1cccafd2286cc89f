//! Tests of the sparse module: ERK densities against hand-derived values, exact counts, the
//! cosine schedule, and the RigL update against an independent sort-based reference.

mod common;

use common::sparse_cfg as cfg;
use rand::Rng as _;
use rest::sparse::{
    erk_densities, layer_counts, CosineDecay, LayerShape, SparseConfig, SparseEngine,
};
use rest::util::rng;

const TOL: f64 = 1e-12;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * b.abs().max(1.0)
}

fn assert_densities(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (l, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w), "layer {l}: got density {g}, want {w}");
    }
}

fn kept(layers: &[LayerShape], d: &[f64]) -> f64 {
    layers
        .iter()
        .zip(d)
        .map(|(l, d)| d * l.numel() as f64)
        .sum()
}

fn total(layers: &[LayerShape]) -> f64 {
    layers.iter().map(|l| l.numel() as f64).sum()
}

fn two_layers() -> Vec<LayerShape> {
    vec![
        LayerShape::new("fc", &[4, 2]),
        LayerShape::new("conv", &[8, 4, 3, 3]),
    ]
}

fn three_layers() -> Vec<LayerShape> {
    vec![
        LayerShape::new("a", &[10, 5]),
        LayerShape::new("b", &[20, 10]),
        LayerShape::new("c", &[40, 20, 3, 3]),
    ]
}

#[test]
fn layer_shape_numel() {
    assert_eq!(LayerShape::new("x", &[8, 4, 3, 3]).numel(), 288);
    assert_eq!(LayerShape::new("x", &[4, 2]).numel(), 8);
}

#[test]
fn erk_two_layers_no_dense_layer() {
    // fc [4,2]: n = 8, score (4+2)/8 = 3/4. conv [8,4,3,3]: n = 288, score 18/288 = 1/16.
    // density 0.1: budget 0.1 * 296 = 29.6; divisor = 3/4*8 + 1/16*288 = 6 + 18 = 24;
    // eps = 29.6 / 24 = 37/30. fc: 3/4 * 37/30 = 37/40 (< 1, so nothing is made dense);
    // conv: 1/16 * 37/30 = 37/480.
    let layers = two_layers();
    let d = erk_densities(&layers, 0.1, 1.0).unwrap();
    assert_densities(&d, &[37.0 / 40.0, 37.0 / 480.0]);
    assert!((kept(&layers, &d) - 0.1 * 296.0).abs() < 1e-9);
    // round(0.925 * 8) = round(7.4) = 7; round(37/480 * 288) = round(22.2) = 22.
    assert_eq!(layer_counts(&layers, &d), vec![7, 22]);
}

#[test]
fn erk_two_layers_small_layer_forced_dense() {
    // density 0.5: budget 148, eps = 148/24 = 37/6; fc would get 3/4 * 37/6 = 37/8 > 1: dense.
    // Then budget = 0.5*288 - (1-0.5)*8 = 140 for conv alone; divisor = 18; eps = 70/9;
    // conv: 1/16 * 70/9 = 35/72 (and 288 * 35/72 = 140 = 148 - 8).
    let layers = two_layers();
    let d = erk_densities(&layers, 0.5, 1.0).unwrap();
    assert_densities(&d, &[1.0, 35.0 / 72.0]);
    assert!((kept(&layers, &d) - 148.0).abs() < 1e-9);
    assert_eq!(layer_counts(&layers, &d), vec![8, 140]);
}

#[test]
fn erk_three_layers_one_forced_dense() {
    // a [10,5]: n 50, score 15/50 = 0.3; b [20,10]: n 200, score 0.15;
    // c [40,20,3,3]: n 7200, score 66/7200 = 11/1200. Total 7450.
    // density 0.05: budget 372.5; divisor = 15 + 30 + 66 = 111; eps = 372.5/111;
    // a: 0.3 * 372.5/111 = 1.0068 > 1, dense. Budget 372.5 - 50 = 322.5, divisor 96,
    // eps = 322.5/96 = 215/64; b: 0.15 * 215/64 = 0.50390625 <= 1 (stop);
    // c: 11/1200 * 215/64 = 2365/76800.
    let layers = three_layers();
    let d = erk_densities(&layers, 0.05, 1.0).unwrap();
    assert_densities(&d, &[1.0, 0.15 * 215.0 / 64.0, 2365.0 / 76800.0]);
    assert!((kept(&layers, &d) - 372.5).abs() < 1e-9);
    let counts = layer_counts(&layers, &d);
    // 200 * 0.50390625 = 100.78 -> 101; 7200 * 2365/76800 = 221.72 -> 222.
    assert_eq!(counts, vec![50, 101, 222]);
    let sum: usize = counts.iter().sum();
    assert!((sum as f64 - 372.5).abs() <= layers.len() as f64 * 0.5);
}

#[test]
fn erk_three_layers_two_forced_dense_in_turn() {
    // density 0.2: budget 1490, eps = 1490/111, a: 0.3 * 13.42 > 1, dense.
    // Budget 1440, divisor 96, eps 15; b: 0.15 * 15 = 2.25 > 1, dense.
    // Budget 1240, divisor 66; c: 11/1200 * 1240/66 = 1240/7200 = 31/180.
    let layers = three_layers();
    let d = erk_densities(&layers, 0.2, 1.0).unwrap();
    assert_densities(&d, &[1.0, 1.0, 31.0 / 180.0]);
    assert!((kept(&layers, &d) - 1490.0).abs() < 1e-9);
}

#[test]
fn erk_power_scale() {
    // Power 0: every score is 1, so every layer gets the global density.
    let layers = three_layers();
    let d = erk_densities(&layers, 0.3, 0.0).unwrap();
    assert_densities(&d, &[0.3, 0.3, 0.3]);
    // Power 0.5 on the two-layer case at density 0.1: scores sqrt(3/4) and 1/4;
    // eps = 29.6 / (8 sqrt(3/4) + 288/4); fc 0.866 * 0.375 = 0.325 < 1, nothing dense.
    let layers = two_layers();
    let eps = 29.6 / (8.0 * 0.75f64.sqrt() + 72.0);
    let d = erk_densities(&layers, 0.1, 0.5).unwrap();
    assert_densities(&d, &[0.75f64.sqrt() * eps, 0.25 * eps]);
}

#[test]
fn erk_full_density_and_single_layer() {
    assert_eq!(
        erk_densities(&three_layers(), 1.0, 1.0).unwrap(),
        vec![1.0; 3]
    );
    let one = [LayerShape::new("only", &[30, 7])];
    assert_densities(&erk_densities(&one, 0.37, 1.0).unwrap(), &[0.37]);
    assert!(erk_densities(&[], 0.5, 1.0).unwrap().is_empty());
}

/// Random layer sets: the result must be the water-filling solution, i.e. for some eps every
/// sparse layer has density eps * score, every dense layer has eps * score >= 1, and the budget
/// is met exactly.
#[test]
fn erk_random_layers_satisfy_water_filling() {
    let mut r = rng(7, 0);
    for _ in 0..200 {
        let count = r.random_range(1..6);
        let layers: Vec<LayerShape> = (0..count)
            .map(|i| {
                let conv = r.random_bool(0.5);
                let mut shape = vec![r.random_range(1..65), r.random_range(1..65)];
                if conv {
                    let k = r.random_range(1..6);
                    shape.extend([k, k]);
                }
                LayerShape::new(format!("l{i}"), &shape)
            })
            .collect();
        let density = r.random_range(0.01..1.0);
        let d = erk_densities(&layers, density, 1.0).unwrap();
        let score: Vec<f64> = layers
            .iter()
            .map(|l| l.shape.iter().sum::<usize>() as f64 / l.numel() as f64)
            .collect();
        assert!(d.iter().all(|&x| x > 0.0 && x <= 1.0), "{d:?}");
        assert!((kept(&layers, &d) - density * total(&layers)).abs() < 1e-6);
        let eps: Vec<f64> = (0..count)
            .filter(|&l| d[l] < 1.0)
            .map(|l| d[l] / score[l])
            .collect();
        if let Some(&e) = eps.first() {
            for x in &eps {
                assert!(
                    (x - e).abs() <= 1e-9 * e,
                    "sparse layers must share eps: {eps:?}"
                );
            }
            for l in (0..count).filter(|&l| d[l] == 1.0) {
                assert!(
                    e * score[l] >= 1.0 - 1e-9,
                    "layer {l} made dense needlessly"
                );
            }
        }
        let counts = layer_counts(&layers, &d);
        let sum: usize = counts.iter().sum();
        assert!((sum as f64 - density * total(&layers)).abs() <= count as f64);
    }
}

#[test]
fn erk_rejects_bad_density() {
    for bad in [0.0, 1.5, f64::NAN, -1.0, f64::INFINITY] {
        let err = erk_densities(&two_layers(), bad, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--density"), "{bad}: {err}");
    }
    assert!(erk_densities(&two_layers(), 0.5, f64::NAN).is_err());
    let empty_dim = [LayerShape::new("broken", &[3, 0])];
    let err = erk_densities(&empty_dim, 0.5, 1.0).unwrap_err().to_string();
    assert!(err.contains("broken"), "{err}");
}

#[test]
fn layer_counts_round_and_clamp() {
    let layers = [
        LayerShape::new("a", &[3]),
        LayerShape::new("b", &[10, 10]),
        LayerShape::new("c", &[7]),
        LayerShape::new("d", &[4, 4]),
    ];
    // 0.5*3 = 1.5 -> 2 (half away from zero); 1e-9*100 -> 0 -> at least 1;
    // 1.0*7 = 7; 0.49*16 = 7.84 -> 8.
    assert_eq!(
        layer_counts(&layers, &[0.5, 1e-9, 1.0, 0.49]),
        vec![2, 1, 7, 8]
    );
    // Out-of-range densities are clamped to [1, n].
    assert_eq!(layer_counts(&layers[..2], &[2.0, -0.5]), vec![3, 1]);
}

#[test]
fn cosine_decay_values() {
    let s = CosineDecay::new(0.5, 0.005, 100);
    assert!(close(s.rate(0), 0.5));
    // cos(pi/2) = 0: halfway between the rates.
    assert!(close(s.rate(50), 0.005 + 0.495 / 2.0));
    // cos(pi/4) = sqrt(2)/2.
    assert!(close(
        s.rate(25),
        0.005 + 0.495 * (1.0 + 0.5f64.sqrt()) / 2.0
    ));
    assert!(close(s.rate(100), 0.005));
    assert!(close(s.rate(1000), 0.005));
    for t in 0..100 {
        assert!(s.rate(t + 1) <= s.rate(t), "not decreasing at {t}");
    }
    assert!(close(CosineDecay::new(0.5, 0.1, 0).rate(0), 0.1));
}

#[test]
fn engine_initial_masks_have_exact_counts() {
    let layers = three_layers();
    let c = cfg(0.05, 0.5, 0.005, 100, 10_000);
    let e = SparseEngine::new(layers.clone(), c.clone(), &mut rng(1, 3)).unwrap();
    let want = layer_counts(&layers, &erk_densities(&layers, 0.05, 1.0).unwrap());
    for l in 0..layers.len() {
        let m = e.mask(l);
        assert_eq!(m.len(), layers[l].numel());
        assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));
        assert_eq!(m.iter().filter(|&&v| v == 1.0).count(), want[l]);
        assert_eq!(e.active_count(l), want[l]);
        assert!(close(
            e.densities()[l],
            want[l] as f64 / layers[l].numel() as f64
        ));
    }
    let sum: usize = want.iter().sum();
    assert!(close(e.total_density(), sum as f64 / 7450.0));
    assert_eq!(e.layers(), &layers[..]);
    // Same seed, same masks; another seed, other masks.
    let same = SparseEngine::new(layers.clone(), c.clone(), &mut rng(1, 3)).unwrap();
    let other = SparseEngine::new(layers, c, &mut rng(2, 3)).unwrap();
    assert_eq!(e.mask(2), same.mask(2));
    assert_ne!(e.mask(2), other.mask(2));
}

#[test]
fn engine_initial_masks_are_uniform() {
    // One layer of 10 weights at density 0.3: 3 active. Over 4000 draws each position is
    // active ~Binomial(4000, 0.3): mean 1200, sd 29; allow 5 sd.
    let layers = vec![LayerShape::new("w", &[10, 1])];
    let mut r = rng(11, 0);
    let mut hits = [0usize; 10];
    for _ in 0..4000 {
        let e = SparseEngine::new(layers.clone(), cfg(0.3, 0.5, 0.0, 1, 100), &mut r).unwrap();
        for (h, &m) in hits.iter_mut().zip(e.mask(0)) {
            *h += m as usize;
        }
    }
    for (i, h) in hits.iter().enumerate() {
        assert!(
            (1055..=1345).contains(h),
            "position {i} active {h} times of 4000"
        );
    }
}

#[test]
fn update_hand_case() {
    // One layer of 8 weights at density 0.5: 4 active; constant prune rate 0.5: k = 2.
    let layers = vec![LayerShape::new("w", &[2, 4])];
    let mut e = SparseEngine::new(layers, cfg(0.5, 0.5, 0.5, 10, 1000), &mut rng(0, 0)).unwrap();
    let on = |v: &[bool]| v.to_vec();
    e.set_masks_from(vec![on(&[
        true, true, true, true, false, false, false, false,
    ])])
    .unwrap();
    // Active |w|: 0.3, 0.1, 0.1, 0.1 -> drop the two smallest, ties by lower index: 1, 2.
    let mut w = vec![vec![0.3, -0.1, 0.1, 0.1, 7.0, 0.0, 0.0, 5.0]];
    // Position 1 (just dropped) has the largest |grad| of all but must not come back.
    // Inactive |g| at 4..8: 3, 1, 3, 3 -> grow two, ties by lower index: 4, 6.
    let g = vec![vec![100.0, 50.0, 0.0, 0.0, -3.0, 1.0, 3.0, 3.0]];
    let stats = e.update(20, &mut w, &g).unwrap();
    assert_eq!(e.mask(0), &[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]);
    // Dropped 1, 2 and regrown 4, 6 are zero; the rest is untouched.
    assert_eq!(w[0], vec![0.3, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 5.0]);
    assert_eq!(stats.step, 20);
    assert!(close(stats.prune_rate, 0.5));
    assert_eq!(stats.pruned, vec![2]);
    assert_eq!(stats.grown, vec![2]);
    assert_eq!(e.active_count(0), 4);
    assert_eq!(
        e.masks_bool(),
        vec![vec![true, false, false, true, true, false, true, false]]
    );
}

/// Independent reference: full sorts by (|w|, index) and (-|g|, index).
fn expected_sets(mask: &[f32], w: &[f32], g: &[f32], k: usize) -> (Vec<usize>, Vec<usize>) {
    let mut on: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 1.0).collect();
    let mut off: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 0.0).collect();
    on.sort_by(|&a, &b| w[a].abs().partial_cmp(&w[b].abs()).unwrap().then(a.cmp(&b)));
    off.sort_by(|&a, &b| g[b].abs().partial_cmp(&g[a].abs()).unwrap().then(a.cmp(&b)));
    let mut drop = on[..k].to_vec();
    let mut grow = off[..k].to_vec();
    drop.sort_unstable();
    grow.sort_unstable();
    (drop, grow)
}

#[test]
fn update_matches_sort_reference_over_many_steps() {
    let layers = vec![
        LayerShape::new("fc1", &[16, 8]),
        LayerShape::new("conv", &[32, 16, 3, 3]),
        LayerShape::new("fc2", &[10, 32]),
        LayerShape::new("tiny", &[2, 2]),
    ];
    let steps = 2000;
    let c = cfg(0.2, 0.4, 0.01, 50, steps);
    let mut e = SparseEngine::new(layers.clone(), c, &mut rng(5, 1)).unwrap();
    let counts: Vec<usize> = (0..layers.len()).map(|l| e.active_count(l)).collect();
    let mut r = rng(5, 2);
    let mut updates = 0;
    for step in 1..=steps {
        if !e.is_update_step(step) {
            continue;
        }
        updates += 1;
        // Values on a coarse grid so that ties (and exact zeros) are common.
        let mut w: Vec<Vec<f32>> = (0..layers.len())
            .map(|l| {
                (0..layers[l].numel())
                    .map(|i| e.mask(l)[i] * r.random_range(-6i32..=6) as f32 / 4.0)
                    .collect()
            })
            .collect();
        let g: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| {
                (0..l.numel())
                    .map(|_| r.random_range(-6i32..=6) as f32 / 8.0)
                    .collect()
            })
            .collect();
        let before: Vec<Vec<f32>> = (0..layers.len()).map(|l| e.mask(l).to_vec()).collect();
        let w_before = w.clone();
        let t = step as f64 / steps as f64;
        let rate = 0.01 + (0.4 - 0.01) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0;

        let stats = e.update(step, &mut w, &g).unwrap();
        assert!(close(stats.prune_rate, rate));
        for l in 0..layers.len() {
            let n = layers[l].numel();
            let active = counts[l];
            let dense = active == n;
            let k = if dense {
                0
            } else {
                ((rate * active as f64).round() as usize).min(n - active)
            };
            let (want_drop, want_grow) = expected_sets(&before[l], &w_before[l], &g[l], k);
            let after = e.mask(l);
            let dropped: Vec<usize> = (0..n)
                .filter(|&i| before[l][i] == 1.0 && after[i] == 0.0)
                .collect();
            let grown: Vec<usize> = (0..n)
                .filter(|&i| before[l][i] == 0.0 && after[i] == 1.0)
                .collect();
            assert_eq!(dropped, want_drop, "layer {l} step {step}");
            assert_eq!(grown, want_grow, "layer {l} step {step}");
            assert_eq!(stats.pruned[l], k);
            assert_eq!(stats.grown[l], k);
            assert_eq!(after.iter().filter(|&&v| v == 1.0).count(), active);
            assert_eq!(e.active_count(l), active);
            for i in 0..n {
                if want_drop.contains(&i) || want_grow.contains(&i) {
                    assert_eq!(w[l][i], 0.0, "layer {l} position {i}");
                } else {
                    assert_eq!(w[l][i], w_before[l][i], "layer {l} position {i}");
                }
            }
        }
    }
    assert_eq!(updates, steps / 50 - 1);
}

#[test]
fn update_caps_k_by_inactive_positions_and_skips_dense_layers() {
    // Single layer at density 0.9: 9 of 10 active, 1 inactive; round(0.5 * 9) = 5 -> capped 1.
    let layers = vec![LayerShape::new("w", &[10])];
    let mut e = SparseEngine::new(layers, cfg(0.9, 0.5, 0.5, 1, 100), &mut rng(3, 0)).unwrap();
    let mut w = vec![(0..10)
        .map(|i| e.mask(0)[i] * (i as f32 + 1.0))
        .collect::<Vec<f32>>()];
    let g = vec![vec![1.0; 10]];
    let off = e.mask(0).iter().position(|&v| v == 0.0).unwrap();
    let smallest = (0..10).find(|&i| i != off).unwrap();
    let stats = e.update(1, &mut w, &g).unwrap();
    assert_eq!(stats.pruned, vec![1]);
    assert_eq!(e.mask(0)[off], 1.0);
    assert_eq!(e.mask(0)[smallest], 0.0);

    // ERK makes fc dense at density 0.5 (see above); its weights and mask stay as they are.
    let mut e =
        SparseEngine::new(two_layers(), cfg(0.5, 0.5, 0.5, 1, 100), &mut rng(3, 1)).unwrap();
    assert!(e.mask(0).iter().all(|&v| v == 1.0));
    let mut w = vec![vec![0.5f32; 8], vec![0.25f32; 288]];
    let g = vec![vec![1.0f32; 8], vec![2.0f32; 288]];
    let stats = e.update(1, &mut w, &g).unwrap();
    assert_eq!(stats.pruned, vec![0, 70]);
    assert_eq!(w[0], vec![0.5f32; 8]);
    assert!(e.mask(0).iter().all(|&v| v == 1.0));
}

#[test]
fn update_frequency_scaled_for_short_runs() {
    let l = || vec![LayerShape::new("w", &[20, 20])];
    let freq = |f, steps| {
        SparseEngine::new(l(), cfg(0.5, 0.5, 0.0, f, steps), &mut rng(0, 0))
            .unwrap()
            .update_frequency()
    };
    // Updates happen at multiples of the frequency strictly before the last step.
    assert_eq!(freq(1000, 10_001), 1000); // 1000..=10000: 10 updates, kept
    assert_eq!(freq(1000, 10_000), 999); // only 9 fit before step 10000: 9999 / 10
    assert_eq!(freq(1000, 9_999), 999); // 9998 / 10
    assert_eq!(freq(1000, 50), 4); // 49 / 10: updates at 4, 8, ..., 48
    assert_eq!(freq(1000, 5), 1);
    assert_eq!(freq(3, 5), 1);
    assert_eq!(freq(1, 5), 1);
}

#[test]
fn is_update_step_rules() {
    let l = vec![LayerShape::new("w", &[20, 20])];
    let e = SparseEngine::new(l.clone(), cfg(0.5, 0.5, 0.0, 1000, 50), &mut rng(0, 0)).unwrap();
    assert_eq!(e.update_frequency(), 4);
    let steps: Vec<usize> = (0..=60).filter(|&s| e.is_update_step(s)).collect();
    assert_eq!(steps, (1..=12).map(|k| 4 * k).collect::<Vec<_>>());
    // All dense: never.
    let dense = SparseEngine::new(l, cfg(1.0, 0.5, 0.0, 5, 50), &mut rng(0, 0)).unwrap();
    assert!((0..=60).all(|s| !dense.is_update_step(s)));
    assert!(close(dense.total_density(), 1.0));
}

#[test]
fn engine_config_and_input_errors() {
    let l = || three_layers();
    let new = |c: SparseConfig| SparseEngine::new(l(), c, &mut rng(0, 0));
    let msg = |r: anyhow::Result<SparseEngine>| r.unwrap_err().to_string();
    assert!(msg(new(cfg(0.0, 0.5, 0.0, 5, 50))).contains("--density"));
    assert!(msg(new(cfg(0.5, 1.5, 0.0, 5, 50))).contains("--prune-rate"));
    assert!(msg(new(cfg(0.5, 0.5, f64::NAN, 5, 50))).contains("--final-prune-rate"));
    assert!(msg(new(cfg(0.5, 0.5, 0.0, 0, 50))).contains("--update-frequency"));
    assert!(SparseEngine::new(vec![], cfg(0.5, 0.5, 0.0, 5, 50), &mut rng(0, 0)).is_err());

    let mut e = new(cfg(0.1, 0.5, 0.0, 5, 50)).unwrap();
    let snapshot: Vec<Vec<f32>> = (0..3).map(|i| e.mask(i).to_vec()).collect();
    let good_w: Vec<Vec<f32>> = l().iter().map(|x| vec![1.0; x.numel()]).collect();
    let good_g = good_w.clone();
    // Wrong number of tensors.
    assert!(e.update(5, &mut good_w[..2].to_vec(), &good_g).is_err());
    assert!(e.update(5, &mut good_w.clone(), &good_g[..2]).is_err());
    // Wrong length names the layer.
    let mut short = good_w.clone();
    short[1].pop();
    assert!(e
        .update(5, &mut short, &good_g)
        .unwrap_err()
        .to_string()
        .contains("`b`"));
    // A NaN active weight in the last layer: error, and nothing changed in earlier layers.
    let mut nan = good_w.clone();
    let pos = e.mask(2).iter().position(|&v| v == 1.0).unwrap();
    nan[2][pos] = f32::NAN;
    assert!(e
        .update(5, &mut nan, &good_g)
        .unwrap_err()
        .to_string()
        .contains("non-finite"));
    let mut bad_g = good_g.clone();
    let pos = e.mask(2).iter().position(|&v| v == 0.0).unwrap();
    bad_g[2][pos] = f32::INFINITY;
    assert!(e.update(5, &mut good_w.clone(), &bad_g).is_err());
    for (i, m) in snapshot.iter().enumerate() {
        assert_eq!(e.mask(i), &m[..]);
    }
}

#[test]
fn set_masks_from_validates_and_clone_is_independent() {
    let mut e = SparseEngine::new(two_layers(), cfg(0.1, 0.5, 0.0, 5, 50), &mut rng(4, 0)).unwrap();
    let saved = e.masks_bool();
    let mut other =
        SparseEngine::new(two_layers(), cfg(0.1, 0.5, 0.0, 5, 50), &mut rng(9, 0)).unwrap();
    other.set_masks_from(saved.clone()).unwrap();
    assert_eq!(other.mask(1), e.mask(1));

    assert!(e.set_masks_from(saved[..1].to_vec()).is_err());
    let mut wrong_len = saved.clone();
    wrong_len[1].push(false);
    assert!(e
        .set_masks_from(wrong_len)
        .unwrap_err()
        .to_string()
        .contains("`conv`"));
    let mut wrong_count = saved.clone();
    let off = wrong_count[1].iter().position(|&b| !b).unwrap();
    wrong_count[1][off] = true;
    let err = e.set_masks_from(wrong_count).unwrap_err().to_string();
    assert!(err.contains("--density"), "{err}");
    assert_eq!(e.masks_bool(), saved);

    // A clone updates the same way and independently of the original.
    let mut c = e.clone();
    let mut r = rng(4, 1);
    let w: Vec<Vec<f32>> = two_layers()
        .iter()
        .map(|l| {
            (0..l.numel())
                .map(|_| r.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect();
    let g = w
        .iter()
        .map(|v| v.iter().map(|x| x * 0.5 + 0.1).collect())
        .collect::<Vec<_>>();
    let (mut w1, mut w2) = (w.clone(), w);
    e.update(5, &mut w1, &g).unwrap();
    assert_eq!(c.masks_bool(), saved);
    c.update(5, &mut w2, &g).unwrap();
    assert_eq!(c.masks_bool(), e.masks_bool());
    assert_eq!(w1, w2);
    assert_ne!(c.masks_bool(), saved);
}
