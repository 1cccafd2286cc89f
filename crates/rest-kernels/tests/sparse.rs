//! Sparse kernels against naive dense references with the mask applied.
#![allow(clippy::needless_range_loop)] // index loops mirror the maths

mod common;

use common::{force_rows, rand_vec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rest_kernels::sparse::{
    sddmm, sddmm_into, sddmm_rows, spmm, spmm_rows, spmm_t, spmm_t_rows, SparseMatrix,
};
use rest_kernels::transpose;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Bernoulli(density) mask with row 0 empty and row 1 fully dense (when there are >= 3 rows),
/// and the last column active only in row 1 (when there are >= 3 columns).
fn mask(r: &mut ChaCha8Rng, rows: usize, cols: usize, density: f64) -> Vec<bool> {
    let mut m = common::mask(r, rows, cols, density);
    if cols >= 3 {
        for row in 0..rows {
            m[row * cols + cols - 1] = false;
        }
    }
    force_rows(&mut m, rows, cols);
    m
}

/// Asserts `got` matches a sum of terms whose exact value is `want` and absolute sum `scale`.
fn close(got: f32, want: f64, scale: f64, what: &str) {
    let tol = 1e-5 * scale + 1e-6;
    assert!(
        (got as f64 - want).abs() <= tol,
        "{what}: got {got}, want {want} (tol {tol})"
    );
}

/// Naive `out[r][c] = Σ_k (w ⊙ m)[r][k] x[k][c]` in f64, plus the absolute-sum scale.
fn ref_mm(
    w: &[f32],
    m: &[bool],
    x: &[f32],
    rows: usize,
    k: usize,
    p: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; rows * p];
    let mut scale = vec![0.0; rows * p];
    for r in 0..rows {
        for kk in 0..k {
            if !m[r * k + kk] {
                continue;
            }
            let wv = w[r * k + kk] as f64;
            for c in 0..p {
                out[r * p + c] += wv * x[kk * p + c] as f64;
                scale[r * p + c] += (wv * x[kk * p + c] as f64).abs();
            }
        }
    }
    (out, scale)
}

/// Shapes `(rows, k, p)`: odd sizes, P = 1, tails of every vector width, long rows.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 5, 1),
    (7, 13, 17),
    (16, 33, 129),
    (37, 53, 300),
    (64, 48, 515),
    (5, 200, 40),
    (100, 97, 256),
    (24, 500, 1031),
];

const DENSITIES: &[f64] = &[0.001, 0.01, 0.05, 0.2, 0.5];

#[test]
fn spmm_matches_masked_dense_product() {
    let mut r = rng(1);
    for &(rows, k, p) in SHAPES {
        for &d in DENSITIES {
            let w = rand_vec(&mut r, rows * k);
            let m = mask(&mut r, rows, k, d);
            let x = rand_vec(&mut r, k * p);
            let sm = SparseMatrix::from_dense_masked(&w, &m, rows, k).unwrap();
            let mut out = vec![f32::NAN; rows * p];
            spmm(&sm, &x, p, &mut out).unwrap();
            let (want, scale) = ref_mm(&w, &m, &x, rows, k, p);
            for i in 0..rows * p {
                close(
                    out[i],
                    want[i],
                    scale[i],
                    &format!("spmm {rows}x{k}x{p} d={d} i={i}"),
                );
            }
        }
    }
}

