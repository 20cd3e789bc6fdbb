//! `taskd task-node`: a manager and its task processes, nothing else. The task processes take
//! jobs from the shared stream; the manager keeps them with the one [`Supervisor`] (no gate: a
//! successor reads its own pending jobs again from Redis), until SIGTERM or SIGINT, or until
//! another run holds the node's name.

use std::io::Write;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::unistd::{getpid, Pid};

use super::consumer::{self, ConsumerSetup, Control};
use super::lease_gate;
use super::startup::{self, lease_token, LEASE_TTL};
use super::Durable;
use crate::app::Application;
use crate::config::ServerConfig;
use crate::process::{self, ProcessError};
use crate::signals::Signals;
use crate::supervisor::Supervisor;

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
    let asked = lease_gate::now_ms();
    super::startup::take_lease(&mut conn, d, &token)?;
    lease_gate::share(shared);
    lease_gate::held_since_ask(asked);
    let mut lease = Lease { conn: Some(conn), token, renewed: Instant::now(), lost: false };
    process::set_title("taskd: task-node");
    // The task processes run the job code: as --user, like the server's pool.
    let credentials = match &config.user {
        Some(user) => Some(process::resolve_credentials(user, config.group.as_deref())?),
        None => None,
    };
    let count = config.task_worker_num.max(1);
    // No gate: a consumer's successor reads its own pending jobs again from Redis.
    let mut sup = Supervisor::new(format!("task node {}", d.node), false);
    for i in 0..count {
        sup.add(format!("task {i}"), true);
    }
    let mut out = std::io::stdout().lock();
    let _ =
        writeln!(out, "taskd task-node {} taking jobs from {} with {count} task processes", d.node, d.shown);
    let _ = out.flush();
    drop(out);
    tracing::info!("task node {} (pid {}): {count} task processes on {}", d.node, getpid(), d.keys.jobs);
    // A task process is asked with SIGTERM, and has this long to finish its job.
    let grace = config.max_wait() + Duration::from_secs(2);
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
            sup.begin_stop(Some(Signal::SIGTERM), grace);
        }
        sup.start_due(|i| fork_consumer(app, config, d, i as u32, credentials));
        let next = sup.next_timer().into_iter().chain([lease.due()]).min();
        let wait = next.map_or(Duration::from_secs(60), |at| at.saturating_duration_since(Instant::now()));
        let ms = PollTimeout::try_from(wait.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut [PollFd::new(signals.as_fd(), PollFlags::POLLIN)], ms);
        for sig in signals.pending() {
            if sig == Signal::SIGHUP {
                match crate::logging::reopen() {
                    Ok(true) => tracing::info!("SIGHUP: log file reopened"),
                    Ok(false) => {}
                    Err(e) => tracing::error!("SIGHUP: cannot reopen the log file: {e}"),
                }
            } else if sig != Signal::SIGCHLD && !sup.stopping() {
                tracing::info!("task node {}: {sig}: stopping its task processes", d.node);
                sup.begin_stop(Some(Signal::SIGTERM), grace);
            }
        }
        sup.reap();
        if sup.stopping() {
            if sup.all_stopped() {
                lease.release(d);
                tracing::info!("task node {} stopped", d.node);
                return Ok(i32::from(lease.lost));
            }
            // Past the grace: SIGKILL.
            sup.escalate();
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
        let asked = lease_gate::now_ms();
        match startup::renew_lease(conn, d, &self.token) {
            Ok(startup::Lease::Held) => {
                lease_gate::held_since_ask(asked);
                None
            }
            Ok(startup::Lease::Lost(holder)) => {
                self.lost = true;
                // Before the SIGTERM: a task process that has not read it yet takes nothing.
                lease_gate::lost();
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
    process::spawn(&format!("task {slot}"), &[], || {
        if let Some(creds) = credentials {
            process::drop_privileges(creds).map_err(|source| ProcessError::Credentials { creds, source })?;
        }
        // After the switch of user, which clears the parent-death signal.
        process::die_with_parent(parent);
        let signals = Signals::open(&[Signal::SIGTERM, Signal::SIGINT])
            .map_err(ProcessError::io("cannot set up signals"))?;
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
