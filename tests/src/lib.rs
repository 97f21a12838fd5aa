//! Harness for the end-to-end suite.
//!
//! Every test here drives real processes on loopback: the service binaries built by
//! this workspace, moto's `moto_server` as SQS, and a wiremock stand-in for the ECS
//! agent that answers as the agent does. Tests wait on states (a log line, a queue
//! count, a recorded request) with a timeout; they never sleep to let time pass.

pub mod agent;
pub mod bench;
pub mod counting;
pub mod crowd;
pub mod dynamo;
pub mod moto;
pub mod process;
pub mod sim;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

/// The workspace root.
#[must_use]
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// A free TCP port on 127.0.0.1 (bound, then released).
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` with
/// `what` in the message.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
