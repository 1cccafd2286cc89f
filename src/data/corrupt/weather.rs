//! Weather corruptions of CIFAR-10-C: snow (zoomed, thresholded, motion-blurred Gaussian
//! flakes), frost, fog (a diamond-square plasma fractal) and spatter (water drops with
//! shaded edges at severities 1-3, mud at 4-5).
//!
//! Frost is synthetic: CIFAR-10-C blends crops of six frost photographs, which are not
//! distributed with `rest`. [`frost_texture`] draws a procedural ice texture instead (a hazy
//! plasma base with branching, blurred crystal needles, tinted pale blue) and blends it with
//! CIFAR-10-C's weights `c0 x + c1 frost`. Images look frosted, but are not pixel-comparable
//! with CIFAR-10-C's frost.

use super::filters::{self, Border, Dims};
use super::Img;
use crate::util::Rng;
use rand::Rng as _;
use rand_distr::{Distribution, Normal};

/// Snow: (flake mean, flake std, zoom, threshold, blur radius, blur sigma, image weight) per
/// severity.
pub const SNOW: [[f32; 7]; 5] = [
    [0.1, 0.2, 1.0, 0.6, 8.0, 3.0, 0.95],
    [0.1, 0.2, 1.0, 0.5, 10.0, 4.0, 0.9],
    [0.15, 0.3, 1.75, 0.55, 10.0, 4.0, 0.9],
    [0.25, 0.3, 2.25, 0.6, 12.0, 6.0, 0.85],
    [0.3, 0.3, 1.25, 0.65, 14.0, 12.0, 0.8],
];
/// Frost: (image weight, frost weight) per severity.
pub const FROST: [(f32, f32); 5] = [
    (1.0, 0.2),
    (1.0, 0.3),
    (0.9, 0.4),
    (0.85, 0.4),
    (0.75, 0.45),
];
/// Fog: (strength, wibble decay) per severity.
pub const FOG: [(f32, f32); 5] = [(0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)];
/// Spatter: (mean, std, sigma, threshold, intensity or mud sigma, mud?) per severity.
pub const SPATTER: [[f32; 6]; 5] = [
    [0.62, 0.1, 0.7, 0.7, 0.5, 0.0],
    [0.65, 0.1, 0.8, 0.7, 0.5, 0.0],
    [0.65, 0.3, 1.0, 0.69, 0.5, 0.0],
    [0.65, 0.1, 0.7, 0.69, 0.6, 1.0],
    [0.65, 0.1, 0.5, 0.68, 0.6, 1.0],
];

fn normal_field(n: usize, mean: f32, std: f32, rng: &mut Rng) -> Vec<f32> {
    match Normal::new(mean, std) {
        Ok(d) => (0..n).map(|_| d.sample(rng)).collect(),
        Err(_) => vec![mean; n],
    }
}

/// A diamond-square height map (`size` a power of two) in [0, 1], as CIFAR-10-C's
/// `plasma_fractal`: each new point is the mean of its four neighbours (wrapping around) plus
/// uniform noise whose amplitude is divided by `decay` at every level.
pub fn plasma_fractal(size: usize, decay: f32, rng: &mut Rng) -> Vec<f32> {
    let n = size.max(2).next_power_of_two();
    let mut m = vec![0.0f32; n * n];
    let mut step = n;
    let mut wibble = 100.0f32;
    while step >= 2 {
        let half = step / 2;
        let g = n / step;
        let at = |m: &[f32], i: usize, j: usize| m[(i % n) * n + (j % n)];
        let wmean =
            |sum: f32, rng: &mut Rng| sum / 4.0 + wibble * rng.random_range(-wibble..=wibble);
        // Squares: centres from the four corners.
        for i in 0..g {
            for j in 0..g {
                let (r, c) = (i * step, j * step);
                let s = at(&m, r, c)
                    + at(&m, r + step, c)
                    + at(&m, r, c + step)
                    + at(&m, r + step, c + step);
                m[(r + half) * n + c + half] = wmean(s, rng);
            }
        }
        // Diamonds: edge midpoints from the two adjacent corners and the two adjacent centres.
        for i in 0..g {
            for j in 0..g {
                let (r, c) = (i * step, j * step);
                let s = at(&m, r + half, c + half)
                    + at(&m, r + n - half, c + half)
                    + at(&m, r, c)
                    + at(&m, r, c + step);
                m[r * n + c + half] = wmean(s, rng);
                let s = at(&m, r + half, c + half)
                    + at(&m, r + half, c + n - half)
                    + at(&m, r, c)
                    + at(&m, r + step, c);
                m[(r + half) * n + c] = wmean(s, rng);
            }
        }
        step /= 2;
        wibble /= decay;
    }
    let lo = m.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    m.iter().map(|v| (v - lo) / span).collect()
}

