//! The weighted fair order of the priorities for a consumer of durable jobs: the streams of
//! each priority (`{q}:jobs#high`, `{q}:jobs`, `{q}:jobs#low`, and the same for each lane) are
//! taken from in the order the master's task queues use in memory (6:3:1, nginx's smooth
//! weighted round robin, [`Priority::WEIGHTS`]), so that low jobs still run under a flood of
//! high ones.
//!
//! A take is one pipeline, one round trip: an XREADGROUP per priority for its share of the
//! window (its picks in the weighted order among the priorities that had work at the last take,
//! the credits kept from one take to the next), and a look at each priority that had none (one
//! job at most, a read of an empty stream costs Redis a few µs). A priority found short of its
//! share has run dry: it gives its share to the others until a look finds work again. Only when
//! nothing came does the consumer block, in one XREADGROUP over every stream. (A script taking
//! the picks one by one inside Redis was exact, but turning each entry into Lua values and back
//! cost Redis 6 × a plain read per job.)

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::sync::Arc;

use super::hot::{HotConn, Jobs};
use super::keys::GROUP;
use super::resp::Packed;
use super::Durable;
use crate::app::Priority;

/// A consumer's credits of the priorities (high, normal, low), and which of them had no work
/// at the last look, kept from one take to the next.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fair {
    credit: [i64; 3],
    dry: [bool; 3],
}

impl Fair {
    /// How many jobs to read of each priority for a window of `want`: the picks of the
    /// weighted order among the priorities with work; one for a look at each without. And the
    /// picks in their order, the looks last: the order to run what comes.
    fn plan(&mut self, want: usize) -> ([usize; 3], Vec<usize>) {
        let weights = Priority::WEIGHTS;
        // Every one dry (the consumer was idle): nothing is known, the window goes to all.
        if self.dry == [true; 3] {
            self.dry = [false; 3];
        }
        let live: Vec<usize> = (0..3).filter(|&p| !self.dry[p]).collect();
        let total: i64 = live.iter().map(|&p| weights[p]).sum();
        let mut counts = [0usize; 3];
        let mut order = Vec::with_capacity(want + 3);
        for _ in 0..want {
            for &p in &live {
                self.credit[p] += weights[p];
            }
            // The largest credit; among equals the higher priority.
            let Some(&best) = live.iter().max_by_key(|&&p| (self.credit[p], Reverse(p))) else { break };
            self.credit[best] -= total;
            counts[best] += 1;
            order.push(best);
        }
        for (p, count) in counts.iter_mut().enumerate() {
            if self.dry[p] {
                *count = 1;
                order.push(p);
            }
        }
        (counts, order)
    }

    /// What the reads of `counts` brought: a priority short of its count has run dry (and
    /// forgets its credit: it does not come back owed); one that brought any has work. One
    /// that brought more than its picks (a pack is many jobs, a read of lanes one per lane) is
    /// charged for them as for picks of its own: the shares are of jobs, not of entries.
    fn learn(&mut self, counts: [usize; 3], got: [usize; 3]) {
        for p in 0..3 {
            if got[p] < counts[p] {
                self.dry[p] = true;
                self.credit[p] = 0;
            } else if got[p] > 0 {
                self.dry[p] = false;
            }
        }
        let live: Vec<usize> = (0..3).filter(|&p| !self.dry[p]).collect();
        let total: i64 = live.iter().map(|&p| Priority::WEIGHTS[p]).sum();
        for p in 0..3 {
            let extra = got[p].saturating_sub(counts[p]) as i64;
            if extra > 0 && !self.dry[p] {
                // `extra` picks of `p` in the smooth weighted order, at once.
                for &q in &live {
                    self.credit[q] += extra * Priority::WEIGHTS[q];
                }
                self.credit[p] -= extra * total;
            }
        }
    }

