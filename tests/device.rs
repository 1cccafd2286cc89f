//! The GPU code path without a GPU: `REST_KERNELS=candle` runs every layer on the generic
//! candle ops that CUDA tensors use (dense weights with masks, candle's autograd), and a
//! training run on it must follow the run on rest's CPU kernels step for step (same losses up
//! to float rounding). Also: `--device` errors on a build without CUDA support.

use std::path::Path;
use std::process::Command;

fn train(out: &Path, generic: bool, extra: &str) -> Vec<f64> {
    std::fs::create_dir_all(out).unwrap();
    let cfg = out.join("tiny.toml");
    std::fs::write(
        &cfg,
        format!(
            "epochs = 2\ntrain_size = 800\nvalid_size = 200\ntest_size = 200\n\
             batch_size = 100\ndensity = 0.1\n{extra}"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rest"));
    cmd.args(["train", "--threads", "2", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(out);
    if generic {
        cmd.env("REST_KERNELS", "candle");
    } else {
        cmd.env_remove("REST_KERNELS");
    }
    let o = cmd.output().expect("run rest");
    assert!(
        o.status.success(),
        "rest train failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics.csv");
    csv.lines()
        .skip(1)
        .filter(|l| l.split(',').nth(1) == Some("train"))
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn generic_ops_train_like_the_cpu_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let ours = train(&dir.path().join("cpu"), false, "");
    let generic = train(&dir.path().join("generic"), true, "");
    assert_eq!(ours.len(), 2);
    assert_eq!(generic.len(), 2);
    for (a, b) in ours.iter().zip(&generic) {
        assert!(
            (a - b).abs() <= 5e-3 * a.abs().max(1e-3),
            "train loss per epoch: CPU kernels {ours:?} vs generic ops {generic:?}"
        );
    }
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("generic/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["device"], "cpu");
}

/// A ResNet with the ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 max pooling), residual
/// joins and a linear head: every layer type of the GPU path, with its backward and the SGD
/// step, two short epochs on each path.
#[test]
fn generic_ops_train_a_resnet_like_the_cpu_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "model = \"resnet10\"\nwidth = 8\nstem = \"imagenet\"\n";
    let ours = train(&dir.path().join("cpu"), false, extra);
    let generic = train(&dir.path().join("generic"), true, extra);
    assert_eq!(ours.len(), 2);
    for (a, b) in ours.iter().zip(&generic) {
        assert!(
            (a - b).abs() <= 2e-2 * a.abs().max(1e-3),
            "train loss per epoch: CPU kernels {ours:?} vs generic ops {generic:?}"
        );
    }
}

#[test]
fn device_flag_errors_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (dev, want) in [("tpu", "--device tpu"), ("cuda:x", "integer")] {
        let o = Command::new(env!("CARGO_BIN_EXE_rest"))
            .args(["train", "--epochs", "1", "--device", dev, "--out"])
            .arg(dir.path().join("x"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err}");
    }
    if !rest::device::CUDA_BUILT {
        let o = Command::new(env!("CARGO_BIN_EXE_rest"))
            .args(["train", "--epochs", "1", "--device", "cuda", "--out"])
            .arg(dir.path().join("y"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--features cuda"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
