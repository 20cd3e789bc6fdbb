//! A task process of durable jobs: a consumer of the job stream, on a web node or a task node.
//!
//! It reads the main job stream and the lanes of the job types its node's handlers run (see
//! [`super::keys::Keys::lane`]), so a job waits for a node that can run it; and the stream of
//! packs (`super::pack`: common jobs of a bridge's round in one entry), whose jobs it runs one
//! by one as it runs any other's. A pack is acknowledged once, when all its jobs are written;
//! one cut short (a slow job, whose outcome goes out at once, or a run broken off) is
//! dissolved from its first job not run into plain entries of the main stream, in the same
//! MULTI ([`PackEnd`]); and a pack taken again after its consumer died with it is dissolved
//! whole, its death blamed on none of its jobs ([`DISSOLVE`]).
//!
//! It takes jobs with XREADGROUP, runs `on_task`, and finishes each in one MULTI: the outcome
//! into its origin's reply stream and XACK. The acknowledged entries leave the stream by a
//! trim of all of them at once, a few times a second ([`super::trim`]), not an XDEL each.
//! Past a job's attempts, the job goes to the dead letters with the reason and its
//! origin gets `failed`. A job that failed transiently (or may not run yet) is parked in the
//! delayed set instead, with a `retrying` notice for its origin, and every consumer moves due
//! jobs back into the stream every few hundred ms ([`PARK`], [`MOVE_DUE`]).
//!
//! It holds no more jobs than it can start within a few ms (its window: about 2 ms of work, one
//! job at a time while jobs are slow or of unknown length), whether it reads new jobs, reads
//! back its own after a restart, or claims a dead consumer's; and it keeps every job it holds
//! alive in Redis, waiting or running, from a thread of its own ([`super::heartbeat`]), which
//! also kills the process when a job outlives `task_timeout`.
//!
//! What it took and did not finish stays in its pending list: its successor in the same slot
//! (same consumer name) reads that first, and so does this process after any reconnect; a
//! node that is gone for good stops beating, and its jobs are claimed by the others after
//! `claim_timeout` (XAUTOCLAIM), and its consumers deleted once they hold nothing.
//!
//! On any node (a task node, or a web node with its own task processes) it takes and starts no
//! job while the node's name is not known to be its own
//! (its manager has not renewed the lease in time: the node woke from a hang, and a node of
//! the same name, using the same consumer names, may have started meanwhile).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Connection, ConnectionLike, Value};

use super::dedup;
use super::entry::{add_outcomes, JobEntry, Rejected, ReplyEntry};
use super::heartbeat::Pulse;
use super::hot::{jobs_of, HotConn, Jobs};
use super::keys::{consumer_name, GROUP};
use super::redis_io::{self, as_array, as_text, is_connection_error, StreamEntry};
use super::resp::Packed;
use super::startup::{delivery_counts, ensure_group_of};
use super::Durable;
use crate::app::{Application, Priority, ProcessInfo, Task, TaskCtx, TaskFailure};
use crate::ipc::{ReadState, Role, TaskToMaster, ToTask};
use crate::master::results::outcome_line;
use crate::process::ProcessError;
use crate::signals::Signals;
use crate::worker::guard;

/// How long one XREADGROUP blocks: also how soon a stop request is noticed while idle.
const BLOCK_MS: u64 = 500;
/// Jobs taken at once: about this much work (quick jobs go in batches, one at a time while
/// they are slow, so that an idle consumer elsewhere can take the next one).
const TAKE_BUDGET: f64 = 0.002;
const TAKE_MAX: usize = 64;
/// XAUTOCLAIM calls of one sweep at most. Each looks at up to 10 x COUNT pending entries and
/// may claim fewer than COUNT with more left (a cursor that is not 0-0): the sweep goes on
/// until it has its window, has seen the whole list, or has made this many calls (the next
/// sweep goes on from the cursor).
const CLAIM_CALLS: usize = 16;
/// Each consumer's connections carry its name with this prefix, so that `CLIENT LIST` tells
/// which consumers belong to a live process (Redis 7.0's consumer idle time does not: a read
/// that finds nothing does not reset it).
pub(super) const CLIENT_PREFIX: &str = "taskd:";

/// Names a connection as the consumer `me`: a live connection of that name tells the sweeps
/// that the consumer lives. A user whose ACL forbids CLIENT goes on unnamed (the master warned
/// at start): then no sweep deletes consumers, as it cannot tell the live ones. Only a lost
/// connection is an error.
pub(super) fn name_as_consumer(conn: &mut dyn ConnectionLike, me: &str) -> redis::RedisResult<()> {
    let named: redis::RedisResult<()> =
        redis::cmd("CLIENT").arg("SETNAME").arg(format!("{CLIENT_PREFIX}{me}")).query(conn);
    match named {
        Err(e) if is_connection_error(&e) => Err(e),
        _ => Ok(()),
    }
}
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Where a stop request comes from: the master's channel (web node) or signals (task node).
pub enum Control {
    Master(TaskToMaster),
    Signals(Signals),
}

impl Control {
    fn stop_requested(&mut self) -> Option<String> {
        match self {
            Control::Master(channel) => {
                if let Ok(ReadState::Closed) = channel.fill() {
                    return Some("the master is gone".into());
                }
                while let Ok(Some(frame)) = channel.next_frame() {
                    match frame {
                        ToTask::Stop => return Some("asked to stop".into()),
                        // The master gives a consumer no job: it takes them from Redis.
                        ToTask::RunTask { task_id, .. } => {
                            tracing::error!("task {task_id} handed to a consumer of durable jobs; not run")
                        }
                    }
                }
                None
            }
            Control::Signals(signals) => signals.pending().first().map(|s| format!("{s}")),
        }
    }
}

pub struct ConsumerSetup<'a> {
    pub slot: u32,
    pub control: Control,
    pub durable: &'a Durable,
    /// Replaced after this many jobs (0: never).
    pub task_max_request: u64,
}

/// Where a job's entry is: its stream (the main one, or a type's lane) and its id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct At {
    /// Shared with the consumer's list of its streams (a name per job was an allocation).
    pub stream: Arc<str>,
    pub id: Arc<str>,
}

/// Where a job of a pack (see `super::pack`) is in it. The jobs of a pack share its [`At`]
/// (one entry, acknowledged once, when all of them are written or the rest is dissolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InPack {
    /// Its place, from 1 (as `pack::LUA_DISSOLVE` counts the jobs of a pack).
    pub index: u32,
    /// The items the pack became: its jobs, and one for a damaged rest.
    pub count: u32,
}

/// A job taken: where it is, the job (or why it is not one to run), its attempt, and its
/// place in its pack if it is packed.
type Taken = (At, Result<Arc<JobEntry>, Rejected>, u32, Option<InPack>);

/// A finished job, to be written to Redis. `pack`: its place in its pack, if it is packed:
/// then it is not acknowledged on its own (its pack is, once, see [`store`]).
pub(super) enum Completion {
    Done {
        id: At,
        pack: Option<InPack>,
        /// The job run: its origin gets the outcome, its deduplication key (see
        /// `durable::dedup`) is ended with it. Shared, not copied out: the beat thread is done
        /// with it, and its fields were two allocations a job.
        job: Arc<JobEntry>,
        reply: ReplyEntry,
    },
    Dead {
        id: At,
        pack: Option<InPack>,
        job: JobEntry,
        why: String,
        attempts: u32,
    },
    /// Not a job (deleted meanwhile, or unreadable): only to be acknowledged.
    Drop {
        id: At,
        pack: Option<InPack>,
    },
    /// To run again after `wait` (a delivery retry, or "not yet"): parked in the delayed set
    /// with its attempts and retries so far; `notice` (a non-final reply) tells its origin.
    Later {
        id: At,
        pack: Option<InPack>,
        job: JobEntry,
        wait: Duration,
        notice: Option<ReplyEntry>,
    },
}

/// Bytes of a flush's transaction besides its jobs' own: MULTI, EXEC, the script of the
/// outcomes (per origin), the XACKs' names, a trim.
const STORE_ROOM: usize = 2048;

impl Completion {
    /// About the bytes its outcome takes in a batch of outcomes (and its XACK), so that a flush
    /// sizes its buffers once.
    fn room(&self) -> usize {
        let id = self.id();
        let outcome = match self {
            Completion::Done { reply, .. } => reply.reply.len() + reply.sends.len() + reply.result.len(),
            Completion::Dead { why, .. } => why.len(),
            Completion::Drop { .. } => 0,
            Completion::Later { notice, .. } => {
                notice.as_ref().map_or(0, |n| n.reply.len() + n.sends.len() + n.result.len())
            }
        };
        64 + outcome + id.id.len()
    }

    fn id(&self) -> &At {
        match self {
            Completion::Done { id, .. }
            | Completion::Dead { id, .. }
            | Completion::Drop { id, .. }
            | Completion::Later { id, .. } => id,
        }
    }

    fn pack(&self) -> Option<InPack> {
        match self {
            Completion::Done { pack, .. }
            | Completion::Dead { pack, .. }
            | Completion::Drop { pack, .. }
            | Completion::Later { pack, .. } => *pack,
        }
    }
}

