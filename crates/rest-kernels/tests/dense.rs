//! Dense kernels against naive, independently written references (direct 7-loop convolution,
//! textbook batch-norm backward in f64, window-scanning pooling) over many seeded random
//! shapes: odd sizes, strides 1/2, paddings 0-3, kernel sizes 1/3/4/7, batch 1.

mod common;

use common::rand_vec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use rest_kernels::*;

const RTOL: f64 = 1e-4;

/// Asserts `|got - want| <= RTOL * max(1e-3, max|want|)` element-wise.
fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_close_floor(got, want, 1e-3, what)
}

/// Asserts `|got - want| <= RTOL * max(floor, max|want|)` element-wise.
fn assert_close_floor(got: &[f32], want: &[f64], floor: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= RTOL * scale,
            "{what}: element {i}: got {g}, want {w} (scale {scale})"
        );
    }
}

fn x_at(x: &[f32], g: &Conv2dGeom, c: usize, n: usize, y: isize, xx: isize) -> f64 {
    if y < 0 || xx < 0 || y >= g.h as isize || xx >= g.w as isize {
        0.0
    } else {
        x[((c * g.n + n) * g.h + y as usize) * g.w + xx as usize] as f64
    }
}

/// Direct convolution, CNHW in/out, weights [oc][c][kh][kw].
fn naive_conv(x: &[f32], w: &[f32], g: &Conv2dGeom) -> Vec<f64> {
    let (oh, ow) = (g.oh(), g.ow());
    let mut out = vec![0.0f64; g.oc * g.n * oh * ow];
    for o in 0..g.oc {
        for n in 0..g.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = 0.0;
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let iy = (oy * g.stride + i) as isize - g.pad as isize;
                                let ix = (ox * g.stride + j) as isize - g.pad as isize;
                                s += w[((o * g.c + c) * g.kh + i) * g.kw + j] as f64
                                    * x_at(x, g, c, n, iy, ix);
                            }
                        }
                    }
                    out[((o * g.n + n) * oh + oy) * ow + ox] = s;
                }
            }
        }
    }
    out
}

/// Direct scatter of output gradients onto inputs and weights.
fn naive_conv_bwd(x: &[f32], w: &[f32], dout: &[f32], g: &Conv2dGeom) -> (Vec<f64>, Vec<f64>) {
    let (oh, ow) = (g.oh(), g.ow());
    let mut dx = vec![0.0f64; g.x_len()];
    let mut dw = vec![0.0f64; g.w_len()];
    for o in 0..g.oc {
        for n in 0..g.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let d = dout[((o * g.n + n) * oh + oy) * ow + ox] as f64;
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let iy = (oy * g.stride + i) as isize - g.pad as isize;
                                let ix = (ox * g.stride + j) as isize - g.pad as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xi = ((c * g.n + n) * g.h + iy as usize) * g.w + ix as usize;
                                let wi = ((o * g.c + c) * g.kh + i) * g.kw + j;
                                dx[xi] += w[wi] as f64 * d;
                                dw[wi] += x[xi] as f64 * d;
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw)
}

fn random_geom(rng: &mut ChaCha8Rng) -> Conv2dGeom {
    let k = [1usize, 3, 4, 7][rng.random_range(0..4)];
    let stride = rng.random_range(1..=2);
    let pad = rng.random_range(0..=3usize.min(k));
    let min_side = k.saturating_sub(2 * pad).max(1);
    Conv2dGeom {
        c: rng.random_range(1..=5),
        n: if rng.random_bool(0.3) {
            1
        } else {
            rng.random_range(1..=3)
        },
        h: rng.random_range(min_side..=min_side + 9),
        w: rng.random_range(min_side..=min_side + 9),
        oc: rng.random_range(1..=6),
        kh: k,
        kw: k,
        stride,
        pad,
    }
}

