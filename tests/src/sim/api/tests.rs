//! The answers in the real shapes: read back through aws-sdk-ecs over the HTTP
//! server, as the drain watcher reads them; and the throttling, the stopping task and
//! the task metadata as pure functions.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ecs::error::ProvideErrorMetadata;
use serde_json::json;

use super::{Caller, ecs};
use crate::sim::core_tests::fast;
use crate::sim::driver::{Clock, Shared};
use crate::sim::model::{CLUSTER, Model, Revision, SERVICE, Stage, task_arn};
use crate::sim::server::Server;
use crate::sim::settings::{
    Controller, Launch, MetadataWhileDeactivating, Settings, Strategy, TaskSetDeployments,
};
use crate::sim::world::World;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

async fn client_for(model: Model) -> (aws_sdk_ecs::Client, Shared, Server) {
    let shared = Shared::new(model);
    let server = Server::start(shared.clone(), Arc::new(Clock::started())).await;
    let conf = aws_sdk_ecs::Config::builder()
        .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
        .region(aws_sdk_ecs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ecs::config::Credentials::new(
            "testing", "testing", None, None, "sim",
        ))
        .endpoint_url(server.other_endpoint())
        .retry_config(aws_sdk_ecs::config::retry::RetryConfig::disabled())
        .build();
    (aws_sdk_ecs::Client::from_conf(conf), shared, server)
}

#[tokio::test]
async fn a_rolling_deployment_under_way_reads_back_through_the_sdk() {
    let mut s = fast(2);
    s.launch = Launch::Ec2 {
        instances_per_zone: 1,
    };
    let mut w = World::steady(s);
    let new = w.m.deploy(Revision {
        target_port_wrong: true,
        ..Revision::default()
    });
    // New tasks running, their targets failing: one failure counted.
    w.run_until(secs(30), |m| m.deployment(&new).unwrap().failures >= 1);
    let (client, _model, _server) = client_for(w.m).await;

    let services = client
        .describe_services()
        .cluster(CLUSTER)
        .services(SERVICE)
        .send()
        .await
        .expect("DescribeServices parses");
    let service = &services.services()[0];
    assert_eq!(service.desired_count(), 2);
    assert_eq!(
        service.deployment_controller().unwrap().r#type().as_str(),
        "ECS"
    );
    let config = service.deployment_configuration().unwrap();
    assert_eq!(
        (config.maximum_percent(), config.minimum_healthy_percent()),
        (Some(200), Some(100))
    );
    assert_eq!(config.strategy().unwrap().as_str(), "ROLLING");
    assert!(config.deployment_circuit_breaker().unwrap().rollback());
    assert_eq!(
        service.availability_zone_rebalancing().unwrap().as_str(),
        "ENABLED"
    );
    assert_eq!(service.health_check_grace_period_seconds(), Some(3));
    let deployments = service.deployments();
    assert_eq!(deployments.len(), 2);
    assert_eq!(deployments[0].id(), Some(new.as_str()));
    assert_eq!(deployments[0].status(), Some("PRIMARY"));
    assert_eq!(
        deployments[0].rollout_state().unwrap().as_str(),
        "IN_PROGRESS"
    );
    assert!(deployments[0].failed_tasks() >= 1);
    assert_eq!(deployments[1].status(), Some("ACTIVE"));

    let arns = client
        .list_tasks()
        .cluster(CLUSTER)
        .service_name(SERVICE)
        .desired_status(aws_sdk_ecs::types::DesiredStatus::Running)
        .send()
        .await
        .expect("ListTasks parses");
    let arns = arns.task_arns().to_vec();
    assert!(arns.len() >= 3, "{arns:?}");
    let tasks = client
        .describe_tasks()
        .cluster(CLUSTER)
        .set_tasks(Some(arns))
        .send()
        .await
        .expect("DescribeTasks parses");
    for t in tasks.tasks() {
        assert_eq!(t.group(), Some(format!("service:{SERVICE}").as_str()));
        assert!(t.started_by().is_some_and(|s| s.starts_with("ecs-svc/")));
        assert!(
            t.availability_zone()
                .is_some_and(|z| z.starts_with("us-east-1"))
        );
        assert!(t.container_instance_arn().is_some());
        // The containers of the new tasks pass their checks, though their targets
        // fail: never UNHEALTHY (UNKNOWN only before their first check).
        assert_ne!(t.health_status().unwrap().as_str(), "UNHEALTHY");
        assert_eq!(t.containers()[0].health_status(), t.health_status());
    }
    let healthy = tasks
        .tasks()
        .iter()
        .filter(|t| {
            t.health_status().is_some_and(|h| h.as_str() == "HEALTHY") && t.started_at().is_some()
        })
        .count();
    assert!(healthy >= 3, "{healthy}");
    let instance = tasks.tasks()[0]
        .container_instance_arn()
        .unwrap()
        .to_owned();
    let instances = client
        .describe_container_instances()
        .cluster(CLUSTER)
        .container_instances(&instance)
        .send()
        .await
        .expect("DescribeContainerInstances parses");
    let i = &instances.container_instances()[0];
    assert_eq!(i.status(), Some("ACTIVE"));
    assert!(i.running_tasks_count() >= 1);

    let deployments = client
        .list_service_deployments()
        .cluster(CLUSTER)
        .service(SERVICE)
        .send()
        .await
        .expect("ListServiceDeployments parses");
    let briefs = deployments.service_deployments();
    assert_eq!(briefs.len(), 2);
    assert_eq!(briefs[0].status().unwrap().as_str(), "IN_PROGRESS");
    assert_eq!(briefs[1].status().unwrap().as_str(), "SUCCESSFUL");
    let full = client
        .describe_service_deployments()
        .service_deployment_arns(briefs[0].service_deployment_arn().unwrap())
        .send()
        .await
        .expect("DescribeServiceDeployments parses");
    let d = &full.service_deployments()[0];
    assert_eq!(d.status().unwrap().as_str(), "IN_PROGRESS");
    assert_eq!(d.source_service_revisions().len(), 1);
    let breaker = d.deployment_circuit_breaker().unwrap();
    assert_eq!(breaker.threshold(), 3);
    assert_eq!(breaker.status().unwrap().as_str(), "MONITORING");

    let stopped = client
        .stop_task()
        .cluster(CLUSTER)
        .task(tasks.tasks()[0].task_arn().unwrap())
        .send()
        .await
        .expect("StopTask parses");
    let t = stopped.task().unwrap();
    assert_eq!(
        (t.last_status(), t.desired_status()),
        (Some("DEACTIVATING"), Some("STOPPED"))
    );
    assert_eq!(t.stop_code().unwrap().as_str(), "UserInitiated");
}

