//! Helpers shared by the integration tests: the `rest` binary, files, configs, random tensors.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use candle_core::{Device, Tensor, Var};
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;
use rest::sparse::{LayerShape, SparseConfig};
use rest::train::TrainConfig;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The binary

/// The `rest` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_rest");

/// A `rest` command that logs warnings and errors only (`REST_LOG=warn`).
pub fn rest_bin() -> Command {
    let mut c = Command::new(BIN);
    c.env("REST_LOG", "warn");
    c
}

/// Runs `rest args` with `REST_LOG=warn`.
pub fn rest_cmd(args: &[&str]) -> Output {
    rest_bin().args(args).output().expect("run rest")
}

/// Runs `rest args` with the logging the environment sets.
pub fn rest_cmd_env_log(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run rest")
}

/// Asserts that `o` succeeded (showing its stderr if not); returns its stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "rest failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stdout then stderr of `o`.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `rest data preview <data> --out <sheet> --per-class 3` and checks the sheet's size:
/// 10 class rows of 6 cells, each `cell` pixels with its frame, 2 pixels apart and from the
/// edges; returns the sheet.
pub fn preview_sheet(data: &Path, sheet: &Path, cell: u32) -> image::RgbImage {
    let o = rest_bin()
        .args(["data", "preview"])
        .arg(data)
        .arg("--out")
        .arg(sheet)
        .args(["--per-class", "3"])
        .output()
        .expect("run rest");
    ok(&o);
    let img = image::open(sheet).expect("sheet").to_rgb8();
    assert_eq!(
        (img.width(), img.height()),
        (2 + 6 * (cell + 2), 2 + 10 * (cell + 2))
    );
    img
}

/// `rest train --threads 2 --config <out>/tiny.toml` (the file written with `toml`), on the
/// generic candle ops (`REST_KERNELS=candle`) or on rest's CPU kernels; the caller adds the
/// remaining arguments (`--out` among them).
pub fn train_cmd(out: &Path, toml: &str, generic: bool) -> Command {
    std::fs::create_dir_all(out).unwrap();
    let cfg = out.join("tiny.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["train", "--threads", "2", "--config"]).arg(&cfg);
    if generic {
        cmd.env("REST_KERNELS", "candle");
    } else {
        cmd.env_remove("REST_KERNELS");
    }
    cmd
}

/// Calls `f` every `poll` until it returns true (then true) or `timeout` has passed (then
/// false).
pub fn wait_until(timeout: Duration, poll: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(poll);
    }
}

/// Sends SIGINT to process `pid` (with `kill -INT`).
pub fn sigint(pid: u32) -> std::io::Result<ExitStatus> {
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
}

/// Waits until `marker` exists (polling every `poll`, for 120 s at most), then `settle` more,
/// and sends SIGINT to `child`: an interruption in the middle of a run.
pub fn sigint_after(
    child: &Child,
    marker: &Path,
    poll: Duration,
    settle: Duration,
) -> std::io::Result<ExitStatus> {
    wait_until(Duration::from_secs(120), poll, || marker.exists());
    std::thread::sleep(settle);
    sigint(child.id())
}

// ---------------------------------------------------------------------------------------------
// Files

/// `p` as UTF-8.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The JSON file `p`.
pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("read json")).expect("parse json")
}

/// The training loss of each epoch, from the `train` rows of `<dir>/metrics.csv`.
pub fn train_losses(dir: &Path) -> Vec<f64> {
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics.csv");
    csv.lines()
        .skip(1)
        .filter(|l| l.split(',').nth(1) == Some("train"))
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect()
}

/// Every file below `dir`, sorted; none below a folder that cannot be read (or is missing).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.expect("entry").path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every file below `dir` (which must be readable, as its subfolders), relative to it and
/// with its bytes, sorted.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("prefix").to_path_buf();
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// The text of the error `r` must be (with its causes).
pub fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

// ---------------------------------------------------------------------------------------------
// Configs

