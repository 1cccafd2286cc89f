//! Fully-connected layer `y = x W^T + b` as a candle custom op with GEMM-based gradients
//! (no transposed copies of `W` or `dy`, unlike the generic `matmul` path).

use anyhow::{bail, Result};
use candle_core::{CpuStorage, Shape, Tensor};
use rest_kernels::{linear_bwd_bias, linear_bwd_input, linear_bwd_weight, linear_fwd};

use super::linear_op::{self, Grads, LinearKernel};
use super::tape::Keep;
use super::{prepare, scratch, with_f32};

#[derive(Clone, Copy)]
struct LinearOp {
    n: usize,
    i: usize,
    o: usize,
    /// `relu(x W^T + b)`: the backward pass masks the output gradient with `y > 0`.
    relu: bool,
}

impl LinearOp {
    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> (CpuStorage, Shape) {
        let mut y = scratch::output(self.n * self.o);
        linear_fwd(x, w, b, self.n, self.i, self.o, &mut y);
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        (CpuStorage::F32(y), Shape::from((self.n, self.o)))
    }

    /// The gradient of the linear part: `grad` itself, or through the ReLU (zero where the
    /// output `res` is not positive).
    fn linear_grad(&self, res: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        if !self.relu {
            return Ok(grad.clone());
        }
        let dy = with_f32(grad, "rest-linear", |g| {
            with_f32(res, "rest-linear", |y| {
                let mut dy = scratch::output(g.len());
                for ((d, &gv), &yv) in dy.iter_mut().zip(g).zip(y) {
                    *d = if yv > 0.0 { gv } else { 0.0 };
                }
                Ok(dy)
            })
        })?;
        Tensor::from_vec(dy, grad.shape(), grad.device())
    }

    fn xw_grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, i, o) = (self.n, self.i, self.o);
        with_f32(grad, "rest-linear", |dy| {
            let dx = if x.track_op() {
                let mut dx = scratch::output(n * i);
                with_f32(w, "rest-linear", |ws| {
                    linear_bwd_input(dy, ws, n, i, o, &mut dx);
                    Ok(())
                })?;
                Some(Tensor::from_vec(dx, (n, i), x.device())?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let mut dw = scratch::output(o * i);
                with_f32(x, "rest-linear", |xs| {
                    linear_bwd_weight(dy, xs, n, i, o, &mut dw);
                    Ok(())
                })?;
                Some(Tensor::from_vec(dw, (o, i), w.device())?)
            } else {
                None
            };
            Ok((dx, dw))
        })
    }

    fn bias_grad(&self, b: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !b.track_op() {
            return Ok(None);
        }
        let mut db = vec![0.0f32; self.o];
        with_f32(grad, "rest-linear", |dy| {
            linear_bwd_bias(dy, self.n, self.o, &mut db);
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(db, self.o, b.device())?))
    }
}

impl LinearKernel for LinearOp {
    const NAMES: [&'static str; 2] = ["rest-linear", "rest-linear-bias"];

    fn fwd(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok(self.forward(x, w, b))
    }

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads> {
        let grad = self.linear_grad(res, grad)?;
        let (dx, dw) = self.xw_grads(x, w, &grad)?;
        let db = match b {
            Some(b) => self.bias_grad(b, &grad)?,
            None => None,
        };
        Ok((dx, dw, db))
    }
}

/// Fully-connected layer: `x` `[N, I]`, `w` `[O, I]` (PyTorch layout), optional `b` `[O]`;
/// returns `x w^T + b` `[N, O]`, differentiable in all arguments.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_act(x, w, b, false)
}

/// [`linear`], followed by a ReLU in the same op when `relu`: `relu(x w^T + b)` (the ReLU's
/// forward and backward run inside the op, not as separate candle ops).
pub fn linear_act(x: &Tensor, w: &Tensor, b: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    if super::generic_path(x) {
        let y = super::generic::linear(x, w, b)?;
        return Ok(if relu { y.relu()? } else { y });
    }
    let x = prepare(x, 2, "linear input x [N, I]")?;
    let w = prepare(w, 2, "linear weight w [O, I]")?;
    let (n, i) = x.dims2()?;
    let (o, wi) = w.dims2()?;
    if wi != i {
        bail!(
            "linear: weight {:?} expects {wi} input features but x {:?} has {i}",
            w.dims(),
            x.dims()
        );
    }
    let op = LinearOp { n, i, o, relu };
    linear_op::apply(&x, &w, b, o, op, "linear", Keep::ALL)
}
