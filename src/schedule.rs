//! Periodic jobs: the `[[schedule]]` entries of the config file (a name, a cron pattern with
//! seconds, an optional time zone, the job, what to do about ticks missed), and their ticks on
//! the wall clock. Patterns are croner's, zones jiff's (daylight-saving gaps and overlaps
//! handled there); the master only asks for the next tick after a time.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What to do with ticks that passed while the node could not run them (stopped, suspended,
/// a clock step): none of them, or one for all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    #[default]
    Skip,
    Once,
}

/// The wall clock now (chrono's `clock` feature is not built: it would bring the local zone).
pub fn wall_now() -> DateTime<Utc> {
    DateTime::<Utc>::from(std::time::SystemTime::now())
}

/// A tick later than this when the master gets to it was missed (not merely late).
pub const MISSED_AFTER_MS: i64 = 1000;

/// One `[[schedule]]` entry, as the config file gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Unique among the entries: the logs, `stats` and Prometheus name it.
    pub name: String,
    /// Six fields, seconds first: `0 */5 * * * *` is every five minutes.
    pub cron: String,
    /// An IANA zone (`Europe/Paris`) the pattern is read in; UTC if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default)]
    pub missed: Missed,
    /// The job: a request as a client would send it, as a table.
    pub job: serde_json::Value,
}

/// A checked entry: its pattern and zone parsed.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub spec: ScheduleSpec,
    cron: croner::Cron,
    tz: Option<jiff::tz::TimeZone>,
    /// The job as one request line.
    pub line: Vec<u8>,
}

impl Schedule {
    /// Checks an entry: a name of letters, digits, `-`, `_`, `.` (1 to 64), a pattern with
    /// seconds, a known zone, a job that is a table. The reason names what is wrong.
    pub fn new(spec: &ScheduleSpec) -> Result<Schedule, String> {
        let name = &spec.name;
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!("schedule name {name:?} is not 1 to 64 letters, digits, '-', '_' or '.'"));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .build()
            .parse(&spec.cron)
            .map_err(|e| {
                format!(
                    "schedule {name}: cron {:?} is not a pattern of six fields, seconds first \
                     (\"0 */5 * * * *\"): {e}",
                    spec.cron
                )
            })?;
        let tz = match &spec.timezone {
            None => None,
            Some(z) => Some(zone(z).ok_or_else(|| {
                format!("schedule {name}: timezone {z:?} is not an IANA zone such as \"Europe/Paris\"")
            })?),
        };
        if !spec.job.is_object() {
            return Err(format!("schedule {name}: job must be a table, as a client's JSON job"));
        }
        let line = serde_json::to_vec(&spec.job).map_err(|e| format!("schedule {name}: job: {e}"))?;
        let schedule = Schedule { spec: spec.clone(), cron, tz, line };
        if schedule.next_after(wall_now()).is_none() {
            return Err(format!("schedule {name}: cron {:?} never matches", spec.cron));
        }
        Ok(schedule)
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.tz {
            Some(tz) => {
                // chrono writes a leap second as a nanosecond past 999,999,999; jiff has none.
                let nanos = t.timestamp_subsec_nanos().min(999_999_999) as i32;
                let at = jiff::Timestamp::new(t.timestamp(), nanos).ok()?;
                let next = self.cron.find_next_occurrence(&at.to_zoned(tz.clone()), false).ok()?;
                let ns = next.timestamp().as_nanosecond();
                let secs = i64::try_from(ns.div_euclid(1_000_000_000)).ok()?;
                DateTime::from_timestamp(secs, ns.rem_euclid(1_000_000_000) as u32)
            }
            None => self.cron.find_next_occurrence(&t, false).ok(),
        }
    }

    /// The master got to tick `tick` at `now`: whether to run it, and how many ticks (this
    /// one included) were missed, if it was late past [`MISSED_AFTER_MS`].
    pub fn on_tick(&self, tick: DateTime<Utc>, now: DateTime<Utc>) -> (bool, u64) {
        if (now - tick).num_milliseconds() <= MISSED_AFTER_MS {
            return (true, 0);
        }
        let mut missed = 1u64;
        let mut t = tick;
        while let Some(next) = self.next_after(t).filter(|n| *n <= now) {
            missed += 1;
            t = next;
            if missed >= 1_000_000 {
                break;
            }
        }
        (self.spec.missed == Missed::Once, missed)
    }

    /// The last tick at or before `now`, from `tick` on (`tick` itself if none later passed).
    pub fn last_by(&self, tick: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
        let mut t = tick;
        for _ in 0..1_000_000 {
            match self.next_after(t).filter(|n| *n <= now) {
                Some(next) => t = next,
                None => break,
            }
        }
        t
    }
}

/// The IANA zone `name` from the system's tz database (`/usr/share/zoneinfo`, or `TZDIR`), or
/// from the copy built in when the system has no such zone (or no database at all).
fn zone(name: &str) -> Option<jiff::tz::TimeZone> {
    jiff::tz::db().get(name).or_else(|_| jiff::tz::TimeZoneDatabase::bundled().get(name)).ok()
}

