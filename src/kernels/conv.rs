//! 2-D convolution on CNHW activations as a candle custom op (`[C,N,H,W] * [OC,C,KH,KW] ->
//! [OC,N,OH,OW]`), gradients to input and weight via `rest_kernels::conv`.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rest_kernels::{conv2d_bwd_input, conv2d_bwd_weight, conv2d_fwd, Conv2dGeom};

use super::{cpu_slice, scratch, with_f32};

/// The kernels re-lower cache-sized image tiles in the backward pass instead of keeping a
/// full im2col buffer alive between forward and backward, so the op holds only its geometry.
struct Conv2dOp {
    geom: Conv2dGeom,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "rest-conv2d-cnhw"
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
        let mut out = scratch::output(g.out_len());
        conv2d_fwd(x, w, g, &mut out);
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.oc, g.n, g.oh(), g.ow())),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = &self.geom;
        with_f32(grad, self.name(), |dout| {
            let dx = if x.track_op() {
                let mut dx = scratch::output(g.x_len());
                with_f32(w, self.name(), |w| {
                    conv2d_bwd_input(w, dout, g, &mut dx);
                    Ok(())
                })?;
                Some(Tensor::from_vec(dx, x.shape(), x.device())?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let mut dw = scratch::output(g.w_len());
                with_f32(x, self.name(), |xs| {
                    conv2d_bwd_weight(xs, dout, g, &mut dw);
                    Ok(())
                })?;
                Some(Tensor::from_vec(dw, w.shape(), w.device())?)
            } else {
                None
            };
            Ok((dx, dw))
        })
    }
}

/// Convolution of a CNHW input `x` `[C, N, H, W]` with weights `w` `[OC, C, KH, KW]` (PyTorch
/// layout), square `stride` and zero padding `pad`, no bias; returns the CNHW output
/// `[OC, N, OH, OW]`. Differentiable in `x` and `w`.
pub fn conv2d_cnhw(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    if super::generic_path(x) {
        return super::generic::conv2d_cnhw(x, w, stride, pad);
    }
    let (x, w, geom) = super::prepare_conv("conv2d_cnhw", x, w, stride, pad)?;
    let op = Conv2dOp { geom };
    Ok(super::tape::op2(&x, &w, op)?)
}
