//! What `disagg top` reads each interval, and the minute of samples rates are taken over.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::prom;

/// How far back rates and percentiles look.
const WINDOW: Duration = Duration::from_secs(60);
/// Bytes read of any one answer.
const MAX_PAGE: usize = 8 << 20;

/// One worker as /workers and its own /metrics show it.
#[derive(Clone, Debug, Default)]
pub(crate) struct WorkerView {
    pub(crate) url: String,
    pub(crate) role: String,
    pub(crate) healthy: bool,
    pub(crate) circuit: String,
    pub(crate) in_flight: Vec<u64>,
    pub(crate) queue: Vec<u64>,
    pub(crate) elsewhere: Vec<u64>,
    /// vLLM's `vllm:kv_cache_usage_perc` (the largest over its ranks).
    pub(crate) kv_usage: Option<f64>,
    /// vLLM's prefix-cache hits and queries (tokens, counters).
    pub(crate) prefix_hits: Option<f64>,
    pub(crate) prefix_queries: Option<f64>,
}

/// The router's counters at one moment.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: f64,
    pub(crate) errors: f64,
    /// `disagg_router_ttft_seconds` buckets summed over endpoints: (upper bound, count).
    pub(crate) ttft_buckets: Vec<(f64, f64)>,
}

pub(crate) struct Sample {
    pub(crate) at: Instant,
    pub(crate) workers: Vec<WorkerView>,
    pub(crate) counters: Option<Counters>,
    pub(crate) queued: u64,
    pub(crate) error: Option<String>,
}

