//! The goodbye goes at `GOODBYE_RATE`: N clients over N / rate seconds, evenly,
//! whatever the order in which they joined, at SIGTERM and when the task leaves its
//! service. A herd of reconnects is what the rate exists to prevent.

use std::time::{Duration, Instant};

use e2e::agent::FakeAgent;
use e2e::sim::{SimConfig, Simulator};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use super::{STEP, Server, Ws};

/// Spawns a reader per client that reports when it hears `told`, and reads on to the
/// end, answering the close as a browser does.
fn listen(
    clients: Vec<Ws>,
    told: &'static str,
) -> (mpsc::UnboundedReceiver<Instant>, Vec<JoinHandle<()>>) {
    let (tx, heard) = mpsc::unbounded_channel();
    let readers = clients
        .into_iter()
        .map(|mut ws| {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = ws.next().await {
                    if matches!(&message, Message::Text(t) if t.as_str() == told) {
                        let _ = tx.send(Instant::now());
                    }
                }
            })
        })
        .collect();
    (heard, readers)
}

/// The first `n` times heard, in order, waiting at most `within` for all of them.
async fn times(
    heard: &mut mpsc::UnboundedReceiver<Instant>,
    n: usize,
    within: Duration,
) -> Vec<Instant> {
    let deadline = tokio::time::Instant::now() + within;
    let mut times = Vec::with_capacity(n);
    while times.len() < n {
        match tokio::time::timeout_at(deadline, heard.recv()).await {
            Ok(Some(at)) => times.push(at),
            _ => panic!("{} of {n} clients told within {within:?}", times.len()),
        }
    }
    times.sort_unstable();
    times
}

/// Checks that `times` went at `rate` a second: every whole second from the first,
/// within ±20 % of the rate.
fn assert_paced(times: &[Instant], rate: usize) {
    let first = times[0];
    let seconds = times.len() / rate;
    let mut per_second = vec![0_usize; seconds + 1];
    for at in times {
        let second = usize::try_from((*at - first).as_secs()).unwrap_or(usize::MAX);
        per_second[second.min(seconds)] += 1;
    }
    eprintln!(
        "{} clients told over {:?}, per second: {per_second:?}",
        times.len(),
        *times.last().unwrap() - first
    );
    let (low, high) = (rate * 8 / 10, rate * 12 / 10);
    for (second, &n) in per_second[..seconds].iter().enumerate() {
        assert!(
            (low..=high).contains(&n),
            "second {second}: {n} clients told, not {rate} ± 20 %: {per_second:?}"
        );
    }
}

/// SIGTERM to a server with `clients` clients at `rate`: they are told over
/// clients / rate seconds, evenly.
async fn shutdown_goodbye(clients: usize, rate: usize) {
    let agent = FakeAgent::start().await;
    let spread = clients / rate;
    // A grace period long enough for the whole goodbye at the rate: it ends within
    // the first half.
    let mut server = Server::start(
        &agent,
        &[
            ("GOODBYE_RATE", rate.to_string()),
            ("SHUTDOWN_GRACE_SECONDS", (spread * 3).to_string()),
        ],
    )
    .await;
    let mut connected = Vec::with_capacity(clients);
    while connected.len() < clients {
        let batch = (clients - connected.len()).min(100);
        connected
            .extend(futures_util::future::join_all((0..batch).map(|_| server.connect())).await);
    }
    server.wait_for_connections(clients as u64).await;
    let (mut heard, readers) = listen(connected, "server shutting down");

    server.service.terminate();
    let within = Duration::from_secs(u64::try_from(spread).unwrap() * 3 + 10);
    let times = times(&mut heard, clients, within).await;
    assert_paced(&times, rate);
    let line = server.service.wait_for_line("Shutting down", STEP).await;
    assert!(line.contains(&format!("over {spread}s")), "{line}");
    let status = server.service.wait_exit(within).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    for reader in readers {
        reader.await.expect("the client does not panic");
    }
}

#[tokio::test]
async fn websocket_goodbye_to_1000_clients_goes_at_goodbye_rate() {
    shutdown_goodbye(1_000, 100).await;
}

/// Fewer clients than the heartbeat has slices, who joined one after the other.
#[tokio::test]
async fn websocket_goodbye_to_100_clients_goes_at_goodbye_rate() {
    shutdown_goodbye(100, 10).await;
}

#[tokio::test]
async fn websocket_drain_goodbye_goes_at_goodbye_rate() {
    /// Clients on each of the two tasks; the one that leaves tells its clients over
    /// 200 / 40 = 5 s.
    const CLIENTS: usize = 200;
    const RATE: usize = 40;
    let env = [
        ("RUST_LOG", "info"),
        ("DRAIN_CHECK_SECONDS", "3"),
        ("DRAIN_NOTICE_SECONDS", "0"),
        ("GOODBYE_RATE", "40"),
        ("SHUTDOWN_GRACE_SECONDS", "20"),
    ];
    let mut config = SimConfig::websocket(2).env(env).at_test_pace();
    config.ecs.stop_timeout = Duration::from_secs(30);
    let sim = Simulator::start(config).await;
    let ports: Vec<u16> = sim.model().wanted().filter_map(|t| t.port).collect();
    assert_eq!(ports.len(), 2, "{}", sim.describe());
    let mut clients = Vec::new();
    for port in &ports {
        for _ in 0..CLIENTS {
            let (ws, _) = connect_async(format!("ws://127.0.0.1:{port}/"))
                .await
                .unwrap_or_else(|e| panic!("cannot connect: {e}"));
            clients.push(ws);
        }
    }
    sim.wait_for("both tasks to be protected", STEP * 3, |m| {
        m.wanted().all(|t| t.protected(m.now))
    })
    .await;
    let (mut heard, _readers) = listen(clients, "please reconnect");
    sim.set_desired(1);
    let times = times(&mut heard, CLIENTS, Duration::from_secs(60)).await;
    assert_paced(&times, RATE);
    // Only one task's clients were told.
    let more = tokio::time::timeout(Duration::from_secs(2), heard.recv()).await;
    assert!(
        more.is_err(),
        "clients of the task that stays were told too"
    );
}
