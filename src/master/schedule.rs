//! What a job asked for beyond "run it now" (its `run_at`, its priority, its deduplication
//! key), read from a worker's `TaskOptions` frame, and taking a job back before it starts
//! (`cancel`). The waiting itself is the delayed queue's, the order the task queues'.

use std::time::{Duration, Instant, SystemTime};

use super::jobs::JobState;
use super::*;
use crate::app::Priority;

/// A `TaskOptions` frame, kept until the `Task` frame it stands before.
#[derive(Debug, Clone)]
pub struct Options {
    pub task_id: u64,
    /// Unix ms; 0: at once.
    pub run_at_ms: u64,
    pub priority: Priority,
    pub dedup_ttl: Duration,
    pub key: Option<String>,
}

impl Options {
    pub fn read(task_id: u64, run_at_ms: u64, priority: u8, dedup_ttl_ms: u64, key: &[u8]) -> Self {
        let key = (!key.is_empty()).then(|| String::from_utf8_lossy(key).into_owned());
        Options {
            task_id,
            run_at_ms,
            priority: Priority::from_index(priority),
            dedup_ttl: Duration::from_millis(dedup_ttl_ms),
            key,
        }
    }

    /// When the job is due on the reactor's clock, if that is still to come.
    pub fn due(&self) -> Option<Instant> {
        due_at(self.run_at_ms, SystemTime::now(), Instant::now())
    }
}

/// `run_at_ms` (Unix ms) on the monotonic clock, given one reading of each clock; None when it
/// is not in the future (the job runs at once).
pub fn due_at(run_at_ms: u64, wall: SystemTime, now: Instant) -> Option<Instant> {
    let ahead = run_at_ms.checked_sub(crate::app::unix_ms(wall)).filter(|&ms| ms > 0)?;
    now.checked_add(Duration::from_millis(ahead))
}

/// A job's `cancelled` line.
pub fn cancelled_line(task_id: u64) -> Vec<u8> {
    let mut line = serde_json::json!({"event": "cancelled", "task_id": task_id}).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// Who asked to cancel a job (each a session), and so who gets the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The connection that submitted it: the job's `cancelled` line answers it.
    Client(u64),
    /// `taskd cancel N`, with the admin token.
    Operator(u64),
    /// The operator's dashboard.
    Dashboard(u64),
}

impl Via {
    /// The client session that must be the job's own (None: the operator's, any job).
    pub fn asker(self) -> Option<u64> {
        match self {
            Via::Client(s) => Some(s),
            Via::Operator(_) | Via::Dashboard(_) => None,
        }
    }
}

/// An `error` line about job `task_id`.
fn error_line(task_id: u64, why: &str) -> Vec<u8> {
    let mut line =
        serde_json::json!({"event": "error", "task_id": task_id, "error": why}).to_string().into_bytes();
    line.push(b'\n');
    line
}

