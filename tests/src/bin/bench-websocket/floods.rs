//! `--floods`: what one flooding client costs the server in CPU, on three fresh
//! servers in the same run: with the defaults (the budget of frames and bytes a
//! second); with the deployment files' count per address
//! (`MAX_CONNECTIONS_PER_ADDRESS=100`, which also turns a flooder's address away for
//! 10 s); and with the budget out of reach, as before there was one.
//!
//! Each flood runs for [`FLOOD`] from one raw client that writes its frames as fast
//! as the server takes them (or at a set pace) and reads whatever comes back; a
//! client that is closed reconnects at once and starts again, and one that is turned
//! away asks again at once, as a determined one would. The figure is the server
//! process's CPU time over the flood (every thread's, from
//! `/proc/<pid>/task/*/schedstat`, in nanoseconds), as a share of one core, less what
//! the same server spends idle over as long.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use e2e::bench::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{STEP, Server, WEBSOCKET_ENV};

/// How long each flood lasts.
const FLOOD: Duration = Duration::from_secs(10);
/// Below the default `MAX_FRAMES_PER_SECOND` (1,000): a client that keeps to the
/// budget.
const WITHIN_BUDGET: u32 = 950;

/// One kind of flood.
#[derive(Debug, Clone)]
struct Flood {
    what: &'static str,
    frame: Vec<u8>,
    /// Frames a second; `None`: as fast as the server takes them.
    pace: Option<u32>,
}

/// A masked client frame (all-zero mask).
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | u8::try_from(n).unwrap_or(125)),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

fn floods() -> Vec<Flood> {
    vec![
        Flood {
            what: "1-byte text frames, as fast as it can",
            frame: frame(0x1, b"x"),
            pace: None,
        },
        Flood {
            what: "pong frames of 4 bytes, as fast as it can",
            frame: frame(0xA, b"pong"),
            pace: None,
        },
        Flood {
            what: "1 KiB binary messages, as fast as it can",
            frame: frame(0x2, &[0_u8; 1024]),
            pace: None,
        },
        Flood {
            what: "`ping` texts at 950 a second, each answered with `pong`",
            frame: frame(0x1, b"ping"),
            pace: Some(WITHIN_BUDGET),
        },
        Flood {
            what: "1-byte text frames at 950 a second",
            frame: frame(0x1, b"x"),
            pace: Some(WITHIN_BUDGET),
        },
    ]
}

/// CPU time of every thread of process `pid`, in nanoseconds.
fn cpu_ns(pid: u32) -> Result<u64, Error> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let schedstat = std::fs::read_to_string(task?.path().join("schedstat"))?;
        total += schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .ok_or("an unreadable schedstat")?;
    }
    Ok(total)
}

/// Share of one core that `pid` used while `work` ran.
async fn cpu_share<F: Future>(pid: u32, work: F) -> Result<(f64, F::Output), Error> {
    let before = cpu_ns(pid)?;
    let started = std::time::Instant::now();
    let out = work.await;
    let elapsed = started.elapsed();
    #[allow(clippy::cast_precision_loss)]
    let share = (cpu_ns(pid)?.saturating_sub(before)) as f64 / elapsed.as_nanos() as f64;
    Ok((share, out))
}

/// A websocket over a raw connection once the server has answered 101; `None` when
/// it answered something else.
async fn upgrade(port: u16) -> Result<Option<TcpStream>, Error> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        if tcp.read(&mut byte).await? == 0 {
            return Err("closed during the handshake".into());
        }
        head.push(byte[0]);
    }
    Ok(head.starts_with(b"HTTP/1.1 101").then_some(tcp))
}

/// What a flooder did.
#[derive(Debug, Default)]
struct Counts {
    connections: AtomicU64,
    turned_away: AtomicU64,
    frames: AtomicU64,
}

