//! The lease gate: until when the node's name is surely its own, published in the shared page
//! by the process that holds the lease (a task node's manager, a web node's master) and read by
//! its consumers before they take or start a job.
//!
//! A node that wakes from a hang (SIGSTOP, a paused VM) wakes with its task processes; until
//! the holder has renewed the lease (or found it taken and stopped its pool), they must take
//! nothing: a node of the same name may have started meanwhile, and uses the same consumer
//! names.

use std::sync::OnceLock;
use std::time::Duration;

use super::startup::LEASE_TTL;
use crate::shm::{boot_clock_ms, Shared};

/// Set once, before the first fork, so every process of the node has it.
static PAGE: OnceLock<&'static Shared> = OnceLock::new();

/// The margin kept under the lease's time to live: for the two hosts' clocks to differ in rate.
const MARGIN: Duration = Duration::from_secs(1);

/// Called by the lease's holder once it has the page, before it forks anything.
pub fn share(page: &'static Shared) {
    let _ = PAGE.set(page);
}

/// The lease was taken or renewed by a request sent at `asked` (ms of the boot clock, see
/// [`boot_clock_ms`]): Redis keeps it at least until `asked` + its time to live, so it is
/// surely this node's until then.
pub fn held_since_ask(asked: u64) {
    if let Some(page) = PAGE.get() {
        held_since_ask_on(page, asked);
    }
}

/// The name is another run's now: before the pool is stopped, so that a consumer that has not
/// heard yet takes nothing.
pub fn lost() {
    if let Some(page) = PAGE.get() {
        lost_on(page);
    }
}

/// [`held_since_ask`] on a page of one's own: a task node of several queues holds its name in
/// each, and keeps one gate per queue (its processes each [`share`] their queue's), so that a
/// queue whose server is away stops only its own processes.
pub fn held_since_ask_on(page: &Shared, asked: u64) {
    let valid = (LEASE_TTL - MARGIN).as_millis() as u64;
    page.set_lease_until_ms(asked.saturating_add(valid));
}

/// [`lost`] on a page of one's own (see [`held_since_ask_on`]).
pub fn lost_on(page: &Shared) {
    page.set_lease_until_ms(0);
}

/// Whether a task process may take or start a job now: while the holder's last renewal of the
/// node's name is known to hold. Without a page (in-memory jobs), yes.
pub fn known_valid() -> bool {
    PAGE.get().is_none_or(|page| boot_clock_ms() < page.lease_until_ms())
}

/// Now, on the clock the gate is kept in.
pub fn now_ms() -> u64 {
    boot_clock_ms()
}
