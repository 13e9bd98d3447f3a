//! worker_client.rs against a raw TCP server on loopback that answers as scripted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderValue;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{post, Error, Request};

/// What the server does for one request.
#[derive(Clone)]
enum Step {
    Write(&'static [u8]),
    Pause(u64),
    /// Closes the connection (the rest of the script is not run).
    Close,
}

struct Server {
    url: String,
    connections: Arc<AtomicUsize>,
    /// Each request as received: head and body.
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Set when a connection reached its end (the client closed it).
    closed_by_client: Arc<AtomicUsize>,
}

/// A server answering the n-th request it receives (counted over all connections) with
/// `script(n)`.
async fn server(script: impl Fn(usize) -> Vec<Step> + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/pre", listener.local_addr().unwrap());
    let (connections, requests, closed_by_client) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
    let script = Arc::new(script);
    let (c, r, closed) = (connections.clone(), requests.clone(), closed_by_client.clone());
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            let (script, r, closed) = (script.clone(), r.clone(), closed.clone());
            tokio::spawn(async move {
                'requests: loop {
                    let Some(request) = read_request(&mut sock).await else {
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let n = {
                        let mut r = r.lock().unwrap();
                        r.push(request);
                        r.len() - 1
                    };
                    for step in script(n) {
                        match step {
                            Step::Write(b) => sock.write_all(b).await.unwrap(),
                            Step::Pause(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                            Step::Close => break 'requests,
                        }
                    }
                }
            });
        }
    });
    Server { url, connections, requests, closed_by_client }
}

/// One request (head and Content-Length body); None at the connection's end.
async fn read_request(sock: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).map_or(0, |v| v.parse().unwrap());
            if got.len() >= end + 4 + len {
                return Some(got);
            }
        }
        let n = sock.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

async fn send(url: &str) -> Result<super::Response, Error> {
    let id = HeaderValue::from_static("req-1");
    let body = [Bytes::from_static(b"{\"a\":"), Bytes::from_static(b"1}")];
    post(&Request { url, path: "/v1/completions", headers: &[("x-request-id", &id)], body: &body }, || {}).await
}

async fn text(url: &str) -> (u16, Option<String>, Result<Bytes, Error>) {
    let resp = send(url).await.unwrap();
    let ct = resp.content_type.map(|v| v.to_str().unwrap().to_string());
    (resp.status.as_u16(), ct, resp.body.collect(1 << 20).await)
}

#[tokio::test]
async fn the_request_goes_out_as_one_http_1_1_post() {
    let s = server(|_| vec![Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]).await;
    let (status, _, body) = text(&s.url).await;
    assert_eq!((status, &body.unwrap()[..]), (200, &b"{}"[..]));
    let got = String::from_utf8(s.requests.lock().unwrap()[0].clone()).unwrap();
    let authority = s.url.trim_start_matches("http://").trim_end_matches("/pre");
    assert_eq!(
        got,
        format!("POST /pre/v1/completions HTTP/1.1\r\nhost: {authority}\r\ncontent-length: 7\r\nx-request-id: req-1\r\n\r\n{{\"a\":1}}")
    );
}

