//! The protocol of one connection, over a socket made of channels.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, Stream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, PollSendError, PollSender};
use tungstenite::{Bytes, Message};

use super::limits::{CLOSING_WRITE_AFTER, Limits, SLOW_READER_AFTER};
use super::turn::Pacer;
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

/// A socket made of two channels: what the client sends, what the server writes;
/// and what its wire shows unfinished, as the test sets it.
struct FakeSocket {
    incoming: mpsc::Receiver<Result<Message, FakeError>>,
    outgoing: PollSender<Message>,
    unfinished: Arc<Mutex<Option<u32>>>,
}

impl Wire for FakeSocket {
    fn unfinished(&self) -> Option<u32> {
        *self.unfinished.lock().unwrap()
    }
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
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FakeError>> {
        self.outgoing.poll_reserve(cx).map_err(gone)
    }
    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), FakeError> {
        self.outgoing.send_item(item).map_err(gone)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), FakeError>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), FakeError>> {
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
    unfinished: Arc<Mutex<Option<u32>>>,
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
    let unfinished = Arc::new(Mutex::new(None));
    let socket = FakeSocket {
        incoming,
        outgoing: PollSender::new(outgoing),
        unfinished: Arc::clone(&unfinished),
    };
    let (mut rx, token) = (notices.subscribe(), shutdown.clone());
    let server = tokio::spawn(async move {
        let mut socket = socket;
        serve(
            &mut socket,
            greeting,
            &mut rx,
            &token,
            &limits,
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
        unfinished,
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
        Message::Close(Some(frame)) => Some(u16::from(frame.code)),
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
        client.send(Message::Pong(Bytes::new())).await;
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
        unfinished: Arc::default(),
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

const GREETING: Greeting = Greeting {
    connections: 1,
    refused: false,
};

#[tokio::test]
async fn a_message_unfinished_at_two_heartbeats_is_closed_with_1008() {
    let mut client = start(64);
    client.recv_text().await;
    *client.unfinished.lock().unwrap() = Some(1);
    client.notify(Notice::Heartbeat);
    assert!(matches!(client.recv().await, Message::Ping(_)));
    client.send(Message::Pong(Bytes::new())).await;
    // Finished, then a new stretch: not the same unfinished message.
    *client.unfinished.lock().unwrap() = Some(2);
    client.notify(Notice::Heartbeat);
    assert!(matches!(client.recv().await, Message::Ping(_)));
    client.send(Message::Pong(Bytes::new())).await;
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

#[tokio::test]
async fn a_client_that_reads_late_is_read_late_and_gets_every_reply() {
    const PINGS: usize = 60;
    // Room for one message between the server and the client, who does not read yet.
    let mut client = start(1);
    for _ in 0..PINGS {
        client.send(Message::Text(PING.into())).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The server stopped reading once its queue was full: the rest of the pings
    // still wait on the client's side.
    assert!(!client.server.is_finished());
    assert!(
        client.to_server.capacity() < 64 - (PINGS - OUTBOUND_QUEUE - 2),
        "{} of the {PINGS} pings were read with no room for their answers",
        64 - client.to_server.capacity()
    );
    assert_eq!(client.recv_text().await, "Welcome! There are 7 connections");
    for _ in 0..PINGS {
        assert_eq!(client.recv_text().await, PONG);
    }
    assert!(!client.server.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_takes_no_reply_for_the_allowance_is_closed_as_a_slow_reader() {
    // Room for the welcome only; the client does not read.
    let mut client = start(1);
    for _ in 0..10 {
        client.send(Message::Text(PING.into())).await;
    }
    tokio::time::sleep(SLOW_READER_AFTER - Duration::from_millis(10)).await;
    assert!(!client.server.is_finished(), "closed before the allowance");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Reading now, it finds the close frame in the place of its replies.
    assert!(
        matches!(client.recv().await, Message::Text(_)),
        "the welcome"
    );
    let close = client.recv().await;
    assert_eq!(close_code_of(&close), Some(close_code::POLICY));
    assert!(
        matches!(&close, Message::Close(Some(f)) if f.reason.as_str() == SLOW_READER),
        "{close:?}"
    );
    let (closed, _) = mpsc::channel(1);
    client.to_server = closed;
    assert_eq!(client.ended().await, Ended::SlowReader);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_is_dropped_after_the_closing_allowance() {
    // Room for the welcome only; the client never reads.
    let mut client = start(1);
    client.notify(Notice::Heartbeat);
    tokio::time::sleep(SLOW_READER_AFTER + CLOSING_WRITE_AFTER - Duration::from_millis(10)).await;
    assert!(!client.server.is_finished());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(client.ended().await, Ended::SlowReader);
}

#[tokio::test(start_paused = true)]
async fn a_paced_goodbye_comes_in_this_connections_turn() {
    let mut client = start(16);
    client.recv_text().await;
    let pacer = Arc::new(Pacer::new(Notice::ShuttingDown, Duration::from_secs(1)));
    // Three connections took their turns before this one.
    for _ in 0..3 {
        pacer.take_turn();
    }
    client.notify(Notice::Paced(Arc::clone(&pacer)));
    tokio::time::sleep(Duration::from_millis(2_990)).await;
    client.send(Message::Text(PING.into())).await;
    assert_eq!(client.recv_text().await, PONG, "served while it waits");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(client.recv_text().await, SHUTTING_DOWN);
    assert_eq!(close_code_of(&client.recv().await), Some(close_code::AWAY));
}

#[tokio::test(start_paused = true)]
async fn a_paced_notice_called_off_is_not_told_and_a_second_signal_is_at_once() {
    let mut client = start(16);
    client.recv_text().await;
    let pacer = Arc::new(Pacer::new(Notice::Leave, Duration::from_secs(1)));
    pacer.take_turn();
    client.notify(Notice::Paced(Arc::clone(&pacer)));
    pacer.call_off();
    tokio::time::sleep(Duration::from_secs(5)).await;
    client.send(Message::Text(PING.into())).await;
    assert_eq!(client.recv_text().await, PONG, "not told to leave");
    // A goodbye in turns, then everyone at once.
    let pacer = Arc::new(Pacer::new(Notice::ShuttingDown, Duration::from_secs(60)));
    pacer.take_turn();
    client.notify(Notice::Paced(pacer));
    tokio::task::yield_now().await;
    client.notify(Notice::ShuttingDown);
    assert_eq!(client.recv_text().await, SHUTTING_DOWN);
}
