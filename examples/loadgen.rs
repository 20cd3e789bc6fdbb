//! A load generator for taskd: how many jobs per second, at what latency, for what CPU and memory.
//!
//! ```text
//! cargo build --release --examples
//! target/release/examples/loadgen                          start target/release/taskd, 8 conns × 64, 5 s
//! target/release/examples/loadgen --conns 1 --window 1     one job at a time: the round trip
//! target/release/examples/loadgen --matrix                 the README table: 1/8/64 conns × window 1/64
//! target/release/examples/loadgen --taskd-arg=--worker-num=1 --taskd-arg=--task-worker-num=1
//! target/release/examples/loadgen --addr 127.0.0.1:9501 [--pid MASTER_PID]   a running daemon
//! target/release/examples/loadgen --job-type noop --taskd-arg=--handler=noop='python3 benches/noop_handler.py'
//! ```
//!
//! By default it starts the real binary (`target/release/taskd`, or `--taskd PATH`) with
//! `--port 0 --simulate-ms 0 --outbox <tmpfile> --log-file <tmpfile>` and any `--taskd-arg`
//! flags: the default configuration (info logging, to a file as a service would), whose per-job
//! lines are part of the cost; `--taskd-arg=--log-level=warn` measures without them. It reads
//! the daemon's first stdout line (`taskd listening on ADDR`), and stops it at the end
//! (SIGTERM, then wait), also on an error or Ctrl-C: a guard does it when it is dropped. A
//! reader that stops reading the report (`loadgen | head -1`) is no error: it exits 0, quietly.
//!
//! Each of `--conns` connections pipelines bare-address jobs (`user{i}@example.com\n`) with at
//! most `--window` of them outstanding. Every job gets an `accepted` line, then a `done` line;
//! an `error` line is a request that will get no `done`, and a `failed` line ends a job without
//! `done`: both count as errors. After `--warmup` seconds, the run counts for `--seconds`:
//! jobs/s is the number of `done` lines that arrived in that time divided by it, and a job's
//! latency runs from the write that sent it to the read that brought its `done` (the `to`
//! address names the job, so no second lookup through `task_id` is needed). With
//! `--accepted-latency` it also reports when `accepted` lines came (their latency from the send,
//! the time from a job's `accepted` to its `done`, and how many `done` lines came in the same
//! read as their `accepted`: one reply segment for both, as far as the client can tell). With `--job-type
//! TYPE` a job is `{"type":"TYPE","to":"user{i}@example.com"}` instead, for a handler
//! (`--handler`), whose result must carry the `"to"` back (`{"to":…}`). Then the clients
//! stop sending and wait for every job still outstanding, so the next run starts clean.
//!
//! When it started the daemon itself (or got its master's `--pid`) it also reports the CPU time
//! of every taskd process (utime + stime, plus that of reaped children, from /proc/PID/stat of
//! the master and all its descendants, read at the start and the end of the counted time)
//! per job, and each process's VmRSS idle (before the first run) and at the end of the run.
//!
//! It also reports how busy the whole machine was (/proc/stat) and, of that, what neither taskd
//! nor the client used: other people's processes make a run noisy, and this says so. (The
//! kernel samples /proc/stat per tick, so with many short sleeps, at window 1, it reads low;
//! under load it is close.)
//!
//! The client shares the machine with the daemon, so it is kept cheap: `--threads` (default 1)
//! threads, each running a mio (epoll) loop over its share of the connections; requests are
//! written in one `write` per refill, replies are read into one 64 kB buffer per thread and scanned in place
//! for `"event":"…"` and `"to":"user…@` without building any JSON value or String. Its own
//! CPU time per job is reported too, so a saturated client can be told apart from a slow
//! server.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream as StdTcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use memchr::memmem;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// A line on stderr. Not `eprintln!`, which panics when stderr is a pipe nobody reads any more
/// (`loadgen 2>&1 | head -1`): a panic on the way out of a run would skip the end of it, and
/// a note is not worth one.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

/// Linux reports /proc CPU times in USER_HZ ticks, 100 per second on every architecture.
const TICKS_PER_SEC: f64 = 100.0;

