//! A stand-in for the ECS agent's task protection endpoint, on a loopback port.
//!
//! It answers exactly as the agent does: every answer comes from the model of the
//! agent in `task_protection::testing::agent`, written from the agent's source, whose
//! conformance table (statuses, bodies, timing, each row citing the source) this
//! suite checks against this agent over HTTP (`e2e::agent_conformance`). What the
//! model leaves to a server is done here, as the agent's Go server does it:
//!
//! - a wiremock server runs the agent's router, limiter and handler: the router's
//!   plain-text 404, empty 405 and 301 for an unclean path; the limiter's 429 past
//!   a burst of 60 at 40 a second per path (every client here is on 127.0.0.1, one
//!   source address); the handler's answers, after ECS's latency, or a 504 at the
//!   agent's 4 s budget;
//! - a TCP front in front of it does what Go's `http.Server` does with its 5 s
//!   `ReadTimeout` and `WriteTimeout`: it closes a keep-alive connection idle for
//!   5 s, and closes, without the answer, a connection whose answer comes more than
//!   5 s after its request. [`IdleClose::Unseen`] makes the close reach the client
//!   only when it next sends: the race of a request sent just as the agent closes,
//!   at its worst (the client's connection task has not yet read the close).
//!
//! It also keeps ECS's own side apart from what it answers: a PUT that ECS accepts
//! is applied when it arrives, and the answer leaves after the latency, so tests can
//! check what ECS held at any moment, not what the program believed. Every request
//! is recorded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use task_protection::testing::agent::{self as model, Limiter, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub use task_protection::testing::Reply as Answer;

/// The path under `ECS_AGENT_URI`.
pub const STATE_PATH: &str = model::STATE_PATH;
/// The task ARN the fake agent reports.
pub const TASK_ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/test-cluster/0123456789abcdef";
/// The container id in the agent's paths (`/api/<id>/...`, `/v4/<id>/...`).
pub const ENDPOINT_ID: &str = "task";

/// How the front closes an idle connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleClose {
    /// As the agent's server does: the connection is closed when the idle timeout
    /// passes, and the client sees it close.
    Prompt,
    /// The agent closes at the idle timeout, but the client learns of it only when
    /// it sends its next request on that connection, which then fails.
    Unseen,
}

/// One recorded PUT.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The JSON body sent (`Null` when it is not JSON).
    pub body: Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Recorded {
    /// `ProtectionEnabled` of the body.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.body["ProtectionEnabled"].as_bool().unwrap_or(false)
    }
}

#[derive(Debug)]
struct Inner {
    script: Vec<Answer>,
    fallback: Option<Answer>,
    puts: Vec<Recorded>,
    /// How long ECS takes to answer the agent.
    latency: Duration,
    /// Every change ECS applied: when, and protected until when (`None`: off).
    changes: Vec<(std::time::Instant, Option<std::time::Instant>)>,
    limiter: Limiter,
    idle_timeout: Duration,
    idle_close: IdleClose,
}

impl Inner {
    fn protected_until(&self, at: std::time::Instant) -> Option<std::time::Instant> {
        self.changes
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .and_then(|(_, until)| *until)
            .filter(|until| *until > at)
    }
}

