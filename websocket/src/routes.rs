//! The HTTP routes: the page and its websocket on `/`, `/healthz` for the load
//! balancer, `/status` for people and the page.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::ws::{WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use task_protection::{Counters, ProtectionState};

/// The longest error text `/status` shows.
pub const MAX_PUBLIC_TEXT: usize = 120;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::connection::limits::{Limits, MAX_WRITE_BUFFER_BYTES, Meter};
use crate::connection::{self, Notice};
use crate::connections::{Connections, Slot};
use crate::metrics::ServerMetrics;

/// The page, compiled in so the binary needs no files at run time.
pub const PAGE: &str = include_str!("../static/index.html");

/// The read buffer of each websocket. tungstenite's default is 128 KiB per
/// connection, which makes 10,000 idle clients cost 1.3 GB, and tungstenite fills
/// the whole buffer on every read, so each idle connection pays for all of it. This
/// protocol's messages are a few bytes (a `ping` frame is 10), so 256 bytes hold
/// dozens of them; a larger one (up to `MAX_MESSAGE_BYTES`) still arrives, the
/// buffer growing for it and keeping that size, and one over the limit is refused
/// before it grows anything.
pub const READ_BUFFER_BYTES: usize = 256;

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) connections: Arc<Connections>,
    /// The heartbeat, the shutdown, and messages for every client.
    pub(crate) notices: std::sync::Arc<crate::notices::Notices>,
    /// Cancelled at shutdown: stop accepting, say goodbye.
    pub(crate) shutdown: CancellationToken,
    /// Every upgraded websocket, so shutdown can wait for them; axum's graceful
    /// shutdown does not.
    pub(crate) tracker: TaskTracker,
    /// ECS has refused protection and not confirmed it since: clients that arrive now
    /// are told `server shutting down soon` after their welcome.
    pub(crate) refused: AtomicBool,
    /// What one client may make the server hold.
    pub(crate) limits: Limits,
    /// Origins whose pages may connect, lower case; empty: any.
    pub(crate) allowed_origins: Vec<String>,
    /// What the server counts.
    pub(crate) metrics: ServerMetrics,
    /// Whether the service still wants this task (the drain watcher's verdict).
    pub(crate) drain: task_protection::drain::Drain,
}

impl Shared {
    /// Why the service no longer wants this task, while it is leaving.
    pub(crate) fn leaving(&self) -> Option<task_protection::drain::LeaveReason> {
        match self.drain.membership() {
            task_protection::drain::Membership::Leaving(reason) => Some(reason),
            _ => None,
        }
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .with_state(shared)
}

/// `GET /`: the websocket when the request asks for an upgrade, else the page, so
/// `ws://host/` works as in the original sample.
async fn root(
    State(shared): State<Arc<Shared>>,
    meter: Option<Extension<Arc<Meter>>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(upgrade) => {
            let meter = meter.map_or_else(|| Arc::new(Meter::default()), |m| m.0);
            accept(&shared, &headers, meter, upgrade)
        }
        // An upgrade was asked for but is malformed: say why.
        Err(rejection) if headers.contains_key(header::UPGRADE) => rejection.into_response(),
        Err(_) => page(),
    }
}

fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(PAGE),
    )
        .into_response()
}

fn unavailable(reason: &'static str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
        reason,
    )
        .into_response()
}

/// Whether a page from the request's `Origin` may connect. Browsers always send
/// `Origin` with a websocket upgrade; other clients need not, and could send any
/// value they liked, so its absence is no reason to refuse.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
    allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

fn accept(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    meter: Arc<Meter>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&shared.allowed_origins, headers) {
        tracing::info!(
            origin = ?headers.get(header::ORIGIN),
            "Refused a websocket from an origin not in ALLOWED_ORIGINS"
        );
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    // Counted before the shutdown check: either shutdown has begun and the client is
    // refused, or the shutdown waits for this client and says goodbye to it.
    let tracked = shared.tracker.token();
    if shared.shutdown.is_cancelled() {
        return unavailable("server shutting down");
    }
    if shared.leaving().is_some() {
        // The load balancer keeps sending some clients here: /healthz stays green while
        // the task leaves, because ECS replaces a task whose health check fails. Each
        // is refused with Retry-After and comes back to a task that stays.
        return unavailable("this task is leaving its service");
    }
    let Some(slot) = shared.connections.try_open() else {
        tracing::warn!(
            limit = shared.connections.limit(),
            "Refused a client: MAX_CONNECTIONS reached"
        );
        shared.metrics.refused.increment(1);
        return unavailable("too many connections");
    };
    // Subscribed now, so that no notice sent before the upgrade is missed.
    let notices = shared.notices.subscribe();
    let max_message = shared.limits.max_message_bytes;
    // From the 101 on, the connection's bytes are websocket frames.
    meter.start_websocket(max_message);
    let shared = Arc::clone(shared);
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        .on_failed_upgrade(|error| tracing::debug!("websocket upgrade failed: {error}"))
        .on_upgrade(move |socket| client(socket, shared, slot, notices, meter, tracked))
}

