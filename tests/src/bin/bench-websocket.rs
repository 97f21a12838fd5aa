//! Benchmarks the `websocket` server against `ws-baseline`, side by side in one run,
//! on loopback only, and stops by itself (about two minutes).
//!
//! Figures, for each server:
//! - base RSS: `VmRSS` of the idle process after start-up;
//! - RSS growth per idle connection: `VmRSS` before and after 5,000 clients have
//!   connected and been welcomed, divided by 5,000 (1 KB = 1,000 bytes), on fresh
//!   processes, [`IDLE_ROUNDS`] times over, alternating which server goes first;
//! - closed-loop round trips per second: 50 clients, each sending `ping` and waiting
//!   for `pong` before the next, over several alternating rounds; and the server's
//!   CPU time per round trip in those rounds, which a shared machine's load sways
//!   much less than the rate.
//!
//! `websocket` runs with its metrics on (`METRICS=emf`, a line a minute), as in a
//! task, and for the round trips with `MAX_FRAMES_PER_SECOND` out of reach: each
//! closed-loop client sends a few thousand frames a second, a flood by the default
//! budget (1,000).
//!
//! With `--hostile` ([`hostile`]), only `websocket` runs, once per attack on a fresh
//! process, and the figures are what a burst of hostile clients costs: 2,000
//! clients (or `--clients N`) arrive all at once and each (a) idles, (b) sends the
//! largest message accepted, (c) sends the first frame of a message that never ends,
//! (d) sends one message far over the limit, or (e) sends one over the limit in
//! fragments that are each under it. For each: the RSS at rest before, the peak
//! during the burst (`VmHWM`), what stays while the clients that may stay are
//! connected, and the RSS 10 s after the last one has gone.
//!
//! With `--floods` ([`floods`]), what one flooding client costs the server in CPU,
//! with the default budget of frames and bytes a second and without it.
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
//! ulimit -n 20000 && target/release/bench-websocket --hostile [--clients N]
//! target/release/bench-websocket --metrics
//! target/release/bench-websocket --floods
//! ```

#[path = "bench-websocket/floods.rs"]
mod floods;
#[path = "bench-websocket/hostile.rs"]
mod hostile;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::bench::{Error, procfs, sibling, start_listening};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CLIENTS: usize = 50;
const IDLE_CLIENTS: usize = 5_000;
/// Fresh pairs of processes the idle figure is measured on.
const IDLE_ROUNDS: usize = 3;
const ROUNDS: usize = 7;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
/// No single step may take longer than this; the benchmark then fails instead of
/// hanging.
const STEP: Duration = Duration::from_secs(60);

