//! The few counters every process reads without asking the master: a page of shared memory
//! mapped before the first fork, so it outlives any worker, task process or manager.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

#[repr(C)]
pub struct Shared {
    /// The next task id: ids stay unique across every worker and every restart.
    next_task_id: AtomicU64,
    /// Jobs the master holds (queued or running); written by the master only.
    jobs_pending: AtomicU64,
    /// Bytes of the payloads of the jobs the master holds; written by the master only.
    job_bytes: AtomicU64,
    /// What is read per job or per turn and written almost never, on cache lines of its own.
    quiet: Quiet,
}

/// The counters of [`Shared`] that are read often and written almost never. The ones above
/// are written per job (a task id per job by the workers, the master's books), so a cache line
/// holding them moves between CPUs all the time: a task process reading the log's generation
/// once per job from that line paid a miss each time (false sharing; `logging::follow_rotation`
/// took 2.3 % of the task processes' CPU samples). 128 bytes: the adjacent-line prefetcher
/// pairs 64-byte lines.
#[repr(C, align(128))]
struct Quiet {
    /// Bumped by the master each time it reopens the log file (SIGHUP).
    log_generation: AtomicU64,
    /// Results that came after their waiter gave up (counted by workers).
    late_results: AtomicU64,
    /// Durable jobs only: nonzero while the Redis bridge cannot reach Redis, so that workers
    /// refuse new jobs at once with a clear error instead of holding their clients.
    durable_down: AtomicU64,
    /// Durable task node only: until when (ms of [`boot_clock_ms`]) the node's name is surely
    /// its own in Redis, written by its manager at each renewal of the lease; 0: not known.
    /// Its task processes take and start no job past it (see `durable::node`).
    lease_until_ms: AtomicU64,
    /// Log lines that could not be written (a full disk, a file size limit), counted by the
    /// process that lost them: nothing else can say so, the log being what failed.
    log_lines_lost: AtomicU64,
}

