//! The master's side of the pool: what workers commit, what task processes report, and
//! handing jobs to task processes.

use super::*;
use crate::ipc::envelope::Message;

/// At most this many jobs of one connection in a row go to one task process (see
/// `dispatch_jobs`): enough for a few lines of each of a thousand clients, few enough that a
/// client that sends a long burst still has it spread over the pool.
const SESSION_RUN: usize = 8;

impl<A: Application> Master<'_, A> {
    pub(super) fn read_worker(&mut self, i: usize) {
        self.read_worker_after(i, false);
    }

    /// [`Master::read_worker`] after a readiness event (see `Channel::fill_after`).
    pub(super) fn read_worker_after(&mut self, i: usize, short_read_drains: bool) {
        if let Err(e) = self.workers[i].chan.fill_after(short_read_drains) {
            tracing::error!("worker {i}: reading its channel failed: {e}");
        }
        self.handle_worker_input(i);
    }

    /// Acts on the committed part of a worker's output; the rest waits for its commit.
    pub(super) fn handle_worker_input(&mut self, i: usize) {
        let drained = Channel::drain_committed(
            self,
            |m| &mut m.workers[i].chan,
            |m, frame| m.on_worker_frame(i, frame),
        );
        if let Err(e) = drained {
            let w = &mut self.workers[i];
            let pid = w.pid();
            replace_corrupt(&mut w.chan, Role::Worker, i, pid, e);
        }
    }

    pub(super) fn on_worker_frame(&mut self, i: usize, frame: FromWorker<'_>) {
        let frame = self.tick_job(frame);
        if self.durable_worker_frame(i, &frame) {
            return;
        }
        match frame {
            FromWorker::Client(frame) => self.on_client_frame(frame),
            FromWorker::TaskOptions { task_id, run_at_ms, priority, dedup_ttl_ms, key } => {
                self.pending_options =
                    Some(schedule::Options::read(task_id, run_at_ms, priority, dedup_ttl_ms, key));
            }
            FromWorker::Task { task_id, session, target, group, flags, context, data } => {
                let target = u32::try_from(target).ok().filter(|&t| (t as usize) < self.tasks.len());
                let options = self.pending_options.take().filter(|o| o.task_id == task_id);
                // A durable job's key is taken in Redis, with the job (see `durable::dedup`).
                let local_key =
                    options.as_ref().filter(|_| self.durable.is_none()).and_then(|o| o.key.as_deref());
                if let Some(key) = local_key {
                    let ttl = options.as_ref().map_or(Duration::ZERO, |o| o.dedup_ttl);
                    match self.keys.claim(key, task_id, ttl, session, Instant::now()) {
                        dedup::Claim::Taken => {}
                        claim => {
                            // Not run: its client hears of the first job, after its `accepted`.
                            let first = match claim {
                                dedup::Claim::Waiting { first } | dedup::Claim::Ended { first, .. } => first,
                                dedup::Claim::Taken => 0,
                            };
                            self.counters.duplicates += 1;
                            tracing::info!("job {task_id} has the key of job {first}: not run");
                            if let Some((_, conn)) = self.conn_mut(session) {
                                conn.outstanding += 1;
                            }
                            let line = match claim {
                                dedup::Claim::Ended { line, .. } => Some(line),
                                _ => None,
                            };
                            self.duplicates.push((session, first, line));
                            return;
                        }
                    }
                }
                let mut spec = JobSpec::now(group, target, flags);
                // A durable job's time is kept in Redis (see `durable_worker_frame`).
                let due =
                    options.as_ref().filter(|_| self.durable.is_none()).and_then(schedule::Options::due);
                if let Some(o) = &options {
                    spec.priority = o.priority;
                    spec.delayed = due.is_some();
                }
                // In the batch `durable_worker_frame` put it in, sent at the end of this turn.
                spec.batch = self.durable.as_ref().map_or(0, |s| s.open_batch());
                self.jobs.accept(task_id, i as u32, session, spec, context, data, self.now);
                // Looked up only when there are options (a pair would look it up for every job).
                if let Some(o) = &options {
                    let key = o.key.clone().filter(|_| self.durable.is_none());
                    if o.run_at_ms != 0 || key.is_some() {
                        if let Some(job) = self.jobs.get_mut(task_id) {
                            let extra = job.extra_mut();
                            extra.run_at_ms = o.run_at_ms;
                            extra.key = key;
                        }
                    }
                }
                if let Some(due) = due {
                    self.delayed.push(due, task_id);
                    self.counters.scheduled += 1;
                }
                self.counters.tasks_accepted += 1;
                // A waited-for task is answered by its waiter's request, not on its own.
                if group == 0 && flags & task_flags::WAIT == 0 {
                    if let Some((_, conn)) = self.conn_mut(session) {
                        conn.outstanding += 1;
                    }
                }
                self.shared.set_jobs_pending(self.jobs.len() as u64);
            }
            FromWorker::Group { group_id, session, size, timeout_ms, context } => {
                self.jobs.open_group(group_id, i as u32, session, size, timeout_ms, context);
                if let Some((_, conn)) = self.conn_mut(session) {
                    conn.outstanding += 1;
                }
            }
            FromWorker::Commit { seq } => {
                self.commit(i, seq);
                self.tell_duplicates();
            }
        }
    }

    /// What a worker wrote for clients (also when it was held for durable jobs).
    pub(super) fn on_client_frame(&mut self, frame: ToClient<'_>) {
        match frame {
            ToClient::Send { session, data } => self.send_to_session(session, data),
            ToClient::CloseSession { session } => {
                if let Some((key, conn)) = self.conn_mut(session) {
                    conn.close_after_flush = true;
                    self.mark_dirty(key);
                }
            }
            ToClient::QueryResult { session, task_id } => self.answer_result_query(session, task_id),
            ToClient::Cancel { session, task_id, token } => self.cancel_job(session, task_id, token),
            ToClient::Stats { session } => {
                let line = self.stats_line();
                self.send_to_session(session, &line);
            }
        }
    }

    pub(super) fn commit(&mut self, i: usize, seq: u64) {
        let Master { workers, conns, counters, maybe_finished, .. } = self;
        let slot = &mut workers[i];
        let served = &mut slot.served;
        slot.books.log.commit(seq, |entry| {
            match entry.kind {
                Delivery::Request => {
                    *served += 1;
                    counters.request_count += 1;
                    counters.input_bytes = counters.input_bytes.saturating_sub(entry.bytes());
                }
                Delivery::Finish => {}
                Delivery::Connect | Delivery::Close => return,
            }
            let key = (entry.session & KEY_MASK) as usize;
            if let Some(conn) = conns.get_mut(key) {
                if conn.session == entry.session {
                    conn.outstanding = conn.outstanding.saturating_sub(1);
                    if entry.kind == Delivery::Request {
                        // Input flow control: its worker caught up by this much.
                        conn.input_committed(entry.bytes());
                    }
                    if conn.read_closed {
                        maybe_finished.push(key);
                    }
                }
            }
        });
    }

    /// A job of `session` that ends without a finish delivery: what committing one would do.
    fn finished_here(&mut self, session: u64) {
        if let Some((key, conn)) = self.conn_mut(session) {
            conn.outstanding = conn.outstanding.saturating_sub(1);
            if conn.read_closed {
                self.maybe_finished.push(key);
            }
        }
    }

    // ---- task processes ----

    pub(super) fn read_task(&mut self, j: usize) {
        self.read_task_after(j, false);
    }

    /// [`Master::read_task`] after a readiness event (see `Channel::fill_after`).
    pub(super) fn read_task_after(&mut self, j: usize, short_read_drains: bool) {
        if let Err(e) = self.tasks[j].chan.fill_after(short_read_drains) {
            tracing::error!("task {j}: reading its channel failed: {e}");
        }
        self.handle_task_input(j);
    }

    pub(super) fn handle_task_input(&mut self, j: usize) {
        let drained = Channel::drain(self, |m| &mut m.tasks[j].chan, |m, frame| m.on_task_frame(j, frame));
        if let Err(e) = drained {
            let t = &mut self.tasks[j];
            let pid = t.pid();
            replace_corrupt(&mut t.chan, Role::Task, j, pid, e);
        }
    }

    pub(super) fn on_task_frame(&mut self, j: usize, frame: FromTask<'_>) {
        match frame {
            FromTask::Send { session, data } => self.send_to_session(session, data),
            FromTask::TaskDone { task_id, ok, reply, result } => {
                let pid = self.task_ran(j, task_id);
                self.job_outcome(task_id, pid, ok, reply, result);
            }
            FromTask::TaskRetry { task_id, not_yet, wait_ms, error } => {
                let pid = self.task_ran(j, task_id);
                let wait = (wait_ms != FromTask::NO_WAIT).then(|| Duration::from_millis(wait_ms));
                self.retry_job(task_id, pid, not_yet, wait, &String::from_utf8_lossy(error));
            }
        }
    }

    /// Task slot `j` is done with a run of `task_id`: it holds it no longer. Its pid.
    fn task_ran(&mut self, j: usize, task_id: u64) -> u32 {
        let now = self.now;
        let slot = &mut self.tasks[j];
        if let Some(pos) = slot.books.inflight.iter().position(|&id| id == task_id) {
            slot.books.inflight.remove(pos);
            if pos == 0 {
                slot.books.head_finished(now);
            }
        }
        slot.served += 1;
        slot.pid().unwrap_or(0)
    }

    // ---- delivery retries and the delayed queue ----

    /// A run of a job failed transiently (`not_yet`: it may not run yet, a rate limit): it
    /// waits in the delayed queue, holding no task process, then runs again; or, past
    /// `delivery_retry_max` (or while the daemon stops), it fails with `error`.
    pub(super) fn retry_job(
        &mut self,
        task_id: u64,
        task_pid: u32,
        not_yet: bool,
        asked: Option<Duration>,
        error: &str,
    ) {
        let Some(job) = self.jobs.get_mut(task_id) else {
            tracing::warn!("retry of unknown task {task_id} dropped");
            return;
        };
        if !matches!(self.phase, Phase::Running) {
            let why = format!("server stopping before the job could run again (its last attempt: {error})");
            self.finish_job(task_id, task_pid, false, why.as_bytes());
            return;
        }
        let wait = if not_yet {
            // Not an attempt: the next run has the same number.
            job.attempts = job.attempts.saturating_sub(1);
            asked.unwrap_or_default().min(crate::retry::NOT_YET_MAX)
        } else {
            let n = job.retries() + 1;
            let Some(wait) = self.retry.wait(n, asked, &mut self.rng) else {
                tracing::warn!("job {task_id} failed after {} attempt(s): {error}", job.attempts);
                self.finish_job(task_id, task_pid, false, error.as_bytes());
                return;
            };
            job.extra_mut().retries = n;
            wait
        };
        let extra = job.extra_mut();
        extra.last_error.clear();
        extra.last_error.push_str(error);
        job.state = jobs::JobState::Delayed;
        let (session, attempt) = (job.session, job.attempts + 1);
        let tells_client = !not_yet && job.group == 0 && job.flags & task_flags::WAIT == 0;
        self.delayed.push(Instant::now() + wait, task_id);
        if not_yet {
            tracing::debug!("job {task_id} may not run yet ({error}); waits {} ms", wait.as_millis());
            return;
        }
        self.counters.delivery_retries += 1;
        tracing::info!(
            "job {task_id}: attempt {} failed ({error}); runs again in {} ms (retry {} of {})",
            attempt - 1,
            wait.as_millis(),
            attempt - 1,
            self.retry.max_retries
        );
        if tells_client && !self.client_gone(session) {
            let line = crate::retry::retrying_line(task_id, attempt, wait, error);
            self.send_to_session(session, &line);
        }
    }

    /// Jobs whose wait is over go back to the head of the task queue, earliest first. Once
    /// the daemon stops, none runs again: each fails at once, so that the drain does not wait
    /// out a back-off (which may be minutes) and the client hears now, not at max_wait_time.
    pub(super) fn release_delayed(&mut self) {
        if self.delayed.is_empty() {
            return;
        }
        if !matches!(self.phase, Phase::Running) {
            for task_id in self.delayed.drain() {
                let Some(job) = self.jobs.get(task_id) else { continue };
                let why = if job.attempts == 0 {
                    format!(
                        "server stopping before the job's time came (run_at {})",
                        crate::app::rfc3339(job.run_at_ms())
                    )
                } else {
                    format!(
                        "server stopping before the job could run again (its last attempt: {})",
                        job.last_error()
                    )
                };
                self.finish_job(task_id, 0, false, why.as_bytes());
            }
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(task_id) = self.delayed.pop_due(now) {
            if self.jobs.get(task_id).is_some() {
                due.push(task_id);
            }
        }
        for &task_id in due.iter().rev() {
            self.jobs.push_front(task_id);
        }
    }

    /// A task process (here or, for durable jobs, on any node) finished a job.
    pub(super) fn job_outcome(&mut self, task_id: u64, task_pid: u32, ok: bool, reply: &[u8], result: &[u8]) {
        // The reply goes out with the outcome, in the same turn: one hop, no worker.
        let mut kept = None;
        if !reply.is_empty() {
            let session = match self.jobs.get_mut(task_id) {
                Some(job) if job.group == 0 && job.flags & task_flags::WAIT == 0 && job.session != 0 => {
                    job.flags |= task_flags::REPLIED;
                    Some(job.session)
                }
                _ => None,
            };
            if let Some(session) = session {
                // Kept for a `result` query (see `finish_removed`), in the buffer of a reply no
                // longer kept.
                kept = Some(self.results.copy_of(reply));
                self.send_to_session(session, reply);
            }
        }
        self.finish_job_replied(task_id, task_pid, ok, result, kept);
    }

    /// Whether a reply to `session` may never be read: no session, a closed connection, or one
    /// whose client has closed its side (half-closed or gone: a read cannot tell them apart).
    pub(super) fn client_gone(&mut self, session: u64) -> bool {
        session == 0 || self.conn_mut(session).is_none_or(|(_, conn)| conn.read_closed)
    }

    /// A job has its final outcome: count it and deliver it to its worker slot's `on_finish`.
    pub(super) fn finish_job(&mut self, task_id: u64, task_pid: u32, ok: bool, result: &[u8]) {
        self.finish_job_replied(task_id, task_pid, ok, result, None);
    }

    /// [`Master::finish_job`] of a job whose task process sent its client `reply` (to keep).
    fn finish_job_replied(
        &mut self,
        task_id: u64,
        task_pid: u32,
        ok: bool,
        result: &[u8],
        reply: Option<Vec<u8>>,
    ) {
        let Some(mut job) = self.jobs.remove(task_id) else {
            if matches!(self.phase, Phase::Stopping { .. }) {
                tracing::debug!("task {task_id} finished after it was given up at shutdown; dropped");
            } else {
                tracing::warn!("result for unknown task {task_id} dropped");
            }
            return;
        };
        self.finish_removed(task_id, &mut job, task_pid, ok, result, reply);
        // Its payload's buffer takes the next job's.
        self.jobs.recycle(job);
    }

    /// [`Master::finish_job`] of a job taken out of the books.
    fn finish_removed(
        &mut self,
        task_id: u64,
        job: &mut jobs::Job,
        task_pid: u32,
        ok: bool,
        result: &[u8],
        reply: Option<Vec<u8>>,
    ) {
        // The final reply is kept for a `result` query (the last result_keep): for a client
        // that cannot have it (gone, or the node restarted since), and for one that had it and
        // asks again (as Celery's users do); with durable jobs it is also the record of which
        // jobs are finished, so that a second outcome of one is dropped.
        let gone = self.client_gone(job.session);
        if job.group == 0 && job.flags & task_flags::WAIT == 0 {
            let line = match reply {
                Some(r) => r,
                None => results::outcome_line(task_id, ok, result, job.attempts),
            };
            if gone {
                self.keep_in_redis(task_id, &line);
            }
            if let Some(key) = job.take_key() {
                self.key_released(&key, task_id, &line, false);
            }
            self.results.record(task_id, line);
        }
        if ok {
            self.counters.tasks_done += 1;
        } else {
            self.counters.tasks_failed += 1;
            self.dashboard.failure(task_id, job.data(), result, job.attempts);
        }
        self.dashboard.finished(ok, self.now.saturating_duration_since(job.accepted));
        self.shared.set_jobs_pending(self.jobs.len() as u64);
        if job.group != 0 {
            let Some(group) = self.jobs.groups.get_mut(&job.group) else {
                self.counters.late_results_dropped += 1;
                tracing::debug!(
                    "task {task_id} finished after its group {} was answered; dropped",
                    job.group
                );
                return;
            };
            group.outcomes[job.index as usize] =
                Some(MemberOutcome { ok, result: result.to_vec(), attempts: job.attempts });
            if group.complete() {
                self.finish_group(job.group);
            }
            return;
        }
        let session = job.session;
        let replied = job.flags & task_flags::REPLIED != 0 && job.flags & task_flags::CALLBACK == 0;
        if ok && replied && !self.app.finish_replied() {
            // Its client has its reply, and the application wants nothing more of it: done
            // here, as a commit of its finish would be.
            self.finished_here(session);
            return;
        }
        let finish = |seq, out: &mut Vec<u8>| {
            let (attempts, flags, context) = (job.attempts, job.flags, job.context());
            ToWorker::Finish(Finish { seq, task_id, session, task_pid, attempts, ok, flags, context, result })
                .encode(out)
        };
        if job.flags & task_flags::WAIT != 0 {
            // For a waiting worker: no delivery to replay (seq 0); its request is, if it dies.
            finish(0, self.workers[job.worker as usize].chan.output());
            return;
        }
        self.deliver(job.worker as usize, session, Delivery::Finish, finish);
    }

    /// Delivers a group's outcomes as one finish; members still missing count as timed out.
    pub(super) fn finish_group(&mut self, group_id: u64) {
        self.finish_group_as(group_id, None);
    }

    /// `finish_group`, or with `cut` (if given) the group cut short (at shutdown): it fails
    /// with `cut` as its error and as the error of each member still missing; the members
    /// that finished keep their outcomes. A cut group's finish is `ok: false` and carries
    /// `cut` as one more outcome after its members' (the worker takes it as the group's error).
    pub(super) fn finish_group_as(&mut self, group_id: u64, cut: Option<&str>) {
        let Some(group) = self.jobs.groups.remove(&group_id) else { return };
        let mut result = Vec::new();
        let mut attempts = 0;
        let missing = match cut {
            Some(why) => why.to_string(),
            None => format!("timed out after {} ms", group.timeout.as_millis()),
        };
        let mut members: Vec<(bool, &[u8])> = Vec::with_capacity(group.size as usize);
        for k in 0..group.size as usize {
            match group.outcomes.get(k).and_then(Option::as_ref) {
                Some(member) => {
                    attempts = attempts.max(member.attempts);
                    encode_outcome(member.ok, &member.result, &mut result);
                    members.push((member.ok, &member.result));
                }
                None => {
                    encode_outcome(false, missing.as_bytes(), &mut result);
                    members.push((false, missing.as_bytes()));
                }
            }
        }
        if let Some(why) = cut {
            encode_outcome(false, why.as_bytes(), &mut result);
        }
        let session = group.session;
        // As for a single job (`finish_job`): kept for a `result` query.
        let line = results::group_line(group_id, &members, cut);
        if self.client_gone(session) {
            self.keep_in_redis(group_id, &line);
        }
        self.results.record(group_id, line);
        self.deliver(group.worker as usize, session, Delivery::Finish, |seq, out| {
            ToWorker::Finish(Finish {
                seq,
                task_id: group_id,
                session,
                task_pid: 0,
                attempts,
                ok: cut.is_none(),
                flags: task_flags::GROUP,
                context: &group.context,
                result: &result,
            })
            .encode(out)
        });
    }

    /// Hands queued jobs to task processes with room for them, least loaded first.
    pub(super) fn dispatch_jobs(&mut self) {
        let prefetch = self.config.task_prefetch;
        // Jobs for one given task process first: only that process can take them.
        for j in 0..self.tasks.len() {
            while self.tasks[j].accepts_work()
                && self.tasks[j].books.inflight.len() < self.tasks[j].books.room(prefetch)
            {
                let Some(task_id) = self.jobs.pop_targeted(j as u32) else { break };
                let place = self.jobs.place(task_id);
                self.run_at(j, task_id, place);
            }
        }
        // The task process the previous job went to, its session, and how many of that
        // session's jobs in a row it took.
        let mut last: Option<(usize, u64, usize)> = None;
        loop {
            let tasks = &self.tasks;
            let has_room = |t: &TaskSlot| t.accepts_work() && t.books.inflight.len() < t.books.room(prefetch);
            // The next job is taken only if a task process has room for it (one pick of the
            // priorities, and one look-up of the job, for both).
            let taken = self.jobs.pop_front_if(|session| {
                // A connection's jobs read together run together (up to SESSION_RUN of them):
                // their `done` lines come back in one frame and leave in one write, where
                // spread over every task process they came back in as many turns and writes.
                let together = last
                    .filter(|&(j, s, n)| {
                        s == session && session != 0 && n < SESSION_RUN && has_room(&tasks[j])
                    })
                    .map(|(j, _, n)| (j, n + 1));
                let best = together.or_else(|| {
                    tasks
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| has_room(t))
                        .min_by_key(|(_, t)| t.books.inflight.len())
                        .map(|(j, _)| (j, 1))
                });
                best.map(|(j, n)| (j, session, n))
            });
            let Some((task_id, place, (j, session, n))) = taken else { return };
            last = Some((j, session, n));
            self.run_at(j, task_id, place);
        }
    }

    /// Sends job `task_id`, held at `place` (None: no longer held), to task slot `j`.
    pub(super) fn run_at(&mut self, j: usize, task_id: u64, place: Option<jobs::Place>) {
        let now = self.now;
        let Some(job) = place.and_then(|p| self.jobs.at_mut(p)) else { return };
        job.attempts += 1;
        job.state = jobs::JobState::Running;
        let slot = &mut self.tasks[j];
        ToTask::RunTask {
            task_id,
            session: job.session,
            attempt: job.attempts,
            src_worker: job.worker,
            data: job.data(),
        }
        .encode(slot.chan.output());
        slot.books.inflight.push_back(task_id);
        if slot.books.inflight.len() == 1 {
            slot.books.head_changed(now);
        }
    }

    /// Kills a task process whose job has run past `task_timeout`; its death re-runs the job.
    pub(super) fn kill_hung_tasks(&mut self) {
        let Some(limit) = self.task_limit else { return };
        // One reading of the clock for the whole pool, every turn.
        let now = Instant::now();
        for (j, t) in self.tasks.iter_mut().enumerate() {
            let hung = t.books.timed_out.is_none()
                && t.books.running_since.is_some_and(|s| now.saturating_duration_since(s) >= limit);
            if let (true, Some(pid), Some(&task_id)) = (hung, t.pid(), t.books.inflight.front()) {
                tracing::warn!(
                    "job {task_id} has run longer than task_timeout ({}s) in task process {j} (pid {pid}); killing it",
                    self.config.task_timeout,
                );
                t.books.timed_out = Some(task_id);
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// A process that sent bytes that do not decode cannot be trusted with its channel: what it
/// sent is dropped and it is killed; its death hands its work to a successor.
fn replace_corrupt<Tx: Message, Rx: Message>(
    chan: &mut Channel<Tx, Rx>,
    role: Role,
    slot: usize,
    pid: Option<u32>,
    e: DecodeError,
) {
    tracing::error!("{role} {slot} (pid {}) sent a corrupt message ({e}); replacing it", pid.unwrap_or(0));
    chan.discard_input();
    if let Some(pid) = pid {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}
