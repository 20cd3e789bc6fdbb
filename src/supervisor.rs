//! One supervisor for every child process, whoever forks it: the slot table, the back-off of a
//! process that dies at start, reaping, the timers, and stopping with SIGTERM → SIGKILL.
//!
//! The manager uses it for the pool (and adds its gate: a dead process's successor waits until
//! the master has cleaned the slot's channel), `taskd task-node` for its task processes, and the
//! master for the manager and the redis bridge. How to fork a slot's process is the caller's: [`process::spawn`]
//! inside the closure given to [`Supervisor::start`] and [`Supervisor::start_due`].
//!
//! One rule for every child: a process that dies within [`FAST_DEATH`] of its start, other than
//! by exiting with status 0 (it chose to: asked to stop, or its `max_request` reached), is
//! respawned after a back-off that doubles from 100 ms up to [`MAX_BACKOFF`], and logged; one
//! that ran longer, or exited on purpose, is replaced at once. A fork that fails is tried again
//! a second later.

use std::io;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::ipc::ExitReason;
use crate::process::{self, Reaped};

/// A process that exits sooner than this after its start is respawned after a back-off.
pub const FAST_DEATH: Duration = Duration::from_secs(1);
/// The longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const FORK_RETRY: Duration = Duration::from_secs(1);
/// Between two signals of a stop that escalates.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where a slot's process is in its life.
#[derive(Debug, Clone, Copy)]
enum Life {
    /// Nothing running, nothing planned: not started yet, out of the pool, or stopped.
    Idle,
    Running {
        pid: Pid,
        since: Instant,
    },
    /// Gone; waiting for the gate (see [`Supervisor::gated`]) before a successor is planned.
    Exited {
        pid: Pid,
        reason: ExitReason,
        lived: Duration,
    },
    /// To be forked at `at`; `previous` is the process it replaces.
    Due {
        at: Instant,
        previous: Option<(Pid, ExitReason)>,
    },
}

struct Slot {
    /// How logs name it (`worker 0`, `task 3`, `redis bridge`).
    name: String,
    life: Life,
    /// Deaths in a row that came within `FAST_DEATH` of a start.
    fast_deaths: u32,
    /// Not part of the pool now: never forked or replaced.
    retired: bool,
}

/// A child of a slot that was reaped.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub slot: usize,
    pub pid: Pid,
    pub reason: ExitReason,
    pub lived: Duration,
}

/// A stop in progress: which signal was sent last, and when to send the next.
#[derive(Debug, Clone, Copy)]
struct Stop {
    deadline: Instant,
    sent: Option<Signal>,
    asked_at: Instant,
}

pub struct Supervisor {
    /// Who supervises, for the logs (`manager`, `task node N`, `master`).
    who: String,
    slots: Vec<Slot>,
    /// A successor waits for [`Supervisor::release`] (the manager's gate: the master cleans
    /// the slot's channel first). Otherwise it is planned as soon as its predecessor is reaped.
    gated: bool,
    stop: Option<Stop>,
}

impl Supervisor {
    pub fn new(who: impl Into<String>, gated: bool) -> Self {
        Supervisor { who: who.into(), slots: Vec::new(), gated, stop: None }
    }

    /// Adds a slot; an active one is due to start now. Returns its index.
    pub fn add(&mut self, name: impl Into<String>, active: bool) -> usize {
        let life = if active { Life::Due { at: Instant::now(), previous: None } } else { Life::Idle };
        self.slots.push(Slot { name: name.into(), life, fast_deaths: 0, retired: !active });
        self.slots.len() - 1
    }

    pub fn stopping(&self) -> bool {
        self.stop.is_some()
    }

