//! The master's view of each slot of the pool: its channel, where its process is in its life,
//! and what that process has not finished (its books: a worker's replay log, a task
//! process's jobs).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::Instant;

/// Work sent ahead to a task process is bounded by time: about this many seconds of it.
const PREFETCH_BUDGET: f64 = 0.002;

use super::replay::ReplayLog;
use crate::ipc::{MasterToTask, MasterToWorker, ToTask, ToWorker};

/// Where a slot's process is in its life, as the master knows it from the manager's reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// No process: the manager is starting one (or will, once the slot is clean).
    Starting,
    Running {
        pid: u32,
        since: Instant,
    },
    /// Asked to exit (reload, shrink, shutdown) once it has finished what it was given;
    /// `retiring`: out of the pool, nothing replaces it.
    Stopping {
        pid: u32,
        retiring: bool,
    },
    /// Out of the pool (room for SIGTTIN to grow it), no process.
    Retired,
}

/// What a slot's books say about its process: whether it holds unfinished work, and what to
/// forget when it is gone.
pub trait Books {
    /// The master's end of the slot's link.
    type Chan;
    /// Asks the slot's process to exit once it has handled what is queued before this.
    fn send_stop(chan: &mut Self::Chan);
    fn is_empty(&self) -> bool;
    /// The process is gone (what it had not finished has been handed back already).
    fn process_gone(&mut self) {}
}

/// One slot of the pool: its process's life and its link, and its books (`slot.books.log`,
/// `slot.books.inflight`).
pub struct Slot<B: Books> {
    pub chan: B::Chan,
    /// The slot's child end, to empty it when a process dies.
    pub child_end: OwnedFd,
    pub life: Life,
    /// Requests (or jobs) handled by the current process.
    pub served: u64,
    pub starts: u64,
    pub books: B,
}

pub type WorkerSlot = Slot<WorkerBooks>;
pub type TaskSlot = Slot<TaskBooks>;

impl<B: Books + Default> Slot<B> {
    pub fn new(chan: B::Chan, child_end: OwnedFd) -> Self {
        Slot { chan, child_end, life: Life::Starting, served: 0, starts: 0, books: B::default() }
    }
}

impl<B: Books> Slot<B> {
    /// The manager started `pid` in this slot. Taken out of the pool while its predecessor was
    /// being replaced, it is asked to stop at once.
    pub fn started(&mut self, pid: u32) {
        let retired =
            self.life == Life::Retired || matches!(self.life, Life::Stopping { retiring: true, .. });
        self.life = Life::Running { pid, since: Instant::now() };
        self.served = 0;
        self.starts += 1;
        if retired {
            self.retire();
        }
    }

    /// Its process is gone.
    pub fn exited(&mut self) {
        self.life = match self.life {
            Life::Stopping { retiring: true, .. } | Life::Retired => Life::Retired,
            _ => Life::Starting,
        };
        self.books.process_gone();
    }

    /// Asks the process to exit once it has handled what is queued before this; false if
    /// none runs or it was asked already.
    pub fn ask_to_stop(&mut self) -> bool {
        let Life::Running { pid, .. } = self.life else { return false };
        self.life = Life::Stopping { pid, retiring: false };
        B::send_stop(&mut self.chan);
        true
    }

    /// Takes the slot out of the pool: its process (if any) is asked to stop, and not replaced.
    pub fn retire(&mut self) {
        self.life = match self.life {
            Life::Running { pid, .. } => {
                B::send_stop(&mut self.chan);
                Life::Stopping { pid, retiring: true }
            }
            Life::Stopping { pid, .. } => Life::Stopping { pid, retiring: true },
            Life::Starting | Life::Retired => Life::Retired,
        };
    }

    /// Takes the slot back into the pool: a process that is stopping is replaced.
    pub fn enlist(&mut self) {
        self.life = match self.life {
            Life::Stopping { pid, .. } => Life::Stopping { pid, retiring: false },
            Life::Retired => Life::Starting,
            life => life,
        };
    }

    /// Part of the pool (a process runs or will).
    pub fn in_pool(&self) -> bool {
        !matches!(self.life, Life::Retired | Life::Stopping { retiring: true, .. })
    }

    /// Its process, while one runs.
    pub fn pid(&self) -> Option<u32> {
        match self.life {
            Life::Running { pid, .. } | Life::Stopping { pid, .. } => Some(pid),
            Life::Starting | Life::Retired => None,
        }
    }

    pub fn is_alive(&self) -> bool {
        self.pid().is_some()
    }

    /// Running, and not asked to stop: may be given more.
    pub fn accepts_work(&self) -> bool {
        matches!(self.life, Life::Running { .. })
    }

    pub fn state(&self) -> &'static str {
        match (self.is_alive(), self.books.is_empty()) {
            (false, _) => "starting",
            (true, true) => "idle",
            (true, false) => "busy",
        }
    }
}

