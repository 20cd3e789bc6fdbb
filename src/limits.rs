//! The open-file limit the master needs for `max_conn` connections, raised at start; and
//! the allocator told to give large buffers back, so that memory budgets hold for RSS.

use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors the daemon needs besides client connections: channels, listener, epoll, logs.
pub fn reserved_fds(worker_num: usize, task_worker_num: usize) -> u64 {
    4 * (worker_num + task_worker_num) as u64 + 64
}

/// Raises the soft RLIMIT_NOFILE to what `max_conn` needs. Returns how many connections can
/// really be held: `max_conn`, or less when the hard limit is too low (logged clearly).
pub fn raise_nofile(max_conn: usize, reserved: u64) -> usize {
    let needed = max_conn as u64 + reserved;
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE): {e}");
            return max_conn;
        }
    };
    let target = needed.min(hard);
    if soft < target {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => tracing::debug!("raised the open-file limit from {soft} to {target}"),
            Err(e) => {
                tracing::warn!("cannot raise the open-file limit from {soft} to {target}: {e}");
                return soft.saturating_sub(reserved).max(1) as usize;
            }
        }
    }
    if hard < needed {
        let usable = hard.saturating_sub(reserved).max(1) as usize;
        let message = format!(
            "the hard open-file limit (RLIMIT_NOFILE) is {hard}, below the {needed} that max_conn {max_conn} needs: \
             taskd will hold at most {usable} connections; raise it (ulimit -Hn, or LimitNOFILE= in a systemd unit)"
        );
        // The default max_conn is a ceiling, not a request: say it quietly.
        if max_conn == crate::config::ServerConfig::default().max_conn {
            tracing::info!("{message}");
        } else {
            tracing::warn!("{message}");
        }
        return usable;
    }
    max_conn
}

/// Buffers this large or larger get their own mapping, given back to the system when freed.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Keeps glibc from raising its mmap threshold as large buffers come and go. By default a freed
/// mapped buffer raises the threshold to its size (up to 32 MiB), after which unfinished lines,
/// replay logs and reply buffers of megabytes come from the heap, whose freed middle is never
/// given back: the master's RSS then stays at its peak long after the budget's bytes were
/// freed, and growing a buffer copies it instead of remapping it. Called before the first fork,
/// so every process inherits it.
pub fn return_large_buffers() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets a parameter of the allocator; called while the process is
        // single-threaded, before any fork.
        let ok = unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay resident");
        }
    }
}

/// Hands the heap's free pages back to the system (glibc keeps all but the top of the heap by
/// itself). Called before every fork: a child maps every resident page of its parent's heap,
/// copy-on-write, and so counts the free ones in its RSS too, though it will only ever write
/// them; taskd's start leaves most of its heap free (parsing flags and config, ~0.8 MB, then
/// freed), and a manager forked again later would take a busy master's freed buffers.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Bytes of buffers freed since the heap was last trimmed.
static FREED: AtomicUsize = AtomicUsize::new(0);
/// How much freeing is worth a trim.
const TRIM_EVERY: usize = 8 * 1024 * 1024;

/// Client buffers of `bytes` were freed. A buffer that started small lives in the heap even
/// once large (glibc serves a large request from free heap space before it maps), and glibc
/// gives back only the top of the heap by itself: after a flood of unfinished lines the freed
/// middle stays resident. Every `TRIM_EVERY` bytes freed, `malloc_trim` hands those pages back.
pub fn freed(bytes: usize) {
    let total = FREED.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if total >= TRIM_EVERY {
        FREED.store(0, Ordering::Relaxed);
        trim_heap();
    }
}
