//! Batch normalisation over CNHW activations (one contiguous row of `N*H*W` values per
//! channel), PyTorch semantics: training mode normalises with the batch mean and biased
//! variance and reports them so the caller can update running statistics (momentum 0.1, with
//! the unbiased variance); evaluation mode uses running statistics. Optionally fused with a
//! following ReLU in the forward and backward passes (saves one full pass over memory each).

use rayon::prelude::*;

use crate::util::{simd_dispatch, sum_lanes, LANES};

/// PyTorch's default `eps`.
pub const BN_EPS: f32 = 1e-5;
/// PyTorch's default running-statistics momentum.
pub const BN_MOMENTUM: f32 = 0.1;

/// Per-channel batch statistics from a training-mode forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct BnBatchStats {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// Biased (divide by `M = N*H*W`) batch variance per channel.
    pub var: Vec<f32>,
}

simd_dispatch! {
    fn row_mean_var(x: &[f32]) -> (f32, f32) {
        let m = x.len() as f32;
        let mean = sum_lanes(x) / m;
        let mut acc = [0.0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let d = c[l] - mean;
                acc[l] += d * d;
            }
        }
        let mut s: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        for a in acc {
            s += a;
        }
        (mean, s / m)
    }
}

simd_dispatch! {
    fn row_affine(x: &[f32], a: f32, b: f32, relu: bool, y: &mut [f32]) {
        if relu {
            for (yv, xv) in y.iter_mut().zip(x) {
                *yv = (xv * a + b).max(0.0);
            }
        } else {
            for (yv, xv) in y.iter_mut().zip(x) {
                *yv = xv * a + b;
            }
        }
    }
}

/// All ones where `t > 0`, zero elsewhere: ANDed with a value's bits it gates the value the way
/// the ReLU's derivative does, without a branch (so the loops below vectorise).
#[inline(always)]
fn relu_gate(t: f32) -> u32 {
    ((t > 0.0) as u32).wrapping_neg()
}

/// `dy` gated by the fused ReLU: `relu = (a, b)` is the forward's affine map, and the ReLU
/// passed the gradient where `x * a + b > 0`, computed here with the forward's rounding (so
/// the mask is exactly the forward's `y > 0`, without keeping `y`).
#[inline(always)]
fn gated(dy: f32, x: f32, relu: (f32, f32)) -> f32 {
    f32::from_bits(dy.to_bits() & relu_gate(x * relu.0 + relu.1))
}

simd_dispatch! {
    /// `(sum g, sum g*(x-mean))` with `g = dy`, gated by the fused ReLU when `relu` is given.
    fn row_bwd_sums(x: &[f32], dy: &[f32], relu: Option<(f32, f32)>, mean: f32) -> (f32, f32) {
        let mut s0 = [0.0f32; LANES];
        let mut s1 = [0.0f32; LANES];
        let n = x.len() / LANES * LANES;
        let (x, dy) = (&x[..x.len()], &dy[..x.len()]);
        let (mut t0, mut t1) = (0.0f32, 0.0f32);
        match relu {
            Some(ab) => {
                for (xc, dc) in x[..n].chunks_exact(LANES).zip(dy[..n].chunks_exact(LANES)) {
                    for l in 0..LANES {
                        let g = gated(dc[l], xc[l], ab);
                        s0[l] += g;
                        s1[l] += g * (xc[l] - mean);
                    }
                }
                for idx in n..x.len() {
                    let g = gated(dy[idx], x[idx], ab);
                    t0 += g;
                    t1 += g * (x[idx] - mean);
                }
            }
            None => {
                for (xc, dc) in x[..n].chunks_exact(LANES).zip(dy[..n].chunks_exact(LANES)) {
                    for l in 0..LANES {
                        s0[l] += dc[l];
                        s1[l] += dc[l] * (xc[l] - mean);
                    }
                }
                for idx in n..x.len() {
                    t0 += dy[idx];
                    t1 += dy[idx] * (x[idx] - mean);
                }
            }
        }
        for l in 0..LANES {
            t0 += s0[l];
            t1 += s1[l];
        }
        (t0, t1)
    }
}

