//! A worker process: receives requests (and its tasks' results) from the master, runs the
//! application's `on_receive` / `on_finish`, and hands back replies and tasks.
//!
//! Everything a worker produces while handling a batch of deliveries goes back in one write,
//! ended by a commit naming the last delivery handled. The master acts only on committed
//! output, so a worker that dies mid-batch leaves no half-answered request: its successor is
//! handed every uncommitted delivery again.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use crate::app::{Application, Callback, Finished, Outcome, ProcessInfo, TaskId, TaskLimits, WorkerCtx};
use crate::config::ServerConfig;
use crate::ipc::envelope::{decode_outcomes, frame_len, task_flags, DecodeError, Finish, Message};
use crate::ipc::{Channel, FromWorker, ReadState, Role, ToWorker, WorkerToMaster};
use crate::process::ProcessError;
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
        self.channel.queue(out);
        flush_all(&mut self.channel)?;
        let mut results = vec![None; ids.len()];
        let mut missing = ids.len();
        loop {
            missing -= self.take_results(ids, &mut results);
            let now = Instant::now();
            if missing == 0 || now >= deadline {
                return Ok(results);
            }
            crate::logging::flush();
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
                Ok(Some((ToWorker::Finish(Finish { task_id, flags, ok, result, .. }), len)))
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

/// Runs the worker until it is told to stop, reaches `max_request` or loses the master (Ok),
/// or until a call on its link fails.
pub fn run<A: Application>(app: &mut A, setup: WorkerSetup<'_>) -> Result<(), ProcessError> {
    let WorkerSetup { slot, channel, shared, config } = setup;
    let mut channel: WorkerToMaster = Channel::new(channel);
    let info = ProcessInfo { role: Role::Worker, slot, pid: std::process::id() };
    let limit = request_limit(config.max_request, config.max_request_grace);
    let poll = Poll::new().map_err(ProcessError::io("cannot create its poller"))?;
    channel.register(poll.registry(), CHANNEL).map_err(ProcessError::io("cannot watch its channel"))?;
    let link = Link { channel, poll, events: Events::with_capacity(8), handled_seq: 0 };
    crate::logging::hold_lines();
    app.on_worker_start(&info).map_err(ProcessError::Start)?;
    tracing::debug!("worker {slot} started (pid {})", info.pid);
    let limits = TaskLimits {
        task_queue_max: config.task_queue_max,
        task_queue_bytes_max: config.task_queue_bytes_max,
        package_max_length: config.package_max_length,
        task_worker_num: config.task_worker_num,
        durable: config.redis_url.is_some(),
    };

    let mut worker = Worker {
        app,
        slot,
        info,
        shared,
        limits,
        limit,
        link,
        served: 0,
        out: Vec::new(),
        uncounted_tasks: 0,
        uncounted_bytes: 0,
        callbacks: HashMap::new(),
        spinner: crate::net::Spinner::new(config.busy_poll()),
        light: false,
    };
    worker.serve()
}

/// A running worker: what it keeps from one event to the next.
struct Worker<'a, A> {
    app: &'a mut A,
    slot: u32,
    info: ProcessInfo,
    shared: &'static Shared,
    limits: TaskLimits,
    /// `max_request` with this process's share of the grace (0: none).
    limit: u64,
    link: Link,
    served: u64,
    /// What the callbacks of this turn produced, handed back in one write.
    out: Vec<u8>,
    uncounted_tasks: u64,
    uncounted_bytes: u64,
    callbacks: HashMap<TaskId, Callback>,
    /// `busy_poll_us`: it polls a while after a turn of light load before it sleeps.
    spinner: crate::net::Spinner,
    /// The last turn was one of light load (see `net::light_turn`).
    light: bool,
}

