//! The drain watcher's real ECS calls (aws-sdk-ecs) against a wiremock endpoint that
//! speaks the ECS JSON protocol (awsJson1_1): the requests it sends, the answers it
//! reads, and how it sorts the errors.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};
use task_protection::drain::{
    ApiError, Controller, EcsService, Health, Rollout, ServiceApi, Strategy,
};
use wiremock::matchers::{body_partial_json, header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PREFIX: &str = "AmazonEC2ContainerServiceV20141113.";
const CLUSTER: &str = "arn:aws:ecs:us-east-1:123456789012:cluster/app";

fn service(server: &MockServer) -> EcsService {
    service_at(&server.uri())
}

fn service_at(endpoint: &str) -> EcsService {
    EcsService::for_endpoint(endpoint)
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
async fn describe_service_reads_counts_deployments_and_their_configuration() {
    let server = MockServer::start().await;
    on(
        &server,
        "DescribeServices",
        json!({"cluster": CLUSTER, "services": ["web"]}),
        answer(
            200,
            &json!({"services": [{
                "serviceName": "web", "status": "ACTIVE", "desiredCount": 2, "runningCount": 3,
                "pendingCount": 1, "schedulingStrategy": "REPLICA",
                "deploymentController": {"type": "ECS"},
                "deploymentConfiguration": {"maximumPercent": 100, "minimumHealthyPercent": 50,
                    "strategy": "BLUE_GREEN", "bakeTimeInMinutes": 5,
                    "deploymentCircuitBreaker": {"enable": true, "rollback": true}},
                "healthCheckGracePeriodSeconds": 45,
                "loadBalancers": [{"targetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/1", "containerName": "web", "containerPort": 8080}],
                "currentServiceDeployment": "arn:aws:ecs:us-east-1:123456789012:service-deployment/app/web/abc",
                "deployments": [
                    {"id": "ecs-svc/2", "status": "PRIMARY", "desiredCount": 2, "runningCount": 1,
                     "pendingCount": 1, "failedTasks": 3,
                     "taskDefinition": "arn:aws:ecs:us-east-1:123456789012:task-definition/web:8",
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
    assert_eq!((view.desired, view.running, view.pending), (2, 3, 1));
    assert!(!view.daemon);
    assert_eq!(view.controller, Controller::Ecs);
    assert_eq!(view.strategy, Strategy::TrafficShift("BLUE_GREEN".into()));
    assert_eq!(
        (view.maximum_percent, view.minimum_healthy_percent),
        (100, 50)
    );
    assert_eq!(view.grace, Duration::from_secs(45));
    assert!(view.load_balanced);
    assert!(view.current_deployment.unwrap().ends_with("/abc"));
    assert_eq!(view.deployments.len(), 2);
    let primary = &view.deployments[0];
    assert!(primary.primary && primary.id == "ecs-svc/2");
    assert_eq!(
        (
            primary.desired,
            primary.running,
            primary.pending,
            primary.failed_tasks
        ),
        (2, 1, 1, 3)
    );
    assert_eq!(primary.rollout, Rollout::InProgress);
    assert!(primary.task_definition.ends_with("web:8"));
    assert_eq!(
        primary.created_at,
        Some(UNIX_EPOCH + Duration::from_millis(1_700_000_100_500))
    );
    assert!(!view.deployments[1].primary);
    assert_eq!(view.deployments[1].rollout, Rollout::Completed);
}

#[tokio::test]
async fn a_service_without_a_configuration_gets_ecs_s_defaults() {
    let server = MockServer::start().await;
    on(
        &server,
        "DescribeServices",
        json!({}),
        answer(
            200,
            &json!({"services": [{"serviceName": "web", "desiredCount": 1, "runningCount": 1,
                "pendingCount": 0, "schedulingStrategy": "DAEMON",
                "deploymentController": {"type": "CODE_DEPLOY"}, "deployments": []}]}),
        ),
    )
    .await;
    let view = service(&server)
        .describe_service(CLUSTER, "web")
        .await
        .unwrap();
    assert!(view.daemon);
    assert_eq!(view.controller, Controller::CodeDeploy);
    assert_eq!(view.strategy, Strategy::Rolling);
    assert_eq!(
        (view.maximum_percent, view.minimum_healthy_percent),
        (200, 100)
    );
    assert_eq!(view.grace, Duration::ZERO);
    assert!(!view.load_balanced);
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
async fn list_tasks_asks_for_the_running_ones_a_page_at_a_time() {
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
    let api = service(&server);
    let (first_page, next) = api.list_tasks(CLUSTER, "web", false, None).await.unwrap();
    assert_eq!((first_page.len(), next.as_deref()), (100, Some("p2")));
    let (second_page, next) = api.list_tasks(CLUSTER, "web", false, next).await.unwrap();
    assert_eq!((second_page, next), (vec!["arn:t/100".to_owned()], None));
}

#[tokio::test]
async fn describe_tasks_reads_every_task_it_is_asked_about() {
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
                           "healthStatus": "HEALTHY", "availabilityZone": "us-east-1b",
                           "containerInstanceArn": "arn:ci/1",
                           "taskDefinitionArn": "arn:td/web:3",
                           "startedAt": 1_700_000_000.0})
                })
                .collect();
            answer(200, &json!({"tasks": tasks, "failures": []}))
        })
        .mount(&server)
        .await;
    let arns: Vec<String> = (0..100).map(|i| format!("arn:t/{i}")).collect();
    let tasks = service(&server)
        .describe_tasks(CLUSTER, &arns)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 100);
    assert!(
        tasks
            .iter()
            .all(|t| t.running && t.group.as_deref() == Some("service:web"))
    );
    let t = &tasks[0];
    assert_eq!(t.deployment.as_deref(), Some("ecs-svc/1"));
    assert_eq!(t.health, Health::Healthy);
    assert!(!t.stopping);
    assert_eq!(t.zone.as_deref(), Some("us-east-1b"));
    assert_eq!(t.instance.as_deref(), Some("arn:ci/1"));
    assert_eq!(t.task_definition.as_deref(), Some("arn:td/web:3"));
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

#[tokio::test]
async fn a_task_ecs_is_stopping_reads_as_stopping() {
    let server = MockServer::start().await;
    on(
        &server,
        "DescribeTasks",
        json!({}),
        answer(
            200,
            &json!({"tasks": [{"taskArn": "arn:t/1", "lastStatus": "DEACTIVATING",
                "desiredStatus": "STOPPED", "healthStatus": "UNKNOWN"}], "failures": []}),
        ),
    )
    .await;
    let tasks = service(&server)
        .describe_tasks(CLUSTER, &["arn:t/1".to_owned()])
        .await
        .unwrap();
    assert!(tasks[0].stopping && !tasks[0].running);
    assert_eq!(tasks[0].health, Health::Unknown);
}

#[tokio::test]
async fn draining_instances_are_read_from_describe_container_instances() {
    let server = MockServer::start().await;
    on(
        &server,
        "DescribeContainerInstances",
        json!({"cluster": CLUSTER, "containerInstances": ["arn:ci/1", "arn:ci/2"]}),
        answer(
            200,
            &json!({"containerInstances": [
                {"containerInstanceArn": "arn:ci/1", "status": "ACTIVE"},
                {"containerInstanceArn": "arn:ci/2", "status": "DRAINING"}], "failures": []}),
        ),
    )
    .await;
    let draining = service(&server)
        .draining_instances(CLUSTER, &["arn:ci/1".to_owned(), "arn:ci/2".to_owned()])
        .await
        .unwrap();
    assert_eq!(draining.into_iter().collect::<Vec<_>>(), ["arn:ci/2"]);
}

#[tokio::test]
async fn a_service_deployment_s_stage_is_read_from_describe_service_deployments() {
    let server = MockServer::start().await;
    on(
        &server,
        "DescribeServiceDeployments",
        json!({"serviceDeploymentArns": ["arn:sd/1"]}),
        answer(
            200,
            &json!({"serviceDeployments": [{"serviceDeploymentArn": "arn:sd/1",
                "status": "IN_PROGRESS", "lifecycleStage": "BAKE_TIME"}], "failures": []}),
        ),
    )
    .await;
    let shift = service(&server)
        .service_deployment("arn:sd/1")
        .await
        .unwrap();
    assert_eq!(shift.status, "IN_PROGRESS");
    assert_eq!(shift.stage.as_deref(), Some("BAKE_TIME"));
    assert!(!shift.old_side_released());
}

#[tokio::test]
async fn the_stopped_tasks_are_listed_with_desired_status_stopped() {
    let server = MockServer::start().await;
    on(
        &server,
        "ListTasks",
        json!({"cluster": CLUSTER, "serviceName": "web", "desiredStatus": "STOPPED"}),
        answer(200, &json!({"taskArns": ["arn:t/9"]})),
    )
    .await;
    let (arns, next) = service(&server)
        .list_tasks(CLUSTER, "web", true, None)
        .await
        .unwrap();
    assert_eq!((arns, next), (vec!["arn:t/9".to_owned()], None));
}
