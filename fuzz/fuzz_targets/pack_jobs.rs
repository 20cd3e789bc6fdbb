//! Fuzzes the reader of packs (`taskd::durable::pack::jobs`): anyone who can write to Redis can
//! write a pack, and a consumer reads it.
//!
//! How to run (from the crate root; needs `cargo install cargo-fuzz` and a nightly toolchain):
//!
//!     cargo +nightly fuzz run pack_jobs -- -max_total_time=120
//!
//! Crashes go to `fuzz/artifacts/pack_jobs/`.
//!
//! Input: read as a pack's field `p`: never a panic, at most `MAX_JOBS` jobs of at most
//! `MAX_FIELDS` fields, each name and value a slice of the input after the one before, and a
//! pack read whole ends with its last field. The same input also drives a writer: jobs made of its bytes, written by
//! `Pack`, read back as exactly those jobs, whole.

#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::durable::pack::{self, Pack, MAX_FIELDS, MAX_JOBS};

fuzz_target!(|data: &[u8]| {
    read(data);
    write_and_read_back(data);
});

fn read(data: &[u8]) {
    let (jobs, damage) = pack::jobs(data);
    assert!(jobs.len() <= MAX_JOBS);
    // Every name and value is a slice of the input, each after the one before, past the
    // version byte and at least its `0:` (a length and its colon).
    let base = data.as_ptr() as usize;
    let mut end = 1;
    for job in &jobs {
        assert!(job.len() <= MAX_FIELDS);
        for item in job.iter().flat_map(|(name, value)| [*name, *value]) {
            let at = (item.as_ptr() as usize).wrapping_sub(base);
            assert!(at >= end + 2 && at + item.len() <= data.len(), "{at} after {end}");
            end = at + item.len();
        }
    }
    match damage {
        // Whole: nothing is left after the last field (a trailing job of no field aside).
        None if jobs.last().is_some_and(|j| !j.is_empty()) => assert_eq!(end, data.len()),
        None => assert!(data.first() == Some(&b'1')),
        // Damaged: a reason, and no pack at all unless it starts as one.
        Some(why) => assert!(!why.is_empty() && (data.first() == Some(&b'1') || jobs.is_empty())),
    }
}

/// Jobs of the input's bytes: each one's origin, context and data cut from it in turn.
fn write_and_read_back(data: &[u8]) {
    let mut pack = Pack::new();
    let mut want = Vec::new();
    let mut rest = data;
    let mut take = |n: usize| {
        let (a, b) = rest.split_at(n.min(rest.len()));
        rest = b;
        a
    };
    for i in 0..64u64 {
        let head = take(3);
        if head.len() < 3 {
            break;
        }
        let origin = String::from_utf8_lossy(take(usize::from(head[0] % 16))).into_owned();
        let context = take(usize::from(head[1] % 32)).to_vec();
        let body = take(usize::from(head[2])).to_vec();
        let task_id = u64::from(head[0]) << 56 | i;
        let session = u64::MAX - i;
        let worker = u32::from(head[1]) * 1000;
        pack.push(&origin, task_id, session, worker, &context, &body);
        want.push((origin, task_id, session, worker, context, body));
    }
    assert_eq!(pack.len(), want.len());
    let (jobs, damage) = pack::jobs(pack.bytes());
    if want.is_empty() {
        // Nothing pushed: no bytes, which is no pack.
        assert!(jobs.is_empty() && pack.bytes().is_empty() && damage.is_some());
        return;
    }
    assert_eq!(damage, None);
    assert_eq!(jobs.len(), want.len());
    for (job, (origin, task_id, session, worker, context, body)) in jobs.iter().zip(&want) {
        let mut fields: Vec<(&[u8], Vec<u8>)> = vec![
            (b"o", origin.as_bytes().to_vec()),
            (b"t", task_id.to_string().into_bytes()),
            (b"s", session.to_string().into_bytes()),
            (b"w", worker.to_string().into_bytes()),
        ];
        if !context.is_empty() {
            fields.push((b"c", context.clone()));
        }
        fields.push((b"d", body.clone()));
        let got: Vec<(&[u8], Vec<u8>)> = job.iter().map(|(n, v)| (*n, v.to_vec())).collect();
        assert_eq!(got, fields);
    }
}
