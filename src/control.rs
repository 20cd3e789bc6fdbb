//! Running taskd as a service: the pid file, and the control commands (`stop`, `reload`,
//! `status`) that find the daemon through it. Exit codes follow the LSB init script
//! conventions, so scripts can rely on them: 0 done / running, 1 failed, 3 not running.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_NOT_RUNNING: u8 = 3;

/// What the pid file says: the master's pid, then the address it listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidFile {
    pub pid: u32,
    pub addr: Option<SocketAddr>,
}

impl PidFile {
    pub fn read(path: &Path) -> std::io::Result<PidFile> {
        let text = std::fs::read_to_string(path)?;
        let mut lines = text.lines();
        let pid = lines.next().and_then(|l| l.trim().parse().ok()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "no pid on its first line")
        })?;
        let addr = lines.next().and_then(|l| l.trim().parse().ok());
        Ok(PidFile { pid, addr })
    }

    /// Writes the file atomically (a reader never sees half of it), mode 0644, through an
    /// exclusive create of a temporary that follows no link planted at its name.
    pub fn write(path: &Path, pid: u32, addr: SocketAddr) -> std::io::Result<()> {
        crate::files::replace(path, format!("{pid}\n{addr}\n").as_bytes(), crate::files::PID_MODE)
    }

    /// Removes the file if it still names `pid` (a newer daemon may have taken it over).
    pub fn remove_if_ours(path: &Path, pid: u32) {
        if PidFile::read(path).is_ok_and(|f| f.pid == pid) {
            let _ = std::fs::remove_file(path);
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

/// The daemon a control command acts on; otherwise the exit code, said to the user.
fn find_daemon(pid_file: Option<&PathBuf>) -> Result<PidFile, u8> {
    let Some(path) = pid_file else {
        eprintln!("taskd: this command needs --pid-file (or pid_file in the config, or TASKD_PID_FILE)");
        return Err(EXIT_FAILED);
    };
    running(path).ok_or_else(|| {
        println!("taskd is not running (pid file {})", path.display());
        EXIT_NOT_RUNNING
    })
}

fn signal(pid: u32, sig: Signal) -> Result<(), u8> {
    kill(Pid::from_raw(pid as i32), sig).map_err(|e| {
        eprintln!("taskd: cannot send {sig} to pid {pid}: {e}");
        EXIT_FAILED
    })
}

/// `taskd stop`: SIGTERM, then wait until the master is gone.
pub fn stop(pid_file: Option<&PathBuf>, timeout: Duration) -> u8 {
    let daemon = match find_daemon(pid_file) {
        Ok(d) => d,
        Err(code) => return code,
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
    let daemon = match find_daemon(pid_file) {
        Ok(d) => d,
        Err(code) => return code,
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
    let daemon = match find_daemon(pid_file) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let stats = daemon.addr.and_then(|addr| fetch_stats(addr).ok());
    match stats {
        Some(stats) => {
            let uptime = stats["uptime_ms"].as_u64().unwrap_or(0) / 1000;
            println!(
                "taskd is running: pid {}, listening on {}, up {}s",
                daemon.pid,
                daemon.addr.map(|a| a.to_string()).unwrap_or_default(),
                uptime
            );
            println!("{}", serde_json::to_string_pretty(&stats).unwrap_or_default());
        }
        None => println!("taskd is running: pid {} (it did not answer a stats request)", daemon.pid),
    }
    EXIT_OK
}

/// Asks the daemon for its `stats` line over its own port.
pub fn fetch_stats(addr: SocketAddr) -> std::io::Result<serde_json::Value> {
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
    stream.write_all(b"stats\n")?;
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
        let f = PidFile::read(&path).unwrap();
        assert_eq!(f, PidFile { pid: 1234, addr: Some("127.0.0.1:9501".parse().unwrap()) });
        PidFile::remove_if_ours(&path, 99);
        assert!(path.exists());
        PidFile::remove_if_ours(&path, 1234);
        assert!(!path.exists());
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
