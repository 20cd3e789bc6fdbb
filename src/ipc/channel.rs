//! A non-blocking AF_UNIX stream between two taskd processes, with its two buffers.
//!
//! Writes never block: frames are appended to the output buffer and flushed when the socket
//! takes them, so one slow process can never stall the one writing to it. Reads drain the
//! socket until `WouldBlock` (mio is edge-triggered) into a buffer that keeps a partial frame
//! for the next turn.
//!
//! A channel end is typed by what it writes and what it reads (`Channel<Tx, Rx>`, as sozu's
//! command channel): the master's end of a worker's channel writes [`ToWorker`] and reads
//! [`FromWorker`], the worker's end the reverse, so a frame cannot be sent on the wrong link,
//! and [`Channel::drain`] hands each reader only the messages its link carries.
//!
//! [`ToWorker`]: super::envelope::ToWorker
//! [`FromWorker`]: super::envelope::FromWorker

use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::os::fd::OwnedFd;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::envelope::{frame_kind, frame_len, DecodeError, FromWorker, Message, COMMIT_KIND};

/// A busy channel's reads are made into at least a quarter of this much free buffer space.
const READ_CHUNK: usize = 64 * 1024;
/// A channel's first input buffer, doubled while reads fill it. An idle process's channel
/// stays this small: the buffer is zeroed as it grows, and a 64 kB one would be 64 kB of
/// every worker's and task process's RSS before its first job.
const FIRST_CHUNK: usize = 4 * 1024;
/// An idle buffer grown past this (one large message) is given back to the allocator: an
/// output buffer at once, an input buffer once [`LIGHT_TURNS`] turns in a row needed no more.
const SHRINK_ABOVE: usize = 256 * 1024;
/// Turns in a row that each read no more than [`SHRINK_ABOVE`] into an input buffer grown past
/// it before it is given back. A channel that needs it turn after turn (the master's end of a
/// worker's channel at 1,000 connections × 8 jobs in flight) gave it back at every turn it was
/// emptied, and grew it again at the next, doubling from 4 kB, each time zeroed.
const LIGHT_TURNS: u32 = 64;

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

/// One end of a channel: it writes `Tx` messages and reads `Rx` ones (see [`Message`]).
pub struct Channel<Tx, Rx> {
    stream: mio::net::UnixStream,
    input: Input,
    output: Vec<u8>,
    written: usize,
    /// Its token, once registered by [`Channel::register`], and whether its registration asks
    /// for writability now (only while output waits: see there).
    watch: Option<(mio::Token, bool)>,
    link: PhantomData<fn(Tx) -> Rx>,
}

