//! The outbox: where a simulated delivery leaves its message, one JSON line per message, so
//! a user can see what was sent. Every task process appends to the same file; each line is
//! one `write` on an `O_APPEND` descriptor, so lines of different processes never interleave.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::request::Job;

/// One delivered message, as a line of the outbox.
#[derive(Serialize)]
struct Entry<'a> {
    sent_at_ms: u64,
    task_id: u64,
    attempt: u32,
    task_pid: u32,
    #[serde(rename = "type")]
    kind: &'a str,
    to: &'a str,
    subject: Option<&'a str>,
    body: Option<&'a str>,
    text: Option<&'a str>,
}

pub struct Outbox {
    file: File,
}

impl Outbox {
    pub fn open(path: &Path) -> io::Result<Outbox> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Outbox { file })
    }

    pub fn append(&mut self, job: &Job, task_id: u64, attempt: u32, task_pid: u32) -> io::Result<()> {
        let sent_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let entry = Entry {
            sent_at_ms: sent_at,
            task_id,
            attempt,
            task_pid,
            kind: job.kind.name(),
            to: &job.to,
            subject: job.subject.as_deref(),
            body: job.body.as_deref(),
            text: job.text.as_deref(),
        };
        let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        line.push(b'\n');
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
