//! The `taskd` binary's command line and config file:
//! defaults < TOML file < environment (`TASKD_WORKER_NUM`) < flags (`--worker-num`).
//!
//! One flat list of options, each a TOML key (`worker_num`), an environment variable and a
//! flag; the list below is the single place an option is named.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::config::{DispatchMode, ServerConfig};
use crate::delivery::{rate::Rate, sms::Preset};
use crate::logging::LogFormat;
use crate::mail::MailConfig;

/// The effective settings of the binary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub server: ServerConfig,
    pub mail: MailConfig,
}

macro_rules! options {
    ($( $(#[$meta:meta])* $part:ident . $field:ident : $ty:ty $(=> $wrap:ident)? ),* $(,)?) => {
        /// The config file: every key optional; an unknown key is an error naming it.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct FileOptions {
            $( pub $field: Option<$ty>, )*
            /// `[handlers]`: job type → command (a table, so not in the flat list).
            pub handlers: Option<std::collections::BTreeMap<String, String>>,
            /// `[[schedule]]`: periodic jobs (an array of tables).
            pub schedule: Option<Vec<crate::schedule::ScheduleSpec>>,
        }

        /// Every option's name (its TOML key).
        pub const OPTION_NAMES: &[&str] = &[$(stringify!($field)),*];

        /// Options given as flags; each overrides the environment and the config file.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct FlagOptions {
            $( $(#[$meta])* #[arg(long)] pub $field: Option<$ty>, )*
        }

        impl FlagOptions {
            /// The options given (their TOML keys).
            pub fn given(&self) -> Vec<&'static str> {
                let mut out = Vec::new();
                $( if self.$field.is_some() { out.push(stringify!($field)); } )*
                out
            }

            /// `later`'s options win over these (flags after a subcommand over those before).
            fn merge(&mut self, later: &FlagOptions) {
                $( if later.$field.is_some() { self.$field = later.$field.clone(); } )*
            }
        }

        impl Settings {
            fn apply_file(&mut self, file: FileOptions) {
                $( if let Some(v) = file.$field { self.$part.$field = $($wrap)?(v); } )*
                if let Some(handlers) = file.handlers { self.mail.handlers = handlers; }
                if let Some(schedules) = file.schedule { self.server.schedules = schedules; }
            }
            fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
                $(
                    let name = format!("TASKD_{}", stringify!($field).to_ascii_uppercase());
                    if let Some(text) = env(&name) {
                        let v: $ty = text.parse().map_err(|e| format!("invalid {name}={text:?}: {e}"))?;
                        self.$part.$field = $($wrap)?(v);
                    }
                )*
                Ok(())
            }
            fn apply_flags(&mut self, flags: &FlagOptions) {
                $( if let Some(v) = &flags.$field { self.$part.$field = $($wrap)?(v.clone()); } )*
            }
        }
    };
}

