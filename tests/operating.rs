//! Operating taskd as a service: daemon mode, the pid file, control commands, metrics, logs,
//! configuration precedence, privilege drop.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{http_get, is_dead, proc_info, wait_for, Daemon};
use nix::sys::signal::Signal;

/// Runs `taskd ARGS` to its end (a deadline: it must not hang), tagged as this test's so that
/// a `Detached` guard finds whatever it leaves running.
fn taskd(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskd"));
    common::tag(cmd.args(args).env("NO_COLOR", "1"));
    common::run_with_timeout(&mut cmd, common::DEADLINE)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Kills, when the test ends however it ends, every daemon the test's `taskd` commands left
/// running: made before the first of them, it also finds one that detached before its pid
/// file was read, and one that should have refused to start but did (`common::Leftovers`
/// finds them by the tag `taskd` puts in their environment).
struct Detached {
    pid_file: PathBuf,
    _leftovers: common::Leftovers,
}

impl Detached {
    fn guard(pid_file: &Path) -> Detached {
        Detached { pid_file: pid_file.to_path_buf(), _leftovers: common::Leftovers::guard() }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

fn pgid(pid: u32) -> u32 {
    proc_info(pid).map(|p| p.pgid).unwrap_or(0)
}

fn pid_in(path: &Path) -> u32 {
    std::fs::read_to_string(path).unwrap().lines().next().unwrap().parse().unwrap()
}

#[test]
fn daemon_mode_pid_file_and_every_control_command() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("taskd.pid");
    let log = dir.path().join("taskd.log");
    let outbox = dir.path().join("outbox.log");
    let (p, l, o) = (pid_file.to_str().unwrap(), log.to_str().unwrap(), outbox.to_str().unwrap());
    let start =
        ["--port", "0", "--daemonize", "--pid-file", p, "--log-file", l, "--outbox", o, "--simulate-ms", "0"];
    let _guard = Detached::guard(&pid_file);
    let out = taskd(&start);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let addr: std::net::SocketAddr =
        stdout.trim().strip_prefix("taskd listening on ").unwrap().parse().unwrap();
    let pid = pid_in(&pid_file);
    // The pid alone, one line (nginx, Redis, systemd's PIDFile=): `kill $(cat taskd.pid)` works.
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), format!("{pid}\n"));
    assert_eq!(std::fs::read_to_string(dir.path().join("taskd.addr")).unwrap(), format!("{addr}\n"));
    // Detached: its own session, no terminal, stdio on /dev/null (stderr on the log file).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let (session, tty) = (fields[3], fields[4]);
    assert_ne!(
        session,
        std::fs::read_to_string("/proc/self/stat").unwrap().split_whitespace().nth(5).unwrap()
    );
    assert_eq!(tty, "0", "no controlling terminal");
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(), Path::new("/dev/null"));
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap(), log);
    assert_eq!(proc_info(pid).unwrap().args, "taskd: master");

    // It serves.
    let mut client = common::Client::connect(addr);
    let accepted = client.submit("daemon@example.com");
    client.final_reply(&accepted["task_id"], &mut Vec::new());

    // A second one on the same pid file refuses to start.
    let second = taskd(&start);
    assert!(!second.status.success());
    assert!(text(&second).contains(&format!("taskd is already running (pid {pid}")), "{}", text(&second));

    // status: running, with its counters.
    let status = taskd(&["status", "--pid-file", p]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let s = text(&status);
    assert!(s.contains(&format!("taskd is running: pid {pid}")) && s.contains("\"tasks_done\": 1"), "{s}");

    // reload: every worker replaced; reload --tasks: every task process.
    let pids_of = |title: &str| -> Vec<u32> {
        common::processes()
            .into_iter()
            .filter(|q| q.args.starts_with(title) && q.alive())
            .map(|q| q.pid)
            .collect()
    };
    let in_session =
        |pids: Vec<u32>| -> Vec<u32> { pids.into_iter().filter(|&q| pgid(q) == pgid(pid)).collect() };
    let workers = in_session(pids_of("taskd: worker"));
    assert_eq!(taskd(&["reload", "--pid-file", p]).status.code(), Some(0));
    wait_for("new workers", || {
        let now = in_session(pids_of("taskd: worker"));
        (now.len() == 2 && now.iter().all(|q| !workers.contains(q))).then_some(())
    });
    let tasks = in_session(pids_of("taskd: task"));
    assert_eq!(taskd(&["--pid-file", p, "reload", "--tasks"]).status.code(), Some(0));
    wait_for("new task processes", || {
        let now = in_session(pids_of("taskd: task"));
        (now.len() == 4 && now.iter().all(|q| !tasks.contains(q))).then_some(())
    });

    // stop: graceful, waits until gone, removes the pid file.
    let stop = taskd(&["stop", "--pid-file", p]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop));
    assert!(is_dead(pid));
    assert!(!pid_file.exists(), "the pid file is removed on a clean exit");
    assert!(!dir.path().join("taskd.addr").exists(), "and the address beside it");
    assert!(std::fs::read_to_string(&log).unwrap().contains("taskd stopped"));
    lsb_exit_codes_when_not_running(&pid_file);
}

