//! What scale-in can do with protected websocket tasks, seen from ECS's side.
//!
//! Three release `websocket` servers stand for three tasks, each with its own fake ECS
//! agent that records what ECS held. Clients connect to a task picked at random, as
//! an ALB with several nodes spreads them, hold the connection, and reconnect at
//! once (after the page's jittered first backoff) whenever the server closes it.
//! The number of clients then falls in steps, as at the end of a busy day, and for
//! each step the bench reports how long each task was unprotected in ECS, that is,
//! could have been chosen by a scale-in. One run without a connection lifetime, one
//! with `MAX_CONNECTION_LIFETIME_SECONDS`. Loopback only; stops by itself in about
//! five minutes.
//!
//! ```text
//! cargo build --release -p websocket -p e2e --bins --examples
//! cargo run --release -p e2e --example bench-scale-in
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e::agent::FakeAgent;
use e2e::process::Service;
use e2e::{free_port, wait_for};
use futures_util::StreamExt;

const TASKS: usize = 3;
/// Clients at each step; the most comes first.
const STEPS: [usize; 4] = [300, 30, 3, 1];
const STEP: Duration = Duration::from_secs(30);
const SAMPLE: Duration = Duration::from_millis(100);

/// A small generator, so the bench needs no dependency for its coin flips.
fn next_random(state: &AtomicU64) -> u64 {
    let mut x = state.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.store(x, Ordering::Relaxed);
    x
}

struct Task {
    _server: Service,
    agent: FakeAgent,
    port: u16,
}

async fn start_task(lifetime_seconds: u64) -> Task {
    let agent = FakeAgent::start().await;
    let port = free_port();
    let server = Service::spawn(
        "websocket",
        &[],
        &[
            ("PORT", port.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".to_owned()),
            ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
            ("ECS_AGENT_URI", agent.uri()),
            (
                "MAX_CONNECTION_LIFETIME_SECONDS",
                lifetime_seconds.to_string(),
            ),
            ("RUST_LOG", "warn".to_owned()),
        ],
    );
    wait_for("the server to listen", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    Task {
        _server: server,
        agent,
        port,
    }
}

/// Client `i` is wanted while `i < wanted`; it connects to a random task and
/// reconnects whenever it is closed, until it is no longer wanted.
async fn client(i: usize, ports: Arc<Vec<u16>>, wanted: Arc<AtomicUsize>, seed: Arc<AtomicU64>) {
    loop {
        if i >= wanted.load(Ordering::Relaxed) {
            tokio::time::sleep(SAMPLE).await;
            continue;
        }
        let pick = usize::try_from(next_random(&seed) % ports.len() as u64).unwrap_or(0);
        let url = format!("ws://127.0.0.1:{}/", ports[pick]);
        if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await {
            loop {
                tokio::select! {
                    message = ws.next() => match message {
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                    () = tokio::time::sleep(SAMPLE) => {
                        if i >= wanted.load(Ordering::Relaxed) {
                            let _ = ws.close(None).await;
                            break;
                        }
                    }
                }
            }
        }
        // The page's first backoff: random below 100 ms.
        tokio::time::sleep(Duration::from_millis(next_random(&seed) % 100)).await;
    }
}

/// For one step: per task, the seconds unprotected in ECS and how many separate
/// times it became unprotected.
fn unprotected(agent: &FakeAgent, from: Instant, to: Instant) -> (f64, usize) {
    let mut at = from;
    let (mut off, mut times, mut was_on) = (Duration::ZERO, 0, true);
    while at < to {
        let on = agent.ecs_protected_at(at);
        if !on {
            off += SAMPLE;
            if was_on {
                times += 1;
            }
        }
        was_on = on;
        at += SAMPLE;
    }
    (off.as_secs_f64(), times)
}

async fn run(lifetime_seconds: u64) {
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        tasks.push(start_task(lifetime_seconds).await);
    }
    let ports = Arc::new(tasks.iter().map(|t| t.port).collect::<Vec<_>>());
    let wanted = Arc::new(AtomicUsize::new(STEPS[0]));
    let seed = Arc::new(AtomicU64::new(0x9E37_79B9_7F4A_7C15));
    let clients: Vec<_> = (0..STEPS[0])
        .map(|i| {
            tokio::spawn(client(
                i,
                Arc::clone(&ports),
                Arc::clone(&wanted),
                Arc::clone(&seed),
            ))
        })
        .collect();
    let lifetime = if lifetime_seconds == 0 {
        "no lifetime".to_owned()
    } else {
        format!("MAX_CONNECTION_LIFETIME_SECONDS={lifetime_seconds}")
    };
    for clients in STEPS {
        wanted.store(clients, Ordering::Relaxed);
        // The first seconds settle the step: clients leave, protection follows.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let from = Instant::now();
        tokio::time::sleep(STEP).await;
        let to = Instant::now();
        let cells: Vec<String> = tasks
            .iter()
            .map(|t| {
                let (secs, times) = unprotected(&t.agent, from, to);
                format!("{secs:.1} s ({times}×)")
            })
            .collect();
        println!("| {lifetime} | {clients} | {} |", cells.join(" | "));
    }
    for c in clients {
        c.abort();
    }
}

#[tokio::main]
async fn main() {
    println!(
        "{TASKS} tasks, clients on a random task; each step {} s; per task: seconds unprotected in ECS (separate times)",
        STEP.as_secs()
    );
    println!();
    println!("| connections | clients | task 1 | task 2 | task 3 |");
    println!("|---|---:|---:|---:|---:|");
    run(0).await;
    run(10).await;
}
