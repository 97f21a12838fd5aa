//! `websocket healthcheck`: asks the server's own `/healthz`, so a container health
//! check needs no curl in the image.
//!
//! A plain HTTP/1.1 request over a TCP socket is all it takes; the answer's status
//! line decides.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why the server was judged unhealthy.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    /// No connection, or it broke.
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// No full status line in time.
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    /// An answer other than 200.
    #[error("/healthz answered {0:?}")]
    Status(String),
}

/// Where the server listens, as seen from inside its own container: loopback when it
/// listens on every address.
#[must_use]
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// GETs `/healthz` at `addr`; `Ok` when it answers 200.
///
/// # Errors
/// When the server cannot be reached, is too slow, or answers anything but 200.
pub async fn check(addr: SocketAddr, timeout: Duration) -> Result<(), Unhealthy> {
    let status_line = tokio::time::timeout(timeout, status_line(addr))
        .await
        .map_err(|_| Unhealthy::Timeout(addr, timeout))?
        .map_err(|source| Unhealthy::Unreachable { addr, source })?;
    let code = status_line.split_whitespace().nth(1);
    if code == Some("200") {
        Ok(())
    } else {
        Err(Unhealthy::Status(status_line))
    }
}

async fn status_line(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: websocket-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The status line is all that matters; read at most 1 KiB looking for it.
    let mut answer = Vec::with_capacity(256);
    let mut chunk = [0_u8; 256];
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}