/// The README table: connections × window.
const MATRIX: [(usize, usize); 6] = [(1, 1), (1, 64), (8, 1), (8, 64), (64, 1), (64, 64)];

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Load generator for taskd: jobs/s, latency, CPU and RSS")]
struct Args {
    /// Connect to a running taskd at HOST:PORT instead of starting one.
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// With --addr: the master's pid, to report CPU and RSS of its process tree.
    #[arg(long, value_name = "PID", requires = "addr")]
    pid: Option<i32>,
    /// The taskd binary to start [default: target/release/taskd].
    #[arg(long, value_name = "PATH", conflicts_with = "addr")]
    taskd: Option<PathBuf>,
    /// An extra flag for the taskd it starts (repeatable), e.g. --taskd-arg=--worker-num=1.
    #[arg(long = "taskd-arg", value_name = "FLAG", allow_hyphen_values = true, conflicts_with = "addr")]
    taskd_args: Vec<String>,
    /// Client connections.
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Jobs outstanding (sent, no `done` yet) per connection at most.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Length of the counted run, in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Load before the counted run starts, in seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Run the README table instead: conns 1/8/64 × window 1/64 against one daemon.
    #[arg(long)]
    matrix: bool,
    /// Length of each counted run of --matrix, in seconds.
    #[arg(long, default_value_t = 3.0)]
    matrix_seconds: f64,
    /// Client threads (the connections are spread over them).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Give up when no reply comes for this many seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also measure when each job's `accepted` line arrives: its latency from the send, the
    /// time from it to the job's `done`, and how many `done` lines came in the same read as
    /// their `accepted` (one reply segment for both). Costs the client a lookup per line.
    #[arg(long)]
    accepted_latency: bool,
    /// Send `{"type":TYPE,"to":"user{i}@example.com"}` jobs (for a handler whose result is
    /// `{"to":…}`, the job's own) instead of bare addresses.
    #[arg(long, value_name = "TYPE")]
    job_type: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = install_sigint_handler() {
        note!("loadgen: cannot handle SIGINT: {e}");
    }
    match run_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note!("loadgen: {e}");
            ExitCode::from(if INTERRUPTED.load(Ordering::SeqCst) { 130 } else { 1 })
        }
    }
}

fn run_main(args: &Args) -> Result<(), String> {
    if args.conns == 0 || args.window == 0 || args.threads == 0 {
        return Err("--conns, --window and --threads must be at least 1".into());
    }
    for (name, v) in
        [("--seconds", args.seconds), ("--warmup", args.warmup), ("--matrix-seconds", args.matrix_seconds)]
    {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("{name} must be a number of seconds ≥ 0"));
        }
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err("--timeout must be a number of seconds > 0".into());
    }
    // The guard stops the daemon when it goes out of scope, on every path out of here.
    let daemon = match &args.addr {
        Some(_) => None,
        None => Some(Daemon::start(args)?),
    };
    let addr = match (&args.addr, &daemon) {
        (Some(a), _) => a.clone(),
        (None, Some(d)) => d.addr.clone(),
        (None, None) => unreachable!(),
    };
    let master = daemon.as_ref().map(|d| d.child.id() as i32).or(args.pid);
    let taskd_path = daemon.as_ref().map(|d| d.path.display().to_string());

    // Let the pool settle before the idle figures are taken.
    if master.is_some() {
        sleep_checked(Duration::from_millis(300))?;
    }
    let rss_idle = master.map(rss_of_tree);

    let timeout = Duration::from_secs_f64(args.timeout);
    let warmup = Duration::from_secs_f64(args.warmup);
    if args.matrix {
        let counted = Duration::from_secs_f64(args.matrix_seconds);
        let mut cells = Vec::new();
        for &(conns, window) in &MATRIX {
            let line = request_line(args);
            let accepted_latency = args.accepted_latency;
            let cfg = RunCfg {
                conns,
                window,
                warmup,
                counted,
                threads: args.threads,
                timeout,
                line,
                accepted_latency,
            };
            let r = run(&addr, &cfg, master)?;
            if !args.json {
                note!("{}", r.summary());
            }
            cells.push(r);
            sleep_checked(Duration::from_millis(200))?;
        }
        let mut out = io::stdout().lock();
        let printed = report_matrix(&mut out, args, &addr, taskd_path, &cells, rss_idle.as_deref());
        report(&mut out, printed)?;
    } else {
        let cfg = RunCfg {
            conns: args.conns,
            window: args.window,
            warmup,
            counted: Duration::from_secs_f64(args.seconds),
            threads: args.threads,
            timeout,
            line: request_line(args),
            accepted_latency: args.accepted_latency,
        };
        let r = run(&addr, &cfg, master)?;
        let mut out = io::stdout().lock();
        let printed = if args.json {
            let mut v = r.to_json();
            v["addr"] = json!(addr);
            v["taskd"] = json!(taskd_path);
            v["taskd_args"] = json!(args.taskd_args);
            v["rss_idle"] = rss_json(rss_idle.as_deref());
            writeln!(out, "{v}")
        } else {
            writeln!(out, "{}", r.summary()).and_then(|()| match (&rss_idle, &r.rss_end) {
                (Some(idle), Some(end)) => print_rss(&mut out, idle, end, "end of run"),
                _ => Ok(()),
            })
        };
        report(&mut out, printed)?;
    }
    drop(daemon);
    Ok(())
}

/// What printing the report came to. Whoever reads it may stop before its end (`loadgen |
/// head -1`): a closed stdout is no error, the run is over and the daemon stops as after any
/// run (the caller's guard). Anything else is one, with what failed.
fn report(out: &mut impl Write, printed: io::Result<()>) -> Result<(), String> {
    match printed.and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("cannot write the report to stdout: {e}")),
        Ok(()) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_sigint_handler() -> nix::Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_sigint), SaFlags::SA_RESTART, SigSet::empty());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { sigaction(Signal::SIGINT, &action) }.map(|_| ())
}

