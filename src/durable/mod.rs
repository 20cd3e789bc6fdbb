//! Durable jobs in Redis Streams (`--redis-url`): what each process of a node does with Redis.
//!
//! ```text
//! web node:   master ── bridge (process: XADD jobs, reads this node's replies) ── Redis
//!               └─ manager ─ workers, task processes (each one a consumer of the job stream)
//! task node:  manager ─ task processes (consumers)                            ── Redis
//! ```
//!
//! | module | runs in | owns |
//! | --- | --- | --- |
//! | [`keys`] | all | the key names of one queue (one hash tag) |
//! | [`redis_io`] | all | connecting, and reading stream entries out of replies |
//! | [`entry`] | all | the fields of a job, a reply and a dead letter |
//! | [`pack`] | bridge, task process, master | several common jobs in one entry (`--durable-pack`) |
//! | [`startup`] | master, before the fork | checks of the server, the id range, recovery |
//! | [`ticks`] | bridge | claiming a schedule's tick once across the web nodes, with its job |
//! | [`bridge`] | bridge | storing the master's jobs, passing it this node's replies |
//! | [`consumer`] | task process | taking jobs, claiming abandoned ones, the dead letters |
//! | [`fair`] | task process | taking from the priorities' streams in weighted fair order (6:3:1) |
//! | [`heartbeat`] | task process (a thread) | keeping its jobs alive, `task_timeout` |
//! | [`hot`] | task process | the connection of its reads and writes per job, our own parser |
//! | [`resp`] | bridge | the commands of every job, written straight into RESP |
//! | [`node`] | task node | `taskd task-node`: a manager of consumers, nothing else |
//! | [`dead_letter`] | `taskd dead-letter` | listing and replaying dead jobs |
//! | [`dedup`] | bridge, task process | deduplication keys: taken with the job, ended with it |
//! | [`cancel`] | bridge | taking back a job that has not started |
//! | [`trim`] | task process, bridge | removing finished jobs' entries from the streams, in bulk |
//!
//! Without `--redis-url`, none of this runs: the master keeps its jobs in memory.

pub mod admin;
pub mod bridge;
pub mod cancel;
pub mod consumer;
pub mod dead_letter;
pub mod dedup;
pub mod entry;
pub mod fair;
pub mod heartbeat;
pub mod hot;
pub mod keys;
pub mod lease_gate;
pub mod node;
pub mod pack;
pub mod redis_io;
pub mod resp;
pub mod round;
pub mod startup;
mod store_job;
pub mod ticks;
pub mod trim;
mod wrong_type;

use std::time::Duration;

use crate::app::Priority;
use crate::config::ServerConfig;

/// Where the queue is and who this node is.
#[derive(Debug, Clone)]
pub struct Durable {
    pub url: String,
    /// The URL as logs and messages show it: without its password.
    pub shown: String,
    pub node: String,
    pub keys: keys::Keys,
    /// Idle time after which a taken job is claimed by another consumer (XAUTOCLAIM):
    /// `claim_timeout`. A live consumer's jobs never get there: it touches them every quarter
    /// of this, at most 500 ms apart (its heartbeat), so it is not tied to `task_timeout`.
    pub claim_after: Duration,
    /// `task_timeout`: a job running longer is killed with its task process, by that process.
    pub task_limit: Option<Duration>,
    /// Runs of a job before it goes to the dead letters (`task_retry_max` + 1).
    pub max_attempts: u32,
    pub result_keep: usize,
    /// Delivery retries (`delivery_retry_max`) and their back-off.
    pub retry: crate::retry::Policy,
    /// Job types that go to a lane of their own ([`keys::Keys::lane`]) when this node stores
    /// them: those its handlers run and those it queues for other nodes (`queue_types`).
    pub routes: Vec<String>,
    /// The lanes this node's consumers read besides the main stream: the types it can run.
    pub lanes: Vec<String>,
    /// `redis_wait_replicas`: replicas that must have a batch before it is acknowledged.
    pub wait_replicas: u32,
    /// `durable_pack`: the bridge writes a round's common jobs as packs (see `pack`).
    pub pack: bool,
}

