//! What a web node sees of packs (several common jobs in one entry of `{taskd}:jobs!p`, see
//! `src/durable/pack.rs`), whatever its own `durable_pack`: a job in a pack not delivered yet
//! is cancelled, the pack's other jobs come back as plain entries of `{taskd}:jobs` with their
//! fields as they were; `stats` counts a pack as its jobs. The packs are written here, of the
//! jobs the node accepted (their plain entries moved into packs), as a bridge with
//! `durable_pack` on would have written them; the node runs no consumer.

mod common;

use common::durable::Redis;
use common::{wait_for, Client, Daemon};
use serde_json::{json, Value};
use taskd::durable::pack::Pack;

const JOBS: &str = "{taskd}:jobs";
const PACKS: &str = "{taskd}:jobs!p";

/// An entry's fields, as Redis holds them.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn web(redis: &Redis, args: &[&str]) -> Daemon {
    let mut all = vec!["--redis-url", redis.url.as_str(), "--node-id", "web-1", "--task-worker-num", "0"];
    all.extend_from_slice(args);
    Daemon::start(&all)
}

/// A web node that speaks to Redis as the README's ACL user: the scripts that read packs run
/// with no more rights than that.
fn web_as_readmes_user(redis: &Redis) -> Daemon {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let line = readme.lines().find(|l| l.starts_with("ACL SETUSER taskd ")).expect("the README's ACL line");
    let mut cmd = redis::cmd("ACL");
    for word in line.split_whitespace().skip(1) {
        cmd.arg(word.replace("PASS", "acl-s3cret"));
    }
    let _: () = cmd.query(&mut redis.conn().expect("redis")).expect("ACL SETUSER");
    let url = format!("{}?user=taskd&pass=acl-s3cret", redis.url);
    Daemon::start(&["--redis-url", &url, "--node-id", "web-1", "--task-worker-num", "0"])
}

fn entries(redis: &Redis, key: &str) -> Vec<(String, Fields)> {
    let mut conn = redis.conn().expect("redis");
    redis::cmd("XRANGE").arg(key).arg("-").arg("+").query(&mut conn).expect("XRANGE")
}

fn field<'a>(fields: &'a Fields, name: &str) -> &'a [u8] {
    fields.iter().find(|(n, _)| n == name.as_bytes()).map_or(&[][..], |(_, v)| v.as_slice())
}

fn number(fields: &Fields, name: &str) -> u64 {
    std::str::from_utf8(field(fields, name)).unwrap().parse().unwrap()
}

/// What a pack holds of a job's task id (`1:t10:4294967297`) for the 40 ids from `from`: a
/// job's text with it makes a cancel that looks for those bytes in a pack read the pack to
/// know whose job it is.
fn decoys(from: u64) -> String {
    let decoys: Vec<String> =
        (from..from + 40).map(|id| format!("1:t{}:{id}", id.to_string().len())).collect();
    decoys.join(" ")
}

