//! taskd under hostile clients (issue 14), run by hand on the release build; `benches/hostile.sh`
//! runs it with the README's settings.
//!
//! ```text
//! cargo build --release --examples
//! target/release/examples/hostile_bench [--seconds 60] [--conns 1000] [--line-bytes 2000000]
//! ```
//!
//! 1. Eight normal clients, one job at a time each (a bare address: `accepted`, then `done`;
//!    latency from the write to the `done`), for `--baseline-seconds`: p50 / p99 / max.
//! 2. The same eight beside one blaster for `--seconds`: the blaster writes `x\n` lines as fast
//!    as its socket takes them and never reads a reply; cut off (for not reading), it connects
//!    again at once. Master RSS is sampled every 20 ms (VmRSS of /proc/PID/status).
//! 3. SIGTERM with the blaster still at it: how long the daemon takes to exit.
//! 4. A fresh daemon; `--conns` connections each send `--line-bytes` bytes without a newline
//!    and wait. Then, per connection: it got the `error` line naming partial_lines_max (and
//!    was closed), it was closed without one (lost), or it is still held; master RSS against
//!    the budget, and the master's own count (`stats`).
//! 5. A fresh daemon whose jobs take 20 s (`--simulate-ms 20000`); `--big-jobs` connections
//!    each send an email job with a 1 MiB body at once: how many are accepted, how many get
//!    "server busy" (task_queue_bytes_max), and the master's RSS.
//!
//! It starts `target/release/taskd --port 0 --simulate-ms 0 --log-level error` (plus any
//! `--taskd-arg`) in its own process group and stops it at the end (a guard kills it).

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Seconds the blaster runs beside the normal clients.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds the normal clients run alone first.
    #[arg(long, default_value_t = 20)]
    baseline_seconds: u64,
    /// Normal clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Connections holding an unfinished line in part 4.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Bytes each of them sends without a newline.
    #[arg(long, default_value_t = 2_000_000)]
    line_bytes: usize,
    /// Connections sending a 1 MiB email job at once in part 5.
    #[arg(long, default_value_t = 100)]
    big_jobs: usize,
    /// The binary (default: target/release/taskd).
    #[arg(long)]
    taskd: Option<PathBuf>,
    /// An extra flag for taskd (repeatable), e.g. --taskd-arg=--input-requests-max=256.
    #[arg(long = "taskd-arg", allow_hyphen_values = true)]
    taskd_args: Vec<String>,
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
    _outbox: tempfile::TempDir,
}

impl Daemon {
    fn start(args: &Args) -> Daemon {
        Self::start_simulating(args, 0)
    }

    fn start_simulating(args: &Args, simulate_ms: u64) -> Daemon {
        let path = args.taskd.clone().unwrap_or_else(|| PathBuf::from("target/release/taskd"));
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(&path);
        cmd.args(["--port", "0", "--log-level", "error", "--simulate-ms"])
            .arg(simulate_ms.to_string())
            .arg("--outbox")
            .arg(dir.path().join("outbox.log"))
            .args(&args.taskd_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        // SAFETY: only prctl between fork and exec: the daemon goes if the bench dies.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from));
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut first = String::new();
        out.read_line(&mut first).expect("taskd's first line");
        let addr = first
            .trim()
            .strip_prefix("taskd listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        thread::spawn(move || io::copy(&mut out, &mut io::sink()));
        Daemon { child, addr, _outbox: dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stats(&self) -> Value {
        let s = TcpStream::connect(self.addr).expect("connect for stats");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&s).write_all(b"stats\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or(Value::Null)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Samples the master's RSS until stopped; returns the highest.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            max = max.max(rss_kb(pid));
            thread::sleep(Duration::from_millis(20));
        }
        max
    })
}

/// One normal client: a job at a time until `stop`; the latency of each, in microseconds.
fn normal_client(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> thread::JoinHandle<Vec<u64>> {
    thread::spawn(move || {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut writer = s.try_clone().unwrap();
        let mut reader = BufReader::new(s);
        let mut latencies = Vec::new();
        let mut line = String::new();
        let request = format!("normal{id}@example.com\n");
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            writer.write_all(request.as_bytes()).expect("a normal client's write");
            loop {
                line.clear();
                if reader.read_line(&mut line).expect("a normal client's read") == 0 {
                    panic!("a normal client was disconnected");
                }
                if line.contains("\"event\":\"done\"") {
                    break;
                }
                assert!(line.contains("\"event\":\"accepted\""), "normal client got {line}");
            }
            latencies.push(start.elapsed().as_micros() as u64);
        }
        latencies
    })
}

fn run_normal(addr: SocketAddr, clients: usize, seconds: u64) -> Vec<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..clients).map(|i| normal_client(addr, i, stop.clone())).collect();
    thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().expect("normal client")).collect();
    all.sort_unstable();
    all
}

