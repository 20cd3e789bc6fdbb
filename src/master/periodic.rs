//! The master's side of periodic jobs (`[[schedule]]`): each entry's next tick as a deadline
//! of the reactor, and at each tick its job handed to a worker as a request from no client
//! (session 0: the replies go nowhere, the job's outcome is logged), so the application reads
//! it as it reads a client's. Missed ticks (the master was stopped or suspended past them)
//! are skipped or run once, as the entry says.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::*;
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
}

#[derive(Default)]
pub struct Periodic {
    pub entries: Vec<Entry>,
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
                Entry { schedule, next, last_run_ms: None, runs: 0, missed: 0 }
            })
            .collect();
        Periodic { entries }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().filter_map(|e| e.next.map(|(_, at)| at)).min()
    }

    /// The lines of the jobs due now (each entry's next tick then set after now).
    pub fn due(&mut self, now: Instant) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let wall = crate::schedule::wall_now();
        for e in &mut self.entries {
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
                e.runs += 1;
                e.last_run_ms = Some(crate::app::unix_ms(std::time::SystemTime::now()));
                out.push((name.clone(), e.schedule.line.clone()));
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
        for (name, line) in self.periodic.due(Instant::now()) {
            let n = self.workers.len();
            self.round_robin = (self.round_robin + 1) % n;
            let worker = self.round_robin;
            tracing::info!("schedule {name}: tick; its job goes to worker {worker}");
            self.counters.dispatch_count += 1;
            let bytes = self.deliver(worker, 0, Delivery::Request, |seq, out| {
                ToWorker::Request { seq, session: 0, data: &line }.encode(out)
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
                })
            })
            .collect()
    }
}
