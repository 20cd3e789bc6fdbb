//! A consumer's pulse: a thread of the task process that keeps every job the process holds
//! alive in Redis, and kills the process when the job it runs outlives `task_timeout`.
//!
//! Why a thread, and why here. Other consumers claim a job once it has been idle past the claim
//! time, so the owner must touch its jobs while they wait and while they run; but the consumer's
//! only thread is inside `on_task` for as long as a job runs, and that is application code that
//! may never yield (a loop, a blocking call). So the beat comes from a second thread of the same
//! process:
//! - its life is exactly the life of the jobs' owner: a process that dies, is killed or is
//!   stopped (SIGSTOP) stops beating with all its threads, and only then are its jobs claimed;
//!   a manager or master beating for its slots would keep beating for a process that hangs;
//! - the process knows what it holds and what runs since when (no new channel to its manager,
//!   which a task node does not have);
//! - it is fork-safe: a task process never forks (its manager forked it while single-threaded,
//!   and STYLE's rule is about processes that fork; an application that starts a program from
//!   `on_task` goes through fork+exec, which threads do not disturb); the thread starts after
//!   the fork, in the child, and inherits its blocked signal mask, so SIGTERM still reaches the
//!   signalfd.
//!
//! A beat is one script, so it can never take a job back from a consumer that claimed it
//! meanwhile (after this process stalled): it refreshes only what is pending under this
//! consumer's own name, with `XCLAIM … JUSTID`, which resets the idle time without raising the
//! delivery count. A job's delivery count thus counts the runs that died, not the waits. A
//! consumer whose beats stopped or failed for two intervals asks, before it starts its next
//! job, which of its jobs are still its own, and leaves the others to whoever claimed them.
//!
//! With a `task_timeout`, the same thread is the job's timer: past it, the process kills itself
//! (SIGKILL, as the in-memory master kills a hung task process), and the job runs again in its
//! slot's successor, which re-reads what its predecessor held; on its last attempt the thread
//! first records it as failed, with the reason memory mode gives. Nobody else runs it meanwhile:
//! it is kept alive until the kill.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::getpid;
use redis::Connection;

use super::consumer::{name_as_consumer, store, At, Completion, StoreRoom};
use super::entry::JobEntry;
use super::keys::GROUP;
use super::redis_io;
use super::Durable;

/// The longest time between two beats: half the shortest claim time any node may have
/// (`claim_timeout` is at least 1 s), so that nodes with different claim times can share a
/// queue: a node never claims a live consumer's job, whatever the owner's own claim time.
const BEAT_MAX: Duration = Duration::from_millis(500);
const BEAT_MIN: Duration = Duration::from_millis(20);
/// Most entries one beat refreshes (a consumer holds its window: at most a few dozen).
const BEAT_COUNT: usize = 1000;

