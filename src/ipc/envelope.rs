//! The binary envelope every IPC message travels in.
//!
//! A frame is `[u32 len][u8 kind][fixed header][variable bytes]`, little endian, where `len`
//! counts everything after itself. Payloads (request lines, task JSON, replies) are opaque
//! bytes: the master routes frames by their fixed header and never parses the JSON inside.
//! Decoding borrows from the read buffer, so routing a frame copies nothing.

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

/// One message between two taskd processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    // master -> worker: deliveries, each numbered per slot so the worker can commit them.
    /// One request line from a client session.
    Request {
        seq: u64,
        session: u64,
        data: &'a [u8],
    },
    /// A client connected (dispatch mode 2 only, so it is ordered with the requests).
    Connect {
        seq: u64,
        session: u64,
        peer: &'a [u8],
    },
    /// A client's connection is gone.
    Close {
        seq: u64,
        session: u64,
    },
    /// A task this slot submitted has finished (or failed for good).
    Finish {
        seq: u64,
        task_id: u64,
        session: u64,
        task_pid: u32,
        attempts: u32,
        ok: bool,
        /// [`task_flags`]: `GROUP` when `result` holds the outcomes of a group's members
        /// ([`decode_outcomes`]), and the flags the task was submitted with. A finish of a
        /// `WAIT` task is no delivery: its `seq` is 0 and it is never replayed.
        flags: u8,
        context: &'a [u8],
        result: &'a [u8],
    },
    /// Exit cleanly after what is before this in the channel (reload, shutdown).
    Stop,

    // worker or task process -> master.
    /// Bytes for a client session; the master writes them if the session still exists.
    Send {
        session: u64,
        data: &'a [u8],
    },
    /// Close a client session after its pending output is written.
    CloseSession {
        session: u64,
    },
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
    /// A group of tasks whose outcomes are delivered together, as one finish of `group_id`;
    /// its `size` member tasks follow. `timeout_ms` (0: none) bounds the wait for them.
    Group {
        group_id: u64,
        session: u64,
        size: u32,
        timeout_ms: u64,
        context: &'a [u8],
    },
    /// Every delivery up to and including `seq` has been handled; frames before this one
    /// are the complete output of that handling.
    Commit {
        seq: u64,
    },
    /// Write the server's statistics to this session as one JSON line.
    Stats {
        session: u64,
    },

    // master <-> task process.
    RunTask {
        task_id: u64,
        session: u64,
        attempt: u32,
        src_worker: u32,
        data: &'a [u8],
    },
    /// A task's outcome; `reply` (may be empty) goes to its session together with it.
    TaskDone {
        task_id: u64,
        ok: bool,
        reply: &'a [u8],
        result: &'a [u8],
    },

    // manager <-> master.
    Started {
        role: Role,
        slot: u32,
        pid: u32,
    },
    Exited {
        role: Role,
        slot: u32,
        pid: u32,
        reason: ExitReason,
        uptime_ms: u64,
    },
    ForkFailed {
        role: Role,
        slot: u32,
        error: &'a [u8],
    },
    /// The master has cleaned the slot's channel: the manager may fork its next process.
    SlotReady {
        role: Role,
        slot: u32,
    },
    /// Stop the pool and exit.
    Shutdown,
    /// Grow (`active`) or shrink the pool by this slot (SIGTTIN / SIGTTOU to the master): an
    /// inactive slot's process is not replaced when it exits.
    SlotActive {
        role: Role,
        slot: u32,
        active: bool,
    },

    // worker -> master.
    /// Write what is known of task `task_id` to this session: its final reply, or that it is
    /// still running, or that it is unknown.
    QueryResult {
        session: u64,
        task_id: u64,
    },

    // master <-> Redis bridge (durable jobs only).
    /// Put this job in the stream; part of store batch `batch`.
    Store {
        batch: u64,
        task_id: u64,
        session: u64,
        worker: u32,
        context: &'a [u8],
        data: &'a [u8],
    },
    /// Batch `batch` is complete: acknowledge it once all its jobs are stored.
    StoreEnd {
        batch: u64,
    },
    /// Every batch up to `batch` is stored (`error` empty), or could not be (the reason).
    Stored {
        batch: u64,
        error: &'a [u8],
    },
    /// A job's outcome, read from this node's reply stream (entry `entry`). `sends` holds the
    /// `Send` frames its task process wrote for sessions, encoded.
    Reply {
        task_id: u64,
        ok: bool,
        attempts: u32,
        task_pid: u32,
        /// How many times an operator replayed it from the dead-letter stream.
        replays: u32,
        entry: &'a [u8],
        reply: &'a [u8],
        sends: &'a [u8],
        result: &'a [u8],
    },
    /// The reply stream entry has been acted on: delete it.
    Trim {
        entry: &'a [u8],
    },
    /// Keep this final reply in Redis: its client is gone, and may come back to ask for it.
    KeepResult {
        task_id: u64,
        line: &'a [u8],
    },
    /// The master is alive: renew the node's lease on its name (sent by the master itself, so
    /// that a master that hangs lets its name go).
    RenewLease,
    /// The outcome of a renewal: empty `holder`, the name is still this node's; otherwise the
    /// run that holds it now, and this node must stop.
    Lease {
        holder: &'a [u8],
    },
}

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

