//! An HTTP proxy in front of moto that counts SQS requests by operation, read from the
//! `x-amz-target: AmazonSQS.<Operation>` header of each request, and can make chosen
//! operations misbehave: hang, lose their answer, be slow, or fail with an SQS error.
//! It counts what a client really sends, whatever the client reports about itself.
//!
//! The AWS SDK sends one request at a time on a connection (HTTP/1.1 without
//! pipelining), each with a `content-length` body, so the proxy reads whole requests
//! and decides for each one.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Largest request head read before giving up on a connection.
const MAX_HEAD: usize = 64 * 1024;

/// What the proxy does with a request for a chosen operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Never forwarded and never answered: the connection stays open and silent.
    Hang,
    /// Forwarded, so SQS applies it, but its answer never reaches the client.
    Unanswered,
    /// Forwarded after this delay.
    Delay(Duration),
    /// Forwarded at once, so SQS applies it, but its answer is held back this long.
    DelayAnswer(Duration),
    /// Answered by the proxy with this SQS error, not forwarded.
    Error {
        /// HTTP status.
        status: u16,
        /// The SQS error code, e.g. `AccessDenied`, `AWS.SimpleQueueService.NonExistentQueue`.
        code: &'static str,
        /// SQS's message.
        message: String,
    },
}

impl Fault {
    /// SQS's `AccessDenied` for `action` (e.g. `sqs:changemessagevisibility`), as IAM
    /// answers a role without that permission.
    #[must_use]
    pub fn access_denied(action: &str) -> Self {
        Self::Error {
            status: 403,
            code: "AccessDenied",
            message: format!(
                "User: arn:aws:sts::123456789012:assumed-role/worker/task is not authorized to perform: {action} on resource: arn:aws:sqs:us-east-1:123456789012:jobs because no identity-based policy allows the {action} action"
            ),
        }
    }

    /// A 500 `InternalError`.
    #[must_use]
    pub fn server_error() -> Self {
        Self::Error {
            status: 500,
            code: "InternalError",
            message: "We encountered an internal error. Please try again.".to_owned(),
        }
    }
}

/// One request as the proxy saw it: when it arrived and when its answer started back.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The SQS operation.
    pub operation: String,
    /// When the whole request had arrived.
    pub sent_at: Instant,
    /// When the first byte of its answer was passed back; `None` while unanswered.
    pub answered_at: Option<Instant>,
    /// When the client closed the connection before any answer came: it gave up on
    /// the request (the server may still be working on it).
    pub abandoned_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Rules {
    counts: BTreeMap<String, u64>,
    /// Every request, in order of arrival.
    exchanges: Vec<Exchange>,
    /// Requests passed on to SQS, by operation (a delayed one once its delay is over).
    forwarded: BTreeMap<String, u64>,
    /// Operation → (fault, how many more requests it applies to; None: until cleared).
    faults: HashMap<String, (Fault, Option<u64>)>,
}

type Shared = Arc<Mutex<Rules>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Rules> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A counting, fault-injecting proxy on a loopback port; stops accepting on drop.
#[derive(Debug)]
pub struct CountingProxy {
    port: u16,
    shared: Shared,
    accept: AbortHandle,
}

