//! The master process: one mio reactor that owns the listening socket, every client
//! connection, and the master end of every slot's channel.
//!
//! The master is where nothing may be lost, because it is the one process whose death ends
//! the daemon. So it keeps the books: every delivery to a worker until the worker commits it
//! (`replay`), and every job until a task process has finished it (`jobs`). When the manager
//! reports that a process died, the master cleans that slot's channel and hands the
//! successor everything the dead process had not finished.

mod admin;
mod clients;
mod conn;
mod dashboard;
mod dedup;
mod delayed;
mod durable;
mod durable_keys;
mod jobs;
mod lifecycle;
mod listeners;
mod metrics;
mod periodic;
mod pool;
mod replay;
mod reply_trims;
pub(crate) mod results;
mod schedule;
mod slots;
mod spare;
mod stats;
mod ws;

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use slab::Slab;

use crate::app::Application;
use crate::config::{DispatchMode, ServerConfig};
use crate::ipc::channel::drain_fd;
use crate::ipc::envelope::{encode_outcome, task_flags, DecodeError, Finish};
use crate::ipc::{
    Channel, ExitReason, FromBridge, FromManager, FromTask, FromWorker, MasterToBridge, MasterToManager,
    Role, SlotChannel, ToBridge, ToClient, ToManager, ToTask, ToWorker,
};
use crate::manager;
use crate::process;
use crate::protocol;
use crate::shm::Shared;
use crate::signals::Signals;
use crate::supervisor::Supervisor;

use conn::{Conn, Flushed, KEY_BITS, KEY_MASK};
use durable::{DurableState, BRIDGE};
use jobs::{JobSpec, Jobs, MemberOutcome};
use replay::Delivery;
use results::Results;
use slots::{TaskSlot, WorkerSlot};
use stats::Counters;

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const MANAGER: Token = Token(2);
const METRICS: Token = Token(3);
const WS_LISTENER: Token = Token(4);
/// Metrics connections: tokens from here (below the slots' channels would be too few).
const METRICS_BASE: usize = 1 << 31;
const SLOT_BASE: usize = 16;
const CONN_BASE: usize = 1 << 32;
const SCRATCH: usize = 64 * 1024;
/// How long the pool may take to exit once told to, before it is killed.
const POOL_STOP_LIMIT: Duration = Duration::from_secs(5);
/// How often idle connections are looked for, when `heartbeat_idle_time` is set.
const HEARTBEAT_SCAN: Duration = Duration::from_secs(1);
/// How long to wait before accepting again after running out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long a connection closed after an error line may go on sending (read and dropped)
/// before it is closed for good.
const LINGER: Duration = Duration::from_secs(2);
/// How long the master waits for a dead manager's pool to die with it.
const ORPHAN_LIMIT: Duration = Duration::from_secs(2);

/// The signals the master handles; blocked before the first fork so none is missed.
pub const MASTER_SIGNALS: [Signal; 8] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGCHLD,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// Everything the master starts with.
pub struct MasterSetup<'a> {
    pub config: &'a ServerConfig,
    pub shared: &'static Shared,
    /// The line protocol's listener (None: WebSocket only).
    pub listener: Option<std::net::TcpListener>,
    /// The Prometheus endpoint's listener, if any.
    pub metrics: Option<std::net::TcpListener>,
    /// Whom the pool runs as.
    pub credentials: Option<process::Credentials>,
    /// The WebSocket listener (and web page), if any.
    pub ws: Option<std::net::TcpListener>,
    pub signals: Signals,
    pub workers: Vec<SlotChannel>,
    pub tasks: Vec<SlotChannel>,
    /// Durable jobs: the queue, and what a previous run of this node left in it.
    pub durable: Option<(crate::durable::Durable, crate::durable::startup::Recovered)>,
    /// The operator's token: the dashboard's, and `taskd cancel N`'s.
    pub admin_token: Option<crate::admin::AdminToken>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Not accepting; waiting for in-flight work until the deadline.
    Draining {
        deadline: Instant,
    },
    /// The pool was told to stop; waiting for the manager to exit.
    Stopping {
        deadline: Instant,
    },
}

/// A manager that died, and the pool processes of it that have not been reaped yet.
struct ManagerRecovery {
    orphans: HashSet<i32>,
    deadline: Instant,
}

