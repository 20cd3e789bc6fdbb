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
    let port = free_port();
    let args = tls_server_args(certs, port, auth_clients);
    let redis = Redis::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Some((redis, format!("rediss://127.0.0.1:{port}")))
}

/// The flags of a redis-server whose only TCP port, `port`, is TLS with the certificates of
/// `certs` (`auth_clients`: whether it asks for a client certificate).
fn tls_server_args(certs: &Certs, port: u16, auth_clients: &str) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let mut args = vec!["--tls-port".to_string(), port.to_string()];
    for (flag, file) in [
        ("--tls-cert-file", &certs.server_cert),
        ("--tls-key-file", &certs.server_key),
        ("--tls-ca-cert-file", &certs.ca),
    ] {
        args.extend([flag.to_string(), path(file)]);
    }
    args.extend(["--tls-auth-clients".to_string(), auth_clients.to_string()]);
    args
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
    // A job for later comes back from the delayed set (the sweep's script runs as the user).
    let later = c.submit(r#"{"type":"sms","to":"+15550009996","run_in_ms":200,"simulate_ms":0}"#);
    assert_eq!(c.final_reply(&later["task_id"], &mut Vec::new())["event"], "done");
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
    /// How the test asks it (plain TCP, or TLS with its password).
    client: redis::Client,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        let port = free_port();
        let client =
            redis::Client::open(redis::ConnectionAddr::Tcp("127.0.0.1".into(), port)).expect("client");
        Self::start_conf(master_port, port, &format!("port {port}\n"), client)
    }

    /// Only a TLS port (the test's CA; a client certificate signed by it asked of every
    /// client), TLS to the servers and the other Sentinels, and a password (`requirepass`).
    fn start_tls(master_port: u16, certs: &Certs, password: &str) -> Sentinel {
        let port = free_port();
        let path = |p: &Path| p.display().to_string();
        let conf = format!(
            "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients yes\ntls-replication yes\nrequirepass {password}\n",
            path(&certs.server_cert),
            path(&certs.server_key),
            path(&certs.ca)
        );
        let root_cert = std::fs::read(&certs.ca).expect("CA");
        let client = redis::Client::build_with_tls(
            format!("rediss://:{password}@127.0.0.1:{port}"),
            redis::TlsCertificates {
                client_tls: Some(redis::ClientTlsConfig {
                    client_cert: std::fs::read(&certs.client_cert).expect("client certificate"),
                    client_key: std::fs::read(&certs.client_key).expect("client key"),
                }),
                root_cert: Some(root_cert),
            },
        )
        .expect("client");
        let monitor = format!("sentinel sentinel-pass {password}\n");
        Self::start_conf(master_port, port, &(conf + &monitor), client)
    }

    fn start_conf(master_port: u16, port: u16, listen: &str, client: redis::Client) -> Sentinel {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "{listen}bind 127.0.0.1\ndir {}\nsentinel monitor taskdm 127.0.0.1 {master_port} 2\n\
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
        Sentinel { child, port, client, _dir: dir }
    }

    fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> Option<T> {
        let mut conn = self.client.get_connection().ok()?;
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

fn as_args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits until each Sentinel knows the two others and `replicas` replicas.
fn sentinels_agree(sentinels: &[Sentinel], replicas: usize) {
    common::wait_for("the Sentinels to know each other and the replicas", || {
        sentinels
            .iter()
            .all(|s| {
                let others: Option<Vec<redis::Value>> = s.query(&["SENTINEL", "sentinels", "taskdm"]);
                let known: Option<Vec<redis::Value>> = s.query(&["SENTINEL", "replicas", "taskdm"]);
                others.is_some_and(|o| o.len() == sentinels.len() - 1)
                    && known.is_some_and(|r| r.len() == replicas)
            })
            .then_some(())
    });
}

#[test]
fn tls_to_sentinels_with_a_password_finds_the_master_and_follows_a_failover() {
    if common::which("redis-sentinel").is_none() {
        common::cannot_run("redis", "this test needs redis-sentinel (apt-get install redis-sentinel)");
        return;
    }
    let Some(certs) = certs() else { return };
    let path = |p: &Path| p.display().to_string();
    let ca = path(&certs.ca);
    let tls_server = |port: u16, extra: &[&str]| {
        let own = tls_server_args(&certs, port, "yes");
        let mut args: Vec<&str> = own.iter().map(String::as_str).collect();
        args.extend_from_slice(&["--tls-replication", "yes"]);
        args.extend_from_slice(extra);
        Redis::start_with(&args)
    };
    // A master and a replica that speak TLS only, three Sentinels that speak TLS only and
    // want a password; all of them want a client certificate (mutual TLS).
    let master_port = free_port();
    let Some(mut master) = tls_server(master_port, &[]) else { return };
    let mp = master_port.to_string();
    let Some(_replica) = tls_server(free_port(), &["--replicaof", "127.0.0.1", &mp]) else { return };
    common::wait_for("the replica in sync", || {
        let info: String = master.query(&["INFO", "replication"]);
        info.contains("state=online").then_some(())
    });
    let password = "sentinel-s3cret";
    let sentinels: Vec<Sentinel> =
        (0..3).map(|_| Sentinel::start_tls(master_port, &certs, password)).collect();
    sentinels_agree(&sentinels, 1);
    let hosts: Vec<String> = sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
    let base = format!("rediss+sentinel://{}/taskdm", hosts.join(","));
    let (client_cert, client_key) = (path(&certs.client_cert), path(&certs.client_key));
    let mtls = ["--redis-cert-file", client_cert.as_str(), "--redis-key-file", client_key.as_str()];
    let web = |url: &str| {
        [
            "--redis-url",
            url,
            "--redis-ca-file",
            &ca,
            "--node-id",
            "web-1",
            "--simulate-ms",
            "0",
            "--task-worker-num",
            "0",
        ]
        .iter()
        .chain(&mtls)
        .map(|a| a.to_string())
        .collect::<Vec<String>>()
    };

    // No password, or a wrong one: the start fails, saying where the password goes, never
    // showing the one given.
    let (_, log) = Daemon::try_start(&as_args(&web(&base))).err().expect("no password, no master");
    assert!(log.contains("NOAUTH") && log.contains("?sentinel_password="), "{log}");
    let wrong = format!("{base}?sentinel_password=not-the-pw-42");
    let (_, log) = Daemon::try_start(&as_args(&web(&wrong))).err().expect("a wrong password");
    assert!(
        log.contains("Password authentication failed")
            && log.contains("?sentinel_password=")
            && !log.contains("not-the-pw-42"),
        "{log}"
    );
    // Plain TCP to a TLS Sentinel finds nothing either.
    let plain = format!("redis+sentinel://{}/taskdm?sentinel_password={password}", hosts.join(","));
    let (_, log) =
        Daemon::try_start(&as_args(&web(&plain))).err().expect("TLS options without TLS are refused");
    assert!(log.contains("rediss+sentinel://"), "{log}");

    let url = format!("{base}?sentinel_password={password}");
    // Without the client certificate, the Sentinels end the handshake, and that is said.
    let no_cert = &web(&url)[..10];
    let (_, log) = Daemon::try_start(&as_args(no_cert)).err().expect("no client certificate");
    assert!(log.contains("wants a client certificate"), "{log}");
    let d = Daemon::start(&as_args(&web(&url)));
    let mut node_args = vec!["--task-worker-num", "2", "--redis-ca-file", &ca];
    node_args.extend_from_slice(&mtls);
    let node = TaskNode::start_url(&url, "tasks-a", &node_args);
    let mut c = d.connect();
    assert_eq!(all_done(&mut c, 20).len(), 20);
    assert_eq!(node.outbox_lines().len(), 20);
    // Every connection to the master is TLS: it has no plain TCP port. (Each consumer has
    // connected once it names itself: one may have run none of the jobs yet.)
    common::wait_for("both consumers connected", || {
        let clients: String = master.query(&["CLIENT", "LIST", "TYPE", "normal"]);
        ["name=taskd:tasks-a/0", "name=taskd:tasks-a/1"].iter().all(|n| clients.contains(n)).then_some(())
    });

    // The master dies; the Sentinels (asked over TLS, with the password) name the replica.
    master.kill();
    let mut seen = Seen::default();
    let mut i = 100;
    accept_more(&mut c, 20, usize::MAX, &mut i, &mut seen);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.finals.len() < seen.accepted.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let v = c.try_recv(left).expect("every job accepted after the failover is done");
        if let Some(id) = v["task_id"].as_u64().filter(|id| seen.accepted.contains_key(id)) {
            if v["event"] == "done" {
                seen.finals.insert(id, v);
            }
        }
    }
    d.wait_log("Sentinel: master taskdm moved from");
    let logs = d.log() + &node.log();
    assert!(!logs.contains(password), "the Sentinels' password is in a log:\n{logs}");
    assert!(logs.contains("rediss+sentinel://127.0.0.1:"), "{logs}");
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
    sentinels_agree(&sentinels, 2);
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

/// A three-node Redis Cluster (no replicas) made by `redis-cli --cluster create`, and a queue
/// name whose slot each node serves (`queues[i]` on `nodes[i]`).
struct Cluster {
    nodes: Vec<Redis>,
    ports: Vec<u16>,
    queues: Vec<String>,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        Self::start_with(&[])
    }

    /// With extra settings for each node.
    fn start_with(extra: &[&str]) -> Option<Cluster> {
        if common::which("redis-cli").is_none() {
            common::cannot_run(
                "redis",
                "this test creates its cluster with redis-cli (apt-get install redis-tools)",
            );
            return None;
        }
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes: Vec<Redis> = ports
            .iter()
            .filter_map(|p| {
                let port = p.to_string();
                // The bus port is named: by default it is the port + 10,000, which a free port
                // above 55,535 overflows (redis-server then exits), and which may be taken.
                let bus = free_port().to_string();
                let mut args = vec![
                    "--port",
                    &port,
                    "--cluster-port",
                    &bus,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ];
                args.extend_from_slice(extra);
                Redis::start_with(&args)
            })
            .collect();
        if nodes.len() < 3 {
            return None;
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
        let mut cluster = Cluster { nodes, ports, queues: Vec::new() };
        // One queue for each node: names whose slot that node serves.
        let mut queues: Vec<Option<String>> = vec![None, None, None];
        for n in 0..200 {
            let q = format!("q{n}");
            let i = cluster.owner_of(&q);
            queues[i].get_or_insert(q);
            if queues.iter().all(Option::is_some) {
                break;
            }
        }
        cluster.queues = queues.into_iter().map(|q| q.expect("a queue on each node")).collect();
        Some(cluster)
    }

    /// The node that serves a queue's slot: it answers for its keys, the others MOVED (and
    /// while the slot moves, the importing node answers ASK for a key it does not have yet).
    fn owner_of(&self, queue: &str) -> usize {
        let key = format!("{{{queue}}}:probe");
        (0..3)
            .find(|&i| {
                let mut conn = self.nodes[i].conn().expect("connect");
                redis::cmd("EXISTS").arg(&key).query::<i64>(&mut conn).is_ok()
            })
            .expect("a node serves the slot")
    }

    fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.ports[0])
    }

    fn node_id(&self, i: usize) -> String {
        self.nodes[i].query(&["CLUSTER", "MYID"])
    }
}

