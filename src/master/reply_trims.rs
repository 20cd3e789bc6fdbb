//! Which entries of this node's reply stream the bridge may delete, and when.
//!
//! An entry carries the outcomes of one consumer's flush for this node, and the master acts on
//! them one by one. Some wait in the master first: held behind their batch's acknowledgement (a
//! consumer can finish a job before the bridge's word that it is stored arrives), or kept while
//! the node's lease is unsure. An entry is deleted only once the master has seen every outcome
//! in it (the bridge says so after them, [`crate::ipc::envelope::FromBridge::EntryRead`]) and
//! none of them waits: deleted at its first outcome acted on, as it was, a crash of the master
//! (kill -9, the OOM killer) lost the outcomes still waiting, or not yet read from the bridge,
//! with no copy left in Redis for the next run to read (the job ran, its `result` was never
//! known). The deletions are asked at the end of a turn.

#[derive(Debug, Default)]
pub struct ReplyTrims {
    /// Outcomes not acted on yet, per entry, oldest entry first. A list, not a map: under load
    /// most outcomes wait for their batch (hashing each entry's id cost the master some 200
    /// instructions per job), and few entries wait at a time: those of the batches in flight,
    /// whose outcomes are released in the order they came. Looked for from the newest.
    waiting: Vec<(Vec<u8>, u32)>,
    /// Entries whose every outcome the master has seen, not deleted yet (those with an outcome
    /// waiting stay here until it is acted on).
    whole: Vec<Vec<u8>>,
    /// Buffers of ids no longer needed, for the next ones (an allocation per entry otherwise).
    spare: Vec<Vec<u8>>,
}

/// Spare buffers kept at most (an entry id is some 15 bytes).
const SPARE_MAX: usize = 64;

impl ReplyTrims {
    /// An outcome of `entry` waits in the master.
    pub fn waits(&mut self, entry: &[u8]) {
        match self.waiting.iter_mut().rev().find(|(e, _)| e == entry) {
            Some((_, n)) => *n += 1,
            None => {
                let id = self.copy(entry);
                self.waiting.push((id, 1));
            }
        }
    }

    /// An outcome of `entry` that waited is about to be acted on (or to wait again).
    pub fn released(&mut self, entry: &[u8]) {
        let Some(at) = self.waiting.iter().position(|(e, _)| e == entry) else { return };
        self.waiting[at].1 -= 1;
        if self.waiting[at].1 == 0 {
            let (id, _) = self.waiting.remove(at);
            self.keep(id);
        }
    }

    /// Every outcome of `entry` was seen (acted on, or waiting).
    pub fn read_whole(&mut self, entry: &[u8]) {
        if self.whole.last().is_none_or(|e| e != entry) {
            let id = self.copy(entry);
            self.whole.push(id);
        }
    }

    /// Hands `delete` each entry read whole none of whose outcomes waits, once; the others stay
    /// for a later turn.
    pub fn due(&mut self, mut delete: impl FnMut(&[u8])) {
        let mut i = 0;
        while i < self.whole.len() {
            if self.waiting.iter().any(|(e, _)| *e == self.whole[i]) {
                i += 1;
                continue;
            }
            let entry = self.whole.swap_remove(i);
            delete(&entry);
            self.keep(entry);
        }
    }

    fn copy(&mut self, entry: &[u8]) -> Vec<u8> {
        let mut id = self.spare.pop().unwrap_or_default();
        id.clear();
        id.extend_from_slice(entry);
        id
    }

    fn keep(&mut self, id: Vec<u8>) {
        if self.spare.len() < SPARE_MAX {
            self.spare.push(id);
        }
    }

    /// Entries with outcomes waiting.
    #[cfg(test)]
    pub fn waiting_entries(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(t: &mut ReplyTrims) -> Vec<String> {
        let mut out = Vec::new();
        t.due(|e| out.push(String::from_utf8_lossy(e).into_owned()));
        out.sort();
        out
    }

    #[test]
    fn an_entry_read_whole_is_deleted_once() {
        let mut t = ReplyTrims::default();
        t.read_whole(b"1-0");
        t.read_whole(b"2-0");
        assert_eq!(due(&mut t), ["1-0", "2-0"]);
        assert!(due(&mut t).is_empty());
    }

    #[test]
    fn an_entry_not_read_whole_is_not_deleted() {
        // Its outcomes acted on in one turn, the rest of it (and its end) in the next: a
        // partial read of the bridge's write.
        let mut t = ReplyTrims::default();
        assert!(due(&mut t).is_empty());
        t.read_whole(b"1-0");
        assert_eq!(due(&mut t), ["1-0"]);
    }

    #[test]
    fn an_entry_with_an_outcome_waiting_stays_until_it_is_acted_on() {
        let mut t = ReplyTrims::default();
        // Its first outcome acted on, its second held behind its batch, its end read.
        t.waits(b"1-0");
        t.read_whole(b"1-0");
        assert!(due(&mut t).is_empty(), "deleted while an outcome of it waits");
        assert_eq!(t.waiting_entries(), 1);
        // The batch is acknowledged: the held outcome is released and acted on.
        t.released(b"1-0");
        assert_eq!(due(&mut t), ["1-0"]);
        assert_eq!(t.waiting_entries(), 0);
    }

    #[test]
    fn several_outcomes_may_wait_and_other_entries_go_meanwhile() {
        let mut t = ReplyTrims::default();
        t.waits(b"1-0");
        t.waits(b"1-0");
        t.read_whole(b"1-0");
        t.read_whole(b"2-0");
        assert_eq!(due(&mut t), ["2-0"]);
        t.released(b"1-0");
        assert!(due(&mut t).is_empty(), "one of its outcomes still waits");
        // Released to wait again (an unsure outcome routed and held).
        t.released(b"1-0");
        t.waits(b"1-0");
        assert!(due(&mut t).is_empty());
        t.released(b"1-0");
        assert_eq!(due(&mut t), ["1-0"]);
    }

    #[test]
    fn a_release_without_a_wait_changes_nothing() {
        let mut t = ReplyTrims::default();
        t.released(b"9-0");
        t.read_whole(b"9-0");
        assert_eq!(due(&mut t), ["9-0"]);
    }
}