pub struct Master<'a, A: Application> {
    app: &'a mut A,
    config: &'a ServerConfig,
    shared: &'static Shared,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: Option<SocketAddr>,
    metrics: Option<TcpListener>,
    metrics_conns: Slab<metrics::MetricsConn>,
    ws_listener: Option<TcpListener>,
    credentials: Option<process::Credentials>,
    signals: Signals,
    manager: MasterToManager,
    /// The manager's end of its channel, kept to hand to a new manager.
    manager_end: OwnedFd,
    /// The manager's slot: one that dies is replaced with the back-off every child gets (a
    /// manager that dies at start is not forked in a tight loop), once its pool is gone.
    manager_sup: Supervisor,
    recovery: Option<ManagerRecovery>,
    workers: Vec<WorkerSlot>,
    tasks: Vec<TaskSlot>,
    conns: Slab<Conn>,
    accepted: u64,
    round_robin: usize,
    jobs: Jobs,
    /// Jobs that may not run yet (a delivery retry's back-off, a rate limit).
    delayed: delayed::Delayed,
    /// The options of the next `Task` frame (its `run_at`, priority, key), sent just before it.
    pending_options: Option<schedule::Options>,
    /// Deduplication keys, and duplicates to tell once their worker's turn is committed, so
    /// after their `accepted`: (session, the first job's id, its final line if it ended).
    keys: dedup::Keys,
    /// Periodic jobs (`[[schedule]]`).
    periodic: periodic::Periodic,
    duplicates: Vec<(u64, u64, Option<Vec<u8>>)>,
    /// `delivery_retry_max` and the back-off, and the randomness of its jitter.
    retry: crate::retry::Policy,
    rng: crate::retry::Rng,
    /// Connections with output to write at the end of this turn.
    dirty: Vec<usize>,
    /// Output buffers written out, for the next connection's replies.
    spare_buffers: conn::SpareBuffers,
    /// Connections to close at the end of this turn if nothing more can happen on them.
    maybe_finished: Vec<usize>,
    /// Where client input is read into ([`SCRATCH`] bytes), allocated at the first read: not
    /// before the pool is forked.
    scratch: Vec<u8>,
    counters: Counters,
    phase: Phase,
    /// Rolling reload: slots still to replace, and the one being replaced now.
    reload_queue: VecDeque<(Role, u32)>,
    reloading: Option<(Role, u32)>,
    /// Accepting failed for lack of descriptors: try again then.
    accept_retry: Option<Instant>,
    /// When to look for idle connections next (`heartbeat_idle_time`).
    next_heartbeat: Option<Instant>,
    exit_code: Option<i32>,
    /// The final replies of the most recent jobs.
    results: Results,
    /// Durable jobs (`redis_url`) only.
    durable: Option<DurableState>,
    /// Why jobs still unfinished at exit are given up (for their clients and the log).
    stop_cause: String,
    /// Handshake deadlines, connection limits and descriptor shortage of the listeners.
    guard: listeners::Guard,
    /// Rate limits of the warnings a client's misbehaviour repeats (see [`clients::Warnings`]).
    warnings: clients::Warnings,
    /// `task_timeout` as a duration, once: it is read every reactor turn.
    task_limit: Option<Duration>,
    /// Connections paused by input flow control, to read again once their workers catch up.
    paused: Vec<usize>,
    /// Connections in a lingering close (key, session, deadline), oldest first.
    lingering: VecDeque<(usize, u64, Instant)>,
    /// The operator's dashboard: its samples, failures and sessions.
    dashboard: dashboard::Dashboard,
    admin_warnings: admin::AdminWarnings,
    /// The turn's clock: read once when the reactor wakes, for what a turn stamps per job or
    /// per read (a job's acceptance and run, a client's last input) and the deadlines checked
    /// at the turn's end (late by at most the turn). Reading the clock for each of them was
    /// four readings per job. The reactor's timeout reads the clock afresh.
    now: Instant,
}