impl<'a> Frame<'a> {
    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use kind::*;
        match *self {
            Frame::Request { seq, session, data } => {
                Writer::begin(out, REQUEST).u64(seq).u64(session).rest(data).finish()
            }
            Frame::Connect { seq, session, peer } => {
                Writer::begin(out, CONNECT).u64(seq).u64(session).rest(peer).finish()
            }
            Frame::Close { seq, session } => Writer::begin(out, CLOSE).u64(seq).u64(session).finish(),
            Frame::Finish { seq, task_id, session, task_pid, attempts, ok, flags, context, result } => {
                Writer::begin(out, FINISH)
                    .u64(seq)
                    .u64(task_id)
                    .u64(session)
                    .u32(task_pid)
                    .u32(attempts)
                    .u8(ok as u8)
                    .u8(flags)
                    .sized(context)
                    .rest(result)
                    .finish()
            }
            Frame::Stop => Writer::begin(out, STOP).finish(),
            Frame::Send { session, data } => Writer::begin(out, SEND).u64(session).rest(data).finish(),
            Frame::CloseSession { session } => Writer::begin(out, CLOSE_SESSION).u64(session).finish(),
            Frame::Task { task_id, session, target, group, flags, context, data } => Writer::begin(out, TASK)
                .u64(task_id)
                .u64(session)
                .i32(target)
                .u64(group)
                .u8(flags)
                .sized(context)
                .rest(data)
                .finish(),
            Frame::Group { group_id, session, size, timeout_ms, context } => Writer::begin(out, GROUP)
                .u64(group_id)
                .u64(session)
                .u32(size)
                .u64(timeout_ms)
                .rest(context)
                .finish(),
            Frame::Commit { seq } => Writer::begin(out, COMMIT).u64(seq).finish(),
            Frame::Stats { session } => Writer::begin(out, STATS).u64(session).finish(),
            Frame::RunTask { task_id, session, attempt, src_worker, data } => Writer::begin(out, RUN_TASK)
                .u64(task_id)
                .u64(session)
                .u32(attempt)
                .u32(src_worker)
                .rest(data)
                .finish(),
            Frame::TaskDone { task_id, ok, reply, result } => {
                Writer::begin(out, TASK_DONE).u64(task_id).u8(ok as u8).sized(reply).rest(result).finish()
            }
            Frame::Started { role, slot, pid } => {
                Writer::begin(out, STARTED).u8(role.code()).u32(slot).u32(pid).finish()
            }
            Frame::Exited { role, slot, pid, reason, uptime_ms } => {
                let (how, value) = match reason {
                    ExitReason::Code(c) => (0, c),
                    ExitReason::Signal(s) => (1, s),
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
            Frame::ForkFailed { role, slot, error } => {
                Writer::begin(out, FORK_FAILED).u8(role.code()).u32(slot).rest(error).finish()
            }
            Frame::SlotReady { role, slot } => {
                Writer::begin(out, SLOT_READY).u8(role.code()).u32(slot).finish()
            }
            Frame::Shutdown => Writer::begin(out, SHUTDOWN).finish(),
            Frame::SlotActive { role, slot, active } => {
                Writer::begin(out, SLOT_ACTIVE).u8(role.code()).u32(slot).u8(active as u8).finish()
            }
            Frame::QueryResult { session, task_id } => {
                Writer::begin(out, QUERY_RESULT).u64(session).u64(task_id).finish()
            }
            Frame::Store { batch, task_id, session, worker, context, data } => Writer::begin(out, STORE)
                .u64(batch)
                .u64(task_id)
                .u64(session)
                .u32(worker)
                .sized(context)
                .rest(data)
                .finish(),
            Frame::StoreEnd { batch } => Writer::begin(out, STORE_END).u64(batch).finish(),
            Frame::Stored { batch, error } => Writer::begin(out, STORED).u64(batch).rest(error).finish(),
            Frame::Reply { task_id, ok, attempts, task_pid, replays, entry, reply, sends, result } => {
                Writer::begin(out, REPLY)
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
            Frame::Trim { entry } => Writer::begin(out, TRIM).rest(entry).finish(),
            Frame::KeepResult { task_id, line } => {
                Writer::begin(out, KEEP_RESULT).u64(task_id).rest(line).finish()
            }
            Frame::RenewLease => Writer::begin(out, RENEW_LEASE).finish(),
            Frame::Lease { holder } => Writer::begin(out, LEASE).rest(holder).finish(),
        }
    }

    /// Decodes the first frame of `buf`. `Ok(None)`: not all of it has arrived yet.
    /// On success, also returns how many bytes of `buf` the frame took.
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>, DecodeError> {
        let Some(total) = frame_len(buf)? else {
            return Ok(None);
        };
        let body = &buf[LEN_BYTES..total];
        Ok(Some((Self::decode_body(body)?, total)))
    }

    fn decode_body(body: &'a [u8]) -> Result<Frame<'a>, DecodeError> {
        use kind::*;
        let mut r = Reader { buf: body };
        let k = r.u8("kind")?;
        let frame = match k {
            REQUEST => Frame::Request { seq: r.u64("seq")?, session: r.u64("session")?, data: r.rest() },
            CONNECT => Frame::Connect { seq: r.u64("seq")?, session: r.u64("session")?, peer: r.rest() },
            CLOSE => Frame::Close { seq: r.u64("seq")?, session: r.u64("session")? },
            FINISH => Frame::Finish {
                seq: r.u64("seq")?,
                task_id: r.u64("task_id")?,
                session: r.u64("session")?,
                task_pid: r.u32("task_pid")?,
                attempts: r.u32("attempts")?,
                ok: r.bool("ok")?,
                flags: r.u8("flags")?,
                context: r.sized("context")?,
                result: r.rest(),
            },
            STOP => Frame::Stop,
            SEND => Frame::Send { session: r.u64("session")?, data: r.rest() },
            CLOSE_SESSION => Frame::CloseSession { session: r.u64("session")? },
            TASK => Frame::Task {
                task_id: r.u64("task_id")?,
                session: r.u64("session")?,
                target: r.i32("target")?,
                group: r.u64("group")?,
                flags: r.u8("flags")?,
                context: r.sized("context")?,
                data: r.rest(),
            },
            GROUP => Frame::Group {
                group_id: r.u64("group_id")?,
                session: r.u64("session")?,
                size: r.u32("size")?,
                timeout_ms: r.u64("timeout")?,
                context: r.rest(),
            },
            COMMIT => Frame::Commit { seq: r.u64("seq")? },
            STATS => Frame::Stats { session: r.u64("session")? },
            RUN_TASK => Frame::RunTask {
                task_id: r.u64("task_id")?,
                session: r.u64("session")?,
                attempt: r.u32("attempt")?,
                src_worker: r.u32("src_worker")?,
                data: r.rest(),
            },
            TASK_DONE => Frame::TaskDone {
                task_id: r.u64("task_id")?,
                ok: r.bool("ok")?,
                reply: r.sized("reply")?,
                result: r.rest(),
            },
            STARTED => Frame::Started {
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
                Frame::Exited { role, slot, pid, reason, uptime_ms: r.u64("uptime")? }
            }
            FORK_FAILED => Frame::ForkFailed {
                role: Role::from_code(r.u8("role")?)?,
                slot: r.u32("slot")?,
                error: r.rest(),
            },
            SLOT_READY => Frame::SlotReady { role: Role::from_code(r.u8("role")?)?, slot: r.u32("slot")? },
            SHUTDOWN => Frame::Shutdown,
            SLOT_ACTIVE => Frame::SlotActive {
                role: Role::from_code(r.u8("role")?)?,
                slot: r.u32("slot")?,
                active: r.bool("active")?,
            },
            QUERY_RESULT => Frame::QueryResult { session: r.u64("session")?, task_id: r.u64("task id")? },
            STORE => Frame::Store {
                batch: r.u64("batch")?,
                task_id: r.u64("task id")?,
                session: r.u64("session")?,
                worker: r.u32("worker")?,
                context: r.sized("context")?,
                data: r.rest(),
            },
            STORE_END => Frame::StoreEnd { batch: r.u64("batch")? },
            STORED => Frame::Stored { batch: r.u64("batch")?, error: r.rest() },
            REPLY => Frame::Reply {
                task_id: r.u64("task id")?,
                ok: r.bool("ok")?,
                attempts: r.u32("attempts")?,
                task_pid: r.u32("task pid")?,
                replays: r.u32("replays")?,
                entry: r.sized("entry")?,
                reply: r.sized("reply")?,
                sends: r.sized("sends")?,
                result: r.rest(),
            },
            TRIM => Frame::Trim { entry: r.rest() },
            KEEP_RESULT => Frame::KeepResult { task_id: r.u64("task id")?, line: r.rest() },
            RENEW_LEASE => Frame::RenewLease,
            LEASE => Frame::Lease { holder: r.rest() },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.end()?;
        Ok(frame)
    }

    /// True for the frame that ends a worker's transaction.
    pub fn is_commit(&self) -> bool {
        matches!(self, Frame::Commit { .. })
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

    fn roundtrip(frame: Frame<'_>) {
        let mut buf = Vec::new();
        frame.encode(&mut buf);
        let (back, used) = Frame::decode(&buf).unwrap().unwrap();
        assert_eq!(back, frame);
        assert_eq!(used, buf.len());
        // Every strict prefix is "need more bytes", never an error or a wrong frame.
        for cut in 0..buf.len() {
            assert_eq!(Frame::decode(&buf[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(Frame::Request { seq: 7, session: 1 << 40, data: b"alice@example.com" });
        roundtrip(Frame::Connect { seq: 1, session: 2, peer: b"127.0.0.1:5000" });
        roundtrip(Frame::Close { seq: 3, session: 4 });
        roundtrip(Frame::Finish {
            seq: 9,
            task_id: 10,
            session: 11,
            task_pid: 1234,
            attempts: 2,
            ok: false,
            flags: task_flags::GROUP,
            context: b"{\"to\":\"x\"}",
            result: b"task process 1234 killed by signal 9",
        });
        roundtrip(Frame::Stop);
        roundtrip(Frame::Send { session: 5, data: b"{\"event\":\"done\"}\n" });
        roundtrip(Frame::CloseSession { session: 5 });
        roundtrip(Frame::Task {
            task_id: 1,
            session: 0,
            target: 2,
            group: 0,
            flags: task_flags::WAIT,
            context: b"",
            data: b"{}",
        });
        roundtrip(Frame::Group { group_id: 4, session: 5, size: 3, timeout_ms: 2000, context: b"ctx" });
        roundtrip(Frame::Commit { seq: u64::MAX });
        roundtrip(Frame::Stats { session: 8 });
        roundtrip(Frame::RunTask { task_id: 1, session: 2, attempt: 1, src_worker: 3, data: b"x" });
        roundtrip(Frame::TaskDone { task_id: 1, ok: true, reply: b"", result: b"" });
        roundtrip(Frame::TaskDone { task_id: 1, ok: true, reply: b"{\"event\":\"done\"}\n", result: b"x" });
        roundtrip(Frame::Started { role: Role::Task, slot: 3, pid: 99 });
        roundtrip(Frame::Exited {
            role: Role::Worker,
            slot: 0,
            pid: 42,
            reason: ExitReason::Signal(9),
            uptime_ms: 1500,
        });
        roundtrip(Frame::ForkFailed { role: Role::Worker, slot: 1, error: b"EAGAIN" });
        roundtrip(Frame::SlotReady { role: Role::Task, slot: 2 });
        roundtrip(Frame::SlotActive { role: Role::Task, slot: 3, active: false });
        roundtrip(Frame::Shutdown);
        roundtrip(Frame::QueryResult { session: 3, task_id: 1 << 33 });
        roundtrip(Frame::Store { batch: 2, task_id: 5, session: 6, worker: 1, context: b"ctx", data: b"{}" });
        roundtrip(Frame::StoreEnd { batch: 2 });
        roundtrip(Frame::Stored { batch: 2, error: b"" });
        roundtrip(Frame::Stored { batch: 3, error: b"Redis is down" });
        roundtrip(Frame::Reply {
            task_id: 5,
            ok: true,
            attempts: 2,
            task_pid: 77,
            replays: 1,
            entry: b"1700000000000-0",
            reply: b"{\"event\":\"done\"}\n",
            sends: b"",
            result: b"sent",
        });
        roundtrip(Frame::Trim { entry: b"1-1" });
        roundtrip(Frame::KeepResult { task_id: 9, line: b"{}\n" });
        roundtrip(Frame::RenewLease);
        roundtrip(Frame::Lease { holder: b"" });
        roundtrip(Frame::Lease { holder: b"host:42" });
    }

    #[test]
    fn several_frames_in_one_buffer_decode_in_order() {
        let mut buf = Vec::new();
        Frame::Send { session: 1, data: b"a" }.encode(&mut buf);
        Frame::Commit { seq: 1 }.encode(&mut buf);
        let (first, n) = Frame::decode(&buf).unwrap().unwrap();
        assert_eq!(first, Frame::Send { session: 1, data: b"a" });
        let (second, m) = Frame::decode(&buf[n..]).unwrap().unwrap();
        assert!(second.is_commit());
        assert_eq!(frame_kind(&buf[n..n + m]), COMMIT_KIND);
    }

    #[test]
    fn corrupt_frames_are_errors() {
        assert_eq!(Frame::decode(&[0, 0, 0, 0]), Err(DecodeError::Truncated("kind")));
        assert_eq!(Frame::decode(&[1, 0, 0, 0, 200]), Err(DecodeError::UnknownKind(200)));
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(Frame::decode(&huge), Err(DecodeError::TooLarge(_))));
        // A commit whose seq is cut short.
        assert_eq!(Frame::decode(&[3, 0, 0, 0, kind::COMMIT, 1, 2]), Err(DecodeError::Truncated("seq")));
        // A bool that is neither 0 nor 1.
        let mut buf = Vec::new();
        Frame::TaskDone { task_id: 1, ok: true, reply: b"", result: b"" }.encode(&mut buf);
        buf[4 + 1 + 8] = 7;
        assert_eq!(Frame::decode(&buf), Err(DecodeError::BadField("ok")));
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
    fn exit_reasons_read_like_the_log() {
        assert_eq!(ExitReason::Signal(9).to_string(), "killed by signal 9 (SIGKILL)");
        assert_eq!(ExitReason::Code(3).to_string(), "exited with status 3");
        assert!(ExitReason::Code(0).is_clean());
    }
}