options! {
    /// Address to listen on [default: 127.0.0.1]
    server.host: String,
    /// TCP port to listen on; 0 lets the OS choose (printed on stdout) [default: 9501]
    server.port: u16,
    /// Queue length of connections not accepted yet [default: 512]
    server.backlog: i32,
    /// Client connections held at once; more get an error line and are closed [default: 100000]
    server.max_conn: usize,
    /// Close connections silent this many seconds with nothing pending; 0 = never [default: 0]
    server.heartbeat_idle_time: u64,
    /// Worker processes [default: 2]
    server.worker_num: usize,
    /// Task processes [default: 4]
    server.task_worker_num: usize,
    /// Task processes SIGTTIN may grow the pool to at run time; 0 = task_worker_num [default: 0]
    server.task_worker_max: usize,
    /// 1 round robin, 2 by connection, 3 idle first [default: 2]
    server.dispatch_mode: DispatchMode,
    /// A worker is replaced after this many requests; 0 = never [default: 0]
    server.max_request: u64,
    /// Random extra requests per worker, to spread restarts [default: 0]
    server.max_request_grace: u64,
    /// A task process is replaced after this many tasks; 0 = never [default: 0]
    server.task_max_request: u64,
    /// Longest request line in bytes [default: 2097152]
    server.package_max_length: usize,
    /// Unread reply bytes after which a client is disconnected [default: 2097152]
    server.buffer_output_size: usize,
    /// Unread reply bytes of all connections past which the one holding the most is disconnected [default: 67108864]
    server.output_total_max: usize,
    /// Unhandled request bytes per connection past which it is not read until its worker catches up [default: 1048576]
    server.input_buffer_size: usize,
    /// Unhandled requests per connection past which it is not read until its worker catches up [default: 256]
    server.input_requests_max: usize,
    /// Unhandled request bytes of all connections past which none is read until the workers catch up [default: 8388608]
    server.input_total_max: usize,
    /// Bytes of unfinished request lines held for all connections; past it the largest is refused [default: 33554432]
    server.partial_lines_max: usize,
    /// Bytes of queued or running jobs' payloads past which new ones get "server busy" [default: 67108864]
    server.task_queue_bytes_max: u64,
    /// Queued or running jobs past which new ones get "server busy" [default: 10000]
    server.task_queue_max: u64,
    /// Runs of a job whose task process died, beyond the first [default: 2]
    server.task_retry_max: u32,
    /// Runs of a job whose delivery failed transiently, beyond the first, each after a back-off [default: 5]
    server.delivery_retry_max: u32,
    /// Back-off before retry n: random in [0, min(cap, base·2^(n-1))] ms [default: 1000]
    server.retry_base_ms: u64,
    /// Longest back-off, and longest Retry-After honoured, in ms [default: 300000]
    server.retry_cap_ms: u64,
    /// Seconds a task may run before its process is killed and the job retried, up to 86400; 0 = no limit [default: 300]
    server.task_timeout: f64,
    /// Seconds a graceful shutdown waits for in-flight jobs (up to 86400); then each unfinished job gets `failed` [default: 3]
    server.max_wait_time: u64,
    /// Most jobs sent ahead to one task process (fewer while its jobs are slow) [default: 64]
    server.task_prefetch: usize,
    /// Microseconds a process keeps polling after work before it sleeps, up to 10000; 0 = off [default: 0]
    server.busy_poll_us: u64,
    /// error, warn, info, debug, trace, off, or TARGET=LEVEL directives such as taskd=debug,warn (RUST_LOG overrides) [default: info]
    server.log_level: String,
    /// human or json (one JSON object per line) [default: human]
    server.log_format: LogFormat,
    /// Append logs to this file instead of stderr; SIGHUP reopens it (log rotation)
    server.log_file: PathBuf => Some,
    /// Write the master's pid (and address) here once listening; removed on exit
    server.pid_file: PathBuf => Some,
    /// Detach from the terminal and run in the background (needs --pid-file)
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    server.daemonize: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9503)
    server.metrics_addr: String => Some,
    /// WebSocket port on --host, with the web page at http://HOST:PORT/ (0: the OS chooses)
    server.ws_port: u16 => Some,
    /// Run workers and task processes as this user (the master binds first, as root)
    server.user: String => Some,
    /// Run workers and task processes with this group (default: the user's group)
    server.group: String => Some,
    /// Durable jobs in Redis Streams: redis://HOST:PORT, rediss://HOST:PORT (TLS), redis+unix:///PATH, redis+sentinel://H:P,H:P/MASTER (rediss+sentinel:// with TLS), redis+cluster://H:P,H:P (off when unset)
    server.redis_url: String => Some,
    /// rediss://: PEM CA certificates that sign the Redis server's certificate [default: the system's]
    server.redis_ca_file: PathBuf => Some,
    /// rediss://: this client's PEM certificate, for mutual TLS (with --redis-key-file)
    server.redis_cert_file: PathBuf => Some,
    /// rediss://: the key of --redis-cert-file (read before the pool drops privileges)
    server.redis_key_file: PathBuf => Some,
    /// Replicas that must hold a job (Redis WAIT, up to 2 s) before it is accepted (0 to 64) [default: 0]
    server.redis_wait_replicas: u32,
    /// Durable jobs: write a store round's common jobs as one entry of {q}:jobs!p (only once every node of the queue reads packs) [default: off]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    server.durable_pack: bool,
    /// This node's name in the shared queue; a restart with the same one resumes its jobs [default: host name]
    server.node_id: String => Some,
    /// Name of the shared queue (its keys are {NAME}:...); a task node serves several: a,b,c [default: taskd]
    server.redis_queue: String,
    /// Final replies kept for {"type":"result"} queries [default: 10000]
    server.result_keep: usize,
    /// Durable jobs: seconds a taken job may go without its consumer's heartbeat before another node claims it (1 to 86400) [default: 10]
    server.claim_timeout: f64,
    /// Seconds a metrics request or a WebSocket upgrade may take before it is closed [default: 5]
    server.handshake_timeout: f64,
    /// Metrics connections held at once (apart from max_conn); more get HTTP 503 [default: 16]
    server.metrics_max_conn: usize,
    /// WebSocket connections in their upgrade at once (all count toward max_conn); more get HTTP 503 [default: 1024]
    server.ws_handshake_max: usize,
    /// Origins (scheme://host:port, comma-separated; * for any) whose web pages may open a WebSocket besides this host's [default: none]
    server.ws_allow_origin: OriginList => origin_list,
    /// The operator's token, for the dashboard on --ws-port and `taskd cancel` [default: one generated at start, written 0600 next to --pid-file; neither: no dashboard, no taskd cancel]
    server.admin_token_file: PathBuf => Some,
    /// Milliseconds a simulated delivery takes [default: 1000]
    mail.simulate_ms: u64,
    /// File that delivered messages are appended to [default: taskd-outbox.log]
    mail.outbox: PathBuf,
    /// Milliseconds a batch waits for its slowest job [default: 30000]
    mail.batch_timeout_ms: u64,
    /// Longest email body in bytes [default: 1048576]
    mail.email_body_max: usize,
    /// Jobs an external handler runs before it is replaced (0: no limit) [default: 0]
    mail.handler_max_jobs: u64,
    /// With redis_url: job types (comma-separated) this node accepts and queues for the task nodes whose handlers run them; it does not run them itself [default: none]
    mail.queue_types: OriginList => origin_list,
    /// Milliseconds a job's deduplication "key" stays taken after the job ended [default: 3600000]
    mail.dedup_ttl_ms: u64,
    /// Send SMS to this HTTP API instead of the outbox: Twilio's Messages URL with the account SID and auth token as userinfo (https://SID:TOKEN@api.twilio.com/2010-04-01/Accounts/SID/Messages.json), or a webhook's URL; prefer TASKD_SMS_URL or the config file for a URL with a password
    mail.sms_url: String => Some,
    /// twilio (form To/From/Body, basic auth, the answer's sid) or webhook (JSON to/text/task_id, bearer token, the answer's id) [default: twilio]
    mail.sms_preset: Preset,
    /// The SMS sender's number or name (Twilio's From; required by the twilio preset)
    mail.sms_from: String => Some,
    /// The webhook's bearer token, or Twilio's auth token when --sms-url names only the SID; prefer TASKD_SMS_TOKEN or the config file
    mail.sms_token: String => Some,
    /// Milliseconds connecting to the SMS provider may take [default: 5000]
    mail.sms_connect_timeout_ms: u64,
    /// Milliseconds a whole SMS request may take [default: 15000]
    mail.sms_timeout_ms: u64,
    /// Most SMS sent by all task processes (all nodes of a Redis queue) together: N/s, N/m or N/h, e.g. 5/s [default: no limit]
    mail.sms_rate: Rate => Some,
    /// Most emails sent the same way, whatever the transport, e.g. 50/s [default: no limit]
    mail.smtp_rate: Rate => Some,
    /// Send emails to this SMTP relay instead of the outbox: smtp://USER:PASS@HOST:587 (STARTTLS required; ?tls=opportunistic or ?tls=none for a local relay) or smtps://USER:PASS@HOST:465 (TLS). Give it in TASKD_SMTP_URL or the config file: the password is hidden from logs and --check-config [default: none]
    mail.smtp_url: String => Some,
    /// The sender of every email, e.g. 'Shop <noreply@example.com>' (needed with --smtp-url)
    mail.mail_from: String => Some,
    /// Trust the relay's certificate only if one of these CA certificates (PEM) signed it, instead of the system's CAs
    mail.smtp_ca_file: PathBuf => Some,
}

