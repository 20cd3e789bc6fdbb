//! WebSocket sessions, on `ws_port`: the same sessions, dispatch and replies as TCP, with
//! each text message carrying request lines and each reply line sent as one text message.
//! A plain `GET /` on the same port gets the built-in web page instead of an upgrade.
//!
//! The frames (masking, fragmentation, ping/pong, the close handshake, size limits) are
//! tungstenite's; this module only does the upgrade request, which it must see anyway to
//! tell a page request from an upgrade, and to check its `Origin`: any web page open in a
//! browser on this host could open a WebSocket to it otherwise (`ws_allow_origin`).

use std::io::{self, Read, Write};

use mio::net::TcpStream;
pub use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

/// The page served on `GET /`: static, no build step, no external assets.
pub const PAGE: &str = include_str!("../web/index.html");
/// The page's other files, served from the binary: no CDN, nothing fetched from elsewhere.
/// uPlot (MIT) draws the dashboard's charts; its licence is served beside it.
const ASSETS: &[(&str, &str, &str)] = &[
    ("/app.js", "text/javascript; charset=utf-8", include_str!("../web/app.js")),
    ("/dashboard.js", "text/javascript; charset=utf-8", include_str!("../web/dashboard.js")),
    ("/style.css", "text/css; charset=utf-8", include_str!("../web/style.css")),
    ("/uPlot.iife.min.js", "text/javascript; charset=utf-8", include_str!("../web/vendor/uPlot.iife.min.js")),
    ("/uPlot.min.css", "text/css; charset=utf-8", include_str!("../web/vendor/uPlot.min.css")),
    ("/uPlot.LICENSE", "text/plain; charset=utf-8", include_str!("../web/vendor/uPlot.LICENSE")),
];
/// Only the page's own scripts and styles run, its only connection is its WebSocket, and no
/// other page may frame it: a text from a job that got into the page as markup could still
/// run nothing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// An upgrade request larger than this is refused.
const MAX_REQUEST: usize = 8 * 1024;

pub enum WsState {
    /// Reading the HTTP request.
    Handshake(Vec<u8>),
    Open(Box<Socket>),
}

/// An upgraded connection: tungstenite's state, and what of the connection's bytes it holds,
/// which the master counts in its budgets (`partial_lines_max`, `output_total_max`):
/// tungstenite keeps a message being received whole, up to `package_max_length`, and the
/// reply frames the socket has not taken.
pub struct Socket {
    ctx: WebSocketContext,
    /// The client's frames as they arrive: how much of a message is still incomplete.
    frames: Frames,
    /// Bytes of frames handed to tungstenite to write and not written to the socket yet.
    out_held: usize,
}

impl Socket {
    /// Bytes received of a message not complete yet (its frames so far, and a partial frame).
    pub fn input_held(&self) -> usize {
        self.frames.held
    }

    /// Bytes of replies (and pongs) not written to the socket yet.
    pub fn output_held(&self) -> usize {
        self.out_held
    }
}

/// Follows the frame headers of the client's byte stream (RFC 6455 §5.2) to know how many
/// bytes since the end of the last whole message tungstenite holds. Only lengths are read;
/// tungstenite checks everything else and closes the connection on a bad frame.
#[derive(Default)]
struct Frames {
    header: [u8; 14],
    /// Bytes of the current frame's header read so far (0 while in a payload).
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// The current frame's FIN bit and whether it is a control frame.
    fin: bool,
    control: bool,
    /// A fragmented data message is under way (control frames may come between its frames).
    in_message: bool,
    /// Bytes since the end of the last complete message.
    held: usize,
}

impl Frames {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len() as u64) as usize;
                self.payload_left -= n as u64;
                self.held += n;
                data = &data[n..];
                if self.payload_left == 0 {
                    self.frame_end();
                }
                continue;
            }
            // A header byte (at most 14, one at a time).
            self.header[self.have] = data[0];
            self.have += 1;
            self.held += 1;
            data = &data[1..];
            if self.have < 2 {
                continue;
            }
            let (b0, b1) = (self.header[0], self.header[1]);
            let ext = match b1 & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
            if self.have < 2 + ext + mask {
                continue;
            }
            let h = &self.header;
            self.payload_left = match ext {
                2 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                8 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                _ => u64::from(b1 & 0x7f),
            };
            self.fin = b0 & 0x80 != 0;
            self.control = b0 & 0x08 != 0;
            self.have = 0;
            if self.payload_left == 0 {
                self.frame_end();
            }
        }
    }

    fn frame_end(&mut self) {
        if self.control {
            // A ping, pong or close: whole in itself, but it may sit inside a fragmented message.
            if !self.in_message {
                self.held = 0;
            }
        } else if self.fin {
            self.in_message = false;
            self.held = 0;
        } else {
            self.in_message = true;
        }
    }
}

