//! One client connection as the master holds it.
//!
//! An idle connection holds no buffer: input is read into the master's shared scratch buffer
//! and only an unfinished line is kept here; output is kept only while the socket will not
//! take it.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use super::ws::WsState;

/// Bits of a session id that hold the connection's slab key; the rest count accepts, so an id
/// is never reused even when the key (or the fd) is.
pub const KEY_BITS: u32 = 24;
pub const KEY_MASK: u64 = (1 << KEY_BITS) - 1;

pub struct Conn {
    pub stream: TcpStream,
    pub session: u64,
    pub peer: SocketAddr,
    /// The worker slot of this connection in dispatch mode 2.
    pub worker: u32,
    /// An unfinished request line.
    pub partial: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    /// The client shut down its side: answer what it sent, then close.
    pub read_closed: bool,
    /// Close once the output is written (after a fatal protocol error).
    pub close_after_flush: bool,
    /// Requests and jobs of this session not answered yet (dispatched, not committed).
    pub outstanding: u32,
    /// Queued in the master's list of connections to flush this turn.
    pub dirty: bool,
    /// When the client last sent something (for `heartbeat_idle_time`).
    pub last_active: Instant,
    /// A WebSocket connection's protocol state (None: a plain TCP line connection).
    pub ws: Option<Box<WsState>>,
    /// Its workers were told of it (on_connect), so they are told when it closes.
    pub announced: bool,
    /// Input flow control: requests sent to workers and not committed yet, and their bytes.
    pub input_requests: usize,
    pub input_bytes: usize,
    /// Not read while its workers are behind; `partial` may then hold complete lines read
    /// ahead, handled first when reading resumes.
    pub paused: bool,
    /// Closing after an error line: our side is shut down and what the client still sends is
    /// read and dropped until it closes too or this deadline passes, so that the kernel does
    /// not answer its unread bytes with a reset that destroys the error line (nginx's
    /// lingering close).
    pub lingering: Option<Instant>,
    /// What of `output_held` and of a WebSocket's `input_held` the master's totals count now
    /// (`Counters::output_bytes`, `Counters::partial_bytes`), so each change is a difference.
    pub out_counted: usize,
    pub ws_in_counted: usize,
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    All,
    Partly,
}

impl Conn {
    pub fn new(stream: TcpStream, session: u64, peer: SocketAddr, worker: u32) -> Conn {
        Conn {
            stream,
            session,
            peer,
            worker,
            partial: Vec::new(),
            out: Vec::new(),
            written: 0,
            read_closed: false,
            close_after_flush: false,
            outstanding: 0,
            dirty: false,
            last_active: Instant::now(),
            ws: None,
            announced: false,
            input_requests: 0,
            input_bytes: 0,
            paused: false,
            lingering: None,
            out_counted: 0,
            ws_in_counted: 0,
        }
    }

    pub fn queue(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
    }

    /// As [`Conn::queue`], into a buffer of `spare` when it has none: a connection that writes
    /// a few lines a turn would otherwise allocate (and grow, and free) a buffer every turn.
    pub fn queue_from(&mut self, data: &[u8], spare: &mut SpareBuffers) {
        if self.out.capacity() == 0 {
            if let Some(buf) = spare.take() {
                self.out = buf;
            }
        }
        self.out.extend_from_slice(data);
    }

    /// The memory its buffers take.
    pub fn held_bytes(&self) -> usize {
        self.partial.capacity() + self.out.capacity()
    }

    pub fn unwritten(&self) -> usize {
        self.out.len() - self.written
    }

    /// Reply bytes held for the client: its unwritten output and a WebSocket's unwritten frames.
    pub fn output_held(&self) -> usize {
        self.unwritten()
            + match self.ws.as_deref() {
                Some(WsState::Open(socket)) => socket.output_held(),
                _ => 0,
            }
    }

    /// Bytes of a WebSocket message being received (0 on a line connection).
    pub fn ws_input_held(&self) -> usize {
        match self.ws.as_deref() {
            Some(WsState::Open(socket)) => socket.input_held(),
            _ => 0,
        }
    }

    /// Its share of `partial_lines_max`: an unfinished line, or a WebSocket message.
    pub fn partial_held(&self) -> usize {
        self.partial.len() + self.ws_in_counted
    }

