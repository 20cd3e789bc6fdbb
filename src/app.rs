//! The application side of the library: the Swoole callbacks an application implements, and
//! the contexts through which it sends replies and tasks.

use std::fmt;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::ipc::envelope::task_flags;
use crate::ipc::{FromTask, FromWorker, ToClient};
use crate::shm::Shared;
use crate::worker::Link;

/// A client connection, for the daemon's whole life: never reused, even when its fd is.
pub type SessionId = u64;
/// A task, unique across every worker and restart for the daemon's whole life.
pub type TaskId = u64;

/// Who is running a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessInfo {
    pub role: crate::ipc::Role,
    pub slot: u32,
    pub pid: u32,
}

/// A task as a task process receives it.
#[derive(Debug)]
pub struct Task<'a> {
    pub id: TaskId,
    /// The client session the task was submitted for, if any.
    pub session: Option<SessionId>,
    /// 1 for the first run; more when a previous run died with its task process.
    pub attempt: u32,
    /// The worker slot that submitted it.
    pub src_worker: u32,
    pub data: &'a [u8],
}

/// A task's outcome, as the worker slot that submitted it receives it in `on_finish`.
#[derive(Debug)]
pub struct Finished<'a> {
    pub id: TaskId,
    pub session: Option<SessionId>,
    /// What the submitter attached with [`WorkerCtx::task_for`]: everything `on_finish` needs,
    /// since the worker that submitted the task may have been replaced since.
    pub context: &'a [u8],
    /// `on_task`'s return value, or why the task could not be done. For a group: `Ok` and
    /// empty, or `Err` when the group was cut short (the server stopping) with why.
    pub result: Result<&'a [u8], &'a str>,
    /// The task process that ran it last (0 if none did).
    pub task_pid: u32,
    /// How many times it was started.
    pub attempts: u32,
    /// For a group ([`WorkerCtx::task_group`]): each member's outcome, in submission order.
    pub members: Option<Vec<Outcome<'a>>>,
    /// The task process already sent the session its reply ([`TaskCtx::reply`]).
    pub replied: bool,
}

/// One task's outcome: `on_task`'s result, or why there is none.
pub type Outcome<'a> = Result<&'a [u8], &'a str>;

