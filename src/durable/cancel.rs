//! Taking back a durable job that has not started (`{"type":"cancel","task_id":N}`, `taskd
//! cancel N`), for the bridge of the node that accepted it.
//!
//! A job not started is in one of three places: parked in the delayed set (for its `run_at`,
//! member `NODE:ID`, or for a delivery retry, member `ID`, whose hash names its node), in its
//! job stream past the group's last-delivered id (no consumer has read it), or, a job of the
//! main normal stream, inside a pack (`super::pack`) past the pack stream's last-delivered id.
//! One script ([`CANCEL`]) looks in all of them and removes it, atomic against the consumers
//! that move due jobs and read the streams; it also ends the job's deduplication key, if it has
//! one, as any end does. A pack that holds the job is deleted and its other jobs are put back
//! in the main stream as plain entries (a pack cannot lose one job and keep the others). A
//! stream is looked through [`SCAN`] entries (jobs, in packs) per call, and the call that
//! reaches the end of the main stream goes on into the packs: a long queue takes several
//! calls, each atomic, each starting past the last-delivered id as it is then.

use std::sync::LazyLock;

use redis::ConnectionLike;

use super::dedup::end_key_fn;
use super::keys::GROUP;
use super::pack;
use super::Durable;

/// Stream entries (or jobs in packs) one call looks at.
const SCAN: usize = 500;
/// Calls at most: past that many queued entries the job is not looked for further.
const CALLS: usize = 200;

