//! A round of the bridge's stores as one transaction whose outcome can be learnt afterwards.
//!
//! Each round has a marker key, watched on the bridge's connection before the round is sent
//! (the previous round's pipeline ends with the WATCH of the next one's marker; a new
//! connection sends one first, [`arm`]). The round runs in `MULTI` / … / `SET marker s` /
//! `EXEC` (every key of a queue shares its hash tag, so a Cluster allows it), WAIT (when asked)
//! after EXEC. Either all of a round is stored, with its marker, or none of it. When the answer
//! is lost (a timeout, a dropped connection), [`settle`] asks Redis from a new connection: it
//! sets the marker to "abandoned" if it is absent. The marker then exists either way, and was
//! written after the WATCH: an EXEC of the round that reaches Redis only later does nothing.
//! The answer of [`settle`] stays true for good.

use redis::{ConnectionLike, RedisError, ServerError, Value};

use super::hot::HotConn;

use super::resp::Packed;

/// How long a round's marker lives: far longer than a round can wait for its answer.
pub const MARKER_TTL_MS: u64 = 120_000;
/// The marker's value when the round was stored, and when [`settle`] gave it up.
const STORED: &[u8] = b"s";
const ABANDONED: &[u8] = b"x";

/// What one try of a round came to.
pub enum Tried {
    /// Stored: the answers of the commands `kept` names, in order, then WAIT's (if asked).
    Stored(Vec<Value>),
    /// Stored, but some of its commands failed inside the transaction (each such command wrote
    /// nothing: taskd's commands of a round fail before their first write): the answers as for
    /// `Stored` (a failed command's kept answer is its error), and the failed commands by their
    /// index in the round, with their errors. The rest of the round is stored.
    Partly(Vec<Value>, Vec<(usize, RedisError)>),
    /// Nothing of it was stored (EXEC said so).
    Refused(RedisError),
    /// The answer was lost: [`settle`] tells.
    Unknown(RedisError),
}