#[tokio::test]
async fn a_blue_green_deployment_reports_its_lifecycle_stage() {
    let mut s = fast(1);
    s.strategy = Strategy::BlueGreen {
        bake: secs(30),
        stage: secs(1),
    };
    let mut w = World::steady(s);
    let green = w.m.deploy(Revision::default());
    w.run_until(secs(60), |m| {
        m.deployment(&green)
            .and_then(|d| d.stage)
            .is_some_and(|(s, _)| s == Stage::BakeTime)
    });
    let arn = w.m.deployment(&green).unwrap().arn();
    let (client, _model, _server) = client_for(w.m).await;
    let full = client
        .describe_service_deployments()
        .service_deployment_arns(&arn)
        .send()
        .await
        .expect("DescribeServiceDeployments parses");
    let d = &full.service_deployments()[0];
    assert_eq!(d.lifecycle_stage().unwrap().as_str(), "BAKE_TIME");
    assert_eq!(d.status().unwrap().as_str(), "IN_PROGRESS");
    let target = d.target_service_revision().unwrap();
    assert_eq!(target.requested_production_traffic_weight(), Some(100.0));
    let source = &d.source_service_revisions()[0];
    assert_eq!(source.requested_production_traffic_weight(), Some(0.0));
    let services = client
        .describe_services()
        .cluster(CLUSTER)
        .services(SERVICE)
        .send()
        .await
        .unwrap();
    let config = services.services()[0].deployment_configuration().unwrap();
    assert_eq!(config.strategy().unwrap().as_str(), "BLUE_GREEN");
    assert_eq!(config.bake_time_in_minutes(), Some(1));
}

#[tokio::test]
async fn task_set_controllers_have_task_sets_and_possibly_no_deployments() {
    for (controller, listed) in [
        (Controller::CodeDeploy, TaskSetDeployments::Empty),
        (Controller::External, TaskSetDeployments::Primary),
    ] {
        let mut s = fast(1);
        s.controller = controller;
        s.unknowns.task_set_deployments = listed;
        let mut w = World::steady(s);
        w.m.deploy(Revision::default());
        w.run(secs(3));
        let (client, _model, _server) = client_for(w.m).await;
        let services = client
            .describe_services()
            .cluster(CLUSTER)
            .services(SERVICE)
            .send()
            .await
            .expect("DescribeServices parses");
        let service = &services.services()[0];
        assert_eq!(
            service.deployment_controller().unwrap().r#type().as_str(),
            controller.as_str()
        );
        let sets = service.task_sets();
        assert_eq!(sets.len(), 2);
        assert_eq!(
            sets.iter()
                .filter(|s| s.status() == Some("PRIMARY"))
                .count(),
            1
        );
        assert!(sets.iter().all(|s| s.scale().is_some()));
        let expected = usize::from(listed == TaskSetDeployments::Primary);
        assert_eq!(service.deployments().len(), expected);
        let deployments = client
            .list_service_deployments()
            .cluster(CLUSTER)
            .service(SERVICE)
            .send()
            .await
            .unwrap();
        assert!(deployments.service_deployments().is_empty());
    }
}

