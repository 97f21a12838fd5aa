//! Benchmarks the `websocket` server against `ws-baseline`, side by side in one run,
//! on loopback only, and stops by itself (about a minute and a half).
//!
//! Figures, for each server:
//! - base RSS: `VmRSS` of the idle process after start-up;
//! - closed-loop round trips per second: 50 clients, each sending `ping` and waiting
//!   for `pong` before the next, over several alternating rounds;
//! - RSS growth per idle connection: `VmRSS` before and after 5,000 clients have
//!   connected and been welcomed, divided by 5,000 (1 KB = 1,000 bytes).
//!
//! With `--hostile`, only `websocket` runs, and the figure is the worst a client can
//! make it hold: RSS growth per client after each of [`HOSTILE_CLIENTS`] clients has
//! (a) idled, (b) sent the largest message accepted, (c) sent the first frame of a
//! message that never ends, (d) sent a message far over the limit. Each attack runs
//! on a fresh process.
//!
//! With `--metrics`, two `websocket` servers run side by side, one with `METRICS=emf`
//! (a line every second, `METRICS_INTERVAL_SECONDS=1`, the most often allowed) and
//! one with `METRICS=off`, and the figure is their closed-loop round trips per
//! second, median of the same alternating rounds.
//!
//! Build both in release mode first, from the workspace root:
//!
//! ```text
//! cargo build --release -p websocket -p e2e --bins
//! ulimit -n 20000 && target/release/bench-websocket
//! ulimit -n 20000 && target/release/bench-websocket --hostile
//! target/release/bench-websocket --metrics
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::bench::{Error, procfs, sibling, start_listening};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CLIENTS: usize = 50;
const HOSTILE_CLIENTS: usize = 2_000;
/// The server's default `MAX_MESSAGE_BYTES`.
const MAX_MESSAGE_BYTES: usize = 1024;
const IDLE_CLIENTS: usize = 5_000;
const ROUNDS: usize = 7;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
/// No single step may take longer than this; the benchmark then fails instead of
/// hanging.
const STEP: Duration = Duration::from_secs(60);

struct Server {
    name: &'static str,
    child: Child,
    port: u16,
}

impl Server {
    async fn start(name: &'static str, env: &[(&str, &str)]) -> Result<Self, Error> {
        let (child, port) = start_listening(&sibling(name), env.iter().copied(), STEP).await?;
        Ok(Self { name, child, port })
    }

    fn rss_kb(&self) -> Result<u64, Error> {
        let pid = self.child.id().ok_or("the server exited")?;
        Ok(procfs::rss_kb(pid).ok_or("no VmRSS")?)
    }

    /// Samples RSS until two readings 300 ms apart agree, at most 5 s.
    async fn settled_rss_kb(&self) -> Result<u64, Error> {
        let mut last = self.rss_kb()?;
        for _ in 0..16 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = self.rss_kb()?;
            if now == last {
                break;
            }
            last = now;
        }
        Ok(last)
    }

    async fn connect(&self) -> Result<Ws, Error> {
        // A small client read buffer: 5,000 clients at tungstenite's default 128 KiB
        // would cost the load client 640 MB.
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let url = format!("ws://127.0.0.1:{}/", self.port);
        let (mut ws, _) =
            tokio::time::timeout(STEP, connect_async_with_config(url, Some(config), true))
                .await??;
        let welcome = next_text(&mut ws).await?;
        if !welcome.starts_with("Welcome!") {
            return Err(format!("{}: unexpected greeting {welcome:?}", self.name).into());
        }
        Ok(ws)
    }
}

async fn next_text(ws: &mut Ws) -> Result<String, Error> {
    loop {
        match tokio::time::timeout(STEP, ws.next()).await? {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(_))) | None => return Err("closed".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Round trips per second with `CLIENTS` closed-loop clients.
async fn round_trips(server: &Server) -> Result<f64, Error> {
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(server.connect().await?);
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let done = Arc::clone(&done);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    ws.send(Message::text("ping")).await?;
                    if next_text(&mut ws).await? != "pong" {
                        return Err::<(), Error>("expected pong".into());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                let _ = ws.close(None).await;
                Ok(())
            })
        })
        .collect();
    tokio::time::sleep(WARM_UP).await;
    let (start, before) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(MEASURE).await;
    let (elapsed, after) = (start.elapsed(), done.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(STEP, task).await???;
    }
    #[allow(clippy::cast_precision_loss)]
    Ok((after - before) as f64 / elapsed.as_secs_f64())
}

