//! What a node does with Redis before it forks anything: check that the server keeps what it
//! is given, take a fresh range of task ids, and find the jobs it had accepted before it died.

use std::collections::HashSet;

use redis::{Connection, ConnectionLike, Value};

use super::entry::JobEntry;
use super::keys::{Keys, GROUP};
use super::redis_io::{self, as_array, as_int, as_text};
use super::Durable;

/// Task ids of one start of a node are `epoch << EPOCH_SHIFT | n`: 2^32 jobs per start, and
/// ids stay below 2^53, exact in a JavaScript number, for 2^21 starts.
pub const EPOCH_SHIFT: u32 = 32;

/// What a restarted node takes back.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The first task id of this start.
    pub first_task_id: u64,
    /// This node's jobs still in the stream: accepted before, not finished.
    pub jobs: Vec<JobEntry>,
    /// Final replies kept for clients that were gone, oldest first.
    pub results: Vec<(u64, Vec<u8>)>,
    /// The outcomes waiting in this node's reply stream (jobs that finished while it was
    /// down), as `Reply` frames: acted on before the node serves, so that its first answer to
    /// a `result` query already knows them.
    pub replies: Vec<u8>,
    /// The last reply stream entry read here: the bridge reads on from there.
    pub replies_from: String,
    /// The last tick claimed of each `missed = "once"` schedule (see `ticks::last_claimed`).
    pub last_ticks: Vec<(String, u64)>,
}

/// Connects, checks the server, and recovers this node's state.
pub fn prepare(d: &Durable) -> Result<Recovered, String> {
    let mut conn = redis_io::connect(&d.url, Some(redis_io::REPLY_LIMIT))
        .map_err(|e| format!("cannot reach Redis at {}: {}", d.shown, redis_io::describe(&e)))?;
    for warning in check_server(&mut conn) {
        tracing::warn!("{warning}");
    }
    take_lease(&mut conn, d, &lease_token(std::process::id()))?;
    ensure_group(&mut conn, &d.keys).map_err(|e| {
        match super::wrong_type::name_them(&mut conn, std::slice::from_ref(&d.keys.jobs), &e) {
            Some(key) => format!(
                "cannot create the consumer group: {key} is not a stream (someone else wrote it); \
                 delete it, or make it a stream, and start again"
            ),
            None => format!("cannot create the consumer group: {}", redis_io::describe(&e)),
        }
    })?;
    let epoch: u64 = redis::cmd("INCR")
        .arg(&d.keys.epoch)
        .query(&mut conn)
        .map_err(|e| format!("cannot take a range of task ids: {}", redis_io::describe(&e)))?;
    // Every priority's stream of the main one and of each lane it routes to.
    let lanes: Vec<Option<&str>> =
        std::iter::once(None).chain(d.routes.iter().map(|k| Some(k.as_str()))).collect();
    // And the stream of packs, which every node reads (see `super::pack`).
    let streams: Vec<String> = crate::app::Priority::ALL
        .into_iter()
        .flat_map(|p| lanes.iter().map(move |lane| d.keys.stream(*lane, p)))
        .chain(std::iter::once(d.keys.packs()))
        .collect();
    let jobs =
        own_jobs(&mut conn, &d.keys, &streams, &d.node).map_err(|e| {
            match super::wrong_type::name_them(&mut conn, &streams, &e) {
                Some(keys) => format!(
                    "cannot read the job streams: {keys} is not a stream (someone else wrote it); \
                 delete it, or make it a stream, and start again"
                ),
                None => format!("cannot read the job stream: {}", redis_io::describe(&e)),
            }
        })?;
    // The lanes it routes to exist from now on (with their group), read or not: a parked job
    // goes back into a lane only if its stream exists (see `consumer::MOVE_DUE`).
    for stream in &streams {
        ensure_group_of(&mut conn, stream)
            .map_err(|e| format!("cannot create the job stream {stream}: {}", redis_io::describe(&e)))?;
    }
    let results = kept_results(&mut conn, &d.keys)
        .map_err(|e| format!("cannot read kept results: {}", redis_io::describe(&e)))?;
    // After the job stream: a job that finishes between the two reads is in both (and its
    // outcome finishes it), never in neither.
    let (replies, outcomes, replies_from) = waiting_replies(&mut conn, &d.keys)
        .map_err(|e| format!("cannot read the reply stream: {}", redis_io::describe(&e)))?;
    if !jobs.is_empty() || !results.is_empty() || outcomes > 0 {
        tracing::info!(
            "node {}: {} unfinished jobs taken back, {} kept results, {} outcomes of jobs that finished while it was down",
            d.node,
            jobs.len(),
            results.len(),
            outcomes
        );
    }
    Ok(Recovered {
        first_task_id: epoch << EPOCH_SHIFT,
        jobs,
        results,
        replies,
        replies_from,
        last_ticks: Vec::new(),
    })
}

