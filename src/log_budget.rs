//! A budget of log lines for what strangers can cause (refused registrations, broken
//! connections): at most `per_window` lines per window, then one line saying how many
//! were left out. A flood costs a counter increment, not a write.

use std::time::{Duration, Instant};

pub(crate) struct LogBudget {
    per_window: u32,
    window: Duration,
    started: Instant,
    used: u32,
    skipped: u64,
}

impl LogBudget {
    pub(crate) fn new(per_window: u32, window: Duration) -> Self {
        LogBudget { per_window, window, started: Instant::now(), used: 0, skipped: 0 }
    }

    /// Whether a line may be written now; `Some(n)`: yes, and `n` lines were left out since
    /// the last one written (say so in it).
    pub(crate) fn take(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.started) >= self.window {
            self.started = now;
            self.used = 0;
        }
        if self.used >= self.per_window {
            self.skipped += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_writes_a_few_lines_and_counts_the_rest() {
        let mut b = LogBudget::new(3, Duration::from_millis(50));
        let written: Vec<Option<u64>> = (0..10).map(|_| b.take()).collect();
        assert_eq!(written.iter().filter(|w| w.is_some()).count(), 3);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.take(), Some(7), "the next window's first line says how many were left out");
    }
}
