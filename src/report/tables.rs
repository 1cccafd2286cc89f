//! Aggregation over seeds and the markdown tables of `report.md`: runs grouped by every
//! varying config key except the seed, rows = method x density (x other varying keys),
//! columns = conflicting ratio, cells = mean +- sample std with the best cell per column
//! in bold.

use super::collect::{cmp_values, Collection, Run};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Mean, sample standard deviation (n - 1 in the denominator; `None` for one value) and count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: Option<f64>,
    pub n: usize,
}

/// The statistics of `xs`; `None` when empty.
pub fn stat(xs: &[f64]) -> Option<Stat> {
    let n = xs.len();
    if n == 0 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let std = (n > 1)
        .then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    Some(Stat { mean, std, n })
}

/// The key that makes the table columns.
pub const COLUMN_KEY: &str = "conflict_pct";

/// Runs arranged as a table: one row per configuration (seeds pooled), one column per
/// conflicting ratio.
#[derive(Debug, Clone)]
pub struct Grid<'a> {
    /// Keys naming a row: `method`, `density`, then the other varying keys.
    pub row_keys: Vec<String>,
    /// Each row's values of `row_keys`.
    pub rows: Vec<Vec<String>>,
    /// Column values (conflicting ratios, ascending); one empty column when no run has one.
    pub cols: Vec<String>,
    /// `cells[row][col]`: the runs (one per seed) of that configuration.
    pub cells: Vec<Vec<Vec<&'a Run>>>,
    /// Distinct seeds in the collection.
    pub seeds: usize,
}

impl<'a> Grid<'a> {
    pub fn new(c: &'a Collection) -> Self {
        let varying = c.varying_keys();
        let mut row_keys: Vec<String> = vec!["method".into(), "density".into()];
        row_keys.extend(
            varying
                .into_iter()
                .filter(|k| !["method", "density", "seed", COLUMN_KEY].contains(&k.as_str())),
        );
        let val = |r: &Run, k: &str| r.config.get(k).cloned().unwrap_or_default();
        let cmp_rows = |a: &Vec<String>, b: &Vec<String>| {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                // Dense first: density descending.
                let o = if row_keys[i] == "density" {
                    cmp_values(y, x)
                } else {
                    cmp_values(x, y)
                };
                if o.is_ne() {
                    return o;
                }
            }
            std::cmp::Ordering::Equal
        };
        let mut rows: Vec<Vec<String>> = Vec::new();
        for r in &c.runs {
            let key: Vec<String> = row_keys.iter().map(|k| val(r, k)).collect();
            if !rows.contains(&key) {
                rows.push(key);
            }
        }
        rows.sort_by(cmp_rows);
        let mut cols: Vec<String> = c
            .runs
            .iter()
            .map(|r| val(r, COLUMN_KEY))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        cols.sort_by(|a, b| cmp_values(a, b));
        let mut cells = vec![vec![Vec::new(); cols.len()]; rows.len()];
        for r in &c.runs {
            let key: Vec<String> = row_keys.iter().map(|k| val(r, k)).collect();
            let i = rows.iter().position(|x| *x == key).unwrap_or(0);
            let j = cols
                .iter()
                .position(|x| *x == val(r, COLUMN_KEY))
                .unwrap_or(0);
            cells[i][j].push(r);
        }
        let seeds = c
            .runs
            .iter()
            .map(|r| r.config.get("seed"))
            .collect::<BTreeSet<_>>()
            .len();
        Grid {
            row_keys,
            rows,
            cols,
            cells,
            seeds,
        }
    }

    /// Statistics of `metric` (scaled by `scale`) over the runs of a cell that report it.
    pub fn stat(&self, row: usize, col: usize, metric: &str, scale: f64) -> Option<Stat> {
        let xs: Vec<f64> = self.cells[row][col]
            .iter()
            .filter_map(|r| r.metric(metric))
            .map(|x| x * scale)
            .collect();
        stat(&xs)
    }

    /// A row's label: its values, `key=value` for keys other than method and density.
    pub fn row_label(&self, row: usize) -> String {
        let mut parts = Vec::new();
        for (k, v) in self.row_keys.iter().zip(&self.rows[row]) {
            match k.as_str() {
                "method" => parts.push(v.clone()),
                "density" => parts.push(format!("d={v}")),
                "upweight" => parts.push(format!("λ={v}")),
                _ => parts.push(format!("{k}={v}")),
            }
        }
        parts.join(" ")
    }
}

