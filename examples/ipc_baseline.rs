//! The physical limit of one IPC hop on this machine, the yardstick of taskd's throughput.
//!
//! ```text
//! cargo build --release --examples
//! target/release/examples/ipc_baseline [--seconds 2] [--repeat 3] [--size 100] [--batch 64] [--json]
//! ```
//!
//! Measured as /work/shared/ANCHORS.md describes it: two processes (the second one forked)
//! joined by an AF_UNIX stream socketpair, the kind taskd's channels are, and 100-byte
//! messages:
//!
//! - **stream, one message per write**: the child writes one message per `write` for
//!   `--seconds`, then closes; the parent reads in 64 kB chunks (`--read-size`) and counts the messages from
//!   its first byte to end of file. This is the rate taskd's throughput is compared against.
//! - **stream, `--batch` (64) messages per write**: the same, with one `write` of 64 messages.
//! - **ping-pong**: the parent writes one message and waits for the child to echo it back; the
//!   round trip of each of them, for `--seconds` after 1000 warm-up trips: p50 and p99. Once
//!   unpinned (where the scheduler puts them), once with the two processes pinned to two
//!   different CPUs, and once with both pinned to the same CPU (wake-ups, not bytes, are what
//!   a hop costs).
//!
//! Each measurement runs `--repeat` times, interleaved; the report gives the median and the
//! range. The machine's other load shows up as a wide range: repeat when it does.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "ipc_baseline",
    about = "Raw AF_UNIX socketpair throughput and round trip between two processes"
)]
struct Args {
    /// Length of each measurement, in seconds.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Runs of each measurement.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages per write in the batched stream.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Bytes the streams' reader asks for per read (65536: as a reactor reads; 100: one
    /// message per read).
    #[arg(long, default_value_t = 65536)]
    read_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Where the two processes run: unpinned, or pinned to (parent's CPU, child's CPU).
#[derive(Clone, Copy)]
enum Placement {
    Free,
    Pinned(usize, usize),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.size == 0
        || args.batch == 0
        || args.repeat == 0
        || args.read_size == 0
        || !(args.seconds.is_finite() && args.seconds > 0.0)
    {
        eprintln!("ipc_baseline: --size, --batch, --repeat, --read-size and --seconds must be positive");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipc_baseline: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> io::Result<()> {
    let d = Duration::from_secs_f64(args.seconds);
    let cpus = allowed_cpus_at_start();
    let cross = (cpus.len() >= 2).then(|| Placement::Pinned(cpus[0], cpus[1]));
    let same = cpus.first().map(|&c| Placement::Pinned(c, c));

    let mut stream1 = Vec::new();
    let mut stream_batch = Vec::new();
    let mut pp_free = Vec::new();
    let mut pp_cross = Vec::new();
    let mut pp_same = Vec::new();
    for _ in 0..args.repeat {
        stream1.push(stream(args.size, 1, args.read_size, d)?);
        stream_batch.push(stream(args.size, args.batch, args.read_size, d)?);
        pp_free.push(ping_pong(args.size, d, Placement::Free)?);
        if let Some(p) = cross {
            pp_cross.push(ping_pong(args.size, d, p)?);
        }
        if let Some(p) = same {
            pp_same.push(ping_pong(args.size, d, p)?);
        }
    }

    let pp_label = |p: Option<Placement>| match p {
        Some(Placement::Pinned(a, b)) if a == b => format!("both on cpu {a}"),
        Some(Placement::Pinned(a, b)) => format!("cpu {a} and cpu {b}"),
        _ => "unpinned".to_string(),
    };
    if args.json {
        let pp_json = |runs: &[(f64, f64)], p: Option<Placement>| {
            if runs.is_empty() {
                return Value::Null;
            }
            let p50: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let p99: Vec<f64> = runs.iter().map(|r| r.1).collect();
            json!({"placement": pp_label(p), "p50_us": median(&p50), "p99_us": median(&p99),
                   "p50_us_runs": p50, "p99_us_runs": p99})
        };
        let v = json!({
            "message_bytes": args.size,
            "seconds": args.seconds,
            "repeat": args.repeat,
            "stream_1_per_write_msgs_per_s": median(&stream1),
            "stream_1_per_write_runs": stream1,
            "batch": args.batch,
            "read_size": args.read_size,
            "stream_batch_per_write_msgs_per_s": median(&stream_batch),
            "stream_batch_per_write_runs": stream_batch,
            "ping_pong_unpinned": pp_json(&pp_free, Some(Placement::Free)),
            "ping_pong_cross_cpu": pp_json(&pp_cross, cross),
            "ping_pong_same_cpu": pp_json(&pp_same, same),
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "AF_UNIX stream socketpair between two processes, {}-byte messages; {} runs of {} s each: median [min – max]",
        args.size, args.repeat, args.seconds
    );
    println!("stream, 1 message per write:   {}", rate_line(&stream1));
    println!("stream, {} messages per write: {}", args.batch, rate_line(&stream_batch));
    for (name, runs, p) in [
        ("unpinned", &pp_free, Some(Placement::Free)),
        ("cross-CPU", &pp_cross, cross),
        ("same CPU", &pp_same, same),
    ] {
        if runs.is_empty() {
            println!("ping-pong {name}: not measured (needs more CPUs)");
            continue;
        }
        let p50: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let p99: Vec<f64> = runs.iter().map(|r| r.1).collect();
        let place = match p {
            Some(Placement::Pinned(..)) => format!(" ({})", pp_label(p)),
            _ => String::new(),
        };
        println!(
            "ping-pong round trip, {name}{place}: p50 {:.1} µs [{:.1} – {:.1}], p99 {:.1} µs",
            median(&p50),
            min(&p50),
            max(&p50),
            median(&p99)
        );
    }
    Ok(())
}

fn rate_line(runs: &[f64]) -> String {
    format!("{} msg/s [{} – {}]", si(median(runs)), si(min(runs)), si(max(runs)))
}

fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else {
        format!("{:.0}k", v / 1e3)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// One process streams `per_write` messages of `size` bytes per write to the other for `d`;
/// returns the messages per second the reader got.
fn stream(size: usize, per_write: usize, read_size: usize, d: Duration) -> io::Result<f64> {
    let (mut rx, tx) = UnixStream::pair()?;
    let Some(child) = fork_process()? else {
        drop(rx);
        child_main(Placement::Free, move || {
            let mut tx = tx;
            let buf = vec![b'x'; size * per_write];
            let start = Instant::now();
            loop {
                // Look at the clock only now and then: the writes are what is measured.
                for _ in 0..64 {
                    tx.write_all(&buf)?;
                }
                if start.elapsed() >= d {
                    return Ok(());
                }
            }
        })
    };
    drop(tx);
    let mut buf = vec![0u8; read_size];
    let mut total = 0usize;
    let mut first = None;
    loop {
        let n = match rx.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        first.get_or_insert_with(Instant::now);
        total += n;
    }
    let elapsed = first.map(|t| t.elapsed()).unwrap_or_default();
    reap(child)?;
    Ok((total / size) as f64 / elapsed.as_secs_f64())
}

/// One message there and back, again and again for `d`: (p50, p99) of the round trip in µs.
fn ping_pong(size: usize, d: Duration, place: Placement) -> io::Result<(f64, f64)> {
    let (mut a, b) = UnixStream::pair()?;
    let Some(child) = fork_process()? else {
        drop(a);
        child_main(place, move || {
            let mut b = b;
            let mut buf = vec![0u8; size];
            loop {
                match b.read_exact(&mut buf) {
                    Ok(()) => b.write_all(&buf)?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        })
    };
    drop(b);
    if let Placement::Pinned(cpu, _) = place {
        pin(cpu)?;
    }
    let mut buf = vec![b'x'; size];
    for _ in 0..1000 {
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
    }
    let mut lat = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    while start.elapsed() < d {
        let t = Instant::now();
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    drop(a);
    reap(child)?;
    if let Placement::Pinned(..) = place {
        unpin()?;
    }
    lat.sort_unstable();
    let rank = |p: f64| lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1] as f64 / 1e3;
    Ok((rank(0.50), rank(0.99)))
}

/// Forks: `Some(child)` in the parent, `None` in the child, which must end in `child_main`.
fn fork_process() -> io::Result<Option<Pid>> {
    io::stdout().flush()?;
    io::stderr().flush()?;
    // SAFETY: this program starts no thread, so the child is a complete copy of a
    // single-threaded process; it only runs `child_main`, which exits without returning.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Parent { child } => Ok(Some(child)),
        ForkResult::Child => Ok(None),
    }
}

/// The whole life of a forked child: pinned to the second CPU of `place` if pinned, it runs
/// `f` and exits, 0 if `f` returned Ok, 1 if not, 101 if it panicked.
fn child_main(place: Placement, f: impl FnOnce() -> io::Result<()>) -> ! {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Placement::Pinned(_, cpu) = place {
            pin(cpu)?;
        }
        f()
    }));
    let code = match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("ipc_baseline: child: {e}");
            1
        }
        Err(_) => 101,
    };
    std::process::exit(code)
}

fn reap(pid: Pid) -> io::Result<()> {
    match waitpid(pid, None).map_err(io::Error::from)? {
        WaitStatus::Exited(_, 0) => Ok(()),
        other => Err(io::Error::other(format!("the child process ended with {other:?}"))),
    }
}

/// The CPUs this process may run on (Cpus_allowed_list of /proc/self/status).
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(list) = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")) else {
        return Vec::new();
    };
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let mut ends = part.split('-').map(|s| s.trim().parse::<usize>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), None) => cpus.push(a),
            (Some(Ok(a)), Some(Ok(b))) => cpus.extend(a..=b),
            _ => {}
        }
    }
    cpus
}

/// The affinity mask every CPU of `allowed_cpus` is in, or only `cpu`.
fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    let mut mask = [0u64; 16]; // 1024 CPUs, the size of glibc's cpu_set_t
    for &c in cpus.iter().filter(|&&c| c < 1024) {
        mask[c / 64] |= 1 << (c % 64);
    }
    // SAFETY: the pointer and length describe `mask`, which lives across the call; the kernel
    // only reads it.
    let rc = unsafe { nix::libc::sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn pin(cpu: usize) -> io::Result<()> {
    set_affinity(&[cpu])
}

fn unpin() -> io::Result<()> {
    set_affinity(&allowed_cpus_at_start())
}

/// Read once, before any pinning narrows /proc/self/status.
fn allowed_cpus_at_start() -> Vec<usize> {
    static CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    CPUS.get_or_init(allowed_cpus).clone()
}
