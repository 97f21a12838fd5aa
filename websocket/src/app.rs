//! The server as a value: bind, then run until a shutdown future resolves.
//!
//! Tests build it on port 0 with their own shutdown future and drive the real thing.
//!
//! Shutdown follows what ECS does to a task it stops: the ALB has already drained the
//! target, then SIGTERM arrives and `stopTimeout` (30 s by default) later SIGKILL. So:
//! stop accepting, tell every client `server shutting down` and close with 1001 (Going
//! Away) so pages reconnect to another task, wait up to the grace period for them to
//! leave, release protection, and return. axum's graceful shutdown does not cover
//! upgraded websockets, so they are tracked here with a `TaskTracker`.
//!
//! The goodbye goes out at [`GOODBYE_RATE`] clients per second at most, and within the
//! first half of the grace period: 15,000 clients sent away at once would all arrive
//! at the remaining tasks in the same few hundred milliseconds, each with a TLS
//! handshake and a protection check. A task with few clients says goodbye at once,
//! and a second signal tells everyone still waiting.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use task_protection::drain::Membership;
use task_protection::{ProtectionEvent, ShutdownReport, TaskProtection};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerSettings;
use crate::connection::metered::SharedRules;
use crate::connection::{Notice, SHUTTING_DOWN_SOON};
use crate::connections::Connections;
use crate::http::{self, HttpSettings, MAX_PENDING_CONNECTIONS};
use crate::metrics::ServerMetrics;
use crate::routes::{Shared, router};

/// How long HTTP requests still in flight get after the websockets are done.
const HTTP_DRAIN: Duration = Duration::from_secs(1);

/// Most clients told to leave per second by default (`GOODBYE_RATE`), at shutdown and
/// when the task leaves its service.
pub const GOODBYE_RATE: u32 = 1_000;

/// Over how long the goodbye to `clients` is spread: at `rate` a second, but within
/// the first half of `grace`, so the last clients told still have time to close.
#[must_use]
pub fn goodbye_spread(clients: usize, grace: Duration, rate: u32) -> Duration {
    drain_spread(clients, rate).min(grace / 2)
}

/// A bound server, ready to run.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    grace: Duration,
    ping_interval: Duration,
    drain_notice: Duration,
    goodbye_rate: u32,
    http: HttpSettings,
}

impl App {
    /// Binds the listener. Port 0 picks a free port; see [`App::port`].
    ///
    /// # Errors
    /// When the address cannot be bound, or the limits cannot work together.
    pub async fn build(settings: ServerSettings, protection: TaskProtection) -> io::Result<Self> {
        settings
            .limits
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(settings.listen).await?;
        let local_addr = listener.local_addr()?;
        if settings.origins.is_any() {
            tracing::warn!(
                "ALLOWED_ORIGINS is not set: pages of any site can open websockets here, and \
                 each one keeps the task protected; set it to the origins of your pages"
            );
        }
        let notices = Arc::new(crate::notices::Notices::default());
        let shared = Arc::new(Shared {
            connections: Connections::new(
                settings.max_connections,
                settings.max_connections_per_address,
                protection,
            ),
            notices,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            refused: AtomicBool::new(false),
            limits: settings.limits,
            rules: SharedRules::from(&settings.limits),
            origins: settings.origins,
            trust_forwarded_for: settings.trust_forwarded_for,
            show_identifiers: settings.show_identifiers,
            metrics: ServerMetrics::register(),
            drain: task_protection::drain::Drain::off(),
        });
        Ok(Self {
            listener,
            local_addr,
            shared,
            grace: settings.shutdown_grace,
            ping_interval: settings.ping_interval,
            drain_notice: settings.drain_notice,
            goodbye_rate: settings.goodbye_rate,
            http: HttpSettings {
                header_timeout: settings.header_timeout,
                max_pending: MAX_PENDING_CONNECTIONS,
            },
        })
    }

