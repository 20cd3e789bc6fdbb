//! The Redis bridge: a child of the master that does the master's Redis I/O, so that the
//! master's reactor never waits on Redis.
//!
//! Two threads (this process never forks, so threads are safe here):
//! - the store loop reads the master's frames and runs them as one pipeline per read: the
//!   jobs of a store batch (XADD), then `Stored` for every batch whose end it has seen; also
//!   the kept results and the deletion of reply entries the master has acted on;
//! - the reply loop blocks in XREAD on this node's reply stream and passes each outcome to the
//!   master as a `Reply` frame. It never deletes them: the master asks, once it has acted.
//!
//! While Redis cannot be reached, the store loop says so in shared memory, which makes the
//! workers refuse new jobs with a clear error, and answers any batch it gets with the reason.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Value;

use super::entry::{outcomes_of_entry, JobEntry};
use super::hot::HotConn;
use super::redis_io::{self, is_connection_error};
use super::resp::Packed;
use super::startup::{self, lease_token};
use super::ticks;
use super::Durable;
use crate::app::Priority;
use crate::ipc::envelope::{FromBridge, ToBridge};
use crate::process::ProcessError;
use crate::shm::Shared;

/// How long one XREAD of the reply stream blocks.
const REPLY_BLOCK_MS: u64 = 1000;
/// Most reply entries passed on per read.
const REPLY_COUNT: usize = 512;
/// Back-off bounds between attempts to reach Redis again.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

type MasterOut = Arc<Mutex<UnixStream>>;

/// The bridge process's body: `Ok` when the master closed the channel (a clean stop).
/// `replies_from`: the last reply stream entry the master has already seen (read at start).
pub fn run(
    d: &Durable,
    channel: OwnedFd,
    shared: &'static Shared,
    replies_from: &str,
) -> Result<(), ProcessError> {
    let stream = UnixStream::from(channel);
    let prepared = stream.set_nonblocking(false).and_then(|()| stream.try_clone());
    let out: MasterOut = Arc::new(Mutex::new(prepared.map_err(ProcessError::io("cannot use its channel"))?));
    {
        let (d, out, from) = (d.clone(), Arc::clone(&out), replies_from.to_string());
        std::thread::Builder::new().name("replies".into()).spawn(move || {
            // Without this thread no outcome would reach the master: if it fails, the whole
            // bridge goes, and the master starts a new one.
            let _ =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reply_loop(&d, &out, shared, from)));
            tracing::error!("redis bridge: the reply reader failed; the bridge exits");
            crate::process::exit_now(1)
        })
    }
    .map_err(ProcessError::io("cannot start its reply reader"))?;
    store_loop(d, stream, &out, shared)
}

fn send(out: &MasterOut, bytes: &[u8]) -> io::Result<()> {
    let mut stream = out.lock().map_err(|_| io::Error::other("the other thread panicked"))?;
    stream.write_all(bytes)
}

/// Something the master asked for, in order.
#[derive(Clone)]
pub(super) enum Item {
    /// `run_at_ms`: a job for later (Unix ms), parked in the delayed set; 0: into the stream.
    Store {
        task_id: u64,
        session: u64,
        worker: u32,
        run_at_ms: u64,
        /// Where its context and its data are in the bytes of the round's jobs (see
        /// `store_loop`): one buffer for all, not two allocations per job.
        context: Range<usize>,
        data: Range<usize>,
        priority: Priority,
        /// A schedule's tick: stored only if this node claims it (see [`super::ticks`]).
        tick: Option<Box<ticks::Claim>>,
        /// Its deduplication key in hex and its `dedup_ttl_ms` (see [`super::dedup`]).
        key: Option<(String, u64)>,
    },
    End(u64),
}

/// Reconnects with a growing back-off, noting in shared memory whether Redis is reachable.
struct Link<'a> {
    d: &'a Durable,
    shared: &'static Shared,
    /// Its replies read by taskd's own parser where the URL allows (see [`super::hot`]): the
    /// crate's cost some 1,500 instructions per job here (callgrind).
    conn: Option<HotConn>,
    /// The marker of the next round of stores, watched on `conn` (see [`super::round`]).
    armed: Option<String>,
    /// The marker of the last round stored and answered: the next round deletes it.
    answered: Option<String>,
    rounds: Rounds,
    retry_at: Instant,
    backoff: Duration,
}

impl Link<'_> {
    fn get(&mut self) -> Result<&mut HotConn, String> {
        if self.conn.is_none() {
            if Instant::now() < self.retry_at {
                return Err(format!("Redis at {} is unreachable; retrying", self.d.shown));
            }
            // Connected with the next round's marker watched: a round's first try is then
            // one exchange (see [`super::round`]).
            let marker = self.d.keys.round_of(&self.d.node, &self.rounds.next());
            let armed = redis_io::connect_hot(&self.d.url, Some(redis_io::REPLY_LIMIT))
                .and_then(|mut c| super::round::arm(&mut c, &marker).map(|()| c));
            match armed {
                Ok(c) => {
                    tracing::info!("redis bridge: connected to {}", self.d.shown);
                    self.conn = Some(c);
                    self.armed = Some(marker);
                    self.backoff = RETRY_MIN;
                    self.shared.set_durable_down(false);
                }
                Err(e) => {
                    self.failed(&e);
                    return Err(format!(
                        "Redis at {} is unreachable: {}",
                        self.d.shown,
                        redis_io::describe(&e)
                    ));
                }
            }
        }
        self.conn.as_mut().ok_or_else(|| "no connection".to_string())
    }

    fn failed(&mut self, e: &redis::RedisError) {
        if !is_connection_error(e) {
            return;
        }
        if !self.shared.durable_down() {
            tracing::error!(
                "redis bridge: lost Redis at {}: {}; new jobs are refused until it is back",
                self.d.shown,
                redis_io::describe(e)
            );
        }
        self.shared.set_durable_down(true);
        self.conn = None;
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }
}

