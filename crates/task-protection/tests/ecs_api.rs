//! The ECS API backend against a wiremock ECS endpoint (awsJson1_1) and a wiremock
//! task metadata endpoint.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use task_protection::metadata::{MetadataEndpoint, MetadataError};
use task_protection::{
    AcquireError, AnyBackend, Backend, BackendConfig, BackendConfigError, BackendKind,
    EcsApiBackend, EcsClient, ProtectionError, ProtectionRequest, ProtectionSettings, TaskIdentity,
    TaskProtection, ThrottledBy,
};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TARGET: &str = "AmazonEC2ContainerServiceV20141113.UpdateTaskProtection";
const CLUSTER: &str = "arn:aws:ecs:us-east-1:123456789012:cluster/app-test-Cluster";
const TASK: &str = "arn:aws:ecs:us-east-1:123456789012:task/app-test-Cluster/0123";

fn backend(server: &MockServer) -> EcsApiBackend {
    EcsApiBackend::new(
        EcsClient::with_endpoint(&server.uri(), "us-east-1", "AKID", "SECRET"),
        TaskIdentity {
            cluster: CLUSTER.into(),
            task_arn: TASK.into(),
        },
    )
}

fn json_answer(status: u16, body: Value) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("content-type", "application/x-amz-json-1.1")
        .set_body_json(body)
}

#[tokio::test]
async fn update_sends_the_aws_json_target_and_body() {
    let server = MockServer::start().await;
    let expiry = std::time::SystemTime::now() + Duration::from_secs(60);
    let epoch = expiry
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    Mock::given(method("POST"))
        .and(path("/"))
        .and(header("x-amz-target", TARGET))
        .and(header("content-type", "application/x-amz-json-1.1"))
        .respond_with(json_answer(
            200,
            json!({"protectedTasks": [{"taskArn": TASK, "protectionEnabled": true, "expirationDate": epoch}], "failures": []}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let grant = backend(&server)
        .update(ProtectionRequest::enable(1))
        .await
        .unwrap();
    assert!(grant.is_enabled());
    assert_eq!(grant.task_arn(), Some(TASK));
    let got = grant.expires_at().unwrap();
    let diff = got
        .duration_since(expiry)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap();
    assert!(diff < Duration::from_millis(10), "{diff:?}");
    let request = &server.received_requests().await.unwrap()[0];
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(
        body,
        json!({"cluster": CLUSTER, "tasks": [TASK], "protectionEnabled": true, "expiresInMinutes": 1})
    );
    assert!(request.headers.contains_key("authorization"), "signed");
}

#[tokio::test]
async fn disable_leaves_out_the_expiry() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_answer(
            200,
            json!({"protectedTasks": [{"taskArn": TASK, "protectionEnabled": false}], "failures": []}),
        ))
        .mount(&server)
        .await;
    let grant = backend(&server)
        .update(ProtectionRequest::disable())
        .await
        .unwrap();
    assert!(!grant.is_enabled());
    let body: Value =
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(
        body,
        json!({"cluster": CLUSTER, "tasks": [TASK], "protectionEnabled": false})
    );
}

#[tokio::test]
async fn a_failures_entry_is_a_rejection() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_answer(
            200,
            json!({"protectedTasks": [], "failures": [{"arn": TASK, "reason": "DEPLOYMENT_BLOCKED", "detail": "too many protected tasks"}]}),
        ))
        .mount(&server)
        .await;
    let p = TaskProtection::start(backend(&server), ProtectionSettings::default());
    let err = p.acquire().await.unwrap_err();
    let AcquireError::Rejected(r) = &err else {
        panic!("{err}")
    };
    assert_eq!(r.reason(), "DEPLOYMENT_BLOCKED");
    assert_eq!(r.detail(), Some("too many protected tasks"));
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn service_errors_are_classified() {
    let server = MockServer::start().await;
    let b = backend(&server);
    let cases = [
        (400, "ThrottlingException", true),
        (400, "AccessDeniedException", false),
        (400, "InvalidParameterException", false),
        (500, "ServerException", true),
    ];
    for (status, code, transient) in cases {
        server.reset().await;
        Mock::given(method("POST"))
            .respond_with(json_answer(
                status,
                json!({"__type": code, "message": "from the test"}),
            ))
            .mount(&server)
            .await;
        let err = b.update(ProtectionRequest::enable(1)).await.unwrap_err();
        assert_eq!(err.is_transient(), transient, "{code}: {err:?}");
        if code == "ThrottlingException" {
            assert!(matches!(
                err,
                ProtectionError::Throttled {
                    by: ThrottledBy::Ecs,
                    ..
                }
            ));
            // Straight from ECS, with the SDK's retries off: nothing was applied.
            assert!(!err.maybe_applied(), "{err:?}");
        }
        if code == "AccessDeniedException" {
            assert!(
                matches!(&err, ProtectionError::Rejected(r) if r.reason() == code),
                "{err:?}"
            );
        }
    }
}

