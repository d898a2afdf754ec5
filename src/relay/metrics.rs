//! Counters the relay keeps about itself. Plain integers: reading them costs nothing.

use crate::proto::ErrorCode;

/// Totals since start, plus a few gauges. The binary logs them periodically.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Connections accepted into a session.
    pub connections_opened: u64,
    /// Connections refused at the connection limit or during shutdown.
    pub connections_refused: u64,
    /// Sessions closed, for any reason.
    pub connections_closed: u64,
    /// Frames decoded from clients.
    pub frames_in: u64,
    /// Bytes of frames decoded from clients.
    pub bytes_in: u64,
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

impl Metrics {
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
