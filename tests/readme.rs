//! The README's samples stay true: its `nc` sessions (```console blocks with `$ nc 127.0.0.1
//! 9501`, typed or piped) are replayed against a real daemon on port 0 and the replies compared,
//! but for ids, pids and times; a piped `nc` has `-N` (without it, it never exits); no two of
//! the README's listeners share a port.

mod common;

use common::{Client, Daemon, DEADLINE};
use serde_json::Value;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// One line of a session: what the user typed, or what taskd answered.
#[derive(Debug, Clone)]
enum Line {
    Request(String),
    Reply(Value),
}

#[derive(Debug)]
struct Session {
    /// The shell command that started it, for messages.
    command: String,
    /// `printf … | nc -N`: all requests first, then the client closes its side.
    piped: bool,
    lines: Vec<Line>,
}

/// The ```console blocks of `text`, each as its lines.
fn console_blocks(text: &str) -> Vec<Vec<&str>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```console") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), l) => block.push(l),
            (None, _) => {}
        }
    }
    blocks
}

/// `printf 'A\nB\n' | nc -N …` → the lines A and B.
fn printf_lines(command: &str) -> Vec<String> {
    let start = command.find('\'').expect("printf '…'") + 1;
    let end = command.rfind("' |").expect("printf '…' | nc");
    command[start..end].split("\\n").filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// Every session with taskd on its default port in the README.
fn sessions(text: &str) -> Vec<Session> {
    let mut found = Vec::new();
    for block in console_blocks(text) {
        let mut current: Option<Session> = None;
        for line in block {
            if let Some(command) = line.strip_prefix("$ ") {
                found.extend(current.take());
                let command = command.trim();
                if command == "nc 127.0.0.1 9501" {
                    current = Some(Session { command: command.into(), piped: false, lines: Vec::new() });
                } else if command.starts_with("printf ") && command.ends_with("| nc -N 127.0.0.1 9501") {
                    let lines = printf_lines(command).into_iter().map(Line::Request).collect();
                    current = Some(Session { command: command.into(), piped: true, lines });
                }
                continue;
            }
            let Some(session) = current.as_mut() else { continue };
            if line.starts_with('{') && line.contains("\"event\"") {
                let reply = serde_json::from_str(line).unwrap_or_else(|e| panic!("README reply {line}: {e}"));
                session.lines.push(Line::Reply(reply));
            } else if !line.trim().is_empty() && !session.piped {
                session.lines.push(Line::Request(line.to_string()));
            }
        }
        found.extend(current.take());
    }
    found
}

/// A reply without what differs from run to run.
fn normalized(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(obj) = v.as_object_mut() {
        for key in ["task_id", "worker_pid", "task_pid"] {
            if let Some(field) = obj.get_mut(key) {
                *field = Value::Null;
            }
        }
    }
    v
}

/// Reads replies until one like `expected`, keeping the others (which must match a later
/// line of the session) in `early`.
fn expect_reply(client: &mut Client, expected: &Value, early: &mut Vec<Value>, session: &Session) {
    let want = normalized(expected);
    if let Some(i) = early.iter().position(|v| normalized(v) == want) {
        early.remove(i);
        return;
    }
    loop {
        match client.try_recv(DEADLINE) {
            Some(v) if normalized(&v) == want => return,
            Some(v) => early.push(v),
            None => panic!(
                "README session `{}`: no reply like\n  {expected}\nwithin {DEADLINE:?}; taskd answered instead:\n  {early:?}",
                session.command
            ),
        }
    }
}

fn replay(session: &Session) {
    // As the README's session was started (`--max-request 4`), on port 0.
    let daemon = Daemon::start(&["--max-request", "4"]);
    let mut client = daemon.connect();
    let mut early = Vec::new();
    for line in &session.lines {
        match line {
            Line::Request(text) => client.send(text),
            // Piped: all requests are sent first, and the client's side closed after them.
            Line::Reply(_) if session.piped => {}
            Line::Reply(expected) => expect_reply(&mut client, expected, &mut early, session),
        }
    }
    if session.piped {
        client.shutdown_write();
        for line in &session.lines {
            if let Line::Reply(expected) = line {
                expect_reply(&mut client, expected, &mut early, session);
            }
        }
        // `nc -N` exits because taskd closes the connection once everything is answered.
        assert!(client.closed_by_server(), "README session `{}`: taskd did not close", session.command);
    }
    assert!(early.is_empty(), "README session `{}`: replies it does not show: {early:?}", session.command);
}

#[test]
fn the_readme_nc_sessions_get_the_replies_it_shows() {
    let text = readme();
    let sessions = sessions(&text);
    assert!(sessions.len() >= 2, "the README's typed and piped nc sessions are found: {sessions:?}");
    assert!(sessions.iter().any(|s| s.piped) && sessions.iter().any(|s| !s.piped), "{sessions:?}");
    for session in &sessions {
        assert!(
            session.lines.iter().any(|l| matches!(l, Line::Request(_)))
                && session.lines.iter().any(|l| matches!(l, Line::Reply(_))),
            "{session:?}"
        );
        replay(session);
    }
}

#[test]
fn the_readme_pipes_into_nc_with_n_and_gives_each_listener_its_own_port() {
    let text = readme();
    for line in text.lines().filter(|l| l.contains("| nc ")) {
        assert!(line.contains("| nc -N "), "a piped nc needs -N to exit at the end of its input: {line}");
    }
    let config =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap();
    // The port after each mention of an option, in the README and the example config.
    let ports_after = |needle: &str| -> Vec<u16> {
        let mut ports = Vec::new();
        for source in [&text, &config] {
            for (i, _) in source.match_indices(needle) {
                let rest = &source[i + needle.len()..];
                let word: String =
                    rest.chars().take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c)).collect();
                if let Some(port) = word.rsplit(':').next().and_then(|p| p.parse().ok()) {
                    ports.push(port);
                }
            }
        }
        ports
    };
    let metrics: Vec<u16> = [ports_after("--metrics-addr "), ports_after("metrics_addr = \"")].concat();
    let ws: Vec<u16> = [ports_after("--ws-port "), ports_after("ws_port = ")].concat();
    assert!(!metrics.is_empty() && !ws.is_empty(), "metrics {metrics:?}, ws {ws:?}");
    for port in metrics.iter().filter(|&&p| p != 0) {
        assert!(!ws.contains(port) && *port != 9501, "port {port} is both metrics and another listener");
    }
    assert!(!ws.contains(&9501), "ws {ws:?}");
}
