//! Reading a client's request line: the JSON forms, the typed-by-hand forms and the bare
//! address or number of the seeds. Every way a line can be wrong has its own sentence.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::app::Priority;
use crate::json_line::JsonLine;

/// Longest email subject accepted (RFC 5322 caps a header line at 998 characters).
pub const MAX_SUBJECT: usize = 998;
/// Longest SMS text accepted (ten concatenated 160-character segments).
pub const MAX_SMS_TEXT: usize = 1600;
/// Most jobs in one batch.
pub const MAX_BATCH: usize = 100;
/// Longest email body by default (bytes): a job's payload is held in the master until it is
/// done, so its size is a memory budget (`email_body_max`).
pub const DEFAULT_EMAIL_BODY_MAX: usize = 1024 * 1024;
/// Longest simulated delivery a job may ask for.
pub const MAX_SIMULATE_MS: u64 = 3_600_000;
/// Furthest ahead a job may be scheduled (`run_at`, `run_in_ms`): a year and a day. A waiting
/// job is held in the master's memory, within `task_queue_max`.
pub const MAX_RUN_AHEAD_MS: u64 = 366 * 24 * 3_600_000;
/// Longest deduplication key, in bytes.
pub const MAX_KEY: usize = 200;

/// Refuses a job whose `simulate_ms` is longer than `task_timeout` (`limit`, if set): it would
/// be killed before it finishes, and run again until it fails, holding a task process each time.
pub fn check_delay(job: &Job, limit: Option<std::time::Duration>) -> Result<(), String> {
    match (job.simulate_ms, limit) {
        (Some(ms), Some(limit)) if u128::from(ms) > limit.as_millis() => Err(format!(
            "field \"simulate_ms\" ({ms} ms) is longer than the server's task_timeout ({} ms): \
             the job would be killed before it finishes",
            limit.as_millis()
        )),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Email,
    Sms,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Sms => "sms",
        }
    }
}

/// One message to deliver: what a task process receives as its task data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    #[serde(rename = "type")]
    pub kind: Kind,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// How long its simulated delivery takes (`delay_ms` before: a job stored in Redis by an
    /// older node still reads).
    #[serde(default, alias = "delay_ms", skip_serializing_if = "Option::is_none")]
    pub simulate_ms: Option<u64>,
    /// Run it on this task process (`task_to`); any idle one if absent.
    #[serde(default, skip_serializing)]
    pub task_worker: Option<u32>,
    /// Not before this time (Unix ms, from `run_at` or `run_in_ms`): for the master, not the
    /// task process.
    #[serde(skip)]
    pub run_at_ms: Option<u64>,
    #[serde(skip)]
    pub priority: Priority,
    /// Deduplication key (`key`).
    #[serde(skip)]
    pub key: Option<String>,
}

impl Job {
    /// A job to `to` with no optional field set.
    pub fn to(kind: Kind, to: String) -> Job {
        Job {
            kind,
            to,
            subject: None,
            body: None,
            text: None,
            simulate_ms: None,
            task_worker: None,
            run_at_ms: None,
            priority: Priority::Normal,
            key: None,
        }
    }

    /// The job as task data: what `serde_json::to_vec` writes for it, byte for byte, written
    /// field by field (`json_line`), as every job is on its way to a task process.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = Vec::new();
        self.to_json_into(&mut json);
        json
    }

    /// [`Job::to_json`], written at the end of `out`.
    pub fn to_json_into(&self, out: &mut Vec<u8>) {
        let size = 48
            + self.to.len()
            + [&self.subject, &self.body, &self.text]
                .map(|t| t.as_ref().map_or(0, String::len))
                .iter()
                .sum::<usize>();
        out.reserve(size);
        let mut line = JsonLine::after(std::mem::take(out));
        line.word("type", self.kind.name()).str("to", &self.to);
        for (key, value) in [("subject", &self.subject), ("body", &self.body), ("text", &self.text)] {
            if let Some(value) = value {
                line.str(key, value);
            }
        }
        if let Some(ms) = self.simulate_ms {
            line.num("simulate_ms", ms);
        }
        *out = line.finish();
        // `finish` ends a line; task data is the object alone.
        out.pop();
    }

    /// A job from task data: what `serde_json::from_slice` reads, and its error for data that
    /// is not a job. Data as [`Job::to_json`] writes it, with no escape in its strings, is read
    /// here in one pass; anything else (another order of fields, an escape, a space, an older
    /// node's `delay_ms`) by serde_json.
    pub fn from_json(data: &[u8]) -> Result<Job, serde_json::Error> {
        match Self::from_plain_json(data) {
            Some(job) => Ok(job),
            None => serde_json::from_slice(data),
        }
    }

    /// [`Job::from_json`]'s one pass: None for anything but `to_json`'s form without escapes.
    fn from_plain_json(data: &[u8]) -> Option<Job> {
        let mut rest = data.strip_prefix(b"{\"type\":")?;
        let kind = match plain_string(&mut rest)? {
            "email" => Kind::Email,
            "sms" => Kind::Sms,
            _ => return None,
        };
        rest = rest.strip_prefix(b",\"to\":")?;
        let mut job = Job::to(kind, plain_string(&mut rest)?.to_string());
        // The optional fields, each at most once and in the order `to_json` writes them.
        let mut next = 0;
        while let Some(after) = rest.strip_prefix(b",\"") {
            let end = after.iter().position(|&b| b == b'"')?;
            let key = &after[..end];
            rest = after[end..].strip_prefix(b"\":")?;
            let at =
                ["subject".as_bytes(), b"body", b"text", b"simulate_ms"].iter().position(|k| *k == key)?;
            if at < next {
                return None;
            }
            next = at + 1;
            match at {
                0 => job.subject = Some(plain_string(&mut rest)?.to_string()),
                1 => job.body = Some(plain_string(&mut rest)?.to_string()),
                2 => job.text = Some(plain_string(&mut rest)?.to_string()),
                _ => job.simulate_ms = Some(plain_number(&mut rest)?),
            }
        }
        (rest == b"}").then_some(job)
    }

    /// Whether it asks for a time, a priority or a key (which the master acts on).
    pub fn scheduled(&self) -> bool {
        self.run_at_ms.is_some() || self.priority != Priority::Normal || self.key.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Job(Job),
    Batch(Vec<Job>),
    Stats,
    /// `{"type":"result","task_id":N}`: what became of a job submitted earlier.
    Result(u64),
    /// `{"type":"cancel","task_id":N}`: take back a job of this connection not started yet;
    /// with `"token"` (`taskd cancel N`), any connection's.
    Cancel(u64, Option<String>),
    /// A job of a type an external handler runs (`--handler`): the object as the client sent
    /// it, which only the handler reads.
    Handled {
        kind: String,
        job: Map<String, Value>,
    },
}

