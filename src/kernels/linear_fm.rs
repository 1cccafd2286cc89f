//! Feature-major fully-connected layers: `relu(W x + b)` on activations `x[I][N]` (each
//! feature's values over the batch contiguous), dense (GEMMs) or sparse (`spmm`, `spmmᵀ` and
//! SDDMM over the CSR weight), forward and backward in one candle op. In this layout every
//! active weight multiplies one contiguous run of `N` values: the sparse products need no
//! gathers, no packing and no transposes between layers, and a sparse layer reads only the
//! input features it uses. The MLP runs on it end to end: the data loader delivers its
//! batches feature-major ([`crate::data::BatchLayout`]), [`feature_major`] views them as
//! `[I][N]` without a copy, and the last layer hands its output over batch-major (`[N][O]`,
//! the logits the loss takes).

use anyhow::{bail, Result};
use candle_core::{CpuStorage, Shape, Tensor};
use rest_kernels::sparse::{sddmm_into, spmm, spmm_t};
use rest_kernels::{
    bias_act_fm, linear_bwd_bias_fm, linear_bwd_input_fm, linear_bwd_weight_fm, linear_fwd_fm,
    output_grad_fm, transpose,
};
use std::sync::Arc;

use super::linear_op::{self, Grads, LinearKernel};
use super::sparse::{kernel_err, SparseWeight};
use super::tape::Keep;
use super::{prepare, scratch, with_f32};

const NAME: &str = "rest-linear-fm";

struct LinearFmOp {
    n: usize,
    i: usize,
    o: usize,
    /// `relu(W x + b)`: the backward pass masks the output gradient with `y > 0`.
    relu: bool,
    /// The output is batch-major `[N][O]` (else feature-major `[O][N]`).
    out_batch_major: bool,
    /// The compact weight of a sparse layer; `None` runs the dense GEMMs on `w`.
    sparse: Option<Arc<SparseWeight>>,
}

impl LinearFmOp {
    fn out_shape(&self) -> Shape {
        if self.out_batch_major {
            Shape::from((self.n, self.o))
        } else {
            Shape::from((self.o, self.n))
        }
    }

    fn forward(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, i, o) = (self.n, self.i, self.o);
        let mut y = scratch::output(o * n);
        match &self.sparse {
            Some(sw) => {
                let mut st = sw.lock();
                st.matrix.update_values_from_dense(w).map_err(kernel_err)?;
                spmm(&st.matrix, x, n, &mut y).map_err(kernel_err)?;
            }
            None => linear_fwd_fm(x, w, n, i, o, &mut y),
        }
        bias_act_fm(&mut y, n, b, self.relu);
        if self.out_batch_major {
            let mut t = scratch::output(o * n);
            transpose(&y, o, n, &mut t);
            y = t;
        }
        Ok((CpuStorage::F32(y), self.out_shape()))
    }

    /// The input, weight and bias gradients from the gradient `grad` of the output `res`.
    /// A sparse layer's weight gradient is the compact one (kept in its [`SparseWeight`]),
    /// or the dense one on mask-update steps, or the active positions scattered into a
    /// dense tensor (see [`SparseWeight::set_compact_grad`]).
    fn all_grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads> {
        let (n, i, o) = (self.n, self.i, self.o);
        let mut dy = scratch::output(o * n);
        with_f32(grad, NAME, |g| {
            if self.relu {
                with_f32(res, NAME, |y| {
                    output_grad_fm(g, y, n, o, true, self.out_batch_major, &mut dy);
                    Ok(())
                })
            } else {
                output_grad_fm(g, &[], n, o, false, self.out_batch_major, &mut dy);
                Ok(())
            }
        })?;
        let db = match b {
            Some(b) if b.track_op() => {
                let mut db = vec![0.0f32; o];
                linear_bwd_bias_fm(&dy, n, o, &mut db);
                Some(Tensor::from_vec(db, o, b.device())?)
            }
            _ => None,
        };
        let Some(sw) = &self.sparse else {
            let dx = if x.track_op() {
                let mut dx = scratch::output(i * n);
                with_f32(w, NAME, |ws| {
                    linear_bwd_input_fm(&dy, ws, n, i, o, &mut dx);
                    Ok(())
                })?;
                Some(Tensor::from_vec(dx, (i, n), x.device())?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let mut dw = scratch::output(o * i);
                with_f32(x, NAME, |xs| {
                    linear_bwd_weight_fm(&dy, xs, n, i, o, &mut dw);
                    Ok(())
                })?;
                Some(Tensor::from_vec(dw, (o, i), w.device())?)
            } else {
                None
            };
            return Ok((dx, dw, db));
        };
        let mut st = sw.lock();
        let dx = if x.track_op() {
            let mut dx = scratch::output(i * n);
            spmm_t(&st.matrix, &dy, n, &mut dx).map_err(kernel_err)?;
            Some(Tensor::from_vec(dx, (i, n), x.device())?)
        } else {
            None
        };
        if !w.track_op() {
            return Ok((dx, None, db));
        }
        if st.dense_grad {
            let mut dw = scratch::output(o * i);
            with_f32(x, NAME, |xs| {
                linear_bwd_weight_fm(&dy, xs, n, i, o, &mut dw);
                Ok(())
            })?;
            return Ok((dx, Some(Tensor::from_vec(dw, (o, i), w.device())?), db));
        }
        let mut vals = scratch::output(st.matrix.nnz());
        with_f32(x, NAME, |xs| {
            sddmm_into(&st.matrix, &dy, xs, n, &mut vals).map_err(kernel_err)
        })?;
        if st.compact_grad {
            st.add_compact_grad(vals);
            return Ok((dx, None, db));
        }
        let mut dw = vec![0.0f32; o * i];
        st.matrix
            .scatter_to_dense(&vals, &mut dw)
            .map_err(kernel_err)?;
        Ok((dx, Some(Tensor::from_vec(dw, (o, i), w.device())?), db))
    }
}

