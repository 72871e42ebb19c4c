//! SVG line charts for the benchmark report.
//!
//! Only the SVG backend of `plotters` is used, without any font feature: the
//! chart's text goes into the file as `<text>` elements that the viewer lays
//! out with its own fonts, so building this needs no system font libraries.
//! Label boxes (the legend's frame, the room kept for tick labels) are sized
//! from a rough per-character estimate instead of real glyph metrics.

use std::io;
use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// One line of a chart: a label for the legend and (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Size of the picture in pixels.
const WIDTH: u32 = 800;
const HEIGHT: u32 = 500;

/// Rough size of the plotting area inside the picture, for placing the legend.
const PLOT_WIDTH: f64 = 690.0;
const PLOT_HEIGHT: f64 = 380.0;

const FONT: &str = "sans-serif";

/// The first colours, well apart from each other on a white background;
/// further series get hues spread around the colour wheel.
const COLOURS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// Draws a line chart with markers at each point to an SVG file at `path`:
/// title, axis labels, a legend, optional logarithmic x and/or y axis, each
/// series in a distinct colour.
///
/// Every series must have at least one point, all values must be finite, and
/// values on a logarithmic axis must be positive; otherwise this returns an
/// `InvalidInput` error and writes nothing. Failures to draw or to write the
/// file come back as `io::Error`s too.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    log_x: bool,
    log_y: bool,
    series: &[Series],
) -> io::Result<()> {
    let x = Axis::fit(series, AxisKind::X, log_x)?;
    let y = Axis::fit(series, AxisKind::Y, log_y)?;
    let chart = Chart {
        title,
        x_label,
        y_label,
        series,
        legend: legend_position(series, &x, &y),
    };
    let mut svg = String::new();
    let drawn = match (log_x, log_y) {
        (false, false) => chart.render(&mut svg, x.lo..x.hi, y.lo..y.hi),
        (true, false) => chart.render(&mut svg, (x.lo..x.hi).log_scale(), y.lo..y.hi),
        (false, true) => chart.render(&mut svg, x.lo..x.hi, (y.lo..y.hi).log_scale()),
        (true, true) => chart.render(&mut svg, (x.lo..x.hi).log_scale(), (y.lo..y.hi).log_scale()),
    };
    drawn.map_err(|e| io::Error::other(format!("drawing chart {title:?} for {}: {e}", path.display())))?;
    std::fs::write(path, svg)
        .map_err(|e| io::Error::new(e.kind(), format!("writing chart {title:?} to {}: {e}", path.display())))
}

/// The colour of the `index`th series of a chart.
fn series_colour(index: usize) -> RGBColor {
    if let Some(c) = COLOURS.get(index) {
        return *c;
    }
    // Golden-ratio steps around the wheel keep neighbours apart.
    let hue = ((index - COLOURS.len()) as f64 * 0.618_034 + 0.1).fract();
    let RGBAColor(r, g, b, _) = HSLColor(hue, 0.7, 0.42).to_rgba();
    RGBColor(r, g, b)
}

#[derive(Clone, Copy, PartialEq)]
enum AxisKind {
    X,
    Y,
}

impl AxisKind {
    fn name(self) -> &'static str {
        match self {
            AxisKind::X => "x",
            AxisKind::Y => "y",
        }
    }

    fn pick(self, point: (f64, f64)) -> f64 {
        match self {
            AxisKind::X => point.0,
            AxisKind::Y => point.1,
        }
    }
}

