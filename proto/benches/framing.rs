//! Throughput of the hot path: walking a 64 KiB read buffer of DataRows, and reading a Query.

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgvigil_proto::frame::messages;
use pgvigil_proto::frontend::Query;
use pgvigil_proto::{encode, next_message, DEFAULT_MAX_MESSAGE_SIZE};

/// The size of a typical socket read buffer.
const BUFFER_SIZE: usize = 64 * 1024;

/// A buffer of whole DataRow messages (3 columns: an int4, a short text, a NULL), up to 64 KiB.
fn data_rows() -> BytesMut {
    let mut buf = BytesMut::with_capacity(BUFFER_SIZE);
    let mut row = BytesMut::new();
    encode::message(&mut row, b'D', |b| {
        b.put_u16(3);
        b.put_i32(4);
        b.put_u32(42);
        b.put_i32(11);
        b.put_slice(b"hello world");
        b.put_i32(-1);
    });
    while buf.len() + row.len() <= BUFFER_SIZE {
        buf.put_slice(&row);
    }
    buf
}

fn iterate_data_rows(c: &mut Criterion) {
    let buf = data_rows();
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Bytes(buf.len() as u64));
    group.bench_function("messages_64k_data_rows", |b| {
        b.iter(|| {
            let mut it = messages(black_box(&buf), DEFAULT_MAX_MESSAGE_SIZE);
            let count = it.by_ref().filter(Result::is_ok).count();
            black_box((count, it.consumed()))
        })
    });
    group.finish();
}

fn parse_query(c: &mut Criterion) {
    let mut buf = BytesMut::new();
    encode::query(
        &mut buf,
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    );
    let mut group = c.benchmark_group("views");
    group.throughput(Throughput::Bytes(buf.len() as u64));
    group.bench_function("frame_and_parse_query", |b| {
        b.iter(|| {
            let message = next_message(black_box(&buf), DEFAULT_MAX_MESSAGE_SIZE);
            message
                .ok()
                .flatten()
                .and_then(|m| Query::parse(m.body).ok())
                .map(|q| q.sql.len())
        })
    });
    group.finish();
}

criterion_group!(benches, iterate_data_rows, parse_query);
criterion_main!(benches);
