//! Issue 17: SMS over an HTTP API (`--sms-url`), against a local stand-in of the provider
//! (tests/common/sms_provider.py), and the per-channel rate limits (`--sms-rate`), end to end
//! through the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Client, Daemon, DEADLINE};
use serde_json::{json, Value};

/// The provider's stand-in: each request recorded, answers scripted per recipient.
struct Provider {
    child: Child,
    port: u16,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl Provider {
    /// None when python3 is missing and TASKD_TEST_ALLOW_SKIP names `python` (else it fails).
    fn start(script: Value) -> Option<Provider> {
        if common::which("python3").is_none() {
            common::cannot_run("python", "this SMS test runs a stand-in provider with python3 on PATH");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let record = dir.path().join("requests.jsonl");
        let mut child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/sms_provider.py"))
            .arg(&record)
            .arg(script.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3");
        let rx = common::first_lines(child.stdout.take().expect("stdout"), 1);
        let line = rx.recv_timeout(DEADLINE).unwrap_or_default();
        let port = line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok());
        let mut provider = Provider { child, port: 0, record, _dir: dir };
        provider.port = port.unwrap_or_else(|| panic!("the stand-in did not start: {line:?}"));
        Some(provider)
    }

    fn url(&self, userinfo: &str, path: &str) -> String {
        format!("http://{userinfo}127.0.0.1:{}{path}", self.port)
    }

    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a recorded request is JSON"))
            .collect()
    }

    /// Lets every held answer go.
    fn release(&self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to the stand-in");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(s, "POST /_release HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `line` and returns the job's final reply.
fn run(c: &mut Client, line: &str) -> Value {
    let accepted = c.submit(line);
    c.final_reply(&accepted["task_id"], &mut Vec::new())
}

fn header<'a>(request: &'a Value, name: &str) -> &'a str {
    request["headers"][name].as_str().unwrap_or_default()
}

#[test]
fn the_twilio_preset_posts_a_form_with_basic_auth_and_the_done_has_the_sid() {
    let Some(provider) = Provider::start(json!({})) else { return };
    let url = provider.url("AC123:tok3n@", "/2010-04-01/Accounts/AC123/Messages.json");
    let d = Daemon::start(&["--sms-url", &url, "--sms-from", "+15005550006"]);
    let mut c = d.connect();
    let done = run(&mut c, r#"{"type":"sms","to":"+15551230001","text":"hello there & more"}"#);
    assert_eq!(done["event"], "done", "{done}");
    let requests = provider.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r["method"], "POST");
    assert_eq!(r["path"], "/2010-04-01/Accounts/AC123/Messages.json");
    assert_eq!(header(r, "authorization"), "Basic QUMxMjM6dG9rM24=", "AC123:tok3n");
    assert!(header(r, "content-type").starts_with("application/x-www-form-urlencoded"), "{r}");
    let mut fields: Vec<&str> = r["body"].as_str().unwrap().split('&').collect();
    fields.sort();
    assert_eq!(fields, ["Body=hello+there+%26+more", "From=%2B15005550006", "To=%2B15551230001"]);
    assert_eq!(done["result"], format!("SM{:032x}", 1), "the sid of the answer");
    let id = done["task_id"].as_u64().unwrap();
    assert!(header(r, "idempotency-key").ends_with(&format!("-{id}")), "{r}");
    assert!(d.outbox_lines().is_empty(), "an SMS sent to the provider is not in the outbox");
}

#[test]
fn the_webhook_preset_posts_json_with_a_bearer_token_and_an_idempotency_key() {
    let Some(provider) = Provider::start(json!({})) else { return };
    let url = provider.url("", "/hooks/sms");
    let d = Daemon::start_env(
        &["--sms-preset", "webhook", "--sms-url", &url],
        &[("TASKD_SMS_TOKEN", "wh-t0ken")],
    )
    .unwrap_or_else(|(s, log)| panic!("{s}\n{log}"));
    let mut c = d.connect();
    let done = run(&mut c, r#"{"type":"sms","to":"+15551230002","text":"code 1234"}"#);
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["result"], "msg-1", "the id of the answer");
    let id = done["task_id"].as_u64().unwrap();
    let r = &provider.requests()[0];
    assert_eq!(r["path"], "/hooks/sms");
    assert_eq!(header(r, "authorization"), "Bearer wh-t0ken");
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"to": "+15551230002", "text": "code 1234", "task_id": id}));
    // taskd-HOST-STARTMS-ID: unique across daemons, the same on every attempt of the job.
    let key = header(r, "idempotency-key");
    assert!(key.starts_with("taskd-") && key.ends_with(&format!("-{id}")), "{key}");
    // Email still goes to the outbox.
    assert_eq!(run(&mut c, r#"{"type":"email","to":"a@example.com","simulate_ms":0}"#)["event"], "done");
    assert_eq!(d.outbox_lines().len(), 1);
}

#[test]
fn a_refusal_fails_the_job_with_the_providers_words() {
    let refusal = json!({"code": 21211, "message": "The 'To' number +15551230400 is not a valid phone number.\nINFO forged"});
    let script = json!({"+15551230400": [{"status": 400, "body": refusal.to_string()}]});
    let Some(provider) = Provider::start(script) else { return };
    let url = provider.url("", "/sms");
    let d = Daemon::start(&["--sms-preset", "webhook", "--sms-url", &url]);
    let mut c = d.connect();
    let failed = run(&mut c, r#"{"type":"sms","to":"+15551230400","text":"x"}"#);
    assert_eq!(failed["event"], "failed", "{failed}");
    assert_eq!(
        failed["error"],
        "SMS provider answered HTTP 400: The 'To' number +15551230400 is not a valid phone number. INFO forged"
    );
    assert_eq!(provider.requests().len(), 1, "a refusal is not tried again");
    assert!(!d.log().contains("\nINFO forged"), "no forged log line");
}

#[test]
fn a_job_rerun_after_its_task_process_died_mid_request_sends_the_same_idempotency_key() {
    let Some(provider) = Provider::start(json!({"+15551230999": [{"hold": true}]})) else { return };
    let url = provider.url("AC9:t@", "/Messages.json");
    let d = Daemon::start(&["--sms-url", &url, "--sms-from", "Acme", "--task-worker-num", "1"]);
    let mut c = d.connect();
    let accepted = c.submit(r#"{"type":"sms","to":"+15551230999","text":"once"}"#);
    wait_for("the first request", || (provider.requests().len() == 1).then_some(()));
    let task = d.wait_pool(2, 1).into_iter().find(|p| p.args.starts_with("taskd: task")).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(task.pid as i32), nix::sys::signal::SIGKILL).unwrap();
    wait_for("the second attempt's request", || (provider.requests().len() == 2).then_some(()));
    provider.release();
    let done = c.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    let keys: Vec<String> =
        provider.requests().iter().map(|r| header(r, "idempotency-key").to_string()).collect();
    assert_eq!(keys[0], keys[1], "one key for both attempts");
    assert!(keys[0].ends_with(&format!("-{}", accepted["task_id"])), "{keys:?}");
}

#[test]
fn the_token_and_password_never_show_in_logs_ps_check_config_or_stats() {
    let (password, token) = ("pAsSw0rd77", "t0KeN88");
    let script = json!({"+15551230500": [{"status": 500, "body": "down"}]});
    let Some(provider) = Provider::start(script) else { return };
    let url = provider.url(&format!("AC1:{password}@"), "/sms");
    let args =
        ["--sms-url", &url, "--sms-token", token, "--sms-from", "+15005550006", "--log-level", "debug"];
    let d = Daemon::start(&args);
    d.wait_pool(2, 4);
    let mut c = d.connect();
    assert_eq!(run(&mut c, r#"{"type":"sms","to":"+15551230001","text":"a"}"#)["event"], "done");
    let failed = run(&mut c, r#"{"type":"sms","to":"+15551230500","text":"b"}"#);
    assert!(failed["error"].as_str().unwrap().contains("HTTP 500: down"), "{failed}");
    c.send("stats");
    let stats = c.recv().to_string();
    let mut shown = vec![d.log(), stats];
    shown.extend(std::iter::once(d.pid).chain(d.tree().iter().map(|p| p.pid)).map(|pid| {
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
            .into_owned()
    }));
    let check = common::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_taskd")).args(args).arg("--check-config"),
        Duration::from_secs(60),
    );
    assert!(check.status.success(), "{check:?}");
    let config = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(config.contains("sms_token = \"***\"") && config.contains("AC1:***@127.0.0.1"), "{config}");
    shown.push(config);
    for text in &shown {
        assert!(!text.contains(password) && !text.contains(token), "a secret shows in:\n{text}");
    }
}

/// Sends `lines` (a job each, known by its recipient `to[i]`: replies of different jobs
/// interleave) and waits until each is done. A job over the limit waits in the delayed queue:
/// it never fails for it, and its client gets no line for it (it is not a retry).
fn send_until_done(c: &mut Client, lines: &[String], to: &[String]) {
    for line in lines {
        c.send(line);
    }
    let mut open: Vec<usize> = (0..lines.len()).collect();
    let start = Instant::now();
    while !open.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(90), "jobs still open: {open:?}");
        let reply = c.recv();
        let Some(at) = open.iter().position(|&i| to[i] == reply["to"]) else { continue };
        match reply["event"].as_str() {
            Some("done") => {
                open.remove(at);
            }
            Some("accepted") => {}
            _ => panic!("a job over the rate limit must wait, not end or retry: {reply}"),
        }
    }
}

/// Over any span of the outbox's stamps, at most 1 + `per_s` × span of them were sent, plus
/// one for the lag between a turn and its stamp (slowness only makes spans longer).
fn assert_rate_bound(outbox: &[Value], per_s: u64, jobs: usize) {
    let mut stamps: Vec<u64> = outbox.iter().map(|l| l["sent_at_ms"].as_u64().unwrap()).collect();
    stamps.sort();
    assert_eq!(stamps.len(), jobs, "each job sent once");
    for i in 0..stamps.len() {
        for j in i + 1..stamps.len() {
            let (count, span_ms) = ((j - i + 1) as u64, stamps[j] - stamps[i]);
            assert!(count <= 2 + per_s * span_ms / 1000, "{count} sent within {span_ms} ms: {stamps:?}");
        }
    }
}

/// `--sms-rate 2/s`: SMS to the outbox (no provider) never leave faster, from four task
/// processes at once.
#[test]
fn sms_to_the_outbox_never_leave_faster_than_the_rate() {
    let d = Daemon::start(&["--sms-rate", "2/s", "--simulate-ms", "0", "--task-worker-num", "4"]);
    let mut c = d.connect();
    let to: Vec<String> = (0..6).map(|i| format!("+1555123{i:04}")).collect();
    let lines: Vec<String> =
        to.iter().map(|t| format!(r#"{{"type":"sms","to":"{t}","text":"hi"}}"#)).collect();
    send_until_done(&mut c, &lines, &to);
    assert_rate_bound(&d.outbox_lines(), 2, lines.len());
}

/// Durable jobs: two task nodes on one Redis queue share `--smtp-rate 2/s` (a GCRA on the
/// queue's key), not 2/s each.
#[test]
fn two_task_nodes_share_one_rate_limit_through_redis() {
    use common::durable::{Redis, TaskNode};
    let Some(redis) = Redis::start() else { return };
    let d = Daemon::start(&["--redis-url", &redis.url, "--node-id", "web-1", "--task-worker-num", "0"]);
    let node_args = ["--smtp-rate", "2/s", "--simulate-ms", "0", "--task-worker-num", "2"];
    let a = TaskNode::start(&redis, "tasks-a", &node_args);
    let b = TaskNode::start(&redis, "tasks-b", &node_args);
    let mut c = d.connect();
    let to: Vec<String> = (0..8).map(|i| format!("user{i}@example.com")).collect();
    let lines: Vec<String> =
        to.iter().map(|t| format!(r#"{{"type":"email","to":"{t}","simulate_ms":0}}"#)).collect();
    // The limit is the queue's: a turn taken in Redis 2 s ahead holds every node back.
    let time: Vec<String> = redis.query(&["TIME"]);
    let redis_now_us = time[0].parse::<u64>().unwrap() * 1_000_000 + time[1].parse::<u64>().unwrap();
    let _: String = redis.query(&["SET", "{taskd}:rate:email", &(redis_now_us + 2_000_000).to_string()]);
    let held_from_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    send_until_done(&mut c, &lines, &to);
    let (from_a, from_b) = (a.outbox_lines(), b.outbox_lines());
    eprintln!("{} sent by tasks-a, {} by tasks-b", from_a.len(), from_b.len());
    let sent = [from_a, from_b].concat();
    let first = sent.iter().map(|l| l["sent_at_ms"].as_u64().unwrap()).min().unwrap();
    assert!(
        first >= held_from_ms + 1_500,
        "sent {} ms after the queue's turn was taken 2 s ahead",
        first - held_from_ms
    );
    assert_rate_bound(&sent, 2, lines.len());
}

#[test]
fn a_busy_or_failing_provider_is_tried_again_after_its_retry_after_then_done() {
    let script = json!({"+15551230429": [
        {"status": 429, "retry_after": "1", "body": "{\"message\":\"Too Many Requests\"}"},
        {"status": 500, "body": "down"},
        {}
    ]});
    let Some(provider) = Provider::start(script) else { return };
    let url = provider.url("AC1:tok@", "/sms");
    let d = Daemon::start(&["--sms-url", &url, "--sms-from", "+15005550006", "--retry-base-ms", "50"]);
    let mut c = d.connect();
    let accepted = c.submit(r#"{"type":"sms","to":"+15551230429","text":"code 42"}"#);
    let mut before = Vec::new();
    let done = c.final_reply(&accepted["task_id"], &mut before);
    assert_eq!(done["event"], "done", "{done} after {before:?}");
    assert_eq!(done["attempts"], 3, "{done}");
    assert!(done["result"].as_str().unwrap().starts_with("SM"), "{done}");
    let retrying: Vec<_> = before.iter().filter(|r| r["event"] == "retrying").collect();
    assert_eq!(retrying.len(), 2, "{before:?}");
    // The provider's Retry-After (1 s) is the wait, not the 50 ms back-off.
    assert_eq!(retrying[0]["in_ms"], 1000, "{before:?}");
    assert_eq!(retrying[0]["attempt"], 2, "{before:?}");
    assert!(retrying[0]["error"].as_str().unwrap().contains("HTTP 429"), "{before:?}");
    assert!(retrying[1]["error"].as_str().unwrap().contains("HTTP 500: down"), "{before:?}");
    // Retry 2 has no Retry-After: full jitter within min(cap, base * 2) = 100 ms.
    assert!(retrying[1]["in_ms"].as_u64().unwrap() <= 100, "full jitter within base * 2: {before:?}");
    let sent: Vec<_> =
        provider.requests().into_iter().filter(|r| r["body"].as_str().unwrap().contains("429")).collect();
    assert_eq!(sent.len(), 3, "three requests for three attempts");
}
