//! The socket of one client and its bounded outbound queue.
//!
//! The queue's head lives inline, so the usual traffic (one pong, one ping at a
//! time) never allocates; only a backlog spills into the `VecDeque`. The client is
//! read only while the queue has room: a reply waits for the client to take the ones
//! before it, and meanwhile the client's own sending is held back by TCP. Nothing is
//! dropped for being slow, until the client has taken nothing for
//! [`SLOW_READER_AFTER`].
//!
//! Timers cost memory per connection, so a connection owns one only while its
//! writes are stalled or its goodbye waits for its turn; everything else is checked
//! at the shared heartbeat.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Sink, Stream};
use tokio::time::{Instant, Sleep};
use tungstenite::Message;

use super::limits::{CLOSING_WRITE_AFTER, SLOW_READER_AFTER};
use super::turn::Turn;
use super::{
    Ended, Notice, OUTBOUND_QUEUE, PING, PONG, RECONNECT, SHUTTING_DOWN, SLOW_READER, SocketError,
    Wire, close, close_code, excerpt,
};
use crate::metrics::MessageCounters;

pub(super) enum Event<E> {
    Received(Option<Result<Message, E>>),
    /// Everything queued is written, and reading has stopped.
    Flushed,
    WriteFailed(E),
    /// Writes made no progress for too long.
    Stalled,
    /// This connection's turn of a paced notice has come; `None` when it was called
    /// off meanwhile.
    Turn(Option<Notice>),
}

pub(super) struct Link<'a, S> {
    pub(super) socket: &'a mut S,
    pub(super) head: Option<Message>,
    /// The rest of the queue, after `head`; empty while `head` is `None`.
    pub(super) queue: VecDeque<Message>,
    /// Messages handed to the socket but not yet flushed, or a pong tungstenite
    /// queued by itself.
    pub(super) unflushed: bool,
    /// False once nothing more may be read.
    pub(super) reading: bool,
    /// Heartbeats without a pong; or, once closing, heartbeats since the goodbye.
    pub(super) unanswered: u8,
    /// Set once a goodbye has started: why the connection is ending.
    pub(super) closing: Option<Ended>,
    /// Running only while a write waits: when the client counts as a slow reader.
    pub(super) stall: Option<Pin<Box<Sleep>>>,
    /// Only while a paced notice waits for this connection's turn.
    pub(super) turn: Option<Pin<Box<Turn>>>,
    pub(super) messages: &'a MessageCounters,
    /// The unfinished stretch seen at the last heartbeat, if any.
    pub(super) unfinished_seen: Option<u32>,
    /// When the client is told to reconnect.
    pub(super) expires: Option<Instant>,
}