impl Shared {
    /// Maps the shared page. Call once, in the master, before forking.
    pub fn map() -> std::io::Result<&'static Shared> {
        let len = NonZeroUsize::new(std::mem::size_of::<Shared>()).expect("Shared is not empty");
        // SAFETY: a fresh anonymous mapping is zero-filled and page-aligned, which is a valid
        // `Shared` (atomics of zero); it is never unmapped, so the reference lives as long as
        // the process, and forked children inherit the same physical page.
        unsafe {
            let ptr = mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?;
            let shared = &*(ptr.as_ptr() as *const Shared);
            shared.next_task_id.store(1, Ordering::Relaxed);
            Ok(shared)
        }
    }

    pub fn next_task_id(&self) -> u64 {
        self.next_task_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts task ids at `base` (durable jobs: a new range per start of a node, so that a
    /// restarted node never reuses the id of a job it accepted before).
    pub fn set_task_id_base(&self, base: u64) {
        self.next_task_id.store(base.max(1), Ordering::Relaxed);
    }

    pub fn durable_down(&self) -> bool {
        self.quiet.durable_down.load(Ordering::Relaxed) != 0
    }

    pub fn set_durable_down(&self, down: bool) {
        self.quiet.durable_down.store(u64::from(down), Ordering::Relaxed);
    }

    pub fn jobs_pending(&self) -> u64 {
        self.jobs_pending.load(Ordering::Relaxed)
    }

    pub fn set_jobs_pending(&self, n: u64) {
        self.jobs_pending.store(n, Ordering::Relaxed);
    }

    pub fn job_bytes(&self) -> u64 {
        self.job_bytes.load(Ordering::Relaxed)
    }

    pub fn set_job_bytes(&self, n: u64) {
        self.job_bytes.store(n, Ordering::Relaxed);
    }

    /// Until when (ms of [`boot_clock_ms`]) the node's name is surely its own; 0: not known.
    pub fn lease_until_ms(&self) -> u64 {
        self.quiet.lease_until_ms.load(Ordering::Acquire)
    }

    pub fn set_lease_until_ms(&self, ms: u64) {
        self.quiet.lease_until_ms.store(ms, Ordering::Release);
    }

    pub fn count_late_result(&self) {
        self.quiet.late_results.fetch_add(1, Ordering::Relaxed);
    }

    pub fn late_results(&self) -> u64 {
        self.quiet.late_results.load(Ordering::Relaxed)
    }

    pub fn count_log_lines_lost(&self, n: u64) {
        self.quiet.log_lines_lost.fetch_add(n, Ordering::Relaxed);
    }

    pub fn log_lines_lost(&self) -> u64 {
        self.quiet.log_lines_lost.load(Ordering::Relaxed)
    }

    pub fn log_generation(&self) -> u64 {
        self.quiet.log_generation.load(Ordering::Relaxed)
    }

    /// Announces a log rotation; returns the new generation.
    pub fn bump_log_generation(&self) -> u64 {
        self.quiet.log_generation.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A zeroed array of `n` atomics in shared memory, for state that every process of a node
/// updates without asking the master (the rate limiters' clocks, `delivery::rate`). Call
/// before forking, as [`Shared::map`]; never unmapped.
pub fn map_atomics(n: usize) -> std::io::Result<&'static [AtomicU64]> {
    let Some(len) = NonZeroUsize::new(n.max(1).saturating_mul(std::mem::size_of::<AtomicU64>())) else {
        return Err(std::io::Error::other("no room to map"));
    };
    // SAFETY: as in `Shared::map`: a fresh anonymous mapping is zero-filled and page-aligned,
    // and `n` zeroed `AtomicU64`s are valid; never unmapped, inherited by forked children.
    unsafe {
        let ptr =
            mmap_anonymous(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED)?;
        Ok(std::slice::from_raw_parts(ptr.as_ptr() as *const AtomicU64, n))
    }
}

/// Microseconds of CLOCK_BOOTTIME: one clock for every process of the host (deadlines written
/// by one process and read by another, the rate limiters' turns), which keeps running while the
/// machine is suspended, as a lease's time to live in Redis does (CLOCK_MONOTONIC, and so
/// `Instant`, stops then).
pub fn boot_clock_us() -> u64 {
    let mut ts = nix::libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the pointer, which points to a local that
    // lives across the call; CLOCK_BOOTTIME exists on every Linux since 2.6.39.
    let rc = unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // Not reachable on Linux; past every deadline: a lease is then never taken as valid.
        return u64::MAX;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000).saturating_add(ts.tv_nsec as u64 / 1000)
}

/// Milliseconds of [`boot_clock_us`] (u64::MAX, past every deadline, if the clock failed).
pub fn boot_clock_ms() -> u64 {
    match boot_clock_us() {
        u64::MAX => u64::MAX,
        us => us / 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_increasing() {
        let shared = Shared::map().unwrap();
        let a = shared.next_task_id();
        let b = shared.next_task_id();
        assert!(b > a && a >= 1);
    }

    #[test]
    fn the_quiet_counters_share_no_cache_line_with_those_written_per_job() {
        let quiet = std::mem::offset_of!(Shared, quiet);
        assert!(quiet >= 128 && quiet % 128 == 0, "at {quiet}");
        assert!(std::mem::size_of::<Shared>() <= 4096, "one page");
        let shared = Shared::map().unwrap();
        assert_eq!(std::ptr::from_ref(shared) as usize % 128, 0);
    }

    /// What the page is for: a forked process (a worker) takes ids and writes counters on the
    /// same page the master reads, and an id it took is never handed out again.
    #[test]
    fn a_forked_process_shares_the_page() {
        let shared = Shared::map().unwrap();
        let before = shared.next_task_id();
        let child = crate::process::spawn("test child", &[], || {
            shared.next_task_id();
            shared.next_task_id();
            shared.set_jobs_pending(7);
            Ok(())
        })
        .unwrap();
        let start = std::time::Instant::now();
        while shared.jobs_pending() != 7 {
            assert!(start.elapsed() < std::time::Duration::from_secs(20), "the child's write is not seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = nix::sys::wait::waitpid(child, None);
        assert_eq!(shared.next_task_id(), before + 3, "the child's two ids are not given again");
    }
}
