//! `rest report` on fake run directories written here (config.toml from the real
//! `TrainConfig` serializer, summary.json and metrics.csv with chosen values): results.csv
//! rows and columns, report.md mean ± std and best-cell marks against hand-computed values,
//! plots that decode and show text, single-run learning curves, and the error cases.

mod common;

use common::rest_bin;
use rest::report::collect::collect;
use rest::report::curves::parse_metrics_csv;
use rest::report::plots::{linear_ticks, log_ticks, tick_label};
use rest::report::tables::{stat, Grid};
use rest::report::{write_report, ReportKind};
use rest::train::TrainConfig;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Writes a fake finished run: config.toml, summary.json (test unbiased accuracy `unb`,
/// conflicting accuracy `conf`, training FLOPs fraction `tflops`) and a two-epoch metrics.csv.
fn fake_run(dir: &Path, pct: f64, density: f64, seed: u64, unb: f64, conf: f64, tflops: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = TrainConfig::default();
    cfg.data.conflict_pct = pct;
    cfg.sparse.density = density;
    cfg.optim.seed = seed;
    cfg.run.out = Some(dir.to_path_buf());
    std::fs::write(dir.join("config.toml"), cfg.to_toml().unwrap()).unwrap();
    let group = |acc: f64| {
        json!({"n": 1000, "n_conflicting": 50, "loss": 0.5, "accuracy": acc, "aligned": 0.99,
               "conflicting": conf, "worst_group": conf.min(0.99), "worst_cell": conf - 0.1,
               "unbiased": acc})
    };
    let summary = json!({
        "rest_version": "0.1.0", "dataset": "cmnist", "model": "cnn", "density": density,
        "upweight": cfg.effective_upweight(), "reweight_mode": "sample", "seed": seed,
        "epochs": 2, "method": "upweight", "select_rule": "val-worst-group",
        "selected_epoch": 2, "valid": group(unb - 0.01), "test": group(unb),
        "final_density": density, "layer_densities": [], "steps": 10,
        "update_frequency": 2, "mask_updates": 5, "itop_rate": null,
        "wall_time_s": 10.0 * density + seed as f64, "train_samples_per_s": 1000.0,
        "infer_flops": 1e6 * density, "infer_flops_dense": 1e6, "infer_flops_vs_dense": density,
        "train_flops": 1e9 * tflops, "train_flops_dense": 1e9, "train_flops_vs_dense": tflops
    });
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("metrics.csv"), metrics_csv(density)).unwrap();
}

fn metrics_csv(density: f64) -> String {
    format!(
        "{}\n\
         1,train,100,2.000000,0.500000,0.600000,0.100000,0.100000,0.050000,0.300000,1e-2,{density},0.5\n\
         1,valid,50,1.500000,0.600000,0.700000,0.200000,0.200000,0.100000,0.450000,1e-2,{density},0.5\n\
         2,train,100,1.000000,0.800000,0.850000,0.400000,0.400000,0.300000,0.600000,1e-3,{density},0.005\n\
         2,valid,50,0.900000,0.850000,0.900000,0.500000,0.500000,0.400000,0.700000,1e-3,{density},0.005\n\
         2,test,200,0.950000,0.820000,0.880000,,0.450000,0.350000,0.650000,1e-3,{density},0.005\n",
        rest::train::output::CSV_HEADER
    )
}

