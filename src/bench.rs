//! `rest bench`: the speed of one training step and of one inference batch per model and
//! density, on random data, set up exactly as `rest train` sets up a run (ERK masks from the
//! sparse engine, the trainer's masked-layer state `train::masked::MaskedLayers`, our SGD,
//! masks applied after each step). Reports medians over timed iterations after warm-up, the speedup
//! over our dense model, throughput and the peak RSS, as an aligned table or as JSON lines
//! that join with the output of the PyTorch reference `tools/reference/bench.py`.

use crate::kernels::KernelMode;
use crate::models::ModelKind;
use crate::models::{self, Model};
use crate::train::masked::{engine_for_bench, MaskedLayers};
use crate::train::optim::Sgd;
use crate::train::TrainConfig;
use crate::util;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use clap::Args;
use serde::Serialize;
use std::hint::black_box;
use std::time::Instant;

/// Number of classes of the benchmark models (as on Colored MNIST).
const NUM_CLASSES: usize = 10;

/// `rest bench` flags.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Models to time, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "mlp,cnn")]
    pub models: Vec<ModelKind>,
    /// Overall densities, comma-separated, each in (0, 1]; 1 is the dense baseline.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "D,..",
        default_value = "1,0.2,0.05,0.01,0.001"
    )]
    pub densities: Vec<f64>,
    /// Batch size (default: 256; 64 for resnet18).
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Timed iterations per measurement (the median is reported).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up iterations before each measurement.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub warmup: usize,
    /// Kernels for sparse layers, as in `rest train --kernels`.
    #[arg(long, value_enum, default_value = "auto")]
    pub kernels: KernelMode,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Reference timings to compare with: JSON lines as PyTorch's `tools/reference/bench.py`
    /// (CPU or `--device cuda`) prints them (keys `model`, `mode`, `batch`, `hw`,
    /// `threads`, `median_ms`, optional `device`). Each record gets `reference_ms` and
    /// `ratio_vs_reference` (reference median / ours: > 1 is faster than the reference) from
    /// the line with the same model, mode, batch, image size and device (and, on the CPU, the
    /// same thread count).
    #[arg(long, value_name = "FILE")]
    pub reference: Option<std::path::PathBuf>,
    /// Device to time on: `cpu` (rest's kernels), `cuda`, `cuda:N` (candle's CUDA backend;
    /// builds with `--features cuda`) or `auto`. GPU timings synchronise the device after
    /// each step, so they measure completed work.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    /// Input height and width for ResNet models (default: 32); MLP and CNN take 28x28.
    #[arg(long, value_name = "H")]
    pub hw: Option<usize>,
    /// After timing each training step and each inference batch, run them again with every
    /// recorded op timed and print (on stderr) where the time goes: per op and output shape
    /// (which tells the layers apart), calls, forward and backward milliseconds per step,
    /// share of the step.
    #[arg(long)]
    pub profile: bool,
}

/// One reference timing (a line of `tools/reference/bench.py`'s output).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReferenceRecord {
    pub model: String,
    pub mode: String,
    pub batch: usize,
    pub hw: usize,
    pub threads: usize,
    pub median_ms: f64,
    /// `cpu` (the default, for lines without it) or `cuda`.
    #[serde(default)]
    pub device: Option<String>,
}

/// `cpu` or `cuda` (`cuda:1` -> `cuda`).
fn device_kind(name: &str) -> &str {
    name.split(':').next().unwrap_or(name)
}

/// Reads reference timings (JSON lines; blank lines and lines starting with `#` skipped).
pub fn read_reference(path: &std::path::Path) -> Result<Vec<ReferenceRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the --reference file {} (JSON lines from tools/reference/bench.py)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The reference may be run with its stderr folded in: keep only JSON objects.
        if !line.starts_with('{') {
            continue;
        }
        let r: ReferenceRecord = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: not a reference record (needs model, mode, batch, hw, threads, \
                 median_ms)",
                path.display(),
                i + 1
            )
        })?;
        if !(r.median_ms.is_finite() && r.median_ms > 0.0) {
            bail!(
                "{}:{}: median_ms must be a positive number of milliseconds, got {}",
                path.display(),
                i + 1,
                r.median_ms
            );
        }
        out.push(r);
    }
    if out.is_empty() {
        bail!(
            "the --reference file {} holds no timing lines (expected JSON lines from \
             tools/reference/bench.py)",
            path.display()
        );
    }
    Ok(out)
}

