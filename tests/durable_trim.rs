//! Finished durable jobs leave the job streams by a trim (`src/durable/trim.rs`), not by an XDEL
//! per job: the trim removes every acknowledged entry and nothing else (never a job that runs,
//! waits in a consumer, or was not read yet); `stats` counts only waiting and running jobs; a
//! restarted web node takes back only its unfinished jobs, not finished ones left untrimmed.

mod common;

use common::durable::Redis;
use common::{wait_for, Client, Daemon};
use serde_json::Value;
use taskd::durable::trim::{SLACK, TRIM, WALK};

const JOBS: &str = "{taskd}:jobs";

fn web(redis: &Redis, node: &str, args: &[&str]) -> Daemon {
    let mut all = vec!["--redis-url", redis.url.as_str(), "--node-id", node];
    all.extend_from_slice(args);
    Daemon::start(&all)
}

fn ids(redis: &Redis, key: &str) -> Vec<String> {
    let v: Vec<(String, Vec<(String, String)>)> = redis.query(&["XRANGE", key, "-", "+"]);
    v.into_iter().map(|(id, _)| id).collect()
}

fn trim(redis: &Redis, keys: &[&str], slack: usize) -> Vec<i64> {
    let mut args = vec!["EVAL", TRIM];
    let n = keys.len().to_string();
    args.push(&n);
    args.extend_from_slice(keys);
    let (slack, walk) = (slack.to_string(), WALK.to_string());
    args.extend_from_slice(&["taskd", &slack, &walk]);
    redis.query(&args)
}

/// Adds `n` entries; returns their ids.
fn add(redis: &Redis, key: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| redis.query(&["XADD", key, "*", "t", &i.to_string()])).collect()
}

fn deliver(redis: &Redis, key: &str, n: usize) {
    let _: redis::Value =
        redis.query(&["XREADGROUP", "GROUP", "taskd", "c", "COUNT", &n.to_string(), "STREAMS", key, ">"]);
}

fn ack(redis: &Redis, key: &str, ids: &[&String]) {
    let mut args = vec!["XACK", key, "taskd"];
    args.extend(ids.iter().map(|s| s.as_str()));
    let _: i64 = redis.query(&args);
}

#[test]
fn the_trim_removes_acknowledged_entries_and_never_a_pending_or_unread_one() {
    let Some(redis) = Redis::start() else { return };
    let _: () = redis.query(&["XGROUP", "CREATE", JOBS, "taskd", "$", "MKSTREAM"]);
    let e = add(&redis, JOBS, 10);
    deliver(&redis, JOBS, 6);
    // Finished: 0, 1, 3, 5. Running (pending): 2, 4. Not read yet: 6..9.
    ack(&redis, JOBS, &[&e[0], &e[1], &e[3], &e[5]]);
    let left = trim(&redis, &[JOBS], SLACK);
    // Below the oldest pending one, all go; above it, up to SLACK finished ones stay.
    assert_eq!(ids(&redis, JOBS), e[2..].to_vec());
    assert_eq!(left, vec![0, 8]);
    // Exact (as `stats` asks): the finished ones above a pending one go too.
    let left = trim(&redis, &[JOBS], 0);
    let want: Vec<String> = [&e[2], &e[4]].into_iter().chain(&e[6..]).cloned().collect();
    assert_eq!(ids(&redis, JOBS), want);
    assert_eq!(left, vec![0, 6]);
    // Nothing pending: everything delivered goes, the unread stay.
    ack(&redis, JOBS, &[&e[2], &e[4]]);
    trim(&redis, &[JOBS], SLACK);
    assert_eq!(ids(&redis, JOBS), e[6..].to_vec());
    deliver(&redis, JOBS, 2);
    trim(&redis, &[JOBS], SLACK);
    assert_eq!(ids(&redis, JOBS), e[6..].to_vec(), "a job being run was trimmed");
    ack(&redis, JOBS, &[&e[6], &e[7]]);
    // An unread entry deleted (as a cancel does): Redis no longer knows the group's lag.
    let _: i64 = redis.query(&["XDEL", JOBS, &e[9]]);
    trim(&redis, &[JOBS], SLACK);
    assert_eq!(ids(&redis, JOBS), vec![e[8].clone()], "an unread job was trimmed");
    // Not a stream, no group, no key: left alone, and no failure of the others.
    let _: () = redis.query(&["SET", "{taskd}:jobs#low", "x"]);
    let _: String = redis.query(&["XADD", "{taskd}:jobs:echo", "*", "t", "1"]);
    let left = trim(&redis, &[JOBS, "{taskd}:jobs#low", "{taskd}:jobs:echo", "{taskd}:jobs#high"], 0);
    assert_eq!(left, vec![0, 1, 0, 1, 0]);
}

