//! Logging with tracing, set up in the master before any fork.
//!
//! Every line names the process that wrote it (`master`, `manager`, `worker 0`, `task 3`) and
//! its pid, in a human format or as one JSON object per line for log collectors. Logs go to
//! stderr, which `--log-file` points at a file; after the file is rotated, SIGHUP to the
//! master makes every process reopen it (a counter in shared memory tells the others).
//! The subscriber writes synchronously (no background thread), so it is fork-safe.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::shm::Shared;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: use human or json")),
        }
    }
}

/// Which process is logging; set by each process as it starts.
static PROCESS: RwLock<String> = RwLock::new(String::new());
/// The log file, when logs do not go to the inherited stderr.
static LOG_FILE: OnceLock<PathBuf> = OnceLock::new();
/// Where the master announces a rotation.
static SHARED: OnceLock<&'static Shared> = OnceLock::new();
/// The rotation this process's stderr points at.
static SEEN_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Names this process in every line it logs from now on.
pub fn set_process(label: &str) {
    if let Ok(mut p) = PROCESS.write() {
        p.clear();
        p.push_str(label);
    }
}

/// The levels `--log-level` takes on its own.
const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// Refuses a `log_level` that is neither a level nor a filter of `TARGET=LEVEL` directives
/// (`taskd=debug,warn`). tracing reads any other word as a target name, and a filter that
/// names only an unknown target silently turns every log line off.
pub fn check_level(filter: &str) -> Result<(), String> {
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word.trim()));
    let usage = "use a level (error, warn, info, debug, trace, off) or TARGET=LEVEL directives, \
                 such as taskd=debug,warn";
    if filter.trim().is_empty() {
        return Err(format!("it is empty: {usage}"));
    }
    for directive in filter.split(',').filter(|d| !d.trim().is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            _ => directive,
        };
        if !is_level(level) {
            return Err(format!("{filter:?}: {:?} is not a level; {usage}", level.trim()));
        }
    }
    EnvFilter::try_new(filter).map(drop).map_err(|e| format!("{filter:?}: {e}; {usage}"))
}

/// Sets up logging: `RUST_LOG` wins over `level`. With `file`, stderr is pointed at it.
pub fn init(level: &str, format: LogFormat, file: Option<&Path>) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v).map_err(|e| format!("invalid RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(level).map_err(|e| format!("invalid log_level {level:?}: {e}"))?,
    };
    if let Some(path) = file {
        point_stderr_at(path)
            .map_err(|e| format!("invalid log_file: cannot open {}: {e}", path.display()))?;
        let _ = LOG_FILE.set(path.to_path_buf());
    }
    set_process("master");
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .event_format(Lines { format })
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))
}

/// Lets the master announce log rotations to every process through shared memory.
pub fn share_rotation(shared: &'static Shared) {
    let _ = SHARED.set(shared);
}

/// In the master, on SIGHUP: reopens the log file here and tells every other process to.
pub fn reopen() -> io::Result<bool> {
    let Some(path) = LOG_FILE.get() else { return Ok(false) };
    point_stderr_at(path)?;
    if let Some(shared) = SHARED.get() {
        let generation = shared.bump_log_generation();
        SEEN_GENERATION.store(generation, Ordering::Relaxed);
    }
    Ok(true)
}

fn point_stderr_at(path: &Path) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    nix::unistd::dup2_stderr(&file)?;
    Ok(())
}

/// Reopens the log file if the master has announced a rotation this process has not seen.
fn follow_rotation() {
    let (Some(shared), Some(path)) = (SHARED.get(), LOG_FILE.get()) else { return };
    let current = shared.log_generation();
    if SEEN_GENERATION.load(Ordering::Relaxed) != current {
        SEEN_GENERATION.store(current, Ordering::Relaxed);
        let _ = point_stderr_at(path);
    }
}

/// Writes each line to stderr, after following a rotation.
struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = io::Stderr;
    fn make_writer(&'a self) -> io::Stderr {
        follow_rotation();
        io::stderr()
    }
}

/// The line format: time, level, process and pid, message and fields.
struct Lines {
    format: LogFormat,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let process = PROCESS.read().map(|p| p.clone()).unwrap_or_default();
        let pid = std::process::id();
        let level = *event.metadata().level();
        match self.format {
            LogFormat::Human => {
                SystemTime.format_time(&mut writer)?;
                write!(writer, " {level:>5} {process}[{pid}]: ")?;
                ctx.format_fields(writer.by_ref(), event)?;
                writeln!(writer)
            }
            LogFormat::Json => {
                let mut timestamp = String::new();
                SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
                let mut fields = JsonFields(serde_json::Map::new());
                event.record(&mut fields);
                let mut line = serde_json::Map::new();
                line.insert("timestamp".into(), timestamp.into());
                line.insert("level".into(), level.as_str().into());
                line.insert("process".into(), process.into());
                line.insert("pid".into(), pid.into());
                line.extend(fields.0);
                writeln!(writer, "{}", serde_json::Value::Object(line))
            }
        }
    }
}

/// Collects an event's fields (its message included) for the JSON format.
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.insert(field.name().into(), text.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::check_level;

    #[test]
    fn levels_and_directives_pass_other_words_do_not() {
        for ok in ["info", "WARN", "off", "taskd=debug,warn", "taskd::master=trace", "warn,taskd=info"] {
            assert!(check_level(ok).is_ok(), "{ok}: {:?}", check_level(ok));
        }
        for bad in ["verbose", "", "taskd", "taskd=loud", "info,chatty", "=debug"] {
            let err = check_level(bad).unwrap_err();
            assert!(err.contains("TARGET=LEVEL"), "{bad}: {err}");
        }
    }
}
