//! Mooncake's bootstrap server on a prefill (docs/PROTOCOLS.md §2): where it is, and the
//! engine ids it lists per DP rank.

/// A Mooncake prefill's bootstrap server: its URL's host (IPv6 in brackets) at `port`.
pub(crate) fn address(url: &str, port: u16) -> String {
    // `host_str` keeps IPv6 brackets, which join_host_port leaves as they are.
    let host = reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    format!("http://{}", crate::api::join_host_port(&host, port))
}

/// A Mooncake prefill's engine ids, one per DP rank, from its bootstrap server:
/// `GET {bootstrap}/query` answers `{"<dp_rank>": {"engine_id": .., "worker_addr": ..}}`.
/// The ranks must be 0..k with no gaps; at most `dp_size` of them are returned (a worker
/// that lists fewer serves fewer than configured, and the caller learns that).
pub(crate) async fn engine_ids(client: &reqwest::Client, bootstrap: &str, dp_size: usize) -> Result<Vec<String>, String> {
    let url = format!("{bootstrap}/query");
    let resp = client.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    // A registry of a few ranks is small; a larger answer is cut off.
    let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(reqwest::Body::from(resp), 1 << 20))
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    let map: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(|e| format!("{url} did not answer a JSON object: {e}"))?;
    let engine_id = |r: usize| map.get(&r.to_string()).and_then(|e| e.get("engine_id")).and_then(|v| v.as_str()).map(str::to_owned);
    let ids: Vec<String> = (0..map.len()).map_while(engine_id).collect();
    if ids.is_empty() || ids.len() != map.len() {
        return Err(format!("{url} lists DP ranks {:?}, not 0..k with an engine id each", sorted_keys(&map)));
    }
    Ok(ids.into_iter().take(dp_size).collect())
}

fn sorted_keys(map: &std::collections::HashMap<String, serde_json::Value>) -> Vec<&str> {
    let mut k: Vec<&str> = map.keys().map(String::as_str).collect();
    k.sort();
    k
}
