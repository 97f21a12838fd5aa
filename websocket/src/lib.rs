//! A websocket server that keeps its ECS task protected from scale-in while clients
//! are connected.
//!
//! It does the original Node.js sample's job with axum and stays compatible with its
//! page and clients: `GET /` serves the page and, with an upgrade, the websocket;
//! `/healthz` answers the ALB; `/status` shows the connection count and protection.
//!
//! Each connected client holds task protection through a
//! [`ProtectionGuard`](task_protection::ProtectionGuard), taken without waiting for
//! ECS so the first client is welcomed at once. The protection library turns the
//! holders into PUTs only on idle→busy and busy→idle transitions and a refresh
//! before the expiry, so a storm of
//! clients costs a handful of calls, not one per client.
//!
//! - [`config`]: settings from flags and environment variables.
//! - [`app`]: binding, serving and the shutdown sequence.
//! - [`routes`]: the HTTP routes, who is admitted, and the compiled-in page.
//! - [`admission`]: which pages may connect, and the address a client counts under.
//! - [`upgrade`]: the websocket handshake, and the client's task.
//! - [`status`]: `/status`, which names nothing unless asked to.
//! - [`http`]: accepting connections and serving HTTP/1.1 with timeouts and bounds.
//! - [`connection`]: one client's protocol, generic over the socket, and its limits.
//! - [`connections`]: the client count, per address too, and the protection each
//!   client holds.
//! - [`metrics`]: what the server counts, for whatever metrics recorder is installed.
//! - [`notices`]: telling connections things, and the heartbeat, one slice at a time.
//! - [`healthcheck`]: the `healthcheck` subcommand.

pub mod admission;
pub mod app;
pub mod config;
pub mod connection;
pub mod connections;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod notices;
pub mod routes;
pub mod status;
pub mod upgrade;

pub use app::App;
pub use config::{Config, ServerSettings};
