//! The data pipeline: transforms against hand-computed pixels (crop offsets, flip, zero
//! padding, normalisation), their determinism per (seed, epoch, position), the prefetcher
//! (bit-identical to the inline path, errors, buffer reuse), resizing on load with its cache,
//! the mixed-size error, and end to end: ResNet-18 on a BFFHQ-layout fixture at 128 pixels
//! (train, eval, predict, export) and on a Corrupted CIFAR-10 fixture (prefetch on and off
//! give the same run).

mod common;

use anyhow::Result;
use common::{ok, read_json, rest_bin, rest_cmd, s, sigint_after};
use rand::RngCore;
use rest::data::dfa::{load, load_sized, DfaOptions};
use rest::data::loader::{BatchSource, EpochBatches, Prefetcher, PREFETCH_DEPTH};
use rest::data::transform::{
    Aug, AugKey, BatchLayout, Normalize, Transform, CIFAR_MEAN, CIFAR_STD,
};
use rest::data::DatasetKind;
use rest::data::Split;
use rest::train::TrainConfig;
use std::path::Path;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Transforms

/// A 3x4 RGB image whose channel-0 byte at (y, x) is 10 y + x and channel c adds 100 c.
fn small_image() -> Vec<u8> {
    let mut v = Vec::new();
    for y in 0..3u8 {
        for x in 0..4u8 {
            for c in 0..3u8 {
                v.push(10 * y + x + 100 * c);
            }
        }
    }
    v
}

/// `[0, 1]` value of a byte, as the pipeline computes it.
fn unit(b: u8) -> f32 {
    b as f32 * (1.0 / 255.0)
}

/// Expected CHW output from channel-0 bytes (`None` = a padding pixel).
fn expected(ch0: [[Option<u8>; 4]; 3]) -> Vec<f32> {
    let mut out = Vec::new();
    for c in 0..3u8 {
        for row in ch0 {
            for p in row {
                out.push(p.map_or(0.0, |b| unit(b + 100 * c)));
            }
        }
    }
    out
}

fn apply(t: &Transform, aug: Aug) -> Result<Vec<f32>> {
    let mut out = vec![f32::NAN; 36];
    t.apply(&small_image(), (3, 4, 3), aug, &mut out)?;
    Ok(out)
}

#[test]
fn crop_offsets_flip_and_zero_padding_match_hand_computed_pixels() -> Result<()> {
    let t = Transform {
        crop_padding: 1,
        flip: true,
        normalize: None,
        resized_crop: false,
    };
    let n = None;
    // Offsets (dy, dx) = (0, 2) into the 1-padded image: output (y, x) = input (y - 1, x + 1).
    let a = apply(
        &t,
        Aug {
            dy: 0,
            dx: 2,
            flip: false,
            crop_words: None,
        },
    )?;
    assert_eq!(
        a,
        expected([
            [n, n, n, n],
            [Some(1), Some(2), Some(3), n],
            [Some(11), Some(12), Some(13), n],
        ])
    );
    // Centred crop (1, 1), flipped: the mirror image.
    let b = apply(
        &t,
        Aug {
            dy: 1,
            dx: 1,
            flip: true,
            crop_words: None,
        },
    )?;
    assert_eq!(
        b,
        expected([
            [Some(3), Some(2), Some(1), Some(0)],
            [Some(13), Some(12), Some(11), Some(10)],
            [Some(23), Some(22), Some(21), Some(20)],
        ])
    );
    // Crop (2, 0), then flip: output (y, x) = input (y + 1, (3 - x) - 1).
    let c = apply(
        &t,
        Aug {
            dy: 2,
            dx: 0,
            flip: true,
            crop_words: None,
        },
    )?;
    assert_eq!(
        c,
        expected([
            [Some(12), Some(11), Some(10), n],
            [Some(22), Some(21), Some(20), n],
            [n, n, n, n],
        ])
    );
    Ok(())
}

