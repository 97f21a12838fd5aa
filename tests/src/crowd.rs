//! Websocket clients that behave like the page: connect, stay, and when the
//! connection ends reconnect after a random delay under a bound that starts at
//! 100 ms and doubles up to 4 s ("full jitter"), the bound starting over after a
//! successful connect. Each client records when it was connected, so a test can ask
//! how long any client was without a server.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::task::JoinHandle;

/// The page's first reconnect bound.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The page's largest reconnect bound.
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);

#[derive(Debug, Default)]
struct Record {
    /// Connected since, while connected.
    connected: Option<Instant>,
    /// Disconnected since, while not connected (and since the start).
    since: Option<Instant>,
    /// The longest time without a connection, among gaps that have ended.
    longest_gap: Duration,
    connects: u64,
    /// Connects refused or failed (a 503 from a leaving task, say).
    failed: u64,
}

/// A crowd of page-like clients of one `ws://` URL.
#[derive(Debug)]
pub struct Crowd {
    records: Vec<Arc<Mutex<Record>>>,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Crowd {
    /// Starts `n` clients of `url`, each connecting at a random moment within
    /// `spread`.
    #[must_use]
    pub fn start(url: &str, n: usize, spread: Duration) -> Self {
        let started = Instant::now();
        let mut records = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let record = Arc::new(Mutex::new(Record {
                since: Some(started),
                ..Record::default()
            }));
            records.push(Arc::clone(&record));
            let url = url.to_owned();
            let first = spread.mul_f64(rand_unit());
            tasks.push(tokio::spawn(client(url, record, first)));
        }
        Self {
            records,
            tasks,
            started,
        }
    }

    /// Clients connected now.
    #[must_use]
    pub fn connected(&self) -> usize {
        self.records
            .iter()
            .filter(|r| lock(r).connected.is_some())
            .count()
    }

    /// The longest any client has been without a connection since the first time it
    /// connected, counting gaps still open now.
    #[must_use]
    pub fn longest_gap(&self) -> Duration {
        let now = Instant::now();
        self.records
            .iter()
            .map(|r| {
                let r = lock(r);
                let open = match (r.connected, r.since) {
                    (None, Some(since)) if r.connects > 0 => now - since,
                    _ => Duration::ZERO,
                };
                r.longest_gap.max(open)
            })
            .max()
            .unwrap_or_default()
    }

    /// Every connect so far.
    #[must_use]
    pub fn connects(&self) -> u64 {
        self.records.iter().map(|r| lock(r).connects).sum()
    }

    /// Every connect that was refused or failed so far.
    #[must_use]
    pub fn failed_connects(&self) -> u64 {
        self.records.iter().map(|r| lock(r).failed).sum()
    }

    /// Since the crowd started.
    #[must_use]
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock(r: &Mutex<Record>) -> std::sync::MutexGuard<'_, Record> {
    r.lock().unwrap_or_else(PoisonError::into_inner)
}

fn rand_unit() -> f64 {
    rand::random_range(0.0..1.0)
}

async fn client(url: String, record: Arc<Mutex<Record>>, first: Duration) {
    tokio::time::sleep(first).await;
    let mut bound = MIN_BACKOFF;
    loop {
        let attempt = tokio_tungstenite::connect_async(&url).await;
        if attempt.is_err() {
            lock(&record).failed += 1;
        }
        if let Ok((mut ws, _)) = attempt {
            {
                let mut r = lock(&record);
                let now = Instant::now();
                if let Some(since) = r.since.take()
                    && r.connects > 0
                {
                    r.longest_gap = r.longest_gap.max(now - since);
                }
                r.connected = Some(now);
                r.connects += 1;
            }
            bound = MIN_BACKOFF;
            // Stay until the server closes or the connection fails.
            while let Some(Ok(_)) = ws.next().await {}
            let mut r = lock(&record);
            r.connected = None;
            r.since = Some(Instant::now());
        }
        let delay = bound.mul_f64(rand_unit());
        bound = (bound * 2).min(MAX_BACKOFF);
        tokio::time::sleep(delay).await;
    }
}
