//! The ticks of `[[schedule]]` with durable jobs: each tick is claimed once in Redis, by the
//! script that stores its job, so that every web node of a queue may run the same schedules
//! and each tick still runs once, on the node that claims it first.
//!
//! The claim is a key per tick ([`super::keys::Keys::tick`]) set with NX and a TTL well past
//! the schedule's period, holding `NODE/TASK_ID`. Claim and job go in one script: a claimed
//! tick always has its job, and a job is never stored for a tick another node claimed. A job
//! with a deduplication key also takes its key in that script ([`CLAIM_KEY_AND_STORE`]): a
//! tick whose key another job holds is claimed with no job, as a duplicate. The bridge
//! answers each claim to the master with a [`FromBridge::TickClaim`] (who has it).

use redis::{Cmd, Value};

use super::dedup::{self, key_holder_fn};
use super::redis_io;
use super::store_job::store_job_fn;
use super::Durable;
use crate::ipc::envelope::FromBridge;

/// A tick to claim with its job's store.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub task_id: u64,
    pub tick_ms: u64,
    pub ttl_ms: u64,
    pub name: String,
}

impl Claim {
    pub fn new(task_id: u64, tick_ms: u64, ttl_ms: u64, name: &[u8]) -> Claim {
        Claim { task_id, tick_ms, ttl_ms: ttl_ms.max(1), name: String::from_utf8_lossy(name).into_owned() }
    }
}

/// Lua: `claim_tick(key, value, ttl, last, tick, keep)` claims the tick `key` as `value` for
/// `ttl` ms and records `tick` (Unix ms) as the schedule's last claimed one in `last` if later
/// than the one there (it lives `keep` ms). The caller has found the tick free.
macro_rules! claim_tick_fn {
    () => {
        "
local function claim_tick(key, value, ttl, last, tick, keep)
  -- After the job is stored: nothing here may fail (a `last` of another type, someone else's,
  -- is overwritten), or the job would run though its store was answered as failed.
  local before = 0
  if redis.call('TYPE', last).ok == 'string' then before = tonumber(redis.call('GET', last)) or 0 end
  redis.call('SET', key, value, 'PX', tonumber(ttl))
  if tonumber(tick) > before then
    redis.call('SET', last, tick, 'PX', tonumber(keep))
  end
end
"
    };
}

/// Claims tick KEYS[1] for ARGV[1] (`NODE/TASK_ID`) for ARGV[2] ms and stores its job: into
/// the stream KEYS[2], or, with a time ARGV[3] > 0 (Unix ms), parked in the delayed set KEYS[2]
/// (member ARGV[4], fields in the hash KEYS[3]). The tick ARGV[5] becomes the schedule's last
/// claimed one in KEYS[4] (for ARGV[6] ms). The job's fields are ARGV[7..]. Returns 1 when
/// this claim holds (also when it already did: a batch sent again by a new bridge stores
/// nothing twice), else the holder's value. A key of another type (someone else's) is an
/// error, and stores nothing.
const CLAIM_AND_STORE: &str = concat!(
    store_job_fn!(),
    claim_tick_fn!(),
    "
local held = redis.call('GET', KEYS[1])
if held then
  if held == ARGV[1] then return 1 end
  return held
end
local err = store_job(KEYS[2], KEYS[3], ARGV[3], ARGV[4], 7)
if err then return err end
claim_tick(KEYS[1], ARGV[1], ARGV[2], KEYS[4], ARGV[5], ARGV[6])
return 1"
);

/// [`CLAIM_AND_STORE`] for a job with a deduplication key: the tick is claimed, the key taken
/// and the job stored in one script, so that a claimed tick always has its outcome (a node
/// that dies after it leaves nothing half done). KEYS[1..4] and ARGV[1..6] as there; KEYS[5]
/// the key, ARGV[7] its held value, ARGV[8] how long it is held (ms); the fields ARGV[9..].
/// Returns two answers, the tick's and the key's: `{1, 1}` when stored (also when an earlier
/// try of the batch was), `{holder, 0}` when another node has the tick (nothing written), and
/// `{1, value}` when another job holds the key (`dedup::key_holder_fn`): the tick is claimed
/// as `NODE/TASK_ID dup` (its job a duplicate, not stored), so that a try sent again says so
/// too, with what the key says then (an empty value when no job holds it any more).
const CLAIM_KEY_AND_STORE: &str = concat!(
    store_job_fn!(),
    key_holder_fn!(),
    claim_tick_fn!(),
    "
local dup = ARGV[1] .. ' dup'
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return {1, 1} end
if held == dup then
  local holder = key_holder(KEYS[5], ARGV[7])
  if holder == 1 or not holder then holder = '' end
  return {1, holder}
end
if held then return {held, 0} end
local holder = key_holder(KEYS[5], ARGV[7])
if holder == 1 then
  claim_tick(KEYS[1], ARGV[1], ARGV[2], KEYS[4], ARGV[5], ARGV[6])
  return {1, 1}
end
if holder then
  claim_tick(KEYS[1], dup, ARGV[2], KEYS[4], ARGV[5], ARGV[6])
  return {1, holder}
end
local err = store_job(KEYS[2], KEYS[3], ARGV[3], ARGV[4], 9)
if err then return err end
redis.call('SET', KEYS[5], ARGV[7], 'PX', ARGV[8])
claim_tick(KEYS[1], ARGV[1], ARGV[2], KEYS[4], ARGV[5], ARGV[6])
return {1, 1}"
);