    /// The process running in slot `i`, if any.
    pub fn pid(&self, i: usize) -> Option<Pid> {
        match self.slots.get(i)?.life {
            Life::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// Every process running now.
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.slots.iter().filter_map(|s| match s.life {
            Life::Running { pid, .. } => Some(pid),
            _ => None,
        })
    }

    /// Forks slot `i`'s process now with `spawn`; logs it, and plans another try a second later
    /// if the fork failed.
    pub fn start(&mut self, i: usize, spawn: impl FnOnce(usize) -> io::Result<Pid>) -> io::Result<Pid> {
        let previous = match self.slots[i].life {
            Life::Due { previous, .. } => previous,
            Life::Exited { pid, reason, .. } => Some((pid, reason)),
            _ => None,
        };
        let result = spawn(i);
        let slot = &mut self.slots[i];
        match &result {
            Ok(pid) => {
                match previous {
                    Some((old, reason)) => {
                        tracing::info!("respawned {}: old pid {old} {reason}; new pid {pid}", slot.name)
                    }
                    None => tracing::debug!("forked {} as pid {pid}", slot.name),
                }
                slot.life = Life::Running { pid: *pid, since: Instant::now() };
            }
            Err(e) => {
                tracing::error!("cannot fork {}: {e}; retrying in {FORK_RETRY:?}", slot.name);
                slot.life = Life::Due { at: Instant::now() + FORK_RETRY, previous };
            }
        }
        result
    }

    /// Forks every slot whose time has come (none while stopping); returns each slot tried.
    pub fn start_due(
        &mut self,
        mut spawn: impl FnMut(usize) -> io::Result<Pid>,
    ) -> Vec<(usize, io::Result<Pid>)> {
        let now = Instant::now();
        let mut started = Vec::new();
        if self.stop.is_some() {
            return started;
        }
        for i in 0..self.slots.len() {
            if matches!(self.slots[i].life, Life::Due { at, .. } if at <= now) && !self.slots[i].retired {
                let result = self.start(i, &mut spawn);
                started.push((i, result));
            }
        }
        started
    }

    /// Reaps every child that has ended; those that are not this supervisor's are dropped
    /// (for a process that owns all its children).
    pub fn reap(&mut self) -> Vec<Exit> {
        process::reap().into_iter().filter_map(|r| self.exited(r)).collect()
    }

    /// Records the end of a reaped child; None if it is not one of these slots.
    pub fn exited(&mut self, reaped: Reaped) -> Option<Exit> {
        let i = self
            .slots
            .iter()
            .position(|s| matches!(s.life, Life::Running { pid, .. } if pid == reaped.pid))?;
        let Life::Running { since, .. } = self.slots[i].life else { return None };
        let lived = since.elapsed();
        let slot = &mut self.slots[i];
        if reaped.reason.is_clean() || self.stop.is_some() {
            tracing::debug!("{} (pid {}) {}", slot.name, reaped.pid, reaped.reason);
        } else {
            tracing::warn!("{} (pid {}) {} after {lived:.1?}", slot.name, reaped.pid, reaped.reason);
        }
        slot.life = Life::Exited { pid: reaped.pid, reason: reaped.reason, lived };
        // A gated slot stays `Exited` even out of the pool: taken back in, it must still wait
        // for its channel to be cleaned.
        if self.stop.is_some() {
            slot.life = Life::Idle;
        } else if !self.gated {
            self.release(i);
        }
        Some(Exit { slot: i, pid: reaped.pid, reason: reaped.reason, lived })
    }

    /// The gate opened for slot `i` (its channel is clean): plans its successor, at once or
    /// after the back-off.
    pub fn release(&mut self, i: usize) {
        let stopping = self.stop.is_some();
        let Some(slot) = self.slots.get_mut(i) else { return };
        let Life::Exited { pid, reason, lived } = slot.life else { return };
        if stopping || slot.retired {
            slot.life = Life::Idle;
            return;
        }
        let previous = Some((pid, reason));
        if lived < FAST_DEATH && !reason.is_clean() {
            slot.fast_deaths += 1;
            let delay = (FIRST_BACKOFF * 2u32.saturating_pow(slot.fast_deaths - 1)).min(MAX_BACKOFF);
            tracing::error!(
                "{} (pid {pid}) {reason} {lived:?} after its start ({} time(s) in a row); respawning in {delay:?}",
                slot.name,
                slot.fast_deaths
            );
            slot.life = Life::Due { at: Instant::now() + delay, previous };
        } else {
            slot.fast_deaths = 0;
            slot.life = Life::Due { at: Instant::now(), previous };
        }
    }

    /// Takes slot `i` into the pool (due to start now if nothing runs in it) or out of it
    /// (never replaced; a planned start is dropped, a running process is the caller's to stop).
    /// Returns whether it changed.
    pub fn set_active(&mut self, i: usize, active: bool) -> bool {
        let stopping = self.stop.is_some();
        let Some(slot) = self.slots.get_mut(i) else { return false };
        let changed = slot.retired == active;
        slot.retired = !active;
        match (active, slot.life) {
            (true, Life::Idle) if !stopping => {
                slot.life = Life::Due { at: Instant::now(), previous: None };
            }
            (false, Life::Due { .. }) => slot.life = Life::Idle,
            _ => {}
        }
        changed
    }

    /// When to call [`Supervisor::start_due`] or [`Supervisor::escalate`] next.
    pub fn next_timer(&self) -> Option<Instant> {
        if let Some(stop) = &self.stop {
            return Some(stop.deadline);
        }
        self.slots
            .iter()
            .filter(|s| !s.retired)
            .filter_map(|s| match s.life {
                Life::Due { at, .. } => Some(at),
                _ => None,
            })
            .min()
    }

    /// Stops every slot: nothing is started or replaced from now on; `first` goes to every
    /// running process now (None: the caller asked them another way, a Stop message).
    /// [`Supervisor::escalate`] sends SIGTERM once `grace` is over, then SIGKILL.
    pub fn begin_stop(&mut self, first: Option<Signal>, grace: Duration) {
        if self.stop.is_some() {
            return;
        }
        for slot in &mut self.slots {
            if !matches!(slot.life, Life::Running { .. }) {
                slot.life = Life::Idle;
            }
        }
        if let Some(sig) = first {
            self.kill_all(sig);
        }
        let now = Instant::now();
        self.stop = Some(Stop { deadline: now + grace, sent: first, asked_at: now });
    }

    /// Past the stop's deadline: SIGTERM to what still runs if it was not sent yet, else
    /// SIGKILL, every [`STOP_GRACE`].
    pub fn escalate(&mut self) {
        let Some(stop) = self.stop else { return };
        if Instant::now() < stop.deadline || self.all_stopped() {
            return;
        }
        let sig = if stop.sent.is_none() { Signal::SIGTERM } else { Signal::SIGKILL };
        tracing::warn!(
            "{}: {} process(es) still running {:.1?} after being asked to stop; sending {sig}",
            self.who,
            self.pids().count(),
            stop.asked_at.elapsed()
        );
        self.kill_all(sig);
        self.stop = Some(Stop { deadline: Instant::now() + STOP_GRACE, sent: Some(sig), ..stop });
    }

    pub fn all_stopped(&self) -> bool {
        self.pids().next().is_none()
    }

    pub fn kill_all(&self, sig: Signal) {
        for pid in self.pids() {
            let _ = kill(pid, sig);
        }
    }

    /// Waits up to `grace` for every running process to exit, then kills what is left and
    /// waits for it a moment: for a process about to exit itself, that cannot keep looping.
    pub fn stop_and_wait(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for i in 0..self.slots.len() {
            let Life::Running { pid, .. } = self.slots[i].life else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            if process::wait_for(pid, left).is_none() {
                tracing::warn!(
                    "{}: {} (pid {pid}) did not exit in time; sending SIGKILL",
                    self.who,
                    self.slots[i].name
                );
                let _ = kill(pid, Signal::SIGKILL);
                process::wait_for(pid, Duration::from_secs(1));
            }
            self.slots[i].life = Life::Idle;
        }
        let now = Instant::now();
        self.stop = Some(Stop { deadline: now, sent: Some(Signal::SIGKILL), asked_at: now });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reaped(pid: Pid, reason: ExitReason) -> Reaped {
        Reaped { pid, reason }
    }

    fn running(sup: &mut Supervisor, i: usize, pid: i32) -> Pid {
        let pid = Pid::from_raw(pid);
        sup.start(i, |_| Ok(pid)).unwrap();
        pid
    }

    #[test]
    fn a_crash_at_start_backs_off_more_each_time_and_a_clean_exit_does_not() {
        let mut sup = Supervisor::new("test", false);
        let i = sup.add("task 0", true);
        let killed = ExitReason::Signal(9);
        let mut delays = Vec::new();
        for n in 0..6 {
            let pid = running(&mut sup, i, 1000 + n);
            sup.exited(reaped(pid, killed)).unwrap();
            let at = sup.next_timer().unwrap();
            delays.push((at - Instant::now()).as_millis().div_ceil(100) * 100);
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000]);
        let pid = running(&mut sup, i, 2000);
        sup.exited(reaped(pid, ExitReason::Code(0))).unwrap();
        assert!(sup.next_timer().unwrap() <= Instant::now(), "an exit on purpose is replaced at once");
    }

    #[test]
    fn a_gated_slot_waits_for_its_release() {
        let mut sup = Supervisor::new("test", true);
        let i = sup.add("worker 0", true);
        let pid = running(&mut sup, i, 10);
        assert_eq!(sup.pid(i), Some(pid));
        let exit = sup.exited(reaped(pid, ExitReason::Code(0))).unwrap();
        assert_eq!((exit.slot, exit.pid), (i, pid));
        assert_eq!(sup.next_timer(), None, "nothing planned before the gate opens");
        assert!(sup.exited(reaped(pid, ExitReason::Code(0))).is_none(), "reaped once");
        sup.release(i);
        assert!(sup.next_timer().is_some());
        let started = sup.start_due(|_| Ok(Pid::from_raw(11)));
        assert_eq!(started.len(), 1);
        assert_eq!(sup.pid(i), Some(Pid::from_raw(11)));
    }

    #[test]
    fn a_retired_slot_is_not_replaced_and_a_stop_starts_nothing() {
        let mut sup = Supervisor::new("test", false);
        let a = sup.add("task 0", true);
        let b = sup.add("task 1", false);
        assert_eq!(sup.start_due(|i| Ok(Pid::from_raw(20 + i as i32))).len(), 1);
        assert!(sup.set_active(b, true));
        assert_eq!(sup.start_due(|i| Ok(Pid::from_raw(20 + i as i32))).len(), 1);
        assert!(sup.set_active(a, false));
        sup.exited(reaped(Pid::from_raw(20), ExitReason::Code(0))).unwrap();
        assert_eq!(sup.pid(a), None);
        assert!(sup.start_due(|_| Ok(Pid::from_raw(30))).is_empty(), "retired: not replaced");
        sup.begin_stop(None, STOP_GRACE);
        assert!(!sup.all_stopped());
        sup.exited(reaped(Pid::from_raw(21), ExitReason::Signal(9))).unwrap();
        assert!(sup.all_stopped());
        assert!(sup.start_due(|_| Ok(Pid::from_raw(31))).is_empty(), "stopping: not replaced");
    }

    #[test]
    fn a_failed_fork_is_tried_again_a_second_later() {
        let mut sup = Supervisor::new("test", false);
        let i = sup.add("redis bridge", true);
        let tried = sup.start_due(|_| Err(io::Error::from(io::ErrorKind::WouldBlock)));
        assert_eq!(tried.len(), 1);
        assert_eq!(sup.pid(i), None);
        let at = sup.next_timer().unwrap();
        assert!(at > Instant::now() + Duration::from_millis(900));
    }
}
