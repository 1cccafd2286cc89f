//! Per-sample cross-entropy, `nll[i] = logsumexp(logits[i]) - logits[i][y[i]]`, as one candle op
//! with its backward (`dlogits[i] = g[i] * (softmax(logits[i]) - onehot(y[i]))`). Composed
//! from candle's ops (log-softmax, gather, negation) the same loss is about a dozen small ops
//! and their backward passes per step, which at small models (the MLP at low density) cost as
//! much as the layers.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};

use super::{cpu_slice, generic_path, prepare, with_f32};

struct SoftmaxNllOp {
    targets: Vec<u32>,
    classes: usize,
    /// Each row's log-sum-exp, from the forward pass for the backward one (the same values
    /// recomputed there otherwise).
    lse: std::sync::Mutex<Option<Vec<f32>>>,
}

/// `(logsumexp, softmax)` helpers over one row, in f32 with the row maximum subtracted.
fn row_lse(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = row.iter().map(|&v| (v - m).exp()).sum();
    m + s.ln()
}

impl CustomOp1 for SoftmaxNllOp {
    fn name(&self) -> &'static str {
        "rest-softmax-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, self.name())?;
        let c = self.classes;
        let lse: Vec<f32> = x.chunks_exact(c).map(row_lse).collect();
        let nll: Vec<f32> = x
            .chunks_exact(c)
            .zip(&self.targets)
            .zip(&lse)
            .map(|((row, &y), &l)| l - row[y as usize])
            .collect();
        let n = nll.len();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let c = self.classes;
        let saved = self.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
        let dx = with_f32(arg, self.name(), |x| {
            with_f32(grad, self.name(), |g| {
                let lse = match saved {
                    Some(l) if l.len() * c == x.len() => l,
                    _ => x.chunks_exact(c).map(row_lse).collect(),
                };
                let mut dx = vec![0.0f32; x.len()];
                for ((((row, drow), &y), &gi), &lse) in x
                    .chunks_exact(c)
                    .zip(dx.chunks_exact_mut(c))
                    .zip(&self.targets)
                    .zip(g)
                    .zip(&lse)
                {
                    for (d, &v) in drow.iter_mut().zip(row) {
                        *d = gi * (v - lse).exp();
                    }
                    drow[y as usize] -= gi;
                }
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Per-sample negative log-likelihood of the softmax of `logits` `[N, C]` at the class
/// indices `targets` `[N]` (u32): `[N]`, differentiable in `logits`. On the generic path
/// (GPU) the same value from candle's log-softmax and gather.
pub fn softmax_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    const F: &str = "softmax_nll";
    let (n, c) = logits.dims2().map_err(|_| {
        anyhow::anyhow!("{F}: logits must be [N, classes], got {:?}", logits.dims())
    })?;
    if targets.dims() != [n] {
        bail!(
            "{F}: targets must be [{n}] class indices, got shape {:?}",
            targets.dims()
        );
    }
    if generic_path(logits) {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        return Ok(logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?);
    }
    let ys = targets
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?;
    if let Some(bad) = ys.iter().find(|&&y| y as usize >= c) {
        bail!("{F}: class index {bad} out of range for {c} classes");
    }
    let x = prepare(logits, 2, "softmax_nll logits")?;
    let op = SoftmaxNllOp {
        targets: ys,
        classes: c,
        lse: std::sync::Mutex::new(None),
    };
    Ok(super::tape::op1(&x, op)?)
}
