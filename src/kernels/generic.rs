//! The generic and GPU path: the layer ops of `rest::kernels` built from candle's own tensor
//! ops, so they run on any candle device (CUDA above all) with candle's autograd. They take
//! and return the same CNHW layouts and shapes as the CPU custom ops, which dispatch here
//! (`kernels::generic_path`) for tensors that are not on the CPU, or everywhere with
//! `REST_KERNELS=candle`. On the CPU they serve as an independent reference for the custom
//! ops (tests).
//!
//! This is where GPU kernels go: a layer that needs its own GPU kernel gets a candle custom
//! op implementing `cuda_fwd` (and its backward) next to these functions, called from the
//! same dispatch point in place of the tensor-op version; the CPU kernels stay in
//! `rest-kernels`, wrapped by the other modules of `kernels` (see ARCHITECTURE.md, "Adding a
//! GPU kernel").
//!
//! Sparse layers have no compact form here: the trainer keeps masked weights at zero, so the
//! dense product is the sparse one, and its gradient is the dense gradient that RigL's growth
//! reads on mask-update steps.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

fn check(t: &Tensor, rank: usize, what: &str) -> Result<()> {
    if t.dtype() != DType::F32 {
        bail!("{what}: expected an f32 tensor, got {:?}", t.dtype());
    }
    if t.rank() != rank {
        bail!(
            "{what}: expected a rank-{rank} tensor, got shape {:?}",
            t.dims()
        );
    }
    Ok(())
}

/// CNHW convolution (`x` `[C, N, H, W]`, `w` `[OC, C, KH, KW]`) -> `[OC, N, OH, OW]`.
pub fn conv2d_cnhw(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    check(x, 4, "conv2d_cnhw input x [C, N, H, W]")?;
    check(w, 4, "conv2d_cnhw weight w [OC, C, KH, KW]")?;
    if stride == 0 {
        bail!("conv2d_cnhw: stride must be at least 1");
    }
    if x.dim(0)? != w.dim(1)? {
        bail!(
            "conv2d_cnhw: weight {:?} expects {} input channels but x {:?} (CNHW) has {}",
            w.dims(),
            w.dim(1)?,
            x.dims(),
            x.dim(0)?
        );
    }
    let nchw = x.permute((1, 0, 2, 3))?.contiguous()?;
    let y = nchw.conv2d(&w.contiguous()?, pad, stride, 1, 1)?;
    Ok(y.permute((1, 0, 2, 3))?.contiguous()?)
}

/// `x` `[N, I]` times `w` `[O, I]` transposed, plus `b` `[O]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    check(x, 2, "linear input x [N, I]")?;
    check(w, 2, "linear weight w [O, I]")?;
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Training-mode batch norm of CNHW `x` with the batch mean and biased variance, then ReLU
/// when `relu`; returns `(y, batch_mean, batch_var)` (statistics detached), as
/// `batch_norm_cnhw_train`.
pub fn batch_norm_cnhw_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    check(x, 4, "batch_norm_cnhw_train input x [C, N, H, W]")?;
    let (c, n, h, w) = x.dims4()?;
    let xr = x.reshape((c, n * h * w))?;
    let mean = xr.mean_keepdim(D::Minus1)?;
    let xc = xr.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var.clone() + eps)?.sqrt()?.recip()?;
    let y = xc
        .broadcast_mul(&(inv.broadcast_mul(&gamma.reshape((c, 1))?))?)?
        .broadcast_add(&beta.reshape((c, 1))?)?;
    let y = if relu { y.relu()? } else { y };
    Ok((
        y.reshape((c, n, h, w))?,
        mean.flatten_all()?.detach(),
        var.flatten_all()?.detach(),
    ))
}

/// Evaluation-mode batch norm of CNHW `x` with running statistics (ReLU when `relu`).
pub fn batch_norm_cnhw_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    check(x, 4, "batch_norm_cnhw_eval input x [C, N, H, W]")?;
    let c = x.dim(0)?;
    let col = |t: &Tensor| t.reshape((c, 1, 1, 1));
    let scale = gamma.broadcast_div(&(running_var + eps)?.sqrt()?)?;
    let shift = (beta - running_mean.mul(&scale)?)?;
    let y = x
        .broadcast_mul(&col(&scale)?)?
        .broadcast_add(&col(&shift)?)?;
    Ok(if relu { y.relu()? } else { y })
}

