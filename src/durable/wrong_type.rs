//! The job streams of a consumer that are keys of another type. Whoever can write to Redis can
//! turn `{q}:jobs#low` (or a lane's stream) into a string; a read or a claim naming it then fails
//! whole, and with it every other stream of the queue. So a consumer looks at the types of its
//! streams (on connecting, and every [`LOOK_EVERY`]), leaves the wrong ones out of its reads,
//! claims and groups, says so (once per [`SAY_EVERY`] and key), and serves them again once the
//! key is deleted or a stream again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::Connection;

/// How often the types are looked at again: how soon a mended key is served again.
const LOOK_EVERY: Duration = Duration::from_secs(3);
/// How often one wrong key is named in the log at most.
const SAY_EVERY: Duration = Duration::from_secs(60);

/// The streams found of another type, with it, and when each was last named in the log.
#[derive(Debug, Default)]
pub struct WrongTyped {
    bad: HashMap<String, (String, Option<Instant>)>,
    /// None: look before the next read.
    next_look: Option<Instant>,
}

impl WrongTyped {
    /// Looks again before the next read (a command was refused with WRONGTYPE).
    pub fn look_soon(&mut self) {
        self.next_look = None;
    }

    pub fn due(&self) -> bool {
        self.next_look.is_none_or(|at| Instant::now() >= at)
    }

    /// Whether `stream` is read (not found of another type at the last look).
    pub fn reads(&self, stream: &str) -> bool {
        !self.bad.contains_key(stream)
    }

    /// `streams` without the wrong ones.
    pub fn keep(&self, streams: Vec<String>) -> Vec<String> {
        streams.into_iter().filter(|s| self.reads(s)).collect()
    }

    /// Looks at the type of each of `streams` (one round trip) as consumer `me`. Returns those
    /// that were wrong and are not any more (deleted, or a stream again): their group is to be
    /// made again.
    pub fn look(
        &mut self,
        conn: &mut Connection,
        streams: &[String],
        me: &str,
    ) -> redis::RedisResult<Vec<String>> {
        let mut pipe = redis::pipe();
        for stream in streams {
            pipe.cmd("TYPE").arg(stream);
        }
        let types: Vec<String> = pipe.query(conn)?;
        self.next_look = Some(Instant::now() + LOOK_EVERY);
        Ok(self.learn(streams, types, me, Instant::now()))
    }

    fn learn(&mut self, streams: &[String], types: Vec<String>, me: &str, now: Instant) -> Vec<String> {
        let mut back = Vec::new();
        for (stream, kind) in streams.iter().zip(types) {
            if kind == "stream" || kind == "none" {
                if self.bad.remove(stream).is_some() {
                    tracing::info!("{me}: the job stream {stream} is no longer a key of another type; reading its jobs again");
                    back.push(stream.clone());
                }
                continue;
            }
            let (was, said) = self.bad.entry(stream.clone()).or_insert_with(|| (kind.clone(), None));
            let changed = *was != kind;
            if changed || said.is_none_or(|at| now.saturating_duration_since(at) >= SAY_EVERY) {
                *was = kind.clone();
                *said = Some(now);
                tracing::error!(
                    "{me}: the job stream {stream} is a {kind} key in Redis, not a stream (someone else wrote it): \
                     its jobs are not read, the other streams are; delete the key (or make it a stream) and \
                     it is read again within {LOOK_EVERY:?}"
                );
            }
        }
        back
    }
}

/// For an error at start: which of `streams` are keys of another type, as `KEY (a TYPE)`, when
/// `e` is Redis's WRONGTYPE (which names no key); None otherwise or when none is found.
pub fn name_them(conn: &mut Connection, streams: &[String], e: &redis::RedisError) -> Option<String> {
    if e.code() != Some("WRONGTYPE") {
        return None;
    }
    let mut pipe = redis::pipe();
    for stream in streams {
        pipe.cmd("TYPE").arg(stream);
    }
    let types: Vec<String> = pipe.query(conn).ok()?;
    let wrong: Vec<String> = streams
        .iter()
        .zip(types)
        .filter(|(_, kind)| kind != "stream" && kind != "none")
        .map(|(stream, kind)| format!("{stream} (a {kind})"))
        .collect();
    (!wrong.is_empty()).then(|| wrong.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_wrong_key_is_left_out_until_mended_and_named_once_a_minute() {
        let mut w = WrongTyped::default();
        let streams = names(&["{q}:jobs#high", "{q}:jobs", "{q}:jobs#low"]);
        let start = Instant::now();
        let back = w.learn(&streams, names(&["stream", "none", "string"]), "c", start);
        assert!(back.is_empty());
        assert_eq!(w.keep(streams.clone()), names(&["{q}:jobs#high", "{q}:jobs"]));
        assert_eq!(w.bad["{q}:jobs#low"].1, Some(start));
        // Still wrong a little later: not named again.
        w.learn(&streams, names(&["stream", "stream", "string"]), "c", start + Duration::from_secs(5));
        assert_eq!(w.bad["{q}:jobs#low"].1, Some(start));
        // A minute on: named again.
        let later = start + SAY_EVERY;
        w.learn(&streams, names(&["stream", "stream", "string"]), "c", later);
        assert_eq!(w.bad["{q}:jobs#low"].1, Some(later));
        // Deleted: read again, its group to be made.
        let back = w.learn(&streams, names(&["stream", "stream", "none"]), "c", later);
        assert_eq!(back, names(&["{q}:jobs#low"]));
        assert_eq!(w.keep(streams.clone()), streams);
    }
}