#[test]
fn normalisation_applies_mean_and_std_to_pixels_and_padding() -> Result<()> {
    let t = Transform {
        crop_padding: 1,
        flip: false,
        normalize: Some(Normalize {
            mean: CIFAR_MEAN,
            std: CIFAR_STD,
        }),
        resized_crop: false,
    };
    let out = apply(
        &t,
        Aug {
            dy: 0,
            dx: 1,
            flip: false,
            crop_words: None,
        },
    )?;
    // Row 0 is padding: (0 - mean) / std; (1, 1) takes input (0, 1).
    for c in 0..3 {
        let pad = -(CIFAR_MEAN[c] as f64) / CIFAR_STD[c] as f64;
        assert!(
            (out[c * 12] as f64 - pad).abs() < 1e-5,
            "{c}: {}",
            out[c * 12]
        );
        let v = ((1 + 100 * c) as f64 / 255.0 - CIFAR_MEAN[c] as f64) / CIFAR_STD[c] as f64;
        assert!((out[c * 12 + 5] as f64 - v).abs() < 1e-5, "{c}");
    }
    // Channel 0 of pixel (1, 1) by hand: (1/255 - 0.4914) / 0.2023 = -2.40968
    assert!((out[5] as f64 + 2.409_68).abs() < 1e-4, "{}", out[5]);
    // Normalisation needs as many means as the images have channels.
    let mut one = vec![0.0; 12];
    let e = t
        .apply(&[7u8; 12], (3, 4, 1), Aug::default(), &mut one)
        .expect_err("1 channel, 3 means");
    assert!(e.to_string().contains("--no-normalize"), "{e}");
    Ok(())
}

fn cifar_train() -> Transform {
    Transform {
        crop_padding: 4,
        flip: true,
        normalize: Some(Normalize {
            mean: CIFAR_MEAN,
            std: CIFAR_STD,
        }),
        resized_crop: false,
    }
}

#[test]
fn draws_are_deterministic_in_range_and_differ_between_epochs_and_seeds() {
    let t = cifar_train();
    let mut flips = 0;
    let mut seen = [[false; 9]; 2];
    for pos in 0..2000 {
        let a = t.draw(7, 3, pos);
        assert_eq!(a, t.draw(7, 3, pos), "position {pos}");
        assert!(a.dy <= 8 && a.dx <= 8);
        seen[0][a.dy] = true;
        seen[1][a.dx] = true;
        flips += a.flip as usize;
    }
    assert!(seen.iter().flatten().all(|&s| s), "offsets 0..=8 all drawn");
    assert!((900..1100).contains(&flips), "flip share {flips}/2000");
    let epoch = |seed, e| (0..64).map(|p| t.draw(seed, e, p)).collect::<Vec<_>>();
    assert_ne!(epoch(7, 3), epoch(7, 4), "epochs 3 and 4 crop alike");
    assert_ne!(epoch(7, 3), epoch(8, 3), "seeds 7 and 8 crop alike");
    // Without random parts nothing is drawn.
    assert_eq!(t.eval().draw(7, 3, 5), Aug::default());
}

/// A random split of `n` images of `h x w` RGB (labels i % 2, bias i % 3 % 2).
fn random_split(n: usize, h: usize, w: usize, seed: u64) -> Split {
    let mut r = rest::util::rng(seed, 0);
    let mut images = vec![0u8; n * h * w * 3];
    r.fill_bytes(&mut images);
    let labels = (0..n as u32).map(|i| i % 2).collect();
    let bias = (0..n as u32).map(|i| i % 3 % 2).collect();
    Split::new(images, labels, bias, h, w, 3).expect("split")
}