#[tokio::test]
async fn discovery_reads_cluster_and_arn_from_task_metadata() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v4/abc/task"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "Cluster": CLUSTER, "TaskARN": TASK, "Family": "svc", "Revision": "3",
            "Containers": []
        })))
        .mount(&server)
        .await;
    let id = TaskIdentity::discover(&format!("{}/v4/abc", server.uri()))
        .await
        .unwrap();
    let meta = MetadataEndpoint::new(&format!("{}/v4/abc", server.uri()))
        .unwrap()
        .task()
        .await
        .unwrap_err();
    // DesiredStatus and KnownStatus are always there in v4; without them it is not
    // task metadata.
    assert!(matches!(meta, MetadataError::Malformed { .. }), "{meta}");
    assert_eq!(
        id,
        TaskIdentity {
            cluster: CLUSTER.into(),
            task_arn: TASK.into()
        }
    );
    let err = TaskIdentity::discover(&format!("{}/v4/missing", server.uri()))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendConfigError::Discovery { .. }), "{err}");
}

#[tokio::test]
async fn discovery_rejects_an_answer_without_the_fields() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"Cluster": CLUSTER})))
        .mount(&server)
        .await;
    let err = TaskIdentity::discover(&server.uri()).await.unwrap_err();
    assert!(err.to_string().contains("TaskARN"), "{err}");
}

#[tokio::test]
async fn backend_selection_follows_the_environment() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        BackendConfig::from_vars(move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    };
    // TASK_PROTECTION_BACKEND is read by the library itself; `agent` without the URI
    // is an error, never a simulation.
    let agent_missing = env(&[("TASK_PROTECTION_BACKEND", "agent")]).unwrap();
    assert_eq!(agent_missing.kind(), BackendKind::Agent);
    let err = AnyBackend::connect(&agent_missing).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "TASK_PROTECTION_BACKEND=agent needs ECS_AGENT_URI, which is not set (the ECS agent sets it inside a task; agent 1.65.0 or later is required)"
    );
    let err = TaskProtection::connect(&agent_missing, ProtectionSettings::default())
        .await
        .unwrap_err();
    assert!(matches!(err, BackendConfigError::Missing { .. }), "{err}");
    // Set in code, the error names the call.
    let err = AnyBackend::connect(&BackendConfig::new(BackendKind::Agent))
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("BackendConfig::new=agent"),
        "{err}"
    );
    // No ECS variable at all: not in ECS, simulated.
    let b = AnyBackend::connect(&env(&[]).unwrap()).await.unwrap();
    assert!(b.simulated());
    // Asked for.
    let local = env(&[
        ("TASK_PROTECTION_BACKEND", "local"),
        ("ECS_AGENT_URI", "http://169.254.170.2/api/abc"),
    ])
    .unwrap();
    assert!(AnyBackend::connect(&local).await.unwrap().simulated());
    // In ECS without the agent's endpoint: an error, not a simulation.
    let old_agent = env(&[(
        "ECS_CONTAINER_METADATA_URI_V4",
        "http://169.254.170.2/v4/abc",
    )])
    .unwrap();
    let err = AnyBackend::connect(&old_agent).await.unwrap_err();
    assert!(
        matches!(err, BackendConfigError::NoAgentInEcs { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ecs-api"), "{err}");
    let inside_ecs = env(&[("ECS_AGENT_URI", "http://169.254.170.2/api/abc")]).unwrap();
    let b = AnyBackend::connect(&inside_ecs).await.unwrap();
    assert!(!b.simulated());
    assert!(
        b.describe()
            .contains("169.254.170.2/api/abc/task-protection/v1/state")
    );
    let api_missing = env(&[("TASK_PROTECTION_BACKEND", "ecs-api")]).unwrap();
    let err = AnyBackend::connect(&api_missing).await.unwrap_err();
    assert!(
        err.to_string().contains("ECS_CONTAINER_METADATA_URI_V4"),
        "{err}"
    );
    let err = env(&[("TASK_PROTECTION_BACKEND", "bogus")]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("TASK_PROTECTION_BACKEND=\"bogus\""),
        "{err}"
    );
}

/// The agent's limiter's answer, twice, before anything else `server` answers.
async fn two_limiter_answers(server: &MockServer) {
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("content-type", "text/plain; charset=utf-8")
                .set_body_string("You have reached maximum request limit."),
        )
        .up_to_n_times(2)
        .with_priority(1)
        .mount(server)
        .await;
}

/// The metadata endpoint is behind the agent's limiter and answers 429 (text) and
/// 500 too: discovery tries again, and a start that meets them still finds its task.
#[tokio::test]
async fn discovery_tries_again_after_429_and_500() {
    let server = MockServer::start().await;
    two_limiter_answers(&server).await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(500).set_body_json(json!("failed to get task metadata")),
        )
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(task_metadata()))
        .with_priority(3)
        .mount(&server)
        .await;
    let id = TaskIdentity::discover(&format!("{}/v4/abc", server.uri()))
        .await
        .unwrap();
    assert_eq!(id.task_arn, TASK);
    assert_eq!(server.received_requests().await.unwrap().len(), 4);
    // The drain's start meets them too, and turns on all the same.
    server.reset().await;
    two_limiter_answers(&server).await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(task_metadata()))
        .with_priority(2)
        .mount(&server)
        .await;
    let drain = task_protection::drain::Drain::start(
        task_protection::drain::DrainMode::Auto,
        Some(&format!("{}/v4/abc", server.uri())),
        task_protection::drain::DrainSettings::builder()
            .service("web")
            .build()
            .expect("settings"),
    )
    .await;
    assert!(
        drain.is_on(),
        "the drain gave up on a 429 from task metadata"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    // A 404 will not change: no second try.
    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!(
            "V4 task metadata handler: unable to get task arn from request"
        )))
        .mount(&server)
        .await;
    let err = TaskIdentity::discover(&format!("{}/v4/abc", server.uri()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("HTTP 404"), "{err}");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

/// What the drain polls: one read, every field it needs.
#[tokio::test]
async fn task_metadata_reads_the_task_s_status() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v4/abc/task"))
        .respond_with(ResponseTemplate::new(200).set_body_json(task_metadata()))
        .mount(&server)
        .await;
    let endpoint = MetadataEndpoint::new(&format!("{}/v4/abc/", server.uri())).unwrap();
    assert!(
        endpoint.url().ends_with("/v4/abc/task"),
        "{}",
        endpoint.url()
    );
    for _ in 0..3 {
        let meta = endpoint.task().await.unwrap();
        assert_eq!(meta.cluster, CLUSTER);
        assert_eq!(meta.desired_status, "RUNNING");
        assert_eq!(meta.known_status, "RUNNING");
        assert_eq!(meta.availability_zone.as_deref(), Some("us-east-1a"));
        assert_eq!(meta.launch_type.as_deref(), Some("FARGATE"));
        assert_eq!(meta.service_name, None);
        assert!(!meta.is_stopping());
    }
    let err = MetadataEndpoint::new("https://169.254.170.2/v4/abc").unwrap_err();
    assert!(err.to_string().contains("https is not supported"), "{err}");
}

