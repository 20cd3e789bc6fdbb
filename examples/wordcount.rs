//! A user's own application on taskd: counts the words of each line a client sends.
//!
//! ```text
//! cargo run --example wordcount -- [--port PORT]          (default 9601; 0 = any free port)
//! cargo run --example client -- 127.0.0.1:9601
//! > the quick brown fox
//! < accepted 1
//! < done 1 "the quick brown fox": 4 words, 19 characters
//! ```
//!
//! The counting stands in for slow work (a parser, a call to another service): it runs in a
//! task process, so the worker answers `accepted` at once and stays free for other clients.

use std::process::ExitCode;
use std::time::Duration;

use taskd::{Application, Finished, SessionId, Task, TaskCtx, TaskFailure, WorkerCtx};

struct WordCount;

impl WordCount {
    /// The start of a line, to name it in its `done` reply without carrying it all back.
    fn preview(line: &str) -> String {
        let mut chars = line.chars();
        let mut preview: String = chars.by_ref().take(24).collect();
        if chars.next().is_some() {
            preview.push('…');
        }
        preview
    }
}

impl Application for WordCount {
    fn on_receive(&mut self, ctx: &mut WorkerCtx<'_>, session: SessionId, data: &[u8]) {
        let line = String::from_utf8_lossy(data);
        // The preview goes along as the task's context: `on_finish` may run in a successor of
        // this worker process, so it must not rely on anything remembered here.
        let reply = match ctx.task_for(session, Self::preview(&line).as_bytes(), data) {
            Ok(task_id) => format!("accepted {task_id}\n"),
            // The queue is full (or the line too long): say so now rather than make the
            // client wait.
            Err(e) => format!("error {e}\n"),
        };
        ctx.send(session, reply.as_bytes());
    }

    fn on_task(&mut self, _ctx: &mut TaskCtx<'_>, task: &Task<'_>) -> Result<Vec<u8>, TaskFailure> {
        let text = std::str::from_utf8(task.data).map_err(|_| "the line is not UTF-8".to_string())?;
        let words = text.split_whitespace().count();
        let chars = text.chars().count();
        // Pretend this is expensive, so that running it off the worker is worth it.
        std::thread::sleep(Duration::from_millis(50));
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        Ok(format!("{}, {}", plural(words, "word"), plural(chars, "character")).into_bytes())
    }

    fn on_finish(&mut self, ctx: &mut WorkerCtx<'_>, finished: &Finished<'_>) {
        // Every task here was submitted for a session; a client that left gets nothing.
        let Some(session) = finished.session else { return };
        let preview = String::from_utf8_lossy(finished.context);
        let reply = match finished.result {
            Ok(result) => format!("done {} {preview:?}: {}\n", finished.id, String::from_utf8_lossy(result)),
            Err(why) => format!("failed {} {preview:?}: {why}\n", finished.id),
        };
        ctx.send(session, reply.as_bytes());
    }
}

fn parse_port() -> Result<u16, String> {
    let mut port = 9601;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--port") {
            Some("") => args.next().ok_or("--port needs a value")?,
            Some(rest) if rest.starts_with('=') => rest[1..].to_string(),
            _ => return Err(format!("unexpected argument {arg:?} (usage: wordcount [--port PORT])")),
        };
        port = value.parse().map_err(|_| format!("--port: {value:?} is not a port number"))?;
    }
    Ok(port)
}

fn main() -> ExitCode {
    let port = match parse_port() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("wordcount: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = taskd::logging::init("info", taskd::logging::LogFormat::Human, None) {
        eprintln!("wordcount: {e}");
        return ExitCode::from(2);
    }
    let config = taskd::ServerConfig { port, worker_num: 2, task_worker_num: 2, ..Default::default() };
    // Bind before `run`, so that a port in use is reported here, before any process is forked.
    let listener = match taskd::net::bind_listener(&config.host, config.port, config.backlog) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wordcount: {e}");
            return ExitCode::FAILURE;
        }
    };
    match taskd::run(&config, listener, WordCount) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("wordcount: {e}");
            ExitCode::FAILURE
        }
    }
}
