//! When a job whose delivery failed runs again ([`crate::app::TaskFailure`]): how many delivery
//! retries it gets, and how long it waits before each (exponential back-off with full jitter).
//! Pure policy, used by the master (jobs in memory) and by consumers (durable jobs in Redis).

use std::time::Duration;

use crate::config::ServerConfig;

/// The longest a job may be told "not yet" (a rate limit) in one go.
pub const NOT_YET_MAX: Duration = Duration::from_secs(86_400);

/// `delivery_retry_max`, `retry_base_ms`, `retry_cap_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Delivery retries after the first run.
    pub max_retries: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Policy {
    pub fn from_config(config: &ServerConfig) -> Policy {
        Policy {
            max_retries: config.delivery_retry_max,
            base: Duration::from_millis(config.retry_base_ms),
            cap: Duration::from_millis(config.retry_cap_ms),
        }
    }

    /// The longest back-off before retry `n` (from 1): min(cap, base · 2^(n-1)).
    pub fn bound(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.cap, |b| b.min(self.cap))
    }

    /// How long to wait before retry `n` (from 1), or None when the job has had its
    /// `max_retries`: `retry_after` (what the other side asked for) up to the cap, or else a
    /// random time in [0, bound(n)] ("full jitter": retries of many jobs that failed together
    /// spread out instead of coming back together).
    pub fn wait(&self, n: u32, retry_after: Option<Duration>, rng: &mut Rng) -> Option<Duration> {
        if n == 0 || n > self.max_retries {
            return None;
        }
        Some(match retry_after {
            Some(asked) => asked.min(self.cap),
            None => {
                let bound = self.bound(n).as_millis() as u64;
                Duration::from_millis(rng.next_u64() % (bound + 1))
            }
        })
    }
}

/// The non-final line a client gets before a delivery retry: `attempt` is the run to come,
/// `in_ms` how long it waits, `error` why the last one failed.
pub fn retrying_line(task_id: u64, attempt: u32, wait: Duration, error: &str) -> Vec<u8> {
    let in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    let value = serde_json::json!({
        "event": "retrying", "task_id": task_id, "attempt": attempt, "in_ms": in_ms, "error": error,
    });
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A small per-process random source (splitmix64), seeded after fork.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        Rng(crate::worker::per_process_random())
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u32, base: u64, cap: u64) -> Policy {
        Policy { max_retries: max, base: Duration::from_millis(base), cap: Duration::from_millis(cap) }
    }

    #[test]
    fn back_off_doubles_up_to_the_cap() {
        let p = policy(100, 1000, 300_000);
        assert_eq!(p.bound(1), Duration::from_millis(1000));
        assert_eq!(p.bound(2), Duration::from_millis(2000));
        assert_eq!(p.bound(9), Duration::from_millis(256_000));
        assert_eq!(p.bound(10), Duration::from_millis(300_000));
        assert_eq!(p.bound(40), Duration::from_millis(300_000));
        assert_eq!(p.bound(u32::MAX), Duration::from_millis(300_000));
    }

    #[test]
    fn waits_are_full_jitter_within_the_bound_and_spread() {
        let p = policy(5, 100, 1000);
        let mut rng = Rng::seeded(7);
        for n in 1..=5 {
            let waits: Vec<Duration> = (0..2000).map(|_| p.wait(n, None, &mut rng).unwrap()).collect();
            let bound = p.bound(n);
            assert!(waits.iter().all(|w| *w <= bound), "retry {n}");
            // Full jitter: both ends of [0, bound] are reached, not only near the bound.
            assert!(waits.iter().any(|w| *w < bound / 10), "retry {n}");
            assert!(waits.iter().any(|w| *w > bound * 9 / 10), "retry {n}");
        }
    }

    #[test]
    fn retries_end_and_retry_after_is_honoured_up_to_the_cap() {
        let p = policy(2, 100, 1000);
        let mut rng = Rng::seeded(1);
        assert!(p.wait(0, None, &mut rng).is_none());
        assert!(p.wait(3, None, &mut rng).is_none());
        assert_eq!(p.wait(1, Some(Duration::from_millis(700)), &mut rng), Some(Duration::from_millis(700)));
        assert_eq!(p.wait(2, Some(Duration::from_secs(3600)), &mut rng), Some(Duration::from_millis(1000)));
        assert!(policy(0, 100, 1000).wait(1, None, &mut rng).is_none());
    }
}