/// Fills `reference_ms` / `ratio_vs_reference` of `rec` from the last matching reference line.
fn attach_reference(rec: &mut BenchRecord, refs: &[ReferenceRecord]) {
    let kind = device_kind(&rec.device);
    let hit = refs.iter().rev().find(|r| {
        let rkind = device_kind(r.device.as_deref().unwrap_or("cpu"));
        r.model == rec.model
            && r.mode == rec.mode
            && r.batch == rec.batch
            && r.hw == rec.hw
            && rkind == kind
            // CPU timings compare at equal thread counts; GPU ones whatever the host threads.
            && (kind != "cpu" || r.threads == rec.threads)
    });
    if let Some(r) = hit {
        rec.reference_ms = Some(r.median_ms);
        rec.ratio_vs_reference = Some(round(r.median_ms / rec.median_ms, 4));
    }
}

/// One measurement: a model at a density, in training or inference mode.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRecord {
    pub framework: String,
    pub model: String,
    /// `train` (forward, cross-entropy, backward, SGD step, masks) or `infer`
    /// (`forward(x, false)` and argmax).
    pub mode: String,
    pub density: f64,
    pub batch: usize,
    pub hw: usize,
    pub threads: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The `--kernels` mode, or `dense` at density 1.
    pub kernels: String,
    /// How many of the maskable weights run on sparse kernels.
    pub sparse_layers: usize,
    pub layers: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Median CPU time per call summed over this process's threads, ms (Linux; null
    /// elsewhere). On a machine shared with other jobs, wall time counts the time slices the
    /// others take; CPU time mostly does not, so it is the steadier signal there.
    pub median_cpu_ms: Option<f64>,
    /// Our dense median over this median for the same model and mode (> 1: faster than
    /// dense); null when density 1 was not measured.
    pub ratio_vs_dense: Option<f64>,
    /// Train mode: medians of the step's phases, ms: forward with the loss, backward, and
    /// the SGD step with the masks.
    pub forward_ms: Option<f64>,
    pub backward_ms: Option<f64>,
    pub optim_ms: Option<f64>,
    /// Training steps per second (train mode only).
    pub steps_per_s: Option<f64>,
    pub images_per_s: f64,
    /// Peak resident memory of this process so far (VmHWM), MiB; null where unavailable.
    pub peak_rss_mib: Option<f64>,
    /// With `--reference`: the matching reference median (ms) and the reference median over
    /// ours (> 1: faster than the reference); null without a matching line.
    pub reference_ms: Option<f64>,
    pub ratio_vs_reference: Option<f64>,
}

/// Checks the flags; returns the densities sorted from dense to sparse, without duplicates.
fn validate(args: &BenchArgs) -> Result<Vec<f64>> {
    if args.models.is_empty() {
        bail!("--models needs at least one model (e.g. --models mlp,cnn)");
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1 (timed iterations per measurement)");
    }
    if args.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    if args.hw == Some(0) {
        bail!("--hw must be at least 1 (input height and width in pixels, e.g. --hw 128)");
    }
    if args.hw.is_some() {
        if let Some(m) = args.models.iter().find(|m| !m.entry().any_size) {
            let (_, h, w) = m.entry().bench_input;
            bail!(
                "--hw applies to ResNet models only (those of any image size); {} takes \
                 {h}x{w} images (drop --hw or --models {})",
                m.as_str(),
                m.as_str()
            );
        }
    }
    let mut ds = args.densities.clone();
    if ds.is_empty() {
        bail!("--densities needs at least one density in (0, 1] (e.g. --densities 1,0.05)");
    }
    for &d in &ds {
        if !(d.is_finite() && d > 0.0 && d <= 1.0) {
            bail!("--densities: every density must be in (0, 1], got {d}");
        }
    }
    ds.sort_by(|a, b| b.total_cmp(a));
    ds.dedup();
    Ok(ds)
}

/// Default batch and input `(channels, height, width)` of a model, from its registration
/// (`models::ModelEntry`): 256 Colored-MNIST images for the CNN and the MLP, 64 CIFAR-sized
/// images for ResNets.
fn model_defaults(kind: ModelKind) -> (usize, (usize, usize, usize)) {
    let e = kind.entry();
    (e.bench_batch, e.bench_input)
}