    pub fn flush(&mut self, spare: &mut SpareBuffers) -> io::Result<Flushed> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Partly),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // An idle connection holds no buffer: a small one goes back to the spares.
        spare.put(std::mem::take(&mut self.out));
        self.written = 0;
        if let Some(WsState::Open(ws)) = self.ws.as_deref_mut() {
            return match super::ws::flush(ws, &mut self.stream) {
                Ok(true) => Ok(Flushed::All),
                Ok(false) => Ok(Flushed::Partly),
                Err(e) => Err(io::Error::other(e)),
            };
        }
        Ok(Flushed::All)
    }

    /// Reads into `scratch`; `Ok(0)` is the end of the client's input.
    pub fn read(&mut self, scratch: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(scratch) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// Whether its workers are as far behind as it may get (`input_buffer_size` bytes or
    /// `input_requests_max` requests not handled): then it is not read.
    pub fn input_over(&self, max_bytes: usize, max_requests: usize) -> bool {
        self.input_bytes >= max_bytes || self.input_requests >= max_requests
    }

    /// Whether a paused connection may be read again: its workers caught up halfway, so that
    /// reading resumes in long stretches rather than one request at a time.
    pub fn input_caught_up(&self, max_bytes: usize, max_requests: usize) -> bool {
        self.input_bytes <= max_bytes / 2 && self.input_requests <= max_requests / 2
    }

    /// A worker committed one request of this connection, of `bytes` as delivered.
    pub fn input_committed(&mut self, bytes: usize) {
        self.input_requests = self.input_requests.saturating_sub(1);
        self.input_bytes = self.input_bytes.saturating_sub(bytes);
    }

    /// Whether nothing more will happen on this connection: safe to close.
    pub fn finished(&self) -> bool {
        (self.read_closed && self.outstanding == 0 && self.unwritten() == 0)
            || (self.close_after_flush && self.unwritten() == 0)
    }
}

/// Output buffers written out, kept for the next connection that has something to write: at
/// most [`SpareBuffers::MAX`] of at most [`SpareBuffers::CAPACITY`] bytes, and at most
/// [`SpareBuffers::TOTAL`] bytes in all.
#[derive(Default)]
pub struct SpareBuffers {
    kept: Vec<Vec<u8>>,
    /// The capacity of the buffers in `kept`.
    bytes: usize,
}

impl SpareBuffers {
    pub const MAX: usize = 64;
    /// A turn's replies to one connection with 64 jobs in flight (about 10 kB of `done`
    /// lines) fit: with at most 4 kB kept, such a buffer was grown twice (realloc, copying)
    /// and then freed, every turn, for every connection.
    pub const CAPACITY: usize = 64 * 1024;
    pub const TOTAL: usize = 256 * 1024;

    fn put(&mut self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap == 0 || cap > Self::CAPACITY || self.kept.len() >= Self::MAX || self.bytes + cap > Self::TOTAL
        {
            return;
        }
        buf.clear();
        self.bytes += cap;
        self.kept.push(buf);
    }

    fn take(&mut self) -> Option<Vec<u8>> {
        let buf = self.kept.pop()?;
        self.bytes -= buf.capacity();
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::SpareBuffers;

    #[test]
    fn spare_buffers_keep_small_emptied_buffers_up_to_their_count() {
        let mut spare = SpareBuffers::default();
        spare.put(Vec::new());
        spare.put(Vec::with_capacity(SpareBuffers::CAPACITY + 1));
        assert!(spare.kept.is_empty(), "no empty buffer, none too large");
        spare.put(b"written".to_vec());
        assert_eq!((spare.kept.len(), spare.kept[0].len()), (1, 0), "kept, emptied");
        for _ in 0..2 * SpareBuffers::MAX {
            spare.put(Vec::with_capacity(64));
        }
        assert_eq!(spare.kept.len(), SpareBuffers::MAX);
        let taken = spare.take().map(|b| b.capacity());
        assert_eq!((taken, spare.bytes), (Some(64), (SpareBuffers::MAX - 2) * 64 + 7));
        // Large ones up to the total.
        let mut spare = SpareBuffers::default();
        for _ in 0..8 {
            spare.put(Vec::with_capacity(SpareBuffers::CAPACITY));
        }
        assert_eq!(spare.kept.len(), SpareBuffers::TOTAL / SpareBuffers::CAPACITY);
    }
}
