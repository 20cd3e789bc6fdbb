//! Every job the master holds, from the worker's submission until its final outcome has been
//! delivered: what is needed to run it again if its task process dies, and to finish it in
//! whatever process of the submitting slot is alive then. Groups collect their members'
//! outcomes here, so a group survives the worker that submitted it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub struct Job {
    /// The worker slot that submitted it (its `on_finish` gets the outcome).
    pub worker: u32,
    pub session: u64,
    pub context: Vec<u8>,
    pub data: Vec<u8>,
    /// How many times it was handed to a task process.
    pub attempts: u32,
    /// The group it belongs to (0: none) and its place in it.
    pub group: u64,
    pub index: u32,
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

#[derive(Default)]
pub struct Jobs {
    all: HashMap<u64, Job>,
    /// Jobs waiting for a task process, oldest first.
    queue: VecDeque<u64>,
    pub groups: HashMap<u64, Group>,
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
            deadline: (timeout_ms > 0).then(|| Instant::now() + timeout),
            timeout,
        };
        self.groups.insert(group_id, group);
    }

    pub fn accept(
        &mut self,
        task_id: u64,
        worker: u32,
        session: u64,
        group: u64,
        context: &[u8],
        data: &[u8],
    ) {
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
            group,
            index,
        };
        if self.all.insert(task_id, job).is_some() {
            tracing::warn!("task id {task_id} submitted twice; the later one replaces it");
        }
        self.queue.push_back(task_id);
    }

    pub fn front(&self) -> Option<u64> {
        self.queue.front().copied()
    }

    pub fn pop_front(&mut self) -> Option<u64> {
        self.queue.pop_front()
    }

    /// Puts a job back at the head of the queue (its process died before finishing it).
    pub fn push_front(&mut self, task_id: u64) {
        self.queue.push_front(task_id);
    }

    pub fn get_mut(&mut self, task_id: u64) -> Option<&mut Job> {
        self.all.get_mut(&task_id)
    }

    pub fn remove(&mut self, task_id: u64) -> Option<Job> {
        self.all.remove(&task_id)
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.groups.is_empty()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
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
