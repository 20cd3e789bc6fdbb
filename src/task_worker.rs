//! A task process: runs the application's `on_task` for each task the master hands it, one at
//! a time, and sends back its result (finish).
//!
//! Results are written as soon as a task ends, except that a run of quick tasks already
//! waiting in the channel is answered in one write (at most a millisecond late). The tasks
//! waiting in the channel are shown to the application first ([`Application::on_task_ahead`]),
//! so that it may start them early.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use crate::app::{Application, ProcessInfo, Task, TaskCtx, TaskFailure};
use crate::config::ServerConfig;
use crate::ipc::envelope::frame_len;
use crate::ipc::{Channel, FromTask, ReadState, Role, TaskToMaster, ToTask};
use crate::process::ProcessError;
use crate::worker::{flush_all, guard};

const CHANNEL: Token = Token(0);
const BATCH_WINDOW: Duration = Duration::from_millis(1);

pub struct TaskSetup<'a> {
    pub slot: u32,
    /// The task process's end of its slot's channel.
    pub channel: OwnedFd,
    pub config: &'a ServerConfig,
}

/// Runs the task process until it is told to stop, reaches `task_max_request` or loses the
/// master (Ok), or until a call on its link fails.
pub fn run<A: Application>(app: &mut A, setup: TaskSetup<'_>) -> Result<(), ProcessError> {
    let TaskSetup { slot, channel, config } = setup;
    let mut channel: TaskToMaster = Channel::new(channel);
    let info = ProcessInfo { role: Role::Task, slot, pid: std::process::id() };
    let mut poll = Poll::new().map_err(ProcessError::io("cannot create its poller"))?;
    channel.register(poll.registry(), CHANNEL).map_err(ProcessError::io("cannot watch its channel"))?;
    let mut events = Events::with_capacity(8);
    app.on_worker_start(&info).map_err(ProcessError::Start)?;
    tracing::debug!("task {slot} started (pid {})", info.pid);

    let limit = config.task_max_request;
    let mut served: u64 = 0;
    let mut out = Vec::new();
    let mut spare_reply = Vec::new();
    // The tasks at the head of the channel's input already shown to `on_task_ahead`.
    let mut shown: usize = 0;
    let mut spinner = crate::net::Spinner::new(config.busy_poll());
    // The last turn was one of light load (see `net::light_turn`).
    let mut light = false;
    loop {
        crate::logging::hold(false);
        crate::logging::before_wait();
        let short_read_drains = match spinner.poll(&mut poll, &mut events, None, light) {
            Ok(()) => crate::net::woken_by_input(&events),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
            Err(e) => return Err(ProcessError::Io { what: "poll failed", source: e }),
        };
        let state =
            channel.fill_after(short_read_drains).map_err(ProcessError::io("reading its channel failed"))?;
        light = crate::net::light_turn(channel.input());
        let room = if limit == 0 { u64::MAX } else { limit.saturating_sub(served) };
        shown = show_ahead(app, info, channel.input(), shown, room);
        let mut stop = None;
        let mut since_flush = Instant::now();
        loop {
            let burst = second_frame_waiting(channel.input());
            let frame = match channel.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(ProcessError::Corrupt(e)),
            };
            match frame {
                ToTask::RunTask { task_id, session, attempt, src_worker, data } => {
                    shown = shown.saturating_sub(1);
                    let session = (session != 0).then_some(session);
                    let task = Task { id: task_id, session, attempt, src_worker, data };
                    // A job with others queued behind it is one of a burst: its lines wait
                    // for the burst's end. The last (or only) one's lines go out as they are
                    // logged, so a job that hangs or is killed leaves what it was doing; all
                    // but its outcome's line, logged when its work is over, which goes out
                    // with the burst's (one write of the log per burst).
                    if burst {
                        crate::logging::hold(true);
                    } else {
                        crate::logging::hold_outcomes();
                    }
                    on_run_task(app, info, &task, &mut out, &mut spare_reply);
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
                settle(app, info, &mut out);
                crate::logging::flush();
                channel.queue(&mut out);
                flush_all(&mut channel).map_err(ProcessError::io("writing to the master failed"))?;
                since_flush = Instant::now();
            }
        }
        settle(app, info, &mut out);
        channel.queue(&mut out);
        flush_all(&mut channel).map_err(ProcessError::io("writing to the master failed"))?;
        if let Some(why) = stop {
            tracing::info!("task {slot} (pid {}) exits: {why}, after {served} tasks", info.pid);
            return Ok(());
        }
        if state == ReadState::Closed {
            return Ok(());
        }
    }
}

/// Whether a complete frame waits behind the first one of `input`.
fn second_frame_waiting(input: &[u8]) -> bool {
    match frame_len(input) {
        Ok(Some(first)) => matches!(frame_len(&input[first..]), Ok(Some(_))),
        _ => false,
    }
}

