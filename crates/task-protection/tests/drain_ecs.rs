//! The drain watcher's real ECS calls (aws-sdk-ecs) against a wiremock endpoint that
//! speaks the ECS JSON protocol (awsJson1_1): the requests it sends, the answers it
//! reads, and how it sorts the errors.

mod support;

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};
use support::ecs_client;
use task_protection::drain::{ApiError, EcsService, ServiceApi};
use wiremock::matchers::{body_partial_json, header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PREFIX: &str = "AmazonEC2ContainerServiceV20141113.";
const CLUSTER: &str = "arn:aws:ecs:us-east-1:123456789012:cluster/app";

fn service(server: &MockServer) -> EcsService {
    service_at(&server.uri())
}

fn service_at(endpoint: &str) -> EcsService {
    EcsService::new(ecs_client(endpoint))
}

fn answer(status: u16, body: &Value) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("content-type", "application/x-amz-json-1.1")
        .set_body_json(body)
}

async fn on(server: &MockServer, operation: &str, request: Value, response: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(header("x-amz-target", format!("{PREFIX}{operation}")))
        .and(body_partial_json(request))
        .respond_with(response)
        .mount(server)
        .await;
}

#[tokio::test]
async fn describe_service_reads_counts_and_deployments() {
    let server = MockServer::start().await;
    on(
        &server,
        "DescribeServices",
        json!({"cluster": CLUSTER, "services": ["web"]}),
        answer(
            200,
            &json!({"services": [{
                "serviceName": "web", "status": "ACTIVE", "desiredCount": 2, "runningCount": 3,
                "pendingCount": 0,
                "deployments": [
                    {"id": "ecs-svc/2", "status": "PRIMARY", "desiredCount": 2, "runningCount": 1,
                     "createdAt": 1_700_000_100.5, "rolloutState": "IN_PROGRESS"},
                    {"id": "ecs-svc/1", "status": "ACTIVE", "desiredCount": 2, "runningCount": 2,
                     "createdAt": 1_700_000_000.0, "rolloutState": "COMPLETED"}
                ]}], "failures": []}),
        ),
    )
    .await;
    let view = service(&server)
        .describe_service(CLUSTER, "web")
        .await
        .unwrap();
    assert_eq!((view.desired, view.running), (2, 3));
    assert_eq!(view.deployments.len(), 2);
    let primary = &view.deployments[0];
    assert!(primary.primary && primary.id == "ecs-svc/2");
    assert_eq!((primary.desired, primary.running), (2, 1));
    assert_eq!(
        primary.created_at,
        Some(UNIX_EPOCH + Duration::from_millis(1_700_000_100_500))
    );
    assert!(!view.deployments[1].primary);
}

#[tokio::test]
async fn a_missing_service_is_refused_not_read_as_empty() {
    let server = MockServer::start().await;
    on(
        &server,
        "DescribeServices",
        json!({}),
        answer(
            200,
            &json!({"services": [], "failures": [{"arn": "web", "reason": "MISSING"}]}),
        ),
    )
    .await;
    let err = service(&server)
        .describe_service(CLUSTER, "web")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ApiError::Refused(m) if m.contains("MISSING")),
        "{err}"
    );
}

#[tokio::test]
async fn list_tasks_asks_for_the_running_ones_and_follows_every_page() {
    let server = MockServer::start().await;
    let first: Vec<String> = (0..100).map(|i| format!("arn:t/{i}")).collect();
    on(
        &server,
        "ListTasks",
        json!({"cluster": CLUSTER, "serviceName": "web", "desiredStatus": "RUNNING", "nextToken": "p2"}),
        answer(200, &json!({"taskArns": ["arn:t/100"]})),
    )
    .await;
    Mock::given(method("POST"))
        .and(header("x-amz-target", format!("{PREFIX}ListTasks")))
        .respond_with(answer(200, &json!({"taskArns": first, "nextToken": "p2"})))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    let arns = service(&server).list_tasks(CLUSTER, "web").await.unwrap();
    assert_eq!(arns.len(), 101);
    assert_eq!(arns[100], "arn:t/100");
}

#[tokio::test]
async fn describe_tasks_asks_in_calls_of_a_hundred() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("x-amz-target", format!("{PREFIX}DescribeTasks")))
        .respond_with(move |request: &wiremock::Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let tasks: Vec<Value> = body["tasks"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|arn| {
                    json!({"taskArn": arn, "group": "service:web", "startedBy": "ecs-svc/1",
                           "lastStatus": "RUNNING", "desiredStatus": "RUNNING",
                           "startedAt": 1_700_000_000.0})
                })
                .collect();
            answer(200, &json!({"tasks": tasks, "failures": []}))
        })
        .mount(&server)
        .await;
    let arns: Vec<String> = (0..150).map(|i| format!("arn:t/{i}")).collect();
    let tasks = service(&server)
        .describe_tasks(CLUSTER, &arns)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 150);
    assert!(
        tasks
            .iter()
            .all(|t| t.running && t.group.as_deref() == Some("service:web"))
    );
    assert_eq!(tasks[0].deployment.as_deref(), Some("ecs-svc/1"));
    let calls = server.received_requests().await.unwrap();
    let sizes: Vec<usize> = calls
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.body).unwrap()["tasks"]
                .as_array()
                .map_or(0, Vec::len)
        })
        .collect();
    assert_eq!(sizes, [100, 50]);
}

#[tokio::test]
async fn errors_are_sorted_by_what_the_watcher_should_do() {
    let cases = [
        ("ThrottlingException", 400, "throttled"),
        ("AccessDeniedException", 400, "access denied"),
        ("ClusterNotFoundException", 400, "refused"),
        ("ServerException", 500, "unavailable"),
    ];
    for (code, status, kind) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                answer(status, &json!({"__type": code, "message": "no"}))
                    .insert_header("x-amzn-errortype", code),
            )
            .mount(&server)
            .await;
        let err = service(&server)
            .describe_service(CLUSTER, "web")
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with(kind), "{code}: {err}");
    }
    // Nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let api = service_at(&format!("http://127.0.0.1:{port}"));
    let err = api.describe_service(CLUSTER, "web").await.unwrap_err();
    assert!(matches!(err, ApiError::Unavailable(_)), "{err}");
    // An answer that is not what the operation returns.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(answer(200, &json!({"services": "not a list"})))
        .mount(&server)
        .await;
    let err = service(&server)
        .describe_service(CLUSTER, "web")
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Malformed(_)), "{err}");
}