fn interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Sleeps, but returns early with an error on Ctrl-C.
fn sleep_checked(d: Duration) -> Result<(), String> {
    sleep_until_checked(Instant::now() + d)
}

fn sleep_until_checked(deadline: Instant) -> Result<(), String> {
    loop {
        interrupted()?;
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon it starts

/// A taskd started by the load generator; dropping it stops it (SIGTERM, wait, SIGKILL if it
/// does not go within 10 s) and removes its outbox and log.
struct Daemon {
    child: Child,
    path: PathBuf,
    addr: String,
    outbox: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(args: &Args) -> Result<Daemon, String> {
        let path = match &args.taskd {
            Some(p) => p.clone(),
            None => {
                let local = PathBuf::from("target/release/taskd");
                if local.exists() {
                    local
                } else {
                    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/taskd"))
                }
            }
        };
        if !path.exists() {
            return Err(format!("{} does not exist: run `cargo build --release` first", path.display()));
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let outbox = std::env::temp_dir().join(format!(
            "taskd-loadgen-{}-{}.outbox",
            std::process::id(),
            nanos.subsec_nanos()
        ));
        let mut cmd = Command::new(&path);
        let log = outbox.with_extension("log");
        cmd.args(["--port", "0", "--simulate-ms", "0", "--outbox"])
            .arg(&outbox)
            .arg("--log-file")
            .arg(&log)
            .args(&args.taskd_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: Ctrl-C reaches only the load generator, whose guard then
            // stops the daemon and waits for it.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe system call (prctl). The daemon gets SIGTERM if the load generator
        // dies without running its guard (kill -9).
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from));
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", path.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        // The guard exists from here on, so every error below stops the daemon.
        let mut daemon = Daemon { child, path, addr: String::new(), outbox, log };

        // Read the first line in a thread, so that a daemon that never prints is noticed; then
        // keep forwarding its stdout (other listeners' lines) to stderr, so it never gets EPIPE.
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let _ = tx.send(reader.read_line(&mut first).map(|_| first));
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                let _ = write!(io::stderr(), "taskd stdout: {line}");
                line.clear();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            interrupted()?;
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(line)) => break line,
                Ok(Err(e)) => return Err(format!("reading taskd's stdout: {e}")),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err("taskd printed no `taskd listening on` line within 10 s".into())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err("taskd's stdout reader died".into()),
            }
        };
        let first = first.trim_end();
        match first.strip_prefix("taskd listening on ") {
            Some(addr) => daemon.addr = addr.trim().to_string(),
            None if first.is_empty() => {
                // Its stdout closed: it is exiting; give it a moment to be reaped.
                let deadline = Instant::now() + Duration::from_secs(2);
                let status = loop {
                    match daemon.child.try_wait() {
                        Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                        Ok(status) => break status,
                        Err(_) => break None,
                    }
                };
                return Err(match status {
                    Some(s) => format!("taskd exited before listening ({s})"),
                    None => "taskd closed its stdout before listening".into(),
                });
            }
            None => return Err(format!("unexpected first line from taskd: {first:?}")),
        }
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            note!("loadgen: taskd exited with {status}");
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                    _ => {
                        note!("loadgen: taskd did not stop within 10 s of SIGTERM; killing it");
                        let _ = self.child.kill();
                        let _ = self.child.wait();
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&self.outbox);
        let _ = std::fs::remove_file(&self.log);
    }
}

// ---------------------------------------------------------------------------------------------
// /proc: CPU time and RSS of the daemon's process tree

/// The fields of /proc/PID/stat after the command name: (ppid, utime+stime+cutime+cstime).
fn stat_of(pid: i32) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name ("taskd: worker 0") may hold spaces and parentheses: skip past the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11..15)?.iter().map(|s| s.parse::<u64>().unwrap_or(0)).sum();
    Some((ppid, ticks))
}

/// `root` and every process below it, root first.
fn tree(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some((ppid, _)) = stat_of(pid) {
                    parent_of.push((pid, ppid));
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let mut kids: Vec<i32> = parent_of.iter().filter(|&&(_, pp)| pp == p).map(|&(c, _)| c).collect();
        kids.sort_unstable();
        out.extend(kids);
        i += 1;
    }
    out
}

/// CPU ticks of the whole tree (live processes, plus children they have reaped).
fn cpu_ticks_of_tree(root: i32) -> u64 {
    tree(root).into_iter().filter_map(stat_of).map(|(_, t)| t).sum()
}

/// Busy ticks of all CPUs together: the first line of /proc/stat less idle and iowait.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next().and_then(|l| l.strip_prefix("cpu ")) else {
        return 0;
    };
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let f: Vec<u64> = cpu.split_whitespace().take(8).map(|v| v.parse().unwrap_or(0)).collect();
    f.iter().sum::<u64>() - f.get(3).copied().unwrap_or(0) - f.get(4).copied().unwrap_or(0)
}