/// Mean over `H*W` of CNHW `x`, as `[N, C]`.
pub fn global_avg_pool_cnhw(x: &Tensor) -> Result<Tensor> {
    check(x, 4, "global_avg_pool_cnhw input x [C, N, H, W]")?;
    let (c, n, h, w) = x.dims4()?;
    Ok(x.reshape((c, n, h * w))?
        .mean(D::Minus1)?
        .t()?
        .contiguous()?)
}

/// Max pooling of CNHW `x` with window `k`, `stride` and `-inf` padding `pad`.
pub fn max_pool2d_cnhw(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    check(x, 4, "max_pool2d_cnhw input x [C, N, H, W]")?;
    if k == 0 || stride == 0 || pad > k / 2 {
        bail!("max_pool2d_cnhw: need k >= 1, stride >= 1 and pad <= k / 2 (k {k}, stride {stride}, pad {pad})");
    }
    let x = if pad > 0 {
        let (c, n, h, w) = x.dims4()?;
        let ninf =
            |dims: (usize, usize, usize, usize)| Tensor::full(f32::NEG_INFINITY, dims, x.device());
        let rows = Tensor::cat(
            &[ninf((c, n, pad, w))?, x.clone(), ninf((c, n, pad, w))?],
            2,
        )?;
        let hp = h + 2 * pad;
        Tensor::cat(&[ninf((c, n, hp, pad))?, rows, ninf((c, n, hp, pad))?], 3)?
    } else {
        x.clone()
    };
    // candle's own max pooling has a backward only for k == stride, so the window maximum is
    // built from k*k strided views (index_select, whose backward is index_add) and candle's
    // element-wise maximum (whose backward splits a tie evenly between the tied inputs).
    let (_, _, hp, wp) = x.dims4()?;
    if hp < k || wp < k {
        bail!("max_pool2d_cnhw: window {k} larger than the padded input {hp}x{wp}");
    }
    let (oh, ow) = ((hp - k) / stride + 1, (wp - k) / stride + 1);
    let taps = |offset: usize, count: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..count).map(|i| (offset + i * stride) as u32).collect();
        Ok(Tensor::from_vec(idx, count, x.device())?)
    };
    let mut out: Option<Tensor> = None;
    for di in 0..k {
        let rows = x.index_select(&taps(di, oh)?, 2)?;
        for dj in 0..k {
            let v = rows.index_select(&taps(dj, ow)?, 3)?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    out.ok_or_else(|| anyhow::anyhow!("max_pool2d_cnhw: empty window"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        use rand::Rng;
        let mut rng = crate::util::rng(seed, 0);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        Ok(a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0.0, f32::max))
    }

    /// Forward and all gradients of the generic conv agree with the CPU custom op.
    #[test]
    fn conv_matches_the_cpu_kernel_with_gradients() -> Result<()> {
        for (c, n, h, oc, k, s, p) in [
            (3, 2, 9, 4, 4, 2, 1),
            (5, 1, 7, 3, 3, 1, 1),
            (2, 3, 8, 2, 1, 2, 0),
        ] {
            let x = Var::from_tensor(&randn(&[c, n, h, h], 1)?)?;
            let w = Var::from_tensor(&randn(&[oc, c, k, k], 2)?)?;
            let probe = randn(
                &[oc, n, (h + 2 * p - k) / s + 1, (h + 2 * p - k) / s + 1],
                3,
            )?;
            let ya = conv2d_cnhw(x.as_tensor(), w.as_tensor(), s, p)?;
            let yb = crate::kernels::conv2d_cnhw(x.as_tensor(), w.as_tensor(), s, p)?;
            assert!(max_rel(&ya, &yb)? < 1e-4);
            let ga = (ya * &probe)?.sum_all()?.backward()?;
            let gb = (yb * &probe)?.sum_all()?.backward()?;
            for v in [&x, &w] {
                let (a, b) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert!(max_rel(a, b)? < 1e-4, "conv grad {c} {n} {h} {k} {s} {p}");
            }
        }
        Ok(())
    }

    #[test]
    fn batch_norm_and_pools_match_the_cpu_kernels() -> Result<()> {
        let x = Var::from_tensor(&(randn(&[4, 3, 5, 5], 4)? * 3.0)?)?;
        let g = Var::from_tensor(&(randn(&[4], 5)? + 1.5)?)?;
        let b = Var::from_tensor(&randn(&[4], 6)?)?;
        let probe = randn(&[4, 3, 5, 5], 7)?;
        for relu in [false, true] {
            let (ya, ma, va) =
                batch_norm_cnhw_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, relu)?;
            let (yb, mb, vb) = crate::kernels::batch_norm_cnhw_train(
                x.as_tensor(),
                g.as_tensor(),
                b.as_tensor(),
                1e-5,
                relu,
            )?;
            assert!(max_rel(&ya, &yb)? < 1e-4);
            assert!(max_rel(&ma, &mb)? < 1e-5);
            assert!(max_rel(&va, &vb)? < 1e-5);
            let ga = (ya * &probe)?.sum_all()?.backward()?;
            let gb = (yb * &probe)?.sum_all()?.backward()?;
            for v in [&x, &g, &b] {
                let (a, bb) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert!(max_rel(a, bb)? < 1e-3, "bn grad (relu {relu})");
            }
            let rm = randn(&[4], 8)?;
            let rv = (randn(&[4], 9)?.abs()? + 0.5)?;
            let ea = batch_norm_cnhw_eval(
                x.as_tensor(),
                g.as_tensor(),
                b.as_tensor(),
                &rm,
                &rv,
                1e-5,
                relu,
            )?;
            let eb = crate::kernels::batch_norm_cnhw_eval(
                x.as_tensor(),
                g.as_tensor(),
                b.as_tensor(),
                &rm,
                &rv,
                1e-5,
                relu,
            )?;
            assert!(max_rel(&ea, &eb)? < 1e-5);
        }
        let pa = global_avg_pool_cnhw(x.as_tensor())?;
        let pb = crate::kernels::global_avg_pool_cnhw(x.as_tensor())?;
        assert_eq!(pa.dims(), pb.dims());
        assert!(max_rel(&pa, &pb)? < 1e-5);
        for (k, s, p) in [(3, 2, 1), (2, 2, 0), (3, 1, 1)] {
            let ma = max_pool2d_cnhw(x.as_tensor(), k, s, p)?;
            let mb = crate::kernels::max_pool2d_cnhw(x.as_tensor(), k, s, p)?;
            assert_eq!(ma.dims(), mb.dims(), "maxpool k{k} s{s} p{p}");
            assert!(max_rel(&ma, &mb)? < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn max_pool_gradient_matches_the_cpu_kernel() -> Result<()> {
        // Distinct random values (no ties): both route each output's gradient to its
        // window's maximum.
        for (shape, k, s, p) in [
            ([3, 2, 9, 8], 3, 2, 1),
            ([2, 3, 8, 8], 2, 2, 0),
            ([2, 2, 7, 5], 3, 1, 1),
            ([1, 2, 6, 6], 3, 2, 0),
        ] {
            let x = Var::from_tensor(&randn(&shape, 21)?)?;
            let ya = max_pool2d_cnhw(x.as_tensor(), k, s, p)?;
            let yb = crate::kernels::max_pool2d_cnhw(x.as_tensor(), k, s, p)?;
            assert_eq!(ya.dims(), yb.dims(), "k{k} s{s} p{p}");
            let c = randn(ya.dims(), 22)?;
            let ga = (&ya * &c)?.sum_all()?.backward()?;
            let gb = (&yb * &c)?.sum_all()?.backward()?;
            let (ga, gb) = (
                ga.get(x.as_tensor()).expect("grad a"),
                gb.get(x.as_tensor()).expect("grad b"),
            );
            let diff = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "k{k} s{s} p{p}: gradients differ by {diff}");
            assert!(gb.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn linear_matches_the_cpu_kernel() -> Result<()> {
        let x = randn(&[5, 7], 10)?;
        let w = randn(&[3, 7], 11)?;
        let b = randn(&[3], 12)?;
        let a = linear(&x, &w, Some(&b))?;
        let r = crate::kernels::linear(&x, &w, Some(&b))?;
        assert!(max_rel(&a, &r)? < 1e-5);
        assert!(linear(&x, &w.t()?, None).is_err());
        Ok(())
    }
}
