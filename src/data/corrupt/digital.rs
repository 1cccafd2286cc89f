//! "Digital" corruptions of CIFAR-10-C: brightness and saturation (in HSV, as skimage),
//! contrast, elastic transform (random affine warp + smoothed random displacement field),
//! JPEG compression (the `image` crate's encoder at CIFAR-10-C's qualities) and pixelation
//! (PIL's BOX resize down and back up).

use super::filters::{self, Border, Dims};
use super::Img;
use crate::util::Rng;
use anyhow::{Context, Result};
use rand::Rng as _;

/// Added to the HSV value per severity.
pub const BRIGHTNESS: [f32; 5] = [0.05, 0.1, 0.15, 0.2, 0.3];
/// Contrast factor per severity (`(x - mean) c + mean`, per channel).
pub const CONTRAST: [f32; 5] = [0.75, 0.5, 0.4, 0.3, 0.15];
/// Saturation: (factor, offset) per severity.
pub const SATURATE: [(f32, f32); 5] = [(0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)];
/// JPEG quality per severity.
pub const JPEG_QUALITY: [u8; 5] = [80, 65, 58, 50, 40];
/// Pixelation: size factor per severity (down to `int(32 c)` pixels and back).
pub const PIXELATE: [f32; 5] = [0.95, 0.9, 0.85, 0.75, 0.65];
/// Elastic transform, in units of the image side (32 for CIFAR): (alpha, sigma, affine
/// jitter) per severity.
pub const ELASTIC: [(f32, f32, f32); 5] = [
    (0.0, 0.0, 0.08),
    (0.05, 0.2, 0.07),
    (0.08, 0.06, 0.06),
    (0.1, 0.04, 0.05),
    (0.1, 0.03, 0.03),
];

fn map_hsv(x: &Img, f: impl Fn([f32; 3]) -> [f32; 3]) -> Img {
    let mut out = x.clone();
    for p in out.px.chunks_exact_mut(3) {
        let rgb = filters::hsv_to_rgb(f(filters::rgb_to_hsv([p[0], p[1], p[2]])));
        p.copy_from_slice(&rgb);
    }
    out
}

/// HSV value + c, clipped to [0, 1].
pub fn brightness(x: &Img, s: usize) -> Img {
    let c = BRIGHTNESS[s];
    map_hsv(x, |[h, sat, v]| [h, sat, (v + c).clamp(0.0, 1.0)])
}

/// HSV saturation * c0 + c1, clipped to [0, 1].
pub fn saturate(x: &Img, s: usize) -> Img {
    let (a, b) = SATURATE[s];
    map_hsv(x, |[h, sat, v]| [h, (sat * a + b).clamp(0.0, 1.0), v])
}

/// Shrinks the deviation from each channel's mean by `c`.
pub fn contrast(x: &Img, s: usize) -> Img {
    let c = CONTRAST[s];
    let n = (x.w * x.h) as f32;
    let mut means = [0.0f32; 3];
    for p in x.px.chunks_exact(3) {
        for ch in 0..3 {
            means[ch] += p[ch] / n;
        }
    }
    let mut out = x.clone();
    for p in out.px.chunks_exact_mut(3) {
        for ch in 0..3 {
            p[ch] = (p[ch] - means[ch]) * c + means[ch];
        }
    }
    out
}

/// Encodes as JPEG at CIFAR-10-C's quality and decodes again.
pub fn jpeg(rgb: &[u8], w: usize, h: usize, s: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, JPEG_QUALITY[s])
        .encode(rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .context("cannot JPEG-encode an image")?;
    let img = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
        .context("cannot decode the JPEG we just encoded")?;
    Ok(img.to_rgb8().into_raw())
}

