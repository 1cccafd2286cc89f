//! Colored MNIST under the LfF protocol (Nam et al., 2020): each digit is tinted with one of
//! ten colours; in train and validation the colour agrees with the class except for a chosen
//! percentage of bias-conflicting samples, while the test set is colour-balanced.
//!
//! Train, validation and test use disjoint digits (consecutive slices of one seeded
//! permutation, see [`split_indices`]). Everything is deterministic given the seed.

use super::idx::IdxImages;
use super::{GroupDataset, Split};
use crate::util;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::StandardNormal;

/// Number of classes (digits) and of colours.
pub const NUM_CLASSES: usize = 10;

/// The LfF colours (RGB, 0-255); colour `c` is the bias-aligned colour of class `c`.
pub const LFF_PALETTE: [[u8; 3]; 10] = [
    [251, 80, 43],
    [253, 233, 90],
    [172, 118, 148],
    [200, 212, 153],
    [22, 198, 250],
    [82, 245, 114],
    [6, 60, 193],
    [142, 26, 194],
    [53, 100, 5],
    [213, 52, 68],
];

/// Random streams of [`util::rng`] used by the generator (one per purpose and split, so that
/// e.g. the noise of the test set does not depend on how the train set was coloured).
const STREAM_PERMUTATION: u64 = 0;
const STREAM_CONFLICT_OFFSETS: u64 = 10; // + split number
const STREAM_NOISE: u64 = 20; // + split number

/// The colour-noise standard deviation of the LfF severities 1-5
/// (0.05, 0.02, 0.01, 0.005, 0.002).
pub fn severity_sigma(severity: u8) -> Result<f64> {
    Ok(match severity {
        1 => 0.05,
        2 => 0.02,
        3 => 0.01,
        4 => 0.005,
        5 => 0.002,
        _ => bail!("colour-noise severity {severity} is not supported: use 1 to 5 (LfF levels)"),
    })
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ColoredMnistSpec {
    /// Percentage of bias-conflicting samples per class in train and validation, in (0, 100).
    pub conflict_pct: f64,
    /// Standard deviation of the Gaussian noise added to each image's colour (per channel,
    /// colour in [0, 1]); see [`severity_sigma`].
    pub sigma: f64,
    pub seed: u64,
    pub n_train: usize,
    pub n_valid: usize,
    pub n_test: usize,
}

impl Default for ColoredMnistSpec {
    fn default() -> Self {
        Self {
            conflict_pct: 5.0,
            sigma: 0.005,
            seed: 0,
            n_train: 7000,
            n_valid: 1000,
            n_test: 2000,
        }
    }
}

impl ColoredMnistSpec {
    /// Checks the spec against a pool of `n_digits` digits.
    pub fn validate(&self, n_digits: usize) -> Result<()> {
        let p = self.conflict_pct;
        if !(p > 0.0 && p < 100.0) {
            bail!(
                "--conflict-pct must lie strictly between 0 and 100 (e.g. 0.5, 1, 2 or 5), got {p}"
            );
        }
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            bail!(
                "colour-noise sigma must be a finite number >= 0 (LfF uses 0.002 to 0.05), got {}",
                self.sigma
            );
        }
        if self.n_train == 0 {
            bail!("the Colored MNIST train split must hold at least one sample, got 0");
        }
        let total = self
            .n_train
            .checked_add(self.n_valid)
            .and_then(|v| v.checked_add(self.n_test));
        match total {
            Some(t) if t <= n_digits => Ok(()),
            _ => bail!(
                "train + validation + test = {} + {} + {} samples, but only {n_digits} digits are \
                 available: lower the split sizes so that they sum to at most {n_digits}",
                self.n_train,
                self.n_valid,
                self.n_test
            ),
        }
    }

    /// The dataset name, e.g. `cmnist-5pct` or `cmnist-0.5pct`.
    pub fn name(&self) -> String {
        // `Display` for f64 prints no trailing zeros: 5.0 -> "5", 0.5 -> "0.5".
        format!("cmnist-{}pct", self.conflict_pct)
    }
}