/// The connection's socket as tungstenite sees it: what is read goes through `Frames`, and
/// what is written is counted.
struct Counted<'a> {
    stream: &'a mut TcpStream,
    frames: &'a mut Frames,
    written: usize,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.frames.feed(&buf[..n]);
        Ok(n)
    }
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.stream.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// The size of a server (unmasked) frame with `payload` bytes.
fn frame_len(payload: usize) -> usize {
    payload
        + match payload {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        }
}

impl Socket {
    /// Runs `op` on tungstenite with the counting stream, and takes what it wrote off `out_held`.
    fn with<T>(
        &mut self,
        stream: &mut TcpStream,
        op: impl FnOnce(&mut WebSocketContext, &mut Counted<'_>) -> T,
    ) -> T {
        let mut io = Counted { stream, frames: &mut self.frames, written: 0 };
        let result = op(&mut self.ctx, &mut io);
        self.out_held = self.out_held.saturating_sub(io.written);
        result
    }
}

/// What the HTTP request on the WebSocket port asked for.
pub enum Opening {
    /// Not all of it has arrived.
    Partial,
    /// A WebSocket upgrade: the 101 response to write, and the bytes read past the request.
    Upgrade { response: Vec<u8>, rest: Vec<u8> },
    /// Anything else: an HTTP response to write before closing.
    Http(Vec<u8>),
}

/// What came in on an open WebSocket.
pub enum Incoming {
    /// Request lines of one text message.
    Lines(Vec<Vec<u8>>),
    Binary,
    /// Nothing more for now.
    Idle,
    /// The peer closed (a close frame, or the TCP connection).
    Closed,
    /// A protocol violation; the close frame with its code is queued.
    Broken(String),
}

/// Reads the upgrade request from a new connection; an upgrade from a page whose origin
/// `origins` does not allow is refused with 403.
pub fn read_opening(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    origins: &crate::net::OriginPolicy,
    refusals: &mut super::listeners::Throttle,
    refused: &mut u64,
) -> io::Result<Opening> {
    let mut chunk = [0u8; 2048];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if buf.len() > MAX_REQUEST {
            return Ok(Opening::Http(http(
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(Opening::Partial),
        Ok(httparse::Status::Complete(n)) => n,
        Err(_) => return Ok(Opening::Http(http("400 Bad Request", "text/plain", "bad request\n"))),
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value))
    };
    let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if req.method != Some("GET") {
        return Ok(Opening::Http(http("405 Method Not Allowed", "text/plain", "GET only\n")));
    }
    if !upgrade {
        return Ok(Opening::Http(match req.path.map(|p| p.split('?').next().unwrap_or(p)) {
            Some("/") | Some("/index.html") => page("text/html; charset=utf-8", PAGE),
            Some(path) => match ASSETS.iter().find(|(p, _, _)| *p == path) {
                Some((_, content_type, body)) => page(content_type, body),
                None => http("404 Not Found", "text/plain", "not found: the page is at /\n"),
            },
            None => http("404 Not Found", "text/plain", "not found: the page is at /\n"),
        }));
    }
    let origin = header("origin");
    let local = stream.local_addr()?;
    if !origins.allows(origin.as_deref(), local) {
        *refused += 1;
        if let Some(n) = refusals.log() {
            let origin: String = origin.unwrap_or_default().chars().take(200).collect();
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            tracing::warn!(
                "refused a WebSocket upgrade from {peer}: a page of origin {origin:?} may not use taskd \
                 (same host only; see ws_allow_origin){}",
                super::listeners::unlogged(n)
            );
        }
        return Ok(Opening::Http(http(
            "403 Forbidden",
            "text/plain",
            "this page's origin may not open a WebSocket to taskd (see ws_allow_origin)\n",
        )));
    }
    let (Some(key), Some("13")) = (header("sec-websocket-key"), header("sec-websocket-version").as_deref())
    else {
        return Ok(Opening::Http(http(
            "400 Bad Request",
            "text/plain",
            "a WebSocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13\n",
        )));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes();
    Ok(Opening::Upgrade { response, rest: buf[used..].to_vec() })
}

/// A server-side WebSocket after the upgrade, with taskd's limits.
pub fn open(rest: Vec<u8>, max_message: usize, max_output: usize) -> Socket {
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(max_output.max(64 * 1024))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let mut frames = Frames::default();
    frames.feed(&rest);
    let ctx = WebSocketContext::from_partially_read(rest, Role::Server, Some(config));
    Socket { ctx, frames, out_held: 0 }
}

/// Reads the next message; protocol errors queue the close frame RFC 6455 asks for.
pub fn read(ws: &mut Socket, stream: &mut TcpStream) -> Incoming {
    match ws.with(stream, |ctx, io| ctx.read(io)) {
        Ok(Message::Text(text)) => {
            let text = text.as_str();
            let body = text.strip_suffix('\n').unwrap_or(text);
            let lines =
                body.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l).as_bytes().to_vec()).collect();
            Incoming::Lines(lines)
        }
        Ok(Message::Binary(_)) => Incoming::Binary,
        // Pings are answered by tungstenite (the pong is flushed with the next write).
        Ok(Message::Ping(payload)) => {
            ws.out_held += frame_len(payload.len());
            read(ws, stream)
        }
        Ok(Message::Pong(_) | Message::Frame(_)) => read(ws, stream),
        Ok(Message::Close(_)) => Incoming::Closed,
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Incoming::Idle,
        Err(Error::ConnectionClosed | Error::AlreadyClosed) => Incoming::Closed,
        Err(Error::Io(_)) => Incoming::Closed,
        Err(Error::Capacity(e)) => close(ws, stream, CloseCode::Size, format!("message too big: {e}")),
        Err(Error::Utf8(e)) => {
            close(ws, stream, CloseCode::Invalid, format!("text message is not valid UTF-8: {e}"))
        }
        Err(e) => close(ws, stream, CloseCode::Protocol, format!("protocol error: {e}")),
    }
}

fn close(ws: &mut Socket, stream: &mut TcpStream, code: CloseCode, why: String) -> Incoming {
    let reason: String = why.chars().take(100).collect();
    ws.out_held += frame_len(2 + reason.len());
    ws.with(stream, |ctx, io| {
        let _ = ctx.close(io, Some(CloseFrame { code, reason: reason.into() }));
        let _ = ctx.flush(io);
    });
    Incoming::Broken(why)
}

/// Sends `line` (an error) and closes with `code`: the connection is refused mid-stream.
pub fn refuse(ws: &mut Socket, stream: &mut TcpStream, line: &[u8], code: CloseCode) {
    let _ = send(ws, stream, line);
    let why = String::from_utf8_lossy(line).into_owned();
    close(ws, stream, code, why);
}

/// Queues reply lines, one text message each. `Err` when the client does not read.
pub fn send(ws: &mut Socket, stream: &mut TcpStream, data: &[u8]) -> Result<(), String> {
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    for line in body.split(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line).into_owned();
        ws.out_held += frame_len(text.len());
        match ws.with(stream, |ctx, io| ctx.write(io, Message::text(text))) {
            Ok(()) => {}
            // Buffered; written when the socket takes it.
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(Error::WriteBufferFull(_)) => return Err("its output buffer is full".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Writes what is buffered. `Ok(true)`: all of it.
pub fn flush(ws: &mut Socket, stream: &mut TcpStream) -> Result<bool, String> {
    match ws.with(stream, |ctx, io| ctx.flush(io)) {
        Ok(()) => {
            // All written: nothing is held, whatever the count says (it is exact again).
            ws.out_held = 0;
            Ok(true)
        }
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(Error::ConnectionClosed) => Ok(true),
        Err(e) => Err(e.to_string()),
    }
}

/// What a WebSocket connection past `ws_handshake_max`, or one accepted while out of
/// descriptors, is told before it is closed.
pub fn unavailable() -> Vec<u8> {
    http("503 Service Unavailable", "text/plain", "too many connections; try again\n")
}

/// A file of the page, with the Content-Security-Policy.
fn page(content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nContent-Security-Policy: {CSP}\r\n\
         X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn http(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client (masked) frame: FIN bit, opcode, payload.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_count_what_is_held_of_an_unfinished_message() {
        let mut frames = Frames::default();
        let whole = frame(true, 1, b"stats");
        // Byte by byte: held grows, and drops to 0 once the message is whole.
        for (i, &b) in whole.iter().enumerate() {
            frames.feed(&[b]);
            let expect = if i + 1 == whole.len() { 0 } else { i + 1 };
            assert_eq!(frames.held, expect, "after {} bytes", i + 1);
        }
        // A large frame, half sent: all of it is held.
        let big = frame(true, 1, &vec![b'x'; 200_000]);
        frames.feed(&big[..100_000]);
        assert_eq!(frames.held, 100_000);
        frames.feed(&big[100_000..]);
        assert_eq!(frames.held, 0);
        // A fragmented message with a ping between its frames: held until its last frame.
        let (first, ping, last) = (frame(false, 1, &[b'a'; 300]), frame(true, 9, b"p"), frame(true, 0, b"b"));
        frames.feed(&first);
        frames.feed(&ping);
        assert_eq!(frames.held, first.len() + ping.len());
        let mut tail = last.clone();
        tail.extend_from_slice(&frame(true, 1, b"next")[..3]);
        frames.feed(&tail);
        assert_eq!(frames.held, 3, "only the start of the next message");
    }
}