/// A web node of `queue` on `url` that runs no job itself.
fn web_node_of(url: &str, queue: &str) -> Daemon {
    Daemon::start(&[
        "--redis-url",
        url,
        "--redis-queue",
        queue,
        "--node-id",
        &format!("web-{queue}"),
        "--simulate-ms",
        "0",
        "--task-worker-num",
        "0",
    ])
}

#[test]
fn queues_spread_over_a_redis_cluster_each_on_the_node_of_its_slot() {
    let Some(cluster) = Cluster::start() else { return };
    let url = cluster.url();
    for (i, queue) in cluster.queues.iter().enumerate() {
        let node_id = format!("web-{queue}");
        let d = web_node_of(&url, queue);
        let tasks = TaskNode::start_url(
            &url,
            &format!("tasks-{queue}"),
            &["--task-worker-num", "2", "--simulate-ms", "0", "--redis-queue", queue],
        );
        let mut c = d.connect();
        assert_eq!(all_done(&mut c, 20).len(), 20, "queue {queue}");
        assert_eq!(tasks.outbox_lines().len(), 20);
        // Its keys are on the node that serves its slot.
        let epoch: i64 = cluster.nodes[i].query(&["EXISTS", &format!("{{{queue}}}:epoch:{node_id}")]);
        assert_eq!(epoch, 1, "queue {queue} on node {i}");
        assert!(d.log().contains("Redis Cluster: the node of slot"), "{}", d.log());
    }
}

