//! Fuzzes `taskd::protocol::next_line`, the master's framing of client request lines.
//!
//! How to run (from the crate root; needs `cargo install cargo-fuzz` and a nightly toolchain):
//!
//!     cargo +nightly fuzz run line_framing -- -max_total_time=220
//!
//! A crash is saved under `fuzz/artifacts/line_framing/`; replay it with
//! `cargo +nightly fuzz run line_framing fuzz/artifacts/line_framing/crash-…` and shrink it with
//! `cargo +nightly fuzz tmin line_framing fuzz/artifacts/line_framing/crash-…`.
//!
//! Input: the first bytes choose `max` (see [`split_limit`]), the rest is the stream. Lines are
//! taken one after another, as the master does, until the stream needs more bytes or is an error.

#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::protocol::{next_line, LineTooLong};

/// Reads `max` from the front of the input. The first byte picks a range, so that small limits
/// (where lines hit them often) and the extremes of `usize` are all reached quickly.
fn split_limit(data: &[u8]) -> (usize, &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return (0, data);
    };
    match mode % 4 {
        // 0..=255: most lines meet the limit.
        0 => match rest.split_first() {
            Some((&b, rest)) => (b as usize, rest),
            None => (0, rest),
        },
        // 0..=65535, little endian.
        1 if rest.len() >= 2 => (u16::from_le_bytes([rest[0], rest[1]]) as usize, &rest[2..]),
        // Within 255 of usize::MAX: "no limit" as a caller may spell it.
        2 => match rest.split_first() {
            Some((&b, rest)) => (usize::MAX - b as usize, rest),
            None => (usize::MAX, rest),
        },
        // Any usize (little endian u64).
        3 if rest.len() >= 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[..8]);
            (u64::from_le_bytes(b) as usize, &rest[8..])
        }
        _ => (mode as usize, rest),
    }
}

/// The first line of `buf` as the contract defines it: up to the first `\n`, without it and
/// without one `\r` before it.
fn reference_line(buf: &[u8]) -> Option<&[u8]> {
    let pos = buf.iter().position(|&b| b == b'\n')?;
    let line = &buf[..pos];
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

fuzz_target!(|data: &[u8]| {
    let (max, mut rest) = split_limit(data);
    loop {
        match next_line(rest, max) {
            Ok(Some((line, used))) => {
                assert!(used > 0, "a line took no bytes");
                assert!(used <= rest.len(), "took {used} of {} bytes", rest.len());
                assert!(!line.contains(&b'\n'), "a line holds a \\n");
                assert!(line.len() <= max, "line of {} bytes passed limit {max}", line.len());
                // The line is the front of the buffer, followed by exactly its ending.
                assert_eq!(line, &rest[..line.len()]);
                let ending = &rest[line.len()..used];
                assert!(ending == b"\n" || ending == b"\r\n", "line ending {ending:?}");
                assert_eq!(Some(line), reference_line(rest));
                // Arriving in pieces, an accepted line is never an error before its `\n` comes.
                assert_eq!(next_line(&rest[..used - 1], max), Ok(None), "prefix of an accepted line");
                rest = &rest[used..];
            }
            Ok(None) => {
                assert!(!rest.contains(&b'\n'), "a complete line was not returned");
                // What waits for more bytes may still become a line within the limit (one more
                // byte may be the `\r` of a `\r\n`).
                assert!(rest.len() <= max.saturating_add(1), "{} bytes kept under limit {max}", rest.len());
                break;
            }
            Err(LineTooLong { limit }) => {
                assert_eq!(limit, max);
                match reference_line(rest) {
                    Some(line) => assert!(line.len() > max, "line of {} bytes refused", line.len()),
                    None => assert!(
                        rest.len() > max.saturating_add(1),
                        "unfinished line of {} bytes refused under limit {max}",
                        rest.len()
                    ),
                }
                break;
            }
        }
    }
});
