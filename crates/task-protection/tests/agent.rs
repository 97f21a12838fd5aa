//! The ECS agent backend against a wiremock agent that answers as the real one does.
//! One test per answer class; real sockets, so real (short) time.

use std::time::Duration;

use serde_json::{Value, json};
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
    let expiry = enabled.then(|| {
        let t = std::time::SystemTime::now() + Duration::from_secs(60);
        task_protection::rfc3339(t)
    });
    json!({"protection": {"ExpirationDate": expiry, "ProtectionEnabled": enabled, "TaskArn": ARN}})
}

fn error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "requestID": "req-1", "error": {"Arn": ARN, "Code": code, "Message": message}
    }))
}

fn failure(reason: &str) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(json!({"failure": {"Arn": ARN, "Detail": null, "Reason": reason}}))
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
    assert_rejected(failure("TASK_NOT_VALID"), "TASK_NOT_VALID").await;
}

#[tokio::test]
async fn failure_deployment_blocked_is_a_rejection() {
    assert_rejected(failure("DEPLOYMENT_BLOCKED"), "DEPLOYMENT_BLOCKED").await;
}

#[tokio::test]
async fn access_denied_is_a_rejection() {
    let answer = error(
        403,
        "AccessDeniedException",
        "not authorized: ecs:UpdateTaskProtection",
    );
    assert_rejected(answer, "AccessDeniedException").await;
}

#[tokio::test]
async fn invalid_parameter_is_a_rejection() {
    let answer = error(400, "InvalidParameterException", "cannot decode body");
    assert_rejected(answer, "InvalidParameterException").await;
}

#[tokio::test]
async fn resource_not_found_is_a_rejection() {
    assert_rejected(
        error(404, "ResourceNotFoundException", "no task"),
        "ResourceNotFoundException",
    )
    .await;
}

/// A transient answer, then success: the awaited acquire succeeds after one retry.
async fn assert_retried(answer: ResponseTemplate, expect: impl Fn(&ProtectionError) -> bool) {
    let (server, backend) = agent().await;
    // The backend alone classifies the answer...
    answer_once(&server, answer).await;
    let err = backend
        .update(ProtectionRequest::enable(1))
        .await
        .unwrap_err();
    assert!(expect(&err), "{err:?}");
    assert!(err.is_transient(), "{err:?}");
    // ...and the state machine retries it.
    server.reset().await;
    answer_once_again(&server, &err).await;
    let p = TaskProtection::start(backend, fast_settings());
    let _guard = p.acquire().await.expect("succeeds after a retry");
    let c = p.counters();
    assert_eq!((c.retries, c.failures, c.acquire_puts), (1, 1, 2), "{c:?}");
}

/// Replays the answer that produced `err` once more, then succeeds.
async fn answer_once_again(server: &MockServer, err: &ProtectionError) {
    let template = match err {
        ProtectionError::Throttled {
            by: ThrottledBy::Agent,
            ..
        } => agent_limit(),
        ProtectionError::Throttled { .. } => error(400, "ThrottlingException", "Rate exceeded"),
        ProtectionError::Server {
            status,
            code,
            message,
        } => error(*status, code, message),
        other => panic!("unexpected {other:?}"),
    };
    answer_once(server, template).await;
}

fn agent_limit() -> ResponseTemplate {
    ResponseTemplate::new(429)
        .insert_header("content-type", "text/plain; charset=utf-8")
        .set_body_string("You have reached maximum request limit.")
}

/// ECS throttling reaches the agent's SDK, which retries inside its budget: an
/// earlier try may have gone through, so the final throttle may have been applied.
#[tokio::test]
async fn throttling_exception_400_is_retried_and_may_have_been_applied() {
    assert_retried(error(400, "ThrottlingException", "Rate exceeded"), |e| {
        matches!(e, ProtectionError::Throttled { by: ThrottledBy::EcsThroughAgent, message } if message == "Rate exceeded")
            && e.maybe_applied()
    })
    .await;
}

#[tokio::test]
async fn agent_429_text_plain_is_retried() {
    assert_retried(agent_limit(), |e| {
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
    for (status, body) in [(404, "404 page not found\n"), (405, ""), (301, "")] {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(
                ResponseTemplate::new(status)
                    .insert_header("content-type", "text/plain; charset=utf-8")
                    .set_body_string(body),
            )
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
    assert_retried(error(500, "ServerException", "Internal"), |e| {
        matches!(e, ProtectionError::Server { status: 500, .. })
    })
    .await;
}

#[tokio::test]
async fn request_canceled_504_is_retried() {
    assert_retried(
        error(504, "RequestCanceled", "Timed out calling ECS Task Protection API"),
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
