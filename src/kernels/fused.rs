//! Convolution + batch normalisation (batch statistics) + optional ReLU as one candle op, for
//! training. The convolution's output never becomes a candle tensor: candle's autograd would
//! otherwise allocate a zero gradient for it and add the batch-norm gradient into it (two
//! extra passes over the largest activation of the network per layer and step), and the
//! batch-norm input gradient goes straight from a scratch buffer into the convolution's
//! backward pass. Results are bit-identical to the unfused ops (same kernels, same order).

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rest_kernels::{
    batch_norm_bwd, batch_norm_train_fwd, conv2d_bwd_input, conv2d_bwd_weight, conv2d_fwd,
    conv2d_fwd_affine, conv2d_fwd_affine_maxpool, BnBatchStats, Conv2dGeom, MaxPool2dGeom,
};
use std::sync::{Arc, Mutex};

use super::sparse::{
    sparse_conv_backward, sparse_conv_forward, sparse_conv_forward_affine, SparseWeight,
};
use super::tape::Keep;
use super::{any_tracked, cpu_slice, prepare, scratch, with_f32};

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// The convolution output (batch-norm input).
    conv_out: Vec<f32>,
    /// The polyphase input of a sparse convolution.
    xph: Option<Vec<f32>>,
    stats: BnBatchStats,
}

struct ConvBnReluOp {
    geom: Conv2dGeom,
    sparse: Option<Arc<SparseWeight>>,
    eps: f32,
    /// ReLU after the normalisation.
    relu: bool,
    keep: bool,
    saved: Mutex<Option<Saved>>,
    /// The batch statistics, for the caller's running-statistics update.
    stats: Arc<Mutex<Option<BnBatchStats>>>,
}

impl CustomOp3 for ConvBnReluOp {
    fn name(&self) -> &'static str {
        "rest-conv-bn-relu-cnhw"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        let x = cpu_slice(s1, l1, self.name())?;
        let w = cpu_slice(s2, l2, self.name())?;
        let gb = cpu_slice(s3, l3, self.name())?;
        let (gamma, beta) = gb.split_at(g.oc);
        let mut conv_out = scratch::output(g.out_len());
        let xph = match &self.sparse {
            Some(sw) => sparse_conv_forward(sw, g, x, w, &mut conv_out, self.keep)?,
            None => {
                conv2d_fwd(x, w, g, &mut conv_out);
                None
            }
        };
        let mut y = scratch::output(g.out_len());
        let stats = batch_norm_train_fwd(&conv_out, gamma, beta, self.eps, self.relu, &mut y);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats.clone());
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved {
                conv_out,
                xph,
                stats,
            });
        } else {
            drop(conv_out);
        }
        Ok((CpuStorage::F32(y), Shape::from((g.oc, g.n, g.oh(), g.ow()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = &self.geom;
        let name = self.name();
        let Some(saved) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("{name}: backward before forward");
        };
        let mut dconv = scratch::output(g.out_len());
        let (dgamma, dbeta) = with_f32(grad, name, |dy| {
            with_f32(gb, name, |gbs| {
                let (gamma, beta) = gbs.split_at(g.oc);
                Ok(batch_norm_bwd(
                    &saved.conv_out,
                    dy,
                    gamma,
                    self.relu.then_some(beta),
                    &saved.stats,
                    self.eps,
                    &mut dconv,
                ))
            })
        })?;
        drop(saved.conv_out);
        let (dx, dw) = match &self.sparse {
            Some(sw) => sparse_conv_backward(sw, g, x, w, &dconv, saved.xph)?,
            None => {
                let dx = if x.track_op() {
                    let mut dx = scratch::output(g.x_len());
                    with_f32(w, name, |ws| {
                        conv2d_bwd_input(ws, &dconv, g, &mut dx);
                        Ok(())
                    })?;
                    Some(Tensor::from_vec(dx, x.shape(), x.device())?)
                } else {
                    None
                };
                let dw = if w.track_op() {
                    let mut dw = scratch::output(g.w_len());
                    with_f32(x, name, |xs| {
                        conv2d_bwd_weight(xs, &dconv, g, &mut dw);
                        Ok(())
                    })?;
                    Some(Tensor::from_vec(dw, w.shape(), w.device())?)
                } else {
                    None
                };
                (dx, dw)
            }
        };
        drop(dconv);
        let dgb = if gb.track_op() {
            let mut v = dgamma;
            v.extend_from_slice(&dbeta);
            Some(Tensor::from_vec(v, 2 * g.oc, gb.device())?)
        } else {
            None
        };
        Ok((dx, dw, dgb))
    }
}

/// Training-mode `batch_norm(conv2d(x, w))`, then ReLU when `relu`, on CNHW activations: `x`
/// `[C, N, H, W]`, `w` `[OC, C, KH, KW]` (no bias; on the sparse kernels when `sparse` is
/// given), batch statistics with `gamma`, `beta` `[OC]`. Returns the output `[OC, N, OH, OW]`
/// and the batch mean and biased variance per channel (for the running statistics).
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    sparse: Option<&Arc<SparseWeight>>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    const F: &str = "conv_bn_train";
    let (x, w, geom) = super::prepare_conv(F, x, w, stride, pad)?;
    let oc = geom.oc;
    for (t, what) in [(gamma, "gamma"), (beta, "beta")] {
        if t.dims() != [oc] {
            bail!("{F}: {what} has shape {:?}, expected [{oc}]", t.dims());
        }
    }
    if let Some(sw) = sparse {
        sw.check_shape(oc, geom.k(), F)?;
    }
    if eps.is_nan() || eps <= 0.0 {
        bail!("{F}: eps must be positive, got {eps}");
    }
    let gb = Tensor::cat(&[gamma, beta], 0)?;
    let gb = prepare(&gb, 1, "conv_bn_train gamma/beta")?;
    let stats = Arc::new(Mutex::new(None));
    let tracked = any_tracked(&[&x, &w, &gb]);
    let op = ConvBnReluOp {
        geom,
        sparse: sparse.cloned(),
        eps: eps as f32,
        relu,
        keep: tracked,
        saved: Mutex::new(None),
        stats: stats.clone(),
    };
    // The backward pass reads the arguments, not the output (the ReLU's mask is recomputed
    // from the saved convolution output). A sparse convolution keeps its own copy of the
    // input for the weight gradient (polyphase or batch-innermost), so the tape need not keep
    // `x` as well (then freed once no other op needs it: a BasicBlock's inner activation)
    // except on mask-update steps, whose dense weight gradient reads `x` itself.
    let own_copy = sparse.is_some_and(|sw| !sw.lock().dense_grad);
    let keep = Keep::only(if own_copy { 0b110 } else { 0b111 }, false);
    let y = super::tape::op3_keep(&x, &w, &gb, op, keep)?;
    let stats = stats
        .lock()
        .map_err(|e| anyhow::anyhow!("{F}: {e}"))?
        .clone()
        .ok_or_else(|| anyhow::anyhow!("{F}: forward produced no statistics"))?;
    let mean = Tensor::from_vec(stats.mean, oc, x.device())?;
    let var = Tensor::from_vec(stats.var, oc, x.device())?;
    Ok((y, mean, var))
}

