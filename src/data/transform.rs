//! Per-dataset image transforms, applied while a batch is gathered from a `u8` NHWC
//! [`Split`] into the `f32` NCHW tensor the models take: random crop with zero padding and
//! random horizontal flip (training only), then scaling to [0, 1] and optional per-channel
//! normalisation (training and evaluation alike), as the LfF/DFA/REST reference code does:
//!
//! | dataset | training | evaluation |
//! |---|---|---|
//! | Colored MNIST (built-in, `cmnist`), generic `dfa` | to [0, 1] | same |
//! | `cifar10c` | crop 32 with padding 4, flip, CIFAR mean/std | mean/std |
//! | `bffhq` | (resized to 128 on load) crop with padding 4, flip, ImageNet mean/std | mean/std |
//! | `waterbirds` | (resized to 256/224 x S, centre-cropped to S on load) random resized crop, flip, ImageNet mean/std | mean/std |
//! | `celeba` | (centre-cropped to 178, resized to S on load) ImageNet mean/std | mean/std |
//! | `subpop`, `table` | to [0, 1] (`--augment`, `--normalize` as for any folder) | same |
//!
//! group_DRO's Waterbirds training crop is taken from the whole image; here it is taken from
//! the stored S x S centre crop (scale 0.7-1 of its area, aspect ratio 3/4-4/3, resampled
//! bilinearly back to S x S), so that every stored image has one size.
//!
//! Randomness is a pure function of (seed, epoch, position of the sample in the epoch's
//! order): each sample seeks to its own place in the epoch's augmentation stream, so a batch
//! is the same whichever thread prepares it and a resumed run draws the same crops.

use super::Split;
use crate::util;
use anyhow::{bail, Result};
use rand::RngCore;

/// Base of the augmentation RNG streams (`util::rng(seed, AUG_STREAM_BASE + epoch)`), far
/// from the other streams of a run (1, 2, 4, 1000 + epoch).
pub const AUG_STREAM_BASE: u64 = 0x4155_4700_0000_0000;
/// 32-bit words of the augmentation stream reserved per sample.
const WORDS_PER_SAMPLE: u128 = 16;
/// Crop padding of the reference code (CIFAR-10 and BFFHQ).
pub const CROP_PADDING: usize = 4;

/// CIFAR-10 channel mean and std (LfF/DFA's Corrupted CIFAR-10 transform).
pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f32; 3] = [0.2023, 0.1994, 0.2010];
/// ImageNet channel mean and std (DFA's BFFHQ transform).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Per-channel normalisation `(x - mean) / std` of values in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// CIFAR-10's channel statistics (the reference code's for Corrupted CIFAR-10).
    pub const CIFAR: Normalize = Normalize {
        mean: CIFAR_MEAN,
        std: CIFAR_STD,
    };
    /// ImageNet's channel statistics (the reference code's for BFFHQ).
    pub const IMAGENET: Normalize = Normalize {
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };
}

/// What happens to an image when it is gathered into a batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Transform {
    /// Random crop of the image's own size from the image padded with `crop_padding` zero
    /// pixels on every side (`0`: no crop).
    pub crop_padding: usize,
    /// Random horizontal flip with probability 1/2.
    pub flip: bool,
    /// Normalisation after scaling to [0, 1].
    pub normalize: Option<Normalize>,
    /// Random resized crop (torchvision's, scale 0.7-1, ratio 3/4-4/3, up to 3 tries, else
    /// the whole image) resampled to the image's own size, instead of the padded crop.
    pub resized_crop: bool,
}

/// Scale range of the random resized crop (group_DRO's Waterbirds transform).
pub const RESIZED_CROP_SCALE: (f64, f64) = (0.7, 1.0);
/// Aspect-ratio range of the random resized crop.
pub const RESIZED_CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// Tries of the random resized crop before it falls back to the whole image.
const RESIZED_CROP_TRIES: usize = 3;

/// The random choices for one sample: crop offsets into the padded image (each in
/// `0..=2 * padding`) and whether it is flipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Aug {
    pub dy: usize,
    pub dx: usize,
    pub flip: bool,
    /// The random resized crop's words (4 per try), resolved against the image's size by
    /// [`crop_box`].
    pub crop_words: Option<[u32; 4 * RESIZED_CROP_TRIES]>,
}

