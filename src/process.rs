//! How taskd makes and names processes: the only `fork`, the child's start-up hygiene, the
//! process title, and reaping.
//!
//! Every process forks only while it is single-threaded (taskd starts no threads at all), and
//! a child never returns into its parent's code: it runs its entry and ends with `_exit`.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getppid, ForkResult, Pid};

use crate::ipc::ExitReason;

/// Forks a child that runs `entry` and exits with the code it returns.
///
/// In the child, every inherited file descriptor except stdio and `keep` is closed first, so
/// that no process holds a client socket, a listening socket or another slot's channel it does
/// not own (a client must see its connection close when the master closes it).
pub fn spawn(keep: &[RawFd], entry: impl FnOnce() -> i32) -> io::Result<Pid> {
    // Anything buffered now would otherwise be written twice, once by each process.
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: taskd never starts a thread, so the child is a complete copy of a
    // single-threaded process; it only runs `entry` and then `_exit`s.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            let code = match close_inherited_fds(keep) {
                Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(entry)).unwrap_or(101),
                Err(e) => {
                    tracing::error!("child could not close inherited descriptors: {e}");
                    1
                }
            };
            exit_now(code)
        }
    }
}

/// Ends the process without running the parent's destructors or atexit handlers.
pub fn exit_now(code: i32) -> ! {
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
/// (the race between fork and `prctl`).
pub fn die_with_parent(expected_parent: Pid) {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        tracing::warn!("PR_SET_PDEATHSIG failed: {e}");
    }
    if getppid() != expected_parent {
        exit_now(0);
    }
}

/// Names this process so that `ps -e -o pid,ppid,comm,args` shows its role and slot.
///
/// `comm` (15 bytes) is set with `PR_SET_NAME`; `args` by overwriting the original argument
/// strings in place, which is the one place `ps` reads them from (truncated to their length).
pub fn set_title(title: &str) {
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
