//! The residual join of ResNets, `relu(a + b)`, as one fused custom op: one pass forward, one
//! pass backward (the gradient passed where the output is positive), instead of candle's add,
//! ReLU and ReLU-mask ops.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Elements per parallel task of the fused add + ReLU; smaller tensors stay on the calling
/// thread (waking the pool costs more than the pass).
const ADD_RELU_CHUNK: usize = 1 << 16;

/// `out[i] = f(x[i], y[i])`, in parallel chunks for large tensors.
fn zip_map(out: &mut [f32], x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    let run = |o: &mut [f32], x: &[f32], y: &[f32]| {
        for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
            *o = f(*x, *y);
        }
    };
    if out.len() <= ADD_RELU_CHUNK {
        run(out, x, y);
    } else {
        out.par_chunks_mut(ADD_RELU_CHUNK)
            .zip(
                x.par_chunks(ADD_RELU_CHUNK)
                    .zip(y.par_chunks(ADD_RELU_CHUNK)),
            )
            .for_each(|(o, (x, y))| run(o, x, y));
    }
}

/// `relu(a + b)` with gradient `grad * (out > 0)` to both arguments.
struct AddRelu;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("add_relu: expected contiguous f32 CPU tensors"),
    }
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "rest-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        // Every element is written by `zip_map`.
        let mut out = super::output_buffer(a.len());
        zip_map(&mut out, a, b, |a, b| {
            let s = a + b;
            // Keeps NaN (like `Tensor::relu`), unlike `f32::max`.
            if s > 0.0 || s.is_nan() {
                s
            } else {
                0.0
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        // Every element is written by `zip_map`.
        let mut dx = super::output_buffer(res.elem_count());
        {
            let (rs, rl) = res.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (Storage::Cpu(rs), Storage::Cpu(gs)) = (&*rs, &*gs) else {
                candle_core::bail!("add_relu: expected CPU tensors");
            };
            let (r, g) = (f32_slice(rs, rl)?, f32_slice(gs, gl)?);
            zip_map(&mut dx, r, g, |r, g| if r > 0.0 { g } else { 0.0 });
        }
        let dx = Tensor::from_vec(dx, res.shape(), res.device())?;
        Ok((Some(dx.clone()), Some(dx)))
    }
}

/// `relu(a + b)` for two `f32` CPU tensors of the same shape (the residual join), fused
/// into one pass; differentiable in both arguments (the gradient is passed where the output
/// is positive).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!(
            "add_relu: the residual branch {:?} and the shortcut {:?} differ in shape",
            a.dims(),
            b.dims()
        );
    }
    if super::generic_path(a) || a.dtype() != candle_core::DType::F32 {
        // Other devices and types: the same result from candle's ops.
        return Ok((a + b)?.relu()?);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    // The backward pass reads only the output (its ReLU mask).
    let keep = super::tape::Keep::only(0, true);
    Ok(super::tape::op2_keep(&a, &b, AddRelu, keep)?)
}
