//! Whether receiving works, for a container health check: `GET /healthz` on
//! `HEALTH_PORT`, and the `queue-consumer healthcheck` subcommand that asks it (a
//! distroless image has no shell and no curl).
//!
//! The rule: the worker is healthy unless, on some queue, every receive has failed
//! for more than [`UNHEALTHY_AFTER`](crate::config::UNHEALTHY_AFTER) since the first
//! failure (a receive that gets no answer fails when its time limit passes: its wait
//! plus 5 s), or the last receive failed in a way retrying cannot fix (the worker is
//! then about to exit), or a message has waited for task protection for more than
//! [`PROTECTION_UNHEALTHY_AFTER`](crate::config::PROTECTION_UNHEALTHY_AFTER): the
//! agent unreachable (a wrong `ECS_AGENT_URI`) or ECS failing, the worker receives
//! nothing and keeps that message, so ECS should replace the task. Receiving paused
//! on purpose is healthy: all slots busy, a message waiting for protection for less
//! than that, the task leaving its service, an idle queue. A restart fixes none of
//! those, and ECS replaces an unhealthy task.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::queue::SqsError;

/// The health of the receive loops.
#[derive(Debug)]
pub struct Health {
    /// How long receives may fail in a row before the worker is unhealthy.
    failing_for: Duration,
    queues: Mutex<Vec<QueueHealth>>,
    /// How long a message may wait for protection before the worker is unhealthy.
    protection_for: Duration,
    /// Since when a message has waited for protection that failed, and why.
    protection: Mutex<Option<(Instant, String)>>,
}

#[derive(Debug, Clone)]
struct QueueHealth {
    url: String,
    /// Since the first failed receive after the last success.
    failing_since: Option<Instant>,
    last_error: Option<SqsError>,
}

impl Health {
    /// Healthy until receives fail for longer than `failing_for`, or a message waits
    /// for protection for longer than `protection_for`.
    #[must_use]
    pub fn new(failing_for: Duration, protection_for: Duration) -> Self {
        Self {
            failing_for,
            queues: Mutex::default(),
            protection_for,
            protection: Mutex::default(),
        }
    }

    fn protection(&self) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        self.protection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A message waiting for protection since `since` has not got it yet: `why`.
    pub(crate) fn waiting_for_protection(&self, since: Instant, why: String) {
        let mut p = self.protection();
        let since = p.as_ref().map_or(since, |(s, _)| since.min(*s));
        *p = Some((since, why));
    }

    /// Protection was confirmed, or no message waits for it any more.
    pub(crate) fn not_waiting_for_protection(&self) {
        self.protection().take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<QueueHealth>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches one more queue, the next lane.
    pub(crate) fn watch(&self, url: &str) {
        self.lock().push(QueueHealth {
            url: url.to_owned(),
            failing_since: None,
            last_error: None,
        });
    }

    /// A receive on lane `lane` came back.
    pub(crate) fn received(&self, lane: usize, result: Result<usize, &SqsError>) {
        let mut queues = self.lock();
        let Some(q) = queues.get_mut(lane) else {
            return;
        };
        match result {
            Ok(_) => {
                q.failing_since = None;
                q.last_error = None;
            }
            Err(e) => {
                q.failing_since.get_or_insert_with(Instant::now);
                q.last_error = Some(e.clone());
            }
        }
    }

    /// `Ok` while receiving works; else why not, in one line.
    ///
    /// # Errors
    /// The reason the worker is unhealthy.
    pub fn check(&self) -> Result<(), String> {
        for q in self.lock().iter() {
            let (Some(since), Some(e)) = (q.failing_since, &q.last_error) else {
                continue;
            };
            let failing = since.elapsed();
            if !e.kind.may_pass() {
                return Err(format!("receiving from {} fails: {e}", q.url));
            }
            if failing > self.failing_for {
                return Err(format!(
                    "receiving from {} has failed for {}s: {e}",
                    q.url,
                    failing.as_secs()
                ));
            }
        }
        if let Some((since, why)) = self.protection().as_ref() {
            let waited = since.elapsed();
            if waited > self.protection_for {
                return Err(format!(
                    "a message has waited {}s for task protection: {why}",
                    waited.as_secs()
                ));
            }
        }
        Ok(())
    }
}

/// Listens on 127.0.0.1:`port` for the health check (inside the task only).
///
/// # Errors
/// When the port cannot be bound.
pub async fn listen(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await
}

/// Serves `GET /healthz` on `listener` until the process ends: 200 `ok`, or 503 with
/// the reason.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .with_state(health);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("The health endpoint stopped: {e}");
    }
}

