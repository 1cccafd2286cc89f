//! Corrupted CIFAR-10: the CIFAR-10 binary reader on hand-made files (good, truncated, wrong
//! size, bad label, missing), the 20 corruptions (change, range, determinism, severity
//! ordering, statistics against their definitions) and the generator (exact LfF counts,
//! layout loadable as `cifar10c`, pixels = corruption of the source, determinism).

mod common;

use common::{err_text, files_under, ok, preview_sheet, read_json, rest_cmd};
use rand::{Rng as _, SeedableRng};
use rest::data::cifar::{self, encode_batch, read_batch, read_cifar10, PIXELS, RECORD};
use rest::data::corrupt::{Corruption, TYPE0, TYPE1};
use rest::data::dfa::{load, parse_name, DfaOptions};
use rest::data::make::{make_attr_labels, RATIOS};
use rest::data::make_cifar::{corrupt_image, make_corrupted_cifar10, CifarSpec};
use rest::data::DatasetKind;
use rest::util;
use std::collections::BTreeMap;
use std::path::Path;

/// `n` random 32x32 RGB images and labels (labels cycle through 0-9 with a random start).
fn random_images(n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let images: Vec<u8> = (0..n * 3 * PIXELS).map(|_| rng.random()).collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
    (images, labels)
}

/// Writes a CIFAR-10 binary folder: 5 training batches of `per_batch` and a test batch of
/// `n_test` random images. Returns (train images, train labels, test images, test labels).
fn write_fixture(dir: &Path, per_batch: usize, n_test: usize) -> [Vec<u8>; 4] {
    std::fs::create_dir_all(dir).expect("mkdir");
    let (mut tr_i, mut tr_l) = (Vec::new(), Vec::new());
    for (b, f) in cifar::TRAIN_FILES.iter().enumerate() {
        let (i, l) = random_images(per_batch, b as u64);
        std::fs::write(dir.join(f), encode_batch(&i, &l).expect("encode")).expect("write");
        tr_i.extend(i);
        tr_l.extend(l);
    }
    let (te_i, te_l) = random_images(n_test, 99);
    std::fs::write(
        dir.join(cifar::TEST_FILE),
        encode_batch(&te_i, &te_l).expect("encode"),
    )
    .expect("write");
    [tr_i, tr_l, te_i, te_l]
}

#[test]
fn reader_decodes_planes_and_concatenates_batches_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Hand-made record bytes, independent of encode_batch: label 3, R plane = p % 256,
    // G plane = 7, B plane = 255 - p % 256.
    let mut rec = vec![3u8];
    rec.extend((0..PIXELS).map(|p| (p % 256) as u8));
    rec.extend(std::iter::repeat_n(7u8, PIXELS));
    rec.extend((0..PIXELS).map(|p| 255 - (p % 256) as u8));
    assert_eq!(rec.len(), RECORD);
    // The release archive extracts to cifar-10-batches-bin/: --source may be its parent.
    let dir = tmp.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (b, f) in cifar::TRAIN_FILES.iter().enumerate() {
        let mut bytes = rec.clone();
        bytes[0] = b as u8; // first record's label = batch number
        bytes.extend_from_slice(&rec);
        std::fs::write(dir.join(f), bytes).expect("write");
    }
    std::fs::write(dir.join(cifar::TEST_FILE), &rec).expect("write");
    let (train, test) = read_cifar10(tmp.path()).expect("read");
    assert_eq!(train.labels, vec![0, 3, 1, 3, 2, 3, 3, 3, 4, 3]);
    assert_eq!(test.labels, vec![3]);
    let img = test.image(0);
    for p in [0usize, 1, 300, 1023] {
        assert_eq!(
            &img[p * 3..p * 3 + 3],
            &[(p % 256) as u8, 7, 255 - (p % 256) as u8]
        );
    }
    assert_eq!(train.image(9), img);
}

