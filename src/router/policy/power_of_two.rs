//! power_of_two: the less loaded of two random candidates, by the router's own in-flight
//! counts (reserved at pick time, so a burst does not herd onto one worker).

use std::sync::Arc;

use rand::Rng;

use super::Candidate;

pub(super) fn select<W: Candidate>(workers: &[Arc<W>], candidates: &[usize]) -> usize {
    if candidates.len() == 1 {
        return candidates[0];
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..candidates.len());
    let mut b = rng.random_range(0..candidates.len() - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (candidates[a], candidates[b]);
    if workers[b].in_flight() < workers[a].in_flight() {
        b
    } else {
        a
    }
}