impl std::str::FromStr for DispatchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n: u8 = s.parse().map_err(|_| format!("{s:?} is not 1, 2 or 3"))?;
        DispatchMode::try_from(n)
    }
}

/// `ws_allow_origin`: a comma-separated list on the command line and in the environment, a
/// list (or the same string) in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginList(pub Vec<String>);

impl std::str::FromStr for OriginList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(OriginList(s.split(',').map(str::trim).filter(|o| !o.is_empty()).map(String::from).collect()))
    }
}

impl<'de> Deserialize<'de> for OriginList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<String>),
            Text(String),
        }
        Ok(match Form::deserialize(d)? {
            Form::List(list) => OriginList(list),
            Form::Text(text) => text.parse().unwrap_or_default(),
        })
    }
}

fn origin_list(list: OriginList) -> Vec<String> {
    list.0
}

#[derive(Debug, Parser)]
#[command(
    name = "taskd",
    version,
    about = "A multi-process TCP task server: email and SMS jobs off the request path"
)]
pub struct Cli {
    /// TOML config file (see config.example.toml); the environment and flags override it.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub options: FlagOptions,
    /// Run jobs of TYPE with an external program (repeatable): TYPE='python3 /srv/jobs/resize.py'.
    /// Adds to (or replaces a type of) the config file's [handlers] table
    #[arg(long = "handler", value_name = "TYPE=COMMAND", global = true)]
    pub handlers: Vec<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Control commands: they find the running daemon through its pid file.
///
/// Each takes the server's options (flattened, so that `--pid-file` may stand before or after
/// the subcommand), but only those that mean something to it are shown by its `--help`; the
/// others are refused with a sentence (see [`SUBCOMMAND_OPTIONS`]).
// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Stop the daemon gracefully and wait until it is gone (exit 0, also if it was not running).
    Stop {
        /// Seconds to wait for it to exit [default: max_wait_time + 10]
        #[arg(long)]
        timeout: Option<u64>,
        #[command(flatten)]
        options: FlagOptions,
    },
    /// Replace every worker (SIGUSR1), or every task process with --tasks (SIGUSR2) (exit 7 if not running).
    Reload {
        #[arg(long)]
        tasks: bool,
        #[command(flatten)]
        options: FlagOptions,
    },
    /// Say whether the daemon runs, with its pids, uptime and counters (exit 0; 3 if not).
    Status {
        #[command(flatten)]
        options: FlagOptions,
    },
    /// Cancel job N if it has not started (its client gets "cancelled"); exit 0 if it was, 1 if not.
    Cancel {
        /// The job's task_id, as its `accepted` line gave it
        task_id: u64,
        #[command(flatten)]
        options: FlagOptions,
    },
    /// Run only a manager and task processes that take durable jobs from Redis (--redis-url):
    /// a second machine's share of the work.
    TaskNode {
        #[command(flatten)]
        options: FlagOptions,
    },
    /// The jobs that failed past their attempts (durable jobs, --redis-url).
    DeadLetter {
        #[command(subcommand)]
        action: DeadLetterAction,
        #[command(flatten)]
        options: FlagOptions,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeadLetterAction {
    /// Print each dead job as one JSON line, oldest first.
    List {
        /// Print at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        options: FlagOptions,
    },
    /// Put dead jobs back into the job stream to run again: the ids `list` printed, or --all.
    Replay {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        options: FlagOptions,
    },
}

/// The options each subcommand takes (its `--help` shows only these), and why it takes no
/// other: a flag it would silently ignore is refused with this sentence.
pub const SUBCOMMAND_OPTIONS: &[(&str, &[&str], &str)] = &[
    ("stop", &["pid_file", "max_wait_time"], "it finds the running daemon through its pid file"),
    ("reload", &["pid_file"], "it finds the running daemon through its pid file"),
    ("status", &["pid_file"], "it finds the running daemon through its pid file"),
    (
        "cancel",
        &["pid_file", "admin_token_file"],
        "it finds the running daemon through its pid file and presents its admin token",
    ),
    (
        "task-node",
        &[
            "task_worker_num",
            "task_max_request",
            "task_retry_max",
            "delivery_retry_max",
            "retry_base_ms",
            "retry_cap_ms",
            "task_timeout",
            "max_wait_time",
            "log_level",
            "log_format",
            "log_file",
            "user",
            "group",
            "redis_url",
            "redis_ca_file",
            "redis_cert_file",
            "redis_key_file",
            "node_id",
            "redis_queue",
            "result_keep",
            "claim_timeout",
            "simulate_ms",
            "outbox",
            "sms_url",
            "sms_preset",
            "sms_from",
            "sms_token",
            "sms_connect_timeout_ms",
            "sms_timeout_ms",
            "sms_rate",
            "smtp_rate",
            "smtp_url",
            "mail_from",
            "smtp_ca_file",
        ],
        "a task node runs only task processes, which take their jobs from Redis: it listens on no \
         port, has no workers and no pid file",
    ),
    (
        "dead-letter",
        &["redis_url", "redis_ca_file", "redis_cert_file", "redis_key_file", "redis_queue", "node_id"],
        "it only reads and writes the dead-letter stream in Redis",
    ),
];

impl Cli {
    /// The command line as clap defines it, with each subcommand's `--help` showing only the
    /// options it takes.
    pub fn command_line() -> clap::Command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        for &(name, allowed, _) in SUBCOMMAND_OPTIONS {
            cmd = cmd.mut_subcommand(name, |sub| {
                let sub = hide_all_but(sub, allowed);
                if name == "dead-letter" {
                    let sub = sub.mut_subcommand("list", |s| hide_all_but(s, allowed));
                    sub.mut_subcommand("replay", |s| hide_all_but(s, allowed))
                } else {
                    sub
                }
            });
        }
        cmd
    }

    /// Parses the process's arguments; prints the error or the help and exits like clap does.
    pub fn parse_args() -> Cli {
        Self::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    pub fn try_parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command_line().try_get_matches_from(args)?;
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    /// The options given as flags, before and after the subcommand (after wins).
    pub fn flags(&self) -> FlagOptions {
        let mut flags = self.options.clone();
        let later = match &self.command {
            None => None,
            Some(Command::Stop { options, .. })
            | Some(Command::Reload { options, .. })
            | Some(Command::Status { options })
            | Some(Command::Cancel { options, .. })
            | Some(Command::TaskNode { options }) => Some(options),
            Some(Command::DeadLetter { action, options }) => {
                flags.merge(options);
                match action {
                    DeadLetterAction::List { options, .. } | DeadLetterAction::Replay { options, .. } => {
                        Some(options)
                    }
                }
            }
        };
        if let Some(later) = later {
            flags.merge(later);
        }
        flags
    }

    /// The subcommand's name, as typed.
    pub fn subcommand_name(&self) -> Option<&'static str> {
        self.command.as_ref().map(|c| match c {
            Command::Stop { .. } => "stop",
            Command::Reload { .. } => "reload",
            Command::Status { .. } => "status",
            Command::Cancel { .. } => "cancel",
            Command::TaskNode { .. } => "task-node",
            Command::DeadLetter { .. } => "dead-letter",
        })
    }

    /// Refuses, with a sentence, a flag the subcommand would have no use for.
    pub fn check_flags(&self) -> Result<(), String> {
        let Some(name) = self.subcommand_name() else { return Ok(()) };
        if self.check_config {
            return Err(format!(
                "--check-config prints the server's configuration: it does not go with `taskd {name}`"
            ));
        }
        let Some(&(_, allowed, why)) = SUBCOMMAND_OPTIONS.iter().find(|(n, _, _)| *n == name) else {
            return Ok(());
        };
        let given = self.flags().given();
        let refused: Vec<String> = given
            .iter()
            .filter(|f| !allowed.contains(f))
            .map(|f| format!("--{}", f.replace('_', "-")))
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        let takes: Vec<String> = allowed.iter().map(|f| format!("--{}", f.replace('_', "-"))).collect();
        Err(format!(
            "`taskd {name}` does not take {}: {why}. It takes --config, {}.",
            refused.join(", "),
            takes.join(", ")
        ))
    }
}

fn hide_all_but(mut sub: clap::Command, allowed: &[&str]) -> clap::Command {
    for name in OPTION_NAMES {
        if !allowed.contains(name) {
            sub = sub.mut_arg(*name, |a| a.hide(true));
        }
    }
    sub
}

/// Reads the config file (if any), the environment and the flags, and validates the result.
pub fn load(cli: &Cli) -> Result<Settings, String> {
    load_with_env(cli, &|name| std::env::var(name).ok())
}

/// `load` with the environment given (for tests).
pub fn load_with_env(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, String> {
    cli.check_flags()?;
    let mut settings = Settings::default();
    let config = cli.config.clone().or_else(|| env("TASKD_CONFIG").map(PathBuf::from));
    if let Some(path) = &config {
        settings.apply_file(read_file(path)?);
    }
    settings.apply_env(env)?;
    settings.apply_flags(&cli.flags());
    for spec in &cli.handlers {
        let (kind, command) = crate::handler::parse_spec(spec)?;
        settings.mail.handlers.insert(kind, command);
    }
    settings.server.validate().map_err(|e| e.to_string())?;
    check_queues(cli, &settings.server)?;
    settings.check_handlers().map_err(|e| e.to_string())?;
    settings.check_mail_times().map_err(|e| e.to_string())?;
    settings.mail.check_delivery().map_err(|e| e.to_string())?;
    settings.check_smtp().map_err(|e| e.to_string())?;
    settings.check_schedules()?;
    Ok(settings)
}

/// Several queues are for a task node: a web node stores each job into one queue, and
/// `dead-letter` lists and replays one queue's dead letters.
fn check_queues(cli: &Cli, server: &crate::config::ServerConfig) -> Result<(), String> {
    if server.queues().len() > 1 && cli.subcommand_name() != Some("task-node") {
        let what = match cli.subcommand_name() {
            Some(name) => format!("`taskd {name}` works on one queue"),
            None => "a web node stores its jobs into one queue".to_string(),
        };
        return Err(format!(
            "invalid redis_queue: {:?} names several queues, but {what}: name one (a task node, \
             `taskd task-node`, serves several)",
            server.redis_queue
        ));
    }
    Ok(())
}

/// Job types of the application itself: their durable jobs stay in the main stream.
const BUILT_IN: [&str; 2] = ["email", "sms"];

impl Settings {
    /// External handlers: valid types and commands; queued types only for durable jobs. Then
    /// the lanes of durable jobs: every such type has one, but the built-in email and sms,
    /// which stay in the main stream that every node reads.
    fn check_handlers(&mut self) -> Result<(), crate::config::InvalidOption> {
        use crate::config::InvalidOption;
        crate::handler::validate(&self.mail.handlers)
            .map_err(|reason| InvalidOption { option: "handlers", reason })?;
        let queued = &self.mail.queue_types;
        if !queued.is_empty() && self.server.redis_url.is_none() {
            let reason =
                "needs redis_url: the jobs wait in Redis for the task nodes that run them".to_string();
            return Err(InvalidOption { option: "queue_types", reason });
        }
        for kind in queued {
            crate::handler::check_type(kind)
                .map_err(|reason| InvalidOption { option: "queue_types", reason })?;
            if BUILT_IN.contains(&kind.as_str()) {
                let reason = format!("{kind:?} is built in: every node runs it");
                return Err(InvalidOption { option: "queue_types", reason });
            }
        }
        let own = self.mail.handlers.keys().filter(|k| !BUILT_IN.contains(&k.as_str()));
        self.server.run_lanes = own.cloned().collect();
        let mut lanes: Vec<String> = self.server.run_lanes.iter().chain(queued).cloned().collect();
        lanes.sort();
        lanes.dedup();
        self.server.job_lanes = lanes;
        Ok(())
    }

    /// The application's durations, checked with the server's (`ServerConfig::check_limits`).
    fn check_mail_times(&self) -> Result<(), crate::config::InvalidOption> {
        use crate::config::{InvalidOption, MAX_SECONDS};
        use crate::mail::request::MAX_SIMULATE_MS;
        let (simulate, batch) = (self.mail.simulate_ms, self.mail.batch_timeout_ms);
        if simulate > MAX_SIMULATE_MS {
            let reason =
                format!("{simulate} ms is more than {MAX_SIMULATE_MS} (one hour), the most a job may take");
            return Err(InvalidOption { option: "simulate_ms", reason });
        }
        self.server.check_run_time("simulate_ms", simulate)?;
        if batch > MAX_SECONDS * 1000 {
            let reason = format!("{batch} ms is more than one day ({} ms)", MAX_SECONDS * 1000);
            return Err(InvalidOption { option: "batch_timeout_ms", reason });
        }
        Ok(())
    }
}

impl Settings {
    /// Email over SMTP: a URL taskd can use and a sender, or neither (the outbox); the CA file
    /// is read at start (`SmtpSettings::new`).
    fn check_smtp(&self) -> Result<(), crate::config::InvalidOption> {
        use crate::config::InvalidOption;
        use crate::delivery::smtp::{parse_mail_from, SmtpUrl, TlsMode};
        let mail = &self.mail;
        let Some(url) = &mail.smtp_url else {
            for (option, given) in
                [("mail_from", mail.mail_from.is_some()), ("smtp_ca_file", mail.smtp_ca_file.is_some())]
            {
                if given {
                    let reason = "it goes with smtp_url: without it, emails go to the outbox".to_string();
                    return Err(InvalidOption { option, reason });
                }
            }
            return Ok(());
        };
        let parsed = SmtpUrl::parse(url).map_err(|reason| InvalidOption { option: "smtp_url", reason })?;
        let Some(from) = &mail.mail_from else {
            let reason =
                "needed with smtp_url: the sender of every email, e.g. 'Shop <noreply@example.com>'".into();
            return Err(InvalidOption { option: "mail_from", reason });
        };
        parse_mail_from(from).map_err(|reason| InvalidOption { option: "mail_from", reason })?;
        if mail.smtp_ca_file.is_some() && parsed.tls == TlsMode::None {
            let reason = "smtp_url says ?tls=none: no certificate is checked".to_string();
            return Err(InvalidOption { option: "smtp_ca_file", reason });
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileOptions, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {}", path.display(), e.message()))
}

impl Settings {
    /// The `[[schedule]]` entries: each valid, and its job one this application takes.
    fn check_schedules(&self) -> Result<(), String> {
        let schedules = &self.server.schedules;
        crate::schedule::check_all(schedules).map_err(|e| format!("invalid schedule: {e}"))?;
        let limits = crate::mail::request::FieldLimits { email_body_max: self.mail.email_body_max };
        let handled: Vec<String> = self.mail.handlers.keys().cloned().collect();
        for s in schedules {
            let line = serde_json::to_vec(&s.job).unwrap_or_default();
            match crate::mail::request::parse_for(&line, &limits, &handled) {
                Ok(crate::mail::request::Request::Job(_) | crate::mail::request::Request::Handled { .. }) => {
                }
                Ok(_) => {
                    return Err(format!(
                        "invalid schedule: {}: its job must be an email, SMS or handler job",
                        s.name
                    ))
                }
                Err(e) => return Err(format!("invalid schedule: {}: its job: {e}", s.name)),
            }
        }
        Ok(())
    }

    /// The effective configuration in the config file's format.
    pub fn to_toml(&self) -> String {
        // --check-config prints this: the Redis password stays out of it (and of the terminal).
        let mut server = self.server.clone();
        server.redis_url = server.redis_url.as_deref().map(crate::durable::redact);
        let mut out = toml::to_string(&server).unwrap_or_default();
        // The same for the SMS provider's password and token.
        let mut mail = self.mail.clone();
        mail.sms_url = mail.sms_url.as_deref().map(crate::durable::redact);
        mail.sms_token = mail.sms_token.map(|_| "***".into());
        mail.smtp_url = mail.smtp_url.as_deref().map(crate::durable::redact);
        out.push_str(&toml::to_string(&mail).unwrap_or_default());
        // Arrays of tables last: after them, a plain key would belong to the last table.
        #[derive(serde::Serialize)]
        struct Schedules<'a> {
            schedule: &'a [crate::schedule::ScheduleSpec],
        }
        if !self.server.schedules.is_empty() {
            out.push_str(
                &toml::to_string(&Schedules { schedule: &self.server.schedules }).unwrap_or_default(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_args(std::iter::once("taskd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("taskd-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(&file, "worker_num = 3\ntask_worker_num = 6\nsimulate_ms = 5\n").unwrap();
        let s = load(&cli(&["--config", file.to_str().unwrap(), "--worker-num", "5"])).unwrap();
        assert_eq!(s.server.worker_num, 5);
        assert_eq!(s.server.task_worker_num, 6);
        assert_eq!(s.mail.simulate_ms, 5);
        assert_eq!(s.server.port, 9501);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_environment_sits_between_the_file_and_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "worker_num = 3\ntask_worker_num = 6\n").unwrap();
        let env = |name: &str| match name {
            "TASKD_WORKER_NUM" => Some("4".to_string()),
            "TASKD_TASK_WORKER_NUM" => Some("7".to_string()),
            "TASKD_PID_FILE" => Some("/run/taskd.pid".to_string()),
            _ => None,
        };
        let s =
            load_with_env(&cli(&["--config", file.to_str().unwrap(), "--worker-num", "5"]), &env).unwrap();
        assert_eq!(s.server.worker_num, 5, "flag beats env");
        assert_eq!(s.server.task_worker_num, 7, "env beats file");
        assert_eq!(s.server.pid_file, Some(PathBuf::from("/run/taskd.pid")));
        let bad = |name: &str| (name == "TASKD_PORT").then(|| "http".to_string());
        let err = load_with_env(&cli(&[]), &bad).unwrap_err();
        assert!(err.contains("TASKD_PORT"), "{err}");
    }

    #[test]
    fn control_commands_take_the_pid_file_before_or_after() {
        let a = cli(&["--pid-file", "/tmp/x.pid", "stop"]);
        let b = cli(&["status", "--pid-file", "/tmp/x.pid"]);
        assert!(matches!(a.command, Some(Command::Stop { .. })));
        assert!(matches!(b.command, Some(Command::Status { .. })));
        assert_eq!(a.flags().pid_file, Some(PathBuf::from("/tmp/x.pid")));
        assert_eq!(a.flags().pid_file, b.flags().pid_file);
        assert!(matches!(cli(&["reload", "--tasks"]).command, Some(Command::Reload { tasks: true, .. })));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = std::env::temp_dir().join(format!("taskd-cli-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(&file, "worker_nmu = 3\n").unwrap();
        let err = load(&cli(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(err.contains("worker_nmu"), "{err}");
        let err = load(&cli(&["--worker-num", "0"])).unwrap_err();
        assert!(err.contains("worker_num"), "{err}");
        assert!(Cli::try_parse_args(["taskd", "--dispatch-mode", "9"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_example_documents_every_option_at_its_default() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let file: FileOptions = toml::from_str(&text).unwrap();
        let mut from_file = Settings::default();
        from_file.apply_file(file);
        assert_eq!(from_file, Settings::default());
        // Every option is documented, set or (when it has no default) commented out.
        for key in OPTION_NAMES {
            let documented = text.contains(&format!("\n{key} = ")) || text.contains(&format!("\n# {key} = "));
            assert!(documented, "config.example.toml lacks {key}");
        }
    }

    #[test]
    fn a_subcommand_shows_and_takes_only_its_own_options() {
        let mut cmd = Cli::command_line();
        let help = cmd.find_subcommand_mut("stop").unwrap().render_long_help().to_string();
        assert!(help.contains("--pid-file") && help.contains("--timeout"), "{help}");
        assert!(!help.contains("--worker-num") && !help.contains("--port"), "{help}");
        let help = cmd.find_subcommand_mut("task-node").unwrap().render_long_help().to_string();
        assert!(help.contains("--user") && help.contains("--task-worker-num"), "{help}");
        assert!(!help.contains("--ws-port") && !help.contains("--metrics-addr"), "{help}");
        for args in [
            &["task-node", "--port", "1"][..],
            &["--port", "1", "task-node"],
            &["task-node", "--worker-num", "3"],
            &["stop", "--user", "nobody"],
            &["dead-letter", "list", "--log-file", "x"],
        ] {
            let err = load_with_env(&cli(args), &|_| None).unwrap_err();
            assert!(err.contains("does not take --"), "{args:?}: {err}");
        }
        let ok = cli(&["--pid-file", "/tmp/x.pid", "stop", "--max-wait-time", "5"]);
        assert_eq!(load_with_env(&ok, &|_| None).unwrap().server.max_wait_time, 5);
        let node = cli(&["task-node", "--user", "nobody", "--redis-url", "redis://h"]);
        assert_eq!(load_with_env(&node, &|_| None).unwrap().server.user.as_deref(), Some("nobody"));
        let err = load_with_env(&cli(&["--check-config", "status"]), &|_| None).unwrap_err();
        assert!(err.contains("--check-config"), "{err}");
    }

    #[test]
    fn allowed_origins_are_a_list_in_the_file_and_comma_separated_elsewhere() {
        let s = load(&cli(&["--ws-allow-origin", "https://a.example, http://b.example:8080"])).unwrap();
        assert_eq!(s.server.ws_allow_origin, ["https://a.example", "http://b.example:8080"]);
        let file: FileOptions = toml::from_str("ws_allow_origin = [\"https://a.example\"]").unwrap();
        assert_eq!(file.ws_allow_origin, Some(OriginList(vec!["https://a.example".into()])));
        let err = load(&cli(&["--ws-allow-origin", "evil.example"])).unwrap_err();
        assert!(err.contains("ws_allow_origin"), "{err}");
    }

    #[test]
    fn handlers_come_from_the_file_and_from_repeated_flags() {
        let dir = std::env::temp_dir().join(format!("taskd-handlers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(&file, "handler_max_jobs = 5\n[handlers]\nresize = \"python3 r.py\"\nemail = \"m\"\n")
            .unwrap();
        let path = file.to_str().unwrap();
        let s = load(&cli(&["--config", path, "--handler", "email=php mail.php", "--handler", "pdf=./pdf"]))
            .unwrap();
        assert_eq!(s.mail.handler_max_jobs, 5);
        let handlers: Vec<(&str, &str)> = s.mail.handlers.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        assert_eq!(handlers, [("email", "php mail.php"), ("pdf", "./pdf"), ("resize", "python3 r.py")]);
        let back: FileOptions = toml::from_str(&s.to_toml()).unwrap();
        let mut again = Settings::default();
        again.apply_file(back);
        // The lanes are the application's, not options: not in the file.
        let mut expected = s.clone();
        (expected.server.job_lanes, expected.server.run_lanes) = Default::default();
        assert_eq!(again, expected);
        assert_eq!(s.server.run_lanes, ["pdf", "resize"], "email stays built in");
        for bad in ["resize", "Big=x", "batch=x", "x=", "x=sh -c 'oops"] {
            assert!(load(&cli(&["--handler", bad])).is_err(), "{bad}");
        }
        std::fs::write(&file, "[handlers]\nresult = \"x\"\n").unwrap();
        assert!(load(&cli(&["--config", path])).unwrap_err().contains("handlers"));
        let s = load(&cli(&["--handler", "a=b", "--redis-url", "redis://h", "--queue-types", "img,pdf,a"]))
            .unwrap();
        assert_eq!(
            (&s.server.run_lanes[..], &s.server.job_lanes[..]),
            (&["a".to_string()][..], &["a", "img", "pdf"].map(String::from)[..])
        );
        let err = load(&cli(&["--queue-types", "img"])).unwrap_err();
        assert!(err.contains("queue_types") && err.contains("redis_url"), "{err}");
        let err = load(&cli(&["--queue-types", "email", "--redis-url", "redis://h"])).unwrap_err();
        assert!(err.contains("built in"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sms_secrets_come_from_the_environment_and_never_show() {
        let env = |name: &str| match name {
            "TASKD_SMS_URL" => Some("https://AC1:s3cretPW@api.twilio.com/x".to_string()),
            "TASKD_SMS_TOKEN" => Some("t0kenXY".to_string()),
            _ => None,
        };
        let s = load_with_env(&cli(&["--sms-from", "+15005550006", "--sms-rate", "5/s"]), &env).unwrap();
        assert_eq!(s.mail.sms_token.as_deref(), Some("t0kenXY"));
        assert_eq!(s.mail.sms_rate.map(|r| r.to_string()).as_deref(), Some("5/s"));
        let shown = s.to_toml();
        assert!(!shown.contains("s3cretPW") && !shown.contains("t0kenXY"), "{shown}");
        assert!(shown.contains("AC1:***@api.twilio.com") && shown.contains("sms_rate = \"5/s\""), "{shown}");
        let err = load_with_env(&cli(&[]), &env).unwrap_err();
        assert!(err.contains("sms_from") && !err.contains("s3cretPW"), "{err}");
        let err =
            load_with_env(&cli(&["--sms-url", "ftp://u:s3cretPW@h", "--sms-preset", "webhook"]), &|_| None)
                .unwrap_err();
        assert!(err.contains("sms_url") && !err.contains("s3cretPW"), "{err}");
        assert!(Cli::try_parse_args(["taskd", "--smtp-rate", "5/d"]).is_err());
        assert!(Cli::try_parse_args(["taskd", "--sms-preset", "nexmo"]).is_err());
    }

    #[test]
    fn the_effective_config_reads_back() {
        let s = load(&cli(&["--port", "0", "--simulate-ms", "7"])).unwrap();
        let back: FileOptions = toml::from_str(&s.to_toml()).unwrap();
        let mut again = Settings::default();
        again.apply_file(back);
        assert_eq!(again, s);
    }

    #[test]
    fn schedules_are_read_from_the_file_checked_and_written_back_last() {
        let dir = std::env::temp_dir().join(format!("taskd-schedules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("taskd.toml");
        let path = file.to_str().unwrap();
        std::fs::write(
            &file,
            "simulate_ms = 5\n[[schedule]]\nname = \"r\"\ncron = \"0 0 6 * * *\"\nmissed = \"once\"\n\
             job = { type = \"email\", to = \"a@example.com\" }\n",
        )
        .unwrap();
        let s = load(&cli(&["--config", path])).unwrap();
        assert_eq!(s.server.schedules.len(), 1);
        assert_eq!(s.server.schedules[0].missed, crate::schedule::Missed::Once);
        let back: FileOptions = toml::from_str(&s.to_toml()).unwrap();
        assert_eq!(back.schedule.as_deref(), Some(&s.server.schedules[..]));
        assert_eq!(back.simulate_ms, Some(5));
        // With durable jobs too: every web node runs them, each tick claimed once in Redis.
        let durable = load(&cli(&["--config", path, "--redis-url", "redis://127.0.0.1:1"])).unwrap();
        assert_eq!(durable.server.schedules.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
