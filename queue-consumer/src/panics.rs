//! Panics as log events.
//!
//! Rust's default panic hook prints several lines of plain text on stderr (and a
//! backtrace with `RUST_BACKTRACE`), which breaks `LOG_FORMAT=json`: CloudWatch sees
//! lines that are not JSON, each as its own event. The worker catches a handler's
//! panic and retries its message; this hook makes the panic itself one error event
//! of the log, with where it happened (and the backtrace as a field when one is
//! captured).

use std::sync::Once;

/// Routes every panic of the process to the log as one error event, while a tracing
/// subscriber is installed; without one, the default hook still prints it.
pub(crate) fn log_as_events() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fallback = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let logging =
                tracing::dispatcher::get_default(|d| !d.is::<tracing::subscriber::NoSubscriber>());
            if !logging {
                fallback(info);
                return;
            }
            let location = info
                .location()
                .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            let thread = std::thread::current();
            let thread = thread.name().unwrap_or("unnamed");
            let backtrace = std::backtrace::Backtrace::capture();
            if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
                tracing::error!(
                    thread,
                    backtrace = %backtrace,
                    "panicked{location}: {message}"
                );
            } else {
                tracing::error!(thread, "panicked{location}: {message}");
            }
        }));
    });
}