fn own_cpu_ticks() -> u64 {
    stat_of(std::process::id() as i32).map(|(_, t)| t).unwrap_or(0)
}

#[derive(Clone, Debug)]
struct ProcMem {
    pid: i32,
    name: String,
    rss_kb: u64,
}

fn rss_of_tree(root: i32) -> Vec<ProcMem> {
    tree(root)
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let rss_kb = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            // taskd rewrites its argv to its role ("taskd: worker 0"); fall back to comm.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut name = String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string();
            if name.is_empty() {
                name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_string();
            }
            Some(ProcMem { pid, name, rss_kb })
        })
        .collect()
}

fn rss_json(list: Option<&[ProcMem]>) -> Value {
    match list {
        None => Value::Null,
        Some(l) => l.iter().map(|p| json!({"pid": p.pid, "name": p.name, "rss_kb": p.rss_kb})).collect(),
    }
}

fn print_rss(
    out: &mut impl Write,
    idle: &[ProcMem],
    loaded: &[ProcMem],
    loaded_label: &str,
) -> io::Result<()> {
    writeln!(out, "RSS (MB)                 idle  {loaded_label}")?;
    for p in idle {
        let after = loaded.iter().find(|q| q.pid == p.pid).map(|q| format!("{:6.1}", mb(q.rss_kb)));
        writeln!(out, "  {:<20} {:6.1}  {}", p.name, mb(p.rss_kb), after.as_deref().unwrap_or("  gone"))?;
    }
    for q in loaded.iter().filter(|q| !idle.iter().any(|p| p.pid == q.pid)) {
        writeln!(out, "  {:<20}    new  {:6.1}", q.name, mb(q.rss_kb))?;
    }
    Ok(())
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// One run

#[derive(Clone)]
struct RunCfg {
    conns: usize,
    window: usize,
    warmup: Duration,
    counted: Duration,
    threads: usize,
    timeout: Duration,
    /// What a request line is: `prefix`, the job's number, `suffix`.
    line: (Vec<u8>, Vec<u8>),
    /// `--accepted-latency`.
    accepted_latency: bool,
}

/// When the counted time starts and ends, shared by every client thread.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    end: Instant,
}

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    sent: u64,
    accepted: u64,
    done: u64,
    /// `done` lines that arrived in the counted time.
    done_counted: u64,
    errors: u64,
    failed: u64,
    /// Reply lines that were none of the above, or a `done` for no job of ours.
    unexpected: u64,
    /// Latency in ns of every job whose `done` arrived in the counted time.
    latencies: Vec<u64>,
    /// With `--accepted-latency`, of the jobs whose `done` arrived in the counted time: ns
    /// from the send to the `accepted`, ns from the `accepted` to the `done`, and how many
    /// came in the same read.
    accepted_latencies: Vec<u64>,
    done_gaps: Vec<u64>,
    same_read: u64,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.done += o.done;
        self.done_counted += o.done_counted;
        self.errors += o.errors;
        self.failed += o.failed;
        self.unexpected += o.unexpected;
        self.latencies.extend(o.latencies);
        self.accepted_latencies.extend(o.accepted_latencies);
        self.done_gaps.extend(o.done_gaps);
        self.same_read += o.same_read;
    }
}

struct RunResult {
    conns: usize,
    window: usize,
    seconds: f64,
    tally: Tally,
    jobs_per_s: f64,
    /// p50, p99, max in µs.
    latency_us: Option<(f64, f64, f64)>,
    /// With `--accepted-latency`: the same of the `accepted` lines, and of the time from a
    /// job's `accepted` to its `done`.
    accepted_us: Option<(f64, f64, f64)>,
    gap_us: Option<(f64, f64, f64)>,
    /// CPU µs per job of every taskd process together, and the cores they kept busy.
    taskd_cpu: Option<(f64, f64)>,
    /// CPU µs per job of this client, and the cores it kept busy.
    client_cpu: (f64, f64),
    /// Cores the whole machine kept busy during the counted time.
    machine_cores: f64,
    /// Of those, cores neither taskd nor this client used (when taskd's tree is known).
    other_cores: f64,
    rss_end: Option<Vec<ProcMem>>,
}

