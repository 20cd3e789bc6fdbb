//! Connecting to Redis, and reading stream entries out of its replies.

use std::time::Duration;

use redis::{Connection, RedisError, Value};

/// How long a command that does not block may take before the connection counts as broken.
pub const REPLY_LIMIT: Duration = Duration::from_secs(5);
const CONNECT_LIMIT: Duration = Duration::from_secs(2);

/// Opens a connection. `reply_limit` None: no client-side limit, for the connections that
/// block in XREAD/XREADGROUP (a reply timeout shorter than BLOCK would give up on a read that
/// Redis still carries out, moving entries into the pending list with nobody to run them).
pub fn connect(url: &str, reply_limit: Option<Duration>) -> Result<Connection, RedisError> {
    let client = redis::Client::open(url)?;
    let conn = client.get_connection_with_timeout(CONNECT_LIMIT)?;
    conn.set_read_timeout(reply_limit)?;
    conn.set_write_timeout(Some(REPLY_LIMIT))?;
    Ok(conn)
}

/// Whether an error means the connection is gone (reconnect), rather than a refused command.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// The Redis URL of this process, whose secrets no description of an error may show.
static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes [`describe`] scrub `url`'s passwords from what it says (the first URL given wins:
/// a process talks to one Redis).
pub fn hide_secrets_of(url: &str) {
    let _ = URL.set(url.to_string());
}

/// An error as a sentence for a person (a timed-out read shows as "Resource temporarily
/// unavailable" otherwise), without the password of the URL.
pub fn describe(e: &RedisError) -> String {
    let text = sentence(e);
    match URL.get() {
        Some(url) => super::scrub(&text, url),
        None => text,
    }
}

fn sentence(e: &RedisError) -> String {
    if e.is_timeout() {
        format!("Redis did not answer within {} s", REPLY_LIMIT.as_secs())
    } else if e.is_connection_refusal() {
        format!("Redis refused the connection ({e}): is redis-server running?")
    } else if e.is_connection_dropped() {
        format!("the connection to Redis was lost ({e})")
    } else {
        e.to_string()
    }
}

/// One entry of a stream. `fields` is empty for an entry deleted while it was pending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl StreamEntry {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice())
    }

    /// Moves a field's value out (it is left empty): no copy of a job's data.
    pub fn take(&mut self, name: &str) -> Option<Vec<u8>> {
        self.fields.iter_mut().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| std::mem::take(v))
    }

    pub fn bytes(&self, name: &str) -> &[u8] {
        self.get(name).unwrap_or_default()
    }

    pub fn number(&self, name: &str) -> Option<u64> {
        std::str::from_utf8(self.get(name)?).ok()?.parse().ok()
    }

    pub fn text(&self, name: &str) -> String {
        String::from_utf8_lossy(self.bytes(name)).into_owned()
    }
}

pub fn as_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub fn as_array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

pub fn as_text(v: Value) -> String {
    as_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

pub fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// `[[id, [field, value, ...]], ...]`, as XRANGE, XCLAIM and XAUTOCLAIM return them.
pub fn entries(v: Value) -> Vec<StreamEntry> {
    as_array(v)
        .into_iter()
        .filter_map(|item| {
            let mut parts = as_array(item).into_iter();
            let id = as_bytes(parts.next()?)?;
            let mut flat = parts.next().map(as_array).unwrap_or_default().into_iter().filter_map(as_bytes);
            let mut fields = Vec::new();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                fields.push((k, v));
            }
            Some(StreamEntry { id: String::from_utf8_lossy(&id).into_owned(), fields })
        })
        .collect()
}

/// The entries of each stream of an XREAD or XREADGROUP reply, with the stream's key; none on
/// a timeout.
pub fn read_streams(v: Value) -> Vec<(String, StreamEntry)> {
    let mut out = Vec::new();
    for stream in as_array(v) {
        let mut parts = as_array(stream).into_iter();
        let key = parts.next().map(as_text).unwrap_or_default();
        for entry in parts.next().map(entries).unwrap_or_default() {
            out.push((key.clone(), entry));
        }
    }
    out
}

/// The entries of the first (only) stream of an XREAD or XREADGROUP reply; none on a timeout.
pub fn read_entries(v: Value) -> Vec<StreamEntry> {
    let Some(first) = as_array(v).into_iter().next() else {
        return Vec::new();
    };
    let mut parts = as_array(first).into_iter();
    let _key = parts.next();
    parts.next().map(entries).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_entries_of_a_stream_reply() {
        let entry =
            Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("t"), bulk("42"), bulk("d"), bulk("{}")])]);
        let deleted = Value::Array(vec![bulk("2-0"), Value::Nil]);
        let reply =
            Value::Array(vec![Value::Array(vec![bulk("{q}:jobs"), Value::Array(vec![entry, deleted])])]);
        let got = read_entries(reply);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id, "1-0");
        assert_eq!(got[0].number("t"), Some(42));
        assert_eq!(got[0].bytes("d"), b"{}");
        assert!(got[1].fields.is_empty(), "a deleted entry has no fields");
        assert!(read_entries(Value::Nil).is_empty(), "a timed-out read has none");
    }
}
