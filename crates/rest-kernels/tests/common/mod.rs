//! Helpers shared by the kernel tests: random values and random sparsity masks.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in [-1, 1).
pub fn rand_vec(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// A Bernoulli(density) mask of `rows x cols`.
pub fn mask(r: &mut ChaCha8Rng, rows: usize, cols: usize, density: f64) -> Vec<bool> {
    (0..rows * cols).map(|_| r.random_bool(density)).collect()
}

/// With 3 rows or more, empties row 0 of the `rows x cols` mask `m` and fills row 1.
pub fn force_rows(m: &mut [bool], rows: usize, cols: usize) {
    if rows >= 3 {
        m[..cols].fill(false);
        m[cols..2 * cols].fill(true);
    }
}
