//! The weighted fair order of the priorities for a consumer of durable jobs: the streams of
//! each priority (`{q}:jobs#high`, `{q}:jobs`, `{q}:jobs#low`, and the same for each lane) are
//! taken from in the order the master's task queues use in memory (6:3:1, nginx's smooth
//! weighted round robin, [`Priority::WEIGHTS`]), so that low jobs still run under a flood
//! of high ones.
//!
//! One script takes a window of jobs in that order (one XREADGROUP per pick, in Redis, without
//! a round trip each); a priority with nothing waiting is found empty once per take, costs no
//! round trip, and gives its share to the others. Only when every priority is empty does the
//! consumer block, in one XREADGROUP over every stream, as it did with one stream.

use redis::{Connection, Value};

use super::keys::GROUP;
use super::redis_io::{self, as_array, as_int, StreamEntry};
use super::Durable;
use crate::app::Priority;

/// Takes up to ARGV[3] jobs for consumer ARGV[2] of group ARGV[1], in weighted fair order:
/// the credits ARGV[4..6] and weights ARGV[7..9] of high, normal, low; each priority has
/// ARGV[10] streams, KEYS in that order. Each pick adds every priority still thought waiting
/// its weight, takes the largest credit (the higher priority among equals), and takes the sum
/// back from it; a priority found empty is left out of this take and forgets its credit. With
/// one priority left, the rest of the window comes in one read. Returns the credits, then the
/// XREADGROUP replies that brought something.
const TAKE_FAIR: &str = r"
local group, me, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local credit = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local weight = {tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
local k = tonumber(ARGV[10])
local waiting = {true, true, true}
local out = {}
local taken = 0
while taken < want do
  local live, total, best = 0, 0, nil
  for p = 1, 3 do
    if waiting[p] then
      live = live + 1
      total = total + weight[p]
      if best == nil or credit[p] + weight[p] > credit[best] + weight[best] then best = p end
    end
  end
  if live == 0 then break end
  local count = 1
  if live == 1 then count = want - taken end
  local args = {'XREADGROUP', 'GROUP', group, me, 'COUNT', count, 'STREAMS'}
  for i = 1, k do args[#args + 1] = KEYS[(best - 1) * k + i] end
  for i = 1, k do args[#args + 1] = '>' end
  local reply = redis.call(unpack(args))
  local got = 0
  if reply then
    for _, s in ipairs(reply) do got = got + #s[2] end
  end
  if got == 0 then
    waiting[best] = false
    credit[best] = 0
  else
    for p = 1, 3 do
      if waiting[p] then credit[p] = credit[p] + weight[p] end
    end
    credit[best] = credit[best] - total
    taken = taken + got
    out[#out + 1] = reply
  end
end
local result = {credit[1], credit[2], credit[3]}
for _, r in ipairs(out) do result[#result + 1] = r end
return result
";

/// A consumer's credits of the priorities (high, normal, low), kept from one take to the next.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fair {
    credit: [i64; 3],
}

impl Fair {
    /// Takes up to `want` new jobs (at least one per pick: a pick over lanes may bring one per
    /// lane) from the streams of every priority in weighted fair order, for consumer `me`,
    /// without blocking. With each, its stream.
    pub fn take(
        &mut self,
        conn: &mut Connection,
        d: &Durable,
        me: &str,
        want: usize,
    ) -> redis::RedisResult<Vec<(String, StreamEntry)>> {
        let per = Priority::ALL.map(|p| d.streams_of(p));
        let k = per[0].len();
        let weights = Priority::WEIGHTS;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TAKE_FAIR).arg(3 * k);
        for streams in &per {
            cmd.arg(streams);
        }
        cmd.arg(GROUP).arg(me).arg(want.max(1)).arg(&self.credit[..]).arg(&weights[..]).arg(k);
        let v: Value = cmd.query(conn)?;
        let mut parts = as_array(v).into_iter();
        for c in &mut self.credit {
            // Bounded by the weights' sum: anything else (a script of another version) resets.
            *c = parts.next().as_ref().and_then(as_int).filter(|c| c.abs() <= 100).unwrap_or(0);
        }
        Ok(parts.flat_map(redis_io::read_streams).collect())
    }
}
