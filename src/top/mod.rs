//! `disagg top`: a live terminal view of a running router. Every interval it reads the
//! router's `/workers` and `/metrics` (with the admin key) and each worker's own `/metrics`
//! (vLLM's KV usage and prefix-cache counters), keeps a minute of samples, and draws one line
//! per worker and the router's rate, TTFT p50/p99 and errors over that minute (view.rs).
//! `q` (or Esc, or Ctrl-C) quits.

mod sample;
mod view;

use std::time::Duration;

use clap::Args;

use sample::{Sample, Window};

#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// The router's URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub(crate) url: String,
    /// The router's admin key (/workers and /metrics require it when it is set).
    #[arg(long, env = "DISAGG_ADMIN_API_KEY", hide_env_values = true)]
    pub(crate) admin_api_key: Option<String>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    pub(crate) interval_secs: f64,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: seconds from 0.1 to 60")),
    }
}

pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let mut terminal = ratatui::init();
    let result = watch(&client, &url, args.admin_api_key.as_deref(), Duration::from_secs_f64(args.interval_secs), &mut terminal).await;
    ratatui::restore();
    result
}

async fn watch(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    every: Duration,
    terminal: &mut ratatui::DefaultTerminal,
) -> anyhow::Result<()> {
    let mut window = Window::default();
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    // Key presses are read on a thread of their own (crossterm's read blocks).
    std::thread::spawn(move || loop {
        match crossterm::event::read() {
            Ok(event) => {
                if keys_tx.send(event).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let sample = Sample::read(client, url, key).await;
                window.push(sample);
                terminal.draw(|f| view::draw(f, url, &window))?;
            }
            event = keys.recv() => match event {
                Some(crossterm::event::Event::Key(k)) if quits(&k) => return Ok(()),
                Some(crossterm::event::Event::Resize(..)) => {
                    terminal.draw(|f| view::draw(f, url, &window))?;
                }
                Some(_) => {}
                None => return Ok(()),
            },
        }
    }
}

fn quits(k: &crossterm::event::KeyEvent) -> bool {
    use crossterm::event::{KeyCode, KeyEventKind, KeyModifiers};
    k.kind == KeyEventKind::Press
        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
            || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL)))
}
