//! Figures as PNG and SVG with plotters: a small figure model (panels of line, band, error-bar
//! and horizontal-baseline series, log or linear axes, a legend beside each panel), its
//! renderer, and the two collection plots of `rest report`: unbiased test accuracy versus
//! density and versus training FLOPs, one panel per conflicting ratio.
//!
//! Text is drawn with the DejaVu Sans font compiled into the binary (plotters' `ab_glyph`
//! backend), so plots render the same on machines without any system fonts.

use super::tables::{col_label, Grid};
use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::{Path, PathBuf};

/// A series' drawing style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Solid line through the points, with markers; a +- err band when the points have one.
    Line,
    /// Solid line with markers and vertical +- err bars.
    LineErrorBars,
    /// Markers only.
    Markers,
    /// A dashed horizontal line at the first point's y across the whole x range, with a +- err
    /// band, and a marker at the point itself.
    HLine,
}

/// One point; `err` is the half-height of its band or error bar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pt {
    pub x: f64,
    pub y: f64,
    pub err: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text; empty: not in the legend.
    pub label: String,
    /// Index into the palette.
    pub color: usize,
    pub style: Style,
    pub points: Vec<Pt>,
    /// Text drawn beside each point (same order as `points`); empty: none.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub y_log: bool,
    /// Fixed x tick positions (data units); `None`: chosen from the range.
    pub x_ticks: Option<Vec<f64>>,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub title: String,
    pub panels: Vec<Panel>,
    /// Panels per row.
    pub columns: usize,
    /// Size of one panel in pixels (legend included).
    pub panel_size: (u32, u32),
}

/// Tableau-10 colours: distinct, and readable on white.
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

pub fn color(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

const FONT: &str = "sans-serif";
const TITLE_H: u32 = 46;

/// Registers the built-in font under plotters' default family name (once per process).
fn register_fonts() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the built-in DejaVu Sans font could not be loaded"))
    }
}

fn de<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot failed: {e}")
}

/// A number as a short tick label: up to 4 significant digits, no trailing zeros.
pub fn tick_label(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if !(1e-4..1e5).contains(&a) {
        return format!("{v:.0e}");
    }
    let digits = (3 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// About `n` round tick positions (1, 2, 2.5 or 5 x 10^k apart) covering [lo, hi].
pub fn linear_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Tick positions for a log axis over [lo, hi] (lo > 0): 1-2-5 x 10^k, thinned to at most
/// about 8.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut t = Vec::new();
    let mut k = lo.log10().floor() as i32 - 1;
    while 10f64.powi(k) <= hi * 10.0 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(k);
            if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                t.push(v);
            }
        }
        k += 1;
    }
    if t.len() > 8 {
        t.retain(|v| (v.log10() - v.log10().round()).abs() < 1e-9);
    }
    t
}

struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// Data value to the drawn coordinate (log10 on a log axis).
    fn t(&self, v: f64) -> f64 {
        if self.log {
            v.log10()
        } else {
            v
        }
    }
}