/// The box `(top, left, height, width)` of a random resized crop of an `h x w` image from
/// its words: per try, an area of scale in [`RESIZED_CROP_SCALE`] and a log-uniform aspect
/// ratio in [`RESIZED_CROP_RATIO`]; the first box that fits is placed uniformly; the whole
/// image when none fits.
pub fn crop_box(
    words: &[u32; 4 * RESIZED_CROP_TRIES],
    h: usize,
    w: usize,
) -> (usize, usize, usize, usize) {
    let unit = |x: u32| f64::from(x) / 4_294_967_296.0;
    for t in words.chunks_exact(4) {
        let area = (h * w) as f64
            * (RESIZED_CROP_SCALE.0 + (RESIZED_CROP_SCALE.1 - RESIZED_CROP_SCALE.0) * unit(t[0]));
        let (lo, hi) = (RESIZED_CROP_RATIO.0.ln(), RESIZED_CROP_RATIO.1.ln());
        let ratio = (lo + (hi - lo) * unit(t[1])).exp();
        let cw = (area * ratio).sqrt().round() as usize;
        let ch = (area / ratio).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            return (below(t[2], h - ch + 1), below(t[3], w - cw + 1), ch, cw);
        }
    }
    (0, 0, h, w)
}

/// Where a batch's samples lie in their epoch: the augmentation of the sample at position
/// `first_pos + j` of epoch `epoch`'s order depends only on `(seed, epoch, first_pos + j)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AugKey {
    pub seed: u64,
    pub epoch: usize,
    pub first_pos: usize,
}

/// A uniform draw from `0..n` from one 32-bit word (multiply-shift; the bias is below
/// n / 2^32, and no word is ever rejected, so every sample uses a fixed number of words).
fn below(word: u32, n: usize) -> usize {
    ((u64::from(word) * n as u64) >> 32) as usize
}

impl Transform {
    /// No augmentation, no normalisation: the plain [0, 1] scaling (the built-in data).
    pub fn identity() -> Self {
        Self::default()
    }

    /// A run's training transform: random crop (padding 4) and horizontal flip when
    /// `augment`, and `normalize` (see `DataOptions::plan`).
    pub fn for_run(augment: bool, normalize: Option<Normalize>) -> Self {
        Transform {
            crop_padding: if augment { CROP_PADDING } else { 0 },
            flip: augment,
            normalize,
            resized_crop: false,
        }
    }

    /// The random resized crop and flip of group_DRO's Waterbirds training, then `normalize`.
    pub fn resized_crop(normalize: Option<Normalize>) -> Self {
        Transform {
            crop_padding: 0,
            flip: true,
            normalize,
            resized_crop: true,
        }
    }

    /// This transform without its random parts.
    pub fn eval(&self) -> Self {
        Transform {
            crop_padding: 0,
            flip: false,
            normalize: self.normalize,
            resized_crop: false,
        }
    }

    /// True when the transform draws random numbers.
    pub fn is_random(&self) -> bool {
        self.crop_padding > 0 || self.flip || self.resized_crop
    }

    /// The random choices for the sample at position `pos` of `epoch` (all zero when the
    /// transform is not random).
    pub fn draw(&self, seed: u64, epoch: usize, pos: usize) -> Aug {
        if !self.is_random() {
            return Aug::default();
        }
        let mut r = util::rng(seed, AUG_STREAM_BASE.wrapping_add(epoch as u64));
        r.set_word_pos(pos as u128 * WORDS_PER_SAMPLE);
        let (a, b, c) = (r.next_u32(), r.next_u32(), r.next_u32());
        let span = 2 * self.crop_padding + 1;
        let crop_words = self.resized_crop.then(|| {
            let mut w = [0u32; 4 * RESIZED_CROP_TRIES];
            for x in &mut w {
                *x = r.next_u32();
            }
            w
        });
        Aug {
            dy: below(a, span),
            dx: below(b, span),
            flip: self.flip && c >> 31 == 1,
            crop_words,
        }
    }

    /// Per channel, the transformed value of each byte (0..=255): scaling and normalisation
    /// in one table, so that every pixel costs one lookup. Without normalisation the values
    /// are exactly `byte as f32 * (1 / 255)`, as `Split::gather_nchw` computes them.
    fn lut(&self, channels: usize) -> Result<Vec<[f32; 256]>> {
        if let Some(n) = &self.normalize {
            if channels != n.mean.len() {
                bail!(
                    "normalisation has {} channel means but the images have {channels} \
                     channels: pass --no-normalize",
                    n.mean.len()
                );
            }
        }
        Ok((0..channels)
            .map(|ch| {
                let mut t = [0.0f32; 256];
                for (b, v) in t.iter_mut().enumerate() {
                    let x = b as f32 * (1.0 / 255.0);
                    *v = match &self.normalize {
                        Some(n) => (x - n.mean[ch]) / n.std[ch],
                        None => x,
                    };
                }
                t
            })
            .collect())
    }

