//! The pure pieces on every job's path: line framing in the master, request parsing in the
//! worker, the IPC envelope every hop encodes and decodes, and a durable consumer's reading of
//! an XREADGROUP reply of packs.
//!
//! `cargo bench --bench hot_path`

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use taskd::durable::hot::parse_jobs;
use taskd::durable::pack::Pack;
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

/// A RESP bulk string.
fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// An XREADGROUP reply of `packs` entries of the stream of packs, `per` jobs each, as a
/// bridge writes them (`--durable-pack`).
fn packs_reply(stream: &str, packs: usize, per: u64) -> Vec<u8> {
    let mut reply = b"*1\r\n*2\r\n".to_vec();
    bulk(&mut reply, stream.as_bytes());
    reply.extend_from_slice(format!("*{packs}\r\n").as_bytes());
    let mut task_id = 1;
    for p in 0..packs {
        let mut pack = Pack::new();
        for _ in 0..per {
            pack.push(
                "bench",
                task_id,
                1 + task_id % 8,
                0,
                b"",
                format!("user{task_id}@example.com").as_bytes(),
            );
            task_id += 1;
        }
        reply.extend_from_slice(b"*2\r\n");
        bulk(&mut reply, format!("1700000000000-{p}").as_bytes());
        reply.extend_from_slice(b"*4\r\n");
        bulk(&mut reply, b"n");
        bulk(&mut reply, per.to_string().as_bytes());
        bulk(&mut reply, b"p");
        bulk(&mut reply, pack.bytes());
    }
    reply
}

fn durable(c: &mut Criterion) {
    let stream = "{taskd}:jobs!p";
    let reply = packs_reply(stream, 8, 64);
    let names: Vec<Arc<str>> = vec![Arc::from("{taskd}:jobs"), Arc::from(stream)];
    let mut g = c.benchmark_group("durable");
    g.throughput(Throughput::Elements(8 * 64));
    g.bench_function("a reply of 8 packs of 64 jobs into jobs", |b| {
        b.iter(|| match parse_jobs(black_box(&reply), &names) {
            Ok(Some((Ok(jobs), _))) => jobs.len(),
            _ => panic!("the reply is whole"),
        })
    });
    g.finish();
}

criterion_group!(benches, framing, parsing, envelope, durable);
criterion_main!(benches);
