//! `taskd task-node`: a manager and its task processes, nothing else. The task processes take
//! jobs from the shared stream; the manager keeps them with the one [`Supervisor`] (no gate: a
//! successor reads its own pending jobs again from Redis), until SIGTERM or SIGINT, or until
//! another run holds the node's name.
//!
//! A node may serve several queues (`--redis-queue a,b,c`). Each task process serves one: slot
//! `i` serves queue `i mod n`, and the node runs at least one process per queue. Why not every
//! process on every queue: in a Redis Cluster the queues' slots are on different servers, and
//! one blocking XREADGROUP reads one server; a process on several would poll them in turn
//! (latency, or busy reads while idle) or hold a blocked connection per queue and take from
//! several at once, beyond the window it can start within a few ms (DESIGN §8). One queue per
//! process keeps the consumer as it is: one window, one blocking read, and everything of a
//! queue (its claims, dead letters, delayed set, lanes, rate limits, heartbeats) in that
//! queue's keys, on its server. No queue starves: each has its own processes. What it costs:
//! a busy queue cannot borrow another queue's idle processes; give the node more processes
//! (they go round the queues), or the busy queue a node of its own.

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

/// One queue a task node serves: its settings, and the application its task processes run
/// (made for that queue: the delivery rate limits and idempotency keys are the queue's).
pub struct Served<A> {
    pub app: A,
    pub durable: Durable,
}

/// The task processes of a node serving `queues` queues: `task_worker_num`, at least one each.
pub fn process_count(task_worker_num: usize, queues: usize) -> usize {
    task_worker_num.max(queues).max(1)
}

/// The queue task process `slot` serves (see the module doc).
pub fn queue_of(slot: usize, queues: usize) -> usize {
    slot % queues.max(1)
}

/// Runs a task node until it is stopped; returns the exit status.
pub fn run<A: Application>(served: &mut [Served<A>], config: &ServerConfig) -> Result<i32, String> {
    let Some(first) = served.first() else { return Err("a task node serves at least one queue".into()) };
    let d = &first.durable.clone();
    // Blocked here, so also in every task process, which only reads SIGTERM and SIGINT:
    // SIGHUP reopens the log file (the task processes follow through shared memory).
    let mut signals = Signals::open(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD, Signal::SIGHUP])
        .map_err(|e| format!("cannot set up signals: {e}"))?;
    let shared = crate::shm::Shared::map().map_err(|e| format!("cannot map shared memory: {e}"))?;
    crate::logging::share_rotation(shared);
    // Two task nodes of one name would share consumer names: the name is held while this runs,
    // in every queue it serves. The manager holds it: its life is the node's (a hung manager
    // lets the name go).
    let token = lease_token(std::process::id());
    let asked = lease_gate::now_ms();
    let mut lease = Lease { queues: Vec::new(), token, renewed: Instant::now(), lost: false };
    let mut warned = Vec::new();
    for s in served.iter() {
        // Each queue's gate on a page of its own (see `QueueLease::gate`).
        let opened = crate::shm::Shared::map()
            .map_err(|e| format!("cannot map shared memory: {e}"))
            .and_then(|gate| Ok((gate, open_queue(&s.durable, &lease.token, &mut warned)?)));
        match opened {
            Ok((gate, conn)) => {
                lease_gate::held_since_ask_on(gate, asked);
                lease.queues.push(QueueLease { d: s.durable.clone(), conn: Some(conn), gate });
            }
            Err(why) => {
                // The names taken in the queues before this one go back at once.
                lease.release();
                return Err(why);
            }
        }
    }
    process::set_title("taskd: task-node");
    // The task processes run the job code: as --user, like the server's pool.
    let credentials = match &config.user {
        Some(user) => Some(process::resolve_credentials(user, config.group.as_deref())?),
        None => None,
    };
    let count = process_count(config.task_worker_num, served.len());
    // No gate: a consumer's successor reads its own pending jobs again from Redis.
    let mut sup = Supervisor::new(format!("task node {}", d.node), false);
    for i in 0..count {
        sup.add(format!("task {i}"), true);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "taskd task-node {} taking jobs from {} with {}",
        d.node,
        d.shown,
        spread(served, count)
    );
    let _ = out.flush();
    drop(out);
    let streams: Vec<&str> = served.iter().map(|s| s.durable.keys.jobs.as_str()).collect();
    tracing::info!(
        "task node {} (pid {}): {count} task processes on {}",
        d.node,
        getpid(),
        streams.join(", ")
    );
    if config.task_worker_num < served.len() {
        tracing::warn!(
            "task_worker_num {} is fewer than the {} queues served: {count} task processes, one per queue",
            config.task_worker_num,
            served.len()
        );
    }
    // A task process is asked with SIGTERM, and has this long to finish its job.
    let grace = config.max_wait() + Duration::from_secs(2);
    loop {
        // First, before any fork: a node that wakes from a hang learns whether its name is
        // still its own before it starts a consumer under it.
        if let Some(holder) = lease.renew_if_due() {
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
        sup.start_due(|i| {
            let q = queue_of(i, served.len());
            let s = &mut served[q];
            fork_consumer(&mut s.app, config, &s.durable, lease.queues[q].gate, i as u32, credentials)
        });
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
                lease.release();
                tracing::info!("task node {} stopped", d.node);
                return Ok(i32::from(lease.lost));
            }
            // Past the grace: SIGKILL.
            sup.escalate();
        }
    }
}