/// How long a node's lease on its name lasts unless renewed (renewed every third of that by
/// the web node's master, through its bridge, or by the task node's manager), and so how long
/// a node killed on another host, or hung, keeps its name.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(15);

/// This run's claim on the node name: `HOST:PID` of the master (or task-node manager).
pub fn lease_token(master_pid: u32) -> String {
    format!("{}:{master_pid}", super::host_name())
}

/// Takes the name from a dead holder: only if it is still that holder's (compare and set), so
/// that two runs taking over at once cannot both win.
const TAKE_OVER: &str = "
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or not v then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

/// Renews the name if it is still ours; takes it again if it lapsed and nobody took it (the
/// node was stopped, or Redis was away, past the TTL: no other run holds the name). Returns
/// 1, or the token of the run that holds it now.
const RENEW: &str = "
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return v";

/// Gives the name back, if this run still holds it.
const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

fn lease_ttl_ms() -> u64 {
    LEASE_TTL.as_millis() as u64
}

/// Takes the node's name for this run (`token`), or says who has it. A lease left by a run on
/// this host whose master is dead (a kill -9, a crash) is taken over at once.
pub fn take_lease(conn: &mut Connection, d: &Durable, token: &str) -> Result<(), String> {
    let failed =
        |e: redis::RedisError| format!("cannot take the node name {}: {}", d.node, redis_io::describe(&e));
    let taken: Option<String> = redis::cmd("SET")
        .arg(&d.keys.lease)
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(lease_ttl_ms())
        .query(conn)
        .map_err(failed)?;
    if taken.is_some() {
        return Ok(());
    }
    let holder: Option<String> = redis::cmd("GET").arg(&d.keys.lease).query(conn).map_err(failed)?;
    let holder = holder.unwrap_or_default();
    let dead_here = holder
        .strip_prefix(&format!("{}:", super::host_name()))
        .and_then(|pid| pid.parse::<i32>().ok())
        .is_some_and(|pid| !alive(pid));
    if holder.is_empty() || dead_here {
        let won: i64 = redis::Script::new(TAKE_OVER)
            .key(&d.keys.lease)
            .arg(&holder)
            .arg(token)
            .arg(lease_ttl_ms())
            .invoke(conn)
            .map_err(failed)?;
        if won == 1 {
            if dead_here {
                tracing::info!("node {}: took over the name from {holder}, which is dead", d.node);
            }
            return Ok(());
        }
        return Err(format!("invalid node_id: {} was taken by another run just now; try again", d.node));
    }
    Err(format!(
        "invalid node_id: {} is in use by a running taskd ({holder}); give this one another --node-id, \
         or stop that one (a node killed on another host keeps its name for {} s)",
        d.node,
        LEASE_TTL.as_secs()
    ))
}

/// Whether this run still holds the node's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    Held,
    /// Another run holds it now: its token.
    Lost(String),
}

