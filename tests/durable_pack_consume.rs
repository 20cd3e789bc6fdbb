//! Packs (issue 21) from the consumer's side: packs written into the stream of packs
//! (`{taskd}:jobs!p`) by the test, as a bridge with `durable_pack` would write them, are run
//! by the task processes of a web node, job by job, each exactly once, and acknowledged; a
//! pack whose consumer dies is dissolved into plain entries and no job of it is lost.

mod common;

use std::collections::HashMap;

use common::durable::{Redis, TaskNode};
use common::{wait_for, Client, Daemon};
use nix::sys::signal::Signal;
use serde_json::Value;
use taskd::durable::pack::Pack;

const PACKS: &str = "{taskd}:jobs!p";

fn web(redis: &Redis, args: &[&str]) -> Daemon {
    let mut all = vec!["--redis-url", redis.url.as_str(), "--node-id", "web-1"];
    all.extend_from_slice(args);
    let d = Daemon::start(&all);
    d.wait_log("redis bridge: connected");
    d
}

fn email(task_id: u64, simulate_ms: u64) -> String {
    format!(r#"{{"type":"email","to":"user{task_id}@example.com","simulate_ms":{simulate_ms}}}"#)
}

/// Adds a pack of `jobs` (task id, data) of node web-1 to the stream of packs; its entry id.
fn add_pack(redis: &Redis, jobs: &[(u64, String)], tail: &[u8]) -> String {
    let mut pack = Pack::new();
    for (task_id, data) in jobs {
        pack.push("web-1", *task_id, 0, 0, b"", data.as_bytes());
    }
    let mut blob = pack.bytes().to_vec();
    blob.extend_from_slice(tail);
    let mut conn = redis.conn().expect("connect to redis");
    redis::cmd("XADD")
        .arg(PACKS)
        .arg("*")
        .arg("n")
        .arg(jobs.len())
        .arg("p")
        .arg(blob)
        .query(&mut conn)
        .expect("XADD a pack")
}

fn ask_result(c: &mut Client, id: u64) -> Value {
    c.send(&format!(r#"{{"type":"result","task_id":{id}}}"#));
    c.recv()
}

/// The final outcome of each of `ids`, as the node's `result` answers it, once all have one.
fn results(c: &mut Client, ids: &[u64]) -> HashMap<u64, Value> {
    wait_for("every job's outcome", || {
        let got: HashMap<u64, Value> = ids.iter().map(|&id| (id, ask_result(c, id))).collect();
        got.values().all(|v| v["event"] == "done" || v["event"] == "failed").then_some(got)
    })
}

/// The outbox's runs of each task.
fn runs(d: &Daemon) -> HashMap<u64, Vec<Value>> {
    let mut by: HashMap<u64, Vec<Value>> = HashMap::new();
    for line in d.outbox_lines() {
        by.entry(line["task_id"].as_u64().expect("task_id")).or_default().push(line);
    }
    by
}

/// Entries of `stream` taken and not acknowledged.
fn pending(redis: &Redis, stream: &str) -> i64 {
    let v: redis::Value = redis.query(&["XPENDING", stream, "taskd"]);
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

#[test]
fn packs_are_run_job_by_job_each_once_and_acknowledged() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "2"]);
    let ids: Vec<u64> = (100..124).collect();
    for chunk in ids.chunks(6) {
        let jobs: Vec<(u64, String)> = chunk.iter().map(|&id| (id, email(id, 0))).collect();
        add_pack(&redis, &jobs, b"");
    }
    let mut c = d.connect();
    let got = results(&mut c, &ids);
    let runs = runs(&d);
    for id in &ids {
        assert_eq!(got[id]["event"], "done", "{}", got[id]);
        let lines = runs.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(lines.len(), 1, "task {id} ran once: {lines:?}");
        assert_eq!(lines[0]["attempt"], 1, "{lines:?}");
    }
    assert_eq!(runs.len(), ids.len(), "no other job ran: {runs:?}");
    wait_for("every pack acknowledged and trimmed", || {
        (pending(&redis, PACKS) == 0 && redis.xlen(PACKS) == 0).then_some(())
    });
    assert!(!d.log().contains("died"), "{}", d.log());
}

/// Entries ever added to `stream` (XINFO STREAM's `entries-added`, Redis 7).
fn added_to(redis: &Redis, stream: &str) -> i64 {
    let v: redis::Value = redis.query(&["XINFO", "STREAM", stream]);
    let redis::Value::Array(fields) = v else { panic!("{v:?}") };
    let at = fields.iter().position(|f| matches!(f, redis::Value::BulkString(b) if b == b"entries-added"));
    match at.and_then(|i| fields.get(i + 1)) {
        Some(redis::Value::Int(n)) => *n,
        other => panic!("no entries-added: {other:?}"),
    }
}

#[test]
fn a_slow_job_of_a_pack_sends_the_rest_of_its_pack_back_to_the_main_stream_for_others() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "2"]);
    let ids = [500, 501, 502, 503];
    let jobs: Vec<(u64, String)> =
        ids.iter().map(|&id| (id, email(id, if id == 501 { 400 } else { 0 }))).collect();
    add_pack(&redis, &jobs, b"");
    let mut c = d.connect();
    let got = results(&mut c, &ids);
    let runs = runs(&d);
    for id in &ids {
        assert_eq!((&got[id]["event"], &got[id]["attempts"]), (&"done".into(), &1.into()), "{}", got[id]);
        assert_eq!(runs.get(id).map_or(0, Vec::len), 1, "task {id} ran once: {runs:?}");
    }
    // The slow job's outcome went out at once, with the two jobs after it back in the main
    // stream (and the first quick one too, if it took a millisecond or more).
    let dissolved = added_to(&redis, "{taskd}:jobs");
    assert!(dissolved == 2 || dissolved == 3, "{dissolved} jobs dissolved");
    wait_for("nothing left pending", || (pending(&redis, PACKS) == 0 && redis.pending() == 0).then_some(()));
}

