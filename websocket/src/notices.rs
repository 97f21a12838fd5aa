//! How the server tells its connections things: one broadcast channel per slice of
//! the connections, so the heartbeat can ping one slice at a time.
//!
//! Pinging every client at once costs a burst of work that delays the clients who
//! are talking: with 15,000 clients a round took about 200 ms, and the round trip of
//! active clients in that window went from under 1 ms (p99) to 166 ms. Spread over
//! [`SLICES`] slices, each tick pings a few dozen clients and the burst disappears.
//! Messages for everyone (a refusal, the goodbye) go to every slice. A connection
//! still owns no timer and listens to one channel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::connection::Notice;

/// How many slices the connections are dealt into, round robin.
pub const SLICES: usize = 256;

/// The senders of every slice.
#[derive(Debug)]
pub struct Notices {
    slices: Vec<broadcast::Sender<Notice>>,
    next: AtomicUsize,
}

impl Default for Notices {
    fn default() -> Self {
        Self {
            slices: (0..SLICES).map(|_| broadcast::channel(16).0).collect(),
            next: AtomicUsize::new(0),
        }
    }
}

impl Notices {
    /// A receiver for a new connection, in the next slice.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        let slice = self.next.fetch_add(1, Ordering::Relaxed) % self.slices.len();
        self.slices[slice].subscribe()
    }

    /// Tells every connection.
    pub fn send_all(&self, notice: &Notice) {
        for slice in &self.slices {
            let _ = slice.send(notice.clone());
        }
    }

    /// Tells every connection to leave, one slice at a time, the slices evenly spaced
    /// over `spread`: the clients of a stopping task then reconnect to the others in a
    /// steady stream rather than all in the same 100 ms.
    pub async fn goodbye(&self, spread: Duration) {
        self.spread(&Notice::ShuttingDown, spread).await;
    }

    /// Sends `notice` to every connection, one slice at a time, the slices evenly
    /// spaced over `spread`.
    pub async fn spread(&self, notice: &Notice, spread: Duration) {
        let start = Instant::now();
        let slices = u32::try_from(self.slices.len()).unwrap_or(u32::MAX).max(1);
        for (i, slice) in (0..slices).zip(&self.slices) {
            tokio::time::sleep_until(start + spread * i / slices).await;
            let _ = slice.send(notice.clone());
        }
    }

    /// Pings every connection once per `every`, one slice per tick: each client gets
    /// a heartbeat every `every`, and a client that missed two pongs is dropped.
    pub async fn heartbeat(&self, every: Duration) {
        let slices = u32::try_from(self.slices.len()).unwrap_or(u32::MAX).max(1);
        let tick = (every / slices).max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(Instant::now() + tick, tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for slice in self.slices.iter().cycle() {
            ticks.tick().await;
            let _ = slice.send(Notice::Heartbeat);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_connection_gets_one_heartbeat_per_interval_and_few_at_a_time() {
        let notices = std::sync::Arc::new(Notices::default());
        let mut receivers: Vec<_> = (0..SLICES * 4).map(|_| notices.subscribe()).collect();
        let beat = tokio::spawn({
            let notices = std::sync::Arc::clone(&notices);
            async move { notices.heartbeat(Duration::from_secs(25)).await }
        });
        let tick = Duration::from_secs(25) / u32::try_from(SLICES).unwrap();
        // One tick: only one slice (4 connections) is pinged.
        tokio::time::sleep(tick + Duration::from_millis(1)).await;
        let mut pinged = 0;
        for r in &mut receivers {
            if r.try_recv().is_ok() {
                pinged += 1;
            }
        }
        assert_eq!(pinged, 4);
        // A whole interval: every connection exactly once more or less one tick.
        tokio::time::sleep(Duration::from_secs(25) - tick).await;
        for r in &mut receivers {
            let mut n = 0;
            while r.try_recv().is_ok() {
                n += 1;
            }
            assert!(n <= 1, "{n} heartbeats in one interval");
        }
        notices.send_all(&Notice::ShuttingDown);
        assert!(
            receivers
                .iter_mut()
                .all(|r| r.try_recv() == Ok(Notice::ShuttingDown))
        );
        beat.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_goodbye_reaches_every_slice_once_spread_evenly() {
        let notices = std::sync::Arc::new(Notices::default());
        let mut receivers: Vec<_> = (0..SLICES * 2).map(|_| notices.subscribe()).collect();
        let spread = Duration::from_secs(10);
        let goodbye = tokio::spawn({
            let notices = std::sync::Arc::clone(&notices);
            async move { notices.goodbye(spread).await }
        });
        let mut told = 0;
        let mut max_per_100ms = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut now = 0;
            for r in &mut receivers {
                match r.try_recv() {
                    Ok(notice) => {
                        assert_eq!(notice, Notice::ShuttingDown);
                        now += 1;
                    }
                    Err(broadcast::error::TryRecvError::Empty) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            told += now;
            max_per_100ms = max_per_100ms.max(now);
        }
        goodbye.await.expect("finishes");
        // 512 connections over 10 s: about 5 per 100 ms, never all at once.
        assert_eq!(told, SLICES * 2);
        assert!(max_per_100ms <= 8, "{max_per_100ms} told in one 100 ms");
        assert!(receivers.iter_mut().all(|r| r.try_recv().is_err()));
    }
}