// ---- A task node of several queues ----

/// The consumers of `queue`'s group on `redis`, by name.
fn consumers_of(redis: &Redis, queue: &str) -> Vec<String> {
    let key = format!("{{{queue}}}:jobs");
    let list: Vec<Vec<redis::Value>> = redis.query(&["XINFO", "CONSUMERS", &key, "taskd"]);
    list.into_iter()
        .filter_map(|fields| {
            let mut it = fields.into_iter();
            while let Some(k) = it.next() {
                let v = it.next()?;
                if redis::from_redis_value::<String>(k).ok()? == "name" {
                    return redis::from_redis_value::<String>(v).ok();
                }
            }
            None
        })
        .collect()
}

#[test]
fn one_task_node_serves_three_queues_on_three_cluster_nodes() {
    let Some(cluster) = Cluster::start() else { return };
    let url = cluster.url();
    let list = cluster.queues.join(",");
    // Four processes over three queues: slot i serves queue i mod 3.
    let tasks = TaskNode::start_url(
        &url,
        "tasks-all",
        &["--task-worker-num", "4", "--simulate-ms", "0", "--redis-queue", &list],
    );
    let webs: Vec<Daemon> = cluster.queues.iter().map(|q| web_node_of(&url, q)).collect();
    let mut clients: Vec<Client> = webs.iter().map(Daemon::connect).collect();
    // Jobs of the three web nodes at once: each queue's are run (none waits for another's).
    for c in &mut clients {
        for i in 0..30 {
            c.send(&job(i));
        }
    }
    for (c, queue) in clients.iter_mut().zip(&cluster.queues) {
        let (mut accepted, mut done) = (0, 0);
        while accepted < 30 || done < 30 {
            let v = c.recv();
            match v["event"].as_str() {
                Some("accepted") => accepted += 1,
                Some("done") => done += 1,
                _ => panic!("queue {queue}: neither accepted nor done: {v}"),
            }
        }
    }
    assert_eq!(tasks.outbox_lines().len(), 90, "the one task node ran every job");
    for (i, queue) in cluster.queues.iter().enumerate() {
        // Everything of a queue is on its own node: the node's name, its consumers (the
        // processes of its slots), the group and nothing left pending.
        let lease: i64 = cluster.nodes[i].query(&["EXISTS", &format!("{{{queue}}}:lease:tasks-all")]);
        assert_eq!(lease, 1, "the task node holds its name in queue {queue}, on node {i}");
        let mut names = consumers_of(&cluster.nodes[i], queue);
        names.sort();
        let want: Vec<String> = (0..4).filter(|s| s % 3 == i).map(|s| format!("tasks-all/{s}")).collect();
        assert_eq!(names, want, "queue {queue}");
        let pending: Vec<redis::Value> =
            cluster.nodes[i].query(&["XPENDING", &format!("{{{queue}}}:jobs"), "taskd"]);
        assert_eq!(redis::from_redis_value::<i64>(pending[0].clone()).unwrap(), 0);
    }
    let log = tasks.log();
    for queue in &cluster.queues {
        assert!(log.contains(&format!("(queue {queue}) is at 127.0.0.1:")), "{log}");
    }
    // A clean stop gives the name back in every queue.
    drop(clients);
    tasks.signal(nix::sys::signal::Signal::SIGTERM);
    common::wait_for("the task node's names given back", || {
        cluster
            .queues
            .iter()
            .enumerate()
            .all(|(i, q)| {
                cluster.nodes[i].query::<i64>(&["EXISTS", &format!("{{{q}}}:lease:tasks-all")]) == 0
            })
            .then_some(())
    });
}