/// Renews the lease if it is still `token`'s (compare and set on the token, never a blind SET
/// that would take the name back from a run that took it meanwhile).
pub fn renew_lease(conn: &mut impl ConnectionLike, d: &Durable, token: &str) -> redis::RedisResult<Lease> {
    let v: Value =
        redis::Script::new(RENEW).key(&d.keys.lease).arg(token).arg(lease_ttl_ms()).invoke(conn)?;
    Ok(match v {
        Value::Int(1) => Lease::Held,
        other => Lease::Lost(as_text(other)),
    })
}

/// Gives the name back if it is still `token`'s.
pub fn release_lease(conn: &mut impl ConnectionLike, d: &Durable, token: &str) {
    let released: redis::RedisResult<i64> =
        redis::Script::new(RELEASE).key(&d.keys.lease).arg(token).invoke(conn);
    if let Err(e) = released {
        tracing::debug!("cannot give the node name back: {}", redis_io::describe(&e));
    }
}

/// Whether process `pid` of this host runs (a zombie does not: it is only not reaped yet).
fn alive(pid: i32) -> bool {
    let exists = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false);
    exists && !zombie
}

/// Creates the consumer group (and the stream) unless it exists. From id 0: a job added
/// before the group existed is still run.
pub fn ensure_group(conn: &mut Connection, keys: &Keys) -> redis::RedisResult<()> {
    ensure_group_of(conn, &keys.jobs)
}

