//! The `websocket` server at scale: 15,000 clients from two client processes (each
//! process may hold 20,000 open files here), on loopback only; stops by itself in
//! about two minutes.
//!
//! Figures:
//! - RSS per idle client, and the connect rate while all of them connect;
//! - the p50/p99 ping/pong round trip of 50 active clients (a ping every 50 ms each)
//!   while the rest sit idle, apart for samples sent during a server ping round and
//!   outside one;
//! - the server's CPU time per ping round to every client, over two intervals in
//!   which no client is active;
//! - the time from SIGTERM to exit with every client told to leave, and the curve of
//!   reconnects (per 100 ms) that arrive at a second server: clients come back as the
//!   page does, after a random delay below its first backoff of 100 ms.
//!
//! ```text
//! cargo build --release -p websocket -p e2e --bins
//! ulimit -n 20000 && target/release/bench-scale
//! ```
//!
//! `bench-scale client URL FALLBACK N ACTIVE` is the client process it starts twice.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::bench::{Error, procfs, sibling, start_listening};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::Semaphore;
use tokio_tungstenite::connect_async_with_config;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The default; `BENCH_CLIENTS` overrides it for a quick try.
const CLIENTS: usize = 15_000;
const ACTIVE: usize = 50;
const PING_INTERVAL_SECONDS: u64 = 10;
const GRACE_SECONDS: u64 = 20;
const STEP: Duration = Duration::from_secs(120);

fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------- client process

/// What a client process has seen, reported as one JSON line per command.
#[derive(Default)]
struct Seen {
    /// Epoch ms of each server ping received (the first per client per round).
    pings: Vec<f64>,
    /// (epoch ms sent, round trip ms) of each active ping.
    rtts: Vec<(f64, f64)>,
    /// Epoch ms of each goodbye, and of each welcome from the fallback server.
    goodbyes: Vec<f64>,
    reconnects: Vec<f64>,
}

/// The page's first reconnect delay: random below 100 ms (full jitter). Here spread
/// evenly by the client's number, which is as good and needs no generator.
fn page_backoff(i: usize) -> Duration {
    Duration::from_millis(u64::try_from(i.wrapping_mul(2_654_435_761) % 100).unwrap_or(0))
}