fn store_loop(
    d: &Durable,
    mut input: UnixStream,
    out: &MasterOut,
    shared: &'static Shared,
) -> Result<(), ProcessError> {
    let mut link = Link {
        d,
        shared,
        conn: None,
        armed: None,
        answered: None,
        rounds: Rounds::new(),
        retry_at: Instant::now(),
        backoff: RETRY_MIN,
    };
    let _ = link.get();
    // The master took the node's name at start. It asks for each renewal itself (a master
    // that hangs asks for none, and its name lapses); the name is given back when the master
    // closes the channel (a clean stop).
    let token = lease_token(nix::unistd::getppid().as_raw() as u32);
    let mut renew = false;
    let mut buf = vec![0u8; 256 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut items: Vec<Item> = Vec::new();
    // The contexts and data of `items`, and the reply entries to delete (`trims`), copied out
    // of `pending` into buffers kept from round to round.
    let mut bytes: Vec<u8> = Vec::new();
    let mut trims: Vec<Range<usize>> = Vec::new();
    let mut trim_bytes: Vec<u8> = Vec::new();
    let mut keeps: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut admin: Vec<(u64, Vec<u8>)> = Vec::new();
    // The batch still open (its end not read yet), over the rounds of its jobs so far.
    let mut open = OpenBatch::new();
    // The time of the next job to store, from the `StoreAt` frame right before it; its
    // priority and its tick, from the frames before it.
    let mut next_at: Option<(u64, u64)> = None;
    let mut next_priority: Option<(u64, Priority)> = None;
    let mut next_tick: Option<Box<ticks::Claim>> = None;
    // The deduplication key of the next job to store, from the `StoreKey` frame before it.
    let mut next_key: Option<(u64, String, u64)> = None;
    let mut watches = super::dedup::Watches::default();
    let mut cancels: std::collections::VecDeque<super::cancel::Cancel> = Default::default();
    let mut short = crate::throttle::Throttle::default();
    let mut tick_answers = Vec::new();
    loop {
        // Idle, it sleeps until the master writes; while Redis is away, it wakes every second
        // to find it again, so that workers take jobs again without waiting for one to fail.
        let away = link.conn.is_none() || shared.durable_down();
        // Duplicates waiting for their first job's end: their keys are read on a timer.
        let timeout = match (away.then_some(RETRY_MAX), watches.wait()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Cancels under way go on at once, after what the master wrote meanwhile.
        let timeout = match cancels.is_empty() {
            true => timeout,
            false => Some(Duration::from_millis(1)),
        };
        let _ = input.set_read_timeout(timeout);
        match input.read(&mut buf) {
            Ok(0) => {
                if let Ok(conn) = link.get() {
                    startup::release_lease(conn, d, &token);
                }
                return Ok(());
            }
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if away {
                    // The reply reader may have seen Redis go: this connection may be stale too.
                    link.conn = None;
                    let _ = link.get();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProcessError::Io { what: "reading from the master failed", source: e }),
        }
        let mut used = 0;
        loop {
            let (frame, n) = match ToBridge::decode(&pending[used..]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(ProcessError::Corrupt(e)),
            };
            match frame {
                ToBridge::Store { task_id, session, worker, context, data, .. } => items.push(Item::Store {
                    task_id,
                    session,
                    worker,
                    run_at_ms: next_at.take().filter(|(id, _)| *id == task_id).map_or(0, |(_, at)| at),
                    context: copy(&mut bytes, context),
                    data: copy(&mut bytes, data),
                    priority: next_priority
                        .take()
                        .filter(|(id, _)| *id == task_id)
                        .map(|(_, p)| p)
                        .unwrap_or_default(),
                    tick: next_tick.take().filter(|c| c.task_id == task_id),
                    key: next_key.take().filter(|(id, _, _)| *id == task_id).map(|(_, hex, ttl)| (hex, ttl)),
                }),
                ToBridge::StoreKey { task_id, dedup_ttl_ms, key } => {
                    next_key = Some((task_id, super::dedup::hex(key), dedup_ttl_ms))
                }
                ToBridge::WatchKey { task_id, holder: b"", .. } => watches.remove(task_id),
                ToBridge::WatchKey { task_id, digest, holder } => {
                    watches.add(&d.keys, task_id, &String::from_utf8_lossy(digest), holder);
                }
                ToBridge::Cancel { task_id, stream } => {
                    cancels.push_back(super::cancel::Cancel::new(task_id, stream))
                }
                ToBridge::StoreAt { task_id, run_at_ms } => next_at = Some((task_id, run_at_ms)),
                ToBridge::StorePriority { task_id, priority } => {
                    next_priority = Some((task_id, Priority::from_index(priority)))
                }
                ToBridge::ClaimTick { task_id, tick_ms, ttl_ms, name } => {
                    next_tick = Some(Box::new(ticks::Claim::new(task_id, tick_ms, ttl_ms, name)))
                }
                ToBridge::StoreEnd { batch } => items.push(Item::End(batch)),
                ToBridge::Trim { entry } => trims.push(copy(&mut trim_bytes, entry)),
                ToBridge::KeepResult { task_id, line } => keeps.push((task_id, line.to_vec())),
                ToBridge::RenewLease => renew = true,
                ToBridge::Admin { request, op } => admin.push((request, op.to_vec())),
            }
            used += n;
        }
        pending.drain(..used);
        // The dashboard's requests: small, and rare (one overview every two seconds while a
        // dashboard is open); answered before this round's jobs, which wait that long.
        for (request, op) in admin.drain(..) {
            // A replay's transaction ends the WATCH of the next round's marker.
            link.armed = None;
            let answer = match link.get() {
                Ok(conn) => super::admin::handle(conn, d, &op),
                Err(why) => serde_json::json!({"ok": false, "error": why}),
            };
            let mut frame = Vec::new();
            FromBridge::AdminAnswer { request, answer: answer.to_string().as_bytes() }.encode(&mut frame);
            if send(out, &frame).is_err() {
                return Ok(());
            }
        }
        if !cancels.is_empty() || watches.wait().is_some() {
            let frames = cancels_and_watches(&mut link, &mut cancels, &mut watches);
            if !frames.is_empty() && send(out, &frames).is_err() {
                return Ok(());
            }
        }
        if items.is_empty() && trims.is_empty() && keeps.is_empty() {
            renew_if_asked(&mut link, &token, &mut renew, out);
            continue;
        }
        // Jobs not stored because another holds their key, or because their command failed
        // inside the round: said before their batch's end.
        let mut dups = Vec::new();
        let mut failed = Failed::default();
        let outcome = match link.get() {
            Err(why) => Err(why),
            Ok(_) => match store_once(
                &mut link,
                &items,
                &bytes,
                &keeps,
                &trim_ids(&trims, &trim_bytes),
                &mut failed,
            ) {
                Ok(replies) => {
                    // Each job of a round answered as it is: the ones whose command failed
                    // are not stored, and said so alone; the others are.
                    let (stored, replies) = match failed.commands.is_empty() {
                        true => (None, replies),
                        false => {
                            let (stored, replies) =
                                refused(&mut link, &items, &bytes, replies, &failed, &mut dups);
                            (Some(stored), replies)
                        }
                    };
                    let stored = stored.as_deref().unwrap_or(&items);
                    // The claims' answers come first, in the order of their jobs
                    // (see `answered`): who claimed each tick, then each key.
                    let (ticks, keys) = answered(stored, &replies);
                    ticks::answers(d, stored, &ticks, &mut tick_answers);
                    duplicates(d, stored, &keys, &mut watches, &mut dups);
                    Ok(replicated(d, stored, &replies, &mut short))
                }
                Err(text) => Err(text),
            },
        };
        // Who claimed each tick, before the `Stored` of its batch: a lost tick's job is dropped.
        let mut acks = std::mem::take(&mut tick_answers);
        acks.extend(dups);
        for item in items.drain(..) {
            match item {
                Item::Store { task_id, .. } => open.job(task_id, &outcome),
                Item::End(batch) => open.end(batch, &mut acks),
            }
        }
        idle(&mut bytes);
        // Kept results and deletions are idempotent: on failure they wait for the next round.
        if outcome.is_ok() {
            trims.clear();
            idle(&mut trim_bytes);
            keeps.clear();
        }
        if !acks.is_empty() && send(out, &acks).is_err() {
            // The master closed its end: as good as a clean stop, nobody is left to tell.
            return Ok(());
        }
        renew_if_asked(&mut link, &token, &mut renew, out);
    }
}

/// Appends `part` to `bytes`: where it is there.
fn copy(bytes: &mut Vec<u8>, part: &[u8]) -> Range<usize> {
    let from = bytes.len();
    bytes.extend_from_slice(part);
    from..bytes.len()
}

/// Most room a buffer of the store loop keeps while nothing is in it: a burst's is given back.
const KEEP_ROOM: usize = 256 * 1024;

/// Empties a buffer of the store loop whose contents were used, keeping its room unless it
/// grew past [`KEEP_ROOM`].
fn idle(bytes: &mut Vec<u8>) {
    bytes.clear();
    if bytes.capacity() > KEEP_ROOM {
        *bytes = Vec::new();
    }
}

/// The reply entries to delete, as the ids they are.
fn trim_ids<'a>(trims: &[Range<usize>], bytes: &'a [u8]) -> Vec<&'a [u8]> {
    trims.iter().map(|r| &bytes[r.clone()]).collect()
}