impl<'a, A: Application> Master<'a, A> {
    pub fn new(app: &'a mut A, setup: MasterSetup<'a>) -> io::Result<Self> {
        let MasterSetup {
            config,
            shared,
            listener,
            metrics,
            credentials,
            ws,
            signals,
            workers,
            tasks,
            durable,
            admin_token,
        } = setup;
        match &admin_token {
            Some(t) => {
                let how = if t.generated { "generated at this start, " } else { "" };
                let page = if ws.is_some() { "the dashboard (open the web page with #token=<the token>) and " } else { "" };
                tracing::info!(
                    "dashboard: the admin token is in {} ({how}readable by its owner only); it opens {page}`taskd cancel N`",
                    t.path.display()
                );
            }
            None => tracing::info!(
                "no admin token: the dashboard is off and `taskd cancel N` refused (give --admin-token-file, or --pid-file to have one generated beside it)"
            ),
        }
        let local_addr = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let (manager_master_end, manager_end) = crate::ipc::channel::pair()?;
        let poll = Poll::new()?;
        let listener = listener.map(|l| watch_listener(&poll, l, LISTENER)).transpose()?;
        let metrics = metrics.map(|l| watch_listener(&poll, l, METRICS)).transpose()?;
        let ws_listener = ws.map(|l| watch_listener(&poll, l, WS_LISTENER)).transpose()?;
        let sig_fd = signals.raw_fd();
        poll.registry().register(&mut SourceFd(&sig_fd), SIGNALS, Interest::READABLE)?;
        let mut manager = Channel::new(manager_master_end);
        poll.registry().register(manager.source(), MANAGER, Interest::READABLE | Interest::WRITABLE)?;
        // Watched for writability only while output waits (see `Channel::register`).
        let mut worker_slots = Vec::new();
        for (i, ch) in workers.into_iter().enumerate() {
            let mut chan = Channel::new(ch.master_end);
            chan.register(poll.registry(), Token(SLOT_BASE + i))?;
            worker_slots.push(WorkerSlot::new(chan, ch.child_end));
        }
        let mut task_slots = Vec::new();
        for (i, ch) in tasks.into_iter().enumerate() {
            let mut chan = Channel::new(ch.master_end);
            chan.register(poll.registry(), Token(SLOT_BASE + worker_slots.len() + i))?;
            let mut slot = TaskSlot::new(chan, ch.child_end);
            // Slots past task_worker_num are room for SIGTTIN to grow the pool.
            if i >= config.task_worker_num {
                slot.life = slots::Life::Retired;
            }
            task_slots.push(slot);
        }
        // Pool processes orphaned by a dying manager come to us, so we know when they are gone.
        nix::sys::prctl::set_child_subreaper(true)?;
        let (durable, recovered) = match durable {
            Some((d, recovered)) => {
                // A closed placeholder until `spawn_bridge` forks the bridge with its channel.
                let placeholder = Channel::new(crate::ipc::channel::pair()?.0);
                (Some(DurableState::new(d, placeholder)), Some(recovered))
            }
            None => (None, None),
        };
        let mut master = Master {
            app,
            config,
            shared,
            poll,
            listener,
            local_addr,
            metrics,
            metrics_conns: Slab::new(),
            ws_listener,
            credentials,
            signals,
            manager,
            manager_end,
            manager_sup: {
                let mut sup = Supervisor::new("master", true);
                sup.add("manager", true);
                sup
            },
            recovery: None,
            workers: worker_slots,
            tasks: task_slots,
            conns: Slab::new(),
            accepted: 0,
            round_robin: 0,
            jobs: Jobs::default(),
            delayed: delayed::Delayed::default(),
            pending_options: None,
            keys: dedup::Keys::default(),
            periodic: periodic::Periodic::new(&config.schedules),
            duplicates: Vec::new(),
            retry: crate::retry::Policy::from_config(config),
            rng: crate::retry::Rng::new(),
            dirty: Vec::new(),
            spare_buffers: conn::SpareBuffers::default(),
            maybe_finished: Vec::new(),
            scratch: Vec::new(),
            counters: Counters::new(),
            phase: Phase::Running,
            reload_queue: VecDeque::new(),
            reloading: None,
            accept_retry: None,
            next_heartbeat: (config.heartbeat_idle_time > 0).then(|| Instant::now() + HEARTBEAT_SCAN),
            exit_code: None,
            results: Results::new(config.result_keep),
            durable,
            stop_cause: String::new(),
            guard: listeners::Guard::new(config),
            warnings: clients::Warnings::default(),
            task_limit: config.task_limit(),
            paused: Vec::new(),
            lingering: VecDeque::new(),
            dashboard: dashboard::Dashboard::new(admin_token),
            admin_warnings: admin::AdminWarnings::default(),
            now: Instant::now(),
        };
        master.jobs.durable = master.durable.is_some();
        if let Some(recovered) = recovered {
            master.periodic.catch_up(&recovered.last_ticks);
            master.recover(recovered);
        }
        Ok(master)
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The manager running now, if any.
    fn manager_pid(&self) -> Option<Pid> {
        self.manager_sup.pid(MANAGER_SLOT)
    }

    /// Stops the manager now (SIGKILL), and so its pool (parent-death signal): no successor.
    fn kill_manager(&mut self) {
        self.manager_sup.kill_all(Signal::SIGKILL);
        self.manager_sup.stop_and_wait(Duration::from_secs(2));
    }

    /// Forks the manager, which forks the pool, if it is due: at start, or once a dead one's
    /// pool is gone and its back-off is over.
    pub fn spawn_manager(&mut self) -> io::Result<()> {
        // Asked every turn: the hand-over (two lists) is made only when a fork is due.
        if self.manager_sup.next_timer().is_none_or(|at| at > Instant::now()) {
            return Ok(());
        }
        let handover = ManagerHandover {
            manager_end: &self.manager_end,
            worker_ends: self.workers.iter().map(|w| &w.child_end).collect(),
            task_ends: self.tasks.iter().map(|t| &t.child_end).collect(),
            config: self.config,
            shared: self.shared,
            credentials: self.credentials,
        };
        let app = &mut *self.app;
        let tried = self.manager_sup.start_due(|_| fork_manager(&mut *app, &handover));
        match tried.into_iter().next() {
            Some((_, Err(e))) => Err(e),
            _ => Ok(()),
        }
    }

    /// Runs the reactor until the daemon stops; returns the exit code.
    pub fn run(&mut self) -> i32 {
        let mut events = Events::with_capacity(1024);
        let mut spinner = crate::net::Spinner::new(self.config.busy_poll());
        let mut busy = false;
        loop {
            let timeout = self.timeout();
            if let Err(e) = spinner.poll(&mut self.poll, &mut events, timeout, busy) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("master: poll failed: {e}");
                    return 1;
                }
            }
            busy = !events.is_empty();
            self.now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(false),
                    WS_LISTENER => self.accept(true),
                    SIGNALS => self.handle_signals(),
                    MANAGER => self.read_manager(),
                    METRICS => self.accept_metrics(),
                    BRIDGE => self.read_bridge(),
                    Token(t) if (METRICS_BASE..CONN_BASE).contains(&t) => {
                        self.serve_metrics(t - METRICS_BASE)
                    }
                    Token(t) if t >= CONN_BASE => {
                        let key = t - CONN_BASE;
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            // The client's end (or an error) is read to its 0 (or error).
                            let drained_on_short = !event.is_read_closed() && !event.is_error();
                            self.read_conn(key, drained_on_short);
                        }
                        if event.is_writable() {
                            self.mark_dirty(key);
                        }
                    }
                    Token(t) => {
                        let i = t - SLOT_BASE;
                        let short_read_drains =
                            event.is_readable() && !event.is_read_closed() && !event.is_error();
                        if i < self.workers.len() {
                            self.read_worker_after(i, short_read_drains);
                        } else if i - self.workers.len() < self.tasks.len() {
                            self.read_task_after(i - self.workers.len(), short_read_drains);
                        }
                    }
                }
            }
            self.end_turn();
            if let Some(code) = self.exit_code {
                self.answer_what_is_left();
                self.flush_conns();
                self.stop_bridge();
                if let Some(t) = &self.dashboard.token {
                    t.remove_generated();
                }
                return code;
            }
        }
    }

    fn timeout(&self) -> Option<Duration> {
        let mut deadline = match self.phase {
            Phase::Running => None,
            Phase::Draining { deadline } | Phase::Stopping { deadline } => Some(deadline),
        };
        let task_deadlines = self.task_limit.and_then(|limit| {
            self.tasks
                .iter()
                .filter(|t| t.books.timed_out.is_none())
                .filter_map(|t| t.books.running_since)
                .min()
                .map(|since| since + limit)
        });
        let others = self
            .recovery
            .as_ref()
            .map(|r| r.deadline)
            .into_iter()
            .chain(self.jobs.next_deadline())
            .chain(self.delayed.next_deadline())
            .chain(self.periodic.next_deadline())
            .chain(task_deadlines)
            .chain(self.accept_retry)
            .chain(self.next_heartbeat)
            .chain(self.durable.as_ref().map(|d| d.next_timer()))
            .chain(self.manager_sup.next_timer())
            .chain(self.guard.next_deadline())
            .chain(self.lingering.front().map(|&(_, _, at)| at))
            .chain(Some(self.dashboard.next_tick));
        for d in others {
            deadline = Some(deadline.map_or(d, |x| x.min(d)));
        }
        deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    fn drained(&self) -> bool {
        self.durable.as_ref().is_none_or(|d| !d.holding() && d.unacked() == 0 && d.dedup.is_idle())
            && self.jobs.is_empty()
            && self.workers.iter().all(|w| w.books.log.is_empty())
            && self.conns.iter().all(|(_, c)| c.unwritten() == 0)
    }

    fn end_turn(&mut self) {
        self.finish_manager_recovery();
        if !matches!(self.phase, Phase::Stopping { .. }) {
            if let Err(e) = self.spawn_manager() {
                tracing::error!("cannot fork a new manager: {e}");
            }
        }
        if self.accept_retry.is_some_and(|at| Instant::now() >= at) {
            self.accept_retry = None;
            self.accept(false);
            self.accept(true);
            self.accept_metrics();
        }
        self.expire_handshakes();
        self.close_idle_conns();
        self.kill_hung_tasks();
        for group_id in self.jobs.expired_groups(self.now) {
            self.finish_group(group_id);
        }
        self.end_store_batch();
        if let Err(e) = self.spawn_bridge() {
            tracing::error!("cannot start a new redis bridge: {e}");
        }
        // Output held for durable jobs still has to reach these connections: they wait (the
        // list is kept in place, so that its allocation serves every turn).
        let mut finished = std::mem::take(&mut self.maybe_finished);
        let mut waiting = 0;
        for i in 0..finished.len() {
            let key = finished[i];
            let Some(conn) = self.conns.get(key).filter(|c| c.finished()) else { continue };
            if self.durable.as_ref().is_some_and(|d| d.holds(conn.session)) {
                finished[waiting] = key;
                waiting += 1;
            } else {
                self.close_conn(key);
            }
        }
        finished.truncate(waiting);
        finished.append(&mut self.maybe_finished);
        self.maybe_finished = finished;
        self.resume_paused();
        self.end_lingering();
        self.dashboard_tick();
        self.shared.set_job_bytes(self.jobs.bytes() as u64);
        self.release_delayed();
        self.run_schedules();
        self.dispatch_jobs();
        // The pool first: a worker or task process starts on its work while the master writes
        // to the clients (a TCP write to a local client also runs its receiving side, and
        // an `accepted` line written before the task's job would delay the job by as much).
        // Order per client is kept all the same: what the pool answers is read next turn.
        // Closing a connection tells its worker: that goes out at once too (the second flush).
        self.flush_channels();
        self.flush_conns();
        self.flush_channels();
        match self.phase {
            Phase::Running => {}
            Phase::Draining { deadline } => {
                let drained = self.drained();
                if drained || Instant::now() >= deadline {
                    if !drained {
                        // Every job that will not finish now is answered, through its worker.
                        self.stop_cause = format!("max_wait_time ({}s) ran out", self.config.max_wait_time);
                        self.give_up_jobs(&self.stop_cause.clone());
                    }
                    for w in &mut self.workers {
                        w.chan.send(&ToWorker::Stop);
                    }
                    for t in &mut self.tasks {
                        t.chan.send(&ToTask::Stop);
                    }
                    self.manager.send(&ToManager::Shutdown);
                    self.flush_channels();
                    self.phase = Phase::Stopping { deadline: Instant::now() + POOL_STOP_LIMIT };
                    if self.manager_pid().is_none() {
                        self.exit_code = Some(0);
                    }
                }
            }
            Phase::Stopping { deadline } => {
                if Instant::now() >= deadline {
                    tracing::warn!("the pool did not stop in time; killing it");
                    self.kill_manager();
                    self.exit_code = Some(0);
                }
            }
        }
    }

    fn flush_channels(&mut self) {
        let registry = self.poll.registry();
        for (i, w) in self.workers.iter_mut().enumerate() {
            if w.chan.has_output() || w.chan.watches_writable() {
                if let Err(e) = w.chan.flush_watched(registry) {
                    tracing::error!("worker {i}: writing its channel failed: {e}");
                }
            }
        }
        for (j, t) in self.tasks.iter_mut().enumerate() {
            if t.chan.has_output() || t.chan.watches_writable() {
                if let Err(e) = t.chan.flush_watched(registry) {
                    tracing::error!("task {j}: writing its channel failed: {e}");
                }
            }
        }
        if self.manager.has_output() {
            if let Err(e) = self.manager.flush() {
                tracing::error!("writing to the manager failed: {e}");
            }
        }
        if let Some(state) = self.durable.as_mut().filter(|s| s.bridge_running() && s.bridge.has_output()) {
            if let Err(e) = state.bridge.flush() {
                tracing::error!("writing to the redis bridge failed: {e}");
            }
        }
    }

    fn serve_metrics(&mut self, key: usize) {
        let Some(mut conn) = self.metrics_conns.try_remove(key) else { return };
        let next = conn.on_event(|| stats::render_prometheus(&self.snapshot()));
        match next {
            metrics::Next::Wait => {
                self.metrics_conns.insert(conn);
            }
            metrics::Next::Close => {
                let _ = self.poll.registry().deregister(&mut conn.stream);
            }
        }
    }

    fn snapshot(&self) -> stats::Snapshot<'_> {
        stats::Snapshot {
            counters: &self.counters,
            config: self.config,
            master_pid: std::process::id(),
            manager_pid: self.manager_pid().map(|p| p.as_raw() as u32),
            connections: self.conns.len(),
            workers: &self.workers,
            tasks: &self.tasks,
            jobs: &self.jobs,
            delayed: self.delayed.len(),
            dedup_keys: self.keys.len(),
            schedules: self.schedules_stats(),
            late_wait_results: self.shared.late_results(),
            results_kept: self.results.len(),
            log_lines_lost: self.shared.log_lines_lost(),
            durable: self.durable.as_ref().map(|d| {
                let mut v = serde_json::json!({
                    "node_id": d.d.node,
                    "redis_up": !self.shared.durable_down(),
                    "store_batches_unacked": d.unacked(),
                    "duplicate_replies_dropped": d.duplicates,
                    "bridge_restarts": d.bridge_restarts,
                    "duplicates_waiting": d.dedup.waiting(),
                });
                // `jobs` and `lanes`: what waits (or runs) in Redis, up to a second old.
                if let (Some(obj), Some(serde_json::Value::Object(depths))) = (v.as_object_mut(), &d.depths) {
                    obj.extend(depths.clone());
                }
                v
            }),
        }
    }

    fn stats_line(&self) -> Vec<u8> {
        stats::render(&self.snapshot())
    }
}

