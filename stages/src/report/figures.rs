//! The report's figures, drawn once with plotters into an SVG string (inlined in the HTML) and
//! a PNG, with an embedded font (DejaVu Sans) so the PNGs look the same on every machine,
//! fonts installed or not.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::kind::StageError;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

const FAMILY: &str = "sans-serif";

/// Colors that stay distinct on white (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line or set of points.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Marker radius per point (None: lines only).
    pub sizes: Option<Vec<f64>>,
    /// Draw the connecting line.
    pub line: bool,
    /// A reference point (drawn black, as a cross).
    pub reference: bool,
    /// Per point, the 95% interval of x (horizontal whisker), if any: empty or one per point.
    pub x_err: Vec<Option<(f64, f64)>>,
    /// Per point, the 95% interval of y (vertical whisker), if any: empty or one per point.
    pub y_err: Vec<Option<(f64, f64)>>,
}

impl Series {
    /// A series without error bars (curves, spectra, ranks: no sampling noise to show).
    pub fn plain(label: String, points: Vec<(f64, f64)>, sizes: Option<Vec<f64>>) -> Series {
        Series {
            label,
            points,
            sizes,
            line: true,
            reference: false,
            x_err: Vec::new(),
            y_err: Vec::new(),
        }
    }
}

/// Whiskers (an SVG polyline for the bar, one for each end cap) are drawn at this opacity and
/// one pixel wide, which no other line of a figure uses: readers see them as secondary to the
/// points, and tests can find them in the SVG.
pub const WHISKER_OPACITY: f64 = 0.7;

/// Width of a whisker's end cap, pixels.
pub const WHISKER_CAP: u32 = 6;

/// One chart panel.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// A figure: panels in a grid of `cols` columns.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub title: String,
    pub panels: Vec<Panel>,
    pub cols: usize,
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - pad, hi + pad)
}

