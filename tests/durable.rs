//! Durable jobs through Redis Streams (`--redis-url`): a real redis-server per test, web and
//! task nodes as separate processes, and the failures the README's table promises to survive.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::durable::{Redis, TaskNode};
use common::{http_get, is_dead, processes, reap_orphans, wait_for, Client, Daemon};
use nix::sys::signal::Signal;
use serde_json::Value;

fn web(redis: &Redis, node: &str, args: &[&str]) -> Daemon {
    let mut all = vec!["--redis-url", redis.url.as_str(), "--node-id", node];
    all.extend_from_slice(args);
    Daemon::start(&all)
}

fn job(i: usize, simulate_ms: u64) -> String {
    format!(r#"{{"type":"email","to":"user{i}@example.com","simulate_ms":{simulate_ms}}}"#)
}

/// Every `done` or `failed` line, by task id, until each of `ids` has one.
fn finals(c: &mut Client, ids: &[u64]) -> HashMap<u64, Value> {
    let mut got: HashMap<u64, Value> = HashMap::new();
    while !ids.iter().all(|id| got.contains_key(id)) {
        let v = c.recv();
        if v["event"] == "done" || v["event"] == "failed" {
            let id = v["task_id"].as_u64().expect("task_id");
            assert!(got.insert(id, v.clone()).is_none(), "a second final reply for task {id}: {v}");
        }
    }
    got
}

fn ask_result(c: &mut Client, id: u64) -> Value {
    c.send(&format!(r#"{{"type":"result","task_id":{id}}}"#));
    c.recv()
}

/// `kill -9` the master; waits until every process of the daemon is gone.
fn kill_daemon(d: &Daemon) {
    let group: Vec<u32> = processes().into_iter().filter(|p| p.pgid == d.pid).map(|p| p.pid).collect();
    d.signal(Signal::SIGKILL);
    wait_for("the killed daemon's processes to be gone", || {
        reap_orphans(&group);
        group.iter().all(|&p| is_dead(p)).then_some(())
    });
}

fn stream_is_empty(redis: &Redis, node: &str) {
    let replies = format!("{{taskd}}:replies:{node}");
    wait_for("the job and reply streams to empty", || {
        (redis.xlen("{taskd}:jobs") == 0 && redis.pending() == 0 && redis.xlen(&replies) == 0).then_some(())
    });
}

/// The daemon's redis bridge process (named once it has started).
fn bridge_of(d: &Daemon) -> u32 {
    wait_for("the redis bridge", || match d.pids_of("taskd: redis bridge")[..] {
        [pid] => Some(pid),
        _ => None,
    })
}

fn taskd(args: &[&str]) -> std::process::Output {
    common::run_with_timeout(Command::new(env!("CARGO_BIN_EXE_taskd")).args(args), common::DEADLINE)
}

#[test]
fn accepted_only_once_redis_has_the_job_and_nothing_is_left_behind() {
    let Some(redis) = Redis::start() else { return };
    let d = web(
        &redis,
        "web-1",
        &["--simulate-ms", "0", "--task-worker-num", "2", "--metrics-addr", "127.0.0.1:0"],
    );
    bridge_of(&d);
    let mut c = d.connect();
    for i in 0..50 {
        c.send(&format!("user{i}@example.com"));
    }
    // Each job: `accepted` first, then exactly one `done`.
    let (mut accepted, mut done) = (Vec::new(), Vec::new());
    while done.len() < 50 {
        let v = c.recv();
        let id = v["task_id"].as_u64().unwrap();
        match v["event"].as_str() {
            Some("accepted") => accepted.push(id),
            Some("done") => {
                assert!(accepted.contains(&id) && !done.contains(&id), "{v}");
                done.push(id);
            }
            _ => panic!("{v}"),
        }
    }
    assert_eq!(accepted.len(), 50);
    assert!(
        accepted.iter().all(|&id| id >= 1 << 32),
        "a node's ids come from its start's range: {accepted:?}"
    );

    // While Redis hangs, the job is not stored, so the client hears nothing, not `accepted`.
    redis.signal(Signal::SIGSTOP);
    c.send("late@example.com");
    let early = c.try_recv(Duration::from_millis(800));
    redis.signal(Signal::SIGCONT);
    assert!(early.is_none(), "accepted before Redis had the job: {early:?}");
    let accepted = c.recv();
    assert_eq!(accepted["event"], "accepted", "{accepted}");
    let id = accepted["task_id"].as_u64().unwrap();
    assert_eq!(finals(&mut c, &[id])[&id]["event"], "done");

    // Finished jobs are deleted, not only acknowledged; read replies are trimmed.
    stream_is_empty(&redis, "web-1");
    let metrics = http_get(d.metrics_addr.unwrap(), "/metrics");
    assert!(metrics.contains("taskd_redis_up 1\n"), "{metrics}");
    assert!(metrics.contains("taskd_store_batches_unacked 0\n"), "{metrics}");
}

#[test]
fn jobs_submitted_to_a_web_node_run_on_either_node() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "1"]);
    let node = TaskNode::start(&redis, "n2", &["--task-worker-num", "2"]);
    let mut c = d.connect();
    // Sent at once: on a loaded machine the first may be done before the last is accepted.
    for i in 0..30 {
        c.send(&job(i, 40));
    }
    let mut got: HashMap<u64, Value> = HashMap::new();
    while got.len() < 30 {
        let v = c.recv();
        assert!(v["event"] == "accepted" || v["event"] == "done", "{v}");
        if v["event"] == "done" {
            assert!(got.insert(v["task_id"].as_u64().unwrap(), v.clone()).is_none(), "twice: {v}");
        }
    }
    let web_pids: Vec<u64> = d.pids_of("taskd: task").into_iter().map(u64::from).collect();
    let node_pids: Vec<u64> = node.task_pids().into_iter().map(u64::from).collect();
    let ran_by: Vec<u64> = got.values().map(|v| v["task_pid"].as_u64().unwrap()).collect();
    assert!(got.values().all(|v| v["event"] == "done"));
    assert!(ran_by.iter().any(|p| web_pids.contains(p)), "none ran on web-1 ({ran_by:?})");
    assert!(ran_by.iter().any(|p| node_pids.contains(p)), "none ran on the task node ({ran_by:?})");
    assert_eq!(d.outbox_lines().len() + node.outbox_lines().len(), 30, "each job delivered once");
    stream_is_empty(&redis, "web-1");
    // A job for one task process cannot be durable: a sentence, not the library's call's name.
    c.send(r#"{"type":"email","to":"one@example.com","task_worker":0}"#);
    let refused = c.recv();
    let why = refused["error"].as_str().unwrap_or_default();
    assert!(why.contains("keeps its jobs in Redis") && why.contains("task_worker"), "{refused}");
    assert!(!why.starts_with("task_to"), "{refused}");
}

#[test]
fn a_dead_task_nodes_job_is_claimed_by_another_node_and_answered_once() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "0"]);
    // The job fits in task_timeout (a longer one is killed by its own node).
    let mut a = TaskNode::start(&redis, "a", &["--task-worker-num", "1", "--task-timeout", "3"]);
    let mut c = d.connect();
    let id = c.submit(&job(1, 2500))["task_id"].as_u64().unwrap();
    wait_for("node a to take the job", || {
        redis.pending_consumers().contains(&"a/0".to_string()).then_some(())
    });
    a.kill_all();
    let b = TaskNode::start(&redis, "b", &["--task-worker-num", "2", "--claim-timeout", "2"]);
    let done = finals(&mut c, &[id]).remove(&id).unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["attempts"], 2, "claimed and run a second time: {done}");
    assert!(b.task_pids().contains(&(done["task_pid"].as_u64().unwrap() as u32)), "{done}");
    assert!(b.log().contains("claimed 1 jobs"), "{}", b.log());
    assert!(c.try_recv(Duration::from_millis(1000)).is_none(), "one reply only");
    stream_is_empty(&redis, "web-1");
    // The dead node's consumer, holding nothing now, is forgotten.
    wait_for("node a's consumer to be deleted", || {
        let v: redis::Value = redis.query(&["XINFO", "CONSUMERS", "{taskd}:jobs", "taskd"]);
        (!format!("{v:?}").contains("a/0")).then_some(())
    });
    assert!(b.log().contains("deleted consumer a/0"), "{}", b.log());
    // Live consumers stay, however long they wait for work.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(!b.log().contains("deleted consumer b/"), "{}", b.log());
}