/// What a flush does with a pack it writes outcomes of (see [`pack_ends`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PackEnd {
    /// Each of its jobs is written (in this flush or an earlier one): acknowledged.
    Complete,
    /// Its jobs from this one on (1-based) have not run: acknowledged, and those jobs added
    /// to the main stream as plain entries ([`DISSOLVE`]), for any consumer to take.
    DissolveFrom(u32),
}

/// The packs of `completions`, each with what their flush does with it. A flush never leaves
/// a pack half done: a pack's jobs run in order, and the queue drops the rest of a pack
/// dissolved by a flush, so the completions of a pack in a flush are its first jobs (with
/// those of earlier flushes that failed), and the last of them says where the pack stands.
pub(super) fn pack_ends(completions: &[Completion]) -> Vec<(&At, PackEnd)> {
    let mut last: Vec<(&At, InPack)> = Vec::new();
    for c in completions {
        let Some(place) = c.pack() else { continue };
        // The jobs of a pack come together: its place in the list is most often the last.
        match last.iter_mut().rev().find(|(at, _)| *at == c.id()) {
            Some((_, seen)) => {
                if place.index > seen.index {
                    *seen = place;
                }
            }
            None => last.push((c.id(), place)),
        }
    }
    last.into_iter()
        .map(|(at, p)| {
            let end = if p.index >= p.count { PackEnd::Complete } else { PackEnd::DissolveFrom(p.index + 1) };
            (at, end)
        })
        .collect()
}

/// How many stream entries `items` are (a pack's jobs are one): what the beat thread refreshes
/// for the consumer that holds them (see `heartbeat`).
fn entries_in<'a>(items: impl IntoIterator<Item = (&'a At, Option<InPack>)>) -> usize {
    let mut packs: Vec<&At> = Vec::new();
    let mut plain = 0;
    for (at, pack) in items {
        match pack {
            None => plain += 1,
            Some(_) => {
                if !packs.contains(&at) {
                    packs.push(at);
                }
            }
        }
    }
    plain + packs.len()
}

/// The entries held by a consumer (see [`entries_in`]): its queue, what it ran, what it has
/// not written yet.
fn held(queue: &VecDeque<Taken>, done: &[Completion], unsent: &[Completion]) -> usize {
    let queued = queue.iter().map(|(at, _, _, pack)| (at, *pack));
    let finished = done.iter().chain(unsent).map(|c| (c.id(), c.pack()));
    entries_in(queued.chain(finished))
}

pub fn run<A: Application>(app: &mut A, setup: ConsumerSetup<'_>) -> Result<(), ProcessError> {
    let ConsumerSetup { slot, mut control, durable: d, task_max_request } = setup;
    let info = ProcessInfo { role: Role::Task, slot, pid: std::process::id() };
    app.on_worker_start(&info).map_err(ProcessError::Start)?;
    let me = consumer_name(&d.node, slot);
    tracing::debug!("task {slot} consumes {} as {me}", d.keys.jobs);
    // Without it, its jobs would be claimed by others while it runs them.
    let pulse = Pulse::start(d, &me, slot).map_err(ProcessError::io("cannot start its heartbeat thread"))?;
    let mut c = Consumer {
        d,
        me,
        conn: None,
        hot: None,
        recovering: true,
        next_sweep: Instant::now() + jitter(d.claim_after / 2),
        cursors: HashMap::new(),
        job_seconds: None,
        fenced: false,
        unsent: Vec::new(),
        store_room: StoreRoom::default(),
        next_move: Instant::now(),
        move_refused: Default::default(),
        backoff: Duration::from_millis(100),
        fair: Default::default(),
        wrong: Default::default(),
        untrimmed: Vec::new(),
        next_trim: Instant::now(),
        trim_refused: Default::default(),
        by_priority: Priority::ALL.map(|p| d.streams_of(p)),
        names: d.streams().into_iter().map(Arc::from).collect(),
        streams: d.streams(),
    };
    let mut served: u64 = 0;
    let mut rng = crate::retry::Rng::new();
    // The jobs run and not yet handed to `c.unsent`; its room kept from one take to the next
    // (a take's worth of outcomes is a few kB, a new allocation at every take).
    let mut done = Vec::new();
    loop {
        // Its lines go out before it may wait on Redis (a job's log does not wait for the
        // next job), or exit.
        crate::logging::hold(false);
        crate::logging::before_wait();
        if let Some(why) = control.stop_requested() {
            // What it took and did not run stays pending under its name (see the module doc).
            tracing::info!("task {slot} (pid {}) exits: {why}, after {served} tasks", info.pid);
            return Ok(());
        }
        if task_max_request != 0 && served >= task_max_request {
            tracing::info!(
                "task {slot} (pid {}) exits: reached task_max_request ({task_max_request})",
                info.pid
            );
            return Ok(());
        }
        let entries = match c.take() {
            Ok(e) => e,
            Err(e) => {
                c.lost(&e);
                continue;
            }
        };
        // Everything it wrote back is out (take flushes first): it holds what it just took.
        pulse.took(entries_in(entries.iter().map(|(at, _, _, pack)| (at, *pack))));
        // A job's outcome line waits for its burst's (one write of the log per burst, not a
        // write system call per job), written before their outcomes leave; its other lines go
        // out as they are logged, so a job that hangs shows what it was doing.
        crate::logging::hold_outcomes();
        done.reserve(entries.len());
        let mut queue: VecDeque<Taken> = entries.into();
        while let Some(taken) = queue.pop_front() {
            if !c.lease_known_valid() {
                // The node woke from a hang past its lease: a node of its name may be running
                // these now. They stay pending under its name, read back if the name is kept.
                c.recovering = true;
                break;
            }
            // One read of the clock for the staleness, the job's time and its timer (each read is
            // some 100 instructions, a no-op job's own work about ten of them).
            let started = Instant::now();
            if pulse.stale_at(started) {
                // Stopped, or cut off from Redis, for two beats: run only what is still its own
                // (a pack whole or none of it: its jobs share its entry).
                queue.push_front(taken);
                match c.keep_own(&mut queue) {
                    Ok(()) => {
                        pulse.holding(held(&queue, &done, &c.unsent));
                        pulse.refreshed();
                        continue;
                    }
                    Err(e) => {
                        // What it did not run stays pending under its name: read back next.
                        c.lost(&e);
                        break;
                    }
                }
            }
            done.push(run_one(app, info, d, &pulse, taken, started, &mut rng));
            let took = started.elapsed();
            if matches!(done.last(), Some(Completion::Done { .. } | Completion::Later { .. })) {
                served += 1;
                c.timed(took);
            }
            // A slow job's outcome goes out at once; quick ones go together. The rest of its
            // pack, if it is packed, goes back to the main stream with it, for other consumers
            // (see `store`), and is not run here.
            if queue.is_empty() || took >= Duration::from_millis(1) {
                settle(app, info, &mut done);
                crate::logging::flush();
                c.unsent.append(&mut done);
                let dissolved: Vec<At> = pack_ends(&c.unsent)
                    .into_iter()
                    .filter(|(_, end)| matches!(end, PackEnd::DissolveFrom(_)))
                    .map(|(at, _)| at.clone())
                    .collect();
                if let Err(e) = c.flush() {
                    c.lost(&e);
                }
                // Also when the flush failed: its next try dissolves them (or finds it done).
                if !dissolved.is_empty() {
                    queue.retain(|(at, job, _, pack)| {
                        let keep = pack.is_none() || !dissolved.contains(at);
                        // A damaged rest is not put back (it is no job): said here, as its run
                        // would have said it.
                        if let (false, Err(Rejected::NotAJob(why))) = (keep, job) {
                            tracing::warn!("job stream entry {} is not a job ({why}); dropped", at.id);
                        }
                        keep
                    });
                }
                pulse.holding(held(&queue, &[], &c.unsent));
            }
        }
        settle(app, info, &mut done);
        crate::logging::flush();
        c.unsent.append(&mut done);
        pulse.holding(held(&VecDeque::new(), &[], &c.unsent));
    }
}

/// Before the outcomes in `done` go to Redis, as a task process does before its results go
/// to the master (see `task_worker::settle`): the application finishes what it put off for
/// their jobs (the outbox's lines, in one write), and each job it names fails instead of
/// succeeding, with its reason and without the reply it set (every one of them, should that
/// call panic).
fn settle<A: Application>(app: &mut A, info: ProcessInfo, done: &mut [Completion]) {
    if done.is_empty() {
        return;
    }
    let failed = crate::task_worker::task_results(app, info);
    if failed.as_ref().is_some_and(Vec::is_empty) {
        return;
    }
    let panicked = format!("on_task_results panicked in task process {}", info.pid);
    for completion in done {
        let Completion::Done { reply, .. } = completion else { continue };
        let why = match &failed {
            Some(failed) => failed.iter().find(|(id, _)| *id == reply.task_id).map(|(_, why)| why),
            None => Some(&panicked),
        };
        if let (true, Some(why)) = (reply.ok, why) {
            crate::task_worker::log_failed_after_done(reply.task_id, why);
            reply.ok = false;
            reply.reply.clear();
            reply.result = why.clone().into_bytes();
        }
    }
}

