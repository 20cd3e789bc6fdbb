//! Email over SMTP (`--smtp-url`): each email job goes to one relay, through lettre's blocking
//! SMTP client on a connection kept between emails (one per task process, made after the
//! fork), TLS by rustls.
//!
//! The URL: `smtp://[USER:PASS@]HOST[:PORT][?tls=required|opportunistic|none]` (STARTTLS,
//! port 587; `required` unless the URL says otherwise) or `smtps://[USER:PASS@]HOST[:PORT]`
//! (TLS from the first byte, port 465). The relay's certificate is checked against the
//! system's CAs, or those of `--smtp-ca-file`.
//!
//! Every attempt of one job sends the same `Message-ID` (`<taskd.ID.TAG@DOMAIN>`, see
//! [`SmtpSettings::new`]), so a recipient can tell a repeat of a run that died mid-send.

use std::path::Path;
use std::time::{Duration, Instant};

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, CertificateStore, SmtpConnection, Tls, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;

use super::{Error, Message, Receipt, Transport};

/// How the connection to the relay is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `smtps://`: TLS from the first byte.
    Implicit,
    /// `smtp://` (or `?tls=required`): STARTTLS, and no message is sent without it.
    Required,
    /// `?tls=opportunistic`: STARTTLS when the relay offers it, else in clear.
    Opportunistic,
    /// `?tls=none`: in clear (a relay on this host).
    None,
}

/// What `smtp_url` says.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpUrl {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub user: Option<String>,
    pass: Option<String>,
}

impl std::fmt::Debug for SmtpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("pass", &self.pass.as_ref().map(|_| "***"))
            .finish()
    }
}

impl SmtpUrl {
    /// Parses `smtp_url`; an error never quotes the password.
    pub fn parse(url: &str) -> Result<SmtpUrl, String> {
        let shown = crate::durable::redact(url);
        let bad = |why: &str| {
            format!(
                "{shown:?} is not smtp://[USER:PASS@]HOST[:PORT][?tls=required|opportunistic|none] \
                 or smtps://[USER:PASS@]HOST[:PORT]: {why}"
            )
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let (mut tls, default_port) = match parsed.scheme() {
            "smtp" => (TlsMode::Required, 587),
            "smtps" => (TlsMode::Implicit, 465),
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(bad("no host")),
        };
        if !matches!(parsed.path(), "" | "/") {
            return Err(bad("a path means nothing here"));
        }
        for (key, value) in parsed.query_pairs() {
            match (&*key, &*value, tls) {
                ("tls", "required", TlsMode::Required | TlsMode::Opportunistic | TlsMode::None) => {
                    tls = TlsMode::Required
                }
                ("tls", "opportunistic", TlsMode::Required | TlsMode::Opportunistic | TlsMode::None) => {
                    tls = TlsMode::Opportunistic
                }
                ("tls", "none", TlsMode::Required | TlsMode::Opportunistic | TlsMode::None) => {
                    tls = TlsMode::None
                }
                ("tls", _, TlsMode::Implicit) => {
                    return Err(bad("smtps:// is TLS from the first byte: tls= goes with smtp:// only"))
                }
                ("tls", other, _) => {
                    return Err(bad(&format!("tls={other:?}: it is required, opportunistic or none")))
                }
                (other, _, _) => return Err(bad(&format!("unknown parameter {other:?}"))),
            }
        }
        let decode = |s: &str| crate::durable::percent_decode(s);
        let user = Some(decode(parsed.username())).filter(|u| !u.is_empty());
        let pass = parsed.password().map(decode);
        if pass.is_some() && user.is_none() {
            return Err(bad("a password needs a user name (USER:PASS@)"));
        }
        Ok(SmtpUrl { host, port: parsed.port().unwrap_or(default_port), tls, user, pass })
    }
}

/// Everything a task process needs to reach the relay, checked in the master before any fork
/// (a bad URL, sender or CA file stops the start with the option's name).
#[derive(Clone)]
pub struct SmtpSettings {
    url: SmtpUrl,
    /// The URL as logs show it (no password).
    shown: String,
    from: Mailbox,
    /// The PEM certificates of `--smtp-ca-file`, read once.
    ca: Vec<Certificate>,
    id_tag: String,
    id_domain: String,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("url", &self.shown)
            .field("from", &self.from.to_string())
            .finish()
    }
}

