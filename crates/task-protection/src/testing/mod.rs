//! Testing a service's protection without ECS: an in-process agent, and the model of
//! the real agent's answers it is built on. Behind the `testing` feature, for a
//! service's dev-dependencies.
//!
//! [`ScriptedEcs`] is a [`Backend`](crate::Backend) that answers each PUT as the ECS
//! agent would ([`agent`]: the same statuses and bodies, read by the same code as the
//! real agent's), from a script (succeed, throttle, refuse, hang, lose the answer,
//! fail with a 5xx or a 504, be unreachable), after a latency you choose, and keeps
//! **ECS's own view** of the task apart from what it answered: whether ECS holds
//! protection at any instant, and until when. So a test can assert what matters —
//! "ECS protected the task for the whole job", "an idle task is released" — rather
//! than what the program believed.
//!
//! It runs on `tokio::time`, so tests can use paused time
//! (`#[tokio::test(start_paused = true)]`) and let minutes pass in microseconds.
//!
//! A real agent does not apply a request the moment it arrives: ECS applies it when
//! the agent's own ECS call lands, which can be up to the agent's budget (4 s) after
//! the PUT was sent, and even after the client gave up waiting. With
//! [`ScriptedEcs::set_landing`] set to [`Landing::Random`], each request lands at a
//! random moment of its flight, so a later request can be overtaken by an earlier one
//! whose answer was lost: the case that protection code must survive.
//!
//! ```
//! use std::time::Duration;
//! use task_protection::testing::{Reply, ScriptedEcs};
//! use task_protection::{ProtectionSettings, TaskProtection};
//! use tokio::time::Instant;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let ecs = ScriptedEcs::new();
//! let protection = TaskProtection::start(ecs.clone(), ProtectionSettings::default());
//! let job = protection.acquire().await.unwrap();
//! assert!(ecs.protected_at(Instant::now()));
//! ecs.set_fallback(Reply::Throttled); // from now on, ECS throttles every call
//! drop(job);
//! tokio::time::sleep(Duration::from_secs(60)).await;
//! assert!(ecs.protected_at(Instant::now()), "a throttled release changes nothing");
//! # }
//! ```

pub mod agent;
mod scripted;

pub use agent::{AGENT_BUDGET, Reply};
pub use scripted::{Call, Change, Landing, ScriptedEcs, TASK_ARN};
