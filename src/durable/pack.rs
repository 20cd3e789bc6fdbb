//! Packs: several common jobs in one entry of a pack stream (`Keys::packs`, the main stream's
//! name with `!p`), written by a bridge with `durable_pack` on. Redis's work per job goes with
//! the entries and the fields it stores and reads, not with their bytes
//! (`benches/redis_shapes.py`: 13 µs of redis-server CPU per job as one entry of five fields,
//! about 2 µs as one of 64 jobs in one field), so a pack is one field, `p`, beside its count of
//! jobs `n` (the queue's depth counts jobs).
//!
//! `p` is the byte `1` (the format's version), then each job: the count of its fields, then
//! each field's name and value, every one of them a netstring without the comma (`5:hello`).
//! A job's fields are those of a plain entry (`JobEntry::add_fields`: `o t s w [c] d`), so
//! that a job of a pack is checked as one of its own entry (`JobEntry::checked_fields`), and
//! a pack dissolved into plain entries (its consumer died, a job of it was slow, a job of it
//! was cancelled) is written field by field as it was read, by [`LUA_JOBS`] in a script.
//!
//! Anyone who can write to Redis can write a pack: it is read strictly. A pack is read up to
//! its first damaged byte; the jobs before run, what follows is named as no job. More than
//! [`MAX_JOBS`] jobs, or a job of more than [`MAX_FIELDS`] fields, is damage too.

use super::resp::Packed;

/// The pack's field of jobs.
pub const FIELD: &[u8] = b"p";
/// The pack's field of its count of jobs (read by depths and stats, not by its consumer).
pub const COUNT: &[u8] = b"n";
/// The version byte that starts a pack's jobs.
const VERSION: u8 = b'1';
/// Most jobs a pack holds (a bridge round of a busy node holds some tens).
pub const MAX_JOBS: usize = 1024;
/// Most fields of a job in a pack (a job has about a dozen; as `consumer::JOB_FIELDS_MAX`).
pub const MAX_FIELDS: usize = 64;
/// Longest count or length written (digits): a longer one is damage.
const MAX_DIGITS: usize = 10;

/// A pack being written: its jobs, encoded as they come.
#[derive(Debug, Default)]
pub struct Pack {
    blob: Vec<u8>,
    jobs: usize,
}

impl Pack {
    pub fn new() -> Pack {
        Pack::default()
    }

    /// Adds a job of the fields `JobEntry::add_fields` writes for a plain entry.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        origin: &str,
        task_id: u64,
        session: u64,
        worker: u32,
        context: &[u8],
        data: &[u8],
    ) {
        if self.blob.is_empty() {
            self.blob.push(VERSION);
        }
        self.blob.reserve(64 + origin.len() + context.len() + data.len());
        let fields = if context.is_empty() { 5 } else { 6 };
        self.number(fields);
        self.field(b"o", origin.as_bytes());
        self.number_field(b"t", task_id);
        self.number_field(b"s", session);
        self.number_field(b"w", u64::from(worker));
        if !context.is_empty() {
            self.field(b"c", context);
        }
        self.field(b"d", data);
        self.jobs += 1;
    }

    /// The jobs in it.
    pub fn len(&self) -> usize {
        self.jobs
    }

    pub fn is_empty(&self) -> bool {
        self.jobs == 0
    }

    /// Its bytes (the value of [`FIELD`]).
    pub fn bytes(&self) -> &[u8] {
        &self.blob
    }

    /// `XADD stream * n COUNT p BLOB`, packed (see `super::resp`); the pack is emptied.
    pub fn xadd(&mut self, packed: &mut Packed, stream: &str) {
        packed.command(7).arg(b"XADD").arg(stream.as_bytes()).arg(b"*");
        packed.arg(COUNT).number(self.jobs as u64).arg(FIELD).arg(&self.blob);
        self.blob.clear();
        self.jobs = 0;
    }

    fn number(&mut self, n: usize) {
        let mut digits = [0u8; 20];
        self.item(decimal(n as u64, &mut digits));
    }

    fn number_field(&mut self, name: &[u8], n: u64) {
        let mut digits = [0u8; 20];
        self.item(name);
        self.item(decimal(n, &mut digits));
    }

    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.item(name);
        self.item(value);
    }

    fn item(&mut self, bytes: &[u8]) {
        let mut digits = [0u8; 20];
        self.blob.extend_from_slice(decimal(bytes.len() as u64, &mut digits));
        self.blob.push(b':');
        self.blob.extend_from_slice(bytes);
    }
}

/// `n` in decimal digits, written at the end of `buf` (a String per number was an allocation).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A job read from a pack: its fields (name, value), in order, borrowed from the pack.
pub type Fields<'a> = Vec<(&'a [u8], &'a [u8])>;

/// The jobs of a pack's field `p`, and why the rest of it is no job, if it is damaged
/// (not a pack at all: no job, and why).
pub fn jobs(blob: &[u8]) -> (Vec<Fields<'_>>, Option<String>) {
    let mut jobs = Vec::new();
    let damage = each_job(blob, |fields| jobs.push(fields.to_vec()));
    (jobs, damage)
}