impl<A: Application> Worker<'_, A> {
    /// Handles deliveries, a turn at a time, until the worker must exit (Ok), or a call on its
    /// link fails.
    fn serve(&mut self) -> Result<(), ProcessError> {
        let slot = self.slot;
        loop {
            let short_read_drains =
                self.wait().map_err(|source| ProcessError::Io { what: "poll failed", source })?;
            let state = self
                .link
                .channel
                .fill_after(short_read_drains)
                .map_err(ProcessError::io("reading its channel failed"))?;
            self.light = crate::net::light_turn(self.link.channel.input());
            let stop = self.handle_input().map_err(ProcessError::Corrupt)?;
            self.hand_back().map_err(ProcessError::io("writing to the master failed"))?;
            if let Some(why) = stop {
                tracing::info!(
                    "worker {slot} (pid {}) exits: {why}, after {} requests",
                    self.info.pid,
                    self.served
                );
                return Ok(());
            }
            if state == ReadState::Closed {
                tracing::debug!("worker {slot}: the master is gone");
                return Ok(());
            }
        }
    }

    /// Sleeps until the master writes, unless frames read while a callback waited are here.
    /// Returns whether it was woken by input alone (see `Channel::fill_after`).
    fn wait(&mut self) -> io::Result<bool> {
        if matches!(frame_len(self.link.channel.input()), Ok(Some(_))) {
            return Ok(false);
        }
        crate::logging::before_wait();
        match self.spinner.poll(&mut self.link.poll, &mut self.link.events, None, self.light) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
            Err(_) => Ok(false),
            Ok(()) => Ok(crate::net::woken_by_input(&self.link.events)),
        }
    }

    /// Handles every complete delivery read so far, then ends the output with a commit of the
    /// last one handled. Returns why the worker must exit, if it must (it handles nothing
    /// after that). The input is handled from a buffer of its own, so that a waiting callback
    /// can read the channel.
    fn handle_input(&mut self) -> Result<Option<String>, DecodeError> {
        let mut input = self.link.channel.take_input();
        let mut last_seq = None;
        let mut stop = None;
        let read = loop {
            let (frame, len) = match ToWorker::decode(input.data()) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let seq = match frame {
                ToWorker::Request { seq, session, data } => {
                    self.on_request(session, data);
                    if self.limit != 0 && self.served >= self.limit {
                        stop = Some(format!("reached max_request ({})", self.limit));
                    }
                    Some(seq)
                }
                ToWorker::Connect { seq, session, peer } => {
                    self.on_connect(session, peer);
                    Some(seq)
                }
                ToWorker::Close { seq, session } => {
                    self.on_close(session);
                    Some(seq)
                }
                ToWorker::Finish(finish) if finish.flags & task_flags::WAIT != 0 => {
                    self.on_late_result(finish.task_id);
                    None
                }
                ToWorker::Finish(finish) => {
                    self.on_finish(&finish);
                    Some(finish.seq)
                }
                ToWorker::Stop => {
                    stop = Some("asked to stop".to_string());
                    None
                }
            };
            input.consume(len);
            if let Some(seq) = seq {
                self.link.handled_seq = seq;
                last_seq = Some(seq);
            }
            if stop.is_some() {
                break Ok(());
            }
        };
        // What is left, then what arrived while callbacks waited.
        input.append(self.link.channel.input());
        self.link.channel.discard_input();
        self.link.channel.restore_input(input);
        if let Some(seq) = last_seq {
            FromWorker::Commit { seq }.encode(&mut self.out);
        }
        read.map(|()| stop)
    }

    /// Hands the master what this turn produced, in one write.
    fn hand_back(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.link.channel.queue(&mut self.out);
            self.uncounted_tasks = 0;
            self.uncounted_bytes = 0;
        }
        // A burst's buffer is not kept for the quiet that follows (a worker stays small).
        if self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
        }
        flush_all(&mut self.link.channel)
    }

    /// The application, and the context its callbacks get.
    fn ctx(&mut self) -> (&mut A, WorkerCtx<'_>) {
        let ctx = WorkerCtx {
            out: &mut self.out,
            shared: self.shared,
            info: self.info,
            uncounted_tasks: &mut self.uncounted_tasks,
            uncounted_bytes: &mut self.uncounted_bytes,
            limits: self.limits,
            callbacks: &mut self.callbacks,
            link: &mut self.link,
        };
        (&mut *self.app, ctx)
    }

    fn on_request(&mut self, session: u64, data: &[u8]) {
        let slot = self.slot;
        self.served += 1;
        let (app, mut ctx) = self.ctx();
        guard(slot, "on_receive", || app.on_receive(&mut ctx, session, data));
    }

    fn on_connect(&mut self, session: u64, peer: &[u8]) {
        let slot = self.slot;
        let peer = String::from_utf8_lossy(peer);
        let (app, mut ctx) = self.ctx();
        guard(slot, "on_connect", || app.on_connect(&mut ctx, session, &peer));
    }

    fn on_close(&mut self, session: u64) {
        let slot = self.slot;
        let (app, mut ctx) = self.ctx();
        guard(slot, "on_close", || app.on_close(&mut ctx, session));
    }

    /// The result of a waited-for task whose waiter timed out, or was an earlier process of
    /// this slot.
    fn on_late_result(&mut self, task_id: u64) {
        self.shared.count_late_result();
        tracing::info!("worker {}: result of task {task_id} came after its wait ended; dropped", self.slot);
    }

    /// A task's outcome: to the callback it was submitted with, or else to `on_finish`.
    fn on_finish(&mut self, finish: &Finish<'_>) {
        let slot = self.slot;
        let outcomes = Outcomes::of(finish, slot);
        let finished = Finished::from_frame(finish, &outcomes);
        let (app, mut ctx) = self.ctx();
        match ctx.callbacks.remove(&finish.task_id) {
            Some(callback) => guard(slot, "a task callback", || callback(&mut ctx, &finished)),
            None => {
                if finish.flags & task_flags::CALLBACK != 0 {
                    tracing::info!(
                        "task {} was submitted with a callback by an earlier process of worker {slot}, \
                         which was replaced since; its result goes to on_finish",
                        finish.task_id
                    );
                }
                guard(slot, "on_finish", || app.on_finish(&mut ctx, &finished));
            }
        }
    }
}

