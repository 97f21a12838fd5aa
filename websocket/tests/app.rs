//! The server in-process: built on port 0, stopped by the test's own future.

use std::time::Duration;

use futures_util::StreamExt;
use task_protection::{LocalBackend, ProtectionSettings, ShutdownReport, TaskProtection};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use websocket::{App, ServerSettings};

const STEP: Duration = Duration::from_secs(30);

#[tokio::test]
async fn serves_until_the_shutdown_future_then_says_goodbye_and_releases() {
    let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
    let app = App::build(ServerSettings::default(), protection.clone())
        .await
        .expect("binds port 0 on loopback");
    let port = app.port();
    assert_ne!(port, 0);
    let connections = app.connections();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
        .await
        .expect("connects");
    let mut next = async || loop {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => return Some(t.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => {
                return frame.map(|f| format!("close {}", u16::from(f.code)));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    };
    assert_eq!(
        next().await.as_deref(),
        Some("Welcome! There are 1 connections")
    );
    assert_eq!(connections.count(), 1);
    let mut state = protection.state();
    tokio::time::timeout(STEP, state.wait_for(|s| s.protected))
        .await
        .expect("protected in time")
        .expect("protection is running");

    stop.send(()).expect("the server is running");
    assert_eq!(next().await.as_deref(), Some("server shutting down"));
    assert_eq!(
        next().await,
        Some(format!("close {}", u16::from(CloseCode::Away)))
    );
    // Reading on sends the client's answer to the close, as a browser does.
    while next().await.is_some() {}
    let report = served(server).await;
    assert_eq!(report, ShutdownReport::Released);
    assert_eq!(connections.count(), 0);
    assert!(!protection.current().protected);
}

/// Waits for the server to return, and checks that it served without error.
async fn served(
    server: tokio::task::JoinHandle<std::io::Result<ShutdownReport>>,
) -> ShutdownReport {
    tokio::time::timeout(STEP, server)
        .await
        .expect("stops in time")
        .expect("does not panic")
        .expect("serves without error")
}

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A server on port 0 with `n` clients connected and counted.
struct Crowd {
    connections: std::sync::Arc<websocket::connections::Connections>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// A second signal: tell every client at once.
    hurry: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<ShutdownReport>>,
    clients: Vec<Client>,
}

async fn crowd(n: usize) -> Crowd {
    crowd_with(n, ServerSettings::default()).await
}

/// A crowd whose goodbye, at 50 clients a second, takes a minute for 3,000: long enough
/// that what the test looks for (the goodbye cut short) cannot be mistaken for a
/// slow machine's delays.
async fn slow_goodbye_crowd(n: usize) -> Crowd {
    crowd_with(
        n,
        ServerSettings {
            goodbye_rate: 50,
            shutdown_grace: Duration::from_secs(240),
            ..ServerSettings::default()
        },
    )
    .await
}

async fn crowd_with(n: usize, settings: ServerSettings) -> Crowd {
    websocket::http::raise_open_file_limit(n * 2);
    let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
    let app = App::build(settings, protection)
        .await
        .expect("binds port 0 on loopback");
    let port = app.port();
    let connections = app.connections();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (hurry, hurried) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run(
        async {
            let _ = stopped.await;
        },
        async {
            if hurried.await.is_err() {
                std::future::pending::<()>().await;
            }
        },
    ));
    let mut clients = Vec::new();
    for _ in 0..n {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
            .await
            .expect("connects");
        clients.push(ws);
    }
    tokio::time::timeout(STEP, async {
        while connections.count() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every client counted");
    Crowd {
        connections,
        stop,
        hurry,
        server,
        clients,
    }
}

/// Spawns a reader per client that reports when it hears the goodbye.
fn listen_for_goodbyes(
    clients: Vec<Client>,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<std::time::Instant>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (told, heard) = tokio::sync::mpsc::unbounded_channel();
    let readers = clients
        .into_iter()
        .map(|mut ws| {
            let told = told.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = ws.next().await {
                    if matches!(&message, Message::Text(t) if t.as_str() == "server shutting down")
                    {
                        let _ = told.send(std::time::Instant::now());
                    }
                }
            })
        })
        .collect();
    (heard, readers)
}

/// When each client heard the goodbye, in order of arrival.
async fn goodbye_times(
    heard: &mut tokio::sync::mpsc::UnboundedReceiver<std::time::Instant>,
) -> Vec<std::time::Instant> {
    let mut times = Vec::new();
    while let Some(at) = tokio::time::timeout(STEP, heard.recv())
        .await
        .expect("every client hears the goodbye in time")
    {
        times.push(at);
    }
    times
}

/// The clients of a stopping task do not all come back at the others at once: the
/// goodbye to 600 clients is spread over about 600 ms, and every one of them hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_goodbye_to_many_clients_is_spread_out() {
    const CLIENTS: usize = 600;
    let Crowd {
        connections,
        stop,
        server,
        clients,
        ..
    } = crowd(CLIENTS).await;
    let (mut heard, readers) = listen_for_goodbyes(clients);

    let start = std::time::Instant::now();
    stop.send(()).expect("the server is running");
    let times = goodbye_times(&mut heard).await;
    assert_eq!(times.len(), CLIENTS, "every client hears the goodbye");
    let first = times.iter().min().expect("some");
    let last = times.iter().max().expect("some");
    let spread = *last - *first;
    // At 1,000 clients per second, 600 take about 600 ms; all at once takes a few ms.
    assert!(
        spread >= Duration::from_millis(450),
        "the goodbye reached {CLIENTS} clients within {spread:?}"
    );
    assert!(
        *last - start < Duration::from_secs(3),
        "the last goodbye came {:?} after the shutdown began",
        *last - start
    );
    served(server).await;
    assert_eq!(connections.count(), 0);
    for reader in readers {
        reader.await.expect("the client does not panic");
    }
}

/// Clients that leave on their own do not wait for their turn: the shutdown ends
/// when the last client is gone, not when the spread goodbye would have reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_ends_when_the_last_client_has_left() {
    // 3,000 clients: a goodbye spread over a minute.
    let Crowd {
        stop,
        server,
        clients,
        ..
    } = slow_goodbye_crowd(3_000).await;
    stop.send(()).expect("the server is running");
    let start = std::time::Instant::now();
    drop(clients);
    served(server).await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the shutdown took {took:?} after every client had gone, as if it waited out the goodbye"
    );
}

/// A second signal (`hurry`) tells every client still waiting for its turn at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_tells_every_remaining_client_at_once() {
    // 3,000 clients: a goodbye spread over a minute.
    const CLIENTS: usize = 3_000;
    let Crowd {
        stop,
        hurry,
        server,
        clients,
        ..
    } = slow_goodbye_crowd(CLIENTS).await;
    let (mut heard, readers) = listen_for_goodbyes(clients);
    let start = std::time::Instant::now();
    stop.send(()).expect("the server is running");
    // Once the goodbye is under way, the second signal.
    let first = tokio::time::timeout(STEP, heard.recv())
        .await
        .expect("the goodbye starts in time")
        .expect("a client hears it");
    hurry.send(()).expect("the server is shutting down");
    let mut times = goodbye_times(&mut heard).await;
    times.push(first);
    assert_eq!(times.len(), CLIENTS, "every client hears the goodbye");
    let last = times.iter().max().expect("some");
    assert!(
        *last - start < Duration::from_secs(20),
        "the last goodbye came {:?} after the shutdown began, as if the spread went on",
        *last - start
    );
    served(server).await;
    for reader in readers {
        reader.await.expect("the client does not panic");
    }
}