/// Watches the marker of the next round on a connection that has none watched yet.
pub fn arm(conn: &mut HotConn, marker: &str) -> Result<(), RedisError> {
    let mut watch = Packed::new();
    watch.command(2).arg(b"WATCH").arg(marker.as_bytes());
    match exchange(conn, &watch)?.pop() {
        Some(Value::ServerError(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// A round's first command, MULTI: its commands follow, then [`attempt`] sends it.
pub fn begin() -> Packed {
    let mut round = Packed::new();
    round.command(1).arg(b"MULTI");
    round
}

/// Runs the commands of `round` (MULTI, as [`begin`] writes it, then the round's commands) as
/// one transaction with `marker` (watched already), then WAIT for `wait` replicas (at most
/// `wait_ms`), then watches `next`, the next round's marker. `kept[i]`: whether the answer of
/// command `i` is wanted. Also whether `next` is watched. `answered`: the marker of an earlier
/// round whose answer came, deleted in the transaction (nobody asks for it again), so that a
/// bridge keeps about one marker in Redis. What it writes after the round's commands is taken
/// away again: `round` is as it was, to try again.
pub fn attempt(
    conn: &mut HotConn,
    marker: &str,
    next: &str,
    answered: Option<&str>,
    round: &mut Packed,
    kept: &[bool],
    wait: Option<(u32, u64)>,
) -> (Tried, bool) {
    // Written around the round's commands, not copied with them into another buffer (some 190
    // instructions per job in the bridge, callgrind).
    let commands = round.len().saturating_sub(1);
    let mark = round.mark();
    round.command(5).arg(b"SET").arg(marker.as_bytes()).arg(STORED).arg(b"PX").number(MARKER_TTL_MS);
    if let Some(old) = answered {
        round.command(2).arg(b"DEL").arg(old.as_bytes());
    }
    round.command(1).arg(b"EXEC");
    if let Some((replicas, ms)) = wait {
        round.command(3).arg(b"WAIT").number(u64::from(replicas)).number(ms);
    }
    round.command(2).arg(b"WATCH").arg(next.as_bytes());
    // MULTI, a QUEUED for each of the round's commands and for the marker's SET: passed over.
    let n = commands + usize::from(answered.is_some());
    let sent = exchange_past(conn, round, n + 2);
    round.truncate(mark);
    match sent {
        Ok(Past::Read(mut replies)) => {
            let armed = matches!(replies.pop(), Some(Value::Okay));
            (outcome(None, replies, n, kept, wait.is_some()), armed)
        }
        // Whether the WATCH that ends the pipeline took is not known: the next round arms
        // again (a refused round is rare).
        Ok(Past::Refused(e)) => (outcome(Some(e), Vec::new(), n, kept, wait.is_some()), false),
        Err(e) => (Tried::Unknown(e), false),
    }
}

/// The replies of a pipeline past its first `skip` ones.
enum Past {
    /// Every skipped reply was no error: the others.
    Read(Vec<Value>),
    /// The first error among the skipped ones (a command refused when queued: the transaction
    /// was aborted); every reply was read.
    Refused(ServerError),
}

/// Sends `cmds` and reads the replies after the first `skip` (a transaction's MULTI and
/// QUEUED), which are only checked: each QUEUED was a String made and dropped (with the EXEC's
/// ids, most of the bridge's allocations per job, callgrind).
fn exchange_past(conn: &mut HotConn, cmds: &Packed, skip: usize) -> Result<Past, RedisError> {
    match conn {
        // Ours passes over the skipped replies, and fails with the first error among them
        // once every reply is read (a failed read fails it as such, an I/O error).
        HotConn::Own(own) => {
            return match own.req_packed_commands(cmds.bytes(), skip, cmds.len().saturating_sub(skip)) {
                Ok(replies) => Ok(Past::Read(replies)),
                Err(e) => match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<ServerError>()) {
                    Some(refusal) => Ok(Past::Refused(refusal.clone())),
                    None => Err(e),
                },
            }
        }
        HotConn::Crate(_) => {}
    }
    let mut replies = exchange(conn, cmds)?;
    let refusal = replies.drain(..skip.min(replies.len())).find_map(|v| match v {
        Value::ServerError(e) => Some(e),
        _ => None,
    });
    Ok(refusal.map_or(Past::Read(replies), Past::Refused))
}

/// Sends `cmds` and reads their replies, error replies among them, up to the first failed read
/// (the client library's own reading waits for each reply of a pipeline in turn, so a hung
/// Redis would hold a round for the reply timeout times its number of commands).
pub fn exchange(conn: &mut HotConn, cmds: &Packed) -> Result<Vec<Value>, RedisError> {
    let conn = match conn {
        // Ours stops at the first failed read, and has no pushes (RESP2).
        HotConn::Own(own) => return own.req_packed_commands(cmds.bytes(), 0, cmds.len()),
        HotConn::Crate(conn) => conn,
    };
    conn.send_packed_command(cmds.bytes())?;
    let mut replies = Vec::with_capacity(cmds.len());
    while replies.len() < cmds.len() {
        match conn.recv_response()? {
            Value::Push { .. } => {}
            v => replies.push(v),
        }
    }
    Ok(replies)
}

/// Reads the replies of [`attempt`]'s pipeline after the QUEUED ones and but the last WATCH:
/// EXEC, and WAIT if `waited`. `refused`: the first error among the replies passed over (a
/// command refused when queued), in which case `replies` is not read. `n`: the round's
/// commands, and the DEL of an answered marker (the EXEC's answers are one more, the marker's).
fn outcome(
    refused: Option<ServerError>,
    mut replies: Vec<Value>,
    n: usize,
    kept: &[bool],
    waited: bool,
) -> Tried {
    // EXECABORT: a command was refused when queued (MOVED, ASK, TRYAGAIN, OOM, NOPERM, …);
    // the first refusal says why (Redis aborts the transaction then: its EXEC is an error).
    if let Some(first) = refused {
        return Tried::Refused(first.into());
    }
    if replies.len() != 1 + usize::from(waited) {
        return Tried::Unknown(protocol("a transaction's replies are not as many as its commands"));
    }
    let wait = waited.then(|| replies.pop()).flatten();
    let Some(exec) = replies.pop() else {
        return Tried::Unknown(protocol("no EXEC reply"));
    };
    match exec {
        Value::Array(results) if results.len() == n + 1 => {
            let failed: Vec<(usize, RedisError)> = results
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::ServerError(e) => Some((i, e.clone().into())),
                    _ => None,
                })
                .collect();
            let mut answers: Vec<Value> = results
                .into_iter()
                .zip(kept.iter().chain(std::iter::repeat(&false)))
                .filter(|(_, k)| **k)
                .map(|(v, _)| v)
                .collect();
            answers.extend(wait);
            if failed.is_empty() {
                Tried::Stored(answers)
            } else {
                Tried::Partly(answers, failed)
            }
        }
        // The watched marker changed: nothing ran (only [`settle`] of this round writes it).
        Value::Nil => Tried::Refused(protocol("the round's marker changed before it was stored")),
        // An EXEC refused with no command refused before it.
        Value::ServerError(e) => Tried::Refused(e.into()),
        _ => Tried::Unknown(protocol("EXEC's reply is not the transaction's")),
    }
}

fn protocol(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::Client, "unexpected reply", what.to_string()))
}

