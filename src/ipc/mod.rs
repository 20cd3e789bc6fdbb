//! Inter-process communication: the envelope every message travels in, and the channel
//! (a socketpair with its buffers) it travels over.
//!
//! Every channel is created by the master before anything is forked and belongs to a slot,
//! not to a process: a replacement process takes over its predecessor's channel.
//!
//! The master is the hub: each link joins it to one other process, and each has its own
//! message types, one per direction. Its ends are named below: the master's end of a link
//! writes `To*` and reads `From*`, the other end the reverse.

pub mod channel;
pub mod envelope;

pub use channel::{Channel, ReadState};
pub use envelope::{
    ExitReason, FromBridge, FromManager, FromTask, FromWorker, Role, ToBridge, ToClient, ToManager, ToTask,
    ToWorker,
};

/// The master's end of a worker slot's channel: deliveries out, committed output in.
pub type MasterToWorker = Channel<ToWorker<'static>, FromWorker<'static>>;
/// A worker's end of its slot's channel.
pub type WorkerToMaster = Channel<FromWorker<'static>, ToWorker<'static>>;
/// The master's end of a task slot's channel: jobs out, outcomes in.
pub type MasterToTask = Channel<ToTask<'static>, FromTask<'static>>;
/// A task process's end of its slot's channel.
pub type TaskToMaster = Channel<FromTask<'static>, ToTask<'static>>;
/// The master's end of the manager's channel: slots ready, pool size, shutdown out; processes
/// started and exited in.
pub type MasterToManager = Channel<ToManager, FromManager<'static>>;
/// The manager's end.
pub type ManagerToMaster = Channel<FromManager<'static>, ToManager>;
/// The master's end of the Redis bridge's channel: jobs to store out, acknowledgements and
/// outcomes in. (The bridge reads its end with blocking threads, not as a `Channel`.)
pub type MasterToBridge = Channel<ToBridge<'static>, FromBridge<'static>>;

use std::io;
use std::os::fd::OwnedFd;

/// The two ends of one slot's channel.
pub struct SlotChannel {
    /// Read and written by the master.
    pub master_end: OwnedFd,
    /// Held by the manager and handed to each process of the slot in turn; the master keeps
    /// a copy too, to empty it when a process dies holding half a frame.
    pub child_end: OwnedFd,
}

impl SlotChannel {
    pub fn new() -> io::Result<SlotChannel> {
        let (master_end, child_end) = channel::pair()?;
        Ok(SlotChannel { master_end, child_end })
    }
}