impl RunResult {
    fn summary(&self) -> String {
        let t = &self.tally;
        let mut s = format!(
            "{} conns × window {}, {:.1} s: {:.0} jobs/s",
            self.conns, self.window, self.seconds, self.jobs_per_s
        );
        match self.latency_us {
            Some((p50, p99, max)) => {
                s += &format!(", latency p50 {p50:.0} µs p99 {p99:.0} µs max {max:.0} µs");
            }
            None => s += ", no job done",
        }
        if let (Some((a50, a99, _)), Some((g50, g99, _))) = (self.accepted_us, self.gap_us) {
            s += &format!(
                ", accepted p50 {a50:.0} µs p99 {a99:.0} µs, then done p50 {g50:.0} µs p99 {g99:.0} µs \
                 later ({:.1} % in the same read)",
                100.0 * t.same_read as f64 / t.done_counted.max(1) as f64
            );
        }
        s += &format!(", errors {}", t.errors + t.failed);
        if t.unexpected > 0 {
            s += &format!(" (+{} unexpected lines)", t.unexpected);
        }
        if let Some((us, cores)) = self.taskd_cpu {
            s += &format!(", taskd CPU {us:.1} µs/job ({cores:.2} cores)");
        }
        let (cus, ccores) = self.client_cpu;
        s += &format!(", client CPU {cus:.1} µs/job ({ccores:.2} cores)");
        s += &format!(", machine busy {:.2} cores", self.machine_cores);
        if self.taskd_cpu.is_some() && self.other_cores >= 0.1 {
            s += &format!(" ({:.2} by other processes: a noisy run)", self.other_cores);
        }
        s
    }

    fn to_json(&self) -> Value {
        let t = &self.tally;
        let lat = self.latency_us;
        json!({
            "conns": self.conns,
            "window": self.window,
            "seconds": self.seconds,
            "jobs_per_s": self.jobs_per_s,
            "done_counted": t.done_counted,
            "latency_p50_us": lat.map(|l| l.0),
            "latency_p99_us": lat.map(|l| l.1),
            "latency_max_us": lat.map(|l| l.2),
            "accepted_p50_us": self.accepted_us.map(|l| l.0),
            "accepted_p99_us": self.accepted_us.map(|l| l.1),
            "accepted_to_done_p50_us": self.gap_us.map(|l| l.0),
            "accepted_to_done_p99_us": self.gap_us.map(|l| l.1),
            "done_in_accepted_read": self.gap_us.map(|_| t.same_read),
            "errors": t.errors + t.failed,
            "error_lines": t.errors,
            "failed_lines": t.failed,
            "unexpected_lines": t.unexpected,
            "sent": t.sent,
            "accepted": t.accepted,
            "done": t.done,
            "taskd_cpu_us_per_job": self.taskd_cpu.map(|c| c.0),
            "taskd_cpu_cores": self.taskd_cpu.map(|c| c.1),
            "client_cpu_us_per_job": self.client_cpu.0,
            "client_cpu_cores": self.client_cpu.1,
            "machine_busy_cores": self.machine_cores,
            "other_cores": if self.taskd_cpu.is_some() { json!(self.other_cores) } else { Value::Null },
            "rss_end": rss_json(self.rss_end.as_deref()),
        })
    }
}

/// A request line is `prefix`, the job's number, `suffix`.
fn request_line(args: &Args) -> (Vec<u8>, Vec<u8>) {
    match &args.job_type {
        None => (b"user".to_vec(), b"@example.com\n".to_vec()),
        Some(kind) => {
            let prefix = format!("{{\"type\":{},\"to\":\"user", json!(kind));
            (prefix.into_bytes(), b"@example.com\"}\n".to_vec())
        }
    }
}

fn connect(addr: &str) -> Result<StdTcpStream, String> {
    let mut last = format!("{addr} resolves to nothing");
    for a in addr.to_socket_addrs().map_err(|e| format!("cannot resolve {addr}: {e}"))? {
        match StdTcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("cannot connect to {a}: {e}"),
        }
    }
    Err(last)
}

fn run(addr: &str, cfg: &RunCfg, master: Option<i32>) -> Result<RunResult, String> {
    // Connect first, so that connection set-up is not part of any measured time.
    let mut per_thread: Vec<Vec<StdTcpStream>> =
        (0..cfg.threads.min(cfg.conns)).map(|_| Vec::new()).collect();
    for i in 0..cfg.conns {
        let s = connect(addr)?;
        s.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
        s.set_nonblocking(true).map_err(|e| format!("O_NONBLOCK: {e}"))?;
        let n = per_thread.len();
        per_thread[i % n].push(s);
    }
    let begin = Instant::now() + Duration::from_millis(20);
    let clock = Clock { start: begin + cfg.warmup, end: begin + cfg.warmup + cfg.counted };
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = per_thread
        .into_iter()
        .map(|streams| {
            let (cfg, stop) = (cfg.clone(), Arc::clone(&stop));
            thread::spawn(move || client_loop(streams, &cfg, begin, clock, &stop))
        })
        .collect();

    let measure = sample_during(clock, master);
    if measure.is_err() {
        stop.store(true, Ordering::SeqCst);
    }
    let mut tally = Tally::default();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => tally.merge(t),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some("a client thread panicked".to_string())),
        }
    }
    let ((d0, c0, m0, t0), (d1, c1, m1, t1), rss_end) = measure?;
    interrupted()?;
    if let Some(e) = first_err {
        return Err(e);
    }

    let seconds = cfg.counted.as_secs_f64();
    let wall = (t1 - t0).as_secs_f64();
    let jobs = tally.done_counted;
    let per_job_us = |ticks: u64| {
        let cpu_s = ticks as f64 / TICKS_PER_SEC;
        (if jobs > 0 { cpu_s * 1e6 / jobs as f64 } else { f64::NAN }, cpu_s / wall)
    };
    let taskd_cpu = match (d0, d1) {
        (Some(a), Some(b)) => Some(per_job_us(b.saturating_sub(a))),
        _ => None,
    };
    let client_cpu = per_job_us(c1.saturating_sub(c0));
    // Whatever else kept the machine busy: other people's processes make a run noisy.
    let machine = m1.saturating_sub(m0) as f64 / TICKS_PER_SEC / wall;
    let other_cores = (machine - client_cpu.1 - taskd_cpu.map_or(0.0, |c| c.1)).max(0.0);
    tally.latencies.sort_unstable();
    let latency_us = percentiles(&tally.latencies);
    tally.accepted_latencies.sort_unstable();
    tally.done_gaps.sort_unstable();
    let (accepted_us, gap_us) = if cfg.accepted_latency {
        (percentiles(&tally.accepted_latencies), percentiles(&tally.done_gaps))
    } else {
        (None, None)
    };
    Ok(RunResult {
        conns: cfg.conns,
        window: cfg.window,
        seconds,
        jobs_per_s: if seconds > 0.0 { jobs as f64 / seconds } else { 0.0 },
        latency_us,
        accepted_us,
        gap_us,
        taskd_cpu,
        client_cpu,
        machine_cores: machine,
        other_cores,
        rss_end,
        tally,
    })
}

