//! Packs, the producer's side (issue 21): a web node with `--durable-pack` writes the common
//! jobs of each store round as entries of `{taskd}:jobs!p` (fields `n` and `p`), the other
//! jobs as before; a pack Redis refuses (its stream made a key of another type) fails its jobs
//! with a line naming the key, and nothing is lost silently. The web nodes here run no jobs
//! (`--task-worker-num 0`): what they stored stays in Redis to be read.

mod common;

use std::collections::BTreeSet;

use common::durable::Redis;
use common::{Client, Daemon};
use serde_json::Value;

fn web(redis: &Redis, args: &[&str]) -> Daemon {
    let mut all = vec!["--redis-url", redis.url.as_str(), "--node-id", "web-1", "--task-worker-num", "0"];
    all.extend_from_slice(args);
    let d = Daemon::start(&all);
    d.wait_log("redis bridge: connected");
    d
}

/// A common job (packable) for `to`, or one of high priority (never packed).
fn job(to: &str, high: bool) -> String {
    let priority = if high { r#","priority":"high""# } else { "" };
    format!(r#"{{"type":"email","to":"{to}","simulate_ms":0{priority}}}"#)
}

/// Sends `lines` in one write (so that they reach the bridge in as few rounds as can be), and
/// reads one answer for each: the answers, as they come (not always in the lines' order).
fn pipelined(c: &mut Client, lines: &[String]) -> Vec<Value> {
    c.send_raw(lines.iter().map(|l| format!("{l}\n")).collect::<String>().as_bytes());
    lines.iter().map(|_| c.recv()).collect()
}

/// The task ids of the plain entries of `stream`.
fn plain_ids(redis: &Redis, stream: &str) -> Vec<u64> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis.query(&["XRANGE", stream, "-", "+"]);
    entries
        .into_iter()
        .map(|(id, fields)| {
            let t = fields.iter().find(|(k, _)| k == "t").unwrap_or_else(|| panic!("{stream} {id}: no t"));
            t.1.parse().unwrap()
        })
        .collect()
}

/// Stream entries as XRANGE gives them, their fields as bytes.
type Entries = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// The packs of `{taskd}:jobs!p`: for each, its `n` and the task ids of its jobs, each job
/// checked as a plain entry is.
fn packs(redis: &Redis) -> Vec<(usize, Vec<u64>)> {
    let mut conn = redis.conn().unwrap();
    let entries: Entries =
        redis::cmd("XRANGE").arg("{taskd}:jobs!p").arg("-").arg("+").query(&mut conn).unwrap();
    entries
        .into_iter()
        .map(|(id, fields)| {
            let field = |name: &[u8]| {
                let f = fields.iter().find(|(k, _)| k == name);
                f.unwrap_or_else(|| panic!("pack {id} lacks {name:?}")).1.clone()
            };
            let n: usize = String::from_utf8(field(b"n")).unwrap().parse().unwrap();
            let blob = field(b"p");
            let (jobs, damage) = taskd::durable::pack::jobs(&blob);
            assert_eq!(damage, None, "pack {id}");
            let ids = jobs
                .into_iter()
                .map(|fields| {
                    let job =
                        taskd::durable::entry::JobEntry::checked_fields(fields.iter().copied()).unwrap();
                    assert_eq!(&*job.origin, "web-1");
                    job.task_id
                })
                .collect();
            (n, ids)
        })
        .collect()
}

fn task_id(v: &Value) -> u64 {
    v["task_id"].as_u64().unwrap_or_else(|| panic!("no task_id: {v}"))
}

#[test]
fn a_web_nodes_common_jobs_are_stored_as_packs_and_the_others_as_before() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--durable-pack"]);
    // Several connections, each its jobs in one write: a round holds jobs of several of them.
    let (conns, per_conn) = (4, 300);
    let mut clients: Vec<Client> = (0..conns).map(|_| d.connect()).collect();
    let batches: Vec<Vec<String>> = (0..conns)
        .map(|c| (0..per_conn).map(|n| job(&format!("c{c}-{n}@example.com"), n % 50 == 0)).collect())
        .collect();
    let answers: Vec<Vec<Value>> = std::thread::scope(|s| {
        let running: Vec<_> =
            clients.iter_mut().zip(&batches).map(|(c, lines)| s.spawn(move || pipelined(c, lines))).collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let (mut common, mut high) = (BTreeSet::new(), BTreeSet::new());
    for answer in answers.iter().flatten() {
        assert_eq!(answer["event"], "accepted", "{answer}");
    }
    for answer in answers.iter().flatten() {
        // Every 50th job of a connection is of high priority.
        let to = answer["to"].as_str().unwrap();
        let n: usize = to.split(['-', '@']).nth(1).unwrap().parse().unwrap();
        let set = if n % 50 == 0 { &mut high } else { &mut common };
        assert!(set.insert(task_id(answer)), "{answer}");
    }
    assert_eq!(common.len() + high.len(), conns * per_conn);

    // Every common job is in a pack (or, alone in its round, a plain entry), once; the jobs of
    // high priority are plain entries of their stream, as without packs.
    let packs = packs(&redis);
    let mut packed = Vec::new();
    for (n, ids) in &packs {
        assert_eq!(*n, ids.len(), "a pack's n is its count of jobs");
        assert!((2..=128).contains(n), "{n} jobs in a pack");
        packed.extend(ids);
    }
    let plain = plain_ids(&redis, "{taskd}:jobs");
    let mut stored: Vec<u64> = packed.iter().copied().chain(plain.iter().copied()).collect();
    stored.sort_unstable();
    assert_eq!(stored, common.iter().copied().collect::<Vec<_>>(), "every common job stored once");
    // Pipelined jobs come many to a round: nearly all of them are packed.
    assert!(packed.len() * 10 >= common.len() * 9, "{} packed of {}", packed.len(), common.len());
    assert!(packs.len() < common.len() / 10, "{} packs for {} jobs", packs.len(), common.len());
    let mut high_stored = plain_ids(&redis, "{taskd}:jobs#high");
    high_stored.sort_unstable();
    assert_eq!(high_stored, high.iter().copied().collect::<Vec<_>>());
}

#[test]
fn a_pack_stream_of_another_type_fails_its_jobs_naming_it_and_loses_nothing() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--durable-pack"]);
    let _: () = redis.query(&["SET", "{taskd}:jobs!p", "not a stream"]);
    let mut c = d.connect();
    let lines: Vec<String> = (0..60).map(|n| job(&format!("j{n}@example.com"), n == 30)).collect();
    let answers = pipelined(&mut c, &lines);
    let (mut accepted, mut failed) = (BTreeSet::new(), Vec::new());
    for answer in &answers {
        match answer["event"].as_str() {
            Some("accepted") => assert!(accepted.insert(task_id(answer))),
            Some("failed") => {
                assert_ne!(answer["to"], "j30@example.com", "the job of high priority is in no pack");
                let error = answer["error"].as_str().unwrap_or_default();
                assert!(
                    error.contains("will not run: {taskd}:jobs!p is a string key, not a stream"),
                    "{answer}"
                );
                failed.push(answer.clone());
            }
            _ => panic!("{answer}"),
        }
    }
    assert!(failed.len() >= 2, "a pack's jobs failed: {answers:?}");
    assert_eq!(accepted.len() + failed.len(), lines.len());
    // Each accepted job is in Redis (of high priority, or a common one alone in its round);
    // none that failed is.
    let mut stored: Vec<u64> =
        plain_ids(&redis, "{taskd}:jobs").into_iter().chain(plain_ids(&redis, "{taskd}:jobs#high")).collect();
    stored.sort_unstable();
    assert_eq!(stored, accepted.iter().copied().collect::<Vec<_>>());
    let kind: String = redis.query(&["TYPE", "{taskd}:jobs!p"]);
    assert_eq!(kind, "string", "the key someone else wrote is left as it is");
    d.wait_log("redis bridge: a pack of");

    // The key deleted, packs are stored again.
    let _: i64 = redis.query(&["DEL", "{taskd}:jobs!p"]);
    let lines: Vec<String> = (0..40).map(|n| job(&format!("k{n}@example.com"), false)).collect();
    for answer in pipelined(&mut c, &lines) {
        assert_eq!(answer["event"], "accepted", "{answer}");
    }
    assert!(!packs(&redis).is_empty());
}

/// The same when the round's answer is lost (Redis stopped meanwhile): the round was stored
/// with its pack refused, which its answer would have said; the bridge asks the pack stream's
/// type with the claims again, and the pack's jobs get `failed` naming it, not `accepted`.
#[test]
fn a_refused_pack_of_a_round_whose_answer_was_lost_fails_its_jobs() {
    let Some(redis) = Redis::start() else { return };
    let d = web(&redis, &["--durable-pack"]);
    let _: () = redis.query(&["SET", "{taskd}:jobs!p", "not a stream"]);
    let mut c = d.connect();
    let lines: Vec<String> = (0..12).map(|n| job(&format!("j{n}@example.com"), n == 6)).collect();
    redis.signal(nix::sys::signal::Signal::SIGSTOP);
    c.send_raw(lines.iter().map(|l| format!("{l}\n")).collect::<String>().as_bytes());
    d.wait_log("asking Redis whether the round was stored");
    redis.signal(nix::sys::signal::Signal::SIGCONT);
    let answers: Vec<Value> = lines.iter().map(|_| c.recv()).collect();
    let (mut accepted, mut failed) = (BTreeSet::new(), 0);
    for answer in &answers {
        match answer["event"].as_str() {
            Some("accepted") => assert!(accepted.insert(task_id(answer))),
            Some("failed") => {
                assert_ne!(answer["to"], "j6@example.com", "the job of high priority is in no pack");
                let error = answer["error"].as_str().unwrap_or_default();
                assert!(
                    error.contains("will not run: {taskd}:jobs!p is a string key, not a stream"),
                    "{answer}"
                );
                failed += 1;
            }
            _ => panic!("{answer}"),
        }
    }
    assert!(failed >= 2, "a pack's jobs failed: {answers:?}");
    let mut stored: Vec<u64> =
        plain_ids(&redis, "{taskd}:jobs").into_iter().chain(plain_ids(&redis, "{taskd}:jobs#high")).collect();
    stored.sort_unstable();
    assert_eq!(stored, accepted.iter().copied().collect::<Vec<_>>(), "accepted: stored; failed: not");
    // The path under test: Redis ran the round's transaction (sent before it stopped) before
    // the bridge's question on a new connection.
    assert!(d.log().contains("a round whose answer was lost had been stored"), "{}", d.log());
}
