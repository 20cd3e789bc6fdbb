//! Fuzzes the IPC envelope decoders: every link's message decoder (`taskd::ipc::envelope`:
//! `ToWorker`, `FromWorker`, `ToClient`, `ToTask`, `FromTask`, `ToManager`, `FromManager`,
//! `ToBridge`, `FromBridge`) and `decode_outcomes`.
//!
//! How to run (from the crate root; needs `cargo install cargo-fuzz` and a nightly toolchain):
//!
//!     cargo +nightly fuzz run envelope_decode -- -max_total_time=220
//!
//! Crashes go to `fuzz/artifacts/envelope_decode/`.
//!
//! Input: a channel's bytes, read by each link's reader in turn as that reader does: frames one
//! after another. Every decoded frame re-encodes to exactly the bytes it was read from (the
//! encoding is canonical), and every strict prefix of it is "need more bytes". A frame one link
//! reads, no other link with other kinds reads. The whole input is also read as a group's
//! combined result.

#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::ipc::envelope::{
    decode_outcomes, encode_outcome, frame_kind, frame_len, Finish, FromBridge, FromManager, FromTask, FromWorker,
    Message, Reply, ToBridge, ToClient, ToManager, ToTask, ToWorker, COMMIT_KIND,
};

fuzz_target!(|data: &[u8]| {
    read_all::<ToWorker>(data, |frame| {
        // A group's finish carries its members' outcomes; any finish's result must not panic.
        if let ToWorker::Finish(Finish { result, .. }) = frame {
            check_outcomes(result);
        }
    });
    read_all::<FromWorker>(data, |frame| {
        // The reader of a worker's output finds commits by their kind byte alone.
        let mut bytes = Vec::new();
        frame.encode(&mut bytes);
        assert_eq!(frame.is_commit(), frame_kind(&bytes) == COMMIT_KIND);
        // Its output for clients reads the same as a frame of its own.
        if let FromWorker::Client(client) = frame {
            assert_eq!(ToClient::decode(&bytes), Ok(Some((client.clone(), bytes.len()))));
        }
    });
    read_all::<ToClient>(data, |_| {});
    read_all::<ToTask>(data, |_| {});
    read_all::<FromTask>(data, |_| {});
    read_all::<ToManager>(data, |_| {});
    read_all::<FromManager>(data, |_| {});
    read_all::<ToBridge>(data, |_| {});
    read_all::<FromBridge>(data, |frame| {
        // The task processes' output that travels with an outcome is read too.
        if let FromBridge::Reply(Reply { sends, .. }) = frame {
            read_all::<FromTask>(sends, |_| {});
        }
    });
    check_outcomes(data);
});

/// Reads `data` as link `M`'s reader does, checking each frame, then handing it to `more`.
fn read_all<M: Message>(data: &[u8], mut more: impl FnMut(&M::Of<'_>)) {
    let mut rest = data;
    while let Ok(Some((frame, used))) = M::decode(rest) {
        assert!(used > 4 && used <= rest.len(), "frame took {used} of {} bytes", rest.len());
        assert_eq!(frame_len(rest), Ok(Some(used)));
        let bytes = &rest[..used];
        let mut out = Vec::new();
        M::encode(&frame, &mut out);
        assert_eq!(out, bytes, "{frame:?} re-encodes differently");
        assert!(matches!(M::decode(&rest[..used - 1]), Ok(None)), "strict prefix of {frame:?}");
        more(&frame);
        rest = &rest[used..];
    }
}

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