/// The callbacks of a taskd application (Swoole's `on(...)` events).
///
/// One value of the application is forked into every process; each callback runs in the
/// process named in its documentation, and may keep per-process state in `self`.
pub trait Application: 'static {
    /// In the master, once listening.
    fn on_start(&mut self, _addr: std::net::SocketAddr) {}
    /// In each worker and task process as it starts. An error ends the process (exit status
    /// 1); the manager respawns it with a growing back-off while it keeps failing.
    fn on_worker_start(&mut self, _info: &ProcessInfo) -> Result<(), String> {
        Ok(())
    }
    /// In a worker: a client connected (dispatch mode 2 only, where it is ordered with the
    /// session's requests).
    fn on_connect(&mut self, _ctx: &mut WorkerCtx<'_>, _session: SessionId, _peer: &str) {}
    /// In a worker: one request (one line, without its line ending).
    fn on_receive(&mut self, ctx: &mut WorkerCtx<'_>, session: SessionId, data: &[u8]);
    /// In a worker: a client's connection is gone (dispatch mode 2 only).
    fn on_close(&mut self, _ctx: &mut WorkerCtx<'_>, _session: SessionId) {}
    /// In a task process: run one task; the value returned is the task's result (finish), or
    /// why there is none and whether the server should run it again ([`TaskFailure`]; a
    /// `String` converts to a permanent failure, so `Err(why.to_string())` and `?` just work).
    fn on_task(&mut self, ctx: &mut TaskCtx<'_>, task: &Task<'_>) -> Result<Vec<u8>, TaskFailure>;
    /// In a task process: `task` waits in the channel (the next to run, or behind it), and `on_task` follows
    /// for it, in order, unless the process ends first (then the master runs it again, as any
    /// job of a process that died). An application may start it early, as the external
    /// handlers do: their jobs are written ahead, so a handler runs a burst of them without
    /// waiting for the task process between two. Not called for durable jobs.
    fn on_task_ahead(&mut self, _task: &Task<'_>) {}
    /// In a task process: the results of the tasks run since the last call are about to leave
    /// the process (to the master; with durable jobs, to Redis), those of a burst together. An
    /// application that put part of its tasks' work off until now does it here, for all of
    /// them at once (the built-in one writes their outbox lines in one write), and names the
    /// tasks whose part could not be done, with why: each of those that succeeded fails
    /// instead, for good, with that reason, and the reply it set is not sent. A process that
    /// dies before this call loses those results with it, and their tasks run again.
    fn on_task_results(&mut self) -> Vec<(TaskId, String)> {
        Vec::new()
    }
    /// In a worker of the slot that submitted the task: the task is done or failed for good.
    fn on_finish(&mut self, _ctx: &mut WorkerCtx<'_>, _finished: &Finished<'_>) {}
    /// Whether `on_finish` is called for a job that succeeded and whose client already has its
    /// reply from the task process (`TaskCtx::reply`; `Finished::replied`). An application
    /// whose `on_finish` has nothing to do for those says false, and the master does not hand
    /// them to a worker at all: per job a delivery, a wake-up of the worker and its commit
    /// less. A task submitted with a callback gets its callback either way.
    fn finish_replied(&self) -> bool {
        true
    }
}

/// Why a task produced no result, and what the server does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskFailure {
    /// No attempt can succeed: the job fails now with this reason.
    Permanent(String),
    /// This attempt failed, another may succeed (a provider down or busy): the server runs the
    /// job again after a back-off with full jitter (`retry_after`, when the other side named a
    /// time), until its delivery retries are spent; then it fails with this reason.
    Transient { error: String, retry_after: Option<Duration> },
    /// The job may not run yet (a rate limit): it waits `wait` in the delayed queue and runs
    /// again; this run does not count as an attempt.
    NotYet { wait: Duration, why: String },
}

impl TaskFailure {
    /// The reason, as the job's `failed` or `retrying` line says it.
    pub fn reason(&self) -> &str {
        match self {
            TaskFailure::Permanent(why) | TaskFailure::NotYet { why, .. } => why,
            TaskFailure::Transient { error, .. } => error,
        }
    }
}

impl From<String> for TaskFailure {
    fn from(why: String) -> Self {
        TaskFailure::Permanent(why)
    }
}

impl From<&str> for TaskFailure {
    fn from(why: &str) -> Self {
        TaskFailure::Permanent(why.to_string())
    }
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// Why a task was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// `task_queue_max` jobs are queued or running.
    Busy { queued: u64, limit: u64 },
    /// The jobs held already take `task_queue_bytes_max` bytes, or would with this one.
    QueueBytes { held: u64, limit: u64 },
    /// Larger than `package_max_length`.
    TooLarge { len: usize, limit: usize },
    /// More jobs (or bytes, `bytes` set) at once than the queue holds even when empty: retrying
    /// can never help, so it is not "busy".
    ExceedsQueue { size: u64, limit: u64, bytes: bool },
    /// `task_to` a slot that does not exist.
    NoSuchTaskProcess { slot: u32, count: usize },
    /// Durable jobs cannot be taken now (Redis is unreachable), or not this way; the reason.
    Unavailable(String),
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Busy { queued, limit } => {
                write!(f, "server busy, retry later ({queued} jobs queued, limit {limit})")
            }
            TaskError::QueueBytes { held, limit } => write!(
                f,
                "server busy, retry later: the jobs waiting or running hold {held} bytes, and this one \
                 would take them past task_queue_bytes_max ({limit} bytes)"
            ),
            TaskError::ExceedsQueue { size, limit, bytes: false } => write!(
                f,
                "too large for the queue ({size} jobs, the queue holds {limit}: task_queue_max); \
                 send them in smaller batches"
            ),
            TaskError::ExceedsQueue { size, limit, bytes: true } => write!(
                f,
                "too large for the queue ({size} bytes, the queue holds {limit} bytes: \
                 task_queue_bytes_max)"
            ),
            TaskError::TooLarge { len, limit } => {
                write!(f, "task of {len} bytes exceeds package_max_length ({limit} bytes)")
            }
            TaskError::NoSuchTaskProcess { slot, count } => {
                write!(
                    f,
                    "there is no task process {slot}: task_worker_num is {count} (slots 0 to {})",
                    count.saturating_sub(1)
                )
            }
            TaskError::Unavailable(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for TaskError {}

/// A job's priority: under load, task processes take high, normal and low jobs in a weighted
/// fair order (6:3:1), so that every priority gets its share and none starves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];
    /// The weights of the weighted fair order (high, normal, low): of ten jobs started while
    /// all three wait, six are high, three normal, one low. In memory and with durable jobs.
    pub const WEIGHTS: [i64; 3] = [6, 3, 1];

    pub fn name(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn from_name(name: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Its place in [`Priority::ALL`], as the envelope carries it.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: u8) -> Priority {
        match i {
            0 => Priority::High,
            2 => Priority::Low,
            _ => Priority::Normal,
        }
    }
}

/// What a task may ask for beyond "run it now" ([`WorkerCtx::task_for_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskOptions {
    /// Not before this time: until then it waits in the master's delayed queue (with durable
    /// jobs, in Redis's delayed set), holding no task process. A time in the past runs now.
    pub run_at: Option<std::time::SystemTime>,
    pub priority: Priority,
    /// Deduplication: while a task with this key is waiting or running, or for `dedup_ttl`
    /// after it ended, another with the same key is not run; its session gets a `duplicate`
    /// line naming the first, then the first's final reply.
    pub key: Option<String>,
    pub dedup_ttl: Duration,
}

impl TaskOptions {
    /// Whether it asks for anything but the defaults.
    pub fn is_default(&self) -> bool {
        self.run_at.is_none() && self.priority == Priority::Normal && self.key.is_none()
    }
}

/// Milliseconds since the Unix epoch (0 for a time before it).
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

/// A Unix time in ms as RFC 3339 in UTC, to the millisecond (`2026-12-24T08:00:00.000Z`).
pub fn rfc3339(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    match chrono::DateTime::from_timestamp(secs, (ms % 1000) as u32 * 1_000_000) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => format!("{ms} ms after 1970"),
    }
}

/// A per-task callback ([`WorkerCtx::task_with`]), called instead of `on_finish`.
pub type Callback = Box<dyn FnOnce(&mut WorkerCtx<'_>, &Finished<'_>)>;

/// Why a waited-for task ([`WorkerCtx::task_wait`]) gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskWaitError {
    /// It was not accepted.
    Refused(TaskError),
    /// No result within the timeout; the task may still run, and its late result is dropped.
    Timeout(std::time::Duration),
    /// It ran and failed (`on_task` returned an error, or its process died past the retries).
    Failed(String),
    /// The master is gone (the daemon is stopping).
    Disconnected,
}

impl fmt::Display for TaskWaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskWaitError::Refused(e) => e.fmt(f),
            TaskWaitError::Timeout(t) => write!(f, "no result within {} ms", t.as_millis()),
            TaskWaitError::Failed(why) => f.write_str(why),
            TaskWaitError::Disconnected => f.write_str("the master is gone"),
        }
    }
}