    /// Transforms image `src` (`h x w x c` bytes, HWC) into `dst` (`c x h x w`, CHW) with the
    /// random choices `aug`: output pixel (y, x) takes input pixel
    /// (y + dy - padding, x' + dx - padding), x' = w - 1 - x when flipped, else x; outside
    /// the image it is a zero (black) pixel, normalised like any other.
    pub fn apply(
        &self,
        src: &[u8],
        (h, w, c): (usize, usize, usize),
        aug: Aug,
        dst: &mut [f32],
    ) -> Result<()> {
        let lut = self.lut(c)?;
        self.apply_lut(&lut, src, (h, w, c), aug, dst);
        Ok(())
    }

    fn apply_lut(
        &self,
        lut: &[[f32; 256]],
        src: &[u8],
        (h, w, c): (usize, usize, usize),
        aug: Aug,
        dst: &mut [f32],
    ) {
        let hw = h * w;
        let p = self.crop_padding as isize;
        if let Some(words) = &aug.crop_words {
            resized_crop_into(lut, src, (h, w, c), crop_box(words, h, w), aug.flip, dst);
            return;
        }
        if aug == Aug::default() && p == 0 {
            for px in 0..hw {
                for (ch, t) in lut.iter().enumerate() {
                    dst[ch * hw + px] = t[src[px * c + ch] as usize];
                }
            }
            return;
        }
        for y in 0..h {
            let sy = y as isize + aug.dy as isize - p;
            for x in 0..w {
                let xx = if aug.flip { w - 1 - x } else { x };
                let sx = xx as isize + aug.dx as isize - p;
                let inside = sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize;
                let o = y * w + x;
                if inside {
                    let s = (sy as usize * w + sx as usize) * c;
                    for (ch, t) in lut.iter().enumerate() {
                        dst[ch * hw + o] = t[src[s + ch] as usize];
                    }
                } else {
                    for (ch, t) in lut.iter().enumerate() {
                        dst[ch * hw + o] = t[0];
                    }
                }
            }
        }
    }

    /// Gathers the samples `idx` of `split` into `out` (resized, reusing its allocation) as
    /// `f32` NCHW. With `key`, random transforms draw from the sample's epoch position;
    /// without, they are skipped (evaluation). An index outside the split is an error.
    pub fn gather(
        &self,
        split: &Split,
        idx: &[usize],
        key: Option<AugKey>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        self.gather_as(split, idx, key, BatchLayout::Nchw, out)
    }

