//! The Prometheus endpoint: `GET /metrics` on `metrics_addr`, served by the master's reactor
//! (one short HTTP/1.1 exchange per connection, then close). The exchange must be over within
//! `handshake_timeout`, and at most `metrics_max_conn` are held at once (see `listeners`).

use std::io::{self, Read, Write};

use mio::net::TcpStream;

/// A scrape request larger than this is not a scrape.
const MAX_REQUEST: usize = 8 * 1024;

pub struct MetricsConn {
    pub stream: TcpStream,
    /// Which connection this is, for its deadline (slab keys are reused).
    pub serial: u64,
    request: Vec<u8>,
    response: Vec<u8>,
    written: usize,
}

/// What to do with a metrics connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait for more of the request, or for the socket to take the rest of the response.
    Wait,
    /// Done (or broken): close it.
    Close,
}

impl MetricsConn {
    pub fn new(stream: TcpStream, serial: u64) -> Self {
        MetricsConn { stream, serial, request: Vec::new(), response: Vec::new(), written: 0 }
    }

    /// Reads what arrived; `body` renders the metrics once a whole request is in.
    pub fn on_event(&mut self, body: impl FnOnce() -> String) -> Next {
        if self.response.is_empty() {
            let mut buf = [0u8; 2048];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return Next::Close,
                    Ok(n) => self.request.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Next::Close,
                }
                if self.request.len() > MAX_REQUEST {
                    self.response =
                        response("431 Request Header Fields Too Large", "text/plain", "request too large\n");
                    break;
                }
            }
            if self.response.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                self.response = match req.parse(&self.request) {
                    Ok(httparse::Status::Partial) => return Next::Wait,
                    Err(_) => response("400 Bad Request", "text/plain", "bad request\n"),
                    Ok(httparse::Status::Complete(_)) => match (req.method, req.path) {
                        (Some("GET"), Some("/metrics")) => {
                            response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &body())
                        }
                        (Some("GET"), _) => response("404 Not Found", "text/plain", "try /metrics\n"),
                        _ => response("405 Method Not Allowed", "text/plain", "GET /metrics\n"),
                    },
                };
            }
        }
        while self.written < self.response.len() {
            match self.stream.write(&self.response[self.written..]) {
                Ok(0) => return Next::Close,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        Next::Close
    }
}

/// What a connection past `metrics_max_conn`, or one accepted while out of descriptors, is
/// told before it is closed.
pub fn unavailable() -> Vec<u8> {
    response(
        "503 Service Unavailable",
        "text/plain",
        "too many connections to the metrics endpoint; try again\n",
    )
}

pub fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