/// Bytes read from a channel and not handled yet. It can be taken out of its channel while
/// the frames in it are handled, so handlers may write to any channel, this one included.
#[derive(Default)]
pub struct Input {
    /// Always initialised up to its length; `start..end` holds unread input.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// While `buf` is larger than [`SHRINK_ABOVE`]: the turns in a row that filled it no further
    /// than that before it was emptied.
    light_turns: u32,
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

impl<Tx: Message, Rx: Message> Channel<Tx, Rx> {
    pub fn new(fd: OwnedFd) -> Self {
        Channel {
            stream: mio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)),
            input: Input::default(),
            output: Vec::new(),
            written: 0,
            watch: None,
            link: PhantomData,
        }
    }

    pub fn source(&mut self) -> &mut mio::net::UnixStream {
        &mut self.stream
    }

    /// Watches the channel for input; for room to write only while output waits
    /// ([`Channel::flush_watched`]). An AF_UNIX stream wakes its writer's epoll (EPOLLOUT)
    /// every time the reader takes a message, whether or not the writer has anything left to
    /// write: a process that asked for writability all along was woken once more for each
    /// message it sent, when its peer read it (a worker, a task process, the master: 2–3
    /// wake-ups per job, each an IPI to the other CPU when it slept).
    pub fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        registry.register(&mut self.stream, token, mio::Interest::READABLE)?;
        self.watch = Some((token, false));
        Ok(())
    }

    /// [`Channel::flush`], then asks the reactor for writability if output is left (and no
    /// longer once it is all written), so that the rest goes out when the peer reads.
    pub fn flush_watched(&mut self, registry: &mio::Registry) -> io::Result<bool> {
        let done = self.flush()?;
        if let Some((token, writable)) = self.watch {
            if writable == done {
                let interest = if done {
                    mio::Interest::READABLE
                } else {
                    mio::Interest::READABLE | mio::Interest::WRITABLE
                };
                registry.reregister(&mut self.stream, token, interest)?;
                self.watch = Some((token, !done));
            }
        }
        Ok(done)
    }

    /// Whether its registration asks for writability now: output waited at its last flush (and
    /// may have been discarded since).
    pub fn watches_writable(&self) -> bool {
        matches!(self.watch, Some((_, true)))
    }

    /// Sleeps until the socket has room to write, or `timeout` is over. It asks the kernel
    /// directly (`poll`), not the process's reactor: a readiness edge the reactor reported
    /// here would be lost to its next wait.
    pub fn wait_writable(&self, timeout: std::time::Duration) -> io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads everything the socket holds now.
    pub fn fill(&mut self) -> io::Result<ReadState> {
        self.fill_after(false)
    }

    /// [`Channel::fill`] after a readiness event. With `short_read_drains` (the event reported
    /// input, and neither the peer's close nor an error), a read that leaves room in the buffer
    /// took all the socket held: a stream read returns every byte queued, up to the room given,
    /// and a byte written after it is a new edge-triggered event. So the read that would only
    /// find the socket empty is not made: one system call fewer per turn of light load.
    pub fn fill_after(&mut self, short_read_drains: bool) -> io::Result<ReadState> {
        loop {
            self.make_room();
            let room = self.input.buf.len() - self.input.end;
            match self.stream.read(&mut self.input.buf[self.input.end..]) {
                Ok(0) => return Ok(ReadState::Closed),
                Ok(n) if short_read_drains && n < room => {
                    self.input.end += n;
                    return Ok(ReadState::Open);
                }
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
            // `end`: how far the turn that emptied it filled it (since its last move); 0, no
            // turn since the last look (a fill that found nothing).
            if inp.buf.len() > SHRINK_ABOVE && inp.end > 0 {
                inp.light_turns = if inp.end > SHRINK_ABOVE { 0 } else { inp.light_turns + 1 };
                if inp.light_turns >= LIGHT_TURNS {
                    inp.buf = Vec::new();
                    inp.light_turns = 0;
                }
            }
            inp.start = 0;
            inp.end = 0;
        }
        // A quarter of the buffer, at most a quarter of READ_CHUNK: a small buffer that reads
        // fill grows (doubling) as a busy channel's did at once before.
        let min_free = (inp.buf.len() / 4).clamp(FIRST_CHUNK / 4, READ_CHUNK / 4);
        if inp.buf.len() - inp.end >= min_free {
            return;
        }
        if inp.start > 0 {
            inp.buf.copy_within(inp.start..inp.end, 0);
            inp.end -= inp.start;
            inp.start = 0;
        }
        if inp.buf.len() - inp.end < min_free {
            let grown = (inp.buf.len() * 2).max(FIRST_CHUNK);
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

    /// Hands every complete frame read so far to `handle`, in order, consuming each; a partial
    /// frame stays for the next read. A corrupt one stops it (what came before is handled):
    /// its error is returned, and the caller says what it means (the input is left as it is).
    ///
    /// The channel is `chan(owner)`, and its input is taken out of it meanwhile: `handle` gets
    /// `owner` whole, and may write to any channel, this one included.
    pub fn drain<O>(
        owner: &mut O,
        chan: impl Fn(&mut O) -> &mut Self,
        handle: impl FnMut(&mut O, Rx::Of<'_>),
    ) -> Result<(), DecodeError> {
        Self::drain_upto(owner, chan, |data| (data.len(), None), handle)
    }

    /// [`Channel::drain`], up to the end of what `upto` finds in the input: how many bytes
    /// to handle, and an error found past them (returned once they are handled).
    fn drain_upto<O>(
        owner: &mut O,
        chan: impl Fn(&mut O) -> &mut Self,
        upto: impl FnOnce(&[u8]) -> (usize, Option<DecodeError>),
        mut handle: impl FnMut(&mut O, Rx::Of<'_>),
    ) -> Result<(), DecodeError> {
        let mut input = chan(owner).take_input();
        let (mut left, beyond) = upto(input.data());
        let mut outcome = beyond.map_or(Ok(()), Err);
        while left > 0 {
            let (frame, n) = match Rx::decode(&input.data()[..left]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            handle(owner, frame);
            input.consume(n);
            left -= n;
        }
        chan(owner).restore_input(input);
        outcome
    }

    /// Decodes the next complete frame of the input and consumes it.
    /// The frame borrows the channel; copy what must outlive the next call.
    pub fn next_frame(&mut self) -> Result<Option<Rx::Of<'_>>, DecodeError> {
        let inp = &mut self.input;
        match Rx::decode(&inp.buf[inp.start..inp.end])? {
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
    pub fn send(&mut self, frame: &Tx::Of<'_>) {
        Tx::encode(frame, &mut self.output);
    }

    /// Moves the frames encoded in `out` to the output, leaving `out` empty (with a buffer's
    /// room for the next turn's): when no output waits, by swapping the two buffers, not by a
    /// copy of a turn's bytes (a worker's or a task process's whole output, every turn).
    pub fn queue(&mut self, out: &mut Vec<u8>) {
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
            std::mem::swap(&mut self.output, out);
        } else {
            self.output.append(out);
        }
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

impl<Tx: Message> Channel<Tx, FromWorker<'static>> {
    /// [`Channel::drain`] for a worker's output, which counts only once committed: up to the
    /// end of its last complete commit; the rest waits for the commit that ends it.
    pub fn drain_committed<O>(
        owner: &mut O,
        chan: impl Fn(&mut O) -> &mut Self,
        handle: impl FnMut(&mut O, FromWorker<'_>),
    ) -> Result<(), DecodeError> {
        Self::drain_upto(owner, chan, committed, handle)
    }
}

/// Where the last complete commit in `data` ends (found without decoding), and the error of a
/// frame whose length is corrupt.
fn committed(data: &[u8]) -> (usize, Option<DecodeError>) {
    let mut pos = 0;
    let mut end = 0;
    loop {
        match frame_len(&data[pos..]) {
            Ok(Some(n)) => {
                if frame_kind(&data[pos..pos + n]) == COMMIT_KIND {
                    end = pos + n;
                }
                pos += n;
            }
            Ok(None) => return (end, None),
            Err(e) => return (end, Some(e)),
        }
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
    use crate::ipc::envelope::{FromTask, ToClient, ToTask, ToWorker};

    #[test]
    fn frames_cross_a_pair_in_order_and_large_ones_arrive_whole() {
        let (a, b) = pair().unwrap();
        let mut a: Channel<FromWorker<'static>, ToWorker<'static>> = Channel::new(a);
        let mut b: Channel<ToWorker<'static>, FromWorker<'static>> = Channel::new(b);
        let big = vec![b'x'; 3 * 1024 * 1024];
        a.send(&FromWorker::Client(ToClient::Send { session: 1, data: b"hello" }));
        a.send(&FromWorker::Client(ToClient::Send { session: 2, data: &big }));
        a.send(&FromWorker::Commit { seq: 9 });
        let mut got = Vec::new();
        while got.len() < 3 {
            a.flush().unwrap();
            b.fill().unwrap();
            while let Some(frame) = b.next_frame().unwrap() {
                got.push(match frame {
                    FromWorker::Client(ToClient::Send { session, data }) => (session, data.len()),
                    FromWorker::Commit { seq } => (seq, 0),
                    other => panic!("not sent: {other:?}"),
                });
            }
        }
        assert_eq!(got, vec![(1, 5), (2, big.len()), (9, 0)]);
        assert!(!a.has_output());
    }

    #[test]
    fn frames_queued_behind_output_not_written_yet_go_after_it() {
        let (a, b) = pair().unwrap();
        let mut a: Channel<FromWorker<'static>, ToWorker<'static>> = Channel::new(a);
        let mut b: Channel<ToWorker<'static>, FromWorker<'static>> = Channel::new(b);
        // Nothing waits: the turn's buffer becomes the output, and the caller gets an empty one.
        let mut out = Vec::new();
        FromWorker::Commit { seq: 1 }.encode(&mut out);
        a.queue(&mut out);
        assert!(out.is_empty() && a.has_output());
        // Output waits: the next turn's frames go behind it.
        FromWorker::Commit { seq: 2 }.encode(&mut out);
        a.queue(&mut out);
        assert!(out.is_empty());
        a.flush().unwrap();
        FromWorker::Commit { seq: 3 }.encode(&mut out);
        a.queue(&mut out);
        a.flush().unwrap();
        b.fill().unwrap();
        let mut seqs = Vec::new();
        while let Some(FromWorker::Commit { seq }) = b.next_frame().unwrap() {
            seqs.push(seq);
        }
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn a_quiet_channel_keeps_a_small_buffer_and_a_busy_one_grows_it() {
        let (a, b) = pair().unwrap();
        let mut a: Channel<FromWorker<'static>, ToWorker<'static>> = Channel::new(a);
        let mut b: Channel<ToWorker<'static>, FromWorker<'static>> = Channel::new(b);
        a.send(&FromWorker::Commit { seq: 1 });
        a.flush().unwrap();
        b.fill().unwrap();
        assert!(matches!(b.next_frame(), Ok(Some(FromWorker::Commit { seq: 1 }))));
        assert_eq!(b.input.buf.len(), FIRST_CHUNK);
        // More than the first buffer in the socket at once: one fill takes all of it.
        let data = vec![b'x'; 100 * 1024];
        a.send(&FromWorker::Client(ToClient::Send { session: 7, data: &data }));
        a.flush().unwrap();
        assert!(!a.has_output());
        b.fill().unwrap();
        assert!(b.input.buf.len() >= READ_CHUNK, "grew to {}", b.input.buf.len());
        match b.next_frame() {
            Ok(Some(FromWorker::Client(ToClient::Send { session: 7, data: got }))) => {
                assert_eq!(got, &data[..])
            }
            other => panic!("not sent: {other:?}"),
        }
    }

    #[test]
    fn a_large_input_buffer_is_kept_while_turns_need_it_and_given_back_after_light_ones() {
        let (a, b) = pair().unwrap();
        let mut a: Channel<FromWorker<'static>, ToWorker<'static>> = Channel::new(a);
        let mut b: Channel<ToWorker<'static>, FromWorker<'static>> = Channel::new(b);
        // One turn: `data` read whole and handled; then a fill that finds nothing more, as the
        // next event's would. The size of the input buffer after it.
        let mut turn = |data: &[u8]| {
            a.send(&FromWorker::Client(ToClient::Send { session: 7, data }));
            while !a.flush().unwrap() {
                b.fill().unwrap();
            }
            b.fill().unwrap();
            let frame = b.next_frame();
            assert!(matches!(frame, Ok(Some(FromWorker::Client(ToClient::Send { session: 7, .. })))));
            assert!(b.input().is_empty());
            assert_eq!(b.fill().unwrap(), ReadState::Open);
            b.input.buf.len()
        };
        let (heavy, light) = (vec![b'x'; SHRINK_ABOVE + 1024], vec![b'x'; 1024]);
        let large = turn(&heavy);
        assert!(large > SHRINK_ABOVE, "{large}");
        // Needed turn after turn: kept, not given back and grown again from FIRST_CHUNK.
        for _ in 0..3 {
            assert_eq!(turn(&heavy), large);
        }
        // Light turns keep it for a while; a heavy one among them starts the count again.
        for _ in 1..LIGHT_TURNS {
            assert_eq!(turn(&light), large);
        }
        assert_eq!(turn(&heavy), large);
        for _ in 1..LIGHT_TURNS {
            assert_eq!(turn(&light), large);
        }
        // LIGHT_TURNS in a row: given back, the next reads made into a first-size buffer.
        assert_eq!(turn(&light), FIRST_CHUNK);
    }

    /// Whoever owns the channel, as the master owns its slots' channels.
    struct Owner {
        chan: Channel<ToTask<'static>, FromTask<'static>>,
        seen: Vec<u64>,
    }

    #[test]
    fn drain_hands_over_complete_frames_and_keeps_a_partial_one() {
        let (a, b) = pair().unwrap();
        let mut task: Channel<FromTask<'static>, ToTask<'static>> = Channel::new(a);
        let mut owner = Owner { chan: Channel::new(b), seen: Vec::new() };
        for task_id in 1..=3 {
            task.send(&FromTask::TaskDone { task_id, ok: true, reply: b"", result: b"r" });
        }
        let mut partial = Vec::new();
        FromTask::TaskDone { task_id: 4, ok: true, reply: b"", result: b"r" }.encode(&mut partial);
        task.output().extend_from_slice(&partial[..7]);
        task.flush().unwrap();
        owner.chan.fill().unwrap();
        let drained = Channel::drain(
            &mut owner,
            |o| &mut o.chan,
            |o, frame| {
                let FromTask::TaskDone { task_id, .. } = frame else { panic!("not sent: {frame:?}") };
                o.seen.push(task_id);
                // The handler may write to the channel it reads.
                o.chan.send(&ToTask::Stop);
            },
        );
        assert_eq!(drained, Ok(()));
        assert_eq!(owner.seen, [1, 2, 3]);
        assert_eq!(owner.chan.input(), &partial[..7]);
        assert_eq!(owner.chan.pending_output(), 3 * 5);
    }

    #[test]
    fn drain_stops_at_a_corrupt_frame_after_handling_what_came_before() {
        let (a, b) = pair().unwrap();
        let mut task: Channel<FromTask<'static>, ToTask<'static>> = Channel::new(a);
        let mut owner = Owner { chan: Channel::new(b), seen: Vec::new() };
        task.send(&FromTask::TaskDone { task_id: 1, ok: true, reply: b"", result: b"" });
        // A frame of another link: no task process writes it.
        ToWorker::Stop.encode(task.output());
        task.send(&FromTask::TaskDone { task_id: 2, ok: true, reply: b"", result: b"" });
        task.flush().unwrap();
        owner.chan.fill().unwrap();
        let drained = Channel::drain(
            &mut owner,
            |o| &mut o.chan,
            |o, frame| {
                let FromTask::TaskDone { task_id, .. } = frame else { panic!("not sent: {frame:?}") };
                o.seen.push(task_id);
            },
        );
        // The kind byte of a stop (5): unknown to the task link's reader of the master.
        assert_eq!(drained, Err(DecodeError::UnknownKind(5)));
        assert_eq!(owner.seen, [1]);
    }

    struct Master {
        chan: Channel<ToWorker<'static>, FromWorker<'static>>,
        seen: Vec<String>,
    }

    #[test]
    fn a_workers_output_counts_once_committed() {
        let (a, b) = pair().unwrap();
        let mut worker: Channel<FromWorker<'static>, ToWorker<'static>> = Channel::new(a);
        let mut master = Master { chan: Channel::new(b), seen: Vec::new() };
        worker.send(&FromWorker::Client(ToClient::Stats { session: 1 }));
        worker.send(&FromWorker::Commit { seq: 1 });
        worker.send(&FromWorker::Client(ToClient::Stats { session: 2 }));
        worker.flush().unwrap();
        master.chan.fill().unwrap();
        let record = |m: &mut Master, frame: FromWorker<'_>| m.seen.push(format!("{frame:?}"));
        assert_eq!(Channel::drain_committed(&mut master, |m| &mut m.chan, record), Ok(()));
        assert_eq!(master.seen, ["Client(Stats { session: 1 })", "Commit { seq: 1 }"]);
        // The uncommitted rest waits for its commit.
        worker.send(&FromWorker::Commit { seq: 2 });
        worker.flush().unwrap();
        master.chan.fill().unwrap();
        assert_eq!(Channel::drain_committed(&mut master, |m| &mut m.chan, record), Ok(()));
        assert_eq!(master.seen[2..], ["Client(Stats { session: 2 })", "Commit { seq: 2 }"]);
        assert!(master.chan.input().is_empty());
    }

    #[test]
    fn a_channel_is_woken_for_room_to_write_only_while_its_output_waits() {
        let (a, b) = pair().unwrap();
        let mut a: Channel<FromWorker<'static>, ToWorker<'static>> = Channel::new(a);
        let mut b: Channel<ToWorker<'static>, FromWorker<'static>> = Channel::new(b);
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(4);
        a.register(poll.registry(), mio::Token(1)).unwrap();
        let woken = |poll: &mut mio::Poll, events: &mut mio::Events| {
            poll.poll(events, Some(std::time::Duration::ZERO)).unwrap();
            events.iter().any(|e| e.is_writable())
        };
        // All written: the peer's reads wake no one.
        a.send(&FromWorker::Commit { seq: 1 });
        assert!(a.flush_watched(poll.registry()).unwrap());
        woken(&mut poll, &mut events);
        b.fill().unwrap();
        assert!(!woken(&mut poll, &mut events), "woken by a read though nothing waited to be written");
        // More than the socket takes: the peer's reading makes room, and that wakes it.
        let data = vec![b'x'; 4 * 1024 * 1024];
        a.send(&FromWorker::Client(ToClient::Send { session: 7, data: &data }));
        assert!(!a.flush_watched(poll.registry()).unwrap());
        assert!(a.watches_writable());
        b.fill().unwrap();
        assert!(woken(&mut poll, &mut events), "not woken when room was made for its output");
        while !a.flush_watched(poll.registry()).unwrap() {
            b.fill().unwrap();
        }
        assert!(!a.watches_writable());
        woken(&mut poll, &mut events);
        b.fill().unwrap();
        assert!(!woken(&mut poll, &mut events), "still watched for room once all was written");
    }

    #[test]
    fn a_read_after_an_event_stops_at_a_short_read_but_not_at_a_full_one() {
        let (a, b) = pair().unwrap();
        let mut a: Channel<FromWorker<'static>, ToWorker<'static>> = Channel::new(a);
        let mut b: Channel<ToWorker<'static>, FromWorker<'static>> = Channel::new(b);
        // Larger than the first buffer: the first reads fill it, and it is read to its end.
        let data = vec![b'x'; 3 * FIRST_CHUNK];
        a.send(&FromWorker::Client(ToClient::Send { session: 7, data: &data }));
        assert!(a.flush().unwrap());
        assert_eq!(b.fill_after(true).unwrap(), ReadState::Open);
        assert!(matches!(b.next_frame(), Ok(Some(FromWorker::Client(ToClient::Send { session: 7, .. })))));
        // What is written after a short read is there for the next one; a close too.
        a.send(&FromWorker::Commit { seq: 4 });
        assert!(a.flush().unwrap());
        drop(a);
        assert_eq!(b.fill_after(true).unwrap(), ReadState::Open);
        assert!(matches!(b.next_frame(), Ok(Some(FromWorker::Commit { seq: 4 }))));
        assert_eq!(b.fill_after(false).unwrap(), ReadState::Closed);
    }

    #[test]
    fn closed_peer_reads_as_closed_and_drain_empties_a_socket() {
        let (a, b) = pair().unwrap();
        nix::unistd::write(&a, b"leftover").unwrap();
        assert_eq!(drain_fd(&b).unwrap(), 8);
        let mut b: Channel<ToTask<'static>, FromTask<'static>> = Channel::new(b);
        drop(a);
        assert_eq!(b.fill().unwrap(), ReadState::Closed);
    }
}