/// A listening socket in the reactor, non-blocking.
fn watch_listener(poll: &Poll, listener: std::net::TcpListener, token: Token) -> io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    poll.registry().register(&mut listener, token, Interest::READABLE)?;
    Ok(listener)
}

/// The manager's slot in [`Master::manager_sup`].
const MANAGER_SLOT: usize = 0;

/// What a new manager is handed: the ends of every channel, which outlive any manager.
struct ManagerHandover<'a> {
    manager_end: &'a OwnedFd,
    worker_ends: Vec<&'a OwnedFd>,
    task_ends: Vec<&'a OwnedFd>,
    config: &'a ServerConfig,
    shared: &'static Shared,
    credentials: Option<process::Credentials>,
}

/// Forks a manager with `h`'s channel ends.
fn fork_manager<A: Application>(app: &mut A, h: &ManagerHandover<'_>) -> io::Result<Pid> {
    let master_pid = nix::unistd::getpid();
    let mut keep: Vec<RawFd> = vec![h.manager_end.as_raw_fd()];
    keep.extend(h.worker_ends.iter().map(|fd| fd.as_raw_fd()));
    keep.extend(h.task_ends.iter().map(|fd| fd.as_raw_fd()));
    let (config, shared, credentials) = (h.config, h.shared, h.credentials);
    process::spawn("manager", &keep, move || {
        // The manager's own descriptors for the ends it was handed (kept open by `keep`).
        let owned = |fds: &[&OwnedFd]| fds.iter().map(|fd| fd.try_clone()).collect::<io::Result<Vec<_>>>();
        let take = || -> io::Result<_> {
            Ok((h.manager_end.try_clone()?, owned(&h.worker_ends)?, owned(&h.task_ends)?))
        };
        let (master_channel, workers, tasks) =
            take().map_err(process::ProcessError::io("cannot take over the channels"))?;
        manager::run(
            app,
            manager::ManagerSetup { config, shared, master_channel, workers, tasks, master_pid, credentials },
        )
    })
}
