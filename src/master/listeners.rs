//! What bounds every listener: a deadline for each metrics exchange and WebSocket upgrade
//! (`handshake_timeout`), the metrics connection limit, the line port's refusal of HTTP, and
//! running out of descriptors, which refuses new connections instead of leaving them waiting.

use super::*;

// The rate limit of repeated warnings (one module for the whole crate); `Throttle` is named
// here too for the listeners' users (`ws.rs`).
pub(super) use crate::throttle::{unlogged, Throttle};

/// A connection that must finish its handshake by a deadline.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pending {
    /// A WebSocket connection not upgraded yet (its session tells it from a later one).
    Ws {
        key: usize,
        session: u64,
    },
    Metrics {
        key: usize,
        serial: u64,
    },
}

/// Which listener an accept was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listener {
    Line,
    Ws,
    Metrics,
}

/// The state of the listeners' limits, kept by the master.
pub(super) struct Guard {
    /// Which pages may open a WebSocket.
    pub origins: crate::net::OriginPolicy,
    /// Deadlines in the order of accepts (all the same length, so the front is the next one).
    /// Entries of connections that finished in time stay until their deadline and are skipped.
    pub deadlines: VecDeque<(Instant, Pending)>,
    /// WebSocket connections not upgraded yet.
    pub ws_handshaking: usize,
    pub metrics_serial: u64,
    /// A descriptor kept in reserve: out of descriptors, it is closed to accept (and close at
    /// once) the connection waiting, so that the listener's queue does not fill with clients
    /// that wait forever, then reopened.
    spare: Option<std::fs::File>,
    /// Warnings, one per kind and `WARN_EVERY`.
    fd_warning: Throttle,
    /// Any other accept failure (retried every `ACCEPT_RETRY`).
    accept_warning: Throttle,
    /// Per listener (`Listener as usize`): at its limit.
    full_warning: [Throttle; 3],
    http_warning: Throttle,
    pub origin_warning: Throttle,
}

impl Guard {
    pub fn new(config: &ServerConfig) -> Guard {
        Guard {
            origins: crate::net::OriginPolicy::new(&config.host, &config.ws_allow_origin),
            deadlines: VecDeque::new(),
            ws_handshaking: 0,
            metrics_serial: 0,
            spare: open_spare(),
            fd_warning: Throttle::default(),
            accept_warning: Throttle::default(),
            full_warning: Default::default(),
            http_warning: Throttle::default(),
            origin_warning: Throttle::default(),
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|&(at, _)| at)
    }
}

fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