/// The shown range of one axis.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    /// Checks the values for this axis and picks a range that shows them all
    /// with a little room around.
    fn fit(series: &[Series], kind: AxisKind, log: bool) -> io::Result<Axis> {
        if series.is_empty() {
            return Err(invalid("no series to plot".to_string()));
        }
        let mut min = f64::INFINITY;
        let mut max = f64::NEG_INFINITY;
        for s in series {
            if s.points.is_empty() {
                return Err(invalid(format!("series {:?} has no points", s.label)));
            }
            for &point in &s.points {
                let v = kind.pick(point);
                if !v.is_finite() {
                    return Err(invalid(format!(
                        "series {:?}: {} value {v} is not a finite number",
                        s.label,
                        kind.name()
                    )));
                }
                if log && v <= 0.0 {
                    return Err(invalid(format!(
                        "series {:?}: {} value {v} cannot be shown on a logarithmic axis",
                        s.label,
                        kind.name()
                    )));
                }
                min = min.min(v);
                max = max.max(v);
            }
        }
        let (lo, hi) = if log {
            log_bounds(min, max)
        } else {
            // Quantities measured in the benchmarks (rates, latencies) read
            // best against zero, so a y axis without negative values starts there.
            linear_bounds(min, max, kind == AxisKind::Y && min >= 0.0)
        };
        Ok(Axis { lo, hi, log })
    }

    /// Where `v` falls on the axis, 0 at the low end and 1 at the high end.
    fn fraction(&self, v: f64) -> f64 {
        if self.log {
            (v.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn linear_bounds(min: f64, max: f64, from_zero: bool) -> (f64, f64) {
    let lo = if from_zero { 0.0 } else { min };
    let span = max - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else if max != 0.0 {
        max.abs() * 0.1
    } else {
        1.0
    };
    let lo = if from_zero { lo } else { lo - pad };
    (lo, max + pad)
}

/// Bounds for a logarithmic axis over positive `min..=max`: a little room in
/// log space on each side, and at least one power of ten inside so that the
/// axis gets tick labels.
fn log_bounds(min: f64, max: f64) -> (f64, f64) {
    let mut lo = min.log10();
    let mut hi = max.log10();
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.3 };
    lo -= pad;
    hi += pad;
    if hi.floor() < lo.ceil() {
        lo = lo.floor();
    }
    (10f64.powf(lo), 10f64.powf(hi))
}

/// Tick label text: plain decimals without trailing zeros for ordinary
/// magnitudes, `10k`/`2.5M` style from ten thousand up, and `1e-4` style for
/// tiny values.
fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let magnitude = v.abs();
    if magnitude < 1e-3 {
        let text = format!("{v:.3e}");
        return match text.split_once('e') {
            Some((mantissa, exponent)) => format!("{}e{exponent}", trim_zeros(mantissa)),
            None => text,
        };
    }
    let (scaled, suffix) = match magnitude {
        m if m >= 1e12 => (v / 1e12, "T"),
        m if m >= 1e9 => (v / 1e9, "G"),
        m if m >= 1e6 => (v / 1e6, "M"),
        m if m >= 1e4 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    // Six significant digits hide the float noise of computed ticks.
    let decimals = (5 - scaled.abs().log10().floor() as i32).clamp(0, 8) as usize;
    format!("{}{suffix}", trim_zeros(&format!("{scaled:.decimals$}")))
}

fn trim_zeros(number: &str) -> &str {
    if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        number
    }
}

/// Puts the legend in the corner of the plot that the data crosses least.
fn legend_position(series: &[Series], x: &Axis, y: &Axis) -> SeriesLabelPosition {
    let longest = series.iter().map(|s| s.label.chars().count()).max().unwrap_or(0);
    let width = ((longest as f64 * 7.5 + 60.0) / PLOT_WIDTH).min(0.9);
    let height = ((series.len() as f64 * 22.0 + 20.0) / PLOT_HEIGHT).min(0.9);

    // Corners as (position, is at the right, is at the top), in order of preference.
    let corners = [
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let mut hits = [0usize; 4];
    for s in series {
        let mut visit = |fx: f64, fy: f64| {
            for (count, &(_, right, top)) in hits.iter_mut().zip(&corners) {
                let in_x = if right { fx >= 1.0 - width } else { fx <= width };
                let in_y = if top { fy >= 1.0 - height } else { fy <= height };
                if in_x && in_y {
                    *count += 1;
                }
            }
        };
        let scaled: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|&(px, py)| (x.fraction(px), y.fraction(py)))
            .collect();
        for &(fx, fy) in &scaled {
            visit(fx, fy);
        }
        // The lines between the points count too.
        for pair in scaled.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            for step in 1..16 {
                let t = f64::from(step) / 16.0;
                visit(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            }
        }
    }
    let mut best = 0;
    for i in 1..corners.len() {
        if hits[i] < hits[best] {
            best = i;
        }
    }
    corners[best].0.clone()
}

/// Everything about a chart but its axes' coordinate types.
struct Chart<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: &'a [Series],
    legend: SeriesLabelPosition,
}

