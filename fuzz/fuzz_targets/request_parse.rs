//! Fuzzes `taskd::mail::request::parse`, which reads one client request line.
//!
//! How to run (from the crate root; needs `cargo install cargo-fuzz` and a nightly toolchain):
//!
//!     cargo +nightly fuzz run request_parse -- -max_total_time=220 -dict=fuzz/request_parse.dict
//!
//! The dictionary (field names, types, address pieces) is optional; it gets past the JSON
//! shapes much sooner. Crashes go to `fuzz/artifacts/request_parse/`.
//!
//! Properties: no input panics; an error is a non-empty sentence; every job read from a line
//! survives the trip a task takes (`serde_json::to_vec`, then back into a `Job`), and read
//! again as a JSON request line it is the same job.

#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::mail::request::{parse, Job, Request, MAX_BATCH};

fn check_job(job: &Job) {
    // The worker encodes the job as task data; the task process decodes it.
    let bytes = serde_json::to_vec(job).expect("a parsed job serialises");
    let back: Job = serde_json::from_slice(&bytes).expect("a serialised job deserialises");
    assert_eq!(&back, job, "job changed on its way to the task process: {}", String::from_utf8_lossy(&bytes));
    // Its JSON form is itself a request line that reads as the same job.
    assert!(!bytes.contains(&b'\n'));
    match parse(&bytes) {
        Ok(Request::Job(again)) => assert_eq!(&again, job),
        other => panic!("the JSON form {} of a job reads as {other:?}", String::from_utf8_lossy(&bytes)),
    }
}

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Request::Job(job)) => check_job(&job),
        Ok(Request::Batch(jobs)) => {
            assert!((1..=MAX_BATCH).contains(&jobs.len()), "batch of {} jobs", jobs.len());
            jobs.iter().for_each(check_job);
        }
        Ok(Request::Stats) => {}
        Ok(Request::Result(task_id) | Request::Cancel(task_id, _)) => {
            // A task id read from a line is echoed back in the answer: it must be what was sent.
            let text = String::from_utf8_lossy(data);
            assert!(text.contains(&task_id.to_string()), "task id {task_id} not in {text:?}");
        }
        // Without handlers configured (plain `parse`), no type is an external handler's.
        Ok(Request::Handled { kind, .. }) => panic!("a handled job of type {kind:?} without handlers"),
        Err(message) => assert!(!message.trim().is_empty(), "empty error message"),
    }
});
