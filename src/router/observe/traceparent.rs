//! W3C trace context (`traceparent: 00-<trace id>-<parent span id>-<flags>`): a client's
//! continued, or a new trace started; sampled by the client's flag or by trace id ratio
//! (OpenTelemetry's TraceIdRatioBased, parent-based).

use axum::http::{HeaderMap, HeaderValue};

/// The trace a request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TraceContext {
    pub(crate) trace_id: u128,
    /// The router's span for the request.
    pub(crate) span_id: u64,
    /// The client's span, when it sent a `traceparent`.
    pub(crate) parent: Option<u64>,
    pub(crate) sampled: bool,
}

/// A `traceparent` value as W3C writes it, version 00 (lower-case hex, non-zero ids).
pub(crate) fn parse(value: &[u8]) -> Option<(u128, u64, bool)> {
    let s = std::str::from_utf8(value).ok()?;
    let mut parts = s.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    // Version ff is invalid; a later version may carry more fields after the four.
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let span_id = u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, span_id, flags & 1 == 1))
}

/// The header naming `span_id` in `trace_id`.
pub(crate) fn header(trace_id: u128, span_id: u64, sampled: bool) -> HeaderValue {
    let v = format!("00-{trace_id:032x}-{span_id:016x}-{:02x}", u8::from(sampled));
    HeaderValue::from_str(&v).expect("hex is a valid header")
}

/// A random non-zero span id.
pub(crate) fn new_span_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

impl TraceContext {
    /// The client's trace continued (its sampled flag followed), or a new one sampled at
    /// `ratio` by its id.
    pub(crate) fn continue_or_start(headers: &HeaderMap, ratio: f64) -> Self {
        let span_id = new_span_id();
        if let Some((trace_id, parent, sampled)) = headers.get("traceparent").and_then(|v| parse(v.as_bytes())) {
            return TraceContext { trace_id, span_id, parent: Some(parent), sampled };
        }
        let trace_id = loop {
            let id = rand::random::<u128>();
            if id != 0 {
                break id;
            }
        };
        TraceContext { trace_id, span_id, parent: None, sampled: sampled_by_ratio(trace_id, ratio) }
    }
}

/// OpenTelemetry's TraceIdRatioBased: the trace id's low 64 bits under ratio x 2^64.
fn sampled_by_ratio(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (u64::MAX as f64)) as u64;
    (trace_id as u64) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_as_w3c_writes_them() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse(tp), Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, true)));
        assert_eq!(parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").map(|p| p.2), Some(false));
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"garbage",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // A later version may add fields; the four known ones are read.
        assert!(parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz").is_some());
        let h = header(0x4bf92f3577b34da6a3ce929d0e0e4736, 0xb7, true);
        assert_eq!(h, "00-4bf92f3577b34da6a3ce929d0e0e4736-00000000000000b7-01");
        assert_eq!(parse(h.as_bytes()), Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0xb7, true)));
    }

    #[test]
    fn a_clients_trace_is_continued_and_new_ones_are_sampled_by_ratio() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"));
        let t = TraceContext::continue_or_start(&h, 1.0);
        assert_eq!((t.trace_id, t.parent, t.sampled), (0x4bf92f3577b34da6a3ce929d0e0e4736, Some(0x00f067aa0ba902b7), false));
        assert_ne!(t.span_id, 0x00f067aa0ba902b7);
        let none = HeaderMap::new();
        assert!((0..100).all(|_| TraceContext::continue_or_start(&none, 1.0).sampled));
        assert!((0..100).all(|_| !TraceContext::continue_or_start(&none, 0.0).sampled));
        let half = (0..4000).filter(|_| TraceContext::continue_or_start(&none, 0.5).sampled).count();
        assert!((1700..2300).contains(&half), "{half} of 4000 sampled at 0.5");
    }
}
