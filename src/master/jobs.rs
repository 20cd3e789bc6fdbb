//! Every job the master holds, from the worker's submission until its final outcome has been
//! delivered: what is needed to run it again if its task process dies, and to finish it in
//! whatever process of the submitting slot is alive then. Groups collect their members'
//! outcomes here, so a group survives the worker that submitted it.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use rustc_hash::FxHashMap;
use slab::Slab;
use std::time::{Duration, Instant};

use crate::app::Priority;

use super::spare::SpareBytes;

/// Where a job is: what a `cancel` may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// In a task queue, waiting for a task process.
    Queued,
    /// In the delayed queue: its `run_at`, a retry's back-off or a rate limit.
    Delayed,
    /// Handed to a task process.
    Running,
}

/// The weights of the weighted fair order of the priorities (high, normal, low): of ten jobs
/// started while all three wait, six are high, three normal, one low.
pub const WEIGHTS: [i64; 3] = Priority::WEIGHTS;

pub struct Job {
    /// The worker slot that submitted it (its `on_finish` gets the outcome).
    pub worker: u32,
    pub session: u64,
    /// Its context then its data, in one buffer (see [`Job::context`], [`Job::data`]).
    payload: Vec<u8>,
    context_len: u32,
    /// How many times it was handed to a task process (a run told "not yet" does not count).
    pub attempts: u32,
    /// The group it belongs to (0: none) and its place in it.
    pub group: u64,
    pub index: u32,
    /// The task slot it must run on (`task_to`), if any.
    pub target: Option<u32>,
    /// `task_flags` the submitter gave.
    pub flags: u8,
    /// Durable jobs: the store batch it is in (0: in memory, or stored before a restart). It is
    /// being stored while that batch is not acknowledged ([`super::durable::DurableState::storing`]):
    /// known from the batch's number, with no write to each job when the batch is sent and
    /// again when it is acknowledged (two lookups per job).
    pub batch: u64,
    /// When the master accepted it (the dashboard's latency: accept to outcome).
    pub accepted: Instant,
    pub priority: Priority,
    pub state: JobState,
    /// What few jobs have (a `run_at`, a key, retries), apart: every job is written, read at
    /// its start and read again at its end, and with 8,000 jobs in flight (1,000 connections
    /// x 8) each of those mostly missed the caches, once per cache line a job spans (208
    /// bytes with these inline, 104 without).
    extra: Option<Box<JobExtra>>,
}

/// The parts of a job that most jobs do not have (see [`Job::extra`]).
#[derive(Default)]
pub struct JobExtra {
    /// Delivery retries it has had (`delivery_retry_max`), and the error of the last one.
    pub retries: u32,
    pub last_error: String,
    /// When it was asked to run (Unix ms; 0: at once).
    pub run_at_ms: u64,
    /// Its deduplication key, if any (freed when it ends).
    pub key: Option<String>,
}

impl Job {
    /// What its finish needs besides the outcome (the submitter's request context).
    pub fn context(&self) -> &[u8] {
        &self.payload[..self.context_len as usize]
    }

    /// What its task process runs.
    pub fn data(&self) -> &[u8] {
        &self.payload[self.context_len as usize..]
    }

    pub fn retries(&self) -> u32 {
        self.extra.as_ref().map_or(0, |e| e.retries)
    }

    /// The error of its last failed attempt ("" if none failed).
    pub fn last_error(&self) -> &str {
        self.extra.as_ref().map_or("", |e| &e.last_error)
    }

    pub fn run_at_ms(&self) -> u64 {
        self.extra.as_ref().map_or(0, |e| e.run_at_ms)
    }

    pub fn key(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|e| e.key.as_deref())
    }

    pub fn take_key(&mut self) -> Option<String> {
        self.extra.as_mut().and_then(|e| e.key.take())
    }

    /// Its rare parts, to change (made at the first change).
    pub fn extra_mut(&mut self) -> &mut JobExtra {
        self.extra.get_or_insert_with(Box::default)
    }
}