/// A linear coordinate (in drawn units: log10 of the data on a log axis) whose tick marks
/// are exactly the given positions.
#[derive(Debug, Clone)]
struct Ticked {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = if self.hi > self.lo {
            (v - self.lo) / (self.hi - self.lo)
        } else {
            0.5
        };
        limit.0 + (f64::from(limit.1 - limit.0) * f).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

fn axis(values: &[f64], log: bool, fixed: Option<&Vec<f64>>) -> Axis {
    let vals: Vec<f64> = values
        .iter()
        .copied()
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    let (mut lo, mut hi) = vals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    if vals.is_empty() {
        (lo, hi) = if log { (0.1, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        // Pad by a factor; a single value gets a decade around it.
        let f = if hi / lo < 1.01 { 3.0 } else { 1.25 };
        lo /= f;
        hi *= f;
    } else {
        let pad = if hi - lo < 1e-12 {
            hi.abs().max(1.0) * 0.05
        } else {
            (hi - lo) * 0.05
        };
        lo -= pad;
        hi += pad;
    }
    let ticks = match fixed {
        Some(t) => t.iter().copied().filter(|v| *v >= lo && *v <= hi).collect(),
        None if log => {
            let t = log_ticks(lo, hi);
            if t.len() >= 2 {
                t
            } else {
                linear_ticks(lo, hi, 4)
            }
        }
        None => linear_ticks(lo, hi, 6),
    };
    Axis { log, lo, hi, ticks }
}

fn panel_axes(p: &Panel) -> (Axis, Axis) {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for s in &p.series {
        for pt in &s.points {
            xs.push(pt.x);
            ys.push(pt.y);
            if let Some(e) = pt.err {
                ys.push(pt.y - e);
                ys.push(pt.y + e);
            }
        }
    }
    if p.y_log {
        ys.retain(|y| *y > 0.0);
    }
    (
        axis(&xs, p.x_log, p.x_ticks.as_ref()),
        axis(&ys, p.y_log, None),
    )
}

fn legend_width(p: &Panel, panel_w: u32) -> u32 {
    let longest = p
        .series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0);
    if longest == 0 {
        return 0;
    }
    (longest as u32 * 8 + 46).clamp(100, panel_w * 45 / 100)
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<()> {
    let (pw, _) = area.dim_in_pixel();
    let lw = legend_width(p, pw);
    let (plot_area, legend_area) = area.split_horizontally(pw - lw);
    let (xa, ya) = panel_axes(p);
    let xt: Vec<f64> = xa.ticks.iter().map(|v| xa.t(*v)).collect();
    let yt: Vec<f64> = ya.ticks.iter().map(|v| ya.t(*v)).collect();
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(&p.title, (FONT, 19))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            Ticked {
                lo: xa.t(xa.lo),
                hi: xa.t(xa.hi),
                ticks: xt,
            },
            Ticked {
                lo: ya.t(ya.lo),
                hi: ya.t(ya.hi),
                ticks: yt,
            },
        )
        .map_err(de)?;
    let (x_log, y_log) = (xa.log, ya.log);
    let xf = move |v: &f64| tick_label(if x_log { 10f64.powf(*v) } else { *v });
    let yf = move |v: &f64| tick_label(if y_log { 10f64.powf(*v) } else { *v });
    chart
        .configure_mesh()
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .x_label_formatter(&xf)
        .y_label_formatter(&yf)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(de)?;
    let (x0, x1) = (xa.t(xa.lo), xa.t(xa.hi));
    for s in &p.series {
        let c = color(s.color);
        let pts: Vec<(f64, f64, Option<f64>)> = s
            .points
            .iter()
            .filter(|pt| (!x_log || pt.x > 0.0) && (!y_log || pt.y > 0.0))
            .map(|pt| (xa.t(pt.x), ya.t(pt.y), pt.err))
            .collect();
        // Bands and bars are drawn in data units, so on a log y axis they are skipped.
        let band = |y: f64, e: f64| (ya.t(y - e), ya.t(y + e));
        match s.style {
            Style::HLine => {
                let Some(&(_, y, err)) = pts.first() else {
                    continue;
                };
                let yv = s.points[0].y;
                if let (Some(e), false) = (err, y_log) {
                    let (lo, hi) = band(yv, e);
                    chart
                        .draw_series(std::iter::once(Rectangle::new(
                            [(x0, lo), (x1, hi)],
                            c.mix(0.12).filled(),
                        )))
                        .map_err(de)?;
                }
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(x0, y), (x1, y)],
                        10,
                        6,
                        c.stroke_width(2),
                    ))
                    .map_err(de)?;
                // The baseline's own run, at its x (density 1).
                chart
                    .draw_series(pts.first().map(|q| Circle::new((q.0, q.1), 4, c.filled())))
                    .map_err(de)?;
            }
            Style::Line | Style::LineErrorBars | Style::Markers => {
                if s.style == Style::Line && !y_log && pts.iter().all(|p| p.2.is_some()) {
                    let mut poly: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .zip(&pts)
                        .map(|(pt, q)| (q.0, band(pt.y, pt.err.unwrap_or(0.0)).1))
                        .collect();
                    poly.extend(
                        s.points
                            .iter()
                            .zip(&pts)
                            .rev()
                            .map(|(pt, q)| (q.0, band(pt.y, pt.err.unwrap_or(0.0)).0)),
                    );
                    if pts.len() > 1 {
                        chart
                            .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.15).filled())))
                            .map_err(de)?;
                    }
                }
                // A lone point has no band to draw: it gets an error bar.
                let bars =
                    s.style == Style::LineErrorBars || (s.style == Style::Line && pts.len() == 1);
                if bars && !y_log {
                    for (pt, q) in s.points.iter().zip(&pts) {
                        if let Some(e) = pt.err {
                            let (lo, hi) = band(pt.y, e);
                            chart
                                .draw_series(std::iter::once(PathElement::new(
                                    vec![(q.0, lo), (q.0, hi)],
                                    c.stroke_width(2),
                                )))
                                .map_err(de)?;
                        }
                    }
                }
                if s.style != Style::Markers {
                    chart
                        .draw_series(LineSeries::new(
                            pts.iter().map(|q| (q.0, q.1)),
                            c.stroke_width(2),
                        ))
                        .map_err(de)?;
                }
                for (q, note) in pts.iter().zip(&s.notes) {
                    chart
                        .draw_series(std::iter::once(
                            EmptyElement::at((q.0, q.1))
                                + Text::new(
                                    note.clone(),
                                    (6, -18),
                                    (FONT, 12).into_font().color(&c),
                                ),
                        ))
                        .map_err(de)?;
                }
                let r = if s.style == Style::Markers { 5 } else { 3 };
                chart
                    .draw_series(pts.iter().map(|q| Circle::new((q.0, q.1), r, c.filled())))
                    .map_err(de)?;
            }
        }
    }
    // The legend, beside the plot so that it never hides data.
    for (row, s) in p.series.iter().filter(|s| !s.label.is_empty()).enumerate() {
        let c = color(s.color);
        let y = 48 + row as i32 * 22;
        match s.style {
            Style::HLine => legend_area
                .draw(&DashedPathElement::new(
                    vec![(4, y), (34, y)],
                    7,
                    4,
                    c.stroke_width(2),
                ))
                .map_err(de)?,
            Style::Markers => legend_area
                .draw(&Circle::new((19, y), 5, c.filled()))
                .map_err(de)?,
            _ => {
                legend_area
                    .draw(&PathElement::new(vec![(4, y), (34, y)], c.stroke_width(2)))
                    .map_err(de)?;
                legend_area
                    .draw(&Circle::new((19, y), 3, c.filled()))
                    .map_err(de)?;
            }
        }
        legend_area
            .draw(&Text::new(s.label.clone(), (40, y - 8), (FONT, 14)))
            .map_err(de)?;
    }
    Ok(())
}

