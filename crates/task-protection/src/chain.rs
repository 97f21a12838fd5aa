//! An error with its causes, on one line.

use std::fmt;

/// Writes an error and each of its [`source`](std::error::Error::source)s on one line,
/// `error: cause: cause`, as a log line wants them. This crate's errors keep their
/// causes as sources and leave them out of their own message, so that an error
/// reporter (anyhow's `{:#}`, eyre) does not print them twice.
///
/// ```
/// use task_protection::{ErrorChain, ProtectionError};
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
/// let e = ProtectionError::transport("no answer from the ECS agent").caused_by(io);
/// assert_eq!(
///     ErrorChain(&e).to_string(),
///     "request failed: no answer from the ECS agent: connection reset"
/// );
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
