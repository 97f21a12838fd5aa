//! ListTasks, DescribeTasks, DescribeContainerInstances, StopTask,
//! UpdateTaskProtection and GetTaskProtection.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Answer, EcsError, cluster_matches, epoch, strings};
use crate::sim::model::{
    InstanceStatus, Model, SERVICE, Status, Task, cluster_arn, count, task_arn, task_definition_arn,
};

/// ListTasks returns at most this many ARNs a page.
const PAGE: usize = 100;

pub(super) fn list_tasks(m: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    if let Some(name) = body["serviceName"].as_str()
        && name != SERVICE
        && name != crate::sim::model::service_arn()
    {
        return Err(EcsError::new(
            "ServiceNotFoundException",
            "Service not found.",
        ));
    }
    // ECS's default filter is RUNNING.
    let stopped = body["desiredStatus"].as_str() == Some("STOPPED");
    let instance = body["containerInstance"].as_str();
    let started_by = body["startedBy"].as_str();
    let max = body["maxResults"]
        .as_u64()
        .map_or(PAGE, |n| usize::try_from(n).unwrap_or(PAGE).clamp(1, PAGE));
    let arns: Vec<String> = m
        .tasks
        .iter()
        .filter(|t| t.wanted() != stopped)
        .filter(|t| {
            instance.is_none_or(|i| {
                t.instance
                    .as_deref()
                    .is_some_and(|a| a == i || a.ends_with(i))
            })
        })
        .filter(|t| started_by.is_none_or(|s| t.deployment == s))
        .map(|t| task_arn(&t.id))
        .collect();
    let start = body["nextToken"]
        .as_str()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(0);
    let page: Vec<&String> = arns.iter().skip(start).take(max).collect();
    let mut answer = json!({"taskArns": page});
    if start + max < arns.len() {
        answer["nextToken"] = json!((start + max).to_string());
    }
    Ok(answer)
}

/// A task, as DescribeTasks describes it.
pub(super) fn task_json(m: &Model, t: &Task) -> Value {
    let container_status = match t.status {
        Status::Pending => "PENDING",
        Status::Stopped => "STOPPED",
        _ => "RUNNING",
    };
    let mut container = json!({
        "containerArn": format!("{}:container/{}/{}/0000aaaa-0000-4000-8000-{:012x}", crate::sim::model::ARN_PREFIX, crate::sim::model::CLUSTER, t.id, t.revision),
        "taskArn": task_arn(&t.id),
        "name": "app",
        "lastStatus": container_status,
        "healthStatus": t.health_status().as_str(),
    });
    if let Some(code) = t.exit_code {
        container["exitCode"] = json!(code);
    }
    let mut task = json!({
        "taskArn": task_arn(&t.id),
        "clusterArn": cluster_arn(),
        "taskDefinitionArn": task_definition_arn(t.revision),
        "group": format!("service:{SERVICE}"),
        "startedBy": t.deployment,
        "lastStatus": t.status.as_str(),
        "desiredStatus": if t.wanted() { "RUNNING" } else { "STOPPED" },
        "healthStatus": t.health_status().as_str(),
        "availabilityZone": t.zone,
        "createdAt": epoch(m, t.created_at),
        "connectivity": "CONNECTED",
        "cpu": "256",
        "memory": "512",
        "version": 1 + u32::from(t.started_at.is_some()) + u32::from(t.stopping) + u32::from(!t.alive()),
        "containers": [container],
    });
    match &t.instance {
        Some(arn) => {
            task["launchType"] = json!("EC2");
            task["containerInstanceArn"] = json!(arn);
        }
        None => {
            task["launchType"] = json!("FARGATE");
            task["platformVersion"] = json!("1.4.0");
            task["platformFamily"] = json!("Linux");
        }
    }
    if let Some(at) = t.started_at {
        task["startedAt"] = json!(epoch(m, at));
    }
    if let Some(stop) = &t.stop {
        task["stoppingAt"] = json!(epoch(m, stop.at));
        task["stoppedReason"] = json!(stop.reason.text());
        task["stopCode"] = json!(stop.reason.code());
    }
    if let Some(at) = t.stopped_at {
        task["stoppedAt"] = json!(epoch(m, at));
        task["executionStoppedAt"] = json!(epoch(m, at));
    }
    task
}

pub(super) fn describe_tasks(m: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let arns = strings(&body["tasks"]);
    if arns.len() > 100 {
        return Err(EcsError::new(
            "InvalidParameterException",
            "Tasks cannot have more than 100 elements",
        ));
    }
    let mut tasks = Vec::new();
    let mut failures = Vec::new();
    for arn in arns {
        match m.task_by_arn(&arn) {
            Some(t) => tasks.push(task_json(m, t)),
            None => failures.push(json!({"arn": arn, "reason": "MISSING"})),
        }
    }
    Ok(json!({"tasks": tasks, "failures": failures}))
}