#[test]
fn spmm_t_matches_transposed_masked_product() {
    let mut r = rng(2);
    for &(rows, k, p) in SHAPES {
        for &d in DENSITIES {
            let w = rand_vec(&mut r, rows * k);
            let m = mask(&mut r, rows, k, d);
            let dy = rand_vec(&mut r, rows * p);
            let sm = SparseMatrix::from_dense_masked(&w, &m, rows, k).unwrap();
            let mut dx = vec![f32::NAN; k * p];
            spmm_t(&sm, &dy, p, &mut dx).unwrap();
            // Reference: dx = (W ⊙ M)ᵀ dy, built by transposing w and the mask by hand.
            let mut wt = vec![0.0; k * rows];
            let mut mt = vec![false; k * rows];
            for i in 0..rows {
                for j in 0..k {
                    wt[j * rows + i] = w[i * k + j];
                    mt[j * rows + i] = m[i * k + j];
                }
            }
            let (want, scale) = ref_mm(&wt, &mt, &dy, k, rows, p);
            for i in 0..k * p {
                close(
                    dx[i],
                    want[i],
                    scale[i],
                    &format!("spmm_t {rows}x{k}x{p} d={d} i={i}"),
                );
            }
        }
    }
}

#[test]
fn sddmm_gives_dense_gradient_at_active_positions() {
    let mut r = rng(3);
    for &(rows, k, p) in SHAPES {
        for &d in DENSITIES {
            let w = rand_vec(&mut r, rows * k);
            let m = mask(&mut r, rows, k, d);
            let dy = rand_vec(&mut r, rows * p);
            let x = rand_vec(&mut r, k * p);
            let sm = SparseMatrix::from_dense_masked(&w, &m, rows, k).unwrap();
            let g = sddmm(&sm, &dy, &x, p).unwrap();
            assert_eq!(g.len(), sm.nnz());
            let mut dense = vec![f32::NAN; rows * k];
            sm.scatter_to_dense(&g, &mut dense).unwrap();
            for i in 0..rows {
                for j in 0..k {
                    let (mut want, mut scale) = (0.0f64, 0.0f64);
                    for c in 0..p {
                        let t = dy[i * p + c] as f64 * x[j * p + c] as f64;
                        want += t;
                        scale += t.abs();
                    }
                    let got = dense[i * k + j];
                    if m[i * k + j] {
                        close(
                            got,
                            want,
                            scale,
                            &format!("sddmm {rows}x{k}x{p} d={d} ({i},{j})"),
                        );
                    } else {
                        assert_eq!(got, 0.0, "inactive gradient must be 0 at ({i},{j})");
                    }
                }
            }
        }
    }
}

#[test]
fn sddmm_into_overwrites_buffer_and_checks_length() {
    let mut r = rng(4);
    let (rows, k, p) = (9, 11, 70);
    let w = rand_vec(&mut r, rows * k);
    let m = mask(&mut r, rows, k, 0.3);
    let sm = SparseMatrix::from_dense_masked(&w, &m, rows, k).unwrap();
    let dy = rand_vec(&mut r, rows * p);
    let x = rand_vec(&mut r, k * p);
    let fresh = sddmm(&sm, &dy, &x, p).unwrap();
    let mut buf = vec![123.0; sm.nnz()];
    sddmm_into(&sm, &dy, &x, p, &mut buf).unwrap();
    assert_eq!(buf, fresh);
    let mut short = vec![0.0; sm.nnz() + 1];
    let err = sddmm_into(&sm, &dy, &x, p, &mut short).unwrap_err();
    assert!(err.message().contains("nnz"), "{err}");
}

#[test]
fn csr_structure_of_hand_written_matrix() {
    // W = [[1, 0, 2],
    //      [0, 0, 0],
    //      [3, 4, 0]]  with the (1,1) position active although its weight is 0.
    let w = [1.0, 9.0, 2.0, 5.0, 0.0, 7.0, 3.0, 4.0, 8.0];
    let m = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0f32];
    let sm = SparseMatrix::from_dense_masked(&w, &m, 3, 3).unwrap();
    assert_eq!(sm.row_ptr(), &[0, 2, 3, 5]);
    assert_eq!(sm.col_idx(), &[0, 2, 1, 0, 1]);
    assert_eq!(sm.values(), &[1.0, 2.0, 0.0, 3.0, 4.0]);
    assert_eq!(sm.nnz(), 5);
    assert!((sm.density() - 5.0 / 9.0).abs() < 1e-12);
    assert_eq!(
        sm.to_dense(),
        vec![1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0]
    );
    // Wᵀ x with x = e_0 (P = 1) is column 0 of W: the first row of the transpose.
    let mut dx = vec![0.0; 3];
    spmm_t(&sm, &[1.0, 0.0, 0.0], 1, &mut dx).unwrap();
    assert_eq!(dx, vec![1.0, 0.0, 2.0]);
    spmm_t(&sm, &[0.0, 0.0, 1.0], 1, &mut dx).unwrap();
    assert_eq!(dx, vec![3.0, 4.0, 0.0]);
}

