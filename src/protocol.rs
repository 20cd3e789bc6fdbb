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

/// HTTP methods a browser (or `curl`) sends; with ` /` or ` http` after them a line is a
/// request line even without its `HTTP/1.1` tail.
const HTTP_METHODS: [&[u8]; 9] =
    [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"CONNECT", b"DELETE", b"PATCH", b"TRACE"];

/// Whether a request line is really part of an HTTP request: a request line (`POST / HTTP/1.1`,
/// `GET /x`, any `METHOD TARGET HTTP/x.y`) or a `Host:` header. A web page can make a browser
/// send one to any port (`fetch(url, {method: "POST", mode: "no-cors"})`), and its body lines
/// would be taken as requests: such a connection is closed, as Redis does.
pub fn looks_like_http(line: &[u8]) -> bool {
    match line.first() {
        Some(b'A'..=b'Z') => {}
        Some(b'h') => return line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"host:"),
        _ => return false,
    }
    if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"host:") {
        return true;
    }
    let Some(space) = memchr::memchr(b' ', line) else { return false };
    let (method, rest) = (&line[..space], &line[space + 1..]);
    if !method.iter().all(|&b| b.is_ascii_uppercase() || b == b'-') {
        return false;
    }
    let starts_ci =
        |prefix: &[u8]| rest.len() >= prefix.len() && rest[..prefix.len()].eq_ignore_ascii_case(prefix);
    if HTTP_METHODS.contains(&method)
        && (rest.starts_with(b"/") || starts_ci(b"http://") || starts_ci(b"https://"))
    {
        return true;
    }
    // METHOD TARGET HTTP/d.d, whatever the method.
    match memchr::memchr(b' ', rest) {
        Some(i) if i > 0 => {
            let version = &rest[i + 1..];
            version.len() == 8
                && version.starts_with(b"HTTP/")
                && version[5].is_ascii_digit()
                && version[6] == b'.'
                && version[7].is_ascii_digit()
        }
        _ => false,
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
    fn http_request_lines_and_host_headers_are_told_apart_from_requests() {
        for http in [
            &b"POST / HTTP/1.1"[..],
            b"GET / HTTP/1.0",
            b"GET /",
            b"GET /index.html",
            b"PUT http://127.0.0.1:9501/",
            b"CONNECT https://x",
            b"OPTIONS /x",
            b"PROPFIND /dav HTTP/1.1",
            b"Host: 127.0.0.1:9501",
            b"host:x",
            b"HOST: x",
        ] {
            assert!(looks_like_http(http), "{}", String::from_utf8_lossy(http));
        }
        for request in [
            &b"{\"type\":\"email\",\"to\":\"a@example.com\"}"[..],
            b"stats",
            b"email a@example.com hello",
            b"sms +8613800138000 upgrade to HTTP/1.1",
            b"Bob@example.com",
            b"+8613800138000",
            b"GET key",
            b"GET",
            b"",
            b"hostname",
            b"Hostile takeover",
            b"SET x HTTP/1.1x",
            b"get / http/1.1",
        ] {
            assert!(!looks_like_http(request), "{}", String::from_utf8_lossy(request));
        }
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