impl std::error::Error for TaskWaitError {}

/// The limits a worker checks a task against before submitting it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskLimits {
    pub task_queue_max: u64,
    pub task_queue_bytes_max: u64,
    pub package_max_length: usize,
    pub task_worker_num: usize,
    /// Jobs go to Redis (`redis_url`).
    pub durable: bool,
}

/// What a worker's callbacks can do. Everything sent is buffered and handed to the master
/// when the callback returns, together with the commit of the event that caused it.
pub struct WorkerCtx<'a> {
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) shared: &'static Shared,
    pub(crate) info: ProcessInfo,
    /// Tasks this worker submitted that the master has not counted yet.
    pub(crate) uncounted_tasks: &'a mut u64,
    /// Their payload bytes (for `task_queue_bytes_max`).
    pub(crate) uncounted_bytes: &'a mut u64,
    pub(crate) limits: TaskLimits,
    pub(crate) callbacks: &'a mut HashMap<TaskId, Callback>,
    /// The channel to the master, for the calls that wait.
    pub(crate) link: &'a mut Link,
}

impl WorkerCtx<'_> {
    pub fn info(&self) -> ProcessInfo {
        self.info
    }

    /// Sends bytes to a client session (written as they are: add your own line ending).
    /// A session that has closed meanwhile is skipped.
    pub fn send(&mut self, session: SessionId, data: &[u8]) {
        ToClient::Send { session, data }.encode(self.out);
    }

    /// Closes a client session once what was sent to it is written.
    pub fn close(&mut self, session: SessionId) {
        ToClient::CloseSession { session }.encode(self.out);
    }

    /// Sends the server's statistics to a session, as one JSON line.
    pub fn send_stats(&mut self, session: SessionId) {
        ToClient::Stats { session }.encode(self.out);
    }

    /// Sends a session what the master knows of task `task_id`, as one JSON line: its final
    /// reply (kept for the last `result_keep` jobs), `running`, or an error if it is unknown.
    pub fn send_result(&mut self, session: SessionId, task_id: TaskId) {
        ToClient::QueryResult { session, task_id }.encode(self.out);
    }

    /// Hands a task to the task pool without waiting; its result comes to `on_finish`.
    pub fn task(&mut self, data: &[u8]) -> Result<TaskId, TaskError> {
        self.submit(0, b"", data, -1, 0)
    }

    /// Like [`WorkerCtx::task`], for a client session, with a context that comes back in
    /// `on_finish` (whatever worker process of this slot receives it).
    pub fn task_for(&mut self, session: SessionId, context: &[u8], data: &[u8]) -> Result<TaskId, TaskError> {
        self.submit(session, context, data, -1, 0)
    }

    /// Like [`WorkerCtx::task_for`], with [`TaskOptions`]: a time to run it, a priority, a
    /// deduplication key.
    pub fn task_for_with(
        &mut self,
        session: SessionId,
        context: &[u8],
        data: &[u8],
        options: &TaskOptions,
    ) -> Result<TaskId, TaskError> {
        if options.is_default() {
            return self.task_for(session, context, data);
        }
        if self.limits.durable
            && options.key.as_ref().is_some_and(|k| k.is_empty() || k.len() > crate::durable::dedup::KEY_MAX)
        {
            // Its hex form is part of a Redis key name (`{q}:key:HEX`): bounded.
            return Err(TaskError::Unavailable(format!(
                "a deduplication key of durable jobs is 1 to {} bytes",
                crate::durable::dedup::KEY_MAX
            )));
        }
        self.check_size(data)?;
        let bytes = (context.len() + data.len()) as u64;
        self.check_room(1, bytes)?;
        let task_id = self.shared.next_task_id();
        *self.uncounted_tasks += 1;
        *self.uncounted_bytes += bytes;
        FromWorker::TaskOptions {
            task_id,
            run_at_ms: options.run_at.map_or(0, |t| unix_ms(t).max(1)),
            priority: options.priority.index() as u8,
            dedup_ttl_ms: options.dedup_ttl.as_millis().min(u64::MAX as u128) as u64,
            key: options.key.as_deref().unwrap_or("").as_bytes(),
        }
        .encode(self.out);
        FromWorker::Task { task_id, session, target: -1, group: 0, flags: 0, context, data }.encode(self.out);
        Ok(task_id)
    }

    /// Cancels task `task_id`, submitted by `session`, if it has not started: the session gets
    /// `{"event":"cancelled","task_id":N}` as the task's final line (and its `on_finish` is
    /// not called), or an `error` saying why it cannot be cancelled (running, ended, unknown).
    pub fn cancel(&mut self, session: SessionId, task_id: TaskId) {
        ToClient::Cancel { session, task_id, token: b"" }.encode(self.out);
    }

    /// Like [`WorkerCtx::cancel`], for the operator (`taskd cancel N`): any session's job, if
    /// `token` is the one the daemon keeps beside its pid file. The session gets the answer.
    pub fn cancel_as_operator(&mut self, session: SessionId, task_id: TaskId, token: &str) {
        ToClient::Cancel { session, task_id, token: token.as_bytes() }.encode(self.out);
    }

    /// Like [`WorkerCtx::task_for`], run by the task process of slot `task_slot` (Swoole's
    /// `task($data, $dst_worker_id)`): it waits for that process if it is busy or restarting.
    /// Not with durable jobs (`redis_url`), where any node's task process takes a job:
    /// [`TaskError::Unavailable`].
    pub fn task_to(
        &mut self,
        task_slot: u32,
        session: SessionId,
        context: &[u8],
        data: &[u8],
    ) -> Result<TaskId, TaskError> {
        if self.limits.durable {
            return Err(TaskError::Unavailable(
                "this server keeps its jobs in Redis (redis_url), and whichever node is free runs each one: \
                 a job cannot be sent to one task process (task_worker, task_to)"
                    .into(),
            ));
        }
        if task_slot as usize >= self.limits.task_worker_num {
            return Err(TaskError::NoSuchTaskProcess { slot: task_slot, count: self.limits.task_worker_num });
        }
        self.submit(session, context, data, task_slot as i32, 0)
    }

    /// Hands a task to the pool; `callback` gets its result instead of `on_finish` (Swoole's
    /// `task($data, -1, $callback)`). The callback lives in this process: if the worker is
    /// replaced before the result comes, the result goes to `on_finish` of its successor,
    /// with the task's session and context.
    pub fn task_with(
        &mut self,
        session: SessionId,
        context: &[u8],
        data: &[u8],
        callback: impl FnOnce(&mut WorkerCtx<'_>, &Finished<'_>) + 'static,
    ) -> Result<TaskId, TaskError> {
        let id = self.submit(session, context, data, -1, task_flags::CALLBACK)?;
        self.callbacks.insert(id, Box::new(callback));
        Ok(id)
    }

    /// Runs a task and waits for its result, up to `timeout` (Swoole's `taskwait`). Only this
    /// worker waits; the others keep serving. What was sent before the call is written first.
    /// A result that comes after the timeout is dropped (and counted in `stats`).
    pub fn task_wait(&mut self, data: &[u8], timeout: Duration) -> Result<Vec<u8>, TaskWaitError> {
        let mut all = self.task_wait_all(&[data], timeout)?;
        all.pop().flatten().unwrap_or(Err(TaskWaitError::Timeout(timeout)))
    }

    /// Runs several tasks in parallel and waits for all of them, up to `timeout` (Swoole's
    /// `taskWaitMulti`): one entry per task, in order, `None` for one not finished in time.
    #[allow(clippy::type_complexity)]
    pub fn task_wait_all(
        &mut self,
        items: &[&[u8]],
        timeout: Duration,
    ) -> Result<Vec<Option<Result<Vec<u8>, TaskWaitError>>>, TaskWaitError> {
        let bytes = items.iter().map(|i| i.len() as u64).sum();
        self.check_room(items.len() as u64, bytes).map_err(TaskWaitError::Refused)?;
        for item in items {
            self.check_size(item).map_err(TaskWaitError::Refused)?;
        }
        let mut ids = Vec::with_capacity(items.len());
        for data in items {
            let task_id = self.shared.next_task_id();
            FromWorker::Task {
                task_id,
                session: 0,
                target: -1,
                group: 0,
                flags: task_flags::WAIT,
                context: b"",
                data,
            }
            .encode(self.out);
            ids.push(task_id);
        }
        let deadline = Instant::now() + timeout;
        let results =
            self.link.wait_results(self.out, &ids, deadline).map_err(|_| TaskWaitError::Disconnected)?;
        *self.uncounted_tasks = 0;
        *self.uncounted_bytes = 0;
        Ok(results.into_iter().map(|r| r.map(|res| res.map_err(TaskWaitError::Failed))).collect())
    }

    /// Hands several tasks to the pool at once; they run in parallel on several task
    /// processes, and `on_finish` is called once, for the returned group id, with every
    /// member's outcome in order (`Finished::members`). With a `timeout`, the group finishes
    /// then with what has finished; the others' outcome is a "timed out" error.
    pub fn task_group(
        &mut self,
        session: SessionId,
        context: &[u8],
        items: &[&[u8]],
        timeout: Option<Duration>,
    ) -> Result<TaskId, TaskError> {
        let bytes = items.iter().map(|i| i.len() as u64).sum::<u64>() + context.len() as u64;
        self.check_room(items.len() as u64, bytes)?;
        for item in items {
            self.check_size(item)?;
        }
        let group_id = self.shared.next_task_id();
        let timeout_ms = timeout.map_or(0, |t| t.as_millis().max(1) as u64);
        let size = items.len() as u32;
        FromWorker::Group { group_id, session, size, timeout_ms, context }.encode(self.out);
        for data in items {
            let task_id = self.shared.next_task_id();
            FromWorker::Task { task_id, session, target: -1, group: group_id, flags: 0, context: b"", data }
                .encode(self.out);
        }
        *self.uncounted_tasks += items.len() as u64;
        *self.uncounted_bytes += bytes;
        Ok(group_id)
    }

    fn check_size(&self, data: &[u8]) -> Result<(), TaskError> {
        let limit = self.limits.package_max_length;
        if data.len() > limit {
            return Err(TaskError::TooLarge { len: data.len(), limit });
        }
        Ok(())
    }

    fn check_room(&self, n: u64, bytes: u64) -> Result<(), TaskError> {
        if self.limits.durable && self.shared.durable_down() {
            return Err(TaskError::Unavailable(
                "the job queue is unavailable: Redis cannot be reached; retry later".into(),
            ));
        }
        let queued = self.shared.jobs_pending() + *self.uncounted_tasks;
        let limit = self.limits.task_queue_max;
        if n > limit {
            return Err(TaskError::ExceedsQueue { size: n, limit, bytes: false });
        }
        if bytes > self.limits.task_queue_bytes_max {
            return Err(TaskError::ExceedsQueue {
                size: bytes,
                limit: self.limits.task_queue_bytes_max,
                bytes: true,
            });
        }
        if queued + n > limit {
            return Err(TaskError::Busy { queued, limit });
        }
        let held = self.shared.job_bytes() + *self.uncounted_bytes;
        let limit = self.limits.task_queue_bytes_max;
        if held + bytes > limit {
            return Err(TaskError::QueueBytes { held, limit });
        }
        Ok(())
    }

    fn submit(
        &mut self,
        session: u64,
        context: &[u8],
        data: &[u8],
        target: i32,
        flags: u8,
    ) -> Result<TaskId, TaskError> {
        self.check_size(data)?;
        let bytes = (context.len() + data.len()) as u64;
        self.check_room(1, bytes)?;
        let task_id = self.shared.next_task_id();
        *self.uncounted_tasks += 1;
        *self.uncounted_bytes += bytes;
        FromWorker::Task { task_id, session, target, group: 0, flags, context, data }.encode(self.out);
        Ok(task_id)
    }
}

/// What a task process's `on_task` can do besides returning its result.
pub struct TaskCtx<'a> {
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) info: ProcessInfo,
    pub(crate) reply: Vec<u8>,
}

impl TaskCtx<'_> {
    pub fn info(&self) -> ProcessInfo {
        self.info
    }

    /// Sends bytes to a client session directly from the task process, at once. With durable
    /// jobs (`redis_url`), they travel with the task's outcome instead, to the node that has the
    /// session.
    pub fn send(&mut self, session: SessionId, data: &[u8]) {
        FromTask::Send { session, data }.encode(self.out);
    }

    /// Sets the bytes the task's session gets together with its result, in the same message:
    /// exactly once, never for a run that died (whose job runs again), and without a trip
    /// through a worker. `on_finish` still runs, with `Finished::replied` set. Not sent for a
    /// task of a group or one a worker waits for: their results go to the worker.
    pub fn reply(&mut self, data: &[u8]) {
        self.reply.clear();
        self.reply.extend_from_slice(data);
    }

    /// [`TaskCtx::reply`], written by `write` straight into the reply's buffer (empty when
    /// it is called) instead of copied there from a buffer of the caller's.
    pub fn reply_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        self.reply.clear();
        write(&mut self.reply);
    }
}
