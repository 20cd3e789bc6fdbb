//! The process model end to end: the real binary, real TCP, real signals.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{is_dead, wait_for, Daemon};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Every job of `ids` started (its task process logged `sending`) before any of them finished
/// (logged its last progress step): they ran at the same time, not one after the other.
fn assert_ran_at_the_same_time(daemon: &Daemon, ids: &[Value]) {
    let log = daemon.log();
    let line_of = |needle: String| {
        log.lines().position(|l| l.contains(&needle)).unwrap_or_else(|| panic!("no {needle:?} in\n{log}"))
    };
    let last_start = ids.iter().map(|id| line_of(format!("]: job {id}: sending"))).max().unwrap();
    let first_end = ids.iter().map(|id| line_of(format!("]: job {id}: 5/5 done"))).min().unwrap();
    assert!(last_start < first_end, "a job of {ids:?} finished before another one started:\n{log}");
}

/// The master's descriptor for `client`'s connection, and the socket's inode, from the
/// machine's TCP table and the master's /proc/PID/fd.
fn master_fd(daemon: &Daemon, client: &common::Client) -> Option<(u32, u64)> {
    let socket = common::tcp_socket(client.peer_addr(), client.local_addr())?;
    Some((common::socket_fd(daemon.pid, socket.inode)?, socket.inode))
}

fn kill9(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
}

/// The pid of the task process that logged starting `task_id`: its log line reads
/// `… task 2[1234]: job 7: sending email to …`.
fn running_task_pid(daemon: &Daemon, task_id: &Value) -> u32 {
    let needle = format!("]: job {task_id}: sending");
    let log = daemon.wait_log(&needle);
    let line = log.lines().find(|l| l.contains(&needle)).unwrap();
    let label = &line[..line.find(&needle).unwrap()];
    label.rsplit('[').next().unwrap().parse().unwrap()
}

#[test]
fn the_process_tree_has_every_role_named_by_slot_with_the_right_parents() {
    let daemon = Daemon::start(&["--worker-num", "3", "--task-worker-num", "2"]);
    let tree = daemon.wait_pool(3, 2);
    let manager = tree.iter().find(|p| p.args == "taskd: manager").expect("a manager");
    assert_eq!(manager.ppid, daemon.pid, "the manager is the master's child");
    let master = common::proc_info(daemon.pid).unwrap();
    assert_eq!(master.args, "taskd: master");
    assert_eq!(master.comm, "taskd: master");
    let mut titles: Vec<String> =
        tree.iter().filter(|p| p.ppid == manager.pid).map(|p| p.args.clone()).collect();
    titles.sort();
    assert_eq!(
        titles,
        ["taskd: task 0", "taskd: task 1", "taskd: worker 0", "taskd: worker 1", "taskd: worker 2"]
    );
    for p in &tree {
        assert_eq!(p.comm, p.args, "comm shows the role too");
    }
}

#[test]
fn email_and_sms_in_every_form_are_accepted_then_done() {
    let daemon = Daemon::start(&["--simulate-ms", "50"]);
    let mut client = daemon.connect();
    let cases = [
        ("alice@example.com", "email", "alice@example.com", "Email:alice@example.com, sent"),
        ("sms +8613800138000 hello", "sms", "+8613800138000", "SMS:+8613800138000, sent"),
        ("+8613800138000", "sms", "+8613800138000", "SMS:+8613800138000, sent"),
        ("email bob@example.org hi bob", "email", "bob@example.org", "Email:bob@example.org, sent"),
        (
            r#"{"type":"email","to":"c@example.com","subject":"s","body":"b"}"#,
            "email",
            "c@example.com",
            "Email:c@example.com, sent",
        ),
        (
            r#"{"type":"sms","to":"+15551234567","text":"t","simulate_ms":0}"#,
            "sms",
            "+15551234567",
            "SMS:+15551234567, sent",
        ),
    ];
    for (line, kind, to, result) in cases {
        let accepted = client.submit(line);
        assert_eq!(accepted["type"], kind, "{line}");
        assert_eq!(accepted["to"], to);
        assert!(accepted["task_id"].as_u64().unwrap() > 0);
        assert!(accepted["worker_pid"].as_u64().unwrap() > 0);
        let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
        assert_eq!(done["event"], "done", "{line}: {done}");
        assert_eq!(done["result"], result);
        assert_eq!(done["to"], to);
        let task_pid = done["task_pid"].as_u64().unwrap() as u32;
        assert!(daemon.pids_of("taskd: task").contains(&task_pid), "task_pid names a task process");
    }
    let outbox = daemon.outbox_lines();
    assert_eq!(outbox.len(), cases.len());
    assert!(outbox.iter().any(|m| m["subject"] == "s" && m["body"] == "b"));
}

