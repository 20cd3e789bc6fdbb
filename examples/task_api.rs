//! Every task call of the library, in a small application of its own, as a user porting a
//! Swoole server would write it. One request per line, one JSON reply per line:
//!
//! ```text
//! to 2 hello          task_to: run on task process 2           -> accepted, then done
//! cb hello            task_with: a callback instead of on_finish -> accepted, then callback
//! wait 500 hello      task_wait: wait up to 500 ms              -> waited (or error)
//! all 500 a b c       task_wait_all: three tasks, wait for all  -> all
//! result 7           what the server knows of task 7            -> its final line, or running
//! ```
//!
//! A task's text may hold `sleep=MS` to make it slow, `fail` to fail it, `flaky=N` to fail its
//! first N runs transiently (the server retries it after a back-off; the client sees
//! `retrying`), `until=PATH` to fail transiently until PATH exists, and `notyet=MS` to be told
//! "not yet" once per task process (it waits MS in the delayed queue, not counted as an
//! attempt). Run it:
//! `cargo run --example task_api -- --port 9601`, then `nc 127.0.0.1 9601`.

use std::time::Duration;

use serde_json::json;
use taskd::{Application, Finished, SessionId, Task, TaskCtx, TaskFailure, WorkerCtx};

#[derive(Default)]
struct Shout {
    /// Tasks this task process has told "not yet" (`notyet=MS`).
    told_not_yet: std::collections::HashSet<u64>,
}

