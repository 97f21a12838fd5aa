//! DescribeServices, ListServiceDeployments and DescribeServiceDeployments.

use serde_json::{Value, json};

use super::{Answer, EcsError, cluster_matches, epoch, strings};
use crate::sim::bluegreen;
use crate::sim::deployments::side_by_side;
use crate::sim::health::TargetGroupRole;
use crate::sim::model::{
    Deployment, Model, Progress, Rollout, SERVICE, Stage, Status, cluster_arn, count, service_arn,
    target_group_arn, task_definition_arn,
};
use crate::sim::settings::{
    Controller, Launch, Scheduling, Settings, Strategy, TaskSetDeployments,
};

fn launch_type(m: &Model) -> &'static str {
    match m.settings.launch {
        Launch::Fargate => "FARGATE",
        Launch::Ec2 { .. } => "EC2",
    }
}

/// A deployment's tasks by `lastStatus` (wanted ones).
fn counts_of(m: &Model, id: &str) -> (u32, u32) {
    let running = m.running(Some(id));
    let pending = count(
        m.wanted()
            .filter(|t| t.deployment == id && t.status == Status::Pending),
    );
    (running, pending)
}

/// What a deployment is asked to run: the desired count for the PRIMARY one and for
/// each side kept side by side, what it still runs for the others.
fn requested(m: &Model, d: &Deployment) -> u32 {
    let kept = if side_by_side(&m.settings) {
        bluegreen::kept_sides(m).contains(&d.id)
    } else {
        d.id == m.primary
    };
    if kept { m.desired } else { m.wanted_of(&d.id) }
}

fn deployment_json(m: &Model, d: &Deployment) -> Value {
    let (running, pending) = counts_of(m, &d.id);
    json!({
        "id": d.id,
        "status": if d.id == m.primary { "PRIMARY" } else { "ACTIVE" },
        "taskDefinition": task_definition_arn(d.revision),
        "desiredCount": requested(m, d),
        "pendingCount": pending,
        "runningCount": running,
        "failedTasks": d.failures,
        "createdAt": epoch(m, d.created_at),
        "updatedAt": epoch(m, d.updated_at),
        "launchType": launch_type(m),
        "rolloutState": d.rollout.as_str(),
        "rolloutStateReason": d.reason,
    })
}

fn task_set_json(m: &Model, d: &Deployment) -> Value {
    let (running, pending) = counts_of(m, &d.id);
    let production = bluegreen::production(m) == d.id;
    let steady = running == requested(m, d) && pending == 0;
    let mut set = json!({
        "id": d.id,
        "taskSetArn": format!("{}:task-set/{}/{SERVICE}/{}", crate::sim::model::ARN_PREFIX, crate::sim::model::CLUSTER, d.id),
        "serviceArn": service_arn(),
        "clusterArn": cluster_arn(),
        "startedBy": if m.settings.controller == Controller::CodeDeploy { "CodeDeploy" } else { "sim-deployer" },
        "status": if production { "PRIMARY" } else { "ACTIVE" },
        "taskDefinition": task_definition_arn(d.revision),
        "computedDesiredCount": requested(m, d),
        "pendingCount": pending,
        "runningCount": running,
        "createdAt": epoch(m, d.created_at),
        "updatedAt": epoch(m, d.updated_at),
        "launchType": launch_type(m),
        "scale": {"value": 100.0, "unit": "PERCENT"},
        "stabilityStatus": if steady { "STEADY_STATE" } else { "STABILIZING" },
        "stabilityStatusAt": epoch(m, d.updated_at),
        "loadBalancers": [{
            "targetGroupArn": target_group_arn(if production { TargetGroupRole::Production } else { TargetGroupRole::Alternate }),
            "containerName": "app",
            "containerPort": 3000,
        }],
    });
    if m.settings.controller == Controller::External {
        set["externalId"] = json!(format!("sim-{}", &d.id[8..]));
    }
    set
}

fn deployment_configuration(m: &Model) -> Value {
    let s = &m.settings;
    let mut config = json!({
        "maximumPercent": s.maximum_percent,
        "minimumHealthyPercent": s.minimum_healthy_percent,
    });
    if s.controller == Controller::Ecs {
        config["deploymentCircuitBreaker"] = json!({
            "enable": s.circuit_breaker.is_some(),
            "rollback": s.circuit_breaker.is_some_and(|b| b.rollback),
        });
        match s.strategy {
            Strategy::Rolling => config["strategy"] = json!("ROLLING"),
            Strategy::BlueGreen { bake, .. } => {
                config["strategy"] = json!("BLUE_GREEN");
                config["bakeTimeInMinutes"] = json!(bake.as_secs().div_ceil(60));
            }
        }
    }
    config
}

