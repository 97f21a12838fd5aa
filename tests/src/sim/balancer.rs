//! A round-robin TCP load balancer in front of the tasks that serve, like an ALB's
//! target group: it health-checks each registered target with `GET /healthz`, sends
//! new connections only to healthy ones (a target fails `unhealthy` checks in a row to
//! become unhealthy, passes `healthy` in a row to become healthy), leaves the
//! connections a target already has alone, and closes them when the target is
//! deregistered and the deregistration delay has passed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The target group's health check.
#[derive(Debug, Clone, Copy)]
pub struct HealthCheck {
    /// Between two checks of a target.
    pub interval: Duration,
    /// Passed checks in a row to become healthy.
    pub healthy: u32,
    /// Failed checks in a row to become unhealthy.
    pub unhealthy: u32,
    /// How long a check may take.
    pub timeout: Duration,
}

impl HealthCheck {
    /// The deployment files' health check: every 5 s, healthy after 2, unhealthy
    /// after 2.
    #[must_use]
    pub fn deployed() -> Self {
        Self {
            interval: Duration::from_secs(5),
            healthy: 2,
            unhealthy: 2,
            timeout: Duration::from_secs(4),
        }
    }
}

#[derive(Debug)]
struct Target {
    port: u16,
    healthy: bool,
    passed: u32,
    failed: u32,
    draining: bool,
    connections: Vec<AbortHandle>,
}

/// The load balancer.
#[derive(Debug, Clone)]
pub struct Balancer {
    port: u16,
    targets: Arc<Mutex<BTreeMap<String, Target>>>,
    next: Arc<AtomicUsize>,
    /// Connections refused because no target was healthy.
    pub refused: Arc<AtomicUsize>,
}

impl Balancer {
    /// Listens on a loopback port and health-checks registered targets with `check`.
    pub async fn start(check: HealthCheck) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot listen: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let balancer = Self {
            port,
            targets: Arc::default(),
            next: Arc::default(),
            refused: Arc::default(),
        };
        tokio::spawn(balancer.clone().accept(listener));
        tokio::spawn(balancer.clone().check_health(check));
        balancer
    }

    /// The port clients connect to.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Target>> {
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a task's port; it gets connections once healthy.
    pub fn register(&self, id: &str, port: u16) {
        self.lock().insert(
            id.to_owned(),
            Target {
                port,
                healthy: false,
                passed: 0,
                failed: 0,
                draining: false,
                connections: Vec::new(),
            },
        );
    }

    /// Starts deregistering a task: no new connections.
    pub fn deregister(&self, id: &str) {
        if let Some(t) = self.lock().get_mut(id) {
            t.draining = true;
        }
    }

    /// Ends a deregistration: the connections still open are closed.
    pub fn remove(&self, id: &str) {
        if let Some(t) = self.lock().remove(id) {
            for c in t.connections {
                c.abort();
            }
        }
    }

    /// Whether the task is registered and healthy.
    #[must_use]
    pub fn healthy(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|t| t.healthy && !t.draining)
    }

    /// The connections the balancer holds open to each target.
    #[must_use]
    pub fn connections(&self) -> BTreeMap<String, usize> {
        let mut targets = self.lock();
        targets
            .iter_mut()
            .map(|(id, t)| {
                t.connections.retain(|c| !c.is_finished());
                (id.clone(), t.connections.len())
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
                let targets = self.lock();
                let ready: Vec<(&String, u16)> = targets
                    .iter()
                    .filter(|(_, t)| t.healthy && !t.draining)
                    .map(|(id, t)| (id, t.port))
                    .collect();
                if ready.is_empty() {
                    None
                } else {
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
                    Some((ready[i].0.clone(), ready[i].1))
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
            if let Some(t) = self.lock().get_mut(&id) {
                t.connections.push(task.abort_handle());
            } else {
                task.abort();
            }
        }
    }

    async fn check_health(self, check: HealthCheck) {
        let mut ticks = tokio::time::interval(check.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let ports: Vec<(String, u16)> = self
                .lock()
                .iter()
                .map(|(id, t)| (id.clone(), t.port))
                .collect();
            for (id, port) in ports {
                let ok = tokio::time::timeout(check.timeout, healthz(port))
                    .await
                    .unwrap_or(false);
                if let Some(t) = self.lock().get_mut(&id) {
                    if ok {
                        t.passed += 1;
                        t.failed = 0;
                        if t.passed >= check.healthy {
                            t.healthy = true;
                        }
                    } else {
                        t.failed += 1;
                        t.passed = 0;
                        if t.failed >= check.unhealthy {
                            t.healthy = false;
                        }
                    }
                }
            }
        }
    }
}

/// One health check: `GET /healthz` answered 200.
async fn healthz(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = "GET /healthz HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.is_ok() && head.starts_with(b"HTTP/1.1 200")
}
