//! Signals as readable events: each process blocks the signals it handles and reads them from
//! a `signalfd` in its own reactor.
//!
//! No handler runs in signal context, and nothing of it survives a fork by accident: a child
//! sets its own mask and opens its own signalfd (the parent's was closed at fork), which
//! process-global handler registries would not give us across `fork`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

pub struct Signals {
    fd: SignalFd,
}

/// Blocks exactly `signals` in this process (unblocking everything else).
pub fn set_blocked(signals: &[Signal]) -> io::Result<()> {
    let mut set = SigSet::empty();
    for &s in signals {
        set.add(s);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&set), None)?;
    Ok(())
}

/// A file size limit (`RLIMIT_FSIZE`, a service's `LimitFSIZE=`) then makes a write past it
/// fail with `EFBIG`, which the writer reports (a job whose outbox line cannot be written
/// fails, and says why), instead of killing the process with `SIGXFSZ` (its jobs would die
/// with it, run again and kill the next one). Inherited by every process forked after it;
/// PostgreSQL does the same.
pub fn ignore_file_size_signal() -> io::Result<()> {
    // SAFETY: sets the disposition to SIG_IGN: no handler, so no code runs in signal context.
    unsafe { nix::sys::signal::signal(Signal::SIGXFSZ, nix::sys::signal::SigHandler::SigIgn) }?;
    Ok(())
}

impl Signals {
    /// Blocks `signals` and opens a non-blocking signalfd that reports them.
    pub fn open(signals: &[Signal]) -> io::Result<Signals> {
        set_blocked(signals)?;
        let mut set = SigSet::empty();
        for &s in signals {
            set.add(s);
        }
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Every signal delivered since the last call.
    pub fn pending(&mut self) -> Vec<Signal> {
        let mut out = Vec::new();
        while let Ok(Some(info)) = self.fd.read_signal() {
            if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                out.push(sig);
            }
        }
        out
    }
}
