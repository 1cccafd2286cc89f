//! The candle op around a fully-connected layer's kernels, once for every variant (dense
//! `linear`, batch-major `sparse_linear`, feature-major `linear_fm`): a [`LinearKernel`]
//! says how to run the layer with an optional bias, and [`apply`] runs it as a two-argument
//! op (`x`, `w`) or, with a bias, a three-argument one (`x`, `w`, `b`), recorded on the tape.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::tape::Keep;
use super::{cpu_slice, prepare};

/// The input, weight and bias gradients of a linear op.
pub(super) type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// A fully-connected layer's forward and backward passes, with or without a bias.
pub(super) trait LinearKernel: Send + Sync + 'static {
    /// The op's name without and with the bias argument.
    const NAMES: [&'static str; 2];

    /// The output from the input `x`, the weight `w` and the bias `b`.
    fn fwd(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)>;

    /// The gradients of `x`, `w` and (when given) `b` from the gradient `grad` of the output
    /// `res`.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads>;
}

/// The op without a bias.
struct NoBias<K>(K);

/// The op with its bias, added in the same pass.
struct WithBias<K>(K);

impl<K: LinearKernel> CustomOp2 for NoBias<K> {
    fn name(&self) -> &'static str {
        K::NAMES[0]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.fwd(
            cpu_slice(s1, l1, self.name())?,
            cpu_slice(s2, l2, self.name())?,
            None,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.0.grads(x, w, None, res, grad)?;
        Ok((dx, dw))
    }
}

impl<K: LinearKernel> CustomOp3 for WithBias<K> {
    fn name(&self) -> &'static str {
        K::NAMES[1]
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
        self.0.fwd(
            cpu_slice(s1, l1, self.name())?,
            cpu_slice(s2, l2, self.name())?,
            Some(cpu_slice(s3, l3, self.name())?),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads> {
        self.0.grads(x, w, Some(b), res, grad)
    }
}

/// Runs `op` on the prepared `x` and `w` and the bias `b` if any (checked to be `[o]`; `what`
/// names the layer in errors), recorded on the tape keeping `keep` for the backward pass.
pub(super) fn apply<K: LinearKernel>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    o: usize,
    op: K,
    what: &str,
    keep: Keep,
) -> Result<Tensor> {
    let Some(b) = b else {
        return Ok(super::tape::op2_keep(x, w, NoBias(op), keep)?);
    };
    let b = prepare(b, 1, &format!("{what} bias b [O]"))?;
    if b.dim(0)? != o {
        bail!(
            "{what}: bias has {} entries but weight {:?} has {o} outputs",
            b.dim(0)?,
            w.dims()
        );
    }
    Ok(super::tape::op3_keep(x, w, &b, WithBias(op), keep)?)
}
