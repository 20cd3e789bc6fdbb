//! SMS over an HTTP API (`--sms-url`): one POST per message, in one of two shapes (presets),
//! and the provider's answer read as a receipt or a class of failure.
//!
//! - `twilio`: a form (`To`, `From`, `Body`) with HTTP basic auth (the account SID and auth
//!   token, from the URL's userinfo, or the SID there and the token in `sms_token`); the
//!   receipt is the `sid` of the JSON answer.
//! - `webhook`: JSON (`to`, `text`, `task_id`, and `from` when set) with `Authorization:
//!   Bearer <sms_token>`; the receipt is the answer's `id`, `message_id` or `sid`.
//!
//! Every request carries `Idempotency-Key`, the same on every attempt of one job. A refused or
//! reset connection, a timeout, HTTP 408, 429 and 5xx are transient (with `Retry-After`, in
//! seconds or as an HTTP date, bounded); any other 4xx is permanent, with the provider's words.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Error, Message, Receipt, Transport};

/// The longest wait a `Retry-After` may ask for: past it, the job waits this long (a
/// provider's "come back tomorrow" must not park a job for a day).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The most bytes of an answer read (an id, or the provider's words): a provider that answers
/// with a page of HTML does not fill a task process's memory.
const MAX_ANSWER: u64 = 64 * 1024;
/// The most characters of the provider's words quoted in a job's `failed`.
const MAX_WORDS: usize = 200;

/// The shape of the request (`sms_preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Twilio's Messages API: a form, basic auth, the answer's `sid`.
    #[default]
    Twilio,
    /// A JSON webhook: JSON body, bearer token, the answer's `id`.
    Webhook,
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "twilio" => Ok(Preset::Twilio),
            "webhook" => Ok(Preset::Webhook),
            other => Err(format!("{other:?} is not twilio or webhook")),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Twilio => "twilio",
            Preset::Webhook => "webhook",
        })
    }
}

/// What the SMS transport is made from (the `sms_*` options).
#[derive(Debug, Clone)]
pub struct SmsSettings {
    pub url: String,
    pub preset: Preset,
    pub from: Option<String>,
    pub token: Option<String>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// What makes the `Idempotency-Key` of a job unique beyond its id ([`idempotency_scope`]).
    pub scope: String,
}

/// Checks the options as the daemon starts (a bad URL stops it with the option's name, not
/// every task process later). The reason never quotes a secret.
pub fn validate(settings: &SmsSettings) -> Result<(), String> {
    let shown = crate::durable::redact(&settings.url);
    let rest = settings
        .url
        .strip_prefix("https://")
        .or_else(|| settings.url.strip_prefix("http://"))
        .ok_or_else(|| format!("{shown:?} is not an http:// or https:// URL"))?;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return Err(format!("{shown:?} names no host"));
    }
    if settings.url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("{shown:?} holds a space or a control character"));
    }
    if settings.preset == Preset::Twilio && settings.from.as_deref().is_none_or(str::is_empty) {
        return Err("the twilio preset needs the sender's number or name (sms_from, --sms-from)".into());
    }
    Ok(())
}

/// The part of an `Idempotency-Key` before the job's id: task ids are unique for the life of a
/// daemon (and across the nodes of one Redis queue, and its restarts), so this names the daemon
/// or the queue, so that two unrelated daemons never send the same key.
pub fn idempotency_scope(server: &crate::config::ServerConfig, started_ms: u64) -> String {
    match &server.redis_url {
        // Any node may run a durable job, on any attempt: the queue, not the host.
        Some(_) => format!("taskd-{}", server.redis_queue),
        None => format!("taskd-{}-{started_ms}", crate::durable::host_name()),
    }
}

pub struct Sms {
    agent: ureq::Agent,
    preset: Preset,
    /// The URL without its userinfo: what the request goes to.
    endpoint: String,
    /// The URL as messages show it (no password).
    shown: String,
    /// `Basic …` or `Bearer …`, if any.
    authorization: Option<String>,
    from: Option<String>,
    scope: String,
}

