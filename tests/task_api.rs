//! The rest of Swoole's task API (`examples/task_api.rs` on the real machinery): a task for one
//! given task process, a per-task callback, waiting for one result and for several.

mod common;

use std::time::Duration;

use common::Daemon;
use serde_json::Value;

fn start() -> Daemon {
    let daemon = Daemon::start_example("task_api", &["--worker-num", "1", "--task-worker-num", "3"]);
    daemon.wait_pool(1, 3);
    daemon
}

fn task_pids(daemon: &Daemon) -> Vec<(u32, u32)> {
    daemon
        .tree()
        .into_iter()
        .filter_map(|p| {
            p.args.strip_prefix("taskd: task ").and_then(|s| s.parse().ok()).map(|slot| (slot, p.pid))
        })
        .collect()
}

#[test]
fn task_to_runs_on_the_named_task_process() {
    let daemon = start();
    let pids = task_pids(&daemon);
    let mut client = daemon.connect();
    for slot in [2u32, 0, 2, 1] {
        let accepted = client.submit(&format!("to {slot} hello"));
        let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
        let pid = pids.iter().find(|(s, _)| *s == slot).unwrap().1;
        assert!(
            done["result"].as_str().unwrap().starts_with(&format!("pid={pid} slot={slot} HELLO")),
            "{done}"
        );
    }
    client.send("to 7 nowhere");
    let error = client.recv();
    assert!(error["error"].as_str().unwrap().contains("there is no task process 7"), "{error}");
}

#[test]
fn task_with_calls_its_callback_instead_of_on_finish() {
    let daemon = start();
    let mut client = daemon.connect();
    let accepted = client.submit("cb quiet please");
    let reply = client.recv();
    assert_eq!(reply["event"], "callback", "{reply}");
    assert_eq!(reply["task_id"], accepted["task_id"]);
    assert_eq!(reply["asked"], "quiet please");
    assert!(reply["result"].as_str().unwrap().ends_with("QUIET PLEASE"));
    // And on_finish did not answer too: one worker, so the reply to a later request comes
    // after anything that worker sent for this task.
    client.send("wait 5000 after");
    let next = client.recv();
    assert_eq!(next["event"], "waited", "nothing between the callback and this: {next}");
    assert!(next["result"].as_str().unwrap().ends_with("AFTER"), "{next}");
}

#[test]
fn a_callback_whose_worker_was_replaced_lands_in_on_finish_with_its_context() {
    let daemon = start();
    let mut client = daemon.connect();
    let accepted = client.submit("cb sleep=800 orphaned");
    let worker = accepted_worker(&daemon);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let reply = client.recv();
    assert_eq!(reply["event"], "done", "{reply}");
    assert_eq!(reply["task_id"], accepted["task_id"]);
    assert_eq!(reply["via"], "on_finish (its callback's worker was replaced)");
    daemon.wait_log("was submitted with a callback by an earlier process of worker 0");
}

fn accepted_worker(daemon: &Daemon) -> u32 {
    daemon.tree().into_iter().find(|p| p.args == "taskd: worker 0").unwrap().pid
}

#[test]
fn task_wait_returns_the_result_or_times_out_and_drops_the_late_one() {
    let daemon = start();
    let mut client = daemon.connect();
    client.send("wait 5000 quick");
    let waited = client.recv();
    assert_eq!(waited["event"], "waited");
    assert!(waited["result"].as_str().unwrap().ends_with("QUICK"));

    client.send("wait 200 sleep=700 slow");
    let timed_out = client.recv();
    assert_eq!(timed_out["error"], "no result within 200 ms", "{timed_out}");
    // The late result is dropped: not given to the next wait, nor to on_finish.
    client.send("wait 5000 next");
    let next = client.recv();
    assert!(next["result"].as_str().unwrap().ends_with("NEXT"), "{next}");
    assert!(client.try_recv(Duration::from_millis(900)).is_none(), "nothing more arrives");
    assert!(daemon.log().contains("came after its wait ended; dropped"), "{}", daemon.log());

    client.send("wait 5000 please fail");
    let failed = client.recv();
    assert!(failed["error"].as_str().unwrap().contains("was asked to fail"), "{failed}");
}

#[test]
fn waiting_on_a_task_whose_process_is_killed_gets_the_retried_result() {
    // One task process: the task we wait for is the one it runs.
    let daemon = Daemon::start_example("task_api", &["--worker-num", "1", "--task-worker-num", "1"]);
    daemon.wait_pool(1, 1);
    let mut client = daemon.connect();
    client.send("wait 10000 sleep=800 survive");
    let (_, pid) = task_pids(&daemon)[0];
    // Killed once the job has started: asleep in its `sleep=800`.
    common::wait_for("the task process to run the job", || common::in_nanosleep(pid).then_some(()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let waited: Value = client.recv();
    assert_eq!(waited["event"], "waited", "{waited}");
    let result = waited["result"].as_str().unwrap();
    assert!(result.ends_with("SURVIVE") && !result.starts_with(&format!("pid={pid} ")), "{waited}");
    daemon.wait_log(&format!(
        "was running in task process {pid} (killed by signal 9 (SIGKILL)); running it again"
    ));
}

#[test]
fn task_wait_all_gets_every_result_in_order_and_none_for_the_slow_one() {
    let daemon = start();
    let mut client = daemon.connect();
    client.send("all 5000 a b c");
    let all = client.recv();
    let results: Vec<&str> = all["results"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert_eq!(results.len(), 3);
    for (r, want) in results.iter().zip(["A", "B", "C"]) {
        assert!(r.ends_with(want), "{all}");
    }
    // Run in parallel: on more than one task process.
    let pids: std::collections::HashSet<&str> =
        results.iter().map(|r| r.split(' ').next().unwrap()).collect();
    assert!(pids.len() > 1, "{all}");
    // At the same time, not one after the other: two task processes are seen in their job's
    // sleep at once.
    client.send("all 10000 sleep=1500 sleep=1500 sleep=1500");
    let procs: Vec<u32> = task_pids(&daemon).into_iter().map(|(_, pid)| pid).collect();
    common::wait_for("two task processes running at once", || {
        (procs.iter().filter(|&&p| common::in_nanosleep(p)).count() >= 2).then_some(())
    });
    let slept = client.recv();
    assert_eq!(slept["results"].as_array().map(|r| r.iter().all(|r| r.is_string())), Some(true), "{slept}");

    client.send("all 400 x sleep=1500 y");
    let partial = client.recv();
    let r = partial["results"].as_array().unwrap();
    assert!(r[0].as_str().unwrap().ends_with('X'));
    assert!(r[1].is_null(), "the slow one is missing: {partial}");
    assert!(r[2].as_str().unwrap().ends_with('Y'));
}

#[test]
fn the_built_in_application_sends_a_job_to_a_named_task_process() {
    let daemon = Daemon::start(&["--simulate-ms", "0", "--task-worker-num", "3"]);
    daemon.wait_pool(2, 3);
    let pid1 = task_pids(&daemon).into_iter().find(|(s, _)| *s == 1).unwrap().1;
    let mut client = daemon.connect();
    for _ in 0..3 {
        let accepted = client.submit(r#"{"type":"email","to":"one@example.com","task_worker":1}"#);
        let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
        assert_eq!(done["task_pid"], pid1);
    }
    client.send(r#"{"type":"sms","to":"+15551234567","task_worker":9}"#);
    let error = client.recv();
    assert_eq!(error["event"], "error");
    assert!(error["error"].as_str().unwrap().contains("task_worker_num is 3"), "{error}");
}