/// The fake agent.
#[derive(Debug)]
pub struct FakeAgent {
    server: MockServer,
    front: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    connections: Arc<AtomicUsize>,
    /// Requests sent on a connection the agent had closed.
    met_close: Arc<AtomicUsize>,
    accept: AbortHandle,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

struct Responder(Arc<Mutex<Inner>>);

fn answer(model: &model::AgentAnswer) -> ResponseTemplate {
    let mut template = ResponseTemplate::new(model.status).set_body_raw(
        model.body.clone().into_bytes(),
        model.content_type.unwrap_or(""),
    );
    if model.content_type.is_none() {
        // wiremock sets the header from the mime type; an empty one is no header.
        template = ResponseTemplate::new(model.status);
    }
    if model.content_type == Some(model::TEXT_PLAIN) && model.status == 404 {
        // Go's http.Error says so.
        template = template.insert_header("x-content-type-options", "nosniff");
    }
    template.set_delay(model.after.unwrap_or(Duration::from_secs(3_600)))
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut inner = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = request.url.path().to_owned();
        let route = model::route(request.method.as_str(), &path);
        if let Route::Redirect(to) = &route {
            return ResponseTemplate::new(301).insert_header("location", to.as_str());
        }
        let now = std::time::Instant::now();
        if !inner
            .limiter
            .allow("127.0.0.1", &path, tokio::time::Instant::now())
        {
            return answer(&model::limited());
        }
        if let Some(routed) = model::router_answer(&route) {
            return answer(&routed);
        }
        match route {
            Route::Get => answer(&model::get_answer(
                inner
                    .protected_until(now)
                    .map(|until| SystemTime::now() + (until - now)),
                TASK_ARN,
                inner.latency.min(model::AGENT_BUDGET),
            )),
            Route::TaskMetadata => ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "Cluster": "test-cluster", "TaskARN": TASK_ARN, "Family": "test", "Revision": "1",
                "DesiredStatus": "RUNNING", "KnownStatus": "RUNNING", "LaunchType": "FARGATE",
                "AvailabilityZone": "us-east-1a", "Containers": []
            })),
            _ => {
                let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                inner.puts.push(Recorded { body, at: now });
                let reply = if inner.script.is_empty() {
                    inner.fallback.unwrap_or(Answer::Ok)
                } else {
                    inner.script.remove(0)
                };
                assert!(
                    reply != Answer::Refused,
                    "the wiremock agent cannot refuse a connection it has: cut a TcpProxy instead"
                );
                let modelled = model::put_answer(
                    &request.body,
                    reply,
                    inner.latency,
                    TASK_ARN,
                    SystemTime::now(),
                );
                if let Some(change) = modelled.change {
                    let until =
                        change.map(|minutes| now + Duration::from_secs(u64::from(minutes) * 60));
                    inner.changes.push((now, until));
                }
                answer(&modelled)
            }
        }
    }
}

impl FakeAgent {
    /// Starts the fake agent on a loopback port.
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        let inner = Arc::new(Mutex::new(Inner {
            script: Vec::new(),
            fallback: None,
            puts: Vec::new(),
            latency: Duration::ZERO,
            changes: Vec::new(),
            limiter: Limiter::new(),
            idle_timeout: model::IDLE_TIMEOUT,
            idle_close: IdleClose::Prompt,
        }));
        Mock::given(wiremock::matchers::any())
            .respond_with(Responder(Arc::clone(&inner)))
            .mount(&server)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind the agent's front: {e}"));
        let front = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("no address: {e}"));
        let upstream = *server.address();
        let connections = Arc::new(AtomicUsize::new(0));
        let met_close = Arc::new(AtomicUsize::new(0));
        let accept = {
            let inner = Arc::clone(&inner);
            let connections = Arc::clone(&connections);
            let met_close = Arc::clone(&met_close);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (timeout, close) = {
                        let inner = inner
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        (inner.idle_timeout, inner.idle_close)
                    };
                    tokio::spawn(relay(
                        client,
                        upstream,
                        timeout,
                        close,
                        Arc::clone(&met_close),
                    ));
                }
            })
            .abort_handle()
        };
        Self {
            server,
            front,
            inner,
            connections,
            met_close,
            accept,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value for `ECS_AGENT_URI`.
    #[must_use]
    pub fn uri(&self) -> String {
        format!("http://{}/api/{ENDPOINT_ID}", self.front)
    }

    /// The agent's loopback address, to put a [`TcpProxy`](crate::moto::TcpProxy) in
    /// front of it and make it unreachable at will.
    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.front
    }

    /// The value for `ECS_AGENT_URI` when the agent is reached through `endpoint`.
    #[must_use]
    pub fn uri_via(endpoint: &str) -> String {
        format!("{endpoint}/api/{ENDPOINT_ID}")
    }

    /// Answers the next PUTs with `answers`, in order, then with the fallback.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.lock().script.extend(answers);
    }

    /// Answers every PUT with `answer` once the script is used up.
    pub fn always(&self, answer: Answer) {
        self.lock().fallback = Some(answer);
    }

    /// ECS takes this long to answer the agent from now on (from 4 s on, the agent
    /// gives up at its budget and answers 504); ECS acts when the request arrives.
    pub fn latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Connections accepted from now on are closed after `timeout` idle (the
    /// agent's is 5 s), the close seen by the client as `close` says.
    pub fn idle_close(&self, timeout: Duration, close: IdleClose) {
        let mut inner = self.lock();
        inner.idle_timeout = timeout;
        inner.idle_close = close;
    }

    /// How many TCP connections clients have opened to the agent.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// How many requests were sent on a connection the agent had closed (and so
    /// failed after they were sent).
    #[must_use]
    pub fn requests_met_close(&self) -> usize {
        self.met_close.load(Ordering::SeqCst)
    }

    /// Whether ECS held protection for the task at `at`.
    #[must_use]
    pub fn ecs_protected_at(&self, at: std::time::Instant) -> bool {
        self.lock().protected_until(at).is_some()
    }

    /// Whether ECS held protection throughout `from..=to`.
    #[must_use]
    pub fn ecs_protected_throughout(
        &self,
        from: std::time::Instant,
        to: std::time::Instant,
    ) -> bool {
        let changed_within = self
            .lock()
            .changes
            .iter()
            .any(|(t, until)| *t > from && *t <= to && until.is_none_or(|u| u <= to));
        self.ecs_protected_at(from) && self.ecs_protected_at(to) && !changed_within
    }

    /// The changes ECS applied, in order: when, and protected until when.
    #[must_use]
    pub fn ecs_changes(&self) -> Vec<(std::time::Instant, Option<std::time::Instant>)> {
        self.lock().changes.clone()
    }

    /// Forgets the PUTs recorded so far (ECS's history stays), so that a test counts
    /// from here: after the release a service makes at start, say.
    pub fn forget_puts(&self) {
        self.lock().puts.clear();
    }

    /// Every PUT so far.
    #[must_use]
    pub fn puts(&self) -> Vec<Recorded> {
        self.lock().puts.clone()
    }

    /// Every request of any method and path, as wiremock saw them.
    pub async fn all_requests(&self) -> usize {
        self.server.received_requests().await.map_or(0, |r| r.len())
    }

    /// Whether the last PUT disabled protection (or there was none).
    #[must_use]
    pub fn released(&self) -> bool {
        self.lock().puts.last().is_none_or(|p| !p.enabled())
    }
}