/// CPU ticks of the daemon's tree, of this process and of the whole machine (busy), and when
/// they were read.
type CpuSample = (Option<u64>, u64, u64, Instant);

/// Samples CPU at the start and the end of the counted time, and RSS at its end.
fn sample_during(
    clock: Clock,
    master: Option<i32>,
) -> Result<(CpuSample, CpuSample, Option<Vec<ProcMem>>), String> {
    sleep_until_checked(clock.start)?;
    let cpu0 = (master.map(cpu_ticks_of_tree), own_cpu_ticks(), machine_busy_ticks(), Instant::now());
    sleep_until_checked(clock.end)?;
    let cpu1 = (master.map(cpu_ticks_of_tree), own_cpu_ticks(), machine_busy_ticks(), Instant::now());
    Ok((cpu0, cpu1, master.map(rss_of_tree)))
}

/// p50, p99 and max of sorted nanoseconds, in µs (nearest rank).
fn percentiles(sorted: &[u64]) -> Option<(f64, f64, f64)> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = |p: f64| sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1] as f64 / 1e3;
    Some((rank(0.50), rank(0.99), sorted[n - 1] as f64 / 1e3))
}

// ---------------------------------------------------------------------------------------------
// The client: one mio loop per thread over its connections

/// One connection of the load generator.
struct Conn {
    stream: TcpStream,
    /// The start of a reply line whose end has not arrived yet (replies are read into the
    /// thread's one buffer: a buffer per connection put a thousand connections' reads on as
    /// many cold pages).
    partial: Vec<u8>,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    wpos: usize,
    /// Send time of every job without its `done` yet, by the number in its address, oldest
    /// first (replies come mostly in order, so the one looked for is near the front; a hash
    /// map per connection cost a tenth of the client's time at 1,000 connections).
    pending: Pending,
    /// Requests answered with `error`: they stay in `pending` (no `done` will name them) but
    /// do not count against the window.
    lost: usize,
    next_seq: u64,
    /// With `--accepted-latency`: jobs whose `accepted` came, by number, with when it came.
    acked: Option<VecDeque<(u64, Instant)>>,
}

/// Jobs sent and not done: (number, send time), in the order they were sent.
struct Pending(VecDeque<(u64, Instant)>);

impl Pending {
    /// The send time of job `seq`, which is done.
    fn take(&mut self, seq: u64) -> Option<Instant> {
        let pos = self.0.iter().position(|&(s, _)| s == seq)?;
        self.0.remove(pos).map(|(_, at)| at)
    }
}

/// Finders for the two fields a reply line is scanned for.
struct Scan {
    event: memmem::Finder<'static>,
    to: memmem::Finder<'static>,
}

const TO_PREFIX: &[u8] = b"\"to\":\"user";

impl Conn {
    fn outstanding(&self) -> usize {
        self.pending.0.len() - self.lost
    }

