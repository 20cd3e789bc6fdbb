//! Deduplication keys of durable jobs (a job's `key`), shared by every node of a queue.
//!
//! A key is the string `{q}:key:HEX` (the client's key in hex: no client text reaches a key
//! name). The bridge of the node that stores a job takes it in the same script that stores the
//! job ([`CLAIM`]): a key is never held for a job that was not stored, nor a job stored without
//! its key. While the job waits or runs, the key's value names it, `h 0 NODE ID`; whoever ends
//! the job (the consumer that writes its outcome or dead letter, in the same MULTI, or the
//! bridge that cancels it) makes it `e FREE_AT NODE ID\n<final line>` ([`END`]), held until
//! `FREE_AT` (its end plus `dedup_ttl_ms`) and readable [`GRACE_MS`] longer, so that a
//! duplicate waiting on another node reads the first's final line even with a `dedup_ttl_ms`
//! of 0. Such a duplicate's bridge reads its key every [`WATCH_EVERY`] ([`Watches`]).
//!
//! Anyone who can write to Redis can write these values: what is read is parsed and bounded
//! ([`parse`]), and a value that is not taskd's is taken over by the next job with the key.

use std::time::{Duration, Instant};

use redis::{Cmd, ConnectionLike, Value};

use super::entry::valid_node;
use super::keys::Keys;
use super::store_job::store_job_fn;
use super::Durable;

/// Longest client key of a durable job, in bytes (its hex form is twice that).
pub const KEY_MAX: usize = 200;
/// Longest final line a key keeps; a longer one is kept as a short line that says so.
pub const LINE_MAX: usize = 64 * 1024;
/// How long an ended key stays readable past the time it is free again.
pub const GRACE_MS: u64 = 60_000;
/// A held key expires this long past its job's time plus `dedup_ttl_ms`: a job lost from Redis
/// (deleted by hand, or Redis lost its data) does not hold its key for ever. A job that waits
/// longer than this for a task process frees its key early.
pub const HOLD_MARGIN_MS: u64 = 24 * 3600 * 1000;
/// Longest `dedup_ttl_ms` a durable key keeps (ten years): a job's field `kt` may be forged,
/// and Redis's expiry times must not overflow.
pub const TTL_MAX_MS: u64 = 3650 * 24 * 3600 * 1000;
/// How often a bridge reads the keys its duplicates wait on.
pub const WATCH_EVERY: Duration = Duration::from_millis(200);
/// Keys read per look at most (the rest wait for the next look, in turn).
const WATCH_BATCH: usize = 512;