impl SmtpSettings {
    /// `id_tag` tells this daemon's task ids from another's that may reach the same recipients:
    /// the queue's name with durable jobs (ids are unique across a queue's nodes and runs), the
    /// host and the master's start time without. The `Message-ID` of job ID is then
    /// `<taskd.ID.TAG@DOMAIN>`, DOMAIN that of `mail_from`.
    pub fn new(url: &str, mail_from: &str, ca_file: Option<&Path>, id_tag: &str) -> Result<Self, String> {
        let parsed = SmtpUrl::parse(url)?;
        let from = parse_mail_from(mail_from)?;
        let ca = match ca_file {
            None => Vec::new(),
            Some(path) => read_ca_file(path)?,
        };
        let id_tag: String = id_tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_".contains(c) { c } else { '-' })
            .collect();
        let id_domain = from.email.domain().to_string();
        let settings =
            SmtpSettings { url: parsed, shown: crate::durable::redact(url), from, ca, id_tag, id_domain };
        // Now, in the master, rather than in every task process (which would fail to start).
        settings.tls()?;
        Ok(settings)
    }

    /// How the connection is protected, with the CAs its certificate is checked against.
    fn tls(&self) -> Result<Tls, String> {
        let parameters = || {
            let mut builder = TlsParameters::builder(self.url.host.clone());
            if !self.ca.is_empty() {
                // The private CA only: a relay with a private certificate is trusted for it.
                builder = builder.certificate_store(CertificateStore::None);
                for cert in &self.ca {
                    builder = builder.add_root_certificate(cert.clone());
                }
            }
            builder.build_rustls().map_err(|e| format!("cannot set up TLS for {}: {e}", self.shown))
        };
        Ok(match self.url.tls {
            TlsMode::Implicit => Tls::Wrapper(parameters()?),
            TlsMode::Required => Tls::Required(parameters()?),
            TlsMode::Opportunistic => Tls::Opportunistic(parameters()?),
            TlsMode::None => Tls::None,
        })
    }

    /// The relay as logs show it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The `Message-ID` of every attempt of job `task_id`.
    pub fn message_id(&self, task_id: u64) -> String {
        format!("<taskd.{task_id}.{}@{}>", self.id_tag, self.id_domain)
    }
}

/// `--mail-from`: `noreply@example.com` or `Shop <noreply@example.com>`.
pub fn parse_mail_from(text: &str) -> Result<Mailbox, String> {
    text.parse::<Mailbox>().map_err(|e| {
        format!("{text:?} is not an address (noreply@example.com or 'Shop <noreply@example.com>'): {e}")
    })
}

fn read_ca_file(path: &Path) -> Result<Vec<Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    let mut certs = Vec::new();
    let mut rest = &text[..];
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else { break };
        let block = &rest[start..start + len + END.len()];
        let cert = Certificate::from_pem(block.as_bytes())
            .map_err(|e| format!("{}: a certificate cannot be read: {e}", path.display()))?;
        certs.push(cert);
        rest = &rest[start + len + END.len()..];
    }
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display()));
    }
    Ok(certs)
}

/// The SMTP transport of one task process: its pool of connections to the relay, which is one
/// connection (a task process sends one email at a time), opened at the first email, kept
/// between emails and replaced after [`IDLE_MAX`] idle. A kept connection is used without a
/// NOOP first (a round trip per email): if the relay closed it meanwhile, the transaction fails
/// at its first command, before anything was accepted, and runs once more on a new connection.
///
/// lettre's own pool (`SmtpTransport`) is not used: its `send` writes a message's content and
/// its final `.` in two writes, and on a kept connection Nagle's algorithm holds the second
/// until the relay's delayed ACK, some 40 ms per email. Here the content and the `.` go in one.
pub struct Smtp {
    settings: SmtpSettings,
    tls: Tls,
    hello: ClientId,
    credentials: Option<Credentials>,
    /// The kept connection, and when its last transaction ended.
    conn: Option<(SmtpConnection, Instant)>,
}

