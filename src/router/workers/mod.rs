//! Workers, their DP ranks and health, and the `Pool` a role's requests are picked from.
//!
//! A pool is a live set: workers are keyed by their URL (a stable identity) and come and
//! go at runtime (`add`, `remove`, `drain`: from the command line, the admin API or
//! discovery). Readers take a snapshot (an `Arc` of the current list), so a change never
//! waits for requests and requests never see a half-made change. A removed worker's
//! in-flight requests finish on the `Arc<Worker>` their leases hold.
//!
//! A pick happens under the pool's policy lock and reserves the chosen rank (its
//! in-flight count rises) before the lock is released, so a burst of picks sees each
//! other's reservations and does not herd. The reservation is a `Lease`, released when
//! dropped, on every path.

pub(crate) mod allow;
pub(crate) mod breaker;
pub(crate) mod discovery;
pub(crate) mod health;
mod lease;
pub(crate) mod pool;
pub(crate) mod room;
pub(crate) mod topology;
pub(crate) mod url;
mod worker;

pub(crate) use crate::api::Role;
pub(crate) use lease::Lease;
pub(crate) use pool::{NoWorker, Pool};
pub(crate) use worker::Worker;
