//! The operator's dashboard (issue 20): the admin token, what is pushed, the actions, and the
//! page in headless Chromium, against the real binary.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Daemon;
use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn ws_connect(addr: SocketAddr) -> Ws {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{addr}/"), MaybeTlsStream::Plain(stream))
        .expect("WebSocket handshake");
    ws
}

/// The next text message as JSON; None once taskd closed the connection.
fn recv(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("JSON")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

/// The next message that is not a `dashboard` push.
fn answer(ws: &mut Ws) -> Value {
    loop {
        let m = recv(ws).expect("an answer");
        if m["event"] != "dashboard" {
            return m;
        }
    }
}

/// Fails every job, with a reason that looks like markup (the page must show it as text).
const FAILING_HANDLER: &str = r#"
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    print(json.dumps({"task_id": msg["task_id"], "error": "<img src=x> <b>mailbox full</b>", "retry": False}), flush=True)
"#;

struct Started {
    daemon: Daemon,
    ws: SocketAddr,
    token: String,
    token_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// taskd with a pid file, so that it generates its token beside it.
fn start(extra: &[&str]) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("taskd.pid");
    let mut args = vec!["--ws-port", "0", "--pid-file", pid_file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&args);
    let token_file = pid_file.with_extension("admin-token");
    let log = daemon.wait_log("dashboard: the admin token is in");
    assert!(log.contains(token_file.to_str().unwrap()), "the log names the file: {log}");
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    assert!(!log.contains(&token), "the token itself is not logged");
    let ws = daemon.ws_addr.unwrap();
    Started { daemon, ws, token, token_file, _dir: dir }
}

#[test]
fn the_token_is_generated_private_and_opens_the_pushed_dashboard() {
    use std::os::unix::fs::PermissionsExt;
    let s = start(&["--task-worker-num", "2", "--task-worker-max", "4", "--simulate-ms", "20"]);
    let mode = std::fs::metadata(&s.token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // No token: no action; the pool stays as it is.
    let mut ws = ws_connect(s.ws);
    send(&mut ws, serde_json::json!({"admin": "grow"}));
    let refused = answer(&mut ws);
    assert_eq!(refused["event"], "error", "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("need the admin token"), "{refused}");
    s.daemon.wait_log("dashboard: refused \"grow\"");
    // The same connection still submits jobs as before.
    send(&mut ws, serde_json::json!({"type": "email", "to": "a@example.com"}));
    assert_eq!(answer(&mut ws)["event"], "accepted");

    // A wrong token: refused, and the connection closed (one guess per connection).
    let mut wrong = ws_connect(s.ws);
    send(&mut wrong, serde_json::json!({"admin": "hello", "token": format!("{}x", s.token)}));
    assert_eq!(recv(&mut wrong).unwrap()["error"], "admin token refused");
    assert!(recv(&mut wrong).is_none(), "closed after a wrong token");

    // The token: the dashboard, with its history at once, then a push a second.
    let mut admin = ws_connect(s.ws);
    send(&mut admin, serde_json::json!({"admin": "hello", "token": s.token}));
    let hello = recv(&mut admin).unwrap();
    assert_eq!((&hello["event"], &hello["ok"]), (&"admin".into(), &true.into()), "{hello}");
    let first = recv(&mut admin).unwrap();
    assert_eq!(first["event"], "dashboard");
    assert!(first["history"].is_array(), "{first}");
    // Both task processes, each with its pid and memory: a push made while the pool is still
    // starting may not have them yet, so look at the pushes of a few seconds (one a second).
    let full_pool = |push: &Value| {
        let tasks: Vec<&Value> =
            push["processes"].as_array().unwrap().iter().filter(|p| p["role"] == "task").collect();
        tasks.len() == 2
            && tasks.iter().all(|p| {
                p["pid"].as_u64().is_some_and(|n| n > 0) && p["rss_kib"].as_u64().is_some_and(|n| n > 0)
            })
    };
    let mut next = recv(&mut admin).unwrap();
    let mut pushes = vec![first, next.clone()];
    while !full_pool(pushes.last().unwrap()) {
        assert!(pushes.len() < 10, "no push shows both task processes with a pid and RSS: {pushes:?}");
        next = recv(&mut admin).unwrap();
        pushes.push(next.clone());
    }
    assert_eq!(next["event"], "dashboard");
    for key in ["high", "normal", "low"] {
        assert!(next["queues"]["by_priority"][key].is_u64(), "{next}");
    }
    assert!(next["queues"]["scheduled"].is_u64() && next["schedules"].is_array(), "{next}");
    assert!(next["sample"]["t"].is_u64() && next.get("history").is_none(), "{next}");

    // Actions: grow, then look a job up.
    send(&mut admin, serde_json::json!({"admin": "grow"}));
    let grown = answer(&mut admin);
    assert_eq!((&grown["ok"], &grown["task_worker_num"]), (&true.into(), &3.into()), "{grown}");
    s.daemon.wait_log("task pool grows to 3 process(es) (task 2), asked by the dashboard");
    send(&mut admin, serde_json::json!({"admin": "lookup", "task_id": 1}));
    let found = answer(&mut admin);
    assert_eq!(found["task_id"], 1, "{found}");
    assert!(
        ["accepted", "done", "queued"].iter().any(|s| found["state"].as_str().unwrap().contains(s)),
        "{found}"
    );
    send(&mut admin, serde_json::json!({"admin": "lookup", "task_id": 999_999}));
    assert!(answer(&mut admin)["state"].as_str().unwrap().starts_with("unknown"));

    // A stop removes the token it generated.
    let mut daemon = s.daemon;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(20)).is_some());
    assert!(!s.token_file.exists(), "a generated token is removed on exit");
}

#[test]
fn an_operators_token_file_is_used_and_the_page_has_its_security_headers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "an-operator-chosen-token-0123\n").unwrap();
    let daemon = Daemon::start(&["--ws-port", "0", "--admin-token-file", file.to_str().unwrap()]);
    let addr = daemon.ws_addr.unwrap();
    let mut ws = ws_connect(addr);
    send(&mut ws, serde_json::json!({"admin": "hello", "token": "an-operator-chosen-token-0123"}));
    assert_eq!(recv(&mut ws).unwrap()["ok"], true);
    // Every file of the page: served from the binary, with the policy.
    for path in [
        "/",
        "/app.js",
        "/dashboard.js",
        "/style.css",
        "/uPlot.iife.min.js",
        "/uPlot.min.css",
        "/uPlot.LICENSE",
    ] {
        let got = common::http_get(addr, path);
        assert!(got.starts_with("HTTP/1.1 200"), "{path}: {got}");
        assert!(got.contains("Content-Security-Policy: default-src 'none'; script-src 'self'"), "{path}");
    }
    let page = common::http_get(addr, "/");
    assert!(!page.contains("<script>") && !page.contains("<style>"), "no inline script or style");
    let licence = common::http_get(addr, "/uPlot.LICENSE");
    assert!(licence.contains("The MIT License"), "{licence}");
    // A file too short to be a secret is refused at start, with the reason.
    std::fs::write(&file, "short\n").unwrap();
    let (_, log) = Daemon::try_start(&["--ws-port", "0", "--admin-token-file", file.to_str().unwrap()])
        .err()
        .expect("refused");
    assert!(log.contains("fewer than 16 characters"), "{log}");
}

