//! What a job, a reply and a dead letter hold in their streams. Field names are short: they
//! are stored once per entry, and Redis's memory is the queue's.

use redis::Cmd;

use super::redis_io::StreamEntry;

/// A job in the job stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEntry {
    /// The node that accepted it, whose reply stream gets its outcome.
    pub origin: String,
    pub task_id: u64,
    /// The origin's client session (0: none); only the origin can reach it.
    pub session: u64,
    /// The worker slot of the origin whose `on_finish` gets the outcome.
    pub worker: u32,
    pub context: Vec<u8>,
    pub data: Vec<u8>,
    /// Replays from the dead letters so far.
    pub replays: u32,
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
    }

    /// None for an entry that is not a job (deleted, or written by something else).
    pub fn parse(e: &StreamEntry) -> Option<JobEntry> {
        Some(JobEntry {
            origin: String::from_utf8(e.get("o")?.to_vec()).ok()?,
            task_id: e.number("t")?,
            session: e.number("s").unwrap_or(0),
            worker: e.number("w").and_then(|w| u32::try_from(w).ok()).unwrap_or(0),
            context: e.bytes("c").to_vec(),
            data: e.get("d")?.to_vec(),
            replays: e.number("rp").and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        })
    }
}

/// A job's outcome in its origin's reply stream.
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
}

impl ReplyEntry {
    pub fn add(&self, cmd: &mut Cmd) {
        cmd.arg("t").arg(self.task_id).arg("k").arg(u8::from(self.ok)).arg("a").arg(self.attempts);
        cmd.arg("p").arg(self.task_pid);
        if self.replays > 0 {
            cmd.arg("rp").arg(self.replays);
        }
        if !self.reply.is_empty() {
            cmd.arg("y").arg(&self.reply);
        }
        if !self.sends.is_empty() {
            cmd.arg("s").arg(&self.sends);
        }
        cmd.arg("r").arg(&self.result);
    }

    pub fn parse(e: &StreamEntry) -> Option<ReplyEntry> {
        let small = |name| e.number(name).and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        Some(ReplyEntry {
            task_id: e.number("t")?,
            ok: e.number("k")? == 1,
            attempts: small("a"),
            task_pid: small("p"),
            replays: small("rp"),
            reply: e.bytes("y").to_vec(),
            sends: e.bytes("s").to_vec(),
            result: e.bytes("r").to_vec(),
        })
    }
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
        StreamEntry {
            id: "1-0".into(),
            fields: args.chunks_exact(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect(),
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
        };
        let mut cmd = redis::cmd("XADD");
        job.add(&mut cmd);
        assert_eq!(JobEntry::parse(&fields_of(&cmd)), Some(job));
        assert_eq!(JobEntry::parse(&StreamEntry::default()), None, "a deleted entry is no job");
    }

    #[test]
    fn a_reply_reads_back_as_written() {
        let reply = ReplyEntry {
            task_id: 9,
            ok: false,
            attempts: 3,
            task_pid: 1234,
            replays: 0,
            reply: Vec::new(),
            sends: b"\x01\x02".to_vec(),
            result: b"task process killed".to_vec(),
        };
        let mut cmd = redis::cmd("XADD");
        reply.add(&mut cmd);
        assert_eq!(ReplyEntry::parse(&fields_of(&cmd)), Some(reply));
    }
}
