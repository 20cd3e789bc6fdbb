//! The binary envelope every IPC message travels in, and the messages of each link.
//!
//! A frame is `[u32 len][u8 kind][fixed header][variable bytes]`, little endian, where `len`
//! counts everything after itself. Payloads (request lines, task JSON, replies) are opaque
//! bytes: the master routes frames by their fixed header and never parses the JSON inside.
//! Decoding borrows from the read buffer, so routing a frame copies nothing.
//!
//! Each link has a message type per direction, over the one reader and writer below:
//! master -> worker [`ToWorker`], worker -> master [`FromWorker`] (its output for clients,
//! [`ToClient`], is a type of its own too); master <-> task process [`ToTask`] / [`FromTask`];
//! master <-> manager [`ToManager`] / [`FromManager`]; master <-> Redis bridge [`ToBridge`] /
//! [`FromBridge`]. Kind bytes are unique across links, so a frame of one link read on another
//! is corrupt, not misread.

use std::fmt;

/// Bytes of the length prefix.
const LEN_BYTES: usize = 4;

/// A frame larger than this is corrupt, whatever `package_max_length` says: it bounds what a
/// broken peer can make a process allocate.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Which process role a slot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Worker,
    Task,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Worker => 0,
            Role::Task => 1,
        }
    }

    fn from_code(code: u8) -> Result<Role, DecodeError> {
        match code {
            0 => Ok(Role::Worker),
            1 => Ok(Role::Task),
            _ => Err(DecodeError::BadField("role")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Task => "task",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a child process ended, as the manager saw it in `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// `exit(code)`; 0 is a planned exit (max_request, reload, stop).
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl ExitReason {
    pub fn is_clean(self) -> bool {
        self == ExitReason::Code(0)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Code(code) => write!(f, "exited with status {code}"),
            ExitReason::Signal(sig) => {
                let name =
                    nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("unknown signal");
                write!(f, "killed by signal {sig} ({name})")
            }
        }
    }
}

/// The messages of one direction of one link, each link with its own types: a channel is typed
/// by what it writes and what it reads ([`crate::ipc::Channel`]), so that a frame sent on the
/// wrong link does not compile and every reader's `match` is exhaustive.
///
/// `Self` is the message type with its byte fields borrowing for `'static`, used only as a
/// name for the type; [`Message::Of`] is the same type borrowing from the buffer it was read
/// from (zero copy).
pub trait Message {
    type Of<'a>: fmt::Debug;
    /// Appends `msg`, length prefix included, to `out`.
    fn encode(msg: &Self::Of<'_>, out: &mut Vec<u8>);
    /// Decodes the first frame of `buf`. `Ok(None)`: not all of it has arrived yet. On
    /// success, also returns how many bytes of `buf` the frame took.
    fn decode(buf: &[u8]) -> Result<Option<(Self::Of<'_>, usize)>, DecodeError>;
}

/// Implements [`Message`] for a message type with an `encode` and a `decode` of its own.
macro_rules! message {
    ($ty:ident) => {
        impl Message for $ty {
            type Of<'a> = $ty;
            #[inline]
            fn encode(msg: &$ty, out: &mut Vec<u8>) {
                msg.encode(out)
            }
            #[inline]
            fn decode(buf: &[u8]) -> Result<Option<($ty, usize)>, DecodeError> {
                $ty::decode(buf)
            }
        }
    };
    ($($ty:ident<'_>),*) => {$(
        impl Message for $ty<'static> {
            type Of<'a> = $ty<'a>;
            #[inline]
            fn encode(msg: &$ty<'_>, out: &mut Vec<u8>) {
                msg.encode(out)
            }
            #[inline]
            fn decode(buf: &[u8]) -> Result<Option<($ty<'_>, usize)>, DecodeError> {
                $ty::decode(buf)
            }
        }
    )*};
}

message!(
    ToWorker<'_>,
    FromWorker<'_>,
    ToClient<'_>,
    ToTask<'_>,
    FromTask<'_>,
    FromManager<'_>,
    ToBridge<'_>,
    FromBridge<'_>
);
message!(ToManager);

// ---- master <-> worker ----

/// Master -> worker: deliveries, each numbered per slot so that the worker can commit them,
/// and the request to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker<'a> {
    /// One request line from a client session.
    Request { seq: u64, session: u64, data: &'a [u8] },
    /// A client connected (dispatch mode 2 only, so it is ordered with the requests).
    Connect { seq: u64, session: u64, peer: &'a [u8] },
    /// A client's connection is gone.
    Close { seq: u64, session: u64 },
    /// A task this slot submitted has finished (or failed for good).
    Finish(Finish<'a>),
    /// Exit cleanly after what is before this in the channel (reload, shutdown).
    Stop,
}

/// A task's final outcome, for the worker slot that submitted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish<'a> {
    pub seq: u64,
    pub task_id: u64,
    pub session: u64,
    pub task_pid: u32,
    pub attempts: u32,
    pub ok: bool,
    /// [`task_flags`]: `GROUP` when `result` holds the outcomes of a group's members
    /// ([`decode_outcomes`]), and the flags the task was submitted with. A finish of a
    /// `WAIT` task is no delivery: its `seq` is 0 and it is never replayed.
    pub flags: u8,
    pub context: &'a [u8],
    pub result: &'a [u8],
}

/// Worker -> master: what handling its deliveries produced, ended by a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromWorker<'a> {
    /// Output for a client session.
    Client(ToClient<'a>),
    /// A new task. `session` 0 means none; `target` is a task slot, or -1 for any idle one;
    /// `group` is the group it belongs to (0: none).
    Task {
        task_id: u64,
        session: u64,
        target: i32,
        group: u64,
        /// [`task_flags`] `CALLBACK` or `WAIT`.
        flags: u8,
        context: &'a [u8],
        data: &'a [u8],
    },
    /// What the next `Task` frame of the same `task_id` asks for beyond running now
    /// ([`crate::app::TaskOptions`]): not before `run_at_ms` (Unix ms, 0: now), its
    /// `priority` (0 high, 1 normal, 2 low), and a deduplication `key` (empty: none) held for
    /// `dedup_ttl_ms` after the job ends.
    TaskOptions { task_id: u64, run_at_ms: u64, priority: u8, dedup_ttl_ms: u64, key: &'a [u8] },
    /// A group of tasks whose outcomes are delivered together, as one finish of `group_id`;
    /// its `size` member tasks follow. `timeout_ms` (0: none) bounds the wait for them.
    Group { group_id: u64, session: u64, size: u32, timeout_ms: u64, context: &'a [u8] },
    /// Every delivery up to and including `seq` has been handled; frames before this one
    /// are the complete output of that handling.
    Commit { seq: u64 },
}

/// What a worker writes for a client session (part of [`FromWorker`], and a message type of
/// its own for the output the master holds back while a durable job is being stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToClient<'a> {
    /// Bytes for a client session; the master writes them if the session still exists.
    Send { session: u64, data: &'a [u8] },
    /// Close a client session after its pending output is written.
    CloseSession { session: u64 },
    /// Write what is known of task `task_id` to this session: its final reply, or that it is
    /// still running, or that it is unknown.
    QueryResult { session: u64, task_id: u64 },
    /// Write the server's statistics to this session as one JSON line.
    Stats { session: u64 },
    /// Cancel task `task_id` for this session (which must have submitted it, unless it shows
    /// the operator's `token`; empty: none): the job's `cancelled` line, or an error saying why
    /// it cannot be.
    Cancel { session: u64, task_id: u64, token: &'a [u8] },
}

impl ToClient<'_> {
    /// The session it is for.
    pub fn session(&self) -> u64 {
        match *self {
            ToClient::Send { session, .. }
            | ToClient::CloseSession { session }
            | ToClient::QueryResult { session, .. }
            | ToClient::Cancel { session, .. }
            | ToClient::Stats { session } => session,
        }
    }
}

// ---- master <-> task process ----

/// Master -> task process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToTask<'a> {
    RunTask {
        task_id: u64,
        session: u64,
        attempt: u32,
        src_worker: u32,
        data: &'a [u8],
    },
    /// Exit cleanly after what is before this in the channel (reload, shutdown).
    Stop,
}

/// Task process -> master. With durable jobs, a task process's `Send` frames travel with its
/// job's outcome, in the `sends` of a [`FromBridge::Reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromTask<'a> {
    /// Bytes for a client session, at once (`TaskCtx::send`).
    Send { session: u64, data: &'a [u8] },
    /// A task's outcome; `reply` (may be empty) goes to its session together with it.
    TaskDone { task_id: u64, ok: bool, reply: &'a [u8], result: &'a [u8] },
    /// A run of a task that may succeed later (`TaskFailure::Transient` or `NotYet`): the
    /// master decides whether and when it runs again. `wait_ms` is the wait the task asks for
    /// (a `Retry-After`, a rate limit), `u64::MAX` for none.
    TaskRetry { task_id: u64, not_yet: bool, wait_ms: u64, error: &'a [u8] },
}

impl FromTask<'_> {
    /// `TaskRetry`'s `wait_ms` for no wait asked.
    pub const NO_WAIT: u64 = u64::MAX;
}

// ---- master <-> manager ----

/// Master -> manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToManager {
    /// The master has cleaned the slot's channel: the manager may fork its next process.
    SlotReady { role: Role, slot: u32 },
    /// Stop the pool and exit.
    Shutdown,
    /// Grow (`active`) or shrink the pool by this slot (SIGTTIN / SIGTTOU to the master): an
    /// inactive slot's process is not replaced when it exits.
    SlotActive { role: Role, slot: u32, active: bool },
}

/// Manager -> master: its processes coming and going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromManager<'a> {
    Started { role: Role, slot: u32, pid: u32 },
    Exited { role: Role, slot: u32, pid: u32, reason: ExitReason, uptime_ms: u64 },
    ForkFailed { role: Role, slot: u32, error: &'a [u8] },
}

// ---- master <-> Redis bridge (durable jobs only) ----

/// Master -> bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToBridge<'a> {
    /// Put this job in the stream; part of store batch `batch`.
    Store { batch: u64, task_id: u64, session: u64, worker: u32, context: &'a [u8], data: &'a [u8] },
    /// Batch `batch` is complete: acknowledge it once all its jobs are stored.
    StoreEnd { batch: u64 },
    /// The next `Store` (same `task_id`) is a job for later: park it in the delayed set until
    /// `run_at_ms` (Unix ms), not in the stream.
    StoreAt { task_id: u64, run_at_ms: u64 },
    /// The reply stream entry has been acted on: delete it.
    Trim { entry: &'a [u8] },
    /// Keep this final reply in Redis: its client is gone, and may come back to ask for it.
    KeepResult { task_id: u64, line: &'a [u8] },
    /// The master is alive: renew the node's lease on its name (sent by the master itself, so
    /// that a master that hangs lets its name go).
    RenewLease,
    /// An operator's request from the dashboard (`op`: JSON, see `durable::admin`); answered
    /// by an [`FromBridge::AdminAnswer`] with the same `request`.
    Admin { request: u64, op: &'a [u8] },
    /// The next `Store` (same `task_id`) goes to the streams of this priority
    /// ([`crate::app::Priority::index`]); without it, normal.
    StorePriority { task_id: u64, priority: u8 },
    /// The next `Store` (same `task_id`) is the job of tick `tick_ms` (Unix ms) of the schedule
    /// `name`: stored only if this node claims the tick first (the claim lives `ttl_ms`);
    /// answered by a [`FromBridge::TickClaim`] before the batch's `Stored`.
    ClaimTick { task_id: u64, tick_ms: u64, ttl_ms: u64, name: &'a [u8] },
    /// The next `Store` (same `task_id`) carries a deduplication key: it is stored only if it
    /// takes the key in Redis, which it then holds until `dedup_ttl_ms` after it ended.
    StoreKey { task_id: u64, dedup_ttl_ms: u64, key: &'a [u8] },
    /// Watch the deduplication key `digest` held by `holder` (its value in Redis while held)
    /// for job `task_id`, a duplicate waiting for the first's final line: sent again to a new
    /// bridge for every duplicate still waiting. An empty `holder`: stop watching (its client
    /// is gone).
    WatchKey { task_id: u64, digest: &'a [u8], holder: &'a [u8] },
    /// Take job `task_id` of this node back if it has not started (parked in the delayed set,
    /// or in `stream` and never delivered); answered by [`FromBridge::Cancelled`].
    Cancel { task_id: u64, stream: &'a [u8] },
}

/// Bridge -> master. `Reply` frames are also what task processes of any node write to the reply
/// stream in Redis (without their `entry`), and what a restarted master reads from it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromBridge<'a> {
    /// Every batch up to `batch` is stored (`error` empty), or could not be (the reason).
    /// `replicas`: how many replicas WAIT confirmed when that was fewer than
    /// `redis_wait_replicas` (the jobs are stored on the master only), else [`Self::ALL_REPLICAS`].
    Stored { batch: u64, replicas: u32, error: &'a [u8] },
    /// A job's outcome, read from this node's reply stream.
    Reply(Reply<'a>),
    /// The outcome of a renewal: empty `holder`, the name is still this node's; otherwise the
    /// run that holds it now, and this node must stop.
    Lease { holder: &'a [u8] },
    /// How many jobs wait in Redis: `{"jobs":N,"lanes":{"TYPE":N,…},"by_priority":{…}}` (the main stream and
    /// each lane this node routes to), read every second or so, for `stats`.
    Depths { json: &'a [u8] },
    /// The answer (JSON) to [`ToBridge::Admin`] `request`.
    AdminAnswer { request: u64, answer: &'a [u8] },
    /// Who claimed tick `tick_ms` of schedule `name` whose job was `task_id`: this node (`won`:
    /// the job is stored), or the node named by `holder` (the job is not stored: drop it).
    TickClaim { task_id: u64, tick_ms: u64, won: bool, name: &'a [u8], holder: &'a [u8] },
    /// Job `task_id` was not stored: job `first` holds its key (`digest`, held as `holder`).
    /// `line`: the first's final line if it has ended; empty: it has not, and the bridge
    /// watches the key for it (see [`FromBridge::KeyEnded`]).
    Duplicate { task_id: u64, first: u64, digest: &'a [u8], holder: &'a [u8], line: &'a [u8] },
    /// The first job of the duplicate `task_id` ended with `line`; empty: its outcome can no
    /// longer be known (its key expired or was taken by another job before it was read).
    KeyEnded { task_id: u64, line: &'a [u8] },
    /// The answer to [`ToBridge::Cancel`]: `cancelled`, or why not (`why`).
    Cancelled { task_id: u64, cancelled: bool, why: &'a [u8] },
    /// Job `task_id` was not stored (`why`): its command failed inside its round's transaction
    /// (a key of its someone made another type), which stored the round's other jobs. Sent
    /// before its batch's `Stored`, which then answers for the others only.
    NotStored { task_id: u64, why: &'a [u8] },
    /// Every outcome of reply entry `entry` was sent before this: the master may ask for its
    /// deletion once none of them waits in it (see `master::reply_trims`).
    EntryRead { entry: &'a [u8] },
}

/// A job's outcome, as a task process of any node wrote it to the reply stream (entry `entry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'a> {
    pub task_id: u64,
    pub ok: bool,
    pub attempts: u32,
    pub task_pid: u32,
    /// How many times an operator replayed it from the dead-letter stream.
    pub replays: u32,
    pub entry: &'a [u8],
    pub reply: &'a [u8],
    /// The [`FromTask::Send`] frames its task process wrote for sessions, encoded.
    pub sends: &'a [u8],
    pub result: &'a [u8],
    /// Not the outcome: the job waits for a delivery retry in Redis, and `reply` is its
    /// client's non-final `retrying` line (a frame of kind `REPLY_RETRYING`, same fields).
    pub retrying: bool,
}

/// Kind bytes, unique across every link (a frame read on the wrong link is an unknown kind).
/// They are part of the format Redis keeps (`Reply` and `Send` frames in the reply stream):
/// never renumber one.
mod kind {
    pub const REQUEST: u8 = 1;
    pub const CONNECT: u8 = 2;
    pub const CLOSE: u8 = 3;
    pub const FINISH: u8 = 4;
    pub const STOP: u8 = 5;
    pub const SEND: u8 = 10;
    pub const CLOSE_SESSION: u8 = 11;
    pub const TASK: u8 = 12;
    pub const COMMIT: u8 = 13;
    pub const STATS: u8 = 14;
    pub const GROUP: u8 = 15;
    pub const RUN_TASK: u8 = 20;
    pub const TASK_DONE: u8 = 21;
    pub const TASK_RETRY: u8 = 22;
    pub const STARTED: u8 = 30;
    pub const EXITED: u8 = 31;
    pub const FORK_FAILED: u8 = 32;
    pub const SLOT_READY: u8 = 33;
    pub const SHUTDOWN: u8 = 34;
    pub const SLOT_ACTIVE: u8 = 35;
    pub const QUERY_RESULT: u8 = 16;
    pub const STORE: u8 = 40;
    pub const STORE_END: u8 = 41;
    pub const STORED: u8 = 42;
    pub const REPLY: u8 = 43;
    pub const TRIM: u8 = 44;
    pub const KEEP_RESULT: u8 = 45;
    pub const RENEW_LEASE: u8 = 46;
    pub const LEASE: u8 = 47;
    pub const REPLY_RETRYING: u8 = 48;
    pub const QUEUE_DEPTHS: u8 = 80;
    pub const STORE_AT: u8 = 49;
    // Durable schedules and priorities (d-sched: 23, 24, 55-59).
    pub const STORE_PRIORITY: u8 = 55;
    pub const CLAIM_TICK: u8 = 56;
    pub const TICK_CLAIM: u8 = 57;
    // The dashboard's requests to the bridge (60-69 are the dashboard's).
    pub const ADMIN: u8 = 60;
    pub const ADMIN_ANSWER: u8 = 61;
    // Scheduling, priorities, deduplication and cancel (17-19, 23-29, 49-59 are theirs).
    pub const TASK_OPTIONS: u8 = 17;
    pub const BRIDGE_CANCELLED: u8 = 19;
    pub const STORE_KEY: u8 = 50;
    pub const WATCH_KEY: u8 = 51;
    pub const BRIDGE_CANCEL: u8 = 52;
    pub const DUPLICATE: u8 = 53;
    pub const KEY_ENDED: u8 = 54;
    pub const CANCEL: u8 = 18;
    // Redis misbehaving or written by others (redis-threats: 66-69).
    pub const NOT_STORED: u8 = 66;
    pub const ENTRY_READ: u8 = 23;
}

/// What a task's submitter asked for, carried by its `Task` and `Finish` frames.
pub mod task_flags {
    /// A finish carrying a group's outcomes.
    pub const GROUP: u8 = 1;
    /// The submitting worker registered a callback for this task.
    pub const CALLBACK: u8 = 2;
    /// A worker is blocked waiting for this task's result.
    pub const WAIT: u8 = 4;
    /// The task process already sent the session its reply, with the result.
    pub const REPLIED: u8 = 8;
}

/// Why bytes could not be decoded: the channel is corrupt from here on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooLarge(usize),
    UnknownKind(u8),
    Truncated(&'static str),
    BadField(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds {MAX_FRAME}"),
            DecodeError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            DecodeError::Truncated(what) => write!(f, "frame too short for its {what}"),
            DecodeError::BadField(what) => write!(f, "invalid {what} in frame"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Appends little-endian fields to a frame under construction.
struct Writer<'o> {
    out: &'o mut Vec<u8>,
    start: usize,
}

impl<'o> Writer<'o> {
    fn begin(out: &'o mut Vec<u8>, kind: u8) -> Self {
        let start = out.len();
        out.extend_from_slice(&[0; LEN_BYTES]);
        out.push(kind);
        Writer { out, start }
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Bytes whose length the reader cannot infer: prefixed with a u32 length.
    fn sized(&mut self, bytes: &[u8]) -> &mut Self {
        self.u32(bytes.len() as u32);
        self.out.extend_from_slice(bytes);
        self
    }
    /// The last field: runs to the end of the frame.
    fn rest(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }
    fn finish(&mut self) {
        let len = (self.out.len() - self.start - LEN_BYTES) as u32;
        self.out[self.start..self.start + LEN_BYTES].copy_from_slice(&len.to_le_bytes());
    }
}

/// Reads fields back in the order the writer put them.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(what)? as i32)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::BadField(what)),
        }
    }
    fn sized(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::BadField("trailing bytes"))
        }
    }
}

/// Decodes the first frame of `buf` with `body`, which reads the fields after the kind byte.
#[inline]
fn decode_frame<'a, T>(
    buf: &'a [u8],
    body: impl FnOnce(u8, &mut Reader<'a>) -> Result<T, DecodeError>,
) -> Result<Option<(T, usize)>, DecodeError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    let mut r = Reader { buf: &buf[LEN_BYTES..total] };
    let k = r.u8("kind")?;
    let msg = body(k, &mut r)?;
    r.end()?;
    Ok(Some((msg, total)))
}

impl<'a> ToWorker<'a> {
    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            ToWorker::Request { seq, session, data } => {
                Writer::begin(out, REQUEST).u64(seq).u64(session).rest(data).finish()
            }
            ToWorker::Connect { seq, session, peer } => {
                Writer::begin(out, CONNECT).u64(seq).u64(session).rest(peer).finish()
            }
            ToWorker::Close { seq, session } => Writer::begin(out, CLOSE).u64(seq).u64(session).finish(),
            ToWorker::Finish(Finish {
                seq,
                task_id,
                session,
                task_pid,
                attempts,
                ok,
                flags,
                context,
                result,
            }) => Writer::begin(out, FINISH)
                .u64(seq)
                .u64(task_id)
                .u64(session)
                .u32(task_pid)
                .u32(attempts)
                .u8(ok as u8)
                .u8(flags)
                .sized(context)
                .rest(result)
                .finish(),
            ToWorker::Stop => Writer::begin(out, STOP).finish(),
        }
    }

    /// Decodes the first frame of `buf`. `Ok(None)`: not all of it has arrived yet.
    /// On success, also returns how many bytes of `buf` the frame took.
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        use kind::*;
        decode_frame(buf, |k, r| {
            Ok(match k {
                REQUEST => {
                    ToWorker::Request { seq: r.u64("seq")?, session: r.u64("session")?, data: r.rest() }
                }
                CONNECT => {
                    ToWorker::Connect { seq: r.u64("seq")?, session: r.u64("session")?, peer: r.rest() }
                }
                CLOSE => ToWorker::Close { seq: r.u64("seq")?, session: r.u64("session")? },
                FINISH => ToWorker::Finish(Finish {
                    seq: r.u64("seq")?,
                    task_id: r.u64("task_id")?,
                    session: r.u64("session")?,
                    task_pid: r.u32("task_pid")?,
                    attempts: r.u32("attempts")?,
                    ok: r.bool("ok")?,
                    flags: r.u8("flags")?,
                    context: r.sized("context")?,
                    result: r.rest(),
                }),
                STOP => ToWorker::Stop,
                other => return Err(DecodeError::UnknownKind(other)),
            })
        })
    }
}

impl<'a> FromWorker<'a> {
    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            FromWorker::Client(ref c) => c.encode(out),
            FromWorker::Task { task_id, session, target, group, flags, context, data } => {
                Writer::begin(out, TASK)
                    .u64(task_id)
                    .u64(session)
                    .i32(target)
                    .u64(group)
                    .u8(flags)
                    .sized(context)
                    .rest(data)
                    .finish()
            }
            FromWorker::Group { group_id, session, size, timeout_ms, context } => Writer::begin(out, GROUP)
                .u64(group_id)
                .u64(session)
                .u32(size)
                .u64(timeout_ms)
                .rest(context)
                .finish(),
            FromWorker::TaskOptions { task_id, run_at_ms, priority, dedup_ttl_ms, key } => {
                Writer::begin(out, TASK_OPTIONS)
                    .u64(task_id)
                    .u64(run_at_ms)
                    .u8(priority)
                    .u64(dedup_ttl_ms)
                    .rest(key)
                    .finish()
            }
            FromWorker::Commit { seq } => Writer::begin(out, COMMIT).u64(seq).finish(),
        }
    }

    /// Decodes the first frame of `buf` (see [`ToWorker::decode`]).
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        use kind::*;
        decode_frame(buf, |k, r| {
            Ok(match k {
                TASK => FromWorker::Task {
                    task_id: r.u64("task_id")?,
                    session: r.u64("session")?,
                    target: r.i32("target")?,
                    group: r.u64("group")?,
                    flags: r.u8("flags")?,
                    context: r.sized("context")?,
                    data: r.rest(),
                },
                GROUP => FromWorker::Group {
                    group_id: r.u64("group_id")?,
                    session: r.u64("session")?,
                    size: r.u32("size")?,
                    timeout_ms: r.u64("timeout")?,
                    context: r.rest(),
                },
                TASK_OPTIONS => FromWorker::TaskOptions {
                    task_id: r.u64("task_id")?,
                    run_at_ms: r.u64("run_at_ms")?,
                    priority: r.u8("priority")?,
                    dedup_ttl_ms: r.u64("dedup_ttl_ms")?,
                    key: r.rest(),
                },
                COMMIT => FromWorker::Commit { seq: r.u64("seq")? },
                other => FromWorker::Client(ToClient::decode_body(other, r)?),
            })
        })
    }

    /// True for the frame that ends a worker's transaction.
    pub fn is_commit(&self) -> bool {
        matches!(self, FromWorker::Commit { .. })
    }
}

impl<'a> ToClient<'a> {
    /// Appends this frame, length prefix included, to `out`: the same bytes as the
    /// [`FromWorker::Client`] that holds it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            ToClient::Send { session, data } => Writer::begin(out, SEND).u64(session).rest(data).finish(),
            ToClient::CloseSession { session } => Writer::begin(out, CLOSE_SESSION).u64(session).finish(),
            ToClient::QueryResult { session, task_id } => {
                Writer::begin(out, QUERY_RESULT).u64(session).u64(task_id).finish()
            }
            ToClient::Stats { session } => Writer::begin(out, STATS).u64(session).finish(),
            ToClient::Cancel { session, task_id, token } => {
                Writer::begin(out, CANCEL).u64(session).u64(task_id).rest(token).finish()
            }
        }
    }

    /// Decodes the first frame of `buf` (see [`ToWorker::decode`]).
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        decode_frame(buf, Self::decode_body)
    }

    fn decode_body(k: u8, r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        use kind::*;
        Ok(match k {
            SEND => ToClient::Send { session: r.u64("session")?, data: r.rest() },
            CLOSE_SESSION => ToClient::CloseSession { session: r.u64("session")? },
            QUERY_RESULT => ToClient::QueryResult { session: r.u64("session")?, task_id: r.u64("task id")? },
            STATS => ToClient::Stats { session: r.u64("session")? },
            CANCEL => {
                ToClient::Cancel { session: r.u64("session")?, task_id: r.u64("task id")?, token: r.rest() }
            }
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }
}

impl<'a> ToTask<'a> {
    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            ToTask::RunTask { task_id, session, attempt, src_worker, data } => Writer::begin(out, RUN_TASK)
                .u64(task_id)
                .u64(session)
                .u32(attempt)
                .u32(src_worker)
                .rest(data)
                .finish(),
            ToTask::Stop => Writer::begin(out, STOP).finish(),
        }
    }

    /// Decodes the first frame of `buf` (see [`ToWorker::decode`]).
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        use kind::*;
        decode_frame(buf, |k, r| {
            Ok(match k {
                RUN_TASK => ToTask::RunTask {
                    task_id: r.u64("task_id")?,
                    session: r.u64("session")?,
                    attempt: r.u32("attempt")?,
                    src_worker: r.u32("src_worker")?,
                    data: r.rest(),
                },
                STOP => ToTask::Stop,
                other => return Err(DecodeError::UnknownKind(other)),
            })
        })
    }
}

impl<'a> FromTask<'a> {
    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            FromTask::Send { session, data } => Writer::begin(out, SEND).u64(session).rest(data).finish(),
            FromTask::TaskDone { task_id, ok, reply, result } => {
                Writer::begin(out, TASK_DONE).u64(task_id).u8(ok as u8).sized(reply).rest(result).finish()
            }
            FromTask::TaskRetry { task_id, not_yet, wait_ms, error } => Writer::begin(out, TASK_RETRY)
                .u64(task_id)
                .u8(not_yet as u8)
                .u64(wait_ms)
                .rest(error)
                .finish(),
        }
    }

    /// Decodes the first frame of `buf` (see [`ToWorker::decode`]).
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        use kind::*;
        decode_frame(buf, |k, r| {
            Ok(match k {
                SEND => FromTask::Send { session: r.u64("session")?, data: r.rest() },
                TASK_DONE => FromTask::TaskDone {
                    task_id: r.u64("task_id")?,
                    ok: r.bool("ok")?,
                    reply: r.sized("reply")?,
                    result: r.rest(),
                },
                TASK_RETRY => FromTask::TaskRetry {
                    task_id: r.u64("task_id")?,
                    not_yet: r.bool("not_yet")?,
                    wait_ms: r.u64("wait_ms")?,
                    error: r.rest(),
                },
                other => return Err(DecodeError::UnknownKind(other)),
            })
        })
    }
}

impl ToManager {
    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            ToManager::SlotReady { role, slot } => {
                Writer::begin(out, SLOT_READY).u8(role.code()).u32(slot).finish()
            }
            ToManager::Shutdown => Writer::begin(out, SHUTDOWN).finish(),
            ToManager::SlotActive { role, slot, active } => {
                Writer::begin(out, SLOT_ACTIVE).u8(role.code()).u32(slot).u8(active as u8).finish()
            }
        }
    }

    /// Decodes the first frame of `buf` (see [`ToWorker::decode`]).
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        use kind::*;
        decode_frame(buf, |k, r| {
            Ok(match k {
                SLOT_READY => {
                    ToManager::SlotReady { role: Role::from_code(r.u8("role")?)?, slot: r.u32("slot")? }
                }
                SHUTDOWN => ToManager::Shutdown,
                SLOT_ACTIVE => ToManager::SlotActive {
                    role: Role::from_code(r.u8("role")?)?,
                    slot: r.u32("slot")?,
                    active: r.bool("active")?,
                },
                other => return Err(DecodeError::UnknownKind(other)),
            })
        })
    }
}

