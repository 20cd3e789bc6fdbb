//! How taskd makes and names processes: the only `fork`, the child's start-up hygiene, the
//! process title, reaping, and why a child ended ([`ProcessError`]).
//!
//! Every process forks only while it is single-threaded (taskd starts no threads at all), and
//! a child never returns into its parent's code: it runs its entry and ends with `_exit`. Its
//! entry returns a [`ProcessError`] and `?`s through its set-up: [`spawn`] logs it, once, and
//! picks the exit status from it. Which slot the child fills and when it is replaced is the
//! [`crate::supervisor`]'s.

use std::collections::HashSet;
use std::ffi::CString;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getppid, ForkResult, Pid};

use crate::ipc::envelope::DecodeError;
use crate::ipc::ExitReason;

/// Why a process's entry ended it: what it was doing when a call failed. [`spawn`] logs it
/// (`worker 0 (pid 41): cannot watch its channel: …`) and exits with [`ProcessError::status`].
#[derive(Debug)]
pub enum ProcessError {
    /// A call of its set-up or of its loop failed: `what` says which, as a person reads it.
    Io { what: &'static str, source: io::Error },
    /// It could not take the user and group it runs as.
    Credentials { creds: Credentials, source: io::Error },
    /// The application's `on_worker_start` refused to start (a missing outbox, say).
    Start(String),
    /// The master (every channel's other end) sent bytes that do not decode: the link cannot
    /// be trusted.
    Corrupt(DecodeError),
    /// The master is gone (its channel closed) while the process still had work.
    MasterGone,
}

impl ProcessError {
    /// A closure for `map_err`: `what` failed with an I/O error.
    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> ProcessError {
        move |source| ProcessError::Io { what, source }
    }

    /// The exit status it ends with (what the supervisor's back-off and the logs see): every
    /// error is an unclean end, 1.
    pub fn status(&self) -> i32 {
        1
    }
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::Io { what, source } => write!(f, "{what}: {source}"),
            ProcessError::Credentials { creds, source } => {
                write!(f, "cannot switch to uid {} gid {}: {source}", creds.uid, creds.gid)
            }
            ProcessError::Start(why) => write!(f, "cannot start: {why}"),
            ProcessError::Corrupt(e) => write!(f, "corrupt message from the master: {e}"),
            ProcessError::MasterGone => f.write_str("the master is gone"),
        }
    }
}

impl std::error::Error for ProcessError {}

/// Forks a child named `name` (its process title is `taskd: NAME`) that runs `entry`; an error
/// it returns is logged here, once, and picks its exit status (0 when it returns `Ok`).
///
/// In the child, every inherited file descriptor except stdio and `keep` is closed first, so
/// that no process holds a client socket, a listening socket or another slot's channel it does
/// not own (a client must see its connection close when the master closes it).
pub fn spawn(
    name: &str,
    keep: &[RawFd],
    entry: impl FnOnce() -> Result<(), ProcessError>,
) -> io::Result<Pid> {
    match fork_now()? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            set_title(&format!("taskd: {name}"));
            let result =
                close_inherited_fds(keep).map_err(ProcessError::io("cannot close inherited descriptors"));
            let code = match result.map(|()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(entry))) {
                Ok(Ok(Ok(()))) => 0,
                Ok(Ok(Err(e))) | Err(e) => {
                    tracing::error!("{name} (pid {}): {e}", std::process::id());
                    e.status()
                }
                // The panic hook has logged it.
                Ok(Err(_)) => 101,
            };
            exit_now(code)
        }
    }
}

