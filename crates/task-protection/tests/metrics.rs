//! What the library records through the `metrics` facade, read back from the EMF
//! exporter the services install.

mod support;

use std::time::Duration;

use metrics_emf::{EmfConfig, EmfRecorder};
use serde_json::Value;
use support::{FakeEcs, Reply, settle, worker_settings};
use task_protection::TaskProtection;
use tokio::time::advance;

#[tokio::test(start_paused = true)]
async fn puts_rejections_and_the_time_to_protection_are_recorded() {
    let recorder = EmfRecorder::new(EmfConfig::builder("Test").build().unwrap());
    let handle = recorder.handle();
    // The paused runtime runs every task on this thread.
    let _local = metrics::set_default_local_recorder(&recorder);
    let ecs = FakeEcs::new();
    ecs.set_latency(Duration::from_millis(300));
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let guard = p.acquire().await.unwrap();
    let doc: Value = serde_json::from_str(&handle.render()[0]).unwrap();
    assert_eq!(doc["ProtectionProtected"], 1.0, "{doc}");
    assert_eq!(doc["ProtectionEnablePuts"], 1);
    assert_eq!(doc["ProtectionRejections"], 0, "registered at zero");
    let latency = doc["ProtectionAcquireLatency"]["Max"].as_f64().unwrap();
    assert!((300.0..=310.0).contains(&latency), "{latency}");
    drop(guard);
    settle().await;
    advance(Duration::from_secs(7)).await;
    settle().await;
    ecs.script([Reply::Failure("DEPLOYMENT_BLOCKED")]);
    assert!(p.acquire().await.is_err());
    let doc: Value = serde_json::from_str(&handle.render()[0]).unwrap();
    assert_eq!(doc["ProtectionProtected"], 0.0, "{doc}");
    assert_eq!(doc["ProtectionEnablePuts"], 1, "{doc}");
    assert_eq!(doc["ProtectionReleasePuts"], 1);
    assert_eq!(doc["ProtectionRejections"], 1);
    assert_eq!(doc["ProtectionRefreshPuts"], 0);
}