impl<'a> FromManager<'a> {
    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            FromManager::Started { role, slot, pid } => {
                Writer::begin(out, STARTED).u8(role.code()).u32(slot).u32(pid).finish()
            }
            FromManager::Exited { role, slot, pid, reason, uptime_ms } => {
                let (how, value) = match reason {
                    ExitReason::Code(c) => (0u8, c),
                    ExitReason::Signal(s) => (1u8, s),
                };
                Writer::begin(out, EXITED)
                    .u8(role.code())
                    .u32(slot)
                    .u32(pid)
                    .u8(how)
                    .i32(value)
                    .u64(uptime_ms)
                    .finish()
            }
            FromManager::ForkFailed { role, slot, error } => {
                Writer::begin(out, FORK_FAILED).u8(role.code()).u32(slot).rest(error).finish()
            }
        }
    }

    /// Decodes the first frame of `buf` (see [`ToWorker::decode`]).
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        use kind::*;
        decode_frame(buf, |k, r| {
            Ok(match k {
                STARTED => FromManager::Started {
                    role: Role::from_code(r.u8("role")?)?,
                    slot: r.u32("slot")?,
                    pid: r.u32("pid")?,
                },
                EXITED => {
                    let role = Role::from_code(r.u8("role")?)?;
                    let slot = r.u32("slot")?;
                    let pid = r.u32("pid")?;
                    let reason = match r.u8("exit kind")? {
                        0 => ExitReason::Code(r.i32("exit code")?),
                        1 => ExitReason::Signal(r.i32("signal")?),
                        _ => return Err(DecodeError::BadField("exit kind")),
                    };
                    FromManager::Exited { role, slot, pid, reason, uptime_ms: r.u64("uptime")? }
                }
                FORK_FAILED => FromManager::ForkFailed {
                    role: Role::from_code(r.u8("role")?)?,
                    slot: r.u32("slot")?,
                    error: r.rest(),
                },
                other => return Err(DecodeError::UnknownKind(other)),
            })
        })
    }
}