impl CountingProxy {
    /// Starts forwarding a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind the counting proxy: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let shared: Shared = Arc::default();
        let rules = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let rules = Arc::clone(&rules);
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(upstream).await {
                        forward(inbound, outbound, rules).await;
                    }
                });
            }
        })
        .abort_handle();
        Self {
            port,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests so far, by operation (`ReceiveMessage`, `DeleteMessageBatch`, ...),
    /// faulted ones included.
    #[must_use]
    pub fn counts(&self) -> BTreeMap<String, u64> {
        lock(&self.shared).counts.clone()
    }

    /// Requests so far for `operation`.
    #[must_use]
    pub fn count(&self, operation: &str) -> u64 {
        lock(&self.shared)
            .counts
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    /// Requests for `operation` passed on to SQS so far.
    #[must_use]
    pub fn forwarded(&self, operation: &str) -> u64 {
        lock(&self.shared)
            .forwarded
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    /// Every request so far, in order of arrival, with when it was answered.
    #[must_use]
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.shared).exchanges.clone()
    }

    /// Requests so far.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }

    /// Applies `fault` to every request for `operation` until [`clear`](Self::clear).
    pub fn fault(&self, operation: &str, fault: Fault) {
        lock(&self.shared)
            .faults
            .insert(operation.to_owned(), (fault, None));
    }

    /// Applies `fault` to the next `times` requests for `operation`.
    pub fn fault_times(&self, operation: &str, fault: Fault, times: u64) {
        lock(&self.shared)
            .faults
            .insert(operation.to_owned(), (fault, Some(times)));
    }

    /// Requests for `operation` are forwarded normally again.
    pub fn clear(&self, operation: &str) {
        lock(&self.shared).faults.remove(operation);
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Counts the request and returns the fault to apply to it, if any, and its place in
/// the exchanges.
fn decide(shared: &Shared, operation: Option<&str>) -> (Option<Fault>, Option<usize>) {
    let mut rules = lock(shared);
    let Some(op) = operation else {
        return (None, None);
    };
    *rules.counts.entry(op.to_owned()).or_default() += 1;
    rules.exchanges.push(Exchange {
        operation: op.to_owned(),
        sent_at: Instant::now(),
        answered_at: None,
        abandoned_at: None,
    });
    let index = Some(rules.exchanges.len() - 1);
    (decide_fault(&mut rules, op), index)
}

fn decide_fault(rules: &mut Rules, op: &str) -> Option<Fault> {
    let (fault, left) = rules.faults.get_mut(op)?;
    let fault = fault.clone();
    if let Some(n) = left {
        *n = n.saturating_sub(1);
        if *n == 0 {
            rules.faults.remove(op);
        }
    }
    Some(fault)
}

/// What the answer pump of one connection needs to know about the request in flight.
#[derive(Debug, Default)]
struct InFlight {
    /// Its place in the exchanges, to stamp when its answer starts back.
    exchange: Option<usize>,
    /// Hold its answer until then.
    hold_until: Option<Instant>,
}

async fn forward(inbound: TcpStream, outbound: TcpStream, shared: Shared) {
    let (mut client_read, client_write) = inbound.into_split();
    let (mut server_read, mut server_write) = outbound.into_split();
    let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
    // Set once an answer must not reach the client: every later byte is dropped.
    let mute = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let in_flight: Arc<Mutex<InFlight>> = Arc::default();
    let answers = {
        let client_write = Arc::clone(&client_write);
        let mute = Arc::clone(&mute);
        let in_flight = Arc::clone(&in_flight);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if mute.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let (exchange, hold) = {
                    let mut f = in_flight.lock().unwrap_or_else(PoisonError::into_inner);
                    (f.exchange.take(), f.hold_until.take())
                };
                if let Some(until) = hold {
                    tokio::time::sleep_until(until).await;
                }
                if let Some(i) = exchange
                    && let Some(e) = lock(&shared).exchanges.get_mut(i)
                {
                    e.answered_at = Some(Instant::now());
                }
                if client_write
                    .lock()
                    .await
                    .write_all(&buf[..n])
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let mut pending = Vec::new();
    let forwarded = |op: Option<&str>| {
        if let Some(op) = op {
            *lock(&shared).forwarded.entry(op.to_owned()).or_default() += 1;
        }
    };
    loop {
        let Some((request, operation)) = read_request(&mut client_read, &mut pending).await else {
            // The client closed: a request still unanswered was given up.
            let unanswered = in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .exchange
                .take();
            if let Some(i) = unanswered
                && let Some(e) = lock(&shared).exchanges.get_mut(i)
            {
                e.abandoned_at = Some(Instant::now());
            }
            break;
        };
        let (fault, exchange) = decide(&shared, operation.as_deref());
        {
            let mut f = in_flight.lock().unwrap_or_else(PoisonError::into_inner);
            f.exchange = exchange;
            f.hold_until = match &fault {
                Some(Fault::DelayAnswer(d)) => Some(Instant::now() + *d),
                _ => None,
            };
        }
        match fault {
            None | Some(Fault::DelayAnswer(_)) => {
                let sent = server_write.write_all(&request).await;
                forwarded(operation.as_deref());
                if sent.is_err() {
                    break;
                }
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                let sent = server_write.write_all(&request).await;
                forwarded(operation.as_deref());
                if sent.is_err() {
                    break;
                }
            }
            Some(Fault::Error {
                status,
                code,
                message,
            }) => {
                let answer = error_answer(status, code, &message);
                in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .exchange = None;
                if let Some(i) = exchange
                    && let Some(e) = lock(&shared).exchanges.get_mut(i)
                {
                    e.answered_at = Some(Instant::now());
                }
                if write_locked(&client_write, &answer).await.is_err() {
                    break;
                }
            }
            Some(Fault::Hang) => {
                drain(&mut client_read).await;
                break;
            }
            Some(Fault::Unanswered) => {
                mute.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = server_write.write_all(&request).await;
                forwarded(operation.as_deref());
                drain(&mut client_read).await;
                break;
            }
        }
    }
    let _ = server_write.shutdown().await;
    answers.abort();
}

async fn write_locked(
    w: &Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    bytes: &[u8],
) -> std::io::Result<()> {
    w.lock().await.write_all(bytes).await
}

/// Reads and discards until the client closes the connection.
async fn drain(r: &mut (impl AsyncRead + Unpin)) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Reads one whole request (head and `content-length` body); returns its bytes and
/// its operation. `pending` carries bytes read past the end of a request.
async fn read_request(
    r: &mut (impl AsyncRead + Unpin),
    pending: &mut Vec<u8>,
) -> Option<(Vec<u8>, Option<String>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = find(pending, b"\r\n\r\n") {
            break i + 4;
        }
        if pending.len() > MAX_HEAD {
            return None;
        }
        let n = r.read(&mut buf).await.ok().filter(|n| *n > 0)?;
        pending.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    let mut length = 0usize;
    let mut operation = None;
    for line in head.lines() {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("x-amz-target") {
                operation = Some(value.strip_prefix("AmazonSQS.").unwrap_or(value).to_owned());
            }
        }
    }
    while pending.len() < head_end + length {
        let n = r.read(&mut buf).await.ok().filter(|n| *n > 0)?;
        pending.extend_from_slice(&buf[..n]);
    }
    let rest = pending.split_off(head_end + length);
    let request = std::mem::replace(pending, rest);
    Some((request, operation))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An SQS error answer in the JSON protocol, with the query-compatible code header the
/// SDK reads the error code from.
fn error_answer(status: u16, code: &str, message: &str) -> Vec<u8> {
    let fault = if status >= 500 { "Receiver" } else { "Sender" };
    let body = serde_json::json!({
        "__type": format!("com.amazonaws.sqs#{code}"),
        "message": message,
    })
    .to_string();
    format!(
        "HTTP/1.1 {status} Error\r\ncontent-type: application/x-amz-json-1.0\r\nx-amzn-query-error: {code};{fault}\r\nx-amzn-requestid: 00000000-0000-0000-0000-000000000000\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::read_request;

    #[tokio::test]
    async fn reads_requests_one_by_one() {
        let bytes = b"POST / HTTP/1.1\r\nhost: x\r\nx-amz-target: AmazonSQS.ReceiveMessage\r\ncontent-length: 16\r\n\r\n{\"QueueUrl\":\"q\"}POST / HTTP/1.1\r\nX-Amz-Target: AmazonSQS.DeleteMessageBatch\r\n\r\n";
        let mut reader = &bytes[..];
        let mut pending = Vec::new();
        let (first, op) = read_request(&mut reader, &mut pending).await.unwrap();
        assert_eq!(op.as_deref(), Some("ReceiveMessage"));
        assert!(first.ends_with(b"{\"QueueUrl\":\"q\"}"));
        let (_, op) = read_request(&mut reader, &mut pending).await.unwrap();
        assert_eq!(op.as_deref(), Some("DeleteMessageBatch"));
        assert!(read_request(&mut reader, &mut pending).await.is_none());
    }
}
