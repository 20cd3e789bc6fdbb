//! Taking back a durable job that has not started (`{"type":"cancel","task_id":N}`, `taskd
//! cancel N`), for the bridge of the node that accepted it.
//!
//! A job not started is in one of two places: parked in the delayed set (for its `run_at`,
//! member `NODE:ID`, or for a delivery retry, member `ID`, whose hash names its node), or in
//! its job stream past the group's last-delivered id (no consumer has read it). One script
//! ([`CANCEL`]) looks in both and removes it, atomic against the consumers that move due jobs
//! and read the stream; it also ends the job's deduplication key, if it has one, as any end
//! does. A stream is looked through [`SCAN`] entries per call: a long queue takes several calls,
//! each atomic, each starting past the last-delivered id as it is then.

use redis::ConnectionLike;

use super::dedup::end_key_fn;
use super::keys::GROUP;
use super::Durable;

/// Stream entries one call looks at.
const SCAN: usize = 500;
/// Calls at most: past that many queued entries the job is not looked for further.
const CALLS: usize = 200;

/// KEYS[1] the delayed set, KEYS[2] the hash of `NODE:ID`, KEYS[3] the hash of `ID`, KEYS[4]
/// the job's stream, KEYS[5] the mark of a cancelled job (a minute: `Keys::cancelled_of`).
/// ARGV[1] `NODE:ID`, ARGV[2] ID, ARGV[3] NODE, ARGV[4] where the previous call stopped (''
/// for the first), ARGV[5] entries to look at, ARGV[6] the group, ARGV[7] the prefix of
/// deduplication keys, ARGV[8] the job's `cancelled` line. Returns {1, where} cancelled (now,
/// or by an earlier ask), {0, ''} not there, {2, id} not among these (go on from id).
const CANCEL: &str = concat!(
    end_key_fn!(),
    r"
local function fields(list)
  local f = {}
  for i = 1, #list, 2 do f[list[i]] = list[i + 1] end
  return f
end
local function ours(f)
  return f['o'] == ARGV[3] and f['t'] == ARGV[2]
end
local function release(f)
  local k = f['k']
  if k and #k <= 400 and string.match(k, '^%x+$') then
    end_key(ARGV[7] .. k, 'h 0 ' .. ARGV[3] .. ' ' .. ARGV[2], 0, ARGV[3] .. ' ' .. ARGV[2], ARGV[8])
  end
end
local function after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return false end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local function done(where)
  redis.call('SET', KEYS[5], where, 'PX', 60000)
  return {1, where}
end
if ARGV[4] == '' and redis.call('TYPE', KEYS[5]).ok == 'string' then
  return {1, redis.call('GET', KEYS[5])}
end
if ARGV[4] == '' and redis.call('TYPE', KEYS[1]).ok == 'zset' then
  for _, m in ipairs({{ARGV[1], KEYS[2], 'scheduled'}, {ARGV[2], KEYS[3], 'waiting for a retry'}}) do
    if redis.call('ZSCORE', KEYS[1], m[1]) and redis.call('TYPE', m[2]).ok == 'hash' then
      local f = fields(redis.call('HGETALL', m[2]))
      if ours(f) then
        redis.call('ZREM', KEYS[1], m[1])
        redis.call('DEL', m[2])
        release(f)
        return done(m[3])
      end
    end
  end
end
if redis.call('TYPE', KEYS[4]).ok ~= 'stream' then return {0, ''} end
local from = '0-0'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[4])) do
  local f = fields(g)
  if f['name'] == ARGV[6] then from = f['last-delivered-id'] end
end
if ARGV[4] ~= '' and after(ARGV[4], from) then from = ARGV[4] end
local got = redis.call('XRANGE', KEYS[4], '(' .. from, '+', 'COUNT', tonumber(ARGV[5]))
for _, e in ipairs(got) do
  local f = fields(e[2])
  if ours(f) then
    redis.call('XDEL', KEYS[4], e[1])
    release(f)
    return done('queued')
  end
end
if #got < tonumber(ARGV[5]) then return {0, ''} end
return {2, got[#got][1]}"
);

/// A cancel under way: where its look through the job's stream stopped. A look at a long
/// queue takes many calls: the bridge makes a few per turn ([`Cancel::go_on`]), between its
/// rounds of jobs, so that one client's cancels do not hold every other client's jobs back.
pub struct Cancel {
    pub task_id: u64,
    stream: String,
    from: String,
    calls: usize,
}

impl Cancel {
    pub fn new(task_id: u64, stream: &[u8]) -> Cancel {
        Cancel {
            task_id,
            stream: String::from_utf8_lossy(stream).into_owned(),
            from: String::new(),
            calls: 0,
        }
    }

    /// Goes on cancelling job `task_id` of this node if it has not started, for at most
    /// `budget` calls (at least one). Ok(None): not done yet; Ok(Some(Ok(where it waited))), or
    /// Ok(Some(Err(why not))); Err if Redis could not be asked.
    pub fn go_on(
        &mut self,
        conn: &mut impl ConnectionLike,
        d: &Durable,
        budget: usize,
    ) -> redis::RedisResult<Option<Result<String, String>>> {
        let task_id = self.task_id;
        let member = d.keys.scheduled_member(&d.node, task_id);
        // What the job's duplicates get, as its own client does (`master::schedule`).
        let mut line = serde_json::json!({"event": "cancelled", "task_id": task_id}).to_string().into_bytes();
        line.push(b'\n');
        for _ in 0..budget.max(1) {
            if self.calls == CALLS {
                return Ok(Some(Err(format!(
                    "job {task_id} was not found among the first {} jobs queued in Redis: not cancelled",
                    SCAN * CALLS
                ))));
            }
            self.calls += 1;
            let (code, at): (u8, String) = redis::cmd("EVAL")
                .arg(CANCEL)
                .arg(5)
                .arg(&d.keys.delayed)
                .arg(d.keys.delayed_hash(&member))
                .arg(d.keys.delayed_job(task_id))
                .arg(&self.stream)
                .arg(d.keys.cancelled_of(&d.node, task_id))
                .arg(&member)
                .arg(task_id)
                .arg(&d.node)
                .arg(&self.from)
                .arg(SCAN)
                .arg(GROUP)
                .arg(d.keys.dedup_prefix())
                .arg(&line)
                .query(conn)?;
            match code {
                1 => {
                    tracing::info!("job {task_id} cancelled in Redis ({at})");
                    return Ok(Some(Ok(at)));
                }
                2 => self.from = at,
                _ => {
                    return Ok(Some(Err(format!(
                        "job {task_id} has started: a task process took it from Redis (a job cannot be \
                         cancelled once started)"
                    ))))
                }
            }
        }
        Ok(None)
    }
}
