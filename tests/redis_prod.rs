//! Durable jobs on production Redis setups, each against the real thing started by the test:
//! TLS (`rediss://`, certificates made here with openssl), mutual TLS.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::durable::{Redis, TaskNode};
use common::{Client, Daemon};
use serde_json::Value;

fn job(i: usize) -> String {
    format!(r#"{{"type":"email","to":"user{i}@example.com","simulate_ms":0}}"#)
}

/// Submits `n` jobs and reads every reply; panics unless each is accepted and then `done`.
fn all_done(c: &mut Client, n: usize) -> HashMap<u64, Value> {
    for i in 0..n {
        c.send(&job(i));
    }
    let (mut accepted, mut got) = (0, HashMap::new());
    while accepted < n || got.len() < n {
        let v = c.recv();
        match v["event"].as_str() {
            Some("accepted") => accepted += 1,
            Some("done") => {
                got.insert(v["task_id"].as_u64().expect("task_id"), v);
            }
            _ => panic!("neither accepted nor done: {v}"),
        }
    }
    got
}

fn taskd(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskd"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    common::run_with_timeout(&mut cmd, common::DEADLINE)
}

/// A port nobody listens on now (the OS's choice, released): redis-server takes it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

// ---- TLS ----

/// A test CA, the server's certificate (for 127.0.0.1 and localhost) and a client's, all
/// signed by it; and another CA that signed none of them.
struct Certs {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = common::run_with_timeout(Command::new("openssl").current_dir(dir).args(args), common::DEADLINE);
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes the certificates, or None where openssl is missing (`cannot_run`).
fn certs() -> Option<Certs> {
    if common::which("openssl").is_none() {
        common::cannot_run(
            "redis",
            "the TLS tests make their certificates with openssl (apt-get install openssl)",
        );
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    for ca in ["ca", "other-ca"] {
        let (key, crt, subj) = (format!("{ca}.key"), format!("{ca}.crt"), format!("/CN=taskd test {ca}"));
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subj, "-keyout", &key, "-out", &crt];
        args.extend_from_slice(&ec);
        openssl(d, &args);
    }
    std::fs::write(d.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext");
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for (name, subj) in [("server", "/CN=localhost"), ("client", "/CN=taskd")] {
        let (key, csr, crt, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        let mut args = vec!["req", "-subj", subj, "-keyout", &key, "-out", &csr];
        args.extend_from_slice(&ec);
        openssl(d, &args);
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
    }
    Some(Certs {
        ca: d.join("ca.crt"),
        server_cert: d.join("server.crt"),
        server_key: d.join("server.key"),
        client_cert: d.join("client.crt"),
        client_key: d.join("client.key"),
        other_ca: d.join("other-ca.crt"),
        _dir: dir,
    })
}

/// A redis-server whose only TCP port is TLS (`auth_clients`: whether it asks for a client
/// certificate); its `rediss://` URL. The guard's own connections use its unix socket.
fn tls_redis(certs: &Certs, auth_clients: &str) -> Option<(Redis, String)> {
    let port = free_port().to_string();
    let path = |p: &Path| p.display().to_string();
    let (cert, key, ca) = (path(&certs.server_cert), path(&certs.server_key), path(&certs.ca));
    let redis = Redis::start_with(&[
        "--tls-port",
        &port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        auth_clients,
    ])?;
    Some((redis, format!("rediss://127.0.0.1:{port}")))
}

fn web_args<'a>(url: &'a str, tls: &'a [&'a str], extra: &'a [&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--redis-url", url, "--node-id", "web-1", "--simulate-ms", "0"];
    all.extend_from_slice(tls);
    all.extend_from_slice(extra);
    all
}

#[test]
fn jobs_are_done_over_tls_and_a_server_that_does_not_verify_is_named_clearly() {
    let Some(certs) = certs() else { return };
    let Some((redis, url)) = tls_redis(&certs, "no") else { return };
    let ca = certs.ca.display().to_string();
    let tls = ["--redis-ca-file", ca.as_str()];

    // The web node's bridge and its own consumers, and a task node's, all over TLS (the
    // server has no plain TCP port): every job is done.
    let d = Daemon::start(&web_args(&url, &tls, &["--task-worker-num", "1"]));
    let mut node_args = vec!["--task-worker-num", "2", "--simulate-ms", "0"];
    node_args.extend_from_slice(&tls);
    let node = TaskNode::start_url(&url, "tasks-a", &node_args);
    let mut c = d.connect();
    let done = all_done(&mut c, 40);
    assert_eq!(done.len(), 40);
    // Every consumer connects over TLS: the web node's and the task node's.
    common::wait_for("every consumer connected", || {
        let clients: String = redis.query(&["CLIENT", "LIST", "TYPE", "normal"]);
        ["name=taskd:web-1/0", "name=taskd:tasks-a/0", "name=taskd:tasks-a/1"]
            .iter()
            .all(|name| clients.contains(name))
            .then_some(())
    });
    drop(node);

    // `taskd dead-letter` over TLS (the URL from the environment, as the README says).
    let list = taskd(&["dead-letter", "list", "--redis-ca-file", &ca], &[("TASKD_REDIS_URL", &url)]);
    assert!(list.status.success(), "{list:?}");

    // A CA that did not sign the server's certificate: the start fails, naming the file.
    let other = certs.other_ca.display().to_string();
    let mut args = web_args(&url, &[], &[]);
    args.extend_from_slice(&["--redis-ca-file", &other]);
    args[3] = "web-2";
    let (_, log) = Daemon::try_start(&args).err().expect("a server signed by another CA is refused");
    assert!(
        log.contains("TLS certificate does not verify against the CA certificates of")
            && log.contains(&other),
        "{log}"
    );
    let list = taskd(&["dead-letter", "list", "--redis-ca-file", &other], &[("TASKD_REDIS_URL", &url)]);
    let said = String::from_utf8_lossy(&list.stderr);
    assert!(!list.status.success() && said.contains("does not verify") && said.contains(&other), "{said}");

    // A CA file that holds no certificate is refused before anything connects.
    let (_, log) = Daemon::try_start(&web_args(
        &url,
        &["--redis-ca-file", &certs.client_key.display().to_string()],
        &[],
    ))
    .err()
    .expect("a key is no CA file");
    assert!(log.contains("invalid redis_ca_file") && log.contains("holds no PEM CERTIFICATE"), "{log}");
    // And the TLS options without rediss:// are an error naming them.
    let plain = taskd(&["--redis-url", "redis://127.0.0.1:1", "--redis-ca-file", &ca, "--check-config"], &[]);
    assert!(String::from_utf8_lossy(&plain.stderr).contains("redis_ca_file"), "{plain:?}");
}

#[test]
fn mutual_tls_needs_the_client_certificate_and_works_with_it() {
    let Some(certs) = certs() else { return };
    let Some((_redis, url)) = tls_redis(&certs, "yes") else { return };
    let ca = certs.ca.display().to_string();
    let (cert, key) = (certs.client_cert.display().to_string(), certs.client_key.display().to_string());

    // Without a client certificate, the server ends the handshake: the start fails saying so.
    let (_, log) = Daemon::try_start(&web_args(&url, &["--redis-ca-file", &ca], &[]))
        .err()
        .expect("no client certificate, no connection");
    assert!(log.contains("wants a client certificate") && log.contains("--redis-cert-file"), "{log}");

    let tls = [
        "--redis-ca-file",
        ca.as_str(),
        "--redis-cert-file",
        cert.as_str(),
        "--redis-key-file",
        key.as_str(),
    ];
    let d = Daemon::start(&web_args(&url, &tls, &["--task-worker-num", "0"]));
    let mut node_args = vec!["--task-worker-num", "2", "--simulate-ms", "0"];
    node_args.extend_from_slice(&tls);
    let node = TaskNode::start_url(&url, "tasks-a", &node_args);
    let mut c = d.connect();
    assert_eq!(all_done(&mut c, 20).len(), 20);
    assert_eq!(node.outbox_lines().len(), 20, "the task node ran them all");
    let mut dl = vec!["dead-letter", "list"];
    dl.extend_from_slice(&tls);
    let list = taskd(&dl, &[("TASKD_REDIS_URL", &url)]);
    assert!(list.status.success(), "{list:?}");
}

// ---- ACL ----

/// The README's `ACL SETUSER taskd …` line, with `password` in place of PASS.
fn readme_acl_line(password: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let line = readme.lines().find(|l| l.starts_with("ACL SETUSER taskd ")).expect("the README's ACL line");
    line.split_whitespace().skip(1).map(|w| w.replace("PASS", password)).collect()
}

#[test]
fn the_readmes_acl_user_runs_durable_jobs() {
    let Some(redis) = Redis::start() else { return };
    let line = readme_acl_line("acl-s3cret");
    let args: Vec<&str> = line.iter().map(String::as_str).collect();
    let mut cmd = redis::cmd("ACL");
    for a in &args {
        cmd.arg(*a);
    }
    let mut admin = redis.conn().expect("connect");
    let _: () = cmd.query(&mut admin).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let url = format!("{}?user=taskd&pass=acl-s3cret", redis.url);

    let d = Daemon::start(&[
        "--redis-url",
        &url,
        "--node-id",
        "web-1",
        "--simulate-ms",
        "0",
        "--task-worker-num",
        "1",
    ]);
    let node = TaskNode::start_url(&url, "tasks-a", &["--task-worker-num", "2", "--simulate-ms", "0"]);
    let mut c = d.connect();
    assert_eq!(all_done(&mut c, 40).len(), 40);
    // A key and its duplicate, a cancel of a parked job and of one in the stream: their
    // scripts' calls need the user's rights too.
    let keyed = r#"{"type":"sms","to":"+15550009999","key":"acl-key"}"#;
    let first = c.submit(keyed);
    let done = c.final_reply(&first["task_id"], &mut Vec::new());
    c.submit(keyed);
    assert_eq!(c.recv(), serde_json::json!({"event": "duplicate", "task_id": first["task_id"]}));
    assert_eq!(c.recv(), done);
    let parked = c.submit(r#"{"type":"sms","to":"+15550009998","run_in_ms":60000}"#);
    c.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, parked["task_id"]));
    assert_eq!(c.recv(), serde_json::json!({"event": "cancelled", "task_id": parked["task_id"]}));
    let slow = c.submit(r#"{"type":"sms","to":"+15550009997","simulate_ms":300}"#);
    c.send(&format!(r#"{{"type":"cancel","task_id":{}}}"#, slow["task_id"]));
    let answer = c.recv();
    assert!(
        answer["event"] == "cancelled" || answer["error"].as_str().is_some_and(|e| e.contains("has started")),
        "{answer}"
    );
    let list = taskd(&["dead-letter", "list"], &[("TASKD_REDIS_URL", &url)]);
    assert!(list.status.success(), "{list:?}");
    // Nothing else was refused: not a script's call (the sweeps of the delayed set, the
    // beats, the claims ran meanwhile), not a command of the bridge.
    let log = d.log() + &node.log();
    for line in log.lines().filter(|l| l.contains("NOPERM") || l.contains("ERROR")) {
        assert!(line.contains("CONFIG GET refused") || line.contains("may not run CLIENT"), "{line}\n{log}");
    }
    for said in ["CONFIG GET refused", "may not run CLIENT LIST or CLIENT SETNAME"] {
        assert_eq!(d.log().matches(said).count(), 1, "{said} once in\n{}", d.log());
        assert_eq!(node.log().matches(said).count(), 1, "{said} once in\n{}", node.log());
    }
    // The user really is limited: what taskd does not need is refused.
    let mut as_taskd =
        redis::Client::open(url.as_str()).expect("url").get_connection().expect("connect as taskd");
    let flush: redis::RedisResult<()> = redis::cmd("FLUSHALL").query(&mut as_taskd);
    assert!(flush.is_err_and(|e| e.code() == Some("NOPERM")));
    let other: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("other:key").query(&mut as_taskd);
    assert!(other.is_err_and(|e| e.code() == Some("NOPERM")));
}

// ---- Sentinel ----

/// A `redis-sentinel` process, killed and reaped on drop.
struct Sentinel {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor taskdm 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds taskdm 1000\nsentinel failover-timeout taskdm 10000\n\
                 sentinel parallel-syncs taskdm 2\n",
                dir.path().display()
            ),
        )
        .expect("sentinel.conf");
        let log = std::fs::File::create(dir.path().join("sentinel.log")).expect("log");
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start redis-sentinel");
        Sentinel { child, port, _dir: dir }
    }

    fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> Option<T> {
        let info = redis::ConnectionAddr::Tcp("127.0.0.1".into(), self.port);
        let mut conn = redis::Client::open(info).ok()?.get_connection().ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn).ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the client saw of one request.
enum Answer {
    Accepted(u64),
    Refused,
}

/// Sends one job; reads until its answer, filing the final replies of earlier jobs.
fn one_job(
    c: &mut Client,
    i: usize,
    accepted: &HashMap<u64, std::time::Instant>,
    finals: &mut HashMap<u64, Value>,
    refused: &mut std::collections::HashSet<u64>,
) -> Answer {
    c.send(&job(i));
    loop {
        let v = c.recv();
        let id = v["task_id"].as_u64();
        match (v["event"].as_str(), id) {
            (Some("accepted"), Some(id)) => return Answer::Accepted(id),
            (Some("done" | "failed"), Some(id)) if accepted.contains_key(&id) => {
                assert!(finals.insert(id, v).is_none(), "a second final reply for {id}");
            }
            // The outcome of a job refused with "failed" because too few replicas confirmed it
            // in time (it was in the master, and ran): see the README.
            (Some("done" | "failed"), Some(id)) if refused.contains(&id) => {}
            // Not stored (Redis gone, or too few replicas confirmed it): this request's answer.
            (Some("failed"), id) => {
                refused.extend(id);
                return Answer::Refused;
            }
            (Some("error"), _) => return Answer::Refused,
            _ => panic!("unexpected reply {v}"),
        }
    }
}

#[test]
fn a_sentinel_failover_under_load_loses_no_accepted_job_with_wait_for_a_replica() {
    if common::which("redis-sentinel").is_none() {
        common::cannot_run("redis", "this test needs redis-sentinel (apt-get install redis-sentinel)");
        return;
    }
    let master_port = free_port();
    let Some(mut master) = Redis::start_with(&["--port", &master_port.to_string()]) else { return };
    let mp = master_port.to_string();
    let replicas: Vec<Redis> = (0..2)
        .filter_map(|_| {
            Redis::start_with(&["--port", &free_port().to_string(), "--replicaof", "127.0.0.1", &mp])
        })
        .collect();
    common::wait_for("both replicas in sync", || {
        let info: String = master.query(&["INFO", "replication"]);
        (info.matches("state=online").count() == 2).then_some(())
    });
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master_port)).collect();
    common::wait_for("the Sentinels to know each other and the replicas", || {
        sentinels
            .iter()
            .all(|s| {
                let others: Option<Vec<redis::Value>> = s.query(&["SENTINEL", "sentinels", "taskdm"]);
                let replicas: Option<Vec<redis::Value>> = s.query(&["SENTINEL", "replicas", "taskdm"]);
                others.is_some_and(|o| o.len() == 2) && replicas.is_some_and(|r| r.len() == 2)
            })
            .then_some(())
    });
    let hosts: Vec<String> = sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
    let url = format!("redis+sentinel://{}/taskdm", hosts.join(","));

    let d = Daemon::start(&[
        "--redis-url",
        &url,
        "--node-id",
        "web-1",
        "--simulate-ms",
        "0",
        "--task-worker-num",
        "2",
        "--redis-wait-replicas",
        "1",
    ]);
    let node = TaskNode::start_url(&url, "tasks-a", &["--task-worker-num", "2", "--simulate-ms", "0"]);
    let mut c = d.connect();
    let mut accepted: HashMap<u64, std::time::Instant> = HashMap::new();
    let mut finals: HashMap<u64, Value> = HashMap::new();
    let mut refused_ids = std::collections::HashSet::new();
    let (mut refused, mut i) = (0, 0);
    let mut killed_at = None;
    let mut last_before = None;
    let mut first_after = None;
    let mut after = 0;
    let started = std::time::Instant::now();
    // Jobs go on being sent through the failover, until 200 are accepted by the new master.
    while after < 200 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "no job accepted again after the failover"
        );
        i += 1;
        match one_job(&mut c, i, &accepted, &mut finals, &mut refused_ids) {
            Answer::Accepted(id) => {
                let now = std::time::Instant::now();
                accepted.insert(id, now);
                match killed_at {
                    None => last_before = Some(now),
                    Some(_) => {
                        first_after.get_or_insert(now);
                        after += 1;
                    }
                }
            }
            Answer::Refused => refused += 1,
        }
        if killed_at.is_none() && accepted.len() == 300 {
            master.kill();
            killed_at = Some(std::time::Instant::now());
        }
    }
    // Every accepted job is done: none was lost with the master.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while finals.len() < accepted.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let missing: Vec<&u64> = accepted.keys().filter(|id| !finals.contains_key(id)).take(10).collect();
        let v = c
            .try_recv(left)
            .unwrap_or_else(|| panic!("accepted jobs lost: {missing:?} of {}", accepted.len()));
        if let Some(id) = v["task_id"].as_u64().filter(|id| accepted.contains_key(id)) {
            if v["event"] == "done" || v["event"] == "failed" {
                finals.insert(id, v);
            }
        }
    }
    let failed: Vec<&Value> = finals.values().filter(|v| v["event"] != "done").collect();
    assert!(failed.is_empty(), "{failed:?}");
    d.wait_log("Sentinel: master taskdm moved from");
    let (before, after_at) = (last_before.expect("accepted before"), first_after.expect("accepted after"));
    eprintln!(
        "FIGURES sentinel failover: {} accepted ({} after the failover), {refused} refused meanwhile; \
         no job accepted for {:.2} s (kill -9 to the first accepted after it: {:.2} s); lost: 0",
        accepted.len(),
        after,
        after_at.duration_since(before).as_secs_f64(),
        after_at.duration_since(killed_at.expect("killed")).as_secs_f64()
    );
    drop(node);
    drop(replicas);
}

