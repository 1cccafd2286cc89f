//! The direct (polyphase) sparse convolution against a naive f64 convolution of the masked
//! dense weight: forward, input gradient and weight gradient at the active positions, over
//! kernel sizes 1/3/4/7, strides 1/2/3, paddings 0-3, odd sizes, batch 1 and densities from
//! 0.001 to 1 (with an empty and a full output row).
#![allow(clippy::needless_range_loop)] // index loops mirror the maths

mod common;

use common::{force_rows, rand_vec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rest_kernels::sparse::{hwn_plane_stride, HwnConv, SparseConv, SparseMatrix};
use rest_kernels::{chwn_to_cnhw, cnhw_to_chwn, Conv2dGeom};

/// Bernoulli(density) mask; with >= 3 rows, row 0 is empty and row 1 fully active.
fn mask(r: &mut ChaCha8Rng, rows: usize, cols: usize, density: f64) -> Vec<bool> {
    let mut m = common::mask(r, rows, cols, density);
    force_rows(&mut m, rows, cols);
    m
}

#[allow(clippy::too_many_arguments)]
fn geom(
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

/// `x[c][n][iy][ix]` at the input coordinate of output `(oy, ox)` and tap `(ky, kx)`, if inside.
fn tap_index(
    g: &Conv2dGeom,
    c: usize,
    n: usize,
    oy: usize,
    ox: usize,
    ky: usize,
    kx: usize,
) -> Option<usize> {
    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
        return None;
    }
    Some(((c * g.n + n) * g.h + iy as usize) * g.w + ix as usize)
}

/// Naive forward, input gradient and dense weight gradient (f64), with abs-sum scales.
#[allow(clippy::type_complexity)]
fn reference(
    g: &Conv2dGeom,
    wd: &[f32],
    x: &[f32],
    dy: &[f32],
) -> (
    (Vec<f64>, Vec<f64>),
    (Vec<f64>, Vec<f64>),
    (Vec<f64>, Vec<f64>),
) {
    let (oh, ow, k) = (g.oh(), g.ow(), g.k());
    let mut out = (vec![0.0; g.out_len()], vec![0.0; g.out_len()]);
    let mut dx = (vec![0.0; g.x_len()], vec![0.0; g.x_len()]);
    let mut dw = (vec![0.0; g.w_len()], vec![0.0; g.w_len()]);
    for o in 0..g.oc {
        for c in 0..g.c {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let kk = (c * g.kh + ky) * g.kw + kx;
                    let wv = wd[o * k + kk] as f64;
                    for n in 0..g.n {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let Some(xi) = tap_index(g, c, n, oy, ox, ky, kx) else {
                                    continue;
                                };
                                let oi = ((o * g.n + n) * oh + oy) * ow + ox;
                                let (xv, dv) = (x[xi] as f64, dy[oi] as f64);
                                out.0[oi] += wv * xv;
                                out.1[oi] += (wv * xv).abs();
                                dx.0[xi] += wv * dv;
                                dx.1[xi] += (wv * dv).abs();
                                dw.0[o * k + kk] += dv * xv;
                                dw.1[o * k + kk] += (dv * xv).abs();
                            }
                        }
                    }
                }
            }
        }
    }
    (out, dx, dw)
}

fn close(got: &[f32], want: &(Vec<f64>, Vec<f64>), what: &str) {
    assert_eq!(got.len(), want.0.len(), "{what}: length");
    for (i, (&gv, (&wv, &sc))) in got.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
        let tol = 2e-5 * sc + 1e-6;
        assert!(
            (gv as f64 - wv).abs() <= tol,
            "{what}[{i}]: got {gv}, want {wv} (tol {tol})"
        );
    }
}