impl<S, E> Link<'_, S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message, Error = E> + Wire + Unpin,
    E: SocketError,
{
    /// Handles what the socket did; `Some` when the connection is over.
    pub(super) fn on_event(&mut self, event: Event<E>) -> Option<Ended> {
        match event {
            Event::Received(Some(Ok(message))) => {
                self.on_message(message);
                None
            }
            Event::Received(Some(Err(error))) => {
                if self.closing.is_some() {
                    return self.closing;
                }
                let Some(code) = error.close_code() else {
                    tracing::debug!("websocket broken: {error}");
                    return Some(Ended::Broken);
                };
                tracing::debug!(code, "closing a websocket that broke the protocol: {error}");
                let why = if error.is_flood() {
                    Ended::Flooded
                } else {
                    Ended::Refused(code)
                };
                self.refuse(code, &error.close_reason(), why);
                None
            }
            Event::Received(None) | Event::Flushed => {
                Some(self.closing.unwrap_or(Ended::ClientClosed))
            }
            Event::WriteFailed(error) => {
                tracing::debug!("websocket write failed: {error}");
                Some(self.closing.unwrap_or(Ended::Broken))
            }
            Event::Stalled => match self.closing {
                None => {
                    self.close_slow_reader();
                    None
                }
                Some(Ended::ShuttingDown) => Some(Ended::SlowReader),
                Some(why) => Some(why),
            },
            Event::Turn(notice) => {
                self.turn = None;
                notice.and_then(|notice| self.on_notice(notice))
            }
        }
    }

    fn on_message(&mut self, message: Message) {
        match message {
            Message::Text(text) => {
                self.messages.received.increment(1);
                if text.as_str() == PING && self.closing.is_none() {
                    self.push(Message::Text(PONG.into()));
                }
                tracing::debug!("received: {}", excerpt(text.as_str()));
            }
            Message::Binary(data) => {
                self.messages.received.increment(1);
                tracing::debug!(bytes = data.len(), "received a binary message");
            }
            Message::Pong(_) => {
                if self.closing.is_none() {
                    self.unanswered = 0;
                }
            }
            // tungstenite answers pings by itself, outside the queue: flush so that
            // a client that does not read them shows as stalled. Too many are
            // refused before they are read (the scanner's budget).
            Message::Ping(_) => self.unflushed = true,
            // tungstenite answers a close frame with its own; reading on until the
            // stream ends sends that answer.
            Message::Close(_) => self.start_closing(Ended::ClientClosed),
            // Never read: tungstenite hands over whole messages.
            Message::Frame(_) => {}
        }
    }

    /// Handles what the server tells every client; `Some` when the connection is over.
    pub(super) fn on_notice(&mut self, notice: Notice) -> Option<Ended> {
        match (notice, self.closing) {
            // A client that is behind with its replies misses what is only news.
            (Notice::Say(text), None) => {
                if self.has_room() {
                    self.push(Message::Text(text));
                }
            }
            (Notice::Heartbeat, None) => return self.on_heartbeat(),
            (Notice::Heartbeat, Some(why)) => {
                // A client that does not answer a close within two heartbeats is gone.
                self.unanswered += 1;
                if self.unanswered >= 2 {
                    return Some(why);
                }
            }
            (Notice::ShuttingDown, None) => {
                self.push(Message::Text(SHUTTING_DOWN.into()));
                self.push(close(close_code::AWAY, SHUTTING_DOWN));
                self.start_closing(Ended::ShuttingDown);
            }
            (Notice::Leave, None) => {
                self.push(Message::Text(RECONNECT.into()));
                self.push(close(close_code::AWAY, RECONNECT));
                self.start_closing(Ended::Left);
            }
            // A later pacer takes over from an earlier one.
            (Notice::Paced(pacer), None) => self.turn = Some(Box::pin(Turn::take(pacer))),
            (Notice::Say(_) | Notice::ShuttingDown | Notice::Leave | Notice::Paced(_), Some(_)) => {
            }
        }
        None
    }

    fn on_heartbeat(&mut self) -> Option<Ended> {
        if self.unanswered >= 2 {
            return Some(Ended::Silent);
        }
        // A message unfinished at two heartbeats in a row has been for a whole
        // interval.
        let unfinished = self.socket.unfinished();
        if unfinished.is_some() && unfinished == self.unfinished_seen {
            self.refuse(
                close_code::POLICY,
                "message left unfinished",
                Ended::Refused(close_code::POLICY),
            );
            return None;
        }
        self.unfinished_seen = unfinished;
        if self.expires.is_some_and(|at| Instant::now() >= at) {
            self.push(Message::Text(RECONNECT.into()));
            self.push(close(close_code::AWAY, RECONNECT));
            self.start_closing(Ended::Expired);
            return None;
        }
        self.unanswered += 1;
        self.push(Message::Ping(tungstenite::Bytes::new()));
        None
    }

    /// Closes on a client that broke a rule: the rest of what it sent cannot be
    /// trusted, so nothing more is read; it is told why, and hung up on once that is
    /// written.
    fn refuse(&mut self, code: u16, reason: &str, why: Ended) {
        if self.closing.is_some() {
            return;
        }
        tracing::debug!(code, "refusing a client: {reason}");
        self.reading = false;
        self.push(close(code, reason));
        self.start_closing(why);
    }

    /// Closes on a client that has not taken its replies for [`SLOW_READER_AFTER`]:
    /// the replies still queued are dropped and the close frame takes their place,
    /// so a client that reads again within the closing allowance learns why.
    fn close_slow_reader(&mut self) {
        tracing::debug!("closing a slow reader");
        self.head = None;
        self.queue = VecDeque::new();
        self.push(close(close_code::POLICY, SLOW_READER));
        self.start_closing(Ended::SlowReader);
    }

    pub(super) fn start_closing(&mut self, why: Ended) {
        if self.closing.is_none() {
            self.closing = Some(why);
            self.unanswered = 0;
            self.turn = None;
            // A stalled write now gets the shorter closing allowance.
            self.stall = None;
        }
    }

    pub(super) fn push(&mut self, message: Message) {
        if self.head.is_none() {
            self.head = Some(message);
        } else {
            self.queue.push_back(message);
        }
    }

    /// Whether another reply may be queued, and so another message read. Besides
    /// the replies, the queue holds at most two heartbeat pings and a goodbye.
    fn has_room(&self) -> bool {
        usize::from(self.head.is_some()) + self.queue.len() < OUTBOUND_QUEUE
    }

    /// Moves queued messages into the socket and flushes them; ready once all are out.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        while self.head.is_some() {
            ready!(Pin::new(&mut *self.socket).poll_ready(cx))?;
            if let Some(message) = self.head.take() {
                if matches!(message, Message::Text(_) | Message::Binary(_)) {
                    self.messages.sent.increment(1);
                }
                Pin::new(&mut *self.socket).start_send(message)?;
                self.unflushed = true;
            }
            self.head = self.queue.pop_front();
        }
        if self.unflushed {
            ready!(Pin::new(&mut *self.socket).poll_flush(cx))?;
            self.unflushed = false;
            if self.queue.capacity() > 0 {
                // A backlog has cleared: an idle connection keeps no queue allocated.
                self.queue = VecDeque::new();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what is queued while waiting for the next message from the client, or
    /// this connection's turn.
    ///
    /// Cancel-safe: all progress lives in `self`, so `select!` may drop it freely.
    pub(super) async fn next_event(&mut self) -> Event<E> {
        poll_fn(|cx| {
            if let Some(turn) = self.turn.as_mut()
                && let Poll::Ready(notice) = turn.as_mut().poll_due(cx)
            {
                return Poll::Ready(Event::Turn(notice));
            }
            match self.poll_write(cx) {
                Poll::Ready(Err(error)) => return Poll::Ready(Event::WriteFailed(error)),
                Poll::Ready(Ok(())) => {
                    self.stall = None;
                    if !self.reading {
                        return Poll::Ready(Event::Flushed);
                    }
                }
                Poll::Pending => {
                    let allowance = if self.closing.is_some() {
                        CLOSING_WRITE_AFTER
                    } else {
                        SLOW_READER_AFTER
                    };
                    let stall = self
                        .stall
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(allowance)));
                    if stall.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Stalled);
                    }
                }
            }
            // Read only what there is room to answer: meanwhile the client's sending
            // waits in TCP's buffers, and then in the client.
            if self.reading && self.has_room() {
                Pin::new(&mut *self.socket)
                    .poll_next(cx)
                    .map(Event::Received)
            } else {
                Poll::Pending
            }
        })
        .await
    }
}
