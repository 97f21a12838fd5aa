//! A tower layer that keeps the task protected while it serves HTTP requests.
//!
//! Every request in flight holds a [`ProtectionGuard`] from the moment the service is
//! called until the last frame of its response body has been handed to the server,
//! or the body is dropped (the client went away). While the task is leaving its
//! service ([`TaskProtection::drain`]) requests are still served, without a guard
//! ([`TaskProtection::try_hold`]), so protection can go as soon as the work held
//! before has. A slow handler or a response that
//! streams for minutes keeps the task protected; an idle service holds nothing and is
//! released after the maintain window. Guards are counted, not sent: a burst of a
//! thousand requests costs one PUT, as one request does.
//!
//! It works with any server built on [`http`] types and tower services: axum, tonic,
//! hyper through `hyper-util`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use task_protection::layer::ProtectionLayer;
//! use task_protection::{LocalBackend, ProtectionSettings, TaskProtection};
//!
//! let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
//! let app: axum::Router = axum::Router::new()
//!     .route("/jobs", axum::routing::post(|| async { "done" }))
//!     .layer(ProtectionLayer::new(protection.clone()))
//!     // Added after the layer, so not protected: see below.
//!     .route("/healthz", axum::routing::get(|| async { "ok" }));
//! # drop(app);
//! # }
//! ```
//!
//! Leave health checks out of the layer, as above (axum's `Router::layer` wraps only
//! the routes added before it), or name them with
//! [`skip_paths`](ProtectionLayer::skip_paths) or
//! [`skip_if`](ProtectionLayer::skip_if). A load balancer checks every few seconds;
//! each check would hold protection, so an idle task would be protected again and
//! again, and protection that outlives the work blocks deployments and scale-in. The
//! same goes for the scanners that try paths the service does not have: with axum,
//! `Router::route_layer` wraps only requests that match a route, so a 404 holds
//! nothing.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! # use task_protection::layer::ProtectionLayer;
//! # use task_protection::{LocalBackend, ProtectionSettings, TaskProtection};
//! # let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
//! let layer = ProtectionLayer::new(protection)
//!     .skip_paths(["/healthz", "/metrics"])
//!     .skip_if(|request| request.method == http::Method::OPTIONS);
//! let app: axum::Router = axum::Router::new()
//!     .route("/jobs", axum::routing::post(|| async { "done" }))
//!     .route("/healthz", axum::routing::get(|| async { "ok" }))
//!     .route_layer(layer);
//! # drop(app);
//! # }
//! ```
//!
//! # Work that outlives the response
//!
//! A websocket upgrade answers `101 Switching Protocols` with an empty body, so the
//! request's guard goes as soon as the upgrade is answered, while the connection goes
//! on. The layer puts a [`RequestProtection`] in each request's extensions; the
//! handler takes a guard from it and moves that guard into the connection's task:
//!
//! ```
//! use axum::Extension;
//! use axum::extract::ws::{WebSocket, WebSocketUpgrade};
//! use axum::response::{IntoResponse, Response};
//! use task_protection::layer::RequestProtection;
//!
//! async fn ws(upgrade: WebSocketUpgrade, Extension(request): Extension<RequestProtection>) -> Response {
//!     // Taken while the request's own guard still lives: no gap between the two.
//!     let Some(guard) = request.try_hold() else {
//!         // The task is leaving its service: send the client elsewhere.
//!         return (http::StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
//!     };
//!     upgrade.on_upgrade(move |socket| async move {
//!         serve(socket).await;
//!         drop(guard); // the connection is over: protection may go
//!     })
//! }
//! # async fn serve(_socket: WebSocket) {}
//! ```
//!
//! The same goes for a task the handler spawns to finish work after answering.
//!
//! # The task's other containers
//!
//! Protection is per task: a task whose containers each ran their own
//! [`TaskProtection`] would have one container release what another holds. So one
//! container owns protection, and the others hold through it: through its HTTP layer,
//! when their work is a request to it, or through a [`HoldEndpoint`] it serves on a
//! local port, where a request holds protection for as long as its response is open.
//! See [`HoldEndpoint`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{ProtectionGuard, TaskProtection};

