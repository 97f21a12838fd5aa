//! What the server counts, through the [`metrics`] facade: whatever recorder `main`
//! installs (CloudWatch EMF, or none) receives these.
//!
//! Every metric is registered at start-up, counters at zero and the gauge at 0, so
//! every line a recorder writes holds every metric, even one that never moved.
//! Handles are taken once and shared, so the hot path (a message in or out) is one
//! atomic add with no lookup by name.

use metrics::{Counter, Gauge, counter, gauge};

use crate::connection::Ended;

/// Clients connected now (gauge).
pub const CONNECTIONS: &str = "Connections";
/// Websockets established.
pub const OPENED: &str = "ConnectionsOpened";
/// Clients turned away at `MAX_CONNECTIONS` or `MAX_CONNECTIONS_PER_ADDRESS`.
pub const REFUSED: &str = "ConnectionsRefused";
/// The client closed, or its connection broke.
pub const CLOSED_BY_CLIENT: &str = "ConnectionsClosedByClient";
/// The client missed two pings, or never answered a close.
pub const CLOSED_PING_TIMEOUT: &str = "ConnectionsClosedPingTimeout";
/// The client did not take its replies for 30 s.
pub const CLOSED_SLOW_READER: &str = "ConnectionsClosedSlowReader";
/// The client sent a message over `MAX_MESSAGE_BYTES` (close code 1009).
pub const CLOSED_OVERSIZE: &str = "ConnectionsClosedOversize";
/// The client broke another rule: a flood of frames or bytes, a ping flood, a
/// message left unfinished, invalid UTF-8 or a protocol error (close codes 1008,
/// 1007, 1002).
pub const CLOSED_ABUSE: &str = "ConnectionsClosedAbuse";
/// The server shut down.
pub const CLOSED_SHUTDOWN: &str = "ConnectionsClosedShutdown";
/// The connection reached `MAX_CONNECTION_LIFETIME_SECONDS`.
pub const CLOSED_LIFETIME: &str = "ConnectionsClosedLifetime";
/// The task was leaving its service: the client was told to reconnect elsewhere.
pub const CLOSED_DRAIN: &str = "ConnectionsClosedDrain";
/// Text and binary messages received from clients.
pub const MESSAGES_IN: &str = "MessagesIn";
/// Text and binary messages sent to clients.
pub const MESSAGES_OUT: &str = "MessagesOut";

/// Every counter, for tests and documentation.
pub const COUNTERS: [&str; 12] = [
    OPENED,
    REFUSED,
    CLOSED_BY_CLIENT,
    CLOSED_PING_TIMEOUT,
    CLOSED_SLOW_READER,
    CLOSED_OVERSIZE,
    CLOSED_ABUSE,
    CLOSED_SHUTDOWN,
    CLOSED_LIFETIME,
    CLOSED_DRAIN,
    MESSAGES_IN,
    MESSAGES_OUT,
];

/// The counters one connection touches per message.
#[derive(Debug, Clone)]
pub struct MessageCounters {
    /// [`MESSAGES_IN`].
    pub received: Counter,
    /// [`MESSAGES_OUT`].
    pub sent: Counter,
}

impl MessageCounters {
    /// Counters that count nothing, for tests of the protocol.
    #[must_use]
    pub fn noop() -> Self {
        Self {
            received: Counter::noop(),
            sent: Counter::noop(),
        }
    }
}

/// The server's metrics, registered once.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    /// [`CONNECTIONS`].
    pub connections: Gauge,
    /// [`OPENED`].
    pub opened: Counter,
    /// [`REFUSED`].
    pub refused: Counter,
    /// Per message.
    pub messages: MessageCounters,
    closed_by_client: Counter,
    closed_ping_timeout: Counter,
    closed_slow_reader: Counter,
    closed_oversize: Counter,
    closed_abuse: Counter,
    closed_shutdown: Counter,
    closed_lifetime: Counter,
    closed_drain: Counter,
}

impl ServerMetrics {
    /// Registers every metric with the installed recorder, counters at zero and the
    /// gauge at 0. Call it after the recorder is installed: handles taken before are
    /// bound to no recorder.
    #[must_use]
    pub fn register() -> Self {
        let zero = |name: &'static str| {
            let c = counter!(name);
            c.increment(0);
            c
        };
        let connections = gauge!(CONNECTIONS);
        connections.set(0.0);
        Self {
            connections,
            opened: zero(OPENED),
            refused: zero(REFUSED),
            messages: MessageCounters {
                received: zero(MESSAGES_IN),
                sent: zero(MESSAGES_OUT),
            },
            closed_by_client: zero(CLOSED_BY_CLIENT),
            closed_ping_timeout: zero(CLOSED_PING_TIMEOUT),
            closed_slow_reader: zero(CLOSED_SLOW_READER),
            closed_oversize: zero(CLOSED_OVERSIZE),
            closed_abuse: zero(CLOSED_ABUSE),
            closed_shutdown: zero(CLOSED_SHUTDOWN),
            closed_lifetime: zero(CLOSED_LIFETIME),
            closed_drain: zero(CLOSED_DRAIN),
        }
    }

    /// Counts a websocket that ended, by why.
    pub fn closed(&self, ended: Ended) {
        let counter = match ended {
            Ended::ClientClosed | Ended::Broken => &self.closed_by_client,
            Ended::Silent => &self.closed_ping_timeout,
            Ended::SlowReader => &self.closed_slow_reader,
            Ended::Refused(crate::connection::close_code::SIZE) => &self.closed_oversize,
            Ended::Refused(_) | Ended::Flooded => &self.closed_abuse,
            Ended::ShuttingDown => &self.closed_shutdown,
            Ended::Expired => &self.closed_lifetime,
            Ended::Left => &self.closed_drain,
        };
        counter.increment(1);
    }
}