/// The jobs of a stored round whose command failed inside it (`failed`: the commands, by index
/// in the round, and the jobs each carried, see `pipeline`): each gets a
/// [`FromBridge::NotStored`] in `frames`, which says which of its keys is of another type when
/// it can; every job of a failed pack does. Every command of a round fails before its first
/// write (a script checks the types it writes to first; an XADD to a key of another type
/// writes nothing), so such a job is in no stream, and will not run.
/// Returns the round's other jobs, and the answers (`replies`) without the failed ones'.
/// A failed result kept or deletion is logged and not tried again (it would fail again).
fn refused(
    link: &mut Link<'_>,
    items: &[Item],
    bytes: &[u8],
    replies: Vec<Value>,
    failed: &Failed,
    frames: &mut Vec<u8>,
) -> (Vec<Item>, Vec<Value>) {
    let d = link.d;
    let round = &failed.round;
    let mut stored = Vec::with_capacity(items.len());
    let mut answers = replies.into_iter();
    let mut kept = Vec::with_capacity(failed.commands.len());
    // Why each failed command stored nothing, asked and logged once: a pack's jobs share it.
    let mut whys: Vec<(usize, String)> = Vec::new();
    let mut jobs = 0;
    for item in items {
        let Item::Store { task_id, tick, key, .. } = item else {
            stored.push(item.clone());
            continue;
        };
        let error = failed.of_job(jobs);
        jobs += 1;
        let answer = if tick.is_some() || key.is_some() { answers.next() } else { None };
        let Some((command, e)) = error else {
            stored.push(item.clone());
            kept.extend(answer);
            continue;
        };
        let why = match whys.iter().find(|(c, _)| c == command) {
            Some((_, why)) => why,
            None => {
                let packed = round.packs.contains(command);
                let named = match link.get() {
                    Ok(conn) => wrong_keys(conn, d, item, bytes, packed),
                    Err(_) => None,
                };
                let why = match named {
                    Some(keys) => format!(
                        "not stored in Redis, so it will not run: {keys} (someone else wrote it); delete \
                         it and submit the job again"
                    ),
                    None => format!("not stored in Redis, so it will not run: {}", redis_io::describe(e)),
                };
                match packed {
                    true => {
                        let n = round.carrier.iter().filter(|c| *c == command).count();
                        tracing::error!(
                            "redis bridge: a pack of {n} jobs, job {task_id} among them, {why}; the \
                             other commands of its round were stored"
                        )
                    }
                    false => {
                        tracing::error!(
                            "redis bridge: job {task_id} {why}; the other jobs of its round were stored"
                        )
                    }
                }
                whys.push((*command, why));
                &whys[whys.len() - 1].1
            }
        };
        FromBridge::NotStored { task_id: *task_id, why: why.as_bytes() }.encode(frames);
    }
    for (i, e) in failed.commands.iter().filter(|(i, _)| *i >= round.job_commands) {
        tracing::error!(
            "redis bridge: a kept result or a deletion of handled replies failed ({}): {}; not tried again",
            i - round.job_commands,
            redis_io::describe(e)
        );
    }
    kept.extend(answers);
    (stored, kept)
}

/// The keys job `item` writes that are of another type than taskd writes there, as
/// `KEY is a TYPE key, not a WANTED`; None when none is (or they cannot be read). `packed`:
/// it was written in a pack, whose stream is the only key it wrote (see `pipeline`).
fn wrong_keys(conn: &mut HotConn, d: &Durable, item: &Item, bytes: &[u8], packed: bool) -> Option<String> {
    let Item::Store { run_at_ms, data, priority, tick, key, .. } = item else { return None };
    let stream = match packed {
        true => d.keys.packs(),
        false => d.stream_of(&bytes[data.clone()], *priority),
    };
    let mut keys: Vec<(String, &[&str])> = vec![(stream, &["stream"])];
    if *run_at_ms > 0 {
        keys.push((d.keys.delayed.clone(), &["zset"]));
    }
    if let Some(claim) = tick {
        keys.push((d.keys.tick(&claim.name, claim.tick_ms), &["string"]));
    }
    if let Some((hex, _)) = key {
        keys.push((d.keys.dedup(hex), &["string"]));
    }
    let mut pipe = redis::pipe();
    for (k, _) in &keys {
        pipe.cmd("TYPE").arg(k);
    }
    let types: Vec<String> = pipe.query(conn).ok()?;
    let wrong: Vec<String> = keys
        .iter()
        .zip(types)
        .filter(|((_, want), kind)| kind != "none" && !want.contains(&kind.as_str()))
        .map(|((k, want), kind)| format!("{k} is a {kind} key, not a {}", want.join(" or ")))
        .collect();
    (!wrong.is_empty()).then(|| wrong.join(", and "))
}

/// The batch whose end the bridge has not read yet: its jobs may come in more than one read of
/// the master's channel, and so be stored by more than one round.
struct OpenBatch {
    /// Some of its jobs were stored (by a round that was).
    stored: bool,
    /// Its jobs of rounds that stored nothing, with why.
    failed: Vec<(u64, String)>,
    /// The fewest replicas WAIT confirmed for a round of it, when short.
    replicas: u32,
}

impl OpenBatch {
    fn new() -> OpenBatch {
        OpenBatch { stored: false, failed: Vec::new(), replicas: FromBridge::ALL_REPLICAS }
    }

    /// Job `task_id` of it was in a round that came to `outcome` (the replicas, or why not).
    fn job(&mut self, task_id: u64, outcome: &Result<u32, String>) {
        match outcome {
            Ok(replicas) => {
                self.stored = true;
                self.replicas = self.replicas.min(*replicas);
            }
            Err(why) => self.failed.push((task_id, why.clone())),
        }
    }

    /// Its end, read: its answer to the master in `out`. All of it failed: the batch fails
    /// (its clients hear `failed`, nothing of what was held for them). Stored by one round and
    /// not by another: each job not stored fails alone, as one Redis refused inside a round
    /// does (`refused`), and the batch is stored: `failed` for the whole batch would be untrue
    /// for its stored jobs, which run.
    fn end(&mut self, batch: u64, out: &mut Vec<u8>) {
        let open = std::mem::replace(self, OpenBatch::new());
        let error = match open.failed.last() {
            Some(_) if open.stored => {
                for (task_id, why) in &open.failed {
                    FromBridge::NotStored { task_id: *task_id, why: why.as_bytes() }.encode(out);
                }
                ""
            }
            Some((_, why)) => why.as_str(),
            None => "",
        };
        FromBridge::Stored { batch, replicas: open.replicas, error: error.as_bytes() }.encode(out);
    }
}

/// Calls of a cancel's script per turn of the bridge (each looks at up to 500 queued jobs).
const CANCEL_CALLS: usize = 4;

/// How long a round whose stores Redis certainly did not take is tried again (its jobs' clients
/// wait for `accepted` meanwhile); past it, they get `failed`, which is then true.
const STORE_AGAIN_FOR: Duration = Duration::from_secs(10);
/// How long the bridge tries to learn whether a round whose answer was lost was stored (its
/// clients wait for their answer meanwhile: what they hear must be true). Past it, Redis still
/// hung, they get `failed` saying that their job may still run.
const SETTLE_FOR: Duration = Duration::from_secs(8);

/// The names of this bridge's rounds (`RUN-SEQ`): a new bridge of the node never reuses the
/// marker of an earlier one's round.
struct Rounds {
    run: String,
    seq: u64,
}

impl Rounds {
    fn new() -> Rounds {
        let ms = crate::app::unix_ms(std::time::SystemTime::now());
        Rounds { run: format!("{}.{ms}", std::process::id()), seq: 0 }
    }

    fn next(&mut self) -> String {
        self.seq += 1;
        format!("{}-{}", self.run, self.seq)
    }
}

impl Link<'_> {
    /// [`Link::get`], waiting for the back-off until `deadline`.
    fn get_by(&mut self, deadline: Instant) -> Result<&mut HotConn, String> {
        loop {
            if self.conn.is_some() || Instant::now() >= deadline || Instant::now() >= self.retry_at {
                break;
            }
            std::thread::sleep(self.retry_at.saturating_duration_since(Instant::now()).min(RETRY_MAX));
        }
        self.get()
    }
}