impl<'a> ToBridge<'a> {
    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            ToBridge::Store { batch, task_id, session, worker, context, data } => Writer::begin(out, STORE)
                .u64(batch)
                .u64(task_id)
                .u64(session)
                .u32(worker)
                .sized(context)
                .rest(data)
                .finish(),
            ToBridge::StoreEnd { batch } => Writer::begin(out, STORE_END).u64(batch).finish(),
            ToBridge::StoreAt { task_id, run_at_ms } => {
                Writer::begin(out, STORE_AT).u64(task_id).u64(run_at_ms).finish()
            }
            ToBridge::Trim { entry } => Writer::begin(out, TRIM).rest(entry).finish(),
            ToBridge::KeepResult { task_id, line } => {
                Writer::begin(out, KEEP_RESULT).u64(task_id).rest(line).finish()
            }
            ToBridge::RenewLease => Writer::begin(out, RENEW_LEASE).finish(),
            ToBridge::Admin { request, op } => Writer::begin(out, ADMIN).u64(request).rest(op).finish(),
            ToBridge::StorePriority { task_id, priority } => {
                Writer::begin(out, STORE_PRIORITY).u64(task_id).u8(priority).finish()
            }
            ToBridge::ClaimTick { task_id, tick_ms, ttl_ms, name } => {
                Writer::begin(out, CLAIM_TICK).u64(task_id).u64(tick_ms).u64(ttl_ms).rest(name).finish()
            }
            ToBridge::StoreKey { task_id, dedup_ttl_ms, key } => {
                Writer::begin(out, STORE_KEY).u64(task_id).u64(dedup_ttl_ms).rest(key).finish()
            }
            ToBridge::WatchKey { task_id, digest, holder } => {
                Writer::begin(out, WATCH_KEY).u64(task_id).sized(digest).rest(holder).finish()
            }
            ToBridge::Cancel { task_id, stream } => {
                Writer::begin(out, BRIDGE_CANCEL).u64(task_id).rest(stream).finish()
            }
        }
    }

    /// Decodes the first frame of `buf` (see [`ToWorker::decode`]).
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        use kind::*;
        decode_frame(buf, |k, r| {
            Ok(match k {
                STORE => ToBridge::Store {
                    batch: r.u64("batch")?,
                    task_id: r.u64("task id")?,
                    session: r.u64("session")?,
                    worker: r.u32("worker")?,
                    context: r.sized("context")?,
                    data: r.rest(),
                },
                STORE_END => ToBridge::StoreEnd { batch: r.u64("batch")? },
                STORE_AT => ToBridge::StoreAt { task_id: r.u64("task id")?, run_at_ms: r.u64("run_at_ms")? },
                TRIM => ToBridge::Trim { entry: r.rest() },
                KEEP_RESULT => ToBridge::KeepResult { task_id: r.u64("task id")?, line: r.rest() },
                RENEW_LEASE => ToBridge::RenewLease,
                ADMIN => ToBridge::Admin { request: r.u64("request")?, op: r.rest() },
                STORE_PRIORITY => {
                    ToBridge::StorePriority { task_id: r.u64("task id")?, priority: r.u8("priority")? }
                }
                CLAIM_TICK => ToBridge::ClaimTick {
                    task_id: r.u64("task id")?,
                    tick_ms: r.u64("tick")?,
                    ttl_ms: r.u64("ttl")?,
                    name: r.rest(),
                },
                STORE_KEY => ToBridge::StoreKey {
                    task_id: r.u64("task id")?,
                    dedup_ttl_ms: r.u64("dedup_ttl_ms")?,
                    key: r.rest(),
                },
                WATCH_KEY => ToBridge::WatchKey {
                    task_id: r.u64("task id")?,
                    digest: r.sized("digest")?,
                    holder: r.rest(),
                },
                BRIDGE_CANCEL => ToBridge::Cancel { task_id: r.u64("task id")?, stream: r.rest() },
                other => return Err(DecodeError::UnknownKind(other)),
            })
        })
    }
}