/// Shows the application the tasks in `input` after the first `shown` (already shown), up to
/// a stop, a frame not complete yet, or `room` tasks in all (what it may still run before
/// `task_max_request`); returns how many are shown now.
fn show_ahead<A: Application>(
    app: &mut A,
    info: ProcessInfo,
    input: &[u8],
    shown: usize,
    room: u64,
) -> usize {
    let mut at = 0;
    let mut seen = 0;
    while (seen as u64) < room {
        let Ok(Some((frame, n))) = ToTask::decode(&input[at..]) else { break };
        let ToTask::RunTask { task_id, session, attempt, src_worker, data } = frame else { break };
        // The first one too, which runs next: written before the others, it keeps their order.
        if seen >= shown {
            let task =
                Task { id: task_id, session: (session != 0).then_some(session), attempt, src_worker, data };
            guard(info.slot, "on_task_ahead", || app.on_task_ahead(&task));
        }
        seen += 1;
        at += n;
    }
    seen.max(shown)
}

/// Before the results in `out` leave: lets the application finish what it put off for their
/// tasks ([`Application::on_task_results`]), and turns the `done` of each task it names into a
/// failure with its reason (every `done` in `out`, should that call panic: whether their work
/// was finished is not known, and a `done` must not claim it).
fn settle<A: Application>(app: &mut A, info: ProcessInfo, out: &mut Vec<u8>) {
    if out.is_empty() {
        return;
    }
    match task_results(app, info) {
        Some(failed) if failed.is_empty() => {}
        Some(failed) => {
            fail_done(out, |id| failed.iter().find(|(f, _)| *f == id).map(|(_, why)| why.as_str()))
        }
        None => {
            let why = format!("on_task_results panicked in task process {}", info.pid);
            fail_done(out, |_| Some(&why));
        }
    }
}

/// Calls [`Application::on_task_results`]: the tasks that must fail, or `None` if it panicked.
pub(crate) fn task_results<A: Application>(
    app: &mut A,
    info: ProcessInfo,
) -> Option<Vec<(crate::app::TaskId, String)>> {
    let mut failed = None;
    guard(info.slot, "on_task_results", || failed = Some(app.on_task_results()));
    failed
}

/// Rewrites the frames in `out`: a `done` of a task for which `why` has a reason becomes a
/// failure with that reason, without the reply it carried; every other frame stays as it is.
fn fail_done<'a>(out: &mut Vec<u8>, why: impl Fn(crate::app::TaskId) -> Option<&'a str>) {
    let frames = std::mem::take(out);
    let mut at = 0;
    while let Ok(Some((frame, n))) = FromTask::decode(&frames[at..]) {
        let failure = match frame {
            FromTask::TaskDone { task_id, ok: true, .. } => why(task_id).map(|why| (task_id, why)),
            _ => None,
        };
        match failure {
            Some((task_id, why)) => {
                log_failed_after_done(task_id, why);
                FromTask::TaskDone { task_id, ok: false, reply: &[], result: why.as_bytes() }.encode(out)
            }
            None => out.extend_from_slice(&frames[at..at + n]),
        }
        at += n;
    }
    // Nothing is left but what this process encoded itself; kept as it is all the same.
    out.extend_from_slice(&frames[at..]);
}

/// Says in the log that `task_id` failed, with why. Its outcome's line (`job N done`) was
/// logged as its work ended, before the burst's results were settled: this line comes after it
/// and is the log's last word on the job. Only a failure pays for it; a warning, it is written
/// at once, behind the lines held so far, so that a crash right after leaves both.
pub(crate) fn log_failed_after_done(task_id: crate::app::TaskId, why: &str) {
    tracing::warn!("job {task_id} failed after all, not done: {why}");
}

