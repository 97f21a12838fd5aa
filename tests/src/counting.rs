//! A TCP proxy in front of moto that counts SQS requests by operation, read from the
//! `x-amz-target: AmazonSQS.<Operation>` header of each request. It counts what a
//! client really sends, whatever the client reports about itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Header lines longer than this are bodies, not headers: skipped.
const MAX_LINE: usize = 256;

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

/// A counting proxy on a loopback port; stops on drop.
#[derive(Debug)]
pub struct CountingProxy {
    port: u16,
    counts: Counts,
    accept: AbortHandle,
}

impl CountingProxy {
    /// Starts forwarding a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind the counting proxy: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let counts: Counts = Arc::default();
        let shared = Arc::clone(&counts);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let counts = Arc::clone(&shared);
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(upstream).await {
                        forward(inbound, outbound, counts).await;
                    }
                });
            }
        })
        .abort_handle();
        Self {
            port,
            counts,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests so far, by operation (`ReceiveMessage`, `DeleteMessageBatch`, ...).
    #[must_use]
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Requests so far.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(inbound: TcpStream, outbound: TcpStream, counts: Counts) {
    let (mut client_read, mut client_write) = inbound.into_split();
    let (mut server_read, mut server_write) = outbound.into_split();
    let answers = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    let mut scanner = Scanner::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for op in scanner.feed(&buf[..n]) {
            *counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(op)
                .or_default() += 1;
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = server_write.shutdown().await;
    let _ = answers.await;
}

/// Finds `x-amz-target` header values in a byte stream cut anywhere.
#[derive(Debug, Default)]
struct Scanner {
    line: Vec<u8>,
    too_long: bool,
}

impl Scanner {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut found = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if !self.too_long
                    && let Some(op) = target(&self.line)
                {
                    found.push(op);
                }
                self.line.clear();
                self.too_long = false;
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            } else {
                self.too_long = true;
            }
        }
        found
    }
}

fn target(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let (name, value) = text.split_once(':')?;
    if !name.trim().eq_ignore_ascii_case("x-amz-target") {
        return None;
    }
    let value = value.trim();
    Some(value.strip_prefix("AmazonSQS.").unwrap_or(value).to_owned())
}

#[cfg(test)]
mod tests {
    use super::Scanner;

    #[test]
    fn finds_targets_across_chunk_boundaries() {
        let request = b"POST / HTTP/1.1\r\nhost: x\r\nx-amz-target: AmazonSQS.ReceiveMessage\r\n\r\n{\"QueueUrl\":\"q\"}POST / HTTP/1.1\r\nX-Amz-Target: AmazonSQS.DeleteMessageBatch\r\n\r\n";
        for cut in 0..request.len() {
            let mut s = Scanner::default();
            let mut ops = s.feed(&request[..cut]);
            ops.extend(s.feed(&request[cut..]));
            assert_eq!(
                ops,
                ["ReceiveMessage", "DeleteMessageBatch"],
                "cut at {cut}"
            );
        }
    }
}