/// A worker slot's books: the deliveries its process has not committed.
#[derive(Default)]
pub struct WorkerBooks {
    pub log: ReplayLog,
}

impl Books for WorkerBooks {
    type Chan = MasterToWorker;
    fn send_stop(chan: &mut MasterToWorker) {
        chan.send(&ToWorker::Stop);
    }
    fn is_empty(&self) -> bool {
        self.log.is_empty()
    }
}

/// A task slot's books: the jobs sent to its process, and how long they take.
#[derive(Default)]
pub struct TaskBooks {
    /// Jobs sent to the current process, in the order it runs them.
    pub inflight: VecDeque<u64>,
    /// When the job at the head of `inflight` started (for `task_timeout`).
    pub running_since: Option<Instant>,
    /// The job this process was killed for, having run past `task_timeout`.
    pub timed_out: Option<u64>,
    /// A moving average of how long this slot's jobs take (for the prefetch).
    job_seconds: Option<f64>,
    /// How many jobs that average fits in `PREFETCH_BUDGET` (0: not timed yet), worked out
    /// when it changes: [`TaskBooks::room`] is asked for every slot for every job handed out.
    ahead: usize,
}

impl Books for TaskBooks {
    type Chan = MasterToTask;
    fn send_stop(chan: &mut MasterToTask) {
        chan.send(&ToTask::Stop);
    }
    fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    fn process_gone(&mut self) {
        self.running_since = None;
        self.timed_out = None;
    }
}

impl TaskBooks {
    /// Records that the job at the head of `inflight` changed, at `now` (the master's turn
    /// clock: a job's run is timed to the turn, not read from the clock per job).
    pub fn head_changed(&mut self, now: Instant) {
        self.running_since = (!self.inflight.is_empty()).then_some(now);
    }

    /// The head job finished (seen at `now`): learn how long this process's jobs take.
    pub fn head_finished(&mut self, now: Instant) {
        if let Some(since) = self.running_since {
            let took = now.saturating_duration_since(since).as_secs_f64();
            self.set_job_seconds(match self.job_seconds {
                Some(avg) => avg * 0.8 + took * 0.2,
                None => took,
            });
        }
        self.head_changed(now);
    }

    /// Sets the average run time of this slot's jobs, and so its prefetch.
    pub fn set_job_seconds(&mut self, avg: f64) {
        self.job_seconds = Some(avg);
        self.ahead = if avg > 0.0 { (PREFETCH_BUDGET / avg) as usize } else { usize::MAX };
    }

    /// How many jobs to send this process ahead: as many as it runs in `PREFETCH_BUDGET`
    /// (quick jobs go in batches, one write for many), one at a time while its jobs are slow
    /// or not measured yet (a slow job never holds others back that an idle process could run).
    pub fn room(&self, max: usize) -> usize {
        self.ahead.clamp(1, max)
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
        assert_eq!(t.books.room(64), 1, "one at a time until a job has been timed");
        t.books.set_job_seconds(1.0);
        assert_eq!(t.books.room(64), 1, "slow jobs: one at a time");
        t.books.set_job_seconds(0.0001);
        assert_eq!(t.books.room(64), 20, "quick jobs: about 2 ms of work ahead");
        t.books.set_job_seconds(0.000_001);
        assert_eq!(t.books.room(64), 64, "never past the configured most");
        assert_eq!(t.books.room(1), 1, "task_prefetch 1 turns it off");
    }

    #[test]
    fn a_slot_taken_out_of_the_pool_is_not_refilled_until_taken_back() {
        let mut t = slot();
        assert!(!t.is_alive() && t.in_pool());
        t.started(10);
        assert!(t.accepts_work() && t.pid() == Some(10));
        t.retire();
        assert_eq!(t.life, Life::Stopping { pid: 10, retiring: true });
        assert!(!t.accepts_work() && !t.in_pool() && t.is_alive());
        assert!(!t.ask_to_stop(), "asked already");
        t.exited();
        assert_eq!(t.life, Life::Retired);
        // A successor forked before the manager heard of the shrink is stopped at once.
        t.started(11);
        assert_eq!(t.life, Life::Stopping { pid: 11, retiring: true });
        t.enlist();
        t.exited();
        assert_eq!(t.life, Life::Starting, "back in the pool: replaced");
    }

    #[test]
    fn a_reload_replaces_the_process() {
        let mut t = slot();
        t.started(10);
        assert!(t.ask_to_stop());
        assert!(t.in_pool() && !t.accepts_work());
        t.exited();
        assert_eq!(t.life, Life::Starting);
        assert_eq!(t.pid(), None);
        t.started(12);
        assert_eq!((t.starts, t.state()), (2, "idle"));
    }
}
