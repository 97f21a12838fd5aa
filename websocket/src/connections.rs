//! The count of connected clients, per address too, and the protection each one
//! holds.
//!
//! Every client owns a [`Slot`]: taking one counts the client (and its address) and
//! registers a protection holder; dropping it, on whatever path the connection ends
//! (close frame, TCP reset, silent peer, panic), uncounts it and lets go of the hold.
//! So the count returns to exactly 0 and protection is released once the last client
//! has gone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use task_protection::{ProtectionGuard, TaskProtection};

/// The clients connected now, with a limit in all and one per address.
#[derive(Debug)]
pub struct Connections {
    count: AtomicUsize,
    limit: usize,
    /// Most clients from one address; 0: no limit.
    per_address: usize,
    /// Clients per address, while `per_address` is set; an address leaves the map
    /// with its last client.
    addresses: Mutex<HashMap<IpAddr, usize>>,
    protection: TaskProtection,
}

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `MAX_CONNECTIONS` clients are connected.
    Server,
    /// `MAX_CONNECTIONS_PER_ADDRESS` clients are connected from its address.
    Address,
}

impl Connections {
    /// An empty registry that admits at most `limit` clients, at most `per_address`
    /// of them from one address (0: any number), and has each hold `protection`.
    #[must_use]
    pub fn new(limit: usize, per_address: usize, protection: TaskProtection) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            limit,
            per_address,
            addresses: Mutex::default(),
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

    /// The most clients admitted from one address; 0: any number.
    #[must_use]
    pub fn per_address(&self) -> usize {
        self.per_address
    }

    /// The protection each client holds.
    #[must_use]
    pub fn protection(&self) -> &TaskProtection {
        &self.protection
    }

    /// Admits one client from `address`, unless the server or its address is full.
    ///
    /// The hold is registered at once without waiting for ECS, so the client is
    /// welcomed straight away while protection is pursued in the background.
    ///
    /// # Errors
    /// Which limit was reached.
    pub fn try_open(self: &Arc<Self>, address: IpAddr) -> Result<Slot, Full> {
        let address = self.count_address(address)?;
        let limit = self.limit;
        let Ok(before) = self
            .count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
        else {
            if let Some(address) = address {
                self.uncount_address(address);
            }
            return Err(Full::Server);
        };
        Ok(Slot {
            connections: Arc::clone(self),
            count_when_opened: before + 1,
            address,
            opened: false,
            _hold: self.protection.hold(),
        })
    }

    /// Counts a client of `address`; the address to uncount it under later, `None`
    /// when addresses are not counted.
    fn count_address(&self, address: IpAddr) -> Result<Option<IpAddr>, Full> {
        if self.per_address == 0 {
            return Ok(None);
        }
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let clients = addresses.entry(address).or_default();
        if *clients >= self.per_address {
            return Err(Full::Address);
        }
        *clients += 1;
        Ok(Some(address))
    }

    fn uncount_address(&self, address: IpAddr) {
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(clients) = addresses.get_mut(&address) {
            *clients -= 1;
            if *clients == 0 {
                addresses.remove(&address);
            }
        }
    }
}

/// One admitted client: counted, and holding protection, until dropped.
#[derive(Debug)]
#[must_use = "the client is uncounted as soon as its slot is dropped"]
pub struct Slot {
    connections: Arc<Connections>,
    count_when_opened: usize,
    address: Option<IpAddr>,
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
        if let Some(address) = self.address {
            self.connections.uncount_address(address);
        }
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
    use std::net::Ipv4Addr;

    use task_protection::{LocalBackend, ProtectionSettings};

    use super::*;

    const HERE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const THERE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    fn protection() -> TaskProtection {
        TaskProtection::start(LocalBackend::new(), ProtectionSettings::default())
    }

    #[tokio::test]
    async fn slots_count_clients_and_respect_the_limit() {
        let protection = protection();
        let connections = Connections::new(2, 0, protection.clone());
        let a = connections.try_open(HERE).unwrap();
        let b = connections.try_open(HERE).unwrap();
        assert_eq!((a.count_when_opened(), b.count_when_opened()), (1, 2));
        assert_eq!(connections.try_open(THERE).unwrap_err(), Full::Server);
        assert_eq!(protection.holders(), 2);
        drop(a);
        assert_eq!(connections.count(), 1);
        let c = connections.try_open(HERE).unwrap();
        assert_eq!(c.count_when_opened(), 2);
        drop((b, c));
        assert_eq!(connections.count(), 0);
        assert_eq!(protection.holders(), 0);
    }

    #[tokio::test]
    async fn one_address_takes_at_most_its_share() {
        let connections = Connections::new(3, 2, protection());
        let a = connections.try_open(HERE).unwrap();
        let b = connections.try_open(HERE).unwrap();
        assert_eq!(connections.try_open(HERE).unwrap_err(), Full::Address);
        let c = connections.try_open(THERE).unwrap();
        // Full in all: the refusal leaves the address's count as it was.
        assert_eq!(connections.try_open(THERE).unwrap_err(), Full::Server);
        drop(a);
        let d = connections.try_open(THERE).unwrap();
        assert_eq!(connections.try_open(HERE).unwrap_err(), Full::Server);
        drop((b, c, d));
        assert!(
            connections.addresses.lock().unwrap().is_empty(),
            "an address leaves with its last client"
        );
    }
}
