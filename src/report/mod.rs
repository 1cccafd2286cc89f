//! Reports: the results table printed at the end of a run, the `rest flops` table, and
//! `rest report DIR` ([`write_report`]): for a directory of runs, `results.csv`, `report.md`
//! (mean +- std tables over seeds) and accuracy plots; for one run, its learning curves.
//!
//! - [`collect`]: finding and reading runs, `results.csv`;
//! - [`tables`]: grouping over seeds, statistics, the markdown tables;
//! - [`plots`]: the figure renderer (PNG + SVG, built-in font) and the collection plots;
//! - [`curves`]: a single run's learning curves.

pub mod collect;
pub mod curves;
pub mod plots;
pub mod tables;

use crate::train::metrics::GroupMetrics;
use crate::train::Summary;
use anyhow::Result;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What `rest report` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportKind {
    /// A directory of runs: tables, `results.csv`, accuracy plots.
    Collection,
    /// One run directory: its learning curves.
    SingleRun,
}

/// The outcome of [`write_report`].
#[derive(Debug, Clone)]
pub struct ReportSummary {
    pub kind: ReportKind,
    /// Runs read (1 for a single run).
    pub runs: usize,
    /// `summary.json` files that could not be read (relative to the directory), and why.
    pub skipped: Vec<collect::Skipped>,
    /// Run directories below DIR without `summary.json` (unfinished or failed runs).
    pub unfinished: Vec<PathBuf>,
    /// Files written.
    pub files: Vec<PathBuf>,
}

/// `rest report DIR`: when DIR is itself a run (it has `summary.json` or `metrics.csv`), draws
/// its learning curves (`curves.png`, `curves.svg`); otherwise collects every run below it and
/// writes `results.csv`, `report.md`, `acc_vs_density.png/.svg` and `acc_vs_flops.png/.svg`
/// into DIR. Every file is written atomically.
pub fn write_report(dir: &Path) -> Result<ReportSummary> {
    if !dir.is_dir() {
        anyhow::bail!(
            "{} is not a directory: give a run directory or a directory of runs (e.g. a sweep's --out)",
            dir.display()
        );
    }
    if dir.join("summary.json").is_file() || dir.join("metrics.csv").is_file() {
        let files = curves::write_curves(dir)?;
        return Ok(ReportSummary {
            kind: ReportKind::SingleRun,
            runs: 1,
            skipped: Vec::new(),
            unfinished: Vec::new(),
            files,
        });
    }
    let c = collect::collect(dir)?;
    let g = tables::Grid::new(&c);
    let mut files = Vec::new();
    let csv = dir.join("results.csv");
    crate::util::write_atomic(&csv, c.results_csv().as_bytes())?;
    files.push(csv);
    files.extend(plots::write_figure(
        &plots::accuracy_figure(&g, plots::XAxis::Density),
        dir,
        "acc_vs_density",
    )?);
    files.extend(plots::write_figure(
        &plots::accuracy_figure(&g, plots::XAxis::TrainFlops),
        dir,
        "acc_vs_flops",
    )?);
    let md = dir.join("report.md");
    crate::util::write_atomic(&md, report_markdown(&c, &g).as_bytes())?;
    files.push(md);
    Ok(ReportSummary {
        kind: ReportKind::Collection,
        runs: c.runs.len(),
        skipped: c.skipped,
        unfinished: c.unfinished,
        files,
    })
}

