//! The harness of the integration tests: the real `taskd` binary on port 0, talked to over
//! real TCP. A `Daemon` kills its whole process group and reaps it when dropped, also when a
//! test fails (and then prints the daemon's log).

#![allow(dead_code)]

pub mod durable;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous: the suite runs on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub pid: u32,
    pub dir: tempfile::TempDir,
    pub outbox: PathBuf,
    log_path: PathBuf,
    /// The metrics endpoint, when started with `--metrics-addr`.
    pub metrics_addr: Option<SocketAddr>,
    /// The WebSocket port, when started with `--ws-port`.
    pub ws_addr: Option<SocketAddr>,
}

/// Orphaned pool processes (a killed master's) come to the test process to be reaped,
/// instead of lingering as zombies under an init that does not reap.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = nix::sys::prctl::set_child_subreaper(true);
    });
}

impl Daemon {
    /// Starts `taskd --port 0` with a private outbox and `args`; waits for its address.
    pub fn start(args: &[&str]) -> Daemon {
        Self::try_start(args).unwrap_or_else(|(status, log)| panic!("taskd did not start ({status}):\n{log}"))
    }

    /// Like `start`, but returns the exit status and log if it exits instead of listening.
    pub fn try_start(args: &[&str]) -> Result<Daemon, (String, String)> {
        Self::start_env(args, &[])
    }

    /// Starts one of the crate's examples (built by `cargo test`) that runs a server.
    pub fn start_example(name: &str, args: &[&str]) -> Daemon {
        let bin = Path::new(env!("CARGO_BIN_EXE_taskd")).parent().unwrap().join("examples").join(name);
        Self::start_program(&bin, args, &[])
            .unwrap_or_else(|(status, log)| panic!("example {name} did not start ({status}):\n{log}"))
    }

