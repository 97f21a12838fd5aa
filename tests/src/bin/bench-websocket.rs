//! Benchmarks the `websocket` server against `ws-baseline`, side by side in one run,
//! on loopback only, and stops by itself (about two minutes).
//!
//! Figures, for each server:
//! - base RSS: `VmRSS` of the idle process after start-up;
//! - RSS growth per idle connection: `VmRSS` before and after 5,000 clients have
//!   connected and been welcomed, divided by 5,000 (1 KB = 1,000 bytes), on fresh
//!   processes, [`IDLE_ROUNDS`] times over, alternating which server goes first;
//! - closed-loop round trips per second: 50 clients, each sending `ping` and waiting
//!   for `pong` before the next, over several alternating rounds.
//!
//! `websocket` runs with its metrics on (`METRICS=emf`, a line a minute), as in a
//! task.
//!
//! With `--hostile`, only `websocket` runs, once per attack on a fresh process, and
//! the figures are what a burst of hostile clients costs: [`HOSTILE_CLIENTS`]
//! clients (or `--clients N`) arrive all at once and each (a) idles, (b) sends the
//! largest message accepted, (c) sends the first frame of a message that never ends,
//! (d) sends one message far over the limit, or (e) sends one over the limit in
//! fragments that are each under it. For each: the RSS at rest before, the peak
//! during the burst (`VmHWM`), what stays while the clients that may stay are
//! connected, and the RSS [`SETTLE`] after the last one has gone.
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
/// Hostile clients arriving at once, unless `--clients N` says otherwise.
const HOSTILE_CLIENTS: usize = 2_000;
/// Clients that connect and leave before a hostile burst, so the process's one-time
/// growth (runtime, allocator, first connections) is not counted as the burst's.
const WARM_UP_CLIENTS: usize = 100;
/// How long after the last hostile client has gone the RSS is read again.
const SETTLE: Duration = Duration::from_secs(10);
/// The server's default `MAX_MESSAGE_BYTES`.
const MAX_MESSAGE_BYTES: usize = 1024;
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
    OversizedFragments,
}

impl Attack {
    const ALL: [Self; 5] = [
        Self::Idle,
        Self::LargestMessage,
        Self::UnfinishedMessage,
        Self::OversizedMessage,
        Self::OversizedFragments,
    ];

