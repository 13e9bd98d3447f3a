//! Each router's memory holding many open streams.

use super::*;

/// Opens `n` streams through a fresh router (disagg, or vllm-router at `vr`) to a slow
/// decode; returns the router's RSS (KiB) before and while holding them, and how many
/// were open.
pub(crate) async fn open_streams(prefill: &str, vr: Option<&str>, n: usize) -> (u64, u64, usize) {
    let decode = start(&[
        "sim",
        "--port",
        "0",
        "--role",
        "decode",
        "--kv-blocks",
        "2000000",
        "--max-num-seqs",
        "100000",
        "--decode-ms-per-token",
        "1000",
    ])
    .await;
    let router = match vr {
        Some(bin) => start_vllm_router(bin, prefill, &decode.url).await,
        None => {
            start(&[
                "route",
                "--port",
                "0",
                "--max-concurrent-requests",
                "100000",
                "--queue-size",
                "100000",
                "--prefill",
                prefill,
                "--decode",
                &decode.url,
            ])
            .await
        }
    };
    wait_healthy(&router.url).await;
    let pid = router.child.id().unwrap();
    let idle = proc_field(pid, "VmRSS:");
    // 32 streams per HTTP/2 connection: the router's --h2-max-concurrent-streams default (a
    // client opening more waits for its streams to end).
    const PER_CONNECTION: usize = 32;
    let clients: Vec<reqwest::Client> =
        (0..n.div_ceil(PER_CONNECTION)).map(|_| reqwest::Client::builder().http2_prior_knowledge().build().unwrap()).collect();
    let url = format!("{}/v1/completions", router.url);
    let opened = Arc::new(AtomicU64::new(0));
    let mut held = Vec::new();
    // Open in waves so the prefill legs stay a few hundred at a time.
    for wave in (0..n).collect::<Vec<_>>().chunks(500) {
        let starts: Vec<_> = wave
            .iter()
            .map(|i| {
                let (c, url, opened) = (clients[i / PER_CONNECTION].clone(), url.clone(), opened.clone());
                let i = *i;
                tokio::spawn(async move {
                    let mut resp = c
                        .post(url)
                        .json(
                            &json!({"model": "sim-model", "prompt": format!("s{i}"), "max_tokens": 60, "ignore_eos": true, "stream": true}),
                        )
                        .send()
                        .await
                        .ok()?;
                    resp.chunk().await.ok()??;
                    opened.fetch_add(1, Ordering::Relaxed);
                    Some(resp)
                })
            })
            .collect();
        for s in starts {
            if let Some(resp) = s.await.unwrap() {
                held.push(resp);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = proc_field(pid, "VmRSS:");
    let open = opened.load(Ordering::Relaxed) as usize;
    drop(held);
    (idle, busy, open)
}
