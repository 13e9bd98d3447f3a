//! kv_aware's second source of load: what the engines themselves report. Each healthy
//! worker's `/metrics` is read every second — at most [`MAX_SCRAPES_PER_SEC`] pages a
//! second in all, spread over the second, so past 64 workers each is read less often (every
//! 16 s at 1,024) and the cost stays flat as the cluster grows — for vLLM's `vllm:num_requests_waiting` and
//! `vllm:num_requests_running` per DP engine (`engine="N"`); what a rank reports beyond
//! the requests this router has in flight there is work from elsewhere (other router
//! replicas, clients that reach the engine directly), which the router's own reservations
//! cannot see. kv_aware prices it (policy/mod.rs); flow control reads the waiting ones as
//! each rank's queue (workers/room.rs). Read with the health check's timeout,
//! at most [`MAX_METRICS_BYTES`] of it; a worker that does not answer keeps no such load.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::api::prom::{label, samples};
use axum::http::HeaderValue;

use crate::router::workers::topology::Topology;
use crate::router::workers::Worker;

/// Scrapes are started every tick, in turn over the workers.
const TICK: Duration = Duration::from_millis(100);
/// Most `/metrics` pages read per second, whatever the number of workers.
const MAX_SCRAPES_PER_SEC: f64 = 64.0;
/// A vLLM /metrics page is tens of KiB; more is not read.
const MAX_METRICS_BYTES: usize = 4 << 20;

/// Polls every worker's /metrics each second (each within `timeout`, with `auth`).
pub(crate) async fn run(topology: Arc<Topology>, timeout: Duration, auth: Option<HeaderValue>) {
    let client = match crate::router::upstream::legs::control_client(Some(timeout)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot build the engine-load client: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Scrapes owed (fractional): each worker once a second, up to the cap.
    let (mut owed, mut cursor) = (0.0f64, 0usize);
    loop {
        tick.tick().await;
        let workers = topology.workers();
        if workers.is_empty() {
            continue;
        }
        owed += (workers.len() as f64).min(MAX_SCRAPES_PER_SEC) * TICK.as_secs_f64();
        let now = (owed.floor() as usize).min(workers.len());
        owed -= now as f64;
        let first = cursor;
        cursor = (cursor + now) % workers.len();
        let polls = (0..now).map(|j| poll(&client, auth.as_ref(), &workers[(first + j) % workers.len()]));
        futures_util::future::join_all(polls).await;
    }
}

async fn poll(client: &reqwest::Client, auth: Option<&HeaderValue>, w: &Arc<Worker>) {
    let reported = if w.is_healthy() { read(client, auth, &w.url).await } else { None };
    let reported = reported.unwrap_or_default();
    for rank in 0..w.dp_size() {
        let engine = reported.get(rank).copied().unwrap_or_default();
        w.set_reported_elsewhere(rank, (engine.waiting + engine.running).saturating_sub(w.rank_load(rank)));
        w.set_reported_waiting(rank, engine.waiting);
    }
}

/// What one engine (DP rank) reports of its requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct EngineRequests {
    pub(crate) waiting: usize,
    pub(crate) running: usize,
}

/// Requests waiting and running per engine, from the worker's /metrics.
async fn read(client: &reqwest::Client, auth: Option<&HeaderValue>, url: &str) -> Option<Vec<EngineRequests>> {
    let mut req = client.get(format!("{url}/metrics"));
    if let Some(auth) = auth {
        req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
    }
    let resp = req.send().await.ok().filter(|r| r.status().is_success())?;
    let mut body = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        body.extend_from_slice(&chunk.ok()?);
        if body.len() > MAX_METRICS_BYTES {
            return None;
        }
    }
    Some(requests_per_engine(&String::from_utf8_lossy(&body)))
}

/// `vllm:num_requests_waiting` and `vllm:num_requests_running`, indexed by the `engine`
/// label (no label: engine 0). Engines above 1024 are not believed.
pub(crate) fn requests_per_engine(text: &str) -> Vec<EngineRequests> {
    let mut per: Vec<EngineRequests> = Vec::new();
    let series =
        samples(text, "vllm:num_requests_waiting").map(|s| (true, s)).chain(samples(text, "vllm:num_requests_running").map(|s| (false, s)));
    for (waiting, (labels, n)) in series.filter(|(_, (_, n))| n.is_finite() && *n >= 0.0) {
        let engine = label(labels, "engine").and_then(|e| e.parse::<usize>().ok()).unwrap_or(0);
        if engine >= 1024 {
            continue;
        }
        if per.len() <= engine {
            per.resize(engine + 1, EngineRequests::default());
        }
        let slot = if waiting { &mut per[engine].waiting } else { &mut per[engine].running };
        *slot = slot.saturating_add(n as usize);
    }
    per
}

#[cfg(test)]
mod tests {
    use super::{requests_per_engine, EngineRequests};

    fn both(waiting: usize, running: usize) -> EngineRequests {
        EngineRequests { waiting, running }
    }

    #[test]
    fn waiting_and_running_are_read_per_engine() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2.0\n\
                    vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 0.0\n\
                    vllm:num_requests_running{model_name=\"m\",engine=\"1\"} 4\n\
                    vllm:num_requests_waiting_by_reason{engine=\"0\"} 9\n\
                    vllm:num_requests_running{engine=\"2\"} NaN\n";
        assert_eq!(requests_per_engine(text), vec![both(3, 2), both(0, 4)]);
        assert_eq!(requests_per_engine("vllm:num_requests_running 7\n"), vec![both(0, 7)], "no engine label: engine 0");
        assert_eq!(requests_per_engine("vllm:num_requests_running{engine=\"99999\"} 1\n"), Vec::<EngineRequests>::new());
    }
}
