//! Pooling custom ops on CNHW activations: global average pooling (`[C,N,H,W] -> [N,C]`, the
//! hand-off to the classifier) and max pooling with recorded argmax for the backward pass.

use std::sync::Mutex;

use anyhow::{Context, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rest_kernels::{
    global_avg_pool_bwd, global_avg_pool_fwd, max_pool2d_bwd, max_pool2d_fwd, MaxPool2dGeom,
};

use super::tape::Keep;
use super::{cpu_slice, prepare, scratch, with_f32};

struct GlobalAvgPoolOp {
    c: usize,
    n: usize,
    hw: usize,
}

impl CustomOp1 for GlobalAvgPoolOp {
    fn name(&self) -> &'static str {
        "rest-global-avg-pool-cnhw"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, self.name())?;
        let mut out = vec![0.0f32; self.n * self.c];
        global_avg_pool_fwd(x, self.c, self.n, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((self.n, self.c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut dx = vec![0.0f32; self.c * self.n * self.hw];
        with_f32(grad, self.name(), |g| {
            global_avg_pool_bwd(g, self.c, self.n, self.hw, &mut dx);
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Global average pooling of CNHW `x` `[C, N, H, W]` to `[N, C]` (mean over `H*W`),
/// differentiable.
pub fn global_avg_pool_cnhw(x: &Tensor) -> Result<Tensor> {
    if super::generic_path(x) {
        return super::generic::global_avg_pool_cnhw(x);
    }
    let x = prepare(x, 4, "global_avg_pool_cnhw input x [C, N, H, W]")?;
    let (c, n, h, w) = x.dims4()?;
    let op = GlobalAvgPoolOp { c, n, hw: h * w };
    // The backward pass reads only the input's shape.
    Ok(super::tape::op1_keep(&x, op, Keep::only(0, false))?)
}

struct MaxPoolOp {
    geom: MaxPool2dGeom,
    argmax: Mutex<Option<Vec<u32>>>,
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "rest-max-pool2d-cnhw"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        let x = cpu_slice(s, l, self.name())?;
        let mut out = scratch::output(g.out_len());
        let mut idx = vec![0u32; g.out_len()];
        max_pool2d_fwd(x, g, &mut out, &mut idx);
        *self.argmax.lock().map_err(candle_core::Error::msg)? = Some(idx);
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.c, g.n, g.oh(), g.ow())),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let guard = self.argmax.lock().map_err(candle_core::Error::msg)?;
        let Some(idx) = guard.as_ref() else {
            candle_core::bail!("{}: backward before forward", self.name());
        };
        let mut dx = scratch::output(self.geom.x_len());
        with_f32(grad, self.name(), |g| {
            max_pool2d_bwd(g, idx, &self.geom, &mut dx);
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Max pooling of CNHW `x` `[C, N, H, W]` with a square window `k`, `stride` and implicit
/// `-inf` padding `pad` (`pad <= k / 2`, as in PyTorch); returns `[C, N, OH, OW]`,
/// differentiable (the gradient goes to the first maximum of each window).
pub fn max_pool2d_cnhw(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    if super::generic_path(x) {
        return super::generic::max_pool2d_cnhw(x, k, stride, pad);
    }
    let x = prepare(x, 4, "max_pool2d_cnhw input x [C, N, H, W]")?;
    let (c, n, h, w) = x.dims4()?;
    let geom = MaxPool2dGeom {
        c,
        n,
        h,
        w,
        k,
        stride,
        pad,
    };
    geom.validate()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("max_pool2d_cnhw: x {:?}", x.dims()))?;
    let op = MaxPoolOp {
        geom,
        argmax: Mutex::new(None),
    };
    // The backward pass reads only the input's shape (and its own argmax indices).
    Ok(super::tape::op1_keep(&x, op, Keep::only(0, false))?)
}
