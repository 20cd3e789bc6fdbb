//! Commands written straight into RESP, the bytes Redis reads, for the commands of every job:
//! a `redis::Cmd` grows its argument buffers one allocation at a time, and a round then
//! cloned each command into its transaction and packed it again (about 8k instructions per
//! job in the bridge, callgrind). Other commands are packed from their `Cmd` into the same
//! buffer.

use crate::json_line::decimal;

/// An end of a [`Packed`]'s commands (see [`Packed::mark`]).
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    bytes: usize,
    count: usize,
}

/// Commands packed one after the other, and how many.
#[derive(Debug, Default, Clone)]
pub struct Packed {
    bytes: Vec<u8>,
    count: usize,
}

impl Packed {
    pub fn new() -> Packed {
        Packed::default()
    }

    /// Room for `bytes` bytes of commands.
    pub fn with_capacity(bytes: usize) -> Packed {
        Packed { bytes: Vec::with_capacity(bytes), count: 0 }
    }

    /// Starts a command of `args` arguments, its name among them: exactly that many
    /// [`Packed::arg`]s (or [`Packed::number`]s) must follow.
    #[inline]
    pub fn command(&mut self, args: usize) -> &mut Packed {
        self.count += 1;
        self.bytes.push(b'*');
        self.digits(args as u64)
    }

    /// Inlined: an argument known when compiled (a command's name, a field's) is then written
    /// as a few stores. One capacity check for the whole argument; most of a job's are shorter
    /// than ten bytes, whose length is one digit. (A job's XADD was 15 calls of about 90
    /// instructions each in the bridge, callgrind.)
    #[inline]
    pub fn arg(&mut self, arg: &[u8]) -> &mut Packed {
        self.bytes.reserve(arg.len() + 25);
        // A length below 1000 as so many bytes, stores of a fixed size: no call to `decimal`,
        // nor to memcpy for its digits.
        let digit = |n: usize| b'0' + (n % 10) as u8;
        match arg.len() {
            len @ 0..=9 => self.bytes.extend_from_slice(&[b'$', digit(len), b'\r', b'\n']),
            len @ 10..=99 => self.bytes.extend_from_slice(&[b'$', digit(len / 10), digit(len), b'\r', b'\n']),
            len @ 100..=999 => self.bytes.extend_from_slice(&[
                b'$',
                digit(len / 100),
                digit(len / 10),
                digit(len),
                b'\r',
                b'\n',
            ]),
            len => {
                self.bytes.push(b'$');
                self.digits(len as u64);
            }
        }
        self.bytes.extend_from_slice(arg);
        self.bytes.extend_from_slice(b"\r\n");
        self
    }

    /// A number as its decimal digits, as `Cmd::arg` writes it.
    #[inline]
    pub fn number(&mut self, n: u64) -> &mut Packed {
        if n < 10 {
            self.bytes.extend_from_slice(&[b'$', b'1', b'\r', b'\n', b'0' + n as u8, b'\r', b'\n']);
            return self;
        }
        let mut digits = [0; 20];
        let digits = decimal(n, &mut digits);
        self.arg(digits)
    }

    /// A command built as a `Cmd`.
    pub fn cmd(&mut self, cmd: &redis::Cmd) -> &mut Packed {
        self.count += 1;
        cmd.write_packed_command(&mut self.bytes);
        self
    }

    /// Room for `bytes` more bytes of commands.
    pub fn reserve(&mut self, bytes: usize) {
        self.bytes.reserve(bytes);
    }

    /// Bytes of commands it has room for.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Where the commands end now: [`Packed::truncate`] takes those written after it away.
    pub fn mark(&self) -> Mark {
        Mark { bytes: self.bytes.len(), count: self.count }
    }

    /// The commands up to `mark` (taken from this `Packed`), the room kept.
    pub fn truncate(&mut self, mark: Mark) {
        self.bytes.truncate(mark.bytes);
        self.count = self.count.min(mark.count);
    }

    /// No commands, its room kept.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.count = 0;
    }

    /// Every command of `other`, after these.
    pub fn append(&mut self, other: &Packed) -> &mut Packed {
        self.count += other.count;
        self.bytes.extend_from_slice(&other.bytes);
        self
    }

    /// How many commands.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    #[inline]
    fn digits(&mut self, n: u64) -> &mut Packed {
        let mut digits = [0; 20];
        self.bytes.extend_from_slice(decimal(n, &mut digits));
        self.bytes.extend_from_slice(b"\r\n");
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_the_bytes_a_cmd_packs() {
        let mut packed = Packed::new();
        packed.command(5).arg(b"XADD").arg(b"{q}:jobs").arg(b"*").arg(b"d").arg(b"a\r\nb\x00");
        packed.command(3).arg(b"XDEL").arg(b"").number(u64::MAX);
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(1).arg(2000);
        packed.cmd(&cmd);
        let mut want =
            redis::cmd("XADD").arg("{q}:jobs").arg("*").arg("d").arg(b"a\r\nb\x00").get_packed_command();
        want.extend(redis::cmd("XDEL").arg("").arg(u64::MAX).get_packed_command());
        want.extend(cmd.get_packed_command());
        assert_eq!(String::from_utf8_lossy(packed.bytes()), String::from_utf8_lossy(&want));
        assert_eq!(packed.len(), 3);
        // Every way a length or a number is written, at the edges of each.
        let sizes = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 1001, 70_000];
        let numbers = [0, 1, 9, 10, 99, 100, 999, 1000, 12_345, u64::MAX];
        let mut edges = Packed::new();
        let mut set = redis::cmd("SET");
        edges.command(1 + sizes.len() + numbers.len()).arg(b"SET");
        for size in sizes {
            let arg: Vec<u8> = (0..size).map(|i| b"\r\n$*9"[i % 5]).collect();
            edges.arg(&arg);
            set.arg(arg);
        }
        for n in numbers {
            edges.number(n);
            set.arg(n);
        }
        assert!(edges.bytes() == set.get_packed_command(), "not the bytes a Cmd packs");
        let mut both = Packed::new();
        both.append(&packed).append(&packed);
        assert_eq!((both.len(), both.bytes().len()), (6, 2 * want.len()));
        // What is written after a mark is taken away, and the same can be written again.
        let mark = both.mark();
        both.command(2).arg(b"WATCH").arg(&[b'k'; 300]);
        assert_eq!(both.len(), 7);
        both.truncate(mark);
        assert_eq!((both.len(), both.bytes().len()), (6, 2 * want.len()));
        both.command(1).arg(b"EXEC");
        assert!(both.bytes().ends_with(b"*1\r\n$4\r\nEXEC\r\n") && both.len() == 7);
    }
}
