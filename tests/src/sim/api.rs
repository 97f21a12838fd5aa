//! What a task reaches over HTTP, on one loopback server: its agent's protection
//! endpoint, its task metadata endpoint, and the ECS JSON API
//! (`X-Amz-Target: AmazonEC2ContainerServiceV20141113.*`), each answering in the
//! real shapes. Every path starts with `/tasks/<id>/`, so each call is counted for
//! the task that made it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::model::{
    ApiFault, CLUSTER, Model, SERVICE, Shared, Status, cluster_arn, service_arn, task_arn,
};

/// The ECS API's target prefix.
const TARGET: &str = "AmazonEC2ContainerServiceV20141113.";
/// The content type of the ECS JSON protocol.
const JSON_1_1: &str = "application/x-amz-json-1.1";
/// ListTasks returns at most this many ARNs a page.
const PAGE: usize = 100;

/// The running server.
#[derive(Debug)]
pub struct Api {
    server: MockServer,
}

impl Api {
    /// Starts answering for `model`.
    pub async fn start(model: Shared) -> Self {
        let server = MockServer::start().await;
        Mock::given(any())
            .respond_with(Responder(model))
            .mount(&server)
            .await;
        Self { server }
    }

    /// The environment a task needs to find its agent, its metadata and the ECS API.
    #[must_use]
    pub fn env_for(&self, id: &str) -> Vec<(String, String)> {
        let base = format!("{}/tasks/{id}", self.server.uri());
        vec![
            ("ECS_AGENT_URI".to_owned(), format!("{base}/agent")),
            (
                "ECS_CONTAINER_METADATA_URI_V4".to_owned(),
                format!("{base}/metadata"),
            ),
            ("AWS_ENDPOINT_URL_ECS".to_owned(), format!("{base}/ecs")),
        ]
    }
}

struct Responder(Shared);

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn rfc3339(t: SystemTime) -> String {
    crate::agent::rfc3339(t)
}

fn ecs_error(code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(400)
        .insert_header("content-type", JSON_1_1)
        .insert_header("x-amzn-errortype", code)
        .set_body_json(json!({"__type": code, "message": message}))
}

fn ok(body: &Value) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .insert_header("content-type", JSON_1_1)
        .set_body_json(body)
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let path = request.url.path().to_owned();
        let mut parts = path.trim_start_matches('/').splitn(4, '/');
        let (Some("tasks"), Some(id), Some(kind)) = (parts.next(), parts.next(), parts.next())
        else {
            return ResponseTemplate::new(404);
        };
        let rest = parts.next().unwrap_or("");
        let mut model = self.0.lock();
        if model.tasks.iter().all(|t| t.id != id) {
            return ResponseTemplate::new(404);
        }
        match kind {
            "agent" if rest == "task-protection/v1/state" => agent(&mut model, id, request),
            "metadata" if rest == "task" => metadata(&model, id),
            "ecs" => ecs(&mut model, id, request),
            _ => ResponseTemplate::new(404),
        }
    }
}

/// The agent's `task-protection/v1/state`: it calls ECS's UpdateTaskProtection (or
/// GetTaskProtection) and wraps the answer.
fn agent(model: &mut Model, id: &str, request: &Request) -> ResponseTemplate {
    let arn = task_arn(id);
    let now = Instant::now();
    if request.method.as_str() == "GET" {
        let task = model.tasks.iter().find(|t| t.id == id);
        let until = task.and_then(|t| t.protected_until).filter(|u| *u > now);
        return ResponseTemplate::new(200).set_body_json(json!({"protection": {
            "ExpirationDate": until.map(|u| rfc3339(SystemTime::now() + (u - now))),
            "ProtectionEnabled": until.is_some(),
            "TaskArn": arn,
        }}));
    }
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let enabled = body["ProtectionEnabled"].as_bool().unwrap_or(false);
    let minutes = body["ExpiresInMinutes"].as_u64().unwrap_or(120);
    match update_protection(model, id, enabled, minutes) {
        Ok(until) => ResponseTemplate::new(200).set_body_json(json!({"protection": {
            "ExpirationDate": until.map(|u| rfc3339(SystemTime::now() + (u - now))),
            "ProtectionEnabled": enabled,
            "TaskArn": arn,
        }})),
        Err(reason) => ResponseTemplate::new(200).set_body_json(json!({"failure": {
            "Arn": arn, "Detail": null, "Reason": reason,
        }})),
    }
}

