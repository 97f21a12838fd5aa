//! What one client may make the server hold, spend, and for how long.
//!
//! A connection's idle cost is about 2 KB; these limits keep a hostile or careless
//! client from making it much more, or from costing the task much CPU:
//! - a message larger than [`Limits::max_message_bytes`] is refused with 1009 as
//!   soon as a frame header announces it, before any of that frame's payload is
//!   read ([`super::metered`]);
//! - more than [`Limits::max_frames_per_second`] frames, of any type, or more than
//!   [`Limits::max_bytes_per_second`] bytes of payload in one second is closed with
//!   1008: one client sending 1-byte frames nonstop would otherwise cost a core;
//! - a message left unfinished is closed with 1008 once it has stayed unfinished
//!   for a whole heartbeat;
//! - more than [`MAX_CLIENT_PINGS_PER_SECOND`] pings in a second is closed with 1008
//!   at the header of the one too many: tungstenite answers each ping with a pong
//!   outside the server's bounded queue;
//! - a client that has not taken its replies for [`SLOW_READER_AFTER`] is closed as
//!   a slow reader; until then it is read more slowly, not dropped: the server stops
//!   reading from it while its replies wait, and TCP pushes back on it. The kernel
//!   send buffer and tungstenite's write buffer are kept small
//!   ([`SEND_BUFFER_BYTES`], [`MAX_WRITE_BUFFER_BYTES`]);
//! - optionally, a connection older than [`Limits::max_lifetime`] is told to
//!   reconnect, so no client holds the task's protection forever.

use std::time::Duration;

/// Most pings a client may send within one second before it is closed with 1008.
pub const MAX_CLIENT_PINGS_PER_SECOND: u8 = 10;
/// A client that has not taken its replies for this long is closed as a slow reader.
/// A client that reads, however late, is only read more slowly meanwhile.
pub const SLOW_READER_AFTER: Duration = Duration::from_secs(30);
/// Once a connection is closing, how long a stalled write may take before the
/// connection is dropped: a client that does not read will not read the goodbye.
/// Also how long a refused client's last bytes are read and thrown away, so that its
/// close frame is not overtaken by a reset.
pub const CLOSING_WRITE_AFTER: Duration = Duration::from_secs(2);
/// The most bytes thrown away after refusing a client, while waiting for it to close:
/// the rest of a message over the limit, typically. A client that sends more is hung
/// up on, its close frame long since written.
pub const LINGER_BYTES: usize = 64 * 1024;
/// The kernel send buffer asked for each connection (Linux doubles it, and counts
/// it against the task's memory). Left alone, loopback and fast links let it grow
/// to megabytes for a client that never reads; the server's messages are a few
/// dozen bytes each.
pub const SEND_BUFFER_BYTES: usize = 4 * 1024;
/// The most bytes tungstenite may hold unsent for one client; the server's own
/// messages are a few dozen bytes, a pong at most 127.
pub const MAX_WRITE_BUFFER_BYTES: usize = 4 * 1024;

/// Per-connection limits that come from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest message (and frame) accepted; larger ones get 1009.
    pub max_message_bytes: usize,
    /// After this long a client is told to reconnect; `None`: never.
    pub max_lifetime: Option<Duration>,
    /// Most frames of any type a client may send within one second.
    pub max_frames_per_second: u32,
    /// Most payload bytes a client may send within one second.
    pub max_bytes_per_second: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024,
            max_lifetime: None,
            max_frames_per_second: 1_000,
            max_bytes_per_second: 1024 * 1024,
        }
    }
}

/// Limits that cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// The largest message would be over the budget of bytes a second by itself.
    #[error(
        "MAX_BYTES_PER_SECOND={bytes_per_second} is below MAX_MESSAGE_BYTES={max_message}: \
         the largest message would be refused as a flood"
    )]
    BudgetBelowMessage {
        /// `MAX_BYTES_PER_SECOND`.
        bytes_per_second: u64,
        /// `MAX_MESSAGE_BYTES`.
        max_message: usize,
    },
    /// A limit of zero would refuse every client.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

impl Limits {
    /// Checks that the limits admit a client that keeps to them.
    ///
    /// # Errors
    /// When a limit is zero, or the byte budget is below the largest message.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.max_message_bytes == 0 {
            return Err(LimitsError::Zero("MAX_MESSAGE_BYTES"));
        }
        if self.max_frames_per_second == 0 {
            return Err(LimitsError::Zero("MAX_FRAMES_PER_SECOND"));
        }
        if self.max_bytes_per_second < self.max_message_bytes as u64 {
            return Err(LimitsError::BudgetBelowMessage {
                bytes_per_second: self.max_bytes_per_second,
                max_message: self.max_message_bytes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_budget_holds_the_largest_message() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let limits = Limits {
            max_message_bytes: 4096,
            max_bytes_per_second: 4095,
            ..Limits::default()
        };
        assert!(matches!(
            limits.validate(),
            Err(LimitsError::BudgetBelowMessage { .. })
        ));
        let limits = Limits {
            max_frames_per_second: 0,
            ..Limits::default()
        };
        assert_eq!(
            limits.validate(),
            Err(LimitsError::Zero("MAX_FRAMES_PER_SECOND"))
        );
    }
}