/// A finish's outcomes, decoded: a group's members split out, each error as text. The
/// [`Finished`] made of the finish borrows them.
struct Outcomes<'a> {
    group: bool,
    list: Vec<(bool, &'a [u8])>,
    texts: Vec<Cow<'a, str>>,
    /// Why a group was cut short (at shutdown): it travels after its members' outcomes.
    cut: Option<Cow<'a, str>>,
}

impl<'a> Outcomes<'a> {
    fn of(finish: &Finish<'a>, slot: u32) -> Self {
        let group = finish.flags & task_flags::GROUP != 0;
        let mut list = if group {
            decode_outcomes(finish.result).unwrap_or_else(|e| {
                tracing::error!("worker {slot}: corrupt group result for task {}: {e}", finish.task_id);
                Vec::new()
            })
        } else {
            vec![(finish.ok, finish.result)]
        };
        let cut = if group && !finish.ok { list.pop() } else { None };
        let cut = cut.map(|(_, why)| String::from_utf8_lossy(why));
        let texts = list.iter().map(|(_, bytes)| String::from_utf8_lossy(bytes)).collect();
        Outcomes { group, list, texts, cut }
    }

    fn get(&self, k: usize) -> Outcome<'_> {
        match self.list[k] {
            (true, bytes) => Ok(bytes),
            (false, _) => Err(&self.texts[k]),
        }
    }
}

impl<'a> Finished<'a> {
    /// What `on_finish` (or the task's callback) gets for a finish delivery.
    fn from_frame(finish: &Finish<'a>, outcomes: &'a Outcomes<'a>) -> Self {
        let (result, members) = if outcomes.group {
            let result = outcomes.cut.as_deref().map_or(Ok(&b""[..]), Err);
            (result, Some((0..outcomes.list.len()).map(|k| outcomes.get(k)).collect()))
        } else {
            (outcomes.get(0), None)
        };
        Finished {
            id: finish.task_id,
            session: (finish.session != 0).then_some(finish.session),
            context: finish.context,
            result,
            task_pid: finish.task_pid,
            attempts: finish.attempts,
            members,
            replied: finish.flags & task_flags::REPLIED != 0,
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
pub(crate) fn flush_all<Tx: Message, Rx: Message>(channel: &mut Channel<Tx, Rx>) -> std::io::Result<()> {
    while !channel.flush()? {
        channel.wait_writable(Duration::from_secs(1))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::envelope::encode_outcome;

    fn finish<'a>(ok: bool, flags: u8, result: &'a [u8]) -> Finish<'a> {
        Finish {
            seq: 3,
            task_id: 9,
            session: 0,
            task_pid: 77,
            attempts: 2,
            ok,
            flags,
            context: b"ctx",
            result,
        }
    }

    #[test]
    fn a_finish_is_what_on_finish_gets() {
        let f = finish(false, task_flags::REPLIED, b"smtp said \xff no");
        let outcomes = Outcomes::of(&f, 0);
        let done = Finished::from_frame(&f, &outcomes);
        assert_eq!((done.id, done.session, done.context), (9, None, &b"ctx"[..]));
        assert_eq!((done.task_pid, done.attempts, done.replied), (77, 2, true));
        assert_eq!(done.result, Err("smtp said \u{fffd} no"));
        assert!(done.members.is_none());
    }

    #[test]
    fn a_groups_finish_has_each_members_outcome_in_order() {
        let mut result = Vec::new();
        encode_outcome(true, b"sent", &mut result);
        encode_outcome(false, b"timed out after 5 ms", &mut result);
        let f = Finish { session: 4, ..finish(true, task_flags::GROUP, &result) };
        let outcomes = Outcomes::of(&f, 0);
        let done = Finished::from_frame(&f, &outcomes);
        assert_eq!(done.session, Some(4));
        assert_eq!(done.result, Ok(&b""[..]));
        assert_eq!(done.members, Some(vec![Ok(&b"sent"[..]), Err("timed out after 5 ms")]));
        // A corrupt combined result reads as a group with no member, not as a crash.
        let f = finish(true, task_flags::GROUP, &result[..3]);
        let outcomes = Outcomes::of(&f, 0);
        assert_eq!(Finished::from_frame(&f, &outcomes).members, Some(vec![]));
    }
}