/// The client's key in hex: the part of its Redis key name that is the client's.
pub fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` is a key in hex as [`hex`] writes it (from a job's field `k`, which anyone who
/// can write to Redis can forge: it becomes part of a key name).
pub fn valid_hex(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 2 * KEY_MAX
        && s.len() % 2 == 0
        && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A key's value while job `task_id` of `origin` holds it.
pub fn held_value(origin: &str, task_id: u64) -> String {
    format!("h 0 {origin} {task_id}")
}

/// What a key's value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Held { origin: String, task_id: u64 },
    Ended { origin: String, task_id: u64, line: Vec<u8> },
}

impl State {
    fn job(&self) -> (&str, u64) {
        match self {
            State::Held { origin, task_id } | State::Ended { origin, task_id, .. } => (origin, *task_id),
        }
    }
}

/// A key's value, checked: a node name, a task id, and for an ended job one JSON object on one
/// line of at most [`LINE_MAX`] bytes (it goes to a client as it is). None for anything else.
pub fn parse(value: &[u8]) -> Option<State> {
    if value.len() > LINE_MAX + 200 {
        return None;
    }
    let (head, line) = match value.iter().position(|&b| b == b'\n') {
        Some(i) => (&value[..i], Some(&value[i + 1..])),
        None => (value, None),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut parts = head.split(' ');
    let (kind, _free_at, origin, task_id) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !valid_node(origin) {
        return None;
    }
    let task_id: u64 = task_id.parse().ok().filter(|&t| t != 0)?;
    let origin = origin.to_string();
    match (kind, line) {
        ("h", None) => Some(State::Held { origin, task_id }),
        ("e", Some(line)) => {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            let one_object = !body.contains(&b'\n')
                && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body).is_ok();
            one_object.then(|| {
                let mut line = body.to_vec();
                line.push(b'\n');
                State::Ended { origin, task_id, line }
            })
        }
        _ => None,
    }
}

/// The final line a key keeps for job `task_id`: `line`, or when it is over [`LINE_MAX`], a
/// short one with its event that says where the whole one is.
pub fn kept_line(task_id: u64, ok: bool, line: &[u8]) -> Vec<u8> {
    if line.len() <= LINE_MAX {
        return line.to_vec();
    }
    let mut short = serde_json::json!({
        "event": if ok { "done" } else { "failed" },
        "task_id": task_id,
        "note": format!(
            "its final line is {} bytes, over the {LINE_MAX} a deduplication key keeps: \
             {{\"type\":\"result\",\"task_id\":{task_id}}} on the node that accepted it has it",
            line.len()
        ),
    })
    .to_string()
    .into_bytes();
    short.push(b'\n');
    short
}

/// How long a key is held when its job is stored: until its time (`delay_ms` ahead), plus
/// `dedup_ttl_ms` and [`HOLD_MARGIN_MS`].
pub fn hold_ms(delay_ms: u64, dedup_ttl_ms: u64) -> u64 {
    delay_ms.min(TTL_MAX_MS) + dedup_ttl_ms.min(TTL_MAX_MS) + HOLD_MARGIN_MS
}

/// Lua: `end_key(key, held, ttl, who, line)` makes the key `key`, if job `who` (`NODE ID`)
/// still holds it (its value is `held`), the record of its end: free `ttl` ms from now, its
/// final line `line` readable [`GRACE_MS`] longer. Never an error: it runs inside the
/// consumer's MULTI, where an error would not stop the rest.
macro_rules! end_key_fn {
    () => {
        "
local function end_key(key, held, ttl, who, line)
  if redis.call('TYPE', key).ok ~= 'string' or redis.call('GET', key) ~= held then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  ttl = math.min(315360000000, math.max(0, math.floor(tonumber(ttl) or 0)))
  redis.call('SET', key, 'e ' .. string.format('%d', now + ttl) .. ' ' .. who .. '\\n' .. line,
    'PX', string.format('%d', ttl + 60000))
  return 1
end
"
    };
}
pub(super) use end_key_fn;

/// Ends a job's key (see [`end_key_fn`]): KEYS[1] the key, ARGV[1] its held value, ARGV[2] the
/// ttl in ms, ARGV[3] `NODE ID`, ARGV[4] the final line.
const END: &str = concat!(end_key_fn!(), "return end_key(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])");

/// The command that ends the key `hex` of job `task_id` of `origin` with `line` (see [`END`]).
pub fn end_cmd(keys: &Keys, hex: &str, ttl_ms: u64, origin: &str, task_id: u64, line: &[u8]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(END)
        .arg(1)
        .arg(keys.dedup(hex))
        .arg(held_value(origin, task_id))
        .arg(ttl_ms.min(TTL_MAX_MS))
        .arg(format!("{origin} {task_id}"))
        .arg(line);
    cmd
}

/// Lua: `key_holder(key, held)` says who holds the key `key` against a job whose value would
/// be `held`: 1 when that job does (an earlier try of its batch stored it, as a new bridge
/// sends unacknowledged batches again: held, or already ended), the key's value when another
/// job does (held, or ended and not free yet), nil when it is free. Only a value as taskd
/// writes it holds the key, with an expiry as taskd sets it (so a key is never held for ever:
/// at most [`hold_ms`] while its job waits or runs); anything else is taken over (one of
/// another type is deleted here: an error would fail the job).
macro_rules! key_holder_fn {
    () => {
        "
local function key_holder(key, held)
  local kind = redis.call('TYPE', key).ok
  if kind == 'string' then
    local v = redis.call('GET', key)
    if v == held or string.match(v, '^e %d+ (.-)\\n') == string.sub(held, 5) then return 1 end
    -- As `parse` reads it: a node of 64 bytes at most, a task id of a u64, one JSON object
    -- (a value it cannot read would hold the key with no one able to say by whom).
    local function job(node, id)
      return node and #node <= 64 and (#id < 20 or (#id == 20 and id <= '18446744073709551615'))
    end
    local h = job(string.match(v, '^h 0 ([%w%._%-]+) ([1-9]%d*)$'))
    local free, node, id, line = string.match(v, '^e (%d+) ([%w%._%-]+) ([1-9]%d*)\\n({[^\\n]*})\\n?$')
    if not (job(node, id) and pcall(cjson.decode, line)) then free = nil end
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    -- taskd writes every value of a key with an expiry: one without (written, or made
    -- persistent, by someone else) would hold the key for ever, and is taken over. PEXPIRE NX
    -- sets one only on a key that has none, and says so (PEXPIRE is in the least rights of
    -- an ACL user, PTTL is not); the caller then overwrites the key, or it lapses.
    if (h or (free and tonumber(free) > now)) and redis.call('PEXPIRE', key, 1, 'NX') == 0 then
      return v
    end
  elseif kind ~= 'none' then
    redis.call('DEL', key)
  end
  return nil
end
"
    };
}
pub(super) use key_holder_fn;

/// Takes a key and stores its job, or neither. KEYS[1] the key, KEYS[2] the job stream (or,
/// for a job for later, the delayed set), KEYS[3] the hash of a job for later (else KEYS[1]).
/// ARGV[1] the key's held value, ARGV[2] how long it is held (ms), ARGV[3] the job's time
/// (Unix ms; 0: now), ARGV[4] its member in the delayed set, ARGV[5..] its fields. Returns 1
/// when stored (also when an earlier try of the same batch stored it, see [`key_holder_fn`]),
/// else the value of the key, which another job holds.
const CLAIM: &str = concat!(
    key_holder_fn!(),
    store_job_fn!(),
    "
local holder = key_holder(KEYS[1], ARGV[1])
if holder then return holder end
local err = store_job(KEYS[2], KEYS[3], ARGV[3], ARGV[4], 5)
if err then return err end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1"
);

/// The command that stores job `task_id` of this node (its fields are added after) only if it
/// takes its key `hex` (see [`CLAIM`]): into `stream`, or parked until `run_at_ms`.
pub fn claim_cmd(d: &Durable, stream: &str, task_id: u64, run_at_ms: u64, hex: &str, ttl_ms: u64) -> Cmd {
    let delay = run_at_ms.saturating_sub(crate::app::unix_ms(std::time::SystemTime::now()));
    let member = d.keys.scheduled_member(&d.node, task_id);
    let key = d.keys.dedup(hex);
    let (target, hash) = if run_at_ms > 0 {
        (d.keys.delayed.clone(), d.keys.delayed_hash(&member))
    } else {
        (stream.to_string(), key.clone())
    };
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(CLAIM)
        .arg(3)
        .arg(key)
        .arg(target)
        .arg(hash)
        .arg(held_value(&d.node, task_id))
        .arg(hold_ms(delay, ttl_ms))
        .arg(run_at_ms)
        .arg(member);
    cmd
}

/// What the store of a job with a key found: stored, or the value of the key another job holds.
pub enum Claimed {
    Stored,
    /// Held by another job: `first` is it (0 if the value is not one taskd reads), `line` its
    /// final line if it has ended.
    Duplicate {
        first: u64,
        holder: Vec<u8>,
        line: Vec<u8>,
    },
}

/// Reads [`CLAIM`]'s answer (or the key's half of `ticks`' claim of a tick with a key): a
/// string is the value of the key another job holds; anything else is no duplicate (stored, or
/// not stored because its tick is another node's).
pub fn claimed(answer: &Value) -> Claimed {
    let holder = match answer {
        Value::BulkString(v) => v.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        _ => return Claimed::Stored,
    };
    match parse(&holder) {
        Some(State::Held { task_id, .. }) => Claimed::Duplicate { first: task_id, holder, line: Vec::new() },
        Some(State::Ended { task_id, line, .. }) => Claimed::Duplicate { first: task_id, holder, line },
        None => Claimed::Duplicate { first: 0, holder, line: Vec::new() },
    }
}

/// A duplicate waiting for its first job's final line.
struct Watch {
    task_id: u64,
    key: String,
    /// The first job, as the key named it when the duplicate was found.
    first: (String, u64),
}

/// The keys a bridge reads for its waiting duplicates. Their number is bounded by what the
/// master holds for clients (each is a client's job).
#[derive(Default)]
pub struct Watches {
    list: Vec<Watch>,
    next: usize,
    due: Option<Instant>,
}

impl Watches {
    /// Watches key `hex` for duplicate `task_id`, whose first holds it as `holder`; false if
    /// `holder` does not name a job (nothing to wait for).
    pub fn add(&mut self, keys: &Keys, task_id: u64, hex: &str, holder: &[u8]) -> bool {
        let Some(State::Held { origin, task_id: first }) = parse(holder) else { return false };
        if !valid_hex(hex) || self.list.iter().any(|w| w.task_id == task_id) {
            return false;
        }
        self.list.push(Watch { task_id, key: keys.dedup(hex), first: (origin, first) });
        self.due.get_or_insert_with(|| Instant::now() + WATCH_EVERY);
        true
    }

    /// Stops watching for duplicate `task_id` (its client is gone).
    pub fn remove(&mut self, task_id: u64) {
        self.list.retain(|w| w.task_id != task_id);
        if self.list.is_empty() {
            self.due = None;
        }
    }

    /// How long until the next look (None: nothing to watch).
    pub fn wait(&self) -> Option<Duration> {
        self.due.map(|due| due.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))
    }

    /// The next look in [`WATCH_EVERY`]: Redis cannot be read now.
    pub fn postpone(&mut self) {
        if self.due.is_some() {
            self.due = Some(Instant::now() + WATCH_EVERY);
        }
    }

    /// Reads the keys due (at most [`WATCH_BATCH`], in turn) and returns the duplicates whose
    /// first ended, each with the first's final line, or an empty line when that can no longer
    /// be known (the key expired, or another job took it, before it was read).
    pub fn look(&mut self, conn: &mut impl ConnectionLike) -> redis::RedisResult<Vec<(u64, Vec<u8>)>> {
        if self.due.is_none_or(|due| Instant::now() < due) || self.list.is_empty() {
            return Ok(Vec::new());
        }
        let n = self.list.len().min(WATCH_BATCH);
        let start = self.next % self.list.len();
        let picked: Vec<usize> = (0..n).map(|i| (start + i) % self.list.len()).collect();
        let mut pipe = redis::pipe();
        for &i in &picked {
            pipe.cmd("GET").arg(&self.list[i].key);
        }
        let values: Vec<Option<Vec<u8>>> = pipe.query(conn)?;
        let mut ended = Vec::new();
        let mut gone = Vec::new();
        for (&i, value) in picked.iter().zip(values) {
            let w = &self.list[i];
            let state = value.as_deref().and_then(parse);
            let line = match state {
                Some(State::Held { .. })
                    if state.as_ref().map(State::job) == Some((&w.first.0, w.first.1)) =>
                {
                    continue
                }
                Some(State::Ended { ref origin, task_id, ref line })
                    if (origin.as_str(), task_id) == (w.first.0.as_str(), w.first.1) =>
                {
                    line.clone()
                }
                _ => Vec::new(),
            };
            ended.push((w.task_id, line));
            gone.push(i);
        }
        gone.sort_unstable();
        for i in gone.into_iter().rev() {
            self.list.swap_remove(i);
        }
        self.next = start + n;
        self.due = (!self.list.is_empty()).then(|| Instant::now() + WATCH_EVERY);
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_key_becomes_hex_and_nothing_else() {
        assert_eq!(hex(b"order-42:{x}\n"), "6f726465722d34323a7b787d0a");
        assert!(valid_hex(&hex(b"order-42")));
        assert!(!valid_hex("ab}c"));
        assert!(!valid_hex("ABCD"));
        assert!(!valid_hex("abc"));
        assert!(!valid_hex(&"ab".repeat(KEY_MAX + 1)));
        assert!(!valid_hex(""));
    }

    #[test]
    fn a_value_from_redis_is_read_only_as_taskd_writes_it() {
        assert_eq!(
            parse(held_value("web-1", 7).as_bytes()),
            Some(State::Held { origin: "web-1".into(), task_id: 7 })
        );
        let ended = b"e 1798099200000 web-2 9\n{\"event\":\"done\",\"task_id\":9}\n";
        assert_eq!(
            parse(ended),
            Some(State::Ended {
                origin: "web-2".into(),
                task_id: 9,
                line: b"{\"event\":\"done\",\"task_id\":9}\n".to_vec()
            })
        );
        for bad in [
            &b"h 0 web-1 0"[..],
            b"h 0 web\nx 7",
            b"h 0 a b 7",
            b"x 0 web-1 7",
            b"e 1 web-1 7\n{\"event\":\"done\"}\n{\"event\":\"forged\"}\n",
            b"e 1 web-1 7\nnot json\n",
            b"h 0 web-1 7\n{}",
            b"",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let mut long = b"e 1 web-1 7\n{\"r\":\"".to_vec();
        long.extend(std::iter::repeat_n(b'a', LINE_MAX + 300));
        long.extend_from_slice(b"\"}\n");
        assert_eq!(parse(&long), None);
    }

    #[test]
    fn an_outsized_final_line_is_kept_short() {
        let line = vec![b'x'; LINE_MAX + 1];
        let kept = kept_line(5, false, &line);
        assert!(kept.len() < 400);
        let v: serde_json::Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!((v["event"].as_str(), v["task_id"].as_u64()), (Some("failed"), Some(5)));
        assert_eq!(kept_line(5, true, b"{}\n"), b"{}\n");
    }

    #[test]
    fn only_a_key_held_by_a_job_is_watched_and_a_failed_look_waits_its_turn() {
        let keys = Keys::new("q", "web-2");
        let mut w = Watches::default();
        assert_eq!(w.wait(), None);
        assert!(!w.add(&keys, 5, "6b", b"e 1 web-1 7\n{}\n"), "an ended first: nothing to wait for");
        assert!(!w.add(&keys, 5, "zz", held_value("web-1", 7).as_bytes()), "not a key in hex");
        assert!(w.add(&keys, 5, "6b", held_value("web-1", 7).as_bytes()));
        assert!(!w.add(&keys, 5, "6b", held_value("web-1", 7).as_bytes()), "once per duplicate");
        assert!(w.wait().is_some_and(|d| d <= WATCH_EVERY));
        w.postpone();
        assert!(w.wait().is_some_and(|d| d > WATCH_EVERY / 2));
        w.remove(5);
        assert_eq!(w.wait(), None, "nothing left to watch");
    }

    #[test]
    fn a_key_is_held_past_its_jobs_time() {
        assert_eq!(hold_ms(0, 0), HOLD_MARGIN_MS);
        assert_eq!(hold_ms(3000, 1000), 4000 + HOLD_MARGIN_MS);
        assert_eq!(hold_ms(u64::MAX, u64::MAX), 2 * TTL_MAX_MS + HOLD_MARGIN_MS);
    }
}
