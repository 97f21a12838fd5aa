//! The websocket handshake (RFC 6455, section 4.2), and the client's task once
//! hyper hands the connection over.
//!
//! Done here rather than by axum's `WebSocketUpgrade`, for two reasons:
//! - the frame scanner must wrap the connection as hyper hands it over: hyper reads
//!   ahead with the request, and a client need not wait for the 101 to send frames,
//!   so a scanner under hyper would start in the middle of a frame;
//! - the task holds what a client needs once: axum's `on_upgrade` keeps its
//!   callback's captures beside the future the callback returns, and an idle client
//!   is mostly that task.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast;
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::connection::limits::MAX_WRITE_BUFFER_BYTES;
use crate::connection::metered::Metered;
use crate::connection::{self, Ended, Notice, close_code};
use crate::connections::Slot;
use crate::routes::Shared;

/// The read buffer of each websocket. tungstenite's default is 128 KiB per
/// connection, which makes 10,000 idle clients cost 1.3 GB, and tungstenite fills
/// the whole buffer on every read, so each idle connection pays for all of it. This
/// protocol's messages are a few bytes (a `ping` frame is 10), so 256 bytes hold
/// dozens of them; a larger one (up to `MAX_MESSAGE_BYTES`) still arrives, the
/// buffer growing for it and keeping that size, and one over the limit is refused
/// before it grows anything.
pub const READ_BUFFER_BYTES: usize = 256;

/// A request that asked for a websocket, checked.
#[derive(Debug)]
pub(crate) struct Handshake {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Whether a request asks for a websocket.
#[derive(Debug)]
pub(crate) enum Asked {
    /// No `Upgrade` header: a plain request.
    No,
    /// A well-formed upgrade request.
    Yes(Handshake),
    /// An upgrade request that cannot be answered with 101, and the answer saying
    /// why.
    Malformed(Response),
}

/// Whether `headers` carry `token` in a comma-separated `name` header, in any case.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn malformed(status: StatusCode, why: &'static str) -> Asked {
    Asked::Malformed((status, why).into_response())
}

/// Reads the handshake out of `request`: the checks of RFC 6455, section 4.2.1.
pub(crate) fn asked(request: &mut Request) -> Asked {
    let headers = request.headers();
    if !headers.contains_key(header::UPGRADE) {
        return Asked::No;
    }
    if request.method() != Method::GET || request.version() != Version::HTTP_11 {
        return malformed(
            StatusCode::BAD_REQUEST,
            "a websocket upgrade is a GET over HTTP/1.1",
        );
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return malformed(StatusCode::BAD_REQUEST, "`Upgrade` is not `websocket`");
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return malformed(
            StatusCode::BAD_REQUEST,
            "`Connection` does not include `upgrade`",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut answer = (
            StatusCode::UPGRADE_REQUIRED,
            "`Sec-WebSocket-Version` must be 13",
        )
            .into_response();
        answer.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Asked::Malformed(answer);
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return malformed(StatusCode::BAD_REQUEST, "`Sec-WebSocket-Key` is missing");
    };
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return malformed(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        );
    };
    Asked::Yes(Handshake { key, on_upgrade })
}

impl Handshake {
    /// Answers 101 and starts the client's task, which takes over the connection
    /// once hyper has written the answer.
    pub(crate) fn accept(
        self,
        shared: Arc<Shared>,
        slot: Slot,
        notices: broadcast::Receiver<Notice>,
        tracked: TaskTrackerToken,
    ) -> Response {
        let accept_key = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        tokio::spawn(client(self.on_upgrade, shared, slot, notices, tracked));
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(value) = HeaderValue::from_str(&accept_key) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
        }
        response
    }
}

/// One client, from its welcome to its goodbye.
///
/// What this future holds is most of what an idle client costs: so it keeps one
/// handle on what every client shares instead of copies of the parts it uses, and it
/// is an `async` block rather than an `async fn`, whose arguments would be stored
/// twice.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn client(
    on_upgrade: OnUpgrade,
    shared: Arc<Shared>,
    mut slot: Slot,
    mut notices: broadcast::Receiver<Notice>,
    tracked: TaskTrackerToken,
) -> impl Future<Output = ()> + Send {
    async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!("websocket upgrade failed: {error}");
                return;
            }
        };
        let limits = &shared.limits;
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .max_message_size(Some(limits.max_message_bytes))
            .max_frame_size(Some(limits.max_message_bytes))
            .write_buffer_size(0)
            .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES);
        // Ready at once: it wraps the connection and does no I/O (tungstenite's
        // proxies take the real wakers at the first read and write). Awaited, its
        // 512-byte state would stay reserved in every client's task for its whole
        // life, and take the task to jemalloc's next size class.
        let Some(mut socket) = WebSocketStream::from_raw_socket(
            Metered::new(TokioIo::new(upgraded), &shared.rules),
            Role::Server,
            Some(config),
        )
        .now_or_never() else {
            tracing::warn!("the websocket was not ready at once; dropping the connection");
            return;
        };
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
            limits,
            &metrics.messages,
        )
        .await;
        tracing::debug!(?ended, "websocket ended");
        metrics.closed(ended);
        metrics.connections.decrement(1.0);
        if ended == Ended::Flooded {
            slot.flooded();
        } else {
            drop(slot);
        }
        // A client refused for a message too big, bad text or a protocol error gets
        // to read why; a flooder (1008) is hung up on: reading what it still sends
        // would only spend more on it.
        if let Ended::Refused(code) = ended
            && code != close_code::POLICY
        {
            // Boxed: an idle client's future would otherwise hold room for it.
            Box::pin(socket.get_mut().linger()).await;
        }
        drop(tracked);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use task_protection::{LocalBackend, ProtectionSettings, TaskProtection};

    use super::*;
    use crate::connection::limits::Limits;

    /// An idle client is mostly its task: this future, in a cell of tokio's that
    /// adds about 130 bytes and is aligned to 128, which jemalloc rounds up to its
    /// next size class: 1,024 bytes for a future up to about 890, 1,280 up to about
    /// 1,150. BENCHMARKS.md has the figures.
    const MOST_BYTES: usize = 880;

    #[tokio::test]
    async fn an_idle_clients_task_stays_small() {
        let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
        let connections = crate::connections::Connections::new(10, 0, protection);
        let notices = Arc::new(crate::notices::Notices::default());
        let shared = Arc::new(Shared {
            connections: Arc::clone(&connections),
            notices: Arc::clone(&notices),
            shutdown: tokio_util::sync::CancellationToken::new(),
            tracker: tokio_util::task::TaskTracker::new(),
            refused: std::sync::atomic::AtomicBool::new(false),
            limits: Limits::default(),
            rules: crate::connection::metered::SharedRules::from(&Limits::default()),
            origins: crate::admission::Origins::any(),
            trust_forwarded_for: false,
            show_identifiers: false,
            metrics: crate::metrics::ServerMetrics::register(),
            drain: task_protection::drain::Drain::off(),
        });
        let mut request = axum::http::Request::new(());
        let on_upgrade = hyper::upgrade::on(&mut request);
        let slot = connections
            .try_open(IpAddr::from([192, 0, 2, 1]))
            .expect("room");
        let task = client(
            on_upgrade,
            Arc::clone(&shared),
            slot,
            notices.subscribe(),
            shared.tracker.token(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= MOST_BYTES, "a client's future takes {size} bytes");
    }
}