/// Stores one round so that its answer is true: the claims' answers and WAIT's when stored; an
/// error only when none of it was stored, nor ever will be (see [`super::round`]). A round
/// that Redis refused for a lost connection or a moving Cluster slot is tried again, as a new
/// round with the same task ids, for [`STORE_AGAIN_FOR`].
/// `failed`: the commands that failed inside a stored round (by their index in it), which
/// stored nothing of theirs, and the jobs each command carried (see `pipeline`); the rest of
/// the round is stored.
fn store_once(
    link: &mut Link<'_>,
    items: &[Item],
    bytes: &[u8],
    keeps: &[(u64, Vec<u8>)],
    trims: &[&[u8]],
    failed: &mut Failed,
) -> Result<Vec<Value>, String> {
    let d = link.d;
    let mut round = super::round::begin();
    failed.round = pipeline(d, items, bytes, keeps, trims, &mut round);
    let kept = &failed.round.kept;
    // Nothing to send (a round of batch ends alone).
    if kept.is_empty() {
        return Ok(Vec::new());
    }
    let stores = items.iter().any(|i| matches!(i, Item::Store { .. }));
    let wait = (d.wait_replicas > 0 && stores).then_some((d.wait_replicas, WAIT_LIMIT_MS));
    let again_until = Instant::now() + STORE_AGAIN_FOR;
    loop {
        link.get_by(again_until)?;
        let armed = link.armed.take();
        let conn = link.conn.as_mut().ok_or_else(|| "no connection to Redis".to_string())?;
        let marker = match armed {
            Some(marker) => marker,
            None => {
                let marker = d.keys.round_of(&d.node, &link.rounds.next());
                if let Err(e) = super::round::arm(conn, &marker) {
                    // Only a WATCH was sent: nothing of the round.
                    let text = format!("could not store the job in Redis: {}", redis_io::describe(&e));
                    link.failed(&e);
                    link.conn = None;
                    if Instant::now() >= again_until {
                        return Err(text);
                    }
                    continue;
                }
                marker
            }
        };
        let next = d.keys.round_of(&d.node, &link.rounds.next());
        let (tried, armed) =
            super::round::attempt(conn, &marker, &next, link.answered.as_deref(), &mut round, kept, wait);
        if armed {
            link.armed = Some(next);
        }
        let refused = match tried {
            super::round::Tried::Stored(replies) => {
                link.answered = Some(marker);
                return Ok(replies);
            }
            super::round::Tried::Partly(replies, mut errors) => {
                // A key not of its type (written by someone else) failed its command alone:
                // the rest of the round is stored (see `refused`).
                link.answered = Some(marker);
                failed.commands.append(&mut errors);
                return Ok(replies);
            }
            super::round::Tried::Refused(e) => e,
            super::round::Tried::Unknown(e) => {
                let lost = format!("the answer of Redis was lost: {}", redis_io::describe(&e));
                tracing::warn!("redis bridge: {lost}; asking Redis whether the round was stored");
                link.failed(&e);
                link.conn = None;
                match settle_round(link, &marker) {
                    Ok(true) => {
                        link.answered = Some(marker);
                        return recovered(link, items, bytes, wait, failed);
                    }
                    Ok(false) => {
                        tracing::warn!("redis bridge: {lost}; the round was not stored, and never will be");
                        e
                    }
                    Err(why) => {
                        return Err(format!(
                            "{lost}, and whether its jobs were stored is unknown ({why}): they may run"
                        ))
                    }
                }
            }
        };
        let text = format!("could not store the job in Redis: {}", redis_io::describe(&refused));
        link.failed(&refused);
        if !is_connection_error(&refused) || Instant::now() >= again_until {
            return Err(text);
        }
    }
}

/// Whether the round of `marker` was stored, asked from a new connection until [`SETTLE_FOR`].
fn settle_round(link: &mut Link<'_>, marker: &str) -> Result<bool, String> {
    let until = Instant::now() + SETTLE_FOR;
    loop {
        let why = match link.get_by(until) {
            Err(why) => why,
            Ok(conn) => match super::round::settle(conn, marker) {
                Ok(stored) => return Ok(stored),
                Err(e) => {
                    let why = redis_io::describe(&e);
                    link.failed(&e);
                    if !is_connection_error(&e) {
                        return Err(why);
                    }
                    why
                }
            },
        };
        if Instant::now() >= until {
            return Err(why);
        }
    }
}

/// The answers of a round that was stored but whose answers were lost: the claims again (a
/// claim of a job already stored answers as stored, and stores nothing), then WAIT, from this
/// connection (WAIT counts every write Redis had when it is asked). If Redis is lost again,
/// the claims count as stored and WAIT as no replica. A claim that fails again failed in the
/// round too (one that had stored its job answers 1 before it writes or reads anything else):
/// its command is in `failed`, as [`store_once`] says. A round with packs also asks the type of
/// the pack stream: not a stream, its packs failed (an XADD to a key of another type writes
/// nothing; one made so since wiped the pack out anyway), and their jobs are in `failed`.
/// (A job of the round without a claim whose XADD failed otherwise cannot be told: it counts
/// as stored.)
fn recovered(
    link: &mut Link<'_>,
    items: &[Item],
    bytes: &[u8],
    wait: Option<(u32, u64)>,
    failed: &mut Failed,
) -> Result<Vec<Value>, String> {
    let d = link.d;
    // The claims (of a key, of a tick) are the only answers wanted: sent again alone (never
    // packed: a pack holds no claim). With each, its job's index among the round's jobs.
    let (at, keyed): (Vec<usize>, Vec<Item>) = items
        .iter()
        .filter(|i| matches!(i, Item::Store { .. }))
        .enumerate()
        .filter(|(_, i)| matches!(i, Item::Store { key: Some(_), .. } | Item::Store { tick: Some(_), .. }))
        .map(|(n, i)| (n, i.clone()))
        .unzip();
    let mut again = Packed::new();
    pipeline(d, &keyed, bytes, &[], &[], &mut again);
    // A pack holds up to 128 jobs: its failure is asked for, not taken as stored (before WAIT,
    // whose answer follows the claims').
    let packs = (!failed.round.packs.is_empty()).then(|| d.keys.packs());
    if let Some(stream) = &packs {
        again.command(2).arg(b"TYPE").arg(stream.as_bytes());
    }
    if let Some((replicas, ms)) = wait {
        again.command(3).arg(b"WAIT").number(u64::from(replicas)).number(ms);
    }
    tracing::warn!("redis bridge: a round whose answer was lost had been stored; its jobs are accepted");
    if again.is_empty() {
        return Ok(Vec::new());
    }
    let until = Instant::now() + SETTLE_FOR;
    loop {
        let tried = link.get_by(until).map_err(|why| (why, None)).and_then(|conn| {
            super::round::exchange(conn, &again).map_err(|e| (redis_io::describe(&e), Some(e)))
        });
        match tried {
            Ok(mut replies) => {
                if let Some(stream) = &packs {
                    let kind = match replies.get(keyed.len()) {
                        Some(v) => redis::from_redis_value_ref::<String>(v).unwrap_or_default(),
                        None => String::new(),
                    };
                    if keyed.len() < replies.len() {
                        replies.remove(keyed.len());
                    }
                    if kind != "stream" && kind != "none" && !kind.is_empty() {
                        for &command in &failed.round.packs {
                            let e = (
                                redis::ErrorKind::Client,
                                "not written",
                                format!("{stream} is a {kind} key"),
                            );
                            failed.commands.push((command, e.into()));
                        }
                    }
                }
                for (n, reply) in at.iter().zip(&replies) {
                    if let Value::ServerError(e) = reply {
                        // Its command in the round, which carried it alone.
                        if let Some(&command) = failed.round.carrier.get(*n) {
                            failed.commands.push((command, e.clone().into()));
                        }
                    }
                }
                return Ok(replies);
            }
            Err((why, e)) => {
                if let Some(e) = &e {
                    link.failed(e);
                }
                if Instant::now() >= until || e.as_ref().is_some_and(|e| !is_connection_error(e)) {
                    tracing::warn!("redis bridge: cannot read the claims of a stored round again: {why}");
                    let mut replies = vec![Value::Int(1); keyed.len()];
                    replies.extend(wait.map(|_| Value::Int(0)));
                    return Ok(replies);
                }
            }
        }
    }
}

