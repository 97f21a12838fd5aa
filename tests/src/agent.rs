//! A wiremock stand-in for the ECS agent's task protection endpoint.
//!
//! It answers exactly as the agent does (see the platform facts): a 200 with
//! `protection` and an RFC 3339 `ExpirationDate` of now + `ExpiresInMinutes`, a 200
//! with `failure` for a refusal, ECS errors with their own status, and the agent's
//! own 429 with a plain-text body. Every request is recorded.
//!
//! It also keeps ECS's own side apart from what it answers: a PUT that ECS accepts
//! is applied when it arrives, and the answer leaves after the latency, so tests can
//! check what ECS held at any moment, not what the program believed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The path under `ECS_AGENT_URI`.
pub const STATE_PATH: &str = "/task-protection/v1/state";
/// The task ARN the fake agent reports.
pub const TASK_ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/test-cluster/0123456789abcdef";

/// How the fake agent answers the next PUTs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 200 with `protection`.
    Ok,
    /// 200 with `failure` and this `Reason` (`DEPLOYMENT_BLOCKED`, `TASK_NOT_VALID`).
    Failure(&'static str),
    /// 400 `ThrottlingException`, as ECS throttling reaches the agent.
    Throttled,
    /// The agent's own limiter: 429, text/plain.
    AgentLimit,
    /// 403 `AccessDeniedException`.
    AccessDenied,
    /// 504 `RequestCanceled`: the agent timed out calling ECS, before ECS acted.
    RequestCanceled,
    /// 504 `RequestCanceled` although ECS applied the change.
    AppliedThenRequestCanceled,
    /// 500 `ServerException`.
    ServerError,
    /// No answer for this long.
    Delay(Duration),
}

/// One recorded PUT.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The JSON body sent.
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

#[derive(Debug, Default)]
struct Inner {
    script: Vec<Answer>,
    fallback: Option<Answer>,
    puts: Vec<Recorded>,
    /// Added to every answer.
    latency: Duration,
    /// Every change ECS applied: when, and protected until when (`None`: off).
    changes: Vec<(std::time::Instant, Option<std::time::Instant>)>,
}

impl Inner {
    fn apply(&mut self, body: &Value) {
        let enabled = body["ProtectionEnabled"].as_bool().unwrap_or(false);
        let minutes = body["ExpiresInMinutes"].as_u64().unwrap_or(120);
        let now = std::time::Instant::now();
        let until = enabled.then(|| now + Duration::from_secs(minutes * 60));
        self.changes.push((now, until));
    }
}

/// The fake agent.
#[derive(Debug)]
pub struct FakeAgent {
    server: MockServer,
    inner: Arc<Mutex<Inner>>,
}

struct Responder(Arc<Mutex<Inner>>);

/// `t` as RFC 3339 in UTC, to the second, as the agent writes `ExpirationDate`.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil-from-days, as in Howard Hinnant's algorithm; avoids a date crate here.
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "requestID": "0f2d7a6e-1111-2222-3333-444455556666",
        "error": {"Arn": TASK_ARN, "Code": code, "Message": message}
    }))
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let answer = {
            let mut inner = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            inner.puts.push(Recorded {
                body: body.clone(),
                at: std::time::Instant::now(),
            });
            let answer = if inner.script.is_empty() {
                inner.fallback.clone().unwrap_or(Answer::Ok)
            } else {
                inner.script.remove(0)
            };
            if matches!(answer, Answer::Ok | Answer::AppliedThenRequestCanceled) {
                inner.apply(&body);
            }
            (answer, inner.latency)
        };
        let (answer, latency) = answer;
        let template = match answer {
            Answer::Ok => {
                let enabled = body["ProtectionEnabled"].as_bool().unwrap_or(false);
                let minutes = body["ExpiresInMinutes"].as_u64().unwrap_or(120);
                let expiry =
                    enabled.then(|| rfc3339(SystemTime::now() + Duration::from_secs(minutes * 60)));
                ResponseTemplate::new(200).set_body_json(json!({
                    "protection": {
                        "ExpirationDate": expiry,
                        "ProtectionEnabled": enabled,
                        "TaskArn": TASK_ARN
                    }
                }))
            }
            Answer::Failure(reason) => ResponseTemplate::new(200).set_body_json(json!({
                "failure": {"Arn": TASK_ARN, "Detail": null, "Reason": reason}
            })),
            Answer::Throttled => error(400, "ThrottlingException", "Rate exceeded"),
            Answer::AgentLimit => ResponseTemplate::new(429)
                .insert_header("content-type", "text/plain; charset=utf-8")
                .set_body_string("You have reached maximum request limit."),
            Answer::AccessDenied => error(
                403,
                "AccessDeniedException",
                "User is not authorized to perform: ecs:UpdateTaskProtection",
            ),
            Answer::RequestCanceled | Answer::AppliedThenRequestCanceled => error(
                504,
                "RequestCanceled",
                "Timed out calling ECS Task Protection API",
            ),
            Answer::ServerError => error(500, "ServerException", "Internal error"),
            Answer::Delay(d) => return ResponseTemplate::new(200).set_delay(d + latency),
        };
        template.set_delay(latency)
    }
}

impl FakeAgent {
    /// Starts the fake agent on a loopback port.
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        let inner = Arc::new(Mutex::new(Inner::default()));
        Mock::given(method("PUT"))
            .and(path(format!("/api/task{STATE_PATH}")))
            .respond_with(Responder(Arc::clone(&inner)))
            .mount(&server)
            .await;
        Self { server, inner }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value for `ECS_AGENT_URI`.
    #[must_use]
    pub fn uri(&self) -> String {
        format!("{}/api/task", self.server.uri())
    }

    /// The agent's loopback address, to put a [`TcpProxy`](crate::moto::TcpProxy) in
    /// front of it and make it unreachable at will.
    #[must_use]
    pub fn address(&self) -> std::net::SocketAddr {
        *self.server.address()
    }

    /// The value for `ECS_AGENT_URI` when the agent is reached through `endpoint`.
    #[must_use]
    pub fn uri_via(endpoint: &str) -> String {
        format!("{endpoint}/api/task")
    }

    /// Answers the next PUTs with `answers`, in order, then with the fallback.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.lock().script.extend(answers);
    }

    /// Answers every PUT with `answer` once the script is used up.
    pub fn always(&self, answer: Answer) {
        self.lock().fallback = Some(answer);
    }

    /// Every answer takes this long from now on; ECS acts when the request arrives.
    pub fn latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Whether ECS held protection for the task at `at`.
    #[must_use]
    pub fn ecs_protected_at(&self, at: std::time::Instant) -> bool {
        let inner = self.lock();
        inner
            .changes
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .and_then(|(_, until)| *until)
            .is_some_and(|until| until > at)
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
