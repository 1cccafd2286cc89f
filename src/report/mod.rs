//! Reports: the results table printed at the end of a run (sweeps, tables and plots across
//! runs come with the sweeps issue).

use crate::train::metrics::GroupMetrics;
use crate::train::trainer::Summary;
use std::fmt::Write as _;

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:6.2}", 100.0 * v))
        .unwrap_or_else(|| "     -".into())
}

fn row(name: &str, m: &GroupMetrics) -> String {
    format!(
        "| {name:<5} | {} | {} | {} | {} | {} |",
        pct(Some(m.accuracy)),
        pct(m.aligned),
        pct(m.conflicting),
        pct(Some(m.worst_group)),
        pct(Some(m.unbiased))
    )
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
        "| split |  acc % | align. | confl. | worst  | unbiased |"
    );
    let _ = writeln!(
        t,
        "|-------|--------|--------|--------|--------|----------|"
    );
    let _ = writeln!(t, "{}", row("valid", &s.valid));
    let _ = write!(t, "{}", row("test", &s.test));
    t
}
