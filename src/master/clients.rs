//! The master's client side: accepting, reading request lines (TCP and WebSocket),
//! dispatching them to workers, writing replies, closing sessions. Reading is paced by the
//! workers (input flow control) and unfinished lines share one budget (`partial_lines_max`).

use super::*;
use crate::throttle::{unlogged, Throttle};

/// One rate limit per kind of warning a client's misbehaviour causes: a flood of clients that
/// send over-long lines or never read must not write a line each (the first one of a kind
/// is logged with its peer, then one per 10 s with the count of the others).
#[derive(Default)]
pub(super) struct Warnings {
    too_long: Throttle,
    partial_budget: Throttle,
    slow_reader: Throttle,
    output_budget: Throttle,
}

impl<A: Application> Master<'_, A> {
    /// Accepts on the line port, or with `ws` on the WebSocket port.
    pub(super) fn accept(&mut self, ws: bool) {
        loop {
            let listener = if ws { &self.ws_listener } else { &self.listener };
            let Some(listener) = listener else { return };
            let (mut stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let which = if ws { listeners::Listener::Ws } else { listeners::Listener::Line };
                    if self.accept_failed(which, e) {
                        continue;
                    }
                    return;
                }
            };
            if ws && self.ws_handshakes_full() {
                self.refused_full(
                    listeners::Listener::Ws,
                    peer,
                    format_args!(
                        "{} WebSocket upgrades under way already (ws_handshake_max, at most half of max_conn)",
                        self.ws_handshake_limit()
                    ),
                );
                let _ = io::Write::write(&mut stream, &ws::unavailable());
                continue;
            }
            if self.conns.len() >= self.config.max_conn {
                let max = self.config.max_conn;
                let which = if ws { listeners::Listener::Ws } else { listeners::Listener::Line };
                self.refused_full(which, peer, format_args!("max_conn ({max}) connections already"));
                let msg =
                    format!("too many connections (max_conn {}); try again later", self.config.max_conn);
                // An HTTP client (WebSocket port) is answered in HTTP.
                let word = if ws { ws::unavailable() } else { protocol::error_line(&msg) };
                // Best effort: the socket is new, its buffer empty; the answer fits at once.
                let _ = io::Write::write(&mut stream, &word);
                continue;
            }
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if key as u64 > KEY_MASK {
                tracing::warn!("too many connections; refusing {peer}");
                continue;
            }
            self.accepted += 1;
            let session = (self.accepted << KEY_BITS) | key as u64;
            let fd = stream.as_raw_fd();
            let worker = (fd as usize % self.workers.len()) as u32;
            let _ = stream.set_nodelay(true);
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(CONN_BASE + key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("cannot watch connection from {peer}: {e}");
                continue;
            }
            let conn = entry.insert(Conn::new(stream, session, peer, worker));
            self.counters.accept_count += 1;
            tracing::debug!("client {peer} connected: session {session}, fd {fd}");
            if ws {
                // A session once upgraded; until then an HTTP request.
                conn.ws = Some(Box::new(ws::WsState::Handshake(Vec::new())));
                self.ws_handshake_started(key, session);
            } else {
                self.announce(key);
            }
        }
    }

    /// Tells the connection's worker about it (dispatch mode 2, where it is ordered).
    pub(super) fn announce(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.announced = true;
        if self.config.dispatch_mode == DispatchMode::Fixed {
            let (session, worker, peer) = (conn.session, conn.worker, conn.peer.to_string());
            self.deliver(worker as usize, session, Delivery::Connect, |seq, out| {
                ToWorker::Connect { seq, session, peer: peer.as_bytes() }.encode(out)
            });
        }
    }

    pub(super) fn read_ws(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if let Some(ws::WsState::Handshake(buf)) = conn.ws.as_deref_mut() {
            let refused = &mut self.counters.listeners[listeners::Listener::Ws as usize].origin;
            match ws::read_opening(
                &mut conn.stream,
                buf,
                &self.guard.origins,
                &mut self.guard.origin_warning,
                refused,
            ) {
                Ok(ws::Opening::Partial) => return,
                Ok(ws::Opening::Http(response)) => {
                    conn.ws = None;
                    conn.queue(&response);
                    conn.close_after_flush = true;
                    self.mark_dirty(key);
                    return;
                }
                Ok(ws::Opening::Upgrade { response, rest }) => {
                    // Written at once (a new socket takes it whole), so that nothing tungstenite
                    // writes, a pong say, can come before it.
                    if io::Write::write(&mut conn.stream, &response).ok() != Some(response.len()) {
                        self.close_conn(key);
                        return;
                    }
                    let socket =
                        ws::open(rest, self.config.package_max_length, self.config.buffer_output_size);
                    conn.ws = Some(Box::new(ws::WsState::Open(Box::new(socket))));
                    self.ws_handshake_over();
                    self.announce(key);
                }
                Err(e) => {
                    tracing::debug!("client {}: no WebSocket upgrade ({e})", conn.peer);
                    self.close_conn(key);
                    return;
                }
            }
        }
        loop {
            let Some(conn) = self.conns.get_mut(key) else { return };
            if conn.read_closed || conn.close_after_flush || conn.paused {
                return;
            }
            if conn.input_over(self.config.input_buffer_size, self.config.input_requests_max)
                || self.counters.input_bytes >= self.config.input_total_max
            {
                return self.pause(key);
            }
            let Some(ws::WsState::Open(socket)) = conn.ws.as_deref_mut() else { return };
            let incoming = ws::read(socket, &mut conn.stream);
            self.account_ws_input(key);
            let Some(conn) = self.conns.get_mut(key) else { return };
            match incoming {
                ws::Incoming::Lines(lines) => {
                    conn.last_active = self.now;
                    for line in lines {
                        // The dashboard's requests are the master's own, never a worker's.
                        match admin::parse_admin(&line) {
                            Some(req) => self.admin_request(key, req),
                            None => self.dispatch_request(key, &line),
                        }
                    }
                }
                ws::Incoming::Binary => {
                    let session = conn.session;
                    let line =
                        protocol::error_line("binary messages are not supported: send requests as text");
                    self.send_to_session(session, &line);
                }
                ws::Incoming::Idle => return,
                ws::Incoming::Closed => {
                    conn.read_closed = true;
                    self.maybe_finished.push(key);
                    self.mark_dirty(key);
                    return;
                }
                ws::Incoming::Broken(why) => {
                    tracing::debug!("WebSocket client {}: {why}; closing", conn.peer);
                    conn.close_after_flush = true;
                    self.mark_dirty(key);
                    return;
                }
            }
        }
    }

    /// Reads a connection until it would block; with `short_read_drains` (an edge-triggered
    /// readable event that did not report the client's end), until a read returns less than
    /// it asked for: that read emptied the socket, and bytes that arrive after it raise a new
    /// event, so the read that would only say "would block" is saved (nginx does the same).
    /// With a thousand connections each bringing a few requests, that read was every other
    /// system call the master made on them.
    pub(super) fn read_conn(&mut self, key: usize, short_read_drains: bool) {
        if self.conns.get(key).is_some_and(|c| c.lingering.is_some()) {
            return self.linger_read(key);
        }
        if !matches!(self.phase, Phase::Running) {
            // Shutting down: what is already dispatched is answered, nothing new is read.
            return;
        }
        let Some(conn) = self.conns.get_mut(key) else { return };
        if conn.paused {
            if !conn.input_caught_up(self.config.input_buffer_size, self.config.input_requests_max)
                || self.counters.input_bytes >= self.config.input_total_max
            {
                // Its workers (or all workers) are still behind: what it sends waits in the socket.
                return;
            }
            conn.paused = false;
            self.counters.input_paused -= 1;
            if conn.ws.is_none() && !conn.partial.is_empty() {
                // Complete lines read ahead before the pause come first.
                self.take_lines(key, &[]);
            }
        }
        if self.conns.get(key).is_some_and(|c| c.ws.is_some()) {
            return self.read_ws(key);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        if scratch.is_empty() {
            // At the first read, after the pool is forked: a buffer the master held at the fork
            // would be resident in the manager and every worker and task process as well.
            scratch = vec![0; SCRATCH];
        }
        while let Some(conn) = self.conns.get_mut(key) {
            if conn.read_closed || conn.close_after_flush || conn.paused {
                break;
            }
            if self.counters.input_bytes >= self.config.input_total_max {
                // All workers are as far behind as they may get: not even read into a buffer.
                self.pause(key);
                break;
            }
            match conn.read(&mut scratch) {
                Ok(0) => {
                    conn.read_closed = true;
                    self.maybe_finished.push(key);
                    break;
                }
                Ok(n) => {
                    conn.last_active = self.now;
                    self.take_lines(key, &scratch[..n]);
                    if short_read_drains && n < scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("client {} read error: {e}", conn.peer);
                    self.close_conn(key);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Splits newly read bytes into request lines and dispatches each, until the connection's
    /// workers are too far behind (input flow control): then the rest is kept, unread lines
    /// included, and the connection is paused.
    pub(super) fn take_lines(&mut self, key: usize, fresh: &[u8]) {
        let max = self.config.package_max_length;
        let (max_bytes, max_requests) = (self.config.input_buffer_size, self.config.input_requests_max);
        let Some(conn) = self.conns.get_mut(key) else { return };
        let mut held = std::mem::take(&mut conn.partial);
        let before = held.len();
        let from_held = !held.is_empty();
        if from_held {
            // Exactly what is needed: this buffer is counted against partial_lines_max.
            held.reserve_exact(fresh.len());
            held.extend_from_slice(fresh);
        }
        let data: &[u8] = if from_held { &held } else { fresh };
        let mut pos = 0;
        let mut pause = false;
        // Where the bytes to keep begin (None: keep nothing, the connection is lost).
        let keep_from = loop {
            let all_full = self.counters.input_bytes >= self.config.input_total_max;
            if all_full || self.conns.get(key).is_none_or(|c| c.input_over(max_bytes, max_requests)) {
                pause = true;
                break Some(pos);
            }
            match protocol::next_line(&data[pos..], max) {
                Ok(Some((line, used))) => {
                    if protocol::looks_like_http(line) {
                        self.refuse_http(key);
                        break None;
                    }
                    self.dispatch_request(key, line);
                    pos += used;
                }
                Ok(None) => break Some(pos),
                Err(too_long) => {
                    let conn = &mut self.conns[key];
                    if let Some(n) = self.warnings.too_long.log() {
                        tracing::warn!(
                            "client {}: request line longer than package_max_length ({} bytes); closing{}",
                            conn.peer,
                            too_long.limit,
                            unlogged(n)
                        );
                    }
                    let msg = format!(
                        "request line longer than package_max_length ({} bytes); closing the connection",
                        too_long.limit
                    );
                    conn.queue(&protocol::error_line(&msg));
                    conn.close_after_flush = true;
                    self.mark_dirty(key);
                    break None;
                }
            }
        };
        let kept = match keep_from {
            Some(from) if from < data.len() => {
                if from_held {
                    held.drain(..from);
                    if held.capacity() > 2 * held.len() + 4096 {
                        held.shrink_to_fit();
                    }
                    held
                } else {
                    fresh[from..].to_vec()
                }
            }
            _ => Vec::new(),
        };
        let after = kept.len();
        self.counters.partial_bytes = self.counters.partial_bytes - before + after;
        let Some(conn) = self.conns.get_mut(key) else {
            self.counters.partial_bytes -= after;
            return;
        };
        conn.partial = kept;
        if pause {
            self.pause(key);
        }
        if after > before {
            self.enforce_partial_budget();
        }
    }

    /// Stops reading a connection until its workers catch up (`resume_paused`).
    pub(super) fn pause(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if !conn.paused {
            conn.paused = true;
            self.counters.input_paused += 1;
            self.counters.input_pauses += 1;
            self.paused.push(key);
        }
    }

    /// Reads again the paused connections whose workers have caught up.
    pub(super) fn resume_paused(&mut self) {
        if self.paused.is_empty() {
            return;
        }
        let (max_bytes, max_requests) = (self.config.input_buffer_size, self.config.input_requests_max);
        for key in std::mem::take(&mut self.paused) {
            match self.conns.get(key) {
                Some(conn) if conn.paused => {
                    let all_full = self.counters.input_bytes >= self.config.input_total_max;
                    if !all_full && conn.input_caught_up(max_bytes, max_requests) {
                        self.read_conn(key, false);
                    } else {
                        self.paused.push(key);
                    }
                }
                // Resumed already, or closed (a new connection under the key is not paused,
                // or is listed itself).
                _ => {}
            }
        }
    }

    /// Past `partial_lines_max`, the connection holding the largest unfinished line loses it:
    /// it gets an error and is closed (its framing is lost). The largest, not the one that
    /// read last, so that a client that is merely between two segments of a short line is
    /// not cut off because others hold megabytes.
    fn enforce_partial_budget(&mut self) {
        let budget = self.config.partial_lines_max;
        while self.counters.partial_bytes > budget {
            let largest = self
                .conns
                .iter()
                .filter(|(_, c)| c.partial_held() > 0)
                .max_by_key(|(_, c)| c.partial_held())
                .map(|(key, c)| (key, c.partial_held()));
            let Some((key, len)) = largest else { break };
            let conn = &mut self.conns[key];
            let what = if conn.ws.is_some() { "WebSocket message" } else { "request line" };
            crate::limits::freed(conn.partial.len());
            conn.partial = Vec::new();
            // A WebSocket message stays in tungstenite's buffer until the connection is
            // dropped (soon: nothing more is read from it), no longer counted.
            conn.ws_in_counted = 0;
            self.counters.partial_bytes -= len;
            self.counters.partial_refused += 1;
            if let Some(n) = self.warnings.partial_budget.log() {
                tracing::warn!(
                    "client {}: its unfinished {what} ({len} bytes) does not fit partial_lines_max \
                     ({budget} bytes for all connections); closing{}",
                    conn.peer,
                    unlogged(n)
                );
            }
            let msg = format!(
                "server busy: too much unfinished input is held for all clients (partial_lines_max, \
                 {budget} bytes), so this connection's unfinished {what} of {len} bytes was \
                 dropped; closing the connection"
            );
            let line = protocol::error_line(&msg);
            match conn.ws.as_deref_mut() {
                Some(ws::WsState::Open(socket)) => {
                    ws::refuse(socket, &mut conn.stream, &line, ws::CloseCode::Again);
                }
                _ => conn.queue(&line),
            }
            conn.close_after_flush = true;
            self.mark_dirty(key);
        }
    }

    pub(super) fn dispatch_request(&mut self, key: usize, line: &[u8]) {
        let conn = &mut self.conns[key];
        conn.outstanding += 1;
        let session = conn.session;
        let worker = match self.config.dispatch_mode {
            DispatchMode::Fixed => conn.worker as usize,
            DispatchMode::RoundRobin => {
                self.round_robin = (self.round_robin + 1) % self.workers.len();
                self.round_robin
            }
            DispatchMode::Preemptive => {
                self.round_robin = (self.round_robin + 1) % self.workers.len();
                let n = self.workers.len();
                (0..n)
                    .map(|k| (self.round_robin + k) % n)
                    .min_by_key(|&w| {
                        let slot = &self.workers[w];
                        // Busy means holding requests; a pending result is quick to handle.
                        (!slot.is_alive() as usize, slot.books.log.requests(), slot.books.log.len())
                    })
                    .unwrap_or(0)
            }
        };
        self.counters.dispatch_count += 1;
        let bytes = self.deliver(worker, session, Delivery::Request, |seq, out| {
            ToWorker::Request { seq, session, data: line }.encode(out)
        });
        let conn = &mut self.conns[key];
        conn.input_requests += 1;
        conn.input_bytes += bytes;
        self.counters.input_bytes += bytes;
    }

    /// Writes a delivery to a worker slot and keeps it until the slot commits it; returns its
    /// size.
    pub(super) fn deliver(
        &mut self,
        worker: usize,
        session: u64,
        kind: Delivery,
        encode: impl FnOnce(u64, &mut Vec<u8>),
    ) -> usize {
        let slot = &mut self.workers[worker];
        let seq = slot.books.log.next_seq();
        let bytes = slot.books.log.push(seq, session, kind, |out| encode(seq, out));
        slot.chan.output().extend_from_slice(bytes);
        bytes.len()
    }

    pub(super) fn conn_mut(&mut self, session: u64) -> Option<(usize, &mut Conn)> {
        let key = (session & KEY_MASK) as usize;
        match self.conns.get_mut(key) {
            Some(conn) if conn.session == session => Some((key, conn)),
            _ => None,
        }
    }

    pub(super) fn send_to_session(&mut self, session: u64, data: &[u8]) {
        let limit = self.config.buffer_output_size;
        let key = (session & KEY_MASK) as usize;
        // The connection and the spare buffers, borrowed apart.
        let conn = self.conns.get_mut(key).filter(|c| c.session == session && c.lingering.is_none());
        let Some(conn) = conn else {
            tracing::debug!("dropping {} bytes for closed session {session}", data.len());
            return;
        };
        if let Some(state) = conn.ws.as_deref_mut() {
            let ws::WsState::Open(socket) = state else { return };
            if let Err(why) = ws::send(socket, &mut conn.stream, data) {
                let peer = conn.peer;
                if let Some(n) = self.warnings.slow_reader.log() {
                    tracing::warn!(
                        "WebSocket client {peer} does not read its replies ({why}); disconnecting{}",
                        unlogged(n)
                    );
                }
                self.close_conn(key);
                return;
            }
            self.mark_dirty(key);
            self.account_output(key);
            return;
        }
        conn.queue_from(data, &mut self.spare_buffers);
        let held = conn.unwritten();
        if held > limit {
            let peer = conn.peer;
            if let Some(n) = self.warnings.slow_reader.log() {
                tracing::warn!(
                    "client {peer} does not read its replies: {held} bytes pending, over buffer_output_size ({limit}); disconnecting{}",
                    unlogged(n)
                );
            }
            self.close_conn(key);
            return;
        }
        // `mark_dirty` and `account_output` on the connection at hand (a line connection holds
        // only its unwritten bytes): each looked it up again, for every reply line.
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
        if held != conn.out_counted {
            self.counters.output_bytes = self.counters.output_bytes - conn.out_counted + held;
            conn.out_counted = held;
            if self.counters.output_bytes > self.config.output_total_max {
                self.enforce_output_budget();
            }
        }
    }

    /// Brings `output_bytes` up to date with what connection `key` holds now; past
    /// `output_total_max`, the connections holding the most are disconnected.
    fn account_output(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let now = conn.output_held();
        if now == conn.out_counted {
            return;
        }
        self.counters.output_bytes = self.counters.output_bytes - conn.out_counted + now;
        conn.out_counted = now;
        if self.counters.output_bytes > self.config.output_total_max {
            self.enforce_output_budget();
        }
    }

    /// Past `output_total_max`, the connection holding the most unread replies is disconnected,
    /// as one past `buffer_output_size` is, until the rest fits: a few clients that do not
    /// read, each within its own bound, cannot add up to an unbounded master.
    fn enforce_output_budget(&mut self) {
        let budget = self.config.output_total_max;
        while self.counters.output_bytes > budget {
            let largest =
                self.conns.iter().max_by_key(|(_, c)| c.out_counted).map(|(key, c)| (key, c.out_counted));
            let Some((key, held)) = largest.filter(|&(_, held)| held > 0) else { break };
            self.counters.output_refused += 1;
            if let Some(n) = self.warnings.output_budget.log() {
                tracing::warn!(
                    "client {} does not read its replies: {held} bytes pending, the most of all while all \
                     connections' pending replies are over output_total_max ({budget}); disconnecting{}",
                    self.conns[key].peer,
                    unlogged(n)
                );
            }
            self.drop_conn(key);
        }
    }

    /// Brings `partial_bytes` up to date with the WebSocket message connection `key` is
    /// receiving; past `partial_lines_max`, the largest holders are refused.
    fn account_ws_input(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        // Once refused (closing), what it holds is no longer counted.
        let now = if conn.close_after_flush { 0 } else { conn.ws_input_held() };
        if now == conn.ws_in_counted {
            return;
        }
        let grew = now > conn.ws_in_counted;
        self.counters.partial_bytes = self.counters.partial_bytes - conn.ws_in_counted + now;
        conn.ws_in_counted = now;
        if grew {
            self.enforce_partial_budget();
        }
    }

    pub(super) fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Closes a connection; one closed after an error line, whose client may still be
    /// sending, lingers first (`linger_read`).
    pub(super) fn close_conn(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if conn.lingering.is_some() {
            // Closing already: `linger_read` or `end_lingering` ends it.
            return;
        }
        let mid_stream = conn.close_after_flush && !conn.read_closed && conn.unwritten() == 0;
        if mid_stream && conn.stream.shutdown(std::net::Shutdown::Write).is_ok() {
            let deadline = Instant::now() + LINGER;
            conn.lingering = Some(deadline);
            self.counters.partial_bytes -= conn.partial_held();
            conn.partial = Vec::new();
            conn.ws_in_counted = 0;
            self.lingering.push_back((key, conn.session, deadline));
            // What arrived before this turn ended is read (and dropped) now.
            return self.linger_read(key);
        }
        self.drop_conn(key);
    }

    /// Reads and drops what a lingering connection sends, and closes it at its end.
    fn linger_read(&mut self, key: usize) {
        // Its own buffer: this may run while a read holds the shared scratch.
        let mut sink = [0u8; 16 * 1024];
        // Bounded per event: a client that sends without end is closed at its deadline.
        for _ in 0..16 {
            let Some(conn) = self.conns.get_mut(key) else { break };
            match conn.read(&mut sink) {
                Ok(0) => {
                    self.drop_conn(key);
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.drop_conn(key);
                    break;
                }
            }
        }
    }

    /// Closes the lingering connections whose time is up.
    pub(super) fn end_lingering(&mut self) {
        let now = self.now;
        while let Some(&(key, session, at)) = self.lingering.front() {
            if at > now {
                break;
            }
            self.lingering.pop_front();
            if self.conns.get(key).is_some_and(|c| c.session == session && c.lingering.is_some()) {
                self.drop_conn(key);
            }
        }
    }

    /// Closes a connection now.
    fn drop_conn(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if !conn.announced {
            // A WebSocket connection closed before its upgrade.
            self.ws_handshake_over();
        }
        self.counters.partial_bytes -= conn.partial_held();
        self.counters.output_bytes -= conn.out_counted;
        if conn.paused {
            self.counters.input_paused -= 1;
        }
        self.counters.close_count += 1;
        tracing::debug!("client {} closed (session {})", conn.peer, conn.session);
        if conn.announced && self.config.dispatch_mode == DispatchMode::Fixed {
            let session = conn.session;
            self.deliver(conn.worker as usize, session, Delivery::Close, |seq, out| {
                ToWorker::Close { seq, session }.encode(out)
            });
        }
        let held = conn.held_bytes();
        drop(conn);
        crate::limits::freed(held);
    }

    pub(super) fn flush_conns(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            conn.dirty = false;
            let flushed = conn.flush(&mut self.spare_buffers);
            self.account_output(key);
            let Some(conn) = self.conns.get_mut(key) else { continue };
            match flushed {
                Ok(Flushed::All) => {
                    if conn.finished() {
                        self.close_conn(key);
                    }
                }
                Ok(Flushed::Partly) => {}
                Err(e) => {
                    tracing::debug!("client {}: write failed ({e}); closing", conn.peer);
                    self.close_conn(key);
                }
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Closes connections silent for `heartbeat_idle_time` that wait for nothing.
    pub(super) fn close_idle_conns(&mut self) {
        let Some(at) = self.next_heartbeat else { return };
        let now = Instant::now();
        if now < at {
            return;
        }
        self.next_heartbeat = Some(now + HEARTBEAT_SCAN);
        let limit = Duration::from_secs(self.config.heartbeat_idle_time);
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.outstanding == 0 && c.unwritten() == 0 && now - c.last_active >= limit)
            .map(|(key, _)| key)
            .collect();
        for key in idle {
            tracing::debug!(
                "closing client {}: silent for heartbeat_idle_time ({}s)",
                self.conns[key].peer,
                self.config.heartbeat_idle_time
            );
            self.close_conn(key);
        }
    }
}