#[test]
fn a_pack_of_more_jobs_than_the_window_of_a_consumer_of_slow_jobs_goes_back_to_the_main_stream() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "1"]);
    // Its consumer learns that its jobs are slow: a window of one job.
    let slow = email(700, 100);
    let _: String =
        redis.query(&["XADD", "{taskd}:jobs", "*", "o", "web-1", "t", "700", "s", "0", "w", "0", "d", &slow]);
    let mut c = d.connect();
    results(&mut c, &[700]);
    let ids = [701, 702, 703, 704];
    add_pack(&redis, &ids.iter().map(|&id| (id, email(id, 0))).collect::<Vec<_>>(), b"");
    let got = results(&mut c, &ids);
    let runs = runs(&d);
    for id in &ids {
        assert_eq!((&got[id]["event"], &got[id]["attempts"]), (&"done".into(), &1.into()), "{}", got[id]);
        assert_eq!(runs.get(id).map_or(0, Vec::len), 1, "task {id} ran once: {runs:?}");
    }
    assert_eq!(added_to(&redis, "{taskd}:jobs"), 5, "the pack's four jobs were put back as plain entries");
    wait_for("nothing left pending, the pack trimmed", || {
        (pending(&redis, PACKS) == 0 && redis.pending() == 0 && redis.xlen(PACKS) == 0).then_some(())
    });
}

#[test]
fn a_damaged_rest_behind_a_slow_job_is_said_when_its_pack_is_dissolved() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "1"]);
    // The second job's outcome goes out at once (5 ms): the rest of the pack, its damaged
    // part, is not run but dropped, and said so.
    let jobs = vec![(300, email(300, 0)), (301, email(301, 5))];
    add_pack(&redis, &jobs, b"5:12:o");
    let mut c = d.connect();
    let got = results(&mut c, &[300, 301]);
    assert!(got.values().all(|v| v["event"] == "done"), "{got:?}");
    d.wait_log("the rest of its pack is damaged: job 3 of the pack is damaged");
    wait_for("the pack acknowledged", || (pending(&redis, PACKS) == 0).then_some(()));
}

