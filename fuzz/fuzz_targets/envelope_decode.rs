//! Fuzzes the IPC envelope decoders: `taskd::ipc::Frame::decode` and
//! `taskd::ipc::envelope::decode_outcomes`.
//!
//! How to run (from the crate root; needs `cargo install cargo-fuzz` and a nightly toolchain):
//!
//!     cargo +nightly fuzz run envelope_decode -- -max_total_time=220
//!
//! Crashes go to `fuzz/artifacts/envelope_decode/`.
//!
//! Input: a channel's bytes. Frames are decoded one after another, as a reader of the channel
//! does. Every decoded frame re-encodes to exactly the bytes it was read from (the encoding is
//! canonical), and every strict prefix of it is "need more bytes". The whole input is also read
//! as a group's combined result.

#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::ipc::envelope::{decode_outcomes, encode_outcome, frame_kind, frame_len, COMMIT_KIND};
use taskd::ipc::Frame;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        assert!(used > 4 && used <= rest.len(), "frame took {used} of {} bytes", rest.len());
        assert_eq!(frame_len(rest), Ok(Some(used)));
        let bytes = &rest[..used];
        let mut out = Vec::new();
        frame.encode(&mut out);
        assert_eq!(out, bytes, "{frame:?} re-encodes differently");
        assert_eq!(frame.is_commit(), frame_kind(bytes) == COMMIT_KIND);
        assert_eq!(Frame::decode(&rest[..used - 1]), Ok(None), "strict prefix of {frame:?}");
        // A group's finish carries its members' outcomes; any finish's result must not panic.
        if let Frame::Finish { result, .. } = frame {
            check_outcomes(result);
        }
        rest = &rest[used..];
    }
    check_outcomes(data);
});

/// A group's combined result: decoding never panics, and what decodes re-encodes exactly.
fn check_outcomes(buf: &[u8]) {
    if let Ok(outcomes) = decode_outcomes(buf) {
        let mut out = Vec::new();
        for (ok, bytes) in &outcomes {
            encode_outcome(*ok, bytes, &mut out);
        }
        assert_eq!(out, buf);
    }
}
