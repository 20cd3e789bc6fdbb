//! A connection for the replies read per job, by a RESP2 parser of taskd's own: a consumer's
//! XREADGROUPs and the MULTI that writes its outcomes, the bridge's XREAD of its reply stream.
//!
//! Why: callgrind put the `redis` crate's reply parser (built on `combine`) at about half of a
//! consumer's instructions per durable job (some 27k of 58k), and a job's stream entry is a
//! dozen values. This parser reads the same bytes into the same [`Value`]s (randomized tests
//! hold it to the crate's parser) at about a third of that, most of it the values' allocations.
//!
//! It is a [`ConnectionLike`], so the crate's commands and pipelines run on it unchanged. It
//! speaks plain TCP or a Unix socket, RESP2, as the crate would with the same URL (AUTH, SELECT);
//! for anything else (TLS, Sentinel, Cluster, RESP3, a server that refuses the handshake) it is
//! the crate's own connection, so every URL works as before, only slower.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use redis::{Connection, ConnectionLike, RedisError, RedisResult, Value};

/// As the crate's parser: a reply nested deeper than this is refused.
const MAX_DEPTH: usize = 100;
/// The read buffer's first size; it grows to hold the largest reply read.
const BUF_START: usize = 64 * 1024;

pub enum HotConn {
    Own(Own),
    Crate(Connection),
}

pub struct Own {
    sock: Sock,
    /// Bytes read and not yet parsed: `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    db: i64,
    open: bool,
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HotConn {
    /// Connects to `info` with our own parser where it can (see the module doc); otherwise
    /// `fallback` makes the crate's connection. `reply_limit` None: no limit on a reply (for a
    /// connection that blocks in XREADGROUP).
    pub fn connect(
        info: Option<&redis::ConnectionInfo>,
        connect_limit: Duration,
        reply_limit: Option<Duration>,
        write_limit: Duration,
        fallback: impl FnOnce() -> RedisResult<Connection>,
    ) -> RedisResult<HotConn> {
        if let Some(info) = info {
            match Own::connect(info, connect_limit, reply_limit, write_limit) {
                Ok(Some(own)) => return Ok(HotConn::Own(own)),
                // Not a kind of connection it speaks: the crate's.
                Ok(None) => {}
                // Unreachable: so would the crate's be.
                Err(e) if crate::durable::redis_io::is_connection_error(&e) => return Err(e),
                // Refused (a handshake it does not know): the crate knows more of them.
                Err(_) => {}
            }
        }
        fallback().map(HotConn::Crate)
    }

    fn inner(&mut self) -> &mut dyn ConnectionLike {
        match self {
            HotConn::Own(own) => own,
            HotConn::Crate(conn) => conn,
        }
    }
}

impl ConnectionLike for HotConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.inner().req_packed_command(cmd)
    }

    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        self.inner().req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        match self {
            HotConn::Own(own) => own.db,
            HotConn::Crate(conn) => conn.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        self.inner().check_connection()
    }

    fn is_open(&self) -> bool {
        match self {
            HotConn::Own(own) => own.open,
            HotConn::Crate(conn) => conn.is_open(),
        }
    }
}

