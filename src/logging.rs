//! Logging with tracing, set up in the master before any fork.
//!
//! Every line names the process that wrote it (`master`, `manager`, `worker 0`, `task 3`) and
//! its pid, in a human format or as one JSON object per line for log collectors. Logs go to
//! stderr, which `--log-file` points at a file; after the file is rotated, SIGHUP to the
//! master makes every process reopen it (a counter in shared memory tells the others), and
//! the other files the pool appends to (the outbox) with it. With `--user`, the master creates
//! each new file for the pool's user, mode 0640, before the pool reopens it; a process that
//! cannot reopen its log says so on the old one.
//! The subscriber writes synchronously (no background thread), so it is fork-safe.
//!
//! The processes on the job path (workers and task processes) hold their info, debug and trace
//! lines back and write them in one `write` when they are about to wait (see [`hold_lines`]):
//! at the default level each job has its lines, and one write per line cost half the
//! throughput. A warning or an error is written at once, with the lines held before it; a
//! panic writes them before its message; `_exit` writes them; only a SIGKILL loses them, and
//! then the master logs the death and the job it held.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::files;
use crate::log_format;
use crate::process::Credentials;
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
/// Who the pool runs as (`--user`): the owner of the files it appends to.
static OWNER: OnceLock<Credentials> = OnceLock::new();
/// The line format, for the lines written around the subscriber.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();
/// Files besides the log that the pool appends to and reopens on a rotation (the outbox).
static POOL_FILES: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());
/// This process's pid, read once per process rather than once per line.
static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A human line's `process[pid]: `, made once for the process and pid of now (empty: not yet).
static TAG: RwLock<String> = RwLock::new(String::new());

/// In a child right after `fork`: its lines carry its own pid.
pub fn forked() {
    PID.store(std::process::id(), Ordering::Relaxed);
    if let Ok(mut tag) = TAG.write() {
        tag.clear();
    }
}

fn pid() -> u32 {
    match PID.load(Ordering::Relaxed) {
        0 => {
            let pid = std::process::id();
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// Whether this process holds its info and quieter lines back (see [`hold_lines`]).
static HOLDING: AtomicBool = AtomicBool::new(false);
/// Whether this process holds back the lines of a job's outcome ([`outcome_line`]) while it
/// writes its other lines at once (see [`hold_outcomes`]).
static HOLDING_OUTCOMES: AtomicBool = AtomicBool::new(false);
/// The lines held back, written by [`flush`]. Text, so that [`info_line`] formats into it.
static HELD: Mutex<String> = Mutex::new(String::new());
/// Past this many bytes held, they are written without waiting for [`flush`].
const HELD_MAX: usize = 64 * 1024;

/// From now on this process holds its info, debug and trace lines back until [`flush`] (which
/// its loop calls before it waits), until a warning or an error, until 64 KiB are held, or
/// until it panics or exits. For the processes on the job path, which log per job.
pub fn hold_lines() {
    hold(true);
}

/// Holds lines back from now on (as [`hold_lines`]), or, with `false`, writes those held and
/// every line as it is logged: for a process that knows when it is in a burst.
pub fn hold(on: bool) {
    static PANIC_HOOK: std::sync::Once = std::sync::Once::new();
    HOLDING_OUTCOMES.store(on, Ordering::Relaxed);
    if !on {
        HOLDING.store(false, Ordering::Relaxed);
        flush();
        return;
    }
    HOLDING.store(true, Ordering::Relaxed);
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |panic| {
            // What led up to the panic goes before its message.
            flush();
            previous(panic);
        }));
    });
}

/// For the last job of a task process's burst: its lines are written as they are logged (so
/// that a job that hangs shows what it was doing), except its outcome's line
/// ([`outcome_line`]), which waits with the lines held so far for the burst's one write
/// ([`flush`], before the burst's results leave). Nothing is written now: a line written at
/// once writes those held before it, so the order stays. Before, the lines held were written
/// here and the outcome's line after the job: two writes of the log per burst instead of one.
pub fn hold_outcomes() {
    HOLDING.store(false, Ordering::Relaxed);
    HOLDING_OUTCOMES.store(true, Ordering::Relaxed);
}

/// Writes the lines held back, if any.
pub fn flush() {
    let Ok(mut held) = HELD.lock() else { return };
    if !held.is_empty() {
        // Nothing better to do with a log that cannot be written than to go on, and count
        // what it lost (`stats`: `log_lines_lost`).
        if io::stderr().write_all(held.as_bytes()).is_err() {
            lines_lost(held.bytes().filter(|&b| b == b'\n').count());
        }
        held.clear();
    }
}