#[test]
fn one_task_node_serves_two_queues_of_one_redis_and_a_web_node_names_one() {
    let Some(redis) = Redis::start() else { return };
    // Fewer processes than queues: one each, said in the log.
    let tasks = TaskNode::start(&redis, "tasks-ab", &["--task-worker-num", "1", "--redis-queue", "qa, qb"]);
    let webs: Vec<Daemon> = ["qa", "qb"].iter().map(|q| web_node_of(&redis.url, q)).collect();
    for d in &webs {
        let mut c = d.connect();
        assert_eq!(all_done(&mut c, 20).len(), 20);
    }
    assert_eq!(tasks.outbox_lines().len(), 40);
    assert_eq!(consumers_of(&redis, "qa"), vec!["tasks-ab/0".to_string()]);
    assert_eq!(consumers_of(&redis, "qb"), vec!["tasks-ab/1".to_string()]);
    assert!(tasks.log().contains("task_worker_num 1 is fewer than the 2 queues served"), "{}", tasks.log());

    // A web node stores into one queue; a queue named twice is a mistake.
    let web = taskd(&["--redis-url", &redis.url, "--redis-queue", "qa,qb", "--check-config"], &[]);
    let said = String::from_utf8_lossy(&web.stderr);
    assert!(!web.status.success() && said.contains("names several queues"), "{said}");
    let twice =
        taskd(&["task-node", "--redis-url", &redis.url, "--redis-queue", "qa,qa", "--node-id", "x"], &[]);
    let said = String::from_utf8_lossy(&twice.stderr);
    assert!(!twice.status.success() && said.contains("names a queue twice"), "{said}");
}

