//! The master's side of periodic jobs (`[[schedule]]`): each entry's next tick as a deadline
//! of the reactor, and at each tick its job handed to a worker as a request from no client
//! (session 0: the replies go nowhere, the job's outcome is logged), so the application reads
//! it as it reads a client's. Missed ticks (the master was stopped or suspended past them)
//! are skipped or run once, as the entry says.
//!
//! With durable jobs, every web node of a queue runs the same schedules, and each tick runs on
//! the one node that claims it in Redis (see `durable::ticks`): the tick's request carries a
//! session of its own ([`tick_session`]), which no connection has, so that the job the worker
//! makes of it is known as the tick's and stored only with its claim.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::*;
use crate::app::Priority;
use crate::schedule::Schedule;

/// One entry and where it stands.
pub struct Entry {
    pub schedule: Schedule,
    /// Its next tick, on the wall clock and as the reactor's deadline.
    pub next: Option<(DateTime<Utc>, Instant)>,
    /// When it last ran (Unix ms), how many times, and the ticks it missed.
    pub last_run_ms: Option<u64>,
    pub runs: u64,
    pub missed: u64,
    /// Durable jobs: the node that claimed the last tick (this one or another), and the ticks
    /// another node claimed first.
    pub last_by: Option<String>,
    pub elsewhere: u64,
}

#[derive(Default)]
pub struct Periodic {
    pub entries: Vec<Entry>,
    /// Durable jobs: each tick is claimed in Redis, its runs counted once the claim is known.
    pub durable: bool,
    /// The claim of the next `Task` frame, a tick's job (durable jobs).
    pub pending: Option<TickJob>,
}

/// A tick's job on its way to Redis (durable jobs).
pub struct TickJob {
    pub task_id: u64,
    pub tick_ms: u64,
    pub ttl_ms: u64,
    pub name: String,
}

/// A tick's request to a worker with durable jobs carries this bit in its session: no
/// connection's session has it (a session counts accepts above its 24 bits of slab key).
const TICK_BIT: u64 = 1 << 63;
/// Below the bit: the entry's index, then the tick in Unix seconds (cron ticks fall on whole
/// seconds), in 34 bits (to the year 2514).
const TICK_SECS_BITS: u32 = 34;

/// The session of tick `tick_ms` of entry `index`; None for an entry or tick past the bits.
pub fn tick_session(index: usize, tick_ms: u64) -> Option<u64> {
    let secs = tick_ms / 1000;
    let index = index as u64;
    (secs < 1 << TICK_SECS_BITS && index < 1 << (63 - TICK_SECS_BITS))
        .then_some(TICK_BIT | index << TICK_SECS_BITS | secs)
}

/// The entry index and tick (Unix ms) of a tick's session.
pub fn read_tick_session(session: u64) -> Option<(usize, u64)> {
    if session & TICK_BIT == 0 {
        return None;
    }
    let index = (session & !TICK_BIT) >> TICK_SECS_BITS;
    let secs = session & ((1 << TICK_SECS_BITS) - 1);
    Some((index as usize, secs * 1000))
}

/// The frames that go before a durable job's `Store`: its priority (if not normal), and its
/// tick's claim (if it is a tick's job).
pub fn store_frames(task_id: u64, priority: Option<Priority>, tick: Option<TickJob>, out: &mut Vec<u8>) {
    if let Some(p) = priority.filter(|p| *p != Priority::Normal) {
        ToBridge::StorePriority { task_id, priority: p.index() as u8 }.encode(out);
    }
    if let Some(t) = tick {
        ToBridge::ClaimTick { task_id, tick_ms: t.tick_ms, ttl_ms: t.ttl_ms, name: t.name.as_bytes() }
            .encode(out);
    }
}

/// How long a tick's claim lives: past every node's chance to claim the same tick (also a
/// node that catches up on a missed one, which claims the last tick that passed), so two
/// periods of the schedule, and at least a minute.
fn claim_ttl_ms(schedule: &Schedule, tick: DateTime<Utc>) -> u64 {
    let period = schedule.next_after(tick).map_or(0, |n| (n - tick).num_milliseconds().max(0) as u64);
    period.saturating_mul(2).max(60_000)
}