/// Goes on with the first cancel the master asked for (a few calls), and reads the keys its duplicates wait on
/// when due: the answers, as frames for the master. A cancel that cannot reach Redis is
/// answered so (the client may ask again); a look that cannot is tried at the next.
fn cancels_and_watches(
    link: &mut Link<'_>,
    cancels: &mut std::collections::VecDeque<super::cancel::Cancel>,
    watches: &mut super::dedup::Watches,
) -> Vec<u8> {
    let d = link.d;
    let mut frames = Vec::new();
    // One cancel per turn, a few calls of it: the rest go on after the next round of jobs.
    if let Some(cancel) = cancels.front_mut() {
        let task_id = cancel.task_id;
        let tried = match link.get() {
            Err(why) => Some(Err(why)),
            Ok(conn) => match cancel.go_on(conn, d, CANCEL_CALLS) {
                Ok(answer) => answer,
                Err(e) => {
                    let why =
                        format!("cannot reach Redis to cancel job {task_id}: {}", redis_io::describe(&e));
                    link.failed(&e);
                    Some(Err(why))
                }
            },
        };
        if let Some(tried) = tried {
            cancels.pop_front();
            let (cancelled, why) = match tried {
                Ok(_) => (true, String::new()),
                Err(why) => (false, why),
            };
            FromBridge::Cancelled { task_id, cancelled, why: why.as_bytes() }.encode(&mut frames);
        }
    }
    if watches.wait().is_some_and(|w| w <= Duration::from_millis(1)) {
        match link.get().map(|conn| watches.look(conn)) {
            Ok(Ok(ended)) => {
                for (task_id, line) in ended {
                    FromBridge::KeyEnded { task_id, line: &line }.encode(&mut frames);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("redis bridge: cannot read deduplication keys: {}", redis_io::describe(&e));
                link.failed(&e);
                watches.postpone();
            }
            // Redis is away: the next look when it may be back, not in a busy loop.
            Err(_) => watches.postpone(),
        }
    }
    frames
}

/// Renews the node's lease if the master asked (after the round's jobs: a renewal that times
/// out must not change why they failed), and tells the master whether the name is still its
/// own. While Redis is away nothing is renewed and nothing is said: the lease lapses after its
/// TTL and is taken again at the first renewal once Redis is back, unless another run took it.
fn renew_if_asked(link: &mut Link<'_>, token: &str, asked: &mut bool, out: &MasterOut) {
    if !std::mem::take(asked) {
        return;
    }
    let d = link.d;
    let Ok(conn) = link.get() else { return };
    let holder = match startup::renew_lease(conn, d, token) {
        Ok(startup::Lease::Held) => String::new(),
        Ok(startup::Lease::Lost(holder)) => holder,
        Err(e) => {
            tracing::warn!("redis bridge: cannot renew the node name: {}", redis_io::describe(&e));
            link.failed(&e);
            return;
        }
    };
    let mut frame = Vec::new();
    FromBridge::Lease { holder: holder.as_bytes() }.encode(&mut frame);
    // A master that is gone is seen by the next read of its channel.
    let _ = send(out, &frame);
}

fn reply_loop(d: &Durable, out: &MasterOut, shared: &'static Shared, from: String) {
    // Its replies are read by taskd's own parser where the URL allows (see `super::hot`).
    let mut conn: Option<super::hot::HotConn> = None;
    let mut backoff = RETRY_MIN;
    // On from what the master read before it served: everything up to there, it acted on.
    let mut last = from;
    let mut frames = Vec::new();
    // Each read's XREAD, written into the room of the last.
    let mut read = Packed::new();
    let mut next_depths = Instant::now();
    loop {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match redis_io::connect_hot(&d.url, None) {
                Ok(c) => {
                    backoff = RETRY_MIN;
                    conn.insert(c)
                }
                Err(_) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            },
        };
        read.clear();
        read.command(8).arg(b"XREAD").arg(b"COUNT").number(REPLY_COUNT as u64);
        read.arg(b"BLOCK").number(REPLY_BLOCK_MS).arg(b"STREAMS");
        read.arg(d.keys.replies.as_bytes()).arg(last.as_bytes());
        // Its one stream's entries, read straight from the bytes (see `HotConn::read_streams`).
        let entries = match c.read_streams(&read) {
            Ok(mut streams) => streams
                .pop()
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| *k == d.keys.replies)
                .map(|(_, e)| e),
            Err(e) => {
                if is_connection_error(&e) {
                    // Seen here first when no job is being stored: refuse new ones at once.
                    shared.set_durable_down(true);
                    conn = None;
                } else {
                    tracing::warn!("redis bridge: reading replies failed: {}", redis_io::describe(&e));
                    std::thread::sleep(backoff);
                }
                continue;
            }
        };
        frames.clear();
        if Instant::now() >= next_depths {
            next_depths = Instant::now() + DEPTHS_EVERY;
            if let Ok(json) = depths(c, d) {
                FromBridge::Depths { json: json.as_bytes() }.encode(&mut frames);
            }
        }
        for entry in entries {
            last.clone_from(&entry.id);
            match outcomes_of_entry(&entry, &mut frames) {
                // After its outcomes, in the same write or a later one: the master deletes the
                // entry only once it has seen (and acted on) all of them.
                Ok(_) => FromBridge::EntryRead { entry: entry.id.as_bytes() }.encode(&mut frames),
                Err(why) => {
                    // Logged once: it is deleted, and this reader has gone past it anyway.
                    tracing::warn!("redis bridge: reply entry {} is malformed ({why}); deleted", entry.id);
                    let _: redis::RedisResult<Value> =
                        redis::cmd("XDEL").arg(&d.keys.replies).arg(&entry.id).query(c);
                }
            }
        }
        if !frames.is_empty() && send(out, &frames).is_err() {
            // The master is gone; so is this process.
            crate::process::exit_now(0);
        }
    }
}

/// How often the reply reader tells the master how many jobs wait in Redis (for `stats`).
const DEPTHS_EVERY: Duration = Duration::from_secs(1);

/// `{"jobs":N,"lanes":{"TYPE":N,…},"by_priority":{"high":N,"normal":N,"low":N}}`: the length
/// of the main job stream and of each lane this node routes jobs to, each over its three
/// priorities' streams, and of every priority over them (waiting or running). Finished jobs'
/// entries are trimmed first, all of them (see [`super::trim`]), so they are not counted. A
/// lane that no node's handler runs grows here. A pack counts as its jobs (those of the main
/// normal stream; past 64 packs, estimated: `trim::PACKED_JOBS`), whatever this
/// node's `durable_pack`: another node may write them.
fn depths(conn: &mut dyn redis::ConnectionLike, d: &Durable) -> redis::RedisResult<String> {
    let lanes: Vec<Option<&str>> =
        std::iter::once(None).chain(d.routes.iter().map(|k| Some(k.as_str()))).collect();
    let packs = d.keys.packs();
    let mut streams: Vec<String> = Priority::ALL
        .into_iter()
        .flat_map(|p| lanes.iter().map(move |lane| d.keys.stream(*lane, p)))
        .collect();
    streams.push(packs.clone());
    let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
    let mut packed = super::resp::Packed::new();
    super::trim::pack(&mut packed, &streams, 0);
    super::trim::pack_packed_jobs(&mut packed, &packs);
    let mut answers = conn.req_packed_commands(packed.bytes(), 0, 2)?.into_iter();
    let (trimmed, in_packs) = (answers.next(), answers.next());
    let unexpected = |what: &str, answer: &Option<Value>| {
        redis::RedisError::from((redis::ErrorKind::Client, "unexpected reply", format!("{what}: {answer:?}")))
    };
    let Some((_, lengths)) = trimmed.as_ref().and_then(super::trim::answer) else {
        return Err(unexpected("the trim's reply", &trimmed));
    };
    let Some(in_packs) = in_packs.as_ref().and_then(redis_io::as_int).and_then(|n| u64::try_from(n).ok())
    else {
        return Err(unexpected("the count of packed jobs", &in_packs));
    };
    // Row per priority, column per lane (the main stream first); packed jobs are of the main
    // stream's normal priority.
    let at = |p: usize, l: usize| {
        let extra = if (p, l) == (Priority::Normal.index(), 0) { in_packs } else { 0 };
        lengths.get(p * lanes.len() + l).copied().unwrap_or(0) + extra
    };
    let of_lane = |l: usize| (0..3).map(|p| at(p, l)).sum::<u64>();
    let of_priority = |p: usize| (0..lanes.len()).map(|l| at(p, l)).sum::<u64>();
    let by_lane: serde_json::Map<String, serde_json::Value> =
        d.routes.iter().enumerate().map(|(i, k)| (k.clone(), of_lane(i + 1).into())).collect();
    let by_priority: serde_json::Map<String, serde_json::Value> =
        Priority::ALL.iter().map(|p| (p.name().to_string(), of_priority(p.index()).into())).collect();
    Ok(serde_json::json!({"jobs": of_lane(0), "lanes": by_lane, "by_priority": by_priority}).to_string())
}

/// Parks a job for later: its fields (ARGV[3..]) in the hash KEYS[2], its member ARGV[2] in the
/// delayed set KEYS[1] with the score ARGV[1] (its `run_at`, Unix ms). The consumers of every
/// node move it into the stream when due (`consumer::MOVE_DUE`), as they do a delivery retry.
/// One script, so that a job is never in the set without its fields; nothing is written if the
/// set is not a sorted set.
const SCHEDULE: &str = "
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply(KEYS[1] .. ' is a ' .. kind .. ', not the sorted set of delayed jobs')
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]), ARGV[2])
return 1";

