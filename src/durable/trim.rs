//! Removing finished jobs' entries from the job streams, in bulk: a consumer acknowledges a job
//! (XACK, in the MULTI of its outcome) and leaves its entry in the stream; [`TRIM`] removes every
//! acknowledged entry at once, a few times a second.
//!
//! Why not XDEL with each XACK, as before: XDEL per entry was the costliest command per job in
//! Redis (2.2-2.5 µs of its CPU per job, `benches/redis_cost.sh`), and a finished job needs no
//! entry. An entry is acknowledged when the group delivered it (its id is at most the group's
//! last-delivered id: ids only grow, and nothing moves that id back) and it is pending under no
//! consumer. So below the smallest pending id (or up to the last-delivered id when nothing is
//! pending) everything is acknowledged, and `XTRIM MINID` removes it in one call: whole
//! listpack nodes, no id by id. A job not yet delivered, or delivered and not finished
//! (pending: running, waiting in a window, or held by a dead consumer until it is claimed) is
//! never removed. Entries acknowledged above the smallest pending one (a long job holds the
//! smallest id while thousands finish after it) are deleted one by one (XDEL), by a walk from
//! that id to the last-delivered one, once more than [`SLACK`] wait there.
//!
//! Who trims, and the bound (DESIGN §8: everything kept has a bound and a trim): each consumer,
//! in the MULTI of its outcomes once [`EVERY`] has passed since its last trim (no extra round
//! trip), and on its own when it goes idle with entries it acknowledged untrimmed. So a stream
//! holds, besides its waiting and running jobs, at most the entries acknowledged in the last
//! [`EVERY`] (or, idle, the last block of a read, 500 ms), plus up to [`SLACK`] above a pending
//! job. The bridge trims exactly (every acknowledged entry, [`SLACK`] 0) before it counts the
//! jobs waiting in Redis for `stats` (`durable.jobs`, "waiting or running"), and the master's
//! start reads back its unfinished jobs past the acknowledged ones (`startup::own_jobs`).
//! A pack (`super::pack`) is one entry of many jobs: after the trim, [`PACKED_JOBS`] counts
//! the jobs of the packs left by their field `n`.

use std::time::Duration;

use super::keys::GROUP;
use super::resp::Packed;

/// How often a busy consumer trims what it acknowledged.
pub const EVERY: Duration = Duration::from_millis(100);
/// Acknowledged entries left above the smallest pending one before they are deleted one by
/// one: more than the windows of a node's consumers (64 each), so that a steady run of quick
/// jobs never walks.
pub const SLACK: usize = 2000;
/// Entries one walk looks at (the script holds Redis while it runs): a walk that stops there
/// says so, and its consumer trims again at its next flush.
pub const WALK: usize = 1000;

/// KEYS: job streams; ARGV[1] the group, ARGV[2] the acknowledged entries left above the
/// smallest pending one (0: none), ARGV[3] the entries a walk looks at. For each stream that is
/// a stream and has the group: everything below the smallest pending id goes (up to and with
/// the last-delivered id when nothing is pending); then, when more than ARGV[2] acknowledged
/// entries are left above it (counted from the group's `lag`, the entries not yet delivered;
/// when Redis does not know it, walked anyway), the entries from there to the last-delivered
/// id that no consumer holds are deleted, ARGV[3] at most. Returns `{more, len…}`: 1 when a
/// walk stopped at its limit, then each stream's length after (0 for no stream).
pub const TRIM: &str = r"
local slack, walk = tonumber(ARGV[2]), tonumber(ARGV[3])
local more = 0
local out = {}
for i, key in ipairs(KEYS) do
  local len = 0
  if redis.call('TYPE', key).ok == 'stream' then
    local last, lag
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      local f = {}
      for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
      if f['name'] == ARGV[1] then last, lag = f['last-delivered-id'], f['lag'] end
    end
    if last and last ~= '0-0' then
      local p = redis.call('XPENDING', key, ARGV[1])
      local count, low = p[1], p[2]
      if count == 0 then
        -- Every entry up to the last delivered one is acknowledged.
        redis.call('XTRIM', key, 'MINID', last)
        redis.call('XDEL', key, last)
      else
        redis.call('XTRIM', key, 'MINID', low)
        local acked = false
        if type(lag) == 'number' then acked = redis.call('XLEN', key) - lag - count end
        if not acked or acked > slack then
          local held = {}
          for _, e in ipairs(redis.call('XPENDING', key, ARGV[1], '(' .. low, last, count)) do
            held[e[1]] = true
          end
          local got = redis.call('XRANGE', key, '(' .. low, last, 'COUNT', walk)
          local gone = {}
          for _, e in ipairs(got) do
            if not held[e[1]] then gone[#gone + 1] = e[1] end
          end
          if #gone > 0 then redis.call('XDEL', key, unpack(gone)) end
          if #got == walk then more = 1 end
        end
      end
    end
    len = redis.call('XLEN', key)
  end
  out[i + 1] = len
end
out[1] = more
return out";

/// Packs the [`TRIM`] of `streams`, leaving up to `slack` acknowledged entries above a pending
/// one (see [`SLACK`]; 0 for an exact count).
pub fn pack(packed: &mut Packed, streams: &[&str], slack: usize) {
    packed.command(6 + streams.len()).arg(b"EVAL").arg(TRIM.as_bytes()).number(streams.len() as u64);
    for stream in streams {
        packed.arg(stream.as_bytes());
    }
    packed.arg(GROUP.as_bytes()).number(slack as u64).number(WALK as u64);
}

/// Packs read to count a pack stream's jobs: reading a pack reads its jobs' bytes (tens of
/// kB), so a long queue of packs is not read whole every second.
pub const PACKS_READ: usize = 64;

/// KEYS[1] a pack stream, trimmed (see [`TRIM`]); ARGV[1] the packs read, ARGV[2] the most
/// jobs a pack holds (`pack::MAX_JOBS`). Returns the jobs in its packs (waiting or running),
/// by their counts `n` (one that is not a count of 1 to ARGV[2] counts none: anyone may have
/// written it): exact up to ARGV[1] packs; past that, the packs after the first ARGV[1] are
/// counted at the mean of those. 0 for no stream. (XRANGE from the start, not XREVRANGE from
/// the end too: the README's ACL user may not run XREVRANGE.)
pub const PACKED_JOBS: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then return 0 end
local read, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local sum = 0
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', read)) do
  local f = e[2]
  for i = 1, #f, 2 do
    if f[i] == 'n' then
      local n = tonumber(f[i + 1])
      if n and n >= 1 and n <= most then sum = sum + math.floor(n) end
      break
    end
  end
end
local len = redis.call('XLEN', KEYS[1])
if len <= read then return sum end
return sum + math.floor((len - read) * sum / read + 0.5)";

/// Packs the [`PACKED_JOBS`] of the pack stream `stream`.
pub fn pack_packed_jobs(packed: &mut Packed, stream: &str) {
    packed.command(6).arg(b"EVAL").arg(PACKED_JOBS.as_bytes()).number(1).arg(stream.as_bytes());
    packed.number(PACKS_READ as u64).number(super::pack::MAX_JOBS as u64);
}

/// [`TRIM`]'s answer: whether a walk stopped at its limit, and each stream's length after.
pub fn answer(v: &redis::Value) -> Option<(bool, Vec<u64>)> {
    let redis::Value::Array(items) = v else { return None };
    let mut ints = items.iter().map(|i| match i {
        redis::Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    });
    let more = ints.next()?? == 1;
    Some((more, ints.collect::<Option<Vec<u64>>>()?))
}