/// RSS growth per idle connection, in bytes, at `IDLE_CLIENTS` clients.
async fn idle_growth(server: &Server) -> Result<(u64, u64, f64), Error> {
    let before = server.settled_rss_kb().await?;
    let mut clients = Vec::with_capacity(IDLE_CLIENTS);
    // Connect in batches, within the listen backlog.
    for _ in 0..IDLE_CLIENTS / 100 {
        let batch = futures_util::future::try_join_all((0..100).map(|_| server.connect())).await?;
        clients.extend(batch);
    }
    let after = server.settled_rss_kb().await?;
    drop(clients);
    // Let the server finish closing them before the next measurement.
    server.settled_rss_kb().await?;
    #[allow(clippy::cast_precision_loss)]
    let per_connection = (after.saturating_sub(before) * 1024) as f64 / IDLE_CLIENTS as f64;
    Ok((before, after, per_connection))
}

fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// What a hostile client does once welcomed.
#[derive(Debug, Clone, Copy)]
enum Attack {
    Idle,
    LargestMessage,
    UnfinishedMessage,
    OversizedMessage,
}

impl Attack {
    fn describe(self) -> &'static str {
        match self {
            Self::Idle => "idle after the welcome",
            Self::LargestMessage => "one message of MAX_MESSAGE_BYTES (1024 bytes), then idle",
            Self::UnfinishedMessage => {
                "the first 1000-byte frame of a message that never ends, answering pings"
            }
            Self::OversizedMessage => "one 60 KiB message (refused with 1009)",
        }
    }

    async fn run(self, ws: &mut Ws) -> Result<(), Error> {
        let attack = match self {
            Self::Idle => return Ok(()),
            Self::LargestMessage => Message::text("x".repeat(MAX_MESSAGE_BYTES)),
            Self::UnfinishedMessage => Message::Frame(Frame::message(
                vec![b'x'; 1000],
                OpCode::Data(Data::Text),
                false,
            )),
            Self::OversizedMessage => Message::text("x".repeat(60 * 1024)),
        };
        // A refused attack may see the connection reset while it is still sending.
        let _ = ws.send(attack).await;
        // The pong (or the refusal) comes once the server has read the attack.
        let _ = ws.send(Message::Ping(b"read?".to_vec().into())).await;
        loop {
            match tokio::time::timeout(STEP, ws.next()).await? {
                Some(Ok(Message::Pong(_) | Message::Close(_)) | Err(_)) | None => return Ok(()),
                Some(Ok(_)) => {}
            }
        }
    }
}

/// RSS growth per client after `HOSTILE_CLIENTS` clients made `attack`, on a fresh
/// server; and how many were still connected.
async fn hostile_growth(attack: Attack) -> Result<(f64, usize), Error> {
    let server = Server::start(
        "websocket",
        &[
            ("BIND_ADDRESS", "127.0.0.1"),
            ("TASK_PROTECTION_BACKEND", "local"),
            ("RUST_LOG", "info"),
        ],
    )
    .await?;
    let before = server.settled_rss_kb().await?;
    let mut clients = Vec::with_capacity(HOSTILE_CLIENTS);
    for _ in 0..HOSTILE_CLIENTS / 100 {
        let batch = futures_util::future::try_join_all((0..100).map(|_| async {
            let mut ws = server.connect().await?;
            attack.run(&mut ws).await?;
            Ok::<_, Error>(ws)
        }))
        .await?;
        clients.extend(batch);
    }
    let after = server.settled_rss_kb().await?;
    let status: String = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).await?;
        tcp.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await?;
        answer
    };
    let connected = status
        .split("\"connections\":")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    drop(clients);
    #[allow(clippy::cast_precision_loss)]
    let per_client = (after.saturating_sub(before) * 1024) as f64 / HOSTILE_CLIENTS as f64;
    eprintln!(
        "{attack:?}: {before} kB before, {after} kB after {HOSTILE_CLIENTS} clients, {connected} connected"
    );
    Ok((per_client, connected))
}