impl Durable {
    /// The durable settings of `config`, if it names a Redis server.
    pub fn from_config(config: &ServerConfig) -> Option<Durable> {
        let url = config.redis_url.clone()?;
        let node = config.node_id.clone().unwrap_or_else(host_name);
        // Every Redis error this process describes is scrubbed of this URL's secrets.
        redis_io::hide_secrets_of(&url);
        Some(Durable {
            shown: redact(&url),
            url,
            // A task node of several queues makes one of these for each (`node::Served`).
            keys: keys::Keys::new(config.queues().first().copied().unwrap_or("taskd"), &node),
            node,
            claim_after: config.claim_limit(),
            task_limit: config.task_limit(),
            max_attempts: config.task_retry_max.saturating_add(1),
            result_keep: config.result_keep,
            retry: crate::retry::Policy::from_config(config),
            routes: config.job_lanes.clone(),
            lanes: config.run_lanes.clone(),
            wait_replicas: config.redis_wait_replicas,
            pack: config.durable_pack,
        })
    }

    /// The streams this node's consumers read: for each priority, high first, the main one
    /// and then its lanes.
    pub fn streams(&self) -> Vec<String> {
        Priority::ALL.into_iter().flat_map(|p| self.streams_of(p)).collect()
    }

    /// The streams of one priority this node's consumers read: the main one, then its lanes;
    /// for the normal priority, then the stream of packs (`keys::Keys::packs`), which every
    /// node reads, whether its own bridge writes packs or not.
    pub fn streams_of(&self, priority: Priority) -> Vec<String> {
        let packs = (priority == Priority::Normal).then(|| self.keys.packs());
        std::iter::once(None)
            .chain(self.lanes.iter().map(|k| Some(k.as_str())))
            .map(|lane| self.keys.stream(lane, priority))
            .chain(packs)
            .collect()
    }

    /// The stream a job of `data` and `priority` goes to: the stream of that priority of the
    /// lane of its `"type"` if it has one here, else of the main stream.
    pub fn stream_of(&self, data: &[u8], priority: Priority) -> String {
        self.keys.stream(self.lane_for(data).as_deref(), priority)
    }

    /// The priority of a job stream key (normal for a key of no priority).
    pub fn priority_of(&self, stream: &str) -> Priority {
        self.keys.stream_parts(stream).map_or(Priority::Normal, |(_, p)| p)
    }

    /// The lane of a job of `data`: its `"type"` if it has one here (None: the main stream).
    /// Only JSON objects with a routed type are looked into.
    fn lane_for(&self, data: &[u8]) -> Option<String> {
        if !self.routes.is_empty() {
            #[derive(serde::Deserialize)]
            struct Typed<'a> {
                #[serde(rename = "type", borrow)]
                kind: Option<std::borrow::Cow<'a, str>>,
            }
            if let Ok(Typed { kind: Some(kind) }) = serde_json::from_slice::<Typed<'_>>(data) {
                if self.routes.iter().any(|r| *r == kind) {
                    return Some(kind.into_owned());
                }
            }
        }
        None
    }

    /// Where a dead letter replayed goes: back into the lane it came from (its field `ln`, a
    /// handler's type), else the main stream; of its priority (its field `pr`).
    pub fn replay_stream(&self, dead: &redis_io::StreamEntry) -> String {
        let lane = dead.get("ln").and_then(|l| std::str::from_utf8(l).ok());
        let lane = lane.filter(|l| crate::handler::check_type(l).is_ok());
        self.keys.stream(lane, priority_field(dead))
    }

    /// The type of a lane's stream key (None for the main stream), whatever its priority.
    pub fn lane_of(&self, stream: &str) -> Option<String> {
        self.keys.stream_parts(stream).and_then(|(lane, _)| lane)
    }
}

/// Adds the field `pr` (the priority of the stream a job was taken from, if not normal) to a
/// job leaving its stream for a while (parked for later, or dead): it goes back into a stream of
/// the same priority (`consumer::MOVE_DUE`, a dead letter's replay).
pub fn add_priority(cmd: &mut redis::Cmd, priority: Priority) {
    if priority != Priority::Normal {
        cmd.arg("pr").arg(priority.name());
    }
}

/// The priority in a parked job's or a dead letter's field `pr` (normal if absent or unknown:
/// a value read from Redis is input).
pub fn priority_field(entry: &redis_io::StreamEntry) -> Priority {
    entry
        .get("pr")
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(Priority::from_name)
        .unwrap_or_default()
}