impl Sms {
    /// Made in each task process after the fork (it pools its connection to the provider).
    pub fn new(settings: &SmsSettings) -> Result<Sms, String> {
        validate(settings)?;
        let (scheme, rest) = settings.url.split_once("://").unwrap_or(("https", &settings.url));
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let endpoint = format!("{scheme}://{host}{path}");
        let decode = crate::durable::percent_decode;
        let authorization = match settings.preset {
            Preset::Twilio => {
                let (user, pass) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
                    Some((user, "")) => (decode(user), settings.token.clone().unwrap_or_default()),
                    Some((user, pass)) => (decode(user), decode(pass)),
                    None => (String::new(), settings.token.clone().unwrap_or_default()),
                };
                (!user.is_empty() || !pass.is_empty())
                    .then(|| format!("Basic {}", base64(format!("{user}:{pass}").as_bytes())))
            }
            Preset::Webhook => settings.token.as_ref().map(|t| format!("Bearer {t}")),
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(settings.connect_timeout))
            .timeout_global(Some(settings.timeout))
            .max_redirects(0)
            .user_agent(concat!("taskd/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Sms {
            agent: config.into(),
            preset: settings.preset,
            endpoint,
            shown: crate::durable::redact(&settings.url),
            authorization,
            from: settings.from.clone().filter(|f| !f.is_empty()),
            scope: settings.scope.clone(),
        })
    }

    /// The job's key: the same on every attempt, on any node.
    pub fn idempotency_key(&self, task_id: u64) -> String {
        format!("{}-{task_id}", self.scope)
    }
}

impl Transport for Sms {
    fn send(&mut self, message: &Message<'_>) -> Result<Receipt, Error> {
        let text = message.text.unwrap_or_default();
        let mut request = self
            .agent
            .post(&self.endpoint)
            .header("Idempotency-Key", self.idempotency_key(message.task_id))
            .header("Accept", "application/json");
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        let sent = match self.preset {
            Preset::Twilio => {
                let from = self.from.as_deref().unwrap_or_default();
                request.send_form([("To", message.to), ("From", from), ("Body", text)])
            }
            Preset::Webhook => {
                let mut body =
                    serde_json::json!({"to": message.to, "text": text, "task_id": message.task_id});
                if let (Some(from), Some(obj)) = (&self.from, body.as_object_mut()) {
                    obj.insert("from".into(), from.clone().into());
                }
                request.header("Content-Type", "application/json").send(body.to_string())
            }
        };
        let mut response = sent.map_err(|e| classify_io(&e, &self.shown))?;
        let status = response.status().as_u16();
        let retry_after =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
        // An answer cut short (or unreadable) still has its status: only the id is lost.
        let body = response.body_mut().with_config().limit(MAX_ANSWER).read_to_string().unwrap_or_default();
        if (200..300).contains(&status) {
            let answer = message_id(&body).unwrap_or_else(|| format!("HTTP {status}"));
            return Ok(Receipt { answer });
        }
        Err(classify_status(status, retry_after.as_deref(), &body, SystemTime::now()))
    }
}

/// A failure before any answer: the provider may be back soon (transient), except when the
/// request itself can never be made (a bad URL, TLS refused by policy).
pub fn classify_io(e: &ureq::Error, shown: &str) -> Error {
    let transient = |what: String| Error::Transient {
        message: format!("SMS provider {shown}: {what}"),
        retry_after: None,
    };
    match e {
        ureq::Error::Timeout(t) => transient(format!("timed out ({t})")),
        ureq::Error::ConnectionFailed => transient("cannot connect".into()),
        ureq::Error::HostNotFound => transient("host not found".into()),
        ureq::Error::Io(io) => transient(format!("connection failed: {io}")),
        ureq::Error::Protocol(p) => transient(format!("bad answer: {p}")),
        ureq::Error::Tls(why) => transient(format!("TLS: {why}")),
        ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::InvalidProxyUrl => {
            Error::Permanent { message: format!("SMS provider {shown}: cannot make the request: {e}") }
        }
        other => transient(other.to_string()),
    }
}

