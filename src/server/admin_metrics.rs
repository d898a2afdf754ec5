//! What the admin listener reports, and how: the plain-data [`Snapshot`] the event loop
//! copies out of its own counters when asked, the fixed-bucket [`LatencyHistogram`] the
//! loop and the store writer record into without locks, and the mapping of a snapshot to
//! the Prometheus text exposition format (version 0.0.4) through `prometheus-client`.
//!
//! The mapping runs on the admin thread, never on the event loop: a snapshot is a copy,
//! and encoding it costs the loop nothing. Every metric is named `imrelay_*` with its unit
//! in the name (`_seconds`, `_bytes`, and `_total` for counters); the list is
//! [`METRIC_NAMES`].

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::proto::{ErrorCode, Opcode};
use crate::relay::{Codec, Metrics, OpcodeCounts};

/// Upper bounds of the latency histograms' buckets, in nanoseconds: 10 us to 10 s, about
/// three per decade (a loop turn is tens of microseconds; an fsync is milliseconds).
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram with fixed buckets ([`LATENCY_BOUNDS_NS`]): recording is a
/// binary search over 19 bounds and two additions, with no lock and no allocation. The
/// thread that records owns it; others get copies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// `counts[i]`: observations in `(bound[i-1], bound[i]]`; the last slot: over the
    /// largest bound.
    counts: [u64; LATENCY_BOUNDS_NS.len() + 1],
    /// Sum of the observations, in nanoseconds (saturating).
    sum_ns: u64,
}

impl LatencyHistogram {
    /// Counts one observation.
    #[inline]
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.counts[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of the observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }

    /// (upper bound in seconds, observations in that bucket alone) for every finite
    /// bound; what is over the largest bound is only in [`LatencyHistogram::count`].
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BOUNDS_NS
            .iter()
            .zip(self.counts.iter())
            .map(|(&bound, &n)| (bound as f64 / 1e9, n))
            .collect()
    }
}

/// The durable store's part of a [`Snapshot`].
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreSnapshot {
    /// Bytes in the log.
    pub log_bytes: u64,
    /// Time of each group commit (write and fdatasync), as the writer thread measured it.
    pub commit_latency: LatencyHistogram,
}

/// The event loop's counters and gauges at one loop turn: plain data, copied out of the
/// loop in answer to a request from the admin thread.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The core's counters.
    pub metrics: Metrics,
    /// The listener takes connections (false once shutting down).
    pub accepting: bool,
    /// Open connections by codec, in the order of [`Codec::ALL`].
    pub connections_by_codec: [usize; Codec::ALL.len()],
    /// Users with at least one logged-in connection.
    pub users_online: usize,
    /// Rooms with at least one member.
    pub rooms: usize,
    /// Room memberships over all rooms.
    pub room_members: usize,
    /// Bytes the output queues hold, as the caps count them.
    pub output_queued_bytes: usize,
    /// Bytes all connections hold (output queues, partial input, TLS records).
    pub connection_memory_bytes: usize,
    /// The budget of `connection_memory_bytes` (`--max-memory`).
    pub connection_memory_limit_bytes: usize,
    /// Stored messages held, over all inboxes.
    pub stored_messages: usize,
    /// Bytes of the stored messages' frames.
    pub stored_bytes: usize,
    /// Users with an inbox.
    pub inbox_users: usize,
    /// The durable store (None: memory only).
    pub store: Option<StoreSnapshot>,
    /// Why the store failed (a write failed; stored SENDs are refused until a restart).
    pub store_failure: Option<String>,
    /// Cluster mode: why the link to Redis is down (None: up, or not a cluster node).
    pub cluster_down: Option<String>,
    /// Cluster mode: whether the link to Redis is up (None: not a cluster node).
    pub cluster_up: Option<bool>,
    /// Time of each event loop turn, from the poller's return to the next poll.
    pub loop_turn: LatencyHistogram,
}

