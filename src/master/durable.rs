//! The master's side of durable jobs (`--redis-url`): nothing a worker said after submitting
//! a job reaches a client before Redis holds the job.
//!
//! The jobs workers commit in one reactor turn form a store batch, sent to the bridge process
//! at the end of the turn. Until the bridge acknowledges the batch, what workers write to
//! clients after it (their `accepted`, and anything later, in order) is held here; then it is
//! released. Only the sessions with a job in an unacknowledged batch wait (and everything after
//! it for them, in order): while Redis hangs, another client's `stats` or bad request is
//! answered at once. If the batch could not be stored, its jobs fail with the reason, and what
//! was held for their clients is dropped: such a client gets `failed`, never `accepted`.
//!
//! Outcomes come back from the bridge as `Reply` frames (from any node's task processes), and
//! are delivered like a local task process's; once acted on, the master asks the bridge to
//! delete the reply entry. A reply for a job the master no longer has is a duplicate (the job
//! ran twice: dropped) or the outcome of a job accepted before a restart (kept for `result`).
//!
//! The master also asks for each renewal of the node's name, and stops if another run has it.

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};

use rustc_hash::FxHashMap;

use super::results::outcome_line;
use super::*;
use crate::durable::startup::LEASE_TTL;
use crate::durable::Durable;
use crate::ipc::envelope::Reply;
use crate::process::ProcessError;
use crate::supervisor::Supervisor;

pub const BRIDGE: Token = Token(5);

/// Buffers of each kind kept for reuse (see [`DurableState::spare`]), and the most room one may
/// have to be kept.
const SPARE_MOST: usize = 4;
const SPARE_ROOM: usize = 256 * 1024;

/// A store batch sent to the bridge and not acknowledged yet.
struct SentBatch {
    n: u64,
    /// Its frames, to send again to a new bridge if this one dies.
    frames: Vec<u8>,
    jobs: Vec<u64>,
}

/// Held output, in its order of arrival: each run of one link's frames in one buffer.
enum Held {
    /// Workers' frames for clients ([`ToClient`]).
    Clients(Vec<u8>),
    /// Outcomes from the bridge ([`FromBridge::Reply`] frames).
    Replies(Vec<u8>),
}

pub struct DurableState {
    pub d: Durable,
    pub bridge: MasterToBridge,
    /// The bridge's slot: respawned, with the back-off of a crash at start, by the one
    /// supervisor every child has.
    pub bridge_sup: Supervisor,
    /// The batch this turn's jobs go in, its frames and its jobs.
    batch: u64,
    frames: Vec<u8>,
    jobs: Vec<u64>,
    /// The buffers of acknowledged batches, emptied, for the next batches' frames and jobs (new
    /// ones grew a few times in every batch: some 300 instructions per job, callgrind).
    spare: Vec<(Vec<u8>, Vec<u64>)>,
    /// The buffers of held output once released, emptied, for output held later (the same).
    spare_held: Vec<Vec<u8>>,
    /// The last batch ended and sent, and the last acknowledged.
    last_sent: u64,
    acked: u64,
    sent: VecDeque<SentBatch>,
    /// Output held until the batch it follows is stored, with that batch.
    held: VecDeque<(u64, Held)>,
    /// The sessions whose output waits, each with the last batch it waits for. Looked up for
    /// every frame for a client: Fx, not SipHash (some 1,000 instructions per durable job in
    /// the master, callgrind), as session ids are the daemon's own counter, which no client
    /// can choose (no flooding of one bucket).
    waiting: FxHashMap<u64, u64>,
    pub duplicates: u64,
    pub bridge_restarts: u64,
    /// What the bridge last read of the queue's depth in Redis, for `stats`.
    pub depths: Option<serde_json::Value>,
    /// When to ask the bridge to renew the node's name next: the master asks, so that a
    /// master that hangs (SIGSTOP, a loop) lets its name lapse, and another run may take it.
    pub lease_due: Instant,
    /// Until when the name is surely still this node's (its last renewal, plus the lease).
    lease_until: Instant,
    /// When the oldest renewal not answered yet was asked for (boot clock, ms). The bridge
    /// folds the asks it has not served into one renewal, so an answer "still ours" surely
    /// holds from this ask on (see [`crate::durable::lease_gate`]), never from a later one.
    lease_asked: Option<u64>,
    /// Outcomes that came while that was not sure: acted on once the bridge says it is.
    unsure: Vec<u8>,
    /// Outcomes read from the reply stream at start, acted on once the bridge runs.
    startup_replies: Vec<u8>,
    /// The last reply stream entry read at start: every bridge reads on from there.
    replies_from: String,
    /// Which reply entries the bridge may delete (none while an outcome of it waits here).
    trims: super::reply_trims::ReplyTrims,
    /// Duplicates and cancels of durable jobs (see `durable_keys`).
    pub dedup: super::durable_keys::DurableKeys,
    /// Jobs of batches not acknowledged yet that Redis did not store though their round was
    /// (see [`FromBridge::NotStored`]), with why: failed when their batch is acknowledged.
    /// (Looked up for every job of an acknowledged batch; task ids are the daemon's too.)
    not_stored: FxHashMap<u64, Vec<u8>>,
}

