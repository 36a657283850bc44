//! Bar charts of benchmark results (SVG, through plotters): a picture in the README says more
//! than a 30-row table about which way of starting a container wins where.

use std::path::Path;

use plotters::prelude::*;

/// One bar: `value` of `series` (a mode) within `group` (a workload under a profile).
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// The cluster the bar belongs to, e.g. `python / wan`.
    pub group: String,
    /// The contender, coloured the same in every group.
    pub series: String,
    /// Seconds (or any non-negative figure).
    pub value: f64,
}

/// Writes a horizontal bar chart of `bars` to `path` as SVG: one row per bar, grouped in the
/// order the groups first appear, each series in its own colour, the value printed at the end
/// of its bar.
pub fn bar_chart(path: &Path, title: &str, bars: &[Bar]) -> Result<(), ChartError> {
    if bars.is_empty() {
        return Err(ChartError("no bars to draw".into()));
    }
    let mut series: Vec<&str> = Vec::new();
    for b in bars {
        if !series.contains(&b.series.as_str()) {
            series.push(&b.series);
        }
    }
    let mut groups: Vec<&str> = Vec::new();
    for b in bars {
        if !groups.contains(&b.group.as_str()) {
            groups.push(&b.group);
        }
    }
    // Rows top to bottom: each group's bars, then a gap.
    let mut rows: Vec<(String, &Bar)> = Vec::new();
    let mut gaps = 0;
    for g in &groups {
        for b in bars.iter().filter(|b| b.group == *g) {
            rows.push((format!("{} · {}", b.group, b.series), b));
        }
        gaps += 1;
    }
    let n = rows.len() + gaps;
    let height = 80 + 22 * n as u32;
    let max = bars
        .iter()
        .map(|b| b.value)
        .fold(0.0_f64, f64::max)
        .max(0.001)
        * 1.15;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(ChartError::from_draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max, 0.0..n as f64)
        .map_err(ChartError::from_draw)?;
    // Row i (from the top) spans y in [n-i-1, n-i).
    let mut labels: Vec<(f64, String)> = Vec::new();
    let mut placed: Vec<(usize, &Bar)> = Vec::new();
    let mut i = 0;
    for g in &groups {
        for (label, b) in rows.iter().filter(|(_, b)| b.group == *g) {
            labels.push(((n - i - 1) as f64 + 0.5, label.clone()));
            placed.push((i, b));
            i += 1;
        }
        i += 1;
    }
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("seconds")
        .draw()
        .map_err(ChartError::from_draw)?;
    for (y, label) in &labels {
        root.draw(&Text::new(
            label.clone(),
            (12, chart.backend_coord(&(0.0, *y)).1 - 7),
            ("sans-serif", 13).into_font(),
        ))
        .map_err(ChartError::from_draw)?;
    }
    chart
        .draw_series(placed.iter().map(|(i, b)| {
            let colour = Palette99::pick(series.iter().position(|s| *s == b.series).unwrap_or(0));
            let top = (n - i) as f64 - 0.15;
            Rectangle::new([(0.0, top - 0.7), (b.value, top)], colour.filled())
        }))
        .map_err(ChartError::from_draw)?;
    chart
        .draw_series(placed.iter().map(|(i, b)| {
            Text::new(
                format!("{:.2}", b.value),
                (b.value, (n - i) as f64 - 0.2),
                ("sans-serif", 12).into_font(),
            )
        }))
        .map_err(ChartError::from_draw)?;
    root.present().map_err(ChartError::from_draw)?;
    Ok(())
}

/// Why a chart could not be drawn (plotters' errors are generic over the backend).
#[derive(Debug)]
pub struct ChartError(String);

impl ChartError {
    fn from_draw<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> ChartError {
        ChartError(e.to_string())
    }
}

impl std::fmt::Display for ChartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "drawing the chart: {}", self.0)
    }
}

impl std::error::Error for ChartError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_every_bar_and_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let bars = vec![
            Bar {
                group: "python / wan".into(),
                series: "containerd".into(),
                value: 12.5,
            },
            Bar {
                group: "python / wan".into(),
                series: "lazypull-prefetch".into(),
                value: 1.25,
            },
            Bar {
                group: "tiny / wan".into(),
                series: "containerd".into(),
                value: 0.5,
            },
        ];
        bar_chart(&path, "first line", &bars).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for text in [
            "12.50",
            "1.25",
            "0.50",
            "python / wan · lazypull-prefetch",
            "first line",
        ] {
            assert!(svg.contains(text), "{text} missing from the chart");
        }
        assert!(svg.matches("<rect").count() >= 3);
    }

    #[test]
    fn no_bars_is_an_error_not_an_empty_picture() {
        let dir = tempfile::tempdir().unwrap();
        assert!(bar_chart(&dir.path().join("c.svg"), "t", &[]).is_err());
    }
}
