//! Privileges and files: nothing the pool's user (or anyone who can write the directories
//! taskd uses) can turn against root. Run as root with `--user nobody`, as the suite runs in
//! CI; where it does not run as root, each test fails saying so (or, with
//! `TASKD_TEST_ALLOW_SKIP=root`, is listed as skipped after the summary).

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::durable::Redis;
use common::{is_dead, proc_info, processes, reap_orphans, wait_for, Daemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Whether the test can run: it needs root (to switch to `nobody`). Fails if not, unless the
/// skip is allowed (then it says so loudly).
fn as_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    common::cannot_run(
        "root",
        &format!(
            "{test} needs root (it runs taskd --user nobody); this runs as uid {}",
            nix::unistd::geteuid()
        ),
    );
    false
}

/// How long a command of taskd that ends by itself may take before its test fails.
const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

fn nobody() -> nix::unistd::User {
    nix::unistd::User::from_name("nobody").unwrap().expect("a user named nobody")
}

/// A directory `nobody` can enter (and, with `writable`, write: owned by it).
fn dir_for_nobody(parent: &Path, name: &str, writable: bool) -> PathBuf {
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    if writable {
        nix::unistd::chown(&dir, Some(nobody().uid), Some(nobody().gid)).unwrap();
    }
    dir
}

