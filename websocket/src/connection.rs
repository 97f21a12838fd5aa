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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use axum::extract::ws::{Message, Utf8Bytes, close_code};
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
        notices: broadcast::Sender<Utf8Bytes>,
        shutdown: CancellationToken,
        server: JoinHandle<Ended>,
    }

    const INTERVAL: Duration = Duration::from_secs(25);

    fn start(outgoing_capacity: usize) -> Client {
        let (to_server, incoming) = mpsc::channel(64);
        let (outgoing, from_server) = mpsc::channel(outgoing_capacity);
        let (notices, _) = broadcast::channel(4);
        let shutdown = CancellationToken::new();
        let socket = FakeSocket {
            incoming,
            outgoing: PollSender::new(outgoing),
        };
        let settings = ConnectionSettings {
            ping_interval: INTERVAL,
            outbound_queue: 4,
            close_timeout: Duration::from_secs(5),
        };
        let server = tokio::spawn(serve(
            socket,
            7,
            notices.subscribe(),
            shutdown.clone(),
            settings,
        ));
        Client {
            to_server,
            from_server,
            notices,
            shutdown,
            server,
        }
    }

    impl Client {
        async fn send(&self, message: Message) {
            self.to_server.send(Ok(message)).await.unwrap();
        }
        async fn recv(&mut self) -> Message {
            tokio::time::timeout(Duration::from_secs(1), self.from_server.recv())
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
        async fn ended(self) -> Ended {
            tokio::time::timeout(Duration::from_secs(120), self.server)
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

    #[tokio::test(start_paused = true)]
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
        drop(client.to_server);
        let ended = tokio::time::timeout(Duration::from_secs(1), client.server).await;
        assert_eq!(ended.unwrap().unwrap(), Ended::ClientClosed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped_after_two_missed_pongs() {
        let mut client = start(16);
        client.recv_text().await;
        let started = Instant::now();
        assert!(matches!(
            client.recv_after(INTERVAL).await,
            Message::Ping(_)
        ));
        assert!(matches!(
            client.recv_after(INTERVAL).await,
            Message::Ping(_)
        ));
        let to_server = client.to_server.clone();
        assert_eq!(client.ended().await, Ended::Silent);
        assert_eq!(started.elapsed(), INTERVAL * 3);
        drop(to_server);
    }

    impl Client {
        async fn recv_after(&mut self, wait: Duration) -> Message {
            tokio::time::timeout(wait + Duration::from_millis(1), self.from_server.recv())
                .await
                .expect("a message from the server")
                .expect("the server is still writing")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_pings_stays() {
        let mut client = start(16);
        client.recv_text().await;
        for _ in 0..10 {
            assert!(matches!(
                client.recv_after(INTERVAL).await,
                Message::Ping(_)
            ));
            client.send(Message::Pong(Default::default())).await;
        }
        assert!(!client.server.is_finished());
    }

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
    async fn a_broken_connection_ends_at_once() {
        let mut client = start(16);
        client.recv_text().await;
        client.to_server.send(Err(FakeError(None))).await.unwrap();
        assert!(matches!(client.ended().await, Ended::Broken(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_says_goodbye_with_1001_and_waits_for_the_close_reply() {
        let mut client = start(16);
        client.recv_text().await;
        client.shutdown.cancel();
        assert_eq!(client.recv_text().await, SHUTTING_DOWN);
        assert_eq!(close_code_of(&client.recv().await), Some(close_code::AWAY));
        assert!(!client.server.is_finished());
        client.send(Message::Close(None)).await;
        drop(client.to_server);
        let ended = tokio::time::timeout(Duration::from_secs(1), client.server).await;
        assert_eq!(ended.unwrap().unwrap(), Ended::ShuttingDown);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_gives_up_on_a_client_that_never_answers() {
        let mut client = start(16);
        client.recv_text().await;
        client.shutdown.cancel();
        client.recv_text().await;
        client.recv().await;
        let to_server = client.to_server.clone();
        assert_eq!(client.ended().await, Ended::ShuttingDown);
        drop(to_server);
    }

    #[tokio::test(start_paused = true)]
    async fn notices_reach_the_client() {
        let mut client = start(16);
        client.recv_text().await;
        client.notices.send(SHUTTING_DOWN_SOON.into()).unwrap();
        assert_eq!(client.recv_text().await, SHUTTING_DOWN_SOON);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_is_dropped() {
        // Room for the welcome only; the client never reads.
        let client = start(1);
        for _ in 0..10 {
            if client.server.is_finished() {
                break;
            }
            let _ = client
                .to_server
                .send(Ok(Message::Text("ping".into())))
                .await;
        }
        let keep = (client.from_server, client.to_server.clone());
        let ended = tokio::time::timeout(Duration::from_secs(1), client.server).await;
        assert_eq!(ended.unwrap().unwrap(), Ended::SlowReader);
        drop(keep);
    }
}