fn figure_size(f: &Figure) -> (u32, u32) {
    let cols = f.columns.clamp(1, f.panels.len().max(1));
    let rows = f.panels.len().div_ceil(cols).max(1);
    (
        f.panel_size.0 * cols as u32,
        f.panel_size.1 * rows as u32 + TITLE_H,
    )
}

fn draw_figure<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, f: &Figure) -> Result<()> {
    root.fill(&WHITE).map_err(de)?;
    let (title, body) = root.split_vertically(TITLE_H);
    let (w, _) = title.dim_in_pixel();
    title
        .draw(&Text::new(
            f.title.clone(),
            (w as i32 / 2, TITLE_H as i32 / 2),
            (FONT, 22)
                .into_font()
                .style(FontStyle::Bold)
                .into_text_style(&title)
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                )),
        ))
        .map_err(de)?;
    let cols = f.columns.clamp(1, f.panels.len().max(1));
    let rows = f.panels.len().div_ceil(cols).max(1);
    for (area, p) in body.split_evenly((rows, cols)).iter().zip(&f.panels) {
        draw_panel(area, p)?;
    }
    root.present().map_err(de)?;
    Ok(())
}

/// Renders a figure as PNG bytes.
pub fn render_png(f: &Figure) -> Result<Vec<u8>> {
    register_fonts()?;
    let (w, h) = figure_size(f);
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_figure(root, f)?;
    }
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| anyhow!("internal error: plot buffer of the wrong size"))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| anyhow!("cannot encode the plot as PNG: {e}"))?;
    Ok(out.into_inner())
}

/// Renders a figure as an SVG document.
pub fn render_svg(f: &Figure) -> Result<String> {
    register_fonts()?;
    let (w, h) = figure_size(f);
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (w, h)).into_drawing_area();
        draw_figure(root, f)?;
    }
    Ok(s)
}

/// Writes `<dir>/<stem>.png` and `<dir>/<stem>.svg` atomically; returns both paths.
pub fn write_figure(f: &Figure, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    crate::util::write_atomic(&png, &render_png(f)?)?;
    crate::util::write_atomic(&svg, render_svg(f)?.as_bytes())?;
    Ok(vec![png, svg])
}

/// The x quantity of a collection plot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Density,
    TrainFlops,
}

