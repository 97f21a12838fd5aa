//! Goodbyes in turn: one notice for every connection, which each connection acts on
//! at its own time, the times `interval` apart. So N clients are told over N ×
//! interval, evenly, whatever the order in which they joined; a client that leaves
//! early gives its turn to nobody, and the rest keep theirs.
//!
//! Turns are handed out in the order connections hear the notice, which is nearly at
//! once for all of them. Only a connection waiting for its turn holds a timer.

use std::future::Future as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::Notice;

/// One paced notice: what to tell, and the turns.
#[derive(Debug)]
pub struct Pacer {
    notice: Notice,
    start: Instant,
    interval: Duration,
    next: AtomicU32,
    called_off: AtomicBool,
}

impl PartialEq for Pacer {
    /// The same pacer: two paced notices are alike only when they are one.
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Pacer {}

impl Pacer {
    /// Tells `notice` (the goodbye, or the drain's `please reconnect`) one
    /// connection at a time, the first at once and each next one `interval` later.
    #[must_use]
    pub fn new(notice: Notice, interval: Duration) -> Self {
        Self {
            notice,
            start: Instant::now(),
            interval,
            next: AtomicU32::new(0),
            called_off: AtomicBool::new(false),
        }
    }

    /// What each connection is told in its turn.
    #[must_use]
    pub fn notice(&self) -> &Notice {
        &self.notice
    }

    /// Hands out the next turn: when its connection is told.
    pub fn take_turn(&self) -> Instant {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.start + self.interval.saturating_mul(n)
    }

    /// Stops the turns not yet taken effect: connections whose time comes later are
    /// not told.
    pub fn call_off(&self) {
        self.called_off.store(true, Ordering::Relaxed);
    }

    /// True once called off.
    #[must_use]
    pub fn called_off(&self) -> bool {
        self.called_off.load(Ordering::Relaxed)
    }
}

pin_project! {
    /// One connection's turn, while it waits for it.
    #[derive(Debug)]
    pub(crate) struct Turn {
        #[pin]
        sleep: Sleep,
        pacer: Arc<Pacer>,
    }
}

impl Turn {
    /// Takes the next turn of `pacer`.
    pub(crate) fn take(pacer: Arc<Pacer>) -> Self {
        Self {
            sleep: tokio::time::sleep_until(pacer.take_turn()),
            pacer,
        }
    }

    /// Ready with the notice once the turn has come, unless called off meanwhile.
    pub(crate) fn poll_due(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Notice>> {
        let this = self.project();
        std::task::ready!(this.sleep.poll(cx));
        Poll::Ready((!this.pacer.called_off()).then(|| this.pacer.notice().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn turns_come_interval_apart_in_the_order_taken() {
        let pacer = Pacer::new(Notice::Leave, Duration::from_millis(100));
        let start = Instant::now();
        let turns: Vec<_> = (0..5).map(|_| pacer.take_turn() - start).collect();
        assert_eq!(turns, [0, 100, 200, 300, 400].map(Duration::from_millis));
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_called_off_tells_nothing() {
        let pacer = Arc::new(Pacer::new(Notice::ShuttingDown, Duration::from_secs(1)));
        let mut first = Box::pin(Turn::take(Arc::clone(&pacer)));
        let mut second = Box::pin(Turn::take(Arc::clone(&pacer)));
        let due = std::future::poll_fn(|cx| first.as_mut().poll_due(cx)).await;
        assert_eq!(due, Some(Notice::ShuttingDown));
        pacer.call_off();
        let due = std::future::poll_fn(|cx| second.as_mut().poll_due(cx)).await;
        assert_eq!(due, None);
    }
}
