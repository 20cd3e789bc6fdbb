//! The `taskd` binary: flags and config, the control commands, the listening socket, then
//! the server (in the foreground, or detached with `--daemonize`).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::time::Duration;

use taskd::cli::{self, Cli, Command, DeadLetterAction, Settings};
use taskd::control;
use taskd::delivery::outbox::Outbox;
use taskd::delivery::smtp::SmtpSettings;
use taskd::mail::MailApp;
use taskd::process::Credentials;

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    let settings = match cli::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("taskd: {e}");
            return ExitCode::from(2);
        }
    };
    let pid_file = settings.server.pid_file.as_ref();
    match &cli.command {
        Some(Command::Stop { timeout, .. }) => {
            let limit = timeout.unwrap_or(settings.server.max_wait_time + 10);
            return ExitCode::from(control::stop(pid_file, Duration::from_secs(limit)));
        }
        Some(Command::Reload { tasks, .. }) => return ExitCode::from(control::reload(pid_file, *tasks)),
        Some(Command::Status { .. }) => return ExitCode::from(control::status(pid_file)),
        Some(Command::Cancel { task_id, .. }) => {
            let token_file = settings.server.admin_token_file.as_deref();
            return ExitCode::from(control::cancel(pid_file, token_file, *task_id));
        }
        Some(Command::TaskNode { .. }) => return report(task_node(&settings)),
        Some(Command::DeadLetter { action, .. }) => return report(dead_letter(&settings, action)),
        None => {}
    }
    if cli.check_config {
        print!("{}", settings.to_toml());
        return ExitCode::SUCCESS;
    }
    report(serve(&settings))
}

fn report(result: Result<i32, (u8, String)>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err((code, message)) => {
            eprintln!("taskd: {message}");
            ExitCode::from(code)
        }
    }
}

fn durable_settings(settings: &Settings, command: &str) -> Result<taskd::durable::Durable, (u8, String)> {
    // The TLS files are read now, before a task node forks (and drops privileges).
    taskd::durable::redis_io::set_up(&settings.server).map_err(|e| (2, e))?;
    taskd::durable::Durable::from_config(&settings.server)
        .ok_or_else(|| (2, format!("`taskd {command}` needs --redis-url (or redis_url in the config file)")))
}

/// `taskd task-node`: task processes only, taking jobs from the shared stream.
fn task_node(settings: &Settings) -> Result<i32, (u8, String)> {
    let mut server = settings.server.clone();
    // Two task nodes on one host must not share consumer names: the pid tells them apart.
    server.node_id.get_or_insert_with(|| format!("{}-{}", taskd::durable::host_name(), std::process::id()));
    durable_settings(&Settings { server: server.clone(), mail: settings.mail.clone() }, "task-node")?;
    if server.daemonize || server.pid_file.is_some() {
        return Err((
            2,
            "`taskd task-node` runs in the foreground, without a pid file: run it under a supervisor \
             (systemd), and stop it with SIGTERM"
                .into(),
        ));
    }
    let owner = pool_owner(&server)?;
    taskd::logging::init(&server.log_level, server.log_format, server.log_file.as_deref())
        .map_err(|e| (2, e))?;
    open_outbox(settings, owner)?;
    let smtp = smtp_settings(settings)?;
    // One application and one queue's settings for each queue served: a job's rate limit and
    // idempotency key are its queue's.
    let mut served = Vec::new();
    for queue in server.queues() {
        let mut one = server.clone();
        one.redis_queue = queue.to_string();
        let app = MailApp::new(settings.mail.clone())
            .with_smtp(smtp.clone())
            .with_delivery(&one)
            .map_err(|e| (1, e))?;
        let durable =
            taskd::durable::Durable::from_config(&one).ok_or_else(|| (2, "no redis_url".to_string()))?;
        served.push(taskd::durable::node::Served { app, durable });
    }
    taskd::durable::node::run(&mut served, &server).map_err(|e| (1, e))
}