fn summary(sorted: &[u64], seconds: u64) -> String {
    let at = |q: f64| sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)] as f64 / 1000.0;
    format!(
        "{} jobs ({:.0}/s), p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        sorted.len(),
        sorted.len() as f64 / seconds as f64,
        at(0.50),
        at(0.99),
        at(1.0)
    )
}

struct Blaster {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    cut_off: Arc<AtomicU64>,
    handle: thread::JoinHandle<()>,
}

fn blaster(addr: SocketAddr) -> Blaster {
    let (stop, sent, cut_off) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::default());
    let handle = {
        let (stop, sent, cut_off): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
            (stop.clone(), Arc::clone(&sent), Arc::clone(&cut_off));
        thread::spawn(move || {
            let chunk = "x\n".repeat(32 * 1024);
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                };
                s.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match s.write(chunk.as_bytes()) {
                        Ok(n) => {
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => {
                            cut_off.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        })
    };
    Blaster { stop, sent, cut_off, handle }
}

fn main() {
    let args = Args::parse();
    // Part 4 holds a thousand connections.
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let mut daemon = Daemon::start(&args);
    thread::sleep(Duration::from_millis(300));
    let pid = daemon.pid();
    println!("master pid {pid}, RSS idle {} kB", rss_kb(pid));

    // 1. The normal clients alone.
    let stop = Arc::new(AtomicBool::new(false));
    let rss = sample_rss(pid, stop.clone());
    let alone = run_normal(daemon.addr, args.clients, args.baseline_seconds);
    stop.store(true, Ordering::Relaxed);
    let rss_alone = rss.join().unwrap();
    println!(
        "{} normal clients alone, {} s: {}; master RSS max {rss_alone} kB",
        args.clients,
        args.baseline_seconds,
        summary(&alone, args.baseline_seconds)
    );

    // 2. Beside a blaster.
    let stop = Arc::new(AtomicBool::new(false));
    let rss = sample_rss(pid, stop.clone());
    let b = blaster(daemon.addr);
    let beside = run_normal(daemon.addr, args.clients, args.seconds);
    stop.store(true, Ordering::Relaxed);
    let rss_beside = rss.join().unwrap();
    let s = daemon.stats();
    println!(
        "{} normal clients beside the blaster, {} s: {}; master RSS max {rss_beside} kB",
        args.clients,
        args.seconds,
        summary(&beside, args.seconds)
    );
    println!(
        "blaster: {:.1} MB of `x` lines sent, cut off {} times for not reading; master: {} pauses, {} requests",
        b.sent.load(Ordering::Relaxed) as f64 / 1e6,
        b.cut_off.load(Ordering::Relaxed),
        s["input_pauses"],
        s["request_count"]
    );
    let p99 = |v: &[u64]| v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)] as f64;
    println!("p99 beside / alone: {:.2}", p99(&beside) / p99(&alone));

    // 3. SIGTERM with the blaster at it.
    let start = Instant::now();
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let status = loop {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(60) {
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    b.stop.store(true, Ordering::Relaxed);
    let _ = b.handle.join();
    println!(
        "SIGTERM with the blaster connected: exited in {:.2} s ({status:?})",
        start.elapsed().as_secs_f64()
    );
    drop(daemon);

    // 4. Unfinished lines.
    partial_lines(&args);
    // 5. Large jobs at once.
    big_jobs(&args);
}

fn big_jobs(args: &Args) {
    let daemon = Daemon::start_simulating(args, 20_000);
    thread::sleep(Duration::from_millis(300));
    let pid = daemon.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let rss = sample_rss(pid, stop.clone());
    let line =
        format!("{{\"type\":\"email\",\"to\":\"a@example.com\",\"body\":\"{}\"}}\n", "b".repeat(1 << 20));
    let conns: Vec<TcpStream> = (0..args.big_jobs)
        .map(|_| {
            let s = TcpStream::connect(daemon.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s
        })
        .collect();
    let writers: Vec<_> = conns
        .iter()
        .map(|s| {
            let (mut s, line) = (s.try_clone().unwrap(), line.clone());
            thread::spawn(move || s.write_all(line.as_bytes()))
        })
        .collect();
    for w in writers {
        w.join().unwrap().expect("sending a job");
    }
    let (mut accepted, mut busy, mut other) = (0, 0, 0);
    for s in &conns {
        let mut reply = String::new();
        let _ = BufReader::new(s).read_line(&mut reply);
        if reply.contains("\"accepted\"") {
            accepted += 1;
        } else if reply.contains("task_queue_bytes_max") {
            busy += 1;
        } else {
            other += 1;
        }
    }
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let rss_max = rss.join().unwrap();
    let s = daemon.stats();
    println!(
        "{} email jobs with a 1 MiB body at once: {accepted} accepted, {busy} server busy, {other} other; \
         task_queue_bytes {} of {}; master RSS max {rss_max} kB ({:.1} MB), then {} kB",
        args.big_jobs,
        s["task_queue_bytes"],
        s["task_queue_bytes_max"],
        rss_max as f64 / 1024.0,
        rss_kb(pid)
    );
}

fn partial_lines(args: &Args) {
    let daemon = Daemon::start(args);
    thread::sleep(Duration::from_millis(300));
    let pid = daemon.pid();
    let budget = daemon.stats()["partial_lines_max"].as_u64().unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let rss = sample_rss(pid, stop.clone());
    let mut conns: Vec<(TcpStream, usize, bool)> = (0..args.conns)
        .map(|_| {
            let s = TcpStream::connect(daemon.addr).expect("connect");
            s.set_nonblocking(true).unwrap();
            (s, 0, false)
        })
        .collect();
    let chunk = vec![b'x'; 64 * 1024];
    let start = Instant::now();
    // Round robin, as far as each socket takes it, until every line is sent (or refused).
    loop {
        let mut busy = false;
        for (s, sent, gone) in conns.iter_mut().filter(|c| !c.2 && c.1 < args.line_bytes) {
            let n = chunk.len().min(args.line_bytes - *sent);
            match s.write(&chunk[..n]) {
                Ok(k) => {
                    *sent += k;
                    busy = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *gone = true,
            }
        }
        if conns.iter().all(|c| c.2 || c.1 >= args.line_bytes) {
            break;
        }
        if !busy {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let sent_in = start.elapsed();
    // Lingering closes end within 2 s; then each connection says what became of it.
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let rss_max = rss.join().unwrap();
    let (mut errors, mut lost, mut held) = (0, 0, 0);
    for (s, _, _) in &mut conns {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break "closed",
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break "open",
                Err(_) => break "reset",
            }
        };
        let said = String::from_utf8_lossy(&got);
        match (said.contains("partial_lines_max"), end) {
            (true, _) => errors += 1,
            (false, "open") => held += 1,
            (false, _) => lost += 1,
        }
    }
    let s = daemon.stats();
    println!(
        "{} connections x {} bytes without a newline (sent in {:.1} s): {errors} got the error line, \
         {held} held, {lost} closed without it",
        args.conns,
        args.line_bytes,
        sent_in.as_secs_f64()
    );
    println!(
        "partial_lines_max {budget} bytes ({:.1} MB); master holds {} bytes, refused {}; master RSS max {rss_max} kB \
         ({:.1} MB), now {} kB",
        budget as f64 / 1e6,
        s["partial_lines_bytes"],
        s["partial_lines_refused"],
        rss_max as f64 / 1024.0,
        rss_kb(pid)
    );
}