impl DurableState {
    pub fn new(d: Durable, bridge: MasterToBridge) -> Self {
        DurableState {
            d,
            bridge,
            bridge_sup: {
                let mut sup = Supervisor::new("master", false);
                sup.add("redis bridge", true);
                sup
            },
            batch: 1,
            frames: Vec::new(),
            jobs: Vec::new(),
            spare: Vec::new(),
            spare_held: Vec::new(),
            last_sent: 0,
            acked: 0,
            sent: VecDeque::new(),
            held: VecDeque::new(),
            waiting: FxHashMap::default(),
            duplicates: 0,
            depths: None,
            bridge_restarts: 0,
            lease_due: Instant::now() + LEASE_TTL / 3,
            // Taken just before (at start, by `startup::prepare`).
            lease_until: Instant::now() + LEASE_TTL - Duration::from_secs(1),
            unsure: Vec::new(),
            lease_asked: None,
            startup_replies: Vec::new(),
            replies_from: "0-0".into(),
            trims: Default::default(),
            dedup: Default::default(),
            not_stored: FxHashMap::default(),
        }
    }

    /// Keeps the buffers of an acknowledged batch for the next ones: a few, and none that a
    /// burst made large.
    fn keep_spare(&mut self, done: SentBatch) {
        let SentBatch { mut frames, mut jobs, .. } = done;
        if self.spare.len() < SPARE_MOST
            && frames.capacity() <= SPARE_ROOM
            && jobs.capacity() * 8 <= SPARE_ROOM
        {
            frames.clear();
            jobs.clear();
            self.spare.push((frames, jobs));
        }
    }

    /// Keeps the buffer of released output for output held later, as [`Self::keep_spare`].
    fn keep_held(&mut self, mut bytes: Vec<u8>) {
        if self.spare_held.len() < SPARE_MOST && bytes.capacity() <= SPARE_ROOM {
            bytes.clear();
            self.spare_held.push(bytes);
        }
    }

