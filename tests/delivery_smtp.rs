//! Email over SMTP (`--smtp-url`), against the real binary and a real relay: Debian's aiosmtpd
//! driven by `tests/common/smtp_relay.py`, with STARTTLS on a certificate of a CA made here by
//! the openssl CLI.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{cannot_run, run_with_timeout, wait_for, Daemon, DEADLINE};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
const PASSWORD: &str = "pw-Zq8vX1s3cret";

/// What a relay's tests need here; None (and a skip, if allowed) when it is missing.
fn relay_tools() -> Option<()> {
    let aiosmtpd = Command::new(PYTHON)
        .args(["-c", "import aiosmtpd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !aiosmtpd {
        cannot_run(
            "smtp",
            "the SMTP tests need Debian's aiosmtpd for /usr/bin/python3 (apt-get install python3-aiosmtpd)",
        );
        return None;
    }
    if common::which("openssl").is_none() {
        cannot_run("smtp", "the SMTP tests need the openssl CLI to make a test CA (apt-get install openssl)");
        return None;
    }
    Some(())
}

/// A CA and a certificate for 127.0.0.1 signed by it, made by the openssl CLI.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_certs(dir: &Path) -> Certs {
    let run = |args: &[&str]| {
        let out = run_with_timeout(Command::new("openssl").args(args).current_dir(dir), DEADLINE);
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=taskd test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "relay.key",
        "-out",
        "relay.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("relay.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "relay.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "relay.pem",
        "-days",
        "2",
        "-extfile",
        "relay.ext",
    ]);
    Certs { ca: dir.join("ca.pem"), cert: dir.join("relay.pem"), key: dir.join("relay.key") }
}

/// A running `smtp_relay.py`, stopped and reaped when dropped.
struct Relay {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Relay {
    /// `tls`: offer STARTTLS (or, `implicit`, TLS from the first byte) with these certificates;
    /// `auth`: require this USER:PASS.
    fn start(tls: Option<&Certs>, implicit: bool, auth: Option<&str>) -> Relay {
        Self::start_with(tls, implicit, auth, &[])
    }

    fn start_with(tls: Option<&Certs>, implicit: bool, auth: Option<&str>, extra: &[&str]) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/smtp_relay.py");
        let mut cmd = Command::new(PYTHON);
        cmd.arg(script).arg("--dir").arg(dir.path());
        if let Some(certs) = tls {
            cmd.arg("--cert").arg(&certs.cert).arg("--key").arg(&certs.key);
            if implicit {
                cmd.arg("--implicit");
            }
        }
        if let Some(auth) = auth {
            cmd.args(["--auth", auth]);
        }
        cmd.args(extra);
        common::tag(&mut cmd);
        // Its own complaints (a client that gave up mid-STARTTLS) go to a file, not the terminal.
        let log = std::fs::File::create(dir.path().join("relay.log")).unwrap();
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(DEADLINE).unwrap_or_default();
        let Some(port) = line.trim().strip_prefix("port ").and_then(|p| p.parse().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the relay did not start: {line:?}");
        };
        Relay { child, port, dir }
    }