/// Which requests hold nothing.
type Skip = Arc<dyn Fn(&http::request::Parts) -> bool + Send + Sync>;

/// Wraps a service in [`ProtectionService`]: each request holds a [`ProtectionGuard`]
/// until its response body has been sent.
#[derive(Clone)]
pub struct ProtectionLayer {
    protection: TaskProtection,
    skip: Option<Skip>,
}

impl std::fmt::Debug for ProtectionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionLayer")
            .field("protection", &self.protection)
            .field("skip", &self.skip.is_some())
            .finish()
    }
}

impl ProtectionLayer {
    /// A layer that takes its guards from `protection`.
    #[must_use]
    pub fn new(protection: TaskProtection) -> Self {
        Self {
            protection,
            skip: None,
        }
    }

    /// Requests for which `skip` is true hold nothing (and their
    /// [`RequestProtection`] gives no guard): health checks, metrics scrapes.
    /// Several calls add up: a request is skipped when any of them says so.
    #[must_use]
    pub fn skip_if(
        mut self,
        skip: impl Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.skip = Some(match self.skip.take() {
            Some(before) => Arc::new(move |parts| before(parts) || skip(parts)),
            None => Arc::new(skip),
        });
        self
    }

    /// Requests for exactly these paths hold nothing.
    #[must_use]
    pub fn skip_paths<P: Into<String>>(self, paths: impl IntoIterator<Item = P>) -> Self {
        let paths: Vec<String> = paths.into_iter().map(Into::into).collect();
        self.skip_if(move |parts| paths.iter().any(|p| p == parts.uri.path()))
    }
}

impl<S> Layer<S> for ProtectionLayer {
    type Service = ProtectionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProtectionService {
            inner,
            protection: self.protection.clone(),
            skip: self.skip.clone(),
        }
    }
}

/// A service that holds a [`ProtectionGuard`] for each request while the inner
/// service handles it and while the response body is sent. See the
/// [module docs](self).
#[derive(Clone)]
pub struct ProtectionService<S> {
    inner: S,
    protection: TaskProtection,
    skip: Option<Skip>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for ProtectionService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionService")
            .field("inner", &self.inner)
            .field("protection", &self.protection)
            .field("skip", &self.skip.is_some())
            .finish()
    }
}

impl<S> ProtectionService<S> {
    /// Wraps `inner`; guards come from `protection`.
    #[must_use]
    pub fn new(inner: S, protection: TaskProtection) -> Self {
        Self {
            inner,
            protection,
            skip: None,
        }
    }

    /// The wrapped service.
    #[must_use]
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ProtectionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ProtectedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let skipped = self.skip.as_ref().is_some_and(|skip| skip(&parts));
        let mut request = Request::from_parts(parts, body);
        let guard = if skipped {
            None
        } else {
            request_guard(&self.protection)
        };
        request.extensions_mut().insert(RequestProtection {
            protection: guard.is_some().then(|| self.protection.clone()),
        });
        ResponseFuture {
            inner: self.inner.call(request),
            guard,
        }
    }
}

/// The guard for new work: none while the task is leaving its service (it should
/// take on no new protected work) or protection is shut down.
fn request_guard(protection: &TaskProtection) -> Option<ProtectionGuard> {
    protection.try_hold()
}

/// What [`ProtectionLayer`] puts in each request's extensions: the way to keep the
/// task protected past the response, for an upgraded connection or a spawned task.
#[derive(Debug, Clone)]
pub struct RequestProtection {
    /// `None` when the request itself is served without a guard.
    protection: Option<TaskProtection>,
}

impl RequestProtection {
    /// Another guard, for work that goes on after the response has been sent (a
    /// websocket connection, a spawned task). Take it while the request is being
    /// handled, so protection has no gap, and move it into that work.
    ///
    /// `None` when this request is served without protection (the task is leaving
    /// its service, or the layer skips it), or when the task has begun to leave its
    /// service since ([`TaskProtection::drain`]): then the handler turns the work away
    /// so that it goes to another task, or runs it knowingly unprotected.
    #[must_use = "protection is released as soon as the guard is dropped"]
    pub fn try_hold(&self) -> Option<ProtectionGuard> {
        self.protection.as_ref().and_then(request_guard)
    }
}

