//! The plain CloudFormation template (`cloudformation/task-protection.yml`) against
//! the binaries it deploys, and the stack it creates.
//!
//! The first test reads the template as the manifest tests read the manifests:
//! every container variable is a setting the binary reads, with the binary's
//! default; ports, the health-check path, stop timeouts, the queue's visibility
//! timeout and the ALB's idle timeout fit the code. The second creates the stack in
//! moto's CloudFormation and reads the resources back through each service's own
//! API. moto does not sign-check, so plain HTTP requests with a dummy
//! `Authorization` header (which tells moto the service and Region) are enough.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::moto::{Moto, aws_env};
use e2e::process::Service;
use e2e::{wait_for, workspace_root};
use serde_json::json;
use serde_norway::Value;

use crate::copilot_rules::TLS13_POLICIES;
use crate::deploy::{
    DEREGISTRATION_DELAY_MAX, HEALTH_PORT, MAX_RETENTION, MAX_STOP_TIMEOUT_SECONDS,
    QUEUE_CONSUMER_PATH, Setting, TARGET_HEALTH_INTERVAL_SECONDS, TARGET_UNHEALTHY_THRESHOLD,
    WEBSOCKET_PATH, WORKER_HEALTH_PORT, allowed_actions, at, check_drain_notice, check_drain_table,
    check_goodbye_within_delay, check_strangers, check_variables, default_number, function,
    get_status, installed_path, local_websocket, settings, text, text_at,
    without_unread_health_port, yaml,
};

mod https;
mod moto_api;
mod moto_stack;

use https::check_https;

const TEMPLATE: &str = "cloudformation/task-protection.yml";
/// The variable the worker reads its queue URL from (Copilot's name for it).
const QUEUE_URL_VARIABLE: &str = "COPILOT_QUEUE_URI";
/// Resource types moto's CloudFormation accepts but does not create: they appear
/// in no API and not in DescribeStackResources. The alarms and the dashboard are
/// checked statically in monitoring.rs.
const UNMODELLED_BY_MOTO: [&str; 4] = [
    "AWS::ApplicationAutoScaling::ScalableTarget",
    "AWS::ApplicationAutoScaling::ScalingPolicy",
    "AWS::CloudWatch::Alarm",
    "AWS::CloudWatch::Dashboard",
];

// --- reading the template ------------------------------------------------------------

/// The template's resources: logical id → resource.
fn resources(template: &Value) -> BTreeMap<String, Value> {
    at(template, "Resources")
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("{TEMPLATE} has no Resources"))
        .iter()
        .filter_map(|(k, v)| Some((text(k)?, v.clone())))
        .collect()
}

/// The one resource of this type whose logical id contains `hint`.
fn one<'a>(resources: &'a BTreeMap<String, Value>, kind: &str, hint: &str) -> (&'a str, &'a Value) {
    let found: Vec<(&str, &Value)> = resources
        .iter()
        .filter(|(id, r)| text_at(r, "Type").as_deref() == Some(kind) && id.contains(hint))
        .map(|(id, r)| (id.as_str(), r))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{TEMPLATE}: expected one {kind} named *{hint}*, found {:?}",
        found.iter().map(|(id, _)| id).collect::<Vec<_>>()
    );
    found[0]
}

/// A number written as `30` or `'30'`.
fn number(value: Option<&Value>) -> Option<u64> {
    text(value?)?.parse().ok()
}

/// The value of a `Key`/`Value` attribute list entry.
fn attribute(list: Option<&Value>, key: &str) -> Option<String> {
    list?
        .as_sequence()?
        .iter()
        .find(|a| text_at(a, "Key").as_deref() == Some(key))
        .and_then(|a| text_at(a, "Value"))
}

/// The only container of a task definition.
fn container(task_definition: &Value) -> &Value {
    let containers = at(task_definition, "Properties.ContainerDefinitions")
        .and_then(Value::as_sequence)
        .unwrap_or_else(|| panic!("a task definition has no ContainerDefinitions"));
    assert_eq!(containers.len(), 1, "expected one container per task");
    &containers[0]
}

