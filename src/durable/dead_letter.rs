//! `taskd dead-letter list|replay`: what an operator does with jobs that failed past their
//! attempts. A replayed job goes back into the job stream as it was, with its replay count
//! raised; its outcome reaches its origin node, which keeps it for a `result` query.

use std::io::Write;

use redis::Value;
use serde_json::json;

use super::entry::{outcomes_of_entry, JobEntry, OUTCOMES};
use super::redis_io::{self, StreamEntry};
use super::Durable;

fn connect(d: &Durable) -> Result<redis::Connection, String> {
    redis_io::connect(&d.url, Some(redis_io::REPLY_LIMIT))
        .map_err(|e| format!("cannot reach Redis at {}: {}", d.shown, redis_io::describe(&e)))
}

fn read_all(conn: &mut redis::Connection, d: &Durable, limit: usize) -> Result<Vec<StreamEntry>, String> {
    let v: Value = redis::cmd("XRANGE")
        .arg(&d.keys.dead)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(limit)
        .query(conn)
        .map_err(|e| format!("cannot read {}: {}", d.keys.dead, redis_io::describe(&e)))?;
    Ok(redis_io::entries(v))
}

/// One JSON line per dead job, oldest first.
pub fn list(d: &Durable, limit: usize, out: &mut impl Write) -> Result<usize, String> {
    let mut conn = connect(d)?;
    let mut entries = read_all(&mut conn, d, limit)?;
    for e in &mut entries {
        let line = match JobEntry::parse(e) {
            Some(job) => json!({
                "id": e.id,
                "task_id": job.task_id,
                "origin": &*job.origin,
                "attempts": e.number("a"),
                "replays": job.replays,
                "why": e.text("why"),
                "data": String::from_utf8_lossy(&job.data),
            }),
            // Outcomes for a node that never started (see `entry::add_outcomes`): for reading.
            None if e.get(OUTCOMES).is_some() => {
                let mut frames = Vec::new();
                let outcomes = outcomes_of_entry(&e.clone(), &mut frames).unwrap_or(0);
                json!({"id": e.id, "origin": e.text("o"), "why": e.text("why"), "outcomes": outcomes})
            }
            None => json!({"id": e.id, "error": "not a job entry"}),
        };
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    Ok(entries.len())
}

/// What `replay` did: how many jobs went back, and each entry it left where it is, with why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub count: usize,
    pub skipped: Vec<(String, &'static str)>,
}

/// Puts the named dead jobs (all of them with `ids` empty) back into the job stream; says how
/// many, and which entries it skipped (they cannot be run). An id that is not in the dead
/// letters is an error, and nothing is replayed.
pub fn replay(d: &Durable, ids: &[String]) -> Result<Replayed, String> {
    let mut conn = connect(d)?;
    let all = read_all(&mut conn, d, usize::MAX >> 1)?;
    let chosen: Vec<&StreamEntry> = if ids.is_empty() {
        all.iter().collect()
    } else {
        let missing: Vec<&String> = ids.iter().filter(|id| !all.iter().any(|e| &e.id == *id)).collect();
        if !missing.is_empty() {
            return Err(format!("not in {}: {missing:?} (see `taskd dead-letter list`)", d.keys.dead));
        }
        all.iter().filter(|e| ids.contains(&e.id)).collect()
    };
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut count = 0;
    let mut skipped = Vec::new();
    for e in chosen {
        let e = e.clone();
        let Some(mut job) = JobEntry::parse(&e) else {
            // Said by the caller: the command line has no logger to warn through.
            let why = if e.get(OUTCOMES).is_some() {
                "it holds the outcomes of jobs of a node that never started, not a job to run"
            } else {
                "it is not a job entry (malformed, or written by someone else)"
            };
            skipped.push((e.id.clone(), why));
            continue;
        };
        job.replays += 1;
        // An operator's replay is a fresh chance: its delivery retries start again.
        job.retries = 0;
        let stream = d.replay_stream(&e);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        job.add(&mut cmd);
        pipe.add_command(cmd).ignore();
        pipe.cmd("XDEL").arg(&d.keys.dead).arg(&e.id).ignore();
        count += 1;
    }
    if count > 0 {
        let _: Value =
            pipe.query(&mut conn).map_err(|e| format!("cannot replay: {}", redis_io::describe(&e)))?;
    }
    Ok(Replayed { count, skipped })
}
