//! The client wire format of the machinery: one request per line, one JSON object per reply
//! line. Framing is pure (no I/O): "need more bytes" is `Ok(None)`, not an error.

/// The line of a buffer could not be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong {
    pub limit: usize,
}

/// Finds the first complete line of `buf`.
///
/// Returns the line without its `\n` or `\r\n` and the bytes it took, or `Ok(None)` when no
/// line ending has arrived yet. A line (or an unfinished one) longer than `max` is an error:
/// the stream cannot be re-synchronised after it.
pub fn next_line(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, LineTooLong> {
    match memchr::memchr(b'\n', buf) {
        Some(pos) => {
            let line = &buf[..pos];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max {
                return Err(LineTooLong { limit: max });
            }
            Ok(Some((line, pos + 1)))
        }
        // One more byte may be the `\r` of a `\r\n`, which does not count.
        None if buf.len() > max.saturating_add(1) => Err(LineTooLong { limit: max }),
        None => Ok(None),
    }
}

/// An `error` reply line, as the master sends it for what never reaches a worker.
pub fn error_line(message: &str) -> Vec<u8> {
    let mut line = serde_json::json!({ "event": "error", "error": message }).to_string().into_bytes();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_with_lf_or_crlf() {
        assert_eq!(next_line(b"abc\ndef", 10), Ok(Some((&b"abc"[..], 4))));
        assert_eq!(next_line(b"abc\r\n", 10), Ok(Some((&b"abc"[..], 5))));
        assert_eq!(next_line(b"\n", 10), Ok(Some((&b""[..], 1))));
        assert_eq!(next_line(b"abc", 10), Ok(None));
    }

    #[test]
    fn the_limit_counts_the_line_not_its_ending() {
        assert_eq!(next_line(b"12345\r\n", 5), Ok(Some((&b"12345"[..], 7))));
        assert_eq!(next_line(b"123456\n", 5), Err(LineTooLong { limit: 5 }));
        assert_eq!(next_line(b"12345\r", 5), Ok(None));
        assert_eq!(next_line(b"1234567", 5), Err(LineTooLong { limit: 5 }));
    }

    #[test]
    fn no_limit_does_not_overflow() {
        // Found by the fuzz target `line_framing` (input [0x0a]: max = usize::MAX).
        assert_eq!(next_line(b"", usize::MAX), Ok(None));
        assert_eq!(next_line(b"abc", usize::MAX), Ok(None));
        assert_eq!(next_line(b"abc\r\n", usize::MAX), Ok(Some((&b"abc"[..], 5))));
    }

    #[test]
    fn error_lines_are_one_json_object() {
        let line = error_line("bad \"quote\"");
        assert!(line.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["event"], "error");
        assert_eq!(v["error"], "bad \"quote\"");
    }
}
