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
use std::sync::Arc;
use std::time::Duration;

use redis::{Connection, ConnectionLike, RedisError, RedisResult, Value};

use super::consumer::{At, InPack};
use super::entry::{JobEntry, Origins, Rejected};
use super::keys::is_packs;
use super::pack;
use super::redis_io::{self, StreamEntry};
use super::resp::Packed;

/// As the crate's parser: a reply nested deeper than this is refused.
const MAX_DEPTH: usize = 100;
/// Entries of one stream reply made room for at once (a consumer takes 64 at most).
const TAKE_ROOM: usize = 128;
/// Spans of one entry's fields made room for at once (a job has up to 22).
const SPANS_ROOM: usize = 32;
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

    /// Runs `cmds`, XREAD / XREADGROUP commands, and gives each one's entries with their
    /// stream's key: what [`redis_io::read_streams`] makes of each reply, read here straight
    /// from the bytes ([`parse_streams`]: no [`Value`] per field, whose allocations were most
    /// of a consumer's parse). An error reply anywhere fails the call, as `Pipeline::query`
    /// does, once every reply is read.
    pub fn read_streams(&mut self, cmds: &Packed) -> RedisResult<Vec<Streams>> {
        match self {
            HotConn::Own(own) => own.read_replies(cmds.bytes(), cmds.len(), parse_streams),
            HotConn::Crate(conn) => conn
                .req_packed_commands(cmds.bytes(), 0, cmds.len())?
                .into_iter()
                .map(|v| v.extract_error().map(redis_io::read_streams))
                .collect(),
        }
    }

    /// As [`HotConn::read_streams`], each entry made straight into its job (see
    /// [`parse_jobs`]; `names`: the streams read, whose keys the jobs share).
    pub fn read_jobs(&mut self, cmds: &Packed, names: &[Arc<str>]) -> RedisResult<Vec<Jobs>> {
        match self {
            HotConn::Own(own) => own.read_replies(cmds.bytes(), cmds.len(), |buf| parse_jobs(buf, names)),
            HotConn::Crate(conn) => conn
                .req_packed_commands(cmds.bytes(), 0, cmds.len())?
                .into_iter()
                .map(|v| v.extract_error().map(|v| jobs_of(redis_io::read_streams(v), names)))
                .collect(),
        }
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
        self.recv_with(parse)
    }

    /// `count` replies of XREAD / XREADGROUP commands sent as `cmds`, read by `parse` (as
    /// [`parse_streams`] reads them).
    #[allow(clippy::type_complexity)]
    fn read_replies<T>(
        &mut self,
        cmds: &[u8],
        count: usize,
        parse: impl Fn(&[u8]) -> Result<Option<(Result<T, Value>, usize)>, &'static str>,
    ) -> RedisResult<Vec<T>> {
        self.send(cmds)?;
        let mut refused = None;
        let mut replies = Vec::with_capacity(count);
        for _ in 0..count {
            match self.recv_with(&parse)? {
                Ok(streams) => replies.push(streams),
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        match refused {
            Some(Value::ServerError(e)) => Err(e.into()),
            Some(_) => {
                Err(io::Error::new(io::ErrorKind::InvalidData, "an error reply that is no error").into())
            }
            None => Ok(replies),
        }
    }

    /// The next reply, as `parse` reads it.
    fn recv_with<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, &'static str>,
    ) -> RedisResult<T> {
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
        for _ in 0..offset {
            // Passed over, not built (a MULTI's QUEUED each made a String): only an error
            // reply is looked at.
            if let Some(Value::ServerError(e)) = self.recv_with(parse_error)? {
                refused.get_or_insert(e);
            }
        }
        for _ in 0..count {
            replies.push(self.recv()?);
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
    if skip(buf, 0, 1, &mut None)?.is_none() {
        return Ok(None);
    }
    let mut pos = 0;
    let value = value(buf, &mut pos)?;
    Ok(Some((value, pos)))
}

/// As [`parse`], but building the reply only if it is an error reply (None for any other):
/// the same bytes are refused, or waited for.
fn parse_error(buf: &[u8]) -> Result<Option<(Option<Value>, usize)>, &'static str> {
    let mut error = None;
    let Some(end) = skip(buf, 0, 1, &mut error)? else { return Ok(None) };
    if error.is_none() {
        return Ok(Some((None, end)));
    }
    // Rare: built as `parse` builds it (which refuses an error reply the crate refuses).
    let mut pos = 0;
    let value = value(buf, &mut pos)?;
    Ok(Some((matches!(value, Value::ServerError(_)).then_some(value), pos)))
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

/// Where the reply at `buf[at..]` ends, without building it; None if not all there. `error`:
/// where its first error reply (in the order of the bytes) begins, if it has one.
fn skip(
    buf: &[u8],
    at: usize,
    depth: usize,
    error: &mut Option<usize>,
) -> Result<Option<usize>, &'static str> {
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
            if kind == b'-' {
                error.get_or_insert(at);
            }
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
                match skip(buf, pos, depth + 1, error)? {
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

/// The entries of an XREAD or XREADGROUP reply, each with its stream's key.
pub type Streams = Vec<(String, StreamEntry)>;

/// One XREAD / XREADGROUP reply at the start of `buf`, and how many bytes it took; None if
/// `buf` holds only part of it. Its entries are what [`redis_io::read_streams`] makes of the
/// [`Value`] [`parse`] reads from the same bytes, shape for shape (whoever can write to Redis
/// writes entries: an odd shape is read as that function reads it, never a panic); an error
/// reply anywhere in it gives that error (the first, as `Value::extract_error` does) instead.
/// Bytes [`parse`] refuses, it refuses. One pass, building no [`Value`]: a consumer reads
/// every job through it.
#[allow(clippy::type_complexity)]
pub fn parse_streams(buf: &[u8]) -> Result<Option<(Result<Streams, Value>, usize)>, &'static str> {
    let mut sink = ToEntries { out: Vec::new(), key: String::new() };
    Ok(walk(buf, &mut sink)?.map(|(read, used)| (read.map(|()| sink.out), used)))
}

/// The jobs of an XREADGROUP reply, each where it is (its stream, its id) and checked as
/// [`JobEntry::checked`] checks it. A job is shared at once, as it will be while it runs (see
/// `heartbeat::Pulse::running`): one allocation made early, and what moves from queue to
/// queue is a pointer, not the whole job. A pack (an entry of the stream of packs) is one
/// item per job of it, each with its place in the pack (see [`expand_pack`]).
pub type Jobs = Vec<(At, Result<Arc<JobEntry>, Rejected>, Option<InPack>)>;

/// As [`parse_streams`], but each entry made straight into its job, with no [`StreamEntry`]
/// between (see [`JobEntry::checked_fields`]): a job is what [`JobEntry::checked`] makes of
/// the entry [`parse_streams`] reads, and its stream's key is the one of `names` it is (one
/// allocation per stream of the reply, not per job), or a new one.
#[allow(clippy::type_complexity)]
pub fn parse_jobs(
    buf: &[u8],
    names: &[Arc<str>],
) -> Result<Option<(Result<Jobs, Value>, usize)>, &'static str> {
    let mut sink = ToJobs { out: Vec::new(), names, key: None, origins: Origins::default() };
    Ok(walk(buf, &mut sink)?.map(|(read, used)| (read.map(|()| sink.out), used)))
}

/// The jobs of `entries` (see [`parse_jobs`]), read by other means.
pub fn jobs_of(entries: Streams, names: &[Arc<str>]) -> Jobs {
    let mut out = Vec::with_capacity(entries.len());
    let mut origins = Origins::default();
    for (key, mut e) in entries {
        let at = At { stream: name_of(names, &key), id: Arc::from(std::mem::take(&mut e.id)) };
        if is_packs(&at.stream) {
            expand_pack(at, e.fields(), &mut origins, &mut out);
        } else {
            out.push((at, JobEntry::checked_fields_in(e.fields(), &mut origins).map(Arc::new), None));
        }
    }
    out
}

/// The items of the entry `at` of the stream of packs, of these fields: one per job of its
/// pack (`super::pack`), checked as the job of a plain entry is, each with its place; then, if
/// the pack is damaged, one that is no job, saying why (its place the last: it is acknowledged
/// with the pack). An entry that is no pack, whose pack is damaged from its first job, or of no
/// job at all, is one item that is no job, in no pack (acknowledged as a plain entry is).
pub fn expand_pack<'a>(
    at: At,
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    origins: &mut Origins,
    out: &mut Jobs,
) {
    let mut any = false;
    let mut blob = None;
    for (name, value) in fields {
        any = true;
        if name == pack::FIELD && blob.is_none() {
            blob = Some(value);
        }
    }
    let Some(blob) = blob else {
        let why = if any {
            "an entry of the stream of packs with no pack (field p)"
        } else {
            "deleted while it was pending"
        };
        out.push((at, Err(Rejected::NotAJob(why.into())), None));
        return;
    };
    let first = out.len();
    let mut index = 0;
    let damage = pack::each_job(blob, |fields| {
        index += 1;
        // Its count is known at the end (a pack is read once): set below.
        let place = InPack { index, count: 0 };
        let job = JobEntry::checked_fields_in(fields.iter().copied(), origins);
        out.push((at.clone(), job.map(Arc::new), Some(place)));
    });
    if index == 0 {
        let why = damage.unwrap_or_else(|| "a pack of no job".into());
        out.push((at, Err(Rejected::NotAJob(why)), None));
        return;
    }
    // At most `pack::MAX_JOBS` and one: no overflow.
    let count = index + u32::from(damage.is_some());
    for (_, _, place) in &mut out[first..] {
        if let Some(place) = place {
            place.count = count;
        }
    }
    if let Some(why) = damage {
        let why = format!("the rest of its pack is damaged: {why}");
        out.push((at, Err(Rejected::NotAJob(why)), Some(InPack { index: count, count })));
    }
}

