//! A worker process: receives requests (and its tasks' results) from the master, runs the
//! application's `on_receive` / `on_finish`, and hands back replies and tasks.
//!
//! Everything a worker produces while handling a batch of deliveries goes back in one write,
//! ended by a commit naming the last delivery handled. The master acts only on committed
//! output, so a worker that dies mid-batch leaves no half-answered request: its successor is
//! handed every uncommitted delivery again.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::app::{Application, Callback, Finished, Outcome, ProcessInfo, TaskId, TaskLimits, WorkerCtx};
use crate::config::ServerConfig;
use std::os::fd::OwnedFd;

use crate::ipc::envelope::{decode_outcomes, frame_len, task_flags, Message};
use crate::ipc::{Channel, FromWorker, ReadState, Role, ToWorker, WorkerToMaster};
use crate::shm::Shared;

const CHANNEL: Token = Token(0);

pub struct WorkerSetup<'a> {
    pub slot: u32,
    /// The worker's end of its slot's channel.
    pub channel: OwnedFd,
    pub shared: &'static Shared,
    pub config: &'a ServerConfig,
}

/// A worker's connection to the master, and what the waiting calls need of it.
pub struct Link {
    channel: WorkerToMaster,
    poll: Poll,
    events: Events,
    /// The last delivery fully handled: a commit may name it even in the middle of a callback.
    handled_seq: u64,
}

/// One waited-for result: `on_task`'s value, or why there is none.
pub(crate) type WaitResult = Option<Result<Vec<u8>, String>>;

impl Link {
    /// Hands the master what the current callback produced so far (with a commit of what is
    /// fully handled, so the master acts on it), then waits for the results of `ids`.
    pub(crate) fn wait_results(
        &mut self,
        out: &mut Vec<u8>,
        ids: &[TaskId],
        deadline: Instant,
    ) -> io::Result<Vec<WaitResult>> {
        FromWorker::Commit { seq: self.handled_seq }.encode(out);
        self.channel.output().append(out);
        flush_all(&mut self.poll, &mut self.events, &mut self.channel)?;
        let mut results = vec![None; ids.len()];
        let mut missing = ids.len();
        loop {
            missing -= self.take_results(ids, &mut results);
            let now = Instant::now();
            if missing == 0 || now >= deadline {
                return Ok(results);
            }
            match self.poll.poll(&mut self.events, Some(deadline - now)) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
            if self.channel.fill()? == ReadState::Closed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Takes the results of `ids` out of what has arrived; everything else stays queued for
    /// when the callback returns. Returns how many were found.
    fn take_results(&mut self, ids: &[TaskId], results: &mut [WaitResult]) -> usize {
        let mut found = 0;
        let mut pos = 0;
        loop {
            let (hit, len) = match ToWorker::decode(&self.channel.input()[pos..]) {
                Ok(Some((ToWorker::Finish { task_id, flags, ok, result, .. }, len)))
                    if flags & task_flags::WAIT != 0 =>
                {
                    match ids.iter().position(|&id| id == task_id) {
                        Some(k) if results[k].is_none() => {
                            let outcome = if ok {
                                Ok(result.to_vec())
                            } else {
                                Err(String::from_utf8_lossy(result).into_owned())
                            };
                            results[k] = Some(outcome);
                            (true, len)
                        }
                        _ => (false, len),
                    }
                }
                Ok(Some((_, len))) => (false, len),
                _ => return found,
            };
            if hit {
                self.channel.remove_input(pos, len);
                found += 1;
            } else {
                pos += len;
            }
        }
    }
}

/// Runs the worker until it is told to stop, reaches `max_request` or loses the master.
/// Returns the process exit code.
pub fn run<A: Application>(app: &mut A, setup: WorkerSetup<'_>) -> i32 {
    let WorkerSetup { slot, channel, shared, config } = setup;
    let mut channel: WorkerToMaster = Channel::new(channel);
    let info = ProcessInfo { role: Role::Worker, slot, pid: std::process::id() };
    let limit = request_limit(config.max_request, config.max_request_grace);
    let poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("worker {slot}: cannot create its poller: {e}");
            return 1;
        }
    };
    if let Err(e) =
        poll.registry().register(channel.source(), CHANNEL, Interest::READABLE | Interest::WRITABLE)
    {
        tracing::error!("worker {slot}: cannot watch its channel: {e}");
        return 1;
    }
    let mut link = Link { channel, poll, events: Events::with_capacity(8), handled_seq: 0 };
    if let Err(e) = app.on_worker_start(&info) {
        tracing::error!("worker {slot} (pid {}): cannot start: {e}", info.pid);
        return 1;
    }
    tracing::debug!("worker {slot} started (pid {})", info.pid);
    let limits = TaskLimits {
        task_queue_max: config.task_queue_max,
        task_queue_bytes_max: config.task_queue_bytes_max,
        package_max_length: config.package_max_length,
        task_worker_num: config.task_worker_num,
        durable: config.redis_url.is_some(),
    };

