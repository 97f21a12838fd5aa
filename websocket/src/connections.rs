//! The count of connected clients, per address too, and the protection each one
//! holds.
//!
//! When clients are counted per address, an address whose client was closed for a
//! flood is turned away for [`FLOOD_BAR`]: the budget of frames a second holds per
//! connection, and a flooder that reconnects at once would otherwise start a fresh
//! budget (and a fresh handshake) hundreds of times a second.
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
use std::time::Duration;

use task_protection::{ProtectionGuard, TaskProtection};
use tokio::time::Instant;

/// How long an address whose client was closed for a flood is turned away, when
/// clients are counted per address.
pub const FLOOD_BAR: Duration = Duration::from_secs(10);
/// Barred addresses kept at most; past it the longest barred are let go first.
pub const MAX_BARRED: usize = 10_000;

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
    /// Addresses turned away after a flood, until when.
    barred: Mutex<HashMap<IpAddr, Instant>>,
    protection: TaskProtection,
}

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// `MAX_CONNECTIONS` clients are connected.
    ServerFull,
    /// `MAX_CONNECTIONS_PER_ADDRESS` clients are connected from its address.
    AddressFull,
    /// A client of its address was closed for a flood less than [`FLOOD_BAR`] ago.
    AddressBarred,
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
            barred: Mutex::default(),
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
    pub fn try_open(self: &Arc<Self>, address: IpAddr) -> Result<Slot, Denied> {
        if self.is_barred(address) {
            return Err(Denied::AddressBarred);
        }
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
            return Err(Denied::ServerFull);
        };
        Ok(Slot {
            connections: Arc::clone(self),
            count_when_opened: u32::try_from(before + 1).unwrap_or(u32::MAX),
            address,
            opened: false,
            _hold: self.protection.hold(),
        })
    }

    /// Counts a client of `address`; the address to uncount it under later, `None`
    /// when addresses are not counted.
    fn count_address(&self, address: IpAddr) -> Result<Option<IpAddr>, Denied> {
        if self.per_address == 0 {
            return Ok(None);
        }
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let clients = addresses.entry(address).or_default();
        if *clients >= self.per_address {
            return Err(Denied::AddressFull);
        }
        *clients += 1;
        Ok(Some(address))
    }

    fn is_barred(&self, address: IpAddr) -> bool {
        if self.per_address == 0 {
            return false;
        }
        let mut barred = self.barred.lock().unwrap_or_else(PoisonError::into_inner);
        match barred.get(&address) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                barred.remove(&address);
                false
            }
            None => false,
        }
    }

    /// Turns `address` away for [`FLOOD_BAR`].
    fn bar(&self, address: IpAddr) {
        let now = Instant::now();
        let mut barred = self.barred.lock().unwrap_or_else(PoisonError::into_inner);
        if barred.len() >= MAX_BARRED {
            barred.retain(|_, until| *until > now);
            if barred.len() >= MAX_BARRED
                && let Some(first) = barred
                    .iter()
                    .min_by_key(|(_, until)| **until)
                    .map(|(a, _)| *a)
            {
                barred.remove(&first);
            }
        }
        barred.insert(address, now + FLOOD_BAR);
        tracing::info!(%address, "Turning away {address} for {FLOOD_BAR:?}: its client flooded");
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
    count_when_opened: u32,
    address: Option<IpAddr>,
    opened: bool,
    _hold: ProtectionGuard,
}

impl Slot {
    /// Uncounts a client closed for a flood, and turns its address away for
    /// [`FLOOD_BAR`] when clients are counted per address.
    pub fn flooded(self) {
        if let Some(address) = self.address {
            self.connections.bar(address);
        }
    }

    /// The count of clients right after this one was admitted, for the welcome.
    #[must_use]
    pub fn count_when_opened(&self) -> u32 {
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
        assert_eq!(connections.try_open(THERE).unwrap_err(), Denied::ServerFull);
        assert_eq!(protection.holders(), 2);
        drop(a);
        assert_eq!(connections.count(), 1);
        let c = connections.try_open(HERE).unwrap();
        assert_eq!(c.count_when_opened(), 2);
        drop((b, c));
        assert_eq!(connections.count(), 0);
        assert_eq!(protection.holders(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_that_flooded_is_turned_away_for_a_while() {
        let connections = Connections::new(10, 5, protection());
        connections.try_open(HERE).unwrap().flooded();
        assert_eq!(
            connections.try_open(HERE).unwrap_err(),
            Denied::AddressBarred
        );
        let other = connections.try_open(THERE).unwrap();
        tokio::time::advance(FLOOD_BAR - Duration::from_millis(1)).await;
        assert_eq!(
            connections.try_open(HERE).unwrap_err(),
            Denied::AddressBarred
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let back = connections.try_open(HERE).unwrap();
        drop((other, back));
        // Without a count per address, addresses mean nothing: no one is barred.
        let unlimited = Connections::new(10, 0, protection());
        unlimited.try_open(HERE).unwrap().flooded();
        assert!(unlimited.try_open(HERE).is_ok());
    }

    #[tokio::test]
    async fn one_address_takes_at_most_its_share() {
        let connections = Connections::new(3, 2, protection());
        let a = connections.try_open(HERE).unwrap();
        let b = connections.try_open(HERE).unwrap();
        assert_eq!(connections.try_open(HERE).unwrap_err(), Denied::AddressFull);
        let c = connections.try_open(THERE).unwrap();
        // Full in all: the refusal leaves the address's count as it was.
        assert_eq!(connections.try_open(THERE).unwrap_err(), Denied::ServerFull);
        drop(a);
        let d = connections.try_open(THERE).unwrap();
        assert_eq!(connections.try_open(HERE).unwrap_err(), Denied::ServerFull);
        drop((b, c, d));
        assert!(
            connections.addresses.lock().unwrap().is_empty(),
            "an address leaves with its last client"
        );
    }
}