fn revision_summary(m: &Model, d: &Deployment) -> Value {
    let (running, pending) = counts_of(m, &d.id);
    let mut summary = json!({
        "arn": d.revision_arn(),
        "requestedTaskCount": requested(m, d),
        "runningTaskCount": running,
        "pendingTaskCount": pending,
    });
    if matches!(m.settings.strategy, Strategy::BlueGreen { .. }) {
        let production = bluegreen::production(m) == d.id;
        summary["requestedProductionTrafficWeight"] = json!(if production { 100.0 } else { 0.0 });
        let test = d.stage.is_some_and(|(s, _)| s >= Stage::TestTrafficShift);
        summary["requestedTestTrafficWeight"] = json!(if test || production { 100.0 } else { 0.0 });
    }
    summary
}

fn service_json(m: &Model) -> Value {
    let s = &m.settings;
    let live: Vec<&Deployment> = {
        let mut live: Vec<&Deployment> = m.live_deployments().collect();
        // PRIMARY first, then the others newest first.
        live.sort_by_key(|d| (d.id != m.primary, std::cmp::Reverse(d.created_at)));
        live
    };
    let (deployments, task_sets): (Vec<Value>, Vec<Value>) = if s.controller == Controller::Ecs {
        (
            live.iter().map(|d| deployment_json(m, d)).collect(),
            Vec::new(),
        )
    } else {
        let listed = match s.unknowns.task_set_deployments {
            TaskSetDeployments::Empty => Vec::new(),
            TaskSetDeployments::Primary => live
                .iter()
                .filter(|d| d.id == m.primary)
                .map(|d| {
                    let mut j = deployment_json(m, d);
                    if let Some(o) = j.as_object_mut() {
                        o.remove("rolloutState");
                        o.remove("rolloutStateReason");
                    }
                    j
                })
                .collect(),
        };
        (listed, live.iter().map(|d| task_set_json(m, d)).collect())
    };
    let pending = count(m.wanted().filter(|t| t.status == Status::Pending));
    let events: Vec<Value> = m
        .events
        .iter()
        .enumerate()
        .rev()
        .take(100)
        .map(|(i, (at, message))| {
            json!({"id": format!("{i:08x}-0000-4000-8000-000000000000"), "createdAt": epoch(m, *at), "message": message})
        })
        .collect();
    let mut service = json!({
        "serviceArn": service_arn(),
        "serviceName": SERVICE,
        "clusterArn": cluster_arn(),
        "status": "ACTIVE",
        "desiredCount": m.desired,
        "runningCount": m.running(None),
        "pendingCount": pending,
        "launchType": launch_type(m),
        "taskDefinition": task_definition_arn(m.primary().revision),
        "deploymentConfiguration": deployment_configuration(m),
        "deployments": deployments,
        "events": events,
        "createdAt": epoch(m, std::time::Duration::ZERO),
        "schedulingStrategy": if s.scheduling == Scheduling::Daemon { "DAEMON" } else { "REPLICA" },
        "deploymentController": {"type": s.controller.as_str()},
        "availabilityZoneRebalancing": if s.rebalancing { "ENABLED" } else { "DISABLED" },
    });
    if !task_sets.is_empty() {
        service["taskSets"] = json!(task_sets);
    }
    if s.target_group.is_some() {
        service["healthCheckGracePeriodSeconds"] = json!(s.health_check_grace.as_secs());
        service["loadBalancers"] = json!([{
            "targetGroupArn": target_group_arn(TargetGroupRole::Production),
            "containerName": "app",
            "containerPort": 3000,
        }]);
    }
    if s.controller == Controller::Ecs {
        service["currentServiceDeployment"] = json!(m.primary().arn());
        service["currentServiceRevisions"] = json!(
            live.iter()
                .map(|d| {
                    let (running, pending) = counts_of(m, &d.id);
                    json!({"arn": d.revision_arn(), "requestedTaskCount": requested(m, d), "runningTaskCount": running, "pendingTaskCount": pending})
                })
                .collect::<Vec<_>>()
        );
    }
    service
}

fn service_matches(name: &str) -> bool {
    name == SERVICE || name == service_arn()
}

pub(super) fn describe_services(m: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let mut services = Vec::new();
    let mut failures = Vec::new();
    for name in strings(&body["services"]) {
        if service_matches(&name) {
            services.push(service_json(m));
        } else {
            failures.push(json!({"arn": name, "reason": "MISSING"}));
        }
    }
    Ok(json!({"services": services, "failures": failures}))
}