fn reply(ctx: &mut WorkerCtx<'_>, session: SessionId, value: serde_json::Value) {
    ctx.send(session, format!("{value}\n").as_bytes());
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Application for Shout {
    fn on_receive(&mut self, ctx: &mut WorkerCtx<'_>, session: SessionId, data: &[u8]) {
        let line = text(data);
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or("");
        let rest: Vec<&str> = words.collect();
        match (command, rest.as_slice()) {
            ("to", [slot, body @ ..]) => {
                let Ok(slot) = slot.parse::<u32>() else {
                    return reply(ctx, session, json!({"event": "error", "error": "to SLOT TEXT"}));
                };
                match ctx.task_to(slot, session, b"", body.join(" ").as_bytes()) {
                    Ok(id) => reply(ctx, session, json!({"event": "accepted", "task_id": id})),
                    Err(e) => reply(ctx, session, json!({"event": "error", "error": e.to_string()})),
                }
            }
            ("cb", body) => {
                // The callback owns what it needs; it runs in this worker when the result comes.
                let asked = body.join(" ");
                let data = asked.clone().into_bytes();
                let submitted = ctx.task_with(session, b"cb", &data, move |ctx, done| {
                    let result = done.result.map(text).unwrap_or_else(|e| e.to_string());
                    reply(
                        ctx,
                        session,
                        json!({
                            "event": "callback", "task_id": done.id, "asked": asked, "result": result,
                            "attempts": done.attempts,
                        }),
                    );
                });
                match submitted {
                    Ok(id) => reply(ctx, session, json!({"event": "accepted", "task_id": id})),
                    Err(e) => reply(ctx, session, json!({"event": "error", "error": e.to_string()})),
                }
            }
            ("wait", [ms, body @ ..]) => {
                let timeout = Duration::from_millis(ms.parse().unwrap_or(1000));
                match ctx.task_wait(body.join(" ").as_bytes(), timeout) {
                    Ok(result) => reply(ctx, session, json!({"event": "waited", "result": text(&result)})),
                    Err(e) => reply(ctx, session, json!({"event": "error", "error": e.to_string()})),
                }
            }
            ("all", [ms, items @ ..]) => {
                let timeout = Duration::from_millis(ms.parse().unwrap_or(1000));
                let items: Vec<&[u8]> = items.iter().map(|s| s.as_bytes()).collect();
                match ctx.task_wait_all(&items, timeout) {
                    Ok(results) => {
                        let results: Vec<_> = results
                            .into_iter()
                            .map(|r| match r {
                                Some(Ok(v)) => json!(text(&v)),
                                Some(Err(e)) => json!({"error": e.to_string()}),
                                None => serde_json::Value::Null,
                            })
                            .collect();
                        reply(ctx, session, json!({"event": "all", "results": results}));
                    }
                    Err(e) => reply(ctx, session, json!({"event": "error", "error": e.to_string()})),
                }
            }
            ("result", [id]) => match id.parse() {
                Ok(id) => ctx.send_result(session, id),
                Err(_) => reply(ctx, session, json!({"event": "error", "error": "result TASK_ID"})),
            },
            _ => reply(
                ctx,
                session,
                json!({"event": "error", "error": "to SLOT TEXT | cb TEXT | wait MS TEXT | all MS T… | result ID"}),
            ),
        }
    }

    fn on_task(&mut self, ctx: &mut TaskCtx<'_>, task: &Task<'_>) -> Result<Vec<u8>, TaskFailure> {
        let asked = text(task.data);
        for word in asked.split_whitespace() {
            if let Some(ms) = word.strip_prefix("sleep=").and_then(|v| v.parse().ok()) {
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        for word in asked.split_whitespace() {
            if let Some(n) = word.strip_prefix("flaky=").and_then(|v| v.parse::<u32>().ok()) {
                if task.attempt <= n {
                    let error = format!("attempt {} of task {} was asked to fail", task.attempt, task.id);
                    return Err(TaskFailure::Transient { error, retry_after: None });
                }
            }
            if let Some(path) = word.strip_prefix("until=") {
                if !std::path::Path::new(path).exists() {
                    let error = format!("{path} does not exist yet");
                    return Err(TaskFailure::Transient { error, retry_after: None });
                }
            }
            if let Some(ms) = word.strip_prefix("notyet=").and_then(|v| v.parse().ok()) {
                if self.told_not_yet.insert(task.id) {
                    let why = "asked to wait".to_string();
                    return Err(TaskFailure::NotYet { wait: Duration::from_millis(ms), why });
                }
            }
        }
        if asked.split_whitespace().any(|w| w == "fail") {
            return Err(TaskFailure::Permanent(format!("task {} was asked to fail", task.id)));
        }
        Ok(format!("pid={} slot={} {}", ctx.info().pid, ctx.info().slot, asked.to_uppercase()).into_bytes())
    }

    fn on_finish(&mut self, ctx: &mut WorkerCtx<'_>, done: &Finished<'_>) {
        let Some(session) = done.session else { return };
        let result = done.result.map(text).unwrap_or_else(|e| e.to_string());
        // A task submitted with a callback whose worker was replaced lands here, context intact.
        let via = if done.context == b"cb" {
            "on_finish (its callback's worker was replaced)"
        } else {
            "on_finish"
        };
        let attempts = done.attempts;
        reply(
            ctx,
            session,
            json!({"event": "done", "task_id": done.id, "result": result, "via": via, "attempts": attempts}),
        );
    }
}

fn main() {
    let mut config =
        taskd::ServerConfig { port: 9601, worker_num: 2, task_worker_num: 3, ..Default::default() };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let given = args.next();
        let value = given.as_deref().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            // Durable jobs in Redis (see the README): the URL and this node's name.
            ("--redis-url", _) if given.is_some() => config.redis_url = given,
            ("--node-id", _) if given.is_some() => config.node_id = given,
            ("--retry-base-ms", Some(v)) => config.retry_base_ms = v,
            ("--retry-cap-ms", Some(v)) => config.retry_cap_ms = v,
            ("--port", Some(v)) => config.port = v as u16,
            ("--worker-num", Some(v)) => config.worker_num = v as usize,
            ("--task-worker-num", Some(v)) => config.task_worker_num = v as usize,
            // WebSocket clients only, no line port: `run_websocket`.
            ("--ws-only", Some(v)) => config.ws_port = Some(v as u16),
            _ => {
                eprintln!(
                    "usage: task_api [--port N | --ws-only N] [--worker-num N] [--task-worker-num N] \
                     [--redis-url URL --node-id NAME] [--retry-base-ms MS] [--retry-cap-ms MS]"
                );
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = taskd::logging::init("info", taskd::logging::LogFormat::Human, None) {
        eprintln!("task_api: {e}");
        std::process::exit(2);
    }
    if config.ws_port.is_some() {
        match taskd::run_websocket(&config, Shout::default()) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("task_api: {e}");
                std::process::exit(1);
            }
        }
    }
    let listener = match taskd::net::bind_listener(&config.host, config.port, config.backlog) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("task_api: {e}");
            std::process::exit(1);
        }
    };
    match taskd::run(&config, listener, Shout::default()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("task_api: {e}");
            std::process::exit(1);
        }
    }
}
