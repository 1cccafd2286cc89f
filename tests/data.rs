//! Integration tests of the data layer: IDX reading, the built-in digits, the Colored MNIST
//! generator, the weighted sampler and the `.npy` export.

mod common;

use common::err_text;
use flate2::write::GzEncoder;
use flate2::Compression;
use rest::data::builtin::builtin_digits;
use rest::data::colored_mnist::{
    generate, severity_sigma, split_indices, ColoredMnistSpec, LFF_PALETTE,
};
use rest::data::export::export_npy;
use rest::data::idx::{parse_images, parse_labels, read_images, read_labels, IdxImages};
use rest::data::sampler::{group_weights, shuffled, WeightedSampler};
use rest::data::{GroupDataset, Split};
use rest::util;
use std::collections::HashSet;
use std::io::Write;
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// Helpers

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

/// A hand-made IDX image file: 2 images of 2 rows x 3 columns.
fn tiny_images() -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
    b.extend_from_slice(&[1, 2, 3, 4, 5, 6, 10, 20, 30, 40, 50, 255]);
    b
}

/// A hand-made IDX label file with 3 labels.
fn tiny_labels() -> Vec<u8> {
    vec![0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]
}

fn digits() -> &'static (IdxImages, Vec<u8>) {
    static D: OnceLock<(IdxImages, Vec<u8>)> = OnceLock::new();
    D.get_or_init(|| builtin_digits().expect("built-in digits decode"))
}

fn gen(spec: &ColoredMnistSpec) -> GroupDataset {
    let (im, lb) = digits();
    generate(im, lb, spec).expect("valid spec generates")
}

/// Round half up of `num / den` for non-negative integers.
fn round_div(num: u64, den: u64) -> u64 {
    (2 * num + den) / (2 * den)
}

// ---------------------------------------------------------------------------------------------
// IDX

#[test]
fn idx_parses_plain_and_gzipped_images() {
    let expect = IdxImages {
        n: 2,
        rows: 2,
        cols: 3,
        pixels: vec![1, 2, 3, 4, 5, 6, 10, 20, 30, 40, 50, 255],
    };
    assert_eq!(parse_images(&tiny_images(), "tiny").expect("plain"), expect);
    assert_eq!(
        parse_images(&gzip(&tiny_images()), "tiny.gz").expect("gz"),
        expect
    );
}

#[test]
fn idx_parses_plain_and_gzipped_labels() {
    assert_eq!(
        parse_labels(&tiny_labels(), "tiny").expect("plain"),
        vec![7, 0, 9]
    );
    assert_eq!(
        parse_labels(&gzip(&tiny_labels()), "tiny.gz").expect("gz"),
        vec![7, 0, 9]
    );
}

#[test]
fn idx_truncated_data_is_an_error_naming_the_source() {
    let mut img = tiny_images();
    img.pop();
    let e = err_text(parse_images(&img, "my-images"));
    assert!(e.contains("my-images") && e.contains("truncated"), "{e}");
    // Also when gzipped, and for labels.
    let e = err_text(parse_images(&gzip(&img), "my-images.gz"));
    assert!(e.contains("my-images.gz") && e.contains("truncated"), "{e}");
    let mut lab = tiny_labels();
    lab.pop();
    let e = err_text(parse_labels(&lab, "my-labels"));
    assert!(e.contains("my-labels") && e.contains("truncated"), "{e}");
    // A header cut short.
    let e = err_text(parse_images(&tiny_images()[..10], "short"));
    assert!(e.contains("short") && e.contains("header"), "{e}");
    for n in 0..4 {
        let e = err_text(parse_labels(&tiny_labels()[..n], "tiny"));
        assert!(e.contains("too short"), "{e}");
    }
}