#[test]
fn a_job_that_ran_twice_gets_one_reply() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "0"]);
    // Node a has no task_timeout: a stalled run that resumes is not killed by its own node.
    let a = TaskNode::start(&redis, "a", &["--task-worker-num", "1"]);
    let mut c = d.connect();
    let id = c.submit(&job(1, 2000))["task_id"].as_u64().unwrap();
    wait_for("node a to take the job", || {
        redis.pending_consumers().contains(&"a/0".to_string()).then_some(())
    });
    // Node a stalls (no heartbeat) past node b's claim time; b claims the job, finishes it first.
    a.signal_group(Signal::SIGSTOP);
    let b = TaskNode::start(&redis, "b", &["--task-worker-num", "1", "--claim-timeout", "1"]);
    let done = finals(&mut c, &[id]).remove(&id).unwrap();
    assert_eq!(done["attempts"], 2, "{done}");
    // Node a wakes up and finishes its run too: its outcome is a duplicate.
    a.signal_group(Signal::SIGCONT);
    let mut other = d.connect();
    wait_for("the second outcome to be dropped", || {
        other.send("stats");
        let s = other.recv();
        (s["durable"]["duplicate_replies_dropped"] == 1).then_some(())
    });
    assert_eq!(a.outbox_lines().len() + b.outbox_lines().len(), 2, "it ran twice (at least once)");
    assert!(c.try_recv(Duration::from_millis(500)).is_none(), "the client got one reply only");
    stream_is_empty(&redis, "web-1");
}

#[test]
fn a_killed_bridge_is_replaced_and_no_job_is_lost_or_answered_twice() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "2"]);
    let mut c = d.connect();
    let bridge = bridge_of(&d);
    for i in 0..300 {
        c.send(&format!("user{i}@example.com"));
        if i == 100 {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(bridge as i32), Signal::SIGKILL).unwrap();
        }
    }
    let mut count: HashMap<(String, u64), usize> = HashMap::new();
    let mut finished = 0;
    while finished < 300 {
        let v = c.recv();
        let event = v["event"].as_str().unwrap_or_default().to_string();
        assert!(event == "accepted" || event == "done", "{v}");
        finished += usize::from(event == "done");
        *count.entry((event, v["task_id"].as_u64().unwrap())).or_default() += 1;
    }
    assert!(count.values().all(|&n| n == 1), "a reply twice");
    assert_eq!(count.len(), 600, "300 accepted, 300 done");
    d.wait_log("starting a new one");
    assert_ne!(bridge_of(&d), bridge);
}

#[test]
fn a_killed_task_process_takes_its_job_back_when_respawned() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "1"]);
    let mut c = d.connect();
    let id = c.submit(&job(1, 1500))["task_id"].as_u64().unwrap();
    wait_for("the task process to take the job", || {
        redis.pending_consumers().contains(&"web-1/0".to_string()).then_some(())
    });
    let victim = d.pids_of("taskd: task")[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let done = finals(&mut c, &[id]).remove(&id).unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    assert_ne!(done["task_pid"].as_u64(), Some(u64::from(victim)));
    d.wait_log("taking back 1 jobs");
}

#[test]
fn past_its_attempts_a_job_is_dead_lettered_and_an_operator_replays_it() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "1", "--task-retry-max", "1"]);
    let mut c = d.connect();
    let id = c.submit(&job(7, 1500))["task_id"].as_u64().unwrap();
    let mut killed = Vec::new();
    for round in 0..2 {
        // Each run: wait until a fresh task process has the job, then kill it mid-job.
        wait_for("a task process running the job", || {
            let taken = redis.pending_consumers().contains(&"web-1/0".to_string());
            let pids = d.pids_of("taskd: task");
            let fresh = pids.first().filter(|p| !killed.contains(*p)).copied();
            let retaken = round == 0 || d.log().matches("taking back 1 jobs").count() >= round;
            fresh.filter(|_| taken && retaken)
        });
        let victim = d.pids_of("taskd: task")[0];
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
        killed.push(victim);
    }
    let failed = finals(&mut c, &[id]).remove(&id).unwrap();
    assert_eq!(failed["event"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("gave up after 2 attempts"), "{failed}");
    assert!(d.outbox_lines().is_empty(), "no run finished");

    let url = redis.url.as_str();
    let list = taskd(&["dead-letter", "list", "--redis-url", url]);
    assert!(list.status.success(), "{list:?}");
    assert!(String::from_utf8_lossy(&list.stderr).is_empty(), "{list:?}");
    let lines: Vec<Value> =
        String::from_utf8_lossy(&list.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["task_id"].as_u64(), Some(id));
    assert!(lines[0]["why"].as_str().unwrap().contains("attempts"), "{}", lines[0]);

    let unknown = taskd(&["dead-letter", "replay", "--redis-url", url, "1-1"]);
    assert_eq!(unknown.status.code(), Some(1), "an unknown id is an error");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("1-1"));
    // An entry that is no job: --all skips it and says so.
    let junk: String = redis.query(&["XADD", "{taskd}:dead", "*", "x", "y"]);
    let replay = taskd(&["dead-letter", "replay", "--all", "--redis-url", url]);
    assert!(replay.status.success(), "{replay:?}");
    assert!(String::from_utf8_lossy(&replay.stdout).contains("replayed 1 jobs"));
    let said = String::from_utf8_lossy(&replay.stderr);
    assert!(said.contains(&format!("skipped dead letter {junk}: it is not a job entry")), "{said}");
    assert!(said.contains("skipped 1 entries"), "{said}");
    assert_eq!(redis.xlen("{taskd}:dead"), 1);
    let _: u64 = redis.query(&["XDEL", "{taskd}:dead", &junk]);
    // None left: `list` says so on stderr, stdout stays JSON lines (none).
    let list = taskd(&["dead-letter", "list", "--redis-url", url]);
    assert!(list.status.success() && list.stdout.is_empty(), "{list:?}");
    assert!(String::from_utf8_lossy(&list.stderr).contains("no dead jobs in {taskd}:dead"), "{list:?}");

    // The replayed run's outcome is kept for the client, who asks for it.
    let done = wait_for("the replayed job's result", || {
        let v = ask_result(&mut c, id);
        (v["event"] == "done").then_some(v)
    });
    assert_eq!(done["task_id"].as_u64(), Some(id), "{done}");
    assert_eq!(d.outbox_lines().len(), 1);
}

#[test]
fn a_restarted_web_node_finishes_its_jobs_and_answers_result_queries() {
    let Some(redis) = Redis::start() else { return };
    let first = web(&redis, "web-1", &["--task-worker-num", "1"]);
    let mut c = first.connect();
    let ids: Vec<u64> = (0..3).map(|i| c.submit(&job(i, 700))["task_id"].as_u64().unwrap()).collect();
    wait_for("the first job to be taken", || redis.pending().eq(&1).then_some(()));
    kill_daemon(&first);

    let again = web(&redis, "web-1", &["--task-worker-num", "1"]);
    again.wait_log("3 unfinished jobs taken back");
    let mut c = again.connect();
    let last = ask_result(&mut c, ids[2]);
    assert_eq!(last["event"], "running", "the last job cannot have finished yet: {last}");
    for &id in &ids {
        let done = wait_for("a final reply", || {
            let v = ask_result(&mut c, id);
            (v["event"] != "running").then_some(v)
        });
        assert_eq!(done["event"], "done", "{done}");
        assert_eq!(done["task_id"].as_u64(), Some(id));
    }
    // A new job of the restarted node never reuses an id of the first run.
    let new_id = c.submit("new@example.com")["task_id"].as_u64().unwrap();
    assert!(new_id >> 32 > ids[0] >> 32, "{new_id} vs {ids:?}");
    assert_eq!(finals(&mut c, &[new_id])[&new_id]["event"], "done");
    let unknown = ask_result(&mut c, 12345);
    assert_eq!(unknown["event"], "error", "{unknown}");
    assert_eq!(again.outbox_lines().len() + first.outbox_lines().len(), 3 + 1);
}

#[test]
fn redis_killed_and_restarted_loses_no_acknowledged_job_and_refuses_clearly_meanwhile() {
    let Some(mut redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "2"]);
    let mut c = d.connect();
    let ids: Vec<u64> = (0..6).map(|i| c.submit(&job(i, 600))["task_id"].as_u64().unwrap()).collect();
    redis.kill();

    // While Redis is down: a clear error, never a hang.
    let mut seen = Vec::new();
    let refused = wait_for("a job refused while Redis is down", || {
        c.send("down@example.com");
        loop {
            let v = c.recv();
            match v["event"].as_str() {
                Some("error") => return Some(v),
                // Sent before the bridge noticed: it could not be stored, and says so.
                Some("failed") if v["error"].as_str().unwrap_or("").contains("Redis") => return None,
                Some("done") => seen.push(v),
                _ => panic!("unexpected reply while Redis is down: {v}"),
            }
        }
    });
    assert!(refused["error"].as_str().unwrap().contains("Redis cannot be reached"), "{refused}");

    redis.restart();
    // Every acknowledged job finishes, exactly once; new jobs are taken again.
    for &id in &ids {
        if seen.iter().any(|v| v["task_id"].as_u64() == Some(id)) {
            continue;
        }
        let v = c.final_reply(&Value::from(id), &mut seen);
        assert_eq!(v["event"], "done", "{v}");
        seen.push(v);
    }
    for &id in &ids {
        let n = seen.iter().filter(|v| v["event"] == "done" && v["task_id"].as_u64() == Some(id)).count();
        assert_eq!(n, 1, "task {id}: {seen:?}");
    }
    let id = wait_for("a job accepted again after Redis is back", || {
        c.send("back@example.com");
        let v = c.recv();
        (v["event"] == "accepted").then(|| v["task_id"].as_u64().unwrap())
    });
    assert_eq!(finals(&mut c, &[id])[&id]["event"], "done");
    assert_eq!(d.outbox_lines().len(), 7);
}

