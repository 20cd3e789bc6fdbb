//! The outbox: where a simulated delivery leaves its message, one JSON line per message, so
//! a user can see what was sent (the transport without `--smtp-url`, and for SMS without a
//! provider). A simulated delivery takes `simulate_ms` (or the job's own `simulate_ms`) and logs its
//! progress, as the seeds do. Every task process appends to the same file.
//!
//! A delivered job's line waits in this process until its results are about to leave it
//! ([`Outbox::commit`], from `Application::on_task_results`): a burst's lines go out in one
//! `write` (a system call per job was two thirds of taskd's), at most [`PENDING_MAX`] bytes
//! at a time. So a job's `done` never leaves before its line is in the file, and a job whose
//! line is not written whole fails instead (its `done` is turned into `failed` before it
//! leaves); a process killed first loses the lines and the results together, and its jobs run
//! again. Whole lines on an `O_APPEND` descriptor of a regular file land whole at the end of
//! the file, so lines of different processes never interleave; a short write is taken up at
//! the next whole line (see [`write_lines`]).
//!
//! Every write starts with a newline. A process killed inside a write that spans pages (SIGKILL
//! is checked between them) leaves part of a line at the end of the file, with no newline, and
//! nothing it can do about it: the next write, whoever makes it, would glue its first line to
//! that part, and a reader would lose a good line of a job that is `done`. The newline ends the
//! cut line first, in the same write, so it holds whatever the other appenders do, with no lock
//! and no system call more: one byte per burst, and an empty line where nothing was cut, which
//! readers skip (as they skip a cut line: it is not JSON). Checking the file's last byte first
//! would cost a system call per burst and still race with a process killed in between.
//! After a rotation (SIGHUP, see `logging`), each writer reopens it before its next write.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Error, Message, Receipt, Transport};
use crate::app::TaskId;
use crate::json_line::JsonLine;
use crate::mail::request::Kind;

/// Past this many bytes of lines waiting, they are written at once, before the burst ends:
/// the bound of one write, and of what a process holds.
pub const PENDING_MAX: usize = 64 * 1024;

pub struct Outbox {
    file: File,
    path: PathBuf,
    /// The log rotation the file was opened at.
    rotation: u64,
    /// The lines of jobs delivered since the last write, in the order they were delivered,
    /// after a newline (the write's first byte, see the module's doc); empty when none waits.
    pending: Vec<u8>,
    /// For each line in `pending`: its job, and where the line ends.
    lines: Vec<(TaskId, usize)>,
    /// Jobs whose lines a write made before the commit (`PENDING_MAX` reached) did not put
    /// in the file, with why: they fail at the commit.
    failed: Vec<(TaskId, String)>,
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
        Ok(Outbox {
            file,
            path: path.to_path_buf(),
            rotation,
            pending: Vec::new(),
            lines: Vec::new(),
            failed: Vec::new(),
        })
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

    /// Adds the message's line to those waiting for [`Outbox::commit`]; writes them now if
    /// they reach [`PENDING_MAX`] bytes.
    pub fn append(&mut self, message: &Message<'_>, kind: Kind, task_pid: u32) {
        let sent_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let size = 160
            + message.to.len()
            + [message.subject, message.body, message.text]
                .map(|t| t.map_or(0, str::len))
                .iter()
                .sum::<usize>();
        self.pending.reserve(size + 1);
        if self.pending.is_empty() {
            self.pending.push(b'\n');
        }
        let mut entry = JsonLine::after(std::mem::take(&mut self.pending));
        entry.num("sent_at_ms", sent_at).num("task_id", message.task_id);
        entry.num("attempt", message.attempt.into()).num("task_pid", task_pid.into());
        entry.word("type", kind.name()).str("to", message.to).opt_str("subject", message.subject);
        entry.opt_str("body", message.body).opt_str("text", message.text);
        self.pending = entry.finish();
        self.lines.push((message.task_id, self.pending.len()));
        if self.pending.len() >= PENDING_MAX {
            self.write_pending();
        }
    }

    /// Writes the lines waiting; returns the jobs whose lines are not in the file (of this
    /// write, or of one made earlier since the last commit), each with why. Call before the
    /// results of those jobs leave the process: they must fail instead.
    pub fn commit(&mut self) -> Vec<(TaskId, String)> {
        self.write_pending();
        std::mem::take(&mut self.failed)
    }

    fn write_pending(&mut self) {
        if self.lines.is_empty() {
            return;
        }
        self.follow_rotation();
        let lost = write_lines(&mut self.file, &self.pending, &self.lines);
        if !lost.is_empty() {
            let ids: Vec<String> = lost.iter().map(|&(i, _)| self.lines[i].0.to_string()).collect();
            tracing::error!(
                "cannot write to the outbox {}: {}; {} of {} jobs fail instead of done (their lines \
                 are not in it): {}",
                self.path.display(),
                lost[0].1,
                lost.len(),
                self.lines.len(),
                ids.join(", ")
            );
            self.failed.extend(lost.into_iter().map(|(i, why)| (self.lines[i].0, why)));
        }
        self.pending.clear();
        self.lines.clear();
    }
}