/// Unbiased test accuracy (mean +- std over seeds) against density or training FLOPs, one
/// panel per conflicting ratio, one series per configuration without its density. Versus
/// density, dense runs are a dashed horizontal baseline with a +- std band and sparse runs a
/// line with a band; versus FLOPs every configuration is a line with error bars.
pub fn accuracy_figure(g: &Grid, x: XAxis) -> Figure {
    let metric = "test_unbiased";
    let d_idx = g.row_keys.iter().position(|k| k == "density");
    // Series key: the row's values without its density.
    let series_key = |row: &Vec<String>| -> Vec<String> {
        row.iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != d_idx)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let mut keys: Vec<Vec<String>> = Vec::new();
    for r in &g.rows {
        let k = series_key(r);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let label_keys: Vec<&String> = g
        .row_keys
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != d_idx)
        .map(|(_, k)| k)
        .collect();
    let label = |k: &Vec<String>| -> String {
        label_keys
            .iter()
            .zip(k)
            .map(|(name, v)| match name.as_str() {
                "method" => v.clone(),
                "upweight" => format!("λ={v}"),
                n => format!("{n}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let density = |row: usize| -> f64 {
        d_idx
            .and_then(|i| g.rows[row][i].parse::<f64>().ok())
            .unwrap_or(1.0)
    };
    let mut densities: Vec<f64> = (0..g.rows.len()).map(density).collect();
    densities.sort_by(|a, b| a.total_cmp(b));
    densities.dedup();
    let mut panels = Vec::new();
    for (j, col) in g.cols.iter().enumerate() {
        let mut series = Vec::new();
        for (si, k) in keys.iter().enumerate() {
            let mut pts = Vec::new();
            let mut dense = None;
            for i in (0..g.rows.len()).filter(|i| series_key(&g.rows[*i]) == *k) {
                let Some(s) = g.stat(i, j, metric, 100.0) else {
                    continue;
                };
                let xv = match x {
                    XAxis::Density => density(i),
                    XAxis::TrainFlops => match g.stat(i, j, "train_flops_vs_dense", 1.0) {
                        Some(f) => f.mean,
                        None => continue,
                    },
                };
                let pt = Pt {
                    x: xv,
                    y: s.mean,
                    err: s.std,
                };
                if x == XAxis::Density && density(i) >= 1.0 {
                    dense = Some(pt);
                } else {
                    pts.push((pt, format!("d={}", crate::util::fmt_num(density(i)))));
                }
            }
            pts.sort_by(|a, b| a.0.x.total_cmp(&b.0.x));
            // Versus FLOPs, each point is labelled with its density.
            let notes = match x {
                XAxis::Density => Vec::new(),
                XAxis::TrainFlops => pts.iter().map(|p| p.1.clone()).collect(),
            };
            let pts: Vec<Pt> = pts.into_iter().map(|p| p.0).collect();
            let name = label(k);
            if !pts.is_empty() {
                series.push(Series {
                    label: name.clone(),
                    color: si,
                    style: if x == XAxis::Density {
                        Style::Line
                    } else {
                        Style::LineErrorBars
                    },
                    points: pts,
                    notes,
                });
            }
            if let Some(pt) = dense {
                series.push(Series {
                    label: format!("{name} (dense)"),
                    color: si,
                    style: Style::HLine,
                    points: vec![pt],
                    notes: Vec::new(),
                });
            }
        }
        let title = if col.is_empty() {
            "all runs".to_string()
        } else {
            format!("{} conflicting", col_label(col))
        };
        let (x_label, x_ticks) = match x {
            XAxis::Density => {
                let sparse: Vec<f64> = densities.iter().copied().filter(|d| *d < 1.0).collect();
                let ticks = if (2..=8).contains(&sparse.len()) {
                    let mut t = sparse;
                    t.push(1.0);
                    Some(t)
                } else {
                    None
                };
                ("density (fraction of weights kept, log scale)", ticks)
            }
            XAxis::TrainFlops => ("training FLOPs / dense training (log scale)", None),
        };
        panels.push(Panel {
            title,
            x_label: x_label.into(),
            y_label: "unbiased test accuracy (%)".into(),
            x_log: true,
            y_log: false,
            x_ticks,
            series,
        });
    }
    let seeds = if g.seeds == 1 {
        "1 seed".to_string()
    } else {
        format!("mean ± std over {} seeds", g.seeds)
    };
    let title = match x {
        XAxis::Density => format!("Unbiased test accuracy vs. density ({seeds})"),
        XAxis::TrainFlops => format!("Unbiased test accuracy vs. training FLOPs ({seeds})"),
    };
    Figure {
        title,
        columns: 2,
        panel_size: (760, 520),
        panels,
    }
}