/// ECS's UpdateTaskProtection for one task. An enable is refused with
/// `DEPLOYMENT_BLOCKED` when the service already has as many protected tasks as it
/// wants; a task already protected may always extend.
fn update_protection(
    model: &mut Model,
    id: &str,
    enabled: bool,
    minutes: u64,
) -> Result<Option<Instant>, &'static str> {
    let now = Instant::now();
    let desired = model.desired;
    let others = model
        .tasks
        .iter()
        .filter(|t| t.id != id && t.wanted() && t.protected(now))
        .count();
    let Some(task) = model.task_mut(id) else {
        return Err("TASK_NOT_VALID");
    };
    task.agent_puts += 1;
    if !enabled {
        task.protected_until = None;
        return Ok(None);
    }
    if !task.protected(now) && u32::try_from(others).unwrap_or(u32::MAX) >= desired {
        model.blocked += 1;
        return Err("DEPLOYMENT_BLOCKED");
    }
    let until = now + Duration::from_secs(minutes * 60);
    task.protected_until = Some(until);
    Ok(Some(until))
}

fn metadata(model: &Model, id: &str) -> ResponseTemplate {
    let Some(task) = model.tasks.iter().find(|t| t.id == id) else {
        return ResponseTemplate::new(404);
    };
    // As on Fargate: no ServiceName.
    ResponseTemplate::new(200).set_body_json(json!({
        "Cluster": cluster_arn(),
        "TaskARN": task_arn(id),
        "Family": "sim",
        "Revision": "1",
        "DesiredStatus": if task.wanted() { "RUNNING" } else { "STOPPED" },
        "KnownStatus": task.status.as_str(),
        "LaunchType": "FARGATE",
        "AvailabilityZone": "us-east-1a",
        "Containers": [{"Name": "app", "DockerName": "app", "KnownStatus": "RUNNING"}],
    }))
}

fn ecs(model: &mut Model, id: &str, request: &Request) -> ResponseTemplate {
    let target = request
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Some(operation) = target.strip_prefix(TARGET) else {
        return ecs_error("UnknownOperationException", "no X-Amz-Target");
    };
    if let Some(task) = model.task_mut(id) {
        *task.api_calls.entry(operation.to_owned()).or_default() += 1;
    }
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let answer = match model.fault {
        ApiFault::Denied => {
            return ecs_error(
                "AccessDeniedException",
                &format!("User is not authorized to perform: ecs:{operation}"),
            );
        }
        ApiFault::Throttled => return ecs_error("ThrottlingException", "Rate exceeded"),
        ApiFault::Malformed => return ok(&json!({"services": "not a list"})),
        ApiFault::Slow(d) => {
            return ResponseTemplate::new(500).set_delay(d);
        }
        ApiFault::None => match operation {
            "DescribeServices" => describe_services(model, &body),
            "ListTasks" => list_tasks(model, &body),
            "DescribeTasks" => describe_tasks(model, &body),
            "UpdateTaskProtection" => update_task_protection(model, &body),
            other => {
                return ecs_error(
                    "UnsupportedFeatureException",
                    &format!("{other} is not simulated"),
                );
            }
        },
    };
    match answer {
        Ok(body) => ok(&body),
        Err((code, message)) => ecs_error(code, &message),
    }
}

