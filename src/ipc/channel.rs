//! A non-blocking AF_UNIX stream between two taskd processes, with its two buffers.
//!
//! Writes never block: frames are appended to the output buffer and flushed when the socket
//! takes them, so one slow process can never stall the one writing to it. Reads drain the
//! socket until `WouldBlock` (mio is edge-triggered) into a buffer that keeps a partial frame
//! for the next turn.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::envelope::{DecodeError, Frame};

/// Reads are made into at least this much free buffer space.
const READ_CHUNK: usize = 64 * 1024;
/// An idle buffer grown past this (one large message) is given back to the allocator.
const SHRINK_ABOVE: usize = 256 * 1024;

/// Creates a connected pair of channel ends. Both are non-blocking and close-on-exec.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    socketpair(AddressFamily::Unix, SockType::Stream, None, flags).map_err(io::Error::from)
}

/// What a read found at the end of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadState {
    /// The peer may send more.
    Open,
    /// Every copy of the other end is closed.
    Closed,
}

pub struct Channel {
    stream: mio::net::UnixStream,
    input: Input,
    output: Vec<u8>,
    written: usize,
}

/// Bytes read from a channel and not handled yet. It can be taken out of its channel while
/// the frames in it are handled, so handlers may write to any channel, this one included.
#[derive(Default)]
pub struct Input {
    /// Always initialised up to its length; `start..end` holds unread input.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
    }

    /// Appends bytes after the unread ones.
    pub fn append(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.buf.len() - self.end < bytes.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < bytes.len() {
                self.buf.resize(self.end + bytes.len(), 0);
            }
        }
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }
}

impl Channel {
    pub fn new(fd: OwnedFd) -> Channel {
        Channel {
            stream: mio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)),
            input: Input::default(),
            output: Vec::new(),
            written: 0,
        }
    }

    pub fn source(&mut self) -> &mut mio::net::UnixStream {
        &mut self.stream
    }

    /// Reads everything the socket holds now.
    pub fn fill(&mut self) -> io::Result<ReadState> {
        loop {
            self.make_room();
            match self.stream.read(&mut self.input.buf[self.input.end..]) {
                Ok(0) => return Ok(ReadState::Closed),
                Ok(n) => self.input.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadState::Open),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn make_room(&mut self) {
        let inp = &mut self.input;
        if inp.start == inp.end {
            inp.start = 0;
            inp.end = 0;
            if inp.buf.len() > SHRINK_ABOVE {
                inp.buf = Vec::new();
            }
        }
        if inp.buf.len() - inp.end >= READ_CHUNK / 4 {
            return;
        }
        if inp.start > 0 {
            inp.buf.copy_within(inp.start..inp.end, 0);
            inp.end -= inp.start;
            inp.start = 0;
        }
        if inp.buf.len() - inp.end < READ_CHUNK / 4 {
            let grown = (inp.buf.len() * 2).max(READ_CHUNK);
            inp.buf.resize(grown, 0);
        }
    }

    /// The input not consumed yet.
    pub fn input(&self) -> &[u8] {
        self.input.data()
    }

    /// Takes the unread input out, to handle its frames while writing to channels.
    pub fn take_input(&mut self) -> Input {
        std::mem::take(&mut self.input)
    }

    /// Puts back what [`Channel::take_input`] took, minus what was consumed.
    pub fn restore_input(&mut self, input: Input) {
        self.input = input;
    }

    /// Decodes the next complete frame of the input and consumes it.
    /// The frame borrows the channel; copy what must outlive the next call.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, DecodeError> {
        let inp = &mut self.input;
        match Frame::decode(&inp.buf[inp.start..inp.end])? {
            Some((frame, used)) => {
                inp.start += used;
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Cuts `len` bytes at `offset` (from the first unread byte) out of the unread input.
    pub fn remove_input(&mut self, offset: usize, len: usize) {
        let inp = &mut self.input;
        let at = inp.start + offset;
        inp.buf.copy_within(at + len..inp.end, at);
        inp.end -= len;
    }

    /// Forgets all unread input: after a peer died, a partial frame of it is garbage.
    pub fn discard_input(&mut self) {
        self.input.start = 0;
        self.input.end = 0;
    }

    /// Appends a frame to the output; [`Channel::flush`] sends it.
    pub fn send(&mut self, frame: &Frame<'_>) {
        frame.encode(&mut self.output);
    }

    /// The output buffer, for callers that encode in place.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.output
    }

    pub fn has_output(&self) -> bool {
        self.written < self.output.len()
    }

    pub fn pending_output(&self) -> usize {
        self.output.len() - self.written
    }

    /// Drops output not yet written (it will be rebuilt from the replay log).
    pub fn discard_output(&mut self) {
        self.output.clear();
        self.written = 0;
    }

    /// Writes as much output as the socket takes. `Ok(true)`: all of it is written.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A channel whose process stays behind never drains completely: what the
                    // socket took is dropped once it is most of the buffer, or the buffer
                    // would keep everything sent since the last time it was empty.
                    if self.written >= 64 * 1024 && self.written * 2 >= self.output.len() {
                        self.output.drain(..self.written);
                        self.written = 0;
                    }
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.written = 0;
        if self.output.capacity() > SHRINK_ABOVE {
            self.output = Vec::new();
        }
        Ok(true)
    }
}

/// Reads and throws away whatever waits in a socket (non-blocking), returning the byte count.
/// The master uses it on a dead process's end of a channel before its successor starts, so
/// that no half-read frame is left at the head of the stream.
pub fn drain_fd(fd: &OwnedFd) -> io::Result<usize> {
    let mut scratch = [0u8; 16 * 1024];
    let mut total = 0;
    loop {
        match nix::unistd::read(fd, &mut scratch) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(nix::errno::Errno::EAGAIN) => return Ok(total),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_a_pair_in_order_and_large_ones_arrive_whole() {
        let (a, b) = pair().unwrap();
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        let big = vec![b'x'; 3 * 1024 * 1024];
        a.send(&Frame::Send { session: 1, data: b"hello" });
        a.send(&Frame::Send { session: 2, data: &big });
        a.send(&Frame::Commit { seq: 9 });
        let mut got = Vec::new();
        while got.len() < 3 {
            a.flush().unwrap();
            b.fill().unwrap();
            while let Some(frame) = b.next_frame().unwrap() {
                got.push(match frame {
                    Frame::Send { session, data } => (session, data.len()),
                    Frame::Commit { seq } => (seq, 0),
                    other => panic!("unexpected {other:?}"),
                });
            }
        }
        assert_eq!(got, vec![(1, 5), (2, big.len()), (9, 0)]);
        assert!(!a.has_output());
    }

    #[test]
    fn closed_peer_reads_as_closed_and_drain_empties_a_socket() {
        let (a, b) = pair().unwrap();
        nix::unistd::write(&a, b"leftover").unwrap();
        assert_eq!(drain_fd(&b).unwrap(), 8);
        let mut b = Channel::new(b);
        drop(a);
        assert_eq!(b.fill().unwrap(), ReadState::Closed);
    }
}