/// For a process on the job path about to wait: follows a rotation the master announced, then
/// writes the lines held back. A process that has logged nothing since the rotation (at the
/// default level a worker logs nothing per job) still lets go of the old file, or says on it
/// that it cannot.
pub fn before_wait() {
    follow_rotation();
    flush();
}

/// The pool runs as `owner`: the log file and the files of [`rotate_with_log`] are created
/// for (and handed to) that user. Call before [`init`].
pub fn set_owner(owner: Credentials) {
    let _ = OWNER.set(owner);
}

/// Who the pool's files belong to, if not to whoever opens them.
pub fn owner() -> Option<Credentials> {
    OWNER.get().copied()
}

/// Registers a file the pool appends to: on SIGHUP the master creates it anew (for the
/// pool's user) if it was moved away, and the processes that write it reopen it (they
/// compare [`rotation`] with the one they opened it at).
pub fn rotate_with_log(path: &Path) {
    if let Ok(mut files) = POOL_FILES.write() {
        files.push(path.to_path_buf());
    }
}

/// How many rotations the master has announced; a writer that opened its file at an older one
/// reopens it.
pub fn rotation() -> u64 {
    SHARED.get().map_or(0, |s| s.log_generation())
}

/// Names this process in every line it logs from now on.
pub fn set_process(label: &str) {
    if let Ok(mut p) = PROCESS.write() {
        p.clear();
        p.push_str(label);
    }
    if let Ok(mut tag) = TAG.write() {
        tag.clear();
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
    let _ = FORMAT.set(format);
    if let Some(path) = file {
        point_stderr_at(path)
            .map_err(|e| format!("invalid log_file: cannot open {}: {e}", path.display()))?;
        let _ = LOG_FILE.set(path.to_path_buf());
    }
    set_process("master");
    tracing_subscriber::fmt()
        // A line that cannot be written (a full disk, a file size limit) is lost, as `flush`
        // loses held ones. Not said on stderr, which is that same file: its `eprintln!`
        // panicked there, and a task process died at its first log line (exit 101). `stats`
        // counts such lines instead (`log_lines_lost`, see `Line::write` and `flush`).
        .log_internal_errors(false)
        .with_env_filter(filter)
        .with_writer(Stderr)
        .event_format(Lines { format })
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))
}

/// Lets the master announce log rotations to every process through shared memory, and every
/// process count there the lines the log could not take.
pub fn share_rotation(shared: &'static Shared) {
    let _ = SHARED.set(shared);
}

/// In the master (or a task node's manager), on SIGHUP: reopens the log file here, creates
/// the pool's other files anew where they were moved away, and tells every other process to
/// reopen them. Ok(false): there is no log file (logs go to stderr).
pub fn reopen() -> io::Result<bool> {
    let reopened = match LOG_FILE.get() {
        Some(path) => point_stderr_at(path).map(|()| true),
        None => Ok(false),
    };
    // Created here, where there may be the rights to create them for the pool's user, before
    // the pool (which may lack them) reopens them.
    let pool_files = POOL_FILES.read().map(|f| f.clone()).unwrap_or_default();
    for path in pool_files {
        if let Err(e) = files::open_append(&path, files::LOG_MODE, owner()) {
            tracing::error!("SIGHUP: cannot open {} anew: {e}; its writers keep the old one", path.display());
        }
    }
    if let Some(shared) = SHARED.get() {
        let generation = shared.bump_log_generation();
        SEEN_GENERATION.store(generation, Ordering::Relaxed);
    }
    reopened
}

fn point_stderr_at(path: &Path) -> io::Result<()> {
    let file = files::open_append(path, files::LOG_MODE, owner())?;
    nix::unistd::dup2_stderr(&file)?;
    Ok(())
}

/// Reopens the log file if the master has announced a rotation this process has not seen;
/// if it cannot, it says so on the old one.
fn follow_rotation() {
    let (Some(shared), Some(path)) = (SHARED.get(), LOG_FILE.get()) else { return };
    let current = shared.log_generation();
    if SEEN_GENERATION.load(Ordering::Relaxed) != current {
        SEEN_GENERATION.store(current, Ordering::Relaxed);
        flush();
        if let Err(e) = point_stderr_at(path) {
            complain(&format!(
                "cannot reopen the log file {} after a rotation: {e}; still logging here",
                path.display()
            ));
        }
    }
}

/// Counts `n` lines the log could not take, where every process's count is read (`stats`).
fn lines_lost(n: usize) {
    if let Some(shared) = SHARED.get() {
        shared.count_log_lines_lost(n as u64);
    }
}