fn run_one<A: Application>(
    app: &mut A,
    info: ProcessInfo,
    d: &Durable,
    pulse: &Pulse,
    (at, job, attempt, pack): Taken,
    started: Instant,
    rng: &mut crate::retry::Rng,
) -> Completion {
    // `attempt` is the entry's delivery count: the runs since it was added, whose deaths
    // count against task_retry_max; the task sees the job's run (`job.attempts` + it).
    let job = match job {
        Ok(job) => job,
        Err(Rejected::NotAJob(why)) => {
            tracing::warn!("job stream entry {} is not a job ({why}); dropped", at.id);
            return Completion::Drop { id: at, pack };
        }
        Err(Rejected::Invalid { job, why }) => {
            let why = format!("not run: {why}");
            tracing::warn!("job stream entry {}: {why}; moved to the dead letters", at.id);
            return Completion::Dead { id: at, pack, job: *job, why, attempts: attempt - 1 };
        }
    };
    if attempt > d.max_attempts {
        // Only a run whose process died counts (a live owner keeps its job, see heartbeat):
        // killed, crashed, its node gone, or killed by its node past task_timeout.
        let why = format!(
            "gave up after {} attempts: each run died with its task process (killed, crashed, its node gone{})",
            attempt - 1,
            d.task_limit.map_or(String::new(), |l| format!(", or past task_timeout ({}s)", l.as_secs_f64()))
        );
        tracing::warn!("job {}: {why}; moved to the dead letters", job.task_id);
        return Completion::Dead { id: at, pack, job: Arc::unwrap_or_clone(job), why, attempts: attempt - 1 };
    }
    let run = job.attempts.saturating_add(attempt);
    let task = Task {
        id: job.task_id,
        session: (job.session != 0).then_some(job.session),
        attempt: run,
        src_worker: job.worker,
        data: &job.data,
    };
    let mut sends = Vec::new();
    let mut ctx = TaskCtx { out: &mut sends, info, reply: Vec::new() };
    let mut result = None;
    // Shared with the heartbeat thread while it runs: on its last attempt past task_timeout,
    // that thread records it as failed (a dead letter needs the whole job; not of a packed
    // one, whose pack is dissolved when it is taken back).
    pulse.running(at, &job, attempt, started, pack.is_some());
    guard(info.slot, "on_task", || result = Some(app.on_task(&mut ctx, &task)));
    // Given back: only this thread sets `running`, just above.
    let at = pulse.ran().expect("the id lent to the beat thread by `running`");
    // Written only for a panic: a format per job costs more than a no-op job's own work.
    let result = result
        .unwrap_or_else(|| Err(format!("job {} panicked in task process {}", job.task_id, info.pid).into()));
    let reply = std::mem::take(&mut ctx.reply);
    let (ok, result) = match result {
        Ok(bytes) => (true, bytes),
        Err(TaskFailure::Permanent(why)) => (false, why.into_bytes()),
        Err(TaskFailure::Transient { error, retry_after }) => {
            let n = job.retries + 1;
            match d.retry.wait(n, retry_after, rng) {
                Some(wait) => {
                    let next = JobEntry { attempts: run, retries: n, ..(*job).clone() };
                    return later(at, pack, next, wait, Some((info.pid, sends, error)));
                }
                None => (false, error.into_bytes()),
            }
        }
        Err(TaskFailure::NotYet { wait, .. }) => {
            // Not an attempt: the next run has the same number.
            let next = JobEntry { attempts: run - 1, ..(*job).clone() };
            return later(at, pack, next, wait.min(crate::retry::NOT_YET_MAX), None);
        }
    };
    let reply = ReplyEntry {
        task_id: job.task_id,
        ok,
        attempts: run,
        task_pid: info.pid,
        replays: job.replays,
        reply,
        sends,
        result,
        retrying: false,
    };
    Completion::Done { id: at, pack, job, reply }
}

/// A job to park in the delayed set; after a transient failure (`failed`: the task pid, its
/// sends and the error), with a `retrying` notice for its origin.
fn later(
    id: At,
    pack: Option<InPack>,
    job: JobEntry,
    wait: Duration,
    failed: Option<(u32, Vec<u8>, String)>,
) -> Completion {
    let notice = failed.map(|(task_pid, sends, error)| {
        tracing::info!(
            "job {}: attempt {} failed ({error}); runs again in {} ms",
            job.task_id,
            job.attempts,
            wait.as_millis()
        );
        let line = if job.session != 0 {
            crate::retry::retrying_line(job.task_id, job.attempts + 1, wait, &error)
        } else {
            Vec::new()
        };
        ReplyEntry {
            task_id: job.task_id,
            ok: false,
            attempts: job.attempts,
            task_pid,
            replays: job.replays,
            reply: line,
            sends,
            result: error.into_bytes(),
            retrying: true,
        }
    });
    Completion::Later { id, pack, job, wait, notice }
}

struct Consumer<'a> {
    d: &'a Durable,
    me: String,
    conn: Option<Connection>,
    /// The connection of its reads of new jobs and its writes of outcomes (see
    /// [`super::hot`]), opened after `conn` (which made the groups), dropped with it.
    hot: Option<HotConn>,
    /// Reading back its own pending entries (after a start or a reconnect).
    recovering: bool,
    next_sweep: Instant,
    /// Where the XAUTOCLAIM scan of each stream's pending list goes on from.
    cursors: HashMap<String, String>,
    job_seconds: Option<f64>,
    /// Taking nothing because the node's name is not known to be its own (said once).
    fenced: bool,
    /// Finished jobs not yet written to Redis (it was away): written first once it is back.
    unsent: Vec<Completion>,
    /// The buffers of its flushes, kept from one to the next (see [`StoreRoom`]).
    store_room: StoreRoom,
    /// When to move due jobs from the delayed set into the stream next.
    next_move: Instant,
    /// Warnings of a refused move: one per 10 s.
    move_refused: crate::throttle::Throttle,
    backoff: Duration,
    /// The priorities' credits in the weighted fair order of its takes.
    fair: super::fair::Fair,
    /// The streams in which it acknowledged entries since its last trim (see [`super::trim`]).
    untrimmed: Vec<Arc<str>>,
    /// When its next trim is due.
    next_trim: Instant,
    /// Warnings of a refused trim: one per 10 s.
    trim_refused: crate::throttle::Throttle,
    /// Its streams that are keys of another type: left out of its reads until mended.
    wrong: super::wrong_type::WrongTyped,
    /// The streams it reads, of each priority and all of them (`Durable::streams_of`, made
    /// once: they do not change, and making them at each take cost some 1k instructions a job).
    by_priority: [Vec<String>; 3],
    streams: Vec<String>,
    /// The same names, shared by the jobs read from them (see [`At::stream`]).
    names: Vec<Arc<str>>,
}

