//! The Lua that reads packs in Redis (`pack::LUA_JOBS`, `pack::LUA_DISSOLVE`) against the Rust
//! reader (`pack::jobs`), on a real redis-server: scripts dissolve the packs the consumers run,
//! and a job the two read differently would run as one thing and come back as another. Many
//! random packs (random fields, binary values with `:` and digits, empty ones), and damaged ones
//! (every cut, bytes changed, counts over the limits): the same jobs, the same damage.

mod common;

use common::durable::Redis;
use taskd::durable::entry::JobEntry;
use taskd::durable::pack::{self, Pack, LUA_DISSOLVE, LUA_JOBS, MAX_FIELDS, MAX_JOBS};

/// A job as read: its fields, owned.
type Job = Vec<(Vec<u8>, Vec<u8>)>;

/// xorshift64*: reproducible packs without a crate for it (the seed is in every failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Bytes a pack must carry as they are: the netstrings' own `:` and digits, CR LF, NUL,
    /// high bytes, and now and then nothing at all.
    fn bytes(&mut self, most: usize) -> Vec<u8> {
        const TRICKY: &[u8] = b":0123456789:\r\n\x00\xff1:o5:";
        let len = match self.below(5) {
            0 => 0,
            _ => self.below(most + 1),
        };
        (0..len)
            .map(|_| if self.below(2) == 0 { TRICKY[self.below(TRICKY.len())] } else { self.next() as u8 })
            .collect()
    }
}

/// A pack of `jobs`, each field a netstring as `Pack` writes it, with any names and counts.
fn blob_of(jobs: &[Job]) -> Vec<u8> {
    let mut blob = b"1".to_vec();
    let item = |blob: &mut Vec<u8>, bytes: &[u8]| {
        blob.extend_from_slice(bytes.len().to_string().as_bytes());
        blob.push(b':');
        blob.extend_from_slice(bytes);
    };
    for job in jobs {
        item(&mut blob, job.len().to_string().as_bytes());
        for (name, value) in job {
            item(&mut blob, name);
            item(&mut blob, value);
        }
    }
    blob
}

/// A random job: the fields of a plain entry, or any fields at all.
fn random_job(rng: &mut Rng) -> Job {
    let count = match rng.below(4) {
        0 => rng.below(MAX_FIELDS + 1),
        1 => 0,
        _ => 5 + rng.below(3),
    };
    let names: [&[u8]; 10] = [b"o", b"t", b"s", b"w", b"c", b"d", b"a", b"k", b"1", b""];
    (0..count)
        .map(|_| {
            let name = if rng.below(4) == 0 { rng.bytes(6) } else { names[rng.below(names.len())].to_vec() };
            (name, rng.bytes(40))
        })
        .collect()
}

fn random_pack(rng: &mut Rng) -> Vec<u8> {
    if rng.below(2) == 0 {
        let mut pack = Pack::new();
        for _ in 0..1 + rng.below(8) {
            let origin = String::from_utf8_lossy(&rng.bytes(12)).into_owned();
            let (task_id, session, worker) = (rng.next(), rng.next(), rng.next() as u32);
            pack.push(&origin, task_id, session, worker, &rng.bytes(30), &rng.bytes(200));
        }
        pack.bytes().to_vec()
    } else {
        let jobs: Vec<Job> = (0..rng.below(6)).map(|_| random_job(rng)).collect();
        blob_of(&jobs)
    }
}

/// What the Rust reader makes of `blob`: its jobs and whether it is damaged.
fn rust_read(blob: &[u8]) -> (Vec<Job>, bool) {
    let (jobs, damage) = pack::jobs(blob);
    let jobs = jobs.iter().map(|j| j.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()).collect();
    (jobs, damage.is_some())
}

/// The script that returns what `pack_jobs` reads: `{damaged (0 or 1), {job, …}}`, each job a
/// flat list of names and values.
fn lua_reader() -> redis::Script {
    redis::Script::new(&format!(
        "{LUA_JOBS}
local jobs, damaged = pack_jobs(ARGV[1])
return {{damaged and 1 or 0, jobs}}"
    ))
}

