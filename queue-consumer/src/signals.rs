//! Shutdown signals, every one of them: the first starts the drain, a second ends the
//! grace period at once.
//!
//! ECS sends SIGTERM once; an operator at a terminal may press ctrl-c twice. Each
//! arrives on the channel [`listen`] returns, for as long as the receiver lives.

/// Starts listening for SIGTERM and SIGINT; each one received is sent on the channel.
///
/// # Panics
/// Outside a tokio runtime.
pub use task_protection::cli::signals as listen;