impl Consumer<'_> {
    fn conn(&mut self) -> redis::RedisResult<&mut Connection> {
        if self.conn.is_none() {
            // No reply limit: this connection blocks in XREADGROUP.
            let mut conn = redis_io::connect(&self.d.url, None)?;
            name_as_consumer(&mut conn, &self.me)?;
            // A stream someone made a key of another type would fail every group and read.
            self.wrong.look(&mut conn, &self.d.streams(), &self.me)?;
            for stream in self.wrong.keep(self.d.streams()) {
                ensure_group_of(&mut conn, &stream)?;
            }
            self.conn = Some(conn);
            self.hot = None;
            self.recovering = true;
            self.backoff = Duration::from_millis(100);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Its connection for the commands of every job (see [`Consumer::hot`]); like `conn`, with no
    /// reply limit (it blocks in XREADGROUP) and named.
    fn hot(&mut self) -> redis::RedisResult<&mut HotConn> {
        self.conn()?;
        if self.hot.is_none() {
            let mut hot = redis_io::connect_hot(&self.d.url, None)?;
            name_as_consumer(&mut hot, &self.me)?;
            self.hot = Some(hot);
        }
        Ok(self.hot.as_mut().expect("connected above"))
    }

    fn lost(&mut self, e: &redis::RedisError) {
        if e.code() == Some("WRONGTYPE") {
            // One of its streams became a key of another type since the last look.
            self.wrong.look_soon();
        }
        if e.code() == Some("NOGROUP") {
            // The group is gone (Redis lost its data, or someone deleted it): make it again.
            tracing::error!("the consumer group of {} is gone: {e}; creating it again", self.d.keys.jobs);
            self.conn = None;
            self.hot = None;
        } else if is_connection_error(e) {
            if self.conn.is_some() {
                tracing::warn!("lost Redis at {}: {}; reconnecting", self.d.shown, redis_io::describe(e));
            }
            self.conn = None;
            self.hot = None;
        } else {
            tracing::error!("Redis refused a command: {e}");
            // What it read or claimed before the error is pending under its name: read it back.
            self.recovering = true;
        }
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    fn timed(&mut self, took: Duration) {
        let took = took.as_secs_f64();
        self.job_seconds = Some(self.job_seconds.map_or(took, |avg| avg * 0.8 + took * 0.2));
    }

    fn take_count(&self) -> usize {
        match self.job_seconds {
            Some(avg) if avg > 0.0 => ((TAKE_BUDGET / avg) as usize).clamp(1, TAKE_MAX),
            Some(_) => TAKE_MAX,
            None => 1,
        }
    }

    /// Whether the node's name is surely its own now (see [`super::lease_gate::known_valid`]);
    /// says so once when it is not, and once when it is again.
    fn lease_known_valid(&mut self) -> bool {
        let valid = super::lease_gate::known_valid();
        if valid == self.fenced {
            self.fenced = !valid;
            if valid {
                tracing::info!("{}: the node's name is its own again; taking jobs", self.me);
            } else {
                tracing::warn!(
                    "{}: the node's name is not known to be its own (its lease was not renewed in time); \
                     taking and starting no job until its manager renews it",
                    self.me
                );
            }
        }
        valid
    }

    /// The next jobs to run, each with where it is and its attempt number.
    fn take(&mut self) -> redis::RedisResult<Vec<Taken>> {
        self.flush()?;
        if !self.lease_known_valid() {
            // Not even its own pending jobs: they may be another run's now, under its names.
            std::thread::sleep(Duration::from_millis(100));
            return Ok(Vec::new());
        }
        if Instant::now() >= self.next_move {
            self.next_move = Instant::now() + MOVE_EVERY;
            let d = self.d;
            match move_due(self.conn()?, d) {
                Ok((0, _, 0, _)) => {}
                Ok((moved, 0, 0, 0)) => {
                    tracing::debug!("{}: moved {moved} due jobs from the delayed set to the stream", self.me)
                }
                // Written by someone else (see `MOVE_DUE`): said, once per 10 s at most.
                Ok((moved, misrouted, waiting, dropped)) => {
                    if let Some(n) = self.move_refused.log() {
                        tracing::warn!(
                            "{}: moved {moved} due jobs from the delayed set ({misrouted} of them into \
                             the main stream: their lane field `ln` names no lane of {}, written by \
                             someone else; {dropped} deleted: a hash of over {JOB_FIELDS_MAX} fields \
                             is no job); {waiting} wait there, their stream and {} being keys of \
                             another type{}",
                            self.me,
                            d.keys.queue(),
                            d.keys.jobs,
                            crate::throttle::unlogged(n)
                        );
                    }
                }
                Err(e) if is_connection_error(&e) => return Err(e),
                // Refused (a script error): taking jobs goes on; the move is tried again later.
                Err(e) => {
                    if let Some(n) = self.move_refused.log() {
                        tracing::warn!(
                            "{}: Redis refused to move due jobs back into the stream: {e}{}",
                            self.me,
                            crate::throttle::unlogged(n)
                        );
                    }
                }
            }
        }
        self.look_at_types()?;
        let count = self.take_count();
        let (d, me) = (self.d, self.me.clone());
        let recovering = self.recovering;
        let sweep = Instant::now() >= self.next_sweep;
        if !recovering && !sweep {
            self.hot()?;
        }
        let mut fair = self.fair;
        let wrong = &self.wrong;
        let conn = self.conn.as_mut().expect("connected by look_at_types");
        let fresh;
        // Whichever way jobs come, no more than its window: what waits here is kept alive by the
        // heartbeat, but another consumer could have started it.
        let entries = if recovering {
            // Its own pending entries, from the start: no BLOCK, they are there or not. What is
            // left after this window stays pending under its name (and kept alive) for the next.
            let streams = wrong.keep(self.streams.clone());
            let got = jobs_of(read_group(conn, &streams, &me, count, None, "0")?, &self.names);
            fresh = false;
            if got.is_empty() {
                self.recovering = false;
            } else {
                tracing::info!("{me}: taking back {} jobs it had taken before", got.len());
            }
            got
        } else if sweep {
            fresh = false;
            let streams = self.wrong.keep(self.streams.clone());
            let (got, more) = self.claim(count, &streams)?;
            let got = jobs_of(got, &self.names);
            // A full window and more to look at: sweep again as soon as these are run.
            let wait = if more { Duration::ZERO } else { jitter(d.claim_after / 2) };
            self.next_sweep = Instant::now() + wait;
            got
        } else {
            fresh = true;
            let hot = self.hot.as_mut().expect("connected above");
            // In weighted fair order of the priorities; blocking only when all are empty.
            let got = fair.take(hot, &self.by_priority, &self.names, &me, count, |s| wrong.reads(s))?;
            if got.is_empty() {
                // Idle: what it acknowledged goes from the streams before it waits.
                self.trim_idle()?;
                let streams = self.wrong.keep(self.streams.clone());
                let hot = self.hot.as_mut().expect("connected above");
                let woke = read_new(hot, &streams, &self.names, &me, 1, Some(BLOCK_MS))?;
                fair.woke(d, &woke);
                woke
            } else {
                got
            }
        };
        self.fair = fair;
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Reading one's history and claiming count as deliveries: Redis keeps the number.
        let mut counts: HashMap<At, u32> = HashMap::new();
        if !fresh {
            let mut streams: Vec<Arc<str>> =
                entries.iter().map(|(at, _, _)| Arc::clone(&at.stream)).collect();
            streams.sort();
            streams.dedup();
            let conn = self.conn()?;
            for stream in streams {
                for (id, n) in delivery_counts(conn, &stream, &me, 10_000)? {
                    counts.insert(At { stream: Arc::clone(&stream), id: Arc::from(id) }, n);
                }
            }
        }
        // Jobs of slow length known (a window of one or a few): a pack of more than twice its
        // window would hold jobs that others could start now while its first ones run.
        let too_many = |place: InPack| self.job_seconds.is_some() && place.count as usize > 2 * count;
        let mut taken = Vec::with_capacity(entries.len());
        let mut dissolve: Vec<(At, u32)> = Vec::new();
        for (at, job, pack) in entries {
            let attempt = counts.get(&at).copied().unwrap_or(1);
            let Some(place) = pack.filter(|&p| attempt > 1 || too_many(p)) else {
                taken.push((at, job, attempt, pack));
                continue;
            };
            // A pack whose consumer died with it: none of its jobs is blamed, none is run here;
            // it is dissolved, and each job meets `task_retry_max` alone. Or too big a pack.
            if let Err(Rejected::NotAJob(why)) = &job {
                tracing::warn!("pack {} of {}: {why}; what is damaged is dropped", at.id, at.stream);
            }
            if place.index == 1 {
                dissolve.push((at, attempt));
            }
        }
        if !dissolve.is_empty() {
            self.dissolve(&dissolve)?;
        }
        Ok(taken)
    }

    /// Dissolves packs it will not run: each is acknowledged and its jobs added to the main
    /// stream as plain entries ([`DISSOLVE`]). A pack of `attempt` > 1 was taken again after
    /// its consumer died with it (read back at a start, or claimed): its jobs' attempts are
    /// raised by the runs of the pack that died. One of attempt 1 has more jobs than its window.
    fn dissolve(&mut self, packs: &[(At, u32)]) -> redis::RedisResult<()> {
        let (d, me) = (self.d, self.me.clone());
        let mut pipe = redis::pipe();
        for (at, attempt) in packs {
            pipe.cmd("EVAL")
                .arg(DISSOLVE.as_str())
                .arg(2)
                .arg(&*at.stream)
                .arg(&d.keys.jobs)
                .arg(GROUP)
                .arg(&*at.id)
                .arg(1)
                .arg(attempt - 1);
        }
        let added: Vec<i64> = pipe.query(self.conn()?)?;
        // Acknowledged: their entries go with its next trim.
        for (at, _) in packs {
            if !self.untrimmed.contains(&at.stream) {
                self.untrimmed.push(Arc::clone(&at.stream));
            }
        }
        for ((at, attempt), added) in packs.iter().zip(added) {
            if *attempt == 1 {
                tracing::debug!(
                    "{me}: pack {} of {}: more jobs than its window (jobs of {:.3}s each): {added} put back \
                     into {} as jobs of their own",
                    at.id,
                    at.stream,
                    self.job_seconds.unwrap_or_default(),
                    d.keys.jobs
                );
            } else if added < 0 {
                tracing::info!(
                    "{me}: pack {} of {} was finished or dissolved by another consumer meanwhile",
                    at.id,
                    at.stream
                );
            } else {
                tracing::warn!(
                    "{me}: pack {} of {} was held by a consumer that died (delivery {attempt}): its {added} jobs \
                     are back in {} as jobs of their own",
                    at.id,
                    at.stream,
                    d.keys.jobs
                );
            }
        }
        Ok(())
    }

    /// Keeps in `queue` only the jobs still pending under its name (another consumer may have
    /// claimed them while it could not keep them alive), refreshing them.
    fn keep_own(&mut self, queue: &mut VecDeque<Taken>) -> redis::RedisResult<()> {
        let (d, me) = (self.d, self.me.clone());
        let own: HashSet<At> = super::heartbeat::refresh(self.conn()?, d, &me)?.into_iter().collect();
        let before = queue.len();
        queue.retain(|(at, _, _, _)| own.contains(at));
        if queue.len() < before {
            tracing::warn!(
                "{me}: {} jobs it held were claimed by another consumer while it could not keep them alive; leaving them to it",
                before - queue.len()
            );
        }
        Ok(())
    }

    /// Looks at the types of its streams when due (see [`super::wrong_type`]), and makes the
    /// group again of those mended since the last look.
    fn look_at_types(&mut self) -> redis::RedisResult<()> {
        let (d, me) = (self.d, self.me.clone());
        self.conn()?;
        let conn = self.conn.as_mut().expect("connected above");
        if self.wrong.due() {
            for stream in self.wrong.look(conn, &d.streams(), &me)? {
                ensure_group_of(conn, &stream)?;
            }
        }
        Ok(())
    }

    /// Takes over at most `want` jobs that other consumers took and left idle past
    /// `claim_after` (a live consumer's never are: it beats), and deletes consumers that are gone
    /// and hold nothing. Also says whether it got `want` and has not seen the whole list yet.
    fn claim(
        &mut self,
        want: usize,
        streams: &[String],
    ) -> redis::RedisResult<(Vec<(String, StreamEntry)>, bool)> {
        let (d, me) = (self.d, self.me.clone());
        let idle_ms = d.claim_after.as_millis() as u64;
        let mut claimed = Vec::new();
        let mut more = false;
        // Each stream in turn (the main one, then the lanes), while the window has room.
        for stream in streams {
            if claimed.len() >= want {
                more = true;
                break;
            }
            for _ in 0..CLAIM_CALLS {
                let cursor = self.cursors.get(stream).cloned().unwrap_or_else(|| "0-0".into());
                let conn = self.conn()?;
                let v: Value = redis::cmd("XAUTOCLAIM")
                    .arg(stream)
                    .arg(GROUP)
                    .arg(&me)
                    .arg(idle_ms)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(want - claimed.len())
                    .query(conn)?;
                let mut parts = as_array(v).into_iter();
                let next = parts.next().map(as_text).unwrap_or_else(|| "0-0".into());
                let got = parts.next().map(redis_io::entries).unwrap_or_default();
                claimed.extend(got.into_iter().map(|e| (stream.clone(), e)));
                let wrapped = next == "0-0";
                if wrapped {
                    // A full pass over the pending list is done: a good time to forget the dead
                    // (a failure here is no reason to drop what was claimed).
                    if let Err(e) = remove_gone_consumers(conn, d, stream, &me) {
                        tracing::debug!("{me}: cannot delete gone consumers: {e}");
                    }
                }
                self.cursors.insert(stream.clone(), next);
                if wrapped {
                    break;
                }
                if claimed.len() >= want {
                    more = true;
                    break;
                }
            }
        }
        if !claimed.is_empty() {
            tracing::warn!(
                "{me}: claimed {} jobs idle for over {:?} (their consumer died or stalled)",
                claimed.len(),
                d.claim_after
            );
        }
        Ok((claimed, more))
    }

    /// Writes the finished jobs it has not written yet (see [`store`]); kept for the next try
    /// if that fails. With them, once [`super::trim::EVERY`] has passed, the trim of the
    /// streams whose entries it acknowledged since the last one.
    fn flush(&mut self) -> redis::RedisResult<()> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let d = self.d;
        let mut unsent = std::mem::take(&mut self.unsent);
        for c in &unsent {
            let stream = &c.id().stream;
            if !self.untrimmed.contains(stream) {
                self.untrimmed.push(Arc::clone(stream));
            }
        }
        let due = Instant::now() >= self.next_trim;
        let untrimmed = std::mem::take(&mut self.untrimmed);
        let trim: Vec<&str> = if due { untrimmed.iter().map(|s| &**s).collect() } else { Vec::new() };
        let mut room = std::mem::take(&mut self.store_room);
        let stored = self.hot().and_then(|hot| store(hot, d, &unsent, &trim, &mut room));
        drop(trim);
        self.untrimmed = untrimmed;
        room.shed();
        self.store_room = room;
        if stored.is_ok() {
            // Written: its room kept for the next.
            unsent.clear();
        }
        self.unsent = unsent;
        stored.map(|trimmed| self.trimmed(trimmed))
    }

    /// Trims on its own the streams whose entries it acknowledged and left untrimmed, once
    /// due (it is idle: no flush will carry it).
    fn trim_idle(&mut self) -> redis::RedisResult<()> {
        if self.untrimmed.is_empty() || Instant::now() < self.next_trim {
            return Ok(());
        }
        let mut packed = Packed::new();
        let streams: Vec<&str> = self.untrimmed.iter().map(|s| &**s).collect();
        super::trim::pack(&mut packed, &streams, super::trim::SLACK);
        let answer = self.hot()?.req_packed_commands(packed.bytes(), 0, 1)?.pop();
        let trimmed = match answer.as_ref().and_then(super::trim::answer) {
            Some((more, _)) => Trimmed::Done { more },
            None => Trimmed::Refused(format!("{answer:?}")),
        };
        self.trimmed(trimmed);
        Ok(())
    }

    /// After a trim was asked (see [`Trimmed`]): when the next is due, and what is left.
    fn trimmed(&mut self, trimmed: Trimmed) {
        match trimmed {
            Trimmed::Not => {}
            Trimmed::Done { more } => {
                self.untrimmed.clear();
                // A walk that stopped at its limit goes on at the next flush.
                self.next_trim = if more { Instant::now() } else { Instant::now() + super::trim::EVERY };
            }
            Trimmed::Refused(why) => {
                self.next_trim = Instant::now() + super::trim::EVERY * 10;
                if let Some(n) = self.trim_refused.log() {
                    tracing::warn!(
                        "{}: Redis refused to trim finished jobs from the job streams ({why}); they \
                         stay there until it can (an ACL user needs +xtrim +xlen +xinfo|groups \
                         +xpending +xrange +xdel){}",
                        self.me,
                        crate::throttle::unlogged(n)
                    );
                }
            }
        }
    }
}

/// Writes finished jobs: for each, its outcome (or dead letter) and XACK, all in one MULTI so
/// that a job is never answered without being acknowledged, or the reverse; a job to run later
/// is parked (see [`PARK`]) in the same MULTI, with its `retrying` notice. The acknowledged
/// entries stay in their stream until a trim (see [`super::trim`]): of `trim`'s streams at the
/// end of this MULTI, if any.
pub(super) fn store(
    conn: &mut dyn ConnectionLike,
    d: &Durable,
    completions: &[Completion],
    trim: &[&str],
    bufs: &mut StoreRoom,
) -> redis::RedisResult<Trimmed> {
    // The transaction packed as it goes (see `super::resp`): MULTI, the commands, EXEC. Room
    // for all of it at once: grown from empty, it was copied at every doubling (with the
    // batches, some 1.5k instructions a job).
    let room: usize = completions.iter().map(Completion::room).sum();
    let pipe = &mut bufs.pipe;
    pipe.clear();
    pipe.reserve(STORE_ROOM + 2 * room);
    pipe.command(1).arg(b"MULTI");
    // One reply entry per origin node, carrying all its outcomes.
    let mut batches: Vec<(&str, Vec<u8>)> = Vec::new();
    let spare = &mut bufs.batches;
    for c in completions {
        match c {
            Completion::Done { job, reply, .. } => {
                let origin = &job.origin;
                if let Some(key) = &job.key {
                    let line = match &reply.reply {
                        r if r.is_empty() => {
                            outcome_line(reply.task_id, reply.ok, &reply.result, reply.attempts)
                        }
                        r => r.clone(),
                    };
                    let line = dedup::kept_line(reply.task_id, reply.ok, &line);
                    pipe.cmd(&dedup::end_cmd(&d.keys, &key.hex, key.ttl_ms, origin, reply.task_id, &line));
                }
                reply.encode(batch_for(&mut batches, spare, origin, room))
            }
            Completion::Dead { id, pack, job, why, attempts } => {
                let mut cmd = redis::cmd("EVAL");
                // A packed job's entry is its pack's: it is acknowledged with the pack.
                cmd.arg(if pack.is_some() { DEAD_PACKED } else { DEAD })
                    .arg(2)
                    .arg(&d.keys.dead)
                    .arg(&*id.stream)
                    .arg(GROUP)
                    .arg(&*id.id);
                job.add(&mut cmd);
                cmd.arg("why").arg(why).arg("a").arg(*attempts);
                // A replay puts it back into its lane, of its priority.
                if let Some(lane) = d.lane_of(&id.stream) {
                    cmd.arg("ln").arg(lane);
                }
                super::add_priority(&mut cmd, d.priority_of(&id.stream));
                pipe.cmd(&cmd);
                if let Some(key) = &job.key {
                    let line = dedup::kept_line(
                        job.task_id,
                        false,
                        &outcome_line(job.task_id, false, why.as_bytes(), *attempts),
                    );
                    pipe.cmd(&dedup::end_cmd(&d.keys, &key.hex, key.ttl_ms, &job.origin, job.task_id, &line));
                }
                let failed = ReplyEntry {
                    task_id: job.task_id,
                    ok: false,
                    attempts: *attempts,
                    replays: job.replays,
                    result: why.clone().into_bytes(),
                    ..ReplyEntry::default()
                };
                failed.encode(batch_for(&mut batches, spare, &job.origin, room));
            }
            Completion::Drop { .. } => {}
            Completion::Later { id, pack, job, wait, notice } => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(if pack.is_some() { PARK_PACKED } else { PARK })
                    .arg(3)
                    .arg(&d.keys.delayed)
                    .arg(d.keys.delayed_job(job.task_id))
                    .arg(&*id.stream)
                    .arg(GROUP)
                    .arg(&*id.id)
                    .arg(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
                    .arg(job.task_id);
                job.add(&mut cmd);
                // Moved back into its own lane when due (`MOVE_DUE`), of its priority.
                if let Some(lane) = d.lane_of(&id.stream) {
                    cmd.arg("ln").arg(lane);
                }
                super::add_priority(&mut cmd, d.priority_of(&id.stream));
                pipe.cmd(&cmd);
                if let Some(notice) = notice {
                    notice.encode(batch_for(&mut batches, spare, &job.origin, room));
                }
            }
        }
    }
    for (origin, mut outcomes) in batches {
        add_outcomes(pipe, &d.keys, origin, &outcomes);
        outcomes.clear();
        spare.push(outcomes);
    }
    // A parked job's entry is acknowledged and deleted by its script; the others are
    // acknowledged stream by stream, and their entries left to the trim (see `super::trim`).
    // A packed job is not: its pack is, once, when complete; or dissolved (after the scripts
    // of its jobs above, which park or dead-letter them only while it is pending: a MULTI sent
    // again after its answer was lost does neither twice).
    let mut by_stream: Vec<(&str, Vec<&str>)> = Vec::new();
    let ends = pack_ends(completions);
    let plain = completions.iter().filter(|c| c.pack().is_none() && !matches!(c, Completion::Later { .. }));
    let complete = ends.iter().filter(|(_, end)| *end == PackEnd::Complete).map(|(at, _)| *at);
    for at in plain.map(Completion::id).chain(complete) {
        match by_stream.iter_mut().find(|(s, _)| *s == &*at.stream) {
            Some((_, ids)) => ids.push(&at.id),
            None => {
                let mut ids = Vec::with_capacity(completions.len());
                ids.push(&*at.id);
                by_stream.push((&at.stream, ids));
            }
        }
    }
    // Plain XACK, not a script: a script costs Redis about 1.3 µs more per job (each id made a
    // Lua value and back). A stream someone made a key of another type since (see
    // `wrong_type`) holds them no more: there they fail alone (WRONGTYPE), which is no failure
    // of the flush (else every outcome of it would be written again, at every try).
    let mut wrong_type_ok = Vec::with_capacity(by_stream.len());
    // (Indices of the transaction's commands: MULTI is not one.)
    for (stream, ids) in &by_stream {
        wrong_type_ok.push(pipe.len() - 1);
        pipe.command(3 + ids.len()).arg(b"XACK").arg(stream.as_bytes()).arg(GROUP.as_bytes());
        for id in ids {
            pipe.arg(id.as_bytes());
        }
    }
    for (at, end) in &ends {
        let PackEnd::DissolveFrom(first) = end else { continue };
        // Refused (WRONGTYPE) only when the main stream is a key of another type: the pack
        // stays pending, read back and dissolved once it is mended; no failure of the flush.
        wrong_type_ok.push(pipe.len() - 1);
        pipe.command(9).arg(b"EVAL").arg(DISSOLVE.as_bytes()).arg(b"2");
        pipe.arg(at.stream.as_bytes())
            .arg(d.keys.jobs.as_bytes())
            .arg(GROUP.as_bytes())
            .arg(at.id.as_bytes());
        pipe.number(u64::from(*first)).arg(b"0");
    }
    // Last, after this flush's XACKs: its own entries go with the trim.
    let trim_at = (!trim.is_empty()).then(|| {
        super::trim::pack(pipe, trim, super::trim::SLACK);
        pipe.len() - 2
    });
    // The transaction as `Pipeline::query` sends it (an error when a command was refused when
    // queued, EXECABORT), but each answer looked at here.
    let n = pipe.len() - 1;
    pipe.command(1).arg(b"EXEC");
    let exec = conn.req_packed_commands(pipe.bytes(), n + 1, 1)?.pop();
    let Some(Value::Array(answers)) = exec.filter(|v| matches!(v, Value::Array(a) if a.len() == n)) else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "unexpected reply",
            "EXEC's reply is not the transaction's".to_string(),
        )));
    };
    let mut trimmed = Trimmed::Not;
    for (i, answer) in answers.into_iter().enumerate() {
        if Some(i) == trim_at {
            // The outcomes are stored whatever the trim's answer (a MULTI runs every command):
            // a refused trim (an ACL without XTRIM) fails no flush; the entries wait.
            trimmed = match super::trim::answer(&answer) {
                Some((more, _)) => Trimmed::Done { more },
                None => Trimmed::Refused(format!("{answer:?}")),
            };
            continue;
        }
        if let Value::ServerError(e) = answer {
            if !(e.code() == "WRONGTYPE" && wrong_type_ok.contains(&i)) {
                return Err(e.into());
            }
        }
    }
    Ok(trimmed)
}

