//! The ticks of `[[schedule]]` with durable jobs: each tick is claimed once in Redis, by the
//! script that stores its job, so that every web node of a queue may run the same schedules
//! and each tick still runs once, on the node that claims it first.
//!
//! The claim is a key per tick ([`super::keys::Keys::tick`]) set with NX and a TTL well past
//! the schedule's period, holding `NODE/TASK_ID`. Claim and job go in one script: a claimed
//! tick always has its job, and a job is never stored for a tick another node claimed. The
//! bridge answers each claim to the master with a [`FromBridge::TickClaim`] (who has it).

use redis::{Cmd, Value};

use super::redis_io;
use super::Durable;
use crate::ipc::envelope::FromBridge;

/// A tick to claim with its job's store.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub task_id: u64,
    pub tick_ms: u64,
    pub ttl_ms: u64,
    pub name: String,
    /// The answer of a claim made before the round (see [`claim_first`]).
    pub answer: Option<Value>,
}

impl Claim {
    pub fn new(task_id: u64, tick_ms: u64, ttl_ms: u64, name: &[u8]) -> Claim {
        Claim {
            task_id,
            tick_ms,
            ttl_ms: ttl_ms.max(1),
            name: String::from_utf8_lossy(name).into_owned(),
            answer: None,
        }
    }

    /// Claimed before the round, by another node.
    pub fn lost(&self) -> bool {
        self.answer.as_ref().is_some_and(|a| redis_io::as_int(a) != Some(1))
    }
}

/// Claims, in one round trip before the round that stores them, the ticks of the jobs of
/// `items` that also have a deduplication key: their store is the key's script
/// (`dedup::claim_cmd`), which cannot also claim a tick, so the tick is claimed first and the
/// job stored in the round only if this node has it. A claim sent again (a new bridge) finds
/// itself and holds. Between the two, a node that dies leaves the tick claimed without its job.
pub(super) fn claim_first(
    conn: &mut redis::Connection,
    d: &Durable,
    items: &mut [super::bridge::Item],
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    let mut asked = 0;
    for item in items.iter() {
        if let super::bridge::Item::Store { task_id, tick: Some(claim), key: Some(_), .. } = item {
            if claim.answer.is_none() {
                pipe.add_command(claim_only(d, claim, *task_id));
                asked += 1;
            }
        }
    }
    if asked == 0 {
        return Ok(());
    }
    let answers: Vec<Value> = pipe.query(conn)?;
    let mut answers = answers.into_iter();
    for item in items.iter_mut() {
        if let super::bridge::Item::Store { tick: Some(claim), key: Some(_), .. } = item {
            if claim.answer.is_none() {
                claim.answer = answers.next();
            }
        }
    }
    Ok(())
}

/// Claims tick KEYS[1] for ARGV[1] (`NODE/TASK_ID`) for ARGV[2] ms and stores its job: into
/// the stream KEYS[2], or, with a time ARGV[3] > 0 (Unix ms), parked in the delayed set KEYS[2]
/// (member ARGV[4], fields in the hash KEYS[3]) as `bridge::SCHEDULE` does. Then records the
/// tick ARGV[5] as the schedule's last claimed one in KEYS[4] (if later than the one there; it
/// lives ARGV[6] ms). The job's fields are ARGV[7..]. Returns 1 when this claim holds (also
/// when it already did: a batch sent again by a new bridge stores nothing twice), else the
/// holder's value. A key of another type (someone else's) is an error, and stores nothing.
const CLAIM_AND_STORE: &str = "
local held = redis.call('GET', KEYS[1])
if held then
  if held == ARGV[1] then return 1 end
  return held
end
local last = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
if tonumber(ARGV[3]) > 0 then
  local kind = redis.call('TYPE', KEYS[2]).ok
  if kind ~= 'zset' and kind ~= 'none' then
    return redis.error_reply(KEYS[2] .. ' is a ' .. kind .. ', not the sorted set of delayed jobs')
  end
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], unpack(ARGV, 7))
  redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), ARGV[4])
else
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 7))
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
if tonumber(ARGV[5]) > last then
  redis.call('SET', KEYS[4], ARGV[5], 'PX', tonumber(ARGV[6]))
end
return 1";

/// How long a schedule's last claimed tick is remembered ([`super::keys::Keys::last_tick`]):
/// a queue whose every node was down for longer runs no catch-up for it (`missed = "once"`).
const LAST_KEEP_MS: u64 = 30 * 24 * 3600 * 1000;

/// Claims tick KEYS[1] for ARGV[1] for ARGV[2] ms, as [`CLAIM_AND_STORE`] does, without
/// storing a job (its job has a key: the script that takes the key stores it, after this);
/// records the tick ARGV[3] as the last claimed in KEYS[2] (for ARGV[4] ms).
const CLAIM_ONLY: &str = "
local held = redis.call('GET', KEYS[1])
if held then
  if held == ARGV[1] then return 1 end
  return held
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
if tonumber(ARGV[3]) > last then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', tonumber(ARGV[4]))
end
return 1";

