//! The goodbye at SIGTERM and at a second signal.

use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::wait_for;
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{STEP, Server, close_code, next_text, wait_protected};

#[tokio::test]
async fn websocket_sigterm_closes_every_client_with_1001_and_exits_0() {
    let agent = FakeAgent::start().await;
    let mut server = Server::start(&agent, &[("SHUTDOWN_GRACE_SECONDS", "3".to_owned())]).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = server.connect().await;
        next_text(&mut ws).await;
        clients.push(ws);
    }
    // One more never reads, so never answers the close: the grace period bounds it.
    let mut deaf = server.connect().await;
    next_text(&mut deaf).await;
    wait_protected(&agent).await;

    let asked = std::time::Instant::now();
    server.service.terminate();
    let goodbyes = join_all(clients.iter_mut().map(|ws| async move {
        let text = next_text(ws).await;
        let code = close_code(ws).await;
        // Answer the close, as browsers do.
        while let Some(Ok(_)) = ws.next().await {}
        (text, code)
    }))
    .await;
    for (text, code) in goodbyes {
        assert_eq!(text, "server shutting down");
        assert_eq!(code, CloseCode::Away);
    }
    let status = server.service.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        asked.elapsed()
    );
    assert!(agent.released(), "protection released at shutdown");
    assert!(server.service.count("Task protection released") >= 1);
    drop(deaf);
}

#[tokio::test]
async fn websocket_second_ctrl_c_tells_every_client_at_once() {
    // 5,000 clients at 100 a second: the goodbye would be spread over 50 s. A second
    // ctrl-c at a terminal means "now", as it does for the worker.
    const CLIENTS: u64 = 5_000;
    let agent = FakeAgent::start().await;
    let mut server = Server::start(
        &agent,
        &[
            ("GOODBYE_RATE", "100".to_owned()),
            ("SHUTDOWN_GRACE_SECONDS", "120".to_owned()),
        ],
    )
    .await;
    let mut readers = Vec::new();
    for _ in 0..CLIENTS {
        let mut ws = server.connect().await;
        readers.push(tokio::spawn(async move {
            // Read to the end, answering the close as a browser does.
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    server.wait_for_connections(CLIENTS).await;

    server.service.signal(nix::sys::signal::Signal::SIGINT);
    // Two signals sent before the first is handled are one signal (the kernel keeps
    // one pending SIGINT), so press again once the first is seen, as a person does.
    server.service.wait_for_line("Shutting down", STEP).await;
    let asked = std::time::Instant::now();
    server.service.signal(nix::sys::signal::Signal::SIGINT);
    let status = server.service.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "exit took {took:?} after the second ctrl-c, as if the goodbye went on"
    );
    assert_eq!(server.service.count("SIGINT received again"), 1);
    for reader in readers {
        reader.await.expect("the client does not panic");
    }
}

#[tokio::test]
async fn websocket_flooding_client_hears_the_shutdown_within_100ms() {
    let agent = FakeAgent::start().await;
    // A budget no client reaches: this one floods with what the server allows.
    let mut server = Server::start(
        &agent,
        &[
            ("SHUTDOWN_GRACE_SECONDS", "3".to_owned()),
            ("MAX_FRAMES_PER_SECOND", "1000000".to_owned()),
            ("MAX_BYTES_PER_SECOND", "1073741824".to_owned()),
        ],
    )
    .await;
    // A quiet client shows when the notice went out; the flooding one must not hear
    // it much later.
    let mut quiet = server.connect().await;
    next_text(&mut quiet).await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    let (mut sink, mut stream) = ws.split();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&sent);
    let flood = tokio::spawn(async move {
        // Tiny frames, nonstop, until the server closes.
        loop {
            for _ in 0..64 {
                if sink.feed(Message::text("x")).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
            counter.fetch_add(64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    wait_for("the flood to be under way", STEP, || async {
        (sent.load(std::sync::atomic::Ordering::Relaxed) > 20_000).then_some(())
    })
    .await;
    server.service.terminate();
    let quiet_heard = async {
        assert_eq!(next_text(&mut quiet).await, "server shutting down");
        std::time::Instant::now()
    };
    let flooder_heard = async {
        loop {
            match tokio::time::timeout(STEP, stream.next())
                .await
                .expect("the notice within the timeout")
            {
                Some(Ok(Message::Text(t))) if t.as_str() == "server shutting down" => {
                    break std::time::Instant::now();
                }
                Some(Ok(_)) => {}
                other => panic!("ended before the notice: {other:?}"),
            }
        }
    };
    let (quiet_at, flooder_at) = tokio::join!(quiet_heard, flooder_heard);
    let late = flooder_at.saturating_duration_since(quiet_at);
    eprintln!("the flooding client heard the shutdown {late:?} after a quiet one");
    assert!(late <= Duration::from_millis(100), "{late:?} late");
    flood.abort();
    server.service.wait_exit(STEP).await;
}
