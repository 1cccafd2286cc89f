//! `train::train_on_dataset` (the Python module's arrays): the same run as `train` on the same
//! images, a complete run directory that `rest predict` reads (its input shape from
//! `data.json`, any image size), and one that `--resume` and `rest eval` refuse, as its images
//! are not on disk.

mod common;

use common::{ok, read_json, rest_cmd, s, tiny_config};
use rest::data::{GroupDataset, Split};
use std::path::Path;

#[test]
fn in_memory_training_equals_training_on_the_same_builtin_images() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(&tmp.path().join("cli"));
    cfg.data.train_size = 500;
    cfg.optim.epochs = 2;
    cfg.run.threads = None;
    let a = rest::train::train(&cfg).unwrap();
    let ds = rest::data::load(&cfg.data.plan().source).unwrap();
    let mut mem = cfg.clone();
    mem.run.out = Some(tmp.path().join("mem"));
    let b = rest::train::train_on_dataset(&mem, &ds, false).unwrap();
    let csv = |d: &Path| std::fs::read_to_string(d.join("metrics.csv")).unwrap();
    assert_eq!(csv(&a.run_dir), csv(&b.run_dir));
    assert_eq!(a.summary.test, b.summary.test);
    let info = read_json(&b.run_dir.join("data.json"));
    assert_eq!(info["in_memory"], true);
    assert!(read_json(&a.run_dir.join("data.json"))
        .get("in_memory")
        .is_none());
}

/// A 3-class dataset of 12x12 grey images whose class is the brightness of the top rows.
fn stripes(n: usize, seed: u32) -> Split {
    let (h, w) = (12, 12);
    let mut images = vec![0u8; n * h * w];
    let mut labels = Vec::new();
    let mut bias = Vec::new();
    for i in 0..n {
        let y = (i as u32 + seed) % 3;
        for p in 0..4 * w {
            images[i * h * w + p] = 80 * y as u8 + (p as u8 % 7);
        }
        labels.push(y);
        bias.push(if i % 10 == 0 { (y + 1) % 3 } else { y });
    }
    Split::new(images, labels, bias, h, w, 1).unwrap()
}

#[test]
fn arrays_runs_predict_from_the_cli_but_do_not_resume_or_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let ds = stripes_dataset();
    let mut cfg = tiny_config(&dir);
    cfg.optim.epochs = 1;
    cfg.data.conflict_pct = 10.0;
    cfg.model.kind = rest::models::ModelKind::Mlp;
    rest::train::train_on_dataset(&cfg, &ds, false).unwrap();
    assert_eq!(
        read_json(&dir.join("data.json"))["input"],
        serde_json::json!([1, 12, 12])
    );
    let img = tmp.path().join("x.png");
    image::GrayImage::from_raw(
        12,
        12,
        ds.test.images.contiguous().expect("one buffer")[..144].to_vec(),
    )
    .unwrap()
    .save(&img)
    .unwrap();
    let ckpt = dir.join("best.safetensors");
    let out = ok(&rest_cmd(&["predict", "--checkpoint", s(&ckpt), s(&img)]));
    assert!(out.contains("\"class\""), "{out}");
    for args in [
        vec!["train", "--resume", s(&dir)],
        vec!["eval", "--checkpoint", s(&ckpt)],
    ] {
        let o = rest_cmd(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("in-memory arrays"),
            "{args:?}: {err}"
        );
    }
}

/// A 3-class in-memory dataset of stripes (train 120, valid and test 30).
fn stripes_dataset() -> GroupDataset {
    GroupDataset {
        name: "stripes".into(),
        num_classes: 3,
        train: stripes(120, 0),
        valid: stripes(30, 1),
        test: stripes(30, 2),
    }
}

#[test]
fn the_epoch_hook_sees_each_epochs_rows_and_its_error_stops_the_run() {
    use rest::train::{EpochReport, Hooks};
    use std::sync::Mutex;
    let tmp = tempfile::tempdir().unwrap();
    let ds = stripes_dataset();
    let mut cfg = tiny_config(&tmp.path().join("all"));
    cfg.optim.epochs = 2;
    cfg.data.conflict_pct = 10.0;
    cfg.model.kind = rest::models::ModelKind::Mlp;
    let seen: Mutex<Vec<(usize, usize, String)>> = Mutex::new(Vec::new());
    let record = |r: &EpochReport| -> anyhow::Result<()> {
        let csv = rest::train::output::metrics_csv(r.rows);
        seen.lock().unwrap().push((r.epoch, r.epochs, csv));
        Ok(())
    };
    let hooks = Hooks {
        on_epoch: Some(&record),
        quiet: true,
    };
    let out = rest::train::train_on_dataset_with_hooks(&cfg, &ds, false, &hooks).unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(
        seen.iter().map(|(e, n, _)| (*e, *n)).collect::<Vec<_>>(),
        [(1, 2), (2, 2)]
    );
    // Each epoch's rows are the train and valid lines of metrics.csv for that epoch.
    let file = std::fs::read_to_string(out.run_dir.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = file.lines().collect();
    for (e, _, csv) in &seen {
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows[0], lines[0]);
        assert_eq!(&rows[1..], &lines[1 + 2 * (e - 1)..3 + 2 * (e - 1)]);
    }

    let mut cfg = tiny_config(&tmp.path().join("stopped"));
    cfg.optim.epochs = 3;
    cfg.data.conflict_pct = 10.0;
    cfg.model.kind = rest::models::ModelKind::Mlp;
    let stop = |r: &EpochReport| -> anyhow::Result<()> { anyhow::bail!("stop at {}", r.epoch) };
    let hooks = Hooks {
        on_epoch: Some(&stop),
        quiet: true,
    };
    let Err(err) = rest::train::train_on_dataset_with_hooks(&cfg, &ds, false, &hooks) else {
        panic!("the hook's error did not stop the run");
    };
    assert!(format!("{err:#}").contains("stop at 1"), "{err:#}");
    let dir = tmp.path().join("stopped");
    assert!(!dir.join("summary.json").exists());
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
}
