//! Fully-connected layer `y = x W^T + b` as a candle custom op with GEMM-based gradients
//! (no transposed copies of `W` or `dy`, unlike the generic `matmul` path).

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rest_kernels::{linear_bwd_bias, linear_bwd_input, linear_bwd_weight, linear_fwd};

use super::{any_tracked, cpu_slice, prepare, with_f32};

#[derive(Clone, Copy)]
struct LinearOp {
    n: usize,
    i: usize,
    o: usize,
}

impl LinearOp {
    fn fwd(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> (CpuStorage, Shape) {
        let mut y = vec![0.0f32; self.n * self.o];
        linear_fwd(x, w, b, self.n, self.i, self.o, &mut y);
        (CpuStorage::F32(y), Shape::from((self.n, self.o)))
    }

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, i, o) = (self.n, self.i, self.o);
        with_f32(grad, "rest-linear", |dy| {
            let dx = if x.track_op() {
                let mut dx = vec![0.0f32; n * i];
                with_f32(w, "rest-linear", |ws| {
                    linear_bwd_input(dy, ws, n, i, o, &mut dx);
                    Ok(())
                })?;
                Some(Tensor::from_vec(dx, (n, i), x.device())?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let mut dw = vec![0.0f32; o * i];
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

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "rest-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok(self.fwd(
            cpu_slice(s1, l1, self.name())?,
            cpu_slice(s2, l2, self.name())?,
            None,
        ))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, grad)
    }
}

struct LinearBiasOp(LinearOp);

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "rest-linear-bias"
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
        Ok(self.0.fwd(
            cpu_slice(s1, l1, self.name())?,
            cpu_slice(s2, l2, self.name())?,
            Some(cpu_slice(s3, l3, self.name())?),
        ))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.0.grads(x, w, grad)?;
        Ok((dx, dw, self.0.bias_grad(b, grad)?))
    }
}

/// Fully-connected layer: `x` `[N, I]`, `w` `[O, I]` (PyTorch layout), optional `b` `[O]`;
/// returns `x w^T + b` `[N, O]`, differentiable in all arguments.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if super::generic_path(x) {
        return super::generic::linear(x, w, b);
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
    let op = LinearOp { n, i, o };
    match b {
        None => Ok(if any_tracked(&[&x, &w]) {
            x.apply_op2(&w, op)?
        } else {
            x.apply_op2_no_bwd(&w, &op)?
        }),
        Some(b) => {
            let b = prepare(b, 1, "linear bias b [O]")?;
            if b.dim(0)? != o {
                bail!(
                    "linear: bias has {} entries but weight {:?} has {o} outputs",
                    b.dim(0)?,
                    w.dims()
                );
            }
            let op = LinearBiasOp(op);
            Ok(if any_tracked(&[&x, &w, &b]) {
                x.apply_op3(&w, &b, op)?
            } else {
                x.apply_op3_no_bwd(&w, &b, &op)?
            })
        }
    }
}
