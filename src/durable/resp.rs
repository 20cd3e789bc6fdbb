//! Commands written straight into RESP, the bytes Redis reads, for the commands of every job:
//! a `redis::Cmd` grows its argument buffers one allocation at a time, and a round then
//! cloned each command into its transaction and packed it again (about 8k instructions per
//! job in the bridge, callgrind). Other commands are packed from their `Cmd` into the same
//! buffer.

use crate::json_line::decimal;

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
    pub fn command(&mut self, args: usize) -> &mut Packed {
        self.count += 1;
        self.bytes.push(b'*');
        self.digits(args as u64)
    }

    pub fn arg(&mut self, arg: &[u8]) -> &mut Packed {
        self.bytes.push(b'$');
        self.digits(arg.len() as u64);
        self.bytes.extend_from_slice(arg);
        self.bytes.extend_from_slice(b"\r\n");
        self
    }

    /// A number as its decimal digits, as `Cmd::arg` writes it.
    pub fn number(&mut self, n: u64) -> &mut Packed {
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
        let mut both = Packed::new();
        both.append(&packed).append(&packed);
        assert_eq!((both.len(), both.bytes().len()), (6, 2 * want.len()));
    }
}
