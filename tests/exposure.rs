//! Every listener bounded and guarded, against the real binary: handshake timeouts, the
//! connection limits of the metrics and WebSocket ports, running out of descriptors, the
//! `Origin` of a WebSocket upgrade, and HTTP sent to the line port.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{wait_for, Daemon, DEADLINE};
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// Reads what the server sends until it closes the connection (or `DEADLINE` passes: panics).
fn read_until_closed(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return String::from_utf8_lossy(&out).into_owned()
            }
            Err(e) => {
                panic!("the server did not close the connection within {DEADLINE:?} ({e}); got {out:?}")
            }
        }
    }
}

/// Whether the server has closed `s` by now (what it sent before is discarded), without waiting.
fn closed_now(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

fn stats(daemon: &Daemon) -> Value {
    let mut c = daemon.connect();
    c.send("stats");
    let reply = c.recv();
    assert_eq!(reply["event"], "stats", "{reply}");
    reply
}

/// The first half of an upgrade request: no blank line, so never complete.
const HALF_UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n";

#[test]
fn a_half_sent_request_is_closed_after_handshake_timeout_on_the_metrics_and_websocket_ports() {
    let daemon =
        Daemon::start(&["--metrics-addr", "127.0.0.1:0", "--ws-port", "0", "--handshake-timeout", "0.5"]);
    let metrics = daemon.metrics_addr.expect("metrics address");
    let ws = daemon.ws_addr.expect("ws address");
    let mut half_scrape = TcpStream::connect(metrics).unwrap();
    half_scrape.write_all(b"GET /metr").unwrap();
    let mut half_upgrade = TcpStream::connect(ws).unwrap();
    half_upgrade.write_all(HALF_UPGRADE).unwrap();
    // Closed without an answer: the request never ended.
    assert_eq!(read_until_closed(&mut half_scrape), "");
    assert_eq!(read_until_closed(&mut half_upgrade), "");
    // Whole requests are answered as before.
    assert!(common::http_get(metrics, "/metrics").contains("taskd_connections"));
    let (mut socket, _) = tungstenite::connect(format!("ws://{ws}/")).expect("upgrade");
    socket.send(Message::text("stats")).unwrap();
    let reply = socket.read().unwrap();
    assert!(reply.to_text().unwrap().contains("\"event\":\"stats\""), "{reply}");
    // Each timeout is counted, per listener, in `stats` and in the scrape.
    let s = stats(&daemon);
    assert_eq!(
        (&s["metrics_handshake_timeouts"], &s["ws_handshake_timeouts"]),
        (&1.into(), &1.into()),
        "{s}"
    );
    let scrape = common::http_get(metrics, "/metrics");
    for listener in ["ws", "metrics"] {
        let line = format!("taskd_listener_handshake_timeouts_total{{listener=\"{listener}\"}} 1\n");
        assert!(scrape.contains(&line), "{line} in {scrape}");
    }
}

#[test]
fn half_open_connections_past_the_metrics_and_websocket_limits_are_refused_while_stats_answers() {
    let daemon = Daemon::start(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--ws-port",
        "0",
        "--metrics-max-conn",
        "4",
        "--ws-handshake-max",
        "4",
        // Long enough that none of the held ones times out during the test.
        "--handshake-timeout",
        "600",
    ]);
    let (metrics, ws) = (daemon.metrics_addr.unwrap(), daemon.ws_addr.unwrap());
    let mut held_client = daemon.connect();
    let mut scrapes: Vec<TcpStream> = Vec::new();
    let mut upgrades: Vec<TcpStream> = Vec::new();
    for _ in 0..24 {
        let mut s = TcpStream::connect(metrics).unwrap();
        s.write_all(b"GET /metr").unwrap();
        scrapes.push(s);
        let mut s = TcpStream::connect(ws).unwrap();
        s.write_all(HALF_UPGRADE).unwrap();
        upgrades.push(s);
    }
    // 4 of each are held; the other 20 are told 503 and closed at once.
    for (what, conns) in [("metrics", &mut scrapes), ("ws", &mut upgrades)] {
        let mut refused = 0;
        for s in conns.iter_mut() {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        wait_for(&format!("20 refused {what} connections"), || {
            conns.retain_mut(|s| {
                let mut buf = [0u8; 512];
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        let head = String::from_utf8_lossy(&buf[..n]);
                        assert!(head.starts_with("HTTP/1.1 503"), "{what}: {head}");
                        refused += 1;
                        false
                    }
                    _ => true,
                }
            });
            (refused == 20).then_some(())
        });
        assert_eq!(conns.len(), 4, "{what}: the 4 within the limit are held");
    }
    for s in scrapes.iter_mut().chain(upgrades.iter_mut()) {
        assert!(!closed_now(s), "a connection within the limit is held until its deadline");
    }
    // The line port is served all along: a held connection and a new one.
    held_client.send("stats");
    assert_eq!(held_client.recv()["event"], "stats");
    let s = stats(&daemon);
    // The 4 half-open WebSocket connections count toward max_conn (with the one held client).
    assert!(s["connection_num"].as_u64().unwrap() >= 5, "{s}");
    // Every refusal is counted, per listener.
    assert_eq!((&s["metrics_refused_full"], &s["ws_refused_full"]), (&20.into(), &20.into()), "{s}");
    assert_eq!(s["line_refused_full"], 0, "{s}");
    // Once the half-open ones go, a scrape and an upgrade get through again.
    drop(scrapes);
    drop(upgrades);
    wait_for("a scrape after the half-open ones left", || {
        let mut s = TcpStream::connect(metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        read_until_closed(&mut s).starts_with("HTTP/1.1 200").then_some(())
    });
    tungstenite::connect(format!("ws://{ws}/")).expect("upgrade after the half-open ones left");
    let scrape = common::http_get(metrics, "/metrics");
    let line = "taskd_listener_refused_total{listener=\"ws\",reason=\"full\"} 20\n";
    assert!(scrape.contains(line), "{line} in {scrape}");
}