#[test]
fn idx_wrong_magic_is_an_error() {
    // A label file where images are expected, and vice versa.
    let e = err_text(parse_images(&tiny_labels(), "labels-as-images"));
    assert!(
        e.contains("labels-as-images") && e.contains("0x00000801"),
        "{e}"
    );
    let e = err_text(parse_labels(&tiny_images(), "images-as-labels"));
    assert!(e.contains("images-as-labels") && e.contains("magic"), "{e}");
    let mut bad = tiny_images();
    bad[2] = 0x0d; // float data
    assert!(parse_images(&bad, "x").is_err());
    assert!(parse_images(b"hello world, no idx", "text").is_err());
}

#[test]
fn idx_trailing_bytes_and_corrupt_gzip_are_errors() {
    let mut img = tiny_images();
    img.push(0);
    let e = err_text(parse_images(&img, "long"));
    assert!(e.contains("mismatch") && e.contains("13"), "{e}");
    let mut gz = gzip(&tiny_images());
    gz.truncate(gz.len() / 2);
    let e = err_text(parse_images(&gz, "cut.gz"));
    assert!(e.contains("cut.gz") && e.contains("gzip"), "{e}");
    // Absurd dimensions do not overflow or allocate.
    let huge = [
        0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
    ];
    assert!(parse_images(&huge, "huge").is_err());
}