    /// Takes up to about `want` new jobs (a read over lanes may bring one per lane) from the
    /// streams of every priority in weighted fair order, for consumer `me`, without blocking.
    /// With each, its stream. `streams`: those of each priority (`Durable::streams_of`, made
    /// once by the consumer: a take per few jobs made them again, some 1k instructions per job).
    pub fn take(
        &mut self,
        conn: &mut HotConn,
        streams: &[Vec<String>; 3],
        names: &[Arc<str>],
        me: &str,
        want: usize,
        reads: impl Fn(&str) -> bool,
    ) -> redis::RedisResult<Jobs> {
        let (counts, order) = self.plan(want.max(1));
        // Only the priorities with picks or a look: one not picked this time is not read. Nor
        // a stream that is a key of another type (see `wrong_type`): the read would fail whole.
        let read: Vec<(usize, Vec<&str>)> = (0..3)
            .filter(|&p| counts[p] > 0)
            .map(|p| (p, streams[p].iter().map(String::as_str).filter(|s| reads(s)).collect::<Vec<_>>()))
            .filter(|(_, streams)| !streams.is_empty())
            .collect();
        // Room for the whole pipeline at once (grown from empty, it was copied several times).
        let mut reads = Packed::with_capacity(READ_ROOM * (read.len() + 1));
        let mut of = Vec::with_capacity(read.len() + 1);
        for (p, streams) in &read {
            pack_reads(&mut reads, &mut of, *p, me, counts[*p], streams);
        }
        // Read straight into entries (see `HotConn::read_streams`).
        let replies = if of.is_empty() { Vec::new() } else { conn.read_jobs(&reads, names)? };
        let mut by_priority: [VecDeque<_>; 3] = Default::default();
        for (&p, reply) in of.iter().zip(replies) {
            by_priority[p].extend(reply);
        }
        // Jobs, not entries: a pack counts its jobs.
        let got: [usize; 3] = std::array::from_fn(|p| by_priority[p].len());
        self.learn(counts, got);
        // Shares left by priorities that ran dry go to one that filled its own, in one more
        // read (only then): a consumer that woke with work of one priority takes its window
        // of it, not that priority's share of it.
        let short = want.max(1).saturating_sub(got.iter().sum());
        let full = read.iter().find(|(p, _)| counts[*p] > 0 && got[*p] >= counts[*p]);
        if let Some((p, streams)) = full.filter(|_| short > 0 && got.iter().sum::<usize>() > 0) {
            let mut more = Packed::with_capacity(2 * READ_ROOM);
            pack_reads(&mut more, &mut Vec::new(), *p, me, short, streams);
            by_priority[*p].extend(conn.read_jobs(&more, names)?.into_iter().flatten());
        }
        // Run in the order of the picks (a low job is not last of its window), then what a
        // read brought beyond its picks (one per lane).
        let mut out = Vec::with_capacity(got.iter().sum());
        for p in order {
            out.extend(by_priority[p].pop_front());
        }
        for rest in by_priority {
            out.extend(rest);
        }
        Ok(out)
    }

    /// A blocking read brought jobs of these streams: their priorities have work.
    pub fn woke(&mut self, d: &Durable, jobs: &Jobs) {
        // Jobs of one stream share its name (all of a pack's do): its priority is read once
        // per run of them, not per job (reading it formats a key: an allocation).
        let mut last: Option<&Arc<str>> = None;
        for (at, _, _) in jobs {
            if last.is_some_and(|last| Arc::ptr_eq(last, &at.stream)) {
                continue;
            }
            last = Some(&at.stream);
            self.dry[d.priority_of(&at.stream).index()] = false;
        }
    }
}

/// Bytes of one packed XREADGROUP, about (a queue's stream names are short).
pub(super) const READ_ROOM: usize = 256;

/// Packs read of the stream of packs at once: a pack holds up to `pack::MAX_JOBS` jobs (a
/// bridge's round, some tens when busy), so a COUNT of a window's jobs would be a COUNT of
/// windows. One is about a window of quick jobs; a slow job in it has the rest of its pack
/// dissolved for other consumers when its outcome is written (see `consumer::store`).
pub(super) const PACKS_READ: usize = 1;

