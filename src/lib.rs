//! taskd: a multi-process TCP task server in the Swoole tradition.
//!
//! ```text
//! taskd: master          owns the listening socket and every client connection (mio reactor)
//!  └─ taskd: manager     forks the pool, reaps it, respawns what exits; never touches clients
//!      ├─ taskd: worker N     on_receive / on_finish; hands tasks to the pool; replies via master
//!      └─ taskd: task N       on_task; its result (finish) goes back to the worker slot that sent it
//! ```
//!
//! Every message between processes goes through the master, which keeps the books: a request
//! stays in its worker slot's replay log until the worker commits it, a job stays in the job
//! table until a task process has finished it. A process that dies loses nothing: its
//! successor in the same slot is handed everything it had not finished.
//!
//! | module | runs in | owns |
//! | --- | --- | --- |
//! | [`master`] | master | the reactor, client connections, dispatch, the books |
//! | [`manager`] | manager | the pool: a supervisor, with the master's gate before a respawn |
//! | [`worker`] | worker | `on_receive`, `on_finish`, commits |
//! | [`task_worker`] | task process | `on_task` |
//! | [`process`] | all | the only `fork`, process titles, reaping, why a child ended (`ProcessError`) |
//! | [`supervisor`] | manager, task node, master | every child's slot: respawn and back-off, reaping, timers, stop (SIGTERM → SIGKILL) |
//! | [`ipc`] | all | the envelope, each link's messages (`ToWorker`/`FromWorker`, `ToTask`/`FromTask`, `ToManager`/`FromManager`, `ToBridge`/`FromBridge`), the socketpair channels typed by them |
//! | [`signals`] | all | signals read from a signalfd |
//! | [`shm`] | all | the task id counter and queue length, in shared memory |
//! | [`protocol`] | master | line framing of the client wire format (and telling HTTP from it) |
//! | [`net`] | before the fork, master | binding listeners; which web origins may open a WebSocket |
//! | [`app`] | worker, task | the `Application` trait and its contexts |
//! | [`mail`] | worker, task | the built-in email/SMS application of the `taskd` binary |
//! | [`retry`] | master, task | delivery retries: how many, and the back-off (full jitter) before each |
//! | [`delivery`] | task | ways to deliver a message (outbox, SMTP, SMS over HTTP) behind one trait |
//! | [`cli`], [`config`], [`limits`] | before the fork | flags, the TOML file, validation, RLIMIT_NOFILE |
//! | [`control`] | control commands | the pid file; `taskd stop`, `reload`, `status` |
//! | [`admin`] | before the fork, master | the operator dashboard's token (read, or generated 0600 beside the pid file; compared in constant time) |
//! | [`files`] | all | opening the files taskd writes: no planted links, explicit modes and owner |
//! | [`throttle`] | all | one warning per kind and 10 s under a flood, with the count of the rest |
//! | [`durable`] | bridge, task processes, task nodes | durable jobs in Redis Streams (`redis_url`) |

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod control;
pub mod delivery;
pub mod durable;
pub mod files;
pub mod handler;
pub mod ipc;
pub mod json_line;
pub mod limits;
pub mod log_format;
pub mod logging;
pub mod mail;
pub mod manager;
pub mod master;
pub mod net;
pub mod process;
pub mod protocol;
pub mod retry;
pub mod schedule;
pub mod shm;
pub mod signals;
pub mod supervisor;
pub mod task_worker;
pub mod throttle;
pub mod worker;

pub use app::{
    Application, Finished, ProcessInfo, SessionId, Task, TaskCtx, TaskError, TaskFailure, TaskId, WorkerCtx,
};
pub use config::{DispatchMode, ServerConfig};

use std::io::{self, Write};

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    Config(config::InvalidOption),
    /// A sentence for a person, naming the option at fault.
    Other(String),
    Io {
        what: &'static str,
        source: io::Error,
    },
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Other(e) => f.write_str(e),
            StartError::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for StartError {}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> StartError {
    move |source| StartError::Io { what, source }
}

