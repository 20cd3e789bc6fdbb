//! The server's options (Swoole's names), their defaults, and their validation.
//!
//! The application's own options live with the application; the `taskd` binary reads both
//! from one flat TOML file and its flags (see `cli`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::logging::LogFormat;

use serde::{Deserialize, Serialize};

/// How the master picks a worker for a request (Swoole's `dispatch_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum DispatchMode {
    /// 1: each request to the next worker in turn.
    RoundRobin,
    /// 2: by connection (`fd % worker_num`), so one connection's requests stay in order.
    Fixed,
    /// 3: to an idle worker, else the least busy one.
    Preemptive,
}

impl TryFrom<u8> for DispatchMode {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(DispatchMode::RoundRobin),
            2 => Ok(DispatchMode::Fixed),
            3 => Ok(DispatchMode::Preemptive),
            other => Err(format!(
                "dispatch_mode must be 1 (round robin), 2 (fixed, by connection) or 3 (idle first), not {other}"
            )),
        }
    }
}

impl From<DispatchMode> for u8 {
    fn from(m: DispatchMode) -> u8 {
        match m {
            DispatchMode::RoundRobin => 1,
            DispatchMode::Fixed => 2,
            DispatchMode::Preemptive => 3,
        }
    }
}

/// Every option of the server machinery. Field names are the TOML keys and, with dashes,
/// the flags of the `taskd` binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Length of the kernel's queue of connections not accepted yet.
    pub backlog: i32,
    /// Client connections held at once; past it a new one gets an error line and is closed.
    pub max_conn: usize,
    /// Seconds without a request after which an idle connection (nothing pending) is closed
    /// (0 = never, as in Swoole).
    pub heartbeat_idle_time: u64,
    pub worker_num: usize,
    pub task_worker_num: usize,
    /// How far SIGTTIN may grow the task pool at run time (0: no further than task_worker_num).
    pub task_worker_max: usize,
    pub dispatch_mode: DispatchMode,
    /// A worker exits after this many requests and is replaced (0 = never).
    pub max_request: u64,
    /// A random extra of 0..=grace requests per worker, so workers do not all restart at once.
    pub max_request_grace: u64,
    /// A task process exits after this many tasks and is replaced (0 = never).
    pub task_max_request: u64,
    /// Longest request line (and IPC payload) in bytes.
    pub package_max_length: usize,
    /// A client that lets this many reply bytes pile up unread is disconnected.
    pub buffer_output_size: usize,
    /// Reply bytes waiting for slow readers, all connections together; past it the
    /// connection holding the most is disconnected, as one past `buffer_output_size` is.
    pub output_total_max: usize,
    /// Input flow control: request bytes one connection may have sent that its worker has
    /// not handled yet; past it the master stops reading that connection until the worker
    /// has caught up halfway (the client is slowed down, never disconnected for it).
    pub input_buffer_size: usize,
    /// The same bound counted in requests.
    pub input_requests_max: usize,
    /// The same for all connections together, in bytes: past it, no connection is read until
    /// the workers catch up (a flood of large requests queues in the kernel, not here).
    pub input_total_max: usize,
    /// Bytes of unfinished request lines (and input read ahead of a paused connection) held
    /// for all connections together; past it the largest is dropped with an error and closed.
    pub partial_lines_max: usize,
    /// Bytes of job payloads held in the master (queued or running); past it a new job gets
    /// "server busy", as past `task_queue_max`.
    pub task_queue_bytes_max: u64,
    /// Past this many queued or running jobs, new ones are refused ("server busy").
    pub task_queue_max: u64,
    /// How many times a job whose task process died is run again before it fails.
    pub task_retry_max: u32,
    /// Delivery retries: how many more times a job whose `on_task` failed transiently
    /// (`TaskFailure::Transient`) runs, after a back-off, before it fails. Apart from
    /// `task_retry_max`, which counts deaths of task processes.
    pub delivery_retry_max: u32,
    /// The back-off before retry n (from 1) is a random time in
    /// [0, min(retry_cap_ms, retry_base_ms · 2^(n-1))] (full jitter).
    pub retry_base_ms: u64,
    /// The longest back-off, and the longest wait a `Retry-After` may ask for.
    pub retry_cap_ms: u64,
    /// Seconds a task may run before its process is killed and the job retried (0 = no limit).
    pub task_timeout: f64,
    /// Seconds a graceful shutdown waits for in-flight jobs; then each job not finished is
    /// answered `failed` ("server stopping").
    pub max_wait_time: u64,
    /// The most jobs sent ahead to one task process; fewer while its jobs are slow (about
    /// 2 ms of work ahead). 1: a task process gets a job only when idle.
    pub task_prefetch: usize,
    /// Microseconds a process (master, worker, task process) keeps polling after it handled
    /// something, before it sleeps (0 = sleep at once): see `net::poll_spinning`.
    pub busy_poll_us: u64,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive).
    pub log_level: String,
    pub log_format: LogFormat,
    /// Logs go to this file instead of stderr (reopened on SIGHUP).
    pub log_file: Option<PathBuf>,
    /// The master's pid (and address) is written here once listening, removed on exit.
    pub pid_file: Option<PathBuf>,
    /// Run in the background, detached from the terminal.
    pub daemonize: bool,
    /// Where Prometheus metrics are served over HTTP (`/metrics`).
    pub metrics_addr: Option<String>,
    /// A WebSocket port (on `host`), which also serves the web page on `GET /`.
    pub ws_port: Option<u16>,
    /// The user and group workers and task processes run as.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Durable jobs: the Redis server that holds them (`redis://HOST:PORT`,
    /// `redis+unix:///PATH`). None: jobs live in the master's memory, and no Redis code runs.
    pub redis_url: Option<String>,
    /// `rediss://`: PEM CA certificates the server's certificate must be signed by (a private
    /// CA), instead of the system's.
    pub redis_ca_file: Option<PathBuf>,
    /// `rediss://`: this client's PEM certificate and key, for a server that asks for one
    /// (mutual TLS). Read by the master before anything forks, so that a pool running as
    /// `user` needs no access to the key.
    pub redis_cert_file: Option<PathBuf>,
    pub redis_key_file: Option<PathBuf>,
    /// Replicas that must have each batch of jobs (Redis WAIT) before its clients get
    /// `accepted`: a failover to one of them loses no accepted job. 0: the master's word.
    pub redis_wait_replicas: u32,
    /// Durable jobs: the common jobs of a store round (no lane, normal priority, no key, tick
    /// or run_at) go into Redis as one entry of the pack stream (`{q}:jobs!p`), not one entry
    /// each: Redis's work goes with its entries. Every node of the queue must read packs.
    pub durable_pack: bool,
    /// This node's name among the nodes sharing the queue; a restarted node takes its
    /// unfinished jobs back by it (default: the host name).
    pub node_id: Option<String>,
    /// The queue's name: every key of it is `{NAME}:...` (one Redis Cluster hash slot). A task
    /// node may serve several, comma-separated ([`ServerConfig::queues`]).
    pub redis_queue: String,
    /// Final replies kept for `{"type":"result"}` queries, most recent first.
    pub result_keep: usize,
    /// Durable jobs: seconds a job taken by a consumer may go without its heartbeat before
    /// another consumer claims it (its consumer died or is stopped). Live consumers beat a
    /// quarter of this apart (at most 500 ms), whatever the job's length.
    pub claim_timeout: f64,
    /// Seconds a connection to the metrics endpoint, or one on the WebSocket port before its
    /// upgrade (or its page) is done, may stay open: a half-sent request is closed after it.
    pub handshake_timeout: f64,
    /// Connections to the metrics endpoint held at once (they do not count toward max_conn);
    /// past it a new one gets 503 and is closed.
    pub metrics_max_conn: usize,
    /// WebSocket connections still in their upgrade at once (at most half of max_conn); past
    /// it a new one gets 503 and is closed. Every WebSocket connection counts toward max_conn.
    pub ws_handshake_max: usize,
    /// Origins (`scheme://host[:port]`) whose pages may open a WebSocket, besides this host's
    /// own (`*`: any). A browser always sends `Origin`; other clients need not.
    pub ws_allow_origin: Vec<String>,
    /// Durable jobs: the job types with a lane of their own (`{q}:jobs:TYPE`), which the
    /// application names (a handler's type, or one queued for other nodes), not an option.
    #[serde(skip)]
    pub job_lanes: Vec<String>,
    /// Of those, the ones this node runs: its consumers read their lanes.
    #[serde(skip)]
    pub run_lanes: Vec<String>,
    /// The token that opens the operator's dashboard on the WebSocket port, read from this
    /// file; None: one is generated at start, written 0600 next to the pid file (no pid file
    /// either: no dashboard).
    pub admin_token_file: Option<PathBuf>,
    /// Periodic jobs (`[[schedule]]`): each tick, the master hands the entry's job to a
    /// worker as a request from no client. Written apart at the end of the file (a TOML array
    /// of tables must follow the plain keys).
    #[serde(skip)]
    pub schedules: Vec<crate::schedule::ScheduleSpec>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 9501,
            backlog: 512,
            max_conn: 100_000,
            heartbeat_idle_time: 0,
            worker_num: 2,
            task_worker_num: 4,
            task_worker_max: 0,
            dispatch_mode: DispatchMode::Fixed,
            max_request: 0,
            max_request_grace: 0,
            task_max_request: 0,
            package_max_length: 2 * 1024 * 1024,
            buffer_output_size: 2 * 1024 * 1024,
            output_total_max: 64 * 1024 * 1024,
            input_buffer_size: 1024 * 1024,
            input_requests_max: 256,
            input_total_max: 8 * 1024 * 1024,
            partial_lines_max: 32 * 1024 * 1024,
            task_queue_bytes_max: 64 * 1024 * 1024,
            task_queue_max: 10_000,
            task_retry_max: 2,
            delivery_retry_max: 5,
            retry_base_ms: 1000,
            retry_cap_ms: 300_000,
            task_timeout: DEFAULT_TASK_TIMEOUT,
            max_wait_time: 3,
            task_prefetch: 64,
            busy_poll_us: 0,
            log_level: "info".into(),
            log_format: LogFormat::Human,
            log_file: None,
            pid_file: None,
            daemonize: false,
            metrics_addr: None,
            ws_port: None,
            user: None,
            group: None,
            redis_url: None,
            redis_ca_file: None,
            redis_cert_file: None,
            redis_key_file: None,
            redis_wait_replicas: 0,
            durable_pack: false,
            node_id: None,
            redis_queue: "taskd".into(),
            result_keep: 10_000,
            claim_timeout: DEFAULT_CLAIM_TIMEOUT,
            handshake_timeout: 5.0,
            metrics_max_conn: 16,
            ws_handshake_max: 1024,
            ws_allow_origin: Vec::new(),
            job_lanes: Vec::new(),
            run_lanes: Vec::new(),
            admin_token_file: None,
            schedules: Vec::new(),
        }
    }
}