/// A JSON string at the start of `rest` with nothing escaped in it (no `\\`, no control
/// character), whose bytes are its text; `rest` is left after it. None for any other.
fn plain_string<'a>(rest: &mut &'a [u8]) -> Option<&'a str> {
    let body = rest.strip_prefix(b"\"")?;
    let end = body.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    if body[end] != b'"' {
        return None;
    }
    let text = std::str::from_utf8(&body[..end]).ok()?;
    *rest = &body[end + 1..];
    Some(text)
}

/// A JSON number at the start of `rest` that is a u64 written as serde_json writes one (digits,
/// no leading zero); `rest` is left after it. None for any other.
fn plain_number(rest: &mut &[u8]) -> Option<u64> {
    let len = rest.iter().position(|b| !b.is_ascii_digit()).unwrap_or(rest.len());
    let digits = &rest[..len];
    if digits.is_empty()
        || (digits[0] == b'0' && len > 1)
        || matches!(rest.get(len), Some(b'.' | b'e' | b'E'))
    {
        return None;
    }
    let mut value: u64 = 0;
    for &d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    *rest = &rest[len..];
    Some(value)
}

/// The field limits the operator sets; the others are fixed by the standards above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLimits {
    /// Longest email body, in bytes.
    pub email_body_max: usize,
}

impl Default for FieldLimits {
    fn default() -> Self {
        FieldLimits { email_body_max: DEFAULT_EMAIL_BODY_MAX }
    }
}

const HELP: &str = "expected an email address, a phone number, `email ADDRESS [text]`, `sms NUMBER [text]`, \
a JSON job such as {\"type\":\"email\",\"to\":\"a@example.com\"}, `stats`, or {\"type\":\"result\",\"task_id\":N}";

/// Reads one request line (without its line ending), with the default field limits.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    parse_with(line, &FieldLimits::default())
}

/// Reads one request line (without its line ending).
pub fn parse_with(line: &[u8], limits: &FieldLimits) -> Result<Request, String> {
    parse_for(line, limits, &[])
}

/// Reads one request line; a JSON job whose type is one of `handled` (the types with an
/// external handler, which may override "email" or "sms") is taken as it is, for its handler.
pub fn parse_for(line: &[u8], limits: &FieldLimits, handled: &[String]) -> Result<Request, String> {
    let line = std::str::from_utf8(line)
        .map_err(|e| format!("request is not valid UTF-8 (invalid byte at offset {})", e.valid_up_to()))?;
    if line.contains('\0') {
        return Err("request contains a NUL byte".into());
    }
    let line = line.trim();
    if line.is_empty() {
        return Err(format!("empty request: {HELP}"));
    }
    if line.starts_with('{') || line.starts_with('[') || line.starts_with('"') {
        return parse_json(line, limits, handled);
    }
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (line, ""),
    };
    // Compared without making a lower-case copy: for a bare address the word is the address.
    let is = |command: &str| word.eq_ignore_ascii_case(command);
    match word {
        _ if is("stats") && rest.is_empty() => Ok(Request::Stats),
        _ if is("email") => {
            let (to, text) = split_word(rest);
            if to.is_empty() {
                return Err("`email` needs an address: email ADDRESS [text]".into());
            }
            let to = valid_email(to)?;
            check_body(text, limits)?;
            let body = (!text.is_empty()).then(|| text.to_string());
            Ok(Request::Job(Job { body, ..Job::to(Kind::Email, to) }))
        }
        _ if is("sms") => {
            let (to, text) = split_word(rest);
            if to.is_empty() {
                return Err("`sms` needs a phone number: sms NUMBER [text]".into());
            }
            let to = valid_phone(to)?;
            let text = (!text.is_empty()).then(|| text.to_string());
            check_sms_text(text.as_deref())?;
            Ok(Request::Job(Job { text, ..Job::to(Kind::Sms, to) }))
        }
        _ if rest.is_empty() && word.contains('@') => {
            Ok(Request::Job(Job::to(Kind::Email, valid_email(word)?)))
        }
        _ if rest.is_empty() && looks_like_phone(word) => {
            Ok(Request::Job(Job::to(Kind::Sms, valid_phone(word)?)))
        }
        _ => Err(format!("cannot read this request: {HELP}")),
    }
}

fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (s, ""),
    }
}

fn parse_json(line: &str, limits: &FieldLimits, handled: &[String]) -> Result<Request, String> {
    let Strict(value) = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err(format!("a JSON request must be an object, not {}", type_name(&value)));
    };
    match obj.get("type") {
        None => Err("missing field \"type\": use \"email\", \"sms\" or \"batch\"".into()),
        Some(Value::String(t)) if t == "batch" => parse_batch(&obj, limits),
        Some(Value::String(t)) if t == "result" => parse_task_id(&obj, "a result query").map(Request::Result),
        Some(Value::String(t)) if t == "cancel" => parse_cancel(obj),
        Some(Value::String(t)) if handled.contains(t) => Ok(Request::Handled { kind: t.clone(), job: obj }),
        Some(Value::String(t)) if !handled.is_empty() && t != "email" && t != "sms" => {
            let mut known: Vec<String> = ["email", "sms"].iter().map(|k| format!("{k:?}")).collect();
            known.extend(handled.iter().filter(|k| *k != "email" && *k != "sms").map(|k| format!("{k:?}")));
            Err(format!("unknown type {}: known types are {}, or \"batch\"", quoted(t), known.join(", ")))
        }
        Some(_) => parse_job(&obj, limits).map(Request::Job),
    }
}

/// A JSON value whose objects name each key once. serde_json keeps the last of a key given
/// twice (`"to"` twice: the job would go to the second address without a word); this refuses
/// it. Built in one pass, as `Value` itself is, so it costs the hot path nothing more.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "the key {} is given twice (a JSON object names each key once)",
                    quoted(&key)
                )));
            }
            let Strict(v) = map.next_value()?;
            obj.insert(key, v);
        }
        Ok(Value::Object(obj))
    }
}

/// `{"type":"cancel","task_id":N}`, with the operator's `"token"` if `taskd cancel` sent it.
fn parse_cancel(mut obj: Map<String, Value>) -> Result<Request, String> {
    let token = match obj.remove("token") {
        None => None,
        Some(Value::String(t)) => Some(t),
        Some(other) => return Err(format!("field \"token\" must be a string, not {}", type_name(&other))),
    };
    parse_task_id(&obj, "a cancel").map(|id| Request::Cancel(id, token))
}

/// The task id of a request that names one job (`result`, `cancel`: `what` it is).
fn parse_task_id(obj: &Map<String, Value>, what: &str) -> Result<u64, String> {
    if let Some(key) = obj.keys().find(|k| *k != "type" && *k != "task_id") {
        return Err(format!("unknown field {} in {what}: it has \"type\" and \"task_id\"", quoted(key)));
    }
    match obj.get("task_id") {
        Some(Value::Number(n)) => {
            n.as_u64().ok_or_else(|| "field \"task_id\" must be a whole number".to_string())
        }
        Some(other) => Err(format!("field \"task_id\" must be a number, not {}", type_name(other))),
        None => Err(format!("{what} needs \"task_id\": the id `accepted` gave")),
    }
}

fn parse_batch(obj: &Map<String, Value>, limits: &FieldLimits) -> Result<Request, String> {
    for key in obj.keys() {
        if key != "type" && key != "jobs" {
            return Err(format!(
                "unknown field {} in a batch: a batch has \"type\" and \"jobs\"",
                quoted(key)
            ));
        }
    }
    let jobs = match obj.get("jobs") {
        None => return Err("a batch needs \"jobs\": a list of email or SMS jobs".into()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(format!("field \"jobs\" must be a list, not {}", type_name(other))),
    };
    if jobs.is_empty() {
        return Err("a batch needs at least one job in \"jobs\"".into());
    }
    if jobs.len() > MAX_BATCH {
        return Err(format!("a batch holds at most {MAX_BATCH} jobs, not {}", jobs.len()));
    }
    let mut out = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        let Value::Object(job) = job else {
            return Err(format!("job {i} of the batch must be an object, not {}", type_name(job)));
        };
        if job.get("type").and_then(Value::as_str) == Some("batch") {
            return Err(format!("job {i} of the batch is itself a batch: batches do not nest"));
        }
        let job = parse_job(job, limits).map_err(|e| format!("job {i} of the batch: {e}"))?;
        if job.scheduled() {
            return Err(format!(
                "job {i} of the batch: \"run_at\", \"run_in_ms\", \"priority\" and \"key\" are for single jobs, \
                 not members of a batch"
            ));
        }
        out.push(job);
    }
    Ok(Request::Batch(out))
}