    /// Tops the window up to `window` jobs outstanding and writes what it can.
    fn refill(&mut self, window: usize, line: &(Vec<u8>, Vec<u8>), tally: &mut Tally) -> io::Result<()> {
        let missing = window.saturating_sub(self.outstanding());
        if missing > 0 {
            let now = Instant::now();
            for _ in 0..missing {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.wbuf.extend_from_slice(&line.0);
                push_u64(&mut self.wbuf, seq);
                self.wbuf.extend_from_slice(&line.1);
                self.pending.0.push_back((seq, now));
            }
            tally.sent += missing as u64;
        }
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "taskd accepts no more bytes")),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(())
    }

    /// Reads until the socket is drained, into `scratch` (the thread's buffer, after what is
    /// left of an unfinished line), handling every complete line as it comes.
    fn read_ready(
        &mut self,
        scratch: &mut Vec<u8>,
        scan: &Scan,
        clock: &Clock,
        tally: &mut Tally,
    ) -> io::Result<()> {
        loop {
            let kept = self.partial.len();
            if kept >= scratch.len() {
                // One line longer than the buffer (a `stats` line would be): grow.
                scratch.resize(2 * kept.max(scratch.len()), 0);
            }
            scratch[..kept].copy_from_slice(&self.partial);
            self.partial.clear();
            let room = scratch.len() - kept;
            let n = match self.stream.read(&mut scratch[kept..]) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "taskd closed the connection"))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.partial.extend_from_slice(&scratch[..kept]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.partial.extend_from_slice(&scratch[..kept]);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            let filled = kept + n;
            let mut head = 0;
            while let Some(pos) = memchr::memchr(b'\n', &scratch[head..filled]) {
                let line = &scratch[head..head + pos];
                let acked = self.acked.as_mut();
                handle_line(line, now, scan, clock, &mut self.pending, &mut self.lost, acked, tally);
                head += pos + 1;
            }
            self.partial.extend_from_slice(&scratch[head..filled]);
            // A short read of a stream socket means it is drained (epoll(7)); the next bytes
            // raise a new edge. This saves one read that would only say EAGAIN.
            if n < room {
                return Ok(());
            }
        }
    }
}

#[allow(clippy::too_many_arguments)] // a connection's parts, borrowed apart from `tally`
fn handle_line(
    line: &[u8],
    now: Instant,
    scan: &Scan,
    clock: &Clock,
    pending: &mut Pending,
    lost: &mut usize,
    acked: Option<&mut VecDeque<(u64, Instant)>>,
    tally: &mut Tally,
) {
    let event = match scan.event.find(line) {
        Some(i) => {
            let rest = &line[i + 9..];
            &rest[..memchr::memchr(b'"', rest).unwrap_or(rest.len())]
        }
        None => b"",
    };
    match event {
        b"accepted" => {
            tally.accepted += 1;
            // Scanned for its number only when asked to.
            if let Some(acked) = acked {
                if let Some(seq) = job_number(line, scan) {
                    acked.push_back((seq, now));
                }
            }
        }
        b"done" | b"failed" => {
            let seq = job_number(line, scan);
            let sent_at = seq.and_then(|seq| pending.take(seq));
            let Some(sent_at) = sent_at else {
                tally.unexpected += 1;
                return;
            };
            // Its `accepted` (near the front: they come in order).
            let acked_at = acked.zip(seq).and_then(|(acked, seq)| {
                let pos = acked.iter().position(|&(s, _)| s == seq)?;
                acked.remove(pos).map(|(_, at)| at)
            });
            if event == b"failed" {
                tally.failed += 1;
                return;
            }
            tally.done += 1;
            if now >= clock.start && now < clock.end {
                tally.done_counted += 1;
                tally.latencies.push((now - sent_at).as_nanos() as u64);
                if let Some(at) = acked_at {
                    tally.accepted_latencies.push((at - sent_at).as_nanos() as u64);
                    tally.done_gaps.push((now - at).as_nanos() as u64);
                    tally.same_read += u64::from(at == now);
                }
            }
        }
        b"error" => {
            tally.errors += 1;
            *lost += 1;
        }
        _ => tally.unexpected += 1,
    }
}

