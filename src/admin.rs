//! The admin token that opens the operator's dashboard on the WebSocket port: read from
//! `admin_token_file`, or generated at start and written (0600) next to the pid file.
//!
//! The WebSocket port is reachable by every local user and every page in a browser on the
//! host (DESIGN §7): what the dashboard shows and does (pids, failures, growing the pool,
//! replaying dead letters) is for whoever can read the token's file, nobody else.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A token shorter than this is refused in a file an operator wrote: it could be guessed.
pub const MIN_LEN: usize = 16;

pub struct AdminToken {
    secret: String,
    /// Where it was read or written (named in the log, never the secret itself).
    pub path: PathBuf,
    /// Generated at this start: its file is removed on exit.
    pub generated: bool,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken").field("path", &self.path).finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub enum TokenError {
    Read(PathBuf, io::Error),
    TooShort(PathBuf),
    Write(PathBuf, io::Error),
    Random(io::Error),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Read(p, e) => write!(f, "cannot read admin_token_file {}: {e}", p.display()),
            TokenError::TooShort(p) => write!(
                f,
                "admin_token_file {} holds fewer than {MIN_LEN} characters: a token that short could be guessed",
                p.display()
            ),
            TokenError::Write(p, e) => write!(f, "cannot write the admin token to {}: {e}", p.display()),
            TokenError::Random(e) => write!(f, "cannot read /dev/urandom for an admin token: {e}"),
        }
    }
}

impl std::error::Error for TokenError {}

impl AdminToken {
    /// The operator's token (`file`), or a new one written next to `pid_file`; neither: no
    /// token, and so no dashboard (a file in whatever directory taskd was started from would
    /// be a secret left where nobody looks for it).
    pub fn load_or_generate(
        file: Option<&Path>,
        pid_file: Option<&Path>,
    ) -> Result<Option<AdminToken>, TokenError> {
        match (file, pid_file) {
            (Some(path), _) => Self::read(path).map(Some),
            (None, Some(pid_file)) => Self::generate(&generated_path(pid_file)).map(Some),
            (None, None) => Ok(None),
        }
    }

    fn read(path: &Path) -> Result<AdminToken, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|e| TokenError::Read(path.into(), e))?;
        let secret = text.trim().to_string();
        if secret.len() < MIN_LEN {
            return Err(TokenError::TooShort(path.into()));
        }
        Ok(AdminToken { secret, path: path.into(), generated: false })
    }

    fn generate(path: &Path) -> Result<AdminToken, TokenError> {
        let mut bytes = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(TokenError::Random)?;
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut contents = secret.clone().into_bytes();
        contents.push(b'\n');
        // Created anew with 0600 (a link planted at the name is not followed).
        crate::files::replace(path, &contents, 0o600).map_err(|e| TokenError::Write(path.into(), e))?;
        Ok(AdminToken { secret, path: path.into(), generated: true })
    }

    /// Whether `given` is the token, in time that does not depend on where they differ.
    pub fn matches(&self, given: &str) -> bool {
        constant_time_eq(self.secret.as_bytes(), given.as_bytes())
    }

    /// Removes a generated token's file (at exit).
    pub fn remove_generated(&self) {
        if self.generated {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `taskd.pid` → `taskd.admin-token` beside it.
pub fn generated_path(pid_file: &Path) -> PathBuf {
    pid_file.with_extension("admin-token")
}

/// Compares every byte whatever the first difference (only the length may show).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // The branch-free fold above is what matters; black_box keeps the compiler from
    // turning it into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_private_and_matches_only_itself() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("taskd-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid = dir.join("taskd.pid");
        assert!(AdminToken::load_or_generate(None, None).unwrap().is_none());
        let token = AdminToken::load_or_generate(None, Some(&pid)).unwrap().unwrap();
        assert_eq!(token.path, dir.join("taskd.admin-token"));
        let meta = std::fs::metadata(&token.path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&token.path).unwrap();
        assert!(token.matches(text.trim()));
        assert!(!token.matches(&text.trim()[1..]));
        assert!(!token.matches(""));
        let mut other = text.trim().to_string().into_bytes();
        other[10] ^= 1;
        assert!(!token.matches(std::str::from_utf8(&other).unwrap_or("x")));
        // Read back from its file, the same token; a short one is refused.
        let again = AdminToken::load_or_generate(Some(&token.path), None).unwrap().unwrap();
        assert!(again.matches(text.trim()) && !again.generated);
        std::fs::write(dir.join("short"), "abc\n").unwrap();
        let err = AdminToken::load_or_generate(Some(&dir.join("short")), None).unwrap_err();
        assert!(err.to_string().contains("fewer than 16"), "{err}");
        token.remove_generated();
        assert!(!token.path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
