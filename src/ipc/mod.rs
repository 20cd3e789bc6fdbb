//! Inter-process communication: the envelope every message travels in, and the channel
//! (a socketpair with its buffers) it travels over.
//!
//! Every channel is created by the master before anything is forked and belongs to a slot,
//! not to a process: a replacement process takes over its predecessor's channel.

pub mod channel;
pub mod envelope;

pub use channel::{Channel, ReadState};
pub use envelope::{ExitReason, Frame, Role};

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
