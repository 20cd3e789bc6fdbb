//! Scheduled, prioritised and cancellable jobs (issue 19), against the real binary: `run_at` /
//! `run_in_ms` wait in the master's delayed queue and run at their time, never before; `cancel`
//! takes back a job not started, which then never reaches the outbox; `priority` shares the
//! task processes 6:3:1, so a low job is not held back by a flood of high ones.

mod common;

use common::{wait_for, Client, Daemon};
use serde_json::Value;

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// `run_at` of an `accepted` line (RFC 3339), in Unix ms.
fn run_at_ms(accepted: &Value) -> u64 {
    let text = accepted["run_at"].as_str().unwrap_or_else(|| panic!("no run_at in {accepted}"));
    chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp_millis() as u64
}

fn stats(client: &mut Client) -> Value {
    client.send("stats");
    let s = client.recv();
    assert_eq!(s["event"], "stats", "{s}");
    s
}

/// The outbox lines of job `task_id`.
fn sent(daemon: &Daemon, task_id: &Value) -> Vec<Value> {
    daemon.outbox_lines().into_iter().filter(|l| &l["task_id"] == task_id).collect()
}

#[test]
fn a_job_scheduled_ahead_is_accepted_at_once_waits_holding_no_task_process_and_runs_at_its_time() {
    let daemon = Daemon::start(&["--worker-num", "1", "--task-worker-num", "2"]);
    let mut c = daemon.connect();
    let before = unix_ms();
    let accepted = c.submit(r#"{"type":"email","to":"later@example.com","run_in_ms":1500,"simulate_ms":0}"#);
    let id = accepted["task_id"].clone();
    let at = run_at_ms(&accepted);
    assert!(at >= before + 1500, "run_at {at} is before its run_in_ms from {before}");
    // Waiting, it holds no task process and is in the delayed queue.
    let s = stats(&mut c);
    assert_eq!((s["delayed"].as_u64(), s["tasking_num"].as_u64()), (Some(1), Some(0)), "{s}");
    assert_eq!(s["scheduled"], 1, "{s}");
    let done = c.final_reply(&id, &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    let lines = sent(&daemon, &id);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let sent_at = lines[0]["sent_at_ms"].as_u64().unwrap();
    assert!(sent_at >= at, "sent at {sent_at}, before its run_at {at}");

    // RFC 3339 with an offset, and Unix seconds: both run, neither before its time.
    let soon = chrono::DateTime::from_timestamp_millis((unix_ms() + 1200) as i64)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
        .to_rfc3339();
    let a = c.submit(&format!(r#"{{"type":"sms","to":"+15551234567","run_at":"{soon}","simulate_ms":0}}"#));
    let secs = (unix_ms() + 1000) as f64 / 1000.0;
    let b = c.submit(&format!(r#"{{"type":"sms","to":"+15551234568","run_at":{secs},"simulate_ms":0}}"#));
    // b is due first: the two `done` lines come in either order.
    let mut finals = vec![c.recv(), c.recv()];
    finals.sort_by_key(|r| r["task_id"].as_u64());
    assert!(finals.iter().all(|r| r["event"] == "done"), "{finals:?}");
    for accepted in [&a, &b] {
        let id = accepted["task_id"].clone();
        let sent_at = sent(&daemon, &id)[0]["sent_at_ms"].as_u64().unwrap();
        assert!(sent_at >= run_at_ms(accepted), "{accepted} sent at {sent_at}");
    }
    // A time in the past runs at once, and says when it was asked for.
    let past =
        c.submit(r#"{"type":"sms","to":"+15551234569","run_at":"2001-09-09T01:46:40Z","simulate_ms":0}"#);
    assert_eq!(past["run_at"], "2001-09-09T01:46:40.000Z");
    assert_eq!(c.final_reply(&past["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn delay_ms_is_refused_naming_simulate_ms_and_run_at() {
    let daemon = Daemon::start(&["--worker-num", "1", "--task-worker-num", "1"]);
    let mut c = daemon.connect();
    c.send(r#"{"type":"email","to":"a@example.com","delay_ms":5000}"#);
    let reply = c.recv();
    assert_eq!(reply["event"], "error", "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(
        error.contains("simulate_ms") && error.contains("run_at") && error.contains("delay_ms"),
        "{error}"
    );
    assert_eq!(c.submit(r#"{"type":"email","to":"a@example.com","simulate_ms":0}"#)["event"], "accepted");
}

#[test]
fn a_cancelled_job_ends_cancelled_and_never_reaches_the_outbox_and_a_started_one_cannot_be() {
    let daemon = Daemon::start(&["--worker-num", "2", "--task-worker-num", "1"]);
    let mut c = daemon.connect();
    // Scheduled: cancelled while it waits in the delayed queue.
    let later = c.submit(r#"{"type":"email","to":"never@example.com","run_in_ms":1500,"simulate_ms":0}"#);
    let later_id = later["task_id"].clone();
    c.send(&format!(r#"{{"type":"cancel","task_id":{later_id}}}"#));
    assert_eq!(c.recv(), serde_json::json!({"event": "cancelled", "task_id": later_id}));

    // Queued: the only task process is busy with a long job.
    let long = c.submit(r#"{"type":"email","to":"long@example.com","simulate_ms":3000}"#);
    let queued = c.submit(r#"{"type":"sms","to":"+15550000001","simulate_ms":0}"#);
    wait_for("the long job to start", || (stats(&mut c)["tasking_num"] == 1).then_some(()));
    // Another connection may not cancel it.
    let mut other = daemon.connect();
    other.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, queued["task_id"]));
    let refused = other.recv();
    assert_eq!(refused["event"], "error", "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("not submitted by this connection"), "{refused}");
    // A running one cannot be cancelled; the queued one can.
    c.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, long["task_id"]));
    let running = c.recv();
    assert_eq!(running["event"], "error", "{running}");
    assert!(running["error"].as_str().unwrap().contains("running"), "{running}");
    c.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, queued["task_id"]));
    assert_eq!(c.recv(), serde_json::json!({"event": "cancelled", "task_id": queued["task_id"]}));

    let done = c.final_reply(&long["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    // An ended one cannot be cancelled either, and `result` tells a cancelled one.
    c.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, long["task_id"]));
    let ended = c.recv();
    assert!(ended["error"].as_str().unwrap().contains("has ended"), "{ended}");
    c.send(&format!(r#"{{"type":"result","task_id":{later_id}}}"#));
    assert_eq!(c.recv()["event"], "cancelled");

    // Past the cancelled job's time, with a job sent after it done: neither cancelled job
    // reached the outbox, nor ran.
    let after = c.submit(r#"{"type":"sms","to":"+15550000002","run_in_ms":1600,"simulate_ms":0}"#);
    assert_eq!(c.final_reply(&after["task_id"], &mut Vec::new())["event"], "done");
    let outbox: Vec<Value> = daemon.outbox_lines();
    assert!(
        sent(&daemon, &later_id).is_empty() && sent(&daemon, &queued["task_id"]).is_empty(),
        "{outbox:?}"
    );
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    let s = stats(&mut c);
    assert_eq!((s["tasks_cancelled"].as_u64(), s["delayed"].as_u64()), (Some(2), Some(0)), "{s}");
    // Nothing more comes for the cancelled jobs.
    assert!(c.try_recv(std::time::Duration::from_millis(300)).is_none());
}

#[test]
fn a_flood_of_high_jobs_does_not_hold_back_a_low_one_beyond_its_weighted_share() {
    let daemon = Daemon::start(&["--worker-num", "1", "--task-worker-num", "1"]);
    let mut c = daemon.connect();
    // The only task process is busy while the flood and the low job queue up behind it.
    let long = c.submit(r#"{"type":"email","to":"long@example.com","simulate_ms":4000}"#);
    let flood: String = (0..1000)
        .map(|i| {
            format!("{{\"type\":\"sms\",\"to\":\"+1555{i:07}\",\"priority\":\"high\",\"simulate_ms\":0}}\n")
        })
        .collect();
    c.send_raw(flood.as_bytes());
    for _ in 0..1000 {
        assert_eq!(c.recv()["event"], "accepted");
    }
    let low = c.submit(r#"{"type":"email","to":"low@example.com","priority":"low","simulate_ms":0}"#);
    let s = stats(&mut c);
    assert_eq!(
        (
            s["tasking_num"].as_u64(),
            s["task_queue_by_priority"]["high"].as_u64(),
            s["task_queue_by_priority"]["low"].as_u64()
        ),
        (Some(1), Some(1000), Some(1)),
        "the flood and the low job were to wait behind the long job: {s}"
    );
    assert_eq!(c.final_reply(&low["task_id"], &mut Vec::new())["event"], "done");
    let outbox = daemon.outbox_lines();
    let first = outbox.iter().position(|l| l["task_id"] == long["task_id"]).unwrap();
    let at = outbox.iter().position(|l| l["task_id"] == low["task_id"]).unwrap();
    // High and low waiting, the shares are 6:1: the low job is among the first seven to start,
    // not behind the 1,000 (as in a strict priority order).
    let highs_before = at - first - 1;
    assert!(highs_before < 7, "{highs_before} high jobs ran before the low one");
    // The flood still runs to its end: the long job, 1,000 high, the low one.
    wait_for("the flood to be delivered", || (daemon.outbox_lines().len() == 1002).then_some(()));
}

#[test]
fn a_second_job_with_the_same_key_is_not_run_and_its_client_gets_the_firsts_final_line() {
    let daemon = Daemon::start(&["--worker-num", "2", "--task-worker-num", "2", "--dedup-ttl-ms", "1500"]);
    let (mut a, mut b) = (daemon.connect(), daemon.connect());
    let job = r#"{"type":"email","to":"receipt@example.com","key":"order-42:receipt","simulate_ms":800}"#;
    let first = a.submit(job);
    let first_id = first["task_id"].clone();
    // While it runs: the duplicate's client hears of the first, then gets its final line.
    let second = b.submit(job);
    assert_ne!(second["task_id"], first_id);
    assert_eq!(b.recv(), serde_json::json!({"event": "duplicate", "task_id": first_id}));
    let done = a.final_reply(&first_id, &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(b.recv(), done, "the duplicate's client gets the first's final line");
    // Within dedup_ttl after it ended: at once.
    let third = b.submit(job);
    assert_eq!(b.recv(), serde_json::json!({"event": "duplicate", "task_id": first_id}));
    assert_eq!(b.recv(), done);
    assert_ne!(third["task_id"], first_id);
    // Another key runs; the first key's job ran once.
    let other =
        a.submit(r#"{"type":"email","to":"receipt@example.com","key":"order-43:receipt","simulate_ms":0}"#);
    assert_eq!(a.final_reply(&other["task_id"], &mut Vec::new())["event"], "done");
    let to_42: Vec<Value> = daemon.outbox_lines().into_iter().filter(|l| l["task_id"] == first_id).collect();
    assert_eq!(daemon.outbox_lines().len(), 2, "{:?}", daemon.outbox_lines());
    assert_eq!(to_42.len(), 1);
    let s = stats(&mut a);
    assert_eq!(s["duplicates"], 2, "{s}");
    // Past dedup_ttl the key is free again: a new job with it runs.
    let again = a.submit_until_not_duplicate(job, &done);
    assert_eq!(again.1["event"], "done", "{:?}", again);
    assert_eq!(again.1["task_id"], again.0["task_id"]);
}

#[test]
fn a_schedule_in_the_config_file_runs_its_job_at_each_tick_and_stats_show_its_last_and_next_run() {
    let (_dir, config) = schedule_config(
        r#"
[[schedule]]
name = "heartbeat"
cron = "* * * * * *"
timezone = "Europe/Paris"
missed = "skip"
job = { type = "sms", to = "+15550001111", text = "tick", simulate_ms = 0 }
"#,
    );
    let path = config.as_str();
    let daemon = Daemon::start(&["--worker-num", "2", "--task-worker-num", "1", "--config", path]);
    let lines = wait_for("three ticks in the outbox", || {
        let lines: Vec<Value> =
            daemon.outbox_lines().into_iter().filter(|l| l["to"] == "+15550001111").collect();
        (lines.len() >= 3).then_some(lines)
    });
    let mut ids: Vec<u64> = lines.iter().map(|l| l["task_id"].as_u64().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), lines.len(), "a tick's job ran twice: {lines:?}");
    let mut c = daemon.connect();
    let s = stats(&mut c);
    let entry = &s["schedules"][0];
    assert_eq!(
        (entry["name"].as_str(), entry["timezone"].as_str()),
        (Some("heartbeat"), Some("Europe/Paris"))
    );
    assert!(entry["runs"].as_u64().unwrap() >= 3, "{entry}");
    let (last, next) = (entry["last_run"].as_str().unwrap(), entry["next_run"].as_str().unwrap());
    let ms = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp_millis();
    assert!(ms(next) > ms(last) - 1000, "{entry}");
    // Ticks are whole seconds.
    assert_eq!(ms(next) % 1000, 0, "{entry}");
}

#[test]
fn a_schedule_that_cannot_be_read_stops_the_daemon_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (entry, says) in [
        (
            r#"name = "r"
cron = "0 8 * * *"
job = { type = "sms", to = "+15550001111" }"#,
            "six fields",
        ),
        (
            r#"name = "r"
cron = "0 0 8 * * *"
timezone = "Mars/Olympus"
job = { type = "sms", to = "+15550001111" }"#,
            "IANA",
        ),
        (
            r#"name = "r"
cron = "0 0 8 * * *"
job = { type = "sms", to = "not a number" }"#,
            "its job",
        ),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, format!("[[schedule]]\n{entry}\n")).unwrap();
        let Err((_, log)) = Daemon::try_start(&["--config", config.to_str().unwrap()]) else {
            panic!("started with {entry}");
        };
        assert!(log.contains("invalid schedule") && log.contains(says), "{entry}: {log}");
    }
}

#[test]
fn the_operator_cancels_any_connections_job_with_taskd_cancel_and_no_one_else_can() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("taskd.pid");
    let pid_arg = pid_file.to_str().unwrap();
    let daemon = Daemon::start(&["--worker-num", "1", "--task-worker-num", "1", "--pid-file", pid_arg]);
    // One token for the operator: the dashboard's, generated beside the pid file (even
    // without --ws-port), and no second one.
    let token_file = dir.path().join("taskd.admin-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin token is for the daemon's user only");
    assert!(!dir.path().join("taskd.token").exists(), "no second token");
    let mut c = daemon.connect();
    let job = c.submit(r#"{"type":"email","to":"later@example.com","run_in_ms":60000}"#);
    let id = job["task_id"].as_u64().unwrap();
    // A wrong token cancels nothing.
    let mut other = daemon.connect();
    other.send(&format!(r#"{{"type":"cancel","task_id":{id},"token":"00"}}"#));
    let refused = other.recv();
    assert!(refused["error"].as_str().unwrap().contains("token"), "{refused}");
    // Each guess at the token costs a connection.
    assert!(other.closed_by_server(), "the connection stays open after a wrong token");
    let taskd = env!("CARGO_BIN_EXE_taskd");
    let run = |id: u64| {
        common::run_with_timeout(
            std::process::Command::new(taskd).args(["cancel", &id.to_string(), "--pid-file", pid_arg]),
            common::DEADLINE,
        )
    };
    let out = run(id);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && said.contains("cancelled"), "{out:?}");
    // Its own client gets its final line.
    assert_eq!(c.recv(), serde_json::json!({"event": "cancelled", "task_id": id}));
    let again = run(id);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("has ended"), "{again:?}");
    assert!(sent(&daemon, &job["task_id"]).is_empty());
    let mut daemon = daemon;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(common::DEADLINE).is_some());
    assert!(!token_file.exists(), "the generated token goes with the daemon");
}

#[test]
fn taskd_cancel_uses_the_operators_admin_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("taskd.pid");
    let token_file = dir.path().join("operator-token");
    std::fs::write(&token_file, "an-operator-chosen-token-0123\n").unwrap();
    let (pid_arg, token_arg) = (pid_file.to_str().unwrap(), token_file.to_str().unwrap());
    let daemon =
        Daemon::start(&["--task-worker-num", "1", "--pid-file", pid_arg, "--admin-token-file", token_arg]);
    assert!(!dir.path().join("taskd.admin-token").exists(), "none generated beside a given one");
    let mut c = daemon.connect();
    let job = c.submit(r#"{"type":"email","to":"later@example.com","run_in_ms":60000}"#);
    let id = job["task_id"].as_u64().unwrap().to_string();
    let taskd = env!("CARGO_BIN_EXE_taskd");
    let run = |extra: &[&str]| {
        common::run_with_timeout(
            std::process::Command::new(taskd).args(["cancel", &id, "--pid-file", pid_arg]).args(extra),
            common::DEADLINE,
        )
    };
    // Without the daemon's --admin-token-file it looks beside the pid file: nothing there.
    let missing = run(&[]);
    assert_eq!(missing.status.code(), Some(4), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("taskd.admin-token"), "{missing:?}");
    let out = run(&["--admin-token-file", token_arg]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(c.recv(), serde_json::json!({"event": "cancelled", "task_id": job["task_id"]}));
    let mut daemon = daemon;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(common::DEADLINE).is_some());
    assert!(token_file.exists(), "the operator's own file is never removed");
}

#[test]
fn without_a_pid_file_or_token_file_an_operator_cancel_is_refused() {
    let daemon = Daemon::start(&["--task-worker-num", "1"]);
    daemon.wait_log("no admin token");
    let mut c = daemon.connect();
    let job = c.submit(r#"{"type":"email","to":"later@example.com","run_in_ms":60000}"#);
    let id = job["task_id"].as_u64().unwrap();
    let mut other = daemon.connect();
    other.send(&format!(r#"{{"type":"cancel","task_id":{id},"token":"anything-at-all-0123"}}"#));
    assert!(other.recv()["error"].as_str().unwrap().contains("admin token"));
    // Its own connection still may.
    c.send(&format!(r#"{{"type":"cancel","task_id":{id}}}"#));
    assert_eq!(c.recv(), serde_json::json!({"event": "cancelled", "task_id": id}));
}

// ---- durable jobs (`--redis-url`) ----

fn web(redis: &common::durable::Redis, node: &str, args: &[&str]) -> Daemon {
    let mut all = vec!["--redis-url", redis.url.as_str(), "--node-id", node];
    all.extend_from_slice(args);
    Daemon::start(&all)
}

/// `kill -9` a daemon's master; waits until every process of the daemon is gone.
fn kill_daemon(d: &Daemon) {
    let group: Vec<u32> =
        common::processes().into_iter().filter(|p| p.pgid == d.pid).map(|p| p.pid).collect();
    d.signal(nix::sys::signal::Signal::SIGKILL);
    wait_for("the killed daemon's processes to be gone", || {
        common::reap_orphans(&group);
        group.iter().all(|&p| common::is_dead(p)).then_some(())
    });
}

#[test]
fn a_durable_job_scheduled_ahead_survives_kill_9_of_its_web_node_and_runs_once() {
    let Some(redis) = common::durable::Redis::start() else { return };
    // The web node runs no job itself: the task node's outbox is the one record of each run.
    let first = web(&redis, "web-1", &["--task-worker-num", "0"]);
    let node = common::durable::TaskNode::start(&redis, "n1", &["--task-worker-num", "2"]);
    let mut c = first.connect();
    let before = unix_ms();
    let accepted = c.submit(r#"{"type":"sms","to":"+15550003333","run_in_ms":3000,"simulate_ms":0}"#);
    assert_eq!(accepted["event"], "accepted", "{accepted}");
    let id = accepted["task_id"].as_u64().unwrap();
    let at = run_at_ms(&accepted);
    assert!(at >= before + 3000, "run_at {at} is before its run_in_ms from {before}");
    // `accepted` means Redis has it, parked in the delayed set with its fields.
    let member = format!("web-1:{id}");
    let score: Option<String> = redis.query(&["ZSCORE", "{taskd}:delayed", &member]);
    assert_eq!(score.as_deref(), Some(at.to_string().as_str()), "parked until its run_at");
    let fields: i64 = redis.query(&["HLEN", &format!("{{taskd}}:delayed:{member}")]);
    assert!(fields > 0);
    kill_daemon(&first);

    // Run by the task node at its time, though its web node is gone; its outcome waits in
    // web-1's reply stream for the node of that name to come back.
    let ran = wait_for("the job to run", || {
        let lines: Vec<Value> = node.outbox_lines().into_iter().filter(|l| l["task_id"] == id).collect();
        (!lines.is_empty()).then_some(lines)
    });
    assert!(ran[0]["sent_at_ms"].as_u64().unwrap() >= at, "ran before its time: {:?}", ran[0]);
    let again = web(&redis, "web-1", &["--task-worker-num", "0"]);
    let mut c = again.connect();
    let done = wait_for("its outcome on the restarted node", || {
        c.send(&format!(r#"{{"type":"result","task_id":{id}}}"#));
        let v = c.recv();
        (v["event"] != "running").then_some(v)
    });
    assert_eq!(done["event"], "done", "{done}");
    // Once: nothing left in Redis to run it again, and one line in the outbox.
    let later = c.submit(r#"{"type":"sms","to":"+15550004444","simulate_ms":0}"#)["task_id"].clone();
    wait_for("a later job to run", || {
        node.outbox_lines().iter().any(|l| l["task_id"] == later).then_some(())
    });
    let zcard: i64 = redis.query(&["ZCARD", "{taskd}:delayed"]);
    assert_eq!(zcard, 0);
    let runs = node.outbox_lines().into_iter().filter(|l| l["task_id"] == id).count();
    assert_eq!(runs, 1, "{:?}", node.outbox_lines());
}

/// A config file with `toml` (its `[[schedule]]` entries), in a directory that lives as long
/// as the first value; the second is its path.
fn schedule_config(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("taskd.toml");
    std::fs::write(&config, toml).unwrap();
    let path = config.to_str().unwrap().to_string();
    (dir, path)
}

/// A durable web node `node` with the schedules of `config` that runs no job itself (a task
/// node's outbox is the one record of runs), its ticks' claims in its log, and `extra` flags.
fn ticking_web(redis: &common::durable::Redis, node: &str, config: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--redis-url",
        redis.url.as_str(),
        "--node-id",
        node,
        "--task-worker-num",
        "0",
        "--config",
        config,
    ];
    args.extend_from_slice(extra);
    Daemon::start_env(&args, &[("RUST_LOG", "info,taskd::master::periodic=debug")]).unwrap()
}

/// The ticks a web node's log says it claimed, and those it says another node claimed first.
fn ticks_in_log(log: &str, schedule: &str) -> (Vec<String>, Vec<String>) {
    let prefix = format!("schedule {schedule}: tick ");
    let (mut won, mut lost) = (Vec::new(), Vec::new());
    for line in log.lines() {
        let Some(rest) = line.split_once(&prefix).map(|(_, r)| r) else { continue };
        let Some((tick, what)) = rest.split_once(' ') else { continue };
        if what.starts_with("claimed here") {
            won.push(tick.to_string());
        } else if what.starts_with("claimed by node") {
            lost.push(tick.to_string());
        }
    }
    (won, lost)
}

#[test]
fn two_durable_web_nodes_with_the_same_schedule_run_each_tick_once() {
    each_tick_runs_once_on_two_web_nodes("", &[]);
}

#[test]
fn a_ticks_job_with_a_key_is_claimed_as_a_tick_and_then_takes_its_key() {
    // Tick, key and job in one script: the winner's job takes its key (free again at once: the
    // last tick's job has ended), the loser's neither claims nor takes anything.
    each_tick_runs_once_on_two_web_nodes(r#", key = "every-second""#, &["--dedup-ttl-ms", "0"]);
}

/// Two web nodes with a schedule every second (its job with `more` fields), and `extra` flags.
fn each_tick_runs_once_on_two_web_nodes(more: &str, extra: &[&str]) {
    let Some(redis) = common::durable::Redis::start() else { return };
    let (_dir, config) = schedule_config(&format!(
        r#"
[[schedule]]
name = "every-second"
cron = "* * * * * *"
job = {{ type = "sms", to = "+15550009999", text = "tick", simulate_ms = 0{more} }}
"#
    ));
    // Both web nodes tick; neither runs jobs: the task node's outbox is the one record of runs.
    let mut web1 = ticking_web(&redis, "web-1", &config, extra);
    let mut web2 = ticking_web(&redis, "web-2", &config, extra);
    let node = common::durable::TaskNode::start(&redis, "n1", &["--task-worker-num", "2"]);
    let runs = || node.outbox_lines().into_iter().filter(|l| l["to"] == "+15550009999").count();
    // Ticks both nodes tried: each node's log names every tick it dispatched.
    wait_for("five ticks tried by both nodes", || {
        let (a, b) = (ticks_in_log(&web1.log(), "every-second"), ticks_in_log(&web2.log(), "every-second"));
        let both = a.0.iter().chain(&a.1).filter(|t| b.0.contains(t) || b.1.contains(t)).count();
        (both >= 5).then_some(())
    });
    let mut c = web1.connect();
    let s = stats(&mut c);
    let entry = &s["schedules"][0];
    let node_ran = entry["last_run_node"].as_str().unwrap_or_default().to_string();
    assert!(node_ran == "web-1" || node_ran == "web-2", "{entry}");
    assert!(entry["runs"].as_u64().unwrap() + entry["ran_elsewhere"].as_u64().unwrap() >= 5, "{entry}");
    drop(c);
    // No more ticks: then every tick claimed has run, once.
    for web in [&mut web1, &mut web2] {
        web.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(web.wait_exit(std::time::Duration::from_secs(20)).is_some_and(|s| s.success()));
    }
    let (log1, log2) = (web1.log(), web2.log());
    let ((won1, lost1), (won2, lost2)) =
        (ticks_in_log(&log1, "every-second"), ticks_in_log(&log2, "every-second"));
    for tick in &won1 {
        assert!(!won2.contains(tick), "tick {tick} was claimed by both nodes\n{log1}\n{log2}");
    }
    // Each tick one node lost was claimed by the other.
    for (lost, other) in [(&lost1, &won2), (&lost2, &won1)] {
        for tick in lost {
            assert!(other.contains(tick), "tick {tick} lost to a node that does not say it claimed it");
        }
    }
    let both: Vec<&String> =
        won1.iter().chain(&won2).filter(|t| lost1.contains(t) || lost2.contains(t)).collect();
    assert!(both.len() >= 5, "too few ticks contended: {both:?}");
    let claimed = won1.len() + won2.len();
    let mut keys: Vec<String> = redis.query(&["KEYS", "{taskd}:tick:every-second:*"]);
    // And the schedule's last claimed tick.
    keys.retain(|k| !k.ends_with(":last"));
    assert_eq!(keys.len(), claimed, "one claim per tick run: {keys:?}");
    wait_for("every claimed tick's job to run", || (runs() >= claimed).then_some(()));
    assert_eq!(runs(), claimed, "{:?}", node.outbox_lines());
}

#[test]
fn a_ticks_job_with_a_key_is_claimed_keyed_and_stored_in_one_script_or_not_at_all() {
    // One script claims the tick, takes the key and stores the job: no node can stop between
    // them. Its three outcomes, on ticks of one node: another node has the tick (nothing
    // stored), another job has the key (the tick claimed as a duplicate, no job), both free
    // (claimed, key taken, stored and run once).
    let Some(redis) = common::durable::Redis::start() else { return };
    let (_dir, config) = schedule_config(
        r#"
[[schedule]]
name = "keyed"
cron = "* * * * * *"
job = { type = "sms", to = "+15550008888", text = "tick", simulate_ms = 0, key = "tick-key" }
"#,
    );
    let key = format!("{{taskd}}:key:{}", "tick-key".bytes().map(|b| format!("{b:02x}")).collect::<String>());
    // Another job holds the key from before the node starts (with an expiry, as taskd sets
    // on every value: one without is not trusted to hold a key).
    let _: () = redis.query(&["SET", &key, "h 0 web-9 99", "PX", "600000"]);
    let mut web = ticking_web(&redis, "web-1", &config, &["--dedup-ttl-ms", "0"]);
    let node = common::durable::TaskNode::start(&redis, "n1", &["--task-worker-num", "2"]);
    let runs = || node.outbox_lines().into_iter().filter(|l| l["to"] == "+15550008888").collect::<Vec<_>>();
    // The ticks' claims: tick ms -> value.
    let claims = || {
        let mut names: Vec<String> = redis.query(&["KEYS", "{taskd}:tick:keyed:*"]);
        names.retain(|k| !k.ends_with(":last"));
        names
            .into_iter()
            .filter_map(|k| {
                let tick: u64 = k.rsplit(':').next()?.parse().ok()?;
                let value: Option<String> = redis.query(&["GET", &k]);
                Some((tick, value?))
            })
            .collect::<std::collections::BTreeMap<u64, String>>()
    };
    let count = |log: &str, needle: &str| log.matches(needle).count();

    // The key held: each tick is claimed here, as a duplicate of job 99, and nothing stored.
    wait_for("two ticks claimed as duplicates of the key's holder", || {
        (count(&web.log(), "has the key of job 99 (in Redis): not run") >= 2).then_some(())
    });
    let dups = claims().into_values().filter(|v| v.starts_with("web-1/") && v.ends_with(" dup")).count();
    assert!(dups >= 2, "{:?}", claims());
    let held: Option<String> = redis.query(&["GET", &key]);
    assert_eq!(held.as_deref(), Some("h 0 web-9 99"), "the holder's key is left as it was");
    assert_eq!(redis.xlen("{taskd}:jobs"), 0, "no job stored for a tick whose key is held");
    let mut c = web.connect();
    assert!(stats(&mut c)["duplicates"].as_u64().unwrap() >= 2);
    drop(c);

    // The key free: ticks are claimed, keyed and stored, and run.
    let _: () = redis.query(&["DEL", &key]);
    wait_for("two ticks' jobs to run", || (runs().len() >= 2).then_some(()));

    // The next ticks claimed by another node first: nothing stored for them here.
    let now = unix_ms();
    let taken: Vec<u64> = (3..9).map(|s| (now / 1000 + s) * 1000).collect();
    for tick in &taken {
        let _: () = redis.query(&["SET", &format!("{{taskd}}:tick:keyed:{tick}"), "web-9/1", "PX", "120000"]);
    }
    let last = *taken.last().unwrap();
    wait_for("a tick claimed here after those another node has", || {
        claims().range(last + 1..).next().is_some().then_some(())
    });
    assert!(count(&web.log(), "claimed by node web-9 first") >= taken.len() - 1, "{}", web.log());
    web.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(web.wait_exit(std::time::Duration::from_secs(20)).is_some_and(|s| s.success()));

    // Every tick has its outcome: a job run once, a duplicate, or another node's claim.
    let claims = claims();
    let log = web.log();
    let mut stored = Vec::new();
    for (tick, value) in &claims {
        if taken.contains(tick) {
            assert_eq!(value, "web-9/1", "tick {tick}: another node's claim is left as it was");
            continue;
        }
        let (id, dup) = match value.strip_prefix("web-1/").map(|v| v.split_once(' ').unwrap_or((v, ""))) {
            Some((id, more)) => (id.parse::<u64>().unwrap(), more == "dup"),
            None => panic!("tick {tick} claimed as {value:?}"),
        };
        if dup {
            assert!(log.contains(&format!("job {id} has the key of job ")), "tick {tick}: job {id}\n{log}");
        } else {
            stored.push(id);
        }
    }
    assert!(stored.len() >= 2, "{claims:?}");
    wait_for("every stored tick's job to run", || (runs().len() >= stored.len()).then_some(()));
    let mut ran: Vec<u64> = runs().iter().filter_map(|l| l["task_id"].as_u64()).collect();
    ran.sort_unstable();
    stored.sort_unstable();
    assert_eq!(ran, stored, "each stored tick's job ran once, and no other");
}

/// Entries of `stream` taken by a consumer and not finished (none before its group exists).
fn pending_in(redis: &common::durable::Redis, stream: &str) -> u64 {
    let asked = redis.conn().and_then(|mut c| redis::cmd("XPENDING").arg(stream).arg("taskd").query(&mut c));
    match asked.unwrap_or(redis::Value::Nil) {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}

#[test]
fn a_flood_of_high_durable_jobs_does_not_hold_back_a_low_one_beyond_its_weighted_share() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let web = web(&redis, "web-1", &["--task-worker-num", "0"]);
    // One task process: the outbox's order is the order the jobs were taken in.
    let node = common::durable::TaskNode::start(&redis, "n1", &["--task-worker-num", "1"]);
    let mut c = web.connect();
    let long = c.submit(r#"{"type":"email","to":"long@example.com","simulate_ms":10000}"#);
    wait_for("the long job to be taken", || (redis.pending() == 1).then_some(()));
    let flood: String = (0..1000)
        .map(|i| {
            format!("{{\"type\":\"sms\",\"to\":\"+1555{i:07}\",\"priority\":\"high\",\"simulate_ms\":0}}\n")
        })
        .collect();
    c.send_raw(flood.as_bytes());
    for _ in 0..1000 {
        assert_eq!(c.recv()["event"], "accepted");
    }
    let low = c.submit(r#"{"type":"email","to":"low@example.com","priority":"low","simulate_ms":0}"#);
    assert_eq!(low["event"], "accepted", "{low}");
    // Each waits in its priority's stream behind the long job; `stats` counts them.
    assert_eq!(
        (redis.xlen("{taskd}:jobs#high"), redis.xlen("{taskd}:jobs#low"), redis.pending()),
        (1000, 1, 1),
        "the flood and the low job were to wait behind the long job"
    );
    let depths = wait_for("stats to count the durable jobs per priority", || {
        let s = stats(&mut c);
        let by = s["durable"]["by_priority"].clone();
        (by["high"] == 1000 && by["low"] == 1).then_some(by)
    });
    assert_eq!(depths["normal"], 1, "the long job: {depths}");
    let done = c.final_reply(&low["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    let outbox = node.outbox_lines();
    let first = outbox.iter().position(|l| l["task_id"] == long["task_id"]).unwrap();
    let at = outbox.iter().position(|l| l["task_id"] == low["task_id"]).unwrap();
    // High and low waiting, the shares are 6:1: the low job is among the first seven taken,
    // not behind the 1,000.
    let highs_before = at - first - 1;
    assert!(highs_before < 7, "{highs_before} high jobs ran before the low one");
    wait_for("the flood to be delivered", || (node.outbox_lines().len() == 1002).then_some(()));
}

#[test]
fn a_durable_jobs_priority_survives_a_wait_in_the_delayed_set_and_a_kill_9_of_its_task_process() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let web = web(&redis, "web-1", &["--task-worker-num", "0"]);
    let mut node = common::durable::TaskNode::start(
        &redis,
        "n1",
        &["--task-worker-num", "1", "--smtp-rate", "100/s", "--claim-timeout", "2"],
    );
    // The queue's email turn is taken 2 s ahead: the job waits in the delayed set (the path a
    // delivery retry takes), then comes back.
    let time: Vec<String> = redis.query(&["TIME"]);
    let redis_now_us = time[0].parse::<u64>().unwrap() * 1_000_000 + time[1].parse::<u64>().unwrap();
    let _: String = redis.query(&["SET", "{taskd}:rate:email", &(redis_now_us + 2_000_000).to_string()]);
    let mut c = web.connect();
    let job = c.submit(r#"{"type":"email","to":"vip@example.com","priority":"high","simulate_ms":4000}"#);
    let id = job["task_id"].as_u64().unwrap();
    let hash = wait_for("the job to wait in the delayed set", || {
        let members: Vec<String> = redis.query(&["ZRANGE", "{taskd}:delayed", "0", "-1"]);
        members.first().map(|m| format!("{{taskd}}:delayed:{m}"))
    });
    let pr: Option<String> = redis.query(&["HGET", &hash, "pr"]);
    assert_eq!(pr.as_deref(), Some("high"), "parked with its priority");
    // Back in the high stream when due, and running from there.
    wait_for("the job to run from the high stream", || {
        (pending_in(&redis, "{taskd}:jobs#high") == 1).then_some(())
    });
    assert_eq!(redis.xlen("{taskd}:jobs"), 0);
    // Its task process dies mid-job: the job is taken back from the same stream.
    let pids = node.task_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0] as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let done = c.final_reply(&job["task_id"], &mut Vec::new());
    assert_eq!((&done["event"], done["attempts"].as_u64()), (&"done".into(), Some(2)), "{done}");
    let runs: Vec<Value> = node.outbox_lines().into_iter().filter(|l| l["task_id"] == id).collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!((redis.xlen("{taskd}:jobs#high"), redis.xlen("{taskd}:jobs")), (0, 0));
    node.kill_all();
}

#[test]
fn ticks_missed_while_every_durable_web_node_was_down_run_once_not_once_per_node() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let (_dir, config) = schedule_config(
        r#"
[[schedule]]
name = "hourly"
cron = "0 0 * * * *"
missed = "once"
job = { type = "sms", to = "+15550007777", text = "caught up", simulate_ms = 0 }
"#,
    );
    // The queue last ran the schedule three hours ago: every node was down since.
    let three_hours_ago = (unix_ms() - 3 * 3600 * 1000) / 3_600_000 * 3_600_000;
    let _: String = redis.query(&["SET", "{taskd}:tick:hourly:last", &three_hours_ago.to_string()]);
    let start = |node: &str| ticking_web(&redis, node, &config, &[]);
    // Started together, both find the tick missed, most often before either claimed it; one
    // started later finds it claimed (the last tick is then the one that ran) and tries nothing.
    let (web1, web2) = std::thread::scope(|s| {
        let (a, b) = (s.spawn(|| start("web-1")), s.spawn(|| start("web-2")));
        (a.join().unwrap(), b.join().unwrap())
    });
    let node = common::durable::TaskNode::start(&redis, "n1", &["--task-worker-num", "1"]);
    let ((won1, lost1), (won2, lost2)) = wait_for("a node to run the missed tick", || {
        let (a, b) = (ticks_in_log(&web1.log(), "hourly"), ticks_in_log(&web2.log(), "hourly"));
        (a.0.len() + b.0.len() > 0).then_some((a, b))
    });
    assert_eq!(won1.len() + won2.len(), 1, "one node runs it: {won1:?} {won2:?}");
    // The tick claimed is the last that passed (the hour that began now); a node that lost it
    // names the same.
    let tick = won1.iter().chain(&won2).next().unwrap().clone();
    assert!(lost1.iter().chain(&lost2).all(|t| *t == tick), "{lost1:?} {lost2:?}");
    eprintln!("the missed tick {tick} was run by one node; {} lost it", lost1.len() + lost2.len());
    let tick_ms = chrono::DateTime::parse_from_rfc3339(&tick).unwrap().timestamp_millis() as u64;
    assert!(tick_ms % 3_600_000 == 0 && tick_ms <= unix_ms() && tick_ms + 3_600_000 > unix_ms(), "{tick}");
    let runner = if won1.is_empty() { web2.log() } else { web1.log() };
    assert!(runner.contains("tick(s) from") && runner.contains("running it once now"), "{runner}");
    wait_for("the missed tick's job to run", || {
        node.outbox_lines().iter().any(|l| l["to"] == "+15550007777").then_some(())
    });
    let last: String = redis.query(&["GET", "{taskd}:tick:hourly:last"]);
    assert_eq!(last, tick_ms.to_string());
    // A later job of either node runs after it: the missed tick ran once.
    let mut c = web2.connect();
    let later = c.submit(r#"{"type":"sms","to":"+15550008888","simulate_ms":0}"#);
    assert_eq!(c.final_reply(&later["task_id"], &mut Vec::new())["event"], "done");
    let runs = node.outbox_lines().into_iter().filter(|l| l["to"] == "+15550007777").count();
    assert_eq!(runs, 1, "{:?}", node.outbox_lines());
}

#[test]
fn a_dead_lettered_high_job_is_replayed_into_the_high_stream() {
    let Some(redis) = common::durable::Redis::start() else { return };
    // One run allowed: a run that dies with its task process dead-letters the job.
    let web = web(&redis, "web-1", &["--task-worker-num", "1", "--task-retry-max", "0"]);
    let mut c = web.connect();
    let id = c.submit(r#"{"type":"email","to":"vip@example.com","priority":"high","simulate_ms":3000}"#)
        ["task_id"]
        .as_u64()
        .unwrap();
    wait_for("the job to run from the high stream", || {
        (pending_in(&redis, "{taskd}:jobs#high") == 1).then_some(())
    });
    let victim = web.pids_of("taskd: task")[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let failed = c.final_reply(&serde_json::json!(id), &mut Vec::new());
    assert_eq!(failed["event"], "failed", "{failed}");
    let dead: Vec<(String, Vec<String>)> = redis.query(&["XRANGE", "{taskd}:dead", "-", "+"]);
    assert_eq!(dead.len(), 1, "{dead:?}");
    let pr = dead[0].1.chunks(2).find(|kv| kv[0] == "pr").map(|kv| kv[1].clone());
    assert_eq!(pr.as_deref(), Some("high"), "{dead:?}");
    let replay = common::run_with_timeout(
        std::process::Command::new(env!("CARGO_BIN_EXE_taskd")).args([
            "dead-letter",
            "replay",
            "--all",
            "--redis-url",
            redis.url.as_str(),
        ]),
        common::DEADLINE,
    );
    assert!(replay.status.success(), "{replay:?}");
    // Back in the high stream, and run from there.
    wait_for("the replayed job to run from the high stream", || {
        (pending_in(&redis, "{taskd}:jobs#high") == 1).then_some(())
    });
    assert_eq!(redis.xlen("{taskd}:jobs"), 0);
    wait_for("the replayed job to finish", || {
        web.outbox_lines().iter().any(|l| l["task_id"] == id).then_some(())
    });
}

#[test]
fn a_parked_job_with_a_forged_lane_does_not_stop_every_other_job_coming_back_from_the_delayed_set() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let web = web(&redis, "web-1", &["--task-worker-num", "1"]);
    // Written by someone else: a parked job whose lane names a key that is not a stream, due now.
    let _: () = redis.query(&["SET", "{taskd}:jobs:trap", "not a stream"]);
    let _: i64 = redis.query(&[
        "HSET",
        "{taskd}:delayed:forged-1",
        "o",
        "web-9",
        "t",
        "1",
        "s",
        "0",
        "w",
        "0",
        "d",
        r#"{"type":"sms","to":"+15550000000"}"#,
        "ln",
        "trap",
    ]);
    let _: i64 = redis.query(&["ZADD", "{taskd}:delayed", "0", "forged-1"]);
    // A job of this node's that waits in the delayed set too still comes back and runs.
    a_delayed_job_runs_and_the_set_empties(&redis, &web);
}

#[test]
fn a_parked_hash_of_more_fields_than_a_job_has_is_deleted_and_does_not_stop_the_others() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let web = web(&redis, "web-1", &["--task-worker-num", "1"]);
    // Written by someone else: a due member whose hash has 10,000 fields (more than Lua's
    // `unpack` takes: its error would stop every move of every job).
    let mut conn = redis.conn().expect("connect");
    let mut hset = redis::cmd("HSET");
    hset.arg("{taskd}:delayed:forged-big");
    for i in 0..10_000 {
        hset.arg(format!("f{i}")).arg("x");
    }
    let _: i64 = hset.query(&mut conn).expect("HSET");
    let _: i64 = redis.query(&["ZADD", "{taskd}:delayed", "0", "forged-big"]);
    a_delayed_job_runs_and_the_set_empties(&redis, &web);
    let exists: i64 = redis.query(&["EXISTS", "{taskd}:delayed:forged-big"]);
    assert_eq!(exists, 0);
    web.wait_log("1 deleted: a hash of over 64 fields is no job");
}

#[test]
fn a_priority_stream_made_a_string_by_someone_is_left_out_and_the_others_run_until_it_is_deleted() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let web = web(&redis, "web-1", &["--task-worker-num", "1"]);
    let mut c = web.connect();
    // Serving first: the consumer has made its groups and blocks on every stream.
    let first = c.submit(r#"{"type":"sms","to":"+15550000001","simulate_ms":0}"#);
    assert_eq!(c.final_reply(&first["task_id"], &mut Vec::new())["event"], "done");
    // Written by someone else: the low stream is a string now.
    let _: i64 = redis.query(&["DEL", "{taskd}:jobs#low"]);
    let _: () = redis.query(&["SET", "{taskd}:jobs#low", "not a stream"]);
    for priority in ["normal", "high"] {
        let job = c.submit(&format!(
            r#"{{"type":"sms","to":"+15550001111","priority":"{priority}","simulate_ms":0}}"#
        ));
        assert_eq!(job["event"], "accepted", "{job}");
        let done = c.final_reply(&job["task_id"], &mut Vec::new());
        assert_eq!(done["event"], "done", "{priority}: {done}");
    }
    let named = "the job stream {taskd}:jobs#low is a string key in Redis, not a stream";
    web.wait_log(named);
    // Mended: the low stream is read again.
    let _: i64 = redis.query(&["DEL", "{taskd}:jobs#low"]);
    let low = c.submit(r#"{"type":"sms","to":"+15550002222","priority":"low","simulate_ms":0}"#);
    assert_eq!(low["event"], "accepted", "{low}");
    let done = c.final_reply(&low["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    // Named once (its one task process; once a minute at most), not at every read.
    let log = web.log();
    assert_eq!(log.matches(named).count(), 1, "{log}");
    assert!(log.contains("{taskd}:jobs#low is no longer a key of another type"), "{log}");
}

#[test]
fn a_node_that_finds_a_job_stream_of_another_type_at_start_names_the_key() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let url = redis.url.clone();
    let start = || Daemon::try_start(&["--redis-url", &url, "--node-id", "web-1"]);
    for (key, kind) in [("{taskd}:jobs#low", "string"), ("{taskd}:jobs", "string")] {
        let _: () = redis.query(&["SET", key, "not a stream"]);
        let Err((status, log)) = start() else { panic!("started with {key} a {kind}") };
        assert!(
            log.contains(&format!("{key} (a {kind}) is not a stream (someone else wrote it)")),
            "{status}: {log}"
        );
        let _: i64 = redis.query(&["DEL", key]);
    }
    // Mended: it starts and runs a low job.
    let web = start().unwrap_or_else(|(status, log)| panic!("{status}: {log}"));
    let mut c = web.connect();
    let low = c.submit(r#"{"type":"sms","to":"+15550002222","priority":"low","simulate_ms":0}"#);
    assert_eq!(c.final_reply(&low["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn a_job_whose_stream_is_made_a_string_while_it_runs_is_answered_and_the_others_still_run() {
    let Some(redis) = common::durable::Redis::start() else { return };
    let web = web(&redis, "web-1", &["--task-worker-num", "1"]);
    let mut c = web.connect();
    let low = c.submit(r#"{"type":"sms","to":"+15550000001","priority":"low","simulate_ms":1500}"#);
    wait_for("the low job to be taken", || (pending_in(&redis, "{taskd}:jobs#low") == 1).then_some(()));
    // Written by someone else while it runs: its stream (and its entry) is a string now.
    let _: i64 = redis.query(&["DEL", "{taskd}:jobs#low"]);
    let _: () = redis.query(&["SET", "{taskd}:jobs#low", "not a stream"]);
    let done = c.final_reply(&low["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "it ran: its answer is written, with nothing to acknowledge: {done}");
    let job = c.submit(r#"{"type":"sms","to":"+15550001111","simulate_ms":0}"#);
    let done = c.final_reply(&job["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    let kind: String = redis.query(&["TYPE", "{taskd}:jobs#low"]);
    assert_eq!(kind, "string", "left as it was found");
}

#[test]
fn a_job_whose_stream_someone_made_a_string_fails_alone_and_the_rest_of_its_round_is_accepted_and_runs_once()
{
    let Some(redis) = common::durable::Redis::start() else { return };
    let web = web(&redis, "web-1", &["--task-worker-num", "2"]);
    let mut clients: Vec<Client> = (0..3).map(|_| web.connect()).collect();
    let sms = |n: usize, priority: &str| {
        format!("{{\"type\":\"sms\",\"to\":\"+1555{n:07}\",\"priority\":\"{priority}\",\"simulate_ms\":0}}\n")
    };
    // A flow of jobs: three writes of ten from each client. Before the second, someone makes
    // the low stream a string; each client's second write has one low job among nine normal
    // ones, read in one turn and stored in one round with them (and with other clients').
    for write in 0..3 {
        if write == 1 {
            let _: i64 = redis.query(&["DEL", "{taskd}:jobs#low"]);
            let _: () = redis.query(&["SET", "{taskd}:jobs#low", "not a stream"]);
        }
        for (k, c) in clients.iter_mut().enumerate() {
            let lines: String = (0..10)
                .map(|j| sms(write * 100 + k * 10 + j, if write == 1 && j == 5 { "low" } else { "normal" }))
                .collect();
            c.send_raw(lines.as_bytes());
        }
    }
    let mut ran = Vec::new();
    for c in &mut clients {
        let (mut accepted, mut done, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        while done.len() < 29 || failed.is_empty() {
            let v = c.recv();
            let id = v["task_id"].as_u64().unwrap_or_else(|| panic!("{v}"));
            match v["event"].as_str() {
                Some("accepted") => {
                    assert!(!accepted.contains(&id), "{v}");
                    accepted.push(id);
                }
                Some("done") => {
                    assert!(
                        accepted.contains(&id) && !done.contains(&id),
                        "done, not accepted or twice: {v}"
                    );
                    done.push(id);
                }
                Some("failed") => {
                    // Only the job that was not stored fails, and it was never `accepted`.
                    assert!(failed.is_empty() && !accepted.contains(&id), "{v}");
                    let error = v["error"].as_str().unwrap_or_default();
                    assert!(
                        error.contains("will not run: {taskd}:jobs#low is a string key, not a stream"),
                        "{v}"
                    );
                    failed.push(id);
                }
                _ => panic!("{v}"),
            }
        }
        assert_eq!(accepted.len(), 29);
        ran.extend(done);
        ran.push(failed[0]);
    }
    // Every job answered `done` ran once; the one that failed never did.
    let outbox = web.outbox_lines();
    for (i, id) in ran.iter().enumerate() {
        let runs = outbox.iter().filter(|l| l["task_id"].as_u64() == Some(*id)).count();
        let want = usize::from(i % 30 != 29);
        assert_eq!(runs, want, "job {id} ran {runs} times");
    }
    let kind: String = redis.query(&["TYPE", "{taskd}:jobs#low"]);
    assert_eq!(kind, "string", "left as it was found");
}

/// A job of `web`'s, sent to wait 300 ms in the delayed set, comes back and runs; after it the
/// set is empty (whatever else was due in it has been moved or dropped).
fn a_delayed_job_runs_and_the_set_empties(redis: &common::durable::Redis, web: &Daemon) {
    let mut c = web.connect();
    let job = c.submit(r#"{"type":"sms","to":"+15550001111","run_in_ms":300,"simulate_ms":0}"#);
    let done = c.final_reply(&job["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    let left: Vec<String> = redis.query(&["ZRANGE", "{taskd}:delayed", "0", "-1"]);
    assert!(left.is_empty(), "{left:?}");
}