/// A consumer writes a burst's log lines at once (not a write per line), but never keeps them:
/// once it waits for more jobs, the line of every job it ran is in the log, as are those of a
/// slow job's run (written as they are logged) while it still runs.
#[test]
fn a_consumers_held_log_lines_are_written_before_it_waits() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "1"]);
    bridge_of(&d);
    let mut c = d.connect();
    for i in 0..200 {
        c.send(&job(i, 0));
    }
    let mut ids = Vec::new();
    while ids.len() < 200 {
        let v = c.recv();
        match v["event"].as_str() {
            Some("accepted") => {}
            Some("done") => ids.push(v["task_id"].as_u64().unwrap()),
            _ => panic!("{v}"),
        }
    }
    // The daemon goes on running: the lines are out because the consumer is idle, not
    // because it exited.
    wait_for("every job's line in the log", || {
        let log = d.log();
        ids.iter().all(|id| log.contains(&format!("job {id} done"))).then_some(())
    });
    c.send(&job(200, 3_000));
    let accepted = c.recv();
    assert_eq!(accepted["event"], "accepted", "{accepted}");
    let slow = accepted["task_id"].as_u64().unwrap();
    d.wait_log(&format!("job {slow}: 1/5 done"));
    assert!(!d.log().contains(&format!("job {slow} done")));
}

#[test]
fn a_hung_redis_gets_a_clear_failure_never_a_hang() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0"]);
    d.wait_log("redis bridge: connected");
    let mut c = d.connect();
    redis.signal(Signal::SIGSTOP);
    c.send("a@example.com");
    let failed = c.recv();
    assert_eq!(failed["event"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("Redis did not answer within 5 s"), "{failed}");
    c.send("b@example.com");
    let refused = c.recv();
    assert_eq!(refused["event"], "error", "{refused}");
    redis.signal(Signal::SIGCONT);
    let id = wait_for("a job accepted again", || {
        c.send("c@example.com");
        let v = c.recv();
        (v["event"] == "accepted").then(|| v["task_id"].as_u64().unwrap())
    });
    assert_eq!(finals(&mut c, &[id])[&id]["event"], "done");
}

#[test]
fn a_task_node_holds_its_name_reopens_its_log_on_sighup_and_stops_on_sigterm() {
    let Some(redis) = Redis::start() else { return };
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("node.log");
    let mut node =
        TaskNode::start(&redis, "n1", &["--task-worker-num", "2", "--log-file", log.to_str().unwrap()]);
    wait_for("two task processes", || (node.task_pids().len() == 2).then_some(()));
    let pids = node.task_pids();
    let twin = taskd(&["task-node", "--redis-url", &redis.url, "--node-id", "n1"]);
    assert_eq!(twin.status.code(), Some(1), "{twin:?}");
    assert!(String::from_utf8_lossy(&twin.stderr).contains("n1 is in use"), "{twin:?}");
    std::fs::rename(&log, logs.path().join("node.log.1")).unwrap();
    node.signal(Signal::SIGHUP);
    wait_for("a new log file", || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("log file reopened")).map(|_| ())
    });
    node.signal(Signal::SIGTERM);
    let status = node.wait_exit().expect("exit status");
    assert!(status.success(), "{status}");
    wait_for("its task processes to be gone", || pids.iter().all(|&p| is_dead(p)).then_some(()));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("task node n1 stopped"), "{text}");
    assert_eq!(redis.query::<Option<String>>(&["GET", "{taskd}:lease:n1"]), None, "the name is given back");
}

#[test]
fn a_node_name_is_held_by_one_live_web_node() {
    let Some(redis) = Redis::start() else { return };
    let mut first = web(&redis, "web-1", &[]);
    let url = redis.url.as_str();
    let (_, log) = Daemon::try_start(&["--redis-url", url, "--node-id", "web-1"]).err().expect("refused");
    assert!(log.contains("web-1 is in use by a running taskd"), "{log}");
    // Stopped cleanly, it gives the name back at once.
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit(common::DEADLINE).is_some_and(|s| s.success()));
    assert_eq!(redis.query::<Option<String>>(&["GET", "{taskd}:lease:web-1"]), None);
    let _again = web(&redis, "web-1", &[]);
}