    fn url(&self, scheme: &str, auth: Option<&str>, query: &str) -> String {
        let auth = auth.map(|a| format!("{a}@")).unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}{query}", self.port)
    }

    fn lines(&self, file: &str) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join(file))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a relay line is JSON"))
            .collect()
    }

    fn messages(&self) -> Vec<Value> {
        self.lines("messages.jsonl")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn email(to: &str, subject: &str, body: &str) -> String {
    serde_json::json!({"type": "email", "to": to, "subject": subject, "body": body}).to_string()
}

/// Sends one job and waits for its final reply.
fn run_job(daemon: &Daemon, line: &str) -> Value {
    let mut client = daemon.connect();
    let accepted = client.submit(line);
    client.final_reply(&accepted["task_id"], &mut Vec::new())
}

#[test]
fn emails_go_to_the_relay_over_starttls_with_the_relays_answer_and_no_password_shows() {
    let Some(()) = relay_tools() else { return };
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    let relay = Relay::start(Some(&certs), false, Some(&format!("app:{PASSWORD}")));
    let url = relay.url("smtp", Some(&format!("app:{PASSWORD}")), "");
    let ca = certs.ca.to_str().unwrap();
    // The URL as a flag: the daemon's title hides it from `ps`.
    let daemon = Daemon::start(&[
        "--task-worker-num",
        "1",
        "--smtp-url",
        &url,
        "--mail-from",
        "Shop <noreply@shop.test>",
        "--smtp-ca-file",
        ca,
    ]);

    let mut client = daemon.connect();
    let mut ids = Vec::new();
    for i in 0..3 {
        let accepted =
            client.submit(&email(&format!("alice{i}@example.com"), &format!("Order {i}"), "Thanks!\nBye."));
        let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
        assert_eq!(done["event"], "done", "{done}");
        let result = done["result"].as_str().unwrap();
        assert!(result.starts_with("250 2.0.0 Ok: queued as Q"), "the relay's answer: {done}");
        ids.push(accepted["task_id"].as_u64().unwrap());
    }
    let messages = relay.messages();
    assert_eq!(messages.len(), 3, "{messages:?}");
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m["subject"], format!("Order {i}"), "{m}");
        assert_eq!(m["body"].as_str().unwrap().replace("\r\n", "\n").trim_end(), "Thanks!\nBye.", "{m}");
        assert_eq!(m["rcpt_tos"], serde_json::json!([format!("alice{i}@example.com")]));
        assert_eq!(m["mail_from"], "noreply@shop.test");
        assert_eq!(m["tls"], true, "sent under STARTTLS: {m}");
        assert_eq!(m["login"], "app", "{m}");
        let message_id = m["message_id"].as_str().unwrap();
        assert!(
            message_id.starts_with(&format!("<taskd.{}.", ids[i])) && message_id.ends_with("@shop.test>"),
            "{message_id}"
        );
    }
    // Pooled: one connection carried them all (one task process).
    assert!(messages.iter().all(|m| m["peer"] == messages[0]["peer"]), "{messages:?}");
    // Nothing in the outbox: emails went to the relay.
    assert!(daemon.outbox_lines().is_empty());

    // The password: not in `ps`, the log, `stats`.
    for p in daemon.tree().iter().chain(common::proc_info(daemon.pid).iter()) {
        assert!(!p.args.contains(PASSWORD), "ps shows the password: {}", p.args);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(PASSWORD), "cmdline of {} shows it", p.pid);
    }
    client.send(r#"{"type":"stats"}"#);
    let stats = client.recv();
    assert!(!stats.to_string().contains(PASSWORD), "{stats}");
    let log = daemon.log();
    assert!(log.contains("127.0.0.1"), "the log names the relay: {log}");
    assert!(!log.contains(PASSWORD), "the log shows the password: {log}");

    // --check-config, the URL from the environment.
    let bin = env!("CARGO_BIN_EXE_taskd");
    let out = run_with_timeout(
        Command::new(bin)
            .args(["--check-config", "--mail-from", "noreply@shop.test"])
            .env("TASKD_SMTP_URL", &url)
            .env("TASKD_SMTP_CA_FILE", ca),
        DEADLINE,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("smtp_url = \"smtp://app:***@127.0.0.1:{}\"", relay.port)), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
}

#[test]
fn implicit_tls_and_a_local_relay_in_clear() {
    let Some(()) = relay_tools() else { return };
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    let tls = Relay::start(Some(&certs), true, None);
    let daemon = Daemon::start(&[
        "--task-worker-num",
        "1",
        "--smtp-url",
        &tls.url("smtps", None, ""),
        "--mail-from",
        "noreply@shop.test",
        "--smtp-ca-file",
        certs.ca.to_str().unwrap(),
    ]);
    let done = run_job(&daemon, &email("bob@example.com", "TLS", "from the first byte"));
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(tls.messages()[0]["tls"], true);
    drop(daemon);

    let clear = Relay::start(None, false, None);
    let daemon = Daemon::start(&[
        "--smtp-url",
        &clear.url("smtp", None, "?tls=none"),
        "--mail-from",
        "noreply@shop.test",
    ]);
    let done = run_job(&daemon, &email("carol@example.com", "Clear", "on this host"));
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(clear.messages()[0]["tls"], false);
}

