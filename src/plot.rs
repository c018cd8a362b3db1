//! The two charts the pipeline draws, as PNG files: [`line_chart`] (training curves) and
//! [`reliability_diagram`] (calibration, before and after). Drawn with plotters into an RGB
//! buffer, encoded by the png crate and written atomically; text uses DejaVu Sans, embedded
//! (assets/fonts/, its licence beside it) so charts look the same on every machine, fonts
//! installed or not.

use crate::data::Winner;
use crate::metrics::{clip_and_normalise, Probs};
use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Series colours in order (colour-blind-friendly: Okabe–Ito).
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];
/// The reliability diagram's "perfectly calibrated" line.
pub const DIAGONAL: RGBColor = RGBColor(90, 90, 90);

const FONT: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded font under [`FONT`] once per process.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("the embedded chart font (assets/fonts/DejaVuSans.ttf) cannot be read")
    }
}

/// Draws into a `width`×`height` RGB buffer with `draw`, then writes it to `path` as a PNG,
/// atomically.
fn render_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    register_font()?;
    let mut rgb = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(chart_error)?;
    }
    crate::atomic::write_with(path, |w| {
        let mut encoder = png::Encoder::new(w, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(&rgb)?;
        Ok(())
    })
}

/// plotters' errors borrow nothing but are generic over the backend: flatten to text.
fn chart_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A thin, light line: raw values under a smoothed curve.
    Faint,
    Line,
    /// A line through marked points: sparse measurements such as validation scores.
    LinePoints,
}

/// One named curve of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
    /// `None` takes the next colour of [`PALETTE`] by series position.
    pub color: Option<RGBColor>,
    /// Drawn against the chart's right axis (when it has one).
    pub right_axis: bool,
}

impl Series {
    /// A solid line in the palette colour of its position.
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            points,
            style: Style::Line,
            color: None,
            right_axis: false,
        }
    }

    pub fn with_style(mut self, style: Style) -> Series {
        self.style = style;
        self
    }

    pub fn with_color(mut self, color: RGBColor) -> Series {
        self.color = Some(color);
        self
    }

    pub fn on_right_axis(mut self) -> Series {
        self.right_axis = true;
        self
    }
}

/// The range of the finite values with a 5% margin; [0, 1] when there are none.
fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
    lo - pad..hi + pad
}

/// A tick's text: whole numbers without decimals (steps, counts), others with what they need.
fn tick_label(v: f64) -> String {
    if v == v.round() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let text = format!("{v:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Runs of consecutive finite points: a NaN breaks a line rather than ending the chart.
fn finite_runs(points: &[(f64, f64)]) -> impl Iterator<Item = &[(f64, f64)]> {
    points
        .split(|p| !(p.0.is_finite() && p.1.is_finite()))
        .filter(|run| !run.is_empty())
}

/// A chart's axis labels; `y_right` adds a second value axis on the right for the series
/// marked [`Series::on_right_axis`] (a quantity of another scale, such as an auxiliary loss).
pub struct Axes<'a> {
    pub x: &'a str,
    pub y: &'a str,
    pub y_right: Option<&'a str>,
}

/// Writes a line chart (e.g. training losses against step) as a 900×600 PNG, atomically.
/// Non-finite points are skipped; each axis spans the finite data of its series.
pub fn line_chart(path: &Path, title: &str, axes: &Axes, series: &[Series]) -> Result<()> {
    let right = |s: &&Series| axes.y_right.is_some() && s.right_axis;
    let values = |on_right: bool| {
        series
            .iter()
            .filter(move |s| right(s) == on_right)
            .flat_map(|s| s.points.iter().map(|p| p.1))
    };
    let x_range = padded_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (y_range, y2_range) = (padded_range(values(false)), padded_range(values(true)));
    render_png(path, (900, 600), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .right_y_label_area_size(if axes.y_right.is_some() { 60 } else { 0 })
            .build_cartesian_2d(x_range.clone(), y_range)
            .map_err(chart_error)?
            .set_secondary_coord(x_range, y2_range);
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .x_label_formatter(&|x| tick_label(*x))
            .y_label_formatter(&|y| tick_label(*y))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(chart_error)?;
        if let Some(label) = axes.y_right {
            chart
                .configure_secondary_axes()
                .y_desc(label)
                .y_label_formatter(&|y| tick_label(*y))
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()
                .map_err(chart_error)?;
        }
        for (k, s) in series.iter().enumerate() {
            let color = s.color.unwrap_or(PALETTE[k % PALETTE.len()]);
            let line = match s.style {
                Style::Faint => color.mix(0.35).stroke_width(1),
                Style::Line | Style::LinePoints => color.stroke_width(2),
            };
            let on_right = right(&s);
            for (i, run) in finite_runs(&s.points).enumerate() {
                let curve = LineSeries::new(run.iter().copied(), line);
                let drawn = if on_right {
                    chart.draw_secondary_series(curve)
                } else {
                    chart.draw_series(curve)
                }
                .map_err(chart_error)?;
                if i == 0 && !s.name.is_empty() {
                    let name = if on_right {
                        format!("{} (right axis)", s.name)
                    } else {
                        s.name.clone()
                    };
                    drawn
                        .label(name)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], line));
                }
                if s.style == Style::LinePoints {
                    let marks = run.iter().map(|&p| Circle::new(p, 4, color.filled()));
                    if on_right {
                        chart.draw_secondary_series(marks)
                    } else {
                        chart.draw_series(marks)
                    }
                    .map_err(chart_error)?;
                }
            }
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 14)
    })
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ReliabilityBin {
    /// The bin's edges: predicted probabilities in [lo, hi) (the last bin includes 1).
    pub lo: f64,
    pub hi: f64,
    /// Mean predicted probability of the class over the bin's rows.
    pub mean_predicted: f64,
    /// Share of the bin's rows whose true class is the class.
    pub observed: f64,
    pub rows: usize,
}