/// The service deployments ECS reports: those of the ECS controller (rolling and
/// blue/green), newest first. The task-set controllers have none.
fn service_deployments(m: &Model) -> Vec<&Deployment> {
    if m.settings.controller != Controller::Ecs {
        return Vec::new();
    }
    let mut all: Vec<&Deployment> = m.deployments.iter().collect();
    all.sort_by_key(|d| std::cmp::Reverse(d.created_at));
    all
}

fn brief(m: &Model, d: &Deployment) -> Value {
    let mut b = json!({
        "serviceDeploymentArn": d.arn(),
        "serviceArn": service_arn(),
        "clusterArn": cluster_arn(),
        "createdAt": epoch(m, d.created_at),
        "startedAt": epoch(m, d.created_at),
        "targetServiceRevisionArn": d.revision_arn(),
        "status": d.progress.as_str(),
    });
    if let Some(at) = d.finished_at.filter(|_| d.progress != Progress::InProgress) {
        b["finishedAt"] = json!(epoch(m, at));
    }
    if !d.reason.is_empty() {
        b["statusReason"] = json!(d.reason);
    }
    b
}

pub(super) fn list_service_deployments(m: &Model, body: &Value) -> Answer {
    cluster_matches(body)?;
    let service = body["service"].as_str().unwrap_or_default();
    if !service_matches(service) {
        return Err(EcsError::new(
            "ServiceNotFoundException",
            "Service not found.",
        ));
    }
    let statuses = strings(&body["status"]);
    let after = body["createdAt"]["after"].as_f64();
    let before = body["createdAt"]["before"].as_f64();
    let max = body["maxResults"].as_u64().unwrap_or(20).clamp(1, 100) as usize;
    let matching: Vec<Value> = service_deployments(m)
        .into_iter()
        .filter(|d| statuses.is_empty() || statuses.iter().any(|s| s == d.progress.as_str()))
        .filter(|d| after.is_none_or(|a| epoch(m, d.created_at) >= a))
        .filter(|d| before.is_none_or(|b| epoch(m, d.created_at) <= b))
        .map(|d| brief(m, d))
        .collect();
    let start = body["nextToken"]
        .as_str()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(0);
    let page: Vec<&Value> = matching.iter().skip(start).take(max).collect();
    let mut answer = json!({"serviceDeployments": page});
    if start + max < matching.len() {
        answer["nextToken"] = json!((start + max).to_string());
    }
    Ok(answer)
}

fn breaker_json(m: &Model, d: &Deployment) -> Value {
    let Some(_) = m.settings.circuit_breaker else {
        return json!({"status": "DISABLED", "failureCount": 0, "threshold": 0});
    };
    let status = match d.rollout {
        Rollout::Failed => "TRIGGERED",
        Rollout::Completed => "MONITORING_COMPLETE",
        Rollout::InProgress => "MONITORING",
    };
    json!({
        "status": status,
        "failureCount": d.failures,
        "threshold": Settings::circuit_breaker_threshold(m.desired),
    })
}

fn full(m: &Model, d: &Deployment) -> Value {
    let mut full = brief(m, d);
    full["updatedAt"] = json!(epoch(m, d.updated_at));
    full["sourceServiceRevisions"] = json!(
        d.source
            .iter()
            .filter_map(|s| m.deployment(s))
            .map(|s| revision_summary(m, s))
            .collect::<Vec<_>>()
    );
    full["targetServiceRevision"] = revision_summary(m, d);
    full["deploymentConfiguration"] = deployment_configuration(m);
    full["deploymentCircuitBreaker"] = breaker_json(m, d);
    if let Some((stage, _)) = d.stage {
        full["lifecycleStage"] = json!(stage.as_str());
    }
    if let Some(r) = &d.rollback {
        let to = m
            .deployment(&r.to)
            .map(Deployment::revision_arn)
            .unwrap_or_default();
        full["rollback"] = json!({
            "reason": r.reason,
            "startedAt": epoch(m, r.started_at),
            "serviceRevisionArn": to,
        });
    }
    full
}

pub(super) fn describe_service_deployments(m: &Model, body: &Value) -> Answer {
    let arns = strings(&body["serviceDeploymentArns"]);
    if arns.is_empty() || arns.len() > 20 {
        return Err(EcsError::new(
            "InvalidParameterException",
            "serviceDeploymentArns must have 1 to 20 elements",
        ));
    }
    let known = service_deployments(m);
    let mut found = Vec::new();
    let mut failures = Vec::new();
    for arn in arns {
        match known.iter().find(|d| d.arn() == arn) {
            Some(d) => found.push(full(m, d)),
            None => failures.push(json!({"arn": arn, "reason": "MISSING"})),
        }
    }
    Ok(json!({"serviceDeployments": found, "failures": failures}))
}
