//! The open-file limit the master needs for `max_conn` connections, raised at start.

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
