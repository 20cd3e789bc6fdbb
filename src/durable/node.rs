//! `taskd task-node`: a manager and its task processes, nothing else. The task processes take
//! jobs from the shared stream; the manager forks them, reaps them and forks a successor for
//! each one that exits, until SIGTERM or SIGINT.

use std::io::Write;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{getpid, Pid};

use super::consumer::{self, ConsumerSetup, Control};
use super::startup::{self, lease_token, LEASE_TTL};
use super::Durable;
use crate::app::Application;
use crate::config::ServerConfig;
use crate::process;
use crate::signals::Signals;

/// A process that lived less than this before exiting is respawned after a growing pause.
const SHORT_LIFE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

struct Slot {
    pid: Option<Pid>,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Duration,
}

/// Runs a task node until it is stopped; returns the exit status.
pub fn run<A: Application>(app: &mut A, config: &ServerConfig, d: &Durable) -> Result<i32, String> {
    // Blocked here, so also in every task process, which only reads SIGTERM and SIGINT:
    // SIGHUP reopens the log file (the task processes follow through shared memory).
    let mut signals = Signals::open(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD, Signal::SIGHUP])
        .map_err(|e| format!("cannot set up signals: {e}"))?;
    let shared = crate::shm::Shared::map().map_err(|e| format!("cannot map shared memory: {e}"))?;
    crate::logging::share_rotation(shared);
    // Fail now, with the reason, rather than in every task process.
    let mut conn = super::redis_io::connect(&d.url, Some(super::redis_io::REPLY_LIMIT))
        .map_err(|e| format!("cannot reach Redis at {}: {}", d.shown, super::redis_io::describe(&e)))?;
    for warning in super::startup::check_server(&mut conn) {
        tracing::warn!("{warning}");
    }
    super::startup::ensure_group(&mut conn, &d.keys)
        .map_err(|e| format!("cannot create the consumer group: {}", super::redis_io::describe(&e)))?;
    // Two task nodes of one name would share consumer names: the name is held while this runs.
    // The manager holds it: its life is the node's (a hung manager lets the name go).
    let token = lease_token(std::process::id());
    super::startup::take_lease(&mut conn, d, &token)?;
    let mut lease = Lease { conn: Some(conn), token, renewed: Instant::now(), lost: false };
    process::set_title("taskd: task-node");
    // The task processes run the job code: as --user, like the server's pool.
    let credentials = match &config.user {
        Some(user) => Some(process::resolve_credentials(user, config.group.as_deref())?),
        None => None,
    };
    let count = config.task_worker_num.max(1);
    let mut slots: Vec<Slot> = (0..count)
        .map(|_| Slot {
            pid: None,
            started: Instant::now(),
            restart_at: Some(Instant::now()),
            backoff: SHORT_LIFE / 10,
        })
        .collect();
    let mut out = std::io::stdout().lock();
    let _ =
        writeln!(out, "taskd task-node {} taking jobs from {} with {count} task processes", d.node, d.shown);
    let _ = out.flush();
    drop(out);
    tracing::info!("task node {} (pid {}): {count} task processes on {}", d.node, getpid(), d.keys.jobs);
    let mut stopping: Option<Instant> = None;
    loop {
        // First, before any fork: a node that wakes from a hang learns whether its name is
        // still its own before it starts a consumer under it.
        if let Some(holder) = lease.renew_if_due(d) {
            // Another run took the name (this one hung or lost Redis past the lease): two
            // nodes of one name would run consumers of the same names. This one goes.
            tracing::error!(
                "task node {}: the name is held by another run now ({holder}): this one was stopped \
                 or cut off from Redis for over {} s; it takes no more jobs and exits",
                d.node,
                LEASE_TTL.as_secs()
            );
            if stopping.is_none() {
                stopping = Some(Instant::now() + config.max_wait() + Duration::from_secs(2));
                for pid in slots.iter().filter_map(|s| s.pid) {
                    let _ = kill(pid, Signal::SIGTERM);
                }
            }
        }
        if stopping.is_none() {
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.restart_at.is_some_and(|at| at <= Instant::now()) {
                    slot.restart_at = None;
                    match fork_consumer(app, config, d, i as u32, credentials) {
                        Ok(pid) => {
                            slot.pid = Some(pid);
                            slot.started = Instant::now();
                        }
                        Err(e) => {
                            tracing::error!("cannot fork task {i}: {e}; retrying in 1s");
                            slot.restart_at = Some(Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
            }
        }
        let next = slots.iter().filter_map(|s| s.restart_at).min().into_iter().chain([lease.due()]).min();
        let wait = match (stopping, next) {
            (Some(deadline), _) => deadline.saturating_duration_since(Instant::now()),
            (None, Some(at)) => at.saturating_duration_since(Instant::now()),
            (None, None) => Duration::from_secs(60),
        };
        let ms = PollTimeout::try_from(wait.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut [PollFd::new(signals.as_fd(), PollFlags::POLLIN)], ms);
        for sig in signals.pending() {
            if sig == Signal::SIGHUP {
                match crate::logging::reopen() {
                    Ok(true) => tracing::info!("SIGHUP: log file reopened"),
                    Ok(false) => {}
                    Err(e) => tracing::error!("SIGHUP: cannot reopen the log file: {e}"),
                }
            } else if sig != Signal::SIGCHLD && stopping.is_none() {
                tracing::info!("task node {}: {sig}: stopping its task processes", d.node);
                let limit = config.max_wait() + Duration::from_secs(2);
                stopping = Some(Instant::now() + limit);
                for pid in slots.iter().filter_map(|s| s.pid) {
                    let _ = kill(pid, Signal::SIGTERM);
                }
            }
        }
        for reaped in process::reap() {
            let Some((i, slot)) = slots.iter_mut().enumerate().find(|(_, s)| s.pid == Some(reaped.pid))
            else {
                continue;
            };
            slot.pid = None;
            if stopping.is_some() {
                continue;
            }
            let lived = slot.started.elapsed();
            slot.backoff =
                if lived < SHORT_LIFE { (slot.backoff * 2).min(BACKOFF_MAX) } else { SHORT_LIFE / 10 };
            let delay = if lived < SHORT_LIFE { slot.backoff } else { Duration::ZERO };
            tracing::info!("task {i} (pid {}) {}; respawning", reaped.pid, reaped.reason);
            slot.restart_at = Some(Instant::now() + delay);
        }
        if let Some(deadline) = stopping {
            if slots.iter().all(|s| s.pid.is_none()) {
                lease.release(d);
                tracing::info!("task node {} stopped", d.node);
                return Ok(i32::from(lease.lost));
            }
            if Instant::now() >= deadline {
                tracing::warn!("task node {}: task processes did not stop in time; killing them", d.node);
                for pid in slots.iter().filter_map(|s| s.pid) {
                    let _ = kill(pid, Signal::SIGKILL);
                    process::wait_for(pid, Duration::from_secs(2));
                }
                lease.release(d);
                return Ok(i32::from(lease.lost));
            }
        }
    }
}

/// This node's hold on its name, renewed from the manager's loop.
struct Lease {
    conn: Option<redis::Connection>,
    token: String,
    renewed: Instant,
    /// Another run holds the name now.
    lost: bool,
}

impl Lease {
    fn due(&self) -> Instant {
        self.renewed + LEASE_TTL / 3
    }

    /// Renews the lease when due; the holder's token if it is another run's now (once).
    fn renew_if_due(&mut self, d: &Durable) -> Option<String> {
        if self.lost || Instant::now() < self.due() {
            return None;
        }
        self.renewed = Instant::now();
        if self.conn.is_none() {
            self.conn = super::redis_io::connect(&d.url, Some(super::redis_io::REPLY_LIMIT)).ok();
        }
        let conn = self.conn.as_mut()?;
        match startup::renew_lease(conn, d, &self.token) {
            Ok(startup::Lease::Held) => None,
            Ok(startup::Lease::Lost(holder)) => {
                self.lost = true;
                Some(holder)
            }
            Err(e) => {
                tracing::debug!("cannot renew the node's name: {}", super::redis_io::describe(&e));
                self.conn = None;
                None
            }
        }
    }

    fn release(&mut self, d: &Durable) {
        if let (Some(conn), false) = (self.conn.as_mut(), self.lost) {
            startup::release_lease(conn, d, &self.token);
        }
    }
}

fn fork_consumer<A: Application>(
    app: &mut A,
    config: &ServerConfig,
    d: &Durable,
    slot: u32,
    credentials: Option<process::Credentials>,
) -> std::io::Result<Pid> {
    let parent = getpid();
    process::spawn(&[], || {
        process::set_title(&format!("taskd: task {slot}"));
        if let Some(creds) = credentials {
            if let Err(e) = process::drop_privileges(creds) {
                tracing::error!("task {slot}: cannot switch to uid {} gid {}: {e}", creds.uid, creds.gid);
                return 1;
            }
        }
        // After the switch of user, which clears the parent-death signal.
        process::die_with_parent(parent);
        let signals = match Signals::open(&[Signal::SIGTERM, Signal::SIGINT]) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("task {slot}: cannot set up signals: {e}");
                return 1;
            }
        };
        consumer::run(
            app,
            ConsumerSetup {
                slot,
                control: Control::Signals(signals),
                durable: d,
                task_max_request: config.task_max_request,
            },
        )
    })
}