fn check(g: Conv2dGeom, density: f64, seed: u64) {
    let tag = format!("{g:?} d={density}");
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let w = rand_vec(&mut r, g.w_len());
    let m = mask(&mut r, g.oc, g.k(), density);
    let x = rand_vec(&mut r, g.x_len());
    let dy = rand_vec(&mut r, g.out_len());
    let sm = SparseMatrix::from_dense_masked(&w, &m, g.oc, g.k()).unwrap();
    let wd = sm.to_dense();
    let (out_ref, dx_ref, dw_ref) = reference(&g, &wd, &x, &dy);
    let conv = SparseConv::new(&sm, &g).unwrap();

    // Stale buffers (NaN) must be fully overwritten.
    let mut xph = vec![f32::NAN; conv.phase_len()];
    conv.pack_input(&x, &mut xph).unwrap();
    let mut out = vec![f32::NAN; g.out_len()];
    conv.forward(&sm, &xph, &mut out).unwrap();
    close(&out, &out_ref, &format!("{tag} forward"));

    let mut dyv = vec![f32::NAN; conv.grad_len()];
    let mut dx = vec![f32::NAN; g.x_len()];
    conv.backward_input(&sm, &dy, &mut dyv, &mut dx).unwrap();
    close(&dx, &dx_ref, &format!("{tag} input grad"));

    // The weight gradient from a freshly expanded gradient, at the active positions only.
    let mut dyv2 = vec![f32::NAN; conv.grad_len()];
    conv.expand_grad(&dy, &mut dyv2).unwrap();
    assert_eq!(
        dyv, dyv2,
        "{tag}: backward_input leaves the expanded gradient"
    );
    let mut grad = vec![f32::NAN; sm.nnz()];
    conv.grad_weight(&sm, &dyv2, &xph, &mut grad).unwrap();
    let mut want = (Vec::new(), Vec::new());
    for o in 0..g.oc {
        for e in sm.row_ptr()[o]..sm.row_ptr()[o + 1] {
            let kk = sm.col_idx()[e] as usize;
            want.0.push(dw_ref.0[o * g.k() + kk]);
            want.1.push(dw_ref.1[o * g.k() + kk]);
        }
    }
    close(&grad, &want, &format!("{tag} weight grad"));
    check_hwn(&g, &sm, &x, &dy, (&out_ref, &dx_ref, &want), &tag);
}

/// A reference result and the sums of absolute terms (the tolerance's scale).
type Ref = (Vec<f64>, Vec<f64>);

/// The batch-innermost convolution ([`HwnConv`]) on the same case: CNHW operands converted to
/// CHWN (with stale NaN buffers, which must be fully overwritten, padding floats included in
/// the comparison only where they are real positions).
fn check_hwn(
    g: &Conv2dGeom,
    sm: &SparseMatrix,
    x: &[f32],
    dy: &[f32],
    want: (&Ref, &Ref, &Ref),
    tag: &str,
) {
    let conv = HwnConv::new(sm, g).unwrap();
    let (pi, po) = (g.h * g.w, g.oh() * g.ow());
    let (xs, ys) = (hwn_plane_stride(g.n * pi), hwn_plane_stride(g.n * po));
    assert_eq!(conv.x_len(), g.c * xs);
    assert_eq!(conv.out_len(), g.oc * ys);
    let mut xh = vec![f32::NAN; conv.x_len()];
    cnhw_to_chwn(x, g.c, g.n, pi, xs, &mut xh);
    let mut dyh = vec![f32::NAN; conv.out_len()];
    cnhw_to_chwn(dy, g.oc, g.n, po, ys, &mut dyh);

    let mut oh = vec![f32::NAN; conv.out_len()];
    conv.forward(sm, &xh, &mut oh, None).unwrap();
    let mut out = vec![f32::NAN; g.out_len()];
    chwn_to_cnhw(&oh, g.oc, g.n, po, ys, &mut out);
    close(&out, want.0, &format!("{tag} hwn forward"));

    let mut dxh = vec![f32::NAN; conv.x_len()];
    conv.backward_input(sm, &dyh, &mut dxh).unwrap();
    let mut dx = vec![f32::NAN; g.x_len()];
    chwn_to_cnhw(&dxh, g.c, g.n, pi, xs, &mut dx);
    close(&dx, want.1, &format!("{tag} hwn input grad"));

    let mut grad = vec![f32::NAN; sm.nnz()];
    conv.grad_weight(sm, &dyh, &xh, &mut grad).unwrap();
    close(&grad, want.2, &format!("{tag} hwn weight grad"));

    // The epilogue: the plain forward then a per-channel affine (+ ReLU), bit for bit.
    let scale: Vec<f32> = (0..g.oc).map(|o| 0.5 + o as f32 * 0.25).collect();
    let shift: Vec<f32> = (0..g.oc).map(|o| o as f32 * 0.125 - 0.5).collect();
    let mut oa = vec![f32::NAN; conv.out_len()];
    conv.forward(sm, &xh, &mut oa, Some((&scale, &shift, true)))
        .unwrap();
    for o in 0..g.oc {
        for i in 0..g.n * po {
            let want = (oh[o * ys + i] * scale[o] + shift[o]).max(0.0);
            let got = oa[o * ys + i];
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{tag} hwn epilogue [{o}][{i}]: got {got}, want {want}"
            );
        }
    }
}