/// The stream's name of `names` that `key` is, or a new one.
fn name_of(names: &[Arc<str>], key: &str) -> Arc<str> {
    names.iter().find(|n| ***n == *key).cloned().unwrap_or_else(|| Arc::from(key))
}

/// One XREAD / XREADGROUP reply at the start of `buf` taken apart into `sink`, and how many
/// bytes it took (see [`parse_streams`]).
#[allow(clippy::type_complexity)]
fn walk(buf: &[u8], sink: &mut impl Sink) -> Result<Option<(Result<(), Value>, usize)>, &'static str> {
    let mut walk = Walk { buf, pos: 0, error: None, spans: Vec::new() };
    match walk.streams(sink) {
        Ok(()) => {}
        Err(Stop::More) => return Ok(None),
        Err(Stop::Bad(why)) => return Err(why),
    }
    let end = walk.pos;
    if walk.error.is_some() {
        // Rare: the reply as `parse` reads it (which refuses an error reply the crate refuses,
        // wherever it is), and its first error.
        let Some((whole, _)) = parse(&buf[..end])? else { return Err("cut short") };
        return Ok(Some((Err(first_error(whole).ok_or("no error reply in it")?), end)));
    }
    Ok(Some((Ok(()), end)))
}

/// What the entries of a stream reply are made into, as [`Walk`] finds them.
trait Sink {
    /// The entries of stream `key` follow (None: a key that is no string, read as "").
    fn stream(&mut self, walk: &Walk, key: Option<Span>) -> Result<(), Stop>;
    /// Room for `count` more entries.
    fn reserve(&mut self, count: usize);
    /// An entry of that stream: its id, and its fields as pairs of spans (an odd one last is
    /// no field).
    fn entry(&mut self, walk: &Walk, id: Span, spans: &[Span]) -> Result<(), Stop>;
}

