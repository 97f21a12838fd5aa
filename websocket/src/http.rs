//! Accepting TCP connections and serving HTTP/1.1 on them, with the limits that
//! `axum::serve` leaves out.
//!
//! - HTTP/1.1 only. The ALB speaks HTTP/1.1 to a target group whose protocol
//!   version is HTTP1, and browsers' websocket upgrades need it; a target group set
//!   to HTTP/2 would pass health checks and fail every upgrade, so HTTP/2 is refused
//!   outright instead of served.
//! - A header read timeout, which needs a timer that `axum::serve` does not give
//!   hyper: a client that sends its headers slowly (or not at all) is cut off. It
//!   also ends idle keep-alive connections, so it stays above the ALB's 60 s idle
//!   timeout: the ALB reuses connections to its targets.
//! - At most [`MAX_PENDING_CONNECTIONS`] connections that have not (yet) become
//!   websockets; past it the server stops accepting until one finishes, and the
//!   kernel's backlog holds the rest. Each may hold at most [`MAX_HEADER_BYTES`].
//! - Small kernel send buffers ([`SEND_BUFFER_BYTES`]) and `TCP_NODELAY`.
//! - Running out of file descriptors does not stop the server: it keeps serving the
//!   clients it has, says so once, and tries accepting again after a pause.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::connection::limits::SEND_BUFFER_BYTES;
use crate::routes::Peer;

/// Most connections at once that are not websockets: requests for the page,
/// `/status`, `/healthz`, and upgrades in progress.
pub const MAX_PENDING_CONNECTIONS: usize = 1024;
/// The most a request's head may take, in bytes (hyper's minimum is 8 KiB). The
/// requests this server answers carry a few hundred bytes of headers.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long to wait before accepting again after running out of file descriptors.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// File descriptors the process needs besides its clients: the listener, the
/// protection backend's connections, logs, pending HTTP connections.
pub const FD_HEADROOM: u64 = 64;

/// Raises the soft limit on open files to the hard limit, as a server expecting
/// many clients should (Fargate's default is 65535 for both, older platforms and
/// EC2 hosts may start lower), and warns once when `max_connections` clients would
/// not fit.
pub fn raise_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!("cannot read the open-file limit: {error}");
            return;
        }
    };
    let soft = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {error}");
                soft
            }
        }
    } else {
        soft
    };
    let needed = (max_connections as u64).saturating_add(FD_HEADROOM);
    if needed > soft {
        tracing::warn!(
            open_file_limit = soft,
            hard_limit = hard,
            needed,
            "The open-file limit is {soft} (hard limit {hard}), but MAX_CONNECTIONS={max_connections} \
             needs about {needed}: clients past the limit will wait to be accepted"
        );
    }
}

/// How to serve HTTP.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    /// Time a client gets to send a request's head; also the keep-alive idle time.
    pub header_timeout: Duration,
    /// Connections that are not websockets, at most.
    pub max_pending: usize,
}

/// Accepts connections on `listener` and serves `router` on each until `stop` is
/// cancelled; then lets requests in flight finish, and returns when they have.
/// Connections that became websockets are not waited for: the caller tracks them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: HttpSettings,
    stop: CancellationToken,
) {
    let pending = Arc::new(Semaphore::new(settings.max_pending));
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let mut out_of_files = false;
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = Arc::clone(&pending).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error, &mut out_of_files).await;
                    continue;
                }
            },
        };
        if out_of_files {
            out_of_files = false;
            tracing::info!("Accepting connections again");
        }
        configure(&tcp);
        let io = TokioIo::new(tcp);
        let router = router.clone();
        // Each request carries the address it came from, which a websocket is counted
        // under.
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(Peer(peer));
            router.clone().oneshot(request)
        });
        let connection = builder.serve_connection(io, service).with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    // Finish the request in flight, if any; close an idle one now.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!("HTTP connection ended: {error}");
            }
            // Done, or handed over as a websocket: either way no longer pending.
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Too many open files (or no memory for a socket) is a state that passes as clients
/// leave: say it once, pause, and try again. Anything else concerns one connection.
async fn accept_failed(error: &io::Error, out_of_files: &mut bool) {
    use nix::errno::Errno;
    let errno = error.raw_os_error().map(Errno::from_raw);
    if matches!(
        errno,
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    ) {
        if !*out_of_files {
            *out_of_files = true;
            tracing::warn!(
                "Cannot accept connections: {error}; serving the clients already connected, \
                 and trying again every {ACCEPT_PAUSE:?}"
            );
        }
        tokio::time::sleep(ACCEPT_PAUSE).await;
    } else {
        tracing::debug!("accept failed: {error}");
    }
}

fn configure(tcp: &TcpStream) {
    // Small messages such as a pong go out at once instead of waiting for Nagle's
    // algorithm to batch them.
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {error}");
    }
    if let Err(error) = socket2::SockRef::from(tcp).set_send_buffer_size(SEND_BUFFER_BYTES) {
        tracing::debug!("cannot set SO_SNDBUF: {error}");
    }
}