/// The same for one stream: the main one or a type's lane.
pub fn ensure_group_of(conn: &mut Connection, stream: &str) -> redis::RedisResult<()> {
    let created: redis::RedisResult<Value> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM").query(conn);
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// What could lose or evict acknowledged jobs, in the server's settings; and what taskd does
/// without the commands an ACL user may lack (CONFIG, CLIENT).
pub fn check_server(conn: &mut Connection) -> Vec<String> {
    let mut warnings = Vec::new();
    // CLIENT LIST of the pub/sub clients: the same right as of all (client|list), at no cost.
    let listed: redis::RedisResult<Value> =
        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub").query(conn);
    if let Err(e) = listed {
        warnings.push(format!(
            "this Redis user may not run CLIENT LIST or CLIENT SETNAME ({}): consumers' connections \
             go unnamed and the consumers of dead task processes are left in the group rather than \
             deleted (they hold no job; XINFO CONSUMERS lists them; allow +client|setname \
             +client|list to have them deleted)",
            redis_io::describe(&e)
        ));
    }
    let mut refused = None;
    let mut get = |name: &str| -> Option<String> {
        let v: redis::RedisResult<Value> = redis::cmd("CONFIG").arg("GET").arg(name).query(conn);
        match v {
            Ok(v) => as_array(v).into_iter().nth(1).map(as_text),
            Err(e) => {
                refused.get_or_insert_with(|| redis_io::describe(&e));
                None
            }
        }
    };
    let (Some(aof), Some(fsync), Some(policy)) =
        (get("appendonly"), get("appendfsync"), get("maxmemory-policy"))
    else {
        warnings.push(format!(
            "cannot read Redis's settings (CONFIG GET refused: {}): durability of jobs unchecked; \
             make sure the server runs with appendonly yes and maxmemory-policy noeviction",
            refused.unwrap_or_default()
        ));
        return warnings;
    };
    let mut warnings = Vec::new();
    if aof != "yes" {
        warnings.push(format!(
            "Redis runs with appendonly {aof}: if redis-server restarts, accepted jobs are lost \
             (set appendonly yes)"
        ));
    } else if fsync == "no" {
        warnings.push(
            "Redis runs with appendfsync no: a crash of the machine can lose the last ~30 s of \
             accepted jobs (appendfsync everysec loses at most 1 s, always none)"
                .into(),
        );
    }
    if policy != "noeviction" {
        warnings.push(format!(
            "Redis runs with maxmemory-policy {policy}: under memory pressure it may evict job \
             streams (set maxmemory-policy noeviction)"
        ));
    }
    warnings
}

/// This node's jobs in `streams` (the main one and its lanes) and in the delayed set.
fn own_jobs(
    conn: &mut Connection,
    keys: &Keys,
    streams: &[String],
    node: &str,
) -> redis::RedisResult<Vec<JobEntry>> {
    let mut jobs = Vec::new();
    for stream in streams {
        // Finished jobs' entries wait in the stream for a trim (see `super::trim`): skipped.
        let finished = Finished::of(conn, stream)?;
        let mut from = "-".to_string();
        loop {
            let page: Value =
                redis::cmd("XRANGE").arg(stream).arg(&from).arg("+").arg("COUNT").arg(1000).query(conn)?;
            let entries = redis_io::entries(page);
            let Some(last) = entries.last() else { break };
            from = format!("({}", last.id);
            let entries = entries.into_iter().filter(|e| !finished.holds(&e.id));
            if super::keys::is_packs(stream) {
                jobs.extend(entries.flat_map(|e| packed_jobs(&e)).filter(|j| *j.origin == *node));
            } else {
                jobs.extend(entries.filter_map(|e| JobEntry::parse(&e)).filter(|j| *j.origin == *node));
            }
        }
    }
    // And those waiting in the delayed set for a retry (after the stream: one moved back in
    // between is in both, and taken once).
    let mut seen: std::collections::HashSet<u64> = jobs.iter().map(|j| j.task_id).collect();
    let mut start = 0;
    loop {
        let ids: Vec<String> =
            redis::cmd("ZRANGE").arg(&keys.delayed).arg(start).arg(start + 999).query(conn)?;
        if ids.is_empty() {
            break;
        }
        start += ids.len();
        // A retry's member is its task id; a job for later's, `NODE:ID` (only this node's are
        // read). Anyone who can write to Redis can write a member: any other is skipped.
        let mine = |m: &&String| {
            m.parse::<u64>().is_ok()
                || m.strip_prefix(node)
                    .and_then(|r| r.strip_prefix(':'))
                    .is_some_and(|id| id.parse::<u64>().is_ok())
        };
        for member in ids.iter().filter(mine) {
            let fields: Vec<(Vec<u8>, Vec<u8>)> =
                redis::cmd("HGETALL").arg(keys.delayed_hash(member)).query(conn)?;
            let entry = redis_io::StreamEntry::with_fields(String::new(), fields);
            match JobEntry::parse(&entry) {
                Some(job) if *job.origin == *node && seen.insert(job.task_id) => jobs.push(job),
                _ => {}
            }
        }
    }
    Ok(jobs)
}

/// The jobs of an entry of the stream of packs, as [`JobEntry::parse`] reads a plain entry's
/// (those before any damage; none of an entry that is no pack).
fn packed_jobs(e: &redis_io::StreamEntry) -> Vec<JobEntry> {
    // Its field `p` (`pack::FIELD`).
    let Some(blob) = e.get("p") else { return Vec::new() };
    super::pack::jobs(blob)
        .0
        .into_iter()
        .filter_map(|fields| match JobEntry::checked_fields(fields) {
            Ok(job) => Some(job),
            Err(super::entry::Rejected::Invalid { job, .. }) => Some(*job),
            Err(super::entry::Rejected::NotAJob(_)) => None,
        })
        .collect()
}

/// Every outcome in this node's reply stream, as `Reply` frames; how many; the last entry id.
/// A malformed entry is logged and deleted.
fn waiting_replies(conn: &mut Connection, keys: &Keys) -> redis::RedisResult<(Vec<u8>, usize, String)> {
    let mut frames = Vec::new();
    let mut count = 0;
    let mut last = "0-0".to_string();
    loop {
        let page: Value = redis::cmd("XRANGE")
            .arg(&keys.replies)
            .arg(format!("({last}"))
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query(conn)?;
        let entries = redis_io::entries(page);
        let Some(end) = entries.last() else { break };
        last.clone_from(&end.id);
        for entry in entries {
            match super::entry::outcomes_of_entry(&entry, &mut frames) {
                Ok(n) => count += n,
                Err(why) => {
                    tracing::warn!(
                        "reply entry {} of {} is malformed ({why}); deleted",
                        entry.id,
                        keys.replies
                    );
                    let _: Value = redis::cmd("XDEL").arg(&keys.replies).arg(&entry.id).query(conn)?;
                }
            }
        }
    }
    Ok((frames, count, last))
}

fn kept_results(conn: &mut Connection, keys: &Keys) -> redis::RedisResult<Vec<(u64, Vec<u8>)>> {
    let all: Value = redis::cmd("XRANGE").arg(&keys.results).arg("-").arg("+").query(conn)?;
    Ok(redis_io::entries(all)
        .into_iter()
        .filter_map(|e| Some((e.number("t")?, e.get("l")?.to_vec())))
        .collect())
}

/// Which entries of a job stream are acknowledged (finished) and not trimmed yet: those the
/// group delivered (at most its last-delivered id) that no consumer holds. Read before the
/// stream's entries: an entry acknowledged after this look is kept as unfinished, and its
/// outcome, stored with its acknowledgement, is read after the streams (as a job that
/// finishes between the two reads always was).
struct Finished {
    last: Option<(u64, u64)>,
    pending: HashSet<String>,
}

impl Finished {
    fn of(conn: &mut Connection, stream: &str) -> redis::RedisResult<Finished> {
        let groups: redis::RedisResult<Value> = redis::cmd("XINFO").arg("GROUPS").arg(stream).query(conn);
        // No stream, no group: nothing delivered.
        let Ok(groups) = groups else { return Ok(Finished { last: None, pending: HashSet::new() }) };
        let last = as_array(groups).into_iter().find_map(|g| {
            let fields = as_array(g);
            let field = |name: &str| {
                fields.chunks(2).find_map(|kv| match kv {
                    [k, v] if as_text(k.clone()) == name => Some(as_text(v.clone())),
                    _ => None,
                })
            };
            (field("name").as_deref() == Some(GROUP)).then(|| field("last-delivered-id")).flatten()
        });
        let Some(last) = last.as_deref().and_then(stream_id) else {
            return Ok(Finished { last: None, pending: HashSet::new() });
        };
        let summary: Value = redis::cmd("XPENDING").arg(stream).arg(GROUP).query(conn)?;
        let held = as_array(summary).first().and_then(as_int).unwrap_or(0).max(0);
        let mut pending = HashSet::new();
        if held > 0 {
            let v: Value =
                redis::cmd("XPENDING").arg(stream).arg(GROUP).arg("-").arg("+").arg(held).query(conn)?;
            pending.extend(
                as_array(v).into_iter().filter_map(|item| as_array(item).into_iter().next().map(as_text)),
            );
        }
        Ok(Finished { last: Some(last), pending })
    }

    /// Whether the entry `id` is a finished job's.
    fn holds(&self, id: &str) -> bool {
        match (self.last, stream_id(id)) {
            (Some(last), Some(n)) => n <= last && !self.pending.contains(id),
            _ => false,
        }
    }
}

/// A stream entry id `MS-SEQ` as numbers (compared in this order).
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The delivery count of each entry pending for `consumer`, by id.
pub fn delivery_counts(
    conn: &mut Connection,
    stream: &str,
    consumer: &str,
    count: usize,
) -> redis::RedisResult<Vec<(String, u32)>> {
    let v: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(count)
        .arg(consumer)
        .query(conn)?;
    Ok(as_array(v)
        .into_iter()
        .filter_map(|item| {
            let mut parts = as_array(item).into_iter();
            let id = as_text(parts.next()?);
            let _owner = parts.next();
            let _idle = parts.next();
            let n = as_int(&parts.next()?)?;
            Some((id, u32::try_from(n).unwrap_or(u32::MAX)))
        })
        .collect())
}
