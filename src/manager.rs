//! The manager process: forks the pool of workers and task processes, reaps them, and forks
//! a successor for every one that exits, whatever the reason. It never touches a client.
//!
//! A successor is forked only once the master has cleaned the slot's channel (`SlotReady`),
//! so it never reads the tail of a frame its predecessor died in the middle of. A process
//! that dies within a second of its start is respawned after a growing back-off (capped at
//! 2 s), so a crash at start-up does not become a fork bomb.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{getpid, Pid};

use crate::app::Application;
use crate::config::ServerConfig;
use crate::ipc::{Channel, ExitReason, FromManager, ManagerToMaster, ReadState, Role, ToManager};
use crate::process;
use crate::shm::Shared;
use crate::signals::{self, Signals};
use crate::{task_worker, worker};

const MASTER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FAST_DEATH: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Signals no pool process acts on: a Ctrl-C in the terminal reaches the whole process group,
/// and only the master decides what it means.
/// SIGTTIN/SIGTTOU (the master's pool scaling, and a terminal's job control) would stop them.
const POOL_BLOCKED: [Signal; 6] =
    [Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGTTIN, Signal::SIGTTOU];

#[derive(Debug)]
enum State {
    Running {
        pid: Pid,
        since: Instant,
    },
    /// Exited; waiting for the master to clean the channel.
    Exited {
        old_pid: Pid,
        reason: ExitReason,
        lived: Duration,
    },
    /// Channel clean; will fork at `at`.
    BackingOff {
        at: Instant,
        old_pid: Pid,
        reason: ExitReason,
    },
    Stopped,
}

impl State {
    fn is_stopped(&self) -> bool {
        matches!(self, State::Stopped)
    }
}

struct Slot {
    role: Role,
    index: u32,
    child_end: OwnedFd,
    state: State,
    /// Deaths in a row that came within `FAST_DEATH` of a start.
    fast_deaths: u32,
    /// Not part of the pool now (shrunk by SIGTTOU, or room to grow): never forked or replaced.
    retired: bool,
}

pub struct ManagerSetup<'a> {
    pub config: &'a ServerConfig,
    pub shared: &'static Shared,
    pub master_channel: OwnedFd,
    pub workers: Vec<OwnedFd>,
    pub tasks: Vec<OwnedFd>,
    pub master_pid: Pid,
    pub credentials: Option<process::Credentials>,
}

pub fn run<A: Application>(app: &mut A, setup: ManagerSetup<'_>) -> i32 {
    process::set_title("taskd: manager");
    process::die_with_parent(setup.master_pid);
    let mut signals = match Signals::open(&[
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("manager: cannot set up signals: {e}");
            return 1;
        }
    };
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("manager: cannot create its poller: {e}");
            return 1;
        }
    };
    let mut master = Channel::new(setup.master_channel);
    let sig_fd = signals.raw_fd();
    let registered = poll
        .registry()
        .register(master.source(), MASTER, Interest::READABLE | Interest::WRITABLE)
        .and_then(|()| poll.registry().register(&mut SourceFd(&sig_fd), SIGNALS, Interest::READABLE));
    if let Err(e) = registered {
        tracing::error!("manager: cannot watch its channels: {e}");
        return 1;
    }

    let mut slots: Vec<Slot> = Vec::new();
    for (role, ends) in [(Role::Worker, setup.workers), (Role::Task, setup.tasks)] {
        for (i, child_end) in ends.into_iter().enumerate() {
            slots.push(Slot {
                role,
                index: i as u32,
                child_end,
                state: State::Stopped,
                fast_deaths: 0,
                retired: role == Role::Task && i >= setup.config.task_worker_num,
            });
        }
    }
    let mut manager = Manager {
        app,
        config: setup.config,
        shared: setup.shared,
        master,
        slots,
        stopping: None,
        terminated: false,
        credentials: setup.credentials,
    };
    tracing::info!(
        "manager started (pid {}): {} workers, {} task processes",
        getpid(),
        setup.config.worker_num,
        setup.config.task_worker_num
    );
    for i in 0..manager.slots.len() {
        if !manager.slots[i].retired {
            manager.fork_slot(i, None);
        }
    }

    let mut events = Events::with_capacity(64);
    loop {
        let timeout = manager.next_timer().map(|at| at.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("manager: poll failed: {e}");
                return 1;
            }
        }
        for sig in signals.pending() {
            match sig {
                Signal::SIGCHLD => {}
                Signal::SIGTERM => tracing::warn!(
                    "manager ignores SIGTERM: send it to the master (pid {}) to stop taskd",
                    setup.master_pid
                ),
                _ => {}
            }
        }
        manager.reap_children();
        match manager.read_master() {
            Ok(ReadState::Open) => {}
            Ok(ReadState::Closed) | Err(_) => {
                tracing::error!("manager: the master is gone; stopping the pool");
                manager.kill_all(Signal::SIGKILL);
                return 1;
            }
        }
        manager.fire_timers();
        if let Err(e) = manager.master.flush() {
            tracing::error!("manager: cannot write to the master: {e}");
            manager.kill_all(Signal::SIGKILL);
            return 1;
        }
        if let Some(deadline) = manager.stopping {
            if manager.all_stopped() {
                tracing::info!("manager: pool stopped");
                return 0;
            }
            if Instant::now() >= deadline {
                // Escalate: the Stop message first, then SIGTERM, then SIGKILL.
                let sig = if manager.terminated { Signal::SIGKILL } else { Signal::SIGTERM };
                tracing::warn!("manager: pool processes still running {STOP_GRACE:?} after being asked to stop; sending {sig}");
                manager.kill_all(sig);
                manager.terminated = true;
                manager.stopping = Some(Instant::now() + STOP_GRACE);
            }
        }
    }
}

