use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::agent::{AGENT_BUDGET, Reply, put_answer};
use crate::backend::answer::{Endpoint, classify};
use crate::backend::{AGENT_LANDING_WINDOW, Backend, Grant, ProtectionError, ProtectionRequest};

/// The task ARN the scripted ECS reports.
pub const TASK_ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/test/0123456789abcdef";

/// When ECS applies a request it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Landing {
    /// The moment it arrives (the default).
    #[default]
    OnArrival,
    /// At a random moment of its flight, drawn from a generator seeded with `seed`:
    /// before its answer when it is confirmed, and up to [`AGENT_BUDGET`] after it was
    /// sent when its answer is lost or an error (even after the client gave up).
    Random {
        /// The generator's seed, so a failing case can be replayed.
        seed: u64,
    },
    /// This long after it was sent; a confirmation waits for it.
    After(Duration),
}

/// One PUT as the scripted ECS saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// When it was sent.
    pub at: Instant,
    /// What it asked.
    pub request: ProtectionRequest,
    /// How it was answered.
    pub reply: Reply,
}

/// A change ECS applied: when, and protected until when (`None`: off).
pub type Change = (Instant, Option<Instant>);

#[derive(Debug)]
struct Pending {
    id: u64,
    at: Instant,
    change: Option<u32>,
}

#[derive(Debug, Default)]
struct Inner {
    script: VecDeque<Reply>,
    fallback: Option<Reply>,
    latency: Duration,
    landing: Landing,
    rng: Option<StdRng>,
    /// ECS's clock minus this process's wall clock, in seconds.
    clock_offset_secs: i64,
    calls: Vec<Call>,
    in_flight: usize,
    max_in_flight: usize,
    on_wire: Option<ProtectionRequest>,
    pending: Vec<Pending>,
    next_id: u64,
    /// ECS's own view: protected until this instant.
    expiry: Option<Instant>,
    changes: Vec<Change>,
    lapses: usize,
    confirmed_expiry: Option<Instant>,
}

impl Inner {
    /// Applies every request due to land by `now`, in the order they land.
    fn land_due(&mut self, now: Instant) {
        self.pending.sort_by_key(|p| (p.at, p.id));
        while self.pending.first().is_some_and(|p| p.at <= now) {
            let p = self.pending.remove(0);
            self.apply(p.at, p.change);
        }
    }

    /// Applies one request now, if it is still pending.
    fn land(&mut self, id: u64) {
        if let Some(i) = self.pending.iter().position(|p| p.id == id) {
            let p = self.pending.remove(i);
            let now = Instant::now();
            self.land_due(now);
            self.apply(p.at.min(now), p.change);
        }
    }

    /// ECS applies `change`: on for some minutes, or off.
    fn apply(&mut self, at: Instant, change: Option<u32>) {
        if change.is_some() && self.expiry.is_some_and(|e| e <= at) {
            self.lapses += 1;
        }
        self.expiry = change.map(|minutes| at + Duration::from_secs(u64::from(minutes) * 60));
        self.changes.push((at, self.expiry));
    }

    /// When a request sent at `sent` and answered at `answered` (never: `None`) lands.
    fn landing_time(&mut self, sent: Instant, answered: Option<Instant>) -> Instant {
        match (self.landing, self.rng.as_mut()) {
            (Landing::Random { .. }, Some(rng)) => {
                let window = answered.map_or(AGENT_BUDGET, |a| a - sent);
                let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
                sent + Duration::from_nanos(rng.random_range(0..=nanos))
            }
            (Landing::After(d), _) => sent + d,
            _ => sent,
        }
    }
}

/// An in-process ECS that answers from a script; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct ScriptedEcs {
    inner: Arc<Mutex<Inner>>,
}

struct InFlight(Arc<Mutex<Inner>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        inner.in_flight -= 1;
        inner.on_wire = None;
    }
}