/// The top-left `w x h` part of a plasma fractal.
fn plasma_crop(w: usize, h: usize, decay: f32, rng: &mut Rng) -> Vec<f32> {
    let n = w.max(h).max(2).next_power_of_two();
    let p = plasma_fractal(n, decay, rng);
    (0..h).flat_map(|y| p[y * n..y * n + w].to_vec()).collect()
}

/// Adds the plasma fractal and rescales so that the image maximum is kept.
pub fn fog(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let (c0, decay) = FOG[s];
    let max = x.px.iter().copied().fold(0.0f32, f32::max);
    let p = plasma_crop(x.w, x.h, decay, rng);
    let mut out = x.clone();
    for (q, px) in out.px.chunks_exact_mut(3).enumerate() {
        for v in px {
            *v = (*v + c0 * p[q]) * max / (max + c0);
        }
    }
    out
}

/// Flakes: a Gaussian field zoomed, thresholded, quantised and motion-blurred (towards an
/// angle in [-135, -45) degrees); the image is brightened towards its grey level and the
/// flakes are added twice (the layer and its 180-degree rotation).
pub fn snow(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let c = SNOW[s];
    let (w, h) = (x.w, x.h);
    let mut layer = normal_field(w * h, c[0], c[1], rng);
    layer = filters::clipped_zoom(&layer, w, h, 1, c[2]);
    for v in layer.iter_mut() {
        if *v < c[3] {
            *v = 0.0;
        }
        // Through an 8-bit PNG, as the reference.
        *v = (v.clamp(0.0, 1.0) * 255.0).floor() / 255.0;
    }
    let angle: f32 = rng.random_range(-135.0..-45.0);
    let layer: Vec<f32> = filters::motion_blur(&layer, w, h, 1, c[4], c[5], angle)
        .into_iter()
        .map(|v| (v * 255.0).round() / 255.0)
        .collect();
    let mut out = x.clone();
    for (q, px) in out.px.chunks_exact_mut(3).enumerate() {
        let g = filters::gray([px[0], px[1], px[2]]) * 1.5 + 0.5;
        let flakes = layer[q] + layer[w * h - 1 - q];
        for v in px {
            *v = c[6] * *v + (1.0 - c[6]) * v.max(g) + flakes;
        }
    }
    out
}

/// Draws an anti-aliased line of `value` into `buf` (max blending).
fn line(buf: &mut [f32], w: usize, h: usize, from: (f32, f32), to: (f32, f32), value: f32) {
    let len = ((to.0 - from.0).hypot(to.1 - from.1) * 3.0).ceil().max(1.0) as usize;
    for i in 0..=len {
        let t = i as f32 / len as f32;
        let (x, y) = (from.0 + t * (to.0 - from.0), from.1 + t * (to.1 - from.1));
        let (x0, y0) = (x.floor(), y.floor());
        for (dx, dy) in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)] {
            let (px, py) = (x0 + dx, y0 + dy);
            if px < 0.0 || py < 0.0 || px >= w as f32 || py >= h as f32 {
                continue;
            }
            let wgt = (1.0 - (x - px).abs()) * (1.0 - (y - py).abs());
            let p = &mut buf[py as usize * w + px as usize];
            *p = p.max(value * wgt);
        }
    }
}

/// A synthetic frost texture, RGB in [0, 1]: a hazy plasma base (0.2-0.5) plus about one
/// crystal per 50 pixels, each a needle of 0.25-0.55 image sides with side branches at
/// +-60 degrees, lightly blurred; tinted pale blue like frost photographs.
pub fn frost_texture(w: usize, h: usize, rng: &mut Rng) -> Vec<f32> {
    let base = plasma_crop(w, h, 2.0, rng);
    let mut ice = vec![0.0f32; w * h];
    let side = w.min(h) as f32;
    let crystals = (w * h).div_ceil(50).max(1);
    for _ in 0..crystals {
        let (x0, y0) = (
            rng.random_range(0.0..w as f32),
            rng.random_range(0.0..h as f32),
        );
        let a: f32 = rng.random_range(0.0..std::f32::consts::TAU);
        let len = side * rng.random_range(0.25..0.55);
        let bright = rng.random_range(0.6..1.0);
        let end = (x0 + len * a.cos(), y0 + len * a.sin());
        line(&mut ice, w, h, (x0, y0), end, bright);
        let branches = rng.random_range(2..5);
        for _ in 0..branches {
            let t = rng.random_range(0.2..0.9);
            let (bx, by) = (x0 + t * len * a.cos(), y0 + t * len * a.sin());
            let side_sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            let ba = a + side_sign * std::f32::consts::FRAC_PI_3;
            let bl = len * rng.random_range(0.2..0.45);
            line(
                &mut ice,
                w,
                h,
                (bx, by),
                (bx + bl * ba.cos(), by + bl * ba.sin()),
                bright * 0.8,
            );
        }
    }
    let ice = filters::gaussian(&ice, w, h, 1, 0.5);
    const TINT: [f32; 3] = [0.82, 0.9, 1.0];
    let mut out = vec![0.0f32; w * h * 3];
    for p in 0..w * h {
        let t = (0.2 + 0.3 * base[p] + ice[p]).clamp(0.0, 1.0);
        for c in 0..3 {
            out[p * 3 + c] = t * TINT[c];
        }
    }
    out
}

