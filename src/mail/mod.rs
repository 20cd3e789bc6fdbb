//! The built-in application of the `taskd` binary: email and SMS jobs, as in the seeds.
//!
//! A worker reads the request, hands the job to the task pool and answers `accepted` at once;
//! a task process delivers it through a transport (`delivery`): email over SMTP with
//! `--smtp-url`, SMS to a provider's HTTP API with `sms_url`, else simulated (it takes
//! `simulate_ms`, logs its progress and appends the message to the outbox file); each channel
//! within its rate limit (`delivery::rate`); the worker that submitted it answers `done`.

pub mod request;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::{
    Application, Finished, ProcessInfo, SessionId, Task, TaskCtx, TaskError, TaskFailure, TaskOptions,
    WorkerCtx,
};
use crate::delivery::outbox::Outbox;
use crate::delivery::rate::{Channel, Limiter, Rate};
use crate::delivery::sms::{self, Preset, Sms, SmsSettings};
use crate::delivery::smtp::{Smtp, SmtpSettings};
use crate::delivery::{self, Transport};
use crate::handler::{Handlers, Outcome};
use crate::ipc::Role;
use crate::json_line::JsonLine;
use crate::throttle::Throttle;
use request::{Job, Kind, Request};

/// Options of the email/SMS application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailConfig {
    /// How long a simulated delivery takes, unless a job says otherwise (its `simulate_ms`).
    pub simulate_ms: u64,
    /// Where delivered messages are appended, one JSON line each.
    pub outbox: PathBuf,
    /// How long a batch waits for its slowest job before answering with what is done.
    pub batch_timeout_ms: u64,
    /// Longest email body in bytes: a job's payload is held in the master until it is done.
    pub email_body_max: usize,
    /// How long a job's deduplication `key` stays taken after the job ended.
    #[serde(default = "default_dedup_ttl_ms")]
    pub dedup_ttl_ms: u64,
    /// Jobs a handler runs before its task process replaces it (0: no limit), as
    /// `task_max_request` does for task processes: a handler that leaks is bounded.
    #[serde(default)]
    pub handler_max_jobs: u64,
    // ---- SMS over HTTP and rate limits (`delivery::sms`, `delivery::rate`) ----
    /// The SMS provider's endpoint (`http://` or `https://`); None: SMS go to the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms_url: Option<String>,
    /// The shape of the request: `twilio` (form, basic auth) or `webhook` (JSON, bearer).
    #[serde(default)]
    pub sms_preset: Preset,
    /// The sender's number or name (Twilio's `From`; the webhook's `from` when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms_from: Option<String>,
    /// The webhook's bearer token, or Twilio's auth token when the URL names only the SID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms_token: Option<String>,
    /// How long connecting to the provider may take.
    #[serde(default = "default_sms_connect_timeout_ms")]
    pub sms_connect_timeout_ms: u64,
    /// How long a whole request may take (connecting, sending, the answer).
    #[serde(default = "default_sms_timeout_ms")]
    pub sms_timeout_ms: u64,
    /// SMS sent per second, minute or hour by every task process (every node) together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms_rate: Option<Rate>,
    /// The same for email, whatever its transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_rate: Option<Rate>,
    /// Email over SMTP: the relay, `smtp://USER:PASS@HOST:587` (STARTTLS required unless
    /// `?tls=opportunistic` or `?tls=none`) or `smtps://…:465`. None: emails go to the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_url: Option<String>,
    /// The sender of every email (`Shop <noreply@example.com>`); needed with `smtp_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mail_from: Option<String>,
    /// CA certificates (PEM) the relay's certificate is checked against, instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_ca_file: Option<PathBuf>,
    /// Durable jobs: types this node accepts and queues, each in its lane, for the task nodes
    /// whose handlers run them; it does not run them itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue_types: Vec<String>,
    /// External handlers (`--handler TYPE=COMMAND`, `[handlers]`): job type → command. Last,
    /// since it is a table in the config file.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handlers: BTreeMap<String, String>,
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            simulate_ms: 1000,
            outbox: PathBuf::from("taskd-outbox.log"),
            batch_timeout_ms: 30_000,
            email_body_max: request::FieldLimits::default().email_body_max,
            handler_max_jobs: 0,
            dedup_ttl_ms: default_dedup_ttl_ms(),
            sms_url: None,
            sms_preset: Preset::default(),
            sms_from: None,
            sms_token: None,
            sms_connect_timeout_ms: default_sms_connect_timeout_ms(),
            sms_timeout_ms: default_sms_timeout_ms(),
            sms_rate: None,
            smtp_rate: None,
            smtp_url: None,
            mail_from: None,
            smtp_ca_file: None,
            queue_types: Vec::new(),
            handlers: BTreeMap::new(),
        }
    }
}

