//! Prometheus plumbing shared by the router's and the simulator's /metrics.

use prometheus::core::Collector;
use prometheus::{Encoder, Registry, TextEncoder};

/// Registers a collector and hands it back (names are fixed in code, so unique).
pub fn register<T: Collector + Clone + 'static>(registry: &Registry, collector: T) -> T {
    registry.register(Box::new(collector.clone())).expect("metric names are unique");
    collector
}

/// The registry in Prometheus' text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).expect("text encoding into memory");
    String::from_utf8(out).expect("prometheus text is UTF-8")
}