fn parse_job(obj: &Map<String, Value>, limits: &FieldLimits) -> Result<Job, String> {
    let kind = match obj.get("type") {
        None => return Err("missing field \"type\": use \"email\" or \"sms\"".into()),
        Some(Value::String(t)) => match t.as_str() {
            "email" => Kind::Email,
            "sms" => Kind::Sms,
            other => {
                return Err(format!("unknown type {}: use \"email\", \"sms\" or \"batch\"", quoted(other)))
            }
        },
        Some(other) => return Err(format!("field \"type\" must be a string, not {}", type_name(other))),
    };
    const EMAIL: &[&str] = &[
        "type",
        "to",
        "subject",
        "body",
        "simulate_ms",
        "task_worker",
        "run_at",
        "run_in_ms",
        "priority",
        "key",
    ];
    const SMS: &[&str] =
        &["type", "to", "text", "simulate_ms", "task_worker", "run_at", "run_in_ms", "priority", "key"];
    let allowed = match kind {
        Kind::Email => EMAIL,
        Kind::Sms => SMS,
    };
    if obj.contains_key("delay_ms") {
        return Err(
            "field \"delay_ms\" is no more: \"simulate_ms\" sets how long the simulated delivery \
                    takes; to run the job later, use \"run_at\" (RFC 3339 or Unix seconds) or \"run_in_ms\""
                .into(),
        );
    }
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(format!(
                "unknown field {} for {} (fields: {})",
                quoted(key),
                kind.name(),
                allowed.join(", ")
            ));
        }
    }
    let to = match obj.get("to") {
        None | Some(Value::Null) => {
            return Err(format!("missing field \"to\": who should get this {}?", kind.name()))
        }
        Some(Value::String(s)) => s.trim(),
        Some(other) => return Err(format!("field \"to\" must be a string, not {}", type_name(other))),
    };
    let to = match kind {
        Kind::Email => valid_email(to)?,
        Kind::Sms => valid_phone(to)?,
    };
    let simulate_ms = match obj.get("simulate_ms") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(ms) if ms <= MAX_SIMULATE_MS => Some(ms),
            _ => {
                return Err(format!(
                    "field \"simulate_ms\" must be a whole number from 0 to {MAX_SIMULATE_MS}"
                ))
            }
        },
        Some(other) => {
            return Err(format!("field \"simulate_ms\" must be a number, not {}", type_name(other)))
        }
    };
    let run_at_ms = parse_run_at(obj, crate::app::unix_ms(std::time::SystemTime::now()))?;
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => Priority::Normal,
        Some(Value::String(p)) => Priority::from_name(p).ok_or_else(|| {
            format!("field \"priority\" must be \"high\", \"normal\" or \"low\", not {}", quoted(p))
        })?,
        Some(other) => return Err(format!("field \"priority\" must be a string, not {}", type_name(other))),
    };
    let key = match obj.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) if k.is_empty() || k.len() > MAX_KEY || k.chars().any(char::is_control) => {
            return Err(format!(
                "field \"key\" must be 1 to {MAX_KEY} bytes of text without control characters"
            ))
        }
        Some(Value::String(k)) => Some(k.clone()),
        Some(other) => return Err(format!("field \"key\" must be a string, not {}", type_name(other))),
    };
    let task_worker = match obj.get("task_worker") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64().and_then(|v| u32::try_from(v).ok()) {
            Some(slot) => Some(slot),
            None => return Err("field \"task_worker\" must be a task process number (0, 1, …)".into()),
        },
        Some(other) => {
            return Err(format!("field \"task_worker\" must be a number, not {}", type_name(other)))
        }
    };
    let subject = optional_string(obj, "subject")?;
    if let Some(s) = &subject {
        if s.chars().count() > MAX_SUBJECT {
            return Err(format!("field \"subject\" is longer than {MAX_SUBJECT} characters"));
        }
        if s.contains(['\r', '\n']) {
            return Err("field \"subject\" must be one line".into());
        }
    }
    let body = optional_string(obj, "body")?;
    check_body(body.as_deref().unwrap_or(""), limits)?;
    let text = optional_string(obj, "text")?;
    check_sms_text(text.as_deref())?;
    if task_worker.is_some() && (run_at_ms.is_some() || priority != Priority::Normal || key.is_some()) {
        return Err(
            "field \"task_worker\" cannot go with \"run_at\", \"run_in_ms\", \"priority\" or \"key\"".into(),
        );
    }
    Ok(Job { kind, to, subject, body, text, simulate_ms, task_worker, run_at_ms, priority, key })
}

/// When a job asks to run (`run_at`: RFC 3339 or Unix seconds; `run_in_ms`: from `now_ms`),
/// in Unix ms; None: at once.
fn parse_run_at(obj: &Map<String, Value>, now_ms: u64) -> Result<Option<u64>, String> {
    let at = match (obj.get("run_at"), obj.get("run_in_ms")) {
        (None | Some(Value::Null), None | Some(Value::Null)) => return Ok(None),
        (Some(a), Some(b)) if !a.is_null() && !b.is_null() => {
            return Err("give \"run_at\" or \"run_in_ms\", not both".into())
        }
        (Some(Value::String(s)), _) => match chrono::DateTime::parse_from_rfc3339(s.trim()) {
            Ok(t) => u64::try_from(t.timestamp_millis())
                .map_err(|_| "field \"run_at\" is before 1970".to_string())?,
            Err(e) => {
                return Err(format!(
                    "field \"run_at\" is not an RFC 3339 time such as \"2026-12-24T08:00:00Z\" ({e}), \
                     nor Unix seconds"
                ))
            }
        },
        (Some(Value::Number(n)), _) => match n.as_f64() {
            Some(secs) if secs >= 0.0 && secs.is_finite() => (secs * 1000.0).round() as u64,
            _ => return Err("field \"run_at\" in Unix seconds must be a number from 0".into()),
        },
        (Some(other), _) if !other.is_null() => {
            return Err(format!("field \"run_at\" must be a string or a number, not {}", type_name(other)))
        }
        (_, Some(Value::Number(n))) => match n.as_u64() {
            Some(ms) if ms <= MAX_RUN_AHEAD_MS => now_ms + ms,
            _ => {
                return Err(format!(
                    "field \"run_in_ms\" must be a whole number from 0 to {MAX_RUN_AHEAD_MS}"
                ))
            }
        },
        (_, Some(other)) => {
            return Err(format!("field \"run_in_ms\" must be a number, not {}", type_name(other)))
        }
        (_, None) => return Ok(None),
    };
    if at > now_ms.saturating_add(MAX_RUN_AHEAD_MS) {
        return Err("field \"run_at\" is more than 366 days ahead: a waiting job is held in memory".into());
    }
    Ok(Some(at))
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("field {key:?} must be a string, not {}", type_name(other))),
    }
}