fn failing_handler(dir: &Path) -> Option<String> {
    if common::which("python3").is_none() {
        common::cannot_run("python", "python3 is not installed: the dashboard test runs a Python handler");
        return None;
    }
    let path = dir.join("fail.py");
    std::fs::write(&path, FAILING_HANDLER).unwrap();
    Some(format!("fail=python3 {}", path.display()))
}

/// The page in headless Chromium: without the token, with a wrong one, with it; the charts
/// under load, a kill -9 shown, a failure with its reason as text, actions confirmed.
#[test]
fn the_dashboard_in_a_headless_browser() {
    let Some(common::Browser { chromium, node, modules }) = common::browser() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(handler) = failing_handler(dir.path()) else { return };
    let s = start(&[
        "--task-worker-num",
        "2",
        "--task-worker-max",
        "4",
        "--simulate-ms",
        "40",
        "--delivery-retry-max",
        "0",
        "--handler",
        &handler,
    ]);
    // A client's job a minute ahead, for the page to cancel.
    let mut client = s.daemon.connect();
    let later =
        client.submit(r#"{"type":"email","to":"later@example.com","run_in_ms":60000,"priority":"low"}"#);
    let later_id = later["task_id"].as_u64().unwrap();
    let shot = dir.path().join("dashboard.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.cjs");
    let out = common::run_with_timeout(
        Command::new(node)
            .arg(&script)
            .arg(format!("http://{}/", s.ws))
            .arg(&s.token)
            .arg(&shot)
            .arg(&chromium)
            .env("NODE_PATH", &modules)
            .env("CANCEL_ID", later_id.to_string()),
        Duration::from_secs(240),
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{text}\n{}", s.daemon.log());
    assert!(
        text.contains("without token: dashboard hidden: true | action: admin actions need the admin token"),
        "{text}"
    );
    assert!(text.contains("wrong token: dashboard hidden: true"), "{text}");
    assert!(text.contains("with token: dashboard shown, address: clean"), "{text}");
    assert!(text.contains("scheduled: 1 | high/normal/low: "), "{text}");
    let cancel_line = text.lines().find(|l| l.starts_with("cancel: ")).unwrap_or_default();
    assert!(
        cancel_line.contains(r#""action":"cancel""#)
            && cancel_line.contains(r#""ok":true"#)
            && cancel_line.contains(&format!(r#""task_id":{later_id}"#)),
        "{text}"
    );
    assert!(text.contains("scheduled after cancel: 0"), "{text}");
    // Its client gets its final line; the log says who asked; it never reaches the outbox.
    assert_eq!(client.recv(), serde_json::json!({"event": "cancelled", "task_id": later_id}));
    let log = s.daemon.log();
    assert!(log.contains(&format!("dashboard: task {later_id} cancelled, asked by 127.0.0.1:")), "{log}");
    let mut asker = s.daemon.connect();
    asker.send("stats");
    let stats = asker.recv();
    assert_eq!(stats["tasks_cancelled"], 1, "{stats}");
    assert_eq!(stats["delayed"], 0, "nothing left waiting to run it: {stats}");
    let outbox = s.daemon.outbox_lines();
    assert!(outbox.iter().all(|l| l["task_id"] != later_id), "{outbox:?}");
    assert!(text.contains("jobs chart rose: from 0 to"), "{text}");
    assert!(text.contains("restart shown after"), "{text}");
    assert!(
        text.contains("failure shown: handler: <img src=x> <b>mailbox full</b> | elements in it: 0"),
        "{text}"
    );
    assert!(text.contains("\"action\":\"grow\",\"ok\":true"), "{text}");
    assert!(text.contains("\"action\":\"lookup\""), "{text}");
    assert!(!text.contains("page error"), "{text}");
    // The actions are in the log, with who asked.
    let log = s.daemon.log();
    assert!(log.contains("dashboard opened by 127.0.0.1:"), "{log}");
    assert!(log.contains("asks to grow the task pool"), "{log}");
    assert!(log.contains("looks up task 1"), "{log}");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    if let Ok(dest) = std::env::var("TASKD_SCREENSHOT") {
        std::fs::copy(&shot, dest).unwrap();
    }
}

/// A durable node's dashboard: its nodes, and two dead letters, one replayed from the page
/// (it runs and ends `done`), one discarded.
#[test]
fn a_dead_letter_replayed_from_the_page_ends_done() {
    let Some(common::Browser { chromium, node, modules }) = common::browser() else { return };
    let Some(redis) = common::durable::Redis::start() else { return };
    let s = start(&["--redis-url", redis.url.as_str(), "--node-id", "web-1", "--task-worker-num", "1"]);
    // Two jobs of this node that failed past their attempts, as a consumer leaves them.
    let dead = |task_id: &str, to: &str| -> String {
        let data = format!(r#"{{"type":"email","to":"{to}"}}"#);
        redis.query(&[
            "XADD",
            "{taskd}:dead",
            "*",
            "o",
            "web-1",
            "t",
            task_id,
            "s",
            "0",
            "w",
            "0",
            "d",
            &data,
            "a",
            "3",
            "why",
            "gave up after 3 attempts: <b>relay down</b>",
        ])
    };
    let replay_id = dead("900001", "dead@example.com");
    let discard_id = dead("900002", "dropped@example.com");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dead_letters.cjs");
    let out = common::run_with_timeout(
        Command::new(node)
            .arg(&script)
            .arg(format!("http://{}/", s.ws))
            .arg(&s.token)
            .arg(&replay_id)
            .arg(&discard_id)
            .arg(&chromium)
            .env("NODE_PATH", &modules),
        Duration::from_secs(180),
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{text}\n{}", s.daemon.log());
    assert!(text.contains("nodes: web-1 this node"), "{text}");
    assert!(text.contains("dead@example.com gave up after 3 attempts: <b>relay down</b>"), "{text}");
    assert!(text.contains(&format!(
        "confirm: Run dead letter {replay_id} (task 900001, to dead@example.com) again?"
    )));
    assert!(text.contains("\"action\":\"replay\",\"ok\":true"), "{text}");
    assert!(text.contains("\"action\":\"discard\",\"ok\":true"), "{text}");
    assert!(text.contains("both gone from the page"), "{text}");
    assert_eq!(redis.xlen("{taskd}:dead"), 0);
    // The replayed job ran: delivered, and its outcome kept on its node as `done`.
    common::wait_for("the replayed job to be delivered", || {
        s.daemon.outbox_lines().iter().any(|m| m["to"] == "dead@example.com").then_some(())
    });
    assert!(!s.daemon.outbox_lines().iter().any(|m| m["to"] == "dropped@example.com"));
    let mut ws = ws_connect(s.ws);
    send(&mut ws, serde_json::json!({"admin": "hello", "token": s.token}));
    assert_eq!(answer(&mut ws)["ok"], true);
    let outcome = common::wait_for("the replayed job's outcome", || {
        send(&mut ws, serde_json::json!({"admin": "lookup", "task_id": 900001}));
        let found = answer(&mut ws);
        (found["state"] == "done").then_some(found)
    });
    assert_eq!(outcome["outcome"]["to"], "dead@example.com", "{outcome}");
    let log = s.daemon.log();
    assert!(log.contains(&format!("asks to replay dead letter \"{replay_id}\"")), "{log}");
    assert!(log.contains(&format!("dead letter \"{discard_id}\" discarded")), "{log}");
}

#[test]
fn the_dashboard_cancels_a_durable_job_in_redis_and_is_answered_when_redis_has() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let s = start(&["--redis-url", redis.url.as_str(), "--node-id", "web-1", "--task-worker-num", "1"]);
    let mut client = s.daemon.connect();
    let later = client.submit(r#"{"type":"email","to":"later@example.com","run_in_ms":60000}"#);
    let id = later["task_id"].clone();
    let mut admin = ws_connect(s.ws);
    send(&mut admin, serde_json::json!({"admin": "hello", "token": s.token}));
    assert_eq!(answer(&mut admin)["ok"], true);
    send(&mut admin, serde_json::json!({"admin": "cancel", "task_id": id}));
    let done = answer(&mut admin);
    assert_eq!(
        (&done["action"], &done["ok"], &done["task_id"]),
        (&"cancel".into(), &true.into(), &id),
        "{done}"
    );
    assert_eq!(client.recv(), serde_json::json!({"event": "cancelled", "task_id": id}));
    let parked: i64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
    assert_eq!(parked, 0, "taken out of Redis");
    // Again: it has ended, and the page is told why not.
    send(&mut admin, serde_json::json!({"admin": "cancel", "task_id": id}));
    let again = answer(&mut admin);
    assert_eq!(again["ok"], false, "{again}");
    assert!(again["error"].as_str().unwrap().contains("has ended"), "{again}");
}