simd_dispatch! {
    /// `dx = a*g + b1*(x - mean) + b0`, `g` = `dy` gated by the fused ReLU when `relu` is given.
    fn row_bwd_dx(x: &[f32], dy: &[f32], relu: Option<(f32, f32)>, coef: [f32; 4], dx: &mut [f32]) {
        let [a, b0, b1, mean] = coef;
        let n = dx.len();
        let (x, dy) = (&x[..n], &dy[..n]);
        match relu {
            Some(ab) => {
                for i in 0..n {
                    dx[i] = a * gated(dy[i], x[i], ab) + b1 * (x[i] - mean) + b0;
                }
            }
            None => {
                for i in 0..n {
                    dx[i] = a * dy[i] + b1 * (x[i] - mean) + b0;
                }
            }
        }
    }
}

/// The forward's affine map of channel `ch`: `y = x * a + b` (before the ReLU).
fn forward_affine(gamma: f32, beta: f32, mean: f32, var: f32, eps: f32) -> (f32, f32) {
    let a = gamma / (var + eps).sqrt();
    (a, beta - mean * a)
}

fn row_len(x_len: usize, c: usize, what: &str) -> usize {
    assert!(c > 0, "{what}: zero channels");
    assert_eq!(
        x_len % c,
        0,
        "{what}: length {x_len} is not a multiple of {c} channels"
    );
    x_len / c
}

/// Training-mode forward: `y = gamma * (x - mean) / sqrt(var + eps) + beta` per channel, then
/// `max(0, .)` if `relu`. `x`, `y`: CNHW with `gamma.len()` channels; `y` overwritten. Returns
/// the batch mean and biased variance.
pub fn batch_norm_train_fwd(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    relu: bool,
    y: &mut [f32],
) -> BnBatchStats {
    let c = gamma.len();
    let m = row_len(x.len(), c, "batch_norm_train_fwd");
    assert_eq!(beta.len(), c, "batch_norm_train_fwd: beta length");
    assert_eq!(y.len(), x.len(), "batch_norm_train_fwd: y length");
    let stats: Vec<(f32, f32)> = if m == 0 {
        vec![(0.0, 0.0); c]
    } else {
        y.par_chunks_mut(m)
            .zip(x.par_chunks(m))
            .enumerate()
            .map(|(ch, (yr, xr))| {
                let (mean, var) = row_mean_var(xr);
                let (a, b) = forward_affine(gamma[ch], beta[ch], mean, var, eps);
                row_affine(xr, a, b, relu, yr);
                (mean, var)
            })
            .collect()
    };
    BnBatchStats {
        mean: stats.iter().map(|s| s.0).collect(),
        var: stats.iter().map(|s| s.1).collect(),
    }
}

/// `y = max?(0, x * scale[c] + shift[c])` per channel of CNHW `x` (`y` overwritten).
pub fn channel_affine(x: &[f32], scale: &[f32], shift: &[f32], relu: bool, y: &mut [f32]) {
    let c = scale.len();
    let m = row_len(x.len(), c, "channel_affine");
    assert_eq!(shift.len(), c, "channel_affine: shift length");
    assert_eq!(y.len(), x.len(), "channel_affine: y length");
    if m == 0 {
        return;
    }
    y.par_chunks_mut(m)
        .zip(x.par_chunks(m))
        .enumerate()
        .for_each(|(ch, (yr, xr))| row_affine(xr, scale[ch], shift[ch], relu, yr));
}

simd_dispatch! {
    /// `y = y * a + b`, then ReLU when `relu` (in place; the same rounding as `row_affine`).
    pub(crate) fn row_affine_inplace(y: &mut [f32], a: f32, b: f32, relu: bool) {
        if relu {
            for v in y.iter_mut() {
                *v = (*v * a + b).max(0.0);
            }
        } else {
            for v in y.iter_mut() {
                *v = *v * a + b;
            }
        }
    }
}

