//! `--hostile`: what a burst of hostile clients costs one fresh server, in memory.

use std::time::{Duration, Instant};

use e2e::bench::{Error, procfs};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::{STEP, Server, WEBSOCKET_ENV, Ws};

/// Hostile clients arriving at once, unless `--clients N` says otherwise.
const HOSTILE_CLIENTS: usize = 2_000;
/// Clients that connect and leave before a hostile burst, so the process's one-time
/// growth (runtime, allocator, first connections) is not counted as the burst's.
const WARM_UP_CLIENTS: usize = 100;
/// How long after the last hostile client has gone the RSS is read again.
const SETTLE: Duration = Duration::from_secs(10);
/// The server's default `MAX_MESSAGE_BYTES`.
const MAX_MESSAGE_BYTES: usize = 1024;

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

pub(crate) async fn hostile(clients: usize) -> Result<(), Error> {
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

/// `--clients N`, or the default.
pub(crate) fn hostile_clients() -> Result<usize, Error> {
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
