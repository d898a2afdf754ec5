//! Codec micro-benchmarks: decode and encode per frame (64-byte payloads).
//!
//! `cargo bench --bench codec`

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use imrelay::proto::{decode_raw, Frame, FrameReader, MessageId, UserId, DEFAULT_MAX_FRAME};

const FRAMES: usize = 1000;

fn codec(c: &mut Criterion) {
    let frame = Frame::send(MessageId(1), UserId(2), Bytes::from(vec![7u8; 64]));
    let mut stream = BytesMut::new();
    for _ in 0..FRAMES {
        frame.encode(&mut stream);
    }
    let stream = stream.freeze();

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("decode_raw 96-byte frames", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let mut n = 0;
            while let Some(f) = decode_raw(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
                n += f.len();
            }
            n
        })
    });
    // What the relay does with each read: frames read in place, headers parsed.
    group.bench_function("FrameReader 96-byte frames in place", |b| {
        let mut reader = FrameReader::default();
        b.iter(|| {
            let mut data = &stream[..];
            let mut n = 0;
            while let Some(f) = reader.next_frame(&mut data, DEFAULT_MAX_FRAME).unwrap() {
                n += f.raw().payload().len();
            }
            n
        })
    });
    group.bench_function("encode 96-byte frames", |b| {
        let mut buf = BytesMut::with_capacity(FRAMES * 96);
        b.iter(|| {
            buf.clear();
            for _ in 0..FRAMES {
                frame.encode(&mut buf);
            }
            buf.len()
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