/// One client, from its welcome to its goodbye.
///
/// What this future holds is most of what an idle client costs, and what it
/// captures is held twice (by the upgrade's closure too): so it keeps one handle on
/// what every client shares instead of copies of the parts it uses. It is an
/// `async` block rather than an `async fn`, whose arguments would be stored twice
/// (the socket among them).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn client(
    mut socket: WebSocket,
    shared: Arc<Shared>,
    mut slot: Slot,
    mut notices: broadcast::Receiver<Notice>,
    meter: Arc<Meter>,
    tracked: TaskTrackerToken,
) -> impl Future<Output = ()> {
    async move {
        // Read after subscribing, as announce_rejections sets it before it tells
        // everyone: a refusal is heard one way or the other.
        let greeting = connection::Greeting {
            connections: slot.count_when_opened(),
            refused: shared.refused.load(Ordering::Relaxed),
        };
        slot.opened();
        let metrics = &shared.metrics;
        metrics.opened.increment(1);
        metrics.connections.increment(1.0);
        let ended = connection::serve(
            &mut socket,
            greeting,
            &mut notices,
            &shared.shutdown,
            &shared.limits,
            &meter,
            &metrics.messages,
        )
        .await;
        tracing::debug!(?ended, "websocket ended");
        metrics.closed(ended);
        metrics.connections.decrement(1.0);
        drop(slot);
        drop(tracked);
    }
}

/// `GET /healthz`: for the ALB, whose health checks cannot use websockets, and for
/// the container health check. It says whether the process serves, nothing more: ECS
/// replaces a task that fails either check whatever its protection, so a task leaving
/// its service stays green while its clients move, and refuses new ones at the
/// upgrade instead.
async fn healthz() -> &'static str {
    "Healthy"
}

/// What `GET /status` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Clients connected now.
    pub connections: usize,
    /// `MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// False once shutdown has begun.
    pub accepting: bool,
    /// The task's protection: phase, expiry, task ARN, last rejection or error; the
    /// texts shortened by [`public_text`].
    pub protection: serde_json::Value,
    /// The protection calls made so far.
    pub protection_calls: Counters,
    /// Whether the service still wants this task: `on` (the watcher asks ECS),
    /// `membership` (`wanted` or `leaving`) and, when leaving, the `reason`.
    pub drain: serde_json::Value,
}

/// `GET /status`: the connection count and the protection state, as JSON.
async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let protection = shared.connections.protection();
    let body = Status {
        connections: shared.connections.count(),
        max_connections: shared.connections.limit(),
        accepting: !shared.shutdown.is_cancelled(),
        protection: public_state(&protection.current()),
        protection_calls: protection.counters(),
        drain: serde_json::json!({
            "on": shared.drain.is_on(),
            "membership": if shared.leaving().is_some() { "leaving" } else { "wanted" },
            "reason": shared.leaving().map(|r| r.to_string()),
        }),
    };
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// The protection state as `/status` shows it to anyone: error texts can carry the
/// agent's URL, internal addresses and whole AWS messages, so they are shortened by
/// [`public_text`]; the full text is in the server's log.
fn public_state(state: &ProtectionState) -> serde_json::Value {
    let mut value = serde_json::to_value(state).unwrap_or_default();
    for field in ["last_error", "last_rejection"] {
        if let Some(serde_json::Value::String(text)) = value.get_mut(field) {
            *text = public_text(text);
        }
    }
    value
}

/// `text` without URLs or network addresses, and at most [`MAX_PUBLIC_TEXT`] bytes.
#[must_use]
pub fn public_text(text: &str) -> String {
    let mut out = String::new();
    for word in text.split_whitespace() {
        let bare = word.trim_matches(|c: char| "()[]{}<>,;'\"`".contains(c));
        let hidden = if bare.contains("://") {
            "<url>"
        } else if looks_like_address(bare) || looks_like_address(word.trim_end_matches(',')) {
            "<address>"
        } else {
            word
        };
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(hidden);
    }
    if out.len() > MAX_PUBLIC_TEXT {
        let mut end = MAX_PUBLIC_TEXT - 3;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

/// An IP address, with or without a port, or a `host:port`.
fn looks_like_address(word: &str) -> bool {
    let word = word.trim_end_matches(['.', ':']);
    if word.parse::<std::net::IpAddr>().is_ok() || word.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match word.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_text_hides_urls_and_addresses_and_is_short() {
        let text = "error sending request for url (http://169.254.170.2/api/abc/task-protection/v1/state): \
                    connect to 10.0.1.23:51678 failed, and [fd00::1]:80 and agent.internal:8080 too";
        let shown = public_text(text);
        for secret in ["169.254", "10.0.1.23", "fd00", "agent.internal", "http"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.starts_with("error sending request for url <url>"),
            "{shown}"
        );
        let long = "Rate exceeded ".repeat(40);
        let shown = public_text(&long);
        assert!(
            shown.len() <= MAX_PUBLIC_TEXT && shown.ends_with("..."),
            "{shown}"
        );
        assert_eq!(
            public_text("DEPLOYMENT_BLOCKED: arn:aws:ecs:us-east-1:1:task/x"),
            "DEPLOYMENT_BLOCKED: arn:aws:ecs:us-east-1:1:task/x"
        );
    }
}
