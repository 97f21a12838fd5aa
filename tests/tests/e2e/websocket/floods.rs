//! A per-connection budget of frames and bytes a second, for every frame type: a
//! client over it is closed with 1008, so one client cannot make the service scale
//! out. What a flood costs the server is measured in the benchmark (BENCHMARKS.md).

use std::time::{Duration, Instant};

use e2e::agent::FakeAgent;
use e2e::wait_for;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio_tungstenite::tungstenite::Message;

use super::{Server, client_frame, next_text, raw_upgrade, server_frame};

/// The budget is counted per second; a flood is closed within the second it passes
/// it, and this leaves room for a slow machine.
const CLOSED_WITHIN: Duration = Duration::from_secs(5);

/// Reads the server's frames until its close frame; its code, or `None` when the
/// connection ended (or nothing came for 10 s) without one.
async fn close_of(from: &mut OwnedReadHalf) -> Option<u16> {
    let read = async {
        loop {
            let mut head = [0_u8; 2];
            from.read_exact(&mut head).await.ok()?;
            let len = match head[1] & 0x7f {
                126 => u64::from(from.read_u16().await.ok()?),
                127 => from.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0_u8; usize::try_from(len).ok()?];
            from.read_exact(&mut payload).await.ok()?;
            if head[0] & 0x0f == 0x8 {
                return Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}

/// Sends `frame` over and over as fast as the server takes it, until it hangs up;
/// the close code it sent, and how long after the flood began.
async fn flood(port: u16, frame: &[u8]) -> (Option<u16>, Duration) {
    let tcp = raw_upgrade(port, "").await;
    let (mut from, mut to) = tcp.into_split();
    assert_eq!(server_frame(&mut from).await.0, 0x1, "the welcome");
    let chunk = frame.repeat((64 * 1024 / frame.len()).max(1));
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        while started.elapsed() < Duration::from_secs(30) {
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let code = close_of(&mut from).await;
    let took = started.elapsed();
    writer.abort();
    (code, took)
}

async fn assert_closed_with_1008(server: &Server, what: &str, frame: &[u8]) {
    let (code, took) = flood(server.port, frame).await;
    eprintln!("a flood of {what} was closed with {code:?} after {took:?}");
    assert_eq!(code, Some(1008), "a flood of {what}, after {took:?}");
    assert!(
        took < CLOSED_WITHIN,
        "a flood of {what}: closed after {took:?}"
    );
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn websocket_text_frame_flood_is_closed_with_1008() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    assert_closed_with_1008(
        &server,
        "1-byte text frames",
        &client_frame(true, 0x1, b"x"),
    )
    .await;
}

#[tokio::test]
async fn websocket_pong_flood_is_closed_with_1008() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    assert_closed_with_1008(&server, "pong frames", &client_frame(true, 0xA, b"pong")).await;
}

#[tokio::test]
async fn websocket_byte_flood_is_closed_with_1008() {
    let agent = FakeAgent::start().await;
    // Frames are let through without count, so the bytes alone decide.
    let server = Server::start(&agent, &[("MAX_FRAMES_PER_SECOND", "1000000".to_owned())]).await;
    let frame = client_frame(true, 0x2, &[0_u8; 1024]);
    assert_closed_with_1008(&server, "1 KiB binary messages", &frame).await;
}

#[tokio::test]
async fn websocket_client_within_the_budget_stays() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    // 500 small frames a second for 3 s: half the default budget.
    for _ in 0..30 {
        for _ in 0..50 {
            ws.feed(Message::text("x")).await.unwrap();
        }
        ws.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "pong");
}

/// Sends an upgrade request; the answer's status.
async fn upgrade_status(port: u16) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(super::upgrade_request(port, "").as_bytes())
        .await
        .unwrap();
    let mut head = [0_u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[tokio::test]
async fn websocket_flooder_that_reconnects_at_once_is_turned_away_for_10_s() {
    let agent = FakeAgent::start().await;
    // Counted per address, as the deployment files set it.
    let server = Server::start(&agent, &[("MAX_CONNECTIONS_PER_ADDRESS", "100".to_owned())]).await;
    let (code, _) = flood(server.port, &client_frame(true, 0x1, b"x")).await;
    assert_eq!(code, Some(1008));
    let barred_at = Instant::now();
    assert_eq!(upgrade_status(server.port).await, 429, "at once");
    // An ordinary client of another address is not affected: here every client is
    // 127.0.0.1, so the bar is seen to end instead.
    wait_for("the bar to end", Duration::from_secs(20), || async {
        (upgrade_status(server.port).await == 101).then_some(())
    })
    .await;
    let barred = barred_at.elapsed();
    assert!(
        barred >= Duration::from_secs(9),
        "turned away for only {barred:?}"
    );
    // Without a count per address, the address means nothing: no bar.
    let open = Server::start(&agent, &[]).await;
    let (code, _) = flood(open.port, &client_frame(true, 0x1, b"x")).await;
    assert_eq!(code, Some(1008));
    assert_eq!(upgrade_status(open.port).await, 101);
}