async fn client_process(
    url: String,
    fallback: String,
    n: usize,
    active: usize,
) -> Result<(), Error> {
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let go_active = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(Semaphore::new(256));
    let first = epoch_ms();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (url, fallback) = (url.clone(), fallback.clone());
        let (seen, go_active, connected, handshakes) = (
            Arc::clone(&seen),
            Arc::clone(&go_active),
            Arc::clone(&connected),
            Arc::clone(&handshakes),
        );
        tasks.push(tokio::spawn(async move {
            let permit = handshakes.acquire_owned().await?;
            let mut tries = 0;
            let mut ws = loop {
                // A full accept queue resets some handshakes: try again, as a page would.
                match connect_async_with_config(&url, Some(config), true).await {
                    Ok((ws, _)) => break ws,
                    Err(e) if tries >= 50 => return Err(e.into()),
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            ws.next().await; // the welcome
            drop(permit);
            connected.fetch_add(1, Ordering::SeqCst);
            let mut round_seen = 0.0_f64;
            let mut next_ping = tokio::time::Instant::now();
            let mut sent_at: Option<(f64, Instant)> = None;
            loop {
                let is_active = i < active && go_active.load(Ordering::Relaxed);
                let can_ping = is_active && sent_at.is_none();
                let tick = async move {
                    if can_ping {
                        tokio::time::sleep_until(next_ping).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    () = tick => {
                        sent_at = Some((epoch_ms(), Instant::now()));
                        next_ping += Duration::from_millis(50);
                        ws.send(Message::text("ping")).await?;
                    }
                    () = tokio::time::sleep(Duration::from_millis(200)), if i < active && !is_active => {}
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Ping(_))) => {
                            let now = epoch_ms();
                            if now - round_seen > 2_000.0 {
                                round_seen = now;
                                seen.lock().map_err(|_| "poisoned")?.pings.push(now);
                            }
                        }
                        Some(Ok(Message::Text(t))) if t.as_str() == "pong" => {
                            if let Some((at, start)) = sent_at.take() {
                                let rtt = start.elapsed().as_secs_f64() * 1000.0;
                                seen.lock().map_err(|_| "poisoned")?.rtts.push((at, rtt));
                            }
                        }
                        Some(Ok(Message::Text(t))) if t.as_str().contains("shutting down") => {
                            seen.lock().map_err(|_| "poisoned")?.goodbyes.push(epoch_ms());
                            break;
                        }
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                        Some(Ok(_)) => {}
                    },
                }
            }
            drop(ws);
            tokio::time::sleep(page_backoff(i)).await;
            let (mut ws, _) = connect_async_with_config(&fallback, Some(config), true).await?;
            ws.next().await;
            seen.lock().map_err(|_| "poisoned")?.reconnects.push(epoch_ms());
            // Hold it until the process ends.
            while let Some(Ok(_)) = ws.next().await {}
            Ok::<(), Error>(())
        }));
    }
    while connected.load(Ordering::SeqCst) < n {
        if tasks.iter().any(tokio::task::JoinHandle::is_finished) {
            return Err("a client could not connect".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{}",
        json!({"event": "connected", "first": first, "last": epoch_ms()})
    );
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = commands.next_line().await? {
        match line.trim() {
            "active" => go_active.store(true, Ordering::SeqCst),
            "quiet" => go_active.store(false, Ordering::SeqCst),
            "report" => {
                let s = seen.lock().map_err(|_| "poisoned")?;
                println!(
                    "{}",
                    json!({"event": "report", "pings": s.pings, "rtts": s.rtts,
                           "goodbyes": s.goodbyes, "reconnects": s.reconnects})
                );
            }
            _ => break,
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

// ---------------------------------------------------------------- orchestrator

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    async fn start() -> Result<Self, Error> {
        let env = [
            ("BIND_ADDRESS", "127.0.0.1".to_owned()),
            ("TASK_PROTECTION_BACKEND", "local".to_owned()),
            ("MAX_CONNECTIONS", "20000".to_owned()),
            (
                "WS_PING_INTERVAL_SECONDS",
                PING_INTERVAL_SECONDS.to_string(),
            ),
            ("SHUTDOWN_GRACE_SECONDS", GRACE_SECONDS.to_string()),
            ("RUST_LOG", "info".to_owned()),
        ];
        let (child, port) = start_listening(&sibling("websocket"), env, STEP).await?;
        Ok(Self { child, port })
    }

    fn pid(&self) -> Result<u32, Error> {
        Ok(self.child.id().ok_or("the server exited")?)
    }

    fn rss_kb(&self) -> Result<u64, Error> {
        Ok(procfs::rss_kb(self.pid()?).ok_or("no VmRSS")?)
    }

    /// User plus system CPU time, in clock ticks (1/100 s here).
    fn cpu_ticks(&self) -> Result<u64, Error> {
        Ok(procfs::cpu_ticks(self.pid()?).ok_or("no CPU times")?)
    }
}

/// The kernel's slab memory (sockets, files, dentries), machine-wide.
fn slab_kb() -> Result<u64, Error> {
    Ok(procfs::meminfo_kb("Slab").ok_or("no Slab in /proc/meminfo")?)
}

struct ClientProc {
    _child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl ClientProc {
    fn start(url: &str, fallback: &str, n: usize, active: usize) -> Result<Self, Error> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["client", url, fallback, &n.to_string(), &active.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        Ok(Self {
            _child: child,
            stdin,
            lines,
        })
    }

    async fn event(&mut self) -> Result<Value, Error> {
        let line = tokio::time::timeout(STEP, self.lines.next_line())
            .await??
            .ok_or("the client process ended")?;
        Ok(serde_json::from_str(&line)?)
    }

    async fn say(&mut self, command: &str) -> Result<(), Error> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        Ok(self.stdin.flush().await?)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

#[allow(clippy::too_many_lines, clippy::cast_precision_loss)]
async fn orchestrate() -> Result<(), Error> {
    let clients: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CLIENTS);
    let mut a = Server::start().await?;
    let b = Server::start().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_kb = a.rss_kb()?;
    let slab_before = slab_kb()?;
    let (url, fallback) = (
        format!("ws://127.0.0.1:{}/", a.port),
        format!("ws://127.0.0.1:{}/", b.port),
    );
    let half = clients / 2;
    let mut procs = vec![
        ClientProc::start(&url, &fallback, half, ACTIVE / 2)?,
        ClientProc::start(&url, &fallback, clients - half, ACTIVE - ACTIVE / 2)?,
    ];
    eprintln!("bench-scale: connecting {clients} clients");
    let mut first = f64::MAX;
    let mut last = 0.0_f64;
    for p in &mut procs {
        let e = p.event().await?;
        first = first.min(e["first"].as_f64().unwrap_or(f64::MAX));
        last = last.max(e["last"].as_f64().unwrap_or(0.0));
    }
    let connect_secs = (last - first) / 1000.0;
    eprintln!("bench-scale: connected in {connect_secs:.1} s; measuring");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full_kb = a.rss_kb()?;
    let slab_after = slab_kb()?;

    // Active clients for three ping rounds; CPU over the same window.
    let cpu_before = a.cpu_ticks()?;
    let window = Instant::now();
    for p in &mut procs {
        p.say("active").await?;
    }
    tokio::time::sleep(Duration::from_secs(3 * PING_INTERVAL_SECONDS)).await;
    for p in &mut procs {
        p.say("quiet").await?;
    }
    let cpu_ticks = a.cpu_ticks()? - cpu_before;
    let window_secs = window.elapsed().as_secs_f64();

    // Then two intervals with every client idle: the CPU of the pings alone.
    let cpu_before = a.cpu_ticks()?;
    tokio::time::sleep(Duration::from_secs(2 * PING_INTERVAL_SECONDS)).await;
    let idle_ping_ticks = a.cpu_ticks()? - cpu_before;

    // Goodbye: SIGTERM, and every client comes back at the second server.
    let pid = a.child.id().ok_or("the server exited")?;
    let term = Instant::now();
    let term_ms = epoch_ms();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    tokio::time::timeout(STEP, a.child.wait()).await??;
    let exit_secs = term.elapsed().as_secs_f64();
    eprintln!("bench-scale: exited {exit_secs:.2} s after SIGTERM; waiting for reconnects");
    tokio::time::sleep(Duration::from_secs(GRACE_SECONDS + 5)).await;

    let (mut pings, mut rtts, mut reconnects) = (Vec::new(), Vec::new(), Vec::new());
    for p in &mut procs {
        p.say("report").await?;
        let r = p.event().await?;
        pings.extend(floats(&r["pings"]));
        reconnects.extend(floats(&r["reconnects"]));
        for pair in r["rtts"].as_array().into_iter().flatten() {
            if let (Some(at), Some(rtt)) = (pair[0].as_f64(), pair[1].as_f64()) {
                rtts.push((at, rtt));
            }
        }
        p.say("end").await?;
    }
    drop(b);

    // Ping rounds: clusters of ping arrivals; a burst spans the first to the last.
    pings.sort_by(f64::total_cmp);
    let mut rounds: Vec<(f64, f64)> = Vec::new();
    for t in pings {
        match rounds.last_mut() {
            Some(r) if t - r.1 < 2_000.0 => r.1 = t,
            _ => rounds.push((t, t)),
        }
    }
    let in_burst = |at: f64| rounds.iter().any(|(s, e)| at >= s - 50.0 && at <= e + 50.0);
    let mut burst: Vec<f64> = rtts
        .iter()
        .filter(|(at, _)| in_burst(*at))
        .map(|r| r.1)
        .collect();
    let mut quiet: Vec<f64> = rtts
        .iter()
        .filter(|(at, _)| !in_burst(*at))
        .map(|r| r.1)
        .collect();
    burst.sort_by(f64::total_cmp);
    quiet.sort_by(f64::total_cmp);
    let round_ms: Vec<String> = rounds
        .iter()
        .map(|(s, e)| format!("{:.0}", e - s))
        .collect();

    let mut curve: BTreeMap<i64, usize> = BTreeMap::new();
    #[allow(clippy::cast_possible_truncation)]
    for t in &reconnects {
        *curve
            .entry(((t - term_ms) / 100.0).floor() as i64)
            .or_default() += 1;
    }
    let peak = curve.values().copied().max().unwrap_or(0);
    let spread = match (curve.keys().next(), curve.keys().last()) {
        (Some(f), Some(l)) => (l - f + 1) as f64 / 10.0,
        _ => 0.0,
    };

    println!("| Figure | Value |");
    println!("|---|---|");
    println!("| Clients | {clients} from 2 processes |");
    println!("| Base RSS | {:.1} MB |", base_kb as f64 / 1024.0);
    println!(
        "| RSS with every client connected | {:.1} MB: {:.2} KB per client |",
        full_kb as f64 / 1024.0,
        (full_kb.saturating_sub(base_kb) * 1024) as f64 / clients as f64 / 1000.0
    );
    println!(
        "| Kernel slab memory per connection, server end (half the growth: both ends are here) | {:.2} KB |",
        (slab_after.saturating_sub(slab_before) * 1024) as f64 / 2.0 / clients as f64 / 1000.0
    );
    println!(
        "| Connect rate | {:.0} clients/s ({clients} in {connect_secs:.1} s) |",
        clients as f64 / connect_secs
    );
    println!(
        "| Round trip, {ACTIVE} active clients, outside ping rounds | p50 {:.2} ms, p99 {:.2} ms ({} samples) |",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        quiet.len()
    );
    println!(
        "| Round trip during a server ping round | p50 {:.2} ms, p99 {:.2} ms ({} samples) |",
        percentile(&burst, 0.5),
        percentile(&burst, 0.99),
        burst.len()
    );
    println!(
        "| Ping rounds seen, first to last client | {} rounds, {} ms |",
        rounds.len(),
        round_ms.join(" / ")
    );
    println!(
        "| Server CPU over {window_secs:.0} s with {} ping rounds and the active clients | {:.2} s |",
        rounds.len(),
        cpu_ticks as f64 / 100.0
    );
    println!(
        "| Server CPU per ping round to all {clients} clients, nobody active ({} s measured) | {:.2} s |",
        2 * PING_INTERVAL_SECONDS,
        idle_ping_ticks as f64 / 100.0 / 2.0
    );
    println!("| SIGTERM to exit | {exit_secs:.2} s |");
    println!(
        "| Reconnects at the second server | {} of {clients}, over {spread:.1} s, peak {peak} per 100 ms |",
        reconnects.len()
    );
    println!();
    println!("Reconnects per 100 ms after SIGTERM (bucket: count):");
    let buckets: Vec<String> = curve.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    println!("{}", buckets.join(" "));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        let get = |i: usize| {
            args.get(i)
                .cloned()
                .ok_or("usage: bench-scale client URL FALLBACK N ACTIVE")
        };
        return client_process(get(2)?, get(3)?, get(4)?.parse()?, get(5)?.parse()?).await;
    }
    tokio::time::timeout(Duration::from_secs(600), orchestrate()).await?
}
