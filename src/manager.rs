//! The manager process: forks the pool of workers and task processes, reaps them, and forks
//! a successor for every one that exits, whatever the reason. It never touches a client.
//!
//! A successor is forked only once the master has cleaned the slot's channel (`SlotReady`),
//! so it never reads the tail of a frame its predecessor died in the middle of: that gate is
//! the manager's; the slots, the back-off of a crash at start-up, reaping and the escalation
//! of a stop are the [`Supervisor`]'s, the same as for a task node's and the redis bridge.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::unistd::{getpid, Pid};

use crate::app::Application;
use crate::config::ServerConfig;
use crate::ipc::{Channel, FromManager, ManagerToMaster, ReadState, Role, ToManager};
use crate::process::{self, ProcessError};
use crate::shm::Shared;
use crate::signals::{self, Signals};
use crate::supervisor::{Supervisor, STOP_GRACE};
use crate::{task_worker, worker};

const MASTER: Token = Token(0);
const SIGNALS: Token = Token(1);

/// Signals no pool process acts on: a Ctrl-C in the terminal reaches the whole process group,
/// and only the master decides what it means.
/// SIGTTIN/SIGTTOU (the master's pool scaling, and a terminal's job control) would stop them.
const POOL_BLOCKED: [Signal; 6] =
    [Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGTTIN, Signal::SIGTTOU];

/// A slot of the pool: which process it holds, and the channel end each of them is handed
/// (its life is the supervisor's slot of the same index).
struct Slot {
    role: Role,
    index: u32,
    child_end: OwnedFd,
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

/// Runs the manager until the pool has stopped (Ok) or the master is gone.
pub fn run<A: Application>(app: &mut A, setup: ManagerSetup<'_>) -> Result<(), ProcessError> {
    process::die_with_parent(setup.master_pid);
    let mut signals = Signals::open(&[
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ])
    .map_err(ProcessError::io("cannot set up signals"))?;
    let mut poll = Poll::new().map_err(ProcessError::io("cannot create its poller"))?;
    let mut master: ManagerToMaster = Channel::new(setup.master_channel);
    let sig_fd = signals.raw_fd();
    poll.registry()
        .register(master.source(), MASTER, Interest::READABLE | Interest::WRITABLE)
        .and_then(|()| poll.registry().register(&mut SourceFd(&sig_fd), SIGNALS, Interest::READABLE))
        .map_err(ProcessError::io("cannot watch its channels"))?;

    let mut slots: Vec<Slot> = Vec::new();
    // The master's SlotReady is the gate: a successor waits for its channel to be cleaned.
    let mut sup = Supervisor::new("manager", true);
    for (role, ends) in [(Role::Worker, setup.workers), (Role::Task, setup.tasks)] {
        for (i, child_end) in ends.into_iter().enumerate() {
            let active = role == Role::Worker || i < setup.config.task_worker_num;
            sup.add(format!("{role} {i}"), active);
            slots.push(Slot { role, index: i as u32, child_end });
        }
    }
    let mut manager = Manager {
        app,
        config: setup.config,
        shared: setup.shared,
        master,
        slots,
        sup,
        credentials: setup.credentials,
    };
    tracing::info!(
        "manager started (pid {}): {} workers, {} task processes",
        getpid(),
        setup.config.worker_num,
        setup.config.task_worker_num
    );
    manager.start_due();

    let mut events = Events::with_capacity(64);
    loop {
        let timeout = manager.sup.next_timer().map(|at| at.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                manager.sup.kill_all(Signal::SIGKILL);
                return Err(ProcessError::Io { what: "poll failed", source: e });
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
        let read = manager.read_master();
        if !matches!(read, Ok(ReadState::Open)) {
            // Without the master, the pool has no one to serve: it goes too.
            manager.sup.kill_all(Signal::SIGKILL);
            return Err(match read {
                Err(e) => e,
                Ok(_) => ProcessError::MasterGone,
            });
        }
        manager.start_due();
        if let Err(e) = manager.master.flush() {
            manager.sup.kill_all(Signal::SIGKILL);
            return Err(ProcessError::Io { what: "cannot write to the master", source: e });
        }
        if manager.sup.stopping() {
            if manager.sup.all_stopped() {
                tracing::info!("manager: pool stopped");
                return Ok(());
            }
            // The Stop message first (the master's), then SIGTERM, then SIGKILL.
            manager.sup.escalate();
        }
    }
}

struct Manager<'a, A> {
    app: &'a mut A,
    config: &'a ServerConfig,
    shared: &'static Shared,
    master: ManagerToMaster,
    slots: Vec<Slot>,
    sup: Supervisor,
    credentials: Option<process::Credentials>,
}

impl<A: Application> Manager<'_, A> {
    /// Forks every slot that is due, and tells the master about each.
    fn start_due(&mut self) {
        let Manager { app, config, shared, credentials, slots, sup, master } = self;
        let (config, shared, credentials) = (*config, *shared, *credentials);
        let started = sup.start_due(|i| fork_slot(&mut **app, config, shared, credentials, &slots[i]));
        for (i, result) in started {
            let (role, slot) = (slots[i].role, slots[i].index);
            match result {
                Ok(pid) => master.send(&FromManager::Started { role, slot, pid: pid.as_raw() as u32 }),
                Err(e) => {
                    let text = e.to_string();
                    master.send(&FromManager::ForkFailed { role, slot, error: text.as_bytes() });
                }
            }
        }
    }

