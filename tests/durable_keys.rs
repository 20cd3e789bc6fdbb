//! Deduplication and cancel of durable jobs (issue 19, points 4 and 5, with `--redis-url`),
//! against the real binary and a redis-server per test: a job's `key` is held in Redis across
//! web nodes, so the same key submitted from two nodes runs once and the second client gets
//! `duplicate` then the first's final line; a durable job that has not started (parked for
//! its `run_at`, or queued behind a busy pool) is cancelled in Redis and never runs.

mod common;

use common::durable::{Redis, TaskNode};
use common::{wait_for, Client, Daemon};
use serde_json::{json, Value};

fn web(redis: &Redis, node: &str, args: &[&str]) -> Daemon {
    let mut all = vec!["--redis-url", redis.url.as_str(), "--node-id", node];
    all.extend_from_slice(args);
    Daemon::start(&all)
}

fn outbox_of(node: &TaskNode, task_id: &Value) -> Vec<Value> {
    node.outbox_lines().into_iter().filter(|l| &l["task_id"] == task_id).collect()
}

fn stats(c: &mut Client) -> Value {
    c.send("stats");
    let s = c.recv();
    assert_eq!(s["event"], "stats", "{s}");
    s
}

#[test]
fn the_same_key_from_two_web_nodes_runs_once_and_the_second_client_gets_the_firsts_final_line() {
    let Some(redis) = Redis::start() else { return };
    // The web nodes run no job themselves: the task node's outbox is the one record of each run.
    let args = ["--task-worker-num", "0", "--dedup-ttl-ms", "2500"];
    let (one, two) = (web(&redis, "web-1", &args), web(&redis, "web-2", &args));
    let node = TaskNode::start(&redis, "n1", &["--task-worker-num", "2"]);
    let (mut a, mut b) = (one.connect(), two.connect());
    let job = r#"{"type":"email","to":"receipt@example.com","key":"order-42:receipt","simulate_ms":800}"#;
    let first = a.submit(job);
    let first_id = first["task_id"].clone();
    // The key is in Redis, in hex, naming the job that holds it.
    let key = format!("{{taskd}}:key:{}", hex(b"order-42:receipt"));
    let held: Option<String> = redis.query(&["GET", &key]);
    assert_eq!(held, Some(format!("h 0 web-1 {first_id}")));

    // From the other node, while the first waits or runs: not run; its client hears of the
    // first, then gets the first's final line (which only web-1 and Redis know).
    b.submit(job);
    assert_eq!(b.recv(), json!({"event": "duplicate", "task_id": first_id}));
    let done = a.final_reply(&first_id, &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(b.recv(), done, "the duplicate's client gets the first's final line");

    // Within dedup_ttl after it ended, on either node: the final line at once.
    for c in [&mut a, &mut b] {
        c.submit(job);
        assert_eq!(c.recv(), json!({"event": "duplicate", "task_id": first_id}));
        assert_eq!(c.recv(), done);
    }
    // Another key runs; the first key's job ran once, on one node, in one outbox.
    let other =
        b.submit(r#"{"type":"email","to":"receipt@example.com","key":"order-43:receipt","simulate_ms":0}"#);
    assert_eq!(b.final_reply(&other["task_id"], &mut Vec::new())["event"], "done");
    wait_for("the other job's outbox line", || {
        (!outbox_of(&node, &other["task_id"]).is_empty()).then_some(())
    });
    let outbox = node.outbox_lines();
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    assert_eq!(outbox_of(&node, &first_id).len(), 1, "{outbox:?}");
    assert_eq!(stats(&mut b)["duplicates"], 2);
    assert_eq!(stats(&mut a)["duplicates"], 1);

    // Past dedup_ttl the key is free again: a job with it runs, from the second node.
    let again = b.submit_until_not_duplicate(job, &done);
    assert_eq!(again.1["event"], "done", "{again:?}");
    assert_eq!(again.1["task_id"], again.0["task_id"]);
    let held: String = redis.query(&["GET", &key]);
    assert!(held.starts_with("e ") && held.contains(&format!(" web-2 {}\n", again.0["task_id"])), "{held}");
}

#[test]
fn a_duplicate_on_the_same_node_waits_for_the_first_and_a_scheduled_first_holds_its_key() {
    let Some(redis) = Redis::start() else { return };
    let daemon = web(&redis, "web-1", &["--task-worker-num", "1", "--dedup-ttl-ms", "60000"]);
    let (mut a, mut b) = (daemon.connect(), daemon.connect());
    // Scheduled ahead: the key is held from its `accepted`, while it waits in the delayed set.
    let job = r#"{"type":"sms","to":"+15550001111","key":"wake-up","run_in_ms":1500,"simulate_ms":0}"#;
    let first = a.submit(job);
    let first_id = first["task_id"].clone();
    let dup = b.submit(r#"{"type":"sms","to":"+15550001111","key":"wake-up","simulate_ms":0}"#);
    assert_ne!(dup["task_id"], first_id);
    assert_eq!(b.recv(), json!({"event": "duplicate", "task_id": first_id}));
    let done = a.final_reply(&first_id, &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(b.recv(), done);
    let outbox = daemon.outbox_lines();
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    // A value in the key that taskd did not write is input, not trusted: taken over.
    let key = format!("{{taskd}}:key:{}", hex(b"forged"));
    let _: () =
        redis.query(&["SET", &key, "e 99999999999999 web-1 7\n{\"event\":\"done\"}\n{\"event\":\"forged\"}"]);
    let own = a.submit(r#"{"type":"sms","to":"+15550002222","key":"forged","simulate_ms":0}"#);
    assert_eq!(a.final_reply(&own["task_id"], &mut Vec::new())["event"], "done");
    // So is a key of another type.
    let key = format!("{{taskd}}:key:{}", hex(b"a-hash"));
    let _: () = redis.query(&["HSET", &key, "x", "y"]);
    let own = a.submit(r#"{"type":"sms","to":"+15550002223","key":"a-hash","simulate_ms":0}"#);
    assert_eq!(a.final_reply(&own["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn a_durable_job_not_started_is_cancelled_in_redis_and_never_runs_and_a_running_one_cannot_be() {
    let Some(redis) = Redis::start() else { return };
    let daemon = web(&redis, "web-1", &["--task-worker-num", "1", "--dedup-ttl-ms", "60000"]);
    let mut c = daemon.connect();
    // Scheduled 3 s ahead: parked in the delayed set, taken out of it.
    let later = c.submit(r#"{"type":"email","to":"never@example.com","run_in_ms":3000,"simulate_ms":0}"#);
    let later_id = later["task_id"].clone();
    let member = format!("web-1:{later_id}");
    let parked: Option<String> = redis.query(&["ZSCORE", "{taskd}:delayed", &member]);
    assert!(parked.is_some());
    c.send(&format!(r#"{{"type":"cancel","task_id":{later_id}}}"#));
    assert_eq!(c.recv(), json!({"event": "cancelled", "task_id": later_id}));
    let parked: Option<String> = redis.query(&["ZSCORE", "{taskd}:delayed", &member]);
    assert_eq!(parked, None);
    let hash: i64 = redis.query(&["EXISTS", &format!("{{taskd}}:delayed:{member}")]);
    assert_eq!(hash, 0);
    // Marked for a minute, so that the same cancel asked again (by a new bridge) says so.
    let mark: Option<String> = redis.query(&["GET", &format!("{{taskd}}:cancelled:{member}")]);
    assert_eq!(mark.as_deref(), Some("scheduled"));

    // Queued: the only task process is busy with a long job; the one behind it waits in the
    // stream, never delivered.
    let long = c.submit(r#"{"type":"email","to":"long@example.com","simulate_ms":3000}"#);
    wait_for("the long job to be taken", || (redis.pending() == 1).then_some(()));
    let queued = c.submit(r#"{"type":"sms","to":"+15550000001","key":"queued-key","simulate_ms":0}"#);
    assert_eq!(redis.xlen("{taskd}:jobs"), 2);
    // Another connection may not cancel it.
    let mut other = daemon.connect();
    other.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, queued["task_id"]));
    let refused = other.recv();
    assert!(refused["error"].as_str().unwrap().contains("not submitted by this connection"), "{refused}");
    // A running one cannot be cancelled: Redis says a task process took it.
    c.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, long["task_id"]));
    let running = c.recv();
    assert_eq!(running["event"], "error", "{running}");
    assert!(running["error"].as_str().unwrap().contains("has started"), "{running}");
    c.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, queued["task_id"]));
    let cancelled = json!({"event": "cancelled", "task_id": queued["task_id"]});
    assert_eq!(c.recv(), cancelled);
    assert_eq!(redis.xlen("{taskd}:jobs"), 1, "its entry is deleted from the stream");
    // A cancelled job never ran: as in memory, its key is free at once, and the same job sent
    // again with it runs (behind the long one).
    let again = c.submit(r#"{"type":"sms","to":"+15550000001","key":"queued-key","simulate_ms":0}"#);
    assert_ne!(again["task_id"], queued["task_id"]);
    let mut seen = Vec::new();
    let again_end = c.final_reply(&again["task_id"], &mut seen);
    assert_eq!(
        again_end["event"], "done",
        "not a duplicate of the cancelled job: {again_end} after {seen:?}"
    );
    assert!(seen.iter().all(|l| l["event"] != "duplicate"), "{seen:?}");
    let done = match seen.iter().find(|l| l["task_id"] == long["task_id"]) {
        Some(line) => line.clone(),
        None => c.final_reply(&long["task_id"], &mut Vec::new()),
    };
    assert_eq!(done["event"], "done", "{done}");
    // Ended: cannot be cancelled; `result` tells a cancelled one.
    c.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, long["task_id"]));
    assert!(c.recv()["error"].as_str().unwrap().contains("has ended"));
    c.send(&format!(r#"{{"type":"result","task_id":{later_id}}}"#));
    assert_eq!(c.recv()["event"], "cancelled");

    // Past the scheduled job's time, with a job sent after it done: neither cancelled job ran.
    let after = c.submit(r#"{"type":"sms","to":"+15550000002","run_in_ms":3100,"simulate_ms":0}"#);
    assert_eq!(c.final_reply(&after["task_id"], &mut Vec::new())["event"], "done");
    let outbox = daemon.outbox_lines();
    let ids: Vec<&Value> = outbox.iter().map(|l| &l["task_id"]).collect();
    assert_eq!(ids, [&long["task_id"], &again["task_id"], &after["task_id"]], "{outbox:?}");
    assert_eq!(stats(&mut c)["tasks_cancelled"], 2);
    assert!(
        c.try_recv(std::time::Duration::from_millis(300)).is_none(),
        "nothing more for the cancelled jobs"
    );
}

#[test]
fn a_duplicate_still_waiting_when_its_node_stops_gets_a_final_line() {
    let Some(redis) = Redis::start() else { return };
    let args = ["--task-worker-num", "1", "--max-wait-time", "1"];
    let (one, mut two) = (web(&redis, "web-1", &args), web(&redis, "web-2", &args));
    let (mut a, mut b) = (one.connect(), two.connect());
    let job = r#"{"type":"sms","to":"+15550007777","key":"far-ahead","run_in_ms":600000}"#;
    let first = a.submit(job);
    b.submit(job);
    assert_eq!(b.recv(), json!({"event": "duplicate", "task_id": first["task_id"]}));
    assert_eq!(stats(&mut b)["durable"]["duplicates_waiting"], 1);
    two.signal(nix::sys::signal::Signal::SIGTERM);
    let last = b.recv();
    assert_eq!(last["event"], "failed", "{last}");
    assert!(last["error"].as_str().unwrap().contains("server stopping"), "{last}");
    assert!(two.wait_exit(std::time::Duration::from_secs(20)).is_some_and(|s| s.success()));
    // The first still holds its key, and waits in Redis.
    let key = format!("{{taskd}}:key:{}", hex(b"far-ahead"));
    let held: Option<String> = redis.query(&["GET", &key]);
    assert_eq!(held, Some(format!("h 0 web-1 {}", first["task_id"])));
}

#[test]
fn the_operator_cancels_a_durable_job_with_taskd_cancel() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("taskd.pid");
    let pid_arg = pid_file.to_str().unwrap();
    let daemon = web(&redis, "web-1", &["--task-worker-num", "1", "--pid-file", pid_arg]);
    let mut c = daemon.connect();
    let job = c.submit(r#"{"type":"email","to":"later@example.com","run_in_ms":60000,"key":"op-key"}"#);
    let id = job["task_id"].as_u64().unwrap();
    let run = || {
        common::run_with_timeout(
            std::process::Command::new(env!("CARGO_BIN_EXE_taskd")).args([
                "cancel",
                &id.to_string(),
                "--pid-file",
                pid_arg,
            ]),
            common::DEADLINE,
        )
    };
    let out = run();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("cancelled"), "{out:?}");
    // Its own client gets its final line; the job is gone from Redis.
    assert_eq!(c.recv(), json!({"event": "cancelled", "task_id": id}));
    let zcard: i64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
    assert_eq!(zcard, 0);
    let again = run();
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("has ended"), "{again:?}");
}

/// A handler that always asks for a retry later.
const BUSY: &str = r#"
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    print(json.dumps({"task_id": msg["task_id"], "error": "busy, try later", "retry": True}), flush=True)
"#;

#[test]
fn a_durable_job_waiting_in_redis_for_a_delivery_retry_is_cancelled_there() {
    let Some(redis) = Redis::start() else { return };
    if common::which("python3").is_none() {
        common::cannot_run("python", "python3 is not installed: this test runs a Python handler");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.py");
    std::fs::write(&path, BUSY).unwrap();
    let spec = format!("busy=python3 {}", path.display());
    let slow_retry = ["--retry-base-ms", "60000", "--retry-cap-ms", "60000"];
    let mut args = vec!["--task-worker-num", "1", "--handler", spec.as_str()];
    args.extend_from_slice(&slow_retry);
    let daemon = web(&redis, "web-1", &args);
    let mut c = daemon.connect();
    let accepted = c.submit(r#"{"type":"busy","n":1}"#);
    let id = accepted["task_id"].clone();
    assert_eq!(c.recv()["event"], "retrying");
    // Parked in the delayed set under its bare task id (as a retry is), its fields in a hash.
    let member = id.to_string();
    wait_for("the job to wait for its retry in Redis", || {
        let at: Option<String> = redis.query(&["ZSCORE", "{taskd}:delayed", &member]);
        at.map(|_| ())
    });
    c.send(&format!(r#"{{"type":"cancel","task_id":{id}}}"#));
    assert_eq!(c.recv(), json!({"event": "cancelled", "task_id": id}));
    let zcard: i64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
    let hash: i64 = redis.query(&["EXISTS", &format!("{{taskd}}:delayed:{member}")]);
    assert_eq!((zcard, hash), (0, 0));
    c.send(&format!(r#"{{"type":"result","task_id":{id}}}"#));
    assert_eq!(c.recv()["event"], "cancelled");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_key_value_that_taskd_does_not_read_is_taken_over_not_left_to_block_the_key() {
    let Some(redis) = Redis::start() else { return };
    let daemon = web(&redis, "web-1", &["--task-worker-num", "1"]);
    let mut c = daemon.connect();
    let long_node = "n".repeat(65);
    // Each shaped like taskd's, but not one taskd reads (the bridge would tell the client
    // "held by a value taskd does not read", for as long as the forger liked).
    let forged = [
        "e 99999999999999 web-1 7\nnot json\n".to_string(),
        "e 99999999999999 web-1 7\n[1]\n".to_string(),
        "h 0 web-1 99999999999999999999999".to_string(),
        format!("h 0 {long_node} 7"),
    ];
    for (i, value) in forged.iter().enumerate() {
        let name = format!("forged-{i}");
        let _: () = redis.query(&["SET", &format!("{{taskd}}:key:{}", hex(name.as_bytes())), value]);
        let job = json!({"type": "sms", "to": "+15550003333", "key": name, "simulate_ms": 0}).to_string();
        let own = c.submit(&job);
        let end = c.final_reply(&own["task_id"], &mut Vec::new());
        assert_eq!(end["event"], "done", "{value:?}: {end}");
    }
}

#[test]
fn a_key_value_in_taskds_format_without_an_expiry_does_not_hold_the_key_for_ever() {
    let Some(redis) = Redis::start() else { return };
    let daemon = web(&redis, "web-1", &["--task-worker-num", "1"]);
    let mut c = daemon.connect();
    // Exactly as taskd writes them, naming jobs that no node will ever end, but with no
    // expiry (taskd sets one on every value): they would hold their key for ever.
    let forged = ["h 0 web-9 123", "e 99999999999999 web-9 5\n{\"event\":\"done\",\"task_id\":5}\n"];
    for (i, value) in forged.iter().enumerate() {
        let name = format!("persistent-{i}");
        let key = format!("{{taskd}}:key:{}", hex(name.as_bytes()));
        let _: () = redis.query(&["SET", &key, value]);
        let job = json!({"type": "sms", "to": "+15550003333", "key": name, "simulate_ms": 0}).to_string();
        let own = c.submit(&job);
        let end = c.final_reply(&own["task_id"], &mut Vec::new());
        assert_eq!(end["event"], "done", "{value:?}: {end}");
        let ttl: i64 = redis.query(&["PTTL", &key]);
        assert!(ttl > 0, "taken over with taskd's expiry: {ttl}");
    }
    // The same value with an expiry is a job that holds the key: the next is its duplicate.
    let key = format!("{{taskd}}:key:{}", hex(b"expiring"));
    let _: () = redis.query(&["SET", &key, forged[0], "PX", "600000"]);
    let job = json!({"type": "sms", "to": "+15550003333", "key": "expiring", "simulate_ms": 0}).to_string();
    c.submit(&job);
    let dup = c.recv();
    assert_eq!((&dup["event"], dup["task_id"].as_u64()), (&"duplicate".into(), Some(123)), "{dup}");
}

/// Jobs of web-1 still in the job stream.
fn queued_of_web_1(redis: &Redis) -> i64 {
    const COUNT: &str = "local n = 0
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  for i = 1, #e[2], 2 do if e[2][i] == 'o' and e[2][i + 1] == 'web-1' then n = n + 1 end end
end
return n";
    redis.query(&["EVAL", COUNT, "1", "{taskd}:jobs"])
}

#[test]
fn cancels_looking_through_a_long_queue_do_not_hold_other_clients_jobs_back() {
    let Some(redis) = Redis::start() else { return };
    // No task process anywhere: what is queued stays queued.
    let daemon = web(&redis, "web-1", &["--task-worker-num", "0"]);
    const FILL: &str = "for i = 1, 30000 do
  redis.call('XADD', KEYS[1], '*', 'o', 'other', 't', tostring(i), 's', '0', 'w', '0', 'd', '{}')
end
return 1";
    let _: i64 = redis.query(&["EVAL", FILL, "1", "{taskd}:jobs"]);
    let (mut a, mut b) = (daemon.connect(), daemon.connect());
    // Queued behind 30,000 others: each cancel looks through them all.
    let ids: Vec<Value> = (0..6)
        .map(|i| {
            a.submit(&format!(r#"{{"type":"sms","to":"+1555000{i:04}","simulate_ms":0}}"#))["task_id"].clone()
        })
        .collect();
    for id in &ids {
        a.send(&format!(r#"{{"type":"cancel","task_id":{id}}}"#));
    }
    // Once the first is answered, another client's job is accepted while the others go on,
    // not after them all.
    let mut answers = vec![a.recv()];
    b.submit(r#"{"type":"sms","to":"+15559999999","simulate_ms":0}"#);
    let left = queued_of_web_1(&redis);
    assert!(left > 1, "every cancel was carried out before another client's job was stored ({left} left)");
    answers.extend((1..ids.len()).map(|_| a.recv()));
    answers.sort_by_key(|l| l["task_id"].as_u64());
    for (line, id) in answers.iter().zip(&ids) {
        assert_eq!(line, &json!({"event": "cancelled", "task_id": id}));
    }
    assert_eq!(queued_of_web_1(&redis), 1, "only the other client's job is left");
}
