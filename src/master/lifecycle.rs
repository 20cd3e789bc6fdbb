//! Processes coming and going: the manager's reports, cleaning a dead process's slot,
//! a dead manager, signals, rolling reload and shutdown.

use super::*;
use crate::ipc::envelope::{decode_outcomes, Message};

impl<A: Application> Master<'_, A> {
    pub(super) fn read_manager(&mut self) {
        let state = self.manager.fill();
        if let Err(e) = Channel::drain(self, |m| &mut m.manager, |m, frame| m.on_manager_frame(frame)) {
            tracing::error!("corrupt message from the manager: {e}");
            self.manager.discard_input();
        }
        if let Err(e) = state {
            tracing::error!("reading the manager's channel failed: {e}");
        }
    }

    pub(super) fn on_manager_frame(&mut self, frame: FromManager<'_>) {
        match frame {
            FromManager::Started { role, slot, pid } => self.on_started(role, slot as usize, pid),
            FromManager::Exited { role, slot, pid, reason, uptime_ms: _ } => {
                self.clean_slot(role, slot as usize, pid, reason);
                self.manager.send(&ToManager::SlotReady { role, slot });
            }
            FromManager::ForkFailed { role, slot, error } => {
                self.counters.fork_failures += 1;
                tracing::error!(
                    "the manager could not fork {role} {slot}: {}",
                    String::from_utf8_lossy(error)
                );
            }
        }
    }

    pub(super) fn on_started(&mut self, role: Role, slot: usize, pid: u32) {
        match role {
            Role::Worker => {
                let Some(w) = self.workers.get_mut(slot) else { return };
                w.started(pid);
                if !w.books.log.is_empty() {
                    tracing::debug!(
                        "worker {slot} (pid {pid}) takes over {} pending deliveries",
                        w.books.log.len()
                    );
                }
            }
            Role::Task => {
                let Some(t) = self.tasks.get_mut(slot) else { return };
                // Taken out of the pool while its predecessor was being replaced: asked to stop.
                t.started(pid);
            }
        }
        if self.reloading == Some((role, slot as u32)) {
            self.reloading = None;
            self.reload_next();
        }
    }

    /// A process of this slot is gone: take what it committed, throw away what it left half
    /// written or half read, and line up everything it had not finished for its successor.
    pub(super) fn clean_slot(&mut self, role: Role, slot: usize, pid: u32, reason: ExitReason) {
        match role {
            Role::Worker => {
                if slot >= self.workers.len() {
                    return;
                }
                // It is dead, so everything it wrote is in the socket already.
                self.read_worker(slot);
                let w = &mut self.workers[slot];
                empty_channel(&mut w.chan, &w.child_end, Role::Worker, slot);
                let WorkerSlot { chan, books, .. } = w;
                chan.output().extend_from_slice(books.log.uncommitted());
                w.exited();
                if !reason.is_clean() {
                    self.counters.worker_crashes += 1;
                }
                tracing::debug!(
                    "worker {slot} (pid {pid}) {reason}; {} deliveries wait for its successor",
                    w.books.log.len()
                );
            }
            Role::Task => {
                if slot >= self.tasks.len() {
                    return;
                }
                self.read_task(slot);
                let t = &mut self.tasks[slot];
                empty_channel(&mut t.chan, &t.child_end, Role::Task, slot);
                let inflight: Vec<u64> = t.books.inflight.drain(..).collect();
                let timed_out = t.books.timed_out;
                t.exited();
                if !reason.is_clean() {
                    self.counters.task_crashes += 1;
                }
                // Jobs behind the first were never started; the first was running unless the
                // process ended on purpose.
                for (k, &task_id) in inflight.iter().enumerate().rev() {
                    let started = k == 0 && !reason.is_clean();
                    let Some(job) = self.jobs.get_mut(task_id) else { continue };
                    if !started {
                        job.attempts = job.attempts.saturating_sub(1);
                        self.jobs.push_front(task_id);
                        continue;
                    }
                    if matches!(self.phase, Phase::Stopping { .. }) {
                        // Not run again: the daemon is stopping. It is answered at exit
                        // (`answer_what_is_left`), never "running it again".
                        continue;
                    }
                    let attempts = job.attempts;
                    // Delivery retries are not deaths: only the runs that died count here.
                    if attempts.saturating_sub(job.retries()) > self.config.task_retry_max {
                        let why = if timed_out == Some(task_id) {
                            format!(
                                "task process {pid} was killed: the task ran longer than task_timeout ({}s)",
                                self.config.task_timeout
                            )
                        } else {
                            format!("task process {pid} {reason}")
                        };
                        tracing::warn!("job {task_id} failed after {attempts} attempt(s): {why}");
                        self.finish_job(task_id, pid, false, why.as_bytes());
                    } else {
                        self.counters.tasks_retried += 1;
                        tracing::warn!(
                            "job {task_id} was running in task process {pid} ({reason}); running it again (attempt {} of {})",
                            attempts + 1,
                            self.config.task_retry_max + 1
                        );
                        self.jobs.push_front(task_id);
                    }
                }
            }
        }
    }

    // ---- signals, reload, shutdown ----

    pub(super) fn handle_signals(&mut self) {
        for sig in self.signals.pending() {
            match sig {
                Signal::SIGTERM | Signal::SIGINT => self.on_stop_signal(sig),
                Signal::SIGCHLD => self.reap(),
                Signal::SIGUSR1 => self.start_reload(Role::Worker),
                Signal::SIGUSR2 => self.start_reload(Role::Task),
                Signal::SIGTTIN => {
                    let _ = self.scale_tasks(true, "SIGTTIN");
                }
                Signal::SIGTTOU => {
                    let _ = self.scale_tasks(false, "SIGTTOU");
                }
                Signal::SIGHUP => match crate::logging::reopen() {
                    Ok(true) => tracing::info!("SIGHUP: log file reopened"),
                    Ok(false) => tracing::info!("SIGHUP: no log file to reopen (logs go to stderr)"),
                    Err(e) => tracing::error!("SIGHUP: cannot reopen the log file: {e}"),
                },
                _ => {}
            }
        }
    }

    pub(super) fn on_stop_signal(&mut self, sig: Signal) {
        match self.phase {
            Phase::Running => {
                let deadline = Instant::now() + self.config.max_wait();
                tracing::info!(
                    "{sig}: shutting down; no new connections; waiting up to {}s for {} jobs and {} requests in flight",
                    self.config.max_wait_time,
                    self.jobs.len(),
                    self.workers.iter().map(|w| w.books.log.len()).sum::<usize>()
                );
                for mut listener in [self.listener.take(), self.ws_listener.take()].into_iter().flatten() {
                    let _ = self.poll.registry().deregister(&mut listener);
                }
                self.phase = Phase::Draining { deadline };
            }
            _ => {
                tracing::warn!("{sig} again: stopping now");
                self.stop_cause = format!("a second {sig} stopped the server at once");
                self.kill_manager();
                self.exit_code = Some(1);
            }
        }
    }

    pub(super) fn reap(&mut self) {
        for reaped in process::reap() {
            if let Some(exit) = self.manager_sup.exited(reaped) {
                self.on_manager_exit(exit.reason);
            } else if let Some(exit) = self.durable.as_mut().and_then(|d| d.bridge_sup.exited(reaped)) {
                self.on_bridge_exit(exit.reason);
            } else if let Some(r) = &mut self.recovery {
                r.orphans.remove(&reaped.pid.as_raw());
            }
        }
    }

    pub(super) fn on_manager_exit(&mut self, reason: ExitReason) {
        if let Phase::Stopping { .. } = self.phase {
            tracing::info!("taskd stopped; the manager {reason}");
            self.exit_code = Some(0);
            return;
        }
        tracing::error!("the manager {reason}; its pool dies with it; starting a new manager");
        // The pool processes die with their manager (PR_SET_PDEATHSIG) and come to us to be
        // reaped; their channels are cleaned only once they are gone.
        let orphans: HashSet<i32> = self
            .workers
            .iter()
            .filter_map(|w| w.pid())
            .chain(self.tasks.iter().filter_map(|t| t.pid()))
            .map(|p| p as i32)
            .collect();
        self.recovery = Some(ManagerRecovery { orphans, deadline: Instant::now() + ORPHAN_LIMIT });
        self.reap();
    }

    /// Once the old pool is gone: clean every slot and start a new manager.
    pub(super) fn finish_manager_recovery(&mut self) {
        let Some(r) = &self.recovery else { return };
        if !r.orphans.is_empty() && Instant::now() < r.deadline {
            return;
        }
        for &pid in &r.orphans {
            tracing::warn!("pool process {pid} outlived its manager; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.recovery = None;
        let died = ExitReason::Signal(Signal::SIGKILL as i32);
        for i in 0..self.workers.len() {
            let pid = self.workers[i].pid().unwrap_or(0);
            self.clean_slot(Role::Worker, i, pid, died);
        }
        for j in 0..self.tasks.len() {
            let pid = self.tasks[j].pid().unwrap_or(0);
            self.clean_slot(Role::Task, j, pid, died);
        }
        // A new channel: the old one may hold half a message of the dead manager.
        match crate::ipc::channel::pair() {
            Ok((master_end, manager_end)) => {
                let _ = self.poll.registry().deregister(self.manager.source());
                self.manager = Channel::new(master_end);
                self.manager_end = manager_end;
                let both = Interest::READABLE | Interest::WRITABLE;
                if let Err(e) = self.poll.registry().register(self.manager.source(), MANAGER, both) {
                    tracing::error!("cannot watch the new manager's channel: {e}");
                }
            }
            Err(e) => tracing::error!("cannot create a channel for a new manager: {e}"),
        }
        // Forked by `spawn_manager` at the end of a turn, at once or after the back-off of a
        // manager that died soon after its start; a fork that fails is tried again.
        self.manager_sup.release(MANAGER_SLOT);
    }

    /// SIGTTIN: one task process more (up to `task_worker_max`); SIGTTOU: one fewer (down to
    /// one), the last one finishing what it was given first.
    pub(super) fn scale_tasks(&mut self, grow: bool, who: &str) -> Result<usize, String> {
        let enabled = self.tasks.iter().filter(|t| t.in_pool()).count();
        let slot = if grow {
            self.tasks.iter().position(|t| !t.in_pool())
        } else if enabled > 1 {
            self.tasks.iter().rposition(|t| t.in_pool())
        } else {
            None
        };
        let Some(j) = slot else {
            let limit = if grow { format!("task_worker_max ({})", self.tasks.len()) } else { "one".into() };
            let why = format!("the task pool is at {limit} already");
            tracing::warn!("{who}: {why}");
            return Err(why);
        };
        let t = &mut self.tasks[j];
        if grow {
            t.enlist();
        } else {
            t.retire();
        }
        self.manager.send(&ToManager::SlotActive { role: Role::Task, slot: j as u32, active: grow });
        let now = enabled + grow as usize - !grow as usize;
        tracing::info!(
            "task pool {} to {now} process(es) (task {j}), asked by {who}",
            if grow { "grows" } else { "shrinks" }
        );
        Ok(now)
    }

    pub(super) fn start_reload(&mut self, role: Role) {
        let n = match role {
            Role::Worker => self.workers.len(),
            Role::Task => self.tasks.len(),
        };
        tracing::info!("reloading every {role} process, one at a time");
        for slot in 0..n as u32 {
            if !self.reload_queue.contains(&(role, slot)) {
                self.reload_queue.push_back((role, slot));
            }
        }
        if self.reloading.is_none() {
            self.reload_next();
        }
    }

    pub(super) fn reload_next(&mut self) {
        while let Some((role, slot)) = self.reload_queue.pop_front() {
            let i = slot as usize;
            let stopped = match role {
                Role::Worker => self.workers[i].ask_to_stop(),
                Role::Task => self.tasks[i].ask_to_stop(),
            };
            if stopped {
                self.reloading = Some((role, slot));
                return;
            }
        }
        if self.reloading.is_none() {
            tracing::info!("reload complete");
        }
    }
}

impl<A: Application> Master<'_, A> {
    // ---- shutdown: every job answered ----

    /// Gives up every job not finished (queued, or in a task process) once shutdown can wait
    /// no longer: each client gets its job's `failed` through its worker's `on_finish` (the
    /// deliveries go before the worker's Stop, so a live worker answers them first). A batch
    /// answers one `failed` with its members' outcomes, each unfinished one's error among them. Durable jobs are not given up: they stay
    /// in Redis for another node (or this one, restarted), and their clients are told so.
    pub(super) fn give_up_jobs(&mut self, cause: &str) {
        self.give_up_followers(cause);
        let mut ids = self.jobs.ids();
        if ids.is_empty() && self.jobs.groups.is_empty() {
            return;
        }
        // Oldest first: each client reads its jobs' answers in the order it sent them.
        ids.sort_unstable();
        let queued = self.jobs.queued();
        let batches = self.jobs.groups.len();
        self.jobs.clear_queues();
        let why = format!("server stopping: {cause} before the job finished");
        let durable = self.durable.is_some();
        // A batch is cut as a whole: one `failed` with its members' outcomes so far.
        let batch_why = format!("server stopping: {cause} before the batch finished");
        for &task_id in &ids {
            if durable {
                self.leave_in_redis(task_id, cause);
            } else if self.jobs.get(task_id).is_some_and(|job| job.group != 0) {
                // Answered with its batch below, as one of its members still missing.
                self.jobs.remove(task_id);
                self.counters.tasks_failed += 1;
            } else {
                self.finish_job(task_id, 0, false, why.as_bytes());
            }
        }
        self.shared.set_jobs_pending(self.jobs.len() as u64);
        // Each batch left (members given up are kept in it, not answered alone) fails now.
        let groups: Vec<u64> = self.jobs.groups.keys().copied().collect();
        for &group_id in &groups {
            let cause = if durable {
                format!(
                    "server stopping: {cause}; the batch's unfinished jobs stay queued in Redis \
                     and will run on another node (or on this one once restarted)"
                )
            } else {
                batch_why.clone()
            };
            self.finish_group_as(group_id, Some(&cause));
        }
        if durable {
            tracing::warn!(
                "{cause}: left {} durable jobs in Redis for another node; their clients were told so",
                ids.len()
            );
        } else {
            tracing::warn!(
                "{cause}: gave up {} jobs at shutdown ({queued} queued, {} running or sent to task processes{}); \
                 each client gets `failed`",
                ids.len(),
                ids.len().saturating_sub(queued),
                if batches == 0 { String::new() } else { format!("; {batches} batch(es) among them") }
            );
        }
    }

    /// A durable job this node stops waiting for: it stays in the job stream, and its client
    /// is told so in its final line (or, for a batch member, in the batch's).
    fn leave_in_redis(&mut self, task_id: u64, cause: &str) {
        let Some(job) = self.jobs.remove(task_id) else { return };
        let ask = format!("ask {{\"type\":\"result\",\"task_id\":{task_id}}} for its outcome");
        let text = if !self.durable.as_ref().is_some_and(|s| s.storing(job.batch)) {
            format!(
                "server stopping: {cause}; the job stays queued in Redis and will run on another node \
                 (or on this one once restarted): {ask}"
            )
        } else {
            format!(
                "server stopping: {cause} before Redis confirmed it stored the job; it may still run: {ask}"
            )
        };
        if job.group != 0 {
            if let Some(group) = self.jobs.groups.get_mut(&job.group) {
                // The batch is answered as a whole once every job is left (`give_up_jobs`).
                group.outcomes[job.index as usize] =
                    Some(MemberOutcome { ok: false, result: text.into_bytes(), attempts: job.attempts });
            }
            return;
        }
        let answered = job.flags & (task_flags::WAIT | task_flags::REPLIED) != 0;
        if job.session != 0 && !answered {
            let line = results::outcome_line(task_id, false, text.as_bytes(), job.attempts);
            self.send_to_session(job.session, &line);
        }
        self.shared.set_jobs_pending(self.jobs.len() as u64);
    }

    /// At exit: what no process will answer now is answered by the master. What the workers
    /// committed is acted on first; then every job left is given up, and every delivery no
    /// worker committed gets its line here: a finished job's outcome (as `result` would give
    /// it), a request's `error`. A worker's later output is never read, so nothing is
    /// answered twice.
    pub(super) fn answer_what_is_left(&mut self) {
        for i in 0..self.workers.len() {
            self.read_worker(i);
        }
        for j in 0..self.tasks.len() {
            self.read_task(j);
        }
        let cause = if self.stop_cause.is_empty() {
            "the server stopped".to_string()
        } else {
            self.stop_cause.clone()
        };
        self.give_up_jobs(&cause);
        let mut lines: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut requests = 0;
        for w in &self.workers {
            let data = w.books.log.uncommitted();
            let mut pos = 0;
            while let Ok(Some((frame, n))) = ToWorker::decode(&data[pos..]) {
                pos += n;
                match frame {
                    ToWorker::Request { session, .. } => {
                        requests += 1;
                        let error = format!("server stopping: {cause} before this request was handled");
                        let mut line =
                            serde_json::json!({"event": "error", "error": error}).to_string().into_bytes();
                        line.push(b'\n');
                        lines.push((session, line));
                    }
                    ToWorker::Finish(Finish { task_id, session, attempts, ok, flags, result, .. }) => {
                        if session == 0 || flags & (task_flags::WAIT | task_flags::REPLIED) != 0 {
                            continue;
                        }
                        let line = if flags & task_flags::GROUP != 0 {
                            let mut members = decode_outcomes(result).unwrap_or_default();
                            // A group cut short carries its error after its members' outcomes.
                            let cut = if ok { None } else { members.pop() };
                            let cut = cut.map(|(_, why)| String::from_utf8_lossy(why));
                            results::group_line(task_id, &members, cut.as_deref())
                        } else {
                            results::outcome_line(task_id, ok, result, attempts)
                        };
                        lines.push((session, line));
                    }
                    // No answer is owed for these.
                    ToWorker::Connect { .. } | ToWorker::Close { .. } | ToWorker::Stop => {}
                }
            }
        }
        if !lines.is_empty() {
            tracing::warn!(
                "{cause}: answered {} jobs and requests the workers had not answered ({requests} requests)",
                lines.len()
            );
        }
        for (session, line) in lines {
            self.send_to_session(session, &line);
        }
    }
}

/// Leaves a dead process's channel clean for its successor: no half frame it wrote, nothing
/// it did not read (what it had not finished is queued again from the master's books).
fn empty_channel<Tx: Message, Rx: Message>(
    chan: &mut Channel<Tx, Rx>,
    child_end: &OwnedFd,
    role: Role,
    slot: usize,
) {
    chan.discard_input();
    if let Err(e) = drain_fd(child_end) {
        tracing::error!("{role} {slot}: cannot empty its channel: {e}");
    }
    chan.discard_output();
}
