//! The outbox: where a simulated delivery leaves its message, one JSON line per message, so
//! a user can see what was sent (the transport without `--smtp-url`, and for SMS without a
//! provider). A simulated delivery takes `simulate_ms` (or the job's own `simulate_ms`) and logs its
//! progress, as the seeds do. Every task process appends to the same file; each line is
//! one `write` on an `O_APPEND` descriptor, so lines of different processes never interleave.
//! After a rotation (SIGHUP, see `logging`), each writer reopens it before its next line.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Error, Message, Receipt, Transport};
use crate::json_line::JsonLine;
use crate::mail::request::Kind;

pub struct Outbox {
    file: File,
    path: PathBuf,
    /// The log rotation the file was opened at.
    rotation: u64,
}

impl Outbox {
    /// Opens (or creates, mode 0640) the outbox for appending, as the user this process runs
    /// as; a link planted at its name is refused (see `files`).
    pub fn open(path: &Path) -> io::Result<Outbox> {
        Self::open_for(path, None)
    }

    /// Like [`Outbox::open`], by root for the pool's user: the file is handed to `owner`.
    pub fn open_for(path: &Path, owner: Option<crate::process::Credentials>) -> io::Result<Outbox> {
        let rotation = crate::logging::rotation();
        let file = crate::files::open_append(path, crate::files::LOG_MODE, owner)?;
        Ok(Outbox { file, path: path.to_path_buf(), rotation })
    }

    /// After a rotation, the file now at the path; the old one (and an error in the log) when
    /// that cannot be opened.
    fn follow_rotation(&mut self) {
        let rotation = crate::logging::rotation();
        if rotation == self.rotation {
            return;
        }
        self.rotation = rotation;
        match crate::files::open_append(&self.path, crate::files::LOG_MODE, None) {
            Ok(file) => self.file = file,
            Err(e) => tracing::error!(
                "cannot reopen the outbox {} after a rotation: {e}; still appending to the old file",
                self.path.display()
            ),
        }
    }

    /// This outbox as the transport of one job of `kind`, whose simulated delivery takes `delay`
    /// (a job's own `simulate_ms`, else the server's), run by task process `task_pid`.
    pub fn for_job(&mut self, kind: Kind, delay: Duration, task_pid: u32) -> OutboxDelivery<'_> {
        OutboxDelivery { outbox: self, kind, delay, task_pid }
    }

    pub fn append(&mut self, message: &Message<'_>, kind: Kind, task_pid: u32) -> io::Result<()> {
        self.follow_rotation();
        let sent_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let size = 160
            + message.to.len()
            + [message.subject, message.body, message.text]
                .map(|t| t.map_or(0, str::len))
                .iter()
                .sum::<usize>();
        let mut entry = JsonLine::new(size);
        entry.num("sent_at_ms", sent_at).num("task_id", message.task_id);
        entry.num("attempt", message.attempt.into()).num("task_pid", task_pid.into());
        entry.str("type", kind.name()).str("to", message.to).opt_str("subject", message.subject);
        entry.opt_str("body", message.body).opt_str("text", message.text);
        let line = entry.finish();
        // One write call per line: O_APPEND makes it land whole at the end of the file.
        let n = self.file.write(&line)?;
        if n != line.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write to the outbox ({n} of {} bytes)", line.len()),
            ));
        }
        Ok(())
    }
}

/// The outbox delivering one job: a [`Transport`] that simulates the delivery's time, then
/// appends the message.
pub struct OutboxDelivery<'a> {
    outbox: &'a mut Outbox,
    kind: Kind,
    delay: Duration,
    task_pid: u32,
}

impl Transport for OutboxDelivery<'_> {
    fn send(&mut self, message: &Message<'_>) -> Result<Receipt, Error> {
        let (label, what) = match self.kind {
            Kind::Email => ("Email", "email"),
            Kind::Sms => ("SMS", "SMS"),
        };
        let id = message.task_id;
        if self.delay.is_zero() {
            tracing::debug!("job {id}: {what} to {}", message.to);
        } else {
            tracing::info!("job {id}: sending {what} to {} (attempt {})", message.to, message.attempt);
            // Progress in steps, as the seeds print it ("Task N 已完成了 i/5 的任务").
            let steps = 5u32;
            for i in 1..=steps {
                std::thread::sleep(self.delay / steps);
                tracing::info!("job {id}: {i}/{steps} done");
            }
        }
        self.outbox
            .append(message, self.kind, self.task_pid)
            .map_err(|e| Error::Permanent { message: format!("cannot write to the outbox: {e}") })?;
        // Not `format!`, which grows its string twice for this: every job has an answer.
        let mut answer = String::with_capacity(label.len() + message.to.len() + 7);
        for piece in [label, ":", message.to, ", sent"] {
            answer.push_str(piece);
        }
        Ok(Receipt { answer })
    }
}
