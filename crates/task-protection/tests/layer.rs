//! The HTTP layer with real requests over loopback: an axum server wrapped in
//! `ProtectionLayer`, reqwest and tungstenite clients, and a wiremock ECS agent that
//! records what ECS was asked to hold, and when. Real sockets, so real (short) time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use task_protection::layer::{ProtectionLayer, RequestProtection};
use task_protection::{AgentBackend, ProtectionSettings, ShutdownReport, TaskProtection};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const STATE: &str = "/api/task-id/task-protection/v1/state";
/// Bound on waits for a state; far above what each step takes on a slow machine.
const WAIT: Duration = Duration::from_secs(30);

/// One PUT the agent answered: when it arrived and whether it enabled protection.
#[derive(Debug, Clone, Copy)]
struct Put {
    at: Instant,
    enabled: bool,
}

/// A wiremock ECS agent that answers every PUT with success, as the agent does (the
/// model in `testing::agent`), and records it.
struct Agent {
    _server: MockServer,
    uri: String,
    puts: Arc<Mutex<Vec<Put>>>,
}

impl Agent {
    async fn start() -> Self {
        use task_protection::testing::{Reply, agent};
        let server = MockServer::start().await;
        let puts = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&puts);
        Mock::given(method("PUT"))
            .and(path(STATE))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                log.lock().unwrap().push(Put {
                    at: Instant::now(),
                    enabled: body["ProtectionEnabled"].as_bool().unwrap(),
                });
                let answer = agent::put_answer(
                    &req.body,
                    Reply::Ok,
                    Duration::ZERO,
                    "arn",
                    SystemTime::now(),
                );
                ResponseTemplate::new(answer.status)
                    .set_body_raw(answer.body, answer.content_type.unwrap_or_default())
            })
            .mount(&server)
            .await;
        let uri = format!("{}/api/task-id", server.uri());
        Self {
            _server: server,
            uri,
            puts,
        }
    }

    /// The PUTs from the first enable on. A new process releases at start what an
    /// earlier one in its task may have left on; that release is not the layer's.
    fn puts(&self) -> Vec<Put> {
        let all = self.puts.lock().unwrap().clone();
        all.into_iter().skip_while(|p| !p.enabled).collect()
    }

    fn protection(&self, settings: ProtectionSettings) -> TaskProtection {
        TaskProtection::start(AgentBackend::new(&self.uri).unwrap(), settings)
    }
}

fn settings(duration_minutes: u16, maintain_percent: u8, min_put: Duration) -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(duration_minutes)
        .maintain_percent(maintain_percent)
        .min_put_interval(min_put)
        .request_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Serves `app` on a loopback port; returns its base URL.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Waits until `done` holds, checking whenever protection's state changes and every
/// 10 ms (the holder count is not part of the state).
async fn wait_until(what: &str, protection: &TaskProtection, mut done: impl FnMut() -> bool) {
    let mut state = protection.state();
    let waited = tokio::time::timeout(WAIT, async {
        while !done() {
            let _ = tokio::time::timeout(Duration::from_millis(10), state.changed()).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what}: not within {WAIT:?}; {:?}, {} holders",
        protection.current(),
        protection.holders()
    );
}

/// A body that sends `chunks` chunks, `gap` apart, the first at once.
fn slow_body(chunks: usize, gap: Duration) -> Body {
    let stream = futures_util::stream::unfold(0, move |sent| async move {
        if sent == chunks {
            return None;
        }
        if sent > 0 {
            tokio::time::sleep(gap).await;
        }
        Some((
            Ok::<_, std::io::Error>(Bytes::from(format!("chunk {sent}\n"))),
            sent + 1,
        ))
    });
    Body::from_stream(stream)
}

#[tokio::test]
async fn a_slowly_streamed_response_keeps_ecs_protected_until_its_last_byte() {
    let agent = Agent::start().await;
    // No maintain window and 200 ms between PUTs: a guard let go at the headers
    // would be released 200 ms later, long before the body's 6 × 300 ms are out.
    let protection = agent.protection(settings(1, 0, Duration::from_millis(200)));
    let app = axum::Router::new()
        .route(
            "/report",
            get(|| async { Response::new(slow_body(6, Duration::from_millis(300))) }),
        )
        .layer(ProtectionLayer::new(protection.clone()));
    let base = serve(app).await;

    let started = Instant::now();
    let mut response = reqwest::get(format!("{base}/report")).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        body.push_str(std::str::from_utf8(&chunk).unwrap());
        // ECS holds protection while the body is still coming.
        if !body.contains("chunk 5") {
            assert!(protection.holders() >= 1, "no guard after {body:?}");
        }
    }
    let ended = Instant::now();
    assert_eq!(body.lines().count(), 6, "{body}");
    assert!(ended - started >= Duration::from_millis(1500));

    wait_until("released", &protection, || {
        agent.puts().iter().any(|p| !p.enabled)
    })
    .await;
    let puts = agent.puts();
    assert_eq!(puts.len(), 2, "one enable, one release: {puts:?}");
    assert!(puts[0].enabled && puts[0].at < ended, "{puts:?}");
    assert!(
        !puts[1].enabled && puts[1].at >= ended,
        "released {:?} before the last byte",
        ended - puts[1].at
    );
    assert_eq!(protection.holders(), 0);
}

