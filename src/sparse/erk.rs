//! Per-layer densities: the Erdős–Rényi-Kernel (ERK) allocation of a global weight budget over
//! layers (Evci et al. 2020, as in RigL and sparse_learning), and exact per-layer counts.
//!
//! ERK gives layer `l` a density proportional to `((sum of dims) / (product of dims))^p`, so
//! small layers (few weights per unit) stay denser than large ones. A layer whose density would
//! exceed 1 is made dense and the remaining budget is spread over the other layers again, until
//! every density is at most 1. The number of kept weights is `density * total` throughout.
//! Also the Erdős–Rényi (ER), uniform and uniform-plus allocations, and layers forced dense.

use anyhow::{bail, Result};

use super::modes::SparseInit;

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

    /// Erdős–Rényi's unscaled score `(n_in + n_out) / (n_in * n_out)` with `n_out = shape[0]`,
    /// `n_in = shape[1]` (1 for a vector); kernel dimensions are ignored.
    fn er_score(&self) -> f64 {
        let out = self.shape[0] as f64;
        let inp = self.shape.get(1).copied().unwrap_or(1) as f64;
        (out + inp) / (out * inp)
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
    init_densities(layers, density, power_scale, SparseInit::Erk, &[])
}

/// Per-layer densities of a non-score-based `init` mode for a total `density`, with the layers
/// whose index is in `dense` kept fully dense (ERK/ER: further layers are made dense where their
/// share would exceed 1; uniform: the others share the rest evenly). The kept weights always sum
/// to `density * total`. `uniform-plus` keeps layer 0 dense by definition.
///
/// Errors naming the flag when `density` or `power_scale` is invalid, for a score-based mode
/// (those need [`crate::sparse::SparseEngine::new_from_scores`]), or when the budget cannot be
/// met (e.g. `--dense-first-layer` with a density below the first layer's share).
pub fn init_densities(
    layers: &[LayerShape],
    density: f64,
    power_scale: f64,
    init: SparseInit,
    dense: &[usize],
) -> Result<Vec<f64>> {
    if !(density.is_finite() && density > 0.0 && density <= 1.0) {
        bail!("--density must be a number in (0, 1] (the fraction of weights kept), got {density}");
    }
    if !power_scale.is_finite() {
        bail!("--erk-power-scale must be a finite number (1.0 is standard ERK), got {power_scale}");
    }
    validate_layers(layers)?;
    if let Some(&l) = dense.iter().find(|&&l| l >= layers.len()) {
        bail!(
            "layer {l} cannot be kept dense: the model has {} masked layers",
            layers.len()
        );
    }
    if init.is_score_based() {
        bail!(
            "--sparse-init {init:?} chooses masks from per-weight scores; use \
             SparseEngine::new_from_scores"
        );
    }
    if density == 1.0 {
        return Ok(vec![1.0; layers.len()]);
    }
    let mut forced = vec![false; layers.len()];
    for &l in dense {
        forced[l] = true;
    }
    match init {
        SparseInit::Erk => {
            let raw: Vec<f64> = layers
                .iter()
                .map(|l| l.erk_score().powf(power_scale))
                .collect();
            if let Some(l) = raw.iter().position(|r| !(r.is_finite() && *r > 0.0)) {
                bail!(
                    "--erk-power-scale {power_scale} makes the ERK score of layer `{}` (shape \
                     {:?}) over- or underflow; use a power scale near 1.0",
                    layers[l].name,
                    layers[l].shape
                );
            }
            water_fill(layers, density, &raw, forced)
        }
        SparseInit::Er => {
            let raw: Vec<f64> = layers.iter().map(LayerShape::er_score).collect();
            water_fill(layers, density, &raw, forced)
        }
        SparseInit::Uniform => {
            let fixed: Vec<Option<f64>> = forced.iter().map(|&f| f.then_some(1.0)).collect();
            uniform_rest(layers, density, &fixed)
        }
        _ => {
            // uniform-plus: layer 0 dense; the classifier at >= 20 % when the total is below.
            let mut fixed: Vec<Option<f64>> = forced.iter().map(|&f| f.then_some(1.0)).collect();
            fixed[0] = Some(1.0);
            let d = uniform_rest(layers, density, &fixed)?;
            let last = layers.len() - 1;
            let has_middle = last >= 2 && fixed[1..last].iter().any(Option::is_none);
            if density < UNIFORM_PLUS_MIN_CLASSIFIER
                && fixed[last].is_none()
                && d[last] < UNIFORM_PLUS_MIN_CLASSIFIER
                && has_middle
            {
                fixed[last] = Some(UNIFORM_PLUS_MIN_CLASSIFIER);
                return uniform_rest(layers, density, &fixed);
            }
            Ok(d)
        }
    }
}

/// The density `uniform-plus` keeps the classifier (last layer) at when the total is lower.
pub const UNIFORM_PLUS_MIN_CLASSIFIER: f64 = 0.2;

/// Layers with `fixed[l] = Some(d)` get `d`; the others share the rest of `density * total`
/// evenly. Errors when that share is not in (0, 1].
fn uniform_rest(layers: &[LayerShape], density: f64, fixed: &[Option<f64>]) -> Result<Vec<f64>> {
    let total: f64 = layers.iter().map(|l| l.numel() as f64).sum();
    let mut budget = density * total;
    let mut free = 0.0;
    for (layer, f) in layers.iter().zip(fixed) {
        match f {
            Some(d) => budget -= d * layer.numel() as f64,
            None => free += layer.numel() as f64,
        }
    }
    if free == 0.0 {
        if budget.abs() > 0.5 {
            bail!(
                "--density {density} cannot be met with the layers that must stay dense (or at \
                 a fixed density): they alone hold {:.0} of the {:.0} weights to keep; remove \
                 --dense-first-layer or use another --sparse-init",
                density * total - budget,
                density * total
            );
        }
        return Ok(fixed.iter().map(|f| f.unwrap_or(1.0)).collect());
    }
    let d = budget / free;
    if !(d > 0.0 && d <= 1.0 + 1e-12) {
        bail!(
            "--density {density} is too low for the layers that must stay dense (or at a fixed \
             density): they already hold {:.0} of the {:.0} weights to keep; raise --density \
             or remove --dense-first-layer",
            density * total - budget,
            density * total
        );
    }
    Ok(fixed.iter().map(|f| f.unwrap_or(d.min(1.0))).collect())
}

/// Density proportional to `raw[l]`, capped at 1 (capped layers dense, the rest rescaled until
/// no density exceeds 1); `forced` layers dense from the start.
fn water_fill(
    layers: &[LayerShape],
    density: f64,
    raw: &[f64],
    mut dense: Vec<bool>,
) -> Result<Vec<f64>> {
    let numel: Vec<f64> = layers.iter().map(|l| l.numel() as f64).collect();
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
            if budget.abs() > 0.5 {
                bail!(
                    "--density {density} cannot be met when every masked layer is dense; remove \
                     --dense-first-layer"
                );
            }
            return Ok(vec![1.0; layers.len()]);
        };
        if budget <= 0.0 {
            bail!(
                "--density {density} is too low to keep the requested layers dense \
                 (--dense-first-layer): they alone hold more than the {:.0} weights to keep",
                density * numel.iter().sum::<f64>()
            );
        }
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