/// A member's outcome: whether it succeeded, its result or error text, and how many times it
/// was started.
pub struct MemberOutcome {
    pub ok: bool,
    pub result: Vec<u8>,
    pub attempts: u32,
}

pub struct Group {
    pub worker: u32,
    pub session: u64,
    pub context: Vec<u8>,
    pub size: u32,
    /// Members' outcomes in submission order.
    pub outcomes: Vec<Option<MemberOutcome>>,
    pub deadline: Option<Instant>,
    pub timeout: Duration,
}

impl Group {
    pub fn complete(&self) -> bool {
        self.outcomes.len() == self.size as usize && self.outcomes.iter().all(Option::is_some)
    }
}

/// A job's place in a group, its target slot and its flags, as the `Task` frame gave them.
#[derive(Debug, Clone, Copy)]
pub struct JobSpec {
    pub group: u64,
    pub target: Option<u32>,
    pub flags: u8,
    pub priority: Priority,
    /// It waits in the delayed queue, not in a task queue (its `run_at` is to come).
    pub delayed: bool,
    /// Durable jobs: the store batch it goes in (see [`Job::batch`]).
    pub batch: u64,
}

impl JobSpec {
    pub fn now(group: u64, target: Option<u32>, flags: u8) -> Self {
        JobSpec { group, target, flags, priority: Priority::Normal, delayed: false, batch: 0 }
    }
}

/// Where a job is held in [`Jobs`]: good until that job is removed, so used at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place(usize);

#[derive(Default)]
pub struct Jobs {
    /// Durable jobs: task processes take them from Redis, so none is queued here.
    pub durable: bool,
    /// Where each job is in `slots`, by task id, with FxHash: ids are ours, not an attacker's,
    /// and SipHash was a measurable part of the master's time per job.
    all: FxHashMap<u64, usize>,
    /// The jobs themselves. Apart from the index, so that the index's entries are small (16
    /// bytes, not a job's 208) and a lookup touches few cache lines of it; and in a slab, whose
    /// slot freed last is taken next, so a new job is written where the last one to finish was
    /// read: with 8,000 jobs in flight (1,000 connections x 8), the map of whole jobs was 3.4
    /// MB, and inserting or finding a job mostly missed the caches.
    slots: Slab<Job>,
    /// Jobs waiting for any task process, one queue per priority, oldest first.
    queue: [VecDeque<u64>; 3],
    /// Smooth weighted round robin (nginx's) over the priorities with jobs waiting: each
    /// pick adds every such priority's weight to its credit, takes the largest, and takes
    /// the sum back from it. Over any ten picks the shares are 6:3:1, spread out, and no
    /// priority waits more than a cycle.
    credit: [i64; 3],
    /// Jobs waiting for one given task process (`task_to`), per slot.
    targeted: HashMap<u32, VecDeque<u64>>,
    pub groups: HashMap<u64, Group>,
    /// Finished jobs' payload buffers, for the next jobs'.
    spare: SpareBytes,
    /// Bytes of the payloads (data and context) of every job in `all` (`task_queue_bytes_max`).
    bytes: usize,
}

impl Jobs {
    pub fn open_group(
        &mut self,
        group_id: u64,
        worker: u32,
        session: u64,
        size: u32,
        timeout_ms: u64,
        context: &[u8],
    ) {
        let timeout = Duration::from_millis(timeout_ms);
        let group = Group {
            worker,
            session,
            context: context.to_vec(),
            size,
            outcomes: Vec::with_capacity(size as usize),
            // A library app may ask for any timeout: one past the clock's range is none.
            deadline: (timeout_ms > 0).then(|| Instant::now().checked_add(timeout)).flatten(),
            timeout,
        };
        self.groups.insert(group_id, group);
    }

