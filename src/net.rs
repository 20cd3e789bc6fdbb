//! The listening socket, bound with the options a server needs (address reuse, backlog).

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

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