/// Equal-width bins of the predicted probability of `class`; empty bins are left out.
pub fn reliability_bins(
    preds: &[Probs],
    truth: &[Winner],
    class: usize,
    bins: usize,
) -> Vec<ReliabilityBin> {
    let mut sum_p = vec![0.0; bins];
    let mut hits = vec![0usize; bins];
    let mut rows = vec![0usize; bins];
    for (p, &t) in preds.iter().zip(truth) {
        let q = clip_and_normalise(p)[class];
        let b = ((q * bins as f64) as usize).min(bins - 1);
        sum_p[b] += q;
        rows[b] += 1;
        hits[b] += usize::from(t.index() == class);
    }
    (0..bins)
        .filter(|&b| rows[b] > 0)
        .map(|b| ReliabilityBin {
            lo: b as f64 / bins as f64,
            hi: (b + 1) as f64 / bins as f64,
            mean_predicted: sum_p[b] / rows[b] as f64,
            observed: hits[b] as f64 / rows[b] as f64,
            rows: rows[b],
        })
        .collect()
}

/// Bins with fewer rows get no point on the curve (their frequency is mostly noise); their
/// rows still show in the counts below it.
pub const MIN_BIN_ROWS: usize = 10;

/// Writes a reliability diagram as a PNG, atomically: one column per class (A wins, B wins,
/// tie). On top, the diagonal and one curve per prediction set in `sets` (e.g. "raw" and
/// "calibrated"): observed frequency against mean predicted probability in `bins`
/// equal-width bins; below, each set's rows per bin, so a point's weight can be read.
pub fn reliability_diagram(
    path: &Path,
    title: &str,
    sets: &[(&str, &[Probs])],
    truth: &[Winner],
    bins: usize,
) -> Result<()> {
    if bins == 0 {
        bail!("a reliability diagram needs at least one bin");
    }
    if let Some((name, p)) = sets.iter().find(|(_, p)| p.len() != truth.len()) {
        bail!(
            "reliability diagram: '{name}' has {} rows but there are {} labels",
            p.len(),
            truth.len()
        );
    }
    let (panel_w, height) = (520u32, 720u32);
    render_png(path, (3 * panel_w, height), |root| {
        let body = root.titled(title, (FONT, 22)).map_err(chart_error)?;
        for (class, (name, column)) in ["A wins", "B wins", "tie"]
            .iter()
            .zip(body.split_evenly((1, 3)))
            .enumerate()
        {
            let binned: Vec<(&str, Vec<ReliabilityBin>)> = sets
                .iter()
                .map(|(label, preds)| (*label, reliability_bins(preds, truth, class, bins)))
                .collect();
            let (top, bottom) = column.split_vertically(height * 2 / 3);
            calibration_panel(&top, name, &binned)?;
            counts_panel(&bottom, &binned, bins)?;
        }
        Ok(())
    })
}

/// A reliability panel's top half: the diagonal and each set's binned curve.
fn calibration_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    class: &str,
    binned: &[(&str, Vec<ReliabilityBin>)],
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(format!("class: {class}"), (FONT, 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .x_desc("mean predicted probability")
        .y_desc("observed frequency")
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(chart_error)?;
    let diagonal = DIAGONAL.stroke_width(2);
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            8,
            5,
            diagonal,
        ))
        .map_err(chart_error)?
        .label("perfectly calibrated")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], diagonal));
    for (k, (label, bins)) in binned.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points: Vec<(f64, f64)> = bins
            .iter()
            .filter(|b| b.rows >= MIN_BIN_ROWS)
            .map(|b| (b.mean_predicted, b.observed))
            .collect();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(chart_error)?
            .label(format!("{label} (bins of ≥ {MIN_BIN_ROWS} rows)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(chart_error)?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, 12)
}

/// The chart's series labels at `position`, in `size`-point text on a light box.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    size: i32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(chart_error)
}

/// A reliability panel's bottom half: rows per bin, one bar per set side by side.
fn counts_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    binned: &[(&str, Vec<ReliabilityBin>)],
    bins: usize,
) -> Result<()> {
    let most = binned
        .iter()
        .flat_map(|(_, b)| b.iter().map(|b| b.rows))
        .max()
        .unwrap_or(0);
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..(most.max(1) as f64 * 1.1))
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .x_desc("predicted probability (bin)")
        .y_desc("rows")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(chart_error)?;
    let width = 1.0 / bins as f64 / binned.len().max(1) as f64;
    for (k, (_, bins)) in binned.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        chart
            .draw_series(bins.iter().map(|b| {
                let x0 = b.lo + k as f64 * width;
                Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, b.rows as f64)],
                    color.filled(),
                )
            }))
            .map_err(chart_error)?;
    }
    Ok(())
}
