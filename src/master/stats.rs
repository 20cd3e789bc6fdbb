//! The server's counters and the `stats` line built from them (Swoole's `stats()` names).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::jobs::Jobs;
use super::slots::{TaskSlot, WorkerSlot};
use crate::config::ServerConfig;

pub struct Counters {
    pub start_time: u64,
    pub started: Instant,
    pub accept_count: u64,
    pub close_count: u64,
    pub request_count: u64,
    pub dispatch_count: u64,
    pub tasks_accepted: u64,
    pub tasks_done: u64,
    pub tasks_failed: u64,
    pub tasks_retried: u64,
    /// Delivery retries scheduled (`TaskFailure::Transient`), apart from `tasks_retried`.
    pub delivery_retries: u64,
    /// Jobs accepted with a `run_at` to come, and jobs cancelled before they started.
    pub scheduled: u64,
    pub tasks_cancelled: u64,
    /// Jobs of schedule ticks another web node claimed first (durable jobs): dropped here.
    pub ticks_elsewhere: u64,
    /// Jobs not run because another held their key.
    pub duplicates: u64,
    pub worker_crashes: u64,
    pub task_crashes: u64,
    pub fork_failures: u64,
    /// Results that came after their group was answered at its timeout.
    pub late_results_dropped: u64,
    /// Bytes of unfinished request lines (and input read ahead) held for all connections.
    pub partial_bytes: usize,
    /// Connections dropped because their unfinished line did not fit `partial_lines_max`.
    pub partial_refused: u64,
    /// Connections not read now (input flow control), and how many times one was paused.
    pub input_paused: u64,
    pub input_pauses: u64,
    /// Bytes of requests sent to workers and not committed yet, all connections together.
    pub input_bytes: usize,
    /// Reply bytes waiting for slow readers, all connections together (`output_total_max`),
    /// and connections disconnected for holding the most past it.
    pub output_bytes: usize,
    pub output_refused: u64,
    /// Refusals and timeouts per listener (`Listener as usize`: line, WebSocket, metrics).
    pub listeners: [Refusals; 3],
}

/// What one listener refused or timed out since the start.
#[derive(Debug, Default, Clone, Copy)]
pub struct Refusals {
    /// New connections refused at the listener's limit (`max_conn`, `ws_handshake_max`,
    /// `metrics_max_conn`): an error line or a 503.
    pub full: u64,
    /// New connections refused for lack of file descriptors.
    pub no_fd: u64,
    /// Connections closed for not finishing their upgrade or request in `handshake_timeout`.
    pub timeouts: u64,
    /// WebSocket upgrades from a page whose `Origin` is not allowed (403).
    pub origin: u64,
    /// Line-port connections closed for sending HTTP.
    pub http: u64,
}

/// The listeners' names, in `Listener as usize` order.
const LISTENERS: [&str; 3] = ["line", "ws", "metrics"];

impl Counters {
    pub fn new() -> Self {
        let start_time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Counters {
            start_time,
            started: Instant::now(),
            accept_count: 0,
            close_count: 0,
            request_count: 0,
            dispatch_count: 0,
            tasks_accepted: 0,
            tasks_done: 0,
            tasks_failed: 0,
            tasks_retried: 0,
            delivery_retries: 0,
            scheduled: 0,
            tasks_cancelled: 0,
            ticks_elsewhere: 0,
            duplicates: 0,
            worker_crashes: 0,
            task_crashes: 0,
            fork_failures: 0,
            late_results_dropped: 0,
            partial_bytes: 0,
            partial_refused: 0,
            input_paused: 0,
            input_pauses: 0,
            input_bytes: 0,
            output_bytes: 0,
            output_refused: 0,
            listeners: Default::default(),
        }
    }
}