/// Writes `buf`, a newline and then whole lines (`lines` says where each ends), in one `write`
/// unless it is short; returns the lines not in the file whole (their indices), each with why.
///
/// Each write starts with a newline, which ends whatever the file ended in: a line another
/// process was killed in the middle of, or one of ours cut by a short write (see the module's
/// doc). A short write (a full disk, a file size limit, a signal) leaves the lines before its
/// end in the file; the rest is written again from the newline before the next whole line,
/// which is the end of the line it cut (lost: its job fails), or of the last line it wrote.
/// An error fails every line not written yet.
fn write_lines(w: &mut impl Write, buf: &[u8], lines: &[(TaskId, usize)]) -> Vec<(usize, String)> {
    debug_assert_eq!(buf.first(), Some(&b'\n'), "a burst's write starts with a newline");
    let mut lost = Vec::new();
    // The first line not written yet.
    let mut next = 0;
    while next < lines.len() {
        // The newline before it: the burst's first byte, or the last one of the line before.
        let from = if next == 0 { 0 } else { lines[next - 1].1 - 1 };
        let bytes = &buf[from..];
        let written = loop {
            match w.write(bytes) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = match written {
            Ok(n) if n == bytes.len() => return lost,
            Ok(0) => Err(io::Error::new(io::ErrorKind::WriteZero, "it took no byte")),
            Ok(n) => Ok(n),
            Err(e) => Err(e),
        };
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                lost.extend((next..lines.len()).map(|i| (i, format!("cannot write to the outbox: {e}"))));
                return lost;
            }
        };
        // Short: the bytes before `end` are in the file.
        let end = from + n;
        next += lines[next..].partition_point(|&(_, line_end)| line_end <= end);
        // Where the first line not whole in the file starts: after the newline before it.
        let line_start = if next == 0 { 1 } else { lines[next - 1].1 };
        if end > line_start {
            let len = lines[next].1 - line_start;
            let why = format!(
                "cannot write to the outbox: a short write put {} of the {len} bytes of its line in it",
                end - line_start
            );
            lost.push((next, why));
            next += 1;
        }
    }
    lost
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
        // Written with the burst's other lines, before the job's result leaves the process
        // (`Outbox::commit`): a line that is not written turns the job's `done` into `failed`.
        self.outbox.append(message, self.kind, self.task_pid);
        // Not `format!`, which grows its string twice for this: every job has an answer.
        let mut answer = String::with_capacity(label.len() + message.to.len() + 7);
        for piece in [label, ":", message.to, ", sent"] {
            answer.push_str(piece);
        }
        Ok(Receipt { answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that takes `room` more bytes in all (at most `once` in its first write, if set),
    /// then refuses every write as a full file does (EFBIG).
    struct Disk {
        file: Vec<u8>,
        room: usize,
        once: Option<usize>,
        writes: usize,
    }

    impl Disk {
        fn new(room: usize) -> Disk {
            Disk { file: Vec::new(), room, once: None, writes: 0 }
        }
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(nix::libc::EFBIG));
            }
            let n = buf.len().min(self.room).min(self.once.take().unwrap_or(usize::MAX));
            self.file.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A burst's bytes: the newline its write starts with, then four lines of 10, 20, 30 and
    /// 40 bytes, of jobs 1 to 4.
    fn four_lines() -> (Vec<u8>, Vec<(TaskId, usize)>) {
        let mut buf = vec![b'\n'];
        let mut lines = Vec::new();
        for (id, len) in [(1, 10), (2, 20), (3, 30), (4, 40)] {
            buf.extend(std::iter::repeat_n(b'a' + id as u8, len - 1));
            buf.push(b'\n');
            lines.push((id, buf.len()));
        }
        (buf, lines)
    }

    /// The lines of `file` that are whole lines of [`four_lines`], by job; the others (empty,
    /// cut, or glued to something) are not.
    fn whole_lines(file: &[u8]) -> Vec<TaskId> {
        let (buf, lines) = four_lines();
        let mut start = 1;
        let texts: Vec<(TaskId, &[u8])> = lines
            .iter()
            .map(|&(id, end)| {
                let text = (id, &buf[start..end - 1]);
                start = end;
                text
            })
            .collect();
        let whole = |line: &[u8]| texts.iter().find(|(_, text)| *text == line).map(|&(id, _)| id);
        file.split(|&b| b == b'\n').filter_map(whole).collect()
    }

    #[test]
    fn a_bursts_lines_go_out_in_one_write() {
        let (buf, lines) = four_lines();
        let mut disk = Disk::new(usize::MAX);
        assert!(write_lines(&mut disk, &buf, &lines).is_empty());
        assert_eq!((disk.writes, &disk.file), (1, &buf));
    }

    #[test]
    fn a_burst_written_after_a_line_cut_by_a_killed_process_keeps_every_line_whole() {
        let (buf, lines) = four_lines();
        // Another task process was killed inside its write: part of a line, no newline.
        let cut = br#"{"sent_at_ms":1,"task_id":99,"attempt":1,"task_pid":7,"type":"email","to":"cu"#;
        let mut disk = Disk::new(usize::MAX);
        disk.file.extend_from_slice(cut);
        assert!(write_lines(&mut disk, &buf, &lines).is_empty());
        assert_eq!(disk.file, [&cut[..], &buf].concat());
        assert_eq!(whole_lines(&disk.file), [1, 2, 3, 4]);
        // The cut line stays a line of its own, which is not JSON: a reader skips it.
        assert_eq!(disk.file.split(|&b| b == b'\n').next(), Some(&cut[..]));
    }

    #[test]
    fn a_write_cut_short_inside_a_line_loses_that_line_and_every_one_after_it_that_fails() {
        let (buf, lines) = four_lines();
        // Room for the newline, the first line and 5 bytes of the second.
        let mut disk = Disk::new(16);
        let lost = write_lines(&mut disk, &buf, &lines);
        let lost_lines: Vec<usize> = lost.iter().map(|(i, _)| *i).collect();
        assert_eq!(lost_lines, [1, 2, 3], "{lost:?}");
        assert_eq!(
            lost[0].1,
            "cannot write to the outbox: a short write put 5 of the 20 bytes of its line in it"
        );
        assert!(lost[1].1.starts_with("cannot write to the outbox: File too large"), "{lost:?}");
        assert_eq!(disk.file, buf[..16]);
        // The file ends inside a line of ours: the next burst's write ends it first.
        disk.room = usize::MAX;
        assert!(write_lines(&mut disk, &buf[..11], &lines[..1]).is_empty());
        assert_eq!(disk.file, [&buf[..16], &buf[..11]].concat());
        assert_eq!(whole_lines(&disk.file), [1, 1]);
    }

    #[test]
    fn a_write_cut_short_between_lines_loses_only_what_is_not_written() {
        let (buf, lines) = four_lines();
        let mut disk = Disk::new(31);
        let lost = write_lines(&mut disk, &buf, &lines);
        assert_eq!(lost.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 3], "{lost:?}");
        assert_eq!((&disk.file[..], disk.writes), (&buf[..31], 2));
    }

    #[test]
    fn after_a_short_write_the_rest_goes_on_from_the_next_whole_line() {
        let (buf, lines) = four_lines();
        // The first write takes 16 bytes (a signal, a quota), the next one everything.
        let mut disk = Disk { once: Some(16), ..Disk::new(usize::MAX) };
        let lost = write_lines(&mut disk, &buf, &lines);
        assert_eq!(lost.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1], "{lost:?}");
        // Line 2 is cut and ended by its own newline; lines 3 and 4 follow whole.
        assert_eq!(disk.file, [&buf[..16], &buf[30..]].concat());
        assert_eq!(buf[30], b'\n');
        assert_eq!(whole_lines(&disk.file), [1, 3, 4]);
        assert_eq!(disk.writes, 2);
    }

    #[test]
    fn lines_wait_for_the_commit_unless_they_reach_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut outbox = Outbox::open(&path).unwrap();
        let message = |task_id| Message {
            task_id,
            attempt: 1,
            to: "a@example.com",
            subject: Some("hello"),
            body: Some("a body"),
            text: None,
        };
        outbox.append(&message(1), Kind::Email, 7);
        outbox.append(&message(2), Kind::Email, 7);
        assert_eq!(std::fs::read(&path).unwrap().len(), 0, "written before the commit");
        assert!(outbox.commit().is_empty());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("\n{"), "the write starts with a newline: {text}");
        let ids: Vec<u64> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["task_id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [1, 2]);
        // Past PENDING_MAX bytes waiting, they are written without waiting for the commit.
        let mut id = 3;
        while std::fs::read(&path).unwrap().len() == text.len() {
            assert!(id < 10 + (PENDING_MAX / 100) as u64, "{} bytes waiting", outbox.pending.len());
            outbox.append(&message(id), Kind::Email, 7);
            id += 1;
        }
        assert!(outbox.pending.is_empty() && outbox.commit().is_empty());
        let written = std::fs::read(&path).unwrap().len() - text.len();
        assert!((PENDING_MAX..PENDING_MAX + 400).contains(&written), "{written} bytes in one write");
    }
}