/// A square-kernel geometry: `(c, n, h, w, oc, k, stride, pad)`.
#[allow(clippy::too_many_arguments)]
fn square_geom(
    c: usize,
    n: usize,
    h: usize,
    w: usize,
    oc: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Conv2dGeom {
    Conv2dGeom {
        c,
        n,
        h,
        w,
        oc,
        kh: k,
        kw: k,
        stride,
        pad,
    }
}

fn fixed_geoms() -> Vec<Conv2dGeom> {
    let g = square_geom;
    vec![
        g(3, 2, 28, 28, 8, 4, 2, 1),   // CNN layer 1 (narrow)
        g(16, 2, 14, 14, 8, 4, 2, 1),  // CNN layer 2 shape class
        g(8, 1, 7, 7, 5, 4, 2, 1),     // CNN layer 3: 7x7 -> 3x3
        g(6, 3, 9, 11, 7, 1, 1, 0),    // 1x1 stride 1: no im2col
        g(6, 2, 9, 11, 7, 1, 2, 0),    // 1x1 stride 2 (ResNet shortcut)
        g(3, 1, 19, 17, 4, 7, 2, 3),   // ResNet stem class
        g(5, 2, 8, 8, 3, 3, 1, 1),     // ResNet 3x3 stride 1
        g(2, 1, 5, 6, 3, 3, 2, 3),     // padding larger than half the kernel
        g(64, 40, 14, 14, 8, 4, 2, 1), // several image tiles, run in parallel, ragged last tile
        g(128, 3, 28, 28, 4, 4, 2, 1), // one image per tile, tiles run serially
        Conv2dGeom {
            kh: 3,
            kw: 1,
            ..g(2, 2, 6, 5, 3, 1, 1, 1)
        }, // non-square kernel
        // The direct weight gradient of few-channel convolutions (AVX-512): a 32 px stem
        // with several image groups and a ragged block of output channels, stride 3 with
        // output rows shorter than a vector, stride 1 with a ragged row tail and tap block.
        g(3, 20, 32, 32, 7, 7, 2, 3),
        g(2, 3, 41, 37, 5, 5, 3, 2),
        g(4, 2, 36, 40, 3, 3, 1, 0),
    ]
}

fn all_geoms() -> Vec<Conv2dGeom> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut v = fixed_geoms();
    v.extend((0..80).map(|_| random_geom(&mut rng)));
    v
}

#[test]
fn geometry_helpers_match_formula() {
    let g = Conv2dGeom {
        c: 3,
        n: 5,
        h: 28,
        w: 27,
        oc: 64,
        kh: 4,
        kw: 4,
        stride: 2,
        pad: 1,
    };
    // (28 + 2 - 4) / 2 + 1 = 14; (27 + 2 - 4) / 2 + 1 = 13.
    assert_eq!((g.oh(), g.ow()), (14, 13));
    assert_eq!(g.k(), 48);
    assert_eq!(g.p(), 5 * 14 * 13);
    assert!(g.validate().is_ok());
    assert!(Conv2dGeom { stride: 0, ..g }.validate().is_err());
    assert!(Conv2dGeom { h: 1, pad: 0, ..g }.validate().is_err());
}

#[test]
fn im2col_matches_definition_and_col2im_is_its_adjoint() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for g in all_geoms() {
        let x = rand_vec(&mut rng, g.x_len());
        let mut col = vec![f32::NAN; g.col_len()];
        im2col(&x, &g, &mut col);
        let (oh, ow, p) = (g.oh(), g.ow(), g.p());
        for c in 0..g.c {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    for n in 0..g.n {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let iy = (oy * g.stride + i) as isize - g.pad as isize;
                                let ix = (ox * g.stride + j) as isize - g.pad as isize;
                                let k = (c * g.kh + i) * g.kw + j;
                                let got = col[k * p + (n * oh + oy) * ow + ox] as f64;
                                assert_eq!(got, x_at(&x, &g, c, n, iy, ix), "{g:?}");
                            }
                        }
                    }
                }
            }
        }
        // <im2col(x), r> == <x, col2im(r)>, and col2im accumulates onto dx.
        let r = rand_vec(&mut rng, g.col_len());
        let base = rand_vec(&mut rng, g.x_len());
        let mut dx = base.clone();
        col2im(&r, &g, &mut dx);
        let lhs: f64 = col.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rhs: f64 = x
            .iter()
            .zip(dx.iter().zip(&base))
            .map(|(a, (d, b0))| *a as f64 * (*d as f64 - *b0 as f64))
            .sum();
        assert!(
            (lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()),
            "adjoint {g:?}: {lhs} vs {rhs}"
        );
    }
}

