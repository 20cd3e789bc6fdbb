//! Rate limits for warnings that a flood repeats: one line per kind of event and
//! [`EVERY`] (10 s), the next one carrying the count of those not logged in between. A
//! client (or a web page in a loop) refused again and again must not fill the disk with the
//! same line, nor hide every other line of the log.

use std::time::{Duration, Instant};

/// How often one kind of warning is logged at most.
pub const EVERY: Duration = Duration::from_secs(10);

/// One warning per [`EVERY`] for one kind of event, with the number of those not logged.
#[derive(Debug, Default)]
pub struct Throttle {
    unlogged: u64,
    logged: Option<Instant>,
}

impl Throttle {
    /// Whether to log this event now; `Some(n)`: yes, and `n` like it were not logged since
    /// the last one that was (all within `EVERY` after it).
    pub fn log(&mut self) -> Option<u64> {
        self.log_at(Instant::now())
    }

    fn log_at(&mut self, now: Instant) -> Option<u64> {
        if self.logged.is_some_and(|at| now.saturating_duration_since(at) < EVERY) {
            self.unlogged += 1;
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// The tail of a throttled warning: nothing, or how many like it were not logged.
pub fn unlogged(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" (and {n} more like it in the 10 s after the last one logged)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_then_the_count_of_the_others() {
        let mut t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.log_at(start), Some(0));
        for i in 1..=1234 {
            assert_eq!(t.log_at(start + Duration::from_millis(i)), None);
        }
        assert_eq!(t.log_at(start + EVERY), Some(1234));
        assert_eq!(unlogged(1234), " (and 1234 more like it in the 10 s after the last one logged)");
        assert_eq!(unlogged(0), "");
        assert_eq!(t.log_at(start + EVERY * 3), Some(0));
    }
}