async fn hostile() -> Result<(), Error> {
    println!(
        "| What each of {HOSTILE_CLIENTS} clients did | RSS growth per client | Still connected |"
    );
    println!("|---|---:|---:|");
    for attack in [
        Attack::Idle,
        Attack::LargestMessage,
        Attack::UnfinishedMessage,
        Attack::OversizedMessage,
    ] {
        let (per_client, connected) = hostile_growth(attack).await?;
        println!(
            "| {} | {:.2} KB | {connected} |",
            attack.describe(),
            per_client / 1000.0
        );
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Round trips per second with metrics written each second against metrics off.
async fn metrics_cost() -> Result<(), Error> {
    let common = [
        ("BIND_ADDRESS", "127.0.0.1"),
        ("TASK_PROTECTION_BACKEND", "local"),
        ("RUST_LOG", "info"),
        ("METRICS_INTERVAL_SECONDS", "1"),
    ];
    let with = |mode| {
        let mut env = common.to_vec();
        env.push(("METRICS", mode));
        env
    };
    let off = Server::start("websocket", &with("off")).await?;
    let emf = Server::start("websocket", &with("emf")).await?;
    let servers = [&off, &emf];
    let mut rates = vec![Vec::new(); servers.len()];
    for round in 0..ROUNDS {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let rate = round_trips(servers[i]).await?;
            let mode = if i == 0 { "off" } else { "emf" };
            eprintln!(
                "round {}: METRICS={mode} {rate:.0} round trips/s",
                round + 1
            );
            rates[i].push(rate);
        }
    }
    let (o, e) = (median(&rates[0]), median(&rates[1]));
    println!("| Figure | METRICS=off | METRICS=emf, a line per second | Ratio |");
    println!("|---|---|---|---|");
    println!(
        "| Round trips/s, {CLIENTS} clients, median of {ROUNDS} rounds | {o:.0} | {e:.0} | {:.2} × |",
        e / o
    );
    println!();
    println!("Rounds, METRICS=off: {}", list(&rates[0]));
    println!("Rounds, METRICS=emf: {}", list(&rates[1]));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    if std::env::args().any(|a| a == "--metrics") {
        return metrics_cost().await;
    }
    if std::env::args().any(|a| a == "--hostile") {
        if fd_limit() < (HOSTILE_CLIENTS as u64) + 1000 {
            return Err(format!(
                "the open-file limit is {}; run with `ulimit -n 20000` first",
                fd_limit()
            )
            .into());
        }
        return hostile().await;
    }
    if fd_limit() < (IDLE_CLIENTS as u64) + 1000 {
        return Err(format!(
            "the open-file limit is {}; run with `ulimit -n 20000` first",
            fd_limit()
        )
        .into());
    }
    let baseline = Server::start("ws-baseline", &[]).await?;
    let websocket = Server::start(
        "websocket",
        &[
            ("BIND_ADDRESS", "127.0.0.1"),
            ("TASK_PROTECTION_BACKEND", "local"),
            ("RUST_LOG", "info"),
        ],
    )
    .await?;
    let servers = [&baseline, &websocket];

    let mut base = Vec::new();
    for server in servers {
        base.push(server.settled_rss_kb().await?);
    }

    // Idle connections first, on fresh processes: within the first seconds, before
    // the load rounds have churned the allocator.
    let mut idle = Vec::new();
    for server in servers {
        let figures = idle_growth(server).await?;
        eprintln!(
            "{}: {} kB before, {} kB with {IDLE_CLIENTS} idle clients",
            server.name, figures.0, figures.1
        );
        idle.push(figures);
    }

    // Rounds alternate which server goes first, so neither always meets the machine
    // in the same state; the figure is each server's median round.
    let mut rates = vec![Vec::new(); servers.len()];
    for round in 0..ROUNDS {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let server = servers[i];
            let rate = round_trips(server).await?;
            eprintln!(
                "round {}: {} {rate:.0} round trips/s",
                round + 1,
                server.name
            );
            rates[i].push(rate);
        }
    }

    println!("| Figure | ws-baseline | websocket | Ratio | Target |");
    println!("|---|---|---|---|---|");
    let (b, w) = (median(&rates[0]), median(&rates[1]));
    println!(
        "| Round trips/s, {CLIENTS} clients, median of {ROUNDS} rounds | {b:.0} | {w:.0} | {:.2} × | ≥ 0.9 × |",
        w / b
    );
    println!(
        "| RSS growth per idle connection, {IDLE_CLIENTS} clients | {:.2} KB | {:.2} KB | | ≤ 3.5 KB |",
        idle[0].2 / 1000.0,
        idle[1].2 / 1000.0
    );
    #[allow(clippy::cast_precision_loss)]
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!(
        "| Base RSS | {:.1} MB | {:.1} MB | | ≤ 16 MB |",
        mb(base[0]),
        mb(base[1])
    );
    println!();
    println!("Rounds, ws-baseline: {}", list(&rates[0]));
    println!("Rounds, websocket: {}", list(&rates[1]));
    Ok(())
}