#[test]
fn conv2d_forward_matches_direct_convolution() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for g in all_geoms() {
        let x = rand_vec(&mut rng, g.x_len());
        let w = rand_vec(&mut rng, g.w_len());
        let mut out = vec![f32::NAN; g.out_len()];
        conv2d_fwd(&x, &w, &g, &mut out);
        assert_close(&out, &naive_conv(&x, &w, &g), &format!("fwd {g:?}"));
    }
}

#[test]
fn conv2d_backward_matches_direct_scatter() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for g in all_geoms() {
        let x = rand_vec(&mut rng, g.x_len());
        let w = rand_vec(&mut rng, g.w_len());
        let dout = rand_vec(&mut rng, g.out_len());
        let (dx_ref, dw_ref) = naive_conv_bwd(&x, &w, &dout, &g);
        let mut dx = vec![f32::NAN; g.x_len()];
        conv2d_bwd_input(&w, &dout, &g, &mut dx);
        assert_close(&dx, &dx_ref, &format!("dx {g:?}"));
        let mut dw = vec![f32::NAN; g.w_len()];
        conv2d_bwd_weight(&x, &dout, &g, &mut dw);
        assert_close(&dw, &dw_ref, &format!("dw {g:?}"));
        // The column-reusing entry point agrees with the allocating one.
        if needs_im2col(&g) {
            let mut col = vec![0.0; g.col_len()];
            im2col(&x, &g, &mut col);
            let mut dw2 = vec![f32::NAN; g.w_len()];
            conv2d_bwd_weight_col(&col, &dout, &g, &mut dw2);
            assert_close(&dw2, &dw_ref, &format!("dw(col) {g:?}"));
        }
    }
}

#[test]
fn linear_forward_and_backward_match_naive() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for &(n, i, o) in &[
        (1, 1, 1),
        (3, 7, 5),
        (17, 33, 10),
        (64, 2352, 100),
        (256, 256, 10),
    ] {
        let x = rand_vec(&mut rng, n * i);
        let w = rand_vec(&mut rng, o * i);
        let b = rand_vec(&mut rng, o);
        let dy = rand_vec(&mut rng, n * o);
        let mut y_ref = vec![0.0f64; n * o];
        let mut dx_ref = vec![0.0f64; n * i];
        let mut dw_ref = vec![0.0f64; o * i];
        let mut db_ref = vec![0.0f64; o];
        for r in 0..n {
            for q in 0..o {
                let mut s = b[q] as f64;
                for k in 0..i {
                    s += x[r * i + k] as f64 * w[q * i + k] as f64;
                    dx_ref[r * i + k] += dy[r * o + q] as f64 * w[q * i + k] as f64;
                    dw_ref[q * i + k] += dy[r * o + q] as f64 * x[r * i + k] as f64;
                }
                y_ref[r * o + q] = s;
                db_ref[q] += dy[r * o + q] as f64;
            }
        }
        let mut y = vec![f32::NAN; n * o];
        linear_fwd(&x, &w, Some(&b), n, i, o, &mut y);
        assert_close(&y, &y_ref, "linear y");
        let mut y_nb = vec![f32::NAN; n * o];
        linear_fwd(&x, &w, None, n, i, o, &mut y_nb);
        let y_nb_ref: Vec<f64> = (0..n * o).map(|t| y_ref[t] - b[t % o] as f64).collect();
        assert_close(&y_nb, &y_nb_ref, "linear y (no bias)");
        let mut dx = vec![f32::NAN; n * i];
        linear_bwd_input(&dy, &w, n, i, o, &mut dx);
        assert_close(&dx, &dx_ref, "linear dx");
        let mut dw = vec![f32::NAN; o * i];
        linear_bwd_weight(&dy, &x, n, i, o, &mut dw);
        assert_close(&dw, &dw_ref, "linear dw");
        let mut db = vec![f32::NAN; o];
        linear_bwd_bias(&dy, n, o, &mut db);
        assert_close(&db, &db_ref, "linear db");
    }
}