fn default_dedup_ttl_ms() -> u64 {
    3_600_000
}

fn default_sms_connect_timeout_ms() -> u64 {
    5_000
}

fn default_sms_timeout_ms() -> u64 {
    15_000
}

/// The longest `sms_timeout_ms` and `sms_connect_timeout_ms`: a provider that has not answered
/// in five minutes holds a task process for nothing.
pub const MAX_SMS_TIMEOUT_MS: u64 = 300_000;

impl MailConfig {
    /// The SMS transport's settings, if SMS go to a provider; `scope` makes the jobs'
    /// `Idempotency-Key`s unique beyond their ids (`sms::idempotency_scope`).
    pub fn sms_settings(&self, scope: String) -> Option<SmsSettings> {
        Some(SmsSettings {
            url: self.sms_url.clone()?,
            preset: self.sms_preset,
            from: self.sms_from.clone(),
            token: self.sms_token.clone(),
            connect_timeout: Duration::from_millis(self.sms_connect_timeout_ms),
            timeout: Duration::from_millis(self.sms_timeout_ms),
            scope,
        })
    }

    /// The SMS and rate options, checked at start: the reason never quotes a secret.
    pub fn check_delivery(&self) -> Result<(), crate::config::InvalidOption> {
        use crate::config::InvalidOption;
        for (option, ms) in
            [("sms_connect_timeout_ms", self.sms_connect_timeout_ms), ("sms_timeout_ms", self.sms_timeout_ms)]
        {
            if !(1..=MAX_SMS_TIMEOUT_MS).contains(&ms) {
                let reason = format!("{ms} is not from 1 to {MAX_SMS_TIMEOUT_MS} ms (five minutes)");
                return Err(InvalidOption { option, reason });
            }
        }
        if let Some(settings) = self.sms_settings(String::new()) {
            sms::validate(&settings).map_err(|reason| InvalidOption { option: "sms_url", reason })?;
        }
        Ok(())
    }
}

/// A transport's failure as the server acts on it.
fn failure(e: delivery::Error) -> TaskFailure {
    match e {
        delivery::Error::Transient { message, retry_after } => {
            TaskFailure::Transient { error: message, retry_after }
        }
        delivery::Error::Permanent { message } => TaskFailure::Permanent(message),
    }
}

/// One reply line: a JSON object and its line ending.
fn line(value: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!("{{\"event\":\"error\",\"error\":\"{e}\"}}").into_bytes());
    out.push(b'\n');
    out
}

/// What `on_finish` needs to answer a job: carried with the task, since the worker that
/// submitted it may have been replaced by the time it finishes.
#[derive(Debug, Serialize, Deserialize)]
struct Context {
    #[serde(rename = "type")]
    kind: String,
    /// One recipient, or one per member of a batch.
    to: Vec<String>,
}

impl Context {
    /// The context of one job, as serde_json writes a [`Context`], without building one: it
    /// is made for every job.
    #[cfg(test)]
    fn of_one(kind: &'static str, to: &str) -> Vec<u8> {
        let mut out = Vec::new();
        Self::of_one_into(kind, to, &mut out);
        out
    }

