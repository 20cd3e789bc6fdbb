//! A real `redis-server` per test (a unix socket in a temp dir, AOF on), and `taskd task-node`
//! processes: each killed and reaped by a Drop guard, also when the test fails.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{processes, reap_orphans, wait_for};

pub struct Redis {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub url: String,
    extra: Vec<String>,
}

impl Redis {
    /// Starts a server with AOF on (appendfsync everysec), as the README recommends. Where
    /// redis-server is not installed the test fails saying so, unless `TASKD_TEST_ALLOW_SKIP`
    /// names `redis`: then None, and the skip is listed (`common::cannot_run`).
    pub fn start() -> Option<Redis> {
        Self::start_with(&[])
    }

    /// With extra `--name value` settings.
    pub fn start_with(extra: &[&str]) -> Option<Redis> {
        if super::which("redis-server").is_none() {
            super::cannot_run(
                "redis",
                "this durable-jobs test needs Debian's redis-server on PATH (apt-get install redis-server)",
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("redis.sock");
        let url = format!("redis+unix://{}", socket.display());
        let mut r =
            Redis { child: None, dir, socket, url, extra: extra.iter().map(|s| s.to_string()).collect() };
        r.launch();
        Some(r)
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("redis log");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): install it (Debian: apt-get install redis-server)")
        });
        self.child = Some(child);
        wait_for("redis-server to answer PING", || {
            self.conn().ok().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).ok())
        });
    }

    pub fn conn(&self) -> redis::RedisResult<redis::Connection> {
        let conn =
            redis::Client::open(self.url.as_str())?.get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(conn)
    }

    /// Runs one command; panics on failure.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let mut conn = self.conn().expect("connect to redis");
        cmd.query(&mut conn).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    pub fn xlen(&self, key: &str) -> u64 {
        self.query(&["XLEN", key])
    }

    /// How many entries of the job stream are taken and not acknowledged.
    pub fn pending(&self) -> u64 {
        let v: redis::Value = self.query(&["XPENDING", "{taskd}:jobs", "taskd"]);
        match v {
            redis::Value::Array(items) => match items.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// The consumers holding pending jobs now.
    pub fn pending_consumers(&self) -> Vec<String> {
        let v: redis::Value = self.query(&["XPENDING", "{taskd}:jobs", "taskd", "-", "+", "100"]);
        let redis::Value::Array(items) = v else { return Vec::new() };
        items
            .into_iter()
            .filter_map(|item| match item {
                redis::Value::Array(parts) => match parts.get(1) {
                    Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// Whether a connection named for consumer `consumer` (`taskd:NODE/SLOT`) is blocked in a
    /// command now (an XREADGROUP waiting for jobs).
    pub fn consumer_blocked(&self, consumer: &str) -> bool {
        let list: String = self.query(&["CLIENT", "LIST", "TYPE", "normal"]);
        let name = format!("name=taskd:{consumer}");
        list.lines().any(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            fields.contains(&name.as_str())
                && fields.iter().any(|f| f.strip_prefix("flags=").is_some_and(|flags| flags.contains('b')))
        })
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: a Redis that hangs.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        }
    }

    /// `kill -9` the server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same directory: it reloads its append-only file.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `taskd task-node`, in its own process group.
pub struct TaskNode {
    child: Option<Child>,
    pub pid: u32,
    pub dir: tempfile::TempDir,
    pub outbox: PathBuf,
    log_path: PathBuf,
}

impl TaskNode {
    pub fn start(redis: &Redis, node_id: &str, args: &[&str]) -> TaskNode {
        Self::start_url(&redis.url, node_id, args)
    }

    /// On another URL of the server than the test's own (TLS, an ACL user, Sentinel).
    pub fn start_url(url: &str, node_id: &str, args: &[&str]) -> TaskNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = dir.path().join("outbox.log");
        let log_path = dir.path().join("task-node.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut child = Command::new(Path::new(env!("CARGO_BIN_EXE_taskd")))
            .arg("task-node")
            .args(["--redis-url", url, "--node-id", node_id, "--outbox"])
            .arg(&outbox)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn taskd task-node");
        let pid = child.id();
        let first_rx = super::first_lines(child.stdout.take().expect("stdout"), 1);
        let node = TaskNode { child: Some(child), pid, dir, outbox, log_path };
        let first = first_rx.recv_timeout(super::DEADLINE).unwrap_or_default();
        assert!(first.starts_with("taskd task-node "), "task-node did not start: {first:?}\n{}", node.log());
        node
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The lines of its log that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log().lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }

    pub fn outbox_lines(&self) -> Vec<serde_json::Value> {
        let bytes = std::fs::read(&self.outbox).unwrap_or_default();
        // A line not ended yet is one being written while this reads (a test polls while task
        // processes append): it is read whole the next time.
        let end = bytes.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let text = String::from_utf8(bytes[..end].to_vec()).expect("the outbox's whole lines are UTF-8");
        text.lines()
            // Each write of a burst's lines starts with a newline (see the README's outbox).
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("outbox line is JSON"))
            .collect()
    }

    /// Pids of its live task processes.
    pub fn task_pids(&self) -> Vec<u32> {
        processes().into_iter().filter(|p| p.ppid == self.pid && p.alive()).map(|p| p.pid).collect()
    }

    /// `kill -9` every process of the node at once (the machine is gone); returns once they
    /// are gone and reaped.
    pub fn kill_all(&mut self) {
        let group: Vec<u32> = processes().into_iter().filter(|p| p.pgid == self.pid).map(|p| p.pid).collect();
        let _ =
            nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            reap_orphans(&group);
            if group.iter().all(|&p| super::is_dead(p)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig);
    }

    /// Waits for the node's manager to exit; its status.
    pub fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        Some(wait_for("the task node to exit", || child.try_wait().ok().flatten()))
    }

    pub fn signal_group(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid as i32), sig);
    }
}

impl Drop for TaskNode {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("----- task-node log -----\n{}\n-------------------------", self.log());
        }
    }
}
