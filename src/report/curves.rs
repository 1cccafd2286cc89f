//! Learning curves of one run from its `metrics.csv`: loss, learning rate, accuracy per group
//! for the training and validation splits (test at the selected epoch), density and prune
//! rate, per epoch.

use super::plots::{Figure, Panel, Pt, Series, Style};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// One row of `metrics.csv`: epoch, split and every numeric column by header name (an
/// empty field, e.g. a group without samples, is absent).
#[derive(Debug, Clone, PartialEq)]
pub struct CurveRow {
    pub epoch: f64,
    pub split: String,
    pub values: BTreeMap<String, f64>,
}

/// Parses `metrics.csv` by its header (columns may come in any order; unknown ones are kept).
pub fn parse_metrics_csv(text: &str, path: &Path) -> Result<Vec<CurveRow>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .with_context(|| format!("{} is empty", path.display()))?
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(ie), Some(is)) = (col("epoch"), col("split")) else {
        bail!(
            "{} has no epoch/split columns: not a metrics.csv written by `rest train`",
            path.display()
        );
    };
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != header.len() {
            bail!(
                "{} line {}: {} fields, the header has {}",
                path.display(),
                n + 2,
                f.len(),
                header.len()
            );
        }
        let epoch: f64 = f[ie].parse().with_context(|| {
            format!(
                "{} line {}: epoch {:?} is not a number",
                path.display(),
                n + 2,
                f[ie]
            )
        })?;
        let mut values = BTreeMap::new();
        for (i, h) in header.iter().enumerate() {
            if i == ie || i == is || f[i].is_empty() {
                continue;
            }
            let v: f64 = f[i].parse().with_context(|| {
                format!(
                    "{} line {}: {h} {:?} is not a number",
                    path.display(),
                    n + 2,
                    f[i]
                )
            })?;
            values.insert(h.to_string(), v);
        }
        rows.push(CurveRow {
            epoch,
            split: f[is].to_string(),
            values,
        });
    }
    if rows.is_empty() {
        bail!("{} has a header but no rows", path.display());
    }
    Ok(rows)
}

fn points(rows: &[CurveRow], split: &str, key: &str, scale: f64) -> Vec<Pt> {
    rows.iter()
        .filter(|r| r.split == split)
        .filter_map(|r| {
            r.values.get(key).map(|v| Pt {
                x: r.epoch,
                y: v * scale,
                err: None,
            })
        })
        .collect()
}

const GROUPS: [(&str, &str); 5] = [
    ("accuracy", "overall"),
    ("aligned", "bias-aligned"),
    ("conflicting", "bias-conflicting"),
    ("worst_group", "worst group"),
    ("unbiased", "unbiased"),
];

/// The learning-curves figure of a run titled `name`.
pub fn curves_figure(rows: &[CurveRow], name: &str) -> Figure {
    let line = |label: &str, color: usize, pts: Vec<Pt>| Series {
        label: label.into(),
        color,
        style: Style::Line,
        points: pts,
        notes: Vec::new(),
    };
    let panel = |title: &str, y: &str, y_log: bool, series: Vec<Series>| Panel {
        title: title.into(),
        x_label: "epoch".into(),
        y_label: y.into(),
        x_log: false,
        y_log,
        x_ticks: None,
        series: series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect(),
    };
    let acc = |split: &str, with_test: bool| {
        let mut s: Vec<Series> = GROUPS
            .iter()
            .enumerate()
            .map(|(c, (k, l))| line(l, c, points(rows, split, k, 100.0)))
            .collect();
        if with_test {
            for (c, (k, _)) in GROUPS.iter().enumerate() {
                s.push(Series {
                    label: String::new(),
                    color: c,
                    style: Style::Markers,
                    points: points(rows, "test", k, 100.0),
                    notes: Vec::new(),
                });
            }
        }
        s
    };
    // Learning rate, density and prune rate are the same in every split of an epoch.
    let per_epoch = |key: &str| {
        let split = if rows.iter().any(|r| r.split == "train") {
            "train"
        } else {
            "valid"
        };
        points(rows, split, key, 1.0)
    };
    let mut panels = vec![
        panel(
            "Loss",
            "cross-entropy loss",
            false,
            vec![
                line("train", 0, points(rows, "train", "loss", 1.0)),
                line("valid", 1, points(rows, "valid", "loss", 1.0)),
            ],
        ),
        panel(
            "Learning rate",
            "learning rate (log scale)",
            true,
            vec![line("learning rate", 2, per_epoch("lr"))],
        ),
        panel(
            "Training accuracy by group (running, %)",
            "accuracy (%)",
            false,
            acc("train", false),
        ),
        panel(
            "Validation accuracy by group (%)",
            "accuracy (%)",
            false,
            acc("valid", true),
        ),
        panel(
            "Density",
            "fraction of weights kept",
            false,
            vec![line("density", 4, per_epoch("density"))],
        ),
        panel(
            "Prune rate",
            "prune/regrow fraction",
            false,
            vec![line("prune rate", 5, per_epoch("prune_rate"))],
        ),
    ];
    // A legend-only entry for the test markers (added after the filter of empty series).
    for p in &mut panels {
        if p.title.starts_with("Validation") && rows.iter().any(|r| r.split == "test") {
            p.series.push(Series {
                label: "test, selected epoch".into(),
                color: 7,
                style: Style::Markers,
                points: Vec::new(),
                notes: Vec::new(),
            });
        }
    }
    Figure {
        title: format!("Learning curves: {name}"),
        columns: 2,
        panel_size: (720, 420),
        panels,
    }
}

/// Reads `<run>/metrics.csv` and writes `<run>/curves.png` and `<run>/curves.svg`.
pub fn write_curves(run: &Path) -> Result<Vec<std::path::PathBuf>> {
    let path = run.join("metrics.csv");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (learning curves need it)", path.display()))?;
    let rows = parse_metrics_csv(&text, &path)?;
    let name = run
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| run.display().to_string());
    super::plots::write_figure(&curves_figure(&rows, &name), run, "curves")
}
