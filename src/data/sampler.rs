//! Sampling training indices: REST's reweighting draws samples with replacement with
//! probability proportional to a per-sample weight (bias-conflicting samples up-weighted by a
//! factor lambda); plain training uses shuffled epochs.

use super::Split;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::Rng;

/// Draws indices `i` with probability `w_i / sum(w)`, with replacement, from a cumulative
/// weight table (binary search per draw).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedSampler {
    /// `cumulative[i] = w_0 + ... + w_i`.
    cumulative: Vec<f64>,
    /// Index of the last sample with a positive weight (guards against rounding at the top).
    last_positive: usize,
}

impl WeightedSampler {
    /// Builds the sampler; errors on an empty list, on negative or non-finite weights, and when
    /// all weights are zero.
    pub fn new(weights: &[f64]) -> Result<Self> {
        if weights.is_empty() {
            bail!("cannot sample from an empty list of sample weights");
        }
        let mut cumulative = Vec::with_capacity(weights.len());
        let mut total = 0.0f64;
        let mut last_positive = None;
        for (i, &w) in weights.iter().enumerate() {
            if !w.is_finite() || w < 0.0 {
                bail!("sample weight {i} is {w}: weights must be finite and >= 0");
            }
            if w > 0.0 {
                last_positive = Some(i);
            }
            total += w;
            cumulative.push(total);
        }
        let Some(last_positive) = last_positive else {
            bail!(
                "all {} sample weights are zero: at least one must be positive",
                weights.len()
            );
        };
        if !total.is_finite() {
            bail!("the sample weights sum to {total}: scale them down");
        }
        Ok(Self {
            cumulative,
            last_positive,
        })
    }

    /// Number of samples the sampler draws from.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    /// Always false: a sampler has at least one sample.
    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// Sum of all weights.
    pub fn total(&self) -> f64 {
        self.cumulative[self.cumulative.len() - 1]
    }

    /// Probability of drawing sample `i` (0 when `i` is out of range).
    pub fn probability(&self, i: usize) -> f64 {
        match i {
            0 => self.cumulative.first().map_or(0.0, |c| c / self.total()),
            _ if i < self.len() => (self.cumulative[i] - self.cumulative[i - 1]) / self.total(),
            _ => 0.0,
        }
    }

    /// One draw: the first `i` whose cumulative weight exceeds a uniform `u` in
    /// `[0, total)`; zero-weight samples own an empty interval and are never drawn.
    fn draw_one(&self, rng: &mut impl Rng) -> usize {
        let u = rng.random::<f64>() * self.total();
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.last_positive)
    }

    /// `n` draws with replacement, `P(i)` proportional to `w_i`.
    pub fn draw(&self, n: usize, rng: &mut impl Rng) -> Vec<usize> {
        (0..n).map(|_| self.draw_one(rng)).collect()
    }
}

/// REST's per-sample weights: 1 for bias-aligned samples, `upweight` (lambda) for
/// bias-conflicting ones.
pub fn group_weights(split: &Split, upweight: f64) -> Vec<f64> {
    (0..split.len())
        .map(|i| {
            if split.is_conflicting(i) {
                upweight
            } else {
                1.0
            }
        })
        .collect()
}

/// A random permutation of `0..n` (one shuffled epoch).
pub fn shuffled(n: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(rng);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util;

    #[test]
    fn rejects_invalid_weights() {
        for (w, needle) in [
            (vec![], "empty"),
            (vec![1.0, -0.5], "weight 1"),
            (vec![f64::NAN], "weight 0"),
            (vec![1.0, f64::INFINITY], "weight 1"),
            (vec![0.0, 0.0], "all 2"),
            (vec![f64::MAX, f64::MAX], "sum"),
        ] {
            let err = WeightedSampler::new(&w).expect_err("invalid weights must be rejected");
            assert!(
                err.to_string().contains(needle),
                "{err} should mention {needle}"
            );
        }
    }

    #[test]
    fn probabilities_follow_weights() {
        let s = WeightedSampler::new(&[1.0, 0.0, 3.0]).expect("valid weights");
        assert_eq!(s.len(), 3);
        assert_eq!(s.total(), 4.0);
        assert_eq!(
            [
                s.probability(0),
                s.probability(1),
                s.probability(2),
                s.probability(3)
            ],
            [0.25, 0.0, 0.75, 0.0]
        );
    }

    #[test]
    fn zero_weight_samples_are_never_drawn() {
        let s = WeightedSampler::new(&[0.0, 2.0, 0.0, 1.0, 0.0]).expect("valid weights");
        let draws = s.draw(20_000, &mut util::rng(3, 0));
        assert!(draws.iter().all(|&i| i == 1 || i == 3));
        // Both positive-weight samples do occur.
        assert!(draws.contains(&1) && draws.contains(&3));
    }

    #[test]
    fn shuffled_is_a_permutation_and_seeded() {
        let a = shuffled(1000, &mut util::rng(5, 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, shuffled(1000, &mut util::rng(5, 0)));
        assert_ne!(a, shuffled(1000, &mut util::rng(6, 0)));
        assert_ne!(a, sorted);
    }
}