/// The names of every metric `/metrics` may show (histograms by their base name; a store
/// metric only with a durable store).
pub const METRIC_NAMES: &[&str] = &[
    "imrelay_up",
    "imrelay_accepting",
    "imrelay_store_failed",
    "imrelay_connections",
    "imrelay_connections_accepted_total",
    "imrelay_connections_refused_total",
    "imrelay_connections_closed_total",
    "imrelay_logins_total",
    "imrelay_auth_failures_total",
    "imrelay_token_refreshes_total",
    "imrelay_tokens_expired_total",
    "imrelay_frames_received_total",
    "imrelay_frames_received_bytes_total",
    "imrelay_frames_sent_total",
    "imrelay_frames_sent_bytes_total",
    "imrelay_received_bytes_total",
    "imrelay_sent_bytes_total",
    "imrelay_lost_on_reset_bytes_total",
    "imrelay_errors_sent_total",
    "imrelay_messages_routed_total",
    "imrelay_deliveries_total",
    "imrelay_duplicates_dropped_total",
    "imrelay_room_messages_total",
    "imrelay_room_deliveries_total",
    "imrelay_room_deliveries_dropped_total",
    "imrelay_cluster_link_up",
    "imrelay_cluster_messages_published_total",
    "imrelay_cluster_messages_received_total",
    "imrelay_cluster_deliveries_dropped_total",
    "imrelay_cluster_messages_refused_total",
    "imrelay_read_pauses_total",
    "imrelay_websocket_sessions_total",
    "imrelay_http_served_total",
    "imrelay_http_refused_total",
    "imrelay_users_online",
    "imrelay_rooms",
    "imrelay_room_members",
    "imrelay_output_queued_bytes",
    "imrelay_connection_memory_bytes",
    "imrelay_connection_memory_limit_bytes",
    "imrelay_messages_stored_total",
    "imrelay_stored_messages",
    "imrelay_stored_bytes",
    "imrelay_inbox_users",
    "imrelay_store_log_bytes",
    "imrelay_loop_turn_seconds",
    "imrelay_store_commit_seconds",
];