    /// [`Context::of_one`], written at the end of `out`.
    fn of_one_into(kind: &'static str, to: &str, out: &mut Vec<u8>) {
        out.reserve(24 + kind.len() + to.len());
        // The type is this program's own word: nothing in it to escape.
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\",\"to\":[");
        crate::json_line::push_str(out, to);
        out.extend_from_slice(b"]}");
    }
}

pub struct MailApp {
    config: MailConfig,
    outbox: Option<Outbox>,
    /// The relay, when emails go by SMTP (`with_smtp`), and this task process's pool to it.
    smtp: Option<SmtpSettings>,
    email: Option<Smtp>,
    pid: u32,
    /// The server's `task_timeout`: no job may ask for a longer delivery (`simulate_ms`).
    run_limit: Option<Duration>,
    /// Task data comes only from this node's own workers, which validated it (no Redis): not
    /// checked again per job. False by default: a task node's jobs come from Redis.
    trusted_tasks: bool,
    /// Warnings of refused jobs, one per kind of refusal and 10 s: a flood of them (a full
    /// queue) must not flood the log.
    refusals: [Throttle; 6],
    /// The types with an external handler, for the workers' parser.
    handled: Vec<String>,
    /// The handlers this task process has started (none in a worker).
    handlers: Handlers,
    /// SMS over HTTP: the settings (from the start), the transport (per task process).
    sms_settings: Option<SmsSettings>,
    sms: Option<Sms>,
    /// The channels' rate limits, shared by the node's task processes (mapped before the fork).
    limiter: Option<Limiter>,
    /// A job's context, task data and `accepted` line are written into these and copied into
    /// the worker's output from there: three buffers kept, not three allocated per job.
    scratch: [Vec<u8>; 3],
}

impl MailApp {
    pub fn new(config: MailConfig) -> Self {
        // Queued types are accepted here and run by another node's handler.
        let handled = config.handlers.keys().chain(&config.queue_types).cloned().collect();
        let handlers = Handlers::new(&config.handlers, config.handler_max_jobs);
        MailApp {
            config,
            outbox: None,
            smtp: None,
            email: None,
            pid: std::process::id(),
            run_limit: None,
            trusted_tasks: false,
            refusals: Default::default(),
            scratch: Default::default(),
            handled,
            handlers,
            sms_settings: None,
            sms: None,
            limiter: None,
        }
    }

    /// Real delivery, chosen once at start from the config: SMS to the provider of `sms_url`,
    /// and the channels' rate limits (the queue's, in Redis, with durable jobs). Call before
    /// the fork: the limits live in shared memory mapped here.
    pub fn with_delivery(mut self, server: &crate::config::ServerConfig) -> Result<Self, String> {
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.sms_settings = self.config.sms_settings(sms::idempotency_scope(server, started_ms));
        let limiter = Limiter::new(self.config.smtp_rate, self.config.sms_rate)
            .map_err(|e| format!("cannot map shared memory for the rate limits: {e}"))?;
        self.limiter = Some(match &server.redis_url {
            Some(url) => limiter.with_redis(url, &crate::durable::keys::Keys::new(&server.redis_queue, "")),
            None => limiter,
        });
        Ok(self)
    }

    /// Takes the channel's turn to send, or says how long the job must wait (a rate limit).
    /// Until the delayed queue runs such jobs again, the server fails them with `why`.
    fn take_turn(&mut self, kind: Kind) -> Result<(), TaskFailure> {
        let channel = match kind {
            Kind::Email => Channel::Email,
            Kind::Sms => Channel::Sms,
        };
        let Some(limiter) = &mut self.limiter else { return Ok(()) };
        limiter.take(channel).map_err(|wait| TaskFailure::NotYet {
            wait,
            why: format!(
                "rate limit: {} {} reached, next turn in {} ms",
                channel.option(),
                limiter.rate(channel).map(|r| r.to_string()).unwrap_or_default(),
                wait.as_millis().max(1)
            ),
        })
    }

