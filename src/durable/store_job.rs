//! The Lua that stores a job, shared by the scripts that store one only if they may (its
//! tick's claim, its deduplication key, or both; see [`super::ticks`] and [`super::dedup`]).

/// Lua: `store_job(dest, hash, at, member, first)` stores the job whose fields are
/// `ARGV[first..]`: into the stream `dest`, or, with a time `at` > 0 (Unix ms), parked in the
/// delayed set `dest` (member `member`, its fields in the hash `hash`) as `bridge::SCHEDULE`
/// does. Returns an error reply, having written nothing, when `dest` is not a sorted set
/// (someone else's key): the caller returns it before writing anything of its own.
macro_rules! store_job_fn {
    () => {
        "
local function store_job(dest, hash, at, member, first)
  if tonumber(at) > 0 then
    local kind = redis.call('TYPE', dest).ok
    if kind ~= 'zset' and kind ~= 'none' then
      return redis.error_reply(dest .. ' is a ' .. kind .. ', not the sorted set of delayed jobs')
    end
    redis.call('DEL', hash)
    redis.call('HSET', hash, unpack(ARGV, first))
    redis.call('ZADD', dest, tonumber(at), member)
  else
    redis.call('XADD', dest, '*', unpack(ARGV, first))
  end
  return nil
end
"
    };
}
pub(super) use store_job_fn;
