//! The ECS JSON API (`X-Amz-Target: AmazonEC2ContainerServiceV20141113.*`) as pure
//! functions: an operation, its JSON body and the time in, a JSON answer or ECS's
//! error out, in the shapes aws-sdk-ecs parses. Every call is counted for the task
//! that made it and takes a token from the account's bucket for its group of actions
//! (or is refused with `ThrottlingException`). The agent's protection endpoint and the
//! task metadata endpoint are in [`agent`].

pub mod agent;
mod services;
mod tasks;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::model::{ApiFault, CLUSTER, Model, cluster_arn};

/// An ECS error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcsError {
    /// The HTTP status (ECS answers 400 for client errors, throttling included).
    pub status: u16,
    /// `__type`, and the `x-amzn-errortype` header.
    pub code: String,
    /// `message`.
    pub message: String,
}

impl EcsError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// `ThrottlingException`, as ECS answers when the bucket is empty.
    #[must_use]
    pub fn throttled() -> Self {
        Self::new("ThrottlingException", "Rate exceeded")
    }

    /// The JSON body ECS sends with it.
    #[must_use]
    pub fn body(&self) -> Value {
        json!({"__type": self.code, "message": self.message})
    }
}

/// What an operation answers.
pub type Answer = Result<Value, EcsError>;

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// One of the service's tasks, by id.
    Task(&'a str),
    /// Someone else in the account (a test, a deploy tool).
    Other,
}

/// The operations answered.
pub const OPERATIONS: &[&str] = &[
    "DescribeServices",
    "ListServiceDeployments",
    "DescribeServiceDeployments",
    "ListTasks",
    "DescribeTasks",
    "DescribeContainerInstances",
    "StopTask",
    "UpdateTaskProtection",
    "GetTaskProtection",
];

/// One ECS API call by `caller` at `now`.
pub fn ecs(
    m: &mut Model,
    caller: Caller<'_>,
    operation: &str,
    body: &Value,
    now: Duration,
) -> Answer {
    m.now = m.now.max(now);
    let task = match caller {
        Caller::Task(id) => m.task_mut(id),
        Caller::Other => None,
    };
    if let Some(task) = task {
        *task.api_calls.entry(operation.to_owned()).or_default() += 1;
    }
    match m.fault {
        ApiFault::Denied => {
            return Err(EcsError::new(
                "AccessDeniedException",
                format!("User is not authorized to perform: ecs:{operation}"),
            ));
        }
        ApiFault::Throttled => {
            count_throttled(m, caller);
            return Err(EcsError::throttled());
        }
        ApiFault::Malformed => return Ok(json!({"services": "not a list"})),
        ApiFault::None | ApiFault::Slow(_) => {}
    }
    if !OPERATIONS.contains(&operation) {
        return Err(EcsError::new(
            "UnknownOperationException",
            format!("{operation} is not simulated"),
        ));
    }
    if !m.buckets.take(operation, m.now) {
        count_throttled(m, caller);
        return Err(EcsError::throttled());
    }
    match operation {
        "DescribeServices" => services::describe_services(m, body),
        "ListServiceDeployments" => services::list_service_deployments(m, body),
        "DescribeServiceDeployments" => services::describe_service_deployments(m, body),
        "ListTasks" => tasks::list_tasks(m, body),
        "DescribeTasks" => tasks::describe_tasks(m, body),
        "DescribeContainerInstances" => tasks::describe_container_instances(m, body),
        "StopTask" => tasks::stop_task(m, body),
        "UpdateTaskProtection" => tasks::update_task_protection(m, body),
        _ => tasks::get_task_protection(m, body),
    }
}

fn count_throttled(m: &mut Model, caller: Caller<'_>) {
    if let Caller::Task(id) = caller
        && let Some(t) = m.task_mut(id)
    {
        t.throttled += 1;
    }
}

/// Seconds since the Unix epoch, as the JSON protocol sends timestamps.
fn epoch(m: &Model, at: Duration) -> f64 {
    wall_secs(m.wall(at))
}

fn wall_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `cluster` parameter names this cluster (by name or ARN; `default` when absent).
fn cluster_matches(body: &Value) -> Result<(), EcsError> {
    let cluster = body["cluster"].as_str().unwrap_or("default");
    if cluster == CLUSTER || cluster == cluster_arn() {
        Ok(())
    } else {
        Err(EcsError::new(
            "ClusterNotFoundException",
            "Cluster not found.",
        ))
    }
}

/// The strings of an array parameter.
fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