/// Textbook batch norm in f64 (forward, then the chain rule through mean and variance).
#[allow(clippy::type_complexity)]
fn naive_bn(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    relu: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let c = gamma.len();
    let m = x.len() / c;
    let eps = 1e-5f64;
    let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    let (mut mean, mut var, mut dg, mut db) =
        (vec![0.0; c], vec![0.0; c], vec![0.0; c], vec![0.0; c]);
    for ch in 0..c {
        let xs: Vec<f64> = x[ch * m..(ch + 1) * m].iter().map(|v| *v as f64).collect();
        let mu = xs.iter().sum::<f64>() / m as f64;
        let v = xs.iter().map(|a| (a - mu).powi(2)).sum::<f64>() / m as f64;
        mean[ch] = mu;
        var[ch] = v;
        let sd = (v + eps).sqrt();
        let mut g = vec![0.0; m];
        for t in 0..m {
            let pre = gamma[ch] as f64 * (xs[t] - mu) / sd + beta[ch] as f64;
            let out = if relu { pre.max(0.0) } else { pre };
            y[ch * m + t] = out;
            g[t] = if relu && pre <= 0.0 {
                0.0
            } else {
                dy[ch * m + t] as f64
            };
            dg[ch] += g[t] * (xs[t] - mu) / sd;
            db[ch] += g[t];
        }
        let dxhat: Vec<f64> = g.iter().map(|v| v * gamma[ch] as f64).collect();
        let dvar: f64 = (0..m)
            .map(|t| dxhat[t] * (xs[t] - mu) * -0.5 * (v + eps).powf(-1.5))
            .sum();
        let dmu: f64 = (0..m).map(|t| -dxhat[t] / sd).sum::<f64>()
            + dvar * (0..m).map(|t| -2.0 * (xs[t] - mu)).sum::<f64>() / m as f64;
        for t in 0..m {
            dx[ch * m + t] = dxhat[t] / sd + dvar * 2.0 * (xs[t] - mu) / m as f64 + dmu / m as f64;
        }
    }
    (y, mean, var, dx, dg, db)
}

#[test]
fn batch_norm_train_forward_backward_match_textbook() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for case in 0..24 {
        let c = rng.random_range(1..=6);
        let m = [1usize, 2, 3, 15, 16, 17, 49, 100, 784][case % 9] * rng.random_range(1..=3);
        let relu = case % 2 == 1;
        // Offset and scale the input so the two-pass statistics are actually exercised.
        let x: Vec<f32> = rand_vec(&mut rng, c * m)
            .iter()
            .map(|v| 3.0 + 2.0 * v)
            .collect();
        let gamma = rand_vec(&mut rng, c);
        let beta = rand_vec(&mut rng, c);
        let dy = rand_vec(&mut rng, c * m);
        let (y_ref, mean_ref, var_ref, dx_ref, dg_ref, db_ref) =
            naive_bn(&x, &gamma, &beta, &dy, relu);
        let mut y = vec![f32::NAN; c * m];
        let stats = batch_norm_train_fwd(&x, &gamma, &beta, BN_EPS, relu, &mut y);
        // y and dx are O(1) quantities (normalised values scaled by gamma, beta in [-1, 1]);
        // with 2-3 values per channel f32 rounding of the mean is amplified by 1/std, so the
        // tolerance is relative to 1 rather than to a possibly tiny max|y|.
        assert_close_floor(&y, &y_ref, 1.0, "bn y");
        assert_close(&stats.mean, &mean_ref, "bn mean");
        assert_close(&stats.var, &var_ref, "bn var");
        let mut dx = vec![f32::NAN; c * m];
        let (dg, db) = batch_norm_bwd(
            &x,
            &dy,
            &gamma,
            relu.then_some(&beta[..]),
            &stats,
            BN_EPS,
            &mut dx,
        );
        if relu {
            // The ReLU's mask is recomputed from x: exactly the forward's `y > 0`, so the
            // result equals the plain backward of `dy` gated by the kept output, bit for bit.
            let gated: Vec<f32> = dy
                .iter()
                .zip(&y)
                .map(|(&d, &yv)| if yv > 0.0 { d } else { 0.0 })
                .collect();
            let mut dx_g = vec![f32::NAN; c * m];
            let (dg_g, db_g) = batch_norm_bwd(&x, &gated, &gamma, None, &stats, BN_EPS, &mut dx_g);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&dx),
                bits(&dx_g),
                "bn dx, mask from x vs from y (m={m})"
            );
            assert_eq!(bits(&dg), bits(&dg_g), "bn dgamma, mask from x vs from y");
            assert_eq!(bits(&db), bits(&db_g), "bn dbeta, mask from x vs from y");
        }
        if m > 1 {
            assert_close_floor(&dx, &dx_ref, 1.0, &format!("bn dx (m={m}, relu={relu})"));
        }
        assert_close(&dg, &dg_ref, "bn dgamma");
        assert_close(&db, &db_ref, "bn dbeta");
    }
}