/// The one `fork` of taskd.
fn fork_now() -> io::Result<ForkResult> {
    // Anything buffered now would otherwise be written twice, once by each process.
    crate::logging::flush();
    // Free heap pages and dead stack pages would be mapped into the child too, and counted in
    // its RSS.
    trim_stack();
    crate::limits::trim_heap();
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: no process of taskd that forks has started a thread (the one with threads, the
    // redis bridge, never forks), so the child is a complete copy of a single-threaded process; callers make the child `_exit` rather than return into code
    // that would run the parent's destructors twice.
    let forked = unsafe { fork() }.map_err(io::Error::from)?;
    if let ForkResult::Child = forked {
        crate::logging::forked();
    }
    Ok(forked)
}

/// How much of the stack below the frame of [`trim_stack`] is kept: the calls it makes (and
/// x86-64's red zone) live there while it trims.
const STACK_KEPT_BELOW: usize = 8 * 1024;

/// Hands back the pages of the main thread's stack below the frames live now. Nothing reads
/// them before writing them again (a deeper call of the past left them: the master's parsing
/// of flags and config goes about 80 kB deep), but a child maps every one of them,
/// copy-on-write, and counts them in its RSS.
fn trim_stack() {
    let here = 0u8;
    let sp = std::hint::black_box(&here) as *const u8 as usize;
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
    let stack = maps.lines().filter(|l| l.ends_with("[stack]")).find_map(|l| {
        let (lo, hi) = l.split_once(' ')?.0.split_once('-')?;
        Some((usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?))
    });
    // Only the main thread's stack is `[stack]` (a process that forks has no other thread).
    let Some((lo, _)) = stack.filter(|(lo, hi)| (*lo..*hi).contains(&sp)) else { return };
    let page =
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as usize;
    let end = sp.saturating_sub(STACK_KEPT_BELOW) & !(page - 1);
    let Some(start) = std::ptr::NonNull::new(lo as *mut std::ffi::c_void).filter(|_| end > lo) else {
        return;
    };
    // SAFETY: [lo, end) is the stack below every live frame (end is 8 kB under this one, and
    // madvise's own frames are within that); MADV_DONTNEED drops its pages, and a later touch
    // maps a zeroed page, which is all a frame pushed there expects.
    let _ = unsafe { nix::sys::mman::madvise(start, end - lo, nix::sys::mman::MmapAdvise::MADV_DONTNEED) };
}

/// The first step of `--daemonize`, before taskd opens anything: closes every descriptor above
/// stderr inherited from whoever started it (a daemon must not keep its launcher's files,
/// sockets or pipes open for its whole life), and sets the umask to 027, so that no file the
/// daemon creates is writable by its group or readable by others, whatever the caller's umask.
pub fn prepare_daemon() -> io::Result<()> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    close_inherited_fds(&[])
}

/// Detaches from the terminal: double fork, `setsid`, stdio to /dev/null (stderr too unless
/// `keep_stderr`, when it already points at the log file).
///
/// Returns in the daemon with the write end of a pipe: write the lines to show the user
/// (`taskd listening on …`, or `error: …`) and close it. The original process prints them,
/// and exits 0 once the daemon reported it is listening, 1 otherwise.
pub fn daemonize(keep_stderr: bool) -> io::Result<OwnedFd> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    if let ForkResult::Parent { child } = fork_now()? {
        drop(write_end);
        let mut report = String::new();
        let _ = io::Read::read_to_string(&mut std::fs::File::from(read_end), &mut report);
        let _ = waitpid(child, None);
        let ok = report.starts_with("taskd listening on ");
        if ok {
            print!("{report}");
        } else if report.is_empty() {
            eprintln!("taskd: the daemon exited before it was listening (see its log file)");
        } else {
            eprint!("taskd: {}", report.strip_prefix("error: ").unwrap_or(&report));
        }
        exit_now(if ok { 0 } else { 1 });
    }
    drop(read_end);
    nix::unistd::setsid()?;
    // The session leader exits, so the daemon can never acquire a controlling terminal.
    if let ForkResult::Parent { .. } = fork_now()? {
        exit_now(0);
    }
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    if !keep_stderr {
        nix::unistd::dup2_stderr(&null)?;
    }
    Ok(write_end)
}

/// Whom workers and task processes run as (`--user`, `--group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
}

/// Looks the user (and group) up; an unknown name or a non-root master is an error.
pub fn resolve_credentials(user: &str, group: Option<&str>) -> Result<Credentials, String> {
    let found = nix::unistd::User::from_name(user)
        .map_err(|e| format!("invalid user: cannot look up {user:?}: {e}"))?
        .ok_or_else(|| format!("invalid user: no user named {user:?}"))?;
    let gid = match group {
        None => found.gid,
        Some(g) => {
            nix::unistd::Group::from_name(g)
                .map_err(|e| format!("invalid group: cannot look up {g:?}: {e}"))?
                .ok_or_else(|| format!("invalid group: no group named {g:?}"))?
                .gid
        }
    };
    if !nix::unistd::geteuid().is_root() && nix::unistd::geteuid() != found.uid {
        return Err(format!(
            "invalid user: switching to {user:?} needs root (taskd runs as uid {})",
            nix::unistd::geteuid()
        ));
    }
    Ok(Credentials { uid: found.uid, gid })
}