#[test]
fn a_queue_whose_server_is_gone_stops_only_its_own_task_processes() {
    // Without full coverage, the other nodes serve their slots while one is down.
    let Some(mut cluster) = Cluster::start_with(&["--cluster-require-full-coverage", "no"]) else { return };
    let url = cluster.url();
    let list = cluster.queues.join(",");
    let tasks = TaskNode::start_url(
        &url,
        "tasks-all",
        &["--task-worker-num", "3", "--simulate-ms", "0", "--redis-queue", &list],
    );
    let webs: Vec<Daemon> = cluster.queues[..2].iter().map(|q| web_node_of(&url, q)).collect();
    for d in &webs {
        assert_eq!(all_done(&mut d.connect(), 10).len(), 10);
    }
    // The third queue's node dies: the task node cannot renew its name there, and past the
    // lease its process of that queue takes nothing (a node of its name may run elsewhere).
    cluster.nodes[2].kill();
    let lapsed = "tasks-all/2: the node's name is not known to be its own";
    let start = std::time::Instant::now();
    while !tasks.log().contains(lapsed) {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "{}", tasks.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The other queues' processes go on: their names were renewed on their own nodes.
    for d in &webs {
        assert_eq!(all_done(&mut d.connect(), 10).len(), 10);
    }
    assert_eq!(tasks.outbox_lines().len(), 40);
    for slot in [0, 1] {
        assert!(
            !tasks.log().contains(&format!("tasks-all/{slot}: the node's name is not known")),
            "{}",
            tasks.log()
        );
    }
}

// ---- Resharding ----

/// Sends jobs one at a time until `n` more are accepted (some may be refused meanwhile), or
/// `tries` were sent; files each accepted job's request (its `i`) by its task id.
fn accept_more(c: &mut Client, n: usize, tries: usize, i: &mut usize, seen: &mut Seen) {
    let mut got = 0;
    let start = std::time::Instant::now();
    for _ in 0..tries {
        if got == n {
            return;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "jobs are no longer accepted");
        *i += 1;
        match one_job(c, *i, &seen.accepted, &mut seen.finals, &mut seen.refused) {
            Answer::Accepted(id) => {
                seen.accepted.insert(id, std::time::Instant::now());
                seen.request.insert(id, *i);
                got += 1;
            }
            Answer::Refused => {
                seen.refused_count += 1;
                seen.refused_requests.push(*i);
            }
        }
    }
}

#[derive(Default)]
struct Seen {
    accepted: HashMap<u64, std::time::Instant>,
    request: HashMap<u64, usize>,
    finals: HashMap<u64, Value>,
    refused: std::collections::HashSet<u64>,
    refused_count: usize,
    /// The requests answered `failed` or `error`: none of them may run.
    refused_requests: Vec<usize>,
}

#[test]
fn a_queues_slot_moved_by_resharding_while_jobs_flow_loses_no_job_and_runs_none_twice() {
    let Some(cluster) = Cluster::start() else { return };
    let url = cluster.url();
    let queue = cluster.queues[0].clone();
    let (from, to) = (0, 1);
    let d = web_node_of(&url, &queue);
    let tasks = TaskNode::start_url(
        &url,
        "tasks-r",
        &["--task-worker-num", "2", "--simulate-ms", "0", "--redis-queue", &queue],
    );
    let mut c = d.connect();
    let mut seen = Seen::default();
    let mut i = 0;
    accept_more(&mut c, 100, usize::MAX, &mut i, &mut seen);

    // The slot moves from node 0 to node 1 as `redis-cli --cluster reshard` moves it: IMPORTING
    // and MIGRATING, then the keys one MIGRATE at a time, with jobs sent between two (the
    // moved keys answer ASK on the old node, a script or MULTI over keys on both sides
    // TRYAGAIN or EXECABORT: a job is refused rather than stored there), then the slot given
    // to its new node everywhere, and jobs are accepted again.
    let slot: i64 = cluster.nodes[from].query(&["CLUSTER", "KEYSLOT", &format!("{{{queue}}}:jobs")]);
    let slot = slot.to_string();
    let (from_id, to_id) = (cluster.node_id(from), cluster.node_id(to));
    let _: () = cluster.nodes[to].query(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
    let _: () = cluster.nodes[from].query(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
    let to_port = cluster.ports[to].to_string();
    let mut moved = 0;
    loop {
        let keys: Vec<String> = cluster.nodes[from].query(&["CLUSTER", "GETKEYSINSLOT", &slot, "1"]);
        let Some(key) = keys.first() else { break };
        let _: redis::Value =
            cluster.nodes[from].query(&["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS", key]);
        moved += 1;
        accept_more(&mut c, 5, 5, &mut i, &mut seen);
    }
    assert!(moved >= 4, "the queue's keys were moved one by one ({moved})");
    for node in [to, from, 2] {
        let _: () = cluster.nodes[node].query(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
    }
    assert_eq!(cluster.owner_of(&queue), to);
    let during = seen.accepted.len() - 100;
    accept_more(&mut c, 100, usize::MAX, &mut i, &mut seen);

    // Every accepted job is done, once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.finals.len() < seen.accepted.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let missing: Vec<&u64> =
            seen.accepted.keys().filter(|id| !seen.finals.contains_key(id)).take(10).collect();
        let v = c
            .try_recv(left)
            .unwrap_or_else(|| panic!("accepted jobs lost: {missing:?} of {}", seen.accepted.len()));
        if let Some(id) = v["task_id"].as_u64().filter(|id| seen.accepted.contains_key(id)) {
            if v["event"] == "done" || v["event"] == "failed" {
                assert!(seen.finals.insert(id, v).is_none(), "a second final reply for {id}");
            }
        }
    }
    let failed: Vec<&Value> = seen.finals.values().filter(|v| v["event"] != "done").collect();
    assert!(failed.is_empty(), "{failed:?}");
    // Each ran once: one message in the outbox per request (the address names the request).
    let mut runs: HashMap<String, usize> = HashMap::new();
    for line in tasks.outbox_lines() {
        *runs.entry(line["to"].as_str().expect("to").to_string()).or_default() += 1;
    }
    let twice: Vec<(&String, &usize)> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "run more than once: {twice:?}");
    for (id, req) in &seen.request {
        assert_eq!(runs.get(&format!("user{req}@example.com")), Some(&1), "accepted job {id} ran once");
    }
    // A refused job's round was stored in one transaction or not at all: none of them ran.
    let ran: Vec<&usize> = seen
        .refused_requests
        .iter()
        .filter(|req| runs.contains_key(&format!("user{req}@example.com")))
        .collect();
    assert!(ran.is_empty(), "requests answered `failed` that ran: {ran:?}");
    // The processes found the queue's new node by themselves.
    let moved_line =
        format!("(queue {queue}) moved from 127.0.0.1:{} to 127.0.0.1:{to_port}", cluster.ports[from]);
    d.wait_log(&moved_line);
    assert!(tasks.log().contains(&moved_line), "{}", tasks.log());
    eprintln!(
        "FIGURES resharding: {moved} keys moved one at a time; {} jobs accepted ({during} while the slot moved), {} refused \
         meanwhile; none lost or run twice",
        seen.accepted.len(),
        seen.refused_count
    );
}