/// "2 task processes", or with several queues how they are spread over them.
fn spread<A>(served: &[Served<A>], count: usize) -> String {
    if served.len() == 1 {
        return format!("{count} task processes");
    }
    let each: Vec<String> = served
        .iter()
        .enumerate()
        .map(|(q, s)| {
            let n = (0..count).filter(|&i| queue_of(i, served.len()) == q).count();
            format!("{}: {n}", s.durable.keys.queue())
        })
        .collect();
    format!("{count} task processes over {} queues ({})", served.len(), each.join(", "))
}

/// Connects to the server of `d`'s queue (in a Cluster, the node of its slot), checks it, makes
/// the consumer group, and takes the node's name in that queue. Fails now, with the reason,
/// rather than in every task process. Each server's warnings are said once (`warned`).
fn open_queue(d: &Durable, token: &str, warned: &mut Vec<String>) -> Result<redis::Connection, String> {
    let queue = d.keys.queue();
    let mut conn = super::redis_io::connect_queue(&d.url, queue, Some(super::redis_io::REPLY_LIMIT))
        .map_err(|e| format!("cannot reach Redis at {}: {}", d.shown, super::redis_io::describe(&e)))?;
    for warning in super::startup::check_server(&mut conn) {
        if !warned.contains(&warning) {
            tracing::warn!("{warning}");
            warned.push(warning);
        }
    }
    super::startup::ensure_group(&mut conn, &d.keys).map_err(|e| {
        format!("cannot create the consumer group of queue {queue}: {}", super::redis_io::describe(&e))
    })?;
    super::startup::take_lease(&mut conn, d, token)?;
    Ok(conn)
}

/// This node's hold on its name, in each queue it serves, renewed from the manager's loop.
struct Lease {
    queues: Vec<QueueLease>,
    token: String,
    renewed: Instant,
    /// Another run holds the name now (in some queue).
    lost: bool,
}

/// The name in one queue's keys (`{q}:lease:NODE`), on that queue's server.
struct QueueLease {
    d: Durable,
    conn: Option<redis::Connection>,
    /// Until when the name is surely the node's in this queue, for the queue's task processes
    /// ([`lease_gate`]): one page per queue, so that a queue whose server is away (past the
    /// lease) stops its own processes, not the other queues'.
    gate: &'static crate::shm::Shared,
}

impl Lease {
    fn due(&self) -> Instant {
        self.renewed + LEASE_TTL / 3
    }

    /// Renews the lease in every queue when due, and each queue's gate with it; the holder's
    /// token if it is another run's now in any (once).
    fn renew_if_due(&mut self) -> Option<String> {
        if self.lost || Instant::now() < self.due() {
            return None;
        }
        self.renewed = Instant::now();
        for q in &mut self.queues {
            let asked = lease_gate::now_ms();
            if q.conn.is_none() {
                q.conn = super::redis_io::connect_queue(
                    &q.d.url,
                    q.d.keys.queue(),
                    Some(super::redis_io::REPLY_LIMIT),
                )
                .ok();
            }
            let Some(conn) = q.conn.as_mut() else { continue };
            match startup::renew_lease(conn, &q.d, &self.token) {
                Ok(startup::Lease::Held) => lease_gate::held_since_ask_on(q.gate, asked),
                Ok(startup::Lease::Lost(holder)) => {
                    self.lost = true;
                    // Before the SIGTERM: a task process that has not read it yet takes nothing
                    // (in any queue: the node stops).
                    for q in &self.queues {
                        lease_gate::lost_on(q.gate);
                    }
                    return Some(holder);
                }
                Err(e) => {
                    tracing::debug!(
                        "cannot renew the node's name in queue {}: {}",
                        q.d.keys.queue(),
                        super::redis_io::describe(&e)
                    );
                    q.conn = None;
                }
            }
        }
        None
    }

    fn release(&mut self) {
        if self.lost {
            return;
        }
        for q in &mut self.queues {
            if let Some(conn) = q.conn.as_mut() {
                startup::release_lease(conn, &q.d, &self.token);
            }
        }
    }
}

fn fork_consumer<A: Application>(
    app: &mut A,
    config: &ServerConfig,
    d: &Durable,
    gate: &'static crate::shm::Shared,
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
        // Before it connects: its consumer, heartbeat and rate limits go to its queue's server;
        // it takes jobs while the node's name in its queue is surely the node's.
        super::redis_io::serve_queue(d.keys.queue());
        lease_gate::share(gate);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_gets_a_process_and_they_go_round_the_queues() {
        assert_eq!(process_count(4, 1), 4);
        assert_eq!(process_count(1, 3), 3, "one per queue at least");
        assert_eq!(process_count(0, 1), 1);
        let of: Vec<usize> = (0..process_count(5, 3)).map(|slot| queue_of(slot, 3)).collect();
        assert_eq!(of, [0, 1, 2, 0, 1]);
        assert_eq!(queue_of(7, 1), 0);
    }
}