#[test]
fn a_pack_with_a_damaged_rest_runs_its_good_jobs_and_says_why_the_rest_is_none() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "1"]);
    let jobs = vec![(200, email(200, 0)), (201, email(201, 0))];
    // A third job cut short, then an entry of the stream that is no pack at all.
    add_pack(&redis, &jobs, b"5:12:o");
    let _: String = redis.query(&["XADD", PACKS, "*", "n", "1", "p", "garbage"]);
    let mut c = d.connect();
    let got = results(&mut c, &[200, 201]);
    assert!(got.values().all(|v| v["event"] == "done"), "{got:?}");
    d.wait_log("the rest of its pack is damaged: job 3 of the pack is damaged");
    d.wait_log("not a pack of this taskd's format");
    wait_for("both entries acknowledged", || (pending(&redis, PACKS) == 0).then_some(()));
    assert_eq!(runs(&d).len(), 2);
}

/// `retry N`: a transient failure on its first N runs; anything else succeeds.
const HANDLER: &str = r#"
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    tid, job, attempt = msg["task_id"], msg["job"], msg["attempt"]
    if attempt <= job.get("retry", 0):
        print(json.dumps({"task_id": tid, "error": "busy, try later", "retry": True}), flush=True)
        continue
    print(json.dumps({"task_id": tid, "result": {"attempt": attempt}}), flush=True)
"#;

#[test]
fn a_job_of_a_pack_that_fails_transiently_is_parked_alone_and_the_others_are_done() {
    if common::which("python3").is_none() {
        common::cannot_run("python", "python3 is not installed: this test runs a Python handler");
        return;
    }
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flaky.py");
    std::fs::write(&path, HANDLER).unwrap();
    let spec = format!("flaky=python3 {}", path.display());
    let d = web(
        &redis,
        &["--task-worker-num", "1", "--handler", &spec, "--retry-base-ms", "20", "--retry-cap-ms", "50"],
    );
    let job = |retry: u32| format!(r#"{{"type":"flaky","retry":{retry}}}"#);
    let jobs = vec![(300, job(0)), (301, job(1)), (302, job(0)), (303, job(0))];
    add_pack(&redis, &jobs, b"");
    let mut c = d.connect();
    let got = results(&mut c, &[300, 301, 302, 303]);
    for (id, v) in &got {
        assert_eq!(v["event"], "done", "{v}");
        let want = if *id == 301 { 2 } else { 1 };
        assert_eq!(v["attempts"], want, "only job 301 ran twice: {v}");
    }
    wait_for("the pack acknowledged, nothing left parked", || {
        let parked: u64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
        (pending(&redis, PACKS) == 0 && parked == 0 && redis.pending() == 0).then_some(())
    });
    let dead: u64 = redis.xlen("{taskd}:dead");
    assert_eq!(dead, 0);
}

#[test]
fn a_task_process_killed_inside_a_pack_has_it_dissolved_and_every_job_done_once() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "1", "--claim-timeout", "2"]);
    // The slow job first: the pack is whole and pending while it runs.
    let ids = [400, 401, 402, 403];
    let jobs: Vec<(u64, String)> =
        ids.iter().map(|&id| (id, email(id, if id == 400 { 3000 } else { 0 }))).collect();
    let pack = add_pack(&redis, &jobs, b"");
    wait_for("the task process to take the pack", || (pending(&redis, PACKS) == 1).then_some(()));
    let victim = d.pids_of("taskd: task")[0];
    wait_for("it to sleep in the slow job", || common::in_nanosleep(victim).then_some(()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let mut c = d.connect();
    let got = results(&mut c, &ids);
    // The job killed, and the others, each run once more as a job of its own: its attempt
    // counts the pack's run that died.
    let runs = runs(&d);
    for id in &ids {
        let v = &got[id];
        assert_eq!(v["event"], "done", "{v}");
        assert_eq!(v["attempts"], 2, "{v}");
        assert_ne!(v["task_pid"].as_u64(), Some(u64::from(victim)), "{v}");
        let lines = runs.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(lines.len(), 1, "task {id} ran to its end once: {lines:?}");
    }
    d.wait_log(&format!("pack {pack} of {PACKS} was held by a consumer that died (delivery 2): its 4 jobs"));
    wait_for("nothing left pending, the pack trimmed", || {
        (pending(&redis, PACKS) == 0 && redis.pending() == 0 && redis.xlen(PACKS) == 0).then_some(())
    });
}

#[test]
fn jobs_of_a_pack_held_back_by_a_rate_limit_wait_parked_and_each_runs_once() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "1", "--sms-rate", "4/s"]);
    let ids: Vec<u64> = (600..610).collect();
    let sms = |id: u64| {
        format!(r#"{{"type":"sms","to":"+86138001380{:02}","text":"x","simulate_ms":0}}"#, id % 100)
    };
    add_pack(&redis, &ids.iter().map(|&id| (id, sms(id))).collect::<Vec<_>>(), b"");
    let mut c = d.connect();
    let got = results(&mut c, &ids);
    let runs = runs(&d);
    for id in &ids {
        // "Not yet" is no attempt.
        assert_eq!((&got[id]["event"], &got[id]["attempts"]), (&"done".into(), &1.into()), "{}", got[id]);
        assert_eq!(runs.get(id).map_or(0, Vec::len), 1, "task {id} ran once: {runs:?}");
    }
    wait_for("the pack acknowledged, nothing left parked", || {
        let parked: u64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
        (pending(&redis, PACKS) == 0 && parked == 0 && redis.pending() == 0).then_some(())
    });
}