#[test]
fn idx_reads_files_and_names_missing_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ip = dir.path().join("img-idx3-ubyte.gz");
    let lp = dir.path().join("lab-idx1-ubyte");
    std::fs::write(&ip, gzip(&tiny_images())).expect("write");
    std::fs::write(&lp, tiny_labels()).expect("write");
    assert_eq!(read_images(&ip).expect("read").pixels[11], 255);
    assert_eq!(read_labels(&lp).expect("read"), vec![7, 0, 9]);
    let missing = dir.path().join("nope.gz");
    let e = err_text(read_images(&missing));
    assert!(e.contains("nope.gz"), "{e}");
    // A corrupt file on disk is reported with its path.
    std::fs::write(&lp, &tiny_labels()[..9]).expect("write");
    let e = err_text(read_labels(&lp));
    assert!(e.contains("lab-idx1-ubyte"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Built-in digits

#[test]
fn builtin_digits_have_documented_shape_and_counts() {
    let (im, lb) = digits();
    assert_eq!((im.n, im.rows, im.cols), (10_000, 28, 28));
    assert_eq!(im.pixels.len(), 10_000 * 784);
    assert_eq!(lb.len(), 10_000);
    let mut counts = [0usize; 10];
    for &l in lb {
        counts[l as usize] += 1;
    }
    assert_eq!(
        counts,
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    // Real digits: every image has ink and background, and uses the full range.
    for i in [0, 4321, 9999] {
        let img = im.image(i);
        assert!(img.contains(&0) && img.iter().any(|&p| p > 200));
    }
}

// ---------------------------------------------------------------------------------------------
// Colored MNIST

#[test]
fn severity_levels_match_lff() {
    let s: Vec<f64> = (1..=5)
        .map(|k| severity_sigma(k).expect("1-5 valid"))
        .collect();
    assert_eq!(s, vec![0.05, 0.02, 0.01, 0.005, 0.002]);
    assert!(severity_sigma(0).is_err() && severity_sigma(6).is_err());
}

#[test]
fn default_spec_and_names() {
    let d = ColoredMnistSpec::default();
    assert_eq!(
        (
            d.conflict_pct,
            d.sigma,
            d.seed,
            d.n_train,
            d.n_valid,
            d.n_test
        ),
        (5.0, 0.005, 0, 7000, 1000, 2000)
    );
    for (pct, name) in [
        (5.0, "cmnist-5pct"),
        (0.5, "cmnist-0.5pct"),
        (1.0, "cmnist-1pct"),
    ] {
        let spec = ColoredMnistSpec {
            conflict_pct: pct,
            n_train: 20,
            n_valid: 0,
            n_test: 0,
            ..d.clone()
        };
        assert_eq!(gen(&spec).name, name);
    }
}

#[test]
fn split_indices_are_disjoint_and_seeded() {
    let spec = ColoredMnistSpec::default();
    let [tr, va, te] = split_indices(10_000, &spec).expect("valid");
    assert_eq!((tr.len(), va.len(), te.len()), (7000, 1000, 2000));
    let all: HashSet<usize> = tr.iter().chain(&va).chain(&te).copied().collect();
    assert_eq!(all.len(), 10_000);
    assert!(all.iter().all(|&i| i < 10_000));
    // The digits are stored class by class; a permutation must mix them.
    assert!(tr[..100].iter().any(|&i| i >= 5000) && tr[..100].iter().any(|&i| i < 5000));
    let other = split_indices(
        10_000,
        &ColoredMnistSpec {
            seed: 1,
            ..spec.clone()
        },
    )
    .expect("ok");
    assert_ne!(other[0], tr);
    assert_eq!(split_indices(10_000, &spec).expect("ok")[0], tr);
}

#[test]
fn generated_splits_use_the_split_digits() {
    let spec = ColoredMnistSpec {
        sigma: 0.0,
        ..ColoredMnistSpec::default()
    };
    let ds = gen(&spec);
    let (im, lb) = digits();
    let idx = split_indices(im.n, &spec).expect("valid");
    for (split, idx) in [
        (&ds.train, &idx[0]),
        (&ds.valid, &idx[1]),
        (&ds.test, &idx[2]),
    ] {
        assert_eq!((split.height, split.width, split.channels), (28, 28, 3));
        assert_eq!(split.len(), idx.len());
        for (j, &d) in idx.iter().enumerate() {
            assert_eq!(split.labels[j], u32::from(lb[d]));
            // At sigma 0 every pixel is exactly the grey value times the palette colour.
            let col = LFF_PALETTE[split.bias[j] as usize];
            let out =
                &split.images.bytes().expect("images in one buffer")[j * 2352..(j + 1) * 2352];
            for (p, &g) in im.image(d).iter().enumerate() {
                for ch in 0..3 {
                    let want = round_div(u64::from(g) * u64::from(col[ch]), 255);
                    assert!(u64::from(out[3 * p + ch]).abs_diff(want) <= 1);
                }
            }
        }
    }
}

/// Per class of `split`: (number of samples, number conflicting, per-colour counts).
fn class_stats(split: &Split) -> Vec<(u64, u64, [u64; 10])> {
    let mut st = vec![(0u64, 0u64, [0u64; 10]); 10];
    for i in 0..split.len() {
        let (c, b) = (split.labels[i] as usize, split.bias[i] as usize);
        st[c].0 += 1;
        st[c].1 += u64::from(c != b);
        st[c].2[b] += 1;
    }
    st
}

#[test]
fn conflicting_counts_are_exact_and_colours_spread_evenly() {
    // pct as a fraction num/200 (0.5% = 1/200, 1% = 2/200, ...), for integer rounding.
    for (pct, num) in [(0.5, 1u64), (1.0, 2), (2.0, 4), (5.0, 10)] {
        let ds = gen(&ColoredMnistSpec {
            conflict_pct: pct,
            ..ColoredMnistSpec::default()
        });
        let mut total_conflicting = 0;
        for split in [&ds.train, &ds.valid] {
            for (c, (n_c, k_c, per_colour)) in class_stats(split).into_iter().enumerate() {
                assert!(n_c > 50, "every class is present");
                assert_eq!(k_c, round_div(num * n_c, 200), "pct {pct}, class {c}");
                assert_eq!(per_colour[c], n_c - k_c);
                let others: Vec<u64> = (0..10).filter(|&o| o != c).map(|o| per_colour[o]).collect();
                let (lo, hi) = (others.iter().min(), others.iter().max());
                assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{others:?}");
                assert_eq!(others.iter().sum::<u64>(), k_c);
            }
            total_conflicting += split.conflicting_count();
        }
        assert!(total_conflicting > 0);
    }
}

#[test]
fn test_split_is_balanced() {
    let ds = gen(&ColoredMnistSpec::default());
    let mut per_bias = [0u64; 10];
    for (n_c, _, per_colour) in class_stats(&ds.test) {
        let (lo, hi) = (per_colour.iter().min(), per_colour.iter().max());
        assert!(
            hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
            "{per_colour:?}"
        );
        assert_eq!(per_colour.iter().sum::<u64>(), n_c);
        for b in 0..10 {
            per_bias[b] += per_colour[b];
        }
    }
    assert!(per_bias
        .iter()
        .max()
        .zip(per_bias.iter().min())
        .is_some_and(|(h, l)| h - l <= 1));
    // About 90% of the test set conflicts (exactly 90% when every class is a multiple of 10).
    let share = ds.test.conflicting_count() as f64 / ds.test.len() as f64;
    assert!((share - 0.9).abs() < 0.01, "{share}");
}

#[test]
fn digit_colour_is_the_palette_colour_and_background_black() {
    let (im, _) = digits();
    // sigma 0: the brightest pixel of an aligned digit is palette x max intensity.
    let spec0 = ColoredMnistSpec {
        sigma: 0.0,
        ..ColoredMnistSpec::default()
    };
    let ds0 = gen(&spec0);
    let idx0 = split_indices(im.n, &spec0).expect("valid");
    let mut checked = 0;
    for (j, &d) in idx0[0]
        .iter()
        .enumerate()
        .filter(|&(j, _)| !ds0.train.is_conflicting(j))
    {
        let grey = im.image(d);
        let (p, &m) = grey
            .iter()
            .enumerate()
            .max_by_key(|&(_, g)| *g)
            .expect("non-empty");
        let col = LFF_PALETTE[ds0.train.labels[j] as usize];
        for (ch, &pal) in col.iter().enumerate() {
            let want = f64::from(m) * f64::from(pal) / 255.0;
            let got = f64::from(
                ds0.train.images.bytes().expect("images in one buffer")[j * 2352 + 3 * p + ch],
            );
            assert!((got - want).abs() <= 0.5 + 1e-9, "got {got}, want {want}");
        }
        checked += 1;
    }
    assert!(checked > 6000);

    // sigma 0.05 (severity 1): per image, the colour estimated from the brightest pixel is
    // within 7 sigma (plus rounding) of the palette colour; the background is black.
    let sigma = 0.05;
    let spec = ColoredMnistSpec {
        sigma,
        ..ColoredMnistSpec::default()
    };
    let ds = gen(&spec);
    let idx = split_indices(im.n, &spec).expect("valid");
    let mut max_dev = 0.0f64;
    for (split, idx) in [
        (&ds.train, &idx[0]),
        (&ds.valid, &idx[1]),
        (&ds.test, &idx[2]),
    ] {
        for (j, &d) in idx.iter().enumerate() {
            let grey = im.image(d);
            let out =
                &split.images.bytes().expect("images in one buffer")[j * 2352..(j + 1) * 2352];
            let (p, &m) = grey
                .iter()
                .enumerate()
                .max_by_key(|&(_, g)| *g)
                .expect("non-empty");
            let col = LFF_PALETTE[split.bias[j] as usize];
            for ch in 0..3 {
                let est = f64::from(out[3 * p + ch]) / f64::from(m);
                let dev = (est - f64::from(col[ch]) / 255.0).abs();
                assert!(
                    dev <= 7.0 * sigma + 0.5 / f64::from(m) + 1e-9,
                    "deviation {dev}"
                );
                max_dev = max_dev.max(dev);
            }
            for (q, &g) in grey.iter().enumerate() {
                if g == 0 {
                    assert_eq!(&out[3 * q..3 * q + 3], &[0, 0, 0]);
                }
            }
        }
    }
    // The noise is really there: some channel is off by more than one sigma.
    assert!(max_dev > sigma, "max deviation {max_dev}");
}

#[test]
fn generation_is_deterministic_and_seed_sensitive() {
    let spec = ColoredMnistSpec {
        n_train: 1500,
        n_valid: 300,
        n_test: 500,
        ..Default::default()
    };
    let a = gen(&spec);
    let b = gen(&spec);
    assert_eq!((&a.train, &a.valid, &a.test), (&b.train, &b.valid, &b.test));
    let c = gen(&ColoredMnistSpec {
        seed: 7,
        ..spec.clone()
    });
    assert_ne!(a.train.images, c.train.images);
    assert_ne!(a.train.labels, c.train.labels);
    assert_ne!(a.test.bias, c.test.bias);
}

#[test]
fn invalid_specs_are_errors() {
    let (im, lb) = digits();
    let base = ColoredMnistSpec::default();
    for pct in [0.0, 100.0, -1.0, 150.0, f64::NAN, f64::INFINITY] {
        let e = err_text(generate(
            im,
            lb,
            &ColoredMnistSpec {
                conflict_pct: pct,
                ..base.clone()
            },
        ));
        assert!(e.contains("--conflict-pct"), "{e}");
    }
    for sigma in [-0.01, f64::NAN, f64::INFINITY] {
        let e = err_text(generate(
            im,
            lb,
            &ColoredMnistSpec {
                sigma,
                ..base.clone()
            },
        ));
        assert!(e.contains("sigma"), "{e}");
    }
    let e = err_text(generate(
        im,
        lb,
        &ColoredMnistSpec {
            n_train: 8000,
            ..base.clone()
        },
    ));
    assert!(e.contains("10000"), "{e}");
    let e = err_text(generate(
        im,
        lb,
        &ColoredMnistSpec {
            n_test: usize::MAX,
            ..base.clone()
        },
    ));
    assert!(e.contains("10000"), "{e}");
    assert!(generate(im, &lb[..100], &base).is_err());
    assert!(split_indices(10_000, &base).is_ok());
    assert!(split_indices(9_999, &base).is_err());
    let bad_labels = IdxImages {
        n: 1,
        rows: 1,
        cols: 1,
        pixels: vec![9],
    };
    let spec1 = ColoredMnistSpec {
        n_train: 1,
        n_valid: 0,
        n_test: 0,
        ..base.clone()
    };
    assert!(generate(&bad_labels, &[10], &spec1).is_err());
    assert!(generate(&bad_labels, &[3], &spec1).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Sampler

/// A split with `n_conf` conflicting samples (label 0, bias 1) followed by `n_al` aligned ones.
fn toy_split(n_conf: usize, n_al: usize) -> Split {
    let n = n_conf + n_al;
    let labels = vec![0; n];
    let bias = (0..n).map(|i| u32::from(i < n_conf)).collect();
    Split::new(vec![0; n], labels, bias, 1, 1, 1).expect("consistent split")
}

#[test]
fn group_weights_upweight_conflicting_samples() {
    let s = toy_split(2, 3);
    assert_eq!(group_weights(&s, 50.0), vec![50.0, 50.0, 1.0, 1.0, 1.0]);
}

#[test]
fn weighted_draws_match_expected_conflicting_share() {
    const DRAWS: usize = 200_000;
    // (conflicting samples, aligned samples, lambda)
    for (c, a, lambda) in [
        (50, 950, 50.0),
        (10, 990, 10.0),
        (200, 800, 1.0),
        (5, 995, 1.0),
    ] {
        let split = toy_split(c, a);
        let sampler = WeightedSampler::new(&group_weights(&split, lambda)).expect("valid");
        let draws = sampler.draw(DRAWS, &mut util::rng(42, 7));
        assert_eq!(draws.len(), DRAWS);
        let hits = draws.iter().filter(|&&i| split.is_conflicting(i)).count() as f64;
        let (c, a) = (c as f64, a as f64);
        let q = lambda * c / (lambda * c + a);
        let n = DRAWS as f64;
        let sd = (n * q * (1.0 - q)).sqrt();
        assert!(
            (hits - n * q).abs() <= 6.0 * sd,
            "c={c} a={a} lambda={lambda}: {hits} conflicting draws, expected {} +- {}",
            n * q,
            6.0 * sd
        );
        if lambda == 1.0 {
            assert_eq!(q, c / (c + a));
        }
    }
}

#[test]
fn weighted_draws_cover_every_sample_in_proportion() {
    // Weights 1, 2, 3, 4: each index's count within 6 binomial sd of its expectation.
    let sampler = WeightedSampler::new(&[1.0, 2.0, 3.0, 4.0]).expect("valid");
    let n = 100_000usize;
    let mut counts = [0usize; 4];
    for i in sampler.draw(n, &mut util::rng(9, 1)) {
        counts[i] += 1;
    }
    for (i, &k) in counts.iter().enumerate() {
        let p = (i + 1) as f64 / 10.0;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (k as f64 - n as f64 * p).abs() <= 6.0 * sd,
            "index {i}: {k}"
        );
    }
}

#[test]
fn shuffled_epochs_are_permutations() {
    let mut rng = util::rng(0, 3);
    let a = shuffled(500, &mut rng);
    let b = shuffled(500, &mut rng);
    let mut s = a.clone();
    s.sort_unstable();
    assert_eq!(s, (0..500).collect::<Vec<_>>());
    assert_ne!(a, b, "successive epochs differ");
    assert!(shuffled(0, &mut rng).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Export

#[test]
fn export_round_trips_through_npyz() {
    let spec = ColoredMnistSpec {
        n_train: 120,
        n_valid: 40,
        n_test: 60,
        ..Default::default()
    };
    let ds = gen(&spec);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("nested/export");
    let paths = export_npy(&ds, &out).expect("export");
    assert_eq!(paths.len(), 10);
    assert_eq!(paths[9], out.join("meta.json"));
    for (s, split) in [
        ("train", &ds.train),
        ("valid", &ds.valid),
        ("test", &ds.test),
    ] {
        let n = split.len() as u64;
        let bytes = std::fs::read(out.join(format!("{s}_images.npy"))).expect("read");
        let npy = npyz::NpyFile::new(&bytes[..]).expect("npy");
        assert_eq!(npy.shape(), &[n, 28, 28, 3]);
        assert_eq!(
            npy.dtype(),
            npyz::DType::Plain("|u1".parse().expect("dtype"))
        );
        assert_eq!(
            npy.into_vec::<u8>().expect("u8 data"),
            split.images.bytes().expect("images in one buffer")
        );
        for (kind, want) in [("labels", &split.labels), ("bias", &split.bias)] {
            let bytes = std::fs::read(out.join(format!("{s}_{kind}.npy"))).expect("read");
            let npy = npyz::NpyFile::new(&bytes[..]).expect("npy");
            assert_eq!(npy.shape(), &[n]);
            assert_eq!(
                npy.dtype(),
                npyz::DType::Plain("<i8".parse().expect("dtype"))
            );
            let got = npy.into_vec::<i64>().expect("i64 data");
            assert_eq!(got, want.iter().map(|&v| i64::from(v)).collect::<Vec<_>>());
        }
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&paths[9]).expect("read")).expect("json");
    assert_eq!(meta["name"], "cmnist-5pct");
    assert_eq!(meta["num_classes"], 10);
    assert_eq!(meta["splits"]["valid"]["count"], 40);
    assert_eq!(
        meta["splits"]["train"]["conflicting"],
        ds.train.conflicting_count() as u64
    );
    assert_eq!(
        meta["splits"]["test"]["conflicting"],
        ds.test.conflicting_count() as u64
    );
    // Exporting again over the same directory works (files are replaced).
    assert_eq!(export_npy(&ds, &out).expect("re-export"), paths);
}

#[test]
fn export_into_impossible_directory_is_an_error_naming_it() {
    let ds = gen(&ColoredMnistSpec {
        n_train: 10,
        n_valid: 0,
        n_test: 0,
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let target = file.join("sub");
    let e = err_text(export_npy(&ds, &target));
    assert!(e.contains(&target.display().to_string()), "{e}");
}