impl<'a> Reply<'a> {
    /// Its fields after the kind byte. The fixed ones are checked for at once and read from
    /// where they are (a reply is decoded once or twice per durable job in the master, and in
    /// the bridge: a check and a move per field were most of it); when they are not all there,
    /// one by one, so that the error names the first missing one as it always did.
    fn read(retrying: bool, r: &mut Reader<'a>) -> Result<Reply<'a>, DecodeError> {
        const FIXED: usize = 8 + 1 + 4 + 4 + 4;
        let Some((head, rest)) = r.buf.split_first_chunk::<FIXED>() else {
            return Ok(Reply {
                retrying,
                task_id: r.u64("task id")?,
                ok: r.bool("ok")?,
                attempts: r.u32("attempts")?,
                task_pid: r.u32("task pid")?,
                replays: r.u32("replays")?,
                entry: r.sized("entry")?,
                reply: r.sized("reply")?,
                sends: r.sized("sends")?,
                result: r.rest(),
            });
        };
        let u32_at = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let ok = match head[8] {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::BadField("ok")),
        };
        let (task_id, attempts, task_pid, replays) =
            (u64::from_le_bytes(head[..8].try_into().unwrap_or_default()), u32_at(9), u32_at(13), u32_at(17));
        r.buf = rest;
        Ok(Reply {
            retrying,
            task_id,
            ok,
            attempts,
            task_pid,
            replays,
            entry: r.sized("entry")?,
            reply: r.sized("reply")?,
            sends: r.sized("sends")?,
            result: r.rest(),
        })
    }

