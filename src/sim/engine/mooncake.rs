//! The simulator's MooncakeConnector pieces (docs/PROTOCOLS.md §2): a prefill's bootstrap
//! server, which answers `GET /query` with each DP engine's id and worker address, as
//! vLLM's `MooncakeBootstrapServer` does (`{"<dp_rank>": {"engine_id": E, "worker_addr":
//! {"<tp_rank>": {"<pp_rank>": "tcp://host:port"}}}}`), and a decode's lookup of the
//! engine a transfer comes from.

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use super::side_channel::Peer;
use crate::api::join_host_port;

/// What `/query` answers for engines `(engine_id, side host, side port)` in rank order.
pub(crate) fn query_body(engines: &[(String, String, u16)]) -> Value {
    let ranks: Map<String, Value> = engines
        .iter()
        .enumerate()
        .map(|(rank, (id, host, port))| {
            let addr = format!("tcp://{}", join_host_port(host, *port));
            (rank.to_string(), json!({"engine_id": id, "worker_addr": {"0": {"0": addr}}}))
        })
        .collect();
    Value::Object(ranks)
}

/// Serves the bootstrap server's `GET /query` (the registry is fixed: the simulator's
/// engines register themselves at start).
pub(crate) async fn serve_bootstrap(listener: TcpListener, query: Value) -> std::io::Result<()> {
    let app = axum::Router::new().route("/query", axum::routing::get(move || async move { axum::Json(query) }));
    axum::serve(listener, app).await
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("an HTTP client builds"))
}

/// The side channel of engine `engine_id`, from the bootstrap server at `bootstrap_addr`
/// (`http://host:port`), as vLLM's decode worker finds the prefill worker it pulls from.
pub(crate) async fn worker_peer(bootstrap_addr: &str, engine_id: &str) -> Result<Peer, String> {
    let url = format!("{}/query", bootstrap_addr.trim_end_matches('/'));
    let resp = client().get(&url).send().await.map_err(|e| format!("bootstrap server {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("bootstrap server {url} answered {}", resp.status()));
    }
    let body = resp.bytes().await.map_err(|e| format!("bootstrap server {url}: {e}"))?;
    let ranks: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| format!("bootstrap server {url}: {e}"))?;
    let entry = ranks
        .values()
        .find(|e| e.get("engine_id").and_then(Value::as_str) == Some(engine_id))
        .ok_or_else(|| format!("bootstrap server {url} lists no engine {engine_id}"))?;
    let addr = entry
        .pointer("/worker_addr/0/0")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{url}: engine {engine_id} has no worker address"))?;
    parse_tcp(addr).ok_or_else(|| format!("{url}: worker address {addr:?} is not tcp://host:port"))
}

fn parse_tcp(addr: &str) -> Option<Peer> {
    let (host, port) = addr.strip_prefix("tcp://")?.rsplit_once(':')?;
    Some(Peer { host: host.to_string(), port: port.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_lists_every_rank_as_vllms_bootstrap_server_does() {
        let q = query_body(&[("e0".into(), "127.0.0.1".into(), 5000), ("e1".into(), "::1".into(), 5001)]);
        assert_eq!(q["0"]["engine_id"], "e0");
        assert_eq!(q["1"]["worker_addr"]["0"]["0"], "tcp://[::1]:5001");
        assert_eq!(parse_tcp("tcp://[::1]:5001"), Some(Peer { host: "[::1]".into(), port: 5001 }));
        assert_eq!(parse_tcp("http://h:1"), None);
    }
}