/// Writes an error line in the log's format straight to stderr: from inside the writer, where
/// logging through the subscriber again would re-enter it.
fn complain(message: &str) {
    let process = PROCESS.read().map(|p| p.clone()).unwrap_or_default();
    let pid = pid();
    let mut time = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut time));
    let line = match FORMAT.get() {
        Some(LogFormat::Json) => serde_json::json!({
            "timestamp": time, "level": "ERROR", "process": process, "pid": pid, "message": message,
        })
        .to_string(),
        _ => format!("{time} ERROR {process}[{pid}]: {message}"),
    };
    let _ = writeln!(io::stderr(), "{line}");
}

/// Writes each line to stderr, after following a rotation; or holds it back (see
/// [`hold_lines`]).
struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        follow_rotation();
        flush();
        Line::Now(io::stderr())
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        let quiet = matches!(*meta.level(), Level::INFO | Level::DEBUG | Level::TRACE);
        if quiet && HOLDING.load(Ordering::Relaxed) {
            // A line held now goes to the file of now: after a rotation, the new one.
            follow_rotation();
            Line::Held
        } else {
            // A warning or an error now, after what was held (a crash may follow it).
            self.make_writer()
        }
    }
}

/// Where one line goes: to stderr now, or to the lines held back.
enum Line {
    Now(io::Stderr),
    Held,
}

impl io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Line::Now(stderr) => stderr.write(buf).inspect_err(|_| {
                // The subscriber writes a line with `write_all`, which stops at the first
                // error: one failed write, one line lost (the subscriber says nothing of it,
                // see `init`).
                lines_lost(1);
            }),
            Line::Held => {
                let full = match HELD.lock() {
                    Ok(mut held) => {
                        // The subscriber writes whole lines of text; a byte that is not (there
                        // is none) would be shown as U+FFFD rather than lose the line.
                        held.push_str(&String::from_utf8_lossy(buf));
                        held.len() >= HELD_MAX
                    }
                    Err(_) => return io::stderr().write(buf),
                };
                if full {
                    flush();
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Line::Now(stderr) => stderr.flush(),
            Line::Held => Ok(()),
        }
    }
}

/// The start of a human line, up to its message: `2026-12-02T03:47:06.372884Z  INFO task 3[412]: `.
fn human_prefix(line: &mut String, level: Level) {
    log_format::timestamp(std::time::SystemTime::now(), line);
    line.push_str(match level {
        Level::ERROR => " ERROR ",
        Level::WARN => "  WARN ",
        Level::INFO => "  INFO ",
        Level::DEBUG => " DEBUG ",
        Level::TRACE => " TRACE ",
    });
    if let Ok(tag) = TAG.read() {
        if !tag.is_empty() {
            line.push_str(&tag);
            return;
        }
    }
    let mut tag = PROCESS.read().map(|p| p.clone()).unwrap_or_default();
    tag.push('[');
    log_format::push_u64(&mut tag, pid().into());
    tag.push_str("]: ");
    line.push_str(&tag);
    if let Ok(mut cached) = TAG.write() {
        *cached = tag;
    }
}

