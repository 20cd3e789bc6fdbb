//! Delivery retries (issue 17, memory mode): a transient failure (here a handler's
//! `"retry":true`) parks the job in the master's delayed queue, tells its client `retrying`,
//! and runs it again after a back-off with full jitter, up to `delivery_retry_max`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Client, Daemon};
use nix::sys::signal::Signal;
use serde_json::Value;

/// `flaky N`: retry:true on attempts 1..=N; `until-file P`: retry:true until P exists;
/// `touch P`: creates P; `fail`: retry:false.
const HANDLER: &str = r#"
import json, os, sys
for line in sys.stdin:
    msg = json.loads(line)
    tid, job, attempt = msg["task_id"], msg["job"], msg["attempt"]
    what = job.get("do", "echo")
    if what == "flaky" and attempt <= job["n"]:
        print(json.dumps({"task_id": tid, "error": "busy, try later", "retry": True}), flush=True)
        continue
    if what == "until-file" and not os.path.exists(job["path"]):
        print(json.dumps({"task_id": tid, "error": "not yet", "retry": True}), flush=True)
        continue
    if what == "touch":
        open(job["path"], "w").close()
    if what == "fail":
        print(json.dumps({"task_id": tid, "error": "bad input", "retry": False}), flush=True)
        continue
    print(json.dumps({"task_id": tid, "result": {"attempt": attempt}}), flush=True)
"#;

struct Handler {
    dir: tempfile::TempDir,
    path: PathBuf,
}

