//! One client's websocket, from the welcome to the goodbye.
//!
//! The protocol is the original sample's, so its page and clients keep working: the
//! server greets with `Welcome! There are N connections`, answers `ping` with `pong`,
//! and tells every client `server shutting down soon` when ECS refuses protection.
//!
//! The rest keeps a server with thousands of clients healthy behind an ALB:
//! - The ALB cuts a websocket that carries nothing for 60 s, and a peer that vanished
//!   without a FIN looks connected forever, so the server pings every
//!   `ping_interval` and drops a client that misses two pongs.
//! - Writes never block reads: outgoing messages wait in a small per-connection queue
//!   that is flushed while reading goes on. A client that stops reading fills it and
//!   is dropped, instead of growing its queue without limit.
//! - An oversized message is answered with close code 1009, as RFC 6455 asks.
//!
//! [`serve`] is generic over the socket (any `Sink` + `Stream` of messages), so the
//! protocol is tested with channels, no network needed.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, close_code};
use futures_util::{Sink, Stream, StreamExt};
use tokio::sync::broadcast;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::sync::CancellationToken;

/// What a client sends to check the connection.
pub const PING: &str = "ping";
/// The answer to [`PING`].
pub const PONG: &str = "pong";
/// Sent to every client at shutdown, before close code 1001 (Going Away).
pub const SHUTTING_DOWN: &str = "server shutting down";
/// Sent to every client when ECS refuses protection: the task is probably about to be
/// replaced.
pub const SHUTTING_DOWN_SOON: &str = "server shutting down soon";

/// The greeting a client gets on connect, as the original sample worded it.
#[must_use]
pub fn welcome(connections: usize) -> String {
    format!("Welcome! There are {connections} connections")
}

/// How each connection behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// Time between the server's pings.
    pub ping_interval: Duration,
    /// Most messages waiting to be written to one client before it is dropped as a
    /// slow reader.
    pub outbound_queue: usize,
    /// How long a closing handshake may take.
    pub close_timeout: Duration,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(25),
            outbound_queue: 32,
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ended {
    /// The client closed: a close frame, or the end of the stream.
    ClientClosed,
    /// The connection failed, e.g. a TCP reset.
    Broken(String),
    /// The client missed two pongs.
    Silent,
    /// The client did not read what it was sent.
    SlowReader,
    /// The client broke the protocol; it was sent this close code (1009 for a message
    /// too big).
    Refused(u16),
    /// The server is shutting down; the client was sent close code 1001.
    ShuttingDown,
}

/// A socket error, as far as the protocol cares.
pub trait SocketError: fmt::Display {
    /// The close code that answers this read error, when the client still deserves
    /// one: 1009 for a message too big, 1007 for text that is not UTF-8, 1002 for a
    /// protocol violation. `None` when the connection is simply gone.
    fn close_code(&self) -> Option<u16>;
}

impl SocketError for axum::Error {
    fn close_code(&self) -> Option<u16> {
        use tungstenite::error::{Error, ProtocolError};
        let mut source = std::error::Error::source(self);
        while let Some(error) = source {
            if let Some(ws) = error.downcast_ref::<Error>() {
                return match ws {
                    Error::Capacity(_) => Some(close_code::SIZE),
                    Error::Utf8(_) => Some(close_code::INVALID),
                    Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
                    Error::Protocol(_) => Some(close_code::PROTOCOL),
                    _ => None,
                };
            }
            source = error.source();
        }
        None
    }
}