/// Lowers the open-file limit of a running process (prlimit(2)).
fn set_nofile(pid: u32, limit: u64) {
    let rlim = nix::libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: prlimit reads `rlim` and writes nothing (old_limit is null).
    let rc = unsafe { nix::libc::prlimit(pid as i32, nix::libc::RLIMIT_NOFILE, &rlim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The open-file limit that leaves a process `free` more descriptors: new ones take the lowest
/// free numbers, and the limit bounds the number (inherited ones may sit high above).
fn limit_leaving(pid: u32, free: usize) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    (0..).filter(|n| !open.contains(n)).nth(free - 1).unwrap() + 1
}

#[test]
fn out_of_descriptors_new_connections_are_refused_at_once_and_the_held_ones_served() {
    let daemon = Daemon::start(&["--worker-num", "1", "--task-worker-num", "1"]);
    let mut held = daemon.connect();
    held.send("stats");
    assert_eq!(held.recv()["event"], "stats");
    // Room for a couple more descriptors, no more.
    set_nofile(daemon.pid, limit_leaving(daemon.pid, 3));
    let mut refused = 0;
    let mut accepted = Vec::new();
    for _ in 0..20 {
        let mut c = daemon.connect();
        c.send("stats");
        let reply = c.try_recv(DEADLINE).expect("an answer (stats or an error), never silence");
        match reply["event"].as_str() {
            Some("stats") => accepted.push(c),
            Some("error") => {
                let why = reply["error"].as_str().unwrap();
                assert!(why.contains("out of file descriptors"), "{why}");
                assert!(c.closed_by_server(), "refused and closed");
                refused += 1;
            }
            _ => panic!("{reply}"),
        }
    }
    assert!(refused > 0, "some connections were refused ({} accepted)", accepted.len());
    // The connections it holds are served all along.
    held.send("stats");
    assert_eq!(held.recv()["event"], "stats");
    held.submit("held@example.com");
    let log = daemon.wait_log("out of file descriptors");
    // Logged now and then, not once per refused connection.
    assert!(log.matches("out of file descriptors").count() < refused, "{log}");
    // Descriptors back: new connections are served again.
    drop(accepted);
    wait_for("a new connection served once descriptors are free", || {
        let mut c = daemon.connect();
        c.send("stats");
        (c.try_recv(DEADLINE)?["event"] == "stats").then_some(())
    });
    // Each connection refused for lack of descriptors is counted (the wait above may have
    // been refused too, before descriptors were back).
    let s = stats(&daemon);
    assert!(s["line_refused_no_fd"].as_u64().unwrap() >= refused as u64, "{refused} at least: {s}");
}

/// Opens a WebSocket with an `Origin` header (None: without one); the HTTP status.
fn upgrade_with_origin(addr: SocketAddr, origin: Option<&str>) -> u16 {
    let mut request = format!("ws://{addr}/").into_client_request().unwrap();
    if let Some(origin) = origin {
        request.headers_mut().insert("Origin", origin.parse().unwrap());
    }
    match tungstenite::connect(request) {
        Ok((mut socket, response)) => {
            // An upgraded page can use taskd: the check is the upgrade's.
            socket.send(Message::text("stats")).unwrap();
            assert!(socket.read().unwrap().to_text().unwrap().contains("\"stats\""));
            response.status().as_u16()
        }
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade with origin {origin:?}: {e}"),
    }
}

#[test]
fn a_websocket_upgrade_from_another_origin_gets_403_and_same_host_and_allowed_ones_go_through() {
    let daemon = Daemon::start(&["--ws-port", "0", "--ws-allow-origin", "https://app.example.com"]);
    let addr = daemon.ws_addr.unwrap();
    let port = addr.port();
    for (origin, status) in [
        (Some("http://evil.example".to_string()), 403),
        (Some(format!("http://evil.example:{port}")), 403),
        (Some(format!("http://127.0.0.1:{}", port.wrapping_add(1))), 403),
        (Some("null".to_string()), 403),
        (Some(format!("http://127.0.0.1:{port}")), 101),
        (Some(format!("http://localhost:{port}")), 101),
        (Some("https://app.example.com".to_string()), 101),
        (None, 101),
    ] {
        assert_eq!(upgrade_with_origin(addr, origin.as_deref()), status, "Origin {origin:?}");
    }
    let log = daemon.wait_log("refused a WebSocket upgrade");
    assert!(log.contains("\"http://evil.example\""), "the log names the origin: {log}");
    let s = stats(&daemon);
    assert_eq!((&s["ws_refused_origin"], &s["ws_refused_full"]), (&4.into(), &0.into()), "{s}");
}

#[test]
fn http_on_the_line_port_gets_one_error_and_a_close_and_no_job() {
    let daemon = Daemon::start(&["--simulate-ms", "10"]);
    let before = stats(&daemon);
    // What `fetch("http://127.0.0.1:PORT/", {method: "POST", mode: "no-cors", body})` sends.
    let body = "alice@example.com\n{\"type\":\"email\",\"to\":\"bob@example.com\"}\n";
    let requests = [
        format!(
            "POST / HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\
             Content-Type: text/plain;charset=UTF-8\r\nOrigin: http://evil.example\r\n\r\n{body}",
            daemon.addr,
            body.len()
        ),
        format!("GET /\r\n{body}"),
        format!("Host: {}\r\n{body}", daemon.addr),
    ];
    for request in &requests {
        let mut s = TcpStream::connect(daemon.addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let answer = read_until_closed(&mut s);
        let lines: Vec<&str> = answer.lines().collect();
        assert_eq!(lines.len(), 1, "one line, then closed: {answer:?}");
        let reply: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(reply["event"], "error");
        assert!(reply["error"].as_str().unwrap().contains("not HTTP"), "{reply}");
    }
    let after = stats(&daemon);
    assert_eq!(after["tasks_accepted"], 0, "{after}");
    assert_eq!(after["line_refused_http"], 3, "each HTTP request is counted: {after}");
    // Only the second `stats` was dispatched: no line of the HTTP requests reached a worker.
    assert_eq!(after["dispatch_count"].as_u64(), before["dispatch_count"].as_u64().map(|n| n + 1));
    let log = daemon.wait_log("Possible SECURITY ATTACK detected");
    // One warning per 10 s, however many: a page in a loop must not fill the disk.
    assert_eq!(log.matches("Possible SECURITY ATTACK").count(), 1, "{log}");
    // Requests after a line that only mentions HTTP are still requests.
    let mut c = daemon.connect();
    c.submit("sms +8613800138000 upgrade to HTTP/1.1");
}

/// The attack of the issue in a real browser: a page of another origin (another taskd's web
/// page) tries taskd's WebSocket port and POSTs job lines to its line port; the same page
/// served by taskd itself opens the WebSocket.
#[test]
fn a_page_of_another_origin_in_a_headless_browser_gets_nothing_from_taskd() {
    let Some(common::Browser { chromium, node, modules }) = common::browser() else { return };
    let target = Daemon::start(&["--ws-port", "0"]);
    let other = Daemon::start(&["--ws-port", "0"]);
    let (target_ws, other_ws) = (target.ws_addr.unwrap(), other.ws_addr.unwrap());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/cross_origin.cjs");
    let run = |page: std::net::SocketAddr| {
        // Generous: Chromium starts slowly on a loaded machine.
        let out = common::run_with_timeout(
            std::process::Command::new(&node)
                .arg(&script)
                .arg(format!("http://{page}/"))
                .arg(format!("ws://{target_ws}/"))
                .arg(format!("http://{}/", target.addr))
                .arg(&chromium)
                .env("NODE_PATH", &modules),
            Duration::from_secs(120),
        );
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{text}");
        text
    };
    let attack = run(other_ws);
    assert!(attack.contains("websocket: refused"), "{attack}");
    target.wait_log("refused a WebSocket upgrade");
    target.wait_log("Possible SECURITY ATTACK detected");
    // taskd's own page, same origin: the WebSocket opens (its fetch is refused alike).
    let own = run(target_ws);
    assert!(own.contains("websocket: open, got {\"event\":\"stats\""), "{own}");
    let s = stats(&target);
    assert_eq!(s["tasks_accepted"], 0, "no line of the POSTs became a job: {s}");
}
