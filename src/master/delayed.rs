//! The delayed queue: every job that may not run yet (a delivery retry's back-off, a rate
//! limit), with the time it is due. One timer heap for every "not now"; the reactor's poll
//! timeout includes its next deadline, and due jobs go back to the front of the task queue.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Default)]
pub struct Delayed {
    /// (due, order of arrival, task id): the earliest first, and among equals the oldest.
    heap: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    seq: u64,
}

impl Delayed {
    /// Parks `task_id` until `due`.
    pub fn push(&mut self, due: Instant, task_id: u64) {
        self.seq += 1;
        self.heap.push(Reverse((due, self.seq, task_id)));
    }

    /// The next job due at `now` or before, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<u64> {
        match self.heap.peek() {
            Some(Reverse((due, _, _))) if *due <= now => self.heap.pop().map(|Reverse((_, _, id))| id),
            _ => None,
        }
    }

    /// When the earliest job is due, for the reactor's timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Takes a job out before it is due (it was cancelled).
    pub fn remove(&mut self, task_id: u64) {
        self.heap.retain(|Reverse((_, _, id))| *id != task_id);
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Takes every job out, earliest first (the daemon is stopping).
    pub fn drain(&mut self) -> Vec<u64> {
        let mut all = std::mem::take(&mut self.heap).into_sorted_vec();
        // Sorted ascending by Reverse: the latest first.
        all.reverse();
        all.into_iter().map(|Reverse((_, _, id))| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn jobs_come_out_when_due_earliest_first_ties_in_order() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Delayed::default();
        assert_eq!(d.next_deadline(), None);
        assert_eq!(d.pop_due(ms(1000)), None);
        d.push(ms(30), 3);
        d.push(ms(10), 1);
        d.push(ms(20), 2);
        d.push(ms(20), 4);
        assert_eq!(d.len(), 4);
        assert_eq!(d.next_deadline(), Some(ms(10)));
        assert_eq!(d.pop_due(ms(5)), None);
        assert_eq!(d.pop_due(ms(20)), Some(1));
        assert_eq!(d.pop_due(ms(20)), Some(2));
        assert_eq!(d.pop_due(ms(20)), Some(4));
        assert_eq!(d.pop_due(ms(20)), None);
        assert_eq!(d.next_deadline(), Some(ms(30)));
        assert_eq!(d.pop_due(ms(31)), Some(3));
        assert!(d.is_empty());
    }

    #[test]
    fn drain_empties_it_earliest_first() {
        let t0 = Instant::now();
        let mut d = Delayed::default();
        for (i, at) in [50u64, 10, 40, 10].into_iter().enumerate() {
            d.push(t0 + Duration::from_millis(at), i as u64);
        }
        assert_eq!(d.drain(), vec![1, 3, 2, 0]);
        assert!(d.is_empty() && d.next_deadline().is_none());
    }
}