/// As [`jobs`], each job's fields lent to `visit` in turn, in one buffer for the whole pack
/// (a list per job was an allocation per job for the consumers, which read every pack).
pub fn each_job<'a>(blob: &'a [u8], mut visit: impl FnMut(&[(&'a [u8], &'a [u8])])) -> Option<String> {
    if blob.first() != Some(&VERSION) {
        return Some("not a pack of this taskd's format (its first byte is not 1)".into());
    }
    let mut r = Reader { blob, at: 1 };
    let mut fields = Vec::new();
    let mut job = 0;
    while r.at < blob.len() {
        if job == MAX_JOBS {
            return Some(format!("a pack of more than {MAX_JOBS} jobs"));
        }
        job += 1;
        let count = match r.item().and_then(|c| number(c).ok_or("a count that is not a number")) {
            Ok(n) if n <= MAX_FIELDS => n,
            Ok(n) => return Some(format!("job {job} of the pack has {n} fields, over {MAX_FIELDS}")),
            Err(why) => return Some(format!("job {job} of the pack is damaged: {why}")),
        };
        fields.clear();
        for _ in 0..count {
            match r.item().and_then(|name| Ok((name, r.item()?))) {
                Ok(field) => fields.push(field),
                Err(why) => return Some(format!("job {job} of the pack is damaged: {why}")),
            }
        }
        visit(&fields);
    }
    None
}

/// Reads the netstrings of a pack.
struct Reader<'a> {
    blob: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn item(&mut self) -> Result<&'a [u8], &'static str> {
        let rest = &self.blob[self.at..];
        // The length's digits read as they are found (a dozen items a job: one pass, not a
        // search for the colon and then a second over the digits).
        let mut len = 0usize;
        let mut colon = 0;
        loop {
            match rest.get(colon) {
                None => return Err("no length"),
                Some(b':') if colon > 0 => break,
                Some(&d) if d.is_ascii_digit() && colon < MAX_DIGITS => {
                    let n = len.checked_mul(10).and_then(|n| n.checked_add(usize::from(d - b'0')));
                    len = n.ok_or("a length that is not a number")?;
                    colon += 1;
                }
                Some(_) => return Err("a length that is not a number"),
            }
        }
        let start = colon + 1;
        let end = start.checked_add(len).filter(|&e| e <= rest.len()).ok_or("cut short")?;
        self.at += end;
        Ok(&rest[start..end])
    }
}

