//! What a scheduler step asks of the world: the driver starts and signals processes,
//! registers targets with the load balancer and runs health checks, then tells the
//! model what came of them.

use std::time::Duration;

/// A signal to a task's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// The start of a stop.
    Term,
    /// The end of the stop timeout.
    Kill,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start the task's process (its environment: the service's, its revision's, and
    /// the endpoints the driver serves).
    Start {
        /// The task.
        task: String,
    },
    /// Register the task's port with the load balancer.
    Register {
        /// The task.
        task: String,
        /// Its port.
        port: u16,
    },
    /// No new connections to the task; those it has stay.
    Deregister {
        /// The task.
        task: String,
    },
    /// The end of a deregistration (or of the task): close its connections.
    Remove {
        /// The task.
        task: String,
    },
    /// Signal the task's process.
    Signal {
        /// The task.
        task: String,
        /// Which signal.
        signal: StopSignal,
    },
    /// Run the target group's health check: `GET /healthz` on `port`; report with
    /// [`Model::target_checked`](super::Model::target_checked).
    ProbeTarget {
        /// The task.
        task: String,
        /// Where the target group checks (not always the task's port).
        port: u16,
        /// The check's timeout.
        timeout: Duration,
    },
    /// Run the container health check: the task's binary with `command`, in the
    /// task's environment; report with
    /// [`Model::container_checked`](super::Model::container_checked).
    CheckContainer {
        /// The task.
        task: String,
        /// The arguments.
        command: Vec<String>,
        /// The check's timeout.
        timeout: Duration,
    },
}