impl ScriptedEcs {
    /// A scripted ECS that confirms every request at once, the task unprotected.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.land_due(Instant::now());
        inner
    }

    /// Answers the next PUTs with `replies`, in order, then with the fallback.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.lock().script.extend(replies);
    }

    /// Answers every PUT this way once the script is used up (default [`Reply::Ok`]).
    pub fn set_fallback(&self, reply: Reply) {
        self.lock().fallback = Some(reply);
    }

    /// ECS takes this long to answer the agent, from now on. From
    /// [`AGENT_BUDGET`] on, the agent gives up and answers 504 `RequestCanceled` at
    /// its budget, as the real one does.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// When ECS applies the requests it accepts, from now on.
    pub fn set_landing(&self, landing: Landing) {
        let mut inner = self.lock();
        inner.landing = landing;
        inner.rng = match landing {
            Landing::Random { seed } => Some(StdRng::seed_from_u64(seed)),
            Landing::OnArrival | Landing::After(_) => None,
        };
    }

    /// ECS's clock runs this many seconds ahead of this process's wall clock (behind
    /// when negative): the `ExpirationDate` it reports is off by as much.
    pub fn set_clock_offset(&self, seconds: i64) {
        self.lock().clock_offset_secs = seconds;
    }

    /// ECS holds protection until `until`, as an earlier process in the same task
    /// may have left it.
    pub fn protect_until(&self, until: Instant) {
        let mut inner = self.lock();
        inner.expiry = Some(until);
        inner.changes.push((Instant::now(), Some(until)));
    }

    /// Every PUT so far.
    #[must_use]
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Enable PUTs so far.
    #[must_use]
    pub fn enables(&self) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.request.enabled)
            .count()
    }

    /// Disable PUTs so far.
    #[must_use]
    pub fn disables(&self) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| !c.request.enabled)
            .count()
    }

    /// Whether ECS holds protection for the task at `at` (now or earlier).
    #[must_use]
    pub fn protected_at(&self, at: Instant) -> bool {
        let inner = self.lock();
        if at >= Instant::now() {
            return inner.expiry.is_some_and(|e| e > at);
        }
        inner
            .changes
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .and_then(|(_, until)| *until)
            .is_some_and(|until| until > at)
    }

    /// Until when ECS holds protection now, if it does.
    #[must_use]
    pub fn expiry(&self) -> Option<Instant> {
        let now = Instant::now();
        self.lock().expiry.filter(|e| *e > now)
    }

    /// Every change ECS applied, in order.
    #[must_use]
    pub fn changes(&self) -> Vec<Change> {
        self.lock().changes.clone()
    }

    /// Enables that found an earlier protection already run out: gaps ECS saw.
    #[must_use]
    pub fn lapses(&self) -> usize {
        self.lock().lapses
    }

    /// The expiry of the last enable answered with a confirmation: the most a client
    /// can know.
    #[must_use]
    pub fn confirmed_expiry(&self) -> Option<Instant> {
        self.lock().confirmed_expiry
    }

    /// The most requests that were on the wire at once.
    #[must_use]
    pub fn max_in_flight(&self) -> usize {
        self.lock().max_in_flight
    }

    /// The request on the wire now, if any.
    #[must_use]
    pub fn on_wire(&self) -> Option<ProtectionRequest> {
        self.lock().on_wire
    }

    /// Whether a request that was sent may still land: its answer was lost or is
    /// still to come.
    #[must_use]
    pub fn landing_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    /// The fallback reply in force.
    #[must_use]
    pub fn fallback(&self) -> Reply {
        self.lock().fallback.unwrap_or(Reply::Ok)
    }

    /// The latency in force.
    #[must_use]
    pub fn latency(&self) -> Duration {
        self.lock().latency
    }
}

impl Backend for ScriptedEcs {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        let sent = Instant::now();
        let (answer, landing_id) = {
            let mut inner = self.lock();
            let reply = inner
                .script
                .pop_front()
                .or(inner.fallback)
                .unwrap_or(Reply::Ok);
            inner.calls.push(Call {
                at: sent,
                request,
                reply,
            });
            if reply == Reply::Refused {
                return Err(ProtectionError::unreachable(
                    "cannot connect to the scripted ECS agent: connection refused",
                ));
            }
            inner.in_flight += 1;
            inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
            inner.on_wire = Some(request);
            // What the agent answers, exactly as the real one would.
            let body = serde_json::to_vec(&put_body(request)).unwrap_or_default();
            let ecs_now = shift(SystemTime::now(), inner.clock_offset_secs);
            let mut answer = put_answer(&body, reply, inner.latency, TASK_ARN, ecs_now);
            let landing_id = answer.applied.then(|| {
                let confirmed = answer.status == 200;
                let answered = answer.after.filter(|_| confirmed).map(|after| sent + after);
                let at = inner.landing_time(sent, answered);
                if confirmed && let Some(after) = &mut answer.after {
                    // A confirmation comes once the request has landed.
                    *after = (*after).max(at - sent);
                }
                let id = inner.next_id;
                inner.next_id += 1;
                inner.pending.push(Pending {
                    id,
                    at,
                    change: answer.change.flatten(),
                });
                inner.land_due(sent);
                if at > sent {
                    // Lands on its own, whatever becomes of the client's wait.
                    let shared = Arc::clone(&self.inner);
                    tokio::spawn(async move {
                        tokio::time::sleep_until(at).await;
                        let mut inner = shared.lock().unwrap_or_else(PoisonError::into_inner);
                        inner.land_due(Instant::now());
                    });
                }
                id
            });
            (answer, landing_id)
        };
        let _in_flight = InFlight(Arc::clone(&self.inner));
        let Some(after) = answer.after else {
            // The agent stalls: no answer, ever.
            return std::future::pending().await;
        };
        if !after.is_zero() {
            tokio::time::sleep(after).await;
        }
        let result = classify(
            answer.status,
            answer.body.as_bytes(),
            Endpoint {
                url: "scripted ECS agent",
                setting: "ScriptedEcs",
            },
        );
        if answer.status == 200 {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(id) = landing_id {
                // A confirmation comes after ECS applied the request.
                inner.land(id);
            }
            if request.enabled && result.is_ok() {
                inner.confirmed_expiry = inner.expiry;
            }
        }
        result
    }

    /// The agent's: its ECS call is cancelled 4 s after it got the PUT.
    fn landing_window(&self, _request_timeout: Duration) -> Duration {
        AGENT_LANDING_WINDOW
    }

    fn describe(&self) -> String {
        "scripted ECS (tests)".to_owned()
    }
}

/// The PUT body the agent backend sends.
fn put_body(request: ProtectionRequest) -> serde_json::Value {
    let mut body = serde_json::json!({ "ProtectionEnabled": request.enabled });
    if let Some(minutes) = request.expires_in_minutes {
        body["ExpiresInMinutes"] = minutes.into();
    }
    body
}

fn shift(t: SystemTime, secs: i64) -> SystemTime {
    let d = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        t + d
    } else {
        t.checked_sub(d).unwrap_or(t)
    }
}
