//! Running taskd as a service: the pid file, and the control commands (`stop`, `reload`,
//! `status`) that find the daemon through it.
//!
//! The pid file holds the master's pid alone, on one line, as nginx, Redis and systemd's
//! `PIDFile=` expect (`kill $(cat taskd.pid)` works). The address `taskd status` asks for its
//! `stats` is in a second file beside it, [`addr_path`] (`taskd.pid` → `taskd.addr`), written
//! first and removed last, the same safe way.
//!
//! Exit codes follow the LSB init script conventions, so scripts can rely on them:
//!
//! | command | 0 | 1 | 3 | 4 | 6 | 7 |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | `status` | running | dead, pid file left | not running | unknown (no --pid-file, unreadable) | | |
//! | `stop` | stopped, or was not running | still running after the timeout | | no permission | no --pid-file | |
//! | `reload` | signalled | | | no permission | no --pid-file | not running |
//! | `cancel N` | cancelled | not cancelled | | token unreadable | no --pid-file | not running |

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const EXIT_OK: u8 = 0;
/// Generic failure; for `status`: dead, but its pid file is still there.
pub const EXIT_FAILED: u8 = 1;
/// `status` only: not running.
pub const EXIT_NOT_RUNNING: u8 = 3;
/// `status`: its state is unknown; other commands: insufficient privilege.
pub const EXIT_UNKNOWN: u8 = 4;
/// Not configured: there is no pid file to find the daemon by.
pub const EXIT_NOT_CONFIGURED: u8 = 6;
/// `reload` (any action but `stop` and `status`) of a daemon that is not running.
pub const EXIT_RELOAD_NOT_RUNNING: u8 = 7;

/// Where the address of the daemon of pid file `path` is kept: beside it, `.addr` for its
/// extension (`taskd.pid` → `taskd.addr`; a pid file named `x.addr` gets `x.addr.addr`).
pub fn addr_path(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "addr") {
        let mut name = path.as_os_str().to_owned();
        name.push(".addr");
        return PathBuf::from(name);
    }
    path.with_extension("addr")
}

/// Where the daemon of pid file `path` keeps its operator token (`taskd.pid` → `taskd.token`),
/// mode 0600: who can read it may cancel any job (`taskd cancel N`), as who can signal the
/// master may stop it.
pub fn token_path(path: &Path) -> PathBuf {
    let token = addr_path(path).with_extension("token");
    if token == path {
        // A pid file named `x.token`: its token goes to `x.token.token`.
        let mut name = path.as_os_str().to_owned();
        name.push(".token");
        return PathBuf::from(name);
    }
    token
}

/// Writes a fresh random operator token beside the pid file; returns it.
pub fn write_token(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let file = token_path(path);
    crate::files::replace(&file, format!("{token}\n").as_bytes(), 0o600)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
    Ok(token)
}

/// What the pid file (and the address file beside it) say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidFile {
    pub pid: u32,
    /// None when the address file is missing or unreadable: `status` then says less.
    pub addr: Option<SocketAddr>,
}

impl PidFile {
    /// Reads the pid (the whole file, one number: a trailing newline is forgiven) and the
    /// address beside it.
    pub fn read(path: &Path) -> std::io::Result<PidFile> {
        let text = std::fs::read_to_string(path)?;
        let pid = text.trim().parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} does not hold a pid: {:?}",
                    path.display(),
                    text.chars().take(40).collect::<String>()
                ),
            )
        })?;
        let addr = std::fs::read_to_string(addr_path(path)).ok().and_then(|a| a.trim().parse().ok());
        Ok(PidFile { pid, addr })
    }

    /// Writes the address file, then the pid file, each atomically (a reader never sees half
    /// of one), mode 0644, through an exclusive create of a temporary that follows no link
    /// planted at its name. An error names the file.
    pub fn write(path: &Path, pid: u32, addr: SocketAddr) -> std::io::Result<()> {
        let mode = crate::files::PID_MODE;
        let addr_file = addr_path(path);
        let named = |p: &Path| {
            let p = p.display().to_string();
            move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{p}: {e}"))
        };
        crate::files::replace(&addr_file, format!("{addr}\n").as_bytes(), mode).map_err(named(&addr_file))?;
        crate::files::replace(path, format!("{pid}\n").as_bytes(), mode).map_err(|e| {
            // No address file without its pid file.
            let _ = std::fs::remove_file(&addr_file);
            named(path)(e)
        })
    }

    /// Removes the file (and the address beside it) if it still names `pid` (a newer daemon
    /// may have taken it over).
    pub fn remove_if_ours(path: &Path, pid: u32) {
        if PidFile::read(path).is_ok_and(|f| f.pid == pid) {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(addr_path(path));
            let _ = std::fs::remove_file(token_path(path));
        }
    }
}

/// Whether `pid` is a running taskd master (not just any process that reused the pid).
pub fn is_taskd_master(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()))
        .is_some_and(|state| state != 'Z');
    alive && cmdline.starts_with(b"taskd: master")
}