/// How long a connection may stay idle before it is replaced rather than reused.
const IDLE_MAX: Duration = Duration::from_secs(60);

/// How long the relay may take to answer one command (or to take the message after DATA).
const TIMEOUT: Duration = Duration::from_secs(60);

type SmtpError = lettre::transport::smtp::Error;

impl Smtp {
    pub fn new(settings: &SmtpSettings) -> Result<Smtp, String> {
        let url = &settings.url;
        let credentials = match (&url.user, &url.pass) {
            (Some(user), Some(pass)) => Some(Credentials::new(user.clone(), pass.clone())),
            _ => None,
        };
        Ok(Smtp {
            tls: settings.tls()?,
            hello: ClientId::default(),
            credentials,
            conn: None,
            settings: settings.clone(),
        })
    }

    /// A new connection: greeting, EHLO, STARTTLS (as `smtp_url` says), login.
    fn connect(&self) -> Result<SmtpConnection, SmtpError> {
        let url = &self.settings.url;
        let wrapper = match &self.tls {
            Tls::Wrapper(parameters) => Some(parameters),
            _ => None,
        };
        let mut conn = SmtpConnection::connect(
            (url.host.as_str(), url.port),
            Some(TIMEOUT),
            &self.hello,
            wrapper,
            None,
        )?;
        match &self.tls {
            Tls::Opportunistic(parameters) if conn.can_starttls() => {
                conn.starttls(parameters, &self.hello)?
            }
            // Fails, and nothing is sent, if the relay does not offer it.
            Tls::Required(parameters) => conn.starttls(parameters, &self.hello)?,
            _ => {}
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)?;
        }
        Ok(conn)
    }

    /// The kept connection (and true) unless it has been idle too long, else a new one.
    fn connection(&mut self) -> Result<(SmtpConnection, bool), SmtpError> {
        if let Some((mut conn, since)) = self.conn.take() {
            if since.elapsed() < IDLE_MAX {
                return Ok((conn, true));
            }
            conn.abort();
        }
        Ok((self.connect()?, false))
    }

    /// One transaction on the kept connection or a new one; the connection is kept after a
    /// success, dropped after a failure.
    fn transact(&mut self, email: &lettre::Message) -> Result<Response, SmtpError> {
        let (mut conn, kept) = self.connection()?;
        let result = match transaction(&mut conn, email) {
            // The relay closed the kept connection meanwhile (or says it is closing it): nothing
            // was taken; once more, on a new one.
            Err((Stage::Mail, _)) if kept => {
                conn.abort();
                conn = self.connect()?;
                transaction(&mut conn, email)
            }
            other => other,
        };
        match result {
            Ok(response) => {
                self.conn = Some((conn, Instant::now()));
                Ok(response)
            }
            Err((_, e)) => {
                // Whatever state the transaction was left in, this connection is done.
                conn.abort();
                Err(e)
            }
        }
    }

    fn build(&self, message: &Message<'_>) -> Result<lettre::Message, Error> {
        let to: Mailbox = message
            .to
            .parse()
            .map_err(|e| Error::Permanent { message: format!("invalid recipient {:?}: {e}", message.to) })?;
        lettre::Message::builder()
            .from(self.settings.from.clone())
            .to(to)
            .subject(message.subject.unwrap_or(""))
            .message_id(Some(self.settings.message_id(message.task_id)))
            .date_now()
            .header(ContentType::TEXT_PLAIN)
            .body(message.body.unwrap_or("").to_string())
            .map_err(|e| Error::Permanent { message: format!("cannot build the email: {e}") })
    }
}