/// The LSB init script exit codes of the control commands when the daemon is not running.
fn lsb_exit_codes_when_not_running(pid_file: &Path) {
    let p = pid_file.to_str().unwrap();
    let code = |args: &[&str]| {
        let out = taskd(args);
        (out.status.code(), text(&out))
    };
    // No pid file: status 3 (not running), stop 0 (stopping a stopped service succeeds),
    // reload 7 (not running).
    let (status, said) = code(&["status", "--pid-file", p]);
    assert_eq!(status, Some(3), "{said}");
    assert!(said.contains("not running"), "{said}");
    let (stop, said) = code(&["stop", "--pid-file", p]);
    assert_eq!(stop, Some(0), "{said}");
    assert!(said.contains("not running") && said.contains("nothing to stop"), "{said}");
    let (reload, said) = code(&["reload", "--pid-file", p]);
    assert_eq!(reload, Some(7), "{said}");
    assert!(said.contains("not running"), "{said}");
    // A pid file left by a daemon that died (here: a pid that is not taskd): status 1.
    std::fs::write(pid_file, format!("{}\n", std::process::id())).unwrap();
    let (status, said) = code(&["status", "--pid-file", p]);
    assert_eq!(status, Some(1), "{said}");
    assert!(said.contains("pid file") && said.contains("is left"), "{said}");
    assert_eq!(code(&["stop", "--pid-file", p]).0, Some(0));
    assert_eq!(code(&["reload", "--tasks", "--pid-file", p]).0, Some(7));
    // A pid file that holds no pid: status unknown (4), naming the file.
    std::fs::write(pid_file, "not a pid\n").unwrap();
    let (status, said) = code(&["status", "--pid-file", p]);
    assert_eq!(status, Some(4), "{said}");
    assert!(said.contains(p) && said.contains("does not hold a pid"), "{said}");
    std::fs::remove_file(pid_file).unwrap();
    // No pid file configured: status unknown (4); stop and reload not configured (6).
    assert_eq!(code(&["status"]).0, Some(4));
    let (stop, said) = code(&["stop"]);
    assert_eq!(stop, Some(6), "{said}");
    assert!(said.contains("needs --pid-file"), "{said}");
    assert_eq!(code(&["reload"]).0, Some(6));
}