fn handler() -> Option<Handler> {
    if common::which("python3").is_none() {
        common::cannot_run("python", "python3 is not installed: the retry tests run a Python handler");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("flaky.py");
    std::fs::write(&path, HANDLER).unwrap();
    Some(Handler { dir, path })
}

fn start(h: &Handler, extra: &[&str]) -> Daemon {
    let spec = format!("flaky=python3 {}", h.path.display());
    let mut args = vec!["--worker-num", "1", "--task-worker-num", "1", "--handler", &spec];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

/// Submits `line`; returns its final line and the lines before it.
fn run(client: &mut Client, line: &str) -> (Value, Vec<Value>) {
    let accepted = client.submit(line);
    let mut others = Vec::new();
    let last = client.final_reply(&accepted["task_id"], &mut others);
    (last, others)
}

const QUICK: [&str; 4] = ["--retry-base-ms", "20", "--retry-cap-ms", "50"];

#[test]
fn a_transient_failure_is_retried_after_a_back_off_and_the_client_sees_each_retry() {
    let Some(h) = handler() else { return };
    let daemon = start(&h, &QUICK);
    let mut client = daemon.connect();
    let (done, before) = run(&mut client, r#"{"type":"flaky","do":"flaky","n":2}"#);
    assert_eq!((&done["event"], done["attempts"].as_u64()), (&"done".into(), Some(3)), "{done}");
    // The handler saw every run's number.
    assert_eq!(done["result"]["attempt"], 3, "{done}");
    assert_eq!(before.len(), 2, "{before:?}");
    for (k, line) in before.iter().enumerate() {
        assert_eq!(line["event"], "retrying", "{line}");
        assert_eq!(line["task_id"], done["task_id"], "{line}");
        assert_eq!(line["attempt"].as_u64(), Some(k as u64 + 2), "the run to come: {line}");
        assert!(line["in_ms"].as_u64().is_some_and(|ms| ms <= 50), "within retry_cap_ms: {line}");
        assert_eq!(line["error"], "handler: busy, try later", "{line}");
    }
    // The handler kept running: one handler, no task process died.
    let log = daemon.log();
    assert_eq!(log.matches("handler flaky started").count(), 1, "{log}");
    client.send("stats");
    let stats = client.recv();
    assert_eq!((stats["retries"].as_u64(), stats["delayed"].as_u64()), (Some(2), Some(0)), "{stats}");
    assert_eq!(
        (stats["task_crashes"].as_u64(), stats["tasks_retried"].as_u64()),
        (Some(0), Some(0)),
        "{stats}"
    );
    assert_eq!((stats["tasks_done"].as_u64(), stats["tasking_num"].as_u64()), (Some(1), Some(0)), "{stats}");
}

#[test]
fn past_delivery_retry_max_the_job_fails_with_the_error_and_retry_false_fails_at_once() {
    let Some(h) = handler() else { return };
    let daemon = start(&h, &[QUICK.as_slice(), &["--delivery-retry-max", "2"]].concat());
    let mut client = daemon.connect();
    let (failed, before) = run(&mut client, r#"{"type":"flaky","do":"flaky","n":99}"#);
    assert_eq!((&failed["event"], failed["attempts"].as_u64()), (&"failed".into(), Some(3)), "{failed}");
    assert_eq!(failed["error"], "handler: busy, try later", "{failed}");
    assert_eq!(before.iter().filter(|l| l["event"] == "retrying").count(), 2, "{before:?}");

    let (failed, before) = run(&mut client, r#"{"type":"flaky","do":"fail"}"#);
    assert_eq!((&failed["event"], failed["attempts"].as_u64()), (&"failed".into(), Some(1)), "{failed}");
    assert_eq!(failed["error"], "handler: bad input", "{failed}");
    assert!(before.is_empty(), "no retrying line for a permanent failure: {before:?}");
}

#[test]
fn a_job_waiting_for_its_retry_holds_no_task_process() {
    let Some(h) = handler() else { return };
    // One task process: the first job can only succeed once the second has run in it.
    let daemon =
        start(&h, &["--retry-base-ms", "20", "--retry-cap-ms", "200", "--delivery-retry-max", "100"]);
    let marker = h.dir.path().join("marker");
    let marker = marker.display();
    let mut client = daemon.connect();
    let first = client.submit(&format!(r#"{{"type":"flaky","do":"until-file","path":"{marker}"}}"#));
    let retrying = client.recv();
    assert_eq!(
        (&retrying["event"], &retrying["task_id"]),
        (&"retrying".into(), &first["task_id"]),
        "{retrying}"
    );
    client.send(&format!(r#"{{"type":"flaky","do":"touch","path":"{marker}"}}"#));
    let mut order = Vec::new();
    while order.len() < 2 {
        let line = client.recv();
        if line["event"] == "done" || line["event"] == "failed" {
            order.push(line);
        }
    }
    assert_ne!(order[0]["task_id"], first["task_id"], "the second job ran while the first waited: {order:?}");
    assert_eq!((&order[1]["task_id"], &order[1]["event"]), (&first["task_id"], &"done".into()), "{order:?}");
}

#[test]
fn a_graceful_stop_answers_a_job_waiting_for_its_retry() {
    let Some(h) = handler() else { return };
    let mut daemon =
        start(&h, &["--retry-base-ms", "60000", "--retry-cap-ms", "60000", "--max-wait-time", "30"]);
    let mut client = daemon.connect();
    let accepted = client.submit(r#"{"type":"flaky","do":"flaky","n":99}"#);
    let retrying = client.recv();
    assert_eq!(retrying["event"], "retrying", "{retrying}");
    daemon.signal(Signal::SIGTERM);
    let failed = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(failed["event"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.starts_with("server stopping") && error.contains("busy, try later"), "{failed}");
    // It did not wait out the back-off, nor max_wait_time.
    let status = daemon.wait_exit(Duration::from_secs(15)).expect("the daemon stops without waiting");
    assert!(status.success(), "{status:?}");
}

// ---- the library's TaskFailure, through examples/task_api.rs: "not yet", and Redis ----

/// Reads lines until task `id`'s `done` or `failed`; returns it and the lines before it.
fn final_of(client: &mut Client, id: &Value) -> (Value, Vec<Value>) {
    let mut others = Vec::new();
    let last = client.final_reply(id, &mut others);
    (last, others)
}

fn api(extra: &[&str]) -> Daemon {
    let mut args = vec!["--worker-num", "1", "--task-worker-num", "1"];
    args.extend_from_slice(extra);
    Daemon::start_example("task_api", &args)
}

#[test]
fn a_task_told_not_yet_waits_in_the_delayed_queue_without_counting_an_attempt() {
    let daemon = api(&[]);
    let mut client = daemon.connect();
    client.send("to 0 notyet=200 hello");
    let accepted = client.recv();
    assert_eq!(accepted["event"], "accepted", "{accepted}");
    // While it waits, its task process is free for another job.
    client.send("to 0 quick");
    let second = client.recv();
    let (done, before) = final_of(&mut client, &second["task_id"]);
    assert_eq!(done["event"], "done", "{done}");
    assert!(before.is_empty(), "{before:?}");
    let (done, before) = final_of(&mut client, &accepted["task_id"]);
    assert_eq!((&done["event"], done["attempts"].as_u64()), (&"done".into(), Some(1)), "{done}");
    assert!(before.is_empty(), "no retrying line for a wait that is not a retry: {before:?}");
}

mod durable {
    use super::*;
    use common::durable::Redis;

    fn web(redis: &Redis, node: &str, extra: &[&str]) -> Daemon {
        let mut args = vec!["--redis-url", redis.url.as_str(), "--node-id", node];
        args.extend_from_slice(extra);
        api(&args)
    }

    #[test]
    fn a_transient_failure_is_retried_through_the_delayed_set_in_redis() {
        let Some(redis) = Redis::start() else { return };
        let daemon = web(&redis, "web-1", &["--retry-base-ms", "20", "--retry-cap-ms", "50"]);
        let mut client = daemon.connect();
        client.send("cb flaky=2 hello");
        let accepted = client.recv();
        assert_eq!(accepted["event"], "accepted", "{accepted}");
        let mut before = Vec::new();
        let last = loop {
            let line = client.recv();
            if line["event"] == "callback" || line["event"] == "done" {
                break line;
            }
            before.push(line);
        };
        assert!(last["result"].as_str().unwrap().contains("FLAKY=2 HELLO"), "{last}");
        assert_eq!(last["attempts"].as_u64(), Some(3), "{last}");
        assert_eq!(before.len(), 2, "{before:?}");
        for (k, line) in before.iter().enumerate() {
            assert_eq!(
                (&line["event"], &line["task_id"]),
                (&"retrying".into(), &accepted["task_id"]),
                "{line}"
            );
            assert_eq!(line["attempt"].as_u64(), Some(k as u64 + 2), "{line}");
            assert!(line["error"].as_str().unwrap().contains("was asked to fail"), "{line}");
        }
        // Nothing is left behind in Redis.
        common::wait_for("the delayed set and the job stream to empty", || {
            let delayed: u64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
            (delayed == 0 && redis.xlen("{taskd}:jobs") == 0 && redis.pending() == 0).then_some(())
        });
        let keys: Vec<String> = redis.query(&["KEYS", "{taskd}:delayed*"]);
        assert!(keys.is_empty(), "{keys:?}");

        // "Not yet" waits in Redis too, without counting an attempt or telling the client.
        client.send("cb notyet=100 later");
        let accepted = client.recv();
        let last = client.recv();
        assert_eq!((&last["event"], last["attempts"].as_u64()), (&"callback".into(), Some(1)), "{last}");
        assert_eq!(last["task_id"], accepted["task_id"], "{last}");
    }

    #[test]
    fn a_job_waiting_in_redis_for_its_retry_survives_a_restart_of_the_daemon() {
        let Some(redis) = Redis::start() else { return };
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        let quick = ["--retry-base-ms", "300", "--retry-cap-ms", "300"];
        let daemon = web(&redis, "web-1", &quick);
        let mut client = daemon.connect();
        client.send(&format!("cb until={}", marker.display()));
        let accepted = client.recv();
        let id = accepted["task_id"].as_u64().expect("task_id");
        let retrying = client.recv();
        assert_eq!(retrying["event"], "retrying", "{retrying}");
        common::wait_for("the job to wait in the delayed set", || {
            let delayed: u64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
            (delayed == 1).then_some(())
        });
        kill(&daemon);
        drop(client);
        drop(daemon);
        let daemon = web(&redis, "web-1", &quick);
        let mut client = daemon.connect();
        // The restarted node took the job back from Redis: it knows it is not finished.
        client.send(&format!("result {id}"));
        let running = client.recv();
        assert_eq!(
            (&running["event"], running["task_id"].as_u64()),
            (&"running".into(), Some(id)),
            "{running}"
        );
        std::fs::write(&marker, b"").unwrap();
        let done = common::wait_for("the job to finish after the restart", || {
            client.send(&format!("result {id}"));
            let line = client.recv();
            (line["event"] == "done").then_some(line)
        });
        assert!(done["attempts"].as_u64().is_some_and(|a| a >= 2), "{done}");
    }

    /// Submits `cb until=MARKER` and waits until it is parked in the delayed set for its retry:
    /// its accepted line, and its member there (its task id).
    fn parked_until(redis: &Redis, client: &mut Client, marker: &std::path::Path) -> (Value, String) {
        client.send(&format!("cb until={}", marker.display()));
        let accepted = client.recv();
        assert_eq!(accepted["event"], "accepted", "{accepted}");
        let retrying = client.recv();
        assert_eq!(retrying["event"], "retrying", "{retrying}");
        let member = accepted["task_id"].as_u64().expect("task_id").to_string();
        common::wait_for("the job to wait in the delayed set", || {
            let score: Option<f64> = redis.query(&["ZSCORE", "{taskd}:delayed", &member]);
            score.map(|_| ())
        });
        (accepted, member)
    }

    /// The next `callback` line (the job's final line in this example).
    fn callback(client: &mut Client) -> Value {
        loop {
            let line = client.recv();
            if line["event"] == "callback" || line["event"] == "failed" {
                return line;
            }
            assert_eq!(line["event"], "retrying", "{line}");
        }
    }

    #[test]
    fn a_job_whose_stream_is_made_a_string_while_it_waits_for_its_retry_waits_for_it_and_then_runs() {
        let Some(redis) = Redis::start() else { return };
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        let daemon = web(&redis, "web-1", &["--retry-base-ms", "300", "--retry-cap-ms", "300"]);
        let mut client = daemon.connect();
        let (accepted, member) = parked_until(&redis, &mut client, &marker);
        // Written by someone else while the job waits: its stream (the main one) is a string.
        let _: i64 = redis.query(&["DEL", "{taskd}:jobs"]);
        let _: () = redis.query(&["SET", "{taskd}:jobs", "not a stream"]);
        std::fs::write(&marker, b"").unwrap();
        // Due, it has nowhere to go: it stays in the set, due again a little later, with its
        // fields (the move of every other job goes on meanwhile).
        let first: f64 = redis.query(&["ZSCORE", "{taskd}:delayed", &member]);
        common::wait_for("the job to be put off while its stream is a string", || {
            let now: f64 = redis.query(&["ZSCORE", "{taskd}:delayed", &member]);
            (now > first).then_some(())
        });
        let fields: u64 = redis.query(&["HLEN", &format!("{{taskd}}:delayed:{member}")]);
        assert!(fields > 0, "its fields are kept");
        daemon.wait_log("{waiting} wait there".replace("{waiting}", "1").as_str());
        // Mended: it moves back into the stream and runs, once.
        let _: i64 = redis.query(&["DEL", "{taskd}:jobs"]);
        let last = callback(&mut client);
        assert_eq!((&last["event"], &last["task_id"]), (&"callback".into(), &accepted["task_id"]), "{last}");
        assert_eq!(last["attempts"].as_u64(), Some(2), "{last}");
        common::wait_for("the delayed set to empty", || {
            let delayed: u64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
            (delayed == 0).then_some(())
        });
    }

    #[test]
    fn a_parked_job_whose_lane_field_is_forged_comes_back_into_the_main_stream_and_runs() {
        let Some(redis) = Redis::start() else { return };
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        let daemon = web(&redis, "web-1", &["--retry-base-ms", "300", "--retry-cap-ms", "300"]);
        let mut client = daemon.connect();
        for forged in ["nowhere", "Nope", "x#high", "a:b"] {
            let _ = std::fs::remove_file(&marker);
            let (accepted, member) = parked_until(&redis, &mut client, &marker);
            // Written by someone else: the lane it goes back into names no stream anyone reads.
            let _: i64 = redis.query(&["HSET", &format!("{{taskd}}:delayed:{member}"), "ln", forged]);
            std::fs::write(&marker, b"").unwrap();
            let last = callback(&mut client);
            assert_eq!(
                (&last["event"], &last["task_id"]),
                (&"callback".into(), &accepted["task_id"]),
                "{last}"
            );
            let lanes: Vec<String> = redis.query(&["KEYS", "{taskd}:jobs:*"]);
            assert!(lanes.is_empty(), "{forged}: {lanes:?}");
        }
        daemon.wait_log("into the main stream: their lane field `ln` names no lane of taskd");
    }

    /// `kill -9` the master; waits until every process of the daemon is gone.
    fn kill(d: &Daemon) {
        let group: Vec<u32> =
            common::processes().into_iter().filter(|p| p.pgid == d.pid).map(|p| p.pid).collect();
        d.signal(Signal::SIGKILL);
        common::wait_for("the killed daemon's processes to be gone", || {
            common::reap_orphans(&group);
            group.iter().all(|&p| common::is_dead(p)).then_some(())
        });
    }
}
