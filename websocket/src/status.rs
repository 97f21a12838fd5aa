//! `GET /status`: the connection count, the protection state and the drain, as JSON,
//! for people and for the page.
//!
//! Anyone who can load the page can read it, so it names nothing: error texts can
//! carry the agent's URL, internal addresses and whole AWS messages, and the task's
//! ARN names the account, the Region and the cluster. URLs and addresses are always
//! hidden, ARNs and account numbers unless `STATUS_SHOW_IDENTIFIERS` asks for them;
//! the full texts are in the server's log.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use task_protection::{Counters, ProtectionState};

use crate::routes::Shared;

/// The longest error text `/status` shows.
pub const MAX_PUBLIC_TEXT: usize = 120;

/// What `GET /status` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Clients connected now.
    pub connections: usize,
    /// `MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// False once shutdown has begun.
    pub accepting: bool,
    /// The task's protection: phase, expiry, task ARN (only when asked for), last
    /// rejection or error; the texts shortened by [`public_text`].
    pub protection: serde_json::Value,
    /// The protection calls made so far.
    pub protection_calls: Counters,
    /// Whether the service still wants this task: `on` (the watcher asks ECS),
    /// `membership` (`wanted` or `leaving`) and, when leaving, the `reason`.
    pub drain: serde_json::Value,
}

/// `GET /status`.
pub(crate) async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let protection = shared.connections.protection();
    let show = shared.show_identifiers;
    let leaving = shared.leaving();
    let body = Status {
        connections: shared.connections.count(),
        max_connections: shared.connections.limit(),
        accepting: !shared.shutdown.is_cancelled(),
        protection: public_state(&protection.current(), show),
        protection_calls: protection.counters(),
        drain: serde_json::json!({
            "on": shared.drain.is_on(),
            "membership": if leaving.is_some() { "leaving" } else { "wanted" },
            "reason": leaving.map(|r| public_text(&r.to_string(), show)),
        }),
    };
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// The protection state as `/status` shows it to anyone.
fn public_state(state: &ProtectionState, show_identifiers: bool) -> serde_json::Value {
    let mut value = serde_json::to_value(state).unwrap_or_default();
    for field in ["last_error", "last_rejection"] {
        if let Some(serde_json::Value::String(text)) = value.get_mut(field) {
            *text = public_text(text, show_identifiers);
        }
    }
    if !show_identifiers && let Some(arn) = value.get_mut("task_arn") {
        *arn = serde_json::Value::Null;
    }
    value
}

/// `text` without URLs or network addresses, without ARNs and account numbers
/// unless `show_identifiers`, and at most [`MAX_PUBLIC_TEXT`] bytes.
#[must_use]
pub fn public_text(text: &str, show_identifiers: bool) -> String {
    let mut out = String::new();
    for word in text.split_whitespace() {
        let bare = word.trim_matches(|c: char| "()[]{}<>,;:'\"`.".contains(c));
        let hidden = if bare.contains("://") {
            "<url>"
        } else if looks_like_address(bare) || looks_like_address(word.trim_end_matches(',')) {
            "<address>"
        } else if !show_identifiers && bare.starts_with("arn:") {
            "<arn>"
        } else if !show_identifiers && has_account_number(bare) {
            "<account>"
        } else {
            word
        };
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(hidden);
    }
    if out.len() > MAX_PUBLIC_TEXT {
        let mut end = MAX_PUBLIC_TEXT - 3;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

/// Twelve digits in a row, and no more: an AWS account number.
fn has_account_number(word: &str) -> bool {
    word.split(|c: char| !c.is_ascii_digit())
        .any(|digits| digits.len() == 12)
}

/// An IP address, with or without a port, or a `host:port`.
fn looks_like_address(word: &str) -> bool {
    let word = word.trim_end_matches(['.', ':']);
    if word.parse::<std::net::IpAddr>().is_ok() || word.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match word.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_text_hides_urls_and_addresses_and_is_short() {
        let text = "error sending request for url (http://169.254.170.2/api/abc/task-protection/v1/state): \
                    connect to 10.0.1.23:51678 failed, and [fd00::1]:80 and agent.internal:8080 too";
        let shown = public_text(text, true);
        for secret in ["169.254", "10.0.1.23", "fd00", "agent.internal", "http"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.starts_with("error sending request for url <url>"),
            "{shown}"
        );
        let long = "Rate exceeded ".repeat(40);
        let shown = public_text(&long, true);
        assert!(
            shown.len() <= MAX_PUBLIC_TEXT && shown.ends_with("..."),
            "{shown}"
        );
    }

    #[test]
    fn arns_and_account_numbers_only_when_asked_for() {
        let text = "DEPLOYMENT_BLOCKED: arn:aws:ecs:us-east-1:123456789012:task/x; \
                    User: arn:aws:sts::123456789012:assumed-role/r/i is not authorized \
                    (account 123456789012.)";
        let hidden = public_text(text, false);
        for identifier in ["arn:", "123456789012", "us-east-1"] {
            assert!(!hidden.contains(identifier), "{identifier} in {hidden}");
        }
        assert!(hidden.starts_with("DEPLOYMENT_BLOCKED: <arn>"), "{hidden}");
        assert!(hidden.contains("is not authorized"), "{hidden}");
        let shown = public_text(text, true);
        assert!(
            shown.starts_with("DEPLOYMENT_BLOCKED: arn:aws:ecs:us-east-1:123456789012:task/x"),
            "{shown}"
        );
        // Counts and other numbers stay.
        assert_eq!(
            public_text("the service runs 3 tasks and wants 2", false),
            "the service runs 3 tasks and wants 2"
        );
    }
}