impl<A: Application> Master<'_, A> {
    fn listener_of(&self, which: Listener) -> Option<&TcpListener> {
        match which {
            Listener::Line => self.listener.as_ref(),
            Listener::Ws => self.ws_listener.as_ref(),
            Listener::Metrics => self.metrics.as_ref(),
        }
    }

    /// An accept on `which` failed with `e`; returns whether to go on accepting now.
    ///
    /// Out of descriptors (EMFILE, ENFILE) the connection waiting is accepted with the spare
    /// descriptor and closed at once with a word of why: the client learns it now instead of
    /// waiting in the queue for a descriptor that may never come, and the connections already
    /// held are served as before. Without a spare, accepting is tried again shortly.
    pub(super) fn accept_failed(&mut self, which: Listener, e: io::Error) -> bool {
        let errno = e.raw_os_error().unwrap_or(0);
        if errno == nix::libc::ECONNABORTED {
            // The client gave up before it was accepted: on to the next one.
            return true;
        }
        let out_of_fds = errno == nix::libc::EMFILE || errno == nix::libc::ENFILE;
        if !out_of_fds {
            if let Some(n) = self.guard.accept_warning.log() {
                tracing::warn!("accept failed: {e}; retrying in {ACCEPT_RETRY:?}{}", unlogged(n));
            }
            self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
            return false;
        }
        // A spare lost earlier (it could not be reopened then) is tried again first.
        let spare = self.guard.spare.take().or_else(open_spare);
        if let Some(spare) = spare {
            drop(spare);
            let refused = self.listener_of(which).map(|l| l.accept());
            let answer = match refused {
                Some(Ok((mut stream, _))) => {
                    let word = match which {
                        Listener::Line => {
                            protocol::error_line("the server is out of file descriptors; try again later")
                        }
                        Listener::Ws => ws::unavailable(),
                        Listener::Metrics => metrics::unavailable(),
                    };
                    // Best effort: the socket is new, its buffer empty.
                    let _ = io::Write::write(&mut stream, &word);
                    // Closed before the spare is reopened: it takes the descriptor back.
                    drop(stream);
                    Some(true)
                }
                Some(Err(again)) if again.kind() == io::ErrorKind::WouldBlock => Some(false),
                _ => None,
            };
            self.guard.spare = open_spare();
            match answer {
                // Nobody was waiting after all.
                Some(false) => return false,
                Some(true) => {
                    self.counters.listeners[which as usize].no_fd += 1;
                    self.fd_shortage(&e);
                    // On with the next waiting connection; without a spare, by the retry below.
                    if self.guard.spare.is_some() {
                        return true;
                    }
                }
                None => {}
            }
        }
        self.fd_shortage(&e);
        self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
        false
    }

    /// A connection refused (or left waiting) for lack of descriptors: warned now and then.
    fn fd_shortage(&mut self, e: &io::Error) {
        if let Some(n) = self.guard.fd_warning.log() {
            tracing::warn!(
                "out of file descriptors ({e}): refusing new connections (held: {} clients, {} metrics); \
                 raise the open-file limit or lower max_conn / metrics_max_conn{}",
                self.conns.len(),
                self.metrics_conns.len(),
                unlogged(n)
            );
        }
    }

    /// A new connection refused because a listener is at its limit: warned now and then.
    pub(super) fn refused_full(&mut self, which: Listener, peer: SocketAddr, why: std::fmt::Arguments<'_>) {
        self.counters.listeners[which as usize].full += 1;
        if let Some(n) = self.guard.full_warning[which as usize].log() {
            tracing::warn!("refusing {peer}: {why}{}", unlogged(n));
        }
    }

    /// Whether a new WebSocket connection must be refused: too many are in their upgrade,
    /// `ws_handshake_max`, and never more than half of `max_conn` (which may have been lowered
    /// to fit the open-file limit), so that half-open upgrades leave room for the line port.
    pub(super) fn ws_handshakes_full(&self) -> bool {
        self.guard.ws_handshaking >= self.ws_handshake_limit()
    }

    pub(super) fn ws_handshake_limit(&self) -> usize {
        self.config.ws_handshake_max.min((self.config.max_conn / 2).max(1))
    }

    /// A new WebSocket connection: its upgrade must be done by the deadline.
    pub(super) fn ws_handshake_started(&mut self, key: usize, session: u64) {
        self.guard.ws_handshaking += 1;
        self.push_deadline(Pending::Ws { key, session });
    }

    /// Whether a connection still has to finish its handshake by its deadline.
    fn still_pending(&self, pending: Pending) -> bool {
        match pending {
            // Announced: upgraded in time (a page or an error being written is not).
            Pending::Ws { key, session } => {
                self.conns.get(key).is_some_and(|c| c.session == session && !c.announced)
            }
            Pending::Metrics { key, serial } => {
                self.metrics_conns.get(key).is_some_and(|c| c.serial == serial)
            }
        }
    }

    fn push_deadline(&mut self, pending: Pending) {
        let at = Instant::now() + self.config.handshake_limit();
        self.guard.deadlines.push_back((at, pending));
        // The entries of connections done in time wait for their deadline to be dropped; with
        // many quick ones and a long timeout they are dropped here instead, at a cost shared
        // by the pushes that made them (the queue stays within twice what is pending).
        let live = self.guard.ws_handshaking + self.metrics_conns.len();
        if self.guard.deadlines.len() > 2 * live + 1024 {
            let mut deadlines = std::mem::take(&mut self.guard.deadlines);
            deadlines.retain(|&(_, p)| self.still_pending(p));
            self.guard.deadlines = deadlines;
        }
    }

    /// A WebSocket connection leaves its handshake (upgraded, or closed before).
    pub(super) fn ws_handshake_over(&mut self) {
        self.guard.ws_handshaking = self.guard.ws_handshaking.saturating_sub(1);
    }

    /// Closes the connections whose handshake is not done by its deadline.
    pub(super) fn expire_handshakes(&mut self) {
        let now = self.now;
        while let Some(&(at, pending)) = self.guard.deadlines.front() {
            if at > now {
                break;
            }
            self.guard.deadlines.pop_front();
            if !self.still_pending(pending) {
                continue;
            }
            match pending {
                Pending::Ws { key, .. } => {
                    self.counters.listeners[Listener::Ws as usize].timeouts += 1;
                    tracing::debug!(
                        "WebSocket client {}: no upgrade within handshake_timeout ({}s); closing",
                        self.conns[key].peer,
                        self.config.handshake_timeout
                    );
                    self.close_conn(key);
                }
                Pending::Metrics { key, .. } => {
                    self.counters.listeners[Listener::Metrics as usize].timeouts += 1;
                    let mut conn = self.metrics_conns.remove(key);
                    tracing::debug!(
                        "metrics client: request not done within handshake_timeout ({}s); closing",
                        self.config.handshake_timeout
                    );
                    let _ = self.poll.registry().deregister(&mut conn.stream);
                }
            }
        }
    }

    /// A line on the line port was part of an HTTP request (a web page, most likely, made a
    /// browser send it): one `error` line, then the connection is closed, as Redis does, and
    /// nothing after that line is read.
    pub(super) fn refuse_http(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        self.counters.listeners[Listener::Line as usize].http += 1;
        if let Some(n) = self.guard.http_warning.log() {
            tracing::warn!(
                "Possible SECURITY ATTACK detected: client {} sent an HTTP request to the line port \
                 (a web page trying to reach taskd through a browser?); closing the connection{}",
                conn.peer,
                unlogged(n)
            );
        }
        conn.queue(&protocol::error_line(
            "this port speaks taskd's line protocol, not HTTP; closing the connection",
        ));
        conn.close_after_flush = true;
        self.mark_dirty(key);
    }

    pub(super) fn accept_metrics(&mut self) {
        loop {
            let Some(listener) = &self.metrics else { return };
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.metrics_conns.len() >= self.config.metrics_max_conn {
                        let max = self.config.metrics_max_conn;
                        self.refused_full(
                            Listener::Metrics,
                            peer,
                            format_args!("metrics_max_conn ({max}) metrics connections already"),
                        );
                        let _ = io::Write::write(&mut stream, &metrics::unavailable());
                        continue;
                    }
                    self.guard.metrics_serial += 1;
                    let serial = self.guard.metrics_serial;
                    let entry = self.metrics_conns.vacant_entry();
                    let key = entry.key();
                    let token = Token(METRICS_BASE + key);
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        entry.insert(metrics::MetricsConn::new(stream, serial));
                        self.push_deadline(Pending::Metrics { key, serial });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if !self.accept_failed(Listener::Metrics, e) {
                        return;
                    }
                }
            }
        }
    }
}
