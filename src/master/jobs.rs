//! Every job the master holds, from the worker's submission until its final outcome has been
//! delivered: what is needed to run it again if its task process dies, and to finish it in
//! whatever process of the submitting slot is alive then. Groups collect their members'
//! outcomes here, so a group survives the worker that submitted it.

use std::collections::{HashMap, VecDeque};

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

pub struct Job {
    /// The worker slot that submitted it (its `on_finish` gets the outcome).
    pub worker: u32,
    pub session: u64,
    pub context: Vec<u8>,
    pub data: Vec<u8>,
    /// How many times it was handed to a task process (a run told "not yet" does not count).
    pub attempts: u32,
    /// Delivery retries it has had (`delivery_retry_max`), and the error of the last one.
    pub retries: u32,
    pub last_error: String,
    /// The group it belongs to (0: none) and its place in it.
    pub group: u64,
    pub index: u32,
    /// The task slot it must run on (`task_to`), if any.
    pub target: Option<u32>,
    /// `task_flags` the submitter gave.
    pub flags: u8,
    /// Durable jobs: the store batch it is in until Redis has it (0: stored, or in memory).
    pub batch: u64,
    /// The reply its task process sent the client (`TaskCtx::reply`), kept for `result`.
    pub reply: Vec<u8>,
    /// When the master accepted it (the dashboard's latency: accept to outcome).
    pub accepted: Instant,
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
}

#[derive(Default)]
pub struct Jobs {
    /// Durable jobs: task processes take them from Redis, so none is queued here.
    pub durable: bool,
    /// Keyed by task id with FxHash: ids are ours, not an attacker's, and SipHash was a
    /// measurable part of the master's time per job.
    all: FxHashMap<u64, Job>,
    /// Jobs waiting for any task process, oldest first.
    queue: VecDeque<u64>,
    /// Jobs waiting for one given task process (`task_to`), per slot.
    targeted: HashMap<u32, VecDeque<u64>>,
    pub groups: HashMap<u64, Group>,
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

    pub fn accept(
        &mut self,
        task_id: u64,
        worker: u32,
        session: u64,
        spec: JobSpec,
        context: &[u8],
        data: &[u8],
    ) {
        let JobSpec { group, target, flags } = spec;
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
            context: context.to_vec(),
            data: data.to_vec(),
            attempts: 0,
            retries: 0,
            last_error: String::new(),
            group,
            index,
            target,
            flags,
            batch: 0,
            reply: Vec::new(),
            accepted: Instant::now(),
        };
        self.bytes += context.len() + data.len();
        if let Some(old) = self.all.insert(task_id, job) {
            self.bytes -= old.context.len() + old.data.len();
            tracing::warn!("task id {task_id} submitted twice; the later one replaces it");
        }
        if self.durable {
            return;
        }
        match target {
            Some(slot) => self.targeted.entry(slot).or_default().push_back(task_id),
            None => self.queue.push_back(task_id),
        }
    }

    /// A durable job this node accepted before it restarted: no client waits for it now.
    pub fn recover(&mut self, task_id: u64, worker: u32, context: &[u8], data: &[u8]) {
        let spec = JobSpec { group: 0, target: None, flags: 0 };
        self.accept(task_id, worker, 0, spec, context, data);
    }

    pub fn get(&self, task_id: u64) -> Option<&Job> {
        self.all.get(&task_id)
    }

    pub fn front(&self) -> Option<u64> {
        self.queue.front().copied()
    }

    pub fn pop_front(&mut self) -> Option<u64> {
        self.queue.pop_front()
    }

    /// The oldest job waiting for task slot `slot` in particular.
    pub fn pop_targeted(&mut self, slot: u32) -> Option<u64> {
        self.targeted.get_mut(&slot).and_then(VecDeque::pop_front)
    }

    /// Puts a job back at the head of its queue (its process died before finishing it).
    pub fn push_front(&mut self, task_id: u64) {
        match self.all.get(&task_id).and_then(|j| j.target) {
            Some(slot) => self.targeted.entry(slot).or_default().push_front(task_id),
            None => self.queue.push_front(task_id),
        }
    }

    pub fn get_mut(&mut self, task_id: u64) -> Option<&mut Job> {
        self.all.get_mut(&task_id)
    }

    pub fn remove(&mut self, task_id: u64) -> Option<Job> {
        let job = self.all.remove(&task_id)?;
        self.bytes -= job.context.len() + job.data.len();
        Some(job)
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
        self.queue.clear();
        self.targeted.clear();
    }

    pub fn queued(&self) -> usize {
        self.queue.len() + self.targeted.values().map(VecDeque::len).sum::<usize>()
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
