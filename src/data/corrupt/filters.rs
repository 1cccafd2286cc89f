//! Small image filters the corruptions share: border modes, separable Gaussian filtering
//! (skimage/scipy semantics), 2-D correlation (OpenCV `filter2D`), bilinear sampling, scipy's
//! `zoom` with central crop (CIFAR-10-C's `clipped_zoom`), ImageMagick's motion blur and the
//! RGB <-> HSV conversions of skimage. Buffers are row-major, `nc` interleaved channels.

/// How a filter reads outside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Border {
    /// Repeat the edge pixel (skimage `gaussian`'s default `nearest`).
    Nearest,
    /// Half-sample symmetric, `dcba|abcd|dcba` (scipy `reflect`).
    Reflect,
    /// Whole-sample symmetric, `dcb|abcd|cba` (OpenCV's default, `BORDER_REFLECT_101`).
    Reflect101,
}

/// Width, height and interleaved channels of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub w: usize,
    pub h: usize,
    pub nc: usize,
}

/// Index `i` of a line of `n` values under `border`.
pub fn border_index(i: isize, n: usize, border: Border) -> usize {
    let n_i = n as isize;
    if (0..n_i).contains(&i) {
        return i as usize;
    }
    match border {
        Border::Nearest => i.clamp(0, n_i - 1) as usize,
        Border::Reflect => {
            let period = 2 * n_i;
            let m = i.rem_euclid(period);
            (if m < n_i { m } else { period - 1 - m }) as usize
        }
        Border::Reflect101 => {
            if n == 1 {
                return 0;
            }
            let period = 2 * n_i - 2;
            let m = i.rem_euclid(period);
            (if m < n_i { m } else { period - m }) as usize
        }
    }
}