/// The collection of the main tests. Unbiased test accuracy (%) per (density, ratio):
/// d=1, 1 %: 80, 82, 84 -> 82.00 ± 2.00;      d=0.1, 1 %: 85, 86, 87 -> 86.00 ± 1.00 (best)
/// d=1, 5 %: 90, 94 (seed 3 missing) -> 92.00 ± 2.83 (n=2, best); d=0.1, 5 %: 91 x 3 -> 91.00 ± 0.00
/// Runs are nested at different depths.
fn collection(root: &Path) {
    let cells: [(f64, f64, &[f64]); 4] = [
        (1.0, 1.0, &[0.80, 0.82, 0.84]),
        (0.1, 1.0, &[0.85, 0.86, 0.87]),
        (1.0, 5.0, &[0.90, 0.94]),
        (0.1, 5.0, &[0.91, 0.91, 0.91]),
    ];
    for (d, pct, accs) in cells {
        for (i, a) in accs.iter().enumerate() {
            let seed = i as u64 + 1;
            let dir = if d == 1.0 {
                root.join(format!("dense/pct{pct}/seed{seed}"))
            } else {
                root.join(format!("sparse-{pct}-{seed}"))
            };
            // Conflicting accuracy 10 points below unbiased; training FLOPs 0.2 when sparse.
            let tflops = if d == 1.0 { 1.0 } else { 0.2 };
            fake_run(&dir, pct, d, seed, *a, a - 0.1, tflops);
        }
    }
}

fn csv_rows(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(String::from).collect();
    (
        header,
        lines
            .map(|l| l.split(',').map(String::from).collect())
            .collect(),
    )
}

/// Decodes a PNG; returns (width, height, share of non-white pixels, dark pixels in the
/// title strip).
fn png_stats(path: &Path) -> (u32, u32, f64, usize) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
        .to_rgb8();
    let (w, h) = img.dimensions();
    let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    let title_dark = (0..w)
        .flat_map(|x| (0..40.min(h)).map(move |y| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|c| *c < 100))
        .count();
    (w, h, non_white as f64 / (w * h) as f64, title_dark)
}

fn check_svg(path: &Path, needle: &str) {
    let s = std::fs::read_to_string(path).unwrap();
    assert!(s.len() > 2000, "{} too small", path.display());
    assert!(
        s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
        "{} is not SVG",
        path.display()
    );
    assert_eq!(s.matches("<text").count(), s.matches("</text>").count());
    assert!(s.contains(needle), "{} lacks {needle:?}", path.display());
}

