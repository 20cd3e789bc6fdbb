//! What a job, a reply and a dead letter hold in their streams. Field names are short: they
//! are stored once per entry, and Redis's memory is the queue's.

use std::sync::Arc;

use redis::Cmd;

use crate::ipc::envelope::{FromBridge, Reply};

use super::keys::Keys;
use super::redis_io::StreamEntry;
use super::resp::Packed;

/// Longest node name (as `node_id` allows it).
const MAX_NODE: usize = 64;

/// A job in the job stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEntry {
    /// The node that accepted it, whose reply stream gets its outcome. Shared by the jobs of
    /// one origin read together (see [`Origins`]).
    pub origin: Arc<str>,
    pub task_id: u64,
    /// The origin's client session (0: none); only the origin can reach it.
    pub session: u64,
    /// The worker slot of the origin whose `on_finish` gets the outcome.
    pub worker: u32,
    pub context: Vec<u8>,
    pub data: Vec<u8>,
    /// Replays from the dead letters so far.
    pub replays: u32,
    /// Runs before this stream entry (it came back from the delayed queue), and delivery
    /// retries so far: a run's attempt is `attempts` + the entry's delivery count.
    pub attempts: u32,
    pub retries: u32,
    /// Its deduplication key, if it has one (see `durable::dedup`): fields `k` and `kt`.
    pub key: Option<JobKey>,
}

/// A job's deduplication key: the client's key in hex, and its `dedup_ttl_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKey {
    pub hex: String,
    pub ttl_ms: u64,
}

impl JobKey {
    /// The fields of a job stream entry (or a parked job's hash) that carry it.
    pub fn add(&self, cmd: &mut Cmd) {
        cmd.arg("k").arg(&self.hex).arg("kt").arg(self.ttl_ms);
    }
}

impl JobEntry {
    /// The arguments of XADD after the id.
    pub fn add_fields(
        cmd: &mut Cmd,
        origin: &str,
        task_id: u64,
        session: u64,
        worker: u32,
        context: &[u8],
        data: &[u8],
    ) {
        cmd.arg("o").arg(origin).arg("t").arg(task_id).arg("s").arg(session).arg("w").arg(worker);
        if !context.is_empty() {
            cmd.arg("c").arg(context);
        }
        cmd.arg("d").arg(data);
    }

    /// `XADD stream * FIELDS` of a job with no field but those of [`JobEntry::add_fields`],
    /// packed: the same bytes as that `Cmd` (see [`super::resp`]).
    #[allow(clippy::too_many_arguments)]
    pub fn pack_xadd(
        packed: &mut Packed,
        stream: &str,
        origin: &str,
        task_id: u64,
        session: u64,
        worker: u32,
        context: &[u8],
        data: &[u8],
    ) {
        let args = 3 + 10 + if context.is_empty() { 0 } else { 2 };
        packed.command(args).arg(b"XADD").arg(stream.as_bytes()).arg(b"*");
        packed.arg(b"o").arg(origin.as_bytes()).arg(b"t").number(task_id).arg(b"s").number(session);
        packed.arg(b"w").number(u64::from(worker));
        if !context.is_empty() {
            packed.arg(b"c").arg(context);
        }
        packed.arg(b"d").arg(data);
    }

    pub fn add(&self, cmd: &mut Cmd) {
        Self::add_fields(
            cmd,
            &self.origin,
            self.task_id,
            self.session,
            self.worker,
            &self.context,
            &self.data,
        );
        if self.replays > 0 {
            cmd.arg("rp").arg(self.replays);
        }
        if self.attempts > 0 {
            cmd.arg("a").arg(self.attempts);
        }
        if self.retries > 0 {
            cmd.arg("rt").arg(self.retries);
        }
        if let Some(key) = &self.key {
            key.add(cmd);
        }
    }

    /// None for an entry that is not a job (deleted, or written by something else). Its
    /// fields are read in one pass (the first of a name counts, as `StreamEntry::get` finds).
    pub fn parse(e: &StreamEntry) -> Option<JobEntry> {
        JobEntry::parse_fields(e.fields(), &mut Origins::default()).1
    }