    /// Sends an SMS to the provider; the `done` carries its message id.
    fn send_sms(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        task: &Task<'_>,
        job: &Job,
    ) -> Result<Vec<u8>, TaskFailure> {
        let sms = self.sms.as_mut().ok_or("the SMS transport is not ready")?;
        let message = delivery::Message {
            task_id: task.id,
            attempt: task.attempt,
            to: &job.to,
            subject: None,
            body: None,
            text: job.text.as_deref(),
        };
        tracing::info!("job {}: sending SMS to {} (attempt {})", task.id, job.to, task.attempt);
        let receipt = sms.send(&message).map_err(failure)?;
        Ok(Self::done(ctx, task, job, receipt.answer))
    }

    /// Answers the job's `done` from here (the shortest path), with its result, and logs the
    /// job's one line at info: what it was, and what came of it.
    fn done(ctx: &mut TaskCtx<'_>, task: &Task<'_>, job: &Job, result: String) -> Vec<u8> {
        let pid = ctx.info().pid;
        let (kind, to, attempts) = (job.kind.name(), &job.to[..], task.attempt);
        if tracing::enabled!(tracing::Level::INFO) {
            // Written piece by piece into the line (`info_line`): formatted through
            // `format_args!` (five values, six pieces, each escaped on its own) and tracing's
            // event it cost more than the rest of a no-op job's task process.
            let message = |m: &mut crate::logging::Message<'_>| {
                m.word("job ").num(task.id).word(" done: ").text(&result).word(" (").word(kind);
                m.word(" to ").text(to).word(", attempt ").num(attempts.into()).word(")");
            };
            if !crate::logging::outcome_line(message) {
                let mut text = String::with_capacity(64 + result.len() + 2 * to.len());
                message(&mut crate::logging::Message::plain(&mut text));
                tracing::info!(message = text.as_str());
            }
        }
        // Written in the reply's own buffer: no line of its own to copy there.
        ctx.reply_with(|reply| {
            reply.reserve(128 + result.len() + to.len());
            let mut done = JsonLine::after(std::mem::take(reply));
            done.word("event", "done").num("task_id", task.id).word("type", kind).str("to", to);
            done.str("result", &result).num("task_pid", pid.into()).num("attempts", attempts.into());
            *reply = done.finish();
        });
        result.into_bytes()
    }

    /// Refuses jobs whose `simulate_ms` is longer than `limit` (the server's `task_timeout`).
    pub fn with_run_limit(mut self, limit: Option<Duration>) -> Self {
        self.run_limit = limit;
        self
    }

    /// Task data comes only from this node's workers (no durable jobs, which anyone who can
    /// write to Redis can forge): the task processes skip checking each job's address again.
    pub fn with_trusted_tasks(mut self, trusted: bool) -> Self {
        self.trusted_tasks = trusted;
        self
    }

    /// Emails go to this relay (`smtp_url`) instead of the outbox.
    pub fn with_smtp(mut self, smtp: Option<SmtpSettings>) -> Self {
        self.smtp = smtp;
        self
    }

    fn reply(ctx: &mut WorkerCtx<'_>, session: SessionId, value: impl Serialize) {
        ctx.send(session, &line(&value));
    }

    fn error(ctx: &mut WorkerCtx<'_>, session: SessionId, message: &str) {
        Self::reply(ctx, session, json!({"event": "error", "error": message}));
    }

    fn refused(&mut self, ctx: &mut WorkerCtx<'_>, session: SessionId, err: TaskError) {
        let kind = match err {
            TaskError::Busy { .. } => 0,
            TaskError::QueueBytes { .. } => 1,
            TaskError::TooLarge { .. } => 2,
            TaskError::ExceedsQueue { .. } => 3,
            TaskError::NoSuchTaskProcess { .. } => 4,
            TaskError::Unavailable(_) => 5,
        };
        if let Some(n) = self.refusals[kind].log() {
            tracing::warn!("task not accepted: {err}{}", crate::throttle::unlogged(n));
        }
        let value = match err {
            TaskError::Busy { queued, limit } => json!({
                "event": "error", "error": "server busy, retry later", "queued": queued, "task_queue_max": limit,
            }),
            TaskError::TooLarge { .. }
            | TaskError::ExceedsQueue { .. }
            | TaskError::QueueBytes { .. }
            | TaskError::NoSuchTaskProcess { .. }
            | TaskError::Unavailable(_) => {
                json!({"event": "error", "error": err.to_string()})
            }
        };
        Self::reply(ctx, session, value);
    }

    fn submit_job(&mut self, ctx: &mut WorkerCtx<'_>, session: SessionId, job: &Job) {
        let [mut context, mut data, mut accepted] = std::mem::take(&mut self.scratch);
        Context::of_one_into(job.kind.name(), &job.to, &mut context);
        job.to_json_into(&mut data);
        let options = TaskOptions {
            run_at: job.run_at_ms.map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms)),
            priority: job.priority,
            key: job.key.clone(),
            dedup_ttl: Duration::from_millis(self.config.dedup_ttl_ms),
        };
        let submitted = match job.task_worker {
            Some(slot) => ctx.task_to(slot, session, &context, &data),
            None => ctx.task_for_with(session, &context, &data, &options),
        };
        match submitted {
            Ok(task_id) => {
                // A job's line at info is its task process's, when it is done (one line per job
                // is what the default log level can afford); a job due later says so now.
                if job.run_at_ms.is_some() {
                    tracing::info!(
                        "{} to {} accepted as job {task_id}, to run later",
                        job.kind.name(),
                        job.to
                    );
                } else {
                    tracing::debug!("{} to {} accepted as job {task_id}", job.kind.name(), job.to);
                }
                accepted.reserve(96 + job.to.len());
                let mut json = JsonLine::after(std::mem::take(&mut accepted));
                json.word("event", "accepted").num("task_id", task_id).word("type", job.kind.name());
                json.str("to", &job.to).num("worker_pid", self.pid.into());
                // When it runs, for a job scheduled ahead (RFC 3339, UTC).
                if let Some(run_at) = job.run_at_ms.map(crate::app::rfc3339) {
                    json.str("run_at", &run_at);
                }
                accepted = json.finish();
                ctx.send(session, &accepted);
            }
            Err(e) => self.refused(ctx, session, e),
        }
        // Emptied for the next job; a large job's buffers are not kept (a worker stays small).
        for buf in [&mut context, &mut data, &mut accepted] {
            buf.clear();
            if buf.capacity() > 16 * 1024 {
                *buf = Vec::new();
            }
        }
        self.scratch = [context, data, accepted];
    }

    /// A job for an external handler: passed on as the client wrote it.
    fn submit_handled(
        &mut self,
        ctx: &mut WorkerCtx<'_>,
        session: SessionId,
        kind: &str,
        job: &serde_json::Map<String, serde_json::Value>,
    ) {
        let context = Context { kind: kind.into(), to: Vec::new() };
        let (Ok(context), Ok(data)) = (serde_json::to_vec(&context), serde_json::to_vec(job)) else {
            return Self::error(ctx, session, "internal error: cannot encode the job");
        };
        match ctx.task_for(session, &context, &data) {
            Ok(task_id) => {
                tracing::debug!("{kind} job accepted as job {task_id}");
                let accepted =
                    json!({"event": "accepted", "task_id": task_id, "type": kind, "worker_pid": self.pid});
                Self::reply(ctx, session, accepted);
            }
            Err(e) => self.refused(ctx, session, e),
        }
    }

    /// Runs a job on its external handler, in this task process.
    fn run_handled(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        task: &Task<'_>,
        kind: &str,
        job: &serde_json::Value,
    ) -> Result<Vec<u8>, TaskFailure> {
        match self.handlers.run(kind, task.id, task.attempt, job) {
            Outcome::Done(result) => {
                let pid = ctx.info().pid;
                tracing::info!("job {} done: {result} ({kind} job, attempt {})", task.id, task.attempt);
                ctx.reply(&line(&json!({
                    "event": "done", "task_id": task.id, "type": kind, "result": &result,
                    "task_pid": pid, "attempts": task.attempt,
                })));
                serde_json::to_vec(&result)
                    .map_err(|e| TaskFailure::Permanent(format!("cannot encode the handler's result: {e}")))
            }
            Outcome::Failed(why) => Err(TaskFailure::Permanent(why)),
            // The master runs it again after a back-off (delivery_retry_max); the handler,
            // if it is alive, keeps running.
            Outcome::Again(why) => Err(TaskFailure::Transient { error: why, retry_after: None }),
        }
    }

    fn submit_batch(&mut self, ctx: &mut WorkerCtx<'_>, session: SessionId, jobs: &[Job]) {
        let context = Context { kind: "batch".into(), to: jobs.iter().map(|j| j.to.clone()).collect() };
        let encoded: Result<Vec<Vec<u8>>, _> = jobs.iter().map(serde_json::to_vec).collect();
        let (Ok(context), Ok(items)) = (serde_json::to_vec(&context), encoded) else {
            return Self::error(ctx, session, "internal error: cannot encode the batch");
        };
        let items: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
        let timeout = Duration::from_millis(self.config.batch_timeout_ms);
        match ctx.task_group(session, &context, &items, Some(timeout)) {
            Ok(task_id) => Self::reply(
                ctx,
                session,
                json!({"event": "accepted", "task_id": task_id, "type": "batch", "count": jobs.len(), "worker_pid": self.pid}),
            ),
            Err(e) => self.refused(ctx, session, e),
        }
    }

    fn deliver(&mut self, ctx: &mut TaskCtx<'_>, task: &Task<'_>) -> Result<Vec<u8>, TaskFailure> {
        let job: Job = if self.handlers.is_empty() {
            Job::from_json(task.data).map_err(|e| format!("task data is not a job: {e}"))?
        } else {
            // A handler may override a built-in type: look at the type first.
            let value: serde_json::Value =
                serde_json::from_slice(task.data).map_err(|e| format!("task data is not a job: {e}"))?;
            match value.get("type").and_then(serde_json::Value::as_str) {
                Some(kind) if self.handlers.handles(kind) => {
                    let kind = kind.to_string();
                    return self.run_handled(ctx, task, &kind, &value);
                }
                _ => serde_json::from_value(value).map_err(|e| format!("task data is not a job: {e}"))?,
            }
        };
        // Task data may come from Redis (durable jobs), which others can write: checked again as
        // a client's request is (a newline in an address would forge a line of the log). From
        // this node's own workers it was checked already.
        if !self.trusted_tasks {
            match job.kind {
                Kind::Email => request::valid_email(&job.to)?,
                Kind::Sms => request::valid_phone(&job.to)?,
            };
            if job.simulate_ms.is_some_and(|ms| ms > request::MAX_SIMULATE_MS) {
                return Err(format!(
                    "task data is not a job: simulate_ms above {}",
                    request::MAX_SIMULATE_MS
                )
                .into());
            }
        }
        self.take_turn(job.kind)?;
        if job.kind == Kind::Sms && self.sms.is_some() {
            return self.send_sms(ctx, task, &job);
        }
        let delay = Duration::from_millis(job.simulate_ms.unwrap_or(self.config.simulate_ms));
        let pid = ctx.info().pid;
        let message = delivery::Message {
            task_id: task.id,
            attempt: task.attempt,
            to: &job.to,
            subject: job.subject.as_deref(),
            body: job.body.as_deref(),
            text: job.text.as_deref(),
        };
        let mut outbox;
        let transport: &mut dyn Transport = match (job.kind, self.email.as_mut()) {
            (Kind::Email, Some(smtp)) => smtp,
            _ => {
                outbox = self.outbox.as_mut().ok_or("the outbox is not open")?.for_job(job.kind, delay, pid);
                &mut outbox
            }
        };
        let result = transport.send(&message).map_err(failure)?.answer;
        // The client's `done` leaves with the result, straight from here: the shortest path,
        // and never for a run that died (it runs again and answers then).
        Ok(Self::done(ctx, task, &job, result))
    }
}