/// The container's plain variables; a variable set by a function goes to `computed`.
fn environment(
    container: &Value,
    computed: &mut BTreeMap<String, (String, String)>,
    problems: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for entry in container
        .get("Environment")
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let Some(name) = text_at(entry, "Name") else {
            problems.push(format!("an Environment entry has no Name: {entry:?}"));
            continue;
        };
        match entry.get("Value") {
            Some(v) if text(v).is_some() => {
                vars.insert(name, text(v).unwrap_or_default());
            }
            Some(v) => match function(v) {
                Some(f) => {
                    computed.insert(name, f);
                }
                None => problems.push(format!(
                    "{name} has a value that is neither text nor a function"
                )),
            },
            None => problems.push(format!("{name} has no Value")),
        }
    }
    vars
}

/// Stop timeout above the grace plus the protection release request, within Fargate's limit.
fn check_stop(container: &Value, read: &BTreeMap<String, Setting>, problems: &mut Vec<String>) {
    let grace = default_number(read, "SHUTDOWN_GRACE_SECONDS").unwrap_or(u64::MAX);
    let request = default_number(read, "PROTECTION_REQUEST_TIMEOUT_MS").unwrap_or(0);
    match number(container.get("StopTimeout")) {
        Some(stop) if stop > grace + request.div_ceil(1000) && stop <= MAX_STOP_TIMEOUT_SECONDS => {}
        other => problems.push(format!(
            "StopTimeout is {other:?}; it must be above SHUTDOWN_GRACE_SECONDS ({grace} s) plus the release request ({request} ms), and at most {MAX_STOP_TIMEOUT_SECONDS}"
        )),
    }
}

/// The statements of a role's inline policies, by policy name.
fn role_statements(role: &Value) -> BTreeMap<String, Vec<Value>> {
    at(role, "Properties.Policies")
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let name = text_at(p, "PolicyName")?;
            let statements = at(p, "PolicyDocument.Statement")?.as_sequence()?.clone();
            Some((name, statements))
        })
        .collect()
}

/// A function reference, such as `!Ref Queue`, as text for comparison.
fn rendered(value: Option<&Value>) -> String {
    match value {
        Some(v) => match function(v) {
            Some((tag, arg)) => format!("{tag} {arg}"),
            None => text(v).unwrap_or_else(|| format!("{v:?}")),
        },
        None => "nothing".to_owned(),
    }
}

// --- the static test ---------------------------------------------------------------------

