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
//! - Writes never block reads: outgoing messages wait in a small per-connection queue
//!   that is flushed while reading goes on. A client that stops reading fills it and
//!   is dropped, instead of growing its queue without limit.
//! - An oversized message is answered with close code 1009, as RFC 6455 asks; what
//!   else one client may make the server hold is bounded in [`limits`].
//! - Notices (the heartbeat, the goodbye) come before reading, so a client that
//!   sends nonstop still hears them at once.
//!
//! An idle connection must cost little memory (10,000 of them per task is the
//! default limit), so a connection owns no timer of its own: one heartbeat and the
//! shutdown reach every connection through the same broadcast channel.
//!
//! [`serve`] is generic over the socket (any `Sink` + `Stream` of messages), so the
//! protocol is tested with channels, no network needed.

pub mod limits;
mod link;

use std::collections::VecDeque;
use std::fmt;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, close_code};
use futures_util::{Sink, Stream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::limits::{Limits, MessageTooBig, Meter, PingRate};
use self::link::Link;
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
/// Most messages waiting to be written to one client before it is dropped as a slow
/// reader. A client that reads gets each answer long before this many pile up.
pub const OUTBOUND_QUEUE: usize = 32;

/// The greeting a client gets on connect, as the original sample worded it.
#[must_use]
pub fn welcome(connections: usize) -> String {
    format!("Welcome! There are {connections} connections")
}

/// What the server tells every connection at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Send this text to the client.
    Say(Utf8Bytes),
    /// Time to ping: a client that missed the two previous pings is dropped.
    Heartbeat,
    /// Say goodbye: `server shutting down`, then close with 1001.
    ShuttingDown,
    /// The task is leaving its service: `please reconnect`, then close with 1001, so
    /// the client reconnects, through the load balancer, to a task that stays.
    Leave,
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
    /// The client did not read what it was sent.
    SlowReader,
    /// The client broke the protocol; it was sent this close code (1009 for a message
    /// too big).
    Refused(u16),
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
                    Error::Io(io) if io.get_ref().is_some_and(|e| e.is::<MessageTooBig>()) => {
                        Some(close_code::SIZE)
                    }
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

/// What a client is told as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// The count to welcome it with.
    pub connections: usize,
    /// ECS has refused protection: it also hears `server shutting down soon`.
    pub refused: bool,
}