/// A job may run five minutes unless the operator says otherwise: without a bound, two slow
/// jobs hold a two-process pool for as long as they like.
pub const DEFAULT_TASK_TIMEOUT: f64 = 300.0;
/// A dead node's durable jobs are taken over after 10 s: live consumers beat every 500 ms,
/// so that is 20 beats missed, which no live consumer on a loaded machine comes near.
pub const DEFAULT_CLAIM_TIMEOUT: f64 = 10.0;
/// The shortest claim time: two beats of the slowest-beating node (500 ms apart), so that a
/// node with this claim time never takes a live consumer's job, whatever its peers' settings.
pub const MIN_CLAIM_TIMEOUT: f64 = 1.0;
/// The longest duration any option takes: one day. Longer values are almost always a typo (a
/// number of milliseconds given as seconds), and past `u64` seconds the clock arithmetic of
/// the master overflows.
pub const MAX_SECONDS: u64 = 86_400;
/// The most requests or tasks before a process is recycled, so that `max_request +
/// max_request_grace` (and the counters compared with it) cannot overflow.
const MAX_COUNT: u64 = 1 << 40;

/// An option with a value it cannot take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption {
    pub option: &'static str,
    pub reason: String,
}

impl fmt::Display for InvalidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.option, self.reason)
    }
}

