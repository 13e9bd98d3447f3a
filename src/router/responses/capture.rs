//! A Responses answer on its way to the client: the finished response is read (a whole
//! answer, or a stream's `response.completed` event), shown with the client's
//! `previous_response_id`, and stored (mod.rs, `Turn::finish`) before the client sees its
//! end, so a client that continues at once finds it. A stream is passed on event by event
//! (each event whole, within a cap); only the events that carry the response object
//! (`response.created`, `.in_progress`, `.completed`, `.incomplete`, `.failed`) are
//! rewritten, every other event goes through byte for byte.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::Turn;
use crate::api::sse::EventSplitter;

/// The events whose `response` is the response object.
const CARRY_RESPONSE: &[&str] =
    &["response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"];

/// The events after which a Responses stream is over.
const TERMINAL: &[&str] = &["response.completed", "response.incomplete", "response.failed", "error"];

/// A whole answer: rewritten and stored; the bytes as they came when it is not a response.
pub(crate) async fn whole(turn: &Turn, bytes: Bytes) -> Bytes {
    let Ok(mut response) = serde_json::from_slice::<Value>(&bytes) else { return bytes };
    turn.finish(&mut response).await;
    Bytes::from(response.to_string())
}

/// A stream's events, rewritten as they complete.
pub(crate) struct StreamCapture {
    turn: Turn,
    splitter: EventSplitter,
    ended: bool,
}

impl StreamCapture {
    /// `max_event`: the longest event held whole (the completed event carries the whole
    /// response).
    pub(crate) fn new(turn: Turn, max_event: usize) -> Self {
        StreamCapture { turn, splitter: EventSplitter::new(max_event), ended: false }
    }

    /// Whether a terminal event has passed: the stream ended as it should.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// The complete events in `chunk` (with what came before), each rewritten where it
    /// carries the response; an error when one event runs past the cap.
    pub(crate) async fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, String> {
        let events = self.splitter.push(chunk).map_err(|e| format!("a Responses event longer than {} bytes", e.0))?;
        let mut out = BytesMut::new();
        for event in events {
            let kind = event_type(&event);
            if let Some(kind) = kind.as_deref() {
                self.ended |= TERMINAL.contains(&kind);
            }
            match kind.filter(|k| CARRY_RESPONSE.contains(&k.as_str())) {
                Some(kind) => out.extend_from_slice(&self.rewritten(&kind, &event).await),
                None => out.extend_from_slice(&event),
            }
            out.extend_from_slice(b"\n\n");
        }
        Ok(out.freeze())
    }

    async fn rewritten(&self, kind: &str, event: &[u8]) -> Vec<u8> {
        let Some(data) = crate::api::sse::data_of(event) else { return event.to_vec() };
        let Ok(mut v) = serde_json::from_str::<Value>(&data) else { return event.to_vec() };
        let Some(response) = v.get_mut("response") else { return event.to_vec() };
        if kind == "response.completed" || kind == "response.incomplete" {
            self.turn.finish(response).await;
        } else {
            self.turn.show(response);
        }
        format!("event: {kind}\ndata: {v}").into_bytes()
    }
}

/// An event's type: its `event:` line, else its data's `type`.
fn event_type(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    if let Some(kind) = text.lines().find_map(|l| l.strip_prefix("event:")) {
        return Some(kind.trim().to_string());
    }
    let data = crate::api::sse::data_of(event)?;
    serde_json::from_str::<Value>(&data).ok()?.get("type")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::config::responses::{ResponsesConfig, StoreKind};
    use crate::router::request::body::ClientBody;
    use crate::router::responses::store::Owner;
    use crate::router::responses::Responses;
    use serde_json::json;
    use std::sync::Arc;

    #[tokio::test]
    async fn response_events_are_rewritten_whole_and_the_rest_pass_byte_for_byte() {
        let r = Arc::new(Responses::new(&ResponsesConfig {
            store: StoreKind::Off,
            ttl: std::time::Duration::from_secs(60),
            max_stored: 1,
            max_bytes: 1 << 20,
            timeout: std::time::Duration::from_secs(10),
        }));
        let body = ClientBody::parse(Bytes::from(json!({"input": "hi"}).to_string())).unwrap();
        let (_, mut turn) = r.prepare(Owner(String::new()), body).await.unwrap();
        turn.previous_id = Some("resp_prev".into());
        let mut c = StreamCapture::new(turn, 1 << 16);
        let created = format!(
            "event: response.created\ndata: {}\n\n",
            json!({"type": "response.created", "response": {"id": "x", "previous_response_id": null, "kv_transfer_params": null}})
        );
        let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"a\"}\n\n";
        let whole_stream = format!("{created}{delta}");
        let (a, b) = whole_stream.as_bytes().split_at(17);
        let first = c.feed(a).await.unwrap();
        assert!(first.is_empty(), "half an event is held back");
        let out = c.feed(b).await.unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains(r#""previous_response_id":"resp_prev""#), "{text}");
        assert!(text.ends_with(delta), "other events pass as they came: {text}");
        assert!(!c.ended());
        c.feed(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\"}}\n\n")
            .await
            .unwrap();
        assert!(c.ended());
        let mut small = StreamCapture::new(
            r.prepare(Owner(String::new()), ClientBody::parse(Bytes::from_static(b"{\"input\":\"x\"}")).unwrap()).await.unwrap().1,
            8,
        );
        assert!(small.feed(b"event: response.created\ndata: {\"long\": true}").await.is_err(), "an event past the cap");
    }
}