/// Refreshes the idle time of every entry pending under consumer ARGV[2] (at most ARGV[3] of
/// them), in one step: what another consumer claimed meanwhile is not pending under this name,
/// so it is left alone. JUSTID: the delivery count stays as it is. Returns their ids. A key of
/// another type (someone wrote it) holds nothing of its: its beat must not fail the others'.
const BEAT: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then return {} end
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[3]), ARGV[2])
if #held == 0 then return {} end
local cmd = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for _, e in ipairs(held) do cmd[#cmd + 1] = e[1] end
cmd[#cmd + 1] = 'JUSTID'
return redis.call(unpack(cmd))
";

/// One beat: refreshes what consumer `me` holds, in each stream it reads (one round trip);
/// where its entries are.
pub fn refresh(conn: &mut Connection, d: &Durable, me: &str) -> redis::RedisResult<Vec<At>> {
    let streams = d.streams();
    let mut pipe = redis::pipe();
    for stream in &streams {
        pipe.cmd("EVAL").arg(BEAT).arg(1).arg(stream).arg(GROUP).arg(me).arg(BEAT_COUNT);
    }
    let ids: Vec<Vec<String>> = pipe.query(conn)?;
    Ok(streams
        .into_iter()
        .zip(ids)
        .flat_map(|(stream, ids)| {
            let stream: Arc<str> = Arc::from(stream);
            ids.into_iter().map(move |id| At { stream: Arc::clone(&stream), id: Arc::from(id) })
        })
        .collect())
}

/// What the consumer holds now, as its thread of beats sees it.
struct Held {
    /// Stream entries of the jobs taken and not yet written back (waiting or running).
    count: usize,
    /// When all of them were last known to be this consumer's and fresh (taken or beaten).
    fresh: Instant,
    running: Option<Running>,
    /// The beat thread waits for the consumer to hold something (an idle node costs nothing).
    asleep: bool,
}

type Shared = Arc<(Mutex<Held>, Condvar)>;

struct Running {
    id: At,
    job: Arc<JobEntry>,
    attempt: u32,
    since: Instant,
    /// A job of a pack: its entry is the pack's, which a dead letter would acknowledge.
    packed: bool,
}

/// The consumer's side of its beat thread.
pub struct Pulse {
    shared: Shared,
    /// Past this without a beat (two missed), what it holds may have been claimed by another
    /// consumer. Two beats are at most 1 s, the shortest claim time any node may have: another
    /// node's shorter claim time cannot take a job before its owner would check.
    stale_after: Duration,
}

impl Pulse {
    /// Starts the beat thread of consumer `me` (slot `slot`).
    pub fn start(d: &Durable, me: &str, slot: u32) -> std::io::Result<Pulse> {
        let held = Held { count: 0, fresh: Instant::now(), running: None, asleep: false };
        let shared: Shared = Arc::new((Mutex::new(held), Condvar::new()));
        let beat = Beat { shared: Arc::clone(&shared), d: d.clone(), me: me.to_string(), slot, conn: None };
        std::thread::Builder::new().name("heartbeat".into()).spawn(move || beat.run())?;
        Ok(Pulse { shared, stale_after: beat_interval(d.claim_after) * 2 })
    }

    /// The consumer has just taken jobs of `count` stream entries (fresh: a read or a claim
    /// resets their idle time; a pack is one entry of many jobs) and holds nothing else.
    pub fn took(&self, count: usize) {
        let mut held = lock(&self.shared.0);
        held.count = count;
        held.fresh = Instant::now();
        if held.asleep && count > 0 {
            self.shared.1.notify_one();
        }
    }

    /// The consumer holds jobs of `count` stream entries now (taken, not yet written back): a
    /// beat that refreshed fewer entries than that finds some claimed by others.
    pub fn holding(&self, count: usize) {
        lock(&self.shared.0).count = count;
    }

    /// Whether its beats have failed (Redis unreachable) or stopped (the process was stopped)
    /// for so long that another consumer may have claimed what it holds, as of `now` (a time
    /// just read).
    pub fn stale_at(&self, now: Instant) -> bool {
        now.saturating_duration_since(lock(&self.shared.0).fresh) >= self.stale_after
    }

    /// The consumer has beaten itself: what it holds is fresh.
    pub fn refreshed(&self) {
        lock(&self.shared.0).fresh = Instant::now();
    }

    /// The job of stream entry `id` starts running (its `attempt`-th run), timed from `since`
    /// (a time just read); `packed`: a job of a pack. `id` is lent to the beat thread, not
    /// copied (two allocations a job): [`Pulse::ran`] gives it back.
    pub fn running(&self, id: At, job: &Arc<JobEntry>, attempt: u32, since: Instant, packed: bool) {
        lock(&self.shared.0).running = Some(Running { id, job: Arc::clone(job), attempt, since, packed });
    }

    /// The running job has returned: the `id` it was given. Past its time limit, the beat thread
    /// may be killing the process meanwhile: then this waits for the end rather than let the
    /// job's outcome out. None only without a [`Pulse::running`] before it (the beat thread
    /// reads `running`, never takes it).
    pub fn ran(&self) -> Option<At> {
        lock(&self.shared.0).running.take().map(|r| r.id)
    }
}

fn lock(held: &Mutex<Held>) -> MutexGuard<'_, Held> {
    // The lock guards plain data, left whole by a panic: poisoning means nothing here.
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often a consumer touches what it holds: a quarter of the claim time, at most 500 ms.
pub fn beat_interval(claim_after: Duration) -> Duration {
    (claim_after / 4).clamp(BEAT_MIN, BEAT_MAX)
}

struct Beat {
    shared: Shared,
    d: Durable,
    me: String,
    slot: u32,
    conn: Option<Connection>,
}

impl Beat {
    fn run(mut self) {
        let every = beat_interval(self.d.claim_after);
        let shared = Arc::clone(&self.shared);
        let (mutex, wake_up) = &*shared;
        let mut next_beat = Instant::now() + every;
        let mut held = lock(mutex);
        loop {
            let now = Instant::now();
            let deadline = self.d.task_limit.and_then(|limit| held.running.as_ref().map(|r| r.since + limit));
            if deadline.is_some_and(|at| now >= at) {
                self.time_out(held);
            }
            if held.count == 0 && held.running.is_none() {
                // Nothing to keep alive: sleep until the consumer takes something, which its
                // read has just made fresh, so the first beat is due an interval later.
                held.asleep = true;
                held = wake_up.wait(held).unwrap_or_else(PoisonError::into_inner);
                held.asleep = false;
                next_beat = Instant::now() + every;
                continue;
            }
            if now >= next_beat {
                drop(held);
                let beaten = self.beat();
                next_beat = Instant::now() + every;
                held = lock(mutex);
                // Fewer than it holds: some were claimed while it could not beat (the consumer
                // checks before it starts the next one).
                if beaten.is_some_and(|n| n >= held.count) {
                    held.fresh = now;
                }
                continue;
            }
            let wake = deadline.map_or(next_beat, |at| at.min(next_beat));
            held = wake_up.wait_timeout(held, wake - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn conn(&mut self) -> redis::RedisResult<&mut Connection> {
        if self.conn.is_none() {
            let mut conn = redis_io::connect(&self.d.url, Some(redis_io::REPLY_LIMIT))?;
            // Named as the consumer (not needed to beat: a refusal is no reason to stop).
            name_as_consumer(&mut conn, &self.me)?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// How many entries it refreshed; None if Redis could not be asked.
    fn beat(&mut self) -> Option<usize> {
        let (d, me) = (self.d.clone(), self.me.clone());
        match self.conn().and_then(|conn| refresh(conn, &d, &me)) {
            Ok(ids) => Some(ids.len()),
            Err(e) => {
                // The consumer's own connection says so too ("lost Redis"); here once per beat
                // is too many lines for a warning.
                tracing::debug!("{me}: heartbeat failed: {}", redis_io::describe(&e));
                self.conn = None;
                None
            }
        }
    }

    /// The running job is past `task_timeout`: kill this process, as the in-memory master
    /// kills a task process whose job runs too long. On the job's last attempt, record it as
    /// failed first. The lock stays held to the end, so the consumer cannot write an outcome
    /// for the job meanwhile.
    fn time_out(&mut self, held: MutexGuard<'_, Held>) -> ! {
        let pid = std::process::id();
        let limit = self.d.task_limit.map_or(0.0, |l| l.as_secs_f64());
        if let Some(r) = &held.running {
            tracing::warn!(
                "job {} has run longer than task_timeout ({limit}s) in task process {} (pid {pid}); killing it",
                r.job.task_id,
                self.slot
            );
            // A job of a pack is not blamed for its pack's death: the successor dissolves the
            // pack, and this job meets `task_timeout` and `task_retry_max` alone.
            if r.attempt >= self.d.max_attempts && !r.packed {
                let why = format!(
                    "task process {pid} was killed: the task ran longer than task_timeout ({limit}s)"
                );
                tracing::warn!("job {} failed after {} attempt(s): {why}", r.job.task_id, r.attempt);
                let dead = Completion::Dead {
                    id: r.id.clone(),
                    pack: None,
                    job: (*r.job).clone(),
                    why,
                    attempts: r.attempt,
                };
                let d = self.d.clone();
                if let Err(e) = self.conn().and_then(|conn| {
                    store(conn, &d, std::slice::from_ref(&dead), &[], &mut StoreRoom::default())
                }) {
                    tracing::warn!(
                        "cannot record task {} as failed ({}); its next run will give up instead",
                        r.job.task_id,
                        redis_io::describe(&e)
                    );
                }
            }
        }
        let _ = kill(getpid(), Signal::SIGKILL);
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_well_inside_the_claim_time() {
        assert_eq!(beat_interval(Duration::from_secs(1)), Duration::from_millis(250));
        assert_eq!(beat_interval(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(beat_interval(Duration::from_secs(300)), Duration::from_millis(500));
        assert_eq!(beat_interval(Duration::from_millis(40)), BEAT_MIN);
        // Whatever a node's own claim time, two of its beats fit in the shortest any node
        // may have: it checks what is still its own before another node could claim it.
        for claim in [1.0, 2.0, 10.0, 86_400.0] {
            let two = beat_interval(Duration::from_secs_f64(claim)) * 2;
            assert!(two.as_secs_f64() <= crate::config::MIN_CLAIM_TIMEOUT, "{claim}");
        }
    }
}
