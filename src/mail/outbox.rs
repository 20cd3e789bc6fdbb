//! The outbox: where a simulated delivery leaves its message, one JSON line per message, so
//! a user can see what was sent. Every task process appends to the same file; each line is
//! one `write` on an `O_APPEND` descriptor, so lines of different processes never interleave.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::request::Job;

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
        let mut line = json!({
            "sent_at_ms": sent_at,
            "task_id": task_id,
            "attempt": attempt,
            "task_pid": task_pid,
            "type": job.kind.name(),
            "to": job.to,
            "subject": job.subject,
            "body": job.body,
            "text": job.text,
        })
        .to_string()
        .into_bytes();
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
