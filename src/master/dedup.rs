//! Deduplication keys (a job's `key`): which job holds each key, while it waits or runs and
//! for its `dedup_ttl` after it ended, and the clients of the duplicates that wait for its
//! final line. Bounded: past `MAX_ENDED` ended keys, the oldest is let go early.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Most keys of ended jobs held at once (each keeps its job's final line).
pub const MAX_ENDED: usize = 100_000;

struct Holder {
    task_id: u64,
    ttl: Duration,
    /// Once the job ended: until when the key is held, and the job's final line.
    ended: Option<(Instant, Vec<u8>)>,
    /// Sessions of the duplicates waiting for its final line.
    followers: Vec<u64>,
}

/// What became of a job submitted with a key.
pub enum Claim {
    /// The key was free: the job runs, holding it.
    Taken,
    /// Job `first` holds it and has not ended: the duplicate waits for its final line.
    Waiting { first: u64 },
    /// Job `first` held it and ended: its final line.
    Ended { first: u64, line: Vec<u8> },
}

#[derive(Default)]
pub struct Keys {
    held: HashMap<String, Holder>,
    /// Ended keys by expiry, for the purge.
    expiries: BTreeSet<(Instant, String)>,
}

impl Keys {
    /// Job `task_id` asks for `key` at `now`.
    pub fn claim(&mut self, key: &str, task_id: u64, ttl: Duration, session: u64, now: Instant) -> Claim {
        self.purge(now);
        match self.held.get_mut(key) {
            Some(h) => match &h.ended {
                Some((_, line)) => Claim::Ended { first: h.task_id, line: line.clone() },
                None => {
                    h.followers.push(session);
                    Claim::Waiting { first: h.task_id }
                }
            },
            None => {
                let holder = Holder { task_id, ttl, ended: None, followers: Vec::new() };
                self.held.insert(key.to_string(), holder);
                Claim::Taken
            }
        }
    }

    /// The job holding `key` ended with `line` (`release`: the key is free at once, as for a
    /// cancelled job). The sessions of its duplicates, to send the line to.
    pub fn ended(&mut self, key: &str, task_id: u64, line: &[u8], release: bool, now: Instant) -> Vec<u64> {
        let Some(h) = self.held.get_mut(key).filter(|h| h.task_id == task_id && h.ended.is_none()) else {
            return Vec::new();
        };
        let followers = std::mem::take(&mut h.followers);
        match now.checked_add(h.ttl).filter(|_| !release && !h.ttl.is_zero()) {
            Some(until) => {
                h.ended = Some((until, line.to_vec()));
                self.expiries.insert((until, key.to_string()));
                while self.expiries.len() > MAX_ENDED {
                    if let Some((_, oldest)) = self.expiries.pop_first() {
                        self.held.remove(&oldest);
                    }
                }
            }
            None => {
                self.held.remove(key);
            }
        }
        followers
    }

    fn purge(&mut self, now: Instant) {
        while let Some((until, key)) = self.expiries.first().cloned() {
            if until > now {
                break;
            }
            self.expiries.pop_first();
            self.held.remove(&key);
        }
    }

    /// Keys held now (by jobs waiting, running, or ended within their ttl).
    pub fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_held_while_its_job_runs_and_for_its_ttl_after() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut keys = Keys::default();
        assert!(matches!(keys.claim("k", 1, ttl, 100, t0), Claim::Taken));
        assert!(matches!(keys.claim("k", 2, ttl, 200, t0), Claim::Waiting { first: 1 }));
        assert!(matches!(keys.claim("other", 3, ttl, 300, t0), Claim::Taken));
        assert_eq!(keys.ended("k", 1, b"done\n", false, t0), vec![200]);
        match keys.claim("k", 4, ttl, 400, t0 + Duration::from_secs(9)) {
            Claim::Ended { first: 1, line } => assert_eq!(line, b"done\n"),
            _ => panic!("the key is held for its ttl"),
        }
        assert!(matches!(keys.claim("k", 5, ttl, 500, t0 + Duration::from_secs(10)), Claim::Taken));
    }

    #[test]
    fn a_released_key_is_free_at_once() {
        let t0 = Instant::now();
        let mut keys = Keys::default();
        keys.claim("k", 1, Duration::from_secs(60), 1, t0);
        assert!(keys.ended("k", 1, b"cancelled\n", true, t0).is_empty());
        assert!(matches!(keys.claim("k", 2, Duration::from_secs(60), 2, t0), Claim::Taken));
        assert_eq!(keys.len(), 1);
    }
}
