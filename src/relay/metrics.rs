//! Counters the relay keeps about itself. Plain integers: reading them costs nothing, and
//! the driver copies them whole into the admin listener's snapshots (`server::admin`).

use crate::proto::ErrorCode;

/// Totals since start, plus a few gauges. The binary logs them periodically.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Connections accepted into a session.
    pub connections_opened: u64,
    /// Connections refused at the connection limit or during shutdown.
    pub connections_refused: u64,
    /// Of `connections_refused`: refused by reason.
    pub refused: RefusedCounts,
    /// Sessions closed, for any reason.
    pub connections_closed: u64,
    /// Frames decoded from clients.
    pub frames_in: u64,
    /// Frames decoded from clients, by opcode byte (an unknown opcode has its slot too).
    pub frames_in_by_opcode: OpcodeCounts,
    /// Bytes of the frames decoded from clients, by opcode.
    pub bytes_in_by_opcode: OpcodeCounts,
    /// Frames queued to connections, by opcode (text lines and WebSocket messages by the
    /// frame they render).
    pub frames_out_by_opcode: OpcodeCounts,
    /// Bytes of the frames queued to connections, by opcode (as binary frames).
    pub bytes_out_by_opcode: OpcodeCounts,
    /// Bytes of frames decoded from clients.
    pub bytes_in: u64,
    /// Successful LOGINs.
    pub logins: u64,
    /// SEND frames queued to at least one recipient connection.
    pub messages_routed: u64,
    /// DELIVER frames queued (one per recipient connection).
    pub deliveries_queued: u64,
    /// Bytes handed to sockets.
    pub bytes_out: u64,
    /// Bytes still queued when a connection died (reset or error before the flush).
    pub bytes_lost_on_reset: u64,
    /// ERROR frames sent, all codes together.
    pub errors_total: u64,
    /// ERROR frames sent, by code (index = code - 1).
    pub errors_sent: [u64; ErrorCode::ALL.len()],
    /// ROOM_SEND and BROADCAST frames fanned out.
    pub room_messages: u64,
    /// ROOM_DELIVER frames queued (one per member connection).
    pub room_deliveries_queued: u64,
    /// ROOM_DELIVER frames dropped because the member's queue was past the room cap.
    pub room_deliveries_dropped: u64,
    /// Cluster mode: messages published to the other nodes.
    pub cluster_messages_out: u64,
    /// Cluster mode: messages from other nodes delivered here.
    pub cluster_messages_in: u64,
    /// Cluster mode: DELIVERs from other nodes dropped for a connection past its output cap
    /// or the memory budget (their sender was answered by its own node).
    pub cluster_deliveries_dropped: u64,
    /// Cluster mode: messages from Redis that were not well-formed (ignored).
    pub cluster_messages_refused: u64,
    /// Times a connection's reads were paused because its own output queue was full.
    pub read_pauses: u64,
    /// DEDUP SENDs answered from memory instead of delivered a second time.
    pub duplicates_dropped: u64,
    /// Stored SENDs put into an inbox.
    pub messages_stored: u64,
    /// Connections upgraded to WebSocket.
    pub websocket_sessions: u64,
    /// Demo files served over plain HTTP.
    pub http_served: u64,
    /// HTTP requests answered with an error status (400, 404, 431).
    pub http_refused: u64,
    /// LOGIN and REFRESH tokens refused.
    pub auth_failures: u64,
    /// REFRESH frames accepted.
    pub refreshes: u64,
    /// Connections closed because their token expired unrefreshed.
    pub tokens_expired: u64,
}

/// Connections refused, by reason; they add up to [`Metrics::connections_refused`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RefusedCounts {
    /// The relay was shutting down.
    pub shutting_down: u64,
    /// At the connection limit.
    pub connection_limit: u64,
    /// The peer's address had its most connections open.
    pub per_address_limit: u64,
    /// The process was out of file descriptors.
    pub out_of_descriptors: u64,
}

/// A counter per opcode byte: counting costs one array index increment (no bounds check,
/// the index is a `u8`).
#[derive(Clone, Debug)]
pub struct OpcodeCounts(pub [u64; 256]);

impl Default for OpcodeCounts {
    fn default() -> OpcodeCounts {
        OpcodeCounts([0; 256])
    }
}

impl OpcodeCounts {
    /// Counts one frame of opcode byte `opcode`.
    #[inline]
    pub fn count(&mut self, opcode: u8) {
        self.0[usize::from(opcode)] += 1;
    }

    /// Adds `n` for opcode byte `opcode`.
    #[inline]
    pub fn add(&mut self, opcode: u8, n: u64) {
        self.0[usize::from(opcode)] += n;
    }

    /// Frames counted with opcode byte `opcode`.
    pub fn get(&self, opcode: u8) -> u64 {
        self.0[usize::from(opcode)]
    }
}

impl Metrics {
    /// Counts `n` copies of `frame` queued to connections, by its opcode; text the core
    /// wrote itself (HELP, usage) is not a frame and is not counted.
    #[inline]
    pub fn count_out(&mut self, frame: &[u8], n: u64) {
        if frame.len() >= crate::proto::HEADER_LEN && frame[4] == crate::proto::VERSION {
            self.count_frames_out(frame[5], frame.len(), n);
        }
    }

    /// Counts `n` frames of opcode byte `opcode`, `len` bytes each, queued to connections.
    #[inline]
    pub fn count_frames_out(&mut self, opcode: u8, len: usize, n: u64) {
        self.frames_out_by_opcode.add(opcode, n);
        self.bytes_out_by_opcode.add(opcode, n * len as u64);
    }

    /// Counts one ERROR frame.
    pub fn count_error(&mut self, code: ErrorCode) {
        self.errors_sent[code as usize - 1] += 1;
        self.errors_total += 1;
    }

    /// ERROR frames sent with `code`.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors_sent[code as usize - 1]
    }
}