impl Own {
    /// None: not a plain TCP or Unix socket URL in RESP2.
    fn connect(
        info: &redis::ConnectionInfo,
        connect_limit: Duration,
        reply_limit: Option<Duration>,
        write_limit: Duration,
    ) -> RedisResult<Option<Own>> {
        let settings = info.redis_settings();
        if settings.protocol().supports_resp3() {
            return Ok(None);
        }
        let sock = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
                let mut found = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, connect_limit) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(reply_limit)?;
                s.set_write_timeout(Some(write_limit))?;
                Sock::Tcp(s)
            }
            redis::ConnectionAddr::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(reply_limit)?;
                s.set_write_timeout(Some(write_limit))?;
                Sock::Unix(s)
            }
            _ => return Ok(None),
        };
        let mut own = Own { sock, buf: vec![0; BUF_START], start: 0, end: 0, db: settings.db(), open: true };
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            auth.query::<()>(&mut own)?;
        }
        if settings.db() != 0 {
            redis::cmd("SELECT").arg(settings.db()).query::<()>(&mut own)?;
        }
        Ok(Some(own))
    }

    fn send(&mut self, bytes: &[u8]) -> RedisResult<()> {
        let sent = match &mut self.sock {
            Sock::Tcp(s) => s.write_all(bytes),
            Sock::Unix(s) => s.write_all(bytes),
        };
        sent.map_err(|e| self.broken(e))
    }

    fn broken(&mut self, e: io::Error) -> RedisError {
        self.open = false;
        e.into()
    }

    /// The next reply (an error reply is a [`Value::ServerError`]). After a failed read the
    /// connection is not used again: it fails every call.
    fn recv(&mut self) -> RedisResult<Value> {
        if !self.open {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "an earlier reply failed").into());
        }
        loop {
            match parse(&self.buf[self.start..self.end]) {
                Ok(Some((value, used))) => {
                    self.start += used;
                    if self.start == self.end {
                        (self.start, self.end) = (0, 0);
                    }
                    return Ok(value);
                }
                Ok(None) => {}
                Err(why) => {
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a reply Redis cannot have sent: {why}"),
                    );
                    return Err(self.broken(e));
                }
            }
            // Room for more: when the buffer is full, the unparsed bytes to its front (not at
            // every read: a pipeline's replies come in many), then a bigger one if still full.
            if self.end == self.buf.len() && self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            if self.end == self.buf.len() {
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
            let read = match &mut self.sock {
                Sock::Tcp(s) => s.read(&mut self.buf[self.end..]),
                Sock::Unix(s) => s.read(&mut self.buf[self.end..]),
            };
            match read {
                Ok(0) => return Err(self.broken(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.broken(e)),
            }
        }
    }
}

impl ConnectionLike for Own {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.send(cmd)?;
        self.recv()
    }

    /// As the crate's: `offset` replies (a MULTI and its QUEUED) are read and dropped, an error
    /// among them failing the call (the transaction was aborted), then `count` replies.
    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        self.send(cmd)?;
        let mut refused = None;
        let mut replies = Vec::with_capacity(count);
        for i in 0..offset + count {
            let reply = self.recv()?;
            if i < offset {
                if let Value::ServerError(e) = reply {
                    refused.get_or_insert(e);
                }
            } else {
                replies.push(reply);
            }
        }
        match refused {
            Some(e) => Err(e.into()),
            None => Ok(replies),
        }
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

/// One RESP2 reply at the start of `buf`, and how many bytes it took; None if `buf` holds only
/// part of it. The same [`Value`] as the crate's parser makes of the same bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, &'static str> {
    // Whether the whole reply is there, first: no value is built from a part (a large reply
    // comes in many reads, and each would build it again).
    if skip(buf, 0, 1)?.is_none() {
        return Ok(None);
    }
    let mut pos = 0;
    let value = value(buf, &mut pos)?;
    Ok(Some((value, pos)))
}

/// The line at `buf[at..]` (without its CRLF) and where the next begins; None: not all there.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let mut from = 0;
    loop {
        let cr = rest[from..].iter().position(|&b| b == b'\r')? + from;
        match rest.get(cr + 1) {
            Some(b'\n') => return Some((&rest[..cr], at + cr + 2)),
            Some(_) => from = cr + 1,
            None => return None,
        }
    }
}

fn number(line: &[u8]) -> Result<i64, &'static str> {
    // What Redis writes: digits, perhaps after a minus, short enough not to overflow.
    let (negative, digits) = match line {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, line),
    };
    if !digits.is_empty() && digits.len() <= 18 && digits.iter().all(u8::is_ascii_digit) {
        let n = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
        return Ok(if negative { -n } else { n });
    }
    // Anything else as the crate reads it (it trims spaces, takes a plus sign).
    std::str::from_utf8(line).ok().and_then(|s| s.trim().parse().ok()).ok_or("Expected integer, got garbage")
}