#[tokio::test]
async fn answers_are_read_however_they_are_framed() {
    let cases: Vec<(Vec<Step>, &str)> = vec![
        (vec![Step::Write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello")], "hello"),
        // h11's chunked framing, every byte written on its own.
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\n, w\r\n0\r\n\r\n"
                .chunks(1)
                .flat_map(|b| [Step::Write(leak(b)), Step::Pause(1)])
                .collect(),
            "hello, w",
        ),
        (vec![Step::Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2;x=y\r\nab\r\n0\r\nT: 1\r\n\r\n")], "ab"),
        (vec![Step::Write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")], "ok"),
        (vec![Step::Write(b"HTTP/1.1 200 OK\r\n\r\nuntil"), Step::Pause(20), Step::Write(b" close"), Step::Close], "until close"),
        (vec![Step::Write(b"HTTP/1.1 204 No Content\r\n\r\n")], ""),
    ];
    for (script, want) in cases {
        let s = server(move |_| script.clone()).await;
        let (_, _, body) = text(&s.url).await;
        assert_eq!(String::from_utf8(body.unwrap().to_vec()).unwrap(), want);
    }
}

fn leak(b: &[u8]) -> &'static [u8] {
    Box::leak(b.to_vec().into_boxed_slice())
}

#[tokio::test]
async fn broken_answers_are_errors_not_hangs() {
    let cases: Vec<Vec<Step>> = vec![
        vec![Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"), Step::Close],
        vec![Step::Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel"), Step::Close],
        vec![Step::Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")],
        vec![Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab")],
    ];
    for script in cases {
        let s = server(move |_| script.clone()).await;
        let result = match send(&s.url).await {
            Ok(resp) => tokio::time::timeout(Duration::from_secs(5), resp.body.collect(1 << 20)).await.expect("no hang"),
            Err(e) => Err(e),
        };
        assert!(matches!(result, Err(Error::Broken(_))), "{:?}", result.map(|b| b.len()));
    }
    for head in [&b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"[..], b"not http at all\r\n\r\n", b"HTTP/1.1 101 Switching\r\n\r\n"] {
        let s = server(move |_| vec![Step::Write(head)]).await;
        assert!(matches!(send(&s.url).await, Err(Error::Broken(_))));
    }
    let s = server(|_| vec![Step::Close]).await;
    assert!(matches!(send(&s.url).await, Err(Error::Broken(_))), "closed before any answer, on a new connection");
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    assert!(matches!(send(&format!("http://{free}")).await, Err(Error::Connect(_))));
}

#[tokio::test]
async fn a_connection_is_kept_only_after_a_whole_answer_that_allows_it() {
    let s = server(|_| vec![Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]).await;
    for _ in 0..3 {
        text(&s.url).await.2.unwrap();
    }
    assert_eq!(s.connections.load(Ordering::SeqCst), 1, "one connection for three answers");

    // The server leaves it open: only the header tells the client not to reuse it.
    let s = server(|_| vec![Step::Write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")]).await;
    for _ in 0..2 {
        text(&s.url).await.2.unwrap();
    }
    assert_eq!(s.connections.load(Ordering::SeqCst), 2, "Connection: close is honoured");

    // A body dropped before its end closes its connection (vLLM aborts the request).
    let s = server(|_| vec![Step::Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n")]).await;
    let mut resp = send(&s.url).await.unwrap();
    assert_eq!(&resp.body.next().await.unwrap().unwrap()[..], b"ab");
    drop(resp);
    tokio::time::timeout(Duration::from_secs(2), async {
        while s.closed_by_client.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the worker sees the connection close");
}

#[tokio::test]
async fn a_kept_connection_the_worker_closed_is_replaced() {
    // Closed after the answer (the worker's keep-alive ran out): seen before sending.
    let s = server(|_| vec![Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), Step::Pause(20), Step::Close]).await;
    text(&s.url).await.2.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    text(&s.url).await.2.unwrap();
    assert_eq!(s.connections.load(Ordering::SeqCst), 2);

    // Closed as the request arrived, with no answer: sent again once, on a new connection.
    let s = server(|n| match n {
        1 => vec![Step::Close],
        _ => vec![Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")],
    })
    .await;
    text(&s.url).await.2.unwrap();
    text(&s.url).await.2.unwrap();
    assert_eq!((s.connections.load(Ordering::SeqCst), s.requests.lock().unwrap().len()), (2, 3));
}

#[tokio::test]
async fn a_worker_that_died_on_a_kept_connection_is_not_called_unreached() {
    // One connection: the first request answered, the second read and then the worker is
    // gone (listener and connection closed). The leg may have reached it: not `Connect`.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        read_request(&mut sock).await.unwrap();
        sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
        read_request(&mut sock).await.unwrap();
    });
    text(&url).await.2.unwrap();
    assert!(matches!(send(&url).await, Err(Error::Broken(_))));
}