    /// Appends this outcome as a [`FromBridge::Reply`] frame, length prefix included.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let Reply { task_id, ok, attempts, task_pid, replays, entry, reply, sends, result, retrying } = *self;
        Writer::begin(out, if retrying { kind::REPLY_RETRYING } else { kind::REPLY })
            .u64(task_id)
            .u8(ok as u8)
            .u32(attempts)
            .u32(task_pid)
            .u32(replays)
            .sized(entry)
            .sized(reply)
            .sized(sends)
            .rest(result)
            .finish()
    }
}

impl<'a> FromBridge<'a> {
    /// [`FromBridge::Stored`]'s `replicas` when every replica asked for confirmed (or none was).
    pub const ALL_REPLICAS: u32 = u32::MAX;

    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            FromBridge::Stored { batch, replicas, error } => {
                Writer::begin(out, STORED).u64(batch).u32(replicas).rest(error).finish()
            }
            FromBridge::Reply(ref reply) => reply.encode(out),
            FromBridge::Lease { holder } => Writer::begin(out, LEASE).rest(holder).finish(),
            FromBridge::Depths { json } => Writer::begin(out, QUEUE_DEPTHS).rest(json).finish(),
            FromBridge::AdminAnswer { request, answer } => {
                Writer::begin(out, ADMIN_ANSWER).u64(request).rest(answer).finish()
            }
            FromBridge::TickClaim { task_id, tick_ms, won, name, holder } => Writer::begin(out, TICK_CLAIM)
                .u64(task_id)
                .u64(tick_ms)
                .u8(won as u8)
                .sized(name)
                .rest(holder)
                .finish(),
            FromBridge::Duplicate { task_id, first, digest, holder, line } => Writer::begin(out, DUPLICATE)
                .u64(task_id)
                .u64(first)
                .sized(digest)
                .sized(holder)
                .rest(line)
                .finish(),
            FromBridge::KeyEnded { task_id, line } => {
                Writer::begin(out, KEY_ENDED).u64(task_id).rest(line).finish()
            }
            FromBridge::Cancelled { task_id, cancelled, why } => {
                Writer::begin(out, BRIDGE_CANCELLED).u64(task_id).u8(cancelled as u8).rest(why).finish()
            }
            FromBridge::NotStored { task_id, why } => {
                Writer::begin(out, NOT_STORED).u64(task_id).rest(why).finish()
            }
            FromBridge::EntryRead { entry } => Writer::begin(out, ENTRY_READ).rest(entry).finish(),
        }
    }

    /// Decodes the first frame of `buf` (see [`ToWorker::decode`]).
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        use kind::*;
        decode_frame(buf, |k, r| {
            Ok(match k {
                STORED => FromBridge::Stored {
                    batch: r.u64("batch")?,
                    replicas: r.u32("replicas")?,
                    error: r.rest(),
                },
                REPLY | REPLY_RETRYING => FromBridge::Reply(Reply::read(k == REPLY_RETRYING, r)?),
                LEASE => FromBridge::Lease { holder: r.rest() },
                QUEUE_DEPTHS => FromBridge::Depths { json: r.rest() },
                ADMIN_ANSWER => FromBridge::AdminAnswer { request: r.u64("request")?, answer: r.rest() },
                TICK_CLAIM => FromBridge::TickClaim {
                    task_id: r.u64("task id")?,
                    tick_ms: r.u64("tick")?,
                    won: r.bool("won")?,
                    name: r.sized("name")?,
                    holder: r.rest(),
                },
                DUPLICATE => FromBridge::Duplicate {
                    task_id: r.u64("task id")?,
                    first: r.u64("first")?,
                    digest: r.sized("digest")?,
                    holder: r.sized("holder")?,
                    line: r.rest(),
                },
                KEY_ENDED => FromBridge::KeyEnded { task_id: r.u64("task id")?, line: r.rest() },
                BRIDGE_CANCELLED => FromBridge::Cancelled {
                    task_id: r.u64("task id")?,
                    cancelled: r.bool("cancelled")?,
                    why: r.rest(),
                },
                NOT_STORED => FromBridge::NotStored { task_id: r.u64("task id")?, why: r.rest() },
                ENTRY_READ => FromBridge::EntryRead { entry: r.rest() },
                other => return Err(DecodeError::UnknownKind(other)),
            })
        })
    }
}

