//! `--plot FILE.svg|png`: one picture of the run: TTFT, TPOT and ITL distributions and
//! output tokens per second over the run.

use std::path::Path;

use anyhow::{bail, Context};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::client::Output;

const FONT_FILES: &[&str] =
    &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

pub fn register_font() -> anyhow::Result<()> {
    for f in FONT_FILES {
        if let Ok(bytes) = std::fs::read(f) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow::anyhow!("{f} is not a usable font"))?;
            return Ok(());
        }
    }
    bail!("--plot needs a TrueType font for its text: install fonts-dejavu-core (looked in {})", FONT_FILES.join(", "))
}

fn histogram<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, values_ms: &[f64]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let mut v: Vec<f64> = values_ms.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let hi = if v.is_empty() { 1.0 } else { super::metrics::percentile(&v, 99.5).max(1e-3) * 1.05 };
    let bins = 40usize;
    let width = hi / bins as f64;
    let mut counts = vec![0u32; bins];
    for x in &v {
        let b = ((x / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{title} (n={})", v.len()), ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..hi, 0u32..top + top / 10 + 1)?;
    chart.configure_mesh().x_desc("ms").y_desc("requests").draw()?;
    chart.draw_series(counts.iter().enumerate().map(|(i, c)| {
        let x0 = i as f64 * width;
        Rectangle::new([(x0, 0), (x0 + width, *c)], BLUE.mix(0.6).filled())
    }))?;
    if !v.is_empty() {
        for (p, color) in [(50.0, GREEN), (99.0, RED)] {
            let x = super::metrics::percentile(&v, p);
            chart
                .draw_series(LineSeries::new([(x, 0), (x, top)], color.stroke_width(2)))?
                .label(format!("p{p} {x:.1} ms"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    Ok(())
}

fn throughput<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, outputs: &[Output], duration: f64) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let n = duration.ceil().max(1.0) as usize;
    let mut tokens = vec![0f64; n];
    let mut done = vec![0f64; n];
    for o in outputs.iter().filter(|o| o.success) {
        for t in o.token_times() {
            tokens[(t as usize).min(n - 1)] += 1.0;
        }
        done[((o.start_time + o.latency) as usize).min(n - 1)] += 1.0;
    }
    let top = tokens.iter().copied().fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput over the run", ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .right_y_label_area_size(50)
        .build_cartesian_2d(0f64..n as f64, 0f64..top * 1.1)?
        .set_secondary_coord(0f64..n as f64, 0f64..done.iter().copied().fold(1.0, f64::max) * 1.1);
    chart.configure_mesh().x_desc("seconds").y_desc("output tokens/s").draw()?;
    chart.configure_secondary_axes().y_desc("requests done/s").draw()?;
    chart
        .draw_series(LineSeries::new(tokens.iter().enumerate().map(|(i, v)| (i as f64 + 0.5, *v)), BLUE.stroke_width(2)))?
        .label("output tokens/s")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], BLUE.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(done.iter().enumerate().map(|(i, v)| (i as f64 + 0.5, *v)), RED.stroke_width(2)))?
        .label("requests done/s")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], RED.stroke_width(2)));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    Ok(())
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, outputs: &[Output], duration: f64, title: &str) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let areas = root.split_evenly((2, 2));
    let ok: Vec<&Output> = outputs.iter().filter(|o| o.success).collect();
    let ttft: Vec<f64> = ok.iter().map(|o| o.ttft * 1000.0).collect();
    let tpot: Vec<f64> = ok.iter().filter(|o| !o.itl.is_empty()).map(|o| (o.latency - o.ttft) / o.itl.len() as f64 * 1000.0).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|o| o.itl.iter().map(|x| x * 1000.0)).collect();
    histogram(&areas[0], "TTFT", &ttft)?;
    histogram(&areas[1], "TPOT", &tpot)?;
    histogram(&areas[2], "ITL", &itl)?;
    throughput(&areas[3], outputs, duration)?;
    root.present()?;
    Ok(())
}

pub(crate) fn write(path: &Path, outputs: &[Output], duration: f64, title: &str) -> anyhow::Result<()> {
    register_font()?;
    let size = (1400, 1000);
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => draw(SVGBackend::new(path, size).into_drawing_area(), outputs, duration, title),
        Some("png") => draw(BitMapBackend::new(path, size).into_drawing_area(), outputs, duration, title),
        _ => bail!("--plot {}: the file must end in .svg or .png", path.display()),
    }
    .with_context(|| format!("cannot draw {}", path.display()))
}
