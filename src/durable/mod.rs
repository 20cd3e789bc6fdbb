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
//! | [`startup`] | master, before the fork | checks of the server, the id range, recovery |
//! | [`bridge`] | bridge | storing the master's jobs, passing it this node's replies |
//! | [`consumer`] | task process | taking jobs, claiming abandoned ones, the dead letters |
//! | [`heartbeat`] | task process (a thread) | keeping its jobs alive, `task_timeout` |
//! | [`node`] | task node | `taskd task-node`: a manager of consumers, nothing else |
//! | [`dead_letter`] | `taskd dead-letter` | listing and replaying dead jobs |
//!
//! Without `--redis-url`, none of this runs: the master keeps its jobs in memory.

pub mod bridge;
pub mod consumer;
pub mod dead_letter;
pub mod entry;
pub mod heartbeat;
pub mod keys;
pub mod node;
pub mod redis_io;
pub mod startup;

use std::time::Duration;

use crate::config::ServerConfig;

/// How long a job may stay idle (its owner not beating, see [`heartbeat`]) before another
/// consumer claims it, when `task_timeout` is not set.
pub const DEFAULT_CLAIM_AFTER: Duration = Duration::from_secs(30);

/// Where the queue is and who this node is.
#[derive(Debug, Clone)]
pub struct Durable {
    pub url: String,
    /// The URL as logs and messages show it: without its password.
    pub shown: String,
    pub node: String,
    pub keys: keys::Keys,
    /// Idle time after which a taken job is claimed by another consumer (XAUTOCLAIM). A live
    /// consumer's jobs never get there: it touches them every quarter of this (its heartbeat).
    pub claim_after: Duration,
    /// `task_timeout`: a job running longer is killed with its task process, by that process.
    pub task_limit: Option<Duration>,
    /// Runs of a job before it goes to the dead letters (`task_retry_max` + 1).
    pub max_attempts: u32,
    pub result_keep: usize,
}

impl Durable {
    /// The durable settings of `config`, if it names a Redis server.
    pub fn from_config(config: &ServerConfig) -> Option<Durable> {
        let url = config.redis_url.clone()?;
        let node = config.node_id.clone().unwrap_or_else(host_name);
        Some(Durable {
            shown: redact(&url),
            url,
            keys: keys::Keys::new(&config.redis_queue, &node),
            node,
            claim_after: config.task_limit().unwrap_or(DEFAULT_CLAIM_AFTER),
            task_limit: config.task_limit(),
            max_attempts: config.task_retry_max.saturating_add(1),
            result_keep: config.result_keep,
        })
    }
}

/// `redis://user:secret@host` as `redis://user:***@host`: a password never reaches a log.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else { return url.to_string() };
    let user = userinfo.split_once(':').map_or("", |(u, _)| u);
    format!("{scheme}://{user}:***@{host}{path}")
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

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("redis://:s3cret@10.0.0.5:6379/0"), "redis://:***@10.0.0.5:6379/0");
        assert_eq!(redact("redis://app:s3cret@host"), "redis://app:***@host");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis+unix:///run/redis.sock"), "redis+unix:///run/redis.sock");
    }
}