#[test]
fn matches_naive_convolution_over_geometries_and_densities() {
    let geoms = [
        geom(3, 2, 28, 28, 8, 4, 2, 1),  // REST CNN conv1, small batch
        geom(8, 3, 14, 14, 16, 4, 2, 1), // conv2-like
        geom(6, 2, 7, 7, 9, 4, 2, 1),    // conv3-like: 3x3 output, most positions junk
        geom(5, 1, 7, 9, 6, 3, 1, 1),    // batch 1, odd non-square
        geom(4, 3, 11, 10, 7, 7, 2, 3),  // 7x7 stride 2 pad 3 (ResNet stem)
        geom(6, 2, 8, 8, 5, 1, 1, 0),    // 1x1
        geom(6, 2, 9, 9, 5, 1, 2, 0),    // 1x1 stride 2 (downsample): one phase of four
        geom(3, 2, 10, 13, 4, 3, 3, 2),  // stride 3
        geom(2, 2, 5, 5, 3, 4, 2, 0),    // no padding
        geom(3, 1, 6, 6, 4, 3, 1, 3),    // padding 3
        geom(2, 1, 4, 4, 3, 3, 1, 0),    // 2x2 output
        geom(2, 2, 10, 11, 3, 3, 3, 0),  // stride 3 skips the last row and columns
        geom(2, 1, 9, 9, 3, 2, 2, 0),    // 2x2 stride 2: the last row and column unread
        // Tiny output maps (the live-tap layout): ResNet's last stages at 32 px.
        geom(6, 3, 1, 1, 5, 3, 1, 1), // 3x3 on 1x1: only the centre tap is live
        geom(5, 2, 2, 2, 4, 3, 1, 1), // 3x3 on 2x2: every tap live for some output
        geom(4, 3, 2, 2, 6, 3, 2, 1), // 3x3 stride 2, 2x2 -> 1x1: four live taps
        geom(3, 2, 4, 4, 5, 3, 2, 1), // 3x3 stride 2, 4x4 -> 2x2
        geom(3, 1, 1, 1, 4, 3, 1, 1), // batch 1 on a 1x1 map
        geom(2, 2, 3, 3, 3, 7, 2, 3), // 7x7 stride 2 on 3x3 -> 2x2
        geom(3, 2, 1, 2, 4, 3, 1, 1), // 1x2 map
    ];
    for (gi, g) in geoms.iter().enumerate() {
        for (di, &d) in [0.001, 0.05, 0.5, 1.0].iter().enumerate() {
            check(*g, d, (gi * 10 + di) as u64);
        }
    }
}

/// The vector layout passes take other routes for rows wider than one or two vectors
/// (`pw > 16` or `w > 32`), for strides whose rows need several permutes, and for kernels
/// narrower than the stride (fewer phases than the stride).
#[test]
fn matches_naive_convolution_with_wide_rows_and_odd_strides() {
    let geoms = [
        geom(2, 3, 9, 40, 3, 4, 2, 1),  // w 40, phase rows of 21
        geom(2, 2, 6, 20, 3, 3, 1, 1),  // w 20 but phase rows of 22
        geom(2, 2, 7, 40, 3, 3, 3, 0),  // phase rows of 13 from rows of 40
        geom(2, 1, 5, 37, 3, 3, 1, 2),  // batch 1, stride 1, padding 2, w 37
        geom(2, 3, 8, 50, 3, 7, 3, 3),  // 7x7 stride 3 padding 3, w 50
        geom(3, 3, 13, 17, 4, 5, 3, 0), // 5x5 stride 3, odd 3x5 output
        geom(2, 1, 20, 20, 3, 1, 3, 0), // 1x1 stride 3: one phase of nine
        geom(2, 3, 11, 35, 3, 2, 3, 1), // 2x2 stride 3: kernel narrower than the stride
    ];
    for (gi, g) in geoms.iter().enumerate() {
        for (di, &d) in [0.05, 0.5, 1.0].iter().enumerate() {
            check(*g, d, (1000 + gi * 10 + di) as u64);
        }
    }
}

