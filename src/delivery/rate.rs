//! Rate limits per delivery channel (`smtp_rate` for email, `sms_rate`), whatever the
//! transport (the outbox too): a provider's limit is the node's (or the queue's), not one task
//! process's.
//!
//! The scheme is GCRA (the generic cell rate algorithm): one number per channel, the
//! "theoretical arrival time" (TAT) of the next message; a message may go when the TAT is not
//! in the future, and pushes it one interval (`1/rate`) on. Messages are spaced evenly: over
//! any span `t`, at most `1 + rate × t` go (a burst of one).
//!
//! - One node: the TAT of each channel is an `AtomicU64` in a page of shared memory mapped
//!   before the fork, updated with compare-and-swap by every task process (no lock, nothing
//!   held across a crash), on CLOCK_BOOTTIME, which all processes of the host share.
//! - Durable jobs (`redis_url`): the same in a few lines of Lua on the queue's key
//!   `{QUEUE}:rate:CHANNEL`, on Redis's clock, so that every node of the queue shares the
//!   limit. If Redis cannot be asked, the node-local limit applies meanwhile.
//!
//! A message over the limit is not sent: the caller learns how long to wait (the job's
//! `TaskFailure::NotYet`).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A delivery channel, as a rate limit counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Email,
    Sms,
}

impl Channel {
    fn index(self) -> usize {
        match self {
            Channel::Email => 0,
            Channel::Sms => 1,
        }
    }

    /// Its name in Redis keys and messages.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
        }
    }

    /// The option that sets its limit.
    pub fn option(self) -> &'static str {
        match self {
            Channel::Email => "smtp_rate",
            Channel::Sms => "sms_rate",
        }
    }
}

/// A rate: `count` messages per second, minute or hour (`50/s`, `300/m`, `1000/h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    /// The period, in seconds: 1, 60 or 3600.
    pub per_secs: u32,
}

/// The most messages per second a limit may name: beyond it no provider limits anything.
pub const MAX_PER_SECOND: u32 = 1_000_000;

