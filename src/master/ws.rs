//! WebSocket sessions, on `ws_port`: the same sessions, dispatch and replies as TCP, with
//! each text message carrying request lines and each reply line sent as one text message.
//! A plain `GET /` on the same port gets the built-in web page instead of an upgrade.
//!
//! The frames (masking, fragmentation, ping/pong, the close handshake, size limits) are
//! tungstenite's; this module only does the upgrade request, which it must see anyway to
//! tell a page request from an upgrade, and to check its `Origin`: any web page open in a
//! browser on this host could open a WebSocket to it otherwise (`ws_allow_origin`).

use std::io::{self, Read};

use mio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

/// The page served on `GET /`: static, no build step, no external assets.
pub const PAGE: &str = include_str!("../web/index.html");
/// An upgrade request larger than this is refused.
const MAX_REQUEST: usize = 8 * 1024;

pub enum WsState {
    /// Reading the HTTP request.
    Handshake(Vec<u8>),
    Open(Box<WebSocketContext>),
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
        return Ok(Opening::Http(match req.path {
            Some("/") | Some("/index.html") => http("200 OK", "text/html; charset=utf-8", PAGE),
            _ => http("404 Not Found", "text/plain", "not found: the page is at /\n"),
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
pub fn open(rest: Vec<u8>, max_message: usize, max_output: usize) -> WebSocketContext {
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(max_output.max(64 * 1024))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    WebSocketContext::from_partially_read(rest, Role::Server, Some(config))
}

/// Reads the next message; protocol errors queue the close frame RFC 6455 asks for.
pub fn read(ws: &mut WebSocketContext, stream: &mut TcpStream) -> Incoming {
    match ws.read(stream) {
        Ok(Message::Text(text)) => {
            let text = text.as_str();
            let body = text.strip_suffix('\n').unwrap_or(text);
            let lines =
                body.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l).as_bytes().to_vec()).collect();
            Incoming::Lines(lines)
        }
        Ok(Message::Binary(_)) => Incoming::Binary,
        // Pings are answered by tungstenite (the pong is flushed with the next write).
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => read(ws, stream),
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

fn close(ws: &mut WebSocketContext, stream: &mut TcpStream, code: CloseCode, why: String) -> Incoming {
    let reason: String = why.chars().take(100).collect();
    let _ = ws.close(stream, Some(CloseFrame { code, reason: reason.into() }));
    let _ = ws.flush(stream);
    Incoming::Broken(why)
}

/// Queues reply lines, one text message each. `Err` when the client does not read.
pub fn send(ws: &mut WebSocketContext, stream: &mut TcpStream, data: &[u8]) -> Result<(), String> {
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    for line in body.split(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line).into_owned();
        match ws.write(stream, Message::text(text)) {
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
pub fn flush(ws: &mut WebSocketContext, stream: &mut TcpStream) -> Result<bool, String> {
    match ws.flush(stream) {
        Ok(()) => Ok(true),
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

fn http(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
