//! What a newcomer trips on (issue 22): answers that say what is true, and no silence where a
//! person expects a word.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, DEADLINE};

#[test]
fn a_batch_larger_than_the_queue_is_too_large_not_busy() {
    let daemon = Daemon::start(&["--task-queue-max", "3", "--simulate-ms", "0"]);
    let mut client = daemon.connect();
    let jobs: Vec<String> =
        (0..5).map(|i| format!(r#"{{"type":"email","to":"u{i}@example.com"}}"#)).collect();
    client.send(&format!(r#"{{"type":"batch","jobs":[{}]}}"#, jobs.join(",")));
    let refused = client.recv();
    assert_eq!(refused["event"], "error", "{refused}");
    let why = refused["error"].as_str().unwrap();
    assert!(why.starts_with("too large for the queue (5 jobs, the queue holds 3"), "{refused}");
    assert!(!why.contains("busy"), "{refused}");
    // One that fits is accepted, the queue being empty.
    client.send(&format!(r#"{{"type":"batch","jobs":[{}]}}"#, jobs[..3].join(",")));
    assert_eq!(client.recv()["event"], "accepted");
}

#[test]
fn the_result_of_a_delivered_job_is_kept_for_a_query() {
    let daemon = Daemon::start(&["--simulate-ms", "0"]);
    let mut client = daemon.connect();
    let accepted = client.submit("kept@example.com");
    let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done");
    // The client had its `done`; asked again (from another connection), the same line.
    let mut other = daemon.connect();
    other.send(&format!(r#"{{"type":"result","task_id":{}}}"#, accepted["task_id"]));
    assert_eq!(other.recv(), done);
    // A batch's reply too.
    other.send(r#"{"type":"batch","jobs":[{"type":"sms","to":"+8613800138000"},{"type":"email","to":"kept2@example.com"}]}"#);
    let batch = other.recv();
    assert_eq!(batch["event"], "accepted", "{batch}");
    let done = other.final_reply(&batch["task_id"], &mut Vec::new());
    other.send(&format!(r#"{{"type":"result","task_id":{}}}"#, batch["task_id"]));
    let again = other.recv();
    // The master's record of a batch has each member's result (not the application's `to`).
    let results = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["results"].as_array().unwrap().iter().map(|m| m["result"].clone()).collect()
    };
    assert_eq!(again["event"], "done", "{again}");
    assert_eq!(results(&again), results(&done), "{again} vs {done}");
    // An id never given out: what is true, not "not among the 10000 most recent".
    other.send(r#"{"type":"result","task_id":999999}"#);
    let unknown = other.recv();
    let why = unknown["error"].as_str().unwrap();
    assert!(why.contains("no job of that id is running") && why.contains("2 kept now"), "{unknown}");
}

#[test]
fn a_flood_of_refused_jobs_writes_one_warning_not_one_each() {
    let daemon = Daemon::start(&["--task-queue-max", "1", "--simulate-ms", "3000"]);
    let mut client = daemon.connect();
    client.submit("held@example.com");
    for i in 0..50 {
        client.send(&format!("flood{i}@example.com"));
    }
    for _ in 0..50 {
        let busy = client.recv();
        assert!(busy["error"].as_str().is_some_and(|e| e.starts_with("server busy")), "{busy}");
    }
    // Every answer was written after its worker logged (or held back) its warning.
    client.send("stats");
    while client.recv()["event"] != "stats" {}
    let log = daemon.log();
    assert_eq!(log.matches("task not accepted").count(), 1, "{log}");
}

#[test]
fn clients_that_send_over_long_lines_write_one_warning_not_one_each() {
    let daemon = Daemon::start(&["--package-max-length", "1024"]);
    let long = "x".repeat(2000);
    for _ in 0..20 {
        let mut client = daemon.connect();
        client.send(&long);
        let refused = client.recv();
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("request line longer than package_max_length")),
            "{refused}"
        );
    }
    // Every answer was written after the master logged (or held back) its warning.
    let log = daemon.log();
    assert_eq!(log.matches("longer than package_max_length (1024 bytes); closing").count(), 1, "{log}");
}

/// `loadgen … | head -1`: once `head` has its line and is gone, the rest of the report meets a
/// closed pipe.
#[test]
fn loadgen_whose_stdout_is_closed_exits_without_a_panic_and_leaves_no_taskd() {
    let leftovers = common::Leftovers::guard();
    let dir = tempfile::tempdir().unwrap();
    // A pipe whose reading end is closed already: loadgen's first line meets EPIPE. Not
    // inherited by what other tests start meanwhile, which would keep a reader open.
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    drop(reader);
    let stderr = dir.path().join("stderr");
    let taskd = env!("CARGO_BIN_EXE_taskd");
    let loadgen = Path::new(taskd).parent().unwrap().join("examples").join("loadgen");
    let mut cmd = Command::new(loadgen);
    common::tag(&mut cmd)
        .args(["--taskd", taskd, "--conns", "1", "--window", "1", "--warmup", "0", "--seconds", "0.2"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(std::fs::File::create(&stderr).unwrap());
    let mut child = cmd.spawn().expect("start loadgen");
    // It starts a daemon, runs, and stops it: on a loaded machine, give it time.
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for loadgen") {
            break status;
        }
        assert!(start.elapsed() < 3 * DEADLINE, "loadgen still runs after {:?}", 3 * DEADLINE);
        std::thread::sleep(Duration::from_millis(20));
    };
    let said = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(status.success(), "{status}: {said}");
    assert!(!said.contains("panicked"), "{said}");
    // The daemon it started is stopped, and none of its processes is left.
    common::wait_for("loadgen's taskd to be gone", || leftovers.pids().is_empty().then_some(()));
}