    /// As [`JobEntry::parse`], of an entry's fields (names and values, in order) wherever they
    /// are; and whether it has any field.
    fn parse_fields<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        origins: &mut Origins,
    ) -> (bool, Option<JobEntry>) {
        let mut any = false;
        let mut f: [Option<&[u8]>; 11] = [None; 11];
        for (name, value) in fields {
            any = true;
            let at = match name {
                b"t" => 0,
                b"s" => 1,
                b"w" => 2,
                b"rp" => 3,
                b"a" => 4,
                b"rt" => 5,
                b"k" => 6,
                b"kt" => 7,
                b"o" => 8,
                b"d" => 9,
                b"c" => 10,
                _ => continue,
            };
            f[at].get_or_insert(value);
        }
        (any, JobEntry::of_fields(&f, origins))
    }

    /// The job of the fields `parse_fields` found, by their place there.
    fn of_fields(f: &[Option<&[u8]>; 11], origins: &mut Origins) -> Option<JobEntry> {
        let number = |v: Option<&[u8]>| decimal(v?);
        let small = |v: Option<&[u8]>| number(v).and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        Some(JobEntry {
            task_id: number(f[0])?,
            session: number(f[1]).unwrap_or(0),
            worker: small(f[2]),
            replays: small(f[3]),
            attempts: small(f[4]),
            retries: small(f[5]),
            // A field that is not a key in hex is no key: it would become part of a key name.
            key: f[6].and_then(|k| std::str::from_utf8(k).ok()).filter(|k| super::dedup::valid_hex(k)).map(
                |hex| JobKey {
                    hex: hex.to_string(),
                    ttl_ms: number(f[7]).unwrap_or(0).min(super::dedup::TTL_MAX_MS),
                },
            ),
            origin: origins.of(f[8]?)?,
            data: f[9]?.to_vec(),
            context: f[10].map(<[u8]>::to_vec).unwrap_or_default(),
        })
    }
}

/// The number of a field, as `str::parse::<u64>` reads it; digits as taskd writes them are
/// read without that function's UTF-8 check (three fields a job).
fn decimal(v: &[u8]) -> Option<u64> {
    if !v.is_empty() && v.len() <= 19 {
        let mut n = 0u64;
        for &d in v {
            if !d.is_ascii_digit() {
                return std::str::from_utf8(v).ok()?.parse().ok();
            }
            n = n * 10 + u64::from(d - b'0');
        }
        return Some(n);
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Why a job stream entry is not run as it stands. Anyone who can write to Redis can write an
/// entry: what a consumer reads is checked as a client's request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// Not a job (deleted meanwhile, or not written by taskd): acknowledged and deleted.
    NotAJob(String),
    /// A job whose fields are out of bounds: not run, dead-lettered with the reason.
    Invalid { job: Box<JobEntry>, why: String },
}

impl JobEntry {
    /// The job of a job stream entry, checked: what a consumer runs.
    pub fn checked(e: &StreamEntry) -> Result<JobEntry, Rejected> {
        JobEntry::checked_fields(e.fields())
    }

    /// As [`JobEntry::checked`], of an entry's fields (names and values, in order) wherever
    /// they are: a consumer reads new jobs straight from the bytes of the reply (see
    /// `hot::parse_jobs`), with no [`StreamEntry`] between (its two buffers were two
    /// allocations and a copy of every field per job).
    pub fn checked_fields<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<JobEntry, Rejected> {
        JobEntry::checked_fields_in(fields, &mut Origins::default())
    }

    /// As [`JobEntry::checked_fields`], its origin shared with the jobs read before it through
    /// `origins`.
    pub fn checked_fields_in<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        origins: &mut Origins,
    ) -> Result<JobEntry, Rejected> {
        let (any, job) = JobEntry::parse_fields(fields, origins);
        if !any {
            return Err(Rejected::NotAJob("deleted while it was pending".into()));
        }
        let Some(job) = job else {
            return Err(Rejected::NotAJob("its fields are not those of a job (o, t, d)".into()));
        };
        let why = if !valid_node(&job.origin) {
            format!(
                "its origin {:?} is not a node name (1 to {MAX_NODE} of [A-Za-z0-9._-])",
                cut(&job.origin)
            )
        } else if job.task_id == 0 {
            "its task id is 0".into()
        } else {
            return Ok(job);
        };
        Err(Rejected::Invalid { job: Box::new(job), why })
    }
}