#[test]
fn no_email_leaves_in_clear_or_to_an_untrusted_relay() {
    let Some(()) = relay_tools() else { return };
    // A relay that offers no STARTTLS: smtp:// requires it.
    let clear = Relay::start(None, false, None);
    let daemon =
        Daemon::start(&["--smtp-url", &clear.url("smtp", None, ""), "--mail-from", "noreply@shop.test"]);
    let failed = run_job(&daemon, &email("dave@example.com", "Secret", "not in clear"));
    assert_eq!(failed["event"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("does not offer STARTTLS") && error.contains("not sent in clear"), "{error}");
    assert!(clear.messages().is_empty(), "sent in clear: {:?}", clear.messages());
    drop(daemon);

    // A relay whose certificate the system's CAs do not vouch for (no --smtp-ca-file).
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    let private = Relay::start(Some(&certs), false, None);
    let daemon =
        Daemon::start(&["--smtp-url", &private.url("smtp", None, ""), "--mail-from", "noreply@shop.test"]);
    let failed = run_job(&daemon, &email("erin@example.com", "Secret", "not to a stranger"));
    assert_eq!(failed["event"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("TLS"), "{failed}");
    assert!(private.messages().is_empty());
}

#[test]
fn a_550_fails_the_job_at_once_and_a_451_runs_again_after_a_back_off() {
    let Some(()) = relay_tools() else { return };
    let relay = Relay::start(None, false, None);
    let daemon = Daemon::start(&[
        "--smtp-url",
        &relay.url("smtp", None, "?tls=opportunistic"),
        "--mail-from",
        "noreply@shop.test",
        "--retry-base-ms",
        "50",
        "--delivery-retry-max",
        "2",
    ]);
    let failed = run_job(&daemon, &email("perm550-frank@example.com", "Hi", "there"));
    assert_eq!(failed["event"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("550 5.1.1 mailbox unavailable: no such user here"), "{error}");
    assert_eq!(failed["attempts"], 1, "a permanent failure is not tried again: {failed}");

    // Greylisting: the relay says 451 to the first attempt and takes the second.
    let mut client = daemon.connect();
    let accepted = client.submit(&email("grey-grace@example.com", "Hi", "later"));
    let mut before = Vec::new();
    let done = client.final_reply(&accepted["task_id"], &mut before);
    assert_eq!(done["event"], "done", "{done} after {before:?}");
    assert_eq!(done["attempts"], 2, "{done}");
    let retrying: Vec<_> = before.iter().filter(|r| r["event"] == "retrying").collect();
    assert_eq!(retrying.len(), 1, "{before:?}");
    assert!(retrying[0]["error"].as_str().unwrap_or("").contains("451 4.7.1"), "{before:?}");
    let refused = relay.lines("refused.jsonl");
    assert_eq!(refused.iter().filter(|r| r["rcpt"] == "grey-grace@example.com").count(), 1, "{refused:?}");
    assert_eq!(
        relay.messages().iter().filter(|m| m["rcpt_tos"][0] == "grey-grace@example.com").count(),
        1,
        "delivered once"
    );

    // A relay that keeps saying 451: tried 1 + delivery_retry_max times, then failed with its words.
    let accepted = client.submit(&email("temp451-gus@example.com", "Hi", "never"));
    let mut before = Vec::new();
    let failed = client.final_reply(&accepted["task_id"], &mut before);
    assert_eq!(failed["event"], "failed", "{failed}");
    assert_eq!(failed["attempts"], 3, "{failed}");
    assert!(failed["error"].as_str().unwrap_or("").contains("451 4.3.0"), "{failed}");
    assert_eq!(before.iter().filter(|r| r["event"] == "retrying").count(), 2, "{before:?}");
}

#[test]
fn emails_submitted_while_the_relay_is_down_are_delivered_once_it_is_up() {
    let Some(()) = relay_tools() else { return };
    // A port nothing listens on yet: the relay's own, once it has gone.
    let port = Relay::start(None, false, None).port;
    let daemon = Daemon::start(&[
        "--smtp-url",
        &format!("smtp://127.0.0.1:{port}?tls=none"),
        "--mail-from",
        "noreply@shop.test",
        "--retry-base-ms",
        "200",
        "--retry-cap-ms",
        "400",
        "--delivery-retry-max",
        "50",
    ]);
    let mut client = daemon.connect();
    for i in 0..3 {
        client.send(&email(&format!("early{i}@example.com"), "Hi", "soon"));
    }
    // Each is accepted, refused, and waits for its retry: none fails.
    let (mut accepted, mut seen) = (Vec::new(), Vec::new());
    while accepted.len() < 3 || seen.len() < 3 {
        let reply = client.recv();
        match reply["event"].as_str() {
            Some("accepted") => accepted.push(reply),
            Some("retrying") => {
                assert!(reply["error"].as_str().unwrap_or("").contains("Connection refused"), "{reply}");
                seen.push(reply);
            }
            _ => panic!("only accepted and retrying while the relay is down: {reply}"),
        }
    }
    let relay = Relay::start_with(None, false, None, &["--port", &port.to_string()]);
    let mut finals = Vec::new();
    while finals.len() < accepted.len() {
        let reply = client.recv();
        match reply["event"].as_str() {
            Some("retrying") => seen.push(reply),
            _ => finals.push(reply),
        }
    }
    for done in &finals {
        assert_eq!(done["event"], "done", "{done} after {seen:?}");
        assert!(done["attempts"].as_u64().unwrap() >= 2, "{done}");
    }
    let mut delivered: Vec<String> =
        relay.messages().iter().map(|m| m["rcpt_tos"][0].as_str().unwrap().to_string()).collect();
    delivered.sort();
    assert_eq!(delivered, ["early0@example.com", "early1@example.com", "early2@example.com"]);
}

#[test]
fn a_task_process_killed_mid_send_sends_again_with_the_same_message_id() {
    let Some(()) = relay_tools() else { return };
    let relay = Relay::start(None, false, None);
    let daemon = Daemon::start(&[
        "--task-worker-num",
        "1",
        "--smtp-url",
        &relay.url("smtp", None, "?tls=none"),
        "--mail-from",
        "noreply@shop.test",
    ]);
    let mut client = daemon.connect();
    let accepted = client.submit(&email("hold-heidi@example.com", "Once", "only once, please"));
    // The relay has the message and holds its answer: the task process is mid-transaction.
    wait_for("the held message", || relay.messages().iter().any(|m| m["outcome"] == "held").then_some(()));
    let tasks = daemon.pids_of("taskd: task");
    assert_eq!(tasks.len(), 1, "{:?}", daemon.tree());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(tasks[0] as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();

    let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    assert!(done["result"].as_str().unwrap().starts_with("250 "), "{done}");
    // Exactly one final reply.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        if let Some(extra) = client.try_recv(Duration::from_millis(200)) {
            panic!("a second reply: {extra}");
        }
    }
    let messages = relay.messages();
    let ids: Vec<&Value> = messages.iter().map(|m| &m["message_id"]).collect();
    assert_eq!(messages.len(), 2, "held, then accepted: {messages:?}");
    assert_eq!(ids[0], ids[1], "the same Message-ID on both attempts");
    assert!(ids[0].as_str().unwrap().starts_with(&format!("<taskd.{}.", accepted["task_id"])));
}

#[test]
fn a_task_node_delivers_durable_jobs_by_smtp() {
    let Some(()) = relay_tools() else { return };
    let Some(redis) = common::durable::Redis::start() else { return };
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    let relay = Relay::start(Some(&certs), false, Some(&format!("app:{PASSWORD}")));
    let url = relay.url("smtp", Some(&format!("app:{PASSWORD}")), "");
    let web = Daemon::start(&["--redis-url", &redis.url, "--node-id", "web-1", "--task-worker-num", "0"]);
    let node = common::durable::TaskNode::start(
        &redis,
        "mail-1",
        &[
            "--task-worker-num",
            "1",
            "--smtp-url",
            &url,
            "--mail-from",
            "noreply@shop.test",
            "--smtp-ca-file",
            certs.ca.to_str().unwrap(),
        ],
    );
    let done = run_job(&web, &email("ivan@example.com", "Durable", "through Redis"));
    assert_eq!(done["event"], "done", "{done}");
    assert!(done["result"].as_str().unwrap().starts_with("250 2.0.0 Ok: queued as"), "{done}");
    assert_eq!(done["task_pid"], node.task_pids()[0], "{done}");
    let messages = relay.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    // Durable ids are unique across the queue's nodes and runs: the queue names them.
    assert_eq!(messages[0]["message_id"], format!("<taskd.{}.taskd@shop.test>", done["task_id"]));
    assert_eq!((&messages[0]["tls"], &messages[0]["login"]), (&Value::Bool(true), &Value::from("app")));
    assert!(node.outbox_lines().is_empty());
    for pid in std::iter::once(node.pid).chain(node.task_pids()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(PASSWORD), "ps shows the password of {pid}");
    }
    assert!(!node.log().contains(PASSWORD), "{}", node.log());
}

#[test]
fn a_kept_connection_the_relay_closed_is_replaced_without_failing_the_job() {
    let Some(()) = relay_tools() else { return };
    // The relay closes a connection idle for 1 s (421, as Postfix does after its timeout).
    let relay = Relay::start_with(None, false, None, &["--idle-timeout", "1"]);
    let daemon = Daemon::start(&[
        "--task-worker-num",
        "1",
        "--smtp-url",
        &relay.url("smtp", None, "?tls=none"),
        "--mail-from",
        "noreply@shop.test",
    ]);
    let first = run_job(&daemon, &email("judy@example.com", "One", "first"));
    assert_eq!(first["event"], "done", "{first}");
    std::thread::sleep(Duration::from_millis(2500));
    let second = run_job(&daemon, &email("judy@example.com", "Two", "second"));
    assert_eq!(second["event"], "done", "{second}");
    assert_eq!(second["attempts"], 1, "{second}");
    let messages = relay.messages();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_ne!(messages[0]["peer"], messages[1]["peer"], "a new connection");
}
