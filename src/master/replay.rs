//! The deliveries a worker slot has been sent but has not committed yet, kept as the exact
//! bytes that were written, so that a replacement process can be handed all of them again.
//!
//! This is how a request is never lost with its worker: the master writes each delivery into
//! this log and into the channel; a commit from the worker drops the prefix it covers; when the
//! worker dies, what is left in the log is what its successor must still see.

use std::collections::VecDeque;

/// What kind of event a delivery carried, so a commit can update the right counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Request,
    Connect,
    Close,
    Finish,
}

#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub seq: u64,
    pub session: u64,
    pub kind: Delivery,
    /// Logical offsets of this entry's first byte and just past its last.
    start: u64,
    end: u64,
}

impl Entry {
    /// The size of the delivery as written (for input flow control).
    pub fn bytes(&self) -> usize {
        (self.end - self.start) as usize
    }
}

#[derive(Default)]
pub struct ReplayLog {
    bytes: Vec<u8>,
    /// Logical offset of `bytes[0]`: offsets stay valid when the front is cut off.
    base: u64,
    /// Logical offset of the first uncommitted byte.
    head: u64,
    entries: VecDeque<Entry>,
    next_seq: u64,
    /// How many of the entries are requests (what makes a worker busy).
    requests: usize,
}

impl ReplayLog {
    /// The sequence number the next delivery must carry.
    pub fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Records a delivery whose encoded frame `encode` appends; returns the frame's bytes.
    pub fn push(
        &mut self,
        seq: u64,
        session: u64,
        kind: Delivery,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> &[u8] {
        let start = self.bytes.len();
        encode(&mut self.bytes);
        let end = self.base + self.bytes.len() as u64;
        let first = self.base + start as u64;
        self.entries.push_back(Entry { seq, session, kind, start: first, end });
        self.requests += (kind == Delivery::Request) as usize;
        &self.bytes[start..]
    }

    /// Drops every delivery up to and including `seq`, calling `each` for it.
    pub fn commit(&mut self, seq: u64, mut each: impl FnMut(&Entry)) {
        while let Some(entry) = self.entries.front() {
            if entry.seq > seq {
                break;
            }
            each(entry);
            self.head = entry.end;
            self.requests -= (entry.kind == Delivery::Request) as usize;
            self.entries.pop_front();
        }
        self.compact();
    }

    fn compact(&mut self) {
        let cut = (self.head - self.base) as usize;
        if self.entries.is_empty() {
            self.bytes.clear();
            if self.bytes.capacity() > 1024 * 1024 {
                self.bytes = Vec::new();
            }
            self.base = self.head;
        } else if cut > 64 * 1024 && cut > self.bytes.len() / 2 {
            self.bytes.drain(..cut);
            self.base = self.head;
        }
    }

    /// Every uncommitted delivery, in order, as it was first written.
    pub fn uncommitted(&self) -> &[u8] {
        &self.bytes[(self.head - self.base) as usize..]
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Requests sent and not committed yet.
    pub fn requests(&self) -> usize {
        self.requests
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(log: &mut ReplayLog, text: &[u8]) -> u64 {
        let seq = log.next_seq();
        log.push(seq, 1, Delivery::Request, |out| out.extend_from_slice(text));
        seq
    }

    #[test]
    fn commits_drop_the_prefix_and_the_rest_replays_in_order() {
        let mut log = ReplayLog::default();
        let a = push(&mut log, b"aa");
        let _b = push(&mut log, b"bbb");
        let _c = push(&mut log, b"c");
        let mut committed = Vec::new();
        log.commit(a, |e| committed.push((e.seq, e.bytes())));
        assert_eq!(committed, vec![(a, 2)]);
        assert_eq!(log.uncommitted(), b"bbbc");
        assert_eq!(log.len(), 2);
        assert_eq!(log.requests(), 2);
        log.commit(u64::MAX, |_| {});
        assert!(log.is_empty());
        assert_eq!(log.uncommitted(), b"");
    }

    #[test]
    fn a_long_log_compacts_without_losing_offsets() {
        let mut log = ReplayLog::default();
        let chunk = vec![7u8; 10_000];
        let mut seqs = Vec::new();
        for _ in 0..100 {
            seqs.push(push(&mut log, &chunk));
        }
        log.commit(seqs[79], |_| {});
        assert_eq!(log.uncommitted().len(), 20 * chunk.len());
        push(&mut log, b"tail");
        log.commit(seqs[98], |_| {});
        assert_eq!(log.uncommitted().len(), chunk.len() + 4);
        assert!(log.uncommitted().ends_with(b"tail"));
    }
}