/// Serves one client until it leaves, is dropped, or the server shuts down.
///
/// `greeting` says what to tell it first; `notices` carries the heartbeat, the
/// shutdown and messages for every client; `shutdown` is checked in case a notice
/// was missed; `meter` shows what the client's socket carries; `messages` counts the
/// text and binary messages each way.
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
    meter: &'a Meter,
    messages: &'a MessageCounters,
) -> impl Future<Output = Ended> + 'a
where
    S: Stream<Item = Result<Message, E>> + Sink<Message, Error = E> + Unpin,
    E: SocketError,
{
    async move {
        // The socket is borrowed, not moved: a future keeps its arguments for its whole
        // life, so a moved copy would cost every idle connection the socket's size twice.
        let mut link = Link {
            socket,
            head: None,
            queue: VecDeque::new(),
            unflushed: false,
            reading: true,
            unanswered: 0,
            closing: None,
            stall: None,
            pings: PingRate::new(),
            meter,
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
            if link.overflowed() {
                return Ended::SlowReader;
            }
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use axum::extract::ws::{Message, close_code};
    use futures_util::{Sink, Stream};
    use tokio::sync::{broadcast, mpsc};
    use tokio::task::JoinHandle;
    use tokio_util::sync::{CancellationToken, PollSendError, PollSender};

    use super::*;

    #[derive(Debug)]
    struct FakeError(Option<u16>);

    impl fmt::Display for FakeError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "fake error {:?}", self.0)
        }
    }

    impl SocketError for FakeError {
        fn close_code(&self) -> Option<u16> {
            self.0
        }
    }

    /// A socket made of two channels: what the client sends, what the server writes.
    struct FakeSocket {
        incoming: mpsc::Receiver<Result<Message, FakeError>>,
        outgoing: PollSender<Message>,
    }

    impl Stream for FakeSocket {
        type Item = Result<Message, FakeError>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.incoming.poll_recv(cx)
        }
    }

    fn gone(_: PollSendError<Message>) -> FakeError {
        FakeError(None)
    }

    impl Sink<Message> for FakeSocket {
        type Error = FakeError;
        fn poll_ready(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), FakeError>> {
            self.outgoing.poll_reserve(cx).map_err(gone)
        }
        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), FakeError> {
            self.outgoing.send_item(item).map_err(gone)
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), FakeError>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), FakeError>> {
            self.outgoing.close();
            Poll::Ready(Ok(()))
        }
    }

    struct Client {
        to_server: mpsc::Sender<Result<Message, FakeError>>,
        from_server: mpsc::Receiver<Message>,
        notices: broadcast::Sender<Notice>,
        shutdown: CancellationToken,
        server: JoinHandle<Ended>,
        meter: Arc<Meter>,
    }

    const WAIT: Duration = Duration::from_secs(1);

    fn start(outgoing_capacity: usize) -> Client {
        let greeting = Greeting {
            connections: 7,
            refused: false,
        };
        start_greeted(outgoing_capacity, greeting)
    }

    fn start_greeted(outgoing_capacity: usize, greeting: Greeting) -> Client {
        start_limited(outgoing_capacity, greeting, Limits::default())
    }

    fn start_limited(outgoing_capacity: usize, greeting: Greeting, limits: Limits) -> Client {
        let (to_server, incoming) = mpsc::channel(64);
        let (outgoing, from_server) = mpsc::channel(outgoing_capacity);
        let (notices, _) = broadcast::channel(4);
        let shutdown = CancellationToken::new();
        let socket = FakeSocket {
            incoming,
            outgoing: PollSender::new(outgoing),
        };
        let (mut rx, token) = (notices.subscribe(), shutdown.clone());
        let meter = Arc::new(Meter::default());
        let seen = Arc::clone(&meter);
        let server = tokio::spawn(async move {
            let mut socket = socket;
            serve(
                &mut socket,
                greeting,
                &mut rx,
                &token,
                &limits,
                &seen,
                &MessageCounters::noop(),
            )
            .await
        });
        Client {
            to_server,
            from_server,
            notices,
            shutdown,
            server,
            meter,
        }
    }

    impl Client {
        async fn send(&self, message: Message) {
            self.to_server.send(Ok(message)).await.unwrap();
        }

        fn notify(&self, notice: Notice) {
            self.notices.send(notice).unwrap();
        }

        async fn recv(&mut self) -> Message {
            tokio::time::timeout(WAIT, self.from_server.recv())
                .await
                .expect("a message from the server")
                .expect("the server is still writing")
        }

        async fn recv_text(&mut self) -> String {
            match self.recv().await {
                Message::Text(t) => t.as_str().to_owned(),
                other => panic!("expected text, got {other:?}"),
            }
        }

        /// How the connection ended; the client keeps its end open meanwhile.
        async fn ended(&mut self) -> Ended {
            tokio::time::timeout(WAIT, &mut self.server)
                .await
                .expect("the connection ends")
                .unwrap()
        }
    }

    fn close_code_of(message: &Message) -> Option<u16> {
        match message {
            Message::Close(Some(frame)) => Some(frame.code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn welcomes_with_the_count_and_answers_ping_with_pong() {
        let mut client = start(16);
        assert_eq!(client.recv_text().await, "Welcome! There are 7 connections");
        client.send(Message::Text("ping".into())).await;
        assert_eq!(client.recv_text().await, "pong");
        client.send(Message::Text("hello".into())).await;
        client.send(Message::Text("ping".into())).await;
        assert_eq!(
            client.recv_text().await,
            "pong",
            "other text gets no answer"
        );
        client.send(Message::Close(None)).await;
        assert!(!client.server.is_finished(), "waits for the stream to end");
        let (closed, _) = mpsc::channel(1);
        client.to_server = closed;
        assert_eq!(client.ended().await, Ended::ClientClosed);
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_at_the_third_heartbeat_without_a_pong() {
        let mut client = start(16);
        client.recv_text().await;
        client.notify(Notice::Heartbeat);
        assert!(matches!(client.recv().await, Message::Ping(_)));
        client.notify(Notice::Heartbeat);
        assert!(matches!(client.recv().await, Message::Ping(_)));
        assert!(!client.server.is_finished());
        client.notify(Notice::Heartbeat);
        assert_eq!(client.ended().await, Ended::Silent);
    }

    #[tokio::test]
    async fn a_client_that_answers_pings_stays() {
        let mut client = start(16);
        client.recv_text().await;
        for _ in 0..10 {
            client.notify(Notice::Heartbeat);
            assert!(matches!(client.recv().await, Message::Ping(_)));
            client.send(Message::Pong(axum::body::Bytes::new())).await;
        }
        client.send(Message::Text("ping".into())).await;
        assert_eq!(client.recv_text().await, "pong");
        assert!(!client.server.is_finished());
    }

    #[tokio::test]
    async fn an_oversized_message_is_answered_with_1009() {
        let mut client = start(16);
        client.recv_text().await;
        client
            .to_server
            .send(Err(FakeError(Some(close_code::SIZE))))
            .await
            .unwrap();
        assert_eq!(close_code_of(&client.recv().await), Some(close_code::SIZE));
        assert_eq!(client.ended().await, Ended::Refused(close_code::SIZE));
    }

    #[tokio::test]
    async fn a_broken_connection_ends_at_once() {
        let mut client = start(16);
        client.recv_text().await;
        client.to_server.send(Err(FakeError(None))).await.unwrap();
        assert_eq!(client.ended().await, Ended::Broken);
    }

    #[tokio::test]
    async fn shutdown_says_goodbye_with_1001_and_waits_for_the_close_reply() {
        let mut client = start(16);
        client.recv_text().await;
        client.shutdown.cancel();
        client.notify(Notice::ShuttingDown);
        assert_eq!(client.recv_text().await, SHUTTING_DOWN);
        assert_eq!(close_code_of(&client.recv().await), Some(close_code::AWAY));
        assert!(!client.server.is_finished());
        client.send(Message::Close(None)).await;
        let (closed, _) = mpsc::channel(1);
        client.to_server = closed;
        assert_eq!(client.ended().await, Ended::ShuttingDown);
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_a_client_that_never_answers_within_two_heartbeats() {
        let mut client = start(16);
        client.recv_text().await;
        client.notify(Notice::ShuttingDown);
        client.recv_text().await;
        client.recv().await;
        client.notify(Notice::Heartbeat);
        client.notify(Notice::Heartbeat);
        assert_eq!(client.ended().await, Ended::ShuttingDown);
    }

    #[tokio::test]
    async fn a_client_arriving_after_a_refusal_hears_it_after_the_welcome() {
        let greeting = Greeting {
            connections: 2,
            refused: true,
        };
        let mut client = start_greeted(16, greeting);
        assert_eq!(client.recv_text().await, "Welcome! There are 2 connections");
        assert_eq!(client.recv_text().await, SHUTTING_DOWN_SOON);
        client.send(Message::Text("ping".into())).await;
        assert_eq!(client.recv_text().await, "pong");
    }

    #[tokio::test]
    async fn a_client_arriving_after_shutdown_is_told_to_leave() {
        let (to_server, incoming) = mpsc::channel(1);
        let (outgoing, mut from_server) = mpsc::channel(4);
        let (notices, _) = broadcast::channel(4);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let socket = FakeSocket {
            incoming,
            outgoing: PollSender::new(outgoing),
        };
        let mut rx = notices.subscribe();
        let server = tokio::spawn(async move {
            let mut socket = socket;
            let greeting = Greeting {
                connections: 1,
                refused: false,
            };
            serve(
                &mut socket,
                greeting,
                &mut rx,
                &shutdown,
                &Limits::default(),
                &Meter::default(),
                &MessageCounters::noop(),
            )
            .await
        });
        assert!(matches!(from_server.recv().await, Some(Message::Text(_))));
        assert!(
            matches!(from_server.recv().await, Some(Message::Text(t)) if t.as_str() == SHUTTING_DOWN)
        );
        assert_eq!(
            close_code_of(&from_server.recv().await.unwrap()),
            Some(close_code::AWAY)
        );
        drop(to_server);
        assert_eq!(server.await.unwrap(), Ended::ShuttingDown);
    }

    #[tokio::test]
    async fn notices_reach_the_client() {
        let mut client = start(16);
        client.recv_text().await;
        client.notify(Notice::Say(SHUTTING_DOWN_SOON.into()));
        assert_eq!(client.recv_text().await, SHUTTING_DOWN_SOON);
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_dropped() {
        // Room for the welcome only; the client never reads.
        let mut client = start(1);
        for _ in 0..=OUTBOUND_QUEUE + 1 {
            if client.server.is_finished() {
                break;
            }
            let _ = client
                .to_server
                .send(Ok(Message::Text("ping".into())))
                .await;
        }
        assert_eq!(client.ended().await, Ended::SlowReader);
    }

    const GREETING: Greeting = Greeting {
        connections: 1,
        refused: false,
    };

    #[tokio::test]
    async fn a_ping_flood_is_closed_with_1008() {
        let mut client = start(64);
        client.recv_text().await;
        for _ in 0..=limits::MAX_CLIENT_PINGS_PER_SECOND {
            client.send(Message::Ping(axum::body::Bytes::new())).await;
        }
        assert_eq!(
            close_code_of(&client.recv().await),
            Some(close_code::POLICY)
        );
        assert_eq!(client.ended().await, Ended::Refused(close_code::POLICY));
    }

    #[tokio::test]
    async fn a_message_unfinished_at_two_heartbeats_is_closed_with_1008() {
        let mut client = start(64);
        client.recv_text().await;
        client.meter.set_unfinished(Some(1));
        client.notify(Notice::Heartbeat);
        assert!(matches!(client.recv().await, Message::Ping(_)));
        client.send(Message::Pong(axum::body::Bytes::new())).await;
        // Finished, then a new stretch: not the same unfinished message.
        client.meter.set_unfinished(Some(2));
        client.notify(Notice::Heartbeat);
        assert!(matches!(client.recv().await, Message::Ping(_)));
        client.send(Message::Pong(axum::body::Bytes::new())).await;
        client.notify(Notice::Heartbeat);
        assert_eq!(
            close_code_of(&client.recv().await),
            Some(close_code::POLICY)
        );
        assert_eq!(client.ended().await, Ended::Refused(close_code::POLICY));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_past_its_lifetime_is_told_to_reconnect() {
        let limits = Limits {
            max_lifetime: Some(Duration::from_secs(60)),
            ..Limits::default()
        };
        let mut client = start_limited(16, GREETING, limits);
        client.recv_text().await;
        client.notify(Notice::Heartbeat);
        assert!(matches!(client.recv().await, Message::Ping(_)));
        tokio::time::advance(Duration::from_secs(60)).await;
        client.notify(Notice::Heartbeat);
        assert_eq!(client.recv_text().await, RECONNECT);
        assert_eq!(close_code_of(&client.recv().await), Some(close_code::AWAY));
        client.send(Message::Close(None)).await;
        let (closed, _) = mpsc::channel(1);
        client.to_server = closed;
        assert_eq!(client.ended().await, Ended::Expired);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_stalled_for_the_allowance_drops_a_slow_reader() {
        // Room for the welcome only; the client never reads.
        let mut client = start(1);
        client.notify(Notice::Heartbeat);
        tokio::time::sleep(limits::SLOW_READER_AFTER - Duration::from_millis(10)).await;
        assert!(!client.server.is_finished());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(client.ended().await, Ended::SlowReader);
    }

    #[tokio::test]
    async fn notices_reach_a_client_that_sends_nonstop() {
        let mut client = start(1024);
        client.recv_text().await;
        // A backlog of pings the server has not read yet.
        for _ in 0..20 {
            client.send(Message::Text(PING.into())).await;
        }
        client.notify(Notice::Say(SHUTTING_DOWN_SOON.into()));
        assert_eq!(
            client.recv_text().await,
            SHUTTING_DOWN_SOON,
            "the notice comes before the answers to the backlog"
        );
        assert_eq!(client.recv_text().await, PONG);
    }
}