pub(super) fn describe_container_instances(m: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let arns = strings(&body["containerInstances"]);
    if arns.len() > 100 {
        return Err(EcsError::new(
            "InvalidParameterException",
            "ContainerInstances cannot have more than 100 elements",
        ));
    }
    let mut found = Vec::new();
    let mut failures = Vec::new();
    for arn in arns {
        let Some(i) = m
            .instances
            .iter()
            .find(|i| i.arn == arn || i.arn.ends_with(&format!("/{arn}")))
        else {
            failures.push(json!({"arn": arn, "reason": "MISSING"}));
            continue;
        };
        let on = |status: Status| {
            count(
                m.tasks
                    .iter()
                    .filter(|t| t.instance.as_deref() == Some(&i.arn) && t.status == status),
            )
        };
        found.push(json!({
            "containerInstanceArn": i.arn,
            "ec2InstanceId": i.ec2_id,
            "status": match i.status {
                InstanceStatus::Active => "ACTIVE",
                InstanceStatus::Draining => "DRAINING",
            },
            "agentConnected": true,
            "runningTasksCount": on(Status::Running) + on(Status::Deactivating) + on(Status::Stopping),
            "pendingTasksCount": on(Status::Pending),
            "registeredAt": epoch(m, i.registered_at),
            "versionInfo": {"agentVersion": "1.105.0", "agentHash": "00000000", "dockerVersion": "DockerVersion: 25.0.8"},
            "attributes": [{"name": "ecs.availability-zone", "value": i.zone}],
            "capacityProviderName": "sim-capacity",
        }));
    }
    Ok(json!({"containerInstances": found, "failures": failures}))
}

pub(super) fn stop_task(m: &mut Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let arn = body["task"].as_str().unwrap_or_default();
    let Some(id) = m.task_by_arn(arn).map(|t| t.id.clone()) else {
        return Err(EcsError::new(
            "InvalidParameterException",
            "The referenced task was not found.",
        ));
    };
    let reason = body["reason"]
        .as_str()
        .unwrap_or("Task stopped by user")
        .to_owned();
    m.stop_task(&id, &reason);
    let task = m.task(&id).map(|t| task_json(m, t)).unwrap_or_default();
    Ok(json!({"task": task}))
}

/// ECS's UpdateTaskProtection for one task. An enable is refused with
/// `DEPLOYMENT_BLOCKED` when the service already has as many protected tasks as it
/// wants; a task already protected may always extend.
pub(crate) fn update_protection(
    m: &mut Model,
    id: &str,
    enabled: bool,
    minutes: u64,
) -> Result<Option<Duration>, &'static str> {
    let now = m.now;
    let desired = m.desired;
    let others = count(
        m.tasks
            .iter()
            .filter(|t| t.id != id && t.wanted() && t.protected(now)),
    );
    let Some(task) = m.task_mut(id) else {
        return Err("TASK_NOT_VALID");
    };
    task.agent_puts += 1;
    if !enabled {
        task.protected_until = None;
        return Ok(None);
    }
    if !task.protected(now) && others >= desired {
        m.blocked += 1;
        return Err("DEPLOYMENT_BLOCKED");
    }
    let until = now + Duration::from_secs(minutes * 60);
    task.protected_until = Some(until);
    Ok(Some(until))
}

pub(super) fn update_task_protection(m: &mut Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let enabled = body["protectionEnabled"].as_bool().unwrap_or(false);
    let minutes = body["expiresInMinutes"].as_u64().unwrap_or(120);
    let arns = strings(&body["tasks"]);
    if arns.len() > 10 {
        return Err(EcsError::new(
            "InvalidParameterException",
            "Tasks cannot have more than 10 elements",
        ));
    }
    let mut protected = Vec::new();
    let mut failures = Vec::new();
    for arn in arns {
        let Some(id) = m.task_by_arn(&arn).map(|t| t.id.clone()) else {
            failures.push(json!({"arn": arn, "reason": "MISSING"}));
            continue;
        };
        match update_protection(m, &id, enabled, minutes) {
            Ok(until) => protected.push(json!({
                "taskArn": arn,
                "protectionEnabled": enabled,
                "expirationDate": until.map(|u| epoch(m, u)),
            })),
            Err(reason) => failures.push(json!({"arn": arn, "reason": reason})),
        }
    }
    Ok(json!({"protectedTasks": protected, "failures": failures}))
}

pub(super) fn get_task_protection(m: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let now = m.now;
    let mut protected = Vec::new();
    let mut failures = Vec::new();
    for arn in strings(&body["tasks"]) {
        match m.task_by_arn(&arn) {
            Some(t) => {
                let until = t.protected_until.filter(|u| *u > now);
                protected.push(json!({
                    "taskArn": task_arn(&t.id),
                    "protectionEnabled": until.is_some(),
                    "expirationDate": until.map(|u| epoch(m, u)),
                }));
            }
            None => failures.push(json!({"arn": arn, "reason": "MISSING"})),
        }
    }
    Ok(json!({"protectedTasks": protected, "failures": failures}))
}