#[test]
fn value_updates_keep_pattern_and_reach_transpose() {
    let mut r = rng(5);
    // The large pattern (about 60,000 active weights) takes the parallel refresh.
    for (rows, k, density) in [(300, 400, 0.5), (21, 34, 0.2)] {
        let w0 = rand_vec(&mut r, rows * k);
        let m = mask(&mut r, rows, k, density);
        let mut sm = SparseMatrix::from_dense_masked(&w0, &m, rows, k).unwrap();
        let (row_ptr, col_idx) = (sm.row_ptr().to_vec(), sm.col_idx().to_vec());
        let w1 = rand_vec(&mut r, rows * k);
        sm.update_values_from_dense(&w1).unwrap();
        assert_eq!(sm.row_ptr(), row_ptr.as_slice());
        assert_eq!(sm.col_idx(), col_idx.as_slice());
        assert_eq!(
            sm,
            SparseMatrix::from_dense_masked(&w1, &m, rows, k).unwrap(),
            "{rows}x{k}"
        );
    }
    let (rows, k, p) = (21, 34, 45);
    let w0 = rand_vec(&mut r, rows * k);
    let m = mask(&mut r, rows, k, 0.2);
    let mut sm = SparseMatrix::from_dense_masked(&w0, &m, rows, k).unwrap();
    let w1 = rand_vec(&mut r, rows * k);
    sm.update_values_from_dense(&w1).unwrap();

    // set_values: doubling every value doubles Wᵀ dy.
    let dy = rand_vec(&mut r, rows * p);
    let mut dx1 = vec![0.0; k * p];
    spmm_t(&sm, &dy, p, &mut dx1).unwrap();
    let doubled: Vec<f32> = sm.values().iter().map(|v| 2.0 * v).collect();
    sm.set_values(&doubled).unwrap();
    let mut dx2 = vec![0.0; k * p];
    spmm_t(&sm, &dy, p, &mut dx2).unwrap();
    for (a, b) in dx1.iter().zip(&dx2) {
        assert_eq!(2.0 * a, *b);
    }
    assert!(sm.set_values(&doubled[1..]).is_err());
    assert!(sm.update_values_from_dense(&w1[1..]).is_err());
}

#[test]
fn shape_errors_name_the_operand() {
    let sm = SparseMatrix::from_dense_masked(&[1.0; 6], &[true; 6], 2, 3).unwrap();
    let mut out = vec![0.0; 8];
    let err = spmm(&sm, &[0.0; 11], 4, &mut out).unwrap_err();
    assert!(err.message().contains("x has 11 elements"), "{err}");
    let err = spmm(&sm, &[0.0; 12], 4, &mut out[..7]).unwrap_err();
    assert!(err.message().contains("out has 7"), "{err}");
    let err = spmm_t(&sm, &[0.0; 8], 4, &mut [0.0; 11]).unwrap_err();
    assert!(err.message().contains("dx has 11"), "{err}");
    let err = sddmm(&sm, &[0.0; 7], &[0.0; 12], 4).unwrap_err();
    assert!(err.message().contains("dy has 7"), "{err}");
    let err = SparseMatrix::from_dense_masked(&[1.0; 6], &[true; 5], 2, 3).unwrap_err();
    assert!(err.message().contains("mask has 5"), "{err}");
    let err = sm.scatter_to_dense(&[0.0; 6], &mut [0.0; 5]).unwrap_err();
    assert!(err.message().contains("dense has 5"), "{err}");
}