/// Convolution + batch normalisation with running statistics (+ ReLU), for inference: the
/// normalisation is folded into a per-channel scale and shift applied to each image tile of a
/// dense convolution as the GEMM leaves it (in place after a sparse one), so the largest
/// activations are written once. No backward pass (a backward through it is an error, not a
/// silent zero): training runs [`conv_bn_train`].
/// With `pool` (dense convolutions only, see [`conv_bn_maxpool_eval`]) the output is then
/// max-pooled, each group of images from a cache-sized tile.
struct ConvBnReluEvalOp {
    geom: Conv2dGeom,
    sparse: Option<Arc<SparseWeight>>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
    pool: Option<MaxPool2dGeom>,
}

impl CustomOp2 for ConvBnReluEvalOp {
    fn name(&self) -> &'static str {
        match self.pool {
            None => "rest-conv-bn-relu-eval-cnhw",
            Some(_) => "rest-conv-bn-relu-maxpool-eval-cnhw",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        let x = cpu_slice(s1, l1, self.name())?;
        let w = cpu_slice(s2, l2, self.name())?;
        let (sc, sh) = (&self.scale[..], &self.shift[..]);
        if let Some(p) = &self.pool {
            if self.sparse.is_some() {
                candle_core::bail!("{}: a sparse convolution is not pooled here", self.name());
            }
            let mut out = scratch::output(p.out_len());
            conv2d_fwd_affine_maxpool(x, w, g, sc, sh, self.relu, p, &mut out);
            let shape = Shape::from((p.c, p.n, p.oh(), p.ow()));
            return Ok((CpuStorage::F32(out), shape));
        }
        let mut out = scratch::output(g.out_len());
        match &self.sparse {
            Some(sw) => {
                let epilogue = Some((sc, sh, self.relu));
                sparse_conv_forward_affine(sw, g, x, w, &mut out, false, epilogue)?;
            }
            None => conv2d_fwd_affine(x, w, g, sc, sh, self.relu, &mut out),
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.oc, g.n, g.oh(), g.ow())),
        ))
    }
}