/// The buffers [`store`] writes a flush into, kept from one flush to the next: made anew at
/// each, they were allocations of a few kB a flush, and each such allocation has glibc's malloc
/// gather its freed small chunks first (`malloc_consolidate`, some 200 instructions per job).
#[derive(Default)]
pub(super) struct StoreRoom {
    /// The transaction.
    pipe: Packed,
    /// Batches of outcomes, empty, for the next flush's origins.
    batches: Vec<Vec<u8>>,
}

impl StoreRoom {
    /// Most bytes of each buffer kept: a flush of huge outcomes does not hold its memory for
    /// the process's life (a window of quick jobs' outcomes is a few kB).
    const KEEP_MAX: usize = 64 * 1024;
    /// Most batches kept (one per origin node of a flush).
    const BATCHES_MAX: usize = 8;

    /// Lets go of what is past the bounds above.
    fn shed(&mut self) {
        if self.pipe.capacity() > Self::KEEP_MAX {
            self.pipe = Packed::new();
        }
        self.batches.retain(|b| b.capacity() <= Self::KEEP_MAX);
        self.batches.truncate(Self::BATCHES_MAX);
    }
}

/// What became of the trim of a flush (see [`store`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Trimmed {
    /// None asked.
    Not,
    /// Done; `more`: a walk stopped at its limit, trim again soon.
    Done { more: bool },
    /// Redis refused it (its answer).
    Refused(String),
}