impl Periodic {
    /// The entries of the config (checked at start: one that does not parse is left out).
    pub fn new(specs: &[crate::schedule::ScheduleSpec]) -> Self {
        let now = crate::schedule::wall_now();
        let entries = specs
            .iter()
            .filter_map(|spec| match Schedule::new(spec) {
                Ok(schedule) => Some(schedule),
                Err(e) => {
                    tracing::error!("{e}");
                    None
                }
            })
            .map(|schedule| {
                let next = deadline(&schedule, now);
                Entry { schedule, next, last_run_ms: None, runs: 0, missed: 0, last_by: None, elsewhere: 0 }
            })
            .collect();
        Periodic { entries, durable: false, pending: None }
    }

    /// Durable jobs, at start: a `missed = "once"` entry whose tick after `last` (the last one
    /// any node claimed, by name) has passed is due now, as a missed tick: it runs once for the
    /// ticks that passed while every node was down, claimed as the last that passed, so that
    /// nodes starting together run it once.
    pub fn catch_up(&mut self, last: &[(String, u64)]) {
        for (name, last_ms) in last {
            let Some(e) = self.entries.iter_mut().find(|e| &e.schedule.spec.name == name) else { continue };
            let Ok(last_ms) = i64::try_from(*last_ms) else { continue };
            let Some(last) = DateTime::<Utc>::from_timestamp_millis(last_ms) else { continue };
            let after = e.schedule.next_after(last);
            if let Some(tick) = after.filter(|t| *t <= crate::schedule::wall_now()) {
                tracing::info!(
                    "schedule {name}: tick {} and maybe later ones passed while no node ran it (missed = \"once\")",
                    crate::app::rfc3339(tick.timestamp_millis().max(0) as u64)
                );
                e.next = Some((tick, Instant::now()));
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().filter_map(|e| e.next.map(|(_, at)| at)).min()
    }

    /// The jobs due now: each entry's index, name, line and tick (Unix ms); each entry's next
    /// tick then set after now.
    pub fn due(&mut self, now: Instant) -> Vec<(usize, String, Vec<u8>, u64)> {
        let mut out = Vec::new();
        let wall = crate::schedule::wall_now();
        let durable = self.durable;
        for (index, e) in self.entries.iter_mut().enumerate() {
            let Some((tick, at)) = e.next else { continue };
            if at > now {
                continue;
            }
            let name = &e.schedule.spec.name;
            let (run, missed) = e.schedule.on_tick(tick, wall);
            if missed > 0 {
                e.missed += missed;
                tracing::warn!(
                    "schedule {name}: {missed} tick(s) from {} missed (the master could not run them in time); {}",
                    crate::app::rfc3339(tick.timestamp_millis().max(0) as u64),
                    if run { "running it once now (missed = \"once\")" } else { "skipped (missed = \"skip\")" }
                );
            }
            if run {
                // With durable jobs, a late tick run once for the missed ones is claimed as the
                // last that passed: the one a node that was up would have claimed, so that it
                // runs once across the nodes, not once per node that was down.
                let claimed = if durable && missed > 0 { e.schedule.last_by(tick, wall) } else { tick };
                let tick_ms = claimed.timestamp_millis().max(0) as u64;
                if !durable {
                    e.runs += 1;
                    e.last_run_ms = Some(crate::app::unix_ms(std::time::SystemTime::now()));
                }
                out.push((index, name.clone(), e.schedule.line.clone(), tick_ms));
            }
            e.next = deadline(&e.schedule, wall.max(tick));
        }
        out
    }
}

/// The first tick after `after`, and when it is due on the reactor's clock.
fn deadline(schedule: &Schedule, after: DateTime<Utc>) -> Option<(DateTime<Utc>, Instant)> {
    let tick = schedule.next_after(after)?;
    let ahead = (tick - crate::schedule::wall_now()).num_milliseconds().max(0) as u64;
    Some((tick, Instant::now() + Duration::from_millis(ahead)))
}

impl<A: Application> Master<'_, A> {
    /// Hands the jobs of the schedules due to workers, round robin.
    pub(super) fn run_schedules(&mut self) {
        if !matches!(self.phase, Phase::Running) || self.periodic.entries.is_empty() {
            return;
        }
        self.periodic.durable = self.durable.is_some();
        for (index, name, line, tick_ms) in self.periodic.due(Instant::now()) {
            let n = self.workers.len();
            self.round_robin = (self.round_robin + 1) % n;
            let worker = self.round_robin;
            // With durable jobs, the tick's own session: its job is stored with its claim.
            let session = match self.durable {
                Some(_) => match tick_session(index, tick_ms) {
                    Some(s) => s,
                    None => {
                        tracing::error!("schedule {name}: tick {tick_ms} cannot be named; not run");
                        continue;
                    }
                },
                None => 0,
            };
            tracing::info!(
                "schedule {name}: tick {}; its job goes to worker {worker}",
                crate::app::rfc3339(tick_ms)
            );
            self.counters.dispatch_count += 1;
            let bytes = self.deliver(worker, 0, Delivery::Request, |seq, out| {
                ToWorker::Request { seq, session, data: &line }.encode(out)
            });
            // Counted as a client's request is, so that its commit balances the books.
            self.counters.input_bytes += bytes;
        }
    }

    /// Each schedule for `stats`: its name, pattern, runs, and last and next run.
    pub(super) fn schedules_stats(&self) -> serde_json::Value {
        let when = |ms: Option<u64>| ms.map(crate::app::rfc3339);
        self.periodic
            .entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.schedule.spec.name,
                    "cron": e.schedule.spec.cron,
                    "timezone": e.schedule.spec.timezone.as_deref().unwrap_or("UTC"),
                    "runs": e.runs,
                    "missed": e.missed,
                    "last_run": when(e.last_run_ms),
                    "next_run": when(e.next.map(|(t, _)| t.timestamp_millis().max(0) as u64)),
                    // Durable jobs: who ran the last tick, and the ticks other nodes ran.
                    "last_run_node": e.last_by,
                    "ran_elsewhere": e.elsewhere,
                })
            })
            .collect()
    }

    /// A worker's frame, as a tick's job needs it: the `Task` of a tick's session (durable
    /// jobs) is the tick's job, stored with its claim (see `durable_worker_frame`), and then
    /// belongs to no session, as a tick's job in memory does.
    pub(super) fn tick_job<'f>(&mut self, frame: FromWorker<'f>) -> FromWorker<'f> {
        match frame {
            FromWorker::Task { task_id, session, target, group, flags, context, data }
                if session & TICK_BIT != 0 =>
            {
                let tick = read_tick_session(session)
                    .and_then(|(index, tick_ms)| Some((self.periodic.entries.get(index)?, tick_ms)));
                self.periodic.pending = tick.map(|(e, tick_ms)| {
                    let at = DateTime::<Utc>::from_timestamp_millis(tick_ms as i64).unwrap_or_default();
                    TickJob {
                        task_id,
                        tick_ms,
                        ttl_ms: claim_ttl_ms(&e.schedule, at),
                        name: e.schedule.spec.name.clone(),
                    }
                });
                FromWorker::Task { task_id, session: 0, target, group, flags, context, data }
            }
            other => other,
        }
    }

    /// The bridge says who claimed a tick: here, its job is stored and runs; elsewhere, the
    /// job made here for it is dropped (it was never stored), and counted.
    pub(super) fn on_tick_claim(
        &mut self,
        task_id: u64,
        tick_ms: u64,
        won: bool,
        name: &[u8],
        holder: &[u8],
    ) {
        let holder = String::from_utf8_lossy(holder).into_owned();
        if let Some(e) = self.periodic.entries.iter_mut().find(|e| e.schedule.spec.name.as_bytes() == name) {
            if e.last_run_ms.is_none_or(|last| last <= tick_ms) {
                e.last_run_ms = Some(tick_ms);
                e.last_by = Some(holder.clone());
            }
            if won {
                e.runs += 1;
            } else {
                e.elsewhere += 1;
            }
        }
        let name = String::from_utf8_lossy(name);
        let tick = crate::app::rfc3339(tick_ms);
        if won {
            tracing::info!("schedule {name}: tick {tick} claimed here; its job is {task_id}");
            return;
        }
        tracing::debug!("schedule {name}: tick {tick} claimed by node {holder} first; job {task_id} dropped");
        if self.jobs.remove(task_id).is_some() {
            self.counters.ticks_elsewhere += 1;
            // Not this node's job after all (as a durable duplicate is not).
            self.counters.tasks_accepted = self.counters.tasks_accepted.saturating_sub(1);
            self.shared.set_jobs_pending(self.jobs.len() as u64);
        }
    }
}
