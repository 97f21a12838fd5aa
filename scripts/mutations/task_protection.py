"""Mutations of task-protection's rules: the state machine, the driver's shutdown,
the holder API, the settings' checks, the agent client, the backends' choice, and the
test agents' fidelity to the real one. Each is a rule the tests must defend."""
T = "cargo nextest run -p task-protection --no-fail-fast 2>&1"
# The library's agent client and the wiremock agent, end to end.
E = "cargo nextest run -p e2e --test e2e --no-fail-fast -E 'test(/^(agent_client|agent_conformance)::/)' 2>&1"
M = "crates/task-protection/src/machine/mod.rs"
A = "crates/task-protection/src/machine/answer.rs"
C = "crates/task-protection/src/machine/ecs.rs"
D = "crates/task-protection/src/driver.rs"
P = "crates/task-protection/src/protection.rs"
S = "crates/task-protection/src/settings.rs"
L = "crates/task-protection/src/link_local.rs"
B = "crates/task-protection/src/backend/mod.rs"
N = "crates/task-protection/src/backend/answer.rs"
SEL = "crates/task-protection/src/backend/select.rs"
API = "crates/task-protection/src/backend/ecs_api.rs"
META = "crates/task-protection/src/metadata.rs"
LAYER = "crates/task-protection/src/layer.rs"
MODEL = "crates/task-protection/src/testing/agent/mod.rs"
FAKE = "tests/src/agent.rs"
EMF = "crates/metrics-emf/src/lib.rs"
MUTATIONS = [
 ("doubtful-disable-counted-released", A,
  "                    if request.enabled {\n                        let at_most = self.late_enable_end(now);",
  "                    if !request.enabled { self.ecs = Ecs::Off; }\n                    if request.enabled {\n                        let at_most = self.late_enable_end(now);", T),
 ("backoff-never-stored", A,
  "                self.retry = Some((request.enabled, now + retry_in));",
  "                let _ = retry_in;", T),
 ("no-wait-for-in-flight-at-shutdown", D,
  "                timeout = timeout.min(machine.landing_window());",
  "                timeout = sent_at.elapsed();", T),
 ("shutdown-send-not-capped", D,
  "let send_at = machine.spacing_end(now, false).min(latest.max(now));",
  "let send_at = machine.spacing_end(now, false);", T),
 ("unknown-never-off", C,
  "            Self::Unknown { at_most } if at_most <= now => (Self::Off, false),\n",
  "", T),
 ("no-stopping-mid-request", D,
  "                stopping = Some(Instant::now());\n                shared.stopping();",
  "                stopping = Some(Instant::now());", T),
 ("no-stop-check-after-hold", P,
  "        if *self.shared().stop.borrow() {\n            return Err(AcquireError::ShutDown);\n        }\n        if self.shared().draining",
  "        if self.shared().draining", T),
 ("late-landing-ignored", M,
  "        let other = self.may_land[usize::from(!enabled)];",
  "        let other: Option<Instant> = None;", T),
 ("no-doubt-window-on-504", A,
  "                    *slot = Some(later(*slot, window));",
  "                    let _ = (slot, window);", T),
 ("start-knows-off", M,
  "            ecs: Ecs::Unknown {\n                at_most: now + settings.duration() + landing,\n            },",
  "            ecs: Ecs::Off,", T),
 ("wall-clock-expiry", A,
  "                    until: flight.sent_at + self.duration,",
  "                    until: now + reported.duration_since(SystemTime::now()).unwrap_or_default().min(self.duration),", T),
 ("linger-unbounded", M,
  "        (longest * 2).clamp(self.min_put_interval, self.linger_bound())",
  "        (longest * 2).max(self.min_put_interval)", T),
 ("linger-off", M,
  "        (longest * 2).clamp(self.min_put_interval, self.linger_bound())",
  "        { let _ = longest; self.min_put_interval }", T),
 ("drain-ignored", M,
  "            let (window_end, quiet_end) = if self.draining {",
  "            let (window_end, quiet_end) = if false && self.draining {", T),
 ("settings-unchecked", S,
  "        check_refresh_timing(&s, &n)?;\n",
  "", T),
 ("task-not-valid-disable-retried", A,
  "            Err(ProtectionError::Rejected(rejection)) if rejection.reason() == \"TASK_NOT_VALID\" => {",
  "            Err(ProtectionError::Rejected(rejection)) if rejection.reason() == \"NEVER\" => {", T),
 ("disable-answer-ignores-late-enable", A,
  "                self.ecs = match self.may_land[1].filter(|t| *t > flight.sent_at) {",
  "                self.ecs = match None::<Instant> {", T),
 ("doubtful-report-as-released", D,
  "                Effect::Released if machine.might_be_protected(now) => ShutdownReport::Doubtful(",
  "                Effect::Released if false => ShutdownReport::Doubtful(", T),
 ("spacing-ignored", M,
  "            later(self.last_put_at.map(|t| t + self.min_put_interval), now),",
  "            now,", T),
 ("confirmed-at-most-too-short", A,
  "                    at_most: self.late_enable_end(now),\n                    reported,",
  "                    at_most: flight.sent_at + self.duration,\n                    reported,", T),
 # The agent's server closes idle connections after 5 s: the client retires them first.
 ("idle-connection-kept", L,
  "pub(crate) const RETIRE_AFTER: Duration = Duration::from_secs(3);",
  "pub(crate) const RETIRE_AFTER: Duration = Duration::from_secs(30);", E),
 # A request that met a close the server never read is sent once more.
 ("no-second-try-after-a-close", L,
  "pub(crate) const QUICK_FAILURE: Duration = Duration::from_millis(500);",
  "pub(crate) const QUICK_FAILURE: Duration = Duration::ZERO;", E),
 # The ECS API backend's requests may land until its own timeout has passed.
 ("ecs-api-window-is-the-agent-s", API,
  "    fn landing_window(&self, request_timeout: Duration) -> Duration {\n        request_timeout.saturating_add(LANDING_MARGIN)\n    }",
  "    fn landing_window(&self, _request_timeout: Duration) -> Duration {\n        crate::backend::AGENT_LANDING_WINDOW\n    }",
  "cargo nextest run -p task-protection --no-fail-fast --test ecs_api 2>&1"),
 # Task metadata answers 429 and 500 at times: it is read with retries.
 ("metadata-read-once", META,
  "                Err(e) if !e.is_transient() => return Err(e),",
  "                Err(e) => return Err(e),",
  "cargo nextest run -p task-protection --no-fail-fast --test ecs_api 2>&1"),
 # A throttle passed on by the agent may follow an applied try of its SDK.
 ("agent-throttle-not-applied", B,
  "                | Self::Throttled {\n                    by: ThrottledBy::EcsThroughAgent,\n                    ..\n                }",
  "", T),
 # A non-JSON 3xx/4xx is the agent's router: a wrong ECS_AGENT_URI.
 ("router-answer-read-as-malformed", N,
  "        Err(_) if (300..500).contains(&status) => {",
  "        Err(_) if false => {", T),
 # ...after which nothing more is sent.
 ("misconfigured-retried", A,
  "            Err(error @ ProtectionError::Misdirected { .. }) => {",
  "            Err(error @ ProtectionError::Misdirected { .. }) if false => {", T),
 # In ECS without the agent's endpoint: an error, not a simulation.
 ("auto-simulates-in-ecs", SEL,
  "                Some(meta) => Err(BackendConfigError::NoAgentInEcs {\n                    metadata_var: meta.name,\n                }),",
  "                Some(_) => Ok(Self::Local(LocalBackend::new())),", T),
 # The library reads TASK_PROTECTION_BACKEND itself.
 ("backend-variable-ignored", SEL,
  "        let kind = match lookup(BackendKind::ENV) {\n            Some(raw) => raw.parse()?,",
  "        let kind = match None::<String> {\n            Some(raw) => raw.parse()?,", T),
 # Two TaskProtections for one task in one process share one state machine.
 ("second-instance-not-shared", P,
  "        let Some(identity) = backend.identity() else {",
  "        let Some(identity) = None::<String> else {", T),
 # The layer leaves the paths it is told to skip unprotected.
 ("layer-skips-nothing", LAYER,
  "        let skipped = self.skip.as_ref().is_some_and(|skip| skip(&parts));",
  "        let skipped = false && self.skip.as_ref().is_some_and(|skip| skip(&parts));", T),
 # A hold from another container ends when its connection does.
 ("hold-without-heartbeat", LAYER,
  "                ready!(heartbeat.poll_tick(cx));",
  "                let _ = heartbeat;\n                return Poll::Pending;", T),
 # Errors keep their causes.
 ("unreachable-without-cause", "crates/task-protection/src/backend/agent.rs",
  "                .caused_by(BoxedCause(e)),",
  "                ,", T),
 ("timed-out-without-last-error", P,
  "                    let last_error = rx.borrow().last_error.clone();",
  "                    let last_error = None;", T),
 # A setting given in code is named by its builder method, not a variable.
 ("code-settings-named-as-variables", S,
  "        duration_minutes: \"duration_minutes\",",
  "        duration_minutes: env::DURATION_MINUTES,", T),
 # EMF intervals: zero and overflow refused when the configuration is built.
 ("emf-interval-unchecked", EMF,
  "        if config.interval < lo || config.interval > hi {",
  "        if false && (config.interval < lo || config.interval > hi) {",
  "cargo nextest run -p metrics-emf --no-fail-fast 2>&1"),
 # The model of the agent: 504 at the 4 s budget, not at once...
 ("model-504-at-once", MODEL,
  "        answer.after = Some(AGENT_BUDGET);",
  "        answer.after = Some(Duration::ZERO);", T),
 # ...unknown fields refused, as Go's decoder with DisallowUnknownFields...
 ("model-accepts-unknown-fields", MODEL,
  "        } else {\n            return None;\n        }\n    }\n    Some((enabled, minutes))",
  "        }\n    }\n    Some((enabled, minutes))", T),
 # ...and AccessDenied from ECS is a 400, not a 403.
 ("model-access-denied-403", MODEL,
  "        Reply::AccessDenied => ecs_error(\n            400,",
  "        Reply::AccessDenied => ecs_error(\n            403,", T),
 # The wiremock agent's limiter and its server's idle close.
 ("fake-agent-limiter-off", FAKE,
  "        if !inner\n            .limiter\n            .allow(\"127.0.0.1\", &path, tokio::time::Instant::now())\n        {",
  "        if false {", E),
 ("fake-agent-keeps-idle-connections", FAKE,
  "            .filter(|_| close == IdleClose::Prompt)",
  "            .filter(|_| false)", E),
 ("try-hold-while-draining", P,
  "        (!self.refuses_new_holders()).then_some(guard)",
  "        Some(guard)", T),
 ("drain-settings-unchecked", "crates/task-protection/src/drain/settings.rs",
  "            if value < min || value > max {\n                return Err(DrainSettingsError::OutOfRange {",
  "            if false && (value < min || value > max) {\n                return Err(DrainSettingsError::OutOfRange {", T),
]
