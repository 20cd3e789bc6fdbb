//! Handlers in any language (issue 18, memory mode): jobs run by a Python or shell program a
//! task process keeps as its child, spoken to in JSON lines, with its faults.

mod common;

use std::path::PathBuf;

use common::{Client, Daemon};
use serde_json::Value;

/// A handler in Python: echoes its pid, attempt and job; `"do"` in the job picks a fault.
const PYTHON: &str = r#"
import json, os, sys, time
for line in sys.stdin:
    msg = json.loads(line)
    tid, job, attempt = msg["task_id"], msg["job"], msg["attempt"]
    what = job.get("do", "echo")
    if (what == "die" and attempt == 1) or what == "die-always":
        os.kill(os.getpid(), 9)
    if what == "hang":
        time.sleep(3600)
    if what == "garbage":
        print("this is not json", flush=True)
        continue
    if what == "other-id":
        print(json.dumps({"task_id": tid + 1000, "result": 1}), flush=True)
        continue
    if what == "fail":
        print(json.dumps({"task_id": tid, "error": "bad input", "retry": False}), flush=True)
        continue
    if what == "say":
        print("hello from the handler", file=sys.stderr, flush=True)
    print(json.dumps({"task_id": tid, "result": {"pid": os.getpid(), "attempt": attempt, "job": job}}), flush=True)
"#;