#[test]
fn batch_norm_eval_and_running_stats_follow_pytorch() {
    // Hand-computed: channel values [1, 2, 3, 6]: mean 3, biased var 3.5, unbiased 14/3.
    let stats = BnBatchStats {
        mean: vec![3.0],
        var: vec![3.5],
    };
    let (mut rm, mut rv) = (vec![1.0f32], vec![2.0f32]);
    update_running_stats(&mut rm, &mut rv, &stats, 4, BN_MOMENTUM);
    assert!((rm[0] - (0.9 + 0.3)).abs() < 1e-6);
    assert!((rv[0] - (1.8 + 0.1 * 14.0 / 3.0)).abs() < 1e-6);
    let x = [1.0f32, 2.0, 3.0, 6.0, -1.0, 0.0];
    let mut y = [0.0f32; 6];
    batch_norm_eval(
        &x,
        &[2.0, 1.0],
        &[0.5, -1.0],
        &[3.0, 0.0],
        &[4.0, 1.0],
        0.0,
        &mut y,
    );
    // Channel 0 = [1, 2, 3]: (x - 3) / 2 * 2 + 0.5; channel 1 = [6, -1, 0]: x / 1 - 1.
    let want = [-1.5f64, -0.5, 0.5, 5.0, -2.0, -1.0];
    assert_close(&y, &want, "bn eval");
}

#[test]
fn global_avg_pool_matches_naive() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // The last two take the parallel per-channel path (>= 2^15 inputs).
    for &(c, n, hw) in &[
        (1, 1, 1),
        (3, 2, 9),
        (7, 5, 49),
        (256, 4, 9),
        (256, 40, 9),
        (5, 3, 4096),
    ] {
        let x = rand_vec(&mut rng, c * n * hw);
        let mut out = vec![f32::NAN; n * c];
        global_avg_pool_fwd(&x, c, n, &mut out);
        let mut want = vec![0.0f64; n * c];
        for ch in 0..c {
            for b in 0..n {
                let s: f64 = (0..hw).map(|t| x[(ch * n + b) * hw + t] as f64).sum();
                want[b * c + ch] = s / hw as f64;
            }
        }
        assert_close(&out, &want, "gap fwd");
        let dout = rand_vec(&mut rng, n * c);
        let mut dx = vec![f32::NAN; c * n * hw];
        global_avg_pool_bwd(&dout, c, n, hw, &mut dx);
        let dx_ref: Vec<f64> = (0..c * n * hw)
            .map(|t| {
                let (ch, b) = (t / hw / n, (t / hw) % n);
                dout[b * c + ch] as f64 / hw as f64
            })
            .collect();
        assert_close(&dx, &dx_ref, "gap bwd");
    }
}