/// Drops root for good: supplementary groups, then group, then user.
///
/// The kernel clears the parent-death signal when the credentials change: call
/// [`die_with_parent`] after this, not before.
pub fn drop_privileges(creds: Credentials) -> io::Result<()> {
    if nix::unistd::geteuid() == creds.uid {
        return Ok(());
    }
    nix::unistd::setgroups(&[creds.gid])?;
    nix::unistd::setgid(creds.gid)?;
    nix::unistd::setuid(creds.uid)?;
    Ok(())
}

/// Ends the process without running the parent's destructors or atexit handlers.
pub fn exit_now(code: i32) -> ! {
    crate::logging::flush();
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: `_exit` is async-signal-safe and takes no pointers; nothing runs after it.
    unsafe { nix::libc::_exit(code) }
}

fn close_inherited_fds(keep: &[RawFd]) -> io::Result<()> {
    let keep: HashSet<RawFd> = keep.iter().copied().chain([0, 1, 2]).collect();
    let mut doomed = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) {
            if !keep.contains(&fd) {
                doomed.push(fd);
            }
        }
    }
    // The directory's own descriptor is in the list but already closed: EBADF is fine.
    for fd in doomed {
        // SAFETY: the values behind these fds (if any) belong to the parent's stack frames,
        // which this process never returns to, so nothing will use or close them again.
        unsafe {
            nix::libc::close(fd);
        }
    }
    Ok(())
}

/// Makes this process die with its parent, and dies now if the parent is already gone
/// (the race between fork and `prctl`). After [`drop_privileges`]: a change of credentials
/// clears the parent-death signal.
pub fn die_with_parent(expected_parent: Pid) {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        tracing::warn!("PR_SET_PDEATHSIG failed: {e}");
    }
    if getppid() != expected_parent {
        exit_now(0);
    }
}

/// Names this process so that `ps -e -o pid,ppid,comm,args` shows its role and slot
/// (`taskd: worker 0`), and so does every log line it writes (`worker 0`).
///
/// `comm` (15 bytes) is set with `PR_SET_NAME`; `args` by overwriting the original argument
/// strings in place, which is the one place `ps` reads them from (truncated to their length).
pub fn set_title(title: &str) {
    crate::logging::set_process(title.strip_prefix("taskd: ").unwrap_or(title));
    if let Ok(name) = CString::new(title) {
        let _ = nix::sys::prctl::set_name(&name);
    }
    if let Some((start, end)) = arg_area() {
        let len = end - start;
        if len == 0 {
            return;
        }
        // SAFETY: [arg_start, arg_end) is this process's own argument block on its initial
        // stack, readable and writable; the standard library only reads it through raw
        // pointers (env::args), and we keep the final NUL inside the area.
        let area = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, len) };
        let n = title.len().min(len - 1);
        area[..n].copy_from_slice(&title.as_bytes()[..n]);
        area[n..].fill(0);
    }
}

/// Where the kernel says our argument strings are (fields 48 and 49 of /proc/self/stat).
fn arg_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may itself hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field N is at index N - 3.
    let start = fields.get(48 - 3)?.parse().ok()?;
    let end = fields.get(49 - 3)?.parse().ok()?;
    (end > start).then_some((start, end))
}

/// One child reaped by [`reap`].
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    pub pid: Pid,
    pub reason: ExitReason,
}

/// Collects every child that has ended, without blocking.
pub fn reap() -> Vec<Reaped> {
    let mut out = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push(Reaped { pid, reason: ExitReason::Code(code) }),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                out.push(Reaped { pid, reason: ExitReason::Signal(sig as i32) })
            }
            Ok(WaitStatus::StillAlive) => break,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break, // ECHILD: no children left.
        }
    }
    out
}

/// Waits until `pid` has exited, up to `limit`; returns how it ended if it did.
pub fn wait_for(pid: Pid, limit: Duration) -> Option<ExitReason> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(ExitReason::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Some(ExitReason::Signal(sig as i32)),
            Err(nix::errno::Errno::ECHILD) => return Some(ExitReason::Code(0)),
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