/// Into [`Streams`]: what [`redis_io::read_streams`] makes.
struct ToEntries {
    out: Streams,
    key: String,
}

impl Sink for ToEntries {
    fn stream(&mut self, walk: &Walk, key: Option<Span>) -> Result<(), Stop> {
        self.key = match key {
            Some(k) => owned_text(walk.text(k, &mut Vec::new())?),
            None => String::new(),
        };
        Ok(())
    }

    fn reserve(&mut self, count: usize) {
        self.out.reserve(count);
    }

    fn entry(&mut self, walk: &Walk, id: Span, spans: &[Span]) -> Result<(), Stop> {
        let entry = walk.entry(id, spans)?;
        self.out.push((self.key.clone(), entry));
        Ok(())
    }
}

/// Into [`Jobs`] (see [`parse_jobs`]).
struct ToJobs<'n> {
    out: Jobs,
    names: &'n [Arc<str>],
    key: Option<Arc<str>>,
    /// Most jobs of a reply share their origin.
    origins: Origins,
}

impl Sink for ToJobs<'_> {
    fn stream(&mut self, walk: &Walk, key: Option<Span>) -> Result<(), Stop> {
        let known = match key {
            Some(Span::Bytes(from, to)) => {
                let key = walk.buf.get(from..to).unwrap_or_default();
                self.names.iter().find(|n| n.as_bytes() == key).cloned()
            }
            _ => None,
        };
        self.key = Some(match known {
            Some(name) => name,
            None => match key {
                Some(k) => shared_text(walk.text(k, &mut Vec::new())?),
                None => Arc::from(""),
            },
        });
        Ok(())
    }

    fn reserve(&mut self, count: usize) {
        self.out.reserve(count);
    }

    fn entry(&mut self, walk: &Walk, id: Span, spans: &[Span]) -> Result<(), Stop> {
        let stream = self.key.clone().unwrap_or_else(|| Arc::from(""));
        let (id, job) = if spans.iter().any(|s| matches!(s, Span::Int(_))) {
            // Never from Redis (its fields are strings): the digits written out, as
            // `parse_streams` writes them.
            let mut entry = walk.entry(id, spans)?;
            let id = Arc::from(std::mem::take(&mut entry.id));
            if is_packs(&stream) {
                expand_pack(At { stream, id }, entry.fields(), &mut self.origins, &mut self.out);
                return Ok(());
            }
            (id, JobEntry::checked_fields_in(entry.fields(), &mut self.origins).map(Arc::new))
        } else {
            let bytes = |span: Span| match span {
                Span::Bytes(from, to) => walk.buf.get(from..to).unwrap_or_default(),
                Span::Int(_) => &[],
            };
            let fields = spans.chunks_exact(2).map(|pair| (bytes(pair[0]), bytes(pair[1])));
            let id = shared_text(walk.text(id, &mut Vec::new())?);
            if is_packs(&stream) {
                expand_pack(At { stream, id }, fields, &mut self.origins, &mut self.out);
                return Ok(());
            }
            (id, JobEntry::checked_fields_in(fields, &mut self.origins).map(Arc::new))
        };
        self.out.push((At { stream, id }, job, None));
        Ok(())
    }
}

