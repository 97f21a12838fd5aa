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
//! // Inside ECS use `TaskProtection::connect(&BackendConfig::from_env()?, ..)`,
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
//! outside ECS. [`BackendConfig::from_env`] reads the choice
//! (`TASK_PROTECTION_BACKEND`) and [`AnyBackend::connect`] builds it: the simulation
//! only when asked for or outside ECS, never silently in a task. Your own [`Backend`]
//! plugs in the same way.
//!
//! Protection is per task: a second [`TaskProtection`] for the same task in one
//! process shares the first one's state machine, and a task's other containers hold
//! through the one that owns it ([`layer::HoldEndpoint`]).
//!
//! # Features
//!
//! | Feature | Default | Adds |
//! |---|---|---|
//! | `agent` | yes | [`AgentBackend`], through the agent endpoint `$ECS_AGENT_URI/task-protection/v1/state` (agent 1.65.0 and later, and Fargate). Plain http, no TLS: the endpoint is link-local. |
//! | `ecs-api` | no | [`EcsApiBackend`], ECS `UpdateTaskProtection` through `aws-sdk-ecs`, for tasks whose agent lacks the endpoint. Brings the AWS SDK. |
//! | `drain` | no | [`drain::EcsService`], the ECS calls of the [drain watcher](drain), which tells a task when its service no longer wants it. Brings the AWS SDK. |
//! | `tower` | no | [`layer::ProtectionLayer`], a tower layer that holds protection for every HTTP request in flight (axum, tonic, hyper). |
//! | `cli` | no | [`cli`], what the services built on this crate share: settings as clap arguments with one-line errors, logging, shutdown signals, CloudWatch EMF metrics, and `drain`. Application glue, not needed by a library. |
//! | `testing` | no | [`testing`]: [`ScriptedEcs`](testing::ScriptedEcs), an in-process ECS agent for a service's tests, and the model of the real agent's answers it is built on, with its conformance table. For dev-dependencies. |
//!
//! With no feature at all, [`LocalBackend`] and your own [`Backend`] remain. The
//! crate's README counts the crates each set of features brings.
//!
//! # Metrics
//!
//! Protection's costs are recorded through the [`metrics`](::metrics) facade, for
//! whatever exporter the service installs: see [`mod@metrics`].

#![warn(missing_docs, clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// The crate docs link items of every feature; a build without some of them (docs.rs
// has them all) cannot resolve those links.
#![cfg_attr(
    not(all(
        feature = "agent",
        feature = "ecs-api",
        feature = "drain",
        feature = "tower",
        feature = "cli",
        feature = "testing"
    )),
    allow(rustdoc::broken_intra_doc_links)
)]

pub mod backend;
mod chain;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod cli;
pub mod drain;
mod driver;
#[cfg(any(feature = "ecs-api", feature = "drain"))]
mod ecs_client;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod layer;
#[cfg(any(feature = "agent", feature = "ecs-api", feature = "drain"))]
mod link_local;
mod machine;
#[cfg(any(feature = "ecs-api", feature = "drain"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "ecs-api", feature = "drain"))))]
pub mod metadata;
pub mod metrics;
mod protection;
pub mod settings;
mod state;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

#[cfg(feature = "agent")]
#[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
pub use backend::AgentBackend;
#[cfg(feature = "ecs-api")]
#[cfg_attr(docsrs, doc(cfg(feature = "ecs-api")))]
pub use backend::EcsApiBackend;
pub use backend::{
    AnyBackend, Backend, BackendConfig, BackendConfigError, BackendKind, Grant, LocalBackend,
    ProtectionError, ProtectionRequest, Rejection, ThrottledBy,
};
pub use chain::ErrorChain;
#[cfg(any(feature = "ecs-api", feature = "drain"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "ecs-api", feature = "drain"))))]
pub use ecs_client::EcsClient;
#[cfg(any(feature = "ecs-api", feature = "drain"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "ecs-api", feature = "drain"))))]
pub use metadata::TaskIdentity;
pub use protection::{AcquireError, ProtectionGuard, ShutdownReport, TaskProtection};
pub use settings::{ProtectionSettings, ProtectionSettingsBuilder, SettingsError};
pub use state::{Counters, Events, Phase, ProtectionEvent, ProtectionState, rfc3339};

// The README's examples are compiled and run with the doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
