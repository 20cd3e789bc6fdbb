//! The listening socket, bound with the options a server needs (address reuse, backlog), and
//! which web pages may reach one from a browser (the `Origin` of a WebSocket upgrade).

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn,
    SockaddrIn6,
};

/// Why the listening socket could not be made.
#[derive(Debug)]
pub enum BindError {
    Resolve { host: String, source: io::Error },
    InUse(SocketAddr),
    Other { addr: SocketAddr, source: io::Error },
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindError::Resolve { host, source } => write!(f, "invalid host {host:?}: {source}"),
            BindError::InUse(addr) => {
                write!(f, "cannot listen on {addr}: address already in use (see --port)")
            }
            BindError::Other { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
        }
    }
}

impl std::error::Error for BindError {}

pub fn bind_listener(host: &str, port: u16, backlog: i32) -> Result<TcpListener, BindError> {
    let addr = (host, port)
        .to_socket_addrs()
        .and_then(|mut it| it.next().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
        .map_err(|source| BindError::Resolve { host: host.to_string(), source })?;
    let other = |e: nix::Error| {
        if e == nix::errno::Errno::EADDRINUSE {
            BindError::InUse(addr)
        } else {
            BindError::Other { addr, source: e.into() }
        }
    };
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(other)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(other)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    match addr {
        SocketAddr::V4(v4) => bind(raw, &SockaddrIn::from(v4)),
        SocketAddr::V6(v6) => bind(raw, &SockaddrIn6::from(v6)),
    }
    .map_err(other)?;
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(other)?;
    Ok(TcpListener::from(fd))
}

/// A web origin, `scheme://host[:port]`, as a browser sends it in `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    /// Lower case; an IPv6 address keeps its brackets (`[::1]`), as in a URL.
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// Parses `http://host[:port]` or `https://…` (a trailing `/` is forgiven). None for
    /// anything else: `null` (a sandboxed or `file:` page), a path, user info.
    pub fn parse(text: &str) -> Option<Origin> {
        let text = text.trim().to_ascii_lowercase();
        let (scheme, rest) = text.split_once("://")?;
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (addr, after) = v6.split_once(']')?;
                addr.parse::<std::net::Ipv6Addr>().ok()?;
                (format!("[{addr}]"), after)
            }
            None => match rest.find(':') {
                Some(i) => (rest[..i].to_string(), &rest[i..]),
                None => (rest.to_string(), ""),
            },
        };
        let port = match port {
            "" => default_port,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        let host_ok = !host.is_empty()
            && (host.starts_with('[')
                || host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'));
        host_ok.then(|| Origin { scheme: scheme.to_string(), host, port })
    }
}

/// Which pages may open a WebSocket: those of this host (same port) and an allow-list.
///
/// "This host" is judged from the address the client connected to and the configured
/// `host`, never from the request's `Host` header: a page of `http://evil.example:PORT`
/// that rebinds its name to 127.0.0.1 (DNS rebinding) sends its own name in both.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// `*` in the allow-list: every origin.
    any: bool,
    allowed: Vec<Origin>,
    /// Host names of this host besides the address connected to: loopback and `host`.
    names: Vec<String>,
}

impl OriginPolicy {
    /// `host` is the configured listening host; `allow` the `ws_allow_origin` list (validated).
    pub fn new(host: &str, allow: &[String]) -> OriginPolicy {
        let mut names: Vec<String> =
            ["localhost", "127.0.0.1", "[::1]"].iter().map(|s| s.to_string()).collect();
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        match host.parse::<IpAddr>() {
            // 0.0.0.0 / :: name no host: the address connected to stands for it.
            Ok(ip) if ip.is_unspecified() => {}
            Ok(ip) => names.push(url_host(ip)),
            Err(_) if !host.is_empty() => names.push(host),
            Err(_) => {}
        }
        OriginPolicy {
            any: allow.iter().any(|o| o.trim() == "*"),
            allowed: allow.iter().filter_map(|o| Origin::parse(o)).collect(),
            names,
        }
    }

    /// Whether a WebSocket upgrade with this `Origin` header (None: no header), arriving on
    /// the local address `local`, may go ahead.
    ///
    /// No `Origin` at all is a program, not a page: browsers send one with every WebSocket
    /// upgrade, and a program can send any header it likes anyway.
    pub fn allows(&self, origin: Option<&str>, local: SocketAddr) -> bool {
        let Some(origin) = origin else { return true };
        if self.any {
            return true;
        }
        let Some(origin) = Origin::parse(origin) else { return false };
        if self.allowed.contains(&origin) {
            return true;
        }
        if origin.port != local.port() {
            return false;
        }
        let local_ip = match local.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            ip => ip,
        };
        origin.host == url_host(local_ip) || self.names.contains(&origin.host)
    }
}

/// An address as the host part of a URL (IPv6 in brackets).
fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Polling before sleeping (`busy_poll_us`): on this kind of machine a process that sleeps is
/// woken 20–70 µs after its peer writes (a virtual CPU that halted must be woken by the host),
/// one that is still running at once; and a job is several such hops.
pub struct Spinner {
    spin: std::time::Duration,
}

