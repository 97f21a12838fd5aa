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
    DEREGISTRATION_DELAY_MAX, HEALTH_PORT, MAX_STOP_TIMEOUT_SECONDS, QUEUE_CONSUMER_PATH, Setting,
    TARGET_HEALTH_INTERVAL_SECONDS, TARGET_UNHEALTHY_THRESHOLD, WEBSOCKET_PATH, WORKER_HEALTH_PORT,
    allowed_actions, at, check_drain_notice, check_strangers, check_variables, default_number,
    function, get_status, installed_path, local_websocket, settings, text, text_at,
    without_unread_health_port, yaml,
};

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
    check_drain_notice(&web, &mut problems);
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
        Some(d) if d > 0 && Duration::from_secs(d) <= DEREGISTRATION_DELAY_MAX => {}
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
    // on its queue only, and the drain watcher's three reads exactly.
    let protection = ["ecs:GetTaskProtection", "ecs:UpdateTaskProtection"];
    let drain = ["ecs:DescribeServices", "ecs:DescribeTasks", "ecs:ListTasks"];
    let queue_actions = [
        "sqs:ChangeMessageVisibility",
        "sqs:DeleteMessage",
        "sqs:ReceiveMessage",
    ];
    for (hint, wants_queue) in [
        ("QueueConsumerTaskRole", true),
        ("WebsocketTaskRole", false),
    ] {
        let (_, role) = one(&res, "AWS::IAM::Role", hint);
        let mut actions: Vec<String> = Vec::new();
        let policies = role_statements(role);
        let service = hint.trim_end_matches("TaskRole");
        let wanted: Value = serde_norway::from_str(&drain_statements(service)).expect("valid YAML");
        match policies.get("drain") {
            Some(statements) if Value::Sequence(statements.clone()) == wanted => {}
            other => problems.push(format!(
                "{hint}: the drain policy must be exactly DescribeServices on {service}Service and ListTasks/DescribeTasks on this cluster, is {other:?}"
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
/// service depends on the role), and the cluster's tasks.
fn drain_statements(service: &str) -> String {
    format!(
        r"
- Effect: Allow
  Action: ecs:DescribeServices
  Resource: !Sub 'arn:${{AWS::Partition}}:ecs:${{AWS::Region}}:${{AWS::AccountId}}:service/${{Cluster}}/${{AWS::StackName}}-{service}Service-*'
- Effect: Allow
  Action: [ecs:ListTasks, ecs:DescribeTasks]
  Resource: '*'
  Condition:
    ArnEquals: {{'ecs:cluster': !GetAtt Cluster.Arn}}
"
    )
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

/// HTTPS when a certificate is given, HTTP as before when not: a 443 listener with
/// a TLS 1.3 policy and the certificate, a rule that sends every request on port 80
/// there, port 443 open on the ALB's security group, all under one condition; and
/// port 80 forwarding to the service by default, so the target group always belongs
/// to the load balancer before the service starts.
fn check_https(
    template: &Value,
    res: &BTreeMap<String, Value>,
    tg_id: &str,
    problems: &mut Vec<String>,
) {
    let param = at(template, "Parameters.CertificateArn");
    if param.and_then(|p| text_at(p, "Default")).as_deref() != Some("") {
        problems.push("no CertificateArn parameter with an empty default (HTTP only)".into());
    }
    let condition = "HasCertificate";
    let cond = format!("{:?}", at(template, &format!("Conditions.{condition}")));
    if !cond.contains("CertificateArn") {
        problems.push(format!(
            "no condition {condition} on CertificateArn: {cond}"
        ));
    }
    let get = |id: &str| res.get(id);
    let forward_to = |listener: &Value| {
        at(listener, "Properties.DefaultActions")
            .and_then(Value::as_sequence)
            .and_then(|a| a.first())
            .map(|a| (text_at(a, "Type"), rendered(a.get("TargetGroupArn"))))
    };
    let forward = Some((Some("forward".to_owned()), format!("!Ref {tg_id}")));
    match get("HttpListener") {
        Some(l)
            if text_at(l, "Condition").is_none()
                && number(at(l, "Properties.Port")) == Some(80)
                && forward_to(l) == forward => {}
        other => problems.push(format!(
            "HttpListener must always exist on port 80 and forward to {tg_id}: {other:?}"
        )),
    }
    match get("HttpsListener") {
        Some(l) => {
            let p = |key: &str| text_at(l, &format!("Properties.{key}"));
            let certs = at(l, "Properties.Certificates")
                .and_then(Value::as_sequence)
                .map(|c| {
                    c.iter()
                        .map(|c| rendered(c.get("CertificateArn")))
                        .collect::<Vec<_>>()
                });
            if text_at(l, "Condition").as_deref() != Some(condition)
                || p("Protocol").as_deref() != Some("HTTPS")
                || number(at(l, "Properties.Port")) != Some(443)
                || !p("SslPolicy").is_some_and(|s| TLS13_POLICIES.contains(&s.as_str()))
                || certs != Some(vec!["!Ref CertificateArn".to_owned()])
                || forward_to(l) != forward
            {
                problems.push(format!(
                    "HttpsListener must be HTTPS on 443 with a TLS 1.3 policy and !Ref CertificateArn, forwarding to {tg_id}, under {condition}: {l:?}"
                ));
            }
        }
        None => problems.push("no HttpsListener".into()),
    }
    let redirect = res.iter().find(|(_, r)| {
        text_at(r, "Type").as_deref() == Some("AWS::ElasticLoadBalancingV2::ListenerRule")
            && rendered(at(r, "Properties.ListenerArn")) == "!Ref HttpListener"
    });
    match redirect {
        Some((_, rule)) => {
            let action = at(rule, "Properties.Actions")
                .and_then(Value::as_sequence)
                .and_then(|a| a.first());
            let config =
                |key: &str| action.and_then(|a| text_at(a, &format!("RedirectConfig.{key}")));
            let paths = format!("{:?}", at(rule, "Properties.Conditions"));
            if text_at(rule, "Condition").as_deref() != Some(condition)
                || action.and_then(|a| text_at(a, "Type")).as_deref() != Some("redirect")
                || config("Protocol").as_deref() != Some("HTTPS")
                || config("Port").as_deref() != Some("443")
                || config("StatusCode").as_deref() != Some("HTTP_301")
                || !paths.contains("\"/*\"")
            {
                problems.push(format!(
                    "the port 80 rule must redirect every path to HTTPS on 443 (301) under {condition}: {rule:?}"
                ));
            }
        }
        None => problems.push("no rule on HttpListener redirects to HTTPS".into()),
    }
    let opens_443 = res.values().any(|r| {
        text_at(r, "Type").as_deref() == Some("AWS::EC2::SecurityGroupIngress")
            && text_at(r, "Condition").as_deref() == Some(condition)
            && rendered(at(r, "Properties.GroupId")) == "!GetAtt LoadBalancerSecurityGroup.GroupId"
            && number(at(r, "Properties.FromPort")) == Some(443)
            && number(at(r, "Properties.ToPort")) == Some(443)
    });
    if !opens_443 {
        problems.push(format!(
            "no ingress rule opens 443 on the ALB's security group under {condition}"
        ));
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

// --- moto ----------------------------------------------------------------------------

/// Plain AWS API calls to moto: query (form in, XML out) and JSON 1.1 protocols.
struct Api {
    http: reqwest::Client,
    endpoint: String,
}

impl Api {
    fn new(moto: &Moto) -> Self {
        Self {
            http: reqwest::Client::new(),
            endpoint: moto.endpoint(),
        }
    }

    /// moto reads the service and Region from the credential scope; it does not
    /// check the signature.
    fn auth(service: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"
        )
    }

    async fn query(
        &self,
        service: &str,
        version: &str,
        action: &str,
        params: &[(String, String)],
    ) -> String {
        let mut form: Vec<(String, String)> = vec![
            ("Action".into(), action.into()),
            ("Version".into(), version.into()),
        ];
        form.extend_from_slice(params);
        let answer = self
            .http
            .post(&self.endpoint)
            .header("Authorization", Self::auth(service))
            .form(&form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{service} {action}: {e}"));
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "{service} {action} answered {status}: {body}"
        );
        body
    }

    async fn json(
        &self,
        service: &str,
        target: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let answer = self
            .http
            .post(&self.endpoint)
            .header("Authorization", Self::auth(service))
            .header("X-Amz-Target", target)
            .header("Content-Type", "application/x-amz-json-1.1")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        assert!(status.is_success(), "{target} answered {status}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{target}: not JSON ({e}): {text}"))
    }
}

/// The text of every element named `name`, in document order.
fn xml_all(xml: &str, name: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("not XML ({e}): {xml}"));
    doc.descendants()
        .filter(|n| n.tag_name().name() == name)
        .map(|n| n.text().unwrap_or_default().to_owned())
        .collect()
}

fn xml_one(xml: &str, name: &str) -> String {
    xml_all(xml, name)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no <{name}> in {xml}"))
}

/// Each `member` element under a list, as a map of its direct children's text.
fn xml_members(xml: &str, list: &str) -> Vec<BTreeMap<String, String>> {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("not XML ({e}): {xml}"));
    doc.descendants()
        .filter(|n| n.tag_name().name() == list)
        .flat_map(|l| l.children().filter(|c| c.tag_name().name() == "member"))
        .map(|m| {
            m.children()
                .filter(roxmltree::Node::is_element)
                .map(|c| {
                    (
                        c.tag_name().name().to_owned(),
                        c.text().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Creates the template as stack `name` with these parameters in moto, waits for it,
/// and returns DescribeStacks' answer and the stack's outputs.
async fn create_stack(
    api: &Api,
    name: &str,
    parameters: &[(&str, String)],
) -> (String, BTreeMap<String, String>) {
    let body = std::fs::read_to_string(workspace_root().join(TEMPLATE))
        .unwrap_or_else(|e| panic!("cannot read {TEMPLATE}: {e}"));
    let mut params: Vec<(String, String)> = vec![
        ("StackName".into(), name.into()),
        ("TemplateBody".into(), body),
        ("Capabilities.member.1".into(), "CAPABILITY_IAM".into()),
    ];
    for (i, (key, value)) in parameters.iter().enumerate() {
        params.push((
            format!("Parameters.member.{}.ParameterKey", i + 1),
            (*key).to_owned(),
        ));
        params.push((
            format!("Parameters.member.{}.ParameterValue", i + 1),
            value.clone(),
        ));
    }
    let cfn = "2010-05-15";
    api.query("cloudformation", cfn, "CreateStack", &params)
        .await;
    let stack = [("StackName".to_owned(), name.to_owned())];
    let (status, described) = wait_for(
        "the stack to finish creating",
        Duration::from_secs(60),
        || async {
            let answer = api
                .query("cloudformation", cfn, "DescribeStacks", &stack)
                .await;
            let status = xml_one(&answer, "StackStatus");
            (!status.ends_with("IN_PROGRESS")).then_some((status, answer))
        },
    )
    .await;
    assert_eq!(
        status, "CREATE_COMPLETE",
        "{name} did not create: {described}"
    );
    let outputs: BTreeMap<String, String> = xml_members(&described, "Outputs")
        .into_iter()
        .filter_map(|m| Some((m.get("OutputKey")?.clone(), m.get("OutputValue")?.clone())))
        .collect();
    (described, outputs)
}

/// The logical id → (type, physical id) of a stack's resources in moto.
async fn stack_resources(api: &Api, name: &str) -> BTreeMap<String, (String, String)> {
    let stack = [("StackName".to_owned(), name.to_owned())];
    let listed = api
        .query(
            "cloudformation",
            "2010-05-15",
            "DescribeStackResources",
            &stack,
        )
        .await;
    xml_members(&listed, "StackResources")
        .into_iter()
        .filter_map(|m| {
            let id = m.get("LogicalResourceId")?.clone();
            Some((
                id,
                (
                    m.get("ResourceType")?.clone(),
                    m.get("PhysicalResourceId")?.clone(),
                ),
            ))
        })
        .collect()
}

/// Whether an IAM resource pattern with `*` wildcards matches `arn`.
fn arn_matches(pattern: &str, arn: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if !arn.starts_with(first) || !arn.ends_with(last) || arn.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &arn[first.len()..arn.len() - last.len()];
    for middle in &parts[1..parts.len().saturating_sub(1)] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    parts.len() > 1 || arn == pattern
}

/// The `Name`/`Value` pairs of an ECS container's environment.
fn ecs_environment(container: &serde_json::Value) -> BTreeMap<String, String> {
    container["environment"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[tokio::test]
async fn the_stack_creates_in_motos_cloudformation() {
    let moto = Moto::start().await;
    let api = Api::new(&moto);
    let template = yaml(TEMPLATE);
    let declared = resources(&template);

    // An existing VPC with two subnets in two Availability Zones.
    let ec2 = |action: &'static str, params: Vec<(String, String)>| {
        let api = &api;
        async move { api.query("ec2", "2016-11-15", action, &params).await }
    };
    let vpc = xml_one(
        &ec2(
            "CreateVpc",
            vec![("CidrBlock".into(), "10.0.0.0/16".into())],
        )
        .await,
        "vpcId",
    );
    let mut subnets = Vec::new();
    for (cidr, zone) in [("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b")] {
        let answer = ec2(
            "CreateSubnet",
            vec![
                ("VpcId".into(), vpc.clone()),
                ("CidrBlock".into(), cidr.into()),
                ("AvailabilityZone".into(), zone.into()),
            ],
        )
        .await;
        subnets.push(xml_one(&answer, "subnetId"));
    }

    let stack_name = "task-protection";
    let base = vec![
        ("VpcId", vpc.clone()),
        ("LoadBalancerSubnetIds", subnets.join(",")),
        ("TaskSubnetIds", subnets.join(",")),
        (
            "QueueConsumerImage",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/queue-consumer:1".to_owned(),
        ),
        (
            "WebsocketImage",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/websocket:1".to_owned(),
        ),
    ];
    let cfn = "2010-05-15";
    let stack = [("StackName".to_owned(), stack_name.to_owned())];
    let (_, outputs) = create_stack(&api, stack_name, &base).await;
    // Every resource moto can model was created, but for those that need a
    // certificate; the rest are the known gaps.
    let physical = stack_resources(&api, stack_name).await;
    for (id, resource) in &declared {
        let kind = text_at(resource, "Type").unwrap_or_default();
        let needs_certificate = text_at(resource, "Condition").as_deref() == Some("HasCertificate");
        match physical.get(id) {
            Some((listed_kind, _)) => {
                assert!(!needs_certificate, "{id} was created without a certificate");
                assert_eq!(listed_kind, &kind, "{id}");
            }
            None => assert!(
                needs_certificate || UNMODELLED_BY_MOTO.contains(&kind.as_str()),
                "{id} ({kind}) was not created in moto"
            ),
        }
    }
    let id_of = |logical: &str| -> String {
        physical
            .get(logical)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("{logical} was not created"))
    };

    // The queue: visibility equal to the worker's default, redrive to the DLQ.
    let sqs = moto.client();
    let queue_url = id_of("Queue");
    assert_eq!(
        outputs.get("QueueUrl"),
        Some(&queue_url),
        "the QueueUrl output"
    );
    let attributes = |url: String| {
        let sqs = sqs.clone();
        async move {
            sqs.get_queue_attributes()
                .queue_url(url)
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
                .send()
                .await
                .unwrap_or_else(|e| panic!("get_queue_attributes: {e:?}"))
                .attributes
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.as_str().to_owned(), v))
                .collect::<BTreeMap<String, String>>()
        }
    };
    let queue = attributes(queue_url.clone()).await;
    let dlq = attributes(id_of("DeadLetterQueue")).await;
    let worker = settings("queue-consumer").await;
    assert_eq!(
        queue.get("VisibilityTimeout").and_then(|v| v.parse().ok()),
        default_number(&worker, "VISIBILITY_TIMEOUT_SECONDS"),
        "the queue's visibility timeout is the worker's"
    );
    let redrive: serde_json::Value =
        serde_json::from_str(queue.get("RedrivePolicy").map_or("{}", String::as_str))
            .unwrap_or_else(|e| panic!("RedrivePolicy is not JSON: {e}"));
    assert_eq!(
        redrive["deadLetterTargetArn"].as_str(),
        dlq.get("QueueArn").map(String::as_str)
    );
    assert_eq!(redrive["maxReceiveCount"].as_u64(), Some(5));
    assert_eq!(
        dlq.get("MessageRetentionPeriod").map(String::as_str),
        Some("1209600")
    );
    assert_eq!(
        queue.get("SqsManagedSseEnabled").map(String::as_str),
        Some("true")
    );

    // The task definitions: every variable, stop timeouts, port, logs.
    let web = settings("websocket").await;
    let mut worker_env = BTreeMap::new();
    for (logical, binary, read, log_group) in [
        (
            "QueueConsumerTaskDefinition",
            "queue-consumer",
            &worker,
            "QueueConsumerLogGroup",
        ),
        (
            "WebsocketTaskDefinition",
            "websocket",
            &web,
            "WebsocketLogGroup",
        ),
    ] {
        let answer = api
            .json(
                "ecs",
                "AmazonEC2ContainerServiceV20141113.DescribeTaskDefinition",
                json!({"taskDefinition": id_of(logical)}),
            )
            .await;
        let c = &answer["taskDefinition"]["containerDefinitions"][0];
        let mut env = ecs_environment(c);
        let mut problems = Vec::new();
        if binary == "queue-consumer" {
            worker_env = env.clone();
            assert_eq!(
                env.remove(QUEUE_URL_VARIABLE),
                Some(queue_url.clone()),
                "{QUEUE_URL_VARIABLE}"
            );
        }
        without_unread_health_port(binary, &mut env, read).await;
        check_variables(binary, &env, read, &mut problems);
        assert!(
            problems.is_empty(),
            "{logical} in moto:\n  - {}",
            problems.join("\n  - ")
        );
        // Each stack's metrics carry its own name as the Environment dimension.
        assert_eq!(
            env.get("METRICS_ENVIRONMENT").map(String::as_str),
            Some(stack_name),
            "{logical}: METRICS_ENVIRONMENT"
        );
        assert_eq!(
            c["healthCheck"]["command"],
            json!(["CMD", format!("/usr/local/bin/{binary}"), "healthcheck"]),
            "{logical}: the container health check"
        );
        let grace = default_number(read, "SHUTDOWN_GRACE_SECONDS").unwrap_or(u64::MAX);
        assert!(
            c["stopTimeout"].as_u64().is_some_and(|s| s > grace),
            "{logical}: stopTimeout {}",
            c["stopTimeout"]
        );
        assert_eq!(c["logConfiguration"]["logDriver"], "awslogs");
        assert_eq!(
            c["logConfiguration"]["options"]["awslogs-group"].as_str(),
            Some(id_of(log_group).as_str())
        );
        if binary == "websocket" {
            assert_eq!(
                c["portMappings"][0]["containerPort"].as_u64(),
                default_number(read, "PORT"),
                "the websocket container port"
            );
            // The pages of the load balancer's own address may connect, no others.
            let host = outputs
                .get("ServiceUrl")
                .and_then(|url| url.strip_prefix("http://"))
                .unwrap_or_else(|| panic!("no http ServiceUrl in {outputs:?}"));
            assert_eq!(env.get("ALLOWED_ORIGINS"), Some(&format!("{host},")));
            crate::websocket::strangers::assert_deployment_refuses_strangers(
                &env,
                &[format!("http://{}", host.to_ascii_lowercase())],
            )
            .await;
        }
    }

    // The real worker, with the task definition's environment as ECS would give it,
    // works a job from the stack's queue under protection and deletes it.
    let agent = FakeAgent::start().await;
    let mut env: Vec<(&str, String)> = worker_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    env.extend(aws_env(&moto.endpoint()));
    env.push(("ECS_AGENT_URI", agent.uri()));
    env.push(("RUST_LOG", "info".to_owned()));
    let running = Service::spawn("queue-consumer", &[], &env);
    running
        .wait_for_line("Long polling for messages", Duration::from_secs(30))
        .await;
    let sent = sqs
        .send_message()
        .queue_url(&queue_url)
        .message_body("50")
        .send()
        .await
        .unwrap_or_else(|e| panic!("send_message: {e:?}"))
        .message_id
        .unwrap_or_default();
    running
        .wait_for_line(&format!("{sent} - Done"), Duration::from_secs(30))
        .await;
    running
        .wait_for_line("Task protection released", Duration::from_secs(30))
        .await;
    assert!(
        agent.puts().first().is_some_and(|put| put.enabled()),
        "the worker did not protect its task through the agent: {:?}",
        agent.puts()
    );
    let left = attributes(queue_url.clone()).await;
    for count in [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
    ] {
        assert_eq!(
            left.get(count).map(String::as_str),
            Some("0"),
            "{count} after the job"
        );
    }
    drop(running);

    // The services run their task definitions in the stack's cluster.
    let cluster = id_of("Cluster");
    let answer = api
        .json(
            "ecs",
            "AmazonEC2ContainerServiceV20141113.DescribeServices",
            json!({"cluster": cluster, "services": [id_of("QueueConsumerService"), id_of("WebsocketService")]}),
        )
        .await;
    let services = answer["services"].as_array().cloned().unwrap_or_default();
    assert_eq!(services.len(), 2, "both services exist: {answer}");
    for (service, td) in services
        .iter()
        .zip(["QueueConsumerTaskDefinition", "WebsocketTaskDefinition"])
    {
        assert_eq!(service["taskDefinition"].as_str(), Some(id_of(td).as_str()));
        assert_eq!(service["desiredCount"].as_u64(), Some(1));
    }

    // The load balancer, its listener and the target group's health check.
    let elb = "2015-12-01";
    let lb_arn = id_of("LoadBalancer");
    let lbs = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeLoadBalancers",
            &[("LoadBalancerArns.member.1".into(), lb_arn.clone())],
        )
        .await;
    assert_eq!(xml_one(&lbs, "Scheme"), "internet-facing");
    assert!(
        outputs
            .get("ServiceUrl")
            .is_some_and(|u| u == &format!("http://{}", xml_one(&lbs, "DNSName"))),
        "the ServiceUrl output is the ALB's address: {outputs:?}"
    );
    let listeners = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeListeners",
            &[("LoadBalancerArn".into(), lb_arn)],
        )
        .await;
    // Without a certificate: HTTP on port 80 only, as before.
    assert_eq!(xml_members(&listeners, "Listeners").len(), 1, "{listeners}");
    assert_eq!(xml_one(&listeners, "Port"), "80");
    assert_eq!(
        xml_one(&listeners, "TargetGroupArn"),
        id_of("WebsocketTargetGroup")
    );
    let groups = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeTargetGroups",
            &[(
                "TargetGroupArns.member.1".into(),
                id_of("WebsocketTargetGroup"),
            )],
        )
        .await;
    assert_eq!(xml_one(&groups, "HealthCheckPath"), "/healthz");
    assert_eq!(xml_one(&groups, "HttpCode"), "200");
    assert_eq!(
        xml_one(&groups, "HealthCheckIntervalSeconds"),
        TARGET_HEALTH_INTERVAL_SECONDS.to_string()
    );
    assert_eq!(
        xml_one(&groups, "UnhealthyThresholdCount"),
        TARGET_UNHEALTHY_THRESHOLD.to_string()
    );
    assert_eq!(xml_one(&groups, "TargetType"), "ip");
    assert_eq!(
        Some(xml_one(&groups, "Port").parse().unwrap_or(0)),
        default_number(&web, "PORT")
    );

    // The task roles: protection on this cluster's tasks, queue actions on the queue.
    let iam = "2010-05-08";
    let policy = |role: String, name: &'static str| {
        let api = &api;
        async move {
            let answer = api
                .query(
                    "iam",
                    iam,
                    "GetRolePolicy",
                    &[
                        ("RoleName".into(), role),
                        ("PolicyName".into(), name.into()),
                    ],
                )
                .await;
            xml_one(&answer, "PolicyDocument")
        }
    };
    let queue_arn = queue.get("QueueArn").cloned().unwrap_or_default();
    for role in ["QueueConsumerTaskRole", "WebsocketTaskRole"] {
        let document = policy(id_of(role), "task-protection").await;
        assert!(
            document.contains(&format!(":task/{cluster}/*"))
                && document.contains("ecs:UpdateTaskProtection"),
            "{role}: {document}"
        );
    }
    let document = policy(id_of("QueueConsumerTaskRole"), "work-the-queue").await;
    assert!(
        document.contains("sqs:ChangeMessageVisibility") && document.contains(&queue_arn),
        "the worker's queue policy: {document}"
    );
    // The drain policy names each role's own service, as the stack named it, and no
    // other, and conditions the task reads on this cluster.
    let cluster_arn = answer["services"][0]["clusterArn"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let service_arns: Vec<String> = services
        .iter()
        .map(|s| s["serviceArn"].as_str().unwrap_or_default().to_owned())
        .collect();
    for (i, role) in ["QueueConsumerTaskRole", "WebsocketTaskRole"]
        .iter()
        .enumerate()
    {
        // moto hands back an inline policy that CloudFormation created as Python's
        // repr of it: single quotes, which no value here contains.
        let raw = policy(id_of(role), "drain").await.replace('\'', "\"");
        let document: serde_json::Value =
            serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{role}: not JSON ({e}): {raw}"));
        let statements = document["Statement"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(statements.len(), 2, "{role}: {document}");
        let pattern = statements[0]["Resource"].as_str().unwrap_or_default();
        assert_eq!(statements[0]["Action"], "ecs:DescribeServices", "{role}");
        assert!(
            arn_matches(pattern, &service_arns[i]) && !arn_matches(pattern, &service_arns[1 - i]),
            "{role}: {pattern} must match {} and not {}",
            service_arns[i],
            service_arns[1 - i]
        );
        assert_eq!(
            statements[1]["Condition"]["ArnEquals"]["ecs:cluster"].as_str(),
            Some(cluster_arn.as_str()),
            "{role}: {document}"
        );
    }

    // The log groups keep 30 days.
    let groups = api
        .json("logs", "Logs_20140328.DescribeLogGroups", json!({}))
        .await;
    for logical in ["QueueConsumerLogGroup", "WebsocketLogGroup"] {
        let name = id_of(logical);
        let group = groups["logGroups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["logGroupName"] == name.as_str()))
            .unwrap_or_else(|| panic!("no log group {name}: {groups}"));
        assert_eq!(group["retentionInDays"].as_u64(), Some(30), "{logical}");
    }

    // With a certificate: HTTPS on 443 with a TLS 1.3 policy, and port 80 sends
    // every request there. A second stack in the same VPC, with a certificate ACM
    // holds.
    let certificate = api
        .json(
            "acm",
            "CertificateManager.RequestCertificate",
            json!({"DomainName": "ws.example.com", "ValidationMethod": "DNS"}),
        )
        .await["CertificateArn"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let https_name = "task-protection-https";
    let mut with_certificate = base.clone();
    with_certificate.push(("CertificateArn", certificate.clone()));
    let (_, https_outputs) = create_stack(&api, https_name, &with_certificate).await;
    let https = stack_resources(&api, https_name).await;
    let https_id = |logical: &str| -> String {
        https
            .get(logical)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("{logical} was not created with a certificate"))
    };
    let lbs = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeLoadBalancers",
            &[("LoadBalancerArns.member.1".into(), https_id("LoadBalancer"))],
        )
        .await;
    assert_eq!(
        https_outputs.get("ServiceUrl"),
        Some(&format!("https://{}", xml_one(&lbs, "DNSName")))
    );
    let listeners = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeListeners",
            &[("LoadBalancerArn".into(), https_id("LoadBalancer"))],
        )
        .await;
    let by_port: BTreeMap<String, BTreeMap<String, String>> = xml_members(&listeners, "Listeners")
        .into_iter()
        .filter_map(|l| Some((l.get("Port")?.clone(), l)))
        .collect();
    assert_eq!(
        by_port.keys().collect::<Vec<_>>(),
        ["443", "80"],
        "{listeners}"
    );
    assert_eq!(
        by_port["443"].get("Protocol").map(String::as_str),
        Some("HTTPS")
    );
    assert!(
        by_port["443"]
            .get("SslPolicy")
            .is_some_and(|p| TLS13_POLICIES.contains(&p.as_str())),
        "{listeners}"
    );
    assert!(listeners.contains(&certificate), "{listeners}");
    let rules = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeRules",
            &[("ListenerArn".into(), https_id("HttpListener"))],
        )
        .await;
    assert!(
        rules.contains("<Type>redirect</Type>")
            && rules.contains("<Protocol>HTTPS</Protocol>")
            && rules.contains("<Port>443</Port>")
            && rules.contains("HTTP_301"),
        "port 80 does not redirect to HTTPS: {rules}"
    );

    // Deleting the first stack keeps its queues, their messages and its log groups.
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body("kept")
        .send()
        .await
        .unwrap_or_else(|e| panic!("send_message: {e:?}"));
    api.query("cloudformation", cfn, "DeleteStack", &stack)
        .await;
    wait_for(
        "the stack to be deleted",
        Duration::from_secs(60),
        || async {
            let answer = api.query("cloudformation", cfn, "ListStacks", &[]).await;
            xml_members(&answer, "StackSummaries")
                .iter()
                .any(|m| {
                    m.get("StackName").map(String::as_str) == Some(stack_name)
                        && m.get("StackStatus").map(String::as_str) == Some("DELETE_COMPLETE")
                })
                .then_some(())
        },
    )
    .await;
    // The message may be in flight: the worker killed above left a long poll open,
    // and moto, as SQS, hands a message to a receive that is still waiting.
    let kept = attributes(queue_url.clone()).await;
    let count = |key: &str| {
        kept.get(key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        count("ApproximateNumberOfMessages") + count("ApproximateNumberOfMessagesNotVisible"),
        1,
        "the queue and its message outlive the stack: {kept:?}"
    );
    attributes(id_of("DeadLetterQueue")).await;
    let groups = api
        .json("logs", "Logs_20140328.DescribeLogGroups", json!({}))
        .await;
    for logical in ["QueueConsumerLogGroup", "WebsocketLogGroup"] {
        let name = id_of(logical);
        assert!(
            groups["logGroups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g["logGroupName"] == name.as_str())),
            "{logical} was deleted with the stack"
        );
    }
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