/// Query parameters that carry a password in a Redis URL (`redis+unix:///path?pass=…`).
const SECRET_PARAMS: [&str; 5] = ["pass", "password", "passwd", "pwd", redis_io::SENTINEL_PASSWORD];

/// The URL with its passwords as `***`, in every form a Redis URL carries one:
/// `redis://:secret@host`, `redis://user:secret@host`, `redis+unix:///path?pass=secret`,
/// `…?password=secret`. A password never reaches a log, an error or `--check-config`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (before, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let end = before.find('/').unwrap_or(before.len());
    let (authority, path) = before.split_at(end);
    let mut out = format!("{scheme}://");
    match authority.rsplit_once('@') {
        // A user without a colon may be a password given alone: hidden too.
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@{host}")),
            None => out.push_str(&format!("***@{host}")),
        },
        None => out.push_str(authority),
    }
    out.push_str(path);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if is_secret_param(k) => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if loose_userinfo(url).is_some() {
        // A password with `/`, `?` or `#` not percent-encoded: the split above put part of it in
        // the path or the query. Whatever it may be is hidden (more than it, at worst).
        for secret in secrets(url) {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// The userinfo of a URL whose password holds a `/`, `?` or `#` not percent-encoded (which
/// ends the authority where a URL parser looks for it), and what follows its `@`: the userinfo
/// runs to the last `@` before the first `/`, `?` or `#` after its first `@`. None when the
/// authority, split as a URL parser splits it, has the `@` (or there is none).
fn loose_userinfo(url: &str) -> Option<(&str, &str)> {
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.contains('@') {
        return None;
    }
    let first = rest.find('@')?;
    let end = rest[first..].find(['/', '?', '#']).map_or(rest.len(), |i| first + i);
    let at = rest[..end].rfind('@')?;
    Some((&rest[..at], &rest[at + 1..]))
}

fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| name.eq_ignore_ascii_case(p))
}

/// The secrets of a Redis URL, as written in it: what [`scrub`] takes out of a message.
fn secrets(url: &str) -> Vec<String> {
    let Some((_, rest)) = url.split_once("://") else { return Vec::new() };
    let (before, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = &before[..before.find('/').unwrap_or(before.len())];
    let mut found = Vec::new();
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        found.push(userinfo.split_once(':').map_or(userinfo, |(_, pass)| pass).to_string());
    }
    for pair in query.split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            if is_secret_param(k) {
                found.push(v.to_string());
            }
        }
    }
    if let Some((userinfo, after)) = loose_userinfo(url) {
        found.push(userinfo.split_once(':').map_or(userinfo, |(_, pass)| pass).to_string());
        let scheme = &url[..url.find("://").unwrap_or(0)];
        found.extend(secrets(&format!("{scheme}://{after}")));
    }
    // Also as the client library decodes them (%40 for @), in case an error quotes them so.
    let decoded: Vec<String> =
        found.iter().map(|s| percent_decode(s)).filter(|d| !found.contains(d)).collect();
    found.extend(decoded);
    found.retain(|s| !s.is_empty());
    found
}

/// `%40` as `@`: what a URL's user name or password means.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` (an error from the client library, which may quote what it was given) without any
/// secret of `url`.
pub fn scrub(text: &str, url: &str) -> String {
    let mut text = text.replace(url, &redact(url));
    for secret in secrets(url) {
        text = text.replace(&secret, "***");
    }
    text
}