#[test]
fn empty_pattern_and_empty_shapes() {
    let sm = SparseMatrix::from_dense_masked(&[1.0; 12], &[false; 12], 3, 4).unwrap();
    assert_eq!(sm.nnz(), 0);
    let mut out = vec![f32::NAN; 3 * 5];
    spmm(&sm, &[1.0; 20], 5, &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
    let mut dx = vec![f32::NAN; 4 * 5];
    spmm_t(&sm, &[1.0; 15], 5, &mut dx).unwrap();
    assert!(dx.iter().all(|&v| v == 0.0));
    assert!(sddmm(&sm, &[1.0; 15], &[1.0; 20], 5).unwrap().is_empty());
    // P = 0 and a 0-column matrix are valid, empty products.
    let full = SparseMatrix::from_dense_masked(&[1.0; 12], &[true; 12], 3, 4).unwrap();
    spmm(&full, &[], 0, &mut []).unwrap();
    assert_eq!(sddmm(&full, &[], &[], 0).unwrap(), vec![0.0; 12]);
    let no_cols = SparseMatrix::from_dense_masked::<bool>(&[], &[], 3, 0).unwrap();
    let mut out = vec![f32::NAN; 6];
    spmm(&no_cols, &[], 2, &mut out).unwrap();
    assert_eq!(out, vec![0.0; 6]);
}

#[test]
fn transpose_swaps_indices() {
    let mut r = rng(6);
    for &(rows, cols) in &[(1, 1), (3, 70), (65, 33), (256, 100)] {
        let a = rand_vec(&mut r, rows * cols);
        let mut t = vec![f32::NAN; rows * cols];
        transpose(&a, rows, cols, &mut t);
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(t[j * rows + i], a[i * cols + j]);
            }
        }
    }
}

#[test]
#[should_panic(expected = "transpose")]
fn transpose_refuses_a_short_output() {
    transpose(&[0.0; 6], 2, 3, &mut [0.0; 5]);
}

/// Naive direct convolution, CNHW input `[C][N][H][W]`, weight `[OC][C][KH][KW]`.
#[allow(clippy::too_many_arguments)]
fn conv_direct(
    x: &[f32],
    w: &[f32],
    (c, n, h, wd): (usize, usize, usize, usize),
    (oc, kh, kw): (usize, usize, usize),
    stride: usize,
    pad: usize,
) -> (Vec<f32>, usize, usize) {
    let oh = (h + 2 * pad - kh) / stride + 1;
    let ow = (wd + 2 * pad - kw) / stride + 1;
    let mut y = vec![0.0f32; oc * n * oh * ow];
    for o in 0..oc {
        for b in 0..n {
            for i in 0..oh {
                for j in 0..ow {
                    let mut s = 0.0f64;
                    for ci in 0..c {
                        for a in 0..kh {
                            for bb in 0..kw {
                                let (yy, xx) = (i * stride + a, j * stride + bb);
                                if yy < pad || xx < pad || yy - pad >= h || xx - pad >= wd {
                                    continue;
                                }
                                s += w[((o * c + ci) * kh + a) * kw + bb] as f64
                                    * x[((ci * n + b) * h + yy - pad) * wd + xx - pad] as f64;
                            }
                        }
                    }
                    y[((o * n + b) * oh + i) * ow + j] = s as f32;
                }
            }
        }
    }
    (y, oh, ow)
}