#[test]
fn reader_rejects_truncated_and_wrong_size_files_naming_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = tmp.path().join("data_batch_3.bin");
    // Two records minus the last 5 bytes (a truncated download).
    std::fs::write(&f, vec![1u8; 2 * RECORD - 5]).expect("write");
    let e = err_text(read_batch(&f));
    assert!(e.contains("data_batch_3.bin"), "{e}");
    assert!(e.contains("not a multiple of the 3073-byte"), "{e}");
    assert!(
        e.contains("1 whole records and 3068 bytes left over"),
        "{e}"
    );
    // One byte too many.
    std::fs::write(&f, vec![1u8; RECORD + 1]).expect("write");
    assert!(err_text(read_batch(&f)).contains(&format!("{} bytes", RECORD + 1)));
    // Empty.
    std::fs::write(&f, b"").expect("write");
    assert!(err_text(read_batch(&f)).contains("is empty"));
}

#[test]
fn reader_rejects_labels_above_nine() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = tmp.path().join("test_batch.bin");
    let mut bytes = vec![0u8; 3 * RECORD];
    bytes[2 * RECORD] = 10;
    std::fs::write(&f, bytes).expect("write");
    let e = err_text(read_batch(&f));
    assert!(
        e.contains("test_batch.bin") && e.contains("record 2 has label 10"),
        "{e}"
    );
}

#[test]
fn reader_names_missing_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_fixture(tmp.path(), 1, 1);
    std::fs::remove_file(tmp.path().join("data_batch_4.bin")).expect("rm");
    std::fs::remove_file(tmp.path().join("test_batch.bin")).expect("rm");
    let e = err_text(read_cifar10(tmp.path()));
    assert!(
        e.contains("missing data_batch_4.bin, test_batch.bin"),
        "{e}"
    );
    let e = err_text(read_cifar10(&tmp.path().join("nope")));
    assert!(e.contains("nope") && e.contains("not a folder"), "{e}");
}

/// A fixed `w x h` test image: smooth colour gradients, a bright square and dark stripes, all
/// values in [20, 235] so that no corruption starts from saturated values.
fn test_image(w: usize, h: usize) -> Vec<u8> {
    let mut img = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let sq = (w / 4..w / 2).contains(&x) && (h / 4..h / 2).contains(&y);
            let stripe = (x + y) % 8 < 2;
            let r = 40 + 150 * x / w;
            let g = 60 + 120 * y / h;
            let b = 180 - 100 * x / w;
            let v = |c: usize| -> u8 {
                if sq {
                    220
                } else if stripe {
                    (c / 3) as u8 + 20
                } else {
                    c as u8
                }
            };
            img.extend([v(r), v(g), v(b)]);
        }
    }
    img
}

fn apply(c: Corruption, img: &[u8], w: usize, h: usize, sev: u8, seed: u64) -> Vec<u8> {
    c.apply(img, w, h, sev, &mut util::rng(seed, 7))
        .expect("apply")
}

