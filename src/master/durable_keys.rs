//! Deduplication and cancel of durable jobs, the master's side: the duplicates Redis found
//! (their clients get `duplicate`, then the first's final line, which the bridge watches the
//! key for when the first has not ended), and the cancels the bridge carries out in Redis.

use std::collections::HashMap;

use super::schedule::Via;
use super::*;

/// Most duplicates waiting for their first job's end at once; past it, a new one gets a
/// `failed` line at once instead of waiting.
const FOLLOWERS_MAX: usize = 100_000;

/// A duplicate found in a batch whose `accepted` lines are not out yet.
struct Found {
    first: u64,
    hex: Vec<u8>,
    holder: Vec<u8>,
    line: Vec<u8>,
}

/// A duplicate waiting for its first job's final line.
struct Follower {
    session: u64,
    first: u64,
    hex: Vec<u8>,
    holder: Vec<u8>,
}

#[derive(Default)]
pub struct DurableKeys {
    found: HashMap<u64, Found>,
    followers: HashMap<u64, Follower>,
    /// Cancels asked of the bridge, by task id: who gets the answer.
    cancels: HashMap<u64, Via>,
}

impl DurableKeys {
    /// Duplicates waiting for their first job's end (for `stats`).
    pub fn waiting(&self) -> usize {
        self.followers.len()
    }

    /// Nothing waits for Redis's word: shutdown may end.
    pub fn is_idle(&self) -> bool {
        self.followers.is_empty() && self.cancels.is_empty() && self.found.is_empty()
    }
}