type Answer = Result<Value, (&'static str, String)>;

fn cluster_matches(body: &Value) -> Result<(), (&'static str, String)> {
    let cluster = body["cluster"].as_str().unwrap_or("default");
    if cluster == CLUSTER || cluster == cluster_arn() {
        Ok(())
    } else {
        Err(("ClusterNotFoundException", "Cluster not found.".to_owned()))
    }
}

fn describe_services(model: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let names: Vec<&str> = body["services"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut services = Vec::new();
    let mut failures = Vec::new();
    for name in names {
        if name != SERVICE && name != service_arn() {
            failures.push(json!({"arn": name, "reason": "MISSING"}));
            continue;
        }
        let primary = model.primary().to_owned();
        let deployments: Vec<Value> = model
            .deployments
            .iter()
            .rev()
            .map(|d| {
                let is_primary = d.id == primary;
                let desired = if is_primary {
                    model.desired
                } else {
                    model.wanted_of(&d.id)
                };
                let pending = model
                    .wanted()
                    .filter(|t| t.deployment == d.id && t.status == Status::Pending)
                    .count();
                let rollout = if d.completed.is_some() {
                    "COMPLETED"
                } else {
                    "IN_PROGRESS"
                };
                json!({
                    "id": d.id,
                    "status": if is_primary { "PRIMARY" } else { "ACTIVE" },
                    "taskDefinition": format!("arn:aws:ecs:us-east-1:123456789012:task-definition/sim:{}", &d.id[8..]),
                    "desiredCount": desired,
                    "pendingCount": pending,
                    "runningCount": model.running(Some(&d.id)),
                    "failedTasks": 0,
                    "createdAt": epoch(d.created_at),
                    "updatedAt": epoch(d.created_at),
                    "launchType": "FARGATE",
                    "rolloutState": rollout,
                    "rolloutStateReason": "",
                })
            })
            .collect();
        let pending = model
            .wanted()
            .filter(|t| t.status == Status::Pending)
            .count();
        services.push(json!({
            "serviceArn": service_arn(),
            "serviceName": SERVICE,
            "clusterArn": cluster_arn(),
            "status": "ACTIVE",
            "desiredCount": model.desired,
            "runningCount": model.running(None),
            "pendingCount": pending,
            "launchType": "FARGATE",
            "deployments": deployments,
            "deploymentConfiguration": {"maximumPercent": 200, "minimumHealthyPercent": 100},
            "schedulingStrategy": "REPLICA",
        }));
    }
    Ok(json!({"services": services, "failures": failures}))
}

fn list_tasks(model: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    if let Some(name) = body["serviceName"].as_str()
        && name != SERVICE
        && name != service_arn()
    {
        return Err(("ServiceNotFoundException", "Service not found.".to_owned()));
    }
    let stopped = body["desiredStatus"].as_str() == Some("STOPPED");
    let arns: Vec<String> = model
        .tasks
        .iter()
        .filter(|t| t.wanted() != stopped)
        .map(|t| task_arn(&t.id))
        .collect();
    let start = body["nextToken"]
        .as_str()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(0);
    let page: Vec<&String> = arns.iter().skip(start).take(PAGE).collect();
    let mut answer = json!({"taskArns": page});
    if start + PAGE < arns.len() {
        answer["nextToken"] = json!((start + PAGE).to_string());
    }
    Ok(answer)
}

fn describe_tasks(model: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let arns: Vec<&str> = body["tasks"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if arns.len() > 100 {
        return Err((
            "InvalidParameterException",
            "Tasks cannot have more than 100 elements".to_owned(),
        ));
    }
    let mut tasks = Vec::new();
    let mut failures = Vec::new();
    for arn in arns {
        let Some(t) = model.task_by_arn(arn) else {
            failures.push(json!({"arn": arn, "reason": "MISSING"}));
            continue;
        };
        let mut task = json!({
            "taskArn": task_arn(&t.id),
            "clusterArn": cluster_arn(),
            "taskDefinitionArn": format!("arn:aws:ecs:us-east-1:123456789012:task-definition/sim:{}", &t.deployment[8..]),
            "group": format!("service:{SERVICE}"),
            "startedBy": t.deployment,
            "lastStatus": t.status.as_str(),
            "desiredStatus": if t.wanted() { "RUNNING" } else { "STOPPED" },
            "launchType": "FARGATE",
            "availabilityZone": "us-east-1a",
            "createdAt": epoch(SystemTime::now() - t.created.elapsed()),
            "protectionEnabled": t.protected(Instant::now()),
        });
        if let Some(started) = t.started_at {
            task["startedAt"] = json!(epoch(started));
        }
        tasks.push(task);
    }
    Ok(json!({"tasks": tasks, "failures": failures}))
}

fn update_task_protection(model: &mut Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let enabled = body["protectionEnabled"].as_bool().unwrap_or(false);
    let minutes = body["expiresInMinutes"].as_u64().unwrap_or(120);
    let mut protected = Vec::new();
    let mut failures = Vec::new();
    let arns: Vec<String> = body["tasks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    for arn in arns {
        let Some(id) = model.task_by_arn(&arn).map(|t| t.id.clone()) else {
            failures.push(json!({"arn": arn, "reason": "MISSING"}));
            continue;
        };
        match update_protection(model, &id, enabled, minutes) {
            Ok(until) => protected.push(json!({
                "taskArn": arn,
                "protectionEnabled": enabled,
                "expirationDate": until.map(|u| epoch(SystemTime::now() + (u - Instant::now()))),
            })),
            Err(reason) => failures.push(json!({"arn": arn, "reason": reason})),
        }
    }
    Ok(json!({"protectedTasks": protected, "failures": failures}))
}