fn mean_abs_change(a: &[u8], b: &[u8]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn every_corruption_changes_the_image_within_range_and_is_deterministic() {
    let img = test_image(32, 32);
    for c in Corruption::ALL {
        for sev in 1..=5 {
            let a = apply(c, &img, 32, 32, sev, 1);
            let b = apply(c, &img, 32, 32, sev, 1);
            assert_eq!(a, b, "{} severity {sev} is not deterministic", c.name());
            assert_eq!(a.len(), img.len());
            let d = mean_abs_change(&a, &img);
            if c == Corruption::Original {
                assert_eq!(a, img);
                continue;
            }
            assert!(
                d > 0.0,
                "{} severity {sev} leaves the image unchanged",
                c.name()
            );
            // Still an image, not a flat field: the corrupted image varies, and nothing
            // changes it by more than half the range on average.
            assert!(d < 128.0, "{} severity {sev}: mean change {d}", c.name());
            let (lo, hi) = (a.iter().min().unwrap(), a.iter().max().unwrap());
            assert!(hi > lo, "{} severity {sev} is flat", c.name());
        }
    }
}

#[test]
fn random_corruptions_depend_on_the_seed_and_deterministic_ones_do_not() {
    let img = test_image(32, 32);
    let fixed = [
        Corruption::Brightness,
        Corruption::Contrast,
        Corruption::Saturate,
        Corruption::Jpeg,
        Corruption::Pixelate,
        Corruption::GaussianBlur,
        Corruption::DefocusBlur,
        Corruption::ZoomBlur,
        Corruption::Original,
    ];
    for c in Corruption::ALL {
        let a = apply(c, &img, 32, 32, 4, 1);
        let b = apply(c, &img, 32, 32, 4, 2);
        assert_eq!(a == b, fixed.contains(&c), "{}", c.name());
    }
}

#[test]
fn severity_increases_the_change_of_noise_blur_and_photometric_corruptions() {
    // 64x64 so that the noise estimates are tight.
    let img = test_image(64, 64);
    for c in [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::SpeckleNoise,
        Corruption::GaussianBlur,
        Corruption::DefocusBlur,
        Corruption::ZoomBlur,
        Corruption::Contrast,
        Corruption::Brightness,
        Corruption::Pixelate,
    ] {
        let d: Vec<f64> = (1..=5)
            .map(|s| mean_abs_change(&apply(c, &img, 64, 64, s, 3), &img))
            .collect();
        for s in 1..5 {
            assert!(d[s] > d[s - 1], "{}: change by severity {d:?}", c.name());
        }
    }
}

fn stats(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = v.clone().count() as f64;
    let mean = v.clone().sum::<f64>() / n;
    let var = v.map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn noise_statistics_match_their_definitions() {
    // Mid-grey 64x64: no clipping at these severities.
    let grey = vec![128u8; 64 * 64 * 3];
    let diff = |c, sev| -> Vec<f64> {
        apply(c, &grey, 64, 64, sev, 5)
            .iter()
            .map(|&v| f64::from(v) - 128.0)
            .collect()
    };
    // Gaussian, severity 4: std 0.09 * 255 = 22.95.
    let (m, s) = stats(diff(Corruption::GaussianNoise, 4).into_iter());
    assert!(m.abs() < 1.5 && (s - 22.95).abs() < 1.0, "{m} {s}");
    // Speckle, severity 5: std 0.2 * x = 0.2 * 128.
    let (m, s) = stats(diff(Corruption::SpeckleNoise, 5).into_iter());
    assert!(m.abs() < 1.5 && (s - 25.6).abs() < 1.0, "{m} {s}");
    // Shot, severity 5 (c = 50): Poisson(x c) / c has std sqrt(x / c) = sqrt(0.502 / 50).
    let (m, s) = stats(diff(Corruption::ShotNoise, 5).into_iter());
    let want = (128.0f64 / 255.0 / 50.0).sqrt() * 255.0;
    assert!(m.abs() < 1.5 && (s - want).abs() < 1.0, "{m} {s} vs {want}");
    // Impulse, severity 5: 7 % of values become 0 or 255, half each.
    let d = diff(Corruption::ImpulseNoise, 5);
    let salt = d.iter().filter(|&&v| v == 127.0).count() as f64 / d.len() as f64;
    let pepper = d.iter().filter(|&&v| v == -128.0).count() as f64 / d.len() as f64;
    let other = d
        .iter()
        .filter(|&&v| v != 0.0 && v != 127.0 && v != -128.0)
        .count();
    assert_eq!(other, 0);
    assert!(
        (salt - 0.035).abs() < 0.008 && (pepper - 0.035).abs() < 0.008,
        "{salt} {pepper}"
    );
}

#[test]
fn photometric_corruptions_match_hand_computed_values() {
    // Two pixels: grey 100 and (200, 100, 50).
    let img = vec![100u8, 100, 100, 200, 100, 50];
    // Brightness severity 4: HSV value + 0.2 -> grey 100 + 51 = 151; the coloured pixel
    // keeps hue and saturation: max 200 -> 251, s = 150 / 200 -> min 251 * 0.25 = 62.75,
    // middle 251 * (1 - (1 - f) s) with f = (100 - 50) / 150: 125.5.
    let b = apply(Corruption::Brightness, &img, 2, 1, 4, 0);
    let want = [151.0, 151.0, 151.0, 251.0, 125.5, 62.75];
    for (g, w) in b.iter().zip(want) {
        assert!((f64::from(*g) - w).abs() <= 0.51, "{b:?}");
    }
    // Contrast severity 5 (0.15), per-channel means (150, 100, 75).
    let c = apply(Corruption::Contrast, &img, 2, 1, 5, 0);
    let want = [142.5, 100.0, 78.75, 157.5, 100.0, 71.25];
    for (g, w) in c.iter().zip(want) {
        assert!((f64::from(*g) - w).abs() <= 0.51, "{c:?}");
    }
    // Saturate severity 2 (s * 0.1): the coloured pixel keeps value 200, s 0.75 -> 0.075.
    let s = apply(Corruption::Saturate, &img, 2, 1, 2, 0);
    assert_eq!(&s[..3], &[100, 100, 100]);
    assert!(s[3] == 200 && (185..=186).contains(&s[5]), "{s:?}");
}

/// The source index of a generated file `<index>_<label>_<bias>.png`.
fn index_of(p: &Path) -> usize {
    let stem = p.file_stem().and_then(|s| s.to_str()).expect("stem");
    stem.split('_')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("index")
}

fn decode(p: &Path) -> Vec<u8> {
    image::open(p).expect("png").to_rgb8().into_raw()
}

/// Generates Type `kind` from a 200 + 99 image fixture.
fn generate(src: &Path, out: &Path, kind: u8, seed: u64) -> rest::data::make::MakeReport {
    make_corrupted_cifar10(&CifarSpec {
        source: src.to_path_buf(),
        out: out.to_path_buf(),
        kind,
        severity: 4,
        seed,
    })
    .expect("generate")
}

#[test]
fn generator_writes_exact_lff_counts_and_corrupted_pixels() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    let [tr_i, tr_l, te_i, te_l] = write_fixture(&src, 40, 99);
    let out = tmp.path().join("cifar10c");
    let report = generate(&src, &out, 0, 11);
    let tr_l32: Vec<u32> = tr_l.iter().map(|&l| u32::from(l)).collect();
    assert_eq!(report.ratios.len(), RATIOS.len());
    let mut valid_seen = BTreeMap::new();
    for (r, &pct) in report.ratios.iter().zip(&RATIOS) {
        let attr = make_attr_labels(&tr_l32, 10, 1.0 - pct / 100.0);
        let want_conflict = tr_l32.iter().zip(&attr).filter(|(l, a)| l != a).count();
        let pdir = out.join(format!("{pct}pct"));
        let align = files_under(&pdir.join("align"));
        let conflict = files_under(&pdir.join("conflict"));
        assert_eq!((r.align, r.conflict), (200 - want_conflict, want_conflict));
        assert_eq!((align.len(), conflict.len()), (r.align, r.conflict));
        // Every training file: index i, its label, the attribute make_attr_labels gave it,
        // the right folder, and the pixels of corruption TYPE0[attr] applied to image i.
        for f in align.iter().chain(&conflict) {
            let (l, a) = parse_name(f).expect("name");
            let i = index_of(f);
            assert_eq!((l, a), (tr_l32[i], attr[i]), "{}", f.display());
            let part = if l == a { "align" } else { "conflict" };
            assert!(f.starts_with(pdir.join(part).join(l.to_string())));
        }
        // Pixels: the corruption TYPE0[attr] of source image i (first aligned and, when the
        // ratio has any, first conflicting file).
        for f in align.iter().take(1).chain(conflict.iter().take(1)) {
            let i = index_of(f);
            let want = corrupt_image(
                &tr_i[i * 3072..(i + 1) * 3072],
                i,
                TYPE0[attr[i] as usize],
                4,
                11,
            )
            .expect("corrupt");
            assert_eq!(decode(f), want, "{}", f.display());
        }
        // Validation: 33 held-out test images, biased like training at this ratio.
        let valid = files_under(&pdir.join("valid"));
        assert_eq!(valid.len(), 33);
        assert_eq!(r.valid, 33);
        let vconf = valid
            .iter()
            .filter(|f| {
                let (l, a) = parse_name(f).expect("name");
                l != a
            })
            .count();
        assert_eq!(r.valid_conflict, vconf);
        for f in &valid {
            let i = index_of(f);
            assert!((200..299).contains(&i));
            assert_eq!(u32::from(te_l[i - 200]), parse_name(f).expect("name").0);
            valid_seen.insert(i, ());
        }
    }
    // The same 33 validation images at every ratio; the other 66 are the test split.
    assert_eq!(valid_seen.len(), 33);
    let test = files_under(&out.join("test"));
    assert_eq!((test.len(), report.test), (66, 66));
    for f in &test {
        let i = index_of(f);
        assert!((200..299).contains(&i) && !valid_seen.contains_key(&i));
        assert_eq!(u32::from(te_l[i - 200]), parse_name(f).expect("name").0);
    }
    let f = &test[0];
    let (i, a) = (index_of(f), parse_name(f).expect("name").1);
    let j = i - 200;
    let want = corrupt_image(&te_i[j * 3072..(j + 1) * 3072], i, TYPE0[a as usize], 4, 11)
        .expect("corrupt");
    assert_eq!(decode(f), want);
    // Test attributes: make_attr_labels at 1/10 over the test split's labels in file order
    // of the plan; per class every corruption count is the milestone difference, so each
    // class's attributes are spread as evenly as rounding allows.
    let mut per_class: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for f in &test {
        let (l, a) = parse_name(f).expect("name");
        per_class.entry(l).or_default().push(a);
    }
    for (l, attrs) in per_class {
        let n = attrs.len();
        let mut counts = [0usize; 10];
        attrs.iter().for_each(|&a| counts[a as usize] += 1);
        let want = make_attr_labels(&vec![l; n], 10, 0.1);
        let mut wc = [0usize; 10];
        want.iter().for_each(|&a| wc[a as usize] += 1);
        assert_eq!(counts, wc, "class {l}");
    }
    // dataset.json is last and records the configuration.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("dataset.json")).expect("json"))
            .expect("parse");
    assert_eq!(meta["corruptions"][1], "frost");
    assert_eq!(meta["severity"], 4);
}

#[test]
fn generated_type1_loads_as_cifar10c_and_is_deterministic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    let [tr_i, tr_l, _, _] = write_fixture(&src, 40, 99);
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    generate(&src, &a, 1, 3);
    generate(&src, &b, 1, 3);
    generate(&src, &c, 1, 4);
    let fa = files_under(&a);
    let fb = files_under(&b);
    assert_eq!(fa.len(), fb.len());
    let mut differ = 0;
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.strip_prefix(&a).unwrap(), y.strip_prefix(&b).unwrap());
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "{}",
            x.display()
        );
    }
    for (x, y) in fa.iter().zip(files_under(&c)) {
        if x.extension().is_some_and(|e| e == "png")
            && std::fs::read(x).unwrap() != std::fs::read(&y).unwrap()
        {
            differ += 1;
        }
    }
    assert!(differ > 100, "another seed changed only {differ} files");
    for pct in RATIOS {
        let l = load(&DfaOptions {
            root: a.clone(),
            kind: DatasetKind::Cifar10c,
            conflict_pct: pct,
            skip_bad: false,
            cache_dir: Some(tmp.path().join(format!("cache{pct}"))),
        })
        .expect("load");
        let ds = &l.dataset;
        assert_eq!(
            (ds.train.len(), ds.valid.len(), ds.test.len()),
            (200, 33, 66)
        );
        assert_eq!(
            (ds.train.height, ds.train.width, ds.train.channels),
            (32, 32, 3)
        );
        assert_eq!(ds.num_classes, 10);
    }
    // Type1's class 9 is "original": its aligned images are the source pixels.
    let dir = a.join("5pct/align/9");
    let files = files_under(&dir);
    assert!(!files.is_empty());
    for f in files {
        let i = index_of(&f);
        assert_eq!(tr_l[i], 9);
        assert_eq!(decode(&f), &tr_i[i * 3072..(i + 1) * 3072]);
    }
    assert_eq!(TYPE1[9], Corruption::Original);
}

