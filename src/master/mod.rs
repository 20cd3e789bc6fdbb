//! The master process: one mio reactor that owns the listening socket, every client
//! connection, and the master end of every slot's channel.
//!
//! The master is where nothing may be lost, because it is the one process whose death ends
//! the daemon. So it keeps the books: every delivery to a worker until the worker commits it
//! (`replay`), and every job until a task process has finished it (`jobs`). When the manager
//! reports that a process died, the master cleans that slot's channel and hands the
//! successor everything the dead process had not finished.

mod conn;
mod jobs;
mod metrics;
mod replay;
mod slots;
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
use crate::ipc::envelope::{encode_outcome, frame_kind, frame_len, task_flags, COMMIT_KIND};
use crate::ipc::{Channel, ExitReason, Frame, Role, SlotChannel};
use crate::manager;
use crate::process;
use crate::protocol;
use crate::shm::Shared;
use crate::signals::Signals;

use conn::{Conn, Flushed, KEY_BITS, KEY_MASK};
use jobs::{JobSpec, Jobs, MemberOutcome};
use replay::Delivery;
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
/// How long the master waits for a dead manager's pool to die with it.
const ORPHAN_LIMIT: Duration = Duration::from_secs(2);

/// The signals the master handles; blocked before the first fork so none is missed.
pub const MASTER_SIGNALS: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGHUP];

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
    manager: Channel,
    /// The manager's end of its channel, kept to hand to a new manager.
    manager_end: OwnedFd,
    manager_pid: Option<Pid>,
    recovery: Option<ManagerRecovery>,
    workers: Vec<WorkerSlot>,
    tasks: Vec<TaskSlot>,
    conns: Slab<Conn>,
    accepted: u64,
    round_robin: usize,
    jobs: Jobs,
    /// Connections with output to write at the end of this turn.
    dirty: Vec<usize>,
    /// Connections to close at the end of this turn if nothing more can happen on them.
    maybe_finished: Vec<usize>,
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
}

