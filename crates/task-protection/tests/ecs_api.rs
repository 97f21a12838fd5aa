//! The ECS API backend against a wiremock ECS endpoint (awsJson1_1) and a wiremock
//! task metadata endpoint.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::ecs_client;
use task_protection::{
    AcquireError, Backend, BackendConfig, BackendConfigError, BackendKind, EcsApiBackend,
    ProtectionError, ProtectionRequest, ProtectionSettings, TaskIdentity, TaskProtection,
    ThrottledBy,
};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TARGET: &str = "AmazonEC2ContainerServiceV20141113.UpdateTaskProtection";
const CLUSTER: &str = "arn:aws:ecs:us-east-1:123456789012:cluster/app-test-Cluster";
const TASK: &str = "arn:aws:ecs:us-east-1:123456789012:task/app-test-Cluster/0123";

fn backend(server: &MockServer) -> EcsApiBackend {
    EcsApiBackend::new(
        ecs_client(&server.uri()),
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
    assert!(grant.enabled);
    assert_eq!(grant.task_arn.as_deref(), Some(TASK));
    let got = grant.expires_at.unwrap();
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
    assert!(!grant.enabled);
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
    assert_eq!(r.reason, "DEPLOYMENT_BLOCKED");
    assert_eq!(r.detail.as_deref(), Some("too many protected tasks"));
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
        }
        if code == "AccessDeniedException" {
            assert!(
                matches!(&err, ProtectionError::Rejected(r) if r.reason == code),
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
    let agent_missing = BackendConfig {
        kind: BackendKind::Agent,
        agent_uri: None,
        metadata_uri: None,
    };
    let err = task_protection::AnyBackend::connect(&agent_missing)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "TASK_PROTECTION_BACKEND=agent needs ECS_AGENT_URI, which is not set (the ECS agent sets it inside a task; agent 1.65.0 or later is required)"
    );
    let outside_ecs = BackendConfig::default();
    let b = task_protection::AnyBackend::connect(&outside_ecs)
        .await
        .unwrap();
    assert!(b.simulated());
    let inside_ecs = BackendConfig {
        agent_uri: Some("http://169.254.170.2/api/abc".into()),
        ..BackendConfig::default()
    };
    let b = task_protection::AnyBackend::connect(&inside_ecs)
        .await
        .unwrap();
    assert!(!b.simulated());
    assert!(
        b.describe()
            .contains("169.254.170.2/api/abc/task-protection/v1/state")
    );
    let api_missing = BackendConfig {
        kind: BackendKind::EcsApi,
        ..BackendConfig::default()
    };
    let err = task_protection::AnyBackend::connect(&api_missing)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("ECS_CONTAINER_METADATA_URI_V4"),
        "{err}"
    );
    assert!("bogus".parse::<BackendKind>().is_err());
}