/// `max_pool(relu?(batch_norm_eval(conv(x))))` on CNHW `x` for a dense convolution without
/// bias: `layer`'s convolution + inference BatchNorm (+ ReLU), then a `k x k` max pool
/// (`pool = (k, stride, pad)`), as one op whose convolution output is pooled a few images at
/// a time while in cache (a ResNet stem's is the largest activation of the network). Equal
/// to [`conv_bn_eval`] then `max_pool2d_cnhw`; `None` for a sparse layer or off the CPU
/// kernels (the caller runs the two ops). Inference only.
pub fn conv_bn_maxpool_eval(
    x: &Tensor,
    layer: &EvalConvBn<'_>,
    pool: (usize, usize, usize),
) -> Result<Option<Tensor>> {
    if layer.sparse.is_some() || super::generic_path(x) {
        return Ok(None);
    }
    Ok(Some(eval_op("conv_bn_maxpool_eval", x, layer, Some(pool))?))
}

/// The inference op of `layer` on `x`, pooled with `pool = (k, stride, pad)` if given;
/// errors name `f`.
fn eval_op(
    f: &str,
    x: &Tensor,
    layer: &EvalConvBn<'_>,
    pool: Option<(usize, usize, usize)>,
) -> Result<Tensor> {
    let (x, w, geom) = super::prepare_conv(f, x, layer.w, layer.stride, layer.pad)?;
    let oc = geom.oc;
    if let Some(sw) = layer.sparse {
        sw.check_shape(oc, geom.k(), f)?;
    }
    let pool = match pool {
        Some((k, stride, pad)) => {
            let pg = MaxPool2dGeom {
                c: oc,
                n: geom.n,
                h: geom.oh(),
                w: geom.ow(),
                k,
                stride,
                pad,
            };
            pg.validate().map_err(|e| {
                anyhow::anyhow!("{f}: max pool over the {}x{} output: {e}", pg.h, pg.w)
            })?;
            Some(pg)
        }
        None => None,
    };
    let (scale, shift) = fold_bn(
        f,
        oc,
        layer.gamma,
        layer.beta,
        layer.running_mean,
        layer.running_var,
        layer.eps,
    )?;
    let op = ConvBnReluEvalOp {
        geom,
        sparse: layer.sparse.cloned(),
        scale,
        shift,
        relu: layer.relu,
        pool,
    };
    Ok(super::tape::op2(&x, &w, op)?)
}

/// Folds inference BatchNorm parameters (`[oc]` each) into a per-channel `(scale, shift)`:
/// `scale = gamma / sqrt(var + eps)`, `shift = beta - mean·scale`, with the rounding of
/// `batch_norm_cnhw_eval`.
pub(super) fn fold_bn(
    op: &str,
    oc: usize,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut host = Vec::with_capacity(4);
    for (t, what) in [
        (gamma, "gamma"),
        (beta, "beta"),
        (running_mean, "running_mean"),
        (running_var, "running_var"),
    ] {
        if t.dims() != [oc] {
            bail!("{op}: {what} has shape {:?}, expected [{oc}]", t.dims());
        }
        host.push(t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
    }
    if eps.is_nan() || eps <= 0.0 {
        bail!("{op}: eps must be positive, got {eps}");
    }
    if let Some(v) = host[3].iter().find(|v| v.is_nan() || **v < 0.0) {
        bail!("{op}: running_var contains {v}; running variances must be non-negative");
    }
    let scale: Vec<f32> = host[0]
        .iter()
        .zip(&host[3])
        .map(|(g, v)| g * (1.0 / (v + eps as f32).sqrt()))
        .collect();
    let shift = host[1]
        .iter()
        .zip(&scale)
        .zip(&host[2])
        .map(|((b, s), m)| b - m * s)
        .collect();
    Ok((scale, shift))
}

/// One convolution + inference BatchNorm (+ ReLU) layer: the arguments of [`conv_bn_eval`].
pub struct EvalConvBn<'a> {
    pub w: &'a Tensor,
    pub stride: usize,
    pub pad: usize,
    pub sparse: Option<&'a Arc<SparseWeight>>,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub eps: f64,
    pub relu: bool,
}

impl EvalConvBn<'_> {
    /// [`conv_bn_eval`] of this layer on `x`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        conv_bn_eval(
            x,
            self.w,
            self.stride,
            self.pad,
            self.sparse,
            self.gamma,
            self.beta,
            self.running_mean,
            self.running_var,
            self.eps,
            self.relu,
        )
    }
}

/// `batch_norm_eval(conv(x))`, then ReLU when `relu`, on CNHW `x` `[C, N, H, W]` with weight `w`
/// `[OC, C, KH, KW]` (dense, or `sparse`'s pattern), BatchNorm parameters `gamma`/`beta` and
/// running statistics `[OC]`. Equal to `conv2d_cnhw` (or `sparse_conv2d_cnhw`) then
/// `batch_norm_cnhw_eval(.., relu)`. Inference only: not differentiable.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_eval(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    sparse: Option<&Arc<SparseWeight>>,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let layer = EvalConvBn {
        w,
        stride,
        pad,
        sparse,
        gamma,
        beta,
        running_mean,
        running_var,
        eps,
        relu,
    };
    eval_op("conv_bn_eval", x, &layer, None)
}