#[test]
fn jobs_typed_quickly_run_in_parallel_on_different_task_processes() {
    let daemon = Daemon::start(&["--simulate-ms", "1200", "--task-worker-num", "4"]);
    let mut client = daemon.connect();
    let ids: Vec<Value> =
        (0..4).map(|i| client.submit(&format!("p{i}@example.com"))["task_id"].clone()).collect();
    let mut pids = HashSet::new();
    for _ in 0..4 {
        let done = client.recv();
        assert_eq!(done["event"], "done");
        assert!(ids.contains(&done["task_id"]));
        pids.insert(done["task_pid"].clone());
    }
    assert_eq!(pids.len(), 4, "four jobs ran on four task processes");
    assert_ran_at_the_same_time(&daemon, &ids);
}

#[test]
fn a_bad_request_gets_an_error_line_and_the_connection_keeps_working() {
    let daemon = Daemon::start(&["--simulate-ms", "0"]);
    let mut client = daemon.connect();
    for (bad, says) in [
        ("hello world", "cannot read this request: "),
        ("{not json", "invalid JSON: "),
        (r#"{"type":"fax","to":"x"}"#, r#"unknown type "fax": use "email", "sms" or "batch""#),
        (r#"{"type":"email"}"#, r#"missing field "to": who should get this email?"#),
        ("sms 12", r#"invalid phone number "12""#),
    ] {
        client.send(bad);
        let reply = client.recv();
        assert_eq!(reply["event"], "error", "{bad}");
        assert!(reply["error"].as_str().unwrap().starts_with(says), "{bad} -> {reply}");
    }
    let accepted = client.submit("ok@example.com");
    assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn max_request_recycles_the_worker_and_the_connection_stays_open() {
    let daemon = Daemon::start(&["--worker-num", "2", "--max-request", "4", "--simulate-ms", "0"]);
    daemon.wait_pool(2, 4);
    let mut client = daemon.connect();
    let mut worker_pids = Vec::new();
    for i in 0..6 {
        let accepted = client.submit(&format!("r{i}@example.com"));
        worker_pids.push(accepted["worker_pid"].as_u64().unwrap());
        client.final_reply(&accepted["task_id"], &mut Vec::new());
    }
    assert!(worker_pids[..4].iter().all(|&p| p == worker_pids[0]), "{worker_pids:?}");
    assert_ne!(worker_pids[4], worker_pids[0], "the 5th request went to a new worker: {worker_pids:?}");
    assert_eq!(worker_pids[5], worker_pids[4]);
    let log = daemon.wait_log("respawned worker");
    assert!(log.contains(&format!("old pid {} exited with status 0", worker_pids[0])), "{log}");
    assert!(log.contains(&format!("new pid {}", worker_pids[4])));
    assert!(log.contains("reached max_request (4)"));
}

#[test]
fn a_task_process_killed_mid_job_is_respawned_and_the_job_still_completes() {
    let daemon = Daemon::start(&["--simulate-ms", "1500", "--task-worker-num", "2"]);
    daemon.wait_pool(2, 2);
    let mut client = daemon.connect();
    let accepted = client.submit("victim@example.com");
    let pid = running_task_pid(&daemon, &accepted["task_id"]);
    kill9(pid);
    let log = daemon.wait_log(&format!("old pid {pid} killed by signal 9 (SIGKILL); new pid"));
    assert!(log.contains("respawned task"), "{log}");
    let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["attempts"], 2);
    assert_ne!(done["task_pid"].as_u64().unwrap() as u32, pid);
    daemon.wait_pool(2, 2);
    // And the daemon keeps serving.
    let next = client.submit(r#"{"type":"sms","to":"+15551234567","simulate_ms":0}"#);
    assert_eq!(client.final_reply(&next["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn a_job_whose_task_process_dies_past_the_retries_fails_with_the_reason() {
    let daemon = Daemon::start(&["--simulate-ms", "3000", "--task-worker-num", "1", "--task-retry-max", "0"]);
    daemon.wait_pool(2, 1);
    let mut client = daemon.connect();
    let accepted = client.submit("doomed@example.com");
    let pid = running_task_pid(&daemon, &accepted["task_id"]);
    kill9(pid);
    let failed = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(failed["event"], "failed");
    assert_eq!(failed["error"], format!("task process {pid} killed by signal 9 (SIGKILL)"));
}

#[test]
fn a_killed_worker_is_respawned_and_its_connection_keeps_working() {
    let daemon = Daemon::start(&["--worker-num", "1", "--simulate-ms", "0"]);
    daemon.wait_pool(1, 4);
    let mut client = daemon.connect();
    let first = client.submit("before@example.com");
    client.final_reply(&first["task_id"], &mut Vec::new());
    let old = first["worker_pid"].as_u64().unwrap() as u32;
    kill9(old);
    daemon.wait_log(&format!("respawned worker 0: old pid {old} killed by signal 9 (SIGKILL); new pid"));
    let second = client.submit("after@example.com");
    assert_ne!(second["worker_pid"].as_u64().unwrap() as u32, old);
    assert_eq!(client.final_reply(&second["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn requests_queued_for_a_killed_worker_are_answered_by_its_successor() {
    // The task pool is slow, the worker is killed while requests wait in its channel.
    let daemon = Daemon::start(&["--worker-num", "1", "--simulate-ms", "0"]);
    let pool = daemon.wait_pool(1, 4);
    let worker = pool.iter().find(|p| p.args == "taskd: worker 0").unwrap().pid;
    let mut client = daemon.connect();
    // Stop the worker so requests pile up unanswered, then kill it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker as i32), Signal::SIGSTOP).unwrap();
    for i in 0..5 {
        client.send(&format!("queued{i}@example.com"));
    }
    // The master has read the five lines (so handed them to the stopped worker) once the
    // client's socket has nothing unacknowledged and the master's has nothing unread.
    let (here, there) = (client.local_addr(), client.peer_addr());
    wait_for("the master to read the five requests", || {
        let sent = common::tcp_socket(here, there)?.tx_queue == 0;
        let read = common::tcp_socket(there, here)?.rx_queue == 0;
        (sent && read).then_some(())
    });
    kill9(worker);
    let mut accepted = 0;
    let mut done = 0;
    while done < 5 {
        let reply = client.recv();
        match reply["event"].as_str() {
            Some("accepted") => accepted += 1,
            Some("done") => done += 1,
            other => panic!("unexpected {other:?}: {reply}"),
        }
    }
    assert_eq!(accepted, 5, "every request answered exactly once");
    assert!(client.try_recv(Duration::from_millis(300)).is_none(), "no duplicate replies");
}

#[test]
fn a_killed_manager_is_replaced_and_connections_and_jobs_survive() {
    let daemon = Daemon::start(&["--simulate-ms", "800"]);
    let pool = daemon.wait_pool(2, 4);
    let manager = pool.iter().find(|p| p.args == "taskd: manager").unwrap().pid;
    let mut client = daemon.connect();
    let accepted = client.submit("survivor@example.com");
    kill9(manager);
    daemon.wait_log("starting a new manager");
    let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    let pool = daemon.wait_pool(2, 4);
    assert!(pool.iter().all(|p| p.pid != manager));
    let next = client.submit("after@example.com");
    assert_eq!(client.final_reply(&next["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn a_manager_killed_right_after_its_start_is_replaced_after_a_back_off() {
    let daemon = Daemon::start(&["--simulate-ms", "0"]);
    daemon.wait_pool(2, 4);
    // Kill each new manager as soon as it shows: managers that die at start must not be forked
    // in a tight loop (DESIGN §5), as pool processes are not.
    let mut killed = Vec::new();
    for _ in 0..3 {
        // The master's own child that says it is a manager: a pool process just forked still
        // has its manager's title, and once that manager is killed the master (subreaper) is
        // its parent too, until it sees its parent gone and exits.
        let manager = wait_for("a new manager", || {
            let log = daemon.log();
            daemon
                .tree()
                .iter()
                .find(|p| {
                    p.ppid == daemon.pid
                        && p.args.starts_with("taskd: manager")
                        && !killed.contains(&p.pid)
                        && log.contains(&format!("manager started (pid {})", p.pid))
                })
                .map(|p| p.pid)
        });
        kill9(manager);
        killed.push(manager);
    }
    // Killed is not gone yet: until then the last one may still count as the pool's manager.
    wait_for("the killed managers to be gone", || killed.iter().all(|&pid| is_dead(pid)).then_some(()));
    let pool = daemon.wait_pool(2, 4);
    assert!(pool.iter().all(|p| !killed.contains(&p.pid)));
    let log = daemon.log();
    // The supervisor logs how long each one lived; one that lived under a second was replaced
    // after a back-off, which the log names. (Under extreme load the test may kill a manager
    // later than that: then there is nothing to check for it.)
    for pid in &killed[1..] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("manager (pid {pid}) killed by signal 9 (SIGKILL) after ")))
            .unwrap_or_else(|| panic!("no line for manager {pid}: {log}"));
        let lived = line.rsplit("after ").next().unwrap();
        if lived.ends_with("ms") || lived.ends_with("µs") || lived.ends_with("ns") {
            let backed_off = log.lines().any(|l| {
                l.contains(&format!("manager (pid {pid}) killed"))
                    && l.contains("after its start")
                    && l.contains("respawning in")
            });
            assert!(backed_off, "manager {pid} lived {lived} and was replaced without a back-off: {log}");
        }
    }
    let mut client = daemon.connect();
    let job = client.submit("after@example.com");
    assert_eq!(client.final_reply(&job["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn killing_the_master_leaves_no_process_behind() {
    let daemon = Daemon::start(&[]);
    let pool = daemon.wait_pool(2, 4);
    let pids: Vec<u32> = pool.iter().map(|p| p.pid).collect();
    kill9(daemon.pid);
    wait_for("every pool process to die with the master", || pids.iter().all(|&p| is_dead(p)).then_some(()));
}

#[test]
fn sigterm_finishes_in_flight_jobs_then_every_process_exits_with_0() {
    // The manager logs each pool process's end at debug level.
    let mut daemon =
        Daemon::start_env(&["--simulate-ms", "700"], &[("RUST_LOG", "info,taskd::supervisor=debug")])
            .unwrap_or_else(|(status, log)| panic!("taskd did not start ({status}):\n{log}"));
    let pool = daemon.wait_pool(2, 4);
    let mut client = daemon.connect();
    let a = client.submit("a@example.com");
    let b = client.submit("+15551234567");
    daemon.signal(Signal::SIGTERM);
    let mut others = Vec::new();
    assert_eq!(client.final_reply(&a["task_id"], &mut others)["event"], "done");
    if !others.iter().any(|r| r["task_id"] == b["task_id"]) {
        assert_eq!(client.final_reply(&b["task_id"], &mut others)["event"], "done");
    }
    let status = daemon.wait_exit(common::DEADLINE).expect("the master exits");
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    wait_for("no pool process left", || pool.iter().all(|p| is_dead(p.pid)).then_some(()));
    // Each of them exited by itself with 0: none had to be signalled, none was killed.
    let log = daemon.log();
    for p in pool.iter().filter(|p| p.args != "taskd: manager") {
        let title = p.args.strip_prefix("taskd: ").unwrap();
        assert!(log.contains(&format!("{title} (pid {}) exited with status 0", p.pid)), "{}: {log}", p.args);
    }
    assert!(log.contains("taskd stopped; the manager exited with status 0"), "{log}");
    assert!(!log.contains("still running"), "{log}");
    assert!(client.closed_by_server());
    // New connections are refused once it is gone.
    assert!(std::net::TcpStream::connect(daemon.addr).is_err());
}

#[test]
fn a_reply_for_a_closed_session_never_reaches_a_new_connection_on_the_same_fd() {
    let daemon = Daemon::start(&["--simulate-ms", "1500", "--worker-num", "1"]);
    daemon.wait_pool(1, 4);
    let mut gone = daemon.connect();
    gone.submit("gone@example.com");
    let (gone_fd, gone_socket) =
        wait_for("the master's fd of the first connection", || master_fd(&daemon, &gone));
    // Reset, not closed: a client that closes its side still gets its replies, so the master
    // would keep its fd until the job is done.
    gone.abort();
    wait_for("the master to close it", || common::socket_fd(daemon.pid, gone_socket).is_none().then_some(()));
    // The master reuses the lowest free fd: the new connection gets the old one's.
    let mut fresh = daemon.connect();
    let (fresh_fd, _) = wait_for("the master's fd of the new connection", || master_fd(&daemon, &fresh));
    assert_eq!(fresh_fd, gone_fd, "the new connection is on the closed one's fd");
    assert!(
        !daemon.outbox_lines().iter().any(|m| m["to"] == "gone@example.com"),
        "the old job was still running when its fd was reused"
    );
    // Its result comes while the new session holds the fd: the master counts the result and
    // routes its reply together, so once `stats` shows it done, a misrouted reply would have
    // come before that `stats` line.
    wait_for("the old job's result", || {
        fresh.send("stats");
        let stats = fresh.recv();
        assert_eq!(stats["event"], "stats", "only what it asked for: {stats}");
        (stats["tasks_done"] == 1).then_some(())
    });
    let mine = fresh.submit("fresh@example.com");
    let done = fresh.final_reply(&mine["task_id"], &mut Vec::new());
    assert_eq!(done["to"], "fresh@example.com");
    // The old job did run: it is in the outbox, its reply went nowhere.
    assert!(daemon.outbox_lines().iter().any(|m| m["to"] == "gone@example.com"));
}

#[test]
fn two_hundred_jobs_over_twenty_connections_are_each_answered_exactly_once() {
    let daemon = Daemon::start(&["--simulate-ms", "0"]);
    let handles: Vec<_> = (0..20)
        .map(|c| {
            let addr = daemon.addr;
            std::thread::spawn(move || {
                let mut client = common::Client::connect(addr);
                for j in 0..10 {
                    client.send(&format!("c{c}j{j}@example.com"));
                }
                let (mut accepted, mut done) = (Vec::new(), Vec::new());
                while done.len() < 10 {
                    let reply = client.recv();
                    match reply["event"].as_str() {
                        Some("accepted") => accepted.push(reply["task_id"].as_u64().unwrap()),
                        Some("done") => {
                            let id = reply["task_id"].as_u64().unwrap();
                            assert!(accepted.contains(&id), "done before accepted for task {id}");
                            done.push(id);
                        }
                        _ => panic!("unexpected {reply}"),
                    }
                }
                assert!(client.try_recv(Duration::from_millis(200)).is_none(), "no extra replies");
                accepted.sort();
                done.sort();
                assert_eq!(accepted, done);
                accepted
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        for id in h.join().unwrap() {
            assert!(all.insert(id), "task id {id} given twice");
        }
    }
    assert_eq!(all.len(), 200);
    assert_eq!(daemon.outbox_lines().len(), 200);
}

#[test]
fn a_batch_fans_out_and_answers_one_done_with_every_result_in_order() {
    let daemon = Daemon::start(&["--simulate-ms", "300"]);
    let mut client = daemon.connect();
    let accepted = client.submit(
        r#"{"type":"batch","jobs":[{"type":"email","to":"a@example.com"},{"type":"sms","to":"+15551234567"},{"type":"email","to":"b@example.com","simulate_ms":0}]}"#,
    );
    assert_eq!(accepted["type"], "batch");
    assert_eq!(accepted["count"], 3);
    let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done");
    let results = done["results"].as_array().unwrap();
    let to: Vec<&str> = results.iter().map(|r| r["to"].as_str().unwrap()).collect();
    assert_eq!(to, ["a@example.com", "+15551234567", "b@example.com"]);
    assert_eq!(results[1]["result"], "SMS:+15551234567, sent");
    // Fanned out: the three ran on more than one task process, the two slow ones at once.
    let outbox = daemon.outbox_lines();
    let pids: HashSet<String> = outbox.iter().map(|m| m["task_pid"].to_string()).collect();
    assert!(pids.len() > 1, "{pids:?}");
    let slow: Vec<Value> =
        outbox.iter().filter(|m| m["to"] != "b@example.com").map(|m| m["task_id"].clone()).collect();
    assert_eq!(slow.len(), 2, "{outbox:?}");
    assert_ran_at_the_same_time(&daemon, &slow);
}

#[test]
fn stats_reports_counters_and_every_process() {
    let daemon = Daemon::start(&["--simulate-ms", "0"]);
    daemon.wait_pool(2, 4);
    let mut client = daemon.connect();
    let accepted = client.submit("s@example.com");
    client.final_reply(&accepted["task_id"], &mut Vec::new());
    client.send("stats");
    let stats = client.recv();
    assert_eq!(stats["event"], "stats");
    assert_eq!(stats["connection_num"], 1);
    assert_eq!(stats["worker_num"], 2);
    assert_eq!(stats["task_worker_num"], 4);
    assert_eq!(stats["tasks_done"], 1);
    assert!(stats["request_count"].as_u64().unwrap() >= 1);
    let procs = stats["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1 + 1 + 2 + 4);
    assert_eq!(procs[0]["pid"], daemon.pid);
    assert!(procs.iter().filter(|p| p["role"] == "task").all(|p| p["pid"].as_u64().unwrap() > 0));
}

#[test]
fn a_client_that_shuts_down_its_side_still_gets_its_replies() {
    let daemon = Daemon::start(&["--simulate-ms", "100"]);
    let mut client = daemon.connect();
    client.send("halfclose@example.com");
    client.shutdown_write();
    assert_eq!(client.recv()["event"], "accepted");
    assert_eq!(client.recv()["event"], "done");
    assert!(client.closed_by_server(), "closed once everything is answered");
}

#[test]
fn a_line_longer_than_package_max_length_gets_an_error_and_the_connection_closes() {
    let daemon = Daemon::start(&["--package-max-length", "64", "--simulate-ms", "0"]);
    let mut other = daemon.connect();
    let mut client = daemon.connect();
    client.send(&format!("{}@example.com", "x".repeat(100)));
    let reply = client.recv();
    assert_eq!(reply["event"], "error");
    assert!(reply["error"].as_str().unwrap().contains("package_max_length (64 bytes)"), "{reply}");
    assert!(client.closed_by_server());
    let accepted = other.submit("fine@example.com");
    assert_eq!(other.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn invalid_options_and_a_taken_port_are_one_line_errors() {
    let out = common::run_with_timeout(
        std::process::Command::new(env!("CARGO_BIN_EXE_taskd")).args(["--worker-num", "0"]),
        common::DEADLINE,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker_num"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let daemon = Daemon::start(&[]);
    let port = daemon.addr.port().to_string();
    let out = common::run_with_timeout(
        std::process::Command::new(env!("CARGO_BIN_EXE_taskd"))
            .args(["--port", &port, "--outbox"])
            .arg(daemon.dir.path().join("second.log")),
        common::DEADLINE,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("address already in use"), "{err}");
}

#[test]
fn a_rolling_reload_under_load_replaces_every_process_and_loses_nothing() {
    let daemon = Daemon::start(&["--simulate-ms", "20", "--worker-num", "2", "--task-worker-num", "3"]);
    let before: HashSet<u32> = daemon.wait_pool(2, 3).iter().map(|p| p.pid).collect();
    let addr = daemon.addr;
    let load = std::thread::spawn(move || {
        let mut client = common::Client::connect(addr);
        let (mut accepted, mut done) = (0, 0);
        for i in 0..150 {
            client.send(&format!("load{i}@example.com"));
            std::thread::sleep(Duration::from_millis(4));
        }
        while done < 150 {
            let reply = client.recv();
            match reply["event"].as_str() {
                Some("accepted") => accepted += 1,
                Some("done") => done += 1,
                _ => panic!("unexpected {reply}"),
            }
        }
        assert_eq!(accepted, 150);
    });
    // Under load: once the first of its jobs is done.
    daemon.wait_log("done: Email:load");
    daemon.signal(Signal::SIGUSR1);
    daemon.signal(Signal::SIGUSR2);
    load.join().unwrap();
    daemon.wait_log("reload complete");
    wait_for("every worker and task process replaced", || {
        let after = daemon.wait_pool(2, 3);
        after.iter().filter(|p| p.args != "taskd: manager").all(|p| !before.contains(&p.pid)).then_some(())
    });
    assert!(!daemon.log().contains("failed"), "{}", daemon.log());
}

#[test]
fn dispatch_mode_1_spreads_one_connections_requests_round_robin() {
    let daemon = Daemon::start(&["--dispatch-mode", "1", "--worker-num", "2", "--simulate-ms", "0"]);
    daemon.wait_pool(2, 4);
    let mut client = daemon.connect();
    let pids: Vec<u64> = (0..6)
        .map(|i| {
            let accepted = client.submit(&format!("rr{i}@example.com"));
            client.final_reply(&accepted["task_id"], &mut Vec::new());
            accepted["worker_pid"].as_u64().unwrap()
        })
        .collect();
    for pair in pids.windows(2) {
        assert_ne!(pair[0], pair[1], "alternating workers: {pids:?}");
    }
}

#[test]
fn dispatch_mode_3_sends_requests_to_an_idle_worker() {
    let daemon = Daemon::start(&["--dispatch-mode", "3", "--worker-num", "2", "--simulate-ms", "0"]);
    let pool = daemon.wait_pool(2, 4);
    let stuck = pool.iter().find(|p| p.args == "taskd: worker 0").unwrap().pid;
    // Worker 0 is stuck (stopped): once it holds one request, the others go to worker 1.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(stuck as i32), Signal::SIGSTOP).unwrap();
    let mut client = daemon.connect();
    // One request at a time: each goes to the worker with the fewest pending. The first may
    // land on the stuck one (it looked idle); after that it is busy, and worker 1 gets them.
    let (mut accepted, mut done) = (0, 0);
    for i in 0..6 {
        client.send(&format!("idle{i}@example.com"));
        while let Some(reply) = client.try_recv(Duration::from_millis(500)) {
            match reply["event"].as_str() {
                Some("accepted") => {
                    assert_ne!(reply["worker_pid"].as_u64().unwrap() as u32, stuck);
                    accepted += 1;
                }
                Some("done") => done += 1,
                other => panic!("unexpected {other:?}"),
            }
            if reply["event"] == "accepted" {
                break;
            }
        }
    }
    assert!(accepted >= 5, "only the request the stuck worker holds waits: {accepted} accepted");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(stuck as i32), Signal::SIGCONT).unwrap();
    while accepted < 6 || done < 6 {
        match client.recv()["event"].as_str() {
            Some("accepted") => accepted += 1,
            Some("done") => done += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A client that lost its connection asks what became of its job, and gets the `done` it
/// missed; a job whose client got its reply is kept too.
#[test]
fn a_reconnecting_client_gets_the_reply_it_missed() {
    let d = Daemon::start(&["--simulate-ms", "400"]);
    let mut c = d.connect();
    let id = c.submit("gone@example.com")["task_id"].as_u64().unwrap();
    let batch = c.submit(r#"{"type":"batch","jobs":[{"type":"email","to":"b1@example.com"},{"type":"sms","to":"13800138000"}]}"#)
        ["task_id"]
        .as_u64()
        .unwrap();
    drop(c);
    let mut c = d.connect();
    c.send(&format!(r#"{{"type":"result","task_id":{id}}}"#));
    let running = c.recv();
    assert_eq!(running["event"], "running", "{running}");
    let done = wait_for("the missed reply", || {
        c.send(&format!(r#"{{"type":"result","task_id":{id}}}"#));
        let v = c.recv();
        (v["event"] == "done").then_some(v)
    });
    assert_eq!(done["task_id"].as_u64(), Some(id));
    assert_eq!(done["to"], "gone@example.com", "the job's own done line: {done}");
    let batch_done = wait_for("the missed batch reply", || {
        c.send(&format!(r#"{{"type":"result","task_id":{batch}}}"#));
        let v = c.recv();
        (v["event"] == "done").then_some(v)
    });
    assert_eq!(batch_done["results"][1]["result"], "SMS:13800138000, sent", "{batch_done}");
    let here = c.submit("here@example.com")["task_id"].as_u64().unwrap();
    let delivered = c.final_reply(&here.into(), &mut Vec::new());
    assert_eq!(delivered["event"], "done");
    c.send(&format!(r#"{{"type":"result","task_id":{here}}}"#));
    assert_eq!(c.recv(), delivered, "delivered, and kept too (as Celery's users expect)");
    c.send(r#"{"type":"result","task_id":"x"}"#);
    assert!(c.recv()["error"].as_str().unwrap().contains("task_id"));
}

#[test]
fn a_client_that_closes_its_side_after_many_jobs_gets_every_done_then_the_connection_closes() {
    use std::io::{BufRead, BufReader, Write};
    let daemon = Daemon::start(&["--simulate-ms", "0"]);
    let mut stream = std::net::TcpStream::connect(daemon.addr).unwrap();
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let jobs: String = (0..200).map(|i| format!("closer{i}@example.com\n")).collect();
    stream.write_all(jobs.as_bytes()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    // Each job's `done` goes out from its task process, and the master (not a worker) counts
    // it finished: the connection closes once the last one is written, not before.
    let mut done = HashSet::new();
    for line in BufReader::new(stream).lines() {
        let reply: Value = serde_json::from_str(&line.expect("read before the connection closed")).unwrap();
        match reply["event"].as_str() {
            Some("done") => assert!(done.insert(reply["to"].as_str().unwrap().to_string()), "{reply}"),
            Some("accepted") => {}
            _ => panic!("{reply}"),
        }
    }
    assert_eq!(done.len(), 200, "every job's done before the close");
}

/// What a pool process holds in anonymous memory, in kB, from /proc/PID/smaps: in all, and of
/// it in the heap. Anonymous pages are its heap, its stack and the binary's relocated tables,
/// its own or copied at fork from the manager and the master (RSS counts them in full in every
/// process); the binary's text is left out, as the pages of it a process maps (64 kB at a
/// time) move with the code's layout.
fn anonymous_kb(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut all, mut heap, mut in_heap) = (0, 0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            // A mapping's first line: `start-end perms offset dev inode [name]`.
            (Some(range), Some(_)) if range.contains('-') && !range.ends_with(':') => {
                in_heap = line.ends_with("[heap]");
            }
            (Some("Anonymous:"), Some(kb)) => all += kb.parse::<u64>().unwrap(),
            (Some("Rss:"), Some(kb)) if in_heap => heap += kb.parse::<u64>().unwrap(),
            _ => {}
        }
    }
    (all, heap)
}

#[test]
fn a_worker_or_task_process_holds_little_memory_of_its_own_or_inherited() {
    let daemon = Daemon::start(&["--simulate-ms", "0"]);
    // Each worker and task process has run its loop and some jobs.
    let mut clients = [daemon.connect(), daemon.connect()];
    for (c, client) in clients.iter_mut().enumerate() {
        for i in 0..10 {
            let accepted = client.submit(&format!("mem{c}-{i}@example.com"));
            assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
        }
    }
    let pool: Vec<_> = daemon.wait_pool(2, 4).into_iter().filter(|p| p.args != "taskd: manager").collect();
    for p in &pool {
        let (anonymous, heap) = anonymous_kb(p.pid);
        // About 1.3 MB and 0.16 MB here in a debug build (0.6 and 0.16 in release). Tables of
        // pointers the binary relocates at start (chrono-tz's 1 MB of time zones did), buffers
        // allocated before a fork, or a heap not trimmed before it (0.6 MB free of 0.85 at the
        // first fork) would be in every pool process.
        assert!(anonymous < 2048, "{}: {anonymous} kB of anonymous memory", p.args);
        assert!(heap < 512, "{}: {heap} kB of heap", p.args);
    }
}

/// CPU time (utime + stime, in clock ticks) of each process of the daemon, master included.
fn cpu_ticks(daemon: &Daemon) -> Vec<(u32, u64)> {
    let mut pids: Vec<u32> = daemon.tree().iter().map(|p| p.pid).collect();
    pids.push(daemon.pid);
    pids.into_iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command's closing parenthesis: state is the first, utime the 12th.
            let mut rest = stat[stat.rfind(')')? + 2..].split_whitespace().skip(11);
            let utime: u64 = rest.next()?.parse().ok()?;
            let stime: u64 = rest.next()?.parse().ok()?;
            Some((pid, utime + stime))
        })
        .collect()
}

#[test]
fn busy_polling_runs_jobs_and_stops_when_the_work_does() {
    // The most polling there is: a process that kept polling would burn ~100 ticks a second.
    let daemon = Daemon::start(&["--busy-poll-us", "10000", "--simulate-ms", "0"]);
    daemon.wait_pool(2, 4);
    let mut client = daemon.connect();
    for i in 0..50 {
        client.send(&format!("poll{i}@example.com"));
    }
    let done = (0..100).map(|_| client.recv()).filter(|r| r["event"] == "done").count();
    assert_eq!(done, 50);
    // Idle again: over half a second, all of it together uses at most a few ticks (the master's
    // periodic turns each poll up to 10 ms). Measured over windows until one is quiet.
    wait_for("every process to stop polling once the jobs are done", || {
        let before = cpu_ticks(&daemon);
        std::thread::sleep(Duration::from_millis(500));
        let after = cpu_ticks(&daemon);
        let used: u64 = after
            .iter()
            .filter_map(|(pid, t)| before.iter().find(|(p, _)| p == pid).map(|(_, b)| t.saturating_sub(*b)))
            .sum();
        (used <= 5).then_some(())
    });
}

/// How many times `pid` has gone to sleep (blocked) so far: `voluntary_ctxt_switches`.
fn sleeps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn one_job_at_a_time_wakes_each_process_only_for_what_it_reads() {
    // One job at a time: the worker and the task process each read one message per job, and
    // sleep once per job. One that also asked for writability all along was woken again when
    // the master read what it sent (an AF_UNIX stream wakes its EPOLLOUT waiters on every
    // read): 1.7-2.0 sleeps per job, each an IPI to the other CPU when it had gone to sleep.
    // (The master's count depends on how the three meet in time: not checked.)
    let daemon = Daemon::start(&["--worker-num", "1", "--task-worker-num", "1", "--simulate-ms", "0"]);
    daemon.wait_pool(1, 1);
    let worker = daemon.pids_of("taskd: worker 0")[0];
    let task = daemon.pids_of("taskd: task 0")[0];
    let mut client = daemon.connect();
    let mut one_job = |i: usize| {
        client.send(&format!("wake{i}@example.com"));
        assert_eq!(client.recv()["event"], "accepted");
        assert_eq!(client.recv()["event"], "done");
    };
    (0..10).for_each(&mut one_job);
    let jobs = 200;
    let before = [daemon.pid, worker, task].map(sleeps);
    (0..jobs).for_each(&mut one_job);
    let after = [daemon.pid, worker, task].map(sleeps);
    let per_job = |k: usize| (after[k] - before[k]) as f64 / jobs as f64;
    let (master, worker, task) = (per_job(0), per_job(1), per_job(2));
    println!("sleeps per job: master {master}, worker {worker}, task process {task}");
    assert!(worker <= 1.25 && task <= 1.25, "sleeps per job: worker {worker}, task process {task}");
}

/// The sections and the function names of an ELF file: (name, address, size) of each section
/// header, and the name of each `STT_FUNC` symbol of `.symtab`. Little-endian ELF64 only (what
/// taskd is built as on Linux); enough of the format to check the binary's layout.
fn elf_sections_and_functions(path: &std::path::Path) -> (Vec<(String, u64, u64)>, Vec<String>) {
    let elf = std::fs::read(path).unwrap();
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "{}: not a little-endian ELF64 file", path.display());
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let cstr = |o: usize| {
        let end = elf[o..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8_lossy(&elf[o..o + end]).into_owned()
    };
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28) as usize, u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    // Each header: name, type, flags, addr, offset, size, link, ...
    let header = |i: usize| shoff + i * shentsize;
    let names_at = u64_at(header(shstrndx) + 0x18) as usize;
    let mut sections = Vec::new();
    let mut functions = Vec::new();
    for i in 0..shnum {
        let h = header(i);
        let name = cstr(names_at + u32_at(h));
        let (kind, addr, offset, size) =
            (u32_at(h + 4), u64_at(h + 0x10), u64_at(h + 0x18), u64_at(h + 0x20));
        sections.push((name, addr, size));
        // SHT_SYMTAB: 24-byte entries (name, info, other, shndx, value, size), names in the
        // string table its `link` names.
        if kind == 2 {
            let strings = u64_at(header(u32_at(h + 0x28)) + 0x18) as usize;
            for entry in (offset as usize..(offset + size) as usize).step_by(24) {
                if elf[entry + 4] & 0xf == 2 {
                    functions.push(cstr(strings + u32_at(entry)));
                }
            }
        }
    }
    (sections, functions)
}

#[test]
fn the_code_a_pool_process_runs_is_linked_together_and_every_function_of_the_list_exists() {
    // A binary installed with `cp` is held in page cache folios of up to 128 kB, and a process
    // maps each one it touches whole: the ~150 kB of code a worker or task process runs, spread
    // over the text, touched ~20 of them (worker 3.9 MB idle; README, Performance: RSS).
    // link/pool_text.ld puts them together in `.text.pool`, and names them without their hash:
    // a function renamed or gone leaves its line matching nothing, and the code it stood for
    // goes back to being spread out (run benches/pool_text.py again).
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_taskd"));
    let (sections, mut functions) = elf_sections_and_functions(bin);
    functions.sort_unstable();
    let pool = sections.iter().find(|(name, _, _)| name == ".text.pool");
    assert!(pool.is_some_and(|(_, _, size)| *size > 0), "no .text.pool in {}: {sections:?}", bin.display());
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/link/pool_text.ld")).unwrap();
    // taskd's own functions (`taskd::…`, or a generic one of taskd's types): what an edit here
    // renames. Those of std and the dependencies change with their versions, and some exist
    // only in a release build (an instance std's own optimized copy provides).
    let patterns: Vec<&str> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("*(.text.")?.split_whitespace().next())
        .filter(|p| p.starts_with("_ZN5taskd") || p.contains("taskd.."))
        .collect();
    assert!(patterns.len() > 20, "{} of taskd's functions in link/pool_text.ld", patterns.len());
    // The pool's functions first (its processes are many: each maps only the first folios), then
    // the manager's (3.0 MB of code mapped when its functions were spread among the rest).
    let groups: Vec<&str> =
        script.lines().filter_map(|l| l.trim().strip_prefix("/* ")?.strip_suffix(" */")).collect();
    assert!(groups.starts_with(&["pool", "manager"]), "groups of link/pool_text.ld: {groups:?}");
    let stale: Vec<&str> = patterns
        .iter()
        .filter(|p| {
            let prefix = p.strip_suffix('*').unwrap_or(p);
            let first = functions.partition_point(|f| f.as_str() < prefix);
            !functions.get(first).is_some_and(|f| f.starts_with(prefix))
        })
        .copied()
        .collect();
    assert!(
        stale.is_empty(),
        "no function of {} is named as these lines of link/pool_text.ld: {stale:#?}",
        bin.display()
    );
}
