//! What a task reaches inside itself: its agent's protection endpoint
//! (`$ECS_AGENT_URI/task-protection/v1/state`, which calls ECS's UpdateTaskProtection
//! or GetTaskProtection and wraps the answer) and its task metadata endpoint
//! (`$ECS_CONTAINER_METADATA_URI_V4/task`, answered from the agent's own state, no ECS
//! call). Shapes as platform-facts.md and the agent's source give them.

use std::time::Duration;

use serde_json::{Value, json};

use super::tasks::update_protection;
use crate::sim::model::{Model, SERVICE, Status, cluster_arn, task_arn};
use crate::sim::settings::{Launch, MetadataWhileDeactivating};

/// An answer of the agent: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentAnswer {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

fn rfc3339(m: &Model, at: Duration) -> String {
    crate::agent::rfc3339(m.wall(at))
}

fn error(id: &str, status: u16, code: &str, message: &str) -> AgentAnswer {
    AgentAnswer {
        status,
        body: json!({"requestID": format!("sim-{id}"), "error": {
            "Arn": task_arn(id), "Code": code, "Message": message,
        }}),
    }
}

/// `GET` or `PUT` on the protection endpoint of task `id`. The agent's ECS call takes
/// a token from the account's task protection bucket; an empty bucket is ECS's 400
/// `ThrottlingException`, passed on.
pub fn protection(
    m: &mut Model,
    id: &str,
    method: &str,
    body: &[u8],
    now: Duration,
) -> AgentAnswer {
    m.now = m.now.max(now);
    let arn = task_arn(id);
    let operation = if method == "GET" {
        "GetTaskProtection"
    } else {
        "UpdateTaskProtection"
    };
    if method == "GET" {
        if !m.buckets.take(operation, m.now) {
            return error(id, 400, "ThrottlingException", "Rate exceeded");
        }
        let until = m
            .task(id)
            .and_then(|t| t.protected_until)
            .filter(|u| *u > m.now);
        return AgentAnswer {
            status: 200,
            body: json!({"protection": {
                "ExpirationDate": until.map(|u| rfc3339(m, u)),
                "ProtectionEnabled": until.is_some(),
                "TaskArn": arn,
            }}),
        };
    }
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return error(id, 400, "InvalidParameterException", "Invalid request body");
    };
    if fields
        .keys()
        .any(|k| k != "ProtectionEnabled" && k != "ExpiresInMinutes")
    {
        return error(
            id,
            400,
            "InvalidParameterException",
            "Unknown field in request body",
        );
    }
    // The body is checked before ECS is called.
    if !m.buckets.take(operation, m.now) {
        return error(id, 400, "ThrottlingException", "Rate exceeded");
    }
    let enabled = fields
        .get("ProtectionEnabled")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let minutes = fields
        .get("ExpiresInMinutes")
        .and_then(Value::as_u64)
        .unwrap_or(120);
    match update_protection(m, id, enabled, minutes) {
        Ok(until) => AgentAnswer {
            status: 200,
            body: json!({"protection": {
                "ExpirationDate": until.map(|u| rfc3339(m, u)),
                "ProtectionEnabled": enabled,
                "TaskArn": arn,
            }}),
        },
        Err(reason) => AgentAnswer {
            status: 200,
            body: json!({"failure": {"Arn": arn, "Detail": null, "Reason": reason}}),
        },
    }
}

/// `GET $ECS_CONTAINER_METADATA_URI_V4/task` for task `id`; `None` for an unknown task.
///
/// The agent knows no DEACTIVATING: while ECS deregisters the task `KnownStatus`
/// stays RUNNING, and `DesiredStatus` is what the setting says (whether ECS tells the
/// agent before or after the deregistration is not documented). From SIGTERM on the
/// desired status is STOPPED.
#[must_use]
pub fn task_metadata(m: &Model, id: &str) -> Option<Value> {
    let t = m.task(id)?;
    let deactivating = t.status == Status::Deactivating;
    let tells =
        m.settings.unknowns.metadata_while_deactivating == MetadataWhileDeactivating::Stopped;
    let desired = if !t.stopping || (deactivating && !tells) {
        "RUNNING"
    } else {
        "STOPPED"
    };
    let known = match t.status {
        Status::Pending => "NONE",
        Status::Stopped => "STOPPED",
        _ => "RUNNING",
    };
    let mut container = json!({
        "Name": "app",
        "DockerName": format!("ecs-{}-app", t.id),
        "KnownStatus": known,
        "DesiredStatus": desired,
    });
    if let Some(h) = &t.health {
        container["Health"] = json!({
            "status": h.status.as_str(),
            "statusSince": rfc3339(m, h.since),
        });
    }
    let mut meta = json!({
        "Cluster": cluster_arn(),
        "TaskARN": task_arn(id),
        "Family": crate::sim::model::FAMILY,
        "Revision": t.revision.to_string(),
        "DesiredStatus": desired,
        "KnownStatus": known,
        "AvailabilityZone": t.zone,
        "Containers": [container],
    });
    match m.settings.launch {
        // As on Fargate: no ServiceName.
        Launch::Fargate => meta["LaunchType"] = json!("FARGATE"),
        Launch::Ec2 { .. } => {
            meta["LaunchType"] = json!("EC2");
            meta["Cluster"] = json!(crate::sim::model::CLUSTER);
            meta["ServiceName"] = json!(SERVICE);
        }
    }
    Some(meta)
}