#[test]
fn collection_report_has_csv_tables_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    collection(root);
    let r = write_report(root).unwrap();
    assert_eq!(r.kind, ReportKind::Collection);
    assert_eq!(r.runs, 11);
    assert!(r.skipped.is_empty());
    for f in [
        "results.csv",
        "report.md",
        "acc_vs_density.png",
        "acc_vs_density.svg",
        "acc_vs_flops.png",
        "acc_vs_flops.svg",
    ] {
        assert!(r.files.contains(&root.join(f)), "{f} not reported");
        assert!(root.join(f).is_file(), "{f} not written");
    }

    // results.csv: one row per run, config keys and metrics as columns.
    let (header, rows) = csv_rows(&std::fs::read_to_string(root.join("results.csv")).unwrap());
    assert_eq!(rows.len(), 11);
    assert_eq!(header[0], "run");
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name}"))
    };
    for k in [
        "method",
        "conflict_pct",
        "density",
        "seed",
        "upweight",
        "epochs",
        "lr",
        "model",
        "test_unbiased",
        "test_conflicting",
        "test_worst_group",
        "train_flops_vs_dense",
        "infer_flops_vs_dense",
        "wall_time_s",
        "upweight_effective",
    ] {
        col(k);
    }
    assert!(
        !header.iter().any(|h| h == "out"),
        "out is not a config key"
    );
    assert!(rows.iter().all(|r| r.len() == header.len()));
    let row = rows
        .iter()
        .find(|r| r[0] == "dense/pct5/seed2")
        .expect("a nested run's row");
    assert_eq!(row[col("conflict_pct")], "5");
    assert_eq!(row[col("density")], "1");
    assert_eq!(row[col("seed")], "2");
    assert_eq!(row[col("upweight")], "paired");
    assert_eq!(row[col("upweight_effective")], "80");
    assert_eq!(row[col("test_unbiased")].parse::<f64>().unwrap(), 0.94);
    assert!((row[col("test_conflicting")].parse::<f64>().unwrap() - 0.84).abs() < 1e-12);
    assert_eq!(row[col("wall_time_s")].parse::<f64>().unwrap(), 12.0);

    // Grouping: seeds pooled, paired LAMBDA (30 at 1 %, 80 at 5 %) does not split rows.
    let c = collect(root).unwrap();
    let g = Grid::new(&c);
    assert_eq!(g.rows.len(), 2);
    assert_eq!(g.cols, vec!["1".to_string(), "5".to_string()]);
    assert_eq!(g.seeds, 3);

    let md = std::fs::read_to_string(root.join("report.md")).unwrap();
    let section = |title: &str| -> String {
        let start = md
            .find(&format!("## {title}"))
            .unwrap_or_else(|| panic!("no section {title}"));
        let rest = &md[start + 3..];
        rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
    };
    let unb = section("Unbiased test accuracy");
    // Rows: dense first; columns 1 %, 5 %.
    let dense = unb
        .lines()
        .find(|l| l.starts_with("| upweight | 1 |"))
        .unwrap();
    let sparse = unb
        .lines()
        .find(|l| l.starts_with("| upweight | 0.1 |"))
        .unwrap();
    assert!(unb.find(dense).unwrap() < unb.find(sparse).unwrap());
    assert!(unb.contains("| 1 % | 5 % |"), "{unb}");
    assert_eq!(
        dense,
        "| upweight | 1 | 82.00 ± 2.00 | **92.00 ± 2.83** (n=2) |"
    );
    assert_eq!(
        sparse,
        "| upweight | 0.1 | **86.00 ± 1.00** | 91.00 ± 0.00 |"
    );
    // Conflicting accuracy: every value 10 points lower, same best cells.
    let conf = section("Bias-conflicting test accuracy");
    assert!(conf.contains("| upweight | 1 | 72.00 ± 2.00 | **82.00 ± 2.83** (n=2) |"));
    assert!(conf.contains("| upweight | 0.1 | **76.00 ± 1.00** | 81.00 ± 0.00 |"));
    // Worst group = min(aligned 0.99, conflicting): the conflicting values again.
    let worst = section("Worst-group test accuracy");
    assert!(worst.contains("| upweight | 0.1 | **76.00 ± 1.00** | 81.00 ± 0.00 |"));
    // Costs: lower is better.
    let flops = section("Training FLOPs");
    assert!(
        flops.contains("| upweight | 0.1 | **0.2000 ± 0.0000** | **0.2000 ± 0.0000** |"),
        "{flops}"
    );
    assert!(flops.contains("| upweight | 1 | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 (n=2) |"));
    // Wall time 10 * density + seed: d=1, 1 %: 11, 12, 13 -> 12.0 ± 1.0.
    let wall = section("Wall time");
    assert!(wall.contains("| upweight | 1 | 12.0 ± 1.0 |"), "{wall}");
    // d=0.1, 1 %: 2, 3, 4 -> 3.0 ± 1.0.
    assert!(
        wall.contains("| upweight | 0.1 | **3.0 ± 1.0** |"),
        "{wall}"
    );
    assert!(md.contains("11 runs: 2 configurations x 3 seeds, 2 conflicting ratios."));
    // DFA runs: no weighted accuracy, so no such table or column.
    assert!(!md.contains("Weighted"), "{md}");
    assert!(!header
        .iter()
        .any(|h| h.contains("weighted") || h.starts_with("test_group_")));
    assert!(md.contains("](acc_vs_density.png)"));
    assert!(md.contains("](acc_vs_flops.png)"));

    for stem in ["acc_vs_density", "acc_vs_flops"] {
        let (w, h, ink, title) = png_stats(&root.join(format!("{stem}.png")));
        // Two ratios: two panels side by side.
        assert!(w >= 1200 && h >= 400, "{stem}: {w}x{h}");
        assert!(ink > 0.02, "{stem}: almost blank ({ink})");
        assert!(
            title > 50,
            "{stem}: no title text drawn ({title} dark pixels)"
        );
        check_svg(
            &root.join(format!("{stem}.svg")),
            "unbiased test accuracy (%)",
        );
    }
    check_svg(&root.join("acc_vs_density.svg"), "1 % conflicting");
}

