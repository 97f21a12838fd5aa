//! A plain-HTTP client for the endpoints ECS gives a task on a link-local address:
//! the agent's task protection endpoint and task metadata.
//!
//! Both are `http://169.254.170.2/...`, served by the ECS agent's Go HTTP server, so a
//! general-purpose client (URL parsing with IDNA, TLS, proxies, a pool) is weight for
//! nothing: this is hyper's HTTP/1 client on one TCP connection, reused while it is
//! fresh. Two rules come from that server (`ecs-agent/tmds/server.go`, with the 5 s
//! timeouts of `agent/handlers/task_server_setup.go`):
//!
//! - **It closes a keep-alive connection after 5 s idle** (Go's `IdleTimeout` falls
//!   back to its `ReadTimeout`). A request sent on a connection the server is just
//!   closing fails after it was sent, which would count as "ECS may have applied it".
//!   So a connection idle for [`RETIRE_AFTER`] (well inside those 5 s) is not used
//!   again: the next request opens a new one, a few hundred microseconds on a local
//!   address.
//! - **The server only ever closes a connection it is not reading a request from**,
//!   and answers every request it has read within its 5 s write timeout. So a
//!   request that fails on a reused connection before any answer, and fast
//!   ([`QUICK_FAILURE`]), met a close it never read: it is sent once more, on a new
//!   connection, before the failure counts. (Fargate's own implementation of the
//!   endpoints does not publish its idle timeout; this covers a shorter one too.)
//!
//! No proxy is ever used: the addresses are link-local, and `HTTP_PROXY`, set in task
//! definitions for outbound traffic, must not apply to them.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::client::conn::http1::{self, SendRequest};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A connection idle this long is not used again: the agent closes its idle
/// connections after 5 s.
pub(crate) const RETIRE_AFTER: Duration = Duration::from_secs(3);

/// A request on a reused connection that fails within this long, before any answer,
/// is sent once more on a new connection. Kept under the margin that the state
/// machine adds to the agent's 4 s budget, so that the second try still lands within
/// the window counted from the first.
pub(crate) const QUICK_FAILURE: Duration = Duration::from_millis(500);

/// The most of an answer body that is read; real answers are a few kilobytes.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// Where requests go: `host:port`, from an `http://` URL.
#[derive(Debug)]
pub(crate) struct LinkLocal {
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority.
    authority: String,
    /// The path of the base URL, without a trailing slash.
    base_path: String,
    idle: Mutex<Option<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<OnceBody>,
    since: Instant,
}

/// An answer, read whole (up to [`MAX_BODY`]).
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Nothing was sent: the connection could not be made.
    NotSent(Box<dyn std::error::Error + Send + Sync>),
    /// The request may have been sent; no complete answer came.
    Lost(hyper::Error),
}

/// Why a base URL cannot be used.
pub(crate) type UrlError = String;