#[test]
fn startup_warns_when_redis_could_lose_or_evict_jobs() {
    let Some(redis) = Redis::start_with(&["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]) else {
        return;
    };
    let d = web(&redis, "web-1", &[]);
    let log = d.wait_log("maxmemory-policy allkeys-lru");
    assert!(log.contains("appendonly no"), "{log}");
}

#[test]
fn without_redis_the_daemon_says_why_and_task_node_needs_a_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis+unix://{}/none.sock?pass=hunter2", dir.path().display());
    let err = Daemon::try_start(&["--redis-url", &url]).err().expect("no Redis: no start");
    assert!(err.1.contains("cannot reach Redis at redis+unix://"), "{err:?}");
    // The URL is fine, Redis is down: not "invalid redis_url"; and its password stays hidden.
    assert!(!err.1.contains("invalid redis_url") && !err.1.contains("hunter2"), "{err:?}");
    let out = taskd(&["task-node"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--redis-url"), "{out:?}");
    let bad = taskd(&["--redis-url", "http://x", "--check-config"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("redis_url"));
    // And the daemon without a URL runs no Redis code at all: no bridge.
    let plain = Daemon::start(&[]);
    plain.wait_pool(2, 4);
    assert!(plain.pids_of("taskd: redis bridge").is_empty());
}

// ---- Issue 16, helper f-lease: a restarted node's first answers, the name lease as a
// compare-and-set, a hung Redis holding only the clients that wait on it, entries from Redis
// checked, passwords kept out of every message. ----

/// The lease key of node `node`, as Redis holds it.
fn lease_of(redis: &Redis, node: &str) -> Option<String> {
    redis.query(&["GET", &format!("{{taskd}}:lease:{node}")])
}

#[test]
fn a_restarted_web_node_answers_result_for_jobs_finished_while_it_was_down_from_its_first_query() {
    let Some(redis) = Redis::start() else { return };
    let first = web(&redis, "web-1", &["--task-worker-num", "0"]);
    let mut c = first.connect();
    let n = 1000;
    // Jobs of 2 ms: each outcome goes out on its own, so the reply stream holds about one entry
    // per job, more than one read of the bridge takes (512).
    let mut lines = String::new();
    for i in 0..n {
        lines.push_str(&job(i, 2));
        lines.push('\n');
    }
    c.send_raw(lines.as_bytes());
    let ids: Vec<u64> = (0..n)
        .map(|_| {
            let v = c.recv();
            assert_eq!(v["event"], "accepted", "{v}");
            v["task_id"].as_u64().unwrap()
        })
        .collect();
    kill_daemon(&first);

    // The jobs run while their node is down; their outcomes wait in its reply stream.
    let node = TaskNode::start(&redis, "n", &["--task-worker-num", "4"]);
    wait_for("every job to finish", || {
        (redis.xlen("{taskd}:jobs") == 0 && redis.pending() == 0).then_some(())
    });
    let waiting = redis.xlen("{taskd}:replies:web-1");
    assert!(waiting > 512, "only {waiting} reply entries: the test needs more than one read");

    // Restarted, and asked at once: every answer is the job's final line, from the first query.
    let again = web(&redis, "web-1", &["--task-worker-num", "0"]);
    let mut c = again.connect();
    let mut queries = String::new();
    for id in &ids {
        queries.push_str(&format!("{{\"type\":\"result\",\"task_id\":{id}}}\n"));
    }
    c.send_raw(queries.as_bytes());
    for &id in &ids {
        let v = c.recv();
        assert_eq!(v["event"], "done", "task {id}: {v}");
        assert_eq!(v["task_id"].as_u64(), Some(id), "{v}");
    }
    assert!(again.log().contains("1000 outcomes of jobs that finished while it was down"), "{}", again.log());
    assert_eq!(node.outbox_lines().len(), n, "each job ran once");
    // What the restarted node read at start is deleted, and not delivered a second time.
    stream_is_empty(&redis, "web-1");
    c.send("stats");
    let stats = c.recv();
    assert_eq!(stats["durable"]["duplicate_replies_dropped"], 0, "{stats}");
}

#[test]
fn a_node_that_hung_past_its_lease_finds_its_name_taken_and_exits() {
    let Some(redis) = Redis::start() else { return };
    let mut node = TaskNode::start(&redis, "n1", &["--task-worker-num", "2"]);
    let mut master = web(&redis, "w1", &["--task-worker-num", "0"]);
    bridge_of(&master);
    wait_for("two task processes", || (node.task_pids().len() == 2).then_some(()));
    let old_tasks = node.task_pids();
    let held = lease_of(&redis, "n1").unwrap_or_default();
    assert!(held.ends_with(&format!(":{}", node.pid)), "the manager holds the name: {held}");

    // The whole task node hangs, and so does the web node's master (its bridge runs on: it
    // must not keep the name for a master that hangs).
    node.signal_group(Signal::SIGSTOP);
    master.signal(Signal::SIGSTOP);
    wait_for("both names to lapse", || {
        (lease_of(&redis, "n1").is_none() && lease_of(&redis, "w1").is_none()).then_some(())
    });
    let twin = TaskNode::start(&redis, "n1", &["--task-worker-num", "2"]);
    let web_twin = web(&redis, "w1", &["--task-worker-num", "0"]);
    // Jobs wait in the stream (the new run's two consumers take one at a time) when the old
    // node's task processes wake, before their manager (which would soon SIGTERM them): they
    // use the same consumer names as the new run, and must take none of them.
    let mut c = web_twin.connect();
    let waiting: Vec<u64> = (0..10).map(|i| c.submit(&job(i, 300))["task_id"].as_u64().unwrap()).collect();
    for &pid in &old_tasks {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGCONT);
    }
    wait_for("the old task processes to find the name not theirs", || {
        (node.log_lines("the node's name is not known to be its own").len() == old_tasks.len()).then_some(())
    });
    assert!(redis.xlen("{taskd}:jobs") > redis.pending(), "jobs were there to take");
    node.signal(Signal::SIGCONT);
    master.signal(Signal::SIGCONT);

    let status = node.wait_exit().expect("exit status");
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(node.log().contains("the name is held by another run now"), "{}", node.log());
    wait_for("the old node's consumers to be gone", || old_tasks.iter().all(|&p| is_dead(p)).then_some(()));
    let status = master.wait_exit(common::DEADLINE).expect("the old master exits");
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(master.log().contains("the name is held by another run now"), "{}", master.log());

    // The names stay with the new runs, which keep working.
    assert!(lease_of(&redis, "n1").is_some_and(|t| t.ends_with(&format!(":{}", twin.pid))));
    assert!(lease_of(&redis, "w1").is_some_and(|t| t.ends_with(&format!(":{}", web_twin.pid))));
    let mut c2 = web_twin.connect();
    let id = c2.submit(&job(11, 10))["task_id"].as_u64().unwrap();
    let mut got = finals(&mut c, &waiting);
    got.extend(finals(&mut c2, &[id]));
    let twin_pids = twin.task_pids();
    for v in got.values() {
        assert_eq!(v["event"], "done", "{v}");
        assert!(twin_pids.contains(&(v["task_pid"].as_u64().unwrap() as u32)), "{v}");
    }
    // The woken task processes took and ran nothing.
    assert!(node.outbox_lines().is_empty(), "{:?}", node.outbox_lines());
    assert!(node.log_lines("sending email").is_empty(), "{}", node.log());
    assert_eq!(twin.outbox_lines().len(), 11);
    assert!(!twin.log().contains("held by another run"), "{}", twin.log());
    assert!(!twin.log().contains("not known to be its own"), "{}", twin.log());
}

/// The same for a web node with task processes of its own: its master holds the name and
/// publishes until when it is surely its own; woken before their master, its task processes
/// take nothing under the consumer names a new run of the node uses now.
#[test]
fn a_web_node_that_hung_past_its_lease_lets_its_task_processes_take_nothing() {
    let Some(redis) = Redis::start() else { return };
    let mut old = web(&redis, "w2", &["--task-worker-num", "2"]);
    bridge_of(&old);
    let old_tasks = old
        .wait_pool(2, 2)
        .iter()
        .filter(|p| p.args.starts_with("taskd: task"))
        .map(|p| p.pid)
        .collect::<Vec<_>>();
    assert_eq!(old_tasks.len(), 2);
    // The whole node hangs: master, manager, workers, task processes and bridge.
    let group = nix::unistd::Pid::from_raw(old.pid as i32);
    nix::sys::signal::killpg(group, Signal::SIGSTOP).unwrap();
    wait_for("the name to lapse", || lease_of(&redis, "w2").is_none().then_some(()));
    let twin = web(&redis, "w2", &["--task-worker-num", "2"]);
    let mut c = twin.connect();
    let waiting: Vec<u64> = (0..10).map(|i| c.submit(&job(i, 300))["task_id"].as_u64().unwrap()).collect();
    for &pid in &old_tasks {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGCONT);
    }
    wait_for("the old task processes to find the name not theirs", || {
        (old.log().matches("the node's name is not known to be its own").count() == old_tasks.len())
            .then_some(())
    });
    nix::sys::signal::killpg(group, Signal::SIGCONT).unwrap();
    let status = old.wait_exit(common::DEADLINE).expect("the old master exits");
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(old.log().contains("the name is held by another run now"), "{}", old.log());
    wait_for("the old node's task processes to be gone", || {
        old_tasks.iter().all(|&p| is_dead(p)).then_some(())
    });

    let got = finals(&mut c, &waiting);
    let twin_tasks = twin.pids_of("taskd: task");
    for v in got.values() {
        assert_eq!(v["event"], "done", "{v}");
        assert!(twin_tasks.contains(&(v["task_pid"].as_u64().unwrap() as u32)), "{v}");
    }
    // The woken task processes took and ran nothing.
    assert!(old.outbox_lines().is_empty(), "{:?}", old.outbox_lines());
    assert!(!old.log().contains("sending email"), "{}", old.log());
    assert!(lease_of(&redis, "w2").is_some_and(|t| t.ends_with(&format!(":{}", twin.pid))));
}

#[test]
fn a_hung_redis_holds_only_the_clients_whose_jobs_wait_on_it() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0"]);
    d.wait_log("redis bridge: connected");
    let mut waiting = d.connect();
    let mut other = d.connect();
    redis.signal(Signal::SIGSTOP);
    waiting.send("a@example.com");
    // Another client's `stats` is answered while that job's batch is not acknowledged.
    let stats = wait_for("a stats line while a batch waits on Redis", || {
        other.send("stats");
        let s = other.recv();
        assert_eq!(s["event"], "stats", "{s}");
        (s["durable"]["store_batches_unacked"] == 1).then_some(s)
    });
    other.send("this is not a request");
    let bad = other.recv();
    assert_eq!(bad["event"], "error", "{bad}");
    assert!(
        waiting.try_recv(Duration::from_millis(1)).is_none(),
        "the waiting client heard before Redis had its job"
    );
    other.send("stats");
    let again = other.recv();
    redis.signal(Signal::SIGCONT);
    assert_eq!(
        again["durable"]["store_batches_unacked"], 1,
        "the batch still waited: {again} (first {stats})"
    );
    // The waiting client's job ends one way or the other: stored late, or failed with a reason.
    loop {
        let v = waiting.recv();
        if v["event"] == "done" || v["event"] == "failed" {
            break;
        }
        assert_eq!(v["event"], "accepted", "{v}");
    }
}

#[test]
fn entries_others_wrote_to_redis_are_checked_logged_once_and_deleted() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "1"]);
    d.wait_log("redis bridge: connected");
    // Reply entries that are not outcomes: logged once each, deleted.
    redis.query::<String>(&["XADD", "{taskd}:replies:web-1", "*", "x", "y"]);
    redis.query::<String>(&["XADD", "{taskd}:replies:web-1", "*", "b", "garbage"]);
    wait_for("the malformed replies to be deleted", || {
        (redis.xlen("{taskd}:replies:web-1") == 0).then_some(())
    });
    wait_for("both logged", || (d.log().matches("is malformed").count() == 2).then_some(()));

    // A job whose address carries a line of its own is refused as a client's request would be.
    let forged = r#"{"type":"email","to":"a@example.com\nINFO forged line"}"#;
    redis.query::<String>(&[
        "XADD",
        "{taskd}:jobs",
        "*",
        "o",
        "web-1",
        "t",
        "77",
        "s",
        "0",
        "w",
        "0",
        "d",
        forged,
    ]);
    let mut c = d.connect();
    let failed = wait_for("the forged job's outcome", || {
        let v = ask_result(&mut c, 77);
        (v["event"] == "failed").then_some(v)
    });
    assert!(failed["error"].as_str().unwrap().contains("invalid email address"), "{failed}");
    assert!(!d.log().lines().any(|l| l.starts_with("INFO forged")), "{}", d.log());
    assert!(d.outbox_lines().is_empty(), "nothing was sent");

    // A job from a node that never started: its outcome goes to the dead letters, not to a
    // stream nobody reads; a job whose origin is no node name is not run.
    let good = job(2, 0);
    redis.query::<String>(&["XADD", "{taskd}:jobs", "*", "o", "ghost", "t", "5", "d", &good]);
    redis.query::<String>(&["XADD", "{taskd}:jobs", "*", "o", "bad\nname", "t", "6", "d", &good]);
    redis.query::<String>(&["XADD", "{taskd}:jobs", "*", "t", "7"]);
    wait_for("the job stream to empty", || {
        (redis.xlen("{taskd}:jobs") == 0 && redis.pending() == 0).then_some(())
    });
    let ghost: u64 = redis.query(&["EXISTS", "{taskd}:replies:ghost"]);
    assert_eq!(ghost, 0, "a reply stream nobody reads");
    let list = taskd(&["dead-letter", "list", "--redis-url", &redis.url]);
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        lines.iter().any(|l| l["origin"] == "ghost" && l["why"].as_str().unwrap().contains("never started")),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l["task_id"] == 6 && l["why"].as_str().unwrap().contains("not a node name")),
        "{text}"
    );
    assert_eq!(d.outbox_lines().len(), 1, "the ghost's job ran, the one without a node name did not");
    assert!(d.log().contains("is not a job"), "{}", d.log());
}