fn lua_read(conn: &mut redis::Connection, script: &redis::Script, blob: &[u8]) -> (Vec<Job>, bool) {
    let (damaged, flat): (i64, Vec<Vec<Vec<u8>>>) =
        script.arg(blob).invoke(conn).unwrap_or_else(|e| panic!("pack_jobs on {blob:?}: {e}"));
    let jobs =
        flat.into_iter().map(|f| f.chunks(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect()).collect();
    (jobs, damaged == 1)
}

/// Both readers agree on `blob`; returns the Rust reader's view.
fn same(conn: &mut redis::Connection, script: &redis::Script, blob: &[u8], what: &str) -> (Vec<Job>, bool) {
    let rust = rust_read(blob);
    let lua = lua_read(conn, script, blob);
    assert_eq!(lua, rust, "{what}: {:?}", String::from_utf8_lossy(blob));
    rust
}

#[test]
fn lua_reads_every_pack_as_the_rust_reader_does_whole_or_damaged() {
    let Some(redis) = Redis::start() else { return };
    let mut conn = redis.conn().expect("redis");
    let script = lua_reader();
    let seed = 0x9e37_79b9_7f4a_7c15;
    let mut rng = Rng(seed);
    let (mut damaged, mut whole) = (0, 0);
    for round in 0..300 {
        let blob = random_pack(&mut rng);
        let what = format!("seed {seed:#x}, pack {round}");
        let (_, bad) = same(&mut conn, &script, &blob, &what);
        assert!(!bad, "{what}: a pack written whole is read whole");
        whole += 1;
        // Every cut of the first ones, then some.
        let cuts: Vec<usize> = if round < 20 {
            (0..blob.len()).collect()
        } else {
            (0..8).map(|_| rng.below(blob.len())).collect()
        };
        for cut in cuts {
            damaged +=
                usize::from(same(&mut conn, &script, &blob[..cut], &format!("{what}, cut at {cut}")).1);
        }
        // A byte changed, for one that makes digits or a colon, or any.
        for _ in 0..4 {
            let mut bad = blob.clone();
            let at = rng.below(bad.len());
            bad[at] = b"0123456789:-+ x\xff"[rng.below(16)];
            damaged += usize::from(same(&mut conn, &script, &bad, &format!("{what}, byte {at} changed")).1);
        }
    }
    // Counts and lengths at and over the limits.
    let fields = |n: usize| -> Job { (0..n).map(|i| (b"f".to_vec(), i.to_string().into_bytes())).collect() };
    let limits: Vec<(&str, Vec<u8>)> = vec![
        ("no pack", b"".to_vec()),
        ("another version", b"2".to_vec()),
        ("no job", b"1".to_vec()),
        ("most fields", blob_of(&[fields(MAX_FIELDS)])),
        ("a field too many", blob_of(&[fields(MAX_FIELDS + 1)])),
        ("most jobs", blob_of(&vec![fields(1); MAX_JOBS])),
        ("a job too many", blob_of(&vec![fields(1); MAX_JOBS + 1])),
        ("a count of 10 digits", b"110:00000000011:a1:b".to_vec()),
        ("a count of 11 digits", b"111:000000000011:a1:b".to_vec()),
        ("a length of 10 digits", b"11:10000000001:a1:b".to_vec()),
        ("a length of 11 digits", b"11:100000000001:a1:b".to_vec()),
        ("a length past the end", b"11:11:a9999999999:b".to_vec()),
        ("a signed length", b"11:1-1:a".to_vec()),
        ("a length with a plus", b"11:1+1:a1:b".to_vec()),
        ("a length with a space", b"11:1 1:a1:b".to_vec()),
        ("a count with a space", b"12: 11:a1:b".to_vec()),
        ("no colon", b"11".to_vec()),
        ("an empty length", b"1:".to_vec()),
        ("a count of 64 fields", b"12:641:a1:b".to_vec()),
        ("a count of 65 fields", b"12:651:a1:b".to_vec()),
        ("a huge count", b"110:99999999991:a1:b".to_vec()),
    ];
    for (what, blob) in &limits {
        damaged += usize::from(same(&mut conn, &script, blob, what).1);
    }
    assert!(damaged > 1000 && whole == 300, "damaged {damaged}, whole {whole}");
    // The limits are the format's: read or refused by both as the Rust reader says.
    let (jobs, bad) = rust_read(&limits[5].1);
    assert_eq!((jobs.len(), bad), (MAX_JOBS, false));
    let (jobs, bad) = rust_read(&limits[6].1);
    assert_eq!((jobs.len(), bad), (MAX_JOBS, true));
}

/// The script that dissolves ARGV[1] into KEYS[1] (ARGV: first, raise, skip_o, skip_t).
fn dissolver() -> redis::Script {
    redis::Script::new(&format!(
        "{LUA_JOBS}{LUA_DISSOLVE}
return pack_dissolve(ARGV[1], KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5])"
    ))
}

/// What `pack_dissolve` should write: the jobs from `first` (1-based), but the one of `skip`,
/// each with its first `a` raised by `raise` (read as Lua's `tonumber`, for the values these
/// tests write: digits, or anything else as 0) or `a` added, and no job of no field.
fn dissolved(jobs: &[Job], first: usize, raise: u64, skip: (&[u8], &[u8])) -> Vec<Job> {
    let first_of = |job: &Job, name: &[u8]| job.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    jobs.iter()
        .skip(first - 1)
        .filter(|job| {
            (first_of(job, b"o").as_deref(), first_of(job, b"t").as_deref()) != (Some(skip.0), Some(skip.1))
        })
        .filter(|job| !job.is_empty())
        .map(|job| {
            let mut job = job.clone();
            if raise > 0 {
                match job.iter_mut().find(|(n, _)| n == b"a") {
                    Some((_, a)) => {
                        let was: u64 = std::str::from_utf8(a).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                        *a = (was + raise).to_string().into_bytes();
                    }
                    None => job.push((b"a".to_vec(), raise.to_string().into_bytes())),
                }
            }
            job
        })
        .collect()
}

