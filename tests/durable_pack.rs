//! Packs end to end (`--durable-pack`): a web node writes the common jobs of a store round as
//! one entry of `{taskd}:jobs!p`, task processes of any node run them; what the other durable
//! tests promise (every accepted job answered once, none lost when a process dies, a job not
//! started can be cancelled) holds for packed jobs too.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::durable::{Redis, TaskNode};
use common::{in_nanosleep, wait_for, Client, Daemon};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const PACKS: &str = "{taskd}:jobs!p";

fn web(redis: &Redis, node: &str, args: &[&str]) -> Daemon {
    let mut all = vec!["--redis-url", redis.url.as_str(), "--node-id", node];
    all.extend_from_slice(args);
    Daemon::start(&all)
}

fn job(i: usize, simulate_ms: u64) -> String {
    format!(r#"{{"type":"email","to":"user{i}@example.com","simulate_ms":{simulate_ms}}}"#)
}

/// Sends every line in one write: they reach the node together, and are stored together.
fn send_all(c: &mut Client, lines: &[String]) {
    let mut bytes = lines.join("\n");
    bytes.push('\n');
    c.send_raw(bytes.as_bytes());
}

/// Reads until `n` jobs were accepted and each of them has its final line: the task ids in
/// the order accepted, and the final lines by task id (one each, or the test fails).
fn accepted_and_finals(c: &mut Client, n: usize) -> (Vec<u64>, HashMap<u64, Value>) {
    let mut ids = Vec::new();
    let mut finals: HashMap<u64, Value> = HashMap::new();
    while ids.len() < n || finals.len() < n {
        let v = c.recv();
        let id = v["task_id"].as_u64().unwrap_or_else(|| panic!("a line without task_id: {v}"));
        match v["event"].as_str() {
            Some("accepted") => ids.push(id),
            Some("done" | "failed") => {
                assert!(finals.insert(id, v.clone()).is_none(), "a second final line for task {id}: {v}");
            }
            _ => panic!("unexpected line: {v}"),
        }
    }
    (ids, finals)
}

/// A field of `XINFO STREAM key` (RESP2: names and values in turn).
fn stream_info(redis: &Redis, key: &str, field: &str) -> i64 {
    let v: redis::Value = redis.query(&["XINFO", "STREAM", key]);
    let redis::Value::Array(items) = v else { panic!("XINFO STREAM {key}: {v:?}") };
    for pair in items.chunks(2) {
        if let [redis::Value::BulkString(name), value] = pair {
            if name == field.as_bytes() {
                return match value {
                    redis::Value::Int(n) => *n,
                    other => panic!("{field} of {key}: {other:?}"),
                };
            }
        }
    }
    panic!("no {field} in XINFO STREAM {key}")
}

/// Entries of the pack stream delivered and not acknowledged.
fn packs_pending(redis: &Redis) -> i64 {
    let v: redis::Value = redis.query(&["XPENDING", PACKS, "taskd"]);
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

/// Outbox lines (one per run that finished) by task id.
fn runs_by_task(lines: Vec<Value>) -> HashMap<u64, usize> {
    let mut by = HashMap::new();
    for line in lines {
        *by.entry(line["task_id"].as_u64().expect("task_id")).or_default() += 1;
    }
    by
}

#[test]
fn jobs_pipelined_on_many_connections_are_packed_and_each_runs_once() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--durable-pack", "--task-worker-num", "2"]);
    let (conns, per) = (4, 100);
    let mut clients: Vec<Client> = (0..conns).map(|_| d.connect()).collect();
    for (k, c) in clients.iter_mut().enumerate() {
        let lines: Vec<String> = (0..per).map(|i| job(k * per + i, 0)).collect();
        send_all(c, &lines);
    }
    let mut all = Vec::new();
    for c in &mut clients {
        let (ids, finals) = accepted_and_finals(c, per);
        for id in &ids {
            assert_eq!(finals[id]["event"], "done", "{}", finals[id]);
            assert_eq!(finals[id]["attempts"], 1, "{}", finals[id]);
        }
        all.extend(ids);
    }
    let runs = runs_by_task(d.outbox_lines());
    for id in &all {
        assert_eq!(runs.get(id), Some(&1), "task {id} ran once");
    }
    assert_eq!(runs.len(), conns * per, "no other job ran");
    // They went as packs: fewer pack entries than jobs, and not every job as an entry of its own.
    let packs = stream_info(&redis, PACKS, "entries-added");
    let plain = stream_info(&redis, "{taskd}:jobs", "entries-added");
    assert!(packs > 0 && (packs as usize) < conns * per, "{packs} packs");
    assert!((plain as usize) < conns * per, "{plain} plain entries");
    wait_for("every pack to be acknowledged", || (packs_pending(&redis) == 0).then_some(()));
    assert!(!d.log().contains(" ERROR "), "{}", d.log());
}

#[test]
fn a_task_node_without_packs_runs_the_packs_a_web_node_with_them_writes() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--durable-pack", "--task-worker-num", "0"]);
    let node = TaskNode::start(&redis, "b", &["--task-worker-num", "2"]);
    let mut c = d.connect();
    let lines: Vec<String> = (0..50).map(|i| job(i, 0)).collect();
    send_all(&mut c, &lines);
    let (ids, finals) = accepted_and_finals(&mut c, 50);
    assert!(ids.iter().all(|id| finals[id]["event"] == "done"), "{finals:?}");
    let runs = runs_by_task(node.outbox_lines());
    assert!(ids.iter().all(|id| runs.get(id) == Some(&1)), "{runs:?}");
    assert!(stream_info(&redis, PACKS, "entries-added") > 0, "the web node wrote packs");
}

