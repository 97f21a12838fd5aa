//! The HTTP routes: the page and its websocket on `/` (the page also as
//! `/index.html`, as the original sample served it), `/healthz` for the load
//! balancer, `/status` for people and the page.
//!
//! A websocket is admitted here, in this order: a well-formed handshake; a page of
//! an allowed origin; a server that is not shutting down and a task its service
//! still wants; an address not barred after a flood, room for the client's address,
//! then room in all.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{self, Origins};
use crate::connection::limits::Limits;
use crate::connection::metered::SharedRules;
use crate::connections::{Connections, Denied};
use crate::metrics::ServerMetrics;
use crate::upgrade::{self, Asked};

/// The page, compiled in so the binary needs no files at run time.
pub const PAGE: &str = include_str!("../static/index.html");

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) connections: Arc<Connections>,
    /// The heartbeat, the shutdown, and messages for every client.
    pub(crate) notices: Arc<crate::notices::Notices>,
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
    /// The limits the frame scanner of every connection follows.
    pub(crate) rules: SharedRules,
    /// The pages that may connect.
    pub(crate) origins: Origins,
    /// Count clients by the address the load balancer appended to
    /// `X-Forwarded-For`, rather than by the peer (the load balancer itself).
    pub(crate) trust_forwarded_for: bool,
    /// `/status` names the task (its ARN) and shows ARNs in error texts.
    pub(crate) show_identifiers: bool,
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

/// The address a connection came from, which `http::serve` gives each request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/index.html", get(page))
        .route("/healthz", get(healthz))
        .route("/status", get(crate::status::status))
        .with_state(shared)
}

/// `GET /`: the websocket when the request asks for an upgrade, else the page, so
/// `ws://host/` works as in the original sample.
async fn root(State(shared): State<Arc<Shared>>, mut request: Request) -> Response {
    match upgrade::asked(&mut request) {
        Asked::No => page().await,
        Asked::Malformed(answer) => answer,
        Asked::Yes(handshake) => admit(&shared, &request, handshake),
    }
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(PAGE),
    )
        .into_response()
}

fn unavailable(status: StatusCode, reason: &'static str) -> Response {
    (
        status,
        [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
        reason,
    )
        .into_response()
}

fn admit(shared: &Arc<Shared>, request: &Request, handshake: upgrade::Handshake) -> Response {
    let headers = request.headers();
    match shared.origins.check(headers) {
        Ok(()) => {}
        Err(admission::Refused::Several) => {
            return (StatusCode::BAD_REQUEST, "more than one Origin header").into_response();
        }
        Err(admission::Refused::Foreign) => {
            tracing::info!(
                origin = ?headers.get(header::ORIGIN),
                "Refused a websocket from an origin not in ALLOWED_ORIGINS"
            );
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    // Counted before the shutdown check: either shutdown has begun and the client is
    // refused, or the shutdown waits for this client and says goodbye to it.
    let tracked = shared.tracker.token();
    if shared.shutdown.is_cancelled() {
        return unavailable(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
    }
    if shared.leaving().is_some() {
        // The load balancer keeps sending some clients here: /healthz stays green while
        // the task leaves, because ECS replaces a task whose health check fails. Each
        // is refused with Retry-After and comes back to a task that stays.
        return unavailable(
            StatusCode::SERVICE_UNAVAILABLE,
            "this task is leaving its service",
        );
    }
    let peer = request
        .extensions()
        .get::<Peer>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
    let address = admission::client_address(peer, headers, shared.trust_forwarded_for);
    let slot = match shared.connections.try_open(address) {
        Ok(slot) => slot,
        Err(Denied::ServerFull) => {
            tracing::warn!(
                limit = shared.connections.limit(),
                "Refused a client: MAX_CONNECTIONS reached"
            );
            shared.metrics.refused.increment(1);
            return unavailable(StatusCode::SERVICE_UNAVAILABLE, "too many connections");
        }
        Err(Denied::AddressFull) => {
            tracing::info!(
                %address,
                limit = shared.connections.per_address(),
                "Refused a client: MAX_CONNECTIONS_PER_ADDRESS reached for its address"
            );
            shared.metrics.refused.increment(1);
            return unavailable(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address",
            );
        }
        Err(Denied::AddressBarred) => {
            shared.metrics.refused.increment(1);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, HeaderValue::from_static("10"))],
                "your address flooded this server a moment ago",
            )
                .into_response();
        }
    };
    // Subscribed now, so that no notice sent before the upgrade is missed.
    let notices = shared.notices.subscribe();
    handshake.accept(Arc::clone(shared), slot, notices, tracked)
}

/// `GET /healthz`: for the ALB, whose health checks cannot use websockets, and for
/// the container health check. It says whether the process serves, nothing more: ECS
/// replaces a task that fails either check whatever its protection, so a task leaving
/// its service stays green while its clients move, and refuses new ones at the
/// upgrade instead.
async fn healthz() -> &'static str {
    "Healthy"
}
