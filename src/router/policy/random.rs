//! random: uniformly at random.

use rand::Rng;

pub(super) fn select(candidates: &[usize]) -> usize {
    candidates[rand::rng().random_range(0..candidates.len())]
}