/// The normalised 1-D Gaussian of scipy/skimage: radius `round(truncate * sigma)`.
pub fn gaussian_kernel(sigma: f32, truncate: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return vec![1.0];
    }
    let r = (truncate * sigma + 0.5) as isize;
    let mut k: Vec<f32> = (-r..=r)
        .map(|x| (-((x * x) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k
}

/// OpenCV's `getGaussianKernel(ksize, sigma)` (sigma <= 0 derives it from the size).
pub fn cv_gaussian_kernel(ksize: usize, sigma: f32) -> Vec<f32> {
    let sigma = if sigma > 0.0 {
        sigma
    } else {
        0.3 * ((ksize as f32 - 1.0) * 0.5 - 1.0) + 0.8
    };
    let c = (ksize as f32 - 1.0) / 2.0;
    let mut k: Vec<f32> = (0..ksize)
        .map(|i| (-(i as f32 - c).powi(2) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k
}

/// Separable filtering of a `w x h` buffer with `nc` channels by the same odd-length 1-D
/// kernel along rows and columns.
pub fn separable(
    buf: &[f32],
    w: usize,
    h: usize,
    nc: usize,
    k: &[f32],
    border: Border,
) -> Vec<f32> {
    let r = (k.len() / 2) as isize;
    let mut tmp = vec![0.0f32; buf.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..nc {
                let mut acc = 0.0;
                for (j, &kv) in k.iter().enumerate() {
                    let xx = border_index(x as isize + j as isize - r, w, border);
                    acc += kv * buf[(y * w + xx) * nc + c];
                }
                tmp[(y * w + x) * nc + c] = acc;
            }
        }
    }
    let mut out = vec![0.0f32; buf.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..nc {
                let mut acc = 0.0;
                for (j, &kv) in k.iter().enumerate() {
                    let yy = border_index(y as isize + j as isize - r, h, border);
                    acc += kv * tmp[(yy * w + x) * nc + c];
                }
                out[(y * w + x) * nc + c] = acc;
            }
        }
    }
    out
}

/// skimage's `gaussian(x, sigma)` (truncate 4, border `nearest`) on every channel.
pub fn gaussian(buf: &[f32], w: usize, h: usize, nc: usize, sigma: f32) -> Vec<f32> {
    separable(buf, w, h, nc, &gaussian_kernel(sigma, 4.0), Border::Nearest)
}

/// OpenCV's `filter2D`: correlation of every channel with a `kw x kh` kernel anchored at its
/// centre.
pub fn correlate(
    buf: &[f32],
    dims: Dims,
    k: &[f32],
    kw: usize,
    kh: usize,
    border: Border,
) -> Vec<f32> {
    let Dims { w, h, nc } = dims;
    let (rx, ry) = ((kw / 2) as isize, (kh / 2) as isize);
    let mut out = vec![0.0f32; buf.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..nc {
                let mut acc = 0.0;
                for j in 0..kh {
                    let yy = border_index(y as isize + j as isize - ry, h, border);
                    for i in 0..kw {
                        let xx = border_index(x as isize + i as isize - rx, w, border);
                        acc += k[j * kw + i] * buf[(yy * w + xx) * nc + c];
                    }
                }
                out[(y * w + x) * nc + c] = acc;
            }
        }
    }
    out
}

/// Bilinear value of channel `c` at (`y`, `x`) (fractional), reading outside under `border`.
pub fn bilinear(buf: &[f32], dims: Dims, c: usize, y: f32, x: f32, border: Border) -> f32 {
    let Dims { w, h, nc } = dims;
    let (y0, x0) = (y.floor(), x.floor());
    let (fy, fx) = (y - y0, x - x0);
    let (y0, x0) = (y0 as isize, x0 as isize);
    let at = |yy: isize, xx: isize| {
        buf[(border_index(yy, h, border) * w + border_index(xx, w, border)) * nc + c]
    };
    (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
        + fy * ((1.0 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1))
}

/// CIFAR-10-C's `clipped_zoom`: the central `ceil(h / z) x ceil(w / z)` crop is resized by
/// linear interpolation (scipy `zoom`, order 1: corners map to corners) to
/// `round(z * crop)` and its central `w x h` part kept.
pub fn clipped_zoom(buf: &[f32], w: usize, h: usize, nc: usize, z: f32) -> Vec<f32> {
    let ch = ((h as f32 / z).ceil() as usize).clamp(1, h);
    let cw = ((w as f32 / z).ceil() as usize).clamp(1, w);
    let (top, left) = ((h - ch) / 2, (w - cw) / 2);
    let oh = ((ch as f32 * z).round() as usize).max(h);
    let ow = ((cw as f32 * z).round() as usize).max(w);
    let (tt, tl) = ((oh - h) / 2, (ow - w) / 2);
    let scale = |n_in: usize, n_out: usize| {
        if n_out > 1 {
            (n_in as f32 - 1.0) / (n_out as f32 - 1.0)
        } else {
            0.0
        }
    };
    let (sy, sx) = (scale(ch, oh), scale(cw, ow));
    let mut out = vec![0.0f32; w * h * nc];
    for y in 0..h {
        let iy = top as f32 + (y + tt) as f32 * sy;
        for x in 0..w {
            let ix = left as f32 + (x + tl) as f32 * sx;
            for c in 0..nc {
                out[(y * w + x) * nc + c] =
                    bilinear(buf, Dims { w, h, nc }, c, iy, ix, Border::Nearest);
            }
        }
    }
    out
}

/// ImageMagick's `MotionBlurImage(radius, sigma, angle)`: a one-sided Gaussian kernel of
/// `2 ceil(radius) + 1` taps along the direction `angle` (degrees, image coordinates),
/// offsets rounded to whole pixels, edge pixels repeated.
pub fn motion_blur(
    buf: &[f32],
    w: usize,
    h: usize,
    nc: usize,
    radius: f32,
    sigma: f32,
    angle: f32,
) -> Vec<f32> {
    let width = 2 * radius.ceil() as usize + 1;
    let mut k: Vec<f32> = (0..width)
        .map(|i| (-((i * i) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let (sin, cos) = angle.to_radians().sin_cos();
    let offs: Vec<(isize, isize)> = (0..width)
        .map(|i| {
            (
                (i as f32 * cos).round() as isize,
                (i as f32 * sin).round() as isize,
            )
        })
        .collect();
    let mut out = vec![0.0f32; buf.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..nc {
                let mut acc = 0.0;
                for (&kv, &(dx, dy)) in k.iter().zip(&offs) {
                    let xx = border_index(x as isize + dx, w, Border::Nearest);
                    let yy = border_index(y as isize + dy, h, Border::Nearest);
                    acc += kv * buf[(yy * w + xx) * nc + c];
                }
                out[(y * w + x) * nc + c] = acc;
            }
        }
    }
    out
}

/// skimage's `rgb2hsv` of one pixel (all in [0, 1]).
pub fn rgb_to_hsv([r, g, b]: [f32; 3]) -> [f32; 3] {
    let v = r.max(g).max(b);
    let delta = v - r.min(g).min(b);
    let s = if v == 0.0 { 0.0 } else { delta / v };
    let h = if delta == 0.0 {
        0.0
    } else {
        let h6 = if b == v {
            4.0 + (r - g) / delta
        } else if g == v {
            2.0 + (b - r) / delta
        } else {
            (g - b) / delta
        };
        (h6 / 6.0).rem_euclid(1.0)
    };
    [h, s, v]
}

/// skimage's `hsv2rgb` of one pixel.
pub fn hsv_to_rgb([h, s, v]: [f32; 3]) -> [f32; 3] {
    let h6 = h * 6.0;
    let hi = h6.floor();
    let f = h6 - hi;
    let p = v * (1.0 - s);
    let q = v * (1.0 - f * s);
    let t = v * (1.0 - (1.0 - f) * s);
    match (hi as i64).rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// ITU-R 601 luma (OpenCV's `COLOR_RGB2GRAY`).
pub fn gray([r, g, b]: [f32; 3]) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn border_modes() {
        // n = 4: a b c d at 0..3.
        let f = |i, b| border_index(i, 4, b);
        assert_eq!([f(-1, Border::Nearest), f(5, Border::Nearest)], [0, 3]);
        assert_eq!(
            [
                f(-1, Border::Reflect),
                f(-2, Border::Reflect),
                f(4, Border::Reflect)
            ],
            [0, 1, 3]
        );
        assert_eq!(
            [
                f(-1, Border::Reflect101),
                f(-2, Border::Reflect101),
                f(4, Border::Reflect101)
            ],
            [1, 2, 2]
        );
    }

    #[test]
    fn gaussian_kernel_matches_scipy_radius_and_weights() {
        // sigma 1, truncate 4: radius 4; weight ratio of taps 0 and 1 is exp(1/2).
        let k = gaussian_kernel(1.0, 4.0);
        assert_eq!(k.len(), 9);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((k[4] / k[5] - 0.5f32.exp()).abs() < 1e-5);
    }

    #[test]
    fn hsv_round_trip_and_known_values() {
        assert_eq!(rgb_to_hsv([1.0, 0.0, 0.0]), [0.0, 1.0, 1.0]);
        let [h, s, v] = rgb_to_hsv([0.0, 0.5, 1.0]);
        // Hue of (0, .5, 1): 4 + (0 - .5) / 1 = 3.5 sixths.
        assert!((h - 3.5 / 6.0).abs() < 1e-6 && s == 1.0 && v == 1.0);
        for rgb in [[0.2, 0.7, 0.4], [0.9, 0.1, 0.5], [0.3, 0.3, 0.3]] {
            let back = hsv_to_rgb(rgb_to_hsv(rgb));
            for c in 0..3 {
                assert!((back[c] - rgb[c]).abs() < 1e-6, "{rgb:?} -> {back:?}");
            }
        }
    }

    #[test]
    fn clipped_zoom_by_one_is_identity_and_zoom_magnifies_centre() {
        let buf: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(clipped_zoom(&buf, 4, 4, 1, 1.0), buf);
        // Zoom 2 on 4x4: crop rows/cols 1..3, resized 2 -> 4 with corners to corners:
        // positions 1 + {0, 1/3, 2/3, 1}.
        let z = clipped_zoom(&buf, 4, 4, 1, 2.0);
        assert!((z[0] - 5.0).abs() < 1e-5);
        assert!((z[15] - 10.0).abs() < 1e-5);
        assert!((z[1] - (5.0 + 1.0 / 3.0)).abs() < 1e-5);
    }
}
