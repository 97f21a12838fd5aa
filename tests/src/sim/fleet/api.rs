//! The drain's ECS calls answered in process by the simulator's API ([`api::ecs`]):
//! the same JSON the HTTP server sends, read the way the drain's aws-sdk-ecs client
//! reads it (its fields and their meanings are tested against the real SDK in
//! `crates/task-protection/tests/drain_ecs.rs` and against this simulator's HTTP server
//! in the drain's end-to-end tests), with no socket, so that thousands of tasks run in
//! one process on paused time.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use task_protection::drain::{
    ApiError, Controller, DeploymentFacts, Health, Rollout, ServiceApi, ServiceFacts, ShiftFacts,
    Strategy, TaskFacts,
};

use crate::sim::api::{self, Caller};
use crate::sim::model::Model;

/// One simulated task's ECS client.
#[derive(Debug, Clone)]
pub struct FleetApi {
    pub(super) model: Arc<Mutex<Model>>,
    pub(super) task: String,
    pub(super) start: tokio::time::Instant,
    /// The share of calls throttled besides the buckets' own throttling (a busy
    /// account), counted in `throttled`.
    pub(super) throttle: f64,
    pub(super) counts: Arc<Mutex<Counts>>,
}

/// The drain's calls, all tasks together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Calls made, by operation.
    pub calls: std::collections::BTreeMap<&'static str, u64>,
    /// Of those, throttled (by the buckets or the injected share).
    pub throttled: u64,
}

fn secs(value: &Value) -> Option<SystemTime> {
    value
        .as_f64()
        .filter(|s| *s >= 0.0)
        .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s))
}

fn count(value: &Value) -> u32 {
    value
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0)
}

fn text(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

impl FleetApi {
    fn call(&self, operation: &'static str, body: &Value) -> Result<Value, ApiError> {
        let injected = self.throttle > 0.0 && rand::random_bool(self.throttle);
        let answer = if injected {
            Err(api::EcsError::throttled())
        } else {
            let now = self.start.elapsed();
            let mut m = self.model.lock().unwrap_or_else(PoisonError::into_inner);
            api::ecs(&mut m, Caller::Task(&self.task), operation, body, now)
        };
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.calls.entry(operation).or_default() += 1;
        answer.map_err(|e| {
            let text = format!("{operation}: {}: {}", e.code, e.message);
            match e.code.as_str() {
                "ThrottlingException" => {
                    counts.throttled += 1;
                    ApiError::Throttled(text)
                }
                "AccessDeniedException" => ApiError::Denied(text),
                _ => ApiError::Refused(text),
            }
        })
    }
}

fn deployment(d: &Value) -> Result<DeploymentFacts, ApiError> {
    Ok(DeploymentFacts {
        id: text(&d["id"]).ok_or_else(|| ApiError::Malformed("a deployment without id".into()))?,
        primary: d["status"] == "PRIMARY",
        task_definition: text(&d["taskDefinition"]).unwrap_or_default(),
        desired: count(&d["desiredCount"]),
        running: count(&d["runningCount"]),
        pending: count(&d["pendingCount"]),
        failed_tasks: count(&d["failedTasks"]),
        rollout: Rollout::parse(d["rolloutState"].as_str()),
        created_at: secs(&d["createdAt"]),
    })
}

fn task(t: &Value) -> Result<TaskFacts, ApiError> {
    Ok(TaskFacts {
        arn: text(&t["taskArn"])
            .ok_or_else(|| ApiError::Malformed("a task without taskArn".into()))?,
        group: text(&t["group"]),
        deployment: text(&t["startedBy"]),
        task_definition: text(&t["taskDefinitionArn"]),
        running: t["lastStatus"] == "RUNNING",
        stopping: t["desiredStatus"] == "STOPPED",
        health: Health::parse(t["healthStatus"].as_str()),
        started_at: secs(&t["startedAt"]),
        zone: text(&t["availabilityZone"]),
        instance: text(&t["containerInstanceArn"]),
    })
}

impl ServiceApi for FleetApi {
    async fn describe_service(
        &self,
        cluster: &str,
        service: &str,
    ) -> Result<ServiceFacts, ApiError> {
        let answer = self.call(
            "DescribeServices",
            &json!({"cluster": cluster, "services": [service]}),
        )?;
        let s = &answer["services"][0];
        if s.is_null() {
            return Err(ApiError::Refused(format!("{service}: MISSING")));
        }
        let config = &s["deploymentConfiguration"];
        Ok(ServiceFacts {
            desired: count(&s["desiredCount"]),
            running: count(&s["runningCount"]),
            pending: count(&s["pendingCount"]),
            daemon: s["schedulingStrategy"] == "DAEMON",
            controller: Controller::parse(s["deploymentController"]["type"].as_str()),
            strategy: Strategy::parse(config["strategy"].as_str()),
            minimum_healthy_percent: config["minimumHealthyPercent"]
                .as_u64()
                .map_or(100, |p| u32::try_from(p).unwrap_or(100)),
            maximum_percent: config["maximumPercent"]
                .as_u64()
                .map_or(200, |p| u32::try_from(p).unwrap_or(200)),
            grace: Duration::from_secs(s["healthCheckGracePeriodSeconds"].as_u64().unwrap_or(0)),
            deployments: s["deployments"]
                .as_array()
                .map(|a| a.iter().map(deployment).collect::<Result<_, _>>())
                .transpose()?
                .unwrap_or_default(),
            current_deployment: text(&s["currentServiceDeployment"]),
            load_balanced: s["loadBalancers"].as_array().is_some_and(|a| !a.is_empty()),
        })
    }

    async fn list_tasks(
        &self,
        cluster: &str,
        service: &str,
        stopped: bool,
        next: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        let desired = if stopped { "STOPPED" } else { "RUNNING" };
        let mut body =
            json!({"cluster": cluster, "serviceName": service, "desiredStatus": desired});
        if let Some(next) = next {
            body["nextToken"] = json!(next);
        }
        let answer = self.call("ListTasks", &body)?;
        let arns = answer["taskArns"]
            .as_array()
            .map(|a| a.iter().filter_map(text).collect())
            .unwrap_or_default();
        Ok((arns, text(&answer["nextToken"])))
    }

    async fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
    ) -> Result<Vec<TaskFacts>, ApiError> {
        let answer = self.call("DescribeTasks", &json!({"cluster": cluster, "tasks": arns}))?;
        answer["tasks"]
            .as_array()
            .map(|a| a.iter().map(task).collect())
            .unwrap_or_else(|| Ok(Vec::new()))
    }

    async fn draining_instances(
        &self,
        cluster: &str,
        instances: &[String],
    ) -> Result<BTreeSet<String>, ApiError> {
        let answer = self.call(
            "DescribeContainerInstances",
            &json!({"cluster": cluster, "containerInstances": instances}),
        )?;
        Ok(answer["containerInstances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["status"] == "DRAINING")
                    .filter_map(|i| text(&i["containerInstanceArn"]))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn service_deployment(&self, arn: &str) -> Result<ShiftFacts, ApiError> {
        let answer = self.call(
            "DescribeServiceDeployments",
            &json!({"serviceDeploymentArns": [arn]}),
        )?;
        let d = &answer["serviceDeployments"][0];
        Ok(ShiftFacts {
            status: text(&d["status"]).unwrap_or_default(),
            stage: text(&d["lifecycleStage"]),
        })
    }
}