#[test]
fn rejects_a_mismatched_pattern_and_wrong_buffers() {
    let g = geom(2, 1, 6, 6, 3, 3, 1, 1);
    let w = vec![1.0f32; g.w_len()];
    let m = vec![true; g.w_len()];
    let sm = SparseMatrix::from_dense_masked(&w, &m, g.oc, g.k()).unwrap();
    let narrow = SparseMatrix::from_dense_masked(&w[..3 * 9], &m[..3 * 9], 3, 9).unwrap();
    let e = SparseConv::new(&narrow, &g).unwrap_err();
    assert!(e.message().contains("3x9"), "{}", e.message());
    let conv = SparseConv::new(&sm, &g).unwrap();
    let mut xph = vec![0.0; conv.phase_len() - 1];
    let e = conv
        .pack_input(&vec![0.0; g.x_len()], &mut xph)
        .unwrap_err();
    assert!(e.message().contains("xph"), "{}", e.message());
    let half: Vec<bool> = (0..g.w_len()).map(|i| i % 2 == 0).collect();
    let sparser = SparseMatrix::from_dense_masked(&w, &half, g.oc, g.k()).unwrap();
    let xph = vec![0.0; conv.phase_len()];
    let mut out = vec![0.0; g.out_len()];
    let e = conv.forward(&sparser, &xph, &mut out).unwrap_err();
    assert!(e.message().contains("rebuild"), "{}", e.message());
}

/// The forward pass with a folded-BatchNorm epilogue equals the plain forward followed by a
/// separate per-channel affine (+ ReLU) pass, bit for bit, on layouts with and without junk
/// positions (the emit path and the direct-row path) and with and without the ReLU.
#[test]
fn forward_affine_equals_forward_then_channel_affine() {
    let mut r = ChaCha8Rng::seed_from_u64(31);
    for g in [
        geom(5, 3, 9, 11, 7, 4, 2, 1),
        geom(4, 2, 8, 8, 6, 1, 2, 0),
        geom(3, 4, 7, 7, 5, 3, 1, 1),
    ] {
        let w = rand_vec(&mut r, g.w_len());
        let m = mask(&mut r, g.oc, g.k(), 0.3);
        let sm = SparseMatrix::from_dense_masked(&w, &m, g.oc, g.k()).expect("pattern");
        let conv = SparseConv::new(&sm, &g).expect("layout");
        let x = rand_vec(&mut r, g.x_len());
        let mut xph = vec![0.0; conv.phase_len()];
        conv.pack_input(&x, &mut xph).expect("pack");
        let (scale, shift) = (rand_vec(&mut r, g.oc), rand_vec(&mut r, g.oc));
        for relu in [false, true] {
            let mut want = vec![0.0; g.out_len()];
            conv.forward(&sm, &xph, &mut want).expect("forward");
            rest_kernels::batchnorm::channel_affine_inplace(&mut want, &scale, &shift, relu);
            let mut got = vec![f32::NAN; g.out_len()];
            conv.forward_affine(&sm, &xph, &mut got, Some((&scale, &shift, relu)))
                .expect("forward_affine");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{g:?} relu {relu}");
            if relu {
                assert!(got.contains(&0.0) && got.iter().any(|&v| v > 0.0));
            }
        }
    }
    let g = geom(2, 1, 6, 6, 3, 3, 1, 1);
    let sm =
        SparseMatrix::from_dense_masked(&vec![1.0; g.w_len()], &vec![true; g.w_len()], 3, g.k())
            .expect("pattern");
    let conv = SparseConv::new(&sm, &g).expect("layout");
    let xph = vec![0.0; conv.phase_len()];
    let mut out = vec![0.0; g.out_len()];
    let err = conv
        .forward_affine(&sm, &xph, &mut out, Some((&[1.0; 2], &[0.0; 3], false)))
        .expect_err("a scale of the wrong length");
    assert!(err.message().contains("scale"), "{}", err.message());
}