/// Parks a job: acknowledges and deletes its stream entry ARGV[2] (group ARGV[1]) in the job
/// stream KEYS[3], puts its fields (ARGV[5..]) in the hash KEYS[2] and its task id ARGV[4] in
/// the delayed set KEYS[1], due ARGV[3] ms from now on Redis's clock. One script, so the job is
/// in exactly one place at any time; nothing is written if the set is not a sorted set. EVAL,
/// not EVALSHA, as in `add_outcomes`. Only an entry still pending is parked (as [`DEAD`]).
pub const PARK: &str = "
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply(KEYS[1] .. ' is a ' .. kind .. ', not the sorted set of delayed jobs')
end
-- Its stream made a key of another type by someone: the entry is gone with it.
if redis.call('TYPE', KEYS[3]).ok ~= 'stream' then return 0 end
-- Acknowledged already: this is a second try of a MULTI whose answer was lost, and the job
-- may be back in the stream, or running elsewhere, by now. Parked again, it would run twice.
if redis.call('XACK', KEYS[3], ARGV[1], ARGV[2]) == 0 then
  redis.call('XDEL', KEYS[3], ARGV[2])
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[2])
return 1";

/// Dead-letters a job: acknowledges its stream entry ARGV[2] (group ARGV[1]) in the job stream
/// KEYS[2] and adds its fields (ARGV[3..]) to the dead letters KEYS[1], only if the entry was
/// still pending: a second try of a MULTI whose answer was lost adds no second dead letter
/// (which an operator's replay would run a second time).
pub const DEAD: &str = "
if redis.call('TYPE', KEYS[2]).ok ~= 'stream' then return 0 end
if redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return 1";

/// [`PARK`] of a job of a pack (the stream of packs KEYS[3], the pack's entry ARGV[2]): only
/// while the pack is pending, and without acknowledging or deleting it (its other jobs are
/// in it; it is acknowledged after, in the same MULTI, see [`store`]).
pub const PARK_PACKED: &str = "
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply(KEYS[1] .. ' is a ' .. kind .. ', not the sorted set of delayed jobs')
end
if redis.call('TYPE', KEYS[3]).ok ~= 'stream' then return 0 end
-- Not pending: a second try of a MULTI whose answer was lost (it acknowledged the pack).
if #redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
return 1";

/// [`DEAD`] of a job of a pack (the stream of packs KEYS[2], the pack's entry ARGV[2]): only
/// while the pack is pending, and without acknowledging it (as [`PARK_PACKED`]).
pub const DEAD_PACKED: &str = "
if redis.call('TYPE', KEYS[2]).ok ~= 'stream' then return 0 end
if #redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return 1";