/// Length of the first complete frame in `buf`, prefix included; `None` if incomplete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < LEN_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::TooLarge(len));
    }
    if len == 0 {
        return Err(DecodeError::Truncated("kind"));
    }
    let total = LEN_BYTES + len;
    Ok(if buf.len() >= total { Some(total) } else { None })
}

/// The kind byte of a complete frame (see [`frame_len`]), to find commits without decoding.
pub fn frame_kind(frame: &[u8]) -> u8 {
    frame[LEN_BYTES]
}

/// Appends one group member's outcome to a group's combined result.
pub fn encode_outcome(ok: bool, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(ok as u8);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Splits a group's combined result back into its members' outcomes, in order.
pub fn decode_outcomes(mut buf: &[u8]) -> Result<Vec<(bool, &[u8])>, DecodeError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let mut r = Reader { buf };
        let ok = r.bool("outcome")?;
        let bytes = r.sized("outcome")?;
        out.push((ok, bytes));
        buf = r.buf;
    }
    Ok(out)
}

/// The kind byte of a commit frame.
pub const COMMIT_KIND: u8 = kind::COMMIT;

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<M: Message>(msg: M::Of<'_>) {
        let mut buf = Vec::new();
        M::encode(&msg, &mut buf);
        let (back, used) = M::decode(&buf).unwrap().unwrap();
        // Compared as printed: the two borrow from different buffers.
        assert_eq!(format!("{back:?}"), format!("{msg:?}"));
        assert_eq!(used, buf.len());
        // Every strict prefix is "need more bytes", never an error or a wrong frame.
        for cut in 0..buf.len() {
            assert!(matches!(M::decode(&buf[..cut]), Ok(None)), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn master_worker_link_roundtrips() {
        roundtrip::<ToWorker>(ToWorker::Request { seq: 7, session: 1 << 40, data: b"alice@example.com" });
        roundtrip::<ToWorker>(ToWorker::Connect { seq: 1, session: 2, peer: b"127.0.0.1:5000" });
        roundtrip::<ToWorker>(ToWorker::Close { seq: 3, session: 4 });
        roundtrip::<ToWorker>(ToWorker::Finish(Finish {
            seq: 9,
            task_id: 10,
            session: 11,
            task_pid: 1234,
            attempts: 2,
            ok: false,
            flags: task_flags::GROUP,
            context: b"{\"to\":\"x\"}",
            result: b"task process 1234 killed by signal 9",
        }));
        roundtrip::<ToWorker>(ToWorker::Stop);
        roundtrip::<FromWorker>(FromWorker::Client(ToClient::Send {
            session: 5,
            data: b"{\"event\":\"done\"}\n",
        }));
        roundtrip::<FromWorker>(FromWorker::Client(ToClient::CloseSession { session: 5 }));
        roundtrip::<FromWorker>(FromWorker::Client(ToClient::Stats { session: 8 }));
        roundtrip::<FromWorker>(FromWorker::Client(ToClient::QueryResult { session: 3, task_id: 1 << 33 }));
        roundtrip::<FromWorker>(FromWorker::Task {
            task_id: 1,
            session: 0,
            target: 2,
            group: 0,
            flags: task_flags::WAIT,
            context: b"",
            data: b"{}",
        });
        roundtrip::<FromWorker>(FromWorker::Group {
            group_id: 4,
            session: 5,
            size: 3,
            timeout_ms: 2000,
            context: b"ctx",
        });
        roundtrip::<FromWorker>(FromWorker::Commit { seq: u64::MAX });
        roundtrip::<FromWorker>(FromWorker::TaskOptions {
            task_id: 6,
            run_at_ms: 1_798_099_200_000,
            priority: 2,
            dedup_ttl_ms: 60_000,
            key: b"order-42:receipt",
        });
        roundtrip::<FromWorker>(FromWorker::Client(ToClient::Cancel { session: 3, task_id: 9, token: b"" }));
        roundtrip::<FromWorker>(FromWorker::Client(ToClient::Cancel {
            session: 3,
            task_id: 9,
            token: b"00ff",
        }));
        roundtrip::<ToClient>(ToClient::Send { session: 5, data: b"x" });
        roundtrip::<ToClient>(ToClient::CloseSession { session: 5 });
        roundtrip::<ToClient>(ToClient::QueryResult { session: 3, task_id: 1 << 33 });
        roundtrip::<ToClient>(ToClient::Stats { session: 8 });
    }

    #[test]
    fn master_task_link_roundtrips() {
        roundtrip::<ToTask>(ToTask::RunTask {
            task_id: 1,
            session: 2,
            attempt: 1,
            src_worker: 3,
            data: b"x",
        });
        roundtrip::<ToTask>(ToTask::Stop);
        roundtrip::<FromTask>(FromTask::Send { session: 5, data: b"progress\n" });
        roundtrip::<FromTask>(FromTask::TaskDone { task_id: 1, ok: true, reply: b"", result: b"" });
        roundtrip::<FromTask>(FromTask::TaskRetry {
            task_id: 9,
            not_yet: false,
            wait_ms: 1500,
            error: b"421 busy",
        });
        roundtrip::<FromTask>(FromTask::TaskRetry {
            task_id: 9,
            not_yet: true,
            wait_ms: FromTask::NO_WAIT,
            error: b"",
        });
        roundtrip::<FromTask>(FromTask::TaskDone {
            task_id: 1,
            ok: true,
            reply: b"{\"event\":\"done\"}\n",
            result: b"x",
        });
    }

    #[test]
    fn master_manager_link_roundtrips() {
        roundtrip::<ToManager>(ToManager::SlotReady { role: Role::Task, slot: 2 });
        roundtrip::<ToManager>(ToManager::SlotActive { role: Role::Task, slot: 3, active: false });
        roundtrip::<ToManager>(ToManager::Shutdown);
        roundtrip::<FromManager>(FromManager::Started { role: Role::Task, slot: 3, pid: 99 });
        roundtrip::<FromManager>(FromManager::Exited {
            role: Role::Worker,
            slot: 0,
            pid: 42,
            reason: ExitReason::Signal(9),
            uptime_ms: 1500,
        });
        roundtrip::<FromManager>(FromManager::Exited {
            role: Role::Task,
            slot: 1,
            pid: 43,
            reason: ExitReason::Code(-1),
            uptime_ms: 0,
        });
        roundtrip::<FromManager>(FromManager::ForkFailed { role: Role::Worker, slot: 1, error: b"EAGAIN" });
    }

    #[test]
    fn master_bridge_link_roundtrips() {
        roundtrip::<ToBridge>(ToBridge::Store {
            batch: 2,
            task_id: 5,
            session: 6,
            worker: 1,
            context: b"ctx",
            data: b"{}",
        });
        roundtrip::<ToBridge>(ToBridge::StoreEnd { batch: 2 });
        roundtrip::<ToBridge>(ToBridge::StoreAt { task_id: 7, run_at_ms: 1_798_099_200_000 });
        roundtrip::<ToBridge>(ToBridge::Trim { entry: b"1-1" });
        roundtrip::<ToBridge>(ToBridge::KeepResult { task_id: 9, line: b"{}\n" });
        roundtrip::<ToBridge>(ToBridge::RenewLease);
        roundtrip::<ToBridge>(ToBridge::Admin { request: 7, op: br#"{"op":"overview"}"# });
        roundtrip::<ToBridge>(ToBridge::StorePriority { task_id: 7, priority: 2 });
        roundtrip::<ToBridge>(ToBridge::ClaimTick {
            task_id: 7,
            tick_ms: 1_798_099_200_000,
            ttl_ms: 60_000,
            name: b"nightly",
        });
        roundtrip::<FromBridge>(FromBridge::TickClaim {
            task_id: 7,
            tick_ms: 1_798_099_200_000,
            won: false,
            name: b"nightly",
            holder: b"web-2",
        });
        roundtrip::<FromBridge>(FromBridge::Stored {
            batch: 2,
            replicas: FromBridge::ALL_REPLICAS,
            error: b"",
        });
        roundtrip::<FromBridge>(FromBridge::Stored { batch: 3, replicas: 0, error: b"Redis is down" });
        roundtrip::<FromBridge>(FromBridge::Reply(Reply {
            task_id: 5,
            ok: true,
            attempts: 2,
            task_pid: 77,
            replays: 1,
            entry: b"1700000000000-0",
            reply: b"{\"event\":\"done\"}\n",
            sends: b"",
            result: b"sent",
            retrying: false,
        }));
        roundtrip::<FromBridge>(FromBridge::Reply(Reply {
            task_id: 5,
            ok: false,
            attempts: 1,
            task_pid: 77,
            replays: 0,
            entry: b"1700000000000-1",
            reply: b"{\"event\":\"retrying\"}\n",
            sends: b"",
            result: b"421 try later",
            retrying: true,
        }));
        roundtrip::<FromBridge>(FromBridge::Lease { holder: b"" });
        roundtrip::<FromBridge>(FromBridge::Lease { holder: b"host:42" });
        roundtrip::<FromBridge>(FromBridge::AdminAnswer { request: 7, answer: b"{}" });
        roundtrip::<ToBridge>(ToBridge::StoreKey { task_id: 7, dedup_ttl_ms: 60_000, key: b"order-42" });
        roundtrip::<ToBridge>(ToBridge::WatchKey { task_id: 8, digest: b"ab12", holder: b"h 0 web-1 7" });
        roundtrip::<ToBridge>(ToBridge::Cancel { task_id: 7, stream: b"{taskd}:jobs" });
        roundtrip::<FromBridge>(FromBridge::Duplicate {
            task_id: 8,
            first: 7,
            digest: b"ab12",
            holder: b"h 0 web-1 7",
            line: b"",
        });
        roundtrip::<FromBridge>(FromBridge::KeyEnded { task_id: 8, line: b"{}\n" });
        roundtrip::<FromBridge>(FromBridge::Cancelled { task_id: 7, cancelled: false, why: b"running" });
        roundtrip::<FromBridge>(FromBridge::NotStored { task_id: 7, why: b"{q}:jobs#low is a string" });
        roundtrip::<FromBridge>(FromBridge::EntryRead { entry: b"1700000000000-3" });
    }

    #[test]
    fn the_wire_format_is_unchanged() {
        // Redis keeps `Reply` frames, and the `Send` frames inside them, across restarts and
        // upgrades: their bytes are fixed.
        let mut buf = Vec::new();
        FromTask::Send { session: 0x0102, data: b"hi" }.encode(&mut buf);
        assert_eq!(buf, [11, 0, 0, 0, 10, 2, 1, 0, 0, 0, 0, 0, 0, b'h', b'i']);
        // A worker's output for a client is the same frame, whichever type wrote it.
        let mut again = Vec::new();
        ToClient::Send { session: 0x0102, data: b"hi" }.encode(&mut again);
        assert_eq!(again, buf);
        let mut reply = Vec::new();
        FromBridge::Reply(Reply {
            task_id: 1,
            ok: true,
            attempts: 1,
            task_pid: 2,
            replays: 0,
            entry: b"",
            reply: b"",
            sends: &buf,
            result: b"r",
            retrying: false,
        })
        .encode(&mut reply);
        assert_eq!(reply[4], 43);
        assert_eq!(reply.len(), 4 + 1 + 8 + 1 + 4 + 4 + 4 + 4 + 4 + 4 + buf.len() + 1);
    }

    #[test]
    fn a_frame_of_another_link_is_corrupt() {
        let mut buf = Vec::new();
        FromTask::TaskDone { task_id: 1, ok: true, reply: b"", result: b"" }.encode(&mut buf);
        let done = kind::TASK_DONE;
        assert_eq!(ToWorker::decode(&buf), Err(DecodeError::UnknownKind(done)));
        assert_eq!(FromWorker::decode(&buf), Err(DecodeError::UnknownKind(done)));
        assert_eq!(ToClient::decode(&buf), Err(DecodeError::UnknownKind(done)));
        assert_eq!(ToTask::decode(&buf), Err(DecodeError::UnknownKind(done)));
        assert_eq!(ToManager::decode(&buf), Err(DecodeError::UnknownKind(done)));
        assert_eq!(FromManager::decode(&buf), Err(DecodeError::UnknownKind(done)));
        assert_eq!(ToBridge::decode(&buf), Err(DecodeError::UnknownKind(done)));
        assert_eq!(FromBridge::decode(&buf), Err(DecodeError::UnknownKind(done)));
        // A worker's commit is no output for a client.
        buf.clear();
        FromWorker::Commit { seq: 1 }.encode(&mut buf);
        assert_eq!(ToClient::decode(&buf), Err(DecodeError::UnknownKind(kind::COMMIT)));
    }

    #[test]
    fn several_frames_in_one_buffer_decode_in_order() {
        let mut buf = Vec::new();
        ToClient::Send { session: 1, data: b"a" }.encode(&mut buf);
        FromWorker::Commit { seq: 1 }.encode(&mut buf);
        let (first, n) = FromWorker::decode(&buf).unwrap().unwrap();
        assert_eq!(first, FromWorker::Client(ToClient::Send { session: 1, data: b"a" }));
        let (second, m) = FromWorker::decode(&buf[n..]).unwrap().unwrap();
        assert!(second.is_commit());
        assert_eq!(frame_kind(&buf[n..n + m]), COMMIT_KIND);
    }

    #[test]
    fn corrupt_frames_are_errors() {
        assert_eq!(ToWorker::decode(&[0, 0, 0, 0]), Err(DecodeError::Truncated("kind")));
        assert_eq!(ToWorker::decode(&[1, 0, 0, 0, 200]), Err(DecodeError::UnknownKind(200)));
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(FromTask::decode(&huge), Err(DecodeError::TooLarge(_))));
        // A commit whose seq is cut short.
        assert_eq!(FromWorker::decode(&[3, 0, 0, 0, kind::COMMIT, 1, 2]), Err(DecodeError::Truncated("seq")));
        // Bytes after the last field.
        assert_eq!(
            ToTask::decode(&[2, 0, 0, 0, kind::STOP, 0]),
            Err(DecodeError::BadField("trailing bytes"))
        );
        // A bool that is neither 0 nor 1.
        let mut buf = Vec::new();
        FromTask::TaskDone { task_id: 1, ok: true, reply: b"", result: b"" }.encode(&mut buf);
        buf[4 + 1 + 8] = 7;
        assert_eq!(FromTask::decode(&buf), Err(DecodeError::BadField("ok")));
    }

    #[test]
    fn group_outcomes_roundtrip() {
        let mut buf = Vec::new();
        encode_outcome(true, b"sent", &mut buf);
        encode_outcome(false, b"timed out", &mut buf);
        encode_outcome(true, b"", &mut buf);
        let back = decode_outcomes(&buf).unwrap();
        assert_eq!(back, vec![(true, &b"sent"[..]), (false, &b"timed out"[..]), (true, &b""[..])]);
        assert!(decode_outcomes(&buf[..buf.len() - 1]).is_err());
        assert!(decode_outcomes(&buf[..3]).is_err());
        assert_eq!(decode_outcomes(b"").unwrap(), vec![]);
    }

    #[test]
    fn a_reply_cut_short_or_with_a_bad_field_names_it_as_before() {
        let reply = Reply {
            task_id: u64::MAX - 1,
            ok: true,
            attempts: 3,
            task_pid: u32::MAX,
            replays: 2,
            entry: b"1-1",
            reply: b"",
            sends: b"s",
            result: b"r",
            retrying: false,
        };
        let mut frame = Vec::new();
        reply.encode(&mut frame);
        // The fields after the length and the kind, cut at every length, in a frame of its own.
        let body = &frame[LEN_BYTES + 1..];
        let fixed = 8 + 1 + 4 + 4 + 4;
        let cut_at = |n: usize| {
            let mut f = Vec::new();
            f.extend_from_slice(&(n as u32 + 1).to_le_bytes());
            f.push(frame[LEN_BYTES]);
            f.extend_from_slice(&body[..n]);
            FromBridge::decode(&f).map(|d| d.map(|(m, _)| format!("{m:?}")))
        };
        for (from, to, field) in
            [(0, 8, "task id"), (8, 9, "ok"), (9, 13, "attempts"), (13, 17, "task pid"), (17, 21, "replays")]
        {
            for cut in from..to {
                assert!(
                    matches!(cut_at(cut), Err(DecodeError::Truncated(f)) if f == field),
                    "{cut}: {:?}",
                    cut_at(cut)
                );
            }
        }
        assert!(matches!(cut_at(fixed), Err(DecodeError::Truncated("entry"))), "{:?}", cut_at(fixed));
        assert!(matches!(cut_at(fixed + 2), Err(DecodeError::Truncated("entry"))));
        let (whole, _) = FromBridge::decode(&frame).unwrap().unwrap();
        assert_eq!(format!("{whole:?}"), format!("{:?}", FromBridge::Reply(reply)));
        frame[LEN_BYTES + 1 + 8] = 2;
        assert!(matches!(FromBridge::decode(&frame), Err(DecodeError::BadField("ok"))));
    }

    #[test]
    fn exit_reasons_read_like_the_log() {
        assert_eq!(ExitReason::Signal(9).to_string(), "killed by signal 9 (SIGKILL)");
        assert_eq!(ExitReason::Code(3).to_string(), "exited with status 3");
        assert!(ExitReason::Code(0).is_clean());
    }
}