/// Runs one task and appends its outcome (with the reply it set, if any) to `out`.
/// `spare` is the buffer of the last task's reply, emptied: a task's reply is written into it
/// (no allocation per task), and it is left there for the next.
fn on_run_task<A: Application>(
    app: &mut A,
    info: ProcessInfo,
    task: &Task<'_>,
    out: &mut Vec<u8>,
    spare: &mut Vec<u8>,
) {
    let task_id = task.id;
    let mut ctx = TaskCtx { out, info, reply: std::mem::take(spare) };
    let mut result = None;
    guard(info.slot, "on_task", || result = Some(app.on_task(&mut ctx, task)));
    // Written only for a panic: a format per job costs more than a no-op job's own work.
    let result =
        result.unwrap_or_else(|| Err(format!("job {task_id} panicked in task process {}", info.pid).into()));
    let reply = std::mem::take(&mut ctx.reply);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1);
    match &result {
        Ok(bytes) => FromTask::TaskDone { task_id, ok: true, reply: &reply, result: bytes },
        Err(TaskFailure::Permanent(why)) => {
            FromTask::TaskDone { task_id, ok: false, reply: &reply, result: why.as_bytes() }
        }
        // The master decides whether and when it runs again (delivery_retry_max, back-off);
        // a reply set by a run that is not the last is not sent.
        Err(TaskFailure::Transient { error, retry_after }) => FromTask::TaskRetry {
            task_id,
            not_yet: false,
            wait_ms: retry_after.map_or(FromTask::NO_WAIT, ms),
            error: error.as_bytes(),
        },
        Err(TaskFailure::NotYet { wait, why }) => {
            FromTask::TaskRetry { task_id, not_yet: true, wait_ms: ms(*wait), error: why.as_bytes() }
        }
    }
    .encode(out);
    // A large reply's buffer is not kept for the tasks after it (a task process stays small).
    if reply.capacity() <= 16 * 1024 {
        *spare = reply;
        spare.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{SessionId, WorkerCtx};

    /// Panics on job 1, answers the others.
    struct Flaky;

    impl Application for Flaky {
        fn on_receive(&mut self, _: &mut WorkerCtx<'_>, _: SessionId, _: &[u8]) {}
        fn on_task(&mut self, _: &mut TaskCtx<'_>, task: &Task<'_>) -> Result<Vec<u8>, TaskFailure> {
            assert_ne!(task.id, 1, "job 1 breaks");
            Ok(b"fine".to_vec())
        }
    }

    /// Replies `done N` for every task and sends a progress line first; at the results' turn,
    /// says that the work of task 2 could not be finished.
    struct PutOff {
        ran: Vec<crate::app::TaskId>,
    }

    impl Application for PutOff {
        fn on_receive(&mut self, _: &mut WorkerCtx<'_>, _: SessionId, _: &[u8]) {}
        fn on_task(&mut self, ctx: &mut TaskCtx<'_>, task: &Task<'_>) -> Result<Vec<u8>, TaskFailure> {
            ctx.send(9, b"progress\n");
            ctx.reply(format!("done {}\n", task.id).as_bytes());
            self.ran.push(task.id);
            Ok(b"fine".to_vec())
        }
        fn on_task_results(&mut self) -> Vec<(crate::app::TaskId, String)> {
            assert_eq!(std::mem::take(&mut self.ran), [1, 2, 3], "called once, for the three");
            vec![(2, "its line is not in the outbox".to_string())]
        }
    }

    #[test]
    fn a_task_named_at_the_results_turn_fails_instead_of_done_and_the_others_stay_done() {
        let info = ProcessInfo { role: crate::ipc::Role::Task, slot: 0, pid: 4242 };
        let mut out = Vec::new();
        let mut app = PutOff { ran: Vec::new() };
        for id in [1, 2, 3] {
            let task = Task { id, session: Some(9), attempt: 1, src_worker: 0, data: b"" };
            on_run_task(&mut app, info, &task, &mut out, &mut Vec::new());
        }
        settle(&mut app, info, &mut out);
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some((frame, n)) = FromTask::decode(&out[at..]).unwrap() {
            frames.push(frame);
            at += n;
        }
        assert_eq!(at, out.len());
        let progress = || FromTask::Send { session: 9, data: b"progress\n" };
        let done =
            |task_id, reply: &'static [u8]| FromTask::TaskDone { task_id, ok: true, reply, result: b"fine" };
        let expected = [
            progress(),
            done(1, b"done 1\n"),
            progress(),
            // No `done` line for its client: the worker answers `failed`.
            FromTask::TaskDone {
                task_id: 2,
                ok: false,
                reply: b"",
                result: b"its line is not in the outbox",
            },
            progress(),
            done(3, b"done 3\n"),
        ];
        assert_eq!(frames, expected);
        // Nothing ran since: nothing to settle, and the application is not asked.
        let mut empty = Vec::new();
        settle(&mut app, info, &mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn a_task_that_panics_fails_with_where_it_panicked_and_the_next_runs() {
        let info = ProcessInfo { role: crate::ipc::Role::Task, slot: 0, pid: 4242 };
        let mut out = Vec::new();
        for id in [1, 2] {
            let task = Task { id, session: None, attempt: 1, src_worker: 0, data: b"" };
            on_run_task(&mut Flaky, info, &task, &mut out, &mut Vec::new());
        }
        let (first, n) = FromTask::decode(&out).unwrap().unwrap();
        let FromTask::TaskDone { task_id: 1, ok: false, result, .. } = first else { panic!("{first:?}") };
        assert_eq!(result, b"job 1 panicked in task process 4242");
        let (second, _) = FromTask::decode(&out[n..]).unwrap().unwrap();
        assert!(
            matches!(second, FromTask::TaskDone { task_id: 2, ok: true, result: b"fine", .. }),
            "{second:?}"
        );
    }
}
