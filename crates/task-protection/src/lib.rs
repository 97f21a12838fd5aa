//! Amazon ECS task scale-in protection, held exactly while a service has work.
//!
//! ECS may stop a task whenever a service scales in or deploys. A task can ask ECS
//! not to, for a while, with *task scale-in protection*. This crate keeps that
//! protection in step with the work: each job or connection takes a
//! [`ProtectionGuard`]; protection is enabled when the first guard appears, refreshed
//! before it expires while guards remain, and released when the last guard has gone
//! and the maintain window has passed.
//!
//! It calls ECS only on those transitions, never per guard, never two requests at
//! once and at most one PUT a second, because ECS rate-limits these calls per account
//! and Region and an idle task that stays protected blocks deployments.
//!
//! ```
//! use std::time::Duration;
//! use task_protection::{LocalBackend, ProtectionSettings, TaskProtection};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Inside ECS use `TaskProtection::connect(&BackendConfig::from_env(..), ..)`,
//! // which talks to the ECS agent; here protection is simulated.
//! let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
//!
//! // Returns once ECS has confirmed protection, or fails within the acquire timeout.
//! let guard = protection.acquire().await?;
//! assert!(protection.current().protected);
//! tokio::time::sleep(Duration::from_millis(10)).await; // the job
//! drop(guard); // never blocks
//!
//! // On SIGTERM: release at once, best effort.
//! protection.shutdown().await;
//! assert!(!protection.current().protected);
//! # Ok(())
//! # }
//! ```
//!
//! Backends: the ECS agent endpoint ([`AgentBackend`], the default inside ECS), the
//! ECS API ([`EcsApiBackend`]), and a local simulation ([`LocalBackend`]) for running
//! outside ECS. [`AnyBackend::connect`] picks one from the environment.

#![warn(missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod backend;
#[cfg(feature = "cli")]
pub mod cli;
pub mod drain;
mod driver;
mod machine;
#[cfg(any(feature = "ecs-api", feature = "drain"))]
mod metadata;
pub mod metrics;
mod protection;
pub mod settings;
mod state;
pub mod testing;

#[cfg(feature = "agent")]
pub use backend::AgentBackend;
#[cfg(feature = "ecs-api")]
pub use backend::EcsApiBackend;
pub use backend::{
    AnyBackend, Backend, BackendConfig, BackendConfigError, BackendKind, Grant, LocalBackend,
    ProtectionError, ProtectionRequest, Rejection, ThrottledBy,
};
#[cfg(any(feature = "ecs-api", feature = "drain"))]
pub use metadata::TaskIdentity;
pub use protection::{AcquireError, ProtectionGuard, ShutdownReport, TaskProtection};
pub use settings::{ProtectionSettings, ProtectionSettingsBuilder, SettingsError};
pub use state::{Counters, Events, Phase, ProtectionEvent, ProtectionState, rfc3339};
