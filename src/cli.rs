//! The `taskd` binary's command line and config file: defaults < TOML file < flags.
//!
//! One flat list of options, each a TOML key (`worker_num`) and a flag (`--worker-num`); the
//! list below is the single place an option is named.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::config::{DispatchMode, ServerConfig};
use crate::mail::MailConfig;

/// The effective settings of the binary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub server: ServerConfig,
    pub mail: MailConfig,
}

macro_rules! options {
    ($( $(#[doc = $doc:literal])* $part:ident . $field:ident : $ty:ty ),* $(,)?) => {
        /// The config file: every key optional; an unknown key is an error naming it.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct FileOptions {
            $( pub $field: Option<$ty>, )*
        }

        /// Options given as flags; each overrides the config file.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct FlagOptions {
            $( $(#[doc = $doc])* #[arg(long)] pub $field: Option<$ty>, )*
        }

        impl Settings {
            fn apply_file(&mut self, file: FileOptions) {
                $( if let Some(v) = file.$field { self.$part.$field = v; } )*
            }
            fn apply_flags(&mut self, flags: &FlagOptions) {
                $( if let Some(v) = &flags.$field { self.$part.$field = v.clone(); } )*
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
    /// Queued or running jobs past which new ones get "server busy" [default: 10000]
    server.task_queue_max: u64,
    /// Runs of a job whose task process died, beyond the first [default: 2]
    server.task_retry_max: u32,
    /// Seconds a task may run before its process is killed and the job retried; 0 = no limit [default: 0]
    server.task_timeout: f64,
    /// Seconds a graceful shutdown waits for in-flight jobs [default: 3]
    server.max_wait_time: u64,
    /// Jobs sent ahead to one task process [default: 1]
    server.task_prefetch: usize,
    /// error, warn, info, debug or trace (RUST_LOG overrides) [default: info]
    server.log_level: String,
    /// Milliseconds a simulated delivery takes [default: 1000]
    mail.simulate_ms: u64,
    /// File that delivered messages are appended to [default: taskd-outbox.log]
    mail.outbox: PathBuf,
    /// Milliseconds a batch waits for its slowest job [default: 30000]
    mail.batch_timeout_ms: u64,
}

impl std::str::FromStr for DispatchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n: u8 = s.parse().map_err(|_| format!("{s:?} is not 1, 2 or 3"))?;
        DispatchMode::try_from(n)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "taskd",
    version,
    about = "A multi-process TCP task server: email and SMS jobs off the request path"
)]
pub struct Cli {
    /// TOML config file (see config.example.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub options: FlagOptions,
}

/// Reads the config file (if any), applies the flags, and validates the result.
pub fn load(cli: &Cli) -> Result<Settings, String> {
    let mut settings = Settings::default();
    if let Some(path) = &cli.config {
        settings.apply_file(read_file(path)?);
    }
    settings.apply_flags(&cli.options);
    settings.server.validate().map_err(|e| e.to_string())?;
    Ok(settings)
}

fn read_file(path: &Path) -> Result<FileOptions, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {}", path.display(), e.message()))
}

impl Settings {
    /// The effective configuration in the config file's format.
    pub fn to_toml(&self) -> String {
        let mut out = toml::to_string(&self.server).unwrap_or_default();
        out.push_str(&toml::to_string(&self.mail).unwrap_or_default());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("taskd").chain(args.iter().copied())).unwrap()
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
    fn unknown_keys_and_bad_values_are_named() {
        let dir = std::env::temp_dir().join(format!("taskd-cli-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(&file, "worker_nmu = 3\n").unwrap();
        let err = load(&cli(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(err.contains("worker_nmu"), "{err}");
        let err = load(&cli(&["--worker-num", "0"])).unwrap_err();
        assert!(err.contains("worker_num"), "{err}");
        assert!(Cli::try_parse_from(["taskd", "--dispatch-mode", "9"]).is_err());
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
        // Every key of the effective config appears in the example.
        for line in Settings::default().to_toml().lines() {
            let key = line.split(" = ").next().unwrap();
            assert!(text.contains(&format!("\n{key} = ")), "config.example.toml lacks {key}");
        }
    }

    #[test]
    fn the_effective_config_reads_back() {
        let s = load(&cli(&["--port", "0", "--simulate-ms", "7"])).unwrap();
        let back: FileOptions = toml::from_str(&s.to_toml()).unwrap();
        let mut again = Settings::default();
        again.apply_file(back);
        assert_eq!(again, s);
    }
}
