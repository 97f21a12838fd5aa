//! A simulated backend for running outside ECS.
//!
//! It answers every PUT at once with the expiry ECS would have given, so the state
//! machine, its timers, events and logs behave exactly as in ECS, and a developer can
//! watch protection come and go on a laptop.

use std::time::{Duration, SystemTime};

use super::{Backend, Grant, ProtectionError, ProtectionRequest};

/// Simulated protection: every request succeeds, nothing leaves the process.
#[derive(Debug, Clone, Default)]
pub struct LocalBackend {
    _private: (),
}

impl LocalBackend {
    /// A new simulated backend.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl Backend for LocalBackend {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        Ok(match request.expires_in_minutes {
            Some(m) if request.enabled => {
                Grant::protected_until(SystemTime::now() + Duration::from_secs(u64::from(m) * 60))
            }
            _ if request.enabled => Grant::protected(),
            _ => Grant::unprotected(),
        })
    }

    /// Nothing leaves the process: an answer is never lost.
    fn landing_window(&self, _request_timeout: Duration) -> Duration {
        Duration::ZERO
    }

    fn simulated(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        "local simulation (not running in ECS)".to_owned()
    }
}