/// `c0 x + c1 frost` with a synthetic frost texture (see the module docs).
pub fn frost(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let (a, b) = FROST[s];
    let tex = frost_texture(x.w, x.h, rng);
    let mut out = x.clone();
    out.px
        .iter_mut()
        .zip(&tex)
        .for_each(|(v, t)| *v = a * *v + b * t);
    out
}

/// Canny edges of a byte image (3x3 Sobel, L1 magnitude, non-maximum suppression, hysteresis
/// between `lo` and `hi`), as OpenCV's `Canny(img, lo, hi)`.
fn canny(img: &[f32], w: usize, h: usize, lo: f32, hi: f32) -> Vec<bool> {
    let at = |x: isize, y: isize| {
        img[filters::border_index(y, h, Border::Reflect101) * w
            + filters::border_index(x, w, Border::Reflect101)]
    };
    let mut gx = vec![0.0f32; w * h];
    let mut gy = vec![0.0f32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let p = y as usize * w + x as usize;
            gx[p] = at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1)
                - at(x - 1, y - 1)
                - 2.0 * at(x - 1, y)
                - at(x - 1, y + 1);
            gy[p] = at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1)
                - at(x - 1, y - 1)
                - 2.0 * at(x, y - 1)
                - at(x + 1, y - 1);
        }
    }
    let mag: Vec<f32> = gx.iter().zip(&gy).map(|(a, b)| a.abs() + b.abs()).collect();
    let m = |x: isize, y: isize| {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0.0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    // 0: weak/none, 1: weak candidate, 2: strong.
    let mut state = vec![0u8; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let p = y as usize * w + x as usize;
            let v = mag[p];
            if v <= lo {
                continue;
            }
            let ang = gy[p].atan2(gx[p]).to_degrees().rem_euclid(180.0);
            let (dx, dy) = if !(22.5..157.5).contains(&ang) {
                (1, 0)
            } else if ang < 67.5 {
                (1, 1)
            } else if ang < 112.5 {
                (0, 1)
            } else {
                (-1, 1)
            };
            if v > m(x + dx, y + dy) && v >= m(x - dx, y - dy) {
                state[p] = if v > hi { 2 } else { 1 };
            }
        }
    }
    let mut stack: Vec<usize> = (0..w * h).filter(|&p| state[p] == 2).collect();
    while let Some(p) = stack.pop() {
        let (x, y) = ((p % w) as isize, (p / w) as isize);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (xx, yy) = (x + dx, y + dy);
                if xx >= 0 && yy >= 0 && xx < w as isize && yy < h as isize {
                    let q = yy as usize * w + xx as usize;
                    if state[q] == 1 {
                        state[q] = 2;
                        stack.push(q);
                    }
                }
            }
        }
    }
    state.iter().map(|&s| s == 2).collect()
}

fn box3(buf: &[f32], w: usize, h: usize) -> Vec<f32> {
    filters::separable(buf, w, h, 1, &[1.0 / 3.0; 3], Border::Reflect101)
}

/// OpenCV's `equalizeHist` of byte values.
fn equalize(buf: &[f32]) -> Vec<f32> {
    let mut hist = [0usize; 256];
    for &v in buf {
        hist[v.clamp(0.0, 255.0) as usize] += 1;
    }
    let total = buf.len();
    let first = hist.iter().position(|&c| c > 0).unwrap_or(0);
    let cmin = hist[first];
    if total == cmin {
        return buf.to_vec();
    }
    let scale = 255.0 / (total - cmin) as f32;
    let mut lut = [0.0f32; 256];
    let mut cum = 0;
    for i in first..256 {
        cum += hist[i];
        lut[i] = ((cum - cmin) as f32 * scale).round();
    }
    buf.iter()
        .map(|&v| lut[v.clamp(0.0, 255.0) as usize])
        .collect()
}

