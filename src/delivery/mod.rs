//! Ways to deliver a message (outbox, SMTP, SMS over HTTP), behind one small trait that a task
//! process calls; which one is chosen once, at start, from the config (lettre's `Transport`
//! is the model). A transport says how a delivery failed, so that the server knows whether
//! another attempt may succeed.
//!
//! | module | owns |
//! | --- | --- |
//! | this one | the trait, the message, the receipt, the classes of failure |
//! | [`sms`] | SMS over an HTTP API (Twilio form or JSON webhook), its failure classes |
//! | [`rate`] | rate limits per channel, shared by a node's task processes (or a queue's nodes) |
//! | [`outbox`] | the outbox file: a simulated delivery, one JSON line per message |
//! | [`smtp`] | email over SMTP (`--smtp-url`): one kept connection per task process, TLS by rustls |

pub mod outbox;
pub mod rate;
pub mod sms;
pub mod smtp;

use std::fmt;
use std::time::Duration;

/// One message, as a transport sends it. Borrowed from the job: nothing is copied per send.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The job's id: the same on every attempt of one job, so the recipient can tell a repeat
    /// (an email's `Message-ID`, an SMS request's `Idempotency-Key`).
    pub task_id: u64,
    /// 1 for the first run.
    pub attempt: u32,
    pub to: &'a str,
    pub subject: Option<&'a str>,
    pub body: Option<&'a str>,
    /// An SMS's text.
    pub text: Option<&'a str>,
}

/// What the other side answered for a delivered message, for the job's `done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The relay's answer (`250 2.0.0 Ok: queued as …`) or the provider's message id.
    pub answer: String,
}

/// How a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Another attempt may succeed (SMTP 4xx, a refused or reset connection, a timeout, HTTP
    /// 408/429/5xx); `retry_after` when the other side said when (HTTP `Retry-After`).
    Transient { message: String, retry_after: Option<Duration> },
    /// No attempt will (SMTP 5xx, any other HTTP 4xx, a bad address): the job fails now, with
    /// the server's words.
    Permanent { message: String },
}

impl Error {
    pub fn message(&self) -> &str {
        match self {
            Error::Transient { message, .. } | Error::Permanent { message } => message,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

/// A way to deliver messages of one channel (email or SMS). A task process holds one per
/// channel, made after the fork (it may hold pooled connections), and calls it for each job.
pub trait Transport {
    fn send(&mut self, message: &Message<'_>) -> Result<Receipt, Error>;
}