/// Where the reply at `buf[at..]` ends, without building it; None if not all there.
fn skip(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, &'static str> {
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    if depth > MAX_DEPTH {
        return Err("Maximum recursion depth exceeded");
    }
    if !b"+-:$*".contains(&kind) {
        return Err("a reply type RESP2 does not have");
    }
    let Some((line, next)) = line(buf, at + 1) else { return Ok(None) };
    match kind {
        b'+' | b'-' => {
            std::str::from_utf8(line).map_err(|_| "invalid utf-8")?;
            Ok(Some(next))
        }
        b':' => number(line).map(|_| Some(next)),
        b'$' => {
            let size = number(line)?;
            if size < 0 {
                return Ok(Some(next));
            }
            let end = usize::try_from(size).ok().and_then(|s| next.checked_add(s)).ok_or("too long")?;
            match buf.get(end..end.checked_add(2).ok_or("too long")?) {
                None => Ok(None),
                Some(b"\r\n") => Ok(Some(end + 2)),
                Some(_) => Err("a bulk string not ended by CRLF"),
            }
        }
        b'*' => {
            let len = number(line)?;
            let mut pos = next;
            for _ in 0..len.max(0) {
                match skip(buf, pos, depth + 1)? {
                    Some(end) => pos = end,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos))
        }
        _ => Err("a reply type RESP2 does not have"),
    }
}