impl Application for MailApp {
    fn on_start(&mut self, addr: std::net::SocketAddr) {
        let outbox = self.config.outbox.display();
        let email =
            self.smtp.as_ref().map_or_else(|| format!("the outbox {outbox}"), |s| s.shown().to_string());
        let sms = match &self.sms_settings {
            Some(_) => format!("the {} API", self.config.sms_preset),
            None => format!("the outbox {outbox}"),
        };
        tracing::info!("email/SMS service ready on {addr}; email via {email}, SMS to {sms}");
    }

    fn on_worker_start(&mut self, info: &ProcessInfo) -> Result<(), String> {
        self.pid = info.pid;
        if info.role == Role::Task {
            // A task process that cannot deliver must not take jobs: it fails, and the manager
            // retries it with a back-off until the outbox can be opened again.
            let outbox = Outbox::open(&self.config.outbox)
                .map_err(|e| format!("cannot open the outbox {}: {e}", self.config.outbox.display()))?;
            self.outbox = Some(outbox);
            if let Some(settings) = &self.sms_settings {
                self.sms = Some(Sms::new(settings)?);
            }
            // Its own connection, made after the fork: no connection is shared between processes.
            if let Some(settings) = &self.smtp {
                self.email = Some(Smtp::new(settings)?);
            }
        }
        Ok(())
    }