#[tokio::test]
async fn a_burst_of_a_thousand_requests_costs_one_put_and_the_release() {
    let agent = Agent::start().await;
    // A minute of maintain, longer than the burst takes on any machine: the burst
    // is one stretch of work for ECS.
    let protection = agent.protection(settings(5, 20, Duration::from_secs(1)));
    let app = axum::Router::new()
        .route(
            "/job",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                "done"
            }),
        )
        .layer(ProtectionLayer::new(protection.clone()));
    let base = serve(app).await;
    let client = reqwest::Client::new();
    let answered = futures_util::stream::iter(0..1000)
        .map(|_| {
            let client = client.clone();
            let url = format!("{base}/job");
            async move { client.get(url).send().await.unwrap().text().await.unwrap() }
        })
        .buffer_unordered(100)
        .filter(|body| std::future::ready(body == "done"))
        .count()
        .await;
    assert_eq!(answered, 1000);
    wait_until("the last guard is gone", &protection, || {
        protection.holders() == 0
    })
    .await;
    assert!(protection.current().protected);
    let puts = agent.puts();
    assert_eq!(puts.len(), 1, "{puts:?}");
    assert!(puts[0].enabled);
    assert_eq!(protection.counters().puts(), 1);

    assert_eq!(protection.shutdown().await, ShutdownReport::Released);
    let puts = agent.puts();
    assert_eq!(puts.len(), 2, "{puts:?}");
    assert!(!puts[1].enabled);
}