/// The digit indices of the train, validation and test splits: consecutive slices of one
/// seeded permutation of `0..n_digits`, hence disjoint.
pub fn split_indices(n_digits: usize, spec: &ColoredMnistSpec) -> Result<[Vec<usize>; 3]> {
    spec.validate(n_digits)?;
    let mut perm: Vec<usize> = (0..n_digits).collect();
    perm.shuffle(&mut util::rng(spec.seed, STREAM_PERMUTATION));
    let (a, b) = (spec.n_train, spec.n_train + spec.n_valid);
    let c = b + spec.n_test;
    Ok([perm[..a].to_vec(), perm[a..b].to_vec(), perm[b..c].to_vec()])
}

/// Number of bias-conflicting samples among `n` samples of a class at `pct` percent,
/// rounded half away from zero. `pct * n` is exact for the usual percentages, so ties such
/// as 5% of 10 round as written.
pub fn conflicting_count(pct: f64, n: usize) -> usize {
    (pct * n as f64 / 100.0).round() as usize
}

/// Bias attributes of a biased split: per class `c`, the first
/// [`conflicting_count`]`(pct, n_c)` samples of that class (in split order, which is random)
/// get the other nine colours in turn, starting at a random offset; the rest get colour `c`.
fn biased_attributes(labels: &[u32], pct: f64, rng: &mut impl Rng) -> Vec<u32> {
    let mut bias = labels.to_vec();
    for c in 0..NUM_CLASSES as u32 {
        let others: Vec<u32> = (0..NUM_CLASSES as u32).filter(|&o| o != c).collect();
        let offset = rng.random_range(0..others.len());
        let members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        let k = conflicting_count(pct, members.len());
        for (j, &i) in members.iter().take(k).enumerate() {
            bias[i] = others[(offset + j) % others.len()];
        }
    }
    bias
}

/// Bias attributes of the unbiased test split: per class, the colours cycle through 0..9, and
/// the cycle carries on from one class to the next, so every (label, colour) cell and every
/// colour overall has as equal a count as possible (within one).
fn balanced_attributes(labels: &[u32]) -> Vec<u32> {
    let mut bias = vec![0; labels.len()];
    let mut next = 0usize;
    for c in 0..NUM_CLASSES as u32 {
        for (i, b) in bias.iter_mut().enumerate() {
            if labels[i] == c {
                *b = (next % NUM_CLASSES) as u32;
                next += 1;
            }
        }
    }
    bias
}

