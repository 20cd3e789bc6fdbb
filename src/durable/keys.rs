//! The keys of one queue. They all carry the queue's name as a hash tag (`{taskd}:jobs`), so a
//! Redis Cluster keeps them in one slot and a MULTI over several of them stays valid.

use crate::app::Priority;

/// The consumer group every node's task processes read the job stream in.
pub const GROUP: &str = "taskd";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    tag: String,
    /// Every job not finished yet, from any node, but for the types that have a lane of their
    /// own (see [`Keys::lane`]).
    pub jobs: String,
    /// Jobs that failed past their attempts, for an operator to list and replay.
    pub dead: String,
    /// Jobs waiting for a delivery retry or a rate limit (member: the task id) or for their
    /// `run_at` (member: `NODE:ID`, see [`Keys::scheduled_member`]): a sorted set by due time
    /// (ms), each job's fields in the hash `delayed_hash(member)`; moved back into `jobs`
    /// when due.
    pub delayed: String,
    /// This node's own keys.
    pub replies: String,
    pub results: String,
    pub epoch: String,
    /// Held by the live web node of this name: two nodes with one name would take each
    /// other's replies.
    pub lease: String,
}

impl Keys {
    pub fn new(queue: &str, node: &str) -> Keys {
        let tag = format!("{{{queue}}}");
        Keys {
            jobs: format!("{tag}:jobs"),
            dead: format!("{tag}:dead"),
            delayed: format!("{tag}:delayed"),
            replies: format!("{tag}:replies:{node}"),
            results: format!("{tag}:results:{node}"),
            epoch: format!("{tag}:epoch:{node}"),
            lease: format!("{tag}:lease:{node}"),
            tag,
        }
    }

    /// The queue's name (its hash tag without the braces).
    pub fn queue(&self) -> &str {
        self.tag.trim_start_matches('{').trim_end_matches('}')
    }

    /// The job stream of a handler's type (`{q}:jobs:resize`): only the consumers of nodes
    /// with a handler for it read it, so nodes specialise, and a type that no node runs stays
    /// there, queued, instead of failing where it cannot run. The built-in email and SMS jobs
    /// stay in `jobs`, which every consumer reads.
    pub fn lane(&self, kind: &str) -> String {
        format!("{}:jobs:{kind}", self.tag)
    }

    /// What a lane's key starts with: `MOVE_DUE` puts a parked job back with it.
    pub fn lane_prefix(&self) -> String {
        format!("{}:jobs:", self.tag)
    }

    /// The fields of a job waiting in `delayed`, as its job stream entry will hold them.
    pub fn delayed_job(&self, task_id: u64) -> String {
        format!("{}:delayed:{task_id}", self.tag)
    }

    /// The member of a job for later (`run_at`) in `delayed`: its node's name and its id, as
    /// task ids are only unique within a node.
    pub fn scheduled_member(&self, node: &str, task_id: u64) -> String {
        format!("{node}:{task_id}")
    }

    /// The hash of the fields of the member `member` of `delayed` (a task id, or a
    /// [`Keys::scheduled_member`]).
    pub fn delayed_hash(&self, member: &str) -> String {
        format!("{}:delayed:{member}", self.tag)
    }

    /// The stream where the outcomes of `node`'s jobs go, for that node to read.
    pub fn replies_of(&self, node: &str) -> String {
        format!("{}:replies:{node}", self.tag)
    }

    /// `node`'s start counter: it exists once a web node of that name has started, and so
    /// tells a known origin from one that nobody will ever read replies for.
    pub fn epoch_of(&self, node: &str) -> String {
        format!("{}:epoch:{node}", self.tag)
    }

    /// The claim of tick `tick_ms` (Unix ms) of the schedule `name` (`[[schedule]]`): the one
    /// web node that sets it (SET NX, in the script that stores the tick's job) runs the tick;
    /// it holds that node's name and the job's id, and expires well after the next tick.
    pub fn tick(&self, name: &str, tick_ms: u64) -> String {
        format!("{}:tick:{name}:{tick_ms}", self.tag)
    }

    /// The last tick claimed of the schedule `name` (Unix ms), which a node reads at start to
    /// know whether ticks passed while every node was down (`missed = "once"`).
    pub fn last_tick(&self, name: &str) -> String {
        format!("{}:tick:{name}:last", self.tag)
    }

    /// The stream of packs of normal-priority jobs of the main stream (see `super::pack`):
    /// a suffix no type name (a lane) nor priority can hold, so that `stream_parts` names it
    /// none of them (a packed job's lane is none, its priority normal).
    pub fn packs(&self) -> String {
        format!("{}!p", self.jobs)
    }

    /// The job stream of `priority` for the main stream (`lane` None) or a handler's lane:
    /// normal jobs keep the names they always had (`{q}:jobs`, `{q}:jobs:TYPE`); high and low
    /// ones get a suffix no type name can hold (`{q}:jobs#high`, `{q}:jobs:TYPE#low`).
    pub fn stream(&self, lane: Option<&str>, priority: Priority) -> String {
        let base = match lane {
            Some(kind) => self.lane(kind),
            None => self.jobs.clone(),
        };
        match priority {
            Priority::Normal => base,
            p => format!("{base}{PRIORITY_MARK}{}", p.name()),
        }
    }

    /// The lane (a handler's type; None for the main stream) and the priority of a job stream
    /// key made by [`Keys::stream`]; None for a key of another queue or a foreign suffix.
    pub fn stream_parts(&self, stream: &str) -> Option<(Option<String>, Priority)> {
        let (base, priority) = match stream.rsplit_once(PRIORITY_MARK) {
            Some((base, p)) => (base, Priority::from_name(p).filter(|p| *p != Priority::Normal)?),
            None => (stream, Priority::Normal),
        };
        if base == self.jobs {
            return Some((None, priority));
        }
        let lane = base.strip_prefix(&self.lane_prefix())?;
        Some((Some(lane.to_string()), priority))
    }