    /// Like `try_start`, with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Result<Daemon, (String, String)> {
        Self::start_program(Path::new(env!("CARGO_BIN_EXE_taskd")), args, env)
    }

    fn start_program(
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon, (String, String)> {
        let is_taskd = program == Path::new(env!("CARGO_BIN_EXE_taskd"));
        become_subreaper();
        let dir = tempfile::tempdir().expect("temp dir");
        // A test may name its own outbox.
        let outbox = match args.iter().position(|&a| a == "--outbox") {
            Some(i) => PathBuf::from(args[i + 1]),
            None => dir.path().join("outbox.log"),
        };
        let log_path = dir.path().join("taskd.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(program);
        cmd.args(["--port", "0"]);
        if is_taskd && !args.contains(&"--outbox") {
            cmd.arg("--outbox").arg(&outbox);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        let mut child = cmd.spawn().expect("spawn taskd");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        // Other listeners get a line each, after the first.
        let extra = args.contains(&"--metrics-addr") as usize + args.contains(&"--ws-port") as usize;
        let lines_rx = first_lines(stdout, extra + 1);
        let started = Instant::now();
        let next_line = || lines_rx.recv_timeout(DEADLINE.saturating_sub(started.elapsed())).ok();
        let first = next_line();
        let (mut metrics_addr, mut ws_addr) = (None, None);
        for _ in 0..extra {
            let line = next_line().unwrap_or_default();
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("taskd metrics on http://") {
                metrics_addr = rest.strip_suffix("/metrics").and_then(|s| s.parse().ok());
            }
            if let Some(rest) = line.strip_prefix("taskd websocket on ws://") {
                ws_addr = rest.split('/').next().and_then(|s| s.parse().ok());
            }
        }
        let mut daemon = Daemon {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            pid,
            dir,
            outbox,
            log_path,
            metrics_addr,
            ws_addr,
        };
        // Dropped on this error, `daemon` kills whatever did start.
        let Some(first) = first else {
            return Err((format!("no first stdout line within {DEADLINE:?}"), daemon.log()));
        };
        // A WebSocket-only server announces that first.
        if let Some(rest) = first.trim().strip_prefix("taskd websocket on ws://") {
            daemon.ws_addr = rest.split('/').next().and_then(|s| s.parse().ok());
            if let Some(addr) = daemon.ws_addr {
                daemon.addr = addr;
                return Ok(daemon);
            }
        }
        match first.trim().strip_prefix("taskd listening on ") {
            Some(addr) => {
                daemon.addr = addr.parse().expect("address on the first stdout line");
                Ok(daemon)
            }
            None => {
                let status = daemon.wait_exit(DEADLINE).map(|s| s.to_string()).unwrap_or_default();
                Err((format!("first stdout line {first:?}, {status}"), daemon.log()))
            }
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns the log.
    pub fn wait_log(&self, needle: &str) -> String {
        let log = wait_for(&format!("log line {needle:?}"), || {
            let log = self.log();
            log.contains(needle).then_some(log)
        });
        log
    }

    /// The outbox's lines, each of which must be JSON: for a test that kills no task process
    /// (one killed inside its write leaves part of a line).
    pub fn outbox_lines(&self) -> Vec<Value> {
        let bytes = std::fs::read(&self.outbox).unwrap_or_default();
        // A line not ended yet is one being written while this reads (a test polls while task
        // processes append): it is read whole the next time.
        let end = bytes.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let text = String::from_utf8(bytes[..end].to_vec()).expect("the outbox's whole lines are UTF-8");
        text.lines()
            // Each write of a burst's lines starts with a newline (see the README's outbox).
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("outbox line is JSON"))
            .collect()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig);
    }

    /// Waits for the master to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// The live processes of this daemon: (pid, ppid, args) of the master's descendants.
    pub fn tree(&self) -> Vec<Proc> {
        let all = processes();
        let mut out: Vec<Proc> = Vec::new();
        let mut parents = vec![self.pid];
        while let Some(parent) = parents.pop() {
            for p in all.iter().filter(|p| p.ppid == parent && p.alive()) {
                parents.push(p.pid);
                out.push(p.clone());
            }
        }
        out
    }

    /// Pids of live processes of this daemon whose title starts with `title`.
    pub fn pids_of(&self, title: &str) -> Vec<u32> {
        self.tree().into_iter().filter(|p| p.args.starts_with(title)).map(|p| p.pid).collect()
    }

    /// Waits until the pool is complete: a manager, `workers` workers and `tasks` task processes.
    pub fn wait_pool(&self, workers: usize, tasks: usize) -> Vec<Proc> {
        wait_for("the full pool", || {
            let tree = self.tree();
            let count = |t: &str| tree.iter().filter(|p| p.args.starts_with(t)).count();
            (count("taskd: manager") == 1
                && count("taskd: worker") == workers
                && count("taskd: task") == tasks)
                .then_some(tree)
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let group: Vec<u32> = processes().into_iter().filter(|p| p.pgid == self.pid).map(|p| p.pid).collect();
        let _ =
            nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The pool comes to this (subreaper) process once its parents are gone: reap it here,
        // or it would linger as zombies once the test binary exits.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            reap_orphans(&group);
            let lingering = group.iter().filter_map(|&pid| proc_info(pid)).any(|p| p.ppid != 1 || p.alive());
            if !lingering {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if std::thread::panicking() {
            eprintln!("----- taskd log -----\n{}\n---------------------", self.log());
        }
    }
}

/// Reaps those of `pids` that are exited children of this test process (the pool processes of
/// a killed master, re-parented to us). Only a daemon's own pids: another test's `Child` must
/// keep its exit status.
pub fn reap_orphans(pids: &[u32]) {
    let me = std::process::id();
    for &pid in pids {
        if proc_info(pid).is_some_and(|p| p.ppid == me && !p.alive()) {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub state: char,
    /// What `ps -o comm` shows.
    pub comm: String,
    /// What `ps -o args` shows.
    pub args: String,
}

impl Proc {
    pub fn alive(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

/// Every process on the machine, from /proc.
pub fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Some(p) = proc_info(pid) {
            out.push(p);
        }
    }
    out
}

pub fn proc_info(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let mut fields = stat[close + 2..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args =
        String::from_utf8_lossy(&cmdline).split('\0').filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
    Some(Proc { pid, ppid, pgid, state, comm, args })
}

/// Whether `pid` is gone (or a zombie: dead, not reaped yet).
pub fn is_dead(pid: u32) -> bool {
    proc_info(pid).is_none_or(|p| !p.alive())
}

/// `GET path` over HTTP/1.1; the whole response.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: taskd\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Polls `check` until it returns something, or panics after `DEADLINE`.
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that speaks the line protocol, as `nc` would.
pub struct Client {
    /// One descriptor per client (10,000 of them must fit the open-file limit): written
    /// through the reader's inner stream.
    reader: BufReader<TcpStream>,
    /// The server closed the connection (seen by a read).
    eof: bool,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(TcpStream::connect(addr).expect("connect to taskd"))
    }

    /// A client over a connection made (and perhaps written to or shut down) already.
    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        Client { reader: BufReader::new(stream), eof: false }
    }

    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.reader.get_ref().write_all(bytes).expect("write to taskd");
    }

    /// Ends the client's side; replies can still be read.
    pub fn shutdown_write(&mut self) {
        self.reader.get_ref().shutdown(Shutdown::Write).unwrap();
    }

    /// The next reply line as JSON; panics at EOF or after `DEADLINE`.
    pub fn recv(&mut self) -> Value {
        match self.try_recv(DEADLINE) {
            Some(v) => v,
            None => panic!("no reply within {DEADLINE:?} (or the connection closed)"),
        }
    }

    /// The next reply line, or None at EOF or after `limit`.
    pub fn try_recv(&mut self, limit: Duration) -> Option<Value> {
        self.reader.get_ref().set_read_timeout(Some(limit)).unwrap();
        let mut line = String::new();
        let got = self.reader.read_line(&mut line);
        self.reader.get_ref().set_read_timeout(Some(DEADLINE)).unwrap();
        match got {
            Ok(0) => {
                self.eof = true;
                None
            }
            Ok(_) => Some(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}")),
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                self.eof = true;
                None
            }
            Err(e) => panic!("read from taskd: {e}"),
        }
    }

    /// Whether a read has already seen the server close the connection.
    pub fn closed_by_server_now(&self) -> bool {
        self.eof
    }

    /// Whether the server closed the connection (EOF) within the deadline.
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Sends a job and returns its `accepted` reply.
    pub fn submit(&mut self, line: &str) -> Value {
        self.send(line);
        let reply = self.recv();
        assert_eq!(reply["event"], "accepted", "{line} -> {reply}");
        reply
    }

    /// Submits `job` (which has a deduplication key) until it is no longer a duplicate, each
    /// duplicate answered with `done` (its first job's final line): the last `accepted`, and
    /// the line after it.
    pub fn submit_until_not_duplicate(&mut self, job: &str, done: &Value) -> (Value, Value) {
        wait_for("the key to be free after dedup_ttl", || {
            let accepted = self.submit(job);
            match self.recv() {
                r if r["event"] == "duplicate" => {
                    assert_eq!(&self.recv(), done);
                    None
                }
                r => Some((accepted, r)),
            }
        })
    }

    /// Reads replies until the `done` or `failed` of `task_id`, returning it; other lines are
    /// collected in `others`.
    pub fn final_reply(&mut self, task_id: &Value, others: &mut Vec<Value>) -> Value {
        loop {
            let reply = self.recv();
            if &reply["task_id"] == task_id && (reply["event"] == "done" || reply["event"] == "failed") {
                return reply;
            }
            others.push(reply);
        }
    }
}

// ----- Commands with a deadline, tests that cannot run, and evidence from /proc and the log -----

/// Runs `cmd` to completion with its output collected, as `Command::output` does, but kills
/// it (and its process group) after `limit` and panics saying so: a command that hangs fails
/// its test instead of hanging the suite.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    // Both pipes are drained as the command runs, so that a full pipe cannot block it.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            let _ = tx.send(out);
        });
        rx
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::SIGKILL,
            );
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
            panic!(
                "{shown} did not finish within {limit:?}; killed. Its stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A process it left behind (a daemon) must not hold the pipes open: taskd's detaches from
    // them. Collect what was written, within what is left of the deadline.
    let rest = || limit.saturating_sub(start.elapsed()).max(Duration::from_secs(1));
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>, name: &str| {
        rx.recv_timeout(rest()).unwrap_or_else(|_| {
            panic!("{shown} exited ({status}) but something it started holds its {name} open")
        })
    };
    let stdout = collect(stdout, "stdout");
    let stderr = collect(stderr, "stderr");
    std::process::Output { status, stdout, stderr }
}

/// Where `name` is found on PATH, as the shell's `command -v` (and `.ci/run`) finds it.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// What a test that cannot run here calls (its tool is missing, or it needs root): it panics,
/// naming what is missing and how to get it, unless `TASKD_TEST_ALLOW_SKIP` (a comma-separated
/// list: `redis`, `browser`, `root`) names `key`. Then the test is skipped, never silently:
/// a line on the terminal at once (past the harness's output capture), and the list of skipped
/// tests again once the test binary has printed its summary. The caller returns after this.
pub fn cannot_run(key: &str, why: &str) {
    let allowed = std::env::var("TASKD_TEST_ALLOW_SKIP")
        .unwrap_or_default()
        .split(',')
        .any(|k| k.trim() == key || k.trim() == "all");
    if !allowed {
        panic!(
            "{why}. `bash .ci/run` installs what the tests need; to skip such tests knowingly, set \
             TASKD_TEST_ALLOW_SKIP={key} (the skips are listed after the summary)"
        );
    }
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    // Straight to the terminal: the harness captures `eprintln!` of a test that passes.
    let _ = writeln!(std::io::stderr(), "\nSKIPPED, NOT PASSED: {test}: {why}");
    let mut skipped = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if skipped.is_empty() {
        extern "C" {
            fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
        }
        // SAFETY: registers a plain function with the C library, to run at exit; it only
        // locks a static and writes to stderr.
        unsafe { atexit(print_skipped) };
    }
    skipped.push(test);
}

static SKIPPED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Runs at exit, after the harness's `test result:` line: the skips, counted.
extern "C" fn print_skipped() {
    let skipped = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED, NOT PASSED (TASKD_TEST_ALLOW_SKIP): {} test(s) of this binary did not run: {}\n",
        skipped.len(),
        skipped.join(", ")
    );
}