/// Submits `n` plain jobs of the text `text` and waits for their entries: their task ids.
fn submit(c: &mut Client, redis: &Redis, n: usize, text: &str) -> Vec<u64> {
    let before = redis.xlen(JOBS);
    let ids = (0..n)
        .map(|i| {
            let job = format!(r#"{{"type":"sms","to":"+1555000{i:04}","text":"{text}","simulate_ms":0}}"#);
            c.submit(&job)["task_id"].as_u64().unwrap()
        })
        .collect();
    wait_for("the jobs' entries", || (redis.xlen(JOBS) == before + n as u64).then_some(()));
    ids
}

/// `XADD` of `pack` to the stream of packs, as a bridge writes it: its id.
fn add(conn: &mut redis::Connection, pack: &Pack) -> String {
    redis::cmd("XADD")
        .arg(PACKS)
        .arg("*")
        .arg("n")
        .arg(pack.len())
        .arg("p")
        .arg(pack.bytes())
        .query(conn)
        .expect("XADD")
}

/// Moves the plain entries of jobs `ids` into one pack, as `Pack` writes it: the pack's id,
/// and each job's fields as its plain entry held them.
fn pack(redis: &Redis, ids: &[u64]) -> (String, Vec<Fields>) {
    let mut pack = Pack::new();
    let mut plain = Vec::new();
    for (entry, fields) in entries(redis, JOBS) {
        if !ids.contains(&number(&fields, "t")) {
            continue;
        }
        for (name, _) in &fields {
            assert!([&b"o"[..], b"t", b"s", b"w", b"c", b"d"].contains(&name.as_slice()), "{fields:?}");
        }
        let origin = String::from_utf8(field(&fields, "o").to_vec()).unwrap();
        let worker = u32::try_from(number(&fields, "w")).unwrap();
        pack.push(
            &origin,
            number(&fields, "t"),
            number(&fields, "s"),
            worker,
            field(&fields, "c"),
            field(&fields, "d"),
        );
        let _: i64 = redis.query(&["XDEL", JOBS, &entry]);
        plain.push(fields);
    }
    assert_eq!(pack.len(), ids.len());
    (add(&mut redis.conn().expect("redis"), &pack), plain)
}

fn cancel(c: &mut Client, id: u64) -> Value {
    c.send(&format!(r#"{{"type":"cancel","task_id":{id}}}"#));
    c.recv()
}

fn stats(c: &mut Client) -> Value {
    c.send("stats");
    let s = c.recv();
    assert_eq!(s["event"], "stats", "{s}");
    s
}

#[test]
fn a_job_in_a_pack_not_delivered_is_cancelled_and_the_packs_other_jobs_come_back_as_plain_entries() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("taskd.pid");
    let pid_arg = pid_file.to_str().unwrap();
    let daemon = web(&redis, &["--pid-file", pid_arg]);
    let mut c = daemon.connect();

    // A plain job cancelled twice: how a second cancel answers.
    let plain = submit(&mut c, &redis, 1, "plain")[0];
    let text = decoys(plain);
    assert_eq!(cancel(&mut c, plain), json!({"event": "cancelled", "task_id": plain}));
    let second = cancel(&mut c, plain);
    assert_eq!(second["event"], "error", "{second}");

    // Packs with no consumer group on them yet (no consumer ever read them): the job looked
    // for is in the last, past one of another node's job of the same task id.
    let ids = submit(&mut c, &redis, 5, &text);
    let target = ids[3];
    let (first, _) = pack(&redis, &ids[..2]);
    let mut foreign = Pack::new();
    foreign.push("web-2", target, 1, 0, b"", b"{}");
    foreign.push("web-2", target + 1, 1, 0, b"", b"{}");
    let mut conn = redis.conn().unwrap();
    let foreign: String = redis::cmd("XADD")
        .arg(PACKS)
        .arg("*")
        .arg("n")
        .arg(2)
        .arg("p")
        .arg(foreign.bytes())
        .query(&mut conn)
        .unwrap();
    let (_, plain_fields) = pack(&redis, &ids[2..]);
    assert_eq!(redis.xlen(JOBS), 0);
    assert_eq!(cancel(&mut c, target), json!({"event": "cancelled", "task_id": target}));
    // The pack is gone; its other jobs are plain entries of the main stream, fields intact
    // (in the pack's order); the first pack is untouched.
    let packs: Vec<String> = entries(&redis, PACKS).into_iter().map(|(id, _)| id).collect();
    assert_eq!(packs, [first.clone(), foreign.clone()]);
    let back: Vec<Fields> = entries(&redis, JOBS).into_iter().map(|(_, f)| f).collect();
    let want: Vec<Fields> = plain_fields.into_iter().filter(|f| number(f, "t") != target).collect();
    assert_eq!(back, want);
    let mark: Option<String> = redis.query(&["GET", &format!("{{taskd}}:cancelled:web-1:{target}")]);
    assert_eq!(mark.as_deref(), Some("queued"));
    // Asked again: as a second cancel of a plain job is answered.
    let again = cancel(&mut c, target);
    let said = |v: &Value, id: u64| v["error"].as_str().unwrap().replace(&id.to_string(), "N");
    assert_eq!((&again["event"], said(&again, target)), (&second["event"], said(&second, plain)), "{again}");

    // Once a consumer group has delivered the first pack, its jobs have started; a pack
    // written after is still there to cancel from, by the operator (`taskd cancel`).
    let _: String = redis.query(&["XGROUP", "SETID", PACKS, "taskd", &first]);
    let started = cancel(&mut c, ids[0]);
    assert!(started["error"].as_str().unwrap().contains("has started"), "{started}");
    let later = submit(&mut c, &redis, 3, &text);
    let (later_pack, later_fields) = pack(&redis, &later);
    let before: Vec<Fields> = entries(&redis, JOBS).into_iter().map(|(_, f)| f).collect();
    let out = common::run_with_timeout(
        std::process::Command::new(env!("CARGO_BIN_EXE_taskd")).args([
            "cancel",
            &later[0].to_string(),
            "--pid-file",
            pid_arg,
        ]),
        common::DEADLINE,
    );
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("cancelled"), "{out:?}");
    assert_eq!(c.recv(), json!({"event": "cancelled", "task_id": later[0]}));
    let now: Vec<Fields> = entries(&redis, JOBS).into_iter().map(|(_, f)| f).collect();
    assert_eq!(now[..before.len()], before[..]);
    assert_eq!(now[before.len()..], later_fields[1..]);
    let packs: Vec<String> = entries(&redis, PACKS).into_iter().map(|(id, _)| id).collect();
    assert!(packs.contains(&foreign) && !packs.contains(&later_pack), "{packs:?}");
    assert_eq!(stats(&mut c)["tasks_cancelled"], 3);
}

#[test]
fn a_damaged_pack_holding_a_cancelled_job_gives_back_the_jobs_before_its_damage_and_says_so() {
    let Some(redis) = Redis::start() else { return };
    let daemon = web_as_readmes_user(&redis);
    let mut c = daemon.connect();
    let ids = submit(&mut c, &redis, 3, "1:o5:web-1");
    let (id, fields) = pack(&redis, &ids);
    // Cut inside its last job: the first two are read, the third is no job.
    let blob = field(&entries(&redis, PACKS)[0].1, "p").to_vec();
    let mut conn = redis.conn().unwrap();
    let _: i64 = redis::cmd("XDEL").arg(PACKS).arg(&id).query(&mut conn).unwrap();
    let _: String = redis::cmd("XADD")
        .arg(PACKS)
        .arg("*")
        .arg("n")
        .arg(3)
        .arg("p")
        .arg(&blob[..blob.len() - 2])
        .query(&mut conn)
        .unwrap();
    assert_eq!(cancel(&mut c, ids[0]), json!({"event": "cancelled", "task_id": ids[0]}));
    let back: Vec<Fields> = entries(&redis, JOBS).into_iter().map(|(_, f)| f).collect();
    assert_eq!(back, fields[1..2]);
    assert_eq!(redis.xlen(PACKS), 0);
    daemon.wait_log("is damaged past that job");
}

#[test]
fn stats_count_a_pack_as_its_jobs_waiting_or_running() {
    let Some(redis) = Redis::start() else { return };
    let daemon = web_as_readmes_user(&redis);
    let mut c = daemon.connect();
    let jobs = |c: &mut Client, want: u64| {
        wait_for(&format!("stats to count {want} jobs"), || {
            let s = stats(c);
            (s["durable"]["jobs"] == want && s["durable"]["by_priority"]["normal"] == want).then_some(())
        })
    };
    submit(&mut c, &redis, 2, "");
    jobs(&mut c, 2);
    let ids = submit(&mut c, &redis, 5, "");
    pack(&redis, &ids[..4]);
    jobs(&mut c, 7);
    // A count that is not one (anyone may write to Redis) counts none.
    let _: String = redis.query(&["XADD", PACKS, "*", "n", "many", "p", "1"]);
    jobs(&mut c, 7);
    let many = entries(&redis, PACKS)[1].0.clone();
    // Delivered and not acknowledged (running): still counted; acknowledged: trimmed, gone.
    let _: String = redis.query(&["XGROUP", "SETID", PACKS, "taskd", "0"]);
    let _: redis::Value =
        redis.query(&["XREADGROUP", "GROUP", "taskd", "x/0", "COUNT", "1", "STREAMS", PACKS, ">"]);
    jobs(&mut c, 7);
    let first = entries(&redis, PACKS)[0].0.clone();
    let _: i64 = redis.query(&["XACK", PACKS, "taskd", &first]);
    jobs(&mut c, 3);
    let _: i64 = redis.query(&["XDEL", PACKS, &many]);
    // Past 64 packs, those after the first 64 are counted at the mean of those (2 here): not
    // read every second (the 36 last hold 4 jobs each, counted as 2).
    let mut conn = redis.conn().unwrap();
    for i in 0..100 {
        let mut pack = Pack::new();
        for t in 0..if i < 64 { 2 } else { 4 } {
            pack.push("web-1", 90 + t, 0, 0, b"", b"{}");
        }
        add(&mut conn, &pack);
    }
    jobs(&mut c, 3 + 64 * 2 + 36 * 2);
}