#[test]
fn sparse_conv_via_im2col_matches_direct_convolution() {
    let mut r = rng(7);
    let (c, n, h, wd, oc, kh, kw, stride, pad) = (3, 2, 9, 8, 5, 4, 4, 2, 1);
    let x = rand_vec(&mut r, c * n * h * wd);
    let w = rand_vec(&mut r, oc * c * kh * kw);
    let k = c * kh * kw;
    let m = mask(&mut r, oc, k, 0.3);
    let wm: Vec<f32> = w
        .iter()
        .zip(&m)
        .map(|(&v, &a)| if a { v } else { 0.0 })
        .collect();
    let (y_ref, oh, ow) = conv_direct(&x, &wm, (c, n, h, wd), (oc, kh, kw), stride, pad);
    // im2col written independently here: col[(ci,a,b)][(n,i,j)].
    let p = n * oh * ow;
    let mut col = vec![0.0f32; k * p];
    for ci in 0..c {
        for a in 0..kh {
            for bb in 0..kw {
                let row = (ci * kh + a) * kw + bb;
                for b in 0..n {
                    for i in 0..oh {
                        for j in 0..ow {
                            let (yy, xx) = (i * stride + a, j * stride + bb);
                            if yy >= pad && xx >= pad && yy - pad < h && xx - pad < wd {
                                col[row * p + (b * oh + i) * ow + j] =
                                    x[((ci * n + b) * h + yy - pad) * wd + xx - pad];
                            }
                        }
                    }
                }
            }
        }
    }
    let sm = SparseMatrix::from_dense_masked(&w, &m, oc, k).unwrap();
    let mut y = vec![0.0; oc * p];
    spmm(&sm, &col, p, &mut y).unwrap();
    for (i, (&a, &b)) in y.iter().zip(&y_ref).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "conv out {i}: {a} vs {b}"
        );
    }
}

#[test]
fn feature_major_linear_layer_forward_and_backward() {
    // y[N,O] = x[N,I] Wᵀ computed as yT = W xT; dx = dy W; dW = dyᵀ x at active positions.
    let mut r = rng(8);
    let (nb, i_dim, o_dim) = (19, 23, 11);
    let x = rand_vec(&mut r, nb * i_dim);
    let w = rand_vec(&mut r, o_dim * i_dim);
    let m = mask(&mut r, o_dim, i_dim, 0.4);
    let dy = rand_vec(&mut r, nb * o_dim);
    let sm = SparseMatrix::from_dense_masked(&w, &m, o_dim, i_dim).unwrap();
    let mut xt = vec![0.0; i_dim * nb];
    transpose(&x, nb, i_dim, &mut xt);
    let mut dyt = vec![0.0; o_dim * nb];
    transpose(&dy, nb, o_dim, &mut dyt);
    let mut yt = vec![0.0; o_dim * nb];
    spmm(&sm, &xt, nb, &mut yt).unwrap();
    let mut dxt = vec![0.0; i_dim * nb];
    spmm_t(&sm, &dyt, nb, &mut dxt).unwrap();
    let g = sddmm(&sm, &dyt, &xt, nb).unwrap();
    let mut gd = vec![0.0; o_dim * i_dim];
    sm.scatter_to_dense(&g, &mut gd).unwrap();
    let wm = |o: usize, i: usize| {
        if m[o * i_dim + i] {
            w[o * i_dim + i]
        } else {
            0.0
        }
    };
    for b in 0..nb {
        for o in 0..o_dim {
            let want: f32 = (0..i_dim).map(|i| x[b * i_dim + i] * wm(o, i)).sum();
            assert!((yt[o * nb + b] - want).abs() < 1e-4, "y[{b},{o}]");
        }
        for i in 0..i_dim {
            let want: f32 = (0..o_dim).map(|o| dy[b * o_dim + o] * wm(o, i)).sum();
            assert!((dxt[i * nb + b] - want).abs() < 1e-4, "dx[{b},{i}]");
        }
    }
    for o in 0..o_dim {
        for i in 0..i_dim {
            let want: f32 = if m[o * i_dim + i] {
                (0..nb).map(|b| dy[b * o_dim + o] * x[b * i_dim + i]).sum()
            } else {
                0.0
            };
            assert!((gd[o * i_dim + i] - want).abs() < 1e-4, "dW[{o},{i}]");
        }
    }
}