/// Tints a grey digit: `out[p][ch] = round(grey[p] / 255 * colour[ch] * 255)`.
pub(crate) fn colorize(grey: &[u8], colour: [f64; 3], out: &mut [u8]) {
    for (px, rgb) in grey.iter().zip(out.chunks_exact_mut(3)) {
        let g = f64::from(*px) / 255.0;
        for ch in 0..3 {
            rgb[ch] = (g * colour[ch] * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// The colour of one image: the palette colour in [0, 1] plus Gaussian noise of std `sigma`
/// per channel, clamped to [0, 1].
fn noisy_colour(bias: u32, sigma: f64, rng: &mut impl Rng) -> [f64; 3] {
    noisy_palette_colour(LFF_PALETTE[bias as usize], sigma, rng)
}

/// [`noisy_colour`] for any base colour (the DFA palette of `data::make` uses it too).
pub(crate) fn noisy_palette_colour(base: [u8; 3], sigma: f64, rng: &mut impl Rng) -> [f64; 3] {
    let mut colour = [0.0; 3];
    for ch in 0..3 {
        let z: f64 = rng.sample(StandardNormal);
        colour[ch] = (f64::from(base[ch]) / 255.0 + sigma * z).clamp(0.0, 1.0);
    }
    colour
}

/// Builds one split from the digit indices `idx`.
fn build_split(
    digits: &IdxImages,
    labels: &[u8],
    idx: &[usize],
    biased: Option<f64>,
    spec: &ColoredMnistSpec,
    split_no: u64,
) -> Result<Split> {
    let split_labels: Vec<u32> = idx.iter().map(|&d| u32::from(labels[d])).collect();
    let bias = match biased {
        Some(pct) => {
            let mut rng = util::rng(spec.seed, STREAM_CONFLICT_OFFSETS + split_no);
            biased_attributes(&split_labels, pct, &mut rng)
        }
        None => balanced_attributes(&split_labels),
    };
    let sz = digits.image_size();
    let mut images = vec![0u8; idx.len() * sz * 3];
    let mut rng = util::rng(spec.seed, STREAM_NOISE + split_no);
    for ((&d, &b), out) in idx.iter().zip(&bias).zip(images.chunks_exact_mut(sz * 3)) {
        let colour = noisy_colour(b, spec.sigma, &mut rng);
        colorize(&digits.pixels[d * sz..(d + 1) * sz], colour, out);
    }
    Split::new(images, split_labels, bias, digits.rows, digits.cols, 3)
}

/// Generates Colored MNIST from grey `digits` and their `labels` (0-9): RGB `u8` NHWC images,
/// biased train and validation splits (`spec.conflict_pct` percent bias-conflicting per
/// class) and a colour-balanced test split. `bias` is the colour index.
pub fn generate(
    digits: &IdxImages,
    labels: &[u8],
    spec: &ColoredMnistSpec,
) -> Result<GroupDataset> {
    if labels.len() != digits.n {
        bail!(
            "{} digit images but {} labels: they must match one to one",
            digits.n,
            labels.len()
        );
    }
    if digits.pixels.len() != digits.n * digits.image_size() {
        bail!(
            "digit image buffer holds {} bytes, expected {} x {}x{}",
            digits.pixels.len(),
            digits.n,
            digits.rows,
            digits.cols
        );
    }
    if let Some(&bad) = labels.iter().find(|&&l| usize::from(l) >= NUM_CLASSES) {
        bail!("digit label {bad} is out of range: Colored MNIST needs labels 0-9");
    }
    let [tr, va, te] = split_indices(digits.n, spec)?;
    let pct = Some(spec.conflict_pct);
    Ok(GroupDataset {
        name: spec.name(),
        num_classes: NUM_CLASSES,
        train: build_split(digits, labels, &tr, pct, spec, 0)?,
        valid: build_split(digits, labels, &va, pct, spec, 1)?,
        test: build_split(digits, labels, &te, None, spec, 2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colorize_multiplies_grey_by_colour() {
        let grey = [0u8, 255, 128];
        let mut out = [9u8; 9];
        colorize(&grey, [1.0, 0.5, 0.0], &mut out);
        // 128/255 * 0.5 * 255 = 64; 255 * 0.5 = 127.5 -> 128 (half away from zero).
        assert_eq!(out, [0, 0, 0, 255, 128, 0, 128, 64, 0]);
    }

    #[test]
    fn balanced_attributes_cycle_across_classes() {
        let labels = [1, 0, 0, 1, 0, 2];
        // class 0 (positions 1, 2, 4) gets 0, 1, 2; class 1 (0, 3) gets 3, 4; class 2 gets 5.
        assert_eq!(balanced_attributes(&labels), vec![3, 0, 1, 4, 2, 5]);
    }

    #[test]
    fn biased_attributes_take_first_members_and_skip_own_colour() {
        // 20 samples of class 3: 50% -> the first 10 conflict, cycling over 0,1,2,4,...,9.
        let labels = vec![3u32; 20];
        let bias = biased_attributes(&labels, 50.0, &mut util::rng(1, 0));
        assert!(bias[10..].iter().all(|&b| b == 3));
        let mut seen: Vec<u32> = bias[..9].to_vec();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2, 4, 5, 6, 7, 8, 9]);
        assert_eq!(bias[9], bias[0]);
    }

    #[test]
    fn conflicting_count_rounds_ties_up() {
        assert_eq!(conflicting_count(5.0, 10), 1); // 0.5
        assert_eq!(conflicting_count(0.5, 700), 4); // 3.5
        assert_eq!(conflicting_count(1.0, 649), 6); // 6.49
        assert_eq!(conflicting_count(2.0, 0), 0);
    }
}
