//! Readers of user files never panic (#22): seeded mutations (bytes flipped, inserted,
//! deleted, cut short) of valid IDX files, CIFAR-10 batches, DFA file names, config and sweep
//! TOML, run checkpoints and sparse exports give a value or an error. (The table readers and
//! `.pth` checkpoints have their own tests in `table.rs` and `init_from.rs`.) A bounded,
//! deterministic stand-in for fuzzing: every case runs a few hundred variants.

mod common;

use anyhow::Result;
use rand::{Rng, RngCore};
use rest::util::Rng as ChaCha;
use std::path::Path;

/// A mutation of `b`: 1-4 edits, mostly in the first `head` bytes (where headers lie).
fn mutate(b: &[u8], head: usize, rng: &mut ChaCha) -> Vec<u8> {
    let mut b = b.to_vec();
    for _ in 0..rng.random_range(1..5) {
        let span = if rng.random_bool(0.8) {
            head.min(b.len())
        } else {
            b.len()
        }
        .max(1);
        let i = rng.random_range(0..span);
        match rng.random_range(0..5) {
            0 | 1 if i < b.len() => b[i] = rng.next_u32() as u8,
            2 => b.insert(i.min(b.len()), rng.next_u32() as u8),
            3 if i < b.len() => {
                b.remove(i);
            }
            _ => b.truncate(i),
        }
    }
    b
}

/// Runs `f` on `n` mutations of `valid`; returns how many were errors (a panic fails the
/// test).
fn count_errors(
    valid: &[u8],
    head: usize,
    n: usize,
    seed: u64,
    f: impl Fn(&[u8]) -> bool,
) -> usize {
    let mut rng = rest::util::rng(seed, 0);
    assert!(f(valid), "the unmutated input must be accepted");
    (0..n)
        .filter(|_| !f(&mutate(valid, head, &mut rng)))
        .count()
}

#[test]
fn idx_and_cifar_readers() {
    // 5 IDX images of 4x3 and their labels.
    let mut img = Vec::new();
    for v in [0x0803u32, 5, 4, 3] {
        img.extend_from_slice(&v.to_be_bytes());
    }
    img.extend((0..60).map(|v| v as u8));
    let e = count_errors(&img, 16, 400, 1, |b| {
        rest::data::idx::parse_images(b, "t").is_ok()
    });
    assert!(e > 100, "{e}");
    let mut lab = Vec::new();
    for v in [0x0801u32, 5] {
        lab.extend_from_slice(&v.to_be_bytes());
    }
    lab.extend([1, 2, 3, 4, 5]);
    let e = count_errors(&lab, 8, 400, 2, |b| {
        rest::data::idx::parse_labels(b, "t").is_ok()
    });
    assert!(e > 100, "{e}");
    let images: Vec<u8> = (0..3 * 32 * 32 * 3).map(|v| (v % 251) as u8).collect();
    let batch = rest::data::cifar::encode_batch(&images, &[1, 2, 3]).expect("encode");
    let e = count_errors(&batch, 8, 400, 3, |b| {
        rest::data::cifar::parse_batch(b, Path::new("b.bin")).is_ok()
    });
    assert!(e > 100, "{e}");
}

#[test]
fn dfa_file_names() {
    let mut rng = rest::util::rng(4, 0);
    for _ in 0..2000 {
        let name = mutate(b"dir/123_4_7.png", 15, &mut rng);
        let name = String::from_utf8_lossy(&name).into_owned();
        let _ = rest::data::dfa::parse_name(Path::new(&name));
    }
}

#[test]
fn config_and_sweep_toml() {
    let full = include_str!("fixtures/config-full.toml");
    let e = count_errors(full.as_bytes(), full.len(), 400, 5, |b| {
        rest::train::TrainConfig::from_toml_str(&String::from_utf8_lossy(b)).is_ok()
    });
    assert!(e > 100, "{e}");
    let sweep = "[base]\nepochs = 5\n[grid]\ndensity = [1.0, 0.1]\nseed = [41, 42]\n\
                 [zip]\nconflict_pct = [1, 2]\nupweight = [10, 30]\n";
    let e = count_errors(sweep.as_bytes(), sweep.len(), 400, 6, |b| {
        rest::sweep::SweepSpec::parse(&String::from_utf8_lossy(b), Path::new("s.toml")).is_ok()
    });
    assert!(e > 100, "{e}");
}

#[test]
fn run_checkpoints_and_sparse_exports() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let mut cfg = common::tiny_config(&run);
    cfg.model.kind = rest::models::ModelKind::Mlp;
    cfg.optim.epochs = 1;
    cfg.data.train_size = 256;
    cfg.data.valid_size = 64;
    cfg.data.test_size = 64;
    cfg.sparse.density = 0.1;
    rest::train::train(&cfg)?;
    let export = dir.path().join("m.safetensors");
    rest::infer::export::export(&run.join("best.safetensors"), &export, false)?;
    for (file, seed) in [(run.join("best.safetensors"), 7), (export, 8)] {
        let valid = std::fs::read(&file)?;
        let e = count_errors(&valid, 2048, 150, seed, |b| {
            std::fs::write(&file, b).expect("write");
            rest::infer::load(&file).is_ok()
        });
        assert!(e > 40, "{}: {e}", file.display());
        std::fs::write(&file, &valid)?;
    }
    Ok(())
}
