//! Blur corruptions of CIFAR-10-C: Gaussian, defocus (anti-aliased disk kernel), glass
//! (blur, local pixel shuffling, blur), motion (ImageMagick's one-sided kernel at a random
//! angle) and zoom (average of centrally zoomed copies).

use super::filters::{self, Border, Dims};
use super::Img;
use crate::util::Rng;
use rand::Rng as _;

/// Gaussian sigma per severity.
pub const GAUSSIAN: [f32; 5] = [0.4, 0.6, 0.7, 0.8, 1.0];
/// Glass blur: (sigma, max shift, iterations) per severity.
pub const GLASS: [(f32, isize, usize); 5] = [
    (0.05, 1, 1),
    (0.25, 1, 1),
    (0.4, 1, 1),
    (0.25, 1, 2),
    (0.4, 1, 2),
];
/// Defocus blur: (disk radius, anti-alias sigma) per severity.
pub const DEFOCUS: [(f32, f32); 5] = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)];
/// Motion blur: (radius, sigma) per severity; the angle is uniform in [-45, 45) degrees.
pub const MOTION: [(f32, f32); 5] = [(6.0, 1.0), (6.0, 1.5), (6.0, 2.0), (8.0, 2.0), (9.0, 2.5)];
/// Zoom blur: the largest zoom factor per severity (`np.arange(1, end, 0.01)`).
pub const ZOOM_END: [f64; 5] = [1.06, 1.11, 1.16, 1.21, 1.26];

/// skimage `gaussian` with CIFAR-10-C's sigma.
pub fn gaussian(x: &Img, s: usize) -> Img {
    Img {
        w: x.w,
        h: x.h,
        px: filters::gaussian(&x.px, x.w, x.h, 3, GAUSSIAN[s]),
    }
}

/// CIFAR-10-C's `disk`: a 17x17 indicator of `X^2 + Y^2 <= r^2`, normalised, then smoothed by
/// a 3x3 Gaussian of sigma `alias_blur` (OpenCV `GaussianBlur`, reflect-101 borders).
pub fn disk(radius: f32, alias_blur: f32) -> (Vec<f32>, usize) {
    let r = radius.max(8.0).ceil() as isize;
    let n = (2 * r + 1) as usize;
    let mut k: Vec<f32> = (-r..=r)
        .flat_map(|y| {
            (-r..=r).map(move |x| ((x * x + y * y) as f32 <= radius * radius) as u8 as f32)
        })
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let g = filters::cv_gaussian_kernel(if radius <= 8.0 { 3 } else { 5 }, alias_blur);
    (filters::separable(&k, n, n, 1, &g, Border::Reflect101), n)
}

/// Correlation with the anti-aliased disk (OpenCV `filter2D`, reflect-101 borders).
pub fn defocus(x: &Img, s: usize) -> Img {
    let (r, a) = DEFOCUS[s];
    let (k, n) = disk(r, a);
    Img {
        w: x.w,
        h: x.h,
        px: filters::correlate(
            &x.px,
            Dims {
                w: x.w,
                h: x.h,
                nc: 3,
            },
            &k,
            n,
            n,
            Border::Reflect101,
        ),
    }
}

/// Blur, then (per iteration) swap each interior pixel with a neighbour at offsets drawn
/// from `[-d, d)` (bottom-right to top-left, as CIFAR-10-C), then blur again. The first blur
/// is quantised to bytes, as in the reference.
pub fn glass(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let (sigma, d, iters) = GLASS[s];
    let (w, h) = (x.w, x.h);
    let mut px: Vec<f32> = filters::gaussian(&x.px, w, h, 3, sigma)
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).floor() / 255.0)
        .collect();
    let (wi, hi) = (w as isize, h as isize);
    for _ in 0..iters {
        let mut yy = hi - d;
        while yy > d {
            let mut xx = wi - d;
            while xx > d {
                let dx = rng.random_range(-d as i64..d as i64) as isize;
                let dy = rng.random_range(-d as i64..d as i64) as isize;
                let (y2, x2) = (yy + dy, xx + dx);
                if (0..hi).contains(&y2) && (0..wi).contains(&x2) && yy < hi && xx < wi {
                    let a = (yy * wi + xx) as usize * 3;
                    let b = (y2 * wi + x2) as usize * 3;
                    for c in 0..3 {
                        px.swap(a + c, b + c);
                    }
                }
                xx -= 1;
            }
            yy -= 1;
        }
    }
    Img {
        w,
        h,
        px: filters::gaussian(&px, w, h, 3, sigma),
    }
}

/// ImageMagick-style motion blur (see `filters::motion_blur`) at a random angle in
/// [-45, 45) degrees.
pub fn motion(x: &Img, s: usize, rng: &mut Rng) -> Img {
    let (radius, sigma) = MOTION[s];
    let angle: f32 = rng.random_range(-45.0..45.0);
    Img {
        w: x.w,
        h: x.h,
        px: filters::motion_blur(&x.px, x.w, x.h, 3, radius, sigma, angle),
    }
}

/// The zoom factors of severity `s`: `np.arange(1, end, 0.01)`, including NumPy's rounding
/// of the element count (`ceil((end - 1) / 0.01)`).
pub fn zoom_factors(s: usize) -> Vec<f32> {
    let n = ((ZOOM_END[s] - 1.0) / 0.01).ceil() as usize;
    (0..n).map(|i| (1.0 + i as f64 * 0.01) as f32).collect()
}

/// `(x + sum_z clipped_zoom(x, z)) / (count + 1)`.
pub fn zoom(x: &Img, s: usize) -> Img {
    let zs = zoom_factors(s);
    let mut acc = x.px.clone();
    for &z in &zs {
        let zz = filters::clipped_zoom(&x.px, x.w, x.h, 3, z);
        acc.iter_mut().zip(&zz).for_each(|(a, b)| *a += b);
    }
    let n = (zs.len() + 1) as f32;
    acc.iter_mut().for_each(|v| *v /= n);
    Img {
        w: x.w,
        h: x.h,
        px: acc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoom_factor_counts_follow_numpy() {
        // np.arange(1, 1.06, 0.01) has 7 elements (float rounding), 1.16 gives 16.
        let counts: Vec<usize> = (0..5).map(|s| zoom_factors(s).len()).collect();
        assert_eq!(counts, vec![7, 12, 16, 21, 26]);
    }

    #[test]
    fn disk_is_normalised_and_small_radius_is_nearly_a_point() {
        let (k, n) = disk(0.3, 0.4);
        assert_eq!(n, 17);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // Radius 0.3 keeps only the centre; the 3x3 blur spreads it to the 8 neighbours.
        let c = 8 * 17 + 8;
        assert!(k[c] > 0.5 && k[c + 1] > 0.0 && k[c + 2] == 0.0);
    }
}
