//! The dashboard's requests on durable jobs, run by the bridge (the master never waits on
//! Redis): the nodes of the queue and the last dead letters (`overview`), and an operator's
//! `replay` or `discard` of one dead letter.
//!
//! A replay reads the entry and moves it under WATCH (MULTI: XADD to the jobs, XDEL from the
//! dead letters): if anyone touched the dead letters between the read and the move (another
//! dashboard, `taskd dead-letter replay`), nothing is moved and the read is done again, so
//! that one dead letter never runs twice from two replays.

use redis::{ConnectionLike, Value as RedisValue};
use serde_json::{json, Value};

use super::entry::JobEntry;
use super::keys::GROUP;
use super::redis_io::{self, StreamEntry};
use super::Durable;

/// Dead letters shown, the newest first.
const DEAD_SHOWN: usize = 50;
/// Reasons and recipients shown are cut to this many characters.
const TEXT_MAX: usize = 300;

/// Runs one request (`op`, JSON); the answer is JSON with `"ok"`.
pub fn handle(conn: &mut impl ConnectionLike, d: &Durable, op: &[u8]) -> Value {
    let req: Value = serde_json::from_slice(op).unwrap_or(Value::Null);
    let id = req["id"].as_str().unwrap_or("");
    let done = match req["op"].as_str() {
        Some("overview") => overview(conn, d),
        Some("replay") => replay(conn, d, id),
        Some("discard") => discard(conn, d, id),
        _ => Err(format!("unknown request {req}")),
    };
    match done {
        Ok(mut v) => {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("ok".into(), true.into());
            }
            v
        }
        Err(error) => json!({"ok": false, "error": error}),
    }
}

fn cut(s: &str) -> String {
    s.chars().take(TEXT_MAX).collect()
}

fn describe(e: &redis::RedisError) -> String {
    redis_io::describe(e)
}

/// Every node with a live lease on its name, with the consumers of its task processes.
fn overview(conn: &mut impl ConnectionLike, d: &Durable) -> Result<Value, String> {
    let prefix = d.keys.lease_of("");
    let pattern = d.keys.lease_of("*");
    let mut names: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(500)
            .query(conn)
            .map_err(|e| describe(&e))?;
        names.extend(keys.into_iter().filter_map(|k| k.strip_prefix(prefix.as_str()).map(str::to_string)));
        cursor = next;
        if cursor == 0 || names.len() > 1000 {
            break;
        }
    }
    // Consumers per node (`node/slot`), from the job stream's group; none yet: no group.
    let consumers: Vec<Vec<RedisValue>> =
        redis::cmd("XINFO").arg("CONSUMERS").arg(&d.keys.jobs).arg(GROUP).query(conn).unwrap_or_default();
    let mut per_node: std::collections::BTreeMap<String, usize> = Default::default();
    for c in &consumers {
        let name = c.chunks(2).find_map(|kv| match kv {
            [RedisValue::BulkString(k), RedisValue::BulkString(v)] if k == b"name" => {
                Some(String::from_utf8_lossy(v).into_owned())
            }
            [RedisValue::SimpleString(k), RedisValue::BulkString(v)] if k == "name" => {
                Some(String::from_utf8_lossy(v).into_owned())
            }
            _ => None,
        });
        if let Some((node, _)) = name.as_deref().and_then(|n| n.rsplit_once('/')) {
            *per_node.entry(node.to_string()).or_default() += 1;
        }
    }
    names.sort();
    let mut nodes = Vec::new();
    for name in &names {
        let ttl: i64 = redis::cmd("PTTL").arg(d.keys.lease_of(name)).query(conn).unwrap_or(-2);
        let state = if *name == d.node { "this node" } else { "running" };
        nodes.push(json!({"node": name, "state": state, "lease_ms": (ttl >= 0).then_some(ttl),
                          "consumers": per_node.remove(name).unwrap_or(0)}));
    }
    // Consumers left by nodes that hold no lease now (stopped, or dead and not yet claimed from).
    for (name, n) in per_node {
        nodes.push(
            json!({"node": name, "state": "no lease (stopped or gone)", "lease_ms": null, "consumers": n}),
        );
    }
    let v: RedisValue = redis::cmd("XREVRANGE")
        .arg(&d.keys.dead)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(DEAD_SHOWN)
        .query(conn)
        .map_err(|e| describe(&e))?;
    let dead_total: u64 = redis::cmd("XLEN").arg(&d.keys.dead).query(conn).unwrap_or(0);
    let dead: Vec<Value> = redis_io::entries(v).into_iter().map(dead_row).collect();
    Ok(json!({"nodes": nodes, "dead": dead, "dead_total": dead_total}))
}