/// Where a transaction failed: at its first command, or later.
enum Stage {
    Mail,
    Later,
}

/// One mail transaction on `conn` (as lettre's `SmtpConnection::send`, but the content and its
/// final `.` in one write).
fn transaction(conn: &mut SmtpConnection, email: &lettre::Message) -> Result<Response, (Stage, SmtpError)> {
    let envelope = email.envelope();
    let content = email.formatted();
    let mut options = Vec::new();
    let non_ascii =
        envelope.from().into_iter().chain(envelope.to()).any(|a| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii && conn.server_info().supports_feature(Extension::SmtpUtfEight) {
        options.push(MailParameter::SmtpUtfEight);
    }
    if !content.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let Ok(text) = std::str::from_utf8(&content) else {
        // Not from this builder (UTF-8 throughout); lettre's own way, in two writes.
        return conn.send(envelope, &content).map_err(|e| (Stage::Later, e));
    };
    conn.command(Mail::new(envelope.from().cloned(), options)).map_err(|e| (Stage::Mail, e))?;
    let later = |e| (Stage::Later, e);
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new())).map_err(later)?;
    }
    conn.command(Data).map_err(later)?;
    conn.command(Content(text)).map_err(later)
}

/// A message's content as DATA sends it: a `.` doubled at the start of a line, then `CRLF.CRLF`.
struct Content<'a>(&'a str);

impl std::fmt::Display for Content<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.starts_with('.') {
            f.write_str(".")?;
        }
        let mut lines = self.0.split("\r\n.");
        if let Some(first) = lines.next() {
            f.write_str(first)?;
        }
        for line in lines {
            f.write_str("\r\n..")?;
            f.write_str(line)?;
        }
        f.write_str("\r\n.\r\n")
    }
}

impl Transport for Smtp {
    fn send(&mut self, message: &Message<'_>) -> Result<Receipt, Error> {
        let email = self.build(message)?;
        tracing::debug!("job {}: email to {} via {}", message.task_id, message.to, self.settings.shown);
        match self.transact(&email) {
            Ok(response) => {
                let text: Vec<&str> = response.message().collect();
                Ok(Receipt { answer: format!("{} {}", response.code(), text.join(" ")) })
            }
            Err(e) => Err(classify(&e, &self.settings)),
        }
    }
}

/// The TLS error under a network error (rustls's, wrapped in an `io::Error`): an untrusted
/// certificate, a failed handshake.
fn tls_failure(e: &lettre::transport::smtp::Error) -> Option<&rustls::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps: look at that one too.
        if let Some(tls) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()?.downcast_ref()) {
            return Some(tls);
        }
        source = err.source();
    }
    None
}