#[test]
fn stage1_and_corrupt_summaries_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fake_run(&root.join("jtt"), 1.0, 0.5, 1, 0.7, 0.6, 0.5);
    // JTT's stage-1 summary is not a run of the collection.
    fake_run(&root.join("jtt/stage1"), 1.0, 0.5, 1, 0.1, 0.1, 0.5);
    fake_run(&root.join("other"), 1.0, 0.5, 2, 0.9, 0.8, 0.5);
    // No conflicting test samples in this run: its conflicting accuracy is null.
    let path = root.join("other/summary.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["test"]["conflicting"] = serde_json::Value::Null;
    std::fs::write(&path, v.to_string()).unwrap();
    std::fs::create_dir_all(root.join("broken")).unwrap();
    std::fs::write(root.join("broken/summary.json"), "{\"test\": ").unwrap();
    // A run that failed before its summary: counted, not read.
    std::fs::create_dir_all(root.join("crashed")).unwrap();
    std::fs::copy(
        root.join("other/config.toml"),
        root.join("crashed/config.toml"),
    )
    .unwrap();
    let r = write_report(root).unwrap();
    assert_eq!(r.runs, 2);
    assert_eq!(r.unfinished, vec![PathBuf::from("crashed")]);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].path, PathBuf::from("broken/summary.json"));
    let (_, rows) = csv_rows(&std::fs::read_to_string(root.join("results.csv")).unwrap());
    let runs: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(runs, vec!["jtt", "other"]);
    let md = std::fs::read_to_string(root.join("report.md")).unwrap();
    assert!(md.contains("1 summary.json file could not be read"), "{md}");
    assert!(md.contains("`broken/summary.json`"), "{md}");
    assert!(
        md.contains("1 run directory without summary.json (unfinished or failed): `crashed`."),
        "{md}"
    );
    // One configuration, seeds 1 and 2: 0.7 and 0.9 -> 80.00 ± 14.14; a lone cell is not bold.
    assert!(md.contains("| upweight | 0.5 | 80.00 ± 14.14 |"), "{md}");
    // Conflicting accuracy from the one run that has it (0.6), with its count.
    assert!(md.contains("| upweight | 0.5 | 60.00 (n=1) |"), "{md}");
}

#[test]
fn other_varying_keys_become_row_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut accs = [0.5, 0.6, 0.7, 0.8].into_iter();
    for (upweight, lr) in [(10.0, 0.01), (10.0, 0.1), (80.0, 0.01), (80.0, 0.1)] {
        let dir = root.join(format!("u{upweight}-lr{lr}"));
        let a = accs.next().unwrap();
        fake_run(&dir, 1.0, 0.05, 1, a, a, 0.1);
        let mut cfg = TrainConfig::default();
        cfg.data.conflict_pct = 1.0;
        cfg.sparse.density = 0.05;
        cfg.optim.seed = 1;
        cfg.method.upweight = Some(upweight);
        cfg.optim.lr = lr;
        std::fs::write(dir.join("config.toml"), cfg.to_toml().unwrap()).unwrap();
    }
    write_report(root).unwrap();
    let md = std::fs::read_to_string(root.join("report.md")).unwrap();
    assert!(md.contains("| method | density | λ | lr | 1 % |"), "{md}");
    // One seed: no ± and no (n=k); rows ordered by λ then lr.
    assert!(
        md.contains(
            "| upweight | 0.05 | 10 | 0.01 | 50.00 |\n\
         | upweight | 0.05 | 10 | 0.1 | 60.00 |\n\
         | upweight | 0.05 | 80 | 0.01 | 70.00 |\n\
         | upweight | 0.05 | 80 | 0.1 | **80.00** |"
        ),
        "{md}"
    );
    let svg = std::fs::read_to_string(root.join("acc_vs_density.svg")).unwrap();
    assert!(svg.contains("upweight λ=80 lr=0.1"), "legend label");
}