/// The Content-Type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// `snapshot` in the Prometheus text exposition format (version 0.0.4).
pub fn encode(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("imrelay");
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// A snapshot as a `prometheus-client` collector: a registry with the `imrelay` prefix
/// encodes it once.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// Writes one metric after another into a collector's encoder.
struct Out<'a, 'b> {
    encoder: &'b mut DescriptorEncoder<'a>,
}

impl Out<'_, '_> {
    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>, v: u64) -> Fmt {
        let counter = ConstCounter::new(v);
        let m = self
            .encoder
            .encode_descriptor(name, help, unit.as_ref(), counter.metric_type())?;
        counter.encode(m)
    }

    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>, v: u64) -> Fmt {
        let gauge = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let m = self
            .encoder
            .encode_descriptor(name, help, unit.as_ref(), gauge.metric_type())?;
        gauge.encode(m)
    }

    /// A counter with one label, one series per `(value, count)`.
    fn counters_by(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        label: &'static str,
        series: &[(&str, u64)],
    ) -> Fmt {
        let mut m =
            self.encoder
                .encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        for &(value, v) in series {
            let labels = [(label, value)];
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn histogram(&mut self, name: &str, help: &str, h: &LatencyHistogram) -> Fmt {
        let mut m = self.encoder.encode_descriptor(
            name,
            help,
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_seconds(),
            h.count(),
            &h.buckets(),
            None,
        )
    }
}

type Fmt = Result<(), std::fmt::Error>;

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Fmt {
        let s = &self.0;
        let m = &s.metrics;
        let mut out = Out {
            encoder: &mut encoder,
        };
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let bytes = || Some(Unit::Bytes);

        out.gauge("up", "1: the event loop answered this scrape.", None, 1)?;
        out.gauge(
            "accepting",
            "1 while the relay accepts connections, 0 once it is shutting down.",
            None,
            u64::from(s.accepting),
        )?;
        out.gauge(
            "store_failed",
            "1 once a store write failed: stored SENDs are refused until a restart.",
            None,
            u64::from(s.store_failure.is_some()),
        )?;

        // Connections.
        let mut m_open = out.encoder.encode_descriptor(
            "connections",
            "Open connections (closing ones included), by codec.",
            None,
            MetricType::Gauge,
        )?;
        for (codec, &n) in Codec::ALL.iter().zip(s.connections_by_codec.iter()) {
            let labels = [("codec", codec.name())];
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(m_open.encode_family(&labels)?)?;
        }
        out.counter(
            "connections_accepted",
            "Connections accepted into a session.",
            None,
            m.connections_opened,
        )?;
        let r = &m.refused;
        out.counters_by(
            "connections_refused",
            "Connections refused, by reason.",
            None,
            "reason",
            &[
                ("shutting_down", r.shutting_down),
                ("connection_limit", r.connection_limit),
                ("per_address_limit", r.per_address_limit),
                ("out_of_descriptors", r.out_of_descriptors),
            ],
        )?;
        out.counter(
            "connections_closed",
            "Sessions closed, for any reason.",
            None,
            m.connections_closed,
        )?;

        // Logins and tokens.
        out.counter("logins", "Successful LOGINs.", None, m.logins)?;
        out.counter(
            "auth_failures",
            "LOGIN and REFRESH tokens refused.",
            None,
            m.auth_failures,
        )?;
        out.counter(
            "token_refreshes",
            "REFRESH frames accepted.",
            None,
            m.refreshes,
        )?;
        out.counter(
            "tokens_expired",
            "Connections closed because their token expired unrefreshed.",
            None,
            m.tokens_expired,
        )?;

        // Traffic.
        out.counters_by(
            "frames_received",
            "Frames (and text lines) decoded from clients, by opcode.",
            None,
            "opcode",
            &by_opcode(&m.frames_in_by_opcode),
        )?;
        out.counters_by(
            "frames_received",
            "Bytes of the frames (and text lines) decoded from clients, by opcode.",
            bytes(),
            "opcode",
            &by_opcode(&m.bytes_in_by_opcode),
        )?;
        out.counters_by(
            "frames_sent",
            "Frames queued to connections, by opcode (text and WebSocket by the frame they render).",
            None,
            "opcode",
            &by_opcode(&m.frames_out_by_opcode),
        )?;
        out.counters_by(
            "frames_sent",
            "Bytes of the frames queued to connections, by opcode (as binary frames).",
            bytes(),
            "opcode",
            &by_opcode(&m.bytes_out_by_opcode),
        )?;
        out.counter(
            "received",
            "Bytes of frames decoded from clients.",
            bytes(),
            m.bytes_in,
        )?;
        out.counter("sent", "Bytes written to sockets.", bytes(), m.bytes_out)?;
        out.counter(
            "lost_on_reset",
            "Bytes still queued when a connection died.",
            bytes(),
            m.bytes_lost_on_reset,
        )?;
        let errors: Vec<(&str, u64)> = ErrorCode::ALL
            .iter()
            .map(|&code| (code.name(), m.errors(code)))
            .collect();
        out.counters_by(
            "errors_sent",
            "ERROR frames sent, by code.",
            None,
            "code",
            &errors,
        )?;
        out.counter(
            "messages_routed",
            "SENDs queued to at least one recipient connection.",
            None,
            m.messages_routed,
        )?;
        out.counter(
            "deliveries",
            "DELIVER frames queued (one per recipient connection).",
            None,
            m.deliveries_queued,
        )?;
        out.counter(
            "duplicates_dropped",
            "DEDUP SENDs answered from memory instead of delivered again.",
            None,
            m.duplicates_dropped,
        )?;
        out.counter(
            "read_pauses",
            "Times a connection's reads were paused because its own output queue was full.",
            None,
            m.read_pauses,
        )?;
        out.counter(
            "websocket_sessions",
            "Connections upgraded to WebSocket.",
            None,
            m.websocket_sessions,
        )?;
        out.counter(
            "http_served",
            "Demo files served over plain HTTP.",
            None,
            m.http_served,
        )?;
        out.counter(
            "http_refused",
            "HTTP requests on the client port answered with an error status.",
            None,
            m.http_refused,
        )?;

        // Users and rooms.
        out.gauge(
            "users_online",
            "Users with at least one logged-in connection.",
            None,
            count(s.users_online),
        )?;
        out.gauge(
            "rooms",
            "Rooms with at least one member.",
            None,
            count(s.rooms),
        )?;
        out.gauge(
            "room_members",
            "Room memberships over all rooms.",
            None,
            count(s.room_members),
        )?;
        out.counter(
            "room_messages",
            "ROOM_SEND and BROADCAST frames fanned out.",
            None,
            m.room_messages,
        )?;
        out.counter(
            "room_deliveries",
            "ROOM_DELIVER frames queued (one per member connection): the fan-out.",
            None,
            m.room_deliveries_queued,
        )?;
        out.counter(
            "room_deliveries_dropped",
            "ROOM_DELIVER frames dropped because the member's queue was past the room cap.",
            None,
            m.room_deliveries_dropped,
        )?;

        // Cluster mode.
        if let Some(up) = s.cluster_up {
            out.gauge(
                "cluster_link_up",
                "1 while the link to the cluster's Redis is up.",
                None,
                u64::from(up),
            )?;
            out.counter(
                "cluster_messages_published",
                "Messages (SEND, ROOM_SEND, BROADCAST) published to the other nodes.",
                None,
                m.cluster_messages_out,
            )?;
            out.counter(
                "cluster_messages_received",
                "Messages from other nodes delivered to this node's connections.",
                None,
                m.cluster_messages_in,
            )?;
            out.counter(
                "cluster_deliveries_dropped",
                "DELIVERs from other nodes dropped for a connection past its output cap.",
                None,
                m.cluster_deliveries_dropped,
            )?;
            out.counter(
                "cluster_messages_refused",
                "Messages from Redis that were not well-formed (ignored).",
                None,
                m.cluster_messages_refused,
            )?;
        }

        // Memory.
        out.gauge(
            "output_queued",
            "Bytes the output queues hold, as the output caps count them.",
            bytes(),
            count(s.output_queued_bytes),
        )?;
        out.gauge(
            "connection_memory",
            "Bytes all connections hold: output queues, partial input, TLS records.",
            bytes(),
            count(s.connection_memory_bytes),
        )?;
        out.gauge(
            "connection_memory_limit",
            "The budget of the connection memory (--max-memory).",
            bytes(),
            count(s.connection_memory_limit_bytes),
        )?;

        // Stored messages.
        out.counter(
            "messages_stored",
            "Stored SENDs put into an inbox.",
            None,
            m.messages_stored,
        )?;
        out.gauge(
            "stored_messages",
            "Stored messages held, over all inboxes.",
            None,
            count(s.stored_messages),
        )?;
        out.gauge(
            "stored",
            "Bytes of the stored messages' frames.",
            bytes(),
            count(s.stored_bytes),
        )?;
        out.gauge(
            "inbox_users",
            "Users with an inbox.",
            None,
            count(s.inbox_users),
        )?;

        // Latency.
        out.histogram(
            "loop_turn",
            "Time of each event loop turn, from the poller's return to the next poll.",
            &s.loop_turn,
        )?;
        if let Some(store) = &s.store {
            out.gauge(
                "store_log",
                "Bytes in the store's log.",
                bytes(),
                store.log_bytes,
            )?;
            out.histogram(
                "store_commit",
                "Time of each group commit of the store (write and fdatasync).",
                &store.commit_latency,
            )?;
        }
        Ok(())
    }
}