/// The reads of `count` jobs of `streams` (those of priority `p`), packed into `reads`, each
/// command's priority pushed to `of`: the plain streams in one XREADGROUP of `count` each; the
/// stream of packs, if it is among them, in one of [`PACKS_READ`] (in the same one when
/// `count` is no more: a read costs Redis a few µs, and a window of one job is a read a job).
fn pack_reads(reads: &mut Packed, of: &mut Vec<usize>, p: usize, me: &str, count: usize, streams: &[&str]) {
    if count <= PACKS_READ {
        pack_read(reads, me, count, None, streams, b">");
        of.push(p);
        return;
    }
    let (packs, plain): (Vec<&str>, Vec<&str>) = streams.iter().partition(|s| super::keys::is_packs(s));
    if !plain.is_empty() {
        pack_read(reads, me, count, None, &plain, b">");
        of.push(p);
    }
    if !packs.is_empty() {
        pack_read(reads, me, PACKS_READ, None, &packs, b">");
        of.push(p);
    }
}

/// XREADGROUP of `streams` for consumer `me`, `count` entries of each at most, from `from`
/// (`>`: new jobs), blocking `block_ms` if given, packed into `reads`.
pub(super) fn pack_read<S: AsRef<str>>(
    reads: &mut Packed,
    me: &str,
    count: usize,
    block_ms: Option<u64>,
    streams: &[S],
    from: &[u8],
) {
    let args = 7 + if block_ms.is_some() { 2 } else { 0 } + 2 * streams.len();
    reads.command(args).arg(b"XREADGROUP").arg(b"GROUP").arg(GROUP.as_bytes()).arg(me.as_bytes());
    reads.arg(b"COUNT").number(count as u64);
    if let Some(ms) = block_ms {
        reads.arg(b"BLOCK").number(ms);
    }
    reads.arg(b"STREAMS");
    for stream in streams {
        reads.arg(stream.as_ref().as_bytes());
    }
    for _ in streams {
        reads.arg(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `n` windows of `want` from queues of `waiting` jobs per priority, as the reads
    /// would: each priority gives at most what it has. Returns the jobs taken per priority.
    fn run(fair: &mut Fair, waiting: &mut [usize; 3], want: usize, n: usize) -> [usize; 3] {
        let mut taken = [0; 3];
        for _ in 0..n {
            let (counts, _) = fair.plan(want);
            let got: [usize; 3] = std::array::from_fn(|p| counts[p].min(waiting[p]));
            for p in 0..3 {
                waiting[p] -= got[p];
                taken[p] += got[p];
            }
            fair.learn(counts, got);
        }
        taken
    }

    #[test]
    fn a_packed_read_is_the_xreadgroup_a_cmd_packs() {
        let streams = ["{q}:jobs".to_string(), "{q}:jobs:resize".to_string()];
        for block in [None, Some(500)] {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(GROUP).arg("web-1/0").arg("COUNT").arg(64);
            if let Some(ms) = block {
                cmd.arg("BLOCK").arg(ms);
            }
            cmd.arg("STREAMS").arg(&streams[..]).arg(">").arg(">");
            let mut packed = Packed::new();
            pack_read(&mut packed, "web-1/0", 64, block, &streams, b">");
            assert_eq!(packed.bytes(), cmd.get_packed_command().as_slice());
        }
    }

    #[test]
    fn the_stream_of_packs_is_read_a_pack_at_a_time() {
        let streams = ["{q}:jobs", "{q}:jobs:resize", "{q}:jobs!p"];
        let (mut got, mut of) = (Packed::new(), Vec::new());
        pack_reads(&mut got, &mut of, 1, "web-1/0", 8, &streams);
        let mut want = Packed::new();
        pack_read(&mut want, "web-1/0", 8, None, &streams[..2], b">");
        pack_read(&mut want, "web-1/0", PACKS_READ, None, &streams[2..], b">");
        assert_eq!((got.bytes(), of), (want.bytes(), vec![1, 1]));
        // A window of one: one read of them all.
        let (mut got, mut of) = (Packed::new(), Vec::new());
        pack_reads(&mut got, &mut of, 1, "web-1/0", 1, &streams);
        let mut want = Packed::new();
        pack_read(&mut want, "web-1/0", 1, None, &streams, b">");
        assert_eq!((got.bytes(), of), (want.bytes(), vec![1]));
    }

    #[test]
    fn one_job_at_a_time_the_priorities_share_six_three_one() {
        let mut fair = Fair::default();
        let mut waiting = [1000, 1000, 1000];
        // The first take finds them all with work.
        assert_eq!(run(&mut fair, &mut waiting, 1, 100), [60, 30, 10]);
    }

    #[test]
    fn a_low_job_behind_a_flood_of_high_ones_is_taken_within_its_share() {
        for want in [1, 4, 64] {
            let mut fair = Fair::default();
            let mut waiting = [1000, 0, 1];
            let mut highs_before = 0;
            while waiting[2] == 1 {
                highs_before += run(&mut fair, &mut waiting, want, 1)[0];
            }
            assert!(
                highs_before <= 6.max(want),
                "window {want}: {highs_before} high jobs before the low one"
            );
        }
        // Within a window, the low job runs at its place among the picks, not after the highs.
        let mut fair = Fair::default();
        let (_, order) = fair.plan(64);
        let low = order.iter().position(|&p| p == 2).unwrap();
        assert!(order[..low].iter().filter(|&&p| p == 0).count() <= 6, "{order:?}");
    }

    #[test]
    fn jobs_of_a_pack_count_against_their_priority_as_picks_of_it() {
        let mut fair = Fair::default();
        let mut waiting = [1000, 1000, 1000];
        // A window of 10 whose read of normal jobs brought a pack of 100 of them.
        let (counts, _) = fair.plan(10);
        fair.learn(counts, [counts[0], 100, counts[2]]);
        let taken = run(&mut fair, &mut waiting, 10, 30);
        // 300 more taken: high and low make up their shares, normal gets few picks meanwhile;
        // over all of them, 6:3:1 (without the charge: normal would have had 90 more).
        let normal = 100 + taken[1];
        let high = counts[0] + taken[0];
        let low = counts[2] + taken[2];
        assert!(taken[1] <= 30, "{taken:?}");
        assert!((high as f64 / normal as f64 - 2.0).abs() < 0.2, "{high} {normal} {low}");
        assert!((normal as f64 / low as f64 - 3.0).abs() < 0.5, "{high} {normal} {low}");
        // Alone with work, a priority is charged nothing that would starve it later.
        let mut fair = Fair::default();
        fair.learn([1, 10, 1], [0, 100, 0]);
        assert_eq!(fair.plan(10).0, [1, 10, 1]);
    }

    #[test]
    fn a_priority_without_work_is_looked_at_once_per_take_and_gets_its_share_when_it_has_some() {
        let mut fair = Fair::default();
        let mut waiting = [0, 10_000, 0];
        run(&mut fair, &mut waiting, 64, 2);
        // Dry high and low: one look each, the window to normal.
        assert_eq!(fair.plan(64).0, [1, 64, 1]);
        // All dry (idle): the next window goes to all, in the weighted order.
        fair.learn([1, 64, 1], [0, 0, 0]);
        assert_eq!(fair.plan(10).0, [6, 3, 1]);
        let mut fair = Fair::default();
        let mut waiting = [0, 10_000, 10_000];
        let taken = run(&mut fair, &mut waiting, 10, 100);
        // Normal and low: 3:1, but for the looks at high (none found).
        assert!((taken[1] as f64 / taken[2] as f64 - 3.0).abs() < 0.2, "{taken:?}");
    }
}