/// The origin of the last job read, for the next of the same origin: the jobs of a pack, and
/// most of a reply's, come from one node (a name per job was an allocation per job).
#[derive(Debug, Default)]
pub struct Origins(Option<Arc<str>>);

impl Origins {
    /// `bytes` as an origin (None if they are not text).
    fn of(&mut self, bytes: &[u8]) -> Option<Arc<str>> {
        if let Some(last) = self.0.as_ref().filter(|last| last.as_bytes() == bytes) {
            return Some(Arc::clone(last));
        }
        let origin: Arc<str> = Arc::from(std::str::from_utf8(bytes).ok()?);
        self.0 = Some(Arc::clone(&origin));
        Some(origin)
    }
}

/// Whether `s` can be a node's name (`node_id`): it is part of key names and log lines.
pub fn valid_node(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A value quoted in a log line, cut short: it came from Redis, and may be anything.
fn cut(s: &str) -> String {
    s.chars().take(MAX_NODE).collect()
}

/// Puts the outcomes of `origin`'s jobs (one batch of `Reply` frames) in its reply stream, or,
/// when no node of that name ever started nor runs now (no `epoch` key, which a web node makes
/// at its first start, and no lease, which a running node renews every few seconds, also after
/// Redis lost its data), in the dead letters with the reason: never into a stream nobody
/// reads. EVAL, not EVALSHA: inside the consumer's MULTI, a script missing from Redis's cache
/// would fail alone while the XACK after it goes through, and the outcome would be lost.
pub fn add_outcomes(pipe: &mut Packed, keys: &Keys, origin: &str, outcomes: &[u8]) {
    if !valid_node(origin) {
        // Only the failure of a job refused for this very origin can get here: that job is in
        // the dead letters already, with the reason, and no node can have this name.
        return;
    }
    pipe.command(9).arg(b"EVAL").arg(ADD_OUTCOMES.as_bytes()).arg(b"4");
    pipe.arg(keys.replies_of(origin).as_bytes())
        .arg(keys.epoch_of(origin).as_bytes())
        .arg(keys.lease_of(origin).as_bytes())
        .arg(keys.dead.as_bytes())
        .arg(origin.as_bytes())
        .arg(outcomes);
}

const ADD_OUTCOMES: &str = "
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
  return redis.call('XADD', KEYS[1], '*', 'b', ARGV[2])
end
return redis.call('XADD', KEYS[4], '*', 'o', ARGV[1], 'b', ARGV[2], 'why',
  'outcomes for node ' .. ARGV[1] .. ', which never started: nobody would read them')";

/// A job's outcome, for its origin node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplyEntry {
    pub task_id: u64,
    pub ok: bool,
    pub attempts: u32,
    pub task_pid: u32,
    pub replays: u32,
    /// The client's reply the task process wrote (`TaskCtx::reply`), if any.
    pub reply: Vec<u8>,
    /// `Send` frames for the origin's sessions, encoded.
    pub sends: Vec<u8>,
    /// `on_task`'s result, or why the job failed.
    pub result: Vec<u8>,
    /// Not an outcome: the job waits for a delivery retry, `reply` is its `retrying` line.
    pub retrying: bool,
}

/// The field of a reply stream entry that holds its outcomes: one entry carries every outcome
/// a consumer wrote for one origin at once (one XADD, one read and one XDEL for many jobs).
pub const OUTCOMES: &str = "b";

impl ReplyEntry {
    /// Appends this outcome to a batch, as the `Reply` frame the origin's master will get
    /// (without its stream entry id, which Redis gives the batch).
    pub fn encode(&self, batch: &mut Vec<u8>) {
        FromBridge::Reply(Reply {
            task_id: self.task_id,
            ok: self.ok,
            attempts: self.attempts,
            task_pid: self.task_pid,
            replays: self.replays,
            entry: b"",
            reply: &self.reply,
            sends: &self.sends,
            result: &self.result,
            retrying: self.retrying,
        })
        .encode(batch);
    }
}