/// A mail handler in shell, to override the built-in `email`.
const SHELL: &str = r#"
while read -r line; do
  id=${line#*\"task_id\":}; id=${id%%,*}
  printf '{"task_id":%s,"result":"sent by the shell handler"}\n' "$id"
done
"#;

struct Scripts {
    _dir: tempfile::TempDir,
    python: PathBuf,
    shell: PathBuf,
}

/// The handlers, written into a temp dir; `None` (after `cannot_run`) without python3.
fn scripts() -> Option<Scripts> {
    if common::which("python3").is_none() {
        common::cannot_run("python", "python3 is not installed: the handler tests run a Python handler");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let python = dir.path().join("handler.py");
    let shell = dir.path().join("mail.sh");
    std::fs::write(&python, PYTHON).unwrap();
    std::fs::write(&shell, SHELL).unwrap();
    Some(Scripts { _dir: dir, python, shell })
}

fn start(scripts: &Scripts, extra: &[&str]) -> Daemon {
    let echo = format!("echo=python3 {}", scripts.python.display());
    let mut args = vec!["--worker-num", "1", "--task-worker-num", "1", "--handler", &echo];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

/// Submits `line`, returns the job's final reply.
fn run(client: &mut Client, line: &str) -> Value {
    let accepted = client.submit(line);
    client.final_reply(&accepted["task_id"], &mut Vec::new())
}

#[test]
fn a_handled_job_is_accepted_then_done_with_the_result_and_its_stderr_is_logged() {
    let Some(scripts) = scripts() else { return };
    let daemon = start(&scripts, &[]);
    let mut client = daemon.connect();
    let accepted = client.submit(r#"{"type":"echo","do":"say","n":[1,2]}"#);
    assert_eq!(accepted["type"], "echo", "{accepted}");
    let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["result"]["job"]["n"], serde_json::json!([1, 2]), "{done}");
    assert_eq!((done["attempts"].as_u64(), done["result"]["attempt"].as_u64()), (Some(1), Some(1)), "{done}");
    let log = daemon.wait_log("hello from the handler");
    let line = log.lines().find(|l| l.contains("hello from the handler")).unwrap();
    assert!(line.contains("task 0"), "logged under the task process's name: {line}");

    client.send(r#"{"type":"fax","to":"x"}"#);
    let error = client.recv();
    assert_eq!(error["event"], "error", "{error}");
    let text = error["error"].as_str().unwrap();
    assert!(
        text.contains("unknown type \"fax\"") && text.contains("\"echo\"") && text.contains("\"email\""),
        "{text}"
    );
}

#[test]
fn a_handler_overrides_the_built_in_email() {
    let Some(scripts) = scripts() else { return };
    let mail = format!("email=sh {}", scripts.shell.display());
    let daemon = start(&scripts, &["--handler", &mail]);
    let mut client = daemon.connect();
    for line in [r#"{"type":"email","to":"a@example.com","template":"welcome"}"#, "email b@example.com hi"] {
        let done = run(&mut client, line);
        assert_eq!(
            (&done["event"], &done["result"]),
            (&"done".into(), &"sent by the shell handler".into()),
            "{done}"
        );
    }
    // The built-in delivery did not run: it would have written to the outbox.
    assert!(daemon.outbox_lines().is_empty(), "{:?}", daemon.outbox_lines());
    // SMS is still built in.
    let done = run(&mut client, r#"{"type":"sms","to":"+15551234567","simulate_ms":0}"#);
    assert_eq!(done["result"], "SMS:+15551234567, sent", "{done}");
}

#[test]
fn a_handler_killed_mid_job_runs_the_job_again_on_a_new_handler() {
    let Some(scripts) = scripts() else { return };
    let daemon =
        start(&scripts, &["--retry-base-ms", "10", "--retry-cap-ms", "50", "--delivery-retry-max", "2"]);
    let mut client = daemon.connect();
    let done = run(&mut client, r#"{"type":"echo","do":"die"}"#);
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!((done["attempts"].as_u64(), done["result"]["attempt"].as_u64()), (Some(2), Some(2)), "{done}");
    daemon.wait_log("ended mid-job");
    // A transient failure (a delivery retry), not a task process's death; past
    // delivery_retry_max the job fails with the handler's fault.
    let failed = run(&mut client, r#"{"type":"echo","do":"die-always"}"#);
    assert_eq!((&failed["event"], failed["attempts"].as_u64()), (&"failed".into(), Some(3)), "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("ended mid-job"), "{failed}");
    client.send("stats");
    let stats = client.recv();
    assert_eq!((stats["task_crashes"].as_u64(), stats["retries"].as_u64()), (Some(0), Some(3)), "{stats}");
}

#[test]
fn a_wrong_answer_fails_the_job_with_the_reason_and_restarts_the_handler() {
    let Some(scripts) = scripts() else { return };
    let daemon = start(&scripts, &[]);
    let mut client = daemon.connect();
    let first = run(&mut client, r#"{"type":"echo"}"#);
    let pid = first["result"]["pid"].as_u64().unwrap();
    let failed = run(&mut client, r#"{"type":"echo","do":"garbage"}"#);
    assert_eq!((&failed["event"], failed["attempts"].as_u64()), (&"failed".into(), Some(1)), "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("\"this is not json\" is not a JSON answer"),
        "{failed}"
    );
    let failed = run(&mut client, r#"{"type":"echo","do":"other-id"}"#);
    assert!(failed["error"].as_str().unwrap().contains("the answer is for task_id"), "{failed}");
    let after = run(&mut client, r#"{"type":"echo"}"#);
    assert_eq!(after["event"], "done", "{after}");
    assert_ne!(after["result"]["pid"].as_u64(), Some(pid), "a new handler after a wrong answer");
}

#[test]
fn a_handler_that_fails_at_start_is_started_again_after_a_growing_wait() {
    let Some(scripts) = scripts() else { return };
    let crash = "crash=sh -c 'read line; exit 3'";
    let retries = ["--delivery-retry-max", "3", "--retry-base-ms", "1", "--retry-cap-ms", "5"];
    let daemon = start(&scripts, &[&["--handler", crash][..], &retries[..]].concat());
    let mut client = daemon.connect();
    let failed = run(&mut client, r#"{"type":"crash"}"#);
    assert_eq!((&failed["event"], failed["attempts"].as_u64()), (&"failed".into(), Some(4)), "{failed}");
    let log = daemon.log();
    let waits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("handler crash failed within 1s of its start"))
        .filter_map(|l| l.rsplit("starting it again in ").next())
        .collect();
    assert_eq!(waits, ["50 ms", "100 ms", "200 ms"], "{log}");
    // A handler that answers starts over: the other type was never held back.
    assert_eq!(run(&mut client, r#"{"type":"echo"}"#)["event"], "done");
    assert!(!log.contains("handler echo failed within"), "{log}");
}

#[test]
fn retry_false_fails_at_once() {
    let Some(scripts) = scripts() else { return };
    let daemon = start(&scripts, &[]);
    let mut client = daemon.connect();
    let failed = run(&mut client, r#"{"type":"echo","do":"fail"}"#);
    assert_eq!((&failed["event"], failed["attempts"].as_u64()), (&"failed".into(), Some(1)), "{failed}");
    assert_eq!(failed["error"], "handler: bad input", "{failed}");
}

#[test]
fn a_missing_command_fails_its_jobs_and_is_logged_once() {
    let Some(scripts) = scripts() else { return };
    let daemon = start(&scripts, &["--handler", "ghost=/nonexistent/ghost-handler --flag"]);
    let mut client = daemon.connect();
    for _ in 0..3 {
        let failed = run(&mut client, r#"{"type":"ghost"}"#);
        assert_eq!((&failed["event"], failed["attempts"].as_u64()), (&"failed".into(), Some(1)), "{failed}");
        assert!(failed["error"].as_str().unwrap().contains("cannot start the handler of ghost"), "{failed}");
    }
    // The other handler still works, in the same task process.
    assert_eq!(run(&mut client, r#"{"type":"echo"}"#)["event"], "done");
    // The task process says why once; each job's failure is logged as any job's is.
    let log = daemon.log();
    let said =
        log.lines().filter(|l| l.contains("task 0[") && l.contains("cannot start the handler")).count();
    assert_eq!(said, 1, "{log}");
}

#[test]
fn handler_max_jobs_recycles_the_handler() {
    let Some(scripts) = scripts() else { return };
    let daemon = start(&scripts, &["--handler-max-jobs", "2"]);
    let mut client = daemon.connect();
    let pids: Vec<u64> =
        (0..5).map(|_| run(&mut client, r#"{"type":"echo"}"#)["result"]["pid"].as_u64().unwrap()).collect();
    assert!(pids[0] == pids[1] && pids[2] == pids[3], "{pids:?}");
    assert!(pids[1] != pids[2] && pids[3] != pids[4], "{pids:?}");
    assert!(common::is_dead(pids[0] as u32), "the replaced handler is gone");
    daemon.wait_log("replaced after 2 jobs (handler_max_jobs)");
}

#[test]
fn a_handler_that_does_not_answer_within_task_timeout_dies_with_its_task_process() {
    let Some(scripts) = scripts() else { return };
    let daemon = start(&scripts, &["--task-timeout", "1", "--task-retry-max", "0"]);
    let mut client = daemon.connect();
    let failed = run(&mut client, r#"{"type":"echo","do":"hang"}"#);
    assert_eq!(failed["event"], "failed", "{failed}");
    let log = daemon.log();
    let started = log.lines().find(|l| l.contains("handler echo started (pid ")).expect("handler started");
    let pid: u32 = started.split("(pid ").nth(1).and_then(|s| s.split(')').next()).unwrap().parse().unwrap();
    common::wait_for("the hung handler to die with its task process", || common::is_dead(pid).then_some(()));
    // The next job runs on a new task process and a new handler.
    let done = run(&mut client, r#"{"type":"echo"}"#);
    assert_ne!(done["result"]["pid"].as_u64(), Some(u64::from(pid)), "{done}");
}

// ----- examples/handlers and examples/clients -----

/// `examples/…` from the crate's root, as the README runs them.
fn example(path: &str) -> String {
    format!("{}/examples/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// Whether every tool is installed; if not, `cannot_run` says which (and the test returns).
fn have(key: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| common::which(t).is_none()).collect();
    if !missing.is_empty() {
        common::cannot_run(key, &format!("{} not installed: the example needs it", missing.join(", ")));
    }
    missing.is_empty()
}

/// A daemon whose `wordcount` jobs run on the example handler `command`.
fn wordcount_daemon(command: &str) -> Daemon {
    let handler = format!("wordcount={command}");
    Daemon::start(&["--worker-num", "1", "--task-worker-num", "2", "--handler", &handler])
}

/// Runs an example client (`tool examples/clients/FILE ADDR JOB`): its stdout, as JSON lines.
fn run_client(tool: &str, file: &str, daemon: &Daemon, job: &str) -> Vec<Value> {
    let out = common::run_with_timeout(
        std::process::Command::new(tool)
            .arg(example(&format!("clients/{file}")))
            .arg(daemon.addr.to_string())
            .arg(job),
        common::DEADLINE,
    );
    assert!(out.status.success(), "{tool} {file}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{file} printed {l:?}, not a reply: {e}")))
        .collect()
}

/// The example handler of one language counts words and refuses a job without text for good;
/// the client in the same language submits both and reads to the final reply.
fn example_in(lang: &str, tool: &str, handler: &str, client: &str) {
    let daemon = wordcount_daemon(&format!("{tool} {}", example(&format!("handlers/{handler}"))));
    let replies = run_client(tool, client, &daemon, r#"{"type":"wordcount","text":"one two  three\nfour"}"#);
    assert_eq!(replies.len(), 2, "accepted, then done: {replies:?}");
    assert_eq!(
        (&replies[0]["event"], &replies[0]["type"]),
        (&"accepted".into(), &"wordcount".into()),
        "{replies:?}"
    );
    let done = &replies[1];
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["task_id"], replies[0]["task_id"], "{done}");
    assert_eq!(done["result"], serde_json::json!({"words": 4, "by": lang}), "{done}");

    let replies = run_client(tool, client, &daemon, r#"{"type":"wordcount","text":7}"#);
    let failed = replies.last().unwrap();
    assert_eq!((&failed["event"], failed["attempts"].as_u64()), (&"failed".into(), Some(1)), "{replies:?}");
    assert_eq!(failed["error"], "handler: the job needs a \"text\" string", "{failed}");
}

#[test]
fn the_python_example_handler_and_client() {
    if have("python", &["python3"]) {
        example_in("python", "python3", "wordcount.py", "submit.py");
    }
}

#[test]
fn the_php_example_handler_and_client() {
    if have("php", &["php"]) {
        example_in("php", "php", "wordcount.php", "submit.php");
    }
}

#[test]
fn the_node_example_handler_and_client() {
    if have("node", &["node"]) {
        example_in("node", "node", "wordcount.js", "submit.js");
    }
}

#[test]
fn the_shell_example_handler() {
    if !have("jq", &["sh", "jq", "wc"]) {
        return;
    }
    let daemon = wordcount_daemon(&format!("sh {}", example("handlers/wordcount.sh")));
    let mut client = daemon.connect();
    let done = run(&mut client, r#"{"type":"wordcount","text":"it's a \"quoted\"\ttext"}"#);
    assert_eq!(done["result"], serde_json::json!({"words": 4, "by": "sh"}), "{done}");
    let failed = run(&mut client, r#"{"type":"wordcount"}"#);
    assert_eq!(failed["error"], "handler: the job needs a \"text\" string", "{failed}");
}

#[test]
fn the_readme_shows_the_example_clients_as_they_are() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (lang, file) in [("python", "submit.py"), ("php", "submit.php"), ("js", "submit.js")] {
        let link = format!("(examples/clients/{file})):\n\n```{lang}\n");
        let start = readme.find(&link).unwrap_or_else(|| panic!("the README shows {file} after its link"))
            + link.len();
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        let source = std::fs::read_to_string(example(&format!("clients/{file}"))).unwrap();
        assert!(source.contains(block), "the README's {file} is not the example's code:\n{block}");
    }
}

// ----- durable jobs (--redis-url, taskd task-node) -----

/// A handler that asks for a retry on a job's first attempt and answers on the next; it
/// appends one line per run to the file named by the job's `"runs"`.
const FLAKY: &str = r#"
import json, os, sys
for line in sys.stdin:
    msg = json.loads(line)
    job = msg["job"]
    with open(job["runs"], "a") as f:
        f.write(f"{msg['task_id']} {msg['attempt']}\n")
    if msg["attempt"] == 1:
        print(json.dumps({"task_id": msg["task_id"], "error": "try later", "retry": True}), flush=True)
    else:
        print(json.dumps({"task_id": msg["task_id"], "result": {"pid": os.getpid(), "attempt": msg["attempt"]}}), flush=True)
"#;

/// A durable node (`web`, one task process) whose `flaky` lane runs FLAKY, retrying after
/// 10–50 ms; with the file FLAKY appends each run to.
fn flaky_durable_node(scripts: &Scripts, redis: &common::durable::Redis) -> (Daemon, PathBuf) {
    let flaky = scripts.python.with_file_name("flaky.py");
    std::fs::write(&flaky, FLAKY).unwrap();
    let runs = scripts.python.with_file_name("runs.txt");
    let handler = format!("flaky=python3 {}", flaky.display());
    let daemon = Daemon::start(&[
        "--redis-url",
        &redis.url,
        "--node-id",
        "web",
        "--task-worker-num",
        "1",
        "--handler",
        &handler,
        "--retry-base-ms",
        "10",
        "--retry-cap-ms",
        "50",
    ]);
    (daemon, runs)
}

#[test]
fn a_durable_handler_job_that_asks_for_a_retry_runs_twice_in_its_lane_and_ends_done() {
    let Some(scripts) = scripts() else { return };
    let Some(redis) = common::durable::Redis::start() else { return };
    let (daemon, runs) = flaky_durable_node(&scripts, &redis);
    let mut client = daemon.connect();
    let line = serde_json::json!({"type": "flaky", "runs": runs}).to_string();
    let accepted = client.submit(&line);
    let mut others = Vec::new();
    let done = client.final_reply(&accepted["task_id"], &mut others);
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!((done["attempts"].as_u64(), done["result"]["attempt"].as_u64()), (Some(2), Some(2)), "{done}");
    assert!(others.iter().any(|v| v["event"] == "retrying"), "a retrying notice first: {others:?}");
    let id = accepted["task_id"].as_u64().unwrap();
    let ran = std::fs::read_to_string(&runs).unwrap();
    assert_eq!(ran, format!("{id} 1\n{id} 2\n"), "exactly two runs");
    // It went through its lane, parked and back, and nothing is left anywhere.
    common::wait_for("the lane and the delayed set to empty", || {
        let left = redis.xlen("{taskd}:jobs:flaky") + redis.query::<u64>(&["ZCARD", "{taskd}:delayed"]);
        (left == 0).then_some(())
    });
    // Added to its lane by the web node, and again when its retry was due: never to the main
    // stream, which every node reads.
    let added = |key: &str| -> i64 {
        let info: std::collections::HashMap<String, redis::Value> = redis.query(&["XINFO", "STREAM", key]);
        match info.get("entries-added") {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("XINFO STREAM {key}: entries-added {other:?}"),
        }
    };
    assert_eq!((added("{taskd}:jobs:flaky"), added("{taskd}:jobs")), (2, 0));
    assert_eq!(redis.xlen("{taskd}:dead"), 0);
}

#[test]
fn a_type_no_node_runs_stays_queued_in_its_lane_until_a_task_node_with_its_handler_comes() {
    let Some(scripts) = scripts() else { return };
    let Some(redis) = common::durable::Redis::start() else { return };
    // The web node accepts `echo` jobs but runs none; a task node without the handler runs email only.
    let daemon = Daemon::start(&[
        "--redis-url",
        &redis.url,
        "--node-id",
        "web",
        "--task-worker-num",
        "1",
        "--queue-types",
        "echo",
    ]);
    let plain = common::durable::TaskNode::start(&redis, "plain", &["--task-worker-num", "1"]);
    let mut client = daemon.connect();
    let echo = client.submit(r#"{"type":"echo","n":1}"#);
    // An email submitted after it is done: the consumers run, and leave the echo job alone.
    let mail = client.submit(r#"{"type":"email","to":"a@example.com","simulate_ms":0}"#);
    let mut others = Vec::new();
    let done = client.final_reply(&mail["task_id"], &mut others);
    assert_eq!(done["event"], "done", "{done}");
    assert!(others.iter().all(|v| v["task_id"] != echo["task_id"]), "{others:?}");
    assert_eq!(redis.xlen("{taskd}:jobs:echo"), 1, "queued in its lane");
    assert_eq!(redis.xlen("{taskd}:dead"), 0, "not dead-lettered");
    common::wait_for("stats to show the queued job in its lane", || {
        client.send("stats");
        (client.recv()["durable"]["lanes"]["echo"] == 1).then_some(())
    });
    drop(plain);
    // A node that can run it takes it.
    let handler = format!("echo=python3 {}", scripts.python.display());
    let runner = common::durable::TaskNode::start(
        &redis,
        "runner",
        &["--task-worker-num", "1", "--handler", &handler],
    );
    let done = client.final_reply(&echo["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["result"]["job"]["n"], 1, "{done}");
    assert!(runner.task_pids().contains(&(done["task_pid"].as_u64().unwrap() as u32)), "{done}");
    common::wait_for("the lane to empty", || (redis.xlen("{taskd}:jobs:echo") == 0).then_some(()));
}

#[test]
fn a_lane_stream_made_a_hash_by_someone_is_left_out_and_the_main_stream_runs_until_it_is_deleted() {
    let Some(scripts) = scripts() else { return };
    let Some(redis) = common::durable::Redis::start() else { return };
    let (daemon, runs) = flaky_durable_node(&scripts, &redis);
    let mut client = daemon.connect();
    let first = client.submit(r#"{"type":"sms","to":"+15550000001","simulate_ms":0}"#);
    assert_eq!(client.final_reply(&first["task_id"], &mut Vec::new())["event"], "done");
    // Written by someone else: the lane's stream is a hash now.
    let _: i64 = redis.query(&["DEL", "{taskd}:jobs:flaky"]);
    let _: i64 = redis.query(&["HSET", "{taskd}:jobs:flaky", "f", "v"]);
    let job = client.submit(r#"{"type":"sms","to":"+15550001111","priority":"high","simulate_ms":0}"#);
    let done = client.final_reply(&job["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    let named = "the job stream {taskd}:jobs:flaky is a hash key in Redis, not a stream";
    daemon.wait_log(named);
    // Mended: the lane is read again, and its job (and its retry, parked and back) runs.
    let _: i64 = redis.query(&["DEL", "{taskd}:jobs:flaky"]);
    let line = serde_json::json!({"type": "flaky", "runs": runs}).to_string();
    let accepted = client.submit(&line);
    assert_eq!(accepted["event"], "accepted", "{accepted}");
    let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    let log = daemon.log();
    assert_eq!(log.matches(named).count(), 1, "{log}");
}
