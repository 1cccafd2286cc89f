//! Times one full training step (forward, backward, SGD update) of REST's Colored-MNIST CNN at
//! batch 256 — Conv(3->64,k4,s2,p1)+BN+ReLU, Conv(64->128)+BN+ReLU, Conv(128->256)+BN+ReLU,
//! global average pool, Linear(256->10) — built from `rest::kernels` ops (CNHW) versus the same
//! network from candle's own ops (NCHW). Also times LfF's MLP (2352-100-100-100-10) step with
//! `rest::kernels::linear` versus candle's `matmul`.
//!
//! Run: `cargo run --release --example cnn_step [-- STEPS [rest|candle|mlp]]` (the optional
//! second argument runs only that part, e.g. for profiling).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rest::kernels::{batch_norm_cnhw_train, conv2d_cnhw, global_avg_pool_cnhw, linear};

// Same allocator as the `rest` binary is expected to use: it reuses freed large buffers
// instead of returning them to the OS, which saves page faults on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 256;
const LR: f64 = 0.01;

struct Params {
    convs: Vec<(Var, Var, Var)>, // weight, gamma, beta
    fc_w: Var,
    fc_b: Var,
}

impl Params {
    fn new(dev: &Device) -> Result<Self> {
        let mut convs = Vec::new();
        for (ic, oc) in [(3, 64), (64, 128), (128, 256)] {
            let std = (2.0 / (ic * 16) as f64).sqrt();
            convs.push((
                Var::randn(0f32, std as f32, (oc, ic, 4, 4), dev)?,
                Var::ones(oc, DType::F32, dev)?,
                Var::zeros(oc, DType::F32, dev)?,
            ));
        }
        Ok(Params {
            convs,
            fc_w: Var::randn(0f32, 0.06, (10, 256), dev)?,
            fc_b: Var::zeros(10, DType::F32, dev)?,
        })
    }
    fn all(&self) -> Vec<&Var> {
        let mut v: Vec<&Var> = self.convs.iter().flat_map(|(a, b, c)| [a, b, c]).collect();
        v.push(&self.fc_w);
        v.push(&self.fc_b);
        v
    }
}

fn sgd(params: &Params, loss: &Tensor) -> Result<()> {
    let grads = loss.backward()?;
    for v in params.all() {
        let g = grads.get(v).context("missing gradient")?;
        v.set(&(v.as_tensor() - (g * LR)?)?)?;
    }
    Ok(())
}

/// Our ops: input already CNHW `[3, N, 28, 28]`.
fn step_rest(p: &Params, x_cnhw: &Tensor, labels: &Tensor) -> Result<f32> {
    let mut h = x_cnhw.clone();
    for (w, g, b) in &p.convs {
        h = conv2d_cnhw(&h, w, 2, 1)?;
        h = batch_norm_cnhw_train(&h, g, b, 1e-5, true)?.0;
    }
    let logits = linear(&global_avg_pool_cnhw(&h)?, &p.fc_w, Some(&p.fc_b))?;
    let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
    sgd(p, &loss)?;
    Ok(loss.to_scalar::<f32>()?)
}

/// Candle's ops: input NCHW `[N, 3, 28, 28]`, batch norm from broadcast ops.
fn step_candle(p: &Params, x: &Tensor, labels: &Tensor) -> Result<f32> {
    let mut h = x.clone();
    for (w, g, b) in &p.convs {
        h = h.conv2d(w, 1, 2, 1, 1)?;
        let c = h.dim(1)?;
        let mean = h.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
        let xc = h.broadcast_sub(&mean)?;
        let var = xc
            .sqr()?
            .mean_keepdim(0)?
            .mean_keepdim(2)?
            .mean_keepdim(3)?;
        let xhat = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        h = xhat
            .broadcast_mul(&g.reshape((1, c, 1, 1))?)?
            .broadcast_add(&b.reshape((1, c, 1, 1))?)?
            .relu()?;
    }
    let pooled = h.flatten_from(2)?.mean(D::Minus1)?;
    let logits = pooled.matmul(&p.fc_w.t()?)?.broadcast_add(&p.fc_b)?;
    let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
    sgd(p, &loss)?;
    Ok(loss.to_scalar::<f32>()?)
}

/// LfF's MLP training step; `ours` picks `rest::kernels::linear` or candle's matmul.
fn step_mlp(layers: &[(Var, Var)], x: &Tensor, labels: &Tensor, ours: bool) -> Result<f32> {
    let mut h = x.clone();
    for (i, (w, b)) in layers.iter().enumerate() {
        h = if ours {
            linear(&h, w, Some(b))?
        } else {
            h.matmul(&w.t()?)?.broadcast_add(b)?
        };
        if i + 1 < layers.len() {
            h = h.relu()?;
        }
    }
    let loss = candle_nn::loss::cross_entropy(&h, labels)?;
    let grads = loss.backward()?;
    for (w, b) in layers {
        for v in [w, b] {
            let g = grads.get(v).context("missing gradient")?;
            v.set(&(v.as_tensor() - (g * LR)?)?)?;
        }
    }
    Ok(loss.to_scalar::<f32>()?)
}

fn mlp(dev: &Device) -> Result<Vec<(Var, Var)>> {
    [(2352, 100), (100, 100), (100, 100), (100, 10)]
        .iter()
        .map(|&(i, o)| {
            Ok((
                Var::randn(0f32, (1.0 / i as f32).sqrt(), (o, i), dev)?,
                Var::zeros(o, DType::F32, dev)?,
            ))
        })
        .collect()
}

fn time(name: &str, steps: usize, mut f: impl FnMut() -> Result<f32>) -> Result<()> {
    f()?;
    f()?;
    let mut times = Vec::new();
    let mut last = 0.0;
    for _ in 0..steps {
        let t = Instant::now();
        last = f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name}: median {:.1} ms, min {:.1} ms over {steps} steps (last loss {last:.4})",
        times[times.len() / 2],
        times[0]
    );
    Ok(())
}

fn main() -> Result<()> {
    let steps: usize = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .with_context(|| format!("STEPS must be a positive integer, got {s:?}"))?,
        None => 10,
    };
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (BATCH, 3, 28, 28), &dev)?;
    let x_cnhw = x.permute((1, 0, 2, 3))?.contiguous()?;
    let labels = Tensor::from_vec(
        (0..BATCH as u32)
            .map(|i| (i * 7) % 10)
            .collect::<Vec<u32>>(),
        BATCH,
        &dev,
    )?;
    println!(
        "CNN training step, batch {BATCH}, {} rayon threads",
        rayon::current_num_threads()
    );
    let only = std::env::args().nth(2);
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if run("rest") {
        let p = Params::new(&dev)?;
        time("rest kernels (CNHW)", steps, || {
            step_rest(&p, &x_cnhw, &labels)
        })?;
    }
    if run("candle") {
        let p = Params::new(&dev)?;
        time("candle ops (NCHW)  ", steps, || {
            step_candle(&p, &x, &labels)
        })?;
    }
    if run("mlp") {
        let xm = x.flatten_from(1)?;
        let layers = mlp(&dev)?;
        time("MLP, rest linear   ", steps, || {
            step_mlp(&layers, &xm, &labels, true)
        })?;
        let layers = mlp(&dev)?;
        time("MLP, candle matmul ", steps, || {
            step_mlp(&layers, &xm, &labels, false)
        })?;
    }
    Ok(())
}