/// The text of `report.md`.
pub fn report_markdown(c: &collect::Collection, g: &tables::Grid) -> String {
    let mut s = String::new();
    let name = c
        .root
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| c.root.display().to_string());
    let _ = writeln!(s, "# Results: {name}\n");
    let _ = writeln!(
        s,
        "{} runs: {} configurations x {} seed{}, {} conflicting ratio{}.{}{}\n",
        c.runs.len(),
        g.rows.len(),
        g.seeds,
        if g.seeds == 1 { "" } else { "s" },
        g.cols.len(),
        if g.cols.len() == 1 { "" } else { "s" },
        if c.skipped.is_empty() {
            String::new()
        } else {
            format!(
                " **{} summary.json file{} could not be read and {} left out** (listed at the end).",
                c.skipped.len(),
                if c.skipped.len() == 1 { "" } else { "s" },
                if c.skipped.len() == 1 { "is" } else { "are" }
            )
        },
        if c.unfinished.is_empty() {
            String::new()
        } else {
            format!(
                " {} run director{} without summary.json (unfinished or failed): {}.",
                c.unfinished.len(),
                if c.unfinished.len() == 1 { "y" } else { "ies" },
                c.unfinished
                    .iter()
                    .take(10)
                    .map(|p| format!("`{}`", p.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if c.unfinished.len() > 10 { ", ..." } else { "" }
            )
        }
    );
    let _ = writeln!(
        s,
        "Rows: configurations (λ = LAMBDA, `paired` = paired with the ratio as in the paper); \
         columns: percentage of bias-conflicting training samples. Cells: mean ± sample standard \
         deviation over seeds; `(n=k)`: only k of the {} seeds; **bold**: best in its column \
         (highest accuracy, lowest cost). Test metrics are of the epoch selected on validation.\n",
        g.seeds
    );
    if c.has_metric("test_weighted_accuracy") {
        let _ = writeln!(
            s,
            "Runs on table datasets (a metadata CSV) have (label, attribute) groups: their \
             worst-group accuracy is the lowest over all groups present, their weighted accuracy \
             the mean of the group accuracies weighted by each group's share of the training \
             split. Runs on DFA data have neither table's groups: their worst group is the lower \
             of aligned and conflicting, and no weighted accuracy.\n"
        );
    }
    for spec in tables::TABLES {
        if spec.optional && !c.has_metric(spec.metric) {
            continue;
        }
        let _ = writeln!(s, "## {}\n", spec.title);
        let _ = writeln!(s, "{}", tables::markdown_table(g, spec));
    }
    let _ = writeln!(s, "## Plots\n");
    let _ = writeln!(
        s,
        "![Unbiased test accuracy vs. density](acc_vs_density.png)\n\n\
         Dashed lines: dense runs (density 1); shaded: ± std over seeds. \
         [SVG](acc_vs_density.svg)\n"
    );
    let _ = writeln!(
        s,
        "![Unbiased test accuracy vs. training FLOPs](acc_vs_flops.png)\n\n\
         Error bars: ± std over seeds. [SVG](acc_vs_flops.svg)\n"
    );
    let varying = c.varying_keys();
    let shared: Vec<(String, String)> = c
        .keys()
        .into_iter()
        .filter(|k| !varying.contains(k))
        .filter_map(|k| c.runs[0].config.get(&k).map(|v| (k, v.clone())))
        .collect();
    if !shared.is_empty() {
        let _ = writeln!(s, "## Settings shared by all runs\n");
        let _ = writeln!(s, "<details><summary>{} keys</summary>\n", shared.len());
        let _ = writeln!(s, "| key | value |\n|---|---|");
        for (k, v) in shared {
            let _ = writeln!(s, "| {k} | {} |", v.replace('|', "\\|"));
        }
        let _ = writeln!(s, "\n</details>\n");
    }
    let _ = writeln!(
        s,
        "Every run, with every config key and metric: [results.csv](results.csv).\n"
    );
    if !c.skipped.is_empty() {
        let _ = writeln!(s, "## Skipped\n");
        for k in &c.skipped {
            let _ = writeln!(
                s,
                "- `{}`: {}",
                k.path.display(),
                k.reason.replace('\n', " ")
            );
        }
    }
    s
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:6.2}", 100.0 * v))
        .unwrap_or_else(|| "     -".into())
}

/// The group-metrics table (accuracies in %, then the mean loss) for named splits; a
/// `weighted` column (the accuracy weighted by the training group proportions) when a split
/// has one (table datasets).
pub fn metrics_table(rows: &[(&str, &GroupMetrics)]) -> String {
    let weighted = rows.iter().any(|(_, m)| m.weighted_accuracy.is_some());
    let mut t = String::from("| split |  acc % | align. | confl. | worst  | unbiased |");
    if weighted {
        t.push_str(" weighted |");
    }
    t.push_str("  loss  |\n|-------|--------|--------|--------|--------|----------|");
    if weighted {
        t.push_str("----------|");
    }
    t.push_str("--------|");
    for (name, m) in rows {
        let _ = write!(
            t,
            "\n| {name:<5} | {} | {} | {} | {} |   {} |",
            pct(Some(m.accuracy)),
            pct(m.aligned),
            pct(m.conflicting),
            pct(Some(m.worst_group)),
            pct(Some(m.unbiased)),
        );
        if weighted {
            let _ = write!(t, "   {} |", pct(m.weighted_accuracy));
        }
        let _ = write!(t, " {:.4} |", m.loss);
    }
    t
}

/// The FLOPs table of a freshly initialised `model` with ERK masks at `density`.
pub fn flops_for(
    model: crate::models::ModelKind,
    density: f64,
    erk_power_scale: f64,
    input: (usize, usize, usize),
    classes: usize,
) -> anyhow::Result<crate::sparse::flops::FlopsTable> {
    use crate::sparse::{LayerShape, SparseConfig, SparseEngine};
    let dev = candle_core::Device::Cpu;
    let mut rng = crate::util::rng(0, 1);
    let m = crate::models::build(model, input, classes, &mut rng, &dev)?;
    let shapes: Vec<LayerShape> = m
        .weights()
        .iter()
        .map(|p| LayerShape::new(p.name.clone(), p.var.dims()))
        .collect();
    let cfg = SparseConfig {
        density,
        prune_rate: 0.5,
        final_prune_rate: 0.005,
        update_frequency: 1,
        total_steps: 10,
        erk_power_scale,
    };
    let engine = SparseEngine::new(shapes, cfg, &mut crate::util::rng(0, 2))?;
    Ok(crate::train::masked::flops_table(
        m.as_ref(),
        input,
        Some(&engine),
    ))
}

/// The short results table printed at the end of `rest train` (accuracies in %).
pub fn results_table(s: &Summary) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\n{} | {} | density {} | lambda {} | selected epoch {} ({:?}) | {:.0} s",
        s.dataset,
        s.model,
        crate::util::fmt_num(s.final_density),
        crate::util::fmt_num(s.upweight),
        s.selected_epoch,
        s.select_rule,
        s.wall_time_s
    );
    let _ = writeln!(
        t,
        "{}",
        metrics_table(&[("valid", &s.valid), ("test", &s.test)])
    );
    let _ = write!(
        t,
        "FLOPs: training {} ({:.3} of dense), inference {} per image ({:.3} of dense)",
        crate::sparse::flops::fmt_flops(s.train_flops),
        s.train_flops_vs_dense,
        crate::sparse::flops::fmt_flops(s.infer_flops),
        s.infer_flops_vs_dense
    );
    t
}
