//! Noise corruptions of CIFAR-10-C: Gaussian, shot (Poisson), impulse (salt and pepper) and
//! speckle (multiplicative Gaussian) noise, each drawn independently per pixel and channel.

use super::Img;
use crate::util::Rng;
use rand::Rng as _;
use rand_distr::{Distribution, Poisson, StandardNormal};

/// Standard deviation of the additive noise per severity.
pub const GAUSSIAN: [f32; 5] = [0.04, 0.06, 0.08, 0.09, 0.10];
/// Photon count scale `c` per severity: `poisson(x c) / c`.
pub const SHOT: [f32; 5] = [500.0, 250.0, 100.0, 75.0, 50.0];
/// Share of values replaced by 0 or 1 per severity.
pub const IMPULSE: [f32; 5] = [0.01, 0.02, 0.03, 0.05, 0.07];
/// Standard deviation of the multiplicative noise per severity.
pub const SPECKLE: [f32; 5] = [0.06, 0.1, 0.12, 0.16, 0.2];

fn normal(rng: &mut Rng) -> f32 {
    let z: f64 = StandardNormal.sample(rng);
    z as f32
}

/// `x + N(0, c^2)`.
pub fn gaussian(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let c = GAUSSIAN[s];
    let mut out = x.clone();
    out.px.iter_mut().for_each(|v| *v += c * normal(rng));
    out
}

/// `poisson(x c) / c`.
pub fn shot(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let c = SHOT[s];
    let mut out = x.clone();
    for v in out.px.iter_mut() {
        let lambda = f64::from(*v * c);
        *v = match Poisson::new(lambda) {
            Ok(p) => p.sample(rng) as f32 / c,
            // lambda = 0 (black): Poisson(0) is always 0.
            Err(_) => 0.0,
        };
    }
    out
}

/// skimage's `random_noise(mode='s&p')`: each value is replaced with probability `amount`,
/// by 1 (salt) or 0 (pepper) with equal probability.
pub fn impulse(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let amount = IMPULSE[s];
    let mut out = x.clone();
    for v in out.px.iter_mut() {
        if rng.random::<f32>() < amount {
            *v = if rng.random::<bool>() { 1.0 } else { 0.0 };
        }
    }
    out
}

/// `x + x N(0, c^2)`.
pub fn speckle(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let c = SPECKLE[s];
    let mut out = x.clone();
    out.px.iter_mut().for_each(|v| *v += *v * c * normal(rng));
    out
}
