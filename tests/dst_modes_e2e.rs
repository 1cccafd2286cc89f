//! Every death and growth mode, static sparse training, and the score-based inits train on
//! the built-in data; `masks.csv` shows exact per-layer counts at every update.

mod common;

use common::tiny_config;
use rest::sparse::{DeathMode, GrowthMode, Redistribution, SparseInit};
use rest::train::TrainConfig;
use std::collections::HashMap;

fn tiny(out: &std::path::Path) -> TrainConfig {
    let mut c = tiny_config(out);
    c.sparse.density = 0.1;
    c.optim.epochs = 2;
    c.data.train_size = 640;
    c.data.valid_size = 100;
    c.data.test_size = 100;
    c
}

/// Per layer, the nonzero counts at each row of masks.csv.
fn counts(dir: &std::path::Path) -> HashMap<String, Vec<(usize, usize)>> {
    let text = std::fs::read_to_string(dir.join("masks.csv")).expect("masks.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let (cs, cl, cn) = (col("step"), col("layer"), col("nonzero"));
    let mut out: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        out.entry(f[cl].to_string())
            .or_default()
            .push((f[cs].parse().unwrap(), f[cn].parse().unwrap()));
    }
    out
}

fn run(cfg: TrainConfig) -> rest::train::TrainOutcome {
    rest::train::train(&cfg).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn every_death_and_growth_mode_keeps_exact_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cases: Vec<(String, TrainConfig)> = Vec::new();
    for g in [
        GrowthMode::Gradient,
        GrowthMode::Momentum,
        GrowthMode::Random,
        GrowthMode::RandomUnfired,
    ] {
        let d = tmp.path().join(format!("g-{g:?}"));
        cases.push((format!("{g:?}"), {
            let mut c = tiny(&d);
            c.sparse.growth = g;
            c
        }));
    }
    for death in [
        DeathMode::Magnitude,
        DeathMode::Set,
        DeathMode::Threshold,
        DeathMode::Taylor,
    ] {
        let d = tmp.path().join(format!("d-{death:?}"));
        cases.push((format!("{death:?}"), {
            let mut c = tiny(&d);
            c.sparse.death = death;
            c.sparse.death_threshold = 0.05;
            c
        }));
    }
    for (name, cfg) in cases {
        let dir = cfg.run.out.clone().unwrap();
        let out = run(cfg);
        assert!(
            out.summary.mask_updates >= 10,
            "{name}: {} updates",
            out.summary.mask_updates
        );
        let c = counts(&dir);
        assert_eq!(c.len(), out.summary.layer_densities.len(), "{name}");
        for (layer, rows) in &c {
            assert!(
                rows.len() > out.summary.mask_updates,
                "{name} {layer}: {} rows",
                rows.len()
            );
            let first = rows[0].1;
            assert!(
                rows.iter().all(|r| r.1 == first),
                "{name} {layer}: counts moved {rows:?}"
            );
        }
        let itop = out.summary.itop_rate.unwrap();
        assert!(itop >= out.summary.final_density, "{name}: ITOP {itop}");
    }
}

#[test]
fn redistribution_keeps_the_total_and_fix_never_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("redis");
    let out = run({
        let mut c = tiny(&d);
        c.sparse.redistribution = Redistribution::Magnitude;
        c
    });
    let c = counts(&d);
    let n_rows = c.values().next().unwrap().len();
    for i in 0..n_rows {
        let total: usize = c.values().map(|r| r[i].1).sum();
        let first: usize = c.values().map(|r| r[0].1).sum();
        assert_eq!(total, first, "row {i}");
    }
    assert!(out.summary.mask_updates >= 10);

    let d = tmp.path().join("fix");
    let out = run({
        let mut c = tiny(&d);
        c.sparse.fix = true;
        c
    });
    assert_eq!(out.summary.mask_updates, 0);
    assert!((out.summary.itop_rate.unwrap() - out.summary.final_density).abs() < 1e-9);
}

#[test]
fn score_based_inits_train() {
    let tmp = tempfile::tempdir().unwrap();
    for init in [
        SparseInit::Snip,
        SparseInit::Grasp,
        SparseInit::GlobalMagnitude,
        SparseInit::UniformPlus,
    ] {
        let d = tmp.path().join(format!("{init:?}"));
        let out = run({
            let mut c = tiny(&d);
            c.sparse.sparse_init = init;
            c.optim.epochs = 1;
            c
        });
        let total: usize = out.summary.layer_densities.iter().map(|l| l.nonzero).sum();
        let numel: usize = out
            .summary
            .layer_densities
            .iter()
            .map(|l| l.shape.iter().product::<usize>())
            .sum();
        let dens = total as f64 / numel as f64;
        assert!((dens - 0.1).abs() < 0.005, "{init:?}: density {dens}");
    }
}