#[test]
fn single_run_draws_learning_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fake_run(&run, 5.0, 0.05, 1, 0.8, 0.7, 0.1);
    let r = write_report(&run).unwrap();
    assert_eq!(r.kind, ReportKind::SingleRun);
    assert_eq!(
        r.files,
        vec![run.join("curves.png"), run.join("curves.svg")]
    );
    let (w, h, ink, title) = png_stats(&run.join("curves.png"));
    assert!(w >= 1000 && h >= 1000, "{w}x{h}: six panels expected");
    assert!(ink > 0.02 && title > 50, "ink {ink}, title {title}");
    for label in [
        "epoch",
        "Validation accuracy by group",
        "bias-conflicting",
        "Prune rate",
    ] {
        check_svg(&run.join("curves.svg"), label);
    }
    assert!(!run.join("report.md").exists());

    let rows = parse_metrics_csv(&metrics_csv(0.05), Path::new("metrics.csv")).unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[2].epoch, 2.0);
    assert_eq!(rows[2].split, "train");
    assert_eq!(rows[2].values["conflicting"], 0.4);
    assert_eq!(rows[2].values["lr"], 1e-3);
    assert!(!rows[4].values.contains_key("conflicting"), "empty field");
}

#[test]
fn errors_name_the_directory_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let e = format!("{:#}", write_report(&missing).unwrap_err());
    assert!(e.contains("nope") && e.contains("not a directory"), "{e}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    let e = format!("{:#}", write_report(&empty).unwrap_err());
    assert!(e.contains("no summary.json under"), "{e}");

    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(bad.join("r1")).unwrap();
    std::fs::write(bad.join("r1/summary.json"), "not json").unwrap();
    let e = format!("{:#}", write_report(&bad).unwrap_err());
    assert!(e.contains("could be read") && e.contains("r1"), "{e}");

    // A run with a malformed metrics.csv.
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.csv"), "epoch,split,loss\n1,train,abc\n").unwrap();
    let e = format!("{:#}", write_report(&run).unwrap_err());
    assert!(e.contains("metrics.csv line 2") && e.contains("abc"), "{e}");

    // The binary: one-line error, non-zero exit.
    let o = rest_bin()
        .args(["report", empty.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: no summary.json under"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn statistics_and_ticks() {
    let s = stat(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(s.mean, 2.5);
    // Sample variance: (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
    assert!((s.std.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    assert_eq!(s.n, 4);
    assert_eq!(stat(&[7.0]).unwrap().std, None);
    assert!(stat(&[]).is_none());

    assert_eq!(
        linear_ticks(0.0, 10.0, 5),
        vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    );
    assert_eq!(linear_ticks(3.0, 11.0, 4), vec![4.0, 6.0, 8.0, 10.0]);
    let t = log_ticks(0.004, 1.2);
    let want = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];
    assert_eq!(t.len(), want.len(), "{t:?}");
    assert!(
        t.iter().zip(want).all(|(a, b)| (a / b - 1.0).abs() < 1e-9),
        "{t:?}"
    );
    // More than 8 candidates: only powers of ten.
    assert_eq!(log_ticks(0.001, 50.0).len(), 5);
    assert_eq!(tick_label(0.05), "0.05");
    assert_eq!(tick_label(1.0), "1");
    assert_eq!(tick_label(82.5), "82.5");
    assert_eq!(tick_label(2.303), "2.303");
}

/// Runs on table datasets: summary.json's `weighted_accuracy`, all-group `worst_group` and
/// per-group accuracies give a weighted-accuracy table and results.csv columns, beside a DFA run without them; the
/// end-of-run table gains a `weighted` column only for them.
#[test]
fn table_dataset_runs_get_weighted_and_worst_group_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Weighted accuracy 0.70 / 0.74 (seeds 1, 2) at density 1, 0.80 at 0.1; worst group
    // (over all groups) 0.40 / 0.44 and 0.50; a DFA run at density 0.5 has neither.
    for (d, seed, weighted, worst) in [
        (1.0, 1, 0.70, 0.40),
        (1.0, 2, 0.74, 0.44),
        (0.1, 1, 0.80, 0.50),
    ] {
        let dir = root.join(format!("table-d{d}-s{seed}"));
        fake_run(&dir, 5.0, d, seed, 0.9, 0.6, 1.0);
        let p = dir.join("summary.json");
        let mut s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        for split in ["valid", "test"] {
            s[split]["weighted_accuracy"] = json!(weighted);
            s[split]["worst_group"] = json!(worst);
            s[split]["groups"] = json!([
                {"label": 0, "attribute": 0, "n": 90, "accuracy": 0.95, "minority": false},
                {"label": 0, "attribute": 1, "n": 10, "accuracy": worst, "minority": true}
            ]);
        }
        std::fs::write(&p, serde_json::to_string(&s).unwrap()).unwrap();
    }
    fake_run(&root.join("dfa"), 5.0, 0.5, 1, 0.9, 0.6, 1.0);
    write_report(root).unwrap();
    let md = std::fs::read_to_string(root.join("report.md")).unwrap();
    let start = md
        .find("## Weighted test accuracy (%)")
        .expect("weighted table");
    let table = &md[start..];
    let table = &table[..table[3..].find("\n## ").unwrap() + 3];
    assert!(table.contains("training group proportions"), "{table}");
    assert!(table.contains("| upweight | 1 | 72.00 ± 2.83 |"), "{table}");
    assert!(table.contains("| upweight | 0.5 | – |"), "{table}");
    assert!(
        table.contains("| upweight | 0.1 | **80.00** (n=1) |"),
        "{table}"
    );
    let start = md.find("## Worst-group test accuracy").unwrap();
    let worst = &md[start..];
    assert!(worst.contains("| upweight | 1 | 42.00 ± 2.83 |"), "{worst}");
    assert!(
        worst.contains("| upweight | 0.5 | **60.00** (n=1) |"),
        "{worst}"
    );
    assert!(md.contains("lowest over all groups present"), "{md}");
    // results.csv: the weighted columns, empty for the DFA run.
    let (header, rows) = csv_rows(&std::fs::read_to_string(root.join("results.csv")).unwrap());
    let col = header
        .iter()
        .position(|h| h == "test_weighted_accuracy")
        .expect("column");
    assert!(header.iter().any(|h| h == "valid_weighted_accuracy"));
    let dfa = rows.iter().find(|r| r[0] == "dfa").unwrap();
    assert_eq!(dfa[col], "");
    let t = rows.iter().find(|r| r[0] == "table-d0.1-s1").unwrap();
    assert_eq!(t[col], "0.8");
    // Per-group test accuracies, in (label, attribute) order after the metrics.
    let g0 = header
        .iter()
        .position(|h| h == "test_group_0_0")
        .expect("group column");
    assert_eq!(header[g0 + 1], "test_group_0_1");
    assert_eq!(header.len(), g0 + 2);
    assert_eq!((t[g0].as_str(), t[g0 + 1].as_str()), ("0.95", "0.5"));
    assert_eq!((dfa[g0].as_str(), dfa[g0 + 1].as_str()), ("", ""));

    // The end-of-run table: a weighted column for table data only.
    let read = |dir: &str, split: &str| -> rest::train::metrics::GroupMetrics {
        let p = root.join(dir).join("summary.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        serde_json::from_value(v[split].clone()).unwrap()
    };
    let (v, te) = (
        read("table-d0.1-s1", "valid"),
        read("table-d0.1-s1", "test"),
    );
    let t = rest::report::metrics_table(&[("valid", &v), ("test", &te)]);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].contains("| weighted |"), "{t}");
    assert!(lines[3].contains("|    80.00 |"), "{t}");
    assert!(lines[3].contains("|  50.00 |"), "{t}");
    let t = rest::report::metrics_table(&[("test", &read("dfa", "test"))]);
    assert!(!t.contains("weighted"), "{t}");
    assert_eq!(t.lines().next().unwrap().matches('|').count(), 8);
}