/// Floods `port` with `flood` until `stop`: one connection at a time, a new one as
/// soon as the server closes the last, asking again at once when turned away.
async fn flooder(
    port: u16,
    flood: &Flood,
    stop: &AtomicBool,
    counts: &Counts,
) -> Result<(), Error> {
    let per_write = match flood.pace {
        // Every 10 ms, a hundredth of the pace.
        Some(pace) => usize::try_from(pace / 100).unwrap_or(1).max(1),
        None => (64 * 1024 / flood.frame.len()).max(1),
    };
    let chunk = flood.frame.repeat(per_write);
    while !stop.load(Ordering::Relaxed) {
        let Some(tcp) = upgrade(port).await? else {
            counts.turned_away.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (mut from, mut to) = tcp.into_split();
        counts.connections.fetch_add(1, Ordering::Relaxed);
        // Whatever the server sends is read and dropped, until it closes.
        let mut reader = tokio::spawn(async move {
            let mut buf = vec![0_u8; 16 * 1024];
            while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if flood.pace.is_some() {
                tick.tick().await;
            }
            tokio::select! {
                written = to.write_all(&chunk) => if written.is_err() { break },
                _ = &mut reader => break,
            }
            counts.frames.fetch_add(per_write as u64, Ordering::Relaxed);
        }
        reader.abort();
    }
    Ok(())
}

/// One flood against `server`: the server's share of a core, and what the client did.
async fn run(server: &Server, flood: &Flood) -> Result<(f64, Arc<Counts>), Error> {
    let pid = server.pid()?;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let (share, ()) = cpu_share(pid, async {
        let task = tokio::spawn({
            let (stop, counts, port) = (Arc::clone(&stop), Arc::clone(&counts), server.port);
            let flood = flood.clone();
            async move { flooder(port, &flood, &stop, &counts).await }
        });
        tokio::time::sleep(FLOOD).await;
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(STEP, task).await;
    })
    .await?;
    server.wait_empty().await?;
    // The next flood starts after the bar, if any, has ended.
    tokio::time::sleep(Duration::from_secs(11)).await;
    Ok((share, counts))
}

pub(crate) async fn floods_cost() -> Result<(), Error> {
    let mut deployed_env = WEBSOCKET_ENV.to_vec();
    deployed_env.push(("MAX_CONNECTIONS_PER_ADDRESS", "100"));
    let mut unlimited_env = WEBSOCKET_ENV.to_vec();
    unlimited_env.push(("MAX_FRAMES_PER_SECOND", "1000000"));
    unlimited_env.push(("MAX_BYTES_PER_SECOND", "1073741824"));
    let servers = [
        (
            "defaults",
            Server::start("websocket", &WEBSOCKET_ENV).await?,
        ),
        (
            "MAX_CONNECTIONS_PER_ADDRESS=100",
            Server::start("websocket", &deployed_env).await?,
        ),
        (
            "budget out of reach",
            Server::start("websocket", &unlimited_env).await?,
        ),
    ];
    let mut idle = Vec::new();
    for (_, server) in &servers {
        let (share, ()) = cpu_share(server.pid()?, tokio::time::sleep(FLOOD)).await?;
        idle.push(share);
    }
    println!(
        "| What one client sends for {} s, reconnecting whenever closed | {} | {} | {} |",
        FLOOD.as_secs(),
        servers[0].0,
        servers[1].0,
        servers[2].0
    );
    println!("|---|---|---|---|");
    for flood in floods() {
        let mut cells = Vec::new();
        for (i, (name, server)) in servers.iter().enumerate() {
            let (share, counts) = run(server, &flood).await?;
            let share = (share - idle[i]).max(0.0);
            let connections = counts.connections.load(Ordering::Relaxed);
            let turned_away = counts.turned_away.load(Ordering::Relaxed);
            let frames = counts.frames.load(Ordering::Relaxed);
            eprintln!(
                "{} ({name}): {:.2} % of a core, {connections} connections, {turned_away} \
                 turned away, {frames} frames written",
                flood.what,
                share * 100.0
            );
            let away = if turned_away > 0 {
                format!(", {turned_away} turned away")
            } else {
                String::new()
            };
            cells.push(format!(
                "**{:.2} %**; {connections} connection(s){away}",
                share * 100.0
            ));
        }
        println!("| {} | {} |", flood.what, cells.join(" | "));
    }
    println!();
    let idle: Vec<String> = idle.iter().map(|s| format!("{:.3} %", s * 100.0)).collect();
    println!("Idle, for reference: {} of a core.", idle.join(", "));
    Ok(())
}