/// How long a round waits for `redis_wait_replicas` replicas to have its jobs.
const WAIT_LIMIT_MS: u64 = 2000;

/// How many replicas have this round's jobs, by WAIT's answer (the pipeline's only one), when
/// fewer than `redis_wait_replicas`; [`FromBridge::ALL_REPLICAS`] when enough (or not asked).
/// Too few is no failure: the jobs are in the master (XADD has run, nothing takes it back)
/// and will run; they are lost only if the master dies before a replica has them. So their
/// clients get `accepted` with the number, and the node warns (once per 10 s).
fn replicated(d: &Durable, items: &[Item], replies: &[Value], warned: &mut crate::throttle::Throttle) -> u32 {
    if d.wait_replicas == 0 || !items.iter().any(|i| matches!(i, Item::Store { .. })) {
        return FromBridge::ALL_REPLICAS;
    }
    let got = replies.last().and_then(redis_io::as_int).unwrap_or(0).max(0);
    if got >= i64::from(d.wait_replicas) {
        return FromBridge::ALL_REPLICAS;
    }
    if let Some(unlogged) = warned.log() {
        tracing::warn!(
            "redis bridge: jobs stored, but only {got} of the {} replicas they must reach \
             (redis_wait_replicas) confirmed them within {WAIT_LIMIT_MS} ms: accepted with \
             \"replicas\": {got}; they are lost if the Redis master dies before a replica has them{}",
            d.wait_replicas,
            crate::throttle::unlogged(unlogged)
        );
    }
    u32::try_from(got).unwrap_or(0)
}

/// The answers of a round's claims, in the order of its jobs: each job of a tick or with a key
/// has one (a tick's job with a key, one of both: `ticks::split`). Split into the ticks' and
/// the keys' answers.
fn answered(items: &[Item], replies: &[Value]) -> (Vec<Value>, Vec<Value>) {
    let (mut ticks, mut keys) = (Vec::new(), Vec::new());
    let mut replies = replies.iter();
    for item in items {
        if let Item::Store { tick, key, .. } = item {
            if tick.is_none() && key.is_none() {
                continue;
            }
            let Some(reply) = replies.next() else { break };
            match (tick.is_some(), key.is_some()) {
                (true, true) => {
                    let (tick, key) = ticks::split(reply);
                    ticks.push(tick);
                    keys.push(key);
                }
                (true, false) => ticks.push(reply.clone()),
                _ => keys.push(reply.clone()),
            }
        }
    }
    (ticks, keys)
}

/// The `Duplicate` frames of a round's jobs with a key that another job holds (`replies`: the
/// keys' answers, in the order of their jobs, see `answered`; a job of a tick another node has
/// answers no string, and is no duplicate); the duplicates whose first has not ended are
/// watched.
fn duplicates(
    d: &Durable,
    items: &[Item],
    replies: &[Value],
    watches: &mut super::dedup::Watches,
    frames: &mut Vec<u8>,
) {
    let keyed = items.iter().filter_map(|i| match i {
        Item::Store { task_id, key: Some((hex, _)), .. } => Some((*task_id, hex)),
        _ => None,
    });
    for ((task_id, hex), answer) in keyed.zip(replies) {
        if let super::dedup::Claimed::Duplicate { first, holder, line } = super::dedup::claimed(answer) {
            if first != 0 && line.is_empty() {
                watches.add(&d.keys, task_id, hex, &holder);
            }
            FromBridge::Duplicate { task_id, first, digest: hex.as_bytes(), holder: &holder, line: &line }
                .encode(frames);
        }
    }
}

/// Most jobs a bridge writes in one pack: a busy node's round holds some tens, and a pack's
/// jobs are read, and on a consumer's death dissolved, together.
const PACK_JOBS: usize = 128;
/// Bytes of jobs past which a pack is written and the next one begun: Redis's work per job
/// goes with its entries, not its bytes, so large jobs gain little in a pack, and one entry of
/// many large jobs is a large string for a consumer's script to cut up.
const PACK_BYTES: usize = 1024 * 1024;

/// A round's commands as [`pipeline`] wrote them.
#[derive(Debug, Default, Clone, PartialEq)]
struct Written {
    /// Whether each command's answer is wanted (a claim's: see `answered`), one for each.
    kept: Vec<bool>,
    /// For each job of the round (its `Item::Store`s, in order), the command that carries it,
    /// by its index in the round: its own, or its pack's.
    carrier: Vec<usize>,
    /// The commands that are packs.
    packs: Vec<usize>,
    /// The commands of jobs, first in the round: the kept results and the deletions follow.
    job_commands: usize,
}

/// The commands that failed inside a stored round (by their index in it, with the error), and
/// the round as [`pipeline`] wrote it, which says whose jobs they carried.
#[derive(Debug, Default)]
struct Failed {
    commands: Vec<(usize, redis::RedisError)>,
    round: Written,
}

impl Failed {
    /// The failed command that carried job `job` (by its index among the round's jobs), and
    /// its error; None when its command was stored.
    fn of_job(&self, job: usize) -> Option<&(usize, redis::RedisError)> {
        let command = *self.round.carrier.get(job)?;
        self.commands.iter().find(|(i, _)| *i == command)
    }
}

/// Whether a job goes into a pack when its round has packs (see `super::pack`): a job of no
/// lane (`lane`), of normal priority, with no tick, no key and no `run_at`. The others need a
/// stream of their own (a lane's, a priority's), a script (a claim), or the delayed set.
fn packable(item: &Item, lane: &Option<String>) -> bool {
    matches!(item, Item::Store { run_at_ms: 0, priority: Priority::Normal, tick: None, key: None, .. })
        && lane.is_none()
}