/// The default node id: the host's name, which is what tells one machine from another.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(64).collect())
        .filter(|h: &String| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durable(routes: &[&str]) -> Durable {
        let config = ServerConfig {
            redis_url: Some("redis://127.0.0.1:1".into()),
            node_id: Some("web-1".into()),
            ..Default::default()
        };
        let mut d = Durable::from_config(&config).unwrap();
        d.routes = routes.iter().map(|r| r.to_string()).collect();
        d.lanes = d.routes.clone();
        d
    }

    #[test]
    fn a_job_goes_to_the_stream_of_its_lane_and_priority_and_comes_back_to_it() {
        let d = durable(&["resize"]);
        assert_eq!(d.stream_of(br#"{"type":"resize"}"#, Priority::High), "{taskd}:jobs:resize#high");
        assert_eq!(d.stream_of(br#"{"type":"email"}"#, Priority::Low), "{taskd}:jobs#low");
        assert_eq!(d.stream_of(b"not json", Priority::Normal), "{taskd}:jobs");
        assert_eq!(d.streams().len(), 7);
        assert_eq!(d.streams_of(Priority::Normal), ["{taskd}:jobs", "{taskd}:jobs:resize", "{taskd}:jobs!p"]);
        assert_eq!(d.streams_of(Priority::High), ["{taskd}:jobs#high", "{taskd}:jobs:resize#high"]);
        // A dead letter goes back where it came from; a `pr` nobody knows is normal.
        let dead =
            |fields: &[(&str, &str)]| redis_io::StreamEntry::with_fields("1-0", fields.iter().copied());
        assert_eq!(d.replay_stream(&dead(&[("ln", "resize"), ("pr", "low")])), "{taskd}:jobs:resize#low");
        assert_eq!(d.replay_stream(&dead(&[("pr", "high")])), "{taskd}:jobs#high");
        assert_eq!(d.replay_stream(&dead(&[("pr", "urgent!")])), "{taskd}:jobs");
        assert_eq!(d.priority_of("{taskd}:jobs:resize#low"), Priority::Low);
        assert_eq!(d.lane_of("{taskd}:jobs:resize#low").as_deref(), Some("resize"));
        assert_eq!(d.lane_of("{taskd}:jobs#high"), None);
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("redis://:s3cret@10.0.0.5:6379/0"), "redis://:***@10.0.0.5:6379/0");
        assert_eq!(redact("redis://app:s3cret@host"), "redis://app:***@host");
        assert_eq!(redact("redis://s3cret@host"), "redis://***@host");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis+unix:///run/redis.sock"), "redis+unix:///run/redis.sock");
        assert_eq!(
            redact("redis+unix:///run/r.sock?db=2&pass=s3cret"),
            "redis+unix:///run/r.sock?db=2&pass=***"
        );
        assert_eq!(
            redact("unix:///run/r.sock?password=s3cret&user=app"),
            "unix:///run/r.sock?password=***&user=app"
        );
        assert_eq!(redact("redis://h:1/0?PASSWORD=s3cret"), "redis://h:1/0?PASSWORD=***");
        for url in [
            "redis://:s3cret@h",
            "redis://u:s3cret@h/1",
            "redis+unix:///x.sock?pass=s3cret",
            "redis+unix:///x.sock?password=s3cret",
            "redis://u:s3%63ret@h",
        ] {
            assert!(!redact(url).contains("s3c"), "{url}: {}", redact(url));
            let said = scrub(&format!("failed at {url}: password s3cret refused"), url);
            assert!(!said.contains("s3cret") && !said.contains("s3%63ret"), "{url}: {said}");
        }
    }

    #[test]
    fn a_password_with_a_slash_or_question_mark_not_encoded_stays_hidden() {
        // Such a URL does not parse, and its error quotes it: the whole password is hidden.
        for url in [
            "redis://:pa/s3cret@127.0.0.1:1",
            "redis://app:pa?s3cret@127.0.0.1:1/0?password=qu3ry",
            "redis://:pa#s3cret@h",
            "redis+sentinel://:pa/s3cret@h:1/m?sentinel_password=qu3ry",
            "rediss+sentinel://h:1/m?sentinel_user=ops@corp&sentinel_password=qu3ry",
            "https://SID:to/k3n@api.example.com/x",
        ] {
            let shown = redact(url);
            for secret in ["s3cret", "qu3ry", "k3n"] {
                assert!(!shown.contains(secret), "{url}: {shown}");
                let said = scrub(&format!("invalid {url}: did not parse"), url);
                assert!(!said.contains(secret), "{url}: {said}");
            }
        }
        assert_eq!(redact("redis://:pa/s3cret@127.0.0.1:1"), "redis://:***@127.0.0.1:1");
        // A well-formed URL is shown as before; an `@` in a query without a userinfo may hide
        // more than a password (the side to err on).
        assert_eq!(redact("redis://u:p@h:1/0?user=a@b"), "redis://u:***@h:1/0?user=a@b");
        assert!(!redact("redis://h:1/0?user=a@b&password=qu3ry").contains("qu3ry"));
    }
}