#[test]
fn a_task_process_killed_inside_a_pack_loses_none_of_its_jobs() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--durable-pack", "--task-worker-num", "0"]);
    let node = TaskNode::start(&redis, "a", &["--task-worker-num", "1"]);
    wait_for("node a's task process", || (node.task_pids().len() == 1).then_some(()));
    let victim = node.task_pids()[0];
    let mut c = d.connect();
    // Quick jobs around a slow one, in one write: stored in one round, packed together.
    let lines: Vec<String> = (0..11).map(|i| job(i, if i == 5 { 3000 } else { 0 })).collect();
    send_all(&mut c, &lines);
    // (The quick jobs before it may have taken a millisecond on a slow box: then the rest of
    // the pack, the slow job among them, went back to the main stream, and it runs from there.)
    wait_for("the task process to sleep in the slow job", || {
        (packs_pending(&redis) + redis.pending() as i64 >= 1 && in_nanosleep(victim)).then_some(())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let (ids, finals) = accepted_and_finals(&mut c, 11);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(finals[id]["event"], "done", "no job fails because its process died: {}", finals[id]);
        // The jobs before the slow one may have been written by the victim (a round of their
        // own, or a flush of theirs); the slow job and those after it ran after its death.
        if i >= 5 {
            assert_ne!(finals[id]["task_pid"].as_u64(), Some(u64::from(victim)), "{}", finals[id]);
        }
    }
    // The slow job's run died with its process: it ran again as its own entry, its attempt
    // counting the death; the jobs run before it, if they were not written yet, ran again.
    let slow = ids[5];
    assert_eq!(finals[&slow]["attempts"], 2, "{}", finals[&slow]);
    let runs = runs_by_task(node.outbox_lines());
    assert!(ids.iter().all(|id| runs.get(id) == Some(&1)), "each job finished once: {runs:?}");
    wait_for("the pack to be acknowledged", || (packs_pending(&redis) == 0).then_some(()));
    assert!(c.try_recv(Duration::from_millis(300)).is_none(), "one reply per job");
}

#[test]
fn a_packed_job_not_started_is_cancelled_and_the_rest_of_its_pack_runs() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--durable-pack", "--task-worker-num", "0"]);
    let mut c = d.connect();
    let lines: Vec<String> = (0..6).map(|i| job(i, 0)).collect();
    send_all(&mut c, &lines);
    let ids: Vec<u64> = (0..6).map(|_| c.recv()).map(|v| v["task_id"].as_u64().expect("accepted")).collect();
    // A job that is in a pack (a round may have stored one of them alone, as a plain entry).
    let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis.query(&["XRANGE", PACKS, "-", "+"]);
    let packed: Vec<u64> = entries
        .iter()
        .flat_map(|(_, fields)| {
            let (jobs, damage) = taskd::durable::pack::jobs(&fields["p"]);
            assert_eq!(damage, None);
            jobs.into_iter()
                .map(|f| f.iter().find(|(n, _)| *n == b"t").map(|(_, v)| v.to_vec()).expect("t"))
                .map(|t| String::from_utf8(t).unwrap().parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(packed.len() >= 2, "{packed:?}");
    let victim = packed[1];
    c.send(&format!(r#"{{"type":"cancel","task_id":{victim}}}"#));
    assert_eq!(c.recv(), json!({"event": "cancelled", "task_id": victim}));
    // The others run, the cancelled one never does.
    let node = TaskNode::start(&redis, "a", &["--task-worker-num", "1"]);
    let mut finals = HashMap::new();
    while finals.len() < 5 {
        let v = c.recv();
        assert!(v["event"] == "done", "{v}");
        finals.insert(v["task_id"].as_u64().unwrap(), v);
    }
    assert!(!finals.contains_key(&victim));
    assert!(ids.iter().filter(|id| **id != victim).all(|id| finals.contains_key(id)), "{finals:?}");
    let runs = runs_by_task(node.outbox_lines());
    assert_eq!(runs.get(&victim), None, "the cancelled job never ran");
    assert_eq!(runs.len(), 5);
    // Asked again: it has ended (cancelled), as a plain entry's.
    c.send(&format!(r#"{{"type":"cancel","task_id":{victim}}}"#));
    let again = c.recv();
    assert_eq!(again["event"], "error", "{again}");
    assert!(again["error"].as_str().unwrap().contains("has ended"), "{again}");
}

#[test]
fn stats_count_the_jobs_of_packs_waiting_in_redis() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--durable-pack", "--task-worker-num", "0"]);
    let mut c = d.connect();
    let lines: Vec<String> = (0..20).map(|i| job(i, 0)).collect();
    send_all(&mut c, &lines);
    for _ in 0..20 {
        assert_eq!(c.recv()["event"], "accepted");
    }
    assert!(redis.xlen(PACKS) >= 1 && redis.xlen(PACKS) < 20, "packed");
    let mut asker = d.connect();
    let durable = wait_for("stats to count the 20 jobs waiting in packs", || {
        asker.send("stats");
        let s = asker.recv();
        assert_eq!(s["event"], "stats", "{s}");
        (s["durable"]["jobs"] == 20).then(|| s["durable"].clone())
    });
    assert_eq!(durable["by_priority"], json!({"high": 0, "normal": 20, "low": 0}), "{durable}");
}
