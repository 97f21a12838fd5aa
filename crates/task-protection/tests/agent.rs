//! The ECS agent backend against a wiremock agent that answers as the real one does
//! (every answer from the model in `testing::agent`, written from the agent's
//! source). One test per answer class; real sockets, so real (short) time.

use std::time::Duration;

use serde_json::Value;
use task_protection::testing::{Reply, agent};
use task_protection::{
    AcquireError, AgentBackend, AnyBackend, Backend, BackendConfig, BackendKind, ProtectionError,
    ProtectionEvent, ProtectionRequest, ProtectionSettings, ShutdownReport, TaskProtection,
    ThrottledBy,
};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const STATE: &str = "/api/task-id/task-protection/v1/state";
const ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/c/0123";

fn ok_body(enabled: bool) -> Value {
    let body = if enabled {
        r#"{"ProtectionEnabled":true,"ExpiresInMinutes":1}"#
    } else {
        r#"{"ProtectionEnabled":false}"#
    };
    serde_json::from_str(&modelled_for(Reply::Ok, body.as_bytes()).body).unwrap()
}

/// The agent's answer to an enable when ECS does as `reply` says.
fn modelled(reply: Reply) -> ResponseTemplate {
    template(&modelled_for(
        reply,
        br#"{"ProtectionEnabled":true,"ExpiresInMinutes":1}"#,
    ))
}

fn modelled_for(reply: Reply, body: &[u8]) -> agent::AgentAnswer {
    agent::put_answer(
        body,
        reply,
        Duration::ZERO,
        ARN,
        std::time::SystemTime::now(),
    )
}

fn template(answer: &agent::AgentAnswer) -> ResponseTemplate {
    ResponseTemplate::new(answer.status)
        .set_body_raw(answer.body.clone(), answer.content_type.unwrap_or_default())
        .set_delay(answer.after.unwrap_or(Duration::from_secs(3_600)))
}

async fn agent() -> (MockServer, AgentBackend) {
    let server = MockServer::start().await;
    let backend = AgentBackend::new(&format!("{}/api/task-id", server.uri())).unwrap();
    (server, backend)
}

/// Answers the next PUT with `first`, later ones with a plain success.
async fn answer_once(server: &MockServer, first: ResponseTemplate) {
    Mock::given(method("PUT"))
        .and(path(STATE))
        .respond_with(first)
        .up_to_n_times(1)
        .with_priority(1)
        .mount(server)
        .await;
    Mock::given(method("PUT"))
        .and(path(STATE))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body(true)))
        .with_priority(2)
        .mount(server)
        .await;
}

fn fast_settings() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(0)
        .min_put_interval(Duration::ZERO)
        .check_interval(Duration::from_millis(400))
        .request_timeout(Duration::from_secs(1))
        .acquire_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn bodies(server: &MockServer) -> Vec<String> {
    server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r.body).unwrap())
        .collect()
}

#[tokio::test]
async fn success_sends_exact_pascal_case_and_disable_has_no_expiry() {
    let (server, backend) = agent().await;
    Mock::given(method("PUT"))
        .and(path(STATE))
        .respond_with(|req: &wiremock::Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            ResponseTemplate::new(200)
                .set_body_json(ok_body(body["ProtectionEnabled"].as_bool().unwrap()))
        })
        .mount(&server)
        .await;
    let p = TaskProtection::start(backend, fast_settings());
    let guard = p.acquire().await.unwrap();
    let state = p.current();
    assert!(state.protected);
    assert_eq!(state.task_arn.as_deref(), Some(ARN));
    let left = state
        .expires_at
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(55) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    drop(guard);
    assert_eq!(p.shutdown().await, ShutdownReport::Released);
    let sent = bodies(&server).await;
    assert_eq!(
        sent[0],
        r#"{"ProtectionEnabled":true,"ExpiresInMinutes":1}"#
    );
    assert_eq!(sent.last().unwrap(), r#"{"ProtectionEnabled":false}"#);
    let requests = server.received_requests().await.unwrap();
    assert!(
        requests.iter().all(|r| r.method.as_str() == "PUT"),
        "no GET polling"
    );
    assert_eq!(
        requests[0].headers.get("content-type").unwrap(),
        "application/json"
    );
}

async fn assert_rejected(answer: ResponseTemplate, reason: &str) {
    let (server, backend) = agent().await;
    answer_once(&server, answer).await;
    let p = TaskProtection::start(backend, fast_settings());
    let mut events = p.events();
    let started = std::time::Instant::now();
    let err = p.acquire().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "prompt");
    assert!(
        matches!(&err, AcquireError::Rejected(r) if r.reason() == reason),
        "{err}"
    );
    assert!(
        matches!(events.recv().await, Some(ProtectionEvent::Rejected(r)) if r.reason() == reason)
    );
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "no retry"
    );
    assert_eq!(p.counters().rejections, 1);
}

#[tokio::test]
async fn failure_task_not_valid_is_a_rejection() {
    assert_rejected(modelled(Reply::Failure("TASK_NOT_VALID")), "TASK_NOT_VALID").await;
}