#[test]
fn a_redis_password_never_shows_in_messages() {
    let Some(mut redis) = Redis::start() else { return };
    let secret = "s3cretPW42";
    let _: String = redis.query(&["CONFIG", "SET", "requirepass", secret]);
    redis.url = format!("{}?pass={secret}", redis.url);
    let url = redis.url.clone();

    let d = web(&redis, "web-1", &["--simulate-ms", "0"]);
    d.wait_log("redis bridge: connected");
    let mut c = d.connect();
    let id = c.submit("a@example.com")["task_id"].as_u64().unwrap();
    assert_eq!(finals(&mut c, &[id])[&id]["event"], "done");
    // A hang: "lost Redis at …" and the failure it causes.
    redis.signal(Signal::SIGSTOP);
    c.send("b@example.com");
    let failed = c.recv();
    redis.signal(Signal::SIGCONT);
    assert_eq!(failed["event"], "failed", "{failed}");
    d.wait_log("lost Redis at");
    let node = TaskNode::start(&redis, "n", &["--task-worker-num", "1"]);
    let log = d.log() + &node.log();
    assert!(log.contains("pass=***"), "{log}");
    assert!(!log.contains(secret), "{log}");

    let check = taskd(&["--redis-url", &url, "--check-config"]);
    let shown = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && shown.contains("pass=***") && !shown.contains(secret), "{check:?}");
    let bad = taskd(&["--redis-url", &format!("http://:{secret}@x"), "--check-config"]);
    assert!(!String::from_utf8_lossy(&bad.stderr).contains(secret), "{bad:?}");
    let gone = format!("redis+unix:///nonexistent/redis.sock?pass={secret}");
    let (_, log) = Daemon::try_start(&["--redis-url", &gone]).err().expect("no Redis there");
    assert!(log.contains("cannot reach Redis") && !log.contains(secret), "{log}");

    // The URL from the environment, so that it is not in `ps` (README).
    let list = common::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_taskd")).args(["dead-letter", "list"]).env("TASKD_REDIS_URL", &url),
        Duration::from_secs(60),
    );
    assert!(list.status.success(), "{list:?}");
}

// ---- Issue 16: a consumer holds only its window and keeps what it holds alive; a job past
// task_timeout is killed by its own node (e-claim) ----

/// Outbox lines of all `nodes`, by task id.
fn outbox_by_task(nodes: &[&TaskNode]) -> HashMap<u64, Vec<Value>> {
    let mut by: HashMap<u64, Vec<Value>> = HashMap::new();
    for line in nodes.iter().flat_map(|n| n.outbox_lines()) {
        by.entry(line["task_id"].as_u64().expect("task_id")).or_default().push(line);
    }
    by
}

/// Makes node a's only consumer (`a/0`) hold three jobs of `simulate_ms` at once, as a batch of
/// quick-looking jobs would: it learns from quick jobs to take many, and is stopped while not
/// reading until the three are in the stream. Its pid and the three task ids.
fn hold_three_slow_jobs(redis: &Redis, a: &TaskNode, c: &mut Client, simulate_ms: u64) -> (u32, Vec<u64>) {
    for i in 0..30 {
        c.send(&job(i, 0));
    }
    let mut quick = 0;
    while quick < 30 {
        let v = c.recv();
        assert!(v["event"] == "accepted" || v["event"] == "done", "{v}");
        quick += usize::from(v["event"] == "done");
    }
    let consumer = a.task_pids()[0];
    let pid = nix::unistd::Pid::from_raw(consumer as i32);
    // Stopped inside its blocking read: resumed, it then takes with its learned count. A stop
    // between an empty take and the next blocking read would wake it with COUNT 1 on the first
    // of the three, and it would hold them one at a time (seen once in CI).
    wait_for("it to be stopped inside its blocking read", || {
        if !redis.consumer_blocked("a/0") {
            return None;
        }
        nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
        if redis.consumer_blocked("a/0") {
            return Some(());
        }
        nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
        None
    });
    wait_for("its blocking read to end", || (!redis.consumer_blocked("a/0")).then_some(()));
    let slow: Vec<u64> =
        (30..33).map(|i| c.submit(&job(i, simulate_ms))["task_id"].as_u64().unwrap()).collect();
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    wait_for("node a to hold the three slow jobs", || {
        (redis.pending_consumers().iter().filter(|h| *h == "a/0").count() == 3).then_some(())
    });
    (consumer, slow)
}

#[test]
fn a_whole_task_node_killed_mid_job_fails_none_and_each_job_runs_once_more() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "0"]);
    let args = ["--task-timeout", "2", "--claim-timeout", "2"];
    let mut a = TaskNode::start(&redis, "a", &[&["--task-worker-num", "8"][..], &args].concat());
    wait_for("node a's 8 task processes", || (a.task_pids().len() == 8).then_some(()));
    let mut c = d.connect();
    let on_a: Vec<u64> = (0..8).map(|i| c.submit(&job(i, 1500))["task_id"].as_u64().unwrap()).collect();
    wait_for("each of node a's consumers to hold one job", || {
        let holders = redis.pending_consumers();
        (holders.len() == 8 && holders.iter().all(|h| h.starts_with("a/"))).then_some(())
    });
    // The survivor is alive with fewer task processes, and busy with long jobs of its own (sent
    // on another connection: node a's jobs may be done before they are accepted).
    let b = TaskNode::start(&redis, "b", &[&["--task-worker-num", "2"][..], &args].concat());
    let mut c2 = d.connect();
    let on_b: Vec<u64> = (8..10).map(|i| c2.submit(&job(i, 1500))["task_id"].as_u64().unwrap()).collect();
    a.kill_all();

    let all: Vec<u64> = on_a.iter().chain(&on_b).copied().collect();
    let mut got = finals(&mut c, &on_a);
    got.extend(finals(&mut c2, &on_b));
    let runs = outbox_by_task(&[&a, &b]);
    for &id in &all {
        let v = &got[&id];
        assert_eq!(v["event"], "done", "no job fails because a node died: {v}");
        let lines = runs.get(&id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(lines.len(), 1, "task {id} ran to completion once: {lines:?}");
        assert_eq!(lines[0]["attempt"], v["attempts"], "{v} vs {lines:?}");
        let finished_on_a = a.outbox_lines().iter().any(|l| l["task_id"].as_u64() == Some(id));
        if on_a.contains(&id) && !finished_on_a {
            // One run died with node a; waiting on node b never counts as a delivery.
            assert_eq!(v["attempts"], 2, "{v}");
            assert!(b.task_pids().contains(&(v["task_pid"].as_u64().unwrap() as u32)), "{v}");
        } else {
            assert!(v["attempts"].as_u64().unwrap() <= 2, "{v}");
        }
    }
    assert!(b.log().contains("claimed 1 jobs"), "node b claims one job at a time:\n{}", b.log());
    assert!(!b.log().contains("claimed 2 jobs"), "{}", b.log());
    assert!(!b.log().contains("longer than task_timeout"), "{}", b.log());
    assert!(c.try_recv(Duration::from_millis(500)).is_none(), "one reply per job");
    assert!(c2.try_recv(Duration::from_millis(100)).is_none(), "one reply per job");
    stream_is_empty(&redis, "web-1");
}

