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
    pub worker_crashes: u64,
    pub task_crashes: u64,
    pub fork_failures: u64,
    /// Results that came after their group was answered at its timeout.
    pub late_results_dropped: u64,
}

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
            worker_crashes: 0,
            task_crashes: 0,
            fork_failures: 0,
            late_results_dropped: 0,
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
            "role": "worker", "slot": i, "pid": w.pid, "state": w.state(),
            "served": w.served, "pending": w.log.len(), "restarts": w.starts.saturating_sub(1),
        }));
    }
    for (i, t) in s.tasks.iter().enumerate() {
        processes.push(json!({
            "role": "task", "slot": i, "pid": t.pid, "state": t.state(),
            "served": t.served, "running": t.inflight.len(), "restarts": t.starts.saturating_sub(1),
        }));
    }
    let tasking: usize = s.tasks.iter().map(|t| t.inflight.len()).sum();
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
        "idle_worker_num": s.workers.iter().filter(|w| w.alive && w.log.is_empty()).count(),
        "task_worker_num": s.config.task_worker_num,
        "idle_task_worker_num": s.tasks.iter().filter(|t| t.alive && t.inflight.is_empty()).count(),
        "tasking_num": tasking,
        "task_queue_num": s.jobs.queued(),
        "tasks_accepted": c.tasks_accepted,
        "tasks_done": c.tasks_done,
        "tasks_failed": c.tasks_failed,
        "tasks_retried": c.tasks_retried,
        "worker_crashes": c.worker_crashes,
        "task_crashes": c.task_crashes,
        "fork_failures": c.fork_failures,
        "late_results_dropped": c.late_results_dropped,
        "processes": processes,
    })
    .to_string()
    .into_bytes();
    line.push(b'\n');
    line
}