#[tokio::test]
async fn the_template_matches_the_binaries() {
    let template = yaml(TEMPLATE);
    let res = resources(&template);
    let mut problems: Vec<String> = Vec::new();

    // Parameters: the image URIs and the CPU architecture, X86_64 by default.
    for name in [
        "VpcId",
        "LoadBalancerSubnetIds",
        "TaskSubnetIds",
        "QueueConsumerImage",
        "WebsocketImage",
    ] {
        if at(&template, &format!("Parameters.{name}")).is_none() {
            problems.push(format!("no {name} parameter"));
        }
    }
    if text_at(&template, "Parameters.CpuArchitecture.Default").as_deref() != Some("X86_64") {
        problems.push("CpuArchitecture must default to X86_64, Fargate's default".into());
    }

    // The queue and its dead-letter queue.
    let worker = settings("queue-consumer").await;
    // The worker's queue is the one with a redrive policy.
    let queues: Vec<(&str, &Value)> = res
        .iter()
        .filter(|(_, r)| {
            text_at(r, "Type").as_deref() == Some("AWS::SQS::Queue")
                && at(r, "Properties.RedrivePolicy").is_some()
        })
        .map(|(id, r)| (id.as_str(), r))
        .collect();
    assert_eq!(
        queues.len(),
        1,
        "{TEMPLATE}: expected one queue with a RedrivePolicy"
    );
    let (queue_id, queue) = queues[0];
    let visibility = default_number(&worker, "VISIBILITY_TIMEOUT_SECONDS");
    if number(at(queue, "Properties.VisibilityTimeout")) != visibility {
        problems.push(format!(
            "the queue's VisibilityTimeout is {:?} but VISIBILITY_TIMEOUT_SECONDS defaults to {visibility:?}",
            at(queue, "Properties.VisibilityTimeout")
        ));
    }
    let (dlq_id, _) = one(&res, "AWS::SQS::Queue", "DeadLetter");
    let target = rendered(at(queue, "Properties.RedrivePolicy.deadLetterTargetArn"));
    if target != format!("!GetAtt {dlq_id}.Arn") {
        problems.push(format!("the redrive policy targets {target}, not {dlq_id}"));
    }
    match number(at(queue, "Properties.RedrivePolicy.maxReceiveCount")) {
        Some(1..=1000) => {}
        other => problems.push(format!("maxReceiveCount is {other:?}, expected 1..=1000")),
    }

    // The worker's task definition.
    let (_, worker_td) = one(&res, "AWS::ECS::TaskDefinition", "QueueConsumer");
    let worker_container = container(worker_td);
    let mut computed = BTreeMap::new();
    let mut vars = environment(worker_container, &mut computed, &mut problems);
    without_unread_health_port("queue-consumer", &mut vars, &worker).await;
    check_variables("queue-consumer", &vars, &worker, &mut problems);
    check_metrics_environment("queue-consumer", &mut computed, &mut problems);
    check_drain_table_variable("queue-consumer", &mut computed, &worker, &mut problems);
    check_drain_table(
        TEMPLATE,
        at(&template, "Resources.DrainTable"),
        &mut problems,
    );
    check_health_check(
        "queue-consumer",
        worker_container,
        QUEUE_CONSUMER_PATH,
        &mut problems,
    );
    // The health check asks the worker's health endpoint, off unless HEALTH_PORT is set.
    let health_port = worker_container
        .get("Environment")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|e| text_at(e, "Name").as_deref() == Some(HEALTH_PORT))
        .and_then(|e| text_at(e, "Value"));
    if health_port.as_deref() != Some(WORKER_HEALTH_PORT) {
        problems.push(format!(
            "the worker's container sets {HEALTH_PORT} to {health_port:?}, expected {WORKER_HEALTH_PORT}"
        ));
    }
    match computed.get(QUEUE_URL_VARIABLE) {
        Some((tag, arg)) if tag == "!Ref" && arg == queue_id => {}
        other => problems.push(format!(
            "{QUEUE_URL_VARIABLE} must be !Ref {queue_id} (its URL), is {other:?}"
        )),
    }
    if !worker.contains_key(QUEUE_URL_VARIABLE) {
        problems.push(format!(
            "`queue-consumer` does not read {QUEUE_URL_VARIABLE}"
        ));
    }
    check_stop(worker_container, &worker, &mut problems);

    // The websocket task definition, target group, listener and load balancer.
    let web = settings("websocket").await;
    let (_, web_td) = one(&res, "AWS::ECS::TaskDefinition", "Websocket");
    let web_container = container(web_td);
    let mut computed = BTreeMap::new();
    let vars = environment(web_container, &mut computed, &mut problems);
    check_variables("websocket", &vars, &web, &mut problems);
    check_metrics_environment("websocket", &mut computed, &mut problems);
    check_drain_table_variable("websocket", &mut computed, &web, &mut problems);
    // The pages allowed: the load balancer's own address, and AllowedOrigins.
    match computed.remove("ALLOWED_ORIGINS") {
        Some((tag, arg)) if tag == "!Sub" && arg == "${LoadBalancer.DNSName},${AllowedOrigins}" => {}
        other => problems.push(format!(
            "ALLOWED_ORIGINS must be !Sub '${{LoadBalancer.DNSName}},${{AllowedOrigins}}', is {other:?}"
        )),
    }
    let mut with_origins = vars.clone();
    with_origins.insert("ALLOWED_ORIGINS".into(), "(computed)".into());
    check_strangers(&with_origins, &mut problems);
    check_drain_notice(&vars, &web, &mut problems);
    check_health_check("websocket", web_container, WEBSOCKET_PATH, &mut problems);
    if !computed.is_empty() {
        problems.push(format!(
            "websocket variables set by functions: {computed:?}"
        ));
    }
    check_stop(web_container, &web, &mut problems);
    let port = default_number(&web, "PORT");
    let container_port = web_container
        .get("PortMappings")
        .and_then(Value::as_sequence)
        .and_then(|m| number(m.first()?.get("ContainerPort")));
    let (tg_id, tg) = one(
        &res,
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        "Websocket",
    );
    let tg_port = number(at(tg, "Properties.Port"));
    if port.is_none() || container_port != port || tg_port != port {
        problems.push(format!(
            "ports: the server listens on {port:?}, the container maps {container_port:?}, the target group sends to {tg_port:?}"
        ));
    }
    let health = text_at(tg, "Properties.HealthCheckPath");
    if health.as_deref() != Some("/healthz")
        || text_at(tg, "Properties.Matcher.HttpCode").as_deref() != Some("200")
    {
        problems.push(format!(
            "the health check is {health:?}, expected GET /healthz → 200"
        ));
    }
    // Out of rotation within about 10 s of /healthz failing: checked every 5 s,
    // 2 failures in a row, the timeout below the interval.
    let tg_number = |key: &str| number(at(tg, &format!("Properties.{key}")));
    let interval = tg_number("HealthCheckIntervalSeconds");
    if interval != Some(TARGET_HEALTH_INTERVAL_SECONDS)
        || tg_number("UnhealthyThresholdCount") != Some(TARGET_UNHEALTHY_THRESHOLD)
        || tg_number("HealthyThresholdCount") != Some(2)
        || !matches!(
            (tg_number("HealthCheckTimeoutSeconds"), interval),
            (Some(t), Some(i)) if t < i
        )
    {
        problems.push(format!(
            "the target group's health check must run every {TARGET_HEALTH_INTERVAL_SECONDS} s with thresholds 2 and a timeout below the interval: {:?}",
            at(tg, "Properties")
        ));
    }
    // ECS waits the whole deregistration delay before SIGTERM, for every task.
    let delay = attribute(
        at(tg, "Properties.TargetGroupAttributes"),
        "deregistration_delay.timeout_seconds",
    )
    .and_then(|d| d.parse::<u64>().ok());
    match delay {
        Some(d) if d > 0 && Duration::from_secs(d) <= DEREGISTRATION_DELAY_MAX => {
            check_goodbye_within_delay(Duration::from_secs(d), &vars, &web, &mut problems);
        }
        _ => problems.push(format!(
            "deregistration_delay.timeout_seconds is {delay:?}; set it, at most {DEREGISTRATION_DELAY_MAX:?}"
        )),
    }
    let (_, lb) = one(&res, "AWS::ElasticLoadBalancingV2::LoadBalancer", "");
    let idle = attribute(
        at(lb, "Properties.LoadBalancerAttributes"),
        "idle_timeout.timeout_seconds",
    )
    .and_then(|d| d.parse::<u64>().ok());
    let ping = default_number(&web, "WS_PING_INTERVAL_SECONDS");
    match (idle, ping) {
        (Some(i), Some(p)) if p < i => {}
        _ => problems.push(format!(
            "the ALB idle timeout is {idle:?}; set it explicitly, above WS_PING_INTERVAL_SECONDS ({ping:?})"
        )),
    }
    check_https(&template, &res, tg_id, &mut problems);

    // Both task definitions: Fargate, the architecture parameter.
    for td in [worker_td, web_td] {
        if rendered(at(td, "Properties.RuntimePlatform.CpuArchitecture")) != "!Ref CpuArchitecture"
        {
            problems.push("RuntimePlatform.CpuArchitecture must be !Ref CpuArchitecture".into());
        }
    }

    // The services: the circuit breaker, and the load balancer for the websocket.
    for hint in ["QueueConsumer", "Websocket"] {
        let (_, service) = one(&res, "AWS::ECS::Service", hint);
        let breaker = at(
            service,
            "Properties.DeploymentConfiguration.DeploymentCircuitBreaker.Enable",
        );
        if breaker.and_then(Value::as_bool) != Some(true) {
            problems.push(format!(
                "the {hint} service has no deployment circuit breaker"
            ));
        }
    }
    let (_, web_service) = one(&res, "AWS::ECS::Service", "Websocket");
    let lb_port = at(web_service, "Properties.LoadBalancers")
        .and_then(Value::as_sequence)
        .and_then(|l| number(l.first()?.get("ContainerPort")));
    if lb_port != port {
        problems.push(format!(
            "the websocket service registers port {lb_port:?}, not {port:?}"
        ));
    }

    // Least privilege: protection on this cluster's tasks, the worker's queue actions
    // on its queue only, and the drain watcher's reads and its table exactly.
    let protection = ["ecs:GetTaskProtection", "ecs:UpdateTaskProtection"];
    let drain = [
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "ecs:DescribeContainerInstances",
        "ecs:DescribeServiceDeployments",
        "ecs:DescribeServices",
        "ecs:DescribeTasks",
        "ecs:ListTasks",
    ];
    let queue_actions = [
        "sqs:ChangeMessageVisibility",
        "sqs:DeleteMessage",
        "sqs:ReceiveMessage",
    ];
    for (hint, wants_queue, tag) in [
        ("QueueConsumerTaskRole", true, "queue-consumer"),
        ("WebsocketTaskRole", false, "websocket"),
    ] {
        let (_, role) = one(&res, "AWS::IAM::Role", hint);
        let mut actions: Vec<String> = Vec::new();
        let policies = role_statements(role);
        let service = hint.trim_end_matches("TaskRole");
        let wanted: Value =
            serde_norway::from_str(&drain_statements(service, tag)).expect("valid YAML");
        match policies.get("drain") {
            Some(statements) if Value::Sequence(statements.clone()) == wanted => {}
            other => problems.push(format!(
                "{hint}: the drain policy must be exactly DescribeServices and DescribeServiceDeployments on {service}Service, ListTasks and DescribeContainerInstances on this cluster, DescribeTasks on the tasks tagged ecs-service: {tag}, and the drain table's three item actions, is {other:?}"
            )),
        }
        for (name, statement) in policies
            .iter()
            .flat_map(|(name, list)| list.iter().map(move |s| (name, s)))
        {
            let allowed = allowed_actions(std::slice::from_ref(statement));
            actions.extend(allowed.iter().cloned());
            if name == "drain" {
                continue;
            }
            let resource = rendered(statement.get("Resource"));
            if allowed.iter().any(|a| a.starts_with("ecs:"))
                && !resource.contains(":task/${Cluster}/*")
            {
                problems.push(format!(
                    "{hint}: task protection on {resource}, not this cluster's tasks"
                ));
            }
            if allowed.iter().any(|a| a.starts_with("sqs:"))
                && resource != format!("!GetAtt {queue_id}.Arn")
            {
                problems.push(format!(
                    "{hint}: queue actions on {resource}, not the worker's queue"
                ));
            }
        }
        actions.sort();
        let mut expected: Vec<&str> = protection.to_vec();
        expected.extend(drain);
        if wants_queue {
            expected.extend(queue_actions);
        }
        expected.sort_unstable();
        if actions != expected {
            problems.push(format!(
                "{hint} allows {actions:?}, expected exactly {expected:?}"
            ));
        }
    }

    // Backlog-per-task scaling of the worker, on a metric Container Insights gives.
    let (_, policy) = one(
        &res,
        "AWS::ApplicationAutoScaling::ScalingPolicy",
        "QueueConsumer",
    );
    let spec = format!(
        "{:?}",
        at(
            policy,
            "Properties.TargetTrackingScalingPolicyConfiguration"
        )
    );
    for needed in [
        "ApproximateNumberOfMessagesVisible",
        "RunningTaskCount",
        "visible / tasks",
    ] {
        if !spec.contains(needed) {
            problems.push(format!("the worker's scaling policy does not use {needed}"));
        }
    }
    let (_, cluster) = one(&res, "AWS::ECS::Cluster", "");
    if attribute_named(
        at(cluster, "Properties.ClusterSettings"),
        "containerInsights",
    )
    .as_deref()
        != Some("enabled")
    {
        problems.push("RunningTaskCount needs containerInsights enabled on the cluster".into());
    }

    // The health-check path answers 200 on the real server.
    let (server, listen) = local_websocket().await;
    if let Some(path) = &health {
        let status = get_status(listen, path).await;
        if status != Some(200) {
            problems.push(format!("GET {path} on the real server answered {status:?}"));
        }
    }
    drop(server);

    assert!(
        problems.is_empty(),
        "{TEMPLATE} does not match the code:\n  - {}",
        problems.join("\n  - ")
    );
}