async fn healthz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.check() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// Why the health check failed.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    /// No connection, or it broke.
    #[error("cannot reach {addr}: {source}; is HEALTH_PORT set the same for the worker?")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// No full answer in time.
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    /// An answer other than 200.
    #[error("/healthz answered {0}")]
    Status(String),
}

/// GETs `/healthz` on 127.0.0.1:`port`; `Ok` when it answers 200.
///
/// # Errors
/// When the worker cannot be reached, is too slow, or answers anything but 200 (the
/// error then carries its status line and reason).
pub async fn check(port: u16, timeout: Duration) -> Result<(), Unhealthy> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let answer = tokio::time::timeout(timeout, get_healthz(addr))
        .await
        .map_err(|_| Unhealthy::Timeout(addr, timeout))?
        .map_err(|source| Unhealthy::Unreachable { addr, source })?;
    let mut lines = answer.lines();
    let status = lines.next().unwrap_or_default().trim().to_owned();
    if status.split_whitespace().nth(1) == Some("200") {
        return Ok(());
    }
    // The reason is the body's one line, after the blank line that ends the headers.
    let reason = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_default();
    Err(Unhealthy::Status(if reason.is_empty() {
        status
    } else {
        format!("{status}: {reason}")
    }))
}

async fn get_healthz(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: queue-consumer-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The answer is a status line, a few headers and one line: read at most 8 KiB.
    let mut answer = Vec::with_capacity(512);
    let mut chunk = [0_u8; 1024];
    while answer.len() < 8 * 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::ErrorKind;

    fn error(kind: ErrorKind) -> SqsError {
        SqsError {
            operation: "ReceiveMessage",
            kind,
            code: Some("X".to_owned()),
            message: "it failed".to_owned(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_that_pass_are_healthy_for_a_while() {
        let h = Health::new(Duration::from_secs(60), Duration::from_secs(300));
        h.watch("q1");
        h.watch("q2");
        assert_eq!(h.check(), Ok(()));
        h.received(1, Err(&error(ErrorKind::Transient)));
        tokio::time::advance(Duration::from_secs(59)).await;
        h.received(1, Err(&error(ErrorKind::Timeout)));
        assert_eq!(h.check(), Ok(()));
        tokio::time::advance(Duration::from_secs(2)).await;
        let why = h.check().unwrap_err();
        assert!(
            why.starts_with("receiving from q2 has failed for 61s: ReceiveMessage"),
            "{why}"
        );
        h.received(1, Ok(0));
        assert_eq!(h.check(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_that_will_not_pass_is_unhealthy_at_once() {
        let h = Health::new(Duration::from_secs(60), Duration::from_secs(300));
        h.watch("q1");
        h.received(0, Err(&error(ErrorKind::Denied)));
        assert!(
            h.check()
                .unwrap_err()
                .starts_with("receiving from q1 fails")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_waiting_too_long_for_protection_is_unhealthy() {
        let h = Health::new(Duration::from_secs(60), Duration::from_secs(300));
        h.watch("q1");
        let t0 = Instant::now();
        h.waiting_for_protection(t0, "no answer from the agent".to_owned());
        tokio::time::advance(Duration::from_secs(299)).await;
        // A later message's wait does not reset the first one's.
        h.waiting_for_protection(Instant::now(), "still no answer".to_owned());
        assert_eq!(h.check(), Ok(()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            h.check(),
            Err("a message has waited 301s for task protection: still no answer".to_owned())
        );
        h.not_waiting_for_protection();
        assert_eq!(h.check(), Ok(()));
    }

    #[tokio::test]
    async fn the_endpoint_and_its_client_agree() {
        let health = Arc::new(Health::new(Duration::ZERO, Duration::ZERO));
        health.watch("q1");
        let listener = listen(0).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve(listener, Arc::clone(&health)));
        let timeout = Duration::from_secs(5);
        check(port, timeout).await.unwrap();
        health.received(0, Err(&error(ErrorKind::Transient)));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let e = check(port, timeout).await.unwrap_err().to_string();
        assert!(e.starts_with("/healthz answered HTTP/1.1 503"), "{e}");
        assert!(e.ends_with("ReceiveMessage: X: it failed"), "{e}");
        let nobody = listen(0).await.unwrap().local_addr().unwrap().port();
        assert!(matches!(
            check(nobody, timeout).await,
            Err(Unhealthy::Unreachable { .. })
        ));
    }
}
