//! Your own backend: anything that can set protection and say what happened.
//!
//! A backend makes one call per [`Backend::update`] and sorts the answer into a
//! [`Grant`] or a [`ProtectionError`]; the state machine does the retrying, the
//! spacing and the timeouts. Here, one that wraps another backend and keeps an audit
//! trail of every call, with its latency: the shape of a backend that adds metrics,
//! or that talks to a sidecar instead of the agent.
//!
//! ```sh
//! cargo run -p task-protection --example custom_backend
//! ```

use std::time::{Duration, Instant};

use task_protection::{
    AnyBackend, Backend, BackendConfig, ErrorChain, Grant, ProtectionError, ProtectionEvent,
    ProtectionRequest, ProtectionSettings, TaskProtection,
};

/// Calls `inner`, and writes a line for every call.
struct Audited<B> {
    inner: B,
}

impl<B: Backend> Backend for Audited<B> {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        let started = Instant::now();
        let answer = self.inner.update(request).await;
        let took = started.elapsed();
        match &answer {
            Ok(grant) => eprintln!(
                "audit: {request:?} -> protected={} until {:?} in {took:?}",
                grant.is_enabled(),
                grant.expires_at().map(task_protection::rfc3339)
            ),
            // A `Rejected` error is final (ECS said no); any other is retried later.
            Err(e) => eprintln!("audit: {request:?} -> {} in {took:?}", ErrorChain(e)),
        }
        answer
    }

    // A wrapper passes on what it knows of the backend it wraps: how long a lost
    // request may still land, and which task it protects.
    fn landing_window(&self, request_timeout: Duration) -> Duration {
        self.inner.landing_window(request_timeout)
    }

    fn simulated(&self) -> bool {
        self.inner.simulated()
    }

    fn identity(&self) -> Option<String> {
        self.inner.identity()
    }

    fn describe(&self) -> String {
        format!("{} (audited)", self.inner.describe())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // TASK_PROTECTION_BACKEND, ECS_AGENT_URI and ECS_CONTAINER_METADATA_URI_V4.
    let inner = AnyBackend::connect(&BackendConfig::from_env()?).await?;
    let settings = ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(2) // release about a second after the work
        .build()?;
    let protection = TaskProtection::start(Audited { inner }, settings);
    let mut events = protection.events();

    let guard = protection.acquire().await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // the work
    drop(guard);

    // Wait for the release the maintain window brings.
    while let Some(event) = events.recv().await {
        if let ProtectionEvent::Unprotected { .. } = event {
            break;
        }
    }
    println!("{:?}", protection.counters());
    Ok(())
}