    fn reap_children(&mut self) {
        for exit in self.sup.reap() {
            let slot = &self.slots[exit.slot];
            self.master.send(&FromManager::Exited {
                role: slot.role,
                slot: slot.index,
                pid: exit.pid.as_raw() as u32,
                reason: exit.reason,
                uptime_ms: exit.lived.as_millis() as u64,
            });
        }
    }

    fn read_master(&mut self) -> Result<ReadState, ProcessError> {
        let state = self.master.fill().map_err(ProcessError::io("reading from the master failed"))?;
        loop {
            let frame = match self.master.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(ProcessError::Corrupt(e)),
            };
            match frame {
                ToManager::SlotReady { role, slot } => {
                    if let Some(i) = self.find(role, slot) {
                        self.sup.release(i);
                    }
                }
                ToManager::SlotActive { role, slot, active } => self.set_active(role, slot, active),
                ToManager::Shutdown => {
                    tracing::info!("manager: stopping the pool");
                    // The master has already sent each process a Stop; signals follow only for
                    // one that is still busy in a long callback when the grace period ends.
                    self.sup.begin_stop(None, STOP_GRACE);
                }
            }
        }
        Ok(state)
    }

    fn find(&self, role: Role, index: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.role == role && s.index == index)
    }

    /// Grows or shrinks the pool by one slot; the master stops a retired slot's process.
    fn set_active(&mut self, role: Role, index: u32, active: bool) {
        let Some(i) = self.find(role, index) else { return };
        if self.sup.set_active(i, active) && !self.sup.stopping() {
            if active {
                tracing::info!("adding {role} {index} to the pool");
            } else {
                tracing::info!("taking {role} {index} out of the pool");
            }
        }
    }
}

/// Forks the process of one slot of the pool.
fn fork_slot<A: Application>(
    app: &mut A,
    config: &ServerConfig,
    shared: &'static Shared,
    credentials: Option<process::Credentials>,
    slot: &Slot,
) -> std::io::Result<Pid> {
    let manager_pid = getpid();
    let (role, index, child_end) = (slot.role, slot.index, &slot.child_end);
    process::spawn(&format!("{role} {index}"), &[child_end.as_raw_fd()], || {
        if let Some(creds) = credentials {
            process::drop_privileges(creds).map_err(|source| ProcessError::Credentials { creds, source })?;
        }
        // After the switch of user, which clears the parent-death signal; a manager that
        // died in between is caught by the check of the parent's pid.
        process::die_with_parent(manager_pid);
        signals::set_blocked(&POOL_BLOCKED).map_err(ProcessError::io("cannot set its signal mask"))?;
        // This process owns the slot's channel end from here on.
        let channel = child_end.try_clone().map_err(ProcessError::io("cannot take its channel"))?;
        match role {
            Role::Worker => worker::run(app, worker::WorkerSetup { slot: index, channel, shared, config }),
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
    })
}