/// Runs a server on a bound listener until it is stopped; returns the exit code.
///
/// Prints `taskd listening on ADDR` as the first line on stdout once the reactor is set up
/// (and `taskd metrics on http://ADDR/metrics` after it, with `metrics_addr`).
/// Call it from a single-threaded process: it forks.
pub fn run<A: Application>(
    config: &ServerConfig,
    listener: std::net::TcpListener,
    app: A,
) -> Result<i32, StartError> {
    run_notify(config, Some(listener), app, |_| {})
}

/// Runs a server that listens only for WebSocket clients, on `config.ws_port`.
pub fn run_websocket<A: Application>(config: &ServerConfig, app: A) -> Result<i32, StartError> {
    if config.ws_port.is_none() {
        return Err(StartError::Other("invalid ws_port: a WebSocket-only server needs one".into()));
    }
    run_notify(config, None, app, |_| {})
}

/// Like [`run`] (`listener` None: WebSocket only); `ready` receives the lines announced on
/// stdout once the server is listening (a daemonized binary passes them on to the terminal it
/// left, or to systemd).
pub fn run_notify<A: Application>(
    config: &ServerConfig,
    listener: Option<std::net::TcpListener>,
    mut app: A,
    ready: impl FnOnce(&str),
) -> Result<i32, StartError> {
    config.validate().map_err(StartError::Config)?;
    let credentials = match &config.user {
        Some(user) => {
            Some(process::resolve_credentials(user, config.group.as_deref()).map_err(StartError::Other)?)
        }
        None => None,
    };
    if let Some(creds) = credentials {
        // A rotated log file is created anew for the pool, which reopens it.
        logging::set_owner(creds);
    }
    let metrics = match &config.metrics_addr {
        Some(addr) => Some(bind_metrics(addr)?),
        None => None,
    };
    let ws = match config.ws_port {
        Some(port) => Some(
            net::bind_listener(&config.host, port, config.backlog).map_err(|e| bind_error("--ws-port", e))?,
        ),
        None => None,
    };
    let mut config = config.clone();
    if config.redis_url.is_some() && config.node_id.is_none() {
        // Resolved once, so that every process of the node uses the same name.
        config.node_id = Some(durable::host_name());
    }
    // Metrics connections have their own limit, apart from max_conn: room for them too.
    let reserved =
        limits::reserved_fds(config.worker_num, config.task_slots()) + config.metrics_max_conn as u64;
    config.max_conn = limits::raise_nofile(config.max_conn, reserved);
    limits::return_large_buffers();
    let config = &config;
    let shared = shm::Shared::map().map_err(io_err("cannot map shared memory"))?;
    logging::share_rotation(shared);
    // The TLS files are read here, before the fork, by a process that may still read them.
    durable::redis_io::set_up(config).map_err(StartError::Other)?;
    let durable = match durable::Durable::from_config(config) {
        Some(d) => {
            // The lease is taken in `prepare`: the pool's consumers take jobs while the name is
            // surely this node's, from this ask on (renewed by the master, see lease_gate).
            let asked = durable::lease_gate::now_ms();
            let mut recovered = durable::startup::prepare(&d).map_err(StartError::Other)?;
            recovered.last_ticks = durable::ticks::at_start(&d, &config.schedules);
            durable::lease_gate::share(shared);
            durable::lease_gate::held_since_ask(asked);
            shared.set_task_id_base(recovered.first_task_id);
            tracing::info!("durable jobs: node {} on {} ({})", d.node, d.shown, d.keys.jobs);
            Some((d, recovered))
        }
        None => None,
    };
    let workers = (0..config.worker_num)
        .map(|_| ipc::SlotChannel::new())
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_err("cannot create worker channels"))?;
    let tasks = (0..config.task_slots())
        .map(|_| ipc::SlotChannel::new())
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_err("cannot create task channels"))?;
    let addr = match (&listener, &ws) {
        (Some(l), _) | (None, Some(l)) => {
            l.local_addr().map_err(io_err("cannot read the listening address"))?
        }
        (None, None) => {
            return Err(StartError::Other("nothing to listen on: no TCP listener and no ws_port".into()))
        }
    };
    let pid = std::process::id();
    if let Some(path) = &config.pid_file {
        control::PidFile::write(path, pid, addr)
            .map_err(|e| StartError::Other(format!("cannot write the pid file: {e}")))?;
    }
    // The operator's one token: it opens the dashboard on the WebSocket port and lets
    // `taskd cancel N` (over the line port) cancel any connection's job, so it is loaded even
    // without --ws-port.
    let admin_token =
        admin::AdminToken::load_or_generate(config.admin_token_file.as_deref(), config.pid_file.as_deref())
            .map_err(|e| {
            if let Some(path) = &config.pid_file {
                control::PidFile::remove_if_ours(path, pid);
            }
            StartError::Other(e.to_string())
        })?;

    // Blocked before the first fork, so that no signal is missed or inherited as a handler.
    let signals = signals::Signals::open(&master::MASTER_SIGNALS).map_err(io_err("cannot set up signals"))?;
    signals::ignore_file_size_signal().map_err(io_err("cannot ignore SIGXFSZ"))?;
    process::set_title("taskd: master");
    app.on_start(addr);
    let setup = master::MasterSetup {
        config,
        shared,
        listener,
        metrics,
        credentials,
        ws,
        signals,
        workers,
        tasks,
        durable,
        admin_token,
    };
    let started = master::Master::new(&mut app, setup).and_then(|mut master| {
        master.spawn_bridge()?;
        master.spawn_manager()?;
        Ok(master)
    });
    let mut master = match started {
        Ok(m) => m,
        Err(source) => {
            if let Some(path) = &config.pid_file {
                control::PidFile::remove_if_ours(path, pid);
                // A token generated at this start goes with it (never the operator's own file).
                if config.admin_token_file.is_none() {
                    let _ = std::fs::remove_file(admin::generated_path(path));
                }
            }
            return Err(StartError::Io { what: "cannot start the master", source });
        }
    };
    let mut announce = String::new();
    if let Some(tcp) = master.local_addr() {
        announce.push_str(&format!("taskd listening on {tcp}\n"));
    }
    if let Some(w) = master.ws_addr() {
        announce.push_str(&format!("taskd websocket on ws://{w}/ (web page: http://{w}/)\n"));
    }
    if let Some(m) = master.metrics_addr() {
        announce.push_str(&format!("taskd metrics on http://{m}/metrics\n"));
    }
    let mut stdout = io::stdout().lock();
    let _ = stdout.write_all(announce.as_bytes());
    let _ = stdout.flush();
    drop(stdout);
    ready(&announce);
    tracing::info!(
        "taskd master (pid {pid}) listening on {addr}: {} workers, {} task processes, dispatch_mode {}",
        config.worker_num,
        config.task_worker_num,
        u8::from(config.dispatch_mode)
    );
    let code = master.run();
    drop(master);
    if let Some(path) = &config.pid_file {
        control::PidFile::remove_if_ours(path, pid);
    }
    Ok(code)
}

fn bind_metrics(addr: &str) -> Result<std::net::TcpListener, StartError> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| StartError::Other(format!("invalid metrics_addr {addr:?}: expected HOST:PORT")))?;
    net::bind_listener(host, port, 128).map_err(|e| bind_error("--metrics-addr", e))
}

/// A listener of `option` could not be bound: the sentence names the option and the address
/// (the line port's own error points at `--port`).
fn bind_error(option: &str, e: net::BindError) -> StartError {
    StartError::Other(match e {
        net::BindError::InUse(addr) => format!(
            "cannot listen on {addr} for {option}: address already in use (another process, or \
             another of taskd's own listeners, holds it: choose another {option})"
        ),
        other => format!("invalid {option}: {other}"),
    })
}