/// The batch-major kernels (`x[N][I]`, no transposes) against f64 references: forward,
/// input gradient (with zero output gradients, as behind a ReLU) and the weight gradient at
/// the active positions, for batch 1, odd sizes, empty and full rows; buffers start as NaN.
#[test]
fn batch_major_linear_kernels_match_references() {
    let mut r = rng(11);
    // (O, I, N): SHAPES reinterpreted, plus a batch large enough for parallel sample blocks.
    let mut shapes: Vec<(usize, usize, usize)> = SHAPES.to_vec();
    shapes.push((100, 2352, 256));
    for &(o, i, n) in &shapes {
        for &d in DENSITIES {
            if n == 256 && d != 0.01 {
                continue; // the large shape only checks the parallel sample blocks
            }
            let w = rand_vec(&mut r, o * i);
            let m = mask(&mut r, o, i, d);
            let x = rand_vec(&mut r, n * i);
            let mut dy = rand_vec(&mut r, n * o);
            for v in dy.iter_mut().step_by(3) {
                *v = 0.0;
            }
            let sm = SparseMatrix::from_dense_masked(&w, &m, o, i).unwrap();
            let tag = format!("{o}x{i} n={n} d={d}");

            let mut y = vec![f32::NAN; n * o];
            spmm_rows(&sm, &x, n, &mut y).unwrap();
            let mut dx = vec![f32::NAN; n * i];
            spmm_t_rows(&sm, &dy, n, &mut dx).unwrap();
            let mut g = vec![f32::NAN; sm.nnz()];
            sddmm_rows(&sm, &dy, &x, n, &mut g).unwrap();

            let mut e = 0;
            let mut gwant = vec![(0.0f64, 0.0f64); sm.nnz()];
            for row in 0..o {
                for k in 0..i {
                    if !m[row * i + k] {
                        continue;
                    }
                    for s in 0..n {
                        let t = dy[s * o + row] as f64 * x[s * i + k] as f64;
                        gwant[e].0 += t;
                        gwant[e].1 += t.abs();
                    }
                    e += 1;
                }
            }
            assert_eq!(e, sm.nnz());
            for (j, (&gv, &(want, scale))) in g.iter().zip(&gwant).enumerate() {
                close(gv, want, scale, &format!("sddmm_rows {tag} entry {j}"));
            }
            for s in 0..n {
                for row in 0..o {
                    let (mut want, mut scale) = (0.0f64, 0.0f64);
                    for k in 0..i {
                        if m[row * i + k] {
                            let t = w[row * i + k] as f64 * x[s * i + k] as f64;
                            want += t;
                            scale += t.abs();
                        }
                    }
                    close(
                        y[s * o + row],
                        want,
                        scale,
                        &format!("spmm_rows {tag} {s},{row}"),
                    );
                }
                for k in 0..i {
                    let (mut want, mut scale) = (0.0f64, 0.0f64);
                    for row in 0..o {
                        if m[row * i + k] {
                            let t = w[row * i + k] as f64 * dy[s * o + row] as f64;
                            want += t;
                            scale += t.abs();
                        }
                    }
                    close(
                        dx[s * i + k],
                        want,
                        scale,
                        &format!("spmm_t_rows {tag} {s},{k}"),
                    );
                }
            }
        }
    }
    // Wrong buffer sizes are errors naming the operand.
    let sm = SparseMatrix::from_dense_masked(&[1.0; 6], &[true; 6], 2, 3).unwrap();
    let e = spmm_rows(&sm, &[0.0; 5], 2, &mut [0.0; 4]).unwrap_err();
    assert!(e.message().contains("x has 5"), "{}", e.message());
    let e = sddmm_rows(&sm, &[0.0; 4], &[0.0; 6], 2, &mut [0.0; 5]).unwrap_err();
    assert!(e.message().contains("nnz = 6"), "{}", e.message());
}
