//! One client's websocket, from the welcome to the goodbye.
//!
//! The protocol is the original sample's, so its page and clients keep working: the
//! server greets with `Welcome! There are N connections`, answers `ping` with `pong`,
//! and tells every client `server shutting down soon` when ECS refuses protection.
//!
//! The rest keeps a server with thousands of clients healthy behind an ALB:
//! - The ALB cuts a websocket that carries nothing for 60 s, and a peer that vanished
//!   without a FIN looks connected forever, so the server pings on every
//!   [`Notice::Heartbeat`] and drops a client that misses two pongs.
//! - A client is read only while its replies have room in a small queue: a client
//!   that reads slowly is read slowly (TCP pushes back on it), and one that has not
//!   taken its replies for [`limits::SLOW_READER_AFTER`] is closed as a slow reader.
//! - A message over the size limit is answered with close code 1009, a flood with
//!   1008, as RFC 6455 asks; what one client may make the server hold is bounded in
//!   [`limits`], and followed on the wire by [`metered`].
//! - Notices (the heartbeat, the goodbye) come before reading, so a client that
//!   sends nonstop still hears them at once. The goodbye comes in turns
//!   ([`turn`]), so that the clients reconnect to other tasks in a steady stream.
//!
//! An idle connection must cost little memory (10,000 of them per task is the
//! default limit), so a connection owns no timer of its own: one heartbeat and the
//! shutdown reach every connection through the same broadcast channel.
//!
//! [`serve`] is generic over the socket (any `Sink` + `Stream` of messages), so the
//! protocol is tested with channels, no network needed.

pub mod limits;
mod link;
pub mod metered;
pub mod scanner;
pub mod turn;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use futures_util::{Sink, Stream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use self::limits::Limits;
use self::link::Link;
use self::turn::Pacer;
use crate::metrics::MessageCounters;

/// What a client sends to check the connection.
pub const PING: &str = "ping";
/// The answer to [`PING`].
pub const PONG: &str = "pong";
/// Sent to every client at shutdown, before close code 1001 (Going Away).
pub const SHUTTING_DOWN: &str = "server shutting down";
/// Sent to every client when ECS refuses protection: the task is probably about to be
/// replaced.
pub const SHUTTING_DOWN_SOON: &str = "server shutting down soon";
/// Sent to a client whose connection has lived `MAX_CONNECTION_LIFETIME_SECONDS`,
/// before close code 1001: it reconnects, and may land on another task.
pub const RECONNECT: &str = "please reconnect";
/// The close reason of a client closed as a slow reader.
pub const SLOW_READER: &str = "too slow to read: replies untaken for 30 s";
/// Replies waiting to be written to one client, at most: while this many wait, the
/// client is not read. A client that reads gets each answer long before this many
/// pile up.
pub const OUTBOUND_QUEUE: usize = 32;

/// The close codes the server sends (RFC 6455, section 7.4.1).
pub mod close_code {
    /// 1001: the server is going away; reconnect.
    pub const AWAY: u16 = 1001;
    /// 1002: the client broke the protocol.
    pub const PROTOCOL: u16 = 1002;
    /// 1007: a text message that is not UTF-8.
    pub const INVALID: u16 = 1007;
    /// 1008: the client broke a rule of this server (a flood, an unfinished message,
    /// too slow to read).
    pub const POLICY: u16 = 1008;
    /// 1009: a message over the size limit.
    pub const SIZE: u16 = 1009;
}

/// The greeting a client gets on connect, as the original sample worded it.
#[must_use]
pub fn welcome(connections: u32) -> String {
    format!("Welcome! There are {connections} connections")
}

/// What the server tells every connection at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Send this text to the client.
    Say(tungstenite::Utf8Bytes),
    /// Time to ping: a client that missed the two previous pings is dropped.
    Heartbeat,
    /// Say goodbye: `server shutting down`, then close with 1001.
    ShuttingDown,
    /// The task is leaving its service: `please reconnect`, then close with 1001, so
    /// the client reconnects, through the load balancer, to a task that stays.
    Leave,
    /// The pacer's notice, in this connection's turn.
    Paced(Arc<Pacer>),
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ended {
    /// The client closed: a close frame, or the end of the stream.
    ClientClosed,
    /// The connection failed, e.g. a TCP reset.
    Broken,
    /// The client missed two pongs, or never answered a close.
    Silent,
    /// The client did not take its replies for [`limits::SLOW_READER_AFTER`].
    SlowReader,
    /// The client broke the protocol or a limit; it was sent this close code (1009
    /// for a message too big, 1008 for a message left unfinished).
    Refused(u16),
    /// The client sent more frames, bytes or pings in a second than its budget; it
    /// was sent 1008.
    Flooded,
    /// The server is shutting down; the client was sent close code 1001.
    ShuttingDown,
    /// The connection reached its maximum lifetime; the client was told to reconnect.
    Expired,
    /// The task is leaving its service; the client was told to reconnect.
    Left,
}

/// A socket error, as far as the protocol cares.
pub trait SocketError: fmt::Display {
    /// The close code that answers this read error, when the client still deserves
    /// one: 1009 for a message too big, 1008 for a flood, 1007 for text that is not
    /// UTF-8, 1002 for a protocol violation. `None` when the connection is simply
    /// gone.
    fn close_code(&self) -> Option<u16>;