    fn on_connect(&mut self, _ctx: &mut WorkerCtx<'_>, session: SessionId, peer: &str) {
        tracing::debug!("client {peer} connected (session {session})");
    }

    fn on_receive(&mut self, ctx: &mut WorkerCtx<'_>, session: SessionId, data: &[u8]) {
        let limits = request::FieldLimits { email_body_max: self.config.email_body_max };
        let parsed = request::parse_for(data, &limits, &self.handled).and_then(|r| {
            let jobs = match &r {
                Request::Job(job) => std::slice::from_ref(job),
                Request::Batch(jobs) => &jobs[..],
                _ => &[],
            };
            jobs.iter().try_for_each(|job| request::check_delay(job, self.run_limit)).map(|()| r)
        });
        match parsed {
            Err(message) => {
                tracing::debug!("bad request from session {session}: {message}");
                Self::error(ctx, session, &message);
            }
            Ok(Request::Stats) => ctx.send_stats(session),
            Ok(Request::Result(task_id)) => ctx.send_result(session, task_id),
            Ok(Request::Cancel(task_id, None)) => ctx.cancel(session, task_id),
            Ok(Request::Cancel(task_id, Some(token))) => ctx.cancel_as_operator(session, task_id, &token),
            // `email ADDRESS` or a bare address, when a handler overrides the type.
            Ok(Request::Job(job)) if self.handled.iter().any(|k| k == job.kind.name()) => {
                match serde_json::to_value(&job) {
                    Ok(serde_json::Value::Object(obj)) => {
                        self.submit_handled(ctx, session, job.kind.name(), &obj)
                    }
                    _ => Self::error(ctx, session, "internal error: cannot encode the job"),
                }
            }
            Ok(Request::Job(job)) => self.submit_job(ctx, session, &job),
            Ok(Request::Handled { kind, job }) => self.submit_handled(ctx, session, &kind, &job),
            Ok(Request::Batch(jobs)) => self.submit_batch(ctx, session, &jobs),
        }
    }