impl LinearKernel for LinearFmOp {
    const NAMES: [&'static str; 2] = [NAME, NAME];

    fn fwd(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(x, w, b)
    }

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads> {
        self.all_grads(x, w, b, res, grad)
    }
}

/// The feature-major view `[I, N]` of a batch `x` `[N, ...]` (`I` = the product of the other
/// dimensions): no copy when `x` is a feature-major batch (the permuted view of a contiguous
/// `[..., N]` buffer, as [`crate::data::BatchLayout::FeatureMajor`] makes), a transposing copy
/// otherwise.
pub fn feature_major(x: &Tensor) -> Result<Tensor> {
    if x.rank() < 2 {
        bail!(
            "a feature-major view needs a batch of rank >= 2 ([N, features...]), got shape {:?}",
            x.dims()
        );
    }
    let n = x.dim(0)?;
    let perm: Vec<usize> = (1..x.rank()).chain([0]).collect();
    let t = x.permute(perm)?;
    let t = if t.is_contiguous() {
        t
    } else {
        t.contiguous()?
    };
    let i = x.dims()[1..].iter().product::<usize>();
    Ok(t.reshape((i, n))?)
}

/// A feature-major fully-connected layer: `x` `[I, N]` (see [`feature_major`]), `w` `[O, I]`
/// (PyTorch layout), optional `b` `[O]`; returns `W x + b` (then ReLU when `relu`) as `[O, N]`,
/// or as `[N, O]` with `out_batch_major`. With `sparse`, the products run over its pattern
/// (`w` outside it is ignored; the weight gradient follows the `SparseWeight`'s mode).
/// Differentiable in all arguments.
pub fn linear_fm(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    relu: bool,
    out_batch_major: bool,
    sparse: Option<&Arc<SparseWeight>>,
) -> Result<Tensor> {
    let x = prepare(x, 2, "feature-major linear input x [I, N]")?;
    let w = prepare(w, 2, "feature-major linear weight w [O, I]")?;
    let (i, n) = x.dims2()?;
    let (o, wi) = w.dims2()?;
    if wi != i {
        bail!(
            "feature-major linear: weight {:?} expects {wi} input features but x {:?} \
             (features x batch) has {i}",
            w.dims(),
            x.dims()
        );
    }
    if let Some(sw) = sparse {
        sw.check_shape(o, i, "feature-major sparse linear")?;
        if w.track_op() {
            // A new graph: a compact gradient not taken since the last one is stale.
            sw.lock().grad = None;
        }
    }
    let op = LinearFmOp {
        n,
        i,
        o,
        relu,
        out_batch_major,
        sparse: sparse.cloned(),
    };
    // The backward pass reads the input (weight gradient), the dense weight (input
    // gradient; a sparse layer reads its CSR values) and, through the ReLU, the output.
    let w_bit = if sparse.is_some() { 0 } else { 0b010 };
    let keep = Keep::only(0b001 | w_bit, relu);
    linear_op::apply(&x, &w, b, o, op, "feature-major linear", keep)
}
