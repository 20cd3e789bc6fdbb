//! The operator's dashboard, the wires side: admin requests from WebSocket sessions
//! (`{"admin":"hello","token":…}`, then the actions), answered by the master itself, and the
//! line pushed to the sessions that gave the token once a second.
//!
//! A web page on this host can open the WebSocket (its origin allowed or not, a program can),
//! so nothing here is shown or done for a session that has not given the token; each action
//! is logged with the peer that asked for it.

use serde_json::{json, Value};

use super::dashboard::{self, Dashboard};
use super::*;
use crate::throttle::{unlogged, Throttle};

/// Whether a WebSocket request line is an admin request: a JSON object with an `"admin"`
/// field (its action) at the top level. Any other line is a job or a command as on TCP.
pub fn parse_admin(line: &[u8]) -> Option<Value> {
    let trimmed = line.trim_ascii_start();
    if !trimmed.starts_with(b"{") || memchr::memmem::find(trimmed, b"\"admin\"").is_none() {
        return None;
    }
    let value: Value = serde_json::from_slice(trimmed).ok()?;
    value.get("admin")?.as_str()?;
    Some(value)
}

/// Rate limit of the warnings for refused admin requests (a page may try and try).
#[derive(Default)]
pub(super) struct AdminWarnings {
    refused: Throttle,
}

pub(super) fn reply(action: &str, ok: bool, extra: Value) -> Vec<u8> {
    let mut line = json!({"event": "admin", "action": action, "ok": ok});
    if let (Some(obj), Value::Object(more)) = (line.as_object_mut(), extra) {
        obj.extend(more);
    }
    let mut out = line.to_string().into_bytes();
    out.push(b'\n');
    out
}