#[tokio::test]
async fn an_idle_service_is_released_once_the_maintain_window_has_passed() {
    let agent = Agent::start().await;
    // Maintain: 5 % of a minute, 3 s after the enable.
    let protection = agent.protection(settings(1, 5, Duration::from_secs(1)));
    let maintain = protection.settings().maintain_window();
    assert_eq!(maintain, Duration::from_secs(3));
    // A job that lasts until ECS has confirmed protection. (One over before the
    // driver wakes needs none, and gets none.)
    let mut state = protection.state();
    let app = axum::Router::new()
        .route(
            "/job",
            get(move || async move {
                let protected = state.wait_for(|s| s.protected);
                tokio::time::timeout(WAIT, protected)
                    .await
                    .unwrap()
                    .unwrap();
                "done"
            }),
        )
        .layer(ProtectionLayer::new(protection.clone()))
        .route("/healthz", get(|| async { "ok" }));
    let base = serve(app).await;

    assert_eq!(
        reqwest::get(format!("{base}/job"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "done"
    );
    wait_until("the request's guard is gone", &protection, || {
        protection.holders() == 0
    })
    .await;
    // Health checks are outside the layer: they hold nothing.
    for _ in 0..5 {
        assert_eq!(
            reqwest::get(format!("{base}/healthz"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "ok"
        );
        assert_eq!(protection.holders(), 0);
    }
    wait_until("released", &protection, || {
        agent.puts().iter().any(|p| !p.enabled)
    })
    .await;
    let puts = agent.puts();
    assert_eq!(puts.len(), 2, "{puts:?}");
    assert!(puts[0].enabled && !puts[1].enabled, "{puts:?}");
    let held = puts[1].at - puts[0].at;
    assert!(held >= maintain, "released {held:?} after the enable");
    assert!(!protection.current().protected);
}

#[tokio::test]
async fn a_websocket_upgrade_carries_its_guard_into_the_connection() {
    let agent = Agent::start().await;
    let protection = agent.protection(settings(1, 0, Duration::from_millis(200)));
    let app =
        axum::Router::new()
            .route(
                "/ws",
                get(
                    |upgrade: WebSocketUpgrade,
                     Extension(request): Extension<RequestProtection>| async move {
                        let guard = request.try_hold();
                        upgrade.on_upgrade(move |mut socket| async move {
                            while let Some(Ok(message)) = socket.recv().await {
                                if let Message::Text(text) = message
                                    && socket.send(Message::Text(text)).await.is_err()
                                {
                                    break;
                                }
                            }
                            drop(guard);
                        })
                    },
                ),
            )
            .layer(ProtectionLayer::new(protection.clone()));
    let base = serve(app).await;
    let url = base.replacen("http", "ws", 1) + "/ws";
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);

    // The upgrade's response is over; the connection's own guard remains.
    ws.send("hello".into()).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "hello");
    wait_until(
        "the upgrade's response let its guard go",
        &protection,
        || protection.holders() <= 1,
    )
    .await;
    assert_eq!(protection.holders(), 1, "the connection holds protection");
    wait_until("protected", &protection, || protection.current().protected).await;

    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let closed = Instant::now();
    wait_until("released", &protection, || {
        agent.puts().iter().any(|p| !p.enabled)
    })
    .await;
    let puts = agent.puts();
    assert_eq!(puts.len(), 2, "{puts:?}");
    assert!(
        puts[1].at >= closed,
        "released while the connection was open"
    );
    assert_eq!(protection.holders(), 0);
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_takes_the_guard_with_it() {
    let agent = Agent::start().await;
    let protection = agent.protection(settings(1, 0, Duration::from_millis(200)));
    let app = axum::Router::new()
        .route(
            "/report",
            get(|| async { Response::new(slow_body(1000, Duration::from_millis(100))) }),
        )
        .layer(ProtectionLayer::new(protection.clone()));
    let base = serve(app).await;
    let mut response = reqwest::get(format!("{base}/report")).await.unwrap();
    assert!(response.chunk().await.unwrap().is_some());
    assert_eq!(protection.holders(), 1);
    drop(response);
    // The server notices the closed connection at its next write and drops the body.
    wait_until("the body's guard is gone", &protection, || {
        protection.holders() == 0
    })
    .await;
    wait_until("released", &protection, || {
        !protection.current().protected && agent.puts().last().is_none_or(|p| !p.enabled)
    })
    .await;
}

#[tokio::test]
async fn a_handler_that_fails_lets_its_guard_go() {
    use tower::{Layer, Service, ServiceExt};
    let protection = TaskProtection::start(
        task_protection::LocalBackend::new(),
        ProtectionSettings::default(),
    );
    let failing = tower::service_fn(|_: http::Request<()>| async {
        Err::<http::Response<String>, _>(std::io::Error::other("broken"))
    });
    let mut service = ProtectionLayer::new(protection.clone()).layer(failing);
    let call = service.ready().await.unwrap().call(http::Request::new(()));
    assert_eq!(protection.holders(), 1, "held while the handler runs");
    assert!(call.await.is_err());
    assert_eq!(protection.holders(), 0);
}

/// A task leaving its service takes no new protection: requests are still served,
/// without a guard, and a websocket handler is told there is none to carry.
#[tokio::test]
async fn a_draining_task_serves_requests_without_protection() {
    let agent = Agent::start().await;
    let protection = agent.protection(settings(1, 0, Duration::from_millis(200)));
    let observed = protection.clone();
    let app = axum::Router::new()
        .route(
            "/job",
            get(
                move |Extension(request): Extension<RequestProtection>| async move {
                    let carried = request.try_hold();
                    format!(
                        "holders={} carried={}",
                        observed.holders(),
                        carried.is_some()
                    )
                },
            ),
        )
        .layer(ProtectionLayer::new(protection.clone()));
    let base = serve(app).await;
    let get_job = || async {
        reqwest::get(format!("{base}/job"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    assert_eq!(get_job().await, "holders=2 carried=true");
    wait_until("the guards are gone", &protection, || {
        protection.holders() == 0
    })
    .await;
    protection.drain();
    for _ in 0..3 {
        assert_eq!(get_job().await, "holders=0 carried=false");
    }
    protection.undrain();
    assert_eq!(get_job().await, "holders=2 carried=true");
}

/// Paths the layer is told to skip hold nothing, nor can their handlers take a guard;
/// with axum's `route_layer`, a path no route matches (a scanner's) holds nothing
/// either. Every other request holds as usual.
#[tokio::test]
async fn skipped_paths_and_unmatched_paths_hold_nothing() {
    let agent = Agent::start().await;
    let protection = agent.protection(settings(1, 0, Duration::from_millis(200)));
    let observed = protection.clone();
    let report = move |Extension(request): Extension<RequestProtection>| {
        let observed = observed.clone();
        async move {
            format!(
                "holders={} guard={}",
                observed.holders(),
                request.try_hold().is_some()
            )
        }
    };
    let app = axum::Router::new()
        .route("/healthz", get(report.clone()))
        .route("/metrics", get(report.clone()))
        .route("/job", get(report))
        .route_layer(
            ProtectionLayer::new(protection.clone())
                .skip_paths(["/healthz"])
                .skip_if(|request| request.uri.path() == "/metrics"),
        );
    let base = serve(app).await;
    let get = |path: &'static str| {
        let base = base.clone();
        async move {
            let response = reqwest::get(format!("{base}{path}")).await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    for path in ["/healthz", "/metrics"] {
        assert_eq!(
            get(path).await,
            (200, "holders=0 guard=false".to_owned()),
            "{path}"
        );
    }
    for path in ["/.env", "/wp-login.php"] {
        assert_eq!(get(path).await.0, 404, "{path}");
        assert_eq!(protection.holders(), 0);
    }
    assert!(agent.puts().is_empty(), "{:?}", agent.puts());
    // A matched, unskipped route holds while it is served.
    assert_eq!(get("/job").await, (200, "holders=1 guard=true".to_owned()));
}