/// Whether the round of `marker` was stored; after this, it never will be if it was not.
pub fn settle(conn: &mut HotConn, marker: &str) -> Result<bool, RedisError> {
    let mut ask = Packed::new();
    ask.command(6)
        .arg(b"SET")
        .arg(marker.as_bytes())
        .arg(ABANDONED)
        .arg(b"NX")
        .arg(b"PX")
        .number(MARKER_TTL_MS);
    ask.command(2).arg(b"GET").arg(marker.as_bytes());
    let replies = exchange(conn, &ask)?;
    if let Some(Value::ServerError(e)) = replies.iter().find(|v| matches!(v, Value::ServerError(_))) {
        return Err(e.clone().into());
    }
    replies.last().and_then(marked).ok_or_else(|| {
        RedisError::from((
            redis::ErrorKind::Client,
            "unexpected reply",
            format!("the round's marker {marker} holds a value taskd did not write"),
        ))
    })
}

/// The marker's value as [`settle`] read it: stored, abandoned, or (None) not taskd's.
fn marked(value: &Value) -> Option<bool> {
    let bytes: &[u8] = match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.as_bytes(),
        _ => return None,
    };
    match bytes {
        STORED => Some(true),
        ABANDONED => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Value {
        Value::Okay
    }

    #[test]
    fn reads_a_stored_round_with_its_kept_answers_and_wait() {
        let exec = Value::Array(vec![Value::Int(1), Value::BulkString(b"h 0 n 3".to_vec()), ok()]);
        let Tried::Stored(answers) = outcome(None, vec![exec, Value::Int(1)], 2, &[false, true], true) else {
            panic!("not stored")
        };
        assert_eq!(answers, vec![Value::BulkString(b"h 0 n 3".to_vec()), Value::Int(1)]);
    }

    fn error(text: &str) -> Value {
        redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).expect("an error reply")
    }

    fn server_error(text: &str) -> ServerError {
        match error(text) {
            Value::ServerError(e) => e,
            v => panic!("{v:?} is no error"),
        }
    }

    #[test]
    fn an_aborted_round_stored_nothing_and_says_why() {
        let Tried::Refused(e) =
            outcome(Some(server_error("MOVED 3999 127.0.0.1:7001")), Vec::new(), 1, &[true], false)
        else {
            panic!("not refused")
        };
        assert_eq!(e.code(), Some("MOVED"));
        let exec = error("EXECABORT Transaction discarded because of previous errors.");
        let Tried::Refused(e) = outcome(None, vec![exec], 1, &[true], false) else { panic!("not refused") };
        assert_eq!(e.code(), Some("EXECABORT"));
    }

    #[test]
    fn a_command_failed_inside_the_transaction_is_partly() {
        let exec = Value::Array(vec![Value::Int(1), error("WRONGTYPE Operation against a key"), ok()]);
        let Tried::Partly(answers, failed) = outcome(None, vec![exec], 2, &[true, true], false) else {
            panic!("not partly")
        };
        assert_eq!(answers.len(), 2, "the kept answers, the error among them");
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].0, failed[0].1.code()), (1, Some("WRONGTYPE")));
    }

    #[test]
    fn a_short_or_odd_reply_is_unknown() {
        assert!(matches!(outcome(None, vec![], 2, &[], false), Tried::Unknown(_)));
        assert!(matches!(outcome(None, vec![ok(), ok()], 2, &[], false), Tried::Unknown(_)));
        assert!(matches!(outcome(None, vec![Value::Int(3)], 1, &[], false), Tried::Unknown(_)));
        let short = Value::Array(vec![ok()]);
        assert!(matches!(outcome(None, vec![short], 1, &[], false), Tried::Unknown(_)));
        assert!(matches!(outcome(None, vec![Value::Nil], 1, &[], false), Tried::Refused(_)));
        assert!(matches!(outcome(None, vec![Value::Nil], 1, &[], true), Tried::Unknown(_)));
    }

    #[test]
    fn only_taskds_marker_values_are_read() {
        assert_eq!(marked(&Value::BulkString(b"s".to_vec())), Some(true));
        assert_eq!(marked(&Value::BulkString(b"x".to_vec())), Some(false));
        assert_eq!(marked(&Value::BulkString(b"s ".to_vec())), None);
        assert_eq!(marked(&Value::BulkString(vec![b's'; 1 << 20])), None);
        assert_eq!(marked(&Value::Nil), None);
        assert_eq!(marked(&Value::Int(1)), None);
    }
}