impl<A: Application> Master<'_, A> {
    /// Cancels job `task_id` if it has not started, for `via`: a client session (which must be
    /// the one that submitted it) or the operator (`taskd cancel N`, the dashboard). The job's
    /// client gets `cancelled` as its final line, and the job never runs. Ok(true): cancelled;
    /// Ok(false): a durable job, asked of Redis, answered by [`Self::answer_cancel`]. Otherwise
    /// why not.
    pub(super) fn cancel(&mut self, via: Via, task_id: u64) -> Result<bool, String> {
        let asker = via.asker();
        let Some(job) = self.jobs.get(task_id) else {
            return Err(if self.results.contains(task_id) {
                format!("job {task_id} has ended: it cannot be cancelled")
            } else if self.durable.is_some() {
                format!(
                    "job {task_id} is not known here: with durable jobs (redis_url) only a job accepted by \
                     this node and not started can be cancelled, from this node"
                )
            } else {
                format!("there is no job {task_id} waiting or running here")
            });
        };
        if asker.is_some_and(|s| s != job.session) {
            return Err(format!(
                "job {task_id} was not submitted by this connection: only its own connection (or \
                 `taskd cancel {task_id}` on the host) can cancel it"
            ));
        }
        if job.group != 0 || job.flags & (task_flags::WAIT | task_flags::CALLBACK) != 0 {
            return Err(format!(
                "job {task_id} belongs to a batch or to a waiting worker: it cannot be cancelled alone"
            ));
        }
        if let Some(state) = &self.durable {
            if state.storing(job.batch) {
                return Err(format!("job {task_id} is being stored in Redis: ask again once it is accepted"));
            }
            // Only Redis knows whether a task process of some node has taken it.
            return self.ask_durable_cancel(via, task_id).map(|()| false);
        }
        match job.state {
            JobState::Running => {
                let pid = self
                    .tasks
                    .iter()
                    .find(|t| t.books.inflight.contains(&task_id))
                    .and_then(|t| t.pid())
                    .map_or_else(String::new, |pid| format!(" (task process {pid})"));
                return Err(format!("job {task_id} is running{pid}: a job cannot be cancelled once started"));
            }
            JobState::Queued => {
                self.jobs.unqueue(task_id);
            }
            JobState::Delayed => self.delayed.remove(task_id),
        }
        self.cancelled(asker, task_id);
        Ok(true)
    }

    /// Job `task_id` is taken back (from the master's queues, or from Redis): it ends with
    /// `cancelled`, for its client and for `result`.
    pub(super) fn cancelled(&mut self, asker: Option<u64>, task_id: u64) {
        let Some(job) = self.jobs.remove(task_id) else { return };
        self.counters.tasks_cancelled += 1;
        self.shared.set_jobs_pending(self.jobs.len() as u64);
        tracing::info!(
            "job {task_id} cancelled by {}",
            asker.map_or_else(|| "the operator".to_string(), |s| format!("its client (session {s})"))
        );
        let line = cancelled_line(task_id);
        self.results.record(task_id, line.clone());
        self.send_to_session(job.session, &line);
        if let Some(key) = job.key() {
            self.key_released(key, task_id, &line, true);
        }
        // Its final line is out: the connection owes nothing more for it.
        if let Some((key, conn)) = self.conn_mut(job.session) {
            conn.outstanding = conn.outstanding.saturating_sub(1);
            if conn.read_closed {
                self.maybe_finished.push(key);
            }
        }
    }

    /// Answers a cancel that Redis carried out (`Ok`) or refused, to whoever asked.
    pub(super) fn answer_cancel(&mut self, via: Via, task_id: u64, answer: Result<(), String>) {
        let line = match (via, answer) {
            // Its own client had the job's `cancelled` line.
            (Via::Client(_), Ok(())) => return,
            (Via::Operator(_), Ok(())) => cancelled_line(task_id),
            (Via::Client(_) | Via::Operator(_), Err(why)) => error_line(task_id, &why),
            (Via::Dashboard(_), Ok(())) => {
                tracing::info!("dashboard: task {task_id} cancelled");
                super::admin::reply("cancel", true, serde_json::json!({"task_id": task_id}))
            }
            (Via::Dashboard(_), Err(why)) => {
                super::admin::reply("cancel", false, serde_json::json!({"task_id": task_id, "error": why}))
            }
        };
        let (Via::Client(session) | Via::Operator(session) | Via::Dashboard(session)) = via;
        self.send_to_session(session, &line);
    }

    /// Tells the clients of this turn's duplicates which job has their key (after their
    /// `accepted`), and the first's final line if it has ended; else they wait for it.
    pub(super) fn tell_duplicates(&mut self) {
        for (session, first, line) in std::mem::take(&mut self.duplicates) {
            let mut told =
                serde_json::json!({"event": "duplicate", "task_id": first}).to_string().into_bytes();
            told.push(b'\n');
            self.send_to_session(session, &told);
            if let Some(line) = line {
                self.final_line_to_duplicate(session, &line);
            }
        }
    }

    /// The job holding `key` ended with `line`: its duplicates get the line (`release`: the
    /// key is free at once).
    pub(super) fn key_released(&mut self, key: &str, task_id: u64, line: &[u8], release: bool) {
        for session in self.keys.ended(key, task_id, line, release, Instant::now()) {
            self.final_line_to_duplicate(session, line);
        }
    }

    pub(super) fn final_line_to_duplicate(&mut self, session: u64, line: &[u8]) {
        self.send_to_session(session, line);
        if let Some((key, conn)) = self.conn_mut(session) {
            conn.outstanding = conn.outstanding.saturating_sub(1);
            if conn.read_closed {
                self.maybe_finished.push(key);
            }
        }
    }

    /// A client's `cancel` (the operator's, with its `token`): the job's `cancelled` line
    /// answers it, or an `error` does.
    pub(super) fn cancel_job(&mut self, session: u64, task_id: u64, token: &[u8]) {
        let operator = !token.is_empty();
        let mut wrong_token = false;
        let answer = if !operator {
            self.cancel(Via::Client(session), task_id)
        } else if self.dashboard.token.as_ref().is_some_and(|t| t.matches_bytes(token)) {
            self.cancel(Via::Operator(session), task_id)
        } else {
            wrong_token = true;
            Err("the admin token does not match (taskd cancel reads the daemon's --admin-token-file, or the one generated beside the pid file); closing the connection"
                .into())
        };
        let line = match answer {
            // Its own client had the line; the operator's connection gets it too.
            Ok(true) if operator => cancelled_line(task_id),
            // Its own client had the line; or Redis is asked, and the answer comes then.
            Ok(_) => return,
            Err(why) => error_line(task_id, &why),
        };
        self.send_to_session(session, &line);
        // As the dashboard does: each guess at the token costs a connection.
        if wrong_token {
            if let Some((key, conn)) = self.conn_mut(session) {
                tracing::warn!("client {}: a cancel with a wrong admin token; closing", conn.peer);
                conn.close_after_flush = true;
                self.mark_dirty(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_to_come_is_due_that_much_later_on_the_monotonic_clock_and_a_past_one_at_once() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000);
        let now = Instant::now();
        assert_eq!(due_at(1_003_000, wall, now), Some(now + Duration::from_secs(3)));
        assert_eq!(due_at(1_000_000, wall, now), None);
        assert_eq!(due_at(5, wall, now), None);
    }

    #[test]
    fn times_are_written_in_rfc3339_utc_to_the_millisecond() {
        assert_eq!(crate::app::rfc3339(1_798_099_200_000), "2026-12-24T08:00:00.000Z");
        assert_eq!(crate::app::rfc3339(1_500), "1970-01-01T00:00:01.500Z");
    }
}