#[tokio::test]
async fn failure_deployment_blocked_is_a_rejection() {
    assert_rejected(
        modelled(Reply::Failure("DEPLOYMENT_BLOCKED")),
        "DEPLOYMENT_BLOCKED",
    )
    .await;
}

/// ECS's own 400 when the task role may not call UpdateTaskProtection.
#[tokio::test]
async fn access_denied_is_a_rejection() {
    assert_rejected(modelled(Reply::AccessDenied), "AccessDeniedException").await;
}

/// The agent's own 403 when the task has no role credentials.
#[tokio::test]
async fn no_role_credentials_is_a_rejection() {
    assert_rejected(modelled(Reply::NoRoleCredentials), "AccessDeniedException").await;
}

/// ECS's 400 for a value out of its range.
#[tokio::test]
async fn invalid_parameter_is_a_rejection() {
    let answer = template(&modelled_for(
        Reply::Ok,
        br#"{"ProtectionEnabled":true,"ExpiresInMinutes":0}"#,
    ));
    assert_rejected(answer, "InvalidParameterException").await;
}

/// The agent's 404 for a task it does not know.
#[tokio::test]
async fn resource_not_found_is_a_rejection() {
    assert_rejected(modelled(Reply::UnknownTask), "ResourceNotFoundException").await;
}

/// A transient answer, then success: the awaited acquire succeeds after one retry.
async fn assert_retried(reply: Reply, expect: impl Fn(&ProtectionError) -> bool) {
    let (server, backend) = agent().await;
    // The backend alone classifies the answer...
    answer_once(&server, modelled(reply)).await;
    let err = backend
        .update(ProtectionRequest::enable(1))
        .await
        .unwrap_err();
    assert!(expect(&err), "{err:?}");
    assert!(err.is_transient(), "{err:?}");
    // ...and the state machine retries it.
    server.reset().await;
    answer_once(&server, modelled(reply)).await;
    let settings = fast_settings()
        .to_builder()
        // The agent's 504 comes after its 4 s budget.
        .request_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let p = TaskProtection::start(backend, settings);
    let _guard = p.acquire().await.expect("succeeds after a retry");
    let c = p.counters();
    assert_eq!((c.retries, c.failures, c.acquire_puts), (1, 1, 2), "{c:?}");
}

/// ECS throttling reaches the agent's SDK, which retries inside its budget: an
/// earlier try may have gone through, so the final throttle may have been applied.
#[tokio::test]
async fn throttling_exception_400_is_retried_and_may_have_been_applied() {
    assert_retried(Reply::Throttled, |e| {
        matches!(e, ProtectionError::Throttled { by: ThrottledBy::EcsThroughAgent, message } if message == "Rate exceeded")
            && e.maybe_applied()
    })
    .await;
}

#[tokio::test]
async fn agent_429_text_plain_is_retried() {
    assert_retried(Reply::AgentLimit, |e| {
        matches!(e, ProtectionError::Throttled { by: ThrottledBy::Agent, message } if message.contains("maximum request limit"))
            && !e.maybe_applied()
    })
    .await;
}

/// A wrong `ECS_AGENT_URI` reaches the agent's router, which answers a path it does
/// not know with a plain-text 404 (a method it does not serve there with an empty
/// 405): a configuration error, said once, naming the variable, and never retried.
#[tokio::test]
async fn a_router_answer_is_a_configuration_error_said_once_and_not_retried() {
    // What the router answers a PUT on a wrong path, with a wrong method, and on a
    // path it would clean (an ECS_AGENT_URI with `//`).
    for route in [
        agent::route("PUT", "/api/x/task-protection/v1/state/"),
        agent::Route::MethodNotAllowed,
        agent::route("PUT", "/api/x//task-protection/v1/state"),
    ] {
        let answer = agent::router_answer(&route).unwrap();
        let status = answer.status;
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(template(&answer))
            .mount(&server)
            .await;
        let uri = format!("{}/api/task-id", server.uri());
        let config =
            BackendConfig::from_vars(|name| (name == "ECS_AGENT_URI").then(|| uri.clone()))
                .unwrap();
        let p = TaskProtection::connect(&config, fast_settings())
            .await
            .unwrap();
        let err = p.acquire().await.unwrap_err();
        let AcquireError::Misconfigured(cause) = &err else {
            panic!("{status}: {err:?}")
        };
        assert!(!cause.is_transient(), "{cause:?}");
        assert!(!cause.maybe_applied(), "{cause:?}");
        let text = task_protection::ErrorChain(&err).to_string();
        assert!(text.contains("check ECS_AGENT_URI"), "{text}");
        assert!(text.contains(&format!("HTTP {status}")), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        // More holders, and time: nothing more is sent.
        let _held = p.hold();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(matches!(
            p.acquire().await,
            Err(AcquireError::Misconfigured(_))
        ));
        assert_eq!(
            server.received_requests().await.unwrap().len(),
            1,
            "{status}: retried"
        );
        assert_eq!(p.counters().retries, 0);
        assert_eq!(p.current().phase, task_protection::Phase::Misconfigured);
        assert!(matches!(p.shutdown().await, ShutdownReport::Failed(_)));
        assert_eq!(
            server.received_requests().await.unwrap().len(),
            1,
            "{status}: at shutdown"
        );
    }
}

#[tokio::test]
async fn server_exception_500_is_retried() {
    assert_retried(Reply::Unapplied500, |e| {
        matches!(e, ProtectionError::Server { status: 500, .. })
    })
    .await;
}

#[tokio::test]
async fn request_canceled_504_is_retried() {
    assert_retried(
        Reply::Unapplied504,
        |e| matches!(e, ProtectionError::Server { status: 504, code, .. } if code == "RequestCanceled"),
    )
    .await;
}

#[tokio::test]
async fn connection_refused_is_transient_and_cannot_have_been_applied() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let backend = AgentBackend::new(&format!("http://127.0.0.1:{port}/api/x")).unwrap();
    let err = backend
        .update(ProtectionRequest::enable(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProtectionError::Unreachable { message, source: Some(_) } if !message.is_empty()),
        "{err:?}"
    );
    assert!(err.is_transient());
}