    /// [`Self::gather`] into the memory layout `layout` (the same values; see
    /// [`BatchLayout`]).
    pub fn gather_as(
        &self,
        split: &Split,
        idx: &[usize],
        key: Option<AugKey>,
        layout: BatchLayout,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (h, w, c) = (split.height, split.width, split.channels);
        let sz = split.image_size();
        if let Some(&bad) = idx.iter().find(|&&i| i >= split.len()) {
            bail!(
                "sample index {bad} is outside the split of {} images",
                split.len()
            );
        }
        let lut = self.lut(c)?;
        // The batch's records: the split's buffer (in RAM or mapped) with the batch's own
        // indices, or (images decoded on the fly) a buffer of the batch's records alone.
        let batch = split.images.batch(idx, sz)?;
        let (images, idx) = (&batch.bytes[..], &batch.idx[..]);
        let one = |b: usize, i: usize, dst: &mut [f32]| {
            let aug = match key {
                Some(k) => self.draw(k.seed, k.epoch, k.first_pos + b),
                None => Aug::default(),
            };
            let t = if key.is_some() { *self } else { self.eval() };
            t.apply_lut(&lut, &images[i * sz..(i + 1) * sz], (h, w, c), aug, dst);
        };
        // Every path below writes every element, so a recycled buffer of the right size is
        // not cleared first.
        if out.len() != idx.len() * sz {
            out.clear();
            out.resize(idx.len() * sz, 0.0);
        }
        match layout {
            BatchLayout::Nchw => {
                for (b, &i) in idx.iter().enumerate() {
                    one(b, i, &mut out[b * sz..(b + 1) * sz]);
                }
            }
            BatchLayout::FeatureMajor => {
                let n = idx.len();
                // Unaugmented whole blocks of 16 samples: read straight from the images (with
                // AVX-512; `done` = 0 without).
                let done = if key.is_none() || !self.is_random() {
                    let norm = self
                        .normalize
                        .as_ref()
                        .map(|nm| (&nm.mean[..], &nm.std[..]));
                    rest_kernels::layout::bytes_to_feature_major(
                        images,
                        idx,
                        (h * w, c),
                        norm,
                        &lut,
                        out,
                        n,
                    )
                } else {
                    0
                };
                // The rest a block at a time: transformed into a small NCHW buffer and written
                // out a feature at a time (each feature's block of values one contiguous run).
                let mut tmp = vec![0.0f32; FM_BLOCK * sz];
                for (blk, chunk) in idx[done..].chunks(FM_BLOCK).enumerate() {
                    let b0 = done + blk * FM_BLOCK;
                    for (k, &i) in chunk.iter().enumerate() {
                        one(b0 + k, i, &mut tmp[k * sz..(k + 1) * sz]);
                    }
                    let m = chunk.len();
                    for (f, run) in out.chunks_exact_mut(n).enumerate() {
                        for (k, v) in run[b0..b0 + m].iter_mut().enumerate() {
                            *v = tmp[k * sz + f];
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Resamples the box `(top, left, bh, bw)` of `src` (`h x w x c`, HWC) bilinearly to `h x w`
/// (pixel centres aligned, as PIL's resize), flipped horizontally when `flip`, into `dst`
/// (CHW) through the per-channel tables `lut` (the interpolated byte is rounded).
fn resized_crop_into(
    lut: &[[f32; 256]],
    src: &[u8],
    (h, w, c): (usize, usize, usize),
    (top, left, bh, bw): (usize, usize, usize, usize),
    flip: bool,
    dst: &mut [f32],
) {
    let hw = h * w;
    // Source coordinate and the two neighbours with their weights, per output row/column.
    let axis = |n_out: usize, n_box: usize, start: usize| -> Vec<(usize, usize, f32)> {
        (0..n_out)
            .map(|o| {
                let s = ((o as f64 + 0.5) * n_box as f64 / n_out as f64 - 0.5)
                    .clamp(0.0, (n_box - 1) as f64);
                let i0 = s.floor() as usize;
                let i1 = (i0 + 1).min(n_box - 1);
                (start + i0, start + i1, (s - i0 as f64) as f32)
            })
            .collect()
    };
    let ys = axis(h, bh, top);
    let xs = axis(w, bw, left);
    for (y, &(y0, y1, fy)) in ys.iter().enumerate() {
        for x in 0..w {
            let (x0, x1, fx) = xs[if flip { w - 1 - x } else { x }];
            for (ch, t) in lut.iter().enumerate() {
                let px = |yy: usize, xx: usize| f32::from(src[(yy * w + xx) * c + ch]);
                let top_v = px(y0, x0) * (1.0 - fx) + px(y0, x1) * fx;
                let bot_v = px(y1, x0) * (1.0 - fx) + px(y1, x1) * fx;
                let v = (top_v * (1.0 - fy) + bot_v * fy).round().clamp(0.0, 255.0) as usize;
                dst[ch * hw + y * w + x] = t[v];
            }
        }
    }
}

/// Samples per block of the feature-major gather.
const FM_BLOCK: usize = rest_kernels::layout::FEATURE_MAJOR_BLOCK;

/// The memory layout of a batch's `f32` values; the tensor is `[N, C, H, W]` either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchLayout {
    /// Row-major NCHW: each sample's values contiguous.
    #[default]
    Nchw,
    /// `[C][H][W][N]`: each feature's values over the batch contiguous, the layout of the
    /// feature-major layers (`kernels::linear_fm`) the MLP runs on. The tensor is the
    /// permuted view of that buffer (strides `(1, H·W·N, W·N, N)`).
    FeatureMajor,
}

impl BatchLayout {
    /// [`Self::tensor`] taking the buffer over (no copy on the CPU).
    pub fn tensor_from_vec(
        self,
        data: Vec<f32>,
        n: usize,
        (c, h, w): (usize, usize, usize),
        dev: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        Ok(match self {
            BatchLayout::Nchw => candle_core::Tensor::from_vec(data, (n, c, h, w), dev)?,
            BatchLayout::FeatureMajor => {
                candle_core::Tensor::from_vec(data, (c, h, w, n), dev)?.permute((3, 0, 1, 2))?
            }
        })
    }

    /// The `[n, c, h, w]` tensor over `data` laid out as `self` (copied onto `dev`).
    pub fn tensor(
        self,
        data: &[f32],
        n: usize,
        chw: (usize, usize, usize),
        dev: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        self.tensor_from_vec(data.to_vec(), n, chw, dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_crop_boxes_fit_and_resample_exactly() -> Result<()> {
        // Words for scale 1 and ratio 1 (the middle of the log range): the whole image.
        let mid = 1u32 << 31;
        let whole = [
            u32::MAX,
            mid,
            0,
            0,
            u32::MAX,
            mid,
            0,
            0,
            u32::MAX,
            mid,
            0,
            0,
        ];
        let (top, left, bh, bw) = crop_box(&whole, 10, 10);
        assert_eq!((top, left), (0, 0));
        assert!(bh >= 9 && bw >= 9, "{bh}x{bw}");
        // Scale 0.7, ratio 4/3 at the far corner: 10x10 -> w = round(sqrt(70 * 4/3)) = 10,
        // h = round(sqrt(70 * 3/4)) = 7, placed at the last row offset.
        let corner = [0, u32::MAX, u32::MAX, u32::MAX, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(crop_box(&corner, 10, 10), (3, 0, 7, 10));
        // Every drawn box fits and holds 0.7-1 of the image (or is the whole image).
        let t = Transform::resized_crop(None);
        for pos in 0..200 {
            let a = t.draw(5, 1, pos);
            assert_eq!(a, t.draw(5, 1, pos));
            let (top, left, bh, bw) = crop_box(&a.crop_words.expect("words"), 20, 30);
            assert!(top + bh <= 20 && left + bw <= 30);
            let area = (bh * bw) as f64 / 600.0;
            assert!((0.6..=1.0).contains(&area), "{area}");
        }
        // The identity box resamples to the image itself; flipped, to its mirror.
        let (h, w, c) = (3, 4, 3);
        let src: Vec<u8> = (0..h * w * c).map(|v| (v * 7 % 256) as u8).collect();
        let lut = Transform::identity().lut(c)?;
        let mut out = vec![0.0; h * w * c];
        resized_crop_into(&lut, &src, (h, w, c), (0, 0, h, w), false, &mut out);
        let mut plain = vec![0.0; h * w * c];
        Transform::identity().apply(&src, (h, w, c), Aug::default(), &mut plain)?;
        assert_eq!(out, plain);
        resized_crop_into(&lut, &src, (h, w, c), (0, 0, h, w), true, &mut out);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    assert_eq!(
                        out[ch * h * w + y * w + x],
                        plain[ch * h * w + y * w + (w - 1 - x)]
                    );
                }
            }
        }
        // A 2x2 box of a 4x4 image doubled: output pixel (0, 0) at source (-0.25, -0.25)
        // clamps to the box's corner; (1, 1) lies at (0.25, 0.25) inside the box.
        let img: Vec<u8> = (0..16u8).flat_map(|v| [v * 10, 0, 0]).collect();
        let mut o = vec![0.0; 16 * 3];
        resized_crop_into(&lut, &img, (4, 4, 3), (1, 1, 2, 2), false, &mut o);
        // Box pixels: (1,1)=50, (1,2)=60, (2,1)=90, (2,2)=100.
        assert!((o[0] * 255.0 - 50.0).abs() < 1e-3, "{}", o[0] * 255.0);
        // (0.25, 0.25): 50 * 0.5625 + 60 * 0.1875 + 90 * 0.1875 + 100 * 0.0625 = 62.5 -> 63
        // (round half away from zero).
        assert!((o[5] * 255.0 - 63.0).abs() < 1e-3, "{}", o[5] * 255.0);
        Ok(())
    }

    #[test]
    fn below_covers_the_range() {
        assert_eq!(below(0, 9), 0);
        assert_eq!(below(u32::MAX, 9), 8);
        assert_eq!(below(1 << 31, 2), 1);
    }

    #[test]
    fn identity_lut_matches_plain_scaling() -> Result<()> {
        let t = Transform::identity().lut(3)?;
        for b in 0..=255u8 {
            assert_eq!(
                t[1][b as usize].to_bits(),
                (b as f32 * (1.0 / 255.0)).to_bits()
            );
        }
        Ok(())
    }
}