    /// The port listened on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// The address listened on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Follows `drain`: while the service no longer wants this task, new clients are
    /// refused (`/healthz` stays green: ECS acts on it), and after the drain notice
    /// (none when ECS is already stopping the task) the clients are told to reconnect
    /// elsewhere, at the goodbye's rate; protection is released once the last has
    /// gone. Without it (the default) the task is always wanted.
    #[must_use]
    pub fn with_drain(mut self, drain: task_protection::drain::Drain) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.drain = drain;
        }
        self
    }

    /// The live connection registry, for tests and status.
    #[must_use]
    pub fn connections(&self) -> Arc<Connections> {
        Arc::clone(&self.shared.connections)
    }

    /// Serves until `shutdown` resolves, then says goodbye to every client, waits up
    /// to the grace period, and releases protection.
    ///
    /// # Errors
    /// Never at present; the `Result` leaves room for listener failures.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<ShutdownReport> {
        self.run(shutdown, std::future::pending()).await
    }

    /// As [`App::run_until_stopped`], and once `hurry` resolves during the shutdown
    /// (a second ctrl-c), every client not yet told is told at once.
    ///
    /// # Errors
    /// Never at present; the `Result` leaves room for listener failures.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        hurry: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<ShutdownReport> {
        let Self {
            listener,
            shared,
            grace,
            ping_interval,
            drain_notice,
            goodbye_rate,
            http,
            ..
        } = self;
        let protection = shared.connections.protection().clone();
        let rejections = tokio::spawn(announce_rejections(protection.clone(), Arc::clone(&shared)));
        let drain = tokio::spawn(follow_drain(
            Arc::clone(&shared),
            drain_notice,
            goodbye_rate,
        ));
        let heartbeat = tokio::spawn({
            let notices = Arc::clone(&shared.notices);
            async move { notices.heartbeat(ping_interval).await }
        });
        let server = http::serve(
            listener,
            router(Arc::clone(&shared)),
            http,
            shared.shutdown.clone(),
        );
        let mut server = tokio::spawn(server);

        tokio::select! {
            () = shutdown => {}
            result = &mut server => {
                // The server only returns after a shutdown; treat it as one.
                if let Err(error) = result {
                    tracing::error!("the HTTP server stopped: {error}");
                }
            }
        }

        let deadline = Instant::now() + grace;
        let clients = shared.connections.count();
        let spread = goodbye_spread(clients, grace, goodbye_rate);
        tracing::info!(
            connections = clients,
            "Shutting down: no new clients; telling {clients} clients to leave over {spread:?}"
        );
        // Clients that upgrade from now on are told at once; the others in turn.
        shared.shutdown.cancel();
        shared.tracker.close();
        // Done when every client has left, told or not.
        let everyone_left = async {
            tokio::select! {
                () = shared.tracker.wait() => {}
                () = async {
                    tokio::select! {
                        () = shared.notices.goodbye(spread) => {}
                        () = hurry => {
                            tracing::info!("Telling every remaining client to leave now");
                            shared.notices.send_all(&Notice::ShuttingDown);
                        }
                    }
                    std::future::pending::<()>().await;
                } => {}
            }
        };
        if tokio::time::timeout_at(deadline, everyone_left)
            .await
            .is_err()
        {
            let left = shared.connections.count();
            tracing::warn!(
                connections = left,
                "{left} clients still connected after the {grace:?} grace period; closing anyway"
            );
        }
        // Plain HTTP requests in flight get a moment more; idle keep-alive connections
        // are closed by the graceful shutdown.
        let _ = tokio::time::timeout(HTTP_DRAIN, &mut server).await;
        server.abort();
        drain.abort();
        rejections.abort();
        heartbeat.abort();

        let report = protection.shutdown().await;
        tracing::info!("Shutdown complete: {report}");
        Ok(report)
    }
}