/// `websocket` as the benchmarks run it: defaults, protection simulated locally,
/// each connection's opening and closing logged, and metrics on as in a task.
const WEBSOCKET_ENV: [(&str, &str); 4] = [
    ("BIND_ADDRESS", "127.0.0.1"),
    ("TASK_PROTECTION_BACKEND", "local"),
    ("RUST_LOG", "info"),
    ("METRICS", "emf"),
];
/// The frame budget out of reach of a closed-loop client, for the round trips.
const UNLIMITED_FRAMES: (&str, &str) = ("MAX_FRAMES_PER_SECOND", "1000000");

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

    fn pid(&self) -> Result<u32, Error> {
        Ok(self.child.id().ok_or("the server exited")?)
    }

    fn rss_kb(&self) -> Result<u64, Error> {
        Ok(procfs::rss_kb(self.pid()?).ok_or("no VmRSS")?)
    }

    /// Clients connected, as `/status` counts them.
    async fn connections(&self) -> Result<usize, Error> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port)).await?;
        tcp.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await?;
        let count = answer
            .split("\"connections\":")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| format!("no connection count in {answer:?}"))?;
        Ok(count)
    }

    /// Waits until `/status` counts no client.
    async fn wait_empty(&self) -> Result<(), Error> {
        let deadline = Instant::now() + STEP;
        while self.connections().await? > 0 {
            if Instant::now() > deadline {
                return Err(format!("{}: clients still counted after {STEP:?}", self.name).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
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

/// Round trips per second with `CLIENTS` closed-loop clients, and the server's CPU
/// time per round trip in microseconds (user and system, from `/proc/<pid>/stat`):
/// on a shared machine the rate follows the machine's load, the CPU per round trip
/// much less.
async fn round_trips(server: &Server) -> Result<(f64, f64), Error> {
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
    let pid = server.pid()?;
    let cpu_before = procfs::cpu_ticks(pid).ok_or("no CPU time")?;
    let (start, before) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(MEASURE).await;
    let (elapsed, after) = (start.elapsed(), done.load(Ordering::Relaxed));
    let cpu_after = procfs::cpu_ticks(pid).ok_or("no CPU time")?;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(STEP, task).await???;
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = (after - before) as f64 / elapsed.as_secs_f64();
    // Clock ticks are 10 ms here.
    #[allow(clippy::cast_precision_loss)]
    let cpu_us = (cpu_after - cpu_before) as f64 * 10_000.0 / (after - before).max(1) as f64;
    Ok((rate, cpu_us))
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
        UNLIMITED_FRAMES,
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
            let (rate, _) = round_trips(servers[i]).await?;
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

fn check_fd_limit(clients: usize) -> Result<(), Error> {
    if fd_limit() < (clients as u64) + 1000 {
        return Err(format!(
            "the open-file limit is {}; run with `ulimit -n 20000` first",
            fd_limit()
        )
        .into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    if std::env::args().any(|a| a == "--metrics") {
        return metrics_cost().await;
    }
    if std::env::args().any(|a| a == "--hostile") {
        let clients = hostile::hostile_clients()?;
        check_fd_limit(clients)?;
        return hostile::hostile(clients).await;
    }
    if std::env::args().any(|a| a == "--floods") {
        return floods::floods_cost().await;
    }
    check_fd_limit(IDLE_CLIENTS)?;
    let mut websocket_env = WEBSOCKET_ENV.to_vec();
    websocket_env.push(UNLIMITED_FRAMES);

    // Idle connections first, each round on fresh processes (within their first
    // seconds, before load has churned the allocator), alternating which server
    // goes first.
    let mut base = [Vec::new(), Vec::new()];
    let mut idle = [Vec::new(), Vec::new()];
    let mut servers = None;
    for round in 0..IDLE_ROUNDS {
        let pair = [
            Server::start("ws-baseline", &[]).await?,
            Server::start("websocket", &websocket_env).await?,
        ];
        for (i, server) in pair.iter().enumerate() {
            base[i].push(server.settled_rss_kb().await?);
        }
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (before, after, per_connection) = idle_growth(&pair[i]).await?;
            eprintln!(
                "idle round {}: {} {before} kB before, {after} kB with {IDLE_CLIENTS} idle clients: \
                 {per_connection:.0} bytes each",
                round + 1,
                pair[i].name
            );
            idle[i].push(per_connection);
        }
        servers = Some(pair);
    }
    let servers = servers.ok_or("no idle round")?;

    // Rounds alternate which server goes first, so neither always meets the machine
    // in the same state; the figure is each server's median round.
    let mut rates = vec![Vec::new(); servers.len()];
    let mut cpu = vec![Vec::new(); servers.len()];
    for round in 0..ROUNDS {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let server = &servers[i];
            let (rate, cpu_us) = round_trips(server).await?;
            eprintln!(
                "round {}: {} {rate:.0} round trips/s, {cpu_us:.2} µs of CPU each",
                round + 1,
                server.name
            );
            rates[i].push(rate);
            cpu[i].push(cpu_us);
        }
    }

    println!("| Figure | ws-baseline | websocket | Ratio | Target |");
    println!("|---|---|---|---|---|");
    let (b, w) = (median(&rates[0]), median(&rates[1]));
    println!(
        "| Round trips/s, {CLIENTS} clients, median of {ROUNDS} rounds | {b:.0} | {w:.0} | {:.2} × | ≥ 0.95 × |",
        w / b
    );
    let (b, w) = (median(&cpu[0]), median(&cpu[1]));
    println!(
        "| Server CPU per round trip, median of {ROUNDS} rounds | {b:.2} µs | {w:.2} µs | {:.2} × | |",
        w / b
    );
    let (b, w) = (median(&idle[0]), median(&idle[1]));
    println!(
        "| RSS growth per idle connection, {IDLE_CLIENTS} clients, median of {IDLE_ROUNDS} rounds | \
         {b:.0} B | {w:.0} B | {:.2} × | ≤ 0.75 × |",
        w / b
    );
    #[allow(clippy::cast_precision_loss)]
    let mb = |kb: &Vec<u64>| kb.iter().max().copied().unwrap_or(0) as f64 / 1024.0;
    println!(
        "| Base RSS, largest of {IDLE_ROUNDS} | {:.1} MB | {:.1} MB | | ≤ 16 MB |",
        mb(&base[0]),
        mb(&base[1])
    );
    println!();
    let ratios: Vec<f64> = idle[1].iter().zip(&idle[0]).map(|(w, b)| w / b).collect();
    println!(
        "Idle rounds, bytes per connection, ws-baseline: {}",
        list(&idle[0])
    );
    println!(
        "Idle rounds, bytes per connection, websocket: {}",
        list(&idle[1])
    );
    println!(
        "Idle rounds, ratio: {}",
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("Round trips/s, ws-baseline: {}", list(&rates[0]));
    println!("Round trips/s, websocket: {}", list(&rates[1]));
    let micros = |v: &[f64]| {
        v.iter()
            .map(|c| format!("{c:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("CPU µs per round trip, ws-baseline: {}", micros(&cpu[0]));
    println!("CPU µs per round trip, websocket: {}", micros(&cpu[1]));
    Ok(())
}
