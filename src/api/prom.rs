//! Prometheus plumbing shared by the router's and the simulator's /metrics.

use prometheus::core::Collector;
use prometheus::{Encoder, Registry, TextEncoder};

/// Registers a collector and hands it back (names are fixed in code, so unique).
pub(crate) fn register<T: Collector + Clone + 'static>(registry: &Registry, collector: T) -> T {
    registry.register(Box::new(collector.clone())).expect("metric names are unique");
    collector
}

/// The registry in Prometheus' text format.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).expect("text encoding into memory");
    String::from_utf8(out).expect("prometheus text is UTF-8")
}

/// The samples of metric `name` on a /metrics page (Prometheus' text format): each
/// series' labels (what is inside the braces, empty without) and its value.
pub(crate) fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once('}')?,
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        Some((labels, value.split_whitespace().next()?.parse::<f64>().ok()?))
    })
}

/// A label's value among a series' labels (`engine="0",model_name="m"`).
pub(crate) fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| kv.trim().strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
}