#[test]
fn a_packed_job_past_task_timeout_kills_its_process_and_fails_alone_the_others_done() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "1", "--task-timeout", "1", "--task-retry-max", "0"]);
    let ids = [800, 801, 802];
    let jobs: Vec<(u64, String)> =
        ids.iter().map(|&id| (id, email(id, if id == 800 { 5000 } else { 0 }))).collect();
    add_pack(&redis, &jobs, b"");
    let mut c = d.connect();
    let got = results(&mut c, &ids);
    // Its last attempt, yet no dead letter while packed: the pack is dissolved by the next
    // process, and the slow job, alone, is killed again and fails.
    let slow = &got[&800];
    assert_eq!(slow["event"], "failed", "{slow}");
    assert!(slow["error"].as_str().unwrap().contains("task_timeout"), "{slow}");
    for id in [801, 802] {
        assert_eq!((&got[&id]["event"], &got[&id]["attempts"]), (&"done".into(), &2.into()), "{}", got[&id]);
    }
    assert_eq!(redis.xlen("{taskd}:dead"), 1, "one dead letter, of the slow job alone");
    let runs = runs(&d);
    assert_eq!((runs.get(&800).map_or(0, Vec::len), runs.len()), (0, 2), "{runs:?}");
    assert_eq!(d.log().matches("has run longer than task_timeout").count(), 2, "{}", d.log());
}

#[test]
fn a_restarted_web_node_takes_back_its_jobs_waiting_in_packs() {
    let Some(redis) = Redis::start() else { return };
    // No task process: the packs wait.
    let first = web(&redis, &["--task-worker-num", "0"]);
    add_pack(&redis, &[(900, email(900, 0)), (901, email(901, 0))], b"");
    drop(first);
    let again = web(&redis, &["--task-worker-num", "0"]);
    again.wait_log("2 unfinished jobs taken back");
    let mut c = again.connect();
    for id in [900, 901] {
        let v = ask_result(&mut c, id);
        assert_eq!(v["event"], "running", "{v}");
    }
}