/// The name of the current test, unique per test in this process: put in the environment of
/// what a test starts (`tag`), it finds every process started from there, detached or not.
fn test_token() -> String {
    format!("{}:{}", std::process::id(), std::thread::current().name().unwrap_or("main"))
}

/// Marks `cmd` (and everything it starts, which inherits its environment) as the current
/// test's, for `Leftovers`.
pub fn tag(cmd: &mut Command) -> &mut Command {
    cmd.env("TASKD_TEST_TOKEN", test_token())
}

/// Kills, when dropped, every process the current test started with `tag`: also a daemon that
/// detached into its own session, and one that should have refused to start but did not.
pub struct Leftovers {
    token: String,
}

impl Leftovers {
    /// Create it before the first command it guards.
    pub fn guard() -> Leftovers {
        become_subreaper();
        Leftovers { token: test_token() }
    }

    /// The live processes tagged by this test.
    pub fn pids(&self) -> Vec<u32> {
        let needle = format!("TASKD_TEST_TOKEN={}", self.token);
        processes()
            .into_iter()
            .filter(|p| p.alive() && p.pid != std::process::id())
            .filter(|p| {
                std::fs::read(format!("/proc/{}/environ", p.pid))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
            })
            .map(|p| p.pid)
            .collect()
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let pids = self.pids();
        for &pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            reap_orphans(&pids);
            if pids.iter().all(|&p| proc_info(p).is_none_or(|i| i.ppid != std::process::id() && !i.alive())) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The time of a log line (`2026-12-01T05:02:27.673967Z  INFO …`), in seconds since the epoch.
pub fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|s| s.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, s) =
        (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + s)
}