#[tokio::test]
async fn an_empty_bucket_is_a_throttling_exception_through_the_sdk() {
    let w = World::steady(fast(1));
    let (client, model, _server) = client_for(w.m).await;
    let mut throttled = 0;
    for _ in 0..130 {
        if let Err(e) = client
            .describe_services()
            .cluster(CLUSTER)
            .services(SERVICE)
            .send()
            .await
        {
            let e = e.into_service_error();
            assert_eq!(e.code(), Some("ThrottlingException"));
            assert_eq!(e.message(), Some("Rate exceeded"));
            throttled += 1;
        }
    }
    // 100 tokens and a refill of 20 a second: most of the rest are refused.
    assert!(throttled >= 10, "{throttled}");
    let m = model.lock();
    let bucket = m.buckets.bucket("Service read actions").unwrap();
    assert_eq!(bucket.throttled, throttled);
}

#[test]
fn calls_are_counted_per_task_and_per_operation_throttled_ones_too() {
    let mut w = World::steady(fast(1));
    let id = w.wanted()[0].clone();
    let now = w.now();
    let body = json!({"cluster": CLUSTER, "services": [SERVICE]});
    for _ in 0..105 {
        let _ = ecs(&mut w.m, Caller::Task(&id), "DescribeServices", &body, now);
    }
    let t = w.m.task(&id).unwrap();
    assert_eq!(t.api_calls["DescribeServices"], 105);
    assert_eq!(t.throttled, 5);
}

#[test]
fn a_task_ecs_is_stopping_says_so_in_describe_tasks_and_its_metadata_as_set() {
    for (setting, desired) in [
        (MetadataWhileDeactivating::Running, "RUNNING"),
        (MetadataWhileDeactivating::Stopped, "STOPPED"),
    ] {
        let mut s = fast(2);
        s.unknowns.metadata_while_deactivating = setting;
        let mut w = World::steady(s);
        let id = w.wanted()[0].clone();
        w.m.set_desired(1);
        w.tick();
        let now = w.now();
        let body = json!({"cluster": CLUSTER, "tasks": [task_arn(&id)]});
        let answer = ecs(&mut w.m, Caller::Task(&id), "DescribeTasks", &body, now).unwrap();
        let t = &answer["tasks"][0];
        assert_eq!(t["lastStatus"], "DEACTIVATING");
        assert_eq!(t["desiredStatus"], "STOPPED");
        assert!(
            t["stoppedReason"]
                .as_str()
                .unwrap()
                .starts_with("Scaling activity initiated by")
        );
        let meta = super::agent::task_metadata(&w.m, &id).unwrap();
        assert_eq!(meta["KnownStatus"], "RUNNING");
        assert_eq!(meta["DesiredStatus"], desired, "{setting:?}");
        assert_eq!(meta["Containers"][0]["Health"]["status"], "HEALTHY");
        // ListTasks no longer lists it among the RUNNING ones.
        let listed = ecs(
            &mut w.m,
            Caller::Other,
            "ListTasks",
            &json!({"cluster": CLUSTER, "serviceName": SERVICE}),
            now,
        )
        .unwrap();
        assert!(
            !listed["taskArns"]
                .as_array()
                .unwrap()
                .contains(&json!(task_arn(&id)))
        );
        // After SIGTERM the agent knows.
        w.run(secs(3));
        let meta = super::agent::task_metadata(&w.m, &id).unwrap();
        assert_eq!(meta["DesiredStatus"], "STOPPED");
    }
}

#[test]
fn the_agent_passes_on_throttling_and_refuses_unknown_fields() {
    let mut w = World::steady(Settings::queue_consumer(1));
    let id = w.wanted()[0].clone();
    let now = w.now();
    let bad = super::agent::protection(
        &mut w.m,
        &id,
        "PUT",
        br#"{"ProtectionEnabled":true,"x":1}"#,
        now,
    );
    assert_eq!(
        (bad.status, bad.body["error"]["Code"].clone()),
        (400, json!("InvalidParameterException"))
    );
    let mut statuses = Vec::new();
    for _ in 0..205 {
        let a = super::agent::protection(
            &mut w.m,
            &id,
            "PUT",
            br#"{"ProtectionEnabled":true,"ExpiresInMinutes":1}"#,
            now,
        );
        statuses.push(a.status);
    }
    // 200 tokens (the refused body took none): the rest are ECS's throttling.
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 5);
    assert!(w.m.task(&id).unwrap().protected(now));
}