#[test]
fn a_long_walk_says_so_and_goes_on_at_the_next_trim() {
    let Some(redis) = Redis::start() else { return };
    let _: () = redis.query(&["XGROUP", "CREATE", JOBS, "taskd", "$", "MKSTREAM"]);
    let n = WALK + 5;
    let e = add(&redis, JOBS, n + 3);
    deliver(&redis, JOBS, n + 1);
    // The first job runs long; the next n finished.
    let done: Vec<&String> = e[1..=n].iter().collect();
    for chunk in done.chunks(500) {
        ack(&redis, JOBS, chunk);
    }
    assert_eq!(trim(&redis, &[JOBS], 0)[0], 1, "a walk that stopped at its limit did not say so");
    assert_eq!(trim(&redis, &[JOBS], 0), vec![0, 3]);
    let want: Vec<String> = std::iter::once(&e[0]).chain(&e[n + 1..]).cloned().collect();
    assert_eq!(ids(&redis, JOBS), want);
}

fn stats(c: &mut Client) -> Value {
    c.send("stats");
    let s = c.recv();
    assert_eq!(s["event"], "stats", "{s}");
    s
}

fn done_of(c: &mut Client, n: usize) {
    let mut finals = 0;
    while finals < n {
        let v = c.recv();
        if v["event"] == "done" || v["event"] == "failed" {
            assert_eq!(v["event"], "done", "{v}");
            finals += 1;
        }
    }
}

/// End to end: finished jobs leave the stream while another runs; the running one and the
/// unread ones stay, and `stats` counts exactly them.
#[test]
fn finished_jobs_leave_the_stream_and_stats_counts_only_waiting_and_running_ones() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "2"]);
    d.wait_log("redis bridge: connected");
    let mut c = d.connect();
    c.submit(r#"{"type":"email","to":"slow@example.com","simulate_ms":60000}"#);
    wait_for("the slow job to run", || (redis.pending() == 1).then_some(()));
    for i in 0..300 {
        c.send(&format!("quick{i}@example.com"));
    }
    done_of(&mut c, 300);
    // Only the running job is left once `stats` has trimmed (a trim of every finished entry).
    wait_for("stats to count the running job alone", || {
        (stats(&mut c)["durable"]["jobs"] == 1 && redis.xlen(JOBS) == 1).then_some(())
    });
    let left = ids(&redis, JOBS);
    let held: Vec<(String, String, u64, u64)> = redis.query(&["XPENDING", JOBS, "taskd", "-", "+", "10"]);
    assert_eq!(held.len(), 1);
    assert_eq!(left, vec![held[0].0.clone()], "the running job's entry was trimmed");
}

/// A consumer busy with a slow job leaves the jobs behind it unread: no trim removes them, and
/// they all run once it is free; then the stream empties by itself.
#[test]
fn unread_jobs_are_never_trimmed_and_the_stream_empties_once_all_are_done() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "1"]);
    d.wait_log("redis bridge: connected");
    let mut c = d.connect();
    c.submit(r#"{"type":"email","to":"slow@example.com","simulate_ms":4000}"#);
    wait_for("the slow job to run", || (redis.pending() == 1).then_some(()));
    for i in 0..20 {
        c.submit(&format!("quick{i}@example.com"));
    }
    // The bridge trims every finished entry before it counts (every second): none is finished,
    // all 21 are there.
    wait_for("stats to count the 21 jobs", || (stats(&mut c)["durable"]["jobs"] == 21).then_some(()));
    assert_eq!(redis.xlen(JOBS), 21);
    done_of(&mut c, 21);
    let outbox = d.outbox_lines();
    assert_eq!(outbox.len(), 21, "{outbox:?}");
    // Nobody asks `stats`: the consumers' own trims empty the stream.
    wait_for("the job stream to empty", || (redis.xlen(JOBS) == 0 && redis.pending() == 0).then_some(()));
}

/// A web node killed with finished jobs' entries still in its stream (not trimmed yet) takes
/// back, at its restart, only the job that had not finished.
#[test]
fn a_restarted_web_node_takes_back_its_unfinished_jobs_not_its_finished_untrimmed_ones() {
    let Some(redis) = Redis::start() else { return };
    // No task process: its jobs wait in the stream.
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "0"]);
    d.wait_log("redis bridge: connected");
    let mut c = d.connect();
    for i in 0..3 {
        c.submit(&format!("user{i}@example.com"));
    }
    wait_for("the jobs in Redis", || (redis.xlen(JOBS) == 3).then_some(()));
    d.signal(nix::sys::signal::Signal::SIGKILL);
    drop(c);
    drop(d);
    // A consumer took the three, finished the first two (acknowledged, not trimmed) and runs
    // the third.
    let e = ids(&redis, JOBS);
    deliver(&redis, JOBS, 3);
    ack(&redis, JOBS, &[&e[0], &e[1]]);
    assert_eq!(redis.xlen(JOBS), 3);
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "0"]);
    let line = d.wait_log("unfinished jobs taken back");
    assert!(line.contains("node web-1: 1 unfinished jobs taken back"), "{line}");
}
