//! The operator's dashboard, the books side: five minutes of per-second samples (jobs done
//! and failed, p50/p99 latency from accept to outcome), the last failures with their
//! reasons, and the WebSocket sessions that gave the admin token, to which the master pushes
//! one `{"event":"dashboard",…}` line a second (see `admin` for their requests).

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::admin::AdminToken;

/// Samples kept: one a second for five minutes.
pub const HISTORY: usize = 300;
/// Failures kept for the page.
pub const FAILURES: usize = 20;
/// Latencies measured per second at most (the rest of a busy second is not sampled).
const LATENCIES_MAX: usize = 100_000;
/// How often the dashboard's sessions get a new line.
pub const TICK: Duration = Duration::from_secs(1);
/// Longest failure reason shown (a handler may fail with a whole page of text).
const REASON_MAX: usize = 500;

/// One second of the charts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix time in seconds.
    pub t: u64,
    pub done: u64,
    pub failed: u64,
    /// Milliseconds from accept to outcome of the jobs finished in that second.
    pub p50: Option<u32>,
    pub p99: Option<u32>,
}

pub struct Failure {
    pub t: u64,
    pub task_id: u64,
    pub kind: String,
    pub to: String,
    pub error: String,
    pub attempts: u32,
}

pub struct Dashboard {
    pub token: Option<AdminToken>,
    /// Sessions that gave the token (closed ones are dropped at the next push).
    pub sessions: Vec<u64>,
    history: VecDeque<Sample>,
    latencies: Vec<u32>,
    done: u64,
    failed: u64,
    failures: VecDeque<Failure>,
    pub next_tick: Instant,
    /// Durable jobs: the nodes and dead letters, as the bridge last read them, and when to
    /// ask again (only while a dashboard is open).
    pub durable_overview: Option<serde_json::Value>,
    pub next_overview: Instant,
    /// Operators' requests the bridge is running: request id -> (session, peer, action, id).
    pub pending: std::collections::HashMap<u64, (u64, std::net::SocketAddr, String, String)>,
    pub last_request: u64,
}

impl Dashboard {
    pub fn new(token: Option<AdminToken>) -> Dashboard {
        Dashboard {
            token,
            sessions: Vec::new(),
            history: VecDeque::with_capacity(HISTORY),
            latencies: Vec::new(),
            done: 0,
            failed: 0,
            failures: VecDeque::with_capacity(FAILURES),
            next_tick: Instant::now() + TICK,
            durable_overview: None,
            next_overview: Instant::now(),
            pending: Default::default(),
            last_request: 0,
        }
    }

    /// A job reached its final outcome, `took` after it was accepted.
    pub fn finished(&mut self, ok: bool, took: Duration) {
        if ok {
            self.done += 1;
        } else {
            self.failed += 1;
        }
        if self.latencies.len() < LATENCIES_MAX {
            self.latencies.push(took.as_millis().min(u128::from(u32::MAX)) as u32);
        }
    }

    /// A job failed for good: kept for the page (its type and recipient from its payload, when
    /// that is the JSON the built-in application sends).
    pub fn failure(&mut self, task_id: u64, data: &[u8], error: &[u8], attempts: u32) {
        let job: Value = serde_json::from_slice(data).unwrap_or(Value::Null);
        let field = |k: &str| job.get(k).and_then(Value::as_str).unwrap_or("").chars().take(200).collect();
        let error: String = String::from_utf8_lossy(error).chars().take(REASON_MAX).collect();
        if self.failures.len() == FAILURES {
            self.failures.pop_back();
        }
        self.failures.push_front(Failure {
            t: unix_ms(),
            task_id,
            kind: field("type"),
            to: field("to"),
            error,
            attempts,
        });
    }

    /// Closes the current second: its sample goes into the history.
    pub fn tick(&mut self, now: Instant) -> Sample {
        let (p50, p99) = percentiles(&mut self.latencies);
        self.latencies.clear();
        if self.latencies.capacity() > 4 * 4096 {
            self.latencies.shrink_to(4096);
        }
        let sample = Sample { t: unix_ms() / 1000, done: self.done, failed: self.failed, p50, p99 };
        self.done = 0;
        self.failed = 0;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(sample);
        // A master busy past a tick does not catch up with several samples at once.
        self.next_tick = (self.next_tick + TICK).max(now + TICK / 2);
        sample
    }

    pub fn last_sample(&self) -> Option<&Sample> {
        self.history.back()
    }

    pub fn history_json(&self) -> Value {
        Value::Array(self.history.iter().map(sample_json).collect())
    }

    pub fn failures_json(&self) -> Value {
        Value::Array(
            self.failures
                .iter()
                .map(|f| {
                    json!({"t": f.t, "task_id": f.task_id, "type": f.kind, "to": f.to,
                           "error": f.error, "attempts": f.attempts})
                })
                .collect(),
        )
    }
}

pub fn sample_json(s: &Sample) -> Value {
    json!({"t": s.t, "done": s.done, "failed": s.failed, "p50": s.p50, "p99": s.p99})
}

/// The median and the 99th percentile (nearest rank) of `v`, reordered in place.
fn percentiles(v: &mut [u32]) -> (Option<u32>, Option<u32>) {
    if v.is_empty() {
        return (None, None);
    }
    let rank = |p: usize| ((v.len() * p).div_ceil(100)).saturating_sub(1);
    let (i50, i99) = (rank(50), rank(99));
    let p99 = *v.select_nth_unstable(i99).1;
    // Everything before i99 is no larger: the median is among them.
    let p50 = *v[..=i99].select_nth_unstable(i50).1;
    (Some(p50), Some(p99))
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A process's resident memory in KiB (`/proc/PID/statm`), if it can be read.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a constant of the system.
    let page = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64 / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentiles(&mut []), (None, None));
        assert_eq!(percentiles(&mut [7]), (Some(7), Some(7)));
        let mut v: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut v), (Some(50), Some(99)));
        let mut v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentiles(&mut v), (Some(500), Some(990)));
    }

    #[test]
    fn samples_keep_five_minutes_and_failures_the_last_twenty() {
        let mut d = Dashboard::new(None);
        let now = Instant::now();
        for i in 0..(HISTORY + 10) {
            d.finished(true, Duration::from_millis(i as u64));
            d.tick(now);
        }
        assert_eq!(d.history.len(), HISTORY);
        assert_eq!(d.history.back().map(|s| s.done), Some(1));
        for i in 0..30u64 {
            d.failure(i, br#"{"type":"email","to":"a@example.com"}"#, b"<b>no</b>", 1);
        }
        let f = d.failures_json();
        assert_eq!(f.as_array().map(Vec::len), Some(FAILURES));
        // The newest first, its reason as it was (the page shows it as text).
        assert_eq!(f[0]["task_id"], 29);
        assert_eq!(f[0]["error"], "<b>no</b>");
        assert_eq!(f[0]["to"], "a@example.com");
    }
}