/// `bytes` as text, as `String::from_utf8_lossy` makes it (whose check of valid text, what
/// Redis sends, costs more than `from_utf8`'s).
fn owned_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// As [`owned_text`], shared: an entry's id, which the jobs of a pack share (one allocation).
fn shared_text(bytes: &[u8]) -> Arc<str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Arc::from(text),
        Err(_) => Arc::from(String::from_utf8_lossy(bytes)),
    }
}

/// The first error reply in `v`, in the order of its bytes (as `Value::extract_error` finds it).
fn first_error(v: Value) -> Option<Value> {
    match v {
        Value::ServerError(_) => Some(v),
        Value::Array(items) => items.into_iter().find_map(first_error),
        _ => None,
    }
}

/// Why [`Walk`] stopped: the reply is not all there yet, or is not RESP2.
enum Stop {
    More,
    Bad(&'static str),
}

impl From<&'static str> for Stop {
    fn from(why: &'static str) -> Stop {
        Stop::Bad(why)
    }
}

/// A field's name or value where the reply has it: a string's bytes, or an integer (whose
/// decimal digits it stands for).
#[derive(Clone, Copy)]
enum Span {
    Bytes(usize, usize),
    Int(i64),
}

/// Takes a reply apart as [`redis_io::read_streams`] takes its [`Value`] apart, checking each
/// value as [`skip`] does (so that it refuses, or waits for, the bytes [`parse`] would): what
/// is not of the shape it looks for is passed over as that function passes over it.
struct Walk<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Where the first error reply begins.
    error: Option<usize>,
    /// The fields of the entry being read (kept from one entry to the next: no allocation).
    spans: Vec<Span>,
}