/// Whether `pid` is asleep in `nanosleep` (a job's simulated work), per its kernel wait channel.
pub fn in_nanosleep(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
}

/// One TCP socket of the machine's table (/proc/net/tcp, tcp6).
#[derive(Debug, Clone, Copy)]
pub struct TcpSocket {
    pub inode: u64,
    /// Bytes sent and not acknowledged by the other end yet.
    pub tx_queue: u64,
    /// Bytes received and not read yet by the socket's owner.
    pub rx_queue: u64,
}

/// The socket whose local end is `local` and remote end is `remote`.
pub fn tcp_socket(local: SocketAddr, remote: SocketAddr) -> Option<TcpSocket> {
    // Addresses are hex: IPv4 as one little-endian word; the port big-endian.
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => {
            format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), a.port())
        }
        SocketAddr::V6(v6) => {
            let words: String = v6
                .ip()
                .octets()
                .chunks(4)
                .map(|c| format!("{:08X}", u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            format!("{words}:{:04X}", a.port())
        }
    };
    let (l, r) = (hex(local), hex(remote));
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[1] != l || f[2] != r {
                return None;
            }
            let (tx, rx) = f[4].split_once(':')?;
            let (tx_queue, rx_queue) = (u64::from_str_radix(tx, 16).ok()?, u64::from_str_radix(rx, 16).ok()?);
            Some(TcpSocket { inode: f[9].parse().ok()?, tx_queue, rx_queue })
        })
    })
}