/// An answer that is not 2xx: 408, 429 and 5xx are transient (`Retry-After` honoured, within
/// [`MAX_RETRY_AFTER`]), any other status permanent, each with the provider's words.
pub fn classify_status(status: u16, retry_after: Option<&str>, body: &str, now: SystemTime) -> Error {
    let words = provider_words(body);
    let message = if words.is_empty() {
        format!("SMS provider answered HTTP {status}")
    } else {
        format!("SMS provider answered HTTP {status}: {words}")
    };
    if status == 408 || status == 429 || (500..600).contains(&status) {
        let retry_after = retry_after.and_then(|v| parse_retry_after(v, now));
        Error::Transient { message, retry_after }
    } else {
        Error::Permanent { message }
    }
}

/// `Retry-After`: seconds (`120`) or an HTTP date (`Fri, 31 Dec 1999 23:59:59 GMT`), from
/// `now`; at most [`MAX_RETRY_AFTER`]; a date in the past is 0; anything else is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is a long wait all the same.
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX).min(MAX_RETRY_AFTER.as_secs()))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The provider's message id in a JSON answer: `sid` (Twilio), `id` or `message_id`.
fn message_id(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    ["sid", "id", "message_id"].iter().find_map(|k| match value.get(*k)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(clean(s, MAX_WORDS)),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// The provider's words for a refusal: the `message` (Twilio), `error` or `detail` of a JSON
/// answer, else the answer itself; bounded, on one line, without control characters.
fn provider_words(body: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| {
        ["message", "error", "detail"].iter().find_map(|k| match v.get(*k)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("message").and_then(|m| m.as_str()).map(String::from),
            _ => None,
        })
    });
    clean(from_json.as_deref().unwrap_or(body), MAX_WORDS)
}

/// At most `max` characters of `text`, each control character (a newline would forge a log
/// line) as a space, runs of spaces as one.
fn clean(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut count = 0;
    for c in text.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if count == max {
            out.push('…');
            break;
        }
        out.push(c);
        count += 1;
    }
    out.trim_end().to_string()
}

