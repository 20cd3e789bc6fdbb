//! A task process: runs the application's `on_task` for each task the master hands it, one at
//! a time, and sends back its result (finish).
//!
//! Results are written as soon as a task ends, except that a run of quick tasks already
//! waiting in the channel is answered in one write (at most a millisecond late).

use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::app::{Application, ProcessInfo, Task, TaskCtx};
use crate::config::ServerConfig;
use crate::ipc::envelope::frame_len;
use crate::ipc::{Channel, Frame, ReadState, Role};
use crate::process::ProcessError;
use crate::worker::{flush_all, guard};

const CHANNEL: Token = Token(0);
const BATCH_WINDOW: Duration = Duration::from_millis(1);

pub struct TaskSetup<'a> {
    pub slot: u32,
    pub channel: Channel,
    pub config: &'a ServerConfig,
}

/// Runs the task process until it is told to stop, reaches `task_max_request` or loses the
/// master (Ok), or until a call on its link fails.
pub fn run<A: Application>(app: &mut A, setup: TaskSetup<'_>) -> Result<(), ProcessError> {
    let TaskSetup { slot, mut channel, config } = setup;
    let info = ProcessInfo { role: Role::Task, slot, pid: std::process::id() };
    let mut poll = Poll::new().map_err(ProcessError::io("cannot create its poller"))?;
    poll.registry()
        .register(channel.source(), CHANNEL, Interest::READABLE | Interest::WRITABLE)
        .map_err(ProcessError::io("cannot watch its channel"))?;
    let mut events = Events::with_capacity(8);
    app.on_worker_start(&info).map_err(ProcessError::Start)?;
    tracing::debug!("task {slot} started (pid {})", info.pid);

    let limit = config.task_max_request;
    let mut served: u64 = 0;
    let mut out = Vec::new();
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(ProcessError::Io { what: "poll failed", source: e });
            }
        }
        let state = channel.fill().map_err(ProcessError::io("reading its channel failed"))?;
        let mut stop = None;
        let mut since_flush = Instant::now();
        loop {
            let frame = match channel.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(ProcessError::Corrupt(e)),
            };
            match frame {
                Frame::RunTask { task_id, session, attempt, src_worker, data } => {
                    let task = Task {
                        id: task_id,
                        session: (session != 0).then_some(session),
                        attempt,
                        src_worker,
                        data,
                    };
                    let mut ctx = TaskCtx { out: &mut out, info, reply: Vec::new() };
                    let mut result = Err(format!("task {task_id} panicked in task process {}", info.pid));
                    guard(slot, "on_task", || result = app.on_task(&mut ctx, &task));
                    let reply = std::mem::take(&mut ctx.reply);
                    match &result {
                        Ok(bytes) => Frame::TaskDone { task_id, ok: true, reply: &reply, result: bytes },
                        Err(why) => {
                            Frame::TaskDone { task_id, ok: false, reply: &reply, result: why.as_bytes() }
                        }
                    }
                    .encode(&mut out);
                    served += 1;
                    if limit != 0 && served >= limit {
                        stop = Some(format!("reached task_max_request ({limit})"));
                    }
                }
                Frame::Stop => stop = Some("asked to stop".to_string()),
                other => tracing::warn!("task {slot}: ignoring unexpected message {other:?}"),
            }
            if stop.is_some() {
                break;
            }
            let more_waiting = matches!(frame_len(channel.input()), Ok(Some(_)));
            if !more_waiting || since_flush.elapsed() >= BATCH_WINDOW {
                channel.output().append(&mut out);
                flush_all(&mut poll, &mut events, &mut channel)
                    .map_err(ProcessError::io("writing to the master failed"))?;
                since_flush = Instant::now();
            }
        }
        channel.output().append(&mut out);
        flush_all(&mut poll, &mut events, &mut channel)
            .map_err(ProcessError::io("writing to the master failed"))?;
        if let Some(why) = stop {
            tracing::info!("task {slot} (pid {}) exits: {why}, after {served} tasks", info.pid);
            return Ok(());
        }
        if state == ReadState::Closed {
            return Ok(());
        }
    }
}
