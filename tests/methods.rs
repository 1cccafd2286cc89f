//! Group-robustness methods: GroupDRO's weights against hand computation, JTT's error set and
//! its precision/recall, balanced sampling frequencies, `--select` rules on a synthetic
//! metrics log, and tiny end-to-end runs of jtt, group-dro and balanced.

mod common;

use common::{read_json, rest_bin, sigint_after, tiny_config};
use rest::data::sampler::WeightedSampler;
use rest::data::Split;
use rest::train::methods::{
    error_set, group_ids, jtt_report, load_error_set, sample_weights, save_error_set, GroupDro,
    GroupScheme, Method,
};
use rest::train::metrics::GroupMetrics;
use rest::train::output::MetricsRow;
use rest::train::select::{select_epoch, SelectRule};
use rest::train::TrainConfig;
use rest::util;

// ---------------------------------------------------------------------------------------------
// GroupDRO

#[test]
fn group_dro_weights_follow_hand_computation() {
    // Two groups of training sizes 3 and 1, eta = 0.5, C = 1: adjusted losses add 1/sqrt(3)
    // and 1. Batches: (1, 2), (0.5, absent), (3, 0.25).
    // Step 1: q ~ (0.5 e^{0.5 (1 + 0.57735)}, 0.5 e^{0.5 (2 + 1)}) -> q0 = 1 / (1 + e^{0.711325})
    //         = 0.329306...
    let mut d = GroupDro::new(vec![3, 1], 0.5, 1.0);
    assert_eq!(d.q(), &[0.5, 0.5]);
    let steps = [
        [Some(1.0), Some(2.0)],
        [Some(0.5), None],
        [Some(3.0), Some(0.25)],
    ];
    let by_hand = [
        0.329_306_159_485_387_9,
        0.456_944_463_901_495,
        0.729_290_411_212_303_3,
    ];
    let adj = [1.0 / 3f64.sqrt(), 1.0];
    let mut exponent = [0.0f64; 2];
    for (s, want_q0) in steps.iter().zip(by_hand) {
        d.update(s);
        assert!(
            (d.q()[0] - want_q0).abs() < 1e-12,
            "{:?} vs {want_q0}",
            d.q()
        );
        assert!((d.q()[0] + d.q()[1] - 1.0).abs() < 1e-12);
        // Independently: normalisation does not change ratios, so q_g is the softmax of
        // eta * (sum of the adjusted losses of the batches where g was present).
        for g in 0..2 {
            if let Some(l) = s[g] {
                exponent[g] += 0.5 * (l + adj[g]);
            }
        }
        let z = exponent[0].exp() + exponent[1].exp();
        assert!((d.q()[0] - exponent[0].exp() / z).abs() < 1e-12);
    }
}

#[test]
fn group_dro_batch_weights_give_q_weighted_group_losses() {
    // Batch: group 0 has losses 1 and 3 (mean 2), group 1 has loss 4; eta = 0.1, C = 0.
    let mut d = GroupDro::new(vec![10, 10], 0.1, 0.0);
    let ids = [0, 1, 0];
    let losses = [1.0f32, 4.0, 3.0];
    let w = d.batch_weights(&ids, &losses);
    // q after the update: softmax(0.1 * (2, 4)).
    let q0 = 1.0 / (1.0 + (0.2f64).exp());
    assert!((d.q()[0] - q0).abs() < 1e-12);
    let want = [q0 / 2.0, 1.0 - q0, q0 / 2.0];
    for (a, b) in w.iter().zip(want) {
        assert!((*a as f64 - b).abs() < 1e-6, "{w:?} vs {want:?}");
    }
    // sum_i w_i l_i = q0 * 2 + q1 * 4.
    let total: f64 = w.iter().zip(losses).map(|(w, l)| (*w * l) as f64).sum();
    assert!((total - (q0 * 2.0 + (1.0 - q0) * 4.0)).abs() < 1e-5);
    // Bits round-trip exactly; a wrong group count is an error.
    let mut e = GroupDro::new(vec![10, 10], 0.1, 0.0);
    e.set_q_bits(&d.q_bits()).expect("same group count");
    assert_eq!(e.q(), d.q());
    assert!(e.set_q_bits(&[0]).is_err());
}