struct Manager<'a, A> {
    app: &'a mut A,
    config: &'a ServerConfig,
    shared: &'static Shared,
    master: ManagerToMaster,
    slots: Vec<Slot>,
    /// Set once the master asked for shutdown: the deadline for the pool to be gone.
    stopping: Option<Instant>,
    /// SIGTERM has been sent to the pool during shutdown.
    terminated: bool,
    credentials: Option<process::Credentials>,
}

impl<A: Application> Manager<'_, A> {
    fn fork_slot(&mut self, i: usize, previous: Option<(Pid, ExitReason)>) {
        let manager_pid = getpid();
        let (role, index) = (self.slots[i].role, self.slots[i].index);
        let child_end = &self.slots[i].child_end;
        let fd: RawFd = child_end.as_raw_fd();
        let config = self.config;
        let shared = self.shared;
        let credentials = self.credentials;
        let app = &mut *self.app;
        let result = process::spawn(&[fd], || {
            process::set_title(&format!("taskd: {role} {index}"));
            if let Some(creds) = credentials {
                if let Err(e) = process::drop_privileges(creds) {
                    tracing::error!(
                        "{role} {index}: cannot switch to uid {} gid {}: {e}",
                        creds.uid,
                        creds.gid
                    );
                    return 1;
                }
            }
            // After the switch of user, which clears the parent-death signal; a manager that
            // died in between is caught by the check of the parent's pid.
            process::die_with_parent(manager_pid);
            if let Err(e) = signals::set_blocked(&POOL_BLOCKED) {
                tracing::error!("{role} {index}: cannot set its signal mask: {e}");
                return 1;
            }
            // This process owns the slot's channel end from here on.
            let channel = match child_end.try_clone() {
                Ok(owned) => owned,
                Err(e) => {
                    tracing::error!("{role} {index}: cannot take its channel: {e}");
                    return 1;
                }
            };
            match role {
                Role::Worker => {
                    worker::run(app, worker::WorkerSetup { slot: index, channel, shared, config })
                }
                Role::Task => match crate::durable::Durable::from_config(config) {
                    Some(d) => crate::durable::consumer::run(
                        app,
                        crate::durable::consumer::ConsumerSetup {
                            slot: index,
                            control: crate::durable::consumer::Control::Master(Channel::new(channel)),
                            durable: &d,
                            task_max_request: config.task_max_request,
                        },
                    ),
                    None => task_worker::run(app, task_worker::TaskSetup { slot: index, channel, config }),
                },
            }
        });
        match result {
            Ok(pid) => {
                match previous {
                    Some((old, reason)) => {
                        tracing::info!("respawned {role} {index}: old pid {old} {reason}; new pid {pid}")
                    }
                    None => tracing::debug!("forked {role} {index} as pid {pid}"),
                }
                self.slots[i].state = State::Running { pid, since: Instant::now() };
                self.master.send(&FromManager::Started { role, slot: index, pid: pid.as_raw() as u32 });
            }
            Err(e) => {
                tracing::error!("cannot fork {role} {index}: {e}; retrying in 1s");
                let text = e.to_string();
                self.master.send(&FromManager::ForkFailed { role, slot: index, error: text.as_bytes() });
                let (old_pid, reason) = previous.unwrap_or((Pid::from_raw(0), ExitReason::Code(0)));
                self.slots[i].state =
                    State::BackingOff { at: Instant::now() + Duration::from_secs(1), old_pid, reason };
            }
        }
    }

    fn reap_children(&mut self) {
        for reaped in process::reap() {
            let Some(i) = self
                .slots
                .iter()
                .position(|s| matches!(s.state, State::Running { pid, .. } if pid == reaped.pid))
            else {
                tracing::debug!("manager reaped unknown child {}", reaped.pid);
                continue;
            };
            let slot = &mut self.slots[i];
            let State::Running { since, .. } = slot.state else { continue };
            let lived = since.elapsed();
            if reaped.reason.is_clean() || self.stopping.is_some() {
                tracing::debug!("{} {} (pid {}) {}", slot.role, slot.index, reaped.pid, reaped.reason);
            } else {
                tracing::warn!(
                    "{} {} (pid {}) {} after {:.1?}",
                    slot.role,
                    slot.index,
                    reaped.pid,
                    reaped.reason,
                    lived
                );
            }
            slot.state = if self.stopping.is_some() {
                State::Stopped
            } else {
                State::Exited { old_pid: reaped.pid, reason: reaped.reason, lived }
            };
            self.master.send(&FromManager::Exited {
                role: slot.role,
                slot: slot.index,
                pid: reaped.pid.as_raw() as u32,
                reason: reaped.reason,
                uptime_ms: lived.as_millis() as u64,
            });
        }
    }

    fn read_master(&mut self) -> std::io::Result<ReadState> {
        let state = self.master.fill()?;
        loop {
            let frame = match self.master.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("manager: corrupt message from the master: {e}");
                    return Err(std::io::ErrorKind::InvalidData.into());
                }
            };
            match frame {
                ToManager::SlotReady { role, slot } => self.slot_ready(role, slot),
                ToManager::SlotActive { role, slot, active } => self.set_active(role, slot, active),
                ToManager::Shutdown => self.begin_stop(),
            }
        }
        Ok(state)
    }

    fn slot_ready(&mut self, role: Role, index: u32) {
        let Some(i) = self.slots.iter().position(|s| s.role == role && s.index == index) else {
            return;
        };
        let slot = &mut self.slots[i];
        let State::Exited { old_pid, reason, lived } = slot.state else { return };
        if self.stopping.is_some() || slot.retired {
            slot.state = State::Stopped;
            return;
        }
        if lived < FAST_DEATH && !reason.is_clean() {
            slot.fast_deaths += 1;
            let delay =
                (Duration::from_millis(100) * 2u32.saturating_pow(slot.fast_deaths - 1)).min(MAX_BACKOFF);
            tracing::error!(
                "{role} {index} (pid {old_pid}) {reason} {lived:?} after its start ({} time(s) in a row); respawning in {delay:?}",
                slot.fast_deaths
            );
            slot.state = State::BackingOff { at: Instant::now() + delay, old_pid, reason };
        } else {
            slot.fast_deaths = 0;
            self.fork_slot(i, Some((old_pid, reason)));
        }
    }

    /// Grows or shrinks the pool by one slot; the master stops a retired slot's process.
    fn set_active(&mut self, role: Role, index: u32, active: bool) {
        let Some(i) = self.slots.iter().position(|s| s.role == role && s.index == index) else { return };
        self.slots[i].retired = !active;
        match (active, self.slots[i].state.is_stopped()) {
            (true, true) if self.stopping.is_none() => {
                tracing::info!("adding {role} {index} to the pool");
                self.fork_slot(i, None);
            }
            (false, _) => {
                tracing::info!("taking {role} {index} out of the pool");
                if matches!(self.slots[i].state, State::BackingOff { .. }) {
                    self.slots[i].state = State::Stopped;
                }
            }
            _ => {}
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let backoff = self.slots.iter().filter_map(|s| match s.state {
            State::BackingOff { at, .. } => Some(at),
            _ => None,
        });
        backoff.chain(self.stopping).min()
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if let State::BackingOff { at, old_pid, reason } = self.slots[i].state {
                if at <= now && self.stopping.is_none() {
                    self.fork_slot(i, Some((old_pid, reason)));
                }
            }
        }
    }

    fn begin_stop(&mut self) {
        tracing::info!("manager: stopping the pool");
        self.stopping = Some(Instant::now() + STOP_GRACE);
        for slot in &mut self.slots {
            if !matches!(slot.state, State::Running { .. }) {
                slot.state = State::Stopped;
            }
        }
        // The master has already sent each process a Stop; signals follow only for one that
        // is still busy in a long callback when the grace period ends.
    }

    fn all_stopped(&self) -> bool {
        self.slots.iter().all(|s| !matches!(s.state, State::Running { .. }))
    }

    fn kill_all(&self, sig: Signal) {
        for slot in &self.slots {
            if let State::Running { pid, .. } = slot.state {
                let _ = kill(pid, sig);
            }
        }
    }
}