/// The running daemon named by the pid file, if any.
pub fn running(path: &Path) -> Option<PidFile> {
    PidFile::read(path).ok().filter(|f| is_taskd_master(f.pid))
}

/// Refuses to start a second daemon on the same pid file.
pub fn check_not_running(path: &Path) -> Result<(), String> {
    match running(path) {
        Some(f) => Err(format!("taskd is already running (pid {}, pid file {})", f.pid, path.display())),
        None => Ok(()),
    }
}

/// What the pid file says about the daemon.
#[derive(Debug)]
enum Found {
    Running(PidFile),
    /// No pid file: not running (or never started with this one).
    NoPidFile,
    /// A pid file whose process is gone (or is not taskd): it died without removing it.
    Stale(u32),
    /// The pid file cannot be read or holds no pid: the state is unknown.
    Unreadable(std::io::Error),
}

fn find(path: &Path) -> Found {
    match PidFile::read(path) {
        Ok(f) if is_taskd_master(f.pid) => Found::Running(f),
        Ok(f) => Found::Stale(f.pid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Found::NoPidFile,
        Err(e) => Found::Unreadable(e),
    }
}

/// The pid file a control command needs; without one, says so (LSB: not configured).
fn configured(pid_file: Option<&PathBuf>, code: u8) -> Result<&Path, u8> {
    pid_file.map(PathBuf::as_path).ok_or_else(|| {
        eprintln!("taskd: this command needs --pid-file (or pid_file in the config, or TASKD_PID_FILE)");
        code
    })
}

fn signal(pid: u32, sig: Signal) -> Result<(), u8> {
    kill(Pid::from_raw(pid as i32), sig).map_err(|e| {
        eprintln!("taskd: cannot send {sig} to pid {pid}: {e}");
        if e == nix::errno::Errno::EPERM {
            EXIT_UNKNOWN
        } else {
            EXIT_FAILED
        }
    })
}

/// `taskd stop`: SIGTERM, then wait until the master is gone. Stopping a daemon that is not
/// running succeeds (LSB), and says so.
pub fn stop(pid_file: Option<&PathBuf>, timeout: Duration) -> u8 {
    let path = match configured(pid_file, EXIT_NOT_CONFIGURED) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let daemon = match find(path) {
        Found::Running(d) => d,
        Found::NoPidFile => {
            println!("taskd is not running (no pid file {}): nothing to stop", path.display());
            return EXIT_OK;
        }
        Found::Stale(pid) => {
            println!(
                "taskd is not running (pid file {} names pid {pid}, which is not taskd): nothing to stop",
                path.display()
            );
            return EXIT_OK;
        }
        Found::Unreadable(e) => {
            eprintln!("taskd: cannot read the pid file {}: {e}", path.display());
            return if e.kind() == std::io::ErrorKind::PermissionDenied { EXIT_UNKNOWN } else { EXIT_FAILED };
        }
    };
    if let Err(code) = signal(daemon.pid, Signal::SIGTERM) {
        return code;
    }
    let start = Instant::now();
    while is_taskd_master(daemon.pid) {
        if start.elapsed() > timeout {
            eprintln!("taskd: pid {} is still running {timeout:?} after SIGTERM", daemon.pid);
            return EXIT_FAILED;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("taskd stopped (pid {})", daemon.pid);
    EXIT_OK
}

/// `taskd reload [--tasks]`: a rolling replacement of the workers or the task processes.
pub fn reload(pid_file: Option<&PathBuf>, tasks: bool) -> u8 {
    let path = match configured(pid_file, EXIT_NOT_CONFIGURED) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let daemon = match find(path) {
        Found::Running(d) => d,
        Found::NoPidFile | Found::Stale(_) => {
            eprintln!("taskd: cannot reload: taskd is not running (pid file {})", path.display());
            return EXIT_RELOAD_NOT_RUNNING;
        }
        Found::Unreadable(e) => {
            eprintln!("taskd: cannot read the pid file {}: {e}", path.display());
            return if e.kind() == std::io::ErrorKind::PermissionDenied { EXIT_UNKNOWN } else { EXIT_FAILED };
        }
    };
    let (sig, what) = if tasks { (Signal::SIGUSR2, "task processes") } else { (Signal::SIGUSR1, "workers") };
    match signal(daemon.pid, sig) {
        Ok(()) => {
            println!("reloading the {what} of taskd (pid {}), one at a time", daemon.pid);
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// `taskd status`: running or not, and the daemon's own `stats` when it answers.
pub fn status(pid_file: Option<&PathBuf>) -> u8 {
    let path = match configured(pid_file, EXIT_UNKNOWN) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let daemon = match find(path) {
        Found::Running(d) => d,
        Found::NoPidFile => {
            println!("taskd is not running (no pid file {})", path.display());
            return EXIT_NOT_RUNNING;
        }
        Found::Stale(pid) => {
            println!(
                "taskd is not running, but its pid file {} is left, naming pid {pid}: it did not stop \
                 cleanly (killed?)",
                path.display()
            );
            return EXIT_FAILED;
        }
        Found::Unreadable(e) => {
            println!("taskd status unknown: cannot read the pid file {}: {e}", path.display());
            return EXIT_UNKNOWN;
        }
    };
    let stats = daemon.addr.and_then(|addr| fetch_stats(addr).ok());
    match (stats, daemon.addr) {
        (Some(stats), Some(addr)) => {
            let uptime = stats["uptime_ms"].as_u64().unwrap_or(0) / 1000;
            println!("taskd is running: pid {}, listening on {addr}, up {uptime}s", daemon.pid);
            println!("{}", serde_json::to_string_pretty(&stats).unwrap_or_default());
        }
        (_, None) => println!(
            "taskd is running: pid {} (its address file {} cannot be read, so no stats)",
            daemon.pid,
            addr_path(path).display()
        ),
        (None, Some(addr)) => {
            println!(
                "taskd is running: pid {}, listening on {addr} (it did not answer a stats request)",
                daemon.pid
            )
        }
    }
    EXIT_OK
}

/// `taskd cancel N`: asks the daemon, over its own port with the operator token kept beside
/// its pid file, to cancel job N. Prints the answer; 0 if the job was cancelled, 1 if not (the
/// answer says why), 4 if the token cannot be read, 6 without a pid file, 7 if not running.
pub fn cancel(pid_file: Option<&PathBuf>, task_id: u64) -> u8 {
    let path = match configured(pid_file, EXIT_NOT_CONFIGURED) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let Found::Running(daemon) = find(path) else {
        eprintln!("taskd is not running (pid file {})", path.display());
        return EXIT_RELOAD_NOT_RUNNING;
    };
    let Some(addr) = daemon.addr else {
        eprintln!("taskd: cannot read the daemon's address file {}", addr_path(path).display());
        return EXIT_UNKNOWN;
    };
    let token = match std::fs::read_to_string(token_path(path)) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            eprintln!(
                "taskd: cannot read the operator token {}: {e} (run as the daemon's user or root)",
                token_path(path).display()
            );
            return EXIT_UNKNOWN;
        }
    };
    let line = serde_json::json!({"type": "cancel", "task_id": task_id, "token": token}).to_string();
    match ask(addr, &line) {
        Ok(answer) => {
            println!("{answer}");
            if answer["event"] == "cancelled" {
                EXIT_OK
            } else {
                EXIT_FAILED
            }
        }
        Err(e) => {
            eprintln!("taskd: asking the daemon at {addr} failed: {e}");
            EXIT_FAILED
        }
    }
}

/// Asks the daemon for its `stats` line over its own port.
pub fn fetch_stats(addr: SocketAddr) -> std::io::Result<serde_json::Value> {
    ask(addr, "stats")
}

/// Sends the daemon one request line over its own port; its one answer.
fn ask(addr: SocketAddr, request: &str) -> std::io::Result<serde_json::Value> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_roundtrips_and_is_removed_only_by_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taskd.pid");
        PidFile::write(&path, 1234, "127.0.0.1:9501".parse().unwrap()).unwrap();
        // The pid alone, one line: `kill $(cat taskd.pid)`, systemd's PIDFile=.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1234\n");
        assert_eq!(std::fs::read_to_string(dir.path().join("taskd.addr")).unwrap(), "127.0.0.1:9501\n");
        let f = PidFile::read(&path).unwrap();
        assert_eq!(f, PidFile { pid: 1234, addr: Some("127.0.0.1:9501".parse().unwrap()) });
        PidFile::remove_if_ours(&path, 99);
        assert!(path.exists());
        PidFile::remove_if_ours(&path, 1234);
        assert!(!path.exists());
        assert!(!addr_path(&path).exists());
    }

    #[test]
    fn the_address_file_never_is_the_pid_file() {
        assert_eq!(addr_path(Path::new("/run/taskd.pid")), Path::new("/run/taskd.addr"));
        assert_eq!(addr_path(Path::new("/run/taskd")), Path::new("/run/taskd.addr"));
        assert_eq!(addr_path(Path::new("/run/x.addr")), Path::new("/run/x.addr.addr"));
    }

    #[test]
    fn a_pid_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("taskd.pid");
        let err = PidFile::write(&path, 1, "127.0.0.1:1".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("missing-dir"), "{err}");
        let garbage = dir.path().join("garbage.pid");
        std::fs::write(&garbage, "127.0.0.1:9501\n").unwrap();
        let err = PidFile::read(&garbage).unwrap_err();
        assert!(
            err.to_string().contains("garbage.pid") && err.to_string().contains("does not hold a pid"),
            "{err}"
        );
    }

    #[test]
    fn a_stale_pid_file_does_not_count_as_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taskd.pid");
        // Our own pid: alive, but not a taskd master.
        PidFile::write(&path, std::process::id(), "127.0.0.1:1".parse().unwrap()).unwrap();
        assert!(running(&path).is_none());
        check_not_running(&path).unwrap();
    }
}
