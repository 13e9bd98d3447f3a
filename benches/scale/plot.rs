//! The scale bench's picture: each figure against the number of workers, one line per router.

use plotters::prelude::*;
use serde_json::Value;

const ROUTERS: &[(&str, RGBColor)] = &[
    ("disagg route kv_aware", RGBColor(31, 119, 180)),
    ("vllm-router round_robin", RGBColor(255, 127, 14)),
    ("vllm-router cache_aware", RGBColor(44, 160, 44)),
    ("vllm-router kv_aware", RGBColor(214, 39, 40)),
];

/// (title, the row's key).
const FIGURES: &[(&str, &str)] = &[
    ("router CPU per request (idle rate subtracted), ms", "cpu_ms_per_request"),
    ("p99 end-to-end latency, ms", "p99_e2e_ms"),
    ("idle CPU (health, intake, scrapes), % of a core", "idle_core_pct"),
    ("router RSS, MiB", "rss_mib"),
];

/// Writes `path` (.svg or .png) from the bench's report.
pub fn write(path: &std::path::Path, report: &Value) -> anyhow::Result<()> {
    disagg::bench::plot::register_font()?;
    let size = (1200, 900);
    if path.extension().is_some_and(|e| e == "png") {
        draw(BitMapBackend::new(path, size).into_drawing_area(), report)
    } else {
        draw(SVGBackend::new(path, size).into_drawing_area(), report)
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, report: &Value) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let points = report["points"].as_array().cloned().unwrap_or_default();
    let series = |router: &str, key: &str| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| Some((p["workers"].as_f64()?, p["routers"][router][key].as_f64()?)))
            .filter(|(_, y)| y.is_finite() && *y > 0.0)
            .collect()
    };
    let max_workers = points.iter().filter_map(|p| p["workers"].as_f64()).fold(2.0, f64::max);
    for (area, (title, key)) in root.split_evenly((2, 2)).iter().zip(FIGURES) {
        let top = ROUTERS.iter().flat_map(|(r, _)| series(r, key)).map(|(_, y)| y).fold(1.0, f64::max) * 1.3;
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((1.5f64..max_workers * 1.5).log_scale(), 0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("workers (x 8 DP ranks); a missing point: the router did not start")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for (router, color) in ROUTERS {
            let line = series(router, key);
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(*router)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(line.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