impl LinkLocal {
    /// A client for `base`, an absolute `http://` URL whose path the request paths
    /// are appended to.
    pub(crate) fn new(base: &str) -> Result<Self, UrlError> {
        let base = base.trim().trim_end_matches('/');
        let uri: http::Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("http") => {}
            Some("https") => {
                return Err(
                    "https is not supported: ECS serves this endpoint as plain http on a \
                     link-local address (http://169.254.170.2/...)"
                        .to_owned(),
                );
            }
            _ => return Err("expected an http:// URL".to_owned()),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| "expected an http:// URL with a host".to_owned())?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported".to_owned());
        }
        if uri.query().is_some() {
            return Err("a query is not supported".to_owned());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("expected an http:// URL with a host".to_owned());
        }
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            idle: Mutex::new(None),
        })
    }

    /// `http://authority/base_path/path`, for messages.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.base_path)
    }

    /// The `host:port` connected to, for messages.
    pub(crate) fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sends one request to `path` (appended to the base URL's path) and reads the
    /// answer. Dropping the future drops the connection with it.
    pub(crate) async fn send(
        &self,
        method: http::Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<Answer, Failure> {
        let request = || self.request(method.clone(), path, json.clone());
        match self.take_idle() {
            Some(sender) => {
                let sent = Instant::now();
                match exchange(sender, request()).await {
                    Ok((answer, sender)) => Ok(self.keep(answer, sender)),
                    // Closed before it was sent, or met a close the server never
                    // read: once more, on a new connection.
                    Err(Attempt::NotSent(_)) => self.fresh(request()).await,
                    Err(Attempt::Lost(_)) if sent.elapsed() < QUICK_FAILURE => {
                        self.fresh(request()).await
                    }
                    Err(Attempt::Lost(e) | Attempt::BodyLost(e)) => Err(Failure::Lost(e)),
                }
            }
            None => self.fresh(request()).await,
        }
    }

    async fn fresh(&self, request: http::Request<OnceBody>) -> Result<Answer, Failure> {
        let sender = self
            .connect()
            .await
            .map_err(|e| Failure::NotSent(Box::new(e)))?;
        match exchange(sender, request).await {
            Ok((answer, sender)) => Ok(self.keep(answer, sender)),
            Err(Attempt::NotSent(e)) => Err(Failure::NotSent(Box::new(e))),
            Err(Attempt::Lost(e) | Attempt::BodyLost(e)) => Err(Failure::Lost(e)),
        }
    }

    fn request(
        &self,
        method: http::Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> http::Request<OnceBody> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base_path))
            .header(http::header::HOST, &self.authority);
        if json.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        builder
            .body(OnceBody(json.map(Bytes::from)))
            // The path and the authority were checked when the client was made.
            .unwrap_or_else(|_| http::Request::new(OnceBody(None)))
    }

    fn take_idle(&self) -> Option<SendRequest<OnceBody>> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        (idle.since.elapsed() < RETIRE_AFTER && !idle.sender.is_closed()).then_some(idle.sender)
    }

    fn keep(&self, answer: Answer, sender: Option<SendRequest<OnceBody>>) -> Answer {
        if let Some(sender) = sender {
            *self.idle.lock().unwrap_or_else(PoisonError::into_inner) = Some(Idle {
                sender,
                since: Instant::now(),
            });
        }
        answer
    }

    async fn connect(&self) -> io::Result<SendRequest<OnceBody>> {
        let stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(Io(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

enum Attempt {
    /// The request did not leave.
    NotSent(hyper::Error),
    /// It may have left; no answer began.
    Lost(hyper::Error),
    /// The answer began and broke off: the server read the request.
    BodyLost(hyper::Error),
}

/// One request on `sender`'s connection; the sender comes back when the connection
/// may serve another.
async fn exchange(
    mut sender: SendRequest<OnceBody>,
    request: http::Request<OnceBody>,
) -> Result<(Answer, Option<SendRequest<OnceBody>>), Attempt> {
    if let Err(e) = sender.ready().await {
        return Err(Attempt::NotSent(e));
    }
    let response = match sender.try_send_request(request).await {
        Ok(response) => response,
        Err(mut e) => {
            return Err(if e.take_message().is_some() {
                Attempt::NotSent(e.into_error())
            } else {
                Attempt::Lost(e.into_error())
            });
        }
    };
    let status = response.status().as_u16();
    let closes = response
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    let mut whole = true;
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(e)) => return Err(Attempt::BodyLost(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = MAX_BODY.saturating_sub(bytes.len());
                    bytes.extend_from_slice(&data[..data.len().min(room)]);
                    if bytes.len() >= MAX_BODY {
                        whole = false;
                        break;
                    }
                }
            }
        }
    }
    let reusable = whole && !closes;
    Ok((
        Answer {
            status,
            body: bytes,
        },
        reusable.then_some(sender),
    ))
}

/// A request body sent in one piece, or none.
#[derive(Debug)]
pub(crate) struct OnceBody(Option<Bytes>);

impl Body for OnceBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// A tokio stream as hyper's I/O, without unsafe code: reads go through a buffer on
/// the stack (answers are small).
#[derive(Debug)]
struct Io(TcpStream);

impl hyper::rt::Read for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let mut scratch = [0_u8; 4096];
        let n = buf.remaining().min(scratch.len());
        let mut read = ReadBuf::new(&mut scratch[..n]);
        ready!(Pin::new(&mut self.0).poll_read(cx, &mut read))?;
        buf.put_slice(read.filled());
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
