//! The batch-major sparse linear kernels' fused and packed forms (`spmm_rows_fused` with bias,
//! ReLU and input packing; `pack_rows`; `sddmm_packed`) against f64 references computed here
//! from the dense masked weight, on batches that end in partial 16-sample blocks; and their
//! bit-reproducibility across thread counts.

mod common;

use common::{mask, rand_vec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rest_kernels::sparse::{
    pack_rows, packed_len, sddmm_packed, sddmm_rows, spmm_rows, spmm_rows_fused, spmm_t_rows,
    SparseMatrix, LANES,
};

/// `relu?(Σ_k w[o,k] m[o,k] x[s,k] + b[o])` in f64, and the sum of absolute terms (the
/// rounding scale).
#[allow(clippy::too_many_arguments)]
fn ref_forward(
    w: &[f32],
    m: &[bool],
    b: &[f32],
    x: &[f32],
    n: usize,
    i: usize,
    o: usize,
    relu: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; n * o];
    let mut scale = vec![0.0; n * o];
    for s in 0..n {
        for r in 0..o {
            let mut t = b[r] as f64;
            let mut a = (b[r] as f64).abs();
            for k in 0..i {
                if m[r * i + k] {
                    let p = w[r * i + k] as f64 * x[s * i + k] as f64;
                    t += p;
                    a += p.abs();
                }
            }
            y[s * o + r] = if relu { t.max(0.0) } else { t };
            scale[s * o + r] = a;
        }
    }
    (y, scale)
}

#[test]
fn fused_forward_adds_bias_applies_relu_and_packs_the_active_inputs() {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    // Batches below, at and above one block, and several blocks with a partial tail.
    for &(o, i, n, d) in &[
        (7, 13, 1, 0.3),
        (37, 53, 15, 0.1),
        (37, 53, 16, 0.1),
        (37, 53, 17, 0.5),
        (20, 300, 40, 0.02),
        (5, 9, 33, 1.0),
    ] {
        let w = rand_vec(&mut r, o * i);
        let m = mask(&mut r, o, i, d);
        let b = rand_vec(&mut r, o);
        let x = rand_vec(&mut r, n * i);
        let sm = SparseMatrix::from_dense_masked(&w, &m, o, i).unwrap();
        let active: Vec<usize> = (0..i).filter(|&k| (0..o).any(|q| m[q * i + k])).collect();
        assert_eq!(packed_len(&sm, n), n.div_ceil(LANES) * active.len() * LANES);
        for relu in [false, true] {
            let tag = format!("{o}x{i} n={n} d={d} relu={relu}");
            let mut y = vec![f32::NAN; n * o];
            let mut pack = vec![f32::NAN; packed_len(&sm, n)];
            spmm_rows_fused(&sm, &x, n, Some(&b), relu, &mut y, &mut pack).unwrap();
            let (want, scale) = ref_forward(&w, &m, &b, &x, n, i, o, relu);
            for e in 0..n * o {
                let tol = 1e-5 * (1.0 + scale[e]);
                assert!(
                    (y[e] as f64 - want[e]).abs() <= tol,
                    "{tag}: y[{e}] = {} vs {}",
                    y[e],
                    want[e]
                );
                if relu {
                    assert!(y[e] >= 0.0, "{tag}: y[{e}] = {} after ReLU", y[e]);
                }
            }
            // The pack: block-major, active inputs in increasing order, zero past the batch.
            for blk in 0..n.div_ceil(LANES) {
                for (j, &k) in active.iter().enumerate() {
                    for l in 0..LANES {
                        let s = blk * LANES + l;
                        let got = pack[(blk * active.len() + j) * LANES + l];
                        let want = if s < n { x[s * i + k] } else { 0.0 };
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{tag}: pack b{blk} k{k} l{l}"
                        );
                    }
                }
            }
            let mut pack2 = vec![f32::NAN; pack.len()];
            pack_rows(&sm, &x, n, &mut pack2).unwrap();
            assert!(
                pack.iter()
                    .zip(&pack2)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{tag}: pack_rows differs from the forward's pack"
            );
            // Without bias or ReLU, the fused form is plain `spmm_rows`, bit for bit.
            if !relu {
                let mut y0 = vec![f32::NAN; n * o];
                spmm_rows(&sm, &x, n, &mut y0).unwrap();
                let mut y1 = vec![f32::NAN; n * o];
                spmm_rows_fused(&sm, &x, n, None, false, &mut y1, &mut []).unwrap();
                assert_eq!(y0, y1, "{tag}");
            }
        }
    }
}

