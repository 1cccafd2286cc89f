//! The GPU code path without a GPU: `REST_KERNELS=candle` runs every layer on the generic
//! candle ops that CUDA tensors use (dense weights with masks, candle's autograd), and a
//! training run on it must follow the run on rest's CPU kernels step for step (same losses up
//! to float rounding). Also: `--device` errors on a build without CUDA support.

mod common;

use common::{train_cmd, train_losses, BIN};
use std::path::Path;
use std::process::Command;

fn train(out: &Path, generic: bool, extra: &str) -> Vec<f64> {
    let toml = format!(
        "epochs = 2\ntrain_size = 800\nvalid_size = 200\ntest_size = 200\n\
         batch_size = 100\ndensity = 0.1\n{extra}"
    );
    let o = train_cmd(out, &toml, generic)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run rest");
    assert!(
        o.status.success(),
        "rest train failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    train_losses(out)
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
        let o = Command::new(BIN)
            .args(["train", "--epochs", "1", "--device", dev, "--out"])
            .arg(dir.path().join("x"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err}");
    }
    if !rest::device::CUDA_BUILT {
        let o = Command::new(BIN)
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
