//! Charts: every file decoded back with the png crate and its pixels checked for what each
//! chart must show (series colours, the diagonal, count bars, text).

use verdict::data::Winner;
use verdict::plot::{
    line_chart, reliability_bins, reliability_diagram, Axes, Series, Style, DIAGONAL, PALETTE,
};

const AXES: Axes = Axes {
    x: "step",
    y: "log loss",
    y_right: None,
};

/// Width, height and RGB pixels of a PNG file.
fn decode_png(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Pixels of this colour in an RGB buffer, give or take the shading of a line's edge.
fn count(rgb: &[u8], c: plotters::style::RGBColor) -> usize {
    let near = |a: u8, b: u8| a.abs_diff(b) <= 24;
    rgb.chunks(3)
        .filter(|p| near(p[0], c.0) && near(p[1], c.1) && near(p[2], c.2))
        .count()
}

/// Dark pixels (text, axes, frames): not white, not a palette colour.
fn dark(rgb: &[u8]) -> usize {
    rgb.chunks(3).filter(|p| p.iter().all(|&v| v < 60)).count()
}

#[test]
fn line_chart_draws_each_series_in_its_colour_with_labelled_axes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    let train: Vec<(f64, f64)> = (0..100)
        .map(|i| (i as f64, 1.1 - 0.001 * i as f64))
        .collect();
    let aux: Vec<(f64, f64)> = (0..100)
        .map(|i| (i as f64, 7.0 + 0.01 * i as f64))
        .collect();
    let valid = vec![(0.0, 1.09), (50.0, f64::NAN), (99.0, 1.02)];
    let series = [
        Series::line("train", train),
        Series::line("aux", aux).on_right_axis(),
        Series::line("valid", valid).with_style(Style::LinePoints),
    ];
    let axes = Axes {
        y_right: Some("aux loss"),
        ..AXES
    };
    line_chart(&path, "Loss", &axes, &series).unwrap();
    let (w, h, rgb) = decode_png(&path);
    assert_eq!((w, h), (900, 600));
    assert!(count(&rgb, PALETTE[0]) > 500, "train line drawn");
    assert!(count(&rgb, PALETTE[1]) > 500, "aux line drawn");
    assert!(count(&rgb, PALETTE[2]) > 100, "valid points drawn");
    assert!(dark(&rgb) > 1000, "title, labels, axes and legend drawn");

    // The same chart without the valid series has none of its colour: the count is real.
    let path2 = dir.path().join("loss2.png");
    line_chart(&path2, "Loss", &axes, &series[..2]).unwrap();
    assert_eq!(count(&decode_png(&path2).2, PALETTE[2]), 0);
}

#[test]
fn line_chart_with_no_finite_points_still_draws_axes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.png");
    line_chart(
        &path,
        "Nothing yet",
        &AXES,
        &[Series::line("x", vec![(1.0, f64::NAN)])],
    )
    .unwrap();
    let (_, _, rgb) = decode_png(&path);
    assert!(dark(&rgb) > 500, "axes and labels drawn");
    assert_eq!(count(&rgb, PALETTE[0]), 0, "no line from a NaN point");
}

#[test]
fn reliability_bins_average_predictions_and_outcomes() {
    let preds = [
        [0.05, 0.5, 0.45],
        [0.15, 0.5, 0.35],
        [0.95, 0.0, 0.05],
        [0.91, 0.05, 0.04],
    ];
    let truth = [Winner::A, Winner::B, Winner::A, Winner::B];
    let bins = reliability_bins(&preds, &truth, 0, 10);
    assert_eq!(bins.len(), 3, "empty bins are left out: {bins:?}");
    assert_eq!(bins[0].rows, 1);
    assert_eq!((bins[0].lo, bins[0].hi), (0.0, 0.1));
    assert!((bins[0].mean_predicted - 0.05).abs() < 1e-9);
    assert_eq!(bins[0].observed, 1.0);
    assert_eq!(bins[2].rows, 2, "0.95 and 0.91 share the last bin");
    assert!((bins[2].hi - 1.0).abs() < 1e-12);
    assert!((bins[2].mean_predicted - 0.93).abs() < 1e-9);
    assert_eq!(bins[2].observed, 0.5);
}

#[test]
fn reliability_diagram_has_diagonal_curves_and_counts_and_refuses_misaligned_sets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rel.png");
    let mut rng = verdict::rng::Rng::new(7);
    let preds: Vec<[f64; 3]> = (0..300)
        .map(|_| {
            let a = rng.uniform() * 0.8 + 0.1;
            [a, (1.0 - a) * 0.6, (1.0 - a) * 0.4]
        })
        .collect();
    let truth: Vec<Winner> = preds
        .iter()
        .map(|p| {
            if rng.uniform() < p[0] {
                Winner::A
            } else {
                Winner::B
            }
        })
        .collect();
    let shrunk: Vec<[f64; 3]> = preds
        .iter()
        .map(|p| {
            [
                0.5 * p[0] + 0.5 / 3.0,
                0.5 * p[1] + 0.5 / 3.0,
                0.5 * p[2] + 0.5 / 3.0,
            ]
        })
        .collect();
    reliability_diagram(&path, "r", &[("raw", &preds), ("cal", &shrunk)], &truth, 10).unwrap();
    let (w, h, rgb) = decode_png(&path);
    assert_eq!((w, h), (3 * 520, 720));
    assert!(
        count(&rgb, DIAGONAL) > 3 * 700,
        "a dashed diagonal in each of three panels"
    );
    // Curves and count bars: bars fill areas, so each set's colour covers many pixels.
    assert!(count(&rgb, PALETTE[0]) > 3000, "raw curve and bars");
    assert!(count(&rgb, PALETTE[1]) > 3000, "calibrated curve and bars");
    assert!(dark(&rgb) > 3000, "titles, axes and labels");

    let err = reliability_diagram(&path, "r", &[("raw", &preds[..299])], &truth, 10).unwrap_err();
    assert!(err.to_string().contains("'raw' has 299 rows"), "{err}");
}
