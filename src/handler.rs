//! External job handlers: a program in any language that runs the jobs of one type. A task
//! process starts it the first time it needs it and keeps it; they speak JSON lines (one job
//! out on its stdin, one answer back on its stdout); what it writes on stderr is logged.
//!
//! Here, apart from the email/SMS application, because it is a way to run a job, not a kind of
//! job: the application checks the type when a job comes in and calls [`Handlers::run`] in
//! the task process. The handler is a child of the task process, never of the pool's
//! supervisor: it dies with the task process (parent-death signal), so a task process killed
//! for `task_timeout`, or stopped, takes its handler with it, and the job's retry (the
//! master's, as for any task process that dies) runs on a fresh one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest job type: a short word.
pub const MAX_TYPE_LEN: usize = 32;
/// Longest answer line read from a handler: its result is held in the master until delivered.
pub const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// Longest stderr line logged as one line; a longer one is cut into pieces.
const MAX_LOG_LINE: u64 = 4096;
/// A handler that fails (dies, or answers wrongly) this soon after its start is started again
/// only after a wait that doubles with each such failure in a row, from `RESTART_MIN` to
/// `RESTART_MAX` (as the pool restarts a process that dies at start): a handler that crashes
/// on start cannot turn each job into a fork. One that answered, or lived longer, starts over.
const QUICK_FAILURE: Duration = Duration::from_secs(1);
const RESTART_MIN: Duration = Duration::from_millis(50);
const RESTART_MAX: Duration = Duration::from_secs(2);

/// Types the request parser keeps for itself.
const RESERVED: &[&str] = &["batch", "result", "stats"];

/// A job type a handler may take: a short word (`resize`, `pdf_render`, `mail-v2`).
pub fn check_type(name: &str) -> Result<(), String> {
    let ok_len = !name.is_empty() && name.len() <= MAX_TYPE_LEN;
    let mut bytes = name.bytes();
    let ok_first = bytes.next().is_some_and(|b| b.is_ascii_lowercase());
    let ok_rest = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !(ok_len && ok_first && ok_rest) {
        return Err(format!(
            "handler type {name:?} must be a short word: a lowercase letter, then letters, digits, _ or - \
             ({MAX_TYPE_LEN} at most)"
        ));
    }
    if RESERVED.contains(&name) {
        return Err(format!("handler type {name:?} is a request taskd reads itself, not a job type"));
    }
    Ok(())
}

/// A handler's command split into words. No shell is involved (a missing program is then an
/// error taskd sees, not a shell's exit code): words are separated by blanks, and '…' or "…"
/// keep blanks inside one word. For a pipeline, write `sh -c '…'` yourself.
pub fn split_command(command: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in command.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("handler command {command:?} has an unclosed {q}"));
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        return Err("a handler command cannot be empty".into());
    }
    if words.iter().any(|w| w.contains('\0')) {
        return Err(format!("handler command {command:?} contains a NUL byte"));
    }
    Ok(words)
}

/// `--handler TYPE=COMMAND`.
pub fn parse_spec(spec: &str) -> Result<(String, String), String> {
    let Some((kind, command)) = spec.split_once('=') else {
        return Err(format!("--handler {spec:?}: write TYPE=COMMAND, as in resize='python3 resize.py'"));
    };
    let kind = kind.trim();
    check_type(kind)?;
    split_command(command)?;
    Ok((kind.to_string(), command.trim().to_string()))
}

/// Every handler of the configuration is valid.
pub fn validate(handlers: &BTreeMap<String, String>) -> Result<(), String> {
    for (kind, command) in handlers {
        check_type(kind)?;
        split_command(command).map_err(|e| format!("handler {kind}: {e}"))?;
    }
    Ok(())
}

/// What became of one job given to a handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The handler's `result`.
    Done(Value),
    /// Failed for good, with the reason: the handler said `"retry":false`, answered with
    /// something that is not an answer to this job, or cannot be started.
    Failed(String),
    /// The job may succeed if run again: the handler died mid-job or said `"retry":true`. The
    /// caller returns a transient failure (`TaskFailure::Transient`): the master runs it again
    /// after a back-off, up to `delivery_retry_max`, then fails it with this reason.
    Again(String),
}

