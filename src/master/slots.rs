//! The master's view of each slot of the pool: its channel, its current process, and what
//! that process has not finished.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::Instant;

/// Work sent ahead to a task process is bounded by time: about this many seconds of it.
const PREFETCH_BUDGET: f64 = 0.002;

use super::replay::ReplayLog;
use crate::ipc::{MasterToTask, MasterToWorker, ToTask, ToWorker};

pub struct WorkerSlot {
    pub chan: MasterToWorker,
    /// The slot's child end, to empty it when a process dies.
    pub child_end: OwnedFd,
    /// The current process (0: none running).
    pub pid: u32,
    pub alive: bool,
    /// Deliveries not committed yet.
    pub log: ReplayLog,
    /// Requests handled by the current process.
    pub served: u64,
    pub starts: u64,
    /// Asked to stop (reload); no longer counted as available.
    pub stopping: bool,
}

impl WorkerSlot {
    pub fn new(chan: MasterToWorker, child_end: OwnedFd) -> Self {
        WorkerSlot {
            chan,
            child_end,
            pid: 0,
            alive: false,
            log: ReplayLog::default(),
            served: 0,
            starts: 0,
            stopping: false,
        }
    }

    pub fn started(&mut self, pid: u32) {
        self.pid = pid;
        self.alive = true;
        self.served = 0;
        self.starts += 1;
        self.stopping = false;
    }

    pub fn exited(&mut self) {
        self.alive = false;
        self.pid = 0;
    }

    /// Asks the process to exit once it has handled what is queued before this.
    pub fn ask_to_stop(&mut self) -> bool {
        if !self.alive || self.stopping {
            return false;
        }
        self.stopping = true;
        self.chan.send(&ToWorker::Stop);
        true
    }

    pub fn state(&self) -> &'static str {
        match (self.alive, self.log.is_empty()) {
            (false, _) => "starting",
            (true, true) => "idle",
            (true, false) => "busy",
        }
    }
}

pub struct TaskSlot {
    pub chan: MasterToTask,
    pub child_end: OwnedFd,
    pub pid: u32,
    pub alive: bool,
    /// Jobs sent to the current process, in the order it runs them.
    pub inflight: VecDeque<u64>,
    /// When the job at the head of `inflight` started (for `task_timeout`).
    pub running_since: Option<Instant>,
    /// The job this process was killed for, having run past `task_timeout`.
    pub timed_out: Option<u64>,
    /// A moving average of how long this slot's jobs take (for the prefetch).
    pub job_seconds: Option<f64>,
    /// Part of the pool now (SIGTTIN/SIGTTOU move the boundary).
    pub enabled: bool,
    pub served: u64,
    pub starts: u64,
    pub stopping: bool,
}

impl TaskSlot {
    pub fn new(chan: MasterToTask, child_end: OwnedFd) -> Self {
        TaskSlot {
            chan,
            child_end,
            pid: 0,
            alive: false,
            inflight: VecDeque::new(),
            running_since: None,
            timed_out: None,
            job_seconds: None,
            enabled: true,
            served: 0,
            starts: 0,
            stopping: false,
        }
    }

    pub fn started(&mut self, pid: u32) {
        self.pid = pid;
        self.alive = true;
        self.served = 0;
        self.starts += 1;
        self.stopping = false;
    }

    pub fn exited(&mut self) {
        self.alive = false;
        self.pid = 0;
        self.running_since = None;
        self.timed_out = None;
    }

    /// Records that the job at the head of `inflight` changed.
    pub fn head_changed(&mut self) {
        self.running_since = (!self.inflight.is_empty()).then(Instant::now);
    }

    /// The head job finished: learn how long this process's jobs take.
    pub fn head_finished(&mut self) {
        if let Some(since) = self.running_since {
            let took = since.elapsed().as_secs_f64();
            self.job_seconds = Some(match self.job_seconds {
                Some(avg) => avg * 0.8 + took * 0.2,
                None => took,
            });
        }
        self.head_changed();
    }

    /// How many jobs to send this process ahead: as many as it runs in `PREFETCH_BUDGET`
    /// (quick jobs go in batches, one write for many), one at a time while its jobs are slow
    /// or not measured yet (a slow job never holds others back that an idle process could run).
    pub fn room(&self, max: usize) -> usize {
        let ahead = match self.job_seconds {
            Some(avg) if avg > 0.0 => (PREFETCH_BUDGET / avg) as usize,
            Some(_) => max,
            None => 1,
        };
        ahead.clamp(1, max)
    }

    pub fn accepts_work(&self) -> bool {
        self.alive && !self.stopping && self.enabled
    }

    /// Asks the process to exit after the job it is running.
    pub fn ask_to_stop(&mut self) -> bool {
        if !self.alive || self.stopping {
            return false;
        }
        self.stopping = true;
        self.chan.send(&ToTask::Stop);
        true
    }

    pub fn state(&self) -> &'static str {
        match (self.alive, self.inflight.is_empty()) {
            (false, _) => "starting",
            (true, true) => "idle",
            (true, false) => "busy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> TaskSlot {
        let (a, b) = crate::ipc::channel::pair().unwrap();
        TaskSlot::new(crate::ipc::Channel::new(a), b)
    }

    #[test]
    fn prefetch_follows_how_long_jobs_take() {
        let mut t = slot();
        assert_eq!(t.room(64), 1, "one at a time until a job has been timed");
        t.job_seconds = Some(1.0);
        assert_eq!(t.room(64), 1, "slow jobs: one at a time");
        t.job_seconds = Some(0.0001);
        assert_eq!(t.room(64), 20, "quick jobs: about 2 ms of work ahead");
        t.job_seconds = Some(0.000_001);
        assert_eq!(t.room(64), 64, "never past the configured most");
        assert_eq!(t.room(1), 1, "task_prefetch 1 turns it off");
    }
}
