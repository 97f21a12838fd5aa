//! Shutdown signals, every one of them: the first starts the drain, a second ends the
//! grace period at once.
//!
//! ECS sends SIGTERM once; an operator at a terminal may press ctrl-c twice. Each
//! arrives on the channel [`listen`] returns, for as long as the receiver lives.

use task_protection::cli::Signal;
use tokio::sync::mpsc;

/// Starts listening for SIGTERM and SIGINT; each one received is sent on the channel.
///
/// # Panics
/// Outside a tokio runtime.
#[must_use]
pub fn listen() -> mpsc::UnboundedReceiver<Signal> {
    let (tx, rx) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        for (kind, which) in [
            (SignalKind::terminate(), Signal::Term),
            (SignalKind::interrupt(), Signal::Interrupt),
        ] {
            let tx = tx.clone();
            match signal(kind) {
                Ok(mut stream) => {
                    tokio::spawn(async move {
                        while stream.recv().await.is_some() {
                            if tx.send(which).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) => tracing::warn!("cannot listen for {}: {e}", which.name()),
            }
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if tx.send(Signal::Interrupt).is_err() {
                break;
            }
        }
    });
    rx
}