pub struct Snapshot<'a> {
    pub counters: &'a Counters,
    pub config: &'a ServerConfig,
    pub master_pid: u32,
    pub manager_pid: Option<u32>,
    pub connections: usize,
    pub workers: &'a [WorkerSlot],
    pub tasks: &'a [TaskSlot],
    pub jobs: &'a Jobs,
    /// Jobs in the delayed queue (waiting for a retry or a rate limit).
    pub delayed: usize,
    /// Deduplication keys held.
    pub dedup_keys: usize,
    /// Each periodic job: name, cron, runs, missed, last_run, next_run.
    pub schedules: serde_json::Value,
    /// Waited-for results that came after their waiter gave up (counted by the workers).
    pub late_wait_results: u64,
    /// Log lines the processes of this node could not write (a full disk, a file size limit).
    pub log_lines_lost: u64,
    /// Final replies kept for `result` queries.
    pub results_kept: usize,
    /// Durable jobs: the state of the link to Redis.
    pub durable: Option<serde_json::Value>,
}

/// One `{"event":"stats",…}` line, counters at the top level.
pub fn render(s: &Snapshot<'_>) -> Vec<u8> {
    let c = s.counters;
    let mut processes = vec![
        json!({"role": "master", "pid": s.master_pid}),
        json!({"role": "manager", "pid": s.manager_pid}),
    ];
    for (i, w) in s.workers.iter().enumerate() {
        processes.push(json!({
            "role": "worker", "slot": i, "pid": w.pid().unwrap_or(0), "state": w.state(),
            "served": w.served, "pending": w.books.log.len(), "restarts": w.starts.saturating_sub(1),
        }));
    }
    for (i, t) in s.tasks.iter().enumerate().filter(|(_, t)| t.in_pool() || t.is_alive()) {
        processes.push(json!({
            "role": "task", "slot": i, "pid": t.pid().unwrap_or(0), "state": t.state(),
            "served": t.served, "running": t.books.inflight.len(), "restarts": t.starts.saturating_sub(1),
        }));
    }
    let tasking: usize = s.tasks.iter().map(|t| t.books.inflight.len()).sum();
    let mut line = json!({
        "event": "stats",
        "start_time": c.start_time,
        "uptime_ms": c.started.elapsed().as_millis() as u64,
        "connection_num": s.connections,
        "accept_count": c.accept_count,
        "close_count": c.close_count,
        "request_count": c.request_count,
        "dispatch_count": c.dispatch_count,
        "worker_num": s.config.worker_num,
        "idle_worker_num": s.workers.iter().filter(|w| w.is_alive() && w.books.log.is_empty()).count(),
        "task_worker_num": s.tasks.iter().filter(|t| t.in_pool()).count(),
        "idle_task_worker_num": s.tasks.iter().filter(|t| t.is_alive() && t.books.inflight.is_empty()).count(),
        "tasking_num": tasking,
        "task_queue_num": s.jobs.queued(),
        "delayed": s.delayed,
        "tasks_accepted": c.tasks_accepted,
        "tasks_done": c.tasks_done,
        "tasks_failed": c.tasks_failed,
        "tasks_retried": c.tasks_retried,
        "retries": c.delivery_retries,
        "scheduled": c.scheduled,
        "tasks_cancelled": c.tasks_cancelled,
        "duplicates": c.duplicates,
        "dedup_keys": s.dedup_keys,
        "schedules": s.schedules,
        "schedule_ticks_elsewhere": c.ticks_elsewhere,
        "task_queue_by_priority": {
            "high": s.jobs.queued_by_priority()[0],
            "normal": s.jobs.queued_by_priority()[1],
            "low": s.jobs.queued_by_priority()[2],
        },
        "worker_crashes": c.worker_crashes,
        "task_crashes": c.task_crashes,
        "fork_failures": c.fork_failures,
        "late_results_dropped": c.late_results_dropped + s.late_wait_results,
        "results_kept": s.results_kept,
        "log_lines_lost": s.log_lines_lost,
        "processes": processes,
    });
    if let Some(obj) = line.as_object_mut() {
        // Input flow control and the memory budgets: each use beside its limit.
        let cfg = s.config;
        obj.insert("input_paused_num".into(), c.input_paused.into());
        obj.insert("input_pauses".into(), c.input_pauses.into());
        obj.insert("input_buffer_size".into(), cfg.input_buffer_size.into());
        obj.insert("input_requests_max".into(), cfg.input_requests_max.into());
        obj.insert("input_bytes".into(), c.input_bytes.into());
        obj.insert("input_total_max".into(), cfg.input_total_max.into());
        obj.insert("partial_lines_bytes".into(), c.partial_bytes.into());
        obj.insert("partial_lines_max".into(), cfg.partial_lines_max.into());
        obj.insert("partial_lines_refused".into(), c.partial_refused.into());
        obj.insert("task_queue_bytes".into(), s.jobs.bytes().into());
        obj.insert("task_queue_bytes_max".into(), cfg.task_queue_bytes_max.into());
        obj.insert("output_bytes".into(), c.output_bytes.into());
        obj.insert("output_total_max".into(), cfg.output_total_max.into());
        obj.insert("output_refused".into(), c.output_refused.into());
        // Each listener's refusals and timeouts: `line_refused_full`, `ws_refused_origin`, …
        for (name, r) in LISTENERS.iter().zip(&c.listeners) {
            obj.insert(format!("{name}_refused_full"), r.full.into());
            obj.insert(format!("{name}_refused_no_fd"), r.no_fd.into());
            if *name == "line" {
                obj.insert(format!("{name}_refused_http"), r.http.into());
            } else {
                obj.insert(format!("{name}_handshake_timeouts"), r.timeouts.into());
            }
            if *name == "ws" {
                obj.insert(format!("{name}_refused_origin"), r.origin.into());
            }
        }
    }
    if let (Some(d), Some(obj)) = (&s.durable, line.as_object_mut()) {
        obj.insert("durable".into(), d.clone());
    }
    let mut line = line.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// The same figures in the Prometheus text format (version 0.0.4).
pub fn render_prometheus(s: &Snapshot<'_>) -> String {
    use std::fmt::Write as _;
    let c = s.counters;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP taskd_{name} {help}\n# TYPE taskd_{name} {kind}\ntaskd_{name} {value}");
    };
    metric("start_time_seconds", "gauge", "When the daemon started (Unix time).", c.start_time);
    metric("uptime_seconds", "gauge", "Seconds since the daemon started.", c.started.elapsed().as_secs());
    metric("connections", "gauge", "Client connections open now.", s.connections as u64);
    metric("connections_accepted_total", "counter", "Client connections accepted.", c.accept_count);
    metric("connections_closed_total", "counter", "Client connections closed.", c.close_count);
    metric("requests_total", "counter", "Requests handled by workers.", c.request_count);
    metric("requests_dispatched_total", "counter", "Requests dispatched to workers.", c.dispatch_count);
    metric("tasks_accepted_total", "counter", "Jobs handed to the task pool.", c.tasks_accepted);
    metric("tasks_done_total", "counter", "Jobs finished.", c.tasks_done);
    metric("tasks_failed_total", "counter", "Jobs failed for good.", c.tasks_failed);
    metric(
        "tasks_retried_total",
        "counter",
        "Jobs run again after their task process died.",
        c.tasks_retried,
    );
    let running: usize = s.tasks.iter().map(|t| t.books.inflight.len()).sum();
    metric("tasks_running", "gauge", "Jobs in task processes now.", running as u64);
    metric("tasks_queued", "gauge", "Jobs waiting for a task process.", s.jobs.queued() as u64);
    metric(
        "tasks_delayed",
        "gauge",
        "Jobs waiting in the delayed queue (retry back-off, rate limit).",
        s.delayed as u64,
    );
    metric(
        "delivery_retries_total",
        "counter",
        "Delivery retries scheduled after a transient failure.",
        c.delivery_retries,
    );
    metric("tasks_scheduled_total", "counter", "Jobs accepted with a run_at to come.", c.scheduled);
    metric("tasks_cancelled_total", "counter", "Jobs cancelled before they started.", c.tasks_cancelled);
    metric("tasks_duplicate_total", "counter", "Jobs not run: another held their key.", c.duplicates);
    metric("dedup_keys", "gauge", "Deduplication keys held.", s.dedup_keys as u64);
    metric("worker_crashes_total", "counter", "Workers that died abnormally.", c.worker_crashes);
    metric("task_crashes_total", "counter", "Task processes that died abnormally.", c.task_crashes);
    metric("fork_failures_total", "counter", "Pool processes the manager could not fork.", c.fork_failures);
    metric(
        "log_lines_lost_total",
        "counter",
        "Log lines that could not be written (a full disk, a file size limit).",
        s.log_lines_lost,
    );
    // Input flow control and the memory budgets.
    metric(
        "input_paused_connections",
        "gauge",
        "Connections not read until their worker catches up.",
        c.input_paused,
    );
    metric(
        "input_pauses_total",
        "counter",
        "Times a connection was paused by input flow control.",
        c.input_pauses,
    );
    metric(
        "input_bytes",
        "gauge",
        "Bytes of requests sent to workers, not handled yet.",
        c.input_bytes as u64,
    );
    metric(
        "input_max_bytes",
        "gauge",
        "Budget of requests in flight to workers (input_total_max).",
        s.config.input_total_max as u64,
    );
    metric("partial_lines_bytes", "gauge", "Bytes of unfinished request lines held.", c.partial_bytes as u64);
    metric(
        "partial_lines_max_bytes",
        "gauge",
        "Budget of unfinished request lines (partial_lines_max).",
        s.config.partial_lines_max as u64,
    );
    metric(
        "partial_lines_refused_total",
        "counter",
        "Connections closed because their unfinished line did not fit partial_lines_max.",
        c.partial_refused,
    );
    metric(
        "task_queue_bytes",
        "gauge",
        "Bytes of the payloads of queued or running jobs.",
        s.jobs.bytes() as u64,
    );
    metric(
        "task_queue_max_bytes",
        "gauge",
        "Budget of job payloads (task_queue_bytes_max).",
        s.config.task_queue_bytes_max,
    );
    metric("output_bytes", "gauge", "Reply bytes waiting for slow readers.", c.output_bytes as u64);
    metric(
        "output_max_bytes",
        "gauge",
        "Budget of reply bytes waiting for slow readers (output_total_max).",
        s.config.output_total_max as u64,
    );
    metric(
        "output_refused_total",
        "counter",
        "Connections disconnected for holding the most unread replies past output_total_max.",
        c.output_refused,
    );
    if let Some(d) = &s.durable {
        let n = |key: &str| d[key].as_u64().unwrap_or(0);
        let up = d["redis_up"].as_bool().unwrap_or(false);
        metric("redis_up", "gauge", "1 while the bridge reaches Redis (durable jobs).", u64::from(up));
        metric(
            "store_batches_unacked",
            "gauge",
            "Batches of jobs sent to Redis and not acknowledged yet.",
            n("store_batches_unacked"),
        );
        metric(
            "duplicate_replies_dropped_total",
            "counter",
            "Second outcomes of jobs that ran twice, dropped.",
            n("duplicate_replies_dropped"),
        );
        metric(
            "bridge_restarts_total",
            "counter",
            "Times the redis bridge was replaced.",
            n("bridge_restarts"),
        );
        let _ = writeln!(
            out,
            "# HELP taskd_durable_jobs_by_priority Durable jobs waiting or running in Redis, per priority (up to a second old).\n\
             # TYPE taskd_durable_jobs_by_priority gauge"
        );
        for p in crate::app::Priority::ALL {
            let n = d["by_priority"][p.name()].as_u64().unwrap_or(0);
            let _ = writeln!(out, "taskd_durable_jobs_by_priority{{priority=\"{}\"}} {n}", p.name());
        }
    }
    let _ =
        writeln!(out, "# HELP taskd_listener_refused_total New connections or requests a listener refused.");
    let _ = writeln!(out, "# TYPE taskd_listener_refused_total counter");
    for (name, r) in LISTENERS.iter().zip(&c.listeners) {
        let mut reasons = vec![("full", r.full), ("no_fd", r.no_fd)];
        match *name {
            "line" => reasons.push(("http", r.http)),
            "ws" => reasons.push(("origin", r.origin)),
            _ => {}
        }
        for (reason, n) in reasons {
            let _ =
                writeln!(out, "taskd_listener_refused_total{{listener=\"{name}\",reason=\"{reason}\"}} {n}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP taskd_listener_handshake_timeouts_total Connections closed for not finishing their upgrade or request within handshake_timeout."
    );
    let _ = writeln!(out, "# TYPE taskd_listener_handshake_timeouts_total counter");
    for (name, r) in LISTENERS.iter().zip(&c.listeners).skip(1) {
        let _ =
            writeln!(out, "taskd_listener_handshake_timeouts_total{{listener=\"{name}\"}} {}", r.timeouts);
    }
    let _ = writeln!(
        out,
        "# HELP taskd_tasks_queued_by_priority Jobs waiting for a task process, per priority.\n\
         # TYPE taskd_tasks_queued_by_priority gauge"
    );
    for (p, n) in crate::app::Priority::ALL.iter().zip(s.jobs.queued_by_priority()) {
        let _ = writeln!(out, "taskd_tasks_queued_by_priority{{priority=\"{}\"}} {n}", p.name());
    }
    let _ = writeln!(
        out,
        "# HELP taskd_schedule_runs_total Ticks of a periodic job run.\n# TYPE taskd_schedule_runs_total counter"
    );
    let schedules = s.schedules.as_array().map(Vec::as_slice).unwrap_or_default();
    for e in schedules {
        let _ = writeln!(out, "taskd_schedule_runs_total{{schedule={}}} {}", e["name"], e["runs"]);
    }
    let _ = writeln!(
        out,
        "# HELP taskd_schedule_ticks_elsewhere_total Ticks of a periodic job another web node claimed first (durable jobs).\n\
         # TYPE taskd_schedule_ticks_elsewhere_total counter"
    );
    for e in schedules {
        let n = e["ran_elsewhere"].as_u64().unwrap_or(0);
        let _ = writeln!(out, "taskd_schedule_ticks_elsewhere_total{{schedule={}}} {n}", e["name"]);
    }
    for (metric, field, help) in [
        ("schedule_last_run_timestamp_seconds", "last_run", "When a periodic job last ran (Unix time)."),
        ("schedule_next_run_timestamp_seconds", "next_run", "When a periodic job runs next (Unix time)."),
    ] {
        let _ = writeln!(out, "# HELP taskd_{metric} {help}\n# TYPE taskd_{metric} gauge");
        for e in schedules {
            let t = e[field].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            let secs = t.map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
            let _ = writeln!(out, "taskd_{metric}{{schedule={}}} {secs}", e["name"]);
        }
    }
    let _ = writeln!(
        out,
        "# HELP taskd_process_served_total Requests or tasks handled by the current process of a slot."
    );
    let _ = writeln!(out, "# TYPE taskd_process_served_total counter");
    for (i, w) in s.workers.iter().enumerate() {
        let _ = writeln!(out, "taskd_process_served_total{{role=\"worker\",slot=\"{i}\"}} {}", w.served);
    }
    for (i, t) in s.tasks.iter().enumerate() {
        let _ = writeln!(out, "taskd_process_served_total{{role=\"task\",slot=\"{i}\"}} {}", t.served);
    }
    let _ = writeln!(out, "# HELP taskd_process_restarts_total Times a slot's process was replaced.");
    let _ = writeln!(out, "# TYPE taskd_process_restarts_total counter");
    for (i, w) in s.workers.iter().enumerate() {
        let _ = writeln!(
            out,
            "taskd_process_restarts_total{{role=\"worker\",slot=\"{i}\"}} {}",
            w.starts.saturating_sub(1)
        );
    }
    for (i, t) in s.tasks.iter().enumerate() {
        let _ = writeln!(
            out,
            "taskd_process_restarts_total{{role=\"task\",slot=\"{i}\"}} {}",
            t.starts.saturating_sub(1)
        );
    }
    out
}