fn entries(conn: &mut redis::Connection, stream: &str) -> Vec<Job> {
    let v: Vec<(String, Job)> =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(conn).expect("XRANGE");
    v.into_iter().map(|(_, fields)| fields).collect()
}

#[test]
fn lua_dissolves_a_pack_into_plain_entries_of_its_fields_attempts_raised_the_skipped_job_left_out() {
    let Some(redis) = Redis::start() else { return };
    let mut conn = redis.conn().expect("redis");
    let script = dissolver();
    let seed = 0x2545_f491_4f6c_dd1d;
    let mut rng = Rng(seed);
    let stream = "{taskd}:jobs";
    for round in 0..200 {
        // Jobs of a node, with attempts or none, some of one origin and task id as the skipped
        // one (a job of another node with the same id stays), and some jobs of any fields.
        let skip: (&[u8], &[u8]) = (b"web-1", b"42");
        let jobs: Vec<Job> = (0..1 + rng.below(10))
            .map(|_| {
                if rng.below(4) == 0 {
                    return random_job(&mut rng).into_iter().filter(|(n, _)| n != b"a").collect();
                }
                let origin: &[u8] = [&b"web-1"[..], b"web-2"][rng.below(2)];
                let task: &[u8] = [&b"42"[..], b"7", b"420", b"4"][rng.below(4)];
                let mut job: Job = vec![
                    (b"o".to_vec(), origin.to_vec()),
                    (b"t".to_vec(), task.to_vec()),
                    (b"s".to_vec(), b"3".to_vec()),
                    (b"w".to_vec(), b"0".to_vec()),
                    (b"d".to_vec(), rng.bytes(60)),
                ];
                match rng.below(4) {
                    0 => job.insert(
                        2,
                        (b"a".to_vec(), [&b"0"[..], b"3", b"17", b"x", b""][rng.below(5)].to_vec()),
                    ),
                    1 => job.push((b"a".to_vec(), b"2".to_vec())),
                    _ => {}
                }
                job
            })
            .collect();
        let blob = blob_of(&jobs);
        let first = 1 + rng.below(jobs.len() + 1);
        let raise = [0, 0, 1, 2, 5][rng.below(5)];
        let (skip_o, skip_t): (&[u8], &[u8]) = if rng.below(5) == 0 { (b"", b"") } else { skip };
        let _: i64 = redis::cmd("DEL").arg(stream).query(&mut conn).expect("DEL");
        let added: i64 = script
            .key(stream)
            .arg(&blob)
            .arg(first)
            .arg(raise)
            .arg(skip_o)
            .arg(skip_t)
            .invoke(&mut conn)
            .unwrap_or_else(|e| panic!("seed {seed:#x}, round {round}: {e}"));
        let want = dissolved(&jobs, first, raise, (skip_o, skip_t));
        let got = entries(&mut conn, stream);
        assert_eq!(got, want, "seed {seed:#x}, round {round}: first {first}, raise {raise}, jobs {jobs:?}");
        assert_eq!(added as usize, want.len());
    }
    // A pack `Pack` wrote dissolves into entries that read as the jobs it was given, each on
    // its own, with the attempts of the pack's runs that died.
    let mut pack = Pack::new();
    pack.push("web-1", 41, 9, 1, b"", b"{\"type\":\"sms\",\"to\":\"+1555\"}");
    pack.push("web-1", 42, 9, 2, b"ctx", b"cancelled");
    pack.push("web-1", 43, 9, 3, b"", b"");
    let _: i64 = redis::cmd("DEL").arg(stream).query(&mut conn).expect("DEL");
    let added: i64 =
        script.key(stream).arg(pack.bytes()).arg(1).arg(2).arg("web-1").arg("42").invoke(&mut conn).unwrap();
    assert_eq!(added, 2);
    let read: Vec<JobEntry> = entries(&mut conn, stream)
        .iter()
        .map(|f| {
            JobEntry::checked_fields(f.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))).expect("a job")
        })
        .collect();
    let got: Vec<(u64, u32, u32, Vec<u8>)> =
        read.iter().map(|j| (j.task_id, j.worker, j.attempts, j.data.clone())).collect();
    assert_eq!(got, [(41, 1, 2, b"{\"type\":\"sms\",\"to\":\"+1555\"}".to_vec()), (43, 3, 2, Vec::new())]);
    // A damaged pack dissolves the jobs before its damage.
    let whole = pack.bytes().to_vec();
    let (before, _) = pack::jobs(&whole[..whole.len() - 3]);
    let _: i64 = redis::cmd("DEL").arg(stream).query(&mut conn).expect("DEL");
    let added: i64 = script
        .key(stream)
        .arg(&whole[..whole.len() - 3])
        .arg(1)
        .arg(0)
        .arg("")
        .arg("")
        .invoke(&mut conn)
        .unwrap();
    assert_eq!((added, before.len()), (2, 2));
}