impl std::error::Error for InvalidOption {}

fn check(ok: bool, option: &'static str, reason: impl Into<String>) -> Result<(), InvalidOption> {
    if ok {
        Ok(())
    } else {
        Err(InvalidOption { option, reason: reason.into() })
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), InvalidOption> {
        check(
            (1..=1024).contains(&self.worker_num),
            "worker_num",
            format!("{} is not between 1 and 1024", self.worker_num),
        )?;
        // With durable jobs a node may take none itself: task nodes run them.
        let least = usize::from(self.redis_url.is_none());
        check(
            (least..=4096).contains(&self.task_worker_num),
            "task_worker_num",
            format!("{} is not between {least} and 4096", self.task_worker_num),
        )?;
        check(
            self.task_worker_max == 0 || (self.task_worker_num..=4096).contains(&self.task_worker_max),
            "task_worker_max",
            format!(
                "{} is not between task_worker_num ({}) and 4096",
                self.task_worker_max, self.task_worker_num
            ),
        )?;
        check(
            (16..=32 * 1024 * 1024).contains(&self.package_max_length),
            "package_max_length",
            format!("{} bytes is not between 16 bytes and 32 MiB", self.package_max_length),
        )?;
        check(
            self.buffer_output_size >= 1024,
            "buffer_output_size",
            format!("{} bytes is below the minimum of 1024", self.buffer_output_size),
        )?;
        check(self.task_queue_max >= 1, "task_queue_max", "must be at least 1")?;
        check(
            (1..=1024).contains(&self.task_prefetch),
            "task_prefetch",
            format!("{} is not between 1 and 1024", self.task_prefetch),
        )?;
        check(
            self.busy_poll_us <= 10_000,
            "busy_poll_us",
            format!("{} µs is more than 10000", self.busy_poll_us),
        )?;
        check(!self.host.is_empty(), "host", "must not be empty")?;
        check(
            self.task_timeout.is_finite() && self.task_timeout >= 0.0,
            "task_timeout",
            format!("{} is not a number of seconds (0 = no limit)", self.task_timeout),
        )?;
        check(self.backlog >= 1, "backlog", format!("{} is below 1", self.backlog))?;
        check(
            !self.daemonize || self.pid_file.is_some(),
            "daemonize",
            "needs pid_file (--pid-file), so that `taskd stop` can find the daemon",
        )?;
        check(
            self.group.is_none() || self.user.is_some(),
            "group",
            "goes with user (--user): the pool keeps root's group otherwise",
        )?;
        check(
            (1..=1 << 24).contains(&self.max_conn),
            "max_conn",
            format!("{} is not between 1 and 16777216", self.max_conn),
        )?;
        check(self.result_keep >= 1, "result_keep", "must be at least 1")?;
        self.check_limits()?;
        self.check_listeners()?;
        self.check_budgets()?;
        self.check_durable()
    }

    /// Every duration and the sizes and counts without a bound above: each within what the
    /// code can hold and compute with, so that no value that passes here can crash the daemon.
    pub fn check_limits(&self) -> Result<(), InvalidOption> {
        let day = MAX_SECONDS as f64;
        check(
            self.task_timeout == 0.0 || (0.001..=day).contains(&self.task_timeout),
            "task_timeout",
            format!(
                "{:?} is not 0 (no limit) or from 0.001 to {MAX_SECONDS} seconds (one day): a job that may \
                 run longer holds a task process for good, and a shorter limit kills every job",
                self.task_timeout
            ),
        )?;
        check(
            (MIN_CLAIM_TIMEOUT..=day).contains(&self.claim_timeout),
            "claim_timeout",
            format!(
                "{:?} is not from {MIN_CLAIM_TIMEOUT} to {MAX_SECONDS} seconds (one day): every live consumer \
                 beats up to 500 ms apart, so a shorter claim time would take jobs from live consumers",
                self.claim_timeout
            ),
        )?;
        check(
            self.max_wait_time <= MAX_SECONDS,
            "max_wait_time",
            format!(
                "{} seconds is more than one day ({MAX_SECONDS}): a shutdown must end within a bounded time",
                self.max_wait_time
            ),
        )?;
        check(
            self.heartbeat_idle_time <= MAX_SECONDS,
            "heartbeat_idle_time",
            format!(
                "{} seconds is more than one day ({MAX_SECONDS}); use 0 to never close idle connections",
                self.heartbeat_idle_time
            ),
        )?;
        for (option, value) in [
            ("max_request", self.max_request),
            ("max_request_grace", self.max_request_grace),
            ("task_max_request", self.task_max_request),
        ] {
            check(
                value <= MAX_COUNT,
                option,
                format!("{value} is more than {MAX_COUNT}: use 0 for a process that is never replaced"),
            )?;
        }
        check(
            self.task_retry_max <= 100,
            "task_retry_max",
            format!(
                "{} is more than 100: a job that died with its task process 100 times is a loop, not bad luck",
                self.task_retry_max
            ),
        )?;
        check(
            self.delivery_retry_max <= 100,
            "delivery_retry_max",
            format!("{} is more than 100: past that, a delivery is not coming back", self.delivery_retry_max),
        )?;
        check(
            (1..=MAX_SECONDS * 1000).contains(&self.retry_cap_ms),
            "retry_cap_ms",
            format!("{} is not between 1 and {} (one day)", self.retry_cap_ms, MAX_SECONDS * 1000),
        )?;
        check(
            (1..=self.retry_cap_ms).contains(&self.retry_base_ms),
            "retry_base_ms",
            format!("{} is not between 1 and retry_cap_ms ({})", self.retry_base_ms, self.retry_cap_ms),
        )?;
        check(
            self.task_queue_max <= 100_000_000,
            "task_queue_max",
            format!(
                "{} is more than 100000000: every queued job is held in the master's memory",
                self.task_queue_max
            ),
        )?;
        check(
            self.buffer_output_size <= 1 << 30,
            "buffer_output_size",
            format!(
                "{} bytes is more than 1 GiB: it is what one client that does not read may make the master hold",
                self.buffer_output_size
            ),
        )?;
        check(
            self.result_keep <= 10_000_000,
            "result_keep",
            format!(
                "{} is more than 10000000: kept replies are held in the master's memory (and in Redis)",
                self.result_keep
            ),
        )?;
        crate::logging::check_level(&self.log_level)
            .map_err(|reason| InvalidOption { option: "log_level", reason })
    }

    /// Whether a job that takes `ms` milliseconds can finish within `task_timeout`: a job set
    /// to take longer would only be killed and run again until it fails. `option` names where
    /// the time came from (`simulate_ms`, a job's own).
    pub fn check_run_time(&self, option: &'static str, ms: u64) -> Result<(), InvalidOption> {
        let Some(limit) = self.task_limit() else { return Ok(()) };
        check(
            u128::from(ms) <= limit.as_millis(),
            option,
            format!(
                "{ms} ms is longer than task_timeout ({}s): the job would be killed before it finishes",
                self.task_timeout
            ),
        )
    }

    /// Input flow control and the memory budgets: each must hold at least one request.
    pub fn check_budgets(&self) -> Result<(), InvalidOption> {
        let line = self.package_max_length;
        check(
            self.input_buffer_size >= 1024,
            "input_buffer_size",
            format!("{} bytes is below the minimum of 1024", self.input_buffer_size),
        )?;
        check(self.input_requests_max >= 1, "input_requests_max", "must be at least 1")?;
        check(
            self.input_total_max >= self.input_buffer_size,
            "input_total_max",
            format!(
                "{} bytes is below input_buffer_size ({}), the bound of one connection",
                self.input_total_max, self.input_buffer_size
            ),
        )?;
        check(
            self.output_total_max >= self.buffer_output_size,
            "output_total_max",
            format!(
                "{} bytes is below buffer_output_size ({}), the bound of one connection",
                self.output_total_max, self.buffer_output_size
            ),
        )?;
        check(
            self.partial_lines_max >= line,
            "partial_lines_max",
            format!(
                "{} bytes is below package_max_length ({line}): a request line that long could never be held",
                self.partial_lines_max
            ),
        )?;
        check(
            self.task_queue_bytes_max >= line as u64,
            "task_queue_bytes_max",
            format!(
                "{} bytes is below package_max_length ({line}): a job that large could never be queued",
                self.task_queue_bytes_max
            ),
        )
    }

    /// The limits of the metrics and WebSocket listeners.
    pub fn check_listeners(&self) -> Result<(), InvalidOption> {
        check(
            self.handshake_timeout.is_finite() && (0.01..=3600.0).contains(&self.handshake_timeout),
            "handshake_timeout",
            format!("{} is not between 0.01 and 3600 seconds", self.handshake_timeout),
        )?;
        check(
            (1..=65536).contains(&self.metrics_max_conn),
            "metrics_max_conn",
            format!("{} is not between 1 and 65536", self.metrics_max_conn),
        )?;
        check(
            (1..=1 << 24).contains(&self.ws_handshake_max),
            "ws_handshake_max",
            format!("{} is not between 1 and 16777216", self.ws_handshake_max),
        )?;
        for origin in &self.ws_allow_origin {
            check(
                origin == "*" || crate::net::Origin::parse(origin).is_some(),
                "ws_allow_origin",
                format!(
                    "{origin:?} is not an origin like https://app.example.com or http://host:8080 (or *)"
                ),
            )?;
        }
        Ok(())
    }

    /// How long a metrics exchange or a WebSocket upgrade may take.
    pub fn handshake_limit(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout)
    }

    /// The options of durable jobs, which only matter with `redis_url`.
    pub fn check_durable(&self) -> Result<(), InvalidOption> {
        if let Some(url) = &self.redis_url {
            check(
                [
                    "redis://",
                    "rediss://",
                    "redis+unix://",
                    "unix://",
                    "redis+sentinel://",
                    "rediss+sentinel://",
                    "redis+cluster://",
                ]
                .iter()
                .any(|p| url.starts_with(p)),
                "redis_url",
                format!(
                    "{:?} is not redis://HOST:PORT, rediss://HOST:PORT (TLS), redis+unix:///PATH, \
                     redis+sentinel://HOST:PORT,HOST:PORT/MASTER (rediss+sentinel:// with TLS) or \
                     redis+cluster://HOST:PORT,HOST:PORT",
                    crate::durable::redact(url)
                ),
            )?;
        }
        check(self.redis_wait_replicas <= 64, "redis_wait_replicas", "at most 64 replicas")?;
        let tls = self
            .redis_url
            .as_deref()
            .is_some_and(|url| url.starts_with("rediss://") || url.starts_with("rediss+sentinel://"));
        for (option, given) in [
            ("redis_ca_file", self.redis_ca_file.is_some()),
            ("redis_cert_file", self.redis_cert_file.is_some()),
            ("redis_key_file", self.redis_key_file.is_some()),
        ] {
            check(!given || tls, option, "it goes with a rediss:// or rediss+sentinel:// redis_url (TLS)")?;
        }
        check(
            self.redis_cert_file.is_some() == self.redis_key_file.is_some(),
            if self.redis_cert_file.is_some() { "redis_key_file" } else { "redis_cert_file" },
            "a client certificate needs its key, and a key its certificate (mutual TLS)",
        )?;
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if let Some(node) = &self.node_id {
            check(name_ok(node), "node_id", format!("{node:?} is not 1 to 64 of [A-Za-z0-9._-]"))?;
        }
        let queues = self.queues();
        for queue in &queues {
            check(name_ok(queue), "redis_queue", format!("{queue:?} is not 1 to 64 of [A-Za-z0-9._-]"))?;
        }
        let mut names = queues.clone();
        names.sort_unstable();
        names.dedup();
        check(
            names.len() == queues.len(),
            "redis_queue",
            format!("{:?} names a queue twice", self.redis_queue),
        )?;
        Ok(())
    }

    /// The longest a task may run, if limited. `validate` keeps `task_timeout` within a day;
    /// a value that did not pass it (a library caller's config) is no limit rather than a panic.
    /// `busy_poll_us` as a duration.
    pub fn busy_poll(&self) -> Duration {
        Duration::from_micros(self.busy_poll_us)
    }

    pub fn task_limit(&self) -> Option<Duration> {
        (self.task_timeout > 0.0).then(|| Duration::try_from_secs_f64(self.task_timeout).ok()).flatten()
    }

    /// Durable jobs: how long a taken job may go without its consumer's heartbeat before
    /// another claims it. `validate` keeps `claim_timeout` within its range; an unvalidated
    /// value out of it is the default rather than a panic.
    pub fn claim_limit(&self) -> Duration {
        Duration::try_from_secs_f64(self.claim_timeout)
            .ok()
            .filter(|d| d.as_secs_f64() >= MIN_CLAIM_TIMEOUT)
            .unwrap_or(Duration::from_secs_f64(DEFAULT_CLAIM_TIMEOUT))
    }

    /// The queues `redis_queue` names (`a,b,c`): a web node stores into one, a task node
    /// serves each (see `durable::node`).
    pub fn queues(&self) -> Vec<&str> {
        self.redis_queue.split(',').map(str::trim).collect()
    }

    /// Task slots (and channels) to create: room for the pool to grow by SIGTTIN.
    pub fn task_slots(&self) -> usize {
        self.task_worker_num.max(self.task_worker_max)
    }

    /// How long a graceful shutdown waits; never more than a day, whatever the config says.
    pub fn max_wait(&self) -> Duration {
        Duration::from_secs(self.max_wait_time.min(MAX_SECONDS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds_settings_and_valid() {
        let c = ServerConfig::default();
        assert_eq!((c.worker_num, c.task_worker_num), (2, 4));
        assert_eq!(c.dispatch_mode, DispatchMode::Fixed);
        assert_eq!(c.port, 9501);
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_option() {
        let c = ServerConfig { worker_num: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().option, "worker_num");
        let err = toml::from_str::<ServerConfig>("dispatch_mode = 7").unwrap_err();
        assert!(err.to_string().contains("dispatch_mode must be 1"), "{err}");
    }

    #[test]
    fn values_that_would_crash_are_refused_with_a_reason() {
        let refused = |c: ServerConfig, option: &str| {
            let err = c.validate().unwrap_err();
            assert_eq!(err.option, option, "{err}");
            assert!(err.reason.len() > 20, "a reason, not just a name: {err}");
        };
        for t in [1e300, 1e19, f64::NAN, f64::INFINITY, -1.0, 1e-9, 86_400.5] {
            refused(ServerConfig { task_timeout: t, ..Default::default() }, "task_timeout");
        }
        refused(ServerConfig { max_wait_time: u64::MAX, ..Default::default() }, "max_wait_time");
        for t in [0.0, 0.5, -1.0, f64::NAN, f64::INFINITY, 86_400.5, 1e300] {
            refused(ServerConfig { claim_timeout: t, ..Default::default() }, "claim_timeout");
        }
        for t in [1.0, 2.5, 86_400.0] {
            let c = ServerConfig { claim_timeout: t, ..Default::default() };
            c.validate().unwrap();
            assert_eq!(c.claim_limit(), Duration::from_secs_f64(t));
        }
        assert_eq!(
            ServerConfig { claim_timeout: f64::NAN, ..Default::default() }.claim_limit().as_secs(),
            10
        );
        refused(ServerConfig { heartbeat_idle_time: u64::MAX, ..Default::default() }, "heartbeat_idle_time");
        refused(ServerConfig { max_request_grace: u64::MAX, ..Default::default() }, "max_request_grace");
        refused(ServerConfig { task_retry_max: u32::MAX, ..Default::default() }, "task_retry_max");
        refused(ServerConfig { log_level: "verbose".into(), ..Default::default() }, "log_level");
        refused(ServerConfig { output_total_max: 1 << 20, ..Default::default() }, "output_total_max");
        // The bounds themselves pass, and 0 still means no limit.
        for t in [0.0, 0.001, 86_400.0] {
            ServerConfig { task_timeout: t, ..Default::default() }.validate().unwrap();
        }
        ServerConfig { max_wait_time: MAX_SECONDS, ..Default::default() }.validate().unwrap();
        // A library caller that skips validation gets no limit, not a panic.
        assert_eq!(ServerConfig { task_timeout: 1e300, ..Default::default() }.task_limit(), None);
    }

    #[test]
    fn a_job_may_not_be_set_to_run_longer_than_task_timeout() {
        let c = ServerConfig::default();
        assert_eq!(c.task_limit(), Some(Duration::from_secs(300)));
        c.check_run_time("simulate_ms", 300_000).unwrap();
        let err = c.check_run_time("simulate_ms", 300_001).unwrap_err();
        assert!(err.to_string().contains("300001 ms is longer than task_timeout (300s)"), "{err}");
        let unlimited = ServerConfig { task_timeout: 0.0, ..Default::default() };
        unlimited.check_run_time("simulate_ms", u64::MAX).unwrap();
    }
}