/// The descriptor under which `pid` holds the socket `inode`.
pub fn socket_fd(pid: u32, inode: u64) -> Option<u32> {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten().find_map(|e| {
        let target = std::fs::read_link(e.path()).ok()?;
        (target.to_str()? == want).then(|| e.file_name().to_str()?.parse().ok())?
    })
}

impl Client {
    /// This client's end of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.reader.get_ref().local_addr().expect("local address")
    }

    /// Closes the connection with a reset (SO_LINGER 0), as a client that crashed or was cut
    /// off by the network: the server sees it gone at once, not a half-close to answer.
    pub fn abort(self) {
        let linger = nix::libc::linger { l_onoff: 1, l_linger: 0 };
        nix::sys::socket::setsockopt(self.reader.get_ref(), nix::sys::socket::sockopt::Linger, &linger)
            .expect("SO_LINGER");
    }

    /// The daemon's end of the connection.
    pub fn peer_addr(&self) -> SocketAddr {
        self.reader.get_ref().peer_addr().expect("peer address")
    }
}

/// What the browser tests run: Debian's chromium and node, found on PATH as `.ci/run` finds
/// (or installs) them, and playwright-core in `target/browser-test`. Fails the test (through
/// [`cannot_run`]) when one is missing, unless the skip is allowed: then `None`.
pub struct Browser {
    pub chromium: PathBuf,
    pub node: PathBuf,
    pub modules: PathBuf,
}

pub fn browser() -> Option<Browser> {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-test/node_modules");
    if let (Some(chromium), Some(node), true) =
        (which("chromium"), which("node"), modules.join("playwright-core").exists())
    {
        return Some(Browser { chromium, node, modules });
    }
    cannot_run(
        "browser",
        "the browser tests need Debian's chromium and node on PATH and playwright-core in \
         target/browser-test (apt-get install chromium nodejs npm; \
         npm install --prefix target/browser-test playwright-core@1)",
    );
    None
}

/// The first `n` lines a child prints, as they come. A pipe has no read timeout: a thread reads
/// them (then keeps draining the pipe, so that the child never blocks on it) and the caller
/// waits on the receiver with a deadline.
pub fn first_lines(stdout: std::process::ChildStdout, n: usize) -> std::sync::mpsc::Receiver<String> {
    let mut stdout = BufReader::new(stdout);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..n {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
        }
        let _ = stdout.read_to_end(&mut Vec::new());
    });
    rx
}