/// Checks every entry, and that no two share a name.
pub fn check_all(specs: &[ScheduleSpec]) -> Result<Vec<Schedule>, String> {
    let mut out: Vec<Schedule> = Vec::with_capacity(specs.len());
    for spec in specs {
        if out.iter().any(|s| s.spec.name == spec.name) {
            return Err(format!("two schedules are named {:?}", spec.name));
        }
        out.push(Schedule::new(spec)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cron: &str, tz: Option<&str>, missed: Missed) -> ScheduleSpec {
        ScheduleSpec {
            name: "daily-report".into(),
            cron: cron.into(),
            timezone: tz.map(Into::into),
            missed,
            job: serde_json::json!({"type": "email", "to": "boss@example.com"}),
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn ticks_follow_the_pattern_with_seconds_in_the_zone_given() {
        let every_5s = Schedule::new(&spec("*/5 * * * * *", None, Missed::Skip)).unwrap();
        assert_eq!(every_5s.next_after(at("2026-12-24T08:00:03Z")), Some(at("2026-12-24T08:00:05Z")));
        assert_eq!(every_5s.next_after(at("2026-12-24T08:00:05Z")), Some(at("2026-12-24T08:00:10Z")));
        // 08:00 in Paris is 07:00 UTC in winter.
        let paris = Schedule::new(&spec("0 0 8 * * *", Some("Europe/Paris"), Missed::Skip)).unwrap();
        assert_eq!(paris.next_after(at("2026-12-24T06:00:00Z")), Some(at("2026-12-24T07:00:00Z")));
    }

    #[test]
    fn a_tick_in_a_daylight_saving_gap_runs_at_its_end_and_one_in_an_overlap_runs_once() {
        let daily = Schedule::new(&spec("0 30 2 * * *", Some("Europe/Paris"), Missed::Skip)).unwrap();
        let ticks = |from: &str| {
            let mut t = at(from);
            (0..3)
                .map(|_| {
                    t = daily.next_after(t).unwrap();
                    t
                })
                .collect::<Vec<_>>()
        };
        // 2027-03-28: 02:00 CET becomes 03:00 CEST, so 02:30 does not exist: the tick is at 03:00.
        let spring = ["2027-03-27T01:30:00Z", "2027-03-28T01:00:00Z", "2027-03-29T00:30:00Z"];
        assert_eq!(ticks("2027-03-27T00:00:00Z"), spring.map(at));
        // 2027-10-31: 03:00 CEST becomes 02:00 CET, so 02:30 comes twice: the first one only.
        let autumn = ["2027-10-30T00:30:00Z", "2027-10-31T00:30:00Z", "2027-11-01T01:30:00Z"];
        assert_eq!(ticks("2027-10-30T00:00:00Z"), autumn.map(at));
        // A zone of half-hour daylight saving, read from the system's database or the bundled one.
        let lord_howe =
            Schedule::new(&spec("0 0 0 L * *", Some("Australia/Lord_Howe"), Missed::Skip)).unwrap();
        assert_eq!(lord_howe.next_after(at("2027-03-01T00:00:00Z")), Some(at("2027-03-30T13:00:00Z")));
        assert_eq!(lord_howe.next_after(at("2027-03-31T00:00:00Z")), Some(at("2027-04-29T13:30:00Z")));
    }

    #[test]
    fn bad_entries_are_refused_naming_what_is_wrong() {
        let e = Schedule::new(&spec("0 8 * * *", None, Missed::Skip)).unwrap_err();
        assert!(e.contains("six fields"), "{e}");
        let e = Schedule::new(&spec("0 0 8 * * *", Some("Mars/Olympus"), Missed::Skip)).unwrap_err();
        assert!(e.contains("IANA"), "{e}");
        let mut bad = spec("* * * * * *", None, Missed::Skip);
        bad.name = "a b".into();
        assert!(Schedule::new(&bad).unwrap_err().contains("letters"));
        bad.name = "x".into();
        bad.job = serde_json::json!("email");
        assert!(Schedule::new(&bad).unwrap_err().contains("table"));
        let twice = [spec("* * * * * *", None, Missed::Skip), spec("* * * * * *", None, Missed::Skip)];
        assert!(check_all(&twice).unwrap_err().contains("two schedules"));
    }

    #[test]
    fn late_ticks_are_missed_skipped_or_run_once() {
        let skip = Schedule::new(&spec("* * * * * *", None, Missed::Skip)).unwrap();
        let once = Schedule::new(&spec("* * * * * *", None, Missed::Once)).unwrap();
        let tick = at("2026-12-24T08:00:00Z");
        assert_eq!(skip.on_tick(tick, at("2026-12-24T08:00:00.300Z")), (true, 0));
        assert_eq!(skip.on_tick(tick, at("2026-12-24T08:00:10.500Z")), (false, 11));
        assert_eq!(once.on_tick(tick, at("2026-12-24T08:00:10.500Z")), (true, 11));
        assert_eq!(once.last_by(tick, at("2026-12-24T08:00:10.500Z")), at("2026-12-24T08:00:10Z"));
        assert_eq!(once.last_by(tick, at("2026-12-24T08:00:00.300Z")), tick);
    }
}
