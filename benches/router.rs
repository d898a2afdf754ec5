//! Router micro-benchmarks: the relay core in memory, per routed message and per fan-out
//! member (no sockets: bytes in, queued frames out, queues drained as a socket would).
//!
//! `cargo bench --bench router`

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use imrelay::proto::{Flags, Frame, MessageId, RoomId, UserId};
use imrelay::relay::{Config, Relay};
use imrelay::ConnId;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn open(relay: &mut Relay, user: u64, now: Instant) -> ConnId {
    let id = relay.handle_open(now, LOCAL).unwrap();
    let login = Frame::login(MessageId(1), UserId(user), b"").to_bytes();
    relay.handle_input(id, &login, now);
    id
}

fn drain(relay: &mut Relay) -> usize {
    let mut written = 0;
    while let Some(id) = relay.poll_transmit() {
        let n = relay.output(id).map_or(0, |q| q.len_bytes());
        relay.handle_written(id, n);
        written += n;
    }
    written
}

fn router(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("router");

    const BATCH: usize = 64;
    let mut relay = Relay::new(Config::default(), now, 0, 1);
    let alice = open(&mut relay, 1, now);
    let _bob = open(&mut relay, 2, now);
    drain(&mut relay);
    let send = Frame::send(MessageId(9), UserId(2), Bytes::from(vec![1u8; 64]))
        .with_flags(Flags::NO_ACK)
        .to_bytes();
    let mut input = BytesMut::new();
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("SEND routed and drained, 64 per read", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                input.extend_from_slice(&send);
            }
            relay.handle_read(alice, &mut input, now);
            drain(&mut relay)
        })
    });

    const MEMBERS: u64 = 1000;
    let config = Config {
        room_send_rate: 0,
        room_total_rate: 0,
        ..Config::default()
    };
    let mut relay = Relay::new(config, now, 0, 1);
    let room = RoomId(42);
    let join = Frame::join(MessageId(2), room).to_bytes();
    let mut ids = Vec::new();
    for user in 1..=MEMBERS + 1 {
        let id = open(&mut relay, user, now);
        relay.handle_input(id, &join, now);
        ids.push(id);
    }
    drain(&mut relay);
    let room_send = Frame::room_send(MessageId(3), room, Bytes::from(vec![1u8; 64]))
        .with_flags(Flags::NO_ACK)
        .to_bytes();
    group.throughput(Throughput::Elements(MEMBERS));
    group.bench_function("ROOM_SEND to 1000 members, per member", |b| {
        b.iter(|| {
            input.extend_from_slice(&room_send);
            relay.handle_read(ids[0], &mut input, now);
            drain(&mut relay)
        })
    });
    group.finish();
}

criterion_group!(benches, router);
criterion_main!(benches);