impl Chart<'_> {
    /// Draws the chart as SVG text into `out` on the given axes, linear or
    /// logarithmic.
    fn render<X, Y>(&self, out: &mut String, x: X, y: Y) -> Result<(), DrawingAreaErrorKind<io::Error>>
    where
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, (FONT, 26))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x, y)?;

        let tick = |v: &f64| format_tick(*v);
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .bold_line_style(BLACK.mix(0.15))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;

        for (index, s) in self.series.iter().enumerate() {
            let style = series_colour(index).filled().stroke_width(2);
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style).point_size(3))?
                .label(s.label.as_str())
                .legend(move |(lx, ly)| {
                    EmptyElement::at((lx + 10, ly))
                        + PathElement::new(vec![(-10, 0), (10, 0)], style)
                        + Circle::new((0, 0), 3, style)
                });
        }

        chart
            .configure_series_labels()
            .position(self.legend.clone())
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;

        root.present()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A file name in the temp dir that no other test (or run) uses; removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(stem: &str) -> TempFile {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            TempFile(std::env::temp_dir().join(format!("moat-lab-plot-{stem}-{}-{n}-{nanos}.svg", std::process::id())))
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn series(label: &str, points: &[(f64, f64)]) -> Series {
        Series {
            label: label.to_string(),
            points: points.to_vec(),
        }
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    /// The `<polyline>` and `<path>` elements of an SVG text.
    fn lines(svg: &str) -> Vec<&str> {
        svg.split('<')
            .filter(|e| e.starts_with("polyline") || e.starts_with("path"))
            .collect()
    }

    #[test]
    fn plot_two_series_on_log_x() {
        let file = TempFile::new("log-x");
        let sizes = [1.0, 100.0, 1024.0];
        let data = [
            series("moat xdp", &sizes.map(|s| (s, 14.2 - s / 1000.0))),
            series("baseline drop", &sizes.map(|s| (s, 14.8 - s / 2000.0))),
        ];
        line_chart(&file.0, "Drop rate by rule count", "rules", "Mpps", true, false, &data).expect("chart is drawn");

        let svg = std::fs::read_to_string(&file.0).expect("chart file is readable");
        assert!(svg.trim_start().starts_with("<svg"), "not an SVG: {svg:.80}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(r#"width="800""#) && svg.contains(r#"height="500""#));
        for text in ["Drop rate by rule count", "rules", "Mpps", "moat xdp", "baseline drop"] {
            assert!(svg.contains(&format!(">\n{text}\n<")), "no text {text:?}");
        }
        // Log axis ticks at the powers of ten.
        for tick in ["1", "10", "100", "1000"] {
            assert!(svg.contains(&format!(">\n{tick}\n<")), "no tick {tick:?}");
        }
        let lines = lines(&svg);
        for index in 0..data.len() {
            let colour = hex(series_colour(index));
            let count = lines.iter().filter(|l| l.contains(&colour)).count();
            // The data line and the legend's sample line.
            assert!(count >= 2, "series {index} ({colour}) has {count} lines");
        }
    }

    #[test]
    fn plot_log_both_axes() {
        let file = TempFile::new("log-xy");
        let data = [
            series(
                "p99 latency",
                &[(1.0, 0.05), (1000.0, 0.4), (100_000.0, 3.0), (1_000_000.0, 20.0)],
            ),
            series("p50 latency", &[(1.0, 0.05), (1_000_000.0, 8.0)]),
            series("single point", &[(500.0, 1.0)]),
        ];
        line_chart(&file.0, "Latency", "flows", "ms", true, true, &data).expect("chart is drawn");
        let svg = std::fs::read_to_string(&file.0).expect("chart file is readable");
        for tick in ["1", "1000", "10k", "100k", "1M", "0.1", "10"] {
            assert!(svg.contains(&format!(">\n{tick}\n<")), "no tick {tick:?}");
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn non_positive_on_log_axis_is_an_error() {
        let file = TempFile::new("bad");
        let zero_x = [series("a", &[(0.0, 1.0), (10.0, 2.0)])];
        let err = line_chart(&file.0, "t", "x", "y", true, false, &zero_x).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("logarithmic"), "{err}");

        let negative_y = [series("a", &[(1.0, 1.0)]), series("b", &[(2.0, -3.0)])];
        let err = line_chart(&file.0, "t", "x", "y", false, true, &negative_y).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("\"b\""), "{err}");

        // The same values are fine on linear axes.
        line_chart(&file.0, "t", "x", "y", false, false, &negative_y).expect("linear axes");
        std::fs::remove_file(&file.0).expect("chart was written");

        assert!(!file.0.exists());
    }

    #[test]
    fn empty_or_non_finite_input_is_an_error() {
        let file = TempFile::new("empty");
        let cases: [&[Series]; 3] = [
            &[],
            &[series("a", &[(1.0, 1.0)]), series("empty", &[])],
            &[series("a", &[(1.0, f64::NAN)])],
        ];
        for data in cases {
            let err = line_chart(&file.0, "t", "x", "y", false, false, data).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        }
        assert!(!file.0.exists());
    }

    #[test]
    fn write_failure_is_an_io_error() {
        let dir = TempFile::new("missing-dir");
        let path = dir.0.join("chart.svg");
        let data = [series("a", &[(1.0, 1.0), (2.0, 4.0)])];
        let err = line_chart(&path, "t", "x", "y", false, false, &data).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("chart.svg"), "{err}");
    }

    #[test]
    fn plot_tick_labels() {
        assert_eq!(format_tick(0.0), "0");
        assert_eq!(format_tick(1e3 + 1e-10), "1000");
        assert_eq!(format_tick(0.05), "0.05");
        assert_eq!(format_tick(0.1 + 0.2), "0.3");
        assert_eq!(format_tick(-2.5), "-2.5");
        assert_eq!(format_tick(1024.0), "1024");
        assert_eq!(format_tick(9999.0), "9999");
        assert_eq!(format_tick(1e4 + 1e-9), "10k");
        assert_eq!(format_tick(12_345.0), "12.345k");
        assert_eq!(format_tick(-250_000.0), "-250k");
        assert_eq!(format_tick(1e6), "1M");
        assert_eq!(format_tick(2.5e7), "25M");
        assert_eq!(format_tick(3e9), "3G");
        assert_eq!(format_tick(1e-4), "1e-4");
    }

    #[test]
    fn plot_axis_bounds() {
        let (lo, hi) = log_bounds(1.0, 1024.0);
        assert!(lo < 1.0 && lo > 0.5 && hi > 1024.0 && hi < 2048.0, "{lo}..{hi}");
        // No power of ten between 2 and 8: the range reaches down to 1.
        let (lo, hi) = log_bounds(2.0, 8.0);
        assert!(lo <= 1.0 && hi > 8.0, "{lo}..{hi}");
        let (lo, hi) = log_bounds(5.0, 5.0);
        assert!(lo < 5.0 && hi > 5.0, "{lo}..{hi}");
        assert_eq!(linear_bounds(3.0, 7.0, true).0, 0.0);
        let (lo, hi) = linear_bounds(0.0, 0.0, true);
        assert!(lo == 0.0 && hi > 0.0);
        let (lo, hi) = linear_bounds(-4.0, -4.0, false);
        assert!(lo < -4.0 && hi > -4.0);
    }

    #[test]
    fn plot_colours_are_distinct() {
        let colours: Vec<String> = (0..30).map(|i| hex(series_colour(i))).collect();
        for (i, a) in colours.iter().enumerate() {
            assert!(!colours[..i].contains(a), "colour {i} {a} repeats");
        }
    }
}