impl Rate {
    /// The even spacing between two messages, in microseconds (at least 1).
    pub fn interval_us(&self) -> u64 {
        (u64::from(self.per_secs) * 1_000_000 / u64::from(self.count.max(1))).max(1)
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a rate such as 50/s, 300/m or 1000/h");
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per_secs = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            _ => return Err(bad()),
        };
        if count == 0 || count / per_secs > MAX_PER_SECOND {
            return Err(format!("{s:?}: the count must be from 1 to {MAX_PER_SECOND} per second"));
        }
        Ok(Rate { count, per_secs })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per_secs {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One GCRA step on `tat` at `now` (µs): `Ok` if a message may go now (the TAT moved one
/// `interval` on), or how long until one may (µs). Lock-free: a lost race is tried again with
/// the winner's TAT.
pub fn gcra_take(tat: &AtomicU64, now: u64, interval: u64) -> Result<(), u64> {
    let mut current = tat.load(Ordering::Acquire);
    loop {
        if current > now {
            return Err(current - now);
        }
        // From `now`, not from an old TAT: idle time does not build up a burst.
        match tat.compare_exchange_weak(current, now + interval, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(seen) => current = seen,
        }
    }
}

/// The same on the queue's key, on Redis's clock (µs): 0 if a message may go now, else the
/// wait in µs. The TAT is written as an integer (`%.0f`: Lua's `tostring` would round it),
/// and expires once it is in the past.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat > now then return tat - now end
redis.call('SET', KEYS[1], string.format('%.0f', now + interval), 'PX', math.floor(interval / 1000) + 1000)
return 0
";

/// How long the node-local limit stands in after Redis failed, before Redis is asked again.
const REDIS_RETRY: Duration = Duration::from_secs(5);

/// The limits of one node: made before the fork (the shared page), used by task processes.
pub struct Limiter {
    rates: [Option<Rate>; 2],
    /// The channels' TATs, shared by every task process of the node.
    local: Option<&'static [AtomicU64]>,
    redis: Option<RedisLimit>,
}

struct RedisLimit {
    url: String,
    keys: [String; 2],
    conn: Option<redis::Connection>,
    /// After a failure: Redis is not asked again before this.
    retry_at: Option<Instant>,
    warned: crate::throttle::Throttle,
}

impl Limiter {
    /// Maps the shared page if any channel is limited. Call before the fork.
    pub fn new(email: Option<Rate>, sms: Option<Rate>) -> std::io::Result<Limiter> {
        let rates = [email, sms];
        let local = if rates.iter().any(Option::is_some) { Some(crate::shm::map_atomics(2)?) } else { None };
        Ok(Limiter { rates, local, redis: None })
    }

    /// Durable jobs: the limits are the queue's, in Redis (the connection is made after the
    /// fork, by the first task process that needs it).
    pub fn with_redis(mut self, url: &str, keys: &crate::durable::keys::Keys) -> Limiter {
        if self.local.is_some() {
            self.redis = Some(RedisLimit {
                url: url.to_string(),
                keys: [keys.rate_of(Channel::Email.name()), keys.rate_of(Channel::Sms.name())],
                conn: None,
                retry_at: None,
                warned: Default::default(),
            });
        }
        self
    }

    pub fn rate(&self, channel: Channel) -> Option<Rate> {
        self.rates[channel.index()]
    }

    /// Takes a turn to send one message on `channel`: `Ok` to send now, or how long to wait.
    pub fn take(&mut self, channel: Channel) -> Result<(), Duration> {
        let (Some(rate), Some(local)) = (self.rates[channel.index()], self.local) else { return Ok(()) };
        let interval = rate.interval_us();
        if let Some(redis) = &mut self.redis {
            if let Some(answer) = redis.take(channel, interval) {
                return answer;
            }
        }
        gcra_take(&local[channel.index()], crate::shm::boot_clock_us(), interval)
            .map_err(Duration::from_micros)
    }
}

impl RedisLimit {
    /// Redis's answer, or None when it cannot be had (the local limit stands in).
    fn take(&mut self, channel: Channel, interval: u64) -> Option<Result<(), Duration>> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let result = self.ask(channel, interval);
        match result {
            Ok(0) => Some(Ok(())),
            Ok(wait) => Some(Err(Duration::from_micros(wait.max(1) as u64))),
            Err(e) => {
                self.conn = None;
                self.retry_at = Some(Instant::now() + REDIS_RETRY);
                if let Some(n) = self.warned.log() {
                    tracing::warn!(
                        "rate limit of {}: cannot ask Redis ({}); this node's own limit applies for {} s{}",
                        channel.option(),
                        crate::durable::redis_io::describe(&e),
                        REDIS_RETRY.as_secs(),
                        crate::throttle::unlogged(n)
                    );
                }
                None
            }
        }
    }

    fn ask(&mut self, channel: Channel, interval: u64) -> redis::RedisResult<i64> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(crate::durable::redis_io::connect(
                &self.url,
                Some(crate::durable::redis_io::REPLY_LIMIT),
            )?),
        };
        redis::Script::new(GCRA_LUA).key(&self.keys[channel.index()]).arg(interval).invoke(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_and_print_back() {
        assert_eq!("50/s".parse::<Rate>().unwrap(), Rate { count: 50, per_secs: 1 });
        assert_eq!("300/m".parse::<Rate>().unwrap().interval_us(), 200_000);
        assert_eq!("1000 / h".parse::<Rate>().unwrap().to_string(), "1000/h");
        assert_eq!("5/s".parse::<Rate>().unwrap().interval_us(), 200_000);
        for bad in ["", "5", "0/s", "5/d", "x/s", "-1/s", "2000000/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
        let toml: std::collections::BTreeMap<String, Rate> = toml::from_str("r = \"2/s\"").unwrap();
        assert_eq!(toml["r"].to_string(), "2/s");
    }

    #[test]
    fn gcra_spaces_messages_evenly() {
        let tat = AtomicU64::new(0);
        assert_eq!(gcra_take(&tat, 1_000, 100), Ok(()));
        assert_eq!(gcra_take(&tat, 1_000, 100), Err(100));
        assert_eq!(gcra_take(&tat, 1_050, 100), Err(50));
        assert_eq!(gcra_take(&tat, 1_100, 100), Ok(()));
        // Idle time builds no burst.
        assert_eq!(gcra_take(&tat, 10_000, 100), Ok(()));
        assert_eq!(gcra_take(&tat, 10_000, 100), Err(100));
    }

    /// Without Redis, a node keeps its own limit (and asks Redis again later).
    #[test]
    fn the_local_limit_stands_in_while_redis_cannot_be_asked() {
        let keys = crate::durable::keys::Keys::new("q", "n");
        let mut limiter = Limiter::new(None, Some("1/m".parse().unwrap()))
            .unwrap()
            .with_redis("redis+unix:///nonexistent/redis.sock", &keys);
        assert_eq!(limiter.take(Channel::Sms), Ok(()));
        let wait = limiter.take(Channel::Sms).unwrap_err();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60), "{wait:?}");
        assert!(limiter.redis.as_ref().unwrap().retry_at.is_some());
    }

    /// What the page is for: task processes (forked children) taking turns at once never pass
    /// 1 + rate × elapsed between them, whatever their number.
    #[test]
    fn forked_processes_share_one_limit() {
        let mut limiter = Limiter::new(None, Some("200/s".parse().unwrap())).unwrap();
        let count = crate::shm::map_atomics(1).unwrap();
        let start = crate::shm::boot_clock_us();
        let run_for = 300_000;
        let mut children = Vec::new();
        for _ in 0..4 {
            let mut mine = Limiter { rates: limiter.rates, local: limiter.local, redis: None };
            let child = crate::process::spawn("rate test", &[], move || {
                while crate::shm::boot_clock_us() < start + run_for {
                    if mine.take(Channel::Sms).is_ok() {
                        count[0].fetch_add(1, Ordering::AcqRel);
                    }
                }
                Ok(())
            })
            .unwrap();
            children.push(child);
        }
        for child in children {
            let _ = nix::sys::wait::waitpid(child, None);
        }
        // Every turn was taken between `start` and now: at most one, then one per 5 ms.
        let elapsed = crate::shm::boot_clock_us() - start;
        let n = count[0].load(Ordering::Acquire);
        assert!(n >= 2, "{n} turns");
        assert!(n <= 1 + elapsed / 5_000, "{n} turns in {elapsed} µs");
        // The parent shares the page: it sees the clock the children moved on. Each turn sets
        // it one interval past a time no earlier than the one before it, so after n turns it
        // is at least n intervals past `start` (not "past the window": on a loaded machine the
        // children may get few turns, or start late).
        let tat = limiter.local.unwrap()[1].load(Ordering::Acquire);
        assert!(
            tat >= start + n * 5_000,
            "clock {} µs past the start after {n} turns",
            tat.saturating_sub(start)
        );
        assert_eq!(limiter.take(Channel::Email), Ok(()), "email is not limited");
    }
}