    // Every argument is a part of the job as the worker's frame gave it, and the turn's clock.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        task_id: u64,
        worker: u32,
        session: u64,
        spec: JobSpec,
        context: &[u8],
        data: &[u8],
        now: Instant,
    ) {
        let JobSpec { group, target, flags, priority, delayed, batch } = spec;
        let mut index = 0;
        if group != 0 {
            match self.groups.get_mut(&group) {
                Some(g) if g.outcomes.len() < g.size as usize => {
                    index = g.outcomes.len() as u32;
                    g.outcomes.push(None);
                }
                _ => {
                    tracing::warn!("task {task_id} names group {group}, which is unknown or full; dropped");
                    return;
                }
            }
        }
        let job = Job {
            worker,
            session,
            payload: self.spare.concat(context, data),
            // Part of one frame: at most `MAX_FRAME` (64 MB), far below 4 GB.
            context_len: context.len() as u32,
            attempts: 0,
            group,
            index,
            target,
            flags,
            batch,
            accepted: now,
            priority,
            state: if delayed { JobState::Delayed } else { JobState::Queued },
            extra: None,
        };
        self.bytes += context.len() + data.len();
        // One probe of the index for both the check and the insert.
        match self.all.entry(task_id) {
            Entry::Occupied(e) => {
                let old = std::mem::replace(&mut self.slots[*e.get()], job);
                self.bytes -= old.payload.len();
                tracing::warn!("task id {task_id} submitted twice; the later one replaces it");
            }
            Entry::Vacant(e) => {
                e.insert(self.slots.insert(job));
            }
        }
        if self.durable || delayed {
            return;
        }
        match target {
            Some(slot) => self.targeted.entry(slot).or_default().push_back(task_id),
            None => self.queue[priority.index()].push_back(task_id),
        }
    }

    /// A durable job this node accepted before it restarted: no client waits for it now.
    pub fn recover(&mut self, task_id: u64, worker: u32, context: &[u8], data: &[u8]) {
        let spec = JobSpec::now(0, None, 0);
        self.accept(task_id, worker, 0, spec, context, data, Instant::now());
    }

    pub fn get(&self, task_id: u64) -> Option<&Job> {
        self.all.get(&task_id).map(|&slot| &self.slots[slot])
    }

    /// The priority whose job starts next, and the credits after that pick.
    fn pick(&self) -> Option<(usize, [i64; 3])> {
        // The priorities with jobs waiting, without a list: this runs twice per job started
        // (a `Vec` here was a malloc and a free each time, 4 % of the master's instructions).
        let waiting = |p: &usize| !self.queue[*p].is_empty();
        let mut credit = self.credit;
        let mut total = 0;
        for p in (0..3).filter(waiting) {
            credit[p] += WEIGHTS[p];
            total += WEIGHTS[p];
        }
        // The largest credit; among equals the higher priority.
        let best = (0..3).filter(waiting).max_by_key(|&p| (credit[p], std::cmp::Reverse(p)))?;
        credit[best] -= total;
        Some((best, credit))
    }

    /// The job that starts next (weighted fair order of the priorities).
    #[cfg(test)]
    pub fn front(&self) -> Option<u64> {
        let (p, _) = self.pick()?;
        self.queue[p].front().copied()
    }

    /// Takes the job that starts next (as [`Jobs::pop_front_if`] with a taker that takes all).
    #[cfg(test)]
    pub fn pop_front(&mut self) -> Option<u64> {
        let (p, credit) = self.pick()?;
        self.take_picked(p, credit)
    }

    /// Takes the head of priority `p`'s queue, picked with the credits `credit` after it.
    fn take_picked(&mut self, p: usize, credit: [i64; 3]) -> Option<u64> {
        // A priority that waits no more forgets its credit: it does not come back owed.
        self.credit = credit;
        for q in 0..3 {
            if self.queue[q].is_empty() && q != p {
                self.credit[q] = 0;
            }
        }
        let id = self.queue[p].pop_front();
        if self.queue[p].is_empty() {
            self.credit[p] = 0;
        }
        id
    }

    /// Takes the job that starts next out of its queue if `take`, given its session, says
    /// where it goes; its id, its place (None: no longer held) and that answer. One pick,
    /// where [`Jobs::front`] then [`Jobs::pop_front`] made two, and one look-up of the job for
    /// its session and its start (see [`Jobs::at_mut`]).
    pub fn pop_front_if<R>(
        &mut self,
        take: impl FnOnce(u64) -> Option<R>,
    ) -> Option<(u64, Option<Place>, R)> {
        let (p, credit) = self.pick()?;
        let task_id = *self.queue[p].front()?;
        let place = self.place(task_id);
        let session = place.map_or(0, |Place(slot)| self.slots[slot].session);
        let answer = take(session)?;
        self.take_picked(p, credit);
        Some((task_id, place, answer))
    }

    /// Where job `task_id` is held, if it is.
    pub fn place(&self, task_id: u64) -> Option<Place> {
        self.all.get(&task_id).map(|&slot| Place(slot))
    }

    /// The job at `place`, found a moment ago (no job was removed since).
    pub fn at_mut(&mut self, place: Place) -> Option<&mut Job> {
        self.slots.get_mut(place.0)
    }

    /// Takes a job out of its task queue (it is cancelled). Whether it was there.
    pub fn unqueue(&mut self, task_id: u64) -> bool {
        let Some(job) = self.get(task_id) else { return false };
        let queue = match job.target {
            Some(slot) => self.targeted.entry(slot).or_default(),
            None => &mut self.queue[job.priority.index()],
        };
        match queue.iter().position(|&id| id == task_id) {
            Some(pos) => {
                queue.remove(pos);
                true
            }
            None => false,
        }
    }

    /// The oldest job waiting for task slot `slot` in particular.
    pub fn pop_targeted(&mut self, slot: u32) -> Option<u64> {
        self.targeted.get_mut(&slot).and_then(VecDeque::pop_front)
    }

    /// Puts a job back at the head of its queue (its process died before finishing it).
    pub fn push_front(&mut self, task_id: u64) {
        let Some(&slot) = self.all.get(&task_id) else { return };
        let job = &mut self.slots[slot];
        job.state = JobState::Queued;
        match job.target {
            Some(slot) => self.targeted.entry(slot).or_default().push_front(task_id),
            None => self.queue[job.priority.index()].push_front(task_id),
        }
    }

    pub fn get_mut(&mut self, task_id: u64) -> Option<&mut Job> {
        self.all.get(&task_id).map(|&slot| &mut self.slots[slot])
    }

    pub fn remove(&mut self, task_id: u64) -> Option<Job> {
        let job = self.slots.remove(self.all.remove(&task_id)?);
        self.bytes -= job.payload.len();
        Some(job)
    }

    /// Keeps the buffers of a job removed and done with, for the next jobs.
    pub fn recycle(&mut self, job: Job) {
        self.spare.put(job.payload);
    }

    /// Bytes of the payloads of the jobs held (queued or running).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.groups.is_empty()
    }

    /// Every job's id, in no particular order.
    pub fn ids(&self) -> Vec<u64> {
        self.all.keys().copied().collect()
    }

    /// Empties the queues (at shutdown, once every job in them has been given up).
    pub fn clear_queues(&mut self) {
        self.queue.iter_mut().for_each(VecDeque::clear);
        self.targeted.clear();
    }

    pub fn queued(&self) -> usize {
        self.queue.iter().map(VecDeque::len).sum::<usize>()
            + self.targeted.values().map(VecDeque::len).sum::<usize>()
    }

    /// Jobs waiting for any task process, per priority (high, normal, low).
    pub fn queued_by_priority(&self) -> [usize; 3] {
        [self.queue[0].len(), self.queue[1].len(), self.queue[2].len()]
    }

    /// The earliest group deadline, for the reactor's timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.groups.values().filter_map(|g| g.deadline).min()
    }

    /// Groups whose deadline has passed.
    pub fn expired_groups(&self, now: Instant) -> Vec<u64> {
        self.groups.iter().filter(|(_, g)| g.deadline.is_some_and(|d| d <= now)).map(|(&id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(jobs: &mut Jobs, id: u64, priority: Priority) {
        let spec = JobSpec { priority, ..JobSpec::now(0, None, 0) };
        jobs.accept(id, 0, 0, spec, b"", b"", Instant::now());
    }

    #[test]
    fn a_finished_jobs_place_taken_by_a_new_job_never_mixes_the_two_up() {
        let mut jobs = Jobs::default();
        let spec = JobSpec::now(0, None, 0);
        jobs.accept(1, 0, 10, spec, b"c1", b"first", Instant::now());
        jobs.accept(2, 1, 20, spec, b"c2", b"second", Instant::now());
        assert_eq!(jobs.bytes(), 15);
        let first = jobs.remove(1).unwrap();
        assert_eq!((first.session, first.context(), first.data()), (10, &b"c1"[..], &b"first"[..]));
        jobs.recycle(first);
        assert!(jobs.remove(1).is_none() && jobs.get(1).is_none());
        // Job 3 takes job 1's place.
        jobs.accept(3, 0, 30, spec, b"", b"third", Instant::now());
        assert!(jobs.get(1).is_none());
        assert_eq!(
            jobs.get(3).map(|j| (j.session, j.context(), j.data())),
            Some((30, &b""[..], &b"third"[..]))
        );
        assert_eq!(jobs.get(2).map(|j| (j.session, j.data())), Some((20, &b"second"[..])));
        // The same id again replaces the job, in its place.
        jobs.accept(3, 0, 31, spec, b"", b"again", Instant::now());
        jobs.get_mut(3).unwrap().attempts = 2;
        assert_eq!(jobs.get(3).map(|j| (j.session, j.attempts)), Some((31, 2)));
        assert_eq!((jobs.len(), jobs.bytes()), (2, 2 + 6 + 5));
        let mut ids = jobs.ids();
        ids.sort_unstable();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(jobs.remove(3).map(|j| j.data().to_vec()), Some(b"again".to_vec()));
        assert_eq!(jobs.remove(2).map(|j| j.session), Some(20));
        assert!(jobs.is_empty());
        assert_eq!(jobs.bytes(), 0);
    }

    #[test]
    fn priorities_share_the_task_processes_six_three_one() {
        let mut jobs = Jobs::default();
        for i in 0..100 {
            accept(&mut jobs, i, Priority::High);
            accept(&mut jobs, 1000 + i, Priority::Normal);
            accept(&mut jobs, 2000 + i, Priority::Low);
        }
        let mut counts = [0; 3];
        for _ in 0..50 {
            // Refused first (no task process has room): nothing is taken, no credit moves.
            let next = jobs.front();
            assert_eq!(jobs.pop_front_if(|_| None::<()>), None);
            let (id, _, ()) = jobs.pop_front_if(|_| Some(())).unwrap();
            assert_eq!(Some(id), next);
            counts[(id / 1000) as usize] += 1;
        }
        assert_eq!(counts, [30, 15, 5]);
    }

    #[test]
    fn a_low_job_behind_a_flood_of_high_ones_starts_within_ten_picks() {
        let mut jobs = Jobs::default();
        for i in 0..1000 {
            accept(&mut jobs, i, Priority::High);
        }
        accept(&mut jobs, 5000, Priority::Low);
        let at = (0..1001).position(|_| jobs.pop_front() == Some(5000)).unwrap();
        assert!(at < 10, "the low job started after {at} high ones");
    }

    #[test]
    fn front_is_what_pop_front_takes_and_a_cancelled_job_leaves_its_queue() {
        let mut jobs = Jobs::default();
        accept(&mut jobs, 1, Priority::Low);
        accept(&mut jobs, 2, Priority::High);
        accept(&mut jobs, 3, Priority::Normal);
        assert!(jobs.unqueue(3));
        assert!(!jobs.unqueue(3));
        let mut order = Vec::new();
        while let Some(id) = jobs.front() {
            assert_eq!(jobs.pop_front(), Some(id));
            order.push(id);
        }
        assert_eq!(order, vec![2, 1]);
        assert_eq!(jobs.queued(), 0);
    }
}