/// Peak resident set size of this process in MiB (`VmHWM` in `/proc/self/status`), if the
/// platform has it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `v` rounded to `digits` decimals (the timer's resolution is far coarser than f64's).
fn round(v: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (v * k).round() / k
}

/// Median, minimum and maximum of `v` (non-empty).
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    };
    (median, v[0], v[n - 1])
}

/// CPU time consumed so far by all threads of this process, in nanoseconds
/// (`CLOCK_PROCESS_CPUTIME_ID`); `None` where unavailable.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
pub fn process_cpu_ns() -> Option<u64> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    /// Linux's `CLOCK_PROCESS_CPUTIME_ID`.
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid, writable `struct timespec` (two 64-bit fields on 64-bit Linux).
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.sec as u64 * 1_000_000_000 + ts.nsec as u64)
}

/// CPU time of this process (unavailable on this platform).
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
pub fn process_cpu_ns() -> Option<u64> {
    None
}

/// Runs `f` `warmup` times untimed, then `steps` times timed; wall and (if available) CPU
/// milliseconds per call.
fn time_it(
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(steps);
    let mut cpu = Some(Vec::with_capacity(steps));
    for _ in 0..steps {
        let c0 = process_cpu_ns();
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        match (c0, process_cpu_ns(), cpu.as_mut()) {
            (Some(a), Some(b), Some(v)) => v.push(b.saturating_sub(a) as f64 * 1e-6),
            _ => cpu = None,
        }
    }
    Ok((ms, cpu))
}

/// A model set up as the trainer sets up a run: optimizer and, below density 1, its masked
/// layers (`train::masked::MaskedLayers`, as training builds them).
struct Setup {
    model: Box<dyn Model>,
    opt: Sgd,
    layers: Option<MaskedLayers>,
}

impl Setup {
    /// Per layer, whether it runs on the sparse kernels.
    fn sparse_layers(&self) -> (usize, usize) {
        match &self.layers {
            Some(l) => (
                l.kernel_choice().filter(|(_, s)| *s).count(),
                l.weights.len(),
            ),
            None => (0, self.model.weights().len()),
        }
    }
}

fn setup(
    kind: ModelKind,
    input: (usize, usize, usize),
    density: f64,
    kernels: KernelMode,
    dev: &Device,
) -> Result<Setup> {
    let cfg = TrainConfig::default();
    let mut init_rng = util::rng(cfg.optim.seed, 1);
    let model = models::build(kind, input, NUM_CLASSES, &mut init_rng, dev)?;
    let opt = Sgd::new(
        model.params(),
        cfg.optim.lr,
        cfg.optim.momentum,
        cfg.optim.weight_decay,
    );
    let layers = if density < 1.0 {
        let weights = model.weights();
        // Long enough that the engine keeps the update frequency as configured.
        let engine = engine_for_bench(&weights, &cfg, density, 100 * cfg.sparse.update_frequency)?;
        Some(MaskedLayers::new(engine, weights, &opt, kernels, dev)?)
    } else {
        None
    };
    Ok(Setup { model, opt, layers })
}

/// One training step as the trainer runs it between mask updates; pushes the milliseconds of
/// its phases (forward with the loss, backward, SGD step with the masks) to `phases`.
fn train_step(s: &mut Setup, x: &Tensor, y: &Tensor, phases: &mut [Vec<f64>; 3]) -> Result<()> {
    let t0 = Instant::now();
    let tape = crate::kernels::tape::start_lean();
    let logits = s.model.forward(x, true)?;
    let rec = tape.finish(logits)?;
    let loss = crate::kernels::softmax_nll(rec.head(), y)?.mean_all()?;
    let loss_v = loss.to_scalar::<f32>()?;
    if !loss_v.is_finite() {
        bail!("the benchmark loss became {loss_v}");
    }
    let t1 = Instant::now();
    let grads = rec.backward(&loss)?;
    let t2 = Instant::now();
    s.opt.step(&grads)?;
    if let Some(l) = &s.layers {
        l.apply(false, &mut s.opt)?;
    }
    black_box(loss_v);
    let t3 = Instant::now();
    for (v, (a, b)) in phases.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3)]) {
        v.push((b - a).as_secs_f64() * 1e3);
    }
    Ok(())
}