#[test]
fn gather_augments_by_epoch_position_and_evaluation_does_not() -> Result<()> {
    let s = random_split(10, 6, 5, 1);
    let t = cifar_train();
    let idx = [4, 0, 4, 9];
    let key = AugKey {
        seed: 3,
        epoch: 2,
        first_pos: 20,
    };
    let mut got = Vec::new();
    t.gather(&s, &idx, Some(key), &mut got)?;
    let sz = 6 * 5 * 3;
    for (j, &i) in idx.iter().enumerate() {
        let mut one = vec![0.0; sz];
        let aug = t.draw(3, 2, 20 + j);
        t.apply(
            &s.images.bytes().expect("images in one buffer")[i * sz..(i + 1) * sz],
            (6, 5, 3),
            aug,
            &mut one,
        )?;
        assert_eq!(&got[j * sz..(j + 1) * sz], &one[..], "sample {j}");
    }
    // The same image at two positions is augmented differently (positions 20 and 22).
    assert_ne!(&got[..sz], &got[2 * sz..3 * sz]);

    // Evaluation (no key): no augmentation, only the normalisation.
    let mut eval = Vec::new();
    t.gather(&s, &idx, None, &mut eval)?;
    let mut plain = Vec::new();
    t.eval().gather(&s, &idx, Some(key), &mut plain)?;
    assert_eq!(eval, plain);
    let n = t.normalize.expect("normalised");
    for (j, &i) in idx.iter().enumerate() {
        let b = s.images.bytes().expect("images in one buffer")[i * sz + 7 * 3 + 2]; // pixel 7 (y 1, x 2), channel 2
        let want = (b as f64 / 255.0 - n.mean[2] as f64) / n.std[2] as f64;
        assert!((eval[j * sz + 2 * 30 + 7] as f64 - want).abs() < 1e-5);
    }
    // The identity transform is bit-identical to the built-in path (`Split::gather_nchw`).
    let mut id = Vec::new();
    Transform::identity().gather(&s, &idx, Some(key), &mut id)?;
    let mut reference = Vec::new();
    s.gather_nchw(&idx, &mut reference)?;
    assert_eq!(
        id.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let e = t.gather(&s, &[1, 10], None, &mut id).expect_err("index 10");
    assert!(e.to_string().contains("10"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Prefetcher

fn all_batches(plan: EpochBatches, start: usize, prefetch: bool) -> Result<Vec<Vec<u32>>> {
    std::thread::scope(|scope| {
        let mut src = BatchSource::new(scope, plan, start, prefetch)?;
        let mut out = Vec::new();
        while let Some(b) = src.next_batch() {
            let b = b?;
            assert_eq!(b.index, start + out.len());
            out.push(b.data.iter().map(|v| v.to_bits()).collect());
            src.recycle(b.data);
        }
        Ok(out)
    })
}

/// `nchw` (`[n][f]`) transposed to `[f][n]`.
fn transposed(nchw: &[f32], n: usize) -> Vec<u32> {
    let f = nchw.len() / n.max(1);
    (0..f * n)
        .map(|k| nchw[(k % n) * f + k / n].to_bits())
        .collect()
}

#[test]
fn feature_major_gather_is_the_transposed_nchw_gather() -> Result<()> {
    // Unaugmented batches (the vectorised path for whole blocks of 16 samples, the scalar one
    // for the rest), with and without normalisation, images whose byte count is not a
    // multiple of 4 (5x5x3), and augmented ones (the blockwise path).
    let no_aug = Transform {
        crop_padding: 0,
        flip: false,
        normalize: cifar_train().normalize,
        resized_crop: false,
    };
    for (h, w) in [(28, 28), (5, 5), (8, 8)] {
        let s = random_split(60, h, w, 4);
        for n in [1, 16, 37, 48] {
            let idx: Vec<usize> = (0..n).map(|k| (k * 13 + 5) % 60).collect();
            let key = AugKey {
                seed: 2,
                epoch: 1,
                first_pos: 32,
            };
            for (t, key) in [
                (Transform::identity(), None),
                (no_aug, Some(key)),
                (cifar_train(), None),
                (cifar_train(), Some(key)),
            ] {
                let (mut a, mut b) = (Vec::new(), vec![f32::NAN; 3]);
                t.gather_as(&s, &idx, key, BatchLayout::Nchw, &mut a)?;
                t.gather_as(&s, &idx, key, BatchLayout::FeatureMajor, &mut b)?;
                let got: Vec<u32> = b.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, transposed(&a, n), "{h}x{w}, n = {n}, {t:?}, {key:?}");
                // A recycled buffer of the right size (garbage inside) gives the same.
                b.iter_mut().for_each(|v| *v = f32::NAN);
                t.gather_as(&s, &idx, key, BatchLayout::FeatureMajor, &mut b)?;
                assert_eq!(b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), got);
            }
        }
    }
    Ok(())
}

#[test]
fn prefetched_batches_are_bit_identical_to_inline_ones_and_reuse_buffers() -> Result<()> {
    let s = random_split(40, 8, 8, 2);
    let mut r = rest::util::rng(9, 0);
    let order: Vec<usize> = (0..47).map(|_| (r.next_u32() % 40) as usize).collect();
    let plan = EpochBatches {
        split: &s,
        order: &order,
        batch_size: 6,
        transform: cifar_train(),
        seed: 5,
        epoch: 2,
        layout: BatchLayout::Nchw,
    };
    assert_eq!(plan.len(), 8);
    let inline = all_batches(plan, 0, false)?;
    assert_eq!(inline.len(), 8);
    assert_eq!(inline[7].len(), 5 * 8 * 8 * 3, "short last batch");
    assert_eq!(all_batches(plan, 0, true)?, inline);
    // Feature-major batches: the same values, each feature's run over the batch contiguous,
    // and the same tensor once viewed as [N, C, H, W].
    let fm_plan = EpochBatches {
        layout: BatchLayout::FeatureMajor,
        ..plan
    };
    let fm = all_batches(fm_plan, 0, true)?;
    assert_eq!(fm, all_batches(fm_plan, 0, false)?);
    let sz = 8 * 8 * 3;
    for (k, (a, b)) in inline.iter().zip(&fm).enumerate() {
        let n = a.len() / sz;
        for s in 0..n {
            for f in 0..sz {
                assert_eq!(a[s * sz + f], b[f * n + s], "batch {k}");
            }
        }
        let dev = candle_core::Device::Cpu;
        let floats = |v: &[u32]| v.iter().map(|&u| f32::from_bits(u)).collect::<Vec<_>>();
        let ta = BatchLayout::Nchw.tensor(&floats(a), n, (3, 8, 8), &dev)?;
        let tb = BatchLayout::FeatureMajor.tensor(&floats(b), n, (3, 8, 8), &dev)?;
        assert_eq!(tb.dims(), ta.dims());
        let diff = (ta - tb)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "batch {k}: tensors differ");
    }
    // A resumed epoch (from batch 3) gets the same batches 3.. as the full epoch.
    assert_eq!(all_batches(plan, 3, true)?, inline[3..].to_vec());
    assert_eq!(all_batches(plan, 3, false)?, inline[3..].to_vec());
    // Each batch equals a direct gather at its epoch positions.
    let mut direct = Vec::new();
    cifar_train().gather(
        &s,
        &order[12..18],
        Some(AugKey {
            seed: 5,
            epoch: 2,
            first_pos: 12,
        }),
        &mut direct,
    )?;
    assert_eq!(
        direct.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        inline[2]
    );

    // Buffers come back: a long epoch allocates only a few.
    let long: Vec<usize> = (0..400).map(|i| i % 40).collect();
    let plan = EpochBatches {
        order: &long,
        batch_size: 4,
        ..plan
    };
    std::thread::scope(|scope| -> Result<()> {
        let mut p = Prefetcher::spawn(scope, plan, 0)?;
        let mut n = 0;
        while let Some(b) = p.next_batch() {
            let b = b?;
            n += 1;
            p.recycle(b.data);
        }
        assert_eq!(n, 100);
        assert!(
            p.allocations() <= PREFETCH_DEPTH + 2,
            "{} buffers for 100 batches",
            p.allocations()
        );
        Ok(())
    })
}

#[test]
fn prefetcher_propagates_errors_and_stops_when_dropped() -> Result<()> {
    let s = random_split(10, 4, 4, 3);
    // Batch 2 holds an index outside the split.
    let order = [0, 1, 2, 3, 4, 5, 6, 99, 8, 9];
    let plan = EpochBatches {
        split: &s,
        order: &order,
        batch_size: 3,
        transform: cifar_train(),
        seed: 1,
        epoch: 1,
        layout: BatchLayout::Nchw,
    };
    for prefetch in [true, false] {
        std::thread::scope(|scope| -> Result<()> {
            let mut src = BatchSource::new(scope, plan, 0, prefetch)?;
            assert!(src.next_batch().expect("batch 0").is_ok());
            assert!(src.next_batch().expect("batch 1").is_ok());
            let e = src
                .next_batch()
                .expect("batch 2")
                .expect_err("index 99 is outside");
            assert!(e.to_string().contains("99"), "{e}");
            if prefetch {
                // The worker stops after an error: nothing more comes.
                assert!(src.next_batch().is_none());
            }
            Ok(())
        })?;
    }
    // Dropping a prefetcher mid-epoch stops and joins its worker (the scope ends).
    let long: Vec<usize> = (0..10_000).map(|i| i % 10).collect();
    let plan = EpochBatches {
        order: &long,
        batch_size: 2,
        ..plan
    };
    std::thread::scope(|scope| -> Result<()> {
        let mut p = Prefetcher::spawn(scope, plan, 0)?;
        assert!(p.next_batch().expect("batch 0").is_ok());
        drop(p);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Folder fixtures

/// Writes a random `w x h` RGB PNG.
fn random_png(path: &Path, w: u32, h: u32, seed: u64) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let mut r = rest::util::rng(seed, 7);
    let mut px = vec![0u8; (w * h * 3) as usize];
    r.fill_bytes(&mut px);
    image::RgbImage::from_raw(w, h, px)
        .expect("image")
        .save(path)
        .expect("write png");
}

/// A two-class dataset in the DFA layout at 1 % (`bffhq`: flat valid/ and test/ at the
/// root; `cifar10c`: `1pct/valid/<class>/`, `test/<class>/`), `n` training images per class
/// of which one conflicting, images `w x h` (the first test image `odd` when given).
fn fixture(root: &Path, kind: DatasetKind, n: usize, (w, h): (u32, u32), odd: Option<(u32, u32)>) {
    let mut id = 0u64;
    let mut next = || {
        id += 1;
        id
    };
    for label in 0..2u32 {
        for k in 0..n {
            let (dir, bias) = if k == 0 {
                ("conflict", 1 - label)
            } else {
                ("align", label)
            };
            let i = next();
            random_png(
                &root.join(format!("1pct/{dir}/{label}/{i}_{label}_{bias}.png")),
                w,
                h,
                i,
            );
        }
    }
    for split in ["valid", "test"] {
        for k in 0..8u32 {
            let (label, bias) = (k % 2, k / 2 % 2);
            let i = next();
            let rel = match (kind, split) {
                (DatasetKind::Bffhq, _) => format!("{split}/{i}_{label}_{bias}.png"),
                (_, "valid") => format!("1pct/valid/{label}/{i}_{label}_{bias}.png"),
                _ => format!("test/{label}/{i}_{label}_{bias}.png"),
            };
            let (iw, ih) = match odd {
                Some(s) if split == "test" && k == 0 => s,
                _ => (w, h),
            };
            random_png(&root.join(rel), iw, ih, i);
        }
    }
}

#[test]
fn resize_on_load_is_cached_per_size_and_mixed_sizes_need_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("faces");
    fixture(&root, DatasetKind::Dfa, 3, (20, 16), Some((24, 24)));
    let opts = DfaOptions {
        root: root.clone(),
        kind: DatasetKind::Dfa,
        conflict_pct: 1.0,
        skip_bad: false,
        cache_dir: None,
    };
    // Without a resize the odd test image is an error naming it, the sizes and the flag.
    let e = format!("{:#}", load(&opts).expect_err("mixed sizes"));
    assert!(
        e.contains("test/0/") && e.contains("24x24") && e.contains("20x16"),
        "{e}"
    );
    assert!(e.contains("--image-size"), "{e}");
    // Resized: every image 12x12, the bilinear resize of the file.
    let a = load_sized(&opts, Some(12))?;
    assert!(!a.from_cache);
    assert!(a.cache_file.to_string_lossy().contains("12px"));
    for sp in [&a.dataset.train, &a.dataset.valid, &a.dataset.test] {
        assert_eq!((sp.height, sp.width, sp.channels), (12, 12, 3));
    }
    let first = root.join("1pct/align/0/2_0_0.png");
    let want = image::imageops::resize(
        &image::open(&first)?.to_rgb8(),
        12,
        12,
        image::imageops::FilterType::Triangle,
    );
    assert_eq!(
        &a.dataset
            .train
            .images
            .bytes()
            .expect("images in one buffer")[..12 * 12 * 3],
        want.as_raw().as_slice()
    );
    // A second size has its own cache; both then load from cache.
    let b = load_sized(&opts, Some(10))?;
    assert!(!b.from_cache && b.cache_file != a.cache_file);
    assert!(load_sized(&opts, Some(12))?.from_cache);
    assert!(load_sized(&opts, Some(10))?.from_cache);
    assert_eq!(load_sized(&opts, Some(12))?.dataset.train, a.dataset.train);

    // On the command line: a one-line error naming the file and --image-size.
    let o = rest_cmd(&[
        "train",
        "--data",
        s(&root),
        "--conflict-pct",
        "1",
        "--epochs",
        "1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("24x24") && err.contains("--image-size"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bffhq_fixture_trains_resnet18_at_128_pixels_and_evaluates_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("faces");
    // 64x64 faces and one 100x100 test image: all resized to 128 on load.
    fixture(&data, DatasetKind::Bffhq, 6, (64, 64), Some((100, 100)));
    let run = dir.path().join("run");
    ok(&rest_cmd(&[
        "train",
        "--data",
        s(&data),
        "--dataset",
        "bffhq",
        "--conflict-pct",
        "1",
        "--model",
        "resnet18",
        "--width",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--density",
        "0.5",
        "--out",
        s(&run),
    ]));
    let cfg = TrainConfig::from_toml_file(&run.join("config.toml"))?;
    assert_eq!(cfg.data.dataset, DatasetKind::Bffhq);
    assert_eq!(cfg.data.plan().image_size, Some(128));
    assert!(cfg.data.plan().augment);
    assert_eq!(
        cfg.data.plan().normalize.map(|n| n.mean),
        Some(rest::data::transform::IMAGENET_MEAN)
    );
    let info = read_json(&run.join("data.json"));
    assert_eq!(info["input"], serde_json::json!([3, 128, 128]));
    assert_eq!(info["classes"], 2);
    let summary = read_json(&run.join("summary.json"));
    assert_eq!(summary["test"]["n"], 8);

    // eval rebuilds the 128-pixel model and, normalising as in training, reproduces the
    // summary exactly.
    ok(&rest_cmd(&[
        "eval",
        "--checkpoint",
        s(&run.join("best.safetensors")),
    ]));
    let ev = read_json(&run.join("eval.json"));
    for split in ["valid", "test"] {
        assert_eq!(ev[split], summary[split], "{split}");
    }
    // The model's probabilities for the first test image (the 100x100 one), as evaluation
    // computes them: resized on load, normalised, no augmentation.
    let m = rest::infer::load(&run.join("best.safetensors"))?;
    let ds = load_sized(
        &DfaOptions {
            root: data.clone(),
            kind: DatasetKind::Bffhq,
            conflict_pct: 1.0,
            skip_bad: false,
            cache_dir: None,
        },
        Some(128),
    )?
    .dataset;
    let mut x = Vec::new();
    m.config
        .data
        .plan()
        .eval_transform
        .gather(&ds.test, &[0], None, &mut x)?;
    let x = candle_core::Tensor::from_vec(x, (1, 3, 128, 128), &candle_core::Device::Cpu)?;
    let logits = m.model.forward(&x, false)?;
    let want = candle_nn::ops::softmax(&logits, 1)?.to_vec2::<f32>()?;

    // predict (after the data folder is gone) gives the same probabilities, and export works.
    let moved = dir.path().join("elsewhere");
    std::fs::rename(&data, &moved)?;
    let mut tests: Vec<_> = std::fs::read_dir(moved.join("test"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    tests.sort();
    let out = ok(&rest_cmd(&[
        "predict",
        "--checkpoint",
        s(&run.join("best.safetensors")),
        "--top-k",
        "2",
        s(&tests[0]),
    ]));
    let p: serde_json::Value = serde_json::from_str(out.trim())?;
    for c in p["top"].as_array().expect("top") {
        let class = c["class"].as_u64().expect("class") as usize;
        let prob = c["prob"].as_f64().expect("prob");
        assert!(
            (prob - want[0][class] as f64).abs() < 1e-5,
            "class {class}: predict {prob}, model {}",
            want[0][class]
        );
    }
    let exp = dir.path().join("model.safetensors");
    ok(&rest_cmd(&[
        "export",
        "--checkpoint",
        s(&run.join("best.safetensors")),
        "--out",
        s(&exp),
    ]));
    let m = rest::infer::load(&exp)?;
    assert_eq!((m.input, m.classes), ((3, 128, 128), 2));
    Ok(())
}

#[test]
fn cifar10c_fixture_trains_resnet18_with_identical_results_with_and_without_prefetch() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("cifar10c");
    fixture(&data, DatasetKind::Cifar10c, 10, (32, 32), None);
    let train = |name: &str, extra: &[&str]| -> serde_json::Value {
        let run = dir.path().join(name);
        let mut args = vec![
            "train",
            "--data",
            s(&data),
            "--conflict-pct",
            "1",
            "--model",
            "resnet18",
            "--width",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--out",
            s(&run),
        ];
        args.extend_from_slice(extra);
        ok(&rest_cmd(&args));
        let cfg = TrainConfig::from_toml_file(&run.join("config.toml")).expect("config");
        assert_eq!(cfg.data.dataset, DatasetKind::Cifar10c);
        read_json(&run.join("summary.json"))
    };
    let a = train("prefetch", &[]);
    let b = train("inline", &["--no-prefetch"]);
    for k in ["valid", "test", "infer_flops"] {
        assert_eq!(a[k], b[k], "{k}");
    }
    // Augmentation changes the run (the default is on for cifar10c).
    let c = train("plain", &["--no-augment"]);
    assert_ne!(a["valid"]["loss"], c["valid"]["loss"]);
    Ok(())
}

/// Time to gather and augment one batch on one thread (run by hand:
/// `cargo test --release --test pipeline -- --ignored --nocapture`).
#[test]
#[ignore = "timing, run by hand"]
fn gather_time_per_batch() -> Result<()> {
    for (size, batch) in [(28, 256), (32, 256), (128, 256)] {
        let s = random_split(batch, size, size, 4);
        let order: Vec<usize> = (0..batch).collect();
        for (name, t) in [
            ("identity", Transform::identity()),
            ("crop+flip+normalise", cifar_train()),
        ] {
            let mut buf = Vec::new();
            let reps = 20;
            let t0 = std::time::Instant::now();
            for e in 0..reps {
                t.gather(
                    &s,
                    &order,
                    Some(AugKey {
                        seed: 1,
                        epoch: e,
                        first_pos: 0,
                    }),
                    &mut buf,
                )?;
            }
            println!(
                "{size}x{size} batch {batch} {name}: {:.2} ms",
                t0.elapsed().as_secs_f64() * 1e3 / reps as f64
            );
        }
    }
    Ok(())
}

/// The test and validation figures and the metrics table of a finished run.
fn outcome(run: &Path) -> (serde_json::Value, String) {
    let s = read_json(&run.join("summary.json"));
    (
        serde_json::json!({"valid": s["valid"], "test": s["test"], "epoch": s["selected_epoch"]}),
        std::fs::read_to_string(run.join("metrics.csv")).expect("metrics.csv"),
    )
}

#[test]
fn augmented_run_interrupted_and_resumed_equals_uninterrupted_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("cifar10c");
    fixture(&data, DatasetKind::Cifar10c, 300, (32, 32), None);
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--data",
            s(&data),
            "--conflict-pct",
            "1",
            "--epochs",
            "4",
            "--batch-size",
            "16",
            "--density",
            "0.2",
            "--threads",
            "1",
            "--out",
            s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let full = dir.path().join("full");
    ok(&rest_cmd(
        &args(&full).iter().map(String::as_str).collect::<Vec<_>>(),
    ));

    // SIGINT once the first checkpoint exists (mid-epoch 2 or later), then resume.
    let cut = dir.path().join("cut");
    let child = rest_bin()
        .args(args(&cut))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let ms = Duration::from_millis;
    sigint_after(&child, &cut.join("checkpoint.json"), ms(10), ms(150))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--resume"), "{err}");
        ok(&rest_cmd(&["train", "--resume", s(&cut)]));
    } else {
        eprintln!("the run finished before SIGINT: only the uninterrupted figures are compared");
    }
    assert_eq!(outcome(&full), outcome(&cut));
    Ok(())
}

#[test]
fn per_dataset_defaults_overrides_and_old_configs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let folder = |name: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    };
    let cfg = |data: Option<std::path::PathBuf>| {
        let mut c = TrainConfig::default();
        c.data.data = data;
        c
    };
    // Built-in data and Colored MNIST folders: no resize, no augmentation, no normalisation.
    for c in [cfg(None), cfg(Some(folder("cmnist")))] {
        assert_eq!(c.data.plan().image_size, None);
        assert!(!c.data.plan().augment);
        assert_eq!(c.data.plan().normalize, None);
        assert_eq!(c.data.plan().train_transform, Transform::identity());
    }
    let cifar = cfg(Some(folder("cifar10c")));
    assert_eq!(cifar.data.kind(), Some(DatasetKind::Cifar10c));
    assert_eq!(
        cifar.data.plan().train_transform,
        Transform {
            crop_padding: 4,
            flip: true,
            normalize: Some(Normalize {
                mean: CIFAR_MEAN,
                std: CIFAR_STD
            }),
            resized_crop: false,
        }
    );
    assert_eq!(cifar.data.plan().eval_transform.crop_padding, 0);
    assert!(!cifar.data.plan().eval_transform.flip);
    let bffhq = cfg(Some(folder("bffhq")));
    assert_eq!(bffhq.data.plan().image_size, Some(128));
    assert_eq!(
        bffhq.data.plan().normalize.map(|n| (n.mean, n.std)),
        Some((
            rest::data::transform::IMAGENET_MEAN,
            rest::data::transform::IMAGENET_STD
        ))
    );
    // Overrides.
    let mut c = bffhq.clone();
    c.data.image_size = Some(224);
    c.data.augment = Some(false);
    c.data.normalize = Some(false);
    assert_eq!(c.data.plan().image_size, Some(224));
    assert_eq!(c.data.plan().train_transform, Transform::identity());
    let mut c = cfg(Some(folder("cmnist")));
    c.data.augment = Some(true);
    c.data.normalize = Some(true);
    let t = c.data.plan().train_transform;
    assert_eq!((t.crop_padding, t.flip), (4, true));
    assert_eq!(
        t.normalize.map(|n| n.mean),
        Some(rest::data::transform::IMAGENET_MEAN)
    );
    // The default config writes none of the new keys (its config.toml, and so its checkpoint
    // hash, are as before), and a config without them loads with the defaults.
    let text = TrainConfig::default().to_toml()?;
    for k in ["image_size", "augment", "normalize", "prefetch"] {
        assert!(!text.contains(k), "{k} in {text}");
    }
    let old: TrainConfig = toml::from_str("epochs = 3\ndataset = \"bffhq\"\n")?;
    assert_eq!(
        (old.data.image_size, old.data.augment, old.data.normalize),
        (None, None, None)
    );
    let back: TrainConfig = toml::from_str(&c.to_toml()?)?;
    assert_eq!(back, c);
    Ok(())
}

/// A sweep over a folder dataset (`dataset = auto`, which a run records resolved) can be
/// rerun: the finished run is recognised as the same configuration and skipped.
#[test]
fn a_sweep_over_a_folder_dataset_reruns_without_retraining() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("faces");
    fixture(&data, DatasetKind::Dfa, 6, (20, 16), None);
    let file = dir.path().join("sweep.toml");
    std::fs::write(
        &file,
        format!(
            "[base]\ndata = {:?}\nconflict_pct = 1\nepochs = 1\nbatch_size = 6\n[grid]\n\
             seed = [1]\n",
            data.to_string_lossy()
        ),
    )?;
    let out = dir.path().join("out");
    let first = ok(&rest_cmd(&["sweep", s(&file), "--out", s(&out)]));
    assert!(first.contains("[1/1] done"), "{first}");
    let again = ok(&rest_cmd(&["sweep", s(&file), "--out", s(&out)]));
    assert!(again.contains("1 runs: 1 done, 0 to run"), "{again}");
    Ok(())
}