    let mut served: u64 = 0;
    let mut out = Vec::new();
    let mut uncounted_tasks = 0;
    let mut uncounted_bytes = 0;
    let mut callbacks: HashMap<TaskId, Callback> = HashMap::new();
    loop {
        // Frames read while a callback waited are already here: handle them before sleeping.
        if !matches!(frame_len(link.channel.input()), Ok(Some(_))) {
            if let Err(e) = link.poll.poll(&mut link.events, None) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("worker {slot}: poll failed: {e}");
                    return 1;
                }
            }
        }
        let state = match link.channel.fill() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("worker {slot}: reading its channel failed: {e}");
                return 1;
            }
        };
        // Handled from a buffer of its own, so that a waiting callback can read the channel.
        let mut input = link.channel.take_input();
        let mut last_seq = None;
        let mut stop = None;
        loop {
            let (frame, len) = match ToWorker::decode(input.data()) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("worker {slot}: corrupt message from the master: {e}");
                    return 1;
                }
            };
            let mut ctx = WorkerCtx {
                out: &mut out,
                shared,
                info,
                uncounted_tasks: &mut uncounted_tasks,
                uncounted_bytes: &mut uncounted_bytes,
                limits,
                callbacks: &mut callbacks,
                link: &mut link,
            };
            match frame {
                ToWorker::Request { seq, session, data } => {
                    guard(slot, "on_receive", || app.on_receive(&mut ctx, session, data));
                    last_seq = Some(seq);
                    served += 1;
                    if limit != 0 && served >= limit {
                        stop = Some(format!("reached max_request ({limit})"));
                    }
                }
                ToWorker::Connect { seq, session, peer } => {
                    let peer = String::from_utf8_lossy(peer);
                    guard(slot, "on_connect", || app.on_connect(&mut ctx, session, &peer));
                    last_seq = Some(seq);
                }
                ToWorker::Close { seq, session } => {
                    guard(slot, "on_close", || app.on_close(&mut ctx, session));
                    last_seq = Some(seq);
                }
                ToWorker::Finish { task_id, flags, .. } if flags & task_flags::WAIT != 0 => {
                    // Its waiter timed out, or was an earlier process of this slot.
                    shared.count_late_result();
                    tracing::info!(
                        "worker {slot}: result of task {task_id} came after its wait ended; dropped"
                    );
                }
                ToWorker::Finish {
                    seq,
                    task_id,
                    session,
                    task_pid,
                    attempts,
                    ok,
                    flags,
                    context,
                    result,
                } => {
                    let group = flags & task_flags::GROUP != 0;
                    let outcomes = if group {
                        decode_outcomes(result).unwrap_or_else(|e| {
                            tracing::error!("worker {slot}: corrupt group result for task {task_id}: {e}");
                            Vec::new()
                        })
                    } else {
                        vec![(ok, result)]
                    };
                    let texts: Vec<_> =
                        outcomes.iter().map(|(_, bytes)| String::from_utf8_lossy(bytes)).collect();
                    let as_outcome = |k: usize| -> Outcome<'_> {
                        if outcomes[k].0 {
                            Ok(outcomes[k].1)
                        } else {
                            Err(&*texts[k])
                        }
                    };
                    let (result, members) = if group {
                        (Ok(&b""[..]), Some((0..outcomes.len()).map(as_outcome).collect()))
                    } else {
                        (as_outcome(0), None)
                    };
                    let finished = Finished {
                        id: task_id,
                        session: (session != 0).then_some(session),
                        context,
                        result,
                        task_pid,
                        attempts,
                        members,
                        replied: flags & task_flags::REPLIED != 0,
                    };
                    match ctx.callbacks.remove(&task_id) {
                        Some(callback) => guard(slot, "a task callback", || callback(&mut ctx, &finished)),
                        None => {
                            if flags & task_flags::CALLBACK != 0 {
                                tracing::info!(
                                    "task {task_id} was submitted with a callback by an earlier process of worker {slot}, \
                                     which was replaced since; its result goes to on_finish"
                                );
                            }
                            guard(slot, "on_finish", || app.on_finish(&mut ctx, &finished));
                        }
                    }
                    last_seq = Some(seq);
                }
                ToWorker::Stop => stop = Some("asked to stop".to_string()),
            }
            input.consume(len);
            if let Some(seq) = last_seq {
                link.handled_seq = seq;
            }
            if stop.is_some() {
                break;
            }
        }
        // What is left, then what arrived while callbacks waited.
        input.append(link.channel.input());
        link.channel.discard_input();
        link.channel.restore_input(input);
        if let Some(seq) = last_seq {
            FromWorker::Commit { seq }.encode(&mut out);
        }
        if !out.is_empty() {
            link.channel.output().append(&mut out);
            uncounted_tasks = 0;
            uncounted_bytes = 0;
        }
        // A burst's buffer is not kept for the quiet that follows (a worker stays small).
        if out.capacity() > 64 * 1024 {
            out = Vec::new();
        }
        if let Err(e) = flush_all(&mut link.poll, &mut link.events, &mut link.channel) {
            tracing::error!("worker {slot}: writing to the master failed: {e}");
            return 1;
        }
        if let Some(why) = stop {
            tracing::info!("worker {slot} (pid {}) exits: {why}, after {served} requests", info.pid);
            return 0;
        }
        if state == ReadState::Closed {
            tracing::debug!("worker {slot}: the master is gone");
            return 0;
        }
    }
}

/// Runs a callback; a panic in it is logged, not fatal to the worker.
pub(crate) fn guard(slot: u32, what: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        tracing::error!("slot {slot}: {what} panicked; its event is dropped");
    }
}

/// Writes all pending output, waiting for the socket to drain when it is full.
pub(crate) fn flush_all<Tx: Message, Rx: Message>(
    poll: &mut Poll,
    events: &mut Events,
    channel: &mut Channel<Tx, Rx>,
) -> std::io::Result<()> {
    while !channel.flush()? {
        match poll.poll(events, Some(Duration::from_secs(1))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `max_request` plus a per-process random share of the grace, so workers started together
/// do not all restart together.
fn request_limit(max_request: u64, grace: u64) -> u64 {
    if max_request == 0 || grace == 0 {
        return max_request;
    }
    max_request + per_process_random() % (grace + 1)
}

/// A number that differs between processes forked from one parent (seeded after fork).
pub(crate) fn per_process_random() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mut x = (std::process::id() as u64) << 32 ^ nanos ^ 0x9E37_79B9_7F4A_7C15;
    // splitmix64 finaliser: spreads neighbouring pids over the whole range.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