/// The reply at `buf[*pos..]`, known to be all there and not too deep ([`skip`]); `*pos`
/// moves past it.
fn value(buf: &[u8], pos: &mut usize) -> Result<Value, &'static str> {
    let kind = buf[*pos];
    let (line, next) = line(buf, *pos + 1).ok_or("cut short")?;
    let start = *pos;
    *pos = next;
    Ok(match kind {
        b'+' => match std::str::from_utf8(line).map_err(|_| "invalid utf-8")? {
            "OK" => Value::Okay,
            text => Value::SimpleString(text.to_string()),
        },
        // Rare: an error reply is what the crate makes of it (its code, its kind).
        b'-' => {
            redis::parse_redis_value(&buf[start..next]).map_err(|_| "an error reply the crate refuses")?
        }
        b':' => Value::Int(number(line)?),
        b'$' => {
            let size = number(line)?;
            if size < 0 {
                return Ok(Value::Nil);
            }
            let end = next + size as usize;
            *pos = end + 2;
            Value::BulkString(buf[next..end].to_vec())
        }
        b'*' => {
            let len = number(line)?;
            if len < 0 {
                return Ok(Value::Nil);
            }
            let mut items = Vec::with_capacity(len as usize);
            for _ in 0..len {
                items.push(value(buf, pos)?);
            }
            Value::Array(items)
        }
        _ => return Err("a reply type RESP2 does not have"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so that a failure repeats.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random RESP2 reply, as bytes.
    fn reply(rng: &mut Rng, depth: usize, out: &mut Vec<u8>) {
        let kind = if depth > 3 { rng.below(5) } else { rng.below(7) };
        match kind {
            0 => out.extend_from_slice(if rng.below(2) == 0 { b"+OK\r\n" } else { b"+QUEUED\r\n" }),
            1 => out.extend_from_slice(format!(":{}\r\n", rng.next() as i64 >> rng.below(64)).as_bytes()),
            2 => out.extend_from_slice(if rng.below(2) == 0 { b"$-1\r\n" } else { b"*-1\r\n" }),
            3 => {
                let codes: [&[u8]; 5] = [
                    b"ERR no such key",
                    b"WRONGTYPE Operation",
                    b"MOVED 3999 127.0.0.1:7001",
                    b"NOGROUP x",
                    b"EXECABORT Transaction discarded",
                ];
                out.push(b'-');
                out.extend_from_slice(codes[rng.below(5) as usize]);
                out.extend_from_slice(b"\r\n");
            }
            4 | 5 => {
                // Bulk strings with the bytes that matter to a parser: CR, LF, '$', '*'.
                let len = rng.below(40) as usize;
                const BYTES: &[u8] = b"ab\r\n$*:-+0\x00\xff";
                let bytes: Vec<u8> =
                    (0..len).map(|_| BYTES[rng.below(BYTES.len() as u64) as usize]).collect();
                out.extend_from_slice(format!("${len}\r\n").as_bytes());
                out.extend_from_slice(&bytes);
                out.extend_from_slice(b"\r\n");
            }
            _ => {
                let len = rng.below(6);
                out.extend_from_slice(format!("*{len}\r\n").as_bytes());
                for _ in 0..len {
                    reply(rng, depth + 1, out);
                }
            }
        }
    }

    #[test]
    fn reads_what_the_crates_parser_reads_from_the_same_bytes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            reply(&mut rng, 1, &mut bytes);
            let theirs = redis::parse_redis_value(&bytes).expect("the crate reads a valid reply");
            let (ours, used) = parse(&bytes).expect("valid").expect("whole");
            assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&bytes));
            assert_eq!(used, bytes.len());
            // Every part of it is "not all there yet", never an error or a value.
            let cut = rng.below(bytes.len() as u64) as usize;
            assert_eq!(parse(&bytes[..cut]), Ok(None), "{:?}", String::from_utf8_lossy(&bytes[..cut]));
            // Two replies back to back: the first, and where the second begins.
            let mut two = bytes.clone();
            reply(&mut rng, 1, &mut two);
            assert_eq!(parse(&two).unwrap().map(|(_, n)| n), Some(bytes.len()));
        }
    }

    #[test]
    fn what_it_reads_from_damaged_bytes_the_crate_reads_the_same() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut read = 0;
        for _ in 0..50_000 {
            let mut bytes = Vec::new();
            reply(&mut rng, 1, &mut bytes);
            for _ in 0..=rng.below(3) {
                let at = rng.below(bytes.len() as u64) as usize;
                match rng.below(3) {
                    0 => bytes[at] = rng.next() as u8,
                    1 => bytes[at] = b"\r\n$*:-+0123456789"[rng.below(17) as usize],
                    _ => {
                        bytes.remove(at);
                        if bytes.is_empty() {
                            break;
                        }
                    }
                }
            }
            // Never a panic; and a reply it reads whole is the one the crate reads.
            if let Ok(Some((ours, used))) = parse(&bytes) {
                read += 1;
                let theirs = redis::parse_redis_value(&bytes[..used]);
                assert_eq!(Some(&ours), theirs.as_ref().ok(), "{:?}", String::from_utf8_lossy(&bytes));
            }
        }
        assert!(read > 1000, "the damage left too few replies to compare ({read})");
    }

    #[test]
    fn refuses_too_deep_a_reply_as_the_crate_does() {
        let deep = |n: usize| {
            let mut b = "*1\r\n".repeat(n).into_bytes();
            b.extend_from_slice(b":1\r\n");
            b
        };
        assert!(parse(&deep(99)).unwrap().is_some());
        assert!(redis::parse_redis_value(&deep(99)).is_ok());
        assert!(parse(&deep(100)).is_err());
        assert!(redis::parse_redis_value(&deep(100)).is_err());
    }

    #[test]
    fn an_error_reply_keeps_its_code() {
        let (v, _) = parse(b"-NOGROUP No such key\r\n").unwrap().unwrap();
        let Value::ServerError(e) = v else { panic!("{v:?}") };
        assert_eq!(RedisError::from(e).code(), Some("NOGROUP"));
    }
}
