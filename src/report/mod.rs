//! Reports: the results table printed at the end of a run (sweeps, tables and plots across
//! runs come with the sweeps issue).

use crate::train::metrics::GroupMetrics;
use crate::train::trainer::Summary;
use std::fmt::Write as _;

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:6.2}", 100.0 * v))
        .unwrap_or_else(|| "     -".into())
}

/// The group-metrics table (accuracies in %, then the mean loss) for named splits.
pub fn metrics_table(rows: &[(&str, &GroupMetrics)]) -> String {
    let mut t = String::from(
        "| split |  acc % | align. | confl. | worst  | unbiased |  loss  |\n\
         |-------|--------|--------|--------|--------|----------|--------|",
    );
    for (name, m) in rows {
        let _ = write!(
            t,
            "\n| {name:<5} | {} | {} | {} | {} |   {} | {:.4} |",
            pct(Some(m.accuracy)),
            pct(m.aligned),
            pct(m.conflicting),
            pct(Some(m.worst_group)),
            pct(Some(m.unbiased)),
            m.loss
        );
    }
    t
}

/// The FLOPs table of a freshly initialised `model` with ERK masks at `density`.
pub fn flops_for(
    model: crate::config::ModelKind,
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
    Ok(crate::train::trainer::flops_table(
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
        crate::config::fmt_num(s.final_density),
        crate::config::fmt_num(s.upweight),
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
