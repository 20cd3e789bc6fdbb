//! The final replies of the most recent jobs, for `{"type":"result","task_id":N}`: a client
//! that lost its connection (or a daemon restarted under it) asks again and gets the reply;
//! so does one that had it, as Celery's `AsyncResult` users expect. Bounded twice: the last
//! `result_keep` replies, and at most [`KEPT_BYTES_MAX`] bytes of them (a job's result may be
//! as large as `package_max_length`).

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use super::spare::SpareBytes;

/// Bytes of kept replies past which the oldest go, whatever `result_keep` allows.
pub const KEPT_BYTES_MAX: usize = 64 << 20;

pub struct Results {
    keep: usize,
    max_bytes: usize,
    bytes: usize,
    lines: FxHashMap<u64, Vec<u8>>,
    /// Oldest first; the oldest goes when there are more than `keep`, or over `max_bytes`.
    order: VecDeque<u64>,
    /// The buffers of replies no longer kept, for the next replies (see [`Results::copy_of`]).
    spare: SpareBytes,
}

impl Results {
    pub fn new(keep: usize) -> Self {
        Results::with_bytes(keep, KEPT_BYTES_MAX)
    }

    pub fn with_bytes(keep: usize, max_bytes: usize) -> Self {
        Results {
            keep: keep.max(1),
            max_bytes,
            bytes: 0,
            lines: FxHashMap::default(),
            order: VecDeque::new(),
            spare: SpareBytes::default(),
        }
    }

    pub fn record(&mut self, task_id: u64, line: Vec<u8>) {
        self.bytes += line.len();
        match self.lines.insert(task_id, line) {
            Some(old) => self.bytes -= old.len(),
            None => self.order.push_back(task_id),
        }
        // The newest stays even when it alone is over `max_bytes`: the bound is then one reply.
        while self.order.len() > self.keep || (self.bytes > self.max_bytes && self.order.len() > 1) {
            if let Some(old) = self.order.pop_front() {
                if let Some(line) = self.lines.remove(&old) {
                    self.bytes -= line.len();
                    self.spare.put(line);
                }
            }
        }
    }

    /// A copy of a reply to keep, in the buffer of one that went (once `result_keep` are kept,
    /// each new one takes the oldest one's place).
    pub fn copy_of(&mut self, reply: &[u8]) -> Vec<u8> {
        self.spare.copy_of(reply)
    }

    pub fn get(&self, task_id: u64) -> Option<&[u8]> {
        self.lines.get(&task_id).map(Vec::as_slice)
    }

    pub fn contains(&self, task_id: u64) -> bool {
        self.lines.contains_key(&task_id)
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Bytes of the replies kept.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The reply line the master writes for a job whose task process wrote none itself.
pub fn outcome_line(task_id: u64, ok: bool, result: &[u8], attempts: u32) -> Vec<u8> {
    let text = String::from_utf8_lossy(result);
    let value = if ok {
        serde_json::json!({"event": "done", "task_id": task_id, "result": text, "attempts": attempts})
    } else {
        serde_json::json!({"event": "failed", "task_id": task_id, "error": text, "attempts": attempts})
    };
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// The reply line the master keeps for a group of tasks: each member's result or error, in
/// order. A group's final line: `done`, or `failed` with `cut` as its error when it was cut short
/// (at shutdown); `results` lists every member's outcome either way.
pub fn group_line(group_id: u64, members: &[(bool, &[u8])], cut: Option<&str>) -> Vec<u8> {
    let results: Vec<serde_json::Value> = members
        .iter()
        .map(|&(ok, bytes)| {
            let text = String::from_utf8_lossy(bytes);
            if ok {
                serde_json::json!({"result": text})
            } else {
                serde_json::json!({"error": text})
            }
        })
        .collect();
    let value = match cut {
        None => serde_json::json!({"event": "done", "task_id": group_id, "results": results}),
        Some(why) => {
            serde_json::json!({"event": "failed", "task_id": group_id, "error": why, "results": results})
        }
    };
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent() {
        let mut r = Results::new(2);
        r.record(1, b"a".to_vec());
        r.record(2, b"b".to_vec());
        r.record(2, b"b2".to_vec());
        r.record(3, b"c".to_vec());
        assert!(!r.contains(1), "the oldest went");
        assert_eq!(r.get(2), Some(&b"b2"[..]));
        assert_eq!(r.get(3), Some(&b"c"[..]));
        assert_eq!(r.len(), 2);
        assert_eq!(r.bytes(), 3);
    }

    #[test]
    fn keeps_no_more_than_its_bytes() {
        let mut r = Results::with_bytes(100, 10);
        for id in 0..10 {
            r.record(id, vec![b'x'; 4]);
        }
        assert_eq!((r.len(), r.bytes()), (2, 8), "the oldest went to stay within 10 bytes");
        assert!(r.contains(9) && r.contains(8));
        r.record(10, vec![b'y'; 50]);
        assert_eq!((r.len(), r.bytes()), (1, 50), "one over the bound is kept alone");
        assert_eq!(r.get(10).map(<[u8]>::len), Some(50));
    }

    #[test]
    fn outcome_lines_are_json() {
        let v: serde_json::Value = serde_json::from_slice(&outcome_line(7, false, b"boom", 3)).unwrap();
        assert_eq!(v["event"], "failed");
        assert_eq!(v["error"], "boom");
        assert_eq!(v["attempts"], 3);
        let g: serde_json::Value =
            serde_json::from_slice(&group_line(9, &[(true, b"sent"), (false, b"timed out")], None)).unwrap();
        assert_eq!(g["results"][0]["result"], "sent");
        assert_eq!(g["results"][1]["error"], "timed out");
        let cut = group_line(9, &[(true, b"sent"), (false, b"stopping")], Some("server stopping"));
        let c: serde_json::Value = serde_json::from_slice(&cut).unwrap();
        assert_eq!((&c["event"], &c["error"]), (&"failed".into(), &"server stopping".into()));
        assert_eq!(c["results"][0]["result"], "sent");
    }
}