/// Dissolves the pack ARGV[2] of the stream of packs KEYS[1] (group ARGV[1]): acknowledges it
/// and, only if that acknowledged it (it was still to be done: not by a second try of a MULTI
/// whose answer was lost, nor by another consumer), adds its jobs from the ARGV[3]-th on to the
/// main stream KEYS[2] as plain entries, their attempts raised by ARGV[4] (`pack::LUA_DISSOLVE`).
/// Its blob is read here (XRANGE), not sent back. Returns the jobs added, -1 when the pack was
/// not pending; refused (WRONGTYPE) with nothing done when KEYS[2] is a key of another type.
pub static DISSOLVE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("{}{}{}", super::pack::LUA_JOBS, super::pack::LUA_DISSOLVE, DISSOLVE_PACK)
});

const DISSOLVE_PACK: &str = "
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then return -1 end
local kind = redis.call('TYPE', KEYS[2]).ok
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is a ' .. kind .. ', not the job stream: pack ' ..
    ARGV[2] .. ' of ' .. KEYS[1] .. ' is left pending')
end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #e == 0 then return 0 end
local f = e[1][2]
for i = 1, #f, 2 do
  if f[i] == 'p' then
    return pack_dissolve(f[i + 1], KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), '', '')
  end
end
return 0";

/// Moves the jobs of the delayed set (KEYS[1]) that are due by Redis's clock back into the job
/// stream (KEYS[2]), or into their lane (ARGV[3] and the type in their field `ln`), at most
/// ARGV[2] of them; ARGV[1] is the prefix of their hashes; a job whose field `pr` is `high` or
/// `low` goes to the stream of that priority (ARGV[4] and the priority after the stream's
/// name). Atomic: consumers of every node run it, one at a time by construction, and none moves
/// a job twice. Whoever can write to Redis can write a hash's fields and any key:
/// - `ln` is a lane only if it is a handler type's name (a lowercase letter, then letters,
///   digits, `_` or `-`, ARGV[6] bytes at most) whose stream exists (every node makes the
///   streams of the lanes it routes to or reads, at start): a job whose `ln` names anything
///   else goes to the main stream of its priority, where it runs or fails with a final line,
///   never into a stream nobody reads;
/// - a destination that is a key of another type falls back to KEYS[2]; when KEYS[2] is one
///   too, the job stays in the set, due again ARGV[5] ms later: it moves once its stream is
///   back (the consumers name the key in their log), and the jobs behind it move meanwhile.
///
/// A hash of more than ARGV[7] fields is no job's: it is deleted. Returns `{moved, misrouted,
/// waiting, dropped}`: the members moved (or dropped: a member with no hash, or not a job's),
/// those whose `ln` was no lane, those left waiting, and the hashes deleted as no job's.
const MOVE_DUE: &str = "
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local function usable(key)
  local kind = redis.call('TYPE', key).ok
  return kind == 'stream' or kind == 'none'
end
local moved, misrouted, waiting, dropped = 0, 0, 0, 0
for _, id in ipairs(due) do
  local h = ARGV[1] .. id
  local dest = KEYS[2]
  if redis.call('TYPE', h).ok == 'hash' then
    -- Its fields read once (HGETALL: an ACL user of the README's least rights has no HGET).
    local f = redis.call('HGETALL', h)
    local field = {}
    for i = 1, #f, 2 do field[f[i]] = f[i + 1] end
    local pr = field['pr']
    local mark = ''
    if pr == 'high' or pr == 'low' then mark = ARGV[4] .. pr end
    dest = KEYS[2] .. mark
    local lane = field['ln']
    if lane then
      local l = ARGV[3] .. lane .. mark
      if #lane <= tonumber(ARGV[6]) and string.match(lane, '^[a-z][a-z0-9_-]*$')
          and redis.call('TYPE', l).ok == 'stream' then
        dest = l
      else
        misrouted = misrouted + 1
      end
    end
    if not usable(dest) then dest = KEYS[2] end
    if not usable(dest) then dest = nil end
    -- More fields than any job has is no job (and too many for `unpack`, whose error would
    -- stop every move): deleted, counted.
    if #f > 2 * tonumber(ARGV[7]) then
      dropped = dropped + 1
    elseif dest and #f > 0 then
      redis.call('XADD', dest, '*', unpack(f))
    end
  end
  if dest then
    redis.call('DEL', h)
    redis.call('ZREM', KEYS[1], id)
    moved = moved + 1
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), id)
    waiting = waiting + 1
  end
end
return {moved, misrouted, waiting, dropped}";

/// How often a consumer moves due jobs back into the stream (at most; an idle one blocks in
/// XREADGROUP up to `BLOCK_MS` between two looks).
const MOVE_EVERY: Duration = Duration::from_millis(250);
/// Jobs one move takes at most (the script holds Redis while it runs).
const MOVE_MAX: usize = 200;

/// How long a due job whose stream is a key of another type waits before it is looked at
/// again (see [`MOVE_DUE`]): as often as consumers look at their streams' types.
const MOVE_WAIT_MS: u64 = 3000;

/// Most fields of a job's hash in the delayed set (a job has about a dozen).
const JOB_FIELDS_MAX: usize = 64;

/// Moves due jobs of the delayed set back into the job stream (see [`MOVE_DUE`]): how many
/// moved, how many of them named no lane, how many wait for their stream, and how many were
/// no job.
fn move_due(conn: &mut Connection, d: &Durable) -> redis::RedisResult<(usize, usize, usize, usize)> {
    redis::cmd("EVAL")
        .arg(MOVE_DUE)
        .arg(2)
        .arg(&d.keys.delayed)
        .arg(&d.keys.jobs)
        .arg(format!("{}:", d.keys.delayed))
        .arg(MOVE_MAX)
        .arg(d.keys.lane_prefix())
        .arg(super::keys::PRIORITY_MARK.to_string())
        .arg(MOVE_WAIT_MS)
        .arg(crate::handler::MAX_TYPE_LEN)
        .arg(JOB_FIELDS_MAX)
        .query(conn)
}

/// XREADGROUP of `streams` (those it reads of the main one and its lanes) for consumer `me`,
/// from `from` (`>`: new jobs; `0`: its own pending ones). COUNT is per stream: with lanes, a
/// read may bring a little more than one window. Its reply is read by the crate (`conn` is the
/// consumer's connection of everything but the reads of new jobs; see [`read_new`]).
fn read_group(
    conn: &mut dyn ConnectionLike,
    streams: &[String],
    me: &str,
    count: usize,
    block_ms: Option<u64>,
    from: &str,
) -> redis::RedisResult<Vec<(String, StreamEntry)>> {
    let Some(cmd) = read_group_cmd(streams, me, count, block_ms, from) else { return Ok(Vec::new()) };
    let v: Value = cmd.query(conn)?;
    Ok(redis_io::read_streams(v))
}

/// [`read_group`] of new jobs on the connection whose replies taskd parses itself, straight into
/// entries (see [`HotConn::read_streams`]).
fn read_new(
    hot: &mut HotConn,
    streams: &[String],
    names: &[Arc<str>],
    me: &str,
    count: usize,
    block_ms: Option<u64>,
) -> redis::RedisResult<Jobs> {
    if read_group_cmd(streams, me, count, block_ms, ">").is_none() {
        return Ok(Vec::new());
    }
    let mut read = Packed::new();
    super::fair::pack_read(&mut read, me, count, block_ms, streams, b">");
    Ok(hot.read_jobs(&read, names)?.pop().unwrap_or_default())
}

/// The XREADGROUP of [`read_group`]; None when there is no stream to read (every one of them is
/// a key of another type), after waiting as a blocking read would.
fn read_group_cmd(
    streams: &[String],
    me: &str,
    count: usize,
    block_ms: Option<u64>,
    from: &str,
) -> Option<redis::Cmd> {
    if streams.is_empty() {
        if let Some(ms) = block_ms {
            std::thread::sleep(Duration::from_millis(ms));
        }
        return None;
    }
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(GROUP).arg(me).arg("COUNT").arg(count);
    if let Some(ms) = block_ms {
        cmd.arg("BLOCK").arg(ms);
    }
    cmd.arg("STREAMS").arg(streams);
    for _ in streams {
        cmd.arg(from);
    }
    Some(cmd)
}

/// The outcomes going to `origin` in this flush, with room for `room` bytes when new (in a
/// buffer of `spare`, if it has one).
fn batch_for<'a, 'b>(
    batches: &'b mut Vec<(&'a str, Vec<u8>)>,
    spare: &mut Vec<Vec<u8>>,
    origin: &'a str,
    room: usize,
) -> &'b mut Vec<u8> {
    let i = match batches.iter().position(|(o, _)| *o == origin) {
        Some(i) => i,
        None => {
            let mut batch = spare.pop().unwrap_or_default();
            batch.reserve(room);
            batches.push((origin, batch));
            batches.len() - 1
        }
    };
    &mut batches[i].1
}