pin_project! {
    /// The future of [`ProtectionService`]: the inner service's, holding the guard
    /// until the response is ready, then handing it to the body.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<ProtectionGuard>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ProtectedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| ProtectedBody { inner, guard })))
    }
}

pin_project! {
    /// A response body that holds the request's guard until its last frame has been
    /// taken, an error ends it, or it is dropped.
    #[derive(Debug)]
    pub struct ProtectedBody<B> {
        #[pin]
        inner: B,
        guard: Option<ProtectionGuard>,
    }
}

impl<B> ProtectedBody<B> {
    /// The wrapped body, dropping the guard.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for ProtectedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let frame = ready!(inner.as_mut().poll_frame(cx));
        let done = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => inner.is_end_stream(),
        };
        if done {
            // Sent: the server has the last frame. Let protection go now rather than
            // when the server gets round to dropping the body.
            drop(this.guard.take());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How often a [`HoldBody`] writes a byte: a write to a connection its client has
/// closed fails, and the server then drops the body and its guard.
pub const HOLD_HEARTBEAT: Duration = Duration::from_secs(1);

/// A local endpoint through which the task's other containers hold protection: one
/// container owns [`TaskProtection`] and serves this on a port the others can reach
/// (in `awsvpc` mode the containers of a task share `localhost`); a container about
/// to start work sends a request to it and keeps the response open while it works.
/// The request holds a guard until its connection closes, however that happens (the
/// work is done, the container crashed).
///
/// The answer is `200` with a `text/plain` body that sends `held` at once and then a
/// newline every [`HOLD_HEARTBEAT`], so that a closed connection is noticed; `503`
/// `draining` when the task is leaving its service ([`TaskProtection::drain`]): the
/// work should go elsewhere. Serve it apart from the routes wrapped by
/// [`ProtectionLayer`], on a port the load balancer does not reach.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use task_protection::layer::HoldEndpoint;
/// use task_protection::{LocalBackend, ProtectionSettings, TaskProtection};
///
/// let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
/// let local: axum::Router =
///     axum::Router::new().route_service("/protection/hold", HoldEndpoint::new(protection));
/// // axum::serve(TcpListener::bind("127.0.0.1:9000"), local) in the owning container;
/// // in another: `curl -N http://127.0.0.1:9000/protection/hold` for as long as the work runs.
/// # drop(local);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct HoldEndpoint {
    protection: TaskProtection,
}

impl HoldEndpoint {
    /// An endpoint holding guards from `protection`.
    #[must_use]
    pub fn new(protection: TaskProtection) -> Self {
        Self { protection }
    }
}

impl<B> Service<Request<B>> for HoldEndpoint {
    type Response = Response<HoldBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<HoldBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<B>) -> Self::Future {
        let (status, body) = match self.protection.try_hold() {
            Some(guard) => (
                http::StatusCode::OK,
                HoldBody {
                    first: Some(bytes_of("held\n")),
                    _guard: Some(guard),
                    heartbeat: Some(tokio::time::interval_at(
                        tokio::time::Instant::now() + HOLD_HEARTBEAT,
                        HOLD_HEARTBEAT,
                    )),
                },
            ),
            None => (
                http::StatusCode::SERVICE_UNAVAILABLE,
                HoldBody {
                    first: Some(bytes_of("draining\n")),
                    _guard: None,
                    heartbeat: None,
                },
            ),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        std::future::ready(Ok(response))
    }
}

fn bytes_of(text: &'static str) -> Bytes {
    Bytes::from_static(text.as_bytes())
}

/// The body of a [`HoldEndpoint`] answer: it holds a guard until the server drops it.
#[derive(Debug)]
pub struct HoldBody {
    first: Option<Bytes>,
    /// Held until the server drops the body.
    _guard: Option<ProtectionGuard>,
    heartbeat: Option<tokio::time::Interval>,
}

impl Body for HoldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        match &mut self.heartbeat {
            None => Poll::Ready(None),
            Some(heartbeat) => {
                ready!(heartbeat.poll_tick(cx));
                Poll::Ready(Some(Ok(Frame::data(bytes_of("\n")))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.heartbeat.is_none()
    }
}
