//! A task process: runs the application's `on_task` for each task the master hands it, one at
//! a time, and sends back its result (finish).
//!
//! Results are written as soon as a task ends, except that a run of quick tasks already
//! waiting in the channel is answered in one write (at most a millisecond late).

use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::app::{Application, ProcessInfo, Task, TaskCtx};
use crate::config::ServerConfig;
use std::os::fd::OwnedFd;

use crate::ipc::envelope::frame_len;
use crate::ipc::{Channel, FromTask, ReadState, Role, TaskToMaster, ToTask};
use crate::worker::{flush_all, guard};

const CHANNEL: Token = Token(0);
const BATCH_WINDOW: Duration = Duration::from_millis(1);

pub struct TaskSetup<'a> {
    pub slot: u32,
    /// The task process's end of its slot's channel.
    pub channel: OwnedFd,
    pub config: &'a ServerConfig,
}

pub fn run<A: Application>(app: &mut A, setup: TaskSetup<'_>) -> i32 {
    let TaskSetup { slot, channel, config } = setup;
    let mut channel: TaskToMaster = Channel::new(channel);
    let info = ProcessInfo { role: Role::Task, slot, pid: std::process::id() };
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("task {slot}: cannot create its poller: {e}");
            return 1;
        }
    };
    if let Err(e) =
        poll.registry().register(channel.source(), CHANNEL, Interest::READABLE | Interest::WRITABLE)
    {
        tracing::error!("task {slot}: cannot watch its channel: {e}");
        return 1;
    }
    let mut events = Events::with_capacity(8);
    if let Err(e) = app.on_worker_start(&info) {
        tracing::error!("task {slot} (pid {}): cannot start: {e}", info.pid);
        return 1;
    }
    tracing::debug!("task {slot} started (pid {})", info.pid);

    let limit = config.task_max_request;
    let mut served: u64 = 0;
    let mut out = Vec::new();
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("task {slot}: poll failed: {e}");
                return 1;
            }
        }
        let state = match channel.fill() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("task {slot}: reading its channel failed: {e}");
                return 1;
            }
        };
        let mut stop = None;
        let mut since_flush = Instant::now();
        loop {
            let frame = match channel.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("task {slot}: corrupt message from the master: {e}");
                    return 1;
                }
            };
            match frame {
                ToTask::RunTask { task_id, session, attempt, src_worker, data } => {
                    let session = (session != 0).then_some(session);
                    let task = Task { id: task_id, session, attempt, src_worker, data };
                    on_run_task(app, info, &task, &mut out);
                    served += 1;
                    if limit != 0 && served >= limit {
                        stop = Some(format!("reached task_max_request ({limit})"));
                    }
                }
                ToTask::Stop => stop = Some("asked to stop".to_string()),
            }
            if stop.is_some() {
                break;
            }
            let more_waiting = matches!(frame_len(channel.input()), Ok(Some(_)));
            if !more_waiting || since_flush.elapsed() >= BATCH_WINDOW {
                channel.output().append(&mut out);
                if let Err(e) = flush_all(&mut poll, &mut events, &mut channel) {
                    tracing::error!("task {slot}: writing to the master failed: {e}");
                    return 1;
                }
                since_flush = Instant::now();
            }
        }
        channel.output().append(&mut out);
        if let Err(e) = flush_all(&mut poll, &mut events, &mut channel) {
            tracing::error!("task {slot}: writing to the master failed: {e}");
            return 1;
        }
        if let Some(why) = stop {
            tracing::info!("task {slot} (pid {}) exits: {why}, after {served} tasks", info.pid);
            return 0;
        }
        if state == ReadState::Closed {
            return 0;
        }
    }
}

/// Runs one task and appends its outcome (with the reply it set, if any) to `out`.
fn on_run_task<A: Application>(app: &mut A, info: ProcessInfo, task: &Task<'_>, out: &mut Vec<u8>) {
    let task_id = task.id;
    let mut ctx = TaskCtx { out, info, reply: Vec::new() };
    let mut result = Err(format!("task {task_id} panicked in task process {}", info.pid));
    guard(info.slot, "on_task", || result = app.on_task(&mut ctx, task));
    let reply = std::mem::take(&mut ctx.reply);
    match &result {
        Ok(bytes) => FromTask::TaskDone { task_id, ok: true, reply: &reply, result: bytes },
        Err(why) => FromTask::TaskDone { task_id, ok: false, reply: &reply, result: why.as_bytes() },
    }
    .encode(out);
}