#[test]
fn packed_weight_gradient_matches_reference_and_unpacked_form() {
    let mut r = ChaCha8Rng::seed_from_u64(5);
    for &(o, i, n, d) in &[(9, 11, 3, 0.4), (37, 53, 17, 0.1), (30, 400, 50, 0.03)] {
        let w = rand_vec(&mut r, o * i);
        let m = mask(&mut r, o, i, d);
        let x = rand_vec(&mut r, n * i);
        let mut dy = rand_vec(&mut r, n * o);
        dy.iter_mut().step_by(4).for_each(|v| *v = 0.0);
        let sm = SparseMatrix::from_dense_masked(&w, &m, o, i).unwrap();
        let mut pack = vec![0.0; packed_len(&sm, n)];
        pack_rows(&sm, &x, n, &mut pack).unwrap();
        let mut g = vec![f32::NAN; sm.nnz()];
        sddmm_packed(&sm, &dy, &pack, n, &mut g).unwrap();
        let mut g2 = vec![f32::NAN; sm.nnz()];
        sddmm_rows(&sm, &dy, &x, n, &mut g2).unwrap();
        assert!(g.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
        // CSR order: row by row, columns increasing.
        let mut e = 0;
        for q in 0..o {
            for k in 0..i {
                if !m[q * i + k] {
                    continue;
                }
                let (mut t, mut a) = (0.0f64, 0.0f64);
                for s in 0..n {
                    let p = dy[s * o + q] as f64 * x[s * i + k] as f64;
                    t += p;
                    a += p.abs();
                }
                assert!(
                    (g[e] as f64 - t).abs() <= 1e-5 * (1.0 + a),
                    "{o}x{i} n={n}: grad[{e}] = {} vs {t}",
                    g[e]
                );
                e += 1;
            }
        }
        assert_eq!(e, sm.nnz());
    }
}

#[test]
fn results_are_bit_identical_for_any_thread_count() {
    let mut r = ChaCha8Rng::seed_from_u64(8);
    // Layer 1 of LfF's MLP at density 0.05, batch 1000: work above the kernels' parallel
    // threshold (parallel tasks) and a partial block.
    let (o, i, n) = (100, 2352, 1000);
    let w = rand_vec(&mut r, o * i);
    let m = mask(&mut r, o, i, 0.05);
    let b = rand_vec(&mut r, o);
    let x = rand_vec(&mut r, n * i);
    let dy = rand_vec(&mut r, n * o);
    let sm = SparseMatrix::from_dense_masked(&w, &m, o, i).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![0.0; n * o];
            let mut pack = vec![0.0; packed_len(&sm, n)];
            spmm_rows_fused(&sm, &x, n, Some(&b), true, &mut y, &mut pack).unwrap();
            let mut g = vec![0.0; sm.nnz()];
            sddmm_packed(&sm, &dy, &pack, n, &mut g).unwrap();
            let mut dx = vec![0.0; n * i];
            spmm_t_rows(&sm, &dy, n, &mut dx).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            (bits(&y), bits(&g), bits(&dx))
        })
    };
    let one = run(1);
    assert!(one.0.iter().any(|&v| v != 0), "the forward is not all zero");
    for threads in [2, 3] {
        assert!(one == run(threads), "{threads} threads differ from 1");
    }
}

#[test]
fn wrong_pack_and_bias_lengths_are_errors_naming_the_operand() {
    let sm =
        SparseMatrix::from_dense_masked(&[1.0, 2.0, 3.0, 4.0], &[true, false, true, true], 2, 2)
            .unwrap();
    let (x, mut y) = (vec![1.0; 6], vec![0.0; 6]);
    let e = spmm_rows_fused(&sm, &x, 3, None, false, &mut y, &mut [0.0; 5]).unwrap_err();
    assert!(
        e.message().contains("pack") && e.message().contains("packed_len"),
        "{}",
        e.message()
    );
    let e = spmm_rows_fused(&sm, &x, 3, Some(&[1.0]), false, &mut y, &mut []).unwrap_err();
    assert!(e.message().contains("bias"), "{}", e.message());
    let mut g = vec![0.0; sm.nnz()];
    let e = sddmm_packed(&sm, &y, &[0.0; 3], 3, &mut g).unwrap_err();
    assert!(e.message().contains("pack"), "{}", e.message());
}