/// Standard base64 (RFC 4648, with padding), for a basic-auth header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        // Sun, 06 Nov 1994 08:49:37 GMT
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_is_bounded() {
        assert_eq!(parse_retry_after("120", now()), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now()), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999999999999999999999", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("86400", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now()), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now()), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Mon, 06 Nov 1995 08:00:00 GMT", now()), Some(MAX_RETRY_AFTER));
        for bad in ["", "soon", "-5", "1.5", "Sun, 99 Nov 1994 08:50:07 GMT"] {
            assert_eq!(parse_retry_after(bad, now()), None, "{bad:?}");
        }
    }

    #[test]
    fn busy_and_broken_providers_are_transient_refusals_permanent() {
        for status in [408, 429, 500, 502, 503, 504] {
            let e = classify_status(status, Some("7"), "slow down", now());
            assert_eq!(
                e,
                Error::Transient {
                    message: format!("SMS provider answered HTTP {status}: slow down"),
                    retry_after: Some(Duration::from_secs(7))
                }
            );
        }
        assert!(matches!(classify_status(503, None, "", now()), Error::Transient { retry_after: None, .. }));
        let twilio = r#"{"code": 21211, "message": "The 'To' number +15005550001 is not a valid phone number.", "status": 400}"#;
        let e = classify_status(400, Some("5"), twilio, now());
        assert_eq!(
            e,
            Error::Permanent {
                message: "SMS provider answered HTTP 400: The 'To' number +15005550001 is not a valid phone number."
                    .into()
            }
        );
        for status in [401, 403, 404, 410, 422] {
            assert!(
                matches!(classify_status(status, None, "no", now()), Error::Permanent { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn the_providers_words_are_short_and_on_one_line() {
        let e = classify_status(400, None, "bad\r\nINFO forged log line\x1b[31m", now());
        assert_eq!(e.message(), "SMS provider answered HTTP 400: bad INFO forged log line [31m");
        let long = "x".repeat(10_000);
        let e = classify_status(422, None, &long, now());
        assert!(e.message().chars().count() < MAX_WORDS + 40, "{}", e.message());
        let nested = r#"{"error": {"message": "quota exceeded"}}"#;
        assert_eq!(
            classify_status(403, None, nested, now()).message(),
            "SMS provider answered HTTP 403: quota exceeded"
        );
    }

    #[test]
    fn connection_failures_are_transient() {
        for e in [
            ureq::Error::ConnectionFailed,
            ureq::Error::HostNotFound,
            ureq::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            ureq::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            ureq::Error::Timeout(ureq::Timeout::Global),
            ureq::Error::Timeout(ureq::Timeout::Connect),
        ] {
            assert!(matches!(classify_io(&e, "http://x"), Error::Transient { .. }), "{e}");
        }
        assert!(matches!(classify_io(&ureq::Error::BadUri("x".into()), "x"), Error::Permanent { .. }));
    }

    /// A real connection refused and a provider that does not answer in time, end to end
    /// through the client.
    #[test]
    fn a_closed_port_and_a_silent_provider_are_transient() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        for (port, what) in [(port, "refused"), (silent_port, "timed out")] {
            let mut sms = Sms::new(&SmsSettings {
                url: format!("http://127.0.0.1:{port}/sms"),
                preset: Preset::Webhook,
                from: None,
                token: Some("t".into()),
                connect_timeout: Duration::from_secs(5),
                timeout: Duration::from_millis(300),
                scope: "s".into(),
            })
            .unwrap();
            let message = Message {
                task_id: 1,
                attempt: 1,
                to: "+15551230001",
                subject: None,
                body: None,
                text: Some("x"),
            };
            match sms.send(&message) {
                Err(Error::Transient { message, retry_after: None }) => {
                    assert!(message.contains(what), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
        drop(silent);
    }

    #[test]
    fn the_key_names_the_queue_or_the_daemon() {
        let memory = crate::config::ServerConfig::default();
        let scope = idempotency_scope(&memory, 1234);
        assert!(scope.starts_with("taskd-") && scope.ends_with("-1234"), "{scope}");
        let durable = crate::config::ServerConfig {
            redis_url: Some("redis://h".into()),
            redis_queue: "q1".into(),
            ..Default::default()
        };
        assert_eq!(idempotency_scope(&durable, 1234), "taskd-q1", "the same on every node and run");
    }

    #[test]
    fn message_ids_and_basic_auth() {
        assert_eq!(message_id(r#"{"sid":"SM123","status":"queued"}"#).as_deref(), Some("SM123"));
        assert_eq!(message_id(r#"{"id":42}"#).as_deref(), Some("42"));
        assert_eq!(message_id(r#"{"message_id":"m-1"}"#).as_deref(), Some("m-1"));
        assert_eq!(message_id("ok"), None);
        assert_eq!(base64(b"AC123:tok"), "QUMxMjM6dG9r");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn settings_are_checked_without_quoting_a_secret() {
        let settings = |url: &str, preset, from: Option<&str>| SmsSettings {
            url: url.into(),
            preset,
            from: from.map(String::from),
            token: None,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            scope: "s".into(),
        };
        validate(&settings("https://AC1:s3cret@api.twilio.com/x", Preset::Twilio, Some("+1555"))).unwrap();
        validate(&settings("http://127.0.0.1:8080/sms", Preset::Webhook, None)).unwrap();
        let err = validate(&settings("ftp://u:s3cret@h/x", Preset::Webhook, None)).unwrap_err();
        assert!(err.contains("http://") && !err.contains("s3cret"), "{err}");
        assert!(validate(&settings("https://AC1:s3cret@h/x", Preset::Twilio, None))
            .unwrap_err()
            .contains("sms_from"));
        assert!(validate(&settings("http:///x", Preset::Webhook, None)).is_err());
        let sms =
            Sms::new(&settings("https://AC1:s3%2Fcret@h:8/x?a=1", Preset::Twilio, Some("+1555"))).unwrap();
        assert_eq!(sms.endpoint, "https://h:8/x?a=1");
        assert_eq!(sms.authorization.as_deref(), Some(&*format!("Basic {}", base64(b"AC1:s3/cret"))));
        assert_eq!(sms.idempotency_key(9), "s-9");
    }
}