    fn on_close(&mut self, _ctx: &mut WorkerCtx<'_>, session: SessionId) {
        tracing::debug!("session {session} closed");
    }

    fn on_task(&mut self, ctx: &mut TaskCtx<'_>, task: &Task<'_>) -> Result<Vec<u8>, TaskFailure> {
        self.deliver(ctx, task)
    }

    /// A handler's job waiting behind the one about to run is written to its handler now.
    fn on_task_ahead(&mut self, task: &Task<'_>) {
        if self.handlers.is_empty() {
            return;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(task.data) else { return };
        if let Some(kind) = value.get("type").and_then(serde_json::Value::as_str) {
            if self.handlers.handles(kind) {
                self.handlers.send_ahead(kind, task.id, task.attempt, &value);
            }
        }
    }

    /// The outbox's lines of the jobs whose results are about to leave: written now, in one
    /// write; a job whose line is not in the file fails.
    fn on_task_results(&mut self) -> Vec<(crate::app::TaskId, String)> {
        self.outbox.as_mut().map(Outbox::commit).unwrap_or_default()
    }

    /// A job that succeeded and replied from its task process was logged there: nothing is
    /// left to do for it here.
    fn finish_replied(&self) -> bool {
        false
    }

    fn on_finish(&mut self, ctx: &mut WorkerCtx<'_>, finished: &Finished<'_>) {
        let Some(session) = finished.session else { return };
        if finished.replied && finished.members.is_none() && finished.result.is_ok() {
            // Its `done` went to the client from the task process, which logged the job.
            return;
        }
        let context: Context = match serde_json::from_slice(finished.context) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("job {}: unreadable context: {e}", finished.id);
                return;
            }
        };
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let value = if let Some(members) = &finished.members {
            let results: Vec<_> = members
                .iter()
                .enumerate()
                .map(|(i, outcome)| {
                    let to = context.to.get(i).cloned().unwrap_or_default();
                    match outcome {
                        Ok(r) => json!({"to": to, "result": text(r)}),
                        Err(e) => json!({"to": to, "error": e}),
                    }
                })
                .collect();
            match finished.result {
                Ok(_) => {
                    json!({"event": "done", "task_id": finished.id, "type": "batch", "results": results})
                }
                // Cut short at shutdown: one `failed` for the batch, with what is known of each.
                Err(e) => {
                    tracing::warn!("batch {} failed: {e}", finished.id);
                    json!({"event": "failed", "task_id": finished.id, "type": "batch", "error": e, "results": results})
                }
            }
        } else {
            let to = context.to.first().cloned().unwrap_or_default();
            match finished.result {
                Ok(r) => {
                    tracing::debug!("job {} done: {}", finished.id, text(r));
                    json!({
                        "event": "done", "task_id": finished.id, "type": context.kind, "to": to,
                        "result": text(r), "task_pid": finished.task_pid, "attempts": finished.attempts,
                    })
                }
                Err(e) => {
                    tracing::warn!("job {} failed: {e}", finished.id);
                    let mut failed = json!({
                        "event": "failed", "task_id": finished.id, "type": context.kind, "to": to,
                        "error": e, "attempts": finished.attempts,
                    });
                    // A handler's job has no recipient that taskd knows of.
                    if context.to.is_empty() {
                        if let Some(obj) = failed.as_object_mut() {
                            obj.remove("to");
                        }
                    }
                    failed
                }
            }
        };
        Self::reply(ctx, session, value);
    }
}

#[cfg(test)]
mod tests {
    use super::Context;

    #[test]
    fn a_jobs_context_is_what_serde_json_writes_for_it() {
        for (kind, to) in [("email", "a@example.com"), ("sms", "+15551234567"), ("email", "q\"uote\\d@x")] {
            let kind: &'static str = kind;
            let context = Context { kind: kind.into(), to: vec![to.into()] };
            assert_eq!(Context::of_one(kind, to), serde_json::to_vec(&context).unwrap());
        }
    }
}