/// The `duplicate` line of a job whose key job `first` holds.
fn duplicate_line(first: u64) -> Vec<u8> {
    let mut line = serde_json::json!({"event": "duplicate", "task_id": first}).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A duplicate's final line when its first job's cannot be had: `failed`, with its own id.
fn unknown_line(task_id: u64, why: &str) -> Vec<u8> {
    let mut line =
        serde_json::json!({"event": "failed", "task_id": task_id, "error": why}).to_string().into_bytes();
    line.push(b'\n');
    line
}

impl<A: Application> Master<'_, A> {
    /// Redis did not store job `task_id`: job `first` holds its key. Acted on once its batch is
    /// acknowledged (its `accepted` goes first), by [`Self::act_on_duplicates`].
    pub(super) fn on_duplicate(&mut self, task_id: u64, first: u64, hex: &[u8], holder: &[u8], line: &[u8]) {
        let Some(state) = self.durable.as_mut() else { return };
        let found = Found { first, hex: hex.to_vec(), holder: holder.to_vec(), line: line.to_vec() };
        state.dedup.found.insert(task_id, found);
    }

    /// The duplicates whose batch is acknowledged: not run, their clients told which job has
    /// their key, and its final line if it has ended; else they wait for it.
    pub(super) fn act_on_duplicates(&mut self) {
        let Some(state) = self.durable.as_mut() else { return };
        if state.dedup.found.is_empty() {
            return;
        }
        let jobs = &self.jobs;
        let ready: Vec<u64> = state
            .dedup
            .found
            .keys()
            .copied()
            .filter(|&id| jobs.get(id).is_none_or(|j| !state.storing(j.batch)))
            .collect();
        for task_id in ready {
            let Some(state) = self.durable.as_mut() else { return };
            let Some(found) = state.dedup.found.remove(&task_id) else { continue };
            // Gone: its batch failed (its client had `failed`).
            let Some(job) = self.jobs.remove(task_id) else { continue };
            self.counters.duplicates += 1;
            self.counters.tasks_accepted = self.counters.tasks_accepted.saturating_sub(1);
            self.shared.set_jobs_pending(self.jobs.len() as u64);
            tracing::info!("job {task_id} has the key of job {} (in Redis): not run", found.first);
            let session = job.session;
            if session == 0 {
                // No client to tell (a job from no connection): nothing to wait for.
                continue;
            }
            if found.first == 0 {
                let why = "not run: its key is held in Redis by a value taskd does not read (written by something else)";
                self.final_line_to_duplicate(session, &unknown_line(task_id, why));
                continue;
            }
            self.send_to_session(session, &duplicate_line(found.first));
            if !found.line.is_empty() {
                self.final_line_to_duplicate(session, &found.line);
                continue;
            }
            if self.client_gone(session) {
                // Nobody to tell: the bridge stops watching for it.
                self.unwatch(task_id);
                continue;
            }
            if self.durable.as_ref().is_some_and(|s| s.dedup.followers.len() >= FOLLOWERS_MAX) {
                self.forget_gone_followers();
            }
            let Some(state) = self.durable.as_mut() else { return };
            if state.dedup.followers.len() >= FOLLOWERS_MAX {
                let why = format!(
                    "not run, and job {}'s outcome will not be sent here: {FOLLOWERS_MAX} duplicates wait already",
                    found.first
                );
                self.final_line_to_duplicate(session, &unknown_line(task_id, &why));
                continue;
            }
            // The bridge watches the key (it did when it found the duplicate).
            let follower = Follower { session, first: found.first, hex: found.hex, holder: found.holder };
            state.dedup.followers.insert(task_id, follower);
        }
    }

    /// Tells the bridge to stop watching the key of duplicate `task_id`.
    fn unwatch(&mut self, task_id: u64) {
        if let Some(state) = self.durable.as_mut() {
            state.bridge.send(&ToBridge::WatchKey { task_id, digest: b"", holder: b"" });
        }
    }

    /// Drops the waiting duplicates whose client has gone (a client that submits duplicates
    /// and leaves must not fill the table).
    fn forget_gone_followers(&mut self) {
        let Some(state) = self.durable.as_ref() else { return };
        let all: Vec<(u64, u64)> = state.dedup.followers.iter().map(|(&id, f)| (id, f.session)).collect();
        for (task_id, session) in all {
            if self.client_gone(session) {
                if let Some(state) = self.durable.as_mut() {
                    state.dedup.followers.remove(&task_id);
                }
                self.unwatch(task_id);
            }
        }
    }

    /// The first job of duplicate `task_id` ended with `line` (empty: that can no longer be
    /// known).
    pub(super) fn on_key_ended(&mut self, task_id: u64, line: &[u8]) {
        let Some(state) = self.durable.as_mut() else { return };
        let Some(f) = state.dedup.followers.remove(&task_id) else { return };
        if line.is_empty() {
            let why = format!(
                "not run, and job {}'s outcome is no longer known: its key expired or was taken by another \
                 job before this node read it",
                f.first
            );
            self.final_line_to_duplicate(f.session, &unknown_line(task_id, &why));
        } else {
            self.final_line_to_duplicate(f.session, line);
        }
    }

    /// Shutdown cannot wait longer: each waiting duplicate's client gets a final line (its
    /// first job stays in Redis, and runs), and each cancel asked an answer.
    pub(super) fn give_up_followers(&mut self, cause: &str) {
        let Some(state) = self.durable.as_mut() else { return };
        let followers: Vec<(u64, Follower)> = state.dedup.followers.drain().collect();
        let cancels: Vec<(u64, Via)> = state.dedup.cancels.drain().collect();
        for (task_id, f) in followers {
            let why = format!(
                "server stopping: {cause}; not run, and job {}, which holds its key, still waits or runs \
                 in Redis: ask its node for its outcome",
                f.first
            );
            self.final_line_to_duplicate(f.session, &unknown_line(task_id, &why));
        }
        for (task_id, via) in cancels {
            self.answer_cancel(via, task_id, Err(format!("server stopping: {cause} before Redis answered")));
        }
    }

    /// A new bridge watches what the dead one watched, and carries out the cancels it did not
    /// answer (a cancel that was carried out finds nothing the second time, and says so).
    pub(super) fn resend_to_bridge(&mut self) {
        let Some(state) = self.durable.as_mut() else { return };
        let mut frames = Vec::new();
        for (&task_id, f) in &state.dedup.followers {
            ToBridge::WatchKey { task_id, digest: &f.hex, holder: &f.holder }.encode(&mut frames);
        }
        for &task_id in state.dedup.cancels.keys() {
            if let Some(job) = self.jobs.get(task_id) {
                let stream = state.d.stream_of(job.data(), job.priority);
                ToBridge::Cancel { task_id, stream: stream.as_bytes() }.encode(&mut frames);
            }
        }
        state.bridge.output().extend_from_slice(&frames);
    }

    /// Asks the bridge to take job `task_id` back from Redis.
    pub(super) fn ask_durable_cancel(&mut self, via: Via, task_id: u64) -> Result<(), String> {
        let Some(state) = self.durable.as_mut() else { return Err("no durable jobs here".into()) };
        let Some(job) = self.jobs.get(task_id) else { return Err(format!("there is no job {task_id} here")) };
        if state.dedup.cancels.contains_key(&task_id) {
            return Err(format!("job {task_id} is being cancelled already"));
        }
        let stream = state.d.stream_of(job.data(), job.priority);
        state.bridge.send(&ToBridge::Cancel { task_id, stream: stream.as_bytes() });
        state.dedup.cancels.insert(task_id, via);
        Ok(())
    }

    /// The bridge's answer to a cancel.
    pub(super) fn on_cancelled(&mut self, task_id: u64, cancelled: bool, why: &[u8]) {
        let Some(state) = self.durable.as_mut() else { return };
        let Some(via) = state.dedup.cancels.remove(&task_id) else { return };
        if cancelled {
            self.cancelled(via.asker(), task_id);
            self.answer_cancel(via, task_id, Ok(()));
        } else {
            self.answer_cancel(via, task_id, Err(String::from_utf8_lossy(why).into_owned()));
        }
    }
}