/// KEYS[1] the delayed set, KEYS[2] the hash of `NODE:ID`, KEYS[3] the hash of `ID`, KEYS[4]
/// the job's stream, KEYS[5] the mark of a cancelled job (a minute: `Keys::cancelled_of`),
/// KEYS[6] the pack stream. ARGV[1] `NODE:ID`, ARGV[2] ID, ARGV[3] NODE, ARGV[4] where the
/// previous call stopped ('' for the first), ARGV[5] entries to look at, ARGV[6] the group,
/// ARGV[7] the prefix of deduplication keys, ARGV[8] the job's `cancelled` line, ARGV[9] where
/// to look: `s` the job's stream, `sp` the job's stream then the packs (KEYS[4] is then the
/// main normal stream, where a pack's other jobs go back), `p` the packs from ARGV[4] on.
/// Returns {1, where, damaged} cancelled (now, or by an earlier ask; `damaged`: the id of the
/// pack it was in if that pack was damaged past it, else ''), {0, '', ''} not there, {2, id,
/// ''} not among these (go on in the stream from id), {3, id, ''} not among these packs (go
/// on in the packs from id).
///
/// A pack is looked into only if the job's task id, as its field `t` is written in a pack
/// (`1:t`, its length, `:`, the id), is in it: a search of the bytes, where parsing every pack
/// in Lua would hold Redis for long. A hit is then read as a pack, and a job of it is the one
/// when its first `o` and first `t` are this node's and this id (as `pack_dissolve` leaves it
/// out, and as `JobEntry` reads a job).
static CANCEL: LazyLock<String> = LazyLock::new(|| {
    [
        end_key_fn!(),
        pack::LUA_JOBS,
        pack::LUA_DISSOLVE,
        r"
local PAGE, MAX_JOBS = 4, 1024
local function fields(list)
  local f = {}
  for i = 1, #list, 2 do f[list[i]] = list[i + 1] end
  return f
end
local function ours(f)
  return f['o'] == ARGV[3] and f['t'] == ARGV[2]
end
local function first(job, name)
  for k = 1, #job, 2 do
    if job[k] == name then return job[k + 1] end
  end
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
local function delivered(key)
  local last = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local f = fields(g)
    if f['name'] == ARGV[6] then last = f['last-delivered-id'] end
  end
  return last
end
local function done(where, damaged)
  redis.call('SET', KEYS[5], where, 'PX', 60000)
  return {1, where, damaged}
end
local function in_packs(start)
  if redis.call('TYPE', KEYS[6]).ok ~= 'stream' then return {0, '', ''} end
  local from = delivered(KEYS[6])
  if start ~= '' and after(start, from) then from = start end
  local needle = '1:t' .. #ARGV[2] .. ':' .. ARGV[2]
  local budget, looked = tonumber(ARGV[5]), 0
  while looked < budget do
    local got = redis.call('XRANGE', KEYS[6], '(' .. from, '+', 'COUNT', PAGE)
    for _, e in ipairs(got) do
      from = e[1]
      local f = fields(e[2])
      local blob = f['p']
      if blob and string.find(blob, needle, 1, true) then
        local jobs, damaged = pack_jobs(blob)
        for _, job in ipairs(jobs) do
          if first(job, 'o') == ARGV[3] and first(job, 't') == ARGV[2] then
            if redis.call('XDEL', KEYS[6], e[1]) == 1 then
              pack_dissolve(blob, KEYS[4], 1, 0, ARGV[3], ARGV[2])
              release(fields(job))
              return done('queued', damaged and e[1] or '')
            end
          end
        end
      end
      -- Its count says how many jobs the look went through (anyone may have written it).
      looked = looked + math.max(1, math.min(tonumber(f['n']) or 1, MAX_JOBS))
    end
    if #got < PAGE then return {0, '', ''} end
  end
  return {3, from, ''}
end
local look = ARGV[9]
if look == 'p' then return in_packs(ARGV[4]) end
if ARGV[4] == '' and redis.call('TYPE', KEYS[5]).ok == 'string' then
  return {1, redis.call('GET', KEYS[5]), ''}
end
if ARGV[4] == '' and redis.call('TYPE', KEYS[1]).ok == 'zset' then
  for _, m in ipairs({{ARGV[1], KEYS[2], 'scheduled'}, {ARGV[2], KEYS[3], 'waiting for a retry'}}) do
    if redis.call('ZSCORE', KEYS[1], m[1]) and redis.call('TYPE', m[2]).ok == 'hash' then
      local f = fields(redis.call('HGETALL', m[2]))
      if ours(f) then
        redis.call('ZREM', KEYS[1], m[1])
        redis.call('DEL', m[2])
        release(f)
        return done(m[3], '')
      end
    end
  end
end
local function not_in_stream()
  if look == 'sp' then return in_packs('') end
  return {0, '', ''}
end
if redis.call('TYPE', KEYS[4]).ok ~= 'stream' then return not_in_stream() end
local from = delivered(KEYS[4])
if ARGV[4] ~= '' and after(ARGV[4], from) then from = ARGV[4] end
local got = redis.call('XRANGE', KEYS[4], '(' .. from, '+', 'COUNT', tonumber(ARGV[5]))
for _, e in ipairs(got) do
  local f = fields(e[2])
  if ours(f) then
    redis.call('XDEL', KEYS[4], e[1])
    release(f)
    return done('queued', '')
  end
end
if #got < tonumber(ARGV[5]) then return not_in_stream() end
return {2, got[#got][1], ''}",
    ]
    .concat()
});

/// A cancel under way: where its look through the job's stream (or the packs) stopped. A look
/// at a long queue takes many calls: the bridge makes a few per turn ([`Cancel::go_on`]),
/// between its rounds of jobs, so that one client's cancels do not hold every other client's
/// jobs back.
pub struct Cancel {
    pub task_id: u64,
    stream: String,
    from: String,
    /// The look went past the job's stream into the packs (`from` is a pack's id).
    in_packs: bool,
    calls: usize,
}

impl Cancel {
    pub fn new(task_id: u64, stream: &[u8]) -> Cancel {
        Cancel {
            task_id,
            stream: String::from_utf8_lossy(stream).into_owned(),
            from: String::new(),
            in_packs: false,
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
            // Only the main normal stream's jobs are packed: a lane's or a priority's job is
            // looked for in its stream alone.
            let look = match (self.in_packs, self.stream == d.keys.jobs) {
                (true, _) => "p",
                (false, true) => "sp",
                (false, false) => "s",
            };
            let (code, at, damaged): (u8, String, String) = redis::cmd("EVAL")
                .arg(CANCEL.as_str())
                .arg(6)
                .arg(&d.keys.delayed)
                .arg(d.keys.delayed_hash(&member))
                .arg(d.keys.delayed_job(task_id))
                .arg(&self.stream)
                .arg(d.keys.cancelled_of(&d.node, task_id))
                .arg(d.keys.packs())
                .arg(&member)
                .arg(task_id)
                .arg(&d.node)
                .arg(&self.from)
                .arg(SCAN)
                .arg(GROUP)
                .arg(d.keys.dedup_prefix())
                .arg(&line)
                .arg(look)
                .query(conn)?;
            match code {
                1 => {
                    tracing::info!("job {task_id} cancelled in Redis ({at})");
                    if !damaged.is_empty() {
                        // The consumer that would have read it says the same, once: it is
                        // deleted now, so this is the one word on it.
                        tracing::warn!(
                            "pack {damaged} of {}, which held job {task_id}, is damaged past that job: \
                             its other jobs before the damage are back in {} as plain entries, what \
                             follows the damage is no job and is dropped",
                            d.keys.packs(),
                            d.keys.jobs
                        );
                    }
                    return Ok(Some(Ok(at)));
                }
                2 => self.from = at,
                3 => {
                    self.in_packs = true;
                    self.from = at;
                }
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