/// PIL's BOX resampling along one axis: for output pixel `i`, the input pixels whose centres
/// fall in its support (`scale` wide when shrinking, 1 when enlarging) get equal weight.
fn box_weights(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = n_in as f64 / n_out as f64;
    let fscale = scale.max(1.0);
    let support = 0.5 * fscale;
    (0..n_out)
        .map(|i| {
            let centre = (i as f64 + 0.5) * scale;
            let lo = ((centre - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((centre + support + 0.5).floor() as usize).min(n_in);
            let mut ws: Vec<f32> = (lo..hi)
                .map(|j| {
                    let d = (j as f64 + 0.5 - centre) / fscale;
                    f32::from(u8::from(d > -0.5 && d <= 0.5))
                })
                .collect();
            let sum: f32 = ws.iter().sum();
            if sum > 0.0 {
                ws.iter_mut().for_each(|v| *v /= sum);
            }
            (lo, ws)
        })
        .collect()
}

/// PIL-style BOX resize of RGB bytes (horizontal pass, then vertical, rounding to bytes after
/// each).
pub fn box_resize(rgb: &[u8], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u8> {
    let wx = box_weights(w, nw);
    let mut tmp = vec![0u8; nw * h * 3];
    for y in 0..h {
        for (x, (lo, ws)) in wx.iter().enumerate() {
            for c in 0..3 {
                let v: f32 = ws
                    .iter()
                    .enumerate()
                    .map(|(k, &wv)| wv * f32::from(rgb[(y * w + lo + k) * 3 + c]))
                    .sum();
                tmp[(y * nw + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    let wy = box_weights(h, nh);
    let mut out = vec![0u8; nw * nh * 3];
    for (y, (lo, ws)) in wy.iter().enumerate() {
        for x in 0..nw {
            for c in 0..3 {
                let v: f32 = ws
                    .iter()
                    .enumerate()
                    .map(|(k, &wv)| wv * f32::from(tmp[((lo + k) * nw + x) * 3 + c]))
                    .sum();
                out[(y * nw + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Down to `int(side c)` pixels and back, both with BOX resampling.
pub fn pixelate(rgb: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    let c = PIXELATE[s];
    let nw = ((w as f32 * c) as usize).max(1);
    let nh = ((h as f32 * c) as usize).max(1);
    let small = box_resize(rgb, w, h, nw, nh);
    box_resize(&small, nw, nh, w, h)
}

/// The affine map (2x3, row-major) taking the three points `src` to `dst` (OpenCV's
/// `getAffineTransform`), or `None` when `src` is degenerate.
pub fn affine_from_points(src: [[f32; 2]; 3], dst: [[f32; 2]; 3]) -> Option<[f32; 6]> {
    let [[x0, y0], [x1, y1], [x2, y2]] = src.map(|p| p.map(f64::from));
    let det = x0 * (y1 - y2) - y0 * (x1 - x2) + (x1 * y2 - x2 * y1);
    if det.abs() < 1e-12 {
        return None;
    }
    let mut m = [0.0f32; 6];
    for r in 0..2 {
        let [u0, u1, u2] = [dst[0][r], dst[1][r], dst[2][r]].map(f64::from);
        // Cramer's rule for a x_i + b y_i + c = u_i.
        let a = (u0 * (y1 - y2) - y0 * (u1 - u2) + (u1 * y2 - u2 * y1)) / det;
        let b = (x0 * (u1 - u2) - u0 * (x1 - x2) + (x1 * u2 - x2 * u1)) / det;
        let c =
            (x0 * (y1 * u2 - y2 * u1) - y0 * (x1 * u2 - x2 * u1) + u0 * (x1 * y2 - x2 * y1)) / det;
        m[r * 3] = a as f32;
        m[r * 3 + 1] = b as f32;
        m[r * 3 + 2] = c as f32;
    }
    Some(m)
}

/// Random affine warp of the three points (jitter `c2`), then a displacement field of
/// uniform noise smoothed by a Gaussian (sigma `c1`, truncate 3) and scaled by `c0`, sampled
/// bilinearly with reflected borders.
pub fn elastic(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let (w, h) = (x.w, x.h);
    let dims = Dims { w, h, nc: 3 };
    let side = w.min(h) as f32;
    let (alpha, sigma, jitter) = {
        let (a, b, c) = ELASTIC[s];
        (a * side, b * side, c * side)
    };
    let (cx, cy) = ((w / 2) as f32, (h / 2) as f32);
    let sq = (w.min(h) / 3) as f32;
    let src = [[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]];
    let mut dst = src;
    for p in dst.iter_mut() {
        for v in p.iter_mut() {
            *v += rng.random_range(-jitter..jitter);
        }
    }
    // warpAffine samples the source at M^-1 (x, y).
    let warped = match affine_from_points(dst, src) {
        Some(inv) => {
            let mut px = vec![0.0f32; x.px.len()];
            for y in 0..h {
                for xx in 0..w {
                    let (fx, fy) = (xx as f32, y as f32);
                    let sx = inv[0] * fx + inv[1] * fy + inv[2];
                    let sy = inv[3] * fx + inv[4] * fy + inv[5];
                    for c in 0..3 {
                        px[(y * w + xx) * 3 + c] =
                            filters::bilinear(&x.px, dims, c, sy, sx, Border::Reflect101);
                    }
                }
            }
            px
        }
        None => x.px.clone(),
    };
    let mut field = || -> Vec<f32> {
        let u: Vec<f32> = (0..w * h).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let k = filters::gaussian_kernel(sigma, 3.0);
        filters::separable(&u, w, h, 1, &k, Border::Reflect)
            .into_iter()
            .map(|v| v * alpha)
            .collect()
    };
    let dx = field();
    let dy = field();
    let mut px = vec![0.0f32; x.px.len()];
    for y in 0..h {
        for xx in 0..w {
            let p = y * w + xx;
            let (sy, sx) = (y as f32 + dy[p], xx as f32 + dx[p]);
            for c in 0..3 {
                px[p * 3 + c] = filters::bilinear(&warped, dims, c, sy, sx, Border::Reflect);
            }
        }
    }
    Img { w, h, px }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_recovers_a_known_map() {
        // u = 2x + y + 3, v = -x + 0.5y - 1.
        let f = |[x, y]: [f32; 2]| [2.0 * x + y + 3.0, -x + 0.5 * y - 1.0];
        let src = [[26.0, 26.0], [26.0, 6.0], [6.0, 6.0]];
        let m = affine_from_points(src, src.map(f)).unwrap();
        let want = [2.0, 1.0, 3.0, -1.0, 0.5, -1.0];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{m:?}");
        }
    }

    #[test]
    fn box_resize_averages_whole_pixels_and_enlarges_by_nearest() {
        // 4 -> 2 pixels: pairs are averaged (10, 30 -> 20; 50, 70 -> 60).
        let row: Vec<u8> = [10u8, 30, 50, 70].iter().flat_map(|&v| [v, v, v]).collect();
        let small = box_resize(&row, 4, 1, 2, 1);
        assert_eq!(small, vec![20, 20, 20, 60, 60, 60]);
        // 2 -> 4: each output takes the input whose centre is nearest.
        let big = box_resize(&small, 2, 1, 4, 1);
        assert_eq!(
            big.iter().step_by(3).copied().collect::<Vec<_>>(),
            vec![20, 20, 60, 60]
        );
    }
}