fn check_body(body: &str, limits: &FieldLimits) -> Result<(), String> {
    let max = limits.email_body_max;
    if body.len() > max {
        return Err(format!(
            "field \"body\" is {} bytes, longer than email_body_max ({max} bytes)",
            body.len()
        ));
    }
    Ok(())
}

fn check_sms_text(text: Option<&str>) -> Result<(), String> {
    match text {
        Some(t) if t.chars().count() > MAX_SMS_TEXT => {
            Err(format!("field \"text\" is longer than {MAX_SMS_TEXT} characters"))
        }
        _ => Ok(()),
    }
}

/// Client text quoted in an error: cut short, so that a reply stays small whatever was sent.
fn quoted(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn looks_like_phone(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// An address of the form `local@domain.tld`, as mail systems accept it in practice.
pub fn valid_email(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("invalid email address {}: {why}", quoted(s)));
    if s.len() > 254 {
        return bad("longer than 254 characters");
    }
    let Some((local, domain)) = s.rsplit_once('@') else {
        return bad("it has no @");
    };
    if local.is_empty() || local.len() > 64 {
        return bad("the part before @ must be 1 to 64 characters");
    }
    // Every address a client sends passes here, in its worker: looked at byte by byte once,
    // with no list of labels and no substring search built for it.
    let mut previous = b'.';
    let local_ok = local.bytes().all(|b| {
        let ok = b.is_ascii_alphanumeric()
            || (b"!#$%&'*+/=?^_`{|}~.-".contains(&b) && !(b == b'.' && previous == b'.'));
        previous = b;
        ok
    });
    // A leading dot fails above (as if a dot came before it), and so do two in a row.
    if !local_ok || local.ends_with('.') {
        return bad("the part before @ has characters an address cannot have");
    }
    if !domain.contains('.') {
        return bad("the domain needs a dot, as in example.com");
    }
    let mut tld = "";
    for label in domain.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return bad("the domain is not a valid host name");
        }
        tld = label;
    }
    if tld.len() < 2 || !tld.bytes().all(|b| b.is_ascii_alphabetic()) {
        return bad("the domain must end in a top-level domain such as .com");
    }
    Ok(s.to_string())
}