impl<A: Application> Master<'_, A> {
    /// Handles an admin request from WebSocket connection `key`.
    pub(super) fn admin_request(&mut self, key: usize, req: Value) {
        let Some(conn) = self.conns.get(key) else { return };
        let (session, peer) = (conn.session, conn.peer);
        let action = req["admin"].as_str().unwrap_or("").to_string();
        if action == "hello" {
            return self.admin_hello(key, session, peer, &req);
        }
        if !self.dashboard.sessions.contains(&session) {
            self.admin_refused(peer, &action, "gave no admin token");
            let line = protocol::error_line(
                "admin actions need the admin token: send {\"admin\":\"hello\",\"token\":\"…\"} first",
            );
            return self.send_to_session(session, &line);
        }
        let line = match action.as_str() {
            "grow" | "shrink" => {
                let grow = action == "grow";
                tracing::info!("dashboard: {peer} asks to {action} the task pool");
                match self.scale_tasks(grow, "the dashboard") {
                    Ok(n) => reply(&action, true, json!({"task_worker_num": n})),
                    Err(why) => reply(&action, false, json!({"error": why})),
                }
            }
            "reload" => {
                let role = match req["role"].as_str() {
                    Some("worker") => Role::Worker,
                    Some("task") | None => Role::Task,
                    Some(other) => {
                        let why = format!("no role {other:?}: worker or task");
                        return self.send_to_session(session, &reply(&action, false, json!({"error": why})));
                    }
                };
                tracing::info!("dashboard: {peer} asks to reload every {role} process");
                self.start_reload(role);
                reply(&action, true, json!({"role": role.to_string()}))
            }
            "lookup" => {
                let Some(task_id) = requested_task_id(&req) else {
                    let why = "task_id must be a number";
                    return self.send_to_session(session, &reply(&action, false, json!({"error": why})));
                };
                tracing::info!("dashboard: {peer} looks up task {task_id}");
                reply(&action, true, self.lookup(task_id))
            }
            "cancel" => {
                let Some(task_id) = requested_task_id(&req) else {
                    let why = "task_id must be a number";
                    return self.send_to_session(session, &reply(&action, false, json!({"error": why})));
                };
                tracing::info!("dashboard: {peer} asks to cancel task {task_id}");
                // The operator's path (as `taskd cancel N`): any connection's job; its own
                // client gets its `cancelled` line.
                match self.cancel(super::schedule::Via::Dashboard(session), task_id) {
                    // A durable job: Redis is asked, and the answer comes then.
                    Ok(false) => return,
                    Ok(true) => {
                        tracing::info!("dashboard: task {task_id} cancelled, asked by {peer}");
                        reply(&action, true, json!({"task_id": task_id}))
                    }
                    Err(why) => reply(&action, false, json!({"task_id": task_id, "error": why})),
                }
            }
            "replay" | "discard" => return self.durable_admin(session, peer, &action, &req),
            _ => reply(&action, false, json!({"error": format!("unknown admin action {action:?}")})),
        };
        self.send_to_session(session, &line);
    }

    fn admin_hello(&mut self, key: usize, session: u64, peer: std::net::SocketAddr, req: &Value) {
        let given = req["token"].as_str().unwrap_or("");
        let ok = self.dashboard.token.as_ref().is_some_and(|t| t.matches(given));
        if !ok {
            self.admin_refused(peer, "hello", "gave a wrong admin token");
            self.send_to_session(session, &protocol::error_line("admin token refused"));
            // One guess per connection: a page that guesses pays a connection each time.
            if let Some(conn) = self.conns.get_mut(key) {
                conn.close_after_flush = true;
                self.mark_dirty(key);
            }
            return;
        }
        if !self.dashboard.sessions.contains(&session) {
            self.dashboard.sessions.push(session);
            tracing::info!("dashboard opened by {peer}");
        }
        self.send_to_session(session, &reply("hello", true, json!({})));
        let line = self.dashboard_line(true);
        self.send_to_session(session, &line);
    }

    fn admin_refused(&mut self, peer: std::net::SocketAddr, action: &str, why: &str) {
        if let Some(n) = self.admin_warnings.refused.log() {
            let action: String = action.chars().take(40).collect();
            tracing::warn!("dashboard: refused {action:?} from {peer}: it {why}{}", unlogged(n));
        }
    }

    /// Where a job is: waiting, running (where), waiting to run again, or its final reply.
    fn lookup(&self, task_id: u64) -> Value {
        if let Some(job) = self.jobs.get(task_id) {
            let data: Value = serde_json::from_slice(job.data()).unwrap_or(Value::Null);
            let running = self.tasks.iter().enumerate().find(|(_, t)| t.books.inflight.contains(&task_id));
            let state = match running {
                Some((j, _)) => format!("running in task {j}"),
                None if !job.last_error().is_empty() => "waiting to run again".into(),
                None => "queued".into(),
            };
            return json!({
                "task_id": task_id, "state": state, "type": data.get("type"), "to": data.get("to"),
                "attempts": job.attempts, "retries": job.retries(), "last_error": job.last_error(),
                "age_ms": job.accepted.elapsed().as_millis() as u64,
            });
        }
        match self.results.get(task_id).and_then(|l| serde_json::from_slice::<Value>(l).ok()) {
            Some(outcome) => json!({"task_id": task_id, "state": outcome["event"], "outcome": outcome}),
            None => {
                json!({"task_id": task_id, "state": "unknown (never accepted, or its outcome is no longer kept)"})
            }
        }
    }

    /// A second is over: a new sample, and the line for every dashboard session.
    pub(super) fn dashboard_tick(&mut self) {
        let now = self.now;
        if now < self.dashboard.next_tick {
            return;
        }
        self.dashboard.tick(now);
        self.ask_overview(now);
        let mut sessions = std::mem::take(&mut self.dashboard.sessions);
        sessions.retain(|&s| self.conn_mut(s).is_some());
        if !sessions.is_empty() {
            let line = self.dashboard_line(false);
            for &s in &sessions {
                self.send_to_session(s, &line);
            }
        }
        // Sessions added meanwhile (none: sending adds none) and those still open.
        sessions.append(&mut self.dashboard.sessions);
        self.dashboard.sessions = sessions;
    }

    /// Everything the page shows, as one line (`full`: with the five minutes of history).
    pub(super) fn dashboard_line(&self, full: bool) -> Vec<u8> {
        let d: &Dashboard = &self.dashboard;
        let mut processes = vec![
            proc_row("master", None, Some(std::process::id()), "running", json!({})),
            proc_row("manager", None, self.manager_pid().map(|p| p.as_raw() as u32), "running", json!({})),
        ];
        for (i, w) in self.workers.iter().enumerate() {
            let extra = json!({"served": w.served, "restarts": w.starts.saturating_sub(1),
                               "pending": w.books.log.len()});
            processes.push(proc_row("worker", Some(i), w.pid(), w.state(), extra));
        }
        for (j, t) in self.tasks.iter().enumerate().filter(|(_, t)| t.in_pool() || t.is_alive()) {
            let job = t.books.inflight.front().map(|&id| {
                let data = self.jobs.get(id).map(|j| j.data()).unwrap_or(b"");
                let data: Value = serde_json::from_slice(data).unwrap_or(Value::Null);
                let since = t.books.running_since.map(|s| s.elapsed().as_millis() as u64);
                json!({"task_id": id, "type": data.get("type"), "to": data.get("to"), "running_ms": since})
            });
            let extra = json!({"served": t.served, "restarts": t.starts.saturating_sub(1),
                               "queued": t.books.inflight.len().saturating_sub(1), "job": job});
            processes.push(proc_row("task", Some(j), t.pid(), t.state(), extra));
        }
        if let Some(state) = &self.durable {
            let pid = state.bridge_sup.pid(0).map(|p| p.as_raw() as u32);
            processes.push(proc_row("bridge", None, pid, "running", json!({})));
        }
        let (scheduled, retrying) = self.jobs_delayed(dashboard::unix_ms());
        // With durable jobs the master queues none: what waits or runs in Redis per priority
        // (the bridge's depths, up to a second old).
        let [high, normal, low] = match self.durable.as_ref().and_then(|d| d.depths.as_ref()) {
            Some(depths) => {
                crate::app::Priority::ALL.map(|p| depths["by_priority"][p.name()].as_u64().unwrap_or(0))
            }
            None => self.jobs.queued_by_priority().map(|n| n as u64),
        };
        let c = &self.counters;
        let mut line = json!({
            "event": "dashboard",
            "t": dashboard::unix_ms(),
            "uptime_ms": c.started.elapsed().as_millis() as u64,
            "processes": processes,
            "queues": {
                "queued": self.jobs.queued(),
                "running": self.tasks.iter().map(|t| t.books.inflight.len()).sum::<usize>(),
                "delayed": self.delayed.len(),
                "retrying": retrying,
                "scheduled": scheduled,
                "rate_limited": self.delayed.len().saturating_sub(retrying + scheduled),
                "by_priority": {"high": high, "normal": normal, "low": low},
            },
            "schedules": self.schedules_stats(),
            "totals": {
                "accepted": c.tasks_accepted, "done": c.tasks_done, "failed": c.tasks_failed,
                "retries": c.delivery_retries, "task_crashes": c.task_crashes,
                "worker_crashes": c.worker_crashes, "connections": self.conns.len(),
            },
            "task_worker_num": self.tasks.iter().filter(|t| t.in_pool()).count(),
            "task_worker_max": self.tasks.len(),
            "failures": d.failures_json(),
        });
        if let Some(obj) = line.as_object_mut() {
            if full {
                obj.insert("history".into(), d.history_json());
            } else if let Some(last) = d.last_sample() {
                obj.insert("sample".into(), dashboard::sample_json(last));
            }
            if let Some(durable) = self.durable_dashboard() {
                obj.insert("durable".into(), durable);
            }
        }
        let mut out = line.to_string().into_bytes();
        out.push(b'\n');
        out
    }

    /// Jobs waiting for their `run_at` (not yet tried), and jobs in the delayed queue after a
    /// failed attempt (the others there wait for a rate limit): one walk over the jobs.
    fn jobs_delayed(&self, now_ms: u64) -> (usize, usize) {
        if self.delayed.is_empty() {
            return (0, 0);
        }
        let (mut scheduled, mut retrying) = (0, 0);
        for job in self.jobs.ids().into_iter().filter_map(|id| self.jobs.get(id)) {
            if !job.last_error().is_empty() {
                retrying += 1;
            } else if job.run_at_ms() > now_ms {
                scheduled += 1;
            }
        }
        (scheduled, retrying)
    }
}

