//! How taskd opens the files it writes (the log file, the outbox, the pid file), as root or
//! not: never through a link someone else planted, with explicit modes, and owned by the user
//! that will write them.
//!
//! The directories may be writable by the pool's user (or by anyone, like /tmp). Whoever can
//! write a directory can put a symbolic link, a hard link, a FIFO or a file of their own at
//! the name taskd is about to open. So: the last component is never followed (`O_NOFOLLOW`,
//! `O_EXCL` for a new file), what was opened is checked on the descriptor (a regular file with
//! one link: a hard link to someone else's file has two), and ownership and mode are set on the
//! descriptor (`fchown`, `fchmod`), never on the path, which may name another file by then.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::process::Credentials;

/// Logs and the outbox: the owner writes, its group reads, nobody else.
pub const LOG_MODE: u32 = 0o640;
/// The pid file: anyone may read which pid to signal.
pub const PID_MODE: u32 = 0o644;

/// Attempts at a name someone keeps replacing under us, before giving up.
const ATTEMPTS: usize = 5;

/// Opens `path` for appending; creates it with `mode` if it does not exist. With `owner` (and
/// running as root), the file is handed to that user, who will write it too.
pub fn open_append(path: &Path, mode: u32, owner: Option<Credentials>) -> io::Result<File> {
    // O_NONBLOCK: opening a FIFO planted at the name must fail (ENXIO), not block the start.
    let flags = nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY;
    let mut attempt = 0;
    let (file, created) = loop {
        attempt += 1;
        // A new file first: O_CREAT|O_EXCL never follows a link and never opens what exists.
        match OpenOptions::new().append(true).create_new(true).mode(mode).custom_flags(flags).open(path) {
            Ok(f) => break (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        match OpenOptions::new().append(true).custom_flags(flags).open(path) {
            Ok(f) => break (f, false),
            // Removed between the two opens: try again.
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < ATTEMPTS => {}
            Err(e) => return Err(explain(e)),
        }
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    if meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "it has {} hard links (a link to another file?): taskd writes only to a file with one name",
            meta.nlink()
        )));
    }
    let mut flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL)?);
    flags.remove(OFlag::O_NONBLOCK);
    fcntl(&file, FcntlArg::F_SETFL(flags))?;
    if created {
        // The mode asked for, whatever the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    if let Some(owner) = owner.filter(|_| nix::unistd::geteuid().is_root()) {
        if meta.uid() != owner.uid.as_raw() || meta.gid() != owner.gid.as_raw() {
            nix::unistd::fchown(&file, Some(owner.uid), Some(owner.gid))?;
        }
    }
    Ok(file)
}

/// Replaces `path` with `contents` atomically (a reader sees the old file or the whole new
/// one): an exclusive create of `PATH.tmp` in the same directory, then `rename`.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temporary_name(path);
    let mut attempt = 0;
    let mut file = loop {
        attempt += 1;
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NOCTTY)
            .open(&tmp);
        match opened {
            Ok(f) => break f,
            // A leftover of a crash, or a link planted at the name: unlinking removes the
            // name only (never what a link points to); then the exclusive create again.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < ATTEMPTS => {
                match std::fs::remove_file(&tmp) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(contents)
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `PATH.tmp`: next to the file, so that `rename` stays within one file system.
pub fn temporary_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Says in words what the open of an existing name refused.
fn explain(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(nix::libc::ELOOP) => {
            io::Error::other("it is a symbolic link, and taskd does not follow links to the files it writes")
        }
        Some(nix::libc::ENXIO) => io::Error::other("it is a FIFO or a socket, not a regular file"),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_gets_its_mode_whatever_the_umask_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let f = open_append(&path, LOG_MODE, None).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o7777, LOG_MODE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        drop(open_append(&path, LOG_MODE, None).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
    }

    #[test]
    fn links_and_fifos_are_refused_and_their_targets_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("secret");
        std::fs::write(&target, "secret\n").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open_append(&link, LOG_MODE, None).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let dangling = dir.path().join("dangling.log");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(open_append(&dangling, LOG_MODE, None).is_err());
        assert!(!dir.path().join("nowhere").exists());
        let hard = dir.path().join("hard.log");
        std::fs::hard_link(&target, &hard).unwrap();
        let err = open_append(&hard, LOG_MODE, None).unwrap_err();
        assert!(err.to_string().contains("hard links"), "{err}");
        let fifo = dir.path().join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(open_append(&fifo, LOG_MODE, None).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret\n");
    }

    #[test]
    fn replace_goes_around_a_link_planted_at_the_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("secret");
        std::fs::write(&target, "secret\n").unwrap();
        let path = dir.path().join("taskd.pid");
        std::os::unix::fs::symlink(&target, temporary_name(&path)).unwrap();
        replace(&path, b"42\n", PID_MODE).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "42\n");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret\n");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, PID_MODE);
        assert!(!temporary_name(&path).exists());
    }
}