/// Which way is better for a table's metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One table of `report.md`.
#[derive(Debug, Clone, Copy)]
pub struct TableSpec {
    pub title: &'static str,
    pub metric: &'static str,
    pub scale: f64,
    pub decimals: usize,
    pub better: Better,
    /// Shown only when a run has the metric (table datasets' metrics).
    pub optional: bool,
}

/// The tables of `report.md`, in order.
pub const TABLES: &[TableSpec] = &[
    TableSpec {
        title: "Unbiased test accuracy (%)",
        metric: "test_unbiased",
        scale: 100.0,
        decimals: 2,
        better: Better::Higher,
        optional: false,
    },
    TableSpec {
        title: "Bias-conflicting test accuracy (%)",
        metric: "test_conflicting",
        scale: 100.0,
        decimals: 2,
        better: Better::Higher,
        optional: false,
    },
    TableSpec {
        title: "Worst-group test accuracy (%)",
        metric: "test_worst_group",
        scale: 100.0,
        decimals: 2,
        better: Better::Higher,
        optional: false,
    },
    TableSpec {
        title: "Weighted test accuracy (%): group accuracies weighted by the training group proportions",
        metric: "test_weighted_accuracy",
        scale: 100.0,
        decimals: 2,
        better: Better::Higher,
        optional: true,
    },
    TableSpec {
        title: "Training FLOPs (fraction of dense training)",
        metric: "train_flops_vs_dense",
        scale: 1.0,
        decimals: 4,
        better: Better::Lower,
        optional: false,
    },
    TableSpec {
        title: "Inference FLOPs (fraction of the dense net)",
        metric: "infer_flops_vs_dense",
        scale: 1.0,
        decimals: 4,
        better: Better::Lower,
        optional: false,
    },
    TableSpec {
        title: "Wall time (s)",
        metric: "wall_time_s",
        scale: 1.0,
        decimals: 1,
        better: Better::Lower,
        optional: false,
    },
];

/// The column header of a conflicting ratio.
pub fn col_label(v: &str) -> String {
    if v.is_empty() {
        "all runs".into()
    } else {
        format!("{v} %")
    }
}

/// One markdown table: header row, alignment row, one row per configuration. The best
/// mean of each column (as displayed) is bold, ties included.
pub fn markdown_table(g: &Grid, spec: &TableSpec) -> String {
    let d = spec.decimals;
    let stats: Vec<Vec<Option<Stat>>> = (0..g.rows.len())
        .map(|i| {
            (0..g.cols.len())
                .map(|j| g.stat(i, j, spec.metric, spec.scale))
                .collect()
        })
        .collect();
    // Compare the displayed (rounded) means, so that ties as shown are all marked.
    let shown = |x: f64| format!("{x:.d$}").parse::<f64>().unwrap_or(x);
    let best: Vec<Option<f64>> = (0..g.cols.len())
        .map(|j| {
            let means = stats.iter().filter_map(|r| r[j]).map(|s| shown(s.mean));
            match spec.better {
                Better::Higher => means.reduce(f64::max),
                Better::Lower => means.reduce(f64::min),
            }
        })
        .collect();
    let mut t = String::from("|");
    for k in &g.row_keys {
        let _ = write!(t, " {} |", if k == "upweight" { "λ" } else { k });
    }
    for c in &g.cols {
        let _ = write!(t, " {} |", col_label(c));
    }
    t.push_str("\n|");
    for _ in &g.row_keys {
        t.push_str("---|");
    }
    for _ in &g.cols {
        t.push_str("---:|");
    }
    for (i, row) in g.rows.iter().enumerate() {
        t.push_str("\n|");
        for v in row {
            let _ = write!(t, " {v} |");
        }
        for j in 0..g.cols.len() {
            let cell = match stats[i][j] {
                None => "–".to_string(),
                Some(s) => {
                    let mut c = match s.std {
                        Some(sd) => format!("{:.d$} ± {sd:.d$}", s.mean),
                        None => format!("{:.d$}", s.mean),
                    };
                    // A lone value in its column is not marked as "best".
                    let filled = stats.iter().filter(|r| r[j].is_some()).count();
                    if filled > 1 && best[j] == Some(shown(s.mean)) {
                        c = format!("**{c}**");
                    }
                    if s.n < g.seeds {
                        let _ = write!(c, " (n={})", s.n);
                    }
                    c
                }
            };
            let _ = write!(t, " {cell} |");
        }
    }
    t.push('\n');
    t
}