fn infer_step(s: &Setup, x: &Tensor) -> Result<()> {
    let _ng = crate::kernels::tape::no_grad();
    let logits = s.model.forward(x, false)?;
    black_box(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    Ok(())
}

/// Runs the benchmark; calls `on_record` as each measurement finishes (dense first per
/// model) and returns all of them.
pub fn run(args: &BenchArgs, mut on_record: impl FnMut(&BenchRecord)) -> Result<Vec<BenchRecord>> {
    let densities = validate(args)?;
    let refs = match &args.reference {
        Some(p) => read_reference(p)?,
        None => Vec::new(),
    };
    let dev = crate::device::open(args.device)?;
    let device_name = match &dev {
        Device::Cpu => "cpu".to_string(),
        _ => args.device.to_string(),
    };
    let threads = rayon::current_num_threads();
    let mut out = Vec::new();
    for &kind in &args.models {
        let (default_batch, mut input) = model_defaults(kind);
        if let Some(hw) = args.hw {
            input = (input.0, hw, hw);
        }
        let batch = args.batch.unwrap_or(default_batch);
        let mut rng = util::rng(0, 4);
        let xs: Vec<f32> = (0..batch * input.0 * input.1 * input.2)
            .map(|_| rand::Rng::random::<f32>(&mut rng))
            .collect();
        let ys: Vec<u32> = (0..batch).map(|i| (i % NUM_CLASSES) as u32).collect();
        let y = Tensor::from_vec(ys, batch, &dev)?;
        let mut dense_ms: [Option<f64>; 2] = [None, None];
        for &density in &densities {
            let mut s = setup(kind, input, density, args.kernels, &dev)
                .with_context(|| format!("setting up {} at density {density}", kind.as_str()))?;
            // The batch in the layout the data loader would deliver to this model.
            let x = s.model.input_layout().tensor(&xs, batch, input, &dev)?;
            let kernels = if density < 1.0 {
                format!("{:?}", args.kernels).to_lowercase()
            } else {
                "dense".to_string()
            };
            for (m, mode) in ["train", "infer"].into_iter().enumerate() {
                let mut phases: [Vec<f64>; 3] = Default::default();
                let (mut ms, cpu) = if m == 0 {
                    time_it(args.warmup, args.steps, || {
                        train_step(&mut s, &x, &y, &mut phases)?;
                        Ok(dev.synchronize()?)
                    })?
                } else {
                    // As in an evaluation loop: the weights do not change between batches.
                    let _frozen = crate::kernels::freeze_weights();
                    time_it(args.warmup, args.steps, || {
                        infer_step(&s, &x)?;
                        Ok(dev.synchronize()?)
                    })?
                };
                let (median, min, max) = stats(&mut ms);
                let median_cpu = cpu.map(|mut v| stats(&mut v).0);
                if args.profile {
                    let mut none: [Vec<f64>; 3] = Default::default();
                    crate::kernels::profile::enable(true);
                    let _frozen = (m == 1).then(crate::kernels::freeze_weights);
                    let t = Instant::now();
                    for _ in 0..args.steps {
                        if m == 0 {
                            train_step(&mut s, &x, &y, &mut none)?;
                        } else {
                            infer_step(&s, &x)?;
                        }
                        dev.synchronize()?;
                    }
                    let step_ms = t.elapsed().as_secs_f64() * 1e3 / args.steps as f64;
                    crate::kernels::profile::enable(false);
                    let rows = crate::kernels::profile::take();
                    eprintln!(
                        "{}",
                        profile_table(kind.as_str(), mode, density, step_ms, args.steps, &rows)
                    );
                }
                // Phase medians over the timed steps only (the warm-up steps come first).
                let mut phase = |i: usize| -> Option<f64> {
                    let v = &mut phases[i];
                    (v.len() >= args.steps).then(|| stats(&mut v[args.warmup..]).0)
                };
                let (forward_ms, backward_ms, optim_ms) = (phase(0), phase(1), phase(2));
                if density == 1.0 {
                    dense_ms[m] = Some(median);
                }
                let rec = BenchRecord {
                    framework: format!("rest-{}", env!("CARGO_PKG_VERSION")),
                    model: kind.as_str().to_string(),
                    mode: mode.to_string(),
                    density,
                    batch,
                    hw: input.1,
                    threads,
                    device: device_name.clone(),
                    kernels: kernels.clone(),
                    sparse_layers: s.sparse_layers().0,
                    layers: s.sparse_layers().1,
                    median_ms: round(median, 3),
                    min_ms: round(min, 3),
                    max_ms: round(max, 3),
                    median_cpu_ms: median_cpu.map(|v| round(v, 3)),
                    ratio_vs_dense: dense_ms[m].map(|d| round(d / median, 4)),
                    forward_ms: forward_ms.map(|v| round(v, 3)),
                    backward_ms: backward_ms.map(|v| round(v, 3)),
                    optim_ms: optim_ms.map(|v| round(v, 3)),
                    steps_per_s: (m == 0).then(|| round(1e3 / median, 2)),
                    images_per_s: round(batch as f64 * 1e3 / median, 1),
                    peak_rss_mib: peak_rss_mib().map(|v| round(v, 1)),
                    reference_ms: None,
                    ratio_vs_reference: None,
                };
                let mut rec = rec;
                attach_reference(&mut rec, &refs);
                on_record(&rec);
                out.push(rec);
            }
        }
    }
    Ok(out)
}

/// The `--profile` breakdown of one model at one density: per recorded op and output shape,
/// the mean calls, forward and backward milliseconds per step and their share of the
/// profiled step (`step_ms`, which also holds the loss, the SGD step and the masks), heaviest
/// first.
pub fn profile_table(
    model: &str,
    mode: &str,
    density: f64,
    step_ms: f64,
    steps: usize,
    rows: &[(String, crate::kernels::profile::OpTime)],
) -> String {
    use std::fmt::Write as _;
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e3 / steps.max(1) as f64;
    let mut rows: Vec<_> = rows.iter().collect();
    rows.sort_by(|a, b| {
        let t = |r: &crate::kernels::profile::OpTime| r.forward + r.backward;
        t(&b.1).cmp(&t(&a.1))
    });
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(2).max(2);
    let mut s = format!(
        "profile: {model} {mode} at density {density}, {step_ms:.2} ms per step ({steps} steps)\n\
         {:<width$}  calls    fwd ms    bwd ms  share\n",
        "op"
    );
    let (mut fwd, mut bwd) = (0.0, 0.0);
    for (k, t) in &rows {
        let (f, b) = (per(t.forward), per(t.backward));
        fwd += f;
        bwd += b;
        let _ = writeln!(
            s,
            "{k:<width$}  {:>5.1}  {f:>8.3}  {b:>8.3}  {:>4.1} %",
            t.calls as f64 / steps.max(1) as f64,
            100.0 * (f + b) / step_ms.max(1e-9)
        );
    }
    let _ = write!(
        s,
        "{:<width$}         {fwd:>8.3}  {bwd:>8.3}  {:>4.1} % (the rest: loss, SGD, masks, glue)",
        "recorded ops",
        100.0 * (fwd + bwd) / step_ms.max(1e-9)
    );
    s
}

/// The human-readable table of `records`.
pub fn table(records: &[BenchRecord]) -> String {
    let head = [
        "model",
        "mode",
        "density",
        "batch",
        "kernels",
        "sparse",
        "median ms",
        "cpu ms",
        "vs dense",
        "steps/s",
        "images/s",
        "fwd/bwd/opt ms",
        "vs ref",
    ];
    let with_ref = records.iter().any(|r| r.reference_ms.is_some());
    let head = if with_ref {
        &head[..]
    } else {
        &head[..head.len() - 1]
    };
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for r in records {
        rows.push(vec![
            r.model.clone(),
            r.mode.clone(),
            format!("{}", r.density),
            r.batch.to_string(),
            r.kernels.clone(),
            format!("{}/{}", r.sparse_layers, r.layers),
            format!("{:.2}", r.median_ms),
            r.median_cpu_ms
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.ratio_vs_dense
                .map(|v| format!("{v:.2}x"))
                .unwrap_or_else(|| "-".into()),
            r.steps_per_s
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            format!("{:.0}", r.images_per_s),
            match (r.forward_ms, r.backward_ms, r.optim_ms) {
                (Some(f), Some(b), Some(o)) => format!("{f:.1}/{b:.1}/{o:.1}"),
                _ => "-".into(),
            },
            r.ratio_vs_reference
                .map(|v| format!("{v:.2}x"))
                .unwrap_or_else(|| "-".into()),
        ]);
        if let Some(row) = rows.last_mut() {
            row.truncate(head.len());
        }
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| {
                // Text columns left-aligned, numbers right-aligned.
                if c < 2 || c == 4 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect();
        s.push_str(cells.join("  ").trim_end());
        s.push('\n');
    }
    s
}

/// `rest bench`: runs the benchmark and prints JSON lines (as they finish) or a table.
pub fn main(args: &BenchArgs) -> Result<()> {
    validate(args)?;
    if let Some(p) = &args.reference {
        // Fail on a bad reference file before minutes of timing.
        read_reference(p)?;
    }
    util::set_threads(args.threads)?;
    let json = args.json;
    let mut err = None;
    let body = || {
        run(args, |r| {
            if json {
                match serde_json::to_string(r) {
                    Ok(line) => println!("{line}"),
                    Err(e) => err = Some(e),
                }
            }
        })
    };
    let records = util::in_pool(body)?;
    if let Some(e) = err {
        return Err(e).context("writing a benchmark record as JSON");
    }
    if !json {
        print!("{}", table(&records));
        match peak_rss_mib() {
            Some(m) => println!("peak RSS: {m:.1} MiB"),
            None => println!("peak RSS: unavailable (no /proc/self/status)"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs> {
        Ok(Wrap::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))?.args)
    }

    #[test]
    fn profile_counts_every_recorded_op_of_each_step() -> Result<()> {
        // The CNN at density 1: per step, three conv+BN+ReLU ops, the pool and the classifier
        // (recorded, with a backward pass), and the loss (run after the recording).
        let dev = Device::Cpu;
        let input = (3, 28, 28);
        let mut s = setup(ModelKind::Cnn, input, 1.0, KernelMode::Auto, &dev)?;
        let batch = 4;
        let xs: Vec<f32> = (0..batch * 3 * 28 * 28)
            .map(|i| (i % 7) as f32 / 7.0)
            .collect();
        let x = s.model.input_layout().tensor(&xs, batch, input, &dev)?;
        let y = Tensor::from_vec(vec![0u32, 1, 2, 3], batch, &dev)?;
        let mut phases: [Vec<f64>; 3] = Default::default();
        crate::kernels::profile::enable(true);
        for _ in 0..3 {
            train_step(&mut s, &x, &y, &mut phases)?;
        }
        crate::kernels::profile::enable(false);
        let rows = crate::kernels::profile::take();
        let calls: usize = rows.iter().map(|(_, t)| t.calls).sum();
        assert_eq!(calls, 3 * 6, "{rows:?}");
        let (recorded, loss): (Vec<_>, Vec<_>) = rows
            .iter()
            .partition(|(k, _)| !k.starts_with("rest-softmax-nll"));
        assert_eq!(loss.len(), 1, "{rows:?}");
        assert!(recorded
            .iter()
            .all(|(_, t)| t.backward > std::time::Duration::ZERO));
        assert!(rows
            .iter()
            .any(|(k, _)| k.starts_with("rest-conv-bn-relu-cnhw [64, 4, 14, 14]")));
        let table = profile_table("cnn", "train", 1.0, 1000.0, 3, &rows);
        assert_eq!(table.lines().count(), 2 + rows.len() + 1, "{table}");
        assert!(table.contains("recorded ops"), "{table}");
        // Nothing is collected while profiling is off.
        train_step(&mut s, &x, &y, &mut phases)?;
        assert!(crate::kernels::profile::take().is_empty());
        // Inference: the eval ops (folded BatchNorm), forward only.
        crate::kernels::profile::enable(true);
        infer_step(&s, &x)?;
        crate::kernels::profile::enable(false);
        let rows = crate::kernels::profile::take();
        let calls: usize = rows.iter().map(|(_, t)| t.calls).sum();
        // Three conv+BN+ReLU ops and the pool, or (AVX-512) the stack that runs them as one.
        let stack = rows.iter().any(|(k, _)| k.starts_with("rest-conv-stack"));
        assert_eq!(calls, if stack { 2 } else { 5 }, "{rows:?}");
        assert!(
            stack
                || rows
                    .iter()
                    .any(|(k, _)| k.starts_with("rest-conv-bn-relu-eval-cnhw [64, 4, 14, 14]")),
            "{rows:?}"
        );
        assert!(rows
            .iter()
            .all(|(_, t)| t.backward == std::time::Duration::ZERO));
        Ok(())
    }

    #[test]
    fn mlp_smoke_run_gives_parseable_json_lines_with_required_keys() -> Result<()> {
        let args = parse(&[
            "--models",
            "mlp",
            "--densities",
            "0.05,1",
            "--batch",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--kernels",
            "sparse",
            "--json",
        ])?;
        let mut lines = Vec::new();
        let records = run(&args, |r| {
            lines.push(serde_json::to_string(r).unwrap_or_default())
        })?;
        assert_eq!(lines.len(), 4, "{lines:?}");
        let mut seen = Vec::new();
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)?;
            for key in [
                "model",
                "mode",
                "density",
                "batch",
                "median_ms",
                "ratio_vs_dense",
                "kernels",
            ] {
                assert!(v.get(key).is_some(), "{key} missing in {line}");
            }
            assert_eq!(v["model"], "mlp");
            assert_eq!(v["batch"], 8);
            let median = v["median_ms"].as_f64().unwrap_or(-1.0);
            assert!(median > 0.0, "{line}");
            let (lo, hi) = (v["min_ms"].as_f64(), v["max_ms"].as_f64());
            assert!(lo <= Some(median) && Some(median) <= hi, "{line}");
            if v["mode"] == "train" {
                // The phases partition the step. With 2 timed steps a median is a mean, so
                // the phase medians sum to the mean step time (less the timer overhead).
                let parts: Vec<f64> = ["forward_ms", "backward_ms", "optim_ms"]
                    .iter()
                    .map(|k| v[*k].as_f64().unwrap_or(-1.0))
                    .collect();
                assert!(parts.iter().all(|&p| p > 0.0), "{line}");
                let sum: f64 = parts.iter().sum();
                assert!(sum <= hi.unwrap_or(0.0), "{line}");
                assert!(sum >= 0.8 * lo.unwrap_or(f64::MAX), "{line}");
            } else {
                assert!(v["forward_ms"].is_null(), "{line}");
            }
            let ratio = v["ratio_vs_dense"].as_f64().unwrap_or(-1.0);
            let density = v["density"].as_f64().unwrap_or(-1.0);
            let kernels = v["kernels"].as_str().unwrap_or("");
            if density == 1.0 {
                assert_eq!(ratio, 1.0, "{line}");
                assert_eq!(kernels, "dense");
                assert_eq!(v["sparse_layers"], 0);
            } else {
                assert!(ratio > 0.0, "{line}");
                assert_eq!(kernels, "sparse");
                // Every MLP layer is below density 1 under ERK at 0.05.
                assert_eq!(v["sparse_layers"], 4, "{line}");
            }
            seen.push((
                v["mode"].as_str().unwrap_or("").to_string(),
                density.to_string(),
            ));
        }
        // Dense first (the ratio's baseline), each density in both modes.
        let want: Vec<(String, String)> = [("train", 1.0), ("infer", 1.0)]
            .into_iter()
            .chain([("train", 0.05), ("infer", 0.05)])
            .map(|(m, d)| (m.to_string(), d.to_string()))
            .collect();
        assert_eq!(seen, want);
        // The ratio is the dense median over this median (both rounded in the record).
        let dense_train = records[0].median_ms;
        let r = &records[2];
        let want_ratio = dense_train / r.median_ms;
        let got = r.ratio_vs_dense.unwrap_or(0.0);
        // Rounding the medians to 1 us and the ratio to 1e-4 bounds the difference.
        let tol = want_ratio * (5e-4 / dense_train + 5e-4 / r.median_ms) + 5e-5 + 1e-12;
        assert!((got - want_ratio).abs() <= tol, "{got} vs {want_ratio}");
        assert!(table(&records).lines().count() == 5);
        Ok(())
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (args, flag) in [
            (vec!["--densities", "0"], "--densities"),
            (vec!["--densities", "1.5"], "--densities"),
            (vec!["--steps", "0"], "--steps"),
            (vec!["--batch", "0"], "--batch"),
            (vec!["--models", "resnet18", "--hw", "0"], "--hw"),
            // The default models (MLP, CNN) take 28x28 only.
            (vec!["--hw", "64"], "--hw"),
        ] {
            let a = match parse(&args) {
                Ok(a) => a,
                Err(e) => panic!("{args:?} should parse: {e}"),
            };
            let err = validate(&a).expect_err("must fail").to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        assert!(parse(&["--device", "tpu"]).is_err());
        if !crate::device::CUDA_BUILT {
            let a = parse(&["--models", "mlp", "--device", "cuda"]).expect("parses");
            let err = format!("{:#}", run(&a, |_| {}).expect_err("no CUDA in this build"));
            assert!(
                err.contains("--device cuda") && err.contains("--features cuda"),
                "{err}"
            );
        }
        let a = parse(&["--models", "resnet18,resnet10", "--hw", "64"]).expect("parses");
        assert_eq!(a.hw, Some(64));
        assert!(validate(&a).is_ok());
    }

    #[test]
    fn median_min_max_and_peak_rss() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0];
        assert_eq!(stats(&mut v), (2.5, 1.0, 5.0));
        let mut v = vec![4.0, 9.0, 1.0];
        assert_eq!(stats(&mut v), (4.0, 1.0, 9.0));
        if cfg!(target_os = "linux") {
            // This test process holds at least a few MiB and far less than a TiB.
            let m = peak_rss_mib().unwrap_or(0.0);
            assert!(m > 1.0 && m < 1e6, "{m}");
        }
    }

    #[test]
    fn reference_lines_join_on_model_mode_batch_hw_threads() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("torch.jsonl");
        let threads = rayon::current_num_threads();
        // What tools/reference/bench.py prints, plus noise it may be mixed with: a non-matching batch, a
        // non-JSON log line, a comment.
        std::fs::write(
            &path,
            format!(
                "# torch reference\nWarning: something\n\
                 {{\"framework\": \"pytorch\", \"model\": \"mlp\", \"batch\": 8, \"hw\": 28, \"mode\": \"train\", \"threads\": {threads}, \"median_ms\": 40.0}}\n\
                 {{\"framework\": \"pytorch\", \"model\": \"mlp\", \"batch\": 8, \"hw\": 28, \"mode\": \"infer\", \"threads\": {threads}, \"device\": \"cuda\", \"median_ms\": 2.0}}\n\
                 {{\"framework\": \"pytorch\", \"model\": \"mlp\", \"batch\": 16, \"hw\": 28, \"mode\": \"infer\", \"threads\": {threads}, \"median_ms\": 1.0}}\n"
            ),
        )?;
        let p = path.display().to_string();
        let args = parse(&[
            "--models",
            "mlp",
            "--densities",
            "1",
            "--batch",
            "8",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--reference",
            &p,
        ])?;
        let recs = run(&args, |_| {})?;
        let train = recs
            .iter()
            .find(|r| r.mode == "train")
            .expect("train record");
        let infer = recs
            .iter()
            .find(|r| r.mode == "infer")
            .expect("infer record");
        assert_eq!(train.reference_ms, Some(40.0));
        let want = round(40.0 / train.median_ms, 4);
        assert_eq!(train.ratio_vs_reference, Some(want));
        // The infer lines are for batch 16 or the GPU: no match on the CPU.
        assert_eq!(infer.reference_ms, None);
        assert_eq!(infer.ratio_vs_reference, None);
        let t = table(&recs);
        assert!(t.lines().next().unwrap_or("").ends_with("vs ref"), "{t}");
        assert!(t.contains(&format!("{:.2}x", want)), "{t}");

        // Bad files: named in the error.
        std::fs::write(&path, "{\"model\": \"mlp\"}\n")?;
        let e = format!("{:#}", read_reference(&path).unwrap_err());
        assert!(
            e.contains("torch.jsonl:1") && e.contains("median_ms"),
            "{e}"
        );
        std::fs::write(&path, "\n# nothing\n")?;
        let e = format!("{:#}", read_reference(&path).unwrap_err());
        assert!(e.contains("no timing lines"), "{e}");
        let e = format!(
            "{:#}",
            read_reference(&dir.path().join("missing.jsonl")).unwrap_err()
        );
        assert!(
            e.contains("missing.jsonl") && e.contains("--reference"),
            "{e}"
        );
        Ok(())
    }
}
