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
    // The digits are ASCII.
    out.push_str(std::str::from_utf8(&digits[..width]).unwrap_or("??????"));
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
pub fn push_escaped(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(at) = rest.find(|c: char| c.is_control() && c != '\t') {
        out.push_str(&rest[..at]);
        let c = rest[at..].chars().next().unwrap_or('\0');
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.push_str(rest);
}

/// Writes an event's message, then its other fields as ` name=value`, escaped.
pub struct HumanFields<'a> {
    pub out: &'a mut String,
    /// Where a `Debug` value is formatted before it is escaped.
    pub scratch: String,
}

impl HumanFields<'_> {
    fn push(&mut self, field: &Field, text: &str) {
        if field.name() != "message" {
            self.out.push(' ');
            self.out.push_str(field.name());
            self.out.push('=');
        }
        push_escaped(self.out, text);
    }
}

impl Visit for HumanFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let _ = write!(scratch, "{value:?}");
        self.push(field, &scratch);
        self.scratch = scratch;
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            push_escaped(self.out, value);
        } else {
            // As Debug, quoted, as tracing-subscriber writes a str field.
            self.record_debug(field, &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    }
}