#[test]
fn generator_errors_name_the_problem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    write_fixture(&src, 2, 3);
    let spec = |out: &str, kind, severity| CifarSpec {
        source: src.clone(),
        out: tmp.path().join(out),
        kind,
        severity,
        seed: 0,
    };
    assert!(err_text(make_corrupted_cifar10(&spec("o1", 2, 4))).contains("--type"));
    assert!(err_text(make_corrupted_cifar10(&spec("o2", 0, 6))).contains("--severity"));
    std::fs::create_dir_all(tmp.path().join("full")).expect("mkdir");
    std::fs::write(tmp.path().join("full/x"), b"x").expect("write");
    assert!(err_text(make_corrupted_cifar10(&spec("full", 0, 4))).contains("is not empty"));
    std::fs::write(src.join("data_batch_2.bin"), vec![0u8; 100]).expect("write");
    let e = err_text(make_corrupted_cifar10(&spec("o3", 0, 4)));
    assert!(
        e.contains("data_batch_2.bin") && e.contains("not a multiple"),
        "{e}"
    );
}

#[test]
fn corruptions_handle_flat_extreme_and_tiny_images() {
    // Black, white and tiny images: no panic, right size, and the flat-image cases that have
    // a known answer (contrast keeps a flat image; brightness of black is grey 0.2 * 255).
    for (w, h) in [(32, 32), (1, 1), (2, 3), (5, 4)] {
        for v in [0u8, 255] {
            let img = vec![v; w * h * 3];
            for c in Corruption::ALL {
                for sev in 1..=5 {
                    let out = apply(c, &img, w, h, sev, 9);
                    assert_eq!(out.len(), img.len(), "{} {w}x{h}", c.name());
                }
            }
            assert_eq!(apply(Corruption::Contrast, &img, w, h, 5, 0), img);
        }
        let black = vec![0u8; w * h * 3];
        assert!(apply(Corruption::Brightness, &black, w, h, 4, 0)
            .iter()
            .all(|&v| v == 51));
    }
    let e = Corruption::Snow
        .apply(&[0u8; 10], 2, 2, 4, &mut util::rng(0, 0))
        .expect_err("wrong size");
    assert!(format!("{e}").contains("needs 12 bytes, got 10"));
}