/// Spatter: a smoothed, thresholded Gaussian "liquid" field. Severities 1-3 add pale
/// turquoise water whose intensity is shaded by the distance to the drops' Canny edges;
/// severities 4-5 cover the image with opaque mud-brown blobs.
pub fn spatter(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let c = SPATTER[s];
    let (w, h) = (x.w, x.h);
    let mut liquid = normal_field(w * h, c[0], c[1], rng);
    liquid = filters::gaussian(&liquid, w, h, 1, c[2]);
    liquid
        .iter_mut()
        .filter(|v| **v < c[3])
        .for_each(|v| *v = 0.0);
    let mut out = x.clone();
    if c[5] == 0.0 {
        let l8: Vec<f32> = liquid
            .iter()
            .map(|v| (v * 255.0).clamp(0.0, 255.0).floor())
            .collect();
        let edges = canny(&l8, w, h, 50.0, 150.0);
        let edge_pts: Vec<(f32, f32)> = (0..w * h)
            .filter(|&p| edges[p])
            .map(|p| ((p % w) as f32, (p / w) as f32))
            .collect();
        let dist: Vec<f32> = (0..w * h)
            .map(|p| {
                let (px, py) = ((p % w) as f32, (p / w) as f32);
                edge_pts
                    .iter()
                    .map(|&(ex, ey)| (px - ex).hypot(py - ey))
                    .fold(20.0f32, f32::min)
            })
            .collect();
        let dist: Vec<f32> = box3(&dist, w, h).iter().map(|v| v.floor()).collect();
        let dist = equalize(&dist);
        let ker = [-2.0, -1.0, 0.0, -1.0, 1.0, 1.0, 0.0, 1.0, 2.0];
        let dist: Vec<f32> =
            filters::correlate(&dist, Dims { w, h, nc: 1 }, &ker, 3, 3, Border::Reflect101)
                .iter()
                .map(|v| v.round().clamp(0.0, 255.0))
                .collect();
        let dist = box3(&dist, w, h);
        let mut m: Vec<f32> = liquid.iter().zip(&dist).map(|(a, b)| a * b).collect();
        let mx = m.iter().copied().fold(0.0f32, f32::max);
        let k = if mx > 0.0 { c[4] / mx } else { 0.0 };
        m.iter_mut().for_each(|v| *v *= k);
        const WATER: [f32; 3] = [175.0 / 255.0, 238.0 / 255.0, 238.0 / 255.0];
        for (q, px) in out.px.chunks_exact_mut(3).enumerate() {
            for ch in 0..3 {
                px[ch] += m[q] * WATER[ch];
            }
        }
    } else {
        let mask: Vec<f32> = liquid
            .iter()
            .map(|&v| f32::from(u8::from(v > c[3])))
            .collect();
        let mut m = filters::gaussian(&mask, w, h, 1, c[4]);
        m.iter_mut().filter(|v| **v < 0.8).for_each(|v| *v = 0.0);
        const MUD: [f32; 3] = [63.0 / 255.0, 42.0 / 255.0, 20.0 / 255.0];
        for (q, px) in out.px.chunks_exact_mut(3).enumerate() {
            for ch in 0..3 {
                px[ch] = px[ch] * (1.0 - m[q]) + MUD[ch] * m[q];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util;

    #[test]
    fn plasma_spans_zero_to_one() {
        let p = plasma_fractal(32, 2.0, &mut util::rng(1, 0));
        assert_eq!(p.len(), 32 * 32);
        let lo = p.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = p.iter().copied().fold(0.0f32, f32::max);
        assert_eq!((lo, hi), (0.0, 1.0));
    }

    #[test]
    fn equalize_spreads_two_levels() {
        // Half 10s, half 20s: cdf_min = 2, total 4 -> 10 maps to 0, 20 to 255.
        assert_eq!(
            equalize(&[10.0, 20.0, 10.0, 20.0]),
            vec![0.0, 255.0, 0.0, 255.0]
        );
    }

    #[test]
    fn canny_finds_a_vertical_step() {
        // Left half 0, right half 200: edges only next to the step (columns 3-4 of 8).
        let img: Vec<f32> = (0..64)
            .map(|p| if p % 8 >= 4 { 200.0 } else { 0.0 })
            .collect();
        let e = canny(&img, 8, 8, 50.0, 150.0);
        assert!(e.iter().any(|&b| b));
        for (p, &b) in e.iter().enumerate() {
            if b {
                assert!((3..=4).contains(&(p % 8)), "edge at column {}", p % 8);
            }
        }
    }
}