/// The drain watcher's statements for the task role of `service` (`Websocket`,
/// `QueueConsumer`): DescribeServices on the service, whose name CloudFormation
/// generates as <stack>-<logical id>-<suffix> (its ARN cannot be referenced: the
/// service depends on the role), the cluster's tasks, the service's deployments, the
/// cluster's container instances, and the item in the drain's table.
fn drain_statements(service: &str, tag: &str) -> String {
    format!(
        r"
- Effect: Allow
  Action: ecs:DescribeServices
  Resource: !Sub 'arn:${{AWS::Partition}}:ecs:${{AWS::Region}}:${{AWS::AccountId}}:service/${{Cluster}}/${{AWS::StackName}}-{service}Service-*'
- Effect: Allow
  Action: ecs:ListTasks
  Resource: '*'
  Condition:
    ArnEquals: {{'ecs:cluster': !GetAtt Cluster.Arn}}
- Effect: Allow
  Action: ecs:DescribeTasks
  Resource: !Sub 'arn:${{AWS::Partition}}:ecs:${{AWS::Region}}:${{AWS::AccountId}}:task/${{Cluster}}/*'
  Condition:
    StringEquals: {{'aws:ResourceTag/ecs-service': {tag}}}
- Effect: Allow
  Action: ecs:DescribeServiceDeployments
  Resource: !Sub 'arn:${{AWS::Partition}}:ecs:${{AWS::Region}}:${{AWS::AccountId}}:service-deployment/${{Cluster}}/${{AWS::StackName}}-{service}Service-*/*'
- Effect: Allow
  Action: ecs:DescribeContainerInstances
  Resource: !Sub 'arn:${{AWS::Partition}}:ecs:${{AWS::Region}}:${{AWS::AccountId}}:container-instance/${{Cluster}}/*'
- Effect: Allow
  Action: [dynamodb:GetItem, dynamodb:UpdateItem, dynamodb:PutItem]
  Resource: !GetAtt DrainTable.Arn
"
    )
}