/// Deletes, in one atomic script, the consumers that hold no pending job, are idle past the
/// claim time, and have no live connection (ARGV[4..] names the live ones). Atomic because
/// XGROUP DELCONSUMER drops what a consumer holds: a check followed by a separate delete could
/// lose a job the consumer took in between. Deleting a live one by mistake would be harmless:
/// Redis makes it again when it next serves it.
const REMOVE_GONE: &str = r"
local live = {}
for i = 4, #ARGV do live[ARGV[i]] = true end
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  local name = f['name']
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) and name ~= ARGV[3] and not live[name] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    table.insert(removed, name)
  end
end
return removed
";

/// The consumers with a connection open now, from `CLIENT LIST`.
fn live_consumers(conn: &mut Connection) -> redis::RedisResult<Vec<String>> {
    let list: String = redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("normal").query(conn)?;
    Ok(list
        .lines()
        .filter_map(|line| line.split(' ').find_map(|kv| kv.strip_prefix("name=")))
        .filter_map(|name| name.strip_prefix(CLIENT_PREFIX))
        .map(str::to_string)
        .collect())
}

fn remove_gone_consumers(
    conn: &mut Connection,
    d: &Durable,
    stream: &str,
    me: &str,
) -> redis::RedisResult<()> {
    let live = match live_consumers(conn) {
        Ok(live) => live,
        Err(e) => {
            // CLIENT may be forbidden (ACL): then consumers are left alone, never deleted blind.
            tracing::debug!("cannot list Redis clients ({e}); leaving consumers as they are");
            return Ok(());
        }
    };
    let removed: Vec<String> = redis::cmd("EVAL")
        .arg(REMOVE_GONE)
        .arg(1)
        .arg(stream)
        .arg(GROUP)
        .arg(d.claim_after.as_millis() as u64)
        .arg(me)
        .arg(&live)
        .query(conn)?;
    for name in removed {
        tracing::info!("deleted consumer {name}: its process is gone and it holds nothing");
    }
    Ok(())
}

/// `base` stretched by up to a quarter, so the consumers of a node do not sweep in step.
fn jitter(base: Duration) -> Duration {
    let spread = (std::process::id() % 1000) as f64 / 4000.0;
    base.mul_f64(1.0 + spread).max(Duration::from_millis(50))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn at(stream: &str, id: &str) -> At {
        At { stream: Arc::from(stream), id: Arc::from(id) }
    }

    fn place(index: u32, count: u32) -> Option<InPack> {
        Some(InPack { index, count })
    }

    fn job(task_id: u64) -> JobEntry {
        JobEntry {
            origin: "web-1".into(),
            task_id,
            session: 0,
            worker: 0,
            context: Vec::new(),
            data: b"{}".to_vec(),
            replays: 0,
            attempts: 0,
            retries: 0,
            key: None,
        }
    }

    fn done(id: At, pack: Option<InPack>, task_id: u64) -> Completion {
        let reply = ReplyEntry { task_id, ok: true, ..ReplyEntry::default() };
        Completion::Done { id, pack, job: Arc::new(job(task_id)), reply }
    }

    #[test]
    fn a_pack_written_whole_is_complete_and_one_cut_short_is_dissolved_from_its_first_job_not_run() {
        let (a, b, c) = (at("{q}:jobs!p", "1-1"), at("{q}:jobs!p", "1-2"), at("{q}:jobs", "1-3"));
        let mut flush = vec![
            done(a.clone(), place(1, 3), 1),
            done(c.clone(), None, 9),
            Completion::Drop { id: a.clone(), pack: place(2, 3) },
            done(b.clone(), place(1, 2), 4),
        ];
        assert_eq!(pack_ends(&flush), [(&a, PackEnd::DissolveFrom(3)), (&b, PackEnd::DissolveFrom(2))]);
        // Its last job (or its damaged rest, an item that is no job) ends it.
        flush.push(Completion::Drop { id: b.clone(), pack: place(2, 2) });
        flush.push(done(a.clone(), place(3, 3), 3));
        assert_eq!(pack_ends(&flush), [(&a, PackEnd::Complete), (&b, PackEnd::Complete)]);
        assert!(pack_ends(&flush[1..2]).is_empty(), "a plain entry is no pack");
    }

    #[test]
    fn a_pack_is_one_entry_held_whatever_its_jobs() {
        let (a, b, c) = (at("{q}:jobs!p", "1-1"), at("{q}:jobs!p", "1-2"), at("{q}:jobs", "1-3"));
        let items = [(&a, place(1, 2)), (&c, None), (&a, place(2, 2)), (&b, place(1, 1)), (&c, None)];
        assert_eq!(entries_in(items), 4);
        assert_eq!(entries_in([]), 0);
    }

    /// A connection that answers a flush's MULTI as Redis would (every command queued and run)
    /// and keeps the commands sent, each as its arguments.
    #[derive(Default)]
    struct Recorder {
        sent: Vec<Vec<Vec<u8>>>,
    }

    impl ConnectionLike for Recorder {
        fn req_packed_command(&mut self, _: &[u8]) -> redis::RedisResult<Value> {
            Ok(Value::Okay)
        }

        fn req_packed_commands(&mut self, cmd: &[u8], _: usize, _: usize) -> redis::RedisResult<Vec<Value>> {
            let mut at = 0;
            while at < cmd.len() {
                let (v, used) = super::super::hot::parse(&cmd[at..]).unwrap().unwrap();
                at += used;
                let Value::Array(args) = v else { panic!("not a command") };
                self.sent.push(args.into_iter().map(|a| redis_io::as_bytes(a).unwrap()).collect());
            }
            // MULTI and EXEC are no command of the transaction.
            Ok(vec![Value::Array(vec![Value::Int(1); self.sent.len() - 2])])
        }

        fn get_db(&self) -> i64 {
            0
        }

        fn check_connection(&mut self) -> bool {
            true
        }

        fn is_open(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_flush_acknowledges_a_finished_pack_once_and_dissolves_the_rest_of_a_pack_cut_short() {
        let config = ServerConfig {
            redis_url: Some("redis://127.0.0.1:1".into()),
            node_id: Some("web-1".into()),
            ..Default::default()
        };
        let d = Durable::from_config(&config).unwrap();
        let packs = d.keys.packs();
        let (a, b, plain) = (at(&packs, "5-1"), at(&packs, "5-2"), at(&d.keys.jobs, "5-3"));
        let later = |id: At, pack, task_id| Completion::Later {
            id,
            pack,
            job: job(task_id),
            wait: Duration::from_secs(1),
            notice: None,
        };
        let flush = [
            done(a.clone(), place(1, 3), 1),
            later(a.clone(), place(2, 3), 2),
            Completion::Dead { id: a.clone(), pack: place(3, 3), job: job(3), why: "x".into(), attempts: 0 },
            done(plain.clone(), None, 7),
            done(b.clone(), place(1, 4), 4),
            later(b.clone(), place(2, 4), 5),
        ];
        let mut conn = Recorder::default();
        store(&mut conn, &d, &flush, &[], &mut StoreRoom::default()).unwrap();
        let text = |arg: &[u8]| String::from_utf8_lossy(arg).into_owned();
        let xacks: Vec<Vec<String>> = conn
            .sent
            .iter()
            .filter(|c| c[0] == b"XACK")
            .map(|c| c[1..].iter().map(|a| text(a)).collect())
            .collect();
        // One XACK per stream: the plain entry in the main stream, pack a once in the packs'.
        let mut want = vec![vec![d.keys.jobs.clone(), "taskd".into(), "5-3".into()]];
        want.push(vec![packs.clone(), "taskd".into(), "5-1".into()]);
        assert_eq!(xacks, want);
        let evals: Vec<&Vec<Vec<u8>>> = conn.sent.iter().filter(|c| c[0] == b"EVAL").collect();
        let script = |c: &Vec<Vec<u8>>| text(&c[1]);
        // The packed job parked and dead-lettered without touching their pack, before it ends.
        let parks: Vec<usize> = (0..evals.len()).filter(|&i| script(evals[i]) == PARK_PACKED).collect();
        assert_eq!(parks.len(), 2);
        assert!(evals.iter().any(|c| script(c) == DEAD_PACKED));
        assert!(!evals.iter().any(|c| script(c) == PARK || script(c) == DEAD));
        let dissolve: Vec<&&Vec<Vec<u8>>> = evals.iter().filter(|c| script(c) == *DISSOLVE).collect();
        assert_eq!(dissolve.len(), 1, "pack b only");
        let args: Vec<String> = dissolve[0][2..].iter().map(|a| text(a)).collect();
        assert_eq!(args, ["2", &packs, &d.keys.jobs, "taskd", "5-2", "3", "0"]);
        let last_park = conn.sent.iter().rposition(|c| c[0] == b"EVAL" && text(&c[1]) == PARK_PACKED);
        let first_end = conn.sent.iter().position(|c| {
            (c[0] == b"XACK" && text(&c[1]) == packs) || (c[0] == b"EVAL" && text(&c[1]) == *DISSOLVE)
        });
        assert!(last_park < first_end, "a packed job's script runs while its pack is pending");
    }
}