/// Digits as [`Pack`] writes them (no sign, no leading `+`, at most [`MAX_DIGITS`]).
fn number(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > MAX_DIGITS {
        return None;
    }
    // Read in place: some twenty of them a job, where a text check and `parse` were a third
    // of a consumer's reading of a pack.
    digits.iter().try_fold(0usize, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// A Lua function for scripts that read packs, `pack_jobs(blob)`: a table of the pack's jobs,
/// each a flat table of its fields' names and values (`XADD`'s arguments after the id), read
/// as [`jobs`] reads them (up to the first damage; a damaged job is not in it); and a second
/// value, true when the pack was damaged. Scripts start with it (`LUA_JOBS` then their own
/// text): EVAL of the two, as every script of taskd is sent.
pub const LUA_JOBS: &str = "
local function pack_jobs(blob)
  local jobs = {}
  if string.sub(blob, 1, 1) ~= '1' then return jobs, true end
  local pos = 2
  local function item()
    local colon = string.find(blob, ':', pos, true)
    if not colon or colon == pos or colon - pos > 10 then return nil end
    local digits = string.sub(blob, pos, colon - 1)
    if not string.match(digits, '^%d+$') then return nil end
    local n = tonumber(digits)
    if colon + n > #blob then return nil end
    pos = colon + n + 1
    return string.sub(blob, colon + 1, colon + n)
  end
  while pos <= #blob do
    if #jobs == 1024 then return jobs, true end
    local count = item()
    if not count or #count > 10 or not string.match(count, '^%d+$') or tonumber(count) > 64 then
      return jobs, true
    end
    local fields = {}
    for i = 1, 2 * tonumber(count) do
      local v = item()
      if not v then return jobs, true end
      fields[i] = v
    end
    jobs[#jobs + 1] = fields
  end
  return jobs, false
end
";

/// A Lua function (after [`LUA_JOBS`]) for scripts that dissolve a pack into plain entries,
/// `pack_dissolve(blob, stream, first, raise, skip_o, skip_t)`: adds the jobs of the pack
/// `blob` from its `first` on (1-based) to `stream`, each as a plain entry of its fields as
/// read, its attempts (field `a`, the first of that name) raised by `raise` (the runs of the
/// pack that died: a job alone meets `task_retry_max` by its own runs), leaving out the job of
/// origin `skip_o` and task id `skip_t` (a cancelled one; `''` and `''`: none), and any job of
/// no field (no entry of `a` alone, which no reader would take for a job). `first` and `raise`
/// are numbers (an ARGV is a string: `tonumber` it). Returns how many it added. It does not acknowledge nor delete the pack: its caller does, and only adds
/// the jobs when that acknowledged or deleted it (the pack was still its to dissolve).
pub const LUA_DISSOLVE: &str = "
local function pack_dissolve(blob, stream, first, raise, skip_o, skip_t)
  local jobs = pack_jobs(blob)
  local added = 0
  for i = first, #jobs do
    local f = jobs[i]
    local o, t, a
    for k = 1, #f, 2 do
      if f[k] == 'o' and not o then o = f[k + 1] end
      if f[k] == 't' and not t then t = f[k + 1] end
      if f[k] == 'a' and not a then a = k + 1 end
    end
    if #f > 0 and not (o == skip_o and t == skip_t) then
      if raise > 0 then
        if a then
          f[a] = tostring((tonumber(f[a]) or 0) + raise)
        else
          f[#f + 1] = 'a'
          f[#f + 1] = tostring(raise)
        end
      end
      redis.call('XADD', stream, '*', unpack(f))
      added = added + 1
    end
  end
  return added
end
";

#[cfg(test)]
mod tests {
    use super::*;

    fn fields_of(job: &Fields<'_>) -> Vec<(String, String)> {
        job.iter()
            .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    #[test]
    fn reads_back_the_jobs_it_wrote_with_the_fields_of_a_plain_entry() {
        let mut pack = Pack::new();
        pack.push("web-1", 7, 3, 1, b"", b"{\"to\":\"a\"}");
        pack.push("web-1", 8, 0, 2, b"ctx:1", b"");
        assert_eq!(pack.len(), 2);
        let (jobs, damage) = jobs(pack.bytes());
        assert_eq!(damage, None);
        assert_eq!(jobs.len(), 2);
        let want = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        };
        assert_eq!(
            fields_of(&jobs[0]),
            want(&[("o", "web-1"), ("t", "7"), ("s", "3"), ("w", "1"), ("d", "{\"to\":\"a\"}")])
        );
        assert_eq!(
            fields_of(&jobs[1]),
            want(&[("o", "web-1"), ("t", "8"), ("s", "0"), ("w", "2"), ("c", "ctx:1"), ("d", "")])
        );
        let job = crate::durable::entry::JobEntry::checked_fields(jobs[1].iter().copied()).expect("a job");
        assert_eq!((job.task_id, job.worker, job.context.as_slice()), (8, 2, &b"ctx:1"[..]));
    }

    #[test]
    fn writes_xadd_with_the_count_and_the_blob_and_empties_itself() {
        let mut pack = Pack::new();
        pack.push("n", 1, 0, 0, b"", b"x");
        let blob = pack.bytes().to_vec();
        let mut packed = Packed::new();
        pack.xadd(&mut packed, "{q}:jobs!p");
        let mut cmd = redis::cmd("XADD");
        cmd.arg("{q}:jobs!p").arg("*").arg("n").arg(1).arg("p").arg(&blob);
        let mut want = Packed::new();
        want.cmd(&cmd);
        assert_eq!(packed.bytes(), want.bytes());
        assert!(pack.is_empty() && pack.bytes().is_empty());
    }

    #[test]
    fn a_damaged_pack_gives_the_jobs_before_the_damage_and_says_why() {
        let mut pack = Pack::new();
        for t in 1..=3 {
            pack.push("web-1", t, 0, 0, b"", b"data");
        }
        let whole = pack.bytes().to_vec();
        // Every cut: the whole jobs before it, and a reason unless the cut falls between jobs.
        for cut in 2..whole.len() {
            let (got, why) = jobs(&whole[..cut]);
            assert!(got.len() < 3, "cut at {cut}");
            let (full, _) = jobs(&whole);
            assert_eq!(got[..], full[..got.len()], "cut at {cut}");
            if why.is_none() {
                assert!(!got.is_empty(), "a cut inside the first job is damage (cut at {cut})");
            }
        }
        assert_eq!(jobs(b"1"), (Vec::new(), None), "a pack of no job");
        let mut digits = [0u8; 20];
        assert_eq!(decimal(0, &mut digits), b"0");
        assert_eq!(decimal(u64::MAX, &mut digits), u64::MAX.to_string().as_bytes());
        assert_eq!(
            jobs(b"").1.as_deref(),
            Some("not a pack of this taskd's format (its first byte is not 1)")
        );
        assert!(jobs(b"1x:").1.unwrap().contains("damaged"));
        assert!(jobs(b"199999999999:").1.unwrap().contains("damaged"));
        assert!(jobs(b"12:99").1.unwrap().contains("fields, over"));
        assert!(jobs(b"11:1-1:x").1.unwrap().contains("damaged"), "a signed length");
        let (one, why) = jobs(b"11:11:o99:x");
        assert_eq!((one.len(), why.unwrap().contains("cut short")), (0, true));
    }

    #[test]
    fn more_jobs_than_the_limit_is_damage_after_the_limit() {
        let mut pack = Pack::new();
        for t in 0..=MAX_JOBS as u64 {
            pack.push("w", t + 1, 0, 0, b"", b"");
        }
        let (got, why) = jobs(pack.bytes());
        assert_eq!(got.len(), MAX_JOBS);
        assert!(why.unwrap().contains("more than"));
    }
}