#[test]
fn a_pid_file_that_cannot_be_written_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("no-such-dir").join("taskd.pid");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskd"));
    let outbox = dir.path().join("outbox.log");
    common::tag(cmd.args(["--port", "0", "--outbox", outbox.to_str().unwrap()]));
    cmd.args(["--pid-file", pid_file.to_str().unwrap()]);
    let _leftovers = common::Leftovers::guard();
    let out = common::run_with_timeout(&mut cmd, common::DEADLINE);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cannot write the pid file") && text(&out).contains("no-such-dir"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_daemon_that_cannot_start_says_why_on_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("taskd.pid");
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blocker.local_addr().unwrap().port().to_string();
    let _guard = Detached::guard(&pid_file);
    let out = taskd(&["--port", &port, "--daemonize", "--pid-file", pid_file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("address already in use"), "{}", text(&out));
    assert!(!pid_file.exists());
    // Port 0, not the default one, should it start after all.
    let out = taskd(&["--daemonize", "--port", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("daemonize: needs pid_file"), "{}", text(&out));
}

#[test]
fn metrics_are_served_in_prometheus_format() {
    let daemon = Daemon::start(&["--metrics-addr", "127.0.0.1:0", "--simulate-ms", "0"]);
    let metrics = daemon.metrics_addr.expect("the second stdout line names the metrics endpoint");
    let mut client = daemon.connect();
    let accepted = client.submit("m@example.com");
    client.final_reply(&accepted["task_id"], &mut Vec::new());
    let page = http_get(metrics, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("Content-Type: text/plain; version=0.0.4"), "{page}");
    assert!(page.contains("\ntaskd_tasks_done_total 1\n"), "{page}");
    assert!(page.contains("# TYPE taskd_connections gauge"), "{page}");
    assert!(page.contains("taskd_process_served_total{role=\"task\",slot=\"0\"}"), "{page}");
    // Every sample line is `name{labels} value`.
    for line in page.split("\r\n\r\n").nth(1).unwrap().lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    assert!(http_get(metrics, "/other").starts_with("HTTP/1.1 404"));
    // The daemon's own port is unaffected.
    client.send("stats");
    assert_eq!(client.recv()["event"], "stats");
}

#[test]
fn json_logs_name_every_process_and_the_log_file_reopens_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("taskd.log");
    // A worker's line of a job (its accept) is a debug line: logged here, so that every kind of
    // process has a line to show (RUST_LOG, which the tests set, wins over --log-level).
    let args = ["--log-format", "json", "--log-file", log.to_str().unwrap(), "--simulate-ms", "100"];
    let daemon = Daemon::start_env(&args, &[("RUST_LOG", "info,taskd::mail=debug")])
        .unwrap_or_else(|(s, log)| panic!("{s}\n{log}"));
    let mut client = daemon.connect();
    let a = client.submit("before@example.com");
    client.final_reply(&a["task_id"], &mut Vec::new());
    // A worker and a task process write their info lines in batches, when they are about to
    // wait: soon after the reply, not necessarily before it.
    let roles = ["master", "manager", "worker", "task"];
    wait_for("a log line from every kind of process", || {
        let before = std::fs::read_to_string(&log).ok()?;
        let processes: std::collections::HashSet<String> = before
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
                assert!(
                    v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(),
                    "{l}"
                );
                assert!(v["pid"].as_u64().unwrap() > 0);
                v["process"].as_str().unwrap().split(' ').next().unwrap().to_string()
            })
            .collect();
        roles.iter().all(|role| processes.contains(*role)).then_some(())
    });
    // Rotate: move the file away, SIGHUP the master; every process writes to the new file.
    let rotated = dir.path().join("taskd.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    daemon.signal(Signal::SIGHUP);
    wait_for("the log file to be reopened", || log.exists().then_some(()));
    let b = client.submit("after@example.com");
    client.final_reply(&b["task_id"], &mut Vec::new());
    let after = wait_for("lines from a worker and a task process in the new file", || {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.contains("\"process\":\"worker") && text.contains("\"process\":\"task")).then_some(text)
    });
    assert!(after.contains("log file reopened"));
    assert!(!std::fs::read_to_string(&rotated).unwrap().contains("after@example.com"));
}

