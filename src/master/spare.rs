//! Byte buffers kept for reuse: a job's payload (its context and data) and its final reply are
//! copied into a buffer a finished job left, not into a new allocation. Per job the master
//! allocated three buffers and freed as many; in bursts of dozens per turn they overflowed
//! malloc's per-size caches, and its slow paths (`_int_malloc`, `_int_free`, consolidation)
//! were a fifth of the master's instructions.

/// At most [`SpareBytes::MAX`] buffers of at most [`SpareBytes::CAPACITY`] bytes each.
#[derive(Default)]
pub struct SpareBytes(Vec<Vec<u8>>);

impl SpareBytes {
    /// About what one turn finishes at most under load (with 256, a turn that finished more
    /// freed the rest and the next turn's jobs allocated again); 1 MB at the most in all.
    pub const MAX: usize = 1024;
    /// A job's payload or reply is rarely larger; a larger buffer is freed.
    pub const CAPACITY: usize = 1024;

    /// A copy of `bytes`, in a kept buffer if there is one.
    pub fn copy_of(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.concat(bytes, &[])
    }

    /// A copy of the two slices one after the other, in a kept buffer if there is one.
    pub fn concat(&mut self, first: &[u8], second: &[u8]) -> Vec<u8> {
        let len = first.len() + second.len();
        let mut buf = match self.0.pop() {
            Some(buf) if buf.capacity() >= len => buf,
            // Too small: freed, and a new one made with room to spare.
            _ => Vec::with_capacity(Self::room_for(len)),
        };
        buf.extend_from_slice(first);
        buf.extend_from_slice(second);
        buf
    }

    /// The capacity a new buffer for `len` bytes gets: 32 to 95 bytes more, so that the next
    /// payload or reply, a few bytes longer (a longer address, one more digit), fits in it
    /// (one made to measure was reallocated by every longer copy).
    fn room_for(len: usize) -> usize {
        (len + 95) & !63
    }

    /// Keeps `buf` for a later copy, if it is small and there is room.
    pub fn put(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > Self::CAPACITY || self.0.len() >= Self::MAX {
            return;
        }
        buf.clear();
        self.0.push(buf);
    }

    /// Bytes the kept buffers take.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.0.iter().map(Vec::capacity).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::SpareBytes;

    #[test]
    fn kept_buffers_are_reused_emptied_and_bounded() {
        let mut spare = SpareBytes::default();
        spare.put(Vec::new());
        spare.put(Vec::with_capacity(SpareBytes::CAPACITY + 1));
        assert_eq!(spare.held(), 0, "no empty buffer, none too large");
        let first = spare.copy_of(b"payload");
        let ptr = first.as_ptr();
        spare.put(first);
        let second = spare.concat(b"ctx", b"data");
        assert_eq!((second.as_ptr(), &second[..]), (ptr, &b"ctxdata"[..]), "the same buffer, emptied");
        assert_eq!(spare.copy_of(b"new"), b"new");
        // A kept buffer too small for a copy is not grown (a copy and a free): a new one has room.
        spare.put(Vec::with_capacity(4));
        let longer = spare.copy_of(b"longer than four");
        assert!(longer.capacity() >= 16 + 32, "{}", longer.capacity());
        assert_eq!(spare.held(), 0);
        for _ in 0..2 * SpareBytes::MAX {
            spare.put(Vec::with_capacity(64));
        }
        assert_eq!(spare.held(), SpareBytes::MAX * 64);
    }
}