fn dead_row(e: StreamEntry) -> Value {
    let why = cut(&e.text("why"));
    let id = e.id.clone();
    match JobEntry::parse(&e) {
        Some(job) => {
            let data: Value = serde_json::from_slice(&job.data).unwrap_or(Value::Null);
            let field = |k: &str| cut(data.get(k).and_then(Value::as_str).unwrap_or(""));
            json!({"id": id, "task_id": job.task_id, "origin": &*job.origin, "type": field("type"),
                   "to": field("to"), "reason": why, "replays": job.replays})
        }
        None => json!({"id": id, "task_id": null, "reason": why, "not_a_job": true}),
    }
}

fn valid_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() < 64
        && id.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{:?} is not a dead letter id (like 1700000000000-0)", cut(id)))
    }
}

/// Moves dead letter `id` back into the job stream, its replay count raised and its delivery
/// retries started again (as `taskd dead-letter replay`).
fn replay(conn: &mut impl ConnectionLike, d: &Durable, id: &str) -> Result<Value, String> {
    valid_id(id)?;
    let dead = d.keys.dead.as_str();
    let moved: Option<Value> = redis::transaction(conn, &[dead], |conn, pipe| {
        let v: RedisValue = redis::cmd("XRANGE").arg(dead).arg(id).arg(id).query(conn)?;
        let Some(entry) = redis_io::entries(v).into_iter().next() else {
            // Gone: answered below, nothing to run.
            return Ok(Some(None));
        };
        let Some(mut job) = JobEntry::parse(&entry) else {
            return Ok(Some(Some(json!({"not_a_job": true}))));
        };
        job.replays += 1;
        job.retries = 0;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(d.replay_stream(&entry)).arg("*");
        job.add(&mut cmd);
        pipe.add_command(cmd).ignore();
        pipe.cmd("XDEL").arg(dead).arg(id);
        // None from EXEC: the dead letters changed since the WATCH; the closure runs again.
        let done: Option<(u64,)> = pipe.query(conn)?;
        Ok(done.map(|_| Some(json!({"task_id": job.task_id, "replays": job.replays}))))
    })
    .map_err(|e| describe(&e))?;
    match moved {
        Some(v) if v.get("not_a_job").is_some() => {
            Err(format!("dead letter {id} is not a job entry: it cannot run (discard it)"))
        }
        Some(v) => Ok(json!({"id": id, "replayed": v})),
        None => Err(format!("no dead letter {id} (replayed or discarded meanwhile?)")),
    }
}

/// Deletes dead letter `id` for good.
fn discard(conn: &mut impl ConnectionLike, d: &Durable, id: &str) -> Result<Value, String> {
    valid_id(id)?;
    let n: u64 = redis::cmd("XDEL").arg(&d.keys.dead).arg(id).query(conn).map_err(|e| describe(&e))?;
    if n == 0 {
        return Err(format!("no dead letter {id} (replayed or discarded meanwhile?)"));
    }
    Ok(json!({"id": id, "discarded": n}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stream_ids_are_asked_for() {
        assert!(valid_id("1700000000000-0").is_ok());
        assert!(valid_id("1-1").is_ok());
        for bad in ["", "-", "1-", "-1", "1", "+", "1-1 2-2", "a-1", "1700000000000-0\r\nFLUSHALL"] {
            assert!(valid_id(bad).is_err(), "{bad:?}");
        }
    }
}