/// The outcomes of a reply stream entry as `Reply` frames naming it, appended to `out`; an
/// error (and nothing appended) for an entry that is not a batch of outcomes: anyone who can
/// write to Redis can write one, and it must neither stay for ever nor reach the master.
pub fn outcomes_of_entry(e: &StreamEntry, out: &mut Vec<u8>) -> Result<usize, String> {
    let Some(batch) = e.get(OUTCOMES) else {
        return Err(format!("no field {OUTCOMES:?} with outcomes"));
    };
    let before = out.len();
    match outcomes_of(batch, &e.id, out) {
        Ok(0) => Err("no outcome in it".into()),
        Ok(n) => Ok(n),
        Err(why) => {
            out.truncate(before);
            Err(why)
        }
    }
}

/// The outcomes of a batch as `Reply` frames naming their stream entry `id`, appended to
/// `out`; an error if the batch is not a sequence of `Reply` frames.
pub fn outcomes_of(batch: &[u8], id: &str, out: &mut Vec<u8>) -> Result<usize, String> {
    let mut pos = 0;
    let mut count = 0;
    while pos < batch.len() {
        match FromBridge::decode(&batch[pos..]) {
            Ok(Some((FromBridge::Reply(reply), n))) => {
                // The same outcome, naming the stream entry it was read from.
                FromBridge::Reply(Reply { entry: id.as_bytes(), ..reply }).encode(out);
                pos += n;
                count += 1;
            }
            Ok(Some((other, _))) => return Err(format!("not an outcome: {other:?}")),
            Ok(None) => return Err("a truncated outcome".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields_of(cmd: &Cmd) -> StreamEntry {
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .skip(1) // the command's name
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(b.to_vec()),
                _ => None,
            })
            .collect();
        StreamEntry::with_fields("1-0", args.chunks_exact(2).map(|kv| (kv[0].clone(), kv[1].clone())))
    }

    #[test]
    fn reads_a_number_field_as_str_parse_does() {
        let cases: [&[u8]; 14] = [
            b"0",
            b"42",
            b"007",
            b"9999999999999999999",
            b"18446744073709551615",
            b"18446744073709551616",
            b"99999999999999999999",
            b"",
            b"+5",
            b"-5",
            b" 5",
            b"5 ",
            b"1e3",
            b"\xff1",
        ];
        for v in cases {
            let want = std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok());
            assert_eq!(decimal(v), want, "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn a_job_reads_back_as_written() {
        let job = JobEntry {
            origin: "web-1".into(),
            task_id: 7 << 32 | 3,
            session: 5 << 24 | 2,
            worker: 1,
            context: b"{\"to\":[\"a\"]}".to_vec(),
            data: b"{\"type\":\"email\"}".to_vec(),
            replays: 2,
            attempts: 4,
            retries: 3,
            key: Some(JobKey { hex: "6b31".into(), ttl_ms: 60_000 }),
        };
        let mut cmd = redis::cmd("XADD");
        job.add(&mut cmd);
        assert_eq!(JobEntry::parse(&fields_of(&cmd)), Some(job));
        assert_eq!(JobEntry::parse(&StreamEntry::default()), None, "a deleted entry is no job");
    }

    #[test]
    fn a_packed_xadd_is_the_xadd_of_the_jobs_fields() {
        for context in [&b""[..], b"{\"to\":[\"a\"]}"] {
            let mut cmd = redis::cmd("XADD");
            cmd.arg("{q}:jobs").arg("*");
            JobEntry::add_fields(&mut cmd, "web-1", 7 << 32 | 3, u64::MAX, u32::MAX, context, b"d\r\n");
            let mut packed = Packed::new();
            JobEntry::pack_xadd(
                &mut packed,
                "{q}:jobs",
                "web-1",
                7 << 32 | 3,
                u64::MAX,
                u32::MAX,
                context,
                b"d\r\n",
            );
            assert_eq!(packed.bytes(), cmd.get_packed_command().as_slice());
            assert_eq!(packed.len(), 1);
        }
    }

    #[test]
    fn a_job_from_redis_is_checked_before_it_runs() {
        let job = JobEntry {
            origin: "web-1".into(),
            task_id: 9,
            session: 0,
            worker: 0,
            context: Vec::new(),
            data: b"{}".to_vec(),
            replays: 0,
            attempts: 0,
            retries: 0,
            key: None,
        };
        let entry = |job: &JobEntry| {
            let mut cmd = redis::cmd("XADD");
            job.add(&mut cmd);
            fields_of(&cmd)
        };
        assert_eq!(JobEntry::checked(&entry(&job)), Ok(job.clone()));
        let forged = JobEntry { origin: "web-1\nINFO forged".into(), ..job.clone() };
        assert!(matches!(JobEntry::checked(&entry(&forged)), Err(Rejected::Invalid { .. })));
        let zero = JobEntry { task_id: 0, ..job.clone() };
        assert!(matches!(JobEntry::checked(&entry(&zero)), Err(Rejected::Invalid { .. })));
        assert!(matches!(JobEntry::checked(&StreamEntry::default()), Err(Rejected::NotAJob(_))));
        let no_data = StreamEntry::with_fields("1-0", [("o", "web-1")]);
        assert!(matches!(JobEntry::checked(&no_data), Err(Rejected::NotAJob(_))));
    }

    #[test]
    fn a_key_field_that_is_not_hex_is_no_key() {
        let entry = |k: &[u8], kt: &[u8]| {
            StreamEntry::with_fields(
                "1-0",
                [(&b"o"[..], &b"web-1"[..]), (b"t", b"9"), (b"d", b"{}"), (b"k", k), (b"kt", kt)],
            )
        };
        let job = JobEntry::parse(&entry(b"6b31", b"99999999999999999999")).unwrap();
        let key = job.key.expect("a key in hex");
        assert_eq!((key.hex.as_str(), key.ttl_ms), ("6b31", 0), "a ttl that is not a u64 is 0");
        let job = JobEntry::parse(&entry(b"6b31", b"5000000000000000")).unwrap();
        assert_eq!(job.key.unwrap().ttl_ms, super::super::dedup::TTL_MAX_MS);
        for forged in [&b"}:jobs"[..], b"6B31", b"6b3", b""] {
            assert_eq!(JobEntry::parse(&entry(forged, b"1")).unwrap().key, None);
        }
    }

    #[test]
    fn a_reply_entry_without_outcomes_is_refused() {
        let mut out = Vec::new();
        let none = StreamEntry::with_fields("1-0", [("x", "y")]);
        assert!(outcomes_of_entry(&none, &mut out).is_err());
        let empty = StreamEntry::with_fields("1-0", [(OUTCOMES, "")]);
        assert!(outcomes_of_entry(&empty, &mut out).is_err());
        let mut partly = Vec::new();
        ReplyEntry { task_id: 3, ..Default::default() }.encode(&mut partly);
        partly.extend_from_slice(b"junk");
        let bad = StreamEntry::with_fields("1-0", [(OUTCOMES.as_bytes(), partly.as_slice())]);
        assert!(outcomes_of_entry(&bad, &mut out).is_err());
        assert!(out.is_empty(), "nothing of a malformed entry reaches the master");
    }

    #[test]
    fn a_batch_of_outcomes_reads_back_with_its_entry_id() {
        let one = ReplyEntry {
            task_id: 9,
            ok: false,
            attempts: 3,
            task_pid: 1234,
            result: b"killed".to_vec(),
            ..Default::default()
        };
        let two = ReplyEntry {
            task_id: 10,
            ok: true,
            reply: b"{}\n".to_vec(),
            sends: b"\x01".to_vec(),
            ..Default::default()
        };
        let mut batch = Vec::new();
        one.encode(&mut batch);
        two.encode(&mut batch);
        let mut out = Vec::new();
        assert_eq!(outcomes_of(&batch, "5-0", &mut out), Ok(2));
        let (first, n) = FromBridge::decode(&out).unwrap().unwrap();
        assert!(
            matches!(
                first,
                FromBridge::Reply(Reply { task_id: 9, ok: false, attempts: 3, entry: b"5-0", .. })
            ),
            "{first:?}"
        );
        let (second, _) = FromBridge::decode(&out[n..]).unwrap().unwrap();
        assert!(
            matches!(
                second,
                FromBridge::Reply(Reply { task_id: 10, ok: true, reply: b"{}\n", entry: b"5-0", .. })
            ),
            "{second:?}"
        );
        assert!(outcomes_of(b"garbage!", "1-0", &mut Vec::new()).is_err());
    }
}
