//! The human log line, `2026-12-02T03:47:06.372884Z  INFO worker 0[16566]: message k=v`, built
//! without per-character formatting: at the default level every job logs two lines in its
//! worker, and tracing-subscriber's own formatter (a time formatted digit by digit, every
//! message streamed through an escaping writer one `char` at a time) cost a worker more than
//! the job itself.
//!
//! Control characters in a message or a field are written escaped (`\n` as `\n`, ESC as
//! `\x1b`, C1 codes as `\u{9b}`), so text a client sent cannot forge a log line or drive the
//! terminal of whoever reads the log.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};

/// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` for `now`, in UTC.
pub fn timestamp(now: SystemTime, out: &mut String) {
    thread_local! {
        /// The second last formatted and its `YYYY-MM-DDTHH:MM:SS`: lines come many per second.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != secs {
            let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
            let s = secs % 86_400;
            cell.1.clear();
            let _ = write!(cell.1, "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
            cell.0 = secs;
        }
        out.push_str(&cell.1);
    });
    out.push('.');
    push_digits(out, since.subsec_micros(), 6);
    out.push('Z');
}

/// `value` in exactly `width` decimal digits (the low ones).
fn push_digits(out: &mut String, mut value: u32, width: usize) {
    let mut digits = [b'0'; 10];
    for slot in digits[..width].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
    push_ascii(out, &digits[..width]);
}

/// ASCII digits, a `char` each: checking them as UTF-8 (`from_utf8`) cost more than copying.
fn push_ascii(out: &mut String, digits: &[u8]) {
    out.reserve(digits.len());
    for &d in digits {
        out.push(char::from(d));
    }
}

/// `value` in decimal, without `core::fmt`.
pub fn push_u64(out: &mut String, value: u64) {
    push_ascii(out, crate::json_line::decimal(value, &mut [0; 20]));
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Appends `text`, escaping the control characters in it.
///
/// Scanned by bytes, not by `char`s: in UTF-8 a control character is a byte below 0x20, 0x7f,
/// or 0xc2 followed by 0x80..=0x9f (C1), and no other character contains those sequences. A
/// line is mostly plain text, looked at eight bytes at a time and copied in one piece.
pub fn push_escaped(out: &mut String, text: &str) {
    let bytes = text.as_bytes();
    let mut copied = 0;
    let mut at = 0;
    loop {
        at = next_suspect(bytes, at);
        let Some(&b) = bytes.get(at) else { break };
        let (code, len) = match (b, bytes.get(at + 1)) {
            (b'\t', _) | (0xc2, None) => (None, 1),
            (0xc2, Some(&next)) => ((0x80..=0x9f).contains(&next).then_some(u32::from(next)), 2),
            (b, _) => (Some(u32::from(b)), 1),
        };
        let Some(code) = code else {
            at += 1;
            continue;
        };
        // `copied..at` and `at + len..` fall on character boundaries: what matched above is a
        // whole character.
        out.push_str(&text[copied..at]);
        match code {
            0x0a => out.push_str("\\n"),
            0x0d => out.push_str("\\r"),
            c if c < 0x80 => {
                let _ = write!(out, "\\x{c:02x}");
            }
            c => {
                let _ = write!(out, "\\u{{{c:x}}}");
            }
        }
        at += len;
        copied = at;
    }
    out.push_str(&text[copied..]);
}

/// The index, from `at` on, of the first byte below 0x20, 0x7f or 0xc2 (the bytes a control
/// character may start with), or `bytes.len()`.
fn next_suspect(bytes: &[u8], at: usize) -> usize {
    let mut at = clean_words(bytes, at, 0x7f, 0xc2);
    while at < bytes.len() && !matches!(bytes[at], 0..=0x1f | 0x7f | 0xc2) {
        at += 1;
    }
    at
}

/// Skips, from `at`, whole 8-byte words with no byte below 0x20 and none equal to `a` or `b`:
/// the index of the first word that has one (or of the last, short, stretch). The callers look
/// at the bytes from there one by one. Shared by the log line's and the JSON line's escaping.
#[inline]
pub(crate) fn clean_words(bytes: &[u8], mut at: usize, a: u8, b: u8) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Whether any byte of a word is zero (exact as a yes or no), the classic bit trick.
    let zero_byte = |w: u64| w.wrapping_sub(ONES) & !w & HIGH != 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // A byte below 0x20 (exact for any bound up to 0x80); a byte equal to `a` or `b`.
        let low = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0;
        if low || zero_byte(w ^ (ONES * u64::from(a))) || zero_byte(w ^ (ONES * u64::from(b))) {
            break;
        }
        at += 8;
    }
    at
}

/// A `fmt::Write` that escapes what is written to it into a line: a value's `Debug` goes
/// into the line directly, without a copy made first.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        push_escaped(self.0, s);
        Ok(())
    }
}

/// Writes an event's message, then its other fields as ` name=value`, escaped.
pub struct HumanFields<'a> {
    pub out: &'a mut String,
}

impl HumanFields<'_> {
    fn name(&mut self, field: &Field) {
        if field.name() != "message" {
            self.out.push(' ');
            self.out.push_str(field.name());
            self.out.push('=');
        }
    }
}

impl Visit for HumanFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.name(field);
        let _ = write!(Escaping(self.out), "{value:?}");
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            push_escaped(self.out, value);
        } else {
            // As Debug, quoted, as tracing-subscriber writes a str field.
            self.record_debug(field, &value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        let _ = write!(self.out, "{value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 99, 100, 4_294_967_295, u64::MAX] {
            let mut out = String::from("x");
            push_u64(&mut out, n);
            assert_eq!(out, format!("x{n}"));
        }
    }

    #[test]
    fn timestamps_match_rfc_3339_in_utc() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400_000_007, "2000-02-29T00:00:00.000007Z"),
            (1_796_182_026_372_884, "2026-12-02T03:27:06.372884Z"),
            (4_107_542_399_999_999, "2100-02-28T23:59:59.999999Z"),
        ];
        for (micros, want) in cases {
            let mut out = String::new();
            timestamp(UNIX_EPOCH + Duration::from_micros(micros), &mut out);
            assert_eq!(out, want);
            // A second line in the same second reuses the cached part.
            out.clear();
            timestamp(UNIX_EPOCH + Duration::from_micros(micros), &mut out);
            assert_eq!(out, want);
        }
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let mut out = String::new();
        push_escaped(&mut out, "a\nb\r\x1b[31m\tü\u{9b}\x7f end");
        assert_eq!(out, "a\\nb\\r\\x1b[31m\tü\\u{9b}\\x7f end");
        // U+00A0 and U+0100 share a byte with C1 codes (0xc2, 0x80) but are not control
        // characters; U+0085 (next line) is.
        out.clear();
        push_escaped(&mut out, "\u{a0}\u{100}\u{85}\u{9f}x\0");
        assert_eq!(out, "\u{a0}\u{100}\\u{85}\\u{9f}x\\x00");
        // Every position in and around a word of eight, and text with no control at all.
        let plain = "abcdefghijklmnopqrstuvwxyz ÄÖÜ ½ \u{a0}.";
        for at in 0..20 {
            let text = format!("{}\x1b{}\u{9b}", &plain[..at], &plain[at..]);
            out.clear();
            push_escaped(&mut out, &text);
            assert_eq!(out, format!("{}\\x1b{}\\u{{9b}}", &plain[..at], &plain[at..]));
        }
        out.clear();
        push_escaped(&mut out, plain);
        assert_eq!(out, plain);
    }
}