/// How long a schedule's last claimed tick is remembered ([`super::keys::Keys::last_tick`]):
/// a queue whose every node was down for longer runs no catch-up for it (`missed = "once"`).
const LAST_KEEP_MS: u64 = 30 * 24 * 3600 * 1000;

/// The claim's value for this node's job `task_id`.
fn holder(d: &Durable, task_id: u64) -> String {
    format!("{}/{task_id}", d.node)
}

/// The command that claims `claim` and stores its job (to `stream`, or parked until
/// `run_at_ms`), and with a deduplication `key` (in hex, and its `dedup_ttl_ms`) takes that
/// too, or stores nothing; the caller adds the job's fields (`JobEntry::add_fields`, and the
/// rest). Its answer is read by [`split`].
pub fn claim_and_store(
    d: &Durable,
    claim: &Claim,
    stream: &str,
    task_id: u64,
    run_at_ms: u64,
    key: Option<&(String, u64)>,
) -> Cmd {
    let member = d.keys.scheduled_member(&d.node, task_id);
    let (dest, hash) = if run_at_ms > 0 {
        (d.keys.delayed.clone(), d.keys.delayed_hash(&member))
    } else {
        // Not read by the script; named so that every key it may touch is declared.
        (stream.to_string(), d.keys.delayed_hash(&member))
    };
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(if key.is_some() { CLAIM_KEY_AND_STORE } else { CLAIM_AND_STORE })
        .arg(if key.is_some() { 5 } else { 4 })
        .arg(d.keys.tick(&claim.name, claim.tick_ms))
        .arg(dest)
        .arg(hash)
        .arg(d.keys.last_tick(&claim.name));
    if let Some((hex, _)) = key {
        cmd.arg(d.keys.dedup(hex));
    }
    cmd.arg(holder(d, task_id))
        .arg(claim.ttl_ms)
        .arg(run_at_ms)
        .arg(member)
        .arg(claim.tick_ms)
        .arg(LAST_KEEP_MS.max(claim.ttl_ms));
    if let Some((_, ttl)) = key {
        let delay = run_at_ms.saturating_sub(crate::app::unix_ms(std::time::SystemTime::now()));
        cmd.arg(dedup::held_value(&d.node, task_id)).arg(dedup::hold_ms(delay, *ttl));
    }
    cmd
}

/// The tick's answer and the key's of a [`claim_and_store`] with a key (`{tick, key}`). A
/// reply of another shape (none of taskd's) is a tick lost to nobody known, and no duplicate.
pub(super) fn split(reply: &Value) -> (Value, Value) {
    match reply {
        Value::Array(both) if both.len() == 2 => (both[0].clone(), both[1].clone()),
        other => (other.clone(), Value::Nil),
    }
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
    fn a_claim_with_a_key_answers_for_both_and_a_stranger_reply_wins_nothing() {
        let both = Value::Array(vec![Value::Int(1), Value::BulkString(b"h 0 web-9 99".to_vec())]);
        assert_eq!(split(&both), (Value::Int(1), Value::BulkString(b"h 0 web-9 99".to_vec())));
        let (tick, key) = split(&Value::Int(1));
        assert_eq!((tick, key), (Value::Int(1), Value::Nil));
        let odd = Value::Array(vec![Value::Int(1)]);
        assert_eq!(split(&odd).1, Value::Nil);
    }

    #[test]
    fn the_holder_of_a_claim_is_read_with_care() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(holder_node(bulk("web-2/17")), "web-2");
        assert_eq!(holder_node(bulk("web-2")), "web-2");
        assert_eq!(holder_node(bulk("web-2/17 dup")), "web-2", "a tick whose job was a duplicate");
        assert_eq!(holder_node(bulk("\u{1b}[31mevil/1")), "?");
        assert_eq!(holder_node(bulk(&"x".repeat(500))), "?");
        assert_eq!(holder_node(Value::Nil), "?");
    }
}