/// A 3x3 kernel on a tiny map gathers only its live taps: on a 1x1 map the centre tap alone
/// (one row per channel plus the zero row), on 2x2 -> 1x1 at stride 2 four taps; larger maps
/// keep the phase layout (about the padded input).
#[test]
fn tiny_maps_gather_only_the_live_taps() {
    let rows = |g: Conv2dGeom| {
        let w = vec![1.0f32; g.w_len()];
        let m = vec![true; g.w_len()];
        let sm = SparseMatrix::from_dense_masked(&w, &m, g.oc, g.k()).expect("pattern");
        let conv = SparseConv::new(&sm, &g).expect("layout");
        let l = g.n * g.oh() * g.ow();
        conv.phase_len() / l.next_multiple_of(16)
    };
    assert_eq!(rows(geom(6, 3, 1, 1, 5, 3, 1, 1)), 6 + 1);
    assert_eq!(rows(geom(6, 3, 2, 2, 5, 3, 2, 1)), 6 * 4 + 1);
    assert_eq!(rows(geom(6, 3, 2, 2, 5, 3, 1, 1)), 6 * 9 + 1);
    let g = geom(6, 3, 8, 8, 5, 3, 1, 1);
    let w = vec![1.0f32; g.w_len()];
    let sm = SparseMatrix::from_dense_masked(&w, &vec![true; g.w_len()], g.oc, g.k()).expect("p");
    let conv = SparseConv::new(&sm, &g).expect("layout");
    assert!(
        conv.phase_len() < 2 * g.c * g.n * 10 * 10,
        "{}",
        conv.phase_len()
    );
}

/// Batches of whole vectors, a masked tail and more than one 128-float register tile (the
/// batch-innermost convolution's rows are the batch): ResNet-like small maps, strides 1 and 2.
#[test]
fn matches_naive_convolution_on_wide_batches() {
    let geoms = [
        geom(5, 16, 4, 4, 6, 3, 1, 1),   // one full vector per pixel
        geom(4, 40, 4, 4, 5, 3, 2, 1),   // 3 vectors, masked tail; stride 2
        geom(3, 130, 2, 2, 4, 3, 1, 1),  // two register tiles, the second a 2-float tail
        geom(6, 33, 1, 1, 5, 3, 1, 1),   // 1x1 map
        geom(3, 20, 5, 6, 4, 7, 2, 3),   // 7x7 stride 2
        geom(4, 17, 3, 3, 3, 1, 2, 0),   // 1x1 stride 2
        geom(16, 64, 4, 4, 16, 3, 1, 1), // large enough for parallel pixel and row blocks
        geom(24, 48, 1, 1, 20, 3, 1, 1), // parallel on a 1x1 map: row blocks only
        // Rows of at most 4 vectors on wide maps: groups of 8 / 4 / 2 neighbouring pixels
        // share the weight broadcasts (the map edges and the remainders one pixel at a time).
        geom(4, 16, 5, 12, 5, 3, 1, 1), // 8 pixels of 1 vector
        geom(5, 32, 6, 11, 6, 3, 1, 1), // 4 pixels of 2 vectors
        geom(3, 20, 4, 10, 4, 3, 1, 1), // 4 pixels of 2 vectors, masked tail
        geom(4, 64, 5, 7, 5, 3, 2, 1),  // 2 pixels of 4 vectors, stride 2
        geom(3, 48, 3, 9, 4, 5, 1, 2),  // 2 pixels of 3 vectors, 5x5 kernel
    ];
    for (gi, g) in geoms.iter().enumerate() {
        for (di, &d) in [0.05, 0.4, 1.0].iter().enumerate() {
            check(*g, d, (2000 + gi * 10 + di) as u64);
        }
    }
}