/// One handler process and its pipes.
struct Running {
    child: Child,
    /// Buffered: the jobs written ahead go out together, when the task process waits for an
    /// answer (one write, and one wake-up of the handler, for a burst of jobs).
    stdin: BufWriter<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Jobs it has answered, for `handler_max_jobs`.
    jobs: u64,
    started: Instant,
    /// Jobs written ahead ([`Handlers::send_ahead`]) whose answers are not read yet, in order,
    /// with the length of each line, and their sum.
    ahead: VecDeque<(u64, usize)>,
    ahead_bytes: usize,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills and reaps it. Only between jobs or after a fault: nothing it holds is lost.
    fn stop(mut self) {
        // Without flushing what is buffered: it may not read any more.
        drop(self.stdin.into_parts().0);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The handlers of one task process: each started when its first job comes.
pub struct Handlers {
    commands: BTreeMap<String, Vec<String>>,
    max_jobs: u64,
    running: HashMap<String, Running>,
    /// Types whose command could not be started: the reason is logged once per task process,
    /// then each of their jobs fails with it (the start is still tried each time: a program
    /// installed later is found, and a failed exec costs one fork, not a loop).
    unstartable: HashMap<String, String>,
    /// Handlers of each type that failed soon after their start, in a row (see `QUICK_FAILURE`).
    quick_failures: HashMap<String, u32>,
}

impl Handlers {
    /// From the validated configuration (`--handler`, `[handlers]`).
    pub fn new(config: &BTreeMap<String, String>, max_jobs: u64) -> Self {
        let commands = config
            .iter()
            .filter_map(|(kind, command)| split_command(command).ok().map(|argv| (kind.clone(), argv)))
            .collect();
        Handlers {
            commands,
            max_jobs,
            running: HashMap::new(),
            unstartable: HashMap::new(),
            quick_failures: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    pub fn handles(&self, kind: &str) -> bool {
        self.commands.contains_key(kind)
    }

    /// Writes a job that `run` follows for soon (in the order of these calls) to its running
    /// handler now, so that the handler goes from one job to the next without waiting for
    /// the task process. Not past `handler_max_jobs`: a job written ahead runs on this handler.
    /// If the handler dies or is replaced first, `run` writes the job again to its successor
    /// (the job may then have run twice, as after any death mid-job).
    pub fn send_ahead(&mut self, kind: &str, task_id: u64, attempt: u32, job: &Value) {
        let Some(running) = self.running.get_mut(kind) else { return };
        let room = self.max_jobs == 0 || running.jobs + (running.ahead.len() as u64) + 1 < self.max_jobs;
        let line = job_line(task_id, attempt, job);
        // Bytes ahead stay below what a pipe holds: a write never waits for a handler that
        // is itself waiting for the task process to read its answers.
        if room && running.ahead_bytes + line.len() <= AHEAD_BYTES && running.stdin.write_all(&line).is_ok() {
            running.ahead.push_back((task_id, line.len()));
            running.ahead_bytes += line.len();
        }
    }

    /// Runs one job on the handler of its type, starting the handler if need be.
    pub fn run(&mut self, kind: &str, task_id: u64, attempt: u32, job: &Value) -> Outcome {
        // Jobs written ahead are answered in order: one run out of that order (the master
        // sent it elsewhere) would read another job's answer. A new handler then.
        let out_of_order = self
            .running
            .get(kind)
            .is_some_and(|r| r.ahead.front().is_some_and(|&(first, _)| first != task_id));
        if out_of_order {
            if let Some(running) = self.running.remove(kind) {
                tracing::info!(
                    "handler {kind} (pid {}) replaced: jobs written ahead ran elsewhere",
                    running.pid()
                );
                running.stop();
            }
        }
        let Some(argv) = self.commands.get(kind) else {
            return Outcome::Failed(format!("no handler for type {kind:?}"));
        };
        if !self.running.contains_key(kind) {
            if let Some(wait) = self.quick_failures.get(kind).map(|&n| restart_wait(n)) {
                tracing::warn!(
                    "handler {kind} failed within {}s of its start {} time(s) in a row; starting it again in {} ms",
                    QUICK_FAILURE.as_secs(),
                    self.quick_failures[kind],
                    wait.as_millis()
                );
                std::thread::sleep(wait);
            }
            match spawn(kind, argv) {
                Ok(running) => {
                    self.unstartable.remove(kind);
                    tracing::info!("handler {kind} started (pid {}): {}", running.pid(), argv.join(" "));
                    self.running.insert(kind.to_string(), running);
                }
                Err(e) => {
                    let why = format!("cannot start the handler of {kind} ({}): {e}", argv.join(" "));
                    if self.unstartable.insert(kind.to_string(), why.clone()).is_none() {
                        tracing::error!("{why}");
                    }
                    return Outcome::Failed(why);
                }
            }
        }
        let Some(running) = self.running.get_mut(kind) else {
            return Outcome::Failed(format!("no handler for type {kind:?}"));
        };
        let outcome = exchange(kind, running, task_id, attempt, job);
        running.jobs += 1;
        let recycle = self.max_jobs != 0 && running.jobs >= self.max_jobs;
        let healthy = match &outcome {
            Outcome::Done(_) => true,
            // An answer `{"error":…}` for this job: the handler is fine.
            Outcome::Failed(why) | Outcome::Again(why) => why.starts_with(HANDLER_SAID),
        };
        if healthy {
            self.quick_failures.remove(kind);
        }
        if recycle || !healthy {
            if let Some(running) = self.running.remove(kind) {
                if !healthy {
                    if running.started.elapsed() < QUICK_FAILURE {
                        *self.quick_failures.entry(kind.to_string()).or_default() += 1;
                    } else {
                        self.quick_failures.remove(kind);
                    }
                }
                let (pid, jobs) = (running.pid(), running.jobs);
                if healthy {
                    tracing::info!(
                        "handler {kind} (pid {pid}) replaced after {jobs} jobs (handler_max_jobs)"
                    );
                }
                running.stop();
            }
        }
        outcome
    }
}

/// The wait before starting a handler again after `n` quick failures in a row.
fn restart_wait(n: u32) -> Duration {
    RESTART_MIN.saturating_mul(1 << n.saturating_sub(1).min(16)).min(RESTART_MAX)
}

/// How a reason given by the handler itself starts (its `"error"`), as opposed to a fault.
const HANDLER_SAID: &str = "handler: ";

/// Most bytes of jobs written ahead and not answered: half of a pipe's default capacity.
const AHEAD_BYTES: usize = 32 * 1024;

/// A job's line to its handler.
fn job_line(task_id: u64, attempt: u32, job: &Value) -> Vec<u8> {
    let mut line = json!({"task_id": task_id, "attempt": attempt, "job": job}).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// Writes the job line (unless it was written ahead) and reads the answer line.
fn exchange(kind: &str, running: &mut Running, task_id: u64, attempt: u32, job: &Value) -> Outcome {
    let pid = running.pid();
    let sent = match running.ahead.front() {
        Some(&(first, len)) if first == task_id => {
            running.ahead.pop_front();
            running.ahead_bytes -= len;
            Ok(())
        }
        _ => running.stdin.write_all(&job_line(task_id, attempt, job)),
    };
    if let Err(e) = sent.and_then(|()| running.stdin.flush()) {
        return Outcome::Again(format!("the handler of {kind} (pid {pid}) cannot take the job: {e}"));
    }
    let mut answer = Vec::new();
    let read = (&mut running.stdout).take(MAX_ANSWER as u64 + 1).read_until(b'\n', &mut answer);
    match read {
        Ok(0) => {
            let status = running.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            return Outcome::Again(format!("the handler of {kind} (pid {pid}) ended mid-job ({status})"));
        }
        Err(e) => return Outcome::Again(format!("reading the handler of {kind} (pid {pid}) failed: {e}")),
        Ok(_) if !answer.ends_with(b"\n") => {
            if answer.len() > MAX_ANSWER {
                return Outcome::Failed(format!(
                    "the handler of {kind} (pid {pid}) answered with a line longer than {MAX_ANSWER} bytes"
                ));
            }
            let status = running.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            return Outcome::Again(format!("the handler of {kind} (pid {pid}) ended mid-answer ({status})"));
        }
        Ok(_) => {}
    }
    read_answer(&answer, task_id).unwrap_or_else(|why| {
        Outcome::Failed(format!("the handler of {kind} (pid {pid}) answered job {task_id} wrongly: {why}"))
    })
}

/// Reads `{"task_id":N,"result":…}` or `{"task_id":N,"error":"…","retry":true|false}`.
fn read_answer(line: &[u8], task_id: u64) -> Result<Outcome, String> {
    let shown = || {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        match text.char_indices().nth(80) {
            Some((cut, _)) => format!("{:?}…", &text[..cut]),
            None => format!("{text:?}"),
        }
    };
    let value: Value =
        serde_json::from_slice(line).map_err(|e| format!("{} is not a JSON answer ({e})", shown()))?;
    let Value::Object(answer) = value else {
        return Err(format!("{} is not a JSON object", shown()));
    };
    match answer.get("task_id").and_then(Value::as_u64) {
        Some(id) if id == task_id => {}
        Some(id) => return Err(format!("the answer is for task_id {id}")),
        None => return Err(format!("{} has no \"task_id\"", shown())),
    }
    if let Some(result) = answer.get("result") {
        return Ok(Outcome::Done(result.clone()));
    }
    let Some(error) = answer.get("error") else {
        return Err(format!("{} has neither \"result\" nor \"error\"", shown()));
    };
    let error = match error {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let why = format!("{HANDLER_SAID}{error}");
    match answer.get("retry") {
        Some(Value::Bool(true)) => Ok(Outcome::Again(why)),
        None | Some(Value::Bool(false)) => Ok(Outcome::Failed(why)),
        Some(_) => Err("\"retry\" must be true or false".into()),
    }
}

/// Starts a handler with piped stdin, stdout and stderr, and a thread that logs its stderr.
fn spawn(kind: &str, argv: &[String]) -> io::Result<Running> {
    // The task process's pid, for the child to check that it was not orphaned before it asked
    // to die with its parent.
    let parent = nix::unistd::getpid().as_raw();
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec, where only async-signal-safe calls are
    // allowed: prctl, signal and getppid are system calls that touch no memory of the parent's, and
    // io::Error::last_os_error allocates nothing. The task process forks only here, and the
    // stderr threads it may run by now never reach the child (fork copies the calling thread
    // only, which execs at once).
    unsafe {
        command.pre_exec(move || {
            // The handler must not outlive its task process (killed for task_timeout, or
            // stopped): SIGKILL, since a handler may ignore SIGTERM.
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // taskd ignores SIGXFSZ (see `signals::ignore_file_size_signal`); an ignored
            // signal stays ignored across exec, and the handler gets the default.
            nix::libc::signal(nix::libc::SIGXFSZ, nix::libc::SIG_DFL);
            // The task process may have died before prctl: then nothing would kill us.
            if nix::libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = child.id();
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(io::Error::other("its pipes were not set up"));
    };
    let kind_name = kind.to_string();
    // A thread, not the task process's poll loop: the task process blocks in the handler's
    // answer while a job runs, and the handler may write much on stderr meanwhile (a full
    // pipe would stall it). The thread only reads and logs; it ends at the pipe's end, when
    // the handler exits.
    let logger = std::thread::Builder::new().name(format!("handler-{kind}")).spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader).take(MAX_LOG_LINE).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    // Debug-quoted: a control byte from the handler cannot forge a log line.
                    tracing::warn!("handler {kind_name} (pid {pid}) says: {text:?}");
                }
            }
        }
    });
    if let Err(e) = logger {
        let _ = child.kill();
        let _ = child.wait();
        return Err(io::Error::other(format!("cannot start the thread that logs its stderr: {e}")));
    }
    Ok(Running {
        child,
        stdin: BufWriter::new(stdin),
        stdout: BufReader::new(stdout),
        jobs: 0,
        started: Instant::now(),
        ahead: VecDeque::new(),
        ahead_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_short_words_and_commands_split_into_words() {
        for ok in ["resize", "pdf_render", "mail-v2", "email"] {
            check_type(ok).unwrap();
        }
        for bad in ["", "Resize", "9x", "a b", "batch", "result", "stats", &"x".repeat(33), "é"] {
            assert!(check_type(bad).is_err(), "{bad}");
        }
        assert_eq!(split_command("python3  /srv/a.py -v").unwrap(), ["python3", "/srv/a.py", "-v"]);
        assert_eq!(split_command(r#"sh -c 'echo "a b"; cat'"#).unwrap(), ["sh", "-c", r#"echo "a b"; cat"#]);
        assert_eq!(split_command("a ''").unwrap(), ["a", ""]);
        assert!(split_command("  ").is_err());
        assert!(split_command("sh -c 'x").unwrap_err().contains("unclosed"));
        assert_eq!(parse_spec("resize=python3 r.py").unwrap(), ("resize".into(), "python3 r.py".into()));
        assert!(parse_spec("resize").unwrap_err().contains("TYPE=COMMAND"));
        assert!(parse_spec("resize=").is_err());
        assert!(parse_spec("Bad=x").is_err());
    }

    #[test]
    fn answers_are_read_strictly() {
        assert_eq!(read_answer(br#"{"task_id":7,"result":{"ok":1}}"#, 7), Ok(Outcome::Done(json!({"ok":1}))));
        assert_eq!(
            read_answer(br#"{"task_id":7,"error":"no disk","retry":true}"#, 7),
            Ok(Outcome::Again("handler: no disk".into()))
        );
        assert_eq!(
            read_answer(br#"{"task_id":7,"error":"bad input","retry":false}"#, 7),
            Ok(Outcome::Failed("handler: bad input".into()))
        );
        assert!(read_answer(br#"{"task_id":8,"result":1}"#, 7).unwrap_err().contains("task_id 8"));
        assert!(read_answer(b"hello\n", 7).unwrap_err().contains("not a JSON answer"));
        assert!(read_answer(br#"{"result":1}"#, 7).unwrap_err().contains("no \"task_id\""));
        assert!(read_answer(br#"{"task_id":7}"#, 7).unwrap_err().contains("neither"));
        assert!(read_answer(br#"{"task_id":7,"error":"x","retry":"yes"}"#, 7).is_err());
    }

    #[test]
    fn a_handler_runs_jobs_and_is_recycled() {
        let script = "while read line; do id=${line#*\\\"task_id\\\":}; id=${id%%,*}; \
                      echo \"{\\\"task_id\\\":$id,\\\"result\\\":$$}\"; done";
        let config = BTreeMap::from([("echo".to_string(), format!("sh -c '{script}'"))]);
        let mut handlers = Handlers::new(&config, 2);
        let pid = |o: Outcome| match o {
            Outcome::Done(v) => v.as_u64().unwrap(),
            other => panic!("{other:?}"),
        };
        let a = pid(handlers.run("echo", 1, 1, &json!({"type": "echo"})));
        let b = pid(handlers.run("echo", 2, 1, &json!({"type": "echo"})));
        let c = pid(handlers.run("echo", 3, 1, &json!({"type": "echo"})));
        assert_eq!(a, b);
        assert_ne!(b, c, "handler_max_jobs 2 starts a new handler for the third job");
        let missing = BTreeMap::from([("x".to_string(), "/nonexistent/handler".to_string())]);
        let mut handlers = Handlers::new(&missing, 0);
        match handlers.run("x", 1, 1, &json!({})) {
            Outcome::Failed(why) => assert!(why.contains("cannot start"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_handler_failing_at_start_waits_longer_each_time() {
        let ms = |n| restart_wait(n).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(6), ms(40)], [50, 100, 200, 1600, 2000]);
    }

    #[test]
    fn jobs_written_ahead_are_answered_in_order() {
        let script = "while read line; do id=${line#*\\\"task_id\\\":}; id=${id%%,*}; \
                      echo \"{\\\"task_id\\\":$id,\\\"result\\\":$id}\"; done";
        let config = BTreeMap::from([("echo".to_string(), format!("sh -c '{script}'"))]);
        let mut handlers = Handlers::new(&config, 0);
        let job = json!({"type": "echo"});
        assert_eq!(handlers.run("echo", 1, 1, &job), Outcome::Done(json!(1)));
        for id in 2..=5 {
            handlers.send_ahead("echo", id, 1, &job);
        }
        assert_eq!(handlers.running["echo"].ahead.len(), 4);
        for id in 2..=5 {
            assert_eq!(handlers.run("echo", id, 1, &job), Outcome::Done(json!(id)));
        }
        // Run out of the order written: a new handler, and each job gets its own answer.
        handlers.send_ahead("echo", 6, 1, &job);
        handlers.send_ahead("echo", 7, 1, &job);
        assert_eq!(handlers.run("echo", 7, 1, &job), Outcome::Done(json!(7)));
        assert_eq!(handlers.run("echo", 6, 1, &job), Outcome::Done(json!(6)));
        // handler_max_jobs bounds what is written ahead: the rest is written when it runs.
        let mut handlers = Handlers::new(&config, 3);
        assert_eq!(handlers.run("echo", 1, 1, &job), Outcome::Done(json!(1)));
        for id in 2..=5 {
            handlers.send_ahead("echo", id, 1, &job);
        }
        assert_eq!(handlers.running["echo"].ahead.len(), 1, "one more before the third job ends it");
    }
}