    fn describe(self) -> &'static str {
        match self {
            Self::Idle => "idle after the welcome",
            Self::LargestMessage => "one message of MAX_MESSAGE_BYTES (1024 bytes), then idle",
            Self::UnfinishedMessage => {
                "the first 1000-byte frame of a message that never ends, answering pings"
            }
            Self::OversizedMessage => "one 60 KiB message in one frame (refused with 1009)",
            Self::OversizedFragments => {
                "one 60 KiB message in 1000-byte fragments (refused with 1009)"
            }
        }
    }

    async fn run(self, ws: &mut Ws) -> Result<(), Error> {
        let fragment = |opcode, fin| Message::Frame(Frame::message(vec![b'x'; 1000], opcode, fin));
        let attack = match self {
            Self::Idle => return Ok(()),
            Self::LargestMessage => vec![Message::text("x".repeat(MAX_MESSAGE_BYTES))],
            Self::UnfinishedMessage => vec![fragment(OpCode::Data(Data::Text), false)],
            Self::OversizedMessage => vec![Message::text("x".repeat(60 * 1024))],
            Self::OversizedFragments => {
                let mut frames = vec![fragment(OpCode::Data(Data::Text), false)];
                frames.extend((1..61).map(|i| fragment(OpCode::Data(Data::Continue), i == 60)));
                frames
            }
        };
        // A refused attack may see the connection reset while it is still sending.
        for message in attack {
            if ws.feed(message).await.is_err() {
                break;
            }
        }
        let _ = ws.flush().await;
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

/// What a burst of hostile clients cost one fresh server.
struct Burst {
    /// RSS at rest before the burst, warmed up.
    idle_kb: u64,
    /// The most RSS during the burst.
    peak_kb: u64,
    /// RSS once every client has made its attack, with those still connected.
    held_kb: u64,
    connected: usize,
    /// RSS [`SETTLE`] after the last client has gone.
    after_kb: u64,
    /// How long after the last client had gone the RSS was back within 10 % of
    /// `idle_kb`, if it was within [`SETTLE`].
    back_after: Option<Duration>,
}

/// `clients` clients arrive at once at a fresh server and each makes `attack`.
async fn burst(attack: Attack, clients: usize) -> Result<Burst, Error> {
    let server = Server::start("websocket", &WEBSOCKET_ENV).await?;
    // Warm up: the runtime's and the allocator's first growth is not the burst's.
    let warm =
        futures_util::future::try_join_all((0..WARM_UP_CLIENTS).map(|_| server.connect())).await?;
    drop(warm);
    server.wait_empty().await?;
    let idle_kb = server.settled_rss_kb().await?;
    procfs::reset_peak_rss(server.pid()?)
        .map_err(|e| format!("cannot reset the peak RSS (/proc/<pid>/clear_refs): {e}"))?;

    // All at once: no batches; what the listen backlog cannot hold is retried by
    // the kernel, as with real clients.
    let attacked = futures_util::future::join_all((0..clients).map(|_| async {
        let mut ws = server.connect().await?;
        attack.run(&mut ws).await?;
        Ok::<_, Error>(ws)
    }))
    .await;
    let mut open = Vec::with_capacity(clients);
    for ws in attacked {
        open.push(ws?);
    }
    let held_kb = server.settled_rss_kb().await?;
    let peak_kb = procfs::peak_rss_kb(server.pid()?).ok_or("no VmHWM")?;
    let connected = server.connections().await?;

    drop(open);
    server.wait_empty().await?;
    let gone = Instant::now();
    let mut back_after = None;
    let mut after_kb = server.rss_kb()?;
    while gone.elapsed() < SETTLE {
        if back_after.is_none() && after_kb * 10 <= idle_kb * 11 {
            back_after = Some(gone.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after_kb = server.rss_kb()?;
    }
    eprintln!(
        "{attack:?}: {idle_kb} kB at rest, peak {peak_kb} kB, {held_kb} kB held with \
         {connected} connected, {after_kb} kB {SETTLE:?} after they left"
    );
    Ok(Burst {
        idle_kb,
        peak_kb,
        held_kb,
        connected,
        after_kb,
        back_after,
    })
}

async fn hostile(clients: usize) -> Result<(), Error> {
    let mut rows = Vec::new();
    for attack in Attack::ALL {
        rows.push((attack, burst(attack, clients).await?));
    }
    #[allow(clippy::cast_precision_loss)]
    let per_client = |kb: u64, idle: u64| (kb.saturating_sub(idle) * 1024) as f64 / clients as f64;
    #[allow(clippy::cast_precision_loss)]
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!(
        "| What each of {clients} clients, arriving at once, did | Peak above rest, per client | \
         Held, per client | Still connected | RSS at rest → {}s after they left | Back within 10 % |",
        SETTLE.as_secs()
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (attack, b) in rows {
        println!(
            "| {} | {:.2} KB | {:.2} KB | {} | {:.1} → {:.1} MB | {} |",
            attack.describe(),
            per_client(b.peak_kb, b.idle_kb) / 1000.0,
            per_client(b.held_kb, b.idle_kb) / 1000.0,
            b.connected,
            mb(b.idle_kb),
            mb(b.after_kb),
            b.back_after
                .map_or_else(|| "no".to_owned(), |t| format!("{:.1} s", t.as_secs_f64())),
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

/// `--clients N`, or the default.
fn hostile_clients() -> Result<usize, Error> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--clients") {
        None => Ok(HOSTILE_CLIENTS),
        Some(i) => Ok(args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .ok_or("--clients takes a number of clients")?),
    }
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
        let clients = hostile_clients()?;
        check_fd_limit(clients)?;
        return hostile(clients).await;
    }
    check_fd_limit(IDLE_CLIENTS)?;

    // Idle connections first, each round on fresh processes (within their first
    // seconds, before load has churned the allocator), alternating which server
    // goes first.
    let mut base = [Vec::new(), Vec::new()];
    let mut idle = [Vec::new(), Vec::new()];
    let mut servers = None;
    for round in 0..IDLE_ROUNDS {
        let pair = [
            Server::start("ws-baseline", &[]).await?,
            Server::start("websocket", &WEBSOCKET_ENV).await?,
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
    for round in 0..ROUNDS {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let server = &servers[i];
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
    let (b, w) = (median(&idle[0]), median(&idle[1]));
    println!(
        "| RSS growth per idle connection, {IDLE_CLIENTS} clients, median of {IDLE_ROUNDS} rounds | \
         {b:.0} B | {w:.0} B | {:.2} × | ≤ 0.9 × |",
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
    Ok(())
}
