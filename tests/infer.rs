//! `rest eval`, `rest predict` and `rest export` on a tiny trained sparse run: evaluation
//! reproduces the run's summary exactly (also from the sparse export), the export is small,
//! predictions match the model, and bad inputs give one-line errors naming the file.

mod common;

use candle_core::{Device, Tensor};
use common::{ok, read_json, rest_cmd, s, tiny_config};
use rest::models::ModelKind;
use rest::train::TrainConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

/// A one-line `error: ...` on stderr that contains `needle`, and no panic.
fn one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected a failure");
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{err} does not name {needle}");
    assert!(!err.contains("panicked"), "{err}");
}

fn tiny(out: &Path) -> TrainConfig {
    let mut c = tiny_config(out);
    c.data.train_size = 600;
    c.optim.epochs = 2;
    c.sparse.density = 0.05;
    c
}

/// The directory of one tiny trained CNN run (trained once per test binary).
fn run_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("infer-tests-run");
        let _ = std::fs::remove_dir_all(&dir);
        rest::train::train(&tiny(&dir)).expect("tiny training run");
        dir
    })
}

#[test]
fn eval_reproduces_summary_metrics_exactly() {
    let dir = run_dir();
    let summary = read_json(&dir.join("summary.json"));
    let stdout = ok(&rest_cmd(&[
        "eval",
        "--checkpoint",
        s(&dir.join("best.safetensors")),
    ]));
    assert!(stdout.contains("| test "), "{stdout}");
    let eval = read_json(&dir.join("eval.json"));
    assert_eq!(eval["test"], summary["test"]);
    assert_eq!(eval["valid"], summary["valid"]);
    // The per-layer patterns are those the summary reports.
    for (e, s) in eval["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .zip(summary["layer_densities"].as_array().expect("densities"))
    {
        assert_eq!(e["layer"], s["layer"]);
        assert_eq!(e["nonzero"], s["nonzero"]);
    }
    // At density 0.05 at least one layer runs on the sparse kernels.
    assert!(eval["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .any(|l| l["sparse_kernel"] == true));
}

#[test]
fn export_then_eval_gives_the_same_metrics() {
    let dir = run_dir();
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model.safetensors");
    let stdout = ok(&rest_cmd(&[
        "export",
        "--checkpoint",
        s(&dir.join("best.safetensors")),
        "--out",
        s(&model),
    ]));
    assert!(stdout.contains("smaller"), "{stdout}");
    let out = tmp.path().join("e.json");
    ok(&rest_cmd(&[
        "eval",
        "--checkpoint",
        s(&model),
        "--out",
        s(&out),
    ]));
    let eval = read_json(&out);
    let summary = read_json(&dir.join("summary.json"));
    assert_eq!(eval["exported"], true);
    assert_eq!(eval["test"], summary["test"]);
    assert_eq!(eval["valid"], summary["valid"]);
}

#[test]
fn export_is_at_least_8x_smaller_than_dense_safetensors() -> anyhow::Result<()> {
    let dir = run_dir();
    let tmp = tempfile::tempdir()?;
    let ckpt = dir.join("best.safetensors");
    let out = tmp.path().join("m.safetensors");
    let stats = rest::infer::export::export(&ckpt, &out, false)?;
    let export_len = std::fs::metadata(&out)?.len();
    assert_eq!(export_len as usize, stats.export_bytes);

    // An independent dense file of the same weights, written by candle.
    let m = rest::infer::load(&ckpt)?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for p in m.model.params() {
        map.insert(p.name.clone(), p.var.as_tensor().copy()?);
    }
    for b in m.model.buffers()? {
        map.insert(b.name, b.tensor);
    }
    let dense = tmp.path().join("dense.safetensors");
    candle_core::safetensors::save(&map, &dense)?;
    let dense_len = std::fs::metadata(&dense)?.len();
    let ratio = dense_len as f64 / export_len as f64;
    eprintln!("export {export_len} B, dense {dense_len} B, ratio {ratio:.2}");
    assert!(ratio >= 8.0, "ratio {ratio}");
    assert!(
        (stats.ratio - ratio).abs() / ratio < 0.01,
        "{}",
        stats.ratio
    );

    // Half-precision values: smaller still, and the weights within f16 rounding.
    let out16 = tmp.path().join("m16.safetensors");
    let s16 = rest::infer::export::export(&ckpt, &out16, true)?;
    assert!(s16.export_bytes < stats.export_bytes);
    let m16 = rest::infer::load(&out16)?;
    for (a, b) in m.model.params().iter().zip(m16.model.params()) {
        let a = a.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let b = b.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= x.abs() * 1e-3 + 1e-7, "{x} vs {y}");
        }
    }
    Ok(())
}

#[test]
fn predict_on_a_png_matches_the_model() -> anyhow::Result<()> {
    let dir = run_dir();
    let cfg = tiny(dir);
    let ds = rest::data::load(&cfg.data.plan().source)?;
    let (h, w) = (ds.test.height, ds.test.width);
    let i = 7;
    let px = ds.test.images.bytes().expect("images in one buffer")
        [i * h * w * 3..(i + 1) * h * w * 3]
        .to_vec();
    let tmp = tempfile::tempdir()?;
    let png = tmp.path().join("digit.png");
    image::RgbImage::from_raw(w as u32, h as u32, px)
        .expect("image buffer")
        .save(&png)?;

    let stdout = ok(&rest_cmd(&[
        "predict",
        "--checkpoint",
        s(&dir.join("best.safetensors")),
        "--top-k",
        "3",
        s(&png),
    ]));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0])?;
    assert_eq!(v["file"], s(&png));
    let top = v["top"].as_array().expect("top");
    assert_eq!(top.len(), 3);
    let probs: Vec<f64> = top
        .iter()
        .map(|t| t["prob"].as_f64().unwrap_or(-1.0))
        .collect();
    assert!(probs.windows(2).all(|p| p[0] >= p[1]), "{probs:?}");
    assert!(probs.iter().all(|&p| (0.0..=1.0).contains(&p)));
    assert!(probs.iter().sum::<f64>() <= 1.0 + 1e-6);

    // The same image from the dataset, through the library: same class, same probability.
    let m = rest::infer::load(&dir.join("best.safetensors"))?;
    let mut buf = Vec::new();
    ds.test.gather_nchw(&[i], &mut buf)?;
    let x = Tensor::from_vec(buf, (1, 3, h, w), &Device::Cpu)?;
    let p = candle_nn::ops::softmax(&m.model.forward(&x, false)?, 1)?.to_vec2::<f32>()?;
    let best = (0..p[0].len())
        .max_by(|&a, &b| p[0][a].total_cmp(&p[0][b]))
        .unwrap_or(0);
    assert_eq!(top[0]["class"].as_u64(), Some(best as u64));
    assert!((probs[0] - p[0][best] as f64).abs() < 1e-6);

    // A grey image of another size is converted and resized.
    let grey = tmp.path().join("grey.png");
    image::GrayImage::from_fn(40, 40, |x, y| image::Luma([((x * y) % 256) as u8])).save(&grey)?;
    let preds = rest::infer::predict::predict(&m, &[&grey], 10)?;
    let total: f64 = preds[0].top.iter().map(|c| c.prob).sum();
    assert!((total - 1.0).abs() < 1e-4, "all 10 classes sum to {total}");
    Ok(())
}