async fn page(client: &reqwest::Client, url: String, key: Option<&str>) -> Result<String, String> {
    let mut req = client.get(&url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let mut resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        if body.len() + chunk.len() > MAX_PAGE {
            return Err(format!("{url}: answer over {MAX_PAGE} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| format!("{url}: not UTF-8"))
}

fn sum(text: &str, name: &str) -> f64 {
    prom::samples(text, name).map(|(_, v)| v).sum()
}

/// The router's counters off its /metrics page.
pub(crate) fn counters(text: &str) -> Counters {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for (labels, v) in prom::samples(text, "disagg_router_ttft_seconds_bucket") {
        let le = match prom::label(labels, "le") {
            Some("+Inf") => f64::INFINITY,
            Some(s) => match s.parse() {
                Ok(x) => x,
                Err(_) => continue,
            },
            None => continue,
        };
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(b) => b.1 += v,
            None => buckets.push((le, v)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Counters { requests: sum(text, "disagg_router_requests_total"), errors: sum(text, "disagg_router_errors_total"), ttft_buckets: buckets }
}

fn numbers(v: &Value) -> Vec<u64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

impl Sample {
    pub(crate) async fn read(client: &reqwest::Client, url: &str, key: Option<&str>) -> Sample {
        let at = Instant::now();
        let (workers, metrics) = tokio::join!(page(client, format!("{url}/workers"), key), page(client, format!("{url}/metrics"), key));
        let mut error = None;
        let listed: Value = match workers.and_then(|t| serde_json::from_str(&t).map_err(|e| format!("{url}/workers: {e}"))) {
            Ok(v) => v,
            Err(e) => {
                error = Some(e);
                Value::Null
            }
        };
        let counters = match metrics {
            Ok(text) => Some(counters(&text)),
            Err(e) => {
                error.get_or_insert(e);
                None
            }
        };
        let mut views: Vec<WorkerView> = listed["workers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|w| WorkerView {
                        url: w["url"].as_str().unwrap_or_default().to_string(),
                        role: w["role"].as_str().unwrap_or_default().to_string(),
                        healthy: w["healthy"].as_bool().unwrap_or(false),
                        circuit: w["circuit"].as_str().unwrap_or_default().to_string(),
                        in_flight: numbers(&w["ranks_in_flight"]),
                        queue: numbers(&w["ranks_queue"]),
                        elsewhere: numbers(&w["ranks_requests_elsewhere"]),
                        ..WorkerView::default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Each engine's own /metrics: vLLM needs no key for it.
        let engine_pages = futures_util::future::join_all(views.iter().map(|w| page(client, format!("{}/metrics", w.url), None))).await;
        for (w, text) in views.iter_mut().zip(engine_pages) {
            if let Ok(text) = text {
                w.kv_usage = prom::samples(&text, "vllm:kv_cache_usage_perc").map(|(_, v)| v).reduce(f64::max);
                w.prefix_hits = Some(sum(&text, "vllm:prefix_cache_hits_total"));
                w.prefix_queries = Some(sum(&text, "vllm:prefix_cache_queries_total"));
            }
        }
        Sample { at, workers: views, counters, queued: listed["queued"].as_u64().unwrap_or(0), error }
    }
}

/// The last minute of samples.
#[derive(Default)]
pub(crate) struct Window {
    samples: VecDeque<Sample>,
}

/// The router over the window.
pub(crate) struct RouterRates {
    pub(crate) requests_per_sec: f64,
    pub(crate) errors: f64,
    pub(crate) ttft_p50: Option<f64>,
    pub(crate) ttft_p99: Option<f64>,
    pub(crate) seconds: f64,
}

/// A quantile from cumulative histogram buckets (Prometheus' histogram_quantile, linear
/// within a bucket).
pub(crate) fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = if count > prev.1 { (rank - prev.1) / (count - prev.1) } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, count);
    }
    None
}

impl Window {
    pub(crate) fn push(&mut self, s: Sample) {
        let now = s.at;
        self.samples.push_back(s);
        while self.samples.front().is_some_and(|f| now.duration_since(f.at) > WINDOW) {
            self.samples.pop_front();
        }
    }

    pub(crate) fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    fn oldest_with_counters(&self) -> Option<&Sample> {
        self.samples.iter().find(|s| s.counters.is_some())
    }

    /// The router's rate, errors and TTFT over the window (None before two readings).
    pub(crate) fn router(&self) -> Option<RouterRates> {
        let (old, new) = (self.oldest_with_counters()?, self.samples.iter().rev().find(|s| s.counters.is_some())?);
        let (a, b) = (old.counters.as_ref()?, new.counters.as_ref()?);
        let seconds = new.at.duration_since(old.at).as_secs_f64();
        if seconds <= 0.0 {
            return None;
        }
        let delta: Vec<(f64, f64)> =
            b.ttft_buckets.iter().map(|(le, n)| (*le, n - a.ttft_buckets.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1))).collect();
        Some(RouterRates {
            requests_per_sec: (b.requests - a.requests).max(0.0) / seconds,
            errors: (b.errors - a.errors).max(0.0),
            ttft_p50: quantile(0.5, &delta),
            ttft_p99: quantile(0.99, &delta),
            seconds,
        })
    }

    /// A worker's prefix-cache hit rate over the window (its own counters), when it has
    /// been queried.
    pub(crate) fn hit_rate(&self, url: &str) -> Option<f64> {
        let find = |s: &Sample| s.workers.iter().find(|w| w.url == url).and_then(|w| Some((w.prefix_hits?, w.prefix_queries?)));
        let old = self.samples.iter().find_map(find)?;
        let new = self.samples.iter().rev().find_map(find)?;
        let queries = new.1 - old.1;
        (queries > 0.0).then(|| (new.0 - old.0) / queries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_read_from_buckets_as_prometheus_does() {
        let b = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &b).unwrap() - 0.1).abs() < 1e-9);
        assert!((quantile(0.7, &b).unwrap() - 0.3).abs() < 1e-9);
        assert!((quantile(0.99, &b).unwrap() - 0.95).abs() < 1e-9);
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
    }

    #[test]
    fn the_routers_counters_are_summed_over_their_series() {
        let text = "disagg_router_requests_total{endpoint=\"completions\",status=\"200\"} 7\n\
                    disagg_router_requests_total{endpoint=\"chat_completions\",status=\"200\"} 3\n\
                    disagg_router_errors_total{cause=\"timeout\"} 2\n\
                    disagg_router_ttft_seconds_bucket{endpoint=\"completions\",le=\"0.1\"} 4\n\
                    disagg_router_ttft_seconds_bucket{endpoint=\"chat_completions\",le=\"0.1\"} 1\n\
                    disagg_router_ttft_seconds_bucket{endpoint=\"completions\",le=\"+Inf\"} 7\n\
                    disagg_router_ttft_seconds_bucket{endpoint=\"chat_completions\",le=\"+Inf\"} 3\n";
        let c = counters(text);
        assert_eq!((c.requests, c.errors), (10.0, 2.0));
        assert_eq!(c.ttft_buckets, vec![(0.1, 5.0), (f64::INFINITY, 10.0)]);
    }
}
