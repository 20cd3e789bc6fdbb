//! The WebSocket front end and the web page, against the real binary.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Daemon;
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn ws_connect(addr: SocketAddr) -> Ws {
    // The read timeout is set before the handshake, which reads too.
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let (ws, response) = tungstenite::client(format!("ws://{addr}/"), MaybeTlsStream::Plain(stream))
        .expect("WebSocket handshake");
    assert_eq!(response.status(), 101);
    ws
}

/// The next text message as JSON (pongs and other control frames are skipped).
fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("a message from taskd") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Close(frame) => panic!("closed by taskd: {frame:?}"),
            _ => {}
        }
    }
}

fn start(extra: &[&str]) -> (Daemon, SocketAddr) {
    let mut args = vec!["--ws-port", "0"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&args);
    let addr = daemon.ws_addr.expect("a `taskd websocket on` line");
    (daemon, addr)
}

#[test]
fn email_and_sms_over_websocket_get_accepted_then_done_and_tcp_still_works() {
    let (daemon, addr) = start(&["--simulate-ms", "100"]);
    let mut ws = ws_connect(addr);
    ws.send(Message::text(r#"{"type":"email","to":"ws@example.com","subject":"hi"}"#)).unwrap();
    let accepted = recv(&mut ws);
    assert_eq!(accepted["event"], "accepted");
    let done = recv(&mut ws);
    assert_eq!((done["event"].as_str(), &done["task_id"]), (Some("done"), &accepted["task_id"]));
    assert_eq!(done["result"], "Email:ws@example.com, sent");
    // A message of several lines is several requests.
    ws.send(Message::text("sms +8613800138000 hello\nbob@example.com\n")).unwrap();
    let replies: Vec<Value> = (0..4).map(|_| recv(&mut ws)).collect();
    assert_eq!(replies.iter().filter(|r| r["event"] == "accepted").count(), 2);
    assert_eq!(replies.iter().filter(|r| r["event"] == "done").count(), 2);
    // TCP clients share the daemon.
    let mut tcp = daemon.connect();
    let a = tcp.submit("tcp@example.com");
    assert_eq!(tcp.final_reply(&a["task_id"], &mut Vec::new())["event"], "done");
    ws.send(Message::text("stats")).unwrap();
    assert_eq!(recv(&mut ws)["connection_num"], 2);
}

#[test]
fn ping_is_answered_with_pong() {
    let (_daemon, addr) = start(&[]);
    let mut ws = ws_connect(addr);
    ws.send(Message::Ping(b"are you there".to_vec().into())).unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[test]
fn binary_messages_get_an_error_and_the_session_keeps_working() {
    let (_daemon, addr) = start(&["--simulate-ms", "0"]);
    let mut ws = ws_connect(addr);
    ws.send(Message::Binary(vec![1, 2, 3].into())).unwrap();
    let error = recv(&mut ws);
    assert_eq!(error["event"], "error");
    assert!(error["error"].as_str().unwrap().contains("binary"), "{error}");
    ws.send(Message::text("after@example.com")).unwrap();
    assert_eq!(recv(&mut ws)["event"], "accepted");
}

#[test]
fn a_message_over_package_max_length_is_closed_with_1009() {
    let (daemon, addr) = start(&["--package-max-length", "1024"]);
    let mut ws = ws_connect(addr);
    ws.send(Message::text("x".repeat(4000))).unwrap();
    let code = loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => break frame.code,
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, CloseCode::Size);
    // The daemon keeps serving WebSocket clients.
    let mut other = ws_connect(addr);
    other.send(Message::text("stats")).unwrap();
    assert_eq!(recv(&mut other)["event"], "stats");
    drop(daemon);
}

/// Opens a WebSocket by hand, to send frames no well-behaved client library would.
fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(common::DEADLINE)).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: taskd\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "the RFC 6455 sample key's answer: {head}");
    s
}

/// Reads frames until a close frame; returns its status code.
fn close_code(s: &mut TcpStream) -> u16 {
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).unwrap();
        let len = (h[1] & 0x7f) as usize;
        assert!(len < 126, "short frames only here");
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        if h[0] & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[test]
fn invalid_utf8_closes_with_1007_and_unmasked_frames_with_1002() {
    let (_daemon, addr) = start(&[]);
    let mut s = raw_ws(addr);
    let mask = [1u8, 2, 3, 4];
    let payload = [0xffu8, 0xfe, 0xfd];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).unwrap();
    assert_eq!(close_code(&mut s), 1007);

    let mut s = raw_ws(addr);
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(close_code(&mut s), 1002);
}