#[test]
fn truncated_checkpoint_gives_a_one_line_error() -> anyhow::Result<()> {
    let dir = run_dir();
    let tmp = tempfile::tempdir()?;
    std::fs::copy(dir.join("config.toml"), tmp.path().join("config.toml"))?;
    let bytes = std::fs::read(dir.join("best.safetensors"))?;
    let cut = tmp.path().join("best.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2])?;
    one_line_error(
        &rest_cmd(&["eval", "--checkpoint", s(&cut)]),
        "best.safetensors",
    );
    Ok(())
}

#[test]
fn mlp_checkpoint_with_cnn_config_gives_a_one_line_error() -> anyhow::Result<()> {
    let dir = run_dir();
    let tmp = tempfile::tempdir()?;
    // config.toml says CNN; the weights are an MLP's.
    std::fs::copy(dir.join("config.toml"), tmp.path().join("config.toml"))?;
    let mlp = rest::models::build(
        ModelKind::Mlp,
        (3, 28, 28),
        10,
        &mut rest::util::rng(0, 1),
        &Device::Cpu,
    )?;
    let map: HashMap<String, Tensor> = mlp
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    let f = tmp.path().join("mlp.safetensors");
    candle_core::safetensors::save(&map, &f)?;
    let o = rest_cmd(&["eval", "--checkpoint", s(&f)]);
    one_line_error(&o, "mlp.safetensors");
    assert!(String::from_utf8_lossy(&o.stderr).contains("cnn"));
    Ok(())
}

#[test]
fn corrupt_png_gives_an_error_naming_the_file() -> anyhow::Result<()> {
    let dir = run_dir();
    let tmp = tempfile::tempdir()?;
    let bad = tmp.path().join("broken.png");
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(&[0x13; 40]);
    std::fs::write(&bad, bytes)?;
    one_line_error(
        &rest_cmd(&[
            "predict",
            "--checkpoint",
            s(&dir.join("best.safetensors")),
            s(&bad),
        ]),
        "broken.png",
    );
    Ok(())
}