/// Counts by opcode: every opcode protocol v1 defines, by its protocol.md name, then
/// every undefined opcode byte together as `unknown`.
fn by_opcode(counts: &OpcodeCounts) -> Vec<(&'static str, u64)> {
    let mut unknown = 0;
    let mut series = Vec::new();
    for byte in 0..=u8::MAX {
        match Opcode::from_u8(byte) {
            Some(op) => series.push((op.name(), counts.get(byte))),
            None => unknown += counts.get(byte),
        }
    }
    series.push(("unknown", unknown));
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds() {
        let mut h = LatencyHistogram::default();
        h.record(Duration::from_micros(10)); // on the first bound: its bucket
        h.record(Duration::from_micros(11));
        h.record(Duration::from_secs(60)); // over every bound
        let buckets = h.buckets();
        assert_eq!(buckets[0], (1e-5, 1));
        assert_eq!(buckets[1], (2.5e-5, 1));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 2);
        assert_eq!(h.count(), 3);
        assert!((h.sum_seconds() - 60.000021).abs() < 1e-9);
    }

    #[test]
    fn a_snapshot_encodes_as_prometheus_text() {
        let mut s = Snapshot {
            accepting: true,
            connections_by_codec: [0, 2, 1, 0, 0],
            ..Snapshot::default()
        };
        s.metrics.logins = 3;
        s.metrics.frames_in_by_opcode.count(Opcode::Send as u8);
        s.metrics.frames_in_by_opcode.count(0xee);
        s.metrics.count_out(&imrelay_frame(Opcode::Deliver, 40), 3);
        s.metrics.count_error(ErrorCode::LimitReached);
        s.loop_turn.record(Duration::from_millis(2));
        let text = encode(s).unwrap();
        for line in [
            "# TYPE imrelay_logins_total counter",
            "imrelay_logins_total 3",
            "imrelay_connections{codec=\"binary\"} 2",
            "imrelay_frames_received_total{opcode=\"SEND\"} 1",
            "imrelay_frames_received_total{opcode=\"unknown\"} 1",
            "imrelay_frames_sent_total{opcode=\"DELIVER\"} 3",
            "imrelay_frames_sent_bytes_total{opcode=\"DELIVER\"} 120",
            "imrelay_errors_sent_total{code=\"LIMIT_REACHED\"} 1",
            "imrelay_loop_turn_seconds_bucket{le=\"0.001\"} 0",
            "imrelay_loop_turn_seconds_bucket{le=\"0.0025\"} 1",
            "imrelay_loop_turn_seconds_bucket{le=\"+Inf\"} 1",
            "imrelay_loop_turn_seconds_count 1",
            "imrelay_accepting 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("store_commit"), "no store, no store metrics");
        assert!(
            !text.contains("cluster"),
            "not a cluster node, no cluster metrics"
        );
        let clustered = Snapshot {
            cluster_up: Some(true),
            ..Snapshot::default()
        };
        let text = encode(clustered).unwrap();
        assert!(
            text.lines().any(|l| l == "imrelay_cluster_link_up 1"),
            "{text}"
        );
        // Every family is one the docs list.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line["# TYPE ".len()..].split(' ').next().unwrap();
            assert!(
                METRIC_NAMES.contains(&name),
                "{name} is not in METRIC_NAMES"
            );
        }
    }

    /// An encoded frame of `opcode`, `len` bytes long.
    fn imrelay_frame(opcode: Opcode, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[..4].copy_from_slice(&(len as u32).to_be_bytes());
        f[4] = crate::proto::VERSION;
        f[5] = opcode as u8;
        f
    }
}