/// One round's commands, written after those of `packed`: the jobs, the kept results, the
/// deletion of acted-on replies (run in one transaction by [`store_once`]). With `durable_pack`
/// and at least two packable jobs (see [`packable`]), those are written in packs of at most
/// [`PACK_JOBS`] (split evenly) and about [`PACK_BYTES`], each where its last job was; the
/// other jobs as one command each, in order. Returns which command carries which job.
fn pipeline(
    d: &Durable,
    items: &[Item],
    bytes: &[u8],
    keeps: &[(u64, Vec<u8>)],
    trims: &[&[u8]],
    packed: &mut Packed,
) -> Written {
    // Room for the jobs' XADDs at once (their data, their context, and about 200 bytes more).
    let room: usize = items
        .iter()
        .map(|i| match i {
            Item::Store { context, data, .. } => context.len() + data.len() + 200,
            Item::End(_) => 0,
        })
        .sum();
    packed.reserve(room);
    let before = packed.len();
    let mut written = Written::default();
    // With packs, each job's lane is read first (to count the packable jobs), and kept for the
    // writing: a lane is found by parsing the job's JSON.
    let mut lanes: Option<Vec<Option<String>>> = None;
    let mut per_pack = 0;
    if d.pack {
        let found: Vec<Option<String>> = items
            .iter()
            .filter_map(|i| match i {
                Item::Store { data, .. } => Some(d.lane_for(&bytes[data.clone()])),
                Item::End(_) => None,
            })
            .collect();
        let stores = items.iter().filter(|i| matches!(i, Item::Store { .. }));
        let n = stores.zip(&found).filter(|(item, lane)| packable(item, lane)).count();
        if n >= 2 {
            // As even as can be: 129 jobs are packs of 65 and 64, not 128 and a lone one.
            per_pack = n.div_ceil(n.div_ceil(PACK_JOBS));
            lanes = Some(found);
        }
    }
    let mut pack = super::pack::Pack::new();
    // The jobs of the pack being written, by their index among the round's jobs.
    let mut in_pack: Vec<usize> = Vec::new();
    let packs = if lanes.is_some() { d.keys.packs() } else { String::new() };
    // The main stream of each priority, named once a round, not once a job (a String each).
    let mut mains: [Option<String>; 3] = Default::default();
    for item in items {
        if let Item::Store { task_id, session, worker, run_at_ms, context, data, priority, tick, key } = item
        {
            let job = written.carrier.len();
            let (context, data) = (&bytes[context.clone()], &bytes[data.clone()]);
            let found = match &mut lanes {
                Some(lanes) => lanes[job].take(),
                None => d.lane_for(data),
            };
            if lanes.is_some() && packable(item, &found) {
                pack.push(&d.node, *task_id, *session, *worker, context, data);
                // Its command is known once the pack is written.
                written.carrier.push(usize::MAX);
                in_pack.push(job);
                if pack.len() == per_pack || pack.bytes().len() >= PACK_BYTES {
                    write_pack(&mut pack, &mut in_pack, &packs, packed, before, &mut written);
                }
                continue;
            }
            written.carrier.push(packed.len() - before);
            // The lane of a handler's type: only nodes that can run it read it; the stream of
            // its priority (as `Durable::stream_of`, the main stream's name made once a round).
            let lane;
            let stream: &str = match found {
                None => mains[priority.index()].get_or_insert_with(|| d.keys.stream(None, *priority)),
                Some(name) => {
                    lane = d.keys.stream(Some(&name), *priority);
                    &lane
                }
            };
            let mut cmd;
            if let Some(claim) = tick {
                // Stored only if this node claims its tick (and takes its key), in one script.
                cmd = ticks::claim_and_store(d, claim, stream, *task_id, *run_at_ms, key.as_ref());
            } else if let Some((hex, ttl)) = key {
                // Stored only if it takes its key, in one script (its answer is kept).
                cmd = super::dedup::claim_cmd(d, stream, *task_id, *run_at_ms, hex, *ttl);
            } else if *run_at_ms > 0 {
                let member = d.keys.scheduled_member(&d.node, *task_id);
                cmd = redis::cmd("EVAL");
                cmd.arg(SCHEDULE)
                    .arg(2)
                    .arg(&d.keys.delayed)
                    .arg(d.keys.delayed_hash(&member))
                    .arg(*run_at_ms)
                    .arg(&member);
            } else {
                // The common job: its XADD packed as it is, with no `Cmd` (see `super::resp`).
                JobEntry::pack_xadd(packed, stream, &d.node, *task_id, *session, *worker, context, data);
                written.kept.push(false);
                continue;
            }
            JobEntry::add_fields(&mut cmd, &d.node, *task_id, *session, *worker, context, data);
            if let Some((hex, ttl)) = key {
                super::entry::JobKey { hex: hex.clone(), ttl_ms: *ttl }.add(&mut cmd);
            }
            // A parked job goes into its own lane when due (`consumer::MOVE_DUE`), of its
            // own priority.
            if *run_at_ms > 0 {
                if let Some(lane) = d.lane_of(stream) {
                    cmd.arg("ln").arg(lane);
                }
                super::add_priority(&mut cmd, *priority);
            }
            // A claim's answer is read (see `answered`); the rest only fails the round.
            written.kept.push(tick.is_some() || key.is_some());
            packed.cmd(&cmd);
        }
    }
    if !pack.is_empty() {
        write_pack(&mut pack, &mut in_pack, &packs, packed, before, &mut written);
    }
    written.job_commands = packed.len() - before;
    for (task_id, line) in keeps {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&d.keys.results)
            .arg("MAXLEN")
            .arg("~")
            .arg(d.result_keep)
            .arg("*")
            .arg("t")
            .arg(*task_id)
            .arg("l")
            .arg(line);
        packed.cmd(&cmd);
    }
    if !trims.is_empty() {
        // An entry carries several outcomes: the master asks once for each.
        let mut ids: Vec<&[u8]> = trims.to_vec();
        ids.sort_unstable();
        ids.dedup();
        packed.command(2 + ids.len()).arg(b"XDEL").arg(d.keys.replies.as_bytes());
        for id in ids {
            packed.arg(id);
        }
    }
    written.kept.resize(packed.len() - before, false);
    written
}