#[test]
fn a_job_past_task_timeout_is_killed_by_its_own_node_never_run_twice_at_once() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "0"]);
    let args = ["--task-timeout", "2", "--task-retry-max", "1", "--claim-timeout", "1"];
    let a = TaskNode::start(&redis, "a", &[&["--task-worker-num", "1"][..], &args].concat());
    // Idle consumers that would claim the job if its owner did not keep it alive.
    let b = TaskNode::start(&redis, "b", &[&["--task-worker-num", "2"][..], &args].concat());
    let mut c = d.connect();
    let id = c.submit(r#"{"type":"email","to":"slow@example.com","simulate_ms":4000}"#)["task_id"]
        .as_u64()
        .unwrap();
    let failed = finals(&mut c, &[id]).remove(&id).unwrap();

    // As in memory mode: killed at task_timeout, run again, and past task_retry_max failed
    // with the reason.
    assert_eq!(failed["event"], "failed", "{failed}");
    assert_eq!(failed["attempts"], 2, "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("was killed: the task ran longer than task_timeout (2s)"), "{failed}");
    let lines = |needle: &str| {
        let mut l: Vec<String> = a.log_lines(needle).into_iter().chain(b.log_lines(needle)).collect();
        l.sort(); // each line starts with its time
        l
    };
    let started = lines("sending email to slow@example.com");
    let killed = lines("has run longer than task_timeout (2s)");
    assert_eq!(started.len(), 2, "two runs: {started:?}");
    assert!(started[0].contains("(attempt 1)") && started[1].contains("(attempt 2)"), "{started:?}");
    assert_eq!(killed.len(), 2, "each run killed by its own node: {killed:?}");
    // One run at a time: the second started after the first was killed.
    assert!(killed[0] < started[1], "{killed:?} {started:?}");
    assert!(a.outbox_lines().is_empty() && b.outbox_lines().is_empty(), "no run finished");
    let dead: redis::Value = redis.query(&["XRANGE", "{taskd}:dead", "-", "+"]);
    assert!(format!("{dead:?}").contains("ran longer than task_timeout"), "{dead:?}");
    assert!(c.try_recv(Duration::from_millis(500)).is_none(), "one reply");
    stream_is_empty(&redis, "web-1");
}

#[test]
fn jobs_that_wait_in_a_consumer_past_the_claim_time_are_not_claimed_and_run_once() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "0"]);
    let a = TaskNode::start(&redis, "a", &["--task-worker-num", "1", "--claim-timeout", "2"]);
    let mut c = d.connect();
    let (consumer, slow) = hold_three_slow_jobs(&redis, &a, &mut c, 2000);
    // Idle consumers on other nodes, while the third job waits 4 s on node a (claim time: 2 s).
    let b = TaskNode::start(&redis, "b", &["--task-worker-num", "2", "--claim-timeout", "2"]);
    let e = TaskNode::start(&redis, "e", &["--task-worker-num", "2", "--claim-timeout", "2"]);
    let got = finals(&mut c, &slow);
    let runs = outbox_by_task(&[&a, &b, &e]);
    for &id in &slow {
        assert_eq!(got[&id]["event"], "done", "{}", got[&id]);
        assert_eq!(got[&id]["attempts"], 1, "waiting is no delivery: {}", got[&id]);
        assert_eq!(got[&id]["task_pid"].as_u64(), Some(u64::from(consumer)), "{}", got[&id]);
        assert_eq!(runs.get(&id).map_or(0, Vec::len), 1, "task {id} ran once: {runs:?}");
    }
    for log in [b.log(), e.log()] {
        assert!(!log.contains("claimed"), "a live consumer's job was claimed:\n{log}");
    }
    stream_is_empty(&redis, "web-1");
}

#[test]
fn a_stopped_consumer_resumed_leaves_the_jobs_others_claimed_meanwhile() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "0"]);
    // No task_timeout on node a: resumed, its running job is not killed, and it goes on.
    let a = TaskNode::start(&redis, "a", &["--task-worker-num", "1"]);
    let mut c = d.connect();
    let (consumer, slow) = hold_three_slow_jobs(&redis, &a, &mut c, 1500);
    // Stopped (no heartbeat) while it runs the first: node b claims all three and runs them.
    wait_for("node a to start the first", || {
        (!a.log_lines("sending email to user30@example.com").is_empty()).then_some(())
    });
    let pid = nix::unistd::Pid::from_raw(consumer as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    let b = TaskNode::start(&redis, "b", &["--task-worker-num", "2", "--claim-timeout", "1"]);
    let got = finals(&mut c, &slow);
    let b_pids = b.task_pids();
    assert!(got.values().all(|v| b_pids.contains(&(v["task_pid"].as_u64().unwrap() as u32))), "{got:?}");
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    // Resumed, it finishes the run it was in (its outcome is a duplicate, dropped), then finds
    // that the other two are no longer its own and leaves them.
    let skipped = wait_for("node a to leave the claimed jobs", || {
        let lines = a.log_lines("were claimed by another consumer");
        (!lines.is_empty()).then_some(lines)
    });
    assert!(skipped[0].contains("2 jobs"), "{skipped:?}\n{}", a.log());
    let on_a: Vec<u64> = a.outbox_lines().iter().filter_map(|l| l["task_id"].as_u64()).collect();
    assert_eq!(on_a.iter().filter(|id| slow.contains(id)).count(), 1, "only the run it was in: {on_a:?}");
    assert_eq!(b.outbox_lines().len(), 3);
    assert!(c.try_recv(Duration::from_millis(500)).is_none(), "one reply per job");
    stream_is_empty(&redis, "web-1");
}

#[test]
fn a_live_job_on_a_node_with_a_long_claim_time_is_not_claimed_by_a_node_with_the_shortest() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "0"]);
    // Node a beats at its slowest (500 ms apart: its claim time is 300 s).
    let a = TaskNode::start(&redis, "a", &["--task-worker-num", "1", "--claim-timeout", "300"]);
    let mut c = d.connect();
    let id = c.submit(&job(1, 4000))["task_id"].as_u64().unwrap();
    wait_for("node a to take the job", || {
        redis.pending_consumers().contains(&"a/0".to_string()).then_some(())
    });
    // Idle consumers with the shortest claim time there is (1 s), much shorter than the job.
    let b = TaskNode::start(&redis, "b", &["--task-worker-num", "2", "--claim-timeout", "1"]);
    let e = TaskNode::start(&redis, "e", &["--task-worker-num", "2", "--claim-timeout", "1"]);
    let done = finals(&mut c, &[id]).remove(&id).unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["attempts"], 1, "{done}");
    assert!(a.task_pids().contains(&(done["task_pid"].as_u64().unwrap() as u32)), "{done}");
    assert_eq!(outbox_by_task(&[&a, &b, &e]).get(&id).map_or(0, Vec::len), 1, "it ran once");
    for log in [b.log(), e.log()] {
        assert!(!log.contains("claimed"), "a live consumer's job was claimed:\n{log}");
    }
    stream_is_empty(&redis, "web-1");
}

// ---- Issue 16 (h-durable): the claim time is its own option, and a node that wakes past its
// lease takes nothing ----

#[test]
fn a_killed_nodes_job_is_taken_over_after_claim_timeout_long_before_task_timeout() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "0"]);
    // The default task_timeout, said out loud: before claim_timeout, it was also the claim time.
    let args = ["--task-timeout", "300", "--claim-timeout", "2"];
    let mut a = TaskNode::start(&redis, "a", &[&["--task-worker-num", "1"][..], &args].concat());
    let mut c = d.connect();
    let id = c.submit(&job(1, 1000))["task_id"].as_u64().unwrap();
    wait_for("node a to take the job", || {
        redis.pending_consumers().contains(&"a/0".to_string()).then_some(())
    });
    a.kill_all();
    let b = TaskNode::start(&redis, "b", &[&["--task-worker-num", "1"][..], &args].concat());
    // Claimed once idle past 2 s, not 300: `finals` gives up if no reply comes within the
    // suite's deadline (20 s), far below task_timeout.
    let done = finals(&mut c, &[id]).remove(&id).unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    assert!(b.task_pids().contains(&(done["task_pid"].as_u64().unwrap() as u32)), "{done}");
    assert!(b.log().contains("claimed 1 jobs idle for over 2s"), "{}", b.log());
    assert!(c.try_recv(Duration::from_millis(500)).is_none(), "one reply");
    stream_is_empty(&redis, "web-1");
}

/// Reads lines until `last`'s final one; every final line of one of `firsts` seen on the way.
fn finals_of_until(c: &mut Client, firsts: &[u64], last: u64) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = c.recv();
        let id = v["task_id"].as_u64();
        let is_final = v["event"] == "done" || v["event"] == "failed";
        if is_final && id.is_some_and(|id| firsts.contains(&id)) {
            seen.push(v);
        } else if is_final && id == Some(last) {
            return seen;
        }
    }
}

