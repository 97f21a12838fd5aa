//! The load balancer's data path, for the real-time driver: a round-robin TCP proxy
//! on a loopback port that sends each new connection to one of the targets the model
//! says are routable ([`Model::routable`](super::Model::routable)), leaves the
//! connections a target already has alone, and closes them when its deregistration
//! ends ([`Balancer::remove`]). Which targets are healthy, and which target group has
//! production traffic, is the model's business.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Debug, Default)]
struct State {
    /// Where new connections may go: (task id, port).
    routes: Vec<(String, u16)>,
    /// The proxied connections of each target.
    connections: BTreeMap<String, Vec<AbortHandle>>,
}

/// The load balancer.
#[derive(Debug, Clone)]
pub struct Balancer {
    port: u16,
    state: Arc<Mutex<State>>,
    next: Arc<AtomicUsize>,
    /// Connections refused because no target was routable.
    pub refused: Arc<AtomicUsize>,
}

impl Balancer {
    /// Listens on a loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot listen: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let balancer = Self {
            port,
            state: Arc::default(),
            next: Arc::default(),
            refused: Arc::default(),
        };
        tokio::spawn(balancer.clone().accept(listener));
        balancer
    }

    /// The port clients connect to.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where new connections go from now on.
    pub fn route(&self, routes: Vec<(String, u16)>) {
        self.lock().routes = routes;
    }

    /// Ends a target's deregistration: the connections it still has are closed.
    pub fn remove(&self, id: &str) {
        let mut state = self.lock();
        state.routes.retain(|(t, _)| t != id);
        if let Some(connections) = state.connections.remove(id) {
            for c in connections {
                c.abort();
            }
        }
    }

    /// The connections the balancer holds open to each target.
    #[must_use]
    pub fn connections(&self) -> BTreeMap<String, usize> {
        let mut state = self.lock();
        state
            .connections
            .iter_mut()
            .map(|(id, c)| {
                c.retain(|c| !c.is_finished());
                (id.clone(), c.len())
            })
            .collect()
    }

    async fn accept(self, listener: TcpListener) {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let target = {
                let state = self.lock();
                if state.routes.is_empty() {
                    None
                } else {
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % state.routes.len();
                    Some(state.routes[i].clone())
                }
            };
            let Some((id, port)) = target else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                drop(client);
                continue;
            };
            let task = tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
                    return;
                };
                let _ = upstream.set_nodelay(true);
                let mut client = client;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
            self.lock()
                .connections
                .entry(id)
                .or_default()
                .push(task.abort_handle());
        }
    }
}

/// One target group health check: `GET /healthz` on `port` answered 200 within
/// `timeout`.
pub async fn healthz(port: u16, timeout: Duration) -> bool {
    let check = async {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
            return false;
        };
        let request = "GET /healthz HTTP/1.1\r\nHost: target\r\nUser-Agent: ELB-HealthChecker/2.0\r\nConnection: close\r\n\r\n";
        if stream.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.is_ok() && head.starts_with(b"HTTP/1.1 200")
    };
    tokio::time::timeout(timeout, check).await.unwrap_or(false)
}

/// A loopback port that accepts connections and closes them at once: where a
/// misconfigured target group checks. Dropping the handle stops it.
pub async fn dead_port() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("cannot listen: {e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    (port, task)
}