/// An E.164-style number: an optional `+`, then 7 to 15 digits, the first not 0 after a `+`.
pub fn valid_phone(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("invalid phone number {}: {why}", quoted(s)));
    let (plus, digits) = match s.strip_prefix('+') {
        Some(d) => (true, d),
        None => (false, s),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return bad("use digits only, with an optional leading +");
    }
    if !(7..=15).contains(&digits.len()) {
        return bad("it must have 7 to 15 digits");
    }
    if plus && digits.starts_with('0') {
        return bad("a country code never starts with 0");
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(line: &str) -> Job {
        match parse(line.as_bytes()) {
            Ok(Request::Job(j)) => j,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn err(line: &[u8]) -> String {
        parse(line).unwrap_err()
    }

    #[test]
    fn a_key_given_twice_is_refused_at_any_depth() {
        let e = err(br#"{"type":"email","to":"a@example.com","to":"b@example.com"}"#);
        assert!(e.starts_with("invalid JSON: the key \"to\" is given twice"), "{e}");
        let e = err(br#"{"type":"batch","jobs":[{"type":"sms","type":"email","to":"a@example.com"}]}"#);
        assert!(e.contains("the key \"type\" is given twice"), "{e}");
        // Values of every kind still parse as before.
        let text = r#"{"a":[1,-2,0.5,1e300,true,null,{},[]],"b":{"c":"d\u00e9"},"e":""}"#;
        let Strict(strict) = serde_json::from_str(text).unwrap();
        assert_eq!(strict, serde_json::from_str::<Value>(text).unwrap());
        let j = job(r#"{"type":"email","to":"a@example.com","subject":"s","simulate_ms":5}"#);
        assert_eq!((j.to.as_str(), j.simulate_ms), ("a@example.com", Some(5)));
    }

    #[test]
    fn every_form_of_the_contract_reads() {
        assert_eq!(job("alice@example.com").kind, Kind::Email);
        assert_eq!(job("  alice@example.com ").to, "alice@example.com");
        let sms = job("+8613800138000");
        assert_eq!((sms.kind, sms.to.as_str()), (Kind::Sms, "+8613800138000"));
        let typed = job("sms +8613800138000 hello there");
        assert_eq!(typed.text.as_deref(), Some("hello there"));
        let typed = job("EMAIL bob@example.org hi bob");
        assert_eq!((typed.to.as_str(), typed.body.as_deref()), ("bob@example.org", Some("hi bob")));
        let j = job(r#"{"type":"email","to":"a@example.com","subject":"s","body":"b","simulate_ms":5}"#);
        assert_eq!((j.subject.as_deref(), j.body.as_deref(), j.simulate_ms), (Some("s"), Some("b"), Some(5)));
        let j = job(r#"{"type":"sms","to":"+8613800138000","text":"t"}"#);
        assert_eq!(j.text.as_deref(), Some("t"));
        assert_eq!(parse(b"stats"), Ok(Request::Stats));
        assert_eq!(parse(br#"{"type":"result","task_id":4294967297}"#), Ok(Request::Result(4294967297)));
        assert!(parse(br#"{"type":"result"}"#).unwrap_err().contains("task_id"));
        assert!(parse(br#"{"type":"result","task_id":"x"}"#).unwrap_err().contains("number"));
        match parse(br#"{"type":"batch","jobs":[{"type":"email","to":"a@example.com"},{"type":"sms","to":"+15551234567"}]}"#) {
            Ok(Request::Batch(jobs)) => assert_eq!(jobs.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_handled_type_is_taken_whole_and_an_unknown_one_names_the_known_types() {
        let handled = ["resize".to_string(), "email".to_string()];
        let limits = FieldLimits::default();
        match parse_for(br#"{"type":"resize","w":3,"url":"x"}"#, &limits, &handled) {
            Ok(Request::Handled { kind, job }) => {
                assert_eq!((kind.as_str(), job.get("w")), ("resize", Some(&3.into())))
            }
            other => panic!("{other:?}"),
        }
        // An overridden built-in type is not checked as an email: the handler reads it.
        let email = parse_for(br#"{"type":"email","to":"not an address","x":1}"#, &limits, &handled);
        assert!(matches!(email, Ok(Request::Handled { .. })), "{email:?}");
        let e = parse_for(br#"{"type":"fax"}"#, &limits, &handled).unwrap_err();
        assert!(e.contains("unknown type \"fax\": known types are \"email\", \"sms\", \"resize\""), "{e}");
        assert!(parse_for(br#"{"type":"sms","to":"+15551234567"}"#, &limits, &handled).is_ok());
    }

    #[test]
    fn each_mistake_gets_its_own_sentence() {
        assert!(err(b"\xff\xfe").contains("UTF-8"));
        assert!(err(b"a\0b").contains("NUL"));
        assert!(err(b"").contains("empty request"));
        assert!(err(b"{").contains("invalid JSON"));
        assert!(err(b"[1,2]").contains("must be an object"));
        assert!(err(br#"{"to":"a@example.com"}"#).contains("missing field \"type\""));
        assert!(err(br#"{"type":"fax","to":"x"}"#).contains("unknown type \"fax\""));
        assert!(err(br#"{"type":"email"}"#).contains("missing field \"to\""));
        assert!(err(br#"{"type":"email","to":42}"#).contains("must be a string, not a number"));
        assert!(err(br#"{"type":"email","to":"nope"}"#).contains("invalid email address"));
        assert!(err(br#"{"type":"sms","to":"+12ab"}"#).contains("invalid phone number"));
        assert!(err(br#"{"type":"email","to":"a@example.com","subject":7}"#)
            .contains("\"subject\" must be a string"));
        assert!(err(br#"{"type":"email","to":"a@example.com","subjet":"x"}"#)
            .contains("unknown field \"subjet\""));
        assert!(err(br#"{"type":"email","to":"a@example.com","simulate_ms":-1}"#).contains("simulate_ms"));
        let long =
            format!(r#"{{"type":"email","to":"a@example.com","subject":"{}"}}"#, "x".repeat(MAX_SUBJECT + 1));
        assert!(err(long.as_bytes()).contains("longer than"));
        assert!(err(br#"{"type":"batch","jobs":[]}"#).contains("at least one"));
        assert!(err(br#"{"type":"batch","jobs":[{"type":"email"}]}"#).starts_with("job 0 of the batch"));
        assert!(err(b"hello world").contains("cannot read this request"));
        assert!(err(b"email").contains("needs an address"));
    }

    #[test]
    fn an_email_body_past_its_limit_is_refused_in_every_form() {
        let limits = FieldLimits { email_body_max: 10 };
        let ok = format!(r#"{{"type":"email","to":"a@example.com","body":"{}"}}"#, "b".repeat(10));
        assert!(parse_with(ok.as_bytes(), &limits).is_ok());
        let long = format!(r#"{{"type":"email","to":"a@example.com","body":"{}"}}"#, "b".repeat(11));
        let error = parse_with(long.as_bytes(), &limits).unwrap_err();
        assert!(error.contains("11 bytes, longer than email_body_max (10 bytes)"), "{error}");
        let typed = format!("email a@example.com {}", "w".repeat(11));
        assert!(parse_with(typed.as_bytes(), &limits).unwrap_err().contains("email_body_max"));
        let batch = format!(r#"{{"type":"batch","jobs":[{}]}}"#, long);
        assert!(parse_with(batch.as_bytes(), &limits).unwrap_err().starts_with("job 0 of the batch"));
        // The default is the documented 1 MiB.
        let at_default = format!("email a@example.com {}", "w".repeat(DEFAULT_EMAIL_BODY_MAX + 1));
        assert!(parse(at_default.as_bytes()).unwrap_err().contains("email_body_max"));
    }

    #[test]
    fn errors_quote_at_most_a_little_of_the_request() {
        // Found while fuzzing: control bytes grow sixfold when quoted and escaped, so an error
        // quoting a whole 2 MiB line would not fit the client's output bound.
        let line = format!("email {}", "\u{1}".repeat(100_000));
        let error = err(line.as_bytes());
        assert!(error.len() < 600, "{} bytes", error.len());
        let field = format!(r#"{{"type":"email","to":"a@example.com","{}":1}}"#, "k".repeat(5000));
        assert!(err(field.as_bytes()).len() < 400);
    }

    #[test]
    fn addresses_and_numbers_are_validated() {
        for ok in ["a@example.com", "first.last+tag@mail.example.co.uk", "x_y@a-b.io"] {
            valid_email(ok).unwrap();
        }
        for bad in [
            "a@b",
            "@example.com",
            "a@.com",
            "a..b@example.com",
            "a@example.c0m",
            "a@-x.com",
            "a b@example.com",
        ] {
            assert!(valid_email(bad).is_err(), "{bad}");
        }
        for ok in ["+8613800138000", "13800138000", "+15551234567"] {
            valid_phone(ok).unwrap();
        }
        for bad in ["+0123456789", "123", "+1234567890123456", "12-34-567"] {
            assert!(valid_phone(bad).is_err(), "{bad}");
        }
    }

    /// `valid_email` as it was written before it scanned each byte once: the answer (and the
    /// reason) must not change.
    fn valid_email_before(s: &str) -> Result<String, String> {
        let bad = |why: &str| Err(format!("invalid email address {}: {why}", quoted(s)));
        if s.len() > 254 {
            return bad("longer than 254 characters");
        }
        let Some((local, domain)) = s.rsplit_once('@') else {
            return bad("it has no @");
        };
        if local.is_empty() || local.len() > 64 {
            return bad("the part before @ must be 1 to 64 characters");
        }
        let local_ok =
            local.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
        if !local_ok || local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return bad("the part before @ has characters an address cannot have");
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return bad("the domain needs a dot, as in example.com");
        }
        for label in &labels {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return bad("the domain is not a valid host name");
            }
        }
        let tld = labels[labels.len() - 1];
        if tld.len() < 2 || !tld.bytes().all(|b| b.is_ascii_alphabetic()) {
            return bad("the domain must end in a top-level domain such as .com");
        }
        Ok(s.to_string())
    }

    #[test]
    fn random_addresses_get_the_answer_they_got_before() {
        const PICKS: [char; 12] = ['a', 'Z', '7', '.', '.', '@', '-', '+', '_', ' ', 'é', '\n'];
        let mut rng = crate::retry::Rng::seeded(0x6d61_696c);
        let mut valid = 0;
        for _ in 0..50_000 {
            let len = (rng.next_u64() % 24) as usize;
            let mut text: String = (0..len).map(|_| PICKS[(rng.next_u64() % 12) as usize]).collect();
            if rng.next_u64() % 2 == 0 {
                text.push_str(
                    ["@example.com", "@a.b-c.io", ".com", "@x..y", "@-a.bc"][(rng.next_u64() % 5) as usize],
                );
            }
            let before = valid_email_before(&text);
            valid += usize::from(before.is_ok());
            assert_eq!(valid_email(&text), before, "{text:?}");
        }
        assert!(valid > 200, "only {valid} valid addresses tried");
        for long in [format!("{}@example.com", "a".repeat(64)), format!("{}@example.com", "a".repeat(65))] {
            assert_eq!(valid_email(&long), valid_email_before(&long));
        }
    }

    /// Jobs with random fields, strings heavy in what JSON escapes.
    fn random_jobs(seed: u64, n: usize) -> Vec<Job> {
        const PICKS: [char; 12] = ['a', '"', '\\', '\n', '\u{1}', 'é', '😀', ' ', '/', '\u{7f}', '{', ','];
        let mut rng = crate::retry::Rng::seeded(seed);
        let text = |rng: &mut crate::retry::Rng| -> String {
            let len = (rng.next_u64() % 12) as usize;
            (0..len)
                .map(|_| if rng.next_u64() % 3 == 0 { PICKS[(rng.next_u64() % 12) as usize] } else { 'x' })
                .collect()
        };
        (0..n)
            .map(|_| {
                let kind = if rng.next_u64() % 2 == 0 { Kind::Email } else { Kind::Sms };
                let mut job = Job::to(kind, text(&mut rng));
                job.subject = (rng.next_u64() % 2 == 0).then(|| text(&mut rng));
                job.body = (rng.next_u64() % 2 == 0).then(|| text(&mut rng));
                job.text = (rng.next_u64() % 2 == 0).then(|| text(&mut rng));
                job.simulate_ms = match rng.next_u64() % 4 {
                    0 => None,
                    1 => Some(0),
                    2 => Some(u64::MAX),
                    _ => Some(rng.next_u64() % 100_000),
                };
                job
            })
            .collect()
    }

    #[test]
    fn task_data_is_what_serde_json_writes_and_reads_back() {
        for job in random_jobs(0x6a6f_6273, 5_000) {
            let json = job.to_json();
            assert_eq!(json, serde_json::to_vec(&job).unwrap(), "{job:?}");
            assert_eq!(Job::from_json(&json).unwrap(), job);
        }
    }

    /// Task data may come from Redis, written by anyone: whatever the one pass reads, it reads
    /// as serde_json does, and what it does not, serde_json reads (or refuses) itself.
    #[test]
    fn task_data_changed_anywhere_reads_as_serde_json_reads_it() {
        const BYTES: &[u8] = b"\"\\{},:0123456789 aenxlu.-\n\xc3\xa9";
        let mut rng = crate::retry::Rng::seeded(0x6d75_7461);
        let mut ours = 0;
        for job in random_jobs(0x7265_6164, 4_000) {
            let json = job.to_json();
            for _ in 0..8 {
                let mut data = json.clone();
                for _ in 0..1 + rng.next_u64() % 3 {
                    let at = (rng.next_u64() % (data.len() as u64 + 1)) as usize;
                    let byte = BYTES[(rng.next_u64() % BYTES.len() as u64) as usize];
                    match rng.next_u64() % 3 {
                        0 if at < data.len() => drop(data.remove(at)),
                        1 if at < data.len() => data[at] = byte,
                        _ => data.insert(at, byte),
                    }
                }
                ours += usize::from(Job::from_plain_json(&data).is_some());
                let want: Result<Job, _> = serde_json::from_slice(&data);
                match (Job::from_json(&data), want) {
                    (Ok(got), Ok(want)) => assert_eq!(got, want, "{}", String::from_utf8_lossy(&data)),
                    (Err(_), Err(_)) => {}
                    (got, want) => {
                        panic!("{}: {got:?} but serde_json: {want:?}", String::from_utf8_lossy(&data))
                    }
                }
            }
        }
        // The changed data the one pass took itself (most go to serde_json).
        assert!(ours > 300, "{ours}");
        // An older node's field, spaces, another order: serde_json's.
        for data in [
            r#"{"type":"sms","to":"+15551234567","delay_ms":7}"#,
            r#"{ "type":"email","to":"a@example.com"}"#,
            r#"{"to":"a@example.com","type":"email"}"#,
            r#"{"type":"email","to":"a@example.com","body":"b","subject":"s"}"#,
        ] {
            assert!(Job::from_plain_json(data.as_bytes()).is_none(), "{data}");
            assert_eq!(Job::from_json(data.as_bytes()).unwrap(), serde_json::from_str::<Job>(data).unwrap());
        }
    }

    #[test]
    fn delay_ms_is_refused_with_a_sentence_that_names_simulate_ms_and_run_at() {
        let e = err(br#"{"type":"email","to":"a@example.com","delay_ms":5}"#);
        assert!(e.contains("delay_ms") && e.contains("simulate_ms") && e.contains("run_at"), "{e}");
        // A job stored by an older node (task data) still reads.
        let old: Job = serde_json::from_str(r#"{"type":"sms","to":"+15551234567","delay_ms":7}"#).unwrap();
        assert_eq!(old.simulate_ms, Some(7));
    }

    #[test]
    fn run_at_reads_rfc3339_and_unix_seconds_and_run_in_ms_counts_from_now() {
        let j = job(r#"{"type":"email","to":"a@example.com","run_at":"2026-12-24T09:00:00+01:00"}"#);
        assert_eq!(j.run_at_ms, Some(1_798_099_200_000));
        let j = job(r#"{"type":"email","to":"a@example.com","run_at":1798099200.5}"#);
        assert_eq!(j.run_at_ms, Some(1_798_099_200_500));
        let before = crate::app::unix_ms(std::time::SystemTime::now());
        let j = job(r#"{"type":"sms","to":"+15551234567","run_in_ms":90000,"priority":"low","key":"k-1"}"#);
        let at = j.run_at_ms.unwrap();
        assert!(at >= before + 90_000 && at < before + 100_000, "{at}");
        assert_eq!((j.priority, j.key.as_deref()), (Priority::Low, Some("k-1")));
        // Not serialized into the task data: the master acts on them, not the task process.
        let data = serde_json::to_string(&j).unwrap();
        assert!(!data.contains("run_") && !data.contains("priority") && !data.contains("k-1"), "{data}");
    }

    #[test]
    fn bad_times_priorities_and_keys_each_get_their_sentence() {
        for (line, says) in [
            (r#"{"type":"email","to":"a@example.com","run_at":"tomorrow"}"#, "RFC 3339"),
            (r#"{"type":"email","to":"a@example.com","run_at":-5}"#, "Unix seconds"),
            (
                r#"{"type":"email","to":"a@example.com","run_at":"2026-12-24T08:00:00Z","run_in_ms":5}"#,
                "not both",
            ),
            (r#"{"type":"email","to":"a@example.com","run_in_ms":-1}"#, "run_in_ms"),
            (r#"{"type":"email","to":"a@example.com","run_at":"2999-01-01T00:00:00Z"}"#, "366 days"),
            (r#"{"type":"email","to":"a@example.com","priority":"urgent"}"#, "\"low\""),
            (r#"{"type":"email","to":"a@example.com","key":""}"#, "key"),
            (r#"{"type":"email","to":"a@example.com","key":"a\nb"}"#, "control"),
            (r#"{"type":"email","to":"a@example.com","key":"k","task_worker":0}"#, "task_worker"),
            (
                r#"{"type":"batch","jobs":[{"type":"email","to":"a@example.com","run_in_ms":5}]}"#,
                "single jobs",
            ),
            (r#"{"type":"cancel"}"#, "task_id"),
            (r#"{"type":"cancel","task_id":1,"x":2}"#, "unknown field"),
        ] {
            let e = err(line.as_bytes());
            assert!(e.contains(says), "{line}: {e}");
        }
        assert_eq!(parse(br#"{"type":"cancel","task_id":42}"#), Ok(Request::Cancel(42, None)));
        assert_eq!(
            parse(br#"{"type":"cancel","task_id":42,"token":"ab"}"#),
            Ok(Request::Cancel(42, Some("ab".into())))
        );
    }
}