/// Redis hangs mid-round (stopped) past the bridge's reply timeout, and goes on before the
/// bridge stops asking: the round's answer is lost, its marker tells whether it was stored.
/// Whichever it was, every job has exactly one final line, `done` iff it is in the outbox,
/// and none runs twice.
#[test]
fn a_round_whose_answer_was_lost_to_a_hung_redis_is_answered_as_it_was_stored() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "2"]);
    d.wait_log("redis bridge: connected");
    let mut clients: Vec<Client> = (0..4).map(|_| d.connect()).collect();
    redis.signal(Signal::SIGSTOP);
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&format!("hung{i}@example.com"));
    }
    d.wait_log("asking Redis whether the round was stored");
    redis.signal(Signal::SIGCONT);
    let mut finals = HashMap::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let mut last = c.recv();
        if last["event"] == "accepted" {
            let id = last["task_id"].clone();
            last = c.final_reply(&id, &mut Vec::new());
        }
        assert!(last["event"] == "done" || last["event"] == "failed", "{last}");
        finals.insert(format!("hung{i}@example.com"), last);
    }
    // A later job on each connection proves no second final line was on its way.
    for (i, c) in clients.iter_mut().enumerate() {
        let first = finals[&format!("hung{i}@example.com")]["task_id"].as_u64().expect("task_id");
        let later = wait_for("a job accepted again", || {
            c.send("later@example.com");
            let v = c.recv();
            (v["event"] == "accepted").then(|| v["task_id"].as_u64().expect("task_id"))
        });
        let extra = finals_of_until(c, &[first], later);
        assert!(extra.is_empty(), "a second final line for task {first}: {extra:?}");
    }
    stream_is_empty(&redis, "web-1");
    let outbox = d.outbox_lines();
    for (to, last) in &finals {
        let runs = outbox.iter().filter(|l| l["to"] == to.as_str()).count();
        let done = last["event"] == "done";
        assert_eq!(runs, usize::from(done), "{to}: {last}, ran {runs} times");
    }
}

/// The same, with a job whose claim Redis refuses inside the round (someone made its stream a
/// string): whether the round was stored or not, that job gets `failed` naming the key and
/// never `accepted`, and the other job of its round (same write) `accepted`, then `done`.
#[test]
fn a_job_refused_inside_a_round_whose_answer_was_lost_fails_alone() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "2"]);
    d.wait_log("redis bridge: connected");
    let _: i64 = redis.query(&["DEL", "{taskd}:jobs#low"]);
    let _: () = redis.query(&["SET", "{taskd}:jobs#low", "not a stream"]);
    let mut c = d.connect();
    redis.signal(Signal::SIGSTOP);
    c.send_raw(
        concat!(
            r#"{"type":"email","to":"normal@example.com","key":"k-normal","simulate_ms":0}"#,
            "\n",
            r#"{"type":"email","to":"low@example.com","key":"k-low","priority":"low","simulate_ms":0}"#,
            "\n"
        )
        .as_bytes(),
    );
    d.wait_log("asking Redis whether the round was stored");
    redis.signal(Signal::SIGCONT);
    let (mut accepted, mut done, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    while done.is_empty() || failed.is_empty() {
        let v = c.recv();
        match v["event"].as_str() {
            Some("accepted") => accepted.push(v),
            Some("done") => done.push(v),
            Some("failed") => failed.push(v),
            _ => panic!("{v}"),
        }
    }
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!((done.len(), failed.len()), (1, 1), "{done:?} {failed:?}");
    assert_eq!(done[0]["to"], "normal@example.com", "{done:?}");
    assert_eq!(accepted[0]["task_id"], done[0]["task_id"], "{accepted:?}");
    let error = failed[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("will not run: {taskd}:jobs#low is a string key, not a stream"), "{failed:?}");
    let outbox = d.outbox_lines();
    assert_eq!(outbox.iter().filter(|l| l["to"] == "normal@example.com").count(), 1, "{outbox:?}");
    assert_eq!(outbox.iter().filter(|l| l["to"] == "low@example.com").count(), 0, "{outbox:?}");
}

/// A round's marker, read after its answer was lost, is the truth for good: a stored round
/// reads as stored; a round whose transaction reaches Redis only after its marker was read
/// (the answer was lost before the round arrived) stores nothing; a marker someone else wrote
/// is no answer. The same over taskd's own reader and over the crate's (TLS, Sentinel, …).
#[test]
fn a_rounds_marker_tells_whether_it_was_stored_and_a_late_round_stores_nothing() {
    use std::time::Duration;
    use taskd::durable::hot::HotConn;
    use taskd::durable::round::{arm, attempt, begin, settle, Tried};
    let Some(redis) = Redis::start() else { return };
    let info = redis::Client::open(redis.url.as_str()).expect("a URL").get_connection_info().clone();
    let limit = Duration::from_secs(5);
    let connect = |ours: bool| {
        let conn = HotConn::connect(ours.then_some(&info), limit, Some(limit), limit, || redis.conn())
            .expect("a connection");
        assert_eq!(matches!(conn, HotConn::Own(_)), ours);
        conn
    };
    for (run, ours) in [(0, true), (1, false)] {
        let mut bridge = connect(ours);
        let mut other = connect(ours);
        let mut round = begin();
        round.command(5).arg(b"XADD").arg(b"{taskd}:jobs").arg(b"*").arg(b"f").arg(b"1");
        let sent = round.bytes().to_vec();
        let m = |n: u32| format!("{{taskd}}:round:web-1:test-{run}-{n}");
        arm(&mut bridge, &m(1)).expect("WATCH");
        let (tried, armed) = attempt(&mut bridge, &m(1), &m(2), None, &mut round, &[false], None);
        assert!(matches!(tried, Tried::Stored(_)) && armed);
        assert_eq!(round.bytes(), sent, "the round is not as it was, to be tried again");
        assert!(settle(&mut other, &m(1)).expect("the marker"), "a stored round reads as not stored");
        assert!(!settle(&mut other, &m(2)).expect("the marker"), "a round not sent reads as stored");
        let (tried, _) = attempt(&mut bridge, &m(2), &m(3), Some(&m(1)), &mut round, &[false], None);
        assert!(matches!(tried, Tried::Refused(_)), "a round after its marker was read ran");
        assert!(!settle(&mut other, &m(2)).expect("the marker"));
        assert_eq!(redis.xlen("{taskd}:jobs"), 2 * run + 1);
        let kept: i64 = redis.query(&["EXISTS", &m(1)]);
        assert_eq!(kept, 1, "a refused round deleted the marker of the one before");
        arm(&mut bridge, &m(5)).expect("WATCH");
        let (tried, _) = attempt(&mut bridge, &m(5), &m(6), Some(&m(1)), &mut round, &[false], None);
        assert!(matches!(tried, Tried::Stored(_)));
        assert_eq!(redis.xlen("{taskd}:jobs"), 2 * run + 2);
        let kept: i64 = redis.query(&["EXISTS", &m(1)]);
        assert_eq!(kept, 0, "a stored round keeps the marker of the one before");
        redis.query::<()>(&["SET", &m(4), "stored"]);
        assert!(settle(&mut other, &m(4)).is_err(), "a value taskd did not write was read as an answer");
    }
}