/// The `N` of `"to":"userN@…"`.
fn job_number(line: &[u8], scan: &Scan) -> Option<u64> {
    let i = scan.to.find(line)? + TO_PREFIX.len();
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in &line[i..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

fn push_u64(buf: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

fn client_loop(
    streams: Vec<StdTcpStream>,
    cfg: &RunCfg,
    begin: Instant,
    clock: Clock,
    stop: &AtomicBool,
) -> Result<Tally, String> {
    let (window, line, timeout) = (cfg.window, &cfg.line, cfg.timeout);
    let io_err = |what: &str, e: io::Error| format!("{what}: {e}");
    let mut poll = Poll::new().map_err(|e| io_err("epoll", e))?;
    let mut conns = Vec::with_capacity(streams.len());
    for (i, s) in streams.into_iter().enumerate() {
        let mut stream = TcpStream::from_std(s);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| io_err("epoll_ctl", e))?;
        conns.push(Conn {
            stream,
            partial: Vec::new(),
            wbuf: Vec::with_capacity(window * 32),
            wpos: 0,
            pending: Pending(VecDeque::with_capacity(window * 2)),
            lost: 0,
            next_seq: 0,
            acked: cfg.accepted_latency.then(|| VecDeque::with_capacity(window * 2)),
        });
    }
    let scan = Scan { event: memmem::Finder::new(b"\"event\":\""), to: memmem::Finder::new(TO_PREFIX) };
    let mut tally = Tally::default();
    // Room for every latency sample of a fast run, so that the vector rarely grows mid-run.
    tally.latencies.reserve(1 << 18);
    let mut events = Events::with_capacity(conns.len().max(16));
    // Every connection's replies are read into this one buffer (see `Conn::partial`).
    let mut scratch = vec![0u8; 64 * 1024];

    let now = Instant::now();
    if begin > now {
        thread::sleep(begin - now);
    }
    for c in &mut conns {
        c.refill(window, line, &mut tally).map_err(|e| io_err("write", e))?;
    }
    let mut stopping = false;
    let mut last_progress = Instant::now();
    loop {
        if INTERRUPTED.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
            return Err("interrupted".into());
        }
        let now = Instant::now();
        if !stopping && now >= clock.end {
            stopping = true;
        }
        if stopping && conns.iter().all(|c| c.outstanding() == 0) {
            break;
        }
        let wait = if stopping {
            Duration::from_millis(100)
        } else {
            (clock.end - now).min(Duration::from_millis(100))
        };
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("epoll_wait", e)),
        }
        if events.is_empty() {
            if last_progress.elapsed() > timeout {
                let waiting: usize = conns.iter().map(Conn::outstanding).sum();
                return Err(format!(
                    "no reply for {:.0} s with {waiting} jobs outstanding",
                    timeout.as_secs_f64()
                ));
            }
            continue;
        }
        last_progress = Instant::now();
        for ev in &events {
            let c = &mut conns[ev.token().0];
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.read_ready(&mut scratch, &scan, &clock, &mut tally).map_err(|e| io_err("read", e))?;
            }
            if stopping {
                c.flush().map_err(|e| io_err("write", e))?;
            } else {
                c.refill(window, line, &mut tally).map_err(|e| io_err("write", e))?;
            }
        }
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// The matrix report

fn report_matrix(
    out: &mut impl Write,
    args: &Args,
    addr: &str,
    taskd: Option<String>,
    cells: &[RunResult],
    idle: Option<&[ProcMem]>,
) -> io::Result<()> {
    // Per process, the largest RSS seen at the end of any run.
    let mut loaded: Vec<ProcMem> = Vec::new();
    for c in cells {
        for p in c.rss_end.iter().flatten() {
            match loaded.iter_mut().find(|q| q.pid == p.pid) {
                Some(q) => q.rss_kb = q.rss_kb.max(p.rss_kb),
                None => loaded.push(p.clone()),
            }
        }
    }
    let one = cells.iter().find(|c| c.conns == 1 && c.window == 1);
    let busiest = cells.iter().max_by(|a, b| a.jobs_per_s.total_cmp(&b.jobs_per_s));
    if args.json {
        let v = json!({
            "mode": "matrix",
            "addr": addr,
            "taskd": taskd,
            "taskd_args": args.taskd_args,
            "seconds_per_cell": args.matrix_seconds,
            "cells": cells.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "one_by_one_p50_us": one.and_then(|c| c.latency_us).map(|l| l.0),
            "one_by_one_p99_us": one.and_then(|c| c.latency_us).map(|l| l.1),
            "rss_idle": rss_json(idle),
            "rss_loaded_max": if idle.is_some() { rss_json(Some(&loaded)) } else { Value::Null },
        });
        return writeln!(out, "{v}");
    }
    writeln!(
        out,
        "taskd {} at {addr}{}; {} s per cell after {} s warm-up",
        taskd.as_deref().unwrap_or("(running)"),
        if args.taskd_args.is_empty() { String::new() } else { format!(" {}", args.taskd_args.join(" ")) },
        args.matrix_seconds,
        args.warmup
    )?;
    writeln!(
        out,
        "conns window    jobs/s   p50 µs   p99 µs   max µs  errors  taskd µs/job  cores  client µs/job  other cores"
    )?;
    for c in cells {
        let (p50, p99, max) = c.latency_us.unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        let (tus, tcores, other) = match c.taskd_cpu {
            Some((us, cores)) => (format!("{us:.1}"), format!("{cores:.2}"), format!("{:.2}", c.other_cores)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        writeln!(
            out,
            "{:>5} {:>6} {:>9.0} {:>8.0} {:>8.0} {:>8.0} {:>7} {:>13} {:>6} {:>14.1} {:>12}",
            c.conns,
            c.window,
            c.jobs_per_s,
            p50,
            p99,
            max,
            c.tally.errors + c.tally.failed,
            tus,
            tcores,
            c.client_cpu.0,
            other
        )?;
    }
    if let Some((p50, p99, _)) = one.and_then(|c| c.latency_us) {
        writeln!(out, "1 × 1 round trip: p50 {p50:.0} µs, p99 {p99:.0} µs")?;
    }
    if let Some(b) = busiest {
        writeln!(out, "best: {:.0} jobs/s at {} conns × window {}", b.jobs_per_s, b.conns, b.window)?;
    }
    if let Some(idle) = idle {
        print_rss(out, idle, &loaded, "loaded (max at end of a run)")?;
    }
    Ok(())
}