/// Tick labels: integers without decimals, thousands as k/M/B, others to 3 significant places.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{}B", trim(v / 1e9))
    } else if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        return format!("{v:.0}");
    }
    let digits = (3 - v.abs().log10().floor() as i32 - 1).clamp(0, 6) as usize;
    let s = format!("{v:.digits$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A whisker: from, to (data coordinates), vertical.
type Bar = ((f64, f64), (f64, f64), bool);

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    // The axes cover the whiskers too, so no interval is clipped.
    let ends = |e: &[Option<(f64, f64)>]| -> Vec<f64> {
        e.iter().flatten().flat_map(|&(a, b)| [a, b]).collect()
    };
    let xs = range(
        p.series
            .iter()
            .flat_map(|s| s.points.iter().map(|q| q.0).chain(ends(&s.x_err))),
    );
    let mut ys = range(
        p.series
            .iter()
            .flat_map(|s| s.points.iter().map(|q| q.1).chain(ends(&s.y_err))),
    );
    let integer_x = p
        .series
        .iter()
        .flat_map(|s| &s.points)
        .all(|q| q.0.fract() == 0.0);
    let legend = p.series.len() > 1 || p.series.iter().any(|s| s.reference);
    if legend {
        // Room above the data for the legend box (upper right), so it hides nothing.
        ys.1 += (ys.1 - ys.0) * (0.12 + 0.07 * p.series.len() as f64);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| {
            // Integer data (layers, steps): no labels between the integers.
            if integer_x && v.fract().abs() > 1e-9 {
                String::new()
            } else {
                tick(*v)
            }
        })
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;
    let mut color_index = 0;
    for s in &p.series {
        let color = if s.reference {
            BLACK
        } else {
            let c = PALETTE[color_index % PALETTE.len()];
            color_index += 1;
            c
        };
        let style = color.stroke_width(2);
        let anno = if s.line {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(|e| err(&e))?
        } else {
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(|e| err(&e))?
        };
        anno.label(s.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 16, y + 4)], color.filled()));
        let whisker = color.mix(WHISKER_OPACITY).stroke_width(1);
        let finite = |&(lo, hi): &(f64, f64)| lo.is_finite() && hi.is_finite();
        // (from, to, vertical) in data coordinates, one per interval.
        let bars: Vec<Bar> = s
            .points
            .iter()
            .zip(&s.y_err)
            .filter_map(|(&(x, _), e)| {
                let (lo, hi) = e.filter(finite)?;
                Some(((x, lo), (x, hi), true))
            })
            .chain(s.points.iter().zip(&s.x_err).filter_map(|(&(_, y), e)| {
                let (lo, hi) = e.filter(finite)?;
                Some(((lo, y), (hi, y), false))
            }))
            .collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(a, b, _)| PathElement::new(vec![a, b], whisker)),
            )
            .map_err(|e| err(&e))?;
        let h = WHISKER_CAP as i32 / 2;
        chart
            .draw_series(bars.iter().flat_map(|&(a, b, vertical)| {
                let cap = if vertical {
                    vec![(-h, 0), (h, 0)]
                } else {
                    vec![(0, -h), (0, h)]
                };
                [a, b].map(|end| EmptyElement::at(end) + PathElement::new(cap.clone(), whisker))
            }))
            .map_err(|e| err(&e))?;
        if s.reference {
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|&q| Cross::new(q, 7, BLACK.stroke_width(3))),
                )
                .map_err(|e| err(&e))?;
        } else if let Some(sizes) = &s.sizes {
            chart
                .draw_series(
                    s.points
                        .iter()
                        .zip(sizes)
                        .map(|(&q, &r)| Circle::new(q, r.round() as i32, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FAMILY, 13))
            .draw()
            .map_err(|e| err(&e))?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, f: &Figure) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let body = if f.title.is_empty() {
        root.clone()
    } else {
        root.titled(&f.title, (FAMILY, 22))
            .map_err(|e| e.to_string())?
    };
    let cols = f.cols.max(1).min(f.panels.len().max(1));
    let rows = f.panels.len().div_ceil(cols).max(1);
    let areas = body.split_evenly((rows, cols));
    for (area, panel) in areas.iter().zip(&f.panels) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(|e| e.to_string())
}

impl Figure {
    /// Pixel size: 560 x 420 per panel.
    pub fn size(&self) -> (u32, u32) {
        let cols = self.cols.max(1).min(self.panels.len().max(1));
        let rows = self.panels.len().div_ceil(cols).max(1);
        (
            560 * cols as u32,
            420 * rows as u32 + if self.title.is_empty() { 0 } else { 36 },
        )
    }

    /// Writes `NAME.svg` and `NAME.png` into `dir`; returns the SVG text.
    pub fn render(&self, dir: &Path) -> Result<String, StageError> {
        REGISTER.call_once(|| {
            let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
        });
        let fail = |e: String| StageError::Failed(format!("figure `{}`: {e}", self.name));
        let size = self.size();
        let mut svg = String::new();
        draw(
            SVGBackend::with_string(&mut svg, size).into_drawing_area(),
            self,
        )
        .map_err(fail)?;
        let svg_path = dir.join(format!("{}.svg", self.name));
        std::fs::write(&svg_path, &svg)
            .map_err(|e| StageError::io(format!("writing {}", svg_path.display()), e))?;
        let png_path = dir.join(format!("{}.png", self.name));
        draw(
            BitMapBackend::new(&png_path, size).into_drawing_area(),
            self,
        )
        .map_err(fail)?;
        Ok(svg)
    }
}

#[cfg(test)]
mod tests {
    use super::tick;

    #[test]
    fn ticks_read_well() {
        assert_eq!(tick(2000.0), "2000");
        assert_eq!(tick(40000.0), "40k");
        assert_eq!(tick(1.5e6), "1.5M");
        assert_eq!(tick(0.05), "0.05");
        assert_eq!(tick(-0.125), "-0.125");
        assert_eq!(tick(25.0), "25");
        assert_eq!(tick(0.333333), "0.333");
    }
}
