//! Per-layer densities: the Erdős–Rényi-Kernel (ERK) allocation of a global weight budget over
//! layers (Evci et al. 2020, as in RigL and sparse_learning), and exact per-layer counts.
//!
//! ERK gives layer `l` a density proportional to `((sum of dims) / (product of dims))^p`, so
//! small layers (few weights per unit) stay denser than large ones. A layer whose density would
//! exceed 1 is made dense and the remaining budget is spread over the other layers again, until
//! every density is at most 1. The number of kept weights is `density * total` throughout.

use anyhow::{bail, Result};

/// The shape of one masked weight tensor: `[out, in]` (linear) or `[out, in, kh, kw]` (conv).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerShape {
    /// A name for messages (e.g. `conv1.weight`).
    pub name: String,
    /// The weight tensor's dimensions.
    pub shape: Vec<usize>,
}

impl LayerShape {
    /// A layer called `name` with weight dimensions `shape`.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// The number of weights (product of the dimensions).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// ERK's unscaled score `(sum of dims) / (product of dims)`.
    fn erk_score(&self) -> f64 {
        let sum: usize = self.shape.iter().sum();
        sum as f64 / self.numel() as f64
    }
}

/// Checks that every layer has a non-empty shape with no zero dimension.
pub(crate) fn validate_layers(layers: &[LayerShape]) -> Result<()> {
    for layer in layers {
        if layer.shape.is_empty() || layer.shape.contains(&0) {
            bail!(
                "layer `{}` has weight shape {:?}: a masked layer needs at least one dimension \
                 and no zero-sized ones",
                layer.name,
                layer.shape
            );
        }
    }
    Ok(())
}

/// ERK (Evci et al. 2020, as in sparse_learning / RigL): density of layer l proportional to
/// `power_scale`-scaled `(sum of dims) / (product of dims)`; layers whose density would exceed 1
/// are made dense and the rest rescaled, iteratively, so the total number of kept weights equals
/// `density * total`. Returns per-layer densities in (0, 1].
///
/// Errors (naming `--density`) unless `0 < density <= 1` and finite, when `power_scale` is not
/// finite, or when a layer has an empty shape.
pub fn erk_densities(layers: &[LayerShape], density: f64, power_scale: f64) -> Result<Vec<f64>> {
    if !(density.is_finite() && density > 0.0 && density <= 1.0) {
        bail!("--density must be a number in (0, 1] (the fraction of weights kept), got {density}");
    }
    if !power_scale.is_finite() {
        bail!("--erk-power-scale must be a finite number (1.0 is standard ERK), got {power_scale}");
    }
    validate_layers(layers)?;
    if density == 1.0 {
        return Ok(vec![1.0; layers.len()]);
    }

    let raw: Vec<f64> = layers
        .iter()
        .map(|l| l.erk_score().powf(power_scale))
        .collect();
    if let Some(l) = raw.iter().position(|r| !(r.is_finite() && *r > 0.0)) {
        bail!(
            "--erk-power-scale {power_scale} makes the ERK score of layer `{}` (shape {:?}) \
             over- or underflow; use a power scale near 1.0",
            layers[l].name,
            layers[l].shape
        );
    }
    let numel: Vec<f64> = layers.iter().map(|l| l.numel() as f64).collect();
    let mut dense = vec![false; layers.len()];
    loop {
        // Budget left for the sparse layers: every layer contributes density * n; a dense layer
        // keeps all n, i.e. (1 - density) * n more than its share.
        let mut budget = 0.0;
        let mut divisor = 0.0;
        for l in 0..layers.len() {
            if dense[l] {
                budget -= (1.0 - density) * numel[l];
            } else {
                budget += density * numel[l];
                divisor += raw[l] * numel[l];
            }
        }
        let Some(max_raw) = (0..layers.len())
            .filter(|&l| !dense[l])
            .map(|l| raw[l])
            .reduce(f64::max)
        else {
            // Every layer dense: only reachable through rounding when density is ~1.
            return Ok(vec![1.0; layers.len()]);
        };
        let eps = budget / divisor;
        if max_raw * eps > 1.0 {
            for l in 0..layers.len() {
                if !dense[l] && raw[l] == max_raw {
                    dense[l] = true;
                }
            }
            continue;
        }
        return Ok((0..layers.len())
            .map(|l| {
                if dense[l] {
                    1.0
                } else {
                    (raw[l] * eps).clamp(f64::MIN_POSITIVE, 1.0)
                }
            })
            .collect());
    }
}

/// Exact per-layer nonzero counts: `round(d_l * n_l)`, at least 1, at most `n_l`.
///
/// `densities` must have one entry per layer (as returned by [`erk_densities`]); extra entries
/// on either side are ignored.
pub fn layer_counts(layers: &[LayerShape], densities: &[f64]) -> Vec<usize> {
    debug_assert_eq!(layers.len(), densities.len(), "one density per layer");
    layers
        .iter()
        .zip(densities)
        .map(|(layer, &d)| {
            let n = layer.numel();
            let count = (d * n as f64).round();
            // NaN or negative products saturate to 0 in the cast and are lifted to 1.
            (count as usize).clamp(1.min(n), n)
        })
        .collect()
}
