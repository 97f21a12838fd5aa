//! The count of connected clients, and the protection each one holds.
//!
//! Every client owns a [`Slot`]: taking one counts the client and registers a
//! protection holder; dropping it, on whatever path the connection ends (close frame,
//! TCP reset, silent peer, panic), uncounts it and lets go of the hold. So the count
//! returns to exactly 0 and protection is released once the last client has gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use task_protection::{ProtectionGuard, TaskProtection};

/// The clients connected now, with a limit.
#[derive(Debug)]
pub struct Connections {
    count: AtomicUsize,
    limit: usize,
    protection: TaskProtection,
}

impl Connections {
    /// An empty registry that admits at most `limit` clients and has each hold
    /// `protection`.
    #[must_use]
    pub fn new(limit: usize, protection: TaskProtection) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            limit,
            protection,
        })
    }

    /// Clients connected now.
    #[must_use]
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The most clients admitted at once.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The protection each client holds.
    #[must_use]
    pub fn protection(&self) -> &TaskProtection {
        &self.protection
    }

    /// Admits one client, or `None` when the limit is reached.
    ///
    /// The hold is registered at once without waiting for ECS, so the client is
    /// welcomed straight away while protection is pursued in the background.
    #[must_use]
    pub fn try_open(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.limit;
        let before = self
            .count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            connections: Arc::clone(self),
            count_when_opened: before + 1,
            opened: false,
            _hold: self.protection.hold(),
        })
    }
}

/// One admitted client: counted, and holding protection, until dropped.
#[derive(Debug)]
#[must_use = "the client is uncounted as soon as its slot is dropped"]
pub struct Slot {
    connections: Arc<Connections>,
    count_when_opened: usize,
    opened: bool,
    _hold: ProtectionGuard,
}

impl Slot {
    /// The count of clients right after this one was admitted, for the welcome.
    #[must_use]
    pub fn count_when_opened(&self) -> usize {
        self.count_when_opened
    }

    /// Logs the opening, once the websocket is established; its closing is then
    /// logged when the slot is dropped.
    pub fn opened(&mut self) {
        self.opened = true;
        let n = self.count_when_opened;
        tracing::info!(
            connections = n,
            "New client connection opened. There are {n} connections"
        );
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let after = self.connections.count.fetch_sub(1, Ordering::SeqCst) - 1;
        if self.opened {
            tracing::info!(
                connections = after,
                "Client connection closed. There are {after} connections"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use task_protection::{LocalBackend, ProtectionSettings};

    use super::*;

    #[tokio::test]
    async fn slots_count_clients_and_respect_the_limit() {
        let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
        let connections = Connections::new(2, protection.clone());
        let a = connections.try_open().unwrap();
        let b = connections.try_open().unwrap();
        assert_eq!((a.count_when_opened(), b.count_when_opened()), (1, 2));
        assert!(connections.try_open().is_none());
        assert_eq!(protection.holders(), 2);
        drop(a);
        assert_eq!(connections.count(), 1);
        let c = connections.try_open().unwrap();
        assert_eq!(c.count_when_opened(), 2);
        drop((b, c));
        assert_eq!(connections.count(), 0);
        assert_eq!(protection.holders(), 0);
    }
}