#[test]
fn a_pack_of_a_dead_task_node_is_claimed_by_another_node_and_dissolved() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--task-worker-num", "0"]);
    let args = ["--task-worker-num", "1", "--claim-timeout", "1"];
    let mut a = TaskNode::start(&redis, "a", &args);
    let ids = [950, 951, 952];
    let jobs: Vec<(u64, String)> =
        ids.iter().map(|&id| (id, email(id, if id == 950 { 3000 } else { 0 }))).collect();
    let pack = add_pack(&redis, &jobs, b"");
    wait_for("node a to take the pack", || (pending(&redis, PACKS) == 1).then_some(()));
    a.kill_all();
    let b = TaskNode::start(&redis, "b", &args);
    let mut c = d.connect();
    let got = results(&mut c, &ids);
    for id in &ids {
        assert_eq!((&got[id]["event"], &got[id]["attempts"]), (&"done".into(), &2.into()), "{}", got[id]);
    }
    let lines = b.outbox_lines();
    for id in ids {
        assert_eq!(
            lines.iter().filter(|l| l["task_id"] == id).count(),
            1,
            "task {id} ran once on b: {lines:?}"
        );
    }
    assert!(a.outbox_lines().is_empty(), "the slow job died with node a");
    assert!(
        b.log().contains(&format!(
            "pack {pack} of {PACKS} was held by a consumer that died (delivery 2): its 3 jobs"
        )),
        "{}",
        b.log()
    );
}

/// The scripts of a flush, twice as a MULTI sent again after its answer was lost would run
/// them: a packed job is parked and dead-lettered once, while its pack is pending, and its pack
/// is dissolved once, from the job given, with attempts raised.
#[test]
fn the_scripts_of_packed_jobs_act_once_and_only_while_their_pack_is_pending() {
    use taskd::durable::consumer::{DEAD_PACKED, DISSOLVE, PARK_PACKED};
    let Some(redis) = Redis::start() else { return };
    let (jobs, dead, delayed) = ("{taskd}:jobs", "{taskd}:dead", "{taskd}:delayed");
    for stream in [jobs, PACKS] {
        let _: () = redis.query(&["XGROUP", "CREATE", stream, "taskd", "$", "MKSTREAM"]);
    }
    let three: Vec<(u64, String)> = (1..=3).map(|id| (id, email(id, 0))).collect();
    let id = add_pack(&redis, &three, b"");
    let _: redis::Value =
        redis.query(&["XREADGROUP", "GROUP", "taskd", "c", "COUNT", "1", "STREAMS", PACKS, ">"]);
    let hash = "{taskd}:delayed:2";
    let park = || -> i64 {
        redis.query(&["EVAL", PARK_PACKED, "3", delayed, hash, PACKS, "taskd", &id, "0", "2", "t", "2"])
    };
    let bury = || -> i64 {
        redis.query(&["EVAL", DEAD_PACKED, "2", dead, PACKS, "taskd", &id, "t", "1", "why", "x"])
    };
    let dissolve = |first: &str, raise: &str| -> i64 {
        redis.query(&["EVAL", DISSOLVE.as_str(), "2", PACKS, jobs, "taskd", &id, first, raise])
    };
    assert_eq!((park(), bury()), (1, 1));
    assert_eq!(pending(&redis, PACKS), 1, "the pack is left pending for its other jobs");
    assert_eq!(dissolve("3", "1"), 1, "job 3 only");
    assert_eq!(pending(&redis, PACKS), 0);
    // Sent again: nothing more.
    assert_eq!((park(), bury(), dissolve("3", "1")), (0, 0, -1));
    assert_eq!((redis.xlen(dead), redis.xlen(jobs)), (1, 1));
    let parked: u64 = redis.query(&["ZCARD", delayed]);
    assert_eq!(parked, 1);
    let v: redis::Value = redis.query(&["XRANGE", jobs, "-", "+"]);
    let entry = taskd::durable::redis_io::entries(v).remove(0);
    assert_eq!((entry.number("t"), entry.number("a")), (Some(3), Some(1)), "{entry:?}");
}