/// One client connection through the front, as Go's server keeps it: closed after
/// `idle` with no request, and closed without the answer when the answer comes more
/// than the write timeout after its request.
async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    idle: Duration,
    close: IdleClose,
    met_close: Arc<AtomicUsize>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut from_client = vec![0_u8; 16 * 1024];
    let mut from_server = vec![0_u8; 16 * 1024];
    // Idle since (no request open), or the request open since.
    let mut idle_since = Some(tokio::time::Instant::now());
    let mut request_since: Option<tokio::time::Instant> = None;
    loop {
        let idle_deadline = idle_since
            .filter(|_| close == IdleClose::Prompt)
            .map(|since| since + idle);
        tokio::select! {
            read = client_read.read(&mut from_client) => {
                let Ok(n @ 1..) = read else { return };
                if idle_since.is_some_and(|since| since.elapsed() >= idle) {
                    // The agent closed this connection; the request meets the close.
                    met_close.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                idle_since = None;
                request_since.get_or_insert_with(tokio::time::Instant::now);
                if server_write.write_all(&from_client[..n]).await.is_err() {
                    return;
                }
            }
            read = server_read.read(&mut from_server) => {
                let Ok(n @ 1..) = read else { return };
                if request_since.is_some_and(|since| since.elapsed() > model::WRITE_TIMEOUT) {
                    // Past the write timeout: Go drops the answer with the connection.
                    return;
                }
                if client_write.write_all(&from_server[..n]).await.is_err() {
                    return;
                }
                request_since = None;
                idle_since = Some(tokio::time::Instant::now());
            }
            () = async {
                match idle_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => return,
        }
    }
}

/// `t` as RFC 3339 in UTC, to the millisecond, as the agent writes `ExpirationDate`.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    model::expiration_date(t)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats_known_instants() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_665_023_356);
        assert_eq!(super::rfc3339(t), "2022-10-06T02:29:16Z");
        assert_eq!(
            super::rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00Z"
        );
    }
}
