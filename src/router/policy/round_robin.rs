//! round_robin: each candidate in turn.

/// The next candidate after the last one chosen.
pub(super) fn select(next: &mut usize, candidates: &[usize]) -> usize {
    let chosen = candidates[*next % candidates.len()];
    *next = next.wrapping_add(1);
    chosen
}