    /// The rate limit of a delivery channel (`sms`, `email`), shared by every node of the
    /// queue: the channel's theoretical arrival time (GCRA, see `delivery::rate`).
    pub fn rate_of(&self, channel: &str) -> String {
        format!("{}:rate:{channel}", self.tag)
    }

    /// A deduplication key (a job's `key`), by the SHA-256 of the client's key in hex
    /// (`durable::dedup::digest`): no client text reaches a key name. It names the job that
    /// holds it, and once that job ended its final line (see `durable::dedup`).
    pub fn dedup(&self, digest: &str) -> String {
        format!("{}{digest}", self.dedup_prefix())
    }

    /// Set for a minute when job `task_id` of `node` is cancelled: a cancel asked again (by a
    /// new bridge, after the one that carried it out died before it answered) is answered
    /// "cancelled", not "started".
    pub fn cancelled_of(&self, node: &str, task_id: u64) -> String {
        format!("{}:cancelled:{node}:{task_id}", self.tag)
    }

    /// The marker of a round of stores of `node`'s bridge (`round`: the bridge's run and the
    /// round's number), set in the round's transaction: its outcome, readable when its answer
    /// was lost (see `durable::round`).
    pub fn round_of(&self, node: &str, round: &str) -> String {
        format!("{}:round:{node}:{round}", self.tag)
    }

    /// What every deduplication key starts with.
    pub fn dedup_prefix(&self) -> String {
        format!("{}:key:", self.tag)
    }

    /// `node`'s lease on its name: it exists while a node of that name runs.
    pub fn lease_of(&self, node: &str) -> String {
        format!("{}:lease:{node}", self.tag)
    }
}

/// What separates a job stream's name from its priority: no handler type holds it.
pub const PRIORITY_MARK: char = '#';

/// Whether `stream`, one of the streams a consumer reads, is the stream of packs
/// ([`Keys::packs`]): its entries are read as packs of jobs, not as jobs.
pub fn is_packs(stream: &str) -> bool {
    stream.ends_with("!p")
}

/// A task process's consumer name: stable per node and slot, so that a respawned process
/// takes back at once what its predecessor had taken.
pub fn consumer_name(node: &str, slot: u32) -> String {
    format!("{node}/{slot}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_shares_the_hash_tag() {
        let k = Keys::new("q1", "web-1");
        for key in [
            &k.jobs,
            &k.dead,
            &k.delayed,
            &k.delayed_job(7),
            &k.replies,
            &k.results,
            &k.epoch,
            &k.lease,
            &k.replies_of("web-2"),
            &k.lane("resize"),
            &k.dedup("ab"),
            &k.cancelled_of("web-1", 7),
            &k.round_of("web-1", "12-3"),
            &k.packs(),
        ] {
            assert!(key.starts_with("{q1}:"), "{key}");
        }
        assert_eq!(k.queue(), "q1");
        assert_eq!(k.replies, k.replies_of("web-1"));
        assert_eq!(k.epoch, k.epoch_of("web-1"));
        assert_eq!(k.lease, k.lease_of("web-1"));
        assert_eq!(k.rate_of("sms"), "{q1}:rate:sms");
        assert_eq!(consumer_name("n2", 3), "n2/3");
        assert_eq!(k.lane("resize"), format!("{}resize", k.lane_prefix()));
        assert_eq!(k.delayed_hash(&k.scheduled_member("web-1", 7)), "{q1}:delayed:web-1:7");
        assert_eq!(k.delayed_hash("7"), k.delayed_job(7));
        assert_eq!(k.dedup("ab12"), "{q1}:key:ab12");
        assert_eq!(k.tick("nightly", 1_798_099_200_000), "{q1}:tick:nightly:1798099200000");
        assert_eq!(k.last_tick("nightly"), "{q1}:tick:nightly:last");
        assert_eq!(k.packs(), "{q1}:jobs!p");
        assert_eq!(k.stream_parts(&k.packs()), None, "no lane's, no priority's");
        assert!(is_packs(&k.packs()));
        for p in Priority::ALL {
            assert!(!is_packs(&k.stream(None, p)) && !is_packs(&k.stream(Some("p"), p)));
        }
    }

    #[test]
    fn a_stream_per_priority_and_lane_and_back() {
        let k = Keys::new("q1", "web-1");
        assert_eq!(k.stream(None, Priority::Normal), k.jobs);
        assert_eq!(k.stream(Some("resize"), Priority::Normal), k.lane("resize"));
        assert_eq!(k.stream(None, Priority::High), "{q1}:jobs#high");
        assert_eq!(k.stream(Some("resize"), Priority::Low), "{q1}:jobs:resize#low");
        for lane in [None, Some("resize"), Some("high")] {
            for p in Priority::ALL {
                let s = k.stream(lane, p);
                assert!(s.starts_with("{q1}:"), "{s}");
                assert_eq!(k.stream_parts(&s), Some((lane.map(str::to_string), p)), "{s}");
            }
        }
        // A lane named like a priority is a lane, and foreign suffixes are nobody's stream.
        assert_eq!(k.stream_parts("{q1}:jobs:high"), Some((Some("high".into()), Priority::Normal)));
        assert_eq!(k.stream_parts("{q1}:jobs#normal"), None);
        assert_eq!(k.stream_parts("{q1}:jobs#urgent"), None);
        assert_eq!(k.stream_parts("{q2}:jobs"), None);
    }
}
