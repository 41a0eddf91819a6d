//! PNG line charts of the sweeps (plotters), written beside each benchmark's markdown: one
//! line per variant against the number of services, log scales so that a flat line and a
//! 100× slope are both readable.

use std::{path::Path, sync::OnceLock};

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;

/// The font the charts use (Debian's fonts-dejavu-core, installed by `cargo xtask setup`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One line: a name and (services, value) points; points without a value are left out.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: &str, points: impl IntoIterator<Item = (u32, Option<f64>)>) -> Series {
        let points = points.into_iter().filter_map(|(n, v)| v.map(|v| (n.max(1) as f64, v))).collect();
        Series { name: name.into(), points }
    }
}

fn font() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (run `cargo xtask setup`)"))?;
            plotters::style::register_font(
                "sans-serif",
                FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            )
            .map_err(|_| format!("{FONT}: not a usable font"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Writes a log-log chart of `series` against the number of services to `path`.
pub fn chart(path: &Path, title: &str, y_label: &str, series: &[Series]) -> anyhow::Result<()> {
    font()?;
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    anyhow::ensure!(!all.is_empty(), "{title}: nothing to plot");
    let x_min = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) / 1.5;
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max) * 1.5;
    let y_min = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min).max(1e-3) / 1.5;
    // Headroom above the highest point: the legend sits there.
    let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max) * 8.0;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| draw(&e))?;
    ctx.configure_mesh()
        .x_desc("services")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") })
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| draw(&e))?;
    for (i, s) in series.iter().enumerate().filter(|(_, s)| !s.points.is_empty()) {
        let color = Palette99::pick(i).to_rgba();
        ctx.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        ctx.draw_series(s.points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| draw(&e))?;
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