    /// The close frame's reason for it.
    fn close_reason(&self) -> String {
        self.to_string()
    }

    /// True when the client sent more than its budget a second allows.
    fn is_flood(&self) -> bool {
        false
    }
}

impl SocketError for tungstenite::Error {
    fn close_code(&self) -> Option<u16> {
        use tungstenite::error::{Error, ProtocolError};
        match self {
            Error::Capacity(_) => Some(close_code::SIZE),
            Error::Io(io) => metered::refusal(io).map(|r| r.close_code()),
            Error::Utf8(_) => Some(close_code::INVALID),
            Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
            Error::Protocol(_) => Some(close_code::PROTOCOL),
            _ => None,
        }
    }

    fn close_reason(&self) -> String {
        match self {
            Self::Io(io) => metered::refusal(io).map_or_else(|| io.to_string(), |r| r.to_string()),
            other => other.to_string(),
        }
    }

    fn is_flood(&self) -> bool {
        matches!(self, Self::Io(io) if metered::refusal(io).is_some_and(|r| r.is_flood()))
    }
}

/// What a socket saw on the wire that its messages do not show.
pub trait Wire {
    /// The current unfinished stretch (a frame cut short, or a fragmented message
    /// whose last fragment has not come), numbered so that one lasting across two
    /// heartbeats can be told from two short ones; `None` when every message is
    /// complete.
    fn unfinished(&self) -> Option<u32>;
}

impl<T> Wire for tokio_tungstenite::WebSocketStream<metered::Metered<T>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn unfinished(&self) -> Option<u32> {
        self.get_ref().unfinished()
    }
}

/// What a client is told as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// The count to welcome it with.
    pub connections: u32,
    /// ECS has refused protection: it also hears `server shutting down soon`.
    pub refused: bool,
}

/// Serves one client until it leaves, is dropped, or the server shuts down.
///
/// `greeting` says what to tell it first; `notices` carries the heartbeat, the
/// shutdown and messages for every client; `shutdown` is checked in case a notice
/// was missed; `messages` counts the text and binary messages each way.
///
/// An idle connection is mostly this future, so it is an `async` block rather than
/// an `async fn`: the latter would store its arguments twice.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
pub fn serve<'a, S, E>(
    socket: &'a mut S,
    greeting: Greeting,
    notices: &'a mut broadcast::Receiver<Notice>,
    shutdown: &'a CancellationToken,
    limits: &'a Limits,
    messages: &'a MessageCounters,
) -> impl Future<Output = Ended> + 'a
where
    S: Stream<Item = Result<Message, E>> + Sink<Message, Error = E> + Wire + Unpin,
    E: SocketError,
{
    async move {
        // The socket is borrowed, not moved: a future keeps its arguments for its whole
        // life, so a moved copy would cost every idle connection the socket's size twice.
        let mut link = Link {
            socket,
            head: None,
            queue: std::collections::VecDeque::new(),
            unflushed: false,
            reading: true,
            unanswered: 0,
            closing: None,
            stall: None,
            turn: None,
            messages,
            unfinished_seen: None,
            expires: limits
                .max_lifetime
                .map(|lifetime| Instant::now() + lifetime),
        };
        link.push(Message::Text(welcome(greeting.connections).into()));
        if greeting.refused {
            link.push(Message::Text(SHUTTING_DOWN_SOON.into()));
        }
        if shutdown.is_cancelled() {
            link.on_notice(Notice::ShuttingDown);
        }
        let mut listening = true;
        loop {
            tokio::select! {
                // Notices first: a client that sends nonstop would otherwise delay its own
                // heartbeat and goodbye.
                biased;
                notice = notices.recv(), if listening => {
                    let notice = match notice {
                        Ok(notice) => notice,
                        // A connection that lagged behind skips what it missed, but never
                        // the shutdown.
                        Err(RecvError::Lagged(_)) if shutdown.is_cancelled() => Notice::ShuttingDown,
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => {
                            listening = false;
                            continue;
                        }
                    };
                    if let Some(ended) = link.on_notice(notice) {
                        return ended;
                    }
                }
                event = link.next_event() => {
                    if let Some(ended) = link.on_event(event) {
                        return ended;
                    }
                }
            }
        }
    }
}

fn close(code: u16, reason: &str) -> Message {
    // A close reason is limited to 123 bytes: the control frame's 125 less the code.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason[..end].into(),
    }))
}

fn excerpt(text: &str) -> &str {
    const MAX: usize = 200;
    let mut end = text.len().min(MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