/// The command that claims `claim` alone (see [`CLAIM_ONLY`]).
pub fn claim_only(d: &Durable, claim: &Claim, task_id: u64) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(CLAIM_ONLY)
        .arg(2)
        .arg(d.keys.tick(&claim.name, claim.tick_ms))
        .arg(d.keys.last_tick(&claim.name))
        .arg(holder(d, task_id))
        .arg(claim.ttl_ms)
        .arg(claim.tick_ms)
        .arg(LAST_KEEP_MS.max(claim.ttl_ms));
    cmd
}

/// The claim's value for this node's job `task_id`.
fn holder(d: &Durable, task_id: u64) -> String {
    format!("{}/{task_id}", d.node)
}

/// The command that claims `claim` and stores its job (to `stream`, or parked until
/// `run_at_ms`); the caller adds the job's fields (`JobEntry::add_fields`, and the rest).
pub fn claim_and_store(d: &Durable, claim: &Claim, stream: &str, task_id: u64, run_at_ms: u64) -> Cmd {
    let member = d.keys.scheduled_member(&d.node, task_id);
    let (dest, hash) = if run_at_ms > 0 {
        (d.keys.delayed.clone(), d.keys.delayed_hash(&member))
    } else {
        // Not read by the script; named so that every key it may touch is declared.
        (stream.to_string(), d.keys.delayed_hash(&member))
    };
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(CLAIM_AND_STORE)
        .arg(4)
        .arg(d.keys.tick(&claim.name, claim.tick_ms))
        .arg(dest)
        .arg(hash)
        .arg(d.keys.last_tick(&claim.name))
        .arg(holder(d, task_id))
        .arg(claim.ttl_ms)
        .arg(run_at_ms)
        .arg(member)
        .arg(claim.tick_ms)
        .arg(LAST_KEEP_MS.max(claim.ttl_ms));
    cmd
}

/// The last tick claimed of each `missed = "once"` schedule of `specs` that has one, read at a
/// web node's start. Not being able to read them is no reason not to start: said, and none.
pub fn at_start(d: &Durable, specs: &[crate::schedule::ScheduleSpec]) -> Vec<(String, u64)> {
    let names: Vec<String> =
        specs.iter().filter(|s| s.missed == crate::schedule::Missed::Once).map(|s| s.name.clone()).collect();
    if names.is_empty() {
        return Vec::new();
    }
    let read = redis_io::connect(&d.url, Some(redis_io::REPLY_LIMIT))
        .and_then(|mut c| last_claimed(&mut c, d, &names));
    match read {
        Ok(last) => names.into_iter().zip(last).filter_map(|(n, t)| Some((n, t?))).collect(),
        Err(e) => {
            tracing::warn!(
                "cannot read the schedules' last ticks ({}): ticks missed while every node was down are not run",
                redis_io::describe(&e)
            );
            Vec::new()
        }
    }
}

/// The last tick claimed of each schedule of `names` (Unix ms; None: none known), read at
/// start: a `missed = "once"` schedule whose ticks passed while every node was down runs once.
pub fn last_claimed(
    conn: &mut redis::Connection,
    d: &Durable,
    names: &[String],
) -> redis::RedisResult<Vec<Option<u64>>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = names.iter().map(|n| d.keys.last_tick(n)).collect();
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(conn)?;
    // Written by anyone who can write to Redis: a number, or nothing.
    Ok(values.into_iter().map(|v| v.and_then(|v| v.parse().ok())).collect())
}

/// Appends a [`FromBridge::TickClaim`] to `out` for each claim of `items` (in order), read from
/// `replies`, the claims' answers in that order.
pub(super) fn answers(d: &Durable, items: &[super::bridge::Item], replies: &[Value], out: &mut Vec<u8>) {
    let claims = items.iter().filter_map(|i| match i {
        super::bridge::Item::Store { tick: Some(claim), .. } => Some(claim),
        _ => None,
    });
    for (claim, reply) in claims.zip(replies) {
        let (won, by) = match redis_io::as_int(reply) {
            Some(1) => (true, d.node.clone()),
            _ => (false, holder_node(reply.clone())),
        };
        FromBridge::TickClaim {
            task_id: claim.task_id,
            tick_ms: claim.tick_ms,
            won,
            name: claim.name.as_bytes(),
            holder: by.as_bytes(),
        }
        .encode(out);
    }
}

/// The node named in a claim's value (`NODE/TASK_ID`), checked: anyone who can write to Redis
/// can write it. Something else shows as `?`.
fn holder_node(value: Value) -> String {
    let text = redis_io::as_text(value);
    let node = text.rsplit_once('/').map_or(text.as_str(), |(node, _)| node);
    if super::entry::valid_node(node) {
        node.to_string()
    } else {
        "?".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_claim_is_read_with_care() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(holder_node(bulk("web-2/17")), "web-2");
        assert_eq!(holder_node(bulk("web-2")), "web-2");
        assert_eq!(holder_node(bulk("\u{1b}[31mevil/1")), "?");
        assert_eq!(holder_node(bulk(&"x".repeat(500))), "?");
        assert_eq!(holder_node(Value::Nil), "?");
    }
}
