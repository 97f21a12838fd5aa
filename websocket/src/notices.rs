//! How the server tells its connections things: one broadcast channel per slice of
//! the connections, so the heartbeat can ping one slice at a time.
//!
//! Pinging every client at once costs a burst of work that delays the clients who
//! are talking: with 15,000 clients a round took about 200 ms, and the round trip of
//! active clients in that window went from under 1 ms (p99) to 166 ms. Spread over
//! [`SLICES`] slices, each tick pings a few dozen clients and the burst disappears.
//! Messages for everyone (a refusal, the goodbye) go to every slice. A connection
//! still owns no timer and listens to one channel.
//!
//! The goodbye is paced per client, not per slice: the slices are dealt round robin,
//! so clients that joined together sit in neighbouring slices, and a task with fewer
//! clients than slices would tell them all within the first part of the spread. Each
//! connection takes a turn of one [`Pacer`] instead, the turns evenly spaced.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::connection::Notice;
use crate::connection::turn::Pacer;

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

    /// Tells every connection to leave, one at a time, evenly over `spread`: the
    /// clients of a stopping task then reconnect to the others in a steady stream
    /// rather than all in the same 100 ms.
    pub async fn goodbye(&self, spread: Duration) {
        self.spread(&Notice::ShuttingDown, spread).await;
    }

    /// Sends `notice` to every connection, one at a time, evenly over `spread`; ends
    /// once the last turn has come. Dropped before that, the turns still to come are
    /// called off.
    pub async fn spread(&self, notice: &Notice, spread: Duration) {
        let listeners = u32::try_from(self.listeners()).unwrap_or(u32::MAX).max(1);
        let pacer = Arc::new(Pacer::new(notice.clone(), spread / listeners));
        let mut unfinished = CallOff(Some(Arc::clone(&pacer)));
        self.send_all(&Notice::Paced(pacer));
        tokio::time::sleep(spread).await;
        unfinished.0 = None;
    }

    /// Connections listening now, in every slice.
    #[must_use]
    pub fn listeners(&self) -> usize {
        self.slices
            .iter()
            .map(broadcast::Sender::receiver_count)
            .sum()
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

/// Calls off a pacer's turns still to come when dropped while set.
struct CallOff(Option<Arc<Pacer>>);

impl Drop for CallOff {
    fn drop(&mut self) {
        if let Some(pacer) = &self.0 {
            pacer.call_off();
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
    async fn the_goodbye_is_one_pacer_for_every_connection_its_turns_spread_evenly() {
        let notices = std::sync::Arc::new(Notices::default());
        let mut receivers: Vec<_> = (0..100).map(|_| notices.subscribe()).collect();
        let spread = Duration::from_secs(10);
        let goodbye = tokio::spawn({
            let notices = std::sync::Arc::clone(&notices);
            async move { notices.goodbye(spread).await }
        });
        tokio::task::yield_now().await;
        let start = Instant::now();
        let mut turns = Vec::new();
        let mut pacers = Vec::new();
        for r in &mut receivers {
            match r.try_recv() {
                Ok(Notice::Paced(pacer)) => {
                    assert_eq!(pacer.notice(), &Notice::ShuttingDown);
                    turns.push(pacer.take_turn() - start);
                    pacers.push(pacer);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(pacers.windows(2).all(|w| w[0] == w[1]), "one pacer");
        // 100 connections over 10 s: one every 100 ms, whatever their slices.
        let expected: Vec<_> = (0..100).map(|i| Duration::from_millis(100) * i).collect();
        assert_eq!(turns, expected);
        goodbye.await.expect("finishes");
        assert!(
            !pacers[0].called_off(),
            "the turns stand once the spread is done"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_spread_dropped_before_its_end_calls_off_the_turns_to_come() {
        let notices = std::sync::Arc::new(Notices::default());
        let mut receiver = notices.subscribe();
        let spread = tokio::spawn({
            let notices = std::sync::Arc::clone(&notices);
            async move {
                notices
                    .spread(&Notice::Leave, Duration::from_secs(10))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(Notice::Paced(pacer)) = receiver.try_recv() else {
            panic!("no paced notice")
        };
        assert!(!pacer.called_off());
        spread.abort();
        let _ = spread.await;
        assert!(pacer.called_off());
    }
}