/// How long telling `clients` to reconnect takes, at `rate` a second.
#[must_use]
pub fn drain_spread(clients: usize, rate: u32) -> Duration {
    let clients = u32::try_from(clients).unwrap_or(u32::MAX);
    Duration::from_secs(1) * clients / rate.max(1)
}

/// Follows the drain watcher's verdict. Leaving: no new clients (the routes refuse
/// upgrades with 503 and Retry-After), protection drains, and after `notice` the
/// clients are told to reconnect, at [`GOODBYE_RATE`], so that they arrive at the
/// other tasks in a steady stream. When ECS is already stopping the task there is no
/// notice: it has deregistered the target, no new client comes through the load
/// balancer, and the goodbye must be over before the deregistration delay ends (then
/// SIGTERM comes). Wanted again: all of it stops, and clients are welcome again.
async fn follow_drain(shared: Arc<Shared>, notice: Duration, rate: u32) {
    let mut membership = shared.drain.subscribe();
    let protection = shared.connections.protection().clone();
    loop {
        let verdict = membership.borrow_and_update().clone();
        if let Membership::Leaving(reason) = verdict {
            protection.drain();
            let wait = if reason.is_stopping() {
                Duration::ZERO
            } else {
                notice
            };
            let tell = async {
                tokio::time::sleep(wait).await;
                let clients = shared.connections.count();
                let spread = drain_spread(clients, rate);
                tracing::info!(
                    connections = clients,
                    "Telling {clients} clients to reconnect to other tasks, over {spread:?}"
                );
                shared.notices.spread(&Notice::Leave, spread).await;
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = tell => {}
                changed = membership.changed() => if changed.is_err() { return },
            }
        } else {
            protection.undrain();
            if membership.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Tells every client `server shutting down soon` when ECS refuses protection, as the
/// original sample did: the task is probably about to be replaced. Not while the
/// drain watcher is on: then a refusal (`DEPLOYMENT_BLOCKED` while a deployment's old
/// tasks still hold protection) is no sign that this task goes, and the watcher says
/// when it does; once the watcher has turned off, refusals are announced again. While
/// holders remain the library asks again every check interval; the clients are told
/// once per refusal, not at every retry, until protection is confirmed again; clients
/// that arrive meanwhile hear it after their welcome.
async fn announce_rejections(protection: TaskProtection, shared: Arc<Shared>) {
    let mut events = protection.events();
    drop(protection);
    while let Some(event) = events.recv().await {
        match event {
            ProtectionEvent::Rejected(rejection)
                if !shared.drain.is_on() && !shared.refused.swap(true, Ordering::Relaxed) =>
            {
                tracing::info!(
                    reason = %rejection,
                    "Telling every client: {SHUTTING_DOWN_SOON}"
                );
                shared
                    .notices
                    .send_all(&Notice::Say(SHUTTING_DOWN_SOON.into()));
            }
            ProtectionEvent::Protected { .. } => shared.refused.store(false, Ordering::Relaxed),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_goodbye_is_spread_by_the_rate_within_half_the_grace() {
        let grace = Duration::from_secs(20);
        let rate = GOODBYE_RATE;
        assert_eq!(goodbye_spread(0, grace, rate), Duration::ZERO);
        assert_eq!(goodbye_spread(1, grace, rate), Duration::from_millis(1));
        assert_eq!(goodbye_spread(600, grace, rate), Duration::from_millis(600));
        assert_eq!(goodbye_spread(15_000, grace, rate), Duration::from_secs(10));
        assert_eq!(goodbye_spread(15_000, Duration::ZERO, rate), Duration::ZERO);
        assert_eq!(
            goodbye_spread(usize::MAX, grace, rate),
            Duration::from_secs(10)
        );
        assert_eq!(goodbye_spread(600, grace, 100), Duration::from_secs(6));
        assert_eq!(drain_spread(600, 0), Duration::from_secs(600));
    }
}