#[test]
fn a_reply_for_a_closed_websocket_session_goes_nowhere() {
    let (daemon, addr) = start(&["--simulate-ms", "400", "--worker-num", "1"]);
    let mut gone = ws_connect(addr);
    gone.send(Message::text("gone@example.com")).unwrap();
    assert_eq!(recv(&mut gone)["event"], "accepted");
    gone.close(None).unwrap();
    let _ = gone.flush();
    drop(gone);
    let mut fresh = ws_connect(addr);
    // Until the closed session's job is done, the new one gets only what it asks for. The
    // master counts a result and routes its reply together, so once `stats` shows it done, a
    // misrouted reply would have come before that `stats` line.
    common::wait_for("the job of the closed session to be done", || {
        fresh.send(Message::text("stats")).unwrap();
        let stats = recv(&mut fresh);
        assert_eq!(stats["event"], "stats", "only what it asked for: {stats}");
        (stats["tasks_done"] == 1).then_some(())
    });
    assert!(daemon.outbox_lines().iter().any(|m| m["to"] == "gone@example.com"), "the job ran");
    // Nothing more comes: the read ends by its timeout, not by an error or a close (a crashed
    // master would reset the connection).
    if let MaybeTlsStream::Plain(s) = fresh.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    }
    match fresh.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("expected nothing within 500 ms, got {other:?}"),
    }
    if let MaybeTlsStream::Plain(s) = fresh.get_ref() {
        s.set_read_timeout(Some(common::DEADLINE)).unwrap();
    }
    // The daemon is alive and the session still served.
    assert!(!common::is_dead(daemon.pid), "the master is alive");
    fresh.send(Message::text("stats")).unwrap();
    assert_eq!(recv(&mut fresh)["event"], "stats");
}

fn http_get(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(common::DEADLINE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_page_is_served_on_get_slash_and_other_requests_are_refused() {
    let (_daemon, addr) = start(&[]);
    let page = http_get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("text/html") && page.contains("<title>taskd</title>") && page.contains("/app.js"));
    assert!(http_get(addr, "GET /app.js HTTP/1.1\r\nHost: x\r\n\r\n").contains("new WebSocket"));
    assert!(http_get(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(
        http_get(addr, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").starts_with("HTTP/1.1 405")
    );
    assert!(http_get(addr, "NOT HTTP AT ALL\r\n\r\n").starts_with("HTTP/1.1 400"));
}

/// The page in a real headless browser: submit a job in the form, see it turn `done`.
#[test]
fn the_page_in_a_headless_browser_submits_a_job_and_shows_it_done() {
    let Some(common::Browser { chromium, node, modules }) = common::browser() else { return };
    let (daemon, addr) = start(&["--simulate-ms", "700"]);
    let shot = daemon.dir.path().join("page.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/submit_job.cjs");
    // Generous: Chromium starts slowly on a loaded machine; the script's own waits are 50 s.
    let out = common::run_with_timeout(
        Command::new(node)
            .arg(&script)
            .arg(format!("http://{addr}/"))
            .arg(&shot)
            .arg(&chromium)
            .env("NODE_PATH", &modules),
        Duration::from_secs(120),
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("done: Email:browser@example.com, sent"), "{text}");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot was taken");
    if let Ok(dest) = std::env::var("TASKD_SCREENSHOT") {
        std::fs::copy(&shot, dest).unwrap();
    }
    assert!(daemon.outbox_lines().iter().any(|m| m["to"] == "browser@example.com"));
}

#[test]
fn a_library_application_can_listen_on_websocket_only() {
    let daemon =
        Daemon::start_example("task_api", &["--ws-only", "0", "--worker-num", "1", "--task-worker-num", "1"]);
    let addr = daemon.ws_addr.expect("the first stdout line names the WebSocket port");
    let mut ws = ws_connect(addr);
    ws.send(Message::text("wait 5000 over websocket")).unwrap();
    let waited = recv(&mut ws);
    assert!(waited["result"].as_str().unwrap().ends_with("OVER WEBSOCKET"), "{waited}");
    // Its only port speaks WebSocket: a request line over plain TCP is not answered as one.
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(common::DEADLINE)).unwrap();
    raw.write_all(b"alice@example.com\n\n").unwrap();
    let mut reply = String::new();
    raw.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
}