#[test]
fn max_pool_matches_window_scan() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut cases: Vec<(usize, usize, usize)> = vec![
        (3, 2, 1),
        (2, 2, 0),
        (3, 1, 1),
        (3, 2, 0),
        (5, 3, 2),
        (1, 1, 0),
    ];
    for _ in 0..10 {
        let k = rng.random_range(1..=5);
        cases.push((k, rng.random_range(1..=3), rng.random_range(0..=k / 2)));
    }
    for (k, stride, pad) in cases {
        let min_side = k.saturating_sub(2 * pad).max(1);
        let g = MaxPool2dGeom {
            c: rng.random_range(1..=4),
            n: rng.random_range(1..=3),
            h: rng.random_range(min_side..=min_side + 8),
            w: rng.random_range(min_side..=min_side + 8),
            k,
            stride,
            pad,
        };
        let x = rand_vec(&mut rng, g.x_len());
        let mut out = vec![f32::NAN; g.out_len()];
        let mut idx = vec![u32::MAX; g.out_len()];
        max_pool2d_fwd(&x, &g, &mut out, &mut idx);
        let (oh, ow) = (g.oh(), g.ow());
        let plane = g.h * g.w;
        let dout = rand_vec(&mut rng, g.out_len());
        let mut dx_ref = vec![0.0f64; g.x_len()];
        let mut out_ref = vec![0.0f64; g.out_len()];
        for pl in 0..g.c * g.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = (f64::NEG_INFINITY, usize::MAX);
                    for i in 0..k {
                        for j in 0..k {
                            let iy = (oy * stride + i) as isize - pad as isize;
                            let ix = (ox * stride + j) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                continue;
                            }
                            let t = iy as usize * g.w + ix as usize;
                            let v = x[pl * plane + t] as f64;
                            if v > best.0 {
                                best = (v, t);
                            }
                        }
                    }
                    let o = pl * oh * ow + oy * ow + ox;
                    out_ref[o] = best.0;
                    assert_eq!(idx[o] as usize, best.1, "argmax {g:?}");
                    dx_ref[pl * plane + best.1] += dout[o] as f64;
                }
            }
        }
        assert_close(&out, &out_ref, &format!("maxpool fwd {g:?}"));
        let mut dx = vec![f32::NAN; g.x_len()];
        max_pool2d_bwd(&dout, &idx, &g, &mut dx);
        assert_close(&dx, &dx_ref, &format!("maxpool bwd {g:?}"));
    }
}

/// Wide rows (the 16-output vector path), ties, NaNs and all-`-inf` windows: the first
/// maximum in row-major window order, or the first NaN, exactly as a scalar scan finds it.
#[test]
fn max_pool_wide_and_short_rows_ties_and_nans_match_a_scalar_scan() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (k, stride, pad, h, w) in [
        (3, 2, 1, 9, 70),
        (3, 2, 0, 7, 67),
        (2, 2, 0, 6, 64),
        (3, 1, 1, 5, 40),
        (4, 3, 2, 8, 90),
        // Short rows: the inner outputs run 16 at a time across rows.
        (3, 2, 1, 16, 16),
        (3, 2, 1, 12, 10),
        (2, 2, 0, 8, 8),
        (3, 1, 1, 9, 7),
        (4, 3, 2, 14, 11),
        (3, 2, 1, 5, 5),
        // Rows of at most 16 under the 3x3 stride-2 padding-1 pool (the narrow path).
        (3, 2, 1, 7, 16),
        (3, 2, 1, 16, 15),
        (3, 2, 1, 1, 3),
        (3, 2, 1, 2, 1),
        (3, 2, 1, 6, 2),
    ] {
        let g = MaxPool2dGeom {
            c: 2,
            n: 2,
            h,
            w,
            k,
            stride,
            pad,
        };
        // Few distinct levels (many ties), some NaNs and some -inf.
        let x: Vec<f32> = (0..g.x_len())
            .map(|_| match rng.random_range(0..20) {
                0 => f32::NAN,
                1..=3 => f32::NEG_INFINITY,
                v => (v % 4) as f32,
            })
            .collect();
        let mut out = vec![0.0; g.out_len()];
        let mut idx = vec![u32::MAX; g.out_len()];
        max_pool2d_fwd(&x, &g, &mut out, &mut idx);
        let (oh, ow, plane) = (g.oh(), g.ow(), g.h * g.w);
        for pl in 0..g.c * g.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let y0 = (oy * stride).saturating_sub(pad);
                    let y1 = (oy * stride + k - pad).min(h);
                    let x0 = (ox * stride).saturating_sub(pad);
                    let x1 = (ox * stride + k - pad).min(w);
                    let (mut best, mut arg) = (f32::NEG_INFINITY, y0 * w + x0);
                    for iy in y0..y1 {
                        for ix in x0..x1 {
                            let v = x[pl * plane + iy * w + ix];
                            if v > best || (v.is_nan() && !best.is_nan()) {
                                (best, arg) = (v, iy * w + ix);
                            }
                        }
                    }
                    let o = pl * oh * ow + oy * ow + ox;
                    assert_eq!(idx[o] as usize, arg, "argmax at {o}, {g:?}");
                    assert_eq!(out[o].to_bits(), best.to_bits(), "max at {o}, {g:?}");
                }
            }
        }
    }
}