fn task_metadata() -> Value {
    json!({
        "Cluster": CLUSTER, "TaskARN": TASK, "Family": "svc", "Revision": "3",
        "DesiredStatus": "RUNNING", "KnownStatus": "RUNNING",
        "AvailabilityZone": "us-east-1a", "LaunchType": "FARGATE", "Containers": []
    })
}

/// ECS gets the ECS API backend's requests straight from the process: an enable whose
/// answer the state machine stopped waiting for (8 s) may still be applied after
/// that. A disable waits until the enable can no longer land (the request timeout and
/// a margin after it left), so ECS ends unprotected.
#[tokio::test]
async fn a_late_enable_through_the_ecs_api_never_lands_after_the_disable() {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    const LANDS_AFTER: Duration = Duration::from_millis(8_500);
    let server = MockServer::start().await;
    // Arrivals: when each request reached ECS, and whether it enabled.
    let arrivals: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let log = Arc::clone(&arrivals);
    Mock::given(method("POST"))
        .respond_with(move |request: &wiremock::Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            let enabled = body["protectionEnabled"].as_bool().unwrap();
            log.lock().unwrap().push((Instant::now(), enabled));
            let answer = json_answer(
                200,
                json!({"protectedTasks": [{"taskArn": TASK, "protectionEnabled": enabled}], "failures": []}),
            );
            // ECS is slow with the enable: it answers after 10 s.
            if enabled {
                answer.set_delay(Duration::from_secs(10))
            } else {
                answer
            }
        })
        .mount(&server)
        .await;
    // No maintain window, and a short spacing (so a short quiet time after the
    // holder): the disable is due as soon as the enable's window allows.
    let settings = ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(0)
        .min_put_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    assert_eq!(settings.request_timeout(), Duration::from_secs(8));
    let p = TaskProtection::start(backend(&server), settings);
    let holder = p.hold();
    let first_enable = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(&(at, true)) = arrivals.lock().unwrap().first() {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    drop(holder);
    let disable = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(&(at, _)) = arrivals.lock().unwrap().iter().find(|(_, on)| !on) {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    // ECS applies the enable 8.5 s after it arrived, after the client gave up on it.
    let enable_landed = first_enable + LANDS_AFTER;
    assert!(
        disable > enable_landed,
        "the disable reached ECS {:?} after the enable, before the enable landed at {LANDS_AFTER:?}: ECS ends protected",
        disable - first_enable
    );
    drop(p);
}