#[test]
fn the_environment_overrides_the_file_and_flags_override_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("taskd.toml");
    std::fs::write(&file, "worker_num = 1\ntask_worker_num = 1\n").unwrap();
    let f = file.to_str().unwrap();
    let daemon = Daemon::start_env(
        &["--config", f, "--task-worker-num", "2"],
        &[("TASKD_WORKER_NUM", "3"), ("TASKD_TASK_WORKER_NUM", "5")],
    )
    .unwrap_or_else(|(s, log)| panic!("{s}\n{log}"));
    daemon.wait_pool(3, 2);
    // --check-config shows the effective values; an unknown key is an error naming it.
    let out = common::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_taskd"))
            .args(["--config", f, "--check-config"])
            .env("TASKD_WORKER_NUM", "3"),
        common::DEADLINE,
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("worker_num = 3") && shown.contains("task_worker_num = 1"), "{shown}");
    std::fs::write(&file, "wroker_num = 1\n").unwrap();
    let out = taskd(&["--config", f, "--check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("wroker_num"), "{}", text(&out));
}

#[test]
fn user_and_group_drop_privileges_in_the_pool_only() {
    if !nix::unistd::geteuid().is_root() {
        let why = format!(
            "dropping privileges needs root; this test runs as uid {} (`bash .ci/run` runs as root in CI)",
            nix::unistd::geteuid()
        );
        common::cannot_run("root", &why);
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a user named nobody");
    let daemon = Daemon::start(&["--user", "nobody", "--simulate-ms", "0"]);
    let pool = daemon.wait_pool(2, 4);
    let uid_of = |pid: u32| -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert_eq!(uid_of(daemon.pid), 0, "the master keeps root");
    for p in pool.iter().filter(|p| p.args.starts_with("taskd: worker") || p.args.starts_with("taskd: task"))
    {
        // A process has its title a moment before it drops root (before it runs anything).
        let what = format!("{} to run as nobody", p.args);
        wait_for(&what, || (uid_of(p.pid) == nobody.uid.as_raw()).then_some(()));
    }
    let mut client = daemon.connect();
    let accepted = client.submit("unprivileged@example.com");
    assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
    let _guard = common::Leftovers::guard();
    let out = taskd(&["--user", "no-such-user-here", "--port", "0"]);
    assert!(text(&out).contains("no user named \"no-such-user-here\""), "{}", text(&out));
}

#[test]
fn sigttin_and_sigttou_grow_and_shrink_the_task_pool_at_run_time() {
    let daemon = Daemon::start(&["--task-worker-num", "1", "--task-worker-max", "3", "--simulate-ms", "0"]);
    daemon.wait_pool(2, 1);
    daemon.signal(Signal::SIGTTIN);
    daemon.wait_pool(2, 2);
    daemon.signal(Signal::SIGTTIN);
    daemon.wait_pool(2, 3);
    daemon.signal(Signal::SIGTTIN);
    daemon.wait_log("the task pool is at task_worker_max (3) already");
    let mut client = daemon.connect();
    client.send("stats");
    assert_eq!(client.recv()["task_worker_num"], 3);
    // Shrinking never goes below one process, and every job is still done. (Signals of one
    // kind sent together coalesce into one: one at a time.)
    daemon.signal(Signal::SIGTTOU);
    daemon.wait_pool(2, 2);
    daemon.signal(Signal::SIGTTOU);
    let pool = daemon.wait_pool(2, 1);
    daemon.signal(Signal::SIGTTOU);
    daemon.wait_log("the task pool is at one already");
    assert!(pool.iter().any(|p| p.args == "taskd: task 0"), "the first slot stays");
    for i in 0..20 {
        let accepted = client.submit(&format!("scaled{i}@example.com"));
        assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
    }
    client.send("stats");
    let stats = client.recv();
    assert_eq!(stats["task_worker_num"], 1);
    assert_eq!(stats["processes"].as_array().unwrap().iter().filter(|p| p["role"] == "task").count(), 1);
    // And it grows again.
    daemon.signal(Signal::SIGTTIN);
    daemon.wait_pool(2, 2);
}

/// Reads every line until the server closes the connection: the final reply (`done` or
/// `failed`) of each task id, and how many each got.
fn finals_until_closed(
    client: &mut common::Client,
) -> std::collections::HashMap<u64, Vec<serde_json::Value>> {
    let mut finals: std::collections::HashMap<u64, Vec<serde_json::Value>> = Default::default();
    while let Some(line) = client.try_recv(common::DEADLINE) {
        if line["event"] == "done" || line["event"] == "failed" {
            finals.entry(line["task_id"].as_u64().unwrap()).or_default().push(line);
        }
    }
    assert!(client.closed_by_server_now(), "the server closed the connection after its last line");
    finals
}

#[test]
fn sigterm_past_max_wait_time_answers_every_running_and_queued_job_failed() {
    let mut daemon = Daemon::start(&["--task-worker-num", "1", "--max-wait-time", "1", "--simulate-ms", "0"]);
    let mut long = daemon.connect();
    let running = long.submit(r#"{"type":"email","to":"long@example.com","simulate_ms":60000}"#)["task_id"]
        .as_u64()
        .unwrap();
    daemon.wait_log("sending email to long@example.com");
    // 100 more wait behind it for the only task process.
    let mut queued = daemon.connect();
    let ids: Vec<u64> = (0..100)
        .map(|i| queued.submit(&format!("queued{i}@example.com"))["task_id"].as_u64().unwrap())
        .collect();
    daemon.signal(Signal::SIGTERM);
    for (client, expected) in [(&mut long, vec![running]), (&mut queued, ids)] {
        let finals = finals_until_closed(client);
        assert_eq!(finals.len(), expected.len(), "one final line per accepted job: {finals:?}");
        for id in expected {
            let lines = &finals[&id];
            assert_eq!(lines.len(), 1, "exactly one final line for {id}: {lines:?}");
            assert_eq!(lines[0]["event"], "failed", "{}", lines[0]);
            let error = lines[0]["error"].as_str().unwrap();
            assert!(error.starts_with("server stopping: max_wait_time (1s) ran out"), "{error}");
        }
    }
    let status = daemon.wait_exit(common::DEADLINE).expect("the daemon exits");
    assert!(status.success(), "{status}");
    let log = daemon.log();
    assert!(log.contains("gave up 101 jobs at shutdown (100 queued, 1 running"), "{log}");
    assert!(!log.contains("running it again"), "nothing runs again after shutdown began: {log}");
}

#[test]
fn a_batch_cut_by_shutdown_gets_one_failed_with_its_finished_and_unfinished_members() {
    // Three task processes: each member runs at once on its own; the first one never ends.
    let mut daemon = Daemon::start(&["--task-worker-num", "3", "--max-wait-time", "1", "--simulate-ms", "0"]);
    let mut client = daemon.connect();
    client.send(
        r#"{"type":"batch","jobs":[{"type":"email","to":"first@example.com","simulate_ms":60000},{"type":"sms","to":"+15551234567"},{"type":"email","to":"third@example.com"}]}"#,
    );
    let accepted = client.recv();
    assert_eq!(accepted["event"], "accepted", "{accepted}");
    daemon.wait_log("sending email to first@example.com");
    wait_for("the two short members to be delivered", || (daemon.outbox_lines().len() == 2).then_some(()));
    daemon.signal(Signal::SIGTERM);
    let finals = finals_until_closed(&mut client);
    let batch = accepted["task_id"].as_u64().unwrap();
    assert_eq!(finals.keys().copied().collect::<Vec<_>>(), vec![batch], "{finals:?}");
    assert_eq!(finals[&batch].len(), 1, "one answer for the batch: {finals:?}");
    let answer = &finals[&batch][0];
    assert_eq!(answer["event"], "failed", "{answer}");
    assert!(answer["error"].as_str().unwrap_or_default().starts_with("server stopping: "), "{answer}");
    let results = answer["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 3, "{results:?}");
    assert_eq!(results[0]["to"], "first@example.com");
    let error = results[0]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("server stopping: "), "{}", results[0]);
    for member in &results[1..] {
        assert!(member["result"].is_string(), "a finished member keeps its result: {member}");
    }
    assert!(daemon.wait_exit(common::DEADLINE).expect("exits").success());
    assert!(daemon.log().contains("gave up 1 jobs at shutdown"), "{}", daemon.log());
}

#[test]
fn a_second_sigterm_stops_at_once_and_still_answers_every_job() {
    let mut daemon =
        Daemon::start(&["--task-worker-num", "1", "--max-wait-time", "60", "--simulate-ms", "0"]);
    let mut client = daemon.connect();
    let mut ids = vec![client.submit(r#"{"type":"email","to":"long@example.com","simulate_ms":60000}"#)
        ["task_id"]
        .as_u64()
        .unwrap()];
    daemon.wait_log("sending email to long@example.com");
    ids.extend((0..5).map(|i| client.submit(&format!("queued{i}@example.com"))["task_id"].as_u64().unwrap()));
    daemon.signal(Signal::SIGTERM);
    daemon.wait_log("shutting down");
    daemon.signal(Signal::SIGTERM);
    let finals = finals_until_closed(&mut client);
    assert_eq!(finals.len(), ids.len(), "{finals:?}");
    for id in ids {
        let lines = &finals[&id];
        assert_eq!(lines.len(), 1, "{lines:?}");
        let error = lines[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("server stopping: a second SIGTERM stopped the server at once"),
            "{}",
            lines[0]
        );
    }
    let status = daemon.wait_exit(common::DEADLINE).expect("the daemon exits");
    assert_eq!(status.code(), Some(1), "stop now: exit 1");
    assert!(!daemon.log().contains("running it again"), "{}", daemon.log());
}

#[test]
fn a_durable_job_is_left_in_redis_at_shutdown_and_its_client_is_told_so() {
    let Some(redis) = common::durable::Redis::start() else { return };
    // No task process here: the job waits in Redis for a task node that is not there yet.
    let url = redis.url.as_str();
    let args = ["--redis-url", url, "--node-id", "web-1", "--task-worker-num", "0", "--max-wait-time", "1"];
    let mut daemon = Daemon::start(&args);
    let mut client = daemon.connect();
    let id = client.submit(r#"{"type":"email","to":"kept@example.com"}"#)["task_id"].as_u64().unwrap();
    daemon.signal(Signal::SIGTERM);
    let finals = finals_until_closed(&mut client);
    let lines = &finals[&id];
    assert_eq!((finals.len(), lines.len()), (1, 1), "{finals:?}");
    assert_eq!(lines[0]["event"], "failed", "{}", lines[0]);
    let error = lines[0]["error"].as_str().unwrap();
    assert!(error.contains("the job stays queued in Redis and will run on another node"), "{error}");
    assert!(daemon.wait_exit(common::DEADLINE).expect("exits").success());
    assert!(daemon.log().contains("left 1 durable jobs in Redis"), "{}", daemon.log());
    assert_eq!(redis.xlen("{taskd}:jobs"), 1, "the job is still in the stream");
    // A task node runs it.
    let node = common::durable::TaskNode::start(&redis, "tasks", &["--task-worker-num", "1"]);
    wait_for("the job to run on the task node", || (node.outbox_lines().len() == 1).then_some(()));
}

#[test]
fn a_listener_in_use_is_named_by_its_option_and_address() {
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = blocker.local_addr().unwrap();
    let port = addr.port().to_string();
    let metrics = addr.to_string();
    for (args, option) in [
        (["--metrics-addr", metrics.as_str()], "--metrics-addr"),
        (["--ws-port", port.as_str()], "--ws-port"),
    ] {
        let err = Daemon::try_start(&args).err().expect("the address is taken: no start").1;
        assert!(
            err.contains(&format!("cannot listen on {addr} for {option}: address already in use")),
            "{err}"
        );
        assert!(!err.contains("see --port"), "{err}");
    }
}