/// `taskd dead-letter list|replay`.
fn dead_letter(settings: &Settings, action: &DeadLetterAction) -> Result<i32, (u8, String)> {
    let d = durable_settings(settings, "dead-letter")?;
    match action {
        DeadLetterAction::List { limit, .. } => {
            let n = taskd::durable::dead_letter::list(&d, *limit, &mut std::io::stdout().lock())
                .map_err(|e| (1, e))?;
            if n == 0 {
                // On stderr: stdout stays one JSON line per dead job, for scripts.
                eprintln!("taskd: no dead jobs in {}", d.keys.dead);
            }
        }
        DeadLetterAction::Replay { ids, all, .. } => {
            if ids.is_empty() && !all {
                return Err((
                    2,
                    "name the dead jobs to replay (ids from `taskd dead-letter list`), or --all".into(),
                ));
            }
            let done = taskd::durable::dead_letter::replay(&d, ids).map_err(|e| (1, e))?;
            println!("replayed {} jobs into {}", done.count, d.keys.jobs);
            for (id, why) in &done.skipped {
                eprintln!("taskd: skipped dead letter {id}: {why}; left in {}", d.keys.dead);
            }
            if !done.skipped.is_empty() {
                eprintln!("taskd: skipped {} entries that cannot be replayed", done.skipped.len());
            }
        }
    }
    Ok(0)
}

/// Whom the pool runs as (`--user`, `--group`): the log file and the outbox are theirs too.
fn pool_owner(server: &taskd::ServerConfig) -> Result<Option<Credentials>, (u8, String)> {
    let Some(user) = &server.user else { return Ok(None) };
    let creds = taskd::process::resolve_credentials(user, server.group.as_deref()).map_err(|e| (2, e))?;
    taskd::logging::set_owner(creds);
    Ok(Some(creds))
}

/// Fails now, with the option's name, rather than in every task process later; creates the
/// outbox for the task processes' user, and has it reopened with the log file on SIGHUP.
fn open_outbox(settings: &Settings, owner: Option<Credentials>) -> Result<(), (u8, String)> {
    let path = &settings.mail.outbox;
    Outbox::open_for(path, owner)
        .map_err(|e| (2, format!("invalid outbox: cannot open {}: {e}", path.display())))?;
    taskd::logging::rotate_with_log(path);
    Ok(())
}

/// Email over SMTP (`smtp_url`), checked and its CA file read before anything forks.
fn smtp_settings(settings: &Settings) -> Result<Option<SmtpSettings>, (u8, String)> {
    let mail = &settings.mail;
    let (Some(url), Some(from)) = (&mail.smtp_url, &mail.mail_from) else { return Ok(None) };
    // What makes a task id unique beyond this run: durable ids are unique across the queue's
    // nodes and runs; in memory they start again at each start of the daemon.
    let tag = match &settings.server.redis_url {
        Some(_) => settings.server.redis_queue.clone(),
        None => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            format!("{}-{}", taskd::durable::host_name(), now.map(|d| d.as_millis()).unwrap_or(0))
        }
    };
    SmtpSettings::new(url, from, mail.smtp_ca_file.as_deref(), &tag)
        .map(Some)
        .map_err(|e| (2, format!("invalid smtp settings: {e}")))
}

/// Runs the daemon; an error is an exit code and a sentence for the terminal.
fn serve(settings: &Settings) -> Result<i32, (u8, String)> {
    let server = &settings.server;
    if server.daemonize {
        // First, before anything is opened: what is open now was inherited.
        taskd::process::prepare_daemon().map_err(|e| (1, format!("cannot run in the background: {e}")))?;
    }
    if let Some(path) = &server.pid_file {
        control::check_not_running(path).map_err(|e| (1, e))?;
    }
    let owner = pool_owner(server)?;
    taskd::logging::init(&server.log_level, server.log_format, server.log_file.as_deref())
        .map_err(|e| (2, e))?;
    open_outbox(settings, owner)?;
    let smtp = smtp_settings(settings)?;
    let listener = taskd::net::bind_listener(&server.host, server.port, server.backlog)
        .map_err(|e| (1, e.to_string()))?;
    let mut report: Option<OwnedFd> = None;
    if server.daemonize {
        report = Some(
            taskd::process::daemonize(server.log_file.is_some())
                .map_err(|e| (1, format!("cannot run in the background: {e}")))?,
        );
    }
    let ready = |announce: &str| {
        if let Some(fd) = report.take() {
            let _ = std::fs::File::from(fd).write_all(announce.as_bytes());
        }
        // Type=notify under systemd; a no-op elsewhere.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    };
    let app = MailApp::new(settings.mail.clone())
        .with_run_limit(server.task_limit())
        .with_trusted_tasks(server.redis_url.is_none())
        .with_smtp(smtp)
        .with_delivery(server)
        .map_err(|e| (1, e))?;
    let result = taskd::run_notify(server, Some(listener), app, ready);
    result.map_err(|e| {
        if let Some(fd) = report.take() {
            let _ = std::fs::File::from(fd).write_all(format!("error: {e}\n").as_bytes());
        }
        (1, e.to_string())
    })
}
