//! An ECS service on one machine, for the drain tests and benchmarks.
//!
//! The core is pure and clock-injected: a [`Model`] of what ECS knows, a scheduler
//! [`step`](scheduler::step)`(&mut Model, now) -> Vec<Effect>`, and the ECS API as
//! functions of the model ([`api::ecs`], [`api::agent`]), with the account's token
//! buckets inside. Drivers feed it time and the world's answers (a task is ready, a
//! process exited, a health check passed) and carry out its [`Effect`]s. The
//! real-time driver ([`Simulator`]) runs the service's real binary as each task, a
//! TCP load balancer in front of them, health checks over loopback and with the
//! binary's own `healthcheck` command, and an HTTP server that answers the tasks'
//! agent, metadata and ECS API calls. A driver in virtual time can run the same core
//! with thousands of tasks in one process.
//!
//! Each behaviour is one ECS documents, named here; where the documentation is silent
//! the behaviour is a setting ([`settings::Unknowns`]) with every variant.
//!
//! | Behaviour | Where | Source |
//! |---|---|---|
//! | Tasks RUNNING or PENDING ≤ maximumPercent of desired (rounded down); healthy ≥ minimumHealthyPercent (rounded up) during a deployment | [`scheduler`], [`settings`] | Developer guide, "Deploy Amazon ECS services by replacing tasks"; API reference, `DeploymentConfiguration` |
//! | Healthy = RUNNING, target healthy behind a load balancer, essential container HEALTHY where a check is defined; with no check at all, 40 s after RUNNING | [`Model::is_healthy`] | API reference, `DeploymentConfiguration.minimumHealthyPercent` |
//! | Scale-in and deployments stop only unprotected tasks; the event "was unable to scale in due to (reason N tasks under protection)" | [`scheduler`] | Developer guide, "Protect your Amazon ECS tasks from being terminated by scale-in events"; platform-facts.md |
//! | A task whose target or essential container fails its checks after `healthCheckGracePeriodSeconds` is replaced whatever its protection: replacement first when maximumPercent allows, the unhealthy task stopped once it is healthy; otherwise stopped one by one within minimumHealthyPercent | [`scheduler`] | What's new, 2023-10-23, "Amazon ECS ... start a healthy replacement for each unhealthy task"; API reference, `DeploymentConfiguration`; `CreateService.healthCheckGracePeriodSeconds` |
//! | An unhealthy task above the desired count: replaced, or only stopped | [`settings::UnhealthySurplus`] | **Not documented**: a setting |
//! | Target health: `healthy` passes in a row → healthy, `unhealthy` failures → unhealthy; no new connections to a deregistering target, its connections closed at the end of the deregistration delay; all targets unhealthy → the ALB routes to all (fail open) | [`health`], [`Model::routable`] | ELB user guide, "Health checks for Application Load Balancer target groups", "Deregistration delay" |
//! | Container health: `<binary> healthcheck` every `interval`, `timeout`, `retries` failures → UNHEALTHY, failures in `startPeriod` before a pass do not count; `healthStatus` UNKNOWN without a check | [`health`] | API reference, `HealthCheck`; the Dockerfiles and manifests (`websocket healthcheck`, `queue-consumer healthcheck`) |
//! | Stopping a task: desired STOPPED, DEACTIVATING while the target deregisters, SIGTERM after the delay (STOPPING), SIGKILL after `stopTimeout`, STOPPED at exit; `stoppedReason`, `stopCode` | [`lifecycle`] | Developer guide, "Amazon ECS task lifecycle"; platform-facts.md |
//! | Task metadata while DEACTIVATING: `KnownStatus` RUNNING (the agent has no DEACTIVATING); `DesiredStatus` RUNNING or STOPPED | [`api::agent`], [`settings::MetadataWhileDeactivating`] | amazon-ecs-agent, `ecs-agent/api/task/status/taskstatus.go`; **when ECS tells the agent is not documented**: a setting |
//! | Rollout IN_PROGRESS → COMPLETED at steady state; the circuit breaker counts tasks that never reach RUNNING and tasks replaced for failed health checks, resets on a healthy task, fails the deployment at ½ × desired (3..=200) with `rolloutStateReason`, `failedTasks`; rollback to the last COMPLETED deployment, none → stalled | [`deployments`] | Developer guide, "How the Amazon ECS deployment circuit breaker detects failures"; API reference, `ServiceDeploymentCircuitBreaker` |
//! | What a rollback runs: the old deployment's tasks kept, or new tasks of its task definition | [`settings::RollbackMode`] | **Not documented**: a setting |
//! | Blue/green: green to 100 % in the alternate target group, stages PRE_SCALE_UP … PRODUCTION_TRAFFIC_SHIFT (the listener moves) … BAKE_TIME, CLEAN_UP of blue (protected tasks waited for); rollback before CLEAN_UP moves traffic back and stops green; `ListServiceDeployments`, `DescribeServiceDeployments` with `status`, `lifecycleStage` | [`bluegreen`], [`api`] | Developer guide, "Amazon ECS blue/green service deployments workflow"; API reference, `ServiceDeployment`; task protection covers deployments |
//! | Connections a blue target already has stay when production traffic shifts, until its deregistration | [`balancer`] | **Assumed** (ALB listener rule change) |
//! | CODE_DEPLOY and EXTERNAL controllers: `taskSets`, `deployments` empty or the PRIMARY task set | [`api`], [`settings::TaskSetDeployments`] | API reference, `Service`, `TaskSet`; **what `deployments` holds is not documented**: a setting |
//! | New tasks to the zone with the fewest of the service's tasks; scale-in stops in the zone with the most (order within a zone: not documented, the oldest first) | [`zones`] | API reference, `UpdateService` |
//! | Zone rebalancing (ENABLED by default since 2025-09; not with maximumPercent 100): once steady, start in the zone with the fewest, stop in the zone with the most once the new task is HEALTHY and RUNNING; protection blocks it; whether it starts when every candidate is protected | [`zones`], [`settings::RebalancingWithProtection`] | Developer guide, "Balancing an Amazon ECS service across Availability Zones"; **the last: a setting** |
//! | EC2 container instances: `containerInstanceArn`; DRAINING → PENDING tasks stop at once, RUNNING ones replaced within minimum/maximum percent; whether protected tasks wait | [`zones`], [`settings::InstanceDraining`] | Developer guide, "Draining Amazon ECS container instances"; **the last: a setting** |
//! | DAEMON: one task per ACTIVE instance, maximumPercent 100 | [`scheduler`] | Developer guide, "Amazon ECS services", daemon |
//! | Account-wide token buckets per group of actions (service reads 100/20 s⁻¹, cluster resource reads 100/20 s⁻¹, …), `ThrottlingException` 400 `Rate exceeded`; other callers share them | [`buckets`] | API reference, "Request throttling for the Amazon ECS API" |
//! | Agent protection endpoint and metadata shapes | [`api::agent`] | platform-facts.md |
//!
//! A test configures the service with [`SimConfig::websocket`] or
//! [`SimConfig::queue_consumer`] (the deployment files' settings), `.env(...)` for the
//! binary, [`SimConfig::at_test_pace`] for checks every second, and the fields of
//! `config.ecs` ([`Settings`]) for the rest: deployment percentages, circuit breaker,
//! strategy, controller, zones, launch type, grace period, buckets and other callers,
//! and the [`settings::Unknowns`]. It then acts as ECS's users do:
//! [`Simulator::set_desired`], [`Simulator::deploy_with`] (a [`Revision`] can fail at
//! the load balancer only, or carry a failing container check), and on the model
//! [`Model::stop_task`], [`Model::drain_instance`], [`Model::roll_back`], or
//! [`Model::fault`]; [`Simulator::api`] calls the API as another caller would. It
//! reads the model: tasks (status, health, target, zone, stop reason, calls),
//! deployments (rollout, stage, failures), events, and the buckets' counts.
//!
//! - [`settings`]: what the service is configured with, the deployment files' values
//!   as defaults;
//! - [`model`]: what ECS knows; [`lifecycle`], [`health`]: a task's life and checks;
//! - [`scheduler`]: the step; [`deployments`], [`bluegreen`], [`zones`]: its parts;
//! - [`api`], [`buckets`]: the API and its throttling;
//! - [`driver`], [`server`], [`balancer`]: the real-time driver.

pub mod api;
pub mod balancer;
pub mod bluegreen;
pub mod buckets;
pub mod deployments;
pub mod driver;
pub mod effect;
pub mod fleet;
pub mod health;
pub mod lifecycle;
pub mod model;
pub mod scheduler;
pub mod server;
pub mod settings;
pub mod zones;

#[cfg(test)]
mod core_tests;
#[cfg(test)]
mod sides_zones_tests;
#[cfg(test)]
mod world;

pub use balancer::Balancer;
pub use driver::{Ready, SimConfig, Simulator};
pub use effect::{Effect, StopSignal};
pub use health::{Health, TargetState};
pub use model::{
    ApiFault, Deployment, Model, Progress, Revision, Rollout, Stage, StartReason, Status, Task,
};
pub use scheduler::step;
pub use settings::{ContainerCheck, Settings, Strategy, TargetCheck};