/// Serves one client until it leaves, is dropped, or the server shuts down.
///
/// `connections` is the count to welcome it with; `notices` carries messages for every
/// client; `shutdown` starts the goodbye.
pub async fn serve<S, E>(
    socket: S,
    connections: usize,
    notices: broadcast::Receiver<Utf8Bytes>,
    shutdown: CancellationToken,
    settings: ConnectionSettings,
) -> Ended
where
    S: Stream<Item = Result<Message, E>> + Sink<Message, Error = E> + Unpin,
    E: SocketError,
{
    let mut link = Link {
        socket,
        queue: VecDeque::new(),
        unflushed: false,
        limit: settings.outbound_queue.max(2),
    };
    let mut notices = BroadcastStream::new(notices);
    let mut cancelled = pin!(shutdown.cancelled());
    let mut pings = tokio::time::interval_at(
        Instant::now() + settings.ping_interval,
        settings.ping_interval,
    );
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut unanswered: u8 = 0;
    // Set once a goodbye has started: the reason, and when to stop waiting for it.
    let mut closing: Option<(Ended, Instant)> = None;

    link.push(Message::Text(welcome(connections).into()));
    loop {
        let deadline = closing.as_ref().map(|(_, at)| *at);
        tokio::select! {
            biased;
            () = &mut cancelled, if closing.is_none() => {
                link.push(Message::Text(SHUTTING_DOWN.into()));
                link.push(close(close_code::AWAY, SHUTTING_DOWN));
                closing = Some((Ended::ShuttingDown, Instant::now() + settings.close_timeout));
            }
            () = sleep_until(deadline) => {
                return closing.map_or(Ended::ClientClosed, |(why, _)| why);
            }
            event = link.next_event() => match event {
                Event::Received(Some(Ok(message))) => match message {
                    Message::Text(text) => {
                        if text.as_str() == PING {
                            link.push(Message::Text(PONG.into()));
                        }
                        tracing::debug!("received: {}", excerpt(text.as_str()));
                    }
                    Message::Binary(data) => {
                        tracing::debug!(bytes = data.len(), "received a binary message");
                    }
                    Message::Pong(_) => unanswered = 0,
                    // tungstenite answers pings, and answers a close frame with its
                    // own; reading on until the stream ends sends that answer.
                    Message::Ping(_) => {}
                    Message::Close(_) => {
                        if closing.is_none() {
                            closing = Some((Ended::ClientClosed, Instant::now() + settings.close_timeout));
                        }
                    }
                },
                Event::Received(Some(Err(error))) => {
                    let Some(code) = error.close_code() else {
                        return closing.map_or_else(|| Ended::Broken(error.to_string()), |(why, _)| why);
                    };
                    tracing::debug!(code, "closing a websocket that broke the protocol: {error}");
                    // The rest of the offending frame is still unread, so nothing more
                    // can be read: say why, then hang up.
                    if closing.is_none() {
                        link.push(close(code, &error.to_string()));
                        let _ = tokio::time::timeout(settings.close_timeout, link.flush()).await;
                    }
                    return closing.map_or(Ended::Refused(code), |(why, _)| why);
                }
                Event::Received(None) => return closing.map_or(Ended::ClientClosed, |(why, _)| why),
                Event::WriteFailed(error) => {
                    return closing.map_or_else(|| Ended::Broken(error.to_string()), |(why, _)| why);
                }
            },
            Some(notice) = notices.next(), if closing.is_none() => {
                // A subscriber that lagged skips what it missed.
                if let Ok(text) = notice {
                    link.push(Message::Text(text));
                }
            }
            _ = pings.tick(), if closing.is_none() => {
                if unanswered >= 2 {
                    return Ended::Silent;
                }
                unanswered += 1;
                link.push(Message::Ping(Default::default()));
            }
        }
        if link.overflowed() {
            return Ended::SlowReader;
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
        code,
        reason: Utf8Bytes::from(&reason[..end]),
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum Event<E> {
    Received(Option<Result<Message, E>>),
    WriteFailed(E),
}

/// The socket and its bounded outbound queue.
struct Link<S> {
    socket: S,
    queue: VecDeque<Message>,
    /// Messages handed to the socket but not yet flushed.
    unflushed: bool,
    limit: usize,
}

impl<S, E> Link<S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message, Error = E> + Unpin,
{
    fn push(&mut self, message: Message) {
        // One past the limit marks the overflow; the connection is dropped right after.
        if self.queue.len() <= self.limit {
            self.queue.push_back(message);
        }
    }

    fn overflowed(&self) -> bool {
        self.queue.len() > self.limit
    }

    /// Moves queued messages into the socket and flushes them; ready once all are out.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        while !self.queue.is_empty() {
            ready!(Pin::new(&mut self.socket).poll_ready(cx))?;
            if let Some(message) = self.queue.pop_front() {
                Pin::new(&mut self.socket).start_send(message)?;
                self.unflushed = true;
            }
        }
        if self.unflushed {
            ready!(Pin::new(&mut self.socket).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what is queued while waiting for the next message from the client.
    ///
    /// Cancel-safe: all progress lives in `self`, so `select!` may drop it freely.
    async fn next_event(&mut self) -> Event<E> {
        poll_fn(|cx| {
            if let Poll::Ready(Err(error)) = self.poll_write(cx) {
                return Poll::Ready(Event::WriteFailed(error));
            }
            Pin::new(&mut self.socket)
                .poll_next(cx)
                .map(Event::Received)
        })
        .await
    }

    async fn flush(&mut self) -> Result<(), E> {
        poll_fn(|cx| self.poll_write(cx)).await
    }
}
