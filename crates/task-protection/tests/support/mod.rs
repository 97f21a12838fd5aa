//! What the crate's tests share: the scripted ECS (public, in
//! `task_protection::testing`), the two services' settings, a way to let the
//! driver run on paused time, and an ECS API client for a wiremock ECS.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::time::Duration;

use task_protection::ProtectionSettings;
pub use task_protection::testing::{Landing, Reply, ScriptedEcs as FakeEcs};

/// The worker's defaults: 1 minute, maintain 10 %, refresh 80 %, check every 10 s.
pub fn worker_settings() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(10)
        .refresh_percent(80)
        .check_interval(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The websocket server's defaults: 30 minutes, maintain 0 %, refresh 80 %.
pub fn websocket_settings() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(30)
        .maintain_percent(0)
        .refresh_percent(80)
        .check_interval(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Lets the driver run until it waits on a timer, without moving the clock.
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// An ECS API client that sends to `endpoint` (a wiremock ECS): a fixed Region and
/// test credentials, and no retries, so each call the test sees is one the code made.
#[cfg(any(feature = "ecs-api", feature = "drain"))]
pub fn ecs_client(endpoint: &str) -> aws_sdk_ecs::Client {
    let config = aws_sdk_ecs::Config::builder()
        .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
        .region(aws_sdk_ecs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ecs::config::Credentials::new(
            "AKID", "SECRET", None, None, "test",
        ))
        .retry_config(aws_sdk_ecs::config::retry::RetryConfig::disabled())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_ecs::Client::from_conf(config)
}
