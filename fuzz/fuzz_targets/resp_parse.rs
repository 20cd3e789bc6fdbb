//! Fuzzes taskd's own RESP2 reply parser (`taskd::durable::hot::parse`), which reads what
//! whoever can write to Redis wrote (job entries, reply streams), against the `redis` crate's
//! parser on the same bytes.
//!
//! How to run (from the crate root; needs `cargo install cargo-fuzz` and a nightly toolchain):
//!
//!     cargo +nightly fuzz run resp_parse -- -max_total_time=220
//!
//! Crashes go to `fuzz/artifacts/resp_parse/`.
//!
//! Input: the bytes a connection read. Whatever they are, the parser returns (never panics,
//! never recurses past its depth limit); a reply it reads whole, the crate reads as the same
//! value from the same bytes; and every strict prefix of those bytes is "not all there yet".
//! The same bytes read as an XREAD / XREADGROUP reply (`parse_streams`, straight into stream
//! entries) give what `redis_io::read_streams` makes of that value, or its first error, and
//! are refused or waited for exactly when `parse` refuses or waits for them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::durable::hot::{parse, parse_streams};
use taskd::durable::redis_io::read_streams;

fuzz_target!(|data: &[u8]| {
    let streams = parse_streams(data);
    match parse(data) {
        Ok(Some((value, used))) => {
            let Ok(Some((entries, n))) = streams else { panic!("parse read a reply, parse_streams did not") };
            assert_eq!(n, used);
            match (entries, value.clone().extract_error()) {
                (Ok(entries), Ok(value)) => assert_eq!(entries, read_streams(value)),
                (Err(redis::Value::ServerError(ours)), Err(theirs)) => {
                    assert_eq!(redis::RedisError::from(ours).to_string(), theirs.to_string())
                }
                (ours, theirs) => panic!("{ours:?} against {theirs:?}"),
            }
        }
        Ok(None) => assert!(matches!(streams, Ok(None)), "{streams:?}"),
        Err(_) => assert!(streams.is_err(), "{streams:?}"),
    }
    let Ok(Some((ours, used))) = parse(data) else { return };
    assert!(used > 0 && used <= data.len());
    let reply = &data[..used];
    let theirs = redis::parse_redis_value(reply).expect("the crate reads a reply taskd's parser read");
    assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(reply));
    // A cut reply waits for more bytes; it is never read as another reply.
    for cut in [0, used / 2, used - 1] {
        assert_eq!(parse(&reply[..cut]), Ok(None), "{:?}", String::from_utf8_lossy(&reply[..cut]));
    }
});