/// Logs one info line whose message `write` makes piece by piece, in the human format: the
/// line of the same message logged through tracing, byte for byte, and where such a line goes
/// (held, or written at once after those held). For a line logged per job: tracing's event,
/// the subscriber's buffer of the line and the copies between them cost about as much as
/// the line itself. The caller asks `tracing::enabled!(Level::INFO)` first: the filter
/// (`log_level`, `RUST_LOG`) decides as for any line. Returns false, having logged nothing,
/// when lines are JSON objects (or logging is not set up): then the caller logs the message
/// through tracing ([`Message::plain`]).
pub fn info_line(write: impl Fn(&mut Message<'_>)) -> bool {
    info_line_held_if(HOLDING.load(Ordering::Relaxed), write)
}

/// [`info_line`] for the line of a job's outcome, logged when its work is over: held also
/// while only outcomes are held ([`hold_outcomes`]). Nothing the process does after it and
/// before the burst's write can hang, and a process killed in between has not sent the
/// job's result either: the job runs again, and logs again.
pub fn outcome_line(write: impl Fn(&mut Message<'_>)) -> bool {
    let held = HOLDING.load(Ordering::Relaxed) || HOLDING_OUTCOMES.load(Ordering::Relaxed);
    info_line_held_if(held, write)
}

fn info_line_held_if(held: bool, write: impl Fn(&mut Message<'_>)) -> bool {
    if FORMAT.get() != Some(&LogFormat::Human) {
        return false;
    }
    if !held {
        let mut line = String::with_capacity(160);
        human_line(&mut line, write);
        // As `make_writer` does: after a rotation to the new file, after the lines held.
        follow_rotation();
        flush();
        let _ = io::stderr().write_all(line.as_bytes());
        return true;
    }
    // A line held now goes to the file of now: after a rotation, the new one.
    follow_rotation();
    let full = match HELD.lock() {
        Ok(mut held) => {
            human_line(&mut held, write);
            held.len() >= HELD_MAX
        }
        Err(_) => {
            let mut line = String::with_capacity(160);
            human_line(&mut line, write);
            let _ = io::stderr().write_all(line.as_bytes());
            false
        }
    };
    if full {
        flush();
    }
    true
}

fn human_line(line: &mut String, write: impl Fn(&mut Message<'_>)) {
    human_prefix(line, Level::INFO);
    write(&mut Message { out: line, escape: true });
    line.push('\n');
}

/// A log message being written by pieces, each escaped as the subscriber escapes a message
/// (a piece is whole characters, so escaping each is escaping the message).
pub struct Message<'a> {
    out: &'a mut String,
    escape: bool,
}

impl<'a> Message<'a> {
    /// The message as it is, for logging through tracing, which escapes it.
    pub fn plain(out: &'a mut String) -> Self {
        Message { out, escape: false }
    }

    /// Text from elsewhere (a client's address, a result): escaped.
    pub fn text(&mut self, text: &str) -> &mut Self {
        if self.escape {
            log_format::push_escaped(self.out, text);
        } else {
            self.out.push_str(text);
        }
        self
    }

    /// This program's own words, which hold no control character: copied as they are (a
    /// look at a short piece for one costs more than the copy).
    pub fn word(&mut self, word: &'static str) -> &mut Self {
        self.out.push_str(word);
        self
    }

    pub fn num(&mut self, value: u64) -> &mut Self {
        log_format::push_u64(self.out, value);
        self
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
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        match self.format {
            LogFormat::Human => {
                let mut line = String::with_capacity(160);
                human_prefix(&mut line, level);
                event.record(&mut log_format::HumanFields { out: &mut line });
                line.push('\n');
                writer.write_str(&line)
            }
            LogFormat::Json => {
                let pid = pid();
                let process = PROCESS.read().map(|p| p.clone()).unwrap_or_default();
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
    use super::{check_level, Message};

    #[test]
    fn a_message_written_by_pieces_is_the_message_the_subscriber_would_write() {
        // Pieces from a client may hold anything; each is escaped as the whole message is.
        let to = "a\u{1b}[2J@example.com\n2026-12-02T00:00:00Z ERROR forged \u{9b}\u{a0}";
        let result = "Email:\r\0, sent";
        let write = |m: &mut Message<'_>| {
            m.word("job ").num(42).word(" done: ").text(result).word(" (email to ").text(to);
            m.word(", attempt ").num(3).word(")");
        };
        let mut plain = String::new();
        write(&mut Message::plain(&mut plain));
        assert_eq!(plain, format!("job 42 done: {result} (email to {to}, attempt 3)"));
        let mut whole = String::new();
        crate::log_format::push_escaped(&mut whole, &plain);
        let mut pieces = String::new();
        write(&mut Message { out: &mut pieces, escape: true });
        assert_eq!(pieces, whole);
        assert!(!pieces.contains('\n') && !pieces.contains('\u{1b}'), "{pieces}");
    }

    #[test]
    fn the_outcome_of_a_bursts_last_job_waits_for_the_bursts_write_and_its_other_lines_do_not() {
        use super::{hold, hold_outcomes, info_line, outcome_line, LogFormat, FORMAT, HELD};
        let _ = FORMAT.set(LogFormat::Human);
        let held = || HELD.lock().map(|h| h.clone()).unwrap_or_default();
        hold(true);
        assert!(info_line(|m| {
            m.word("job 1 done: held in the burst");
        }));
        hold_outcomes();
        assert!(held().contains("job 1 done: held in the burst"), "not written when the last job starts");
        assert!(outcome_line(|m| {
            m.word("job 2 done: the last job's outcome");
        }));
        let lines = held();
        assert!(
            lines.contains("job 1 done") && lines.contains("job 2 done: the last job's outcome"),
            "{lines}"
        );
        // A line of the last job while it runs goes out at once, after those held.
        assert!(info_line(|m| {
            m.word("job 2: still running");
        }));
        assert!(!held().contains("job 1 done"), "written before the running job's line");
        // Holding nothing, an outcome's line is written at once too.
        hold(false);
        assert!(outcome_line(|m| {
            m.word("job 3 done: written at once");
        }));
        assert!(!held().contains("job 3 done"));
    }

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