/// A failure of lettre's client as a class of delivery failure: a 4xx reply, a refused, reset
/// or timed-out connection may pass (transient); a 5xx reply will not, nor will a relay whose
/// TLS cannot be trusted or that offers no STARTTLS where it is required (permanent: the
/// configuration must change).
pub fn classify(e: &lettre::transport::smtp::Error, settings: &SmtpSettings) -> Error {
    use std::error::Error as _;
    let reason = e.source().map(ToString::to_string).unwrap_or_default();
    let scrub = |text: String| match &settings.url.pass {
        Some(pass) if !pass.is_empty() => text.replace(pass.as_str(), "***"),
        _ => text,
    };
    let relay = &settings.shown;
    if let Some(code) = e.status() {
        let message = scrub(format!("{code} {reason}").trim_end().to_string());
        return if e.is_transient() {
            Error::Transient { message: format!("relay {relay} answered {message}"), retry_after: None }
        } else {
            Error::Permanent { message: format!("relay {relay} answered {message}") }
        };
    }
    if e.is_tls() || tls_failure(e).is_some() {
        return Error::Permanent {
            message: scrub(format!("TLS with relay {relay} failed (not sent): {reason}")),
        };
    }
    if e.is_client() && reason.contains("STARTTLS") {
        return Error::Permanent {
            message: format!(
                "relay {relay} does not offer STARTTLS, which smtp_url requires (not sent in clear; \
                 ?tls=opportunistic or ?tls=none to allow it)"
            ),
        };
    }
    if e.is_client() {
        return Error::Permanent { message: scrub(format!("relay {relay}: {e}")) };
    }
    // Connection refused or reset, a timeout, a reply cut short: another attempt may succeed.
    Error::Transient { message: scrub(format!("relay {relay}: {e}")), retry_after: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    #[test]
    fn urls_say_how_to_reach_the_relay() {
        let u = SmtpUrl::parse("smtp://app:s%40cret@mail.example.com:2525").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("mail.example.com", 2525, TlsMode::Required));
        assert_eq!((u.user.as_deref(), u.pass.as_deref()), (Some("app"), Some("s@cret")));
        assert!(!format!("{u:?}").contains("cret"));
        let u = SmtpUrl::parse("smtps://mail.example.com").unwrap();
        assert_eq!((u.port, u.tls, u.user), (465, TlsMode::Implicit, None));
        assert_eq!(SmtpUrl::parse("smtp://h").unwrap().port, 587);
        assert_eq!(SmtpUrl::parse("smtp://h:25?tls=none").unwrap().tls, TlsMode::None);
        assert_eq!(SmtpUrl::parse("smtp://h?tls=opportunistic").unwrap().tls, TlsMode::Opportunistic);
        assert_eq!(SmtpUrl::parse("smtp://[::1]:25?tls=none").unwrap().host, "::1");
        for bad in [
            "http://h",
            "smtp://",
            "smtps://h?tls=none",
            "smtp://h?tls=maybe",
            "smtp://h?x=1",
            "smtp://:pw@h",
            "smtp://u:s3cret@h/x",
        ] {
            let err = SmtpUrl::parse(bad).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn message_ids_name_the_job_and_the_sender_domain() {
        let s = SmtpSettings::new("smtp://h", "Shop <noreply@shop.example>", None, "web 1.x").unwrap();
        assert_eq!(s.message_id(42), "<taskd.42.web-1-x@shop.example>");
        assert!(SmtpSettings::new("smtp://h", "not an address", None, "t").is_err());
    }

    /// A relay that answers every connection with `greeting`.
    fn relay_saying(greeting: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut out = stream.try_clone().unwrap();
                let _ = out.write_all(greeting.as_bytes());
                // Read until the client goes.
                let mut lines = BufReader::new(stream);
                let mut line = String::new();
                while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line.starts_with("QUIT") {
                        let _ = out.write_all(b"221 bye\r\n");
                    }
                    line.clear();
                }
            }
        });
        port
    }

    fn send_to(port: u16) -> Result<Receipt, Error> {
        let url = format!("smtp://u:pw@127.0.0.1:{port}?tls=none");
        let settings = SmtpSettings::new(&url, "a@example.com", None, "t").unwrap();
        let mut smtp = Smtp::new(&settings).unwrap();
        let message = Message {
            task_id: 1,
            attempt: 1,
            to: "b@example.com",
            subject: Some("s"),
            body: Some("b"),
            text: None,
        };
        smtp.send(&message)
    }

    #[test]
    fn failures_are_classified() {
        let transient = send_to(relay_saying("421 4.3.2 Service not available, try later\r\n"));
        match transient {
            Err(Error::Transient { message, .. }) => {
                assert!(message.contains("421") && message.contains("try later"), "{message}")
            }
            other => panic!("421 should be transient: {other:?}"),
        }
        let permanent = send_to(relay_saying("554 5.7.1 No service for you\r\n"));
        match permanent {
            Err(Error::Permanent { message }) => {
                assert!(message.contains("554 5.7.1 No service"), "{message}")
            }
            other => panic!("554 should be permanent: {other:?}"),
        }
        // Nothing listens: refused, which may pass.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(matches!(send_to(port), Err(Error::Transient { .. })), "a refused connection is transient");
    }
}