    fn open(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// The number of the batch this turn's jobs go in.
    pub fn open_batch(&self) -> u64 {
        self.batch
    }

    /// Whether a job of batch `batch` is being stored: its batch is not acknowledged yet (an
    /// acknowledged batch's jobs not stored are finished with it). Batch 0: none.
    pub fn storing(&self, batch: u64) -> bool {
        batch > self.acked
    }

    /// Output for clients must wait: a job before it is not stored yet.
    pub fn holding(&self) -> bool {
        self.open() || !self.held.is_empty()
    }

    /// Output for `session` must wait: a job of it, or output before, is not released yet.
    pub fn holds(&self, session: u64) -> bool {
        self.waiting.contains_key(&session)
    }

    /// Holds a worker's `frame` for a client until the batches sent so far are stored; what
    /// comes later for its session waits behind it.
    fn hold(&mut self, frame: &ToClient<'_>) {
        self.hold_frame(frame.session(), false, |bytes| frame.encode(bytes));
    }

    /// Holds an outcome from the bridge, for `session` (0: none), as [`DurableState::hold`].
    fn hold_reply(&mut self, reply: &Reply<'_>, session: u64) {
        self.hold_frame(session, true, |bytes| reply.encode(bytes));
    }

    fn hold_frame(&mut self, session: u64, reply: bool, encode: impl FnOnce(&mut Vec<u8>)) {
        let tag = if self.open() { self.batch } else { self.last_sent };
        if session != 0 {
            self.waiting.insert(session, tag);
        }
        match self.held.back_mut() {
            Some((t, Held::Clients(bytes))) if *t == tag && !reply => encode(bytes),
            Some((t, Held::Replies(bytes))) if *t == tag && reply => encode(bytes),
            _ => {
                let mut bytes = self.spare_held.pop().unwrap_or_default();
                encode(&mut bytes);
                self.held.push_back((tag, if reply { Held::Replies(bytes) } else { Held::Clients(bytes) }));
            }
        }
    }

    pub fn unacked(&self) -> usize {
        self.sent.len()
    }

    /// A bridge runs to read what is written to its channel.
    pub fn bridge_running(&self) -> bool {
        self.bridge_sup.pid(0).is_some()
    }

    /// When the master must wake next for this: a renewal of the name, or a bridge to start.
    pub fn next_timer(&self) -> Instant {
        self.bridge_sup.next_timer().map_or(self.lease_due, |at| at.min(self.lease_due))
    }
}

impl<A: Application> Master<'_, A> {
    /// Forks the bridge process over a new channel if it is due (at start, or once the
    /// back-off after a death is over); sends it every batch not acknowledged.
    pub fn spawn_bridge(&mut self) -> io::Result<()> {
        let Some(state) = self.durable.as_mut() else { return Ok(()) };
        // Asked at the end of every turn: its settings are read in place, only by a fork (a
        // clone of them each turn was some 400 instructions per job in the master, callgrind).
        let (d, from) = (&state.d, &state.replies_from);
        let shared = self.shared;
        let credentials = self.credentials;
        let mut ours = None;
        let tried = state.bridge_sup.start_due(|_| {
            let (master_end, child_end) = crate::ipc::channel::pair()?;
            let pid = fork_bridge(d, child_end, shared, from, credentials)?;
            ours = Some(master_end);
            Ok(pid)
        });
        let Some(master_end) = ours else {
            // Not due yet, or the fork failed (the supervisor tries again in a second).
            return match tried.into_iter().next() {
                Some((_, Err(e))) => Err(e),
                _ => Ok(()),
            };
        };
        let _ = self.poll.registry().deregister(state.bridge.source());
        state.bridge = Channel::new(master_end);
        // The dead bridge's renewals are answered by no one, nor its deletions made.
        state.lease_asked = None;
        self.poll.registry().register(
            state.bridge.source(),
            BRIDGE,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        for batch in &state.sent {
            state.bridge.output().extend_from_slice(&batch.frames);
        }
        // The new bridge stores those batches again, and says again what it did not store.
        state.not_stored.clear();
        // Outcomes of jobs that finished while this node was down: known before the first
        // client is served (their deletion and keeping go through the bridge, now it runs).
        let replies = std::mem::take(&mut state.startup_replies);
        self.resend_to_bridge();
        let mut pos = 0;
        while let Ok(Some((FromBridge::Reply(reply), n))) = FromBridge::decode(&replies[pos..]) {
            pos += n;
            self.on_reply(&reply);
            // Read whole at the start (see `reply_trims`), and acted on now.
            if let Some(state) = self.durable.as_mut() {
                state.trims.read_whole(reply.entry);
            }
        }
        Ok(())
    }

    /// The bridge died: a new one takes over what it had not acknowledged.
    pub(super) fn on_bridge_exit(&mut self, reason: ExitReason) {
        // What it wrote before it died still counts (fewer batches to send again).
        self.read_bridge();
        let Some(state) = self.durable.as_mut() else { return };
        state.bridge_restarts += 1;
        tracing::error!(
            "the redis bridge {reason}; starting a new one ({} store batches to send again)",
            state.unacked()
        );
        if let Err(e) = self.spawn_bridge() {
            tracing::error!("cannot start a new redis bridge: {e}");
        }
    }

    /// A worker's frame, as durable jobs need it handled; false: handle it as usual.
    pub(super) fn durable_worker_frame(&mut self, i: usize, frame: &FromWorker<'_>) -> bool {
        let Some(state) = self.durable.as_mut() else { return false };
        match *frame {
            FromWorker::Task { task_id, session, context, data, .. } => {
                // A job for later is parked in Redis's delayed set, where it survives this
                // node; the consumers of any node move it into the stream when it is due.
                let run_at_ms =
                    self.pending_options.as_ref().filter(|o| o.task_id == task_id).map(|o| o.run_at_ms);
                if let Some(run_at_ms) =
                    run_at_ms.filter(|&ms| ms > crate::app::unix_ms(std::time::SystemTime::now()))
                {
                    ToBridge::StoreAt { task_id, run_at_ms }.encode(&mut state.frames);
                }
                let priority =
                    self.pending_options.as_ref().filter(|o| o.task_id == task_id).map(|o| o.priority);
                let tick = self.periodic.pending.take().filter(|t| t.task_id == task_id);
                super::periodic::store_frames(task_id, priority, tick, &mut state.frames);
                // Stored only if it takes its key in Redis (see `durable::dedup`).
                let keyed = self.pending_options.as_ref().filter(|o| o.task_id == task_id);
                if let Some((key, ttl)) = keyed.and_then(|o| o.key.as_deref().map(|k| (k, o.dedup_ttl))) {
                    let dedup_ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                    ToBridge::StoreKey { task_id, dedup_ttl_ms, key: key.as_bytes() }
                        .encode(&mut state.frames);
                }
                ToBridge::Store { batch: state.batch, task_id, session, worker: i as u32, context, data }
                    .encode(&mut state.frames);
                state.jobs.push(task_id);
                if session != 0 {
                    state.waiting.insert(session, state.batch);
                }
                false
            }
            FromWorker::Client(ref c) if state.holds(c.session()) => {
                state.hold(c);
                true
            }
            FromWorker::Client(_)
            | FromWorker::Group { .. }
            | FromWorker::TaskOptions { .. }
            | FromWorker::Commit { .. } => false,
        }
    }

    /// Marks the jobs of this turn's batch as waiting for it, and sends it to the bridge; asks
    /// for the node's name to be renewed when due.
    pub(super) fn end_store_batch(&mut self) {
        let Some(state) = self.durable.as_mut() else { return };
        // At the end of the turn: what waits was seen waiting (see `reply_trims`).
        let DurableState { trims, bridge, .. } = state;
        trims.due(|entry| bridge.send(&ToBridge::Trim { entry }));
        if Instant::now() >= state.lease_due {
            state.bridge.send(&ToBridge::RenewLease);
            state.lease_asked.get_or_insert_with(crate::durable::lease_gate::now_ms);
            state.lease_due = Instant::now() + LEASE_TTL / 3;
        }
        if !state.open() {
            return;
        }
        let n = state.batch;
        ToBridge::StoreEnd { batch: n }.encode(&mut state.frames);
        let (spare_frames, spare_jobs) = state.spare.pop().unwrap_or_default();
        let frames = std::mem::replace(&mut state.frames, spare_frames);
        state.bridge.output().extend_from_slice(&frames);
        let jobs = std::mem::replace(&mut state.jobs, spare_jobs);
        state.sent.push_back(SentBatch { n, frames, jobs });
        state.last_sent = n;
        state.batch += 1;
    }

    pub(super) fn read_bridge(&mut self) {
        let Some(state) = self.durable.as_mut() else { return };
        if let Err(e) = state.bridge.fill() {
            tracing::error!("reading from the redis bridge failed: {e}");
        }
        if let Err(e) = Channel::drain(self, Self::bridge, |m, frame| m.on_bridge_frame(frame)) {
            tracing::error!("the redis bridge sent a corrupt message ({e}); replacing it");
            self.bridge().discard_input();
            if let Some(pid) = self.durable.as_ref().and_then(|s| s.bridge_sup.pid(0)) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }

    /// The bridge's channel, once durable jobs are known to be on (they are for the master's
    /// whole life).
    fn bridge(&mut self) -> &mut MasterToBridge {
        &mut self.durable.as_mut().expect("durable jobs are on").bridge
    }

    fn on_bridge_frame(&mut self, frame: FromBridge<'_>) {
        match frame {
            FromBridge::Stored { batch, replicas, error } => self.on_stored(batch, replicas, error),
            FromBridge::Lease { holder } => self.on_lease(holder),
            FromBridge::Depths { json } => {
                if let Some(state) = self.durable.as_mut() {
                    state.depths = serde_json::from_slice(json).ok();
                }
            }
            FromBridge::AdminAnswer { request, answer } => self.on_admin_answer(request, answer),
            FromBridge::TickClaim { task_id, tick_ms, won, name, holder } => {
                self.on_tick_claim(task_id, tick_ms, won, name, holder)
            }
            FromBridge::Duplicate { task_id, first, digest, holder, line } => {
                self.on_duplicate(task_id, first, digest, holder, line)
            }
            FromBridge::KeyEnded { task_id, line } => self.on_key_ended(task_id, line),
            FromBridge::Cancelled { task_id, cancelled, why } => self.on_cancelled(task_id, cancelled, why),
            FromBridge::EntryRead { entry } => {
                if let Some(state) = self.durable.as_mut() {
                    state.trims.read_whole(entry);
                }
            }
            FromBridge::NotStored { task_id, why } => {
                if let Some(state) = self.durable.as_mut() {
                    state.not_stored.insert(task_id, why.to_vec());
                }
            }
            FromBridge::Reply(reply) => {
                let Some(state) = self.durable.as_mut() else { return };
                if Instant::now() < state.lease_until {
                    self.route_reply(&reply);
                } else {
                    // Not sure the name is still ours (this master was asleep past the lease):
                    // another node of the name may be acting on these. They wait for the
                    // bridge's word, asked for at once.
                    if state.unsure.is_empty() {
                        state.lease_due = Instant::now();
                    }
                    state.trims.waits(reply.entry);
                    reply.encode(&mut state.unsure);
                }
            }
        }
    }

    /// An outcome from the bridge, acted on now, or held behind what it must follow.
    fn route_reply(&mut self, reply: &Reply<'_>) {
        let task_id = reply.task_id;
        // An outcome can overtake its batch's acknowledgement (two threads of the bridge
        // write): it waits for it, and behind its session's held output.
        let job = self.jobs.get(task_id).map(|j| (j.batch, j.session));
        let Some(state) = self.durable.as_mut() else { return };
        match job {
            Some((batch, session)) if state.storing(batch) || state.holds(session) => {
                state.trims.waits(reply.entry);
                state.hold_reply(reply, session)
            }
            _ => self.on_reply(reply),
        }
    }

    /// The bridge renewed the node's name (`holder` empty), or found it held by another run.
    fn on_lease(&mut self, holder: &[u8]) {
        if !holder.is_empty() {
            self.on_lease_lost(holder);
            return;
        }
        let Some(state) = self.durable.as_mut() else { return };
        // The renewal happened a moment before this word of it: a second of margin.
        state.lease_until = Instant::now() + LEASE_TTL - Duration::from_secs(1);
        // The pool's consumers take jobs while the name is surely this node's: from the ask.
        if let Some(asked) = state.lease_asked.take() {
            crate::durable::lease_gate::held_since_ask(asked);
        }
        let unsure = std::mem::take(&mut state.unsure);
        let mut pos = 0;
        while let Ok(Some((FromBridge::Reply(reply), n))) = FromBridge::decode(&unsure[pos..]) {
            pos += n;
            if let Some(state) = self.durable.as_mut() {
                state.trims.released(reply.entry);
            }
            self.route_reply(&reply);
        }
    }

    /// Another run took the node's name (this master hung, or was cut off from Redis, past the
    /// lease): two nodes of one name would take each other's replies. This one stops now; its
    /// jobs are in Redis, and the node that holds the name answers for them.
    fn on_lease_lost(&mut self, holder: &[u8]) {
        // First: a consumer of the pool that has not been stopped yet takes nothing more.
        crate::durable::lease_gate::lost();
        if self.exit_code.is_some() {
            return;
        }
        tracing::error!(
            "node {}: the name is held by another run now ({}): this one was stopped or cut off \
             from Redis for over {} s; it takes no more jobs and exits",
            self.config.node_id.as_deref().unwrap_or_default(),
            String::from_utf8_lossy(holder),
            LEASE_TTL.as_secs()
        );
        self.kill_manager();
        self.exit_code = Some(1);
    }

    /// Every batch up to `batch` is stored (or failed, with `error`): release what waited.
    /// `replicas` below [`FromBridge::ALL_REPLICAS`]: stored, but fewer replicas than asked
    /// confirmed it; each job's `accepted` says how many.
    fn on_stored(&mut self, batch: u64, replicas: u32, error: &[u8]) {
        let Some(state) = self.durable.as_mut() else { return };
        let mut failed = Vec::new();
        let mut short = HashSet::new();
        // Jobs of a stored batch that Redis did not store (one of their keys was of another
        // type): each fails alone, its `accepted` line dropped; the batch's others are stored.
        let mut refused: Vec<(u64, Vec<u8>)> = Vec::new();
        while state.sent.front().is_some_and(|b| b.n <= batch) {
            let Some(done) = state.sent.pop_front() else { break };
            if error.is_empty() {
                if replicas != FromBridge::ALL_REPLICAS {
                    short.extend(done.jobs.iter().copied());
                }
                // The others are stored: acknowledged, their batch is no longer `storing`.
                if !state.not_stored.is_empty() {
                    for &task_id in &done.jobs {
                        if let Some(why) = state.not_stored.remove(&task_id) {
                            refused.push((task_id, why));
                        }
                    }
                }
            } else {
                for task_id in &done.jobs {
                    state.not_stored.remove(task_id);
                }
                failed.extend_from_slice(&done.jobs);
            }
            state.keep_spare(done);
        }
        state.acked = state.acked.max(batch);
        let acked = state.acked;
        let mut release = Vec::new();
        while state.held.front().is_some_and(|(tag, _)| *tag <= acked) {
            if let Some((_, held)) = state.held.pop_front() {
                release.push(held);
            }
        }
        state.waiting.retain(|_, tag| *tag > acked);
        let why = String::from_utf8_lossy(error).into_owned();
        let lost: HashSet<u64> =
            failed.iter().filter_map(|&id| self.jobs.get(id).map(|j| j.session)).collect();
        if !failed.is_empty() {
            tracing::error!("{} jobs not stored: {why}", failed.len());
        }
        let unaccepted: HashSet<u64> = refused.iter().map(|(id, _)| *id).collect();
        let refused_sessions: HashSet<u64> =
            refused.iter().filter_map(|(id, _)| self.jobs.get(*id).map(|j| j.session)).collect();
        for (task_id, why) in refused {
            self.finish_job(task_id, 0, false, &why);
        }
        // Failed first: an outcome held behind the batch (the job was stored after all, and
        // ran) then finds its job finished, and is dropped with its reply as a second one.
        // The client hears `failed` only (from its worker, after what is released here).
        for task_id in failed {
            self.finish_job(task_id, 0, false, why.as_bytes());
        }
        for held in release {
            let mut pos = 0;
            let bytes = match held {
                Held::Clients(bytes) => {
                    while let Ok(Some((frame, n))) = ToClient::decode(&bytes[pos..]) {
                        pos += n;
                        match frame {
                            // A client whose job was not stored gets its failure, not `accepted`.
                            ToClient::Send { session, .. } | ToClient::CloseSession { session }
                                if lost.contains(&session) => {}
                            // Its other lines go out (its other jobs of the batch are stored).
                            ToClient::Send { session, data } if refused_sessions.contains(&session) => {
                                let data = without_accepted(data, &unaccepted);
                                let data = match short.is_empty() {
                                    true => data,
                                    false => with_replicas(&data, &short, replicas),
                                };
                                self.on_client_frame(ToClient::Send { session, data: &data });
                            }
                            ToClient::Send { session, data } if !short.is_empty() => {
                                let data = with_replicas(data, &short, replicas);
                                self.on_client_frame(ToClient::Send { session, data: &data });
                            }
                            other => self.on_client_frame(other),
                        }
                    }
                    bytes
                }
                Held::Replies(bytes) => {
                    while let Ok(Some((FromBridge::Reply(reply), n))) = FromBridge::decode(&bytes[pos..]) {
                        pos += n;
                        if let Some(state) = self.durable.as_mut() {
                            state.trims.released(reply.entry);
                        }
                        self.on_reply(&reply);
                    }
                    bytes
                }
            };
            if let Some(state) = self.durable.as_mut() {
                state.keep_held(bytes);
            }
        }
        // After their `accepted`, now out.
        self.act_on_duplicates();
    }

    fn on_reply(&mut self, frame: &Reply<'_>) {
        let Reply { task_id, ok, attempts, task_pid, replays, entry: _, reply, sends, result, retrying } =
            *frame;
        let Some(state) = self.durable.as_mut() else { return };
        if retrying {
            self.on_retrying_reply(task_id, attempts, reply, sends);
            return;
        }
        if let Some(job) = self.jobs.get_mut(task_id) {
            job.attempts = job.attempts.max(attempts);
            // A recovered job's sessions belong to the master before the restart.
            if job.session != 0 {
                let mut pos = 0;
                while let Ok(Some((FromTask::Send { session, data }, n))) = FromTask::decode(&sends[pos..]) {
                    pos += n;
                    self.send_to_session(session, data);
                }
            }
            self.job_outcome(task_id, task_pid, ok, reply, result);
        } else if self.results.contains(task_id) && replays == 0 {
            // It ran twice (a node died after finishing, or ran past claim time): one reply.
            state.duplicates += 1;
            tracing::debug!("second outcome of task {task_id} dropped");
        } else {
            let line =
                if reply.is_empty() { outcome_line(task_id, ok, result, attempts) } else { reply.to_vec() };
            state.bridge.send(&ToBridge::KeepResult { task_id, line: &line });
            self.results.record(task_id, line);
        }
    }

    /// A durable job waits in Redis for a delivery retry: not its outcome. Its client, if
    /// still here, gets the `retrying` line the consumer wrote.
    fn on_retrying_reply(&mut self, task_id: u64, attempts: u32, line: &[u8], sends: &[u8]) {
        let Some(job) = self.jobs.get_mut(task_id) else { return };
        job.attempts = job.attempts.max(attempts);
        let (session, tells) = (job.session, job.group == 0 && job.flags & task_flags::WAIT == 0);
        self.counters.delivery_retries += 1;
        if session != 0 {
            let mut pos = 0;
            while let Ok(Some((FromTask::Send { session, data }, n))) = FromTask::decode(&sends[pos..]) {
                pos += n;
                self.send_to_session(session, data);
            }
        }
        if tells && !line.is_empty() && !self.client_gone(session) {
            self.send_to_session(session, line);
        }
    }

    /// Keeps the final reply of a job whose client is gone in Redis too (durable jobs only), so
    /// that it outlives a restart of this node.
    pub(super) fn keep_in_redis(&mut self, task_id: u64, line: &[u8]) {
        if let Some(state) = self.durable.as_mut() {
            state.bridge.send(&ToBridge::KeepResult { task_id, line });
        }
    }

    /// Takes back the jobs and results a previous run of this node left in Redis.
    pub(super) fn recover(&mut self, recovered: crate::durable::startup::Recovered) {
        for (task_id, line) in recovered.results {
            self.results.record(task_id, line);
        }
        if let Some(state) = self.durable.as_mut() {
            state.startup_replies = recovered.replies;
            state.replies_from = recovered.replies_from;
        }
        for job in recovered.jobs {
            self.jobs.recover(
                job.task_id,
                job.worker.min(self.workers.len() as u32 - 1),
                &job.context,
                &job.data,
            );
        }
        self.shared.set_jobs_pending(self.jobs.len() as u64);
    }

    pub(super) fn answer_result_query(&mut self, session: u64, task_id: u64) {
        let line = if let Some(job) = self.jobs.get(task_id) {
            let storing = self.durable.as_ref().is_some_and(|s| s.storing(job.batch));
            let state = if storing { "storing" } else { "running" };
            let mut l = serde_json::json!({"event": state, "task_id": task_id, "attempts": job.attempts})
                .to_string()
                .into_bytes();
            l.push(b'\n');
            l
        } else if let Some(line) = self.results.get(task_id) {
            line.to_vec()
        } else {
            let mut l = serde_json::json!({
                "event": "error",
                "task_id": task_id,
                "error": format!(
                    "unknown task_id {task_id}: no job of that id is running, and its result is not among \
                     those kept (the last {} final replies, result_keep, within {} MiB: {} kept now)",
                    self.config.result_keep,
                    results::KEPT_BYTES_MAX >> 20,
                    self.results.len()
                ),
            })
            .to_string()
            .into_bytes();
            l.push(b'\n');
            l
        };
        self.send_to_session(session, &line);
    }
}

impl<A: Application> Master<'_, A> {
    /// Lets the bridge write what it was last given, then ends it.
    pub(super) fn stop_bridge(&mut self) {
        let Some(state) = self.durable.as_mut() else { return };
        let deadline = Instant::now() + Duration::from_secs(2);
        while state.bridge.has_output() && Instant::now() < deadline {
            if state.bridge.flush().is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Our end closed: the bridge acts on what it has read, then sees the end and exits.
        let _ = self.poll.registry().deregister(state.bridge.source());
        if let Ok((closed, _)) = crate::ipc::channel::pair() {
            state.bridge = Channel::new(closed);
        }
        state.bridge_sup.stop_and_wait(Duration::from_secs(2));
    }
}

/// Forks the redis bridge over `child_end`.
fn fork_bridge(
    d: &Durable,
    child_end: OwnedFd,
    shared: &'static crate::shm::Shared,
    replies_from: &str,
    credentials: Option<process::Credentials>,
) -> io::Result<Pid> {
    let master_pid = nix::unistd::getpid();
    process::spawn("redis bridge", &[child_end.as_raw_fd()], || {
        // It reads what anyone who can write to Redis wrote: not as root, with --user.
        // Before its threads start, and before the parent-death signal, which a change of
        // user clears.
        if let Some(creds) = credentials {
            process::drop_privileges(creds).map_err(|source| ProcessError::Credentials { creds, source })?;
        }
        process::die_with_parent(master_pid);
        let fd = child_end.try_clone().map_err(ProcessError::io("cannot take its channel"))?;
        crate::durable::bridge::run(d, fd, shared, replies_from)
    })
}

/// `data` (a worker's lines for a client) without the `accepted` line of each job of `refused`
/// (not stored: its client hears `failed` only); other lines as they are.
fn without_accepted(data: &[u8], refused: &HashSet<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for line in data.split_inclusive(|&b| b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let theirs =
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body).is_ok_and(|v| {
                v.get("event").and_then(|e| e.as_str()) == Some("accepted")
                    && v.get("task_id").and_then(|t| t.as_u64()).is_some_and(|t| refused.contains(&t))
            });
        if !theirs {
            out.extend_from_slice(line);
        }
    }
    out
}

/// `data` (a worker's lines for a client) with `"replicas": n` added to the `accepted` line of
/// each job of `short`; other lines as they are.
fn with_replicas(data: &[u8], short: &HashSet<u64>, n: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    for line in data.split_inclusive(|&b| b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
            Ok(mut v)
                if v.get("event").and_then(|e| e.as_str()) == Some("accepted")
                    && v.get("task_id").and_then(|t| t.as_u64()).is_some_and(|t| short.contains(&t)) =>
            {
                v.insert("replicas".into(), n.into());
                out.extend_from_slice(serde_json::Value::Object(v).to_string().as_bytes());
                out.extend_from_slice(&line[body.len()..]);
            }
            _ => out.extend_from_slice(line),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_accepted_line_of_a_job_not_stored_is_dropped() {
        let data = b"{\"event\":\"accepted\",\"task_id\":7,\"type\":\"email\"}\n\
                     {\"event\":\"accepted\",\"task_id\":8,\"type\":\"email\"}\n\
                     {\"event\":\"done\",\"task_id\":7}\n\
                     not json\n";
        let out = without_accepted(data, &HashSet::from([7]));
        assert_eq!(
            out,
            b"{\"event\":\"accepted\",\"task_id\":8,\"type\":\"email\"}\n\
              {\"event\":\"done\",\"task_id\":7}\n\
              not json\n"
        );
    }
}