/// A small training run into `out`: batches of 64 at learning rate 0.05, 200 validation and
/// 300 test images; the caller sets the training size, epochs, density and what else it varies.
pub fn tiny_config(out: &Path) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.optim.batch_size = 64;
    c.optim.lr = 0.05;
    c.data.valid_size = 200;
    c.data.test_size = 300;
    c.run.out = Some(out.to_path_buf());
    c
}

/// Layers `l0, l1, ...` of the given weight shapes.
pub fn shapes(list: &[&[usize]]) -> Vec<LayerShape> {
    list.iter()
        .enumerate()
        .map(|(i, s)| LayerShape::new(format!("l{i}"), s))
        .collect()
}

/// A sparse engine config (ERK power scale 1).
pub fn sparse_cfg(
    density: f64,
    rate: f64,
    final_rate: f64,
    freq: usize,
    steps: usize,
) -> SparseConfig {
    SparseConfig {
        density,
        prune_rate: rate,
        final_prune_rate: final_rate,
        update_frequency: freq,
        total_steps: steps,
        erk_power_scale: 1.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Random tensors and comparisons

/// The relative tolerance of [`assert_close`].
pub const RTOL: f32 = 1e-4;

/// `n` values uniform in [-1, 1).
pub fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A tensor of shape `dims` with values uniform in [`lo`, `hi`).
pub fn rand_t_in(rng: &mut ChaCha8Rng, dims: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
}

/// A tensor of shape `dims` with values uniform in [-1, 1).
pub fn rand_t(rng: &mut ChaCha8Rng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    Tensor::from_vec(rand_vec(rng, n), dims, &Device::Cpu).expect("tensor")
}

/// A variable of shape `dims` with values uniform in [-1, 1).
pub fn var(rng: &mut ChaCha8Rng, dims: &[usize]) -> Var {
    let n: usize = dims.iter().product();
    Var::from_vec(rand_vec(rng, n), dims, &Device::Cpu).expect("var")
}

/// A 0/1 mask of `n` entries, each 1 with probability `density`.
pub fn rand_mask(rng: &mut ChaCha8Rng, n: usize, density: f64) -> Vec<f32> {
    (0..n)
        .map(|_| f32::from(rng.random_bool(density)))
        .collect()
}

/// The values of an f32 tensor, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .expect("flatten")
        .to_vec1()
        .expect("to_vec1")
}

/// NCHW to CNHW (or back).
pub fn cnhw(x: &Tensor) -> Tensor {
    x.permute((1, 0, 2, 3)).expect("permute")
}

/// The gradients of `sum(y * r)`.
pub fn loss_grads(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
    (y * r)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("backward")
}

/// `|a - b| <= RTOL * max(1, max|b|)` element-wise.
pub fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (av, bv) = (flat(a), flat(b));
    let scale = bv.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in av.iter().zip(&bv).enumerate() {
        assert!(
            (x - y).abs() <= RTOL * scale,
            "{what}: element {i}: {x} vs {y} (scale {scale})"
        );
    }
}

/// Writes IDX files of `n` 28x28 digits (`train` or `t10k`): digit `i` has label `i % 10`
/// and its pixels are 255 on the left half, `i % 7` elsewhere.
pub fn write_idx(dir: &Path, prefix: &str, n: usize) {
    let mut img = Vec::new();
    for v in [0x0803u32, n as u32, 28, 28] {
        img.extend_from_slice(&v.to_be_bytes());
    }
    let mut lab = Vec::new();
    for v in [0x0801u32, n as u32] {
        lab.extend_from_slice(&v.to_be_bytes());
    }
    for i in 0..n {
        for _y in 0..28 {
            for x in 0..28 {
                img.push(if x < 14 { 255 } else { (i % 7) as u8 });
            }
        }
        lab.push((i % 10) as u8);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).expect("write");
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).expect("write");
}

/// `dir/mnist` with IDX files of 400 training and 90 test digits ([`write_idx`]).
pub fn idx_source(dir: &Path) -> PathBuf {
    let src = dir.join("mnist");
    std::fs::create_dir_all(&src).expect("mkdir");
    write_idx(&src, "train", 400);
    write_idx(&src, "t10k", 90);
    src
}
