//! Counts of what the worker did, logged when it stops.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts of messages by what became of them.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received.
    pub received: AtomicU64,
    /// Jobs done and deleted.
    pub done: AtomicU64,
    /// Messages handed back for another worker.
    pub handed_back: AtomicU64,
    /// Bodies rejected as bad input.
    pub bad: AtomicU64,
    /// Jobs that failed and will be retried.
    pub failed: AtomicU64,
    /// FIFO messages that used up their tries, moved to the dead-letter queue alone.
    pub dead_lettered: AtomicU64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "{} received, {} done, {} handed back, {} bad, {} failed, {} moved to the dead-letter queue",
            n(&self.received),
            n(&self.done),
            n(&self.handed_back),
            n(&self.bad),
            n(&self.failed),
            n(&self.dead_lettered)
        )
    }
}