/// Writes `pack` (its jobs `in_pack`) as the next command of the round begun at `before`
/// commands of `packed`: an XADD to the pack stream `stream`, whose answer is not read (a
/// round is stored whole or not at all, see `super::round`).
fn write_pack(
    pack: &mut super::pack::Pack,
    in_pack: &mut Vec<usize>,
    stream: &str,
    packed: &mut Packed,
    before: usize,
    written: &mut Written,
) {
    let command = packed.len() - before;
    for job in in_pack.drain(..) {
        written.carrier[job] = command;
    }
    written.packs.push(command);
    written.kept.push(false);
    pack.xadd(packed, stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(out: &[u8]) -> Vec<FromBridge<'_>> {
        let mut all = Vec::new();
        let mut pos = 0;
        while let Ok(Some((frame, n))) = FromBridge::decode(&out[pos..]) {
            all.push(frame);
            pos += n;
        }
        all
    }

    /// A node's durable settings for the tests of `pipeline`: lane `resize` routed here.
    fn durable(pack: bool) -> Durable {
        let config = crate::config::ServerConfig {
            redis_url: Some("redis://127.0.0.1:1".into()),
            node_id: Some("web-1".into()),
            durable_pack: pack,
            job_lanes: vec!["resize".into()],
            ..Default::default()
        };
        Durable::from_config(&config).unwrap()
    }

    /// The kinds of job a round holds, for `round`.
    #[derive(Clone, Copy)]
    enum Kind {
        Common,
        High,
        Lane,
        Keyed,
        Later,
    }

    /// A round of jobs of task ids 1, 2, … of these kinds (a batch's end after them), and the
    /// bytes their context and data are in.
    fn round(kinds: &[Kind]) -> (Vec<Item>, Vec<u8>) {
        let mut bytes = Vec::new();
        let mut items = Vec::new();
        for (n, kind) in kinds.iter().enumerate() {
            let task_id = n as u64 + 1;
            let kind_name = if matches!(kind, Kind::Lane) { "resize" } else { "email" };
            let context = copy(&mut bytes, if n % 2 == 0 { b"" } else { b"ctx" });
            let data = copy(&mut bytes, format!(r#"{{"type":"{kind_name}","n":{n}}}"#).as_bytes());
            items.push(Item::Store {
                task_id,
                session: 7,
                worker: 1,
                run_at_ms: if matches!(kind, Kind::Later) { 4_000_000_000_000 } else { 0 },
                context,
                data,
                priority: if matches!(kind, Kind::High) { Priority::High } else { Priority::Normal },
                tick: None,
                key: matches!(kind, Kind::Keyed).then(|| (format!("{task_id:064x}"), 1000)),
            });
        }
        items.push(Item::End(1));
        (items, bytes)
    }

    /// The commands of a round as RESP arrays of arguments.
    fn commands(packed: &Packed) -> Vec<Vec<Vec<u8>>> {
        // A `*N` or `$N` line's number, and where the line after it starts.
        fn line(bytes: &[u8], at: usize) -> (usize, usize) {
            let end = at + bytes[at..].windows(2).position(|w| w == b"\r\n").unwrap();
            (std::str::from_utf8(&bytes[at + 1..end]).unwrap().parse().unwrap(), end + 2)
        }
        let bytes = packed.bytes();
        let mut at = 0;
        let mut all = Vec::new();
        while at < bytes.len() {
            let (args, next) = line(bytes, at);
            at = next;
            let mut command = Vec::new();
            for _ in 0..args {
                let (len, next) = line(bytes, at);
                command.push(bytes[next..next + len].to_vec());
                at = next + len + 2;
            }
            all.push(command);
        }
        all
    }

    fn written(d: &Durable, items: &[Item], bytes: &[u8]) -> (Written, Packed) {
        let mut packed = Packed::new();
        let written = pipeline(d, items, bytes, &[], &[], &mut packed);
        (written, packed)
    }

    /// A pack's XADD: its `n`, and the task ids of its jobs, each checked as a plain entry is.
    fn pack_of(command: &[Vec<u8>]) -> (u64, Vec<u64>) {
        assert_eq!(command.len(), 7, "XADD stream * n N p BLOB");
        assert_eq!(
            &command[..4],
            &[b"XADD".to_vec(), b"{taskd}:jobs!p".to_vec(), b"*".to_vec(), b"n".to_vec()]
        );
        assert_eq!(command[5], b"p");
        let n = std::str::from_utf8(&command[4]).unwrap().parse().unwrap();
        let (jobs, damage) = super::super::pack::jobs(&command[6]);
        assert_eq!(damage, None);
        let ids = jobs
            .into_iter()
            .map(|fields| {
                let job = JobEntry::checked_fields(fields.iter().copied()).unwrap();
                assert_eq!((&*job.origin, job.session, job.worker), ("web-1", 7, 1));
                job.task_id
            })
            .collect();
        (n, ids)
    }

    #[test]
    fn a_rounds_common_jobs_are_one_pack_and_its_others_as_before_in_order() {
        use Kind::*;
        let kinds = [Common, Keyed, Common, Lane, High, Later, Common, Common];
        let (items, bytes) = round(&kinds);
        let (w, packed) = written(&durable(true), &items, &bytes);
        // The same round without its common jobs, packs off: the others' commands as today.
        let others: Vec<Item> = items
            .iter()
            .enumerate()
            .filter(|(n, _)| ![0, 2, 6, 7].contains(n))
            .map(|(_, i)| i.clone())
            .collect();
        let (plain, plain_packed) = written(&durable(false), &others, &bytes);
        let got = commands(&packed);
        assert_eq!(got.len(), 5);
        assert_eq!(&got[..4], &commands(&plain_packed)[..]);
        let (n, ids) = pack_of(&got[4]);
        assert_eq!((n, ids), (4, vec![1, 3, 7, 8]));
        assert_eq!(w.carrier, vec![4, 0, 4, 1, 2, 3, 4, 4]);
        assert_eq!(w.packs, vec![4]);
        assert_eq!(w.kept, [&plain.kept[..], &[false]].concat());
        assert_eq!(w.kept, vec![true, false, false, false, false]);
        assert_eq!(w.job_commands, 5);
    }

    #[test]
    fn more_jobs_than_a_pack_holds_are_packs_as_even_as_can_be() {
        for (jobs, sizes) in [(129, vec![65, 64]), (128, vec![128]), (300, vec![100, 100, 100])] {
            let (items, bytes) = round(&vec![Kind::Common; jobs]);
            let (w, packed) = written(&durable(true), &items, &bytes);
            let got = commands(&packed);
            let packs: Vec<(u64, Vec<u64>)> = got.iter().map(|c| pack_of(c)).collect();
            assert_eq!(packs.iter().map(|(n, _)| *n as usize).collect::<Vec<_>>(), sizes);
            for (n, ids) in &packs {
                assert_eq!(*n as usize, ids.len());
            }
            let ids: Vec<u64> = packs.into_iter().flat_map(|(_, ids)| ids).collect();
            assert_eq!(ids, (1..=jobs as u64).collect::<Vec<_>>(), "every job once, in order");
            assert_eq!(w.packs, (0..sizes.len()).collect::<Vec<_>>());
            assert_eq!(w.carrier.len(), jobs);
            assert_eq!(w.carrier[sizes[0] - 1], 0);
            assert_eq!(*w.carrier.last().unwrap(), sizes.len() - 1);
        }
    }

    #[test]
    fn a_pack_is_written_once_it_holds_a_megabyte_of_jobs() {
        let mut bytes = Vec::new();
        let mut items = Vec::new();
        for task_id in 1..=5 {
            let data = copy(&mut bytes, &[b'x'; 400 * 1024]);
            items.push(Item::Store {
                task_id,
                session: 7,
                worker: 1,
                run_at_ms: 0,
                context: 0..0,
                data,
                priority: Priority::Normal,
                tick: None,
                key: None,
            });
        }
        let (w, packed) = written(&durable(true), &items, &bytes);
        let sizes: Vec<u64> = commands(&packed).iter().map(|c| pack_of(c).0).collect();
        assert_eq!(sizes, vec![3, 2]);
        assert_eq!(w.carrier, vec![0, 0, 0, 1, 1]);
    }

    #[test]
    fn a_round_of_fewer_than_two_packable_jobs_or_packs_off_is_written_as_ever() {
        use Kind::*;
        for kinds in [
            vec![Keyed, Common, High, Lane, Later],
            vec![Common],
            vec![High, Lane, Keyed, Later, High],
            vec![Common, Common, Keyed, Common, Lane],
        ] {
            let (items, bytes) = round(&kinds);
            let (off, off_packed) = written(&durable(false), &items, &bytes);
            // Packs off: one command per job, in order, each common job its own XADD as today.
            assert_eq!(off.carrier, (0..kinds.len()).collect::<Vec<_>>());
            assert!(off.packs.is_empty());
            let mut today = Packed::new();
            for item in &items {
                if let Item::Store {
                    task_id,
                    context,
                    data,
                    priority: Priority::Normal,
                    key: None,
                    run_at_ms: 0,
                    ..
                } = item
                {
                    let data = &bytes[data.clone()];
                    if !data.starts_with(br#"{"type":"resize""#) {
                        JobEntry::pack_xadd(
                            &mut today,
                            "{taskd}:jobs",
                            "web-1",
                            *task_id,
                            7,
                            1,
                            &bytes[context.clone()],
                            data,
                        );
                    }
                }
            }
            let commons: Vec<Vec<Vec<u8>>> = commands(&off_packed)
                .into_iter()
                .filter(|c| c[1] == b"{taskd}:jobs" && c[0] == b"XADD")
                .collect();
            assert_eq!(commons, commands(&today));
            if kinds.iter().filter(|k| matches!(k, Common)).count() < 2 {
                let (on, on_packed) = written(&durable(true), &items, &bytes);
                assert_eq!(on_packed.bytes(), off_packed.bytes(), "{} jobs", kinds.len());
                assert_eq!(on, off);
            }
        }
    }

    #[test]
    fn a_failed_pack_fails_all_its_jobs_and_only_them() {
        use Kind::*;
        let (items, bytes) = round(&[Common, Keyed, Common, Lane, Common]);
        let (round, _) = written(&durable(true), &items, &bytes);
        assert_eq!(round.carrier, vec![2, 0, 2, 1, 2]);
        let error = || redis::RedisError::from((redis::ErrorKind::Client, "WRONGTYPE"));
        let failed = Failed { commands: vec![(2, error())], round: round.clone() };
        let jobs: Vec<bool> = (0..5).map(|j| failed.of_job(j).is_some()).collect();
        assert_eq!(jobs, vec![true, false, true, false, true]);
        // A plain command fails its job alone; a kept result's (past the jobs') no job.
        let failed = Failed { commands: vec![(1, error()), (3, error())], round };
        let jobs: Vec<bool> = (0..5).map(|j| failed.of_job(j).is_some()).collect();
        assert_eq!(jobs, vec![false, false, false, true, false]);
    }

    #[test]
    fn a_batch_stored_by_one_round_and_not_another_fails_only_its_jobs_not_stored() {
        let mut open = OpenBatch::new();
        let mut out = Vec::new();
        open.job(1, &Ok(FromBridge::ALL_REPLICAS));
        open.job(2, &Err("Redis is gone".into()));
        open.end(7, &mut out);
        assert_eq!(
            frames(&out),
            vec![
                FromBridge::NotStored { task_id: 2, why: b"Redis is gone" },
                FromBridge::Stored { batch: 7, replicas: FromBridge::ALL_REPLICAS, error: b"" },
            ]
        );
        // The other way round, and with a short WAIT: the same.
        out.clear();
        open.job(3, &Err("Redis is gone".into()));
        open.job(4, &Ok(1));
        open.end(8, &mut out);
        assert_eq!(
            frames(&out),
            vec![
                FromBridge::NotStored { task_id: 3, why: b"Redis is gone" },
                FromBridge::Stored { batch: 8, replicas: 1, error: b"" },
            ]
        );
    }

    #[test]
    fn a_batch_none_of_which_was_stored_fails_whole_and_one_all_stored_is_stored() {
        let mut open = OpenBatch::new();
        let mut out = Vec::new();
        open.job(1, &Err("first".into()));
        open.job(2, &Err("Redis is gone".into()));
        open.end(7, &mut out);
        assert_eq!(
            frames(&out),
            vec![FromBridge::Stored {
                batch: 7,
                replicas: FromBridge::ALL_REPLICAS,
                error: b"Redis is gone"
            }]
        );
        out.clear();
        open.job(3, &Ok(FromBridge::ALL_REPLICAS));
        open.end(8, &mut out);
        assert_eq!(
            frames(&out),
            vec![FromBridge::Stored { batch: 8, replicas: FromBridge::ALL_REPLICAS, error: b"" }]
        );
    }
}
