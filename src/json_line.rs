//! The JSON lines on every job's path (`accepted`, `done`, the outbox's line), written field by
//! field into one buffer, byte for byte as `serde_json` writes the same struct: serde_json
//! looks at a string a byte at a time to escape it, and with its field-by-field machinery that
//! cost a no-op job more than anything else in its task process. Here a string is checked
//! eight bytes at a time and copied in one piece when, as nearly always, nothing in it needs
//! escaping.

/// One JSON object being written, ended by a newline: `{"event":"done",…}\n`.
pub struct JsonLine {
    out: Vec<u8>,
    /// Where the object starts in `out` (lines written before it stay as they are).
    start: usize,
}

impl JsonLine {
    /// Starts an object; `capacity` is a guess at the line's length.
    pub fn new(capacity: usize) -> Self {
        Self::after(Vec::with_capacity(capacity))
    }

    /// Starts an object at the end of `out`, which may hold other lines already (the
    /// outbox's lines waiting for their write): one buffer for all, no allocation per line.
    pub fn after(mut out: Vec<u8>) -> Self {
        let start = out.len();
        out.push(b'{');
        JsonLine { out, start }
    }

    /// Inlined into each caller, where the key is a literal: its copy is then a move of a
    /// known number of bytes, not a call to `memcpy` (a dozen keys per job, ~80 instructions
    /// each before).
    #[inline(always)]
    fn key(&mut self, key: &str) {
        // Keys are this program's own names: nothing in them needs escaping.
        self.out.reserve(key.len() + 4);
        if self.out.len() > self.start + 1 {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    #[inline(always)]
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_str(&mut self.out, value);
        self
    }

    /// A string value that is this program's own word (an event's name, a job's type):
    /// nothing in it needs escaping, so it is copied without a look at its bytes.
    #[inline(always)]
    pub fn word(&mut self, key: &str, value: &'static str) -> &mut Self {
        debug_assert_eq!(next_to_escape(value.as_bytes(), 0), value.len(), "{value:?}");
        self.key(key);
        self.out.reserve(value.len() + 2);
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
        self
    }

    /// A string, or `null`.
    #[inline(always)]
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.str(key, v),
            None => {
                self.key(key);
                self.out.extend_from_slice(b"null");
                self
            }
        }
    }

    #[inline(always)]
    pub fn num(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        push_u64(&mut self.out, value);
        self
    }

    /// The line, `}` and newline included.
    #[inline]
    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(b"}\n");
        self.out
    }
}

/// `value` in decimal.
fn push_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(decimal(value, &mut [0; 20]));
}

