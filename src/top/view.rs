//! Drawing `disagg top` (ratatui): the router's minute on top, one row per worker below,
//! fitted to 80 columns (per-rank lists are summed when they do not fit).

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;

use super::sample::{Window, WorkerView};

fn ms(secs: Option<f64>) -> String {
    secs.map_or("-".into(), |s| format!("{:.0}ms", s * 1000.0))
}

/// Per-rank counts: `3` for one rank, `1/2` for two, their sum past that width.
fn ranks(v: &[u64], width: usize) -> String {
    let listed = v.iter().map(u64::to_string).collect::<Vec<_>>().join("/");
    if listed.len() <= width {
        listed
    } else {
        format!("Σ{}", v.iter().sum::<u64>())
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{:.0}%", x * 100.0))
}

fn row(w: &WorkerView, window: &Window) -> Row<'static> {
    let health = if w.healthy { "up" } else { "DOWN" };
    let url = w.url.trim_start_matches("http://").trim_start_matches("https://").to_string();
    Row::new(vec![
        w.role.clone(),
        health.to_string(),
        w.circuit.clone(),
        ranks(&w.in_flight, 7),
        ranks(&w.queue, 7),
        ranks(&w.elsewhere, 6),
        pct(w.kv_usage),
        pct(window.hit_rate(&w.url)),
        url,
    ])
}

pub(super) fn draw(f: &mut Frame, url: &str, window: &Window) {
    let [head, body, foot] = Layout::vertical([Constraint::Length(3), Constraint::Min(3), Constraint::Length(1)]).areas(f.area());
    let latest = window.latest();
    let summary = match window.router() {
        Some(r) => format!(
            "{:.1} req/s   TTFT p50 {} p99 {}   errors {}   queued {}   (last {:.0}s)",
            r.requests_per_sec,
            ms(r.ttft_p50),
            ms(r.ttft_p99),
            r.errors,
            latest.map_or(0, |s| s.queued),
            r.seconds
        ),
        None => "reading...".to_string(),
    };
    let mut lines = vec![Line::from(summary)];
    if let Some(e) = latest.and_then(|s| s.error.as_deref()) {
        lines.push(Line::from(format!("! {e}")));
    }
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(format!(" disagg top: {url} "))), head);
    let header = Row::new(["role", "health", "circuit", "inflt", "queue", "else", "kv", "hit", "worker"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = latest.map(|s| s.workers.iter().map(|w| row(w, window)).collect()).unwrap_or_default();
    let widths = [
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Min(10),
    ];
    f.render_widget(Table::new(rows, widths).header(header), body);
    f.render_widget(Paragraph::new("q quits · per DP rank: inflt, queue, else · kv: used · hit: prefix, 1 min"), foot);
}