/// A job whose store batch Redis has not acknowledged yet reads as `storing` for a `result`
/// query (the master tells by the batch's number, not by a mark on each job); once
/// acknowledged, it runs and ends as any other.
#[test]
fn a_job_whose_batch_is_not_acknowledged_yet_is_storing() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--task-worker-num", "1"]);
    d.wait_log("redis bridge: connected");
    let epoch: String = redis.query(&["GET", "{taskd}:epoch:web-1"]);
    let id = epoch.parse::<u64>().expect("the node's epoch") << taskd::durable::startup::EPOCH_SHIFT;
    let (mut a, mut b) = (d.connect(), d.connect());
    redis.signal(Signal::SIGSTOP);
    a.send(&job(0, 0));
    let storing = wait_for("the job to be known", || {
        b.send(&format!(r#"{{"type":"result","task_id":{id}}}"#));
        let v = b.recv();
        (v["event"] != "error").then_some(v)
    });
    redis.signal(Signal::SIGCONT);
    assert_eq!(storing["event"], "storing", "{storing}");
    let accepted = a.recv();
    assert_eq!(
        (&accepted["event"], accepted["task_id"].as_u64()),
        (&"accepted".into(), Some(id)),
        "{accepted}"
    );
    assert_eq!(a.recv()["event"], "done");
    b.send(&format!(r#"{{"type":"result","task_id":{id}}}"#));
    assert_eq!(b.recv()["event"], "done");
}

/// A round with a command Redis refuses when queued (OOM here) stores nothing and says why,
/// over taskd's own reader (which passes over the QUEUED replies unbuilt) and over the
/// crate's; the next round, armed again, is stored.
#[test]
fn a_round_refused_when_queued_says_why_and_the_next_is_stored() {
    use std::time::Duration;
    use taskd::durable::hot::HotConn;
    use taskd::durable::round::{arm, attempt, begin, Tried};
    let Some(redis) = Redis::start() else { return };
    let info = redis::Client::open(redis.url.as_str()).expect("a URL").get_connection_info().clone();
    let limit = Duration::from_secs(5);
    for (run, ours) in [(0, true), (1, false)] {
        let mut bridge = HotConn::connect(ours.then_some(&info), limit, Some(limit), limit, || redis.conn())
            .expect("a connection");
        let mut round = begin();
        round.command(5).arg(b"XADD").arg(b"{taskd}:jobs").arg(b"*").arg(b"f").arg(b"1");
        let m = |n: u32| format!("{{taskd}}:round:web-1:refused-{run}-{n}");
        arm(&mut bridge, &m(1)).expect("WATCH");
        let _: () = redis.query(&["CONFIG", "SET", "maxmemory", "1"]);
        let (tried, _) = attempt(&mut bridge, &m(1), &m(2), None, &mut round, &[false], None);
        let _: () = redis.query(&["CONFIG", "SET", "maxmemory", "0"]);
        let Tried::Refused(e) = tried else { panic!("a round refused when queued was not refused") };
        assert_eq!(e.code(), Some("OOM"), "{e}");
        assert_eq!(redis.xlen("{taskd}:jobs"), run);
        arm(&mut bridge, &m(3)).expect("WATCH");
        let (tried, armed) = attempt(&mut bridge, &m(3), &m(4), None, &mut round, &[false], None);
        assert!(matches!(tried, Tried::Stored(_)) && armed);
        assert_eq!(redis.xlen("{taskd}:jobs"), run + 1);
    }
}

/// A consumer whose MULTI's answer was lost writes it again: its dead letter and its parking
/// of a job for a retry happen once (the entry still pending), so no job runs twice for it
/// (an operator's replay of a second dead letter, or a second park of a job that is back in
/// the stream by then).
#[test]
fn a_consumers_outcome_written_twice_dead_letters_and_parks_its_job_once() {
    use taskd::durable::consumer::{DEAD, PARK};
    let Some(redis) = Redis::start() else { return };
    let (jobs, dead, delayed) = ("{taskd}:jobs", "{taskd}:dead", "{taskd}:delayed");
    let _: () = redis.query(&["XGROUP", "CREATE", jobs, "taskd", "$", "MKSTREAM"]);
    let take = |value: &str| -> String {
        let id: String = redis.query(&["XADD", jobs, "*", "t", value]);
        let _: redis::Value =
            redis.query(&["XREADGROUP", "GROUP", "taskd", "c", "COUNT", "1", "STREAMS", jobs, ">"]);
        id
    };
    let id = take("1");
    for _ in 0..2 {
        let _: i64 = redis.query(&["EVAL", DEAD, "2", dead, jobs, "taskd", &id, "t", "1", "why", "x"]);
    }
    assert_eq!(redis.xlen(dead), 1, "a second dead letter for one job");
    let id = take("2");
    let hash = "{taskd}:delayed:2";
    let first: i64 = redis.query(&["EVAL", PARK, "3", delayed, hash, jobs, "taskd", &id, "0", "2", "t", "2"]);
    assert_eq!(first, 1);
    // Due at once: moved back into the stream (as `MOVE_DUE` does) before the second try.
    let _: () = redis.query(&["DEL", hash]);
    let _: () = redis.query(&["ZREM", delayed, "2"]);
    let again: i64 = redis.query(&["EVAL", PARK, "3", delayed, hash, jobs, "taskd", &id, "0", "2", "t", "2"]);
    assert_eq!(again, 0, "a job parked a second time");
    let parked: i64 = redis.query(&["ZCARD", delayed]);
    assert_eq!(parked, 0);
}

/// The bridge gives up asking a Redis that stays hung whether a round was stored: the client
/// gets `failed` saying that its job may still run. Once Redis goes on, the job is stored
/// after all and a task process of the node runs it; its outcome reaches the master for a task
/// it has finished: dropped, and so is its reply.
#[test]
fn a_job_failed_while_redis_hung_and_run_after_all_gets_no_second_final_line() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "1"]);
    d.wait_log("redis bridge: connected");
    let mut c = d.connect();
    redis.signal(Signal::SIGSTOP);
    c.send("a@example.com");
    let failed = c.recv();
    assert_eq!(failed["event"], "failed", "{failed}");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("they may run")), "{failed}");
    let first = failed["task_id"].as_u64().expect("task_id");
    redis.signal(Signal::SIGCONT);
    // The job was in Redis's input when it stopped: it runs, and its outcome is acted on.
    wait_for("the failed job to run after all", || {
        d.outbox_lines().iter().any(|l| l["task_id"].as_u64() == Some(first)).then_some(())
    });
    stream_is_empty(&redis, "web-1");
    // A later job's `done` comes after anything the master sent for the first.
    let second = wait_for("a job accepted again", || {
        c.send("b@example.com");
        let v = c.recv();
        (v["event"] == "accepted").then(|| v["task_id"].as_u64().expect("task_id"))
    });
    let extra = finals_of_until(&mut c, &[first], second);
    assert!(extra.is_empty(), "a second final line for task {first}: {extra:?}");
}

/// `--redis-wait-replicas 1` with no replica at all: WAIT confirms 0 within its limit. The
/// job is in Redis and runs, so its client gets `accepted` saying so (`"replicas": 0`), then
/// exactly one `done`; the node warns.
#[test]
fn too_few_replicas_is_accepted_with_their_number_and_done_once() {
    let Some(redis) = Redis::start() else { return };
    let d =
        web(&redis, "web-1", &["--simulate-ms", "0", "--task-worker-num", "1", "--redis-wait-replicas", "1"]);
    d.wait_log("redis bridge: connected");
    let mut c = d.connect();
    let mut ids = Vec::new();
    for to in ["a@example.com", "b@example.com"] {
        let accepted = c.submit(to);
        assert_eq!(accepted["replicas"], 0, "{accepted}");
        let id = accepted["task_id"].as_u64().expect("task_id");
        assert_eq!(finals(&mut c, &[id])[&id]["event"], "done");
        ids.push(id);
    }
    // One more job proves that no second line for the first two was on its way.
    let third = c.submit("c@example.com")["task_id"].as_u64().expect("task_id");
    let extra = finals_of_until(&mut c, &ids, third);
    assert!(extra.is_empty(), "a second final line: {extra:?}");
    d.wait_log("0 of the 1 replicas");
    stream_is_empty(&redis, "web-1");
}

/// What a client read before its node died: the jobs accepted, and those answered.
#[derive(Default)]
struct Heard {
    accepted: Vec<u64>,
    answered: std::collections::HashSet<u64>,
}

impl Heard {
    fn line(&mut self, v: &Value) {
        match v["event"].as_str() {
            Some("accepted") => self.accepted.push(v["task_id"].as_u64().expect("task_id")),
            Some("done" | "failed") => {
                self.answered.insert(v["task_id"].as_u64().expect("task_id"));
            }
            _ => {}
        }
    }
}

#[test]
fn a_master_killed_under_durable_load_answers_every_accepted_job_after_its_restart() {
    let Some(redis) = Redis::start() else { return };
    let args = ["--task-worker-num", "2"];
    let first = web(&redis, "web-1", &args);
    // Four clients pipelining 500 jobs of 1 ms each (2,000 jobs take two task processes about
    // a second): jobs in every state (being stored, stored, taken, run, outcomes in the reply
    // stream, answered) when the master dies.
    let mut clients: Vec<Client> = (0..4).map(|_| first.connect()).collect();
    for (k, c) in clients.iter_mut().enumerate() {
        let mut lines = String::new();
        for i in 0..500 {
            lines.push_str(&job(k * 500 + i, 1));
            lines.push('\n');
        }
        c.send_raw(lines.as_bytes());
    }
    let mut heard: Vec<Heard> = (0..4).map(|_| Heard::default()).collect();
    // Killed once a quarter of the jobs are answered on the first connection.
    while heard[0].answered.len() < 125 {
        let v = clients[0].recv();
        heard[0].line(&v);
    }
    kill_daemon(&first);
    // What each client was told before the kill is in its socket: read to the end.
    for (c, h) in clients.iter_mut().zip(&mut heard) {
        while let Some(v) = c.try_recv(Duration::from_millis(200)) {
            h.line(&v);
        }
    }
    let unanswered: Vec<u64> =
        heard.iter().flat_map(|h| h.accepted.iter().filter(|id| !h.answered.contains(id)).copied()).collect();
    let accepted: usize = heard.iter().map(|h| h.accepted.len()).sum();
    assert!(accepted >= 500, "only {accepted} accepted before the kill");
    eprintln!("{accepted} jobs accepted before the kill, {} of them not answered", unanswered.len());

    // The same node again: each job accepted and not answered ends done, none is unknown.
    let again = web(&redis, "web-1", &args);
    let mut c = again.connect();
    for &id in &unanswered {
        let v = wait_for("the job's final line", || {
            let v = ask_result(&mut c, id);
            (v["event"] != "running" && v["event"] != "storing").then_some(v)
        });
        assert_eq!(v["event"], "done", "task {id}, accepted before the kill: {v}");
    }
    stream_is_empty(&redis, "web-1");
}