/// [`channel_affine`] in place on the channel-major `y` (`scale.len()` rows).
pub fn channel_affine_inplace(y: &mut [f32], scale: &[f32], shift: &[f32], relu: bool) {
    let c = scale.len();
    let m = row_len(y.len(), c, "channel_affine_inplace");
    assert_eq!(shift.len(), c, "channel_affine_inplace: shift length");
    if m == 0 {
        return;
    }
    y.par_chunks_mut(m)
        .enumerate()
        .for_each(|(ch, yr)| row_affine_inplace(yr, scale[ch], shift[ch], relu));
}

/// Evaluation-mode forward with running statistics:
/// `y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta` (`y` overwritten).
pub fn batch_norm_eval(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    y: &mut [f32],
) {
    let c = gamma.len();
    assert!(
        beta.len() == c && running_mean.len() == c && running_var.len() == c,
        "batch_norm_eval: per-channel parameter lengths differ"
    );
    let scale: Vec<f32> = (0..c)
        .map(|i| gamma[i] / (running_var[i] + eps).sqrt())
        .collect();
    let shift: Vec<f32> = (0..c)
        .map(|i| beta[i] - running_mean[i] * scale[i])
        .collect();
    channel_affine(x, &scale, &shift, false, y);
}

/// Backward of [`batch_norm_train_fwd`]. `relu_beta` is the forward's `beta` when the forward
/// fused a ReLU, `None` otherwise: the ReLU's mask (`y > 0`) is recomputed from `x`, `gamma`,
/// `beta` and the statistics with the forward's arithmetic, so the forward output need not be
/// kept. Writes `dx` (overwritten) and returns `(dgamma, dbeta)`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_bwd(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    relu_beta: Option<&[f32]>,
    stats: &BnBatchStats,
    eps: f32,
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let m = row_len(x.len(), c, "batch_norm_bwd");
    assert_eq!(dy.len(), x.len(), "batch_norm_bwd: dy length");
    assert_eq!(dx.len(), x.len(), "batch_norm_bwd: dx length");
    assert!(
        stats.mean.len() == c && stats.var.len() == c,
        "batch_norm_bwd: statistics length"
    );
    if let Some(beta) = relu_beta {
        assert_eq!(beta.len(), c, "batch_norm_bwd: beta length");
    }
    if m == 0 {
        return (vec![0.0; c], vec![0.0; c]);
    }
    let mf = m as f32;
    let grads: Vec<(f32, f32)> = dx
        .par_chunks_mut(m)
        .enumerate()
        .map(|(ch, dxr)| {
            let r = ch * m..(ch + 1) * m;
            let (xr, dyr) = (&x[r.clone()], &dy[r]);
            let (mean, var) = (stats.mean[ch], stats.var[ch]);
            let relu = relu_beta.map(|b| forward_affine(gamma[ch], b[ch], mean, var, eps));
            let invstd = 1.0 / (var + eps).sqrt();
            let (sg, sgx) = row_bwd_sums(xr, dyr, relu, mean);
            let a = gamma[ch] * invstd;
            let b0 = -a * sg / mf;
            let b1 = -a * invstd * invstd * sgx / mf;
            row_bwd_dx(xr, dyr, relu, [a, b0, b1, mean], dxr);
            (sgx * invstd, sg)
        })
        .collect();
    (
        grads.iter().map(|g| g.0).collect(),
        grads.iter().map(|g| g.1).collect(),
    )
}

/// PyTorch's running-statistics update after a training step over `m = N*H*W` values per
/// channel: `running = (1 - momentum) * running + momentum * batch`, using the unbiased
/// variance `var * m / (m - 1)` (the biased one when `m == 1`).
pub fn update_running_stats(
    running_mean: &mut [f32],
    running_var: &mut [f32],
    stats: &BnBatchStats,
    m: usize,
    momentum: f32,
) {
    assert!(
        running_mean.len() == stats.mean.len() && running_var.len() == stats.var.len(),
        "update_running_stats: channel counts differ"
    );
    let unbias = if m > 1 {
        m as f32 / (m as f32 - 1.0)
    } else {
        1.0
    };
    for (r, b) in running_mean.iter_mut().zip(&stats.mean) {
        *r = (1.0 - momentum) * *r + momentum * b;
    }
    for (r, b) in running_var.iter_mut().zip(&stats.var) {
        *r = (1.0 - momentum) * *r + momentum * b * unbias;
    }
}