/// `value`'s decimal digits, written into the end of `digits` (without `core::fmt`, whose
/// machinery costs more than the digits on these lines), two at a time from a table of `00`
/// to `99`: half the divisions of one at a time (a time in ms has 13 digits).
pub fn decimal(mut value: u64, digits: &mut [u8; 20]) -> &[u8] {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
                                2021222324252627282930313233343536373839\
                                4041424344454647484950515253545556575859\
                                6061626364656667686970717273747576777879\
                                8081828384858687888990919293949596979899";
    let mut at = digits.len();
    while value >= 100 {
        let pair = (value % 100) as usize * 2;
        value /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if value >= 10 {
        let pair = value as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + value as u8;
    }
    &digits[at..]
}

/// `s` as a JSON string, quoted, escaped as serde_json escapes it: `"` and `\` with a
/// backslash, the control characters below 0x20 as `\b \t \n \f \r` or `\u00XX`; anything
/// else (DEL, every non-ASCII character) as it is.
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut copied = 0;
    let mut at = 0;
    loop {
        at = next_to_escape(bytes, at);
        let Some(&b) = bytes.get(at) else { break };
        out.extend_from_slice(&bytes[copied..at]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        at += 1;
        copied = at;
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

/// The index, from `at` on, of the first byte that JSON escapes (below 0x20, `"`, `\`), or
/// `bytes.len()`.
fn next_to_escape(bytes: &[u8], at: usize) -> usize {
    let mut at = crate::log_format::clean_words(bytes, at, b'"', b'\\');
    while at < bytes.len() && !matches!(bytes[at], 0..=0x1f | b'"' | b'\\') {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Sample<'a> {
        event: &'a str,
        task_id: u64,
        to: &'a str,
        subject: Option<&'a str>,
        body: Option<&'a str>,
    }

    fn ours(s: &Sample<'_>) -> Vec<u8> {
        let mut line = JsonLine::new(16);
        line.str("event", s.event).num("task_id", s.task_id).str("to", s.to);
        line.opt_str("subject", s.subject).opt_str("body", s.body);
        line.finish()
    }

    #[test]
    fn a_line_started_after_others_is_the_same_line_behind_them() {
        let sample = Sample { event: "done", task_id: 7, to: "a@b", subject: None, body: Some("x") };
        let mut line = JsonLine::after(b"{\"first\":1}\n".to_vec());
        line.str("event", sample.event).num("task_id", sample.task_id).str("to", sample.to);
        line.opt_str("subject", sample.subject).opt_str("body", sample.body);
        let mut expected = b"{\"first\":1}\n".to_vec();
        expected.extend_from_slice(&ours(&sample));
        assert_eq!(line.finish(), expected);
    }

    /// Random strings from an alphabet heavy in what JSON escapes (and in the bytes next to
    /// it: 0x1f, 0x20, DEL, the first bytes of multi-byte characters), at every length up to
    /// two words and beyond: the word-at-a-time scan must agree with serde_json everywhere.
    #[test]
    fn random_strings_are_written_as_serde_json_writes_them() {
        const PICKS: [char; 16] = [
            '"', '\\', '\u{0}', '\u{1f}', ' ', '\u{7f}', '\u{80}', '\u{9b}', 'é', '\u{2028}', '😀', 'a',
            '\n', '\t', '/', '\u{ff}',
        ];
        let mut rng = crate::retry::Rng::seeded(0x6a73_6f6e);
        for _ in 0..20_000 {
            let len = (rng.next_u64() % 40) as usize;
            let text: String = (0..len)
                .map(|_| match rng.next_u64() % 4 {
                    0 => char::from((rng.next_u64() % 0x80) as u8),
                    _ => PICKS[(rng.next_u64() % 16) as usize],
                })
                .collect();
            let id = match rng.next_u64() % 3 {
                0 => u64::MAX,
                1 => rng.next_u64(),
                _ => rng.next_u64() % 1000,
            };
            let sample = Sample { event: &text, task_id: id, to: &text, subject: None, body: Some(&text) };
            let mut want = serde_json::to_vec(&sample).unwrap();
            want.push(b'\n');
            assert_eq!(ours(&sample), want, "{text:?}");
        }
    }

    #[test]
    fn a_word_is_written_as_the_same_string_would_be() {
        let mut words = JsonLine::new(0);
        words.word("event", "done").num("task_id", 7).word("type", "email").str("to", "a@b");
        let mut strs = JsonLine::new(0);
        strs.str("event", "done").num("task_id", 7).str("type", "email").str("to", "a@b");
        let line = words.finish();
        assert_eq!(line, strs.finish());
        assert_eq!(line, b"{\"event\":\"done\",\"task_id\":7,\"type\":\"email\",\"to\":\"a@b\"}\n");
    }

    #[test]
    fn numbers_are_their_decimal_digits() {
        let mut rng = crate::retry::Rng::seeded(0x6e75_6d73);
        let mut cases: Vec<u64> =
            (0..1100).chain([u64::MAX, u64::MAX - 1, 1 << 63, 1_796_182_026_372]).collect();
        cases.extend((0..20).map(|k| 10u64.pow(k)).flat_map(|p| [p - 1, p, p + 1]));
        cases.extend((0..10_000).map(|_| rng.next_u64() >> (rng.next_u64() % 64)));
        for n in cases {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes(), "{n}");
        }
    }

    #[test]
    fn lines_are_what_serde_json_writes() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| format!("a{}b", b as char)).collect();
        texts.extend(
            [
                "",
                "plain@example.com",
                "quote \" and backslash \\ at 8\"",
                "ünïcödé ½ \u{a0}\u{85}\u{2028} 😀",
                "\u{1f}\u{7f}\"\"\\\\\n\r\t\u{8}\u{c}0123456789abcdef",
            ]
            .map(String::from),
        );
        for (i, text) in texts.iter().enumerate() {
            // At every offset within a word of eight.
            for pad in 0..9 {
                let to = format!("{}{text}", "x".repeat(pad));
                let sample = Sample {
                    event: "done",
                    task_id: [0, 7, u64::MAX][i % 3],
                    to: &to,
                    subject: (pad % 2 == 0).then_some(text.as_str()),
                    body: None,
                };
                let mut want = serde_json::to_vec(&sample).unwrap();
                want.push(b'\n');
                assert_eq!(String::from_utf8(ours(&sample)).unwrap(), String::from_utf8(want).unwrap());
            }
        }
    }
}
