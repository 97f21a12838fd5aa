//! An in-process ECS for tests on paused time.
//!
//! The driver's backend seam takes any `Backend`; this one answers from a script and
//! keeps ECS's own view of the task (protected until when), so tests can check what
//! ECS would see, not just what the client believes. Real network answers are covered
//! by the wiremock tests; paused time cannot be mixed with real sockets.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use task_protection::{
    Backend, Grant, ProtectionError, ProtectionRequest, ProtectionSettings, Rejection, ThrottledBy,
};
use tokio::time::Instant;

/// How the fake ECS answers one PUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Throttled,
    Failure(&'static str),
    /// Applies the request but never answers (the client times out).
    Hang,
    /// Never applies and never answers (the client times out).
    HangUnapplied,
    /// Applies the request, then answers 504 `RequestCanceled`, as the agent does when
    /// its own ECS call outlived its budget.
    AppliedThen504,
    /// Answers 500 without applying the request.
    Unapplied500,
    /// The connection is refused: nothing was sent.
    Refused,
}

#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub at: Instant,
    pub request: ProtectionRequest,
}

#[derive(Debug, Default)]
pub struct Inner {
    pub script: VecDeque<Reply>,
    pub fallback: Option<Reply>,
    pub calls: Vec<Call>,
    pub in_flight: usize,
    pub max_in_flight: usize,
    /// ECS's own view: protected until this instant.
    pub ecs_expiry: Option<Instant>,
    pub latency: Duration,
    /// Enables that found an earlier protection already run out: ECS saw a gap.
    pub lapses: usize,
    /// The expiry of the last enable that was answered with a confirmation: the most
    /// a client can know.
    pub confirmed_expiry: Option<Instant>,
    /// The request on the wire, if any.
    pub on_wire: Option<ProtectionRequest>,
}

#[derive(Debug, Clone, Default)]
pub struct FakeEcs {
    inner: Arc<Mutex<Inner>>,
}

struct InFlight(Arc<Mutex<Inner>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = self.0.lock().unwrap();
        inner.in_flight -= 1;
        inner.on_wire = None;
    }
}

impl FakeEcs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.lock().script.extend(replies);
    }

    pub fn always(&self, reply: Reply) {
        self.lock().fallback = Some(reply);
    }

    pub fn latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn enables(&self) -> usize {
        self.calls().iter().filter(|c| c.request.enabled).count()
    }

    pub fn disables(&self) -> usize {
        self.calls().iter().filter(|c| !c.request.enabled).count()
    }

    /// Whether ECS considers the task protected at `now`.
    pub fn ecs_protected(&self, now: Instant) -> bool {
        self.lock().ecs_expiry.is_some_and(|e| e > now)
    }
}

impl Backend for FakeEcs {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        let (reply, latency) = {
            let mut inner = self.lock();
            let now = Instant::now();
            inner.calls.push(Call { at: now, request });
            inner.in_flight += 1;
            inner.on_wire = Some(request);
            inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
            let reply = inner
                .script
                .pop_front()
                .or(inner.fallback)
                .unwrap_or(Reply::Ok);
            (reply, inner.latency)
        };
        let _guard = InFlight(Arc::clone(&self.inner));
        let apply = |inner: &mut Inner| {
            if request.enabled && inner.ecs_expiry.is_some_and(|e| e <= Instant::now()) {
                inner.lapses += 1;
            }
            let minutes = u64::from(request.expires_in_minutes.unwrap_or(120));
            inner.ecs_expiry = request
                .enabled
                .then(|| Instant::now() + Duration::from_secs(minutes * 60));
        };
        // ECS acts when the request arrives; the answer takes `latency` to come back.
        let applies = matches!(reply, Reply::Ok | Reply::Hang | Reply::AppliedThen504);
        if applies {
            apply(&mut self.lock());
        }
        let minutes = u64::from(request.expires_in_minutes.unwrap_or(120));
        let reported = SystemTime::now() + Duration::from_secs(minutes * 60);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match reply {
            Reply::Ok => {
                {
                    let mut inner = self.lock();
                    if request.enabled {
                        inner.confirmed_expiry = inner.ecs_expiry;
                    }
                }
                Ok(Grant {
                    enabled: request.enabled,
                    expires_at: request.enabled.then_some(reported),
                    task_arn: Some("arn:aws:ecs:us-east-1:1:task/c/t".into()),
                })
            }
            Reply::Throttled => Err(ProtectionError::Throttled {
                by: ThrottledBy::Ecs,
                message: "Rate exceeded".into(),
            }),
            Reply::Failure(reason) => Err(ProtectionError::Rejected(Rejection {
                reason: reason.into(),
                detail: None,
                status: Some(200),
            })),
            Reply::Hang | Reply::HangUnapplied => std::future::pending().await,
            Reply::AppliedThen504 => Err(ProtectionError::Server {
                status: 504,
                code: "RequestCanceled".into(),
                message: "request canceled".into(),
            }),
            Reply::Unapplied500 => Err(ProtectionError::Server {
                status: 500,
                code: "ServerException".into(),
                message: "internal error".into(),
            }),
            Reply::Refused => Err(ProtectionError::Unreachable("connection refused".into())),
        }
    }

    fn describe(&self) -> String {
        "fake ECS".into()
    }
}

/// The worker's defaults: 1 minute, maintain 10 %, refresh 80 %, check every 10 s.
pub fn worker_settings() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(10)
        .refresh_percent(80)
        .check_interval(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The websocket server's defaults: 30 minutes, maintain 0 %, refresh 80 %.
pub fn websocket_settings() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(30)
        .maintain_percent(0)
        .refresh_percent(80)
        .check_interval(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Lets the driver run until it waits on a timer, without moving the clock.
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}
