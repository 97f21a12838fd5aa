//! A client that reads is read more slowly, never dropped: while its replies wait, the
//! server stops reading from it (TCP then pushes back on the client); only a client
//! that has not taken its replies for 30 s is dropped as a slow reader.

use std::time::{Duration, Instant};

use e2e::agent::FakeAgent;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::{STEP, Server, Ws, client_frame, next_text, raw_upgrade};

/// The messages Python's `websockets` keeps read ahead before it stops reading from
/// the socket: `max_queue`'s default in `websockets.asyncio.connection` (16).
const PYTHON_QUEUE: usize = 16;
/// How long the server waits for a client to take its replies before dropping it.
const SLOW_READER_AFTER: Duration = Duration::from_secs(30);

/// A client as Python's `websockets` is one: a task reads messages in the background
/// into a queue of [`PYTHON_QUEUE`], and stops reading from the socket while the
/// queue is full; the application takes them from the queue when it likes.
struct QueuedClient {
    sink: SplitSink<Ws, Message>,
    queue: mpsc::Receiver<Message>,
    /// Ends with why the reading stopped.
    reader: JoinHandle<String>,
}

impl QueuedClient {
    fn new(ws: Ws) -> Self {
        let (sink, mut stream) = ws.split();
        let (tx, queue) = mpsc::channel(PYTHON_QUEUE);
        let reader = tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Some(Ok(message)) => {
                        if tx.send(message).await.is_err() {
                            return "the application went away".to_owned();
                        }
                    }
                    Some(Err(e)) => return format!("the connection failed: {e}"),
                    None => return "the connection ended".to_owned(),
                }
            }
        });
        Self {
            sink,
            queue,
            reader,
        }
    }

    /// The next text message, or how the connection ended instead.
    async fn next_text(&mut self) -> Result<String, String> {
        loop {
            match tokio::time::timeout(STEP, self.queue.recv()).await {
                Err(_) => return Err(format!("nothing within {STEP:?}")),
                Ok(Some(Message::Text(text))) => return Ok(text.as_str().to_owned()),
                Ok(Some(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
                Ok(Some(_)) => {}
                Ok(None) => {
                    let why = (&mut self.reader).await.unwrap_or_default();
                    return Err(why);
                }
            }
        }
    }
}

/// Sends `pings` pings at once, then reads their answers; how many came, and what
/// came instead of the rest.
async fn burst(client: &mut QueuedClient, pings: usize) -> Result<(), String> {
    for _ in 0..pings {
        client
            .sink
            .feed(Message::text("ping"))
            .await
            .map_err(|e| e.to_string())?;
    }
    client.sink.flush().await.map_err(|e| e.to_string())?;
    for pong in 0..pings {
        match client.next_text().await {
            Ok(text) if text == "pong" => {}
            Ok(other) => return Err(format!("after {pong} pongs: {other:?}")),
            Err(why) => return Err(format!("after {pong} pongs: {why}")),
        }
    }
    Ok(())
}

#[tokio::test]
async fn websocket_client_reading_through_a_16_message_queue_gets_every_pong_of_300_ping_bursts() {
    const RUNS: usize = 50;
    const PINGS: usize = 300;
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut dropped = Vec::new();
    for run in 0..RUNS {
        let mut client = QueuedClient::new(server.connect().await);
        let welcome = client.next_text().await;
        assert!(
            welcome.as_deref().is_ok_and(|w| w.starts_with("Welcome!")),
            "{welcome:?}"
        );
        if let Err(why) = burst(&mut client, PINGS).await {
            dropped.push(format!("run {run}: {why}"));
            continue;
        }
        // And again on the same connection: a burst leaves nothing behind.
        if let Err(why) = burst(&mut client, PINGS).await {
            dropped.push(format!("run {run}, second burst: {why}"));
        }
        let _ = client.sink.close().await;
    }
    assert!(
        dropped.is_empty(),
        "{} of {RUNS} runs lost pongs:\n{}",
        dropped.len(),
        dropped.join("\n")
    );
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn websocket_client_that_stops_reading_for_20_s_then_reads_gets_every_reply() {
    const PINGS: usize = 2_000;
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    for _ in 0..PINGS {
        ws.feed(Message::text("ping")).await.unwrap();
    }
    ws.flush().await.unwrap();
    // Far more replies than the server queues for one client, and nobody reads them.
    tokio::time::sleep(Duration::from_secs(20)).await;
    for pong in 0..PINGS {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap_or_else(|_| panic!("pong {pong} did not come"));
        match message {
            Some(Ok(Message::Text(t))) if t.as_str() == "pong" => {}
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("after {pong} pongs: {other:?}"),
        }
    }
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "pong", "still connected");
}

#[tokio::test]
async fn websocket_client_that_sends_but_never_reads_is_dropped_as_a_slow_reader_after_30_s() {
    use tokio::io::AsyncWriteExt;
    /// The allowance, then two more seconds for the close, and room for a slow machine.
    const GONE_WITHIN: Duration = Duration::from_secs(45);
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut tcp = raw_upgrade(server.port, "").await;
    let started = Instant::now();
    // Each "ping" asks for a "pong" the client never reads: the server's writes back
    // up, it stops reading, and the client's writes block in turn.
    let pings = client_frame(true, 0x1, b"ping").repeat(64);
    let gone = loop {
        if tcp.write_all(&pings).await.is_err() {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(90), "never dropped");
    };
    eprintln!("a client that never reads was hung up on after {gone:?}");
    assert!(
        (SLOW_READER_AFTER..GONE_WITHIN).contains(&gone),
        "after {gone:?}"
    );
    server.wait_for_connections(0).await;
}

/// The bytes the kernel holds unread for the server's end of the connection from
/// `client_port` to `server_port` (`rx_queue` in `/proc/net/tcp`).
fn server_receive_queue(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        if port(fields.get(1)?)? != server_port || port(fields.get(2)?)? != client_port {
            return None;
        }
        let rx = fields.get(4)?.rsplit(':').next()?;
        u64::from_str_radix(rx, 16).ok()
    })
}

#[tokio::test]
async fn websocket_client_held_back_holds_no_more_than_the_default_kernel_buffer_on_the_server() {
    use tokio::io::AsyncWriteExt;
    // While a client's replies wait, the server reads no more from it, and what the
    // client still sends waits in the server's kernel receive buffer. Linux grows a
    // buffer only for a reader that keeps up, so this one stays at tcp_rmem's
    // default (128 KiB here) and no more (not its maximum, 32 MiB here), for at most
    // the 30 s after which the client is closed as a slow reader.
    let rmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem").unwrap_or_default();
    let default: u64 = rmem
        .split_whitespace()
        .nth(1)
        .and_then(|d| d.parse().ok())
        .unwrap_or(128 * 1024);
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut tcp = raw_upgrade(server.port, "").await;
    let client_port = tcp.local_addr().expect("a local address").port();
    let pings = client_frame(true, 0x1, b"ping").repeat(64);
    // Send until the server's window closes: a write that makes no progress for 2 s.
    let started = Instant::now();
    while tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&pings))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        assert!(started.elapsed() < STEP, "the server kept reading");
    }
    let held = server_receive_queue(server.port, client_port)
        .expect("the server's end of the connection in /proc/net/tcp");
    eprintln!("the server's kernel holds {held} bytes of a held-back client");
    assert!(
        held <= default,
        "{held} bytes held, over tcp_rmem's default {default}"
    );
}