/// How often the nodes and dead letters are read while a dashboard is open.
const OVERVIEW_EVERY: Duration = Duration::from_secs(2);
/// The request id of the periodic overview (operators' requests count from 1).
const OVERVIEW: u64 = 0;

impl<A: Application> Master<'_, A> {
    /// Durable jobs: the node's link to Redis, the nodes and the dead letters, for the page.
    fn durable_dashboard(&self) -> Option<Value> {
        let d = self.durable.as_ref()?;
        let mut v = json!({"node_id": d.d.node, "redis_up": !self.shared.durable_down(),
                           "store_batches_unacked": d.unacked()});
        if let (Some(obj), Some(Value::Object(seen))) = (v.as_object_mut(), &self.dashboard.durable_overview)
        {
            for k in ["nodes", "dead", "dead_total"] {
                if let Some(x) = seen.get(k) {
                    obj.insert(k.into(), x.clone());
                }
            }
        }
        Some(v)
    }

    /// Replays or discards a dead letter (`req["id"]`): the bridge does it, and its answer
    /// goes to `session` (see `on_admin_answer`).
    fn durable_admin(&mut self, session: u64, peer: std::net::SocketAddr, action: &str, req: &Value) {
        let id: String = req["id"].as_str().unwrap_or("").chars().take(64).collect();
        let Some(state) = self.durable.as_mut().filter(|s| s.bridge_running()) else {
            let why = if self.durable.is_none() {
                "no durable jobs here (--redis-url): no dead letters"
            } else {
                "the redis bridge is restarting; try again"
            };
            return self.send_to_session(session, &reply(action, false, json!({"error": why})));
        };
        tracing::info!("dashboard: {peer} asks to {action} dead letter {id:?}");
        self.dashboard.last_request += 1;
        let request = self.dashboard.last_request;
        let op = json!({"op": action, "id": id}).to_string();
        state.bridge.send(&ToBridge::Admin { request, op: op.as_bytes() });
        self.dashboard.pending.insert(request, (session, peer, action.to_string(), id));
    }

    /// The bridge answered a dashboard request.
    pub(super) fn on_admin_answer(&mut self, request: u64, answer: &[u8]) {
        let answer: Value = serde_json::from_slice(answer).unwrap_or(Value::Null);
        if request == OVERVIEW {
            if answer["ok"] == true {
                self.dashboard.durable_overview = Some(answer);
            }
            return;
        }
        let Some((session, peer, action, id)) = self.dashboard.pending.remove(&request) else { return };
        let ok = answer["ok"] == true;
        if ok {
            tracing::info!("dashboard: dead letter {id:?} {action}ed, as {peer} asked: {answer}");
        } else {
            tracing::warn!("dashboard: cannot {action} dead letter {id:?} for {peer}: {}", answer["error"]);
        }
        let mut extra = answer;
        if let Some(obj) = extra.as_object_mut() {
            obj.remove("ok");
        }
        self.send_to_session(session, &reply(&action, ok, extra));
        // The page sees the change with the next push.
        self.dashboard.next_overview = Instant::now();
    }

    /// While a dashboard is open: ask the bridge for the nodes and dead letters now and then.
    fn ask_overview(&mut self, now: Instant) {
        if self.dashboard.sessions.is_empty() || now < self.dashboard.next_overview {
            return;
        }
        let Some(state) = self.durable.as_mut().filter(|s| s.bridge_running()) else { return };
        state.bridge.send(&ToBridge::Admin { request: OVERVIEW, op: br#"{"op":"overview"}"# });
        self.dashboard.next_overview = now + OVERVIEW_EVERY;
    }
}

fn proc_row(role: &str, slot: Option<usize>, pid: Option<u32>, state: &str, extra: Value) -> Value {
    let mut row = json!({"role": role, "slot": slot, "pid": pid, "state": state,
                         "rss_kib": pid.and_then(dashboard::rss_kib)});
    if let (Some(obj), Value::Object(more)) = (row.as_object_mut(), extra) {
        obj.extend(more);
    }
    row
}

/// The `task_id` of an admin request: a number, or a number typed into the page's field.
fn requested_task_id(req: &serde_json::Value) -> Option<u64> {
    req["task_id"].as_u64().or_else(|| req["task_id"].as_str()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_requests_are_objects_with_an_admin_field() {
        assert!(parse_admin(br#"{"admin":"hello","token":"x"}"#).is_some());
        assert!(parse_admin(br#"  {"token":"x", "admin":"grow"}"#).is_some());
        assert!(parse_admin(br#"{"type":"email","to":"a@b.c","body":"\"admin\""}"#).is_none());
        assert!(parse_admin(br#"{"type":"email","to":"a@b.c","body":{"admin":"x"}}"#).is_none());
        assert!(parse_admin(br#"{"admin":1}"#).is_none());
        assert!(parse_admin(b"stats").is_none());
        assert!(parse_admin(b"admin@example.com").is_none());
    }
}
