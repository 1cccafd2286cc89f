//! Parameter initialisation matching PyTorch's defaults, drawn from our seeded RNG so runs are
//! reproducible: conv/linear weights kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in),
//! 1/sqrt(fan_in)), and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

use crate::util::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use rand::Rng as _;

/// A `Var` of `shape` filled from U(-bound, bound).
pub fn uniform_var(shape: &[usize], bound: f64, rng: &mut Rng, device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let b = bound as f32;
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-b..=b)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?)
}

/// PyTorch's default bound for a layer with `fan_in` inputs: 1 / sqrt(fan_in).
pub fn default_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in.max(1) as f64).sqrt()
}