/// The service's tasks share their drain decision through the stack's table.
fn check_drain_table_variable(
    service: &str,
    computed: &mut BTreeMap<String, (String, String)>,
    read: &BTreeMap<String, Setting>,
    problems: &mut Vec<String>,
) {
    if !read.contains_key("DRAIN_TABLE") {
        problems.push(format!("{service} reads no DRAIN_TABLE"));
    }
    match computed.remove("DRAIN_TABLE") {
        Some((tag, arg)) if tag == "!Ref" && arg == "DrainTable" => {}
        other => problems.push(format!(
            "{service}: DRAIN_TABLE must be !Ref DrainTable, is {other:?}"
        )),
    }
}

/// The Environment dimension of the service's metrics is the stack's name.
fn check_metrics_environment(
    service: &str,
    computed: &mut BTreeMap<String, (String, String)>,
    problems: &mut Vec<String>,
) {
    match computed.remove("METRICS_ENVIRONMENT") {
        Some((tag, arg)) if tag == "!Ref" && arg == "AWS::StackName" => {}
        other => problems.push(format!(
            "{service}: METRICS_ENVIRONMENT must be !Ref AWS::StackName, so that two stacks never share a metric, is {other:?}"
        )),
    }
}

/// The container health check runs the binary the image installs (ECS ignores the
/// Dockerfile's HEALTHCHECK; distroless has no shell).
fn check_health_check(service: &str, container: &Value, path: &str, problems: &mut Vec<String>) {
    let command: Vec<String> = at(container, "HealthCheck.Command")
        .and_then(Value::as_sequence)
        .map(|c| c.iter().filter_map(text).collect())
        .unwrap_or_default();
    if command != ["CMD", path, "healthcheck"] {
        problems.push(format!(
            "{service}: HealthCheck.Command is {command:?}, expected [CMD, {path}, healthcheck]"
        ));
    }
    if installed_path(service).as_deref() != Some(path) {
        problems.push(format!("the {service} image does not install {path}"));
    }
    let n = |key: &str| number(at(container, &format!("HealthCheck.{key}")));
    match (n("Interval"), n("Timeout"), n("Retries"), n("StartPeriod")) {
        (Some(5..=300), Some(2..=60), Some(1..=10), Some(0..=300)) => {}
        other => problems.push(format!(
            "{service}: HealthCheck timings {other:?} are outside ECS's limits (interval 5-300, timeout 2-60, retries 1-10, start 0-300)"
        )),
    }
}