impl<'a, A: Application> Master<'a, A> {
    pub fn new(app: &'a mut A, setup: MasterSetup<'a>) -> io::Result<Self> {
        let MasterSetup { config, shared, listener, metrics, credentials, ws, signals, workers, tasks } =
            setup;
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
        let both = Interest::READABLE | Interest::WRITABLE;
        let mut worker_slots = Vec::new();
        for (i, ch) in workers.into_iter().enumerate() {
            let mut chan = Channel::new(ch.master_end);
            poll.registry().register(chan.source(), Token(SLOT_BASE + i), both)?;
            worker_slots.push(WorkerSlot::new(chan, ch.child_end));
        }
        let mut task_slots = Vec::new();
        for (i, ch) in tasks.into_iter().enumerate() {
            let mut chan = Channel::new(ch.master_end);
            poll.registry().register(chan.source(), Token(SLOT_BASE + worker_slots.len() + i), both)?;
            task_slots.push(TaskSlot::new(chan, ch.child_end));
        }
        // Pool processes orphaned by a dying manager come to us, so we know when they are gone.
        nix::sys::prctl::set_child_subreaper(true)?;
        Ok(Master {
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
            manager_pid: None,
            recovery: None,
            workers: worker_slots,
            tasks: task_slots,
            conns: Slab::new(),
            accepted: 0,
            round_robin: 0,
            jobs: Jobs::default(),
            dirty: Vec::new(),
            maybe_finished: Vec::new(),
            scratch: vec![0; SCRATCH],
            counters: Counters::new(),
            phase: Phase::Running,
            reload_queue: VecDeque::new(),
            reloading: None,
            accept_retry: None,
            next_heartbeat: (config.heartbeat_idle_time > 0).then(|| Instant::now() + HEARTBEAT_SCAN),
            exit_code: None,
        })
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

    /// Forks the manager, which forks the pool.
    pub fn spawn_manager(&mut self) -> io::Result<()> {
        let master_pid = nix::unistd::getpid();
        let mut keep: Vec<RawFd> = vec![self.manager_end.as_raw_fd()];
        keep.extend(self.workers.iter().map(|w| w.child_end.as_raw_fd()));
        keep.extend(self.tasks.iter().map(|t| t.child_end.as_raw_fd()));
        let manager_end = &self.manager_end;
        let worker_ends: Vec<&OwnedFd> = self.workers.iter().map(|w| &w.child_end).collect();
        let task_ends: Vec<&OwnedFd> = self.tasks.iter().map(|t| &t.child_end).collect();
        let config = self.config;
        let shared = self.shared;
        let credentials = self.credentials;
        let app = &mut *self.app;
        let pid = process::spawn(&keep, move || {
            // The manager's own descriptors for the ends it was handed (kept open by `keep`).
            let owned =
                |fds: &[&OwnedFd]| fds.iter().map(|fd| fd.try_clone()).collect::<io::Result<Vec<_>>>();
            let (master_channel, workers, tasks) =
                match (manager_end.try_clone(), owned(&worker_ends), owned(&task_ends)) {
                    (Ok(m), Ok(w), Ok(t)) => (m, w, t),
                    _ => {
                        tracing::error!("manager: cannot take over the channels");
                        return 1;
                    }
                };
            manager::run(
                app,
                manager::ManagerSetup {
                    config,
                    shared,
                    master_channel,
                    workers,
                    tasks,
                    master_pid,
                    credentials,
                },
            )
        })?;
        self.manager_pid = Some(pid);
        Ok(())
    }

    /// Runs the reactor until the daemon stops; returns the exit code.
    pub fn run(&mut self) -> i32 {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("master: poll failed: {e}");
                    return 1;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(false),
                    WS_LISTENER => self.accept(true),
                    SIGNALS => self.handle_signals(),
                    MANAGER => self.read_manager(),
                    METRICS => self.accept_metrics(),
                    Token(t) if (METRICS_BASE..CONN_BASE).contains(&t) => {
                        self.serve_metrics(t - METRICS_BASE)
                    }
                    Token(t) if t >= CONN_BASE => {
                        let key = t - CONN_BASE;
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_conn(key);
                        }
                        if event.is_writable() {
                            self.mark_dirty(key);
                        }
                    }
                    Token(t) => {
                        let i = t - SLOT_BASE;
                        if i < self.workers.len() {
                            self.read_worker(i);
                        } else if i - self.workers.len() < self.tasks.len() {
                            self.read_task(i - self.workers.len());
                        }
                    }
                }
            }
            self.end_turn();
            if let Some(code) = self.exit_code {
                self.flush_conns();
                return code;
            }
        }
    }

    fn timeout(&self) -> Option<Duration> {
        let mut deadline = match self.phase {
            Phase::Running => None,
            Phase::Draining { deadline } | Phase::Stopping { deadline } => Some(deadline),
        };
        let task_deadlines = self.config.task_limit().and_then(|limit| {
            self.tasks
                .iter()
                .filter(|t| t.timed_out.is_none())
                .filter_map(|t| t.running_since)
                .min()
                .map(|since| since + limit)
        });
        let others = self
            .recovery
            .as_ref()
            .map(|r| r.deadline)
            .into_iter()
            .chain(self.jobs.next_deadline())
            .chain(task_deadlines)
            .chain(self.accept_retry)
            .chain(self.next_heartbeat);
        for d in others {
            deadline = Some(deadline.map_or(d, |x| x.min(d)));
        }
        deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    // ---- clients ----

    /// Accepts on the line port, or with `ws` on the WebSocket port.
    fn accept(&mut self, ws: bool) {
        loop {
            let listener = if ws { &self.ws_listener } else { &self.listener };
            let Some(listener) = listener else { return };
            let (mut stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the listener stays readable but edge-triggered
                    // readiness will not fire again for the connections already waiting.
                    tracing::warn!("accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                    self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            };
            if self.conns.len() >= self.config.max_conn {
                tracing::warn!("refusing {peer}: max_conn ({}) connections already", self.config.max_conn);
                let msg =
                    format!("too many connections (max_conn {}); try again later", self.config.max_conn);
                // Best effort: the socket is new, its buffer empty; the line fits at once.
                let _ = io::Write::write(&mut stream, &protocol::error_line(&msg));
                continue;
            }
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if key as u64 > KEY_MASK {
                tracing::warn!("too many connections; refusing {peer}");
                continue;
            }
            self.accepted += 1;
            let session = (self.accepted << KEY_BITS) | key as u64;
            let fd = stream.as_raw_fd();
            let worker = (fd as usize % self.workers.len()) as u32;
            let _ = stream.set_nodelay(true);
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(CONN_BASE + key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("cannot watch connection from {peer}: {e}");
                continue;
            }
            let conn = entry.insert(Conn::new(stream, session, peer, worker));
            self.counters.accept_count += 1;
            tracing::debug!("client {peer} connected: session {session}, fd {fd}");
            if ws {
                // A session once upgraded; until then an HTTP request.
                conn.ws = Some(Box::new(ws::WsState::Handshake(Vec::new())));
            } else {
                self.announce(key);
            }
        }
    }

    /// Tells the connection's worker about it (dispatch mode 2, where it is ordered).
    fn announce(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.announced = true;
        if self.config.dispatch_mode == DispatchMode::Fixed {
            let (session, worker, peer) = (conn.session, conn.worker, conn.peer.to_string());
            self.deliver(worker as usize, session, Delivery::Connect, |seq, out| {
                Frame::Connect { seq, session, peer: peer.as_bytes() }.encode(out)
            });
        }
    }

    fn read_ws(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if let Some(ws::WsState::Handshake(buf)) = conn.ws.as_deref_mut() {
            match ws::read_opening(&mut conn.stream, buf) {
                Ok(ws::Opening::Partial) => return,
                Ok(ws::Opening::Http(response)) => {
                    conn.ws = None;
                    conn.queue(&response);
                    conn.close_after_flush = true;
                    self.mark_dirty(key);
                    return;
                }
                Ok(ws::Opening::Upgrade { response, rest }) => {
                    // Written at once (a new socket takes it whole), so that nothing tungstenite
                    // writes, a pong say, can come before it.
                    if io::Write::write(&mut conn.stream, &response).ok() != Some(response.len()) {
                        self.close_conn(key);
                        return;
                    }
                    let socket =
                        ws::open(rest, self.config.package_max_length, self.config.buffer_output_size);
                    conn.ws = Some(Box::new(ws::WsState::Open(Box::new(socket))));
                    self.announce(key);
                }
                Err(e) => {
                    tracing::debug!("client {}: no WebSocket upgrade ({e})", conn.peer);
                    self.close_conn(key);
                    return;
                }
            }
        }
        loop {
            let Some(conn) = self.conns.get_mut(key) else { return };
            let Some(ws::WsState::Open(socket)) = conn.ws.as_deref_mut() else { return };
            if conn.read_closed || conn.close_after_flush {
                return;
            }
            match ws::read(socket, &mut conn.stream) {
                ws::Incoming::Lines(lines) => {
                    conn.last_active = Instant::now();
                    for line in lines {
                        self.dispatch_request(key, &line);
                    }
                }
                ws::Incoming::Binary => {
                    let session = conn.session;
                    let line =
                        protocol::error_line("binary messages are not supported: send requests as text");
                    self.send_to_session(session, &line);
                }
                ws::Incoming::Idle => return,
                ws::Incoming::Closed => {
                    conn.read_closed = true;
                    self.maybe_finished.push(key);
                    self.mark_dirty(key);
                    return;
                }
                ws::Incoming::Broken(why) => {
                    tracing::debug!("WebSocket client {}: {why}; closing", conn.peer);
                    conn.close_after_flush = true;
                    self.mark_dirty(key);
                    return;
                }
            }
        }
    }

    fn read_conn(&mut self, key: usize) {
        if !matches!(self.phase, Phase::Running) {
            // Shutting down: what is already dispatched is answered, nothing new is read.
            return;
        }
        if self.conns.get(key).is_some_and(|c| c.ws.is_some()) {
            return self.read_ws(key);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(conn) = self.conns.get_mut(key) {
            if conn.read_closed || conn.close_after_flush {
                break;
            }
            match conn.read(&mut scratch) {
                Ok(0) => {
                    conn.read_closed = true;
                    self.maybe_finished.push(key);
                    break;
                }
                Ok(n) => {
                    conn.last_active = Instant::now();
                    self.take_lines(key, &scratch[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("client {} read error: {e}", conn.peer);
                    self.close_conn(key);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Splits newly read bytes into request lines and dispatches each.
    fn take_lines(&mut self, key: usize, fresh: &[u8]) {
        let max = self.config.package_max_length;
        let mut partial = std::mem::take(&mut self.conns[key].partial);
        let data: &[u8] = if partial.is_empty() {
            fresh
        } else {
            partial.extend_from_slice(fresh);
            &partial
        };
        let mut pos = 0;
        let rest = loop {
            match protocol::next_line(&data[pos..], max) {
                Ok(Some((line, used))) => {
                    self.dispatch_request(key, line);
                    pos += used;
                }
                Ok(None) => break Some(&data[pos..]),
                Err(too_long) => {
                    let conn = &mut self.conns[key];
                    tracing::warn!(
                        "client {}: request line longer than package_max_length ({} bytes); closing",
                        conn.peer,
                        too_long.limit
                    );
                    let msg = format!(
                        "request line longer than package_max_length ({} bytes); closing the connection",
                        too_long.limit
                    );
                    conn.queue(&protocol::error_line(&msg));
                    conn.close_after_flush = true;
                    self.mark_dirty(key);
                    break None;
                }
            }
        };
        let rest = rest.map(<[u8]>::to_vec).unwrap_or_default();
        if let Some(conn) = self.conns.get_mut(key) {
            conn.partial = rest;
        }
    }

    fn dispatch_request(&mut self, key: usize, line: &[u8]) {
        let conn = &mut self.conns[key];
        conn.outstanding += 1;
        let session = conn.session;
        let worker = match self.config.dispatch_mode {
            DispatchMode::Fixed => conn.worker as usize,
            DispatchMode::RoundRobin => {
                self.round_robin = (self.round_robin + 1) % self.workers.len();
                self.round_robin
            }
            DispatchMode::Preemptive => {
                self.round_robin = (self.round_robin + 1) % self.workers.len();
                let n = self.workers.len();
                (0..n)
                    .map(|k| (self.round_robin + k) % n)
                    .min_by_key(|&w| (!self.workers[w].alive as usize, self.workers[w].log.len()))
                    .unwrap_or(0)
            }
        };
        self.counters.dispatch_count += 1;
        self.deliver(worker, session, Delivery::Request, |seq, out| {
            Frame::Request { seq, session, data: line }.encode(out)
        });
    }

    /// Writes a delivery to a worker slot and keeps it until the slot commits it.
    fn deliver(
        &mut self,
        worker: usize,
        session: u64,
        kind: Delivery,
        encode: impl FnOnce(u64, &mut Vec<u8>),
    ) {
        let slot = &mut self.workers[worker];
        let seq = slot.log.next_seq();
        let bytes = slot.log.push(seq, session, kind, |out| encode(seq, out));
        slot.chan.output().extend_from_slice(bytes);
    }

    fn conn_mut(&mut self, session: u64) -> Option<(usize, &mut Conn)> {
        let key = (session & KEY_MASK) as usize;
        match self.conns.get_mut(key) {
            Some(conn) if conn.session == session => Some((key, conn)),
            _ => None,
        }
    }

    fn send_to_session(&mut self, session: u64, data: &[u8]) {
        let limit = self.config.buffer_output_size;
        let Some((key, conn)) = self.conn_mut(session) else {
            tracing::debug!("dropping {} bytes for closed session {session}", data.len());
            return;
        };
        if let Some(state) = conn.ws.as_deref_mut() {
            let ws::WsState::Open(socket) = state else { return };
            if let Err(why) = ws::send(socket, &mut conn.stream, data) {
                tracing::warn!(
                    "WebSocket client {} does not read its replies ({why}); disconnecting",
                    conn.peer
                );
                self.close_conn(key);
                return;
            }
            self.mark_dirty(key);
            return;
        }
        conn.queue(data);
        if conn.unwritten() > limit {
            tracing::warn!(
                "client {} does not read its replies: {} bytes pending, over buffer_output_size ({limit}); disconnecting",
                conn.peer,
                conn.unwritten()
            );
            self.close_conn(key);
            return;
        }
        self.mark_dirty(key);
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn close_conn(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.counters.close_count += 1;
        tracing::debug!("client {} closed (session {})", conn.peer, conn.session);
        if conn.announced && self.config.dispatch_mode == DispatchMode::Fixed {
            let session = conn.session;
            self.deliver(conn.worker as usize, session, Delivery::Close, |seq, out| {
                Frame::Close { seq, session }.encode(out)
            });
        }
    }

    fn flush_conns(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            conn.dirty = false;
            match conn.flush() {
                Ok(Flushed::All) => {
                    if conn.finished() {
                        self.close_conn(key);
                    }
                }
                Ok(Flushed::Partly) => {}
                Err(e) => {
                    tracing::debug!("client {}: write failed ({e}); closing", conn.peer);
                    self.close_conn(key);
                }
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    // ---- workers ----

    fn read_worker(&mut self, i: usize) {
        if let Err(e) = self.workers[i].chan.fill() {
            tracing::error!("worker {i}: reading its channel failed: {e}");
        }
        self.handle_worker_input(i);
    }

    /// Acts on the committed part of a worker's output; the rest waits for its commit.
    fn handle_worker_input(&mut self, i: usize) {
        let mut input = self.workers[i].chan.take_input();
        let data = input.data();
        // Find where the last complete commit ends.
        let mut pos = 0;
        let mut committed = 0;
        let corrupt = loop {
            match frame_len(&data[pos..]) {
                Ok(Some(n)) => {
                    if frame_kind(&data[pos..pos + n]) == COMMIT_KIND {
                        committed = pos + n;
                    }
                    pos += n;
                }
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        let mut pos = 0;
        while pos < committed {
            match Frame::decode(&data[pos..committed]) {
                Ok(Some((frame, n))) => {
                    self.on_worker_frame(i, frame);
                    pos += n;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("worker {i}: corrupt message: {e}");
                    break;
                }
            }
        }
        input.consume(committed);
        self.workers[i].chan.restore_input(input);
        if let Some(e) = corrupt {
            tracing::error!(
                "worker {i} (pid {}) sent a corrupt message ({e}); replacing it",
                self.workers[i].pid
            );
            self.workers[i].chan.discard_input();
            if self.workers[i].pid != 0 {
                let _ = kill(Pid::from_raw(self.workers[i].pid as i32), Signal::SIGKILL);
            }
        }
    }

    fn on_worker_frame(&mut self, i: usize, frame: Frame<'_>) {
        match frame {
            Frame::Send { session, data } => self.send_to_session(session, data),
            Frame::CloseSession { session } => {
                if let Some((key, conn)) = self.conn_mut(session) {
                    conn.close_after_flush = true;
                    self.mark_dirty(key);
                }
            }
            Frame::Task { task_id, session, target, group, flags, context, data } => {
                let target = u32::try_from(target).ok().filter(|&t| (t as usize) < self.tasks.len());
                self.jobs.accept(task_id, i as u32, session, JobSpec { group, target, flags }, context, data);
                self.counters.tasks_accepted += 1;
                // A waited-for task is answered by its waiter's request, not on its own.
                if group == 0 && flags & task_flags::WAIT == 0 {
                    if let Some((_, conn)) = self.conn_mut(session) {
                        conn.outstanding += 1;
                    }
                }
                self.shared.set_jobs_pending(self.jobs.len() as u64);
            }
            Frame::Group { group_id, session, size, timeout_ms, context } => {
                self.jobs.open_group(group_id, i as u32, session, size, timeout_ms, context);
                if let Some((_, conn)) = self.conn_mut(session) {
                    conn.outstanding += 1;
                }
            }
            Frame::Commit { seq } => self.commit(i, seq),
            Frame::Stats { session } => {
                let line = self.stats_line();
                self.send_to_session(session, &line);
            }
            other => tracing::warn!("worker {i}: ignoring unexpected message {other:?}"),
        }
    }

    fn commit(&mut self, i: usize, seq: u64) {
        let Master { workers, conns, counters, maybe_finished, .. } = self;
        let slot = &mut workers[i];
        let served = &mut slot.served;
        slot.log.commit(seq, |entry| {
            match entry.kind {
                Delivery::Request => {
                    *served += 1;
                    counters.request_count += 1;
                }
                Delivery::Finish => {}
                Delivery::Connect | Delivery::Close => return,
            }
            let key = (entry.session & KEY_MASK) as usize;
            if let Some(conn) = conns.get_mut(key) {
                if conn.session == entry.session {
                    conn.outstanding = conn.outstanding.saturating_sub(1);
                    if conn.read_closed {
                        maybe_finished.push(key);
                    }
                }
            }
        });
    }

    // ---- task processes ----

    fn read_task(&mut self, j: usize) {
        if let Err(e) = self.tasks[j].chan.fill() {
            tracing::error!("task {j}: reading its channel failed: {e}");
        }
        self.handle_task_input(j);
    }

    fn handle_task_input(&mut self, j: usize) {
        let mut input = self.tasks[j].chan.take_input();
        let mut corrupt = None;
        loop {
            match Frame::decode(input.data()) {
                Ok(Some((frame, n))) => {
                    self.on_task_frame(j, frame);
                    input.consume(n);
                }
                Ok(None) => break,
                Err(e) => {
                    corrupt = Some(e);
                    break;
                }
            }
        }
        self.tasks[j].chan.restore_input(input);
        if let Some(e) = corrupt {
            tracing::error!(
                "task {j} (pid {}) sent a corrupt message ({e}); replacing it",
                self.tasks[j].pid
            );
            self.tasks[j].chan.discard_input();
            if self.tasks[j].pid != 0 {
                let _ = kill(Pid::from_raw(self.tasks[j].pid as i32), Signal::SIGKILL);
            }
        }
    }

    fn on_task_frame(&mut self, j: usize, frame: Frame<'_>) {
        match frame {
            Frame::Send { session, data } => self.send_to_session(session, data),
            Frame::TaskDone { task_id, ok, reply, result } => {
                let slot = &mut self.tasks[j];
                if let Some(pos) = slot.inflight.iter().position(|&id| id == task_id) {
                    slot.inflight.remove(pos);
                    if pos == 0 {
                        slot.head_finished();
                    }
                }
                slot.served += 1;
                let pid = slot.pid;
                // The reply goes out with the outcome, in the same turn: one hop, no worker.
                if !reply.is_empty() {
                    if let Some(job) = self.jobs.get_mut(task_id) {
                        if job.group == 0 && job.flags & task_flags::WAIT == 0 && job.session != 0 {
                            job.flags |= task_flags::REPLIED;
                            let session = job.session;
                            self.send_to_session(session, reply);
                        }
                    }
                }
                self.finish_job(task_id, pid, ok, result);
            }
            other => tracing::warn!("task {j}: ignoring unexpected message {other:?}"),
        }
    }

    /// A job has its final outcome: count it and deliver it to its worker slot's `on_finish`.
    fn finish_job(&mut self, task_id: u64, task_pid: u32, ok: bool, result: &[u8]) {
        let Some(job) = self.jobs.remove(task_id) else {
            tracing::warn!("result for unknown task {task_id} dropped");
            return;
        };
        if ok {
            self.counters.tasks_done += 1;
        } else {
            self.counters.tasks_failed += 1;
        }
        self.shared.set_jobs_pending(self.jobs.len() as u64);
        if job.group != 0 {
            let Some(group) = self.jobs.groups.get_mut(&job.group) else {
                self.counters.late_results_dropped += 1;
                tracing::debug!(
                    "task {task_id} finished after its group {} was answered; dropped",
                    job.group
                );
                return;
            };
            group.outcomes[job.index as usize] =
                Some(MemberOutcome { ok, result: result.to_vec(), attempts: job.attempts });
            if group.complete() {
                self.finish_group(job.group);
            }
            return;
        }
        let session = job.session;
        let finish = |seq, out: &mut Vec<u8>| {
            let (attempts, flags, context) = (job.attempts, job.flags, &job.context[..]);
            Frame::Finish { seq, task_id, session, task_pid, attempts, ok, flags, context, result }
                .encode(out)
        };
        if job.flags & task_flags::WAIT != 0 {
            // For a waiting worker: no delivery to replay (seq 0); its request is, if it dies.
            finish(0, self.workers[job.worker as usize].chan.output());
            return;
        }
        self.deliver(job.worker as usize, session, Delivery::Finish, finish);
    }

    /// Delivers a group's outcomes as one finish; members still missing count as timed out.
    fn finish_group(&mut self, group_id: u64) {
        let Some(group) = self.jobs.groups.remove(&group_id) else { return };
        let mut result = Vec::new();
        let mut attempts = 0;
        let missing = format!("timed out after {} ms", group.timeout.as_millis());
        for k in 0..group.size as usize {
            match group.outcomes.get(k).and_then(Option::as_ref) {
                Some(member) => {
                    attempts = attempts.max(member.attempts);
                    encode_outcome(member.ok, &member.result, &mut result);
                }
                None => encode_outcome(false, missing.as_bytes(), &mut result),
            }
        }
        let session = group.session;
        self.deliver(group.worker as usize, session, Delivery::Finish, |seq, out| {
            Frame::Finish {
                seq,
                task_id: group_id,
                session,
                task_pid: 0,
                attempts,
                ok: true,
                flags: task_flags::GROUP,
                context: &group.context,
                result: &result,
            }
            .encode(out)
        });
    }

    /// Hands queued jobs to task processes with room for them, least loaded first.
    fn dispatch_jobs(&mut self) {
        let prefetch = self.config.task_prefetch;
        // Jobs for one given task process first: only that process can take them.
        for j in 0..self.tasks.len() {
            while self.tasks[j].accepts_work() && self.tasks[j].inflight.len() < self.tasks[j].room(prefetch)
            {
                let Some(task_id) = self.jobs.pop_targeted(j as u32) else { break };
                self.run_on(j, task_id);
            }
        }
        while let Some(task_id) = self.jobs.front() {
            let best = self
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| t.accepts_work() && t.inflight.len() < t.room(prefetch))
                .min_by_key(|(_, t)| t.inflight.len())
                .map(|(j, _)| j);
            let Some(j) = best else { return };
            self.jobs.pop_front();
            self.run_on(j, task_id);
        }
    }

    /// Sends a job to task slot `j`.
    fn run_on(&mut self, j: usize, task_id: u64) {
        let Some(job) = self.jobs.get_mut(task_id) else { return };
        job.attempts += 1;
        let slot = &mut self.tasks[j];
        Frame::RunTask {
            task_id,
            session: job.session,
            attempt: job.attempts,
            src_worker: job.worker,
            data: &job.data,
        }
        .encode(slot.chan.output());
        slot.inflight.push_back(task_id);
        if slot.inflight.len() == 1 {
            slot.head_changed();
        }
    }

    // ---- the manager and process lifecycle ----

    fn read_manager(&mut self) {
        let state = self.manager.fill();
        let mut input = self.manager.take_input();
        loop {
            match Frame::decode(input.data()) {
                Ok(Some((frame, n))) => {
                    self.on_manager_frame(frame);
                    input.consume(n);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("corrupt message from the manager: {e}");
                    input.consume(input.data().len());
                    break;
                }
            }
        }
        self.manager.restore_input(input);
        if let Err(e) = state {
            tracing::error!("reading the manager's channel failed: {e}");
        }
    }

    fn on_manager_frame(&mut self, frame: Frame<'_>) {
        match frame {
            Frame::Started { role, slot, pid } => self.on_started(role, slot as usize, pid),
            Frame::Exited { role, slot, pid, reason, uptime_ms: _ } => {
                self.clean_slot(role, slot as usize, pid, reason);
                self.manager.send(&Frame::SlotReady { role, slot });
            }
            Frame::ForkFailed { role, slot, error } => {
                self.counters.fork_failures += 1;
                tracing::error!(
                    "the manager could not fork {role} {slot}: {}",
                    String::from_utf8_lossy(error)
                );
            }
            other => tracing::warn!("ignoring unexpected message from the manager: {other:?}"),
        }
    }

    fn on_started(&mut self, role: Role, slot: usize, pid: u32) {
        match role {
            Role::Worker => {
                let Some(w) = self.workers.get_mut(slot) else { return };
                w.started(pid);
                if !w.log.is_empty() {
                    tracing::debug!(
                        "worker {slot} (pid {pid}) takes over {} pending deliveries",
                        w.log.len()
                    );
                }
            }
            Role::Task => {
                let Some(t) = self.tasks.get_mut(slot) else { return };
                t.started(pid);
            }
        }
        if self.reloading == Some((role, slot as u32)) {
            self.reloading = None;
            self.reload_next();
        }
    }

    /// A process of this slot is gone: take what it committed, throw away what it left half
    /// written or half read, and line up everything it had not finished for its successor.
    fn clean_slot(&mut self, role: Role, slot: usize, pid: u32, reason: ExitReason) {
        match role {
            Role::Worker => {
                if slot >= self.workers.len() {
                    return;
                }
                // It is dead, so everything it wrote is in the socket already.
                self.read_worker(slot);
                let w = &mut self.workers[slot];
                w.chan.discard_input();
                if let Err(e) = drain_fd(&w.child_end) {
                    tracing::error!("worker {slot}: cannot empty its channel: {e}");
                }
                w.chan.discard_output();
                let WorkerSlot { chan, log, .. } = w;
                chan.output().extend_from_slice(log.uncommitted());
                w.exited();
                if !reason.is_clean() {
                    self.counters.worker_crashes += 1;
                }
                tracing::debug!(
                    "worker {slot} (pid {pid}) {reason}; {} deliveries wait for its successor",
                    w.log.len()
                );
            }
            Role::Task => {
                if slot >= self.tasks.len() {
                    return;
                }
                self.read_task(slot);
                let t = &mut self.tasks[slot];
                t.chan.discard_input();
                if let Err(e) = drain_fd(&t.child_end) {
                    tracing::error!("task {slot}: cannot empty its channel: {e}");
                }
                t.chan.discard_output();
                let inflight: Vec<u64> = t.inflight.drain(..).collect();
                let timed_out = t.timed_out;
                t.exited();
                if !reason.is_clean() {
                    self.counters.task_crashes += 1;
                }
                // Jobs behind the first were never started; the first was running unless the
                // process ended on purpose.
                for (k, &task_id) in inflight.iter().enumerate().rev() {
                    let started = k == 0 && !reason.is_clean();
                    let Some(job) = self.jobs.get_mut(task_id) else { continue };
                    if !started {
                        job.attempts = job.attempts.saturating_sub(1);
                        self.jobs.push_front(task_id);
                        continue;
                    }
                    let attempts = job.attempts;
                    if attempts > self.config.task_retry_max {
                        let why = if timed_out == Some(task_id) {
                            format!(
                                "task process {pid} was killed: the task ran longer than task_timeout ({}s)",
                                self.config.task_timeout
                            )
                        } else {
                            format!("task process {pid} {reason}")
                        };
                        tracing::warn!("task {task_id} failed after {attempts} attempt(s): {why}");
                        self.finish_job(task_id, pid, false, why.as_bytes());
                    } else {
                        self.counters.tasks_retried += 1;
                        tracing::warn!(
                            "task {task_id} was running in task process {pid} ({reason}); running it again (attempt {} of {})",
                            attempts + 1,
                            self.config.task_retry_max + 1
                        );
                        self.jobs.push_front(task_id);
                    }
                }
            }
        }
    }

    // ---- signals, reload, shutdown ----

    fn handle_signals(&mut self) {
        for sig in self.signals.pending() {
            match sig {
                Signal::SIGTERM | Signal::SIGINT => self.on_stop_signal(sig),
                Signal::SIGCHLD => self.reap(),
                Signal::SIGUSR1 => self.start_reload(Role::Worker),
                Signal::SIGUSR2 => self.start_reload(Role::Task),
                Signal::SIGHUP => match crate::logging::reopen() {
                    Ok(true) => tracing::info!("SIGHUP: log file reopened"),
                    Ok(false) => tracing::info!("SIGHUP: no log file to reopen (logs go to stderr)"),
                    Err(e) => tracing::error!("SIGHUP: cannot reopen the log file: {e}"),
                },
                _ => {}
            }
        }
    }

    fn on_stop_signal(&mut self, sig: Signal) {
        match self.phase {
            Phase::Running => {
                let deadline = Instant::now() + self.config.max_wait();
                tracing::info!(
                    "{sig}: shutting down; no new connections; waiting up to {}s for {} jobs and {} requests in flight",
                    self.config.max_wait_time,
                    self.jobs.len(),
                    self.workers.iter().map(|w| w.log.len()).sum::<usize>()
                );
                for mut listener in [self.listener.take(), self.ws_listener.take()].into_iter().flatten() {
                    let _ = self.poll.registry().deregister(&mut listener);
                }
                self.phase = Phase::Draining { deadline };
            }
            _ => {
                tracing::warn!("{sig} again: stopping now");
                if let Some(pid) = self.manager_pid {
                    let _ = kill(pid, Signal::SIGKILL);
                    process::wait_for(pid, Duration::from_secs(2));
                }
                self.exit_code = Some(1);
            }
        }
    }

    fn reap(&mut self) {
        for reaped in process::reap() {
            if Some(reaped.pid) == self.manager_pid {
                self.manager_pid = None;
                self.on_manager_exit(reaped.reason);
            } else if let Some(r) = &mut self.recovery {
                r.orphans.remove(&reaped.pid.as_raw());
            }
        }
    }

    fn on_manager_exit(&mut self, reason: ExitReason) {
        if let Phase::Stopping { .. } = self.phase {
            tracing::info!("taskd stopped");
            self.exit_code = Some(0);
            return;
        }
        tracing::error!("the manager {reason}; its pool dies with it; starting a new manager");
        // The pool processes die with their manager (PR_SET_PDEATHSIG) and come to us to be
        // reaped; their channels are cleaned only once they are gone.
        let orphans: HashSet<i32> = self
            .workers
            .iter()
            .map(|w| w.pid)
            .chain(self.tasks.iter().map(|t| t.pid))
            .filter(|&p| p != 0)
            .map(|p| p as i32)
            .collect();
        self.recovery = Some(ManagerRecovery { orphans, deadline: Instant::now() + ORPHAN_LIMIT });
        self.reap();
    }

    /// Once the old pool is gone: clean every slot and start a new manager.
    fn finish_manager_recovery(&mut self) {
        let Some(r) = &self.recovery else { return };
        if !r.orphans.is_empty() && Instant::now() < r.deadline {
            return;
        }
        for &pid in &r.orphans {
            tracing::warn!("pool process {pid} outlived its manager; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.recovery = None;
        let died = ExitReason::Signal(Signal::SIGKILL as i32);
        for i in 0..self.workers.len() {
            let pid = self.workers[i].pid;
            self.clean_slot(Role::Worker, i, pid, died);
        }
        for j in 0..self.tasks.len() {
            let pid = self.tasks[j].pid;
            self.clean_slot(Role::Task, j, pid, died);
        }
        // A new channel: the old one may hold half a message of the dead manager.
        match crate::ipc::channel::pair() {
            Ok((master_end, manager_end)) => {
                let _ = self.poll.registry().deregister(self.manager.source());
                self.manager = Channel::new(master_end);
                self.manager_end = manager_end;
                let both = Interest::READABLE | Interest::WRITABLE;
                if let Err(e) = self.poll.registry().register(self.manager.source(), MANAGER, both) {
                    tracing::error!("cannot watch the new manager's channel: {e}");
                }
            }
            Err(e) => tracing::error!("cannot create a channel for a new manager: {e}"),
        }
        if let Err(e) = self.spawn_manager() {
            tracing::error!("cannot fork a new manager: {e}; stopping");
            self.exit_code = Some(1);
        }
    }

    fn start_reload(&mut self, role: Role) {
        let n = match role {
            Role::Worker => self.workers.len(),
            Role::Task => self.tasks.len(),
        };
        tracing::info!("reloading every {role} process, one at a time");
        for slot in 0..n as u32 {
            if !self.reload_queue.contains(&(role, slot)) {
                self.reload_queue.push_back((role, slot));
            }
        }
        if self.reloading.is_none() {
            self.reload_next();
        }
    }

    fn reload_next(&mut self) {
        while let Some((role, slot)) = self.reload_queue.pop_front() {
            let i = slot as usize;
            let stopped = match role {
                Role::Worker => self.workers[i].ask_to_stop(),
                Role::Task => self.tasks[i].ask_to_stop(),
            };
            if stopped {
                self.reloading = Some((role, slot));
                return;
            }
        }
        if self.reloading.is_none() {
            tracing::info!("reload complete");
        }
    }

    fn drained(&self) -> bool {
        self.jobs.is_empty()
            && self.workers.iter().all(|w| w.log.is_empty())
            && self.conns.iter().all(|(_, c)| c.unwritten() == 0)
    }

    /// Kills a task process whose job has run past `task_timeout`; its death re-runs the job.
    fn kill_hung_tasks(&mut self) {
        let Some(limit) = self.config.task_limit() else { return };
        for (j, t) in self.tasks.iter_mut().enumerate() {
            let hung =
                t.alive && t.timed_out.is_none() && t.running_since.is_some_and(|s| s.elapsed() >= limit);
            if let (true, Some(&task_id)) = (hung, t.inflight.front()) {
                tracing::warn!(
                    "task {task_id} has run longer than task_timeout ({}s) in task {j} (pid {}); killing it",
                    self.config.task_timeout,
                    t.pid
                );
                t.timed_out = Some(task_id);
                let _ = kill(Pid::from_raw(t.pid as i32), Signal::SIGKILL);
            }
        }
    }

    /// Closes connections silent for `heartbeat_idle_time` that wait for nothing.
    fn close_idle_conns(&mut self) {
        let Some(at) = self.next_heartbeat else { return };
        let now = Instant::now();
        if now < at {
            return;
        }
        self.next_heartbeat = Some(now + HEARTBEAT_SCAN);
        let limit = Duration::from_secs(self.config.heartbeat_idle_time);
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.outstanding == 0 && c.unwritten() == 0 && now - c.last_active >= limit)
            .map(|(key, _)| key)
            .collect();
        for key in idle {
            tracing::debug!(
                "closing client {}: silent for heartbeat_idle_time ({}s)",
                self.conns[key].peer,
                self.config.heartbeat_idle_time
            );
            self.close_conn(key);
        }
    }

    fn end_turn(&mut self) {
        self.finish_manager_recovery();
        if self.accept_retry.is_some_and(|at| Instant::now() >= at) {
            self.accept_retry = None;
            self.accept(false);
            self.accept(true);
        }
        self.close_idle_conns();
        self.kill_hung_tasks();
        for group_id in self.jobs.expired_groups(Instant::now()) {
            self.finish_group(group_id);
        }
        let finished = std::mem::take(&mut self.maybe_finished);
        for &key in &finished {
            if self.conns.get(key).is_some_and(Conn::finished) {
                self.close_conn(key);
            }
        }
        self.maybe_finished = finished;
        self.maybe_finished.clear();
        self.dispatch_jobs();
        self.flush_conns();
        self.flush_channels();
        match self.phase {
            Phase::Running => {}
            Phase::Draining { deadline } => {
                let drained = self.drained();
                if drained || Instant::now() >= deadline {
                    if !drained {
                        tracing::warn!(
                            "max_wait_time ({}s) passed with {} jobs unfinished; stopping anyway",
                            self.config.max_wait_time,
                            self.jobs.len()
                        );
                    }
                    for w in &mut self.workers {
                        w.chan.send(&Frame::Stop);
                    }
                    for t in &mut self.tasks {
                        t.chan.send(&Frame::Stop);
                    }
                    self.manager.send(&Frame::Shutdown);
                    self.flush_channels();
                    self.phase = Phase::Stopping { deadline: Instant::now() + POOL_STOP_LIMIT };
                    if self.manager_pid.is_none() {
                        self.exit_code = Some(0);
                    }
                }
            }
            Phase::Stopping { deadline } => {
                if Instant::now() >= deadline {
                    tracing::warn!("the pool did not stop in time; killing it");
                    if let Some(pid) = self.manager_pid {
                        let _ = kill(pid, Signal::SIGKILL);
                        process::wait_for(pid, Duration::from_secs(2));
                    }
                    self.exit_code = Some(0);
                }
            }
        }
    }

    fn flush_channels(&mut self) {
        for (i, w) in self.workers.iter_mut().enumerate() {
            if w.chan.has_output() {
                if let Err(e) = w.chan.flush() {
                    tracing::error!("worker {i}: writing its channel failed: {e}");
                }
            }
        }
        for (j, t) in self.tasks.iter_mut().enumerate() {
            if t.chan.has_output() {
                if let Err(e) = t.chan.flush() {
                    tracing::error!("task {j}: writing its channel failed: {e}");
                }
            }
        }
        if self.manager.has_output() {
            if let Err(e) = self.manager.flush() {
                tracing::error!("writing to the manager failed: {e}");
            }
        }
    }

    fn accept_metrics(&mut self) {
        loop {
            let Some(listener) = &self.metrics else { return };
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let entry = self.metrics_conns.vacant_entry();
                    let token = Token(METRICS_BASE + entry.key());
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        entry.insert(metrics::MetricsConn::new(stream));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    return;
                }
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
            manager_pid: self.manager_pid.map(|p| p.as_raw() as u32),
            connections: self.conns.len(),
            workers: &self.workers,
            tasks: &self.tasks,
            jobs: &self.jobs,
            late_wait_results: self.shared.late_results(),
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
