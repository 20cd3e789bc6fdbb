//! The pure pieces on every job's path: line framing in the master, request parsing in the
//! worker, and the IPC envelope every hop encodes and decodes.
//!
//! `cargo bench --bench hot_path`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use taskd::ipc::envelope::Finish;
use taskd::ipc::{FromWorker, ToWorker};
use taskd::mail::request;
use taskd::protocol::next_line;

fn framing(c: &mut Criterion) {
    let lines: Vec<u8> = (0..64).flat_map(|i| format!("user{i}@example.com\n").into_bytes()).collect();
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Elements(64));
    g.bench_function("64 lines in one read", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut n = 0;
            while let Ok(Some((line, used))) = next_line(&lines[pos..], 2 * 1024 * 1024) {
                n += line.len();
                pos += used;
            }
            black_box(n)
        })
    });
    g.finish();
}

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.bench_function("bare email", |b| b.iter(|| request::parse(black_box(b"alice@example.com"))));
    g.bench_function("json email", |b| {
        let line = br#"{"type":"email","to":"alice@example.com","subject":"hello","body":"a short body"}"#;
        b.iter(|| request::parse(black_box(line)))
    });
    g.finish();
}

fn envelope(c: &mut Criterion) {
    let data = br#"{"type":"email","to":"alice@example.com"}"#;
    let mut g = c.benchmark_group("envelope");
    g.bench_function("encode task", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            FromWorker::Task {
                task_id: 42,
                session: 7 << 24,
                target: -1,
                group: 0,
                flags: 0,
                context: b"{}",
                data,
            }
            .encode(&mut out);
            black_box(out.len())
        })
    });
    let mut buf = Vec::new();
    ToWorker::Finish(Finish {
        seq: 1,
        task_id: 42,
        session: 7,
        task_pid: 1234,
        attempts: 1,
        ok: true,
        flags: 0,
        context: br#"{"type":"email","to":["alice@example.com"]}"#,
        result: b"Email:alice@example.com, sent",
    })
    .encode(&mut buf);
    g.bench_function("decode finish", |b| {
        b.iter(|| ToWorker::decode(black_box(&buf)).map(|f| f.map(|(_, n)| n)))
    });
    g.finish();
}

criterion_group!(benches, framing, parsing, envelope);
criterion_main!(benches);