/// The value of a `Name`/`Value` settings list entry.
fn attribute_named(list: Option<&Value>, name: &str) -> Option<String> {
    list?
        .as_sequence()?
        .iter()
        .find(|a| text_at(a, "Name").as_deref() == Some(name))
        .and_then(|a| text_at(a, "Value"))
}

#[test]
fn the_queues_and_log_groups_outlive_the_stack() {
    // Messages are jobs, and the last days of logs tell what happened: deleting
    // the stack, or an update that replaces one of these, keeps them. Their names
    // are generated, so a kept one never blocks a new stack.
    let template = yaml(TEMPLATE);
    let res = resources(&template);
    let kept: Vec<&str> = res
        .iter()
        .filter(|(_, r)| {
            matches!(
                text_at(r, "Type").as_deref(),
                Some("AWS::SQS::Queue" | "AWS::Logs::LogGroup")
            )
        })
        .map(|(id, r)| {
            for attribute in ["DeletionPolicy", "UpdateReplacePolicy"] {
                assert_eq!(
                    text_at(r, attribute).as_deref(),
                    Some("Retain"),
                    "{TEMPLATE}: {id}.{attribute}"
                );
            }
            // A kept queue still expires its messages: both keep them 14 days.
            if text_at(r, "Type").as_deref() == Some("AWS::SQS::Queue") {
                assert_eq!(
                    number(at(r, "Properties.MessageRetentionPeriod")),
                    Some(MAX_RETENTION.as_secs()),
                    "{TEMPLATE}: {id}.MessageRetentionPeriod (SQS's default is 4 days)"
                );
            }
            assert!(
                at(r, "Properties.QueueName").is_none()
                    && at(r, "Properties.LogGroupName").is_none(),
                "{TEMPLATE}: {id} has a fixed name; a kept one would block the next stack"
            );
            id.as_str()
        })
        .collect();
    assert_eq!(
        kept,
        [
            "DeadLetterQueue",
            "Queue",
            "QueueConsumerLogGroup",
            "WebsocketLogGroup"
        ]
    );
}
