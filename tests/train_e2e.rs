//! End-to-end: a tiny REST run trains (its loss falls), writes every output, keeps masks
//! exact; and the CLI turns bad input into a one-line error naming the flag or path.

mod common;

use candle_core::{DType, Device};
use common::{read_json, rest_cmd_env_log, tiny_config, train_losses};
use rest::models::ModelKind;
use rest::train::TrainConfig;

fn tiny(out: &std::path::Path, model: ModelKind, density: f64) -> TrainConfig {
    let mut c = tiny_config(out);
    c.model.kind = model;
    c.sparse.density = density;
    c.optim.epochs = 4;
    c.data.train_size = 1200;
    c
}

fn csv_rows(dir: &std::path::Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics.csv");
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

#[test]
fn tiny_sparse_rest_run_learns_and_writes_outputs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(dir.path(), ModelKind::Cnn, 0.1);
    let out = rest::train::train(&cfg)?;

    // The training loss falls from the first to the last epoch.
    let train_loss = train_losses(dir.path());
    assert_eq!(train_loss.len(), 4);
    assert!(
        train_loss[3] < 0.7 * train_loss[0],
        "training loss did not fall: {train_loss:?}"
    );
    // A test row for the selected epoch, and summary.json with fractions in [0, 1].
    let rows = csv_rows(dir.path());
    assert!(rows
        .iter()
        .any(|r| r[1] == "test" && r[0] == out.summary.selected_epoch.to_string()));
    let summary = read_json(&dir.path().join("summary.json"));
    for k in [
        "accuracy",
        "aligned",
        "conflicting",
        "worst_group",
        "unbiased",
    ] {
        let v = summary["test"][k].as_f64().expect(k);
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert!(summary["selected_epoch"].as_u64().is_some());
    // Better than chance on the unbiased test set after 4 short epochs.
    assert!(
        out.summary.test.unbiased > 0.2,
        "unbiased {}",
        out.summary.test.unbiased
    );
    // The resolved config round-trips.
    let back = TrainConfig::from_toml_file(&dir.path().join("config.toml"))?;
    assert_eq!(back, cfg);

    // best.safetensors: every masked weight is exactly zero and counts match the summary.
    let t = candle_core::safetensors::load(dir.path().join("best.safetensors"), &Device::Cpu)?;
    let mut total_nz = 0usize;
    let mut total = 0usize;
    for ld in &out.summary.layer_densities {
        let w = t[&ld.layer].flatten_all()?.to_vec1::<f32>()?;
        let m = t[&format!("mask.{}", ld.layer)]
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let active = m.iter().filter(|&&v| v != 0.0).count();
        assert_eq!(active, ld.nonzero, "{}", ld.layer);
        assert!(
            w.iter().zip(&m).all(|(w, m)| *m != 0.0 || *w == 0.0),
            "{} has masked nonzeros",
            ld.layer
        );
        total_nz += active;
        total += w.len();
    }
    let d = total_nz as f64 / total as f64;
    assert!((d - 0.1).abs() < 0.01, "total density {d}");
    assert!(
        out.summary.mask_updates >= 10,
        "only {} mask updates",
        out.summary.mask_updates
    );
    Ok(())
}

#[test]
fn dense_mlp_with_loss_weights_runs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = tiny(dir.path(), ModelKind::Mlp, 1.0);
    cfg.method.reweight_mode = rest::train::ReweightMode::Loss;
    cfg.optim.epochs = 3;
    let out = rest::train::train(&cfg)?;
    assert_eq!(out.summary.mask_updates, 0);
    assert_eq!(out.summary.final_density, 1.0);
    let l = train_losses(dir.path());
    assert!(l[2] < l[0], "loss did not fall: {l:?}");
    Ok(())
}

#[test]
fn bad_flags_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let blocked = file.join("run");
    let blocked = blocked.to_str().unwrap();
    for (args, needle) in [
        (vec!["train", "--density", "0"], "--density"),
        (vec!["train", "--density", "1.5"], "--density"),
        (vec!["train", "--upweight", "-1"], "--upweight"),
        (vec!["train", "--conflict-pct", "120"], "--conflict-pct"),
        (vec!["train", "--epochs", "1", "--out", blocked], blocked),
    ] {
        let o = rest_cmd_env_log(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }
}

#[test]
fn flops_command_prints_erk_table() {
    let o = rest_cmd_env_log(&["flops", "--model", "cnn", "--density", "0.05", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5);
    // conv2: 128x64x4x4 weights on 7x7 outputs.
    assert_eq!(layers[1]["numel"], 131072);
    assert_eq!(
        layers[1]["dense_flops"].as_f64().unwrap(),
        2.0 * 131072.0 * 49.0 + 3.0 * 128.0 * 49.0
    );
    let ratio = v["sparse"].as_f64().unwrap() / v["dense"].as_f64().unwrap();
    assert!(ratio < 0.2, "{ratio}");
}

#[test]
fn data_export_writes_npy() {
    let dir = tempfile::tempdir().unwrap();
    let o = rest_cmd_env_log(&[
        "data",
        "export",
        "--out",
        dir.path().to_str().unwrap(),
        "--conflict-pct",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for s in ["train", "valid", "test"] {
        for k in ["images", "labels", "bias"] {
            assert!(dir.path().join(format!("{s}_{k}.npy")).exists());
        }
    }
}

#[test]
fn diverging_loss_stops_with_an_error_naming_epoch_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(dir.path(), ModelKind::Mlp, 1.0);
    cfg.optim.lr = 1e12;
    cfg.optim.epochs = 3;
    let err = match rest::train::train(&cfg) {
        Ok(_) => panic!("a learning rate of 1e12 must diverge"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("epoch") && err.contains("step") && err.contains("--lr"),
        "{err}"
    );
}

/// Kernel environment variables with values `rest` does not understand are named in a
/// warning, not silently ignored.
#[test]
fn unknown_kernel_environment_values_are_warned_about() {
    let run = |var: &str, value: &str| {
        let o = common::rest_bin()
            .args(["flops", "--model", "cnn", "--density", "0.05"])
            .env(var, value)
            .output()
            .expect("run rest");
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run("REST_ISA", "avx9000");
    assert!(
        e.contains("REST_ISA=avx9000 is not an instruction set"),
        "{e}"
    );
    let e = run("REST_KERNELS", "cuda");
    assert!(e.contains("REST_KERNELS=cuda is not understood"), "{e}");
    let e = run("REST_ISA", "portable");
    assert!(!e.contains("WARN"), "{e}");
}
