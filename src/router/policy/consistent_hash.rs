//! consistent_hash: sticky by session (`x-session-id` / `x-user-id`, or the body's
//! `user`), else by the prompt's start; a worker going down moves only its own keys.

use std::sync::Arc;

use super::{Candidate, HashRing, RequestInfo};

/// Units of prompt prefix that key the ring when there is no session key.
const HASH_PREFIX_UNITS: usize = 256;

pub(super) fn select<W: Candidate>(ring: &HashRing, workers: &[Arc<W>], candidates: &[usize], req: &RequestInfo) -> usize {
    let key = match &req.session {
        Some(s) => HashRing::key(s.as_bytes()),
        None => HashRing::key_of(|h| req.prompt.hash_units(h, 0..req.prompt.units().min(HASH_PREFIX_UNITS))),
    };
    ring.lookup(key, |url| candidates.iter().any(|c| workers[*c].url() == url))
        .and_then(|url| candidates.iter().copied().find(|c| workers[*c].url() == url))
        .unwrap_or(candidates[0])
}