#[test]
fn cli_make_preview_and_train_on_corrupted_cifar10() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    write_fixture(&src, 40, 60);
    let data = tmp.path().join("cifar10c");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let o = rest_cmd(&[
        "data",
        "make",
        "corrupted-cifar10",
        "--source",
        &s(&src),
        "--out",
        &s(&data),
        "--type",
        "1",
        "--seed",
        "5",
    ]);
    let stdout = ok(&o);
    assert!(
        stdout.contains("0.5pct") && stdout.contains("test: 40"),
        "{stdout}"
    );

    // The sheet: 10 rows of 3 aligned + 3 conflicting 32-px cells (scale 1, 2-px frames and
    // gaps); the first cell of row c shows the first aligned file of class c.
    let cell = 32 + 4;
    let img = preview_sheet(&data, &tmp.path().join("sheet.png"), cell);
    for c in [0u32, 4, 9] {
        let first = files_under(&data.join("5pct/align").join(c.to_string()))[0].clone();
        let px = decode(&first);
        let (x0, y0) = (2 + 2, 2 + c * (cell + 2) + 2);
        for (dx, dy) in [(0u32, 0u32), (17, 5), (31, 31)] {
            let p = img.get_pixel(x0 + dx, y0 + dy).0;
            let q = ((dy * 32 + dx) * 3) as usize;
            assert_eq!(
                p,
                [px[q], px[q + 1], px[q + 2]],
                "class {c} at ({dx}, {dy})"
            );
        }
    }

    let run = tmp.path().join("run");
    let o = rest_cmd(&[
        "train",
        "--data",
        &s(&data),
        "--model",
        "resnet18",
        "--width",
        "8",
        "--stem",
        "cifar",
        "--epochs",
        "1",
        "--batch-size",
        "100",
        "--threads",
        "1",
        "--out",
        &s(&run),
    ]);
    ok(&o);
    assert!(read_json(&run.join("summary.json")).is_object());
    let cfg = std::fs::read_to_string(run.join("config.toml")).expect("config");
    assert!(
        cfg.contains("resnet18") && cfg.contains("cifar10c"),
        "{cfg}"
    );
}