impl Walk<'_> {
    /// `[[key, [entry, ...]], ...]` (depth 1); a value of another shape: none.
    fn streams(&mut self, sink: &mut impl Sink) -> Result<(), Stop> {
        for _ in 0..self.array(1)? {
            let parts = self.array(2)?;
            if parts == 0 {
                continue;
            }
            let key = self.bytes(3)?;
            sink.stream(self, key)?;
            if parts >= 2 {
                self.entries(sink)?;
            }
            for _ in 2..parts {
                self.skip(3)?;
            }
        }
        Ok(())
    }

    /// `[[id, [field, value, ...]], ...]` of stream `key` (as `redis_io::entries`, at depth 3):
    /// an entry without an id is none; a field or value that is no string is left out (and
    /// the pairs go on without it); an odd one at the end is no field.
    fn entries(&mut self, sink: &mut impl Sink) -> Result<(), Stop> {
        let count = self.array(3)?;
        // At once, not by doublings (a count from the reply is no promise: bounded).
        sink.reserve(count.min(TAKE_ROOM));
        // A job's dozen fields and more, at once (this walk's first entry grew it four times).
        self.spans.reserve(SPANS_ROOM);
        for _ in 0..count {
            let parts = self.array(4)?;
            if parts == 0 {
                continue;
            }
            let id = self.bytes(5)?;
            self.spans.clear();
            if parts >= 2 {
                for _ in 0..self.array(5)? {
                    if let Some(span) = self.bytes(6)? {
                        self.spans.push(span);
                    }
                }
            }
            for _ in 2..parts {
                self.skip(5)?;
            }
            let Some(id) = id else { continue };
            sink.entry(self, id, &self.spans)?;
        }
        Ok(())
    }

    /// The entry of `id` with the fields of `spans` (pairs; an odd one last is no field).
    fn entry(&self, id: Span, spans: &[Span]) -> Result<StreamEntry, Stop> {
        let mut entry = StreamEntry::new(owned_text(self.text(id, &mut Vec::new())?));
        let pairs = spans.len() / 2;
        let size = spans[..pairs * 2].iter().map(|s| match s {
            Span::Bytes(from, to) => to - from,
            Span::Int(_) => 20,
        });
        entry.reserve(pairs, size.sum());
        for pair in spans.chunks_exact(2) {
            let (mut name, mut value) = (Vec::new(), Vec::new());
            let name = self.text(pair[0], &mut name)?;
            let value = self.text(pair[1], &mut value)?;
            entry.push(name, value);
        }
        Ok(entry)
    }

    /// The bytes `span` stands for (an integer's digits written into `digits`).
    #[inline]
    fn text<'b>(&'b self, span: Span, digits: &'b mut Vec<u8>) -> Result<&'b [u8], Stop> {
        match span {
            Span::Bytes(from, to) => Ok(self.buf.get(from..to).ok_or("cut short")?),
            Span::Int(n) => {
                *digits = n.to_string().into_bytes();
                Ok(digits)
            }
        }
    }

    /// The length of the array or bulk string at `pos` as Redis writes one (1 to 18 digits, then
    /// CRLF), and where its items or bytes begin; None for any other line (whole or not), which
    /// [`Walk::head`] and [`number`] read. In one pass, as a consumer reads some 14 a job.
    #[inline]
    fn length(&self) -> Option<(usize, usize)> {
        let mut i = self.pos + 1;
        let mut n = 0usize;
        while let Some(&b) = self.buf.get(i) {
            if b.is_ascii_digit() && i - self.pos <= 18 {
                n = n * 10 + usize::from(b - b'0');
                i += 1;
                continue;
            }
            let whole = b == b'\r' && i > self.pos + 1 && self.buf.get(i + 1) == Some(&b'\n');
            return whole.then_some((n, i + 2));
        }
        None
    }

    /// The kind and line of the value at `pos`; `pos` moves past the line.
    fn head(&mut self) -> Result<(u8, &[u8]), Stop> {
        let kind = *self.buf.get(self.pos).ok_or(Stop::More)?;
        let (line, next) = line(self.buf, self.pos + 1).ok_or(Stop::More)?;
        self.pos = next;
        Ok((kind, line))
    }

    /// Passes over the value at `pos`, at `depth`, as [`skip`] checks it.
    fn skip(&mut self, depth: usize) -> Result<(), Stop> {
        self.pos = skip(self.buf, self.pos, depth, &mut self.error)?.ok_or(Stop::More)?;
        Ok(())
    }

    /// As `redis_io::as_array`: an array's length (its items follow); anything else is passed
    /// over and has none.
    fn array(&mut self, depth: usize) -> Result<usize, Stop> {
        if self.buf.get(self.pos) != Some(&b'*') {
            self.skip(depth)?;
            return Ok(0);
        }
        if let Some((len, next)) = self.length() {
            self.pos = next;
            return Ok(len);
        }
        let (_, line) = self.head()?;
        // A negative length is a null array: none.
        Ok(usize::try_from(number(line)?).unwrap_or(0))
    }

    /// As `redis_io::as_bytes`: where the bytes of a bulk string or a simple string are, or an
    /// integer; None for anything else (passed over).
    fn bytes(&mut self, depth: usize) -> Result<Option<Span>, Stop> {
        match self.buf.get(self.pos) {
            Some(b'$') => {
                let size = match self.length() {
                    Some((size, next)) => {
                        self.pos = next;
                        size
                    }
                    None => {
                        let (_, line) = self.head()?;
                        let Ok(size) = usize::try_from(number(line)?) else { return Ok(None) };
                        size
                    }
                };
                let from = self.pos;
                let end = from.checked_add(size).ok_or("too long")?;
                match self.buf.get(end..end.checked_add(2).ok_or("too long")?) {
                    None => Err(Stop::More),
                    Some(b"\r\n") => {
                        self.pos = end + 2;
                        Ok(Some(Span::Bytes(from, end)))
                    }
                    Some(_) => Err(Stop::Bad("a bulk string not ended by CRLF")),
                }
            }
            Some(b'+') => {
                let at = self.pos + 1;
                let (_, line) = self.head()?;
                std::str::from_utf8(line).map_err(|_| "invalid utf-8")?;
                Ok(Some(Span::Bytes(at, at + line.len())))
            }
            Some(b':') => {
                let (_, line) = self.head()?;
                Ok(Some(Span::Int(number(line)?)))
            }
            _ => {
                self.skip(depth)?;
                Ok(None)
            }
        }
    }
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

    /// A random XREAD / XREADGROUP reply, mostly of the shape Redis sends, now and then with
    /// any other reply in any place (whoever can write to Redis, or a forged server).
    fn stream_reply(rng: &mut Rng, out: &mut Vec<u8>) {
        fn odd(rng: &mut Rng, out: &mut Vec<u8>) -> bool {
            if rng.below(12) == 0 {
                reply(rng, 2, out);
                return true;
            }
            false
        }
        if odd(rng, out) {
            return;
        }
        if rng.below(10) == 0 {
            out.extend_from_slice(b"*-1\r\n");
            return;
        }
        let streams = rng.below(3);
        out.extend_from_slice(format!("*{streams}\r\n").as_bytes());
        for s in 0..streams {
            if odd(rng, out) {
                continue;
            }
            let parts = if rng.below(8) == 0 { rng.below(4) } else { 2 };
            out.extend_from_slice(format!("*{parts}\r\n").as_bytes());
            for part in 0..parts {
                if part == 0 {
                    string(rng, out, format!("{{q}}:jobs{s}").as_bytes());
                    continue;
                }
                if part > 1 {
                    reply(rng, 2, out);
                    continue;
                }
                if odd(rng, out) {
                    continue;
                }
                let entries = rng.below(5);
                out.extend_from_slice(format!("*{entries}\r\n").as_bytes());
                for e in 0..entries {
                    if odd(rng, out) {
                        continue;
                    }
                    let parts = if rng.below(8) == 0 { rng.below(4) } else { 2 };
                    out.extend_from_slice(format!("*{parts}\r\n").as_bytes());
                    for part in 0..parts {
                        match part {
                            0 => {
                                let id = format!("{}-{e}", rng.below(1 << 40));
                                string(rng, out, id.as_bytes())
                            }
                            1 if rng.below(6) == 0 => out.extend_from_slice(b"*-1\r\n"),
                            1 if !odd(rng, out) => {
                                let values = if rng.below(6) == 0 { rng.below(7) } else { 2 * rng.below(7) };
                                out.extend_from_slice(format!("*{values}\r\n").as_bytes());
                                // A job's fields (half of them lead with those a job needs), or
                                // near them (see `parse_jobs`).
                                let job = rng.below(2) == 0;
                                for v in 0..values {
                                    let text: &[u8] = if job && v < 6 {
                                        [&b"o"[..], b"web-1", b"t", b"7", b"d", b"{}"][v as usize]
                                    } else if v % 2 == 0 {
                                        [&b"t"[..], b"o", b"d", b"s", b"w", b"c", b"k", b"kt", b"a", b"x"]
                                            [rng.below(10) as usize]
                                    } else {
                                        [
                                            &b"{\"to\":\"a\r\n\"}"[..],
                                            b"7",
                                            b"web-1",
                                            b"",
                                            b"6b31",
                                            b"0",
                                            b"a b",
                                        ][rng.below(7) as usize]
                                    };
                                    string(rng, out, text);
                                }
                            }
                            1 => {}
                            _ => reply(rng, 2, out),
                        }
                    }
                }
            }
        }
    }

    /// A string as Redis writes one (a bulk string), or now and then another value in its place.
    fn string(rng: &mut Rng, out: &mut Vec<u8>, text: &[u8]) {
        match rng.below(16) {
            0 => reply(rng, 2, out),
            1 => out.extend_from_slice(format!(":{}\r\n", rng.next() as i64 >> rng.below(64)).as_bytes()),
            2 => out.extend_from_slice(b"+OK\r\n"),
            3 => out.extend_from_slice(b"$2\r\n\xff\xfe\r\n"),
            4 => out.extend_from_slice(b"$-1\r\n"),
            _ => {
                out.extend_from_slice(format!("${}\r\n", text.len()).as_bytes());
                out.extend_from_slice(text);
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// What `parse_streams` must make of `bytes`: the crate's value, taken apart by
    /// `redis_io::read_streams`, or its first error.
    /// A stream reply read: its entries or its error's text, and its length.
    type Read = (Result<Streams, String>, usize);

    fn expected(bytes: &[u8]) -> Option<Read> {
        let (value, used) = parse(bytes).ok()??;
        Some((value.extract_error().map(redis_io::read_streams).map_err(|e| e.to_string()), used))
    }

    fn ours(bytes: &[u8]) -> Result<Option<Read>, &'static str> {
        Ok(parse_streams(bytes)?.map(|(got, used)| {
            let got = got.map_err(|e| match e {
                Value::ServerError(e) => RedisError::from(e).to_string(),
                other => format!("not an error: {other:?}"),
            });
            (got, used)
        }))
    }

    #[test]
    fn reads_stream_replies_into_the_entries_read_streams_makes_of_the_crates_value() {
        let mut rng = Rng(0x853c_49e6_748f_ea9b);
        let mut entries = 0;
        for _ in 0..30_000 {
            let mut bytes = Vec::new();
            stream_reply(&mut rng, &mut bytes);
            let want = expected(&bytes).expect("a valid reply");
            assert_eq!(ours(&bytes), Ok(Some(want.clone())), "{:?}", String::from_utf8_lossy(&bytes));
            entries += want.0.map_or(0, |s| s.len());
            let cut = rng.below(bytes.len() as u64) as usize;
            assert_eq!(ours(&bytes[..cut]), Ok(None), "{:?}", String::from_utf8_lossy(&bytes[..cut]));
            // Damaged: never a panic; what it reads whole, it reads as the crate does.
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
            if let Ok(Some(got)) = ours(&bytes) {
                assert_eq!(Some(got), expected(&bytes), "{:?}", String::from_utf8_lossy(&bytes));
            }
        }
        assert!(entries > 10_000, "too few entries compared ({entries})");
    }

    /// What `parse_jobs` must make of `bytes`: what `parse_streams` reads, each entry checked.
    #[allow(clippy::type_complexity)]
    fn jobs_expected(
        bytes: &[u8],
        names: &[Arc<str>],
    ) -> Result<Option<(Result<Jobs, Value>, usize)>, &'static str> {
        Ok(parse_streams(bytes)?.map(|(read, used)| (read.map(|entries| jobs_of(entries, names)), used)))
    }

    #[test]
    fn reads_jobs_as_it_reads_entries_each_checked() {
        let names: Vec<Arc<str>> = vec![Arc::from("{q}:jobs0"), Arc::from("{q}:jobs1")];
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut jobs, mut shared) = (0, 0);
        for _ in 0..30_000 {
            let mut bytes = Vec::new();
            stream_reply(&mut rng, &mut bytes);
            let got = parse_jobs(&bytes, &names);
            assert_eq!(got, jobs_expected(&bytes, &names), "{:?}", String::from_utf8_lossy(&bytes));
            if let Ok(Some((Ok(read), _))) = &got {
                jobs += read.iter().filter(|(_, job, _)| job.is_ok()).count();
                // A known stream's name is shared, not made again.
                shared +=
                    read.iter().filter(|(at, _, _)| names.iter().any(|n| Arc::ptr_eq(n, &at.stream))).count();
            }
            let cut = rng.below(bytes.len() as u64) as usize;
            assert_eq!(parse_jobs(&bytes[..cut], &names), Ok(None));
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] = b"\r\n$*:-+0123456789"[rng.below(17) as usize];
            assert_eq!(parse_jobs(&bytes, &names), jobs_expected(&bytes, &names));
        }
        assert!(jobs > 500 && shared > 10_000, "too few jobs compared ({jobs}, {shared} shared names)");
    }

    #[test]
    fn reads_a_job_entry_and_a_timed_out_read() {
        let bytes = b"*1\r\n*2\r\n$8\r\n{q}:jobs\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$1\r\nt\r\n$2\r\n42\r\n$1\r\nd\r\n$2\r\n{}\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n";
        let (Ok(got), used) = parse_streams(bytes).unwrap().unwrap() else { panic!("an error") };
        assert_eq!(used, bytes.len());
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].0.as_str(), got[0].1.id.as_str(), got[0].1.number("t")),
            ("{q}:jobs", "1-0", Some(42))
        );
        assert_eq!(got[0].1.bytes("d"), b"{}");
        assert!(!got[1].1.has_fields(), "a deleted entry has no fields");
        assert_eq!(parse_streams(b"*-1\r\n"), Ok(Some((Ok(Vec::new()), 5))), "a timed-out read has none");
        let Ok(Some((Err(Value::ServerError(e)), _))) = parse_streams(b"-NOGROUP No such key\r\n") else {
            panic!("not an error")
        };
        assert_eq!(RedisError::from(e).code(), Some("NOGROUP"));
    }

    /// A bulk string as Redis writes it.
    fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }

    #[test]
    fn reads_a_pack_as_its_jobs_in_their_places_and_what_is_no_pack_as_no_job() {
        use crate::durable::pack::Pack;
        let names: Vec<Arc<str>> = vec![Arc::from("{q}:jobs"), Arc::from("{q}:jobs!p")];
        let mut pack = Pack::new();
        pack.push("web-1", 7, 0, 1, b"", b"{}");
        // Task id 0: a job, not one to run (dead-lettered with its pack's others done).
        pack.push("web-1", 0, 0, 1, b"", b"{}");
        pack.push("web-1", 9, 3, 2, b"ctx", b"x");
        let whole = pack.bytes().to_vec();
        let mut cut = whole.clone();
        cut.extend_from_slice(b"5:");
        let mut bytes = b"*1\r\n*2\r\n".to_vec();
        bulk(&mut bytes, b"{q}:jobs!p");
        bytes.extend_from_slice(b"*6\r\n");
        let entry = |bytes: &mut Vec<u8>, id: &[u8], fields: &[&[u8]]| {
            bytes.extend_from_slice(b"*2\r\n");
            bulk(bytes, id);
            bytes.extend_from_slice(format!("*{}\r\n", fields.len()).as_bytes());
            for field in fields {
                bulk(bytes, field);
            }
        };
        entry(&mut bytes, b"1-1", &[b"n", b"3", b"p", &whole]);
        entry(&mut bytes, b"1-2", &[b"n", b"4", b"p", &cut]);
        entry(&mut bytes, b"1-3", &[b"n", b"0", b"p", b"1"]);
        entry(&mut bytes, b"1-4", &[b"n", b"1"]);
        bytes.extend_from_slice(b"*2\r\n");
        bulk(&mut bytes, b"1-5");
        bytes.extend_from_slice(b"*-1\r\n");
        entry(&mut bytes, b"1-6", &[b"p", b"x"]);
        let got = parse_jobs(&bytes, &names);
        assert_eq!(got, jobs_expected(&bytes, &names), "read as jobs_of reads the entries");
        let Ok(Some((Ok(got), used))) = got else { panic!("not read: {got:?}") };
        assert_eq!(used, bytes.len());
        // Each item as "ID WHAT PLACE".
        let shown: Vec<String> = got
            .iter()
            .map(|(at, job, place)| {
                let job = match job {
                    Ok(job) => format!("job {}", job.task_id),
                    Err(Rejected::Invalid { .. }) => "invalid".into(),
                    Err(Rejected::NotAJob(why)) => format!("no job: {why}"),
                };
                let place = place.map_or("alone".into(), |p| format!("{}/{}", p.index, p.count));
                format!("{} {job} {place}", at.id)
            })
            .collect();
        let want = [
            "1-1 job 7 1/3",
            "1-1 invalid 2/3",
            "1-1 job 9 3/3",
            "1-2 job 7 1/4",
            "1-2 invalid 2/4",
            "1-2 job 9 3/4",
            "1-2 no job: the rest of its pack is damaged: job 4 of the pack is damaged: cut short 4/4",
            "1-3 no job: a pack of no job alone",
            "1-4 no job: an entry of the stream of packs with no pack (field p) alone",
            "1-5 no job: deleted while it was pending alone",
            "1-6 no job: not a pack of this taskd's format (its first byte is not 1) alone",
        ];
        assert_eq!(shown, want);
        assert!(got.iter().all(|(at, _, _)| Arc::ptr_eq(&at.stream, &names[1])), "the stream's name shared");
        let Ok(job) = &got[5].1 else { panic!() };
        assert_eq!(
            (job.session, job.worker, &job.context[..], &job.data[..]),
            (3, 2, &b"ctx"[..], &b"x"[..])
        );
    }

    #[test]
    fn reads_empty_missing_huge_and_deleted_fields_of_several_streams() {
        let huge = vec![b'x'; 3 << 20];
        let mut bytes = b"*2\r\n*2\r\n".to_vec();
        bulk(&mut bytes, b"{q}:jobs#high");
        bytes.extend_from_slice(b"*3\r\n*2\r\n");
        bulk(&mut bytes, b"1-1");
        // An empty name and value, a value of 3 MB, and an odd name left without its value.
        bytes.extend_from_slice(b"*7\r\n");
        for field in [&b""[..], b"", b"t", b"7", b"d", &huge, b"o"] {
            bulk(&mut bytes, field);
        }
        // Deleted while pending: a nil in place of its fields.
        bytes.extend_from_slice(b"*2\r\n");
        bulk(&mut bytes, b"1-2");
        bytes.extend_from_slice(b"*-1\r\n*2\r\n");
        // Lengths written with leading zeros, and one past 18 digits: read as the crate reads them.
        bytes.extend_from_slice(b"$03\r\n1-3\r\n*2\r\n$0000000000000000001\r\nt\r\n$1\r\n9\r\n");
        bytes.extend_from_slice(b"*2\r\n");
        bulk(&mut bytes, b"{q}:jobs");
        bytes.extend_from_slice(b"*1\r\n*2\r\n");
        bulk(&mut bytes, b"2-1");
        bytes.extend_from_slice(b"*0\r\n");
        let want = expected(&bytes).expect("a valid reply");
        assert_eq!(ours(&bytes), Ok(Some(want)));
        let (Ok(got), used) = parse_streams(&bytes).unwrap().unwrap() else { panic!("an error") };
        assert_eq!(used, bytes.len());
        let keys: Vec<(&str, &str)> = got.iter().map(|(k, e)| (k.as_str(), e.id.as_str())).collect();
        assert_eq!(
            keys,
            [
                ("{q}:jobs#high", "1-1"),
                ("{q}:jobs#high", "1-2"),
                ("{q}:jobs#high", "1-3"),
                ("{q}:jobs", "2-1")
            ]
        );
        let first = &got[0].1;
        assert_eq!(first.get(""), Some(&b""[..]));
        assert_eq!(first.number("t"), Some(7));
        assert_eq!(first.bytes("d").len(), huge.len());
        assert_eq!(first.get("o"), None, "a name without its value is no field");
        assert!(!got[1].1.has_fields() && !got[3].1.has_fields());
        assert_eq!(got[2].1.number("t"), Some(9));
        // Every cut of it is not all there yet (the huge value too).
        for cut in [1, 40, 100, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(parse_streams(&bytes[..cut]), Ok(None), "cut at {cut}");
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
    fn passes_over_what_parse_reads_and_builds_only_an_error_reply() {
        let mut rng = Rng(0x6a09_e667_f3bc_c908);
        let mut errors = 0;
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            reply(&mut rng, 1, &mut bytes);
            if rng.below(4) == 0 {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = b"\r\n$*:-+0123456789"[rng.below(17) as usize];
            }
            let want = parse(&bytes)
                .map(|r| r.map(|(v, used)| (matches!(v, Value::ServerError(_)).then_some(v), used)));
            errors += usize::from(matches!(want, Ok(Some((Some(_), _)))));
            assert_eq!(parse_error(&bytes), want, "{:?}", String::from_utf8_lossy(&bytes));
        }
        assert!(errors > 500, "too few error replies compared ({errors})");
        assert_eq!(parse_error(b"+QUEUED\r\n"), Ok(Some((None, 9))));
        assert_eq!(parse_error(b"+QUEU"), Ok(None));
        let Ok(Some((Some(Value::ServerError(e)), 23))) = parse_error(b"-EXECABORT Discarded.\r\n+OK\r\n")
        else {
            panic!("not the error")
        };
        assert_eq!(RedisError::from(e).code(), Some("EXECABORT"));
    }

    #[test]
    fn an_error_reply_keeps_its_code() {
        let (v, _) = parse(b"-NOGROUP No such key\r\n").unwrap().unwrap();
        let Value::ServerError(e) = v else { panic!("{v:?}") };
        assert_eq!(RedisError::from(e).code(), Some("NOGROUP"));
    }
}
