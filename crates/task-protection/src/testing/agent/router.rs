//! What the agent's server does before its handler: the router (gorilla/mux, with
//! path cleaning) and the limiter (tollbooth), both in front of every route.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::{AgentAnswer, BURST, NOT_FOUND_BODY, RATE_PER_SECOND, TEXT_PLAIN};

/// Where the agent's router sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// A path that Go's cleaning changes (`//`, `/./`, `/../`): 301 to the clean one,
    /// before anything else (gorilla/mux with `SkipClean(false)`).
    Redirect(String),
    /// `PUT` on the protection path.
    Put,
    /// `GET` on the protection path.
    Get,
    /// `GET` on `/v4/<id>/task`: task metadata.
    TaskMetadata,
    /// Another method on the protection path: 405, empty (gorilla/mux's
    /// `methodNotAllowedHandler`).
    MethodNotAllowed,
    /// Any other path: Go's `http.NotFound`, 404 text/plain.
    NotFound,
}

/// The route of `method` and `path` in the agent's router: `/api/{id}/task-protection/v1/state`
/// for `PUT` and `GET` (`id` without a slash), `/v4/{id}/task` for task metadata.
#[must_use]
pub fn route(method: &str, path: &str) -> Route {
    let clean = clean_path(path);
    if clean != path {
        return Route::Redirect(clean);
    }
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "api", _id, "task-protection", "v1", "state"] => match method {
            "PUT" => Route::Put,
            "GET" => Route::Get,
            _ => Route::MethodNotAllowed,
        },
        ["", "v4", _id, "task"] if method == "GET" => Route::TaskMetadata,
        ["", "v4", _id, "task"] => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// Go's `path.Clean`, keeping a trailing slash, as gorilla/mux's `cleanPath` does.
fn clean_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    let mut clean = format!("/{}", out.join("/"));
    if path.ends_with('/') && clean != "/" {
        clean.push('/');
    }
    clean
}

/// The router's answer to a route that is not a handler's.
#[must_use]
pub fn router_answer(route: &Route) -> Option<AgentAnswer> {
    let answer = |status, content_type, body: &str| AgentAnswer {
        status,
        content_type,
        body: body.to_owned(),
        after: Some(Duration::ZERO),
        applied: false,
        change: None,
    };
    match route {
        Route::Redirect(_) => Some(answer(301, None, "")),
        Route::MethodNotAllowed => Some(answer(405, None, "")),
        Route::NotFound => Some(answer(404, Some(TEXT_PLAIN), NOT_FOUND_BODY)),
        Route::Put | Route::Get | Route::TaskMetadata => None,
    }
}

/// The agent's limiter: a token bucket of [`BURST`] refilled at
/// [`RATE_PER_SECOND`], one per source address and path (tollbooth over
/// `golang.org/x/time/rate`, in front of every route; GET and PUT on one path share
/// a bucket).
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<String, (f64, Instant)>,
}

impl Limiter {
    /// A limiter with every bucket full.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a request from `source` to `path` at `now` passes (and takes a token).
    pub fn allow(&mut self, source: &str, path: &str, now: Instant) -> bool {
        let (tokens, last) = self
            .buckets
            .entry(format!("{source}|{path}"))
            .or_insert((BURST, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * RATE_PER_SECOND;
        *tokens = (*tokens + refill).min(BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_cleans_then_routes() {
        assert_eq!(route("PUT", "/api/x/task-protection/v1/state"), Route::Put);
        assert_eq!(
            route("DELETE", "/api/x/task-protection/v1/state"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            route("PUT", "/api/x/task-protection/v1/state/"),
            Route::NotFound
        );
        assert_eq!(
            route("PUT", "/api/x//task-protection/v1/state"),
            Route::Redirect("/api/x/task-protection/v1/state".to_owned())
        );
        assert_eq!(route("PUT", "/task-protection/v1/state"), Route::NotFound);
        assert_eq!(route("GET", "/v4/x/task"), Route::TaskMetadata);
    }

    #[test]
    fn the_limiter_allows_a_burst_of_60_then_40_a_second() {
        let mut limiter = Limiter::new();
        let t0 = Instant::now();
        assert_eq!((0..70).filter(|_| limiter.allow("a", "/p", t0)).count(), 60);
        assert!(limiter.allow("a", "/q", t0), "another path, another bucket");
        assert!(
            limiter.allow("b", "/p", t0),
            "another source, another bucket"
        );
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..70).filter(|_| limiter.allow("a", "/p", t1)).count(), 20);
    }
}
