//! Classifying image files (`rest predict`): PNG/JPEG decoded with the `image` crate,
//! converted to the model's channels (grey replicated to RGB), resized to its input size with
//! a Lanczos filter, or bilinear as in training for runs that resized their data on load
//! (skipped when the size already matches), scaled to [0, 1], normalised as the run was
//! (`normalize`), and the top-k softmax probabilities reported per file. Runs on a table
//! layout that crops on load (Waterbirds, CelebA) crop and resize each file the same way.

use super::LoadedModel;
use crate::data::dfa::LoadGeometry;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use image::imageops::FilterType;
use serde::Serialize;
use std::path::Path;

/// One class and its probability.
#[derive(Debug, Clone, Serialize)]
pub struct ClassProb {
    pub class: usize,
    pub prob: f64,
}

/// The prediction for one image file (one JSON line of `rest predict`).
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub file: String,
    pub top: Vec<ClassProb>,
}

/// Reads `path` as a CHW `f32` image of `input = (channels, height, width)` in [0, 1].
pub fn load_image(path: &Path, input: (usize, usize, usize)) -> Result<Vec<f32>> {
    load_image_with(path, input, FilterType::Lanczos3)
}

/// [`load_image`] with the resize filter `filter` (when the size differs).
pub fn load_image_with(
    path: &Path,
    input: (usize, usize, usize),
    filter: FilterType,
) -> Result<Vec<f32>> {
    load_image_geometry(path, input, filter, None)
}

/// [`load_image_with`], the decoded image first cropped and resized by `geometry` (as a
/// table layout's images are on load) when given.
pub fn load_image_geometry(
    path: &Path,
    input: (usize, usize, usize),
    filter: FilterType,
    geometry: Option<&LoadGeometry>,
) -> Result<Vec<f32>> {
    let (c, h, w) = input;
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| {
            format!(
                "cannot decode image {} (expected a PNG or JPEG file)",
                path.display()
            )
        })?;
    let img = match geometry {
        Some(g) => image::DynamicImage::ImageRgb8(g.apply(img.to_rgb8())),
        None => img,
    };
    let img = if img.width() as usize == w && img.height() as usize == h {
        img
    } else {
        img.resize_exact(w as u32, h as u32, filter)
    };
    let (pixels, have) = match c {
        1 => (img.to_luma8().into_raw(), 1),
        3 => (img.to_rgb8().into_raw(), 3),
        _ => bail!("the model takes {c}-channel images; only 1 and 3 are supported"),
    };
    let mut out = vec![0.0f32; c * h * w];
    for (p, px) in pixels.chunks_exact(have).enumerate() {
        for ch in 0..c {
            out[ch * h * w + p] = px[ch] as f32 * (1.0 / 255.0);
        }
    }
    Ok(out)
}

/// The softmax class probabilities of `n` images given as CHW `f32` in [0, 1], one after the
/// other (`buf`, as `load_image` gives them): normalised as the run was (`normalize`, as in
/// training and `rest eval`), one forward pass; one row per image. The Python module's
/// `predict_proba` calls it on NumPy images.
pub fn probabilities(m: &LoadedModel, mut buf: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>> {
    let (c, h, w) = m.input;
    if buf.len() != n * c * h * w {
        bail!(
            "{} values for {n} images of {c}x{h}x{w}: expected {}",
            buf.len(),
            n * c * h * w
        );
    }
    if let Some(norm) = m.config.data.plan().normalize {
        if c != norm.mean.len() {
            bail!(
                "the run normalises {} channels but the model takes {c}",
                norm.mean.len()
            );
        }
        for (k, v) in buf.iter_mut().enumerate() {
            let ch = (k / (h * w)) % c;
            *v = (*v - norm.mean[ch]) / norm.std[ch];
        }
    }
    let x = Tensor::from_vec(buf, (n, c, h, w), &Device::Cpu)?;
    let _ng = crate::kernels::tape::no_grad();
    let probs = candle_nn::ops::softmax(&m.model.forward(&x, false)?, D::Minus1)?;
    Ok(probs.to_vec2::<f32>()?)
}

/// Top-`k` classes of each image (probabilities sorted, highest first).
pub fn predict(m: &LoadedModel, images: &[impl AsRef<Path>], k: usize) -> Result<Vec<Prediction>> {
    if k == 0 {
        bail!("--top-k must be at least 1");
    }
    let (c, h, w) = m.input;
    // A run that resized its data on load (`image_size`) saw bilinear resizes: do the same.
    let plan = m.config.data.plan();
    let filter = if plan.image_size.is_some() {
        FilterType::Triangle
    } else {
        FilterType::Lanczos3
    };
    let geometry = plan
        .kind
        .map(|k| k.geometry(plan.image_size))
        .filter(LoadGeometry::crops);
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(256) {
        let mut buf = Vec::with_capacity(chunk.len() * c * h * w);
        for p in chunk {
            buf.extend(load_image_geometry(
                p.as_ref(),
                m.input,
                filter,
                geometry.as_ref(),
            )?);
        }
        let probs = probabilities(m, buf, chunk.len())?;
        for (p, row) in chunk.iter().zip(probs) {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            out.push(Prediction {
                file: p.as_ref().display().to_string(),
                top: idx
                    .into_iter()
                    .take(k)
                    .map(|class| ClassProb {
                        class,
                        prob: row[class] as f64,
                    })
                    .collect(),
            });
        }
    }
    Ok(out)
}
