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
//! the routes added before it). A load balancer checks every few seconds; each check
//! would hold protection, so an idle task would be protected again and again, and
//! protection that outlives the work blocks deployments and scale-in.
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
//! use axum::response::Response;
//! use task_protection::layer::RequestProtection;
//!
//! async fn ws(upgrade: WebSocketUpgrade, Extension(request): Extension<RequestProtection>) -> Response {
//!     // Taken while the request's own guard still lives: no gap between the two.
//!     let guard = request.hold();
//!     upgrade.on_upgrade(move |socket| async move {
//!         serve(socket).await;
//!         drop(guard); // the connection is over: protection may go
//!     })
//! }
//! # async fn serve(_socket: WebSocket) {}
//! ```
//!
//! The same goes for a task the handler spawns to finish work after answering.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{ProtectionGuard, TaskProtection};

/// Wraps a service in [`ProtectionService`]: each request holds a [`ProtectionGuard`]
/// until its response body has been sent.
#[derive(Debug, Clone)]
pub struct ProtectionLayer {
    protection: TaskProtection,
}

impl ProtectionLayer {
    /// A layer that takes its guards from `protection`.
    #[must_use]
    pub fn new(protection: TaskProtection) -> Self {
        Self { protection }
    }
}

impl<S> Layer<S> for ProtectionLayer {
    type Service = ProtectionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProtectionService::new(inner, self.protection.clone())
    }
}

/// A service that holds a [`ProtectionGuard`] for each request while the inner
/// service handles it and while the response body is sent. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct ProtectionService<S> {
    inner: S,
    protection: TaskProtection,
}

impl<S> ProtectionService<S> {
    /// Wraps `inner`; guards come from `protection`.
    #[must_use]
    pub fn new(inner: S, protection: TaskProtection) -> Self {
        Self { inner, protection }
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

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let guard = request_guard(&self.protection);
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
    /// `None` when this request is served without protection, or when the task has
    /// begun to leave its service since ([`TaskProtection::drain`]): then the work
    /// runs unprotected, or the handler turns it away so it goes to another task.
    #[must_use = "protection is released as soon as the guard is dropped"]
    pub fn hold(&self) -> Option<ProtectionGuard> {
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