impl Spinner {
    pub fn new(spin: std::time::Duration) -> Spinner {
        Spinner { spin }
    }

    /// Waits for events as `Poll::poll` does; with `busy` (the last turn did something), first
    /// asks again and again without sleeping for up to `busy_poll_us`, yielding the CPU to any
    /// other process that wants it. Returns with no events once that (or `timeout`) is over
    /// without any.
    pub fn poll(
        &mut self,
        poll: &mut mio::Poll,
        events: &mut mio::Events,
        timeout: Option<std::time::Duration>,
        busy: bool,
    ) -> io::Result<()> {
        use std::time::{Duration, Instant};
        if !busy || self.spin.is_zero() {
            return poll.poll(events, timeout);
        }
        let start = Instant::now();
        let until = start + timeout.map_or(self.spin, |t| t.min(self.spin));
        loop {
            poll.poll(events, Some(Duration::ZERO))?;
            if !events.is_empty() {
                return Ok(());
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::yield_now();
        }
        let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
        poll.poll(events, left)
    }
}

/// Whether the events of a process that watches only its channel say that input came, and
/// neither the peer's close nor an error: a short read then drains it (`Channel::fill_after`).
pub fn woken_by_input(events: &mio::Events) -> bool {
    !events.is_empty() && events.iter().all(|e| e.is_readable() && !e.is_read_closed() && !e.is_error())
}

/// Whether `input` (a channel's unread bytes) holds at most one whole frame: a turn of light
/// load, after which a worker or task process polls a while before it sleeps. After a batch it
/// does not: the next batch is not due at once, and polling would only take CPU time from the
/// processes that make it.
pub fn light_turn(input: &[u8]) -> bool {
    use crate::ipc::envelope::frame_len;
    match frame_len(input) {
        Ok(Some(first)) => !matches!(frame_len(&input[first..]), Ok(Some(_))),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_light_with_at_most_one_whole_frame_read() {
        use crate::ipc::ToWorker;
        let mut two = Vec::new();
        ToWorker::Close { seq: 1, session: 7 }.encode(&mut two);
        let one = two.clone();
        ToWorker::Close { seq: 2, session: 7 }.encode(&mut two);
        assert!(light_turn(&[]));
        assert!(light_turn(&one));
        assert!(light_turn(&two[..two.len() - 1]), "the second frame is not whole yet");
        assert!(!light_turn(&two));
    }

    #[test]
    fn origins_parse_as_browsers_send_them() {
        let o = Origin::parse("HTTP://LocalHost:9502").unwrap();
        assert_eq!((o.scheme.as_str(), o.host.as_str(), o.port), ("http", "localhost", 9502));
        assert_eq!(Origin::parse("https://app.example.com/").unwrap().port, 443);
        assert_eq!(Origin::parse("http://[::1]:8080").unwrap().host, "[::1]");
        for bad in [
            "null",
            "",
            "file://",
            "ftp://x",
            "http://",
            "http://a/b",
            "http://u@h",
            "http://h:x",
            "http://[zz]",
        ] {
            assert_eq!(Origin::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_same_host_on_the_same_port_is_allowed_and_others_are_not() {
        let local: SocketAddr = "127.0.0.1:9502".parse().unwrap();
        let policy = OriginPolicy::new("127.0.0.1", &[]);
        assert!(policy.allows(None, local), "no Origin: not a browser");
        for ok in ["http://127.0.0.1:9502", "http://localhost:9502", "http://[::1]:9502"] {
            assert!(policy.allows(Some(ok), local), "{ok}");
        }
        for bad in [
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://evil.example:9502",
            "null",
            "http://127.0.0.1.evil.example:9502",
        ] {
            assert!(!policy.allows(Some(bad), local), "{bad}");
        }
        // Listening on every address: the address the client reached is this host.
        let wide = OriginPolicy::new("0.0.0.0", &[]);
        let lan: SocketAddr = "192.168.1.5:9502".parse().unwrap();
        assert!(wide.allows(Some("http://192.168.1.5:9502"), lan));
        assert!(!wide.allows(Some("http://192.168.1.6:9502"), lan));
        let named = OriginPolicy::new("box.lan", &[]);
        assert!(named.allows(Some("http://box.lan:9502"), lan));
    }

    #[test]
    fn the_allow_list_adds_origins_and_star_allows_all() {
        let local: SocketAddr = "127.0.0.1:9502".parse().unwrap();
        let policy = OriginPolicy::new("127.0.0.1", &["https://app.example.com".into()]);
        assert!(policy.allows(Some("https://app.example.com"), local));
        assert!(policy.allows(Some("https://APP.example.com:443"), local));
        assert!(!policy.allows(Some("http://app.example.com"), local), "the scheme counts");
        assert!(!policy.allows(Some("https://evil.example.com"), local));
        let any = OriginPolicy::new("127.0.0.1", &["*".into()]);
        assert!(any.allows(Some("null"), local));
    }
}