// ---- Cluster ----

#[test]
fn queues_spread_over_a_redis_cluster_each_on_the_node_of_its_slot() {
    if common::which("redis-cli").is_none() {
        common::cannot_run(
            "redis",
            "this test creates its cluster with redis-cli (apt-get install redis-tools)",
        );
        return;
    }
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nodes: Vec<Redis> = ports
        .iter()
        .filter_map(|p| {
            Redis::start_with(&[
                "--port",
                &p.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
        })
        .collect();
    if nodes.len() < 3 {
        return;
    }
    let mut create = Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for p in &ports {
        create.arg(format!("127.0.0.1:{p}"));
    }
    create.args(["--cluster-replicas", "0", "--cluster-yes"]);
    let made = common::run_with_timeout(&mut create, common::DEADLINE);
    assert!(made.status.success(), "{made:?}");
    common::wait_for("the cluster to be up on every node", || {
        nodes
            .iter()
            .all(|n| n.query::<String>(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            .then_some(())
    });
    // One queue for each node: names whose slot that node serves.
    // The node that serves a key's slot answers for it; the others answer MOVED.
    let owner_of = |queue: &str| -> usize {
        let key = format!("{{{queue}}}:probe");
        (0..3)
            .find(|&i| {
                let mut conn = nodes[i].conn().expect("connect");
                redis::cmd("EXISTS").arg(&key).query::<i64>(&mut conn).is_ok()
            })
            .expect("a node serves the slot")
    };
    let mut queues: Vec<Option<String>> = vec![None, None, None];
    for n in 0..200 {
        let q = format!("q{n}");
        let i = owner_of(&q);
        queues[i].get_or_insert(q);
        if queues.iter().all(Option::is_some) {
            break;
        }
    }
    let queues: Vec<String> = queues.into_iter().map(|q| q.expect("a queue on each node")).collect();
    let url = format!("redis+cluster://127.0.0.1:{}", ports[0]);
    for (i, queue) in queues.iter().enumerate() {
        let node_id = format!("web-{queue}");
        let d = Daemon::start(&[
            "--redis-url",
            &url,
            "--redis-queue",
            queue,
            "--node-id",
            &node_id,
            "--simulate-ms",
            "0",
            "--task-worker-num",
            "0",
        ]);
        let tasks = TaskNode::start_url(
            &url,
            &format!("tasks-{queue}"),
            &["--task-worker-num", "2", "--simulate-ms", "0", "--redis-queue", queue],
        );
        let mut c = d.connect();
        assert_eq!(all_done(&mut c, 20).len(), 20, "queue {queue}");
        assert_eq!(tasks.outbox_lines().len(), 20);
        // Its keys are on the node that serves its slot.
        let epoch: i64 = nodes[i].query(&["EXISTS", &format!("{{{queue}}}:epoch:{node_id}")]);
        assert_eq!(epoch, 1, "queue {queue} on node {i}");
        assert!(d.log().contains("Redis Cluster: the node of slot"), "{}", d.log());
    }
}