/// The parallel weight gradient sums its image tiles in a fixed order: repeated runs are
/// bitwise identical (a resumed training run must equal an uninterrupted one).
#[test]
fn conv_weight_gradient_is_bitwise_reproducible() {
    let g = Conv2dGeom {
        c: 64,
        n: 64,
        h: 14,
        w: 14,
        oc: 32,
        kh: 4,
        kw: 4,
        stride: 2,
        pad: 1,
    };
    let mut r = ChaCha8Rng::seed_from_u64(99);
    let x: Vec<f32> = (0..g.x_len())
        .map(|_| r.random_range(-1.0f32..1.0))
        .collect();
    let dout: Vec<f32> = (0..g.out_len())
        .map(|_| r.random_range(-1.0f32..1.0))
        .collect();
    let mut first = vec![0.0f32; g.w_len()];
    conv2d_bwd_weight(&x, &dout, &g, &mut first);
    for run in 0..12 {
        let mut dw = vec![f32::NAN; g.w_len()];
        // Competing work on the pool perturbs work stealing (an adaptive split would then
        // change the summation order).
        rayon::join(
            || conv2d_bwd_weight(&x, &dout, &g, &mut dw),
            || {
                let n = 1 + run % 4;
                (0..64 * n)
                    .into_par_iter()
                    .map(|i| (i as f64).sqrt())
                    .sum::<f64>()
            },
        );
        let same = dw
            .iter()
            .zip(&first)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "run {run} differs from the first");
    }
}

/// The stem's inference op (convolution + folded BatchNorm + ReLU + max pool) equals the
/// convolution with its affine epilogue and then the max pool, bit for bit: stems whose
/// direct kernel pools each image group from a tile (32 px with several groups, a ragged
/// block of output channels, odd sizes), a ReLU-less case, and a geometry it does not take.
#[test]
fn conv_affine_maxpool_equals_conv_then_pool() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let g = square_geom;
    let cases = [
        (g(3, 20, 32, 32, 17, 7, 2, 3), (3, 2, 1), true),
        (g(3, 3, 37, 29, 8, 7, 2, 3), (3, 2, 1), false),
        (g(2, 5, 22, 22, 5, 5, 1, 2), (2, 2, 0), true),
        (g(16, 3, 9, 9, 4, 3, 1, 1), (3, 2, 1), true),
    ];
    for (i, &(g, (k, s, p), relu)) in cases.iter().enumerate() {
        let x = rand_vec(&mut rng, g.x_len());
        let w = rand_vec(&mut rng, g.w_len());
        let scale = rand_vec(&mut rng, g.oc);
        let shift = rand_vec(&mut rng, g.oc);
        let mut conv = vec![0.0; g.out_len()];
        conv2d_fwd_affine(&x, &w, &g, &scale, &shift, relu, &mut conv);
        let pg = MaxPool2dGeom {
            c: g.oc,
            n: g.n,
            h: g.oh(),
            w: g.ow(),
            k,
            stride: s,
            pad: p,
        };
        let mut want = vec![0.0; pg.out_len()];
        let mut idx = vec![0u32; pg.out_len()];
        max_pool2d_fwd(&conv, &pg, &mut want, &mut idx);
        let mut got = vec![f32::NAN; pg.out_len()];
        conv2d_fwd_affine_maxpool(&x, &w, &g, &scale, &shift, relu, &pg, &mut got);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "case {i}: {g:?}");
    }
}