/// A symbolic link planted by `nobody`.
fn plant_link(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        link,
        Some(nobody().uid),
        Some(nobody().gid),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// root's file, which the links point at.
fn secret(dir: &Path) -> PathBuf {
    let path = dir.join("secret");
    std::fs::write(&path, "root's secret\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn untouched(secret: &Path) {
    let meta = std::fs::metadata(secret).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "the target of the link still belongs to root");
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(std::fs::read_to_string(secret).unwrap(), "root's secret\n", "and holds what it held");
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn mode_and_owner(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    assert!(meta.file_type().is_file(), "{} is a regular file", path.display());
    (meta.mode() & 0o7777, meta.uid())
}

/// `taskd --user nobody` with an outbox in a directory nobody can enter.
fn start_as_nobody(tmp: &Path, args: &[&str]) -> Daemon {
    let dir = dir_for_nobody(tmp, "state", false);
    let outbox = dir.join("outbox.log");
    let mut all = vec!["--user", "nobody", "--outbox", outbox.to_str().unwrap()];
    all.extend_from_slice(args);
    Daemon::start(&all)
}

fn job(to: &str, simulate_ms: u64) -> String {
    format!(r#"{{"type":"email","to":"{to}","simulate_ms":{simulate_ms}}}"#)
}

#[test]
fn a_link_planted_at_the_outbox_or_the_log_file_is_refused_and_its_target_untouched() {
    if !as_root("a_link_planted_at_the_outbox_or_the_log_file_is_refused_and_its_target_untouched") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let secret = secret(tmp.path());
    let state = dir_for_nobody(tmp.path(), "state", true);
    let outbox = state.join("outbox.log");
    plant_link(&secret, &outbox);
    let (_, log) = Daemon::try_start(&["--user", "nobody", "--outbox", outbox.to_str().unwrap()])
        .err()
        .expect("no start with a link for an outbox");
    assert!(log.contains("invalid outbox") && log.contains("symbolic link"), "{log}");
    untouched(&secret);

    let log_file = state.join("taskd.log");
    plant_link(&secret, &log_file);
    let (_, log) = Daemon::try_start(&["--user", "nobody", "--log-file", log_file.to_str().unwrap()])
        .err()
        .expect("no start with a link for a log file");
    assert!(log.contains("invalid log_file") && log.contains("symbolic link"), "{log}");
    untouched(&secret);
}

#[test]
fn a_link_planted_at_the_pid_files_temporary_name_is_not_followed() {
    if !as_root("a_link_planted_at_the_pid_files_temporary_name_is_not_followed") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let secret = secret(tmp.path());
    // World-writable and sticky, like /tmp or /run/lock.
    let run = dir_for_nobody(tmp.path(), "run", false);
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let pid_file = run.join("taskd.pid");
    plant_link(&secret, &run.join("taskd.pid.tmp"));
    // The address file beside it is written the same way.
    plant_link(&secret, &run.join("taskd.addr.tmp"));
    let daemon = Daemon::start(&["--pid-file", pid_file.to_str().unwrap()]);
    untouched(&secret);
    let text = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(text, format!("{}\n", daemon.pid));
    assert_eq!(mode_and_owner(&pid_file), (0o644, 0));
    let addr_file = run.join("taskd.addr");
    assert_eq!(std::fs::read_to_string(&addr_file).unwrap(), format!("{}\n", daemon.addr));
    assert_eq!(mode_and_owner(&addr_file), (0o644, 0));
    assert!(!run.join("taskd.pid.tmp").exists(), "the planted link is gone, its target kept");
    assert!(!run.join("taskd.addr.tmp").exists(), "the planted link is gone, its target kept");
}

#[test]
fn with_user_a_killed_master_leaves_no_process_and_no_late_delivery() {
    if !as_root("with_user_a_killed_master_leaves_no_process_and_no_late_delivery") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let daemon = start_as_nobody(tmp.path(), &["--worker-num", "1", "--task-worker-num", "1"]);
    let pool = daemon.wait_pool(1, 1);
    let mut client = daemon.connect();
    let accepted = client.submit(&job("late@example.com", 3000));
    assert_eq!(accepted["event"], "accepted");
    daemon.wait_log("sending email to late@example.com");
    let task = daemon.pids_of("taskd: task")[0];
    assert_eq!(uid_of(task), nobody().uid.as_raw(), "the task process runs as nobody");
    let _ = kill(Pid::from_raw(daemon.pid as i32), Signal::SIGKILL);
    let pids: Vec<u32> = pool.iter().map(|p| p.pid).collect();
    wait_for("every process of the killed master to die", || {
        reap_orphans(&pids);
        pids.iter().all(|&p| is_dead(p)).then_some(())
    });
    assert!(daemon.outbox_lines().is_empty(), "the task process died mid-job: it delivered nothing");
}

#[test]
fn with_user_a_killed_managers_pool_dies_with_it_not_by_the_masters_backstop() {
    if !as_root("with_user_a_killed_managers_pool_dies_with_it_not_by_the_masters_backstop") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let daemon = start_as_nobody(tmp.path(), &["--simulate-ms", "0"]);
    let pool = daemon.wait_pool(2, 4);
    let manager = daemon.pids_of("taskd: manager")[0];
    let old: Vec<u32> = pool.iter().map(|p| p.pid).collect();
    let _ = kill(Pid::from_raw(manager as i32), Signal::SIGKILL);
    wait_for("the old pool to die", || old.iter().all(|&p| is_dead(p)).then_some(()));
    let new = wait_for("a new manager and pool", || {
        let tree = daemon.tree();
        let fresh = tree.iter().filter(|p| !old.contains(&p.pid)).count();
        (fresh == 7).then_some(tree)
    });
    assert!(new.iter().all(|p| !old.contains(&p.pid)));
    let log = daemon.log();
    assert!(!log.contains("outlived its manager"), "the pool died with its manager:\n{log}");
    let mut client = daemon.connect();
    let accepted = client.submit("after@example.com");
    assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
}

#[test]
fn with_user_a_rotated_log_and_outbox_are_reopened_by_every_process() {
    if !as_root("with_user_a_rotated_log_and_outbox_are_reopened_by_every_process") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Owned by root: the master creates the new files for nobody.
    let logs = dir_for_nobody(tmp.path(), "logs", false);
    let (log, outbox) = (logs.join("taskd.log"), logs.join("outbox.log"));
    let (l, o) = (log.to_str().unwrap(), outbox.to_str().unwrap());
    let args =
        ["--user", "nobody", "--worker-num", "1", "--task-worker-num", "1", "--log-file", l, "--outbox", o];
    // The worker's line of a job (its accept) is a debug line: logged here, so that the worker
    // too shows it writes to the new log (RUST_LOG, which the tests set, wins over --log-level).
    let daemon = Daemon::start_env(&args, &[("RUST_LOG", "info,taskd::mail=debug")])
        .unwrap_or_else(|(s, log)| panic!("{s}\n{log}"));
    daemon.wait_pool(1, 1);
    let mut client = daemon.connect();
    let first = client.submit(&job("before@example.com", 10));
    let done = client.final_reply(&first["task_id"], &mut Vec::new());
    let (worker, task) = (first["worker_pid"].as_u64().unwrap(), done["task_pid"].as_u64().unwrap());
    for path in [&log, &outbox] {
        assert_eq!(mode_and_owner(path), (0o640, nobody().uid.as_raw()), "{}", path.display());
    }
    let (old_log, old_outbox) = (logs.join("taskd.log.1"), logs.join("outbox.log.1"));
    std::fs::rename(&log, &old_log).unwrap();
    std::fs::rename(&outbox, &old_outbox).unwrap();
    daemon.signal(Signal::SIGHUP);
    wait_for("the master to reopen the log", || {
        std::fs::read_to_string(&log).ok().filter(|t| t.contains("SIGHUP: log file reopened"))
    });
    let second = client.submit(&job("after@example.com", 10));
    let done = client.final_reply(&second["task_id"], &mut Vec::new());
    assert_eq!(second["worker_pid"].as_u64(), Some(worker), "the same worker, not a new one");
    assert_eq!(done["task_pid"].as_u64(), Some(task), "the same task process, not a new one");
    let id = second["task_id"].as_u64().unwrap();
    let new_log = wait_for("the task's last lines in the new log", || {
        std::fs::read_to_string(&log).ok().filter(|t| t.contains(&format!("job {id} done")))
    });
    assert!(
        new_log.contains(&format!("worker 0[{worker}]: email to after@example.com accepted")),
        "{new_log}"
    );
    assert!(new_log.contains(&format!("task 0[{task}]: job {id}: sending email")), "{new_log}");
    assert!(!std::fs::read_to_string(&old_log).unwrap().contains("after@example.com"));
    // An outbox write starts with a newline (see the README): its empty lines are no delivery.
    let lines =
        |p: &Path| std::fs::read_to_string(p).unwrap_or_default().lines().filter(|l| !l.is_empty()).count();
    assert_eq!((lines(&old_outbox), lines(&outbox)), (1, 1), "one delivery in each outbox");
    assert!(std::fs::read_to_string(&outbox).unwrap().contains("after@example.com"));
    for path in [&log, &outbox] {
        assert_eq!(mode_and_owner(path), (0o640, nobody().uid.as_raw()), "{}", path.display());
    }
}

#[test]
fn a_process_that_cannot_reopen_its_log_says_so_on_the_old_one() {
    if !as_root("a_process_that_cannot_reopen_its_log_says_so_on_the_old_one") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let logs = dir_for_nobody(tmp.path(), "logs", true);
    let log = logs.join("taskd.log");
    let args = [
        "--user",
        "nobody",
        "--worker-num",
        "1",
        "--task-worker-num",
        "1",
        "--log-file",
        log.to_str().unwrap(),
    ];
    let daemon = Daemon::start(&args);
    daemon.wait_pool(1, 1);
    let old = logs.join("taskd.log.1");
    std::fs::rename(&log, &old).unwrap();
    // Someone put a link where the new log would be: no process of taskd follows it.
    let elsewhere = logs.join("elsewhere");
    plant_link(&elsewhere, &log);
    daemon.signal(Signal::SIGHUP);
    let mut client = daemon.connect();
    let accepted = client.submit(&job("still@example.com", 10));
    assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
    let text = wait_for("each process to say it keeps the old log", || {
        let text = std::fs::read_to_string(&old).unwrap_or_default();
        (text.contains("master[") && text.contains("worker 0[") && text.contains("task 0[")).then_some(())?;
        let complaints = text.lines().filter(|l| l.contains("symbolic link")).collect::<Vec<_>>();
        let said = |who: &str| complaints.iter().any(|l| l.contains(who));
        (said("master[") && said("worker 0[") && said("task 0[")).then_some(text)
    });
    assert!(text.contains("still@example.com"), "{text}");
    assert!(!elsewhere.exists(), "the link was not followed");
}

/// `taskd task-node` as a test starts it here: in its own process group, killed on drop.
struct Node {
    child: Child,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let group: Vec<u32> =
            processes().into_iter().filter(|p| p.pgid == self.child.id()).map(|p| p.pid).collect();
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = wait_for_quietly(|| {
            reap_orphans(&group);
            group.iter().all(|&p| is_dead(p))
        });
        if std::thread::panicking() {
            eprintln!(
                "----- task-node log -----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn wait_for_quietly(mut done: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < common::DEADLINE {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

#[test]
fn task_node_runs_its_task_processes_as_the_user_and_refuses_what_it_does_not_take() {
    let taskd = env!("CARGO_BIN_EXE_taskd");
    // Refused before anything starts, with a sentence, before or after the subcommand.
    for args in [
        &["task-node", "--port", "9"][..],
        &["--ws-port", "9", "task-node"],
        &["task-node", "--worker-num", "2"],
    ] {
        let out = common::run_with_timeout(Command::new(taskd).args(args), LIMIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("`taskd task-node` does not take --") && err.contains("listens on no port"),
            "{err}"
        );
    }
    let help = common::run_with_timeout(Command::new(taskd).args(["task-node", "--help"]), LIMIT);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--user") && !help.contains("--metrics-addr") && !help.contains("--port"),
        "{help}"
    );
    let help = common::run_with_timeout(Command::new(taskd).args(["stop", "--help"]), LIMIT);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--pid-file") && !help.contains("--worker-num"), "{help}");

    if !as_root("task_node_runs_its_task_processes_as_the_user_and_refuses_what_it_does_not_take") {
        return;
    }
    // nobody must reach the socket: a directory it can enter, a socket it can write.
    let Some(redis) = Redis::start_with(&["--unixsocketperm", "777"]) else { return };
    std::fs::set_permissions(redis.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dir_for_nobody(tmp.path(), "node", false);
    let (log, outbox) = (dir.join("node.log"), dir.join("outbox.log"));
    let child = Command::new(taskd)
        .args(["task-node", "--redis-url", &redis.url, "--node-id", "n1", "--task-worker-num", "2"])
        .args(["--user", "nobody", "--simulate-ms", "0", "--outbox"])
        .arg(&outbox)
        .arg("--log-file")
        .arg(&log)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let node = Node { child, log: log.clone() };
    let manager = node.child.id();
    let tasks = wait_for("two task processes", || {
        let tasks: Vec<u32> =
            processes().into_iter().filter(|p| p.ppid == manager && p.alive()).map(|p| p.pid).collect();
        (tasks.len() == 2).then_some(tasks)
    });
    assert_eq!(uid_of(manager), 0, "the node's manager keeps root, as the server's does");
    // A task process is root for the moment between its fork and its drop (before any job):
    // wait for the drop, which a process that never drops fails.
    for &pid in &tasks {
        wait_for("the task process to run as nobody", || {
            (uid_of(pid) == nobody().uid.as_raw()).then_some(())
        });
    }
    assert_eq!(mode_and_owner(&outbox), (0o640, nobody().uid.as_raw()));
    assert_eq!(mode_and_owner(&log), (0o640, nobody().uid.as_raw()));
    // A job, as a web node would add it to the stream: delivered by a task process, as nobody.
    let data = job("node@example.com", 0);
    let _: String =
        redis.query(&["XADD", "{taskd}:jobs", "*", "o", "web", "t", "1", "s", "0", "w", "0", "d", &data]);
    let line = wait_for("the job in the node's outbox", || {
        std::fs::read_to_string(&outbox).ok().filter(|t| t.contains("node@example.com"))
    });
    // The write starts with a newline (see the README's outbox): the first line is empty.
    let line = line.lines().find(|l| !l.is_empty()).unwrap();
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert!(tasks.contains(&(line["task_pid"].as_u64().unwrap() as u32)), "{line}");
    // A web node's redis bridge (which reads what anyone who can write Redis wrote) is not
    // root either, and the node works through it.
    let web = start_as_nobody(tmp.path(), &["--redis-url", &redis.url, "--node-id", "web"]);
    let bridge = wait_for("the redis bridge", || web.pids_of("taskd: redis bridge").first().copied());
    // Named before it drops root (the title comes first): wait for the drop.
    wait_for("the bridge to run as nobody", || (uid_of(bridge) == nobody().uid.as_raw()).then_some(()));
    let mut client = web.connect();
    let accepted = client.submit(&job("web@example.com", 0));
    assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
    drop(web);
    // A task node's processes die with it, as the server's do.
    let _ = kill(Pid::from_raw(manager as i32), Signal::SIGKILL);
    wait_for("the task node's processes to die with it", || {
        reap_orphans(&tasks);
        tasks.iter().all(|&p| is_dead(p)).then_some(())
    });
    drop(node);
}

#[test]
fn daemon_mode_sets_its_umask_and_keeps_no_inherited_descriptor() {
    let tmp = tempfile::tempdir().unwrap();
    let (pid_file, log, outbox) =
        (tmp.path().join("taskd.pid"), tmp.path().join("taskd.log"), tmp.path().join("outbox.log"));
    let marker = tmp.path().join("inherited");
    std::fs::write(&marker, "").unwrap();
    let marker_c = std::ffi::CString::new(marker.to_str().unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskd"));
    cmd.args(["--port", "0", "--daemonize", "--simulate-ms", "0", "--pid-file"])
        .arg(&pid_file)
        .arg("--log-file")
        .arg(&log)
        .arg("--outbox")
        .arg(&outbox)
        .stdin(Stdio::null());
    // SAFETY: umask and open are async-signal-safe; the CString was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::libc::umask(0);
            // A descriptor left open by whoever starts the daemon, without CLOEXEC.
            if nix::libc::open(marker_c.as_ptr(), nix::libc::O_RDONLY) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = common::run_with_timeout(&mut cmd, LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().lines().next().unwrap().parse().unwrap();
    let _guard = Detached(pid);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let addr = stdout.trim().strip_prefix("taskd listening on ").unwrap().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Umask:\t0027"), "{status}");
    let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(!fds.contains(&marker), "the launcher's descriptor was closed: {fds:?}");
    // Its own descriptors still work: it answers, and delivers.
    let mut client = common::Client::connect(addr);
    let accepted = client.submit("daemon@example.com");
    assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
    assert_eq!(mode_and_owner(&pid_file).0, 0o644);
    assert_eq!(mode_and_owner(&log).0, 0o640);
    assert_eq!(mode_and_owner(&outbox).0, 0o640);
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    wait_for("the daemon to stop", || proc_info(pid).is_none_or(|p| !p.alive()).then_some(()));
    let mut text = String::new();
    std::fs::File::open(&log).unwrap().read_to_string(&mut text).unwrap();
    assert!(text.contains("taskd stopped"), "{text}");
}

/// Kills a detached daemon if the test ends before it stopped it.
struct Detached(u32);

impl Drop for Detached {
    fn drop(&mut self) {
        if proc_info(self.0).is_some_and(|p| p.alive() && p.args.starts_with("taskd: master")) {
            let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
        }
    }
}