// ---------------------------------------------------------------------------------------------
// JTT

#[test]
fn jtt_error_set_precision_and_recall() {
    // 8 samples; wrong predictions at 1, 2, 5, 7; conflicting samples 1, 3, 5.
    let labels = [0, 1, 2, 3, 0, 1, 2, 3];
    let preds = [0, 0, 1, 3, 0, 2, 2, 0];
    let conflicting = [false, true, false, true, false, true, false, false];
    let e = error_set(&preds, &labels);
    assert_eq!(e, vec![1, 2, 5, 7]);
    let r = jtt_report(&e, &conflicting);
    // hits: 1 and 5 -> precision 2/4, recall 2/3.
    assert_eq!((r.size, r.conflicting, r.hits, r.train_size), (4, 3, 2, 8));
    assert_eq!(r.precision, Some(0.5));
    assert!((r.recall.expect("recall") - 2.0 / 3.0).abs() < 1e-12);
    let empty = jtt_report(&[], &conflicting);
    assert_eq!((empty.precision, empty.recall), (None, Some(0.0)));
}

#[test]
fn error_set_file_round_trip_and_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("error_set.json");
    save_error_set(&p, &[3, 1, 9], 10)?;
    assert_eq!(load_error_set(&p, 10)?, vec![1, 3, 9]);
    let wrong_size = format!("{:#}", load_error_set(&p, 12).expect_err("size"));
    assert!(wrong_size.contains("--error-set") && wrong_size.contains("12"));
    std::fs::write(&p, "[0, 4, 11]")?;
    let out_of_range = format!("{:#}", load_error_set(&p, 10).expect_err("range"));
    assert!(out_of_range.contains("index 11"), "{out_of_range}");
    let missing = format!(
        "{:#}",
        load_error_set(&dir.path().join("none.json"), 10).expect_err("missing")
    );
    assert!(missing.contains("none.json"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Balanced sampling

/// A 1x1-pixel split with the given (label, bias, count) cells.
fn cells_split(cells: &[(u32, u32, usize)]) -> Split {
    let (mut labels, mut bias) = (Vec::new(), Vec::new());
    for &(l, b, n) in cells {
        labels.extend(std::iter::repeat_n(l, n));
        bias.extend(std::iter::repeat_n(b, n));
    }
    let n = labels.len();
    Split::new(vec![0; n], labels, bias, 1, 1, 1).expect("valid split")
}

/// Draws `n` samples with `weights` and checks that each group's frequency is within six
/// standard deviations of `1 / groups`.
fn check_equal_frequencies(weights: &[f64], ids: &[usize], groups: usize, n: usize, seed: u64) {
    let s = WeightedSampler::new(weights).expect("valid weights");
    let mut count = vec![0usize; groups];
    for i in s.draw(n, &mut util::rng(seed, 0)) {
        count[ids[i]] += 1;
    }
    let p = 1.0 / groups as f64;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    for (g, c) in count.iter().enumerate() {
        let dev = (*c as f64 - n as f64 * p).abs();
        assert!(
            dev < 6.0 * sd,
            "group {g}: {c} draws of {n}, expected {}",
            n as f64 * p
        );
    }
}

#[test]
fn balanced_sampling_draws_groups_and_classes_equally() -> anyhow::Result<()> {
    let split = cells_split(&[
        (0, 0, 500),
        (1, 1, 300),
        (0, 1, 10),
        (1, 0, 5),
        (2, 2, 100),
        (2, 0, 2),
    ]);
    let n = 60_000;
    let w = sample_weights(Method::Balanced, &split, 1.0, GroupScheme::Cells, None)?
        .expect("balanced has weights");
    let (ids, g) = group_ids(&split.labels, &split.bias, GroupScheme::Cells);
    assert_eq!(g, 6);
    check_equal_frequencies(&w, &ids, g, n, 1);

    let w = sample_weights(
        Method::Balanced,
        &split,
        1.0,
        GroupScheme::AlignedConflict,
        None,
    )?
    .expect("balanced has weights");
    let conflict: Vec<usize> = (0..split.len())
        .map(|i| split.is_conflicting(i) as usize)
        .collect();
    check_equal_frequencies(&w, &conflict, 2, n, 2);

    let w = sample_weights(Method::ClassBalanced, &split, 1.0, GroupScheme::Cells, None)?
        .expect("class-balanced has weights");
    let class: Vec<usize> = split.labels.iter().map(|&l| l as usize).collect();
    check_equal_frequencies(&w, &class, 3, n, 3);

    // Plain up-weighting is far from balanced: the check must be able to fail.
    let w =
        sample_weights(Method::Upweight, &split, 1.0, GroupScheme::Cells, None)?.expect("weights");
    let r = std::panic::catch_unwind(|| check_equal_frequencies(&w, &ids, g, n, 4));
    assert!(
        r.is_err(),
        "uniform sampling passed the balanced-frequency check"
    );
    // JTT up-weights exactly its error set; GroupDRO shuffles.
    let w = sample_weights(
        Method::Jtt,
        &split,
        7.0,
        GroupScheme::Cells,
        Some(&[2, 900]),
    )?
    .expect("jtt has weights");
    assert_eq!((w[2], w[900], w[3]), (7.0, 7.0, 1.0));
    assert!(sample_weights(Method::GroupDro, &split, 1.0, GroupScheme::Cells, None)?.is_none());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Model selection

fn metrics(accuracy: f64, worst_group: f64, unbiased: f64) -> GroupMetrics {
    GroupMetrics {
        n: 100,
        n_conflicting: 5,
        loss: 1.0,
        accuracy,
        aligned: None,
        conflicting: None,
        worst_group,
        worst_cell: worst_group,
        unbiased,
        groups: None,
        weighted_accuracy: None,
    }
}

fn row(epoch: usize, split: &str, m: GroupMetrics) -> MetricsRow {
    MetricsRow {
        epoch,
        split: split.into(),
        m,
        lr: 0.01,
        density: 0.05,
        prune_rate: 0.1,
    }
}

#[test]
fn select_rules_pick_their_epoch_from_a_metrics_log() {
    // Validation: accuracy best at epoch 1, worst-group at 2, unbiased at 3 (with a tie at 5
    // that must keep 3); the train rows are better everywhere and must be ignored.
    let valid = [
        metrics(0.95, 0.10, 0.50),
        metrics(0.90, 0.60, 0.70),
        metrics(0.85, 0.50, 0.80),
        metrics(0.80, 0.40, 0.60),
        metrics(0.70, 0.30, 0.80),
    ];
    let mut rows = Vec::new();
    for (e, v) in valid.iter().enumerate() {
        rows.push(row(e + 1, "train", metrics(0.99, 0.99, 0.99)));
        rows.push(row(e + 1, "valid", v.clone()));
    }
    rows.push(row(1, "test", metrics(1.0, 1.0, 1.0)));
    assert_eq!(select_epoch(SelectRule::ValAccuracy, &rows), Some(1));
    assert_eq!(select_epoch(SelectRule::ValWorstGroup, &rows), Some(2));
    assert_eq!(select_epoch(SelectRule::ValUnbiased, &rows), Some(3));
    assert_eq!(select_epoch(SelectRule::Last, &rows), Some(5));
    assert_eq!(select_epoch(SelectRule::Last, &[]), None);
}

#[test]
fn default_select_rule_follows_the_method() {
    let cfg = |method, upweight, select| {
        let mut c = TrainConfig::default();
        c.method.kind = method;
        c.method.upweight = upweight;
        c.method.select = select;
        c
    };
    for (c, want) in [
        (cfg(Method::Upweight, None, None), SelectRule::ValWorstGroup),
        (
            cfg(Method::Upweight, Some(1.0), None),
            SelectRule::ValAccuracy,
        ),
        (cfg(Method::Erm, Some(50.0), None), SelectRule::ValAccuracy),
        (cfg(Method::Jtt, None, None), SelectRule::ValAccuracy),
        (cfg(Method::GroupDro, None, None), SelectRule::ValWorstGroup),
        (cfg(Method::Balanced, None, None), SelectRule::ValWorstGroup),
        (
            cfg(Method::ClassBalanced, None, None),
            SelectRule::ValWorstGroup,
        ),
        (
            cfg(Method::Jtt, None, Some(SelectRule::Last)),
            SelectRule::Last,
        ),
    ] {
        assert_eq!(c.select_rule().0, want, "{:?}", c.method.kind);
    }
    // LAMBDA only applies to upweight and jtt.
    assert_eq!(cfg(Method::Erm, Some(50.0), None).effective_upweight(), 1.0);
    assert_eq!(
        cfg(Method::Jtt, Some(50.0), None).effective_upweight(),
        50.0
    );
}

// ---------------------------------------------------------------------------------------------
// End to end

fn tiny(out: &std::path::Path, method: Method) -> TrainConfig {
    let mut c = tiny_config(out);
    c.method.kind = method;
    c.sparse.density = 0.1;
    c.optim.epochs = 2;
    c.method.jtt_epochs = 1;
    c.data.train_size = 600;
    c.data.test_size = 200;
    c
}

fn summary(dir: &std::path::Path) -> serde_json::Value {
    read_json(&dir.join("summary.json"))
}

#[test]
fn tiny_jtt_run_writes_both_stages_and_a_correct_report() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(dir.path(), Method::Jtt);
    let out = rest::train::train(&cfg)?;
    for f in [
        "summary.json",
        "metrics.csv",
        "best.safetensors",
        "error_set.json",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let s1 = dir.path().join("stage1");
    let s1_summary = summary(&s1);
    assert_eq!(s1_summary["method"], "erm");
    assert_eq!(s1_summary["select_rule"], "last");
    assert_eq!(s1_summary["selected_epoch"], 1);
    let s = summary(dir.path());
    assert_eq!(s["method"], "jtt");
    assert_eq!(s["select_rule"], "val-accuracy");
    assert_eq!(s["epochs"], 2);

    // The report agrees with the saved error set and the dataset's true conflicting set.
    let ds = rest::data::load(&cfg.data.plan().source)?;
    let e = load_error_set(&dir.path().join("error_set.json"), ds.train.len())?;
    let hits = e.iter().filter(|&&i| ds.train.is_conflicting(i)).count();
    let jtt = out.summary.jtt.as_ref().expect("jtt report");
    assert_eq!(jtt.size, e.len());
    assert_eq!(jtt.hits, hits);
    assert_eq!(jtt.conflicting, ds.train.conflicting_count());
    assert_eq!(jtt.stage1_epochs, Some(1));
    assert_eq!(s["jtt"]["size"], e.len());
    if !e.is_empty() {
        let p = s["jtt"]["precision"].as_f64().expect("precision");
        assert!((p - hits as f64 / e.len() as f64).abs() < 1e-12);
    }

    // --error-set reuses the set: no stage 1, same report.
    let dir2 = tempfile::tempdir()?;
    let mut cfg2 = cfg.clone();
    cfg2.method.error_set = Some(dir.path().join("error_set.json"));
    cfg2.run.out = Some(dir2.path().to_path_buf());
    let out2 = rest::train::train(&cfg2)?;
    assert!(!dir2.path().join("stage1").exists());
    let jtt2 = out2.summary.jtt.as_ref().expect("jtt report");
    assert_eq!(
        (jtt2.size, jtt2.hits, jtt2.stage1_epochs),
        (jtt.size, jtt.hits, None)
    );
    // Same error set, same seed: stage 2 is the same run.
    assert_eq!(out2.summary.test, out.summary.test);
    // The first run's training FLOPs are stage 1's plus this same stage 2's.
    for key in ["train_flops", "train_flops_dense"] {
        let both = s[key].as_f64().expect(key);
        let stage1 = s1_summary[key].as_f64().expect(key);
        let stage2 = summary(dir2.path())[key].as_f64().expect(key);
        assert!(stage1 > 0.0 && stage2 > 0.0);
        assert!(
            (both - (stage1 + stage2)).abs() <= 1e-9 * both,
            "{key}: {both} vs {stage1} + {stage2}"
        );
    }
    let ratio = s["train_flops_vs_dense"].as_f64().expect("ratio");
    let want = s["train_flops"].as_f64().expect("f") / s["train_flops_dense"].as_f64().expect("fd");
    assert!((ratio - want).abs() < 1e-12);
    assert_eq!(
        out.summary.train_flops,
        s["train_flops"].as_f64().expect("f")
    );
    Ok(())
}

#[test]
fn tiny_group_dro_run_writes_group_weights() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(dir.path(), Method::GroupDro);
    let out = rest::train::train(&cfg)?;
    let s = summary(dir.path());
    assert_eq!(s["method"], "group-dro");
    assert_eq!(s["select_rule"], "val-worst-group");
    let ds = rest::data::load(&cfg.data.plan().source)?;
    let (_, g) = group_ids(&ds.train.labels, &ds.train.bias, GroupScheme::Cells);
    let q = out.summary.dro_q.as_ref().expect("dro_q");
    assert_eq!(q.len(), g);
    assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    // q moved away from uniform towards some groups.
    assert!(q.iter().any(|&v| (v - 1.0 / g as f64).abs() > 1e-6));
    assert_eq!(s["dro_q"].as_array().map(|a| a.len()), Some(g));
    Ok(())
}

#[test]
fn tiny_balanced_runs_complete() -> anyhow::Result<()> {
    for method in [Method::Balanced, Method::ClassBalanced] {
        let dir = tempfile::tempdir()?;
        let out = rest::train::train(&tiny(dir.path(), method))?;
        let s = summary(dir.path());
        assert_eq!(s["method"], method.as_str());
        assert_eq!(s["select_rule"], "val-worst-group");
        assert_eq!(s["upweight"], 1.0);
        assert!(dir.path().join("best.safetensors").exists());
        assert!((1..=2).contains(&out.summary.selected_epoch));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Exact resume

/// Runs `rest train` with `args` to the end in `out`.
fn run_to_end(args: &[&str], out: &std::path::Path) {
    let o = rest_bin()
        .args(["train", "--out", out.to_str().expect("utf-8 path")])
        .args(args)
        .output()
        .expect("rest runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Starts `rest train` in `out`, sends SIGINT shortly after `marker` (relative to `out`)
/// appears, then resumes the run if it was interrupted.
fn run_interrupted(args: &[&str], out: &std::path::Path, marker: &str) {
    let child = rest_bin()
        .args(["train", "--out", out.to_str().expect("utf-8 path")])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("rest starts");
    let ms = std::time::Duration::from_millis;
    let _ = sigint_after(&child, &out.join(marker), ms(20), ms(200));
    let o = child.wait_with_output().expect("rest ends");
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        // The hint names the run directory, also when stage 1 of JTT was interrupted.
        assert!(
            err.contains(&format!("--resume {}", out.display())),
            "{err}"
        );
        let o = rest_bin()
            .args(["train", "--resume", out.to_str().expect("utf-8 path")])
            .output()
            .expect("rest resumes");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

fn outcome(dir: &std::path::Path) -> (serde_json::Value, String) {
    let s = summary(dir);
    (
        serde_json::json!({"test": s["test"], "valid": s["valid"], "epoch": s["selected_epoch"],
                           "jtt": s["jtt"], "dro_q": s["dro_q"], "flops": s["train_flops"]}),
        std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics.csv"),
    )
}

#[test]
fn interrupted_group_dro_and_jtt_runs_resume_exactly() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let base = [
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--density",
        "0.1",
        "--threads",
        "1",
        "--jtt-epochs",
        "2",
    ];
    let cfg = tmp.path().join("sizes.toml");
    std::fs::write(
        &cfg,
        "train_size = 1500\nvalid_size = 200\ntest_size = 200\n",
    )
    .expect("write config");
    let mut common: Vec<&str> = base.to_vec();
    common.extend(["--config", cfg.to_str().expect("utf-8 path")]);
    for (method, marker) in [
        ("group-dro", "checkpoint.json"),
        ("jtt", "stage1/checkpoint.json"),
        ("jtt", "checkpoint.json"),
    ] {
        let mut args = common.clone();
        args.extend(["--method", method]);
        let full = tmp.path().join(format!("full-{method}"));
        if !full.exists() {
            run_to_end(&args, &full);
        }
        let cut = tmp.path().join(format!("cut-{method}-{}", marker.len()));
        run_interrupted(&args, &cut, marker);
        assert_eq!(
            outcome(&full),
            outcome(&cut),
            "{method}, cut after {marker}"
        );
    }
}