#[tokio::test]
async fn no_answer_within_the_request_timeout_is_transient() {
    let (server, backend) = agent().await;
    Mock::given(method("PUT"))
        .and(path(STATE))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let settings = fast_settings()
        .to_builder()
        .acquire_timeout(Duration::from_millis(1_200))
        .build()
        .unwrap();
    let p = TaskProtection::start(backend, settings);
    // The first PUT times out after 1 s; the acquire gives up at 1.2 s with that error.
    let err = p.acquire().await.unwrap_err();
    let AcquireError::TimedOut {
        last_error: Some(ProtectionError::Timeout(after)),
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*after, Duration::from_secs(1));
}

#[tokio::test]
async fn a_malformed_answer_is_an_error_quoting_the_body() {
    let (server, backend) = agent().await;
    for (status, body) in [
        (200, "<html><body>proxy error</body></html>"),
        (200, r#"{"protection":{"ProtectionEnabled":"yes"}}"#),
        (200, r#"{"something":"else"}"#),
    ] {
        server.reset().await;
        answer_once(&server, ResponseTemplate::new(status).set_body_string(body)).await;
        let err = backend
            .update(ProtectionRequest::enable(1))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ProtectionError::Malformed { status: s, excerpt, .. } if *s == status && body.starts_with(excerpt.as_str())),
            "{err:?}"
        );
        let quoted = format!("{body:?}");
        assert!(err.to_string().contains(&quoted[1..10]), "{err}");
    }
    // A huge body is cut, not read whole into the message.
    server.reset().await;
    answer_once(
        &server,
        ResponseTemplate::new(200).set_body_string("x".repeat(1_000_000)),
    )
    .await;
    let err = backend
        .update(ProtectionRequest::enable(1))
        .await
        .unwrap_err();
    assert!(err.to_string().len() < 500);
}

/// A bad URI is named where it came from: the variable when it was read from the
/// environment, the call that set it otherwise.
#[tokio::test]
async fn a_bad_agent_uri_is_a_clear_error_naming_where_it_came_from() {
    let err = AgentBackend::new("not a url").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("AgentBackend::new=\"not a url\""),
        "{err}"
    );
    let err = AgentBackend::new("ftp://169.254.170.2/api").unwrap_err();
    assert!(err.to_string().contains("http"), "{err}");
    let from_env =
        BackendConfig::from_vars(|name| (name == "ECS_AGENT_URI").then(|| "not a url".to_owned()))
            .unwrap();
    let err = AnyBackend::connect(&from_env).await.unwrap_err();
    assert!(
        err.to_string().starts_with("ECS_AGENT_URI=\"not a url\""),
        "{err}"
    );
    let in_code = BackendConfig::new(BackendKind::Agent).with_agent_uri("not a url");
    let err = AnyBackend::connect(&in_code).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("BackendConfig::with_agent_uri=\"not a url\""),
        "{err}"
    );
}

/// The agent endpoint is plain http on a link-local address, and this client has no
/// TLS: an https URL would fail at the first request, so it is refused at start, in
/// one line that says why.
#[tokio::test]
async fn an_https_agent_uri_is_refused_at_start() {
    let uri = "https://169.254.170.2/api/0123";
    for kind in ["agent", "auto"] {
        let config = BackendConfig::from_vars(|name| match name {
            "ECS_AGENT_URI" => Some(uri.to_owned()),
            "TASK_PROTECTION_BACKEND" => Some(kind.to_owned()),
            _ => None,
        })
        .unwrap();
        let err = TaskProtection::connect(&config, fast_settings())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("ECS_AGENT_URI=\"https://"), "{text}");
        assert!(text.contains("https is not supported"), "{text}");
        assert!(text.contains("plain http"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
    }
    // Upper case is the same scheme.
    assert!(AgentBackend::new("HTTPS://169.254.170.2/api/0123").is_err());
    assert!(AgentBackend::new("HTTP://169.254.170.2/api/0123").is_ok());
}
